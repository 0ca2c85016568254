"""``build_index``: embed the images, clips and texts of folders or manifests into an index, adding only new ones.

Inputs are collected as ``onepeace embed`` collects them (folders walked recursively in sorted order, files
classified by extension, a ``.txt`` file gives one text per non-empty line) and also from manifests:

* ``.jsonl``: one JSON object per line, ``{"text": "..."}``, ``{"path": "..."}`` (classified by extension),
  ``{"image": "..."}`` or ``{"audio": "..."}``;
* ``.lst`` / ``.list``: one file or folder path per line (blank lines and ``#`` comments are ignored).

Relative paths in a manifest are relative to the manifest's folder.

Every item is identified by the sha256 of its content (file bytes, or the UTF-8 text). Content the index already
holds is not embedded again: that makes a re-run on a bigger input add only the new items, and a re-run after an
interruption resume where the last commit left off. Items are embedded in single-modality batches and committed
every ``commit_every`` items, so a kill loses at most one chunk. A batch that fails is retried item by item; an item
that still fails (a corrupt image, an undecodable clip) is skipped and reported, and tried again by the next build.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onepeace.cli_embed import MODALITY_ORDER, Item, classify, collect, embed_batch, failure_reason, walk
from onepeace.search.index import EmbeddingIndex, Repair
from onepeace.search.store import STATUS_INDEXED, NewItem

MANIFEST_EXTENSIONS = frozenset({".jsonl", ".lst", ".list"})


@dataclass(frozen=True)
class Skipped:
    """A file or item left out of the index, and why."""

    source: str
    reason: str


@dataclass(frozen=True)
class BuildReport:
    """What one build did. ``total`` counts the items found in the inputs."""

    added: int
    """Items embedded and stored by this build."""
    already_present: int
    """Items whose content the index already held (not embedded again)."""
    skipped: tuple[Skipped, ...]
    """Files or items that could not be read or embedded, with the reason."""
    total: int
    duplicates: int = 0
    """Items repeating the content of an earlier item of the same inputs (stored once)."""
    ignored: int = 0
    """Files in folders with unsupported extensions."""
    size: int = 0
    """Items in the index after the build."""
    repair: Repair = field(default_factory=Repair)
    """What opening the index fixed after an earlier interrupted build."""


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


# ----------------------------------------------------------------------------------------------- collecting
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
            raise FileNotFoundError(f"no such file or folder: {name}")
    return found


def _add_folder(folder: Path, found: Found) -> None:
    for path in walk(folder):
        if classify(path) is None:
            found.ignored += 1
        else:
            _add_file(path, found)


def _add_file(path: Path, found: Found, modality: str | None = None) -> None:
    """A media file (hashed) or a ``.txt`` file (one text per non-empty line); unreadable ones are skipped."""
    modality = modality or classify(path)
    resolved = str(path.resolve())
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
        elif not path.exists():
            found.skipped.append(Skipped(str(path.resolve()), f"no such file or folder (listed in {where})"))
        elif not path.is_file():
            found.skipped.append(Skipped(str(path.resolve()), f"not a file (listed in {where})"))
        elif kind == "path" and classify(path) is None:
            found.skipped.append(
                Skipped(str(path.resolve()), f"unsupported file type {path.suffix!r} (listed in {where})")
            )
        else:
            _add_file(path, found, None if kind == "path" else kind)


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
    """sha256 hex digest of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _without_prefix(message: str, prefix: str) -> str:
    return message[len(prefix) :] if message.startswith(prefix) else message


# ----------------------------------------------------------------------------------------------- embedding
def embed_candidates(
    model: Any, candidates: Sequence[Candidate], batch_size: int
) -> tuple[list[Candidate], np.ndarray, list[tuple[Candidate, str]]]:
    """Embed single-modality batches: ``(embedded, vectors [N, D] float32, [(failed candidate, reason)])``.

    A batch that raises is retried one item at a time, so one bad file does not cost its neighbours.
    """
    done: list[Candidate] = []
    rows: list[np.ndarray] = []
    failed: list[tuple[Candidate, str]] = []
    for modality in MODALITY_ORDER:
        group = [c for c in candidates if c.item.modality == modality]
        for start in range(0, len(group), batch_size):
            batch = group[start : start + batch_size]
            try:
                rows.append(embed_batch(model, modality, [c.item.payload for c in batch]))
                done.extend(batch)
                continue
            except Exception:
                pass
            for candidate in batch:
                try:
                    rows.append(embed_batch(model, modality, [candidate.item.payload]))
                    done.append(candidate)
                except Exception as exc:  # one bad input never stops the build
                    failed.append((candidate, failure_reason(candidate.item, exc)))
    vectors = np.concatenate(rows).astype(np.float32) if rows else np.zeros((0, 0), dtype=np.float32)
    return done, vectors, failed


def model_dim(model: Any) -> int:
    """Embedding width of ``model`` (its config's ``embed_dim``, else measured on a short text)."""
    dim = getattr(getattr(model, "cfg", None), "embed_dim", None)
    if isinstance(dim, int):
        return dim
    return int(embed_batch(model, "text", ["a"]).shape[-1])


