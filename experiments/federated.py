"""Federated runs of the experiments: the real coordinator round by round on an in-process LocalGrid.

Every run is the coordinator of :func:`~forest_perception.collab.flower.server_app.build_coordinator`
(strategy, screening, SQLite store) talking to ClientApps through
:class:`~forest_perception.collab.flower.local_grid.LocalGrid`: the messages of a Ray or deployed run at a
fraction of the cost. Rovers train one after the other, so a round's wall time is the coordinator plus
the sum of the rovers' training (see ``docs/experiments.md``, "Method").
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.clientapp import ClientApp

from experiments.heldout import WEATHERS, unseen_frames
from forest_perception.collab.flower.local_grid import LocalGrid
from forest_perception.collab.flower.population import Population
from forest_perception.collab.flower.rover_data import ensure_rover_data
from forest_perception.collab.flower.rover_strategy import RoverStrategy
from forest_perception.collab.flower.server_app import Coordinator, build_coordinator
from forest_perception.collab.flower.store import RoundRecord
from forest_perception.collab.flower.task import TaskConfig, build_model, merge_run_config

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


def local_threads() -> int:
    """Torch threads for an experiment's in-process training of the shipped networks: ``EXPERIMENT_THREADS`` (set by
    ``run_all`` when jobs run side by side), else 2 (both cores, like the Ray simulation's two actors)."""
    value = os.environ.get("EXPERIMENT_THREADS", "").strip()
    if not value:
        return 2
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"EXPERIMENT_THREADS must be a whole number >= 1, got {value!r}")
    return int(value)


def quiet_logs() -> None:
    """Keep the coordinator's per-round INFO lines and Flower's chatter out of the experiment output."""
    for name in ("forest_perception.collab", "flwr"):
        logging.getLogger(name).setLevel(logging.ERROR)


def experiment_config(config: Any, seed: int, state_db: str | Path, **overrides: Any) -> dict:  # noqa: ANN401
    """The merged run config of one run of an experiment's ``config`` (rounds, training, input size, fraction).

    Defaults, :data:`EXPERIMENT_RUN_CONFIG`, the experiment's settings, then ``overrides`` (kebab-case keys).
    """
    settings = {
        "num-server-rounds": config.rounds, "seed": seed, "fraction-train": getattr(config, "fraction_train", 1.0),
        "local-epochs": config.local_epochs, "lr": config.lr, "base-channels": config.base_channels,
        "input-height": config.hw[0], "input-width": config.hw[1], "state-db": str(state_db),
    }
    return merge_run_config(EXPERIMENT_RUN_CONFIG, settings, overrides)


def write_population_data(population: Population, out_dir: Path, hw: tuple[int, int]) -> Path:
    """Each rover's training data (forest dataset layout, reused when present) and the population JSON."""
    height, width = hw
    for rover in population.rovers:
        ensure_rover_data(rover, width, height, "procedural")
    return population.save(Path(out_dir) / "population.json")


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

    images, depth = unseen_frames(seed + 7_919, forests, frames, task.input_hw, WEATHERS)
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
