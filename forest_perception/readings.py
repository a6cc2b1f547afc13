"""Sensor readings as plain values (no ROS messages): GNSS fix, IMU sample, wheel encoders, planar odometry."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GpsFix:
    """A GNSS fix: WGS84 degrees, altitude in metres, NavSatStatus status."""

    latitude: float
    longitude: float
    altitude: float | None = None
    status: int | None = None


@dataclass(frozen=True)
class ImuSample:
    """One IMU reading: quaternion (x, y, z, w) or None, rad/s, m/s^2 incl. gravity."""

    angular_velocity: tuple[float, float, float]
    linear_acceleration: tuple[float, float, float]
    orientation: tuple[float, float, float, float] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "angular_velocity", _float_tuple(self.angular_velocity, 3, "angular_velocity")
        )
        object.__setattr__(
            self, "linear_acceleration", _float_tuple(self.linear_acceleration, 3, "linear_acceleration")
        )
        if self.orientation is not None:
            object.__setattr__(self, "orientation", _float_tuple(self.orientation, 4, "orientation"))


@dataclass(frozen=True)
class WheelEncoders:
    """Wheel joint positions (rad) and velocities (rad/s); a field is None when not recorded."""

    left_position: float | None = None
    right_position: float | None = None
    left_velocity: float | None = None
    right_velocity: float | None = None


def _float_tuple(values: Sequence[float], n: int, name: str) -> tuple:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be {n} numbers, got {values!r}") from exc
    if len(out) != n:
        raise ValueError(f"{name} must have {n} components, got {len(out)}")
    return out


@dataclass(frozen=True)
class PlanarOdometry:
    """Planar pose (x, y, yaw) in ``odom`` and twist (v, w) in ``base_link`` (REP 105), with 6x6 row-major
    covariances in the (x, y, z, roll, pitch, yaw) order of ``nav_msgs/Odometry``."""

    x: float
    y: float
    yaw: float
    v: float
    w: float
    pose_covariance: np.ndarray
    twist_covariance: np.ndarray

    def quaternion_xyzw(self) -> np.ndarray:
        """Heading as a quaternion (x, y, z, w)."""
        return np.array([0.0, 0.0, math.sin(0.5 * self.yaw), math.cos(0.5 * self.yaw)])
