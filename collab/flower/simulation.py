"""The simulated swarm on this machine: the population's data, then the real ServerApp and ClientApps on Ray.

:func:`run_simulation` uses Flower's Ray backend in this process, :func:`run_with_flwr_cli` a SuperLink
in simulation mode and ``flwr run``; both keep every Flower and Ray process on 127.0.0.1 with their homes,
temp dirs and caches in a scratch folder. See ``docs/federated.md`` ("Simulation").
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from forest_perception.collab.deploy.processes import free_ports, remember_descendants, start_process, stop_process
from forest_perception.collab.deploy.supernode import write_toml_table
from forest_perception.collab.flower import LOOPBACK_ENV
from forest_perception.collab.flower import app_dir as flower_app_dir
from forest_perception.collab.flower.population import Population, make_population, recorded_population
from forest_perception.collab.flower.rover_data import ensure_rover_data

__all__ = [
    "SimulationResult",
    "SimulationSpec",
    "backend_config",
    "ensure_rover_data",
    "flower_environment",
    "make_population",
    "prepare_population",
    "run_simulation",
    "run_with_flwr_cli",
]


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
    rover_data: list[str] = field(default_factory=list)  # recorded dataset folders, one rover each (read only)
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
    """Write the population JSON and every rover's data (reusing what is there); returns it, its path, seconds.

    With ``spec.rover_data`` the rovers are those recorded folders (read, never written) and no data are made.
    """
    from forest_perception.collab.flower.task import merge_run_config

    config = merge_run_config(spec.run_config)
    out = Path(spec.out_dir)
    if spec.rover_data:
        population = recorded_population(spec.rover_data, seed=spec.population_seed, availability=spec.availability,
                                         decoder_fraction=spec.decoder_fraction, faults=spec.faults)
        return population, population.save(out / "population.json"), 0.0
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


def _wait_for_health(url: str, process: subprocess.Popen, timeout: float) -> None:
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
    ``app_dir`` (default :func:`forest_perception.collab.flower.app_dir`) with the population (recorded
    folders with no drawn availability, scope or fault: run config ``rover-data`` instead) and state file in
    a run config file, streams the logs, then stops the SuperLink's process
    group (and its descendants) by pid. Flower 1.42 takes whole CPUs per client here (``client_cpus`` is rounded up).
    """
    from forest_perception.collab.flower.store import CoordinatorStore
    from forest_perception.collab.flower.task import merge_run_config

    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    population, population_path, data_s = prepare_population(spec)
    state_db = Path(spec.run_config.get("state-db") or out / "coordinator.db").resolve()
    rovers = {"population": str(population_path.resolve())}
    if spec.rover_data and all(r.availability == 1.0 and r.scope == "all" and not r.fault for r in population.rovers):
        # recorded rovers with nothing drawn for them: the run config key a user writes for `flwr run` by hand
        rovers = {"population": "", "rover-data": os.pathsep.join(str(Path(f).resolve()) for f in spec.rover_data)}
    config = merge_run_config(spec.run_config, {**rovers, "state-db": str(state_db)})
    config_path = write_toml_table(out / "run_config.toml", config)
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
            superlink = start_process(
                "superlink",
                [str(bin_dir / "flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
                 "--host", "127.0.0.1", "--port", str(http), "--fleet-api-address", f"127.0.0.1:{fleet}",
                 "--control-api-address", f"127.0.0.1:{control}", "--health-server-address", f"127.0.0.1:{health}",
                 "--disable-runtime-dependency-installation"],
                out / "superlink.log", child_env, out,
            )
            _wait_for_health(f"http://127.0.0.1:{http}/health", superlink.popen, 60.0)
            federation = (f"num-supernodes={spec.num_rovers} client-resources-num-cpus={math.ceil(spec.client_cpus)} "
                          f"init-args-num-cpus={spec.ray_cpus}")
            start = time.perf_counter()
            run = subprocess.run(
                [str(bin_dir / "flwr"), "run", str(app_dir), "forest", "--stream", "--federation-config", federation,
                 "--run-config", str(config_path)],
                env=child_env, capture_output=True, text=True, timeout=timeout,
            )
            wall = time.perf_counter() - start
            (out / "flwr_run.log").write_text(run.stdout + run.stderr)
            if run.returncode != 0:
                raise RuntimeError(f"flwr run failed ({run.returncode}): {(run.stdout + run.stderr)[-2000:]}")
    finally:
        if superlink is not None:
            remember_descendants(superlink)
            stop_process(superlink)
            superlink.log_file.close()
        shutil.rmtree(scratch, ignore_errors=True)
    if not state_db.is_file():
        raise RuntimeError(f"flwr run left no coordinator store at {state_db}; see {out / 'flwr_run.log'}")
    with CoordinatorStore(state_db, readonly=True) as store:
        rounds, summary = store.rounds(), store.summary()
    if not rounds or rounds[-1]["round"] < config["num-server-rounds"]:
        raise RuntimeError(f"flwr run ended after round {rounds[-1]['round'] if rounds else 0}; "
                           f"see {out / 'flwr_run.log'}")
    return SimulationResult(out, state_db, population_path, wall, data_s, rounds, summary)
