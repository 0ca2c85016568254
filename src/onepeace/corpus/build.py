"""``onepeace data build-demo``: convert the items of every available source and write the corpus files.

Idempotent: media already converted are kept (they are written atomically), the TSV, JSONL and JSON files are
rewritten from the items each time, so a second run over a finished corpus only re-reads it.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from onepeace.corpus import media
from onepeace.corpus.items import Source, SourceItem, ZeroShotTask, is_heldout
from onepeace.corpus.writer import CorpusRows, write_corpus_files

SPLITS = ("train", "heldout")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class BuildOptions:
    """What to build."""

    heldout_fraction: float = 0.15
    splits: tuple[str, ...] = SPLITS
    """Splits to write (the demo builds only ``heldout``)."""
    limit: int | None = None
    """At most this many items per source and split (in key order), for a small corpus."""
    max_seconds: float = 4.0
    """Clips are cut to this length."""
    image_side: int = media.IMAGE_SIDE
    progress: bool = True

    def __post_init__(self) -> None:
        unknown = sorted(set(self.splits) - set(SPLITS))
        if unknown or not self.splits:
            raise ValueError(f"splits must be a non-empty subset of {SPLITS}, got {self.splits}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be a positive number of items, got {self.limit}")
        if self.max_seconds <= 0:
            raise ValueError(f"max_seconds must be positive, got {self.max_seconds}")
        is_heldout("", self.heldout_fraction)  # validates the fraction


@dataclass
class SourceReport:
    """What one source contributed."""

    name: str
    licence: str
    origin: str
    description: str
    status: str = "ok"
    """``ok`` or ``skipped: <reason>``."""
    items: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    images: int = 0
    clips: int = 0
    seconds: float = 0.0
    failed: int = 0
    """Items left out because their media could not be read."""

    def count(self, split: str, record: dict[str, Any]) -> None:
        """Add one written item (its JSONL record) to the counts."""
        self.items[split] += 1
        self.images += len(record["images"])
        self.clips += record["audio"] is not None
        self.seconds += record["duration"] or 0.0


def _media_path(key: str, suffix: str) -> str:
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"unsafe item key {key!r}")
    return "media/" + key + suffix


def _progress(items: list[Any], desc: str, enabled: bool) -> Iterable[Any]:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="item", file=sys.stderr, dynamic_ncols=True)


def _convert(item: SourceItem, out: Path, options: BuildOptions) -> dict[str, Any]:
    """Write the item's media under ``out`` (skipping files already there); returns its JSONL record."""
    images = []
    for i, src in enumerate(item.images):
        rel = _media_path(item.key, f".{i}.png")
        if not (out / rel).is_file():
            media.write_image(Path(src), out / rel, options.image_side)
        images.append(rel)
    audio, duration = None, None
    if item.audio is not None:
        audio = _media_path(item.key, ".flac")
        if (out / audio).is_file():
            duration = media.clip_duration(out / audio)
        else:
            samples, rate = media.read_clip(item.audio) if isinstance(item.audio, Path) else item.audio()
            duration = media.write_clip(samples, rate, out / audio, options.max_seconds)
    return {
        "item": item.key,
        "caption": item.caption,
        "images": images,
        "audio": audio,
        "audio_text": (item.audio_text or item.caption) if audio else None,
        "concept": item.concept,
        "labels": dict(item.labels),
        "duration": round(duration, 3) if duration is not None else None,
    }


def _selected(source: Source, options: BuildOptions) -> list[tuple[str, SourceItem]]:
    """(split, item) pairs of a prepared source, after the split filter and the per-split limit."""
    chosen: list[tuple[str, SourceItem]] = []
    taken = dict.fromkeys(SPLITS, 0)
    for item in source.items():
        split = "heldout" if is_heldout(item.key, options.heldout_fraction) else "train"
        if split in options.splits and (options.limit is None or taken[split] < options.limit):
            taken[split] += 1
            chosen.append((split, item))
    return chosen


def _build_source(source: Source, out: Path, options: BuildOptions, rows: CorpusRows) -> SourceReport:
    report = SourceReport(source.name, source.licence, source.origin, source.description)
    reason = source.prepare()
    if reason is not None:
        report.status = f"skipped: {reason}"
        print(f"{source.name}: skipped ({reason})", file=sys.stderr, flush=True)
        return report
    for split, item in _progress(_selected(source, options), source.name, options.progress):
        try:
            record = _convert(item, out, options)
        except Exception as exc:  # a corrupt or unreadable file leaves out one item, never the build
            report.failed += 1
            print(f"{source.name}: left out {item.key}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            continue
        record["source"] = source.name
        rows.add(split, record)
        report.count(split, record)
    return report


def _count_unbuilt_splits(out: Path, options: BuildOptions, reports: list[SourceReport]) -> None:
    """Add the items of splits this run left alone (written by an earlier build) to the reports, so that the
    manifest and SOURCES.md always describe every file in ``out``."""
    by_name = {r.name: r for r in reports}
    for split in SPLITS:
        path = out / f"items_{split}.jsonl"
        if split in options.splits or not path.is_file():
            continue
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                record = json.loads(line)
                if record.get("source") in by_name:
                    by_name[record["source"]].count(split, record)


def build_demo_corpus(out: str | os.PathLike, sources: list[Source], options: BuildOptions) -> list[SourceReport]:
    """Build (or bring up to date) the corpus in ``out`` from ``sources``; returns one report per source."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = CorpusRows()
    reports, tasks = [], {}
    for source in sources:
        report = _build_source(source, out, options, rows)
        reports.append(report)
        if report.status == "ok" and sum(report.items.values()):
            tasks.update({task.name: task for task in source.tasks()})
    if not rows.total():
        raise RuntimeError("no source gave any item; see the messages above for how to install the sources")
    _count_unbuilt_splits(out, options, reports)
    manifest = {
        "format": FORMAT_VERSION,
        "heldout_fraction": options.heldout_fraction,
        "split_rule": "sha1(item key)[:8] as an integer < heldout_fraction * 2**32 -> heldout",
        "options": {k: v for k, v in asdict(options).items() if k != "progress"},
        "sources": [asdict(r) for r in reports],
    }
    write_corpus_files(out, rows, _task_table(tasks.values()), manifest, reports)
    return reports


def _task_table(tasks: Iterable[ZeroShotTask]) -> dict[str, Any]:
    return {t.name: {"modality": t.modality, "prompt": t.prompt, "labels": list(t.labels)} for t in tasks}
