"""Exploration behaviour (collision-free coverage of a generated forest) and cmd_vel holding."""

from __future__ import annotations

import math

import numpy as np
import pytest

from forest_perception.frames import RoverGeometry
from forest_perception.sim.explore import CmdVelController, ExplorationController, range_fan
from forest_perception.sim.rover import DiffDriveRover, RoverState
from forest_perception.sim.terrain import Terrain
from forest_perception.sim.world import generate_world

GEOM = RoverGeometry()


def explore(world_seed: int, rng_seed: int, seconds: float, dt: float = 0.02, control_period: float = 0.1):
    """Run the controller at 10 Hz on a rover stepped at 1 / dt; returns (rover, controller, trace)."""
    world = generate_world(seed=world_seed)
    obstacles = world.obstacle_circles()
    rover = DiffDriveRover(GEOM, world.terrain, obstacles)
    ctrl = ExplorationController(obstacles, rover.bounds, GEOM, np.random.default_rng(rng_seed))
    every = int(round(control_period / dt))
    trace = []
    for k in range(int(round(seconds / dt))):
        if k % every == 0:
            rover.command(*ctrl.command(rover.state))
        s = rover.step(dt)
        trace.append((s.t, s.x, s.y, s.collided))
    return rover, ctrl, np.array(trace), obstacles


def test_explores_generated_forest_without_collisions():
    rover, ctrl, trace, obstacles = explore(3, 3, 120.0)
    assert rover.collisions == 0 and not trace[:, 3].any()
    # never closer than the safety margin to any obstacle's edge (footprint circle vs obstacle circle)
    d = np.hypot(trace[:, 1, None] - obstacles[None, :, 0], trace[:, 2, None] - obstacles[None, :, 1])
    clearance = (d - obstacles[None, :, 2]).min() - GEOM.footprint_radius_m
    assert clearance > 0.05
    # it covers ground: tens of metres and many distinct 2 m cells
    path = np.hypot(np.diff(trace[:, 1]), np.diff(trace[:, 2])).sum()
    cells = {(int(math.floor(x / 2.0)), int(math.floor(y / 2.0))) for x, y in trace[:, 1:3]}
    assert path > 35.0
    assert len(cells) > 25
    assert ctrl.cells_visited() >= len(cells) - 2  # the controller's own map agrees
    extent = np.ptp(trace[:, 1]) + np.ptp(trace[:, 2])
    assert extent > 10.0  # not circling in one spot


def test_exploration_is_deterministic_from_the_rng():
    _, _, a, _ = explore(3, 11, 10.0)
    _, _, b, _ = explore(3, 11, 10.0)
    _, _, c, _ = explore(3, 12, 10.0)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_stays_inside_bounds_from_an_edge():
    terrain = Terrain(np.zeros((21, 21)), 1.0, -10, -10)
    rover = DiffDriveRover(GEOM, terrain, start=(8.5, 0.0, 0.0))  # facing the east edge, 1.5 m away
    ctrl = ExplorationController(None, rover.bounds, GEOM, np.random.default_rng(0))
    xs = []
    for k in range(int(60.0 / 0.02)):
        if k % 5 == 0:
            rover.command(*ctrl.command(rover.state))
        xs.append(rover.step(0.02).x)
    assert rover.collisions == 0
    assert max(abs(x) for x in xs) + GEOM.footprint_radius_m < 10.0
    assert ctrl.cells_visited() > 10


def ring_of_posts(gap_half_width_rad: float) -> np.ndarray:
    """Posts (r = 0.15 m) every 15 degrees on a 1 m circle, leaving a gap behind (toward -x)."""
    angles = np.linspace(-math.pi, math.pi, 24, endpoint=False)
    angles = [a for a in angles if abs(abs(a) - math.pi) > gap_half_width_rad]
    return np.array([[math.cos(a), math.sin(a), 0.15] for a in angles])


def run_in(obstacles: np.ndarray, seconds: float):
    terrain = Terrain(np.zeros((21, 21)), 1.0, -10, -10)
    rover = DiffDriveRover(GEOM, terrain, obstacles, start=(0.0, 0.0, 0.0))
    ctrl = ExplorationController(obstacles, rover.bounds, GEOM, np.random.default_rng(0))
    first = ctrl.command(rover.state)
    radii = []
    for k in range(int(seconds / 0.02)):
        if k % 5 == 0:
            rover.command(*ctrl.command(rover.state))
        s = rover.step(0.02)
        radii.append(math.hypot(s.x, s.y))
    return rover, ctrl, first, radii


