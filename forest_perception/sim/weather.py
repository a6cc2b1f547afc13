"""Lighting/weather presets and the colour camera's image pipeline.

A :class:`WeatherPreset` drives both the renderer's lighting (light direction and
colour, ambient/diffuse/specular, shadows) and the post-processing: sky gradient,
distance fog, exposure and white balance. :class:`CameraEffects` describes the sensor
(exposure compensation, read/shot noise, motion blur, vignetting, lens softness).
:func:`apply_camera_pipeline` turns a rendered frame into what a small rover's colour
camera would deliver; it is vectorised numpy/OpenCV and deterministic given its rng.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from forest_perception.frames import CameraIntrinsics

RGB = tuple[float, float, float]

# sky pixels are blended with the fog colour as if they were this far away
SKY_FOG_DISTANCE_M = 60.0


def sun_direction(elevation_deg: float, azimuth_deg: float) -> tuple[float, float, float]:
    """Unit vector towards the sun in ENU from elevation above the horizon and azimuth (0 = east, CCW)."""
    el, az = math.radians(elevation_deg), math.radians(azimuth_deg)
    return (math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el))


@dataclass(frozen=True)
class WeatherPreset:
    """Illumination and atmosphere of a scene.

    ``light_direction`` points from the scene towards the light (ENU, unit length).
    Colours are RGB: light colour and tint in [0, 2] (multipliers), sky and fog
    colours in [0, 255]. ``fog_density_per_m`` is the extinction coefficient:
    a surface ``d`` metres away keeps ``exp(-density * d)`` of its own colour.
    """

    name: str
    light_direction: tuple[float, float, float]
    light_color: RGB
    ambient: float
    diffuse: float
    specular: float
    shadows: bool
    sky_top: RGB
    sky_horizon: RGB
    fog_density_per_m: float
    fog_color: RGB
    exposure_gain: float
    tint: RGB
    sun_glow: float = 0.0
    saturation: float = 1.0

    def validate(self) -> WeatherPreset:
        """Raise ``ValueError`` naming the first out-of-range field; return self when fine."""
        d = np.asarray(self.light_direction, dtype=np.float64)
        if d.shape != (3,) or not np.all(np.isfinite(d)) or abs(np.linalg.norm(d) - 1.0) > 1e-3:
            raise ValueError(f"{self.name}: light_direction must be a unit 3-vector, got {self.light_direction}")
        for field_name in ("ambient", "diffuse", "specular"):
            v = getattr(self, field_name)
            if not 0.0 <= v <= 2.0:
                raise ValueError(f"{self.name}: {field_name} coefficient must be within [0, 2], got {v}")
        for field_name in ("light_color", "tint"):
            c = getattr(self, field_name)
            if len(c) != 3 or not all(0.0 <= x <= 2.0 for x in c):
                raise ValueError(f"{self.name}: {field_name} must be three multipliers within [0, 2], got {c}")
        for field_name in ("sky_top", "sky_horizon", "fog_color"):
            c = getattr(self, field_name)
            if len(c) != 3 or not all(0.0 <= x <= 255.0 for x in c):
                raise ValueError(f"{self.name}: {field_name} must be RGB within [0, 255], got {c}")
        if not 0.0 <= self.fog_density_per_m <= 1.0:
            raise ValueError(f"{self.name}: fog_density_per_m must be within [0, 1] per metre, "
                             f"got {self.fog_density_per_m}")
        if not 0.05 <= self.exposure_gain <= 8.0:
            raise ValueError(f"{self.name}: exposure_gain must be within [0.05, 8], got {self.exposure_gain}")
        if not 0.0 <= self.sun_glow <= 1.0:
            raise ValueError(f"{self.name}: sun_glow must be within [0, 1], got {self.sun_glow}")
        if not 0.0 <= self.saturation <= 2.0:
            raise ValueError(f"{self.name}: saturation must be within [0, 2], got {self.saturation}")
        return self


WEATHER_PRESETS: dict[str, WeatherPreset] = {
    p.name: p.validate()
    for p in (
        WeatherPreset(
            name="sunny",
            light_direction=sun_direction(55.0, 35.0),
            light_color=(1.12, 1.06, 0.94),
            ambient=0.55,
            diffuse=1.0,
            specular=0.04,
            shadows=True,
            sky_top=(62.0, 122.0, 208.0),
            sky_horizon=(178.0, 208.0, 236.0),
            fog_density_per_m=0.004,
            fog_color=(182.0, 204.0, 228.0),
            exposure_gain=1.45,
            tint=(1.06, 1.0, 0.9),
            sun_glow=0.5,
            saturation=1.2,
        ),
        WeatherPreset(
            name="overcast",
            light_direction=sun_direction(75.0, 120.0),
            light_color=(0.92, 0.95, 1.0),
            ambient=0.78,
            diffuse=0.32,
            specular=0.0,
            shadows=False,
            sky_top=(168.0, 172.0, 178.0),
            sky_horizon=(206.0, 208.0, 212.0),
            fog_density_per_m=0.012,
            fog_color=(176.0, 180.0, 186.0),
            exposure_gain=1.05,
            tint=(0.94, 0.99, 1.06),
            saturation=0.75,
        ),
        WeatherPreset(
            name="dusk",
            light_direction=sun_direction(7.0, 200.0),
            light_color=(1.3, 0.74, 0.42),
            ambient=0.36,
            diffuse=0.9,
            specular=0.03,
            shadows=True,
            sky_top=(38.0, 46.0, 96.0),
            sky_horizon=(236.0, 142.0, 78.0),
            fog_density_per_m=0.008,
            fog_color=(122.0, 88.0, 84.0),
            exposure_gain=0.85,
            tint=(1.12, 0.9, 0.78),
            sun_glow=0.8,
            saturation=1.05,
        ),
        WeatherPreset(
            name="fog",
            light_direction=sun_direction(70.0, 60.0),
            light_color=(0.9, 0.92, 0.95),
            ambient=0.82,
            diffuse=0.22,
            specular=0.0,
            shadows=False,
            sky_top=(196.0, 199.0, 203.0),
            sky_horizon=(206.0, 209.0, 212.0),
            fog_density_per_m=0.085,
            fog_color=(198.0, 202.0, 206.0),
            exposure_gain=1.0,
            tint=(0.97, 1.0, 1.03),
            saturation=0.7,
        ),
        WeatherPreset(
            name="rain",
            light_direction=sun_direction(80.0, 90.0),
            light_color=(0.8, 0.84, 0.9),
            ambient=0.62,
            diffuse=0.3,
            specular=0.12,
            shadows=False,
            sky_top=(104.0, 110.0, 118.0),
            sky_horizon=(148.0, 152.0, 158.0),
            fog_density_per_m=0.03,
            fog_color=(124.0, 130.0, 138.0),
            exposure_gain=0.82,
            tint=(0.92, 0.98, 1.06),
            saturation=0.8,
        ),
    )
}


def get_weather(name: str) -> WeatherPreset:
    """The preset called ``name``; ``ValueError`` naming it and the known presets otherwise."""
    try:
        return WEATHER_PRESETS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown weather preset {name!r}; known presets: {', '.join(sorted(WEATHER_PRESETS))}"
        ) from None


@dataclass(frozen=True)
class CameraEffects:
    """Colour-sensor imperfections, all in units of 8-bit digital numbers (DN) unless noted.

    Noise variance per pixel is ``read_noise_dn**2 + shot_noise_gain * signal_dn``.
    Motion blur smears horizontally over ``|yaw_rate| * exposure_time_s * fx`` pixels.
    ``vignetting`` is the fractional brightness loss in the image corners.
    ``lens_blur_sigma_px`` is the optics' Gaussian softness (also hides the renderer's aliasing).
    """

    exposure_ev: float = 0.0
    read_noise_dn: float = 1.5
    shot_noise_gain: float = 0.08
    motion_blur: bool = True
    exposure_time_s: float = 0.008
    vignetting: float = 0.25
    lens_blur_sigma_px: float = 0.5

    def validate(self) -> CameraEffects:
        """Raise ``ValueError`` naming the first bad field; return self when fine."""
        if not (math.isfinite(self.exposure_ev) and -6.0 <= self.exposure_ev <= 6.0):
            raise ValueError(f"exposure_ev must be within [-6, 6] EV, got {self.exposure_ev}")
        if not (math.isfinite(self.read_noise_dn) and 0.0 <= self.read_noise_dn <= 50.0):
            raise ValueError(f"read_noise_dn must be within [0, 50] DN, got {self.read_noise_dn}")
        if not (math.isfinite(self.shot_noise_gain) and 0.0 <= self.shot_noise_gain <= 10.0):
            raise ValueError(f"shot_noise_gain must be within [0, 10] DN per DN, got {self.shot_noise_gain}")
        if not (math.isfinite(self.exposure_time_s) and 0.0 < self.exposure_time_s <= 0.5):
            raise ValueError(f"exposure_time_s must be within (0, 0.5] s, got {self.exposure_time_s}")
        if not (math.isfinite(self.vignetting) and 0.0 <= self.vignetting < 1.0):
            raise ValueError(f"vignetting must be within [0, 1), got {self.vignetting}")
        if not (math.isfinite(self.lens_blur_sigma_px) and 0.0 <= self.lens_blur_sigma_px <= 10.0):
            raise ValueError(f"lens_blur_sigma_px must be within [0, 10] px, got {self.lens_blur_sigma_px}")
        return self


NO_EFFECTS = CameraEffects(read_noise_dn=0.0, shot_noise_gain=0.0, motion_blur=False, vignetting=0.0,
                           lens_blur_sigma_px=0.0)
"""A perfect sensor: only the weather (sky, fog, exposure, tint) is applied."""


def _ray_directions(height: int, width: int, intrinsics: CameraIntrinsics) -> np.ndarray:
    """(H, W, 3) unit rays in camera_link axes (x forward, y left, z up)."""
    u = np.arange(width, dtype=np.float64)
    v = np.arange(height, dtype=np.float64)
    x_opt = (u[None, :] - intrinsics.cx) / intrinsics.fx
    y_opt = (v[:, None] - intrinsics.cy) / intrinsics.fy
    rays = np.empty((height, width, 3))
    rays[..., 0] = 1.0  # optical z is camera_link x
    rays[..., 1] = -x_opt  # image right is camera_link -y
    rays[..., 2] = -y_opt  # image down is camera_link -z
    return rays / np.linalg.norm(rays, axis=-1, keepdims=True)


@lru_cache(maxsize=16)
def _cached_rays(height: int, width: int, hfov_deg: float) -> np.ndarray:
    return _ray_directions(height, width, CameraIntrinsics(width, height, hfov_deg)).astype(np.float32)


def sky_colours(weather: WeatherPreset, rays_world: np.ndarray) -> np.ndarray:
    """(N, 3) float32 sky colours for (N, 3) unit world-frame view rays.

    Horizon-to-zenith gradient by the ray's elevation, plus a glow around the sun.
    """
    rays = np.asarray(rays_world, dtype=np.float32).reshape(-1, 3)
    t = np.sqrt(np.clip(rays[:, 2], 0.0, 1.0))[:, None]
    horizon = np.asarray(weather.sky_horizon, dtype=np.float32)
    sky = horizon + t * (np.asarray(weather.sky_top, dtype=np.float32) - horizon)
    if weather.sun_glow > 0:
        c = np.clip(rays @ np.asarray(weather.light_direction, dtype=np.float32), -1.0, 1.0) - 1.0
        w = np.clip(weather.sun_glow * (np.exp(c / 0.02) + 0.35 * np.exp(c / 0.25)), 0.0, 1.0)[:, None]
        sun = 255.0 * np.clip(np.asarray(weather.light_color, dtype=np.float32) / max(weather.light_color), 0, 1)
        sky += w * (sun - sky)
    return sky


def sky_image(weather: WeatherPreset, intrinsics: CameraIntrinsics,
              camera_rotation: np.ndarray | None = None) -> np.ndarray:
    """(H, W, 3) float32 sky of a whole frame; ``camera_rotation`` is world_from_camera_link (None: level)."""
    rays = _cached_rays(intrinsics.height, intrinsics.width, float(intrinsics.hfov_deg))
    world = rays if camera_rotation is None else rays @ np.asarray(camera_rotation, dtype=np.float32).T
    return sky_colours(weather, world).reshape(intrinsics.height, intrinsics.width, 3)


@lru_cache(maxsize=16)
def _vignette_mask(height: int, width: int, strength: float) -> np.ndarray:
    y = (np.arange(height, dtype=np.float32) - (height - 1) / 2) / ((height - 1) / 2 or 1)
    x = (np.arange(width, dtype=np.float32) - (width - 1) / 2) / ((width - 1) / 2 or 1)
    r2 = (x[None, :] ** 2 + y[:, None] ** 2) / 2.0  # 1 in the corners
    return (1.0 - strength * r2**1.5)[..., None].astype(np.float32)


def _motion_blur_kernel(length_px: float) -> np.ndarray:
    """Normalised horizontal box of fractional length (partial weights at both ends)."""
    n = int(math.floor(length_px))
    frac = length_px - n
    half = n // 2 + 1
    k = np.zeros(2 * half + 1, dtype=np.float32)
    centre = half
    k[centre - n // 2: centre - n // 2 + n] = 1.0
    if frac > 0:
        k[centre - n // 2 - 1] += frac / 2
        k[centre - n // 2 + n] += frac / 2
    k = k[None, :]
    return k / k.sum()


def standard_normal_image(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Unit Gaussian float32 noise of ``shape``, deterministic given ``rng``.

    OpenCV's generator (seeded from ``rng``; it is per thread) is ~3x faster than
    numpy's for a frame of noise, which matters at 30 Hz on a small CPU.
    """
    out = np.empty((shape[0], int(np.prod(shape[1:]))), dtype=np.float32)
    cv2.setRNGSeed(int(rng.integers(0, 2**31 - 1)))
    cv2.randn(out, 0.0, 1.0)
    return out.reshape(shape)


