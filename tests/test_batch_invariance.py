"""An item's embedding does not depend on what else is in its batch, at every entry point.

Every check compares items embedded alone with the same items in mixed batches of 2 to 8 items of different lengths
(fp32, max abs difference 1e-5): the API (``embed``, ``compose``), ``onepeace embed``, ``index build`` and search,
the HTTP service (one request with several clips, and concurrent requests the batcher groups), ``onepeace evaluate
retrieval`` for several ``--batch-size`` values, and fine-tuning evaluation. The model is the official fixture
model, whose weights make every part of the network matter. ``batch_invariant=False`` keeps the official
batch-dependent audio path, which the fixture parity tests use; one test shows it is really different.
"""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import official
import pytest
import torch

import onepeace
from onepeace.cli import main

soundfile = pytest.importorskip("soundfile")

TOL = 1e-5
RATE = 16000
# samples per clip: 0.6 s (tiled to 1 s by preprocessing) up to 3.5 s, so batches pad by up to 2.5 s
LENGTHS = [9600, 16000, 16001, 20000, 27200, 33333, 41000, 56000]
# words of the fixture's own texts: its token table holds only their rows (others embed as one zero row)
TEXTS = [
    "hello",
    "a dog",
    "two cats sleeping on a red sofa",
    "a dog is running on the grass next to a small lamp, two cats sleeping on a red sofa!",
    "a red lamp",
    " ".join(["the dog is running"] * 10),
    "a small dog is sleeping on the sofa.",
    "cats",
]


def _clips() -> list[np.ndarray]:
    rng = np.random.default_rng(15)
    t = [np.arange(n) / RATE for n in LENGTHS]
    return [
        (0.3 * np.sin(2 * np.pi * rng.uniform(150, 2000) * x) + 0.05 * rng.standard_normal(x.shape)).astype(np.float32)
        for x in t
    ]


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(16)
    sizes = [(40, 48), (64, 64), (90, 30), (17, 120), (64, 80), (33, 33), (128, 96), (50, 70)]
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


INPUTS = {"text": TEXTS, "image": _images(), "audio": _clips()}


@pytest.fixture(scope="module")
def model(official_checkpoint: Path) -> onepeace.OnePeace:
    return onepeace.load(official_checkpoint)


@pytest.fixture(scope="module")
def alone(model: onepeace.OnePeace) -> dict[str, torch.Tensor]:
    """Each item of :data:`INPUTS` embedded on its own: ``{modality: [8, D]}``."""
    return {m: torch.cat([getattr(model.embed(**{m: [x]}), m) for x in items]) for m, items in INPUTS.items()}


def _batches(n_items: int) -> list[list[int]]:
    """Index lists of sizes 2..8, shuffled so that short items meet longer ones in both orders."""
    rng = np.random.default_rng(n_items)
    return [list(rng.permutation(n_items)[:size]) for size in range(2, n_items + 1)]


