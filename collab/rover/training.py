"""Local training on the rover: one federated-style local round from the deployed model on its own frames."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from forest_perception.collab.rover.holdout import spread_indices
from forest_perception.collab.rover.models import GlobalModel, task_meta
from forest_perception.dataset_tools.layout import Segment

if TYPE_CHECKING:  # torch is imported only by the functions that need it
    from forest_perception.collab.flower.task import LocalData, TaskConfig


@dataclass
class LocalTraining:
    """A local round's result: the trained model (base + delta) and its metrics on the held-out frames."""

    model: GlobalModel
    metrics: dict[str, float]


def build_local_data(
    train_segments: Sequence[Segment],
    holdout_segments: Sequence[Segment],
    config: TaskConfig,
    max_train_frames: int = 2000,
    max_holdout_frames: int = 200,
    label: str = "rover",
) -> LocalData:
    """Tensors for :func:`collab.flower.task.local_round`: train on ``train_segments``, validate on the held out.

    Frames are spread evenly when a side has more than its limit (memory on a small board).
    """
    from forest_perception.collab.flower.task import LocalData, stack_frames
    from forest_perception.models.data import ForestDepthDataset

    train = [s for s in train_segments if len(s) > 0]
    held = [s for s in holdout_segments if len(s) > 0]
    if not train:
        raise ValueError(f"{label}: no training frames (every segment with frames is held out or none recorded)")
    common = {"input_hw": config.input_hw, "min_depth": config.min_depth, "max_depth": config.max_depth}
    train_set = ForestDepthDataset(train, **common)
    train_images, train_depth = stack_frames(train_set, spread_indices(len(train_set), max_train_frames))
    if held:
        val_set = ForestDepthDataset(held, **common)
        val_images, val_depth = stack_frames(val_set, spread_indices(len(val_set), max_holdout_frames))
        val_is_train = False
    else:
        val_images, val_depth, val_is_train = train_images, train_depth, True
    return LocalData(label, train_images, train_depth, val_images, val_depth,
                     [s.segment_id for s in train + held], val_is_train,
                     train_segments=[s.segment_id for s in train], holdout_segments=[s.segment_id for s in held])


def train_locally(
    base: GlobalModel, data: LocalData, config: TaskConfig, seed: int = 0, label: str = "local"
) -> LocalTraining:
    """One :func:`collab.flower.task.local_round` from ``base`` on the rover's frames; the trained model back."""
    from forest_perception.collab.flower.task import local_round

    task = base.task_config(config)
    update = local_round(base.names, base.arrays, data, task, scope="all", seed=seed)
    trained = [
        (np.asarray(a, np.float64) + np.asarray(d, np.float64)).astype(np.asarray(a).dtype)
        for a, d in zip(base.arrays, update.deltas)
    ]
    meta = {**base.meta, **task_meta(task), "command": f"{label}: local round from {base.source or 'initial model'}",
            "base-round": base.round}
    return LocalTraining(GlobalModel(base.round, list(base.names), trained, meta, label), dict(update.metrics))


def initial_model(config: TaskConfig) -> GlobalModel:
    """The network as the coordinator initialises it (round 0 of a run with the same seed)."""
    from forest_perception.collab.flower.task import initial_arrays

    names, arrays = initial_arrays(config)
    return GlobalModel(0, names, arrays, {**task_meta(config), "command": "initial model"}, "initial")
