"""depth_pipeline: a model is tried on a reference frame before it goes live; health bands of the live depth."""

from __future__ import annotations

import numpy as np
import pytest

from forest_perception.depth_pipeline import (
    DepthSettings,
    DepthStats,
    check_candidate,
    depth_health,
    predict_depth,
    synthetic_forest_image,
)
from forest_perception.diagnostics import ERROR, OK, WARN

FRAME = synthetic_forest_image(120, 160, seed=2)


class Engine:
    """Depth from a function of the frame."""

    model_version, backend = "test", "test"

    def __init__(self, depth_of) -> None:
        self.depth_of = depth_of

    def predict(self, rgb: np.ndarray) -> np.ndarray:
        return self.depth_of(rgb)


def _like_a_depth_net(rgb: np.ndarray) -> np.ndarray:
    return (1.0 + rgb[..., 1].astype(np.float32) / 255.0 * 6.0).astype(np.float32)


@pytest.mark.parametrize(("depth_of", "words"), [
    (lambda rgb: np.full(rgb.shape[:2], np.nan, np.float32), "0 %"),
    (lambda rgb: rgb[..., 0].astype(np.float32) / 255.0 - 0.5, "0 %"),  # a conv's output: not metres
    (lambda rgb: np.full(rgb.shape[:2], 3.0, np.float32), "constant"),
    (lambda rgb: np.ones((10, 10), np.float32), "shape"),
    (lambda rgb: np.full(rgb.shape[:2], np.inf, np.float32), "inf"),
    (lambda rgb: 1 / 0, "ZeroDivisionError"),
])
def test_models_that_are_no_depth_network_are_refused_with_the_reason(depth_of, words):
    reason = check_candidate(Engine(depth_of), FRAME, DepthSettings())
    assert words in reason


def test_a_depth_network_passes_and_the_band_is_a_parameter():
    assert check_candidate(Engine(_like_a_depth_net), FRAME, DepthSettings()) == ""
    half_sky = lambda rgb: np.where(np.arange(rgb.shape[0])[:, None] < rgb.shape[0] // 2, np.nan,  # noqa: E731
                                    _like_a_depth_net(rgb))
    assert check_candidate(Engine(half_sky), FRAME, DepthSettings(min_valid_fraction=0.4)) == ""
    assert "50 %" in check_candidate(Engine(half_sky), FRAME, DepthSettings(min_valid_fraction=0.6))


def _values(valid: float, latency_ms: float = 20.0, frames: int = 10) -> dict:
    stats = DepthStats()
    for i in range(frames):
        stats.processed(5.0, latency_ms, latency_ms, float(i), valid)
    return stats.values(now=float(frames))


def test_health_leaves_ok_when_the_live_depth_or_latency_leaves_its_band():
    settings = DepthSettings(min_valid_fraction=0.2, max_latency_ms=100.0)
    assert depth_health(True, "", True, _values(0.8), settings) == (OK, "running")
    level, message = depth_health(True, "", True, _values(0.1), settings)
    assert level == WARN and "10 %" in message
    level, message = depth_health(True, "", True, _values(0.02), settings)
    assert level == ERROR and "2.0 %" in message
    level, message = depth_health(True, "", True, _values(0.8, latency_ms=180.0), settings)
    assert level == WARN and "max_latency_ms" in message
    assert depth_health(False, "no model loaded: x", True, _values(0.8), settings)[0] == ERROR
    assert depth_health(True, "", True, _values(0.8, frames=0), settings)[0] == OK


def test_predict_depth_masks_the_range_and_measures_the_network():
    depth, ms = predict_depth(Engine(_like_a_depth_net), FRAME, DepthSettings(min_depth_m=2.0, max_depth_m=5.0))
    inside = depth[np.isfinite(depth)]
    assert inside.min() >= 2.0 and inside.max() <= 5.0 and np.isnan(depth).any() and ms >= 0.0


def test_rectify_pitch_runs_the_network_on_a_level_view_and_turns_its_depth_back():
    import math

    from forest_perception import depth_geometry

    K = depth_geometry.camera_matrix_from_hfov(160, 120, 69.4)
    pitch = math.radians(10.0)

    def ground(p: float) -> np.ndarray:  # flat ground 0.2 m below a camera pitched p nose-down
        rows = (np.arange(120) - K[1, 2]) / K[1, 1]
        down = rows * math.cos(p) + math.sin(p)
        depth = np.where(down > 1e-3, 0.2 / np.maximum(down, 1e-3), np.nan)
        return np.repeat(np.where(depth < 9, depth, np.nan)[:, None], 160, axis=1).astype(np.float32)

    seen = []

    def level_ground(rgb: np.ndarray) -> np.ndarray:  # a network that knows only a level camera's ground
        seen.append(rgb)
        return ground(0.0)

    settings = DepthSettings(min_depth_m=0.1, max_depth_m=9.0, camera_pitch_rad=pitch)
    plain, _ = predict_depth(Engine(level_ground), FRAME, settings)
    assert seen[-1] is FRAME  # off by default: the frame as it came
    rectified, _ = predict_depth(Engine(level_ground), FRAME, DepthSettings(
        min_depth_m=0.1, max_depth_m=9.0, camera_pitch_rad=pitch, rectify_pitch=True), K)
    assert not np.array_equal(seen[-1], FRAME) and seen[-1].shape == FRAME.shape  # the network saw a turned view
    truth = ground(pitch)
    both = np.isfinite(rectified) & np.isfinite(truth)
    assert both.sum() > 0.6 * np.isfinite(truth).sum()
    assert np.median(np.abs(rectified[both] - truth[both]) / truth[both]) < 0.02  # the real camera's ground
    as_is = np.isfinite(plain) & np.isfinite(truth)
    assert np.median(np.abs(plain[as_is] - truth[as_is]) / truth[as_is]) > 0.2  # without it: the level ground
    no_k, _ = predict_depth(Engine(level_ground), FRAME, DepthSettings(
        min_depth_m=0.1, max_depth_m=9.0, camera_pitch_rad=pitch, rectify_pitch=True))
    np.testing.assert_allclose(no_k, rectified)  # K from fallback_hfov_deg (69.4) is the same camera here


