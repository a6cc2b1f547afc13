"""Federated vs each rover training alone vs pooling every rover's data centrally.

The same network, initial weights and local training (AdamW, ``local_epochs`` per round) in all three;
scored on each rover's own forest, all rovers' forests and forests no rover has seen. Set-up and results:
``docs/experiments.md``, section 4.

    .venv/bin/python -m experiments.fed_vs_local_vs_central [--quick] [--seeds 0 1 2] [--out DIR]
"""

from __future__ import annotations

import math
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from experiments import cli, federated, heldout, report, tuning
from experiments.heldout import HeldOut, ModelScorer
from experiments.report import curve_stats, fmt, markdown_table, mean_std
from forest_perception.collab.flower.client_app import make_client_app
from forest_perception.collab.flower.population import make_population
from forest_perception.collab.flower.rover_strategy import RoverStrategy
from forest_perception.collab.flower.task import (
    LocalData,
    TaskConfig,
    build_model,
    get_arrays,
    load_local_data,
    round_seed,
    train_local,
)

NAME = "fed_vs_local_vs_central"
CLAIM = ("Federated training approaches pooling all data centrally and beats each rover training alone; "
         "here: held-out AbsRel / delta<1.25 on the rovers' own forests and on unseen forests")
METRICS = ("loss", "absrel", "delta1")
SETTINGS = ("federated", "local", "central")


@dataclass(frozen=True)
class FedLocalCentralConfig:
    """Population, rounds and training of the federated / local / central comparison."""

    seeds: tuple[int, ...] = (0, 1, 2)
    num_rovers: int = 10
    rounds: int = 15
    frames_per_rover: int = 16
    held_out_per_rover: int = 4
    unseen_forests: int = 6
    unseen_per_forest: int = 4
    local_epochs: int = 2
    lr: float = 0.003  # unused when ``lrs`` has several: each setting runs at its best of the grid
    lrs: tuple[float, ...] = (0.001, 0.003, 0.01)  # the same grid for every setting, tuned on ``tune_seed``
    tune_seed: int = 100
    tail_rounds: int = 3  # tuning's score: own-forest AbsRel averaged over the last rounds
    base_channels: int = 4
    hw: tuple[int, int] = (64, 80)

    @classmethod
    def quick(cls) -> FedLocalCentralConfig:
        """A few-minute version: one seed, 6 rovers, 8 rounds."""
        return cls(seeds=(0,), num_rovers=6, rounds=8, frames_per_rover=8, held_out_per_rover=3, unseen_forests=3,
                   unseen_per_forest=3, lrs=(0.003,))


def own_scores(scores: dict[str, float], rover_ids: list[str]) -> dict[str, float]:
    """``own/<metric>``: the mean over rovers of each rover's own held-out score."""
    return {f"own/{m}": statistics.fmean(scores[f"{r}/{m}"] for r in rover_ids) for m in METRICS}


def federated_hook(scorer: ModelScorer, held: HeldOut, rover_ids: list[str]) -> federated.RoundHook:
    """After each round: the global model on every rover's frames, all of them pooled, and unseen forests."""

    def hook(strategy: RoverStrategy, server_round: int) -> dict[str, float]:
        scores = scorer.score(strategy.names, strategy.params, held)
        return {**{k: v for k, v in scores.items() if k.split("/")[0] in ("all", "unseen")},
                **own_scores(scores, rover_ids)}

    return hook


def pooled(datasets: list[LocalData]) -> LocalData:
    """Every rover's training (and validation) frames in one dataset."""
    return LocalData(
        "all rovers pooled",
        torch.cat([d.train_images for d in datasets]), torch.cat([d.train_depth for d in datasets]),
        torch.cat([d.val_images for d in datasets]), torch.cat([d.val_depth for d in datasets]),
    )


def train_alone(
    task: TaskConfig, datasets: dict[str, LocalData], held: HeldOut, rounds: int, seed: int
) -> list[dict[str, float]]:
    """Each rover trains its own model on its own frames; per round-equivalent, the means over the rovers' models."""
    scorer = ModelScorer(task)
    models = {r: build_model(task) for r in datasets}
    rows = [{"round": 0.0, **_alone_scores(scorer, models, held)}]
    for server_round in range(1, rounds + 1):
        start = time.perf_counter()
        for rover, model in models.items():
            train_local(model, datasets[rover], task, seed=round_seed(seed, server_round, rover))
        train_s = time.perf_counter() - start
        rows.append({"round": float(server_round), "train_s": train_s, **_alone_scores(scorer, models, held)})
    return rows


