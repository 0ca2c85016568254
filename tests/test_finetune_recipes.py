"""The fine-tuning recipes in ``configs/finetune/``: one per task, header, strict loading, settings (spec §8.2)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from onepeace.finetune.config import FinetuneConfig, load_finetune_recipe
from onepeace.finetune.tasks import TASKS
from onepeace.train.config import REQUIRED_HEADER, check_header

RECIPE_DIR = Path(__file__).resolve().parents[1] / "configs" / "finetune"
RECIPES = {path.stem: path for path in sorted(RECIPE_DIR.glob("*.yaml"))}


def _load(task: str, overrides: tuple[str, ...] = ()) -> FinetuneConfig:
    return load_finetune_recipe(RECIPE_DIR / f"{task}.yaml", overrides)


def test_there_is_exactly_one_recipe_per_task() -> None:
    # Only the top level of configs/finetune/ holds the paper recipes (tiny/ is a separate set).
    assert sorted(RECIPES) == sorted(TASKS)
    for task in TASKS:
        assert len(list(RECIPE_DIR.glob(f"{task}.y*ml"))) == 1, task


@pytest.mark.parametrize("task", sorted(TASKS))
def test_recipe_has_a_header_and_loads_strictly(task: str) -> None:
    path = RECIPE_DIR / f"{task}.yaml"
    text = path.read_text()
    header = check_header(text, str(path))
    assert all(header[key] for key in REQUIRED_HEADER)
    if task == "esc50":
        assert header["command"].startswith("onepeace evaluate esc50 ")
    else:
        assert header["command"] == f"onepeace finetune --task {task} --config configs/finetune/{task}.yaml"
    cfg = load_finetune_recipe(path)
    assert cfg.task == path.stem
    assert load_finetune_recipe(path, task=task) == cfg
    assert cfg.precision == "bf16"
    assert cfg.model.init_from == "one-peace.pt"
    assert cfg.paper_target.strip()
    assert re.search(r"\d+\.\d", cfg.paper_target), cfg.paper_target
    assert "Table" in cfg.paper_target
    assert cfg.data.valid and all(not Path(p).is_absolute() for p in (*cfg.data.train, *cfg.data.valid))
    assert cfg.trains == bool(cfg.data.train)


@pytest.mark.parametrize("task", ["vggsound", "refcoco", "esc50"])
def test_unknown_override_key_is_named(task: str) -> None:
    with pytest.raises(ValueError, match=r"model\.foo"):
        _load(task, ("model.foo=1",))
    with pytest.raises(ValueError, match=r"data\.bar"):
        _load(task, ("data.bar=2",))


def test_mismatched_task_raises() -> None:
    with pytest.raises(ValueError, match="vggsound"):
        load_finetune_recipe(RECIPE_DIR / "vggsound.yaml", task="fsd50k")


def test_overrides_apply() -> None:
    cfg = _load("vggsound", ("optim.lr=1e-5", "data.batch_size=2"))
    assert (cfg.optim.lr, cfg.data.batch_size) == (1e-5, 2)


# Spot checks against the per-task table of spec §8.2 / paper Tables 15-17:
# task -> (lr, layer decay, epochs, drop path, image side or None for the default 256)
TABLE = {
    "coco_retrieval": (8e-5, 0.9, 15, 0.5, 432),
    "flickr30k_retrieval": (7e-5, 0.9, 20, 0.4, 432),
    "audiocaps_retrieval": (1.5e-4, 0.95, 10, 0.9, None),
    "clotho_retrieval": (1.5e-4, 0.95, 10, 0.9, None),
    "vggsound": (8e-5, 0.95, 10, 0.6, None),
    "fsd50k": (1e-4, 0.9, 10, 0.5, None),
    "aqa": (7e-5, 0.9, 10, 0.5, None),
    "vqa": (3e-4, 0.85, 10, 0.5, 768),
    "nlvr2": (1e-4, 0.9, 25, 0.4, None),
    "refcoco": (1.5e-4, 0.9, 30, 0.4, 384),
    "refcoco_plus": (1.5e-4, 0.9, 30, 0.4, 384),
    "refcocog": (1.5e-4, 0.9, 30, 0.4, 384),
    "imagenet": (5e-5, 0.9, 15, 0.4, 512),
}


@pytest.mark.parametrize("task", sorted(TABLE))
def test_recipe_has_the_table_settings(task: str) -> None:
    cfg = _load(task)
    lr, layer_decay, epochs, drop_path, image_size = TABLE[task]
    assert cfg.optim.lr == pytest.approx(lr)
    assert cfg.optim.layer_decay == layer_decay
    assert cfg.optim.epochs == epochs
    assert cfg.model.drop_path_rate == drop_path
    assert cfg.model.image_size == image_size
    assert cfg.data.image_size == (image_size or 256)
    # Official fine-tuning base: AdamW (0.9, 0.999), wd 0.05, no clipping, per-layer rel-pos tables.
    assert cfg.optim.betas == (0.9, 0.999)
    assert cfg.optim.weight_decay == 0.05
    assert cfg.optim.clip_grad_norm == 0.0
    assert cfg.model.per_layer_rel_pos


def test_task_specific_values() -> None:
    vggsound = _load("vggsound")
    assert (vggsound.optim.lr, vggsound.optim.layer_decay, vggsound.model.drop_path_rate) == (8e-5, 0.95, 0.6)
    assert vggsound.data.max_duration == 15.0
    assert vggsound.data.batch_size == 8
    assert _load("refcoco").model.image_size == 384
    assert _load("vqa").optim.layer_decay == 0.85
    assert _load("audiocaps_retrieval").data.max_duration == 20.0
    imagenet = _load("imagenet")
    assert imagenet.model.label_smoothing == 0.3
    assert (imagenet.optim.warmup_ratio, imagenet.optim.min_lr) == (0.2, 0.0)
    for task in ("vggsound", "coco_retrieval", "refcoco"):
        assert _load(task).optim.warmup_ratio == 0.1
    esc50 = _load("esc50")
    assert not esc50.trains
    assert esc50.data.prompt == "This is a sound of {label}"
    assert "91.8" in esc50.paper_target
