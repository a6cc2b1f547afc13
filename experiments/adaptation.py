"""Adaptation to a new forest: the shipped network vs each rover alone vs FedAvg and SCAFFOLD through Flower vs pooled.

Four simulated rovers drive their own parts of a ``clustered_regrowth`` forest (a style kept out of all training
of the shipped networks) over ROS 2 and record through capture_node; extract + curate give one dataset folder
per rover (:mod:`forest_perception.demo.swarm`). Every method starts from the shipped checkpoint and is scored
on each rover's held-out segments (the ClientApp's own :func:`~forest_perception.collab.rover.holdout.rover_split`),
per rover and pooled. Set-up and results: ``docs/experiments.md``, "Adaptation to a new forest".

    .venv/bin/python -m experiments.adaptation [--quick] [--seeds 0 1 2] [--model multiscale_320x240] [--out DIR]
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from experiments import cli, federated, report
from experiments.report import curve_stats, fmt, last_round_mean, markdown_table, mean_std
from forest_perception.collab.flower.task import (
    LocalData,
    NoDataError,
    TaskConfig,
    build_model,
    evaluate,
    load_local_data,
    merge_run_config,
    round_seed,
    set_arrays,
    train_local,
)

NAME = "adaptation"
CLAIM = ("FedAvg from the shipped weights improves held-out AbsRel in a new forest by >= 40 % relative to the "
         "shipped model within 10 rounds and ends within 10 % of pooled training; each rover training alone "
         "overfits its own segments and does worse on the others' (and SCAFFOLD with four local epochs, against "
         "pooled training as many epochs and four times as long)")
METHODS = ("shipped", "alone", "fedavg", "scaffold", "pooled", "pooled_long")
FEDERATED = ("fedavg", "scaffold")
NO_DATA = "no data"


@dataclass(frozen=True)
class RecordingConfig:
    """The new-forest set-up the learning experiments share: seeds, the shipped network, the recording, the split."""

    seeds: tuple[int, ...] = (0, 1, 2)
    model: str = "autoencoder_160x128"
    style: str = "clustered_regrowth"
    world_seed: int = 11
    rovers: int = 4
    drive_s: float = 60.0
    camera_rate_hz: float = 3.0
    segment_frames: int = 15
    holdout_fraction: float = 0.25

    def recording_fields(self) -> dict[str, Any]:
        """This set-up's fields by name (to build another experiment's config on the same recording)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(RecordingConfig)}


@dataclass(frozen=True)
class AdaptationConfig(RecordingConfig):
    """The recording (forest, rovers, drive) and the training of every method."""

    rounds: int = 10
    local_epochs: int = 1
    lr: float = 0.0003
    batch_size: int = 8
    engine: str = "ray"  # ray: forest-fl simulate's Flower Ray simulation; local: the same apps on a LocalGrid
    scaffold_local_epochs: int = 4  # SCAFFOLD's local epochs a round (0: no SCAFFOLD run, no long pooled run)

    @classmethod
    def quick(cls) -> AdaptationConfig:
        """A few-minute version: one seed, a shorter drive, 4 rounds, SCAFFOLD with two local epochs."""
        return cls(seeds=(0,), drive_s=24.0, segment_frames=8, rounds=4, scaffold_local_epochs=2)

    @property
    def pooled_epochs(self) -> int:
        """Epochs of the long pooled run: as many passes over the frames as SCAFFOLD's rovers make."""
        return self.rounds * max(self.local_epochs, self.scaffold_local_epochs)


def run_config(config: AdaptationConfig, seed: int, state_db: str | Path = "coordinator.db", **extra: Any) -> dict:  # noqa: ANN401
    """The Flower run config of the experiment's FedAvg run (also what every other method trains with)."""
    return merge_run_config({
        "num-server-rounds": config.rounds, "algorithm": "fedavg", "seed": seed, "init": config.model,
        "lr": config.lr, "local-epochs": config.local_epochs, "batch-size": config.batch_size,
        "holdout-fraction": config.holdout_fraction, "fraction-evaluate": 1.0, "evaluate-every": 1,
        "state-db": str(state_db), "max-norm": 0.0,
    }, extra)


