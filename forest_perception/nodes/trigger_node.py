"""trigger_node: decide which camera frames are worth keeping for training and mark them for capture_node.

Thin node over :mod:`forest_perception.triggers`. Topics, parameters and how it drives capture_node's marked
recording: docs/nodes.md (trigger_node).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rclpy.node import Node
from rclpy.qos import QoSProfile, qos_profile_sensor_data
from sensor_msgs.msg import Image, NavSatFix
from std_msgs.msg import Header

from forest_perception import msgs
from forest_perception.inference import convert_image_encoding
from forest_perception.nodes.common import (
    ParamSpec,
    add_validated_updates,
    declare_parameters,
    publish_node_diagnostics,
    run_node,
)
from forest_perception.readings import GpsFix
from forest_perception.recorder.gate import MARK_TOPIC
from forest_perception.topics import CAMERA_DEPTH, CAMERA_IMAGE, DEPTH_IMAGE, GPS
from forest_perception.triggers import EMBEDDINGS, FrameTrigger, TriggerConfig, TriggerFrame

_DEFAULTS = TriggerConfig()
_TRIGGER_PARAMS = {f.name: f.name for f in dataclasses.fields(TriggerConfig)}

PARAMS = [
    ParamSpec("image_topic", CAMERA_IMAGE, "colour camera (rgb8/bgr8/rgba8/bgra8/mono8) (read-only)", read_only=True),
    ParamSpec("depth_topic", CAMERA_DEPTH, "measured depth aligned to colour, 32FC1 metres or 16UC1 mm (read-only)",
              read_only=True),
    ParamSpec("predicted_depth_topic", DEPTH_IMAGE, "depth_node's predicted depth, 32FC1 metres, stamped like the "
              "camera image; empty = none (read-only)", read_only=True),
    ParamSpec("gps_topic", GPS, "NavSatFix for GPS spacing; empty = none (read-only)", read_only=True),
    ParamSpec("mark_topic", MARK_TOPIC, "where kept frames are marked (std_msgs/Header: the frame's stamp, frame_id "
              "the reasons); capture_node with record_mode:=marked listens there (read-only)", read_only=True),
    ParamSpec("prediction_wait_s", 0.5, "how long a frame waits for its predicted depth before it is decided "
              "without it", (0.0, 10.0)),
    ParamSpec("pair_timeout_s", 1.0, "how long a colour frame waits for its measured depth before it is decided "
              "without it", (0.0, 10.0)),
    ParamSpec("blur_ratio", _DEFAULTS.blur_ratio, "blurry below this fraction of the running median Laplacian "
              "variance (0 = off)", (0.0, 1.0)),
    ParamSpec("min_laplacian", _DEFAULTS.min_laplacian, "blurry below this Laplacian variance (0 = off)",
              (0.0, 1e9)),
    ParamSpec("sharpness_window", _DEFAULTS.sharpness_window, "frames in the running sharpness median", (1, 10000)),
    ParamSpec("embedding", _DEFAULTS.embedding, "what novelty is measured on: colour descriptor, predicted depth "
              "thumbnail, or both", choices=EMBEDDINGS),
    ParamSpec("novelty_distance", _DEFAULTS.novelty_distance, "novel when the nearest kept embedding is at least "
              "this far (0..2)", (0.0, 2.0)),
    ParamSpec("duplicate_distance", _DEFAULTS.duplicate_distance, "a repeated view, never kept, when a kept "
              "embedding is nearer than this", (0.0, 2.0)),
    ParamSpec("memory", _DEFAULTS.memory, "kept embeddings remembered for novelty (the last ones)", (1, 100000)),
    ParamSpec("disagreement_absrel", _DEFAULTS.disagreement_absrel, "keep when predicted vs measured depth AbsRel "
              "reaches this (0 = off)", (0.0, 100.0)),
    ParamSpec("min_valid_fraction", _DEFAULTS.min_valid_fraction, "fewer pixels valid in both depths: disagreement "
              "unknown", (0.0, 1.0)),
    ParamSpec("spacing_m", _DEFAULTS.spacing_m, "keep when moved this far (GPS, horizontal ENU) since the last kept "
              "frame (0 = off)", (0.0, 100000.0)),
    ParamSpec("max_keep_rate_hz", _DEFAULTS.max_keep_rate_hz, "at most this many kept frames a second (0 = no cap)",
              (0.0, 1000.0)),
    ParamSpec("max_gap_s", _DEFAULTS.max_gap_s, "keep a sharp, non-repeated frame when none was kept for this long "
              "(0 = off)", (0.0, 86400.0)),
    ParamSpec("diagnostics_period_s", 1.0, "period of /diagnostics (read-only)", (0.1, 60.0), read_only=True),
]


def _stamp_ns(header: Header) -> int:
    return header.stamp.sec * 1_000_000_000 + header.stamp.nanosec


def depth_metres(msg: Image, what: str) -> np.ndarray:
    """float32 metres (NaN invalid) of a 32FC1 (metres) or 16UC1 (millimetres, 0 invalid) image; ValueError else."""
    if msg.encoding not in ("32FC1", "16UC1"):
        raise ValueError(f"{what} encoding {msg.encoding!r} is not 32FC1 or 16UC1")
    array = msgs.array_from_image(msg)
    if msg.encoding == "16UC1":
        depth = array.astype(np.float32) * np.float32(1e-3)
        depth[array == 0] = np.nan
        return depth
    return array


class TriggerNode(Node):
    """Pairs colour, measured and predicted depth by stamp, asks the trigger core, publishes a mark per kept frame."""

    def __init__(self, **kwargs: Any) -> None:  # noqa: ANN401 - rclpy Node keyword arguments
        super().__init__("trigger_node", **kwargs)
        self.p = declare_parameters(self, PARAMS, self._validate)
        self.trigger = FrameTrigger(self._trigger_config(self.p))
        self.malformed: dict[str, int] = {"image": 0, "depth": 0, "predicted depth": 0, "gps": 0, "frame": 0}
        self.unpaired = 0  # depth images whose colour frame never came
        self.last_error = ""
        self._pending: dict[int, dict[str, Any]] = {}  # stamp ns -> {"rgb", "depth", "predicted", "t"}
        self._gps: GpsFix | None = None
        sensor = qos_profile_sensor_data
        self.create_subscription(Image, self.p["image_topic"], self._on_image, sensor)
        self.create_subscription(Image, self.p["depth_topic"], self._on_depth, sensor)
        if self.p["predicted_depth_topic"]:
            self.create_subscription(Image, self.p["predicted_depth_topic"], self._on_predicted, sensor)
        if self.p["gps_topic"]:
            self.create_subscription(NavSatFix, self.p["gps_topic"], self._on_gps, sensor)
        self.mark_pub = self.create_publisher(Header, self.p["mark_topic"], QoSProfile(depth=100))
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", QoSProfile(depth=10))
        add_validated_updates(self, PARAMS, lambda: self.p, self._validate, self._commit)
        self.create_timer(0.05, self._decide_due)
        self.create_timer(self.p["diagnostics_period_s"], self._publish_diagnostics)

    # ---------------------------------------------------------------- parameters
    @staticmethod
    def _trigger_config(values: dict[str, Any]) -> TriggerConfig:
        return TriggerConfig(**{field: values[name] for name, field in _TRIGGER_PARAMS.items()})

    def _validate(self, values: dict[str, Any]) -> str:
        try:
            self._trigger_config(values).validate()
        except ValueError as exc:
            return str(exc)
        return ""

    def _commit(self, _old: dict[str, Any], new: dict[str, Any]) -> None:
        self.p = new
        self.trigger.reconfigure(self._trigger_config(new))

    # ---------------------------------------------------------------- inputs
    def _dropped(self, kind: str, exc: Exception) -> None:
        self.malformed[kind] += 1
        self.last_error = f"{kind}: {exc}"
        self.get_logger().warning(f"dropped a malformed {kind} message: {exc}", throttle_duration_sec=5.0)

    def _slot(self, stamp: int) -> dict[str, Any]:
        return self._pending.setdefault(stamp, {"t": time.monotonic()})

    def _on_image(self, msg: Image) -> None:
        try:
            rgb = convert_image_encoding(msgs.array_from_image(msg), msg.encoding)
        except ValueError as exc:
            self._dropped("image", exc)
            return
        slot = self._slot(_stamp_ns(msg.header))
        slot["rgb"], slot["t"] = rgb, time.monotonic()
        self._decide_ready()

    def _on_depth(self, msg: Image) -> None:
        try:
            self._slot(_stamp_ns(msg.header))["depth"] = depth_metres(msg, "measured depth")
        except ValueError as exc:
            self._dropped("depth", exc)
            return
        self._decide_ready()

    def _on_predicted(self, msg: Image) -> None:
        try:
            self._slot(_stamp_ns(msg.header))["predicted"] = depth_metres(msg, "predicted depth")
        except ValueError as exc:
            self._dropped("predicted depth", exc)
            return
        self._decide_ready()

    def _on_gps(self, msg: NavSatFix) -> None:
        if msg.status.status < 0 or not (math.isfinite(msg.latitude) and math.isfinite(msg.longitude)):
            return  # no fix: no position (not malformed)
        if not (-90.0 <= msg.latitude <= 90.0 and -180.0 <= msg.longitude <= 180.0):
            self._dropped("gps", ValueError(f"latitude {msg.latitude} / longitude {msg.longitude} out of range"))
            return
        self._gps = GpsFix(msg.latitude, msg.longitude, msg.altitude, msg.status.status)

    # ---------------------------------------------------------------- decisions
    def _ready(self, slot: dict[str, Any], now: float) -> bool:
        if "rgb" not in slot:
            return False
        waited = now - slot["t"]
        has_depth = "depth" in slot or waited >= self.p["pair_timeout_s"]
        wants_prediction = bool(self.p["predicted_depth_topic"]) and "predicted" not in slot
        return has_depth and (not wants_prediction or waited >= self.p["prediction_wait_s"])

    def _decide_ready(self) -> None:
        now = time.monotonic()
        for stamp in sorted(self._pending):
            slot = self._pending[stamp]
            if self._ready(slot, now):
                del self._pending[stamp]
                self._decide(stamp, slot)

    def _decide_due(self) -> None:
        self._decide_ready()
        now = time.monotonic()
        horizon = max(self.p["pair_timeout_s"], self.p["prediction_wait_s"]) + 2.0
        for stamp in [s for s, slot in self._pending.items() if "rgb" not in slot and now - slot["t"] > horizon]:
            del self._pending[stamp]
            self.unpaired += 1

    def _decide(self, stamp: int, slot: dict[str, Any]) -> None:
        frame = TriggerFrame(stamp * 1e-9, slot["rgb"], slot.get("depth"), slot.get("predicted"), self._gps)
        try:
            decision = self.trigger.decide(frame)
        except ValueError as exc:
            self.malformed["frame"] += 1
            self.last_error = f"frame: {exc}"
            self.get_logger().warning(f"frame stamped {stamp / 1e9:.3f} s not decided: {exc}",
                                      throttle_duration_sec=5.0)
            return
        if decision.keep:
            mark = Header()
            mark.stamp = msgs.time_from_ns(stamp)
            mark.frame_id = ",".join(decision.reasons)
            self.mark_pub.publish(mark)

    # ---------------------------------------------------------------- diagnostics
    def diagnostics_values(self) -> tuple[bytes, str, dict[str, object]]:
        """(level, message, key/values): frames kept and skipped by reason, malformed inputs dropped."""
        counts = self.trigger.stats.as_dict()
        values: dict[str, object] = dict(counts)
        values.update({f"malformed {k}": v for k, v in self.malformed.items()})
        values["unpaired depth"] = self.unpaired
        values["waiting"] = len(self._pending)
        values["last_error"] = self.last_error
        message = f"kept {counts['kept']} of {counts['frames']} frames"
        dropped = sum(self.malformed.values())
        if dropped:
            return DiagnosticStatus.WARN, f"{message}; {dropped} malformed message(s) dropped", values
        return DiagnosticStatus.OK, message, values

    def _publish_diagnostics(self) -> None:
        publish_node_diagnostics(self, self.diag_pub, "trigger_node", *self.diagnostics_values())


def main(args: list[str] | None = None) -> None:
    """Entry point of ``ros2 run forest_perception trigger_node``."""
    run_node(TriggerNode, "trigger_node", args, PARAMS, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
