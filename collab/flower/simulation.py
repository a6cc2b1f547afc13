"""Simulated swarm: a virtual rover population, its local datasets and the Flower/Ray simulation runner.

Each virtual rover has its own forest (seed: tree density, sizes, positions), weather preset,
availability schedule and, optionally, a training scope (``decoder`` for a weak board) or a
fault to inject. Data are non-iid by construction: the forests and the light differ. With
``num_blocks > 1`` the population is block-cyclic, as through a day: rover ``i`` drives in
block ``i % num_blocks`` (whose light is ``BLOCK_WEATHERS[block]``) and is only out in the
rounds of its block; otherwise every rover is out in a round with its own probability.
Whether a rover is out in round ``r`` is drawn from ``(seed, rover, r)``, so it is the same
after a coordinator restart.

Local datasets are written in the forest dataset layout under ``<data_root>/<rover_id>``:

- ``procedural`` (default): a fast numpy ray caster (flat ground, tree trunks as vertical
  cylinders, the weather preset's sky, light, fog and tint), about a millisecond a frame,
  enough for 100 rovers on two cores;
- ``synth``: :func:`forest_perception.dataset_tools.synth.synthesize` (the pybullet forest, ~0.3 s a frame).

A folder is reused when its stamp matches the rover, so repeated runs do not regenerate data.

:func:`run_simulation` writes the population, then runs the real ServerApp and ClientApp
(:func:`flwr.simulation.run_simulation`, Ray backend) with every Flower/Ray process on
127.0.0.1, Flower's home, Ray's temp dir and torch caches in a scratch folder, telemetry and
runtime dependency installation off.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from forest_perception.collab.deploy.processes import free_ports
from forest_perception.collab.flower import LOOPBACK_ENV
from forest_perception.collab.flower import app_dir as flower_app_dir

POPULATION_VERSION = 1
DATA_GENERATOR_VERSION = 1
BLOCK_WEATHERS: tuple[str, ...] = ("sunny", "dusk", "overcast", "fog", "rain")
"""The light of each block of a block-cyclic day (block ``m`` drives in ``BLOCK_WEATHERS[m % 5]``)."""
DATA_SOURCES = ("procedural", "synth")


# ---------------------------------------------------------------------------------------------- population


@dataclass(frozen=True)
class VirtualRover:
    """One simulated rover."""

    rover_id: str
    partition_id: int
    forest_seed: int
    weather: str
    block: int = 0
    availability: float = 1.0  # probability of being out in one of its block's rounds
    scope: str = "all"
    fault: str = ""
    data_dir: str = ""
    frames: int = 8


@dataclass
class Population:
    """The virtual rovers of a simulation and their availability schedule."""

    rovers: list[VirtualRover]
    seed: int = 0
    num_blocks: int = 1
    rounds_per_block: int = 1
    _by_id: dict[str, VirtualRover] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self._by_id = {r.rover_id: r for r in self.rovers}
        if len(self._by_id) != len(self.rovers):
            raise ValueError("population has repeated rover ids")
        if sorted(r.partition_id for r in self.rovers) != list(range(len(self.rovers))):
            raise ValueError("population partition ids must be 0..N-1, one per rover")
        if self.num_blocks < 1 or self.rounds_per_block < 1:
            raise ValueError(f"num_blocks and rounds_per_block must be >= 1, got {self.num_blocks}, "
                             f"{self.rounds_per_block}")

    def __len__(self) -> int:
        return len(self.rovers)

    def by_partition(self, partition_id: int) -> VirtualRover:
        """The rover simulated by Flower node ``partition-id``."""
        for rover in self.rovers:
            if rover.partition_id == partition_id:
                return rover
        raise ValueError(f"population has no rover for partition-id {partition_id} (it has {len(self.rovers)})")

    def rover(self, rover_id: str) -> VirtualRover:
        """The rover called ``rover_id``."""
        try:
            return self._by_id[rover_id]
        except KeyError:
            raise ValueError(f"population has no rover {rover_id!r}") from None

    def block_of(self, server_round: int) -> int:
        """The block of a round (rounds count from 1)."""
        return ((server_round - 1) // self.rounds_per_block) % self.num_blocks

    def is_available(self, rover_id: str, server_round: int) -> bool:
        """Whether the rover is out (connected) in ``server_round``; unknown rovers are not."""
        rover = self._by_id.get(rover_id)
        if rover is None:
            return False
        if self.num_blocks > 1 and self.block_of(server_round) != rover.block:
            return False
        draw = np.random.default_rng([self.seed, rover.partition_id, server_round]).random()
        return bool(draw < rover.availability)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "version": POPULATION_VERSION,
            "seed": self.seed,
            "num_blocks": self.num_blocks,
            "rounds_per_block": self.rounds_per_block,
            "rovers": [asdict(r) for r in self.rovers],
        }

    def save(self, path: str | Path) -> Path:
        """Write the population JSON (atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, path)
        return path


