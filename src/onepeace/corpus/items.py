"""What a corpus source yields, and the split rule.

A :class:`SourceItem` is one thing of the world (a stamp, an emoji, one recording) with its caption and the raw
media it has; the builder converts the media and writes the item to the train or held-out split decided by
:func:`is_heldout`, which depends on nothing but the item key.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

AudioRender = Callable[[], tuple[np.ndarray, float]]
"""Produces a clip on demand: (samples ``[N]`` or ``[N, C]`` float32, sample rate)."""


@dataclass(frozen=True)
class SourceItem:
    """One item as a source describes it, before conversion."""

    key: str
    """Stable unique key ``source/name``; decides the split."""
    caption: str
    """The item's text (the image caption; also the clip's text unless ``audio_text`` is given)."""
    images: tuple[Path, ...] = ()
    """Image files (any format PIL reads); the first is the item's gallery image."""
    audio: Path | AudioRender | None = None
    """A sound file, or a function that renders the clip."""
    audio_text: str | None = None
    """Text paired with the clip, when it differs from ``caption``."""
    concept: str | None = None
    """A concept shared across items and modalities (e.g. ``"seven"``)."""
    labels: Mapping[str, str] = field(default_factory=dict)
    """Zero-shot task name -> label."""


@dataclass(frozen=True)
class ZeroShotTask:
    """A zero-shot classification task over the items that carry its label."""

    name: str
    modality: str
    prompt: str
    """Prompt template with one ``{}`` for the label."""
    labels: tuple[str, ...]


class Source(Protocol):
    """A corpus source: metadata, an availability check and its items."""

    name: str
    licence: str
    origin: str
    description: str

    def prepare(self) -> str | None:
        """Make the source ready to read (may install it from a package registry); ``None`` when it is ready,
        else the reason it is not and how to install it."""

    def items(self) -> Iterator[SourceItem]:
        """All items, in a stable order."""

    def tasks(self) -> list[ZeroShotTask]:
        """Zero-shot tasks this source's labels belong to."""


def is_heldout(key: str, fraction: float) -> bool:
    """True when ``key`` belongs to the held-out split: the first 8 hex digits of SHA-1(key) < fraction * 2**32."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {fraction}")
    digest = hashlib.sha1(key.encode("utf-8")).hexdigest()
    return int(digest[:8], 16) < fraction * 2**32


def cache_dir() -> Path:
    """Where installed or unpacked source data is kept: ``$ONEPEACE_CACHE`` or ``~/.cache/onepeace``."""
    return Path(os.environ.get("ONEPEACE_CACHE") or Path.home() / ".cache" / "onepeace")


_ARTICLE = re.compile(r"^(a pair of|an|a|the|some)\s+")


def concept_of(text: str) -> str:
    """A normalised concept name: lowercase, no punctuation at the ends, no leading article ("A frog." -> "frog")."""
    words = " ".join(re.sub(r"[^\w\s'-]", " ", text.lower()).split())
    return _ARTICLE.sub("", words)
