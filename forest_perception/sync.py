"""Sensor synchronisation core: camera sets, IMU/wheel interpolation, GPS freshness, fused odometry, ENU.

Pure core (numpy, pymap3d via :mod:`forest_perception.geo`, the standard library; never
rclpy), used online by ``sensor_sync_node`` and offline by the bag extractor, which feeds it
messages in log-time order. Everything takes plain values: integer nanosecond stamps, the
``ImuSample`` / ``GpsFix`` / ``WheelEncoders`` records of :mod:`forest_perception.dataset_tools.layout` and
opaque camera items (ROS messages, arrays, file names: the core never looks inside them).

* :class:`ApproximateTimeSynchronizer`: the policy of the Python ``message_filters``
  ``ApproximateTimeSynchronizer`` (per-channel queues keyed by stamp, ``queue_size`` with the
  oldest dropped, a new message matched against the other queues' entries within ``slop``,
  closest first, the first set whose stamps span at most ``slop`` emitted and removed). Two
  differences, both deliberate: the span test is ``<= slop`` (``message_filters`` uses ``<``,
  so ``slop=0`` could never match identical stamps), and a (channel, stamp) already emitted is
  a duplicate that is counted and never emitted again.
* :class:`TimeSeriesBuffer`, :func:`sample_at`, :func:`slerp`, :func:`interpolate_imu`,
  :func:`interpolate_wheels`: time-ordered buffers bounded by a time span that accept
  out-of-order inserts, and linear/slerp interpolation at a stamp.
* :class:`SensorSync`: the frame assembler (colour + depth + camera_info matched, IMU and wheels
  interpolated to the colour stamp, the latest GPS fix with its age) with per-sensor statistics,
  missing-sensor fallback and clock-jump resets. See its docstring for when a frame is released.
* :class:`OdometryFusion`: wheel encoders + gyro yaw rate -> planar pose in ``odom`` and twist in
  ``base_link`` (REP 105) with propagated covariances.
* :class:`EnuConverter`: GPS fix -> local ENU metres about an origin, and back.
* :func:`stamp_ns`, :func:`imu_sample_from_msg`, :func:`wheels_from_joint_state`,
  :func:`gps_from_navsat`: Header/Imu/JointState/NavSatFix-shaped messages (rclpy's or rosbags')
  to the values above, ``ValueError`` naming what is malformed.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, NamedTuple, TypeVar

import numpy as np

from forest_perception.geo import enu_to_geodetic, geodetic_to_enu, validate_lat_lon, wrap_angle
from forest_perception.readings import GpsFix, ImuSample, WheelEncoders

__all__ = [
    "KINDS",
    "TOPICS",
    "CAMERA_KINDS",
    "ApproximateTimeSynchronizer",
    "ChannelCounts",
    "EnuConverter",
    "EnuPosition",
    "GpsFix",
    "GpsReading",
    "ImuSample",
    "OdometryConfig",
    "OdometryFusion",
    "OdometryState",
    "Sampled",
    "SensorSync",
    "StreamStats",
    "SyncConfig",
    "SyncEvent",
    "SyncedFrame",
    "TimeSeriesBuffer",
    "WheelEncoders",
    "interpolate_imu",
    "interpolate_wheels",
    "sample_at",
    "slerp",
    "gps_from_navsat",
    "imu_sample_from_msg",
    "stamp_ns",
    "wheels_from_joint_state",
]

NS_PER_S = 1_000_000_000
CAMERA_KINDS = ("image", "depth", "camera_info")
KINDS = (*CAMERA_KINDS, "imu", "gps", "joints")
#: the rover topic (relative to its namespace, DESIGN.md's contract) each kind comes from
TOPICS = {
    "image": "camera/image_raw",
    "depth": "camera/depth/image_raw",
    "camera_info": "camera/camera_info",
    "imu": "imu/data",
    "gps": "gps/fix",
    "joints": "joint_states",
}
_WATERMARK_KINDS = frozenset(KINDS) - {"gps"}  # a receiver's own clock must not expire camera frames

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

T = TypeVar("T")


def _stamp(name: str, stamp_ns: object) -> int:
    if isinstance(stamp_ns, bool) or not isinstance(stamp_ns, (int, np.integer)):
        raise ValueError(f"{name} stamp must be integer nanoseconds, got {stamp_ns!r}")
    if stamp_ns < 0:
        raise ValueError(f"{name} stamp must be non-negative, got {stamp_ns} ns")
    return int(stamp_ns)


def _seconds_ns(name: str, seconds: float, allow_zero: bool = True) -> int:
    value = float(seconds)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number of seconds {bound}, got {seconds!r}")
    return round(value * NS_PER_S)


# --------------------------------------------------------------------------- messages -> core values
# Duck-typed: they read the ROS field names, so rclpy messages and the rosbags library's
# deserialised messages both work, and this module still never imports rclpy.

NAVSAT_COVARIANCE_TYPE_UNKNOWN = 0  # sensor_msgs/NavSatFix.COVARIANCE_TYPE_UNKNOWN


def stamp_ns(msg: Any) -> int:
    """Integer nanoseconds of a message's ``header.stamp`` (``ValueError`` when negative)."""
    stamp = msg.header.stamp
    return _stamp("header", int(stamp.sec) * NS_PER_S + int(stamp.nanosec))


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


# --------------------------------------------------------------------------- approximate time sync


class Stamped(NamedTuple):
    """An item with its stamp (integer nanoseconds)."""

    stamp_ns: int
    item: Any


@dataclass
class ChannelCounts:
    """What happened to one channel's messages in an :class:`ApproximateTimeSynchronizer`."""

    added: int = 0
    duplicates: int = 0
    matched: int = 0
    dropped_overflow: int = 0
    dropped_cleared: int = 0


DropCallback = Callable[[str, int, Any, str], None]


