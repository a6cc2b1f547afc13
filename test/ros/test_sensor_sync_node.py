"""sensor_sync_node: synced sets with one stamp, malformed input, missing sensors, clock resets, parameters, sim."""

from __future__ import annotations

import math
import time
from collections import defaultdict

import numpy as np
import pytest

OPTICAL = "camera_color_optical_frame"
S = 1_000_000_000


def _params(**values):
    from rclpy.parameter import Parameter

    return [Parameter(k, value=v) for k, v in values.items()]


def _t(seconds: float):
    from forest_perception import msgs

    return msgs.time_from_ns(round(seconds * S))


def _ns(msg) -> int:
    return msg.header.stamp.sec * S + msg.header.stamp.nanosec


class Player:
    """Builds the rover's sensor messages with known values (linear in time) and feeds the node's callbacks."""

    def __init__(self, node):
        self.node = node

    def image(self, t, k):
        from forest_perception import msgs

        return msgs.image_from_array(np.full((6, 8, 3), k % 256, np.uint8), "rgb8", _t(t), OPTICAL)

    def depth(self, t, k):
        from forest_perception import msgs

        return msgs.image_from_array(np.full((6, 8), 1.0 + k, np.float32), "32FC1", _t(t), OPTICAL)

    def info(self, t):
        from forest_perception import msgs
        from forest_perception.frames import CameraIntrinsics

        return msgs.camera_info_from_intrinsics(CameraIntrinsics(8, 6, 60.0), _t(t), OPTICAL)

    def imu(self, t, yaw_rate=None):
        from forest_perception import msgs
        from forest_perception.geo import quaternion_from_rpy

        wz = 0.2 + 0.1 * t if yaw_rate is None else yaw_rate
        return msgs.imu_msg(
            _t(t), "imu_link", quaternion_from_rpy(0.0, 0.0, 0.3 * t), np.array([0.0, 0.0, wz]),
            np.array([0.5 * t, 0.0, 9.81]), np.eye(3) * 1e-4, np.eye(3) * 1e-6, np.eye(3) * 1e-3,
        )

    def joints(self, t, speed=4.0):
        from forest_perception import msgs

        return msgs.joint_state_msg(
            _t(t), ("left_wheel_joint", "right_wheel_joint"), np.array([speed * t, speed * t]),
            np.array([speed, speed]),
        )

    def gps(self, t, lat=50.869, lon=-1.604):
        from sensor_msgs.msg import NavSatFix

        from forest_perception import msgs

        return msgs.navsat_msg(_t(t), "gps_link", lat + 1e-6 * t, lon, 40.0, 0, np.diag([4.0, 4.0, 9.0]),
                               NavSatFix.COVARIANCE_TYPE_DIAGONAL_KNOWN)

    def run(self, start, seconds, camera=True, depth=True, skip_depth=(), imu_yaw_rate=None, speed=4.0):
        """Feed ``seconds`` of sensor data from ``start`` in stamp order (depth 2 ms late, info 1 ms early)."""
        events = []
        for i in range(int(seconds * 200)):
            t = start + i / 200
            events.append((t, "imu", self.imu(t, imu_yaw_rate)))
            if i % 4 == 0:
                events.append((t, "joints", self.joints(t, speed)))
            if i % 20 == 0:
                events.append((t, "gps", self.gps(t)))
        if camera:
            for k in range(int(seconds * 15)):
                t = start + k / 15
                events.append((t, "image", self.image(t, k)))
                events.append((t - 0.001, "info", self.info(t - 0.001)))
                if depth and k not in skip_depth:
                    events.append((t + 0.002, "depth", self.depth(t + 0.002, k)))
        events.sort(key=lambda e: e[0])
        handlers = {
            "imu": self.node._on_imu, "joints": self.node._on_joints, "gps": self.node._on_gps,
            "image": self.node._on_image, "info": self.node._on_camera_info, "depth": self.node._on_depth,
        }
        for _, kind, msg in events:
            handlers[kind](msg)


def _record(node) -> dict[str, list]:
    """Replace the node's publishers' publish() with recorders."""
    got = defaultdict(list)
    for name, pub in node.pub.items():
        pub.publish = lambda msg, n=name: got[n].append(msg)
    node.diag_pub.publish = lambda msg: got["diagnostics"].append(msg)
    return got


