"""Per-example masks of the pretraining denoising views (spec §5.4) and their batch layout.

Every sampler works on one example, takes an explicit ``numpy.random.Generator`` (so a mask is a pure
function of the generator's seed) and returns a bool array, True = masked. Samplers return masks over
the units of one modality *without* the cls slot; :func:`with_cls` prefixes the never-masked cls
position, :func:`keep_indices` turns a cls-prefixed mask into the visible positions the adapters gather
(spec §2.5) and :func:`collate_view` pads a batch of them into a :class:`~onepeace.data.batch.MaskedView`
(masks padded with False, visible positions padded with -1).

Counts use ``floor`` / ``ceil`` of ``ratio * n`` computed on the value rounded to 9 decimals, so that
float noise (``0.55 * 20 = 11.000000000000002``) does not change a count by one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from onepeace.data.batch import MaskedView
from onepeace.errors import InputError

__all__ = [
    "collate_view",
    "complementary_patch_mask",
    "joint_text_mask",
    "keep_indices",
    "random_patch_mask",
    "span_mask",
    "whole_word_mask",
    "with_cls",
]


def _floor(x: float) -> int:
    return math.floor(round(x, 9))


def _ceil(x: float) -> int:
    return math.ceil(round(x, 9))


def _check_ratio(ratio: float, name: str = "ratio") -> float:
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {ratio}")
    return float(ratio)


def _bool_vector(x: Sequence[bool] | np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    arr = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=bool)
    if arr.ndim != 1:
        raise InputError(f"{name} must be one-dimensional, got shape {tuple(arr.shape)}")
    return arr


def whole_word_mask(word_starts: Sequence[bool] | np.ndarray, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Whole-word masking of one token sequence (text views, spec §5.4).

    Args:
        word_starts: ``[n]`` bool per token position, True where a token begins a word; the last position is
            the eos, which is never masked and is not counted as a word.
        ratio: fraction of words to mask; ``ceil(W * ratio)`` of the ``W`` word starts before the eos are
            chosen uniformly without replacement.
        rng: source of randomness.

    Returns:
        ``[n]`` bool, True = masked: each chosen start plus the following non-start tokens of its word (a word
        ends at the next word start or at the eos).

    Raises:
        InputError: when no position before the eos starts a word.
    """
    ratio = _check_ratio(ratio)
    starts = _bool_vector(word_starts, "word_starts")
    if starts.size == 0:
        raise InputError("whole-word masking needs at least the eos position, got an empty sequence")
    candidates = np.flatnonzero(starts[:-1])
    if candidates.size == 0:
        raise InputError("whole-word masking needs at least one word before the eos, found none")
    chosen = rng.choice(candidates, size=_ceil(candidates.size * ratio), replace=False)
    boundary = starts.copy()
    boundary[-1] = True  # the eos closes the last word
    word_index = np.cumsum(boundary) - 1  # -1 before the first word start: never masked
    chosen_mask = np.zeros(starts.size, dtype=bool)
    chosen_mask[chosen] = True
    chosen_words = word_index[chosen_mask]
    mask = np.isin(word_index, chosen_words) & (word_index >= 0)
    mask[-1] = False
    return mask


