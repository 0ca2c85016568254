"""Typed fine-tuning batches: model inputs plus the targets of a task. B examples, K answer choices (AQA)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch


@dataclass(frozen=True)
class TaskBatch:
    """A collated batch of one task; fields a task does not use are None.

    Attributes:
        ids: the examples' ids from the TSV (``uniq_id``, ``image_id`` or the row number), length B.
        text: ``[B, n]`` token ids (eos last, right-padded with 1); AQA: ``[B * K, n]``, choice k of example b at
            row ``b * K + k``.
        image: ``[B, 3, S, S]`` normalised pixels; NLVR2: the first image.
        image2: ``[B, 3, S, S]`` the second image of NLVR2.
        audio_waveform: ``[B, N]`` standardised 16 kHz waveforms.
        audio_padding_mask: ``[B, T + 1]`` bool, True = padding.
        labels: ``[B]`` int64 class index (CLASSIFY, NLVR2, IMAGE_CLASSIFY) or correct choice (AQA).
        soft_targets: ``[B, C]`` float targets: multi-hot (FSD50K), answer confidences (VQA), mixed labels
            (mixup / cutmix).
        boxes: ``[B, 4]`` target boxes as normalised ``(x0, y0, x1, y1)`` in ``[0, 1]`` (grounding).
        original_sizes: ``[B, 2]`` float ``(width, height)`` of the original images in pixels (grounding).
        group: ``[B]`` int64 id of the media item (retrieval: rows sharing an image or clip share the id).
        num_choices: K for AQA, else 1.
        skipped: bad records replaced in this batch, by reason.
    """

    ids: tuple[str, ...]
    text: torch.Tensor | None = None
    image: torch.Tensor | None = None
    image2: torch.Tensor | None = None
    audio_waveform: torch.Tensor | None = None
    audio_padding_mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    soft_targets: torch.Tensor | None = None
    boxes: torch.Tensor | None = None
    original_sizes: torch.Tensor | None = None
    group: torch.Tensor | None = None
    num_choices: int = 1
    skipped: tuple[tuple[str, int], ...] = ()

    @property
    def batch_size(self) -> int:
        return len(self.ids)

    @property
    def audio(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(waveform, padding_mask)`` or None."""
        if self.audio_waveform is None or self.audio_padding_mask is None:
            return None
        return self.audio_waveform, self.audio_padding_mask

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TaskBatch:
        """A copy with every tensor on ``device`` (``non_blocking``: asynchronous copies from pinned memory)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> TaskBatch:
        """A copy with every tensor in page-locked host memory (``DataLoader(pin_memory=True)`` calls this)."""
        return self._map(torch.Tensor.pin_memory)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> TaskBatch:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: fn(v) for k, v in values.items() if isinstance(v, torch.Tensor)})