def _values(status) -> dict[str, str]:
    return {kv.key: kv.value for kv in status.values}


def test_synced_sets_share_the_image_stamp_and_bad_messages_are_counted(rclpy_context):
    from forest_perception.nodes.sensor_sync_node import SensorSyncNode

    node = SensorSyncNode(context=rclpy_context, namespace="rover_0", parameter_overrides=_params(slop_s=0.01))
    try:
        got = _record(node)
        player = Player(node)
        player.run(10.0, 2.0, skip_depth={7})
        # malformed messages of every kind: dropped and counted, nothing else disturbed
        nan_imu = player.imu(12.0)
        nan_imu.angular_velocity.z = float("nan")
        node._on_imu(nan_imu)
        no_wheels = player.joints(12.0)
        no_wheels.name = ["caster_joint", "right_wheel_joint"]
        node._on_joints(no_wheels)
        short = player.image(12.0, 0)
        short.data = bytes(short.data)[:-5]
        node._on_image(short)
        wrong_depth = player.image(12.0, 0)  # rgb8 on the depth topic
        node._on_depth(wrong_depth)
        no_k = player.info(12.0)
        no_k.k = [0.0] * 9
        node._on_camera_info(no_k)
        bad_fix = player.gps(12.0)
        bad_fix.latitude = float("nan")
        node._on_gps(bad_fix)
        assert node.malformed == {"image": 1, "depth": 1, "camera_info": 1, "imu": 1, "gps": 1, "joints": 1}
        assert "wheel joint" in node.last_error or "non-finite" in node.last_error

        images = got["image"]
        assert len(images) >= 27  # 30 frames, the last ones may still wait for the IMU
        stamps = [_ns(m) for m in images]
        assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
        for topic in ("camera_info", "imu", "joints", "gps"):
            assert [_ns(m) for m in got[topic]] == stamps, topic
        # frame 7 lost its depth: every other frame has its own depth, restamped to the image's stamp
        depth_stamps = [_ns(m) for m in got["depth"]]
        assert depth_stamps == [s for k, s in enumerate(stamps) if k != 7]
        for m in got["depth"]:  # each frame's own depth (its value is 1 + frame index)
            assert float(np.frombuffer(bytes(m.data), np.float32)[0]) == 1.0 + stamps.index(_ns(m))
        for m in got["imu"]:  # interpolated to the image stamp from the linear signal
            t = _ns(m) / S
            assert m.angular_velocity.z == pytest.approx(0.2 + 0.1 * t, abs=1e-9)
            assert m.linear_acceleration.x == pytest.approx(0.5 * t, abs=1e-9)
            assert m.header.frame_id == "imu_link" and m.angular_velocity_covariance[0] == pytest.approx(1e-6)
        for m in got["joints"]:
            assert list(m.name) == ["left_wheel_joint", "right_wheel_joint"]
            assert m.position[0] == pytest.approx(4.0 * _ns(m) / S, abs=1e-9)
        assert all(m.position_covariance_type == 2 for m in got["gps"])

        # odometry at every wheel reading: 4 rad/s on 6 cm wheels = 0.24 m/s straight ahead; the gyro
        # says the rover turns (0.2 rad/s and more) but the wheels say straight: inverse-variance fusion
        # trusts the gyro while moving
        odom = got["odom"]
        assert len(odom) == 100 and odom[-1].header.frame_id == "odom" and odom[-1].child_frame_id == "base_link"
        assert odom[-1].twist.twist.linear.x == pytest.approx(0.24)
        assert odom[-1].pose.covariance[0] > odom[10].pose.covariance[0] > 0
        enu = got["enu"]
        assert len(enu) == 20 and enu[0].header.frame_id == "enu"
        assert enu[0].pose.pose.position.x == pytest.approx(0.0, abs=1e-6)
        assert enu[-1].pose.pose.position.y == pytest.approx(1e-6 * 1.9 * 111_200, rel=0.01)
        assert enu[-1].pose.covariance[0] == 4.0 and enu[-1].pose.covariance[35] == 1e6

        node._publish_diagnostics()
        status = got["diagnostics"][-1].status
        summary = _values(status[0])
        assert status[0].name == "sensor_sync_node: rover_0" and status[0].level == b"\x00", status[0].message
        assert int(summary["malformed"]) == 6 and summary["missing_sensors"] == "none"
        assert float(summary["imu_rate_hz"]) == pytest.approx(200.0, rel=0.02)
        assert float(summary["image_rate_hz"]) == pytest.approx(15.0, rel=0.02)
        per = {s.name.rsplit(" ", 1)[-1]: s for s in status[1:]}
        assert set(per) == {"image", "depth", "camera_info", "imu", "gps", "joints"}
        assert _values(per["joints"])["malformed"] == "1" and _values(per["depth"])["missing_in_frames"] == "1"
    finally:
        node.destroy_node()


