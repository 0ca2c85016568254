"""Modality adapters: turn raw model inputs into unit embeddings for the fusion encoder."""

from __future__ import annotations

from torch import nn

from onepeace.config import OnePeaceConfig
from onepeace.modality import Modality
from onepeace.model.adapters.audio import AudioAdapter
from onepeace.model.adapters.image import ImageAdapter
from onepeace.model.adapters.text import TextAdapter

ADAPTERS: dict[Modality, type[nn.Module]] = {
    Modality.TEXT: TextAdapter,
    Modality.IMAGE: ImageAdapter,
    Modality.AUDIO: AudioAdapter,
}


def build_adapter(modality: Modality, cfg: OnePeaceConfig) -> nn.Module:
    """The adapter of ``modality`` for model config ``cfg``."""
    return ADAPTERS[modality](cfg)


__all__ = ["ADAPTERS", "AudioAdapter", "ImageAdapter", "TextAdapter", "build_adapter"]
