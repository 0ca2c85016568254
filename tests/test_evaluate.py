"""``onepeace evaluate retrieval``: metrics by hand, the held-out protocol on a synthetic corpus, the command."""

from __future__ import annotations

import json
import sys
from fractions import Fraction
from math import comb
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from onepeace.cli import main
from onepeace.errors import MissingDependencyError
from onepeace.evaluate import heldout, metrics, plots, report, retrieval

soundfile = pytest.importorskip("soundfile")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# item key -> (caption, image names, clip name, audio text, concept, labels)
ITEMS = {
    "shapes/red-circle": ("a red circle", ["circle.0.png", "circle.1.png"], None, None, "circle", {"shapes": "circle"}),
    "shapes/blue-square": ("a blue square", ["square.png"], None, None, "square", {"shapes": "square"}),
    "tux/cat": ("a cat", ["cat.png"], "cat.flac", "a cat meowing", "cat", {}),
    "digits/seven-1": ("seven", [], "seven1.wav", "seven", "seven", {"digits": "seven"}),
    "digits/seven-2": ("seven", [], "seven2.flac", "seven", "seven", {"digits": "seven"}),
    "digits/two": ("two", [], "two.flac", "two", "two", {"digits": "two"}),
    "emoji/keycap-7": ("keycap seven", ["keycap7.png"], None, None, "seven", {}),
}
TASKS = {
    "shapes": {"modality": "image", "prompt": "a picture of a {}", "labels": ["circle", "square", "triangle"]},
    "digits": {"modality": "audio", "prompt": "someone saying {}", "labels": ["two", "seven", "nine"]},
}


def _record(key: str) -> dict:
    caption, images, clip, audio_text, concept, labels = ITEMS[key]
    return {
        "item": key,
        "source": key.split("/")[0],
        "caption": caption,
        "images": [f"media/{name}" for name in images],
        "audio": f"media/{clip}" if clip else None,
        "audio_text": audio_text,
        "concept": concept,
        "labels": labels,
        "duration": 0.5 if clip else None,
    }


