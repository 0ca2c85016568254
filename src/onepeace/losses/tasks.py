"""Fine-tuning losses (spec §8.2): tensors in, named losses out. ``B`` examples, ``C`` classes, ``K`` choices.

Every loss is a sum over the batch divided by ``B``, as in the official criterions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from onepeace.evaluate.boxes import generalized_box_iou
from onepeace.losses.named import NamedLosses


def _batch(logits: torch.Tensor, what: str) -> int:
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError(f"{what} must be a non-empty [B, C] tensor, got shape {tuple(logits.shape)}")
    return logits.shape[0]


def classification_loss(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> NamedLosses:
    """Single-label cross-entropy (VGGSound, NLVR2, ImageNet). ``target`` is ``[B]`` class indices or ``[B, C]``
    class probabilities (mixup / cutmix); ``label_smoothing`` as in :func:`torch.nn.functional.cross_entropy`."""
    batch = _batch(logits, "logits")
    if target.shape not in ((batch,), tuple(logits.shape)):
        raise ValueError(f"target must be [B] indices or [B, C] probabilities, got {tuple(target.shape)}")
    loss = F.cross_entropy(logits.float(), target, reduction="sum", label_smoothing=label_smoothing) / batch
    return NamedLosses.weighted({"ce_loss": loss})


def multilabel_loss(logits: torch.Tensor, targets: torch.Tensor) -> NamedLosses:
    """Binary cross-entropy on logits with multi-hot (FSD50K) or soft (VQA answer confidences) ``[B, C]``
    targets, summed over classes and batch, divided by ``B``."""
    batch = _batch(logits, "logits")
    if targets.shape != logits.shape:
        raise ValueError(f"targets {tuple(targets.shape)} must match logits {tuple(logits.shape)}")
    loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="sum") / batch
    return NamedLosses.weighted({"bce_loss": loss})


def pairwise_hinge_loss(scores: torch.Tensor, positive: torch.Tensor, margin: float = 1.0) -> NamedLosses:
    """AQA: ``sum_b sum_j max(0, margin + s_bj - s_b,pos) / B`` over the ``K`` choice scores ``[B, K]``; the
    ``j = pos`` term (a constant ``margin``) is included, as in the official criterion."""
    batch = _batch(scores, "scores")
    if positive.shape != (batch,):
        raise ValueError(f"positive must be [B] choice indices, got {tuple(positive.shape)}")
    pos = scores.float().gather(1, positive.long()[:, None])
    return NamedLosses.weighted({"hinge_loss": (margin + scores.float() - pos).clamp(min=0).sum() / batch})


def grounding_loss(predicted: torch.Tensor, target: torch.Tensor) -> NamedLosses:
    """Visual grounding: L1 over the normalised ``(x0, y0, x1, y1)`` boxes ``[B, 4]`` (sum over coordinates and
    batch / ``B``) plus the mean of ``1 - GIoU`` over the predictions with ``x0 < x1`` and ``y0 < y1`` (0 when
    there is none)."""
    batch = _batch(predicted, "predicted boxes")
    if predicted.shape != (batch, 4) or target.shape != predicted.shape:
        raise ValueError(f"boxes must be [B, 4], got {tuple(predicted.shape)} and {tuple(target.shape)}")
    predicted, target = predicted.float(), target.float()
    l1 = (predicted - target).abs().sum() / batch
    valid = (predicted[:, 0] < predicted[:, 2]) & (predicted[:, 1] < predicted[:, 3])
    if valid.any():
        giou = (1 - generalized_box_iou(predicted[valid], target[valid])).mean()
    else:
        giou = predicted.sum() * 0.0  # keeps the graph
    return NamedLosses.weighted({"l1_loss": l1, "giou_loss": giou})
