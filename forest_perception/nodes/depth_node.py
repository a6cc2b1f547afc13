"""depth_node: monocular depth from the rover camera, with its point cloud and a laser scan.

Subscribes ``camera/image_raw`` (rgb8, bgr8, rgba8, bgra8 or mono8) and ``camera/camera_info``;
publishes ``depth/image`` (32FC1 metres along the optical z axis, NaN invalid, the image's stamp
and frame), ``depth/points`` (PointCloud2 in the image's optical frame, voxel-downsampled),
``depth/scan`` (LaserScan in ``camera_link``: x forward, y left, nearest obstacle per bearing,
ground and canopy removed, +inf = no return) and ``/diagnostics``.

It keeps up in real time instead of queueing: the image callback only keeps the newest frame
(the one it replaces is counted as skipped) and a worker thread runs the network on the newest
frame. Changing ``model_path`` (or ``backend``, ``providers``, ``threads``) at run time loads the
new engine first and swaps it in atomically; a file that does not load is refused with the
loader's reason and the old engine keeps running. Malformed images are dropped and counted.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rcl_interfaces.msg import (
    SetParametersResult,
)
from rclpy.node import Node
from rclpy.qos import QoSProfile, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, Image, LaserScan, PointCloud2

from forest_perception import depth_geometry, msgs
from forest_perception.frames import FRAME_CAMERA
from forest_perception.inference import SUPPORTED_ENCODINGS, ModelLoadError, convert_image_encoding, load_engine
from forest_perception.nodes.common import (
    declare_parameters,
    float_range,
    int_range,
    publish_node_diagnostics,
    run_node,
)

BACKENDS = ("auto", "onnxruntime", "torch")
COLOUR_ENCODINGS = SUPPORTED_ENCODINGS


class DepthEngineLike(Protocol):
    """What the node needs of ``forest_perception.inference.DepthEngine``."""

    model_version: str
    backend: str

    def predict(self, rgb: np.ndarray) -> np.ndarray:
        """HxW float32 metres (NaN invalid) from an HxWx3 uint8 RGB image."""
        ...


EngineLoader = Callable[[str, str, tuple[str, ...], int], DepthEngineLike]


def load_inference_engine(path: str, backend: str, providers: tuple[str, ...], threads: int) -> DepthEngineLike:
    """The default loader: :func:`forest_perception.inference.load_engine` (raises ``ModelLoadError``)."""
    if not path:
        raise ModelLoadError("model_path is empty: set it to an exported .onnx model or a .pt checkpoint")
    return load_engine(path, backend=backend, providers=tuple(providers), threads=int(threads))


def _percentile(values: deque[float], q: float) -> float:
    return float(np.percentile(np.fromiter(values, dtype=np.float64), q)) if values else 0.0


_READ_ONLY = ("diagnostics_period_s",)
# parameters that make the engine reload when they change
_ENGINE_PARAMS = ("model_path", "backend", "providers", "threads")


class DepthNode(Node):
    """Thin ROS wrapper over a depth engine and :mod:`forest_perception.depth_geometry`."""

    def __init__(self, engine_loader: EngineLoader | None = None, **kwargs: Any) -> None:
        super().__init__("depth_node", **kwargs)
        self._loader: EngineLoader = engine_loader or load_inference_engine
        self.p = self._declare_parameters()
        self._lock = threading.Lock()  # guards the newest-frame slot, the engine and the counters
        self._wake = threading.Condition(self._lock)
        self._pending: tuple[np.ndarray, Image, float] | None = None
        self._engine: DepthEngineLike | None = None
        self._engine_error = ""
        self._K: np.ndarray | None = None
        self._info_size: tuple[int, int] | None = None
        self._warned_fallback = False
        self.counts = {"received": 0, "processed": 0, "skipped": 0, "malformed": 0, "inference_errors": 0}
        self.last_error = ""
        self._latency_ms: deque[float] = deque(maxlen=200)
        self._stamp_latency_ms: deque[float] = deque(maxlen=200)
        self._inference_ms: deque[float] = deque(maxlen=200)
        self._published: deque[float] = deque(maxlen=200)

        try:
            self._engine = self._load(self.p["model_path"], self.p["backend"], self.p["providers"], self.p["threads"])
            self.get_logger().info(
                f"model {self.p['model_path']} ({self._engine.model_version}, {self._engine.backend}) loaded"
            )
        except Exception as exc:  # noqa: BLE001 - start anyway: a valid model_path can be set at run time
            self._engine_error = f"no model loaded: {exc}"
            self.get_logger().error(f"{self._engine_error}; processing nothing until a valid model_path is set")

        sensor = qos_profile_sensor_data
        self.depth_pub = self.create_publisher(Image, "depth/image", sensor)
        self.points_pub = self.create_publisher(PointCloud2, "depth/points", sensor)
        self.scan_pub = self.create_publisher(LaserScan, "depth/scan", sensor)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", QoSProfile(depth=10))
        self.create_subscription(Image, "camera/image_raw", self._on_image, sensor)
        self.create_subscription(CameraInfo, "camera/camera_info", self._on_camera_info, sensor)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.create_timer(self.p["diagnostics_period_s"], self._publish_diagnostics)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="depth_worker", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- parameters
    def _declare_parameters(self) -> dict:
        specs = [
            ("model_path", "", "exported depth model (.onnx or torch); changing it hot-swaps the model", None),
            ("backend", "auto", f"inference backend: {list(BACKENDS)}", None),
            ("providers", ["CPUExecutionProvider"], "onnxruntime execution providers, in order", None),
            ("threads", 2, "intra-op threads of the inference backend", int_range(1, 16)),
            ("min_depth_m", 0.28, "predicted depth below this is invalid (NaN)", float_range(0.0, 100.0)),
            ("max_depth_m", 10.0, "predicted depth beyond this is invalid (NaN)", float_range(0.1, 1000.0)),
            ("publish_points", True, "publish depth/points", None),
            ("voxel_size_m", 0.05, "voxel side of the published cloud; 0 publishes every point", float_range(0.0, 5.0)),
            ("point_stride", 2, "use every n-th pixel in each direction for the cloud", int_range(1, 64)),
            ("publish_scan", True, "publish depth/scan", None),
            ("scan_frame_id", FRAME_CAMERA, "LaserScan frame (x forward, y left, z up, level)", None),
            ("scan_angle_increment_rad", 0.0, "bearing step; 0 = one pixel at the image centre", float_range(0.0, 0.5)),
            ("scan_range_min_m", 0.28, "scan range_min (closer points are dropped)", float_range(0.0, 100.0)),
            ("scan_range_max_m", 10.0, "scan range_max (farther points are dropped)", float_range(0.1, 1000.0)),
            ("scan_ground_clearance_m", 0.05, "points lower than this above the ground are ground", float_range(0, 2)),
            ("scan_max_obstacle_height_m", 1.0, "points higher than this (canopy) are ignored", float_range(0.0, 50.0)),
            ("scan_stride", 1, "use every n-th pixel in each direction for the scan", int_range(1, 16)),
            ("camera_height_m", 0.20, "optical centre height above the ground", float_range(0.0, 10.0)),
            ("camera_pitch_rad", 0.0, "camera pitch, positive looking down (REP 103)", float_range(-1.5, 1.5)),
            ("fallback_hfov_deg", 69.4, "horizontal FOV used until camera_info arrives", float_range(10.0, 170.0)),
            ("diagnostics_period_s", 1.0, "period of /diagnostics (read-only)", float_range(0.1, 60.0)),
        ]
        values = declare_parameters(self, specs, _READ_ONLY)
        values["providers"] = tuple(values["providers"])
        if values["backend"] not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {values['backend']!r}")
        if values["min_depth_m"] >= values["max_depth_m"]:
            lo, hi = values["min_depth_m"], values["max_depth_m"]
            raise ValueError(f"min_depth_m ({lo}) must be below max_depth_m ({hi})")
        return values

    def _load(self, path: str, backend: str, providers: tuple[str, ...], threads: int) -> DepthEngineLike:
        return self._loader(str(path), str(backend), tuple(providers), int(threads))

    def _on_set_parameters(self, params: list) -> SetParametersResult:
        new = dict(self.p)
        for param in params:
            new[param.name] = tuple(param.value) if param.name == "providers" else param.value
        if new["backend"] not in BACKENDS:
            return SetParametersResult(successful=False, reason=f"backend must be one of {list(BACKENDS)}")
        if new["min_depth_m"] >= new["max_depth_m"]:
            return SetParametersResult(successful=False, reason="min_depth_m must be below max_depth_m")
        if new["scan_range_min_m"] >= new["scan_range_max_m"]:
            return SetParametersResult(successful=False, reason="scan_range_min_m must be below scan_range_max_m")
        engine = None
        if any(new[k] != self.p[k] for k in _ENGINE_PARAMS):
            # load before accepting: a bad file is refused and the running engine stays
            try:
                engine = self._load(new["model_path"], new["backend"], new["providers"], new["threads"])
            except Exception as exc:  # noqa: BLE001 - any loader failure becomes the refusal's reason
                reason = f"model_path {new['model_path']!r} not loaded ({type(exc).__name__}: {exc})"
                self.get_logger().warning(f"refused: {reason}; keeping the running model")
                return SetParametersResult(successful=False, reason=reason)
        with self._lock:
            self.p = new
            if engine is not None:
                self._engine, self._engine_error = engine, ""
        if engine is not None:
            self.get_logger().info(f"model swapped to {new['model_path']} ({engine.model_version}, {engine.backend})")
        return SetParametersResult(successful=True)

    # ---------------------------------------------------------------- input
    def _on_camera_info(self, msg: CameraInfo) -> None:
        try:
            K = msgs.camera_matrix_from_info(msg)
        except ValueError as exc:
            self._count_malformed(f"camera_info: {exc}")
            return
        with self._lock:
            self._K, self._info_size = K, (int(msg.width), int(msg.height))

    def _count_malformed(self, error: str) -> None:
        with self._lock:
            self.counts["malformed"] += 1
            self.last_error = error
        self.get_logger().warning(f"dropped: {error}", throttle_duration_sec=5.0)

    def _on_image(self, msg: Image) -> None:
        received = time.monotonic()
        try:
            if msg.encoding not in COLOUR_ENCODINGS:
                raise ValueError(f"unsupported encoding {msg.encoding!r}, expected one of {list(COLOUR_ENCODINGS)}")
            rgb = convert_image_encoding(msgs.array_from_image(msg), msg.encoding)
        except ValueError as exc:
            self._count_malformed(f"image: {exc}")
            return
        with self._wake:
            self.counts["received"] += 1
            if self._pending is not None:
                self.counts["skipped"] += 1  # never queue: the newer frame replaces it
            self._pending = (rgb, msg, received)
            self._wake.notify()

    # ---------------------------------------------------------------- worker
    def _run(self) -> None:
        if self.p["publish_points"]:
            # open3d's first import takes ~1.5 s: here, not on the first frame
            depth_geometry.voxel_downsample(np.zeros((2, 3), np.float32), 0.1)
        while not self._stop.is_set():
            with self._wake:
                if self._pending is None:
                    self._wake.wait(timeout=0.1)
                frame, self._pending = self._pending, None
                engine, p = self._engine, self.p
            if frame is None:
                continue
            if engine is None:
                with self._lock:
                    self.counts["skipped"] += 1  # no model: nothing to run it on
                continue
            try:
                self._process(engine, p, *frame)
            except Exception as exc:  # noqa: BLE001 - a bad frame or engine hiccup must not end the worker
                with self._lock:
                    self.counts["inference_errors"] += 1
                    self.last_error = f"inference: {type(exc).__name__}: {exc}"
                self.get_logger().error(self.last_error, throttle_duration_sec=5.0)
            if not rclpy.ok(context=self.context):
                break

    def _camera_matrix(self, width: int, height: int, hfov_deg: float) -> np.ndarray:
        with self._lock:
            K, size = self._K, self._info_size
        if K is None:
            if not self._warned_fallback:
                self._warned_fallback = True
                self.get_logger().warning(f"no camera_info yet: using fallback_hfov_deg={hfov_deg}")
            return depth_geometry.camera_matrix_from_hfov(width, height, hfov_deg)
        if size != (width, height):  # info for another resolution of the same camera
            K = K.copy()
            K[0] *= width / size[0]
            K[1] *= height / size[1]
        return K

    def _process(self, engine: DepthEngineLike, p: dict, rgb: np.ndarray, msg: Image, received: float) -> None:
        t0 = time.perf_counter()
        depth = np.asarray(engine.predict(rgb), dtype=np.float32)
        predict_ms = (time.perf_counter() - t0) * 1e3
        # the network alone when the engine says (DepthEngine.last_latency_ms), else the whole predict()
        inference_ms = float(getattr(engine, "last_latency_ms", predict_ms))
        inference_ms = inference_ms if math.isfinite(inference_ms) else predict_ms
        if depth.shape != rgb.shape[:2]:
            raise ValueError(f"engine returned depth of shape {depth.shape}, expected {rgb.shape[:2]}")
        with np.errstate(invalid="ignore"):
            depth = np.where((depth >= p["min_depth_m"]) & (depth <= p["max_depth_m"]), depth, np.float32(np.nan))
        stamp, frame_id = msg.header.stamp, msg.header.frame_id
        self.depth_pub.publish(msgs.image_from_array(depth, "32FC1", stamp, frame_id))
        # latency ends when depth/image is out; points and scan follow on the same frame
        now = time.monotonic()
        stamp_ms = (self.get_clock().now().nanoseconds - (stamp.sec * 1_000_000_000 + stamp.nanosec)) * 1e-6
        if p["publish_points"] or p["publish_scan"]:
            K = self._camera_matrix(depth.shape[1], depth.shape[0], p["fallback_hfov_deg"])
        if p["publish_points"]:
            points = depth_geometry.depth_to_points(depth, K, p["point_stride"])
            points = depth_geometry.voxel_downsample(points, p["voxel_size_m"])
            self.points_pub.publish(msgs.pointcloud2_msg(points, stamp, frame_id))
        if p["publish_scan"]:
            layout = depth_geometry.scan_layout(K, depth.shape[1], angle_increment=p["scan_angle_increment_rad"])
            ranges = depth_geometry.depth_to_scan(
                depth,
                K,
                camera_height_m=p["camera_height_m"],
                camera_pitch_rad=p["camera_pitch_rad"],
                ground_clearance_m=p["scan_ground_clearance_m"],
                max_obstacle_height_m=p["scan_max_obstacle_height_m"],
                angle_increment=layout.angle_increment,
                range_min=p["scan_range_min_m"],
                range_max=p["scan_range_max_m"],
                stride=p["scan_stride"],
            )
            self.scan_pub.publish(
                msgs.laserscan_msg(
                    stamp,
                    self._scan_frame(frame_id, p["scan_frame_id"]),
                    ranges,
                    layout.angle_min,
                    layout.angle_increment,
                    p["scan_range_min_m"],
                    p["scan_range_max_m"],
                )
            )
        with self._lock:
            self.counts["processed"] += 1
            self._inference_ms.append(inference_ms)
            self._latency_ms.append((now - received) * 1e3)
            self._stamp_latency_ms.append(stamp_ms)
            self._published.append(now)

    @staticmethod
    def _scan_frame(image_frame: str, scan_frame: str) -> str:
        """``scan_frame`` with the image frame's prefix (sim_node ``frame_prefix``: ``rover_0/...``)."""
        prefix, sep, _ = image_frame.rpartition("/")
        return f"{prefix}{sep}{scan_frame}" if sep and "/" not in scan_frame else scan_frame

    # ---------------------------------------------------------------- diagnostics
    def diagnostics_values(self) -> tuple[int, str, dict[str, object]]:
        """(level, message, key/values) of the node's health right now."""
        with self._lock:
            published = list(self._published)
            engine, error, counts, p = self._engine, self._engine_error, dict(self.counts), self.p
            values: dict[str, object] = {
                "rate_hz": (len(published) - 1) / (published[-1] - published[0])
                if len(published) >= 2 and published[-1] > published[0]
                else 0.0,
                "latency_ms_p50": _percentile(self._latency_ms, 50),
                "latency_ms_p95": _percentile(self._latency_ms, 95),
                "stamp_to_publish_ms_p50": _percentile(self._stamp_latency_ms, 50),
                "stamp_to_publish_ms_p95": _percentile(self._stamp_latency_ms, 95),
                "inference_ms_p50": _percentile(self._inference_ms, 50),
                "inference_ms_p95": _percentile(self._inference_ms, 95),
            }
            camera_info = self._K is not None
        if published and time.monotonic() - published[-1] > 5.0:
            values["rate_hz"] = 0.0  # stalled: the window holds only old frames
        values.update(
            {
                "frames_received": counts["received"],
                "frames_processed": counts["processed"],
                "frames_skipped": counts["skipped"],
                "frames_malformed": counts["malformed"],
                "inference_errors": counts["inference_errors"],
                "last_error": self.last_error,
                "model_path": p["model_path"],
                "model_version": getattr(engine, "model_version", "") if engine else "",
                "backend": getattr(engine, "backend", "") if engine else "",
                "camera_info": camera_info,
            }
        )
        if engine is None:
            return DiagnosticStatus.ERROR, error or "no model loaded", values
        if not camera_info and counts["processed"]:
            return DiagnosticStatus.WARN, "no camera_info: K from fallback_hfov_deg", values
        return DiagnosticStatus.OK, "running", values

    def _publish_diagnostics(self) -> None:
        publish_node_diagnostics(self, self.diag_pub, "depth_node", *self.diagnostics_values())

    def destroy_node(self) -> None:
        """Stop the worker thread, then the node."""
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        super().destroy_node()


def main(args: list[str] | None = None) -> None:
    """Entry point of ``ros2 run forest_perception depth_node``."""
    run_node(DepthNode, "depth_node", args)


if __name__ == "__main__":
    main()
