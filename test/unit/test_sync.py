"""forest_perception.sync: approximate-time matching, interpolation, frame assembly, odometry fusion, ENU."""

from __future__ import annotations

import math

import numpy as np
import pytest

from forest_perception.geo import quaternion_from_rpy, rotation_exp, rotation_from_quaternion, yaw_from_quaternion
from forest_perception.readings import GpsFix, ImuSample, WheelEncoders
from forest_perception.sync import (
    GPS_STALE,
    IMU_EXTRAPOLATED,
    NO_DEPTH,
    NO_GPS,
    NO_IMU,
    OUT_OF_ORDER,
    ApproximateTimeSynchronizer,
    EnuConverter,
    OdometryConfig,
    OdometryFusion,
    SensorSync,
    SyncConfig,
    TimeSeriesBuffer,
    extrapolate_wheels,
    interpolate_imu,
    interpolate_wheels,
    sample_at,
    slerp,
)

MS = 1_000_000
S = 1_000_000_000


def ns(seconds: float) -> int:
    return round(seconds * S)


# --------------------------------------------------------------------------- ApproximateTimeSynchronizer


def test_ats_matches_identical_stamps_once():
    ats = ApproximateTimeSynchronizer(["image", "depth", "info"], queue_size=5, slop_s=0.0)
    assert ats.add("image", 100, "img") == []
    assert ats.add("depth", 100, "dep") == []
    [matched] = ats.add("info", 100, "inf")
    assert {c: (s.stamp_ns, s.item) for c, s in matched.items()} == {
        "image": (100, "img"),
        "depth": (100, "dep"),
        "info": (100, "inf"),
    }
    assert all(ats.queued(c) == [] for c in ats.channels)
    assert ats.counts["image"].matched == 1


def test_ats_picks_the_closest_partner_first():
    ats = ApproximateTimeSynchronizer(["image", "depth"], queue_size=10, slop_s=0.010)
    ats.add("depth", 1000 * MS - 8 * MS, "far")
    ats.add("depth", 1000 * MS + 3 * MS, "near")
    [matched] = ats.add("image", 1000 * MS, "img")
    assert matched["depth"].item == "near"
    assert ats.queued("depth") == [992 * MS]  # the other one waits for its own image


def test_ats_slop_boundary_is_inclusive():
    ats = ApproximateTimeSynchronizer(["a", "b", "c"], queue_size=10, slop_s=0.010)
    ats.add("a", 0 + 100 * MS, 1)
    ats.add("b", 110 * MS, 2)
    assert len(ats.add("c", 105 * MS, 3)) == 1  # span 10 ms == slop
    ats.add("a", 200 * MS, 1)
    ats.add("b", 210 * MS + 1, 2)
    assert ats.add("c", 205 * MS, 3) == []  # span 10 ms + 1 ns
    # all within slop of c but not of each other: no set
    assert ats.queued("a") == [200 * MS] and ats.queued("b") == [210 * MS + 1]


def test_ats_queue_overflow_drops_oldest_and_reports_it():
    dropped = []
    ats = ApproximateTimeSynchronizer(
        ["image", "depth"], queue_size=2, slop_s=0.005, on_drop=lambda *args: dropped.append(args)
    )
    for i in range(4):
        ats.add("image", i * 100 * MS, f"img{i}")
    assert ats.queued("image") == [200 * MS, 300 * MS]
    assert [(c, s, item, why) for c, s, item, why in dropped] == [
        ("image", 0, "img0", "overflow"),
        ("image", 100 * MS, "img1", "overflow"),
    ]
    assert ats.counts["image"].dropped_overflow == 2
    # a message older than a full queue is itself the oldest: dropped at once, never matched
    ats.add("depth", 10, "dep0")
    ats.add("depth", 500 * MS, "dep5")
    assert ats.add("depth", 5, "old") == [] and ats.last_status == "overflow"
    assert ats.queued("depth") == [10, 500 * MS]
    assert ats.clear() == 4 and dropped[-1][3] == "cleared"


def test_ats_duplicates_replace_and_are_never_emitted_twice():
    ats = ApproximateTimeSynchronizer(["image", "depth"], queue_size=10, slop_s=0.005)
    ats.add("image", 100 * MS, "first")
    ats.add("image", 100 * MS, "second")
    assert ats.last_status == "duplicate" and ats.queued("image") == [100 * MS]
    [matched] = ats.add("depth", 101 * MS, "d")
    assert matched["image"].item == "second"
    # the same image again (a DDS re-send) and a depth that would match it: nothing comes out
    assert ats.add("image", 100 * MS, "again") == [] and ats.last_status == "duplicate"
    assert ats.add("depth", 100 * MS, "d2") == []
    assert ats.counts["image"].duplicates == 2 and ats.counts["image"].matched == 1


