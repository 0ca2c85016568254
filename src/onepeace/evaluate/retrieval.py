"""Held-out retrieval and zero-shot evaluation of a demo-format corpus (protocol: docs/demo_corpus.md).

:func:`~onepeace.evaluate.heldout.load_corpus` reads and checks the held-out files; :func:`build_protocol`
turns the items into query/gallery sets with ground-truth matrices; :func:`evaluate_retrieval` embeds every
distinct text, image and clip once and scores each set. An item's image is its first (gallery) image.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from onepeace.corpus.items import ZeroShotTask
from onepeace.evaluate import metrics
from onepeace.evaluate.heldout import TASKS_FILE, HeldoutCorpus, HeldoutItem, load_corpus

MODALITIES = ("text", "image", "audio")


@dataclass(frozen=True, eq=False)
class RetrievalSet:
    """One direction before embedding: payloads (texts or file paths) and ``correct``, bool ``[Q, G]``."""

    name: str
    query_modality: str
    gallery_modality: str
    queries: tuple[str, ...]
    gallery: tuple[str, ...]
    correct: torch.Tensor
    reason: str | None = None
    """Why the direction has no queries (then it is reported as absent)."""


@dataclass(frozen=True, eq=False)
class ZeroShotSet:
    """One zero-shot task before embedding: media ``queries`` ``[Q]``, ``targets`` long ``[Q]``, ``prompts`` ``[C]``."""

    task: ZeroShotTask
    queries: tuple[str, ...]
    targets: torch.Tensor
    prompts: tuple[str, ...]
    reason: str | None = None


@dataclass(frozen=True, eq=False)
class Protocol:
    """Every retrieval direction and zero-shot task of a corpus, plus notes on what was left out."""

    retrieval: tuple[RetrievalSet, ...]
    zero_shot: tuple[ZeroShotSet, ...]
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class DirectionResult:
    """R@k and its chance level (``{k: fraction}``) of one direction; ``absent`` gives why it was not evaluated."""

    name: str
    queries: int
    gallery: int
    recall: Mapping[int, float] = field(default_factory=dict)
    chance: Mapping[int, float] = field(default_factory=dict)
    absent: str | None = None


@dataclass(frozen=True)
class ZeroShotResult:
    """Top-1 accuracy and chance (1 / labels) of one zero-shot task; ``absent`` gives why it was not evaluated."""

    task: str
    modality: str
    items: int
    labels: int
    accuracy: float | None = None
    chance: float | None = None
    absent: str | None = None


@dataclass(frozen=True)
class RetrievalReport:
    """Everything ``onepeace evaluate retrieval`` measured."""

    data_dir: str
    model: str
    ks: tuple[int, ...]
    directions: tuple[DirectionResult, ...]
    zero_shot: tuple[ZeroShotResult, ...]
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (fractions in [0, 1]; absent entries carry only their reason)."""

        def direction(d: DirectionResult) -> dict[str, Any]:
            if d.absent is not None:
                return {"absent": d.absent}
            recall = {f"R@{k}": v for k, v in d.recall.items()}
            chance = {f"R@{k}": v for k, v in d.chance.items()}
            return {"queries": d.queries, "gallery": d.gallery, "recall": recall, "chance": chance}

        def task(z: ZeroShotResult) -> dict[str, Any]:
            out: dict[str, Any] = {"modality": z.modality, "items": z.items, "labels": z.labels}
            return {**out, "absent": z.absent} if z.absent else {**out, "accuracy": z.accuracy, "chance": z.chance}

        return {
            "data": self.data_dir,
            "model": self.model,
            "ks": list(self.ks),
            "retrieval": {d.name: direction(d) for d in self.directions},
            "zero_shot": {z.task: task(z) for z in self.zero_shot},
            "notes": list(self.notes),
        }


# ------------------------------------------------------------------------------------------------ protocol
def _empty(name: str, query: str, gallery: str, reason: str) -> RetrievalSet:
    return RetrievalSet(name, query, gallery, (), (), torch.zeros(0, 0, dtype=torch.bool), reason)


def _media_text_sets(items: Sequence[HeldoutItem], modality: str) -> tuple[RetrievalSet, RetrievalSet]:
    """``modality -> text`` and ``text -> modality``: media against the distinct texts paired with them."""
    forward, backward = f"{modality}->text", f"text->{modality}"
    pairs = [
        (str(getattr(it, modality)), it.caption if modality == "image" else it.audio_text)
        for it in items
        if getattr(it, modality) is not None
    ]
    if not pairs:
        reason = f"no held-out item has {'an image' if modality == 'image' else 'a clip'}"
        return _empty(forward, modality, "text", reason), _empty(backward, "text", modality, reason)
    media = tuple(p for p, _ in pairs)
    texts = [t for _, t in pairs]
    gallery = tuple(dict.fromkeys(texts))
    correct = metrics.same_label_matrix(texts, gallery)
    return (
        RetrievalSet(forward, modality, "text", media, gallery, correct),
        RetrievalSet(backward, "text", modality, gallery, media, correct.T.contiguous()),
    )


