"""Fine-tuned official files (spec §9.2, §3.6): classify_head keys load into ClassifyHead, and per-layer
relative-position tables copied from the shared one leave every output unchanged."""

from __future__ import annotations

import official
import pytest
import torch

from onepeace.checkpoints.official import official_head_state, official_pretrain_state
from onepeace.checkpoints.official_keys import sort_keys, to_ours
from onepeace.checkpoints.state import build_model, per_layer_tables
from onepeace.errors import CheckpointError
from onepeace.heads import ClassifyHead
from onepeace.variants import get_variant


def _classify_state_dict(head: ClassifyHead) -> dict[str, torch.Tensor]:
    """The tiny fixture's inference weights plus a head under the official classify layout."""
    sd = official.inference_state_dict()
    sd.update({f"classify_head.{k}": v.clone() for k, v in head.state_dict().items()})
    return sd


def test_classify_head_keys_load_with_nothing_missing_or_unexpected() -> None:
    torch.manual_seed(0)
    source = ClassifyHead(64, 4, num_classes=3, use_pooler=True)
    sd = _classify_state_dict(source)
    report = sort_keys(list(sd))
    assert report.unknown == [] and len(report.head) == 16
    assert all(key.startswith("classify_head.") for key in report.head)
    target = ClassifyHead(64, 4, num_classes=3, use_pooler=True)
    result = target.load_state_dict(official_head_state(sd), strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
    with pytest.raises(CheckpointError, match="no classify_head"):
        official_head_state(official.inference_state_dict())
    with pytest.raises(CheckpointError, match="classify_head"):
        official_pretrain_state(sd)  # a fine-tuned head is not part of pretraining


def test_per_layer_table_copies_give_the_shared_table_outputs() -> None:
    sd = official.inference_state_dict()
    ours = {to_ours(k): v for k, v in sd.items() if to_ours(k) is not None}
    cfg = get_variant("onepeace-tiny")
    shared = build_model(cfg, ours, "fixture")
    per_layer_cfg = cfg.replace(per_layer_rel_pos=True)
    expanded = per_layer_tables(ours, per_layer_cfg.layers)
    assert sum(k.endswith(".rel_pos.tables.1.weight") for k in expanded) == 3  # one copy per modality
    per_layer = build_model(per_layer_cfg, expanded, "fixture")
    x = official.inputs()
    with torch.no_grad():
        for m in (shared, per_layer):
            assert len(m.adapters["text"].rel_pos.tables) == (1 if m is shared else cfg.layers)
        outs = [
            (
                m.forward_features(text=x["text.tokens"]).text.hidden,
                m.forward_features(image=x["image.pixels"]).image.hidden,
                m.forward_features(audio=(x["audio.waveform"], x["audio.padding_mask"])).audio.hidden,
            )
            for m in (shared, per_layer)
        ]
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    tables = per_layer.adapters["text"].rel_pos.tables
    with torch.no_grad():  # the copies are independent tensors
        tables[1].weight.add_(1.0)
    assert torch.equal(tables[0].weight, shared.adapters["text"].rel_pos.tables[0].weight)
    assert not torch.equal(tables[1].weight, tables[0].weight)
