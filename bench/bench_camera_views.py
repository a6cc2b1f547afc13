"""What depth_node's camera views cost a frame and what they win: ``model_hfov_deg``, ``rectify_pitch`` and
``flip_average``.

Latency (always): ``depth_pipeline.predict_depth`` median over N runs on a 320x240 frame, side by side in one run:
the frame as it is, through the canonical view of a narrower camera (``--narrow-hfov``, a Raspberry Pi Camera v2 by
default), through the level view of a tilted mount (``--tilt``), both, and flip-averaged (the network on the frame
and its mirror image); the ratios to the plain frame.

Accuracy (with ``--data``): every ``--every``-th frame of each dataset folder (recorded by the 69.4 deg simulator
camera) is turned into what the other camera would record, a centre crop for the narrower lens and
``depth_geometry.tilt_image``/``tilt_depth`` for the tilted mount, and scored with the views off and on; the frames
as recorded are also scored flip-averaged. Mean absrel over the folders. docs/runtime.md (``depth_geometry``, "Flip
averaging") and docs/training.md ("Camera tilt") quote these figures.

    .venv/bin/python bench/bench_camera_views.py [--model multiscale_320x240] [--data DATA/STYLES/*] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402

from forest_perception import depth_geometry  # noqa: E402
from forest_perception.dataset_tools.layout import load_frame  # noqa: E402
from forest_perception.depth_pipeline import DepthSettings, predict_depth, synthetic_forest_image  # noqa: E402
from forest_perception.frames import CAMERA_HFOV_DEG  # noqa: E402
from forest_perception.inference import load_engine  # noqa: E402
from forest_perception.models.data import collect_segments  # noqa: E402
from forest_perception.models.metrics import MetricAccumulator  # noqa: E402
from forest_perception.models.styles import resolve_model_file  # noqa: E402


def narrower(rgb: np.ndarray, depth: np.ndarray, hfov_deg: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What a camera of ``hfov_deg`` (< 69.4) on the same axis records: a centre crop resized back, and its K."""
    height, width = depth.shape
    keep = math.tan(math.radians(hfov_deg) / 2) / math.tan(math.radians(CAMERA_HFOV_DEG) / 2)
    crop_h, crop_w = int(round(height * keep)), int(round(width * keep))
    y0, x0 = (height - crop_h) // 2, (width - crop_w) // 2
    rgb = cv2.resize(rgb[y0:y0 + crop_h, x0:x0 + crop_w], (width, height), interpolation=cv2.INTER_AREA)
    depth = cv2.resize(depth[y0:y0 + crop_h, x0:x0 + crop_w], (width, height), interpolation=cv2.INTER_NEAREST)
    return rgb, depth, depth_geometry.camera_matrix_from_hfov(width, height, hfov_deg)


def latency(engine: object, args: argparse.Namespace) -> None:
    """Median predict_depth latency with each view, side by side."""
    frame = synthetic_forest_image(240, 320, seed=4)
    narrow_k = depth_geometry.camera_matrix_from_hfov(320, 240, args.narrow_hfov)
    level_k = depth_geometry.camera_matrix_from_hfov(320, 240, CAMERA_HFOV_DEG)
    pitch = math.radians(args.tilt)
    cases = {
        "frame as it is": (DepthSettings(), level_k),
        f"canonical view of a {args.narrow_hfov:g} deg camera": (DepthSettings(), narrow_k),
        f"level view of a {args.tilt:g} deg mount": (DepthSettings(camera_pitch_rad=pitch, rectify_pitch=True),
                                                     level_k),
        "both": (DepthSettings(camera_pitch_rad=pitch, rectify_pitch=True), narrow_k),
        "flip-averaged (flip_average)": (DepthSettings(flip_average=True), level_k),
    }
    medians = {}
    for name, (settings, K) in cases.items():
        for _ in range(args.warmup):
            predict_depth(engine, frame, settings, K)
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            predict_depth(engine, frame, settings, K)
            times.append((time.perf_counter() - start) * 1e3)
        medians[name] = float(np.median(times))
    base = medians["frame as it is"]
    print(f"\npredict_depth on a 320x240 frame, median of {args.runs} runs, {args.threads} thread(s):")
    for name, value in medians.items():
        print(f"  {name:<42} {value:7.2f} ms  ({value / base:.2f}x, +{value - base:.2f} ms)")


