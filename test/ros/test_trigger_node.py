"""trigger_node drives capture_node's marked recording: only the frames the trigger keeps reach the bag."""

from __future__ import annotations

import time

import cv2
import numpy as np

OPTICAL = "camera_color_optical_frame"
H, W = 120, 160


def _params(**values):
    from rclpy.parameter import Parameter

    return [Parameter(k, value=v) for k, v in values.items()]


def scene(seed: int, noise: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Trunks of random colours on a ground gradient with fine texture, and their depth."""
    rng = np.random.default_rng(seed)
    rgb = np.empty((H, W, 3), np.float32)
    rgb[:] = rng.uniform(40, 200, 3)
    depth = np.repeat(np.linspace(12.0, 0.5, H, dtype=np.float32)[:, None], W, 1)
    for _ in range(5):
        x, w = int(rng.integers(0, W - 20)), int(rng.integers(6, 30))
        rgb[:, x:x + w] = rng.uniform(20, 230, 3)
        depth[:, x:x + w] = rng.uniform(1.0, 8.0)
    rgb += np.random.default_rng(1000 + seed).normal(0, 18, (H, W, 1))
    if noise is not None:
        rgb += np.random.default_rng(noise).normal(0, 2, (H, W, 1))
    return np.clip(rgb, 0, 255).astype(np.uint8), depth


# (scene, sensor-noise seed, blur sigma, predicted/measured scale) per frame, one a second; and what to expect
FRAMES = [
    (1, None, 0.0, 1.0),   # 0: first
    (1, 1, 0.0, 1.05),     # 1: the same view, the network right: redundant
    (2, None, 3.0, 1.0),   # 2: a new view, motion-blurred: blurry
    (3, None, 0.0, 1.0),   # 3: a new view: novel
    (3, 2, 0.0, 1.8),      # 4: the same view again, but the network is 80 % off: disagreement
]
KEPT = {0: "first,novel", 3: "novel", 4: "disagreement"}


def test_trigger_node_marks_what_capture_node_records(rclpy_context, tmp_path):
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, qos_profile_sensor_data
    from sensor_msgs.msg import Image
    from std_msgs.msg import Header

    from forest_perception import msgs
    from forest_perception.dataset_tools.bags import read_bag
    from forest_perception.nodes.capture_node import CaptureNode
    from forest_perception.nodes.trigger_node import TriggerNode

    capture = CaptureNode(context=rclpy_context, namespace="rover_0", parameter_overrides=_params(
        topics=["camera/image_raw", "camera/depth/image_raw"], output_dir=str(tmp_path), bag_name="marked",
        record_mode="marked", mark_delay_s=0.5, topic_check_period_s=0.1, min_free_space_mb=1))
    trigger = TriggerNode(context=rclpy_context, namespace="rover_0", parameter_overrides=_params(
        duplicate_distance=0.0, max_keep_rate_hz=0.0, max_gap_s=0.0, spacing_m=0.0, prediction_wait_s=5.0,
        pair_timeout_s=5.0, gps_topic=""))
    probe = rclpy.create_node("trigger_probe", namespace="rover_0", context=rclpy_context)
    pubs = {name: probe.create_publisher(Image, topic, qos_profile_sensor_data) for name, topic in
            (("image", "camera/image_raw"), ("depth", "camera/depth/image_raw"), ("predicted", "depth/image"))}
    marks: list = []
    probe.create_subscription(Header, "capture/mark", marks.append, QoSProfile(depth=100))
    executor = SingleThreadedExecutor(context=rclpy_context)
    for node in (capture, trigger, probe):
        executor.add_node(node)

    def spin(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.01)

    try:
        deadline = time.monotonic() + 10.0
        while (len(capture._topic_subs) < 2 or any(p.get_subscription_count() < 1 for p in pubs.values())) \
                and time.monotonic() < deadline:
            spin(0.05)
        assert len(capture._topic_subs) == 2, capture._waiting
        spin(0.2)
        for k, (seed, noise, blur, scale) in enumerate(FRAMES):
            rgb, depth = scene(seed, noise)
            if blur:
                rgb = cv2.GaussianBlur(rgb, (0, 0), blur)
            stamp = msgs.time_from_sec(100.0 + k)
            for _attempt in range(3):  # best effort on loopback: publish again if a message was lost
                pubs["image"].publish(msgs.image_from_array(rgb, "rgb8", stamp, OPTICAL))
                pubs["depth"].publish(msgs.image_from_array(depth, "32FC1", stamp, OPTICAL))
                pubs["predicted"].publish(msgs.image_from_array(depth * np.float32(scale), "32FC1", stamp, OPTICAL))
                deadline = time.monotonic() + 3.0
                while trigger.trigger.stats.frames <= k and time.monotonic() < deadline:
                    spin(0.02)
                if trigger.trigger.stats.frames > k:
                    break
            assert trigger.trigger.stats.frames == k + 1, f"frame {k} was never decided"
        # a malformed colour image (data shorter than step * height) is dropped and counted
        bad = msgs.image_from_array(scene(9)[0], "rgb8", msgs.time_from_sec(200.0), OPTICAL)
        bad.data = bytes(bad.data)[:-10]
        pubs["image"].publish(bad)
        deadline = time.monotonic() + 3.0
        while trigger.malformed["image"] < 1 and time.monotonic() < deadline:
            spin(0.02)
        spin(1.0)  # the marked frames leave the capture node's delay line
        ok, message = capture.stop()
        assert ok, message
    finally:
        for node in (capture, trigger, probe):
            executor.remove_node(node)
            node.destroy_node()
        executor.shutdown()

    counts = trigger.trigger.stats.as_dict()
    assert counts["kept"] == 3 and counts["skipped redundant"] == 1 and counts["skipped blurry"] == 1
    assert trigger.malformed["image"] == 1
    level, _, values = trigger.diagnostics_values()
    assert values["malformed image"] == 1 and values["kept disagreement"] == 1 and level != 0
    assert {round(m.stamp.sec + m.stamp.nanosec * 1e-9) - 100: m.frame_id for m in marks} == KEPT

    recorded = {}
    for item in read_bag(tmp_path / "marked"):
        stamp = round(item.message.header.stamp.sec + item.message.header.stamp.nanosec * 1e-9) - 100
        recorded.setdefault(item.topic, []).append(stamp)
    assert recorded == {"/rover_0/camera/image_raw": [0, 3, 4], "/rover_0/camera/depth/image_raw": [0, 3, 4]}
    _, _, cap_values = capture.diagnostics_values()
    assert cap_values["marked marks"] == 3 and cap_values["marked frames_written"] == 6
    # frames 1 and 2 (colour and depth) and the malformed image were held and discarded
    assert cap_values["marked discarded"] >= 5 and cap_values["marked late_marks"] == 0


def test_capture_node_default_mode_has_no_mark_service(rclpy_context, tmp_path):
    from forest_perception.nodes.capture_node import CaptureNode

    node = CaptureNode(context=rclpy_context, parameter_overrides=_params(output_dir=str(tmp_path), autostart=False))
    try:
        assert node.p["record_mode"] == "all" and not node.mark(123)
        assert not any(name.endswith("/mark") for name, _ in node.get_service_names_and_types_by_node(
            "capture_node", "/"))
    finally:
        node.destroy_node()
