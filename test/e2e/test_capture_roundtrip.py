"""Simulated rover -> capture_node -> bag -> forest-dataset extract: the published pixels and depth come back,
and the fresh recording passes validate before and after curate (frames before the first IMU message included)."""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
from rclpy.parameter import Parameter

from forest_perception import msgs
from forest_perception.dataset_tools.bags import bag_info
from forest_perception.dataset_tools.cli import main as dataset_cli
from forest_perception.dataset_tools.extract import ExtractConfig, extract_bag
from forest_perception.dataset_tools.layout import decode_depth_mm, encode_depth_mm, load_frame, open_dataset


def _params(**values):
    return [Parameter(k, value=v) for k, v in values.items()]


def test_sim_rover_recorded_and_extracted_exactly(rclpy_context, tmp_path, capsys):
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    from forest_perception.nodes.capture_node import CaptureNode
    from forest_perception.nodes.sim_node import SimNode

    sim = SimNode(
        context=rclpy_context,
        parameter_overrides=_params(
            world_size_m=24.0, camera_width=160, camera_height=120, render_workers=0, seed=5, real_time_factor=1.0,
            camera_rate_hz=10.0,
        ),
    )
    capture = CaptureNode(
        context=rclpy_context,
        namespace="rover_0",
        parameter_overrides=_params(output_dir=str(tmp_path), bag_name="drive", max_split_duration_s=2.0,
                                    min_free_space_mb=1, topic_check_period_s=0.2),
    )
    published: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
    listener = rclpy.create_node("roundtrip_listener", context=rclpy_context)
    qos = QoSProfile(depth=200, reliability=ReliabilityPolicy.BEST_EFFORT)
    for topic in ("camera/image_raw", "camera/depth/image_raw"):
        def keep(msg, topic=topic):  # noqa: ANN001, ANN202
            stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
            published[topic][stamp] = msgs.array_from_image(msg).copy()
        listener.create_subscription(Image, f"/rover_0/{topic}", keep, qos)
    executor = SingleThreadedExecutor(context=rclpy_context)
    for node in (sim, capture, listener):
        executor.add_node(node)
    try:
        deadline = time.monotonic() + 6.0
        while time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.01)
        ok, message = capture.stop()
        assert ok, message
        stats = capture.last_stats
    finally:
        for node in (sim, capture, listener):
            executor.remove_node(node)
            node.destroy_node()
        executor.shutdown()

    bag = tmp_path / "drive"
    info = bag_info(bag)
    assert info.ok, info.problems
    assert len(info.files) >= 2, "max_split_duration_s=2 over ~5 s of recording must split"
    assert stats.dropped == 0
    counts = {t.name: t.message_count for t in info.topics}
    for topic in ("/rover_0/camera/image_raw", "/rover_0/camera/depth/image_raw", "/rover_0/imu/data",
                  "/rover_0/gps/fix", "/rover_0/joint_states"):
        assert counts.get(topic, 0) > 0, f"{topic} not recorded: {counts}"

    report = extract_bag(bag, tmp_path / "dataset", ExtractConfig(run=1))
    assert report.frames_written >= 10, report.lines()
    assert not report.malformed, report.lines()
    compared = with_imu = 0
    for segment in open_dataset(tmp_path / "dataset").segments:
        for i, record in enumerate(segment.frames):
            stamp = int(record.extras["stamp_ns"])
            rgb, depth, _ = load_frame(segment, i)
            if stamp not in published["camera/image_raw"] or stamp not in published["camera/depth/image_raw"]:
                continue  # the listener may have missed a best-effort message the recorder got
            np.testing.assert_array_equal(rgb, published["camera/image_raw"][stamp])
            truth = decode_depth_mm(encode_depth_mm(published["camera/depth/image_raw"][stamp]))
            np.testing.assert_array_equal(np.isnan(depth), np.isnan(truth))
            np.testing.assert_array_equal(depth[np.isfinite(depth)], truth[np.isfinite(truth)])
            # a frame from before the first IMU message has none (empty cells); every other one a finite reading
            assert record.imu is None or np.isfinite(record.imu.linear_acceleration).all()
            with_imu += record.imu is not None
            assert record.encoders is not None and record.encoders.left_position is not None
            compared += 1
    assert compared >= 10 and with_imu >= compared - 5

    # record -> extract -> validate -> curate -> validate: a fresh recording is a valid dataset as it is
    dataset = str(tmp_path / "dataset")
    assert dataset_cli(["validate", dataset, "--quiet"]) == 0, capsys.readouterr()
    assert dataset_cli(["curate", dataset, "--out", str(tmp_path / "curated"), "--quiet"]) == 0, capsys.readouterr()
    assert dataset_cli(["validate", str(tmp_path / "curated"), "--quiet"]) == 0, capsys.readouterr()
