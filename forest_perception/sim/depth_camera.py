"""RealSense D435-like active-stereo depth sensor model, applied to rendered (true) depth.

Details: docs/simulator.md (`depth_camera`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import cv2
import numpy as np

from forest_perception.frames import CameraIntrinsics
from forest_perception.sim.weather import standard_normal_image


@dataclass(frozen=True)
class DepthCameraModel:
    """Parameters of the depth sensor; defaults follow an Intel RealSense D435."""

    min_range_m: float = 0.28
    max_range_m: float = 10.0
    baseline_m: float = 0.05
    subpixel: float = 0.08
    reference_width_px: int = 640
    noise_correlation_px: float = 1.0
    edge_jump_rel: float = 0.06
    edge_hole_px: int = 1
    dropout_fraction: float = 0.01
    dropout_blob_px: float = 3.0
    invalid_left_band: bool = False

    def validate(self) -> DepthCameraModel:
        """Raise ``ValueError`` naming the first bad parameter; return self when fine."""
        if not (math.isfinite(self.min_range_m) and 0.0 <= self.min_range_m < self.max_range_m):
            raise ValueError(
                f"need 0 <= min_range_m < max_range_m, got min_range_m={self.min_range_m}, "
                f"max_range_m={self.max_range_m}"
            )
        if not (math.isfinite(self.max_range_m) and self.max_range_m <= 100.0):
            raise ValueError(f"max_range_m must be finite and <= 100 m, got {self.max_range_m}")
        if not (math.isfinite(self.baseline_m) and 0.005 <= self.baseline_m <= 1.0):
            raise ValueError(f"baseline_m must be within [0.005, 1] m, got {self.baseline_m}")
        if not (math.isfinite(self.subpixel) and 0.0 <= self.subpixel <= 2.0):
            raise ValueError(f"subpixel must be within [0, 2] px, got {self.subpixel}")
        if not (isinstance(self.reference_width_px, (int, np.integer)) and 16 <= self.reference_width_px <= 4096):
            raise ValueError(f"reference_width_px must be an integer within [16, 4096], got {self.reference_width_px}")
        if not (math.isfinite(self.noise_correlation_px) and 0.0 <= self.noise_correlation_px <= 10.0):
            raise ValueError(f"noise_correlation_px must be within [0, 10] px, got {self.noise_correlation_px}")
        if not (math.isfinite(self.edge_jump_rel) and 0.0 < self.edge_jump_rel):
            raise ValueError(f"edge_jump_rel must be > 0, got {self.edge_jump_rel}")
        if not (isinstance(self.edge_hole_px, (int, np.integer)) and 0 <= self.edge_hole_px <= 10):
            raise ValueError(f"edge_hole_px must be an integer within [0, 10], got {self.edge_hole_px}")
        if not (math.isfinite(self.dropout_fraction) and 0.0 <= self.dropout_fraction < 1.0):
            raise ValueError(f"dropout_fraction must be within [0, 1), got {self.dropout_fraction}")
        if not (math.isfinite(self.dropout_blob_px) and 0.5 <= self.dropout_blob_px <= 50.0):
            raise ValueError(f"dropout_blob_px must be within [0.5, 50] px, got {self.dropout_blob_px}")
        return self

    def reference_fx(self, intrinsics: CameraIntrinsics) -> float:
        """Focal length (px) of the same optics at the reference width, where ``subpixel`` is defined."""
        return intrinsics.fx * self.reference_width_px / intrinsics.width

    def depth_sigma(self, z_m: np.ndarray | float, intrinsics: CameraIntrinsics) -> np.ndarray | float:
        """Standard deviation (m) of the depth error at ``z_m``: ``z^2 * subpixel / (fx_ref * baseline)``."""
        return np.asarray(z_m) ** 2 * self.subpixel / (self.reference_fx(intrinsics) * self.baseline_m)

    def apply(self, depth_true_m: np.ndarray, intrinsics: CameraIntrinsics, rng: np.random.Generator) -> np.ndarray:
        """Measured depth (float32 metres, NaN = invalid) from true z-depth (inf/NaN allowed for 'nothing').

        Deterministic given ``rng``; ``depth_true_m`` is not modified.
        """
        self.validate()
        z_true = np.asarray(depth_true_m, dtype=np.float32)
        if z_true.ndim != 2:
            raise ValueError(f"depth_true_m must be a 2-D image, got shape {z_true.shape}")
        h, w = z_true.shape
        if (intrinsics.width, intrinsics.height) != (w, h):
            raise ValueError(f"intrinsics are {intrinsics.width}x{intrinsics.height} but the depth image is {w}x{h}")
        valid = np.isfinite(z_true) & (z_true > 0)
        z = np.where(valid, z_true, np.float32(1.0))

        # disparity noise (in reference-width pixels), slightly correlated like block matching
        fb = np.float32(self.reference_fx(intrinsics) * self.baseline_m)
        noise = standard_normal_image(rng, (h, w))
        if self.noise_correlation_px > 0:
            noise = cv2.GaussianBlur(noise, (0, 0), self.noise_correlation_px, borderType=cv2.BORDER_REFLECT)
            noise *= np.float32(1.0 / _gaussian_blur_gain(self.noise_correlation_px))
        noise *= np.float32(self.subpixel)
        noise += fb / z  # disparity, px at the reference width
        with np.errstate(divide="ignore"):
            measured = fb / noise  # a non-positive disparity gives a negative or infinite depth: out of range
        lo, hi = np.float32(self.min_range_m), np.float32(self.max_range_m)
        # comparisons with NaN are False, so "nothing there" stays invalid
        invalid = ~((z_true >= lo) & (z_true <= hi) & (measured >= lo) & (measured <= hi))

        # holes where the depth jumps (stereo occlusion at object silhouettes). Inverse depth is
        # linear in the image over a plane, so its second difference is ~0 on surfaces seen at
        # any angle (the ground at a grazing angle included) and large only at discontinuities.
        if self.edge_jump_rel > 0:
            inv = np.where(valid, 1.0 / np.maximum(z_true, np.float32(1e-6)), np.float32(0.0)).astype(np.float32)
            pad = np.pad(inv, 1, mode="edge")
            d2x = np.abs(pad[1:-1, :-2] - 2.0 * inv + pad[1:-1, 2:])
            d2y = np.abs(pad[:-2, 1:-1] - 2.0 * inv + pad[2:, 1:-1])
            scale = np.maximum(inv, cv2.dilate(inv, np.ones((3, 3), np.uint8)))
            edges = np.maximum(d2x, d2y) > self.edge_jump_rel * scale
            if self.edge_hole_px > 0:
                size = 2 * self.edge_hole_px + 1
                edges = cv2.dilate(edges.astype(np.uint8), np.ones((size, size), np.uint8)) > 0
            invalid |= edges & valid

        # dropout blobs: thresholded smooth noise, the threshold set for the wanted area fraction
        if self.dropout_fraction > 0:
            # smooth noise made at a coarser grid and upsampled: the blobs are smooth anyway
            step = max(1, int(self.dropout_blob_px // 1.5))
            small = standard_normal_image(rng, (-(-h // step), -(-w // step)))
            small = cv2.GaussianBlur(small, (0, 0), self.dropout_blob_px / step, borderType=cv2.BORDER_REFLECT)
            small /= max(float(small.std()), 1e-12)
            blob = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
            invalid |= blob > NormalDist().inv_cdf(1.0 - self.dropout_fraction)

        if self.invalid_left_band:
            cols = np.arange(w, dtype=np.float32)[None, :]
            invalid |= cols < (intrinsics.fx * self.baseline_m) / z

        measured[invalid] = np.nan
        return measured


def _gaussian_blur_gain(sigma: float) -> float:
    """Standard deviation of unit white noise after ``cv2.GaussianBlur(sigma)`` (float32 kernel size rule)."""
    ksize = int(round(sigma * 4 * 2 + 1)) | 1
    k = cv2.getGaussianKernel(ksize, sigma, cv2.CV_64F).ravel()
    return float(np.sum(k * k))  # 2-D separable: sqrt((sum k^2)^2)
