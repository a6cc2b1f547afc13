"""Conversions between numpy/core dataclasses and ROS 2 messages.

Only message packages are imported here, never rclpy, so the conversions are unit-tested
without a ROS context. Image payloads are filled with ``ndarray.tobytes()``: assigning a
numpy array to ``Image.data`` is about 100x slower.
"""

from __future__ import annotations

import math

import numpy as np
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticStatus, KeyValue
from geometry_msgs.msg import Quaternion
from nav_msgs.msg import Odometry
from sensor_msgs.msg import (
    CameraInfo,
    Image,
    Imu,
    JointState,
    LaserScan,
    NavSatFix,
    NavSatStatus,
    PointCloud2,
    PointField,
)

from forest_perception.frames import CameraIntrinsics

_ENCODINGS = {
    "rgb8": (np.uint8, 3),
    "bgr8": (np.uint8, 3),
    "rgba8": (np.uint8, 4),
    "bgra8": (np.uint8, 4),
    "mono8": (np.uint8, 1),
    "mono16": (np.uint16, 1),
    "16UC1": (np.uint16, 1),
    "32FC1": (np.float32, 1),
}


def time_from_ns(nanoseconds: int) -> Time:
    """builtin_interfaces/Time from integer nanoseconds."""
    nanoseconds = int(nanoseconds)
    if nanoseconds < 0:
        raise ValueError(f"stamp must be non-negative, got {nanoseconds} ns")
    return Time(sec=nanoseconds // 1_000_000_000, nanosec=nanoseconds % 1_000_000_000)


def time_from_sec(seconds: float) -> Time:
    """builtin_interfaces/Time from float seconds (rounded to the nanosecond)."""
    if not math.isfinite(seconds):
        raise ValueError(f"stamp must be finite, got {seconds}")
    return time_from_ns(round(seconds * 1e9))


def stamp_to_sec(stamp: Time) -> float:
    """Float seconds of a builtin_interfaces/Time."""
    return stamp.sec + stamp.nanosec * 1e-9


def image_from_array(array: np.ndarray, encoding: str, stamp: Time, frame_id: str) -> Image:
    """sensor_msgs/Image from an HxW or HxWxC array in the given encoding."""
    if encoding not in _ENCODINGS:
        raise ValueError(f"unsupported image encoding {encoding!r}; known: {sorted(_ENCODINGS)}")
    dtype, channels = _ENCODINGS[encoding]
    array = np.asarray(array)
    expected_ndim = 2 if channels == 1 else 3
    if array.ndim != expected_ndim or (channels > 1 and array.shape[2] != channels):
        raise ValueError(f"{encoding} needs shape (H, W{'' if channels == 1 else f', {channels}'}), got {array.shape}")
    if array.dtype != dtype:
        raise ValueError(f"{encoding} needs dtype {np.dtype(dtype).name}, got {array.dtype}")
    array = np.ascontiguousarray(array)
    msg = Image()
    msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    msg.height, msg.width = int(array.shape[0]), int(array.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = int(array.strides[0])
    msg.data = array.tobytes()
    return msg


def array_from_image(msg: Image) -> np.ndarray:
    """numpy view of a sensor_msgs/Image; raises ValueError on a malformed message."""
    if msg.encoding not in _ENCODINGS:
        raise ValueError(f"unsupported image encoding {msg.encoding!r}; known: {sorted(_ENCODINGS)}")
    dtype, channels = _ENCODINGS[msg.encoding]
    itemsize = np.dtype(dtype).itemsize
    if msg.height == 0 or msg.width == 0:
        raise ValueError(f"empty image ({msg.width}x{msg.height})")
    row_bytes = msg.width * channels * itemsize
    if msg.step < row_bytes:
        raise ValueError(f"step {msg.step} is smaller than width*channels*itemsize = {row_bytes}")
    if len(msg.data) != msg.step * msg.height:
        raise ValueError(f"data has {len(msg.data)} bytes, expected step*height = {msg.step * msg.height}")
    buf = np.frombuffer(bytes(msg.data) if not isinstance(msg.data, bytes) else msg.data, dtype=np.uint8)
    rows = buf.reshape(msg.height, msg.step)[:, :row_bytes]
    order = ">" if msg.is_bigendian else "<"
    out = np.ascontiguousarray(rows).view(np.dtype(dtype).newbyteorder(order))
    shape = (msg.height, msg.width) if channels == 1 else (msg.height, msg.width, channels)
    return out.reshape(shape).astype(dtype, copy=False)


def camera_info_from_intrinsics(intrinsics: CameraIntrinsics, stamp: Time, frame_id: str) -> CameraInfo:
    """sensor_msgs/CameraInfo of an undistorted pinhole camera (plumb_bob, zero distortion)."""
    msg = CameraInfo()
    msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    msg.width, msg.height = int(intrinsics.width), int(intrinsics.height)
    msg.distortion_model = "plumb_bob"
    msg.d = [0.0] * 5
    fx, fy, cx, cy = intrinsics.fx, intrinsics.fy, intrinsics.cx, intrinsics.cy
    msg.k = [fx, 0.0, cx, 0.0, fy, cy, 0.0, 0.0, 1.0]
    msg.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    msg.p = [fx, 0.0, cx, 0.0, 0.0, fy, cy, 0.0, 0.0, 0.0, 1.0, 0.0]
    return msg


def quaternion_msg(xyzw: np.ndarray | tuple[float, float, float, float]) -> Quaternion:
    """geometry_msgs/Quaternion from (x, y, z, w)."""
    x, y, z, w = (float(v) for v in xyzw)
    return Quaternion(x=x, y=y, z=z, w=w)


def imu_msg(
    stamp: Time,
    frame_id: str,
    orientation_xyzw: np.ndarray,
    angular_velocity: np.ndarray,
    linear_acceleration: np.ndarray,
    orientation_covariance: np.ndarray,
    angular_velocity_covariance: np.ndarray,
    linear_acceleration_covariance: np.ndarray,
) -> Imu:
    """sensor_msgs/Imu (rad/s, m/s^2 including gravity, 9-element covariances)."""
    msg = Imu()
    msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    msg.orientation = quaternion_msg(orientation_xyzw)
    wx, wy, wz = (float(v) for v in angular_velocity)
    ax, ay, az = (float(v) for v in linear_acceleration)
    msg.angular_velocity.x, msg.angular_velocity.y, msg.angular_velocity.z = wx, wy, wz
    msg.linear_acceleration.x, msg.linear_acceleration.y, msg.linear_acceleration.z = ax, ay, az
    msg.orientation_covariance = [float(v) for v in np.ravel(orientation_covariance)]
    msg.angular_velocity_covariance = [float(v) for v in np.ravel(angular_velocity_covariance)]
    msg.linear_acceleration_covariance = [float(v) for v in np.ravel(linear_acceleration_covariance)]
    return msg


def navsat_msg(
    stamp: Time,
    frame_id: str,
    latitude: float,
    longitude: float,
    altitude: float,
    status: int,
    covariance: np.ndarray,
    covariance_type: int,
) -> NavSatFix:
    """sensor_msgs/NavSatFix (WGS84 degrees, ENU covariance in m^2)."""
    msg = NavSatFix()
    msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    msg.status.status = int(status)
    msg.status.service = NavSatStatus.SERVICE_GPS
    msg.latitude, msg.longitude, msg.altitude = float(latitude), float(longitude), float(altitude)
    msg.position_covariance = [float(v) for v in np.ravel(covariance)]
    msg.position_covariance_type = int(covariance_type)
    return msg


def joint_state_msg(stamp: Time, names: tuple[str, ...], positions: np.ndarray, velocities: np.ndarray) -> JointState:
    """sensor_msgs/JointState for the wheel joints (rad, rad/s)."""
    msg = JointState()
    msg.header.stamp = stamp
    msg.name = list(names)
    msg.position = [float(v) for v in positions]
    msg.velocity = [float(v) for v in velocities]
    return msg


def odometry_msg(
    stamp: Time,
    odom_frame: str,
    base_frame: str,
    position: np.ndarray,
    orientation_xyzw: np.ndarray,
    linear: np.ndarray,
    angular: np.ndarray,
    pose_covariance: np.ndarray,
    twist_covariance: np.ndarray,
) -> Odometry:
    """nav_msgs/Odometry, pose in ``odom_frame``, twist in ``base_frame`` (REP 105)."""
    msg = Odometry()
    msg.header.stamp = stamp
    msg.header.frame_id = odom_frame
    msg.child_frame_id = base_frame
    px, py, pz = (float(v) for v in position)
    msg.pose.pose.position.x, msg.pose.pose.position.y, msg.pose.pose.position.z = px, py, pz
    msg.pose.pose.orientation = quaternion_msg(orientation_xyzw)
    lx, ly, lz = (float(v) for v in linear)
    ax, ay, az = (float(v) for v in angular)
    msg.twist.twist.linear.x, msg.twist.twist.linear.y, msg.twist.twist.linear.z = lx, ly, lz
    msg.twist.twist.angular.x, msg.twist.twist.angular.y, msg.twist.twist.angular.z = ax, ay, az
    msg.pose.covariance = [float(v) for v in np.ravel(pose_covariance)]
    msg.twist.covariance = [float(v) for v in np.ravel(twist_covariance)]
    return msg


def diagnostic_status(
    name: str, hardware_id: str, level: int | bytes, message: str, values: dict[str, object]
) -> DiagnosticStatus:
    """diagnostic_msgs/DiagnosticStatus with key/values rendered as strings; ``level`` as int or the msg constant."""
    status = DiagnosticStatus()
    status.level = level if isinstance(level, bytes) else bytes([level])
    status.name = name
    status.hardware_id = hardware_id
    status.message = message
    status.values = [
        KeyValue(key=str(k), value=f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in values.items()
    ]
    return status


def camera_matrix_from_info(msg: CameraInfo) -> np.ndarray:
    """3x3 K of a sensor_msgs/CameraInfo; raises ValueError when it is unset or not a camera matrix."""
    K = np.asarray(msg.k, dtype=np.float64).reshape(3, 3)
    if not np.isfinite(K).all() or K[0, 0] <= 0 or K[1, 1] <= 0 or msg.width == 0 or msg.height == 0:
        raise ValueError(f"camera_info has no usable K ({K.ravel().tolist()}, {msg.width}x{msg.height})")
    return K


def pointcloud2_fields() -> list[PointField]:
    """x, y, z float32 PointFields at offsets 0, 4, 8 (point_step 12)."""
    return [PointField(name=n, offset=4 * i, datatype=PointField.FLOAT32, count=1) for i, n in enumerate("xyz")]


def pointcloud2_msg(points: np.ndarray, stamp: Time, frame_id: str) -> PointCloud2:
    """Unordered sensor_msgs/PointCloud2 (height 1) of (N, 3) points, x y z float32 little endian.

    ``is_dense`` is true only when every coordinate is finite.
    """
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must be (N, 3), got shape {points.shape}")
    points = np.ascontiguousarray(points, dtype="<f4")
    msg = PointCloud2()
    msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    msg.height, msg.width = 1, int(points.shape[0])
    msg.fields = pointcloud2_fields()
    msg.is_bigendian = False
    msg.point_step = 12
    msg.row_step = 12 * msg.width
    msg.is_dense = bool(np.isfinite(points).all())
    msg.data = points.tobytes()
    return msg


def array_from_pointcloud2(msg: PointCloud2) -> np.ndarray:
    """(N, 3) float32 x, y, z of a PointCloud2 whose x, y, z fields are FLOAT32 (other fields skipped)."""
    offsets = {f.name: f.offset for f in msg.fields if f.datatype == PointField.FLOAT32}
    if not {"x", "y", "z"} <= set(offsets):
        raise ValueError(f"PointCloud2 needs FLOAT32 x, y, z fields, got {[f.name for f in msg.fields]}")
    n = msg.width * msg.height
    if len(msg.data) < n * msg.point_step:
        raise ValueError(f"PointCloud2 data has {len(msg.data)} bytes, expected {n * msg.point_step}")
    dtype = np.dtype(
        {
            "names": ["x", "y", "z"],
            "formats": [(">" if msg.is_bigendian else "<") + "f4"] * 3,
            "offsets": [offsets["x"], offsets["y"], offsets["z"]],
            "itemsize": msg.point_step,
        }
    )
    data = msg.data if isinstance(msg.data, bytes) else bytes(msg.data)
    rec = np.frombuffer(data, dtype=dtype, count=n)
    return np.stack([rec["x"], rec["y"], rec["z"]], axis=1).astype(np.float32)


def laserscan_msg(
    stamp: Time,
    frame_id: str,
    ranges: np.ndarray,
    angle_min: float,
    angle_increment: float,
    range_min: float,
    range_max: float,
    scan_time: float = 0.0,
) -> LaserScan:
    """sensor_msgs/LaserScan (REP 117: +inf = no return within range); ``angle_max`` follows the ranges."""
    ranges = np.asarray(ranges, dtype=np.float32).ravel()
    msg = LaserScan()
    msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    msg.angle_min = float(angle_min)
    msg.angle_increment = float(angle_increment)
    msg.angle_max = float(angle_min + (len(ranges) - 1) * angle_increment)
    msg.time_increment = 0.0  # every bearing comes from the same exposure
    msg.scan_time = float(scan_time)
    msg.range_min, msg.range_max = float(range_min), float(range_max)
    msg.ranges = ranges
    return msg