# ---------------------------------------------------------------------------------------------- data and scoring


def load_rovers(folders: dict[str, Path], task: TaskConfig) -> dict[str, LocalData | str]:
    """Each rover's frames split as its ClientApp splits them; ``"no data: ..."`` for an empty or broken folder."""
    out: dict[str, LocalData | str] = {}
    for rover, folder in folders.items():
        try:
            data = load_local_data(folder, task)
        except NoDataError as exc:
            out[rover] = f"{NO_DATA}: {exc}"
            continue
        out[rover] = data if not data.val_is_train else f"{NO_DATA}: {folder} has one segment, nothing held out"
    return out


def held_out(rovers: dict[str, LocalData | str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Images and depth of each rover's held-out segments (rovers with data only)."""
    return {r: (d.val_images, d.val_depth) for r, d in rovers.items() if isinstance(d, LocalData)}


def _weighted(parts: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """Frame-weighted mean of per-rover ``absrel`` / ``delta1`` (as Flower's aggregate of the rovers' evaluations)."""
    total = sum(n for n, _ in parts)
    return {k: sum(n * m[k] for n, m in parts) / total for k in ("absrel", "delta1")} if total else \
        {"absrel": math.nan, "delta1": math.nan}


def score(model: torch.nn.Module, held: dict[str, tuple[torch.Tensor, torch.Tensor]], task: TaskConfig,
          alone: str | None = None) -> dict[str, float]:
    """AbsRel / delta1 on every rover's held-out frames (``<rover>/absrel``) and pooled (``absrel``, frame-weighted).

    With ``alone`` (the model of that rover training alone): also ``own/*`` (its held-out) and ``others/*``
    (the other rovers' held-out frames, frame-weighted).
    """
    row: dict[str, float] = {}
    parts = {}
    for rover, (images, depth) in held.items():
        parts[rover] = (int(images.shape[0]), evaluate(model, images, depth, task))
        row[f"{rover}/absrel"], row[f"{rover}/delta1"] = parts[rover][1]["absrel"], parts[rover][1]["delta1"]
    row.update(_weighted(list(parts.values())))
    if alone is not None:
        row["own/absrel"], row["own/delta1"] = row[f"{alone}/absrel"], row[f"{alone}/delta1"]
        others = [p for r, p in parts.items() if r != alone]
        if others:
            m = _weighted(others)
            row["others/absrel"], row["others/delta1"] = m["absrel"], m["delta1"]
    return row


def shipped_model(config: AdaptationConfig, task: TaskConfig) -> torch.nn.Module:
    """The shipped network with its weights (``config.model``), as the coordinator's round 0 holds it."""
    from forest_perception.collab.flower.network import read_init

    init = read_init(config.model)
    model = build_model(task)
    set_arrays(model, init.names, init.arrays)
    return model.eval()


# ---------------------------------------------------------------------------------------------- methods


def train_alone(config: AdaptationConfig, task: TaskConfig, rovers: dict[str, LocalData | str],
                held: dict, seed: int) -> list[dict]:
    """Every rover with data fine-tunes its own copy of the shipped network; one run per rover."""
    runs = []
    for rover, data in rovers.items():
        if not isinstance(data, LocalData):
            continue
        model = shipped_model(config, task)
        rows = [{"round": 0.0, **score(model, held, task, alone=rover)}]
        start = time.perf_counter()
        for r in range(1, config.rounds + 1):  # scored after the last round only (the curves are FedAvg's)
            train_local(model, data, task, seed=round_seed(seed, r, rover))
        rows.append({"round": float(config.rounds), "train_s": time.perf_counter() - start,
                     **score(model, held, task, alone=rover)})
        runs.append({"method": "alone", "seed": seed, "rover": rover, "rounds": rows})
    return runs


def pooled_data(rovers: dict[str, LocalData | str]) -> LocalData:
    """Every rover with data's training (and held-out) frames in one set, for pooled training."""
    datasets = [d for d in rovers.values() if isinstance(d, LocalData)]
    return LocalData("all rovers pooled", torch.cat([d.train_images for d in datasets]),
                     torch.cat([d.train_depth for d in datasets]), torch.cat([d.val_images for d in datasets]),
                     torch.cat([d.val_depth for d in datasets]))


def train_pooled(config: AdaptationConfig, task: TaskConfig, rovers: dict[str, LocalData | str], held: dict,
                 seed: int) -> list[dict]:
    """One copy of the shipped network on every rover's training segments pooled (the upper bound), scored after
    every epoch: ``pooled`` after ``rounds`` x ``local_epochs`` epochs and, with SCAFFOLD on, ``pooled_long`` after
    :attr:`AdaptationConfig.pooled_epochs` (the same run trained on)."""
    data = pooled_data(rovers)
    model = shipped_model(config, task)
    rows = [{"round": 0.0, **score(model, held, task)}]
    train_s = 0.0  # training only: the scoring after each epoch is not counted
    short = config.rounds * config.local_epochs
    for epoch in range(1, config.pooled_epochs + 1):
        start = time.perf_counter()
        train_local(model, data, task, seed=round_seed(seed, epoch, "pooled"))
        train_s += time.perf_counter() - start
        rows.append({"round": float(epoch), "train_s": train_s, **score(model, held, task)})
    runs = [{"method": "pooled", "seed": seed, "rounds": rows[: short + 1], "wall_s": rows[short]["train_s"]}]
    if config.pooled_epochs > short:
        runs.append({"method": "pooled_long", "seed": seed, "rounds": rows, "wall_s": rows[-1]["train_s"]})
    return runs


def run_fedavg(config: AdaptationConfig, folders: dict[str, Path], work: Path, seed: int,
               algorithm: str = "fedavg") -> tuple[Path, float]:
    """FedAvg (or ``algorithm``: scaffold, with ``scaffold_local_epochs``) from the shipped weights: ServerApp +
    ClientApps on Flower's Ray simulation (``forest-fl simulate --init --rover-data``) or, with ``engine`` local, on an
    in-process LocalGrid; the store's path and wall s."""
    state_db = work / algorithm / "coordinator.db"
    work = state_db.parent
    work.mkdir(parents=True, exist_ok=True)
    extra = {"algorithm": algorithm}
    if algorithm == "scaffold":
        extra["local-epochs"] = config.scaffold_local_epochs
    settings = run_config(config, seed, state_db, **extra)
    start = time.perf_counter()
    if config.engine == "ray":
        from forest_perception.collab.flower.simulation import SimulationSpec, run_simulation

        run_simulation(SimulationSpec(out_dir=work, num_rovers=len(folders), run_config=settings,
                                      rover_data=[str(f) for f in folders.values()], availability=(1.0, 1.0),
                                      client_cpus=1.0, ray_cpus=2))
    elif config.engine == "local":
        from experiments.federated import run_federated
        from forest_perception.collab.flower.client_app import make_client_app
        from forest_perception.collab.flower.population import recorded_population

        population = recorded_population([str(f) for f in folders.values()], seed=seed)
        settings = merge_run_config(settings, {"population": str(population.save(work / "population.json"))})
        run_federated(settings, make_client_app(settings), len(folders))
    else:
        raise ValueError(f"engine must be ray or local, got {config.engine!r}")
    return state_db, time.perf_counter() - start


def fedavg_rows(state_db: Path, task: TaskConfig, held: dict) -> list[dict]:
    """Per round (0 = the shipped weights): the global model's scores, the round's bytes and wall time, and the
    federated evaluation the rovers reported (``fl/absrel``)."""
    from forest_perception.collab.flower.store import CoordinatorStore

    model = build_model(task)
    with CoordinatorStore(state_db, readonly=True) as store:
        rounds = {r["round"]: r for r in store.rounds()}
        rows = []
        for r in range(0, max(rounds, default=0) + 1):
            set_arrays(model, *store.model(r))
            row: dict[str, float] = {"round": float(r), **score(model, held, task)}
            record = rounds.get(r)
            if record is not None:
                sent = max(record["num_selected"], 1)
                replied = max(record["num_accepted"] + record["num_rejected"], 1)
                row.update(wall_s=float(record["wall_s"]), selected=float(record["num_selected"]),
                           accepted=float(record["num_accepted"]), bytes_down=float(record["bytes_down"]),
                           bytes_up=float(record["bytes_up"]), kib_down_per_rover=record["bytes_down"] / sent / 1024,
                           kib_up_per_rover=record["bytes_up"] / replied / 1024)
            pooled = [e for e in store.evaluations(r) if e["kind"] == "rovers" and e["status"] == "ok"]
            if pooled and pooled[0]["absrel"] is not None:
                row["fl/absrel"] = float(pooled[0]["absrel"])
                row["fl/delta1"] = float(pooled[0]["delta1"]) if pooled[0]["delta1"] is not None else math.nan
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- the run


def record(config: AdaptationConfig, out_dir: Path) -> tuple[dict[str, Path], dict]:
    """The swarm's recording (cached under ``out_dir/adaptation_cache``; the seeds and methods share it)."""
    from forest_perception.demo.swarm import SwarmRecording, record_swarm
    from forest_perception.rosenv import apply_loopback_environment

    spec = SwarmRecording(seed=config.world_seed, style=config.style, rovers=config.rovers, seconds=config.drive_s,
                          camera_rate_hz=config.camera_rate_hz, segment_frames=config.segment_frames)
    cache = Path(out_dir) / "adaptation_cache" / f"{config.style}_w{config.world_seed}_{config.rovers}x" \
        f"{config.drive_s:g}s_{config.camera_rate_hz:g}hz_seg{config.segment_frames}"
    import fcntl
    import os
    import random

    cache.parent.mkdir(parents=True, exist_ok=True)
    # experiments running side by side (run_all's jobs) share this recording: the first records, the others wait
    # for it and reuse it, instead of two simulators writing the same bags (and talking on the same ROS domain)
    with (cache.parent / f".{cache.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        apply_loopback_environment(int(os.environ.get("ROS_DOMAIN_ID") or random.randint(30, 99)), cache / "ros_log")
        result = record_swarm(spec, cache)
    for line in result.lines():
        print(f"[{NAME}] {line}", flush=True)
    info = {"drive_wall_s": result.drive_wall_s, "sim_s": result.sim_s, "dataset_s": result.dataset_s,
            "frames": result.frames, "segments": result.segments, "reused": result.reused,
            "ends": {k: list(v) for k, v in result.ends.items()}}
    return result.folders, info


def run_seed(config: AdaptationConfig, folders: dict[str, Path], seed: int, work: Path) -> list[dict]:
    """Every method on one seed; one run dict per method (per rover for ``alone``)."""
    task = TaskConfig.from_run_config(run_config(config, seed))
    rovers = load_rovers(folders, task)
    for rover, data in rovers.items():
        if not isinstance(data, LocalData):
            print(f"[{NAME}] {rover}: {data}", flush=True)
    held = held_out(rovers)
    if not held:
        raise ValueError(f"no rover has held-out frames: {rovers}")
    local_task = dataclasses.replace(task, threads=federated.local_threads())  # like Ray's 2 actors
    runs = [{"method": "shipped", "seed": seed, "rounds": [{"round": 0.0,
                                                            **score(shipped_model(config, task), held, task)}]}]
    start = time.perf_counter()
    runs += train_alone(config, local_task, rovers, held, seed)
    alone_s = time.perf_counter() - start
    pooled = train_pooled(config, local_task, rovers, held, seed)
    state_db, fed_s = run_fedavg(config, folders, work, seed)
    runs.append({"method": "fedavg", "seed": seed, "wall_s": fed_s, "rounds": fedavg_rows(state_db, task, held)})
    if config.scaffold_local_epochs:
        state_db, fed_s = run_fedavg(config, folders, work, seed, "scaffold")
        runs.append({"method": "scaffold", "seed": seed, "wall_s": fed_s,
                     "rounds": fedavg_rows(state_db, task, held)})
    runs += pooled
    for run in runs:
        if run["method"] == "alone":
            run["wall_s"] = alone_s / max(1, sum(r["method"] == "alone" for r in runs))
    runs.append({"method": "rovers", "seed": seed, "rounds": [],
                 "status": {r: ("ok" if isinstance(d, LocalData) else d) for r, d in rovers.items()},
                 "train_frames": {r: d.num_train for r, d in rovers.items() if isinstance(d, LocalData)},
                 "held_out_frames": {r: d.num_val for r, d in rovers.items() if isinstance(d, LocalData)}})
    return runs


def run(config: AdaptationConfig, out_dir: Path, folders: dict[str, Path] | None = None) -> dict:
    """Record (or reuse) the swarm, run every method on every seed, write ``<out>/adaptation.{json,csv,png}``."""
    started = time.perf_counter()
    recording: dict = {}
    if folders is None:
        folders, recording = record(config, out_dir)
    runs = []
    with tempfile.TemporaryDirectory(prefix="exp-adapt-") as tmp:
        for seed in config.seeds:
            work = Path(tmp) / f"seed{seed}"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            print(f"[{NAME}] seed {seed} ...", flush=True)
            runs += run_seed(config, folders, seed, work)
    result = report.experiment_result(NAME, CLAIM, config, runs, summarise(config, runs), started,
                                      recording=recording)
    write_outputs(result, config, out_dir)
    return result


# ---------------------------------------------------------------------------------------------- summary and outputs



def summarise(config: AdaptationConfig, runs: list[dict]) -> dict:
    """Last-round scores per method, FedAvg's curve and costs, and the goal's three tests (mean over seeds)."""
    summary: dict[str, Any] = {"methods": {}}
    for method in METHODS:
        keys = ("own/absrel", "own/delta1", "others/absrel", "others/delta1") if method == "alone" else ()
        summary["methods"][method] = {k: last_round_mean(runs, method, k) for k in ("absrel", "delta1", *keys)}
    for method in FEDERATED:
        fed = [r for r in runs if r["method"] == method]
        if not fed:
            continue
        _, mean, std = curve_stats([r["rounds"] for r in fed], "absrel")
        _, d_mean, d_std = curve_stats([r["rounds"] for r in fed], "delta1")
        summary[f"{method}_curve"] = {"absrel": mean.tolist(), "absrel_std": std.tolist(),
                                      "delta1": d_mean.tolist(), "delta1_std": d_std.tolist()}
        costs = [r for run in fed for r in run["rounds"] if r.get("round", 0) >= 1]
        summary[f"{method}_costs"] = {k: mean_std(r[k] for r in costs if k in r)
                                      for k in ("wall_s", "bytes_down", "bytes_up", "kib_down_per_rover",
                                                "kib_up_per_rover")}
    summary["wall_s"] = {m: mean_std(r["wall_s"] for r in runs if r["method"] == m and "wall_s" in r)
                         for m in ("alone", *FEDERATED, "pooled", "pooled_long")}
    shipped = summary["methods"]["shipped"]["absrel"]["mean"]
    fed_last = summary["methods"]["fedavg"]["absrel"]["mean"]
    pooled = summary["methods"]["pooled"]["absrel"]["mean"]
    alone = summary["methods"]["alone"]
    curve = summary.get("fedavg_curve", {}).get("absrel", [])
    within = [i for i, v in enumerate(curve[: 11]) if math.isfinite(v) and v <= 0.6 * shipped]
    summary["goal"] = {
        "fedavg_gain_vs_shipped": 1.0 - fed_last / shipped if shipped else math.nan,
        "fedavg_first_round_40pc": within[0] if within else None,
        "fedavg_vs_pooled": fed_last / pooled - 1.0 if pooled else math.nan,
        "alone_others_minus_own": alone["others/absrel"]["mean"] - alone["own/absrel"]["mean"],
    }
    scaffold = summary["methods"]["scaffold"]["absrel"]["mean"]
    pooled_long = summary["methods"]["pooled_long"]["absrel"]["mean"]
    if math.isfinite(scaffold):
        s_curve = summary["scaffold_curve"]["absrel"]
        s_within = [i for i, v in enumerate(s_curve[: 11]) if math.isfinite(v) and v <= 0.6 * shipped]
        summary["goal"].update(
            scaffold_gain_vs_shipped=1.0 - scaffold / shipped if shipped else math.nan,
            scaffold_first_round_40pc=s_within[0] if s_within else None,
            scaffold_vs_pooled=scaffold / pooled - 1.0 if pooled else math.nan,
            scaffold_vs_pooled_long=scaffold / pooled_long - 1.0 if pooled_long else math.nan,
        )
    g = summary["goal"]
    summary["goal"]["met"] = {
        "fedavg >= 40 % better than shipped within 10 rounds": g["fedavg_first_round_40pc"] is not None,
        "fedavg within 10 % of pooled": math.isfinite(g["fedavg_vs_pooled"]) and g["fedavg_vs_pooled"] <= 0.10,
        "alone worse on the others' segments than on its own": g["alone_others_minus_own"] > 0,
        "alone worse than fedavg on the others' segments": alone["others/absrel"]["mean"] > fed_last,
    }
    if "scaffold_vs_pooled" in g:
        summary["goal"]["met"].update({
            "scaffold >= 40 % better than shipped within 10 rounds": g["scaffold_first_round_40pc"] is not None,
            "scaffold within 10 % of pooled": math.isfinite(g["scaffold_vs_pooled"])
            and g["scaffold_vs_pooled"] <= 0.10,
            "scaffold within 10 % of pooled trained as long": math.isfinite(g["scaffold_vs_pooled_long"])
            and g["scaffold_vs_pooled_long"] <= 0.10,
        })
    status = next((r["status"] for r in runs if r["method"] == "rovers"), {})
    summary["rovers"] = {r: s for r, s in status.items()}
    return summary


def table(result: dict) -> str:
    """The results table (markdown): last-round scores, FedAvg per round, costs, the goal's tests."""
    config, s = result["config"], result["summary"]
    m = s["methods"]
    rows = [
        ["shipped (no training)", fmt(m["shipped"]["absrel"]), fmt(m["shipped"]["delta1"]), "-", "-"],
        ["each rover alone: its own held-out", fmt(m["alone"]["own/absrel"]), fmt(m["alone"]["own/delta1"]), "-",
         fmt(s["wall_s"]["alone"], 0)],
        ["each rover alone: the others' held-out", fmt(m["alone"]["others/absrel"]),
         fmt(m["alone"]["others/delta1"]), "-", "-"],
        ["each rover alone: all held-out", fmt(m["alone"]["absrel"]), fmt(m["alone"]["delta1"]), "-", "-"],
        [f"FedAvg (Flower, {config.rounds} rounds, {config.local_epochs} local epoch(s))",
         fmt(m["fedavg"]["absrel"]), fmt(m["fedavg"]["delta1"]),
         fmt(s.get("fedavg_costs", {}).get("kib_up_per_rover", {}), 0), fmt(s["wall_s"]["fedavg"], 0)],
    ]
    epochs = config.rounds * config.local_epochs
    if "scaffold_costs" in s:
        rows.append([f"SCAFFOLD (Flower, {config.rounds} rounds, {config.scaffold_local_epochs} local epochs)",
                     fmt(m["scaffold"]["absrel"]), fmt(m["scaffold"]["delta1"]),
                     fmt(s["scaffold_costs"].get("kib_up_per_rover", {}), 0), fmt(s["wall_s"]["scaffold"], 0)])
    rows.append([f"pooled (upper bound), {epochs} epochs", fmt(m["pooled"]["absrel"]), fmt(m["pooled"]["delta1"]),
                 "-", fmt(s["wall_s"]["pooled"], 0)])
    if math.isfinite(m["pooled_long"]["absrel"]["mean"]):
        rows.append([f"pooled, {config.pooled_epochs} epochs (as many passes as SCAFFOLD's rovers)",
                     fmt(m["pooled_long"]["absrel"]), fmt(m["pooled_long"]["delta1"]), "-",
                     fmt(s["wall_s"]["pooled_long"], 0)])
    out = [markdown_table(["method (all rovers' held-out pooled unless said)", f"AbsRel (round {config.rounds})",
                           "δ<1.25", "KiB up / rover / round", "wall s (2 cores)"], rows), ""]
    for method, label in (("fedavg", "FedAvg"), ("scaffold", "SCAFFOLD")):
        curve = s.get(f"{method}_curve")
        if curve:
            out += [markdown_table([f"{label} round", *[str(i) for i in range(len(curve["absrel"]))]],
                                   [["AbsRel", *[f"{v:.3f}" for v in curve["absrel"]]],
                                    ["δ<1.25", *[f"{v:.3f}" for v in curve["delta1"]]]]), ""]
    g = s["goal"]
    line = (f"FedAvg vs shipped: {100 * g['fedavg_gain_vs_shipped']:.0f} % lower AbsRel (40 % first reached in "
            f"round {g['fedavg_first_round_40pc']}); FedAvg vs pooled: {100 * g['fedavg_vs_pooled']:+.0f} %; ")
    if "scaffold_vs_pooled" in g:
        line += (f"SCAFFOLD vs shipped: {100 * g['scaffold_gain_vs_shipped']:.0f} % lower; SCAFFOLD vs pooled: "
                 f"{100 * g['scaffold_vs_pooled']:+.0f} % ({epochs} epochs), "
                 f"{100 * g['scaffold_vs_pooled_long']:+.0f} % ({config.pooled_epochs} epochs); ")
    out.append(line + f"alone, others' minus own AbsRel: {g['alone_others_minus_own']:+.3f}. Goal tests: "
               + "; ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in g["met"].items()) + ".")
    bad = {r: v for r, v in s.get("rovers", {}).items() if v != "ok"}
    if bad:
        out.append("Rovers without data: " + "; ".join(f"{r} ({v})" for r, v in bad.items()) + ".")
    return "\n".join(out)


def write_outputs(result: dict, config: AdaptationConfig, out_dir: Path) -> None:
    """JSON (everything), CSV (one row per run and round), PNG (AbsRel / delta1 per round per method)."""
    report.write_result(out_dir, result, table(result))
    runs = result["runs"]
    panels = []
    for key, label in (("absrel", "AbsRel, all rovers' held-out"), ("delta1", "δ<1.25, all rovers' held-out"),
                       ("others/absrel", "AbsRel, rover alone: others' held-out")):
        curves = {}
        for method in ("alone", *FEDERATED, "pooled"):
            mine = [r["rounds"] for r in runs if r["method"] == method and key in r["rounds"][-1]]
            if mine:
                curves[method] = curve_stats(mine, key)
        if key == "others/absrel":
            mine = [r["rounds"] for r in runs if r["method"] == "alone"]
            if mine:
                curves["alone (own)"] = curve_stats(mine, "own/absrel")
        shipped = result["summary"]["methods"]["shipped"].get(key.split("/")[-1], {}).get("mean")
        panels.append({"title": label, "ylabel": key.split("/")[-1], "curves": curves, "hline": shipped,
                       "xlabel": "round (alone / pooled: local epochs x round)"})
    report.plot_panels(Path(out_dir) / f"{NAME}.png", panels,
                       f"New forest ({config.style}), {config.rovers} rovers, {config.model}, "
                       f"{len(config.seeds)} seed(s); dotted: shipped")


def main(argv: list[str] | None = None) -> None:
    """Command line entry: ``--quick``, ``--seeds``, ``--out``, ``--model``, ``--engine``."""
    parser = cli.experiment_arguments(__doc__.split("\n")[0])
    parser.add_argument("--model", default=AdaptationConfig.model,
                        help="shipped network to adapt (autoencoder_160x128, multiscale_320x240, ...)")
    parser.add_argument("--engine", choices=("ray", "local"), default=AdaptationConfig.engine,
                        help="FedAvg on Flower's Ray simulation or the same apps on an in-process LocalGrid")
    args = parser.parse_args(argv)
    config = dataclasses.replace(cli.pick_config(AdaptationConfig, args.quick, args.seeds), model=args.model,
                                 engine=args.engine)
    result = run(config, args.out)
    print(table(result))
    print(f"\n{NAME}: {result['elapsed_s']:.0f} s; results in {args.out}")


if __name__ == "__main__":
    main()