@lru_cache(maxsize=32)
def _level_sky_planes(weather: WeatherPreset, height: int, width: int, hfov_deg: float) -> np.ndarray:
    """(3, H, W) sky of a level camera (what the simulator asks for at every frame); read-only."""
    sky = sky_colours(weather, _cached_rays(height, width, hfov_deg).reshape(-1, 3))
    planes = np.ascontiguousarray(sky.T.reshape(3, height, width))
    planes.flags.writeable = False
    return planes


def _weather_planes(rgb: np.ndarray, depth: np.ndarray, weather: WeatherPreset, intr: CameraIntrinsics,
                    camera_rotation: np.ndarray | None, extra_gain: float) -> np.ndarray:
    """Weather steps on channel planes: (3, H, W) float32 (planar: numpy broadcasts over a 3-wide
    last axis slowly, contiguous planes are several times faster)."""
    h, w = depth.shape
    planes = np.ascontiguousarray(np.moveaxis(rgb, 2, 0), dtype=np.float32)
    sky_mask = ~np.isfinite(depth)
    fog_col = [np.float32(c) for c in weather.fog_color]
    if weather.fog_density_per_m > 0:
        d = np.where(sky_mask, np.float32(0.0), depth.astype(np.float32, copy=False))
        keep = np.exp(np.float32(-weather.fog_density_per_m) * d)
        for c in range(3):
            planes[c] -= fog_col[c]
            planes[c] *= keep
            planes[c] += fog_col[c]
    if sky_mask.any():
        keep_sky = np.float32(math.exp(-weather.fog_density_per_m * SKY_FOG_DISTANCE_M))
        if camera_rotation is None:
            sky_planes = _level_sky_planes(weather, h, w, float(intr.hfov_deg))
            for c in range(3):
                planes[c][sky_mask] = fog_col[c] + keep_sky * (sky_planes[c][sky_mask] - fog_col[c])
        else:
            rays = _cached_rays(h, w, float(intr.hfov_deg))[sky_mask]
            sky = sky_colours(weather, rays @ np.asarray(camera_rotation, dtype=np.float32).T)
            for c in range(3):
                planes[c][sky_mask] = fog_col[c] + keep_sky * (sky[:, c] - fog_col[c])
    if weather.saturation != 1.0:
        sat = np.float32(weather.saturation)
        grey = planes[0] * np.float32(0.299) + planes[1] * np.float32(0.587) + planes[2] * np.float32(0.114)
        grey *= 1 - sat
        for c in range(3):
            planes[c] *= sat
            planes[c] += grey
    for c in range(3):
        planes[c] *= np.float32(weather.tint[c] * weather.exposure_gain * extra_gain)
    return planes


