"""The pretraining objectives against the official criteria on the fixture batch (spec §5.2-5.3)."""

from __future__ import annotations

import official
import pytest
import torch

from onepeace.checkpoints.official import official_pretrain_state
from onepeace.data.batch import MaskedView, PretrainBatch
from onepeace.modality import Modality
from onepeace.model import OnePeaceModel
from onepeace.model.decoder import DecoderConfig, PretrainDecoder
from onepeace.train.objectives import PretrainObjective

IN, OUT = official.inputs(), official.outputs()
TINY_DECODER = DecoderConfig(embed_dim=32, layers=2, heads=2, ffn_dim=96)
LOSS_TOL = dict(atol=1e-5, rtol=1e-5)
FEATURE_TOL = dict(atol=1e-4, rtol=1e-4)


def objective(stage: int) -> PretrainObjective:
    """The fixture's full 232-entry state dict loaded through the official adapter, nothing missing or extra."""
    cfg = official.tiny_config()  # the official batch-dependent audio padding
    obj = PretrainObjective(OnePeaceModel(cfg), PretrainDecoder(cfg, TINY_DECODER, tuple(Modality)), stage)
    result = obj.load_state_dict(official_pretrain_state(official.full_state_dict()), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return obj.eval()


def views(prefix: str, names: list[str]) -> dict[str, MaskedView]:
    return {n: MaskedView(IN[f"{prefix}.{n}_mask_indices"], IN[f"{prefix}.{n}_preserve_ids"]) for n in names}


def batch(stage: int) -> PretrainBatch:
    if stage == 1:
        return PretrainBatch(
            text=IN["text.tokens"],
            image=IN["image.pixels"],
            views=views("mask_vl", ["text", "image", "vl_text", "vl_image"]),
        )
    return PretrainBatch(
        text=IN["text.tokens"],
        audio_waveform=IN["audio.waveform"],
        audio_padding_mask=IN["audio.padding_mask"],
        views=views("mask_al", ["audio", "al_text", "al_audio"]),
    )


@pytest.mark.parametrize(("stage", "prefix"), [(1, "loss_vl"), (2, "loss_al")])
@torch.no_grad()
def test_losses_match_official(stage: int, prefix: str) -> None:
    out = objective(stage)(batch(stage))
    torch.testing.assert_close(out.total, OUT[f"{prefix}.total"], **LOSS_TOL)
    for name, value in out.terms.items():
        torch.testing.assert_close(value, OUT[f"{prefix}.{name}"], **LOSS_TOL, msg=lambda m, n=name: f"{n}: {m}")
    for name, value in out.metrics.items():
        ref = OUT[f"{prefix}.{name}"]
        if name.endswith("ncorrect"):
            assert float(value) == float(ref), name
        else:
            torch.testing.assert_close(value, ref, **LOSS_TOL)
    expected_terms = {k.split(".", 1)[1] for k in OUT if k.startswith(prefix) and k.endswith("_loss")}
    assert set(out.terms) == expected_terms


@pytest.mark.parametrize(
    ("stage", "name", "inputs", "keep"),
    [
        (1, "loss_vl.student_text", ["text"], ["text"]),
        (1, "loss_vl.student_image", ["image"], ["image"]),
        (1, "loss_vl.student_vl", ["text", "image"], ["vl_text", "vl_image"]),
        (2, "loss_al.student_audio", ["audio"], ["audio"]),
        (2, "loss_al.student_al", ["text", "audio"], ["al_text", "al_audio"]),
    ],
)
@torch.no_grad()
def test_student_features(stage: int, name: str, inputs: list[str], keep: list[str]) -> None:
    obj, b = objective(stage), batch(stage)
    data = {"text": b.text, "image": b.image, "audio": b.audio}
    mods = [Modality(m) for m in inputs]
    feats = obj.model.forward_features(**{m: data[m] for m in inputs})
    pads = {m: feats[m].padding_mask for m in mods}
    keeps = {m: b.views[k].keep for m, k in zip(mods, keep)}
    student = obj._student({m: data[m.value] for m in mods}, keeps, pads)
    for m in mods:
        ref = name if len(mods) == 1 else f"{name}_{m.value}"
        torch.testing.assert_close(student[m], OUT[ref], **FEATURE_TOL)