class ApproximateTimeSynchronizer:
    """Approximate-time matching of several stamped streams (``message_filters`` semantics).

    ``add(channel, stamp_ns, item)`` queues the item (a second item with the same stamp on the
    same channel replaces the first and counts as a duplicate), trims the channel's queue to
    ``queue_size`` by dropping its oldest stamp, then looks for a set: for every other channel
    the queued stamps within ``slop`` of the new one, sorted closest first; combinations are
    tried in that order and the first whose stamps span at most ``slop`` is returned (as
    ``{channel: Stamped}``) and removed from the queues. ``on_drop(channel, stamp_ns, item,
    reason)`` hears of every item that leaves a queue unmatched (``"overflow"``, ``"cleared"``).
    """

    def __init__(
        self,
        channels: Sequence[str],
        queue_size: int,
        slop_s: float,
        on_drop: DropCallback | None = None,
    ) -> None:
        channels = tuple(channels)
        if len(channels) < 1 or len(set(channels)) != len(channels):
            raise ValueError(f"channels must be distinct names, got {channels!r}")
        if isinstance(queue_size, bool) or not isinstance(queue_size, (int, np.integer)) or queue_size < 1:
            raise ValueError(f"queue_size must be an integer >= 1, got {queue_size!r}")
        self.channels = channels
        self.queue_size = int(queue_size)
        self.slop_ns = _seconds_ns("slop_s", slop_s)
        self.on_drop = on_drop
        self._queues: dict[str, dict[int, Any]] = {c: {} for c in channels}
        # stamps already emitted per channel, so a late duplicate is never emitted twice
        history = max(64, 4 * self.queue_size)
        self._emitted: dict[str, deque[int]] = {c: deque(maxlen=history) for c in channels}
        self._emitted_set: dict[str, set[int]] = {c: set() for c in channels}
        self.counts = {c: ChannelCounts() for c in channels}
        self.last_status = ""

    @property
    def slop_s(self) -> float:
        """Slop in seconds."""
        return self.slop_ns / NS_PER_S

    def _queue(self, channel: str) -> dict[int, Any]:
        try:
            return self._queues[channel]
        except KeyError:
            raise ValueError(f"unknown channel {channel!r}; channels are {list(self.channels)}") from None

    def queued(self, channel: str) -> list[int]:
        """Sorted stamps waiting in ``channel``'s queue."""
        return sorted(self._queue(channel))

    def _drop(self, channel: str, stamp_ns: int, item: Any, reason: str) -> None:
        if reason == "overflow":
            self.counts[channel].dropped_overflow += 1
        else:
            self.counts[channel].dropped_cleared += 1
        if self.on_drop is not None:
            self.on_drop(channel, stamp_ns, item, reason)

    def _mark_emitted(self, channel: str, stamp_ns: int) -> None:
        history = self._emitted[channel]
        if len(history) == history.maxlen:
            self._emitted_set[channel].discard(history[0])
        history.append(stamp_ns)
        self._emitted_set[channel].add(stamp_ns)
        self.counts[channel].matched += 1

    def _take(self, chosen: dict[str, int]) -> dict[str, Stamped]:
        out = {}
        for channel, stamp_ns in chosen.items():
            out[channel] = Stamped(stamp_ns, self._queues[channel].pop(stamp_ns))
            self._mark_emitted(channel, stamp_ns)
        return out

    def add(self, channel: str, stamp_ns: int, item: Any) -> list[dict[str, Stamped]]:
        """Queue one item; return the matched set it completes (at most one), as ``[{channel: Stamped}]``.

        ``last_status`` says what became of the item: ``"queued"``, ``"matched"``, ``"duplicate"``
        (same stamp already queued: replaced; or already emitted: dropped) or ``"overflow"``.
        """
        queue = self._queue(channel)
        stamp_ns = _stamp(channel, stamp_ns)
        counts = self.counts[channel]
        counts.added += 1
        if stamp_ns in self._emitted_set[channel]:
            counts.duplicates += 1
            self.last_status = "duplicate"
            return []
        if stamp_ns in queue:
            counts.duplicates += 1
            queue[stamp_ns] = item
            self.last_status = "duplicate"
            return []
        queue[stamp_ns] = item
        self.last_status = "queued"
        while len(queue) > self.queue_size:
            oldest = min(queue)
            self._drop(channel, oldest, queue.pop(oldest), "overflow")
            if oldest == stamp_ns:
                self.last_status = "overflow"
        if stamp_ns not in queue:
            return []
        index = self.channels.index(channel)
        candidates: list[list[int]] = []
        for other in self.channels:
            if other == channel:
                continue
            near = [s for s in self._queues[other] if abs(s - stamp_ns) <= self.slop_ns]
            if not near:
                return []
            near.sort(key=lambda s: abs(s - stamp_ns))  # stable: ties keep arrival order
            candidates.append(near)
        for combo in itertools.product(*candidates):
            stamps = list(combo)
            stamps.insert(index, stamp_ns)
            if max(stamps) - min(stamps) <= self.slop_ns:
                self.last_status = "matched"
                return [self._take(dict(zip(self.channels, stamps)))]
        return []

    def partners(self, anchor: str, stamp_ns: int) -> dict[str, int]:
        """For the queued ``anchor`` entry, the closest queued stamp of each other channel within slop
        (channels in order, each kept only if the set still spans at most ``slop``)."""
        chosen = {anchor: stamp_ns}
        for other in self.channels:
            if other == anchor:
                continue
            lo, hi = min(chosen.values()), max(chosen.values())
            near = [s for s in self._queues[other] if max(hi, s) - min(lo, s) <= self.slop_ns]
            if near:
                chosen[other] = min(near, key=lambda s: abs(s - stamp_ns))
        return chosen

    def take_partial(self, anchor: str, stamp_ns: int) -> dict[str, Stamped]:
        """Remove and return the queued ``anchor`` entry with :meth:`partners` (an incomplete set)."""
        if stamp_ns not in self._queue(anchor):
            raise KeyError(f"no {anchor} entry stamped {stamp_ns} ns is queued")
        return self._take(self.partners(anchor, stamp_ns))

    def clear(self) -> int:
        """Empty every queue (items reported to ``on_drop`` as ``"cleared"``); return how many were dropped."""
        dropped = 0
        for channel, queue in self._queues.items():
            for stamp_ns in sorted(queue):
                self._drop(channel, stamp_ns, queue[stamp_ns], "cleared")
                dropped += 1
            queue.clear()
        return dropped

    def forget_history(self) -> None:
        """Forget which stamps were emitted (after a clock reset the same stamps come again)."""
        for channel in self.channels:
            self._emitted[channel].clear()
            self._emitted_set[channel].clear()


# --------------------------------------------------------------------------- buffers and interpolation


class TimeSeriesBuffer(Generic[T]):
    """Samples kept in stamp order, whatever order they arrive in, spanning at most ``span_ns``.

    ``insert`` returns ``"new"``, ``"duplicate"`` (same stamp: the value is replaced) or
    ``"late"`` (older than the span behind the newest sample: not stored).
    """

    def __init__(self, span_ns: int, max_samples: int = 100_000) -> None:
        if span_ns <= 0:
            raise ValueError(f"span_ns must be > 0, got {span_ns}")
        if max_samples < 2:
            raise ValueError(f"max_samples must be >= 2, got {max_samples}")
        self.span_ns = int(span_ns)
        self.max_samples = int(max_samples)
        self._stamps: list[int] = []
        self._values: list[T] = []

    def __len__(self) -> int:
        return len(self._stamps)

    @property
    def newest_ns(self) -> int | None:
        """Stamp of the newest sample, None when empty."""
        return self._stamps[-1] if self._stamps else None

    @property
    def oldest_ns(self) -> int | None:
        """Stamp of the oldest sample, None when empty."""
        return self._stamps[0] if self._stamps else None

    def insert(self, stamp_ns: int, value: T) -> str:
        """Store a sample in stamp order; prune what falls out of the span."""
        stamps = self._stamps
        if stamps and stamp_ns < stamps[-1] - self.span_ns:
            return "late"
        i = bisect.bisect_left(stamps, stamp_ns)
        if i < len(stamps) and stamps[i] == stamp_ns:
            self._values[i] = value
            return "duplicate"
        stamps.insert(i, stamp_ns)
        self._values.insert(i, value)
        cut = bisect.bisect_left(stamps, stamps[-1] - self.span_ns)
        cut = max(cut, len(stamps) - self.max_samples)
        if cut > 0:
            del stamps[:cut]
            del self._values[:cut]
        return "new"

    def bracket(self, stamp_ns: int) -> tuple[tuple[int, T] | None, tuple[int, T] | None]:
        """(newest sample at or before, oldest sample at or after) ``stamp_ns``; equal when one sits on it."""
        stamps = self._stamps
        i = bisect.bisect_left(stamps, stamp_ns)
        after = (stamps[i], self._values[i]) if i < len(stamps) else None
        if after is not None and after[0] == stamp_ns:
            return after, after
        before = (stamps[i - 1], self._values[i - 1]) if i > 0 else None
        return before, after

    def at_or_before(self, stamp_ns: int) -> tuple[int, T] | None:
        """Newest sample stamped at or before ``stamp_ns``."""
        i = bisect.bisect_right(self._stamps, stamp_ns)
        return (self._stamps[i - 1], self._values[i - 1]) if i > 0 else None

    def between(self, start_ns: int, end_ns: int) -> list[tuple[int, T]]:
        """Samples with ``start_ns < stamp < end_ns``, in stamp order."""
        i = bisect.bisect_right(self._stamps, start_ns)
        j = bisect.bisect_left(self._stamps, end_ns)
        return list(zip(self._stamps[i:j], self._values[i:j]))

    def clear(self) -> None:
        """Forget every sample."""
        self._stamps.clear()
        self._values.clear()


