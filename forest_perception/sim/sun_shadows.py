"""Sun shadows for the TinyRenderer frames: the sun's depth map, and shading that takes sunlight out of shade.

TinyRenderer's own shadow pass is slow and weak, so :class:`ForestScene` renders the world once per light
direction from the sun (:class:`SunShadowMap`) and :func:`shadow_shading` darkens each frame's pixels
whose surface point is behind something in that map. Details: docs/simulator.md (`scene`).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from forest_perception.frames import CameraIntrinsics
from forest_perception.sim.projection import pixel_rays_optical
from forest_perception.sim.weather import WeatherPreset


@dataclass
class SunShadowMap:
    """Depth of the scene seen from the sun (a pinhole camera 1 km away, looking at the world).

    Rendered once per light direction; :meth:`lit_fraction` tells, for world points,
    how much of the sun reaches them (2x2 percentage-closer filtering).
    """

    rotation: np.ndarray
    eye: np.ndarray
    fx: float
    cx: float
    cy: float
    depth: np.ndarray
    texel_m: float

    def lit_fraction(self, px: np.ndarray, py: np.ndarray, pz: np.ndarray, bias_m: np.ndarray | float) -> np.ndarray:
        """Fraction in [0, 1] of sunlight reaching the world points (px, py, pz) (same-shape arrays)."""
        rot = self.rotation.astype(np.float32)
        ex, ey, ez = (float(c) for c in self.eye)
        dx, dy, dz = px - np.float32(ex), py - np.float32(ey), pz - np.float32(ez)
        z = dx * rot[0, 0] + dy * rot[1, 0] + dz * rot[2, 0]
        with np.errstate(invalid="ignore", divide="ignore"):
            inv = np.float32(self.fx) / z
            u = -(dx * rot[0, 1] + dy * rot[1, 1] + dz * rot[2, 1]) * inv + np.float32(self.cx)
            v = -(dx * rot[0, 2] + dy * rot[1, 2] + dz * rot[2, 2]) * inv + np.float32(self.cy)
        h, w = self.depth.shape
        u = np.nan_to_num(u, nan=-10.0, posinf=-10.0, neginf=-10.0)
        v = np.nan_to_num(v, nan=-10.0, posinf=-10.0, neginf=-10.0)
        u0f = np.floor(u)
        v0f = np.floor(v)
        fu = u - u0f
        fv = v - v0f
        u0 = u0f.astype(np.int32)
        v0 = v0f.astype(np.int32)
        zq = z - bias_m
        flat = self.depth.ravel()
        lit = np.zeros(z.shape, dtype=np.float32)
        for du, dv in ((0, 0), (1, 0), (0, 1), (1, 1)):
            uu = u0 + du
            vv = v0 + dv
            inside = (uu >= 0) & (uu < w) & (vv >= 0) & (vv < h)
            occ = np.take(flat, np.where(inside, vv * w + uu, 0))
            wgt = (fu if du else 1 - fu) * (fv if dv else 1 - fv)
            lit += wgt * (~inside | (zq <= occ))
        return lit


def _edge_aware_diff(a: list[np.ndarray], axis: int) -> list[np.ndarray]:
    """Per-pixel difference of the (x, y, z) component images along ``axis``.

    Takes the smaller of the forward and backward differences so that a silhouette's
    depth jump does not leak into the normals of the surface on either side.
    """
    fwd = [np.diff(c, axis=axis, append=np.take(c, [-1], axis=axis)) for c in a]
    bwd = [np.diff(c, axis=axis, prepend=np.take(c, [0], axis=axis)) for c in a]
    nf = fwd[0] ** 2 + fwd[1] ** 2 + fwd[2] ** 2
    nb = bwd[0] ** 2 + bwd[1] ** 2 + bwd[2] ** 2
    # a zero difference only happens at the border: take the other one
    use_fwd = ((nf < nb) & (nf > 0)) | (nb == 0)
    return [np.where(use_fwd, f, b) for f, b in zip(fwd, bwd)]


def world_components(depth: np.ndarray, intrinsics: CameraIntrinsics, position: np.ndarray,
                     rotation: np.ndarray, stride: int = 1) -> tuple[np.ndarray, list[np.ndarray]]:
    """(finite mask, [x, y, z] world coordinate images) of every ``stride``-th pixel of a z-depth image.

    Entries are 0 where the depth is not finite; the components come as separate float32 images,
    which is how :func:`shadow_factor` works on them.
    """
    d = np.asarray(depth)[::stride, ::stride]
    finite = np.isfinite(d)
    z = np.where(finite, d, 0.0).astype(np.float32)
    rays = pixel_rays_optical(intrinsics)[::stride, ::stride]
    rot = np.asarray(rotation, dtype=np.float32)
    comps = []
    for k in range(3):
        # world_k = pos_k + R[k, 0] z - R[k, 1] x_opt - R[k, 2] y_opt, with x_opt = rx z, y_opt = ry z
        a = rot[k, 0] - rot[k, 1] * rays[..., 0] - rot[k, 2] * rays[..., 1]
        comps.append(np.where(finite, a * z + np.float32(position[k]), 0.0).astype(np.float32))
    return finite, comps


def shadow_factor(depth: np.ndarray, intrinsics: CameraIntrinsics, position: np.ndarray, rotation: np.ndarray,
                  weather: WeatherPreset, sun_map: SunShadowMap, stride: int = 1) -> np.ndarray:
    """(H', W', 3) float32 colour multipliers that take the sun's diffuse term out of shadowed pixels.

    TinyRenderer lit each pixel as ``albedo * (ambient + diffuse * n.l * light)``; the
    normal ``n`` comes from the depth image's world points, and a shadowed pixel keeps
    ``ambient / (ambient + diffuse * n.l * light)`` of its colour. Computed on every
    ``stride``-th pixel (H' = ceil(H / stride)).
    """
    pos = np.asarray(position, dtype=np.float64)
    finite, comps = world_components(depth, intrinsics, pos, rotation, stride)
    du = _edge_aware_diff(comps, 1)
    dv = _edge_aware_diff(comps, 0)
    nx = du[1] * dv[2] - du[2] * dv[1]
    ny = du[2] * dv[0] - du[0] * dv[2]
    nz = du[0] * dv[1] - du[1] * dv[0]
    cam = [np.float32(c) for c in pos]
    # face the camera
    flip = (nx * (cam[0] - comps[0]) + ny * (cam[1] - comps[1]) + nz * (cam[2] - comps[2])) < 0
    lx, ly, lz = (np.float32(c) for c in weather.light_direction)
    inv_len = 1.0 / np.maximum(np.sqrt(nx * nx + ny * ny + nz * nz), np.float32(1e-9))
    ndl = (nx * lx + ny * ly + nz * lz) * inv_len
    ndl = np.clip(np.where(flip, -ndl, ndl), 0.0, 1.0)
    tan = np.sqrt(np.clip(1.0 - ndl * ndl, 0.0, 1.0)) / np.maximum(ndl, np.float32(0.2))
    bias = np.float32(sun_map.texel_m) * (1.5 + 1.5 * tan)
    lit = sun_map.lit_fraction(comps[0], comps[1], comps[2], bias)
    lit = np.where(finite, lit, np.float32(1.0))
    shade = (1.0 - lit) * ndl * np.float32(weather.diffuse)
    factor = np.empty(lit.shape + (3,), dtype=np.float32)
    for c in range(3):
        lc = np.float32(weather.light_color[c])
        full = np.float32(weather.ambient) + np.float32(weather.diffuse) * ndl * lc
        factor[..., c] = 1.0 - shade * lc / np.maximum(full, np.float32(1e-6))
    return factor


def shadow_shading(rgb: np.ndarray, depth: np.ndarray, intrinsics: CameraIntrinsics, position: np.ndarray,
                   rotation: np.ndarray, weather: WeatherPreset, sun_map: SunShadowMap,
                   stride: int = 1) -> np.ndarray:
    """Apply :func:`shadow_factor` to a rendered frame -> uint8 rgb (factor upsampled when ``stride`` > 1)."""
    factor = shadow_factor(depth, intrinsics, position, rotation, weather, sun_map, stride)
    h, w = depth.shape
    if factor.shape[:2] != (h, w):
        factor = cv2.resize(factor, (w, h), interpolation=cv2.INTER_LINEAR)
    return np.clip(rgb.astype(np.float32) * factor + 0.5, 0, 255).astype(np.uint8)
