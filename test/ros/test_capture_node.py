"""capture_node in-process: records published topics with their QoS, services, read back exactly by other readers."""

from __future__ import annotations

import time

import numpy as np
import pytest

OPTICAL = "camera_color_optical_frame"


def _params(**values):
    from rclpy.parameter import Parameter

    return [Parameter(k, value=v) for k, v in values.items()]


class Probe:
    """A publisher node (camera 320x240 rgb8 at 30 Hz, best effort; IMU at 100 Hz, reliable) and service clients."""

    def __init__(self, context, capture_name: str = "/rover_0/capture_node") -> None:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile, qos_profile_sensor_data
        from sensor_msgs.msg import Image, Imu
        from std_srvs.srv import SetBool, Trigger

        self.node = rclpy.create_node("capture_probe", namespace="rover_0", context=context)
        self.image_pub = self.node.create_publisher(Image, "camera/image_raw", qos_profile_sensor_data)
        self.imu_pub = self.node.create_publisher(Imu, "imu/data", QoSProfile(depth=100))
        self.clients = {
            "start": self.node.create_client(Trigger, f"{capture_name}/start"),
            "stop": self.node.create_client(Trigger, f"{capture_name}/stop"),
            "split": self.node.create_client(Trigger, f"{capture_name}/split"),
            "pause": self.node.create_client(SetBool, f"{capture_name}/pause"),
        }
        self.publishing = False
        self.images: dict[int, np.ndarray] = {}  # stamp ns -> pixels published
        self.imu_stamps: list[int] = []
        self.paused_stamps: set[int] = set()
        self.in_pause = False
        self.diagnostics: list = []
        self._rng = np.random.default_rng(7)
        self._n = 0
        self.node.create_timer(1.0 / 30.0, self._publish_image)
        self.node.create_timer(1.0 / 100.0, self._publish_imu)
        from diagnostic_msgs.msg import DiagnosticArray

        self.node.create_subscription(DiagnosticArray, "/diagnostics", self.diagnostics.append, 50)
        self.executor = SingleThreadedExecutor(context=context)

    def _stamp(self) -> int:
        return self.node.get_clock().now().nanoseconds

    def _publish_image(self) -> None:
        from forest_perception import msgs

        if not self.publishing:
            return
        stamp = self._stamp()
        pixels = self._rng.integers(0, 256, size=(240, 320, 3), dtype=np.uint8)
        self.image_pub.publish(msgs.image_from_array(pixels, "rgb8", msgs.time_from_ns(stamp), OPTICAL))
        self.images[stamp] = pixels
        if self.in_pause:
            self.paused_stamps.add(stamp)

    def _publish_imu(self) -> None:
        from sensor_msgs.msg import Imu

        from forest_perception import msgs

        if not self.publishing:
            return
        stamp = self._stamp()
        msg = Imu()
        msg.header.stamp = msgs.time_from_ns(stamp)
        msg.header.frame_id = "imu_link"
        msg.linear_acceleration.z = 9.81 + len(self.imu_stamps) * 1e-3
        self.imu_pub.publish(msg)
        self.imu_stamps.append(stamp)
        if self.in_pause:
            self.paused_stamps.add(stamp)

    def spin(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.executor.spin_once(timeout_sec=0.005)

    def wait_matched(self, camera: bool = True, timeout: float = 10.0) -> None:
        """Spin until the recorder's subscriptions are matched by the publishers (no message lost to discovery)."""
        publishers = [self.imu_pub, self.image_pub] if camera else [self.imu_pub]
        deadline = time.monotonic() + timeout
        while any(p.get_subscription_count() < 1 for p in publishers) and time.monotonic() < deadline:
            self.spin(0.02)
        assert all(p.get_subscription_count() >= 1 for p in publishers), "recorder never matched the publishers"
        self.spin(0.1)

    def call(self, name: str, data: bool | None = None, timeout: float = 10.0):
        client = self.clients[name]
        assert client.wait_for_service(timeout_sec=5.0), f"service {name} not available"
        request = client.srv_type.Request()
        if data is not None:
            request.data = data
        future = client.call_async(request)
        self.executor.spin_until_future_complete(future, timeout_sec=timeout)
        assert future.done(), f"service {name} did not answer"
        return future.result()


def test_records_topics_with_qos_services_and_exact_pixels(rclpy_context, tmp_path):
    import yaml
    from diagnostic_msgs.msg import DiagnosticStatus
    from rosbags.rosbag2 import Reader
    from sensor_msgs.msg import Image

    from forest_perception import msgs
    from forest_perception.dataset_tools.bags import bag_info, read_bag
    from forest_perception.nodes.capture_node import CaptureNode

    node = CaptureNode(
        context=rclpy_context,
        namespace="rover_0",
        parameter_overrides=_params(
            topics=["camera/image_raw", "imu/data", "gps/fix"],
            output_dir=str(tmp_path),
            bag_name="drive",
            topic_check_period_s=0.1,
            diagnostics_period_s=0.2,
            min_free_space_mb=1,
        ),
    )
    probe = Probe(rclpy_context)
    probe.executor.add_node(node)
    probe.executor.add_node(probe.node)
    try:
        # publishers appear after the node started: it subscribes when they are advertised
        deadline = time.monotonic() + 10.0
        while len(node._topic_subs) < 2 and time.monotonic() < deadline:
            probe.spin(0.05)
        assert set(node._topic_subs) == {"/rover_0/camera/image_raw", "/rover_0/imu/data"}
        assert "/rover_0/gps/fix" in node._waiting  # never advertised
        probe.wait_matched()
        probe.publishing = True
        probe.spin(1.5)
        probe.publishing = False
        probe.spin(0.3)

        response = probe.call("pause", True)
        assert response.success and "paused" in response.message
        probe.publishing, probe.in_pause = True, True
        probe.spin(0.5)
        probe.publishing, probe.in_pause = False, False
        probe.spin(0.3)
        assert probe.call("pause", False).success

        response = probe.call("split")
        assert response.success and "drive_0.mcap" in response.message, response.message
        probe.publishing = True
        probe.spin(1.0)
        probe.publishing = False
        probe.spin(0.5)
        level, _, values = node.diagnostics_values()
        assert level == DiagnosticStatus.WARN and "waiting /rover_0/gps/fix" in values  # a topic never came

        response = probe.call("stop")
        assert response.success, response.message
        assert not probe.call("stop").success  # nothing to stop any more
        probe.spin(0.3)
    finally:
        probe.executor.remove_node(node)
        node.destroy_node()
        probe.node.destroy_node()
        probe.executor.shutdown()

    stats = node.last_stats
    bag = tmp_path / "drive"
    assert stats is not None and stats.state == "closed" and stats.dropped == 0
    assert sum(node.transport_lost.values()) == 0
    assert [p.name for p in sorted(bag.glob("*.mcap"))] == ["drive_0.mcap", "drive_1.mcap"]

    # read back with our reader: pixels and stamps exactly as published, nothing from the paused window
    images = list(read_bag(bag, topics=["/rover_0/camera/image_raw"]))
    published = len(probe.images) - len(probe.paused_stamps & set(probe.images))
    assert 0.9 * published <= len(images) <= published
    for item in images:
        stamp = item.message.header.stamp.sec * 1_000_000_000 + item.message.header.stamp.nanosec
        assert stamp in probe.images and stamp not in probe.paused_stamps
        image = Image(height=item.message.height, width=item.message.width, encoding=item.message.encoding,
                           step=item.message.step, data=item.message.data.tobytes())
        np.testing.assert_array_equal(msgs.array_from_image(image), probe.images[stamp])
    imu = [m for m in read_bag(bag, topics=["/rover_0/imu/data"])]
    imu_published = len(probe.imu_stamps) - len(probe.paused_stamps & set(probe.imu_stamps))
    assert len(imu) == imu_published  # reliable: every one outside the pause
    stamps = [m.message.header.stamp.sec * 1_000_000_000 + m.message.header.stamp.nanosec for m in imu]
    assert stamps == [s for s in probe.imu_stamps if s not in probe.paused_stamps]
    assert all(m.message.header.frame_id == "imu_link" for m in imu)
    log_times = [m.log_time_ns for m in read_bag(bag)]
    assert log_times == sorted(log_times)

    # read back by rosbags: offered QoS of each publisher, types, counts
    with Reader(bag) as reader:
        conns = {c.topic: c for c in reader.connections}
        assert conns["/rover_0/camera/image_raw"].msgtype == "sensor_msgs/msg/Image"
        assert conns["/rover_0/camera/image_raw"].msgcount == len(images)
        assert conns["/rover_0/imu/data"].msgcount == len(imu)
        image_qos = conns["/rover_0/camera/image_raw"].ext.offered_qos_profiles
        imu_qos = conns["/rover_0/imu/data"].ext.offered_qos_profiles
        assert len(image_qos) == 1 and image_qos[0].reliability.name == "BEST_EFFORT"
        assert len(imu_qos) == 1 and imu_qos[0].reliability.name == "RELIABLE"
        assert conns["/rover_0/imu/data"].digest.startswith("RIHS01_")
        assert sum(1 for _ in reader.messages()) == len(images) + len(imu)
    info = bag_info(bag)
    assert info.ok, info.problems
    assert info.message_count == len(images) + len(imu)
    metadata = yaml.safe_load((bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert metadata["custom_data"]["namespace"] == "/rover_0"
    assert metadata["relative_file_paths"] == ["drive_0.mcap", "drive_1.mcap"]
    ours = [a for a in probe.diagnostics if a.status and a.status[0].name == "capture_node: rover_0"]
    assert ours, "no capture_node diagnostics"
    keys = {kv.key for kv in ours[-1].status[0].values}
    for key in ("state", "messages_written", "messages_dropped", "messages_lost_in_transport", "write_rate_mb_s",
                "disk_free_mb", "current_file", "topic /rover_0/camera/image_raw"):
        assert key in keys, key


def test_bad_parameters_are_refused(rclpy_context, tmp_path):
    from rclpy.parameter import Parameter

    from forest_perception.nodes.capture_node import CaptureNode

    with pytest.raises(ValueError, match="compression"):
        CaptureNode(context=rclpy_context, parameter_overrides=_params(compression="lz5", autostart=False))
    node = CaptureNode(context=rclpy_context, parameter_overrides=_params(output_dir=str(tmp_path), autostart=False))
    try:
        for name, value, reason in (
            ("compression", "gzip", "compression"),
            ("topics", ["camera/image raw"], "topics"),
            ("bag_name", "a/b", "bag_name"),
            ("output_dir", " ", "output_dir"),
        ):
            result = node.set_parameters([Parameter(name, value=value)])[0]
            assert not result.successful and reason in result.reason, (name, result.reason)
        assert not node.set_parameters([Parameter("max_split_size_mb", value=-1)])[0].successful  # range
        assert not node.set_parameters([Parameter("diagnostics_period_s", value=2.0)])[0].successful  # read-only
        assert node.set_parameters([Parameter("compression", value="zstd")])[0].successful
        assert node.p["compression"] == "zstd" and node.recorder is None
        assert node.stop() == (False, "not recording")
    finally:
        node.destroy_node()


def test_topic_names_resolve_without_resolve_topic_name(rclpy_context, monkeypatch):
    """Humble's rclpy lacks Node.resolve_topic_name: names are expanded by hand the same way."""
    from forest_perception.nodes.capture_node import CaptureNode

    node = CaptureNode(context=rclpy_context, namespace="rover_0", parameter_overrides=_params(autostart=False))
    try:
        expected = {t: node.resolve_topic_name(t) for t in ("camera/image_raw", "/odom", "~/status")}

        def missing(*_args, **_kwargs):
            raise AttributeError("resolve_topic_name")

        monkeypatch.setattr(node, "resolve_topic_name", missing)
        assert {t: node._resolve(t) for t in expected} == expected
        assert expected["camera/image_raw"] == "/rover_0/camera/image_raw"
        with pytest.raises(Exception, match="topic name"):
            node._resolve("camera/image raw")
    finally:
        node.destroy_node()


def test_start_refused_below_min_free_space_reports_error(rclpy_context, tmp_path):
    from diagnostic_msgs.msg import DiagnosticStatus

    from forest_perception.nodes.capture_node import CaptureNode

    # more free space than any test disk has: start must refuse and say why
    node = CaptureNode(
        context=rclpy_context,
        parameter_overrides=_params(output_dir=str(tmp_path), min_free_space_mb=1_000_000),
    )
    try:
        assert node.recorder is None
        level, message, _ = node.diagnostics_values()
        assert level == DiagnosticStatus.ERROR and "below the minimum" in message, message
        ok, message = node.start()
        assert not ok and "free disk space" in message
        assert list(tmp_path.iterdir()) == []  # no half-made bag left behind
    finally:
        node.destroy_node()


def test_disk_guard_closes_the_bag_and_reports_error(rclpy_context, tmp_path):
    from collections import namedtuple

    from diagnostic_msgs.msg import DiagnosticStatus

    from forest_perception.dataset_tools.bags import bag_info, read_bag
    from forest_perception.nodes.capture_node import CaptureNode

    Usage = namedtuple("Usage", "total used free")
    disk = {"free": 10**10}
    node = CaptureNode(
        disk_usage=lambda _path: Usage(10**11, 0, disk["free"]),
        context=rclpy_context,
        namespace="rover_0",
        parameter_overrides=_params(topics=["imu/data"], output_dir=str(tmp_path), bag_name="guard",
                                    min_free_space_mb=100, topic_check_period_s=0.1),
    )
    probe = Probe(rclpy_context)
    probe.executor.add_node(node)
    probe.executor.add_node(probe.node)
    try:
        deadline = time.monotonic() + 10.0
        while not node._topic_subs and time.monotonic() < deadline:
            probe.spin(0.05)
        probe.wait_matched(camera=False)
        probe.publishing = True
        probe.spin(0.5)
        assert node.recorder is not None and node.recorder.stats.written > 0
        disk["free"] = 50 * 10**6  # the disk fills up
        deadline = time.monotonic() + 5.0
        while node.recorder is not None and time.monotonic() < deadline:
            probe.spin(0.05)
        probe.publishing = False
        level, message, values = node.diagnostics_values()
    finally:
        probe.executor.remove_node(node)
        node.destroy_node()
        probe.node.destroy_node()
        probe.executor.shutdown()
    assert node.recorder is None and not node._topic_subs  # stopped by itself, subscriptions gone
    assert level == DiagnosticStatus.ERROR and "50 MB, below the minimum of 100 MB" in message, message
    assert values["state"] == "idle"
    bag = tmp_path / "guard"
    info = bag_info(bag)
    assert info.ok, info.problems  # closed cleanly: every file complete and listed
    assert len(list(read_bag(bag))) == node.last_stats.written > 0
