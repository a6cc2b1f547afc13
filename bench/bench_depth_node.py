"""depth_node end to end over ROS 2 on loopback: 320x240 camera at 30 Hz in, depth/image out.

For each model the depth node runs in this process (one executor thread as ``rclpy.spin`` in
production, plus its worker thread: points and scan on) and a camera process (spawned, so it does
not compete for the node's GIL) publishes ``camera/image_raw`` (rgb8) and ``camera/camera_info``
at 30 Hz stamped with the wall clock, and subscribes ``depth/image``. Over the measured window
(after a warm-up) it reports: frames published / received / processed / skipped (node counters),
the processed and output rates, the latency from image stamp to the node's ``depth/image``
publish (the issue's figure) and to its receipt back in the camera process, the engine's
inference-only latency inside the node, and peak RSS. The model's standalone latency
(``OnnxDepthEngine.predict`` on the same frames, same thread count) is measured in the same run,
so the goal checks are side by side:

    p95 stamp->publish < 2x model latency      (model latency = standalone predict() median)
    rate held: processed >= 0.95 x 30 Hz

Frames: 60 rgb frames from /work/data/forest_test (held-out) when present, else rendered once
with the simulator (seed 900, 320x240, every few camera frames).

Run: .venv/bin/python bench/bench_depth_node.py [--seconds 15] [--models multiscale_320x240_int8 b.onnx] [--threads 2]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import random
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from forest_perception.rosenv import apply_loopback_environment  # noqa: E402

DEFAULT_MODELS = (
    "multiscale_320x240.onnx",
    "multiscale_320x240_int8.onnx",
    "autoencoder_320x240.onnx",
    "autoencoder_160x128_int8.onnx",
)
WIDTH, HEIGHT = 320, 240
FRAME_ID = "camera_color_optical_frame"
TEST_DATA = Path("/work/data/forest_test")


# ------------------------------------------------------------------------------------------- frames
def load_test_frames(n: int) -> list[np.ndarray]:
    """``n`` 320x240 rgb frames spread over the held-out test set (empty when it is absent)."""
    from PIL import Image as PILImage

    files = sorted(TEST_DATA.glob("*/*/rgb_image/*.png")) if TEST_DATA.is_dir() else []
    if not files:
        return []
    picks = [files[i] for i in np.linspace(0, len(files) - 1, min(n, len(files))).astype(int)]
    frames = []
    for f in picks:
        im = PILImage.open(f).convert("RGB")
        if im.size != (WIDTH, HEIGHT):
            im = im.resize((WIDTH, HEIGHT), PILImage.BILINEAR)
        frames.append(np.asarray(im, dtype=np.uint8).copy())
    return frames


def render_frames(n: int, seed: int, every: int = 4) -> list[np.ndarray]:
    """``n`` rgb frames from the simulator (one exploring rover, world ``seed``), every ``every``-th camera frame."""
    from forest_perception.frames import CameraIntrinsics
    from forest_perception.sim.simulator import ForestSimulator, SimConfig
    from forest_perception.sim.world import generate_world

    frames: list[np.ndarray] = []
    seen = 0
    with ForestSimulator(generate_world(seed=seed), SimConfig(camera=CameraIntrinsics(WIDTH, HEIGHT))) as sim:
        while len(frames) < n:
            for event in sim.step(render=True):
                if event.kind == "camera":
                    if seen % every == 0:
                        frames.append(np.ascontiguousarray(event.data.rgb, dtype=np.uint8))
                    seen += 1
    return frames[:n]


# ---------------------------------------------------------------------------------------- publisher
def publisher_main(domain_id: int, log_dir: str, frames_path: str, rate_hz: float, warmup_s: float,
                   seconds: float, subscribed: mp.Event, started: mp.Event, ended: mp.Event,
                   result: mp.Queue) -> None:
    """Camera publisher process: wait for the depth node, publish warm-up then the measured window."""
    apply_loopback_environment(domain_id, log_dir)
    import rclpy
    import rclpy.executors
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import CameraInfo, Image

    from forest_perception import msgs
    from forest_perception.frames import CameraIntrinsics

    frames = np.load(frames_path)
    rclpy.init()
    node = rclpy.create_node("bench_camera")
    image_pub = node.create_publisher(Image, "camera/image_raw", qos_profile_sensor_data)
    info_pub = node.create_publisher(CameraInfo, "camera/camera_info", qos_profile_sensor_data)
    received: list[tuple[int, int]] = []  # (stamp ns, receipt wall ns) of depth/image, here: not in the node's GIL

    def on_depth(msg: Image) -> None:
        now = time.time_ns()
        received.append((msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec, now))

    node.create_subscription(Image, "depth/image", on_depth, qos_profile_sensor_data)
    executor = rclpy.executors.SingleThreadedExecutor()
    executor.add_node(node)
    spin = threading.Thread(target=executor.spin, name="bench_sink", daemon=True)
    spin.start()
    intrinsics = CameraIntrinsics(WIDTH, HEIGHT)
    deadline = time.monotonic() + 30.0
    while image_pub.get_subscription_count() < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    subscribed.set()
    period = 1.0 / rate_hz
    published = 0
    window = [0, 0]  # wall-clock ns of the measured window's first and last stamps
    start = time.monotonic()
    next_t = start
    i = 0
    while True:
        now = time.monotonic()
        elapsed = now - start
        if elapsed >= warmup_s + seconds:
            break
        stamp_ns = time.time_ns()
        stamp = msgs.time_from_ns(stamp_ns)
        image_pub.publish(msgs.image_from_array(frames[i % len(frames)], "rgb8", stamp, FRAME_ID))
        info_pub.publish(msgs.camera_info_from_intrinsics(intrinsics, stamp, FRAME_ID))
        i += 1
        if elapsed >= warmup_s:
            if published == 0:
                window[0] = stamp_ns
                started.set()
            window[1] = stamp_ns
            published += 1
        next_t += period
        sleep = next_t - time.monotonic()
        if sleep > 0:
            time.sleep(sleep)
        else:
            next_t = time.monotonic()  # fell behind: do not burst to catch up
    ended.set()
    time.sleep(0.5)  # let the last frames go out, and their depth come back, before the node goes away
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    result.put({"published": published, "window_ns": tuple(window), "total": i, "peak_rss_mb": peak_rss_mb,
                "received": list(received)})
    executor.shutdown(timeout_sec=2.0)
    node.destroy_node()
    rclpy.try_shutdown()


# ------------------------------------------------------------------------------------------ helpers
class RecordingEngine:
    """The loaded engine, recording ``last_latency_ms`` and the whole ``predict()`` of each call."""

    def __init__(self, engine: object) -> None:
        self._engine = engine
        self.samples: list[tuple[float, float, float]] = []  # (monotonic end, inference ms, predict ms)

    def __getattr__(self, name: str) -> object:
        return getattr(self._engine, name)

    def predict(self, rgb: np.ndarray) -> np.ndarray:
        """The wrapped engine's predict(), timed."""
        t0 = time.perf_counter()
        depth = self._engine.predict(rgb)
        t1 = time.perf_counter()
        self.samples.append((time.monotonic(), float(self._engine.last_latency_ms), (t1 - t0) * 1e3))
        return depth


