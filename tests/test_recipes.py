"""The recipes in ``configs/``: headers, strict loading, the paper's settings and the models they build (spec §5.1)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from onepeace.data.pretrain import PretrainDataConfig
from onepeace.modality import Modality
from onepeace.model import OnePeaceModel
from onepeace.model.decoder import PretrainDecoder
from onepeace.train.config import (
    REQUIRED_HEADER,
    TrainConfig,
    check_header,
    dump_recipe,
    load_recipe,
    parse_recipe,
    read_header,
)
from onepeace.train.objectives import PretrainObjective
from onepeace.train.optim import stage2_freeze

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))
PAPER_RECIPES = (
    "pretrain_4b_stage1.yaml",
    "pretrain_4b_stage2.yaml",
    "pretrain_base_stage1.yaml",
    "pretrain_base_stage2.yaml",
)
T, IMG, A = Modality.TEXT, Modality.IMAGE, Modality.AUDIO

# Backbone parameters of the 4B model per stage, from the spec §1.2 count of the three-modality model
# (3,884,740,545) minus the branch a stage does not build: stage 1 drops the A-Adapter (19,040,816), the A-FFNs
# (1,133,015,040), the audio final norm (3,072) and the audio projection (2,360,832); stage 2 drops the V-Adapter
# (3,390,816), the V-FFNs, the image final norm and the image projection (same sizes as for audio).
PARAMS_4B_STAGE1 = 3_884_740_545 - 19_040_816 - 1_133_015_040 - 3_072 - 2_360_832
PARAMS_4B_STAGE2 = 3_884_740_545 - 3_390_816 - 1_133_015_040 - 3_072 - 2_360_832


def _load(name: str) -> TrainConfig:
    return load_recipe(CONFIGS / name, data_config_type=PretrainDataConfig)


def _values(obj: object, expected: dict[str, object]) -> dict[str, object]:
    """The attributes of ``obj`` named by ``expected`` (compare the result with ``expected``)."""
    return {name: getattr(obj, name) for name in expected}


def _header_text(name: str) -> str:
    return " ".join(read_header((CONFIGS / name).read_text()).values())


def test_the_paper_recipes_are_present() -> None:
    assert set(PAPER_RECIPES) <= {p.name for p in RECIPES}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_has_a_header_and_loads_strictly(path: Path) -> None:
    header = check_header(path.read_text(), str(path))
    assert all(header[key] for key in REQUIRED_HEADER)
    cfg = load_recipe(path, data_config_type=PretrainDataConfig)
    assert isinstance(cfg.data, PretrainDataConfig)
    assert cfg.data.stage == cfg.stage
    assert parse_recipe(dump_recipe(cfg), data_config_type=PretrainDataConfig) == cfg


def test_4b_stage1_has_the_paper_settings() -> None:
    cfg = _load("pretrain_4b_stage1.yaml")
    run = {"stage": 1, "precision": "bf16", "activation_checkpointing": True, "strategy": "fsdp"}
    assert _values(cfg, run) == run
    model = {"variant": "onepeace-4b", "init_from": None, "drop_path_rate": 0.4}
    assert _values(cfg.model, model) == model
    optim = {
        "lr": 5e-4,
        "min_lr": 1e-6,
        "betas": (0.9, 0.98),
        "eps": 1e-8,
        "weight_decay": 0.05,
        "clip_grad_norm": 3.0,
        "warmup_updates": 3000,
        "total_updates": 200_000,
        "epochs": None,
    }
    assert _values(cfg.optim, optim) == optim
    d, defaults = cfg.data, PretrainDataConfig()
    assert (d.image_size, d.max_text_tokens, d.format) == (256, 70, "webdataset")
    ratios = ("text_mask_ratio", "vl_text_mask_ratio", "image_mask_ratio", "vl_image_mask_ratio")
    assert all(getattr(d, r) == getattr(defaults, r) for r in ratios)
    assert d.batch_size * 256 * cfg.grad_accum == 32_768 and "32,768" in _header_text("pretrain_4b_stage1.yaml")


def test_4b_stage2_starts_from_stage1_with_the_paper_settings() -> None:
    first, cfg = _load("pretrain_4b_stage1.yaml"), _load("pretrain_4b_stage2.yaml")
    assert cfg.stage == 2 and cfg.data.stage == 2
    assert cfg.model.init_from == first.out_dir and cfg.out_dir != first.out_dir
    optim = {"lr": 2e-4, "min_lr": 1e-6, "epochs": 10, "warmup_ratio": 0.1, "total_updates": None}
    assert _values(cfg.optim, optim) == optim
    common = ("betas", "eps", "weight_decay", "clip_grad_norm")
    assert _values(cfg.optim, dict.fromkeys(common)) == _values(first.optim, dict.fromkeys(common))
    assert (cfg.model.drop_path_rate, cfg.precision) == (0.4, "bf16")
    assert cfg.data.max_duration == 15.0 and cfg.data.max_text_tokens == 70
    assert cfg.data.batch_size * 32 * cfg.grad_accum == 3_072 and "3,072" in _header_text("pretrain_4b_stage2.yaml")


def test_base_recipes_follow_the_ablation_setup_and_chain() -> None:
    first, second = _load("pretrain_base_stage1.yaml"), _load("pretrain_base_stage2.yaml")
    assert first.model.variant == second.model.variant == "onepeace-base"
    assert first.optim.epochs == 20 and first.data.batch_size * 32 * first.grad_accum == 4_096
    assert "4,096" in _header_text("pretrain_base_stage1.yaml")
    assert second.stage == 2 and second.model.init_from == first.out_dir
    assert second.optim == _load("pretrain_4b_stage2.yaml").optim


@pytest.mark.parametrize(
    "name, modalities, params",
    [("pretrain_4b_stage1.yaml", (T, IMG), PARAMS_4B_STAGE1), ("pretrain_4b_stage2.yaml", (T, A), PARAMS_4B_STAGE2)],
)
def test_4b_recipes_build_the_stage_model_on_the_meta_device(
    name: str, modalities: tuple[Modality, ...], params: int
) -> None:
    cfg = _load(name)
    backbone = cfg.model.backbone_config(cfg.stage)
    assert (backbone.embed_dim, backbone.layers, backbone.heads, backbone.ffn_dim) == (1536, 40, 24, 6144)
    assert (backbone.drop_path_rate, backbone.layer_scale_init, backbone.image.image_size) == (0.4, 1e-6, 256)
    with torch.device("meta"):
        model = OnePeaceModel(backbone)
        decoder = PretrainDecoder(backbone, cfg.model.decoder, backbone.modalities)
    assert model.modalities == modalities
    assert set(model.adapters) == {m.value for m in modalities}
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == params
    objective = PretrainObjective(model, decoder, cfg.stage, cfg.loss)
    if cfg.stage == 2:
        stage2_freeze(objective)
    trainable = [n for n, p in objective.named_parameters() if p.requires_grad and n.startswith("model.")]
    if cfg.stage == 1:
        assert len(trainable) == len(list(model.parameters()))
    else:
        assert trainable and all("audio" in n or n == "model.logit_scale" for n in trainable)


@pytest.mark.parametrize(
    "old, new, dotted",
    [
        ("activation_checkpointing: true", "activation_checkpoint: true", "activation_checkpoint"),
        ("  drop_path_rate: 0.4", "  drop_path_rat: 0.4", "model.drop_path_rat"),
        ("  warmup_updates: 3000", "  warmup_update: 3000", "optim.warmup_update"),
        ("  image_mask_ratio: 0.75", "  image_mask_ration: 0.75", "data.image_mask_ration"),
    ],
)
def test_a_typo_fails_naming_the_dotted_key(tmp_path: Path, old: str, new: str, dotted: str) -> None:
    text = (CONFIGS / "pretrain_4b_stage1.yaml").read_text()
    assert text.count(old) == 1
    bad = tmp_path / "typo.yaml"
    bad.write_text(text.replace(old, new))
    with pytest.raises(ValueError, match=re.escape(f"unknown key '{dotted}'")):
        load_recipe(bad, data_config_type=PretrainDataConfig)
