"""Rebuild ``tests/data/tiny_pairs`` from Debian's ``tuxpaint-stamps-default`` package.

48 stamps that have a caption and a sound effect: each gives an image-text pair (64x64 PNG on white) and an
audio-text pair (the effect as 16 kHz mono Ogg Vorbis, at most 2 s). Run from the repository root after
``apt-get install tuxpaint-stamps-default``: ``python tests/data/build_tiny_pairs.py``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
from PIL import Image

STAMPS = Path("/usr/share/tuxpaint/stamps")
OUT = Path(__file__).parent / "tiny_pairs"
COUNT, SIDE, RATE, SECONDS = 48, 64, 16000, 2.0


def candidates() -> list[tuple[Path, Path, str]]:
    found = []
    for png in sorted(STAMPS.rglob("*.png")):
        caption_file, sound = png.with_suffix(".txt"), png.with_suffix(".ogg")
        if caption_file.is_file() and sound.is_file():
            caption = caption_file.read_text(encoding="utf-8", errors="replace").splitlines()[0].strip()
            if caption:
                found.append((png, sound, caption))
    return found[:COUNT]


def write_image(src: Path, dst: Path) -> None:
    rgba = Image.open(src).convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    canvas.alpha_composite(rgba)
    canvas.convert("RGB").resize((SIDE, SIDE), Image.BICUBIC).save(dst, optimize=True)


def write_audio(src: Path, dst: Path) -> float:
    data, rate = sf.read(src, dtype="float32", always_2d=True)
    mono = soxr.resample(data.mean(axis=1), rate, RATE)[: int(SECONDS * RATE)]
    sf.write(dst, np.asarray(mono, dtype=np.float32), RATE, format="OGG", subtype="VORBIS")
    return len(mono) / RATE


def main() -> None:
    (OUT / "images").mkdir(parents=True, exist_ok=True)
    (OUT / "audio").mkdir(parents=True, exist_ok=True)
    image_rows, audio_rows = [], []
    for i, (png, sound, caption) in enumerate(candidates()):
        name = png.stem
        write_image(png, OUT / "images" / f"{name}.png")
        duration = write_audio(sound, OUT / "audio" / f"{name}.ogg")
        image_rows.append([i, f"images/{name}.png", caption])
        audio_rows.append([i, f"audio/{name}.ogg", caption, f"{duration:.3f}"])
    for file, header, rows in (
        ("image_text.tsv", ["image_id", "image", "caption"], image_rows),
        ("audio_text.tsv", ["uniq_id", "audio", "text", "duration"], audio_rows),
    ):
        with open(OUT / file, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, delimiter="\t", lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)
    print(f"wrote {len(image_rows)} image-text and {len(audio_rows)} audio-text pairs to {OUT}")


if __name__ == "__main__":
    main()
