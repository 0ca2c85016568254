"""Fine-tuning under torchrun (2 gloo processes, DDP) equals one process on the concatenated batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torchrun import launch

from onepeace.cli import main

pytestmark = pytest.mark.dist

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "finetune" / "tiny" / "imagenet.yaml"
DATA = ROOT / "tests" / "data" / "tiny_tasks" / "imagenet.tsv"


def _args(out: Path, batch: int) -> list[str]:
    common = [f"data.train=[{DATA}]", "data.valid=[]", "max_updates=2", f"data.batch_size={batch}"]
    return ["finetune", "--task", "imagenet", "--config", str(RECIPE), f"out_dir={out}", *common]


def test_two_ddp_ranks_of_four_equal_one_process_of_eight(tmp_path: Path) -> None:
    """Rank r takes every second example of the shuffled epoch, so the two local batches of 4 hold the single
    process's batch of 8; DDP averages the per-rank mean losses' gradients, which is the gradient of the mean over
    the 8. Image classification has no batch-dependent layer (and the recipe no drop path), so the weights after two
    AdamW updates agree up to float summation order."""
    assert main(_args(tmp_path / "one", 8)) == 0
    launch(["-m", "onepeace", *_args(tmp_path / "ddp", 4), "strategy=ddp"], nproc=2, timeout=300, cwd=ROOT)
    one = load_file(str(tmp_path / "one" / "model" / "task_model.safetensors"))
    ddp = load_file(str(tmp_path / "ddp" / "model" / "task_model.safetensors"))
    assert set(one) == set(ddp)
    start = load_file(str(ROOT / "src" / "onepeace" / "assets" / "models" / "onepeace-small" / "model.safetensors"))
    worst = max(float((one[k].float() - ddp[k].float()).abs().max()) for k in one)
    print(f"largest weight difference DDP vs one process: {worst:.2e}")
    assert worst < 1e-5, worst
    changed = [k for k in start if f"model.{k}" in one and not torch.equal(one[f"model.{k}"], start[k].float())]
    assert len(changed) > 10  # the backbone was trained too, identically on both sides


def test_retrieval_runs_under_ddp_with_the_cross_rank_gather(tmp_path: Path) -> None:
    """Two ranks of 4 pairs train through the gathered contrastive loss (whose numbers the pretraining tests check);
    the logged top-1 counts are over each rank's 4 queries."""
    import json

    recipe = ROOT / "configs" / "finetune" / "tiny" / "coco_retrieval.yaml"
    data = ROOT / "tests" / "data" / "tiny_pairs" / "image_text.tsv"
    args = ["finetune", "--task", "coco_retrieval", "--config", str(recipe), f"out_dir={tmp_path}"]
    args += [f"data.train=[{data}]", "data.valid=[]", "max_updates=2", "data.batch_size=4", "strategy=ddp"]
    launch(["-m", "onepeace", *args], nproc=2, timeout=300, cwd=ROOT)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        assert 0.0 <= row["media2text_correct"] <= 4.0 and row["contrastive_loss"] > 0
    assert (tmp_path / "model" / "task_model.safetensors").is_file()
