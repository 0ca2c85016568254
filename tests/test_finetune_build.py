"""Building task models from recipes (spec §3.6, §8): branches, resolution change, per-layer tables, frozen parts,
saving and loading, and the errors of starting files that do not fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from onepeace.checkpoints.resample import resample_rel_pos_table_2d
from onepeace.errors import CheckpointError
from onepeace.finetune.build import build_task_model, load_start, load_task_model, read_start, save_task_model
from onepeace.finetune.config import parse_finetune_recipe


def recipe(task: str, *overrides: str):
    return parse_finetune_recipe("optim: {total_updates: 2}", ["model.init_from=onepeace-small", *overrides], task)


def test_grounding_model_at_a_new_resolution_copies_resampled_tables_per_layer() -> None:
    cfg = recipe("refcoco", "model.image_size=128")
    assert cfg.data.image_size == 128  # the model's resolution is the data's
    task = build_task_model(cfg)
    assert task.model.modalities == (task.spec.modalities[0], task.spec.modalities[1])
    tables = task.model.adapters["image"].rel_pos.tables
    assert len(tables) == task.model.cfg.layers == 6
    _, source = read_start("onepeace-small")
    shared = source["model.adapters.image.rel_pos.tables.0.weight"]
    expected = resample_rel_pos_table_2d(shared, 128 // 16)
    assert all(torch.equal(t.weight, expected) for t in tables)
    assert tables[0].weight.shape == ((2 * 8 - 1) ** 2 + 3, 4)
    assert torch.equal(task.model.adapters["text"].token_embed.weight, source["model.adapters.text.token_embed.weight"])


def test_unused_parameters_are_frozen_and_audio_keys_are_dropped_for_an_image_task() -> None:
    task = build_task_model(recipe("imagenet", "model.num_classes=7"))
    frozen = {n for n, p in task.named_parameters() if not p.requires_grad}
    assert frozen == {"model.projections.image.weight", "model.projections.image.bias", "model.logit_scale"} | {
        "model.encoder.final_norms.image.weight",
        "model.encoder.final_norms.image.bias",
    }
    assert not any(".audio" in n or ".text" in n for n, _ in task.named_parameters())
    assert task.head.fc.out_features == 7
    retrieval = build_task_model(recipe("coco_retrieval"))
    assert all(p.requires_grad for p in retrieval.parameters())


def test_saved_task_model_loads_back_identically(tmp_path: Path) -> None:
    task = build_task_model(recipe("vggsound", "model.num_classes=3")).eval()
    out = save_task_model(task, tmp_path / "model", {"updates": 0})
    again = load_task_model(out)
    assert again.spec.name == "vggsound" and again.head.classifier[3].out_features == 3
    for (name, a), (_, b) in zip(task.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    (out / "task.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not a onepeace task-model"):
        load_task_model(out)


def test_starting_weights_that_do_not_fit_are_named() -> None:
    task = build_task_model(recipe("vggsound", "model.num_classes=3"))
    state = dict(task.state_dict())
    with pytest.raises(CheckpointError, match=r"unexpected \['model.encoder.extra'\]"):
        load_start(task, {**state, "model.encoder.extra": torch.zeros(1)}, "file.pt")
    del state["model.encoder.layers.0.attn_norm.weight"]
    with pytest.raises(CheckpointError, match="missing .*attn_norm"):
        load_start(task, state, "file.pt")
    state = dict(task.state_dict())
    state["head.classifier.3.weight"] = torch.zeros(5, 512)
    with pytest.raises(CheckpointError, match="shape mismatch head.classifier.3.weight"):
        load_start(task, state, "file.pt")
    with pytest.raises(ValueError, match="model.init_from is required"):
        build_task_model(parse_finetune_recipe("optim: {total_updates: 2}", [], "vggsound"))


def test_recipe_errors_are_named() -> None:
    with pytest.raises(ValueError, match="recipe for task 'vggsound', not 'vqa'"):
        parse_finetune_recipe("task: vggsound\noptim: {epochs: 1}", [], "vqa")
    with pytest.raises(ValueError, match="unknown task 'vgg'"):
        parse_finetune_recipe("task: vgg\noptim: {epochs: 1}")
    with pytest.raises(ValueError, match="unknown key 'data.trian'"):
        parse_finetune_recipe("task: vqa\noptim: {epochs: 1}\ndata: {trian: [a.tsv]}")
    with pytest.raises(ValueError, match="grad_accum must be >= 1"):
        parse_finetune_recipe("task: vqa\ngrad_accum: 0\noptim: {epochs: 1}")
