"""What depth_node does with a camera frame, without ROS: network, range mask, cloud, scan and health.

The node hands frames to :func:`predict_depth`, then :func:`depth_points` and :func:`depth_scan`
(:mod:`forest_perception.depth_geometry`), keeps its camera matrix in :class:`CameraModel` and its
counters and latency windows in :class:`DepthStats`.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Protocol

import numpy as np

from forest_perception import depth_geometry
from forest_perception.diagnostics import ERROR, OK, WARN
from forest_perception.frames import CAMERA_HFOV_DEG


class DepthEngineLike(Protocol):
    """What the pipeline needs of ``forest_perception.inference.DepthEngine``."""

    model_version: str
    backend: str

    def predict(self, rgb: np.ndarray) -> np.ndarray:
        """HxW float32 metres (NaN invalid) from an HxWx3 uint8 RGB image."""
        ...


@dataclass(frozen=True)
class DepthSettings:
    """How a predicted depth image is masked and turned into a cloud and a scan (depth_node's parameters)."""

    min_depth_m: float = 0.28
    max_depth_m: float = 10.0
    min_valid_fraction: float = 0.2
    max_latency_ms: float = 250.0
    publish_points: bool = True
    voxel_size_m: float = 0.05
    point_stride: int = 2
    publish_scan: bool = True
    scan_angle_increment_rad: float = 0.0
    scan_range_min_m: float = 0.28
    scan_range_max_m: float = 10.0
    scan_ground_clearance_m: float = 0.05
    scan_max_obstacle_height_m: float = 1.0
    scan_stride: int = 1
    camera_height_m: float = 0.20
    camera_pitch_rad: float = 0.0
    rectify_pitch: bool = False
    model_hfov_deg: float = CAMERA_HFOV_DEG
    flip_average: bool = False
    fallback_hfov_deg: float = 69.4

    @classmethod
    def from_parameters(cls, values: Mapping[str, Any]) -> DepthSettings:
        """The settings among a node's parameter values (other keys are ignored)."""
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})

    def problem(self) -> str:
        """Why these settings cannot work together ("" when they can)."""
        if 0.0 < self.model_hfov_deg < 10.0:
            return f"model_hfov_deg ({self.model_hfov_deg}) must be 0 (off) or within 10..170 degrees"
        if self.min_depth_m >= self.max_depth_m:
            return f"min_depth_m ({self.min_depth_m}) must be below max_depth_m ({self.max_depth_m})"
        if self.scan_range_min_m >= self.scan_range_max_m:
            return (f"scan_range_min_m ({self.scan_range_min_m}) must be below "
                    f"scan_range_max_m ({self.scan_range_max_m})")
        return ""


