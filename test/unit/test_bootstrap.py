"""models.bootstrap: resampling groups and pooled-ratio quantiles shared by the gate and eval-styles."""

from __future__ import annotations

import numpy as np
import pytest

from forest_perception.models import bootstrap


def test_groups_are_segments_or_runs_of_one_segment():
    assert [g.tolist() for g in bootstrap.resampling_groups(None, 4)] == [[0, 1, 2, 3]]
    two = bootstrap.resampling_groups(np.array([5, 5, 2, 2, 2]), 5)
    assert [g.tolist() for g in two] == [[2, 3, 4], [0, 1]]
    runs = bootstrap.resampling_groups(np.zeros(20, dtype=int), 20)
    assert len(runs) == bootstrap.SINGLE_SEGMENT_BLOCKS
    assert np.array_equal(np.concatenate(runs), np.arange(20))  # consecutive, in order, every frame once
    assert len(bootstrap.resampling_groups(np.zeros(3, dtype=int), 3)) == 3  # fewer frames than runs
    with pytest.raises(ValueError, match="segment labels"):
        bootstrap.resampling_groups(np.zeros(3, dtype=int), 4)


def test_quantiles_bracket_the_pooled_ratio_replay_and_do_not_depend_on_chunks():
    rng = np.random.default_rng(3)
    pixels = rng.integers(500, 1000, 60).astype(float)
    errors = pixels * np.repeat([0.10, 0.12, 0.20], 20) * rng.uniform(0.9, 1.1, 60)  # three segments, one worse
    groups = bootstrap.resampling_groups(np.repeat([0, 1, 2], 20), 60)
    pooled = errors.sum() / pixels.sum()
    low, high = bootstrap.pooled_ratio_quantiles(errors, pixels, groups, [0.05, 0.95], draws=400)[0]
    assert low < pooled < high and high - low > 0.03  # segments differ by 0.1: a wide interval
    again = bootstrap.pooled_ratio_quantiles(errors, pixels, groups, [0.05, 0.95], draws=400, cells=70)
    np.testing.assert_allclose(again, [[low, high]], atol=1e-12)  # one draw at a time: the same answer
    as_frames = bootstrap.pooled_ratio_quantiles(errors, pixels, [np.arange(60)], [0.05, 0.95], draws=400)[0]
    assert as_frames[1] - as_frames[0] < 0.5 * (high - low)  # frames taken as independent: overconfident
    same = np.full(30, 0.15) * pixels[:30]
    flat = bootstrap.pooled_ratio_quantiles(same, pixels[:30], [np.arange(30)], [0.05, 0.95], draws=100)[0]
    np.testing.assert_allclose(flat, [0.15, 0.15])  # no spread, no interval
