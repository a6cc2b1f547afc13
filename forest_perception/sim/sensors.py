"""Sensor models of the simulated rover: IMU, GPS under canopy, wheel encoders, wheel odometry.

Details: docs/simulator.md (`sensors`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from forest_perception.frames import RoverGeometry
from forest_perception.geo import enu_to_geodetic, quaternion_multiply, validate_lat_lon, wrap_angle
from forest_perception.readings import PlanarOdometry
from forest_perception.sim.rover import RoverState
from forest_perception.sync.odometry import planar_covariances

# sensor_msgs/NavSatStatus and NavSatFix constants
STATUS_NO_FIX = -1
STATUS_FIX = 0
STATUS_SBAS_FIX = 1
STATUS_GBAS_FIX = 2
SERVICE_GPS = 1
COVARIANCE_TYPE_UNKNOWN = 0
COVARIANCE_TYPE_APPROXIMATED = 1
COVARIANCE_TYPE_DIAGONAL_KNOWN = 2
COVARIANCE_TYPE_KNOWN = 3

G0 = 9.80665
DEG = math.pi / 180.0


def _nonneg(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


def _pos(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def _diag9(variances: np.ndarray) -> np.ndarray:
    """Row-major 3x3 diagonal covariance as 9 floats."""
    return np.diag(np.asarray(variances, dtype=np.float64)).reshape(9)


# --------------------------------------------------------------------------- IMU
@dataclass
class ImuSample:
    """One IMU reading: ENU orientation (x, y, z, w), body rate (rad/s), specific force (m/s^2, +g at rest).

    Covariances are row-major 3x3 as 9 floats; ``orientation_covariance[0] == -1`` means
    no orientation estimate (REP 145 / sensor_msgs convention).
    """

    t: float
    orientation_xyzw: np.ndarray
    angular_velocity: np.ndarray
    linear_acceleration: np.ndarray
    orientation_covariance: np.ndarray
    angular_velocity_covariance: np.ndarray
    linear_acceleration_covariance: np.ndarray


class ImuModel:
    """MEMS IMU error model (defaults: BMI088-class datasheet values).

    Per sample at ``rate_hz``: white noise with std ``density * sqrt(rate_hz)``; biases
    start at ``N(0, *_bias_sigma)`` (turn-on offset) and random-walk with
    ``*_bias_random_walk`` (per sqrt(s)) over the time between calls. The declared
    covariance is white-noise variance plus turn-on bias variance (what a consumer that
    does not estimate biases should assume); the slow bias walk is not included.
    Orientation noise is a small rotation about the world (fixed) axes with stds
    ``orientation_sigma_rad`` (roll, pitch, yaw).
    """

    def __init__(
        self,
        rng: np.random.Generator,
        *,
        rate_hz: float = 100.0,
        gyro_noise_density: float = 0.014 * DEG,  # rad/s/sqrt(Hz)
        accel_noise_density: float = 175e-6 * G0,  # m/s^2/sqrt(Hz)
        gyro_bias_sigma: float = 0.1 * DEG,  # rad/s, turn-on bias after factory trim
        accel_bias_sigma: float = 0.02,  # m/s^2
        gyro_bias_random_walk: float = 2e-5,  # rad/s^2/sqrt(Hz)
        accel_bias_random_walk: float = 3e-4,  # m/s^3/sqrt(Hz)
        orientation_sigma_rad: tuple[float, float, float] = (0.01, 0.01, 0.05),
        provide_orientation: bool = True,
    ) -> None:
        if not isinstance(rng, np.random.Generator):
            raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        self.rng = rng
        self.rate_hz = _pos("rate_hz", rate_hz)
        self.gyro_noise_density = _nonneg("gyro_noise_density", gyro_noise_density)
        self.accel_noise_density = _nonneg("accel_noise_density", accel_noise_density)
        self.gyro_bias_sigma = _nonneg("gyro_bias_sigma", gyro_bias_sigma)
        self.accel_bias_sigma = _nonneg("accel_bias_sigma", accel_bias_sigma)
        self.gyro_bias_random_walk = _nonneg("gyro_bias_random_walk", gyro_bias_random_walk)
        self.accel_bias_random_walk = _nonneg("accel_bias_random_walk", accel_bias_random_walk)
        if len(orientation_sigma_rad) != 3:
            raise ValueError(f"orientation_sigma_rad must be (roll, pitch, yaw) stds, got {orientation_sigma_rad!r}")
        self.orientation_sigma_rad = np.array(
            [_nonneg(f"orientation_sigma_rad[{i}]", s) for i, s in enumerate(orientation_sigma_rad)]
        )
        self.provide_orientation = bool(provide_orientation)
        self.gyro_bias = self.gyro_bias_sigma * self.rng.standard_normal(3)
        self.accel_bias = self.accel_bias_sigma * self.rng.standard_normal(3)
        self._last_t: float | None = None

    @property
    def gyro_sigma(self) -> float:
        """Per-sample white-noise std of the rate (rad/s)."""
        return self.gyro_noise_density * math.sqrt(self.rate_hz)

    @property
    def accel_sigma(self) -> float:
        """Per-sample white-noise std of the specific force (m/s^2)."""
        return self.accel_noise_density * math.sqrt(self.rate_hz)

    def covariances(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(orientation, angular velocity, linear acceleration) covariances, 9 floats each."""
        if self.provide_orientation:
            orientation = _diag9(self.orientation_sigma_rad**2)
        else:
            orientation = np.zeros(9)
            orientation[0] = -1.0
        gyro = _diag9(np.full(3, self.gyro_sigma**2 + self.gyro_bias_sigma**2))
        accel = _diag9(np.full(3, self.accel_sigma**2 + self.accel_bias_sigma**2))
        return orientation, gyro, accel

    def measure(
        self,
        t: float,
        orientation_xyzw: np.ndarray,
        angular_velocity: np.ndarray,
        linear_acceleration: np.ndarray,
        dt: float | None = None,
    ) -> ImuSample:
        """Noisy reading at time ``t`` of the true orientation, body rate and body specific force.

        The biases walk over ``dt`` seconds if given, else over the time since the last call.
        """
        t = float(t)
        elapsed = 0.0
        if self._last_t is not None:
            if t < self._last_t:
                raise ValueError(f"t must not go backwards: {t} < {self._last_t}")
            elapsed = t - self._last_t
        if dt is not None:
            elapsed = _nonneg("dt", dt)
        if elapsed > 0:
            sq = math.sqrt(elapsed)
            self.gyro_bias = self.gyro_bias + self.gyro_bias_random_walk * sq * self.rng.standard_normal(3)
            self.accel_bias = self.accel_bias + self.accel_bias_random_walk * sq * self.rng.standard_normal(3)
        self._last_t = t
        gyro = np.asarray(angular_velocity, dtype=np.float64) + self.gyro_bias
        gyro = gyro + self.gyro_sigma * self.rng.standard_normal(3)
        accel = np.asarray(linear_acceleration, dtype=np.float64) + self.accel_bias
        accel = accel + self.accel_sigma * self.rng.standard_normal(3)
        if self.provide_orientation:
            # small rotation about the fixed (world) axes, applied on the left
            rv = self.orientation_sigma_rad * self.rng.standard_normal(3)
            angle = float(np.linalg.norm(rv))
            half = 0.5 * angle
            axis_sin = rv * (math.sin(half) / angle) if angle > 1e-12 else 0.5 * rv
            q = quaternion_multiply(np.array([*axis_sin, math.cos(half)]), orientation_xyzw)
            q /= np.linalg.norm(q)
            if q[3] < 0:
                q = -q
        else:
            q = np.array([0.0, 0.0, 0.0, 1.0])
        cov_o, cov_g, cov_a = self.covariances()
        return ImuSample(t, q, gyro, accel, cov_o, cov_g, cov_a)

    def sample(self, state: RoverState, dt: float | None = None) -> ImuSample:
        """Reading for a rover state (IMU axes aligned with ``base_link``; see :meth:`measure` for ``dt``)."""
        return self.measure(state.t, state.quaternion_xyzw(), state.angular_velocity, state.linear_acceleration, dt)


