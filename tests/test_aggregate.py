"""Robust aggregation rules: exact values on small cases, and the bounds each rule promises (hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip.aggregate import (
    adaptive_clip_radius,
    clip_scales,
    clipped_gossip,
    row_norms,
    trimmed_mean,
    weighted_mean,
)
from swarmgrad.core.errors import LocalProtocolError


def test_weighted_mean_ignores_absent_entries() -> None:
    diffs = np.array([[1.0, 100.0], [3.0, 5.0]], dtype=np.float32)
    mask = np.array([[True, False], [True, True]])
    out = weighted_mean(diffs, mask, np.array([0.25, 0.5], dtype=np.float32))
    assert out.dtype == np.float32 and np.allclose(out, [0.25 + 1.5, 2.5])


def test_trimmed_mean_drops_extremes_per_column_and_skips_thin_columns() -> None:
    diffs = np.array([[0.0, 0.0, 0.0], [1.0, 7.0, 9.0], [2.0, -50.0, 0.0], [1000.0, 3.0, 0.0]], dtype=np.float32)
    mask = np.array([[True, True, True], [True, True, True], [True, True, False], [True, True, False]])
    out = trimmed_mean(diffs, mask, trim=1)
    # column 0: {0, 1, 2, 1000} -> {1, 2}; column 1: {0, 7, -50, 3} -> {0, 3}; column 2: two entries -> 0
    assert out.dtype == np.float32 and np.allclose(out, [1.5, 1.5, 0.0])


def test_trimmed_mean_without_trim_is_the_plain_column_mean() -> None:
    diffs = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    mask = np.array([[True, True], [True, False]])
    assert np.allclose(trimmed_mean(diffs, mask, trim=0), [2.0, 2.0])


def test_clipping_scales_only_rows_beyond_the_radius() -> None:
    diffs = np.array([[3.0, 4.0], [0.3, 0.4]], dtype=np.float32)
    mask = np.ones((2, 2), dtype=bool)
    assert np.allclose(row_norms(diffs, mask), [5.0, 0.5])
    assert np.allclose(clip_scales(np.array([5.0, 0.5, 0.0], dtype=np.float32), 1.0), [0.2, 1.0, 1.0])
    out = clipped_gossip(diffs, mask, np.array([0.5, 0.5], dtype=np.float32), radius=1.0)
    assert out.dtype == np.float32 and np.allclose(out, [0.5 * 0.6 + 0.15, 0.5 * 0.8 + 0.2])


def test_adaptive_radius_is_a_multiple_of_the_lower_median() -> None:
    assert adaptive_clip_radius([5.0, 1.0, 3.0], 2.0) == 6.0
    assert adaptive_clip_radius([4.0, 1.0, 3.0, 1e9], 1.0) == 3.0
    with pytest.raises(LocalProtocolError):
        adaptive_clip_radius([], 1.0)


def test_malformed_views_are_local_errors() -> None:
    with pytest.raises(LocalProtocolError):
        weighted_mean(np.zeros((2, 3)), np.ones((2, 2), dtype=bool), np.zeros(2))
    with pytest.raises(LocalProtocolError):
        weighted_mean(np.zeros((2, 3)), np.ones((2, 3), dtype=bool), np.zeros(3))
    with pytest.raises(LocalProtocolError):
        weighted_mean(np.zeros((2, 3)), np.ones((2, 3)), np.zeros(2))  # a mask that is not bool
    with pytest.raises(LocalProtocolError):
        trimmed_mean(np.zeros((2, 3)), np.ones((2, 3), dtype=bool), trim=-1)


views = st.integers(min_value=1, max_value=6).flatmap(
    lambda rows: st.integers(min_value=1, max_value=8).flatmap(
        lambda cols: st.tuples(
            st.lists(
                st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, width=32),
                min_size=rows * cols,
                max_size=rows * cols,
            ),
            st.lists(st.booleans(), min_size=rows * cols, max_size=rows * cols),
            st.just((rows, cols)),
        )
    )
)


@settings(max_examples=200, deadline=None)
@given(views, st.floats(min_value=0.0, max_value=10.0))
def test_clipped_gossip_moves_at_most_the_weighted_radius(view: tuple, radius: float) -> None:
    values, present, shape = view
    diffs = np.array(values, dtype=np.float64).reshape(shape)
    mask = np.array(present).reshape(shape)
    weights = np.full(shape[0], 1.0 / (shape[0] + 1))
    out = clipped_gossip(diffs, mask, weights, radius)
    assert float(np.linalg.norm(out)) <= float(weights.sum()) * radius * (1 + 1e-9) + 1e-12


@settings(max_examples=200, deadline=None)
@given(views, st.integers(min_value=0, max_value=2))
def test_trimmed_mean_stays_within_the_present_values(view: tuple, trim: int) -> None:
    values, present, shape = view
    diffs = np.array(values, dtype=np.float64).reshape(shape)
    mask = np.array(present).reshape(shape)
    out = trimmed_mean(diffs, mask, trim)
    for col in range(shape[1]):
        column = diffs[:, col][mask[:, col]]
        if column.size <= 2 * trim:
            assert out[col] == 0.0
        else:
            kept = np.sort(column)[trim : column.size - trim]
            assert kept.min() - 1e-9 <= out[col] <= kept.max() + 1e-9