def _alone_scores(scorer: ModelScorer, models: dict[str, torch.nn.Module], held: HeldOut) -> dict[str, float]:
    per_rover = []
    for rover, model in models.items():
        names, arrays = get_arrays(model)
        scores = scorer.score(names, arrays, held, only=[rover, "all", "unseen"])
        per_rover.append({**{f"own/{m}": scores[f"{rover}/{m}"] for m in METRICS},
                          **{k: v for k, v in scores.items() if k.split("/")[0] in ("all", "unseen")}})
    return {k: statistics.fmean(p[k] for p in per_rover) for k in per_rover[0]}


def train_central(
    task: TaskConfig, datasets: dict[str, LocalData], held: HeldOut, rounds: int, seed: int
) -> list[dict[str, float]]:
    """One model on all rovers' frames pooled; scored like the federated model after each round-equivalent."""
    scorer = ModelScorer(task)
    model = build_model(task)
    data = pooled(list(datasets.values()))
    rover_ids = list(datasets)

    def scores() -> dict[str, float]:
        s = scorer.score(*get_arrays(model), held)
        return {**{k: v for k, v in s.items() if k.split("/")[0] in ("all", "unseen")}, **own_scores(s, rover_ids)}

    rows = [{"round": 0.0, **scores()}]
    for server_round in range(1, rounds + 1):
        start = time.perf_counter()
        train_local(model, data, task, seed=round_seed(seed, server_round, "central"))
        rows.append({"round": float(server_round), "train_s": time.perf_counter() - start, **scores()})
    return rows


def run_seed(config: FedLocalCentralConfig, seed: int, root: Path, lr_of: Mapping[str, float]) -> list[dict]:
    """The three settings on one seed's population, each at its learning rate ``lr_of[setting]``."""
    population = make_population(config.num_rovers, root / "rovers", seed=seed, availability=(1.0, 1.0),
                                 frames=config.frames_per_rover)
    population_path = federated.write_population_data(population, root, config.hw)
    rover_ids = [r.rover_id for r in population.rovers]
    parts = {r.rover_id: heldout.held_out_frames(r, config.held_out_per_rover, config.hw) for r in population.rovers}
    parts["unseen"] = heldout.unseen_frames(seed, config.unseen_forests, config.unseen_per_forest, config.hw,
                                            heldout.WEATHERS)
    held = HeldOut.build(parts, {**{r: [r] for r in rover_ids}, "all": rover_ids, "unseen": ["unseen"]})

    def task_at(setting: str) -> tuple[dict, TaskConfig]:
        lr = float(lr_of[setting])
        run_config = federated.experiment_config(config, seed, root / f"fedavg-{lr:g}.db", algorithm="fedavg",
                                                 population=str(population_path), lr=lr)
        return run_config, TaskConfig.from_run_config(run_config)

    run_config, task = task_at("federated")
    rows = federated.run_federated(run_config, make_client_app(run_config), config.num_rovers,
                                   federated_hook(ModelScorer(task), held, rover_ids))
    runs = [{"setting": "federated", "lr": task.lr, "seed": seed, "rounds": rows}]
    datasets = {r.rover_id: load_local_data(r.data_dir, task) for r in population.rovers}
    task = task_at("local")[1]
    runs.append({"setting": "local", "lr": task.lr, "seed": seed,
                 "rounds": train_alone(task, datasets, held, config.rounds, seed)})
    task = task_at("central")[1]
    runs.append({"setting": "central", "lr": task.lr, "seed": seed,
                 "rounds": train_central(task, datasets, held, config.rounds, seed)})
    return runs


