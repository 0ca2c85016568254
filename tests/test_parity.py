"""Every inference tensor of the official fixture, reproduced through the public API (spec §2-4, §7)."""

from __future__ import annotations

import official
import pytest
import torch

import onepeace
from onepeace.modality import Modality

HIDDEN = dict(atol=1e-4, rtol=1e-4)
EMBED = dict(atol=1e-5, rtol=1e-5)
IN, OUT = official.inputs(), official.outputs()
TEXTS = ["A dog is running on the grass.", "Two cats sleeping on a red sofa, next to a small lamp!", "Hello"]


def close(actual: torch.Tensor, name: str, tol: dict) -> None:
    expected = OUT[name]
    assert actual.shape == expected.shape, name
    torch.testing.assert_close(actual.float(), expected.float(), **tol, msg=lambda m: f"{name}: {m}")


def audio_input() -> tuple[torch.Tensor, torch.Tensor]:
    return IN["audio.waveform"], IN["audio.padding_mask"]


@torch.no_grad()
def test_embeddings(tiny_model) -> None:
    close(tiny_model.encode_text(IN["text.tokens"]), "text.embedding", EMBED)
    close(tiny_model.encode_image(IN["image.pixels"]), "image.embedding", EMBED)
    close(tiny_model.encode_audio(*audio_input()), "audio.embedding", EMBED)


@pytest.mark.parametrize("modality", ["text", "image", "audio"])
@torch.no_grad()
def test_unimodal_hidden_and_layers(tiny_model, modality: str) -> None:
    inputs = {"text": IN["text.tokens"], "image": IN["image.pixels"], "audio": audio_input()}
    feats = tiny_model.forward_features(**{modality: inputs[modality]})
    close(feats[modality].hidden, f"{modality}.hidden", HIDDEN)
    assert torch.equal(feats[modality].padding_mask, OUT[f"{modality}.padding_mask"])
    assert feats.modalities == [Modality(modality)]
    layers = tiny_model.forward_intermediates(**{modality: inputs[modality]})
    assert len(layers) == 2
    close(torch.stack(layers), f"layers.{modality}", HIDDEN)


@pytest.mark.parametrize("pair", ["vl", "al"])
@torch.no_grad()
def test_joint_passes(tiny_model, pair: str) -> None:
    other = "image" if pair == "vl" else "audio"
    second = IN["image.pixels"] if pair == "vl" else audio_input()
    feats = tiny_model.forward_features(text=IN["text.tokens"], **{other: second})
    close(feats.text.hidden, f"{pair}.text_hidden", HIDDEN)
    close(feats[other].hidden, f"{pair}.{other}_hidden", HIDDEN)
    assert torch.equal(feats.text.padding_mask, OUT[f"{pair}.text_padding_mask"])
    assert torch.equal(feats[other].padding_mask, OUT[f"{pair}.{other}_padding_mask"])
    layers = tiny_model.forward_intermediates(text=IN["text.tokens"], **{other: second})
    close(torch.stack(layers), f"layers.{pair}", HIDDEN)


@torch.no_grad()
def test_adapters(tiny_model) -> None:
    adapters = tiny_model.model.adapters
    text = adapters["text"](IN["text.tokens"])
    close(text.embedding, "adapter.text.embedding", HIDDEN)
    close(text.rel_pos_bias[0][0], "adapter.text.rel_pos_bias", HIDDEN)
    assert torch.equal(text.padding_mask, OUT["adapter.text.padding_mask"])
    image = adapters["image"](IN["image.pixels"])
    close(image.embedding, "adapter.image.embedding", HIDDEN)
    close(image.rel_pos_bias[0][0], "adapter.image.rel_pos_bias", HIDDEN)
    close(adapters["image"].patch_embed(IN["image.pixels"]), "adapter.image.patch_embed", HIDDEN)
    assert torch.equal(image.padding_mask, OUT["adapter.image.padding_mask"])
    audio = adapters["audio"](*audio_input())
    close(audio.embedding, "adapter.audio.embedding", HIDDEN)
    close(audio.rel_pos_bias[0][0], "adapter.audio.rel_pos_bias", HIDDEN)
    assert torch.equal(audio.padding_mask, OUT["adapter.audio.padding_mask"])
    frames = adapters["audio"].frame_features(IN["audio.waveform"])
    close(frames, "adapter.audio.frame_features", HIDDEN)
    close(adapters["audio"].positions(frames), "adapter.audio.conv_pos_embed", HIDDEN)


