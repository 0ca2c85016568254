"""Building the pretraining module of a recipe: backbone, decoder, starting weights, frozen parts (spec §5.1, §5.6)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from onepeace.errors import CheckpointError
from onepeace.modality import Modality
from onepeace.model import OnePeaceModel
from onepeace.model.decoder import PretrainDecoder
from onepeace.model.init import init_weights
from onepeace.train.config import TrainConfig
from onepeace.train.distributed import DistInfo
from onepeace.train.objectives import PretrainObjective
from onepeace.train.optim import drop_image_branch, is_image_key, stage2_freeze

#: Parameters that no forward pass reads (kept for checkpoint compatibility); they are never trained.
DEAD_PARAMETERS = ("model.adapters.audio.mask_embedding",)


def read_start_weights(path: str | Path, lazy: bool = False) -> dict[str, torch.Tensor]:
    """Weights to start from, under :class:`PretrainObjective` names (``model.*`` and, if present, ``decoder.*``).

    Accepts a training step directory or run directory (the whole objective, single-file or sharded), a native
    inference directory, or an official ``.pt`` (with its decoder when it is a pretraining checkpoint). With
    ``lazy``, safetensors tensors are :class:`~onepeace.train.shard_load.LazyTensor` handles (nothing read yet); an
    official ``.pt`` is always read whole.
    """
    from safetensors.torch import load_file

    from onepeace.checkpoints.native import WEIGHTS, is_native_dir
    from onepeace.train.checkpoint import is_checkpoint, is_sharded, latest_checkpoint, read_checkpoint_weights
    from onepeace.train.shard_load import open_safetensors

    p = Path(path)
    step_dir = p if is_checkpoint(p) else latest_checkpoint(p) if p.is_dir() else None
    if step_dir is not None:
        if is_sharded(step_dir):  # written by several processes: the model part is read whole here
            return read_checkpoint_weights(step_dir)
        file = step_dir / "model.safetensors"
        return open_safetensors(file) if lazy else load_file(str(file))
    if is_native_dir(p):
        from onepeace.checkpoints.native import read_native

        if lazy:
            if not (p / WEIGHTS).is_file():
                raise CheckpointError(f"{p} has no {WEIGHTS}")
            return open_safetensors(p / WEIGHTS, rename=lambda k: f"model.{k}")
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
    return check_start_keys(list(result.missing_keys), list(result.unexpected_keys), stage)


def load_start_shards(objective: nn.Module, weights: Mapping[str, Any], stage: int) -> list[str]:
    """:func:`load_start_weights` for a module sharded by FSDP2 (or whole): each rank reads and copies only the
    rows it holds (``weights`` may hold lazy handles, see :func:`read_start_weights`); same checks and result."""
    from onepeace.train.shard_load import load_local

    if stage == 2:
        weights = drop_image_branch(weights)
    expected = list(objective.state_dict())
    known = set(expected)
    missing = [k for k in expected if k not in weights]
    fresh = check_start_keys(missing, [k for k in weights if k not in known], stage)
    load_local(objective, weights)
    return fresh


def check_start_keys(missing: list[str], unexpected: list[str], stage: int) -> list[str]:
    """``missing``, checked: only audio-branch keys and ``logit_scale`` (stage 2) may be missing, nothing may be
    unexpected; raises :class:`CheckpointError` otherwise."""
    fresh_ok = ("audio", "logit_scale") if stage == 2 else ()
    bad_missing = [k for k in missing if not any(tag in k for tag in fresh_ok)]
    if bad_missing or unexpected:
        raise CheckpointError(
            f"starting weights do not fit stage {stage}: missing {bad_missing[:8]}, unexpected {unexpected[:8]}"
        )
    return missing


def copy_text_ffns_to_audio(model: OnePeaceModel) -> None:
    """Overwrite every layer's audio FFN and the audio final norm with the text ones (see
    ``ModelConfig.audio_ffn_init``); the copies are trained separately from then on."""
    with torch.no_grad():
        for layer in model.encoder.layers:
            layer.ffn[Modality.AUDIO.value].load_state_dict(layer.ffn[Modality.TEXT.value].state_dict())
        norms = model.encoder.final_norms
        norms[Modality.AUDIO.value].load_state_dict(norms[Modality.TEXT.value].state_dict())


def construct_objective(cfg: TrainConfig, gather=None, rank: int = 0) -> PretrainObjective:
    """The freshly initialised pretraining module of ``cfg``, from the seed (the same on every rank).

    Also runs under the meta device (see :mod:`onepeace.train.materialize`): the same operations in the same order.
    """
    torch.manual_seed(cfg.seed)
    backbone_cfg = cfg.model.backbone_config(cfg.stage)
    model = OnePeaceModel(backbone_cfg, init=False)
    init_weights(model, on_meta=True)
    decoder = PretrainDecoder(backbone_cfg, cfg.model.decoder, backbone_cfg.modalities)
    return PretrainObjective(model, decoder, cfg.stage, cfg.loss, gather, rank)


def build_objective(cfg: TrainConfig, gather=None, rank: int = 0) -> PretrainObjective:
    """The pretraining module of ``cfg``: built from the seed (the same on every rank), weights loaded, parts frozen."""
    objective = construct_objective(cfg, gather, rank)
    if cfg.model.init_from:
        fresh = load_start_weights(objective, read_start_weights(cfg.model.init_from), cfg.stage)
        _start_audio_ffns(cfg, objective, fresh)
    freeze_objective(cfg, objective)
    return objective


def _start_audio_ffns(cfg: TrainConfig, objective: PretrainObjective, fresh: list[str]) -> None:
    if cfg.model.audio_ffn_init == "text" and any(".ffn.audio." in key for key in fresh):
        copy_text_ffns_to_audio(objective.model)  # only a new audio branch: trained audio FFNs are kept


def freeze_objective(cfg: TrainConfig, objective: PretrainObjective) -> None:
    """Turn off gradients of the parts stage 2 freezes and of :data:`DEAD_PARAMETERS`."""
    if cfg.stage == 2:
        stage2_freeze(objective)
    for name, param in objective.named_parameters():
        if name in DEAD_PARAMETERS:
            param.requires_grad_(False)


def build_for_ranks(
    cfg: TrainConfig,
    dist: DistInfo,
    gather=None,
    prepare: Callable[[nn.Module], None] | None = None,
    **wrap_options: Any,
) -> tuple[Any, nn.Module]:
    """The objective of ``cfg`` on this rank's device and its data-parallel wrapper: ``(objective, wrapped)``.

    One process or ``strategy: none``: :func:`build_objective` on the host, moved to the device. Under DDP or FSDP
    with a process group the objective is built on the meta device; FSDP2 shards it first, then every rank
    allocates only its shards; DDP allocates it on the device directly. The values are those of
    :func:`build_objective` bit for bit (see :mod:`onepeace.train.materialize`); ``init_from`` tensors are read
    shard by shard. ``prepare(objective)`` runs just before wrapping (after activation checkpointing), e.g. the
    per-block compile; ``wrap_options`` go to :func:`~onepeace.train.distributed.wrap_model`.
    """
    from onepeace.train.distributed import apply_activation_checkpointing, wrap_model
    from onepeace.train.materialize import materialize_for_ranks, record_init

    if dist.world_size == 1 or cfg.strategy == "none":
        objective = build_objective(cfg, gather, dist.rank).to(dist.device)
        if cfg.activation_checkpointing:
            apply_activation_checkpointing(objective)
        if prepare is not None:
            prepare(objective)
        return objective, wrap_model(objective, cfg.strategy, **wrap_options)
    record = record_init(lambda: construct_objective(cfg, gather, dist.rank))
    objective = record.module
    freeze_objective(cfg, objective)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(objective)
    if prepare is not None:
        prepare(objective)

    def load() -> None:
        if cfg.model.init_from:
            fresh = load_start_shards(objective, read_start_weights(cfg.model.init_from, lazy=True), cfg.stage)
            _start_audio_ffns(cfg, objective, fresh)

    return objective, materialize_for_ranks(record, cfg.strategy, dist.device, load, **wrap_options)


def image_branch(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The backbone's image-branch tensors of :func:`read_start_weights` output, under backbone names.

    Stage 2 freezes every part the image branch works with (shared attention, text branch, spec §5.6), so the
    stage-1 image branch joins the stage-2 backbone unchanged: together they are the complete three-modality model.
    """
    return {k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.") and is_image_key(k)}
