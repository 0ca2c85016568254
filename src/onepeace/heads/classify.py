"""The official classification head (spec §8.1): attention pooling, optional tanh pooler, MLP classifier.

Used by every classification-style task: audio classification, AQA, VQA, NLVR2 and visual grounding. The module
names follow the official ``classify_head.*`` layout so the checkpoint adapter maps keys one to one.
"""

from __future__ import annotations

import torch
from torch import nn

from onepeace.model.layers import LN_EPS


class AttentionPool(nn.Module):
    """Multi-head attention pooling: one learned query per head over the given tokens.

    Keys ``k_proj`` (no bias) and values ``v_proj``; the query-key products are **not** scaled by 1/sqrt(head dim)
    (official behaviour); padded tokens get no weight; the heads are concatenated and passed through ``out_proj``.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.q = nn.Parameter(torch.zeros(1, 1, heads, dim // heads))
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``tokens`` ``[B, S, D]``, ``padding_mask`` ``[B, S]`` (True = pad) -> ``[B, D]``."""
        batch, length, dim = tokens.shape
        split = (batch, length, self.heads, dim // self.heads)
        keys, values = self.k_proj(tokens).view(split), self.v_proj(tokens).view(split)
        scores = torch.einsum("hd,bshd->bhs", self.q[0, 0], keys)
        if padding_mask is not None:
            if padding_mask.shape != (batch, length):
                raise ValueError(f"padding mask {tuple(padding_mask.shape)} does not fit tokens {tuple(tokens.shape)}")
            if padding_mask.all(dim=1).any():
                raise ValueError("a sequence has only padding: nothing to pool")
            scores = scores.masked_fill(padding_mask[:, None, :], float("-inf"))
        weights = scores.softmax(dim=-1)
        return self.out_proj(torch.einsum("bhs,bshd->bhd", weights, values).reshape(batch, dim))


class ClassifyHead(nn.Module):
    """Pooled features of one or more passes -> logits ``[B, num_classes]``.

    ``forward`` takes the segment's tokens **with** its cls token first: attention pooling (``attn_pooling``,
    over the non-cls tokens, then LayerNorm ``norm``) or the cls token itself; then the optional pooler
    (Linear -> tanh, VQA); the pooled vectors of ``num_inputs`` passes are concatenated (NLVR2: 2); then the
    classifier Linear(in -> dim * ``scale_ratio``) -> LayerNorm -> GELU -> Linear(-> num_classes).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        num_classes: int,
        *,
        attn_pooling: bool = True,
        use_pooler: bool = False,
        num_inputs: int = 1,
        scale_ratio: int = 2,
    ) -> None:
        super().__init__()
        if num_classes < 1 or num_inputs < 1 or scale_ratio < 1:
            raise ValueError("num_classes, num_inputs and scale_ratio must be >= 1")
        self.attn_pooling_func = AttentionPool(dim, heads) if attn_pooling else None
        self.norm = nn.LayerNorm(dim, eps=LN_EPS) if attn_pooling else None
        self.pooler = (
            nn.Sequential(nn.Dropout(0.0), nn.Linear(dim, dim), nn.Tanh(), nn.Dropout(0.0)) if use_pooler else None
        )
        inner = dim * scale_ratio
        self.classifier = nn.Sequential(
            nn.Linear(dim * num_inputs, inner),
            nn.LayerNorm(inner, eps=LN_EPS),
            nn.GELU(),
            nn.Linear(inner, num_classes),
        )
        self.num_inputs = num_inputs

    def pool(self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, S, D]`` with cls first (and ``[B, S]`` padding) -> pooled ``[B, D]``."""
        if self.attn_pooling_func is None:
            pooled = tokens[:, 0]
        else:
            rest = None if padding_mask is None else padding_mask[:, 1:]
            pooled = self.norm(self.attn_pooling_func(tokens[:, 1:], rest))
        return pooled if self.pooler is None else self.pooler(pooled)

    def forward(self, *segments: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        """``segments``: ``num_inputs`` pairs (tokens ``[B, S, D]``, padding ``[B, S]`` or None) -> ``[B, C]``."""
        if len(segments) != self.num_inputs:
            raise ValueError(f"this head takes {self.num_inputs} segment(s), got {len(segments)}")
        return self.classifier(torch.cat([self.pool(tokens, pad) for tokens, pad in segments], dim=-1))


class MeanPoolHead(nn.Module):
    """Image classification on the vision branch (spec §8.2): mean of the patch tokens (cls left out) -> LayerNorm
    ``fc_norm`` -> Linear ``fc``. The linear layer starts at truncated normal(0, 0.02) times ``init_scale`` with a
    zero bias (official ``head_init_scale`` 0.001)."""

    def __init__(self, dim: int, num_classes: int, init_scale: float = 0.001) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError("num_classes must be >= 1")
        self.fc_norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.fc = nn.Linear(dim, num_classes)
        with torch.no_grad():
            nn.init.trunc_normal_(self.fc.weight, std=0.02)
            self.fc.weight.mul_(init_scale)
            self.fc.bias.zero_()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` ``[B, S, D]`` with the cls token first -> logits ``[B, num_classes]``."""
        return self.fc(self.fc_norm(tokens[:, 1:].mean(dim=1)))
