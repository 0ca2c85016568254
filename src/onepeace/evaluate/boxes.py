"""Axis-aligned boxes ``(x0, y0, x1, y1)``: IoU, generalised IoU and the visual-grounding accuracy (spec §8.2).

All functions take boxes as ``[N, 4]`` tensors, compare row ``i`` of one with row ``i`` of the other, and return
``[N]``. A box with ``x1 <= x0`` or ``y1 <= y0`` has zero area.
"""

from __future__ import annotations

import torch


def _check_pairs(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.ndim != 2 or a.shape[-1] != 4 or a.shape != b.shape:
        raise ValueError(f"boxes must be two [N, 4] tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """``[N, 4] -> [N]`` areas; inverted boxes count as empty."""
    return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)


def _inter_union(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lo = torch.maximum(a[:, :2], b[:, :2])
    hi = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (hi - lo).clamp(min=0).prod(dim=1)
    return inter, box_area(a) + box_area(b) - inter


def _ratio(part: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """``part / whole``, 0 where ``whole`` is 0."""
    return torch.where(whole > 0, part / whole.clamp(min=torch.finfo(whole.dtype).tiny), torch.zeros_like(whole))


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Intersection over union of matching rows, ``[N]``; 0 where both boxes are empty."""
    _check_pairs(a, b)
    return _ratio(*_inter_union(a, b))


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """GIoU of matching rows, ``[N]`` in [-1, 1]: IoU minus the part of the smallest enclosing box that neither
    box covers, as a fraction of that enclosing box."""
    _check_pairs(a, b)
    inter, union = _inter_union(a, b)
    hull = (torch.maximum(a[:, 2:], b[:, 2:]) - torch.minimum(a[:, :2], b[:, :2])).clamp(min=0).prod(dim=1)
    return _ratio(inter, union) - _ratio(hull - union, hull)


def grounding_accuracy(predicted: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> float:
    """Fraction of predictions whose IoU with the target box is at least ``threshold`` (Acc@0.5 of RefCOCO);
    give both in original image pixels."""
    if len(predicted) == 0:
        raise ValueError("no boxes to score")
    return float((box_iou(predicted.double(), target.double()) >= threshold).double().mean())
