"""FedSubAvg vs FedAvg on a model with a sparse part: a per-place scale embedding (Ding et al., FedSubAvg).

The model is the federated auto-encoder times a learned per-place scale (:class:`PlaceScaledDepth`), so this
module has its own ClientApp (:func:`make_place_client_app`); the coordinator, strategies, screening and
store are the real ones. Set-up and results: ``docs/experiments.md``, section 2.

    .venv/bin/python -m experiments.fedsubavg_sparse [--quick] [--seeds 0 1 2] [--out DIR]
"""

from __future__ import annotations

import dataclasses
import math
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from experiments import cli, federated, report, tuning
from experiments.heldout import HELD_OUT_STREAM, WEATHERS, HeldOut, nan_scores, render_frames, score_predictions
from experiments.report import curve, curve_stats, fmt, markdown_table, mean_std
from forest_perception.collab.flower.messages import CONFIG_KEY, global_arrays, identity_reply, put_update, train_reply
from forest_perception.collab.flower.rover_strategy import RoverStrategy
from forest_perception.collab.flower.server_app import Coordinator
from forest_perception.collab.flower.task import (
    TaskConfig,
    build_model,
    depth_loss,
    get_arrays,
    round_seed,
    run_local_epochs,
    set_arrays,
)

NAME = "fedsubavg_sparse"
CLAIM = ("FedSubAvg reaches a target loss in fewer rounds than FedAvg when clients involve few rows of a sparse "
         "part of the model; here: a per-place scale embedding on the depth auto-encoder")
EMBEDDING = "place_log_scale.weight"
"""Name of the place table in the model's ``state_dict``."""


# ---------------------------------------------------------------------------------------------- model


class PlaceScaledDepth(nn.Module):
    """A depth network times a learned per-place scale: ``depth = net(image) * exp(place_log_scale[place])``."""

    def __init__(self, net: nn.Module, num_places: int) -> None:
        super().__init__()
        if num_places < 1:
            raise ValueError(f"num_places must be >= 1, got {num_places}")
        self.net = net
        self.place_log_scale = nn.Embedding(num_places, 1)
        nn.init.zeros_(self.place_log_scale.weight)  # every place starts at the network's own scale

    def forward(self, image: torch.Tensor, place: torch.Tensor) -> torch.Tensor:
        """Metric depth ``Bx1xHxW`` from normalised RGB ``Bx3xHxW`` and place ids ``B`` (int64)."""
        if place.shape != (image.shape[0],):
            raise ValueError(f"need one place id per image: {tuple(place.shape)} ids for {image.shape[0]} images")
        return self.net(image) * torch.exp(self.place_log_scale(place)).view(-1, 1, 1, 1)


def build_place_model(task: TaskConfig, num_places: int) -> PlaceScaledDepth:
    """The task's network (same initial weights for the same seed) with a zero place table."""
    return PlaceScaledDepth(build_model(task), num_places)


# ---------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Place:
    """A forest plot: its trees (``forest_seed``), light, and the camera's height above the visible ground."""

    place_id: int
    forest_seed: int
    weather: str
    camera_height: float


@dataclass
class PlaceRover:
    """A rover's frames, each with the id of the place it was recorded in."""

    rover_id: str
    places: tuple[int, ...]
    images: torch.Tensor
    depth: torch.Tensor
    place_ids: torch.Tensor

    @property
    def num_frames(self) -> int:
        """Training frames."""
        return int(self.images.shape[0])


def make_places(num_places: int, seed: int, height_range: tuple[float, float]) -> list[Place]:
    """``num_places`` places with forest seeds, weathers and log-uniform camera heights, from ``seed``."""
    lo, hi = height_range
    if not 0 < lo <= hi:
        raise ValueError(f"height_range must be 0 < low <= high metres, got {height_range}")
    rng = np.random.default_rng([seed, 23])
    return [
        Place(p, int(rng.integers(2**31)), WEATHERS[int(rng.integers(len(WEATHERS)))],
              float(np.exp(rng.uniform(np.log(lo), np.log(hi)))))
        for p in range(num_places)
    ]


