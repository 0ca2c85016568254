"""Collecting the inputs of a build: folders, manifests and single files become hashed :class:`Candidate` items.

Inputs are collected as ``onepeace embed`` collects them (folders walked recursively in sorted order, files
classified by extension, a ``.txt`` file gives one text per non-empty line) and also from manifests:

* ``.jsonl``: one JSON object per line, ``{"text": "..."}``, ``{"path": "..."}`` (classified by extension),
  ``{"image": "..."}`` or ``{"audio": "..."}``;
* ``.lst`` / ``.list``: one file or folder path per line (blank lines and ``#`` comments are ignored).

Relative paths in a manifest are relative to the manifest's folder. Every item is identified by the sha256 of its
content (file bytes, or the UTF-8 text). Names that are not regular files (FIFOs, devices, symbolic link loops,
broken links) are skipped and named without being opened.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from onepeace.cli_embed import Item, classify, collect, file_problem, input_error, walk
from onepeace.search.store import NewItem

MANIFEST_EXTENSIONS = frozenset({".jsonl", ".lst", ".list"})


@dataclass(frozen=True)
class Skipped:
    """A file or item left out of the index, and why."""

    source: str
    reason: str


@dataclass(frozen=True)
class Candidate:
    """An item found in the inputs: ``item.payload`` is the text or the file path; ``content_hash`` its sha256."""

    item: Item
    content_hash: str

    @property
    def key(self) -> tuple[str, str]:
        return self.item.modality, self.content_hash

    def to_new_item(self) -> NewItem:
        """The metadata row: a text's source is the text and its path the file it came from."""
        item = self.item
        if item.modality == "text":
            origin = None if item.source == "text" else item.source
            return NewItem("text", item.payload, self.content_hash, origin, item.line)
        return NewItem(item.modality, item.payload, self.content_hash, item.payload, None)


@dataclass
class Found:
    """Everything collected from the inputs, before embedding."""

    candidates: list[Candidate] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    ignored: int = 0


def collect_inputs(inputs: Sequence[str | Path]) -> Found:
    """Candidates from folders, manifests and single files, in input order (folders sorted by path).

    A missing input or a file of an unsupported type raises; an unreadable file is reported in ``skipped``.
    """
    found = Found()
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            _add_folder(path, found)
        elif path.is_file() and path.suffix.lower() in MANIFEST_EXTENSIONS:
            _add_manifest(path, found)
        elif path.is_file():
            if classify(path) is None:
                raise ValueError(
                    f"{path}: unsupported file type {path.suffix!r}; give a folder, a manifest "
                    f"({' '.join(sorted(MANIFEST_EXTENSIONS))}), an image, an audio clip or a .txt file"
                )
            _add_file(path, found)
        else:
            raise input_error(str(name))
    return found


def _add_folder(folder: Path, found: Found) -> None:
    for entry in walk(folder):
        if classify(entry.path) is None:
            found.ignored += 1
        elif entry.problem is not None:  # a FIFO, a device, a link loop: named, never opened
            found.skipped.append(Skipped(os.path.abspath(entry.path), entry.problem))
        else:
            _add_file(entry.path, found)


def _add_file(path: Path, found: Found, modality: str | None = None) -> None:
    """A media file (hashed) or a ``.txt`` file (one text per non-empty line); unreadable ones are skipped."""
    modality = modality or classify(path)
    resolved = _absolute(path)
    if modality == "text":
        try:
            lines = collect([], [], [str(path)]).items
        except (ValueError, OSError) as exc:
            found.skipped.append(Skipped(resolved, _without_prefix(str(exc), f"{path}: ")))
            return
        for line in lines:
            found.candidates.append(Candidate(Item("text", line.payload, resolved, line.line), text_hash(line.payload)))
        return
    try:
        digest = file_hash(path)
    except OSError as exc:
        found.skipped.append(Skipped(resolved, f"cannot read the file: {exc.strerror or exc}"))
        return
    found.candidates.append(Candidate(Item(str(modality), resolved, resolved), digest))


def _add_manifest(manifest: Path, found: Found) -> None:
    """Entries of a ``.jsonl`` or ``.lst`` manifest; listed files that do not exist are skipped and reported."""
    try:
        lines = manifest.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the manifest {manifest}: {exc}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip() or (manifest.suffix.lower() != ".jsonl" and line.lstrip().startswith("#")):
            continue
        where = f"{manifest}:{number}"
        kind, value = _parse_jsonl_entry(line, where) if manifest.suffix.lower() == ".jsonl" else ("path", line.strip())
        if kind == "text":
            found.candidates.append(Candidate(Item("text", value, str(manifest.resolve()), number), text_hash(value)))
            continue
        path = Path(value) if Path(value).is_absolute() else manifest.parent / value
        if path.is_dir() and kind == "path":
            _add_folder(path, found)
            continue
        problem = file_problem(path)
        if problem is None and kind == "path" and classify(path) is None:
            problem = f"unsupported file type {path.suffix!r}"
        if problem is None:
            _add_file(path, found, None if kind == "path" else kind)
        else:
            found.skipped.append(Skipped(os.path.abspath(path), f"{problem} (listed in {where})"))


def _parse_jsonl_entry(line: str, where: str) -> tuple[str, str]:
    """``(kind, value)`` of one manifest record: kind is ``text``, ``path``, ``image`` or ``audio``."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
    keys = [k for k in ("text", "path", "image", "audio") if isinstance(record, dict) and k in record]
    if len(keys) != 1 or not isinstance(record[keys[0]], str) or not record[keys[0]].strip():
        raise ValueError(f"{where}: expected an object with one non-empty string field text, path, image or audio")
    return keys[0], record[keys[0]].strip()


def text_hash(text: str) -> str:
    """sha256 hex digest of a text's UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_hash(path: Path) -> str:
    """sha256 hex digest of a regular file's bytes (read in 1 MiB blocks).

    The file is opened without blocking and checked to be a regular file before it is read, so a name that became
    a FIFO or a device after the folder was walked raises ``OSError`` instead of hanging.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        digest = hashlib.sha256()
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _absolute(path: Path) -> str:
    """``path`` with its links resolved, or made absolute as it is when they cannot be (a loop, a broken link)."""
    try:
        return str(path.resolve(strict=True))
    except (OSError, RuntimeError):  # Python < 3.13 raises RuntimeError for a symbolic link loop
        return os.path.abspath(path)


def _without_prefix(message: str, prefix: str) -> str:
    return message[len(prefix) :] if message.startswith(prefix) else message