def _audio_image_set(items: Sequence[HeldoutItem]) -> RetrievalSet:
    """Clips against all images; correct images share the clip's concept (or its own item, for a two-media item)."""
    name = "audio->image"
    images = [it for it in items if it.image is not None]
    clips = [it for it in items if it.audio is not None]
    if not clips or not images:
        reason = "no held-out item has a clip" if not clips else "no held-out item has an image"
        return _empty(name, "audio", "image", reason)
    image_tags = [{("item", it.key)} | ({("concept", it.concept)} if it.concept else set()) for it in images]
    clip_tags = [
        ({("item", it.key)} if it.image is not None else set()) | ({("concept", it.concept)} if it.concept else set())
        for it in clips
    ]
    correct = metrics.shared_tag_matrix(clip_tags, image_tags)
    keep = correct.any(dim=1)
    if not keep.any():
        return _empty(name, "audio", "image", "no held-out clip shares a concept with a held-out image")
    queries = tuple(str(it.audio) for it, k in zip(clips, keep.tolist()) if k)
    return RetrievalSet(name, "audio", "image", queries, tuple(str(it.image) for it in images), correct[keep])


def _zero_shot_set(items: Sequence[HeldoutItem], task: ZeroShotTask) -> ZeroShotSet:
    members = [it for it in items if task.name in it.labels]
    prompts = tuple(task.prompt.replace("{}", label) for label in task.labels)
    targets = torch.tensor([task.labels.index(it.labels[task.name]) for it in members], dtype=torch.long)
    queries = tuple(str(getattr(it, task.modality)) for it in members)
    reason = None if members else "no held-out item has a label for this task"
    return ZeroShotSet(task, queries, targets, prompts, reason)


def build_protocol(corpus: HeldoutCorpus) -> Protocol:
    """The query/gallery sets of every direction and the zero-shot sets of every task (nothing embedded)."""
    image_text, text_image = _media_text_sets(corpus.items, "image")
    audio_text, text_audio = _media_text_sets(corpus.items, "audio")
    retrieval = (image_text, text_image, audio_text, text_audio, _audio_image_set(corpus.items))
    if corpus.tasks is None:
        return Protocol(retrieval, (), (f"no {TASKS_FILE} in {corpus.root}: zero-shot classification skipped",))
    return Protocol(retrieval, tuple(_zero_shot_set(corpus.items, t) for t in corpus.tasks))


def restrict_protocol(protocol: Protocol, available: Sequence[str]) -> Protocol:
    """``protocol`` with every set that needs a modality outside ``available`` marked absent (with the reason)."""

    def missing(*modalities: str) -> str | None:
        lacking = [m for m in modalities if m not in available]
        return f"the model has no {lacking[0]} branch" if lacking else None

    retrieval = tuple(
        _empty(s.name, s.query_modality, s.gallery_modality, why)
        if s.reason is None and (why := missing(s.query_modality, s.gallery_modality))
        else s
        for s in protocol.retrieval
    )
    zero_shot = tuple(
        ZeroShotSet(z.task, (), torch.zeros(0, dtype=torch.long), z.prompts, why)
        if z.reason is None and (why := missing(z.task.modality, "text"))
        else z
        for z in protocol.zero_shot
    )
    return Protocol(retrieval, zero_shot, protocol.notes)


# ------------------------------------------------------------------------------------------------ embedding
@dataclass(frozen=True, eq=False)
class EmbeddingTable:
    """Embeddings of distinct payloads: per modality a payload -> row index and a float32 ``[N, D]`` matrix."""

    rows: Mapping[str, Mapping[str, int]]
    vectors: Mapping[str, torch.Tensor]

    def get(self, modality: str, payloads: Sequence[str]) -> torch.Tensor:
        """The rows of ``payloads``: ``[len(payloads), D]``."""
        index = self.rows[modality]
        return self.vectors[modality][torch.tensor([index[p] for p in payloads], dtype=torch.long)]


