"""Relative-position indices and bias tables, and absolute-position resizing (spec §2.1, §2.4).

Index matrices map a (query, key) position pair to a row of a learned ``[rows, H]`` table. Position 0 is always
the cls slot, which gets three dedicated rows: cls as query, cls as key, and cls with itself.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn


def _with_cls_rows(index: torch.Tensor, rows: int) -> torch.Tensor:
    """Overwrite row 0 / column 0 / cell (0, 0) with the last three table rows."""
    index[0, :] = rows - 3
    index[:, 0] = rows - 2
    index[0, 0] = rows - 1
    return index


def sequence_rel_pos_index(bucket_size: int, max_positions: int = 1024) -> torch.Tensor:
    """Log-bucketed 1-D relative-position index for text and audio.

    Returns:
        ``[max_positions, max_positions]`` int64 with values in ``[0, 2 * bucket_size + 1]`` (a fresh copy).
    """
    return _sequence_rel_pos_index(bucket_size, max_positions).clone()


@lru_cache(maxsize=8)
def _sequence_rel_pos_index(bucket_size: int, max_positions: int) -> torch.Tensor:
    pos = torch.arange(
        max_positions, dtype=torch.long, device="cpu"
    )  # index buffers live on CPU even under a meta-device context
    rel = pos[:, None] - pos[None, :]  # [P, P], query minus key
    mid = bucket_size // 2
    mag = rel.abs().clamp(min=1).to(torch.float64)
    log_part = torch.ceil(torch.log(mag / mid) / math.log((max_positions - 1) / mid) * (mid - 1)) + mid
    bucket = torch.where(rel.abs() <= mid, rel, log_part.to(torch.long) * rel.sign())
    index = bucket + bucket_size - 1
    return _with_cls_rows(index, 2 * bucket_size + 2)


def grid_rel_pos_index(grid: int) -> torch.Tensor:
    """2-D relative-position index for a ``grid x grid`` patch grid plus cls.

    Returns:
        ``[grid**2 + 1, grid**2 + 1]`` int64 into a table of ``(2 * grid - 1) ** 2 + 3`` rows.
    """
    steps = torch.arange(grid, device="cpu")
    ys, xs = torch.meshgrid(steps, steps, indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()  # [N], row-major patch order
    dy = ys[:, None] - ys[None, :] + grid - 1
    dx = xs[:, None] - xs[None, :] + grid - 1
    side = 2 * grid - 1
    index = torch.zeros(grid * grid + 1, grid * grid + 1, dtype=torch.long, device="cpu")
    index[1:, 1:] = dy * side + dx
    return _with_cls_rows(index, side * side + 3)


def grid_table_rows(grid: int) -> int:
    """Rows of a 2-D relative-position table for a ``grid x grid`` patch grid."""
    return (2 * grid - 1) ** 2 + 3


def resize_grid_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """Resize absolute positions ``[g*g + 1, D]`` (cls row first) to ``[grid*grid + 1, D]``.

    The ``g x g`` part is resized bicubically (``align_corners=False``) in float32; the cls row is kept.
    """
    if pos_embed.ndim != 2:
        raise ValueError(f"position table must be [rows, D], got shape {tuple(pos_embed.shape)}")
    old = math.isqrt(pos_embed.shape[0] - 1)
    if old * old != pos_embed.shape[0] - 1:
        raise ValueError(f"position table has {pos_embed.shape[0]} rows; expected g*g + 1")
    if old == grid:
        return pos_embed
    cls_row, patches = pos_embed[:1], pos_embed[1:]
    dim = pos_embed.shape[1]
    patch_map = patches.float().reshape(1, old, old, dim).permute(0, 3, 1, 2)  # [1, D, g, g]
    patch_map = F.interpolate(patch_map, size=(grid, grid), mode="bicubic", align_corners=False)
    patches = patch_map.permute(0, 2, 3, 1).reshape(grid * grid, dim).to(pos_embed.dtype)
    return torch.cat([cls_row, patches], dim=0)


class RelPosBias(nn.Module):
    """Learned relative-position bias: ``num_tables`` tables ``[rows, H]`` looked up through a fixed index.

    One table is shared by all fusion layers (pretraining, zero-shot) or there is one per layer (fine-tuning).
    """

    def __init__(self, index: torch.Tensor, rows: int, heads: int, num_tables: int) -> None:
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(rows, heads) for _ in range(num_tables))
        for table in self.tables:
            nn.init.zeros_(table.weight)
        self.register_buffer("index", index, persistent=False)

    def forward(self, length: int, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Bias for positions ``0..length-1``, optionally restricted to kept positions.

        Args:
            length: full sequence length S (cls included).
            keep: ``[B, S_keep]`` indices into ``0..S-1`` of the positions that are present, or None.

        Returns:
            one bias per table: ``[1, H, S, S]`` without ``keep``, ``[B, H, S_keep, S_keep]`` with it.
        """
        index = self.index[:length, :length]
        if keep is not None:
            index = index[keep[:, :, None], keep[:, None, :]]  # [B, S_keep, S_keep]
        else:
            index = index[None]  # [1, S, S]
        return tuple(table(index).permute(0, 3, 1, 2) for table in self.tables)