@dataclass(frozen=True)
class Sampled(Generic[T]):
    """A value at a stamp: ``mode`` is ``"exact"``, ``"interpolated"`` or ``"extrapolated"``;
    ``gap_s`` is how far from the stamp the farthest sample used lies."""

    value: T
    mode: str
    gap_s: float


def sample_at(
    buffer: TimeSeriesBuffer[T],
    stamp_ns: int,
    max_gap_ns: int,
    interpolate: Callable[[T, T, float], T],
    extrapolate: Callable[[T, float], T] | None = None,
) -> Sampled[T] | None:
    """``buffer``'s value at ``stamp_ns``: interpolated between the neighbours when both lie within
    ``max_gap_ns``, else extrapolated from the nearer one within it (``extrapolate(value, dt_s)``,
    a hold by default), else None."""
    before, after = buffer.bracket(stamp_ns)
    if before is not None and after is not None and before[0] == after[0]:
        return Sampled(before[1], "exact", 0.0)
    near_before = before is not None and stamp_ns - before[0] <= max_gap_ns
    near_after = after is not None and after[0] - stamp_ns <= max_gap_ns
    if near_before and near_after:
        assert before is not None and after is not None
        fraction = (stamp_ns - before[0]) / (after[0] - before[0])
        gap = max(stamp_ns - before[0], after[0] - stamp_ns)
        return Sampled(interpolate(before[1], after[1], fraction), "interpolated", gap / NS_PER_S)
    if near_before:
        nearest = before
    elif near_after:
        nearest = after
    else:
        return None
    assert nearest is not None
    dt_s = (stamp_ns - nearest[0]) / NS_PER_S
    value = extrapolate(nearest[1], dt_s) if extrapolate is not None else nearest[1]
    return Sampled(value, "extrapolated", abs(dt_s))


def slerp(q0: Sequence[float], q1: Sequence[float], fraction: float) -> np.ndarray:
    """Spherical linear interpolation of unit quaternions ``(x, y, z, w)`` along the shorter arc."""
    a = np.asarray(q0, dtype=np.float64)
    b = np.asarray(q1, dtype=np.float64)
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if a.shape != (4,) or b.shape != (4,) or not (math.isfinite(na) and math.isfinite(nb)) or na < 1e-12 or nb < 1e-12:
        raise ValueError(f"slerp needs two non-zero finite quaternions (x, y, z, w), got {a.tolist()} and {b.tolist()}")
    a, b = a / na, b / nb
    if float(np.dot(a, b)) < 0.0:  # q and -q are the same rotation: take the short way round
        b = -b
    # angle between the 4-vectors; atan2 keeps full precision for small angles, where acos(dot) does not
    theta = 2.0 * math.atan2(float(np.linalg.norm(a - b)), float(np.linalg.norm(a + b)))
    if theta < 1e-9:  # identical to rounding: lerp is exact to theta**3
        out = a + fraction * (b - a)
    else:
        s = math.sin(theta)
        out = (math.sin((1.0 - fraction) * theta) / s) * a + (math.sin(fraction * theta) / s) * b
    return out / np.linalg.norm(out)


def _lerp3(a: Sequence[float], b: Sequence[float], f: float) -> tuple[float, float, float]:
    return tuple(float(x + f * (y - x)) for x, y in zip(a, b))  # type: ignore[return-value]


def interpolate_imu(a: ImuSample, b: ImuSample, fraction: float) -> ImuSample:
    """IMU reading a ``fraction`` of the way from ``a`` to ``b``: rates and accelerations linear,
    orientation by :func:`slerp` (None unless both carry one)."""
    orientation = None
    if a.orientation is not None and b.orientation is not None:
        orientation = tuple(float(v) for v in slerp(a.orientation, b.orientation, fraction))
    return ImuSample(
        _lerp3(a.angular_velocity, b.angular_velocity, fraction),
        _lerp3(a.linear_acceleration, b.linear_acceleration, fraction),
        orientation,  # type: ignore[arg-type]
    )


def _lerp_opt(a: float | None, b: float | None, f: float) -> float | None:
    return None if a is None or b is None else float(a + f * (b - a))


def interpolate_wheels(a: WheelEncoders, b: WheelEncoders, fraction: float) -> WheelEncoders:
    """Wheel positions and velocities a ``fraction`` of the way from ``a`` to ``b`` (linear; a field
    missing in either is None). Positions are not unwrapped: joint angles are continuous."""
    return WheelEncoders(
        _lerp_opt(a.left_position, b.left_position, fraction),
        _lerp_opt(a.right_position, b.right_position, fraction),
        _lerp_opt(a.left_velocity, b.left_velocity, fraction),
        _lerp_opt(a.right_velocity, b.right_velocity, fraction),
    )


def extrapolate_wheels(a: WheelEncoders, dt_s: float) -> WheelEncoders:
    """Wheel reading ``dt_s`` seconds after ``a``: positions advanced by their velocities when known."""

    def advance(position: float | None, velocity: float | None) -> float | None:
        if position is None:
            return None
        return position + (velocity or 0.0) * dt_s

    return replace(
        a,
        left_position=advance(a.left_position, a.left_velocity),
        right_position=advance(a.right_position, a.right_velocity),
    )


def _hold(value: T, dt_s: float) -> T:  # noqa: ARG001 - same signature as extrapolate_wheels
    return value


# --------------------------------------------------------------------------- frame assembler


@dataclass(frozen=True)
class SyncConfig:
    """Settings of :class:`SensorSync` (seconds unless named otherwise)."""

    queue_size: int = 10
    """per camera channel, as message_filters' queue_size"""
    slop_s: float = 0.02
    """largest spread of colour/depth/camera_info stamps in one set"""
    use_depth: bool = True
    """match a depth image into every frame (False: colour + camera_info only)"""
    max_wait_s: float = 0.3
    """how long (in sensor time, see SensorSync) a frame waits for partners that may not come"""
    max_gap_s: float = 0.1
    """farthest an IMU/wheel sample may be from the frame stamp to be used"""
    gps_tolerance_s: float = 1.0
    """a fix older than this is flagged stale"""
    missing_after_s: float = 1.0
    """a sensor that delivers nothing while the others advance this far is missing: frames stop waiting"""
    clock_jump_s: float = 1.0
    """a stream going back in time by more than this is a clock reset"""
    buffer_s: float = 2.0
    """time span kept of IMU and wheel samples; also the longest a frame waits behind the newest stamp"""
    release_partial: bool = True
    """release a colour image whose partners did not come (False: message_filters behaviour, drop it)"""

    def validate(self) -> SyncConfig:
        """Raise ``ValueError`` naming the first bad field; return self."""
        if isinstance(self.queue_size, bool) or not isinstance(self.queue_size, (int, np.integer)):
            raise ValueError(f"queue_size must be an integer >= 1, got {self.queue_size!r}")
        if self.queue_size < 1:
            raise ValueError(f"queue_size must be an integer >= 1, got {self.queue_size!r}")
        _seconds_ns("slop_s", self.slop_s)
        _seconds_ns("max_wait_s", self.max_wait_s)
        for name in ("max_gap_s", "gps_tolerance_s", "missing_after_s", "clock_jump_s", "buffer_s"):
            _seconds_ns(name, getattr(self, name), allow_zero=False)
        if self.buffer_s < self.max_wait_s + self.max_gap_s:
            raise ValueError(
                f"buffer_s ({self.buffer_s}) must be at least max_wait_s + max_gap_s "
                f"({self.max_wait_s} + {self.max_gap_s}): waiting frames would lose their samples"
            )
        return self

    @property
    def camera_channels(self) -> tuple[str, ...]:
        """Channels matched by the approximate-time synchroniser."""
        return CAMERA_KINDS if self.use_depth else ("image", "camera_info")