def make_population(
    num_rovers: int,
    data_root: str | Path,
    seed: int = 0,
    weathers: Sequence[str] = ("sunny", "overcast", "dusk", "fog", "rain"),
    num_blocks: int = 1,
    rounds_per_block: int = 1,
    availability: tuple[float, float] = (0.6, 1.0),
    decoder_fraction: float = 0.0,
    faults: Mapping[int, str] | None = None,
    frames: int = 8,
) -> Population:
    """A population of ``num_rovers`` virtual rovers (ids ``rover_000``...), reproducible from ``seed``.

    ``availability`` is the range each rover's probability of being out is drawn from;
    ``decoder_fraction`` of the rovers train only the decoder; ``faults`` maps partition ids to
    a fault of :data:`forest_perception.collab.flower.client_app.FAULTS` (such rovers are always available).
    """
    from forest_perception.sim.weather import get_weather

    if num_rovers < 1:
        raise ValueError(f"num_rovers must be >= 1, got {num_rovers}")
    if frames < 2:
        raise ValueError(f"frames must be >= 2 (two segments per rover), got {frames}")
    lo, hi = availability
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"availability must be a range within (0, 1], got {availability}")
    if not 0.0 <= decoder_fraction <= 1.0:
        raise ValueError(f"decoder_fraction must be within [0, 1], got {decoder_fraction}")
    for w in weathers:
        get_weather(w)
    faults = dict(faults or {})
    bad = {k: v for k, v in faults.items() if not 0 <= k < num_rovers}
    if bad:
        raise ValueError(f"faults name rovers outside 0..{num_rovers - 1}: {bad}")
    rng = np.random.default_rng([seed, 7])
    decoder_ids = set(rng.choice(num_rovers, size=round(decoder_fraction * num_rovers), replace=False).tolist())
    rovers = []
    for i in range(num_rovers):
        block = i % num_blocks
        weather = BLOCK_WEATHERS[block % len(BLOCK_WEATHERS)] if num_blocks > 1 else weathers[int(rng.integers(len(
            weathers)))]
        rover_id = f"rover_{i:03d}"
        rovers.append(
            VirtualRover(
                rover_id=rover_id,
                partition_id=i,
                forest_seed=int(rng.integers(2**31)),
                weather=weather,
                block=block,
                availability=1.0 if i in faults else float(round(rng.uniform(lo, hi), 4)),
                scope="decoder" if i in decoder_ids else "all",
                fault=faults.get(i, ""),
                data_dir=str(Path(data_root) / rover_id),
                frames=int(frames),
            )
        )
    return Population(rovers, seed=seed, num_blocks=num_blocks, rounds_per_block=rounds_per_block)


@lru_cache(maxsize=8)
def _load_population_cached(path: str, mtime_ns: int) -> Population:
    raw = json.loads(Path(path).read_text())
    if raw.get("version") != POPULATION_VERSION:
        raise ValueError(f"population {path}: version {raw.get('version')!r}, this code reads {POPULATION_VERSION}")
    try:
        rovers = [VirtualRover(**r) for r in raw["rovers"]]
        return Population(rovers, int(raw["seed"]), int(raw["num_blocks"]), int(raw["rounds_per_block"]))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"population {path} is malformed: {exc}") from None


def load_population(path: str | Path) -> Population:
    """Read a population JSON (cached per process until the file changes)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"population file {path} does not exist")
    return _load_population_cached(str(path.resolve()), path.stat().st_mtime_ns)


# ---------------------------------------------------------------------------------------------- procedural data


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
    """Write the rover's dataset unless its folder already holds this exact one; True when written."""
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


# ---------------------------------------------------------------------------------------------- runner