def standalone_latency(path: Path, frames: list[np.ndarray], threads: int, runs: int) -> tuple[float, float]:
    """Median predict() ms and median inference-only ms of ``OnnxDepthEngine`` on the frames."""
    from forest_perception.inference import OnnxDepthEngine

    engine = OnnxDepthEngine(path, threads=threads)
    for k in range(5):
        engine.predict(frames[k % len(frames)])
    total, infer = [], []
    for k in range(runs):
        t0 = time.perf_counter()
        engine.predict(frames[k % len(frames)])
        total.append((time.perf_counter() - t0) * 1e3)
        infer.append(engine.last_latency_ms)
    return float(np.median(total)), float(np.median(infer))


def rss_mb() -> tuple[float, float]:
    """(current VmRSS, peak VmHWM) of this process in MiB."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                values[line.split(":")[0]] = float(line.split()[1]) / 1024.0
    return values.get("VmRSS", float("nan")), values.get("VmHWM", float("nan"))


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# ------------------------------------------------------------------------------------------ one run
def run_model(model: Path, args: argparse.Namespace, domain_id: int, log_dir: str, frames_path: str) -> dict:
    """Depth node on ``model`` fed at ``args.rate`` Hz by a publisher process; the measured figures."""
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter

    from forest_perception.nodes.depth_node import DepthNode, load_inference_engine

    engines: list[RecordingEngine] = []

    def loader(path: str, backend: str, providers: tuple[str, ...], threads: int) -> RecordingEngine:
        engines.append(RecordingEngine(load_inference_engine(path, backend, providers, threads)))
        return engines[-1]

    node = DepthNode(engine_loader=loader, parameter_overrides=[
        Parameter("model_path", value=str(model)),
        Parameter("threads", value=int(args.threads)),
    ])
    published_at: list[tuple[int, int]] = []  # (stamp ns, wall ns when depth/image publish() returned)
    depth_publish = node.depth_pub.publish

    def publish_and_record(msg: object) -> None:
        depth_publish(msg)
        published_at.append((msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec, time.time_ns()))

    node.depth_pub.publish = publish_and_record
    executor = SingleThreadedExecutor()  # as rclpy.spin() in production
    executor.add_node(node)
    spin = threading.Thread(target=executor.spin, name="bench_executor", daemon=True)
    spin.start()

    ctx = mp.get_context("spawn")
    subscribed, started, ended, result = ctx.Event(), ctx.Event(), ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=publisher_main, args=(domain_id, log_dir, frames_path, args.rate, args.warmup,
                                                    args.seconds, subscribed, started, ended, result), daemon=True)
    proc.start()
    # the measured window starts after warm-up: snapshot the node's counters then
    if not subscribed.wait(timeout=60.0):
        raise RuntimeError("publisher process never saw the depth node's subscription")
    if not started.wait(timeout=args.warmup + 30.0):
        raise RuntimeError("publisher process never started its measured window")
    before = dict(node.counts)  # counters at the first measured frame (it may already be counted: off by one)
    t_window0 = time.monotonic()
    ended.wait(timeout=args.seconds + 30.0)
    t_window1 = time.monotonic()
    time.sleep(0.15)  # the frame in flight at the end still belongs to the window
    after = dict(node.counts)
    stats = result.get(timeout=30.0)
    time.sleep(0.3)  # drain the last depth frames in flight
    level, message, diag = node.diagnostics_values()
    proc.join(timeout=10.0)
    rss_now, rss_peak = rss_mb()

    executor.shutdown(timeout_sec=2.0)
    spin.join(timeout=5.0)
    node.destroy_node()

    w0, w1 = stats["window_ns"]
    in_window = [(s, r) for s, r in stats["received"] if w0 <= s <= w1]
    latency_ms = [(r - s) * 1e-6 for s, r in in_window]
    publish_ms = [(p - s) * 1e-6 for s, p in published_at if w0 <= s <= w1]
    window_s = max((w1 - w0) * 1e-9, 1e-9)
    engine = engines[-1] if engines else None
    node_samples = [x for x in (engine.samples if engine else []) if t_window0 <= x[0] <= t_window1 + 1.0]
    delta = {k: after[k] - before[k] for k in after}
    measured_s = stats["published"] / args.rate  # the publisher's window, one period per frame
    return {
        "published": stats["published"],
        "pub_rate_hz": (stats["published"] - 1) / window_s if stats["published"] > 1 else 0.0,
        "received": delta["received"],
        "processed": delta["processed"],
        "skipped": delta["skipped"],
        "malformed": delta["malformed"],
        "errors": delta["inference_errors"],
        "processed_hz": delta["processed"] / measured_s,
        "out_hz": (len(in_window) - 1) / window_s if len(in_window) > 1 else 0.0,
        "depth_msgs": len(in_window),
        "pub_p50": pct(publish_ms, 50),
        "pub_p95": pct(publish_ms, 95),
        "lat_p50": pct(latency_ms, 50),
        "lat_p95": pct(latency_ms, 95),
        "node_infer_p50": pct([x[1] for x in node_samples], 50),
        "node_infer_p95": pct([x[1] for x in node_samples], 95),
        "node_predict_p50": pct([x[2] for x in node_samples], 50),
        "diag_level": int(level[0] if isinstance(level, bytes) else level),
        "diag_message": message,
        "diag_stamp_p95": float(diag["stamp_to_publish_ms_p95"]),
        "diag_recv_p50": float(diag["latency_ms_p50"]),
        "diag_recv_p95": float(diag["latency_ms_p95"]),
        "rss_now_mb": rss_now,
        "rss_peak_mb": rss_peak,
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "pub_rss_mb": stats["peak_rss_mb"],
    }


def _run_model_process(model: str, args: argparse.Namespace, domain_id: int, log_dir: str, frames_path: str,
                       result: mp.Queue) -> None:
    """The depth node in a process of its own, as on a rover: its RSS is the node's alone."""
    apply_loopback_environment(domain_id, log_dir)
    import rclpy

    rclpy.init()
    try:
        figures = run_model(Path(model), args, domain_id, log_dir, frames_path)
        import sys as _sys

        figures["heavy_modules"] = ",".join(m for m in ("torch", "open3d", "pybullet", "flwr") if m in _sys.modules)
        result.put(figures)
    finally:
        rclpy.try_shutdown()