@dataclass
class StreamStats:
    """Per-sensor counters for diagnostics.

    ``received`` counts every accepted message (duplicates and late ones included); ``dropped``
    those that were queued but never reached a frame (queue overflow, reset, end of stream);
    ``used`` the frames that carry this sensor's data, ``missing_in_frames`` those without it
    (for GPS: without a fresh fix).
    """

    received: int = 0
    duplicates: int = 0
    late: int = 0
    invalid: int = 0
    ignored: int = 0
    dropped: int = 0
    used: int = 0
    missing_in_frames: int = 0
    extrapolated: int = 0
    stale: int = 0
    no_fix: int = 0
    last_stamp_ns: int | None = None
    recent: deque = field(default_factory=lambda: deque(maxlen=64), repr=False)

    @property
    def rate_hz(self) -> float:
        """Message rate over the last (up to) 64 stamps, in stamp time."""
        if len(self.recent) < 2:
            return 0.0
        span = max(self.recent) - min(self.recent)
        return (len(self.recent) - 1) * NS_PER_S / span if span > 0 else 0.0

    def as_dict(self) -> dict[str, object]:
        """Counters and rate as a plain dict."""
        return {
            "received": self.received,
            "duplicates": self.duplicates,
            "late": self.late,
            "invalid": self.invalid,
            "ignored": self.ignored,
            "dropped": self.dropped,
            "used": self.used,
            "missing_in_frames": self.missing_in_frames,
            "extrapolated": self.extrapolated,
            "stale": self.stale,
            "no_fix": self.no_fix,
            "last_stamp_ns": self.last_stamp_ns,
            "rate_hz": self.rate_hz,
        }


@dataclass(frozen=True)
class GpsReading:
    """The fix used for a frame: its stamp, age at the frame stamp, and whether it is stale.

    ``covariance`` is the fix's ENU position covariance (9 floats, m^2) when known.
    """

    fix: GpsFix
    stamp_ns: int
    age_s: float
    stale: bool
    covariance: tuple[float, ...] | None = None


@dataclass(frozen=True)
class SyncedFrame:
    """One synchronised frame set, stamped with the colour image's stamp.

    ``image``/``depth``/``camera_info`` are the items given to ``add``; ``imu`` and ``wheels``
    are interpolated to ``stamp_ns`` (None when there was nothing near enough); ``gps`` is the
    latest good fix at or before the stamp, fresh or stale (None when there was none). ``flags``
    say what is missing or approximated (``NO_DEPTH``, ``IMU_EXTRAPOLATED``, ``GPS_STALE``, ...).
    """

    stamp_ns: int
    image: Any
    depth: Any | None
    camera_info: Any | None
    imu: ImuSample | None
    wheels: WheelEncoders | None
    gps: GpsReading | None
    depth_stamp_ns: int | None = None
    camera_info_stamp_ns: int | None = None
    flags: frozenset[str] = frozenset()

    @property
    def stamp_s(self) -> float:
        """Stamp in float seconds."""
        return self.stamp_ns / NS_PER_S

    @property
    def gps_fresh(self) -> bool:
        """Whether the frame carries a GPS fix within the tolerance."""
        return self.gps is not None and not self.gps.stale


@dataclass(frozen=True)
class SyncEvent:
    """Something the caller should hear of (``kind == "clock_reset"``), with a sentence saying what."""

    kind: str
    stamp_ns: int
    message: str


def _finite(name: str, values: Iterable[float | None]) -> None:
    for v in values:
        if v is not None and not math.isfinite(v):
            raise ValueError(f"{name} has a non-finite value: {list(values)}")


