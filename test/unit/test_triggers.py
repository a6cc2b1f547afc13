"""Stream triggers (forest_perception.triggers): which live frames are kept for training, and why."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from forest_perception.geo import enu_to_geodetic
from forest_perception.readings import GpsFix
from forest_perception.triggers import (
    FrameTrigger,
    TriggerConfig,
    TriggerFrame,
    depth_disagreement,
    depth_embedding,
    score_frame,
)

H, W = 120, 160
DATUM = (50.869, -1.604)


def scene(seed: int, noise_seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A forest-like view: a ground gradient, trunks of random colours at random places, fine texture; its depth."""
    rng = np.random.default_rng(seed)
    rgb = np.zeros((H, W, 3), np.float32)
    rgb[:] = rng.uniform(40, 200, 3)
    rows = np.linspace(0, 1, H)[:, None]
    rgb[H // 2:] = rgb[H // 2:] * 0.5 + rows[H // 2:, :, None] * rng.uniform(60, 160, 3)
    depth = np.where(rows > 0.5, 0.3 + 6.0 * (1.0 - rows) ** 2, 12.0).repeat(W, 1).astype(np.float32)
    for _ in range(rng.integers(3, 7)):
        x, w = int(rng.integers(0, W - 20)), int(rng.integers(6, 30))
        rgb[:, x:x + w] = rng.uniform(20, 230, 3)
        depth[:, x:x + w] = rng.uniform(1.0, 8.0)
    texture = np.random.default_rng(1000 + seed).normal(0, 18, (H, W, 1))
    rgb += texture
    if noise_seed is not None:  # the same view again: sensor noise only
        rgb += np.random.default_rng(noise_seed).normal(0, 2, (H, W, 1))
    return np.clip(rgb, 0, 255).astype(np.uint8), depth


def frame(seed: int, t: float, noise_seed: int | None = None, predicted_scale: float | None = 1.0,
          gps: GpsFix | None = None, blur: float = 0.0) -> TriggerFrame:
    rgb, depth = scene(seed, noise_seed)
    if blur:
        rgb = cv2.GaussianBlur(rgb, (0, 0), blur)
    predicted = None if predicted_scale is None else depth * np.float32(predicted_scale)
    return TriggerFrame(t, rgb, depth, predicted, gps)


def fix(north_m: float) -> GpsFix:
    lat, lon, _ = enu_to_geodetic(0.0, north_m, 0.0, DATUM[0], DATUM[1], 0.0)
    return GpsFix(lat, lon, 0.0, 0)


OPEN = {"max_keep_rate_hz": 0.0, "max_gap_s": 0.0, "spacing_m": 0.0}
"""Rate cap, minimum rate and GPS spacing off: only sharpness, novelty and disagreement decide."""


def test_distinct_sharp_views_are_kept_as_novel():
    trigger = FrameTrigger(TriggerConfig(**OPEN))
    decisions = [trigger.decide(frame(seed, 0.5 * seed)) for seed in range(8)]
    assert decisions[0].keep and decisions[0].reasons == ("first", "novel")
    assert all(d.keep and "novel" in d.reasons for d in decisions[1:]), [d.reasons for d in decisions]
    assert all(d.novelty >= 0.4 for d in decisions[1:])
    assert trigger.stats.kept == 8 and trigger.kept_embeddings == 8


def test_blurred_frames_are_skipped_whatever_else_fires():
    trigger = FrameTrigger(TriggerConfig(**OPEN))
    for seed in range(6):
        assert trigger.decide(frame(seed, seed)).keep
    # a new view (novel), badly disagreeing, but motion-blurred: not kept
    blurred = trigger.decide(frame(50, 7.0, predicted_scale=3.0, blur=3.0))
    assert not blurred.keep and blurred.reasons == ("blurry",)
    assert blurred.scores.laplacian < 0.35 * blurred.sharpness_median
    assert trigger.decide(frame(50, 8.0, predicted_scale=3.0)).keep  # the same view sharp is kept
    assert trigger.stats.skipped_by["blurry"] == 1


def test_absolute_sharpness_floor():
    rgb, depth = scene(3)
    lap = score_frame(TriggerFrame(0.0, rgb, depth), TriggerConfig()).laplacian
    trigger = FrameTrigger(TriggerConfig(min_laplacian=lap * 2, **OPEN))
    assert trigger.decide(TriggerFrame(0.0, rgb, depth)).reasons == ("blurry",)


def test_repeated_views_are_skipped():
    trigger = FrameTrigger(TriggerConfig(**OPEN))
    decisions = [trigger.decide(frame(4, 0.2 * k, noise_seed=k)) for k in range(6)]
    assert decisions[0].keep
    assert [d.reasons for d in decisions[1:]] == [("repeated",)] * 5
    assert all(d.novelty < 0.08 for d in decisions[1:])
    # a repeated view is skipped even when the network disagrees there: the kept copy already teaches it that
    assert trigger.decide(frame(4, 2.0, noise_seed=99, predicted_scale=2.0)).reasons == ("repeated",)
    assert trigger.stats.as_dict()["skipped repeated"] == 6


def test_a_frame_whose_predicted_depth_disagrees_is_kept():
    # duplicate_distance 0: the same view again is not a "repeat", so only the other triggers decide
    trigger = FrameTrigger(TriggerConfig(duplicate_distance=0.0, **OPEN))
    assert trigger.decide(frame(5, 0.0)).keep
    agreeing = trigger.decide(frame(5, 1.0, noise_seed=1, predicted_scale=1.05))
    assert not agreeing.keep and agreeing.reasons == ("redundant",)
    assert agreeing.scores.disagreement == pytest.approx(0.05, abs=1e-4)
    disagreeing = trigger.decide(frame(5, 2.0, noise_seed=2, predicted_scale=1.6))
    assert disagreeing.keep and disagreeing.reasons == ("disagreement",)
    assert disagreeing.scores.disagreement == pytest.approx(0.6, abs=1e-4)
    # no prediction: disagreement unknown, never fires
    unknown = trigger.decide(frame(5, 3.0, noise_seed=3, predicted_scale=None))
    assert math.isnan(unknown.scores.disagreement) and unknown.reasons == ("redundant",)
    # disagreement off
    off = FrameTrigger(TriggerConfig(duplicate_distance=0.0, disagreement_absrel=0.0, **OPEN))
    off.decide(frame(5, 0.0))
    assert off.decide(frame(5, 1.0, noise_seed=1, predicted_scale=3.0)).reasons == ("redundant",)


def test_gps_spacing_keeps_one_frame_per_spacing():
    config = TriggerConfig(duplicate_distance=0.0, disagreement_absrel=0.0, max_keep_rate_hz=0.0, max_gap_s=0.0,
                           spacing_m=5.0)
    trigger = FrameTrigger(config)
    kept_at = []
    for k in range(23):  # the same view (redundant) while the rover drives 1.01 m a frame north
        decision = trigger.decide(frame(6, float(k), noise_seed=k, gps=fix(1.01 * k)))
        if decision.keep:
            kept_at.append(k)
            assert k == 0 or decision.reasons == ("spacing",)
            assert k == 0 or decision.moved_m == pytest.approx(5.05, abs=0.01)
    assert kept_at == [0, 5, 10, 15, 20]
    # a fix with STATUS_NO_FIX is ignored: no position, no spacing
    lost = trigger.decide(frame(6, 30.0, noise_seed=30, gps=GpsFix(0.0, 0.0, None, -1)))
    assert math.isnan(lost.moved_m) and not lost.keep


def test_other_triggers_fire_within_the_spacing():
    trigger = FrameTrigger(TriggerConfig(max_keep_rate_hz=0.0, max_gap_s=0.0, spacing_m=5.0))
    kept = [trigger.decide(frame(seed, float(seed), gps=fix(0.1 * seed))).keep for seed in range(5)]
    assert kept == [True] * 5  # 0.4 m in all, but every view is new


def test_keep_rate_cap_and_minimum_rate():
    capped = FrameTrigger(TriggerConfig(max_keep_rate_hz=2.0, max_gap_s=0.0, spacing_m=0.0))
    decisions = [capped.decide(frame(seed, 0.1 * seed)) for seed in range(20)]  # 10 Hz of new views
    kept = [round(d.scores.stamp_s, 1) for d in decisions if d.keep]
    assert kept == [0.0, 0.5, 1.0, 1.5]
    assert capped.stats.skipped_by["rate"] == 16
    # minimum rate: a redundant view is kept once nothing was kept for max_gap_s
    slow = FrameTrigger(TriggerConfig(duplicate_distance=0.0, max_keep_rate_hz=0.0, max_gap_s=2.0, spacing_m=0.0))
    gap = [slow.decide(frame(8, 0.5 * k, noise_seed=k)) for k in range(10)]
    assert [0.5 * k for k, d in enumerate(gap) if d.keep] == [0.0, 2.0, 4.0]
    assert gap[4].reasons == ("gap",)


def test_time_going_back_restarts_the_rate_history():
    trigger = FrameTrigger(TriggerConfig(max_keep_rate_hz=1.0, max_gap_s=0.0, spacing_m=0.0))
    assert trigger.decide(frame(1, 100.0)).keep
    assert trigger.decide(frame(2, 5.0)).keep  # a bag played again from the start


def test_counters_add_up_and_reset_forgets_the_memory():
    trigger = FrameTrigger(TriggerConfig(max_keep_rate_hz=3.0))
    for k in range(30):
        trigger.decide(frame(k % 7, 0.2 * k, noise_seed=k, blur=3.0 if k % 5 == 4 else 0.0))
    counts = trigger.stats.as_dict()
    assert counts["frames"] == 30 and counts["kept"] + counts["skipped"] == 30
    assert counts["skipped"] == sum(v for k, v in counts.items() if k.startswith("skipped "))
    assert counts["skipped blurry"] >= 5 and counts["skipped repeated"] > 0 and counts["skipped rate"] > 0
    trigger.reset()
    assert trigger.kept_embeddings == 0 and trigger.decide(frame(0, 100.0)).reasons[0] == "first"


def test_embeddings():
    rgb, depth = scene(2)
    for kind, size in (("colour", 16 * 12 + 36), ("depth", 16 * 12), ("colour+depth", 2 * 16 * 12 + 36)):
        emb = score_frame(TriggerFrame(0.0, rgb, depth, depth), TriggerConfig(embedding=kind)).embedding
        assert emb.shape == (size,) and emb.dtype == np.float32
        assert float(np.linalg.norm(emb)) == pytest.approx(1.0, abs=1e-4)
    # the depth embedding is about layout, not scale; holes take the farthest depth
    assert np.allclose(depth_embedding(depth), depth_embedding(depth * 3.0), atol=1e-5)
    holes = depth.copy()
    holes[:10] = np.nan
    assert np.isfinite(depth_embedding(holes)).all()
    assert not depth_embedding(np.full((H, W), np.nan, np.float32)).any()
    # without a prediction the measured depth stands in
    a = score_frame(TriggerFrame(0.0, rgb, depth, None), TriggerConfig(embedding="depth")).embedding
    assert np.allclose(a, depth_embedding(depth))


def test_depth_disagreement():
    measured = np.full((10, 10), 2.0, np.float32)
    assert depth_disagreement(measured * 1.25, measured) == pytest.approx(0.25)
    measured[:5] = np.nan  # invalid pixels are left out
    predicted = np.full((10, 10), 3.0, np.float32)
    predicted[:5] = 100.0
    assert depth_disagreement(predicted, measured) == pytest.approx(0.5)
    measured[:] = np.nan
    measured[0, 0] = 2.0  # 1 % valid: unknown
    assert math.isnan(depth_disagreement(predicted, measured, min_valid_fraction=0.05))


@pytest.mark.parametrize("bad, message", [
    ({"rgb": np.zeros((H, W), np.uint8)}, "rgb must be a non-empty HxWx3 uint8 RGB image"),
    ({"rgb": np.zeros((H, W, 3), np.float32)}, "rgb must be a non-empty HxWx3 uint8 RGB image"),
    ({"rgb": np.zeros((0, W, 3), np.uint8)}, "rgb must be a non-empty"),
    ({"measured_depth": np.zeros((H // 2, W // 2), np.float32)}, "measured depth is 80x60, the colour image 160x120"),
    ({"predicted_depth": np.zeros((H, W), np.uint16)}, "predicted depth must be an HxW float depth image"),
    ({"stamp_s": math.nan}, "stamp must be finite"),
    ({"gps": GpsFix(123.0, 0.0, 0.0, 0)}, "gps lat must be a finite latitude"),
])
def test_malformed_frames_are_refused_with_a_clear_error(bad, message):
    trigger = FrameTrigger()
    good = frame(1, 0.0)
    fields = {"stamp_s": good.stamp_s, "rgb": good.rgb, "measured_depth": good.measured_depth,
              "predicted_depth": good.predicted_depth, "gps": None, **bad}
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        trigger.decide(TriggerFrame(**fields))
    assert trigger.stats.malformed == 1 and trigger.stats.frames == 0 and trigger.kept_embeddings == 0
    assert trigger.decide(good).keep  # the trigger goes on


@pytest.mark.parametrize("field, value, message", [
    ("embedding", "rgb", "embedding must be one of"),
    ("novelty_distance", -0.1, "novelty_distance must be a finite number >= 0"),
    ("spacing_m", math.inf, "spacing_m must be a finite number"),
    ("memory", 0, "memory must be >= 1"),
    ("blur_ratio", 1.5, "blur_ratio and min_valid_fraction must be within"),
    ("duplicate_distance", 0.9, "duplicate_distance .* must not exceed novelty_distance"),
])
def test_config_is_validated(field, value, message):
    with pytest.raises(ValueError, match=message):
        FrameTrigger(TriggerConfig(**{field: value}))


def test_curation_scores_are_the_rovers():
    from forest_perception import image_scores
    from forest_perception.dataset_tools import scores

    assert scores.sharpness is image_scores.sharpness and scores.frame_descriptor is image_scores.frame_descriptor
    assert scores.frame_scores is image_scores.frame_scores and scores.DESCRIPTOR_SIZE == image_scores.DESCRIPTOR_SIZE
