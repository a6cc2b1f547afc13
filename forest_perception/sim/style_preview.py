"""One camera frame per forest style, timed, and a montage of them for the docs (``docs/images/styles.png``).

``render_style_frame(style, seed)`` builds the style's sampled world and scene, puts the rover
(with the style's camera mount) at a free pose and renders RGB and depth through the full
camera pipeline, timing the scene build and the renders; ``style_montage`` lays the frames out
as a grid of ``RGB | depth`` tiles with the style's name. ``forest-dataset styles --montage``
calls it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from forest_perception.frames import CameraIntrinsics
from forest_perception.sim.preview import colorize_depth, save_rgb
from forest_perception.sim.styles import STYLE_NAMES, StyleSample, sample
from forest_perception.sim.world import generate_world


@dataclass
class StyleFrame:
    """A style's rendered frame: RGB (uint8), depth (metres, NaN invalid), and what it cost."""

    style: StyleSample
    rgb: np.ndarray
    depth: np.ndarray
    build_s: float
    render_ms: list[float] = field(default_factory=list)

    @property
    def median_render_ms(self) -> float:
        """Median wall time of one ``render_camera`` (RGB + depth + camera pipeline), milliseconds, after the
        first frame (which also builds the sun's shadow map in sunny light, about a second, once per scene)."""
        times = self.render_ms[1:] or self.render_ms
        return float(np.median(times)) if times else float("nan")


def render_style_frame(style: str, seed: int = 0, width: int = 160, height: int = 120, frames: int = 1,
                       size_m: float = 60.0, texture_size: int = 256,
                       cache_dir: str | Path | None = None) -> StyleFrame:
    """Sample ``style`` with ``seed``, build its forest and render ``frames`` frames 0.5 s apart; the last is kept.

    Deterministic for a style, seed and size. ``frames`` > 1 gives a steadier render time.
    """
    from forest_perception.sim.scene import ForestScene  # PyBullet only when rendering
    from forest_perception.sim.simulator import ForestSimulator, RoverConfig, SimConfig

    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    drawn = sample(style, seed)
    world = generate_world(drawn.world_config(size_m=size_m))
    t0 = time.perf_counter()
    scene = ForestScene(world, detail=drawn.mesh_detail(), palette=drawn.palette(), texture_size=texture_size,
                        cache_dir=cache_dir)
    build_s = time.perf_counter() - t0
    try:
        config = SimConfig(camera=CameraIntrinsics(width, height), seed=seed, geometry=drawn.rover_geometry())
        rover = RoverConfig(weather=drawn.weather(), effects=drawn.camera_effects(),
                            start=world.free_pose(np.random.default_rng([seed, 7]), clearance_m=1.5))
        sim = ForestSimulator(world, config, [rover], scene=scene)
        try:
            times = []
            for _ in range(frames):
                sim.run(0.5, render=False)
                t = time.perf_counter()
                frame = sim.render_camera(0)
                times.append(1000.0 * (time.perf_counter() - t))
        finally:
            sim.close()
    finally:
        scene.close()
    return StyleFrame(drawn, frame.rgb, frame.depth, build_s, times)


def montage(frames: Sequence[StyleFrame], columns: int = 3, max_m: float = 10.0) -> np.ndarray:
    """A grid of ``RGB | depth`` tiles, the style's name on each, ``columns`` tiles a row (RGB uint8)."""
    if not frames:
        raise ValueError("montage needs at least one frame")
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    tiles = []
    for f in frames:
        tile = np.hstack([f.rgb, colorize_depth(f.depth, max_m)])
        cv2.putText(tile, f.style.style, (4, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(tile, f.style.style, (4, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
        tiles.append(tile)
    h = max(t.shape[0] for t in tiles)
    w = max(t.shape[1] for t in tiles)
    tiles = [np.pad(t, ((0, h - t.shape[0]), (0, w - t.shape[1]), (0, 0))) for t in tiles]
    tiles += [np.zeros_like(tiles[0])] * (-len(tiles) % columns)
    gap = 2
    rows = [np.hstack([np.pad(t, ((0, gap), (0, gap), (0, 0)), constant_values=255)
                       for t in tiles[i:i + columns]]) for i in range(0, len(tiles), columns)]
    return np.vstack(rows)


def style_montage(path: str | Path, styles: Sequence[str] = STYLE_NAMES, seed: int = 0, width: int = 160,
                  height: int = 120, columns: int = 3, frames: int = 1, size_m: float = 60.0,
                  texture_size: int = 256) -> list[StyleFrame]:
    """Render one frame of each of ``styles`` and write their montage as PNG to ``path``; returns the frames."""
    for name in styles:
        if name not in STYLE_NAMES:
            raise ValueError(f"unknown style {name!r}; known styles: {', '.join(STYLE_NAMES)}")
    rendered = [render_style_frame(name, seed, width, height, frames, size_m, texture_size) for name in styles]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_rgb(str(out), montage(rendered, columns))
    return rendered
