"""Intra-modal denoising contrastive loss (DCL, spec §5.3): masked student tokens against detached teacher tokens.

Glossary: B batch, S sequence length incl. cls, D feature width, Q masked (query) tokens, K keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def denoising_loss(
    student: Tensor,
    teacher: Tensor,
    mask: Tensor,
    padding_mask: Tensor | None = None,
    logit_scale: float = 2.5,
    label_smoothing: float = 0.1,
    num_queries: int | None = None,
    num_keys: int | None = None,
) -> Tensor:
    """Contrastive denoising loss of one modality segment, as the official ``compute_dcl_loss`` defines it.

    Steps: drop the cls column; flatten over the batch; drop padded positions; queries are the student rows at masked
    positions, keys are all remaining teacher rows of the local batch (visible and masked, every sample); both are
    L2-normalised in float32; ``logits = logit_scale * q @ k^T``; the positive of a query is the key at the same
    (sample, position). The loss is the mean over queries of the fairseq label-smoothed NLL with ``eps`` =
    ``label_smoothing``::

        (1 - eps - eps / (K - 1)) * nll + eps / (K - 1) * sum_k(-log p_k)

    i.e. the target gets weight ``1 - eps`` and every other key ``eps / (K - 1)``. This is *not* the
    ``label_smoothing`` of :func:`torch.nn.functional.cross_entropy` (which spreads ``eps / K`` over all keys).

    Args:
        student: ``[B, S, D]`` decoder predictions for the full sequence (cls first).
        teacher: ``[B, S, D]`` targets (cls first); detached here, so it never receives gradient.
        mask: ``[B, S]`` bool, True = masked position (a query). Column 0 (cls) is ignored.
        padding_mask: optional ``[B, S]`` bool, True = padding; padded positions are neither queries nor keys.
        logit_scale: inverse temperature (2.5 = 1 / 0.4 in pretraining).
        label_smoothing: ``eps`` above (0.1 in pretraining; 0 gives the plain cross-entropy).
        num_queries: ``Q``, the number of masked positions outside cls and padding, when the caller knows it
            (the data layer counts it on the host); with it, and with ``num_keys`` when ``padding_mask`` is given,
            the loss selects rows with fixed-size index lists and reads nothing back to the host. A wrong count
            fails a device-side assert.
        num_keys: ``K``, the number of positions outside cls and padding (needed with ``padding_mask``).

    Returns:
        Scalar float32 loss. With no masked token it is an exact zero that still depends on ``student`` (its
        gradient is zero), so ``backward`` and gradient-synchronising wrappers keep working.
    """
    _check(student, teacher, mask, padding_mask)
    width = student.shape[-1]
    queries = student[:, 1:].reshape(-1, width)  # [B * (S - 1), D]
    keys = teacher.detach()[:, 1:].reshape(-1, width)  # [B * (S - 1), D]
    is_query = mask[:, 1:].reshape(-1)  # [B * (S - 1)]
    if padding_mask is not None:
        real = ~padding_mask[:, 1:].reshape(-1)  # [B * (S - 1)]
        rows = _positions(real, num_keys, "num_keys")  # [K]
        queries, keys, is_query = queries[rows], keys[rows], is_query[rows]  # [K, D], [K, D], [K]
    targets = _positions(is_query, num_queries, "num_queries")  # [Q]: index of each query's own key
    if targets.numel() == 0:
        return queries.float()[:0].sum()  # zero with a graph to the student
    q = F.normalize(queries[targets].float(), dim=-1)  # [Q, D]
    k = F.normalize(keys.float(), dim=-1)  # [K, D]
    lprobs = F.log_softmax(logit_scale * q @ k.t(), dim=-1)  # [Q, K]
    nll = -lprobs.gather(1, targets.unsqueeze(1)).squeeze(1)  # [Q]
    smooth = -lprobs.sum(dim=-1)  # [Q]
    eps_other = label_smoothing / max(k.shape[0] - 1, 1)
    return ((1.0 - label_smoothing - eps_other) * nll + eps_other * smooth).mean()


def _positions(flags: Tensor, count: int | None, name: str) -> Tensor:
    """Indices of the True entries of a 1-D bool tensor; with ``count`` known, without a host sync."""
    if count is None:
        return flags.nonzero().squeeze(1)
    torch._assert_async(flags.sum() == count, f"{name} = {count} does not match the masks")
    return torch.nonzero_static(flags, size=count).squeeze(1)


def _check(student: Tensor, teacher: Tensor, mask: Tensor, padding_mask: Tensor | None) -> None:
    if student.ndim != 3 or student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher must both be [B, S, D] with equal shapes, got {tuple(student.shape)} and "
            f"{tuple(teacher.shape)}"
        )
    masks = {"mask": mask} if padding_mask is None else {"mask": mask, "padding_mask": padding_mask}
    for name, m in masks.items():
        if m.dtype != torch.bool or tuple(m.shape) != tuple(student.shape[:2]):
            raise ValueError(
                f"{name} must be a bool [B, S] = {tuple(student.shape[:2])} tensor, got {m.dtype} {tuple(m.shape)}"
            )