def test_missing_depth_stale_gps_and_clock_reset_show_in_diagnostics(rclpy_context):
    from forest_perception.nodes.sensor_sync_node import SensorSyncNode

    node = SensorSyncNode(
        context=rclpy_context, parameter_overrides=_params(missing_after_s=0.5, gps_tolerance_s=0.3)
    )
    try:
        got = _record(node)
        player = Player(node)
        player.run(5.0, 1.0)
        # the depth camera dies and the GPS loses its fix under the canopy
        player.node._on_gps = lambda msg: None
        player.run(6.0, 1.5, depth=False)
        before = len(got["image"])
        assert before >= 30  # frames kept flowing
        assert len(got["depth"]) < before and len(got["gps"]) < before
        node._publish_diagnostics()
        status = got["diagnostics"][-1].status
        assert status[0].level == b"\x01"
        summary = _values(status[0])
        assert "depth" in summary["missing_sensors"] and "gps" in summary["missing_sensors"]
        per = {s.name.rsplit(" ", 1)[-1]: s for s in status[1:]}
        assert per["depth"].level == b"\x01" and "missing" in per["depth"].message
        assert summary["gps_stale"] == "True"

        # the simulation restarts: stamps go back to 0.2 s
        del player.node._on_gps  # the bound method again
        player.run(0.2, 1.0)
        assert node.sync.clock_resets == 1
        node._publish_diagnostics()
        status = got["diagnostics"][-1].status
        assert "clock reset" in status[0].message and _values(status[0])["clock_resets"] == "1"
        after = [_ns(m) for m in got["image"][before:]]
        assert after and after[-1] < 2 * S  # new timeline; what waited before the reset came out first
        assert [_ns(m) for m in got["imu"][-5:]] == after[-5:]
        node._publish_diagnostics()  # the reset is reported once
        assert "clock reset" not in got["diagnostics"][-1].status[0].message
    finally:
        node.destroy_node()


def test_clock_topic_jumping_back_clears_the_buffers(rclpy_context):
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile
    from rosgraph_msgs.msg import Clock

    from forest_perception import msgs
    from forest_perception.nodes.sensor_sync_node import SensorSyncNode

    node = SensorSyncNode(context=rclpy_context, parameter_overrides=_params(use_sim_time=True))
    clock = rclpy.create_node("clock_source", context=rclpy_context)
    clock_pub = clock.create_publisher(Clock, "/clock", QoSProfile(depth=10))
    executor = SingleThreadedExecutor(context=rclpy_context)
    executor.add_node(node)
    executor.add_node(clock)

    def set_clock(seconds: float) -> bool:
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            clock_pub.publish(Clock(clock=msgs.time_from_sec(seconds)))
            executor.spin_once(timeout_sec=0.02)
            if node.get_clock().now().nanoseconds == round(seconds * S):
                return True
        return False

    try:
        got = _record(node)
        assert set_clock(100.0)
        player = Player(node)
        player.run(99.0, 1.0)
        node._on_image(player.image(100.2, 99))  # waits for the IMU
        node._on_camera_info(player.info(100.2))
        node._on_depth(player.depth(100.2, 99))
        assert node.sync.pending == 1 and node.sync.clock_resets == 0
        published = len(got["image"])
        assert set_clock(5.0)  # the simulation was reset
        assert node.sync.clock_resets == 1 and node.sync.pending == 0 and node.sync.watermark_ns is None
        assert len(got["image"]) == published + 1  # what waited went out, not lost
        # the new timeline's stamps do not count as a second reset
        player.run(5.0, 0.5)
        assert node.sync.clock_resets == 1 and _ns(got["image"][-1]) < 6 * S
    finally:
        executor.remove_node(node)
        executor.remove_node(clock)
        clock.destroy_node()
        executor.shutdown()
        node.destroy_node()


