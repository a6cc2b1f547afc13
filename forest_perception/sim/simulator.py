"""Multi-rover forest simulator: world + renderer + rover kinematics + sensor models.

Details: docs/simulator.md (`simulator`).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field, replace

import numpy as np

from forest_perception.frames import CameraIntrinsics, RoverGeometry
from forest_perception.sim.depth_camera import DepthCameraModel
from forest_perception.sim.explore import CmdVelController, ExplorationController
from forest_perception.sim.gl_renderer import RENDERERS
from forest_perception.sim.render_pool import RenderPool, SceneSpec
from forest_perception.sim.rover import DiffDriveRover, RoverState
from forest_perception.sim.sensors import (
    EncoderModel,
    GpsFix,
    GpsModel,
    ImuModel,
    ImuSample,
    OdometryEstimate,
    WheelOdometry,
    WheelReading,
)
from forest_perception.sim.textures import Palette
from forest_perception.sim.weather import CameraEffects, WeatherPreset, apply_camera_pipeline, get_weather
from forest_perception.sim.world import ForestWorld
from forest_perception.sim.world_meshes import MeshDetail

BEHAVIOURS = ("explore", "cmd_vel")
NS_PER_S = 1_000_000_000
CONTROL_RATE_HZ = 20.0
MAX_RENDER_WORKERS = 16
ROVER_PALETTE = ((0.8, 0.3, 0.1), (0.1, 0.4, 0.8), (0.9, 0.8, 0.1), (0.5, 0.1, 0.6))


@dataclass(frozen=True)
class RoverConfig:
    """One simulated rover: its name (ROS namespace), weather, behaviour and start pose.

    ``weather`` is a preset's name or a :class:`WeatherPreset` of its own (e.g. a style's sampled light).
    """

    name: str = "rover_0"
    weather: str | WeatherPreset = "overcast"
    behaviour: str = "explore"
    start: tuple[float, float, float] | None = None
    effects: CameraEffects = field(default_factory=CameraEffects)

    def validate(self) -> RoverConfig:
        """Raise ``ValueError`` for a bad name, weather or behaviour."""
        if not self.name or not all(c.isalnum() or c == "_" for c in self.name) or self.name[0].isdigit():
            raise ValueError(
                f"rover name {self.name!r} is not a valid ROS namespace token (letters, digits, _; no leading digit)"
            )
        if isinstance(self.weather, WeatherPreset):
            self.weather.validate()
        else:
            get_weather(self.weather)
        if self.behaviour not in BEHAVIOURS:
            raise ValueError(f"unknown behaviour {self.behaviour!r}; expected one of {BEHAVIOURS}")
        self.effects.validate()
        return self


@dataclass(frozen=True)
class SimConfig:
    """Sensor rates, camera and depth models; defaults are those of a RealSense D435 rig."""

    camera: CameraIntrinsics = field(default_factory=CameraIntrinsics)
    camera_rate_hz: float = 15.0
    imu_rate_hz: float = 200.0
    gps_rate_hz: float = 10.0
    encoder_rate_hz: float = 50.0
    depth: DepthCameraModel = field(default_factory=DepthCameraModel)
    geometry: RoverGeometry = field(default_factory=RoverGeometry)
    seed: int = 0
    render_workers: int = 0
    """Background render processes: 0 renders inline in ``step()``; N renders on N workers."""
    renderer: str = "auto"
    """"opengl" (offscreen EGL), "tiny" (PyBullet's TinyRenderer) or "auto" (OpenGL when it opens); see scene.py."""

    def validate(self) -> SimConfig:
        """Raise ``ValueError`` naming the first rate or model parameter out of range."""
        self.camera.validate()
        for name, low, high in (
            ("camera_rate_hz", 0.5, 90.0),
            ("imu_rate_hz", 10.0, 1000.0),
            ("gps_rate_hz", 0.1, 50.0),
            ("encoder_rate_hz", 1.0, 1000.0),
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and low <= value <= high):
                raise ValueError(f"{name} must be within [{low}, {high}] Hz, got {value}")
        for name in ("camera_rate_hz", "gps_rate_hz", "encoder_rate_hz"):
            if getattr(self, name) > self.imu_rate_hz:
                raise ValueError(f"{name} ({getattr(self, name)}) must not exceed imu_rate_hz ({self.imu_rate_hz})")
        self.depth.validate()
        workers = self.render_workers
        if isinstance(workers, bool) or not isinstance(workers, int) or not 0 <= workers <= MAX_RENDER_WORKERS:
            raise ValueError(
                f"render_workers must be an integer within [0, {MAX_RENDER_WORKERS}] (0: inline), got {workers!r}"
            )
        if self.renderer not in RENDERERS:
            raise ValueError(f"renderer must be one of {RENDERERS}, got {self.renderer!r}")
        return self

    @property
    def tick_ns(self) -> int:
        """Simulation step: one IMU period."""
        return int(round(NS_PER_S / self.imu_rate_hz))


@dataclass
class CameraFrame:
    """One rendered colour + aligned depth pair."""

    rgb: np.ndarray
    depth: np.ndarray
    depth_true: np.ndarray


@dataclass
class SensorEvent:
    """A sensor reading due at ``stamp_ns`` for rover ``rover``; ``kind`` says which."""

    kind: str  # "imu" | "camera" | "gps" | "wheels" | "odom"
    rover: int
    stamp_ns: int
    data: ImuSample | CameraFrame | GpsFix | WheelReading | OdometryEstimate


@dataclass
class _PendingFrame:
    """A camera render submitted to the pool, with what its pipeline needs once it is back."""

    job_id: int
    rover: int
    stamp_ns: int
    yaw_rate_rps: float
    weather: WeatherPreset
    effects: CameraEffects


class _Schedule:
    """Fires every ``period_ns`` on the tick grid, phase-shifted per rover."""

    def __init__(self, rate_hz: float, phase_ns: int = 0) -> None:
        self.period_ns = NS_PER_S / rate_hz
        self.next_ns = float(phase_ns)

    def due(self, now_ns: int) -> bool:
        if now_ns + 1e-3 >= self.next_ns:
            self.next_ns += self.period_ns
            if self.next_ns <= now_ns:  # rate above tick rate or a long pause: do not burst
                self.next_ns = now_ns + self.period_ns
            return True
        return False


class _SimRover:
    def __init__(self, index: int, cfg: RoverConfig, sim: ForestSimulator, start: tuple[float, float, float]):
        self.index = index
        self.cfg = cfg
        seed = np.random.SeedSequence([sim.config.seed, index])
        rng_motion, rng_imu, rng_gps, rng_enc, rng_cam, rng_explore = (np.random.default_rng(s) for s in seed.spawn(6))
        world = sim.world
        geometry = sim.config.geometry
        weather = cfg.weather
        self.weather: WeatherPreset = weather if isinstance(weather, WeatherPreset) else get_weather(weather)
        self.rover = DiffDriveRover(geometry, world.terrain, sim.obstacles, start=start, rng=rng_motion)
        half = world.half_size
        self.explorer = ExplorationController(sim.obstacles, (-half, half, -half, half), geometry, rng_explore)
        self.teleop = CmdVelController()
        self.imu = ImuModel(rng=rng_imu, rate_hz=sim.config.imu_rate_hz)
        c = world.config
        self.gps = GpsModel(c.datum_lat_deg, c.datum_lon_deg, c.datum_alt_m, rng=rng_gps)
        self.encoders = EncoderModel(rng=rng_enc)
        self.odometry = WheelOdometry(geometry)
        self.rng_cam = rng_cam
        tick = sim.config.tick_ns
        # stagger rovers so their renders do not land on the same tick
        phase = (index * tick) % max(tick, int(NS_PER_S / sim.config.camera_rate_hz))
        self.schedules = {
            "camera": _Schedule(sim.config.camera_rate_hz, phase),
            "gps": _Schedule(sim.config.gps_rate_hz, phase),
            "wheels": _Schedule(sim.config.encoder_rate_hz, phase),
            "control": _Schedule(min(CONTROL_RATE_HZ, sim.config.imu_rate_hz), 0),
        }
        self.command: tuple[float, float] = (0.0, 0.0)
        self.body_id: int | None = None
        self.state: RoverState = self.rover.state


class ForestSimulator:
    """Several rovers driving in one generated forest, with RealSense-like sensors."""

    def __init__(
        self,
        world: ForestWorld,
        config: SimConfig | None = None,
        rovers: list[RoverConfig] | None = None,
        render: bool = True,
        cache_dir: str | None = None,
        scene: object | None = None,
        palette: Palette | None = None,
        detail: MeshDetail | None = None,
    ) -> None:
        self.world = world
        self.config = (config or SimConfig()).validate()
        rover_cfgs = [r.validate() for r in (rovers or [RoverConfig()])]
        names = [r.name for r in rover_cfgs]
        if len(set(names)) != len(names):
            raise ValueError(f"rover names must be unique, got {names}")
        self.obstacles = world.obstacle_circles(clearance_h=0.3)
        self.now_ns = 0
        self.scene = scene
        self._owns_scene = scene is None
        self._pool: RenderPool | None = None
        self._pending: deque[_PendingFrame] = deque()
        self._ready: list[SensorEvent] = []
        starts = self._start_poses(rover_cfgs)
        self.rovers = [_SimRover(i, cfg, self, starts[i]) for i, cfg in enumerate(rover_cfgs)]
        colors = tuple(ROVER_PALETTE[r.index % len(ROVER_PALETTE)] for r in self.rovers) if len(self.rovers) > 1 else ()
        if render and self.config.render_workers > 0:
            # the workers build their own scenes; a given scene only lends its build options
            spec = SceneSpec(world, cache_dir=str(cache_dir) if cache_dir is not None else None, detail=detail,
                             rover_colors=colors, palette=palette, geometry=self.config.geometry,
                             renderer=self.config.renderer)
            if scene is not None:
                spec = replace(spec, cache_dir=str(getattr(scene, "cache_dir", cache_dir)),
                               detail=getattr(scene, "detail", None), texture_size=getattr(scene, "texture_size", 256),
                               cull=getattr(scene, "cull", True), texture_seed=getattr(scene, "texture_seed", None),
                               palette=getattr(scene, "palette", None),
                               renderer=getattr(scene, "renderer", self.config.renderer))
            self._pool = RenderPool(spec, self.config.render_workers)
            return
        if render and scene is None:
            from forest_perception.sim.scene import ForestScene  # PyBullet only when rendering

            self.scene = ForestScene(world, cache_dir=cache_dir, detail=detail, palette=palette,
                                     renderer=self.config.renderer)
        if self.scene is not None and colors:
            for r, color in zip(self.rovers, colors):
                r.body_id = self.scene.add_rover_body(color=color, geometry=self.config.geometry)
            self._sync_bodies()

    # ------------------------------------------------------------------ set-up
    def _start_poses(self, cfgs: list[RoverConfig]) -> list[tuple[float, float, float]]:
        """Given starts, else spread evenly on a small circle in the central clearing."""
        n = len(cfgs)
        radius = 0.0 if n == 1 else min(max(self.world.config.clearing_radius_m - 0.6, 0.6), 2.5)
        poses = []
        for i, cfg in enumerate(cfgs):
            if cfg.start is not None:
                x, y, yaw = cfg.start
                half = self.world.half_size
                if not (-half < x < half and -half < y < half):
                    raise ValueError(f"start of {cfg.name} ({x:.1f}, {y:.1f}) is outside the {2 * half:.0f} m world")
                poses.append((float(x), float(y), float(yaw)))
                continue
            angle = 2.0 * math.pi * i / n
            poses.append((radius * math.cos(angle), radius * math.sin(angle), angle))
        return poses

    @property
    def can_render(self) -> bool:
        """Whether camera frames can be rendered (inline scene or render workers)."""
        return self._pool is not None or self.scene is not None

    def _body_poses(self) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
        """base_link (position, quat_xyzw) of every rover body, in rover order (none for a single rover)."""
        if len(self.rovers) < 2:
            return ()
        return tuple((r.rover.world_from_base()[:3, 3].copy(), np.asarray(r.rover.quaternion_xyzw(), dtype=np.float64))
                     for r in self.rovers)

    def _sync_bodies(self) -> None:
        if self.scene is None:
            return
        for r in self.rovers:
            if r.body_id is not None:
                pose = r.rover.world_from_base()
                self.scene.set_body_pose(r.body_id, pose[:3, 3], r.rover.quaternion_xyzw())

    # ------------------------------------------------------------------ control
    def set_cmd_vel(self, rover: int, v: float, w: float) -> None:
        """Teleoperation command for a rover in ``cmd_vel`` behaviour (ignored when exploring)."""
        self.rovers[rover].teleop.set(v, w, self.now_ns * 1e-9)

    def set_behaviour(self, rover: int, behaviour: str) -> None:
        """Switch a rover between ``explore`` and ``cmd_vel``."""
        r = self.rovers[rover]
        r.cfg = replace(r.cfg, behaviour=behaviour).validate()

    @property
    def time_s(self) -> float:
        """Simulated time in seconds."""
        return self.now_ns * 1e-9

    # ------------------------------------------------------------------ stepping
    def step(self, render: bool = True) -> list[SensorEvent]:
        """Advance one tick; return due events (IMU every tick, others at their rates)."""
        tick_ns = self.config.tick_ns
        dt = tick_ns * 1e-9
        self.now_ns += tick_ns
        now_s = self.now_ns * 1e-9
        events: list[SensorEvent] = []
        geometry_gps = self.config.geometry.gps_offset_m
        for r in self.rovers:
            if r.schedules["control"].due(self.now_ns):
                # the behaviour runs at a controller rate (20 Hz), as on the real rover
                if r.cfg.behaviour == "explore":
                    r.command = r.explorer.command(r.state)
                else:
                    r.command = r.teleop.command(now_s)
            r.rover.command(*r.command)
            r.state = r.rover.step(dt)
            events.append(SensorEvent("imu", r.index, self.now_ns, r.imu.sample(r.state, dt)))
            if r.schedules["wheels"].due(self.now_ns):
                reading = r.encoders.sample(r.state)
                estimate = r.odometry.update(reading, self.now_ns * 1e-9)
                events.append(SensorEvent("wheels", r.index, self.now_ns, reading))
                events.append(SensorEvent("odom", r.index, self.now_ns, estimate))
            if r.schedules["gps"].due(self.now_ns):
                cover = self.world.canopy_cover(r.state.x, r.state.y)
                events.append(
                    SensorEvent("gps", r.index, self.now_ns, r.gps.sample(r.state, cover, antenna_offset=geometry_gps))
                )
        if self._pool is not None:
            if render:
                bodies = self._body_poses()
                for r in self.rovers:
                    if r.schedules["camera"].due(self.now_ns):
                        self._submit(r, self.now_ns, bodies)
            else:
                for r in self.rovers:
                    r.schedules["camera"].due(self.now_ns)
            events.extend(self._ready)
            self._ready.clear()
            events.extend(self._collect(block=False))
            return events
        if self.scene is not None and len(self.rovers) > 1:
            self._sync_bodies()
        for r in self.rovers:
            if r.schedules["camera"].due(self.now_ns) and render and self.scene is not None:
                events.append(SensorEvent("camera", r.index, self.now_ns, self.render_camera(r.index)))
        return events

    def _submit(self, r: _SimRover, stamp_ns: int, bodies: tuple[tuple[np.ndarray, np.ndarray], ...]) -> None:
        """Hand a render of rover ``r``'s camera to the pool (blocks while the pool is full)."""
        assert self._pool is not None
        position, rotation = r.rover.camera_pose()
        job = self._pool.submit(position, rotation, self.config.camera, r.weather, bodies)
        self._pending.append(_PendingFrame(job, r.index, stamp_ns, float(r.state.w), r.weather, r.cfg.effects))

    def _collect(self, block: bool) -> list[SensorEvent]:
        """Camera events of finished renders, in submission order; all pending ones if ``block``."""
        events: list[SensorEvent] = []
        if self._pool is None:
            return events
        if not block:
            self._pool.poll()
        while self._pending and (block or self._pool.ready(self._pending[0].job_id)):
            job = self._pending.popleft()
            rgb, depth_true = self._pool.result(job.job_id)
            frame = self._finish_frame(self.rovers[job.rover], rgb, depth_true, job.yaw_rate_rps, job.weather,
                                       job.effects)
            events.append(SensorEvent("camera", job.rover, job.stamp_ns, frame))
        return events

    def flush(self) -> list[SensorEvent]:
        """Wait for every camera render in flight and return the events not yet returned by ``step()``."""
        events = self._ready + self._collect(block=True)
        self._ready = []
        return events

    def _finish_frame(self, r: _SimRover, rgb: np.ndarray, depth_true: np.ndarray, yaw_rate_rps: float,
                      weather: WeatherPreset, effects: CameraEffects) -> CameraFrame:
        """Camera pipeline and depth model on a raw render; consumes the rover's camera rng."""
        cam = self.config.camera
        rgb = apply_camera_pipeline(rgb, depth_true, weather, effects, r.rng_cam, yaw_rate_rps=yaw_rate_rps,
                                    intrinsics=cam)
        depth = self.config.depth.apply(depth_true, cam, r.rng_cam)
        truth = depth_true.astype(np.float32, copy=True)
        truth[~np.isfinite(truth)] = np.nan
        return CameraFrame(rgb=rgb, depth=depth, depth_true=truth)

    def render_camera(self, rover: int) -> CameraFrame:
        """Render the rover's colour image, its aligned depth (with sensor model) and true depth, now.

        With render workers, camera frames still in flight are finished first (their events
        come with the next ``step()``), so the camera rng is used in the same order as inline.
        """
        r = self.rovers[rover]
        if self._pool is not None:
            self._ready.extend(self._collect(block=True))
            position, rotation = r.rover.camera_pose()
            job = self._pool.submit(position, rotation, self.config.camera, r.weather, self._body_poses())
            rgb, depth_true = self._pool.result(job)
            return self._finish_frame(r, rgb, depth_true, float(r.state.w), r.weather, r.cfg.effects)
        if self.scene is None:
            raise RuntimeError("this simulator was built with render=False")
        position, rotation = r.rover.camera_pose()
        rgb, depth_true, _seg = self.scene.render(position, rotation, self.config.camera, r.weather)
        return self._finish_frame(r, rgb, depth_true, float(r.state.w), r.weather, r.cfg.effects)

    def run(self, seconds: float, render: bool = True) -> list[SensorEvent]:
        """Step for ``seconds`` of simulated time and return all events (for tests and tools).

        With render workers the camera frames still in flight at the end are waited for,
        so the result holds every frame that fell due.
        """
        events: list[SensorEvent] = []
        n = int(round(seconds * NS_PER_S / self.config.tick_ns))
        for _ in range(n):
            events.extend(self.step(render=render))
        events.extend(self.flush())
        return events

    def close(self) -> None:
        """Release the renderer and stop any render workers (frames in flight are dropped)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        self._pending.clear()
        self._ready.clear()
        if self.scene is not None and self._owns_scene:
            self.scene.close()
        self.scene = None

    def __enter__(self) -> ForestSimulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
