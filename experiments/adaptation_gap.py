"""Where FedAvg's gap to pooled training comes from, on the adaptation experiment's recording (in process).

The adaptation experiment (:mod:`experiments.adaptation`) finds FedAvg from the shipped weights well short of pooled
training. This study replays FedAvg in process with the same training (AdamW, batch, learning rate, BatchNorm
frozen, the rovers' own held-out segments) so that a variant may change what the protocol does not let a rover
change, such as its data or its optimiser state, and runs pooled training as long for comparison. Every round's
global model (every pooled epoch) is scored on all rovers' held-out segments. Results and what they say:
``docs/experiments.md``, section 5.

Variants are ``+``-joined parts: ``plain``; ``iid`` (the rovers' training frames shuffled into shards of the same
sizes); ``stateful`` (each rover keeps its AdamW state from round to round); ``cosine`` (the local learning rate
cosine-decayed over the rounds towards a tenth); ``sgd`` (plain SGD on the rovers); ``scaffold`` (SCAFFOLD-style
control variates: each local gradient is corrected by the swarm's mean gradient of the last round minus the rover's
own, before the optimiser step); ``server-lr=X``;
``local-epochs=N``; ``lr=X``; ``prox=MU`` (FedProx's proximal term on the rovers, run config ``proximal-mu``).

    .venv/bin/python -m experiments.adaptation_gap [--variants plain iid local-epochs=4 ...] [--rounds 10]
        [--seeds 0] [--model autoencoder_160x128] [--out DIR]
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from experiments import cli, report
from experiments.adaptation import (
    AdaptationConfig,
    held_out,
    load_rovers,
    pooled_data,
    record,
    run_config,
    score,
    shipped_model,
)
from forest_perception.collab.algorithms import fedavg
from forest_perception.collab.flower.task import (
    ControlledStep,
    LocalData,
    TaskConfig,
    build_model,
    get_arrays,
    local_optimizer,
    round_seed,
    set_arrays,
    train_local,
)
from forest_perception.collab.updates import ClientUpdate

NAME = "adaptation_gap"
CLAIM = ("FedAvg from the shipped weights ends within 10 % of pooled training in the new forest; this study "
         "measures which part of the gap each change to FedAvg removes")
DEFAULT_VARIANTS = ("plain", "iid", "stateful", "local-epochs=4", "server-lr=1.5")
COSINE_FLOOR = 0.1
"""``cosine``: the learning rate the schedule decays towards (one round past the last), as a share of the first's."""


@dataclass(frozen=True)
class Variant:
    """One way of running FedAvg: its name (as given) and what it changes."""

    name: str
    iid: bool = False
    stateful: bool = False
    cosine: bool = False
    sgd: bool = False
    scaffold: bool = False
    server_lr: float = 1.0
    local_epochs: int | None = None
    lr: float | None = None
    prox: float = 0.0


def parse_variant(text: str) -> Variant:
    """A :class:`Variant` from ``+``-joined parts (module docstring); ValueError naming a part it does not know."""
    flags = ("iid", "stateful", "cosine", "sgd", "scaffold")
    values: dict = {}
    for part in (p.strip() for p in str(text).split("+")):
        key, _, raw = part.partition("=")
        try:
            if part == "plain":
                continue
            if part in flags:
                values[part] = True
            elif key == "server-lr" and float(raw) > 0:
                values["server_lr"] = float(raw)
            elif key == "local-epochs" and int(raw) >= 1:
                values["local_epochs"] = int(raw)
            elif key == "lr" and float(raw) > 0:
                values["lr"] = float(raw)
            elif key == "prox" and float(raw) >= 0:
                values["prox"] = float(raw)
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"variant {text!r}: cannot read {part!r}; parts are plain, iid, stateful, cosine, sgd, "
                             "scaffold, server-lr=X (> 0), local-epochs=N (>= 1), lr=X (> 0), prox=MU (>= 0), "
                             "joined by +") from None
    return Variant(name=str(text), **values)


def variant_task(task: TaskConfig, variant: Variant) -> TaskConfig:
    """The rovers' training settings under ``variant`` (optimiser, local epochs, learning rate, proximal term)."""
    changes: dict = {"proximal_mu": variant.prox}
    if variant.sgd:
        changes["optimizer"] = "sgd"
    if variant.local_epochs is not None:
        changes["local_epochs"] = variant.local_epochs
    if variant.lr is not None:
        changes["lr"] = variant.lr
    return dataclasses.replace(task, **changes)


def round_lr(lr: float, server_round: int, rounds: int, cosine: bool) -> float:
    """The local learning rate of ``server_round`` (1-based): ``lr``, or cosine-decayed from ``lr`` in round 1
    towards ``COSINE_FLOOR * lr`` one round past ``rounds``."""
    if not cosine:
        return lr
    share = 0.5 * (1.0 + math.cos(math.pi * (server_round - 1) / rounds))
    return lr * (COSINE_FLOOR + (1.0 - COSINE_FLOOR) * share)