class SensorSync:
    """Assembles :class:`SyncedFrame` s from colour, depth, camera_info, IMU, GPS and wheel samples.

    Feed samples with :meth:`add` (or ``add_image`` ...); each call returns the frames it
    finished, in stamp order. A frame is born when the camera channels match (see
    :class:`ApproximateTimeSynchronizer`) and released when the IMU and the wheels each have a
    sample at or after its stamp, or when waiting is over:

    * A sensor is *live* while it delivers messages; one that delivers nothing while the newest
      stamp seen (the *watermark*, any sensor but GPS) advances ``missing_after_s`` is *missing*,
      and frames stop waiting for it (a sensor that never came gets the same start-up grace).
    * The *horizon* is the oldest newest-stamp of the live sensors a frame waits for: the sensor
      time all of them have reached. A frame expires when the horizon is ``max_wait_s`` past its
      stamp, so a stream that a busy subscriber drains late (a 200 Hz IMU behind the camera)
      holds frames back instead of making them lose its data; and in any case once the
      watermark is ``buffer_s`` past it.
    * A colour image whose partners do not come before it expires (or whose partner sensor is
      missing) goes out with what it has when ``release_partial`` is set.

    Frames come out in stamp order: a frame waits while an older colour image still waits for
    its partners. :meth:`advance` moves the horizon without a message (a quiet wire, until the
    next message); :meth:`flush` releases everything at the end of a stream.

    A stream whose stamp goes back by more than ``clock_jump_s`` (sim reset, bag loop) makes it
    flush what it holds, clear every buffer, count a reset and queue a ``SyncEvent``
    (:meth:`pop_events`); messages from before the reset that straggle in afterwards are dropped
    as late.
    """

    def __init__(self, config: SyncConfig | None = None) -> None:
        self.stats: dict[str, StreamStats] = {k: StreamStats() for k in KINDS}
        self.frames_released = 0
        self.frames_incomplete = 0
        self.clock_resets = 0
        self._events: list[SyncEvent] = []
        self._configure((config or SyncConfig()).validate())

    # ------------------------------------------------------------------ state
    def _configure(self, config: SyncConfig) -> None:
        self.config = config
        self._slop_ns = _seconds_ns("slop_s", config.slop_s)
        self._max_wait_ns = _seconds_ns("max_wait_s", config.max_wait_s)
        self._max_gap_ns = _seconds_ns("max_gap_s", config.max_gap_s)
        self._gps_tolerance_ns = _seconds_ns("gps_tolerance_s", config.gps_tolerance_s)
        self._missing_ns = _seconds_ns("missing_after_s", config.missing_after_s)
        self._jump_ns = _seconds_ns("clock_jump_s", config.clock_jump_s)
        span = _seconds_ns("buffer_s", config.buffer_s)
        self._ats = ApproximateTimeSynchronizer(
            config.camera_channels, config.queue_size, config.slop_s, on_drop=self._on_camera_drop
        )
        self._imu: TimeSeriesBuffer[ImuSample] = TimeSeriesBuffer(span)
        self._wheels: TimeSeriesBuffer[WheelEncoders] = TimeSeriesBuffer(span)
        self._gps: TimeSeriesBuffer[GpsReading] = TimeSeriesBuffer(max(span, 4 * self._gps_tolerance_ns))
        self._pending: list[tuple[int, int, dict[str, Stamped]]] = []
        self._seq = itertools.count()
        self._watermark_ns: int | None = None
        self._first_ns: int | None = None
        self._heard_at: dict[str, int] = {}  # watermark when each stream last delivered something
        self._advanced_ns: int | None = None
        self._cap_ns = span
        self._last_released_ns: int | None = None
        self._straggler: tuple[int, int, int] | None = None  # (lo, hi, until watermark)

    def _on_camera_drop(self, channel: str, stamp_ns: int, item: Any, reason: str) -> None:
        self.stats[channel].dropped += 1

    @property
    def watermark_ns(self) -> int | None:
        """Newest stamp seen on any sensor but GPS since the last reset."""
        return self._watermark_ns

    @property
    def pending(self) -> int:
        """Frames matched but not released yet, plus colour images still waiting for partners."""
        return len(self._pending) + len(self._ats.queued("image"))

    def pop_events(self) -> list[SyncEvent]:
        """Events since the last call (clock resets), oldest first."""
        events, self._events = self._events, []
        return events

    def missing_streams(self) -> list[str]:
        """Expected sensors that delivered nothing while the watermark advanced ``missing_after_s``
        (or never came)."""
        expected = (*self.config.camera_channels, "imu", "joints", "gps")
        if self._watermark_ns is None:
            return list(expected)
        return [k for k in expected if not self._alive(k, grace=False)]

    def summary(self) -> dict[str, object]:
        """Counters for diagnostics: frames, resets, missing sensors and every stream's stats.

        Each stream's ``lag_s`` is how far its newest stamp is behind the watermark: a stream a
        busy subscriber drains late shows here before its frames start expiring (``max_wait_s``).
        """
        streams = {}
        for kind, st in self.stats.items():
            values = st.as_dict()
            wm, last = self._watermark_ns, st.last_stamp_ns
            values["lag_s"] = (wm - last) / NS_PER_S if wm is not None and last is not None else float("nan")
            streams[kind] = values
        return {
            "frames_released": self.frames_released,
            "frames_incomplete": self.frames_incomplete,
            "clock_resets": self.clock_resets,
            "pending": self.pending,
            "missing": self.missing_streams(),
            "streams": streams,
        }

    # ------------------------------------------------------------------ input
    def add_image(self, stamp_ns: int, item: Any) -> list[SyncedFrame]:
        """A colour image (any item); its stamp becomes the frame stamp."""
        return self.add("image", stamp_ns, item)

    def add_depth(self, stamp_ns: int, item: Any) -> list[SyncedFrame]:
        """A depth image aligned to colour (ignored and counted when ``use_depth`` is off)."""
        return self.add("depth", stamp_ns, item)

    def add_camera_info(self, stamp_ns: int, item: Any) -> list[SyncedFrame]:
        """The camera_info that goes with the colour image."""
        return self.add("camera_info", stamp_ns, item)

    def add_imu(self, stamp_ns: int, sample: ImuSample) -> list[SyncedFrame]:
        """An IMU reading."""
        return self.add("imu", stamp_ns, sample)

    def add_gps(self, stamp_ns: int, fix: GpsFix, covariance: Sequence[float] | None = None) -> list[SyncedFrame]:
        """A GPS fix (``status < 0`` or a non-finite position: no fix, counted, not used)."""
        return self.add("gps", stamp_ns, fix, covariance)

    def add_joints(self, stamp_ns: int, wheels: WheelEncoders) -> list[SyncedFrame]:
        """Wheel encoder positions (rad) and velocities (rad/s)."""
        return self.add("joints", stamp_ns, wheels)

    def _validate(self, kind: str, value: Any, covariance: Sequence[float] | None) -> Any:
        if kind == "imu":
            if not isinstance(value, ImuSample):
                raise ValueError(f"imu value must be a readings.ImuSample, got {type(value).__name__}")
            _finite("imu angular_velocity", value.angular_velocity)
            _finite("imu linear_acceleration", value.linear_acceleration)
            if value.orientation is not None:
                _finite("imu orientation", value.orientation)
                if np.linalg.norm(value.orientation) < 1e-6:
                    raise ValueError(f"imu orientation is a zero quaternion: {value.orientation}")
        elif kind == "joints":
            if not isinstance(value, WheelEncoders):
                raise ValueError(
                    f"joints value must be a forest_perception.readings.WheelEncoders, got {type(value).__name__}"
                )
            if value.left_position is None or value.right_position is None:
                raise ValueError(f"joints need left and right wheel positions, got {value}")
            _finite("joints", (value.left_position, value.right_position, value.left_velocity, value.right_velocity))
        elif kind == "gps":
            if not isinstance(value, GpsFix):
                raise ValueError(f"gps value must be a forest_perception.readings.GpsFix, got {type(value).__name__}")
            if covariance is not None:
                cov = tuple(float(v) for v in np.ravel(np.asarray(covariance, dtype=np.float64)))
                if len(cov) != 9 or not all(math.isfinite(v) for v in cov):
                    raise ValueError(f"gps covariance must be 9 finite numbers (3x3 ENU, m^2), got {covariance!r}")
                return value, cov
            return value, None
        elif value is None:
            raise ValueError(f"{kind} item must not be None")
        return value

    def add(self, kind: str, stamp_ns: int, value: Any, covariance: Sequence[float] | None = None) -> list[SyncedFrame]:
        """Feed one sample of ``kind`` (one of ``KINDS``); return the frames this finished.

        Raises ``ValueError`` (counted as ``invalid``) for an unknown kind, a bad stamp or a
        malformed value (non-finite IMU, wheels without positions, ...).
        """
        if kind not in self.stats:
            raise ValueError(f"unknown sensor kind {kind!r}; expected one of {list(KINDS)}")
        st = self.stats[kind]
        try:
            stamp_ns = _stamp(kind, stamp_ns)
            value = self._validate(kind, value, covariance)
        except ValueError:
            st.invalid += 1
            raise
        if kind == "depth" and not self.config.use_depth:
            st.ignored += 1
            return []
        frames: list[SyncedFrame] = []
        if st.last_stamp_ns is not None and stamp_ns < st.last_stamp_ns - self._jump_ns:
            frames.extend(self._clock_reset(kind, stamp_ns, st.last_stamp_ns))
        elif self._is_straggler(stamp_ns):
            st.late += 1
            return frames
        st.received += 1
        self._advanced_ns = None
        st.recent.append(stamp_ns)
        st.last_stamp_ns = stamp_ns if st.last_stamp_ns is None else max(st.last_stamp_ns, stamp_ns)
        if self._first_ns is None:
            self._first_ns = stamp_ns
        if kind in _WATERMARK_KINDS:
            self._raise_watermark(stamp_ns)
        self._heard_at[kind] = stamp_ns if self._watermark_ns is None else max(self._watermark_ns, stamp_ns)

        if kind in CAMERA_KINDS:
            sets = self._ats.add(kind, stamp_ns, value)
            if self._ats.last_status == "duplicate":
                st.duplicates += 1
            for matched in sets:
                self._queue_frame(matched)
        elif kind == "gps":
            fix, cov = value
            if (fix.status is not None and fix.status < 0) or not (
                math.isfinite(fix.latitude) and math.isfinite(fix.longitude)
            ):
                st.no_fix += 1
            else:
                self._count_insert(st, self._gps.insert(stamp_ns, GpsReading(fix, stamp_ns, 0.0, False, cov)))
        else:
            buffer = self._imu if kind == "imu" else self._wheels
            self._count_insert(st, buffer.insert(stamp_ns, value))
        frames.extend(self._pump(force=False))
        return frames

    @staticmethod
    def _count_insert(st: StreamStats, status: str) -> None:
        if status == "duplicate":
            st.duplicates += 1
        elif status == "late":
            st.late += 1

    def advance(self, now_ns: int) -> list[SyncedFrame]:
        """For a quiet wire: release what would be due had sensor time reached ``now_ns``.

        Nothing arrives, so nothing lags; the next message cancels the effect (a paused simulation
        that resumes at its old time is not mistaken for one far ahead).
        """
        now_ns = _stamp("now", now_ns)
        self._advanced_ns = now_ns if self._advanced_ns is None else max(self._advanced_ns, now_ns)
        return self._pump(force=False)

    def flush(self) -> list[SyncedFrame]:
        """End of stream: release every waiting frame with what there is; drop unmatched depth/info."""
        frames = self._pump(force=True)
        self._ats.clear()
        return frames

    def reset(self, reason: str, new_stamp_ns: int | None = None) -> list[SyncedFrame]:
        """Flush, then clear every buffer and count a clock reset (``reason`` goes into the event).

        With ``new_stamp_ns`` (the time after the jump), messages stamped near the old watermark
        that straggle in afterwards are dropped as late.
        """
        frames = self.flush()
        old = self._watermark_ns
        stamp = old if new_stamp_ns is None else _stamp("new_stamp", new_stamp_ns)
        self.clock_resets += 1
        self._events.append(SyncEvent("clock_reset", stamp or 0, reason))
        self._imu.clear()
        self._wheels.clear()
        self._gps.clear()
        self._ats.forget_history()
        self._pending.clear()
        for st in self.stats.values():
            st.last_stamp_ns = None
            st.recent.clear()
        self._watermark_ns = None
        self._first_ns = None
        self._heard_at.clear()
        self._advanced_ns = None
        self._last_released_ns = None
        self._straggler = None
        if old is not None and new_stamp_ns is not None and old - new_stamp_ns > 3 * self._jump_ns:
            self._straggler = (old - self._jump_ns, old + self._jump_ns, old - 2 * self._jump_ns)
        return frames

    def reconfigure(self, config: SyncConfig) -> list[SyncedFrame]:
        """Apply a new configuration: flush with the old one, then start over (stats are kept)."""
        config = config.validate()
        frames = self.flush()
        self._configure(config)
        for st in self.stats.values():
            st.last_stamp_ns = None
            st.recent.clear()
        return frames

    # ------------------------------------------------------------------ internals
    def _clock_reset(self, kind: str, stamp_ns: int, last_ns: int) -> list[SyncedFrame]:
        back = (last_ns - stamp_ns) / NS_PER_S
        reason = (
            f"{kind} stamp went back {back:.3f} s (from {last_ns / NS_PER_S:.3f} s to {stamp_ns / NS_PER_S:.3f} s): "
            "clock reset, buffers cleared"
        )
        return self.reset(reason, stamp_ns)

    def _is_straggler(self, stamp_ns: int) -> bool:
        if self._straggler is None:
            return False
        lo, hi, until = self._straggler
        if self._watermark_ns is not None and self._watermark_ns >= until:
            self._straggler = None
            return False
        return lo <= stamp_ns <= hi

    def _raise_watermark(self, stamp_ns: int) -> None:
        if self._watermark_ns is None or stamp_ns > self._watermark_ns:
            jump = stamp_ns - self._watermark_ns if self._watermark_ns is not None else 0
            if jump > self._missing_ns:
                # every stream went quiet at once (recording paused, link lost): a gap, not a sensor
                # falling silent, so the silence before this message does not make anyone missing
                for kind in self._heard_at:
                    self._heard_at[kind] += jump
                if self._first_ns is not None:
                    self._first_ns += jump
            self._watermark_ns = stamp_ns

    def _alive(self, kind: str, grace: bool = True) -> bool:
        """Whether frames should wait for ``kind``: it delivered something (whatever its stamps) while
        the watermark moved less than ``missing_after_s``, or it has not come yet during the start-up grace."""
        wm = self._watermark_ns
        if wm is None:
            return grace
        heard = self._heard_at.get(kind)
        if heard is None:
            return grace and self._first_ns is not None and wm - self._first_ns <= self._missing_ns
        return wm - heard <= self._missing_ns

    def _horizon(self) -> int | None:
        """Sensor time every live stream a frame waits for has reached (a lagging stream holds it back)."""
        kinds = (*self.config.camera_channels, "imu", "joints")
        newest = [
            last for k in kinds if (last := self.stats[k].last_stamp_ns) is not None and self._alive(k)
        ]
        horizon = min(newest) if newest else self._watermark_ns
        if self._advanced_ns is not None and (horizon is None or self._advanced_ns > horizon):
            horizon = self._advanced_ns
        return horizon

    def _expired(self, stamp_ns: int, horizon: int | None) -> bool:
        if self._watermark_ns is None or horizon is None:
            return False
        newest = max(self._watermark_ns, self._advanced_ns or 0)
        return horizon - stamp_ns > self._max_wait_ns or newest - stamp_ns > self._cap_ns

    def _queue_frame(self, matched: dict[str, Stamped]) -> None:
        bisect.insort(self._pending, (matched["image"].stamp_ns, next(self._seq), matched))

    def _release_images(self, force: bool, horizon: int | None) -> None:
        """Colour images whose partners did not come: out with what they have, once that is final."""
        for stamp_ns in self._ats.queued("image"):
            chosen = self._ats.partners("image", stamp_ns)
            awaited = [c for c in self._ats.channels if c not in chosen and self._alive(c)]
            if awaited and not force and not self._expired(stamp_ns, horizon):
                continue
            if not self.config.release_partial:
                continue
            self._queue_frame(self._ats.take_partial("image", stamp_ns))

    def _ready(self, stamp_ns: int, horizon: int | None) -> bool:
        if self._expired(stamp_ns, horizon):
            return True
        for kind, buffer in (("imu", self._imu), ("joints", self._wheels)):
            newest = buffer.newest_ns
            if (newest is None or newest < stamp_ns) and self._alive(kind):
                return False
        return True

    def _pump(self, force: bool) -> list[SyncedFrame]:
        horizon = self._horizon()
        self._release_images(force, horizon)
        # an older colour image still waiting for its partners holds later frames back (until it
        # expires), so frames come out in stamp order
        waiting = [s for s in self._ats.queued("image") if not self._expired(s, horizon)]
        oldest_waiting = waiting[0] if waiting else None
        frames = []
        while self._pending:
            stamp_ns = self._pending[0][0]
            if not force and (
                not self._ready(stamp_ns, horizon) or (oldest_waiting is not None and oldest_waiting < stamp_ns)
            ):
                break
            _, _, matched = self._pending.pop(0)
            frames.append(self._assemble(stamp_ns, matched))
        return frames

    def _assemble(self, stamp_ns: int, matched: dict[str, Stamped]) -> SyncedFrame:
        flags: set[str] = set()
        stats = self.stats
        stats["image"].used += 1
        depth = matched.get("depth")
        info = matched.get("camera_info")
        for kind, got, flag in (("depth", depth, NO_DEPTH), ("camera_info", info, NO_CAMERA_INFO)):
            if kind == "depth" and not self.config.use_depth:
                continue
            if got is None:
                flags.add(flag)
                stats[kind].missing_in_frames += 1
            else:
                stats[kind].used += 1

        imu = sample_at(self._imu, stamp_ns, self._max_gap_ns, interpolate_imu, _hold)
        wheels = sample_at(self._wheels, stamp_ns, self._max_gap_ns, interpolate_wheels, extrapolate_wheels)
        for kind, got, missing, extrapolated in (
            ("imu", imu, NO_IMU, IMU_EXTRAPOLATED),
            ("joints", wheels, NO_WHEELS, WHEELS_EXTRAPOLATED),
        ):
            if got is None:
                flags.add(missing)
                stats[kind].missing_in_frames += 1
            else:
                stats[kind].used += 1
                if got.mode == "extrapolated":
                    flags.add(extrapolated)
                    stats[kind].extrapolated += 1

        gps = None
        latest = self._gps.at_or_before(stamp_ns)
        if latest is None:
            flags.add(NO_GPS)
            stats["gps"].missing_in_frames += 1
        else:
            fix_stamp, reading = latest
            age_ns = stamp_ns - fix_stamp
            stale = age_ns > self._gps_tolerance_ns
            gps = replace(reading, age_s=age_ns / NS_PER_S, stale=stale)
            if stale:
                flags.add(GPS_STALE)
                stats["gps"].stale += 1
                stats["gps"].missing_in_frames += 1
            else:
                stats["gps"].used += 1

        if self._last_released_ns is not None and stamp_ns < self._last_released_ns:
            flags.add(OUT_OF_ORDER)
        else:
            self._last_released_ns = stamp_ns
        self.frames_released += 1
        if flags & {NO_DEPTH, NO_CAMERA_INFO, NO_IMU, NO_WHEELS}:
            self.frames_incomplete += 1
        return SyncedFrame(
            stamp_ns=stamp_ns,
            image=matched["image"].item,
            depth=None if depth is None else depth.item,
            camera_info=None if info is None else info.item,
            imu=None if imu is None else imu.value,
            wheels=None if wheels is None else wheels.value,
            gps=gps,
            depth_stamp_ns=None if depth is None else depth.stamp_ns,
            camera_info_stamp_ns=None if info is None else info.stamp_ns,
            flags=frozenset(flags),
        )


