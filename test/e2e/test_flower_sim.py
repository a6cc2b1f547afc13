"""Virtual rover population, its data, the real apps in process, and (slow) the Ray and `flwr run` simulations."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import tomllib

from forest_perception.collab.algorithms import fedavg
from forest_perception.collab.flower import LOOPBACK_ENV
from forest_perception.collab.flower.client_app import make_client_app
from forest_perception.collab.flower.local_grid import LocalGrid
from forest_perception.collab.flower.population import Population, load_population, make_population
from forest_perception.collab.flower.rover_data import ensure_rover_data
from forest_perception.collab.flower.server_app import build_coordinator
from forest_perception.collab.flower.simulation import (
    SimulationSpec,
    backend_config,
    flower_environment,
    run_with_flwr_cli,
)
from forest_perception.collab.flower.store import CoordinatorStore
from forest_perception.collab.flower.task import (
    DEFAULT_RUN_CONFIG,
    NoDataError,
    TaskConfig,
    load_local_data,
    merge_run_config,
)

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------- population


def test_population_is_reproducible_and_its_schedule_is_deterministic(tmp_path):
    a = make_population(20, tmp_path, seed=4, availability=(0.3, 0.9), decoder_fraction=0.25, faults={3: "nan"})
    b = make_population(20, tmp_path, seed=4, availability=(0.3, 0.9), decoder_fraction=0.25, faults={3: "nan"})
    assert a.rovers == b.rovers
    assert len({r.forest_seed for r in a.rovers}) == 20 and len({r.weather for r in a.rovers}) > 1
    assert sum(r.scope == "decoder" for r in a.rovers) == 5
    assert a.rover("rover_003").fault == "nan" and a.rover("rover_003").availability == 1.0
    out = [[a.is_available(r.rover_id, rnd) for rnd in range(1, 30)] for r in a.rovers]
    assert out == [[b.is_available(r.rover_id, rnd) for rnd in range(1, 30)] for r in b.rovers]
    share = np.mean(out)
    assert 0.35 < share < 0.95 and not all(all(row) for row in out)  # rovers come and go
    assert not a.is_available("rover_999", 1)

    cyclic = make_population(6, tmp_path, seed=1, num_blocks=3, rounds_per_block=2, availability=(1, 1))
    for rnd in range(1, 13):
        block = ((rnd - 1) // 2) % 3
        expected = [r.block == block for r in cyclic.rovers]
        assert [cyclic.is_available(r.rover_id, rnd) for r in cyclic.rovers] == expected
    assert cyclic.rover("rover_001").weather == "dusk"

    path = a.save(tmp_path / "population.json")
    loaded = load_population(path)
    assert loaded.rovers == a.rovers and loaded.by_partition(7).rover_id == "rover_007"
    with pytest.raises(ValueError, match="no rover for partition-id 20"):
        loaded.by_partition(20)


def test_population_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="faults name rovers outside 0..4"):
        make_population(5, tmp_path, faults={7: "nan"})
    with pytest.raises(ValueError, match="unknown weather preset 'snow'"):
        make_population(5, tmp_path, weathers=("snow",))
    with pytest.raises(FileNotFoundError, match="nope.json does not exist"):
        load_population(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text('{"version": 1, "seed": 0, "num_blocks": 1, "rounds_per_block": 1, '
                                       '"rovers": [{"rover_id": "x"}]}')
    with pytest.raises(ValueError, match="bad.json is malformed"):
        load_population(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="partition ids"):
        Population(make_population(3, tmp_path).rovers[1:])


def test_rover_data_are_non_iid_in_the_dataset_layout_and_reused(tmp_path):
    sunny, other = make_population(2, tmp_path / "rovers", seed=0, weathers=("sunny",), frames=4).rovers
    foggy = dataclasses.replace(other, weather="fog")
    assert ensure_rover_data(sunny, 64, 48) and ensure_rover_data(foggy, 64, 48)
    assert not ensure_rover_data(sunny, 64, 48)  # same stamp: reused
    assert sorted(p.name for p in (Path(sunny.data_dir) / "Run-1").iterdir()) == ["a", "b"]
    config = TaskConfig(input_hw=(48, 64))
    a, b = load_local_data(sunny.data_dir, config), load_local_data(foggy.data_dir, config)
    assert (a.num_train, a.num_val, a.val_is_train) == (2, 2, False)
    valid = a.train_depth[a.train_depth > 0]
    assert float(valid.min()) > 0.1 and float(valid.max()) <= 20.0  # the ray caster's range
    assert 0.3 < valid.numel() / a.train_depth.numel() < 1.0  # sky and far trunks are invalid (0)
    # fog washes the colours out: far less spread between the channels of a pixel than in sunlight
    assert float(b.train_images.std(dim=1).mean()) < 0.5 * float(a.train_images.std(dim=1).mean())
    assert load_local_data(sunny.data_dir, config) is a  # decoded once per process
    with pytest.raises(NoDataError, match="missing does not exist"):
        load_local_data(tmp_path / "missing", config)


def test_environment_keeps_flower_and_ray_on_loopback_in_a_scratch_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("FLWR_HOME", raising=False)
    with flower_environment(tmp_path) as env:
        assert os.environ["FLWR_HOME"] == str(tmp_path / "flwr") and Path(env["RAY_TMPDIR"]).is_dir()
        for key, value in LOOPBACK_ENV.items():
            assert os.environ[key] == value
    assert "FLWR_HOME" not in os.environ
    config = backend_config(tmp_path, client_cpus=0.25, ray_cpus=2)
    assert config["client_resources"]["num_cpus"] == 0.25 and config["init_args"]["include_dashboard"] is False
    with pytest.raises(ValueError, match="client_cpus"):
        backend_config(tmp_path, client_cpus=3, ray_cpus=2)


def test_pyproject_names_the_apps_and_holds_the_default_run_config():
    from flwr.common.config import validate_config

    from forest_perception.collab.flower import app_dir

    config = tomllib.loads((app_dir() / "pyproject.toml").read_text())
    assert config["tool"]["flwr"]["app"]["config"] == DEFAULT_RUN_CONFIG
    valid, errors, _ = validate_config(config, check_module=True, project_dir=app_dir())
    assert valid, errors
    assert "federations" not in config["tool"]["flwr"]  # flwr run 1.42 would rewrite pyproject.toml
    with pytest.raises(ValueError, match="unknown run config key 'algorithmm'"):
        merge_run_config({"algorithmm": "fedavg"})
    with pytest.raises(ValueError, match="base-channels must be an integer"):
        merge_run_config({"base-channels": 4.5})


# ---------------------------------------------------------------------------------------------- real apps, in process


def test_real_apps_train_screen_and_store_in_process(tmp_path):
    population = make_population(5, tmp_path / "rovers", seed=2, availability=(1, 1), frames=4,
                                 faults={2: "nan", 3: "stale", 4: "no-data"})
    for rover in population.rovers:
        ensure_rover_data(rover, 64, 48)
    config = merge_run_config({
        "population": str(population.save(tmp_path / "population.json")), "state-db": str(tmp_path / "c.db"),
        "input-height": 48, "input-width": 64, "num-server-rounds": 2, "store-updates": True,
        "fraction-evaluate": 1.0, "local-steps": 2,
    })
    grid = LocalGrid(make_client_app(config), len(population), run_config=config)
    coordinator = build_coordinator(config)
    records = coordinator.run(grid)
    coordinator.store.close()
    status = {(e.rover_id, e.status, e.reason) for e in records[0].entries}
    assert status == {("rover_000", "accepted", ""), ("rover_001", "accepted", ""),
                      ("rover_002", "rejected", "non_finite"), ("rover_003", "rejected", "stale"),
                      ("rover_004", "failed", "no_data")}
    failed = next(e for e in records[0].entries if e.rover_id == "rover_004")
    assert "does not exist" in failed.message
    with CoordinatorStore(tmp_path / "c.db", readonly=True) as store:
        for server_round in (1, 2):
            accepted = store.stored_updates(server_round)
            assert sorted(u.client_id for u in accepted) == ["rover_000", "rover_001"]
            expected = fedavg(store.model(server_round - 1)[1], accepted)
            for got, want in zip(store.model(server_round)[1], expected):
                np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
        rounds = store.rounds()
        assert all(np.isfinite(r["train_metrics"]["train-loss"]) for r in rounds)
        assert rounds[-1]["eval_metrics"]["rovers"] == 4 and 0 < rounds[-1]["eval_metrics"]["delta1"] <= 1


# ---------------------------------------------------------------------------------------------- Ray, slow


def _rounds_in(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM rounds").fetchone()[0])
    except sqlite3.Error:
        return 0


def _ray_processes() -> dict[int, str]:
    ps = subprocess.run(["ps", "-eo", "pid,cmd"], capture_output=True, text=True).stdout.splitlines()
    lines = [line.strip() for line in ps if any(k in line for k in ("raylet", "gcs_server", "ray::ClientAppActor"))]
    return {int(line.split(None, 1)[0]): line for line in lines}


def _no_ray_left_behind(before: dict[int, str], timeout: float = 30.0) -> list[str]:
    """Ray processes started since ``before`` that are still alive after ``timeout`` s (actors exit a
    few seconds after their driver; Ray of other jobs on the machine is not ours)."""
    deadline = time.monotonic() + timeout
    while True:
        left = [line for pid, line in _ray_processes().items() if pid not in before]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


@pytest.mark.slow
def test_ray_simulation_refuses_bad_rovers_and_resumes_after_being_killed(tmp_path):
    ray_before = _ray_processes()
    out = tmp_path / "run"
    scratch = Path(tempfile.mkdtemp(prefix="flt-"))  # Ray needs short socket paths
    command = [
        sys.executable, "-m", "forest_perception.collab.flower.cli", "simulate", "--out", str(out),
        "--rovers", "6", "--rounds", "3",
        "--frames", "4", "--image-size", "64x48", "--availability", "1", "1", "--client-cpus", "2",
        "--fault", "2=nan", "--fault", "3=shape", "--fault", "4=huge", "--fault", "5=stale",
        "--set", "store-updates=true", "--set", "input-height=48", "--set", "input-width=64",
        "--set", "local-steps=1",
    ]
    env = {**os.environ, "TMPDIR": str(scratch)}
    first = None
    try:
        first = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
        # generous: on a 2-core CI machine busy with other jobs Ray alone can take minutes to start
        wait_s = 480
        deadline = time.monotonic() + wait_s
        while _rounds_in(out / "coordinator.db") < 1 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        exited = first.poll()
        os.killpg(first.pid, signal.SIGKILL)  # the coordinator dies mid-run, Ray with it
        first.wait(30)
        killed_at = _rounds_in(out / "coordinator.db")
        assert 1 <= killed_at < 3, (f"{killed_at} rounds stored when the coordinator was killed (it had "
                                    f"{'exited with ' + str(exited) if exited is not None else 'not exited'}; "
                                    f"waited up to {wait_s} s for the first round)")
        second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert second.returncode == 0, second.stderr[-3000:]
    finally:
        if first is not None and first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(30)
        shutil.rmtree(scratch, ignore_errors=True)
    assert _no_ray_left_behind(ray_before) == []
    with CoordinatorStore(out / "coordinator.db", readonly=True) as store:
        rounds = store.rounds()
        assert [r["round"] for r in rounds] == [1, 2, 3]
        assert [r["resumed"] for r in rounds] == [i == killed_at for i in range(3)]
        for server_round in (1, 2, 3):
            reasons = {u["rover_id"]: u["reason"] for u in store.rejections(server_round)}
            assert reasons == {"rover_002": "non_finite", "rover_003": "shape", "rover_004": "norm",
                               "rover_005": "stale"}
            accepted = store.stored_updates(server_round)
            assert sorted(u.client_id for u in accepted) == ["rover_000", "rover_001"]
            expected = fedavg(store.model(server_round - 1)[1], accepted)
            for got, want in zip(store.model(server_round)[1], expected):
                np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
        counts = {}
        for u in store.updates():
            counts[(u["round"], u["rover_id"])] = counts.get((u["round"], u["rover_id"]), 0) + 1
        assert set(counts.values()) == {1} and len(counts) == 18


@pytest.mark.slow
def test_flwr_run_drives_the_same_apps_through_a_superlink(tmp_path):
    spec = SimulationSpec(out_dir=tmp_path / "run", num_rovers=3, frames_per_rover=4, data_size=(48, 64),
                          availability=(1.0, 1.0), faults={2: "dtype"}, client_cpus=2,
                          run_config={"num-server-rounds": 2, "input-height": 48, "input-width": 64,
                                      "local-steps": 1, "algorithm": "fedlaavg"})
    ray_before = _ray_processes()
    result = run_with_flwr_cli(spec)
    assert [r["round"] for r in result.rounds] == [1, 2]
    assert result.summary["identity"]["algorithm"] == "fedlaavg"
    assert result.summary["rejection_reasons"] == {"dtype": 2}
    assert result.rounds[0]["num_accepted"] == 2 and result.rounds[0]["bytes_down"] > 0
    assert _no_ray_left_behind(ray_before) == []


@pytest.mark.slow
def test_flwr_run_takes_recorded_folders_from_run_config_rover_data(tmp_path):
    """Recorded folders reach `flwr run` as the run config key ``rover-data`` (no population file): each
    partition trains and is evaluated on its own folder, an empty folder replies "no data" and the round goes on."""
    recorded = make_population(2, tmp_path / "recorded", frames=4, availability=(1.0, 1.0))
    for rover in recorded.rovers:
        ensure_rover_data(rover, 64, 48)
    empty = tmp_path / "recorded" / "empty"
    empty.mkdir()
    folders = [Path(r.data_dir) for r in recorded.rovers] + [empty]
    before = sorted((p, p.stat().st_mtime_ns) for p in (tmp_path / "recorded").rglob("*"))
    spec = SimulationSpec(out_dir=tmp_path / "run", num_rovers=3, rover_data=[str(f) for f in folders],
                          availability=(1.0, 1.0), client_cpus=2,
                          run_config={"num-server-rounds": 1, "input-height": 48, "input-width": 64,
                                      "local-steps": 1})
    result = run_with_flwr_cli(spec)
    submitted = tomllib.loads((tmp_path / "run" / "run_config.toml").read_text())
    assert submitted["population"] == ""
    assert submitted["rover-data"].split(os.pathsep) == [str(f.resolve()) for f in folders]
    assert result.rounds[0]["num_accepted"] == 2
    with CoordinatorStore(result.state_db, readonly=True) as store:
        last = {row["name"]: row for row in store.evaluations() if row["round"] == 1}
    assert last["rover_000"]["status"] == last["rover_001"]["status"] == "ok"
    assert last["rover_000"]["frames"] > 0 and last["rover_001"]["frames"] > 0
    assert last["empty"]["status"] == "no_data"
    assert sorted((p, p.stat().st_mtime_ns) for p in (tmp_path / "recorded").rglob("*")) == before
