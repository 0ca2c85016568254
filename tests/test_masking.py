"""Masks of the pretraining denoising views: counts, constraints, reproducibility and the official batch layout."""

from __future__ import annotations

import math

import numpy as np
import official
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from onepeace.data.masking import (
    collate_view,
    complementary_patch_mask,
    joint_text_mask,
    keep_indices,
    random_patch_mask,
    span_mask,
    whole_word_mask,
    with_cls,
)
from onepeace.data.tokenizer import default_tokenizer
from onepeace.errors import InputError

RATIOS = st.one_of(st.sampled_from([0.0, 0.15, 0.4, 0.45, 0.55, 0.6875, 0.75, 1.0]), st.floats(0.0, 1.0))
SEEDS = st.integers(0, 2**32 - 1)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _floor(x: float) -> int:
    return math.floor(round(x, 9))


def _word_ids(starts: np.ndarray) -> np.ndarray:
    """Word index per position (-1 before the first start); the eos (last) is its own word."""
    boundary = starts.copy()
    boundary[-1] = True
    return np.cumsum(boundary) - 1


@st.composite
def word_starts(draw: st.DrawFn) -> np.ndarray:
    starts = draw(st.lists(st.booleans(), min_size=1, max_size=80))
    starts[draw(st.integers(0, len(starts) - 1))] = True
    return np.array(starts + [draw(st.booleans())], dtype=bool)  # the last position is the eos


# ---------------------------------------------------------------------------------------------------- text
@settings(max_examples=150, deadline=None)
@given(starts=word_starts(), ratio=RATIOS, seed=SEEDS)
def test_whole_word_mask_masks_whole_words_exact_count(starts: np.ndarray, ratio: float, seed: int) -> None:
    mask = whole_word_mask(starts, ratio, _rng(seed))
    ids = _word_ids(starts)
    words = set(ids[mask].tolist())
    assert mask.shape == starts.shape and mask.dtype == bool
    assert not mask[-1]  # eos
    assert len(words) == math.ceil(round(int(starts[:-1].sum()) * ratio, 9))
    assert -1 not in words
    for word in words:
        assert mask[ids == word].all()  # a word is masked as a whole
        assert starts[np.flatnonzero(ids == word)[0]]  # ... from its start


def test_whole_word_mask_needs_a_word() -> None:
    with pytest.raises(InputError, match="at least one word"):
        whole_word_mask(np.array([True]), 0.4, _rng(0))  # eos only
    with pytest.raises(InputError, match="at least one word"):
        whole_word_mask(np.array([False, False, True]), 0.4, _rng(0))
    with pytest.raises(InputError):
        whole_word_mask(np.zeros(0, dtype=bool), 0.4, _rng(0))


@settings(max_examples=150, deadline=None)
@given(data=st.data(), ratio=RATIOS, seed=SEEDS)
def test_joint_text_mask_count_and_preference(data: st.DataObject, ratio: float, seed: int) -> None:
    avoid = np.array(data.draw(st.lists(st.booleans(), min_size=1, max_size=80)), dtype=bool)
    avoid[-1] = False
    n = avoid.size
    mask = joint_text_mask(n, ratio, avoid, _rng(seed))
    count = _floor(ratio * (n - 1))  # eos neither a candidate nor counted
    assert mask.sum() == count and not mask[-1]
    free = ~avoid[:-1]
    if count <= free.sum():
        assert not (mask & avoid).any()  # only tokens visible in the text-only view are taken
    else:
        assert mask[:-1][free].all()


# ---------------------------------------------------------------------------------------------------- patches
@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 300), image_ratio=RATIOS, vl_ratio=RATIOS, seed=SEEDS)
def test_patch_masks_counts_and_complementarity(n: int, image_ratio: float, vl_ratio: float, seed: int) -> None:
    rng = _rng(seed)
    image = random_patch_mask(n, image_ratio, rng)
    assert image.shape == (n,) and image.sum() == _floor(image_ratio * n)
    if (~image).sum() > _floor(vl_ratio * n):
        with pytest.raises(InputError, match="leaves visible"):
            complementary_patch_mask(image, vl_ratio, rng)
        return
    vl = complementary_patch_mask(image, vl_ratio, rng)
    assert vl.sum() == _floor(vl_ratio * n)
    assert vl[~image].all()  # every patch visible in the image-only view is masked in the joint view
    assert not ((~image) & (~vl)).any()  # the visible sets are disjoint


def test_official_patch_counts() -> None:
    rng = _rng(0)
    image = random_patch_mask(256, 0.75, rng)
    vl = complementary_patch_mask(image, 0.6875, rng)
    assert (image.sum(), vl.sum(), (~vl).sum()) == (192, 176, 80)


# ---------------------------------------------------------------------------------------------------- audio
@settings(max_examples=150, deadline=None)
@given(frames=st.integers(1, 1200), ratio=RATIOS, seed=SEEDS)
def test_span_mask_exact_count(frames: int, ratio: float, seed: int) -> None:
    mask = span_mask(frames, ratio, _rng(seed))
    assert mask.shape == (frames,) and mask.sum() == _floor(ratio * frames)


def test_span_mask_masks_runs() -> None:
    mask = span_mask(749, 0.55, _rng(3))
    runs = np.diff(np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]]))))[::2]
    assert mask.sum() == 411 and runs.mean() > 3  # spans of 5, merged or trimmed by the count correction


