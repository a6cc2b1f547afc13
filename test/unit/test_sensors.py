"""Geodesy/rotation helpers and the IMU, GPS, encoder and wheel-odometry models."""

from __future__ import annotations

import math

import numpy as np
import pytest

from forest_perception import geo
from forest_perception.frames import RoverGeometry
from forest_perception.sim.rover import GRAVITY, DiffDriveRover
from forest_perception.sim.sensors import (
    COVARIANCE_TYPE_DIAGONAL_KNOWN,
    STATUS_FIX,
    STATUS_NO_FIX,
    EncoderModel,
    GpsModel,
    ImuModel,
    WheelOdometry,
    WheelReading,
)
from forest_perception.sim.terrain import Terrain

GEOM = RoverGeometry()
DATUM = (50.8690, -1.6040, 40.0)


# ------------------------------------------------------------------------ geo
def test_enu_geodetic_round_trip_and_datum():
    lat, lon, alt = geo.enu_to_geodetic(0.0, 0.0, 0.0, *DATUM)
    assert (lat, lon, alt) == pytest.approx(DATUM, abs=1e-9)
    for enu in [(1.0, 2.0, 3.0), (250.0, -120.0, 4.0), (-1500.0, 900.0, -30.0)]:
        back = geo.geodetic_to_enu(*geo.enu_to_geodetic(*enu, *DATUM), *DATUM)
        assert back == pytest.approx(enu, abs=1e-6)
    # 1 km north is ~1/111.2 degrees of latitude at 51 N (meridian radius ~6.38e6 m)
    lat_n, lon_n, _ = geo.enu_to_geodetic(0.0, 1000.0, 0.0, *DATUM)
    assert lat_n - DATUM[0] == pytest.approx(1000.0 / 111_250.0, rel=2e-3)
    assert lon_n == pytest.approx(DATUM[1], abs=1e-9)
    # east moves longitude by 1 / (111.3 km * cos(lat)) per km
    _, lon_e, _ = geo.enu_to_geodetic(1000.0, 0.0, 0.0, *DATUM)
    assert lon_e - DATUM[1] == pytest.approx(1000.0 / (111_320.0 * math.cos(math.radians(DATUM[0]))), rel=3e-3)


def test_geo_refuses_bad_datum():
    with pytest.raises(ValueError, match="datum_lat"):
        geo.enu_to_geodetic(0, 0, 0, 91.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="datum_lon"):
        geo.geodetic_to_enu(0, 0, 0, 0.0, float("nan"), 0.0)


def test_rotation_helpers_are_consistent():
    rng = np.random.default_rng(0)
    for _ in range(200):
        roll, yaw = rng.uniform(-math.pi, math.pi, 2)
        pitch = rng.uniform(-1.5, 1.5)
        R = geo.rotation_from_rpy(roll, pitch, yaw)
        assert np.allclose(R, geo.rot_z(yaw) @ geo.rot_y(pitch) @ geo.rot_x(roll))
        assert np.allclose(R @ R.T, np.eye(3)) and np.linalg.det(R) == pytest.approx(1.0)
        q = geo.quaternion_from_rpy(roll, pitch, yaw)
        assert np.linalg.norm(q) == pytest.approx(1.0)
        assert np.allclose(geo.rotation_from_quaternion(q), R)
        q2 = geo.quaternion_from_rotation(R)
        assert np.allclose(q2, q) or np.allclose(q2, -q)
        assert np.allclose(geo.rpy_from_rotation(R), (roll, pitch, yaw))
        assert np.allclose(geo.rpy_from_quaternion(q), (roll, pitch, yaw))
        assert geo.yaw_from_quaternion(q) == pytest.approx(yaw)
        rv = geo.rotation_log(R)
        assert np.allclose(geo.rotation_exp(rv), R, atol=1e-9)
        q3 = geo.quaternion_multiply(q, geo.quaternion_from_rpy(0.1, 0.0, 0.0))
        assert np.allclose(geo.rotation_from_quaternion(q3), R @ geo.rot_x(0.1))
    # tf's setRPY(0, 0, pi/2)
    assert np.allclose(geo.quaternion_from_rpy(0, 0, math.pi / 2), [0, 0, math.sqrt(0.5), math.sqrt(0.5)])
    # half turn: log still finds the axis
    assert np.allclose(np.abs(geo.rotation_log(geo.rot_y(math.pi))), [0, math.pi, 0])
    assert geo.wrap_angle(3 * math.pi / 2) == pytest.approx(-math.pi / 2)
    assert geo.wrap_angle(-math.pi) == pytest.approx(-math.pi)
    with pytest.raises(ValueError, match="q"):
        geo.rotation_from_quaternion(np.zeros(4))