def iid_shards(rovers: dict[str, LocalData], seed: int) -> dict[str, LocalData]:
    """Every rover's training frames shuffled together and dealt back in shards of the same sizes; each rover keeps
    its own held-out frames (what is scored does not change)."""
    names = list(rovers)
    images = torch.cat([rovers[r].train_images for r in names])
    depth = torch.cat([rovers[r].train_depth for r in names])
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(int(seed)))
    out, first = {}, 0
    for rover in names:
        data = rovers[rover]
        pick = order[first : first + data.num_train]
        first += data.num_train
        out[rover] = dataclasses.replace(data, train_images=images[pick], train_depth=depth[pick])
    return out


def _local_round(model: torch.nn.Module, data: LocalData, task: TaskConfig, seed: int,
                 optimizer: torch.optim.Optimizer | None) -> None:
    """One round of local training; with ``optimizer`` (a stateful rover) that optimiser is stepped, its state kept."""
    train_local(model, data, task, seed=seed, optimizer=optimizer)


def run_fedavg_variant(config: AdaptationConfig, task: TaskConfig, variant: Variant, rovers: dict[str, LocalData],
                       held: dict, seed: int, rounds: int, progress: bool = True) -> dict:
    """FedAvg under ``variant`` for ``rounds`` rounds from the shipped weights; the run with one row per round."""
    if variant.iid:
        rovers = iid_shards(rovers, seed)
    base = variant_task(task, variant)
    glob = shipped_model(config, base)
    names, arrays = get_arrays(glob)
    rows = [{"round": 0.0, **score(glob, held, base)}]
    kept: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]] = {}
    controls: dict[str, list[torch.Tensor]] = {}  # scaffold: each rover's mean gradient of its last round
    swarm: list[torch.Tensor] | None = None  # and their mean
    start = time.perf_counter()
    for r in range(1, rounds + 1):
        t0 = time.perf_counter()
        this = dataclasses.replace(base, lr=round_lr(base.lr, r, rounds, variant.cosine))
        updates = []
        for rover, data in rovers.items():
            if variant.stateful:
                if rover not in kept:
                    model = build_model(this)
                    kept[rover] = (model, local_optimizer(model, this))
                model, optimizer = kept[rover]
            else:
                model, optimizer = build_model(this), None
            set_arrays(model, names, arrays)
            if variant.scaffold:
                if optimizer is None:
                    optimizer = local_optimizer(model, this)
                params = [p for group in optimizer.param_groups for p in group["params"]]
                own = controls.get(rover)
                correction = None if swarm is None or own is None else [c - o for c, o in zip(swarm, own)]
                optimizer = ControlledStep(optimizer, params, correction)
            _local_round(model, data, this, round_seed(seed, r, rover), optimizer)
            if variant.scaffold:
                controls[rover] = optimizer.mean_gradient()
            updates.append(ClientUpdate(rover, r - 1, data.num_train, get_arrays(model)[1], kind="weights"))
        if variant.scaffold:
            swarm = [torch.stack(parts).mean(0) for parts in zip(*controls.values())]
        arrays = [np.asarray(a) for a in fedavg(arrays, updates, server_lr=variant.server_lr)]
        set_arrays(glob, names, arrays)
        rows.append({"round": float(r), "wall_s": time.perf_counter() - t0, "lr": this.lr, **score(glob, held, base)})
        if progress:
            print(f"[{NAME}] {variant.name} seed {seed} round {r}/{rounds}: AbsRel {rows[-1]['absrel']:.4f}",
                  flush=True)
    return {"method": "fedavg", "variant": variant.name, "seed": seed, "wall_s": time.perf_counter() - start,
            "rounds": rows}


def run_pooled(config: AdaptationConfig, task: TaskConfig, rovers: dict[str, LocalData], held: dict, seed: int,
               epochs: int, progress: bool = True) -> dict:
    """Pooled training (every rover's training frames in one set) for ``epochs`` epochs, scored after each."""
    data = pooled_data(rovers)
    model = shipped_model(config, task)
    rows = [{"round": 0.0, **score(model, held, task)}]
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        train_local(model, data, task, seed=round_seed(seed, epoch, "pooled"))
        rows.append({"round": float(epoch), "wall_s": time.perf_counter() - t0, **score(model, held, task)})
        if progress:
            print(f"[{NAME}] pooled seed {seed} epoch {epoch}/{epochs}: AbsRel {rows[-1]['absrel']:.4f}", flush=True)
    return {"method": "pooled", "variant": "pooled", "seed": seed, "wall_s": time.perf_counter() - start,
            "rounds": rows}


