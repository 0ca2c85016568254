"""Free Spoken Digit Dataset (FSDD, github.com/Jakobovski/free-spoken-digit-dataset): 3,000 recordings of six
speakers saying the digits 0-9, 8 kHz WAV. Given as its ``recordings.tar.gz`` release or an unpacked folder."""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

from onepeace.corpus.items import SourceItem, ZeroShotTask, cache_dir
from onepeace.corpus.sources.emoji import DIGITS
from onepeace.errors import InputError

DIGIT_PROMPT = "the number {}"
SPOKEN_DIGIT_TEXT = "a voice saying the number {}"


def digit_task() -> ZeroShotTask:
    """Zero-shot spoken-digit classification, shared by every source of spoken digits."""
    return ZeroShotTask(name="digits", modality="audio", prompt=DIGIT_PROMPT, labels=DIGITS)


def spoken_digit_item(key: str, digit: int, audio: object) -> SourceItem:
    """An item for one utterance of ``digit`` (0-9)."""
    word = DIGITS[digit]
    return SourceItem(
        key=key,
        caption=SPOKEN_DIGIT_TEXT.format(word),
        audio=audio,  # type: ignore[arg-type]
        concept=word,
        labels={"digits": word},
    )


class FsddSource:
    """One item per recording ``{digit}_{speaker}_{index}.wav``."""

    name = "fsdd"
    licence = "CC-BY-SA-4.0"
    origin = "Free Spoken Digit Dataset (Jakobovski/free-spoken-digit-dataset), recordings.tar.gz"
    description = "real recordings of six speakers saying the digits zero to nine"

    def __init__(self, path: Path | None = None) -> None:
        given = path or (Path(os.environ["ONEPEACE_FSDD"]) if os.environ.get("ONEPEACE_FSDD") else None)
        if given is not None and not Path(given).exists():
            source = "--fsdd" if path else "ONEPEACE_FSDD"
            raise InputError(f"{source} names {given}, which does not exist")
        self.path = Path(given) if given else None
        self.folder: Path | None = None

    def prepare(self) -> str | None:
        if self.path is None:
            return "not given; pass --fsdd PATH (its recordings.tar.gz or the unpacked recordings folder)"
        if self.path.is_dir():
            self.folder = self.path
            return None
        if not self.path.is_file():
            return f"{self.path} not found"
        target = cache_dir() / "fsdd"
        if not (target / "recordings").is_dir():
            print(f"fsdd: unpacking {self.path} into {target}", flush=True)
            target.mkdir(parents=True, exist_ok=True)
            with tarfile.open(self.path) as tar:
                members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".wav")]
                tar.extractall(target, members=members, filter="data")
        self.folder = target / "recordings"
        return None if self.folder.is_dir() else f"{self.path} holds no recordings/ folder"

    def items(self) -> Iterator[SourceItem]:
        if self.folder is None:
            raise RuntimeError("FsddSource.prepare() must succeed before items()")
        for wav in sorted(self.folder.glob("*.wav")):
            digit, speaker, index = wav.stem.split("_")
            if digit.isdigit() and 0 <= int(digit) <= 9:
                yield spoken_digit_item(f"{self.name}/{digit}_{speaker}_{index}", int(digit), wav)

    def tasks(self) -> list[ZeroShotTask]:
        return [digit_task()]