# ------------------------------------------------------------------------ IMU
def test_imu_white_noise_matches_declared_covariance():
    imu = ImuModel(
        np.random.default_rng(1),
        gyro_bias_sigma=0.0,
        accel_bias_sigma=0.0,
        gyro_bias_random_walk=0.0,
        accel_bias_random_walk=0.0,
    )
    q = geo.quaternion_from_rpy(0.1, -0.05, 1.0)
    f = np.array([0.0, 0.0, GRAVITY])
    n = 5000
    samples = [imu.measure(k / imu.rate_hz, q, np.zeros(3), f) for k in range(n)]
    gyro = np.array([s.angular_velocity for s in samples])
    acc = np.array([s.linear_acceleration for s in samples])
    cov_g = samples[0].angular_velocity_covariance.reshape(3, 3)
    cov_a = samples[0].linear_acceleration_covariance.reshape(3, 3)
    # BMI088-class: 0.014 deg/s/sqrt(Hz), 175 ug/sqrt(Hz) at 100 Hz
    assert math.sqrt(cov_g[0, 0]) == pytest.approx(0.014 * math.pi / 180 * 10)
    assert math.sqrt(cov_a[0, 0]) == pytest.approx(175e-6 * 9.80665 * 10)
    assert np.allclose(np.cov(gyro.T), cov_g, rtol=0.1, atol=0.1 * cov_g[0, 0])
    assert np.allclose(np.cov(acc.T), cov_a, rtol=0.1, atol=0.1 * cov_a[0, 0])
    assert np.allclose(acc.mean(axis=0), f, atol=4 * math.sqrt(cov_a[0, 0] / n))
    # orientation noise about fixed axes matches its covariance
    q_inv = q * np.array([-1, -1, -1, 1])
    errs = np.array([2.0 * geo.quaternion_multiply(s.orientation_xyzw, q_inv)[:3] for s in samples])  # small angles
    cov_o = samples[0].orientation_covariance.reshape(3, 3)
    assert np.allclose(np.var(errs, axis=0), np.diag(cov_o), rtol=0.1)
    assert np.allclose(cov_o, np.diag(np.diag(cov_o)))


def test_imu_turn_on_bias_and_random_walk_ensemble():
    n = 2000
    first, later = [], []
    for seed in range(n):
        imu = ImuModel(np.random.default_rng(seed), orientation_sigma_rad=(0, 0, 0))
        first.append(imu.measure(0.0, np.array([0, 0, 0, 1.0]), np.zeros(3), np.zeros(3)).angular_velocity)
        later.append(imu.gyro_bias.copy())
        imu.measure(100.0, np.array([0, 0, 0, 1.0]), np.zeros(3), np.zeros(3))
        later[-1] = imu.gyro_bias - later[-1]
    declared = imu.covariances()[1].reshape(3, 3)[0, 0]  # white + turn-on bias
    assert np.var(np.array(first)) == pytest.approx(declared, rel=0.08)
    # the bias walks with variance rw^2 * t
    assert np.var(np.array(later)) == pytest.approx(imu.gyro_bias_random_walk**2 * 100.0, rel=0.08)


