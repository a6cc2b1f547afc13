"""Shared pieces of the experiments: held-out frames, the federated round loop, scoring, summaries and output.

Every federated run here is the real coordinator (:func:`forest_perception.collab.flower.server_app.build_coordinator`,
its strategy and SQLite store) talking to ClientApps through :class:`collab.flower.simulation.LocalGrid`
(in process, no Ray, no network): the same messages, screening and aggregation as a Ray or
deployed run, at a fraction of the cost on two cores. Rovers train one after the other, so a
round's wall time here is the coordinator plus the sum of the rovers' training, not the
parallel time of a real swarm (``bench/bench_federated.py`` gives the Ray figures).

Held-out frames are rendered by the same procedural ray caster as the rovers' own data
(:func:`forest_perception.collab.flower.simulation.render_procedural_frame`) from the rover's forest and
weather, but from poses drawn from another random stream, so no held-out frame is a
training frame; :func:`unseen_frames` renders forests no rover has seen.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.clientapp import ClientApp

from forest_perception.collab.flower.local_grid import LocalGrid
from forest_perception.collab.flower.population import Population, VirtualRover
from forest_perception.collab.flower.rover_data import ProceduralForest, ensure_rover_data, render_procedural_frame
from forest_perception.collab.flower.server_app import Coordinator, build_coordinator
from forest_perception.collab.flower.store import RoundRecord
from forest_perception.collab.flower.strategies import RoverStrategy
from forest_perception.collab.flower.task import TaskConfig, build_model, merge_run_config, set_arrays

RESULTS_DIR = Path(__file__).resolve().parent / "results"
"""Where ``run_all`` and the scripts write by default."""

EXPERIMENT_RUN_CONFIG: dict[str, Any] = {
    "base-channels": 4,
    "input-height": 64,
    "input-width": 80,
    "batch-size": 4,
    "local-epochs": 2,
    "lr": 0.003,
    "fraction-evaluate": 0.0,
    "evaluate-every": 0,
}
"""Run config shared by every experiment (on top of :data:`forest_perception.collab.flower.task.DEFAULT_RUN_CONFIG`)."""

HELD_OUT_STREAM = 101
"""Random stream of held-out poses (the rovers' own frames use stream 1)."""


def quiet_logs() -> None:
    """Keep the coordinator's per-round INFO lines and Flower's chatter out of the experiment output."""
    for name in ("forest_perception.collab", "flwr"):
        logging.getLogger(name).setLevel(logging.ERROR)


# ---------------------------------------------------------------------------------------------- frames


def frames_to_tensors(
    rgb: Sequence[np.ndarray], depth: Sequence[np.ndarray], min_depth: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rendered frames as network inputs and targets, exactly as :class:`models.data.ForestDepthDataset` makes them."""
    from forest_perception.models.data import image_normalisation

    if len(rgb) == 0 or len(rgb) != len(depth):
        raise ValueError(f"need as many RGB as depth frames, at least one; got {len(rgb)} and {len(depth)}")
    mean, std = image_normalisation()
    images = np.stack(rgb).astype(np.float32) / 255.0
    images = (images - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    target = np.stack(depth).astype(np.float32)
    with np.errstate(invalid="ignore"):
        target = np.where(np.isfinite(target) & (target > min_depth), target, 0.0).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))), torch.from_numpy(target[:, None])


def render_frames(
    forest_seed: int,
    weather: str,
    count: int,
    hw: tuple[int, int],
    stream: int = HELD_OUT_STREAM,
    camera_height: float = 0.2,
    min_depth: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` frames of forest ``forest_seed`` in ``weather`` at ``hw`` (height, width), poses from ``stream``."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    forest = ProceduralForest.generate(forest_seed)
    rng = np.random.default_rng([forest_seed, stream])
    height, width = hw
    rgb, depth = [], []
    for _ in range(count):
        pose = forest.free_pose(rng)
        image, target = render_procedural_frame(forest, pose, weather, width, height, rng, camera_height=camera_height)
        rgb.append(image)
        depth.append(target)
    return frames_to_tensors(rgb, depth, min_depth)


def held_out_frames(rover: VirtualRover, count: int, hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """New frames of a rover's own forest and weather (poses it never recorded)."""
    return render_frames(rover.forest_seed, rover.weather, count, hw)


def unseen_frames(
    seed: int, forests: int, per_forest: int, hw: tuple[int, int], weathers: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames of ``forests`` forests no rover has (seeds drawn from ``seed``), weathers cycling through ``weathers``."""
    rng = np.random.default_rng([seed, 977])
    images, depth = [], []
    for f in range(forests):
        i, d = render_frames(int(rng.integers(2**31)), weathers[f % len(weathers)], per_forest, hw)
        images.append(i)
        depth.append(d)
    return torch.cat(images), torch.cat(depth)


def write_population_data(population: Population, out_dir: Path, hw: tuple[int, int]) -> Path:
    """Each rover's training data (forest dataset layout, reused when present) and the population JSON."""
    height, width = hw
    for rover in population.rovers:
        ensure_rover_data(rover, width, height, "procedural")
    return population.save(Path(out_dir) / "population.json")


# ---------------------------------------------------------------------------------------------- scoring


METRIC_KEYS = ("loss", "absrel", "delta1", "rmse")


@dataclass
class HeldOut:
    """Held-out frames in one tensor pair, with named groups of frame indices to score separately.

    Build it with :meth:`build` from named parts (e.g. one per rover) and groups naming the
    parts each group pools (``{"all": [every rover], "rare": [...]}``).
    """

    images: torch.Tensor
    depth: torch.Tensor
    groups: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def build(
        cls, parts: Mapping[str, tuple[torch.Tensor, torch.Tensor]], groups: Mapping[str, Sequence[str]]
    ) -> HeldOut:
        """Concatenate ``parts`` (name -> frames); each group is the union of the parts it names."""
        if not parts:
            raise ValueError("HeldOut.build: no parts")
        images, depth, index, first = [], [], {}, 0
        for name, (i, d) in parts.items():
            if i.shape[0] != d.shape[0]:
                raise ValueError(f"held-out part {name!r}: {i.shape[0]} images but {d.shape[0]} depth maps")
            images.append(i)
            depth.append(d)
            index[name] = np.arange(first, first + i.shape[0])
            first += i.shape[0]
        out = {}
        for group, members in groups.items():
            unknown = [m for m in members if m not in index]
            if unknown or not members:
                raise ValueError(f"held-out group {group!r} names unknown or no parts: {unknown or members}")
            out[group] = np.concatenate([index[m] for m in members])
        return cls(torch.cat(images), torch.cat(depth), out)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def restrict(self, groups: Sequence[str]) -> HeldOut:
        """Only the frames of ``groups`` (and only those groups), so a model is run on what is scored."""
        unknown = [g for g in groups if g not in self.groups]
        if unknown or not groups:
            raise ValueError(f"held-out groups {unknown or groups} unknown; known: {sorted(self.groups)}")
        keep = np.unique(np.concatenate([self.groups[g] for g in groups]))
        if keep.size == len(self):
            return HeldOut(self.images, self.depth, {g: self.groups[g] for g in groups})
        index = torch.from_numpy(keep)
        return HeldOut(self.images[index], self.depth[index],
                       {g: np.searchsorted(keep, self.groups[g]) for g in groups})


def score_predictions(
    pred: torch.Tensor, held: HeldOut, task: TaskConfig, only: Sequence[str] | None = None,
    variance_focus: float = 0.85,
) -> dict[str, float]:
    """``<group>/<metric>`` (loss, absrel, delta1, rmse) of predictions for every frame of ``held``.

    Metrics pool the pixels of a group (:class:`forest_perception.models.metrics.MetricAccumulator`); the loss is
    the task's loss (:class:`forest_perception.models.losses.DepthLoss`, silog + smoothness; ``variance_focus`` 0.85
    as in ``collab.flower.task``, 0 makes silog the fully scale-sensitive log RMSE x 10) averaged over frames.
    """
    from forest_perception.models.losses import DepthLoss
    from forest_perception.models.metrics import MetricAccumulator

    if pred.shape != held.depth.shape:
        raise ValueError(f"predictions of shape {tuple(pred.shape)} for held-out depth {tuple(held.depth.shape)}")
    loss_fn = DepthLoss(silog=1.0, smooth=0.001, min_depth=task.min_depth, max_depth=task.max_depth,
                        variance_focus=variance_focus)
    with torch.no_grad():
        losses = np.array([float(loss_fn(pred[i : i + 1], held.depth[i : i + 1], held.images[i : i + 1])[0])
                           for i in range(len(held))])
    out = {}
    for group in only if only is not None else list(held.groups):
        idx = held.groups[group]
        accumulator = MetricAccumulator(task.min_depth, task.max_depth)
        accumulator.update(pred[idx], held.depth[idx])
        metrics = accumulator.result()
        out[f"{group}/loss"] = float(np.mean(losses[idx]))
        out.update({f"{group}/{k}": float(metrics[k]) for k in METRIC_KEYS[1:]})
    return out


def nan_scores(held: HeldOut, only: Sequence[str] | None = None) -> dict[str, float]:
    """NaN for every metric of every group (a diverged model)."""
    return {f"{g}/{k}": math.nan for g in (only if only is not None else held.groups) for k in METRIC_KEYS}


class ModelScorer:
    """Scores named model arrays on held-out frames with one reusable network (``collab.flower.task`` model)."""

    def __init__(self, task: TaskConfig) -> None:
        self.task = task
        self.model = build_model(task)

    @torch.no_grad()
    def predict(self, names: Sequence[str], arrays: Sequence[np.ndarray], images: torch.Tensor) -> torch.Tensor | None:
        """Depth for ``images`` with the given weights; None when the weights are not finite (a diverged run)."""
        try:
            set_arrays(self.model, names, arrays)
        except ValueError:
            return None
        self.model.eval()
        return torch.cat([self.model(images[i : i + 64]) for i in range(0, images.shape[0], 64)])

    def score(
        self, names: Sequence[str], arrays: Sequence[np.ndarray], held: HeldOut, only: Sequence[str] | None = None
    ) -> dict[str, float]:
        """:func:`score_predictions` of the model (NaN everywhere for a model with NaN/Inf weights)."""
        if only is not None:
            held = held.restrict(only)
        pred = self.predict(names, arrays, held.images)
        if pred is None or not bool(torch.isfinite(pred).all()):
            return nan_scores(held, only)
        return score_predictions(pred, held, self.task, only)


# ---------------------------------------------------------------------------------------------- federated runs


def experiment_config(**overrides: Any) -> dict:  # noqa: ANN401 - run config values are bool/int/float/str
    """The merged run config: defaults, :data:`EXPERIMENT_RUN_CONFIG`, then ``overrides`` (kebab-case keys)."""
    return merge_run_config(EXPERIMENT_RUN_CONFIG, overrides)


def build_coordinator_from(
    config: Mapping, names: Sequence[str], initial: Sequence[np.ndarray], model: str | None = None
) -> Coordinator:
    """The real coordinator of ``config`` (strategy, store, population availability) from given initial arrays.

    :func:`forest_perception.collab.flower.server_app.build_coordinator` starts from the task's freshly initialised
    network; this starts from ``initial`` (a pretrained network, or another model's tensors,
    then named ``model`` in the store's identity).
    """
    from forest_perception.collab.flower.population import load_population
    from forest_perception.collab.flower.server_app import ServerSettings, run_identity
    from forest_perception.collab.flower.store import CoordinatorStore
    from forest_perception.collab.flower.strategies import build_strategy

    settings = ServerSettings.from_run_config(config)
    availability = load_population(settings.population).is_available if settings.population else None
    strategy = build_strategy(settings.algorithm, list(names), [np.asarray(a) for a in initial], settings.strategy,
                              settings.train_config, availability)
    identity = run_identity(settings, list(names), [tuple(np.shape(a)) for a in initial])
    if model:
        identity["model"] = model
    return Coordinator(strategy, CoordinatorStore(Path(settings.state_db), identity=identity), settings)


def pretrain_network(task: TaskConfig, seed: int, forests: int, frames: int, epochs: int) -> torch.nn.Module:
    """The task's network trained centrally on ``forests`` forests no rover has (camera at 0.2 m, every weather).

    Stands in for the depth model a swarm already runs when federated learning starts (the
    model cards' network), for the experiments that start from a trained network.
    """
    from forest_perception.collab.flower.task import LocalData, train_local

    weathers = ("sunny", "overcast", "dusk", "fog", "rain")
    images, depth = unseen_frames(seed + 7_919, forests, frames, task.input_hw, weathers)
    net = build_model(task)
    data = LocalData("pretraining forests", images, depth, images, depth, val_is_train=True)
    train_local(net, data, dataclasses.replace(task, local_epochs=epochs), seed=seed)
    return net


def round_costs(record: RoundRecord) -> dict[str, float]:
    """Who took part in a round and what it cost per rover (KiB of tensors down and up, training seconds).

    Counts are of the global ("mixed") chain's entries, one per selected rover (MC-PSGD's
    separate chain is trained by the same rovers in the same messages).
    """
    mixed = [e for e in record.entries if e.chain == "mixed"]
    replied = [e for e in mixed if e.status in ("accepted", "rejected")]
    accepted = [e for e in mixed if e.status == "accepted"]
    train_s = [e.metrics["train-s"] for e in accepted if math.isfinite(e.metrics.get("train-s", math.nan))]
    return {
        "available": float(record.num_available),
        "selected": float(len(mixed)),
        "accepted": float(len(accepted)),
        "rejected": float(sum(e.status == "rejected" for e in mixed)),
        "failed": float(sum(e.status in ("failed", "missing") for e in mixed)),
        "kib_down_per_rover": record.bytes_down / len(mixed) / 1024 if mixed else math.nan,
        "kib_up_per_rover": record.bytes_up / len(replied) / 1024 if replied else math.nan,
        "rover_train_s": statistics.fmean(train_s) if train_s else math.nan,
        "train_loss": float(record.train_metrics.get("train-loss", math.nan)),
    }


RoundHook = Callable[[RoverStrategy, int], Mapping[str, float]]
"""``hook(strategy, server_round)`` after each round: extra metrics for that round's row (held-out scores)."""


def run_federated(
    config: Mapping,
    client_app: ClientApp,
    num_nodes: int,
    on_round: RoundHook | None = None,
    coordinator: Coordinator | None = None,
    score_initial: bool = True,
) -> list[dict[str, float]]:
    """Run every round of the run config through the real coordinator and ``client_app`` on a :class:`LocalGrid`.

    ``coordinator`` defaults to :func:`build_coordinator(config) <collab.flower.server_app.build_coordinator>`
    (model from ``forest_perception.collab.flower.task``). One row per round: ``round``, ``wall_s`` (the coordinator's
    round, rovers training one after the other), :func:`round_costs`, and whatever ``on_round`` adds.
    With ``score_initial`` a first row ``round = 0`` holds ``on_round(strategy, 0)`` for the initial model.
    """
    coordinator = coordinator or build_coordinator(config)
    grid = LocalGrid(client_app, num_nodes, run_config=dict(config))
    rows = []
    try:
        last = coordinator.start()
        if score_initial and on_round is not None and last == 0:
            rows.append({"round": 0.0, **on_round(coordinator.strategy, 0)})
        for server_round in range(last + 1, coordinator.settings.num_rounds + 1):
            start = time.perf_counter()
            record = coordinator.run_round(grid, server_round)
            row: dict[str, float] = {"round": float(server_round), "wall_s": time.perf_counter() - start}
            row.update(round_costs(record))
            if on_round is not None:
                row.update(on_round(coordinator.strategy, server_round))
            rows.append(row)
    finally:
        coordinator.store.close()
    return rows


# ---------------------------------------------------------------------------------------------- summaries


def mean_std(values: Iterable[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min, max and count of the finite values; ``nonfinite``."""
    values = [float(v) for v in values]
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "n": 0,
                "nonfinite": len(values)}
    return {
        "mean": statistics.fmean(finite),
        "std": statistics.stdev(finite) if len(finite) > 1 else 0.0,
        "min": min(finite),
        "max": max(finite),
        "n": len(finite),
        "nonfinite": len(values) - len(finite),
    }


def fmt(stat: Mapping[str, float], digits: int = 3) -> str:
    """``mean ± std`` (and ``(k diverged)`` when some runs gave NaN)."""
    if not stat or stat.get("n", 0) == 0:
        return "diverged" if stat and stat.get("nonfinite") else "-"
    text = f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
    if stat.get("nonfinite"):
        text += f" ({stat['nonfinite']} diverged)"
    return text


def curve(rows: Sequence[Mapping[str, float]], key: str) -> np.ndarray:
    """One run's values of ``key`` per round (NaN where missing)."""
    return np.array([float(r.get(key, math.nan)) for r in rows], dtype=np.float64)


def curve_stats(runs: Sequence[Sequence[Mapping[str, float]]], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rounds, mean and standard deviation of ``key`` over runs of equal length (NaN-aware)."""
    if not runs:
        raise ValueError(f"curve_stats({key!r}): no runs")
    stack = np.stack([curve(rows, key) for rows in runs])
    rounds = curve(runs[0], "round")
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rounds (every seed diverged) stay NaN
        mean = np.nanmean(stack, axis=0)
        std = np.nanstd(stack, axis=0, ddof=1) if len(runs) > 1 else np.zeros_like(mean)
    return rounds, mean, std


def rounds_to_target(rows: Sequence[Mapping[str, float]], key: str, target: float) -> int | None:
    """The first round whose ``key`` is at or below ``target``; None if never."""
    for row in rows:
        value = float(row.get(key, math.nan))
        if math.isfinite(value) and value <= target:
            return int(row["round"])
    return None


def cost_summary(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Per-round costs of one run: mean wall s per round (round 1 apart: identity queries), KiB per rover."""

    def mean_of(key: str, part: Sequence[Mapping[str, float]]) -> float:
        values = [r[key] for r in part if math.isfinite(r.get(key, math.nan))]
        return statistics.fmean(values) if values else math.nan

    rows = [r for r in rows if r.get("round", 1) >= 1]  # round 0: the initial model's scores, no cost
    steady = rows[1:] or rows
    return {
        "round1_s": float(rows[0]["wall_s"]) if rows else math.nan,
        "wall_s_per_round": mean_of("wall_s", steady),
        "rovers_per_round": mean_of("selected", rows),
        "kib_down_per_rover": mean_of("kib_down_per_rover", rows),
        "kib_up_per_rover": mean_of("kib_up_per_rover", rows),
        "rover_train_s": mean_of("rover_train_s", rows),
    }


# ---------------------------------------------------------------------------------------------- output


def _jsonable(value: Any) -> Any:  # noqa: ANN401 - any JSON-like tree
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (np.floating, np.integer)):
        return _jsonable(value.item())
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: str | Path, data: Any) -> Path:  # noqa: ANN401 - any JSON-like tree
    """Write ``data`` as JSON (NaN/Inf as null, numpy and dataclasses converted)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(data), indent=1) + "\n")
    return path


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write rows as CSV; the columns are every key, in first-seen order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in columns})
    return path


def _csv_value(value: Any) -> Any:  # noqa: ANN401
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else ""
    return "" if value is None else value


def long_rows(experiment: str, runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One CSV row per (run, round): the run's labels (``algorithm``, ``seed``, ...) then the round's values."""
    out = []
    for run in runs:
        labels = {k: v for k, v in run.items() if k != "rounds"}
        for row in run["rounds"]:
            out.append({"experiment": experiment, **labels, **row})
    return out


def plot_panels(path: str | Path, panels: Sequence[Mapping[str, Any]], title: str = "", ncols: int = 3) -> Path:
    """Line plots, one panel each: ``{"title", "ylabel", "curves": {label: (x, mean, std)}, "xlabel"?, "hline"?}``.

    Panels fill rows of ``ncols``. The band is mean ± one standard deviation over seeds.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ncols = max(1, min(ncols, len(panels)))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, panel in zip(axes.flat, panels):
        for label, (x, mean, std) in panel["curves"].items():
            (line,) = ax.plot(x, mean, label=label, linewidth=1.6)
            if np.any(std > 0):
                ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.18, linewidth=0)
        if panel.get("hline") is not None:
            ax.axhline(panel["hline"], color="grey", linestyle=":", linewidth=1)
        ax.set_title(panel["title"], fontsize=10)
        ax.set_xlabel(panel.get("xlabel", "round"))
        ax.set_ylabel(panel["ylabel"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table (first column left-aligned, the others right-aligned)."""
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- command line


def experiment_arguments(description: str) -> argparse.ArgumentParser:
    """The options every experiment script takes: ``--quick``, ``--seeds``, ``--out``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="the few-minute configuration (one seed, fewer rounds)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the configuration's seeds")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help=f"output folder (default {RESULTS_DIR})")
    return parser


def pick_config(config_class: type, quick: bool, seeds: Sequence[int] | None = None) -> Any:  # noqa: ANN401
    """``config_class.quick()`` or ``config_class()``, with ``seeds`` replaced when given."""
    config = config_class.quick() if quick else config_class()
    if seeds:
        config = dataclasses.replace(config, seeds=tuple(int(s) for s in seeds))
    return config