def write_corpus(root: Path, keys: list[str] | None = None, tasks: dict | None = TASKS) -> Path:
    """A small held-out corpus in the demo layout: PNG images, FLAC/WAV clips, TSVs, items JSONL, tasks.json."""
    rng = np.random.default_rng(0)
    (root / "media").mkdir(parents=True)
    records = [_record(key) for key in (keys or list(ITEMS))]
    image_rows, audio_rows = ["image_id\timage\tcaption"], ["uniq_id\taudio\ttext\tduration"]
    for r in records:
        for image in r["images"]:
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            Image.new("RGB", (40, 32), color).save(root / image)
            image_rows.append(f"{len(image_rows) - 1}\t{image}\t{r['caption']}")
        if r["audio"]:
            wave = 0.3 * np.sin(np.arange(8000) * rng.uniform(0.05, 0.3)).astype(np.float32)
            soundfile.write(root / r["audio"], wave, 16000)
            audio_rows.append(f"{len(audio_rows) - 1}\t{r['audio']}\t{r['audio_text']}\t0.500")
    (root / "image_text_heldout.tsv").write_text("\n".join(image_rows) + "\n")
    (root / "audio_text_heldout.tsv").write_text("\n".join(audio_rows) + "\n")
    (root / "items_heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if tasks is not None:
        (root / "tasks.json").write_text(json.dumps(tasks, indent=2))
    return root


@pytest.fixture(scope="module")
def tiny():
    import onepeace

    return onepeace.load("onepeace-tiny")


def by_name(rep: retrieval.RetrievalReport) -> dict[str, retrieval.DirectionResult]:
    return {d.name: d for d in rep.directions}


# ------------------------------------------------------------------------------------------------ metrics
def test_recall_at_k_by_hand() -> None:
    similarity = torch.tensor([[0.9, 0.1, 0.2, 0.3], [0.8, 0.7, 0.1, 0.0], [0.1, 0.2, 0.3, 0.4]])
    correct = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    # query 0: rank 0; query 1: rank 1; query 2: rank 3
    assert metrics.first_correct_rank(similarity, correct).tolist() == [0, 1, 3]
    recall = metrics.recall_at_k(similarity, correct, ks=(1, 2, 4, 10))
    assert recall == {1: 1 / 3, 2: 2 / 3, 4: 1.0, 10: 1.0}
    assert metrics.recall_at_k(similarity.numpy(), correct.numpy(), ks=(1,)) == {1: 1 / 3}


def test_recall_ties_give_no_credit() -> None:
    correct = torch.tensor([[False, True, False]])
    assert metrics.recall_at_k(torch.ones(1, 3), correct, ks=(1, 2, 3)) == {1: 0.0, 2: 0.0, 3: 1.0}


def test_chance_by_hand() -> None:
    two_of_four = torch.tensor([[True, True, False, False]])
    assert metrics.chance_recall_at_k(two_of_four, ks=(1, 2, 3, 4, 9)) == {1: 0.5, 2: 5 / 6, 3: 1.0, 4: 1.0, 9: 1.0}
    mixed = torch.tensor([[True, False, False, False], [True, True, False, False]])
    chance = metrics.chance_recall_at_k(mixed, ks=(1, 2))
    assert chance[1] == pytest.approx(float((Fraction(1, 4) + Fraction(1, 2)) / 2), abs=1e-15)
    assert chance[2] == pytest.approx(float((Fraction(1, 2) + Fraction(5, 6)) / 2), abs=1e-15)
    large = torch.zeros(1, 5000, dtype=torch.bool)
    large[0, :3] = True
    exact = 1 - Fraction(comb(4997, 10), comb(5000, 10))
    assert metrics.chance_recall_at_k(large, ks=(10,))[10] == pytest.approx(float(exact), rel=1e-12)


def test_chance_matches_random_rankings() -> None:
    gen = torch.Generator().manual_seed(0)
    correct = torch.rand(6, 9, generator=gen) < 0.3
    correct[:, 0] = True
    trials = [metrics.recall_at_k(torch.rand(6, 9, generator=gen), correct, ks=(1, 3)) for _ in range(3000)]
    chance = metrics.chance_recall_at_k(correct, ks=(1, 3))
    for k in (1, 3):
        assert sum(t[k] for t in trials) / len(trials) == pytest.approx(chance[k], abs=0.02)


def test_metrics_reject_bad_input() -> None:
    correct = torch.tensor([[True, False], [False, False]])
    with pytest.raises(ValueError, match="1 queries have no correct gallery item.*rows 1"):
        metrics.recall_at_k(torch.zeros(2, 2), correct)
    with pytest.raises(ValueError, match="no correct"):
        metrics.chance_recall_at_k(correct)
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.recall_at_k(torch.zeros(1, 3), torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        metrics.recall_at_k(torch.zeros(1, 2), torch.ones(1, 2))
    with pytest.raises(ValueError, match="positive int"):
        metrics.recall_at_k(torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), ks=(0,))


def test_top1_and_ground_truth_helpers() -> None:
    scores = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert metrics.top1_accuracy(scores, torch.tensor([1, 0, 0])) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="targets"):
        metrics.top1_accuracy(scores, torch.tensor([0, 2, 1]))
    same = metrics.same_label_matrix(["a", "b", "a"], ["b", "a", "c"])
    assert same.tolist() == [[False, True, False], [True, False, False], [False, True, False]]
    shared = metrics.shared_tag_matrix([{"x", "y"}, {"z"}], [{"y"}, {"q"}])
    assert shared.tolist() == [[True, False], [False, False]]


