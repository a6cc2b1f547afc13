"""sim_node end to end over DDS on loopback: the topic contract, cmd_vel, bad parameters."""

from __future__ import annotations

import math

import numpy as np
import pytest

SMALL_WORLD = {
    "world_size_m": 24.0,
    "camera_width": 160,
    "camera_height": 120,
    "camera_rate_hz": 15.0,
    "real_time_factor": 1.0,
}


def _params(**values):
    from rclpy.parameter import Parameter

    return [Parameter(k, value=v) for k, v in {**SMALL_WORLD, **values}.items()]


def _stamp(msg) -> float:
    return msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9


@pytest.mark.slow
def test_topic_contract(rclpy_context, spin):
    from diagnostic_msgs.msg import DiagnosticArray
    from nav_msgs.msg import Odometry
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import CameraInfo, Image, Imu, JointState, NavSatFix

    from forest_perception.msgs import array_from_image
    from forest_perception.nodes.sim_node import SimNode

    node = SimNode(context=rclpy_context, parameter_overrides=_params(seed=5))
    ns = "/rover_0"
    topics = {
        f"{ns}/camera/image_raw": (Image, False),
        f"{ns}/camera/camera_info": (CameraInfo, False),
        f"{ns}/camera/depth/image_raw": (Image, False),
        f"{ns}/imu/data": (Imu, False),
        f"{ns}/gps/fix": (NavSatFix, False),
        f"{ns}/joint_states": (JointState, True),
        f"{ns}/odom": (Odometry, True),
        f"{ns}/ground_truth/odom": (Odometry, True),
        "/clock": (Clock, True),
        "/diagnostics": (DiagnosticArray, True),
    }
    try:
        got = spin([node], 6.0, topics)
    finally:
        node.destroy_node()

    for name in topics:
        assert got[name], f"nothing received on {name}"

    images = got[f"{ns}/camera/image_raw"]
    depths = got[f"{ns}/camera/depth/image_raw"]
    infos = got[f"{ns}/camera/camera_info"]
    for msg in images:
        assert msg.encoding == "rgb8" and (msg.width, msg.height) == (160, 120)
        assert msg.step == 160 * 3 and msg.header.frame_id == "camera_color_optical_frame"
    for msg in depths:
        assert msg.encoding == "32FC1" and msg.step == 160 * 4
        assert msg.header.frame_id == "camera_color_optical_frame"
    depth = array_from_image(depths[-1])
    finite = depth[np.isfinite(depth)]
    assert finite.size > 0.2 * depth.size, "depth image is mostly invalid"
    assert finite.min() >= 0.28 - 1e-6 and finite.max() <= 10.0 + 1e-3  # RealSense-like range, NaN elsewhere
    assert not np.isinf(depth).any(), "invalid depth must be NaN, not inf (REP 118)"
    # colour and depth of a frame share a stamp, so they can be paired exactly
    assert {_stamp(m) for m in images} & {_stamp(m) for m in depths}
    k = np.array(infos[-1].k).reshape(3, 3)
    assert k[0, 0] == pytest.approx(160 / (2 * math.tan(math.radians(69.4) / 2)))
    assert (k[0, 2], k[1, 2]) == pytest.approx((79.5, 59.5))

    imu = got[f"{ns}/imu/data"]
    assert imu[-1].header.frame_id == "imu_link"
    az = np.mean([m.linear_acceleration.z for m in imu])
    assert 9.0 < az < 10.6, "IMU must include gravity (+z up when level)"
    assert imu[-1].angular_velocity_covariance[0] > 0 and imu[-1].linear_acceleration_covariance[0] > 0

    fix = got[f"{ns}/gps/fix"][-1]
    assert abs(fix.latitude - 50.869) < 0.001 and abs(fix.longitude + 1.604) < 0.001
    assert fix.position_covariance_type == NavSatFix.COVARIANCE_TYPE_DIAGONAL_KNOWN
    assert fix.position_covariance[0] > 0

    joints = got[f"{ns}/joint_states"][-1]
    assert list(joints.name) == ["left_wheel_joint", "right_wheel_joint"]
    odom = got[f"{ns}/odom"][-1]
    assert (odom.header.frame_id, odom.child_frame_id) == ("odom", "base_link")
    # ground truth in the world frame: the dead-reckoned odometry drifts from it, but not by metres in 6 s
    truths = {_stamp(m): m for m in got[f"{ns}/ground_truth/odom"]}
    truth = got[f"{ns}/ground_truth/odom"][-1]
    assert (truth.header.frame_id, truth.child_frame_id) == ("world", "base_link")
    first_odom = next(m for m in got[f"{ns}/odom"] if _stamp(m) in truths)
    first_truth = truths[_stamp(first_odom)]
    travelled_odom = math.dist((odom.pose.pose.position.x, odom.pose.pose.position.y),
                               (first_odom.pose.pose.position.x, first_odom.pose.pose.position.y))
    travelled_truth = math.dist((truth.pose.pose.position.x, truth.pose.pose.position.y),
                                (first_truth.pose.pose.position.x, first_truth.pose.pose.position.y))
    assert abs(travelled_odom - travelled_truth) < 0.5

    # monotonic stamps and rates measured in simulated time
    for name, nominal in (
        (f"{ns}/camera/image_raw", 15.0),
        (f"{ns}/imu/data", 200.0),
        (f"{ns}/gps/fix", 10.0),
        (f"{ns}/joint_states", 50.0),
    ):
        stamps = np.array([_stamp(m) for m in got[name]])
        assert (np.diff(stamps) > 0).all(), f"{name} stamps are not strictly increasing"
        span = stamps[-1] - stamps[0]
        assert span > 1.0, f"{name}: only {span:.2f} s of simulated time"
        rate = (len(stamps) - 1) / span
        # best-effort sensor streams may lose a few messages on a loaded machine
        assert 0.8 * nominal <= rate <= 1.05 * nominal, f"{name}: {rate:.1f} Hz, expected {nominal}"
    clock = [m.clock.sec + m.clock.nanosec * 1e-9 for m in got["/clock"]]
    assert np.all(np.diff(clock) > 0)
    values = {kv.key: kv.value for kv in got["/diagnostics"][-1].status[0].values}
    assert float(values["real_time_factor"]) > 0.1


