"""The task model: the backbone plus a task head, routed by the task kind (spec §8).

The backbone sits at ``.model`` so that optimizer grouping (layer-wise LR decay) and the official-checkpoint adapter
see the same names as in pretraining; the head sits at ``.head`` and the NLVR2 type embeddings at
``.type_embeddings``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from onepeace.finetune.batch import TaskBatch
from onepeace.finetune.tasks import TaskKind, TaskSpec
from onepeace.heads import ClassifyHead, MeanPoolHead
from onepeace.modality import Modality
from onepeace.model import OnePeaceModel
from onepeace.model.outputs import AdapterOutput, SegmentOutput


@dataclass(frozen=True)
class TaskOutput:
    """What a task model returns.

    Attributes:
        logits: ``[B, C]`` class logits; AQA ``[B, K]`` choice scores; grounding ``[B, 4]`` normalised boxes
            ``(x0, y0, x1, y1)`` after the sigmoid; None for retrieval.
        text: retrieval: L2-normalised text embeddings ``[B, D]``.
        media: retrieval and zero-shot: L2-normalised image or audio embeddings ``[B, D]``.
    """

    logits: torch.Tensor | None = None
    text: torch.Tensor | None = None
    media: torch.Tensor | None = None


class TaskModel(nn.Module):
    """Backbone + head of one task. ``forward(batch)`` reads the inputs the task needs from a :class:`TaskBatch`."""

    def __init__(self, model: OnePeaceModel, spec: TaskSpec, num_classes: int, head_init_scale: float = 0.001) -> None:
        super().__init__()
        missing = [m.value for m in spec.modalities if m not in model.modalities]
        if missing:
            raise ValueError(f"task {spec.name} needs the {', '.join(missing)} branch, which the backbone lacks")
        self.spec = spec
        self.model = model
        dim, heads = model.cfg.embed_dim, model.cfg.heads
        if spec.kind is TaskKind.IMAGE_CLASSIFY:
            self.head = MeanPoolHead(dim, num_classes, head_init_scale)
        elif spec.has_head:
            inputs = 2 if spec.kind is TaskKind.NLVR2 else 1
            self.head = ClassifyHead(dim, heads, num_classes, use_pooler=spec.use_pooler, num_inputs=inputs)
        else:
            self.head = None
        if spec.kind is TaskKind.NLVR2:
            self.type_embeddings = nn.ParameterDict(
                {name: nn.Parameter(torch.zeros(1, 1, dim)) for name in ("text", "image", "image_2")}
            )

    def forward(self, batch: TaskBatch) -> TaskOutput:
        kind = self.spec.kind
        if kind is TaskKind.ZERO_SHOT:
            return TaskOutput(media=self._encode_media(batch))
        if kind is TaskKind.RETRIEVAL:
            return TaskOutput(text=self.model.encode_text(batch.text), media=self._encode_media(batch))
        if kind is TaskKind.IMAGE_CLASSIFY:
            return TaskOutput(logits=self._image_classify(batch))
        if kind is TaskKind.NLVR2:
            return TaskOutput(logits=self._nlvr2(batch))
        wanted = self.spec.modalities
        text = batch.text if Modality.TEXT in wanted else None
        image = batch.image if Modality.IMAGE in wanted else None
        audio = batch.audio if Modality.AUDIO in wanted else None
        if kind is TaskKind.AQA:
            k = batch.num_choices
            audio = (audio[0].repeat_interleave(k, dim=0), audio[1].repeat_interleave(k, dim=0))
        feats = self.model.forward_features(text=text, image=image, audio=audio)
        seg = feats[self.spec.pooled]
        logits = self.head((seg.hidden, seg.padding_mask))
        if kind is TaskKind.AQA:
            return TaskOutput(logits=logits.view(batch.batch_size, batch.num_choices))
        if kind is TaskKind.GROUNDING:
            return TaskOutput(logits=logits.float().sigmoid())
        return TaskOutput(logits=logits)

    def _encode_media(self, batch: TaskBatch) -> torch.Tensor:
        if self.spec.media is Modality.IMAGE:
            return self.model.encode_image(batch.image)
        return self.model.encode_audio(*batch.audio)

    def _image_classify(self, batch: TaskBatch) -> torch.Tensor:
        """The official vision branch has no final image LayerNorm: the head reads the last layer's output."""
        last = self.model.forward_features(image=batch.image, return_intermediates=True).intermediates[-1]
        return self.head(last)

    def _nlvr2(self, batch: TaskBatch) -> torch.Tensor:
        first = self._typed_pass(batch.text, batch.image, second=False)
        second = self._typed_pass(batch.text, batch.image2, second=True)
        return self.head((first.hidden, first.padding_mask), (second.hidden, second.padding_mask))

    def _typed_pass(self, text: torch.Tensor, image: torch.Tensor, second: bool) -> SegmentOutput:
        """One joint text-image pass with the type embeddings added to every position (cls included)."""
        inputs = self.model.embed_inputs(text=text, image=image)
        image_type = self.type_embeddings["image"]
        if second:
            image_type = image_type + self.type_embeddings["image_2"]
        inputs = {
            Modality.TEXT: _add(inputs[Modality.TEXT], self.type_embeddings["text"]),
            Modality.IMAGE: _add(inputs[Modality.IMAGE], image_type),
        }
        return self.model.encode_inputs(inputs).segments[Modality.TEXT]


def _add(out: AdapterOutput, vector: torch.Tensor) -> AdapterOutput:
    return replace(out, embedding=out.embedding + vector.to(out.embedding.dtype))
