"""The pretrained ``onepeace-small`` shipped in the package: size and storage, loading, and its held-out metrics on
the sources every machine can install (docs/model_card_small.md), recomputed through ``onepeace evaluate``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import onepeace
from onepeace.cli import main
from onepeace.pretrained import shipped_weights

EXPECTED = Path(__file__).parent / "fixtures" / "onepeace_small_heldout.json"
MIB = 1024 * 1024


def test_weights_ship_in_the_package_as_bf16_within_60_mib() -> None:
    folder = shipped_weights("onepeace-small")
    assert folder is not None, "the package lacks assets/models/onepeace-small"
    weights = folder / "model.safetensors"
    assert weights.stat().st_size <= 60 * MIB
    with safe_open(str(weights), "pt") as fh:
        dtypes = {fh.get_slice(k).get_dtype() for k in fh.keys()}
    assert dtypes == {"BF16"}


def test_load_gives_float32_three_modality_model_and_fresh_one_on_request() -> None:
    model = onepeace.load("onepeace-small")
    assert {m.value for m in model.modalities} == {"text", "image", "audio"}
    assert {p.dtype for p in model.model.parameters()} == {torch.float32}
    stored = onepeace.load(str(shipped_weights("onepeace-small")), dtype="bf16")
    for (name, a), (_, b) in zip(model.model.state_dict().items(), stored.model.state_dict().items()):
        assert torch.equal(a.to(torch.bfloat16), b), name  # bf16 -> fp32 is exact
    fresh = onepeace.load("onepeace-small", pretrained=False)
    assert not torch.equal(fresh.model.logit_scale, model.model.logit_scale) or not torch.equal(
        next(fresh.model.encoder.parameters()), next(model.model.encoder.parameters())
    )


@pytest.mark.slow
def test_heldout_metrics_match_the_model_card(tmp_path: Path) -> None:
    """Build the held-out split of the apt-installable sources, evaluate, compare with the recorded figures."""
    expected = json.loads(EXPECTED.read_text())
    corpus, out = tmp_path / "corpus", tmp_path / "eval"
    build = ["data", "build-demo", str(corpus), "--heldout-only", "--sources", expected["sources"]]
    assert main(build) == 0
    assert main(["evaluate", "retrieval", "--model", "onepeace-small", "--data", str(corpus), "--out", str(out)]) == 0
    got = json.loads((out / "metrics.json").read_text())
    for name, want in expected["retrieval"].items():
        have = got["retrieval"][name]
        assert (have["queries"], have["gallery"]) == (want["queries"], want["gallery"]), name
        for k, value in want["recall"].items():
            # the same weights and inputs; a different CPU may round a near-tie the other way
            assert have["recall"][k] == pytest.approx(value, abs=0.02), (name, k)
    for task, want in expected["zero_shot"].items():
        assert got["zero_shot"][task]["accuracy"] == pytest.approx(want["accuracy"], abs=0.02), task
    for name in ("image->text", "audio->text"):
        have = got["retrieval"][name]
        assert have["recall"]["R@1"] >= 5 * have["chance"]["R@1"], name
