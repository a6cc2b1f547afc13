"""sim_node over ROS 2: does it keep real time with N rovers? Both renderers, side by side.

sim_node runs in its own process (as ``ros2 run`` starts it) with ``real_time_factor:=1.0``; this process
subscribes to every rover's ``camera/image_raw`` (sensor QoS) and ``/clock``. After a warm-up, for
``--seconds`` of wall time it counts: simulated seconds per wall second (``/clock``), camera frames per
second per rover as received, and the CPU time the sim_node process used. A node that keeps real time shows
1.00 and 15 Hz per rover. DDS on loopback, own ROS_DOMAIN_ID. No pass/fail: figures only.

Run: .venv/bin/python bench/bench_sim_node.py [--rovers 3] [--seconds 20] [--renderers opengl tiny]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from forest_perception.rosenv import apply_loopback_environment  # noqa: E402


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds so far of a process and its live children (render workers), from /proc."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # a process that ended meanwhile
            continue
        if stat.parent.name == str(pid) or fields[1] == str(pid):
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def measure(renderer: str, rovers: int, seconds: float, warmup_s: float, seed: int) -> dict:
    """Start sim_node, listen, return its real-time factor, camera rates and CPU use."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.qos import qos_profile_sensor_data
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import Image

    names = [f"rover_{i}" for i in range(rovers)]
    cmd = [sys.executable, "-m", "forest_perception.nodes.sim_node", "--ros-args",
           "-p", f"seed:={seed}", "-p", f"rover_names:=[{','.join(names)}]", "-p", f"renderer:={renderer}",
           "-p", "real_time_factor:=1.0", "-p", "camera_rate_hz:=15.0", "-p", "frame_prefix:=true"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rclpy.init()
    node = Node("bench_sim_node_listener")
    counts = dict.fromkeys(names, 0)
    clock: list[tuple[float, float]] = []  # (wall, sim)

    def on_image(name: str):  # noqa: ANN202 - a callback factory
        def cb(_msg: Image) -> None:
            counts[name] += 1
        return cb

    subs = [node.create_subscription(Image, f"/{n}/camera/image_raw", on_image(n), qos_profile_sensor_data)
            for n in names]
    node.create_subscription(Clock, "/clock", lambda m: clock.append(
        (time.perf_counter(), m.clock.sec + m.clock.nanosec * 1e-9)), 10)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        deadline = time.perf_counter() + 120.0
        while not clock and time.perf_counter() < deadline and proc.poll() is None:
            executor.spin_once(timeout_sec=0.1)
        if not clock:
            raise RuntimeError(f"sim_node ({renderer}) published no /clock: {proc.stderr.read()[-2000:]}")
        end_warmup = time.perf_counter() + warmup_s
        while time.perf_counter() < end_warmup:
            executor.spin_once(timeout_sec=0.05)
        start_counts, start_clock, cpu0 = dict(counts), clock[-1], _cpu_s(proc.pid)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            executor.spin_once(timeout_sec=0.05)
        wall = time.perf_counter() - t0
        cpu = _cpu_s(proc.pid) - cpu0
        end_clock = clock[-1]
    finally:
        for sub in subs:
            node.destroy_subscription(sub)
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    rates = {n: (counts[n] - start_counts[n]) / wall for n in names}
    return {"rtf": (end_clock[1] - start_clock[1]) / max(end_clock[0] - start_clock[0], 1e-9),
            "rates": rates, "cpu_cores": cpu / wall}


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rovers", type=int, nargs="+", default=[3], help="rover counts (default 3)")
    parser.add_argument("--seconds", type=float, default=20.0, help="wall seconds measured per run")
    parser.add_argument("--warmup", type=float, default=5.0, help="wall seconds after the first /clock, not counted")
    parser.add_argument("--renderers", nargs="+", choices=("opengl", "tiny"), default=["opengl", "tiny"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if any(n < 1 for n in args.rovers):
        parser.error(f"--rovers must all be >= 1, got {args.rovers}")
    log_dir = Path(tempfile.mkdtemp(prefix="bench_sim_node_"))
    apply_loopback_environment(int(os.environ.get("BENCH_ROS_DOMAIN_ID", "87")), log_dir)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}; sim_node real_time_factor 1.0, camera 15 Hz 320x240, "
          f"render_workers -1 (opengl: inline for one rover, 1 process for more; tiny: 2)")
    print(f"{'renderer':>8} {'rovers':>6} {'real-time factor':>17} {'camera Hz per rover (received)':>32} "
          f"{'sim_node CPU cores':>19}")  # render workers included
    for rovers in args.rovers:
        for renderer in args.renderers:
            r = measure(renderer, rovers, args.seconds, args.warmup, args.seed)
            rates = " ".join(f"{v:.1f}" for v in r["rates"].values())
            print(f"{renderer:>8} {rovers:>6} {r['rtf']:>17.2f} {rates:>32} {r['cpu_cores']:>19.2f}")


if __name__ == "__main__":
    main()