def synthetic_forest_image(height: int = 240, width: int = 320, seed: int = 0) -> np.ndarray:
    """A real-looking forest frame (sky, canopy, ground, trunks, texture noise) as rgb8, for export checks."""
    rng = np.random.default_rng(seed)
    rows = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    sky = np.array([170, 190, 210], np.float32)
    canopy = np.array([40, 80, 35], np.float32)
    ground = np.array([90, 70, 45], np.float32)
    image = np.where(rows < 0.25, sky + (canopy - sky) * rows * 4, canopy)
    image = np.where(rows > 0.55, ground * (0.7 + 0.6 * rows), image) * np.ones((1, width, 1), np.float32)
    for _ in range(6):
        centre, half = rng.integers(0, width), rng.integers(3, max(4, width // 20))
        image[: int(height * rng.uniform(0.6, 0.95)), max(0, centre - half): centre + half] = (60, 45, 30)
    image += rng.normal(0.0, 12.0, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


class FlipAveragedEngine:
    """An engine whose depth is the geometric mean of ``engine``'s on the frame and the mirror of its depth on the
    mirrored frame (flip averaging): better on forests the network never saw, at twice the network's time.

    Where only one of the two is valid (inside the engine's depth range) that one is kept. ``last_latency_ms`` is
    the two passes' together; every other attribute is the engine's.
    """

    def __init__(self, engine: DepthEngineLike) -> None:
        self.engine = engine
        self.last_latency_ms = math.nan

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["engine"], name)

    def predict(self, rgb: np.ndarray) -> np.ndarray:
        """HxW float32 metres (NaN invalid) from an HxWx3 uint8 RGB image, averaged with the mirrored frame's."""
        times = []
        outputs = []
        for frame in (rgb, np.ascontiguousarray(rgb[:, ::-1])):
            t0 = time.perf_counter()
            outputs.append(np.asarray(self.engine.predict(frame), dtype=np.float32))
            spent = float(getattr(self.engine, "last_latency_ms", math.nan))
            times.append(spent if math.isfinite(spent) else (time.perf_counter() - t0) * 1e3)
        self.last_latency_ms = sum(times)
        direct, mirrored = outputs[0], outputs[1][:, ::-1]
        with np.errstate(invalid="ignore"):
            both = np.sqrt(direct * mirrored)
        return np.where(np.isnan(direct), mirrored, np.where(np.isnan(mirrored), direct, both)).astype(np.float32)


def predict_depth(engine: DepthEngineLike, rgb: np.ndarray, settings: DepthSettings,
                  K: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Depth in metres (NaN outside ``[min_depth_m, max_depth_m]``) and the network's latency in ms.

    ``K`` is the camera's (default: from ``fallback_hfov_deg``). With ``settings.model_hfov_deg`` (the field of view
    the network was trained with; 0: off) a camera of another field of view or principal point is shown to the
    network as that camera would see the scene (``depth_geometry.to_canonical``), and the depth mapped back: a
    network reads distance from apparent size, which a narrower lens inflates. With ``settings.rectify_pitch`` and a
    ``camera_pitch_rad`` the network sees the frame as a level camera would (``tilt_image`` by minus the pitch) and
    its depth is turned back into the real camera (``tilt_depth``). Pixels these views do not hold are NaN. With
    ``settings.flip_average`` the network runs twice (``FlipAveragedEngine``) and the latency is both passes'.
    """
    if settings.flip_average:
        engine = FlipAveragedEngine(engine)
    pitch = settings.camera_pitch_rad if settings.rectify_pitch else 0.0
    height, width = rgb.shape[:2]
    if K is None:
        K = depth_geometry.camera_matrix_from_hfov(width, height, settings.fallback_hfov_deg)
    network_rgb = depth_geometry.tilt_image(rgb, K, -pitch) if pitch else rgb
    affine = (depth_geometry.canonical_map(K, width, height, settings.model_hfov_deg)
              if settings.model_hfov_deg else None)
    if affine is not None:
        network_rgb = depth_geometry.to_canonical(network_rgb, affine)
    t0 = time.perf_counter()
    depth = np.asarray(engine.predict(network_rgb), dtype=np.float32)
    predict_ms = (time.perf_counter() - t0) * 1e3
    # the network alone when the engine says (DepthEngine.last_latency_ms), else the whole predict()
    inference_ms = float(getattr(engine, "last_latency_ms", predict_ms))
    inference_ms = inference_ms if math.isfinite(inference_ms) else predict_ms
    if depth.shape != rgb.shape[:2]:
        raise ValueError(f"engine returned depth of shape {depth.shape}, expected {rgb.shape[:2]}")
    if affine is not None:
        depth = depth_geometry.from_canonical(depth, affine)
    if pitch:
        depth = depth_geometry.tilt_depth(depth, K, pitch)
    with np.errstate(invalid="ignore"):
        inside = (depth >= settings.min_depth_m) & (depth <= settings.max_depth_m)
    return np.where(inside, depth, np.float32(np.nan)), inference_ms


def valid_fraction(depth: np.ndarray) -> float:
    """Share of pixels with a depth (not NaN)."""
    return float(np.isfinite(depth).mean()) if depth.size else 0.0


def check_candidate(engine: DepthEngineLike, frame: np.ndarray, settings: DepthSettings) -> str:
    """Why a freshly loaded model must not replace the running one ("" if it may), from one frame.

    The depth must have the frame's size, no inf, and at least ``min_valid_fraction`` of its pixels
    inside ``[min_depth_m, max_depth_m]`` with some spread: a network that is not a depth network
    (a single convolution, all NaN, a constant) fails here instead of going live.
    """
    try:
        raw = np.asarray(engine.predict(frame), dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - any failure on a good frame disqualifies the model
        return f"it fails on a reference frame ({type(exc).__name__}: {exc})"
    if raw.shape != frame.shape[:2]:
        return f"its depth has shape {raw.shape} for a {frame.shape[1]}x{frame.shape[0]} frame"
    if np.isinf(raw).any():
        return "its depth holds inf values (invalid depth must be NaN, REP 118)"
    # the network's own output: its range mask only, not the camera views of model_hfov_deg or rectify_pitch
    depth, _ = predict_depth(_Fixed(raw), frame, replace(settings, model_hfov_deg=0.0, rectify_pitch=False,
                                                         flip_average=False))
    valid = valid_fraction(depth)
    if valid < settings.min_valid_fraction:
        return (f"only {100 * valid:.0f} % of a reference frame gets a depth within [{settings.min_depth_m}, "
                f"{settings.max_depth_m}] m (min_valid_fraction {settings.min_valid_fraction})")
    if float(np.nanstd(depth)) < 1e-4:  # one value everywhere (zero weights): no depth network
        return f"it predicts a constant {float(np.nanmedian(depth)):.3f} m on a reference frame"
    return ""


class _Fixed:
    """An engine that returns a depth computed already (to reuse :func:`predict_depth`'s masking)."""

    def __init__(self, depth: np.ndarray) -> None:
        self._depth = depth

    def predict(self, rgb: np.ndarray) -> np.ndarray:  # noqa: ARG002 - same signature as an engine
        """The fixed depth."""
        return self._depth


def depth_points(depth: np.ndarray, K: np.ndarray, settings: DepthSettings) -> np.ndarray:
    """The (N, 3) optical-frame cloud of a depth image, every ``point_stride`` pixel, voxel-filtered."""
    points = depth_geometry.depth_to_points(depth, K, settings.point_stride)
    return depth_geometry.voxel_downsample(points, settings.voxel_size_m)


def depth_scan(depth: np.ndarray, K: np.ndarray, settings: DepthSettings
               ) -> tuple[np.ndarray, depth_geometry.ScanLayout]:
    """Nearest obstacle per bearing (ground and canopy removed) and the scan's bearings."""
    layout = depth_geometry.scan_layout(K, depth.shape[1], angle_increment=settings.scan_angle_increment_rad)
    ranges = depth_geometry.depth_to_scan(
        depth, K, camera_height_m=settings.camera_height_m, camera_pitch_rad=settings.camera_pitch_rad,
        ground_clearance_m=settings.scan_ground_clearance_m,
        max_obstacle_height_m=settings.scan_max_obstacle_height_m, angle_increment=layout.angle_increment,
        range_min=settings.scan_range_min_m, range_max=settings.scan_range_max_m, stride=settings.scan_stride,
    )
    return ranges, layout


def scan_frame_id(image_frame: str, scan_frame: str) -> str:
    """``scan_frame`` with the image frame's prefix (sim_node ``frame_prefix``: ``rover_0/...``)."""
    prefix, sep, _ = image_frame.rpartition("/")
    return f"{prefix}{sep}{scan_frame}" if sep and "/" not in scan_frame else scan_frame


class CameraModel:
    """The camera matrix for a depth image: from camera_info when one arrived, else from a field of view."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._K: np.ndarray | None = None
        self._size: tuple[int, int] | None = None

    def set_info(self, K: np.ndarray, width: int, height: int) -> None:
        """Keep the K of a camera_info for images of ``width`` x ``height``."""
        with self._lock:
            self._K, self._size = np.asarray(K, dtype=np.float64), (int(width), int(height))

    @property
    def has_info(self) -> bool:
        """True once a camera_info arrived."""
        with self._lock:
            return self._K is not None

    def matrix(self, width: int, height: int, fallback_hfov_deg: float) -> np.ndarray:
        """K for an image of this size: camera_info's, scaled to another resolution of the same camera."""
        with self._lock:
            K, size = self._K, self._size
        if K is None:
            return depth_geometry.camera_matrix_from_hfov(width, height, fallback_hfov_deg)
        if size != (width, height):
            K = K.copy()
            K[0] *= width / size[0]
            K[1] *= height / size[1]
        return K


def _percentile(values: deque[float], q: float) -> float:
    return float(np.percentile(np.fromiter(values, dtype=np.float64), q)) if values else 0.0


class DepthStats:
    """Frame counters and latency windows of a depth node, safe to update from several threads."""

    COUNTERS = ("received", "processed", "skipped", "malformed", "inference_errors")

    def __init__(self, window: int = 200) -> None:
        self._lock = threading.Lock()
        self.counts = dict.fromkeys(self.COUNTERS, 0)
        self.last_error = ""
        self._latency_ms: deque[float] = deque(maxlen=window)
        self._stamp_latency_ms: deque[float] = deque(maxlen=window)
        self._inference_ms: deque[float] = deque(maxlen=window)
        self._published: deque[float] = deque(maxlen=window)
        self._valid: deque[float] = deque(maxlen=window)

    def count(self, counter: str, error: str = "") -> None:
        """One more of ``counter``; ``error`` becomes the last error when given."""
        with self._lock:
            self.counts[counter] += 1
            if error:
                self.last_error = error

    def processed(self, inference_ms: float, latency_ms: float, stamp_latency_ms: float, now: float,
                  valid: float = 1.0) -> None:
        """A frame's depth went out: network time, receipt-to-publish and stamp-to-publish latency, and
        the share of its pixels with a depth."""
        with self._lock:
            self.counts["processed"] += 1
            self._valid.append(valid)
            self._inference_ms.append(inference_ms)
            self._latency_ms.append(latency_ms)
            self._stamp_latency_ms.append(stamp_latency_ms)
            self._published.append(now)

    def values(self, now: float | None = None) -> dict[str, Any]:
        """Rate, latency percentiles and counters for /diagnostics."""
        now = time.monotonic() if now is None else now
        with self._lock:
            published = list(self._published)
            rate = ((len(published) - 1) / (published[-1] - published[0])
                    if len(published) >= 2 and published[-1] > published[0] else 0.0)
            if published and now - published[-1] > 5.0:
                rate = 0.0  # stalled: the window holds only old frames
            values: dict[str, Any] = {
                "rate_hz": rate,
                "latency_ms_p50": _percentile(self._latency_ms, 50),
                "latency_ms_p95": _percentile(self._latency_ms, 95),
                "stamp_to_publish_ms_p50": _percentile(self._stamp_latency_ms, 50),
                "stamp_to_publish_ms_p95": _percentile(self._stamp_latency_ms, 95),
                "inference_ms_p50": _percentile(self._inference_ms, 50),
                "inference_ms_p95": _percentile(self._inference_ms, 95),
                "valid_fraction": float(np.mean(self._valid)) if self._valid else 0.0,
            }
            values.update({f"frames_{name}" if name != "inference_errors" else name: count
                           for name, count in self.counts.items()})
            values["last_error"] = self.last_error
        return values


def depth_health(engine_loaded: bool, engine_error: str, camera_info: bool, values: Mapping[str, Any],
                 settings: DepthSettings) -> tuple[bytes, str]:
    """(level, message) of a depth node from its :meth:`DepthStats.values`.

    ERROR: no model, or depth for fewer than a quarter of ``min_valid_fraction`` of the pixels
    (the model sees nothing it knows). WARN: the valid share below ``min_valid_fraction``, the
    stamp-to-publish p95 above ``max_latency_ms``, or K from the fallback field of view.
    """
    if not engine_loaded:
        return ERROR, engine_error or "no model loaded"
    if not values["frames_processed"]:
        return OK, "waiting for camera frames"
    valid, band = values["valid_fraction"], settings.min_valid_fraction
    if valid < 0.25 * band:
        return ERROR, f"depth for only {100 * valid:.1f} % of the pixels (expected >= {100 * band:.0f} %)"
    if valid < band:
        return WARN, f"depth for only {100 * valid:.0f} % of the pixels (expected >= {100 * band:.0f} %)"
    latency = values["stamp_to_publish_ms_p95"]
    if settings.max_latency_ms > 0 and latency > settings.max_latency_ms:
        return WARN, f"stamp-to-publish p95 {latency:.0f} ms is above max_latency_ms {settings.max_latency_ms:.0f}"
    if not camera_info:
        return WARN, "no camera_info: K from fallback_hfov_deg"
    return OK, "running"
