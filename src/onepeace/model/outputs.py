"""Typed outputs of adapters, the fusion encoder and the embedding heads.

Shapes: B batch, S sequence length of one modality segment (cls first), S_total the joint length, D width, H heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from onepeace.modality import Modality


@dataclass(frozen=True)
class AdapterOutput:
    """What a modality adapter feeds to the fusion encoder.

    Attributes:
        embedding: ``[B, S, D]`` unit embeddings with the cls vector first and absolute positions added.
        padding_mask: ``[B, S]`` bool, True = padding.
        rel_pos_bias: one ``[B or 1, H, S, S]`` additive bias per relative-position table (1 shared or L per layer).
        padded: False when the adapter knows without reading ``padding_mask`` that no position is padding (whole
            images); the joint bias is then broadcast over the batch.
    """

    embedding: torch.Tensor
    padding_mask: torch.Tensor
    rel_pos_bias: tuple[torch.Tensor, ...]
    padded: bool = True


@dataclass(frozen=True)
class SegmentOutput:
    """One modality's part of an encoder pass.

    Attributes:
        hidden: ``[B, S, D]`` after that modality's final LayerNorm (rows at padding are computed but meaningless).
        padding_mask: ``[B, S]`` bool, True = padding.
    """

    hidden: torch.Tensor
    padding_mask: torch.Tensor


@dataclass(frozen=True)
class Features:
    """Result of one encoder pass over the modalities given; absent modalities are ``None``.

    ``intermediates`` holds the residual stream after every layer (L tensors ``[B, S_total, D]``, before the final
    norms, segments in text-image-audio order) when requested, else an empty tuple.
    """

    text: SegmentOutput | None = None
    image: SegmentOutput | None = None
    audio: SegmentOutput | None = None
    intermediates: tuple[torch.Tensor, ...] = ()

    def __getitem__(self, modality: Modality | str) -> SegmentOutput:
        segment = getattr(self, Modality.parse(modality).value)
        if segment is None:
            raise KeyError(f"this pass did not include {Modality.parse(modality).value}")
        return segment

    @property
    def modalities(self) -> list[Modality]:
        return [m for m in Modality if getattr(self, m.value) is not None]


@dataclass(frozen=True)
class Embeddings:
    """L2-normalised global embeddings ``[B, D]`` per modality; absent modalities are ``None``."""

    text: torch.Tensor | None = None
    image: torch.Tensor | None = None
    audio: torch.Tensor | None = None

    def __getitem__(self, modality: Modality | str) -> torch.Tensor:
        value = getattr(self, Modality.parse(modality).value)
        if value is None:
            raise KeyError(f"no {Modality.parse(modality).value} embedding was computed")
        return value
