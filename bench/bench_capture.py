"""capture_node throughput over ROS 2 on loopback: the rover's sensor streams at full rate into an MCAP bag.

A publisher process (spawned, so it does not share this process's GIL) publishes, stamped with the
wall clock, ``camera/image_raw`` (rgb8) + ``camera/camera_info`` and ``camera/depth/image_raw``
(32FC1) at 30 Hz, ``imu/data`` at 200 Hz, ``gps/fix`` at 10 Hz and ``joint_states`` at 50 Hz. It
starts once capture_node (in this process, spun by one executor thread as ``ros2 run`` does) has
subscribed to every topic, publishes for ``--seconds``, and reports what it published per topic.
The bag is then closed and read back (``forest_perception.dataset_tools.bags.bag_info``). Printed per resolution:
published / received / written / dropped (writer queue full) / lost in transport (publisher
sequence gaps) per topic, write rate in MB/s, CPU of the capture process and of the publisher
(% of one core), the writer queue's peak and the bag size. No pass/fail: figures only.

Run: .venv/bin/python bench/bench_capture.py [--seconds 10] [--resolutions 320x240 640x480]
     [--compression none|zstd] [--keep DIR]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from forest_perception.rosenv import apply_loopback_environment  # noqa: E402

NAMESPACE = "rover_0"
STREAMS = {  # topic -> rate (Hz); the camera_info goes with each colour frame
    "camera/image_raw": 30.0,
    "camera/depth/image_raw": 30.0,
    "imu/data": 200.0,
    "gps/fix": 10.0,
    "joint_states": 50.0,
}
TOPICS = ["camera/image_raw", "camera/camera_info", "camera/depth/image_raw", "imu/data", "gps/fix", "joint_states"]


def make_frames(width: int, height: int, n: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rgb frames (smooth gradient + sensor noise, compresses like a real image) and depth maps (m, NaN holes)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgbs, depths = [], []
    for k in range(n):
        base = np.stack([x / width * 120 + 40, y / height * 160 + 30, (x + y) / (width + height) * 90 + 20], -1)
        rgb = np.clip(base + rng.normal(0, 6, base.shape) + k * 3, 0, 255).astype(np.uint8)
        depth = (0.5 + 9.5 * (1.0 - y / height) + rng.normal(0, 0.02, (height, width))).astype(np.float32)
        depth[rng.random((height, width)) < 0.03] = np.nan
        rgbs.append(rgb)
        depths.append(depth)
    return np.stack(rgbs), np.stack(depths)


# ---------------------------------------------------------------------------------------- publisher
def publisher_main(domain_id: int, log_dir: str, width: int, height: int, seconds: float,
                   ready: mp.Event, result: mp.Queue) -> None:
    """Publish every stream at its rate once capture_node listens on all of them; report counts and CPU."""
    apply_loopback_environment(domain_id, log_dir)
    import rclpy
    from rclpy.qos import QoSProfile, qos_profile_sensor_data
    from sensor_msgs.msg import CameraInfo, Image, Imu, JointState, NavSatFix

    from forest_perception import msgs
    from forest_perception.frames import CameraIntrinsics

    rgbs, depths = make_frames(width, height)
    rclpy.init()
    node = rclpy.create_node("bench_sensors", namespace=NAMESPACE)
    sensor, reliable = qos_profile_sensor_data, QoSProfile(depth=50)
    pubs = {
        "camera/image_raw": node.create_publisher(Image, "camera/image_raw", sensor),
        "camera/camera_info": node.create_publisher(CameraInfo, "camera/camera_info", sensor),
        "camera/depth/image_raw": node.create_publisher(Image, "camera/depth/image_raw", sensor),
        "imu/data": node.create_publisher(Imu, "imu/data", sensor),
        "gps/fix": node.create_publisher(NavSatFix, "gps/fix", sensor),
        "joint_states": node.create_publisher(JointState, "joint_states", reliable),
    }
    deadline = time.monotonic() + 60.0
    while any(p.get_subscription_count() < 1 for p in pubs.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # the matched subscriptions also need the publishers matched on their side
    ready.set()
    intrinsics = CameraIntrinsics(width, height)
    counts = dict.fromkeys(pubs, 0)
    late_ms: list[float] = []
    start = time.monotonic()
    due = dict.fromkeys(STREAMS, start)
    cpu0 = time.process_time()
    k = 0
    while True:
        now = time.monotonic()
        if now - start >= seconds:
            break
        topic = min(due, key=due.get)
        wait = due[topic] - now
        if wait > 0:
            time.sleep(wait)
        late_ms.append(max(0.0, time.monotonic() - due[topic]) * 1e3)
        stamp = msgs.time_from_ns(time.time_ns())
        if topic == "camera/image_raw":
            pubs[topic].publish(msgs.image_from_array(rgbs[k % len(rgbs)], "rgb8", stamp, "camera_color_optical_frame"))
            pubs["camera/camera_info"].publish(
                msgs.camera_info_from_intrinsics(intrinsics, stamp, "camera_color_optical_frame"))
            counts["camera/camera_info"] += 1
            k += 1
        elif topic == "camera/depth/image_raw":
            pubs[topic].publish(msgs.image_from_array(depths[k % len(depths)], "32FC1", stamp,
                                                      "camera_color_optical_frame"))
        elif topic == "imu/data":
            msg = Imu()
            msg.header.stamp, msg.header.frame_id = stamp, "imu_link"
            msg.linear_acceleration.z = 9.81
            pubs[topic].publish(msg)
        elif topic == "gps/fix":
            msg = NavSatFix()
            msg.header.stamp, msg.header.frame_id = stamp, "gps_link"
            msg.latitude, msg.longitude, msg.altitude = 47.0, 8.0, 400.0
            pubs[topic].publish(msg)
        else:
            msg = JointState()
            msg.header.stamp = stamp
            msg.name = ["wheel_fl", "wheel_fr", "wheel_rl", "wheel_rr"]
            msg.position, msg.velocity = [0.1, 0.2, 0.3, 0.4], [1.0, 1.0, 1.0, 1.0]
            pubs[topic].publish(msg)
        counts[topic] += 1
        due[topic] += 1.0 / STREAMS[topic]
        if due[topic] < time.monotonic() - 0.5:  # far behind: do not burst to catch up
            due[topic] = time.monotonic()
    elapsed = time.monotonic() - start
    cpu = time.process_time() - cpu0
    time.sleep(0.5)  # let the last messages go out before the publishers go away
    result.put({"counts": counts, "seconds": elapsed, "cpu_pct": 100.0 * cpu / elapsed,
                "late_p95_ms": float(np.percentile(late_ms, 95)) if late_ms else 0.0})
    node.destroy_node()
    rclpy.try_shutdown()


# ------------------------------------------------------------------------------------------ one run
def run_resolution(width: int, height: int, args: argparse.Namespace, domain_id: int, log_dir: str,
                   out_dir: Path) -> dict:
    """capture_node recording the publisher process at ``width``x``height``; the measured figures."""
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter

    from forest_perception.dataset_tools.bags import bag_info
    from forest_perception.nodes.capture_node import CaptureNode

    bag_name = f"capture_{width}x{height}_{args.compression}"
    node = CaptureNode(namespace=NAMESPACE, parameter_overrides=[
        Parameter("topics", value=TOPICS),
        Parameter("output_dir", value=str(out_dir)),
        Parameter("bag_name", value=bag_name),
        Parameter("compression", value=args.compression),
        Parameter("max_split_size_mb", value=int(args.split_mb)),
        Parameter("min_free_space_mb", value=256),
        Parameter("topic_check_period_s", value=0.2),
    ])
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    spin = threading.Thread(target=executor.spin, name="bench_capture_executor", daemon=True)
    spin.start()

    ctx = mp.get_context("spawn")
    ready, result = ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=publisher_main, args=(domain_id, log_dir, width, height, args.seconds, ready, result))
    proc.start()
    if not ready.wait(timeout=90.0):
        proc.kill()
        raise RuntimeError("the publisher never saw capture_node subscribe to every topic")
    cpu0, t0 = time.process_time(), time.monotonic()
    stats_pub = result.get(timeout=args.seconds + 60.0)
    time.sleep(0.3)  # the last messages in flight
    cpu1, t1 = time.process_time(), time.monotonic()
    recorder = node.recorder
    peak_queue = recorder.stats.queue_peak_bytes if recorder is not None else 0
    lost = dict(node.transport_lost)
    close0 = time.monotonic()
    ok, message = node.stop()
    close_s = time.monotonic() - close0
    stats = node.last_stats
    proc.join(timeout=10.0)
    executor.shutdown(timeout_sec=2.0)
    spin.join(timeout=5.0)
    node.destroy_node()
    if not ok or stats is None:
        raise RuntimeError(f"stopping capture_node failed: {message}")
    info = bag_info(out_dir / bag_name)
    return {
        "pub": stats_pub,
        "stats": stats,
        "lost": lost,
        "info": info,
        "cpu_pct": 100.0 * (cpu1 - cpu0) / (t1 - t0),
        "window_s": stats_pub["seconds"],
        "peak_queue_mb": peak_queue / 1e6,
        "close_s": close_s,
    }


def main() -> None:
    """Print the benchmark tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds published per resolution")
    parser.add_argument("--resolutions", nargs="+", default=["320x240", "640x480"], help="WIDTHxHEIGHT list")
    parser.add_argument("--compression", choices=["none", "zstd"], default="none", help="MCAP chunk compression")
    parser.add_argument("--split-mb", type=int, default=512, help="max_split_size_mb of capture_node")
    parser.add_argument("--keep", default="", help="keep the bags in this folder (default: a temporary one)")
    parser.add_argument("--domain-id", type=int, default=None, help="ROS_DOMAIN_ID (default random 30..99)")
    args = parser.parse_args()

    domain_id = args.domain_id if args.domain_id is not None else random.randint(30, 99)
    tmp = tempfile.TemporaryDirectory(prefix="bench_capture_")
    log_dir = str(Path(tmp.name) / "ros_log")
    apply_loopback_environment(domain_id, log_dir)
    out_dir = Path(args.keep) if args.keep else Path(tmp.name) / "bags"
    out_dir.mkdir(parents=True, exist_ok=True)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
          f"(affinity {len(os.sched_getaffinity(0))}), python {platform.python_version()}")
    print(f"ROS_DOMAIN_ID {domain_id} on loopback; {args.seconds:g} s per resolution; publisher in a separate "
          f"process; capture_node here with one executor thread + its writer thread; compression {args.compression}")
    print("streams: rgb8 + camera_info + depth 32FC1 at 30 Hz, imu 200 Hz, gps 10 Hz, joint_states 50 Hz")

    import rclpy

    rclpy.init()
    try:
        for text in args.resolutions:
            width, height = (int(v) for v in text.lower().split("x"))
            r = run_resolution(width, height, args, domain_id, log_dir, out_dir)
            stats, info = r["stats"], r["info"]
            bag_counts = {t.name: t.message_count for t in info.topics}
            print()
            print(f"== {width}x{height}: published for {r['window_s']:.1f} s ==")
            header = f"{'topic':<32} {'published':>9} {'received':>8} {'written':>8} {'dropped':>7} {'lost':>5} " \
                     f"{'in bag':>7} {'MB':>8}"
            print(header)
            print("-" * len(header))
            for rel in TOPICS:
                name = f"/{NAMESPACE}/{rel}"
                topic = stats.topics.get(name)
                if topic is None:
                    print(f"{name:<32} {r['pub']['counts'][rel]:>9} (never subscribed)")
                    continue
                print(f"{name:<32} {r['pub']['counts'][rel]:>9} {topic.received:>8} {topic.written:>8} "
                      f"{topic.dropped:>7} {r['lost'].get(name, 0):>5} {bag_counts.get(name, 0):>7} "
                      f"{topic.bytes / 1e6:>8.1f}")
            published = sum(r["pub"]["counts"].values())
            print(f"total: published {published}, written {stats.written}, dropped {stats.dropped}, "
                  f"lost in transport {sum(r['lost'].values())}")
            print(f"write rate {stats.bytes_written / 1e6 / r['window_s']:.1f} MB/s; bag {info.size / 1e6:.1f} MB in "
                  f"{len(info.files)} file(s), {'ok' if info.ok else 'PROBLEMS: ' + '; '.join(info.problems)}; "
                  f"writer queue peak {r['peak_queue_mb']:.1f} MB; close took {r['close_s']:.2f} s")
            print(f"CPU: capture process {r['cpu_pct']:.0f}% of one core, publisher process "
                  f"{r['pub']['cpu_pct']:.0f}%; publisher lateness p95 {r['pub']['late_p95_ms']:.1f} ms")
    finally:
        rclpy.try_shutdown()
        if not args.keep:
            shutil.rmtree(out_dir, ignore_errors=True)
        tmp.cleanup()


if __name__ == "__main__":
    main()
