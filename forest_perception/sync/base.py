"""Stamps, kinds and frame flags shared by the sync modules."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from forest_perception import topics

NS_PER_S = 1_000_000_000
CAMERA_KINDS = ("image", "depth", "camera_info")
KINDS = (*CAMERA_KINDS, "imu", "gps", "joints")
#: the rover topic (relative to its namespace, DESIGN.md's contract) each kind comes from
TOPICS = {
    "image": topics.CAMERA_IMAGE,
    "depth": topics.CAMERA_DEPTH,
    "camera_info": topics.CAMERA_INFO,
    "imu": topics.IMU,
    "gps": topics.GPS,
    "joints": topics.JOINT_STATES,
}
WATERMARK_KINDS = frozenset(KINDS) - {"gps"}  # a receiver's own clock must not expire camera frames

# SyncedFrame.flags
NO_DEPTH = "no_depth"
NO_CAMERA_INFO = "no_camera_info"
NO_IMU = "no_imu"
IMU_EXTRAPOLATED = "imu_extrapolated"
NO_WHEELS = "no_wheels"
WHEELS_EXTRAPOLATED = "wheels_extrapolated"
NO_GPS = "no_gps"
GPS_STALE = "gps_stale"
OUT_OF_ORDER = "out_of_order"


def check_stamp(name: str, stamp_ns: object) -> int:
    """``stamp_ns`` as int nanoseconds; ``ValueError`` naming ``name`` when it is not a non-negative integer."""
    if isinstance(stamp_ns, bool) or not isinstance(stamp_ns, (int, np.integer)):
        raise ValueError(f"{name} stamp must be integer nanoseconds, got {stamp_ns!r}")
    if stamp_ns < 0:
        raise ValueError(f"{name} stamp must be non-negative, got {stamp_ns} ns")
    return int(stamp_ns)


def seconds_to_ns(name: str, seconds: float, allow_zero: bool = True) -> int:
    """A duration parameter in integer nanoseconds; ``ValueError`` naming ``name`` when negative or not finite."""
    value = float(seconds)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number of seconds {bound}, got {seconds!r}")
    return round(value * NS_PER_S)


def check_finite(name: str, values: Iterable[float | None]) -> None:
    """Raise ``ValueError`` naming ``name`` when a value (None allowed) is not finite."""
    for v in values:
        if v is not None and not math.isfinite(v):
            raise ValueError(f"{name} has a non-finite value: {list(values)}")
