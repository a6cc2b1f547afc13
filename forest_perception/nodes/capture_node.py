"""capture_node: record chosen topics into a rosbag2 bag with MCAP storage (``ros2 bag info/play`` read it).

Topics, services and parameters: docs/nodes.md (capture_node).
"""

from __future__ import annotations

import functools
import importlib
import os
import time
from pathlib import Path
from typing import Any

from diagnostic_msgs.msg import DiagnosticArray
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.subscription import Subscription
from std_msgs.msg import Header
from std_srvs.srv import SetBool, Trigger

from forest_perception.cli_args import writable_folder_problem
from forest_perception.nodes.common import (
    ParamSpec,
    add_validated_updates,
    changed,
    declare_parameters,
    publish_node_diagnostics,
    run_node,
)
from forest_perception.recorder import (
    COMPRESSIONS,
    BagRecorder,
    DiskUsage,
    RecorderError,
    RecorderStats,
    adapted_subscription_qos,
    qos_profile,
)
from forest_perception.recorder.gate import MARK_TOPIC, GateConfig, MarkGate
from forest_perception.recorder.health import MB, WriteRate, recorder_health
from forest_perception.topics import CAMERA_DEPTH, CAMERA_IMAGE, CAMERA_INFO, SENSOR_TOPICS

_BAG_PARAMS = ("output_dir", "bag_name", "max_split_size_mb", "max_split_duration_s", "compression",
               "min_free_space_mb", "queue_size_mb", "chunk_size_kb")

# rclpy passes MessageInfo (publisher sequence number, source timestamp) to 2-argument callbacks since Iron
_CALLBACK_WITH_INFO = hasattr(Subscription, "CallbackType")


def offered_qos(qos: Any) -> dict[str, Any]:
    """A publisher's rclpy QoSProfile as the profile mapping rosbag2 records (policy names, durations in ns)."""
    def policy(value: Any) -> str:
        return getattr(value, "name", str(value)).lower()

    return qos_profile(
        history=policy(qos.history),
        depth=int(qos.depth),
        reliability=policy(qos.reliability),
        durability=policy(qos.durability),
        deadline_ns=int(qos.deadline.nanoseconds),
        lifespan_ns=int(qos.lifespan.nanoseconds),
        liveliness=policy(qos.liveliness),
        liveliness_lease_duration_ns=int(qos.liveliness_lease_duration.nanoseconds),
        avoid_ros_namespace_conventions=bool(qos.avoid_ros_namespace_conventions),
    )


def message_class(type_name: str) -> type:
    """The Python class of ``pkg/msg/Type`` (imported by name); ImportError/AttributeError when absent."""
    package, kind, name = type_name.split("/")
    return getattr(importlib.import_module(f"{package}.{kind}"), name)


PARAMS = [
    ParamSpec("topics", list(SENSOR_TOPICS), "topics to record; relative names resolve in the node's namespace"),
    ParamSpec("output_dir", "bags", "folder the bags are created in"),
    ParamSpec("bag_name", "", "bag directory name; empty = rosbag2_YYYY_MM_DD-HH_MM_SS (a suffix avoids clashes)"),
    ParamSpec("max_split_size_mb", 512, "start a new file when one reaches this size (MB); 0 = no limit",
              (0, 1_000_000)),
    ParamSpec("max_split_duration_s", 0.0, "start a new file after this much recording; 0 = no limit", (0.0, 86400.0)),
    ParamSpec("compression", "none", "MCAP chunk compression", choices=tuple(COMPRESSIONS)),
    ParamSpec("min_free_space_mb", 512, "close the bag and stop recording below this free disk space (MB)",
              (0, 1_000_000)),
    ParamSpec("autostart", True, "start recording when the node starts"),
    ParamSpec("queue_size_mb", 128, "memory for messages waiting to be written; beyond it they are dropped",
              (1, 16384)),
    ParamSpec("chunk_size_kb", 1024, "MCAP chunk size: at most this much is lost if the process is killed",
              (16, 65536)),
    ParamSpec("subscription_depth", 50, "history depth of the recording subscriptions", (1, 10000)),
    ParamSpec("diagnostics_period_s", 1.0, "period of /diagnostics (read-only)", (0.1, 60.0), read_only=True),
    ParamSpec("topic_check_period_s", 1.0, "how often topics not yet advertised are looked for (read-only)",
              (0.05, 60.0), read_only=True),
    ParamSpec("record_mode", "all", "all: every message; marked: only the frames marked on mark_topic (or ~/mark) "
              "and the sensor messages around them (read-only)", choices=("all", "marked"), read_only=True),
    ParamSpec("mark_topic", MARK_TOPIC, "std_msgs/Header marks: the stamp of a camera frame to keep (read-only)",
              read_only=True),
    ParamSpec("mark_frame_topics", [CAMERA_IMAGE, CAMERA_INFO, CAMERA_DEPTH],
              "marked mode: topics with one message per frame, written when their stamp is the mark's (read-only)",
              read_only=True),
    ParamSpec("mark_stamp_tolerance_s", 0.001, "marked mode: how close a frame topic's stamp must be to the mark's "
              "(read-only)", (0.0, 1.0), read_only=True),
    ParamSpec("mark_context_s", 0.5, "marked mode: other topics are written within this of a mark (read-only)",
              (0.0, 60.0), read_only=True),
    ParamSpec("mark_delay_s", 2.0, "marked mode: how long messages wait in memory for a mark (read-only)",
              (0.0, 60.0), read_only=True),
    ParamSpec("mark_buffer_mb", 256, "marked mode: memory for waiting messages; beyond it the oldest are decided "
              "early (read-only)", (1, 16384), read_only=True),
]


