"""End to end through the CLI (spec §8): every head fine-tunes a few updates of the shipped onepeace-small on real
tiny data, its loss falls, and the saved model evaluates through ``onepeace evaluate`` to the same scores; the
zero-shot and composed protocols run on real clips and images; an official fine-tuned file evaluates too."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import official
import pytest
import torch

from onepeace.cli import main
from onepeace.finetune.config import load_finetune_recipe
from onepeace.finetune.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "finetune" / "tiny"
PAIRS, TASKS_DIR = ROOT / "tests" / "data" / "tiny_pairs", ROOT / "tests" / "data" / "tiny_tasks"
TRAINED = (
    "coco_retrieval",
    "audiocaps_retrieval",
    "vggsound",
    "fsd50k",
    "aqa",
    "vqa",
    "nlvr2",
    "refcoco",
    "refcocog",
    "imagenet",
)


def _data(task: str) -> Path:
    """The training (and evaluation) file of a tiny recipe, as an absolute path."""
    text = (TINY / f"{task}.yaml").read_text()
    relative = text.split("train: [", 1)[1].split("]", 1)[0]
    return ROOT / relative


def _losses(run: Path, term: str) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row[term] for row in sorted(rows, key=lambda r: r["step"])]


@pytest.mark.slow
@pytest.mark.parametrize("task", TRAINED)
def test_head_trains_and_its_checkpoint_evaluates(task: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data, run = _data(task), tmp_path / "run"
    args = ["finetune", "--task", task, "--config", str(TINY / f"{task}.yaml"), f"out_dir={run}"]
    assert main([*args, f"data.train=[{data}]", f"data.valid=[{data}]"]) == 0
    # grounding: the GIoU term only joins once the predicted boxes are proper (x0 < x1, y0 < y1), so the total
    # can rise at the start; the L1 term is defined from the first update
    losses = _losses(run, "l1_loss" if task.startswith("refcoco") else "total")
    assert len(losses) == load_finetune_recipe(TINY / f"{task}.yaml").optim.total_updates
    first, last = statistics.mean(losses[:4]), statistics.mean(losses[-4:])
    assert last < 0.85 * first, (task, losses)
    in_run = json.loads((run / "eval" / "metrics.json").read_text())["metrics"]
    out = tmp_path / "eval"
    assert main(["evaluate", task, "--model", str(run / "model"), "--data", str(data), "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["task"] == task and report["metrics"] == pytest.approx(in_run, abs=1e-6)
    assert 0.0 <= report["metrics"][get_task(task).metric] <= 1.0
    assert report["metrics"]["examples"] == len((data).read_text().splitlines()) - 1
    assert "| examples |" in (out / "metrics.md").read_text()
    assert get_task(task).metric in capsys.readouterr().out


@pytest.mark.slow
def test_esc50_zero_shot_equals_prompt_matching_through_the_api(tmp_path: Path) -> None:
    import onepeace
    from onepeace.finetune.readers import read_task_tsv

    data = TASKS_DIR / "esc50.tsv"
    args = ["evaluate", "esc50", "--model", "onepeace-small", "--data", str(data), "--out", str(tmp_path)]
    assert main([*args, "--config", str(TINY / "esc50.yaml")]) == 0
    accuracy = json.loads((tmp_path / "metrics.json").read_text())["metrics"]["accuracy"]
    rows = read_task_tsv(get_task("esc50"), data)
    names = sorted({row.class_name for row in rows})
    model = onepeace.load("onepeace-small")
    prompts = model.embed(text=[f"This is a sound of {n}" for n in names]).text
    clips = model.embed(audio=[row.media for row in rows], batch_size=16).audio
    # the CLI reads clips with max_duration 2 s (the tiny recipe); every tiny clip is at most 2 s long
    predicted = (clips @ prompts.t()).argmax(dim=1)
    expected = float((predicted == torch.tensor([names.index(r.class_name) for r in rows])).double().mean())
    assert accuracy == pytest.approx(expected)


@pytest.mark.slow
def test_composed_queries_run_on_real_media(tmp_path: Path) -> None:
    lines = (PAIRS / "image_text.tsv").read_text().splitlines()[1:9]
    rows = ["uniq_id\taudio\ttext\timage\ttarget"]
    for i, line in enumerate(lines):
        _, image, caption = line.split("\t")
        audio, image = PAIRS / "audio" / f"{Path(image).stem}.ogg", PAIRS / image
        rows.append(f"{i}\t{audio}\t\t\t{image}")
        rows.append(f"{i}t\t{audio}\t{caption}\t\t{image}")
    queries = tmp_path / "queries.tsv"
    queries.write_text("\n".join(rows) + "\n")
    args = ["evaluate", "composed", "--model", "onepeace-small", "--data", str(queries), "--out", str(tmp_path)]
    assert main(args) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert set(metrics) == {"audio->image", "audio+text->image"}
    for row in metrics.values():
        assert row["queries"] == 8 and row["gallery"] == 8 and row["chance_r1"] == pytest.approx(1 / 8)
        assert 0.0 <= row["r1"] <= row["r5"] <= row["r10"] == 1.0


@pytest.mark.parametrize("per_layer", [False, True])
def test_official_fine_tuned_file_evaluates(tmp_path: Path, per_layer: bool) -> None:
    """An official VGGSound-style file (audio branch + classify_head) built from the fixture weights, with one
    shared relative-position table or, as the released fine-tuned files have, one table per layer."""
    from onepeace.finetune.build import read_start
    from onepeace.heads import ClassifyHead

    torch.manual_seed(0)
    head = ClassifyHead(64, 4, num_classes=4)
    sd = {k: v for k, v in official.inference_state_dict().items() if "text" not in k and "image" not in k}
    sd = {k: v for k, v in sd.items() if not k.startswith(("audio_proj", "logit_scale"))}
    sd.update({f"classify_head.{k}": v.clone() for k, v in head.state_dict().items()})
    if per_layer:
        shared = "encoder_wrapper.audio_adapter.rel_pos_table_list.0.weight"
        sd[shared.replace(".0.", ".1.")] = sd[shared] + 0.25
    path = official.write_official_checkpoint(tmp_path / "vggsound.pt", sd)
    _, weights = read_start(str(path))
    assert torch.equal(weights["head.classifier.3.weight"], head.classifier[3].weight)
    data = TASKS_DIR / "vggsound.tsv"
    assert main(["evaluate", "vggsound", "--model", str(path), "--data", str(data), "--out", str(tmp_path / "e")]) == 0
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())["metrics"]
    assert metrics["examples"] == 48 and 0.0 <= metrics["accuracy"] <= 1.0


@pytest.mark.slow
def test_zero_shot_retrieval_of_a_backbone_equals_the_api(tmp_path: Path) -> None:
    import onepeace

    data = PAIRS / "image_text.tsv"
    args = ["evaluate", "coco_retrieval", "--model", "onepeace-small", "--data", str(data), "--out", str(tmp_path)]
    assert main([*args, "--config", str(TINY / "coco_retrieval.yaml")]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    rows = [line.split("\t") for line in data.read_text().splitlines()[1:]]
    model = onepeace.load("onepeace-small")
    texts = model.embed(text=[caption for _, _, caption in rows]).text
    images = model.embed(image=[PAIRS / image for _, image, _ in rows]).image
    sim = texts @ images.t()  # every image of the file is distinct: row i's image is column i
    own = sim.diagonal()
    t2i_rank = (sim > own[:, None]).sum(dim=1)
    i2t_rank = (sim.t() > own[:, None]).sum(dim=1)
    for k in (1, 5, 10):
        assert metrics[f"text_to_media_r{k}"] == pytest.approx(float((t2i_rank < k).double().mean()), abs=1e-9)
        assert metrics[f"media_to_text_r{k}"] == pytest.approx(float((i2t_rank < k).double().mean()), abs=1e-9)
    assert metrics["text_queries"] == metrics["media_queries"] == len(rows)
