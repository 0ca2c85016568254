"""Media conversion for the corpus: images to small PNGs on white, clips to 16 kHz mono FLAC.

Files are written to a temporary name and renamed, so an interrupted build never leaves a half-written file
that a later run would take as done.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from onepeace.errors import require

IMAGE_SIDE = 128
SAMPLE_RATE = 16000


def write_image(src: Path, dst: Path, side: int = IMAGE_SIDE) -> None:
    """Composite ``src`` on white, pad it to a square (centred) and resize to ``side`` x ``side`` PNG at ``dst``."""
    with Image.open(src) as img:
        img.load()
        rgba = img.convert("RGBA")
    width, height = rgba.size
    if width == 0 or height == 0:
        raise ValueError(f"{src}: empty image")
    square = Image.new("RGBA", (max(width, height),) * 2, (255, 255, 255, 255))
    square.alpha_composite(rgba, ((square.width - width) // 2, (square.height - height) // 2))
    out = square.convert("RGB").resize((side, side), Image.BICUBIC)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".part")
    out.save(tmp, format="PNG", optimize=True)
    os.replace(tmp, dst)


def read_clip(src: Path) -> tuple[np.ndarray, float]:
    """Decode a sound file: (float32 samples ``[N]`` or ``[N, C]``, sample rate)."""
    soundfile = require("soundfile", "audio")
    data, rate = soundfile.read(str(src), dtype="float32", always_2d=False)
    return data, float(rate)


def trim_silence(wave: np.ndarray, below_peak_db: float = 50.0, frame: int = 160) -> np.ndarray:
    """Cut leading and trailing frames whose peak is more than ``below_peak_db`` under the clip's peak."""
    peak = float(np.abs(wave).max()) if wave.size else 0.0
    if peak == 0.0:
        return wave
    loud = np.flatnonzero(np.abs(wave) > peak * 10 ** (-below_peak_db / 20))
    start = (loud[0] // frame) * frame
    stop = min(len(wave), (loud[-1] // frame + 1) * frame)
    return wave[start:stop]


def write_clip(samples: np.ndarray, rate: float, dst: Path, max_seconds: float) -> float:
    """Mix ``samples`` to mono, resample to 16 kHz, keep ``max_seconds``, write 16-bit FLAC; returns the duration."""
    soundfile = require("soundfile", "audio")
    soxr = require("soxr", "audio")
    wave = np.asarray(samples, dtype=np.float32)
    if wave.ndim == 2:
        wave = wave.mean(axis=1)
    if wave.ndim != 1 or wave.size == 0:
        raise ValueError(f"{dst.name}: clip has no samples")
    if rate != SAMPLE_RATE:
        wave = soxr.resample(wave, rate, SAMPLE_RATE)
    wave = np.clip(trim_silence(wave)[: int(max_seconds * SAMPLE_RATE)], -1.0, 1.0)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".part")
    soundfile.write(str(tmp), wave, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    os.replace(tmp, dst)
    return len(wave) / SAMPLE_RATE


def clip_duration(path: Path) -> float:
    """Duration in seconds of an existing sound file."""
    soundfile = require("soundfile", "audio")
    return float(soundfile.info(str(path)).duration)