def distinct_payloads(protocol: Protocol) -> dict[str, list[str]]:
    """Modality -> distinct payloads in first-use order (texts, image paths, clip paths)."""
    found: dict[str, dict[str, None]] = {m: {} for m in MODALITIES}
    for s in protocol.retrieval:
        found[s.query_modality].update(dict.fromkeys(s.queries))
        found[s.gallery_modality].update(dict.fromkeys(s.gallery))
    for z in protocol.zero_shot:
        if z.reason is None:
            found[z.task.modality].update(dict.fromkeys(z.queries))
            found["text"].update(dict.fromkeys(z.prompts))
    return {m: list(p) for m, p in found.items() if p}


def embed_payloads(
    model: Any, modality: str, payloads: Sequence[str], batch_size: int, bar: Any = None
) -> torch.Tensor:
    """L2-normalised float32 CPU embeddings ``[N, D]`` of one modality's payloads, ``batch_size`` at a time."""
    chunks = []
    for start in range(0, len(payloads), batch_size):
        batch = list(payloads[start : start + batch_size])
        out = getattr(model.embed(**{modality: batch}, batch_size=batch_size), modality)
        chunks.append(torch.nn.functional.normalize(out.detach().float().cpu(), dim=-1))
        if bar is not None:
            bar.update(len(batch))
    return torch.cat(chunks)


def embed_protocol(model: Any, protocol: Protocol, batch_size: int = 16, progress: bool = True) -> EmbeddingTable:
    """Embed every distinct payload of ``protocol`` once, with a progress bar on stderr."""
    from tqdm.auto import tqdm

    payloads = distinct_payloads(protocol)
    total = sum(len(p) for p in payloads.values())
    rows, vectors = {}, {}
    with tqdm(total=total, desc="embedding", unit="item", file=sys.stderr, disable=not progress) as bar:
        for modality, items in payloads.items():
            rows[modality] = {p: i for i, p in enumerate(items)}
            vectors[modality] = embed_payloads(model, modality, items, batch_size, bar)
    return EmbeddingTable(rows, vectors)


# ------------------------------------------------------------------------------------------------ scoring
def score_direction(s: RetrievalSet, table: EmbeddingTable, ks: Sequence[int]) -> DirectionResult:
    """R@k and chance of one direction from the embeddings."""
    if s.reason is not None:
        return DirectionResult(s.name, 0, len(s.gallery), absent=s.reason)
    similarity = table.get(s.query_modality, s.queries) @ table.get(s.gallery_modality, s.gallery).T
    recall = metrics.recall_at_k(similarity, s.correct, ks)
    chance = metrics.chance_recall_at_k(s.correct, ks)
    return DirectionResult(s.name, len(s.queries), len(s.gallery), recall, chance)


def score_zero_shot(z: ZeroShotSet, table: EmbeddingTable) -> ZeroShotResult:
    """Top-1 accuracy of one zero-shot task from the embeddings."""
    task = z.task
    if z.reason is not None:
        return ZeroShotResult(task.name, task.modality, 0, len(task.labels), absent=z.reason)
    scores = table.get(task.modality, z.queries) @ table.get("text", z.prompts).T
    accuracy = metrics.top1_accuracy(scores, z.targets)
    return ZeroShotResult(task.name, task.modality, len(z.queries), len(task.labels), accuracy, 1 / len(task.labels))


def evaluate_retrieval(
    model: Any,
    data: str | Path | HeldoutCorpus,
    *,
    model_name: str | None = None,
    batch_size: int = 16,
    ks: Sequence[int] = metrics.DEFAULT_KS,
    progress: bool = True,
    embed: Callable[[Any, Protocol, int, bool], EmbeddingTable] | None = None,
) -> RetrievalReport:
    """Run the held-out protocol on ``data`` (a corpus folder, or one already loaded) with ``model``.

    ``model`` is an :class:`onepeace.OnePeace` (anything with its ``embed``).
    ``embed`` replaces :func:`embed_protocol` (same arguments), e.g. to score precomputed embeddings.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    ks = tuple(sorted(set(ks)))
    corpus = data if isinstance(data, HeldoutCorpus) else load_corpus(data)
    protocol = build_protocol(corpus)
    if hasattr(model, "modalities"):
        protocol = restrict_protocol(protocol, [str(getattr(m, "value", m)) for m in model.modalities])
    table = (embed or embed_protocol)(model, protocol, batch_size, progress)
    return RetrievalReport(
        data_dir=str(corpus.root),
        model=model_name if model_name is not None else type(model).__name__,
        ks=ks,
        directions=tuple(score_direction(s, table, ks) for s in protocol.retrieval),
        zero_shot=tuple(score_zero_shot(z, table) for z in protocol.zero_shot),
        notes=protocol.notes,
    )
