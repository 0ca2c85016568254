"""The downstream tasks (spec §8.2): what each one feeds the backbone, which segment its head reads, its loss
and its metric. A task is plain data; :mod:`onepeace.finetune.model` and :mod:`onepeace.finetune.objective`
turn it into modules and losses.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from onepeace.modality import Modality


class TaskKind(str, Enum):
    """How a task uses the backbone; several named tasks share a kind (RefCOCO, RefCOCO+, RefCOCOg)."""

    RETRIEVAL = "retrieval"
    """Unimodal passes of text and one media modality, symmetric contrastive loss, R@k."""
    ZERO_SHOT = "zero_shot"
    """No training: class names through prompt templates, audio or image -> prompt R@1 = accuracy."""
    CLASSIFY = "classify"
    """One label per example (VGGSound): head over the media segment, cross-entropy, accuracy."""
    MULTILABEL = "multilabel"
    """Several labels per example (FSD50K): head over the media segment, BCE, mAP."""
    AQA = "aqa"
    """Audio question answering: joint audio-text pass per choice, one score each, pairwise hinge, accuracy."""
    VQA = "vqa"
    """Joint image-text pass, head with tanh pooler over the text segment, soft-target BCE, VQA score."""
    NLVR2 = "nlvr2"
    """Two joint passes (one per image) with type embeddings, pooled text vectors concatenated, CE, accuracy."""
    GROUNDING = "grounding"
    """Joint image-text pass, 4 sigmoid box coordinates, L1 + GIoU, Acc@0.5 in original pixels."""
    IMAGE_CLASSIFY = "image_classify"
    """Vision branch only: mean of patch tokens -> LayerNorm -> Linear, label-smoothed CE, top-1."""


@dataclass(frozen=True)
class TaskSpec:
    """One downstream task.

    Attributes:
        name: registry key, e.g. ``"vggsound"``.
        kind: how the backbone is used.
        media: the non-text modality the task reads.
        pooled: the segment the head pools (None for retrieval, zero-shot and image classification).
        num_classes: head outputs (0: no head).
        columns: the official TSV columns the reader needs (spec §6.1), in file order.
        metric: name of the main metric in the evaluation report.
        use_pooler: tanh pooler after the attention pooling (VQA).
    """

    name: str
    kind: TaskKind
    media: Modality
    pooled: Modality | None
    num_classes: int
    columns: tuple[str, ...]
    metric: str
    use_pooler: bool = False

    @property
    def modalities(self) -> tuple[Modality, ...]:
        """Backbone branches the task needs (text first)."""
        if self.kind in (TaskKind.CLASSIFY, TaskKind.MULTILABEL, TaskKind.IMAGE_CLASSIFY):
            return (self.media,)
        return (Modality.TEXT, self.media)

    @property
    def has_head(self) -> bool:
        return self.kind not in (TaskKind.RETRIEVAL, TaskKind.ZERO_SHOT)

    @property
    def trainable(self) -> bool:
        return self.kind is not TaskKind.ZERO_SHOT


_IMAGE_TEXT = ("image_id", "image", "caption")
_AUDIO_TEXT = ("uniq_id", "audio", "text", "duration")
_GROUNDING = ("image", "text", "region_coord")
TXT, IMG, AUD = Modality.TEXT, Modality.IMAGE, Modality.AUDIO

TASKS: dict[str, TaskSpec] = {
    s.name: s
    for s in (
        TaskSpec("coco_retrieval", TaskKind.RETRIEVAL, IMG, None, 0, _IMAGE_TEXT, "media_to_text_r1"),
        TaskSpec("flickr30k_retrieval", TaskKind.RETRIEVAL, IMG, None, 0, _IMAGE_TEXT, "media_to_text_r1"),
        TaskSpec("audiocaps_retrieval", TaskKind.RETRIEVAL, AUD, None, 0, _AUDIO_TEXT, "media_to_text_r1"),
        TaskSpec("clotho_retrieval", TaskKind.RETRIEVAL, AUD, None, 0, _AUDIO_TEXT, "media_to_text_r1"),
        TaskSpec("esc50", TaskKind.ZERO_SHOT, AUD, None, 0, _AUDIO_TEXT, "accuracy"),
        TaskSpec("vggsound", TaskKind.CLASSIFY, AUD, AUD, 309, _AUDIO_TEXT, "accuracy"),
        TaskSpec("fsd50k", TaskKind.MULTILABEL, AUD, AUD, 200, ("uniq_id", "audio", "refs", "duration"), "map"),
        TaskSpec("aqa", TaskKind.AQA, AUD, TXT, 1, _AUDIO_TEXT, "accuracy"),
        TaskSpec("vqa", TaskKind.VQA, IMG, TXT, 3129, ("uniq_id", "image", "question", "refs"), "vqa_score", True),
        TaskSpec("nlvr2", TaskKind.NLVR2, IMG, TXT, 2, ("uniq_id", "text", "image1", "image2", "label"), "accuracy"),
        TaskSpec("refcoco", TaskKind.GROUNDING, IMG, IMG, 4, _GROUNDING, "acc_iou50"),
        TaskSpec("refcoco_plus", TaskKind.GROUNDING, IMG, IMG, 4, _GROUNDING, "acc_iou50"),
        TaskSpec("refcocog", TaskKind.GROUNDING, IMG, TXT, 4, _GROUNDING, "acc_iou50"),
        TaskSpec("imagenet", TaskKind.IMAGE_CLASSIFY, IMG, None, 1000, ("image", "label"), "accuracy"),
    )
}
"""Every task of the official release, by name."""


def get_task(name: str) -> TaskSpec:
    """The task called ``name``; ``ValueError`` lists the known names."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None
