"""Vision adapter: hMLP patch stem, cls vector, absolute and 2-D relative positions (spec §2.1)."""

from __future__ import annotations

import torch
from torch import nn

from onepeace.config import OnePeaceConfig
from onepeace.model.adapters.common import check_keep, fill_padding, gather_kept, kept_padding_mask
from onepeace.model.layers import LN_EPS, ChannelLayerNorm
from onepeace.model.outputs import AdapterOutput
from onepeace.model.position import RelPosBias, grid_rel_pos_index, grid_table_rows, resize_grid_pos_embed


class HierarchicalPatchStem(nn.Module):
    """hMLP stem: three non-overlapping convolutions (4x4, 2x2, 2x2) = 16x16 patches that never interact."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        mid = dim // 4
        self.conv1 = nn.Conv2d(3, mid, kernel_size=4, stride=4)
        self.norm1 = ChannelLayerNorm(mid, eps=LN_EPS)
        self.conv2 = nn.Conv2d(mid, mid, kernel_size=2, stride=2)
        self.norm2 = ChannelLayerNorm(mid, eps=LN_EPS)
        self.conv3 = nn.Conv2d(mid, dim, kernel_size=2, stride=2)
        self.act = nn.GELU()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W] -> [B, D, H/16, W/16]``."""
        x = self.act(self.norm1(self.conv1(pixels)))
        x = self.act(self.norm2(self.conv2(x)))
        return self.conv3(x)


class ImageAdapter(nn.Module):
    """``pixels [B, 3, S, S]`` (CLIP-normalised) -> ``[B, (S/16)**2 + 1, D]`` with cls first."""

    def __init__(self, cfg: OnePeaceConfig) -> None:
        super().__init__()
        icfg = cfg.image
        self.grid = icfg.grid
        self.stem = HierarchicalPatchStem(cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(icfg.pos_grid**2 + 1, cfg.embed_dim))
        index = grid_rel_pos_index(icfg.grid)
        self.rel_pos = RelPosBias(index, grid_table_rows(icfg.grid), cfg.heads, cfg.num_rel_pos_tables)

    def patch_embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """hMLP stem output flattened row-major: ``[B, 3, S, S] -> [B, N, D]``."""
        if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[2] != pixels.shape[3]:
            raise ValueError(f"images must be a [B, 3, S, S] tensor, got shape {tuple(pixels.shape)}")
        side = pixels.shape[-1]
        if side != self.grid * 16:
            raise ValueError(
                f"images are {side}x{side} but this model is set up for {self.grid * 16}x{self.grid * 16}; "
                f"load it with image_size={side} to change the resolution"
            )
        pixels = pixels.to(self.stem.conv1.weight.dtype)  # the stem's dtype, also under mixed precision
        return self.stem(pixels).flatten(2).transpose(1, 2)

    def positions(self) -> torch.Tensor:
        """Absolute positions for the current grid, ``[N + 1, D]`` (resized bicubically when needed)."""
        return resize_grid_pos_embed(self.pos_embed, self.grid)

    def forward(self, pixels: torch.Tensor, keep: torch.Tensor | None = None) -> AdapterOutput:
        """Embed images.

        Args:
            pixels: ``[B, 3, S, S]`` normalised images with S = 16 * grid.
            keep: optional ``[B, S_keep]`` kept positions (cls = 0, patches 1..N row-major, -1 = pad).
        """
        patches = self.patch_embed(pixels)  # [B, N, D]
        batch, length = patches.shape[0], patches.shape[1] + 1
        x = torch.cat([self.cls_token.expand(batch, -1, -1).to(patches.dtype), patches], dim=1)
        x = x + self.positions().unsqueeze(0).to(x.dtype)
        if keep is None:
            padding = torch.zeros(batch, length, dtype=torch.bool, device=x.device)
            return AdapterOutput(x, padding, self.rel_pos(length), padded=False)
        check_keep(keep, length, "image")
        return AdapterOutput(gather_kept(x, keep), kept_padding_mask(keep), self.rel_pos(length, fill_padding(keep)))