# ------------------------------------------------------------------------------------------------ protocol
def test_protocol_sets_and_ground_truth(tmp_path: Path) -> None:
    corpus = heldout.load_corpus(write_corpus(tmp_path / "c"))
    sets = {s.name: s for s in retrieval.build_protocol(corpus).retrieval}

    def names(paths: tuple[str, ...]) -> list[str]:
        return [Path(p).name for p in paths]

    it = sets["image->text"]
    assert names(it.queries) == ["circle.0.png", "square.png", "cat.png", "keycap7.png"]
    assert it.gallery == ("a red circle", "a blue square", "a cat", "keycap seven")
    assert torch.equal(it.correct, torch.eye(4, dtype=torch.bool))
    assert torch.equal(sets["text->image"].correct, it.correct.T)
    at = sets["audio->text"]
    assert names(at.queries) == ["cat.flac", "seven1.wav", "seven2.flac", "two.flac"]
    assert at.gallery == ("a cat meowing", "seven", "two")
    ta = sets["text->audio"]
    assert ta.queries == at.gallery and ta.correct.tolist()[1] == [False, True, True, False]
    ai = sets["audio->image"]
    assert names(ai.queries) == ["cat.flac", "seven1.wav", "seven2.flac"]  # "two" has no image
    assert names(ai.gallery) == names(it.queries)
    assert ai.correct.tolist() == [
        [False, False, True, False],
        [False, False, False, True],
        [False, False, False, True],
    ]
    zero = {z.task.name: z for z in retrieval.build_protocol(corpus).zero_shot}
    assert zero["shapes"].targets.tolist() == [0, 1]
    assert zero["digits"].targets.tolist() == [1, 1, 0]
    assert zero["digits"].prompts == ("someone saying two", "someone saying seven", "someone saying nine")


def test_tiny_model_counts_and_chance(tmp_path: Path, tiny) -> None:
    rep = retrieval.evaluate_retrieval(tiny, write_corpus(tmp_path / "c"), batch_size=3, progress=False)
    d = by_name(rep)
    counts = {name: (r.queries, r.gallery) for name, r in d.items()}
    assert counts == {
        "image->text": (4, 4),
        "text->image": (4, 4),
        "audio->text": (4, 3),
        "text->audio": (3, 4),
        "audio->image": (3, 4),
    }
    assert d["image->text"].chance == {1: 0.25, 5: 1.0, 10: 1.0}
    # text->audio: m = 1, 2, 1 correct clips among 4
    assert d["text->audio"].chance[1] == pytest.approx((0.25 + 0.5 + 0.25) / 3)
    for r in d.values():
        assert all(0.0 <= v <= 1.0 for v in r.recall.values()) and r.absent is None
    zero = {z.task: z for z in rep.zero_shot}
    assert (zero["shapes"].items, zero["shapes"].labels, zero["shapes"].chance) == (2, 3, 1 / 3)
    assert (zero["digits"].items, zero["digits"].labels) == (3, 3)


def _oracle(model, modality, payloads, batch_size, bar=None) -> torch.Tensor:
    """A perfect embedding: the one-hot vector of each payload's concept."""
    concepts = ["circle", "square", "cat", "seven", "two", "triangle", "nine"]
    of_payload = {}
    for caption, images, clip, audio_text, concept, _ in ITEMS.values():
        for payload in [caption, audio_text, clip, *images]:
            if payload:
                of_payload[payload] = concept
    for task in TASKS.values():
        of_payload.update({task["prompt"].replace("{}", label): label for label in task["labels"]})
    rows = [concepts.index(of_payload[Path(p).name if modality != "text" else p]) for p in payloads]
    return torch.eye(len(concepts))[rows]


def test_perfect_embeddings_get_every_r1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retrieval, "embed_payloads", _oracle)
    rep = retrieval.evaluate_retrieval(None, write_corpus(tmp_path / "c"), model_name="oracle", progress=False)
    assert {d.name: d.recall[1] for d in rep.directions} == dict.fromkeys(by_name(rep), 1.0)
    assert [z.accuracy for z in rep.zero_shot] == [1.0, 1.0]
    text = report.format_table(rep)
    assert "100.0 (chance 25.0)" in text and "digits" in text


