"""Demo steps on datasets: a recorded bag made a curated dataset, and a synthetic one in the public layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def bag_to_dataset(bag_dir: Path, out: Path) -> list[str]:
    """Extract, curate, split, validate and report the recorded bag; the lines to print."""
    from forest_perception.dataset_tools.bags import bag_info
    from forest_perception.dataset_tools.curate import CurateConfig, curate
    from forest_perception.dataset_tools.extract import ExtractConfig, extract_bag
    from forest_perception.dataset_tools.report import build_report
    from forest_perception.dataset_tools.split import split_dataset, write_splits
    from forest_perception.dataset_tools.validate import validate_dataset

    info = bag_info(bag_dir)
    lines = [f"bag: {len(info.files)} MCAP file(s), {info.message_count} messages, {info.duration_ns / 1e9:.1f} s, "
             f"{len(info.topics)} topics, {'no problems' if info.ok else '; '.join(info.problems)}"]
    extracted = extract_bag(bag_dir, out / "recorded", ExtractConfig(run=1, segment_frames=40))
    lines += [line.strip() for line in extracted.lines()[1:]]
    curated = curate(out / "recorded", out / "curated", CurateConfig(fraction=0.4))
    lines += [f"curate: {line}" for line in curated.lines()]
    try:
        split = split_dataset(out / "curated", by="segment", fractions=(0.6, 0.2, 0.2), seed=0)
        write_splits(split, overwrite=True)
        lines += [line.strip() for line in split.lines()]
    except ValueError as exc:  # a very short drive: too few segments to fill three splits
        lines.append(f"split skipped: {exc}")
    validation = validate_dataset(out / "curated")
    lines.append(f"validate: {len(validation.errors)} error(s), {len(validation.warnings)} warning(s)")
    lines.append(f"report: {build_report(out / 'curated', out / 'dataset_report.html', overwrite=True)}")
    return lines


def synthetic_dataset(out: Path, seed: int, frames: int) -> tuple[list[str], list, list]:
    """Render two segments in the low-viewpoint dataset layout and read them back.

    Returns the lines to print, (rgb, depth, label) samples for a contact sheet and the frames' poses.
    """
    from forest_perception.dataset_tools.layout import dataset_summary, load_frame, read_segment
    from forest_perception.dataset_tools.synth import SynthConfig, synthesize

    config = SynthConfig(runs=1, segments_per_run=2, frames_per_segment=frames, seed=seed, weathers=("sunny", "fog"))
    samples, poses = [], []

    def keep(path, record, rgb, depth) -> None:  # noqa: ANN001 - synthesize's on_frame callback
        poses.append((record.extras["pose_x"], record.extras["pose_y"]))
        if int(record.stem) % 8 == 0:
            samples.append((rgb, depth, f"{path.parent.name}/{path.name} {record.stem} {record.extras['weather']}"))

    report = synthesize(out, config, overwrite=True, on_frame=keep)
    lines = list(report.lines())
    summary = dataset_summary(out)
    lines.append(f"read back: {summary['runs']} run(s), {summary['segments']} segment(s), {summary['frames']} frames")
    segment = read_segment(out / "Run-1" / "a")
    rgb, depth, record = load_frame(segment, len(segment) - 1)
    median = float(np.nanmedian(depth)) if np.isfinite(depth).any() else float("nan")
    lines.append(f"last frame: rgb {rgb.shape} {rgb.dtype}, depth {depth.dtype} median {median:.2f} m, "
                 f"GPS {record.gps is not None}, "
                 + (f"IMU az {record.imu.linear_acceleration[2]:.2f} m/s^2" if record.imu is not None else "no IMU"))
    return lines, samples, poses