def apply_weather(rgb: np.ndarray, depth: np.ndarray, weather: WeatherPreset,
                  intrinsics: CameraIntrinsics | None = None, camera_rotation: np.ndarray | None = None,
                  extra_gain: float = 1.0) -> np.ndarray:
    """Sky fill, fog, saturation, exposure gain and tint on a rendered frame -> float32 (H, W, 3) DN, unclipped."""
    h, w = depth.shape
    planes = _weather_planes(np.asarray(rgb), np.asarray(depth), weather, intrinsics or CameraIntrinsics(w, h),
                             camera_rotation, extra_gain)
    return np.ascontiguousarray(np.moveaxis(planes, 0, 2))


def apply_camera_pipeline(
    rgb: np.ndarray,
    depth: np.ndarray,
    weather: WeatherPreset,
    effects: CameraEffects,
    rng: np.random.Generator,
    yaw_rate_rps: float = 0.0,
    intrinsics: CameraIntrinsics | None = None,
    camera_rotation: np.ndarray | None = None,
) -> np.ndarray:
    """Rendered frame -> camera image (uint8 RGB).

    Steps: sky gradient where ``depth`` is +inf (by ray elevation: ``camera_rotation`` is
    world_from_camera_link, None = a level camera), fog ``exp(-density * depth)``,
    saturation, exposure (weather gain x 2**exposure_ev) and white-balance tint, lens
    softness, horizontal motion blur of ``|yaw_rate_rps| * exposure_time_s * fx`` px,
    vignetting, shot and read noise. ``depth`` is z-depth in metres (H, W). Same inputs
    and rng state, same image.
    """
    effects.validate()
    rgb = np.asarray(rgb)
    depth = np.asarray(depth)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb must be an (H, W, 3) image, got shape {rgb.shape}")
    if depth.shape != rgb.shape[:2]:
        raise ValueError(f"depth shape {depth.shape} does not match rgb shape {rgb.shape[:2]}")
    h, w = depth.shape
    if intrinsics is not None and (intrinsics.width, intrinsics.height) != (w, h):
        raise ValueError(f"intrinsics are {intrinsics.width}x{intrinsics.height} but the image is {w}x{h}")
    intr = intrinsics or CameraIntrinsics(w, h)
    planes = _weather_planes(rgb, depth, weather, intr, camera_rotation, 2.0**effects.exposure_ev)
    kernel = None
    if effects.motion_blur:
        length = abs(float(yaw_rate_rps)) * effects.exposure_time_s * intr.fx
        if length >= 1.0:
            kernel = _motion_blur_kernel(min(length, w / 2))
    vignette = _vignette_mask(h, w, float(effects.vignetting))[..., 0] if effects.vignetting > 0 else None
    noisy = effects.read_noise_dn > 0 or effects.shot_noise_gain > 0
    noise = standard_normal_image(rng, (3, h, w)) if noisy else None
    out = np.empty((h, w, 3), dtype=np.uint8)
    for c in range(3):
        p = planes[c]
        if effects.lens_blur_sigma_px > 0:
            p = cv2.GaussianBlur(p, (0, 0), effects.lens_blur_sigma_px, borderType=cv2.BORDER_REFLECT)
        if kernel is not None:
            p = cv2.filter2D(p, -1, kernel, borderType=cv2.BORDER_REFLECT)
        if vignette is not None:
            p *= vignette
        if noise is not None:
            variance = np.clip(p, 0.0, 255.0)
            variance *= np.float32(effects.shot_noise_gain)
            variance += np.float32(effects.read_noise_dn**2)
            n = noise[c]
            n *= np.sqrt(variance, out=variance)
            p += n
        p += np.float32(0.5)
        out[..., c] = np.clip(p, 0, 255, out=p)
    return out
