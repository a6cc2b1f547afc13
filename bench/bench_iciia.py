"""The latency ICIIA adds in depth_node: the shipped rover network against its ICIIA rover models, one run.

For the shipped ``autoencoder_160x128`` and its ICIIA rover model at each P (exported here from an untrained
module, or from ``--module`` files: the latency does not depend on the weights), it measures, in turns so that load
on the shared cores hits every model alike:

- ``engine``: the ONNX Runtime engine's inference alone (``predict``; for ICIIA with a full bank of K frames);
- ``node``: one frame through depth_node's worker (``DepthNode._process``: inference, masking, depth/image, points and
  scan published), in this process, without DDS in between.

and prints medians / p95 with the ratio to the shipped network side by side. For the end-to-end figure over DDS
(camera process at 30 Hz), give the printed ICIIA files to ``bench/bench_depth_node.py --models``.

Run: .venv/bin/python bench/bench_iciia.py [--partitions 1 4 16 64] [--runs 60] [--threads 2] [--module iciia.pt ...]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from forest_perception.rosenv import apply_loopback_environment  # noqa: E402

BASE = "autoencoder_160x128"
FRAME_ID = "camera_color_optical_frame"


def export_models(partitions: list[int], modules: list[str], bank: int, folder: Path) -> dict[str, Path]:
    """ICIIA rover models: one per P (untrained module) and one per ``--module`` file."""
    from forest_perception.models import iciia
    from forest_perception.models.iciia import IciiaSpec

    out = {}
    for p in partitions:
        spec = IciiaSpec(base=BASE, partitions=p, bank_capacity=bank)
        model, meta = iciia.build(spec)
        out[f"ICIIA P={p}"] = iciia.export_rover_model(model, spec, meta, folder / f"iciia_p{p}.onnx",
                                                       exporter="torchscript", command="bench_iciia")
    for module in modules:
        model, spec, _ = iciia.load_module(module)
        _base, meta = iciia.load_base(spec.base)
        out[f"{Path(module).stem} P={spec.partitions}"] = iciia.export_rover_model(
            model, spec, meta, folder / f"{Path(module).stem}.onnx", exporter="torchscript", command="bench_iciia")
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line entry."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--partitions", type=int, nargs="*", default=[1, 4, 16, 64])
    parser.add_argument("--module", nargs="*", default=[], help="trained ICIIA module files (forest-fl iciia train)")
    parser.add_argument("--bank", type=int, default=16, help="bank capacity K of the exported graphs")
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (depth_node's default)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-iciia-"))
    apply_loopback_environment(int(os.environ.get("ROS_DOMAIN_ID") or random.randint(30, 99)), tmp / "ros_log")
    import rclpy
    from rclpy.parameter import Parameter

    from forest_perception import msgs
    from forest_perception.inference import load_engine
    from forest_perception.models.weights import shipped_model
    from forest_perception.nodes.depth_node import DepthNode

    files = {"shipped": shipped_model(BASE), **export_models(args.partitions, args.module, args.bank, tmp)}
    frames = [np.random.default_rng(i).integers(0, 256, (240, 320, 3), dtype=np.uint8) for i in range(8)]
    engines = {label: load_engine(path, threads=args.threads) for label, path in files.items()}
    context = rclpy.Context()
    rclpy.init(context=context)
    nodes = {}
    try:
        for label, path in files.items():
            nodes[label] = DepthNode(context=context, parameter_overrides=[
                Parameter("model_path", value=str(path)), Parameter("threads", value=args.threads),
                Parameter("history_size", value=args.bank)])
            nodes[label].worker.stop()  # frames go straight to _process here, one at a time
        times: dict[str, dict[str, list[float]]] = {label: {"engine": [], "node": []} for label in files}
        for index in range(args.warmup + args.runs):
            rgb = frames[index % len(frames)]
            for label in files:
                start = time.perf_counter()
                engines[label].predict(rgb)
                engine_ms = (time.perf_counter() - start) * 1e3
                msg = msgs.image_from_array(rgb, "rgb8", msgs.time_from_sec(1.0 + index / 30), FRAME_ID)
                start = time.perf_counter()
                nodes[label]._process((rgb, msg, time.monotonic()))  # noqa: SLF001 - the worker's step, timed
                node_ms = (time.perf_counter() - start) * 1e3
                if index >= args.warmup:
                    times[label]["engine"].append(engine_ms)
                    times[label]["node"].append(node_ms)
        banks = {label: getattr(node._engine, "history_frames", "-") for label, node in nodes.items()}  # noqa: SLF001
    finally:
        for node in nodes.values():
            node.destroy_node()
        rclpy.try_shutdown(context=context)

    ref = {kind: float(np.median(times["shipped"][kind])) for kind in ("engine", "node")}
    print(f"ICIIA latency, {args.runs} frames 320x240 each, models in turns; ONNX Runtime {args.threads} thread(s); "
          f"{platform.machine()}, {os.cpu_count()} CPU(s), load {os.getloadavg()[0]:.1f}")
    header = (f"{'model':<24} {'bank':>5} {'engine median':>14} {'p95':>7} {'x shipped':>10} "
              f"{'node median':>12} {'p95':>7} {'x shipped':>10} {'added ms':>9}")
    print(header)
    for label, t in times.items():
        engine, node = np.asarray(t["engine"]), np.asarray(t["node"])
        print(f"{label:<24} {banks[label]!s:>5} {np.median(engine):>14.2f} {np.percentile(engine, 95):>7.2f} "
              f"{np.median(engine) / ref['engine']:>10.2f} {np.median(node):>12.2f} {np.percentile(node, 95):>7.2f} "
              f"{np.median(node) / ref['node']:>10.2f} {np.median(node) - ref['node']:>9.2f}")
    print("\nICIIA models (for bench/bench_depth_node.py --models):")
    for label, path in files.items():
        if label != "shipped":
            print(f"  {label}: {path}")


if __name__ == "__main__":
    main()