def _camera_streams(n, period_ms, jitter_ms, seed, drop_depth=()):
    """(image, depth, info) messages of frames 0..n-1 with jittered depth/info stamps; item = (channel, k)."""
    rng = np.random.default_rng(seed)
    messages = []
    for k in range(n):
        t = 1000 * MS + k * period_ms * MS
        messages.append(("image", t, ("image", k)))
        if k not in drop_depth:
            messages.append(("depth", t + int(rng.uniform(-jitter_ms, jitter_ms) * MS), ("depth", k)))
        messages.append(("info", t + int(rng.uniform(-jitter_ms, jitter_ms) * MS), ("info", k)))
    return messages


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ats_jittered_out_of_order_and_dropped_streams_pick_the_right_partners(seed):
    # 30 Hz frames, depth and info within +-4.9 ms of their image, slop 10 ms: every right set spans
    # less than slop; arrivals shuffled by up to 60 ms latency (two frame periods)
    drop = {3, 10, 11, 25}
    messages = _camera_streams(40, 33, 4.9, seed, drop_depth=drop)
    rng = np.random.default_rng(100 + seed)
    arrival = [m[1] + int(rng.uniform(0, 60) * MS) for m in messages]  # per-message latency: out of order
    order = np.argsort(arrival, kind="stable")
    ats = ApproximateTimeSynchronizer(["image", "depth", "info"], queue_size=10, slop_s=0.010)
    sets = []
    for i in order:
        sets.extend(ats.add(*messages[i]))
    matched_frames = []
    for s in sets:
        ks = {s[c].item[1] for c in ("image", "depth", "info")}
        assert len(ks) == 1, f"wrong partners: {s}"
        matched_frames.append(ks.pop())
    assert sorted(matched_frames) == [k for k in range(40) if k not in drop]
    assert len(set(matched_frames)) == len(matched_frames)


# --------------------------------------------------------------------------- buffers and interpolation


def test_time_series_buffer_orders_prunes_and_flags():
    buf = TimeSeriesBuffer(span_ns=1 * S)
    for t in (5, 1, 3, 2, 4):
        assert buf.insert(t * 100 * MS, t) == "new"
    assert buf.insert(300 * MS, 33) == "duplicate"
    assert [v for _, v in buf.between(0, 10 * S)] == [1, 2, 33, 4, 5]
    assert buf.bracket(250 * MS) == ((200 * MS, 2), (300 * MS, 33))
    assert buf.bracket(300 * MS) == ((300 * MS, 33), (300 * MS, 33))
    assert buf.bracket(50 * MS) == (None, (100 * MS, 1))
    assert buf.at_or_before(450 * MS) == (400 * MS, 4)
    buf.insert(1350 * MS, 13)  # span 1 s: 100..300 ms fall out
    assert buf.oldest_ns == 400 * MS and buf.newest_ns == 1350 * MS
    assert buf.insert(300 * MS, 3) == "late" and len(buf) == 3


def test_imu_interpolation_is_exact_on_linear_signals_and_slerps_orientation():
    def imu(t):
        return ImuSample(
            (0.1 + 0.2 * t, -0.3 * t, 0.5 + 0.01 * t),
            (1.0 * t, 2.0 - t, 9.81 + 0.1 * t),
            tuple(quaternion_from_rpy(0.0, 0.0, 0.4 * t)),
        )

    buf = TimeSeriesBuffer(span_ns=10 * S)
    rng = np.random.default_rng(0)
    stamps = np.sort(rng.uniform(0.0, 2.0, 50))
    for t in rng.permutation(stamps):  # out of order
        buf.insert(ns(t), imu(t))
    for t in rng.uniform(stamps[0], stamps[-1], 30):
        got = sample_at(buf, ns(t), max_gap_ns=1 * S, interpolate=interpolate_imu)
        assert got is not None and got.mode in ("interpolated", "exact")
        t_q = ns(t) / S
        want = imu(t_q)
        np.testing.assert_allclose(got.value.angular_velocity, want.angular_velocity, atol=1e-9)
        np.testing.assert_allclose(got.value.linear_acceleration, want.linear_acceleration, atol=1e-9)
        assert yaw_from_quaternion(np.array(got.value.orientation)) == pytest.approx(0.4 * t_q, abs=1e-9)


def test_slerp_is_the_geodesic_and_takes_the_short_way():
    axis = np.array([0.3, -0.5, 0.8]) / np.linalg.norm([0.3, -0.5, 0.8])
    q0 = quaternion_from_rpy(0.1, -0.2, 0.3)
    delta = rotation_exp(axis * 1.2)  # 1.2 rad about axis, applied after q0
    R0 = rotation_from_quaternion(q0)
    from forest_perception.geo import quaternion_from_rotation

    q1 = quaternion_from_rotation(delta @ R0)
    for f in (0.0, 0.25, 0.5, 0.9, 1.0):
        want = rotation_exp(axis * 1.2 * f) @ R0
        np.testing.assert_allclose(rotation_from_quaternion(slerp(q0, q1, f)), want, atol=1e-9)
        # -q1 is the same rotation: the result must not go the long way round
        np.testing.assert_allclose(rotation_from_quaternion(slerp(q0, -q1, f)), want, atol=1e-9)
    assert np.linalg.norm(slerp(q0, q0, 0.5)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="quaternion"):
        slerp([0, 0, 0, 0], q0, 0.5)


def test_wheel_interpolation_and_gaps():
    buf = TimeSeriesBuffer(span_ns=10 * S)
    for t in np.arange(0.0, 1.0, 0.02):
        buf.insert(ns(t), WheelEncoders(10.0 * t, -4.0 * t + 1.0, 10.0, -4.0))
    got = sample_at(buf, ns(0.333), ns(0.1), interpolate_wheels, extrapolate_wheels)
    assert got.mode == "interpolated" and got.gap_s <= 0.02
    assert got.value.left_position == pytest.approx(3.33) and got.value.right_position == pytest.approx(-0.332)
    assert got.value.left_velocity == pytest.approx(10.0)
    # beyond the newest sample: extrapolated with the velocities, until max_gap
    ahead = sample_at(buf, ns(1.03), ns(0.1), interpolate_wheels, extrapolate_wheels)
    assert ahead.mode == "extrapolated" and ahead.value.left_position == pytest.approx(10.3)
    assert sample_at(buf, ns(1.2), ns(0.1), interpolate_wheels, extrapolate_wheels) is None
    # a field missing in one sample is missing in the interpolation
    mixed = interpolate_wheels(WheelEncoders(0.0, 0.0, None, 1.0), WheelEncoders(1.0, 2.0, 3.0, 3.0), 0.5)
    assert mixed == WheelEncoders(0.5, 1.0, None, 2.0)


