"""Position tables and index matrices of the modality adapters, and their resampling to a new image grid.

* :func:`resample_rel_pos_table_2d` reproduces the official load-time upgrade of an image relative-position
  table (BEiT-style geometric-sequence interpolation with a per-head bicubic interpolating spline).
* :func:`resize_abs_pos_2d` reproduces the on-the-fly bicubic resize of the absolute image position table.
* :func:`image_rel_pos_index` and :func:`text_audio_rel_pos_index` rebuild the ``rp_bucket`` index buffers.

Everything here is plain numpy / torch; the spline is computed in float64.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from onepeace.errors import CheckpointError

SPECIAL_ROWS = 3  # cls-as-query, cls-as-key, cls-to-cls rows at the end of a 2-D relative-position table
_Q_LOW, _Q_HIGH, _Q_TOL = 1.01, 1.5, 1e-6


def geometric_offsets(src_side: int, dst_side: int) -> tuple[np.ndarray, np.ndarray]:
    """Source and target coordinates of the geometric-sequence interpolation (one axis).

    ``src_side`` / ``dst_side`` are the side lengths of the offset grids (``2R - 1``). With
    ``n = src_side // 2`` and ``t = dst_side // 2``, the ratio ``q`` is bisected on [1.01, 1.5] so that
    ``1 + q + ... + q^(n-1)`` matches ``t``; the source samples sit at ``[-d_n .. -d_1, 0, d_1 .. d_n]``
    with ``d_1 = 1`` and ``d_{i+1} = d_i + q^i``.

    Returns ``(source, target)``: float64 arrays of shapes ``[2n + 1]`` (increasing) and ``[2t + 1]``
    (the integers ``-t .. t``).
    """
    if src_side < 1 or dst_side < 1:
        raise ValueError(f"grid sides must be positive, got {src_side} and {dst_side}")
    n, t = src_side // 2, dst_side // 2
    left, right = _Q_LOW, _Q_HIGH
    q = left
    while right - left >= _Q_TOL:
        q = (left + right) / 2.0
        if sum(q**i for i in range(n)) > t:
            right = q
        else:
            left = q
    offsets = np.empty(n, dtype=np.float64)
    cur = 1.0
    for i in range(n):
        offsets[i] = cur
        cur += q ** (i + 1)
    source = np.concatenate([-offsets[::-1], [0.0], offsets])
    target = np.arange(-t, t + 1, dtype=np.float64)
    return source, target


def _polynomial_matrix(x: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Lagrange basis [len(e), len(x)] of the polynomial of degree ``len(x) - 1`` interpolating at ``x``."""
    out = np.ones((e.size, x.size), dtype=np.float64)
    for k in range(x.size):
        for m in range(x.size):
            if m != k:
                out[:, k] *= (e - x[m]) / (x[k] - x[m])
    return out


def _not_a_knot_moments(x: np.ndarray) -> np.ndarray:
    """Matrix ``S`` [n, n] mapping sample values ``y`` to the spline's second derivatives at the knots."""
    n = x.size
    h = np.diff(x)
    lhs = np.zeros((n, n))
    rhs = np.zeros((n, n))
    # Third derivative continuous at x[1] and x[n-2] (not-a-knot end conditions).
    lhs[0, :3] = (h[1], -(h[0] + h[1]), h[0])
    lhs[n - 1, n - 3 :] = (h[n - 2], -(h[n - 3] + h[n - 2]), h[n - 3])
    for i in range(1, n - 1):
        lhs[i, i - 1 : i + 2] = (h[i - 1], 2.0 * (h[i - 1] + h[i]), h[i])
        rhs[i, i - 1 : i + 2] = (6.0 / h[i - 1], -6.0 / h[i - 1] - 6.0 / h[i], 6.0 / h[i])
    return np.linalg.solve(lhs, rhs)


