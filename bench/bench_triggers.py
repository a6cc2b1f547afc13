"""Triggers live: a simulated rover drives with depth_node, trigger_node and two capture_nodes, one recording
everything and one recording only the frames trigger_node marks; both bags are extracted.

One process, one executor (as ``forest_perception.demo.swarm`` drives its rovers): sim_node (one rover,
``--style`` forest), depth_node (``--model``, one thread), trigger_node (config/rover.yaml's defaults),
capture_node in ``/rover_0`` with ``record_mode:=marked`` and a second capture_node in ``/full`` recording the
same topics in full. Printed: frames seen and kept (by reason), both bags' size, what extract makes of each,
the trigger's time per frame, the marked recorder's counters. No pass/fail: figures only.

Run: .venv/bin/python bench/bench_triggers.py [--seconds 40] [--camera-rate 5] [--style clustered_regrowth]
     [--model autoencoder_160x128] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from forest_perception.rosenv import apply_loopback_environment  # noqa: E402

TOPICS = ["camera/image_raw", "camera/camera_info", "camera/depth/image_raw", "imu/data", "gps/fix", "joint_states",
          "odom"]


def bag_mb(path: Path) -> float:
    """Size of a bag's MCAP files, MB."""
    return sum(p.stat().st_size for p in path.glob("*.mcap")) / 1e6


def drive(args: argparse.Namespace, out: Path) -> dict:
    """Run the nodes for ``args.seconds`` of simulated time; their counters."""
    import rclpy
    import yaml
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter
    from rosgraph_msgs.msg import Clock

    from forest_perception.nodes.capture_node import CaptureNode
    from forest_perception.nodes.common import close_nodes
    from forest_perception.nodes.depth_node import DepthNode
    from forest_perception.nodes.sim_node import SimNode
    from forest_perception.nodes.trigger_node import TriggerNode

    def params(**values: object) -> list:
        return [Parameter(k, value=v) for k, v in values.items()]

    rover_yaml = yaml.safe_load((ROOT / "config" / "rover.yaml").read_text())
    trigger_params = {k: v for k, v in rover_yaml["/**/trigger_node"]["ros__parameters"].items()}
    rclpy.init()
    sim = SimNode(parameter_overrides=params(seed=args.seed, style=args.style, rover_names=["rover_0"],
                                             camera_rate_hz=float(args.camera_rate)))
    depth = DepthNode(namespace="rover_0", parameter_overrides=params(model_path=args.model, threads=1,
                                                                      publish_points=False, publish_scan=False))
    trigger = TriggerNode(namespace="rover_0", parameter_overrides=params(**trigger_params))
    marked = CaptureNode(namespace="rover_0", parameter_overrides=params(
        output_dir=str(out), bag_name="marked", record_mode="marked", min_free_space_mb=256))
    full = CaptureNode(namespace="full", parameter_overrides=params(
        output_dir=str(out), bag_name="full", topics=[f"/rover_0/{t}" for t in TOPICS], min_free_space_mb=256))
    decide_s = []
    original = trigger._decide

    def timed(stamp: int, slot: dict) -> None:
        start = time.perf_counter()
        original(stamp, slot)
        decide_s.append(time.perf_counter() - start)

    trigger._decide = timed
    clock = {"first": None, "now": 0.0}

    def on_clock(msg: Clock) -> None:
        now = msg.clock.sec + msg.clock.nanosec * 1e-9
        clock["first"] = now if clock["first"] is None else clock["first"]
        clock["now"] = now

    listener = rclpy.create_node("bench_triggers_clock")
    listener.create_subscription(Clock, "/clock", on_clock, 10)
    executor = SingleThreadedExecutor()
    nodes = [sim, depth, trigger, marked, full, listener]
    for node in nodes:
        executor.add_node(node)
    t0 = time.perf_counter()
    try:
        while clock["now"] - (clock["first"] if clock["first"] is not None else clock["now"]) < args.seconds:
            executor.spin_once(timeout_sec=0.05)
            if time.perf_counter() > t0 + 120 + 20 * args.seconds:
                raise RuntimeError("the drive did not reach its simulated time")
        wall = time.perf_counter() - t0
        sim_s = clock["now"] - (clock["first"] or 0.0)
        spin_until = time.perf_counter() + 3.0  # the marked frames leave the delay line
        while time.perf_counter() < spin_until:
            executor.spin_once(timeout_sec=0.05)
        marked.stop()
        full.stop()
        _, _, marked_values = marked.diagnostics_values()
        result = {"wall_s": wall, "sim_s": sim_s,
                  "trigger": trigger.trigger.stats.as_dict(), "malformed": dict(trigger.malformed),
                  "decide_ms": 1e3 * sum(decide_s) / max(len(decide_s), 1),
                  "gate": {k: v for k, v in marked_values.items() if k.startswith("marked ")}}
    finally:
        close_nodes(executor, nodes)
    return result


def main() -> None:
    """Drive, record both ways, extract both bags, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=40.0, help="simulated seconds of driving")
    parser.add_argument("--camera-rate", type=float, default=5.0, help="camera rate, Hz")
    parser.add_argument("--style", default="clustered_regrowth", help="forest style")
    parser.add_argument("--seed", type=int, default=11, help="forest seed")
    parser.add_argument("--model", default="autoencoder_160x128", help="depth_node's model (a shipped name)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the bags and datasets in this folder")
    args = parser.parse_args()
    out = args.keep or Path(tempfile.mkdtemp(prefix="bench-triggers-"))
    shutil.rmtree(out / "full", ignore_errors=True)
    shutil.rmtree(out / "marked", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    apply_loopback_environment(int(os.environ.get("ROS_DOMAIN_ID") or random.randint(30, 99)), out / "ros_log")
    figures = drive(args, out)

    from forest_perception.dataset_tools.extract import ExtractConfig, extract_bag

    frames = {}
    for name in ("full", "marked"):
        shutil.rmtree(out / f"{name}_dataset", ignore_errors=True)
        report = extract_bag(out / name, out / f"{name}_dataset", ExtractConfig(run=1, segment_frames=15))
        frames[name] = report.frames_written
    t = figures["trigger"]
    print(f"# triggers live: {args.seconds:g} s simulated ({figures['sim_s']:.0f} s) in {figures['wall_s']:.0f} s "
          f"wall, {args.style} seed {args.seed}, camera {args.camera_rate:g} Hz 320x240, depth_node {args.model}")
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs")
    print(f"trigger_node: {t['frames']} frames decided, {t['kept']} kept "
          f"({', '.join(f'{k[5:]} {v}' for k, v in t.items() if k.startswith('kept ') and v)}), skipped "
          f"{', '.join(f'{k[8:]} {v}' for k, v in t.items() if k.startswith('skipped ') and v)}; "
          f"malformed {sum(figures['malformed'].values())}; {figures['decide_ms']:.1f} ms a decision")
    print(f"full bag:   {bag_mb(out / 'full'):7.1f} MB, extract -> {frames['full']} frames")
    print(f"marked bag: {bag_mb(out / 'marked'):7.1f} MB, extract -> {frames['marked']} frames "
          f"({100 * bag_mb(out / 'marked') / max(bag_mb(out / 'full'), 1e-9):.0f} % of the bytes)")
    g = figures["gate"]
    print("capture_node (marked): " + ", ".join(f"{k[7:]} {v:.1f}" if isinstance(v, float) else f"{k[7:]} {v}"
                                                for k, v in g.items()))
    if args.keep is None:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
