"""Demo step: sim_node, depth_node, sensor_sync_node and capture_node on one rover, heard over ROS 2."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from forest_perception import topics

ROVER = "rover_0"


@dataclass
class DriveResult:
    """What a listener heard during the drive, and what the nodes reported."""

    wall_s: float
    sim_s: float
    rates: dict[str, float]
    last: dict[str, Any]
    track: list[tuple[float, float]] = field(default_factory=list)
    live: dict[str, float] | None = None
    depth_images: int = 0
    collided: bool = False
    sync: dict[str, Any] = field(default_factory=dict)
    capture: Any = None


def _stamp_key(msg: Any) -> tuple[int, int]:  # noqa: ANN401 - any stamped message
    return msg.header.stamp.sec, msg.header.stamp.nanosec


def drive_over_ros(seed: int, seconds: float, weather: str, model_path: str, bag_dir: Path | None = None,
                   progress_every_s: float = 5.0) -> DriveResult:
    """Run the rover's nodes in one executor for ``seconds`` of wall time; count and keep what arrives.

    depth_node's output is scored live against the simulated RealSense depth of the same stamp;
    the rover's true track comes from sim_node's ``ground_truth/odom``.
    """
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from nav_msgs.msg import Odometry
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import CameraInfo, Image, Imu, JointState, NavSatFix

    from forest_perception.models.metrics import MetricAccumulator
    from forest_perception.msgs import array_from_image
    from forest_perception.nodes.capture_node import CaptureNode
    from forest_perception.nodes.common import close_nodes
    from forest_perception.nodes.depth_node import DepthNode
    from forest_perception.nodes.sensor_sync_node import SensorSyncNode
    from forest_perception.nodes.sim_node import SimNode

    ns = f"/{ROVER}/"
    heard = {
        topics.CAMERA_IMAGE: Image, topics.CAMERA_INFO: CameraInfo, topics.CAMERA_DEPTH: Image, topics.IMU: Imu,
        topics.GPS: NavSatFix, topics.JOINT_STATES: JointState, topics.ODOM: Odometry, "odom/fused": Odometry,
        "sync/image": Image, topics.DEPTH_IMAGE: Image, topics.GROUND_TRUTH: Odometry,
    }
    reliable = {topics.JOINT_STATES, topics.ODOM, "odom/fused", topics.GROUND_TRUTH}

    rclpy.init()
    nodes = [
        SimNode(parameter_overrides=[Parameter("seed", value=seed), Parameter("weather", value=[weather]),
                                     Parameter("rover_names", value=[ROVER])]),
        SensorSyncNode(namespace=ROVER, parameter_overrides=[Parameter("use_sim_time", value=True)]),
        DepthNode(namespace=ROVER, parameter_overrides=[Parameter("model_path", value=model_path)]),
    ]
    capture = None
    if bag_dir is not None:
        capture = CaptureNode(namespace=ROVER, parameter_overrides=[
            Parameter("output_dir", value=str(bag_dir.parent)), Parameter("bag_name", value=bag_dir.name),
            Parameter("max_split_duration_s", value=10.0), Parameter("min_free_space_mb", value=256)])
        nodes.append(capture)
    listener = rclpy.create_node("demo_listener")
    counts: dict[str, int] = defaultdict(int)
    last: dict[str, Any] = {}
    track: list[tuple[float, float]] = []
    clock = {"first": None, "now": 0.0}
    collided = {"any": False}
    live = MetricAccumulator(min_depth=0.1, max_depth=10.0)
    sensor_by_stamp: dict[tuple[int, int], Image] = {}

    def hear(name: str):  # noqa: ANN202 - a subscription callback
        def callback(msg: Any) -> None:  # noqa: ANN401
            counts[name] += 1
            last[name] = msg
            if name == topics.GROUND_TRUTH:
                track.append((msg.pose.pose.position.x, msg.pose.pose.position.y))
            elif name == topics.CAMERA_DEPTH:
                sensor_by_stamp[_stamp_key(msg)] = msg
                while len(sensor_by_stamp) > 60:
                    sensor_by_stamp.pop(next(iter(sensor_by_stamp)))
            elif name == topics.DEPTH_IMAGE:
                truth = sensor_by_stamp.get(_stamp_key(msg))
                if truth is not None:
                    predicted = array_from_image(msg)
                    live.update(np.where(np.isfinite(predicted), predicted, 10.0),
                                np.nan_to_num(array_from_image(truth), nan=0.0))
        return callback

    def on_clock(msg: Clock) -> None:
        now = msg.clock.sec + msg.clock.nanosec * 1e-9
        clock["first"] = now if clock["first"] is None else clock["first"]
        clock["now"] = now

    def on_diagnostics(msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name == f"sim_node: {ROVER}":
                values = {kv.key: kv.value for kv in status.values}
                collided["any"] |= values.get("collided") == "True"

    # best effort like the publishers' sensor QoS, with a deep queue so the demo's own listener drops nothing
    sensor_qos = QoSProfile(depth=500, reliability=ReliabilityPolicy.BEST_EFFORT)
    for name, kind in heard.items():
        listener.create_subscription(kind, ns + name, hear(name), QoSProfile(depth=100) if name in reliable
                                     else sensor_qos)
    listener.create_subscription(Clock, topics.CLOCK, on_clock, QoSProfile(depth=10))
    listener.create_subscription(DiagnosticArray, topics.DIAGNOSTICS, on_diagnostics, QoSProfile(depth=50))
    executor = SingleThreadedExecutor()
    for node in (*nodes, listener):
        executor.add_node(node)
    t0 = time.perf_counter()
    next_print = t0 + progress_every_s
    try:
        while time.perf_counter() - t0 < seconds:
            executor.spin_once(timeout_sec=0.05)
            if time.perf_counter() >= next_print:
                next_print += progress_every_s
                x, y = track[-1] if track else (float("nan"), float("nan"))
                score = live.result() if counts[topics.DEPTH_IMAGE] else None
                print(f"  t_sim={clock['now'] - (clock['first'] or 0.0):6.1f} s  rover at ({x:6.2f}, {y:6.2f}) m  "
                      f"frames={counts[topics.CAMERA_IMAGE]}  depth_node: {counts[topics.DEPTH_IMAGE]} depth images"
                      + (f", live absrel {score['absrel']:.3f} delta1 {score['delta1']:.3f}" if score else ""),
                      flush=True)
        wall = time.perf_counter() - t0
        if capture is not None:
            capture.stop()
        sync_values = nodes[1].diagnostics_values()[2]
    finally:
        close_nodes(executor, (*nodes, listener))
    sim_s = clock["now"] - (clock["first"] or clock["now"])
    return DriveResult(
        wall_s=wall, sim_s=sim_s, rates={name: counts[name] / max(sim_s, 1e-9) for name in heard},
        last=last, track=track, live=live.result() if counts[topics.DEPTH_IMAGE] else None,
        depth_images=counts[topics.DEPTH_IMAGE], collided=collided["any"], sync=sync_values,
        capture=capture.last_stats if capture is not None else None,
    )
