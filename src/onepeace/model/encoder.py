"""The fusion encoder: joins modality segments into one sequence and runs the shared layers (spec §3.1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from onepeace.modality import Modality, ordered
from onepeace.model.block import FusionBlock, Segments
from onepeace.model.layers import LN_EPS
from onepeace.model.outputs import AdapterOutput, SegmentOutput


@dataclass(frozen=True)
class EncoderOutput:
    """Per-modality outputs after the final norms, and the residual stream after each layer if requested."""

    segments: dict[Modality, SegmentOutput]
    intermediates: tuple[torch.Tensor, ...]


def joint_bias(
    inputs: list[AdapterOutput], padding_mask: torch.Tensor, table: int, dtype: torch.dtype | None = None
) -> torch.Tensor | None:
    """Block-diagonal additive attention bias for table ``table``, built in ``dtype`` (default: the tables').

    Intra-modality blocks hold that adapter's relative-position bias, cross-modal blocks are 0, and every
    padded key column is -inf. Returns ``[B, H, S_total, S_total]``; ``[1, H, S_total, S_total]`` (broadcast over
    the batch) when every adapter bias is ``[1, ...]`` and no adapter may hold padding; None when no adapter has
    a bias.
    """
    if not any(out.rel_pos_bias for out in inputs):
        return None
    padded = any(out.padded for out in inputs)
    rows = max(out.rel_pos_bias[table].shape[0] for out in inputs)
    batch, total = (padding_mask.shape[0] if padded else rows), padding_mask.shape[1]
    heads = inputs[0].rel_pos_bias[0].shape[1]
    dtype = dtype or inputs[0].rel_pos_bias[0].dtype
    bias = torch.zeros(batch, heads, total, total, dtype=dtype, device=padding_mask.device)
    start = 0
    for out in inputs:
        stop = start + out.embedding.shape[1]
        bias[:, :, start:stop, start:stop] = out.rel_pos_bias[table]
        start = stop
    if not padded:
        return bias
    return bias.masked_fill(padding_mask[:, None, None, :], float("-inf"))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype attention runs in for input ``x``: the autocast dtype when autocast is on, else ``x.dtype``."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class FusionEncoder(nn.Module):
    """Shared-attention layers with per-modality FFNs and per-modality final LayerNorms."""

    def __init__(
        self,
        dim: int,
        layers: int,
        heads: int,
        ffn_dim: int,
        modalities: tuple[Modality, ...],
        layer_scale_init: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        rates = [drop_path_rate * i / (layers - 1) for i in range(layers)] if layers > 1 else [0.0]
        self.layers = nn.ModuleList(
            FusionBlock(dim, heads, ffn_dim, modalities, layer_scale_init, rate) for rate in rates
        )
        self.final_norms = nn.ModuleDict({m.value: nn.LayerNorm(dim, eps=LN_EPS) for m in modalities})
        self.grad_checkpointing = False

    def forward(self, inputs: dict[Modality, AdapterOutput], return_intermediates: bool = False) -> EncoderOutput:
        """Run one joint pass.

        Args:
            inputs: adapter outputs keyed by modality (joint order is text, image, audio whatever the dict order).
            return_intermediates: also return the residual stream ``[B, S_total, D]`` after every layer.
        """
        mods = ordered(inputs)
        parts = [inputs[m] for m in mods]
        segments: Segments = []
        start = 0
        for m, out in zip(mods, parts):
            segments.append((m, slice(start, start + out.embedding.shape[1])))
            start += out.embedding.shape[1]
        x = torch.cat([p.embedding for p in parts], dim=1)  # [B, S_total, D]
        padding = torch.cat([p.padding_mask for p in parts], dim=1)  # [B, S_total]
        x = x * (~padding).unsqueeze(-1).to(x.dtype)
        num_tables = {len(p.rel_pos_bias) for p in parts}
        if len(num_tables) != 1:
            raise ValueError(f"adapters disagree on the number of relative-position tables: {sorted(num_tables)}")
        dtype = compute_dtype(x)
        biases = [joint_bias(parts, padding, k, dtype) for k in range(max(num_tables.pop(), 1))]  # once per pass
        states = []
        for i, layer in enumerate(self.layers):
            bias = biases[i] if len(biases) == len(self.layers) else biases[0]
            x = self._run_layer(layer, x, bias, segments)
            if return_intermediates:
                states.append(x)
        result = {m: SegmentOutput(self.final_norms[m.value](x[:, rows]), padding[:, rows]) for m, rows in segments}
        return EncoderOutput(result, tuple(states))

    def _run_layer(self, layer: FusionBlock, x: torch.Tensor, bias, segments: Segments) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(layer, x, bias, segments, use_reentrant=False)
        return layer(x, bias, segments)
