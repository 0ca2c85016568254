"""Tux Paint stamps (Debian ``tuxpaint-stamps-default``): photo-like cut-outs with English captions, some with
their sound effect (image-audio-text triples)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from onepeace.corpus.items import SourceItem, ZeroShotTask, concept_of

STAMPS_DIR = Path("/usr/share/tuxpaint/stamps")
SOUND_SUFFIXES = (".ogg", ".wav")


def read_caption(path: Path) -> str:
    """The English caption: the first line of a stamp's ``.txt`` file ("" when empty)."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return lines[0].strip() if lines else ""


class TuxPaintSource:
    """PNG stamps that have a caption; ``audio`` is the stamp's own sound effect when it has one."""

    name = "tuxpaint"
    licence = "GPL-2.0"
    origin = "Debian package tuxpaint-stamps-default (Tux Paint stamps)"
    description = "photo-like cut-out images with human-written captions; some stamps have a real sound effect"

    def __init__(self, root: Path = STAMPS_DIR) -> None:
        self.root = Path(root)

    def prepare(self) -> str | None:
        if self.root.is_dir():
            return None
        return f"{self.root} not found; install it with: apt-get install tuxpaint-stamps-default"

    def items(self) -> Iterator[SourceItem]:
        for png in sorted(self.root.rglob("*.png")):
            caption_file = png.with_suffix(".txt")
            if not caption_file.is_file():
                continue
            caption = read_caption(caption_file)
            if not caption:
                continue
            sound = next((s for s in map(png.with_suffix, SOUND_SUFFIXES) if s.is_file()), None)
            key = png.relative_to(self.root).with_suffix("").as_posix()
            yield SourceItem(
                key=f"{self.name}/{key}", caption=caption, images=(png,), audio=sound, concept=concept_of(caption)
            )

    def tasks(self) -> list[ZeroShotTask]:
        return []