def test_model_hfov_shows_a_narrower_camera_to_the_network_as_its_own_camera_would_see_it():
    """A network that reads distance from apparent size: a 2 m wide bar, depth = focal * 2 / its width in pixels."""
    from forest_perception import depth_geometry

    canonical = depth_geometry.camera_matrix_from_hfov(160, 120, 69.4)

    def size_reader(rgb: np.ndarray) -> np.ndarray:  # knows only the 69.4 deg camera's focal length
        width_px = max(int((rgb[60, :, 0] > 127).sum()), 1)
        return np.full(rgb.shape[:2], canonical[0, 0] * 2.0 / width_px, np.float32)

    narrow = depth_geometry.camera_matrix_from_hfov(160, 120, 50.0)
    frame = np.zeros((120, 160, 3), np.uint8)
    half = int(round(narrow[0, 0] * 2.0 / 5.0 / 2))  # the bar 5 m away, as the 50 deg camera images it
    frame[:, 80 - half:80 + half] = 255
    settings = dict(min_depth_m=0.1, max_depth_m=20.0)
    as_is, _ = predict_depth(Engine(size_reader), frame, DepthSettings(model_hfov_deg=0.0, **settings), narrow)
    seen, _ = predict_depth(Engine(size_reader), frame, DepthSettings(**settings), narrow)
    assert float(np.nanmedian(as_is)) < 0.8 * 5.0  # the longer lens makes the bar look near
    assert float(np.nanmedian(seen)) == pytest.approx(5.0, rel=0.06)
    same, _ = predict_depth(Engine(size_reader), frame, DepthSettings(**settings), canonical)
    np.testing.assert_array_equal(same, as_is)  # the network's own camera: the frame goes through untouched
    assert "model_hfov_deg" in DepthSettings(model_hfov_deg=5.0).problem()


def test_a_candidate_is_checked_on_its_own_output_whatever_the_camera_views():
    # a model for a 55 deg camera on a rover without camera_info (K from the 69.4 deg fallback): the check must
    # not lose the borders that the canonical view of model_hfov_deg would cut off
    settings = DepthSettings(min_valid_fraction=0.99, model_hfov_deg=55.0, rectify_pitch=True, camera_pitch_rad=0.2)
    assert check_candidate(Engine(lambda rgb: np.full(rgb.shape[:2], 3.0, np.float32) + rgb[..., 1] / 255.0),
                           FRAME, settings) == ""


def test_flip_average_takes_the_geometric_mean_with_the_mirrored_frame_and_both_passes_time():
    """A network with a left-right bias (depth grows to the right): averaging with the mirror cancels the bias."""
    from forest_perception.depth_pipeline import FlipAveragedEngine

    calls = []

    def biased(rgb: np.ndarray) -> np.ndarray:
        calls.append(rgb.copy())
        columns = np.arange(rgb.shape[1], dtype=np.float32) / (rgb.shape[1] - 1)
        return _like_a_depth_net(rgb) * (1.0 + 0.4 * columns)[None, :]

    engine = Engine(biased)
    engine.last_latency_ms = 3.0
    flipped = FlipAveragedEngine(engine)
    depth = flipped.predict(FRAME)
    direct, mirrored = biased(FRAME), biased(FRAME[:, ::-1])[:, ::-1]
    np.testing.assert_allclose(depth, np.sqrt(direct * mirrored), rtol=1e-6)
    np.testing.assert_array_equal(calls[1], FRAME[:, ::-1])  # the second pass saw the mirror image
    assert flipped.last_latency_ms == 6.0 and flipped.model_version == "test"
    symmetric = np.ascontiguousarray(np.concatenate([FRAME[:, :80], FRAME[:, :80][:, ::-1]], axis=1))
    out = flipped.predict(symmetric)
    np.testing.assert_allclose(out, out[:, ::-1], rtol=1e-6)  # the bias is gone: a mirrored scene, mirrored depth
    assert not np.allclose(biased(symmetric), biased(symmetric)[:, ::-1], rtol=1e-3)

    half = Engine(lambda rgb: np.where(np.arange(rgb.shape[1])[None, :] < 40, np.nan, _like_a_depth_net(rgb)))
    kept = FlipAveragedEngine(half).predict(FRAME)  # one pass invalid at a pixel: the other's depth is kept
    assert np.isfinite(kept).all()
    np.testing.assert_allclose(kept[:, :40], _like_a_depth_net(FRAME[:, ::-1])[:, ::-1][:, :40], rtol=1e-6)

    calls.clear()
    settings = DepthSettings(min_depth_m=0.1, max_depth_m=50.0)
    averaged, ms = predict_depth(engine, FRAME, DepthSettings(flip_average=True, min_depth_m=0.1, max_depth_m=50.0))
    assert len(calls) == 2 and ms == 6.0
    np.testing.assert_allclose(averaged, depth, rtol=1e-6)
    plain, _ = predict_depth(engine, FRAME, settings)
    np.testing.assert_allclose(plain, direct, rtol=1e-6)
