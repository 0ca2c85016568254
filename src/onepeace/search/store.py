"""SQLite metadata of an embedding index: what each vector id stands for, plus the index's model and build runs.

Tables:

* ``info(key, value)``: ``format``, ``model`` (the model name or path the vectors come from), ``dim``, ``created``,
  and the checksums of the vectors written by the last commit (``vectors_count``, ``vectors_sha256``,
  ``ids_sha256``; see ``index.py``).
* ``items(id, modality, source, path, line, content_hash, status, error, added_at)``: one row per distinct content.
  ``id`` is the vector id in faiss. ``source`` is the file path of an image or clip, or the text itself.
  ``path``/``line`` say where a text came from. ``content_hash`` is the sha256 of the file bytes (images, audio) or
  of the UTF-8 text; ``(modality, content_hash)`` is unique, which is how a build recognises what it already has.
  ``status`` is ``indexed`` (its vector is in faiss) or ``failed`` (it could not be embedded; ``error`` says why;
  the next build tries it again).
* ``runs(id, model, started_at, finished_at, added, already_present, skipped, total)``: one row per build;
  ``finished_at`` stays empty when a build was interrupted.

Rows inserted between :meth:`MetadataStore.begin` and :meth:`MetadataStore.commit` become visible only at the
commit, so the caller decides when a batch of rows exists (see ``index.py`` for the order of writes).

Opening a store runs SQLite's ``PRAGMA quick_check`` (every page of every table and index is read and checked), so
damaged pages stop the open with :class:`IndexDamagedError` instead of answering with a part of the rows.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from onepeace.errors import OnePeaceError

FORMAT_VERSION = "1"
STATUS_INDEXED = "indexed"
STATUS_FAILED = "failed"
MODALITIES = ("text", "image", "audio")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    modality TEXT NOT NULL CHECK (modality IN ('text', 'image', 'audio')),
    source TEXT NOT NULL,
    path TEXT,
    line INTEGER,
    content_hash TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('indexed', 'failed')),
    error TEXT,
    added_at TEXT NOT NULL,
    UNIQUE (modality, content_hash)
);
CREATE INDEX IF NOT EXISTS items_by_status ON items (status, modality);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    model TEXT NOT NULL,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    added INTEGER,
    already_present INTEGER,
    skipped INTEGER,
    total INTEGER
);
"""
_COLUMNS = "id, modality, source, path, line, content_hash, status, error, added_at"
REBUILD_HINT = (
    "restore the index folder from a backup, or build the index again into a new folder "
    "(onepeace index build --input ... --out NEW_INDEX)"
)


class IndexDamagedError(OnePeaceError, ValueError):
    """The files of an index were damaged or changed outside of it; the message names the file and what to do."""


@dataclass(frozen=True)
class NewItem:
    """An item about to be stored. ``source``: the media file path or the text; ``path``/``line``: its origin."""

    modality: str
    source: str
    content_hash: str
    path: str | None = None
    line: int | None = None


@dataclass(frozen=True)
class ItemInfo:
    """A stored item (``item_id`` is its vector id)."""

    item_id: int
    modality: str
    source: str
    path: str | None
    line: int | None
    content_hash: str
    status: str
    error: str | None
    added_at: str


def now() -> str:
    """The current UTC time as ISO 8601 with seconds."""
    return datetime.now(UTC).isoformat(timespec="seconds")