# --------------------------------------------------------------------------- odometry


@dataclass(frozen=True)
class OdometryConfig:
    """Geometry and noise model of :class:`OdometryFusion` (defaults: the sim rover, a BMI088-class gyro)."""

    wheel_radius_m: float = 0.06
    track_width_m: float = 0.30
    wheel_error_per_m: float = 0.01
    """std of a wheel's travelled distance grows as this times sqrt(distance in m)"""
    yaw_slip_fraction: float = 0.05
    """std of the wheels' turn as a fraction of it (skid-steer wheels slip when turning)"""
    use_imu: bool = True
    """fuse the gyro's yaw rate (False: wheels only)"""
    gyro_noise_density: float = 2.4e-4
    """rad/s/sqrt(Hz): white noise of the yaw rate"""
    gyro_bias_sigma: float = 1.7e-3
    """rad/s: uncertainty of the gyro bias after the stationary estimate"""
    estimate_gyro_bias: bool = True
    """learn the gyro bias while the wheels stand still"""
    bias_time_constant_s: float = 5.0
    max_wheel_rate_rps: float = 60.0
    """a wheel turning faster than this between two readings is an encoder wrap or jump"""
    max_imu_gap_s: float = 0.1
    """farthest a gyro sample may be from an interval's end to be used"""
    speed_sigma_mps: float = 0.02
    """std of the wheel speed for the twist covariance"""

    def validate(self) -> OdometryConfig:
        """Raise ``ValueError`` naming the first bad field; return self."""
        for name in ("wheel_radius_m", "track_width_m", "max_wheel_rate_rps", "max_imu_gap_s", "bias_time_constant_s"):
            value = float(getattr(self, name))
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)!r}")
        for name in ("wheel_error_per_m", "yaw_slip_fraction", "gyro_noise_density", "gyro_bias_sigma",
                     "speed_sigma_mps"):
            value = float(getattr(self, name))
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        return self


