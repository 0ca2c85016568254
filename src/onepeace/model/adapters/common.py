"""Helpers shared by the adapters: kept-position gathering (spec §2.5)."""

from __future__ import annotations

import torch


def gather_kept(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` at kept positions.

    Args:
        x: ``[B, S, D]`` (or ``[1, S, D]``, broadcast over the batch).
        keep: ``[B, S_keep]`` indices into ``0..S-1``; entries of -1 are padding (see :func:`fill_padding`).

    Returns:
        ``[B, S_keep, D]``.
    """
    index = fill_padding(keep)
    x = x.expand(keep.shape[0], -1, -1)
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def fill_padding(keep: torch.Tensor) -> torch.Tensor:
    """Replace the -1 padding of kept-position indices by ``S_keep - 1``, the stand-in index the official code
    gathers there. Padded rows are masked as keys, but they still pass through the audio positional convolution,
    so the choice changes real outputs of the masked audio pass."""
    return keep.masked_fill(keep < 0, keep.shape[1] - 1)


def kept_padding_mask(keep: torch.Tensor) -> torch.Tensor:
    """``[B, S_keep]`` bool padding mask of kept-position indices (True where the index is -1)."""
    return keep < 0


def check_keep(keep: torch.Tensor, length: int, name: str) -> None:
    """Check that ``keep`` is ``[B, S_keep]`` int indices in ``-1..length-1`` with cls (0) first.

    A wrong dtype or shape raises ``ValueError``. The values are checked by device-side asserts, which read nothing
    back to the host (on CPU they raise ``RuntimeError`` at once; on CUDA the failure surfaces at the next sync).
    The pretraining loader builds ``keep`` from the masks (:func:`onepeace.data.masking.collate_view`), so its
    values are right by construction.
    """
    if keep.dtype not in (torch.int32, torch.int64) or keep.ndim != 2:
        raise ValueError(f"{name}: kept positions must be an integer [B, S_keep] tensor, got {tuple(keep.shape)}")
    if keep.numel():
        torch._assert_async(
            ((keep >= -1) & (keep < length)).all(), f"{name}: kept positions must lie in -1..{length - 1}"
        )
        torch._assert_async((keep[:, 0] == 0).all(), f"{name}: the cls position 0 must be kept first in every row")
