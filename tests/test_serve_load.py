"""The CI run of benchmarks/serve_load.py: 2,000 mixed requests from 16 clients (the figure the
issue asks for; about 20 s here) against a real server process.

Every valid request must get a 2xx, every bad one its expected 4xx, and the server must be alive at the end.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

pytest.importorskip("fastapi")
pytest.importorskip("faiss")
pytest.importorskip("soundfile")
pytest.importorskip("httpx")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("serve_load", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_serve_under_mixed_load(tmp_path: Path) -> None:
    bench = _load_benchmark()
    report = bench.run_benchmark(requests=2000, clients=16, max_seconds=300, workdir=tmp_path)
    print(bench.format_report(report))
    assert report["sent"] == 2000
    assert report["failure_count"] == 0, report["failures"]
    assert report["server_alive"]
    for name, row in report["kinds"].items():
        assert row["count"] > 0, f"no request of kind {name} was sent"
        if row["valid"]:
            assert set(row["statuses"]) == {"200"}, (name, row["statuses"])
        else:
            assert all(status.startswith("4") for status in row["statuses"]), (name, row["statuses"])
    metrics = report["server_metrics"]
    assert metrics["errors"]["server_5xx"] == 0
    assert metrics["batching"]["batches_run"] > 0
