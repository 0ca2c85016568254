"""Position-table resampling and index buffers against the official fixture and SciPy."""

from __future__ import annotations

import numpy as np
import official
import pytest
import torch
from scipy.interpolate import RectBivariateSpline

from onepeace.checkpoints.resample import (
    cubic_spline_matrix,
    geometric_offsets,
    resample_rel_pos_table_2d,
)
from onepeace.errors import CheckpointError
from onepeace.model.position import grid_rel_pos_index, resize_grid_pos_embed, sequence_rel_pos_index

IMAGE = "encoder_wrapper.image_adapter."


@pytest.fixture(scope="module")
def state_dict() -> dict[str, torch.Tensor]:
    return official.full_state_dict()


@pytest.fixture(scope="module")
def outputs() -> dict[str, torch.Tensor]:
    return official.outputs()


def test_rel_pos_table_matches_official_upgrade(state_dict, outputs):
    table = state_dict[IMAGE + "rel_pos_table_list.0.weight"]
    assert table.shape == (52, 4)
    resampled = resample_rel_pos_table_2d(table, 6)
    expected = outputs["res96.image_adapter.rel_pos_table"]
    assert resampled.shape == expected.shape == (124, 4)
    assert resampled.dtype == table.dtype
    torch.testing.assert_close(resampled, expected, atol=1e-6, rtol=0)
    assert torch.equal(resampled[-3:], table[-3:])


def test_abs_pos_resize_matches_official(state_dict, outputs):
    pos = state_dict[IMAGE + "pos_embed"]
    resized = resize_grid_pos_embed(pos, 6)
    expected = outputs["res96.image_adapter.abs_pos_embed"]
    assert resized.shape == expected.shape == (37, 64)
    torch.testing.assert_close(resized, expected, atol=1e-6, rtol=0)
    assert resize_grid_pos_embed(pos, 4) is pos


def test_index_buffers_match_official(state_dict, outputs):
    assert torch.equal(grid_rel_pos_index(4), state_dict[IMAGE + "rp_bucket"])
    assert torch.equal(grid_rel_pos_index(6), outputs["res96.image_adapter.rp_bucket"])
    text = sequence_rel_pos_index(256)
    audio = sequence_rel_pos_index(512)
    assert text.dtype == audio.dtype == torch.long
    assert torch.equal(text, state_dict["encoder_wrapper.text_adapter.rp_bucket"])
    assert torch.equal(audio, state_dict["encoder_wrapper.audio_adapter.rp_bucket"])


def test_index_ranges():
    idx = grid_rel_pos_index(16)
    assert idx.shape == (257, 257) and int(idx.min()) == 0 and int(idx.max()) == 31 * 31 + 2
    text = sequence_rel_pos_index(256, 300)
    assert text.shape == (300, 300) and int(text[1:, 1:].max()) <= 2 * 256 - 2 and int(text[1:, 1:].min()) >= 0


@pytest.mark.parametrize(("src", "dst"), [(7, 11), (31, 47), (31, 63), (5, 9), (9, 5), (31, 15)])
def test_spline_matches_scipy(src, dst):
    rng = np.random.default_rng(src * 100 + dst)
    x, e = geometric_offsets(src, dst)
    matrix = cubic_spline_matrix(x, e)
    for _ in range(3):
        z = rng.normal(size=(src, src))
        expected = RectBivariateSpline(x, x, z, kx=3, ky=3, s=0)(e, e)
        np.testing.assert_allclose(matrix @ z @ matrix.T, expected, atol=1e-10, rtol=0)


def test_spline_on_uniform_grid_and_small_inputs():
    rng = np.random.default_rng(0)
    x = np.sort(rng.uniform(-3, 3, size=12))
    e = np.linspace(-4, 4, 41)  # includes points outside the samples: clamped
    y = rng.normal(size=12)
    expected = RectBivariateSpline(x, x, np.outer(y, np.ones(12)), kx=3, ky=3, s=0)(e, [0.0])[:, 0]
    np.testing.assert_allclose(cubic_spline_matrix(x, e) @ y, expected, atol=1e-10, rtol=0)
    # a not-a-knot spline reproduces cubics; with <= 4 samples it is the interpolating polynomial
    for n in (1, 2, 3, 4, 5, 8):
        xs = np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(1)
        degree = min(n - 1, 3)
        poly = np.polynomial.Polynomial(rng.normal(size=degree + 1))
        pts = np.linspace(-1.0, 1.0, 9)
        np.testing.assert_allclose(
            cubic_spline_matrix(xs, pts) @ poly(xs), poly(np.clip(pts, xs[0], xs[-1])), atol=1e-12
        )


def test_geometric_offsets_follow_spec():
    x, e = geometric_offsets(7, 11)
    np.testing.assert_array_equal(e, np.arange(-5, 6))
    assert x.shape == (7,) and x[3] == 0.0 and x[4] == 1.0
    np.testing.assert_allclose(x, -x[::-1])
    assert abs((x[5] - x[4]) - 1.5) < 1e-5  # the tiny case saturates at q = 1.5
    x, _ = geometric_offsets(31, 47)
    q = x[17] - x[16]
    assert 1.01 < q < 1.5
    assert abs(sum(q**i for i in range(15)) - 23) < 1e-3


def test_same_grid_returns_input_and_dtype_kept(state_dict):
    table = state_dict[IMAGE + "rel_pos_table_list.0.weight"]
    assert resample_rel_pos_table_2d(table, 4) is table
    half = resample_rel_pos_table_2d(table.to(torch.bfloat16), 6)
    assert half.dtype == torch.bfloat16 and half.shape == (124, 4)


def test_shrinking_uses_same_interpolation_close_to_central_crop():
    side, heads = 31, 2
    r = torch.arange(side, dtype=torch.float64) - 15
    smooth = torch.sin(r[:, None] / 9.0) + torch.cos(r[None, :] / 7.0)
    table = torch.cat([smooth.reshape(-1, 1).repeat(1, heads), torch.full((3, heads), 7.0, dtype=torch.float64)])
    small = resample_rel_pos_table_2d(table, 8)  # 31 -> 15
    assert small.shape == (15 * 15 + 3, heads)
    assert torch.equal(small[-3:], table[-3:])
    crop = smooth[8:23, 8:23].reshape(-1)
    assert float((small[:-3, 0] - crop).abs().max()) < 0.1
    x, e = geometric_offsets(31, 15)
    expected = RectBivariateSpline(x, x, smooth.numpy(), kx=3, ky=3, s=0)(e, e).reshape(-1)
    np.testing.assert_allclose(small[:-3, 1].numpy(), expected, atol=1e-10, rtol=0)


def test_bad_table_shapes_raise():
    with pytest.raises(CheckpointError, match="50 rows"):
        resample_rel_pos_table_2d(torch.zeros(50, 4), 6)
    with pytest.raises(ValueError, match="new_grid"):
        resample_rel_pos_table_2d(torch.zeros(52, 4), 0)
    with pytest.raises(ValueError, match="rows"):
        resize_grid_pos_embed(torch.zeros(18, 8), 6)
