"""``build_index``: embed the images, clips and texts of folders or manifests into an index, adding only new ones.

Inputs are collected by :mod:`onepeace.search.collect` (folders, ``.jsonl`` and ``.lst`` manifests, single files;
every item identified by the sha256 of its content). Content the index already holds is not embedded again: that
makes a re-run on a bigger input add only the new items, and a re-run after an interruption resume where the last
commit left off. Items are embedded in single-modality batches and committed every ``commit_every`` items, so a kill
loses at most one chunk. A batch that fails is retried item by item; an item that still fails (a corrupt image, an
undecodable clip) is skipped and reported, and tried again by the next build. After embedding, every media file is
hashed again: a file that changed since it was hashed is embedded once more and stored under the hash of what was
embedded (one that keeps changing is skipped), so the next build does not find it new and index it twice.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onepeace.cli_embed import MODALITY_ORDER, embed_batch, failure_reason
from onepeace.search.collect import Candidate, Found, Skipped, collect_inputs, file_hash
from onepeace.search.index import EmbeddingIndex, Repair
from onepeace.search.store import STATUS_INDEXED


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
    statuses = index.store.statuses()
    plan = _plan(found, statuses, _model_modalities(model))
    held = {key for key, status in statuses.items() if status == STATUS_INDEXED}  # grows with each commit
    added = 0
    disable = not progress or not sys.stderr.isatty()
    with tqdm(total=len(plan.pending), file=sys.stderr, disable=disable, unit="item", desc="indexing") as bar:
        for start in range(0, len(plan.pending), commit_every):
            chunk = plan.pending[start : start + commit_every]
            result = _embed_checked(model, chunk, batch_size, held)
            if result.done:
                index.add([c.to_new_item() for c in result.done], np.stack(result.vectors))
                held.update(c.key for c in result.done)
            index.record_failures([(c.to_new_item(), reason) for c, reason in result.failed])
            plan.skipped.extend(Skipped(c.item.source, reason) for c, reason in result.failed)
            plan.skipped.extend(result.skipped)
            plan.duplicates += result.duplicates
            added += len(result.done)
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


@dataclass
class _Checked:
    """Embedded candidates whose files still hold what was hashed, with their vectors ``[D]``."""

    done: list[Candidate] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)
    failed: list[tuple[Candidate, str]] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    duplicates: int = 0


def _embed_checked(model: Any, chunk: Sequence[Candidate], batch_size: int, held: set[tuple[str, str]]) -> _Checked:
    """Embed ``chunk``, then hash every media file again, so each vector is stored under the hash of its input.

    A file that changed between its hashing and its embedding gets its new hash and is embedded again; one that
    changed again meanwhile is skipped (the next build takes it). Content the index (``held``) or this chunk
    already has is counted as a duplicate.
    """
    out = _Checked()
    keys = set(held)
    pending = list(chunk)
    for attempt in range(2):
        done, vectors, failed = embed_candidates(model, pending, batch_size)
        out.failed.extend(failed)
        pending = []
        for candidate, vector in zip(done, vectors):
            digest, problem = _hash_now(candidate)
            if digest is None:
                out.skipped.append(Skipped(candidate.item.source, problem))
            elif digest != candidate.content_hash and attempt == 0:
                pending.append(Candidate(candidate.item, digest))
            elif digest != candidate.content_hash:
                out.skipped.append(Skipped(candidate.item.source, "the file kept changing while it was indexed"))
            elif candidate.key in keys:
                out.duplicates += 1
            else:
                keys.add(candidate.key)
                out.done.append(candidate)
                out.vectors.append(vector)
        if not pending:
            break
    return out


def _hash_now(candidate: Candidate) -> tuple[str | None, str]:
    """``(sha256 of the candidate's file now, "")``, or ``(None, why it cannot be read)``; a text is its hash."""
    if candidate.item.modality == "text":
        return candidate.content_hash, ""
    try:
        return file_hash(Path(candidate.item.payload)), ""
    except OSError as exc:
        return None, f"cannot read the file after embedding it: {exc.strerror or exc}"
