"""``EmbeddingIndex``: normalised embeddings in faiss, their metadata in SQLite, one folder on disk.

Layout of an index folder::

    INDEX/meta.sqlite      items, info (model, dim, created) and build runs; see ``store.py``
    INDEX/vectors.faiss    faiss IndexIDMap2(IndexFlatIP(dim)); vector ids are the ``items.id`` of SQLite
    INDEX/build.lock       held (flock) by the one process allowed to write

Scores are inner products, i.e. cosine similarities for the L2-normalised vectors ONE-PEACE produces. Exact search
(flat index). Filtering by modality is exact as well: faiss searches only the ids of that modality (an id selector),
so no over-fetching is needed.

Consistency: every :meth:`EmbeddingIndex.add` is one step. The rows are inserted in an open SQLite transaction
(which gives their ids), the vectors are added, the whole faiss index is written to ``vectors.faiss.tmp``, flushed
and renamed over ``vectors.faiss``, and only then is the SQLite transaction committed. A kill before the rename
leaves both files as they were; a kill between the rename and the commit leaves vectors whose ids SQLite does not
know, after the committed ones. SQLite is the source of truth for what the index holds: opening an index for
writing removes those vectors; opening it for reading changes nothing and ignores them.

Integrity: each commit records in SQLite, in the same transaction as the rows, the number of vectors it wrote and
the sha256 of their float32 values and of their ids, in storage order (``vectors_count``, ``vectors_sha256``,
``ids_sha256``). Opening an index recomputes both over that many vectors; the tail an interrupted commit appends
does not change them. A missing, truncated, replaced or edited ``vectors.faiss`` (a flipped byte, scaled or NaN
vectors, a rewritten id map), or indexed rows without a vector, raise :class:`IndexDamagedError` naming the file
and how to rebuild: nothing is deleted and nothing is embedded again behind the user's back. :meth:`add` accepts
only finite, unit-norm vectors.

Each ``add`` rewrites the whole vectors file (O(N) bytes), which is why builds add items in chunks
(``commit_every``): larger chunks write less often, smaller ones lose less work when interrupted.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from onepeace.errors import OnePeaceError
from onepeace.modality import Modality
from onepeace.search.store import STATUS_INDEXED, ItemInfo, MetadataStore, NewItem
from onepeace.search.vectors import (
    VECTORS_FILE,
    check_vectors,
    checksums,
    empty_vectors,
    faiss_module,
    read_vectors,
    write_vectors,
)

META_FILE = "meta.sqlite"
LOCK_FILE = "build.lock"
NORM_TOLERANCE = 1e-3
"""Largest ``| ||v|| - 1 |`` :meth:`EmbeddingIndex.add` accepts (float32 normalisation is within about 1e-6)."""


@dataclass(frozen=True)
class Hit:
    """One search result. ``source`` is the media file path (image, audio) or the text itself."""

    item_id: int
    score: float
    modality: str
    source: str


@dataclass(frozen=True)
class Repair:
    """What opening an index for writing fixed after an interrupted write."""

    dropped_vectors: int = 0
    """Vectors whose rows were never committed (removed from faiss)."""


class EmbeddingIndex:
    """Vectors ``[N, D]`` (faiss) plus one metadata row per vector (SQLite) in the folder ``path``."""

    def __init__(
        self, path: Path, store: MetadataStore, vectors: Any, writable: bool, lock: int | None, ids: set[int]
    ) -> None:
        self.path = path
        self.store = store
        self._vectors = vectors
        self._writable = writable
        self._lock = lock
        self._ids = ids
        """Ids of the committed vectors (those an interrupted commit left are not among them)."""
        self._valid: dict[str | None, np.ndarray] = {}
        self.repair = Repair()

    # ------------------------------------------------------------------------------------------ opening
    @classmethod
    def create(cls, path: str | Path, model_name: str, dim: int) -> EmbeddingIndex:
        """A new, empty index for vectors of ``dim`` made by ``model_name``, opened for writing.

        ``path`` must not exist or be an empty folder. The folder is assembled under a temporary name and renamed,
        so an interrupted ``create`` never leaves half an index.
        """
        path = Path(path)
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if (path / META_FILE).exists():
            raise FileExistsError(f"{path} already holds an index; open it instead")
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise FileExistsError(f"{path} exists and is not an empty folder; choose a new index folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.creating-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            store = MetadataStore.create(tmp / META_FILE, model_name, dim)
            with store.transaction():
                store.set_info(checksums(empty_vectors(dim)))
            store.close()
            write_vectors(empty_vectors(dim), tmp / VECTORS_FILE)
            if path.is_dir():
                path.rmdir()
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls.open(path, writable=True)

    @classmethod
    def open(cls, path: str | Path, writable: bool = False) -> EmbeddingIndex:
        """The index in the folder ``path``.

        ``writable=True`` takes the folder's write lock (one writer at a time) and repairs what an interrupted
        write left behind (see :attr:`repair`); reading needs no lock and writes nothing. Damaged or changed
        files raise :class:`IndexDamagedError` (see the module docstring).
        """
        path = Path(path)
        if not (path / META_FILE).is_file():
            if not path.exists():
                raise FileNotFoundError(f"no index at {path} (build one with: onepeace index build)")
            raise FileNotFoundError(f"{path} is not an index folder (it has no {META_FILE})")
        lock = _take_lock(path) if writable else None
        store = None
        try:
            store = MetadataStore.open(path / META_FILE, readonly=not writable)
            info, rows = store.snapshot()  # before the vectors file is read: see vectors.py
            vectors = read_vectors(path, info, rows)
            committed, left = check_vectors(path, store.path, info, rows, vectors)
            index = cls(path, store, vectors, writable, lock, committed)
        except BaseException:
            if store is not None:
                store.close()
            _release_lock(lock)
            raise
        if writable:
            index._repair(left)
        return index

    def close(self) -> None:
        """Close the SQLite connection and release the write lock."""
        self.store.close()
        _release_lock(self._lock)
        self._lock = None

    def __enter__(self) -> EmbeddingIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ properties
    @property
    def model_name(self) -> str:
        """The model (variant name or path) whose embeddings the index holds."""
        return self.store.info()["model"]

    @property
    def dim(self) -> int:
        """Embedding width ``D``."""
        return int(self._vectors.d)

    def __len__(self) -> int:
        """Number of searchable items."""
        return len(self._valid_ids(None))

    def item(self, item_id: int) -> ItemInfo:
        """Metadata of one item; ``KeyError`` if the index has no such id."""
        found = self.store.items([item_id]).get(int(item_id))
        if found is None:
            raise KeyError(f"no item {item_id} in the index {self.path}")
        return found

    def media_path(self, item_id: int) -> Path | None:
        """The image or audio file of an item (e.g. for a thumbnail); ``None`` for a text."""
        info = self.item(item_id)
        return None if info.modality == Modality.TEXT.value else Path(info.source)

    # ------------------------------------------------------------------------------------------ writing
    def add(self, items: Sequence[NewItem], vectors: Any) -> list[int]:
        """Store ``items`` with their ``vectors [N, D]`` (float32, L2-normalised) in one atomic step; returns ids.

        Vectors holding NaN or whose norm is not 1 (within :data:`NORM_TOLERANCE`) raise ``ValueError``.
        """
        self._check_writable()
        array = _as_matrix(vectors, self.dim, "vectors")
        norms = np.linalg.norm(array.astype(np.float64), axis=1)
        off = np.flatnonzero(np.abs(norms - 1.0) > NORM_TOLERANCE)
        if off.size:
            raise ValueError(f"vectors must be L2-normalised: row {off[0]} has norm {norms[off[0]]:.4f}")
        if array.shape[0] != len(items):
            raise ValueError(f"{len(items)} items but {array.shape[0]} vectors")
        if not items:
            return []
        ids: list[int] = []
        self.store.begin()
        try:
            ids = self.store.insert_indexed(items)
            self._vectors.add_with_ids(array, np.asarray(ids, dtype=np.int64))
            self._ids.update(ids)
            self._valid.clear()
            self.store.set_info(checksums(self._vectors))
            write_vectors(self._vectors, self.path / VECTORS_FILE)
            self.store.commit()
        except BaseException:
            self.store.rollback()
            if ids:  # the file may hold them already; the next open removes them (they have no rows)
                self._vectors.remove_ids(np.asarray(ids, dtype=np.int64))
                self._ids.difference_update(ids)
            self._valid.clear()
            raise
        return ids

    def record_failures(self, failures: Sequence[tuple[NewItem, str]]) -> None:
        """Remember items that could not be embedded, with the reason (the next build retries them)."""
        self._check_writable()
        if failures:
            self.store.record_failures(failures)

    # ------------------------------------------------------------------------------------------ searching
    def search(self, query: Any, k: int = 10, modality: str | None = None) -> list[Hit] | list[list[Hit]]:
        """The ``k`` best items by inner product with ``query``: ``[D]`` -> list of hits, ``[Q, D]`` -> Q lists.

        ``query`` should be L2-normalised (as ``OnePeace.embed`` / ``OnePeace.compose`` return it); ``modality``
        keeps only items of that modality. Fewer than ``k`` hits come back when the index has fewer items.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        single = _ndim(query) == 1
        matrix = _as_matrix(query, self.dim, "query")
        wanted = None if modality is None else Modality.parse(modality).value
        valid = self._valid_ids(wanted)
        count = min(k, len(valid))
        if count == 0:
            results: list[list[Hit]] = [[] for _ in range(matrix.shape[0])]
            return results[0] if single else results
        faiss = faiss_module()
        params = None
        if len(valid) != self._vectors.ntotal:
            params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(valid))
        scores, ids = self._vectors.search(matrix, count, params=params)
        infos = self.store.items(int(i) for i in ids.ravel() if i >= 0)
        results = [
            [
                Hit(int(i), float(s), infos[int(i)].modality, infos[int(i)].source)
                for s, i in zip(row_scores, row_ids)
                if int(i) in infos
            ]
            for row_scores, row_ids in zip(scores, ids)
        ]
        return results[0] if single else results

    # ------------------------------------------------------------------------------------------ internals
    def _valid_ids(self, modality: str | None) -> np.ndarray:
        """Ids that are both committed in SQLite and present in faiss (cached until the next write)."""
        if modality not in self._valid:
            stored = self.store.indexed_ids(modality)
            self._valid[modality] = np.asarray([i for i in stored if i in self._ids], dtype=np.int64)
        return self._valid[modality]

    def _check_writable(self) -> None:
        if not self._writable:
            raise OnePeaceError(f"the index {self.path} was opened for reading; open it with writable=True")

    def _repair(self, left: list[int]) -> None:
        """Remove the vectors ``left`` by an interrupted commit (ids without rows); record missing checksums."""
        if left:
            self._vectors.remove_ids(np.asarray(left, dtype=np.int64))
            write_vectors(self._vectors, self.path / VECTORS_FILE)
        if "vectors_count" not in self.store.info():  # an index written before checksums were kept
            with self.store.transaction():
                self.store.set_info(checksums(self._vectors))
        self._valid.clear()
        self.repair = Repair(dropped_vectors=len(left))


