"""Building the pretraining module of a recipe: backbone, decoder, starting weights, frozen parts (spec §5.1, §5.6)."""

from __future__ import annotations

from pathlib import Path

import torch

from onepeace.errors import CheckpointError
from onepeace.modality import Modality
from onepeace.model import OnePeaceModel
from onepeace.model.decoder import PretrainDecoder
from onepeace.train.config import TrainConfig
from onepeace.train.objectives import PretrainObjective
from onepeace.train.optim import drop_image_branch, is_image_key, stage2_freeze

#: Parameters that no forward pass reads (kept for checkpoint compatibility); they are never trained.
DEAD_PARAMETERS = ("model.adapters.audio.mask_embedding",)


def read_start_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights to start from, under :class:`PretrainObjective` names (``model.*`` and, if present, ``decoder.*``).

    Accepts a training step directory or run directory (``model.safetensors`` of the whole objective), a native
    inference directory, or an official ``.pt`` (with its decoder when it is a pretraining checkpoint).
    """
    from safetensors.torch import load_file

    from onepeace.checkpoints.native import is_native_dir
    from onepeace.train.checkpoint import latest_checkpoint

    p = Path(path)
    step_dir = latest_checkpoint(p) if p.is_dir() and not (p / "model.safetensors").is_file() else p
    if step_dir is not None and step_dir.is_dir() and (step_dir / "trainer.pt").is_file():
        return load_file(str(step_dir / "model.safetensors"))
    if is_native_dir(p):
        from onepeace.checkpoints.native import read_native

        return {f"model.{k}": v for k, v in read_native(p)[1].items()}
    if p.is_file():
        from onepeace.checkpoints.official import official_pretrain_state
        from onepeace.checkpoints.pickle_io import read_official_checkpoint

        return official_pretrain_state(read_official_checkpoint(p)[0])
    raise CheckpointError(f"cannot start from {p}: not a training checkpoint, model directory or official .pt")


def load_start_weights(objective: PretrainObjective, weights: dict[str, torch.Tensor], stage: int) -> list[str]:
    """Load starting weights; stage 2 drops every image key and ``logit_scale`` first (spec §5.1).

    Returns the parameters left at their initial values. Only audio-branch parameters and ``logit_scale`` may be
    missing (a new audio branch); any other missing or unexpected key raises :class:`CheckpointError`.
    """
    if stage == 2:
        weights = drop_image_branch(weights)
    result = objective.load_state_dict(weights, strict=False)
    fresh_ok = ("audio", "logit_scale") if stage == 2 else ()
    bad_missing = [k for k in result.missing_keys if not any(tag in k for tag in fresh_ok)]
    if bad_missing or result.unexpected_keys:
        raise CheckpointError(
            f"starting weights do not fit stage {stage}: "
            f"missing {bad_missing[:8]}, unexpected {result.unexpected_keys[:8]}"
        )
    return list(result.missing_keys)


def copy_text_ffns_to_audio(model: OnePeaceModel) -> None:
    """Overwrite every layer's audio FFN and the audio final norm with the text ones (see
    ``ModelConfig.audio_ffn_init``); the copies are trained separately from then on."""
    with torch.no_grad():
        for layer in model.encoder.layers:
            layer.ffn[Modality.AUDIO.value].load_state_dict(layer.ffn[Modality.TEXT.value].state_dict())
        norms = model.encoder.final_norms
        norms[Modality.AUDIO.value].load_state_dict(norms[Modality.TEXT.value].state_dict())


def build_objective(cfg: TrainConfig, gather=None, rank: int = 0) -> PretrainObjective:
    """The pretraining module of ``cfg``: built from the seed (the same on every rank), weights loaded, parts frozen."""
    torch.manual_seed(cfg.seed)
    backbone_cfg = cfg.model.backbone_config(cfg.stage)
    model = OnePeaceModel(backbone_cfg)
    decoder = PretrainDecoder(backbone_cfg, cfg.model.decoder, backbone_cfg.modalities)
    objective = PretrainObjective(model, decoder, cfg.stage, cfg.loss, gather, rank)
    if cfg.model.init_from:
        fresh = load_start_weights(objective, read_start_weights(cfg.model.init_from), cfg.stage)
        if cfg.model.audio_ffn_init == "text" and any(".ffn.audio." in key for key in fresh):
            copy_text_ffns_to_audio(model)  # only a new audio branch: trained audio FFNs are kept
    if cfg.stage == 2:
        stage2_freeze(objective)
    for name, param in objective.named_parameters():
        if name in DEAD_PARAMETERS:
            param.requires_grad_(False)
    return objective


def image_branch(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The backbone's image-branch tensors of :func:`read_start_weights` output, under backbone names.

    Stage 2 freezes every part the image branch works with (shared attention, text branch, spec §5.6), so the
    stage-1 image branch joins the stage-2 backbone unchanged: together they are the complete three-modality model.
    """
    return {k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.") and is_image_key(k)}
