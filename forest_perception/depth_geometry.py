"""Geometry on depth images: back-projection to points, voxel downsampling, a laser scan.

Details: docs/runtime.md (`depth_geometry`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from forest_perception.frames import CameraIntrinsics

_open3d = None  # module once imported; False when it is not importable


def camera_matrix(fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    """3x3 pinhole camera matrix K."""
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=np.float64)


def camera_matrix_from_hfov(width: int, height: int, hfov_deg: float) -> np.ndarray:
    """K of an ideal pinhole camera with square pixels and the principal point at the image centre."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not 0.0 < hfov_deg < 180.0:
        raise ValueError(f"hfov_deg must be within (0, 180) degrees, got {hfov_deg}")
    return CameraIntrinsics(width, height, hfov_deg).k


def _check_depth(depth: np.ndarray, K: np.ndarray, stride: int) -> tuple[np.ndarray, np.ndarray]:
    depth = np.asarray(depth)
    if depth.ndim != 2:
        raise ValueError(f"depth must be HxW, got shape {depth.shape}")
    if int(stride) < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    return depth, _check_k(K)


def _check_k(K: np.ndarray) -> np.ndarray:
    K = np.asarray(K, dtype=np.float64)
    if K.shape != (3, 3) or not np.isfinite(K).all() or K[0, 0] <= 0 or K[1, 1] <= 0:
        raise ValueError(f"K must be a finite 3x3 camera matrix with positive fx, fy, got {K.tolist()}")
    return K


def tilt_homography(K: np.ndarray, pitch_rad: float) -> np.ndarray:
    """Pixel map ``K R K^-1`` from a camera to the same camera turned by ``pitch_rad`` about its x axis.

    Positive turns it nose down (REP 103 pitch): the point once straight ahead moves up the image.
    """
    K = _check_k(K)
    c, s = math.cos(pitch_rad), math.sin(pitch_rad)
    rotation = np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])  # optical frame: x right, y down, z ahead
    return K @ rotation @ np.linalg.inv(K)


