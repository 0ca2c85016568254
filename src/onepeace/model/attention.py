"""Shared self-attention with a LayerNorm before the output projection (Sub-LN, spec §3.3).

Glossary: b batch, s sequence, h heads, e head dim, d = h * e width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from onepeace.model.layers import LN_EPS


class SelfAttention(nn.Module):
    """Multi-head self-attention; ``k_proj`` has no bias; the additive bias carries positions and padding."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim)
        self.sub_norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Attend.

        Args:
            x: ``[B, S, D]``.
            bias: ``[B or 1, H, S, S]`` additive (relative positions, -inf at padded keys) or None.

        Returns:
            ``[B, S, D]``.
        """
        b, s, d = x.shape
        q, k, v = (
            proj(x).view(b, s, self.heads, d // self.heads).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )  # each [b, h, s, e]
        if bias is not None:
            bias = bias.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [b, h, s, e]
        out = out.transpose(1, 2).reshape(b, s, d)
        return self.out_proj(self.sub_norm(out))