def assign_places(num_rovers: int, num_places: int, per_rover: int, zipf: float, seed: int) -> list[tuple[int, ...]]:
    """Distinct places per rover, drawn with popularity ``1 / (rank + 1) ** zipf`` over a shuffled place order."""
    if not 1 <= per_rover <= num_places:
        raise ValueError(f"places_per_rover must be within [1, {num_places}], got {per_rover}")
    rng = np.random.default_rng([seed, 29])
    order = rng.permutation(num_places)
    popularity = np.empty(num_places)
    popularity[order] = 1.0 / (np.arange(num_places) + 1.0) ** zipf
    popularity /= popularity.sum()
    return [tuple(sorted(int(p) for p in rng.choice(num_places, size=per_rover, replace=False, p=popularity)))
            for _ in range(num_rovers)]


def place_frames(place: Place, count: int, hw: tuple[int, int], stream: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames of a place from the random stream ``stream`` (rovers and the held-out set use different streams)."""
    return render_frames(place.forest_seed, place.weather, count, hw, stream, camera_height=place.camera_height)


def make_rovers(
    places: Sequence[Place], visits: Sequence[tuple[int, ...]], frames_per_place: int, hw: tuple[int, int]
) -> list[PlaceRover]:
    """Each rover's frames: ``frames_per_place`` of each place it visits, from its own poses."""
    rovers = []
    for i, visited in enumerate(visits):
        images, depth, ids = [], [], []
        for p in visited:
            im, d = place_frames(places[p], frames_per_place, hw, stream=1000 + i)
            images.append(im)
            depth.append(d)
            ids += [p] * im.shape[0]
        rovers.append(PlaceRover(f"rover_{i:03d}", tuple(visited), torch.cat(images), torch.cat(depth),
                                 torch.tensor(ids, dtype=torch.int64)))
    return rovers


# ---------------------------------------------------------------------------------------------- rover app


def train_place_model(
    model: PlaceScaledDepth, rover: PlaceRover, task: TaskConfig, embedding_lr: float, seed: int,
    variance_focus: float = 0.0,
) -> dict[str, float]:
    """Local AdamW epochs (task loss; place table at ``embedding_lr``): ``train-loss``, ``steps``, ``train-s``."""
    loss_fn = depth_loss(task, variance_focus)
    optimizer = torch.optim.AdamW(
        [{"params": model.net.parameters(), "lr": task.lr},
         {"params": model.place_log_scale.parameters(), "lr": embedding_lr}], weight_decay=0.0)

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        image = rover.images[idx]
        return loss_fn(model(image, rover.place_ids[idx]), rover.depth[idx], image)[0]

    model.train()
    metrics = run_local_epochs(batch_loss, optimizer, rover.num_frames, task, seed, f"rover {rover.rover_id}")
    model.eval()
    return metrics


def make_place_client_app(
    rovers: Sequence[PlaceRover], task: TaskConfig, num_places: int, embedding_lr: float, variance_focus: float = 0.0
) -> ClientApp:
    """A rover ClientApp for :class:`PlaceScaledDepth`: node ``partition-id`` plays ``rovers[partition-id]``.

    ``train`` replies like the real rover app: the dense deltas, the place table compact (only
    the rover's places, named in ``rows``), ``metrics`` and ``meta``. ``query`` says which rover
    the node is. Data are handed in (in-process simulation), not read from disk.
    """
    client = ClientApp()

    def rover_of(context: Context) -> PlaceRover:
        partition = int(context.node_config["partition-id"])
        if not 0 <= partition < len(rovers):
            raise ValueError(f"no rover for partition-id {partition} (there are {len(rovers)})")
        return rovers[partition]

    @client.train()
    def train(message: Message, context: Context) -> Message:
        rover = rover_of(context)
        config = message.content.config_records[CONFIG_KEY]
        server_round = int(config["server-round"])
        local = dataclasses.replace(task, local_epochs=int(config.get("local-epochs", task.local_epochs)),
                                    lr=float(config.get("lr", task.lr)),
                                    batch_size=int(config.get("batch-size", task.batch_size)))
        names, arrays = global_arrays(message)
        model = build_place_model(local, num_places)
        set_arrays(model, names, arrays)
        seed = round_seed(task.seed, server_round, rover.rover_id)
        metrics = train_place_model(model, rover, local, embedding_lr, seed, variance_focus)
        _, trained = get_arrays(model)
        rows = np.array(rover.places, dtype=np.int64)
        deltas = []
        for name, base, value in zip(names, arrays, trained):
            delta = (value.astype(np.float64) - base.astype(np.float64)).astype(base.dtype)
            deltas.append(delta[rows] if name == EMBEDDING else delta)
        content = RecordDict()
        put_update(content, names, deltas, {EMBEDDING: rows})
        return train_reply(message, content, {"num-examples": float(rover.num_frames), **metrics}, rover.rover_id,
                           server_round)

    @client.query()
    def query(message: Message, context: Context) -> Message:
        return identity_reply(message, rover_of(context).rover_id)

    return client


def build_place_coordinator(run_config: dict, num_places: int, net: nn.Module | None = None) -> Coordinator:
    """The real coordinator (strategy of ``algorithm``, SQLite store) for :class:`PlaceScaledDepth`.

    ``net`` (e.g. :func:`experiments.federated.pretrain_network`) gives the initial network
    weights; by default the task's initialisation.
    """
    task = TaskConfig.from_run_config(run_config)
    model = build_place_model(task, num_places)
    if net is not None:
        model.net.load_state_dict(net.state_dict())
    names, initial = get_arrays(model)
    return federated.build_coordinator_from(run_config, names, initial, model=f"place-scaled-{task.model}")


# ---------------------------------------------------------------------------------------------- experiment


@dataclass(frozen=True)
class SubAvgConfig:
    """Places, rovers, schedule and training of the FedSubAvg experiment."""

    seeds: tuple[int, ...] = (0, 1, 2)
    num_rovers: int = 12
    num_places: int = 32
    places_per_rover: int = 2
    zipf: float = 1.0
    camera_heights: tuple[float, float] = (0.12, 0.36)
    frames_per_place: int = 4
    held_out_per_place: int = 3
    hot_rovers: int = 3  # a place visited by at least this many rovers is "hot"; by one rover, "cold"
    rounds: int = 20
    fraction_train: float = 0.5
    local_epochs: int = 2
    lr: float = 0.001  # pretraining's; the federated runs fine-tune at each algorithm's best of ``lrs``
    lrs: tuple[float, ...] = (0.0003, 0.001, 0.003)  # the network's; the same grid for both, tuned on tune_seed
    tune_seed: int = 100
    tail_rounds: int = 5  # tuning's score: held-out AbsRel averaged over the last rounds
    embedding_lr: float = 0.05
    variance_focus: float = 0.0  # silog's lambda: 0 makes the loss see the scale the place table exists for
    base_channels: int = 4
    hw: tuple[int, int] = (64, 80)
    pretrain_forests: int = 8  # 0: start from the untrained network
    pretrain_frames: int = 8
    pretrain_epochs: int = 10
    target_fractions: tuple[float, ...] = (0.5, 0.8, 0.9)
    algorithms: tuple[str, ...] = ("fedavg", "fedsubavg")

    @classmethod
    def quick(cls) -> SubAvgConfig:
        """A few-minute version: one seed, 8 rovers, 16 places, 10 rounds."""
        return cls(seeds=(0,), num_rovers=8, num_places=16, rounds=10, held_out_per_place=2, lrs=(0.001,))


def score_hook(
    scorer_model: PlaceScaledDepth, held: HeldOut, held_places: torch.Tensor, task: TaskConfig, variance_focus: float
) -> federated.RoundHook:
    """After each round: the global model on the held-out frames of every visited place (and hot/cold groups)."""

    @torch.no_grad()
    def hook(strategy: RoverStrategy, server_round: int) -> dict[str, float]:
        try:
            set_arrays(scorer_model, strategy.names, strategy.params)
        except ValueError:
            return nan_scores(held)
        scorer_model.eval()
        pred = torch.cat([scorer_model(held.images[i : i + 64], held_places[i : i + 64])
                          for i in range(0, len(held), 64)])
        if not bool(torch.isfinite(pred).all()):
            return nan_scores(held)
        return score_predictions(pred, held, task, variance_focus=variance_focus)

    return hook


def run_seed(config: SubAvgConfig, seed: int, root: Path, lr_of: Mapping[str, float]) -> tuple[list[dict], dict]:
    """Both algorithms on one seed's places and rovers, each at ``lr_of[algorithm]``; the runs and the population."""
    places = make_places(config.num_places, seed, config.camera_heights)
    visits = assign_places(config.num_rovers, config.num_places, config.places_per_rover, config.zipf, seed)
    rovers = make_rovers(places, visits, config.frames_per_place, config.hw)
    visitors = {p: sum(p in v for v in visits) for p in range(config.num_places)}
    visited = [p for p in range(config.num_places) if visitors[p]]
    parts = {f"place_{p}": place_frames(places[p], config.held_out_per_place, config.hw, HELD_OUT_STREAM)
             for p in visited}
    groups = {"all": list(parts),
              "hot": [f"place_{p}" for p in visited if visitors[p] >= config.hot_rovers],
              "cold": [f"place_{p}" for p in visited if visitors[p] == 1]}
    held = HeldOut.build(parts, {k: v for k, v in groups.items() if v})
    held_places = torch.tensor([p for p in visited for _ in range(config.held_out_per_place)], dtype=torch.int64)
    population = {"seed": seed, "places_visited": len(visited), "visits": visits, "visitors_per_place": visitors,
                  "hot": len(groups["hot"]), "cold": len(groups["cold"]),
                  "camera_heights": [round(p.camera_height, 3) for p in places]}
    net = None
    runs = []
    for algorithm in config.algorithms:
        lr = float(lr_of[algorithm])
        run_config = federated.experiment_config(config, seed, root / f"{seed}-{algorithm}-{lr:g}.db",
                                                 algorithm=algorithm, lr=lr)
        task = TaskConfig.from_run_config(run_config)
        if net is None and config.pretrain_forests:  # once per seed, at config.lr whatever the runs' rates
            net = federated.pretrain_network(dataclasses.replace(task, lr=config.lr), seed, config.pretrain_forests,
                                             config.pretrain_frames, config.pretrain_epochs)
        app = make_place_client_app(rovers, task, config.num_places, config.embedding_lr, config.variance_focus)
        hook = score_hook(build_place_model(task, config.num_places), held, held_places, task, config.variance_focus)
        coordinator = build_place_coordinator(run_config, config.num_places, net)
        rows = federated.run_federated(run_config, app, config.num_rovers, hook, coordinator=coordinator)
        runs.append({"algorithm": algorithm, "setting": algorithm, "lr": lr, "seed": seed, "rounds": rows})
    return runs, population


def run(config: SubAvgConfig, out_dir: Path) -> dict:
    """Tune each algorithm's learning rate, run both on every seed; write ``<out>/fedsubavg_sparse.*``."""
    federated.quiet_logs()
    if config.tune_seed in config.seeds and len(config.lrs) > 1:
        raise ValueError(f"tune_seed {config.tune_seed} must not be a reported seed {config.seeds}")
    started = time.perf_counter()
    runs, populations = [], []
    with tempfile.TemporaryDirectory(prefix="exp-subavg-") as tmp:
        best, trials = tuning.tune(
            config.algorithms, config.lrs, config.tune_seed,
            lambda seed, lr_of: run_seed(config, seed, Path(tmp), lr_of)[0],
            lambda r: tuning.tail_mean(r["rounds"], "all/absrel", config.tail_rounds),
            log=lambda line: print(f"[{NAME}]{line}", flush=True))
        for seed in config.seeds:
            seed_runs, population = run_seed(config, seed, Path(tmp), best)
            runs += seed_runs
            populations.append(population)
    result = report.experiment_result(NAME, CLAIM, config, runs, summarise(config, runs), started,
                                      populations=populations, tuning={"best": best, "trials": trials})
    write_outputs(result, config, out_dir)
    return result


def targets_of(runs: Sequence[dict], key: str, fractions: Sequence[float]) -> dict[float, float]:
    """Per fraction q, the value ``start - q * (start - best)``: best = the lowest ``key`` any of ``runs`` reached.

    ``start`` is the initial model's value (round 0, the same for every algorithm of a seed), so
    a target means "q of the improvement the better algorithm made on this seed" and favours
    neither algorithm.
    """
    values = np.concatenate([curve(r["rounds"], key) for r in runs])
    finite = values[np.isfinite(values)]
    start = float(curve(runs[0]["rounds"], key)[0]) if runs else math.nan
    if finite.size == 0 or not math.isfinite(start):
        return {q: math.nan for q in fractions}
    best = float(finite.min())
    return {q: start - q * (start - best) for q in fractions}


def summarise(config: SubAvgConfig, runs: list[dict]) -> dict:
    """Rounds to reach targets of held-out loss and AbsRel (per seed, then mean ± std), final metrics, costs."""
    summary: dict = {"algorithms": {a: {} for a in config.algorithms}, "targets": {}}
    for key in ("all/loss", "all/absrel"):
        for seed in config.seeds:
            mine = [r for r in runs if r["seed"] == seed]
            summary["targets"].setdefault(key, {})[seed] = targets_of(mine, key, config.target_fractions)
    for algorithm in config.algorithms:
        mine = [r for r in runs if r["algorithm"] == algorithm]
        s = summary["algorithms"][algorithm]
        last = [r["rounds"][-1] for r in mine]
        for key in ("all/loss", "all/absrel", "all/delta1", "hot/absrel", "cold/absrel"):
            s[key] = mean_std(row.get(key, math.nan) for row in last)
        for key in ("all/loss", "all/absrel"):
            for q in config.target_fractions:
                reached = []
                for r in mine:
                    target = summary["targets"][key][r["seed"]][q]
                    hit = report.rounds_to_target(r["rounds"], key, target)
                    reached.append(hit)
                s[f"rounds_to_{q:g}_{key}"] = {
                    **mean_std(math.nan if h is None else h for h in reached),
                    "per_seed": reached, "never": sum(h is None for h in reached),
                }
        s["costs"] = report.cost_stats(mine)
        s["lr"] = mine[0]["lr"] if mine else math.nan
    if {"fedavg", "fedsubavg"} <= set(config.algorithms):
        summary["paired"] = {f"fedsubavg - fedavg, {key} (last {config.tail_rounds} rounds)": tuning.paired(
            runs, lambda r, key=key: tuning.tail_mean(r["rounds"], key, config.tail_rounds), "fedsubavg", "fedavg")
            for key in ("all/absrel", "cold/absrel")}
    return summary


def table(result: dict) -> str:
    """The results table (markdown)."""
    config = result["config"]
    rows = []
    for algorithm, s in result["summary"]["algorithms"].items():
        reach = []
        for q in config.target_fractions:
            stat = s[f"rounds_to_{q:g}_all/loss"]
            reach.append(fmt(stat, 1) + (f" ({stat['never']} never)" if stat["never"] else ""))
        rows.append([algorithm, *reach, fmt(s["all/loss"]), fmt(s["all/absrel"]), fmt(s["hot/absrel"]),
                     fmt(s["cold/absrel"]), fmt(s["costs"]["kib_up_per_rover"], 1), f"{s.get('lr', math.nan):g}"])
    header = ["algorithm", *[f"rounds to {int(q * 100)} % of the loss drop" for q in config.target_fractions],
              f"loss (round {config.rounds})", "AbsRel all", "AbsRel hot places", "AbsRel cold places",
              "KiB up/rover/round", "lr"]
    text = markdown_table(header, rows)
    return text + tuning.paired_and_tuning_tables(result, "FedSubAvg is better",
                                                  "Network learning rate of each algorithm",
                                                  f"AbsRel over the last {config.tail_rounds} rounds")


def write_outputs(result: dict, config: SubAvgConfig, out_dir: Path) -> None:
    """JSON (everything), CSV (one row per run and round), PNG (held-out curves)."""
    report.write_result(out_dir, result, table(result))
    panels = []
    for key, label in (("all/loss", "held-out loss (silog + smoothness)"), ("all/absrel", "AbsRel, all places"),
                       ("cold/absrel", "AbsRel, cold places (one rover)")):
        curves = {a: curve_stats([r["rounds"] for r in result["runs"] if r["algorithm"] == a], key)
                  for a in config.algorithms}
        panels.append({"title": label, "ylabel": key.split("/")[1], "curves": curves})
    report.plot_panels(Path(out_dir) / f"{NAME}.png", panels,
                f"FedSubAvg vs FedAvg, {config.num_rovers} rovers, {config.num_places} places "
                f"({config.places_per_rover} per rover), {len(config.seeds)} seed(s)")


def main(argv: list[str] | None = None) -> None:
    """Command line entry."""
    cli.run_experiment(sys.modules[__name__], SubAvgConfig, argv)


if __name__ == "__main__":
    main()
