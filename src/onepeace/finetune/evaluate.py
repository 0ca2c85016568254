"""Evaluating a task model on a task's validation data (spec §8.2 metrics).

Retrieval reports R@1/5/10 in both directions (``media_to_text_r1`` is the official ``txt_r1``); the zero-shot
task reports accuracy = R@1 of each clip or image against one prompt per class; classification reports accuracy,
multi-label mAP (sigmoid scores), VQA the VQA score, AQA accuracy over the choices, grounding Acc@0.5 IoU in the
original image pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from onepeace.evaluate.boxes import grounding_accuracy
from onepeace.evaluate.metrics import recall_at_k, top1_accuracy
from onepeace.evaluate.task_metrics import mean_average_precision, vqa_score
from onepeace.finetune.batch import TaskBatch
from onepeace.finetune.tasks import TaskKind, TaskSpec

KS = (1, 5, 10)


@dataclass
class Collected:
    """Outputs and targets gathered over an evaluation set (rows in loader order)."""

    logits: list[torch.Tensor] = field(default_factory=list)
    labels: list[torch.Tensor] = field(default_factory=list)
    soft_targets: list[torch.Tensor] = field(default_factory=list)
    boxes: list[torch.Tensor] = field(default_factory=list)
    sizes: list[torch.Tensor] = field(default_factory=list)
    text: list[torch.Tensor] = field(default_factory=list)
    media: list[torch.Tensor] = field(default_factory=list)
    group: list[torch.Tensor] = field(default_factory=list)
    examples: int = 0
    skipped: int = 0

    def add(self, out, batch: TaskBatch) -> None:
        """Keep what the metrics need from one batch's output (moved to the CPU as float32)."""
        self.examples += batch.batch_size
        self.skipped += sum(count for _, count in batch.skipped)
        if out.text is not None:
            self.text.append(out.text.float().cpu())
        if out.media is not None:
            self.media.append(out.media.float().cpu())
        if out.logits is not None:
            self.logits.append(out.logits.float().cpu())
        for name, value in (
            ("labels", batch.labels),
            ("soft_targets", batch.soft_targets),
            ("boxes", batch.boxes),
            ("sizes", batch.original_sizes),
            ("group", batch.group),
        ):
            if value is not None:
                getattr(self, name).append(value.cpu())


@torch.no_grad()
def _retrieval(c: Collected) -> dict[str, float]:
    text, media, group = torch.cat(c.text), torch.cat(c.media), torch.cat(c.group)
    distinct, first = _first_rows(group)
    media = media[first]
    correct = group[:, None] == distinct[None, :]  # [N_text, N_media]
    sim = text @ media.t()
    out = {f"text_to_media_r{k}": v for k, v in recall_at_k(sim, correct, KS).items()}
    out.update({f"media_to_text_r{k}": v for k, v in recall_at_k(sim.t(), correct.t(), KS).items()})
    out["text_queries"], out["media_queries"] = float(len(text)), float(len(media))
    return out


def _first_rows(group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct group ids in order of first appearance and the row of each first appearance."""
    seen: dict[int, int] = {}
    for row, g in enumerate(group.tolist()):
        seen.setdefault(g, row)
    return torch.tensor(list(seen)), torch.tensor(list(seen.values()))


def zero_shot_accuracy(media: torch.Tensor, prompts: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy of assigning each ``media [N, D]`` embedding the most similar of the ``prompts [C, D]`` (one per
    class, L2-normalised); ``labels [N]`` class indices."""
    return top1_accuracy(F.normalize(media.float(), dim=-1) @ F.normalize(prompts.float(), dim=-1).t(), labels)


def score(spec: TaskSpec, c: Collected, class_prompts: torch.Tensor | None = None) -> dict[str, float]:
    """Metrics of ``spec`` from collected outputs (``class_prompts [C, D]``: the zero-shot class embeddings)."""
    kind = spec.kind
    if kind is TaskKind.RETRIEVAL:
        out = _retrieval(c)
    elif kind is TaskKind.ZERO_SHOT:
        if class_prompts is None:
            raise ValueError("zero-shot evaluation needs the class prompt embeddings")
        out = {"accuracy": zero_shot_accuracy(torch.cat(c.media), class_prompts, torch.cat(c.labels))}
    else:
        out = _head_metrics(spec, torch.cat(c.logits), c)
    out["examples"], out["skipped"] = float(c.examples), float(c.skipped)
    return out


def _head_metrics(spec: TaskSpec, logits: torch.Tensor, c: Collected) -> dict[str, float]:
    kind = spec.kind
    if kind is TaskKind.MULTILABEL:
        return {"map": mean_average_precision(logits.sigmoid(), torch.cat(c.soft_targets))}
    if kind is TaskKind.VQA:
        return {"vqa_score": vqa_score(logits, torch.cat(c.soft_targets))}
    if kind is TaskKind.GROUNDING:
        sizes = torch.cat(c.sizes).double().repeat(1, 2)  # [N, 4] as (w, h, w, h)
        predicted, target = logits.double() * sizes, torch.cat(c.boxes).double() * sizes
        return {"acc_iou50": grounding_accuracy(predicted, target)}
    return {"accuracy": top1_accuracy(logits, torch.cat(c.labels))}


def main_metric(spec: TaskSpec, metrics: dict[str, float]) -> float:
    """The task's headline number (``spec.metric``) from a metrics dict."""
    return metrics[spec.metric]


def format_markdown(task: str, model: str, metrics: dict[str, float], notes: Sequence[str] = ()) -> str:
    """A small markdown report: one row per metric (fractions shown as percentages, counts as integers)."""
    lines = [f"# {task}", "", f"Model: `{model}`", "", "| metric | value |", "|---|---:|"]
    for name, value in metrics.items():
        shown = (
            f"{int(value)}"
            if name in ("examples", "skipped", "text_queries", "media_queries")
            else f"{100 * value:.2f}%"
        )
        lines.append(f"| {name} | {shown} |")
    lines += ["", *notes] if notes else []
    return "\n".join(lines) + "\n"
