"""``benchmarks/gpu_check.py --device cpu --tiny``: the GPU check's code runs end to end on CPU and its JSON holds
every row with sane values, so the script a GPU user runs cannot rot.

CPU against CPU must agree exactly (same kernels, same inputs), and both with the official fixture within the parity
tolerances. The compiled row uses torch.compile's ``eager`` backend here: graph capture and the per-block compile run
as on a GPU, without the minutes of C++ code generation inductor needs on a loaded 2-core CPU.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
ROWS = ("fixture", "sdpa", "matmul", "flops", "train_eager", "train_compiled", "train_fsdp", "encode")
EMBED_TOL, HIDDEN_TOL = 1e-5, 1e-4
"""The parity tolerances of tests/test_parity.py (embeddings, hidden states) against the official outputs."""


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("gpu_check") / "result.json"
    args = [sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--compile-backend", "eager", "--out", str(out)]
    run = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert out.is_file(), run.stderr[-3000:]
    data = json.loads(out.read_text())
    assert json.loads(run.stdout) == data  # the same JSON is printed
    assert data["errors"] == {}, json.dumps({k: data["rows"][k].get("traceback") for k in data["errors"]}, indent=1)
    assert run.returncode == 0, run.stderr[-3000:]
    return data


def positive(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_every_row_ran_and_records_time_and_memory(result: dict) -> None:
    assert tuple(result["rows"]) == ROWS
    for name, row in result["rows"].items():
        assert row["ok"] is True and row["error"] is None, name
        assert positive(row["seconds"]) and isinstance(row["peak_memory_bytes"], int), name
        assert row["peak_memory_bytes"] > 0, name
    assert result["settings"]["tiny"] is True and result["settings"]["device"] == "cpu"
    assert result["environment"]["torch"]


def test_fixture_cpu_against_cpu_is_exact_and_matches_the_official_outputs(result: dict) -> None:
    row = result["rows"]["fixture"]
    assert set(row["max_abs_diff"]) == {"text", "image", "audio"}
    for modality in ("text", "image", "audio"):
        assert row["max_abs_diff"][modality] == {"embedding": 0.0, "hidden": 0.0}, modality
        official = row["max_abs_diff_vs_official"][modality]
        assert 0.0 <= official["embedding"] < EMBED_TOL and 0.0 <= official["hidden"] < HIDDEN_TOL, modality


def test_sdpa_row_names_the_kernels(result: dict) -> None:
    row = result["rows"]["sdpa"]
    assert row["backends"]["math"]["usable"] is True
    assert row["backends"]["math"]["max_abs_diff_vs_math_fp32"] < 2e-2  # bf16 math against fp32 math
    assert all(isinstance(b["usable"], bool) for b in row["backends"].values())
    assert row["model_kernels"] and all(k.startswith("aten::_scaled_dot_product") for k in row["model_kernels"])
    assert row["shape"] == {"heads": 4, "head_dim": 16, "seq": 16 + 1 + 16 + 1}  # onepeace-tiny, 64 px, 16 tokens


def test_training_rows_report_throughput_flops_and_mfu(result: dict) -> None:
    rows, peak = result["rows"], result["rows"]["matmul"]["tflops"]
    assert positive(peak) and len(rows["matmul"]["tflops_all"]) == 3
    assert positive(rows["flops"]["per_sample"])
    for name in ("train_eager", "train_compiled", "train_fsdp"):
        row = rows[name]
        assert 1 <= row["batch"] <= 2 and row["batches_tried"][str(row["batch"])] == "ok", name
        assert positive(row["samples_per_second"]) and positive(row["tflops"]), name
        assert row["tflops"] == pytest.approx(row["samples_per_second"] * rows["flops"]["per_sample"] / 1e12)
        assert row["mfu"] == pytest.approx(row["tflops"] / peak)
        assert len(row["step_seconds"]) == 2 and all(math.isfinite(x) for x in row["losses"]), name
    assert rows["train_eager"]["batches_tried"] == {"1": "ok", "2": "ok"}  # doubling stops at the --tiny cap
    assert rows["train_compiled"]["compiled_blocks"] == 2 + 2  # the fusion blocks of the backbone and the decoder
    assert positive(rows["train_compiled"]["speedup_vs_eager"])
    assert rows["train_fsdp"]["world_size"] == 1 and rows["train_fsdp"]["param_dtype"] == "bfloat16"


def test_encode_row_reports_every_modality(result: dict) -> None:
    row = result["rows"]["encode"]
    for modality, batch in (("image", 4), ("text", 8), ("audio", 2)):
        assert row[modality]["batch"] == batch and positive(row[modality]["items_per_second"]), modality
    assert row["audio"]["audio_seconds_per_second"] == pytest.approx(row["audio"]["items_per_second"] * 1.0)


def test_a_failing_row_is_recorded_and_the_others_still_run(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    args = [sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--rows", "fixture", "matmul"]
    args += ["--fixture", str(tmp_path / "missing"), "--out", str(out)]
    run = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 1, run.stderr[-2000:]
    data = json.loads(out.read_text())
    assert tuple(data["rows"]) == ("fixture", "matmul")
    assert data["rows"]["fixture"]["ok"] is False and "missing" in data["rows"]["fixture"]["error"]
    assert data["errors"] == {"fixture": data["rows"]["fixture"]["error"]}
    assert data["rows"]["matmul"]["ok"] is True and positive(data["rows"]["matmul"]["tflops"])
