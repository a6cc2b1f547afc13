"""Depth network latency on this CPU: PyTorch eager vs ONNX Runtime fp32 vs ONNX Runtime int8.

For each network (autoencoder, multiscale) and network input (the camera's full 320x240 and the low-res
160x128, WIDTHxHEIGHT; sides must be multiples of 16, ``models.networks.SIZE_MULTIPLE``): median and p95 inference
latency over N runs after warm-up with 2 threads, params, FLOPs (2 x MACs), achieved GFLOP/s, and the ratio
to this machine's measured sgemm peak.

    .venv/bin/python bench/bench_depth.py [--runs 50] [--threads 2] [--checkpoint autoencoder=PATH ...]

Without checkpoints the weights are untrained (latency does not depend on them; the int8 error does a little).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from forest_perception.cli_args import format_image_size, non_negative_int, positive_int  # noqa: E402
from forest_perception.inference import OnnxDepthEngine  # noqa: E402
from forest_perception.models.export import engine_latency, export_onnx, quantize_int8, synthetic_forest_image  # noqa: E402
from forest_perception.models.networks import build_model, count_flops, count_parameters  # noqa: E402
from forest_perception.models.torch_engine import TorchDepthEngine, load_torch_checkpoint  # noqa: E402

SIZES = ((240, 320), (128, 160))
NETWORKS = ("autoencoder", "multiscale")
CAMERA_HW = (240, 320)


def sgemm_peak(threads: int, size: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Best-of GFLOP/s of an n^3 float32 matmul with numpy and torch at ``threads`` threads."""
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    flops = 2.0 * size**3
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    result = {}
    for label, fn in (("numpy", lambda: a @ b), ("torch", lambda: ta @ tb)):
        fn()
        best = min(_timed(fn) for _ in range(repeats))
        result[label] = flops / best / 1e9
    return result


def _timed(fn: object) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=positive_int, default=50)
    parser.add_argument("--warmup", type=non_negative_int, default=10)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                        help="trained checkpoint for a network (input size taken from the table, weights from it)")
    args = parser.parse_args(argv)
    checkpoints = dict(item.split("=", 1) for item in args.checkpoint)

    peak = sgemm_peak(args.threads)
    peak_gflops = max(peak.values())
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{args.threads} threads, {args.runs} runs after {args.warmup} warm-up")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# load average {load:.1f} at start (other processes share these CPUs: torch's OpenMP pool suffers most)")
    print(f"# sgemm 2048^3 peak: numpy {peak['numpy']:.1f} GFLOP/s, torch {peak['torch']:.1f} GFLOP/s")
    print(f"# camera frames {format_image_size(CAMERA_HW)} rgb8 (synthetic forest images); latency = inference only, "
          "'total' adds resize/normalise/upsample/NaN-mask")
    frames = [synthetic_forest_image(*CAMERA_HW, seed=seed) for seed in range(16)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in NETWORKS:
            for input_hw in SIZES:
                torch.manual_seed(0)
                model = build_model(name, input_hw=input_hw).eval()
                trained = name in checkpoints
                if trained:
                    trained_model, _ = load_torch_checkpoint(checkpoints[name])
                    model.load_state_dict(trained_model.state_dict())
                meta = {"model_name": name, "input_hw": list(input_hw)}
                params, flops = count_parameters(model), count_flops(model, input_hw)
                tag = f"{name}_{format_image_size(input_hw)}"
                fp32 = export_onnx((model, meta), Path(tmp) / f"{tag}.onnx", input_hw, exporter=args.exporter)
                int8 = quantize_int8(fp32, frames, Path(tmp) / f"{tag}_int8.onnx")
                engines = {
                    "torch eager": TorchDepthEngine((model, meta), threads=args.threads),
                    "ORT fp32": OnnxDepthEngine(fp32, threads=args.threads),
                    "ORT int8": OnnxDepthEngine(int8, threads=args.threads),
                }
                reference = engines["ORT fp32"].predict(frames[0])
                for backend, engine in engines.items():
                    latency = engine_latency(engine, frames, args.runs, args.warmup)
                    median, p95, total = latency["median_ms"], latency["p95_ms"], latency["total_median_ms"]
                    error = np.nanmean(np.abs(engine.predict(frames[0]) - reference))
                    gflops = flops / (median / 1e3) / 1e9
                    size = os.path.getsize(int8 if backend == "ORT int8" else fp32) / 1e6
                    rows.append((name + ("" if trained else "*"), format_image_size(input_hw), backend, median, p95,
                                 total, params, flops / 1e9, gflops, gflops / peak_gflops, size, error))
    header = (f"{'network':<13}{'input WxH':<11}{'backend':<13}{'med ms':>8}{'p95 ms':>8}{'total ms':>9}"
              f"{'params':>10}{'GFLOP':>8}{'GFLOP/s':>9}{'%peak':>7}{'MB':>7}{'|d-fp32| m':>11}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row[0]:<13}{row[1]:<11}{row[2]:<13}{row[3]:>8.2f}{row[4]:>8.2f}{row[5]:>9.2f}{row[6]:>10,}"
              f"{row[7]:>8.3f}{row[8]:>9.1f}{100 * row[9]:>6.0f}%{row[10]:>7.2f}{row[11]:>11.4f}")
    if any(row[0].endswith("*") for row in rows):
        print("* untrained weights (no checkpoint given): latency is representative, accuracy is not; "
              "MB is the ONNX file (int8 row: the int8 file)")
    print("%peak is against the fp32 sgemm peak; int8 kernels (VNNI) can exceed it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
