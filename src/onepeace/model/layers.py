"""Small building blocks: stochastic depth, the GeGLU feed-forward network, channel-first LayerNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-5


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability ``rate`` (training only)."""

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        self.rate = float(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, ...]``; kept samples are scaled by ``1 / (1 - rate)``."""
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class GeGLUFeedForward(nn.Module):
    """GeGLU FFN with a LayerNorm over the inner activation (Sub-LN): ``out(norm(gelu(gate x) * (linear x)))``."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, inner, bias=False)
        self.linear = nn.Linear(dim, inner, bias=False)
        self.norm = nn.LayerNorm(inner, eps=LN_EPS)
        self.out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., D] -> [..., D]``."""
        return self.out(self.norm(F.gelu(self.gate(x)) * self.linear(x)))


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over dim 1 of a channel-first tensor (``[B, C, ...]``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)
