"""Long clips in windows: which treatments ``embed`` offers, and every window of a list of clips (numpy only)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from onepeace.config import AudioAdapterConfig
from onepeace.data.audio import audio_windows, load_audio
from onepeace.errors import InputError

if TYPE_CHECKING:
    from onepeace.data.audio import AudioInput

LONG_AUDIO = ("first", "windows")
"""How ``embed`` treats clips longer than ``max_duration``: the first window (official), or every window, pooled."""


def check_long_audio(value: str) -> str:
    """``value`` if it is one of :data:`LONG_AUDIO`, else :class:`InputError`."""
    if value not in LONG_AUDIO:
        raise InputError(f"long_audio must be one of {', '.join(LONG_AUDIO)}, got {value!r}")
    return value


def clip_windows(
    clips: Sequence[AudioInput], cfg: AudioAdapterConfig, sample_rate: float | None = None, *, torch_free: bool = False
) -> tuple[list[np.ndarray], list[int]]:
    """Every window (:func:`audio_windows`) of every clip, and for each window the index of its clip."""
    windows: list[np.ndarray] = []
    owner: list[int] = []
    for i, clip in enumerate(clips):
        wave = load_audio(clip, sample_rate=sample_rate, target_rate=cfg.sample_rate, name=f"audio {i}")
        parts = audio_windows(wave, cfg, name=f"audio {i}", torch_free=torch_free)
        windows.extend(parts)
        owner.extend([i] * len(parts))
    return windows, owner
