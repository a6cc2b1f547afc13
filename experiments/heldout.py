"""Held-out frames of the experiments and how a model is scored on them.

Held-out frames are rendered by the procedural ray caster that made the rovers' data, from the rover's
forest and weather but from poses of another random stream, so no held-out frame is a training frame;
:func:`unseen_frames` renders forests no rover has seen.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from forest_perception.collab.flower.population import VirtualRover
from forest_perception.collab.flower.rover_data import ProceduralForest, render_procedural_frame
from forest_perception.collab.flower.task import TaskConfig, build_model, depth_loss, set_arrays
from forest_perception.inference import DEFAULT_MEAN, DEFAULT_STD

HELD_OUT_STREAM = 101
"""Random stream of held-out poses (the rovers' own frames use stream 1)."""
WEATHERS = ("sunny", "overcast", "dusk", "fog", "rain")
"""Every weather preset, for forests no rover has."""


def frames_to_tensors(
    rgb: Sequence[np.ndarray], depth: Sequence[np.ndarray], min_depth: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rendered frames as network inputs and targets, exactly as :class:`models.data.ForestDepthDataset` makes them."""
    if len(rgb) == 0 or len(rgb) != len(depth):
        raise ValueError(f"need as many RGB as depth frames, at least one; got {len(rgb)} and {len(depth)}")
    images = np.stack(rgb).astype(np.float32) / 255.0
    images = (images - np.asarray(DEFAULT_MEAN, np.float32)) / np.asarray(DEFAULT_STD, np.float32)
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
    from forest_perception.models.metrics import MetricAccumulator

    if pred.shape != held.depth.shape:
        raise ValueError(f"predictions of shape {tuple(pred.shape)} for held-out depth {tuple(held.depth.shape)}")
    loss_fn = depth_loss(task, variance_focus)
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
