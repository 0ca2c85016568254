"""Pretraining recipes: strict YAML loading, overrides, type checks, dumping and the recipe header."""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import pytest

pytest.importorskip("yaml")

from onepeace.modality import Modality  # noqa: E402
from onepeace.train.config import (  # noqa: E402
    LossConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    check_header,
    dump_recipe,
    load_recipe,
    parse_recipe,
    read_header,
)

REPO = Path(__file__).resolve().parents[1]

RECIPE = """\
# command: onepeace train configs/example.yaml
# runtime: about 2 minutes on one CPU
# expected: the loss falls below 5
#   within 100 updates
stage: 2
seed: 1
precision: fp32
max_updates: 100
model:
  variant: onepeace-tiny
  drop_path_rate: 0.1
  decoder:
    embed_dim: 32
    heads: 4
optim:
  lr: 2e-4
  min_lr: 1e-6
  betas: [0.9, 0.95]
  epochs: 10
  warmup_ratio: 0.1
loss:
  contrastive_gather: with_grad
data:
  batch_size: 4
"""


@dataclasses.dataclass(frozen=True)
class _Data:
    batch_size: int = 8
    paths: tuple[str, ...] = ()


def _error(text: str, overrides: tuple[str, ...] = (), **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        parse_recipe(text, overrides, **kwargs)
    return str(info.value)


def test_defaults_follow_the_spec() -> None:
    cfg = TrainConfig()
    assert (cfg.seed, cfg.stage, cfg.precision, cfg.strategy) == (3407, 1, "bf16", "none")
    o = cfg.optim
    assert (o.betas, o.eps, o.weight_decay, o.clip_grad_norm, o.layer_decay) == ((0.9, 0.98), 1e-8, 0.05, 3.0, 1.0)
    loss = LossConfig()
    assert (loss.dcl_text, loss.dcl_image, loss.dcl_vl_text, loss.dcl_vl_image) == (0.5, 1.0, 0.5, 0.5)
    assert (loss.dcl_audio, loss.dcl_al_text, loss.dcl_al_audio) == (1.0, 0.5, 0.5)
    assert (loss.dcl_logit_scale, loss.label_smoothing, loss.contrastive_gather) == (2.5, 0.1, "no_grad")
    d = ModelConfig().decoder
    assert (d.embed_dim, d.layers, d.heads, d.ffn_dim, ModelConfig().drop_path_rate) == (768, 2, 12, 2048, 0.4)


def test_recipe_is_parsed_with_types() -> None:
    cfg = parse_recipe(RECIPE)
    assert cfg.stage == 2 and cfg.precision == "fp32" and cfg.max_updates == 100
    assert cfg.optim.lr == 2e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.epochs == 10 and cfg.optim.warmup_ratio == 0.1
    assert cfg.model.decoder.embed_dim == 32 and cfg.model.decoder.layers == 2
    assert cfg.loss.contrastive_gather == "with_grad"
    assert cfg.data == {"batch_size": 4}
    backbone = cfg.model.backbone_config(cfg.stage)
    assert backbone.modalities == (Modality.TEXT, Modality.AUDIO) and backbone.drop_path_rate == 0.1


def test_load_recipe_from_file_and_dump_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    cfg = load_recipe(path, ["optim.weight_decay=0"])
    assert cfg.optim.weight_decay == 0.0
    assert parse_recipe(dump_recipe(cfg)) == cfg
    typed = parse_recipe(RECIPE, data_config_type=_Data)
    assert parse_recipe(dump_recipe(typed), data_config_type=_Data) == typed


@pytest.mark.parametrize(
    "text, key",
    [
        ("foo: 1\noptim: {total_updates: 5}", "'foo'"),
        ("optim: {total_updates: 5, lr_max: 1}", "'optim.lr_max'"),
        ("optim: {total_updates: 5}\nmodel: {decoder: {width: 3}}", "'model.decoder.width'"),
    ],
)
def test_unknown_keys_name_the_dotted_key_and_the_allowed_ones(text: str, key: str) -> None:
    message = _error(text)
    assert f"unknown key {key}" in message and "allowed keys:" in message


def test_unknown_key_in_the_data_section_with_a_data_type() -> None:
    message = _error("optim: {total_updates: 5}\ndata: {batch: 3}", data_config_type=_Data)
    assert "'data.batch'" in message and "batch_size" in message
    cfg = parse_recipe("optim: {total_updates: 5}\ndata: {paths: [a, b]}", data_config_type=_Data)
    assert cfg.data == _Data(paths=("a", "b"))


OK = "optim: {total_updates: 5}\n"


@pytest.mark.parametrize(
    "text, fragment",
    [
        (OK + "seed: 1.5", "seed must be an integer"),
        (OK + "seed: true", "seed must be an integer"),
        (OK + "tensorboard: 1", "tensorboard must be a boolean"),
        ("optim: {lr: fast, total_updates: 5}", "optim.lr must be a number"),
        (OK + "stage: 3", "stage must be one of 1, 2"),
        (OK + "stage: '1'", "stage must be one of 1, 2"),
        (OK + "precision: fp16", "precision must be one of 'fp32', 'bf16'"),
        ("optim: {betas: [0.9], total_updates: 5}", "optim.betas must have 2 items"),
        ("optim: {betas: 0.9, total_updates: 5}", "optim.betas must be a list"),
        ("optim: 3", "optim must be a mapping"),
        (OK + "model: {variant: nope}", "unknown variant"),
        ("optim: {total_updates: 5, epochs: 2}", "not both"),
        ("optim: {total_updates: 5, warmup_updates: 1, warmup_ratio: 0.1}", "not both"),
        ("optim: {warmup_updates: 3}", "give total_updates or epochs"),
        (OK + "grad_accum: 0", "grad_accum must be >= 1"),
        ("- 1\n- 2", "top level must be a mapping"),
        ("a: [1", "not valid YAML"),
    ],
)
def test_bad_values_are_reported(text: str, fragment: str) -> None:
    assert fragment in _error(text)


def test_overrides() -> None:
    base = "optim: {total_updates: 5}\n"
    cfg = parse_recipe(base, ["optim.lr=1e-3", "model.decoder.layers=4", "out_dir=/x/y", "optim.betas=[0.8, 0.9]"])
    assert cfg.optim.lr == 1e-3 and cfg.model.decoder.layers == 4 and cfg.out_dir == "/x/y"
    assert cfg.optim.betas == (0.8, 0.9)
    assert parse_recipe(base, ["max_updates=null"]).max_updates is None
    assert "'optim.nope'" in _error(base, ("optim.nope=1",))
    assert "key.sub=value" in _error(base, ("optim.lr",))
    assert "key.sub=value" in _error(base, ("optim..lr=1",))
    assert "seed is not a section" in _error(base + "seed: 1\n", ("seed.x=1",))
    assert "optim.lr must be a number" in _error(base, ("optim.lr=abc",))


def test_optim_config_checks_values() -> None:
    with pytest.raises(ValueError, match="layer_decay"):
        OptimConfig(layer_decay=0.0)
    with pytest.raises(ValueError, match="warmup_ratio"):
        OptimConfig(warmup_ratio=1.0)


def test_header_helper() -> None:
    header = check_header(RECIPE)
    assert header["command"] == "onepeace train configs/example.yaml"
    assert header["expected"] == "the loss falls below 5 within 100 updates"
    with pytest.raises(ValueError, match="lacks runtime"):
        check_header("# command: x\n# expected: y\nstage: 1\n# runtime: too late\n")
    assert read_header("stage: 1\n# command: x\n") == {}


def _recipes(pattern: str) -> list[Path]:
    return sorted((REPO / "configs").glob(pattern)) if (REPO / "configs").is_dir() else []


def _data_type() -> type | None:
    try:
        return getattr(importlib.import_module("onepeace.data.pretrain"), "PretrainDataConfig", None)
    except ImportError:
        return None


@pytest.mark.parametrize("path", _recipes("*.yaml"), ids=lambda p: p.name)
def test_every_recipe_has_a_header(path: Path) -> None:
    check_header(path.read_text(), str(path))


@pytest.mark.parametrize("path", _recipes("pretrain*.yaml"), ids=lambda p: p.name)
def test_every_pretraining_recipe_validates(path: Path) -> None:
    load_recipe(path, data_config_type=_data_type())
