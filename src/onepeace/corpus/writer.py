"""Writing the corpus files: the official TSVs, the item JSONL, tasks.json, manifest.json and SOURCES.md.

Each file is written to a temporary name and renamed, so readers never see a half-written file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

IMAGE_HEADER = ("image_id", "image", "caption")
AUDIO_HEADER = ("uniq_id", "audio", "text", "duration")


def clean_text(text: str) -> str:
    """One line of text for a TSV field: whitespace runs (tabs, newlines) become single spaces."""
    return " ".join(str(text).split())


class CorpusRows:
    """Item records per split, in the order they were added."""

    def __init__(self) -> None:
        self.records: dict[str, list[dict[str, Any]]] = {}

    def add(self, split: str, record: dict[str, Any]) -> None:
        for key in ("caption", "audio_text"):
            if record.get(key) is not None:
                record[key] = clean_text(record[key])
        if not record["caption"]:
            raise ValueError(f"item {record['item']} has an empty caption")
        self.records.setdefault(split, []).append(record)

    def total(self) -> int:
        return sum(len(r) for r in self.records.values())


def _atomic(path: Path, write: Callable[[IO[str]], None]) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        write(fh)
    os.replace(tmp, path)


def _tsv(path: Path, header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
    def write(fh: IO[str]) -> None:
        for row in (header, *rows):
            fh.write("\t".join(str(v) for v in row) + "\n")

    _atomic(path, write)


def _pairs(records: list[dict[str, Any]]) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    image_rows: list[tuple[Any, ...]] = []
    audio_rows: list[tuple[Any, ...]] = []
    for record in records:
        for image in record["images"]:
            image_rows.append((len(image_rows), image, record["caption"]))
        if record["audio"]:
            audio_rows.append((len(audio_rows), record["audio"], record["audio_text"], f"{record['duration']:.3f}"))
    return image_rows, audio_rows


def _sources_markdown(reports: list[Any]) -> str:
    lines = [
        "# Sources of this corpus",
        "",
        "Written by `onepeace data build-demo`. Counts are items (train / held-out), images and clips written.",
        "",
        "| source | status | licence | origin | items (train / held-out) | images | clips | audio seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        items = f"{r.items['train']} / {r.items['heldout']}"
        status = r.status if not r.failed else f"{r.status} ({r.failed} unreadable left out)"
        lines.append(
            f"| {r.name} | {status} | {r.licence} | {r.origin} | {items} | {r.images} | {r.clips} | {r.seconds:.0f} |"
        )
    lines += ["", "What each source is:", ""]
    lines += [f"* **{r.name}**: {r.description}." for r in reports]
    return "\n".join(lines) + "\n"


def write_corpus_files(
    out: Path, rows: CorpusRows, tasks: dict[str, Any], manifest: dict[str, Any], reports: list[Any]
) -> None:
    """Write every corpus file of ``out`` except the media."""
    for split in ("train", "heldout"):
        records = rows.records.get(split, [])
        if not records and split not in rows.records:
            continue
        image_rows, audio_rows = _pairs(records)
        _tsv(out / f"image_text_{split}.tsv", IMAGE_HEADER, image_rows)
        _tsv(out / f"audio_text_{split}.tsv", AUDIO_HEADER, audio_rows)
        _atomic(out / f"items_{split}.jsonl", lambda fh, r=records: fh.writelines(json.dumps(x) + "\n" for x in r))
    _atomic(out / "tasks.json", lambda fh: json.dump(tasks, fh, indent=2))
    _atomic(out / "manifest.json", lambda fh: json.dump(manifest, fh, indent=2))
    _atomic(out / "SOURCES.md", lambda fh: fh.write(_sources_markdown(reports)))
