"""Reading the held-out split of a demo-format corpus folder (docs/demo_corpus.md).

:func:`load_corpus` checks every record of ``items_heldout.jsonl`` (known keys, types, non-empty texts, media
files that exist) and of ``tasks.json``, and that item labels fit the tasks. Errors name the file and line.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onepeace.corpus.items import ZeroShotTask
from onepeace.errors import InputError

ITEMS_FILE = "items_heldout.jsonl"
TASKS_FILE = "tasks.json"
TASK_MODALITIES = ("image", "audio")
_ITEM_KEYS = ("item", "source", "caption", "images", "audio", "audio_text", "concept", "labels", "duration")
_TASK_KEYS = ("modality", "prompt", "labels")


@dataclass(frozen=True)
class HeldoutItem:
    """One held-out item as evaluated: media paths are the corpus folder joined with the record's paths."""

    key: str
    caption: str
    image: Path | None
    audio: Path | None
    audio_text: str | None
    concept: str | None
    labels: Mapping[str, str]
    line: int


@dataclass(frozen=True)
class HeldoutCorpus:
    """The held-out split of a corpus folder; ``tasks`` is None when the folder has no ``tasks.json``."""

    root: Path
    items: tuple[HeldoutItem, ...]
    tasks: tuple[ZeroShotTask, ...] | None


def _text(record: Mapping[str, Any], key: str, where: str, required: bool) -> str | None:
    value = record.get(key)
    if value is None:
        if required:
            raise InputError(f"{where}: {key!r} is missing" if key not in record else f"{where}: {key!r} is null")
        return None
    if not isinstance(value, str):
        raise InputError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise InputError(f"{where}: {key!r} is empty")
    return value.strip()


def _media(root: Path, value: Any, where: str, what: str) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{where}: {what} must be a media path string, got {value!r}")
    path = root / value
    if not path.is_file():
        raise FileNotFoundError(f"{where}: {what} {value} not found ({path})")
    return path


def _parse_item(record: Any, root: Path, where: str, line: int) -> HeldoutItem:
    """One JSONL record -> :class:`HeldoutItem`; checks keys, types and that the media files exist."""
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - set(_ITEM_KEYS))
    if unknown:
        raise InputError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; known: {', '.join(_ITEM_KEYS)}")
    key = _text(record, "item", where, required=True)
    caption = _text(record, "caption", where, required=True)
    images = record.get("images") or []
    if not isinstance(images, list):
        raise InputError(f"{where}: 'images' must be a list of media paths, got {type(images).__name__}")
    image_paths = [_media(root, image, where, "image") for image in images]
    audio = None if record.get("audio") is None else _media(root, record["audio"], where, "clip")
    audio_text = _text(record, "audio_text", where, required=False)
    _text(record, "source", where, required=False)
    duration = record.get("duration")
    if duration is not None and (isinstance(duration, bool) or not isinstance(duration, int | float)):
        raise InputError(f"{where}: 'duration' must be a number of seconds or null, got {duration!r}")
    labels = record.get("labels") or {}
    if not isinstance(labels, dict) or not all(isinstance(v, str) and v for v in labels.values()):
        raise InputError(f"{where}: 'labels' must map task names to label strings, got {labels!r}")
    return HeldoutItem(
        key=key,
        caption=caption,
        image=image_paths[0] if image_paths else None,
        audio=audio,
        audio_text=(audio_text or caption) if audio is not None else None,
        concept=_text(record, "concept", where, required=False),
        labels=dict(labels),
        line=line,
    )


def read_items(root: str | Path) -> tuple[HeldoutItem, ...]:
    """The records of ``root/items_heldout.jsonl``; bad records raise errors naming the file and line."""
    root = Path(root)
    path = root / ITEMS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: held-out item file not found (build a corpus with: onepeace data build-demo)")
    items: list[HeldoutItem] = []
    seen: dict[str, int] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not a UTF-8 text file ({exc.reason})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: not valid JSON ({exc.msg})") from None
        item = _parse_item(record, root, where, number)
        if item.key in seen:
            raise InputError(f"{where}: item {item.key!r} already appears on line {seen[item.key]}")
        seen[item.key] = number
        items.append(item)
    if not items:
        raise InputError(f"{path}: no held-out items")
    return tuple(items)


def _parse_task(name: str, spec: Any, where: str) -> ZeroShotTask:
    if not isinstance(spec, dict):
        raise InputError(f"{where}: task {name!r} must be an object with keys {', '.join(_TASK_KEYS)}")
    unknown = sorted(set(spec) - set(_TASK_KEYS))
    missing = sorted(set(_TASK_KEYS) - set(spec))
    if unknown or missing:
        problem = f"unknown key(s) {unknown}" if unknown else f"missing key(s) {missing}"
        raise InputError(f"{where}: task {name!r}: {problem}; expected {', '.join(_TASK_KEYS)}")
    modality, prompt, labels = spec["modality"], spec["prompt"], spec["labels"]
    if modality not in TASK_MODALITIES:
        raise InputError(f"{where}: task {name!r}: modality must be one of {TASK_MODALITIES}, got {modality!r}")
    if not isinstance(prompt, str) or prompt.count("{}") != 1:
        raise InputError(f"{where}: task {name!r}: prompt must be a string with one '{{}}', got {prompt!r}")
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x.strip() for x in labels):
        raise InputError(f"{where}: task {name!r}: labels must be a non-empty list of non-empty strings")
    if len(set(labels)) != len(labels):
        raise InputError(f"{where}: task {name!r}: labels are not distinct")
    return ZeroShotTask(name=name, modality=modality, prompt=prompt, labels=tuple(labels))


def read_tasks(root: str | Path) -> tuple[ZeroShotTask, ...] | None:
    """The zero-shot tasks of ``root/tasks.json``, or None when the file does not exist."""
    path = Path(root) / TASKS_FILE
    if not path.is_file():
        return None
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not a UTF-8 text file ({exc.reason})") from None
    if not isinstance(table, dict):
        raise InputError(f"{path}: expected an object mapping task names to tasks")
    return tuple(_parse_task(name, spec, str(path)) for name, spec in table.items())


def load_corpus(root: str | Path) -> HeldoutCorpus:
    """Read and cross-check the held-out items and tasks of a corpus folder."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"corpus folder not found: {root}")
    items, tasks = read_items(root), read_tasks(root)
    if tasks is not None:
        by_name = {t.name: t for t in tasks}
        for item in items:
            where = f"{root / ITEMS_FILE}:{item.line}"
            for name, label in item.labels.items():
                task = by_name.get(name)
                if task is None:
                    raise InputError(f"{where}: label for unknown task {name!r} (tasks.json has: {sorted(by_name)})")
                if label not in task.labels:
                    raise InputError(f"{where}: label {label!r} is not one of task {name!r}'s labels")
                if getattr(item, task.modality) is None:
                    raise InputError(f"{where}: labelled for {task.modality} task {name!r} but has no {task.modality}")
    return HeldoutCorpus(root=root, items=items, tasks=tasks)
