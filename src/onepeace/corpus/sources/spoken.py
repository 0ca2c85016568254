"""Spoken digits synthesised with espeak-ng (Debian ``espeak-ng``): several English voices, voice variants and
speaking rates, so digits are heard from more than FSDD's six speakers."""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from onepeace.corpus.items import SourceItem, ZeroShotTask
from onepeace.corpus.media import read_clip
from onepeace.corpus.sources.emoji import DIGITS
from onepeace.corpus.sources.fsdd import digit_task, spoken_digit_item

VOICES = ("en-gb", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan")
VARIANTS = ("", "+f2", "+m3", "+f4", "+m7")
RATES = (130, 175)


def speak(text: str, voice: str, rate: int) -> tuple[np.ndarray, float]:
    """Render ``text`` with espeak-ng: (samples ``[N]``, sample rate)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "speech.wav"
        cmd = ["espeak-ng", "-v", voice, "-s", str(rate), "-w", str(out), text]
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)
        return read_clip(out)


class SpokenDigitSource:
    """One item per (digit, voice, variant, rate): 10 x 6 x 5 x 2 = 600 utterances."""

    name = "espeak"
    licence = "generated here with espeak-ng (GPL-3.0 program; the audio is synthesised output)"
    origin = "Debian package espeak-ng"
    description = "synthetic speech of the digits zero to nine in several English voices"

    def prepare(self) -> str | None:
        if shutil.which("espeak-ng") is None:
            return "espeak-ng not found; install it with: apt-get install espeak-ng"
        return None

    def items(self) -> Iterator[SourceItem]:
        for digit, word in enumerate(DIGITS):
            for voice in VOICES:
                for variant in VARIANTS:
                    for rate in RATES:
                        render = functools.partial(speak, word, voice + variant, rate)
                        key = f"{self.name}/{word}_{voice}{variant}_{rate}"
                        yield spoken_digit_item(key, digit, render)

    def tasks(self) -> list[ZeroShotTask]:
        return [digit_task()]
