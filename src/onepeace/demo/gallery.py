"""An in-memory search gallery over a corpus split: every image, clip and distinct text embedded once."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from onepeace.modality import Modality


@dataclass(frozen=True)
class Entry:
    """One searchable thing: an item's image, its clip, or a distinct text."""

    modality: Modality
    item: str | None
    """Key of the item the media belongs to (None for a text, which several items may share)."""
    text: str
    """The item's caption (image), its clip text (audio) or the text itself."""
    path: Path | None
    """Media file (None for texts)."""
    concept: str | None


@dataclass(frozen=True)
class Hit:
    entry: Entry
    score: float


def read_items(corpus: Path, split: str = "heldout") -> list[dict[str, Any]]:
    """The item records of a corpus split (``items_<split>.jsonl``)."""
    path = corpus / f"items_{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; build the corpus with: onepeace data build-demo {corpus}")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def gallery_entries(corpus: Path, items: Sequence[dict[str, Any]]) -> dict[Modality, list[Entry]]:
    """Entries per modality: each item's first image and its clip, and every distinct caption and clip text."""
    images, clips, texts = [], [], {}
    for r in items:
        concept = r.get("concept")
        if r["images"]:
            images.append(Entry(Modality.IMAGE, r["item"], r["caption"], corpus / r["images"][0], concept))
        if r.get("audio"):
            clips.append(Entry(Modality.AUDIO, r["item"], r["audio_text"], corpus / r["audio"], concept))
        for text in (r["caption"], r.get("audio_text")):
            if text and text not in texts:
                texts[text] = Entry(Modality.TEXT, None, text, None, concept)
    return {Modality.IMAGE: images, Modality.AUDIO: clips, Modality.TEXT: list(texts.values())}


class Gallery:
    """Normalised embeddings ``[N_m, D]`` of each modality's entries, searched by cosine similarity."""

    def __init__(self, entries: dict[Modality, list[Entry]], vectors: dict[Modality, torch.Tensor]) -> None:
        self.entries, self.vectors = entries, vectors

    @classmethod
    def build(cls, model: Any, corpus: Path, items: Sequence[dict[str, Any]], batch_size: int = 32) -> Gallery:
        """Embed the entries of ``items`` with ``model`` (an :class:`onepeace.OnePeace`), with a progress bar."""
        from tqdm.auto import tqdm

        entries = gallery_entries(corpus, items)
        vectors = {}
        for modality, group in entries.items():
            chunks = []
            for start in tqdm(
                range(0, len(group), batch_size), desc=f"embedding {modality.value}", unit="batch", file=sys.stderr
            ):
                batch = group[start : start + batch_size]
                inputs = [e.text if modality is Modality.TEXT else e.path for e in batch]
                chunks.append(getattr(model.embed(**{modality.value: inputs}, batch_size=batch_size), modality.value))
            vectors[modality] = torch.cat(chunks) if chunks else torch.empty(0, model.cfg.embed_dim)
        return cls(entries, vectors)

    def search(self, query: torch.Tensor, modality: Modality, k: int = 5) -> list[Hit]:
        """The ``k`` entries of ``modality`` most similar to the normalised ``query [D]``, best first."""
        vectors = self.vectors[modality]
        if len(vectors) == 0:
            return []
        scores = vectors.float() @ query.float()
        top = torch.topk(scores, min(k, len(vectors)))
        return [Hit(self.entries[modality][i], float(s)) for s, i in zip(top.values.tolist(), top.indices.tolist())]
