"""Rendered numerals: the digits 0-9 drawn as numerals ("7") and as words ("seven") in the DejaVu typefaces
(Debian ``fonts-dejavu-core``) and several ink colours, captioned "the number seven" / "the word seven".

They give the image-text stage the digit words that the spoken-digit clips of the audio-text stage are captioned
with (a text branch frozen in stage 2 must already tell "seven" from "eight"), and they link spoken digits to
pictures through the shared concept, for audio -> image retrieval.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from onepeace.corpus.items import SourceItem, ZeroShotTask, cache_dir
from onepeace.corpus.sources.emoji import DIGITS

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSansCondensed-Bold.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "DejaVuSerifCondensed-Italic.ttf",
)
INKS = {
    "black": (20, 20, 20),
    "red": (200, 30, 30),
    "blue": (30, 60, 200),
    "green": (30, 140, 50),
    "orange": (235, 130, 20),
    "purple": (120, 40, 160),
}
FORMS = ("number", "word")
SIDE = 128
NUMERAL_PROMPT = "the number {}"


def _rng_bytes(key: str) -> bytes:
    return hashlib.sha1(key.encode()).digest()


def render(text: str, font_path: Path, ink: tuple[int, int, int], key: str, out: Path) -> None:
    """Draw ``text`` centred (with a small offset and tilt drawn from ``key``) on a white square; atomic write."""
    from PIL import Image, ImageDraw, ImageFont

    noise = _rng_bytes(key)
    size = 96 if len(text) == 1 else max(22, 150 // len(text))
    font = ImageFont.truetype(str(font_path), size)
    canvas = Image.new("RGB", (SIDE * 2, SIDE * 2), "white")
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = SIDE - (left + right) / 2 + (noise[0] % 21 - 10)
    y = SIDE - (top + bottom) / 2 + (noise[1] % 21 - 10)
    draw.text((x, y), text, font=font, fill=ink)
    canvas = canvas.rotate(noise[2] % 31 - 15, resample=Image.BICUBIC, fillcolor="white")
    canvas = canvas.crop((SIDE // 2, SIDE // 2, SIDE * 3 // 2, SIDE * 3 // 2))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.part")
    canvas.save(tmp, format="PNG")
    os.replace(tmp, out)


class NumeralSource:
    """One item per (digit, form, typeface, ink): 10 x 2 x 8 x 6 = 960 pictures."""

    name = "numerals"
    licence = "generated here; DejaVu fonts licence (free, Bitstream Vera derived)"
    origin = "Debian package fonts-dejavu-core, drawn with Pillow"
    description = "the digits drawn as numerals and as words in eight typefaces and six ink colours"

    def __init__(self, font_dir: Path = FONT_DIR, render_dir: Path | None = None) -> None:
        self.font_dir = Path(font_dir)
        self.render_dir = render_dir or cache_dir() / "numerals"

    def prepare(self) -> str | None:
        missing = [f for f in FONTS if not (self.font_dir / f).is_file()]
        if missing:
            return f"{self.font_dir / missing[0]} not found; install it with: apt-get install fonts-dejavu-core"
        return None

    def items(self) -> Iterator[SourceItem]:
        for digit, word in enumerate(DIGITS):
            for form in FORMS:
                for font in FONTS:
                    for ink_name, ink in INKS.items():
                        key = f"{self.name}/{word}_{form}_{Path(font).stem}_{ink_name}"
                        png = self.render_dir / f"{key.split('/', 1)[1]}.png"
                        if not png.is_file():
                            render(str(digit) if form == "number" else word, self.font_dir / font, ink, key, png)
                        caption = f"the {form} {word}"  # the ink is not named: only the digit tells captions apart
                        yield SourceItem(key, caption, images=(png,), concept=word, labels={"numerals": word})

    def tasks(self) -> list[ZeroShotTask]:
        return [ZeroShotTask(name="numerals", modality="image", prompt=NUMERAL_PROMPT, labels=DIGITS)]