def joint_text_mask(
    n_tokens: int, ratio: float, avoid: Sequence[bool] | np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Token-level mask of the joint-view text (``vl_text``, spec §5.4).

    Args:
        n_tokens: token positions of the example including the final eos (``n``).
        ratio: ``floor(ratio * (n - 1))`` tokens are masked: the eos is neither a candidate nor counted.
        avoid: ``[n]`` bool, the text-only view's mask; tokens masked there are chosen only after every other
            candidate (random scores in [0, 1), +1 for avoided tokens, lowest scores win).
        rng: source of randomness.

    Returns:
        ``[n]`` bool, True = masked; the eos (last position) is never masked.
    """
    ratio = _check_ratio(ratio)
    avoid_arr = _bool_vector(avoid, "avoid")
    if n_tokens < 1 or avoid_arr.size != n_tokens:
        raise InputError(f"avoid must have n_tokens = {n_tokens} >= 1 entries, got {avoid_arr.size}")
    candidates = n_tokens - 1
    scores = rng.random(candidates) + avoid_arr[:candidates]
    chosen = np.argsort(scores, kind="stable")[: _floor(ratio * candidates)]
    mask = np.zeros(n_tokens, dtype=bool)
    mask[chosen] = True
    return mask


def random_patch_mask(num_patches: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Uniform random patch mask (image-only view): ``[N]`` bool with exactly ``floor(ratio * N)`` True."""
    ratio = _check_ratio(ratio)
    if num_patches < 1:
        raise InputError(f"num_patches must be positive, got {num_patches}")
    mask = np.zeros(num_patches, dtype=bool)
    mask[rng.permutation(num_patches)[: _floor(ratio * num_patches)]] = True
    return mask


def complementary_patch_mask(
    image_mask: Sequence[bool] | np.ndarray, ratio: float, rng: np.random.Generator
) -> np.ndarray:
    """Joint-view patch mask built against the image-only view (``vl_image``, spec §5.4).

    Args:
        image_mask: ``[N]`` bool, the image-only view's mask.
        ratio: the result masks ``floor(ratio * N)`` patches: every patch visible in ``image_mask`` plus the rest
            drawn uniformly among the patches ``image_mask`` masks, so the two views' visible sets are disjoint.
        rng: source of randomness.

    Returns:
        ``[N]`` bool, True = masked.

    Raises:
        InputError: when ``image_mask`` leaves more patches visible than ``floor(ratio * N)``.
    """
    ratio = _check_ratio(ratio)
    image = _bool_vector(image_mask, "image_mask")
    target = _floor(ratio * image.size)
    visible = ~image
    extra = target - int(visible.sum())
    if extra < 0:
        raise InputError(
            f"joint-view ratio {ratio} masks {target} of {image.size} patches, fewer than the "
            f"{int(visible.sum())} patches the image-only view leaves visible"
        )
    mask = visible.copy()
    mask[rng.choice(np.flatnonzero(image), size=extra, replace=False)] = True
    return mask


def span_mask(
    num_frames: int, ratio: float, rng: np.random.Generator, span: int = 5, prob_adjust: float = 0.1
) -> np.ndarray:
    """Span mask of one audio clip's frames (audio views, spec §5.4).

    ``floor(T * (ratio + prob_adjust) / span)`` centres are drawn uniformly with replacement; the ``span`` frames
    around each centre (offsets ``-(span // 2) .. span - 1 - span // 2``, i.e. -2..+2 for 5) are masked, clipped
    to ``[0, T - 1]``; then randomly chosen single frames are unmasked (or masked) until exactly
    ``floor(ratio * T)`` frames are masked.

    Returns:
        ``[T]`` bool, True = masked.
    """
    ratio = _check_ratio(ratio)
    if num_frames < 1:
        raise InputError(f"num_frames must be positive, got {num_frames}")
    if span < 1:
        raise ValueError(f"span must be positive, got {span}")
    target = _floor(ratio * num_frames)
    centres = rng.integers(0, num_frames, size=_floor(num_frames * (ratio + prob_adjust) / span))
    offsets = np.arange(span) - span // 2
    mask = np.zeros(num_frames, dtype=bool)
    mask[np.clip(centres[:, None] + offsets[None, :], 0, num_frames - 1).ravel()] = True
    count = int(mask.sum())
    if count > target:
        mask[rng.choice(np.flatnonzero(mask), size=count - target, replace=False)] = False
    elif count < target:
        mask[rng.choice(np.flatnonzero(~mask), size=target - count, replace=False)] = True
    return mask


def with_cls(mask: np.ndarray) -> np.ndarray:
    """``[S]`` unit mask -> ``[S + 1]`` mask over the cls-prefixed sequence (cls at 0, never masked)."""
    return np.concatenate([np.zeros(1, dtype=bool), _bool_vector(mask, "mask")])


def keep_indices(mask: np.ndarray) -> np.ndarray:
    """Visible positions of a cls-prefixed mask ``[S + 1]``: ``int64 [S_keep]``, ascending, cls (0) first."""
    arr = _bool_vector(mask, "mask")
    if arr.size == 0 or arr[0]:
        raise InputError("a cls-prefixed mask needs a visible cls at position 0")
    return np.flatnonzero(~arr).astype(np.int64)


def collate_view(masks: Sequence[np.ndarray], width: int | None = None) -> MaskedView:
    """Batch per-example cls-prefixed masks ``[S_i + 1]`` into a :class:`MaskedView`.

    Args:
        masks: one bool mask per example over its own (unpadded) cls-prefixed sequence.
        width: columns of the batch mask, i.e. the padded sequence length incl. cls (default: the longest mask).

    Returns:
        ``MaskedView(mask [B, width] bool padded with False, keep [B, K] int64 padded with -1)`` where ``K`` is
        the largest number of visible positions and row ``i`` of ``keep`` equals ``nonzero(~mask_i)``.
    """
    if not masks:
        raise InputError("no masks to collate: give at least one")
    rows = [_bool_vector(m, f"mask {i}") for i, m in enumerate(masks)]
    width = max(r.size for r in rows) if width is None else int(width)
    keeps = [keep_indices(r) for r in rows]
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    keep = torch.full((len(rows), max(k.size for k in keeps)), -1, dtype=torch.long)
    for i, (row, kept) in enumerate(zip(rows, keeps)):
        if row.size > width:
            raise InputError(f"mask {i} has {row.size} positions, more than the batch width {width}")
        mask[i, : row.size] = torch.from_numpy(row)
        keep[i, : kept.size] = torch.from_numpy(kept)
    return MaskedView(mask=mask, keep=keep)
