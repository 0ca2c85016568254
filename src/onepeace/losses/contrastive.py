"""Cross-modal contrastive loss (ITC / ATC, spec §5.2) with an optional cross-rank gather of the keys.

Glossary: B local batch, W world size, D embedding width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

Gather = Callable[[Tensor], Tensor]
"""Maps a local ``[B, D]`` tensor to the ``[B * W, D]`` concatenation over ranks, rank order."""


@dataclass(frozen=True, eq=False)
class ContrastiveLoss:
    """Result of :func:`contrastive_loss`.

    Attributes:
        loss: scalar float32, mean of the a->b and b->a mean cross-entropies (carries the graph).
        a2b_correct: scalar float32, number of local ``a`` rows whose best-scoring key in ``b`` is their pair
            (no graph).
        b2a_correct: scalar float32, the same count for the ``b -> a`` direction (no graph).
    """

    loss: Tensor
    a2b_correct: Tensor
    b2a_correct: Tensor


def contrastive_loss(
    a: Tensor,
    b: Tensor,
    scale: Tensor,
    gather: Gather | None = None,
    rank: int = 0,
) -> ContrastiveLoss:
    """Symmetric InfoNCE between paired, L2-normalised embeddings, as the official pretraining criteria compute it.

    Each local row of ``a`` is scored against every row of ``b`` gathered from all ranks (and vice versa); the positive
    of local row ``i`` is global row ``rank * B + i``. There is no label smoothing. Everything is computed in float32
    whatever the input dtype.

    Args:
        a: ``[B, D]`` L2-normalised embeddings of one modality (e.g. image or audio), local rows.
        b: ``[B, D]`` L2-normalised embeddings of the paired modality (text), local rows.
        scale: scalar tensor, the inverse temperature already exponentiated (``exp(clamped logit_scale)``).
        gather: maps ``[B, D]`` to the ``[B * W, D]`` concatenation over ranks. The official criterion gathers
            without gradient (:func:`onepeace.train.distributed.all_gather_no_grad`), so gradients reach only the
            local query side of each direction. ``None`` means keys are the local tensors themselves (one device;
            gradients then flow through both sides). Pass ``torch.Tensor.detach`` to get the official single-rank
            behaviour of keys without gradient.
        rank: position of this rank in the gather (0 .. W - 1); selects the positive column block. Every rank
            needs the same ``B``.

    Returns:
        ContrastiveLoss with the scalar loss and the two top-1 hit counts for the local rows.
    """
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"a and b must both be [B, D] with equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    if scale.numel() != 1:
        raise ValueError(f"scale must be a single value, got shape {tuple(scale.shape)}")
    a32, b32 = a.float(), b.float()
    a_keys = a32 if gather is None else gather(a32).float()  # [B * W, D]
    b_keys = b32 if gather is None else gather(b32).float()  # [B * W, D]
    batch = a.shape[0]
    for name, keys in (("a", a_keys), ("b", b_keys)):
        if keys.ndim != 2 or keys.shape[1] != a.shape[1] or keys.shape[0] < (rank + 1) * batch:
            raise ValueError(
                f"gathered {name} has shape {tuple(keys.shape)}; rank {rank} with local batch {batch} needs "
                f"at least {(rank + 1) * batch} rows of width {a.shape[1]}"
            )
    s = scale.float().reshape(())
    logits_a2b = s * a32 @ b_keys.t()  # [B, B * W]
    logits_b2a = s * b32 @ a_keys.t()  # [B, B * W]
    targets = torch.arange(batch, device=a.device) + rank * batch  # [B]
    loss = 0.5 * (F.cross_entropy(logits_a2b, targets) + F.cross_entropy(logits_b2a, targets))
    with torch.no_grad():
        a2b_correct = (logits_a2b.argmax(dim=-1) == targets).sum().float()
        b2a_correct = (logits_b2a.argmax(dim=-1) == targets).sum().float()
    return ContrastiveLoss(loss=loss, a2b_correct=a2b_correct, b2a_correct=b2a_correct)