# --------------------------------------------------------------------------- GPS
@dataclass
class GpsFix:
    """A NavSatFix: WGS84 degrees, ellipsoidal altitude (m), status, ENU covariance (m^2, 9 floats).

    Without a fix, status is ``STATUS_NO_FIX``, the position is NaN and the covariance
    type ``COVARIANCE_TYPE_UNKNOWN``.
    """

    t: float
    latitude: float
    longitude: float
    altitude: float
    status: int
    covariance: np.ndarray
    covariance_type: int
    service: int = SERVICE_GPS
    error_enu: np.ndarray = field(default_factory=lambda: np.zeros(3))  # ground truth error, for tests


class GpsModel:
    """Consumer GNSS receiver under a forest canopy.

    Per-axis horizontal sigma grows from ``sigma_open_m`` (open sky) to
    ``sigma_canopy_m`` (full cover) as ``cover**1.5``; vertical sigma is
    ``vertical_ratio`` times it. The error is a Gauss-Markov process (time constant
    ``correlation_time_s``, share ``correlated_fraction`` of the variance) plus white
    noise, so its stationary variance is exactly the declared covariance. Above
    ``loss_cover`` the fix drops at up to ``loss_rate_per_s`` (at full cover) and comes
    back after on average ``mean_outage_s`` (at once when the sky opens up).
    """

    def __init__(
        self,
        datum_lat: float,
        datum_lon: float,
        datum_alt: float,
        rng: np.random.Generator,
        *,
        sigma_open_m: float = 1.5,
        sigma_canopy_m: float = 6.0,
        vertical_ratio: float = 1.8,
        correlated_fraction: float = 0.8,
        correlation_time_s: float = 60.0,
        loss_cover: float = 0.6,
        loss_rate_per_s: float = 0.05,
        mean_outage_s: float = 8.0,
    ) -> None:
        validate_lat_lon(datum_lat, datum_lon, prefix="datum_")
        self.datum_lat = float(datum_lat)
        self.datum_lon = float(datum_lon)
        self.datum_alt = float(datum_alt)
        if not math.isfinite(self.datum_alt) or abs(self.datum_alt) > 1e5:
            raise ValueError(f"datum_alt must be a finite height within +-100 km, got {datum_alt!r}")
        if not isinstance(rng, np.random.Generator):
            raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        self.rng = rng
        self.sigma_open_m = _pos("sigma_open_m", sigma_open_m)
        self.sigma_canopy_m = _pos("sigma_canopy_m", sigma_canopy_m)
        if self.sigma_canopy_m < self.sigma_open_m:
            raise ValueError(f"sigma_canopy_m ({sigma_canopy_m}) must be >= sigma_open_m ({sigma_open_m})")
        self.vertical_ratio = _pos("vertical_ratio", vertical_ratio)
        self.correlated_fraction = _nonneg("correlated_fraction", correlated_fraction)
        if self.correlated_fraction > 1:
            raise ValueError(f"correlated_fraction must be within [0, 1], got {correlated_fraction}")
        self.correlation_time_s = _pos("correlation_time_s", correlation_time_s)
        self.loss_cover = _nonneg("loss_cover", loss_cover)
        if self.loss_cover >= 1:
            raise ValueError(f"loss_cover must be within [0, 1), got {loss_cover}")
        self.loss_rate_per_s = _nonneg("loss_rate_per_s", loss_rate_per_s)
        self.mean_outage_s = _pos("mean_outage_s", mean_outage_s)
        self._gm = self.rng.standard_normal(3)  # unit-variance Gauss-Markov state, stationary start
        self._last_t: float | None = None
        self.has_fix = True

    def sigma_enu(self, canopy_cover: float) -> np.ndarray:
        """Per-axis (east, north, up) error std in metres at this canopy cover."""
        c = float(canopy_cover)
        if not (math.isfinite(c) and 0.0 <= c <= 1.0):
            raise ValueError(f"canopy_cover must be within [0, 1], got {canopy_cover!r}")
        h = self.sigma_open_m + (self.sigma_canopy_m - self.sigma_open_m) * c**1.5
        return np.array([h, h, h * self.vertical_ratio])

    def measure(self, t: float, position_enu: np.ndarray, canopy_cover: float, dt: float | None = None) -> GpsFix:
        """Fix at time ``t`` for the antenna's true ENU position (m) under ``canopy_cover`` in [0, 1].

        The error processes advance by ``dt`` seconds if given, else by the time since the last call.
        """
        t = float(t)
        sigma = self.sigma_enu(canopy_cover)
        p = np.asarray(position_enu, dtype=np.float64).reshape(3)
        elapsed = 0.0
        if self._last_t is not None:
            if t < self._last_t:
                raise ValueError(f"t must not go backwards: {t} < {self._last_t}")
            elapsed = t - self._last_t
        dt = elapsed if dt is None else _nonneg("dt", dt)
        self._last_t = t
        phi = math.exp(-dt / self.correlation_time_s)
        self._gm = phi * self._gm + math.sqrt(1.0 - phi * phi) * self.rng.standard_normal(3)
        white = self.rng.standard_normal(3)
        rho = self.correlated_fraction
        error = sigma * (math.sqrt(rho) * self._gm + math.sqrt(1.0 - rho) * white)

        cover = float(canopy_cover)
        if self.has_fix:
            severity = max(0.0, (cover - self.loss_cover) / (1.0 - self.loss_cover))
            if self.rng.random() < 1.0 - math.exp(-self.loss_rate_per_s * severity * dt):
                self.has_fix = False
        elif cover < self.loss_cover or self.rng.random() < 1.0 - math.exp(-dt / self.mean_outage_s):
            self.has_fix = True

        if not self.has_fix:
            nan = float("nan")
            return GpsFix(t, nan, nan, nan, STATUS_NO_FIX, np.zeros(9), COVARIANCE_TYPE_UNKNOWN, error_enu=error)
        lat, lon, alt = enu_to_geodetic(
            p[0] + error[0], p[1] + error[1], p[2] + error[2], self.datum_lat, self.datum_lon, self.datum_alt
        )
        return GpsFix(
            t,
            float(lat),
            float(lon),
            float(alt),
            STATUS_FIX,
            _diag9(sigma**2),
            COVARIANCE_TYPE_DIAGONAL_KNOWN,
            error_enu=error,
        )

    def sample(
        self,
        state: RoverState,
        canopy_cover: float,
        dt: float | None = None,
        antenna_offset: tuple[float, float, float] | np.ndarray | None = None,
    ) -> GpsFix:
        """Fix for a rover state; the antenna sits at ``antenna_offset`` in ``base_link`` (default: its origin)."""
        position = state.position
        if antenna_offset is not None:
            position = position + state.rotation() @ np.asarray(antenna_offset, dtype=np.float64)
        return self.measure(state.t, position, canopy_cover, dt)


