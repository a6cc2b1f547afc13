"""Multi-rover forest simulator: world + renderer + rover kinematics + sensor models.

Pure core (no rclpy). ``ForestSimulator.step()`` advances simulated time by one tick
(the IMU period) and returns the sensor events that fell due, each stamped with the
simulated time; the ROS node and the dataset generator turn events into messages or
files. Rendering happens only for camera events, so the cost follows the camera rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from forest_perception.sim.depth_camera import DepthCameraModel
from forest_perception.sim.explore import CmdVelController, ExplorationController
from forest_perception.sim.robot import CameraIntrinsics, RoverGeometry
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
from forest_perception.sim.weather import CameraEffects, WeatherPreset, apply_camera_pipeline, get_weather
from forest_perception.sim.world import ForestWorld

BEHAVIOURS = ("explore", "cmd_vel")
NS_PER_S = 1_000_000_000
CONTROL_RATE_HZ = 20.0


@dataclass(frozen=True)
class RoverConfig:
    """One simulated rover: its name (ROS namespace), weather, behaviour and start pose."""

    name: str = "rover_0"
    weather: str = "overcast"
    behaviour: str = "explore"
    start: tuple[float, float, float] | None = None
    effects: CameraEffects = field(default_factory=CameraEffects)

    def validate(self) -> RoverConfig:
        """Raise ``ValueError`` for a bad name, weather or behaviour."""
        if not self.name or not all(c.isalnum() or c == "_" for c in self.name) or self.name[0].isdigit():
            raise ValueError(
                f"rover name {self.name!r} is not a valid ROS namespace token (letters, digits, _; no leading digit)"
            )
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
        self.weather: WeatherPreset = get_weather(cfg.weather)
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
        if render and scene is None:
            from forest_perception.sim.scene import ForestScene  # PyBullet only when rendering

            self.scene = ForestScene(world, cache_dir=cache_dir)
        starts = self._start_poses(rover_cfgs)
        self.rovers = [_SimRover(i, cfg, self, starts[i]) for i, cfg in enumerate(rover_cfgs)]
        if self.scene is not None and len(self.rovers) > 1:
            palette = [(0.8, 0.3, 0.1), (0.1, 0.4, 0.8), (0.9, 0.8, 0.1), (0.5, 0.1, 0.6)]
            for r in self.rovers:
                r.body_id = self.scene.add_rover_body(color=palette[r.index % len(palette)])
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
        if self.scene is not None and len(self.rovers) > 1:
            self._sync_bodies()
        for r in self.rovers:
            if r.schedules["camera"].due(self.now_ns) and render and self.scene is not None:
                events.append(SensorEvent("camera", r.index, self.now_ns, self.render_camera(r.index)))
        return events

    def render_camera(self, rover: int) -> CameraFrame:
        """Render the rover's colour image, its aligned depth (with sensor model) and true depth."""
        if self.scene is None:
            raise RuntimeError("this simulator was built with render=False")
        r = self.rovers[rover]
        position, rotation = r.rover.camera_pose()
        cam = self.config.camera
        rgb, depth_true, _seg = self.scene.render(position, rotation, cam, r.weather)
        rgb = apply_camera_pipeline(
            rgb, depth_true, r.weather, r.cfg.effects, r.rng_cam, yaw_rate_rps=r.state.w, intrinsics=cam
        )
        depth = self.config.depth.apply(depth_true, cam, r.rng_cam)
        truth = depth_true.astype(np.float32, copy=True)
        truth[~np.isfinite(truth)] = np.nan
        return CameraFrame(rgb=rgb, depth=depth, depth_true=truth)

    def run(self, seconds: float, render: bool = True) -> list[SensorEvent]:
        """Step for ``seconds`` of simulated time and return all events (for tests and tools)."""
        events: list[SensorEvent] = []
        n = int(round(seconds * NS_PER_S / self.config.tick_ns))
        for _ in range(n):
            events.extend(self.step(render=render))
        return events

    def close(self) -> None:
        """Release the renderer."""
        if self.scene is not None and self._owns_scene:
            self.scene.close()
        self.scene = None

    def __enter__(self) -> ForestSimulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
