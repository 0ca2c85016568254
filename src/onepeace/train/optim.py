"""AdamW parameter groups, layer-wise LR decay and stage-2 freezing, all driven by parameter names (spec §5.5, §5.6).

Names are those of the training module: the backbone under ``backbone_prefix`` (``"model."`` when the module holds an
:class:`~onepeace.model.OnePeaceModel` as ``.model``, ``""`` for a bare backbone) and the pretraining decoder under
``decoder_prefix`` (``"decoder."``).

Weight-decay exemptions (spec §5.5): every parameter with ``ndim <= 1``, every ``.bias``, and a named set. The named set
is the one the official code intends: the encoder's text position table, the text/image/audio cls tokens and the image
position table, plus the decoder's position tables and mask tokens. The official list fuses two decoder names through
a missing comma, so two decoder tables are decayed there; here the intended set is used instead, and every decoder
position table (the audio one included) is exempt like the others.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn

from onepeace.model.onepeace import LOGIT_SCALE_MAX
from onepeace.train.config import OptimConfig

BACKBONE_NO_DECAY = (
    "adapters.text.pos_embed.weight",
    "adapters.text.cls_token",
    "adapters.image.cls_token",
    "adapters.audio.cls_token",
    "adapters.image.pos_embed",
)
DECODER_NO_DECAY = ("positions.*", "mask_tokens.*", "*cls_token*")
STAGE2_TRAINABLE = (
    "adapters.audio.*",
    "encoder.final_norms.audio.*",
    "encoder.layers.*.ffn.audio.*",
    "projections.audio.*",
    "logit_scale",
)
"""Backbone parameters trained in stage 2; the rest of the backbone is frozen (spec §5.6)."""

_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.")
_REL_POS = re.compile(r"^adapters\.\w+\.rel_pos\.tables\.(\d+)\.")


def backbone_prefix_of(module: nn.Module) -> str:
    """``"model."`` when ``module`` wraps the backbone as ``.model``, else ``""`` (the module is the backbone)."""
    return "model." if isinstance(getattr(module, "model", None), nn.Module) else ""


def no_decay_patterns(backbone_prefix: str = "model.", decoder_prefix: str = "decoder.") -> tuple[str, ...]:
    """Glob patterns (``fnmatch``) of the named weight-decay exemptions for the given prefixes."""
    return tuple(backbone_prefix + n for n in BACKBONE_NO_DECAY) + tuple(decoder_prefix + n for n in DECODER_NO_DECAY)


def is_no_decay(name: str, param: torch.Tensor, patterns: Iterable[str]) -> bool:
    """True when ``param`` gets no weight decay: ``ndim <= 1``, a ``.bias``, or a name matching ``patterns``."""
    return param.ndim <= 1 or name.endswith(".bias") or any(fnmatchcase(name, p) for p in patterns)


def count_layers(names: Iterable[str], backbone_prefix: str = "model.") -> int:
    """Number of fusion layers L, from the ``encoder.layers.{i}`` indices in ``names``."""
    count = 0
    for name in names:
        match = _LAYER.match(name[len(backbone_prefix) :]) if name.startswith(backbone_prefix) else None
        if match:
            count = max(count, int(match.group(1)) + 1)
    return count


def layer_id(name: str, num_layers: int, backbone_prefix: str = "model.") -> int:
    """Layer id for layer-wise LR decay (spec §5.5).

    Adapter parameters -> 0, except ``adapters.*.rel_pos.tables.{i}`` -> ``i + 1``; ``encoder.layers.{i}.*`` ->
    ``i + 1``; everything else (final norms, projections, ``logit_scale``, the decoder) -> ``L + 1``.
    """
    if not name.startswith(backbone_prefix):
        return num_layers + 1
    rest = name[len(backbone_prefix) :]
    for pattern in (_REL_POS, _LAYER):
        match = pattern.match(rest)
        if match:
            return int(match.group(1)) + 1
    return 0 if rest.startswith("adapters.") else num_layers + 1


def param_groups(
    module: nn.Module,
    cfg: OptimConfig,
    no_decay_names: Iterable[str] | None = None,
    layer_id_fn: Callable[[str], int] | None = None,
    *,
    backbone_prefix: str | None = None,
    decoder_prefix: str = "decoder.",
) -> list[dict[str, Any]]:
    """AdamW parameter groups of the trainable parameters of ``module``.

    Args:
        no_decay_names: glob patterns of the named exemptions; default :func:`no_decay_patterns`.
        layer_id_fn: name -> layer id in ``0..L+1``; default :func:`layer_id`. LR multiplier ``decay^(L+1-id)``.
        backbone_prefix: prefix of the backbone's names; default :func:`backbone_prefix_of`.

    Returns:
        groups with ``params``, ``param_names``, ``weight_decay``, ``lr_scale`` and ``lr = cfg.lr * lr_scale``; one
        group per distinct (multiplier, decayed or not), in order of first appearance. Frozen parameters are left out.
    """
    prefix = backbone_prefix_of(module) if backbone_prefix is None else backbone_prefix
    named = [(n, p) for n, p in module.named_parameters()]
    top = count_layers((n for n, _ in named), prefix) + 1
    patterns = tuple(no_decay_patterns(prefix, decoder_prefix) if no_decay_names is None else no_decay_names)
    ids = layer_id_fn or (lambda n: layer_id(n, top - 1, prefix))
    groups: dict[tuple[float, bool], dict[str, Any]] = {}
    for name, param in named:
        if not param.requires_grad:
            continue
        lid = ids(name)
        if not 0 <= lid <= top:
            raise ValueError(f"layer id {lid} of {name} is outside 0..{top}")
        scale = cfg.layer_decay ** (top - lid)
        decay = not is_no_decay(name, param, patterns)
        group = groups.setdefault(
            (scale, decay),
            {"params": [], "param_names": [], "weight_decay": cfg.weight_decay if decay else 0.0, "lr_scale": scale},
        )
        group["params"].append(param)
        group["param_names"].append(name)
    for group in groups.values():
        group["lr"] = cfg.lr * group["lr_scale"]
    return list(groups.values())


def build_optimizer(module: nn.Module, cfg: OptimConfig, **group_kwargs: Any) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` (``group_kwargs`` are passed on to it); not fused, foreach where supported."""
    groups = param_groups(module, cfg, **group_kwargs)
    if not groups:
        raise ValueError("the module has no trainable parameters")
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, fused=False
    )