def cubic_spline_matrix(x: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Interpolation matrix ``M`` [len(e), len(x)] of the not-a-knot cubic spline through samples at ``x``.

    ``M @ y`` evaluates at ``e`` the cubic spline interpolating ``(x, y)`` with not-a-knot end conditions,
    which is the function an interpolating (s = 0) cubic B-spline fit (FITPACK) builds. Points outside
    ``[x[0], x[-1]]`` are clamped to the boundary, as FITPACK evaluation does. ``x`` must be strictly
    increasing. With 4 samples or fewer the spline is the interpolating polynomial of degree ``len(x) - 1``
    (cubic, parabola, line, constant), as a not-a-knot spline is.
    """
    x = np.asarray(x, dtype=np.float64)
    e = np.clip(np.asarray(e, dtype=np.float64), x[0], x[-1])
    if x.ndim != 1 or x.size < 1 or np.any(np.diff(x) <= 0):
        raise ValueError("spline sample coordinates must be a non-empty, strictly increasing 1-D array")
    if x.size <= 4:
        return _polynomial_matrix(x, e)
    moments = _not_a_knot_moments(x)
    h = np.diff(x)
    j = np.clip(np.searchsorted(x, e, side="right") - 1, 0, x.size - 2)
    hj = h[j]
    a = x[j + 1] - e
    b = e - x[j]
    out = (a**3 / (6.0 * hj) - hj * a / 6.0)[:, None] * moments[j]
    out += (b**3 / (6.0 * hj) - hj * b / 6.0)[:, None] * moments[j + 1]
    rows = np.arange(e.size)
    out[rows, j] += a / hj
    out[rows, j + 1] += b / hj
    return out


def _table_side(rows: int, what: str) -> int:
    side = math.isqrt(max(rows - SPECIAL_ROWS, 0))
    if rows <= SPECIAL_ROWS or side * side != rows - SPECIAL_ROWS or side % 2 == 0:
        raise CheckpointError(f"{what} has {rows} rows; a 2-D relative-position table has (2R-1)^2 + 3 rows")
    return side


def resample_rel_pos_table_2d(table: torch.Tensor, new_grid: int) -> torch.Tensor:
    """Resample a 2-D image relative-position table to a new patch-grid side.

    ``table``: ``[(2R-1)^2 + 3, H]`` (core row ``(dh + R - 1) * (2R - 1) + (dw + R - 1)``, then the three
    special cls rows). Returns ``[(2R'-1)^2 + 3, H]`` with ``R' = new_grid``, same dtype and device. Each
    head's core is placed on the geometric source grid of :func:`geometric_offsets` and evaluated with the
    tensor-product not-a-knot cubic spline at the integer offsets ``-(R'-1) .. R'-1``; the special rows are
    appended unchanged. If ``new_grid`` equals ``R`` the input tensor itself is returned.

    Shrinking (``new_grid < R``, which the official code never does) uses the same procedure: the bisection
    then saturates at q = 1.01, so the source samples sit at nearly integer offsets and the result is close to
    the central ``(2R'-1)^2`` crop of the table, smoothly interpolated.
    """
    if table.ndim != 2:
        raise CheckpointError(f"relative-position table must be 2-D [rows, heads], got shape {tuple(table.shape)}")
    if not isinstance(new_grid, int) or new_grid < 1:
        raise ValueError(f"new_grid must be a positive int, got {new_grid!r}")
    src_side = _table_side(table.shape[0], "relative-position table")
    dst_side = 2 * new_grid - 1
    if dst_side == src_side:
        return table
    heads = table.shape[1]
    x, e = geometric_offsets(src_side, dst_side)
    m = cubic_spline_matrix(x, e)
    core = table[: src_side * src_side].detach().to("cpu", torch.float64).numpy().reshape(src_side, src_side, heads)
    resampled = np.einsum("ai,ijh,bj->abh", m, core, m).reshape(dst_side * dst_side, heads)
    new_core = torch.from_numpy(resampled).to(device=table.device, dtype=table.dtype)
    return torch.cat([new_core, table[-SPECIAL_ROWS:].detach()], dim=0)
