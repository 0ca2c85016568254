"""The main job cut down: a small real corpus, both pretraining stages for a few updates with the shipped recipes,
held-out evaluation and the demo, all through the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import onepeace
from onepeace.cli import main

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SOURCES = "tuxpaint,numerals,espeak,instruments"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    base = tmp_path_factory.mktemp("demo")
    corpus, one, two = base / "corpus", base / "stage1", base / "stage2"
    assert main(["data", "build-demo", str(corpus), "--limit", "8", "--sources", SOURCES]) == 0
    short = ["optim.total_updates=3", "optim.warmup_updates=1", "data.batch_size=4", "data.num_workers=0"]
    stage1 = [f"out_dir={one}", f"data.paths=[{corpus / 'image_text_train.tsv'}]", *short]
    assert main(["pretrain", "--config", str(ROOT / "configs" / "small_stage1.yaml"), *stage1]) == 0
    stage2 = [f"out_dir={two}", f"model.init_from={one}", f"data.paths=[{corpus / 'audio_text_train.tsv'}]", *short]
    assert main(["pretrain", "--config", str(ROOT / "configs" / "small_stage2.yaml"), *stage2]) == 0
    return corpus, one, two


def test_evaluate_the_trained_model(trained: tuple[Path, Path, Path], tmp_path: Path) -> None:
    corpus, one, two = trained
    out = tmp_path / "eval"
    args = ["evaluate", "retrieval", "--model", str(two / "model"), "--data", str(corpus), "--out", str(out)]
    assert main([*args, "--runs", str(one), str(two)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    for name in ("image->text", "text->image", "audio->text", "text->audio", "audio->image"):
        assert report["retrieval"][name]["queries"] > 0, name
        assert 0.0 <= report["retrieval"][name]["recall"]["R@1"] <= 1.0
    assert set(report["zero_shot"]) == {"numerals", "digits", "instruments"}
    for png in ("recall_bars.png", "training_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_runs_every_query_kind(trained: tuple[Path, Path, Path], tmp_path: Path, capsys) -> None:
    corpus, _, two = trained
    out = tmp_path / "demo"
    assert main(["demo", "--model", str(two / "model"), "--corpus", str(corpus), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    kinds = ("text -> image", "text -> audio", "audio -> image", "image + text -> audio")
    for kind in kinds:
        assert f"\n{kind}: " in printed, kind
    assert "image -> text" in printed and "chance" in printed  # the metrics table
    page = (out / "report.html").read_text()
    assert all(kind.replace(">", "&gt;") in page for kind in kinds)
    assert page.count('<img src="data:image/png;base64,') >= 5 and "<audio controls" in page


def test_stage2_model_has_all_modalities(trained: tuple[Path, Path, Path]) -> None:
    model = onepeace.load(str(trained[2] / "model"))
    assert set(model.cfg.modalities) == {"text", "image", "audio"} and model.cfg.embed_dim == 256