def model_label(name: str) -> str:
    """How a model is recorded in an index: an existing file or folder as its absolute path, else the name."""
    path = Path(name)
    return str(path.resolve()) if path.exists() else name


def _model_modalities(model: Any) -> set[str]:
    modalities = getattr(model, "modalities", None)
    if modalities is None:
        return set(MODALITY_ORDER)
    return {getattr(m, "value", m) for m in modalities}


# ----------------------------------------------------------------------------------------------- building
def build_index(
    model: Any,
    inputs: str | Path | Sequence[str | Path] | Found,
    out: str | Path,
    batch_size: int = 16,
    commit_every: int = 256,
    progress: bool = True,
    *,
    model_name: str | None = None,
) -> BuildReport:
    """Create the index ``out`` or add to it what ``inputs`` hold that it does not have yet.

    Args:
        model: an :class:`onepeace.OnePeace`, or a model name/path to load.
        inputs: folders, manifests (``.jsonl``, ``.lst``) or single files, or what :func:`collect_inputs`
            returned for them.
        out: the index folder (created if missing).
        batch_size: items per forward pass.
        commit_every: items per commit; an interruption loses at most this many embeddings.
        progress: show a progress bar on stderr (when stderr is a terminal).
        model_name: the name recorded in a new index (required with a model object; a ``str`` model is its own
            name). An existing index must have been built with the same name.
    """
    for name, value in (("batch_size", batch_size), ("commit_every", commit_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(inputs, Found):
        found = inputs
    else:
        found = collect_inputs([inputs] if isinstance(inputs, (str, Path)) else list(inputs))
    if isinstance(model, str):
        from onepeace.cli_embed import load_model

        model_name = model_name or model_label(model)
        model = load_model(model, None, None, None)
    index = _open_for(model, Path(out), model_name)
    try:
        return _fill(index, model, found, batch_size, commit_every, progress)
    finally:
        index.close()


def _open_for(model: Any, out: Path, model_name: str | None) -> EmbeddingIndex:
    """The index at ``out`` opened for writing (created for ``model`` if missing); checks name and width."""
    dim = model_dim(model)
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        if model_name is None:
            raise ValueError("model_name is required to create an index (it records which model made the vectors)")
        return EmbeddingIndex.create(out, model_name, dim)
    index = EmbeddingIndex.open(out, writable=True)
    if model_name is not None and model_name != index.model_name:
        index.close()
        raise ValueError(f"the index {out} holds embeddings of {index.model_name}, not {model_name}")
    if index.dim != dim:
        index.close()
        raise ValueError(f"the index {out} holds {index.dim}-d vectors but the model makes {dim}-d ones")
    return index


@dataclass
class _Plan:
    """Candidates split into what to embed and what to leave out."""

    pending: list[Candidate] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    present: int = 0
    duplicates: int = 0


def _plan(found: Found, statuses: dict[tuple[str, str], str], supported: set[str]) -> _Plan:
    """Drop repeated content and content already indexed; pending items come in modality order."""
    plan = _Plan(skipped=list(found.skipped))
    seen: set[tuple[str, str]] = set()
    for candidate in found.candidates:
        if candidate.key in seen:
            plan.duplicates += 1
        elif statuses.get(candidate.key) == STATUS_INDEXED:
            plan.present += 1
        elif candidate.item.modality not in supported:
            plan.skipped.append(Skipped(candidate.item.source, f"the model has no {candidate.item.modality} branch"))
        else:
            plan.pending.append(candidate)
        seen.add(candidate.key)
    plan.pending.sort(key=lambda c: MODALITY_ORDER.index(c.item.modality))
    return plan


def _fill(
    index: EmbeddingIndex, model: Any, found: Found, batch_size: int, commit_every: int, progress: bool
) -> BuildReport:
    """Embed and commit, chunk by chunk, the candidates the index does not hold yet."""
    from tqdm import tqdm

    run_id = index.store.start_run(index.model_name)
    plan = _plan(found, index.store.statuses(), _model_modalities(model))
    added = 0
    disable = not progress or not sys.stderr.isatty()
    with tqdm(total=len(plan.pending), file=sys.stderr, disable=disable, unit="item", desc="indexing") as bar:
        for start in range(0, len(plan.pending), commit_every):
            chunk = plan.pending[start : start + commit_every]
            done, vectors, failed = embed_candidates(model, chunk, batch_size)
            if done:
                index.add([c.to_new_item() for c in done], vectors)
            index.record_failures([(c.to_new_item(), reason) for c, reason in failed])
            plan.skipped.extend(Skipped(c.item.source, reason) for c, reason in failed)
            added += len(done)
            bar.update(len(chunk))
    total = len(found.candidates)
    index.store.finish_run(run_id, added, plan.present, len(plan.skipped), total)
    return BuildReport(
        added=added,
        already_present=plan.present,
        skipped=tuple(plan.skipped),
        total=total,
        duplicates=plan.duplicates,
        ignored=found.ignored,
        size=len(index),
        repair=index.repair,
    )
