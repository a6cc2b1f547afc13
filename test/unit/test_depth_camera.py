"""RealSense-like depth sensor model: ranges, z^2 noise, holes, determinism (REP 118 NaN = invalid)."""

from __future__ import annotations

import numpy as np
import pytest

from forest_perception.frames import CameraIntrinsics
from forest_perception.sim.depth_camera import DepthCameraModel

INTR = CameraIntrinsics(320, 240)
CLEAN = DepthCameraModel(edge_jump_rel=1e9, dropout_fraction=0.0)  # noise and range limits only


def _plane(z: float) -> np.ndarray:
    return np.full((INTR.height, INTR.width), z, dtype=np.float32)


def test_output_is_float32_metres_with_nan_for_invalid():
    out = DepthCameraModel().apply(_plane(2.0), INTR, np.random.default_rng(0))
    assert out.dtype == np.float32 and out.shape == (INTR.height, INTR.width)
    valid = np.isfinite(out)
    assert valid.mean() > 0.9
    assert np.all(np.isnan(out[~valid]))  # invalid is NaN, never 0 or inf
    assert abs(float(np.nanmedian(out)) - 2.0) < 0.02


def test_nan_below_min_range_and_beyond_max_range():
    depth = _plane(3.0)
    depth[:, :50] = 0.2  # closer than 0.28 m
    depth[:, -50:] = 14.0  # farther than 10 m
    depth[:10] = np.inf  # sky
    depth[10:20, 100:110] = np.nan  # nothing rendered
    out = CLEAN.apply(depth, INTR, np.random.default_rng(0))
    assert np.all(np.isnan(out[:, :50]))
    assert np.all(np.isnan(out[:, -50:]))
    assert np.all(np.isnan(out[:10]))
    assert np.all(np.isnan(out[10:20, 100:110]))
    assert np.isfinite(out[20:, 60:-60]).mean() > 0.97
    near = DepthCameraModel(min_range_m=0.1, max_range_m=20.0, edge_jump_rel=1e9, dropout_fraction=0.0)
    assert np.isfinite(near.apply(depth, INTR, np.random.default_rng(0))[20:, :50]).all()


def test_noise_grows_as_z_squared_and_matches_the_disparity_model():
    model = CLEAN
    stds = {}
    for z in (1.0, 2.0, 5.0):
        out = model.apply(_plane(z), INTR, np.random.default_rng(1))
        err = out[np.isfinite(out)] - z
        assert abs(err.mean()) < 0.1 * model.depth_sigma(z, INTR) + 1e-4  # unbiased (to first order)
        stds[z] = err.std()
        assert stds[z] == pytest.approx(model.depth_sigma(z, INTR), rel=0.15)
    assert stds[5.0] / stds[1.0] == pytest.approx(25.0, rel=0.2)
    # 0.08 px at 640 px wide with a 5 cm baseline: about 1.4 cm at 2 m for this field of view
    assert model.depth_sigma(2.0, INTR) == pytest.approx(4 * 0.08 / (INTR.fx * 2 * 0.05), rel=1e-6)


def test_noise_does_not_depend_on_the_image_width():
    small = CameraIntrinsics(160, 120)
    assert CLEAN.depth_sigma(3.0, small) == pytest.approx(CLEAN.depth_sigma(3.0, INTR))


def test_holes_at_depth_discontinuities():
    depth = _plane(6.0)
    depth[:, 160:] = 1.5  # a trunk edge at column 160
    out = DepthCameraModel(dropout_fraction=0.0).apply(depth, INTR, np.random.default_rng(0))
    assert np.all(np.isnan(out[:, 158:162]))
    assert np.isfinite(out[:, :150]).mean() > 0.99
    assert np.isfinite(out[:, 170:]).mean() > 0.99


def test_dropout_blobs_cover_roughly_the_asked_fraction():
    model = DepthCameraModel(edge_jump_rel=1e9, dropout_fraction=0.05)
    out = model.apply(_plane(2.0), INTR, np.random.default_rng(2))
    holes = np.isnan(out).mean()
    assert 0.015 < holes < 0.12
    # blobs, not salt noise: most holes have a hole next to them
    h = np.isnan(out)
    neighbour = h[1:-1, 1:-1] & (h[:-2, 1:-1] | h[2:, 1:-1] | h[1:-1, :-2] | h[1:-1, 2:])
    assert neighbour.sum() > 0.8 * h[1:-1, 1:-1].sum()


def test_invalid_left_band_width_is_fx_baseline_over_z():
    model = DepthCameraModel(edge_jump_rel=1e9, dropout_fraction=0.0, invalid_left_band=True)
    out = model.apply(_plane(1.0), INTR, np.random.default_rng(0))
    band = INTR.fx * model.baseline_m / 1.0
    assert np.all(np.isnan(out[:, : int(band) - 1]))
    assert np.isfinite(out[:, int(band) + 2:]).all()
    assert np.isfinite(CLEAN.apply(_plane(1.0), INTR, np.random.default_rng(0))).all()


def test_same_seed_same_output_and_input_untouched():
    depth = _plane(3.0)
    depth[:, 100:] = 1.2
    before = depth.copy()
    model = DepthCameraModel(invalid_left_band=True)
    a = model.apply(depth, INTR, np.random.default_rng(7))
    b = model.apply(depth, INTR, np.random.default_rng(7))
    c = model.apply(depth, INTR, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)  # NaNs compare equal here
    assert not np.array_equal(a, c, equal_nan=True)
    np.testing.assert_array_equal(depth, before)  # ground truth stays noise-free


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"min_range_m": 12.0}, "min_range_m"), ({"baseline_m": 0.0}, "baseline_m"), ({"subpixel": -0.1}, "subpixel"),
     ({"dropout_fraction": 1.0}, "dropout_fraction"), ({"edge_hole_px": -1}, "edge_hole_px"),
     ({"max_range_m": float("inf")}, "max_range_m")],
)
def test_validate_names_the_bad_parameter(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DepthCameraModel(**kwargs).validate()


def test_apply_refuses_mismatched_intrinsics():
    with pytest.raises(ValueError, match="intrinsics"):
        DepthCameraModel().apply(_plane(2.0), CameraIntrinsics(160, 120), np.random.default_rng(0))
    with pytest.raises(ValueError, match="2-D"):
        DepthCameraModel().apply(np.zeros((4, 4, 3), np.float32), INTR, np.random.default_rng(0))