def tilt_image(image: np.ndarray, K: np.ndarray, pitch_rad: float) -> np.ndarray:
    """``image`` as the camera turned by ``pitch_rad`` (see :func:`tilt_homography`) sees it; the rows that come
    from outside the frame are mirrored in."""
    import cv2

    height, width = image.shape[:2]
    return cv2.warpPerspective(np.ascontiguousarray(image), tilt_homography(K, pitch_rad), (width, height),
                               flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


def tilt_depth(depth: np.ndarray, K: np.ndarray, pitch_rad: float) -> np.ndarray:
    """A depth image (metres along the optical axis, NaN invalid) as the turned camera sees it, float32.

    Pixels move as in :func:`tilt_image` (nearest neighbour: a depth is never blended with another), and each
    depth is recomputed for the new axis: a pixel whose ray r (z = 1) came from the source ray s = R^T r sees its
    point at ``depth_source / s_z``. The rows that come from outside the frame are NaN.
    """
    import cv2

    depth = np.asarray(depth, dtype=np.float32)
    if depth.ndim != 2:
        raise ValueError(f"depth must be HxW, got shape {depth.shape}")
    K = _check_k(K)
    height, width = depth.shape
    warped = cv2.warpPerspective(np.ascontiguousarray(depth), tilt_homography(K, pitch_rad), (width, height),
                                 flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=float("nan"))
    rows = (np.arange(height, dtype=np.float64) - K[1, 2]) / K[1, 1]  # a ray's y at z = 1; x does not enter s_z
    source_z = math.cos(pitch_rad) - math.sin(pitch_rad) * rows  # (R^T r)_z
    return (warped / source_z[:, None]).astype(np.float32)


def canonical_map(K: np.ndarray, width: int, height: int, hfov_deg: float) -> np.ndarray | None:
    """2x3 affine from a camera's pixels to those of an ideal camera with ``hfov_deg`` at the same size.

    The ideal camera has square pixels and the principal point at the image centre; both share the optical axis,
    so depth along it is the same in both. None when the camera is that camera already (within 0.1 %).
    """
    K = _check_k(K)
    canonical = camera_matrix_from_hfov(width, height, hfov_deg)
    sx, sy = canonical[0, 0] / K[0, 0], canonical[1, 1] / K[1, 1]
    shift = (canonical[0, 2] - sx * K[0, 2], canonical[1, 2] - sy * K[1, 2])
    if abs(sx - 1) < 1e-3 and abs(sy - 1) < 1e-3 and max(abs(shift[0]), abs(shift[1])) < 1e-3 * width:
        return None
    return np.array([[sx, 0.0, shift[0]], [0.0, sy, shift[1]]], dtype=np.float64)


def to_canonical(image: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``image`` as the ideal camera of :func:`canonical_map` sees it (same size; the border it sees beyond the real
    frame is mirrored in, what it does not see is cropped)."""
    import cv2

    height, width = image.shape[:2]
    return cv2.warpAffine(np.ascontiguousarray(image), affine, (width, height), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT_101)


def from_canonical(depth: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """A depth image of the ideal camera back in the real camera's pixels (depth values unchanged), float32."""
    import cv2

    depth = np.asarray(depth, dtype=np.float32)
    height, width = depth.shape
    return cv2.warpAffine(np.ascontiguousarray(depth), affine, (width, height),
                          flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=float("nan"))


@lru_cache(maxsize=8)
def _rays(height: int, width: int, fx: float, fy: float, cx: float, cy: float, stride: int) -> np.ndarray:
    """(h, w, 2) float32 (x/z, y/z) of the sampled pixel centres; cached per camera and stride."""
    u = (np.arange(0, width, stride, dtype=np.float64) - cx) / fx
    v = (np.arange(0, height, stride, dtype=np.float64) - cy) / fy
    rays = np.empty((v.size, u.size, 2), dtype=np.float32)
    rays[..., 0] = u[None, :]
    rays[..., 1] = v[:, None]
    rays.setflags(write=False)
    return rays


def depth_to_points(depth: np.ndarray, K: np.ndarray, stride: int = 1) -> np.ndarray:
    """(N, 3) float32 points in the optical frame from an HxW depth image (metres along z, NaN invalid).

    Every ``stride``-th pixel in both directions is used; invalid (NaN, inf, <= 0) pixels are skipped.
    """
    depth, K = _check_depth(depth, K, stride)
    stride = int(stride)
    z = depth[::stride, ::stride].astype(np.float32, copy=False)
    rays = _rays(depth.shape[0], depth.shape[1], K[0, 0], K[1, 1], K[0, 2], K[1, 2], stride)
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(z) & (z > 0)
    zv = z[valid]
    points = np.empty((zv.size, 3), dtype=np.float32)
    points[:, 0] = rays[..., 0][valid] * zv
    points[:, 1] = rays[..., 1][valid] * zv
    points[:, 2] = zv
    return points


def _import_open3d():  # noqa: ANN202 - module or None
    global _open3d
    if _open3d is None:
        try:
            import open3d  # slow (~1.5 s), so only on first use

            _open3d = open3d
        except Exception:  # noqa: BLE001 - missing wheel (e.g. aarch64) or a broken GL dependency
            _open3d = False
    return _open3d or None


def voxel_downsample(points: np.ndarray, voxel_m: float, use_open3d: bool = False) -> np.ndarray:
    """Centroid of the points in each occupied voxel of side ``voxel_m`` as (M, 3) float32.

    numpy by default (faster here than open3d's ``voxel_down_sample`` and no 70 MiB import);
    ``use_open3d=True`` runs open3d's. Both put the voxel grid origin half a voxel below the
    points' minimum corner, so they agree voxel for voxel. ``voxel_m <= 0`` returns the points.
    """
    points = np.asarray(points, dtype=np.float32)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must be (N, 3), got shape {points.shape}")
    if voxel_m <= 0 or len(points) == 0:
        return points
    if use_open3d:
        o3d = _import_open3d()
        if o3d is None:
            raise RuntimeError("open3d requested for voxel_downsample but it is not importable")
        cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points.astype(np.float64)))
        return np.asarray(cloud.voxel_down_sample(float(voxel_m)).points, dtype=np.float32)
    pts = points.astype(np.float64)
    origin = pts.min(axis=0) - 0.5 * voxel_m
    cells = np.floor((pts - origin) / voxel_m).astype(np.int64)
    # one int64 key per voxel: a 1-D unique is ~10x faster than np.unique(axis=0)
    dims = cells.max(axis=0) + 1
    keys = (cells[:, 0] * dims[1] + cells[:, 1]) * dims[2] + cells[:, 2]
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    sums = np.stack([np.bincount(inverse, weights=pts[:, i], minlength=counts.size) for i in range(3)], axis=1)
    return (sums / counts[:, None]).astype(np.float32)


@dataclass(frozen=True)
class ScanLayout:
    """Bearings of a LaserScan: ``angle_min + i * angle_increment`` for ``i < count`` (radians, REP 103)."""

    angle_min: float
    angle_max: float
    angle_increment: float
    count: int


def scan_layout(
    K: np.ndarray,
    width: int,
    angle_min: float | None = None,
    angle_max: float | None = None,
    angle_increment: float | None = None,
) -> ScanLayout:
    """Bearings covering the camera's horizontal field of view unless given.

    The image's left edge (u = 0) is at ``+atan(cx / fx)``, its right edge at ``-atan((W-1-cx) / fx)``;
    the default increment is one pixel at the image centre. ``angle_max`` is snapped down to the last
    bearing so that ``angle_min + (count - 1) * angle_increment == angle_max``.
    """
    K = _check_k(K)
    fx, cx = K[0, 0], K[0, 2]
    lo = -math.atan2(width - 1 - cx, fx) if angle_min is None else float(angle_min)
    hi = math.atan2(cx, fx) if angle_max is None else float(angle_max)
    inc = math.atan2(1.0, fx) if angle_increment is None or angle_increment <= 0 else float(angle_increment)
    if not hi > lo:
        raise ValueError(f"angle_max ({hi}) must be greater than angle_min ({lo})")
    count = int(math.floor((hi - lo) / inc + 1e-9)) + 1
    return ScanLayout(lo, lo + (count - 1) * inc, inc, count)


