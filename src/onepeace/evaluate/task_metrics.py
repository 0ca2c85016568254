"""Metrics of the fine-tuning tasks (spec §8.2) other than recall@k (:mod:`.metrics`) and box IoU (:mod:`.boxes`).

Shapes: N examples, C classes (or candidate answers).
"""

from __future__ import annotations

import torch


def _scores_and_targets(scores: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scores, targets = torch.as_tensor(scores), torch.as_tensor(targets)
    if scores.ndim != 2 or scores.shape != targets.shape or scores.shape[0] == 0:
        raise ValueError(
            f"scores and targets must be two non-empty [N, C] arrays of one shape, "
            f"got {tuple(scores.shape)} and {tuple(targets.shape)}"
        )
    return scores.double(), targets.double()


def average_precision(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """AP of one class: ``sum_k (R_k - R_{k-1}) P_k`` over the distinct score thresholds, highest first, where
    ``P_k`` / ``R_k`` are precision / recall of everything scoring at least the k-th threshold (tied scores enter
    together). ``scores`` ``[N]``; ``positive`` ``[N]`` bool with at least one True."""
    scores, positive = torch.as_tensor(scores).double(), torch.as_tensor(positive).bool()
    if scores.ndim != 1 or positive.shape != scores.shape:
        raise ValueError(f"scores and positive must be [N] each, got {tuple(scores.shape)} and {tuple(positive.shape)}")
    if not positive.any():
        raise ValueError("average precision needs at least one positive example")
    order = torch.argsort(scores, descending=True, stable=True)
    ranked_scores, ranked_pos = scores[order], positive[order].double()
    last_of_tie = torch.ones_like(ranked_scores, dtype=torch.bool)
    last_of_tie[:-1] = ranked_scores[1:] != ranked_scores[:-1]
    hits = ranked_pos.cumsum(0)[last_of_tie]
    seen = torch.arange(1, len(order) + 1, dtype=torch.float64)[last_of_tie]
    recall = hits / hits[-1]
    gained = torch.diff(recall, prepend=recall.new_zeros(1))
    return float((gained * hits / seen).sum())


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Multi-label mAP (FSD50K): the AP of each class, then their mean. ``scores`` ``[N, C]`` (e.g. sigmoid
    outputs), ``targets`` ``[N, C]`` multi-hot. Classes without a positive example have no AP and are left out
    of the mean; with none left this raises ``ValueError``."""
    scores, targets = _scores_and_targets(scores, targets)
    present = [c for c in range(targets.shape[1]) if targets[:, c].any()]
    if not present:
        raise ValueError("no class has a positive example")
    return sum(average_precision(scores[:, c], targets[:, c] > 0) for c in present) / len(present)


def vqa_score(logits: torch.Tensor, target_scores: torch.Tensor) -> float:
    """VQA score: the mean over questions of the soft target score (answer confidence in [0, 1]) of the
    highest-scoring answer. ``logits`` and ``target_scores`` ``[N, A]``."""
    logits, target_scores = _scores_and_targets(logits, target_scores)
    return float(target_scores.gather(1, logits.argmax(dim=1, keepdim=True)).mean())