def count_indexed(path: str | Path) -> int:
    """Number of committed items of the index at ``path``, read from SQLite alone (cheap; for progress checks)."""
    store = MetadataStore.open(Path(path) / META_FILE, readonly=True)
    try:
        return store.count(STATUS_INDEXED)
    finally:
        store.close()


def _ndim(x: Any) -> int:
    ndim = getattr(x, "ndim", None)
    return int(ndim) if ndim is not None else int(np.ndim(x))


def _as_matrix(x: Any, dim: int, what: str) -> np.ndarray:
    """``x`` (numpy or torch, ``[D]`` or ``[N, D]``) as a C-contiguous float32 ``[N, D]`` array."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    array = np.asarray(x, dtype=np.float32)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[1] != dim:
        raise ValueError(f"{what} must have shape [{dim}] or [N, {dim}], got {list(array.shape)}")
    if not np.isfinite(array).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    return np.ascontiguousarray(array)


def _take_lock(folder: Path) -> int | None:
    """Hold an exclusive lock on ``folder/build.lock`` (released on close or when the process dies)."""
    try:
        import fcntl
    except ImportError:  # no advisory locks on this platform
        return None
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise OnePeaceError(f"another process is writing to the index {folder}; wait for it to finish") from None
    return fd


def _release_lock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)
