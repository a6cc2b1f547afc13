"""ForestSimulator core: event schedule, several rovers in one world, determinism."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from forest_perception.sim.robot import CameraIntrinsics
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
