"""Kinematics, IMU-grade derivatives, terrain following and collisions of the sim rover."""

from __future__ import annotations

import math

import numpy as np
import pytest

from forest_perception.frames import RoverGeometry
from forest_perception.geo import rotation_exp, rotation_from_quaternion, wrap_angle
from forest_perception.sim.rover import GRAVITY, DiffDriveRover
from forest_perception.sim.terrain import Terrain
from forest_perception.sim.world import generate_world

GEOM = RoverGeometry()
DT = 0.01


def flat(size: int = 40) -> Terrain:
    return Terrain(np.zeros((size + 1, size + 1)), 1.0, -size / 2, -size / 2)


def slope_x(grad: float, size: int = 40) -> Terrain:
    xs = np.arange(size + 1) - size / 2
    return Terrain(np.tile(grad * xs, (size + 1, 1)), 1.0, -size / 2, -size / 2)


def run(rover: DiffDriveRover, v: float, w: float, seconds: float, dt: float = DT):
    rover.command(v, w)
    states = [rover.step(dt) for _ in range(int(round(seconds / dt)))]
    return states


def test_at_rest_on_flat_ground_reads_plus_g():
    rover = DiffDriveRover(GEOM, flat())
    assert np.allclose(rover.state.linear_acceleration, [0, 0, GRAVITY])
    s = rover.step(DT)
    assert np.allclose(s.linear_acceleration, [0, 0, GRAVITY], atol=1e-9)
    assert np.allclose(s.angular_velocity, 0, atol=1e-12)
    assert s.z == pytest.approx(GEOM.wheel_radius_m)
    assert abs(GRAVITY - 9.81) < 0.01


def test_straight_drive_distance_and_wheel_angles():
    rover = DiffDriveRover(GEOM, flat(), start=(-5.0, 0.0, 0.0))
    v = 0.5
    states = run(rover, v, 0.0, 4.0)
    # ramp at the acceleration limit, then cruise: d = v t - v^2 / (2 a)
    expected = v * 4.0 - v * v / (2 * rover.max_linear_accel)
    assert states[-1].x - (-5.0) == pytest.approx(expected, abs=1e-9)
    assert states[-1].y == pytest.approx(0.0, abs=1e-12)
    # in steady state, distance over 2 s is exactly v * t
    i1, i2 = 99, 299  # t = 1 s and 3 s
    assert states[i2].x - states[i1].x == pytest.approx(v * 2.0, abs=1e-9)
    assert states[-1].v == pytest.approx(v)
    # wheel angle == distance / radius, both wheels, and the rates match
    dist = states[-1].x + 5.0
    assert np.allclose(states[-1].wheel_position, dist / GEOM.wheel_radius_m, atol=1e-9)
    assert np.allclose(states[-1].wheel_velocity, v / GEOM.wheel_radius_m)
    # steady: only gravity; while ramping: +a on body x
    assert np.allclose(states[-1].linear_acceleration, [0, 0, GRAVITY], atol=1e-9)
    assert states[10].linear_acceleration[0] == pytest.approx(rover.max_linear_accel, rel=1e-6)


def test_pure_rotation_in_place():
    rover = DiffDriveRover(GEOM, flat())
    w = 1.0
    states = run(rover, 0.0, w, 3.0)
    assert states[-1].x == pytest.approx(0.0, abs=1e-12)
    assert states[-1].y == pytest.approx(0.0, abs=1e-12)
    ramp = w / rover.max_angular_accel
    assert wrap_angle(states[-1].yaw - (w * 3.0 - w * ramp / 2)) == pytest.approx(0.0, abs=1e-9)
    # wheels turn opposite ways by w * track / 2 / r per second of steady rotation
    i1, i2 = 99, 299  # t = 1 s and 3 s
    dwheel = states[i2].wheel_position - states[i1].wheel_position
    per = w * GEOM.track_width_m / 2 / GEOM.wheel_radius_m * 2.0
    assert dwheel == pytest.approx([-per, per])
    assert np.allclose(states[-1].angular_velocity, [0, 0, w])
    # pure rotation about the base origin: no centripetal term
    assert np.allclose(states[-1].linear_acceleration, [0, 0, GRAVITY], atol=1e-9)