# ---------------------------------------------------------------------------------------------------- seeds
def _all_masks(seed: int) -> list[np.ndarray]:
    rng = _rng(seed)
    starts = np.array([True, False] * 20 + [True])
    text = whole_word_mask(starts, 0.4, rng)
    image = random_patch_mask(256, 0.75, rng)
    return [
        text,
        joint_text_mask(41, 0.4, text, rng),
        image,
        complementary_patch_mask(image, 0.6875, rng),
        span_mask(749, 0.55, rng),
    ]


def test_same_seed_same_masks_other_seed_other_masks() -> None:
    first, again, other = _all_masks(11), _all_masks(11), _all_masks(12)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert all(not np.array_equal(a, b) for a, b in zip(first, other))


# ---------------------------------------------------------------------------------------------------- layout
@settings(max_examples=100, deadline=None)
@given(rows=st.lists(st.lists(st.booleans(), min_size=0, max_size=30), min_size=1, max_size=6), extra=st.integers(0, 3))
def test_collate_view_keep_matches_mask(rows: list[list[bool]], extra: int) -> None:
    masks = [with_cls(np.array(r, dtype=bool)) for r in rows]
    width = max(m.size for m in masks) + extra
    view = collate_view(masks, width)
    assert view.mask.dtype == torch.bool and view.keep.dtype == torch.int64
    assert view.mask.shape == (len(rows), width)
    assert view.keep.shape[1] == max(int((~m).sum()) for m in masks)
    for i, m in enumerate(masks):
        kept = np.flatnonzero(~m)
        assert kept[0] == 0  # cls first
        assert torch.equal(view.mask[i, : m.size], torch.from_numpy(m)) and not view.mask[i, m.size :].any()
        assert view.keep[i, : kept.size].tolist() == kept.tolist()
        assert (view.keep[i, kept.size :] == -1).all()


def test_keep_requires_visible_cls() -> None:
    with pytest.raises(InputError, match="cls"):
        keep_indices(np.array([True, False]))
    with pytest.raises(InputError, match="batch width"):
        collate_view([with_cls(np.zeros(5, dtype=bool))], width=3)


def _lengths(inputs: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """Real cls-prefixed lengths per row: text (tokens + cls), image (17), audio (cls + frames)."""
    text = ((inputs["text.tokens"] != 1).sum(1) + 1).tolist()
    audio = (~inputs["audio.padding_mask"]).sum(1).tolist()
    return {"text": text, "image": [17] * 3, "audio": audio}


FIXTURE_VIEWS = [
    ("mask_vl.text", "text"),
    ("mask_vl.vl_text", "text"),
    ("mask_vl.image", "image"),
    ("mask_vl.vl_image", "image"),
    ("mask_al.audio", "audio"),
    ("mask_al.al_text", "text"),
    ("mask_al.al_audio", "audio"),
]


@pytest.mark.parametrize("name,kind", FIXTURE_VIEWS)
def test_collate_reproduces_fixture_layout(name: str, kind: str) -> None:
    inputs = official.inputs()
    mask, keep = inputs[f"{name}_mask_indices"], inputs[f"{name}_preserve_ids"]
    rows = [mask[i, :n].numpy() for i, n in enumerate(_lengths(inputs)[kind])]
    assert not mask[:, 0].any()
    view = collate_view(rows, width=mask.shape[1])
    assert torch.equal(view.mask, mask) and torch.equal(view.keep, keep)


def test_fixture_counts_follow_the_spec_and_our_samplers() -> None:
    inputs = official.inputs()
    lengths = _lengths(inputs)
    rng = _rng(5)
    image, vl_image = inputs["mask_vl.image_mask_indices"][:, 1:], inputs["mask_vl.vl_image_mask_indices"][:, 1:]
    assert image.sum(1).tolist() == [12] * 3 and vl_image.sum(1).tolist() == [11] * 3
    assert vl_image[~image].all() and not ((~image) & (~vl_image)).any()
    assert random_patch_mask(16, 0.75, rng).sum() == 12
    for view, ratio in (("audio", 0.55), ("al_audio", 0.45)):
        counts = inputs[f"mask_al.{view}_mask_indices"].sum(1).tolist()
        frames = [n - 1 for n in lengths["audio"]]
        assert counts == [_floor(ratio * t) for t in frames]
        assert [span_mask(t, ratio, rng).sum() for t in frames] == counts


def test_fixture_text_masks_exclude_eos_from_counts() -> None:
    """Whole-word counts use the words before the eos; the joint count uses n - 1 tokens (eos excluded)."""
    inputs = official.inputs()
    tok = default_tokenizer()
    rng = _rng(7)
    for i, row in enumerate(inputs["text.tokens"]):
        ids = row[row != 1]
        starts = np.array(tok.is_word_start(ids), dtype=bool)
        word_ids, words = _word_ids(starts), int(starts[:-1].sum())
        for name, ratio in (("mask_vl.text", 0.15), ("mask_al.al_text", 0.4)):
            mask = inputs[f"{name}_mask_indices"][i, 1 : ids.numel() + 1].numpy()
            masked_words = set(word_ids[mask].tolist())
            assert not mask[-1] and all(mask[word_ids == w].all() for w in masked_words)
            assert len(masked_words) == math.ceil(words * ratio)
            assert len(set(word_ids[whole_word_mask(starts, ratio, rng)].tolist())) == len(masked_words)
        vl = inputs["mask_vl.vl_text_mask_indices"][i, 1 : ids.numel() + 1].numpy()
        text = inputs["mask_vl.text_mask_indices"][i, 1 : ids.numel() + 1].numpy()
        assert vl.sum() == _floor(0.4 * (ids.numel() - 1)) and not vl[-1] and not (vl & text).any()
        assert joint_text_mask(ids.numel(), 0.4, text, rng).sum() == vl.sum()