def test_frames_expire_on_a_quiet_wire(rclpy_context):
    from forest_perception.nodes.sensor_sync_node import SensorSyncNode

    node = SensorSyncNode(context=rclpy_context, parameter_overrides=_params(max_wait_s=0.2))
    try:
        got = _record(node)
        player = Player(node)
        player.run(1.0, 1.0)
        node._on_image(player.image(2.1, 50))  # after the last IMU/wheel sample, and then silence
        node._on_camera_info(player.info(2.1))
        node._on_depth(player.depth(2.1, 50))
        assert node.sync.pending == 1
        node._on_idle()
        assert node.sync.pending == 1  # not quiet for long yet
        node._last_message_wall -= 0.5  # as if half a second had gone by without a message
        node._on_idle()
        assert node.sync.pending == 0 and _ns(got["image"][-1]) == round(2.1 * S)
        assert _ns(got["camera_info"][-1]) == round(2.1 * S) and _ns(got["depth"][-1]) == round(2.1 * S)
    finally:
        node.destroy_node()


def test_parameters_are_validated(rclpy_context):
    from rclpy.parameter import Parameter

    from forest_perception.nodes.sensor_sync_node import SensorSyncNode

    with pytest.raises(ValueError, match="left_wheel_joint"):
        SensorSyncNode(context=rclpy_context, parameter_overrides=_params(right_wheel_joint="left_wheel_joint"))
    node = SensorSyncNode(context=rclpy_context)
    try:
        assert not node.set_parameters([Parameter("slop_s", value=5.0)])[0].successful  # outside its range
        result = node.set_parameters([Parameter("buffer_s", value=0.2)])[0]
        assert not result.successful and "buffer_s" in result.reason
        result = node.set_parameters([Parameter("odom_frame_id", value="")])[0]
        assert not result.successful and "odom_frame_id" in result.reason
        assert not node.set_parameters([Parameter("diagnostics_period_s", value=2.0)])[0].successful  # read-only
        assert node.set_parameters([Parameter("use_depth", value=False), Parameter("track_width_m", value=0.4)])[
            0
        ].successful
        assert node.sync.config.use_depth is False and node.fusion.config.track_width_m == 0.4
        result = node.set_parameters(
            [Parameter("enu_origin_from_first_fix", value=False), Parameter("enu_origin_latitude_deg", value=50.0)]
        )[0]
        assert result.successful and node.enu.origin == (50.0, 0.0, 0.0)
    finally:
        node.destroy_node()


def _relative(poses: list[tuple[float, float, float]]) -> list[tuple[float, float, float]]:
    """Poses expressed in the frame of the first one (odometry starts wherever the node first heard)."""
    x0, y0, yaw0 = poses[0]
    c, s = math.cos(yaw0), math.sin(yaw0)
    out = []
    for x, y, yaw in poses:
        dx, dy = x - x0, y - y0
        out.append((c * dx + s * dy, -s * dx + c * dy, yaw - yaw0))
    return out


def _pose(odom) -> tuple[float, float, float]:
    p = odom.pose.pose
    return p.position.x, p.position.y, 2 * math.atan2(p.orientation.z, p.orientation.w)


