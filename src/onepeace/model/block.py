"""One fusion layer: shared attention, then a feed-forward network per modality (spec §3.2)."""

from __future__ import annotations

import torch
from torch import nn

from onepeace.modality import Modality
from onepeace.model.attention import SelfAttention
from onepeace.model.layers import LN_EPS, DropPath, GeGLUFeedForward

Segments = list[tuple[Modality, slice]]
"""Which rows of the joint sequence belong to which modality, in sequence order."""


class FusionBlock(nn.Module):
    """Pre-norm block: ``x + gamma_attn * attn(norm(x))`` then ``x + gamma_ffn * ffn_m(norm(x))`` per segment."""

    def __init__(
        self,
        dim: int,
        heads: int,
        ffn_dim: int,
        modalities: tuple[Modality, ...],
        layer_scale_init: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = SelfAttention(dim, heads)
        self.ffn_norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.ffn = nn.ModuleDict({m.value: GeGLUFeedForward(dim, ffn_dim) for m in modalities})
        if layer_scale_init > 0:
            self.gamma_attn = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
            self.gamma_ffn = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
        else:
            self.gamma_attn = self.gamma_ffn = None
        self.drop_path = DropPath(drop_path)

    def _scaled(self, h: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
        return self.drop_path(h if gamma is None else h * gamma)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, segments: Segments) -> torch.Tensor:
        """``x``: ``[B, S_total, D]``; ``bias``: ``[B or 1, H, S_total, S_total]``; returns ``[B, S_total, D]``."""
        x = x + self._scaled(self.attn(self.attn_norm(x), bias), self.gamma_attn)
        h = self.ffn_norm(x)
        h = torch.cat([self.ffn[m.value](h[:, rows]) for m, rows in segments], dim=1)
        return x + self._scaled(h, self.gamma_ffn)
