"""Initialisation for training from scratch (spec §5.7)."""

from __future__ import annotations

import math

import torch
from torch import nn

TRUNC_STD = 0.02


def trunc_normal_(tensor: torch.Tensor, std: float = TRUNC_STD) -> torch.Tensor:
    """Normal(0, std) truncated at +-1 std (the official truncation, not +-2 std), by inverse-CDF sampling."""
    edge = math.erf(1.0 / math.sqrt(2.0))  # 2 * Phi(1) - 1: the uniform range that maps onto [-1, 1] std
    with torch.no_grad():
        tensor.uniform_(-edge, edge).erfinv_().mul_(std * math.sqrt(2.0)).clamp_(-std, std)
    return tensor


def init_weights(model: nn.Module, on_meta: bool = False) -> None:
    """Initialise a freshly built model in place.

    Linear weights truncated normal, biases 0; affine LayerNorms 1/0; Conv2d biases 0; audio extractor convs
    Kaiming normal; token and position tables truncated normal (pad row 0); cls, position and mask vectors
    truncated normal; relative-position tables 0; LayerScale and ``logit_scale`` keep their config values.
    A model on the meta device is left alone unless ``on_meta`` (its operations are then recorded, to be replayed
    later on real storage).
    """
    if not on_meta and any(p.is_meta for p in model.parameters()):
        return
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d) and module.bias is not None:
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv1d) and ".extractor." in f".{name}.":
            nn.init.kaiming_normal_(module.weight)
        elif isinstance(module, nn.Embedding):
            if ".rel_pos." in f".{name}.":
                nn.init.zeros_(module.weight)
            else:
                trunc_normal_(module.weight)
                if module.padding_idx is not None:
                    with torch.no_grad():
                        module.weight[module.padding_idx].zero_()
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("cls_token", "pos_embed", "cls_pos", "mask_embedding", "mask_token"):
            trunc_normal_(param.data)