def test_with_sim_node(rclpy_context, spin):
    from diagnostic_msgs.msg import DiagnosticArray
    from nav_msgs.msg import Odometry
    from sensor_msgs.msg import CameraInfo, Image, Imu, JointState

    from forest_perception.geo import wrap_angle
    from forest_perception.nodes.sensor_sync_node import SensorSyncNode
    from forest_perception.nodes.sim_node import SimNode

    sim = SimNode(
        context=rclpy_context,
        parameter_overrides=_params(
            world_size_m=24.0, camera_width=96, camera_height=72, render_workers=0, seed=3, real_time_factor=1.0,
            motion_blur=False, imu_rate_hz=100.0,  # 100 Hz IMU and /clock: one executor serves every node here
        ),
    )
    # ground truth at every wheel reading: the sim thread publishes an event right after the step it belongs to
    truth = {}
    publish = sim._publish

    def record_truth(event):
        if event.kind == "wheels":
            state = sim.sim.rovers[0].state
            truth[event.stamp_ns] = (state.x, state.y, state.yaw)
        publish(event)

    sim._publish = record_truth
    sync = SensorSyncNode(context=rclpy_context, namespace="rover_0", parameter_overrides=_params(use_sim_time=True))
    ns = "/rover_0"
    topics = {
        f"{ns}/sync/image": Image,
        f"{ns}/sync/depth": Image,
        f"{ns}/sync/camera_info": CameraInfo,
        f"{ns}/sync/imu": Imu,
        f"{ns}/sync/joint_states": JointState,
        f"{ns}/odom/fused": Odometry,
        f"{ns}/odom": Odometry,
        "/diagnostics": DiagnosticArray,
    }
    try:
        got = spin([sim, sync], 6.0, topics)
        summary = sync.sync.summary()
    finally:
        sync.destroy_node()
        sim.destroy_node()
    images = [_ns(m) for m in got[f"{ns}/sync/image"]]
    assert len(images) >= 30, f"only {len(images)} synced images in 6 s"
    tick = S // 100  # the sim's camera fires on its 100 Hz step grid
    assert all(s % tick == 0 for s in images)
    assert 0.060 <= np.median(np.diff(images)) / S <= 0.075
    image_set = set(images)
    streams, released = summary["streams"], summary["frames_released"]
    for topic in ("sync/depth", "sync/camera_info", "sync/imu", "sync/joint_states"):
        stamps = [_ns(m) for m in got[f"{ns}/{topic}"]]
        assert set(stamps) <= image_set, topic  # never a stamp of its own
        # best effort may lose a few; a frame goes without IMU when the IMU is late by more than
        # max_wait_s (a loaded machine: one executor drains every node of this test)
        share = streams["imu"]["used"] / released if topic == "sync/imu" else 1.0
        assert len(set(stamps) & image_set) >= 0.9 * share * len(images), f"{topic}: {len(stamps)} {summary}"
    assert streams["imu"]["used"] >= 0.5 * released, summary
    # fused odometry against the ground truth and the sim's wheel odometry at the same stamps, both
    # relative to the first common stamp
    fused = {_ns(m): _pose(m) for m in got[f"{ns}/odom/fused"]}
    sim_odom = {_ns(m): _pose(m) for m in got[f"{ns}/odom"]}
    common = sorted(set(fused) & set(truth) & set(sim_odom))
    assert len(common) >= 100, f"{len(common)} common odometry stamps"
    rel_fused = _relative([fused[t] for t in common])
    rel_truth = _relative([truth[t] for t in common])
    rel_wheels = _relative([sim_odom[t] for t in common])
    worst = 0.0
    for f, t, w in zip(rel_fused, rel_truth, rel_wheels):
        travelled = math.hypot(t[0], t[1])
        error = math.hypot(f[0] - t[0], f[1] - t[1])
        worst = max(worst, error)
        assert error < 0.05 + 0.03 * travelled
        assert abs(wrap_angle(f[2] - t[2])) < 0.05
        assert math.hypot(f[0] - w[0], f[1] - w[1]) < 0.05 + 0.03 * travelled
    moved = max(math.hypot(t[0], t[1]) for t in rel_truth)
    assert moved > 0.3, "the rover did not move: nothing was tested"
    last = got[f"{ns}/odom/fused"][-1]
    assert last.header.frame_id == "odom" and last.child_frame_id == "base_link"
    assert last.pose.covariance[0] > 0 and last.twist.covariance[35] > 0
    ours = [a for a in got["/diagnostics"] if a.status and a.status[0].name == "sensor_sync_node: rover_0"]
    assert ours, "no sensor_sync_node diagnostics"
    values = _values(ours[-1].status[0])
    # stamp-time rates over the last 64 messages (a loaded machine may lose a few best-effort ones)
    assert float(values["image_rate_hz"]) == pytest.approx(15.0, rel=0.2)
    assert float(values["imu_rate_hz"]) == pytest.approx(100.0, rel=0.5)
    print(
        f"sensor_sync_node with sim: {len(images)} synced frames, {len(common)} odometry stamps, "
        f"moved {moved:.2f} m, worst position error vs truth {worst:.3f} m, "
        f"frames with IMU {streams['imu']['used']}/{released}, status {ours[-1].status[0].message!r}"
    )
