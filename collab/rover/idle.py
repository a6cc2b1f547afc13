"""Whether the rover stands still long enough to train, from its odometry."""

from __future__ import annotations

import math
from collections.abc import Sequence


class IdleDetector:
    """Whether the rover stands still: odometry speed at most ``idle_speed_mps`` for ``idle_seconds``.

    No odometry yet, or none for ``odom_timeout_s``, is not idle: a rover whose odometry is down may be
    driving. Times are seconds on one clock (ROS time in the node); time going backwards (a simulation
    reset) forgets the history.
    """

    def __init__(self, idle_speed_mps: float, idle_seconds: float, odom_timeout_s: float = 1.0) -> None:
        for name, value in (("idle_speed_mps", idle_speed_mps), ("idle_seconds", idle_seconds),
                            ("odom_timeout_s", odom_timeout_s)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        self.idle_speed_mps = float(idle_speed_mps)
        self.idle_seconds = float(idle_seconds)
        self.odom_timeout_s = float(odom_timeout_s)
        self.reset()

    def reset(self) -> None:
        """Forget every sample."""
        self._first: float | None = None
        self._last: float | None = None
        self._last_moving: float | None = None
        self._last_speed = math.nan

    def update(self, t: float, speed: float) -> None:
        """Add one odometry sample (seconds, m/s); ``ValueError`` for a non-finite speed or time."""
        if not (math.isfinite(t) and math.isfinite(speed)):
            raise ValueError(f"odometry sample must be finite, got t={t!r} speed={speed!r}")
        if self._last is not None and t < self._last:
            self.reset()
        if self._first is None:
            self._first = t
        self._last, self._last_speed = t, abs(float(speed))
        if self._last_speed > self.idle_speed_mps:
            self._last_moving = t

    def state(self, now: float) -> tuple[bool, str]:
        """``(idle, why)`` at time ``now``."""
        if self._last is None:
            return False, "no odometry received yet"
        age = now - self._last
        if age > self.odom_timeout_s:
            return False, f"no odometry for {age:.1f} s (timeout {self.odom_timeout_s} s)"
        if self._last_speed > self.idle_speed_mps:
            return False, f"moving at {self._last_speed:.2f} m/s (idle at or below {self.idle_speed_mps} m/s)"
        since = self._last_moving if self._last_moving is not None else self._first
        still = now - since
        if still < self.idle_seconds:
            return False, f"stopped for {still:.1f} s of the {self.idle_seconds} s required"
        return True, f"stopped for {still:.1f} s"


def odometry_speed(linear: Sequence[float]) -> float:
    """Speed (m/s) from an odometry twist's linear velocity (x, y, z)."""
    values = [float(v) for v in linear]
    if len(values) != 3:
        raise ValueError(f"linear velocity must have 3 components, got {len(values)}")
    return math.sqrt(sum(v * v for v in values))


def train_permission(idle: bool, idle_reason: str, train_only_when_idle: bool, busy: str) -> tuple[bool, str]:
    """Whether a local training may start now, and why (not)."""
    if busy:
        return False, f"busy: {busy}"
    if train_only_when_idle and not idle:
        return False, f"rover not idle: {idle_reason}"
    return True, "idle" if idle else f"training while not idle ({idle_reason}): train_only_when_idle is false"
