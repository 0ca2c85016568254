"""Task scores (spec §8.2) and the composed-query protocol on hand-worked cases."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from onepeace.evaluate.composed import compose, evaluate_composed, format_composed, read_queries
from onepeace.finetune.evaluate import Collected, score, zero_shot_accuracy
from onepeace.finetune.tasks import get_task
from onepeace.model.outputs import Embeddings


def test_retrieval_recall_with_several_captions_per_item() -> None:
    m0, m1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    texts = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])  # captions of items 0, 0, 1
    c = Collected(text=[texts], media=[torch.stack([m0, m0, m1])], group=[torch.tensor([7, 7, 3])], examples=3)
    out = score(get_task("coco_retrieval"), c)
    # text -> media: caption 1 ranks item 1 (0.8) above its item 0 (0.6)
    assert out["text_to_media_r1"] == pytest.approx(2 / 3) and out["text_to_media_r5"] == 1.0
    # media -> text: item 0's best caption (1.0) is its own; item 1's best (1.0) is its own
    assert out["media_to_text_r1"] == 1.0
    assert out["text_queries"] == 3 and out["media_queries"] == 2 and out["examples"] == 3


def test_grounding_accuracy_in_original_pixels() -> None:
    c = Collected(
        logits=[torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.5, 0.5, 0.9, 0.9]])],
        boxes=[torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.1, 0.1, 0.5, 0.5]])],
        sizes=[torch.tensor([[100.0, 50.0], [64.0, 64.0]])],
        examples=2,
    )
    # first: (10,5,50,25) vs (10,5,50,30): IoU 800 / 1000 = 0.8; second: disjoint
    assert score(get_task("refcoco"), c)["acc_iou50"] == 0.5


def test_classification_multilabel_vqa_and_aqa_scores() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 5.0]])
    labels = torch.tensor([0, 2, 2])
    assert score(get_task("vggsound"), Collected(logits=[logits], labels=[labels], examples=3))["accuracy"] == 2 / 3
    soft = torch.tensor([[0.3, 1.0, 0.0], [0.0, 0.6, 0.0], [0.0, 0.0, 0.9]])
    assert score(get_task("vqa"), Collected(logits=[logits], soft_targets=[soft], examples=3))["vqa_score"] == (
        pytest.approx((0.3 + 0.6 + 0.9) / 3)
    )
    hot = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    # class 0: scores 2 (pos), 0, 1 (pos) -> ranks pos, pos, neg: AP 1; class 1: 3 (pos) top: 1;
    # class 2: 0, 1, 5 (pos): AP 1 -> mAP 1
    assert score(get_task("fsd50k"), Collected(logits=[logits], soft_targets=[hot], examples=3))["map"] == 1.0
    hot[1] = torch.tensor([0.0, 0.0, 1.0])  # class 2 positives at scores 1 and 5; class 1 has none
    expected = (1.0 + (1.0 + 1.0) / 2) / 2  # class 0: 1; class 2: ranks 1 (5) and 2 (1): precisions 1, 1
    assert score(get_task("fsd50k"), Collected(logits=[logits], soft_targets=[hot], examples=3))["map"] == expected
    aqa = torch.tensor([[0.1, 0.9, 0.0, 0.2], [1.0, 0.0, 0.0, 0.0]])
    out = score(get_task("aqa"), Collected(logits=[aqa], labels=[torch.tensor([1, 3])], examples=2))
    assert out["accuracy"] == 0.5


def test_zero_shot_accuracy_normalises_both_sides() -> None:
    prompts = torch.tensor([[10.0, 0.0], [0.0, 0.1]])  # norms must not matter
    media = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.5]])
    assert zero_shot_accuracy(media, prompts, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)


def test_compose_is_the_renormalised_mean_of_normalised_parts() -> None:
    out = compose([torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 0.5]])])
    assert torch.allclose(out, torch.tensor([[1 / math.sqrt(2), 1 / math.sqrt(2)]]))


class LookupModel:
    """Embeds by looking the payload up (file name or text) in a table."""

    def __init__(self, table: dict[str, list[float]]) -> None:
        self.table = table

    def embed(self, batch_size: int = 16, **inputs: list[str]) -> Embeddings:
        ((name, values),) = inputs.items()
        return Embeddings(**{name: torch.tensor([self.table[Path(v).name] for v in values])})


def _write(tmp_path: Path, rows: list[str]) -> Path:
    path = tmp_path / "queries.tsv"
    path.write_text("uniq_id\taudio\ttext\timage\ttarget\n" + "\n".join(rows) + "\n")
    return path


def test_composed_protocol_ranks_targets_per_query_type(tmp_path: Path) -> None:
    table = {
        "a.png": [1.0, 0.0, 0.0],
        "b.png": [0.0, 1.0, 0.0],
        "c.png": [0.0, 0.0, 1.0],
        "dog.wav": [0.2, 1.0, 0.0],
        "cat.wav": [1.0, 0.0, 0.9],
        "in the snow": [0.0, 0.0, 1.0],
    }
    path = _write(
        tmp_path,
        [
            "1\tdog.wav\t\t\tb.png",  # audio -> image: best b (hit)
            "2\tcat.wav\t\t\tb.png",  # a .74 > c .67 > b 0: third
            "3\tdog.wav\tin the snow\t\tc.png",  # mean of (.196,.981,0) and (0,0,1): c .5 > b .49: hit
            "4\t\tin the snow\ta.png\tc.png",  # mean (.5, 0, .5): a and c tie at .5
            "5\tcat.wav\t\t\ta.png",  # a .74 first: hit
        ],
    )
    results = evaluate_composed(LookupModel(table), read_queries(path))
    assert set(results) == {"audio->image", "audio+text->image", "text+image->image"}
    audio = results["audio->image"]
    assert audio["r1"] == pytest.approx(2 / 3) and audio["r5"] == 1.0 and audio["queries"] == 3
    assert results["audio+text->image"]["r1"] == 1.0
    assert results["text+image->image"]["r1"] == 0.0  # a tie counts against the query
    assert audio["chance_r1"] == pytest.approx(1 / 3) and audio["gallery"] == 3
    assert "audio+text->image | 1 | 3 | 100.0% (33.3%)" in format_composed(results, "m")


def test_bad_query_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="its own target"):
        read_queries(_write(tmp_path, ["1\t\t\ta.png\ta.png"]))
    with pytest.raises(ValueError, match=r"queries.tsv:2: a query needs at least one"):
        read_queries(_write(tmp_path, ["1\t\t\t\ta.png"]))
    (tmp_path / "bad.tsv").write_text("id\taudio\n")
    with pytest.raises(ValueError, match="header must be"):
        read_queries(tmp_path / "bad.tsv")
