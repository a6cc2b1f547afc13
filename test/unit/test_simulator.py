"""ForestSimulator core: event schedule, several rovers in one world, determinism."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from forest_perception.frames import CameraIntrinsics
from forest_perception.sim.simulator import ForestSimulator, RoverConfig, SimConfig
from forest_perception.sim.world import generate_world

WORLD = dict(seed=21, size_m=30.0)


def test_event_rates_follow_the_config_without_rendering():
    world = generate_world(**WORLD)
    cfg = SimConfig(camera_rate_hz=30.0, imu_rate_hz=200.0, gps_rate_hz=5.0, encoder_rate_hz=50.0)
    sim = ForestSimulator(world, cfg, [RoverConfig(name="a"), RoverConfig(name="b")], render=False)
    counts = Counter((e.kind, e.rover) for e in sim.run(4.0, render=False))
    for rover in (0, 1):
        assert counts[("imu", rover)] == 800
        assert abs(counts[("gps", rover)] - 20) <= 1
        assert abs(counts[("wheels", rover)] - 200) <= 1
        assert counts[("odom", rover)] == counts[("wheels", rover)]
        assert counts[("camera", rover)] == 0  # no renderer


def test_same_seed_same_trajectory_and_rovers_do_not_collide():
    world = generate_world(**WORLD)

    def drive():
        sim = ForestSimulator(world, SimConfig(seed=4), [RoverConfig(name="a"), RoverConfig(name="b")], render=False)
        sim.run(20.0, render=False)
        return [(r.state.x, r.state.y, r.state.yaw, r.rover.collisions) for r in sim.rovers]

    first, second = drive(), drive()
    assert first == second
    assert all(c == 0 for *_, c in first)
    assert math.hypot(first[0][0] - first[1][0], first[0][1] - first[1][1]) > 0.1


def test_rovers_see_each_other():
    world = generate_world(seed=21, size_m=30.0, tree_density_per_ha=0.0, bush_density_per_ha=0.0,
                           rock_density_per_ha=0.0, log_density_per_ha=0.0)
    cfg = SimConfig(camera=CameraIntrinsics(160, 120))
    rovers = [RoverConfig(name="a", start=(2.0, 0.0, 0.0)), RoverConfig(name="b", start=(0.0, 0.0, 0.0))]
    with ForestSimulator(world, cfg, rovers) as sim:
        frame = sim.render_camera(1)  # b looks along +x at a, 2 m ahead
        centre = frame.depth_true[50:70, 70:90]
        assert np.nanmin(centre) < 2.0


def test_cmd_vel_behaviour_follows_commands():
    world = generate_world(**WORLD)
    sim = ForestSimulator(world, SimConfig(), [RoverConfig(behaviour="cmd_vel", start=(0.0, 0.0, 0.0))],
                          render=False)
    for _ in range(40):  # 2 s at 0.3 m/s, commands refreshed at 20 Hz
        sim.set_cmd_vel(0, 0.3, 0.0)
        sim.run(0.05, render=False)
    state = sim.rovers[0].state
    assert 0.45 < state.x < 0.65 and abs(state.y) < 0.05
    sim.run(1.0, render=False)  # commands stop: the rover stops after the timeout
    assert abs(sim.rovers[0].state.v) < 1e-6


@pytest.mark.parametrize(
    ("rovers", "words"),
    [
        ([RoverConfig(name="a"), RoverConfig(name="a")], "unique"),
        ([RoverConfig(name="1rover")], "namespace"),
        ([RoverConfig(weather="hail")], "hail"),
        ([RoverConfig(behaviour="fly")], "behaviour"),
        ([RoverConfig(start=(500.0, 0.0, 0.0))], "outside"),
    ],
)
def test_bad_rover_configs_are_refused(rovers, words):
    with pytest.raises(ValueError, match=words):
        ForestSimulator(generate_world(**WORLD), SimConfig(), rovers, render=False)


@pytest.mark.parametrize(
    ("cfg", "words"),
    [
        (SimConfig(camera=CameraIntrinsics(0, 240)), "resolution"),
        (SimConfig(camera_rate_hz=0.0), "camera_rate_hz"),
        (SimConfig(gps_rate_hz=500.0), "gps_rate_hz"),
    ],
)
def test_bad_sim_configs_are_refused(cfg, words):
    with pytest.raises(ValueError, match=words):
        cfg.validate()


def _camera_events(render_workers: int, seconds: float = 1.0):
    world = generate_world(**WORLD)
    cfg = SimConfig(camera=CameraIntrinsics(96, 72), camera_rate_hz=10.0, render_workers=render_workers)
    with ForestSimulator(world, cfg, [RoverConfig(name="a", weather="sunny"), RoverConfig(name="b")]) as sim:
        events = sim.run(seconds)
        extra = sim.render_camera(1)
    return [e for e in events if e.kind == "camera"], extra


@pytest.mark.parametrize("workers", [1, 2])
def test_render_workers_deliver_frames_at_the_camera_rate_stamped_when_due(workers):
    import multiprocessing

    cams, _extra = _camera_events(workers)
    inline, _ = _camera_events(0)
    assert [(e.rover, e.stamp_ns) for e in cams] == [(e.rover, e.stamp_ns) for e in inline]
    for rover in (0, 1):
        stamps = [e.stamp_ns for e in cams if e.rover == rover]
        assert abs(len(stamps) - 10) <= 1 and stamps == sorted(stamps)
        assert all(abs((b - a) - 100_000_000) <= 5_000_000 for a, b in zip(stamps, stamps[1:]))
    assert all(e.data.rgb.shape == (72, 96, 3) and e.data.depth.shape == (72, 96) for e in cams)
    assert not multiprocessing.active_children()  # close() stopped the workers


def test_render_workers_are_deterministic_and_match_inline_rendering():
    first, extra1 = _camera_events(2, seconds=0.5)
    second, extra2 = _camera_events(2, seconds=0.5)
    inline, extra0 = _camera_events(0, seconds=0.5)
    for run, extra in ((second, extra2), (inline, extra0)):
        assert len(run) == len(first)
        for a, b in zip(first + [None], run + [None]):
            fa, fb = (a.data, b.data) if a is not None else (extra1, extra)
            assert np.array_equal(fa.rgb, fb.rgb)
            assert np.array_equal(fa.depth, fb.depth, equal_nan=True)
            assert np.array_equal(fa.depth_true, fb.depth_true, equal_nan=True)


def test_render_workers_events_come_later_in_order_and_close_stops_workers():
    import multiprocessing

    world = generate_world(**WORLD)
    cfg = SimConfig(camera=CameraIntrinsics(96, 72), camera_rate_hz=20.0, render_workers=1)
    sim = ForestSimulator(world, cfg, [RoverConfig(name="a")])
    assert len(multiprocessing.active_children()) == 1
    seen = []
    for _ in range(60):
        for e in sim.step():
            if e.kind == "camera":
                assert e.stamp_ns <= sim.now_ns
                seen.append(e.stamp_ns)
        assert sim._pool is not None and sim._pool.in_flight <= sim._pool.max_in_flight
    seen += [e.stamp_ns for e in sim.flush() if e.kind == "camera"]
    assert len(seen) == 7 and seen == sorted(seen)  # due at 5 ms, then every 50 ms up to 300 ms
    sim.close()
    sim.close()  # twice is fine
    assert not multiprocessing.active_children()


@pytest.mark.parametrize("workers", [-1, 17, 1.5, True])
def test_bad_render_workers_are_refused(workers):
    with pytest.raises(ValueError, match="render_workers"):
        SimConfig(render_workers=workers).validate()
