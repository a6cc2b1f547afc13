"""The records of sensor sync: its settings, the frames it releases, per-sensor statistics and events.

:class:`SyncConfig` sets :class:`~forest_perception.sync.assembler.SensorSync` up; it releases
:class:`SyncedFrame` s (with a :class:`GpsReading`), counts per sensor in :class:`StreamStats` and
reports :class:`SyncEvent` s. Details: docs/sensor_sync.md.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from forest_perception.readings import GpsFix, ImuSample, WheelEncoders
from forest_perception.sync.base import CAMERA_KINDS, NS_PER_S, seconds_to_ns


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
        seconds_to_ns("slop_s", self.slop_s)
        seconds_to_ns("max_wait_s", self.max_wait_s)
        for name in ("max_gap_s", "gps_tolerance_s", "missing_after_s", "clock_jump_s", "buffer_s"):
            seconds_to_ns(name, getattr(self, name), allow_zero=False)
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