def test_corpus_without_audio_reports_absent_directions(tmp_path: Path) -> None:
    keys = ["shapes/red-circle", "shapes/blue-square"]
    root = write_corpus(tmp_path / "c", keys, tasks={"shapes": TASKS["shapes"]})
    rep = retrieval.evaluate_retrieval(None, root, embed=_oracle_table, progress=False)
    d = by_name(rep)
    assert d["image->text"].recall[1] == 1.0
    for name in ("audio->text", "text->audio", "audio->image"):
        assert d[name].absent == "no held-out item has a clip" and d[name].recall == {}
    assert rep.to_dict()["retrieval"]["audio->text"] == {"absent": "no held-out item has a clip"}
    md = report.format_markdown(rep)
    assert "audio -> text: no held-out item has a clip" in md
    png = plots.plot_recall_bars(rep, tmp_path / "bars.png")
    assert png.read_bytes()[:8] == PNG_SIGNATURE


def test_model_without_audio_branch_reports_audio_sets_absent(tmp_path: Path) -> None:
    from dataclasses import replace

    from onepeace.api import OnePeace
    from onepeace.model.onepeace import OnePeaceModel
    from onepeace.variants import VARIANTS

    cfg = replace(VARIANTS["onepeace-tiny"], modalities=("text", "image"))  # as after stage 1
    model = OnePeace(OnePeaceModel(cfg).eval())
    rep = retrieval.evaluate_retrieval(model, write_corpus(tmp_path / "c"), batch_size=4, progress=False)
    d = by_name(rep)
    assert d["image->text"].absent is None and d["image->text"].queries == 4
    for name in ("audio->text", "text->audio", "audio->image"):
        assert d[name].absent == "the model has no audio branch"
    zero = {z.task: z for z in rep.zero_shot}
    assert zero["shapes"].accuracy is not None and zero["digits"].absent == "the model has no audio branch"


def test_plots_need_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rep = retrieval.RetrievalReport("corpus", "m", (1,), (), ())
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'onepeace\[demo\]'"):
        plots.plot_recall_bars(rep, tmp_path / "bars.png")


def test_loss_curves_pick_loss_keys() -> None:
    records = [{"step": 1, "loss": 3.0, "itc_loss": 2.0, "lr": 0.1}, {"step": 2, "loss": float("nan"), "atc_loss": 1.0}]
    assert plots.loss_curves(records) == {"loss": ([1], [3.0]), "atc_loss": ([2], [1.0]), "itc_loss": ([1], [2.0])}


def _oracle_table(model, protocol, batch_size, progress) -> retrieval.EmbeddingTable:
    payloads = retrieval.distinct_payloads(protocol)
    rows = {m: {p: i for i, p in enumerate(items)} for m, items in payloads.items()}
    return retrieval.EmbeddingTable(rows, {m: _oracle(None, m, items, 1) for m, items in payloads.items()})


# ------------------------------------------------------------------------------------------------ bad data
def _edit_first_record(root: Path, **changes) -> None:
    path = root / "items_heldout.jsonl"
    lines = path.read_text().splitlines()
    record = json.loads(lines[0])
    record.update(changes)
    lines[0] = json.dumps(record)
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    ("changes", "error", "pattern"),
    [
        ({"colour": "red"}, ValueError, r"items_heldout.jsonl:1: unknown key\(s\) 'colour'"),
        ({"caption": "  "}, ValueError, r"items_heldout.jsonl:1: 'caption' is empty"),
        ({"images": ["media/nothing.png"]}, FileNotFoundError, r"items_heldout.jsonl:1: image media/nothing.png not"),
        ({"labels": {"colours": "red"}}, ValueError, r"items_heldout.jsonl:1: label for unknown task 'colours'"),
        ({"labels": {"digits": "two"}}, ValueError, r"labelled for audio task 'digits' but has no audio"),
    ],
)
def test_bad_items_name_file_and_line(tmp_path: Path, changes: dict, error: type, pattern: str) -> None:
    root = write_corpus(tmp_path / "c", ["shapes/red-circle", "digits/two"])
    _edit_first_record(root, **changes)
    with pytest.raises(error, match=pattern):
        heldout.load_corpus(root)


