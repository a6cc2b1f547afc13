"""Synthetic forest dataset: render frames along exploring rovers into the forest dataset layout.

Run ``r`` is a forest generated from ``seed + r``; each segment of a run is one drive of
a rover from a random free start pose under one weather preset (cycling through the
presets given), like one RealSense bag of the real dataset. Frames are saved every
``frame_interval_s`` of simulated time, with the IMU, GPS and wheel readings of that
instant in ``metadata.csv``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from forest_perception.dataset_tools.layout import (
    FrameRecord,
    GpsFix,
    ImuSample,
    SegmentWriter,
    WheelEncoders,
    frame_stem,
    run_dir_name,
    segment_name,
)
from forest_perception.frames import CameraIntrinsics
from forest_perception.sim.simulator import ForestSimulator, RoverConfig, SimConfig
from forest_perception.sim.weather import get_weather
from forest_perception.sim.world import ForestWorld, WorldConfig, generate_world

EXTRA_COLUMNS = ("weather", "world_seed", "pose_x", "pose_y", "pose_z", "pose_yaw", "canopy_cover")


@dataclass(frozen=True)
class SynthConfig:
    """What to generate: runs x segments x frames, at a resolution and frame spacing."""

    runs: int = 1
    segments_per_run: int = 2
    frames_per_segment: int = 50
    seed: int = 0
    weathers: tuple[str, ...] = ("overcast",)
    width: int = 320
    height: int = 240
    frame_interval_s: float = 0.5
    world: WorldConfig = field(default_factory=WorldConfig)
    first_run: int = 1

    def validate(self) -> SynthConfig:
        """Raise ``ValueError`` naming the first bad value."""
        for name in ("runs", "segments_per_run", "frames_per_segment"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not self.weathers:
            raise ValueError("weathers must name at least one preset")
        for w in self.weathers:
            get_weather(w)
        CameraIntrinsics(self.width, self.height).validate()
        if not (math.isfinite(self.frame_interval_s) and 0.01 <= self.frame_interval_s <= 60.0):
            raise ValueError(f"frame_interval_s must be within [0.01, 60] s, got {self.frame_interval_s}")
        if self.first_run < 0:
            raise ValueError(f"first_run must be >= 0, got {self.first_run}")
        self.world.validate()
        return self


@dataclass
class SynthReport:
    """What was written, for the CLI and the demo."""

    root: Path
    segments: list[dict] = field(default_factory=list)
    frames: int = 0
    seconds: float = 0.0
    valid_depth_fraction: float = 0.0

    def lines(self) -> list[str]:
        """Human-readable summary lines."""
        out = [
            f"wrote {self.frames} frames in {len(self.segments)} segment(s) to {self.root} "
            f"in {self.seconds:.1f} s ({self.frames / max(self.seconds, 1e-9):.1f} frames/s)",
            f"valid depth pixels: {100 * self.valid_depth_fraction:.1f} %",
        ]
        for s in self.segments:
            out.append(
                f"  {s['path']}: {s['frames']} frames, weather {s['weather']}, world seed {s['world_seed']}, "
                f"{s['distance_m']:.1f} m driven"
            )
        return out


def free_start_pose(
    world: ForestWorld, rng: np.random.Generator, clearance_m: float = 1.2
) -> tuple[float, float, float]:
    """A random pose at least ``clearance_m`` from every obstacle, away from the edges."""
    circles = world.obstacle_circles()
    half = world.half_size - 3.0
    for _ in range(2000):
        x, y = rng.uniform(-half, half, size=2)
        if circles.size == 0 or (np.hypot(circles[:, 0] - x, circles[:, 1] - y) - circles[:, 2]).min() > clearance_m:
            return float(x), float(y), float(rng.uniform(-math.pi, math.pi))
    return 0.0, 0.0, 0.0  # the central clearing is always free


def synthesize(
    out_dir: str | Path,
    config: SynthConfig,
    progress: bool = True,
    overwrite: bool = False,
    on_frame: Callable[[Path, FrameRecord, np.ndarray, np.ndarray], None] | None = None,
) -> SynthReport:
    """Generate the dataset; every finished frame is complete on disk even if interrupted.

    ``on_frame(segment_path, record, rgb, depth_m)`` is called after each frame is written.
    """
    from tqdm import tqdm

    from forest_perception.sim.scene import ForestScene

    config.validate()
    root = Path(out_dir)
    # every segment this run would write, checked before any is: a refusal leaves the folder as it was
    taken = [
        str(root / run_dir_name(config.first_run + r) / segment_name(s))
        for r in range(config.runs)
        for s in range(config.segments_per_run)
        if (root / run_dir_name(config.first_run + r) / segment_name(s)).exists()
        and any((root / run_dir_name(config.first_run + r) / segment_name(s)).iterdir())
    ]
    if taken and not overwrite:
        raise FileExistsError(
            f"{len(taken)} segment(s) to write already exist ({', '.join(taken[:3])}{', ...' if len(taken) > 3 else ''}"
            f") and were left as they are: give another --out or --first-run, or replace them on purpose "
            f"(--overwrite)"
        )
    report = SynthReport(root=root)
    total = config.runs * config.segments_per_run * config.frames_per_segment
    bar = tqdm(total=total, desc="synth", unit="frame", disable=not progress, mininterval=1.0)
    t0 = time.perf_counter()
    valid_pixels = 0
    all_pixels = 0
    intrinsics = CameraIntrinsics(config.width, config.height)
    try:
        for r in range(config.runs):
            run = config.first_run + r
            world_seed = config.seed + r
            world = generate_world(config.world, seed=world_seed)
            rng = np.random.default_rng([config.seed, run])
            with ForestScene(world) as scene:
                for s in range(config.segments_per_run):
                    weather = config.weathers[(r * config.segments_per_run + s) % len(config.weathers)]
                    seg = segment_name(s)
                    sim = ForestSimulator(
                        world,
                        SimConfig(camera=intrinsics, seed=int(rng.integers(2**31))),
                        [RoverConfig(name="rover_0", weather=weather, start=free_start_pose(world, rng))],
                        scene=scene,
                    )
                    writer = SegmentWriter(root, run, seg, overwrite=overwrite, extra_columns=EXTRA_COLUMNS)
                    latest: dict[str, object] = {}
                    distance = 0.0
                    last_xy = None
                    with writer:
                        for i in range(config.frames_per_segment):
                            target = (i + 1) * config.frame_interval_s
                            while sim.time_s < target - 1e-9:
                                for event in sim.step(render=False):
                                    latest[event.kind] = event.data
                                st = sim.rovers[0].state
                                if last_xy is not None:
                                    distance += math.hypot(st.x - last_xy[0], st.y - last_xy[1])
                                last_xy = (st.x, st.y)
                            frame = sim.render_camera(0)
                            state = sim.rovers[0].state
                            imu = latest["imu"]
                            gps = latest.get("gps")
                            wheels = latest.get("wheels")
                            record = FrameRecord(
                                stem=frame_stem(i),
                                timestamp=round(s * 10_000.0 + sim.time_s, 9),
                                imu=ImuSample(
                                    angular_velocity=tuple(imu.angular_velocity),
                                    linear_acceleration=tuple(imu.linear_acceleration),
                                    orientation=tuple(imu.orientation_xyzw),
                                ),
                                gps=None
                                if gps is None
                                else GpsFix(gps.latitude, gps.longitude, gps.altitude, int(gps.status)),
                                encoders=None
                                if wheels is None
                                else WheelEncoders(
                                    float(wheels.position[0]),
                                    float(wheels.position[1]),
                                    float(wheels.velocity[0]),
                                    float(wheels.velocity[1]),
                                ),
                                extras={
                                    "weather": weather,
                                    "world_seed": world_seed,
                                    "pose_x": state.x,
                                    "pose_y": state.y,
                                    "pose_z": state.z,
                                    "pose_yaw": state.yaw,
                                    "canopy_cover": world.canopy_cover(state.x, state.y),
                                },
                            )
                            writer.write_frame(frame.rgb, frame.depth, record)
                            if on_frame is not None:
                                on_frame(writer.path, record, frame.rgb, frame.depth)
                            valid_pixels += int(np.isfinite(frame.depth).sum())
                            all_pixels += frame.depth.size
                            report.frames += 1
                            bar.update(1)
                    sim.close()
                    report.segments.append(
                        {
                            "path": str(writer.path),
                            "frames": config.frames_per_segment,
                            "weather": weather,
                            "world_seed": world_seed,
                            "distance_m": distance,
                        }
                    )
    finally:
        bar.close()
    report.seconds = time.perf_counter() - t0
    report.valid_depth_fraction = valid_pixels / max(all_pixels, 1)
    return report
