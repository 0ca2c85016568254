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
        num_masked: masked positions in the batch (cls excluded), counted on the host when the view is built
            from CPU tensors (None otherwise), so the denoising loss needs no host sync to size its queries.
    """

    mask: torch.Tensor
    keep: torch.Tensor
    num_masked: int | None = None

    def __post_init__(self) -> None:
        if self.num_masked is None and self.mask.device.type == "cpu":
            object.__setattr__(self, "num_masked", int(self.mask[:, 1:].sum()))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MaskedView:
        """A copy on ``device`` (``non_blocking``: asynchronous copies from pinned memory)."""
        move = {"non_blocking": non_blocking}
        return MaskedView(self.mask.to(device, **move), self.keep.to(device, **move), self.num_masked)

    def pin_memory(self) -> MaskedView:
        """A copy in page-locked host memory (``DataLoader(pin_memory=True)`` calls this)."""
        return MaskedView(self.mask.pin_memory(), self.keep.pin_memory(), self.num_masked)


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
        num_text_tokens: tokens that are not padding (id 1), counted on the host when the batch is built from CPU
            tensors (None otherwise); with ``num_audio_frames`` and the views' ``num_masked`` it lets the
            denoising losses run without host syncs.
        num_audio_frames: audio frames that are not padding (cls column excluded), counted likewise.
    """

    text: torch.Tensor
    image: torch.Tensor | None = None
    audio_waveform: torch.Tensor | None = None
    audio_padding_mask: torch.Tensor | None = None
    views: dict[str, MaskedView] = field(default_factory=dict)
    num_samples: int | None = None
    num_text_tokens: int | None = None
    num_audio_frames: int | None = None

    def __post_init__(self) -> None:
        if self.num_text_tokens is None and self.text.device.type == "cpu":
            object.__setattr__(self, "num_text_tokens", int(self.text.ne(1).sum()))
        pad = self.audio_padding_mask
        if self.num_audio_frames is None and pad is not None and pad.device.type == "cpu":
            object.__setattr__(self, "num_audio_frames", int((~pad[:, 1:].bool()).sum()))

    @property
    def batch_size(self) -> int:
        return self.text.shape[0]

    @property
    def audio(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.audio_waveform is None or self.audio_padding_mask is None:
            return None
        return self.audio_waveform, self.audio_padding_mask

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PretrainBatch:
        """A copy with every tensor on ``device`` (``non_blocking``: asynchronous copies from pinned memory)."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                moved[f.name] = value.to(device, non_blocking=non_blocking)
        moved["views"] = {k: v.to(device, non_blocking) for k, v in self.views.items()}
        return replace(self, **moved)

    def pin_memory(self) -> PretrainBatch:
        """A copy with every tensor in page-locked host memory (``DataLoader(pin_memory=True)`` calls this)."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        moved = {k: v.pin_memory() for k, v in moved.items() if isinstance(v, torch.Tensor)}
        moved["views"] = {k: v.pin_memory() for k, v in self.views.items()}
        return replace(self, **moved)


def pin_memory_for(device: torch.device | str | None = None) -> bool:
    """Whether a loader feeding ``device`` pins its batches: only for a CUDA device (None: when CUDA is available).

    Pinned (page-locked) host batches let ``batch.to(device, non_blocking=True)`` overlap the copy with compute.
    """
    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"
