"""Typed pretraining batches: the tensors a pretraining objective consumes (spec §5.4, §6)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

#: Names of the masked views per stage. Stage 1 (image-text): text-only, image-only and the joint views;
#: stage 2 (audio-text): audio-only and the joint views.
VIEWS_STAGE1: tuple[str, ...] = ("text", "image", "vl_text", "vl_image")
VIEWS_STAGE2: tuple[str, ...] = ("audio", "al_text", "al_audio")


@dataclass(frozen=True)
class MaskedView:
    """One masked view of one modality for the denoising loss.

    Attributes:
        mask: ``[B, S]`` bool over the full cls-prefixed sequence, True = masked (cls and eos never; padding False).
        keep: ``[B, S_keep]`` int64 visible positions, ascending, cls (0) first, right-padded with -1.
    """

    mask: torch.Tensor
    keep: torch.Tensor

    def to(self, device: torch.device | str) -> MaskedView:
        return MaskedView(self.mask.to(device), self.keep.to(device))


@dataclass(frozen=True)
class PretrainBatch:
    """A collated pretraining batch; sample i of every modality belongs to text i.

    Attributes:
        text: ``[B, n]`` token ids (no bos, eos included, right-padded with 1).
        image: ``[B, 3, S, S]`` normalised pixels (stage 1) or None.
        audio_waveform: ``[B, N]`` standardised 16 kHz waveforms (stage 2) or None.
        audio_padding_mask: ``[B, T + 1]`` bool, True = padding (stage 2) or None.
        views: masked views keyed by the names in :data:`VIEWS_STAGE1` / :data:`VIEWS_STAGE2`.
        num_samples: real samples in the batch (duplicates added to even out ranks are not counted).
    """

    text: torch.Tensor
    image: torch.Tensor | None = None
    audio_waveform: torch.Tensor | None = None
    audio_padding_mask: torch.Tensor | None = None
    views: dict[str, MaskedView] = field(default_factory=dict)
    num_samples: int | None = None

    @property
    def batch_size(self) -> int:
        return self.text.shape[0]

    @property
    def audio(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.audio_waveform is None or self.audio_padding_mask is None:
            return None
        return self.audio_waveform, self.audio_padding_mask

    def to(self, device: torch.device | str) -> PretrainBatch:
        """A copy with every tensor on ``device``."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                moved[f.name] = value.to(device)
        moved["views"] = {k: v.to(device) for k, v in self.views.items()}
        return replace(self, **moved)
