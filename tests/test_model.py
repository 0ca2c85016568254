"""Unit tests of the network on onepeace-tiny: sizes, routing, masks, bad tensors, training-time switches."""

from __future__ import annotations

import pytest
import torch

from onepeace.model import OnePeaceModel
from onepeace.variants import get_variant, list_variants


def tiny(**changes) -> OnePeaceModel:
    torch.manual_seed(0)
    return OnePeaceModel(get_variant("onepeace-tiny").replace(**changes)).eval()


@pytest.mark.parametrize(
    ("variant", "count"),
    [("onepeace-4b", 3_884_740_545), ("onepeace-base", 333_326_817), ("onepeace-tiny", 3_652_993)],
)
def test_parameter_counts_on_meta(variant: str, count: int) -> None:
    with torch.device("meta"):
        model = OnePeaceModel(get_variant(variant))
    assert sum(p.numel() for p in model.parameters()) == count


def test_4b_parts_match_the_spec() -> None:
    """Spec §1.2: per-layer attention 9,444,864; each modality FFN 28,325,376; adapters 3.39M / 19.04M / 78.0M."""
    with torch.device("meta"):
        model = OnePeaceModel(get_variant("onepeace-4b"))

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    layer = model.encoder.layers[0]
    assert count(layer.attn) == 9_444_864
    assert all(count(layer.ffn[m]) == 28_325_376 for m in ("text", "image", "audio"))
    assert count(model.adapters["image"]) == 3_390_816
    assert count(model.adapters["audio"]) == 19_040_816
    assert count(model.adapters["text"]) == 78_008_880
    assert list_variants() == ["onepeace-4b", "onepeace-base", "onepeace-small", "onepeace-tiny"]


def test_initialisation() -> None:
    model = tiny()
    text = model.adapters["text"]
    assert torch.count_nonzero(text.token_embed.weight[1]) == 0
    assert float(text.token_embed.weight.detach().abs().max()) <= 0.02
    assert float(model.encoder.layers[0].attn.q_proj.weight.detach().abs().max()) <= 0.02
    assert torch.all(model.encoder.layers[0].gamma_attn == 1e-6)
    assert torch.count_nonzero(text.rel_pos.tables[0].weight) == 0
    assert float(model.logit_scale.detach()) == pytest.approx(2.6592600, abs=1e-6)


def test_shapes_and_padding() -> None:
    model = tiny()
    tokens = torch.tensor([[10, 20, 2, 1], [10, 20, 30, 2]])
    feats = model.forward_features(text=tokens)
    assert feats.text.hidden.shape == (2, 5, 64)
    assert feats.text.padding_mask.tolist() == [[False, False, False, False, True], [False] * 5]
    assert feats.image is None and feats.audio is None
    with pytest.raises(KeyError, match="did not include image"):
        feats["image"]
    # padding does not change the real tokens' outputs
    alone = model.forward_features(text=tokens[:1, :3]).text.hidden
    torch.testing.assert_close(feats.text.hidden[:1, :4], alone, atol=1e-5, rtol=1e-5)


def test_joint_pass_orders_text_first() -> None:
    model = tiny()
    tokens = torch.tensor([[10, 20, 2]])
    pixels = torch.randn(1, 3, 64, 64)
    layers = model.forward_intermediates(image=pixels, text=tokens)
    assert len(layers) == 2 and layers[0].shape == (1, 4 + 17, 64)


def test_per_layer_tables_copied_from_shared_give_same_outputs() -> None:
    shared = tiny()
    with torch.no_grad():
        for adapter in shared.adapters.values():
            adapter.rel_pos.tables[0].weight.normal_()
    state = shared.state_dict()
    for key in [k for k in state if ".rel_pos.tables.0." in k]:
        state[key.replace(".tables.0.", ".tables.1.")] = state[key]
    per_layer = tiny(per_layer_rel_pos=True)
    per_layer.load_state_dict(state)
    pixels, tokens = torch.randn(2, 3, 64, 64), torch.tensor([[10, 20, 30, 2]])
    assert torch.equal(per_layer.encode_image(pixels), shared.encode_image(pixels))
    assert torch.equal(per_layer.encode_text(tokens), shared.encode_text(tokens))


def test_bad_tensors() -> None:
    model = tiny()
    with pytest.raises(ValueError, match=r"\[B, 3, S, S\]"):
        model.encode_image(torch.zeros(1, 3, 64, 32))
    with pytest.raises(ValueError, match="image_size=96"):
        model.encode_image(torch.zeros(1, 3, 96, 96))
    with pytest.raises(ValueError, match="token id 50264 is outside the vocabulary"):
        model.encode_text(torch.tensor([[5, 50264, 2]]))
    with pytest.raises(ValueError, match="integer"):
        model.encode_text(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="padding mask has shape"):
        model.encode_audio(torch.zeros(1, 16000), torch.zeros(1, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="no audio branch"):
        OnePeaceModel(get_variant("onepeace-tiny").replace(modalities=("text",))).encode_audio(
            torch.zeros(1, 16000), torch.zeros(1, 50, dtype=torch.bool)
        )
    with pytest.raises(ValueError, match="at least one"):
        model.forward_features()


def test_drop_path_and_checkpointing_in_training() -> None:
    model = tiny(drop_path_rate=0.5)
    assert [layer.drop_path.rate for layer in model.encoder.layers] == [0.0, 0.5]
    tokens = torch.tensor([[10, 20, 30, 2]] * 4)
    model.train()
    torch.manual_seed(1)
    plain = model.encode_text(tokens)
    plain.sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    torch.manual_seed(1)
    checked = model.encode_text(tokens)
    checked.sum().backward()
    torch.testing.assert_close(checked, plain)
    for a, b in zip(grads, [p.grad for p in model.parameters() if p.grad is not None]):
        torch.testing.assert_close(a, b)
    model.eval()
    torch.testing.assert_close(model.encode_text(tokens), model.encode_text(tokens))


def test_bf16_forward() -> None:
    model = tiny().to(torch.bfloat16)
    out = model.encode_audio(torch.randn(2, 16000), torch.zeros(2, 50, dtype=torch.bool))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_zero_padding_does_not_blow_up_audio_extractor_gradients() -> None:
    """Zero-padded samples give all-zero conv outputs; the norm there must not amplify gradients by 1/sqrt(eps)
    per layer (~1e14 through the small variant's stack), and the forward values stay those of a plain pass."""
    from onepeace.modality import Modality

    torch.manual_seed(0)
    model = OnePeaceModel(get_variant("onepeace-small")).train()
    adapter = model.adapter(Modality.AUDIO)
    waveform = torch.zeros(2, 16000)
    waveform[0, :6000] = torch.randn(6000)  # 0.375 s of sound, then padding
    waveform[1] = torch.randn(16000)
    feats = adapter.frame_features(waveform)
    with torch.no_grad():
        plain = adapter.frame_features(waveform)
    assert torch.equal(feats, plain)
    feats.pow(2).mean().backward()  # the frames at the edge of the sound see padding too
    norms = {n: p.grad.norm().item() for n, p in adapter.named_parameters() if p.grad is not None}
    assert all(torch.isfinite(torch.tensor(v)) for v in norms.values())
    assert max(norms.values()) < 1e3, max(norms.items(), key=lambda kv: kv[1])