@pytest.mark.slow
def test_cmd_vel_drives_the_rover(rclpy_context, spin):
    from geometry_msgs.msg import Twist

    from forest_perception.nodes.sim_node import SimNode

    node = SimNode(context=rclpy_context, parameter_overrides=_params(behaviour="cmd_vel", seed=2))
    start = node.sim.rovers[0].state
    sent = {"pub": None}

    def drive(listener):
        if sent["pub"] is None:
            sent["pub"] = listener.create_publisher(Twist, "/rover_0/cmd_vel", 10)
        msg = Twist()
        msg.linear.x = 0.4
        sent["pub"].publish(msg)

    try:
        spin([node], 3.0, {}, step=drive)
        end = node.sim.rovers[0].state
        moved = math.hypot(end.x - start.x, end.y - start.y)
        # forward along the start heading, about v * t (the start yaw of rover_0 is 0)
        assert moved > 0.3
        assert (end.x - start.x) * math.cos(start.yaw) + (end.y - start.y) * math.sin(start.yaw) > 0.25
    finally:
        node.destroy_node()


@pytest.mark.slow
def test_several_rovers_share_one_world(rclpy_context, spin):
    from sensor_msgs.msg import Image, NavSatFix

    from forest_perception.nodes.sim_node import SimNode

    node = SimNode(
        context=rclpy_context,
        parameter_overrides=_params(rover_names=["rover_0", "rover_1"], weather=["sunny", "fog"], render_workers=0),
    )
    topics = {
        f"/rover_{i}/{t}": (kind, False)
        for i in (0, 1)
        for t, kind in (("camera/image_raw", Image), ("gps/fix", NavSatFix))
    }
    try:
        got = spin([node], 4.0, topics)
    finally:
        node.destroy_node()
    for name in topics:
        assert got[name], f"nothing on {name}"
    sunny = np.mean(array_from_image_mean(got["/rover_0/camera/image_raw"][-1]))
    fog = np.mean(array_from_image_mean(got["/rover_1/camera/image_raw"][-1]))
    assert sunny != fog  # each rover renders its own view and weather
    a, b = got["/rover_0/gps/fix"][-1], got["/rover_1/gps/fix"][-1]
    assert (a.latitude, a.longitude) != (b.latitude, b.longitude)


def array_from_image_mean(msg):
    from forest_perception.msgs import array_from_image

    return array_from_image(msg).reshape(-1, 3).mean(axis=0)


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"tree_density_per_ha": -5.0}, "tree_density_per_ha"),
        ({"camera_width": 0}, "camera_width"),
        ({"weather": ["tornado"]}, "tornado"),
        ({"style": "jungle"}, "jungle"),
        ({"rover_names": ["rover_0", "rover_0"]}, "unique"),
    ],
)
def test_invalid_parameters_are_refused(rclpy_context, overrides, words):
    from forest_perception.nodes.sim_node import SimNode

    with pytest.raises(Exception, match=words):
        SimNode(context=rclpy_context, parameter_overrides=_params(**overrides))


def test_opengl_renderer_without_egl_is_a_clear_parameter_error(rclpy_context, monkeypatch):
    from forest_perception.nodes.sim_node import SimNode
    from forest_perception.sim import gl_renderer

    monkeypatch.setattr(gl_renderer, "_GL_PROBLEM", ["no offscreen OpenGL 3.3 context over EGL (test)"])
    with pytest.raises(ValueError, match="renderer:=opengl: renderer 'opengl' requested, but no offscreen OpenGL"):
        SimNode(context=rclpy_context, parameter_overrides=_params(renderer="opengl"))


def test_style_parameter_builds_the_styled_forest(rclpy_context):
    from forest_perception.nodes.sim_node import SimNode
    from forest_perception.sim.styles import sample

    node = SimNode(context=rclpy_context,
                   parameter_overrides=_params(style="hilly_deadwood", seed=3, render_workers=0, real_time_factor=0.0))
    try:
        expected = sample("hilly_deadwood", 3)
        assert node.world.config == expected.world_config(size_m=24.0)
        assert node.world.summary()["snags"] > 0
        rover = node.sim.rovers[0]
        assert rover.weather.name == "style:hilly_deadwood"
        assert rover.cfg.effects == expected.camera_effects()
        assert node.sim.config.geometry.camera_height_m == expected.factors.camera_height_m
    finally:
        node.destroy_node()


def test_runtime_parameter_updates_are_validated(rclpy_context):
    from rclpy.parameter import Parameter

    from forest_perception.nodes.sim_node import SimNode

    node = SimNode(context=rclpy_context, parameter_overrides=_params(real_time_factor=0.0))
    try:
        bad = node.set_parameters([Parameter("behaviour", value="fly")])[0]
        assert not bad.successful and "behaviour" in bad.reason
        ro = node.set_parameters([Parameter("seed", value=9)])[0]
        assert not ro.successful  # read-only: the world is built at start-up
        ok = node.set_parameters([Parameter("behaviour", value="cmd_vel")])[0]
        assert ok.successful and node.sim.rovers[0].cfg.behaviour == "cmd_vel"
    finally:
        node.destroy_node()
