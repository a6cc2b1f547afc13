"""DC-CCL in a new forest: the rover network alone and with FedAvg vs DC-CCL's rover model (mimic + small) and
cloud model (large + small) vs the large model without rover data.

The new-forest set-up of :mod:`experiments.adaptation` (four simulated rovers record a ``clustered_regrowth`` forest
through capture_node; one dataset folder per rover, each with its own held-out segments). The cloud distils its large
submodel (the shipped multi-scale 320x240, flip-averaged) into the mimic on ``wide`` domain-randomised forests it
generates itself (never drawing a held-out style, so never the rovers' forest); the rovers then run ``algorithm
dc-ccl`` through the same coordinator and ClientApp as FedAvg (in-process LocalGrid). Every method is scored on the
same held-out frames against the same 160x128 depth. Set-up and results: ``docs/collaborative.md``.

    .venv/bin/python -m experiments.dcccl [--quick] [--seeds 0 1 2] [--out DIR]
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the PyTorch convention

from experiments import adaptation, cli, federated, report
from experiments.report import curve_stats, fmt, last_round_mean, markdown_table, mean_std
from forest_perception.collab.flower.server_app import ServerSettings
from forest_perception.collab.flower.task import (
    LocalData,
    TaskConfig,
    build_model,
    merge_run_config,
    set_arrays,
)

NAME = "dcccl"
CLAIM = ("the cloud model (large + small) gains from rover data it never saw raw, and the rover model (mimic + "
         "small) beats rover-only training")
METHODS = ("shipped", "alone", "fedavg", "mimic", "dcccl_rover", "large", "dcccl_cloud")


@dataclass(frozen=True)
class DcCclConfig:
    """The recording (as the adaptation experiment's), the cloud's data and distillation, the rounds."""

    seeds: tuple[int, ...] = (0, 1, 2)
    model: str = "autoencoder_160x128"  # the rover network (alone, FedAvg) and the mimic's start
    large: tuple[str, ...] = ("multiscale_320x240",)
    style: str = "clustered_regrowth"
    world_seed: int = 11
    rovers: int = 4
    drive_s: float = 60.0
    camera_rate_hz: float = 3.0
    segment_frames: int = 15
    holdout_fraction: float = 0.25
    rounds: int = 10
    local_epochs: int = 1
    lr: float = 0.0003
    small_lr: float = 0.001
    batch_size: int = 8
    small_channels: int = 8
    cloud_forests: int = 50  # 'wide' forests (one segment each) the cloud distils on
    cloud_frames: int = 12  # per forest
    distil_epochs: int = 4
    latency_runs: int = 30

    @classmethod
    def quick(cls) -> DcCclConfig:
        """A few-minute version: one seed, a shorter drive, 4 rounds, a smaller cloud set."""
        return cls(seeds=(0,), drive_s=24.0, segment_frames=8, rounds=4, cloud_forests=8, cloud_frames=8,
                   distil_epochs=2, latency_runs=10)

    def adaptation(self) -> adaptation.AdaptationConfig:
        """The adaptation experiment's config with this recording and training (shares its recording cache)."""
        return adaptation.AdaptationConfig(
            seeds=self.seeds, model=self.model, style=self.style, world_seed=self.world_seed, rovers=self.rovers,
            drive_s=self.drive_s, camera_rate_hz=self.camera_rate_hz, segment_frames=self.segment_frames,
            holdout_fraction=self.holdout_fraction, rounds=self.rounds, local_epochs=self.local_epochs, lr=self.lr,
            batch_size=self.batch_size, engine="local")


# ---------------------------------------------------------------------------------------------- the cloud


def cloud_data(config: DcCclConfig, out_dir: Path) -> Path:
    """The cloud's own forests, on which it distils: ``wide`` domain randomisation over every style's ranges but the
    held-out styles' (:data:`~forest_perception.sim.styles.HOLD_OUT`, the rovers' style among them); generated once,
    cached. The teacher labels them, so their depth is not used.
    """
    from forest_perception.dataset_tools.cli import main as dataset_main
    from forest_perception.sim.styles import HOLD_OUT, WIDE

    folder = Path(out_dir) / "dcccl_cache" / f"cloud_wide_{config.cloud_forests}x{config.cloud_frames}"
    done = folder / "DONE"
    if done.is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    print(f"[{NAME}] rendering {config.cloud_forests} '{WIDE}' cloud forests x {config.cloud_frames} frames once "
          f"(about 12 s a forest on 2 cores) -> {folder}", flush=True)
    code = dataset_main(["synth", "--out", str(folder), "--style", WIDE, "--exclude-styles", ",".join(HOLD_OUT),
                         "--runs", "1", "--segments", str(config.cloud_forests), "--frames", str(config.cloud_frames),
                         "--seed", "8100", "--interval", "1.5", "--quiet"])
    if code != 0:
        raise RuntimeError(f"forest-dataset synth of the cloud forests failed ({code})")
    done.write_text("ok\n")
    return folder


def distil_mimic(config: DcCclConfig, cloud: Path, out_dir: Path,
                 large_version: str | None = None) -> tuple[Path, dict]:
    """The cloud's mimic of its large submodel, distilled on ``cloud`` (cached beside the cloud data).

    ``large_version``: the running large model's version when the caller has built it (else it is built here).
    """
    from forest_perception.collab import dcccl
    from forest_perception.collab.dcccl_cloud import distil_from_folders

    spec = dcccl.DcCclSpec(large=config.large, mimic_init=config.model, small_channels=config.small_channels)
    path = Path(out_dir) / "dcccl_cache" / f"mimic_{cloud.name}_e{config.distil_epochs}.pt"
    summary_path = path.with_suffix(".json")
    if path.is_file() and summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        # reused only for the large model running now: a re-shipped network has another version
        if large_version is None:
            large_version = dcccl.build_large(spec).version
        if summary.get("spec", {}).get("large") == list(config.large) and summary.get("large_version") == large_version:
            return path, summary
    summary = distil_from_folders(spec, [cloud], path, epochs=config.distil_epochs, max_frames=100_000,
                                  progress=False, command=f"experiments.dcccl (cloud forests {cloud.name})")
    return path, summary


@torch.no_grad()
def score_big(model: torch.nn.Module, held_big: dict, task: TaskConfig) -> dict[str, float]:
    """AbsRel / delta1 of a model fed the large size on every rover's held-out frames and pooled (frame-weighted),
    scored like :func:`experiments.adaptation.score` (metrics only: the training loss needs one size)."""
    from forest_perception.models.metrics import MetricAccumulator

    model.eval()
    row: dict[str, float] = {}
    parts = []
    for rover, (images, depth) in held_big.items():
        accumulator = MetricAccumulator(task.min_depth, task.max_depth)
        for first in range(0, images.shape[0], task.batch_size):
            accumulator.update(model(images[first:first + task.batch_size]), depth[first:first + task.batch_size])
        metrics = accumulator.result()
        row[f"{rover}/absrel"], row[f"{rover}/delta1"] = metrics["absrel"], metrics["delta1"]
        parts.append((int(images.shape[0]), metrics))
    total = sum(n for n, _ in parts)
    row.update({k: sum(n * m[k] for n, m in parts) / total for k in ("absrel", "delta1")} if total else
               {"absrel": math.nan, "delta1": math.nan})
    return row


class AtSize(torch.nn.Module):
    """A depth network whose output is area-resized to ``hw`` (to score every model on the same depth maps)."""

    def __init__(self, net: torch.nn.Module, hw: tuple[int, int]) -> None:
        super().__init__()
        self.net, self.hw = net, hw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Depth at ``hw``."""
        return F.interpolate(self.net(x), size=self.hw, mode="area")


# ---------------------------------------------------------------------------------------------- methods


def dcccl_run_config(config: DcCclConfig, seed: int, state_db: Path, mimic: Path, population: Path) -> dict:
    """The dc-ccl run config: the FedAvg one of the adaptation experiment with the mimic instead of ``init``."""
    base = adaptation.run_config(config.adaptation(), seed, state_db)
    return merge_run_config(base, {"algorithm": "dc-ccl", "init": "", "dcccl-mimic": str(mimic),
                                   "dcccl-small-channels": config.small_channels, "lr": config.small_lr,
                                   "population": str(population), "batchnorm": "train"})


def run_dcccl(config: DcCclConfig, folders: dict[str, Path], mimic: Path, work: Path, seed: int) -> tuple[Path, float]:
    """DC-CCL rounds through the real coordinator and ClientApp on a LocalGrid; the store's path and wall s."""
    from experiments.federated import run_federated
    from forest_perception.collab.flower.client_app import make_client_app
    from forest_perception.collab.flower.population import recorded_population

    state_db = work / "dcccl.db"
    population = recorded_population([str(f) for f in folders.values()], seed=seed).save(work / "population.json")
    settings = dcccl_run_config(config, seed, state_db, mimic, population)
    start = time.perf_counter()
    run_federated(settings, make_client_app(settings), len(folders))
    return state_db, time.perf_counter() - start


def dcccl_rows(state_db: Path, task: TaskConfig, held: dict, held_big: dict, large: Any, mimic_path: Path,  # noqa: ANN401
               spec: Any) -> list[dict]:  # noqa: ANN401
    """Per round: the rover model (mimic + small) and the cloud model (large + small) on every rover's held-out
    frames (``cloud/absrel``), and the round's bytes."""
    from forest_perception.collab import dcccl
    from forest_perception.collab.dcccl_cloud import small_from_store
    from forest_perception.collab.flower.store import CoordinatorStore

    mimic = dcccl.load_part(mimic_path, "mimic")
    model = build_model(task)
    rows = []
    with CoordinatorStore(state_db, readonly=True) as store:
        rounds = {r["round"]: r for r in store.rounds()}
        last = max(rounds, default=0)
    for r in range(0, last + 1):
        with CoordinatorStore(state_db, readonly=True) as store:
            set_arrays(model, *store.model(r))
        row: dict[str, float] = {"round": float(r), **adaptation.score(model, held, task)}
        small = small_from_store(state_db, mimic, r)
        cloud = AtSize(dcccl.cloud_model(large, small, spec), task.input_hw)
        row.update({f"cloud/{k}": v for k, v in score_big(cloud, held_big, task).items()})
        record = rounds.get(r)
        if record is not None:
            sent = max(record["num_selected"], 1)
            replied = max(record["num_accepted"] + record["num_rejected"], 1)
            row.update(wall_s=float(record["wall_s"]), kib_down_per_rover=record["bytes_down"] / sent / 1024,
                       kib_up_per_rover=record["bytes_up"] / replied / 1024)
        rows.append(row)
    return rows


def big_held_out(folders: dict[str, Path], task: TaskConfig, large_hw: tuple[int, int]) -> dict:
    """Each rover's held-out images at the large model's size with the depth at the rover's (the same frames)."""
    big_task = dataclasses.replace(task, input_hw=large_hw)
    small = adaptation.held_out(adaptation.load_rovers(folders, task))
    big = adaptation.held_out(adaptation.load_rovers(folders, big_task))
    return {r: (big[r][0], small[r][1]) for r in small if r in big}


def latencies(config: DcCclConfig, spec: Any, large: Any, mimic_path: Path, state_db: Path, work: Path,  # noqa: ANN401
              ) -> dict[str, dict[str, float]]:
    """ONNX Runtime latency (2 threads) of the rover network, the DC-CCL rover model and the cloud model."""
    from forest_perception.collab import dcccl
    from forest_perception.collab.dcccl_cloud import export_deployables, small_from_store
    from forest_perception.inference import load_engine
    from forest_perception.models.export import engine_latency
    from forest_perception.models.styles import resolve_model_file

    mimic = dcccl.load_part(mimic_path, "mimic")
    written = export_deployables(spec, mimic, small_from_store(state_db, mimic), work / "deploy", large,
                                 command="experiments.dcccl")
    frames = [np.random.default_rng(i).integers(0, 256, (240, 320, 3), dtype=np.uint8) for i in range(4)]
    out = {}
    for label, path in (("rover network", resolve_model_file(config.model)), ("dcccl rover model", written["rover"]),
                        ("dcccl cloud model", written["cloud"])):
        engine = load_engine(path, backend="onnxruntime", threads=2)
        out[label] = engine_latency(engine, frames, runs=config.latency_runs, warmup=3)
    return out


def run_seed(config: DcCclConfig, folders: dict[str, Path], seed: int, work: Path, mimic: Path, large: Any,  # noqa: ANN401
             spec: Any, baseline: list[dict] | None = None) -> list[dict]:  # noqa: ANN401
    """Every method on one seed; one run dict per method (per rover for ``alone``).

    ``baseline``: this seed's shipped / alone / FedAvg runs of the adaptation experiment on the same recording and
    training (:func:`reusable_baseline`); they are taken over (marked ``reused_from``) instead of run again.
    """
    adapt = config.adaptation()
    task = TaskConfig.from_run_config(adaptation.run_config(adapt, seed))
    rovers = adaptation.load_rovers(folders, task)
    held = adaptation.held_out(rovers)
    if not held:
        raise ValueError(f"no rover has held-out frames: {rovers}")
    held_big = big_held_out(folders, task, large.input_hw)
    local_task = dataclasses.replace(task, threads=federated.local_threads())
    large_run = {"method": "large", "seed": seed, "rounds": [{"round": 0.0, **score_big(
        AtSize(_large_model(large, spec), task.input_hw), held_big, task)}]}
    if baseline:
        runs = [{**run, "reused_from": "adaptation"} for run in baseline]
        runs.insert(1, large_run)
    else:
        runs = [{"method": "shipped", "seed": seed,
                 "rounds": [{"round": 0.0, **adaptation.score(adaptation.shipped_model(adapt, task), held, task)}]},
                large_run]
        start = time.perf_counter()
        runs += adaptation.train_alone(adapt, local_task, rovers, held, seed)
        alone_s = time.perf_counter() - start
        for run in runs:
            if run["method"] == "alone":
                run["wall_s"] = alone_s / max(1, sum(r["method"] == "alone" for r in runs))
        state_db, fed_s = adaptation.run_fedavg(adapt, folders, work, seed)
        runs.append({"method": "fedavg", "seed": seed, "wall_s": fed_s,
                     "rounds": adaptation.fedavg_rows(state_db, task, held)})
    dc_db, dc_s = run_dcccl(config, folders, mimic, work, seed)
    dc_task = ServerSettings.from_run_config(dcccl_run_config(config, seed, dc_db, mimic,
                                                              work / "population.json")).task
    rows = dcccl_rows(dc_db, dc_task, held, held_big, large, mimic, spec)
    runs.append({"method": "mimic", "seed": seed, "rounds": [{k: v for k, v in rows[0].items()
                                                              if not k.startswith("cloud/")}]})
    runs.append({"method": "dcccl_rover", "seed": seed, "wall_s": dc_s,
                 "rounds": [{k: v for k, v in row.items() if not k.startswith("cloud/")} for row in rows]})
    runs.append({"method": "dcccl_cloud", "seed": seed,
                 "rounds": [{"round": row["round"], **{k[6:]: v for k, v in row.items() if k.startswith("cloud/")}}
                            for row in rows]})
    runs.append({"method": "rovers", "seed": seed, "rounds": [], "dcccl_db": str(dc_db),
                 "status": {r: ("ok" if isinstance(d, LocalData) else d) for r, d in rovers.items()},
                 "train_frames": {r: d.num_train for r, d in rovers.items() if isinstance(d, LocalData)},
                 "held_out_frames": {r: d.num_val for r, d in rovers.items() if isinstance(d, LocalData)}})
    return runs


def _large_model(large: Any, spec: Any) -> torch.nn.Module:  # noqa: ANN401
    from forest_perception.collab import dcccl

    return dcccl.large_model(large, spec)


def prepare_cloud(config: DcCclConfig, out_dir: Path) -> tuple[Any, Any, Path, dict]:  # noqa: ANN401
    """The cloud's side, cached under ``out_dir/dcccl_cache``: its forests, the large model, the distilled mimic.

    Needs no recording, so ``run_all`` starts it beside the adaptation experiment; a lock makes a second caller
    wait and reuse instead of rendering the same forests twice. Returns the spec, the large model, the mimic's
    path and the distillation summary.
    """
    import fcntl

    from forest_perception.collab import dcccl

    folder = Path(out_dir) / "dcccl_cache"
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cloud = cloud_data(config, out_dir)
        spec = dcccl.DcCclSpec(large=config.large, mimic_init=config.model, small_channels=config.small_channels)
        large = dcccl.build_large(spec)
        mimic, distil = distil_mimic(config, cloud, out_dir, large.version)
    return spec, large, mimic, distil


SHARED_WITH_ADAPTATION = ("model", "style", "world_seed", "rovers", "drive_s", "camera_rate_hz", "segment_frames",
                          "holdout_fraction", "rounds", "local_epochs", "lr", "batch_size")
"""The adaptation experiment's settings that must match for its shipped / alone / FedAvg runs to be DC-CCL's."""


def reusable_baseline(config: DcCclConfig, adaptation_result: dict | None) -> dict[int, list[dict]]:
    """Per seed, the adaptation experiment's shipped / alone / FedAvg runs when it ran the same recording and
    training (same :data:`SHARED_WITH_ADAPTATION` settings, the seed among its seeds); else nothing."""
    if not adaptation_result:
        return {}
    theirs = adaptation_result["config"]
    mine = config.adaptation()
    get = theirs.get if isinstance(theirs, dict) else lambda k: getattr(theirs, k, None)
    if any(get(k) != getattr(mine, k) for k in SHARED_WITH_ADAPTATION):
        return {}
    out: dict[int, list[dict]] = {}
    for run in adaptation_result["runs"]:
        if run["method"] in ("shipped", "alone", "fedavg") and run["seed"] in config.seeds:
            out.setdefault(int(run["seed"]), []).append(run)
    return {seed: runs for seed, runs in out.items() if {r["method"] for r in runs} == {"shipped", "alone", "fedavg"}}


def run(config: DcCclConfig, out_dir: Path, adaptation_result: dict | None = None) -> dict:
    """Record (or reuse) the swarm, make the cloud's data and mimic, run every method on every seed, write outputs.

    ``adaptation_result``: the adaptation experiment's result of this same invocation (``run_all`` passes it), whose
    shipped / alone / FedAvg runs are reused when its recording and training match (:func:`reusable_baseline`).
    """

    started = time.perf_counter()
    folders, recording = adaptation.record(config.adaptation(), out_dir)
    spec, large, mimic, distil = prepare_cloud(config, out_dir)
    print(f"[{NAME}] mimic {distil['mimic_version']} of {distil['large_version']} on {distil['frames']} cloud frames: "
          f"mse(log depth) {distil['loss_start']:.4f} -> {distil['loss_by_epoch'][-1]:.4f}", flush=True)
    baseline = reusable_baseline(config, adaptation_result)
    if baseline:
        print(f"[{NAME}] shipped / alone / FedAvg taken over from the adaptation experiment (seeds "
              f"{sorted(baseline)}): same recording and training", flush=True)
    runs: list[dict] = []
    lat: dict = {}
    with tempfile.TemporaryDirectory(prefix="exp-dcccl-") as tmp:
        for seed in config.seeds:
            work = Path(tmp) / f"seed{seed}"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            print(f"[{NAME}] seed {seed} ...", flush=True)
            runs += run_seed(config, folders, seed, work, mimic, large, spec, baseline.get(seed))
            if not lat:
                db = Path(next(r["dcccl_db"] for r in runs if r["method"] == "rovers"))
                lat = latencies(config, spec, large, mimic, db, work)
    for run in runs:  # a temporary folder of this machine: not worth keeping in the results
        run.pop("dcccl_db", None)
    summary = summarise(config, runs)
    summary.update(latency_ms=lat, distil={k: distil[k] for k in ("mimic_version", "large_version", "frames", "epochs",
                                                                  "loss_start", "loss_by_epoch", "teacher_s",
                                                                  "distil_s", "flops", "bytes")})
    result = report.experiment_result(NAME, CLAIM, config, runs, summary, started, recording=recording)
    write_outputs(result, config, out_dir)
    return result


# ---------------------------------------------------------------------------------------------- summary and outputs



def _paired(runs: list[dict], a: str, b: str) -> dict[str, float]:
    """Mean ± std over seeds of ``absrel(a) - absrel(b)`` in the last round (negative: a is better)."""
    last = {}
    for run in runs:
        if run["method"] in (a, b) and run["rounds"]:
            last.setdefault((run["method"], run["seed"]), []).append(float(run["rounds"][-1]["absrel"]))
    seeds = sorted({s for m, s in last if m == a} & {s for m, s in last if m == b})
    return mean_std(statistics.fmean(last[(a, s)]) - statistics.fmean(last[(b, s)]) for s in seeds)


def summarise(config: DcCclConfig, runs: list[dict]) -> dict:
    """Last-round scores per method, DC-CCL's curves and bytes, and the paper's two claims tested."""
    summary: dict[str, Any] = {"methods": {m: {k: last_round_mean(runs, m, k) for k in ("absrel", "delta1")}
                                           for m in METHODS}}
    for method in ("fedavg", "dcccl_rover", "dcccl_cloud"):
        mine = [r["rounds"] for r in runs if r["method"] == method]
        if mine:
            _, mean, std = curve_stats(mine, "absrel")
            summary.setdefault("curves", {})[method] = {"absrel": mean.tolist(), "absrel_std": std.tolist()}
    costs = {}
    for method in ("fedavg", "dcccl_rover"):
        rows = [r for run in runs if run["method"] == method for r in run["rounds"] if r.get("round", 0) >= 1]
        costs[method] = {k: mean_std(r[k] for r in rows if k in r) for k in ("kib_down_per_rover", "kib_up_per_rover",
                                                                             "wall_s")}
    summary["costs"] = costs
    summary["wall_s"] = {m: mean_std(r["wall_s"] for r in runs if r["method"] == m and "wall_s" in r)
                         for m in ("alone", "fedavg", "dcccl_rover")}
    summary["paired"] = {
        "dcccl_cloud - large": _paired(runs, "dcccl_cloud", "large"),
        "dcccl_rover - alone": _paired(runs, "dcccl_rover", "alone"),
        "dcccl_rover - fedavg": _paired(runs, "dcccl_rover", "fedavg"),
        "dcccl_rover - mimic": _paired(runs, "dcccl_rover", "mimic"),
    }
    p = summary["paired"]
    summary["claims"] = {
        "the cloud model gains from rover data (large + small better than large)":
            p["dcccl_cloud - large"]["mean"] < 0,
        "the rover model beats rover-only training (mimic + small better than alone)":
            p["dcccl_rover - alone"]["mean"] < 0,
    }
    return summary


def table(result: dict) -> str:
    """The results table (markdown): last-round scores, bytes, latency, the claims."""
    config, s = result["config"], result["summary"]
    m, costs, lat = s["methods"], s["costs"], s.get("latency_ms", {})

    def latency(label: str) -> str:
        return f"{lat[label]['median_ms']:.1f}" if label in lat and "median_ms" in lat[label] else "-"

    rows = [
        ["rover network, shipped (no rover data)", fmt(m["shipped"]["absrel"]), fmt(m["shipped"]["delta1"]), "-",
         latency("rover network")],
        ["rover network, each rover alone", fmt(m["alone"]["absrel"]), fmt(m["alone"]["delta1"]), "-",
         latency("rover network")],
        [f"rover network, FedAvg ({config.rounds} rounds)", fmt(m["fedavg"]["absrel"]), fmt(m["fedavg"]["delta1"]),
         f"{fmt(costs['fedavg']['kib_down_per_rover'], 0)} / {fmt(costs['fedavg']['kib_up_per_rover'], 0)}",
         latency("rover network")],
        ["DC-CCL mimic alone (round 0)", fmt(m["mimic"]["absrel"]), fmt(m["mimic"]["delta1"]), "-", "-"],
        [f"DC-CCL rover model: mimic + small ({config.rounds} rounds)", fmt(m["dcccl_rover"]["absrel"]),
         fmt(m["dcccl_rover"]["delta1"]),
         f"{fmt(costs['dcccl_rover']['kib_down_per_rover'], 0)} / {fmt(costs['dcccl_rover']['kib_up_per_rover'], 0)}",
         latency("dcccl rover model")],
        ["large model, no rover data", fmt(m["large"]["absrel"]), fmt(m["large"]["delta1"]), "-",
         latency("dcccl cloud model")],
        ["DC-CCL cloud model: large + small", fmt(m["dcccl_cloud"]["absrel"]), fmt(m["dcccl_cloud"]["delta1"]), "-",
         latency("dcccl cloud model")],
    ]
    out = [markdown_table(["method (all rovers' held-out, 160x128 depth)", "AbsRel", "δ<1.25",
                           "KiB down / up per rover per round", "latency ms (ORT, 2 threads)"], rows), ""]
    d = s.get("distil", {})
    if d:
        b = d["bytes"]
        out.append(f"Mimic: distilled from {d['large_version']} on {d['frames']} cloud frames in "
                   f"{d['teacher_s'] + d['distil_s']:.0f} s (mse of log depth {d['loss_start']:.4f} -> "
                   f"{d['loss_by_epoch'][-1]:.4f}); it goes down once: {b['mimic_bytes'] / 1024:.0f} KiB. Shipping "
                   f"the large submodel instead: {b['large_bytes'] / 1024:.0f} KiB per rover. Large "
                   f"{d['flops']['large'] / 1e9:.2f} GFLOPs ({d['flops']['large_over_rover_reference']:.1f}x the "
                   f"rover network), rover model {d['flops']['rover_model'] / 1e9:.3f} GFLOPs.")
    p = s["paired"]
    out.append("Paired differences of AbsRel over seeds (negative: the first is better): "
               + "; ".join(f"{k} {fmt(v)}" for k, v in p.items()) + ".")
    out.append("Claims: " + "; ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in s["claims"].items()) + ".")
    return "\n".join(out)


def write_outputs(result: dict, config: DcCclConfig, out_dir: Path) -> None:
    """JSON (everything), CSV (one row per run and round), PNG (AbsRel per round per method)."""
    report.write_result(out_dir, result, table(result))
    runs = result["runs"]
    curves = {}
    for method in ("fedavg", "dcccl_rover", "dcccl_cloud"):
        mine = [r["rounds"] for r in runs if r["method"] == method]
        if mine:
            curves[method] = curve_stats(mine, "absrel")
    panels = [{"title": "AbsRel, all rovers' held-out", "ylabel": "absrel", "curves": curves,
               "hline": result["summary"]["methods"]["large"]["absrel"].get("mean"), "xlabel": "round"}]
    report.plot_panels(Path(out_dir) / f"{NAME}.png", panels,
                       f"DC-CCL in a new forest ({config.style}), {config.rovers} rovers, {len(config.seeds)} seed(s);"
                       " dotted: large model without rover data", ncols=1)


def main(argv: list[str] | None = None) -> None:
    """Command line entry: ``--quick``, ``--seeds``, ``--out``."""
    parser = cli.experiment_arguments(__doc__.split("\n")[0])
    args = parser.parse_args(argv)
    config = cli.pick_config(DcCclConfig, args.quick, args.seeds)
    result = run(config, args.out)
    print(table(result))
    print(f"\n{NAME}: {result['elapsed_s']:.0f} s; results in {args.out}")


if __name__ == "__main__":
    main()