def test_turns_in_place_and_finds_the_way_out_of_a_ring():
    rover, ctrl, (v, w), radii = run_in(ring_of_posts(0.8), 30.0)
    assert v == 0.0 and abs(w) > 0.3  # the only way out is behind: rotate on the spot first
    assert rover.collisions == 0
    assert max(radii) > 3.0  # it found the gap and left the ring


def test_fully_boxed_in_never_collides():
    rover, ctrl, (v, w), radii = run_in(ring_of_posts(0.0), 20.0)
    assert v == 0.0 and abs(w) > 0.3
    assert rover.collisions == 0
    assert max(radii) < 0.3  # stays put (turning, backing off a little) instead of pushing through
    assert ctrl.escapes >= 1  # the watchdog noticed it was stuck


def test_escapes_after_a_collision():
    ctrl = ExplorationController(np.array([[1.0, 0.0, 0.3]]), (-10, 10, -10, 10), GEOM, np.random.default_rng(0))
    state = RoverState(t=1.0, x=0.0, y=0.0, yaw=0.0, collided=True)
    v, _ = ctrl.command(state)
    assert ctrl.escapes == 1 and ctrl.mode == "escape" and v < 0  # backs off first


def test_range_fan_geometry():
    obstacles = np.array([[5.0, 0.0, 0.5]])
    headings = np.array([0.0, math.pi / 2, math.pi, math.atan2(0.4, 5.0)])
    r = range_fan(0.0, 0.0, headings, obstacles, None, inflate_m=0.3, max_range_m=10.0)
    assert r[0] == pytest.approx(5.0 - 0.8)
    assert r[1] == 10.0 and r[2] == 10.0
    # grazing ray: hits the inflated circle where it enters it
    theta = math.atan2(0.4, 5.0)
    t_ca, m = 5.0 * math.cos(theta), 5.0 * math.sin(theta)  # closest approach along the ray, miss distance
    assert r[3] == pytest.approx(t_ca - math.sqrt(0.8**2 - m * m))
    # inside an inflated circle: rays into it are blocked, rays away are free
    r_in = range_fan(4.5, 0.0, np.array([0.0, math.pi]), obstacles, None, inflate_m=0.3, max_range_m=3.0)
    assert r_in.tolist() == [0.0, 3.0]
    # bounds shrink by the inflation
    r_b = range_fan(0.0, 0.0, np.array([0.0, math.pi / 2]), np.zeros((0, 3)), (-5, 2, -5, 5), 0.5, 10.0)
    assert r_b == pytest.approx([1.5, 4.5])


def test_controller_refuses_bad_parameters():
    with pytest.raises(ValueError, match="cruise_speed"):
        ExplorationController(None, (-5, 5, -5, 5), GEOM, np.random.default_rng(0), cruise_speed=-0.1)
    with pytest.raises(ValueError, match="cruise_speed"):
        ExplorationController(None, (-5, 5, -5, 5), GEOM, np.random.default_rng(0), cruise_speed=3.0)
    with pytest.raises(ValueError, match="bounds"):
        ExplorationController(None, (5, -5, -5, 5), GEOM, np.random.default_rng(0))
    with pytest.raises(ValueError, match="rng"):
        ExplorationController(None, (-5, 5, -5, 5), GEOM, 42)
    with pytest.raises(ValueError, match="n_rays"):
        ExplorationController(None, (-5, 5, -5, 5), GEOM, np.random.default_rng(0), n_rays=3)
    with pytest.raises(ValueError, match="look_ahead_m"):
        ExplorationController(None, (-5, 5, -5, 5), GEOM, np.random.default_rng(0), look_ahead_m=0.1)


def test_cmd_vel_controller_holds_then_times_out():
    ctrl = CmdVelController(timeout_s=0.5)
    assert ctrl.command(RoverState(t=0.0)) == (0.0, 0.0)  # nothing received yet
    ctrl.set(0.4, -0.2, t=1.0)
    assert ctrl.command(RoverState(t=1.3)) == (0.4, -0.2)
    assert ctrl.command(1.5) == (0.4, -0.2)
    assert ctrl.command(RoverState(t=1.6)) == (0.0, 0.0)
    ctrl.set(0.1, 0.0, t=2.0)
    assert ctrl.command(2.1) == (0.1, 0.0)
    with pytest.raises(ValueError, match="timeout_s"):
        CmdVelController(timeout_s=0.0)
    with pytest.raises(ValueError, match="cmd_vel"):
        ctrl.set(float("inf"), 0.0, t=3.0)
