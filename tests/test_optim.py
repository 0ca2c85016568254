"""Parameter groups (weight-decay exemptions, layer-wise LR decay), stage-2 freezing, image-branch removal, clamp."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from onepeace.config import OnePeaceConfig
from onepeace.modality import Modality
from onepeace.model.onepeace import OnePeaceModel
from onepeace.train.build import copy_text_ffns_to_audio
from onepeace.train.config import ModelConfig, OptimConfig
from onepeace.train.optim import (
    build_optimizer,
    clamp_logit_scale_,
    drop_image_branch,
    layer_id,
    param_groups,
    stage2_freeze,
)
from onepeace.variants import get_variant

MODS = ("text", "image", "audio")


class _DummyDecoder(nn.Module):
    """Same name layout as the pretraining decoder, tiny sizes."""

    def __init__(self, modalities: tuple[str, ...], dim: int = 8, width: int = 64) -> None:
        super().__init__()
        self.embed_in = nn.ModuleDict({m: nn.Linear(width, dim) for m in modalities})
        self.mask_tokens = nn.ParameterDict({m: nn.Parameter(torch.zeros(1, dim)) for m in modalities})
        self.positions = nn.ParameterDict({m: nn.Parameter(torch.zeros(5, dim)) for m in modalities})
        layer = nn.ModuleDict(
            {"attn": nn.Linear(dim, dim), "ffn": nn.ModuleDict({m: nn.Linear(dim, dim) for m in modalities})}
        )
        self.encoder = nn.ModuleDict(
            {"layers": nn.ModuleList([layer]), "final_norms": nn.ModuleDict({m: nn.LayerNorm(dim) for m in modalities})}
        )
        self.heads = nn.ModuleDict({m: nn.Linear(dim, width) for m in modalities})


class _Wrapper(nn.Module):
    def __init__(self, model: nn.Module, decoder: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.decoder = decoder


def _tiny(modalities: tuple[str, ...] = MODS, **changes) -> OnePeaceConfig:
    mods = tuple(Modality(m) for m in modalities)
    return get_variant("onepeace-tiny").replace(modalities=mods, **changes)


def _wrapper(modalities: tuple[str, ...] = MODS, **changes) -> _Wrapper:
    return _Wrapper(OnePeaceModel(_tiny(modalities, **changes), init=False), _DummyDecoder(modalities))


@pytest.fixture(scope="module")
def wrapper() -> _Wrapper:
    return _wrapper()


def _by_name(groups: list[dict]) -> dict[str, dict]:
    return {name: g for g in groups for name in g["param_names"]}


def test_no_decay_membership(wrapper: _Wrapper) -> None:
    groups = _by_name(param_groups(wrapper, OptimConfig(total_updates=10)))
    named = dict(wrapper.named_parameters())
    assert set(groups) == set(named)
    exempt = {n for n, g in groups.items() if g["weight_decay"] == 0.0}
    named_set = {f"model.adapters.{m}.cls_token" for m in MODS} | {
        "model.adapters.text.pos_embed.weight",
        "model.adapters.image.pos_embed",
    }
    named_set |= {f"decoder.{kind}.{m}" for kind in ("positions", "mask_tokens") for m in MODS}
    expected = {n for n, p in named.items() if p.ndim <= 1 or n.endswith(".bias")} | named_set
    assert exempt == expected
    decayed = (
        "model.adapters.audio.cls_pos",
        "model.adapters.text.token_embed.weight",
        "model.adapters.text.rel_pos.tables.0.weight",
        "decoder.embed_in.text.weight",
        "model.encoder.layers.0.attn.q_proj.weight",
    )
    for name in decayed:
        assert groups[name]["weight_decay"] == 0.05, name
    assert all(g["lr_scale"] == 1.0 for g in groups.values())


def test_frozen_parameters_are_left_out() -> None:
    w = _wrapper(("text", "image"))
    w.model.adapters.text.requires_grad_(False)
    names = set(_by_name(param_groups(w, OptimConfig(total_updates=10))))
    assert not any(n.startswith("model.adapters.text.") for n in names)
    assert "model.adapters.image.cls_token" in names


def test_layer_ids() -> None:
    assert layer_id("model.adapters.text.token_embed.weight", 40) == 0
    assert layer_id("model.adapters.audio.rel_pos.tables.7.weight", 40) == 8
    assert layer_id("model.encoder.layers.39.attn.q_proj.weight", 40) == 40
    assert layer_id("model.encoder.final_norms.text.weight", 40) == 41
    assert layer_id("model.logit_scale", 40) == 41
    assert layer_id("decoder.encoder.layers.0.attn.weight", 40) == 41
    assert layer_id("adapters.image.cls_token", 40, backbone_prefix="") == 0


def test_layer_decay_multipliers_two_layers() -> None:
    w = _wrapper(("text", "image"), per_layer_rel_pos=True)
    groups = param_groups(w, OptimConfig(lr=1.0, layer_decay=0.5, total_updates=10))
    by_name = _by_name(groups)
    # L = 2, so ids run 0..3 and the multiplier is 0.5 ** (3 - id).
    expected = {
        "model.adapters.text.token_embed.weight": 0.125,
        "model.adapters.image.cls_token": 0.125,
        "model.adapters.image.stem.conv1.weight": 0.125,
        "model.adapters.text.rel_pos.tables.0.weight": 0.25,
        "model.adapters.image.rel_pos.tables.1.weight": 0.5,
        "model.encoder.layers.0.attn.q_proj.weight": 0.25,
        "model.encoder.layers.0.ffn.image.out.bias": 0.25,
        "model.encoder.layers.1.gamma_ffn": 0.5,
        "model.encoder.final_norms.text.weight": 1.0,
        "model.projections.image.weight": 1.0,
        "model.logit_scale": 1.0,
        "decoder.heads.text.weight": 1.0,
        "decoder.positions.image": 1.0,
    }
    for name, scale in expected.items():
        assert by_name[name]["lr_scale"] == scale, name
        assert by_name[name]["lr"] == scale, name
    assert len({(g["lr_scale"], g["weight_decay"]) for g in groups}) == len(groups) == 8


def test_bare_backbone_and_custom_rules() -> None:
    model = OnePeaceModel(_tiny(("text",)), init=False)
    by_name = _by_name(param_groups(model, OptimConfig(layer_decay=0.5, total_updates=10)))
    assert by_name["adapters.text.cls_token"]["weight_decay"] == 0.0
    assert by_name["adapters.text.token_embed.weight"]["lr_scale"] == 0.125
    custom = _by_name(param_groups(model, OptimConfig(total_updates=10), no_decay_names=(), layer_id_fn=lambda n: 3))
    assert custom["adapters.text.cls_token"]["weight_decay"] == 0.05


def test_build_optimizer_steps() -> None:
    w = _wrapper(("text",))
    opt = build_optimizer(w, OptimConfig(total_updates=10))
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["betas"] == (0.9, 0.98) and opt.param_groups[0]["eps"] == 1e-8
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(w.parameters()))
    w.decoder.heads.text.weight.sum().backward()
    before = w.decoder.heads.text.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, w.decoder.heads.text.weight)


def test_stage2_freeze_leaves_the_spec_trainable_set() -> None:
    w = _wrapper()
    frozen, trainable = stage2_freeze(w)
    names = [n for n, _ in w.named_parameters()]
    pattern = re.compile(
        r"^(decoder\..*|model\.adapters\.audio\..*|model\.encoder\.final_norms\.audio\..*"
        r"|model\.encoder\.layers\.\d+\.ffn\.audio\..*|model\.projections\.audio\..*|model\.logit_scale)$"
    )
    assert set(trainable) == {n for n in names if pattern.match(n)}
    assert set(frozen) == set(names) - set(trainable)
    flags = {n: p.requires_grad for n, p in w.named_parameters()}
    assert all(flags[n] for n in trainable) and not any(flags[n] for n in frozen)
    must_freeze = {
        "model.projections.text.weight",
        "model.encoder.layers.0.attn.q_proj.weight",
        "model.encoder.layers.1.gamma_attn",
        "model.encoder.layers.0.attn_norm.weight",
        "model.encoder.layers.0.ffn.text.out.weight",
        "model.adapters.text.token_embed.weight",
        "model.encoder.final_norms.text.weight",
    }
    assert must_freeze <= set(frozen)
    assert "decoder.heads.text.weight" in trainable and "decoder.encoder.layers.0.attn.weight" in trainable
    grouped = set(_by_name(param_groups(w, OptimConfig(total_updates=10))))
    assert grouped == set(trainable)


def _is_image(key: str) -> bool:
    return bool(
        re.match(r"^model\.(adapters\.image\.|encoder\.layers\.\d+\.ffn\.image\.|encoder\.final_norms\.image\.)", key)
        or key.startswith("model.projections.image.")
        or re.match(r"^decoder\.(embed_in|mask_tokens|positions|heads)\.image(\.|$)", key)
        or re.match(r"^decoder\.encoder\.(layers\.\d+\.ffn|final_norms)\.image\.", key)
    )


def test_drop_image_branch_removes_all_and_only_image_keys(wrapper: _Wrapper) -> None:
    state = wrapper.state_dict()
    kept = drop_image_branch(state)
    removed = set(state) - set(kept)
    assert removed == {k for k in state if _is_image(k)} | {"model.logit_scale"}
    assert all(kept[k] is state[k] for k in kept)
    assert "model.logit_scale" in drop_image_branch(state, keep_logit_scale=True)


def test_stage1_state_loads_into_a_stage2_module() -> None:
    stage1, stage2 = _wrapper(("text", "image")), _wrapper(("text", "audio"))
    result = stage2.load_state_dict(drop_image_branch(stage1.state_dict()), strict=False)
    assert result.unexpected_keys == []
    assert all("audio" in k or k == "model.logit_scale" for k in result.missing_keys)


def test_audio_ffns_start_as_copies_of_the_text_ones() -> None:
    model = OnePeaceModel(_tiny(("text", "audio")), init=True)
    with torch.no_grad():  # make the text side differ from any initial value
        for name, p in model.named_parameters():
            if ".text." in name:
                p.add_(torch.randn_like(p))
    adapter_before = {k: v.clone() for k, v in model.adapters["audio"].state_dict().items()}
    copy_text_ffns_to_audio(model)
    pairs = [(layer.ffn["audio"], layer.ffn["text"]) for layer in model.encoder.layers]
    pairs.append((model.encoder.final_norms["audio"], model.encoder.final_norms["text"]))
    for audio, text in pairs:
        for (name, a), (_, t) in zip(audio.named_parameters(), text.named_parameters()):
            assert torch.equal(a, t) and a.data_ptr() != t.data_ptr(), name  # equal values, own storage
    after = model.adapters["audio"].state_dict()
    assert all(torch.equal(after[k], v) for k, v in adapter_before.items())  # only FFNs and the norm change
    with pytest.raises(ValueError, match="audio_ffn_init"):
        ModelConfig(variant="onepeace-tiny", audio_ffn_init="image")


def test_clamp_logit_scale() -> None:
    model = OnePeaceModel(_tiny(("text",)), init=False)
    for value, expected in ((10.0, math.log(100.0)), (-1.0, 0.0), (2.0, 2.0)):
        with torch.no_grad():
            model.logit_scale.fill_(value)
        assert clamp_logit_scale_(_Wrapper(model, nn.Identity())) == 1
        assert model.logit_scale.item() == pytest.approx(expected)
