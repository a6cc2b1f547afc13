"""Wheel encoders + gyro yaw rate -> planar odometry (REP 105) with propagated covariance."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from forest_perception.geo import wrap_angle
from forest_perception.readings import PlanarOdometry
from forest_perception.sync.base import NS_PER_S, check_finite, check_stamp
from forest_perception.sync.interpolate import TimeSeriesBuffer, sample_at


def planar_covariances(cov_xy_yaw: np.ndarray, var_v: float, var_w: float,
                       unobserved: float) -> tuple[np.ndarray, np.ndarray]:
    """36-element row-major pose and twist covariances (x, y, z, roll, pitch, yaw) of planar odometry.

    The pose's (x, y, yaw) block is ``cov_xy_yaw`` (3x3); the twist has ``var_v`` on vx and ``var_w`` on
    wz. Axes a planar model does not observe (z, roll, pitch; vz, wx, wy) get ``unobserved``, as
    ``nav_msgs/Odometry`` readers expect.
    """
    pose = np.diag([0.0, 0.0, unobserved, unobserved, unobserved, 0.0])
    for i, a in enumerate((0, 1, 5)):
        for j, b in enumerate((0, 1, 5)):
            pose[a, b] = cov_xy_yaw[i, j]
    # vy ~ 0 by the non-holonomic constraint
    twist = np.diag([var_v, 1e-6, unobserved, unobserved, unobserved, var_w])
    return pose.reshape(36), twist.reshape(36)


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
class OdometryState(PlanarOdometry):
    """Fused odometry at ``stamp_ns``; axes the model does not observe get ``OdometryFusion.UNOBSERVED_VARIANCE``."""

    stamp_ns: int
    distance_m: float
    imu_used: bool


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
        stamp_ns = check_stamp("imu", stamp_ns)
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
        stamp_ns = check_stamp("joints", stamp_ns)
        check_finite("wheel positions", (left_position, right_position, left_velocity, right_velocity))
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
        var_v, var_w = self._twist_var
        pose, twist = planar_covariances(self.cov, var_v, var_w, self.UNOBSERVED_VARIANCE)
        return OdometryState(
            stamp_ns=self._stamp_ns,
            x=self.x,
            y=self.y,
            yaw=self.yaw,
            v=self.v,
            w=self.w,
            pose_covariance=pose,
            twist_covariance=twist,
            distance_m=self.distance_m,
            imu_used=self._imu_used,
        )