def stage2_freeze(module: nn.Module, backbone_prefix: str | None = None) -> tuple[list[str], list[str]]:
    """Freeze per spec §5.6 and return ``(frozen, trainable)`` parameter names.

    In the backbone only :data:`STAGE2_TRAINABLE` stays trainable (so ``projections.text``, shared attention,
    LayerScale, per-layer norms, the text adapter and text FFNs are frozen); parameters outside the backbone (the
    decoder) are all trainable.
    """
    prefix = backbone_prefix_of(module) if backbone_prefix is None else backbone_prefix
    frozen, trainable = [], []
    for name, param in module.named_parameters():
        in_backbone = name.startswith(prefix)
        train = not in_backbone or any(fnmatchcase(name[len(prefix) :], p) for p in STAGE2_TRAINABLE)
        param.requires_grad_(train)
        (trainable if train else frozen).append(name)
    return frozen, trainable


def is_image_key(key: str) -> bool:
    """True for a key of the image branch: a dotted part ``image`` or ``image_*``."""
    return any(part == "image" or part.startswith("image_") for part in key.split("."))


def drop_image_branch(state_dict: Mapping[str, Any], keep_logit_scale: bool = False) -> dict[str, Any]:
    """Copy of a stage-1 state dict without its image branch, for starting stage 2 (spec §5.1).

    Removes every key with a dotted part ``image`` or ``image_*`` (``adapters.image.*``,
    ``encoder.layers.*.ffn.image.*``, ``encoder.final_norms.image.*``, ``projections.image.*`` and the decoder's image
    parts, under any prefix) and, unless ``keep_logit_scale``, ``logit_scale`` (re-initialised for stage 2).
    """
    out = {}
    for key, value in state_dict.items():
        if is_image_key(key) or (not keep_logit_scale and key.rsplit(".", 1)[-1] == "logit_scale"):
            continue
        out[key] = value
    return out


@torch.no_grad()
def clamp_logit_scale_(module: nn.Module) -> int:
    """Clamp every parameter named ``logit_scale`` to ``[0, ln 100]`` in place (after each update); returns how many."""
    count = 0
    for name, param in module.named_parameters():
        if name.rsplit(".", 1)[-1] == "logit_scale":
            param.clamp_(0.0, LOGIT_SCALE_MAX)
            count += 1
    return count


def apply_update(
    module: nn.Module, optimizer: torch.optim.Optimizer, schedule: Any, clip_grad_norm: float
) -> tuple[torch.Tensor, float]:
    """Finish one update after the backward passes: clip the global gradient norm (``clip_grad_norm`` 0 = no
    clipping, the norm is still measured), step, zero the gradients, advance ``schedule`` (an ``LRSchedule``) and
    clamp ``logit_scale``. Returns ``(grad_norm, lr)``: the norm before clipping as a scalar tensor on the device
    (a ``DTensor`` under FSDP2; nothing is copied to the host) and the base LR of this update."""
    params = [p for p in module.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad_norm or float("inf"))
    lr = schedule.lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    schedule.step()
    clamp_logit_scale_(module)
    return grad_norm, lr
