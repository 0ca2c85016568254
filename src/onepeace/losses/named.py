"""Named losses: the value a training objective returns (a weighted total plus its terms and logging metrics)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class NamedLosses:
    """A scalar objective and what it is made of.

    Attributes:
        total: scalar tensor to call ``backward`` on (the weighted sum of ``terms``).
        terms: unweighted scalar loss terms by name, e.g. ``{"itc": ..., "dcl_text": ...}`` (may carry the graph).
        weights: weight of each term in ``total`` (same keys as ``terms``).
        metrics: scalar tensors for logging only, e.g. top-1 hit counts or ``logit_scale_exp`` (no graph).

    The mappings are read-only views.
    """

    total: Tensor
    terms: Mapping[str, Tensor] = field(default_factory=dict)
    weights: Mapping[str, float] = field(default_factory=dict)
    metrics: Mapping[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.total.numel() != 1:
            raise ValueError(f"total must be a scalar, got shape {tuple(self.total.shape)}")
        if set(self.weights) - set(self.terms):
            raise ValueError(f"weights given for unknown terms: {sorted(set(self.weights) - set(self.terms))}")
        for name in ("terms", "weights", "metrics"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

    @classmethod
    def weighted(
        cls,
        terms: Mapping[str, Tensor],
        weights: Mapping[str, float] | None = None,
        metrics: Mapping[str, Tensor] | None = None,
    ) -> NamedLosses:
        """Build from terms: ``total = sum(weights.get(name, 1.0) * term)``.

        Args:
            terms: non-empty mapping of scalar tensors.
            weights: optional weight per term (missing names weigh 1.0).
            metrics: optional scalar tensors for logging; they are detached.
        """
        if not terms:
            raise ValueError("terms must not be empty")
        unknown = set(weights or {}) - set(terms)
        if unknown:
            raise ValueError(f"weights given for unknown terms: {sorted(unknown)}")
        w = {name: float((weights or {}).get(name, 1.0)) for name in terms}
        total = torch.stack([w[name] * term.float().reshape(()) for name, term in terms.items()]).sum()
        detached = {name: value.detach() for name, value in (metrics or {}).items()}
        return cls(total=total, terms=terms, weights=w, metrics=detached)

    def scalars(self) -> dict[str, float]:
        """Plain floats for logging: ``total``, every term and every metric (metric names must not clash)."""
        out = {"total": float(self.total.detach())}
        out.update({name: float(value.detach()) for name, value in self.terms.items()})
        for name, value in self.metrics.items():
            if name in out:
                raise ValueError(f"metric name {name!r} clashes with a loss term")
            out[name] = float(torch.as_tensor(value).detach())
        return out
