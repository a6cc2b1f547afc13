"""FedLaAvg vs FedAvg when rovers are out only now and then (Yan et al.: +4.23 points of CIFAR-10 accuracy).

Half the rovers drive in good light and are out often, half in poor light and rarely; both algorithms
run the same population, seeds and rounds. Set-up and results: ``docs/experiments.md``, section 1.

    .venv/bin/python -m experiments.fedlaavg_vs_fedavg [--quick] [--seeds 0 1 2] [--out DIR]
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from experiments import cli, federated, heldout, report
from experiments.report import curve_stats, fmt, markdown_table, mean_std
from experiments.tuning import tail_mean
from forest_perception.collab.flower.client_app import make_client_app
from forest_perception.collab.flower.population import Population, VirtualRover
from forest_perception.collab.flower.rover_strategy import RoverStrategy
from forest_perception.collab.flower.task import TaskConfig

NAME = "fedlaavg_vs_fedavg"
CLAIM = ("FedLaAvg beats FedAvg under intermittent client availability (paper: +4.23 points of test accuracy "
         "on CIFAR-10); here: held-out AbsRel / delta<1.25 at equal rounds")
FREQUENT_WEATHERS = ("sunny", "overcast")
RARE_WEATHERS = ("dusk", "fog", "rain")


@dataclass(frozen=True)
class LaAvgConfig:
    """Population, schedule and training of the FedLaAvg experiment."""

    seeds: tuple[int, ...] = (0, 1, 2)
    num_rovers: int = 16
    rounds: int = 100  # rarely available rovers must train many times for FedLaAvg's stored gradients to matter
    frames_per_rover: int = 16  # two segments: half train, half local validation
    held_out_per_rover: int = 4
    fraction_train: float = 0.25
    frequent_availability: tuple[float, float] = (0.8, 1.0)
    rare_availability: tuple[float, float] = (0.05, 0.25)
    local_epochs: int = 2
    lr: float = 0.003  # unused: every variant names its own local learning rate
    optimizer: str = "sgd"  # plain local SGD, as FedLaAvg's analysis assumes; the same for both algorithms
    tail_rounds: int = 10  # scores are averaged over the last rounds (the last one alone swings)
    base_channels: int = 4
    hw: tuple[int, int] = (64, 80)
    # (algorithm, local lr): the same small grid for both algorithms; server-lr 1 (FedLaAvg's server step is the
    # local learning rate)
    variants: tuple[tuple[str, float], ...] = tuple(
        (a, lr) for a in ("fedavg", "fedlaavg") for lr in (0.003, 0.01, 0.03))

    @classmethod
    def quick(cls) -> LaAvgConfig:
        """A few-minute version: one seed, 8 rovers, 12 rounds, one learning rate."""
        return cls(seeds=(0,), num_rovers=8, rounds=12, frames_per_rover=8, held_out_per_rover=3,
                   variants=(("fedavg", 0.01), ("fedlaavg", 0.01)))


def make_intermittent_population(config: LaAvgConfig, data_root: Path, seed: int) -> Population:
    """Even rovers: good light, out often; odd rovers: dusk/fog/rain, out rarely. Reproducible from ``seed``."""
    if config.num_rovers < 2:
        raise ValueError(f"num_rovers must be >= 2 (one per group), got {config.num_rovers}")
    rng = np.random.default_rng([seed, 11])
    rovers = []
    for i in range(config.num_rovers):
        rare = i % 2 == 1
        weathers = RARE_WEATHERS if rare else FREQUENT_WEATHERS
        lo, hi = config.rare_availability if rare else config.frequent_availability
        rover_id = f"rover_{i:03d}"
        rovers.append(VirtualRover(
            rover_id=rover_id, partition_id=i, forest_seed=int(rng.integers(2**31)),
            weather=weathers[int(rng.integers(len(weathers)))], availability=float(round(rng.uniform(lo, hi), 4)),
            data_dir=str(data_root / rover_id), frames=config.frames_per_rover,
        ))
    return Population(rovers, seed=seed)


def is_rare(rover_id: str) -> bool:
    """Whether a rover of :func:`make_intermittent_population` is in the rarely available group."""
    return int(rover_id.rsplit("_", 1)[1]) % 2 == 1


def score_hook(scorer: heldout.ModelScorer, held: heldout.HeldOut) -> federated.RoundHook:
    """After each round: the global model on the held-out sets, and how many rare rovers trained."""

    def hook(strategy: RoverStrategy, server_round: int) -> dict[str, float]:
        record = strategy.last_record if server_round else None
        accepted = [e.rover_id for e in record.entries if e.status == "accepted"] if record else []
        out = scorer.score(strategy.names, strategy.params, held)
        out["rare_trained"] = float(sum(is_rare(r) for r in accepted))
        return out

    return hook


def run(config: LaAvgConfig, out_dir: Path) -> dict:
    """Run every algorithm on every seed; write ``<out>/fedlaavg_vs_fedavg.{json,csv,png}``; return the result."""
    federated.quiet_logs()
    started = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory(prefix="exp-laavg-") as tmp:
        for seed in config.seeds:
            root = Path(tmp) / f"seed{seed}"
            population = make_intermittent_population(config, root / "rovers", seed)
            population_path = federated.write_population_data(population, root, config.hw)
            parts = {r.rover_id: heldout.held_out_frames(r, config.held_out_per_rover, config.hw)
                     for r in population.rovers}
            held = heldout.HeldOut.build(parts, {
                "all": list(parts),
                "frequent": [k for k in parts if not is_rare(k)],
                "rare": [k for k in parts if is_rare(k)],
            })
            for algorithm, lr in config.variants:
                label = variant_label(algorithm, lr)
                run_config = federated.experiment_config(
                    config, seed, root / f"{algorithm}-{lr}.db", algorithm=algorithm, lr=lr,
                    optimizer=config.optimizer, population=str(population_path))
                hook = score_hook(heldout.ModelScorer(TaskConfig.from_run_config(run_config)), held)
                rows = federated.run_federated(run_config, make_client_app(run_config), config.num_rovers, hook)
                runs.append({"variant": label, "algorithm": algorithm, "lr": lr, "seed": seed, "rounds": rows})
    result = report.experiment_result(NAME, CLAIM, config, runs, summarise(config, runs), started)
    write_outputs(result, config, out_dir)
    return result


def variant_label(algorithm: str, lr: float) -> str:
    """``fedavg lr=0.03``: the algorithm and its local learning rate."""
    return f"{algorithm} lr={lr:g}"


def summarise(config: LaAvgConfig, runs: list[dict]) -> dict:
    """Final-round held-out metrics per variant (mean ± std over seeds), each algorithm's best learning rate,
    paired differences (best vs best, and at equal learning rates), costs."""
    summary: dict = {"variants": {}, "paired": {}}
    final: dict[str, dict[int, dict]] = {}
    for algorithm, lr in config.variants:
        label = variant_label(algorithm, lr)
        mine = [r for r in runs if r["variant"] == label]
        last = [r["rounds"][-1] for r in mine]
        trained = [sum(row.get("accepted", 0.0) for row in r["rounds"]) for r in mine]
        rare = [sum(row["rare_trained"] for row in r["rounds"]) for r in mine]
        summary["variants"][label] = {
            **{key: mean_std(row[key] for row in last)
               for key in ("all/absrel", "all/delta1", "frequent/absrel", "rare/absrel", "rare/delta1")},
            "best_round_all/absrel": mean_std(min((row["all/absrel"] for row in r["rounds"]), default=math.nan)
                                              for r in mine),
            "rare_share_of_trainings": mean_std(r / t if t else math.nan for r, t in zip(rare, trained)),
            # the last round alone swings with local SGD; the mean over the last rounds says where a run settled
            **{f"tail_{key}": mean_std(tail_mean(r["rounds"], key, config.tail_rounds) for r in mine)
               for key in ("all/absrel", "all/delta1", "rare/absrel")},
            "costs": report.cost_stats(mine),
        }
        final[label] = {r["seed"]: {key: tail_mean(r["rounds"], key, config.tail_rounds)
                                    for key in ("all/absrel", "all/delta1")} for r in mine}
    # each algorithm at its best learning rate of the grid (lowest AbsRel over the last rounds), paired over seeds
    best: dict[str, str] = {}
    for algorithm in dict.fromkeys(a for a, _ in config.variants):
        labels = [variant_label(a, lr) for a, lr in config.variants if a == algorithm]
        best[algorithm] = min(labels, key=lambda v: summary["variants"][v]["tail_all/absrel"]["mean"]
                              if math.isfinite(summary["variants"][v]["tail_all/absrel"]["mean"]) else math.inf)
    summary["best"] = best
    pairs = [(best["fedlaavg"], best["fedavg"])] if {"fedavg", "fedlaavg"} <= set(best) else []
    pairs += [(variant_label("fedlaavg", lr), variant_label("fedavg", lr)) for a, lr in config.variants
              if a == "fedlaavg" and variant_label("fedavg", lr) in final]
    for mine, theirs in dict.fromkeys(pairs):
        seeds = sorted(set(final[theirs]) & set(final[mine]))
        for key, scale in (("all/delta1", 100.0), ("all/absrel", 1.0)):
            diffs = [scale * (final[mine][s][key] - final[theirs][s][key]) for s in seeds]
            name = f"{mine} - {theirs}, {key}" + (" (points)" if scale == 100.0 else "")
            summary["paired"][name] = {**mean_std(diffs), "per_seed": dict(zip(seeds, diffs))}
    return summary


def table(result: dict) -> str:
    """The results table (markdown)."""
    config = result["config"]
    rows = []
    for label, s in result["summary"]["variants"].items():
        rows.append([
            label, fmt(s["tail_all/absrel"]), fmt(s["tail_all/delta1"]), fmt(s["tail_rare/absrel"]),
            fmt(s["all/absrel"]), fmt(s["best_round_all/absrel"]), fmt(s["rare_share_of_trainings"], 2),
            fmt(s["costs"]["rovers_per_round"], 1),
        ])
    tail = f"last {config.tail_rounds} rounds"
    text = markdown_table(
        ["variant", f"AbsRel all ({tail})", f"δ<1.25 all ({tail})", f"AbsRel rare rovers ({tail})",
         f"AbsRel all (round {config.rounds})", "best AbsRel all (any round)", "share of trainings by rare rovers",
         "rovers/round"], rows)
    best = result["summary"].get("best", {})
    if best:
        text += (f"\n\nBest learning rate of the grid (lowest AbsRel over the last {config.tail_rounds} rounds): "
                 + ", ".join(best.values()) + ".")
    paired = [[key, fmt(stat)] for key, stat in result["summary"]["paired"].items()]
    if paired:
        text += "\n\n" + markdown_table([f"paired difference over the last {config.tail_rounds} rounds, same seeds",
                                          "mean ± std"], paired)
    return text


def write_outputs(result: dict, config: LaAvgConfig, out_dir: Path) -> None:
    """JSON (everything), CSV (one row per run and round), PNG (held-out curves)."""
    report.write_result(out_dir, result, table(result))
    panels = []
    for key, label in (("all/absrel", "AbsRel, all rovers"), ("all/delta1", "δ<1.25, all rovers"),
                       ("rare/absrel", "AbsRel, rarely available rovers")):
        labels = [variant_label(a, lr) for a, lr in config.variants]
        curves = {v: curve_stats([r["rounds"] for r in result["runs"] if r["variant"] == v], key) for v in labels}
        panels.append({"title": label, "ylabel": key.split("/")[1], "curves": curves})
    report.plot_panels(Path(out_dir) / f"{NAME}.png", panels,
                f"FedLaAvg vs FedAvg, {config.num_rovers} rovers (half rarely available), "
                f"{len(config.seeds)} seed(s)")


def main(argv: list[str] | None = None) -> None:
    """Command line entry."""
    cli.run_experiment(sys.modules[__name__], LaAvgConfig, argv)


if __name__ == "__main__":
    main()
