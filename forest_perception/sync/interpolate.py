"""Time-ordered sample buffers and interpolation of IMU and wheel samples at a stamp."""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

import numpy as np

from forest_perception.readings import ImuSample, WheelEncoders
from forest_perception.sync.base import NS_PER_S

T = TypeVar("T")



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


def hold_value(value: T, dt_s: float) -> T:  # noqa: ARG001 - same signature as extrapolate_wheels
    """The last sample unchanged: the extrapolation of readings that have no rate (IMU)."""
    return value
