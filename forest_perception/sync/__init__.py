"""Sensor synchronisation core: camera sets, IMU/wheel interpolation, GPS freshness, fused odometry, ENU.

Pure (numpy, pymap3d; never rclpy): ``sensor_sync_node`` feeds it live messages and the bag
extractor feeds it recorded ones in log-time order. How frames are matched and released, and
where it differs from ``message_filters``: docs/sensor_sync.md.
"""

from forest_perception.readings import GpsFix, ImuSample, WheelEncoders
from forest_perception.sync.approx import ApproximateTimeSynchronizer, ChannelCounts, Stamped
from forest_perception.sync.assembler import SensorSync
from forest_perception.sync.base import (
    CAMERA_KINDS,
    GPS_STALE,
    IMU_EXTRAPOLATED,
    KINDS,
    NO_CAMERA_INFO,
    NO_DEPTH,
    NO_GPS,
    NO_IMU,
    NO_WHEELS,
    NS_PER_S,
    OUT_OF_ORDER,
    TOPICS,
    WHEELS_EXTRAPOLATED,
)
from forest_perception.sync.convert import (
    gps_from_navsat,
    imu_sample_from_msg,
    reading_from_msg,
    stamp_ns,
    wheels_from_joint_state,
)
from forest_perception.sync.enu import EnuConverter, EnuPosition
from forest_perception.sync.interpolate import (
    Sampled,
    TimeSeriesBuffer,
    extrapolate_wheels,
    interpolate_imu,
    interpolate_wheels,
    sample_at,
    slerp,
)
from forest_perception.sync.odometry import OdometryConfig, OdometryFusion, OdometryState
from forest_perception.sync.records import GpsReading, StreamStats, SyncConfig, SyncedFrame, SyncEvent

__all__ = [
    "ApproximateTimeSynchronizer", "CAMERA_KINDS", "ChannelCounts", "EnuConverter", "EnuPosition", "GPS_STALE",
    "GpsFix", "GpsReading", "IMU_EXTRAPOLATED", "ImuSample", "KINDS", "NO_CAMERA_INFO", "NO_DEPTH", "NO_GPS",
    "NO_IMU", "NO_WHEELS", "NS_PER_S", "OUT_OF_ORDER", "OdometryConfig", "OdometryFusion", "OdometryState",
    "Sampled", "SensorSync", "Stamped", "StreamStats", "SyncConfig", "SyncEvent", "SyncedFrame", "TOPICS",
    "TimeSeriesBuffer", "WHEELS_EXTRAPOLATED", "WheelEncoders", "extrapolate_wheels", "gps_from_navsat",
    "imu_sample_from_msg", "interpolate_imu", "interpolate_wheels", "reading_from_msg", "sample_at", "slerp",
    "stamp_ns", "wheels_from_joint_state",
]