def summarise(runs: list[dict], rounds: int) -> dict:
    """Per variant: AbsRel after ``rounds`` (mean over seeds), best round, and against pooled after as many epochs."""
    by: dict[str, list[dict]] = {}
    for run in runs:
        by.setdefault(run["variant"], []).append(run)
    pooled_last = report.mean_std(r["rounds"][-1]["absrel"] for r in by.get("pooled", []))["mean"]
    out = {}
    for variant, mine in by.items():
        last = report.mean_std(r["rounds"][-1]["absrel"] for r in mine)
        best = report.mean_std(min(row["absrel"] for row in r["rounds"][1:]) for r in mine)
        out[variant] = {"absrel": last, "best_absrel": best,
                        "delta1": report.mean_std(r["rounds"][-1]["delta1"] for r in mine),
                        "vs_pooled": last["mean"] / pooled_last - 1.0 if pooled_last else math.nan}
    return {"rounds": rounds, "pooled_absrel": pooled_last, "variants": out}


def table(result: dict) -> str:
    """Markdown table: each variant's AbsRel / δ1 after the last round, its best round and the gap to pooled."""
    summary = result["summary"]
    rows = [[name, report.fmt(v["absrel"]), report.fmt(v["best_absrel"]), report.fmt(v["delta1"]),
             "-" if name == "pooled" else f"{100 * v['vs_pooled']:+.0f} %"]
            for name, v in summary["variants"].items()]
    return report.markdown_table(
        ["variant", f"AbsRel after {summary['rounds']}", "best round", "δ1", "against pooled"], rows)


def run(config: AdaptationConfig, out_dir: Path, variants: Sequence[str] = DEFAULT_VARIANTS, rounds: int = 10,
        folders: dict[str, Path] | None = None, progress: bool = True) -> dict:
    """Every variant and pooled training on every seed; writes ``<out>/adaptation_gap.{json,csv,png}``."""
    parsed = [parse_variant(v) for v in variants]  # refuse a bad variant before recording anything
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    started = time.perf_counter()
    recording: dict = {}
    if folders is None:
        folders, recording = record(config, out_dir)
    runs = []
    for seed in config.seeds:
        task = TaskConfig.from_run_config(run_config(config, seed))
        loaded = load_rovers(folders, task)
        rovers = {r: d for r, d in loaded.items() if isinstance(d, LocalData)}
        for rover, why in loaded.items():
            if rover not in rovers:
                print(f"[{NAME}] {rover}: {why}", flush=True)
        if not rovers:
            raise ValueError(f"no rover has data: {loaded}")
        held = held_out(rovers)
        runs.append(run_pooled(config, task, rovers, held, seed, rounds, progress))
        for variant in parsed:
            runs.append(run_fedavg_variant(config, task, variant, rovers, held, seed, rounds, progress))
    result = report.experiment_result(NAME, CLAIM, {**dataclasses.asdict(config), "rounds": rounds,
                                                    "variants": list(variants)},
                                      runs, summarise(runs, rounds), started, recording=recording)
    report.write_result(out_dir, result, table(result))
    curves = {name: report.curve_stats([r["rounds"] for r in runs if r["variant"] == name], "absrel")
              for name in ["pooled", *variants]}
    report.plot_panels(Path(out_dir) / f"{NAME}.png",
                       [{"title": "AbsRel, all rovers' held-out", "ylabel": "absrel", "curves": curves,
                         "xlabel": "round (pooled: epoch)"}],
                       f"FedAvg variants against pooled training\n{config.model}, {len(config.seeds)} seed(s)",
                       ncols=1)
    return result


def main(argv: list[str] | None = None) -> None:
    """Command line entry: ``--variants``, ``--rounds``, ``--model``, ``--quick``, ``--seeds``, ``--out``."""
    parser = cli.experiment_arguments(__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                        help=f"FedAvg variants (module docstring; default: {' '.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--rounds", type=int, default=None,
                        help="FedAvg rounds and pooled epochs (default: the adaptation experiment's)")
    parser.add_argument("--model", default=AdaptationConfig.model, help="shipped network to adapt")
    args = parser.parse_args(argv)
    config = dataclasses.replace(cli.pick_config(AdaptationConfig, args.quick, args.seeds or [0]), model=args.model)
    try:
        for v in args.variants:
            parse_variant(v)
    except ValueError as exc:
        raise SystemExit(f"adaptation_gap: {exc}") from None
    result = run(config, args.out, args.variants, args.rounds or config.rounds)
    print(table(result))
    print(f"\n{NAME}: {result['elapsed_s']:.0f} s; results in {args.out}")


if __name__ == "__main__":
    main()

