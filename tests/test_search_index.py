"""``onepeace index build | search`` and ``onepeace.search``: real galleries embedded with ``onepeace-small``.

Covers search through the command line and the Python API, composed queries, resuming after a SIGKILL, skipping
unreadable files, adding to an existing index, repairing a half-written commit, and the error messages.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch.nn.functional as F

import onepeace
from onepeace import cli_embed
from onepeace.cli import main
from onepeace.search import EmbeddingIndex, NewItem, build_index
from onepeace.search.index import META_FILE, VECTORS_FILE

faiss = pytest.importorskip("faiss")
pytest.importorskip("soundfile")

DATA = Path(__file__).parent / "data" / "tiny_pairs"
MODEL = "onepeace-small"


def _pairs() -> list[tuple[Path, str]]:
    """``(image file, caption)`` of tiny_pairs, keeping the first image of each caption."""
    with open(DATA / "image_text.tsv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    seen: dict[str, Path] = {}
    for row in rows:
        seen.setdefault(row["caption"], DATA / row["image"])
    return [(path, caption) for caption, path in seen.items()]


def _clips() -> list[Path]:
    with open(DATA / "audio_text.tsv", encoding="utf-8", newline="") as f:
        return [DATA / row["audio"] for row in csv.DictReader(f, delimiter="\t")]


def _gallery(folder: Path, n_images: int, n_clips: int, n_texts: int, offset: int = 0) -> Path:
    """Copies of real images and clips, and one caption per ``.txt`` file."""
    folder.mkdir(parents=True, exist_ok=True)
    pairs = _pairs()[offset:]
    for image, _ in pairs[:n_images]:
        shutil.copy(image, folder / image.name)
    for clip in _clips()[offset : offset + n_clips]:
        shutil.copy(clip, folder / clip.name)
    for image, caption in pairs[:n_texts]:
        (folder / f"{image.stem}.txt").write_text(caption + "\n", encoding="utf-8")
    return folder


class CountingModel:
    """Wraps a model and counts the inputs it embeds."""

    def __init__(self, model: Any) -> None:
        self.model, self.cfg, self.modalities, self.embedded = model, model.cfg, model.modalities, 0

    def embed(self, **inputs: Any) -> Any:
        self.embedded += sum(len(v) for k, v in inputs.items() if k in ("text", "image", "audio") and v is not None)
        return self.model.embed(**inputs)


@pytest.fixture(scope="module")
def model() -> Any:
    return onepeace.load(MODEL)


@pytest.fixture
def cli_model(model: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The command line gets the already loaded model instead of loading it again."""

    def load(name: str, device: Any, dtype: Any, image_size: Any) -> Any:
        assert name == MODEL
        return model

    monkeypatch.setattr(cli_embed, "load_model", load)
    return model


