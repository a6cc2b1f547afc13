"""Turn a trained checkpoint into shipped weights: ONNX (+ int8 when worth it), held-out metrics, model card.

    python -m forest_perception.models.release --checkpoint runs/ms/checkpoints/best.pt --name multiscale_320x240 \
        --test DATA/forest_test --calib DATA/forest_train/Run-11 --out models/weights \
        --train-command "forest-train train ..." --data-command "forest-dataset synth ..."

Metrics are measured through the rover runtime (``OnnxDepthEngine`` on full-resolution camera frames, depth
upsampled back), pooled over every valid pixel of the held-out forests; docs/training.md ("Shipping weights").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from forest_perception.cli_args import existing_dir, existing_file, non_negative_float, output_dir
from forest_perception.dataset_tools.layout import iter_segments, load_frame
from forest_perception.inference import OnnxDepthEngine
from forest_perception.models.metrics import MetricAccumulator, format_metric_table


def held_out_frames(root: str | Path, limit: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(rgb, depth) pairs of every frame under ``root`` (forest dataset layout), in order."""
    frames = []
    for segment in iter_segments(root):
        for i in range(len(segment)):
            rgb, depth, _record = load_frame(segment, i)
            frames.append((rgb, depth))
            if limit is not None and len(frames) >= limit:
                return frames
    if not frames:
        raise ValueError(f"no frames under {root}")
    return frames


def evaluate_engine(
    path: str | Path, frames: list[tuple[np.ndarray, np.ndarray]], max_depth: float = 10.0, threads: int = 2
) -> dict[str, float]:
    """Pooled metrics and mean latency of an ONNX model on (rgb, depth) frames."""
    engine = OnnxDepthEngine(path, threads=threads)
    acc = MetricAccumulator(min_depth=0.1, max_depth=max_depth)
    latency = []
    for rgb, depth in frames:
        pred = engine.predict(rgb)
        latency.append(engine.last_latency_ms)
        pred = np.where(np.isfinite(pred), pred, max_depth)
        acc.update(pred, np.nan_to_num(depth, nan=0.0))
    result = dict(acc.result())
    result["latency_ms"] = float(np.median(latency))
    return result


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m forest_perception.models.release`` argument parser."""
    parser = argparse.ArgumentParser(prog="python -m forest_perception.models.release", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=existing_file, help="a .pt written by forest-train")
    parser.add_argument("--name", required=True, help="file stem: <model>_<WIDTHxHEIGHT>, e.g. multiscale_320x240")
    parser.add_argument("--test", required=True, type=existing_dir, help="held-out forests (never used in training)")
    parser.add_argument("--calib", required=True, type=existing_dir,
                        help="calibration images for int8 (training forests)")
    parser.add_argument("--out", default="models/weights", type=output_dir,
                        help="folder of the shipped weights (default models/weights)")
    parser.add_argument("--train-command", default="")
    parser.add_argument("--data-command", default="")
    parser.add_argument("--max-absrel-increase", type=non_negative_float, default=0.01)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Export, quantise, evaluate and write the model card; prints the metric table."""
    from forest_perception.models import export  # torch: only once the command line is good

    args = build_parser().parse_args(argv)

    out = Path(args.out)
    onnx_path = out / f"{args.name}.onnx"
    t0 = time.perf_counter()
    command = " ".join(["python -m forest_perception.models.release", *sys.argv[1:]])
    export.export_onnx(args.checkpoint, onnx_path, export_command=command)
    frames = held_out_frames(args.test)
    fp32 = evaluate_engine(onnx_path, frames)
    int8_path = out / f"{args.name}_int8.onnx"
    export.quantize_int8(onnx_path, list(export.iter_calibration_images(args.calib, 64)), int8_path)
    int8 = evaluate_engine(int8_path, frames)
    report = {
        "fp32": {"median_ms": fp32["latency_ms"], "metrics": fp32, "bytes": onnx_path.stat().st_size},
        "int8": {"median_ms": int8["latency_ms"], "metrics": int8, "bytes": int8_path.stat().st_size},
        "speedup": fp32["latency_ms"] / max(int8["latency_ms"], 1e-9),
        "size_ratio": int8_path.stat().st_size / onnx_path.stat().st_size,
        "agreement": {"mean_rel_diff": float("nan")},
    }
    keep, reason = export.keep_int8(report, args.max_absrel_increase)
    info = export.model_info(args.checkpoint)
    info.update(
        {
            "metrics": {k: v for k, v in fp32.items() if k != "latency_ms"},
            "held_out": f"{len(frames)} frames of {args.test} (forest seeds never used in training)",
            "train_command": args.train_command,
            "data_command": args.data_command,
        }
    )
    export.write_model_card(onnx_path, info)
    if keep:
        export.write_model_card(int8_path, {**info, "metrics": {k: v for k, v in int8.items() if k != "latency_ms"},
                                     "int8": report})
    else:
        int8_path.unlink(missing_ok=True)
    rows = {f"{args.name} fp32": fp32, f"{args.name} int8": int8}
    print(format_metric_table({k: {m: v for m, v in r.items() if m != "latency_ms"} for k, r in rows.items()}))
    print(f"latency (this CPU, 2 threads): fp32 {fp32['latency_ms']:.1f} ms, int8 {int8['latency_ms']:.1f} ms")
    print(f"int8 {'kept' if keep else 'dropped'}: {reason}  ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
