"""Sharded checkpoints under torchrun (2 gloo ranks): kill and exact resume under FSDP2 and DDP, a checkpoint killed
while being written is never resumed from, and the export command gives the trained model.

Each strategy has one uninterrupted run of the tiny stage-1 recipe (module fixture). A second run is SIGKILLed
(the whole torchrun process group) once its first checkpoint is complete, then resumed with ``--resume``: every
logged loss and every final weight must equal the uninterrupted run's bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torchrun import launch

from onepeace.cli import main
from onepeace.train.checkpoint import MARKER, latest_checkpoint, read_checkpoint_weights
from onepeace.train.sharded import STATE_DIR

pytestmark = [pytest.mark.dist, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
STAGE1 = ROOT / "configs" / "tiny_stage1.yaml"
PAIRS = ROOT / "tests" / "data" / "tiny_pairs"
KILL_DURING_SAVE = Path(__file__).with_name("dist_kill_during_save.py")
TOTAL, SAVE_EVERY = 10, 2


def _args(run: Path, strategy: str, *extra: str) -> list[str]:
    args = ["pretrain", "--config", str(STAGE1), f"out_dir={run}", f"data.paths=[{PAIRS / 'image_text.tsv'}]"]
    args += [f"strategy={strategy}", f"optim.total_updates={TOTAL}", f"save_every={SAVE_EVERY}", "keep_last=10"]
    return [*args, *extra]


def _rows(run: Path) -> dict[int, dict]:
    """Logged rows by update (a resumed run's rows replace those of the killed run)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows}


def _assert_same_run(a: Path, b: Path) -> None:
    rows_a, rows_b = _rows(a), _rows(b)
    assert sorted(rows_a) == sorted(rows_b) == list(range(1, TOTAL + 1))
    for step in rows_a:
        for name in ("total", "itc_loss", "dcl_text_loss", "dcl_image_loss", "grad_norm"):
            assert rows_a[step][name] == rows_b[step][name], (step, name)
    wa, wb = read_checkpoint_weights(a), read_checkpoint_weights(b)
    assert set(wa) == set(wb) and len(wa) > 100
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An uninterrupted run per strategy."""
    base = tmp_path_factory.mktemp("straight")
    runs = {}
    for strategy in ("fsdp", "ddp"):
        runs[strategy] = base / strategy
        launch(["-m", "onepeace", *_args(runs[strategy], strategy)], nproc=2, timeout=300, cwd=ROOT)
    return runs


def _torchrun_popen(args: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return subprocess.Popen(
        [*cmd, "--max-restarts", "0", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_sigkill_and_resume_is_exact(strategy: str, straight: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "killed"
    proc = _torchrun_popen(["-m", "onepeace", *_args(run, strategy)])
    deadline = time.monotonic() + 240
    while not (run / "latest").is_file():
        assert proc.poll() is None, proc.stderr.read()[-4000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    proc.stderr.close()
    assert not (run / f"step_{TOTAL:08d}").exists(), "the run finished before it could be killed"
    first = latest_checkpoint(run)
    assert first is not None and sorted(p.name for p in (first / STATE_DIR).glob("*.distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]  # each rank wrote its own shard file
    launch(["-m", "onepeace", *_args(run, strategy, "--resume", str(run))], nproc=2, timeout=300, cwd=ROOT)
    _assert_same_run(straight[strategy], run)


def test_checkpoint_killed_while_written_is_never_resumed(straight: dict[str, Path], tmp_path: Path) -> None:
    """Rank 0 is SIGKILLed after every rank wrote its shards of update 4 but before the marker: that step directory
    holds all the data files, yet the resume starts from update 2 and still ends bit-identical to the straight run."""
    run = tmp_path / "killed"
    proc = _torchrun_popen([str(KILL_DURING_SAVE), "4", *_args(run, "fsdp")])
    assert proc.wait(300) != 0
    proc.stderr.close()
    half = run / "step_00000004"
    assert (half / STATE_DIR / ".metadata").is_file() and len(list((half / STATE_DIR).glob("*.distcp"))) == 2
    assert not (half / MARKER).exists()
    assert latest_checkpoint(run) == run / "step_00000002"
    launch(["-m", "onepeace", *_args(run, "fsdp", "--resume", str(run))], nproc=2, timeout=300, cwd=ROOT)
    assert json.loads((run / "step_00000004" / MARKER).read_text())["step"] == 4  # written again, completely
    _assert_same_run(straight["fsdp"], run)


def test_export_of_a_sharded_checkpoint_embeds_like_the_trained_model(
    straight: dict[str, Path], tmp_path: Path
) -> None:
    """``onepeace checkpoint export`` of the last sharded checkpoint equals the backbone the run itself exported
    (gathered from the FSDP shards at the end of training), weight for weight and embedding for embedding."""
    import onepeace

    run = straight["fsdp"]
    assert main(["checkpoint", "export", str(run), str(tmp_path / "exported")]) == 0
    exported, trained = onepeace.load(str(tmp_path / "exported")), onepeace.load(str(run / "model"))
    weights = read_checkpoint_weights(run, "model.")
    state = exported.model.state_dict()
    assert set(state) == {k.removeprefix("model.") for k in weights}
    assert all(torch.equal(state[k], weights[f"model.{k}"]) for k in state)
    texts, images = ["A frog.", "A red car on a road."], [PAIRS / "images" / "frog.png"]
    a, b = exported.embed(text=texts, image=images), trained.embed(text=texts, image=images)
    assert torch.equal(a.text, b.text) and torch.equal(a.image, b.image)
    assert not torch.equal(a.text[0], a.text[1])


def test_stage2_starts_from_a_sharded_stage1_run(straight: dict[str, Path], tmp_path: Path) -> None:
    """``model.init_from`` naming a run directory whose checkpoints are sharded: stage 2 reads the stage-1 weights
    from the shards; the frozen shared parts stay those weights and the export carries the stage-1 image branch."""
    import onepeace

    stage1 = read_checkpoint_weights(straight["fsdp"])
    args = ["pretrain", "--config", str(ROOT / "configs" / "tiny_stage2.yaml"), f"out_dir={tmp_path}"]
    args += [f"model.init_from={straight['fsdp']}", f"data.paths=[{PAIRS / 'audio_text.tsv'}]", "optim.total_updates=2"]
    assert main(args) == 0
    stage2 = read_checkpoint_weights(tmp_path)
    shared = [k for k in stage2 if k.startswith("model.encoder.layers.") and ".attn." in k]
    assert len(shared) > 10 and all(torch.equal(stage2[k], stage1[k]) for k in shared)
    assert any(".ffn.audio." in k for k in stage2) and not any(".ffn.audio." in k for k in stage1)
    model = onepeace.load(str(tmp_path / "model"))
    state = model.model.state_dict()
    image = [k for k in state if ".image" in f".{k}"]
    assert len(image) > 10 and all(torch.equal(state[k], stage1[f"model.{k}"]) for k in image)