class CaptureNode(Node):
    """Thin ROS wrapper over :class:`forest_perception.recorder.BagRecorder`."""

    def __init__(self, disk_usage: DiskUsage | None = None, **kwargs: Any) -> None:
        super().__init__("capture_node", **kwargs)
        self.p = declare_parameters(self, PARAMS, self._validate)
        self._disk_usage = disk_usage  # shutil.disk_usage unless given (tests simulate a filling disk)
        self._recorder: BagRecorder | None = None
        self._topic_subs: dict[str, Any] = {}  # resolved topic -> Subscription
        self._waiting: dict[str, str] = {}  # resolved topic -> why it is not recorded yet
        self._sequence: dict[tuple[str, bytes], int] = {}
        self.transport_lost: dict[str, int] = {}
        self.last_error = ""
        self.last_stats: RecorderStats | None = None
        self._reported_drops = 0
        self._reported_lost = 0
        self._rate = WriteRate()
        self._gate: MarkGate | None = None
        self.last_gate: dict[str, int] = {}

        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", QoSProfile(depth=10))
        self.create_service(Trigger, "~/start", self._on_start)
        self.create_service(Trigger, "~/stop", self._on_stop)
        self.create_service(SetBool, "~/pause", self._on_pause)
        self.create_service(Trigger, "~/split", self._on_split)
        if self.p["record_mode"] == "marked":
            self.create_service(Trigger, "~/mark", self._on_mark)
            self.create_subscription(Header, self.p["mark_topic"], self._on_mark_msg, QoSProfile(depth=100))
            self.create_timer(0.05, self._release_marked)
        add_validated_updates(self, PARAMS, lambda: self.p, self._validate, self._commit)
        self.create_timer(self.p["topic_check_period_s"], self._check_topics)
        self.create_timer(self.p["diagnostics_period_s"], self._publish_diagnostics)
        if self.p["autostart"]:
            ok, message = self.start()
            if not ok:  # e.g. the disk is full: ERROR on /diagnostics until ~/start succeeds
                self.get_logger().error(f"autostart failed: {message}")

    # ---------------------------------------------------------------- parameters
    def _validate(self, values: dict[str, Any]) -> str:
        topics = list(values["topics"])
        if not topics:
            return "topics must name at least one topic"
        for topic in topics:
            try:
                self._resolve(str(topic))
            except Exception as exc:  # noqa: BLE001 - rclpy raises several kinds for invalid names
                return f"topics: {topic!r} is not a valid topic name ({exc})"
        if "/" in values["bag_name"] or values["bag_name"] in (".", ".."):
            return f"bag_name must be a plain directory name, got {values['bag_name']!r}"
        if not str(values["output_dir"]).strip():
            return "output_dir must not be empty"
        return writable_folder_problem("output_dir", values["output_dir"])

    def _commit(self, old: dict[str, Any], new: dict[str, Any]) -> None:
        changed_bag = changed(old, new, _BAG_PARAMS)
        self.p = new
        if changed_bag and self._recorder is not None:
            self.get_logger().info(f"{', '.join(changed_bag)} changed: applies from the next ~/start")

    def _resolve(self, topic: str) -> str:
        """Absolute name of ``topic`` in this node's namespace (remapped where rclpy can)."""
        try:
            return self.resolve_topic_name(topic)
        except AttributeError:  # Humble's rclpy: expand by hand, then let rclpy validate it
            from rclpy.validate_full_topic_name import validate_full_topic_name

            if topic.startswith("~"):
                name = self.get_fully_qualified_name() + topic[1:]
            elif topic.startswith("/"):
                name = topic
            else:
                name = self.get_namespace().rstrip("/") + "/" + topic
            validate_full_topic_name(name)
            return name

    # ---------------------------------------------------------------- start / stop
    @property
    def recorder(self) -> BagRecorder | None:
        """The bag being recorded, or None when idle."""
        return self._recorder

    def _bag_path(self) -> Path:
        root = Path(os.path.expanduser(str(self.p["output_dir"])))
        name = self.p["bag_name"] or time.strftime("rosbag2_%Y_%m_%d-%H_%M_%S")
        path, n = root / name, 1
        while path.exists():
            path, n = root / f"{name}_{n}", n + 1
        return path

    def start(self) -> tuple[bool, str]:
        """Open a new bag and subscribe to the topics; (success, message)."""
        if self._recorder is not None:
            return False, f"already recording to {self._recorder.path}"
        path = self._bag_path()
        namespace = self.get_namespace()
        try:
            recorder = BagRecorder(
                path,
                max_split_bytes=int(self.p["max_split_size_mb"]) * MB,
                max_split_duration_s=float(self.p["max_split_duration_s"]),
                compression=str(self.p["compression"]),
                chunk_bytes=int(self.p["chunk_size_kb"]) * 1024,
                min_free_bytes=int(self.p["min_free_space_mb"]) * MB,
                queue_max_bytes=int(self.p["queue_size_mb"]) * MB,
                custom_data={"recorder": "forest_perception capture_node", "namespace": namespace,
                             "record_mode": str(self.p["record_mode"])},
                ros_distro=os.environ.get("ROS_DISTRO", "kilted"),
                disk_usage=self._disk_usage,
            )
        except (RecorderError, OSError, ValueError) as exc:
            self.last_error = f"cannot start recording: {exc}"
            return False, self.last_error
        self._recorder = recorder
        self._gate = MarkGate(self._gate_config()) if self.p["record_mode"] == "marked" else None
        self._sequence.clear()
        self.transport_lost = {}
        self._reported_drops = self._reported_lost = 0
        self._rate.clear()
        self.last_error = ""
        self.get_logger().info(f"recording to {path}")
        self._check_topics()
        return True, f"recording to {path}"

    def stop(self) -> tuple[bool, str]:
        """Close the bag (everything queued is written); (success, message)."""
        recorder = self._recorder
        if recorder is None:
            return False, "not recording"
        for topic in list(self._topic_subs):
            self._unsubscribe(topic)
        if self._gate is not None:  # what the marks received so far cover is written; the rest never will be
            self._write_held(recorder, self._gate.flush())
            self.last_gate = self._gate.stats.as_dict()
            self._gate = None
        self._recorder = None
        try:
            stats = recorder.close()
        except RecorderError as exc:
            self.last_error = str(exc)
            return False, self.last_error
        self.last_stats = stats
        self._log_losses(stats)
        self.get_logger().info(f"closed {stats.summary()}")
        return True, stats.summary()

    def _unsubscribe(self, topic: str) -> None:
        subscription = self._topic_subs.pop(topic, None)
        if subscription is not None:
            self.destroy_subscription(subscription)

    # ---------------------------------------------------------------- topics
    def _wanted(self) -> dict[str, str]:
        return {self._resolve(str(t)): str(t) for t in self.p["topics"]}

    def _check_topics(self) -> None:
        recorder = self._recorder
        if recorder is None:
            return
        if recorder.state == "stopped":  # the disk guard or a write error ended it
            self.last_error = recorder.stop_reason
            self.get_logger().error(f"recording stopped: {recorder.stop_reason}")
            self.stop()
            self.last_error = recorder.stop_reason
            return
        wanted = self._wanted()
        for topic in list(self._topic_subs):
            if topic not in wanted:
                self._unsubscribe(topic)
        missing = [t for t in wanted if t not in self._topic_subs]
        if not missing:
            self._waiting = {}
            return
        advertised = dict(self.get_topic_names_and_types())
        waiting: dict[str, str] = {}
        for topic in missing:
            types = advertised.get(topic)
            publishers = self.get_publishers_info_by_topic(topic) if types else []
            if not types or not publishers:
                waiting[topic] = "no publisher yet"
                continue
            if len(types) > 1:
                waiting[topic] = f"advertised with several types {types}: not recorded"
                continue
            try:
                self._subscribe(recorder, topic, types[0], publishers)
            except (ImportError, AttributeError, ValueError, RecorderError) as exc:
                waiting[topic] = f"cannot record {types[0]}: {exc}"
        for topic, why in waiting.items():
            if self._waiting.get(topic) != why and why != "no publisher yet":
                self.get_logger().error(f"{topic}: {why}")
        self._waiting = waiting

    def _subscribe(self, recorder: BagRecorder, topic: str, type_name: str, publishers: list) -> None:
        profiles = [offered_qos(info.qos_profile) for info in publishers]
        type_hash = str(getattr(publishers[0], "topic_type_hash", ""))
        type_hash = type_hash if type_hash.startswith("RIHS01_") else None
        msg_type = message_class(type_name)
        recorder.add_topic(topic, type_name, profiles, type_hash=type_hash)
        reliability, durability = adapted_subscription_qos(profiles)
        qos = QoSProfile(
            history=HistoryPolicy.KEEP_LAST,
            depth=int(self.p["subscription_depth"]),
            reliability=ReliabilityPolicy.RELIABLE if reliability == "reliable" else ReliabilityPolicy.BEST_EFFORT,
            durability=(DurabilityPolicy.TRANSIENT_LOCAL if durability == "transient_local"
                        else DurabilityPolicy.VOLATILE),
        )
        if _CALLBACK_WITH_INFO:
            callback = functools.partial(self._on_message, topic)
        else:
            callback = functools.partial(self._on_message_without_info, topic)
        self._topic_subs[topic] = self.create_subscription(msg_type, topic, callback, qos, raw=True)
        self.transport_lost.setdefault(topic, 0)
        self.get_logger().info(f"recording {topic} ({type_name}, {reliability}, {durability})")

    def _on_message_without_info(self, topic: str, data: bytes) -> None:
        self._on_message(topic, data, {})

    def _on_message(self, topic: str, data: bytes, info: dict) -> None:
        recorder = self._recorder
        if recorder is None:
            return
        now = self.get_clock().now().nanoseconds
        sequence = info.get("publication_sequence_number")
        if sequence is not None:
            gid = info.get("publisher_gid") or {}
            key = (topic, bytes(gid.get("data", b"")))
            last = self._sequence.get(key)
            if last is not None and sequence > last + 1:
                self.transport_lost[topic] = self.transport_lost.get(topic, 0) + int(sequence - last - 1)
            if last is None or sequence > last:
                self._sequence[key] = sequence
        if self._gate is not None:
            self._write_held(recorder, self._gate.push(topic, data, now, info.get("source_timestamp") or now,
                                                       sequence or 0))
            return
        recorder.write(topic, data, now, info.get("source_timestamp") or now, sequence or 0)

    # ---------------------------------------------------------------- marked mode
    def _gate_config(self) -> GateConfig:
        return GateConfig(
            frame_topics=frozenset(self._resolve(str(t)) for t in self.p["mark_frame_topics"]),
            tolerance_ns=round(float(self.p["mark_stamp_tolerance_s"]) * 1e9),
            context_ns=round(float(self.p["mark_context_s"]) * 1e9),
            delay_ns=round(float(self.p["mark_delay_s"]) * 1e9),
            max_bytes=int(self.p["mark_buffer_mb"]) * MB,
        )

    @staticmethod
    def _write_held(recorder: BagRecorder, held: list) -> None:
        for h in held:
            recorder.write(h.topic, h.data, h.receive_ns, h.publish_ns, h.sequence)

    def _release_marked(self) -> None:
        recorder, gate = self._recorder, self._gate
        if recorder is not None and gate is not None:
            self._write_held(recorder, gate.release(self.get_clock().now().nanoseconds))

    def mark(self, stamp_ns: int) -> bool:
        """Keep the camera frame stamped ``stamp_ns`` (and its sensor context); False when not recording marked
        frames or already marked."""
        gate = self._gate
        return gate is not None and gate.mark(int(stamp_ns))

    def _on_mark_msg(self, msg: Header) -> None:
        self.mark(msg.stamp.sec * 1_000_000_000 + msg.stamp.nanosec)

    def _on_mark(self, _request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        gate = self._gate
        stamp = gate.newest_frame_stamp if gate is not None else None
        if stamp is None:
            response.success = False
            response.message = "not recording" if gate is None else "no camera frame waiting to be marked"
            return response
        response.success = self.mark(stamp)
        response.message = f"marked the frame stamped {stamp / 1e9:.3f} s" if response.success else "already marked"
        return response

    # ---------------------------------------------------------------- services
    def _on_start(self, _request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        response.success, response.message = self.start()
        return response

    def _on_stop(self, _request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        response.success, response.message = self.stop()
        return response

    def _on_pause(self, request: SetBool.Request, response: SetBool.Response) -> SetBool.Response:
        recorder = self._recorder
        if recorder is None:
            response.success, response.message = False, "not recording"
            return response
        try:
            recorder.pause() if request.data else recorder.resume()
        except RecorderError as exc:
            response.success, response.message = False, str(exc)
            return response
        response.success, response.message = True, f"{recorder.state}: {recorder.path}"
        return response

    def _on_split(self, _request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        recorder = self._recorder
        if recorder is None:
            response.success, response.message = False, "not recording"
            return response
        try:
            finished = recorder.split()
        except RecorderError as exc:
            response.success, response.message = False, str(exc)
            return response
        response.success = True
        response.message = f"finished {finished}" if finished else "current file was empty: nothing to split"
        return response

    # ---------------------------------------------------------------- diagnostics
    def _log_losses(self, stats: RecorderStats) -> None:
        lost = sum(self.transport_lost.values())
        if stats.dropped > self._reported_drops or lost > self._reported_lost:
            per_topic = ", ".join(
                f"{name}: {s.dropped} dropped, {self.transport_lost.get(name, 0)} lost"
                for name, s in stats.topics.items()
                if s.dropped or self.transport_lost.get(name, 0)
            )
            self.get_logger().warning(
                f"cannot keep up: {stats.dropped} messages dropped (writer queue full), {lost} lost before "
                f"reaching the recorder ({per_topic})"
            )
            self._reported_drops, self._reported_lost = stats.dropped, lost

    def diagnostics_values(self) -> tuple[bytes, str, dict[str, object]]:
        """(level, message, key/values) of the recorder's health right now."""
        recorder = self._recorder
        stats = recorder.stats if recorder is not None else self.last_stats
        if recorder is not None:
            self._rate.add(time.monotonic(), stats.written, stats.bytes_written)
        level, message, values = recorder_health(stats, recorder is not None, self._rate.rates(),
                                                 self.transport_lost, self._waiting, self.last_error)
        if self.p["record_mode"] == "marked":
            gate = self._gate
            counts = gate.stats.as_dict() if gate is not None else self.last_gate
            values.update({f"marked {k}": v for k, v in counts.items()})
            values["marked waiting_mb"] = gate.waiting_bytes / MB if gate is not None else 0.0
        return level, message, values

    def _publish_diagnostics(self) -> None:
        if self._recorder is not None:
            self._log_losses(self._recorder.stats)
        publish_node_diagnostics(self, self.diag_pub, "capture_node", *self.diagnostics_values())

    def destroy_node(self) -> None:
        """Close the bag cleanly, then the node (also after a constructor that failed half way)."""
        if getattr(self, "_recorder", None) is not None:
            self.stop()
        super().destroy_node()


def main(args: list[str] | None = None) -> None:
    """Entry point of ``ros2 run forest_perception capture_node``."""
    run_node(CaptureNode, "capture_node", args, PARAMS, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
