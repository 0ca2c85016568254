"""Persistent similarity search over ONE-PEACE embeddings: ``onepeace index build`` / ``onepeace index search``.

An index is a folder holding the vectors (faiss, exact inner product) and their metadata (SQLite); see
:mod:`onepeace.search.index` for the layout and how writes stay consistent, and :mod:`onepeace.search.build` for
how folders and manifests are embedded, de-duplicated by content and resumed. Needs ``faiss`` (the ``search`` extra).
"""

from __future__ import annotations

from onepeace.search.build import BuildReport, build_index
from onepeace.search.collect import Skipped, collect_inputs
from onepeace.search.index import EmbeddingIndex, Hit, Repair
from onepeace.search.store import IndexDamagedError, ItemInfo, NewItem

__all__ = [
    "BuildReport",
    "EmbeddingIndex",
    "Hit",
    "IndexDamagedError",
    "ItemInfo",
    "NewItem",
    "Repair",
    "Skipped",
    "build_index",
    "collect_inputs",
]
