"""depth_node: monocular depth from the rover camera, with its point cloud and a laser scan.

Thin ROS wrapper over :mod:`forest_perception.depth_pipeline`. Topics, parameters and the
hot-swap rules: docs/nodes.md (depth_node).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, Image, LaserScan, PointCloud2
from std_srvs.srv import Trigger

from forest_perception import msgs
from forest_perception.depth_pipeline import (
    CameraModel,
    DepthEngineLike,
    DepthSettings,
    DepthStats,
    check_candidate,
    depth_health,
    depth_points,
    depth_scan,
    predict_depth,
    scan_frame_id,
    synthetic_forest_image,
    valid_fraction,
)
from forest_perception.frames import CAMERA_HFOV_DEG, FRAME_CAMERA
from forest_perception.inference import SUPPORTED_ENCODINGS, TORCH_SUFFIXES, ModelLoadError, convert_image_encoding
from forest_perception.nodes import common
from forest_perception.nodes.common import ParamSpec, add_validated_updates, declare_parameters
from forest_perception.worker import SlotWorker

BACKENDS = ("auto", "onnxruntime", "torch")
MODEL_FAMILIES = ("auto", "multiscale", "autoencoder")
# parameters that make the engine reload when they change
ENGINE_PARAMS = ("model_path", "model_family", "backend", "providers", "threads")
PARAMS = [
    ParamSpec("model_path", "", "exported depth model (.onnx, or a .pt checkpoint) or a shipped model name "
              "(multiscale_320x240_int8); empty: the shipped model that fits the camera, chosen on the first frame; "
              "changing it hot-swaps the model"),
    ParamSpec("model_family", "auto", "with an empty model_path: the shipped network family (auto: the "
              "auto-encoder on an ARM board without a GPU provider, else the multi-scale network)",
              choices=MODEL_FAMILIES),
    ParamSpec("backend", "auto", "inference backend", choices=BACKENDS),
    ParamSpec("providers", ["CPUExecutionProvider"], "onnxruntime execution providers, in order"),
    ParamSpec("threads", 2, "intra-op threads of the inference backend", (1, 16)),
    ParamSpec("min_depth_m", 0.28, "predicted depth below this is invalid (NaN)", (0.0, 100.0)),
    ParamSpec("max_depth_m", 10.0, "predicted depth beyond this is invalid (NaN)", (0.1, 1000.0)),
    ParamSpec("min_valid_fraction", 0.2, "share of pixels with a depth a model must reach on a reference frame "
              "to be swapped in; below it live, /diagnostics warns (a quarter of it: error)", (0.0, 1.0)),
    ParamSpec("max_latency_ms", 250.0, "/diagnostics warns when the image-stamp-to-depth p95 is above this; "
              "0 = no check", (0.0, 10000.0)),
    ParamSpec("publish_points", True, "publish depth/points"),
    ParamSpec("voxel_size_m", 0.05, "voxel side of the published cloud; 0 publishes every point", (0.0, 5.0)),
    ParamSpec("point_stride", 2, "use every n-th pixel in each direction for the cloud", (1, 64)),
    ParamSpec("publish_scan", True, "publish depth/scan"),
    ParamSpec("scan_frame_id", FRAME_CAMERA, "LaserScan frame (x forward, y left, z up, level)"),
    ParamSpec("scan_angle_increment_rad", 0.0, "bearing step; 0 = one pixel at the image centre", (0.0, 0.5)),
    ParamSpec("scan_range_min_m", 0.28, "scan range_min (closer points are dropped)", (0.0, 100.0)),
    ParamSpec("scan_range_max_m", 10.0, "scan range_max (farther points are dropped)", (0.1, 1000.0)),
    ParamSpec("scan_ground_clearance_m", 0.05, "points lower than this above the ground are ground", (0.0, 2.0)),
    ParamSpec("scan_max_obstacle_height_m", 1.0, "points higher than this (canopy) are ignored", (0.0, 50.0)),
    ParamSpec("scan_stride", 1, "use every n-th pixel in each direction for the scan", (1, 16)),
    ParamSpec("camera_height_m", 0.20, "optical centre height above the ground", (0.0, 10.0)),
    ParamSpec("camera_pitch_rad", 0.0, "camera pitch, positive looking down (REP 103)", (-1.5, 1.5)),
    ParamSpec("rectify_pitch", False, "run the network on the frame as a level camera would see it (turned by "
              "-camera_pitch_rad) and turn its depth back: for a camera mounted more than about 5 deg from level "
              "(the shipped networks know mounts within +-6 deg)"),
    ParamSpec("model_hfov_deg", CAMERA_HFOV_DEG,
              "horizontal FOV the network was trained with (the shipped ones: 69.4, the simulator's camera; a D435 "
              "colour stream at 640x480 is about 55): a camera of another FOV or principal point (camera_info K) is "
              "shown to the network as that camera would see the scene, and the depth mapped back; 0 = the frame as "
              "it is",
              (0.0, 170.0)),
    ParamSpec("flip_average", False, "run the network on the frame and on its mirror image and publish the geometric "
              "mean of the two depths: better on forests the network never saw (multiscale_320x240: held-out "
              "absrel 1-3 % lower), at twice the network's time; with an ICIIA model the history also banks the mirror "
              "images"),
    ParamSpec("fallback_hfov_deg", 69.4, "horizontal FOV used until camera_info arrives", (10.0, 170.0)),
    ParamSpec("history_size", 16, "with a model that has ICIIA history attention: frames of the rover's own recent "
              "history it attends to (at most the model's bank capacity; kept in memory only); 0 = no history; "
              "changing it empties the bank (so does ~/reset_history and a model swap); other models ignore it",
              (0, 1024)),
    ParamSpec("history_save_dir", "", "folder ~/save_history writes the history bank into (history-<time>.npz: the "
              "features of the banked frames, oldest first); empty: ~/save_history is refused and the bank is never "
              "written to disk"),
    ParamSpec("diagnostics_period_s", 1.0, "period of /diagnostics", (0.1, 60.0), read_only=True),
]

EngineLoader = Callable[[str, str, tuple[str, ...], int], DepthEngineLike]
WAITING_FOR_CAMERA = "waiting for the first camera frame to choose the shipped model that fits it"


def resolve_model(model_path: str, family: str, providers: tuple[str, ...],
                  camera_wh: tuple[int, int] | None) -> str:
    """The file depth_node loads for ``model_path``: a path as given; a shipped model name (``multiscale_320x240_int8``:
    a name of that pattern that is no file here) from the installed weights; empty: the shipped model of ``family``
    that fits a ``camera_wh`` camera (none yet: :class:`ModelLoadError` saying it waits for a frame)."""
    from forest_perception.models.weights import model_for_camera, parse_model_name, shipped_model

    if not model_path:
        if camera_wh is None:
            raise ModelLoadError(WAITING_FOR_CAMERA)
        try:
            return str(model_for_camera(camera_wh[0], camera_wh[1], family, providers))
        except (ValueError, FileNotFoundError) as exc:
            raise ModelLoadError(f"no shipped model for a {camera_wh[0]}x{camera_wh[1]} camera: {exc}") from exc
    if parse_model_name(model_path) is not None and not Path(model_path).exists():
        try:
            return str(shipped_model(model_path))
        except FileNotFoundError as exc:
            raise ModelLoadError(str(exc)) from exc
    return model_path


def load_inference_engine(path: str, backend: str, providers: tuple[str, ...], threads: int) -> DepthEngineLike:
    """The default loader: ONNX Runtime for ``.onnx``; torch (imported only then) for ``.pt`` checkpoints."""
    if not path:
        raise ModelLoadError("model_path is empty: set it to an exported .onnx model or a .pt checkpoint")
    if backend == "torch" or (backend == "auto" and path.lower().endswith(TORCH_SUFFIXES)):
        from forest_perception.models.torch_engine import load_engine
    else:
        from forest_perception.inference import load_engine
    return load_engine(path, backend=backend, providers=tuple(providers), threads=int(threads))


class DepthNode(Node):
    """Subscribes camera/image_raw and camera_info; publishes depth/image, depth/points, depth/scan."""

    def __init__(self, engine_loader: EngineLoader | None = None, **kwargs: Any) -> None:
        super().__init__("depth_node", **kwargs)
        self._loader: EngineLoader = engine_loader or load_inference_engine
        self.p = declare_parameters(self, PARAMS, self._check)
        self.settings = DepthSettings.from_parameters(self.p)
        self.stats = DepthStats()
        self.camera = CameraModel()
        self._engine: DepthEngineLike | None = None
        self._engine_error = ""
        self._candidate: tuple[DepthEngineLike, str] | None = None
        self._warned_fallback = False
        self._last_rgb: np.ndarray | None = None  # the newest camera frame: the reference a new model must pass
        self._model_file = ""  # what model_path resolved to (a shipped model's file when it names one or is empty)
        self._auto_tried_for: tuple[int, int] | None = None  # camera size an empty model_path was last tried for
        self._swap_lock = threading.Lock()  # the worker's choice for the camera vs a hot swap from a parameter
        self._adopting: tuple[DepthEngineLike, str] | None = None  # the camera's choice, being written to model_path
        self._pending_write_back: tuple[DepthEngineLike, str] | None = None  # chosen by a hot swap to an empty path
        if not self.p["model_path"]:
            self._engine_error = f"no model loaded: {WAITING_FOR_CAMERA}"
            self.get_logger().info(f"model_path is empty: {WAITING_FOR_CAMERA} (model_family {self.p['model_family']})")
        else:
            try:
                self._engine, self._model_file = self._load(self.p)
                self._configure_history(self._engine, self.p)
                self.get_logger().info(f"model {self._model_file} ({self._engine.model_version}, "
                                       f"{self._engine.backend}) loaded")
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
        add_validated_updates(self, PARAMS, lambda: self.p, self._check_update, self._commit)
        self.create_service(Trigger, "~/reset_history", self._on_reset_history)
        self.create_service(Trigger, "~/save_history", self._on_save_history)
        self.create_timer(self.p["diagnostics_period_s"], self._publish_diagnostics)
        self.worker = SlotWorker("depth_worker", self._process, on_error=self._on_worker_error)

    @property
    def counts(self) -> dict[str, int]:
        """Frames received, processed, skipped, malformed and inference errors."""
        return self.stats.counts

    @property
    def last_error(self) -> str:
        """The last dropped input or inference error."""
        return self.stats.last_error

    # ---------------------------------------------------------------- parameters
    def _load(self, p: dict[str, Any]) -> tuple[DepthEngineLike, str]:
        """The engine of parameters ``p`` and the file it came from (nothing is changed on the node)."""
        camera = None if self._last_rgb is None else (self._last_rgb.shape[1], self._last_rgb.shape[0])
        path = resolve_model(str(p["model_path"]), str(p["model_family"]), tuple(p["providers"]), camera)
        return self._loader(path, str(p["backend"]), tuple(p["providers"]), int(p["threads"])), path

    def _load_for_camera(self, rgb: np.ndarray) -> None:
        """With an empty model_path: load the shipped model that fits this frame's size (once per camera size)."""
        size = (rgb.shape[1], rgb.shape[0])
        if self._auto_tried_for == size:
            return
        self._auto_tried_for = size
        try:
            engine, path = self._load(self.p)
        except Exception as exc:  # noqa: BLE001 - reported on /diagnostics; a valid model_path can still be set
            self._engine_error = f"no model loaded: {exc}"
            self.get_logger().error(self._engine_error)
            return
        with self._swap_lock:  # a model_path set meanwhile (a hot swap) wins over this choice
            if self._engine is not None or self.p["model_path"]:
                return
            self._configure_history(engine, self.p)
            self._engine, self._model_file, self._engine_error = engine, path, ""
        self.get_logger().info(f"model_path is empty: chose the shipped {self._model_file} for a {size[0]}x{size[1]} "
                               f"camera ({engine.model_version}, {engine.backend})")
        self._write_back(engine, path)

    def _write_back(self, engine: DepthEngineLike, path: str) -> None:
        """Write the model chosen for the camera into model_path, so that ``ros2 param get``, collab_node's gate and
        a later hot swap see the file that runs; the running engine is the candidate (no second load)."""
        self._adopting = (engine, path)
        try:
            result = self.set_parameters([Parameter("model_path", value=path)])[0]
        finally:
            self._adopting = None
        if not result.successful:
            self.get_logger().warning(f"the chosen model runs, but model_path was not updated: {result.reason}")

    @staticmethod
    def _check(values: dict[str, Any]) -> str:
        return DepthSettings.from_parameters(values).problem()

    def _check_update(self, new: dict[str, Any]) -> str:
        reason = self._check(new)
        self._candidate = None
        if reason or not common.changed(self.p, new, ENGINE_PARAMS):
            return reason
        adopting = self._adopting
        if adopting is not None and new["model_path"] == adopting[1] and not common.changed(
                {**self.p, "model_path": new["model_path"]}, new, ENGINE_PARAMS):
            self._candidate = adopting  # the camera's choice, already running: recorded, not loaded again
            return ""
        try:  # load and try before accepting: a bad model is refused and the running engine stays
            candidate = self._load(new)
            problem = check_candidate(candidate[0], self._reference_frame(), DepthSettings.from_parameters(new))
        except Exception as exc:  # noqa: BLE001 - any loader failure becomes the refusal's reason
            problem = f"not loaded ({type(exc).__name__}: {exc})"
        if problem:
            reason = f"model_path {new['model_path']!r} refused: {problem}"
            self.get_logger().warning(f"{reason}; keeping the running model")
            return reason
        self._candidate = candidate
        return ""

    def _reference_frame(self) -> np.ndarray:
        """A synthetic forest frame (it has structure, which a blank camera frame may not) at the camera's size."""
        height, width = self._last_rgb.shape[:2] if self._last_rgb is not None else (240, 320)
        return synthetic_forest_image(height, width)

    def _commit(self, _old: dict[str, Any], new: dict[str, Any]) -> None:
        candidate, self._candidate = self._candidate, None
        history_changed = new["history_size"] != self.p["history_size"]
        self.p, self.settings = new, DepthSettings.from_parameters(new)
        if candidate is None and history_changed and self._engine is not None:
            self._configure_history(self._engine, new)
        if candidate is not None:
            engine, path = candidate
            if engine is not self._engine:  # a new model starts with an empty history (the check ran a frame)
                self._configure_history(engine, new)
            with self._swap_lock:
                self._engine, self._model_file, self._engine_error = engine, path, ""
            self.get_logger().info(f"model swapped to {self._model_file} ({engine.model_version}, {engine.backend})")
            if not new["model_path"]:  # chosen for the camera: written into model_path by the worker, not here
                self._pending_write_back = (engine, path)  # (a parameter callback cannot set parameters)

    # ---------------------------------------------------------------- history (models with ICIIA)
    def _configure_history(self, engine: DepthEngineLike, p: dict[str, Any]) -> None:
        """Give a history model its bank size (which empties its bank); models without history are left alone."""
        set_size = getattr(engine, "set_history_size", None)
        if callable(set_size):
            used = set_size(int(p["history_size"]))
            capacity = getattr(engine, "history_capacity", used)
            note = f" (the model's bank holds at most {capacity})" if used != p["history_size"] else ""
            self.get_logger().info(f"history: {used} frames{note}, bank emptied")

    def _on_reset_history(self, _request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        engine = self._engine
        reset = getattr(engine, "reset_history", None)
        if not callable(reset):
            response.success = False
            response.message = "the running model has no history (no ICIIA)" if engine else "no model is running"
            return response
        dropped = reset()
        response.success = True
        response.message = f"history reset: {dropped} frames dropped"
        self.get_logger().info(response.message)
        return response

    def _on_save_history(self, _request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        """Write the running model's history bank under ``history_save_dir`` (the only way it reaches the disk)."""
        folder, engine = str(self.p["history_save_dir"]), self._engine
        bank = getattr(engine, "bank", None)
        response.success = False
        if not folder:
            response.message = ("history_save_dir is empty: set it to a folder to save the history bank into "
                                "(nothing is written otherwise)")
        elif not callable(getattr(bank, "save", None)):
            response.message = "the running model has no history (no ICIIA)" if engine else "no model is running"
        else:
            stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{time.time_ns() % 1_000_000_000:09d}"
            try:
                path = Path(folder).expanduser() / f"history-{stamp}.npz"
                path.parent.mkdir(parents=True, exist_ok=True)
                path = bank.save(path)
                with np.load(path) as saved:  # what was written (frames keep coming meanwhile)
                    frames = saved["features"].shape[0]
            except (OSError, ValueError) as exc:
                response.message = f"history not saved into {folder!r}: {exc}"
            else:
                response.success = True
                response.message = f"history saved: {frames} frames to {path}"
        if response.success:
            self.get_logger().info(response.message)
        else:
            self.get_logger().warning(f"~/save_history refused: {response.message}")
        return response

    # ---------------------------------------------------------------- input
    def _on_camera_info(self, msg: CameraInfo) -> None:
        try:
            self.camera.set_info(msgs.camera_matrix_from_info(msg), msg.width, msg.height)
        except ValueError as exc:
            self._drop(f"camera_info: {exc}")

    def _drop(self, error: str) -> None:
        self.stats.count("malformed", error)
        self.get_logger().warning(f"dropped: {error}", throttle_duration_sec=5.0)

    def _on_image(self, msg: Image) -> None:
        received = time.monotonic()
        try:
            if msg.encoding not in SUPPORTED_ENCODINGS:
                raise ValueError(f"unsupported encoding {msg.encoding!r}, expected one of {list(SUPPORTED_ENCODINGS)}")
            rgb = convert_image_encoding(msgs.array_from_image(msg), msg.encoding)
        except ValueError as exc:
            self._drop(f"image: {exc}")
            return
        self.stats.count("received")
        self._last_rgb = rgb
        if self.worker.submit((rgb, msg, received)) is not None:
            self.stats.count("skipped")  # never queue: the newer frame replaces it

    # ---------------------------------------------------------------- worker
    def _process(self, frame: tuple) -> None:
        pending, self._pending_write_back = self._pending_write_back, None
        if pending is not None and not self.p["model_path"] and self._engine is pending[0]:
            self._write_back(*pending)
        if self._engine is None and not self.p["model_path"]:
            self._load_for_camera(frame[0])
        engine, settings = self._engine, self.settings
        if engine is None:
            self.stats.count("skipped")  # no model: nothing to run it on
            return
        rgb, msg, received = frame
        try:
            K = self.camera.matrix(rgb.shape[1], rgb.shape[0], settings.fallback_hfov_deg)
            depth, inference_ms = predict_depth(engine, rgb, settings, K)
        except Exception as exc:  # noqa: BLE001 - a bad frame or engine hiccup must not end the worker
            self.stats.count("inference_errors", f"inference: {type(exc).__name__}: {exc}")
            self.get_logger().error(self.stats.last_error, throttle_duration_sec=5.0)
            return
        stamp, frame_id = msg.header.stamp, msg.header.frame_id
        self.depth_pub.publish(msgs.image_from_array(depth, "32FC1", stamp, frame_id))
        # latency ends when depth/image is out; points and scan follow on the same frame
        now = time.monotonic()
        stamp_ms = (self.get_clock().now().nanoseconds - (stamp.sec * 1_000_000_000 + stamp.nanosec)) * 1e-6
        if not self.camera.has_info and not self._warned_fallback:  # K went into the network's view, points, scan
            self._warned_fallback = True
            self.get_logger().warning(f"no camera_info yet: using fallback_hfov_deg={settings.fallback_hfov_deg}")
        if settings.publish_points:
            self.points_pub.publish(msgs.pointcloud2_msg(depth_points(depth, K, settings), stamp, frame_id))
        if settings.publish_scan:
            ranges, layout = depth_scan(depth, K, settings)
            self.scan_pub.publish(msgs.laserscan_msg(
                stamp, scan_frame_id(frame_id, self.p["scan_frame_id"]), ranges, layout.angle_min,
                layout.angle_increment, settings.scan_range_min_m, settings.scan_range_max_m))
        self.stats.processed(inference_ms, (now - received) * 1e3, stamp_ms, now, valid_fraction(depth))

    def _on_worker_error(self, exc: Exception) -> bool:
        if not rclpy.ok(context=self.context):
            return False  # shutting down (Ctrl-C): publishing failed because the context is gone
        self.stats.count("inference_errors", f"depth: {type(exc).__name__}: {exc}")
        self.get_logger().error(self.stats.last_error, throttle_duration_sec=5.0)
        return True

    # ---------------------------------------------------------------- diagnostics
    def diagnostics_values(self) -> tuple[bytes, str, dict[str, object]]:
        """(level, message, key/values) of the node's health right now."""
        engine, values = self._engine, self.stats.values()
        values.update({
            "model_path": self.p["model_path"],
            "model_file": self._model_file if engine else "",
            "model_version": getattr(engine, "model_version", "") if engine else "",
            "backend": getattr(engine, "backend", "") if engine else "",
            "camera_info": self.camera.has_info,
        })
        if engine is not None and hasattr(engine, "history_frames"):
            values.update(history_frames=engine.history_frames, history_size=engine.history_size)
        if engine is None and self._engine_error.endswith(WAITING_FOR_CAMERA):
            return DiagnosticStatus.OK, WAITING_FOR_CAMERA, values  # nothing wrong yet: no frame has come
        level, message = depth_health(engine is not None, self._engine_error, self.camera.has_info, values,
                                      self.settings)
        return level, message, values

    def _publish_diagnostics(self) -> None:
        common.publish_node_diagnostics(self, self.diag_pub, "depth_node", *self.diagnostics_values())

    def destroy_node(self) -> None:
        """Stop the worker thread, then the node."""
        if hasattr(self, "worker"):
            self.worker.stop()
        super().destroy_node()


def main(args: list[str] | None = None) -> None:
    """Entry point of ``ros2 run forest_perception depth_node``."""
    common.run_node(DepthNode, "depth_node", args, PARAMS, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