@pytest.fixture(scope="module")
def built(model: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A gallery of 8 images, 8 clips and 8 captions, and its index."""
    root = tmp_path_factory.mktemp("built")
    folder = _gallery(root / "gallery", 8, 8, 8)
    report = build_index(model, folder, root / "index", batch_size=8, progress=False, model_name=MODEL)
    assert (report.added, report.already_present, report.skipped, report.total, report.size) == (24, 0, (), 24, 24)
    return folder, root / "index"


def _search_json(capsys: pytest.CaptureFixture, index: Path, *query: str) -> list[dict]:
    assert main(["index", "search", str(index), *query, "--json"]) == 0
    return json.loads(capsys.readouterr().out)["hits"]


def _indexed_hashes(index: Path) -> list[str]:
    conn = sqlite3.connect(index / META_FILE)
    try:
        return [row[0] for row in conn.execute("SELECT content_hash FROM items WHERE status = 'indexed'")]
    finally:
        conn.close()


# ----------------------------------------------------------------------------------------------- search
def test_text_search_cli_matches_api(built: tuple[Path, Path], cli_model: Any, capsys: pytest.CaptureFixture) -> None:
    folder, index_dir = built
    image, caption = _pairs()[2]
    hits = _search_json(capsys, index_dir, "--text", caption, "--k", "6")
    with EmbeddingIndex.open(index_dir) as index:
        assert (len(index), index.dim, index.model_name) == (24, 256, MODEL)
        api = index.search(cli_model.embed(text=[caption]).text[0], k=6)
        assert [h["item_id"] for h in hits] == [h.item_id for h in api]
        np.testing.assert_allclose([h["score"] for h in hits], [h.score for h in api], atol=1e-5)
        top = index.item(api[0].item_id)
        assert (top.modality, top.source, Path(top.path).name) == ("text", caption, f"{image.stem}.txt")
        assert api[0].score > 0.999 and index.media_path(api[0].item_id) is None
        images = index.search(cli_model.embed(text=[caption]).text[0], k=3, modality="image")
        assert [h.modality for h in images] == ["image"] * 3
        assert index.media_path(images[0].item_id).parent == folder.resolve()
    assert main(["index", "search", str(index_dir), "--text", caption, "--k", "3"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["rank", "score", "modality", "source"] and len(table) == 4
    assert table[1].split()[:3] == ["1", f"{api[0].score:.4f}", "text"] and table[1].endswith(caption)


def test_modality_filter_cli(built: tuple[Path, Path], cli_model: Any, capsys: pytest.CaptureFixture) -> None:
    _, index_dir = built
    hits = _search_json(capsys, index_dir, "--text", "the sound of a bird", "--modality", "audio", "--k", "20")
    assert len(hits) == 8 and {h["modality"] for h in hits} == {"audio"}
    assert [h["rank"] for h in hits] == list(range(1, 9))
    assert all(a["score"] >= b["score"] for a, b in zip(hits, hits[1:]))


def test_composed_query_equals_manual_compose(
    built: tuple[Path, Path], cli_model: Any, capsys: pytest.CaptureFixture
) -> None:
    folder, index_dir = built
    image, caption = folder / _pairs()[5][0].name, _pairs()[1][1]
    hits = _search_json(capsys, index_dir, "--text", caption, "--image", str(image), "--k", "8")
    emb = cli_model.embed(text=[caption], image=[str(image)])
    manual = F.normalize((emb.text[0] + emb.image[0]) / 2, dim=-1)
    with EmbeddingIndex.open(index_dir) as index:
        expected = index.search(manual, k=8)
        batched = index.search(np.stack([manual.numpy(), emb.text[0].numpy()]), k=8)
    assert [h["item_id"] for h in hits] == [h.item_id for h in expected] == [h.item_id for h in batched[0]]
    np.testing.assert_allclose([h["score"] for h in hits], [h.score for h in expected], atol=1e-5)
    assert batched[1][0].source == caption


# ----------------------------------------------------------------------------------------------- building
def test_resume_after_sigkill(model: Any, tmp_path: Path) -> None:
    folder = _gallery(tmp_path / "gallery", 24, 0, 24)
    out = tmp_path / "index"
    command = [sys.executable, "-m", "onepeace", "index", "build", "--input", str(folder), "--out", str(out)]
    command += ["--commit-every", "2", "--batch-size", "2", "--quiet"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    committed, deadline = 0, time.monotonic() + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if (out / META_FILE).exists():
                try:
                    committed = len(_indexed_hashes(out))
                except sqlite3.Error:  # the index is being created
                    committed = 0
                if committed >= 1:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
            time.sleep(0.02)
    finally:
        if proc.poll() is None and committed == 0:
            proc.kill()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, err.decode()
    before = len(_indexed_hashes(out))  # what the killed build had committed
    assert 1 <= before < 48
    counting = CountingModel(model)
    report = build_index(counting, folder, out, batch_size=8, commit_every=16, progress=False)
    assert report.already_present == before and report.added == 48 - before == counting.embedded
    assert report.size == 48 and report.skipped == ()
    hashes = _indexed_hashes(out)
    expected = {hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.glob("*.png")}
    expected |= {
        hashlib.sha256(p.read_text(encoding="utf-8").strip().encode()).hexdigest() for p in folder.glob("*.txt")
    }
    assert len(hashes) == len(set(hashes)) == 48 and set(hashes) == expected
    with EmbeddingIndex.open(out) as index:
        assert len(index) == 48 and faiss.read_index(str(out / VECTORS_FILE)).ntotal == 48


def test_unreadable_files_are_skipped(cli_model: Any, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = _gallery(tmp_path / "gallery", 2, 1, 0)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    (folder / "cut.ogg").write_bytes(_clips()[5].read_bytes()[:300])
    (folder / "notes.md").write_text("not indexed\n")
    argv = ["index", "build", "--input", str(folder), "--out", str(tmp_path / "index"), "--batch-size", "8"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "added 3; already present 0; skipped 2; duplicates 0; ignored 1" in captured.out
    assert "holds 3 item(s)" in captured.out
    assert f"skipped {(folder / 'broken.png').resolve()}: not a readable image" in captured.err
    assert f"skipped {(folder / 'cut.ogg').resolve()}: cannot decode audio" in captured.err
    assert main([*argv, "--json"]) == 0  # the failed files are tried again, and fail again
    report = json.loads(capsys.readouterr().out)
    assert (report["added"], report["already_present"], report["size"]) == (0, 3, 3)
    assert sorted(Path(s["source"]).name for s in report["skipped"]) == ["broken.png", "cut.ogg"]


def test_rebuild_adds_only_new_files(model: Any, tmp_path: Path) -> None:
    folder = _gallery(tmp_path / "gallery", 2, 1, 1)
    out = tmp_path / "index"
    first = build_index(model, folder, out, progress=False, model_name=MODEL)
    assert (first.added, first.size) == (4, 4)
    _gallery(folder, 4, 2, 2)  # two more images, one more clip, one more caption
    shutil.copy(folder / _pairs()[0][0].name, folder / "copy.png")
    manifest = tmp_path / "extra.jsonl"
    manifest.write_text(json.dumps({"text": "a bird in the snow"}) + "\n" + json.dumps({"path": "gallery"}) + "\n")
    counting = CountingModel(model)
    second = build_index(counting, [folder, manifest], out, progress=False)
    assert (second.added, counting.embedded) == (5, 5)
    assert (second.already_present, second.duplicates, second.size) == (4, 1 + 9, 9)
    with EmbeddingIndex.open(out) as index:
        hit = index.search(model.embed(text=["a bird in the snow"]).text[0], k=1)[0]
        assert (hit.source, Path(index.item(hit.item_id).path).name) == ("a bird in the snow", "extra.jsonl")


def test_interrupted_commit_is_repaired(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((3, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    items = [NewItem("text", f"text {i}", f"hash{i}") for i in range(3)]
    with EmbeddingIndex.create(tmp_path / "index", "a model", 8) as index:
        ids = index.add(items, vectors)
    stored = faiss.read_index(str(tmp_path / "index" / VECTORS_FILE))  # a vector whose row was never committed
    stored.add_with_ids(vectors[:1], np.asarray([max(ids) + 1], dtype=np.int64))
    faiss.write_index(stored, str(tmp_path / "index" / VECTORS_FILE))
    with EmbeddingIndex.open(tmp_path / "index") as index:  # reading ignores it and writes nothing
        assert len(index) == 3 and [h.item_id for h in index.search(vectors[0], k=5)][:1] == [ids[0]]
        assert max(ids) + 1 not in [h.item_id for h in index.search(vectors[0], k=5)]
    with EmbeddingIndex.open(tmp_path / "index", writable=True) as index:
        assert (index.repair.dropped_vectors, len(index)) == (1, 3)
    assert faiss.read_index(str(tmp_path / "index" / VECTORS_FILE)).ntotal == 3
    (tmp_path / "index" / VECTORS_FILE).unlink()  # rows without vectors are an error, never silently dropped
    with pytest.raises(ValueError, match="holds 3 item"):
        EmbeddingIndex.open(tmp_path / "index", writable=True)
    assert len(_indexed_hashes(tmp_path / "index")) == 3


# ----------------------------------------------------------------------------------------------- errors
def _error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_errors(built: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder, index_dir = built
    assert "give a query: --text, --image and/or --audio" in _error(capsys, ["index", "search", str(index_dir)])
    err = _error(capsys, ["index", "search", str(index_dir), "--text", "a cat", "--modality", "video"])
    assert "invalid choice: 'video'" in err
    missing = tmp_path / "missing"
    assert f"onepeace: error: no index at {missing}" in _error(capsys, ["index", "search", str(missing), "--text", "x"])
    err = _error(capsys, ["index", "search", str(folder), "--text", "x"])
    assert "is not an index folder" in err
    err = _error(capsys, ["index", "search", str(index_dir), "--image", str(tmp_path / "nope.png")])
    assert "no such query file" in err
    assert "must be a positive integer" in _error(
        capsys, ["index", "search", str(index_dir), "--text", "x", "--k", "0"]
    )
    err = _error(capsys, ["index", "build", "--input", str(missing), "--out", str(tmp_path / "new")])
    assert "no such file or folder" in err and not (tmp_path / "new").exists()
    err = _error(capsys, ["index", "build", "--input", str(folder), "--out", str(index_dir), "--model", "onepeace-4b"])
    assert f"holds embeddings of {MODEL}" in err
