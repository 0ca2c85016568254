"""Retrieval and classification metrics: pure functions of similarity scores and ground-truth matrices.

Shapes: Q queries, G gallery (candidate) items, C classes. Inputs may be torch tensors or numpy arrays.

Ties are resolved against the query: an incorrect candidate scoring exactly as high as the best correct one
ranks before it, so a model that gives every candidate the same score gets no credit.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import torch

DEFAULT_KS = (1, 5, 10)


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    """Distinct positive ints in increasing order; raises ``ValueError`` otherwise."""
    ks = tuple(ks)
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"every k must be a positive int, got {k!r}")
    if not ks:
        raise ValueError("give at least one k")
    return tuple(sorted(set(ks)))


def _as_correct(correct: Any) -> torch.Tensor:
    """``correct`` as a bool tensor ``[Q, G]``; every query must have at least one correct item."""
    correct = torch.as_tensor(correct)
    if correct.dtype != torch.bool:
        raise ValueError(f"correct must be a bool matrix [Q, G], got dtype {correct.dtype}")
    if correct.dim() != 2 or correct.shape[0] == 0 or correct.shape[1] == 0:
        raise ValueError(f"correct must be a non-empty matrix [Q, G], got shape {tuple(correct.shape)}")
    missing = (~correct.any(dim=1)).nonzero().flatten().tolist()
    if missing:
        shown = ", ".join(str(i) for i in missing[:10]) + (", ..." if len(missing) > 10 else "")
        raise ValueError(f"{len(missing)} queries have no correct gallery item (query rows {shown})")
    return correct


def first_correct_rank(similarity: Any, correct: Any) -> torch.Tensor:
    """0-based rank of each query's best-scoring correct item: ``LongTensor [Q]``.

    ``similarity``: ``[Q, G]`` scores (higher is more similar); ``correct``: bool ``[Q, G]``, at least one True
    per row. The rank counts the incorrect items scoring at least as high as the best correct one.
    """
    correct = _as_correct(correct)
    similarity = torch.as_tensor(similarity).detach().to("cpu", torch.float64)
    if similarity.shape != correct.shape:
        raise ValueError(f"similarity {tuple(similarity.shape)} and correct {tuple(correct.shape)} differ in shape")
    if torch.isnan(similarity).any():
        raise ValueError("similarity contains NaN")
    best = similarity.masked_fill(~correct, -math.inf).amax(dim=1, keepdim=True)
    return ((similarity >= best) & ~correct).sum(dim=1)


def recall_at_k(similarity: Any, correct: Any, ks: Iterable[int] = DEFAULT_KS) -> dict[int, float]:
    """R@k for each k: the fraction of queries with a correct item among their k most similar.

    ``similarity``: ``[Q, G]``; ``correct``: bool ``[Q, G]`` with at least one True per row (a query without a
    correct item raises ``ValueError``). Returns ``{k: R@k}`` with values in ``[0, 1]``.
    """
    ks = _check_ks(ks)
    ranks = first_correct_rank(similarity, correct)
    return {k: float((ranks < k).double().mean()) for k in ks}


def chance_recall_at_k(correct: Any, ks: Iterable[int] = DEFAULT_KS) -> dict[int, float]:
    """Expected R@k of a random ranking: per query with m correct among N, ``1 - C(N-m, k) / C(N, k)``, averaged.

    ``correct``: bool ``[Q, G]`` with at least one True per row. Exact integer binomials; k >= N gives 1.
    """
    ks = _check_ks(ks)
    correct = _as_correct(correct)
    n = correct.shape[1]
    counts = correct.sum(dim=1).tolist()
    out = {}
    for k in ks:
        if k >= n:
            out[k] = 1.0
            continue
        total = math.comb(n, k)
        out[k] = math.fsum(1.0 - math.comb(n - m, k) / total for m in counts) / len(counts)
    return out


def top1_accuracy(scores: Any, targets: Any) -> float:
    """Fraction of rows whose highest score is at the target class.

    ``scores``: ``[Q, C]``; ``targets``: integer ``[Q]`` class indices in ``[0, C)``. Ties go to the lowest index.
    """
    scores = torch.as_tensor(scores).detach().cpu()
    targets = torch.as_tensor(targets).detach().cpu()
    if scores.dim() != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"scores must be a non-empty matrix [Q, C], got shape {tuple(scores.shape)}")
    if targets.shape != (scores.shape[0],) or targets.is_floating_point() or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer class indices [{scores.shape[0]}], got {tuple(targets.shape)}")
    if int(targets.min()) < 0 or int(targets.max()) >= scores.shape[1]:
        raise ValueError(f"targets must lie in [0, {scores.shape[1]}), got {targets.tolist()}")
    return float((scores.argmax(dim=1) == targets).double().mean())


def same_label_matrix(query_labels: Sequence[Hashable], gallery_labels: Sequence[Hashable]) -> torch.Tensor:
    """Ground truth by equal labels: bool ``[Q, G]``, True where ``query_labels[q] == gallery_labels[g]``."""
    index: dict[Hashable, int] = {}
    q = torch.tensor([index.setdefault(label, len(index)) for label in query_labels], dtype=torch.long)
    g = torch.tensor([index.get(label, -1) for label in gallery_labels], dtype=torch.long)
    return q[:, None] == g[None, :]


def shared_tag_matrix(
    query_tags: Sequence[Iterable[Hashable]], gallery_tags: Sequence[Iterable[Hashable]]
) -> torch.Tensor:
    """Ground truth by shared tags: bool ``[Q, G]``, True where query q and gallery item g have a tag in common."""
    gallery_sets = [frozenset(tags) for tags in gallery_tags]
    rows = [[not tags.isdisjoint(g) for g in gallery_sets] for tags in map(frozenset, query_tags)]
    return torch.tensor(rows, dtype=torch.bool).reshape(len(rows), len(gallery_sets))