def accuracy(engine: object, args: argparse.Namespace) -> None:
    """Mean absrel over the folders with each view off and on."""
    pitch = math.radians(args.tilt)
    on, off = DepthSettings(min_depth_m=0.1), DepthSettings(min_depth_m=0.1, model_hfov_deg=0.0)
    level_on = DepthSettings(min_depth_m=0.1, camera_pitch_rad=pitch, rectify_pitch=True)
    names = (f"{args.narrow_hfov:g} deg lens, as it is", f"{args.narrow_hfov:g} deg lens, canonical view",
             f"{args.tilt:+g} deg mount, as it is", f"{args.tilt:+g} deg mount, level view", "as recorded",
             "as recorded, flip-averaged")
    flipped = DepthSettings(min_depth_m=0.1, model_hfov_deg=0.0, flip_average=True)
    rows = []
    for folder in args.data:
        accs = {name: MetricAccumulator(min_depth=0.1, max_depth=10.0) for name in names}
        for segment in collect_segments(folder, None):
            for i in range(0, len(segment), args.every):
                rgb, depth, _ = load_frame(segment, i)
                level_k = depth_geometry.camera_matrix_from_hfov(depth.shape[1], depth.shape[0], CAMERA_HFOV_DEG)
                n_rgb, n_depth, n_k = narrower(rgb, depth, args.narrow_hfov)
                t_rgb = depth_geometry.tilt_image(rgb, level_k, pitch)
                t_depth = depth_geometry.tilt_depth(depth, level_k, pitch)
                for name, image, target, settings, K in (
                        (names[0], n_rgb, n_depth, off, n_k), (names[1], n_rgb, n_depth, on, n_k),
                        (names[2], t_rgb, t_depth, off, level_k), (names[3], t_rgb, t_depth, level_on, level_k),
                        (names[4], rgb, depth, off, level_k), (names[5], rgb, depth, flipped, level_k)):
                    pred, _ = predict_depth(engine, image, settings, K)
                    accs[name].update(np.where(np.isfinite(pred), pred, 10.0), np.nan_to_num(target, nan=0.0))
        rows.append({name: acc.result()["absrel"] for name, acc in accs.items()})
        print(f"  {Path(folder).name:<22} " + "  ".join(f"{rows[-1][n]:.3f}" for n in names), flush=True)
    print(f"\nmean absrel over {len(rows)} folder(s), every {args.every} frame(s):")
    for name in names:
        print(f"  {name:<36} {np.mean([row[name] for row in rows]):.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="multiscale_320x240", help="shipped name or .onnx file")
    parser.add_argument("--narrow-hfov", type=float, default=62.2, help="the narrower camera's HFOV, deg (< 69.4)")
    parser.add_argument("--tilt", type=float, default=8.0, help="the mount's pitch beyond level, deg (+: down)")
    parser.add_argument("--data", nargs="*", default=[], help="dataset folders of the simulator's camera")
    parser.add_argument("--every", type=int, default=2, help="score every n-th frame of a folder")
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not 10.0 <= args.narrow_hfov < CAMERA_HFOV_DEG:
        parser.error(f"--narrow-hfov must be within [10, {CAMERA_HFOV_DEG}) degrees (a crop of the recorded frames)")
    if not 0.0 < abs(args.tilt) <= 20.0:
        parser.error("--tilt must be non-zero and within +-20 degrees")
    if args.every < 1:
        parser.error("--every must be at least 1")
    engine = load_engine(str(resolve_model_file(args.model)), threads=args.threads)
    print(f"{args.model} ({engine.model_version}), {platform.processor() or platform.machine()}, "
          f"{args.threads} thread(s)")
    latency(engine, args)
    if args.data:
        print("\nabsrel per folder: " + " | ".join(("lens as is", "lens canonical", "mount as is", "mount level",
                                                   "as recorded", "flip-averaged")))
        accuracy(engine, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