@dataclass
class SimulationSpec:
    """A simulated federated run: the population, its data and the run config overrides."""

    out_dir: str | Path
    num_rovers: int = 10
    run_config: dict = field(default_factory=dict)
    frames_per_rover: int = 8
    data_size: tuple[int, int] = (64, 80)  # height, width of the stored frames
    data_source: str = "procedural"
    data_root: str | Path | None = None  # default <out_dir>/rovers; share it between runs to reuse data
    availability: tuple[float, float] = (0.6, 1.0)
    decoder_fraction: float = 0.0
    faults: dict[int, str] = field(default_factory=dict)
    population_seed: int = 0
    client_cpus: float = 1.0
    ray_cpus: int = 2
    verbose: bool = False


@dataclass
class SimulationResult:
    """What a simulation left: where, how long, and the store's rounds."""

    out_dir: Path
    state_db: Path
    population: Path
    wall_s: float
    data_s: float
    rounds: list[dict]
    summary: dict


@contextmanager
def flower_environment(scratch: str | Path) -> Iterator[dict[str, str]]:
    """Environment for Flower and Ray inside ``scratch`` (homes, temp and caches), loopback only; restored after."""
    scratch = Path(scratch)
    env = dict(LOOPBACK_ENV)
    env.update(
        FLWR_HOME=str(scratch / "flwr"),
        RAY_TMPDIR=str(scratch / "ray"),
        TORCHINDUCTOR_CACHE_DIR=str(scratch / "torchinductor"),
    )
    for key in ("FLWR_HOME", "RAY_TMPDIR"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import sys

    constants = sys.modules.get("ray._private.ray_constants")
    saved_cluster = getattr(constants, "ENABLE_RAY_CLUSTER", None) if constants else None
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False  # ray was imported before the variable was set
    try:
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if constants is not None:
            constants.ENABLE_RAY_CLUSTER = saved_cluster


def backend_config(ray_tmp: str | Path, client_cpus: float = 1.0, ray_cpus: int = 2) -> dict:
    """Ray backend config: ``ray_cpus`` CPUs for the whole simulation, ``client_cpus`` per ClientApp actor."""
    if not 0 < client_cpus <= ray_cpus:
        raise ValueError(f"client_cpus must be within (0, ray_cpus={ray_cpus}], got {client_cpus}")
    return {
        "client_resources": {"num_cpus": float(client_cpus), "num_gpus": 0.0},
        "init_args": {
            "num_cpus": int(ray_cpus),
            "num_gpus": 0,
            "include_dashboard": False,
            "_temp_dir": str(ray_tmp),
            "object_store_memory": 100 * 1024 * 1024,
            "logging_level": "ERROR",
            "log_to_driver": False,
        },
    }


def prepare_population(spec: SimulationSpec) -> tuple[Population, Path, float]:
    """Write the population JSON and every rover's data (reusing what is there); returns it, its path, seconds."""
    from forest_perception.collab.flower.task import merge_run_config

    config = merge_run_config(spec.run_config)
    out = Path(spec.out_dir)
    data_root = Path(spec.data_root) if spec.data_root else out / "rovers"
    semicyclic = config["algorithm"] in ("mm-psgd", "mc-psgd")
    population = make_population(
        spec.num_rovers, data_root, seed=spec.population_seed,
        num_blocks=config["num-blocks"] if semicyclic else 1, rounds_per_block=config["rounds-per-block"],
        availability=spec.availability, decoder_fraction=spec.decoder_fraction, faults=spec.faults,
        frames=spec.frames_per_rover,
    )
    start = time.perf_counter()
    height, width = spec.data_size
    for rover in population.rovers:
        ensure_rover_data(rover, width, height, spec.data_source)
    path = population.save(out / "population.json")
    return population, path, time.perf_counter() - start


def run_simulation(spec: SimulationSpec) -> SimulationResult:
    """Prepare the population and run the ServerApp and ClientApps on Ray; resumes a run found in ``out_dir``."""
    from forest_perception.collab.flower.client_app import make_client_app
    from forest_perception.collab.flower.server_app import make_server_app
    from forest_perception.collab.flower.store import CoordinatorStore
    from forest_perception.collab.flower.task import merge_run_config

    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _, population_path, data_s = prepare_population(spec)
    state_db = Path(spec.run_config.get("state-db") or out / "coordinator.db")
    config = merge_run_config(spec.run_config, {"population": str(population_path), "state-db": str(state_db)})
    # Ray's unix socket paths must stay short: scratch goes under the system temp dir, not the (long) out dir
    scratch = Path(tempfile.mkdtemp(prefix="fl-"))
    try:
        with flower_environment(scratch) as env:
            from flwr.simulation import run_simulation as flower_run_simulation

            start = time.perf_counter()
            flower_run_simulation(
                server_app=make_server_app(config),
                client_app=make_client_app(config),
                num_supernodes=spec.num_rovers,
                backend_config=backend_config(env["RAY_TMPDIR"], spec.client_cpus, spec.ray_cpus),
                verbose_logging=spec.verbose,
            )
            wall = time.perf_counter() - start
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    with CoordinatorStore(state_db, readonly=True) as store:
        rounds, summary = store.rounds(), store.summary()
    if not rounds or rounds[-1]["round"] < config["num-server-rounds"]:
        raise RuntimeError(
            f"simulation ended after round {rounds[-1]['round'] if rounds else 0} of {config['num-server-rounds']}; "
            f"see the log above and {state_db}"
        )
    return SimulationResult(out, state_db, population_path, wall, data_s, rounds, summary)


def _toml_value(value: bool | int | float | str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return "'" + value.replace("'", "") + "'"
    return repr(value)


def _wait_for_health(url: str, process: object, timeout: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with code {process.returncode} while starting")
        try:
            with urllib.request.urlopen(url, timeout=0.5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"flower-superlink did not answer {url} within {timeout:.0f} s")


def run_with_flwr_cli(
    spec: SimulationSpec, app_dir: str | Path | None = None, timeout: float = 900.0
) -> SimulationResult:
    """The same run through Flower's own CLI: a SuperLink in simulation mode and ``flwr run``.

    Starts ``flower-superlink --simulation`` on free 127.0.0.1 ports with ``FLWR_HOME`` in a
    scratch folder (holding the SuperLink connection in ``config.toml``), submits the app in
    ``app_dir`` (default :func:`forest_perception.collab.flower.app_dir`) with the population and
    state file as run config overrides, streams the logs, then stops the SuperLink's process
    group by its pid. Flower 1.42 takes whole CPUs per client here (``client_cpus`` is rounded up).
    """
    import signal
    import subprocess
    import sys

    from forest_perception.collab.flower.store import CoordinatorStore
    from forest_perception.collab.flower.task import merge_run_config

    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _, population_path, data_s = prepare_population(spec)
    state_db = Path(spec.run_config.get("state-db") or out / "coordinator.db").resolve()
    config = merge_run_config(spec.run_config, {"population": str(population_path.resolve()),
                                                "state-db": str(state_db)})
    app_dir = Path(app_dir) if app_dir else flower_app_dir()
    bin_dir = Path(sys.executable).parent
    scratch = Path(tempfile.mkdtemp(prefix="fl-"))
    http, fleet, control, health = free_ports(4)
    superlink = None
    try:
        with flower_environment(scratch) as env:
            (Path(env["FLWR_HOME"]) / "config.toml").write_text(
                '[superlink]\ndefault = "forest"\n\n[superlink.forest]\n'
                f'address = "127.0.0.1:{http}"\ninsecure = true\n'
            )
            child_env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
            log_file = open(out / "superlink.log", "w")  # noqa: SIM115 - closed in finally
            superlink = subprocess.Popen(
                [str(bin_dir / "flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
                 "--host", "127.0.0.1", "--port", str(http), "--fleet-api-address", f"127.0.0.1:{fleet}",
                 "--control-api-address", f"127.0.0.1:{control}", "--health-server-address", f"127.0.0.1:{health}",
                 "--disable-runtime-dependency-installation"],
                env=child_env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
            )
            _wait_for_health(f"http://127.0.0.1:{http}/health", superlink, 60.0)
            federation = (f"num-supernodes={spec.num_rovers} client-resources-num-cpus={math.ceil(spec.client_cpus)} "
                          f"init-args-num-cpus={spec.ray_cpus}")
            overrides = " ".join(f"{k}={_toml_value(v)}" for k, v in config.items())
            start = time.perf_counter()
            run = subprocess.run(
                [str(bin_dir / "flwr"), "run", str(app_dir), "forest", "--stream", "--federation-config", federation,
                 "--run-config", overrides],
                env=child_env, capture_output=True, text=True, timeout=timeout,
            )
            wall = time.perf_counter() - start
            (out / "flwr_run.log").write_text(run.stdout + run.stderr)
            if run.returncode != 0:
                raise RuntimeError(f"flwr run failed ({run.returncode}): {(run.stdout + run.stderr)[-2000:]}")
    finally:
        if superlink is not None:
            for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
                if superlink.poll() is not None:
                    break
                try:
                    os.killpg(superlink.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    superlink.wait(wait)
                except subprocess.TimeoutExpired:
                    continue
            log_file.close()
        shutil.rmtree(scratch, ignore_errors=True)
    if not state_db.is_file():
        raise RuntimeError(f"flwr run left no coordinator store at {state_db}; see {out / 'flwr_run.log'}")
    with CoordinatorStore(state_db, readonly=True) as store:
        rounds, summary = store.rounds(), store.summary()
    if not rounds or rounds[-1]["round"] < config["num-server-rounds"]:
        raise RuntimeError(f"flwr run ended after round {rounds[-1]['round'] if rounds else 0}; "
                           f"see {out / 'flwr_run.log'}")
    return SimulationResult(out, state_db, population_path, wall, data_s, rounds, summary)


# ---------------------------------------------------------------------------------------------- in-process grid


class LocalGrid(Grid):
    """A Flower ``Grid`` that hands messages to a ClientApp in this process: no Ray, no network.

    For tests and debugging of strategies and apps: ``num_nodes`` virtual nodes (node ids
    ``1001, 1002, ...``) with node config ``partition-id`` / ``num-partitions`` (plus
    ``node_configs[i]``) and the given run config. An exception in the ClientApp comes back
    as an error reply, as from a real SuperNode; ``online(node_id, server_round)`` returning
    False makes a node silent (no reply, as after a timeout). Every reply is counted in
    :attr:`delivered`.
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        run_config: Mapping | None = None,
        node_configs: Sequence[Mapping] | None = None,
        online: Callable[[int, int], bool] | None = None,
    ) -> None:
        from flwr.supercore.task_identity import TaskIdentity

        # messages built outside a Flower runtime need a task identity; keep one that is set
        if TaskIdentity._run_id is None:
            TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
        self.client_app = client_app
        self.online = online
        self.delivered = 0
        self._replies: dict[str, Message | None] = {}
        self.contexts: dict[int, Context] = {}
        extra = list(node_configs or [{}] * num_nodes)
        for i in range(num_nodes):
            node_config = {"partition-id": i, "num-partitions": num_nodes, **dict(extra[i])}
            self.contexts[1001 + i] = Context(
                run_id=1, node_id=1001 + i, node_config=node_config, state=RecordDict(),
                run_config=dict(run_config or {}),
            )

    def set_run(self, run: Run) -> None:
        """Nothing to do: one implicit run."""

    @property
    def run(self) -> Run:
        """The implicit run."""
        return Run.create_empty(run_id=1)

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        """A message to ``dst_node_id`` (deprecated in Flower; kept for the Grid interface)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        """All virtual nodes."""
        return list(self.contexts)

    def _deliver(self, message: Message) -> Message | None:
        node = message.metadata.dst_node_id
        if node not in self.contexts:
            return Message(Error(code=3, reason=f"node {node} does not exist"), reply_to=message)
        config = message.content.config_records.get("config")
        server_round = config.get("server-round", 0) if config is not None else 0
        if self.online is not None and not self.online(node, server_round):
            return None
        try:
            reply = self.client_app(message, self.contexts[node])
        except Exception as exc:  # a real SuperNode reports a ClientApp exception as an error reply
            reply = Message(Error(code=2, reason=f"{type(exc).__name__}: {exc}"), reply_to=message)
        self.delivered += 1
        return reply

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Deliver now; replies wait for :meth:`pull_messages`."""
        ids = []
        for i, message in enumerate(messages):
            key = f"m{len(self._replies)}-{i}"
            self._replies[key] = self._deliver(message)
            ids.append(key)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """The replies to the given message ids (silent nodes have none)."""
        out = [self._replies.pop(i, None) for i in message_ids]
        return [m for m in out if m is not None]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Deliver every message and return the replies."""
        return self.pull_messages(self.push_messages(messages))