# ------------------------------------------------------------------ wheel encoders
@dataclass
class WheelReading:
    """(left, right) wheel angles (rad, quantised) and rates (rad/s) at time ``t``; raw tick counts."""

    t: float
    position: np.ndarray
    velocity: np.ndarray
    ticks: np.ndarray


class EncoderModel:
    """Incremental wheel encoders: angle -> ticks (``ticks_per_rev`` counts per wheel turn).

    ``noise_ticks`` is a Gaussian std (in ticks) of edge-timing jitter added before
    quantising; velocity is the difference of quantised angles over the time between calls.
    """

    def __init__(
        self,
        ticks_per_rev: int = 4096,
        noise_ticks: float = 0.0,
        rng: np.random.Generator | None = None,
    ) -> None:
        if isinstance(ticks_per_rev, bool) or int(ticks_per_rev) != ticks_per_rev or ticks_per_rev <= 0:
            raise ValueError(f"ticks_per_rev must be a positive integer, got {ticks_per_rev!r}")
        self.ticks_per_rev = int(ticks_per_rev)
        self.noise_ticks = _nonneg("noise_ticks", noise_ticks)
        if self.noise_ticks > 0 and rng is None:
            raise ValueError("rng must be given when noise_ticks > 0")
        self.rng = rng
        self._last: tuple[float, np.ndarray] | None = None

    @property
    def rad_per_tick(self) -> float:
        """Angular resolution (rad per tick)."""
        return 2.0 * math.pi / self.ticks_per_rev

    def measure(self, t: float, wheel_position: np.ndarray) -> WheelReading:
        """Quantised reading of the true (left, right) wheel angles (rad) at time ``t``."""
        t = float(t)
        angles = np.asarray(wheel_position, dtype=np.float64).reshape(2)
        counts = angles / self.rad_per_tick
        if self.noise_ticks > 0:
            assert self.rng is not None
            counts = counts + self.noise_ticks * self.rng.standard_normal(2)
        ticks = np.floor(counts).astype(np.int64)
        position = ticks * self.rad_per_tick
        velocity = np.zeros(2)
        if self._last is not None:
            t0, p0 = self._last
            if t < t0:
                raise ValueError(f"t must not go backwards: {t} < {t0}")
            if t > t0:
                velocity = (position - p0) / (t - t0)
        self._last = (t, position)
        return WheelReading(t, position, velocity, ticks)

    def sample(self, state: RoverState) -> WheelReading:
        """Reading of a rover state's wheel angles."""
        return self.measure(state.t, state.wheel_position)