def test_constant_turn_centripetal_v_times_w():
    rover = DiffDriveRover(GEOM, flat())
    v, w = 0.6, 0.8
    states = run(rover, v, w, 3.0)
    f = states[-1].linear_acceleration
    assert f[1] == pytest.approx(v * w, rel=1e-6)
    assert f[0] == pytest.approx(0.0, abs=1e-9)
    assert f[2] == pytest.approx(GRAVITY)
    assert np.allclose(states[-1].angular_velocity, [0, 0, w])
    # once both rates are steady, the path is a circle of radius v / w about a fixed centre
    steady = states[100:]
    centres = np.array([[s.x - v / w * math.sin(s.yaw), s.y + v / w * math.cos(s.yaw)] for s in steady])
    assert np.allclose(centres, centres[0], atol=1e-9)


@pytest.mark.parametrize("grad", [0.1, 0.3])
def test_slope_rotates_gravity_into_body_x_and_y(grad):
    alpha = math.atan(grad)
    rover = DiffDriveRover(GEOM, slope_x(grad), start=(0.0, 0.0, 0.0))
    st = rover.state
    assert st.pitch == pytest.approx(-alpha)  # nose up is negative pitch (REP 103)
    assert st.roll == pytest.approx(0.0, abs=1e-12)
    expect = GRAVITY * np.array([math.sin(alpha), 0.0, math.cos(alpha)])
    assert np.allclose(st.linear_acceleration, expect)
    # driving straight up the slope at constant speed reads the same as at rest
    states = run(rover, 0.5, 0.0, 4.0)
    assert np.allclose(states[-1].linear_acceleration, expect, atol=1e-6)
    dx = states[-1].x - states[200].x
    assert dx == pytest.approx(0.5 * math.cos(alpha) * (states[-1].t - states[200].t), rel=1e-9)
    assert states[-1].z - states[200].z == pytest.approx(grad * dx, rel=1e-3)
    # facing north, the slope rises to the right: right side up, gravity on -y
    side = DiffDriveRover(GEOM, slope_x(grad), start=(0.0, 0.0, math.pi / 2))
    assert side.state.roll == pytest.approx(-alpha)
    f = side.state.linear_acceleration
    assert np.allclose(f, GRAVITY * np.array([0.0, -math.sin(alpha), math.cos(alpha)]), atol=1e-12)


def test_derivatives_integrate_back_to_the_trajectory_on_rough_terrain():
    """Strapdown check: integrating the body rate and specific force reproduces the truth."""
    world = generate_world(seed=3)
    rover = DiffDriveRover(GEOM, world.terrain, start=(0.0, 0.0, 0.3))
    R = rover.state.rotation()
    vel = np.zeros(3)
    pos = rover.state.position.copy()
    cmds = [(0.5, 0.0), (0.4, 0.6), (0.6, -0.4)]
    for v, w in cmds:
        rover.command(v, w)
        for _ in range(150):
            prev = rover.state
            s = rover.step(DT)
            R = R @ rotation_exp(s.angular_velocity * DT)
            # mean world acceleration over the step from the specific force at its end
            a = s.rotation() @ s.linear_acceleration - np.array([0, 0, GRAVITY])
            vel = vel + a * DT
            pos = pos + vel * DT
            assert not s.collided
            assert prev.t < s.t
    assert np.allclose(R, rover.state.rotation(), atol=1e-9)
    # the horizontal velocity at the end is recovered and the position within millimetres
    truth_v = (
        rover.state.v * math.cos(rover.state.pitch) * np.array([math.cos(rover.state.yaw), math.sin(rover.state.yaw)])
    )
    assert np.allclose(vel[:2], truth_v, atol=0.005)
    assert np.linalg.norm(pos - rover.state.position) < 0.005


def test_collision_stops_before_obstacle():
    obstacles = np.array([[3.0, 0.0, 0.2]])
    rover = DiffDriveRover(GEOM, flat(), obstacles, start=(0.0, 0.0, 0.0))
    states = run(rover, 0.5, 0.0, 12.0)
    hit = [s for s in states if s.collided]
    assert hit, "the rover should have been stopped by the obstacle"
    last = states[-1]
    gap = 3.0 - last.x - 0.2 - GEOM.footprint_radius_m
    assert 0.0 <= gap < 0.5 * DT + 1e-9  # stopped within one step's travel, never overlapping
    assert all(3.0 - s.x - 0.2 - GEOM.footprint_radius_m >= 0 for s in states)
    assert last.v == 0.0 and rover.collisions >= 1
    # the wheels stalled too, and backing away is allowed
    before = last.wheel_position.copy()
    states = run(rover, -0.3, 0.0, 1.0)
    assert not any(s.collided for s in states[1:])
    assert states[-1].x < last.x and np.all(states[-1].wheel_position < before)