def test_bad_tasks_and_missing_files(tmp_path: Path) -> None:
    root = write_corpus(tmp_path / "c", ["shapes/red-circle"], tasks={"shapes": {**TASKS["shapes"], "extra": 1}})
    with pytest.raises(ValueError, match=r"tasks.json: task 'shapes': unknown key\(s\) \['extra'\]"):
        heldout.load_corpus(root)
    (root / "tasks.json").unlink()
    corpus = heldout.load_corpus(root)  # without tasks.json, zero-shot is skipped with a note
    assert corpus.tasks is None and "zero-shot classification skipped" in retrieval.build_protocol(corpus).notes[0]
    (root / "items_heldout.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="items_heldout.jsonl: held-out item file not found"):
        heldout.load_corpus(root)
    with pytest.raises(FileNotFoundError, match="corpus folder not found"):
        heldout.load_corpus(tmp_path / "missing")


# ------------------------------------------------------------------------------------------------ command
def _write_run(folder: Path) -> Path:
    folder.mkdir(parents=True)
    records = [{"step": s, "itc_loss": 2.0 / s, "loss": 2.5 / s, "lr": 1e-4} for s in range(1, 6)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_corpus(tmp_path / "corpus")
    runs = [_write_run(tmp_path / "stage1"), _write_run(tmp_path / "stage2")]
    out = tmp_path / "eval"
    argv = ["evaluate", "retrieval", "--model", "onepeace-tiny", "--data", str(root), "--out", str(out)]
    assert main([*argv, "--runs", *map(str, runs), "--batch-size", "4", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "image -> text" in printed and f"wrote {out / 'metrics.json'}" in printed
    data = json.loads((out / "metrics.json").read_text())
    assert data["retrieval"]["audio->image"]["queries"] == 3
    assert set(data["retrieval"]["image->text"]["recall"]) == {"R@1", "R@5", "R@10"}
    assert data["zero_shot"]["digits"]["chance"] == pytest.approx(1 / 3)
    assert "| image -> text | 4 | 4 |" in (out / "metrics.md").read_text()
    for name in ("recall_bars.png", "training_curves.png"):
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize("problem", ["no data dir", "no held-out file", "missing media", "no run metrics"])
def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], problem: str) -> None:
    root = write_corpus(tmp_path / "corpus", ["shapes/red-circle", "tux/cat"])
    extra: list[str] = []
    if problem == "no data dir":
        root = tmp_path / "nowhere"
    elif problem == "no held-out file":
        (root / "items_heldout.jsonl").unlink()
    elif problem == "missing media":
        (root / "media" / "cat.flac").unlink()
    else:
        extra = ["--runs", str(tmp_path)]
    argv = ["evaluate", "retrieval", "--model", "onepeace-tiny", "--data", str(root), "--out", str(tmp_path / "o")]
    assert main(argv + extra) == 2
    err = capsys.readouterr().err
    expected = {
        "no data dir": f"corpus folder not found: {root}",
        "no held-out file": "items_heldout.jsonl: held-out item file not found",
        "missing media": "items_heldout.jsonl:2: clip media/cat.flac not found",
        "no run metrics": f"no metrics.jsonl in run folder {tmp_path}",
    }[problem]
    assert err.startswith("onepeace: error:") and expected in err
    assert not (tmp_path / "o" / "metrics.json").exists()
