"""A tiny synthetic forest dataset in the public layout, shared by the training tests (CPU, a few KB)."""

from __future__ import annotations

import numpy as np

from forest_perception.dataset_tools.layout import FrameRecord, ImuSample, SegmentWriter, frame_stem

HEIGHT, WIDTH = 48, 64  # stored frames
FRAMES = 3


def tiny_frame(i: int, run: int, segment: int) -> tuple[np.ndarray, np.ndarray]:
    """A ground plane that gets farther up the image, plus a trunk; sky (top rows) invalid."""
    rng = np.random.default_rng([run, segment, i])
    rows = np.arange(HEIGHT, dtype=np.float32)[:, None]
    depth = np.repeat(1.0 + 8.0 * (1.0 - rows / HEIGHT) ** 2, WIDTH, axis=1).astype(np.float32)
    x0 = int(rng.integers(5, WIDTH - 15))
    depth[:, x0 : x0 + 8] = np.minimum(depth[:, x0 : x0 + 8], 1.5 + i * 0.3)
    depth[:4] = np.nan
    shade = (255 * (1.0 - depth / 12.0)).clip(0, 255)
    shade = np.nan_to_num(shade, nan=200.0)
    rgb = np.stack([shade * 0.6, shade, shade * 0.3], axis=-1).astype(np.uint8)
    rgb = np.clip(rgb.astype(np.int16) + rng.integers(-8, 8, rgb.shape), 0, 255).astype(np.uint8)
    return rgb, depth


def write_tiny_dataset(root, runs=(1,), segments=2) -> None:
    for run in runs:
        for s in range(segments):
            with SegmentWriter(root, run=run, segment="abcdefgh"[s]) as writer:
                for i in range(FRAMES):
                    rgb, depth = tiny_frame(i, run, s)
                    imu = ImuSample(angular_velocity=(0, 0, 0), linear_acceleration=(0, 0, 9.81))
                    writer.write_frame(rgb, depth, FrameRecord(stem=frame_stem(i), timestamp=0.1 * (i + 1), imu=imu))
