"""Emergent cross-modal and composed-query retrieval with a fixed protocol (docs/finetune.md).

The official project shows these abilities only as pictures. Here a query is any non-empty combination of an
audio clip, a text and an image; its vector is the mean of the parts' L2-normalised unimodal embeddings,
L2-normalised again (:meth:`onepeace.OnePeace.compose`). The gallery is every distinct target image of the query
file; each query has exactly one correct image, its target, which must differ from its own query image. Results are
R@1/5/10 and the chance levels per query type (``audio->image``, ``audio+text->image``, ``audio+image->image``, ...).

Query file: a TSV with the header ``uniq_id, audio, text, image, target``; an empty cell means the part is absent;
media paths are relative to the file's directory.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from onepeace.evaluate.metrics import chance_recall_at_k, recall_at_k

COLUMNS = ("uniq_id", "audio", "text", "image", "target")
PARTS = ("audio", "text", "image")
KS = (1, 5, 10)


@dataclass(frozen=True)
class ComposedQuery:
    """One query: the parts given (None = absent; media as resolved paths) and the target image path."""

    uniq_id: str
    audio: str | None
    text: str | None
    image: str | None
    target: str

    @property
    def kind(self) -> str:
        """``"audio+text->image"`` style name of the query type."""
        return "+".join(p for p in PARTS if getattr(self, p) is not None) + "->image"


def read_queries(path: str | Path) -> list[ComposedQuery]:
    """Parse a query TSV; ``ValueError`` names the file and line of a bad row."""
    path = Path(path)
    root = path.parent
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows or tuple(c.strip() for c in rows[0]) != COLUMNS:
        raise ValueError(f"{path}: the header must be {', '.join(COLUMNS)} (tab-separated)")
    queries = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(COLUMNS):
            raise ValueError(f"{path}:{line}: expected {len(COLUMNS)} columns, got {len(row)}")
        uid, audio, text, image, target = (cell.strip() for cell in row)
        if not (audio or text or image):
            raise ValueError(f"{path}:{line}: a query needs at least one of audio, text or image")
        if not target:
            raise ValueError(f"{path}:{line}: the target image is empty")
        if image and image == target:
            raise ValueError(f"{path}:{line}: the query image is its own target")
        media = {name: str(root / value) if value else None for name, value in (("audio", audio), ("image", image))}
        queries.append(ComposedQuery(uid, media["audio"], text or None, media["image"], str(root / target)))
    if not queries:
        raise ValueError(f"{path}: no queries")
    return queries


def compose(parts: list[torch.Tensor]) -> torch.Tensor:
    """Query vectors ``[Q, D]`` from parts ``[Q, D]`` each: the mean of the L2-normalised parts, L2-normalised."""
    if not parts:
        raise ValueError("a query needs at least one part")
    return F.normalize(torch.stack([F.normalize(p.float(), dim=-1) for p in parts]).mean(0), dim=-1)


def _embed_distinct(model: Any, modality: str, values: list[str], batch_size: int) -> dict[str, torch.Tensor]:
    distinct = sorted(set(values))
    if not distinct:
        return {}
    emb = getattr(model.embed(**{modality: distinct}, batch_size=batch_size), modality).float().cpu()
    return dict(zip(distinct, emb))


def evaluate_composed(model: Any, queries: list[ComposedQuery], batch_size: int = 16) -> dict[str, dict[str, float]]:
    """R@k and chance per query type: ``{kind: {"queries": n, "r1": .., "chance_r1": .., ...}}``.

    ``model``: a :class:`onepeace.OnePeace` (anything with ``embed(text=, image=, audio=, batch_size=)``).
    """
    table = {
        part: _embed_distinct(model, part, [getattr(q, part) for q in queries if getattr(q, part)], batch_size)
        for part in PARTS
    }
    gallery_paths = sorted({q.target for q in queries})
    gallery = F.normalize(
        torch.stack(list(_embed_distinct(model, "image", gallery_paths, batch_size).values())), dim=-1
    )
    results: dict[str, dict[str, float]] = {}
    for kind in sorted({q.kind for q in queries}):
        group = [q for q in queries if q.kind == kind]
        present = [p for p in PARTS if getattr(group[0], p) is not None]
        vectors = compose([torch.stack([table[p][getattr(q, p)] for q in group]) for p in present])
        correct = torch.tensor([[path == q.target for path in gallery_paths] for q in group])
        recall, chance = recall_at_k(vectors @ gallery.t(), correct, KS), chance_recall_at_k(correct, KS)
        row: dict[str, float] = {"queries": float(len(group)), "gallery": float(len(gallery_paths))}
        row.update({f"r{k}": recall[k] for k in KS})
        row.update({f"chance_r{k}": chance[k] for k in KS})
        results[kind] = row
    return results


def format_composed(results: dict[str, dict[str, float]], model: str) -> str:
    """Markdown table of :func:`evaluate_composed` results."""
    lines = ["# composed-query retrieval", "", f"Model: `{model}`", ""]
    lines += [
        "| query | queries | gallery | R@1 (chance) | R@5 (chance) | R@10 (chance) |",
        "|---|---:|---:|---|---|---|",
    ]
    for kind, row in results.items():
        cells = [f"{100 * row[f'r{k}']:.1f}% ({100 * row[f'chance_r{k}']:.1f}%)" for k in KS]
        lines.append(f"| {kind} | {int(row['queries'])} | {int(row['gallery'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
