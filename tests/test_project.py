"""Packaging checks: shipped data, CI command, fixture copies, no CUDA packages, a light import."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPU_INSTALL_ENV = "ONEPEACE_CPU_INSTALL"
SHARED = ROOT.parent / "shared" / "fixtures"
BPE_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "dict.txt": "2c31c5b236661067fe8626775eb995ef5fe808ac87d2ad4a6ddbef68550f5cc6",
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("name", sorted(BPE_SHA256))
def test_bpe_files_ship_in_the_package(name: str) -> None:
    data = resources.files("onepeace").joinpath("assets", "bpe", name).read_bytes()
    assert sha256(data) == BPE_SHA256[name]
    assert resources.files("onepeace").joinpath("assets", "bpe", "NOTICE.md").is_file()


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n# (\d)\. [^\n]*\n(.+?)\n```", readme, flags=re.S)
    commands = dict(blocks)
    assert set(commands) == {"1", "2"}
    assert "pytest" in commands["2"] and "pip install torch==2.13.0" in commands["2"]
    assert f"{CPU_INSTALL_ENV}=1 python -m pytest -q" in commands["2"]  # turns on test_no_cuda_packages_installed
    assert " -m " not in commands["2"].split("pytest", 1)[1]  # no marker filter: every CPU tier runs
    ci = (ROOT / ".ci" / "run").read_text()
    assert "# 2\\." in ci and "bash -euo pipefail -c" in ci


def test_quick_start_installs_what_the_readme_runs_next() -> None:
    """The main job's install leaves a new user able to run the index and the server the README shows next."""
    readme = (ROOT / "README.md").read_text()
    first = dict(re.findall(r"```bash\n# (\d)\. [^\n]*\n(?:#[^\n]*\n)*(.+?)\n```", readme, flags=re.S))["1"]
    extras = set(re.search(r'pip install -e "\.\[([^\]]*)\]"', first).group(1).split(","))
    needs = {"onepeace demo": "demo", "onepeace index build": "search", "onepeace serve": "serve"}
    for command, extra in needs.items():
        assert command in readme, command
        assert extra in extras, f"quick start 1 does not install [{extra}], which {command} needs"


@pytest.mark.skipif(
    os.environ.get(CPU_INSTALL_ENV) != "1", reason=f"{CPU_INSTALL_ENV}=1 is set only by the README's CPU install"
)
def test_no_cuda_packages_installed() -> None:
    """The README's CPU install (quick-start command 2, run verbatim by ``.ci/run``) pulled no CUDA build of torch.

    The check is meant for that install only: on a user's CUDA machine a CUDA torch is the right thing, so the test
    runs only when the README test command says it follows the CPU install, by setting ``ONEPEACE_CPU_INSTALL=1``
    in front of pytest. An explicit signal is used rather than inferring the intent from the environment (for
    example ``torch.version.cuda is None``), because inferring it would skip the check in exactly the case it is
    there to catch: a CUDA build that slipped into the CPU install. ``test_ci_runs_the_readme_test_command``
    keeps the variable in the README command, so CI cannot lose the check silently.
    """
    names = {(d.metadata["Name"] or "").lower() for d in importlib.metadata.distributions()}
    cuda = sorted(n for n in names if n.startswith(("nvidia-", "cuda-", "triton")))
    assert cuda == []
    assert "+cu" not in importlib.metadata.version("torch")


def test_multi_process_and_cuda_tests_carry_their_tier_markers() -> None:
    """A test module that launches processes (``tests/torchrun.py``) marks them ``dist``, one that skips without CUDA
    marks it ``gpu``: otherwise they would run in (or skip out of) the fast tier unnoticed."""
    unmarked = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        text = path.read_text()
        if re.search(r"^from torchrun import", text, flags=re.M) and "pytest.mark.dist" not in text:
            unmarked.append(f"{path.name}: tests/torchrun.py without pytest.mark.dist")
        if re.search(r"skipif\(\s*not torch\.cuda\.is_available\(\)", text) and "pytest.mark.gpu" not in text:
            unmarked.append(f"{path.name}: a CUDA skip without pytest.mark.gpu")
    assert unmarked == []


def test_import_is_light() -> None:
    code = "import sys, onepeace; assert 'torch' not in sys.modules, 'torch imported'; print(onepeace.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr


@pytest.mark.skipif(not SHARED.is_dir(), reason="the shared fixtures are not beside this checkout")
def test_fixture_copies_match_the_originals() -> None:
    import gzip

    import torch
    from official import TINY, full_state_dict, inputs, outputs
    from safetensors.torch import load

    for name in ("inputs.safetensors", "outputs.safetensors"):
        assert sha256((TINY / name).read_bytes()) == sha256((SHARED / "official_tiny" / name).read_bytes())
    original = load(gzip.open(SHARED / "official_tiny" / "state_dict.safetensors.gz").read())
    rebuilt = full_state_dict()
    assert set(original) == set(rebuilt)
    tokens = torch.unique(inputs()["text.tokens"])  # the only token rows the fixture keeps
    for key, value in original.items():
        if key.endswith("embed_tokens.weight"):
            assert torch.equal(value[tokens], rebuilt[key][tokens])
        else:
            assert torch.equal(value, rebuilt[key]), key
    assert len(outputs()) == 71
    tok = (Path(__file__).parent / "fixtures" / "official_bpe" / "tokenization.json").read_bytes()
    assert tok == (SHARED / "official_bpe" / "tokenization.json").read_bytes()