@dataclass(frozen=True)
class OdometryState:
    """Planar pose (x, y, yaw) in ``odom``, twist (v, w) in ``base_link``, 6x6 row-major covariances.

    Covariance order (x, y, z, roll, pitch, yaw) as ``nav_msgs/Odometry``; axes the model does
    not observe get ``OdometryFusion.UNOBSERVED_VARIANCE``.
    """

    stamp_ns: int
    x: float
    y: float
    yaw: float
    v: float
    w: float
    pose_covariance: np.ndarray
    twist_covariance: np.ndarray
    distance_m: float
    imu_used: bool

    def quaternion_xyzw(self) -> np.ndarray:
        """Heading as a quaternion (x, y, z, w)."""
        return np.array([0.0, 0.0, math.sin(0.5 * self.yaw), math.cos(0.5 * self.yaw)])


class OdometryFusion:
    """Dead reckoning from wheel encoders with the heading increment fused with the gyro.

    Model (per wheel reading, interval ``dt``): wheel travel ``dL, dR = r * dphi``; distance
    ``ds = (dL + dR) / 2`` with variance ``k^2 (|dL| + |dR|) / 4`` (``k = wheel_error_per_m``);
    wheel turn ``dth_w = (dR - dL) / b`` with variance ``k^2 (|dL| + |dR|) / b^2 +
    (yaw_slip_fraction * dth_w)^2``; gyro turn ``dth_g`` = trapezoidal integral of
    ``(gyro_z - bias)`` over the interval with variance ``n^2 dt + (sigma_b dt)^2``. The two turns
    are fused by inverse variance (standing still the wheels' zero variance wins, so a gyro bias
    cannot spin a parked rover; its bias is learnt then). The pose moves along the exact arc and
    its 3x3 (x, y, yaw) covariance is propagated with the Jacobians of that step, so it grows
    with distance and turning. Per-step errors are treated as independent. The gyro's z axis is
    taken as the yaw axis (the rover is planar; on a 10 degree slope that is 1.5 % off).

    Wheel angle jumps: a change faster than ``max_wheel_rate_rps`` is first read as a wrap
    (drivers that wrap the joint angle to +-pi or 0..2pi) and unwrapped; if it is still too fast
    it is an encoder reset: the interval is skipped and the reference restarts (counted).
    """

    UNOBSERVED_VARIANCE = 1e6

    def __init__(self, config: OdometryConfig | None = None, initial_pose: tuple[float, float, float] = (0, 0, 0)):
        self.config = (config or OdometryConfig()).validate()
        if len(initial_pose) != 3 or not all(math.isfinite(float(v)) for v in initial_pose):
            raise ValueError(f"initial_pose must be a finite (x, y, yaw), got {initial_pose!r}")
        self.counts = {"wheel_updates": 0, "imu_fused": 0, "imu_gaps": 0, "wraps": 0, "jumps": 0,
                       "out_of_order": 0, "duplicates": 0}
        self.gyro_bias = 0.0
        self._gyro: TimeSeriesBuffer[float] = TimeSeriesBuffer(2 * NS_PER_S)
        self._stamp_ns = 0
        self.reset(initial_pose)

    def reset(self, pose: tuple[float, float, float] | None = None) -> None:
        """Forget the wheel reference and gyro samples (after a clock reset); keep the pose unless given."""
        if pose is not None:
            self.x, self.y, self.yaw = (float(v) for v in pose)
            self.cov = np.zeros((3, 3))
            self.distance_m = 0.0
            self.v = self.w = 0.0
        self._gyro.clear()
        self._last: tuple[int, float, float] | None = None
        self._imu_used = False
        self._twist_var = (self.config.speed_sigma_mps**2, self.UNOBSERVED_VARIANCE)

    def set_config(self, config: OdometryConfig) -> None:
        """New geometry/noise settings; the pose and references are kept."""
        self.config = config.validate()

    def add_imu(self, stamp_ns: int, yaw_rate_rps: float) -> None:
        """A gyro z reading (rad/s)."""
        stamp_ns = _stamp("imu", stamp_ns)
        if not math.isfinite(yaw_rate_rps):
            raise ValueError(f"imu yaw rate must be finite, got {yaw_rate_rps!r}")
        self._gyro.insert(stamp_ns, float(yaw_rate_rps))

    def _rate_at(self, stamp_ns: int) -> float | None:
        max_gap = round(self.config.max_imu_gap_s * NS_PER_S)
        got = sample_at(self._gyro, stamp_ns, max_gap, lambda a, b, f: a + f * (b - a))
        return None if got is None else got.value

    def _gyro_turn(self, start_ns: int, end_ns: int) -> float | None:
        """Integral of the gyro rate over [start, end] (rad), None when the samples do not cover it."""
        first, last = self._rate_at(start_ns), self._rate_at(end_ns)
        if first is None or last is None:
            return None
        points = [(start_ns, first), *self._gyro.between(start_ns, end_ns), (end_ns, last)]
        max_step = 2 * round(self.config.max_imu_gap_s * NS_PER_S)
        turn = 0.0
        for (t0, w0), (t1, w1) in zip(points, points[1:]):
            if t1 - t0 > max_step:
                return None
            turn += 0.5 * (w0 + w1) * (t1 - t0) / NS_PER_S
        return turn

    def _wheel_delta(self, delta: float, dt: float) -> float | None:
        limit = self.config.max_wheel_rate_rps * dt
        if abs(delta) <= limit:
            return delta
        wrapped = wrap_angle(delta)
        if abs(wrapped) <= limit:
            self.counts["wraps"] += 1
            return wrapped
        self.counts["jumps"] += 1
        return None

    def add_wheels(
        self,
        stamp_ns: int,
        left_position: float,
        right_position: float,
        left_velocity: float | None = None,
        right_velocity: float | None = None,
    ) -> OdometryState | None:
        """Integrate one wheel reading (rad, rad/s); return the new state, None when it was not used
        (older than or equal to the last reading). The first reading only sets the reference."""
        stamp_ns = _stamp("joints", stamp_ns)
        _finite("wheel positions", (left_position, right_position, left_velocity, right_velocity))
        cfg = self.config
        if self._last is None:
            self._last = (stamp_ns, float(left_position), float(right_position))
            self._stamp_ns = stamp_ns
            if left_velocity is not None and right_velocity is not None:
                self.v = 0.5 * cfg.wheel_radius_m * (left_velocity + right_velocity)
            return self.state()
        t0, left0, right0 = self._last
        if stamp_ns <= t0:
            self.counts["out_of_order" if stamp_ns < t0 else "duplicates"] += 1
            return None
        dt = (stamp_ns - t0) / NS_PER_S
        self._last = (stamp_ns, float(left_position), float(right_position))
        self._stamp_ns = stamp_ns
        d_left = self._wheel_delta(left_position - left0, dt)
        d_right = self._wheel_delta(right_position - right0, dt)
        if d_left is None or d_right is None:
            return self.state()  # encoder reset: the reference restarts here
        self.counts["wheel_updates"] += 1
        r, b, k = cfg.wheel_radius_m, cfg.track_width_m, cfg.wheel_error_per_m
        dL, dR = d_left * r, d_right * r
        ds = 0.5 * (dL + dR)
        turn_wheels = (dR - dL) / b
        travel = abs(dL) + abs(dR)
        var_ds = 0.25 * k * k * travel
        var_wheels = k * k * travel / (b * b) + (cfg.yaw_slip_fraction * turn_wheels) ** 2 + 1e-14
        turn, var_turn = turn_wheels, var_wheels
        self._imu_used = False
        if cfg.use_imu:
            gyro = self._gyro_turn(t0, stamp_ns)
            if gyro is None:
                self.counts["imu_gaps"] += 1
            else:
                if cfg.estimate_gyro_bias and dL == 0.0 and dR == 0.0:
                    alpha = min(1.0, dt / cfg.bias_time_constant_s)
                    self.gyro_bias += alpha * (gyro / dt - self.gyro_bias)
                turn_gyro = gyro - self.gyro_bias * dt
                var_gyro = cfg.gyro_noise_density**2 * dt + (cfg.gyro_bias_sigma * dt) ** 2 + 1e-18
                turn = (turn_wheels * var_gyro + turn_gyro * var_wheels) / (var_wheels + var_gyro)
                var_turn = var_wheels * var_gyro / (var_wheels + var_gyro)
                self._imu_used = True
                self.counts["imu_fused"] += 1
        heading = self.yaw + 0.5 * turn
        c, s = math.cos(heading), math.sin(heading)
        chord = ds * (math.sin(0.5 * turn) / (0.5 * turn) if abs(turn) > 1e-9 else 1.0)
        F = np.array([[1.0, 0.0, -chord * s], [0.0, 1.0, chord * c], [0.0, 0.0, 1.0]])
        G = np.array([[c, -0.5 * chord * s], [s, 0.5 * chord * c], [0.0, 1.0]])
        self.cov = F @ self.cov @ F.T + G @ np.diag([var_ds, var_turn]) @ G.T
        self.x += chord * c
        self.y += chord * s
        self.yaw = wrap_angle(self.yaw + turn)
        self.distance_m += abs(ds)
        if left_velocity is not None and right_velocity is not None:
            self.v = 0.5 * r * (left_velocity + right_velocity)
        else:
            self.v = ds / dt
        self.w = turn / dt
        self._twist_var = (cfg.speed_sigma_mps**2, var_turn / (dt * dt))
        return self.state()

    def state(self) -> OdometryState:
        """The current estimate."""
        big = self.UNOBSERVED_VARIANCE
        c = self.cov
        pose = np.diag([0.0, 0.0, big, big, big, 0.0])
        for i, a in enumerate((0, 1, 5)):
            for j, b in enumerate((0, 1, 5)):
                pose[a, b] = c[i, j]
        var_v, var_w = self._twist_var
        # vy ~ 0 by the non-holonomic constraint; vz, wx, wy unobserved
        twist = np.diag([var_v, 1e-6, big, big, big, var_w])
        return OdometryState(
            stamp_ns=self._stamp_ns,
            x=self.x,
            y=self.y,
            yaw=self.yaw,
            v=self.v,
            w=self.w,
            pose_covariance=pose.reshape(36),
            twist_covariance=twist.reshape(36),
            distance_m=self.distance_m,
            imu_used=self._imu_used,
        )


