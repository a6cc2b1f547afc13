"""Simulated rovers' recordings in the forest dataset layout: a fast procedural ray caster, or the pybullet forest.

Each rover's forest (tree density, sizes, positions) comes from its seed and its light from its weather
preset, so the rovers' data are non-iid; see ``docs/federated.md`` ("Simulation").
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from forest_perception.collab.flower.population import VirtualRover

DATA_GENERATOR_VERSION = 1
DATA_SOURCES = ("procedural", "synth")


@dataclass(frozen=True)
class ProceduralForest:
    """Trunks as vertical cylinders: ``trees[i] = (x, y, radius, height)`` in metres, ENU, forest centred on 0."""

    trees: np.ndarray
    half_size: float

    @classmethod
    def generate(cls, seed: int, half_size: float = 20.0) -> ProceduralForest:
        """Density 400-1500 trees/ha, trunk radius lognormal around 0.15 m, height 3-15 m, from ``seed``."""
        rng = np.random.default_rng(seed)
        density = rng.uniform(400.0, 1500.0)
        count = int(density * (2 * half_size) ** 2 / 10_000.0)
        xy = rng.uniform(-half_size, half_size, size=(count, 2))
        xy = xy[np.hypot(xy[:, 0], xy[:, 1]) > 2.0]  # a clearing to start in
        radius = np.clip(rng.lognormal(np.log(0.15), 0.4, size=len(xy)), 0.04, 0.6)
        height = rng.uniform(3.0, 15.0, size=len(xy))
        return cls(np.column_stack([xy, radius, height]), half_size)

    def free_pose(self, rng: np.random.Generator, clearance: float = 0.6) -> tuple[float, float, float]:
        """A random pose at least ``clearance`` from every trunk."""
        for _ in range(1000):
            x, y = rng.uniform(-0.6 * self.half_size, 0.6 * self.half_size, size=2)
            gap = np.hypot(self.trees[:, 0] - x, self.trees[:, 1] - y) - self.trees[:, 2]
            if gap.size == 0 or gap.min() > clearance:
                return float(x), float(y), float(rng.uniform(-math.pi, math.pi))
        return 0.0, 0.0, float(rng.uniform(-math.pi, math.pi))


def render_procedural_frame(
    forest: ProceduralForest,
    pose: tuple[float, float, float],
    weather: str,
    width: int,
    height: int,
    rng: np.random.Generator,
    hfov_deg: float = 87.0,
    camera_height: float = 0.2,
    max_range: float = 20.0,
) -> tuple[np.ndarray, np.ndarray]:
    """RGB ``HxWx3`` uint8 and depth ``HxW`` float32 metres along the optical axis (NaN beyond ``max_range``)."""
    from forest_perception.sim.weather import SKY_FOG_DISTANCE_M, get_weather

    preset = get_weather(weather)
    x0, y0, yaw = pose
    fx = (width / 2.0) / math.tan(math.radians(hfov_deg) / 2.0)
    u = (np.arange(width) + 0.5 - width / 2.0) / fx  # right
    v = (np.arange(height) + 0.5 - height / 2.0) / fx  # down
    forward = np.array([math.cos(yaw), math.sin(yaw)])
    right = np.array([math.sin(yaw), -math.cos(yaw)])
    step = forward[None, :] + u[:, None] * right[None, :]  # horizontal move per metre of depth, per column
    with np.errstate(divide="ignore"):
        z_ground = np.where(v > 1e-6, camera_height / np.maximum(v, 1e-6), np.inf)
    # nearest trunk per column: |p0 + t*step - c|^2 = r^2
    rel = forest.trees[:, :2] - np.array([x0, y0])
    a = np.sum(step**2, axis=1)[:, None]
    b = -2.0 * step @ rel.T
    c = (np.sum(rel**2, axis=1) - forest.trees[:, 2] ** 2)[None, :]
    disc = b * b - 4.0 * a * c
    with np.errstate(invalid="ignore"):
        t = (-b - np.sqrt(np.maximum(disc, 0.0))) / (2.0 * a)
    t = np.where((disc > 0) & (t > 0.05), t, np.inf)
    nearest = np.argmin(t, axis=1) if t.shape[1] else np.zeros(width, dtype=int)
    z_tree = t[np.arange(width), nearest] if t.shape[1] else np.full(width, np.inf)
    tree_top = forest.trees[nearest, 3] if t.shape[1] else np.zeros(width)
    height_at = camera_height - v[:, None] * z_tree[None, :]  # height above ground of the trunk point seen
    on_tree = np.isfinite(z_tree)[None, :] & (height_at <= tree_top[None, :]) & (z_tree[None, :] < z_ground[:, None])
    depth = np.where(on_tree, z_tree[None, :], z_ground[:, None])
    # colours (0-255 floats)
    light = np.asarray(preset.light_direction)
    light_colour = np.asarray(preset.light_color)
    sky_mix = np.clip(-v / 0.6, 0.0, 1.0)[:, None, None]
    sky = (1 - sky_mix) * np.asarray(preset.sky_horizon) + sky_mix * np.asarray(preset.sky_top)
    sky = np.broadcast_to(sky, (height, width, 3))
    gx = x0 + z_ground[:, None] * step[None, :, 0]
    gy = y0 + z_ground[:, None] * step[None, :, 1]
    with np.errstate(invalid="ignore"):
        litter = 0.5 + 0.25 * np.sin(3.1 * gx + 1.7 * np.sin(0.9 * gy))
        litter += 0.25 * np.sin(2.3 * gy + 1.3 * np.cos(0.7 * gx))
    litter = np.nan_to_num(litter, nan=0.5)[..., None]
    ground = (1 - litter) * np.array([96.0, 80.0, 54.0]) + litter * np.array([62.0, 92.0, 44.0])
    ground = ground * (preset.ambient + preset.diffuse * max(light[2], 0.0)) * light_colour
    z_hit = np.where(np.isfinite(z_tree), z_tree, 0.0)
    hit = np.array([x0, y0]) + z_hit[:, None] * step
    normal = (hit - forest.trees[nearest, :2]) / np.maximum(forest.trees[nearest, 2:3], 1e-6) if t.shape[1] else hit
    lambert = np.clip(normal @ light[:2], 0.0, None)
    bark = np.array([86.0, 68.0, 52.0]) * (0.85 + 0.15 * np.sin(40.0 * np.arctan2(normal[:, 1], normal[:, 0])))[:, None]
    trunk = bark * (preset.ambient + preset.diffuse * lambert)[:, None] * light_colour
    colour = np.where(on_tree[..., None], trunk[None, :, :], ground)
    is_sky = ~np.isfinite(depth) | (depth > max_range)
    distance = np.where(is_sky, SKY_FOG_DISTANCE_M, depth)
    fog = np.exp(-preset.fog_density_per_m * distance)[..., None]
    colour = np.where(is_sky[..., None], sky, colour)
    colour = colour * fog + np.asarray(preset.fog_color) * (1 - fog)
    colour = colour * preset.exposure_gain * np.asarray(preset.tint)
    colour = colour + rng.normal(0.0, 2.0, size=colour.shape)
    rgb = np.clip(colour, 0, 255).astype(np.uint8)
    depth = np.where(is_sky, np.nan, depth).astype(np.float32)
    return rgb, depth


def write_procedural_rover_data(rover: VirtualRover, width: int, height: int) -> Path:
    """Two segments (``Run-1/a``, ``Run-1/b``) of the rover's forest and weather under ``rover.data_dir``."""
    from forest_perception.dataset_tools.layout import FrameRecord, ImuSample, SegmentWriter, frame_stem, segment_name

    root = Path(rover.data_dir)
    forest = ProceduralForest.generate(rover.forest_seed)
    rng = np.random.default_rng([rover.forest_seed, 1])
    per_segment = [rover.frames // 2, rover.frames - rover.frames // 2]
    for s, count in enumerate(per_segment):
        extras = ("weather", "world_seed", "pose_x", "pose_y", "pose_yaw")
        with SegmentWriter(root, 1, segment_name(s), overwrite=True, extra_columns=extras) as writer:
            for i in range(count):
                pose = forest.free_pose(rng)
                rgb, depth = render_procedural_frame(forest, pose, rover.weather, width, height, rng)
                half = pose[2] / 2.0
                record = FrameRecord(
                    stem=frame_stem(i),
                    timestamp=float(s * 1000 + i),
                    imu=ImuSample((0.0, 0.0, 0.0), (0.0, 0.0, 9.81), (0.0, 0.0, math.sin(half), math.cos(half))),
                    extras={"weather": rover.weather, "world_seed": rover.forest_seed, "pose_x": pose[0],
                            "pose_y": pose[1], "pose_yaw": pose[2]},
                )
                writer.write_frame(rgb, depth, record)
    return root


def write_synth_rover_data(rover: VirtualRover, width: int, height: int) -> Path:
    """Two segments of the pybullet forest (:func:`dataset_tools.synth.synthesize`) under ``rover.data_dir``."""
    from forest_perception.dataset_tools.synth import SynthConfig, synthesize
    from forest_perception.sim.world import WorldConfig

    per_segment = max(1, rover.frames // 2)
    config = SynthConfig(
        runs=1, segments_per_run=2, frames_per_segment=per_segment, seed=rover.forest_seed % (2**31 - 1),
        weathers=(rover.weather,), width=width, height=height, world=WorldConfig(size_m=30.0),
    )
    synthesize(rover.data_dir, config, progress=False, overwrite=True)
    return Path(rover.data_dir)


def ensure_rover_data(rover: VirtualRover, width: int, height: int, source: str = "procedural") -> bool:
    """Write the rover's dataset unless its folder already holds this exact one; True when written.

    A rover with real recordings (``rover.recorded``) is never written: its folder is only read.
    """
    if rover.recorded:
        return False
    if source not in DATA_SOURCES:
        raise ValueError(f"data source must be one of {DATA_SOURCES}, got {source!r}")
    root = Path(rover.data_dir)
    stamp = {
        "generator": DATA_GENERATOR_VERSION, "source": source, "forest_seed": rover.forest_seed,
        "weather": rover.weather, "frames": rover.frames, "width": width, "height": height,
    }
    stamp_path = root / "rover.json"
    if stamp_path.is_file():
        try:
            if json.loads(stamp_path.read_text()) == stamp:
                return False
        except ValueError:
            pass
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    if source == "procedural":
        write_procedural_rover_data(rover, width, height)
    else:
        write_synth_rover_data(rover, width, height)
    stamp_path.write_text(json.dumps(stamp))
    return True