# ------------------------------------------------------------------ wheel odometry
@dataclass(frozen=True)
class OdometryEstimate(PlanarOdometry):
    """Dead-reckoned odometry of the simulated wheels at time ``t`` (s); unobserved axes get a large variance."""

    t: float


class WheelOdometry:
    """Integrates wheel readings into a planar pose (exact arcs) with a propagated covariance.

    Each wheel's travelled distance has error variance ``wheel_error_per_m**2 * |distance|``
    (slip, uneven ground), so position uncertainty grows with distance driven; wheel
    speeds have std ``wheel_speed_sigma`` (m/s) for the twist covariance.
    """

    UNOBSERVED_VARIANCE = 1e6

    def __init__(
        self,
        geometry: RoverGeometry,
        *,
        wheel_error_per_m: float = 0.01,
        wheel_speed_sigma: float = 0.02,
        initial_pose: tuple[float, float, float] = (0.0, 0.0, 0.0),
    ) -> None:
        self.geometry = geometry
        self.wheel_radius = _pos("geometry.wheel_radius_m", geometry.wheel_radius_m)
        self.track = _pos("geometry.track_width_m", geometry.track_width_m)
        self.wheel_error_per_m = _nonneg("wheel_error_per_m", wheel_error_per_m)
        self.wheel_speed_sigma = _nonneg("wheel_speed_sigma", wheel_speed_sigma)
        if len(initial_pose) != 3 or not all(math.isfinite(float(a)) for a in initial_pose):
            raise ValueError(f"initial_pose must be a finite (x, y, yaw), got {initial_pose!r}")
        self.x, self.y, self.yaw = (float(a) for a in initial_pose)
        self.v = 0.0
        self.w = 0.0
        self.t: float | None = None
        self.cov = np.zeros((3, 3))  # x, y, yaw
        self._last_position: np.ndarray | None = None
        self.distance_m = 0.0

    def update(self, reading: WheelReading, t: float | None = None) -> OdometryEstimate:
        """Integrate one reading (stamped ``t`` if given, else ``reading.t``); the first only sets the reference."""
        pos = np.asarray(reading.position, dtype=np.float64).reshape(2)
        if self._last_position is not None:
            d_l, d_r = (pos - self._last_position) * self.wheel_radius
            ds = 0.5 * (d_l + d_r)
            dth = (d_r - d_l) / self.track
            th_m = self.yaw + 0.5 * dth
            c, s = math.cos(th_m), math.sin(th_m)
            # exact arc; chord length 2R sin(dth/2) = ds * sinc(dth/2)
            chord = ds * (math.sin(0.5 * dth) / (0.5 * dth) if abs(dth) > 1e-9 else 1.0)
            F = np.array([[1.0, 0.0, -chord * s], [0.0, 1.0, chord * c], [0.0, 0.0, 1.0]])
            k = ds / (2.0 * self.track)
            G = np.array(
                [
                    [0.5 * c + k * s, 0.5 * c - k * s],
                    [0.5 * s - k * c, 0.5 * s + k * c],
                    [-1.0 / self.track, 1.0 / self.track],
                ]
            )
            q = self.wheel_error_per_m**2 * np.array([abs(d_l), abs(d_r)])
            self.cov = F @ self.cov @ F.T + (G * q) @ G.T
            self.x += chord * c
            self.y += chord * s
            self.yaw = wrap_angle(self.yaw + dth)
            self.distance_m += abs(ds)
        self._last_position = pos
        self.t = float(reading.t if t is None else t)
        vel = np.asarray(reading.velocity, dtype=np.float64).reshape(2) * self.wheel_radius
        self.v = 0.5 * float(vel[0] + vel[1])
        self.w = float(vel[1] - vel[0]) / self.track
        return self.estimate()

    @property
    def pose_covariance(self) -> np.ndarray:
        """36-element row-major pose covariance of the current estimate."""
        return self.estimate().pose_covariance

    @property
    def twist_covariance(self) -> np.ndarray:
        """36-element row-major twist covariance of the current estimate."""
        return self.estimate().twist_covariance

    def quaternion_xyzw(self) -> np.ndarray:
        """Current planar heading as a quaternion (x, y, z, w)."""
        return np.array([0.0, 0.0, math.sin(0.5 * self.yaw), math.cos(0.5 * self.yaw)])

    def estimate(self) -> OdometryEstimate:
        """Current estimate with 36-element pose and twist covariances."""
        sv = self.wheel_speed_sigma**2
        pose, twist = planar_covariances(self.cov, 0.5 * sv, 2.0 * sv / self.track**2, self.UNOBSERVED_VARIANCE)
        return OdometryEstimate(x=self.x, y=self.y, yaw=self.yaw, v=self.v, w=self.w, pose_covariance=pose,
                                twist_covariance=twist, t=0.0 if self.t is None else self.t)
