"""The demo's example queries of every kind, picked from the held-out items in a fixed way."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from onepeace.demo.gallery import Entry
from onepeace.modality import Modality


@dataclass(frozen=True)
class Query:
    """One example query: its inputs, the modality searched and what counts as a right answer."""

    kind: str
    """E.g. ``"text -> image"``."""
    target: Modality
    text: str | None = None
    image: Path | None = None
    audio: Path | None = None
    items: frozenset[str] = frozenset()
    """Keys of items whose media answer the query."""
    concept: str | None = None
    """Entries of this concept also answer it."""
    texts: frozenset[str] = field(default_factory=frozenset)
    """Texts that answer it (for a search over texts)."""

    def is_right(self, entry: Entry) -> bool:
        """Whether a hit answers the query."""
        if entry.modality is Modality.TEXT:
            return entry.text in self.texts
        return entry.item in self.items or (self.concept is not None and entry.concept == self.concept)

    def describe(self) -> str:
        parts = [f'"{self.text}"' if self.text else "", self.image.name if self.image else ""]
        parts.append(self.audio.name if self.audio else "")
        return " + ".join(p for p in parts if p)

    def embed(self, model: Any) -> torch.Tensor:
        """The normalised query vector ``[D]`` (the composed mean when several inputs are given)."""
        return model.compose(
            text=self.text, image=[self.image] if self.image else None, audio=[self.audio] if self.audio else None
        )


def _first(items: Sequence[dict[str, Any]], **want: Any) -> dict[str, Any] | None:
    for r in items:
        if all((r.get(k) if v is True else r.get(k) == v) for k, v in want.items()):
            return r
    return None


def _labelled(items: Sequence[dict[str, Any]], task: str) -> dict[str, Any] | None:
    return next((r for r in items if task in r.get("labels", {})), None)


def example_queries(corpus: Path, items: Sequence[dict[str, Any]]) -> list[Query]:
    """Up to two queries of each kind (text -> image, text -> audio, audio -> image, image + text -> audio)."""
    items = sorted(items, key=lambda r: r["item"])
    queries: list[Query] = []
    triple = _first(items, images=True, audio=True)
    pictures = [r for r in items if r["images"]]
    for r in ([triple] if triple else []) + [p for p in pictures if p is not triple][:1]:
        queries.append(Query("text -> image", Modality.IMAGE, text=r["caption"], items=frozenset({r["item"]})))
    for task in ("digits", "instruments"):
        r = _labelled(items, task)
        if r:
            same = frozenset(x["item"] for x in items if x.get("labels", {}).get(task) == r["labels"][task])
            queries.append(Query("text -> audio", Modality.AUDIO, text=r["audio_text"], items=same))
    if triple:
        clip = corpus / triple["audio"]
        queries.append(Query("audio -> image", Modality.IMAGE, audio=clip, items=frozenset({triple["item"]})))
    spoken = _labelled(items, "digits")
    if spoken and any(r["images"] and r.get("concept") == spoken["concept"] for r in items):
        queries.append(
            Query("audio -> image", Modality.IMAGE, audio=corpus / spoken["audio"], concept=spoken["concept"])
        )
    composed = _composed(corpus, items, triple)
    return queries + ([composed] if composed else [])


def _composed(corpus: Path, items: Sequence[dict[str, Any]], triple: dict[str, Any] | None) -> Query | None:
    """Image + text -> audio: a digit's picture with "a voice saying a number" should find clips of that digit;
    without one, a stamp's picture with "the sound of this" should find its own sound effect."""
    digits = {r["concept"] for r in items if "digits" in r.get("labels", {})}
    picture = next((r for r in items if r["images"] and r.get("concept") in digits), None)
    if picture:
        image = corpus / picture["images"][0]
        return Query("image + text -> audio", Modality.AUDIO, text="a voice saying a number", image=image,
                     concept=picture["concept"])  # fmt: skip
    if triple:
        image = corpus / triple["images"][0]
        return Query("image + text -> audio", Modality.AUDIO, text="the sound of this", image=image,
                     items=frozenset({triple["item"]}))  # fmt: skip
    return None