class MetadataStore:
    """The ``items``/``info``/``runs`` tables of one SQLite file."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self.conn = conn
        self.path = path

    # ------------------------------------------------------------------------------------------ opening
    @classmethod
    def create(cls, path: Path, model_name: str, dim: int) -> MetadataStore:
        """A new store at ``path`` (which must not exist) recording ``model_name`` and ``dim``.

        Not atomic by itself: :meth:`EmbeddingIndex.create` builds the store in a temporary folder and renames it.
        """
        if path.exists():
            raise FileExistsError(f"{path} already exists")
        store = cls(_connect(path, readonly=False), path)
        store.conn.executescript(_SCHEMA)
        values = {"format": FORMAT_VERSION, "model": model_name, "dim": str(dim), "created": now()}
        with store.transaction():
            store.conn.executemany("INSERT INTO info (key, value) VALUES (?, ?)", values.items())
        return store

    @classmethod
    def open(cls, path: Path, readonly: bool = True) -> MetadataStore:
        """The existing store at ``path``; raises ``ValueError`` if it is not an index of a known format.

        Damaged pages raise :class:`IndexDamagedError` (``PRAGMA quick_check`` runs first).
        """
        try:
            store = cls(_connect(path, readonly), path)
        except sqlite3.DatabaseError as exc:
            raise _unusable(path, exc, "SQLite") from None
        try:
            problems = _quick_check(store.conn)
            if problems:
                more = f" and {len(problems) - 1} more problem(s)" if len(problems) > 1 else ""
                raise _unusable(path, sqlite3.DatabaseError(problems[0] + more), "SQLite quick_check")
            info = store.info()
        except sqlite3.DatabaseError as exc:
            store.close()
            raise _unusable(path, exc, "SQLite") from None
        except BaseException:
            store.close()
            raise
        if info.get("format") != FORMAT_VERSION or "model" not in info or "dim" not in info:
            store.close()
            raise ValueError(f"{path}: unknown index format {info.get('format')!r} (expected {FORMAT_VERSION})")
        return store

    def close(self) -> None:
        self.conn.close()

    # ------------------------------------------------------------------------------------------ transactions
    def begin(self) -> None:
        """Start a write transaction (taken at once, so a concurrent writer fails here rather than later)."""
        self.conn.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self.conn.commit()

    def rollback(self) -> None:
        self.conn.rollback()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """``begin`` ... ``commit``, or ``rollback`` if the block raises."""
        self.begin()
        try:
            yield
        except BaseException:
            self.rollback()
            raise
        self.commit()

    # ------------------------------------------------------------------------------------------ reading
    def snapshot(self) -> tuple[dict[str, str], set[int]]:
        """``(info, ids of the indexed items)`` read in one read transaction, i.e. as of the same commit."""
        self.conn.execute("BEGIN")
        try:
            return self.info(), set(self.indexed_ids())
        finally:
            self.conn.execute("COMMIT")

    def info(self) -> dict[str, str]:
        """The ``info`` table as a dict."""
        return dict(self.conn.execute("SELECT key, value FROM info").fetchall())

    def count(self, status: str = STATUS_INDEXED, modality: str | None = None) -> int:
        """How many items have ``status`` (and ``modality``, if given)."""
        sql, args = "SELECT COUNT(*) FROM items WHERE status = ?", [status]
        if modality is not None:
            sql, args = sql + " AND modality = ?", [*args, modality]
        return int(self.conn.execute(sql, args).fetchone()[0])

    def indexed_ids(self, modality: str | None = None) -> list[int]:
        """Ids of the items whose vectors should be in faiss, optionally of one modality, in id order."""
        sql, args = "SELECT id FROM items WHERE status = ?", [STATUS_INDEXED]
        if modality is not None:
            sql, args = sql + " AND modality = ?", [*args, modality]
        return [row[0] for row in self.conn.execute(sql + " ORDER BY id", args)]

    def statuses(self) -> dict[tuple[str, str], str]:
        """``{(modality, content_hash): status}`` of every stored item."""
        rows = self.conn.execute("SELECT modality, content_hash, status FROM items")
        return {(m, h): s for m, h, s in rows}

    def items(self, ids: Iterable[int]) -> dict[int, ItemInfo]:
        """The stored items among ``ids`` (unknown ids are left out)."""
        wanted = sorted({int(i) for i in ids})
        found: dict[int, ItemInfo] = {}
        for start in range(0, len(wanted), 500):  # stay below SQLite's limit on bound parameters
            chunk = wanted[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            for row in self.conn.execute(f"SELECT {_COLUMNS} FROM items WHERE id IN ({marks})", chunk):
                found[row[0]] = ItemInfo(*row)
        return found

    # ------------------------------------------------------------------------------------------ writing
    def set_info(self, values: dict[str, str]) -> None:
        """Insert or replace ``info`` entries, inside the caller's transaction."""
        self.conn.executemany("INSERT OR REPLACE INTO info (key, value) VALUES (?, ?)", values.items())

    def insert_indexed(self, items: Sequence[NewItem]) -> list[int]:
        """Insert ``items`` as indexed, inside the caller's transaction; returns their new ids (the vector ids).

        A ``failed`` row for the same content is replaced; an ``indexed`` one raises ``ValueError``.
        """
        ids = []
        stamp = now()
        for item in items:
            self.conn.execute(
                "DELETE FROM items WHERE modality = ? AND content_hash = ? AND status = ?",
                (item.modality, item.content_hash, STATUS_FAILED),
            )
            try:
                cursor = self.conn.execute(
                    "INSERT INTO items (modality, source, path, line, content_hash, status, added_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (item.modality, item.source, item.path, item.line, item.content_hash, STATUS_INDEXED, stamp),
                )
            except sqlite3.IntegrityError:
                raise ValueError(f"{item.modality} {item.source!r} is already in the index") from None
            ids.append(int(cursor.lastrowid))
        return ids

    def record_failures(self, failures: Sequence[tuple[NewItem, str]]) -> None:
        """Store (or update) ``(item, reason)`` pairs as ``failed`` rows; commits. Indexed rows are left alone."""
        stamp = now()
        with self.transaction():
            for item, reason in failures:
                self.conn.execute(
                    "INSERT INTO items (modality, source, path, line, content_hash, status, error, added_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (modality, content_hash) DO UPDATE SET "
                    "source = excluded.source, path = excluded.path, line = excluded.line, "
                    "error = excluded.error, added_at = excluded.added_at WHERE status = ?",
                    (
                        item.modality,
                        item.source,
                        item.path,
                        item.line,
                        item.content_hash,
                        STATUS_FAILED,
                        reason,
                        stamp,
                        STATUS_FAILED,
                    ),
                )

    def start_run(self, model_name: str) -> int:
        """Record the start of a build; returns its run id (committed at once)."""
        with self.transaction():
            cursor = self.conn.execute("INSERT INTO runs (model, started_at) VALUES (?, ?)", (model_name, now()))
        return int(cursor.lastrowid)

    def finish_run(self, run_id: int, added: int, already_present: int, skipped: int, total: int) -> None:
        """Record the end of build ``run_id`` and its counts."""
        with self.transaction():
            self.conn.execute(
                "UPDATE runs SET finished_at = ?, added = ?, already_present = ?, skipped = ?, total = ? WHERE id = ?",
                (now(), added, already_present, skipped, total, run_id),
            )


def _quick_check(conn: sqlite3.Connection) -> list[str]:
    """The problems ``PRAGMA quick_check`` reports (empty when the file is sound); it reads every page."""
    try:
        return [row[0] for row in conn.execute("PRAGMA quick_check").fetchall() if row[0] != "ok"]
    except sqlite3.DatabaseError as exc:
        if "not a database" in str(exc):
            raise  # not an SQLite file at all
        return [str(exc)]


def _unusable(path: Path, exc: sqlite3.DatabaseError, source: str) -> ValueError:
    """The error for a metadata file SQLite cannot use: not an index at all, or a damaged one."""
    message = " ".join(str(exc).split())[:200]
    if "not a database" in message or "no such table" in message:
        return ValueError(f"{path} is not an index metadata file ({message})")
    return IndexDamagedError(f"the index metadata {path} is damaged ({source}: {message}); {REBUILD_HINT}")


def _connect(path: Path, readonly: bool) -> sqlite3.Connection:
    """A connection in autocommit mode (the store opens its transactions explicitly), WAL journal when writable."""
    if readonly:
        return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None, timeout=30)
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
    except BaseException:
        conn.close()
        raise
    return conn
