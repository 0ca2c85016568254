"""Task losses from a task model's output and the batch targets (spec §8.2). Tensors in, named losses out."""

from __future__ import annotations

import torch

from onepeace.finetune.batch import TaskBatch
from onepeace.finetune.model import TaskOutput
from onepeace.finetune.tasks import TaskKind, TaskSpec
from onepeace.losses.contrastive import Gather, contrastive_loss
from onepeace.losses.named import NamedLosses
from onepeace.losses.tasks import classification_loss, grounding_loss, multilabel_loss, pairwise_hinge_loss


def _need(value: torch.Tensor | None, what: str, spec: TaskSpec) -> torch.Tensor:
    if value is None:
        raise ValueError(f"task {spec.name} needs {what} in the batch")
    return value


def task_loss(
    spec: TaskSpec,
    out: TaskOutput,
    batch: TaskBatch,
    logit_scale: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    gather: Gather | None = None,
    rank: int = 0,
) -> NamedLosses:
    """The loss of ``spec`` on one batch.

    Args:
        out: the task model's output for ``batch``.
        logit_scale: retrieval only: ``exp`` of the clamped logit scale (scalar).
        label_smoothing: single-label cross-entropy (classification, NLVR2, image classification) with index
            targets; soft targets (mixup / cutmix) are used as given.
        gather, rank: retrieval under several processes: the keys of both directions are gathered from every
            rank (as in pretraining, spec §5.2), so each pair meets the negatives of the global batch.
    """
    kind = spec.kind
    if kind is TaskKind.RETRIEVAL:
        text, media = _need(out.text, "text embeddings", spec), _need(out.media, "media embeddings", spec)
        result = contrastive_loss(media, text, _need(logit_scale, "a logit scale", spec), gather, rank)
        metrics = {"media2text_correct": result.a2b_correct, "text2media_correct": result.b2a_correct}
        return NamedLosses.weighted({"contrastive_loss": result.loss}, metrics=metrics)
    logits = _need(out.logits, "logits", spec)
    if kind is TaskKind.MULTILABEL or kind is TaskKind.VQA:
        return multilabel_loss(logits, _need(batch.soft_targets, "soft targets", spec))
    if kind is TaskKind.AQA:
        return pairwise_hinge_loss(logits, _need(batch.labels, "labels", spec))
    if kind is TaskKind.GROUNDING:
        return grounding_loss(logits, _need(batch.boxes, "boxes", spec))
    if kind in (TaskKind.CLASSIFY, TaskKind.NLVR2, TaskKind.IMAGE_CLASSIFY):
        if batch.soft_targets is not None:  # mixup / cutmix targets already carry the label smoothing
            return classification_loss(logits, batch.soft_targets)
        return classification_loss(logits, _need(batch.labels, "labels", spec), label_smoothing)
    raise ValueError(f"task {spec.name} ({kind.value}) is not trained")