def depth_to_scan(
    depth: np.ndarray,
    K: np.ndarray,
    camera_height_m: float = 0.20,
    camera_pitch_rad: float = 0.0,
    ground_clearance_m: float = 0.05,
    max_obstacle_height_m: float = 1.0,
    angle_min: float | None = None,
    angle_max: float | None = None,
    angle_increment: float | None = None,
    range_min: float = 0.28,
    range_max: float = 10.0,
    stride: int = 1,
) -> np.ndarray:
    """Nearest obstacle per bearing (float32 ranges, +inf = none) from a depth image, ground removed.

    A point's height above the ground plane is ``camera_height_m`` plus its height along gravity
    relative to the camera (the camera pitched down by ``camera_pitch_rad``, REP 103 sign: positive
    pitch looks down). Points lower than ``ground_clearance_m`` are ground, points higher than
    ``max_obstacle_height_m`` (canopy, branches the rover passes under) are ignored. Ranges are
    horizontal distances; those outside ``[range_min, range_max]`` are dropped. Bearings follow
    :func:`scan_layout` (see the module docstring for the frame).
    """
    depth, K = _check_depth(depth, K, stride)
    layout = scan_layout(K, depth.shape[1], angle_min, angle_max, angle_increment)
    stride = int(stride)
    fx, fy, cx, cy = (float(v) for v in (K[0, 0], K[1, 1], K[0, 2], K[1, 2]))
    bins = _scan_bins(depth.shape, fx, fy, cx, cy, stride, float(camera_pitch_rad), layout)
    z = depth[::stride, ::stride].ravel()[bins.pixels].astype(np.float32, copy=False)
    horizontal = z * bins.horizontal
    height = camera_height_m + z * bins.up
    with np.errstate(invalid="ignore"):
        keep = (
            (z > 0)
            & (height >= ground_clearance_m)
            & (height <= max_obstacle_height_m)
            & (horizontal >= range_min)
            & (horizontal <= range_max)
        )  # NaN compares False: invalid pixels drop out here
    values = np.where(keep, horizontal, np.float32(np.inf))
    ranges = np.full(layout.count, np.inf, dtype=np.float32)
    if len(values):
        ranges[bins.occupied] = np.minimum.reduceat(values, bins.starts)
    return ranges


@dataclass(frozen=True)
class _ScanBins:
    """Per-pixel scan geometry of one camera, pitch and layout, grouped by bearing bin."""

    pixels: np.ndarray  # flat indices of the (strided) pixels inside the layout, sorted by bin
    horizontal: np.ndarray  # horizontal distance per metre of optical z
    up: np.ndarray  # height above the camera along gravity per metre of optical z
    starts: np.ndarray  # first position of each occupied bin in ``pixels``
    occupied: np.ndarray  # the occupied bins


@lru_cache(maxsize=8)
def _scan_bins(
    shape: tuple[int, int], fx: float, fy: float, cx: float, cy: float, stride: int, pitch: float, layout: ScanLayout
) -> _ScanBins:
    # a pixel's point is z * (ray); its bearing and the ratios of its horizontal distance and height to z
    # do not depend on z, so they are computed once per camera and every frame is a gather and a reduceat
    a = (np.arange(0, shape[1], stride, dtype=np.float64) - cx) / fx  # optical x / z
    b = (np.arange(0, shape[0], stride, dtype=np.float64) - cy) / fy  # optical y / z
    a, b = np.meshgrid(a, b)
    fwd, left, up = np.ones_like(a), -a, -b  # camera_link (x forward, y left, z up) per metre of z
    c, s = math.cos(pitch), math.sin(pitch)
    fwd, up = c * fwd + s * up, -s * fwd + c * up  # levelled: positive pitch tilts forward down
    bearing = np.arctan2(left, fwd).ravel()
    index = np.rint((bearing - layout.angle_min) / layout.angle_increment).astype(np.int64)
    # points behind the camera's vertical plane (only when pitched past the horizon) have no bearing here
    inside = np.flatnonzero((index >= 0) & (index < layout.count) & (fwd.ravel() > 0))
    order = inside[np.argsort(index[inside], kind="stable")]
    occupied, starts = np.unique(index[order], return_index=True)
    return _ScanBins(
        pixels=order,
        horizontal=np.hypot(fwd, left).ravel()[order].astype(np.float32),
        up=up.ravel()[order].astype(np.float32),
        starts=starts,
        occupied=occupied,
    )
