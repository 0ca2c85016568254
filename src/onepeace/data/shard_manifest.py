"""Sample counts of tar shards from a manifest written once next to them, instead of every rank reading every tar.

``onepeace data index-shards DIR`` writes ``DIR/onepeace-shards.json``: per shard file its name, size,
modification time and number of samples. A loader asks :func:`shard_counts`; a shard whose entry matches its file
(same size and modification time) is not opened. Without a manifest, or with one that does not match (a shard
added or rewritten), the writer rank (global rank 0, and local rank 0 of every node) counts the shards that need
it, reusing the entries that still match, and replaces the manifest atomically; the other ranks wait for a
manifest that matches their shards and read it. In a directory that cannot be written, every rank counts the
tar headers itself, as without a manifest, and a warning names the command that would spare it.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from onepeace.errors import InputError, OnePeaceWarning

MANIFEST = "onepeace-shards.json"
FORMAT = "onepeace-shard-manifest/1"
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
WAIT_ENV = "ONEPEACE_MANIFEST_WAIT"
"""Seconds a non-writer rank waits for the manifest (default :data:`DEFAULT_WAIT_S`)."""
DEFAULT_WAIT_S = 1800.0


def _stat(path: str) -> dict[str, int]:
    if not os.path.isfile(path):
        raise InputError(f"shard {path!r} not found")
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def read_manifest(directory: str | Path) -> dict[str, dict[str, int]]:
    """Entries of ``directory``'s manifest (file name -> size, mtime_ns, samples); empty without one.

    A manifest that cannot be parsed or has another format raises :class:`InputError` naming it.
    """
    path = Path(directory) / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    try:
        data = json.loads(text)
        shards = data["shards"] if data.get("format") == FORMAT else None
        ok = isinstance(shards, dict) and all(
            isinstance(v, dict) and all(isinstance(v.get(k), int) for k in ("size", "mtime_ns", "samples"))
            for v in shards.values()
        )
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError):
        ok = False
    if not ok:
        raise InputError(f"{path} is not a shard manifest ({FORMAT}); delete it or rerun onepeace data index-shards")
    return shards


def stale_entries(directory: str | Path, names: Sequence[str], entries: dict[str, dict[str, int]]) -> list[str]:
    """The shard files among ``names`` (in ``directory``) without an entry matching their size and mtime."""
    stale = []
    for name in names:
        entry = entries.get(name)
        stat = _stat(os.path.join(directory, name))
        if entry is None or entry["size"] != stat["size"] or entry["mtime_ns"] != stat["mtime_ns"]:
            stale.append(name)
    return stale


def write_manifest(directory: str | Path, entries: dict[str, dict[str, int]]) -> Path:
    """Replace ``directory``'s manifest atomically (a temporary file renamed over it)."""
    target = Path(directory) / MANIFEST
    body = json.dumps({"format": FORMAT, "shards": dict(sorted(entries.items()))}, indent=1) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST}.", dir=str(directory))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(body)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _counted(directory: str, names: Sequence[str]) -> dict[str, dict[str, int]]:
    from onepeace.data.pretrain_shards import count_shard_samples

    out = {}
    for name in names:
        path = os.path.join(directory, name)
        stat = _stat(path)
        out[name] = {**stat, "samples": count_shard_samples(path)}
        if _stat(path) != stat:
            raise InputError(f"shard {path!r} changed while it was being counted")
    return out


def index_shards(directory: str | Path) -> dict[str, dict[str, int]]:
    """Count every shard file (``*.tar``, ``*.tar.gz``, ``*.tgz``) of ``directory`` and write its manifest.

    Entries that still match their file are reused. Returns the entries written.
    """
    root = Path(directory)
    if not root.is_dir():
        raise InputError(f"{root} is not a directory")
    names = sorted(p.name for p in root.iterdir() if p.is_file() and p.name.endswith(SHARD_SUFFIXES))
    if not names:
        raise InputError(f"{root} holds no shard files ({', '.join('*' + s for s in SHARD_SUFFIXES)})")
    old = read_manifest(root)
    stale = set(stale_entries(root, names, old))
    entries = {n: old[n] for n in names if n not in stale}
    entries.update(_counted(str(root), sorted(stale)))
    write_manifest(root, entries)
    return entries


def _is_writer(rank: int) -> bool:
    return rank == 0 or os.environ.get("LOCAL_RANK") == "0"


def _wait_s() -> float:
    text = os.environ.get(WAIT_ENV)
    try:
        seconds = DEFAULT_WAIT_S if text is None else float(text)
    except ValueError:
        raise InputError(f"{WAIT_ENV} must be a number of seconds, got {text!r}") from None
    if not seconds >= 0:
        raise InputError(f"{WAIT_ENV} must be >= 0 seconds, got {text!r}")
    return seconds


def _directory_counts(directory: str, names: Sequence[str], rank: int) -> dict[str, int]:
    """Counts of ``names`` (files of ``directory``) through its manifest, written or waited for as needed."""
    entries = read_manifest(directory)
    stale = stale_entries(directory, names, entries)
    if not stale:
        return {n: entries[n]["samples"] for n in names}
    if not os.access(directory, os.W_OK):
        warnings.warn(
            f"{directory}: no up-to-date {MANIFEST} and the directory is not writable; every rank reads the tar "
            f"headers of {len(stale)} shard(s). Write one with: onepeace data index-shards {directory}",
            OnePeaceWarning,
            stacklevel=3,
        )
        entries = {**entries, **_counted(directory, stale)}
        return {n: entries[n]["samples"] for n in names}
    if _is_writer(rank):
        changed = [n for n in stale if n in entries]
        if changed:
            warnings.warn(
                f"{directory}/{MANIFEST} does not match shard(s) {changed[:3]}; rebuilt", OnePeaceWarning, stacklevel=3
            )
        entries = {**read_manifest(directory), **_counted(directory, stale)}
        write_manifest(directory, entries)
        return {n: entries[n]["samples"] for n in names}
    return _wait_for(directory, names)


def _wait_for(directory: str, names: Sequence[str]) -> dict[str, int]:
    deadline, delay = time.monotonic() + _wait_s(), 0.05
    while True:
        try:
            entries = read_manifest(directory)
        except InputError:
            entries = {}  # a manifest of another format is being replaced by the writer rank
        stale = stale_entries(directory, names, entries)
        if not stale:
            return {n: entries[n]["samples"] for n in names}
        if time.monotonic() > deadline:
            raise InputError(
                f"waited {_wait_s():.0f} s for rank 0 to write {directory}/{MANIFEST} covering {stale[:3]}; "
                f"write it first with: onepeace data index-shards {directory}"
            )
        time.sleep(delay)
        delay = min(1.0, delay * 2)


def shard_counts(shards: Sequence[str], rank: int = 0) -> list[int]:
    """Samples of each shard file, from the manifests of their directories (see the module docstring)."""
    by_dir: dict[str, list[str]] = {}
    for path in shards:
        directory, name = os.path.split(os.path.abspath(path))
        by_dir.setdefault(directory, []).append(name)
    counts: dict[str, int] = {}
    for directory, names in by_dir.items():
        unique = list(dict.fromkeys(names))
        for name, n in _directory_counts(directory, unique, rank).items():
            counts[os.path.join(directory, name)] = n
    return [counts[os.path.abspath(p)] for p in shards]