def test_long_steps_cannot_jump_over_thin_obstacles():
    post = np.array([[1.0, 0.0, 0.02]])
    rover = DiffDriveRover(GEOM, flat(), post, start=(0.0, 0.0, 0.0), max_linear_accel=100.0)
    rover.command(1.0, 0.0)
    assert rover.step(1.0).x == pytest.approx(0.5)  # ramps to 1 m/s within the step
    s = rover.step(1.0)  # would end at x = 1.5, beyond the post
    assert s.collided and s.x == pytest.approx(0.5)
    assert not rover.is_free(2.0, 0.0, from_xy=(0.0, 0.0)) and rover.is_free(2.0, 0.0)


def test_world_bounds_stop_the_rover():
    rover = DiffDriveRover(GEOM, flat(20), start=(0.0, 0.0, 0.0))
    states = run(rover, 1.0, 0.0, 15.0, dt=0.02)
    xmax = rover.bounds[1]
    assert all(s.x + GEOM.footprint_radius_m <= xmax for s in states)
    assert states[-1].collided or rover.collisions >= 1
    assert xmax - (states[-1].x + GEOM.footprint_radius_m) < 0.03


def test_commands_clamped_and_validated():
    rover = DiffDriveRover(GEOM, flat())
    assert rover.command(5.0, -10.0) == (GEOM.max_linear_mps, -GEOM.max_angular_rps)
    with pytest.raises(ValueError, match="command"):
        rover.command(float("nan"), 0.0)
    with pytest.raises(ValueError, match="dt"):
        rover.step(0.0)
    with pytest.raises(ValueError, match="start"):
        DiffDriveRover(GEOM, flat(), np.array([[0.0, 0.0, 0.5]]))
    with pytest.raises(ValueError, match="obstacles"):
        DiffDriveRover(GEOM, flat(), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="bounds"):
        DiffDriveRover(GEOM, flat(), bounds=(1.0, -1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="slip_std"):
        DiffDriveRover(GEOM, flat(), slip_std=-0.1)


def test_frames_camera_pose_and_quaternion():
    rover = DiffDriveRover(GEOM, flat(), start=(1.0, 2.0, math.pi / 2))
    T = rover.world_from_base()
    assert T.shape == (4, 4) and np.allclose(T[3], [0, 0, 0, 1])
    assert np.allclose(T[:3, 3], [1.0, 2.0, GEOM.wheel_radius_m])
    assert np.allclose(rotation_from_quaternion(rover.quaternion_xyzw()), T[:3, :3])
    pos, R = rover.camera_pose()
    # facing north: the camera is camera_forward_m north of the axle, camera_height_m above ground
    assert np.allclose(pos, [1.0, 2.0 + GEOM.camera_forward_m, GEOM.camera_height_m])
    assert np.allclose(R @ [1, 0, 0], [0, 1, 0], atol=1e-12)
    tilted = DiffDriveRover(RoverGeometry(camera_pitch_rad=0.2), flat())
    _, Rt = tilted.camera_pose()
    assert (Rt @ [1, 0, 0])[2] == pytest.approx(-math.sin(0.2))  # positive pitch looks down
    assert np.allclose(rover.point_in_world((0.0, 0.0, 0.0)), T[:3, 3])


def test_slip_is_seeded_and_perturbs_motion():
    def drive(seed):
        rover = DiffDriveRover(GEOM, flat(), slip_std=0.05, rng=np.random.default_rng(seed))
        return run(rover, 0.5, 0.0, 3.0)[-1]

    a, b, c = drive(1), drive(1), drive(2)
    assert (a.x, a.y, a.yaw) == (b.x, b.y, b.yaw)
    assert (a.x, a.y) != (c.x, c.y)
    # wheels report the rim travel; the ground travel differs by the slip
    rim = a.wheel_position.mean() * GEOM.wheel_radius_m
    assert abs(rim - math.hypot(a.x, a.y)) > 1e-4
    assert abs(a.y) > 1e-4


def test_fast_ground_height_matches_terrain_height_at():
    world = generate_world(seed=3)
    rover = DiffDriveRover(GEOM, world.terrain)
    pts = np.random.default_rng(0).uniform(-40.0, 40.0, size=(500, 2))  # some outside the grid
    ref = world.terrain.height_at(pts[:, 0], pts[:, 1])
    assert np.array_equal([rover._ground_height(x, y) for x, y in pts], ref)
