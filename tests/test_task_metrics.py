"""Fine-tuning metrics against scikit-learn and hand-worked cases: mAP, IoU / GIoU / Acc@0.5, VQA score."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn import metrics

from onepeace.evaluate.boxes import box_iou, generalized_box_iou, grounding_accuracy
from onepeace.evaluate.task_metrics import average_precision, mean_average_precision, vqa_score

# (box a, box b, IoU, GIoU), worked by hand: areas, intersection, union, smallest enclosing box.
BOX_TABLE = [
    ((0, 0, 2, 2), (1, 1, 3, 3), 1 / 7, 1 / 7 - 2 / 9),  # inter 1, union 7, hull 9
    ((0, 0, 2, 2), (0, 0, 2, 2), 1.0, 1.0),
    ((0, 0, 1, 1), (2, 2, 3, 3), 0.0, -7 / 9),  # disjoint: union 2, hull 9
    ((0, 0, 4, 2), (1, 0, 3, 2), 0.5, 0.5),  # b inside a: inter 4, union 8, hull = a
    ((0, 0, 2, 1), (2, 0, 4, 1), 0.0, 0.0),  # touching edges: hull = union
    ((2, 2, 0, 0), (0, 0, 1, 1), 0.0, 0.0),  # inverted box: empty
]


def test_iou_and_giou_match_the_hand_worked_table() -> None:
    a = torch.tensor([row[0] for row in BOX_TABLE], dtype=torch.float64)
    b = torch.tensor([row[1] for row in BOX_TABLE], dtype=torch.float64)
    torch.testing.assert_close(box_iou(a, b), torch.tensor([row[2] for row in BOX_TABLE], dtype=torch.float64))
    torch.testing.assert_close(
        generalized_box_iou(a, b), torch.tensor([row[3] for row in BOX_TABLE], dtype=torch.float64)
    )
    torch.testing.assert_close(box_iou(b, a), box_iou(a, b))
    assert grounding_accuracy(a, b) == pytest.approx(2 / 6)  # IoU 1 and exactly 0.5 pass
    assert grounding_accuracy(a, b, threshold=0.1) == pytest.approx(3 / 6)
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        box_iou(a, b[:, :3])
    with pytest.raises(ValueError, match="no boxes"):
        grounding_accuracy(a[:0], b[:0])


def test_average_precision_hand_cases() -> None:
    # ranks 1..4 hit, miss, hit, miss: precision 1 at recall 0.5, 2/3 at recall 1
    assert average_precision(torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([1, 0, 1, 0])) == pytest.approx(5 / 6)
    # a tie enters together: one threshold with precision 1/2 and recall 1
    assert average_precision(torch.tensor([0.5, 0.5]), torch.tensor([1, 0])) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="positive"):
        average_precision(torch.tensor([0.1, 0.2]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match=r"\[N\] each"):
        average_precision(torch.tensor([0.1, 0.2]), torch.tensor([1, 0, 0]))


@pytest.mark.parametrize("seed", range(8))
def test_mean_average_precision_equals_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(5, 60)), int(rng.integers(1, 12))
    scores = np.round(rng.random((n, c)), 1)  # coarse rounding makes ties
    targets = (rng.random((n, c)) < 0.3).astype(int)
    targets[rng.integers(0, n, c), np.arange(c)] = 1  # every class has a positive
    per_class = [average_precision(torch.tensor(scores[:, k]), torch.tensor(targets[:, k])) for k in range(c)]
    np.testing.assert_allclose(per_class, metrics.average_precision_score(targets, scores, average=None), atol=1e-12)
    want = metrics.average_precision_score(targets, scores, average="macro")
    assert mean_average_precision(torch.tensor(scores), torch.tensor(targets)) == pytest.approx(want, abs=1e-12)


def test_mean_average_precision_leaves_out_classes_without_positives() -> None:
    scores = torch.tensor([[0.9, 0.2, 0.4], [0.1, 0.8, 0.3]])
    targets = torch.tensor([[1, 0, 0], [0, 1, 0]])  # the third class has no positive
    assert mean_average_precision(scores, targets) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no class"):
        mean_average_precision(scores, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="one shape"):
        mean_average_precision(scores, targets[:, :2])


def test_vqa_score_takes_the_target_score_of_the_top_answer() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, 0.0, 0.0], [0.0, 0.0, 9.0]])
    targets = torch.tensor([[0.0, 0.6, 1.0], [0.3, 0.0, 1.0], [0.0, 0.0, 1.0]])
    assert vqa_score(logits, targets) == pytest.approx((0.6 + 0.3 + 1.0) / 3)
