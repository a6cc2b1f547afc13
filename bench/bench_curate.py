"""Curation throughput: input frames per second of ``forest-dataset curate`` at 640x480.

Builds a dataset of forest-like frames (multi-octave colour texture with trunks, viewed as a
window sliding along a panorama, so neighbouring frames overlap like a drive; every 10th
frame motion-blurred, a stationary stretch of repeated views per segment; smooth depth with
holes), PNG-encoded like a recording, then curates it to 10 % with one worker thread and
with one per core, with and without the depth check of the kept frames; then once more with the
per-segment score cache that ``forest-dataset extract`` writes (no RGB PNG decoded). The dataset is
written first, so its files are in the page cache: the figures are decode + compute, not disk reads.

Besides wall-clock frames/s, it prints the CPU time each input frame costs (all threads of
this process, from getrusage), and the frames/s that gives on 2 and on all usable cores when
they are free: on a machine shared with other jobs the wall-clock figure only says how much
CPU the benchmark got. A per-step table (PNG decode, sharpness, descriptor) shows where
the time goes.

Run: .venv/bin/python bench/bench_curate.py [--frames 1200] [--segments 4] [--keep DIR]
Goal (issue 4): >= 300 frames/s at 640x480 on 2 cores, so that 100k frames curate in minutes.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from forest_perception.dataset_tools.curate import CurateConfig, CurationResult, curate
from forest_perception.dataset_tools.layout import FrameRecord, SegmentWriter, frame_stem, segment_name
from forest_perception.dataset_tools.parallel import default_workers
from forest_perception.dataset_tools.scores import (
    SCORES_FILE,
    frame_descriptor,
    frame_scores,
    sharpness,
    write_score_cache,
)
from forest_perception.readings import GpsFix, ImuSample


def panorama(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A wide uint8 RGB forest-like texture: noise octaves from 2 to 64 px, dark vertical trunks."""
    out = np.zeros((height, width, 3), np.float32)
    for scale in (2, 4, 8, 16, 32, 64):
        noise = rng.random((max(2, height // scale), max(2, width // scale), 3)).astype(np.float32)
        out += cv2.resize(noise, (width, height), interpolation=cv2.INTER_LINEAR) * scale**0.6
    out -= out.min()
    out /= out.max()
    out *= np.array([0.55, 0.8, 0.45], np.float32)  # greenish
    for _ in range(width // 40):
        x, w = int(rng.integers(width)), int(rng.integers(4, 30))
        out[:, x : x + w] = out[:, x : x + w] * 0.3 + rng.random(3).astype(np.float32) * 0.3
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)


def build_dataset(root: Path, frames: int, segments: int, width: int = 640, height: int = 480) -> None:
    """``segments`` segments of ``frames // segments`` frames each under ``root/Run-1``."""
    rng = np.random.default_rng(0)
    per_segment = frames // segments
    step = 12  # pixels the view slides per frame
    for s in range(segments):
        pano = panorama(height, width + step * per_segment + 1, rng)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        with SegmentWriter(root, 1, segment_name(s)) as writer:
            for i in range(per_segment):
                x = step * (i if not 40 <= i < 60 else 40)  # a stationary stretch: repeated views
                rgb = np.ascontiguousarray(pano[:, x : x + width])
                if i % 10 == 5:
                    rgb = cv2.blur(rgb, (15, 1))
                depth = 1.0 + 8.0 * (1.0 - yy / height) + np.sin(xx / 50.0 + i * 0.1)
                depth[(xx.astype(int) + i) % 97 < 5] = np.nan
                writer.write_frame(
                    rgb,
                    depth.astype(np.float32),
                    FrameRecord(
                        stem=frame_stem(i),
                        timestamp=0.1 * i,
                        imu=ImuSample((0.0, 0.0, 0.1), (0.0, 0.0, 9.81), (0.0, 0.0, 0.0, 1.0)),
                        gps=GpsFix(50.0 + s * 1e-3, 8.0 + i * 2e-6),
                    ),
                )


def cpu_seconds() -> float:
    """CPU time (user + system) of all threads of this process."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


def step_costs(source: Path, n: int = 100) -> dict[str, float]:
    """CPU milliseconds per frame of each scoring step, one thread."""
    cv2.setNumThreads(1)
    rgb_paths = sorted(source.glob("Run-1/a/rgb_image/*.png"))[:n]
    depth_paths = [Path(str(p).replace("rgb_image", "depth_image")) for p in rgb_paths]
    costs = {}
    t0 = time.process_time()
    images = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in rgb_paths]
    costs["decode RGB PNG"] = time.process_time() - t0
    t0 = time.process_time()
    for p in depth_paths:
        cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
    costs["decode depth PNG"] = time.process_time() - t0
    t0 = time.process_time()
    grays = [cv2.cvtColor(im, cv2.COLOR_BGR2GRAY) for im in images]
    for g in grays:
        sharpness(g)
    costs["grayscale + Laplacian + Tenengrad"] = time.process_time() - t0
    t0 = time.process_time()
    for im in images:
        frame_descriptor(im)
    costs["descriptor"] = time.process_time() - t0
    cv2.setNumThreads(-1)
    return {k: 1000 * v / len(rgb_paths) for k, v in costs.items()}


def timed_curate(source: Path, out: Path, workers: int, depth: bool, frames: int) -> tuple[CurationResult, float]:
    """Curate ``source`` to 10 % into a fresh ``out``; returns the result and the CPU milliseconds per input frame."""
    shutil.rmtree(out, ignore_errors=True)
    c0 = cpu_seconds()
    result = curate(source, out, CurateConfig(fraction=0.1, workers=workers, check_depth=depth))
    return result, 1000 * (cpu_seconds() - c0) / frames


def table_row(workers: int, depth: bool, summary: dict, cpu_ms: float, cores: int) -> str:
    """workers, depth check, wall s, wall fps, CPU ms/frame, fps on 2 free cores (and on ``cores`` when not 2)."""
    row = (f"{workers:>7} {'yes' if depth else 'no':>5} {summary['timing_s']['total_s']:7.2f} "
           f"{summary['frames_per_s']:8.0f} {cpu_ms:12.2f} {2000 / cpu_ms:17.0f}")
    return row + (f" {cores * 1000 / cpu_ms:17.0f}" if cores != 2 else "")


def main() -> None:
    """Print the benchmark table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=1200, help="input frames (640x480)")
    parser.add_argument("--segments", type=int, default=4)
    parser.add_argument("--keep", help="build the dataset here and keep it (default: a temporary folder)")
    args = parser.parse_args()

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_curate_"))
    source = work / "source"
    try:
        t0 = time.perf_counter()
        if not source.exists():
            build_dataset(source, args.frames, args.segments)
        build_s = time.perf_counter() - t0
        files = list(source.rglob("*.png"))
        mb = sum(p.stat().st_size for p in files) / len(files) / 1e3
        n = sum(1 for _ in (source / "Run-1").glob("*/rgb_image/*.png"))
        print(f"# curate benchmark: {n} frames 640x480 ({mb:.0f} kB per PNG), built in {build_s:.1f} s")
        print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"{default_workers()} usable, OpenCV {cv2.__version__}")
        for step, ms in step_costs(source).items():
            print(f"#   {step:<34} {ms:6.2f} CPU ms/frame (one thread)")
        cores = default_workers()
        more = f" {f'fps @{cores} free cores':>17}" if cores != 2 else ""
        print(f"{'workers':>7} {'depth':>5} {'wall s':>7} {'wall fps':>8} {'CPU ms/frame':>12} "
              f"{'fps @2 free cores':>17}{more}  decisions")
        for workers in sorted({1, cores}):
            for depth in (True, False):
                result, cpu_ms = timed_curate(source, work / f"out_{workers}_{int(depth)}", workers, depth, n)
                decisions = ", ".join(f"{k} {v}" for k, v in result.summary["reasons"].items() if v)
                print(table_row(workers, depth, result.summary, cpu_ms, cores) + "  " + decisions)
        # as `forest-dataset extract` leaves it: the scores computed from the pixels it had in memory
        for seg_dir in sorted((source / "Run-1").iterdir()):
            write_score_cache(seg_dir, [
                (p.stem, *frame_scores(cv2.imread(str(p), cv2.IMREAD_COLOR)[:, :, ::-1]))
                for p in sorted((seg_dir / "rgb_image").glob("*.png"))
            ])
        for depth in (True, False):
            result, cpu_ms = timed_curate(source, work / f"out_cached_{int(depth)}", cores, depth, n)
            cached = result.summary["scores_from_cache"]
            print(table_row(cores, depth, result.summary, cpu_ms, cores)
                  + f"  scores from {SCORES_FILE} (as extract writes it) for {cached} frames")
        print("# wall fps = input frames / total curate time (scan, score, blur, duplicates, selection, depth of the")
        print("# kept frames, write); fps @k free cores = k * 1000 / CPU ms per frame")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
