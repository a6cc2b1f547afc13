"""Synthetic forest dataset: render frames along exploring rovers into the forest dataset layout.

Without styles, run ``r`` is a forest generated from ``seed + r``; each segment of a run is one drive
of a rover from a random free start pose under one weather preset (cycling through the presets
given), like one RealSense bag of the real dataset. With ``styles``, every segment is a forest of its
own, sampled from a style (cycling through the styles given, :mod:`forest_perception.sim.styles`), and
``style.json`` beside its ``metadata.csv`` records what made it. Frames are saved every
``frame_interval_s`` of simulated time (and, with ``min_spacing_m``, once the rover has moved or
turned enough), with the IMU, GPS and wheel readings of that instant in ``metadata.csv``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from forest_perception.dataset_tools.layout import (
    STYLE_FILE,
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
from forest_perception.geo import wrap_angle
from forest_perception.sim.simulator import ForestSimulator, RoverConfig, SimConfig
from forest_perception.sim.styles import PSEUDO_STYLES, STYLE_NAMES, STYLES, StyleSample, sample
from forest_perception.sim.weather import WeatherPreset, get_weather
from forest_perception.sim.world import ForestWorld, WorldConfig, generate_world

EXTRA_COLUMNS = ("weather", "world_seed", "pose_x", "pose_y", "pose_z", "pose_yaw", "canopy_cover")
STYLE_COLUMNS = ("style", "style_seed", "camera_height_m", "camera_pitch_deg")
"""Columns added after ``EXTRA_COLUMNS`` to the segments of a styled dataset."""
STYLE_KEEPS = ("size_m", "terrain_resolution_m", "clearing_radius_m", "datum_lat_deg", "datum_lon_deg", "datum_alt_m")
"""``SynthConfig.world`` fields a styled segment keeps; the style samples every other one."""
DEFAULT_WEATHER = "overcast"
SPREAD_TURN_RAD = math.radians(30.0)
"""With ``min_spacing_m``, a turn of this much on the spot also makes the next frame a new view."""
SPREAD_MAX_WAIT_S = 20.0
"""With ``min_spacing_m``, a rover that neither moves nor turns still saves a frame after this long."""


@dataclass(frozen=True)
class SynthConfig:
    """What to generate: runs x segments x frames, at a resolution and frame spacing.

    ``weathers`` are presets cycled over the segments; empty means ``overcast`` without styles and
    each style's own sampled light with ``styles``, where a preset replaces the style's light.
    ``styles`` (names of :data:`forest_perception.sim.styles.STYLE_NAMES`, cycled over the
    segments) give every segment a forest, palette, light, camera pipeline and camera mount of
    its own; ``world_overrides`` (``WorldConfig`` field, value) pairs then override every
    sample (``world`` gives only the :data:`STYLE_KEEPS` fields). ``min_spacing_m`` > 0 holds
    each frame back until the rover has moved that far or turned 30 degrees since the last one.
    ``exclude_styles`` are styles ``randomised`` and ``wide`` never draw from (those held out of training).
    """

    runs: int = 1
    segments_per_run: int = 2
    frames_per_segment: int = 50
    seed: int = 0
    weathers: tuple[str, ...] = ()
    width: int = 320
    height: int = 240
    frame_interval_s: float = 0.5
    world: WorldConfig = field(default_factory=WorldConfig)
    first_run: int = 1
    styles: tuple[str, ...] = ()
    world_overrides: tuple[tuple[str, float], ...] = ()
    min_spacing_m: float = 0.0
    exclude_styles: tuple[str, ...] = ()

    def validate(self) -> SynthConfig:
        """Raise ``ValueError`` naming the first bad value."""
        for name in ("runs", "segments_per_run", "frames_per_segment"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        for w in self.weathers:
            get_weather(w)
        for style in self.styles:
            if style not in STYLE_NAMES:
                raise ValueError(f"unknown style {style!r}; known styles: {', '.join(STYLE_NAMES)}")
            if style in self.exclude_styles:
                raise ValueError(f"style {style} is both asked for and excluded")
        for style in self.exclude_styles:
            if style not in STYLES:
                raise ValueError(f"unknown style {style!r} to exclude; known styles: {', '.join(STYLES)}")
        if self.exclude_styles and set(self.exclude_styles) >= set(STYLES):
            raise ValueError(f"exclude_styles leaves no style for {' or '.join(PSEUDO_STYLES)} to draw from")
        CameraIntrinsics(self.width, self.height).validate()
        if not (math.isfinite(self.frame_interval_s) and 0.01 <= self.frame_interval_s <= 60.0):
            raise ValueError(f"frame_interval_s must be within [0.01, 60] s, got {self.frame_interval_s}")
        if not (math.isfinite(self.min_spacing_m) and 0.0 <= self.min_spacing_m <= 20.0):
            raise ValueError(f"min_spacing_m must be within [0, 20] m, got {self.min_spacing_m}")
        if self.first_run < 0:
            raise ValueError(f"first_run must be >= 0, got {self.first_run}")
        self.world.validate()
        known = {f.name for f in fields(WorldConfig)}
        for name, value in self.world_overrides:
            if name not in known or name == "seed":
                raise ValueError(f"world_overrides: {name!r} is not a WorldConfig field one can override")
            WorldConfig(**{name: value}).validate()
        if self.world_overrides and not self.styles:
            raise ValueError("world_overrides apply to styled segments only: set the fields in world instead")
        return self

    def segment_world(self, style: StyleSample) -> WorldConfig:
        """The world of a styled segment: the sample's, with ``world``'s kept fields and ``world_overrides``."""
        kept = {name: getattr(self.world, name) for name in STYLE_KEEPS}
        return style.world_config(**{**kept, **dict(self.world_overrides)})


def style_seed(seed: int, run: int, segment: int) -> int:
    """The style seed of segment ``segment`` (0 = a) of ``run``: a new, fixed draw for each."""
    return int(np.random.SeedSequence([int(seed), int(run), int(segment)]).generate_state(1)[0] & 0x7FFFFFFF)


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
            style = f"style {s['style']} (seed {s['style_seed']}), " if "style" in s else ""
            out.append(
                f"  {s['path']}: {s['frames']} frames, {style}weather {s['weather']}, world seed {s['world_seed']}, "
                f"{s['distance_m']:.1f} m driven"
            )
        return out


def fork_available() -> bool:
    """Whether child processes can be forked here (Linux: yes; the ``isolate`` mode of :func:`synthesize`)."""
    import multiprocessing

    return "fork" in multiprocessing.get_all_start_methods()


def synthesize(
    out_dir: str | Path,
    config: SynthConfig,
    progress: bool = True,
    overwrite: bool = False,
    on_frame: Callable[[Path, FrameRecord, np.ndarray, np.ndarray], None] | None = None,
    isolate: bool = False,
) -> SynthReport:
    """Generate the dataset; every finished frame is complete on disk even if interrupted.

    ``on_frame(segment_path, record, rgb, depth_m)`` is called after each frame is written.

    ``isolate`` renders each styled segment (each run without styles) in a forked child process, which
    hands its memory back when it ends: PyBullet keeps some of every scene after it disconnects (about
    30 MB for a 40 m forest, some 200 MB for a dense 60 m one, as measured), so a long job in one process grows until
    it is killed. The frames are the same either way (the run's random stream passes from child to
    child). A child that dies (killed for memory, say) stops the job with an error naming its segment;
    the segments before it stay complete. Needs the fork start method (Linux) and no ``on_frame``.
    """
    from tqdm import tqdm

    config.validate()
    if isolate and (on_frame is not None or not fork_available()):
        raise ValueError("isolate needs the fork start method (Linux) and no on_frame callback")
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
    counts = [0, 0]  # valid depth pixels, all pixels
    # one unit of work: a styled segment (a forest of its own), or a whole run without styles (one forest)
    units = [(r, s) for r in range(config.runs)
             for s in (range(config.segments_per_run) if config.styles else (None,))]
    states: dict[int, dict] = {}  # the random stream of each run, as the last unit left it
    try:
        for r, s in units:
            run = config.first_run + r
            args = (root, config, r, s, states.get(r), overwrite)
            if isolate:
                name = run_dir_name(run) if s is None else f"{run_dir_name(run)}/{segment_name(s)}"
                entries, unit_counts, states[r] = _in_child(args, name, _render_unit)
                bar.update(sum(e["frames"] for e in entries))
            else:
                entries, unit_counts, states[r] = _render_unit(*args, bar=bar, on_frame=on_frame)
            report.segments += entries
            report.frames += sum(e["frames"] for e in entries)
            counts[0] += unit_counts[0]
            counts[1] += unit_counts[1]
    finally:
        bar.close()
    report.seconds = time.perf_counter() - t0
    report.valid_depth_fraction = counts[0] / max(counts[1], 1)
    return report


def _child_main(send: Any, args: tuple, render: Callable) -> None:  # noqa: ANN401 - a multiprocessing Connection
    """Body of :func:`_in_child`'s process: render the unit, send its result (or the error) to the parent."""
    try:
        send.send(("ok", render(*args)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
        send.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        send.close()


def _in_child(args: tuple, name: str, render: Callable | None = None) -> tuple[list[dict], list[int], dict]:
    """``render`` (default :func:`_render_unit`, a module-level function) in a child process; its result, or
    ``RuntimeError`` naming ``name``.

    The child is forked from a fork server (a fresh interpreter that never rendered), not from this process: a
    process forked from one that holds an OpenGL context (llvmpipe's rasteriser threads) hangs on its first frame.
    """
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child_main, args=(send, args, render or _render_unit), name=f"synth {name}",
                        daemon=True)
    child.start()
    send.close()
    try:
        message = receive.recv()
    except EOFError:
        message = None
    finally:
        child.join()
        receive.close()
    if message is None:
        raise RuntimeError(f"synth: the process rendering {name} died (exit code {child.exitcode}; -9: killed, "
                           f"often for memory); the segments before it are complete")
    if message[0] == "error":
        raise RuntimeError(f"synth: rendering {name} failed: {message[1]}")
    return message[1]


def _render_unit(root: Path, config: SynthConfig, r: int, s: int | None, state: dict | None, overwrite: bool,
                 bar: object = None, on_frame: Callable | None = None) -> tuple[list[dict], list[int], dict]:
    """Render one unit (styled segment ``s`` of run ``r``, or the whole run ``r`` when ``s`` is None) with the
    run's random stream at ``state``; returns the segments' entries, the depth counts and the stream's state."""
    from forest_perception.sim.scene import ForestScene

    run = config.first_run + r
    rng = np.random.default_rng([config.seed, run])
    if state is not None:
        rng.bit_generator.state = state
    counts = [0, 0]
    entries: list[dict] = []
    intrinsics = CameraIntrinsics(config.width, config.height)

    def drive(seg: int, world: ForestWorld, scene: object, weather: str | WeatherPreset,
              style: StyleSample | None) -> None:
        geometry = style.rover_geometry() if style is not None else None
        sim_cfg = SimConfig(camera=intrinsics, seed=int(rng.integers(2**31)))
        rover = RoverConfig(name="rover_0", weather=weather, start=world.free_pose(rng))
        if style is not None:
            sim_cfg = replace(sim_cfg, geometry=geometry)
            rover = replace(rover, effects=style.camera_effects())
        sim = ForestSimulator(world, sim_cfg, [rover], scene=scene)
        writer = SegmentWriter(root, run, segment_name(seg), overwrite=overwrite,
                               extra_columns=EXTRA_COLUMNS + (STYLE_COLUMNS if style is not None else ()))
        weather_name = weather.name if isinstance(weather, WeatherPreset) else weather
        if style is not None:
            _write_style_file(writer.path / STYLE_FILE, style, world, weather_name, geometry)
        try:
            distance = _record_segment(sim, writer, world, config, seg, weather_name, style, bar, counts, on_frame)
        finally:
            sim.close()
        entry = {"path": str(writer.path), "frames": config.frames_per_segment, "weather": weather_name,
                 "world_seed": world.config.seed, "distance_m": distance}
        if style is not None:
            entry.update(style=style.style, style_seed=style.seed)
        entries.append(entry)

    if s is None:
        world = generate_world(config.world, seed=config.seed + r)
        with ForestScene(world) as scene:
            for seg in range(config.segments_per_run):
                k = r * config.segments_per_run + seg
                weathers = config.weathers or (DEFAULT_WEATHER,)
                drive(seg, world, scene, weathers[k % len(weathers)], None)
    else:
        # a styled segment is a forest of its own: its world, palette, light and camera mount
        k = r * config.segments_per_run + s
        style = sample(config.styles[k % len(config.styles)], style_seed(config.seed, run, s),
                       exclude=config.exclude_styles)
        world = generate_world(config.segment_world(style))
        weather = config.weathers[k % len(config.weathers)] if config.weathers else style.weather()
        with ForestScene(world, detail=style.mesh_detail(), palette=style.palette()) as scene:
            drive(s, world, scene, weather, style)
    return entries, counts, rng.bit_generator.state


def _write_style_file(path: Path, style: StyleSample, world: ForestWorld, weather: str, geometry: object) -> None:
    """``style.json``: the style, its seed and factors, the light used, the camera mount and the world's summary."""
    data = {
        **style.to_dict(),
        "weather": weather,
        "camera_height_m": geometry.camera_height_m,
        "camera_pitch_deg": math.degrees(geometry.camera_pitch_rad),
        "world_seed": world.config.seed,
        "world": world.summary(),
    }
    path.write_text(json.dumps(data, indent=2) + "\n")


def _record_segment(sim: ForestSimulator, writer: SegmentWriter, world: ForestWorld, config: SynthConfig, s: int,
                    weather: str, style: StyleSample | None, bar: object, counts: list[int],
                    on_frame: Callable[[Path, FrameRecord, np.ndarray, np.ndarray], None] | None) -> float:
    """Drive the rover and save ``config.frames_per_segment`` frames; returns the distance driven, metres."""
    latest: dict[str, object] = {}
    distance = 0.0
    last_xy = None
    saved: tuple[float, float, float, float] | None = None  # (t, x, y, yaw) of the last saved frame

    def advance(target: float) -> None:
        nonlocal distance, last_xy
        while sim.time_s < target - 1e-9:
            for event in sim.step(render=False):
                latest[event.kind] = event.data
            st = sim.rovers[0].state
            if last_xy is not None:
                distance += math.hypot(st.x - last_xy[0], st.y - last_xy[1])
            last_xy = (st.x, st.y)

    with writer:
        for i in range(config.frames_per_segment):
            if config.min_spacing_m <= 0 or saved is None:
                advance((i + 1) * config.frame_interval_s)
            else:
                # a new view: moved far enough or turned enough since the last frame (or waited long enough)
                advance(saved[0] + config.frame_interval_s)
                while True:
                    st = sim.rovers[0].state
                    if (math.hypot(st.x - saved[1], st.y - saved[2]) >= config.min_spacing_m
                            or abs(wrap_angle(st.yaw - saved[3])) >= SPREAD_TURN_RAD
                            or sim.time_s - saved[0] >= config.frame_interval_s + SPREAD_MAX_WAIT_S):
                        break
                    advance(sim.time_s + 0.1)
            frame = sim.render_camera(0)
            state = sim.rovers[0].state
            saved = (sim.time_s, state.x, state.y, state.yaw)
            imu = latest["imu"]
            gps = latest.get("gps")
            wheels = latest.get("wheels")
            extras = {
                "weather": weather,
                "world_seed": world.config.seed,
                "pose_x": state.x,
                "pose_y": state.y,
                "pose_z": state.z,
                "pose_yaw": state.yaw,
                "canopy_cover": world.canopy_cover(state.x, state.y),
            }
            if style is not None:
                geometry = sim.config.geometry
                extras.update(style=style.style, style_seed=style.seed, camera_height_m=geometry.camera_height_m,
                              camera_pitch_deg=math.degrees(geometry.camera_pitch_rad))
            record = FrameRecord(
                stem=frame_stem(i),
                timestamp=round(s * 10_000.0 + sim.time_s, 9),
                imu=ImuSample(
                    angular_velocity=tuple(imu.angular_velocity),
                    linear_acceleration=tuple(imu.linear_acceleration),
                    orientation=tuple(imu.orientation_xyzw),
                ),
                gps=None if gps is None else GpsFix(gps.latitude, gps.longitude, gps.altitude, int(gps.status)),
                encoders=None
                if wheels is None
                else WheelEncoders(
                    float(wheels.position[0]),
                    float(wheels.position[1]),
                    float(wheels.velocity[0]),
                    float(wheels.velocity[1]),
                ),
                extras=extras,
            )
            writer.write_frame(frame.rgb, frame.depth, record)
            if on_frame is not None:
                on_frame(writer.path, record, frame.rgb, frame.depth)
            counts[0] += int(np.isfinite(frame.depth).sum())
            counts[1] += frame.depth.size
            if bar is not None:
                bar.update(1)
    return distance
