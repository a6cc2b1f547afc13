"""MM-PSGD / MC-PSGD vs FedAvg on block-cyclic data: lighting blocks through a day (Ding et al., ICML 2020).

Rover ``i`` drives in block ``i % num_blocks`` under that block's light and is out only in its block's
rounds; each block is scored with the model it would use, from scratch and from a pretrained network.
Set-up and results: ``docs/experiments.md``, section 3.

    .venv/bin/python -m experiments.semicyclic [--quick] [--seeds 0 1 2] [--out DIR]
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from experiments import cli, federated, heldout, report, tuning
from experiments.report import curve_stats, fmt, markdown_table, mean_std
from forest_perception.collab.flower.client_app import make_client_app
from forest_perception.collab.flower.population import BLOCK_WEATHERS, make_population
from forest_perception.collab.flower.rover_strategy import RoverStrategy
from forest_perception.collab.flower.task import TaskConfig, get_arrays

NAME = "semicyclic"
CLAIM = ("MM-PSGD / MC-PSGD (per-block predictors) beat FedAvg's single model on block-cyclic data; here: "
         "lighting blocks through a day, held-out AbsRel / delta<1.25 per block")
METRICS = ("loss", "absrel", "delta1")


@dataclass(frozen=True)
class SemiCyclicConfig:
    """Blocks, population, schedule and training of the block-cyclic experiment."""

    seeds: tuple[int, ...] = (0, 1, 2)
    num_rovers: int = 12
    num_blocks: int = 3
    rounds_per_block: int = 1
    rounds: int = 60  # 20 cycles of 3 blocks x 1 round: each predictor averages 20 models
    frames_per_rover: int = 8
    held_out_per_rover: int = 4
    availability: tuple[float, float] = (0.8, 1.0)  # within its block's rounds
    fraction_train: float = 1.0
    local_epochs: int = 2
    lr: float = 0.003  # pretraining's; the federated runs use each setting's best of ``lrs``
    lrs: tuple[float, ...] = (0.001, 0.003, 0.01)  # the same grid for every setting, tuned on ``tune_seed``
    tune_seed: int = 100
    sparse_scores: bool = True  # score at cycle ends and every round of the last cycle (not every round)
    base_channels: int = 4
    hw: tuple[int, int] = (64, 80)
    algorithms: tuple[str, ...] = ("fedavg", "mm-psgd", "mc-psgd")
    # "scratch": the task's initial network; "pretrained": trained first on other forests (the swarm's model)
    starts: tuple[str, ...] = ("scratch", "pretrained")
    pretrain_forests: int = 8
    pretrain_frames: int = 8
    pretrain_epochs: int = 10

    @classmethod
    def quick(cls) -> SemiCyclicConfig:
        """A few-minute version: one seed, 6 rovers, three cycles of 3 blocks x 1 round, one learning rate."""
        return cls(seeds=(0,), num_rovers=6, rounds_per_block=1, rounds=9, frames_per_rover=8,
                   held_out_per_rover=3, lrs=(0.003,))

    def settings(self) -> list[str]:
        """``algorithm, start`` of every run on a seed."""
        return [setting_label(a, s) for s, a in itertools.product(self.starts, self.algorithms)]


def setting_label(algorithm: str, start: str) -> str:
    """``mm-psgd, pretrained``: how a run is named in tables and tuning."""
    return f"{algorithm}, {start}"


def block_predictors(strategy: RoverStrategy, num_blocks: int) -> list[list | None]:
    """Per block, the MM/MC-PSGD predictor, or None where the block uses the global model (FedAvg, no predictor yet)."""
    server = strategy.server
    if not hasattr(server, "predictor"):
        return [None] * num_blocks
    return [server.predictor(m) for m in range(num_blocks)]


def score_hook(scorer: heldout.ModelScorer, held: heldout.HeldOut, num_blocks: int,
               scored: Callable[[int], bool] = lambda r: True) -> federated.RoundHook:
    """After each round: every block's held-out frames with that block's model; their mean; MC's chosen chain.

    Rounds where ``scored(round)`` is false keep only the block and MC's choice (the running average still
    takes their global model).

    Also ``global/*``: the global model (MM/MC: the mixed chain) on all blocks' frames, and ``average/*`` (mean
    over blocks): the control that ignores blocks, the plain running average of every global model so far (round 0
    is the initial model); what the per-block predictors add is their difference to it.
    """
    blocks = [f"block{b}" for b in range(num_blocks)]
    running: dict = {"sum": None, "count": 0}

    def hook(strategy: RoverStrategy, server_round: int) -> dict[str, float]:
        params = [np.asarray(p, dtype=np.float64) for p in strategy.params]
        running["sum"] = params if running["sum"] is None else [a + p for a, p in zip(running["sum"], params)]
        running["count"] += 1
        record = strategy.last_record if server_round else None
        out: dict[str, float] = {}
        if record is not None:
            out["block"] = float(record.block) if record.block is not None else math.nan
            out["chose_separate"] = 1.0 if record.chosen == "separate" else 0.0
        if not scored(server_round):
            return out
        average = [(a / running["count"]).astype(np.asarray(p).dtype) for a, p in zip(running["sum"],
                                                                                    strategy.params)]
        averaged = scorer.score(strategy.names, average, held, only=blocks)
        scores = scorer.score(strategy.names, strategy.params, held, only=["all", *blocks])
        out.update({k.replace("all/", "global/", 1): v for k, v in scores.items() if k.startswith("all/")})
        for block, predictor in enumerate(block_predictors(strategy, num_blocks)):
            name = blocks[block]
            if predictor is None:
                out.update({k: v for k, v in scores.items() if k.startswith(f"{name}/")})
            else:
                out.update(scorer.score(strategy.names, predictor, held, only=[name]))
        for metric in METRICS:
            out[f"mean/{metric}"] = statistics.fmean(out[f"{b}/{metric}"] for b in blocks)
            out[f"average/{metric}"] = statistics.fmean(averaged[f"{b}/{metric}"] for b in blocks)
        return out

    return hook


def scored_rounds(config: SemiCyclicConfig) -> Callable[[int], bool]:
    """Which rounds are scored: all, or (``sparse_scores``) round 0, every cycle's end and the whole last cycle."""
    cycle = config.num_blocks * config.rounds_per_block
    if not config.sparse_scores:
        return lambda r: True
    return lambda r: r == 0 or r % cycle == 0 or r > config.rounds - cycle


def run_seed(config: SemiCyclicConfig, seed: int, root: Path, lr_of: Mapping[str, float]) -> list[dict]:
    """Every setting (algorithm, start) on one seed's population, each at its learning rate ``lr_of[setting]``."""
    population = make_population(
        config.num_rovers, root / "rovers", seed=seed, num_blocks=config.num_blocks,
        rounds_per_block=config.rounds_per_block, availability=config.availability,
        frames=config.frames_per_rover,
    )
    population_path = federated.write_population_data(population, root, config.hw)
    parts = {r.rover_id: heldout.held_out_frames(r, config.held_out_per_rover, config.hw)
             for r in population.rovers}
    groups = {f"block{m}": [r.rover_id for r in population.rovers if r.block == m]
              for m in range(config.num_blocks)}
    held = heldout.HeldOut.build(parts, {**groups, "all": list(parts)})
    nets: dict = {}
    runs = []
    for start, algorithm in itertools.product(config.starts, config.algorithms):
        setting = setting_label(algorithm, start)
        lr = float(lr_of[setting])
        run_config = federated.experiment_config(
            config, seed, root / f"{start}-{algorithm}-{lr:g}.db", algorithm=algorithm, lr=lr,
            population=str(population_path),
            **{"num-blocks": config.num_blocks, "rounds-per-block": config.rounds_per_block})
        task = TaskConfig.from_run_config(run_config)
        coordinator = None
        if start == "pretrained":
            if start not in nets:  # pretrained once per seed at config.lr, whatever the runs' learning rates
                pretrain_task = dataclasses.replace(task, lr=config.lr)
                nets[start] = federated.pretrain_network(
                    pretrain_task, seed, config.pretrain_forests, config.pretrain_frames, config.pretrain_epochs)
            coordinator = federated.build_coordinator_from(run_config, *get_arrays(nets[start]))
        elif start != "scratch":
            raise ValueError(f"start must be 'scratch' or 'pretrained', got {start!r}")
        hook = score_hook(heldout.ModelScorer(task), held, config.num_blocks, scored_rounds(config))
        rows = federated.run_federated(run_config, make_client_app(run_config), config.num_rovers, hook,
                                       coordinator=coordinator)
        runs.append({"setting": setting, "algorithm": algorithm, "start": start, "lr": lr, "seed": seed,
                     "rounds": rows})
    return runs


def tuning_score(config: SemiCyclicConfig) -> Callable[[dict], float]:
    """What tuning minimises: AbsRel (mean over blocks) averaged over the last cycle."""
    cycle = config.num_blocks * config.rounds_per_block
    return lambda run: tuning.tail_mean(run["rounds"], "mean/absrel", cycle)


def run(config: SemiCyclicConfig, out_dir: Path) -> dict:
    """Tune each setting's learning rate, run every setting on every seed; write ``<out>/semicyclic.*``."""
    federated.quiet_logs()
    if config.num_blocks < 2:
        raise ValueError(f"num_blocks must be >= 2 for block-cyclic data, got {config.num_blocks}")
    if config.tune_seed in config.seeds and len(config.lrs) > 1:
        raise ValueError(f"tune_seed {config.tune_seed} must not be a reported seed {config.seeds}")
    started = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory(prefix="exp-cyclic-") as tmp:
        best, trials = tuning.tune(
            config.settings(), config.lrs, config.tune_seed,
            lambda seed, lr_of: run_seed(config, seed, Path(tmp) / f"seed{seed}", lr_of),
            tuning_score(config), log=lambda line: print(f"[{NAME}]{line}", flush=True))
        for seed in config.seeds:
            runs += run_seed(config, seed, Path(tmp) / f"seed{seed}", best)
    blocks = {m: BLOCK_WEATHERS[m % len(BLOCK_WEATHERS)] for m in range(config.num_blocks)}
    result = report.experiment_result(NAME, CLAIM, config, runs, summarise(config, runs), started, blocks=blocks,
                                      tuning={"best": best, "trials": trials})
    write_outputs(result, config, out_dir)
    return result


def summarise(config: SemiCyclicConfig, runs: list[dict]) -> dict:
    """Per algorithm: last-round and last-cycle-mean block metrics (mean ± std over seeds), MC's choices, costs."""
    cycle = config.num_blocks * config.rounds_per_block
    summary: dict = {"settings": {}, "paired": {}}
    for start, algorithm in itertools.product(config.starts, config.algorithms):
        mine = [r for r in runs if r["algorithm"] == algorithm and r["start"] == start]
        s: dict = {}
        for metric in METRICS:
            s[f"mean/{metric}"] = mean_std(r["rounds"][-1][f"mean/{metric}"] for r in mine)
            s[f"last_cycle_mean/{metric}"] = mean_std(
                statistics.fmean(row[f"mean/{metric}"] for row in r["rounds"][-cycle:]) for r in mine)
            for m in range(config.num_blocks):
                s[f"block{m}/{metric}"] = mean_std(r["rounds"][-1][f"block{m}/{metric}"] for r in mine)
        s["global/absrel"] = mean_std(r["rounds"][-1]["global/absrel"] for r in mine)
        s["average/absrel"] = mean_std(r["rounds"][-1].get("average/absrel", math.nan) for r in mine)
        s["chose_separate"] = mean_std(
            statistics.fmean(row.get("chose_separate", 0.0) for row in r["rounds"][1:]) for r in mine)
        s["costs"] = report.cost_stats(mine)
        s["lr"] = mine[0]["lr"] if mine else math.nan
        summary["settings"][setting_label(algorithm, start)] = s
    # paired over seeds: each method against FedAvg (same start), and the predictors against the plain average
    score = tuning_score(config)
    for start in config.starts:
        for algorithm in config.algorithms:
            if algorithm == "fedavg" or "fedavg" not in config.algorithms:
                continue
            mine, theirs = setting_label(algorithm, start), setting_label("fedavg", start)
            summary["paired"][f"{mine} - {theirs}, AbsRel over the last cycle"] = tuning.paired(
                runs, score, mine, theirs)
        for algorithm in config.algorithms:
            if algorithm == "fedavg":
                continue
            own = [r for r in runs if r["setting"] == setting_label(algorithm, start)]
            diffs = {r["seed"]: r["rounds"][-1]["mean/absrel"] - r["rounds"][-1]["average/absrel"] for r in own}
            summary["paired"][f"{setting_label(algorithm, start)}: predictors - plain average, AbsRel "
                              f"(round {config.rounds})"] = {**mean_std(diffs.values()), "per_seed": diffs}
    return summary


def table(result: dict) -> str:
    """The results table (markdown)."""
    config = result["config"]
    blocks = {int(m): light for m, light in result["blocks"].items()}  # JSON keys are strings
    rows = []
    for setting, s in result["summary"]["settings"].items():
        rows.append([
            setting, fmt(s["mean/absrel"]), fmt(s["mean/delta1"]), fmt(s["last_cycle_mean/absrel"]),
            *[fmt(s[f"block{m}/absrel"]) for m in range(config.num_blocks)],
            fmt(s["chose_separate"], 2) if setting.startswith("mc-psgd") else "-",
            fmt(s.get("average/absrel", {})), f"{s.get('lr', math.nan):g}",
        ])
    header = ["algorithm, start", f"AbsRel, mean over blocks (round {config.rounds})", "δ<1.25, mean over blocks",
              "AbsRel, mean over the last cycle", *[f"AbsRel block {m} ({blocks[m]})" for m in blocks],
              "rounds the separate chain won", "control: plain average of all global models, AbsRel", "lr"]
    text = markdown_table(header, rows)
    return text + tuning.paired_and_tuning_tables(result, "the first is better", "Learning rate of each setting",
                                                  "AbsRel over the last cycle")


def write_outputs(result: dict, config: SemiCyclicConfig, out_dir: Path) -> None:
    """JSON (everything), CSV (one row per run and round), PNG (held-out curves)."""
    report.write_result(out_dir, result, table(result))
    panels = []
    for start in config.starts:
        for key, label in (("mean/absrel", "AbsRel, mean over blocks"), ("block0/absrel", "AbsRel, block 0 "
                                                                         f"({result['blocks'][0]})")):
            curves = {a: curve_stats([r["rounds"] for r in result["runs"]
                                      if r["algorithm"] == a and r["start"] == start], key)
                      for a in config.algorithms}
            panels.append({"title": f"{label}, {start}", "ylabel": key.split("/")[1], "curves": curves})
    report.plot_panels(Path(out_dir) / f"{NAME}.png", panels, ncols=2, title=
                f"Block-cyclic: {config.num_blocks} light blocks x {config.rounds_per_block} round(s), "
                f"{config.num_rovers} rovers, {len(config.seeds)} seed(s)")


def main(argv: list[str] | None = None) -> None:
    """Command line entry."""
    cli.run_experiment(sys.modules[__name__], SemiCyclicConfig, argv)


if __name__ == "__main__":
    main()