def test_imu_from_rover_state_and_no_orientation_flag():
    rover = DiffDriveRover(GEOM, Terrain(np.zeros((11, 11)), 1.0, -5, -5))
    imu = ImuModel(np.random.default_rng(0), provide_orientation=False)
    s = imu.sample(rover.state)
    assert s.orientation_covariance[0] == -1.0
    bias = imu.gyro_bias.copy()
    imu.sample(rover.state, dt=0.0)  # same stamp, explicit zero interval: the bias does not walk
    assert np.array_equal(imu.gyro_bias, bias)
    imu.sample(rover.state, dt=10.0)
    assert not np.array_equal(imu.gyro_bias, bias)
    assert s.linear_acceleration[2] == pytest.approx(GRAVITY, abs=0.2)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"gyro_noise_density": -1.0}, "gyro_noise_density"),
        ({"accel_noise_density": float("nan")}, "accel_noise_density"),
        ({"rate_hz": 0.0}, "rate_hz"),
        ({"accel_bias_random_walk": -1e-3}, "accel_bias_random_walk"),
        ({"orientation_sigma_rad": (0.1, -0.1, 0.1)}, "orientation_sigma_rad"),
    ],
)
def test_imu_refuses_bad_parameters(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ImuModel(np.random.default_rng(0), **kwargs)


# ------------------------------------------------------------------------ GPS
def test_gps_fix_round_trips_to_enu_plus_its_error():
    gps = GpsModel(*DATUM, np.random.default_rng(0))
    p = np.array([12.0, -7.0, 1.5])
    fix = gps.measure(0.0, p, canopy_cover=0.0)
    assert fix.status == STATUS_FIX and fix.covariance_type == COVARIANCE_TYPE_DIAGONAL_KNOWN
    back = geo.geodetic_to_enu(fix.latitude, fix.longitude, fix.altitude, *DATUM)
    assert back == pytest.approx(p + fix.error_enu, abs=1e-6)
    assert np.linalg.norm(fix.error_enu[:2]) < 10.0


def test_gps_sample_from_rover_state_with_antenna_offset():
    flat = Terrain(np.zeros((11, 11)), 1.0, -5, -5)
    rover = DiffDriveRover(GEOM, flat, start=(1.0, 2.0, math.pi / 2))
    gps = GpsModel(*DATUM, np.random.default_rng(0))
    fix = gps.sample(rover.state, canopy_cover=0.0, antenna_offset=GEOM.gps_offset_m)
    back = np.array(geo.geodetic_to_enu(fix.latitude, fix.longitude, fix.altitude, *DATUM)) - fix.error_enu
    # facing north, the antenna 0.10 m behind the axle is 0.10 m south of it
    expected = [1.0, 2.0 - 0.10, GEOM.wheel_radius_m + 0.25]
    assert back == pytest.approx(expected, abs=1e-6)


def test_gps_sigma_grows_under_canopy():
    gps = GpsModel(*DATUM, np.random.default_rng(0))
    open_sky, dense = gps.sigma_enu(0.0), gps.sigma_enu(0.95)
    assert 1.0 <= open_sky[0] <= 2.0
    assert dense[0] > 2.5 * open_sky[0] and dense[0] >= 4.0
    assert dense[2] > dense[0]  # vertical is worse than horizontal
    fix = gps.measure(0.0, np.zeros(3), 0.95)
    assert np.allclose(fix.covariance.reshape(3, 3), np.diag(dense**2))


@pytest.mark.parametrize("cover", [0.0, 0.8])
def test_gps_covariance_matches_sample_statistics(cover):
    # one-second spacing and a short correlation time make samples independent
    gps = GpsModel(*DATUM, np.random.default_rng(5), correlation_time_s=0.05, loss_rate_per_s=0.0)
    n = 2000
    fixes = [gps.measure(float(k), np.zeros(3), cover) for k in range(n)]
    lla = np.array([(f.latitude, f.longitude, f.altitude) for f in fixes])
    enu = np.stack(geo.geodetic_to_enu(lla[:, 0], lla[:, 1], lla[:, 2], *DATUM), axis=1)
    declared = fixes[0].covariance.reshape(3, 3)
    sample = np.cov(enu.T)
    assert np.allclose(np.diag(sample), np.diag(declared), rtol=0.1)
    corr = np.corrcoef(enu.T)
    assert np.all(np.abs(corr - np.eye(3)) < 0.08)  # diagonal: axes uncorrelated (3 sigma ~ 0.067)


def test_gps_error_is_slowly_correlated_by_default():
    gps = GpsModel(*DATUM, np.random.default_rng(2), loss_rate_per_s=0.0)
    err = np.array([gps.measure(0.2 * k, np.zeros(3), 0.0).error_enu[0] for k in range(1000)])
    # 80 % of the variance is a 60 s Gauss-Markov walk: successive fixes differ by much less
    # than the error itself, var(diff) = 2 sigma^2 (1 - 0.8 exp(-dt / tau))
    sigma = gps.sigma_open_m
    expected = math.sqrt(2 * sigma**2 * (1 - 0.8 * math.exp(-0.2 / 60.0)))
    assert np.std(np.diff(err)) == pytest.approx(expected, rel=0.08)
    assert expected < 0.7 * sigma


def test_gps_loses_fix_only_under_dense_canopy():
    gps = GpsModel(*DATUM, np.random.default_rng(3))
    dense = [gps.measure(1.0 * k, np.zeros(3), 0.95) for k in range(800)]
    lost = [f for f in dense if f.status == STATUS_NO_FIX]
    assert 0 < len(lost) < len(dense)
    assert all(math.isnan(f.latitude) and f.covariance_type == 0 for f in lost)
    open_gps = GpsModel(*DATUM, np.random.default_rng(3))
    assert all(open_gps.measure(1.0 * k, np.zeros(3), 0.3).status == STATUS_FIX for k in range(500))


@pytest.mark.parametrize(
    "args, kwargs, name",
    [
        ((91.0, 0.0, 0.0), {}, "datum_lat"),
        ((0.0, 200.0, 0.0), {}, "datum_lon"),
        ((0.0, 0.0, float("inf")), {}, "datum_alt"),
        (DATUM, {"sigma_open_m": -1.0}, "sigma_open_m"),
        (DATUM, {"sigma_canopy_m": 0.5}, "sigma_canopy_m"),
        (DATUM, {"correlated_fraction": 1.5}, "correlated_fraction"),
        (DATUM, {"correlation_time_s": 0.0}, "correlation_time_s"),
    ],
)
def test_gps_refuses_bad_parameters(args, kwargs, name):
    with pytest.raises(ValueError, match=name):
        GpsModel(*args, np.random.default_rng(0), **kwargs)


def test_gps_refuses_bad_canopy_cover():
    gps = GpsModel(*DATUM, np.random.default_rng(0))
    with pytest.raises(ValueError, match="canopy_cover"):
        gps.measure(0.0, np.zeros(3), 1.5)


# ------------------------------------------------------------------- encoders
def test_encoder_quantises_to_ticks_and_differentiates():
    enc = EncoderModel(ticks_per_rev=1000)
    r0 = enc.measure(0.0, np.array([1.0, -1.0]))
    res = 2 * math.pi / 1000
    assert r0.ticks.tolist() == [159, -160]
    assert np.all(np.abs(r0.position - np.array([1.0, -1.0])) < res)
    assert np.all(r0.position <= np.array([1.0, -1.0]))
    r1 = enc.measure(0.1, np.array([1.5, -0.5]))
    assert np.allclose(r1.velocity, 5.0, atol=res / 0.1)
    with pytest.raises(ValueError, match="ticks_per_rev"):
        EncoderModel(ticks_per_rev=0)
    with pytest.raises(ValueError, match="ticks_per_rev"):
        EncoderModel(ticks_per_rev=10.5)
    with pytest.raises(ValueError, match="noise_ticks"):
        EncoderModel(noise_ticks=-1.0, rng=np.random.default_rng(0))


# ------------------------------------------------------------------- odometry
def drive_square(slip_std: float, seed: int, side: float, dt: float, wheel_error_per_m: float = 0.01):
    """Drive a closed square with a feedback script; returns (rover state, odometry estimates)."""
    flat = Terrain(np.zeros((21, 21)), 1.0, -10, -10)
    rover = DiffDriveRover(GEOM, flat, start=(-1.0, -1.0, 0.0), slip_std=slip_std, rng=np.random.default_rng(seed))
    enc = EncoderModel(ticks_per_rev=4096)
    odo = WheelOdometry(GEOM, initial_pose=(-1.0, -1.0, 0.0), wheel_error_per_m=wheel_error_per_m)
    estimates = [odo.update(enc.sample(rover.state))]

    def tick(v, w):
        rover.command(v, w)
        rover.step(dt)
        estimates.append(odo.update(enc.sample(rover.state)))

    for leg in range(4):
        x0, y0 = rover.state.x, rover.state.y
        heading = geo.wrap_angle(leg * math.pi / 2)
        while (done := math.hypot(rover.state.x - x0, rover.state.y - y0)) < side:
            tick(min(0.5, max(0.05, side - done)), 2.0 * geo.wrap_angle(heading - rover.state.yaw))
        heading = geo.wrap_angle(heading + math.pi / 2)
        while abs(geo.wrap_angle(heading - rover.state.yaw)) > 2e-3 or abs(rover.state.w) > 1e-2:
            tick(0.0, max(-1.0, min(1.0, 3.0 * geo.wrap_angle(heading - rover.state.yaw))))
    return rover.state, estimates


def test_wheel_odometry_closes_a_square_without_slip():
    truth, est = drive_square(0.0, 0, side=2.0, dt=0.02)
    last = est[-1]
    assert math.hypot(truth.x + 1.0, truth.y + 1.0) < 0.05  # the script really closed the square
    # only encoder quantisation separates odometry from the truth
    assert math.hypot(last.x - truth.x, last.y - truth.y) < 0.005
    assert abs(geo.wrap_angle(last.yaw - truth.yaw)) < math.radians(0.2)
    # covariance: symmetric, positive semi-definite, growing with distance
    P = last.pose_covariance.reshape(6, 6)
    assert np.allclose(P, P.T) and np.all(np.linalg.eigvalsh(P) >= -1e-12)
    var_xy = [e.pose_covariance[0] + e.pose_covariance[7] for e in est]
    quarter = len(var_xy) // 4
    assert 0 == var_xy[0] < var_xy[quarter] < var_xy[2 * quarter] < var_xy[-1]
    var_yaw = [e.pose_covariance[35] for e in est]
    assert np.all(np.diff(var_yaw) >= 0)
    T = last.twist_covariance.reshape(6, 6)
    assert T[0, 0] > 0 and T[5, 5] > 0 and np.allclose(T, np.diag(np.diag(T)))


def test_wheel_odometry_covariance_covers_slip_error():
    within = 0
    for seed in range(5):
        truth, est = drive_square(0.03, seed, side=1.0, dt=0.04, wheel_error_per_m=0.015)
        last = est[-1]
        err = np.array([last.x - truth.x, last.y - truth.y])
        P = last.pose_covariance.reshape(6, 6)[:2, :2]
        within += float(err @ np.linalg.solve(P, err)) < 9.21  # 99 % of a 2-dof chi-square
        assert np.linalg.norm(err) > 1e-4  # slip does make odometry drift
    assert within == 5


def test_wheel_odometry_pure_rotation_and_validation():
    odo = WheelOdometry(GEOM)
    odo.update(WheelReading(0.0, np.zeros(2), np.zeros(2), np.zeros(2, dtype=int)))
    turn = math.pi / 2 * GEOM.track_width_m / 2 / GEOM.wheel_radius_m
    est = odo.update(WheelReading(1.0, np.array([-turn, turn]), np.array([-turn, turn]), np.zeros(2, dtype=int)))
    assert (est.x, est.y) == pytest.approx((0.0, 0.0), abs=1e-12)
    assert est.yaw == pytest.approx(math.pi / 2)
    assert est.v == pytest.approx(0.0) and est.w == pytest.approx(math.pi / 2)
    assert geo.yaw_from_quaternion(est.quaternion_xyzw()) == pytest.approx(math.pi / 2)
    assert np.array_equal(odo.quaternion_xyzw(), est.quaternion_xyzw())
    assert np.array_equal(odo.pose_covariance, est.pose_covariance) and odo.pose_covariance.shape == (36,)
    assert odo.update(WheelReading(1.5, np.array([-turn, turn]), np.zeros(2), np.zeros(2, dtype=int)), t=7.0).t == 7.0
    with pytest.raises(ValueError, match="wheel_error_per_m"):
        WheelOdometry(GEOM, wheel_error_per_m=-0.1)
    with pytest.raises(ValueError, match="wheel_radius_m"):
        WheelOdometry(RoverGeometry(wheel_radius_m=0.0))