def _max_diff(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


# --------------------------------------------------------------------------------------------------------- the API
@pytest.mark.parametrize("modality", ["text", "image", "audio"])
def test_api_mixed_batches_equal_items_alone(model, alone, modality: str) -> None:
    items = INPUTS[modality]
    for idx in _batches(len(items)):
        got = getattr(model.embed(**{modality: [items[i] for i in idx]}, batch_size=len(idx)), modality)
        assert _max_diff(got, alone[modality][idx]) <= TOL, (modality, idx)
    for batch_size in (1, 3, 8):
        got = getattr(model.embed(**{modality: items}, batch_size=batch_size), modality)
        assert _max_diff(got, alone[modality]) <= TOL, (modality, batch_size)


def test_official_option_is_batch_dependent(official_checkpoint: Path, alone) -> None:
    """The official path really differs in a mixed batch (so the tests above can fail), and not for a clip alone."""
    legacy = onepeace.load(official_checkpoint, batch_invariant=False)
    clips = INPUTS["audio"]
    alone_legacy = torch.cat([legacy.embed(audio=[c]).audio for c in clips])
    assert _max_diff(alone_legacy, alone["audio"]) <= TOL  # alone there is no padding: both paths agree
    mixed = legacy.embed(audio=clips, batch_size=len(clips)).audio
    assert _max_diff(mixed, alone["audio"]) > 1e-3


def test_clip_in_a_batch_equals_the_official_code_for_it_alone(model) -> None:
    """The fixture's clip 0 is the longest of the official batch, so the official output for it is that of the clip
    alone; batched with the other two clips and with longer ones it keeps that value."""
    inputs, expected = official.inputs(), official.outputs()["audio.embedding"][0]
    raws = [inputs[f"audio.raw_waveform_{i}"].numpy() for i in range(3)]
    for batch in ([raws[0]], raws, [*raws, *INPUTS["audio"][5:]]):
        got = model.embed(audio=batch, batch_size=len(batch)).audio[0]
        assert _max_diff(got, expected) <= TOL


def test_compose_equals_the_mean_of_items_alone(model, alone) -> None:
    got = model.compose(text=TEXTS[:3], audio=INPUTS["audio"][:4])
    parts = torch.cat([alone["text"][:3], alone["audio"][:4]])
    want = torch.nn.functional.normalize(parts.mean(0), dim=-1)
    assert _max_diff(got, want) <= TOL


# --------------------------------------------------------------------------------------------------------- the CLI
def _write_media(folder: Path) -> dict[str, list[Path]]:
    """The clips as 32-bit float WAV and the images as PNG (both lossless): ``{modality: paths}``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, list[Path]] = {"audio": [], "image": []}
    for i, clip in enumerate(INPUTS["audio"]):
        paths["audio"].append(folder / f"clip{i}.wav")
        soundfile.write(paths["audio"][-1], clip, RATE, subtype="FLOAT")
    for i, pixels in enumerate(INPUTS["image"]):
        paths["image"].append(folder / f"image{i}.png")
        Image.fromarray(pixels).save(paths["image"][-1])
    return paths


def test_cli_embed_batched_equals_each_item_alone(official_checkpoint: Path, alone, tmp_path: Path) -> None:
    media = _write_media(tmp_path / "media")
    base = ["--model", str(official_checkpoint), "--quiet"]
    texts = [arg for t in TEXTS for arg in ("--text", t)]
    files = [str(p) for m in ("image", "audio") for p in media[m]]
    assert main(["embed", *files, *texts, "--batch-size", "8", "--out", str(tmp_path / "all"), *base]) == 0
    together = np.load(tmp_path / "all.npy")
    rows = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    for row, vector in zip(rows, together, strict=True):
        m = row["modality"]
        i = TEXTS.index(row["text"]) if m == "text" else media[m].index(Path(row["source"]))
        assert _max_diff(vector, alone[m][i]) <= TOL, row
    for argv in ([str(media["audio"][0])], [str(media["image"][3])], ["--text", TEXTS[3]]):
        assert main(["embed", *argv, "--out", str(tmp_path / "one"), *base]) == 0
        one = json.loads((tmp_path / "one.jsonl").read_text())
        row = [(r["modality"], r.get("text"), r["source"]) for r in rows].index(
            (one["modality"], one.get("text"), one["source"])
        )
        assert _max_diff(np.load(tmp_path / "one.npy")[0], together[row]) <= TOL, one


# --------------------------------------------------------------------------------------------------------- the index
@pytest.fixture(scope="module")
def index_dir(model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from onepeace.search.build import build_index

    folder = tmp_path_factory.mktemp("gallery")
    _write_media(folder / "media")
    (folder / "texts.txt").write_text("".join(t + "\n" for t in TEXTS), encoding="utf-8")
    out = tmp_path_factory.mktemp("index") / "idx"
    build_index(model, folder, out, model_name="fixture", batch_size=8, progress=False)
    return out


def test_indexed_items_queried_with_themselves_come_first(index_dir: Path, alone) -> None:
    from onepeace.search.index import EmbeddingIndex

    names = {"audio": "clip{}.wav", "image": "image{}.png"}
    with EmbeddingIndex.open(index_dir) as index:
        assert len(index) == 3 * len(LENGTHS)
        for modality, queries in alone.items():
            for i, query in enumerate(queries.numpy()):
                top = index.search(query, k=2, modality=modality)[0]
                want = TEXTS[i].strip() if modality == "text" else names[modality].format(i)
                assert (top.source.strip() if modality == "text" else Path(top.source).name) == want
                assert top.score >= 1 - TOL


# --------------------------------------------------------------------------------------------------------- HTTP
@pytest.mark.slow
def test_http_batches_equal_items_alone(model, index_dir: Path, alone, tmp_path: Path) -> None:
    import base64

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from onepeace.serve import ServeSettings, create_app

    media = _write_media(tmp_path / "media")
    encoded = {m: [base64.b64encode(p.read_bytes()).decode() for p in paths] for m, paths in media.items()}
    inputs = {**encoded, "text": TEXTS}
    settings = ServeSettings(batch_wait_ms=200, timeout_s=60)
    with TestClient(create_app(index_dir, model=model, settings=settings)) as client:

        def post(modality: str, data: str | list[str]) -> np.ndarray:
            answer = client.post("/v1/embeddings", json={"input": data, "modality": modality})
            assert answer.status_code == 200, answer.text
            return np.array([d["embedding"] for d in answer.json()["data"]])

        for modality, data in inputs.items():
            assert _max_diff(post(modality, data), alone[modality]) <= TOL, modality  # one request, one batch
            with ThreadPoolExecutor(len(data)) as pool:  # concurrent requests the batcher groups
                concurrent = np.concatenate(list(pool.map(lambda x, m=modality: post(m, x), data)))
            assert _max_diff(concurrent, alone[modality]) <= TOL, modality
        batching = client.get("/metrics").json()["batching"]
    assert batching["max_batch_size"] >= len(LENGTHS)


# --------------------------------------------------------------------------------------------------------- evaluation
def _corpus_with_varied_clips(root: Path) -> Path:
    from test_evaluate import write_corpus

    write_corpus(root)
    clips = iter(INPUTS["audio"][3:])
    for path in sorted((root / "media").iterdir()):
        if path.suffix in (".wav", ".flac"):
            soundfile.write(path, next(clips), RATE)
    return root


@pytest.mark.slow
def test_evaluate_gives_the_same_numbers_for_every_batch_size(tmp_path: Path) -> None:
    """On the shipped model: the fixture's token table holds only the rows its own texts use, so its zero-shot
    prompts ("someone saying seven" / "... nine") embed identically and rank by rounding noise."""
    from onepeace.evaluate.heldout import load_corpus
    from onepeace.evaluate.retrieval import build_protocol, embed_protocol

    root = _corpus_with_varied_clips(tmp_path / "corpus")
    results, tables = [], []
    model = onepeace.load("onepeace-small")
    protocol = build_protocol(load_corpus(root))
    for batch_size in (1, 3, 16):
        out = tmp_path / f"eval{batch_size}"
        argv = ["evaluate", "retrieval", "--model", "onepeace-small", "--data", str(root), "--out", str(out)]
        assert main([*argv, "--batch-size", str(batch_size), "--quiet"]) == 0
        data = json.loads((out / "metrics.json").read_text())
        results.append({k: data[k] for k in ("retrieval", "zero_shot")})
        tables.append(embed_protocol(model, protocol, batch_size, progress=False))
    assert results[0] == results[1] == results[2]
    for table in tables[1:]:
        for modality, vectors in table.vectors.items():
            assert _max_diff(vectors, tables[0].vectors[modality]) <= TOL, modality


@pytest.mark.slow
def test_finetune_evaluation_is_the_same_for_every_eval_batch_size(tmp_path: Path) -> None:
    from onepeace.finetune.build import build_task_model
    from onepeace.finetune.config import load_finetune_recipe
    from onepeace.finetune.data import build_task_loader
    from onepeace.finetune.validate import evaluate_task, run_model

    recipe = Path(__file__).resolve().parents[1] / "configs" / "finetune" / "tiny" / "vggsound.yaml"
    logits, metrics = [], []
    for batch_size in (1, 5, 16):
        overrides = [f"data.eval_batch_size={batch_size}", "data.max_duration=3.0", f"out_dir={tmp_path}"]
        cfg = load_finetune_recipe(recipe, overrides)
        torch.manual_seed(0)  # the same fresh head every time
        task = build_task_model(cfg)
        audio_cfg = dataclasses.replace(task.model.cfg.audio, max_duration=3.0)
        loader = build_task_loader(cfg, "valid", audio_cfg, 0, 1, epoch=0)
        logits.append(torch.cat(run_model(task, loader).logits))
        metrics.append(evaluate_task(task, cfg, progress=False))
    for other in logits[1:]:
        assert other.shape == logits[0].shape and _max_diff(other, logits[0]) <= TOL
    assert metrics[0] == metrics[1] == metrics[2]
