"""Loading official and native checkpoints, and every way a checkpoint can be wrong (spec §9)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import official
import pytest
import torch
from safetensors.torch import load_file, save_file

import onepeace
from onepeace.checkpoints.official_keys import sort_keys, to_official, to_ours
from onepeace.errors import CheckpointError


def test_every_official_key_is_sorted() -> None:
    report = sort_keys(list(official.full_state_dict()))
    assert report.unknown == []
    assert len(report.mapped) == 135 and len(report.buffers) == 7 and len(report.pretrain_only) == 90
    model = onepeace.load("onepeace-tiny").model
    assert set(report.mapped.values()) == set(model.state_dict())
    assert all(to_official(ours) == key for key, ours in report.mapped.items())


def test_legacy_and_per_layer_table_names() -> None:
    assert to_ours("encoder_wrapper.image_adapter.rel_pos_table.weight") == "adapters.image.rel_pos.tables.0.weight"
    assert (
        to_ours("encoder_wrapper.audio_adapter.rel_pos_table_list.39.weight")
        == "adapters.audio.rel_pos.tables.39.weight"
    )
    assert (
        to_ours("encoder_wrapper.audio_adapter.embed_positions.5.0.weight") == "adapters.audio.conv_pos.4.conv.weight"
    )


def test_pretraining_state_dict_loads(tmp_path: Path) -> None:
    """The full 232-entry pretraining state dict (decoder included) loads; pretraining-only keys are set aside."""
    path = official.write_official_checkpoint(tmp_path / "pretrain.pt", official.full_state_dict())
    model = onepeace.load(path)
    ref = onepeace.load(official.write_official_checkpoint(tmp_path / "infer.pt"))
    for (k, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), k


def test_missing_logit_scale_and_legacy_table_name(tmp_path: Path) -> None:
    sd = official.inference_state_dict()
    del sd["logit_scale"]
    sd["encoder_wrapper.text_adapter.rel_pos_table.weight"] = sd.pop(
        "encoder_wrapper.text_adapter.rel_pos_table_list.0.weight"
    )
    model = onepeace.load(official.write_official_checkpoint(tmp_path / "ck.pt", sd))
    assert float(model.model.logit_scale.detach()) == pytest.approx(2.659260, abs=1e-6)
    tokens = official.inputs()["text.tokens"]
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_text(tokens), official.outputs()["text.embedding"], atol=1e-5, rtol=1e-5
        )


def test_converted_outputs_identical(official_checkpoint: Path, converted_dir: Path) -> None:
    a, b = onepeace.load(official_checkpoint), onepeace.load(converted_dir)
    inputs = official.inputs()
    with torch.no_grad():
        assert torch.equal(a.encode_image(inputs["image.pixels"]), b.encode_image(inputs["image.pixels"]))
        assert torch.equal(
            a.encode_audio(inputs["audio.waveform"], inputs["audio.padding_mask"]),
            b.encode_audio(inputs["audio.waveform"], inputs["audio.padding_mask"]),
        )
    assert sorted(p.name for p in converted_dir.iterdir()) == ["config.json", "model.safetensors"]


def test_dtype_and_device(converted_dir: Path) -> None:
    model = onepeace.load(converted_dir, dtype="bf16", device="cpu")
    assert model.dtype == torch.bfloat16
    emb = model.encode_text(official.inputs()["text.tokens"])
    ref = official.outputs()["text.embedding"]
    assert emb.dtype == torch.bfloat16 and float((emb.detach().float() - ref).abs().max()) < 0.05
    with pytest.raises(ValueError, match="unknown dtype"):
        onepeace.load(converted_dir, dtype="int3")


def test_variants_random_init() -> None:
    model = onepeace.load("onepeace-tiny", image_size=96)
    assert not model.training and model.image_size == 96
    assert model.encode_image(torch.zeros(1, 3, 96, 96)).shape == (1, 64)
    with pytest.raises(FileNotFoundError, match="known variants"):
        onepeace.load("onepeace-huge")


class _RunsCode:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_malicious_checkpoint_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    payload = official.checkpoint_meta()
    payload["model"] = {"x": torch.zeros(1)}
    payload["extra_state"] = _RunsCode()
    torch.save(payload, tmp_path / "evil.pt", pickle_module=pickle)
    with pytest.raises(CheckpointError, match="exec"):
        onepeace.load(tmp_path / "evil.pt")
    assert not (tmp_path / "PWNED").exists()


def test_truncated_checkpoint(tmp_path: Path, official_checkpoint: Path) -> None:
    data = official_checkpoint.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt"):
        onepeace.load(tmp_path / "cut.pt")


def test_checkpoint_of_another_architecture(tmp_path: Path) -> None:
    payload = {"model": {"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(10, 8)}, "cfg": {}}
    torch.save(payload, tmp_path / "resnet.pt")
    with pytest.raises(CheckpointError, match=r"not part of ONE-PEACE: conv1.weight, fc.weight"):
        onepeace.load(tmp_path / "resnet.pt")


def test_official_checkpoint_with_wrong_shapes(tmp_path: Path) -> None:
    sd = official.inference_state_dict()
    sd["encoder_wrapper.fusion_model.layers.1.image_ffn.3.weight"] = torch.zeros(64, 128)
    with pytest.raises(CheckpointError, match=r"encoder.layers.1.ffn.image.out.weight: checkpoint \(64, 128\)"):
        onepeace.load(official.write_official_checkpoint(tmp_path / "bad.pt", sd))


def test_official_checkpoint_missing_a_key(tmp_path: Path) -> None:
    sd = official.inference_state_dict()
    del sd["encoder_wrapper.fusion_model.layers.0.gamma_1"]
    with pytest.raises(CheckpointError, match=r"missing key\(s\): encoder.layers.0.gamma_attn"):
        onepeace.load(official.write_official_checkpoint(tmp_path / "bad.pt", sd))


def test_converted_dir_with_wrong_shape(tmp_path: Path, converted_dir: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((converted_dir / "config.json").read_text())
    tensors = load_file(converted_dir / "model.safetensors")
    tensors["projections.text.weight"] = torch.zeros(64, 32)
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"projections.text.weight: checkpoint \(64, 32\) vs model \(64, 64\)"):
        onepeace.load(bad)


def test_converted_dir_with_unknown_config_key(tmp_path: Path, converted_dir: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    info = json.loads((converted_dir / "config.json").read_text())
    info["config"]["wings"] = 2
    (bad / "config.json").write_text(json.dumps(info))
    (bad / "model.safetensors").write_bytes((converted_dir / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="unknown key.*wings"):
        onepeace.load(bad)


def test_converted_dir_with_corrupt_weights(tmp_path: Path, converted_dir: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((converted_dir / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        onepeace.load(bad)


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="without config.json"):
        onepeace.load(tmp_path)


def test_per_layer_tables_load(tmp_path: Path) -> None:
    """Fine-tuned files hold one table per layer (``rel_pos_table_list.{0..L-1}``): the model follows the file."""
    sd = official.inference_state_dict()
    for m in ("text", "image", "audio"):
        sd[f"encoder_wrapper.{m}_adapter.rel_pos_table_list.1.weight"] = sd[
            f"encoder_wrapper.{m}_adapter.rel_pos_table_list.0.weight"
        ].clone()
    model = onepeace.load(official.write_official_checkpoint(tmp_path / "per_layer.pt", sd), image_size=96)
    assert model.cfg.per_layer_rel_pos and len(model.model.adapters["image"].rel_pos.tables) == 2
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_image(official.inputs()["image96.pixels"]),
            official.outputs()["res96.image.embedding"],
            atol=1e-5,
            rtol=1e-5,
        )


def test_variant_with_weights_missing_from_the_install_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    import onepeace
    from onepeace import pretrained

    monkeypatch.setattr(pretrained, "shipped_weights", lambda name: None)
    with pytest.warns(UserWarning, match="no pretrained weights for onepeace-small; it is randomly initialised"):
        model = onepeace.load("onepeace-small")
    assert model.cfg.embed_dim == 256
