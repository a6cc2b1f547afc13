"""sensor_sync_node: synchronised camera/IMU/GPS/wheel frame sets, fused odometry and GPS in local ENU.

Topics, services and parameters: docs/nodes.md (sensor_sync_node).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseWithCovarianceStamped
from nav_msgs.msg import Odometry
from rclpy.clock import JumpThreshold
from rclpy.duration import Duration
from rclpy.node import Node
from rclpy.qos import QoSProfile, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, Image, Imu, JointState, NavSatFix

from forest_perception import msgs
from forest_perception.frames import WHEEL_JOINTS, RoverGeometry
from forest_perception.nodes.common import ParamSpec, add_validated_updates, changed, declare_parameters, run_node
from forest_perception.sync import (
    KINDS,
    TOPICS,
    EnuConverter,
    OdometryConfig,
    OdometryFusion,
    OdometryState,
    SensorSync,
    SyncConfig,
    SyncedFrame,
    reading_from_msg,
    stamp_ns,
)
from forest_perception.sync.health import sync_health

DEPTH_ENCODINGS = ("32FC1", "16UC1")
_GEOMETRY = RoverGeometry()
_SYNC_PARAMS = {
    "queue_size": "queue_size",
    "slop_s": "slop_s",
    "use_depth": "use_depth",
    "max_wait_s": "max_wait_s",
    "max_gap_s": "max_gap_s",
    "gps_tolerance_s": "gps_tolerance_s",
    "missing_after_s": "missing_after_s",
    "clock_jump_s": "clock_jump_s",
    "buffer_s": "buffer_s",
    "release_partial": "release_partial",
}
_ODOM_PARAMS = {
    "wheel_radius_m": "wheel_radius_m",
    "track_width_m": "track_width_m",
    "use_imu_yaw_rate": "use_imu",
    "wheel_error_per_m": "wheel_error_per_m",
    "yaw_slip_fraction": "yaw_slip_fraction",
    "gyro_noise_density": "gyro_noise_density",
    "gyro_bias_sigma": "gyro_bias_sigma",
}
_ENU_PARAMS = ("enu_origin_from_first_fix", "enu_origin_latitude_deg", "enu_origin_longitude_deg",
               "enu_origin_altitude_m")
_UNOBSERVED = 1e6
_TOPICS = TOPICS


def check_image(msg: Image, what: str, encodings: tuple[str, ...] | None = None) -> Image:
    """``msg`` if its size, step and data agree (and its encoding is one of ``encodings``), else ValueError."""
    if encodings is not None and msg.encoding not in encodings:
        raise ValueError(f"{what} encoding {msg.encoding!r} is not one of {list(encodings)}")
    if msg.height == 0 or msg.width == 0:
        raise ValueError(f"{what} is empty ({msg.width}x{msg.height})")
    if msg.step < msg.width:
        raise ValueError(f"{what} step {msg.step} is smaller than its width {msg.width}")
    if len(msg.data) != msg.step * msg.height:
        raise ValueError(f"{what} data has {len(msg.data)} bytes, expected step*height = {msg.step * msg.height}")
    return msg


def _sensor_qos(depth: int) -> QoSProfile:
    # qos_profile_sensor_data (best effort, volatile) with a deeper queue: rclpy's executor takes one
    # message per subscription per turn, so on a busy CPU the 200 Hz IMU queue drains behind the
    # camera; keep up to buffer_s of it rather than overwrite it (frames wait for a lagging stream)
    qos = QoSProfile(depth=depth)
    qos.history = qos_profile_sensor_data.history
    qos.reliability = qos_profile_sensor_data.reliability
    qos.durability = qos_profile_sensor_data.durability
    return qos


PARAMS = [
    ParamSpec("queue_size", 10, "messages kept per camera stream while waiting for partners", (1, 1000)),
    ParamSpec("slop_s", 0.02, "largest spread of colour/depth/camera_info stamps in one set, s", (0.0, 1.0)),
    ParamSpec("use_depth", True, "match a depth image into every set (false: colour + camera_info only)"),
    ParamSpec("max_wait_s", 0.3, "how long a frame waits (sensor time) for partners that may not come, s", (0.0, 5.0)),
    ParamSpec("max_gap_s", 0.1, "farthest an IMU/wheel sample may be from the frame stamp, s", (0.001, 5.0)),
    ParamSpec("gps_tolerance_s", 1.0, "a fix older than this at the frame stamp is stale, s", (0.01, 600.0)),
    ParamSpec("missing_after_s", 1.0, "a sensor silent this long is missing (frames stop waiting), s", (0.05, 600.0)),
    ParamSpec("clock_jump_s", 1.0, "going back in time by more than this is a clock reset, s", (0.01, 3600.0)),
    ParamSpec("buffer_s", 2.0, "time span of IMU and wheel samples kept, s", (0.1, 60.0)),
    ParamSpec("release_partial", True, "publish a colour image whose partners never came (with what it has)"),
    ParamSpec("wheel_radius_m", _GEOMETRY.wheel_radius_m, "wheel radius, m", (0.005, 2.0)),
    ParamSpec("track_width_m", _GEOMETRY.track_width_m, "distance between the left and right wheels, m", (0.02, 10.0)),
    ParamSpec("left_wheel_joint", WHEEL_JOINTS[0], "joint_states name of the left wheel"),
    ParamSpec("right_wheel_joint", WHEEL_JOINTS[1], "joint_states name of the right wheel"),
    ParamSpec("use_imu_yaw_rate", True, "fuse the gyro's yaw rate into odom/fused (false: wheels only)"),
    ParamSpec("wheel_error_per_m", 0.01, "wheel travel error std per sqrt(m)", (0.0, 1.0)),
    ParamSpec("yaw_slip_fraction", 0.05, "std of the wheels' turn as a fraction of it (skid steer)", (0.0, 1.0)),
    ParamSpec("gyro_noise_density", 2.4e-4, "gyro white noise, rad/s/sqrt(Hz)", (0.0, 1.0)),
    ParamSpec("gyro_bias_sigma", 1.7e-3, "gyro bias uncertainty, rad/s", (0.0, 1.0)),
    ParamSpec("enu_origin_from_first_fix", True, "ENU origin at the first good fix (false: the enu_origin_* values)"),
    ParamSpec("enu_origin_latitude_deg", 0.0, "ENU origin latitude (WGS84)", (-90.0, 90.0)),
    ParamSpec("enu_origin_longitude_deg", 0.0, "ENU origin longitude (WGS84)", (-180.0, 180.0)),
    ParamSpec("enu_origin_altitude_m", 0.0, "ENU origin ellipsoidal altitude, m", (-1000.0, 10000.0)),
    ParamSpec("odom_frame_id", "odom", "frame of odom/fused (REP 105)"),
    ParamSpec("base_frame_id", "base_link", "child frame of odom/fused"),
    ParamSpec("enu_frame_id", "enu", "frame of gps/enu"),
    ParamSpec("diagnostics_period_s", 1.0, "period of /diagnostics (read-only), s", (0.1, 60.0), read_only=True),
]


class SensorSyncNode(Node):
    """Thin ROS wrapper over :class:`SensorSync`, :class:`OdometryFusion` and :class:`EnuConverter`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("sensor_sync_node", **kwargs)
        self.p = declare_parameters(self, PARAMS, self._validate)
        self._lock = threading.Lock()
        self.sync = SensorSync(self._sync_config(self.p))
        self.fusion = OdometryFusion(self._odometry_config(self.p))
        self.enu = EnuConverter(self._enu_origin(self.p))
        self.malformed = {k: 0 for k in KINDS}
        self.published = {"frames": 0, "odom": 0, "enu": 0}
        self.last_error = ""
        self._imu_meta: tuple[str, list[float], list[float], list[float]] | None = None
        self._gps_meta: tuple[str, int] = ("gps_link", NavSatFix.COVARIANCE_TYPE_UNKNOWN)
        self._last_message_wall = time.monotonic()
        self._watermark_at_message: int | None = None
        self._missing_reported: set[str] = set()
        self._resets_reported = 0
        self._last_frame_flags: frozenset[str] = frozenset()

        sensor = qos_profile_sensor_data
        reliable = QoSProfile(depth=10)
        self.pub = {
            "image": self.create_publisher(Image, "sync/image", sensor),
            "depth": self.create_publisher(Image, "sync/depth", sensor),
            "camera_info": self.create_publisher(CameraInfo, "sync/camera_info", sensor),
            "imu": self.create_publisher(Imu, "sync/imu", sensor),
            "gps": self.create_publisher(NavSatFix, "sync/gps", sensor),
            "joints": self.create_publisher(JointState, "sync/joint_states", sensor),
            "odom": self.create_publisher(Odometry, "odom/fused", reliable),
            "enu": self.create_publisher(PoseWithCovarianceStamped, "gps/enu", reliable),
        }
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", reliable)
        self.create_subscription(Image, _TOPICS["image"], self._on_image, _sensor_qos(10))
        self.create_subscription(Image, _TOPICS["depth"], self._on_depth, _sensor_qos(10))
        self.create_subscription(CameraInfo, _TOPICS["camera_info"], self._on_camera_info, _sensor_qos(10))
        self.create_subscription(Imu, _TOPICS["imu"], self._on_imu, _sensor_qos(400))
        self.create_subscription(NavSatFix, _TOPICS["gps"], self._on_gps, _sensor_qos(10))
        self.create_subscription(JointState, _TOPICS["joints"], self._on_joints, _sensor_qos(100))
        add_validated_updates(self, PARAMS, lambda: self.p, self._validate, self._commit)
        self._jump_handle = self.get_clock().create_jump_callback(
            JumpThreshold(
                min_forward=None,
                min_backward=Duration(nanoseconds=-round(self.p["clock_jump_s"] * 1e9)),
                on_clock_change=False,
            ),
            post_callback=self._on_clock_jump,
        )
        self.create_timer(self.p["diagnostics_period_s"], self._publish_diagnostics)
        self.create_timer(0.05, self._on_idle)

    # ---------------------------------------------------------------- parameters
    @staticmethod
    def _sync_config(p: dict) -> SyncConfig:
        return SyncConfig(**{field: p[name] for name, field in _SYNC_PARAMS.items()})

    @staticmethod
    def _odometry_config(p: dict) -> OdometryConfig:
        return OdometryConfig(**{field: p[name] for name, field in _ODOM_PARAMS.items()})

    @staticmethod
    def _enu_origin(p: dict) -> tuple[float, float, float] | None:
        if p["enu_origin_from_first_fix"]:
            return None
        return (p["enu_origin_latitude_deg"], p["enu_origin_longitude_deg"], p["enu_origin_altitude_m"])

    def _validate(self, p: dict) -> str:
        """Empty when ``p`` is a usable set of parameters, else the reason."""
        try:
            self._sync_config(p).validate()
            self._odometry_config(p).validate()
            EnuConverter(self._enu_origin(p))
        except ValueError as exc:
            return str(exc)
        left, right = p["left_wheel_joint"], p["right_wheel_joint"]
        if not left or not right or left == right:
            return f"left_wheel_joint and right_wheel_joint must be two different names, got {left!r} and {right!r}"
        for name in ("odom_frame_id", "base_frame_id", "enu_frame_id"):
            if not p[name]:
                return f"{name} must not be empty"
        return ""

    def _commit(self, old: dict, new: dict) -> None:
        frames: list[SyncedFrame] = []
        with self._lock:
            self.p = new
            if changed(old, new, list(_SYNC_PARAMS)):
                frames = self.sync.reconfigure(self._sync_config(new))
            if changed(old, new, list(_ODOM_PARAMS)):
                self.fusion.set_config(self._odometry_config(new))
            if changed(old, new, list(_ENU_PARAMS)):
                self.enu = EnuConverter(self._enu_origin(new))
        self._publish_frames(frames)

    # ---------------------------------------------------------------- input
    def _count_malformed(self, kind: str, error: str) -> None:
        with self._lock:
            self.malformed[kind] += 1
            self.last_error = error
        self.get_logger().warning(f"dropped {_TOPICS[kind]}: {error}", throttle_duration_sec=5.0)

    def _feed(self, kind: str, msg: Any, value: Any, covariance: Any = None) -> bool:
        """Hand one converted sample to the core and publish the frames it finishes; False when refused."""
        try:
            with self._lock:
                frames = self.sync.add(kind, stamp_ns(msg), value, covariance)
                events = self.sync.pop_events()
                if events:
                    self.fusion.reset()
                self._last_message_wall = time.monotonic()
                self._watermark_at_message = self.sync.watermark_ns
        except ValueError as exc:
            self._count_malformed(kind, str(exc))
            return False
        for event in events:
            self.get_logger().warning(event.message)
        self._publish_frames(frames)
        return True

    def _on_image(self, msg: Image) -> None:
        try:
            check_image(msg, "image")
        except ValueError as exc:
            self._count_malformed("image", str(exc))
            return
        self._feed("image", msg, msg)

    def _on_depth(self, msg: Image) -> None:
        try:
            check_image(msg, "depth image", DEPTH_ENCODINGS)
        except ValueError as exc:
            self._count_malformed("depth", str(exc))
            return
        self._feed("depth", msg, msg)

    def _on_camera_info(self, msg: CameraInfo) -> None:
        try:
            msgs.camera_matrix_from_info(msg)
        except ValueError as exc:
            self._count_malformed("camera_info", str(exc))
            return
        self._feed("camera_info", msg, msg)

    def _on_imu(self, msg: Imu) -> None:
        try:
            sample, _ = reading_from_msg("imu", msg)
        except ValueError as exc:
            self._count_malformed("imu", str(exc))
            return
        with self._lock:
            self._imu_meta = (
                msg.header.frame_id,
                list(msg.orientation_covariance),
                list(msg.angular_velocity_covariance),
                list(msg.linear_acceleration_covariance),
            )
        if not self._feed("imu", msg, sample):
            return
        with self._lock:
            self.fusion.add_imu(stamp_ns(msg), sample.angular_velocity[2])

    def _on_joints(self, msg: JointState) -> None:
        try:
            wheels, _ = reading_from_msg("joints", msg, self.p["left_wheel_joint"], self.p["right_wheel_joint"])
        except ValueError as exc:
            self._count_malformed("joints", str(exc))
            return
        if not self._feed("joints", msg, wheels):
            return
        with self._lock:
            state = self.fusion.add_wheels(
                stamp_ns(msg), wheels.left_position, wheels.right_position, wheels.left_velocity, wheels.right_velocity
            )
        if state is not None:
            self._publish_odometry(state)

    def _on_gps(self, msg: NavSatFix) -> None:
        try:
            fix, covariance = reading_from_msg("gps", msg)
        except ValueError as exc:
            self._count_malformed("gps", str(exc))
            return
        with self._lock:
            self._gps_meta = (msg.header.frame_id, int(msg.position_covariance_type))
        if not self._feed("gps", msg, fix, covariance) or (fix.status is not None and fix.status < 0):
            return
        try:
            with self._lock:
                position = self.enu.convert(fix, covariance)
        except ValueError as exc:
            self._count_malformed("gps", str(exc))
            return
        out = PoseWithCovarianceStamped()
        out.header.stamp = msg.header.stamp
        out.header.frame_id = self.p["enu_frame_id"]
        out.pose.pose.position.x, out.pose.pose.position.y = position.east, position.north
        out.pose.pose.position.z = position.up
        out.pose.pose.orientation.w = 1.0
        cov = np.diag([0.0, 0.0, 0.0, _UNOBSERVED, _UNOBSERVED, _UNOBSERVED])
        cov[:3, :3] = position.covariance
        out.pose.covariance = [float(v) for v in cov.ravel()]
        self.pub["enu"].publish(out)
        self.published["enu"] += 1

    def _on_clock_jump(self, jump: Any) -> None:
        now_ns = self.get_clock().now().nanoseconds
        with self._lock:
            watermark = self.sync.watermark_ns
            # stamps may already have told the core (a sensor message came before the /clock one)
            if watermark is None or watermark <= now_ns + round(self.p["clock_jump_s"] * 1e9):
                return
            frames = self.sync.reset(
                f"/clock jumped back {-jump.delta.nanoseconds * 1e-9:.3f} s: clock reset, buffers cleared", now_ns
            )
            self.sync.pop_events()
            self.fusion.reset()
        self.get_logger().warning(f"/clock jumped back {-jump.delta.nanoseconds * 1e-9:.3f} s: buffers cleared")
        self._publish_frames(frames)

    def _on_idle(self) -> None:
        """On a quiet wire, let waiting frames expire as if sensor time had gone on."""
        idle_s = time.monotonic() - self._last_message_wall
        if idle_s < max(self.p["max_wait_s"], 0.05):
            return
        with self._lock:
            base = self._watermark_at_message
            if base is None or self.sync.pending == 0:
                return
            frames = self.sync.advance(base + round(idle_s * 1e9))
        self._publish_frames(frames)

    # ---------------------------------------------------------------- output
    def _publish_frames(self, frames: list[SyncedFrame]) -> None:
        for frame in frames:
            self._publish_frame(frame)

    def _publish_frame(self, frame: SyncedFrame) -> None:
        stamp = msgs.time_from_ns(frame.stamp_ns)
        self.pub["image"].publish(frame.image)
        if frame.depth is not None:
            frame.depth.header.stamp = stamp
            self.pub["depth"].publish(frame.depth)
        if frame.camera_info is not None:
            frame.camera_info.header.stamp = stamp
            self.pub["camera_info"].publish(frame.camera_info)
        with self._lock:
            imu_meta, gps_meta = self._imu_meta, self._gps_meta
            left, right = self.p["left_wheel_joint"], self.p["right_wheel_joint"]
            self._last_frame_flags = frame.flags
            self.published["frames"] += 1
        if frame.imu is not None and imu_meta is not None:
            frame_id, cov_o, cov_w, cov_a = imu_meta
            orientation = frame.imu.orientation or (0.0, 0.0, 0.0, 1.0)
            if frame.imu.orientation is None:
                cov_o = [-1.0] + [0.0] * 8  # REP 145: no orientation estimate
            self.pub["imu"].publish(
                msgs.imu_msg(stamp, frame_id, np.asarray(orientation), np.asarray(frame.imu.angular_velocity),
                             np.asarray(frame.imu.linear_acceleration), np.asarray(cov_o), np.asarray(cov_w),
                             np.asarray(cov_a))
            )
        if frame.wheels is not None:
            w = frame.wheels
            velocities = (
                [w.left_velocity, w.right_velocity] if w.left_velocity is not None and w.right_velocity is not None
                else []
            )
            out = msgs.joint_state_msg(stamp, (left, right), np.array([w.left_position, w.right_position]), velocities)
            self.pub["joints"].publish(out)
        if frame.gps_fresh:
            assert frame.gps is not None
            fix = frame.gps.fix
            frame_id, cov_type = gps_meta
            cov = np.zeros(9) if frame.gps.covariance is None else np.asarray(frame.gps.covariance)
            if frame.gps.covariance is None:
                cov_type = NavSatFix.COVARIANCE_TYPE_UNKNOWN
            self.pub["gps"].publish(
                msgs.navsat_msg(stamp, frame_id, fix.latitude, fix.longitude,
                                float("nan") if fix.altitude is None else fix.altitude,
                                0 if fix.status is None else fix.status, cov, cov_type)
            )

    def _publish_odometry(self, state: OdometryState) -> None:
        self.pub["odom"].publish(
            msgs.odometry_msg(
                msgs.time_from_ns(state.stamp_ns),
                self.p["odom_frame_id"],
                self.p["base_frame_id"],
                (state.x, state.y, 0.0),
                state.quaternion_xyzw(),
                (state.v, 0.0, 0.0),
                (0.0, 0.0, state.w),
                state.pose_covariance,
                state.twist_covariance,
            )
        )
        self.published["odom"] += 1

    # ---------------------------------------------------------------- diagnostics
    def diagnostics_values(self) -> tuple[bytes, str, dict[str, object], dict[str, tuple[bytes, str, dict]]]:
        """(level, message, key/values) of the whole node and the same per sensor."""
        with self._lock:
            (level, message, values), per_sensor = sync_health(
                self.sync.summary(), dict(self.malformed), self.fusion.state(), dict(self.fusion.counts),
                dict(self.published), self._last_frame_flags, self.p["use_depth"], self.last_error,
                self._resets_reported)
        return level, message, values, per_sensor

    def _publish_diagnostics(self) -> None:
        level, message, values, per_sensor = self.diagnostics_values()
        self._resets_reported = int(values["clock_resets"])
        missing = set(str(values["missing_sensors"]).split(",")) - {"none"}
        for kind in sorted(missing - self._missing_reported):
            self.get_logger().warning(f"{_TOPICS[kind]} is missing: frames go on without it")
        for kind in sorted(self._missing_reported - missing):
            self.get_logger().info(f"{_TOPICS[kind]} is back")
        self._missing_reported = missing
        namespace = self.get_namespace().strip("/") or "sensor_sync_node"
        array = DiagnosticArray()
        array.header.stamp = self.get_clock().now().to_msg()
        array.status.append(msgs.diagnostic_status(f"sensor_sync_node: {namespace}", namespace, level, message, values))
        for kind, (s_level, s_message, s_values) in per_sensor.items():
            array.status.append(
                msgs.diagnostic_status(f"sensor_sync_node: {namespace} {kind}", namespace, s_level, s_message, s_values)
            )
        self.diag_pub.publish(array)


def main(args: list[str] | None = None) -> None:
    """Entry point of ``ros2 run forest_perception sensor_sync_node``."""
    run_node(SensorSyncNode, "sensor_sync_node", args, PARAMS, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