# --------------------------------------------------------------------------- ENU


@dataclass(frozen=True)
class EnuPosition:
    """A position in the local ENU frame (metres) with its 3x3 covariance (m^2)."""

    east: float
    north: float
    up: float
    covariance: np.ndarray


class EnuConverter:
    """GPS fixes to local East-North-Up metres about an origin (WGS84, pymap3d).

    The origin is the given ``(lat, lon, alt)`` or, when None, the first good fix converted.
    The covariance is the fix's (NavSatFix gives it in ENU already); unknown parts get
    ``UNOBSERVED_VARIANCE``. A fix without altitude is put at the origin's height with an
    unobserved vertical variance.
    """

    UNOBSERVED_VARIANCE = 1e6

    def __init__(self, origin: tuple[float, float, float] | None = None) -> None:
        self.origin: tuple[float, float, float] | None = None
        if origin is not None:
            lat, lon, alt = (float(v) for v in origin)
            validate_lat_lon(lat, lon, prefix="origin ")
            if not math.isfinite(alt):
                raise ValueError(f"origin altitude must be finite, got {origin[2]!r}")
            self.origin = (lat, lon, alt)

    def convert(self, fix: GpsFix, covariance: Sequence[float] | None = None) -> EnuPosition:
        """ENU position of ``fix``; ``ValueError`` for a no-fix status or a position out of range."""
        if fix.status is not None and fix.status < 0:
            raise ValueError(f"gps fix has status {fix.status} (no fix)")
        validate_lat_lon(fix.latitude, fix.longitude, prefix="gps ")
        has_alt = fix.altitude is not None and math.isfinite(fix.altitude)
        if self.origin is None:
            self.origin = (float(fix.latitude), float(fix.longitude), float(fix.altitude) if has_alt else 0.0)
        lat0, lon0, alt0 = self.origin
        alt = float(fix.altitude) if has_alt else alt0
        e, n, u = geodetic_to_enu(fix.latitude, fix.longitude, alt, lat0, lon0, alt0)
        if covariance is None:
            cov = np.eye(3) * self.UNOBSERVED_VARIANCE
        else:
            cov = np.asarray(covariance, dtype=np.float64).reshape(3, 3).copy()
            if not np.isfinite(cov).all():
                raise ValueError(f"gps covariance must be finite, got {cov.ravel().tolist()}")
        if not has_alt:
            cov[2, :] = cov[:, 2] = 0.0
            cov[2, 2] = self.UNOBSERVED_VARIANCE
        return EnuPosition(float(e), float(n), float(u), cov)

    def to_geodetic(self, east: float, north: float, up: float) -> tuple[float, float, float]:
        """WGS84 (lat, lon degrees, ellipsoidal alt m) of an ENU point; needs an origin."""
        if self.origin is None:
            raise ValueError("EnuConverter has no origin yet: give one or convert a fix first")
        return enu_to_geodetic(east, north, up, *self.origin)
