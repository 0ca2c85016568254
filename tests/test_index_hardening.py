"""Hostile and broken inputs for ``onepeace index`` (issue 16, items 5, 6, 7, 10 and 17).

The model is replaced by :class:`ContentModel`, whose embedding of an input is a known function of its bytes, so a
stored vector can be checked exactly against the content it must have come from, and no test waits for the real
model to load.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from onepeace import cli_embed
from onepeace.cli import main
from onepeace.search import EmbeddingIndex, IndexDamagedError, NewItem, Skipped, build_index
from onepeace.search.index import META_FILE, VECTORS_FILE

faiss = pytest.importorskip("faiss")

DIM = 8
NAME = "content-model"


def content_vector(data: bytes) -> np.ndarray:
    """The unit vector ``[DIM]`` that :class:`ContentModel` gives to ``data`` (seeded by its sha256)."""
    seed = int.from_bytes(hashlib.sha256(data).digest()[:8], "little")
    vector = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return vector / np.linalg.norm(vector)


class ContentModel:
    """Embeds texts (their UTF-8 bytes) and media files (their bytes, read at embedding time, as a model does)."""

    modalities = ("text", "image", "audio")

    def __init__(self) -> None:
        self.cfg = SimpleNamespace(embed_dim=DIM)
        self.embedded: list[str] = []
        self.long_audio = "first"

    def read(self, modality: str, payload: str) -> bytes:
        return payload.encode("utf-8") if modality == "text" else Path(payload).read_bytes()

    def embed(self, **inputs: Any) -> SimpleNamespace:
        out = {}
        for modality in self.modalities:
            payloads = inputs.get(modality)
            if payloads is not None:
                self.embedded.extend(payloads)
                rows = [content_vector(self.read(modality, p)) for p in payloads]
                out[modality] = torch.from_numpy(np.stack(rows))
        return SimpleNamespace(**out)

    def compose(self, **inputs: Any) -> torch.Tensor:
        return self.embed(**{k: v for k, v in inputs.items() if v is not None}).text[0]


@pytest.fixture
def model(monkeypatch: pytest.MonkeyPatch) -> ContentModel:
    """A fresh :class:`ContentModel`, also used by the command line instead of loading a model."""
    made = ContentModel()
    monkeypatch.setattr(cli_embed, "load_model", lambda *args: made)
    return made


def _cli(capsys: pytest.CaptureFixture, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _within(seconds: float, fn: Callable[[], Any]) -> Any:
    """``fn()`` run on a daemon thread; fails the test when it has not returned after ``seconds``."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised on the test's thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s (it hangs)"
    if "error" in box:
        raise box["error"]
    return box["value"]


def _rows(index: Path) -> list[tuple[int, str, str, str]]:
    """``(id, source, content_hash, status)`` of every item row, by id."""
    conn = sqlite3.connect(index / META_FILE)
    try:
        return conn.execute("SELECT id, source, content_hash, status FROM items ORDER BY id").fetchall()
    finally:
        conn.close()


def _text_index(path: Path, n: int, text_bytes: int = 16) -> np.ndarray:
    """An index of ``n`` texts (each padded to about ``text_bytes``) with their ContentModel vectors ``[n, DIM]``."""
    texts = [f"text {i} ".ljust(text_bytes, "x") for i in range(n)]
    vectors = np.stack([content_vector(t.encode()) for t in texts])
    items = [NewItem("text", t, hashlib.sha256(t.encode()).hexdigest()) for t in texts]
    with EmbeddingIndex.create(path, NAME, DIM) as index:
        for start in range(0, n, 50):
            index.add(items[start : start + 50], vectors[start : start + 50])
    return vectors


