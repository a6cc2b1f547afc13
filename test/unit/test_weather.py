"""Weather presets and the colour camera pipeline, on synthetic frames (no renderer needed)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from forest_perception.frames import CameraIntrinsics
from forest_perception.sim.weather import (
    NO_EFFECTS,
    WEATHER_PRESETS,
    CameraEffects,
    apply_camera_pipeline,
    apply_weather,
    get_weather,
    sky_image,
)

INTR = CameraIntrinsics(160, 120)


def _textured_frame(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(40, 200, size=(INTR.height, INTR.width, 3)).astype(np.uint8)


def _split_depth(near: float = 2.0, far: float = 40.0) -> np.ndarray:
    depth = np.full((INTR.height, INTR.width), near, dtype=np.float32)
    depth[:, INTR.width // 2:] = far
    return depth


def test_known_presets_exist_and_validate():
    assert {"sunny", "overcast", "dusk", "fog"} <= set(WEATHER_PRESETS)
    for name, preset in WEATHER_PRESETS.items():
        assert preset.name == name
        assert preset.validate() is preset
        assert get_weather(name) is preset


def test_unknown_weather_names_the_value_and_the_known_ones():
    with pytest.raises(ValueError) as err:
        get_weather("blizzard")
    msg = str(err.value)
    assert "'blizzard'" in msg
    for name in ("sunny", "overcast", "dusk", "fog"):
        assert name in msg
    with pytest.raises(ValueError, match="None"):
        get_weather(None)


def test_preset_validation_names_the_bad_field():
    sunny = get_weather("sunny")
    with pytest.raises(ValueError, match="light_direction"):
        dataclasses.replace(sunny, light_direction=(0.0, 0.0, 2.0)).validate()
    with pytest.raises(ValueError, match="fog_density_per_m"):
        dataclasses.replace(sunny, fog_density_per_m=-0.1).validate()
    with pytest.raises(ValueError, match="sky_top"):
        dataclasses.replace(sunny, sky_top=(0.0, 0.0, 300.0)).validate()


def test_presets_differ_measurably_on_the_same_frame():
    rgb, depth = _textured_frame(), _split_depth(3.0, 25.0)
    depth[:20] = np.inf  # some sky
    out = {n: apply_weather(rgb, depth, p, INTR) for n, p in WEATHER_PRESETS.items()}
    means = {n: o.reshape(-1, 3).mean(axis=0) for n, o in out.items()}
    names = sorted(means)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert np.abs(means[a] - means[b]).max() > 5.0, (a, b)
    assert means["dusk"].mean() < means["sunny"].mean()
    assert means["dusk"][0] - means["dusk"][2] > means["overcast"][0] - means["overcast"][2]


def test_fog_reduces_contrast_with_distance():
    rgb, depth = _textured_frame(), _split_depth(2.0, 40.0)
    half = INTR.width // 2
    for name, max_ratio in (("fog", 0.1), ("overcast", 0.85)):
        out = apply_weather(rgb, depth, get_weather(name), INTR)
        near_std = out[:, :half].std(axis=(0, 1)).mean()
        far_std = out[:, half:].std(axis=(0, 1)).mean()
        assert far_std < max_ratio * near_std, name
    # and the far half tends to the fog colour
    fog = get_weather("fog")
    out = apply_weather(rgb, depth, fog, INTR) / (np.asarray(fog.tint) * fog.exposure_gain)
    np.testing.assert_allclose(out[:, half:].mean(axis=(0, 1)), fog.fog_color, atol=6.0)


def test_sky_fill_where_depth_is_inf_with_a_gradient():
    sunny = get_weather("sunny")
    depth = np.full((INTR.height, INTR.width), np.inf, dtype=np.float32)
    pitch_up = np.array([[0.5, 0.0, -0.866], [0.0, 1.0, 0.0], [0.866, 0.0, 0.5]])  # 60 deg up
    out = apply_camera_pipeline(np.zeros((INTR.height, INTR.width, 3), np.uint8), depth, sunny, NO_EFFECTS,
                                np.random.default_rng(0), intrinsics=INTR, camera_rotation=pitch_up)
    top, bottom = out[0].astype(float).mean(axis=0), out[-1].astype(float).mean(axis=0)
    assert out.mean() > 60  # not the black input
    assert top[2] - top[0] > bottom[2] - bottom[0]  # deeper blue towards the zenith
    sky = sky_image(sunny, INTR)
    assert sky.shape == (INTR.height, INTR.width, 3) and sky.dtype == np.float32


def test_motion_blur_length_follows_yaw_rate_exposure_and_fx():
    rgb = np.zeros((INTR.height, INTR.width, 3), np.uint8)
    rgb[:, 80] = 255
    depth = np.full((INTR.height, INTR.width), 2.0, np.float32)
    effects = CameraEffects(read_noise_dn=0, shot_noise_gain=0, vignetting=0, lens_blur_sigma_px=0,
                            exposure_time_s=0.02, motion_blur=True)
    weather = dataclasses.replace(get_weather("overcast"), fog_density_per_m=0.0, exposure_gain=1.0,
                                  tint=(1.0, 1.0, 1.0), saturation=1.0)
    yaw_rate = 2.0
    out = apply_camera_pipeline(rgb, depth, weather, effects, np.random.default_rng(0), yaw_rate, INTR)
    row = out[60, :, 1].astype(float)
    spread = np.flatnonzero(row > 1).size
    expected = yaw_rate * 0.02 * INTR.fx
    assert abs(spread - expected) <= 2.0
    assert row.sum() == pytest.approx(255.0, rel=0.05)  # energy preserved
    still = apply_camera_pipeline(rgb, depth, weather, effects, np.random.default_rng(0), 0.0, INTR)
    assert np.flatnonzero(still[60, :, 1] > 1).size == 1


def test_vignetting_and_noise():
    rgb = np.full((INTR.height, INTR.width, 3), 128, np.uint8)
    depth = np.full((INTR.height, INTR.width), 1.0, np.float32)
    weather = dataclasses.replace(get_weather("overcast"), fog_density_per_m=0.0, exposure_gain=1.0,
                                  tint=(1.0, 1.0, 1.0), saturation=1.0)
    vig = apply_camera_pipeline(rgb, depth, weather, dataclasses.replace(NO_EFFECTS, vignetting=0.3),
                                np.random.default_rng(0), intrinsics=INTR)
    assert vig[0, 0].mean() < 0.8 * vig[60, 80].mean()
    noisy = CameraEffects(read_noise_dn=2.0, shot_noise_gain=0.5, vignetting=0.0, lens_blur_sigma_px=0.0,
                          motion_blur=False)
    out = apply_camera_pipeline(rgb, depth, weather, noisy, np.random.default_rng(0), intrinsics=INTR)
    assert out.astype(float).std() == pytest.approx(np.sqrt(2.0**2 + 0.5 * 128), rel=0.1)


def test_same_rng_same_image_and_dtype():
    rgb, depth = _textured_frame(), _split_depth()
    sunny = get_weather("sunny")
    a = apply_camera_pipeline(rgb, depth, sunny, CameraEffects(), np.random.default_rng(3), 1.0, INTR)
    b = apply_camera_pipeline(rgb, depth, sunny, CameraEffects(), np.random.default_rng(3), 1.0, INTR)
    c = apply_camera_pipeline(rgb, depth, sunny, CameraEffects(), np.random.default_rng(4), 1.0, INTR)
    assert a.dtype == np.uint8 and a.shape == rgb.shape
    np.testing.assert_array_equal(a, b)
    assert np.any(a != c)


@pytest.mark.parametrize(
    ("field", "value"),
    [("exposure_ev", 9.0), ("read_noise_dn", -1.0), ("shot_noise_gain", float("nan")), ("exposure_time_s", 0.0),
     ("vignetting", 1.0), ("lens_blur_sigma_px", -0.5)],
)
def test_camera_effects_refuse_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        CameraEffects(**{field: value}).validate()


def test_pipeline_refuses_mismatched_inputs():
    rgb, depth = _textured_frame(), _split_depth()
    sunny = get_weather("sunny")
    with pytest.raises(ValueError, match="depth shape"):
        apply_camera_pipeline(rgb, depth[:10], sunny, NO_EFFECTS, np.random.default_rng(0))
    with pytest.raises(ValueError, match="intrinsics"):
        apply_camera_pipeline(rgb, depth, sunny, NO_EFFECTS, np.random.default_rng(0),
                              intrinsics=CameraIntrinsics(320, 240))
    with pytest.raises(ValueError, match="rgb"):
        apply_camera_pipeline(rgb[..., 0], depth, sunny, NO_EFFECTS, np.random.default_rng(0))