# --------------------------------------------------------------------------- SensorSync


def imu_at(t: float) -> ImuSample:
    return ImuSample((0.01, -0.02, 0.3 + 0.1 * t), (0.2 * t, 0.0, 9.81), tuple(quaternion_from_rpy(0, 0, 0.3 * t)))


def wheels_at(t: float) -> WheelEncoders:
    return WheelEncoders(5.0 * t, 6.0 * t, 5.0, 6.0)


GPS_ORIGIN = (50.869, -1.604, 40.0)


def gps_at(t: float) -> GpsFix:
    return GpsFix(GPS_ORIGIN[0] + 1e-6 * t, GPS_ORIGIN[1], GPS_ORIGIN[2], 0)


def rover_stream(
    duration=3.0,
    camera_hz=15.0,
    seed=0,
    drop_depth=(),
    jitter_ms=3.0,
    gps_until=None,
    imu=True,
    depth=True,
    start=1.0,
):
    """Messages (arrival_ns, kind, stamp_ns, value) of a rover, shuffled by per-message latency."""
    rng = np.random.default_rng(seed)
    msgs = []

    def emit(kind, t, value, latency_ms):
        stamp = ns(t)
        msgs.append((stamp + int(rng.uniform(*latency_ms) * MS), kind, stamp, value))

    n_frames = int(duration * camera_hz)
    for k in range(n_frames):
        t = start + k / camera_hz
        emit("image", t, ("image", k), (5, 40))
        if depth and k not in drop_depth:
            emit("depth", t + rng.uniform(-jitter_ms, jitter_ms) * 1e-3, ("depth", k), (5, 60))
        emit("camera_info", t + rng.uniform(-jitter_ms, jitter_ms) * 1e-3, ("info", k), (0, 30))
    if imu:
        for t in np.arange(start - 0.2, start + duration + 0.2, 1 / 200):
            emit("imu", t, imu_at(t), (0, 5))
    for t in np.arange(start - 0.2, start + duration + 0.2, 1 / 50):
        emit("joints", t, wheels_at(t), (0, 10))
    for t in np.arange(start - 0.2, start + duration + 0.2, 1 / 10):
        if gps_until is None or t < gps_until:
            emit("gps", t, gps_at(t), (0, 50))
    msgs.sort(key=lambda m: m[0])
    return msgs, n_frames


def feed(sync, messages):
    frames = []
    for _, kind, stamp, value in messages:
        frames.extend(sync.add(kind, stamp, value))
    return frames


