"""ROS messages (rclpy's or rosbags', duck-typed) to the plain values of the sync core."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from forest_perception.frames import WHEEL_JOINTS
from forest_perception.readings import GpsFix, ImuSample, WheelEncoders
from forest_perception.sync.base import NS_PER_S, check_stamp

# Duck-typed: they read the ROS field names, so rclpy messages and the rosbags library's
# deserialised messages both work, and this module still never imports rclpy.
NAVSAT_COVARIANCE_TYPE_UNKNOWN = 0  # sensor_msgs/NavSatFix.COVARIANCE_TYPE_UNKNOWN


def stamp_ns(msg: Any) -> int:
    """Integer nanoseconds of a message's ``header.stamp`` (``ValueError`` when negative)."""
    stamp = msg.header.stamp
    return check_stamp("header", int(stamp.sec) * NS_PER_S + int(stamp.nanosec))


def imu_sample_from_msg(msg: Any) -> ImuSample:
    """The core's ImuSample of a sensor_msgs/Imu (orientation None when ``orientation_covariance[0] == -1``)."""
    w, a, q = msg.angular_velocity, msg.linear_acceleration, msg.orientation
    angular = (w.x, w.y, w.z)
    linear = (a.x, a.y, a.z)
    if not all(math.isfinite(v) for v in angular + linear):
        raise ValueError(
            f"imu has non-finite rates/accelerations: angular_velocity={angular} linear_acceleration={linear}"
        )
    orientation = None
    if len(msg.orientation_covariance) == 0 or msg.orientation_covariance[0] != -1.0:
        orientation = (q.x, q.y, q.z, q.w)
        if not all(math.isfinite(v) for v in orientation) or math.hypot(*orientation) < 1e-6:
            raise ValueError(f"imu orientation is not a finite non-zero quaternion: {orientation}")
    return ImuSample(angular, linear, orientation)


def wheels_from_joint_state(msg: Any, left: str, right: str) -> WheelEncoders:
    """Left/right wheel positions (rad) and velocities (rad/s, None when absent) of a sensor_msgs/JointState."""
    names = list(msg.name)
    missing = [j for j in (left, right) if j not in names]
    if missing:
        raise ValueError(f"joint_states has no wheel joint(s) {missing}; its joints are {names}")
    if len(msg.position) != len(names):
        raise ValueError(f"joint_states has {len(msg.position)} positions for {len(names)} names")
    i, j = names.index(left), names.index(right)
    positions = (float(msg.position[i]), float(msg.position[j]))
    velocities: tuple[float | None, float | None] = (None, None)
    if len(msg.velocity) == len(names):
        velocities = (float(msg.velocity[i]), float(msg.velocity[j]))
    elif len(msg.velocity) != 0:
        raise ValueError(f"joint_states has {len(msg.velocity)} velocities for {len(names)} names")
    values = positions + tuple(v for v in velocities if v is not None)
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"joint_states wheel values are not finite: positions={positions} velocities={velocities}")
    return WheelEncoders(positions[0], positions[1], velocities[0], velocities[1])


def gps_from_navsat(msg: Any) -> tuple[GpsFix, np.ndarray | None]:
    """(GpsFix, ENU covariance or None when unknown) of a sensor_msgs/NavSatFix.

    A no-fix message (status < 0) comes back as such (the core counts it); a fix with a
    non-finite position is malformed (ValueError).
    """
    status = int(msg.status.status)
    lat, lon, alt = float(msg.latitude), float(msg.longitude), float(msg.altitude)
    if status >= 0 and not (math.isfinite(lat) and math.isfinite(lon)):
        raise ValueError(f"gps fix (status {status}) has a non-finite position: latitude={lat} longitude={lon}")
    covariance = None
    if int(msg.position_covariance_type) != NAVSAT_COVARIANCE_TYPE_UNKNOWN:
        covariance = np.asarray(msg.position_covariance, dtype=np.float64)
        if covariance.shape != (9,) or not np.isfinite(covariance).all():
            raise ValueError(f"gps position_covariance must be 9 finite numbers, got {covariance.tolist()}")
    return GpsFix(lat, lon, alt if math.isfinite(alt) else None, status), covariance


def reading_from_msg(kind: str, msg: Any, left_wheel: str = WHEEL_JOINTS[0], right_wheel: str = WHEEL_JOINTS[1]
                     ) -> tuple[Any, np.ndarray | None]:
    """What :meth:`SensorSync.add` takes for a message of ``kind``: (value, covariance or None).

    IMU, GPS and joint states become readings (``ValueError`` naming what is malformed); camera
    kinds are passed on as they are: the core never looks inside them.
    """
    if kind == "imu":
        return imu_sample_from_msg(msg), None
    if kind == "gps":
        return gps_from_navsat(msg)
    if kind == "joints":
        return wheels_from_joint_state(msg, left_wheel, right_wheel), None
    return msg, None
