"""Datasets, collation and loaders of the downstream tasks (spec §6, §8.2).

:class:`TaskDataset` turns the rows of :func:`~onepeace.finetune.readers.read_task_tsv` into
:class:`TaskExample` s: media decoded (images as RGB, audio loaded at 16 kHz and prepared as in the API:
standardised, first ``max_duration`` s, tiled to 1 s), the task's image transform of the split applied
(:mod:`onepeace.finetune.transforms`), texts normalised with :meth:`Tokenizer.normalize`. Every random draw of
example ``i`` comes from a generator seeded with ``(seed, epoch, i)``, so an example does not depend on worker
scheduling. :class:`TaskCollator` builds the :class:`~onepeace.finetune.batch.TaskBatch`.

Bad records (media file missing -> ``missing_file``, undecodable -> ``bad_image`` / ``bad_audio``, text empty after
normalisation -> ``empty_text``) never stop the loader. In training the record is replaced by the next usable row
and counted in ``TaskBatch.skipped``; in evaluation it is dropped and counted, so an evaluation batch may hold fewer
examples than asked, or none (``batch_size == 0``: only ``skipped`` is set; skip such batches).

Per task kind:

* AQA: the K = 4 texts of example ``b`` are ``"{question} answer: {answer_k}"`` at rows ``b * K + k``, not
  normalised and not cut at ``max_text_tokens`` (up to :data:`AQA_MAX_TOKENS`); the leading space of the official
  template ``" {question} answer: {answer}"`` is the one the tokenizer adds, and the tokenizer lowercases as it does
  for every text. The audio is kept once per example (the model repeats it).
* VQA: ``soft_targets [B, C]`` hold the answer confidences; FSD50K: multi-hot ``soft_targets [B, C]``.
* Grounding: ``boxes [B, 4]`` normalised, ``original_sizes [B, 2]`` (width, height).
* Retrieval: ``group [B]`` numbers the media items (rows sharing an image or clip share it).
* Zero-shot: ``labels [B]`` index :attr:`TaskDataset.class_names` (sorted distinct class names of the file);
  no text in the batch: the caller encodes :func:`zero_shot_prompts` of :func:`zero_shot_classes` once.
* ImageNet training with ``mixup`` or ``cutmix`` > 0: images mixed in the collate (:func:`~onepeace.finetune.
  transforms.mix_batch`) and ``soft_targets [B, C]`` set; they already include the label smoothing
  ``cfg.model.label_smoothing`` (``labels`` keeps the unmixed classes).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from onepeace.config import AudioAdapterConfig
from onepeace.data.audio import collate_audio, load_audio, prepare_waveform
from onepeace.data.batch import pin_memory_for
from onepeace.data.image import load_image
from onepeace.data.pretrain_sources import BadRecord, add_count
from onepeace.data.tokenizer import Tokenizer, tokenizer_for
from onepeace.errors import InputError, MissingDependencyError
from onepeace.finetune import transforms
from onepeace.finetune.batch import TaskBatch
from onepeace.finetune.config import FinetuneConfig, TaskDataConfig
from onepeace.finetune.readers import TaskRow, ZeroShotRow, class_names, read_class_names, read_task_tsv
from onepeace.finetune.tasks import TaskKind, TaskSpec
from onepeace.modality import Modality

AQA_MAX_TOKENS = 256
AQA_NUM_CHOICES = 4
_LABELLED = (TaskKind.ZERO_SHOT, TaskKind.CLASSIFY, TaskKind.IMAGE_CLASSIFY, TaskKind.NLVR2, TaskKind.AQA)


@dataclass(frozen=True)
class TaskExample:
    """One prepared example.

    Attributes:
        index: the dataset index whose slot this example fills (seeds its randomness).
        id: the row's id.
        texts: raw texts to tokenise (one, K for AQA, none for media-only tasks).
        image, image2: ``float32 [3, S, S]``.
        waveform: prepared ``float32 [N]`` clip.
        label: class index or correct choice (-1: none).
        targets: sparse soft targets ``((class, value), ...)`` (VQA confidences, FSD50K 1.0).
        box: ``float32 [4]`` normalised ``(x0, y0, x1, y1)``; size: original ``(width, height)``.
        group: retrieval media id (-1: none).
        skipped: reasons of the bad records counted for this slot.
        dropped: evaluation only: the record was bad and the slot is empty.
    """

    index: int
    id: str
    texts: tuple[str, ...] = ()
    image: torch.Tensor | None = None
    image2: torch.Tensor | None = None
    waveform: np.ndarray | None = None
    label: int = -1
    targets: tuple[tuple[int, float], ...] = ()
    box: torch.Tensor | None = None
    size: tuple[int, int] | None = None
    group: int = -1
    skipped: tuple[str, ...] = ()
    dropped: bool = False


def zero_shot_prompts(names: Sequence[str], prompt: str = "This is a sound of {label}") -> list[str]:
    """The prompt of every class name (``{label}`` replaced), in the order of ``names``."""
    return [prompt.replace("{label}", name) for name in names]


def zero_shot_classes(cfg: FinetuneConfig, split: Literal["train", "valid"] = "valid") -> tuple[str, ...]:
    """The sorted distinct class names of a zero-shot task's ``cfg.data.valid`` (or ``train``) files; the batches'
    ``labels`` index this tuple."""
    paths = cfg.data.valid if split == "valid" else cfg.data.train
    if not paths:
        raise ValueError(f"data.{split} is empty: give the {cfg.task} TSV file(s)")
    return read_class_names(cfg.spec, paths, cfg.data.root)


def _open_image(path: str, what: str) -> Image.Image:
    if not os.path.isfile(path):
        raise BadRecord("missing_file", f"{what}: {path!r} not found")
    try:
        return load_image(path, name=what)
    except Exception as exc:  # any decoder failure makes the record unusable, never the loader
        raise BadRecord("bad_image", str(exc)) from exc


def _open_audio(path: str, what: str, cfg: AudioAdapterConfig) -> np.ndarray:
    if not os.path.isfile(path):
        raise BadRecord("missing_file", f"{what}: {path!r} not found")
    try:
        return prepare_waveform(load_audio(path, target_rate=cfg.sample_rate, name=what), cfg, name=what)
    except MissingDependencyError:
        raise
    except Exception as exc:
        raise BadRecord("bad_audio", str(exc)) from exc


def _text(text: str, what: str) -> str:
    normalized = Tokenizer.normalize(text)
    if not normalized:
        raise BadRecord("empty_text", f"{what}: no text left after normalisation of {text!r}")
    return normalized


class TaskDataset(Dataset):
    """Examples of one task's rows for one split and epoch (see the module docstring).

    ``audio_cfg`` is the model's audio adapter config; its ``max_duration`` is replaced by ``data.max_duration``.
    """

    def __init__(
        self,
        spec: TaskSpec,
        rows: Sequence[TaskRow],
        data: TaskDataConfig,
        audio_cfg: AudioAdapterConfig,
        split: Literal["train", "valid"],
        seed: int = 0,
        epoch: int = 0,
        max_substitutes: int = 64,
    ) -> None:
        if split not in ("train", "valid"):
            raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
        self.spec, self.rows, self.data = spec, list(rows), data
        self.audio = dataclasses.replace(audio_cfg, max_duration=data.max_duration)
        self.train, self.seed, self.epoch, self.max_substitutes = split == "train", seed, epoch, max_substitutes

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def class_names(self) -> tuple[str, ...]:
        """Zero-shot tasks: the sorted distinct class names (``labels`` index them); other tasks: ``()``."""
        zero_shot = [r for r in self.rows if isinstance(r, ZeroShotRow)]
        return class_names(zero_shot)

    def __getitem__(self, index: int) -> TaskExample:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        try:
            return self.example(index, rng)
        except BadRecord as exc:
            skipped = (exc.reason,)
        if not self.train:
            return TaskExample(index, self.rows[index].id, skipped=skipped, dropped=True)
        n = len(self.rows)
        tries = min(self.max_substitutes, n - 1)
        for k in range(1, tries + 1):
            try:
                return dataclasses.replace(self.example((index + k) % n, rng), index=index, skipped=skipped)
            except BadRecord:
                continue
        raise InputError(f"task {self.spec.name}: no usable record among row {index} and the {tries} rows after it")

    def _image(self, path: str, rng: np.random.Generator, what: str) -> torch.Tensor:
        img, size, kind = _open_image(path, what), self.data.image_size, self.spec.kind
        if kind is TaskKind.IMAGE_CLASSIFY:
            return transforms.imagenet_train(img, size, rng) if self.train else transforms.imagenet_eval(img, size)
        if kind is TaskKind.NLVR2 and self.train:
            return transforms.nlvr2_train(img, size, rng)
        return transforms.resize_square(img, size)

    def _media(self, path: str, rng: np.random.Generator, what: str) -> dict[str, Any]:
        if self.spec.media is Modality.AUDIO:
            return {"waveform": _open_audio(path, what, self.audio)}
        return {"image": self._image(path, rng, what)}

    def example(self, index: int, rng: np.random.Generator) -> TaskExample:
        """The example of row ``index``; raises :class:`BadRecord` for a bad record."""
        row, kind = self.rows[index], self.spec.kind
        what = f"{self.spec.name} row {index} (id {row.id!r})"
        base: dict[str, Any] = {"index": index, "id": row.id}
        if kind is TaskKind.RETRIEVAL:
            text = _text(row.text, what)
            return TaskExample(**base, texts=(text,), group=row.group, **self._media(row.media, rng, what))
        if kind in (TaskKind.ZERO_SHOT, TaskKind.CLASSIFY, TaskKind.IMAGE_CLASSIFY):
            return TaskExample(**base, label=row.label, **self._media(row.media, rng, what))
        if kind is TaskKind.MULTILABEL:
            targets = tuple((c, 1.0) for c in row.labels)
            return TaskExample(**base, targets=targets, **self._media(row.media, rng, what))
        if kind is TaskKind.AQA:
            texts = tuple(f"{row.question} answer: {a}" for a in row.answers)
            return TaskExample(**base, texts=texts, label=row.label, **self._media(row.media, rng, what))
        if kind is TaskKind.VQA:
            text, targets = _text(row.question, what), tuple(sorted(row.refs.items()))
            return TaskExample(**base, texts=(text,), targets=targets, **self._media(row.media, rng, what))
        if kind is TaskKind.NLVR2:
            text = _text(row.text, what)
            image, image2 = self._image(row.media, rng, what), self._image(row.media2, rng, what)
            return TaskExample(**base, texts=(text,), image=image, image2=image2, label=row.label)
        if kind is TaskKind.GROUNDING:
            text = _text(row.text, what)
            img = _open_image(row.media, what)
            image, box, size = transforms.grounding_transform(img, row.box, self.data.image_size, self.train, rng)
            return TaskExample(**base, texts=(text,), image=image, box=box, size=size)
        raise ValueError(f"no dataset for task kind {kind}")


class TaskCollator:
    """Collate :class:`TaskExample` s into a :class:`TaskBatch` (picklable; the tokenizer is built per process).

    ``num_classes`` sizes ``soft_targets``; ``train`` with an image classification task and ``data.mixup`` or
    ``data.cutmix`` > 0 mixes the batch with a generator seeded by ``(seed, epoch, index of the first example)``.
    """

    def __init__(
        self,
        spec: TaskSpec,
        num_classes: int,
        data: TaskDataConfig,
        audio_cfg: AudioAdapterConfig,
        train: bool = False,
        label_smoothing: float = 0.0,
        seed: int = 0,
        epoch: int = 0,
    ) -> None:
        self.spec, self.num_classes, self.max_text_tokens = spec, num_classes, data.max_text_tokens
        self.audio = dataclasses.replace(audio_cfg, max_duration=data.max_duration)
        mixing = train and spec.kind is TaskKind.IMAGE_CLASSIFY and (data.mixup > 0 or data.cutmix > 0)
        self.mix = (data.mixup, data.cutmix) if mixing else None
        self.label_smoothing, self.seed, self.epoch = label_smoothing, seed, epoch
        self._tokenizer: Tokenizer | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokenizer": None}

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            n = max(AQA_MAX_TOKENS, self.max_text_tokens) if self.spec.kind is TaskKind.AQA else self.max_text_tokens
            self._tokenizer = tokenizer_for(n)
        return self._tokenizer

    def __call__(self, examples: Sequence[TaskExample]) -> TaskBatch:
        """The batch of the usable examples (see :class:`TaskBatch` for the fields and shapes)."""
        counts: dict[str, int] = {}
        for e in examples:
            for reason in e.skipped:
                add_count(counts, reason)
        skipped = tuple(sorted(counts.items()))
        kept = [e for e in examples if not e.dropped]
        if not kept:
            return TaskBatch(ids=(), skipped=skipped)
        fields: dict[str, Any] = {}
        texts = [t for e in kept for t in e.texts]
        if texts:
            fields["text"] = self.tokenizer(texts)
        if kept[0].image is not None:
            fields["image"] = torch.stack([e.image for e in kept])
        if kept[0].image2 is not None:
            fields["image2"] = torch.stack([e.image2 for e in kept])
        if kept[0].waveform is not None:
            fields["audio_waveform"], fields["audio_padding_mask"] = collate_audio(
                [e.waveform for e in kept], self.audio
            )
        fields.update(self._targets(kept))
        if self.mix is not None:
            rng = np.random.default_rng([self.seed, self.epoch, kept[0].index, 1])
            fields["image"], fields["soft_targets"] = transforms.mix_batch(
                fields["image"], fields["labels"], self.num_classes, self.mix, self.label_smoothing, rng
            )
        num_choices = AQA_NUM_CHOICES if self.spec.kind is TaskKind.AQA else 1
        return TaskBatch(ids=tuple(e.id for e in kept), num_choices=num_choices, skipped=skipped, **fields)

    def _targets(self, kept: Sequence[TaskExample]) -> dict[str, torch.Tensor]:
        kind, out = self.spec.kind, {}
        if kind in _LABELLED:
            out["labels"] = torch.tensor([e.label for e in kept], dtype=torch.long)
        if kind in (TaskKind.MULTILABEL, TaskKind.VQA):
            soft = torch.zeros(len(kept), self.num_classes, dtype=torch.float32)
            for b, e in enumerate(kept):
                for c, value in e.targets:
                    soft[b, c] = value
            out["soft_targets"] = soft
        if kind is TaskKind.GROUNDING:
            out["boxes"] = torch.stack([e.box for e in kept])
            out["original_sizes"] = torch.tensor([e.size for e in kept], dtype=torch.float32)
        if kind is TaskKind.RETRIEVAL:
            out["group"] = torch.tensor([e.group for e in kept], dtype=torch.long)
        return out


def shard_indices(num_rows: int, train: bool, rank: int, world_size: int, seed: int) -> np.ndarray:
    """Row indices ``int64 [n_rank]`` of one rank.

    Training: a permutation drawn with ``seed``, repeated from its start up to a multiple of ``world_size`` (so every
    rank gets the same number of examples) and dealt to the ranks in turn. Evaluation: file order, cut into
    ``world_size`` contiguous blocks (sizes differ by at most one; concatenating the ranks' blocks gives the file
    order), nothing repeated.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
    if not train:
        return np.array_split(np.arange(num_rows, dtype=np.int64), world_size)[rank]
    order = np.random.default_rng(seed).permutation(num_rows)
    padded = np.resize(order, -(-num_rows // world_size) * world_size)
    return padded[rank::world_size].astype(np.int64)


def build_task_loader(
    cfg: FinetuneConfig,
    split: Literal["train", "valid"],
    audio_cfg: AudioAdapterConfig,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    device: torch.device | str | None = None,
    skip_batches: int = 0,
) -> DataLoader:
    """Loader of one rank's :class:`TaskBatch` es of ``cfg.data.train`` or ``cfg.data.valid`` for one epoch.

    Training: shuffled with ``cfg.seed + epoch`` and sharded (:func:`shard_indices`), batches of
    ``data.batch_size``, the last one possibly smaller. Evaluation: file order, batches of ``data.eval_batch_size``.
    ``audio_cfg`` is the model's audio adapter config (``max_duration`` from ``cfg.data``). The dataset
    (``loader.dataset``, a :class:`TaskDataset`) gives the zero-shot class names. Batches are pinned when they
    feed a CUDA ``device`` (see :func:`onepeace.data.batch.pin_memory_for`). ``skip_batches`` (training) starts
    after that many batches of this rank's epoch, as a resumed run does.
    """
    if split not in ("train", "valid"):
        raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
    spec, data, train = cfg.spec, cfg.data, split == "train"
    paths = data.train if train else data.valid
    if not paths:
        raise ValueError(f"data.{split} is empty: give the {spec.name} TSV file(s)")
    if train and not spec.trainable:
        raise ValueError(f"task {spec.name} has no training (zero-shot): use the valid split")
    rows = read_task_tsv(spec, paths, data.root, cfg.num_classes)
    if not rows:
        raise ValueError(f"no rows in data.{split} files {list(paths)}")
    dataset = TaskDataset(spec, rows, data, audio_cfg, split, cfg.seed, epoch)
    collate = TaskCollator(spec, cfg.num_classes, data, audio_cfg, train, cfg.model.label_smoothing, cfg.seed, epoch)
    indices = shard_indices(len(rows), train, rank, world_size, cfg.seed + epoch)
    if skip_batches < 0 or (skip_batches and not train):
        raise ValueError(f"skip_batches must be >= 0 and only skips training batches, got {skip_batches} ({split})")
    indices = indices[skip_batches * data.batch_size :]
    return DataLoader(
        dataset,
        batch_size=data.batch_size if train else data.eval_batch_size,
        sampler=indices.tolist(),
        collate_fn=collate,
        num_workers=data.num_workers,
        drop_last=False,
        generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch),
        pin_memory=pin_memory_for(device),
    )
