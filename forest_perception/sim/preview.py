"""Pictures for people: a top-down map of a forest with rover tracks, and RGB|depth contact sheets."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from forest_perception.sim.world import ForestWorld


def colorize_depth(depth_m: np.ndarray, max_m: float = 10.0) -> np.ndarray:
    """RGB uint8 picture of a depth image (turbo colour map, near = red... far = blue; invalid black)."""
    valid = np.isfinite(depth_m)
    scaled = np.zeros(depth_m.shape, np.uint8)
    scaled[valid] = (255 * (1.0 - np.clip(depth_m[valid] / max_m, 0, 1))).astype(np.uint8)
    rgb = cv2.cvtColor(cv2.applyColorMap(scaled, cv2.COLORMAP_TURBO), cv2.COLOR_BGR2RGB)
    rgb[~valid] = 0
    return rgb


def contact_sheet(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]], labels: Sequence[str] = (), max_m: float = 10.0
) -> np.ndarray:
    """Rows of ``RGB | colourised depth``, one per (rgb, depth) pair, with an optional label."""
    if not pairs:
        raise ValueError("contact_sheet needs at least one (rgb, depth) pair")
    rows = []
    for i, (rgb, depth) in enumerate(pairs):
        row = np.hstack([rgb, colorize_depth(depth, max_m)])
        if i < len(labels):
            cv2.putText(row, labels[i], (6, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
        rows.append(row)
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    return np.vstack(rows)


def world_map(
    world: ForestWorld,
    tracks: Sequence[np.ndarray] = (),
    size_px: int = 800,
    marks: Sequence[tuple[float, float]] = (),
) -> np.ndarray:
    """Top-down RGB map: terrain shading, crowns, trunks, logs, bushes, rocks and rover tracks (x east, y north up)."""
    half = world.half_size
    scale = size_px / (2 * half)

    def px(x: float, y: float) -> tuple[int, int]:
        return int(round((x + half) * scale)), int(round((half - y) * scale))

    heights = world.terrain.heights
    relief = np.ptp(heights) or 1.0
    shade = ((heights - heights.min()) / relief * 60 + 150).astype(np.uint8)
    base = cv2.resize(np.flipud(shade), (size_px, size_px), interpolation=cv2.INTER_LINEAR)
    image = np.dstack([base * 0.75, base * 0.85, base * 0.6]).astype(np.uint8)
    overlay = image.copy()
    for t in world.trees:
        cv2.circle(overlay, px(t.x, t.y), max(1, int(t.crown_radius * scale)), (40, 110, 40), -1, cv2.LINE_AA)
    image = cv2.addWeighted(overlay, 0.35, image, 0.65, 0)
    for b in world.bushes:
        cv2.circle(image, px(b.x, b.y), max(1, int(b.radius * scale)), (70, 150, 60), -1, cv2.LINE_AA)
    for r in world.rocks:
        cv2.circle(image, px(r.x, r.y), max(1, int(r.radius * scale)), (130, 130, 130), -1, cv2.LINE_AA)
    for log in world.logs:
        a, b = log.endpoints()
        cv2.line(image, px(*a), px(*b), (110, 80, 50), max(1, int(log.diameter * scale)), cv2.LINE_AA)
    for t in world.trees:
        cv2.circle(image, px(t.x, t.y), max(2, int(t.dbh / 2 * scale)), (90, 50, 25), -1, cv2.LINE_AA)
    colours = [(230, 60, 30), (30, 90, 230), (230, 200, 30), (160, 40, 180)]
    for i, track in enumerate(tracks):
        track = np.asarray(track, dtype=np.float64)
        if len(track) < 2:
            continue
        points = np.array([px(x, y) for x, y in track[:, :2]], np.int32)
        cv2.polylines(image, [points], False, colours[i % len(colours)], 2, cv2.LINE_AA)
        cv2.circle(image, tuple(points[0]), 5, colours[i % len(colours)], 2, cv2.LINE_AA)
    for x, y in marks:
        cv2.drawMarker(image, px(x, y), (255, 255, 255), cv2.MARKER_CROSS, 10, 2)
    bar = int(10 * scale)
    cv2.line(image, (10, size_px - 12), (10 + bar, size_px - 12), (255, 255, 255), 3)
    cv2.putText(image, "10 m", (14 + bar, size_px - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    return image


def save_rgb(path: str, rgb: np.ndarray) -> None:
    """Write an RGB uint8 image as PNG (OpenCV wants BGR); raise OSError if it cannot."""
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write image {path}")
