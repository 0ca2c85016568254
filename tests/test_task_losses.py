"""Fine-tuning losses on hand-worked cases (spec §8.2)."""

from __future__ import annotations

import math

import pytest
import torch

from onepeace.losses.tasks import classification_loss, grounding_loss, multilabel_loss, pairwise_hinge_loss


def test_classification_loss_is_mean_cross_entropy() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)], [2.0, 0.0]])  # softmax: (1/4, 3/4) and (e^2, 1) / (e^2 + 1)
    want = (-math.log(0.75) - math.log(math.exp(2) / (math.exp(2) + 1))) / 2
    got = classification_loss(logits, torch.tensor([1, 0]))
    assert got.terms["ce_loss"].item() == pytest.approx(want) and got.total.item() == pytest.approx(want)
    soft = torch.tensor([[0.5, 0.5], [1.0, 0.0]])  # mixup-style targets
    want_soft = (-(0.5 * math.log(0.25) + 0.5 * math.log(0.75)) - math.log(math.exp(2) / (math.exp(2) + 1))) / 2
    assert classification_loss(logits, soft).total.item() == pytest.approx(want_soft)
    with pytest.raises(ValueError, match="target"):
        classification_loss(logits, torch.tensor([1]))


def test_multilabel_loss_sums_over_classes() -> None:
    logits = torch.zeros(2, 2)  # every BCE term is ln 2 at logit 0, whatever the target
    assert multilabel_loss(logits, torch.tensor([[1.0, 0.0], [0.5, 1.0]])).total.item() == pytest.approx(
        4 * math.log(2) / 2
    )
    assert multilabel_loss(torch.tensor([[3.0]]), torch.tensor([[1.0]])).total.item() == pytest.approx(
        math.log(1 + math.exp(-3))
    )
    with pytest.raises(ValueError, match="match"):
        multilabel_loss(logits, torch.zeros(2, 3))


def test_pairwise_hinge_includes_the_positive_term() -> None:
    scores = torch.tensor([[1.0, 3.0, 0.0, 2.5], [0.0, 0.0, 0.0, 0.0]])
    # row 1: 0 + 1 (j = pos) + 0 + 0.5; row 2: four times 1
    assert pairwise_hinge_loss(scores, torch.tensor([1, 0])).total.item() == pytest.approx((1.5 + 4.0) / 2)


def test_grounding_loss_l1_plus_giou_over_valid_boxes() -> None:
    predicted = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.6, 0.1, 0.2, 0.9]], requires_grad=True)  # row 2: x0 > x1
    target = torch.tensor([[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]])
    out = grounding_loss(predicted, target)
    assert out.terms["l1_loss"].item() == pytest.approx((0.5 + 1.1) / 2)
    assert out.terms["giou_loss"].item() == pytest.approx(0.5)  # IoU 0.25 / 0.5, hull = target box
    assert out.total.item() == pytest.approx(1.3)
    out.total.backward()
    assert predicted.grad is not None and predicted.grad.abs().sum() > 0
    inverted = torch.tensor([[0.6, 0.1, 0.2, 0.9]], requires_grad=True)
    none_valid = grounding_loss(inverted, target[1:])
    assert none_valid.terms["giou_loss"].item() == 0.0 and none_valid.total.item() == pytest.approx(1.1)
    none_valid.total.backward()
    assert inverted.grad is not None