def run_model_isolated(model: Path, args: argparse.Namespace, domain_id: int, log_dir: str,
                       frames_path: str) -> dict:
    """:func:`run_model` in a fresh spawned process (so earlier models and the bench add no memory)."""
    ctx = mp.get_context("spawn")
    result = ctx.Queue()
    proc = ctx.Process(target=_run_model_process, args=(str(model), args, domain_id, log_dir, frames_path, result))
    proc.start()
    try:
        return result.get(timeout=args.warmup + args.seconds + 180.0)
    finally:
        proc.join(timeout=30.0)


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    """Print the benchmark table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                        help="model files, or names of shipped models (models/weights)")
    parser.add_argument("--seconds", type=float, default=15.0, help="measured seconds per model")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds published before measuring")
    parser.add_argument("--rate", type=float, default=30.0, help="camera rate (Hz)")
    parser.add_argument("--threads", type=int, default=2, help="inference threads (node and standalone)")
    parser.add_argument("--frames", type=int, default=60, help="distinct camera frames, cycled")
    parser.add_argument("--runs", type=int, default=60, help="standalone predict() runs per model")
    parser.add_argument("--seed", type=int, default=900, help="world seed when frames are rendered")
    parser.add_argument("--render", action="store_true", help="render frames even when the test set exists")
    parser.add_argument("--domain-id", type=int, default=None, help="ROS_DOMAIN_ID (default random 30..99)")
    args = parser.parse_args()

    from forest_perception.models.weights import shipped_model

    models = []
    for name in args.models:
        try:
            models.append(Path(name) if Path(name).is_file() else shipped_model(name))
        except FileNotFoundError as exc:
            parser.error(str(exc))

    domain_id = args.domain_id if args.domain_id is not None else random.randint(30, 99)
    tmp = tempfile.TemporaryDirectory(prefix="bench_depth_node_")
    log_dir = str(Path(tmp.name) / "ros_log")
    apply_loopback_environment(domain_id, log_dir)

    t0 = time.perf_counter()
    frames = [] if args.render else load_test_frames(args.frames)
    source = f"{len(frames)} frames from {TEST_DATA} (held out)"
    if not frames:
        frames = render_frames(args.frames, args.seed)
        source = f"{len(frames)} frames rendered, world seed {args.seed}"
    frames_path = str(Path(tmp.name) / "frames.npy")
    np.save(frames_path, np.stack(frames))
    source += f", {time.perf_counter() - t0:.1f} s"

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
          f"(affinity {len(os.sched_getaffinity(0))}), python {platform.python_version()}")
    print(f"ROS_DOMAIN_ID {domain_id} on loopback; camera {WIDTH}x{HEIGHT} rgb8 at {args.rate:g} Hz from a "
          f"separate process; {args.warmup:g} s warm-up + {args.seconds:g} s measured per model; "
          f"inference threads {args.threads}; node publishes depth/image + points + scan")
    print(f"frames: {source}")
    print()

    rows = []
    for model in models:
        model_ms, model_infer_ms = standalone_latency(model, frames, args.threads, args.runs)
        r = run_model_isolated(model, args, domain_id, log_dir, frames_path)
        r.update(model=model.name, model_ms=model_ms, model_infer_ms=model_infer_ms)
        rows.append(r)
        print(f"  {model.name}: done ({r['depth_msgs']} depth frames received)", flush=True)

    print()
    print("pub = image stamp (wall clock when the camera published) -> depth/image published by the node (the "
          "issue's latency); recv = -> depth/image received back in the camera process; model = standalone "
          "OnnxDepthEngine.predict() median (infer = network only)")
    header = (f"{'model':<30} {'model ms':>8} {'infer':>6} {'node inf':>8} {'pub':>4} {'recv':>4} {'proc':>4} "
              f"{'skip':>4} {'proc Hz':>7} {'out Hz':>6} {'pub p50':>7} {'pub p95':>7} {'recv p50':>8} "
              f"{'recv p95':>8} {'RSS MiB':>7} {'peak':>6} {'p95<2x':>6} {'rate':>5}")
    print(header)
    print("-" * len(header))
    for r in rows:
        p95_ok = r["pub_p95"] < 2.0 * r["model_ms"]
        rate_ok = r["processed_hz"] >= 0.95 * args.rate
        print(f"{r['model']:<30} {r['model_ms']:>8.1f} {r['model_infer_ms']:>6.1f} {r['node_infer_p50']:>8.1f} "
              f"{r['published']:>4} {r['received']:>4} {r['processed']:>4} {r['skipped']:>4} "
              f"{r['processed_hz']:>7.1f} {r['out_hz']:>6.1f} {r['pub_p50']:>7.1f} {r['pub_p95']:>7.1f} "
              f"{r['lat_p50']:>8.1f} {r['lat_p95']:>8.1f} {r['rss_now_mb']:>7.0f} {r['rss_peak_mb']:>6.0f} "
              f"{'yes' if p95_ok else 'NO':>6} {'yes' if rate_ok else 'NO':>5}")
    print()
    print("node inf = the engine's inference-only ms p50 inside the node (slower than standalone when it shares "
          "the cores with the executor, points/scan and the publisher); RSS = the node's own process (one per "
          "model, as on a rover) at the end / peak")
    print()
    print("memory goal: depth_node under 200 MiB resident (the forest-depth paper's auto-encoder on a Pi 4: ~200 MB)")
    for r in rows:
        print(f"  {r['model']:<30} peak RSS {r['rss_peak_mb']:5.0f} MiB  {'yes' if r['rss_peak_mb'] < 200 else 'NO'}"
              f"  heavy modules loaded: {r['heavy_modules'] or 'none'}")
    for r in rows:
        extra = []
        if r["malformed"] or r["errors"]:
            extra.append(f"malformed {r['malformed']}, inference errors {r['errors']}")
        if r["diag_level"] != 0:
            extra.append(f"diagnostics level {r['diag_level']}: {r['diag_message']}")
        print(f"  {r['model']}: publisher {r['pub_rate_hz']:.1f} Hz; node predict() p50 {r['node_predict_p50']:.1f} ms,"
              f" inference p95 {r['node_infer_p95']:.1f} ms; node receipt->publish p50/p95 {r['diag_recv_p50']:.1f}/"
              f"{r['diag_recv_p95']:.1f} ms (the rest of the latency is transport and the executor); "
              f"publisher process peak RSS {r['pub_rss_mb']:.0f} MiB"
              + ("; " + "; ".join(extra) if extra else ""))
    tmp.cleanup()


if __name__ == "__main__":
    main()
