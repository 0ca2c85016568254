"""End-to-end pretraining on real data through the CLI: both stages, frozen parts, kill and exact resume."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torchrun import launch

from onepeace.cli import main
from onepeace.data.pretrain import PretrainDataConfig
from onepeace.train.build import build_objective
from onepeace.train.checkpoint import read_checkpoint_weights
from onepeace.train.config import load_recipe

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ROOT / "tests" / "data" / "tiny_pairs"
STAGE1, STAGE2 = ROOT / "configs" / "tiny_stage1.yaml", ROOT / "configs" / "tiny_stage2.yaml"


def metrics(run: Path) -> dict[int, dict]:
    """Logged rows by update (a resumed run's rows replace those of the killed run)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows}


def mean_loss(rows: dict[int, dict], name: str, steps: range) -> float:
    return statistics.mean(rows[s][name] for s in steps)


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    """The training module's weights in the latest checkpoint (single-file, or sharded under torchrun)."""
    return read_checkpoint_weights(run)


@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("pretrain")
    one, two = base / "stage1", base / "stage2"
    assert (
        main(["pretrain", "--config", str(STAGE1), f"out_dir={one}", f"data.paths=[{PAIRS / 'image_text.tsv'}]"]) == 0
    )
    args = [f"out_dir={two}", f"model.init_from={one}", f"data.paths=[{PAIRS / 'audio_text.tsv'}]"]
    assert main(["pretrain", "--config", str(STAGE2), *args]) == 0
    return one, two


def test_stage1_contrastive_loss_falls(stage_runs: tuple[Path, Path]) -> None:
    rows = metrics(stage_runs[0])
    first, last = mean_loss(rows, "itc_loss", range(1, 11)), mean_loss(rows, "itc_loss", range(141, 151))
    assert last < 0.6 * first, (first, last)
    assert all(row["skipped"] == 0 for row in rows.values())


def test_stage2_contrastive_loss_falls(stage_runs: tuple[Path, Path]) -> None:
    rows = metrics(stage_runs[1])
    first, last = mean_loss(rows, "atc_loss", range(1, 11)), mean_loss(rows, "atc_loss", range(191, 201))
    assert last < 0.8 * first, (first, last)


def test_stage2_keeps_frozen_parameters_bit_identical(stage_runs: tuple[Path, Path]) -> None:
    one, two = stage_runs
    cfg = load_recipe(STAGE2, [f"model.init_from={one}"], data_config_type=PretrainDataConfig)
    frozen = [n for n, p in build_objective(cfg).named_parameters() if not p.requires_grad and n.startswith("model.")]
    before, after = final_weights(one), final_weights(two)
    shared = [n for n in frozen if "audio" not in n]
    assert len(shared) > 30 and any(".attn." in n for n in shared) and "model.projections.text.weight" in shared
    for name in shared:
        assert torch.equal(before[name], after[name]), name
    trained = [n for n in after if ".ffn.audio." in n or n.startswith("model.projections.audio")]
    assert trained and all(n not in before for n in trained)  # the audio branch is new in stage 2
    assert not any(".image" in n for n in after)


def _start(run: Path, total: int) -> subprocess.Popen:
    args = [
        sys.executable,
        "-m",
        "onepeace",
        "pretrain",
        "--config",
        str(STAGE1),
        f"out_dir={run}",
        f"data.paths=[{PAIRS / 'image_text.tsv'}]",
        f"optim.total_updates={total}",
        "save_every=10",
        "keep_last=10",
    ]
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_kill_and_resume_is_exact(tmp_path: Path) -> None:
    total = 40
    straight = _start(tmp_path / "straight", total)
    killed_run = tmp_path / "killed"
    killed = _start(killed_run, total)
    deadline = time.monotonic() + 240
    while not (killed_run / "latest").is_file():
        assert killed.poll() is None, killed.stderr.read()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait(30)
    assert not (killed_run / f"step_{total:08d}").exists(), "the run finished before it could be killed"
    assert straight.wait(300) == 0, straight.stderr.read()
    resumed = ["pretrain", "--config", str(STAGE1), "--resume", str(killed_run), f"out_dir={killed_run}"]
    resumed += [f"data.paths=[{PAIRS / 'image_text.tsv'}]", f"optim.total_updates={total}", "save_every=10"]
    assert main([*resumed, "keep_last=10"]) == 0
    a, b = final_weights(tmp_path / "straight"), final_weights(killed_run)
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    rows_a, rows_b = metrics(tmp_path / "straight"), metrics(killed_run)
    for step in range(1, total + 1):
        assert rows_a[step]["total"] == rows_b[step]["total"], step


def _torchrun(run: Path, *extra: str) -> None:
    args = ["-m", "onepeace", "pretrain", "--config", str(STAGE1), f"out_dir={run}"]
    args += [f"data.paths=[{PAIRS / 'image_text.tsv'}]", "strategy=fsdp", "optim.total_updates=6", "save_every=3"]
    launch([*args, "keep_last=5", *extra], nproc=2, timeout=300, cwd=ROOT)


@pytest.mark.dist
def test_fsdp_run_resumes_exactly_under_torchrun(tmp_path: Path) -> None:
    """Two gloo processes with FSDP2: 6 updates straight equal 3 updates, a stop, and a resume for 3 more."""
    _torchrun(tmp_path / "straight")
    _torchrun(tmp_path / "split", "max_updates=3")
    _torchrun(tmp_path / "split", "--resume", str(tmp_path / "split"))
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "split")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    exported = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    assert all(torch.equal(exported[k], a[f"model.{k}"]) for k in exported)


def test_stage2_export_is_the_complete_three_modality_model(stage_runs: tuple[Path, Path]) -> None:
    import onepeace

    one, two = stage_runs
    model = onepeace.load(str(two / "model"))
    assert set(model.cfg.modalities) == {"text", "image", "audio"}
    stage1 = final_weights(one)
    state = model.model.state_dict()
    image_keys = [k for k in state if ".image" in f".{k}"]
    assert len(image_keys) > 10
    for key in image_keys:  # the image branch is stage 1's, bit for bit
        assert torch.equal(state[key], stage1[f"model.{key}"]), key
    emb = model.embed(text=["A frog."], image=[PAIRS / "images" / "frog.png"], audio=[PAIRS / "audio" / "frog.ogg"])
    assert emb.text.shape == emb.image.shape == emb.audio.shape == (1, model.cfg.embed_dim)
