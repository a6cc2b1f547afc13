"""MM-PSGD / MC-PSGD vs FedAvg on block-cyclic data: lighting blocks through a day (Ding et al., ICML 2020).

Rover ``i`` drives in block ``i % num_blocks`` under that block's light and is out only in its block's
rounds; each block is scored with the model it would use, from scratch and from a pretrained network.
Set-up and results: ``docs/experiments.md``, section 3.

    .venv/bin/python -m experiments.semicyclic [--quick] [--seeds 0 1 2] [--out DIR]
"""

from __future__ import annotations

import itertools
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from experiments import cli, federated, heldout, report
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
    frames_per_rover: int = 16
    held_out_per_rover: int = 4
    availability: tuple[float, float] = (0.8, 1.0)  # within its block's rounds
    fraction_train: float = 1.0
    local_epochs: int = 2
    lr: float = 0.003
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
        """A few-minute version: one seed, 6 rovers, three cycles of 3 blocks x 1 round."""
        return cls(seeds=(0,), num_rovers=6, rounds_per_block=1, rounds=9, frames_per_rover=8,
                   held_out_per_rover=3)


def block_predictors(strategy: RoverStrategy, num_blocks: int) -> list[list | None]:
    """Per block, the MM/MC-PSGD predictor, or None where the block uses the global model (FedAvg, no predictor yet)."""
    server = strategy.server
    if not hasattr(server, "predictor"):
        return [None] * num_blocks
    return [server.predictor(m) for m in range(num_blocks)]


def score_hook(scorer: heldout.ModelScorer, held: heldout.HeldOut, num_blocks: int) -> federated.RoundHook:
    """After each round: every block's held-out frames with that block's model; their mean; MC's chosen chain.

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
        average = [(a / running["count"]).astype(np.asarray(p).dtype) for a, p in zip(running["sum"],
                                                                                    strategy.params)]
        averaged = scorer.score(strategy.names, average, held, only=blocks)
        scores = scorer.score(strategy.names, strategy.params, held, only=["all", *blocks])
        out = {k.replace("all/", "global/", 1): v for k, v in scores.items() if k.startswith("all/")}
        for block, predictor in enumerate(block_predictors(strategy, num_blocks)):
            name = blocks[block]
            if predictor is None:
                out.update({k: v for k, v in scores.items() if k.startswith(f"{name}/")})
            else:
                out.update(scorer.score(strategy.names, predictor, held, only=[name]))
        for metric in METRICS:
            out[f"mean/{metric}"] = statistics.fmean(out[f"{b}/{metric}"] for b in blocks)
            out[f"average/{metric}"] = statistics.fmean(averaged[f"{b}/{metric}"] for b in blocks)
        record = strategy.last_record if server_round else None
        if record is not None:
            out["block"] = float(record.block) if record.block is not None else math.nan
            out["chose_separate"] = 1.0 if record.chosen == "separate" else 0.0
        return out

    return hook


def run(config: SemiCyclicConfig, out_dir: Path) -> dict:
    """Run every algorithm on every seed; write ``<out>/semicyclic.{json,csv,png}``; return the result."""
    federated.quiet_logs()
    if config.num_blocks < 2:
        raise ValueError(f"num_blocks must be >= 2 for block-cyclic data, got {config.num_blocks}")
    started = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory(prefix="exp-cyclic-") as tmp:
        for seed in config.seeds:
            root = Path(tmp) / f"seed{seed}"
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
            for start, algorithm in itertools.product(config.starts, config.algorithms):
                run_config = federated.experiment_config(
                    config, seed, root / f"{start}-{algorithm}.db", algorithm=algorithm,
                    population=str(population_path),
                    **{"num-blocks": config.num_blocks, "rounds-per-block": config.rounds_per_block})
                task = TaskConfig.from_run_config(run_config)
                coordinator = None
                if start == "pretrained":
                    if start not in nets:
                        nets[start] = federated.pretrain_network(
                            task, seed, config.pretrain_forests, config.pretrain_frames, config.pretrain_epochs)
                    coordinator = federated.build_coordinator_from(run_config, *get_arrays(nets[start]))
                elif start != "scratch":
                    raise ValueError(f"start must be 'scratch' or 'pretrained', got {start!r}")
                hook = score_hook(heldout.ModelScorer(task), held, config.num_blocks)
                rows = federated.run_federated(run_config, make_client_app(run_config), config.num_rovers, hook,
                                     coordinator=coordinator)
                runs.append({"setting": f"{algorithm}, {start}", "algorithm": algorithm, "start": start,
                             "seed": seed, "rounds": rows})
    blocks = {m: BLOCK_WEATHERS[m % len(BLOCK_WEATHERS)] for m in range(config.num_blocks)}
    result = report.experiment_result(NAME, CLAIM, config, runs, summarise(config, runs), started, blocks=blocks)
    write_outputs(result, config, out_dir)
    return result


def summarise(config: SemiCyclicConfig, runs: list[dict]) -> dict:
    """Per algorithm: last-round and last-cycle-mean block metrics (mean ± std over seeds), MC's choices, costs."""
    cycle = config.num_blocks * config.rounds_per_block
    summary: dict = {"settings": {}}
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
        summary["settings"][f"{algorithm}, {start}"] = s
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
            fmt(s.get("average/absrel", {})),
        ])
    header = ["algorithm, start", f"AbsRel, mean over blocks (round {config.rounds})", "δ<1.25, mean over blocks",
              "AbsRel, mean over the last cycle", *[f"AbsRel block {m} ({blocks[m]})" for m in blocks],
              "rounds the separate chain won", "control: plain average of all global models, AbsRel"]
    return markdown_table(header, rows)


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
