"""The pretraining decoder: predicts encoder features at masked units (spec §2.5 decoder mode, §5.3).

Visible encoder outputs are projected to the decoder width and scattered back to their positions, masked positions
get a learned mask token, decoder absolute positions are added, two fusion layers (no relative bias, no attention
mask, no LayerScale) run over the sequence, and a head projects every position back to the encoder width. The
decoder exists only for pretraining.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from onepeace.config import OnePeaceConfig
from onepeace.modality import Modality
from onepeace.model.encoder import FusionEncoder
from onepeace.model.outputs import AdapterOutput
from onepeace.model.position import resize_grid_pos_embed


@dataclass(frozen=True)
class DecoderConfig:
    """Sizes of the pretraining decoder (official: width 768, 2 layers, 12 heads, GeGLU 2048)."""

    embed_dim: int = 768
    layers: int = 2
    heads: int = 12
    ffn_dim: int = 2048
    audio_positions: int = 1026
    """Rows of the learned audio position table."""


@dataclass(frozen=True)
class DecoderInput:
    """One modality segment for the decoder.

    Attributes:
        visible: ``[B, S_keep, D]`` encoder outputs (after the final norm) at the kept positions.
        keep: ``[B, S_keep]`` kept positions into the full sequence (cls first, -1 = padding).
        padding_mask: ``[B, S]`` bool over the full sequence (True = padding); ``S`` is the full length.
    """

    visible: torch.Tensor
    keep: torch.Tensor
    padding_mask: torch.Tensor


class PretrainDecoder(nn.Module):
    """Mask-token decoder over the modalities of one pretraining stage."""

    def __init__(self, cfg: OnePeaceConfig, dcfg: DecoderConfig, modalities: tuple[Modality, ...]) -> None:
        super().__init__()
        dim = dcfg.embed_dim
        self.image_grid = cfg.image.grid
        self.embed_in = nn.ModuleDict({m.value: nn.Linear(cfg.embed_dim, dim) for m in modalities})
        self.mask_tokens = nn.ParameterDict({m.value: nn.Parameter(torch.zeros(1, dim)) for m in modalities})
        rows = {
            Modality.TEXT: cfg.text.max_positions,
            Modality.IMAGE: cfg.image.pos_grid**2 + 1,
            Modality.AUDIO: dcfg.audio_positions,
        }
        self.positions = nn.ParameterDict({m.value: nn.Parameter(torch.zeros(rows[m], dim)) for m in modalities})
        self.encoder = FusionEncoder(dim, dcfg.layers, dcfg.heads, dcfg.ffn_dim, modalities)
        self.heads = nn.ModuleDict({m.value: nn.Linear(dim, cfg.embed_dim) for m in modalities})

    def _positions(self, modality: Modality, length: int) -> torch.Tensor:
        table = self.positions[modality.value]
        if modality is Modality.IMAGE:
            return resize_grid_pos_embed(table, self.image_grid)[:length]
        return table[:length]

    def _full_sequence(self, modality: Modality, seg: DecoderInput) -> torch.Tensor:
        """Mask tokens everywhere, projected visible units scattered to their positions: ``[B, S, d]``."""
        batch, length = seg.padding_mask.shape
        visible = self.embed_in[modality.value](seg.visible)  # [B, S_keep, d]
        token = self.mask_tokens[modality.value].to(visible.dtype)
        index = seg.keep.masked_fill(seg.keep < 0, length)  # [B, S_keep]; a spare column S takes the -1 padding
        placed = visible.new_zeros(batch, length + 1, visible.shape[-1])
        placed = placed.scatter(1, index.unsqueeze(-1).expand_as(visible), visible)[:, :length]  # [B, S, d]
        kept = torch.zeros(batch, length + 1, dtype=torch.bool, device=index.device).scatter(1, index, True)
        # where() hands the mask token a contiguous [B, S, d] gradient with zeros at the kept positions, so its
        # sum runs in the same order as for an in-place index_put (no host sync here, the same bits there)
        full = torch.where(kept[:, :length, None], placed, token.expand(batch, length, -1))
        return full + self._positions(modality, length).unsqueeze(0).to(visible.dtype)

    def forward(self, inputs: dict[Modality, DecoderInput]) -> dict[Modality, torch.Tensor]:
        """Predict encoder-width features at every position.

        Returns:
            per modality ``[B, S, D]`` (D = encoder width), cls position included.
        """
        segments = {m: AdapterOutput(self._full_sequence(m, seg), seg.padding_mask, ()) for m, seg in inputs.items()}
        out = self.encoder(segments).segments
        return {m: self.heads[m.value](out[m].hidden) for m in out}
