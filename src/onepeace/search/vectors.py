"""The vectors file of an index (``vectors.faiss``): reading, atomic writing, and its checksums.

The checksums are the sha256 of the first ``count`` stored vectors (their float32 bytes) and of their int64 ids,
in storage order, recorded in SQLite by every commit (see ``index.py``). Vectors appended after them by an
interrupted commit leave them unchanged; any other change to the file does not.

Because a commit only ever appends vectors (and renames the file before it commits SQLite), a vectors file read
after a snapshot of SQLite always starts with the vectors of that snapshot: readers check the file against the
snapshot they took before reading it, so a build committing meanwhile is never mistaken for damage.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from onepeace.errors import require
from onepeace.search.store import REBUILD_HINT, IndexDamagedError

VECTORS_FILE = "vectors.faiss"


def faiss_module() -> Any:
    return require("faiss", "search")


def empty_vectors(dim: int) -> Any:
    faiss = faiss_module()
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def read_vectors(folder: Path, info: dict[str, str], rows: set[int]) -> Any:
    """The faiss index of ``folder``, checked to be an ``IndexIDMap2(IndexFlatIP)`` of the width in ``info``.

    ``info`` and ``rows`` (the indexed ids) are a snapshot of SQLite taken before; a missing file is an empty
    index only when nothing was committed.
    """
    file = folder / VECTORS_FILE
    dim = int(info["dim"])
    if not file.exists():
        committed = int(info.get("vectors_count", len(rows)))
        if committed:
            raise IndexDamagedError(
                f"the index {folder} holds {committed} item(s) but {file} is missing; {REBUILD_HINT}"
            )
        return empty_vectors(dim)
    if not file.is_file():  # reading a FIFO or a device would block or never end
        raise IndexDamagedError(f"{file} is not a regular file; {REBUILD_HINT}")
    faiss = faiss_module()
    try:
        vectors = faiss.read_index(str(file))
    except RuntimeError as exc:
        reason = " ".join(str(exc).split())[:200]
        raise IndexDamagedError(f"{file} is not a readable faiss index ({reason}); {REBUILD_HINT}") from None
    inner = faiss.downcast_index(vectors.index) if isinstance(vectors, faiss.IndexIDMap2) else None
    if not isinstance(inner, faiss.IndexFlatIP) or vectors.d != dim:
        raise IndexDamagedError(f"{file} is not an IndexIDMap2(IndexFlatIP) of width {dim}; {REBUILD_HINT}")
    return vectors


def check_vectors(
    folder: Path, meta: Path, info: dict[str, str], rows: set[int], vectors: Any
) -> tuple[set[int], list[int]]:
    """``(ids of the committed vectors, ids of the vectors after them)``, after the integrity checks.

    ``info`` and ``rows`` are the snapshot of the metadata file ``meta`` the vectors were read after. Raises
    :class:`IndexDamagedError` when the committed vectors or ids differ from the checksums of the last commit, or
    when the committed vectors and the indexed rows are not the same ids.
    """
    file = folder / VECTORS_FILE
    ids = faiss_module().vector_to_array(vectors.id_map)
    if "vectors_count" in info:
        count = int(info["vectors_count"])
        problem = _checksum_problem(vectors, ids, count, info)
        if problem is not None:
            raise IndexDamagedError(
                f"{file} does not match the checksum recorded in {meta} at the last commit ({problem}); {REBUILD_HINT}"
            )
        committed, left = {int(i) for i in ids[:count]}, [int(i) for i in ids[count:]]
    else:  # written before checksums were kept: the rows alone say what was committed
        committed = {int(i) for i in ids if int(i) in rows}
        left = [int(i) for i in ids if int(i) not in rows]
    if rows != committed:
        raise IndexDamagedError(
            f"{file} and {meta} disagree: {len(rows - committed)} indexed item(s) have no vector and "
            f"{len(committed - rows)} committed vector(s) have no item; {REBUILD_HINT}"
        )
    return committed, left


def _checksum_problem(vectors: Any, ids: np.ndarray, count: int, info: dict[str, str]) -> str | None:
    """What differs between the first ``count`` vectors and ids and the recorded checksums (``None``: nothing)."""
    if vectors.ntotal < count:
        return f"it holds {vectors.ntotal} vector(s) but the last commit wrote {count}"
    got = checksums(vectors, ids, count)
    differ = [
        name
        for name, key in (("the vectors", "vectors_sha256"), ("their ids", "ids_sha256"))
        if got[key] != info.get(key)
    ]
    return f"{' and '.join(differ)} differ" if differ else None


def checksums(vectors: Any, ids: np.ndarray | None = None, count: int | None = None) -> dict[str, str]:
    """``info`` entries for the first ``count`` (default: all) vectors: their number, sha256 of values and of ids."""
    faiss = faiss_module()
    count = vectors.ntotal if count is None else count
    ids = faiss.vector_to_array(vectors.id_map) if ids is None else ids
    codes = faiss.downcast_index(vectors.index).codes
    raw = faiss.rev_swig_ptr(codes.data(), codes.size()) if codes.size() else np.zeros(0, dtype=np.uint8)
    values = raw[: count * vectors.d * 4]  # float32 rows, in storage order (a view: nothing is copied)
    return {
        "vectors_count": str(count),
        "vectors_sha256": hashlib.sha256(values).hexdigest(),
        "ids_sha256": hashlib.sha256(np.ascontiguousarray(ids[:count], dtype="<i8")).hexdigest(),
    }


def write_vectors(vectors: Any, file: Path) -> None:
    """Write ``vectors`` to ``file`` atomically: a flushed temporary file renamed over it."""
    tmp = file.with_name(file.name + ".tmp")
    faiss_module().write_index(vectors, str(tmp))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, file)
    _fsync_folder(file.parent)


def _fsync_folder(folder: Path) -> None:
    """Flush a folder entry (makes a rename durable on POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