def check_interpolation(frame):
    t = frame.stamp_ns / S
    want_imu, want_wheels = imu_at(t), wheels_at(t)
    np.testing.assert_allclose(frame.imu.angular_velocity, want_imu.angular_velocity, atol=1e-9)
    np.testing.assert_allclose(frame.imu.linear_acceleration, want_imu.linear_acceleration, atol=1e-9)
    assert yaw_from_quaternion(np.array(frame.imu.orientation)) == pytest.approx(0.3 * t, abs=1e-9)
    assert frame.wheels.left_position == pytest.approx(want_wheels.left_position, abs=1e-9)
    assert frame.wheels.right_position == pytest.approx(want_wheels.right_position, abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_sensor_sync_out_of_order_jittered_dropped_streams(seed):
    drop = {4, 17, 30}
    messages, n_frames = rover_stream(seed=seed, drop_depth=drop)
    sync = SensorSync(SyncConfig(slop_s=0.01))
    frames = feed(sync, messages) + sync.flush()
    # every image comes out once, in stamp order, with the image's stamp
    assert [f.image[1] for f in frames] == list(range(n_frames))
    assert [f.stamp_ns for f in frames] == sorted({f.stamp_ns for f in frames})
    for f in frames:
        k = f.image[1]
        assert f.camera_info == ("info", k)
        if k in drop:
            assert f.depth is None and NO_DEPTH in f.flags
        else:
            assert f.depth == ("depth", k) and NO_DEPTH not in f.flags
            assert abs(f.depth_stamp_ns - f.stamp_ns) <= 10 * MS
        assert OUT_OF_ORDER not in f.flags and IMU_EXTRAPOLATED not in f.flags
        check_interpolation(f)
        assert f.gps_fresh and 0.0 <= f.gps.age_s <= 0.1 + 1e-9 and f.gps.fix.status == 0
    stats = sync.stats
    assert stats["image"].used == n_frames and stats["depth"].used == n_frames - len(drop)
    assert stats["depth"].missing_in_frames == len(drop)
    assert stats["imu"].used == n_frames and stats["joints"].used == n_frames
    assert sync.frames_incomplete == len(drop) and sync.clock_resets == 0
    assert stats["imu"].rate_hz == pytest.approx(200.0, rel=0.02)
    assert sync.missing_streams() == []


def test_frame_waits_for_imu_and_wheels_after_its_stamp():
    sync = SensorSync(SyncConfig(use_depth=False))
    for t in np.arange(0.9, 1.0, 0.005):
        sync.add_imu(ns(t), imu_at(t))
    for t in np.arange(0.9, 1.0, 0.02):
        sync.add_joints(ns(t), wheels_at(t))
    assert sync.add_image(ns(1.0), "img") == [] and sync.add_camera_info(ns(1.0), "info") == []
    assert sync.pending == 1
    assert sync.add_imu(ns(1.003), imu_at(1.003)) == []  # the wheels have nothing at/after 1.0 s yet
    [frame] = sync.add_joints(ns(1.0), wheels_at(1.0))
    assert frame.stamp_ns == ns(1.0) and frame.flags == frozenset({NO_GPS})
    check_interpolation(frame)


def test_a_stalled_sensor_is_waited_for_until_it_is_missing():
    sync = SensorSync(SyncConfig(use_depth=False, max_wait_s=0.2, max_gap_s=0.05, missing_after_s=0.4))
    imu_stamps = np.arange(0.5, 1.0, 0.005)
    for t in imu_stamps:
        sync.add_imu(ns(t), imu_at(t))
        sync.add_joints(ns(t), wheels_at(t))
    sync.add_image(ns(1.02), "img")
    sync.add_camera_info(ns(1.02), "info")
    # the IMU stops at 0.995 s; the wheels go on: the IMU might only be late, until it is missing
    out = []
    for t in np.arange(1.0, 1.6, 0.005):
        out += sync.add_joints(ns(t), wheels_at(t))
        if out:
            break
    [frame] = out
    assert ns(t) - ns(imu_stamps[-1]) == pytest.approx(ns(0.4), abs=ns(0.006))
    assert "imu" in sync.missing_streams()
    assert IMU_EXTRAPOLATED in frame.flags  # newest IMU 25 ms before: held, within max_gap
    assert frame.imu == imu_at(imu_stamps[-1])


def test_a_lagging_sensor_holds_frames_back_instead_of_losing_its_data():
    # the IMU reaches the synchroniser 0.6 s after the camera and the wheels (a busy subscriber drains
    # the 200 Hz queue late): more than max_wait_s, but it keeps delivering, so frames wait for it
    sync = SensorSync(SyncConfig(use_depth=False, max_wait_s=0.2))
    arrivals = []
    for t in np.arange(0.0, 3.0, 0.005):
        arrivals.append((t + 0.6, "imu", ns(t), imu_at(t)))
    for t in np.arange(0.0, 3.0, 0.02):
        arrivals.append((t, "joints", ns(t), wheels_at(t)))
    for k, t in enumerate(np.arange(1.1, 2.5, 1 / 15)):
        arrivals.append((t, "image", ns(t), ("image", k)))
        arrivals.append((t, "camera_info", ns(t), ("info", k)))
    arrivals.sort(key=lambda m: m[0])
    frames, waited, lags = [], [], []
    for _, kind, stamp, value in arrivals:
        out = sync.add(kind, stamp, value)
        frames += out
        waited += [(sync.watermark_ns - f.stamp_ns) / S for f in out]
        lags.append(sync.summary()["streams"]["imu"]["lag_s"])
    frames += sync.flush()
    assert len(frames) == len(np.arange(1.1, 2.5, 1 / 15))
    for f in frames:
        assert not f.flags & {IMU_EXTRAPOLATED, NO_IMU}
        check_interpolation(f)
    assert min(waited) > 0.5 and np.nanmax(lags) == pytest.approx(0.6, abs=0.01)
    assert sync.missing_streams() == ["gps"]


def test_advance_releases_frames_on_a_quiet_wire():
    sync = SensorSync(SyncConfig(use_depth=False, max_wait_s=0.2, max_gap_s=0.05))
    for t in np.arange(0.5, 1.0, 0.005):
        sync.add_imu(ns(t), imu_at(t))
        sync.add_joints(ns(t), wheels_at(t))
    sync.add_image(ns(1.5), "quiet")
    assert sync.add_camera_info(ns(1.5), "info") == []
    assert sync.advance(ns(1.6)) == []
    [frame] = sync.advance(ns(4.0))  # a long pause
    assert frame.image == "quiet" and NO_IMU in frame.flags and frame.wheels is None
    # the stream resumes where it stopped (a paused simulation): frames wait for their IMU again
    sync.add_image(ns(1.6), "resumed")
    assert sync.add_camera_info(ns(1.6), "info") == []
    for ms in range(1500, 1600, 5):
        t = ms / 1000
        assert sync.add_joints(ns(t), wheels_at(t)) + sync.add_imu(ns(t), imu_at(t)) == []
    [frame] = sync.add_joints(ns(1.6), wheels_at(1.6)) + sync.add_imu(ns(1.6), imu_at(1.6))
    assert frame.image == "resumed" and not frame.flags & {NO_IMU, IMU_EXTRAPOLATED}


def test_gps_is_the_latest_fix_before_the_stamp_and_goes_stale():
    messages, n_frames = rover_stream(duration=4.0, gps_until=1.95, seed=3)
    sync = SensorSync(SyncConfig(gps_tolerance_s=0.5))
    frames = feed(sync, messages) + sync.flush()
    assert len(frames) == n_frames
    fixes = sorted(m[2] for m in messages if m[1] == "gps")
    for f in frames:
        assert f.gps is not None and f.gps.stamp_ns <= f.stamp_ns
        assert f.gps.stamp_ns == max(s for s in fixes if s <= f.stamp_ns)  # the latest at or before
        assert f.gps.age_s == pytest.approx((f.stamp_ns - f.gps.stamp_ns) / S)
        if f.stamp_ns < fixes[-1]:
            assert f.gps.age_s < 0.1 + 1e-9 and not f.gps.stale
        else:
            assert f.gps.stamp_ns == fixes[-1]
            assert f.gps.stale == (f.gps.age_s > 0.5)
            assert (GPS_STALE in f.flags) == f.gps.stale
    stale = sum(f.gps.stale for f in frames)
    assert stale > 10 and sync.stats["gps"].stale == stale
    assert "gps" in sync.missing_streams()  # silent for more than missing_after_s at the end


def test_no_fix_messages_are_not_used():
    sync = SensorSync(SyncConfig(use_depth=False))
    sync.add_gps(ns(0.5), GpsFix(50.0, -1.0, 10.0, 0), covariance=np.eye(3).ravel() * 4.0)
    sync.add_gps(ns(0.9), GpsFix(float("nan"), float("nan"), float("nan"), -1))
    sync.add_image(ns(1.0), "img")
    [frame] = sync.add_camera_info(ns(1.0), "info") + sync.flush()
    assert frame.gps.fix.latitude == 50.0 and frame.gps.age_s == pytest.approx(0.5)
    assert frame.gps.covariance == tuple(np.eye(3).ravel() * 4.0)
    assert sync.stats["gps"].no_fix == 1


def test_missing_depth_stream_keeps_frames_flowing_and_shows_in_stats():
    messages, n_frames = rover_stream(duration=3.0, depth=False, seed=4)
    sync = SensorSync(SyncConfig(missing_after_s=0.5, max_wait_s=0.3))
    frames, waited = [], {}
    for _, kind, stamp, value in messages:
        for f in sync.add(kind, stamp, value):
            frames.append(f)
            waited[f.image[1]] = (sync.watermark_ns - f.stamp_ns) / S  # sensor time it waited
    # all but the last few frames (still waiting for IMU/wheels at the end) came out without a flush
    assert len(frames) >= n_frames - 3
    assert all(NO_DEPTH in f.flags and f.depth is None and f.camera_info is not None for f in frames)
    assert [f.image[1] for f in frames] == list(range(len(frames)))
    assert "depth" in sync.missing_streams()
    assert sync.stats["depth"].missing_in_frames == len(frames) and sync.frames_incomplete == len(frames)
    # during the start-up grace images wait max_wait_s for the depth that might come; after it, only
    # for the IMU and wheels (a few ms)
    assert waited[0] > 0.3
    assert max(waited[k] for k in range(n_frames // 2, len(frames))) < 0.05
    check_interpolation(frames[n_frames // 2])


def test_missing_imu_keeps_frames_flowing():
    messages, n_frames = rover_stream(duration=2.0, imu=False, seed=5)
    sync = SensorSync()
    frames = feed(sync, messages) + sync.flush()
    assert len(frames) == n_frames
    assert all(NO_IMU in f.flags and f.imu is None for f in frames)
    assert all(f.wheels is not None for f in frames)
    assert "imu" in sync.missing_streams() and sync.stats["imu"].missing_in_frames == n_frames


def test_use_depth_false_ignores_depth():
    messages, n_frames = rover_stream(duration=1.0, seed=6)
    sync = SensorSync(SyncConfig(use_depth=False))
    frames = feed(sync, messages) + sync.flush()
    assert len(frames) == n_frames and all(f.depth is None and NO_DEPTH not in f.flags for f in frames)
    assert sync.stats["depth"].ignored == n_frames and "depth" not in sync.missing_streams()


def test_release_partial_off_is_message_filters_behaviour():
    messages, n_frames = rover_stream(duration=2.0, drop_depth={5, 6}, seed=7)
    sync = SensorSync(SyncConfig(release_partial=False))
    frames = feed(sync, messages) + sync.flush()
    assert sorted(f.image[1] for f in frames) == [k for k in range(n_frames) if k not in (5, 6)]
    assert sync.stats["image"].dropped == 2  # never matched: dropped at the end


def test_duplicated_messages_make_one_frame():
    messages, n_frames = rover_stream(duration=1.0, seed=8)
    doubled = []
    for m in messages:
        doubled.append(m)
        if m[1] in ("image", "depth", "imu"):
            doubled.append(m)
    sync = SensorSync()
    frames = feed(sync, doubled)
    # and the same image re-sent long after its frame went out
    late = [m for m in messages if m[1] == "image"][3]
    frames += sync.add("image", late[2], late[3]) + sync.flush()
    assert [f.image[1] for f in frames] == list(range(n_frames))
    assert sync.stats["image"].duplicates == n_frames + 1 and sync.stats["imu"].duplicates > 0


def test_clock_jump_backwards_flushes_clears_and_reports():
    sync = SensorSync(SyncConfig(use_depth=False, clock_jump_s=1.0))
    first, n_first = rover_stream(duration=3.0, depth=False, start=10.0, seed=9)
    frames = feed(sync, first)
    # one more frame after the last IMU sample: it waits for the IMU
    frames += sync.add_image(ns(13.3), ("image", n_first)) + sync.add_camera_info(ns(13.3), ("info", n_first))
    n_first += 1
    pending_before = sync.pending
    assert pending_before == 1
    # the simulation restarts at 0.5 s; its IMU reads something else
    restart = []
    for t in np.arange(0.5, 1.5, 0.005):
        restart.append(("imu", ns(t), ImuSample((0.0, 0.0, -1.0), (0.0, 0.0, 9.81))))
    for t in np.arange(0.5, 1.5, 0.02):
        restart.append(("joints", ns(t), WheelEncoders(-t, -t, -1.0, -1.0)))
    for k, t in enumerate(np.arange(0.6, 1.2, 1 / 15)):
        restart.append(("image", ns(t), ("new", k)))
        restart.append(("camera_info", ns(t), ("new info", k)))
    restart.sort(key=lambda m: m[1])
    out = sync.add(*restart[0])
    # what was waiting before the jump comes out then (good data is kept), with old stamps
    assert len(out) == pending_before and all(f.image[0] == "image" for f in out)
    assert sync.clock_resets == 1
    [event] = sync.pop_events()
    assert event.kind == "clock_reset" and "imu" in event.message and "went back" in event.message
    # a message from before the jump that straggles in is dropped as late
    assert sync.add("camera_info", ns(12.9), ("straggler", 0)) == []
    assert sync.stats["camera_info"].late == 1
    for m in restart[1:]:
        out += sync.add(*m)
    out += sync.flush()
    new = [f for f in out if f.image[0] == "new"]
    assert len(new) == len(np.arange(0.6, 1.2, 1 / 15))
    for f in new:
        # only samples after the reset: nothing from the old timeline leaks in
        assert f.imu.angular_velocity[2] == -1.0 and f.wheels.left_velocity == -1.0
        assert OUT_OF_ORDER not in f.flags and f.gps is None
    assert sync.clock_resets == 1 and sync.pop_events() == []
    assert len(frames) + len(out) == n_first + len(new)


def test_bad_input_is_refused_with_a_clear_error_and_counted():
    sync = SensorSync()
    with pytest.raises(ValueError, match="angular_velocity"):
        sync.add_imu(ns(1.0), ImuSample((float("nan"), 0.0, 0.0), (0.0, 0.0, 9.81)))
    with pytest.raises(ValueError, match="wheel positions"):
        sync.add_joints(ns(1.0), WheelEncoders(None, 1.0))
    with pytest.raises(ValueError, match="unknown sensor kind 'lidar'"):
        sync.add("lidar", ns(1.0), object())
    with pytest.raises(ValueError, match="non-negative"):
        sync.add_image(-5, "img")
    with pytest.raises(ValueError, match="integer nanoseconds"):
        sync.add_image(1.5, "img")
    with pytest.raises(ValueError, match="covariance"):
        sync.add_gps(ns(1.0), GpsFix(50.0, 1.0), covariance=[1.0, 2.0])
    assert sync.stats["imu"].invalid == 1 and sync.stats["joints"].invalid == 1
    assert sync.stats["image"].invalid == 2 and sync.stats["gps"].invalid == 1
    with pytest.raises(ValueError, match="buffer_s"):
        SyncConfig(buffer_s=0.2, max_wait_s=0.3).validate()
    with pytest.raises(ValueError, match="queue_size"):
        SyncConfig(queue_size=0).validate()


def test_reconfigure_keeps_stats_and_applies_new_settings():
    sync = SensorSync()
    messages, n_frames = rover_stream(duration=1.0, seed=10)
    frames = feed(sync, messages)
    frames += sync.reconfigure(SyncConfig(use_depth=False))
    assert len(frames) == n_frames and sync.stats["image"].used == n_frames
    assert sync.config.camera_channels == ("image", "camera_info")


# --------------------------------------------------------------------------- odometry


def drive(fusion, v, w, seconds, *, wheel_hz=50.0, imu_hz=200.0, t0=0.0, gyro_bias=0.0, wheel_turn_gain=1.0,
          wrap=False, r=0.06, b=0.30):
    """Feed a constant (v, w) drive; return the states. ``wheel_turn_gain`` scales the turn the wheels see."""
    states = []
    w_wheels = w * wheel_turn_gain
    vl, vr = (v - 0.5 * b * w_wheels) / r, (v + 0.5 * b * w_wheels) / r
    imu_stamps = list(np.arange(t0, t0 + seconds + 0.01, 1 / imu_hz))
    for t in np.arange(t0, t0 + seconds + 1e-9, 1 / wheel_hz):
        while imu_stamps and imu_stamps[0] <= t + 0.003:  # the IMU runs a little ahead, as on the wire
            fusion.add_imu(ns(imu_stamps.pop(0)), w + gyro_bias)
        left, right = vl * (t - t0), vr * (t - t0)
        if wrap:
            left, right = math.remainder(left, 2 * math.pi), math.remainder(right, 2 * math.pi)
        state = fusion.add_wheels(ns(t), left, right, vl, vr)
        if state is not None:
            states.append(state)
    return states


def test_odometry_straight_line_and_growing_covariance():
    fusion = OdometryFusion()
    states = drive(fusion, 0.8, 0.0, 5.0)
    end = states[-1]
    assert end.x == pytest.approx(4.0, abs=1e-6) and abs(end.y) < 1e-9 and abs(end.yaw) < 1e-9
    assert end.v == pytest.approx(0.8) and end.w == pytest.approx(0.0, abs=1e-12)
    assert end.distance_m == pytest.approx(4.0) and end.imu_used
    var_x = [s.pose_covariance[0] for s in states]
    var_y = [s.pose_covariance[7] for s in states]
    assert all(b >= a for a, b in zip(var_x, var_x[1:])) and var_x[-1] > var_x[1] > 0
    assert all(b >= a for a, b in zip(var_y, var_y[1:])) and var_y[-1] > 0
    # 1 cm per sqrt(m) of wheel error: std of x after 4 m is 0.01 * sqrt(4) / sqrt(2)
    assert math.sqrt(var_x[-1]) == pytest.approx(0.01 * math.sqrt(4.0) / math.sqrt(2.0), rel=0.05)
    assert end.pose_covariance[14] == OdometryFusion.UNOBSERVED_VARIANCE
    cov = end.pose_covariance.reshape(6, 6)
    np.testing.assert_allclose(cov, cov.T)


def test_odometry_circle_matches_the_analytic_arc():
    fusion = OdometryFusion()
    v, w = 0.5, 0.4
    states = drive(fusion, v, w, 2 * math.pi / w + 0.02)  # one full turn
    radius = v / w
    for s in [*states[::25], states[-1]]:
        t = s.stamp_ns / S
        assert s.x == pytest.approx(radius * math.sin(w * t), abs=1e-4)
        assert s.y == pytest.approx(radius * (1 - math.cos(w * t)), abs=1e-4)
        assert math.cos(s.yaw - w * t) == pytest.approx(1.0, abs=1e-8)
    end = states[-1]
    assert math.hypot(end.x, end.y) < 0.5 * 0.02 + 1e-4  # back at the start, up to the last 20 ms
    assert end.pose_covariance[35] > states[len(states) // 2].pose_covariance[35] > 0


def test_gyro_corrects_wheel_slip_in_turns():
    # the wheels over-report turning by 30 % (skid steer); the gyro is right
    fused = drive(OdometryFusion(), 0.3, 0.5, 3.0, wheel_turn_gain=1.3)[-1]
    wheels_only = drive(OdometryFusion(OdometryConfig(use_imu=False)), 0.3, 0.5, 3.0, wheel_turn_gain=1.3)[-1]
    assert fused.yaw == pytest.approx(1.5, abs=0.01)
    assert wheels_only.yaw == pytest.approx(1.95, abs=0.01)
    assert not wheels_only.imu_used and fused.imu_used
    # fusing makes the heading more certain than wheels alone
    assert fused.pose_covariance[35] < wheels_only.pose_covariance[35]


def test_parked_rover_does_not_spin_on_gyro_bias_and_learns_it():
    fusion = OdometryFusion()
    drive(fusion, 0.0, 0.0, 20.0, gyro_bias=0.01)
    assert abs(fusion.yaw) < 1e-6  # the gyro alone would have turned 0.2 rad
    assert fusion.gyro_bias == pytest.approx(0.01, rel=0.05)
    # then driving straight with the bias in the gyro: the learnt bias keeps the heading
    end = drive(fusion, 0.5, 0.0, 5.0, t0=20.02, gyro_bias=0.01)[-1]
    assert abs(end.yaw) < 0.005


def test_wheel_wraps_are_unwrapped_and_encoder_resets_skipped():
    plain = drive(OdometryFusion(), 1.0, 0.3, 4.0)[-1]
    wrapped_fusion = OdometryFusion()
    wrapped = drive(wrapped_fusion, 1.0, 0.3, 4.0, wrap=True)[-1]
    assert wrapped_fusion.counts["wraps"] > 0
    assert (wrapped.x, wrapped.y, wrapped.yaw) == pytest.approx((plain.x, plain.y, plain.yaw), abs=1e-6)
    fusion = OdometryFusion()
    fusion.add_wheels(0, 0.0, 0.0)
    fusion.add_wheels(ns(0.02), 0.2, 0.2)
    before = fusion.state()
    after = fusion.add_wheels(ns(0.04), 5000.0, 0.4)  # encoder reset on the left
    assert fusion.counts["jumps"] == 1 and (after.x, after.y) == (before.x, before.y)
    moved = fusion.add_wheels(ns(0.06), 5000.2, 0.6)  # counting goes on from the new reference
    assert moved.x == pytest.approx(before.x + 0.2 * 0.06)
    assert fusion.add_wheels(ns(0.05), 1.0, 1.0) is None and fusion.counts["out_of_order"] == 1


def test_odometry_without_imu_coverage_falls_back_to_wheels():
    fusion = OdometryFusion()
    for t in np.arange(0.0, 1.0, 0.02):
        fusion.add_wheels(ns(t), 3.0 * t, 3.0 * t)
    assert fusion.counts["imu_gaps"] > 0 and fusion.counts["imu_fused"] == 0
    assert fusion.x == pytest.approx(0.98 * 3.0 * 0.06)
    with pytest.raises(ValueError, match="wheel positions"):
        fusion.add_wheels(ns(2.0), float("nan"), 0.0)
    with pytest.raises(ValueError, match="track_width_m"):
        OdometryConfig(track_width_m=0.0).validate()


# --------------------------------------------------------------------------- ENU


def test_enu_round_trip_and_first_fix_origin():
    from forest_perception.geo import enu_to_geodetic

    enu = EnuConverter()
    first = enu.convert(GpsFix(*GPS_ORIGIN, 0), covariance=np.diag([2.0, 3.0, 9.0]))
    assert (first.east, first.north, first.up) == pytest.approx((0.0, 0.0, 0.0), abs=1e-9)
    np.testing.assert_allclose(first.covariance, np.diag([2.0, 3.0, 9.0]))
    for e, n, u in ((10.0, 0.0, 0.0), (-35.5, 120.25, 3.0), (250.0, -400.0, -12.0)):
        lat, lon, alt = enu_to_geodetic(e, n, u, *GPS_ORIGIN)
        got = enu.convert(GpsFix(lat, lon, alt, 0))
        assert (got.east, got.north, got.up) == pytest.approx((e, n, u), abs=1e-6)
        assert enu.to_geodetic(got.east, got.north, got.up) == pytest.approx((lat, lon, alt), abs=1e-9)
        assert got.covariance[0, 0] == EnuConverter.UNOBSERVED_VARIANCE  # no covariance given


def test_enu_configured_origin_missing_altitude_and_bad_fixes():
    enu = EnuConverter(origin=GPS_ORIGIN)
    north = enu.convert(GpsFix(GPS_ORIGIN[0] + 0.001, GPS_ORIGIN[1], None, 0), covariance=np.eye(3))
    assert north.north == pytest.approx(111.2, abs=0.5) and abs(north.east) < 1e-6
    assert north.covariance[2, 2] == EnuConverter.UNOBSERVED_VARIANCE and north.covariance[0, 0] == 1.0
    with pytest.raises(ValueError, match="no fix"):
        enu.convert(GpsFix(float("nan"), float("nan"), None, -1))
    with pytest.raises(ValueError, match="gps lat"):
        enu.convert(GpsFix(123.0, 0.0, 0.0, 0))
    with pytest.raises(ValueError, match="origin lat"):
        EnuConverter(origin=(95.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="no origin"):
        EnuConverter().to_geodetic(1.0, 2.0, 3.0)


# --------------------------------------------------------------------------- message conversions


def test_message_conversions_work_on_ros_and_duck_typed_messages():
    from types import SimpleNamespace

    from sensor_msgs.msg import NavSatFix

    from forest_perception import msgs
    from forest_perception.sync import gps_from_navsat, imu_sample_from_msg, stamp_ns, wheels_from_joint_state

    stamp = msgs.time_from_ns(12 * S + 345)
    imu = msgs.imu_msg(stamp, "imu_link", np.array([0, 0, 0.6, 0.8]), np.array([0.1, 0.2, 0.3]),
                       np.array([0.0, 0.0, 9.81]), np.eye(3), np.eye(3), np.eye(3))
    assert stamp_ns(imu) == 12 * S + 345
    sample = imu_sample_from_msg(imu)
    assert sample.angular_velocity == (0.1, 0.2, 0.3) and sample.orientation == (0.0, 0.0, 0.6, 0.8)
    imu.orientation_covariance[0] = -1.0  # REP 145: no orientation
    assert imu_sample_from_msg(imu).orientation is None
    imu.linear_acceleration.y = float("inf")
    with pytest.raises(ValueError, match="linear_acceleration"):
        imu_sample_from_msg(imu)

    joints = msgs.joint_state_msg(stamp, ("caster", "right_wheel_joint", "left_wheel_joint"),
                                  np.array([9.0, 2.0, 1.0]), np.array([0.0, 20.0, 10.0]))
    wheels = wheels_from_joint_state(joints, "left_wheel_joint", "right_wheel_joint")
    assert wheels == WheelEncoders(1.0, 2.0, 10.0, 20.0)
    joints.velocity = []
    assert wheels_from_joint_state(joints, "left_wheel_joint", "right_wheel_joint").left_velocity is None
    with pytest.raises(ValueError, match=r"no wheel joint\(s\) \['left'\]"):
        wheels_from_joint_state(joints, "left", "right_wheel_joint")

    fix = msgs.navsat_msg(stamp, "gps_link", 50.0, -1.0, float("nan"), 0, np.eye(3).ravel(),
                          NavSatFix.COVARIANCE_TYPE_DIAGONAL_KNOWN)
    got, cov = gps_from_navsat(fix)
    assert got == GpsFix(50.0, -1.0, None, 0) and cov.tolist() == np.eye(3).ravel().tolist()
    no_fix = msgs.navsat_msg(stamp, "gps_link", float("nan"), float("nan"), float("nan"), -1, np.zeros(9), 0)
    got, cov = gps_from_navsat(no_fix)
    assert got.status == -1 and cov is None  # a no-fix message is not malformed: the core counts it
    fix.latitude = float("nan")
    with pytest.raises(ValueError, match="non-finite position"):
        gps_from_navsat(fix)

    # what the rosbags library deserialises: same field names, numpy arrays for sequences
    bag_joints = SimpleNamespace(
        header=SimpleNamespace(stamp=SimpleNamespace(sec=3, nanosec=5)),
        name=["left_wheel_joint", "right_wheel_joint"],
        position=np.array([0.5, 0.25]),
        velocity=np.array([1.0, 2.0]),
        effort=np.array([]),
    )
    assert stamp_ns(bag_joints) == 3 * S + 5
    assert wheels_from_joint_state(bag_joints, "left_wheel_joint", "right_wheel_joint") == WheelEncoders(
        0.5, 0.25, 1.0, 2.0
    )
    bag_joints.header.stamp.sec = -1
    with pytest.raises(ValueError, match="non-negative"):
        stamp_ns(bag_joints)
