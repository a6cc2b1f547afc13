"""The frame assembler: camera sets matched, IMU and wheels interpolated, GPS freshness, statistics.

Its settings and what it returns (:class:`SyncConfig`, :class:`SyncedFrame`, :class:`StreamStats`...)
are in :mod:`forest_perception.sync.records`. Details: docs/sensor_sync.md.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from forest_perception.readings import GpsFix, ImuSample, WheelEncoders
from forest_perception.sync import base as frame_flag  # SyncedFrame.flags: frame_flag.NO_DEPTH, ...
from forest_perception.sync.approx import ApproximateTimeSynchronizer, Stamped
from forest_perception.sync.base import (
    CAMERA_KINDS,
    KINDS,
    NS_PER_S,
    WATERMARK_KINDS,
    check_finite,
    check_stamp,
    seconds_to_ns,
)
from forest_perception.sync.interpolate import (
    TimeSeriesBuffer,
    extrapolate_wheels,
    hold_value,
    interpolate_imu,
    interpolate_wheels,
    sample_at,
)
from forest_perception.sync.records import GpsReading, StreamStats, SyncConfig, SyncedFrame, SyncEvent


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
        self._slop_ns = seconds_to_ns("slop_s", config.slop_s)
        self._max_wait_ns = seconds_to_ns("max_wait_s", config.max_wait_s)
        self._max_gap_ns = seconds_to_ns("max_gap_s", config.max_gap_s)
        self._gps_tolerance_ns = seconds_to_ns("gps_tolerance_s", config.gps_tolerance_s)
        self._missing_ns = seconds_to_ns("missing_after_s", config.missing_after_s)
        self._jump_ns = seconds_to_ns("clock_jump_s", config.clock_jump_s)
        span = seconds_to_ns("buffer_s", config.buffer_s)
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
            check_finite("imu angular_velocity", value.angular_velocity)
            check_finite("imu linear_acceleration", value.linear_acceleration)
            if value.orientation is not None:
                check_finite("imu orientation", value.orientation)
                if np.linalg.norm(value.orientation) < 1e-6:
                    raise ValueError(f"imu orientation is a zero quaternion: {value.orientation}")
        elif kind == "joints":
            if not isinstance(value, WheelEncoders):
                raise ValueError(
                    f"joints value must be a forest_perception.readings.WheelEncoders, got {type(value).__name__}"
                )
            if value.left_position is None or value.right_position is None:
                raise ValueError(f"joints need left and right wheel positions, got {value}")
            check_finite("joints", (value.left_position, value.right_position, value.left_velocity,
                                    value.right_velocity))
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
            stamp_ns = check_stamp(kind, stamp_ns)
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
        if kind in WATERMARK_KINDS:
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
        now_ns = check_stamp("now", now_ns)
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
        stamp = old if new_stamp_ns is None else check_stamp("new_stamp", new_stamp_ns)
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
        partners = (("depth", depth, frame_flag.NO_DEPTH), ("camera_info", info, frame_flag.NO_CAMERA_INFO))
        for kind, got, flag in partners:
            if kind == "depth" and not self.config.use_depth:
                continue
            if got is None:
                flags.add(flag)
                stats[kind].missing_in_frames += 1
            else:
                stats[kind].used += 1

        imu = sample_at(self._imu, stamp_ns, self._max_gap_ns, interpolate_imu, hold_value)
        wheels = sample_at(self._wheels, stamp_ns, self._max_gap_ns, interpolate_wheels, extrapolate_wheels)
        for kind, got, missing, extrapolated in (
            ("imu", imu, frame_flag.NO_IMU, frame_flag.IMU_EXTRAPOLATED),
            ("joints", wheels, frame_flag.NO_WHEELS, frame_flag.WHEELS_EXTRAPOLATED),
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
            flags.add(frame_flag.NO_GPS)
            stats["gps"].missing_in_frames += 1
        else:
            fix_stamp, reading = latest
            age_ns = stamp_ns - fix_stamp
            stale = age_ns > self._gps_tolerance_ns
            gps = replace(reading, age_s=age_ns / NS_PER_S, stale=stale)
            if stale:
                flags.add(frame_flag.GPS_STALE)
                stats["gps"].stale += 1
                stats["gps"].missing_in_frames += 1
            else:
                stats["gps"].used += 1

        if self._last_released_ns is not None and stamp_ns < self._last_released_ns:
            flags.add(frame_flag.OUT_OF_ORDER)
        else:
            self._last_released_ns = stamp_ns
        self.frames_released += 1
        if flags & {frame_flag.NO_DEPTH, frame_flag.NO_CAMERA_INFO, frame_flag.NO_IMU, frame_flag.NO_WHEELS}:
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