@pytest.mark.parametrize("source", ["official", "converted"])
@torch.no_grad()
def test_resolution_change_96(source: str, official_checkpoint, converted_dir) -> None:
    model = onepeace.load(official_checkpoint if source == "official" else converted_dir, image_size=96)
    assert model.image_size == 96
    adapter = model.model.adapters["image"]
    close(adapter.rel_pos.tables[0].weight, "res96.image_adapter.rel_pos_table", EMBED)
    assert torch.equal(adapter.rel_pos.index, OUT["res96.image_adapter.rp_bucket"])
    close(adapter.positions(), "res96.image_adapter.abs_pos_embed", EMBED)
    close(adapter(IN["image96.pixels"]).rel_pos_bias[0][0], "res96.image_adapter.rel_pos_bias", HIDDEN)
    close(model.forward_features(image=IN["image96.pixels"]).image.hidden, "res96.image.hidden", HIDDEN)
    close(model.encode_image(IN["image96.pixels"]), "res96.image.embedding", EMBED)


@pytest.mark.parametrize(
    ("name", "keep"),
    [
        ("loss_vl.masked_encoder_text", {"text": "mask_vl.text_preserve_ids"}),
        ("loss_vl.masked_encoder_image", {"image": "mask_vl.image_preserve_ids"}),
        (
            "loss_vl.masked_encoder_vl",
            {"text": "mask_vl.vl_text_preserve_ids", "image": "mask_vl.vl_image_preserve_ids"},
        ),
        ("loss_al.masked_encoder_audio", {"audio": "mask_al.audio_preserve_ids"}),
        (
            "loss_al.masked_encoder_al",
            {"text": "mask_al.al_text_preserve_ids", "audio": "mask_al.al_audio_preserve_ids"},
        ),
    ],
)
@torch.no_grad()
def test_kept_position_passes(tiny_model, name: str, keep: dict[str, str]) -> None:
    """Encoder passes over visible units only (spec §2.5), including the padding rows."""
    inputs = {"text": IN["text.tokens"], "image": IN["image.pixels"], "audio": audio_input()}
    feats = tiny_model.model.forward_features(
        **{m: inputs[m] for m in keep}, keep={Modality(m): IN[k] for m, k in keep.items()}
    )
    for m in keep:
        ref = name if len(keep) == 1 else f"{name}_{m}"
        close(feats[m].hidden, ref, HIDDEN)
        assert torch.equal(feats[m].padding_mask, IN[keep[m]] < 0)


@torch.no_grad()
def test_raw_inputs_through_public_api(tiny_model) -> None:
    """Strings and raw waveforms go through the official preprocessing to the fixture embeddings."""
    tokens = tiny_model.tokenize(TEXTS)
    assert torch.equal(tokens, IN["text.tokens"])
    close(tiny_model.embed(text=TEXTS).text, "text.embedding", EMBED)
    close(tiny_model.embed(text=TEXTS, batch_size=1).text, "text.embedding", EMBED)  # text ignores padding
    clips = [IN[f"audio.raw_waveform_{i}"].numpy() for i in range(3)]
    waveform, padding_mask = tiny_model.preprocess_audio(clips, sample_rate=16000)
    assert torch.equal(waveform, IN["audio.waveform"])
    assert torch.equal(padding_mask, IN["audio.padding_mask"])
    close(tiny_model.embed(audio=clips, sample_rate=16000).audio, "audio.embedding", EMBED)


@torch.no_grad()
def test_composed_query_is_normalised_mean(tiny_model) -> None:
    clips = [IN[f"audio.raw_waveform_{i}"].numpy() for i in range(3)]
    query = tiny_model.compose(text=TEXTS[0], audio=[clips[0]], sample_rate=16000)
    expected = OUT["text.embedding"][0] + tiny_model.embed(audio=[clips[0]], sample_rate=16000).audio[0]
    torch.testing.assert_close(query, expected / expected.norm(), **EMBED)
    assert abs(float(query.norm()) - 1.0) < 1e-6