def run(config: FedLocalCentralConfig, out_dir: Path) -> dict:
    """Tune each setting's learning rate, run the three on every seed; write ``<out>/fed_vs_local_vs_central.*``."""
    federated.quiet_logs()
    if config.tune_seed in config.seeds and len(config.lrs) > 1:
        raise ValueError(f"tune_seed {config.tune_seed} must not be a reported seed {config.seeds}")
    started = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory(prefix="exp-flc-") as tmp:
        best, trials = tuning.tune(
            SETTINGS, config.lrs, config.tune_seed,
            lambda seed, lr_of: run_seed(config, seed, Path(tmp) / f"seed{seed}", lr_of),
            lambda r: tuning.tail_mean(r["rounds"], "own/absrel", config.tail_rounds),
            log=lambda line: print(f"[{NAME}]{line}", flush=True))
        for seed in config.seeds:
            runs += run_seed(config, seed, Path(tmp) / f"seed{seed}", best)
    result = report.experiment_result(NAME, CLAIM, config, runs, summarise(config, runs), started,
                                      tuning={"best": best, "trials": trials})
    write_outputs(result, config, out_dir)
    return result


def summarise(config: FedLocalCentralConfig, runs: list[dict]) -> dict:
    """Last-round held-out metrics per setting (mean ± std over seeds); the federated run's costs."""
    summary: dict = {"settings": {}}
    for setting in SETTINGS:
        mine = [r for r in runs if r["setting"] == setting]
        last = [r["rounds"][-1] for r in mine]
        s = {f"{group}/{m}": mean_std(row[f"{group}/{m}"] for row in last)
             for group in ("own", "all", "unseen") for m in METRICS}
        s["best_round_own/absrel"] = mean_std(min(row["own/absrel"] for row in r["rounds"]) for r in mine)
        if setting == "federated":
            s["costs"] = report.cost_stats(mine)
        s["lr"] = mine[0]["lr"] if mine and "lr" in mine[0] else config.lr
        summary["settings"][setting] = s
    tail = config.tail_rounds
    summary["paired"] = {
        f"federated - {other}, {key} (last {tail} rounds)": tuning.paired(
            runs, lambda r, key=key: tuning.tail_mean(r["rounds"], key, tail), "federated", other)
        for other in ("local", "central") for key in ("own/absrel", "unseen/absrel")}
    return summary


def table(result: dict) -> str:
    """The results table (markdown)."""
    config = result["config"]
    rows = [[setting, fmt(s["own/absrel"]), fmt(s["own/delta1"]), fmt(s["all/absrel"]), fmt(s["unseen/absrel"]),
             fmt(s["unseen/delta1"]), fmt(s["best_round_own/absrel"]), f"{s.get('lr', math.nan):g}"]
            for setting, s in result["summary"]["settings"].items()]
    text = markdown_table(["setting", f"AbsRel own forest (round {config.rounds})", "δ<1.25 own forest",
                           "AbsRel all rovers' forests", "AbsRel unseen forests", "δ<1.25 unseen forests",
                           "best AbsRel own forest (any round)", "lr"], rows)
    return text + tuning.paired_and_tuning_tables(result, "federated is better", "Learning rate of each setting",
                                                  f"own-forest AbsRel over the last {config.tail_rounds} rounds")


def write_outputs(result: dict, config: FedLocalCentralConfig, out_dir: Path) -> None:
    """JSON (everything), CSV (one row per run and round), PNG (held-out curves)."""
    report.write_result(out_dir, result, table(result))
    panels = []
    for key, label in (("own/absrel", "AbsRel, each rover's own forest"), ("own/delta1", "δ<1.25, own forest"),
                       ("unseen/absrel", "AbsRel, unseen forests")):
        curves = {s: curve_stats([r["rounds"] for r in result["runs"] if r["setting"] == s], key) for s in SETTINGS}
        panels.append({"title": label, "ylabel": key.split("/")[1], "curves": curves,
                       "xlabel": "round (local / central: epochs / local-epochs)"})
    report.plot_panels(Path(out_dir) / f"{NAME}.png", panels,
                f"Federated vs local vs central, {config.num_rovers} rovers, {len(config.seeds)} seed(s)")


def main(argv: list[str] | None = None) -> None:
    """Command line entry."""
    cli.run_experiment(sys.modules[__name__], FedLocalCentralConfig, argv)


if __name__ == "__main__":
    main()