# ----------------------------------------------------------------------------------------------- item 5
@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
def test_item05_fifo_or_device_in_folder_is_skipped(
    kind: str, model: ContentModel, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Item 5: a FIFO named ``*.png`` or a symlink to ``/dev/zero`` is skipped and named, the build ends."""
    folder = tmp_path / "gallery"
    folder.mkdir()
    (folder / "real.png").write_bytes(b"image bytes")
    (folder / "caption.txt").write_text("a caption\n")
    hostile = folder / "hostile.png"
    if kind == "fifo":
        os.mkfifo(hostile)
    else:
        hostile.symlink_to("/dev/zero")
    argv = ["index", "build", "--input", str(folder), "--out", str(tmp_path / "index"), "--quiet"]
    code, out, err = _within(10, lambda: _cli(capsys, argv))
    what = "a FIFO" if kind == "fifo" else "a character device"
    assert code == 0, err
    assert f"skipped {hostile}: not a regular file ({what})" in err
    assert "added 2; already present 0; skipped 1;" in out
    assert sorted(source for _, source, _, _ in _rows(tmp_path / "index")) == [str(folder / "real.png"), "a caption"]
    collected = _within(10, lambda: cli_embed.collect([str(folder)], [], []))  # onepeace embed walks the same way
    assert [(item.modality, Path(item.payload).name) for item in collected.items] == [
        ("text", "a caption"),
        ("image", "real.png"),
    ]
    assert collected.skipped == 1


# ----------------------------------------------------------------------------------------------- item 6
def test_item06_file_symlink_loop_is_skipped(
    model: ContentModel, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Item 6: a file symlink loop (in a folder or a manifest) is skipped and named; the rest is indexed."""
    folder = tmp_path / "gallery"
    folder.mkdir()
    (folder / "real.png").write_bytes(b"image bytes")
    (folder / "a.png").symlink_to("b.png")
    (folder / "b.png").symlink_to("a.png")
    manifest = tmp_path / "list.lst"
    manifest.write_text("gallery/a.png\ngallery/real.png\n")
    argv = ["index", "build", "--input", str(folder), "--input", str(manifest), "--out", str(tmp_path / "index")]
    code, out, err = _cli(capsys, [*argv, "--quiet"])
    assert code == 0, err
    assert err.count(f"skipped {folder / 'a.png'}: a symbolic link loop") == 2  # from the folder and the manifest
    assert err.count(f"skipped {folder / 'b.png'}: a symbolic link loop") == 1
    assert "Traceback" not in err
    assert "added 1; already present 0; skipped 3; duplicates 1;" in out
    assert [row[1:] for row in _rows(tmp_path / "index")] == [
        (str(folder / "real.png"), hashlib.sha256(b"image bytes").hexdigest(), "indexed")
    ]
    collected = cli_embed.collect([str(folder)], [], [])
    assert [Path(item.payload).name for item in collected.items] == ["real.png"] and collected.skipped == 2


# ----------------------------------------------------------------------------------------------- item 7
def _corrupt_pages(file: Path, first_page: int, pages: int) -> None:
    """Overwrite ``pages`` pages of a SQLite file from ``first_page`` (0-based) with fixed garbage."""
    data = bytearray(file.read_bytes())
    size = int.from_bytes(data[16:18], "big")
    assert len(data) >= (first_page + pages) * size
    garbage = np.random.default_rng(7).integers(0, 256, pages * size, dtype=np.uint8).tobytes()
    data[first_page * size : (first_page + pages) * size] = garbage
    file.write_bytes(bytes(data))


def test_item07_damaged_sqlite_is_one_clear_error(
    model: ContentModel, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Item 7: damaged SQLite pages stop ``index search``, ``index build`` and ``serve`` with one line."""
    index = tmp_path / "index"
    _text_index(index, 200, text_bytes=400)
    assert len(EmbeddingIndex.open(index)) == 200
    _corrupt_pages(index / META_FILE, 6, 4)
    code, out, err = _cli(capsys, ["index", "search", str(index), "--text", "text 3"])
    expected = f"onepeace: error: the index metadata {index / META_FILE} is damaged (SQLite quick_check:"
    assert (code, out) == (2, "") and err.startswith(expected) and len(err.splitlines()) == 1, err
    assert "restore the index folder from a backup, or build the index again" in err
    (tmp_path / "x.txt").write_text("one more text\n")
    code, out, err = _cli(capsys, ["index", "build", "--input", str(tmp_path / "x.txt"), "--out", str(index)])
    assert (code, out) == (2, "") and err.startswith(expected) and len(err.splitlines()) == 1, err
    assert model.embedded == []
    pytest.importorskip("fastapi")
    from onepeace.serve.app import create_app

    with pytest.raises(ValueError, match="is damaged") as raised:
        create_app(index, model=model)
    assert str(raised.value) == err.removeprefix("onepeace: error: ").strip()
    schema = tmp_path / "schema"  # a damaged schema page fails as early as the journal setup of a writable open
    _text_index(schema, 5)
    data = bytearray((schema / META_FILE).read_bytes())
    data[100:160] = b"\xff" * 60
    (schema / META_FILE).write_bytes(bytes(data))
    for writable in (False, True):
        with pytest.raises(IndexDamagedError, match=f"the index metadata {schema / META_FILE} is damaged"):
            EmbeddingIndex.open(schema, writable=writable)


# ----------------------------------------------------------------------------------------------- item 10
def _tamper(index: Path, kind: str) -> None:
    """Damage ``vectors.faiss`` the way the probe did."""
    file = index / VECTORS_FILE
    if kind in ("deleted", "fifo"):
        file.unlink()
        if kind == "fifo":
            os.mkfifo(file)
        return
    vectors = faiss.read_index(str(file))
    flat = faiss.downcast_index(vectors.index)
    codes = faiss.vector_to_array(flat.codes)
    floats = codes.view(np.float32)
    if kind == "flipped":  # lowest mantissa bit of one value: norms and scores move by about 1e-8
        codes[4 * 5] ^= 1
    elif kind == "scaled":
        floats *= 3.0
    elif kind == "nan":
        floats[DIM * 2] = np.nan
    if kind == "ids":  # two ids swapped: each row now names the other's vector
        ids = faiss.vector_to_array(vectors.id_map)
        ids[[0, 1]] = ids[[1, 0]]
        faiss.copy_array_to_vector(ids, vectors.id_map)
    else:
        faiss.copy_array_to_vector(codes, flat.codes)
    faiss.write_index(vectors, str(file))


@pytest.mark.parametrize("kind", ["flipped", "scaled", "nan", "ids", "deleted", "fifo"])
def test_item10_damaged_vectors_are_refused(
    kind: str, model: ContentModel, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Item 10: a changed or deleted ``vectors.faiss`` is an error for search and build, never hits or a re-embed."""
    index = tmp_path / "index"
    _text_index(index, 20)
    before = _rows(index)
    _tamper(index, kind)
    code, out, err = _within(10, lambda: _cli(capsys, ["index", "search", str(index), "--text", "text 3"]))
    assert (code, out) == (2, "") and len(err.splitlines()) == 1, err
    if kind == "deleted":
        assert err.startswith(f"onepeace: error: the index {index} holds 20 item(s) but {index / VECTORS_FILE} is")
    elif kind == "fifo":
        assert err.startswith(f"onepeace: error: {index / VECTORS_FILE} is not a regular file;")
    else:
        assert err.startswith(f"onepeace: error: {index / VECTORS_FILE} does not match the checksum recorded")
    assert "build the index again" in err
    (tmp_path / "more.txt").write_text("text 3\nanother text\n")
    code, out, err_build = _cli(capsys, ["index", "build", "--input", str(tmp_path / "more.txt"), "--out", str(index)])
    assert (code, out, err_build) == (2, "", err)
    assert _rows(index) == before and model.embedded == []
    with pytest.raises(ValueError, match="checksum|holds 20 item|not a regular file"):
        EmbeddingIndex.open(index, writable=True)


def test_item10_vectors_must_be_finite_unit_rows(tmp_path: Path) -> None:
    """Item 10: ``add`` refuses vectors that are not unit norm or hold NaN, and stores nothing."""
    vectors = np.stack([content_vector(b"a"), content_vector(b"b")])
    items = [NewItem("text", "a", "ha"), NewItem("text", "b", "hb")]
    with EmbeddingIndex.create(tmp_path / "index", NAME, DIM) as index:
        with pytest.raises(ValueError, match=r"vectors must be L2-normalised: row 1 has norm 3\.0000"):
            index.add(items, vectors * np.array([[1.0], [3.0]], dtype=np.float32))
        bad = vectors.copy()
        bad[0, 3] = np.nan
        with pytest.raises(ValueError, match="NaN"):
            index.add(items, bad)
        assert len(index) == 0 and index.store.statuses() == {}
        assert index.add(items, vectors) == [1, 2]
    with EmbeddingIndex.open(tmp_path / "index") as index:
        hit = index.search(vectors[1], k=1)[0]
        assert (hit.item_id, hit.source) == (2, "b") and abs(hit.score - 1.0) < 1e-6


def test_item10_index_without_checksums_gets_them(tmp_path: Path) -> None:
    """Item 10: an index written before checksums were kept opens, and its first writable open records them."""
    index = tmp_path / "index"
    vectors = _text_index(index, 5)
    keys = "('vectors_count', 'vectors_sha256', 'ids_sha256')"
    conn = sqlite3.connect(index / META_FILE)
    with conn:
        recorded = dict(conn.execute(f"SELECT key, value FROM info WHERE key IN {keys}").fetchall())
        conn.execute(f"DELETE FROM info WHERE key IN {keys}")
    conn.close()
    assert sorted(recorded) == ["ids_sha256", "vectors_count", "vectors_sha256"]
    with EmbeddingIndex.open(index) as opened:
        assert len(opened) == 5 and opened.search(vectors[2], k=1)[0].source.startswith("text 2 ")
        assert "vectors_count" not in opened.store.info()  # reading writes nothing
    with EmbeddingIndex.open(index, writable=True) as opened:
        assert {k: opened.store.info()[k] for k in recorded} == recorded
    _tamper(index, "scaled")
    with pytest.raises(ValueError, match="the vectors differ"):
        EmbeddingIndex.open(index)


# ----------------------------------------------------------------------------------------------- item 17
class ChangingModel(ContentModel):
    """Rewrites a file each time it is about to be embedded, with the next of its ``changes`` (after hashing)."""

    def __init__(self, changes: dict[Path, list[bytes]]) -> None:
        super().__init__()
        self.changes = changes

    def read(self, modality: str, payload: str) -> bytes:
        if self.changes.get(Path(payload)):
            Path(payload).write_bytes(self.changes[Path(payload)].pop(0))
        return super().read(modality, payload)


def test_item17_file_changed_while_indexed_is_stored_once(tmp_path: Path) -> None:
    """Item 17: a file rewritten between hashing and embedding is stored under the hash of what was embedded."""
    folder = tmp_path / "gallery"
    folder.mkdir()
    files = {name: folder / f"{name}.png" for name in ("changes", "copies", "flaky", "stays")}
    for name, path in files.items():
        path.write_bytes(name.encode())
    changes = {files["changes"]: [b"new"], files["copies"]: [b"stays"], files["flaky"]: [b"v2", b"v3"]}
    first = build_index(ChangingModel(changes), folder, tmp_path / "index", progress=False, model_name=NAME)
    assert (first.added, first.duplicates, first.size) == (2, 1, 2)  # copies.png became a copy of stays.png
    assert first.skipped == (Skipped(str(files["flaky"]), "the file kept changing while it was indexed"),)
    second_model = ContentModel()
    second = build_index(second_model, folder, tmp_path / "index", progress=False)
    assert (second.added, second.already_present, second.size) == (1, 2, 3)
    assert second_model.embedded == [str(files["flaky"])]  # not the changed one again
    rows = {source: digest for _, source, digest, _ in _rows(tmp_path / "index")}
    assert rows == {str(files[name]): hashlib.sha256(data).hexdigest() for name, data in
                    (("changes", b"new"), ("stays", b"stays"), ("flaky", b"v3"))}  # fmt: skip
    with EmbeddingIndex.open(tmp_path / "index") as index:
        for name, data in (("changes", b"new"), ("flaky", b"v3")):
            hit = index.search(content_vector(data), k=1)[0]
            assert hit.source == str(files[name]) and abs(hit.score - 1.0) < 1e-6


def test_item10_readers_opening_during_a_build_see_a_consistent_index(tmp_path: Path) -> None:
    """Item 10: opening an index while a build commits never mistakes the newer vectors file for damage."""
    index = tmp_path / "index"
    texts = [f"text {i}" for i in range(240)]
    vectors = np.stack([content_vector(t.encode()) for t in texts])
    EmbeddingIndex.create(index, NAME, DIM).close()
    done = threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            with EmbeddingIndex.open(index, writable=True) as writer:
                for start in range(0, len(texts), 2):
                    chunk = [
                        NewItem("text", t, hashlib.sha256(t.encode()).hexdigest()) for t in texts[start : start + 2]
                    ]
                    writer.add(chunk, vectors[start : start + 2])
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=write)
    thread.start()
    sizes = []
    while not done.is_set():
        try:
            with EmbeddingIndex.open(index) as reader:
                sizes.append(len(reader))
        except BaseException as exc:
            errors.append(exc)
            break
    thread.join()
    assert errors == [] and len(sizes) > 10
    assert sizes == sorted(sizes) and all(n % 2 == 0 for n in sizes)  # whole commits only, never going back
    with EmbeddingIndex.open(index) as reader:
        assert len(reader) == 240 and reader.search(vectors[123], k=1)[0].source == "text 123"
