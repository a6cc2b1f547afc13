"""What a rover does in a federated round: the depth model as named arrays, its local data, training, evaluation.

Shared by the ServerApp (initial model, tensor names) and the ClientApp (the rest), as in Flower's
quickstart ``task.py``. Run configuration, what travels and the training scopes: ``docs/federated.md``
("Run configuration", "Messages", "The strategies").
"""

from __future__ import annotations

import math
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from forest_perception.collab.rover.holdout import DEFAULT_HOLDOUT_FRACTION
from forest_perception.collab.updates import NDArrays

SCOPES: dict[str, tuple[str, ...]] = {"all": ("",), "decoder": ("decoder.", "fine.", "head.")}
"""Which tensors (name prefixes) a rover of each scope trains: ``decoder`` freezes the auto-encoder's encoder or
the multi-scale net's coarse net and trains the rest."""

DEFAULT_RUN_CONFIG: dict[str, bool | int | float | str] = {
    # the run
    "num-server-rounds": 3,
    "algorithm": "fedavg",
    "state-db": "coordinator.db",
    "store-updates": False,
    "seed": 0,
    # selection and screening
    "fraction-train": 1.0,
    "min-train-nodes": 1,
    "fraction-evaluate": 1.0,
    "min-evaluate-nodes": 0,
    "evaluate-every": 1,
    "round-timeout": 600.0,
    "max-norm": 100.0,
    "max-staleness": 0,
    "server-lr": 1.0,
    # algorithm specific
    "clip-norm": 0.0,
    "trim-fraction": 0.0,
    "fedlaavg-weighting": "uniform",
    "fedlaavg-population": 0,
    "fedlaavg-warmup": 0,
    "num-blocks": 2,
    "rounds-per-block": 1,
    "influence": False,
    "quarantine": "",
    "node-registry": "",
    # the network: init (a shipped name or a checkpoint) and/or the architecture keys ("" / 0: unset)
    "init": "",
    "model": "",
    "model-kwargs": "",
    "base-channels": 0,
    "input-height": 0,
    "input-width": 0,
    # local training
    "batch-size": 4,
    "local-epochs": 1,
    "local-steps": 0,
    "lr": 0.001,
    "optimizer": "adamw",
    "proximal-mu": 0.0,
    "lr-decay": 1.0,
    "lr-decay-every": 1,
    "batchnorm": "auto",
    "min-depth": 0.1,
    "max-depth": 10.0,
    "torch-threads": 1,
    # the rover's data and its one hold-out split (collab_node's gate uses the same)
    "holdout-fraction": 0.2,
    "holdout-seed": 0,
    "max-train-frames": 2000,
    "max-holdout-frames": 200,
    # where rovers find their data (node config data-dir wins; see client_app)
    "population": "",
    "rover-data": "",
    "data-root": "",
    # the coordinator's own test folder, evaluated every round
    "cloud-test": "",
    # dc-ccl: the frozen mimic the rovers train their small submodel on, and the small submodel's start
    "dcccl-mimic": "",
    "dcccl-small": "",
    "dcccl-small-channels": 8,
    # coda: the cloud's index of its pool, where each rover's cloud samples come from, how many, the outside draw
    "coda-index": "",
    "coda-arm": "coda",
    "coda-candidates": 20,
    "coda-outside": 256,
    "coda-gate": 0.0,
    # iciia: the history module trained once on the cloud (forest-fl iciia train); the rovers only score it
    "iciia-module": "",
}
"""Run configuration defaults; ``pyproject.toml``'s ``[tool.flwr.app.config]`` holds the same keys."""


def merge_run_config(*layers: Mapping | None) -> dict:
    """``DEFAULT_RUN_CONFIG`` overridden by each layer in turn; unknown keys or mistyped values are refused."""
    merged = dict(DEFAULT_RUN_CONFIG)
    for layer in layers:
        for key, value in (layer or {}).items():
            if key not in DEFAULT_RUN_CONFIG:
                raise ValueError(f"unknown run config key {key!r}; known: {', '.join(sorted(DEFAULT_RUN_CONFIG))}")
            default = DEFAULT_RUN_CONFIG[key]
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ValueError(f"run config {key} must be true or false, got {value!r}")
            elif isinstance(default, float):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"run config {key} must be a number, got {value!r}")
                value = float(value)
            elif isinstance(default, int):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"run config {key} must be an integer, got {value!r}")
            elif not isinstance(value, str):
                raise ValueError(f"run config {key} must be a string, got {value!r}")
            merged[key] = value
    return merged


@dataclass
class TaskConfig:
    """Model and local-training settings of a rover.

    ``base_channels`` sizes the auto-encoder (ignored by the multi-scale net); ``model_kwargs`` holds the
    network's other constructor keywords (a ``base_channels`` there moves into the field).
    """

    model: str = "autoencoder"
    base_channels: int = 4
    input_hw: tuple[int, int] = (64, 80)
    batch_size: int = 4
    local_epochs: int = 1
    local_steps: int = 0  # optimiser steps per round at most (0: whole epochs)
    lr: float = 1e-3
    optimizer: str = "adamw"  # local optimiser: adamw, or sgd (plain SGD, as FedLaAvg's analysis assumes)
    proximal_mu: float = 0.0  # FedProx: mu / 2 * |w - w_round_start|^2 added to the local loss (0: plain FedAvg)
    min_depth: float = 0.1
    max_depth: float = 10.0
    seed: int = 0
    threads: int = 1
    model_kwargs: dict = field(default_factory=dict)
    holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION
    holdout_seed: int = 0
    max_train_frames: int = 2000
    max_holdout_frames: int = 200
    freeze_batchnorm: bool = False  # fine-tuning: BatchNorm keeps its running statistics during local training
    dcccl_mimic: str = ""  # dc-ccl: the mimic part file; the model is then mimic (frozen) + small submodel
    dcccl_small_channels: int = 8

    @classmethod
    def from_run_config(cls, config: Mapping) -> TaskConfig:
        """From a (merged) run config with Flower's kebab-case keys.

        Unset architecture keys come from ``init`` (read only then) or the quick default network
        (:func:`forest_perception.collab.flower.network.architecture_from_run_config`).
        """
        from forest_perception.collab.flower.network import (
            ARCHITECTURE_KEYS,
            Architecture,
            architecture_from_run_config,
            complete_kwargs,
            parse_model_kwargs,
        )

        c = merge_run_config(config)
        if all(c[k] not in ("", 0) for k in ARCHITECTURE_KEYS if k != "base-channels"):
            # every key given (what the coordinator sends): no checkpoint to read
            kwargs = parse_model_kwargs(c["model-kwargs"])
            if c["base-channels"]:
                kwargs["base_channels"] = c["base-channels"]
            arch = Architecture(c["model"], complete_kwargs(c["model"], kwargs, "run config model-kwargs"),
                                (c["input-height"], c["input-width"]))
        else:
            arch, _ = architecture_from_run_config(c)
        return cls(
            model=arch.model,
            model_kwargs=dict(arch.kwargs),
            input_hw=arch.input_hw,
            batch_size=c["batch-size"],
            local_epochs=c["local-epochs"],
            local_steps=c["local-steps"],
            lr=c["lr"],
            optimizer=c["optimizer"],
            proximal_mu=c["proximal-mu"],
            min_depth=c["min-depth"],
            max_depth=c["max-depth"],
            seed=c["seed"],
            threads=c["torch-threads"],
            holdout_fraction=c["holdout-fraction"],
            holdout_seed=c["holdout-seed"],
            max_train_frames=c["max-train-frames"],
            max_holdout_frames=c["max-holdout-frames"],
            freeze_batchnorm=batchnorm_frozen(c),
            dcccl_mimic=c["dcccl-mimic"],
            dcccl_small_channels=c["dcccl-small-channels"],
        ).validate()

    def network_kwargs(self) -> dict:
        """The network's constructor keywords (``base_channels`` included for the auto-encoder)."""
        kwargs = {k: v for k, v in self.model_kwargs.items() if k != "base_channels"}
        if self.model == "autoencoder":
            kwargs["base_channels"] = self.base_channels
        return kwargs

    def run_config(self) -> dict[str, bool | int | float | str]:
        """The architecture and depth range as run-config keys (what the coordinator sends every rover)."""
        from forest_perception.collab.flower.network import kwargs_text

        return {
            "model": self.model,
            "model-kwargs": kwargs_text(self.network_kwargs()),
            "base-channels": int(self.base_channels) if self.model == "autoencoder" else 0,
            "input-height": int(self.input_hw[0]),
            "input-width": int(self.input_hw[1]),
            "min-depth": float(self.min_depth),
            "max-depth": float(self.max_depth),
            "dcccl-small-channels": int(self.dcccl_small_channels),
        }

    def validate(self) -> TaskConfig:
        """Raise ``ValueError`` naming the first bad field."""
        from forest_perception.models.data import check_input_hw

        self.input_hw = check_input_hw(self.input_hw)
        self.model_kwargs = dict(self.model_kwargs or {})
        if "base_channels" in self.model_kwargs:
            self.base_channels = self.model_kwargs.pop("base_channels")
        for name in ("base_channels", "batch_size", "local_epochs", "max_train_frames", "max_holdout_frames",
                     "dcccl_small_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("local_steps", "seed", "threads", "holdout_seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        if not (math.isfinite(self.proximal_mu) and self.proximal_mu >= 0):
            raise ValueError(f"proximal_mu must be a non-negative finite number, got {self.proximal_mu!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if not (0 < self.min_depth < self.max_depth and math.isfinite(self.max_depth)):
            raise ValueError(f"need 0 < min_depth < max_depth, got {self.min_depth} and {self.max_depth}")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be within [0, 1), got {self.holdout_fraction!r}")
        return self


OPTIMIZERS = ("adamw", "sgd")
"""Run config ``optimizer``: local AdamW (the default), or plain SGD (FedLaAvg's analysis; its server step equals
the local learning rate)."""

BATCHNORM_MODES = ("auto", "frozen", "train")
"""Run config ``batchnorm``: ``frozen`` keeps BatchNorm in eval mode (running statistics fixed, affine weights still
trained) during local training, ``train`` updates the statistics, ``auto`` freezes them when ``init`` is given."""


def batchnorm_frozen(config: Mapping) -> bool:
    """Whether local training keeps BatchNorm statistics fixed under a merged run config; ValueError on a bad mode."""
    mode = config.get("batchnorm", "auto")
    if mode not in BATCHNORM_MODES:
        raise ValueError(f"run config batchnorm must be one of {', '.join(BATCHNORM_MODES)}, got {mode!r}")
    return mode == "frozen" or (mode == "auto" and bool(str(config.get("init", "")).strip()))


# ---------------------------------------------------------------------------------------------- model


def build_model(config: TaskConfig) -> nn.Module:
    """:func:`forest_perception.models.networks.build_model` of ``config``, initialised from ``config.seed``.

    The same seed gives the same initial weights everywhere (the coordinator's round 0 and every rover).
    With ``config.dcccl_mimic`` (dc-ccl) the model is the rover's mimic, frozen, plus a fresh small submodel
    (:func:`forest_perception.collab.dcccl.rover_training_model`): its tensors, what travels, are the small one's.
    """
    from forest_perception.models.networks import build_model as build_network

    if config.dcccl_mimic:
        from forest_perception.collab.dcccl import rover_training_model

        return rover_training_model(config.dcccl_mimic, config.dcccl_small_channels, config.input_hw,
                                    config.min_depth, config.max_depth, config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return build_network(config.model, config.input_hw, **config.network_kwargs())


def tensor_names(model: nn.Module) -> list[str]:
    """Names of the floating-point ``state_dict`` entries, in ``state_dict`` order (what travels)."""
    return [k for k, v in model.state_dict().items() if v.is_floating_point()]


def get_arrays(model: nn.Module) -> tuple[list[str], NDArrays]:
    """Tensor names and numpy copies of the travelling tensors."""
    state = model.state_dict()
    names = tensor_names(model)
    return names, [state[n].detach().cpu().numpy().copy() for n in names]


def set_arrays(model: nn.Module, names: Sequence[str], arrays: Sequence[np.ndarray]) -> None:
    """Load named arrays into the model; ``ValueError`` naming a missing, unknown or mis-shaped tensor."""
    expected = tensor_names(model)
    if list(names) != expected:
        missing = [n for n in expected if n not in set(names)]
        extra = [n for n in names if n not in set(expected)]
        raise ValueError(
            f"model tensors differ from the ones received: {len(names)} received, {len(expected)} expected"
            + (f"; missing {missing[:3]}" if missing else "") + (f"; unexpected {extra[:3]}" if extra else "")
            + ("" if missing or extra else "; same names in another order")
        )
    state = model.state_dict()
    new_state = {}
    for name, value in zip(names, arrays):
        value = np.asarray(value)
        if tuple(value.shape) != tuple(state[name].shape):
            raise ValueError(f"tensor {name!r}: received shape {value.shape}, the model has {tuple(state[name].shape)}")
        if not np.all(np.isfinite(value)):
            raise ValueError(f"tensor {name!r}: received NaN/Inf values")
        new_state[name] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)).to(state[name].dtype)
    model.load_state_dict(new_state, strict=False)


def initial_arrays(config: TaskConfig) -> tuple[list[str], NDArrays]:
    """Names and arrays of the freshly initialised model (the coordinator's round 0)."""
    return get_arrays(build_model(config))


def round_seed(seed: int, server_round: int, who: str) -> int:
    """The shuffle seed of ``who``'s local training in ``server_round`` of a run seeded ``seed``.

    A round replayed after a coordinator restart trains the same way.
    """
    return (seed * 1_000_003 + server_round * 7919 + zlib.crc32(who.encode())) % (2**63)


def scope_tensors(names: Sequence[str], scope: str) -> list[bool]:
    """Per tensor, whether a rover of ``scope`` trains it."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; choose one of {list(SCOPES)}")
    prefixes = SCOPES[scope]
    return [any(n.startswith(p) for p in prefixes) for n in names]


def _apply_scope(model: nn.Module, scope: str, freeze_batchnorm: bool = False) -> None:
    """Freeze (no grad, BatchNorm statistics fixed) every top-level part outside ``scope``.

    With ``freeze_batchnorm`` every BatchNorm layer stays in eval mode (statistics fixed; its affine
    weights are still trained inside ``scope``): fine-tuning a shipped network on a few frames.
    """
    prefixes = SCOPES[scope]
    model.train()
    if freeze_batchnorm:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    for child_name, child in model.named_children():
        trained = any(f"{child_name}.".startswith(p) or p == "" for p in prefixes)
        if not trained:
            child.eval()
        for p in child.parameters():
            p.requires_grad_(trained)


# ---------------------------------------------------------------------------------------------- data


class NoDataError(ValueError):
    """A rover has no usable recordings (missing, empty or unreadable folder); the message names the folder."""


@dataclass
class LocalData:
    """A rover's frames as tensors: normalised images ``Nx3xHxW`` and depth ``Nx1xHxW`` (0 = invalid).

    ``train_*`` are the frames of its training segments, ``val_*`` those of its held-out segments
    (:func:`forest_perception.collab.rover.holdout.rover_split`); with a single segment nothing is held out
    and ``val_*`` are the training frames (``val_is_train``).
    """

    path: str
    train_images: torch.Tensor
    train_depth: torch.Tensor
    val_images: torch.Tensor
    val_depth: torch.Tensor
    segments: list[str] = field(default_factory=list)
    val_is_train: bool = False
    train_segments: list[str] = field(default_factory=list)
    holdout_segments: list[str] = field(default_factory=list)

    @property
    def num_train(self) -> int:
        """Training frames."""
        return int(self.train_images.shape[0])

    @property
    def num_val(self) -> int:
        """Validation (held-out) frames."""
        return int(self.val_images.shape[0])

    @property
    def nbytes(self) -> int:
        """Memory the tensors hold."""
        tensors = [self.train_images, self.train_depth]
        if not self.val_is_train:
            tensors += [self.val_images, self.val_depth]
        return sum(t.element_size() * t.nelement() for t in tensors)


_DATA_CACHE: OrderedDict[tuple, LocalData] = OrderedDict()
_DATA_CACHE_BYTES = 1 << 30
"""Decoded frames kept per process (a Ray actor plays many virtual rovers and reads each one's PNGs once)."""


def stack_frames(dataset: object, indices: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and depth maps of a ``ForestDepthDataset``'s items (all, or ``indices``) as two tensors."""
    items = [dataset[i] for i in (range(len(dataset)) if indices is None else indices)]
    return torch.stack([it["image"] for it in items]), torch.stack([it["depth"] for it in items])


def load_local_data(data_dir: str | Path, config: TaskConfig) -> LocalData:
    """The rover's frames under ``data_dir`` (forest layout), split by :func:`~.rover.holdout.rover_split`.

    Segments are found as collab_node finds them (:func:`forest_perception.collab.rover.dataset.scan_recordings`:
    unreadable segments are skipped) and split with ``config.holdout_fraction`` / ``holdout_seed``, so the
    frames this rover trains on are never among those its gate holds out. At most ``max_train_frames`` /
    ``max_holdout_frames`` frames, spread evenly. Cached per process. Nothing under ``data_dir`` is written.

    Raises :class:`NoDataError` naming the folder when it is missing, holds no readable frames, or a frame
    does not load.
    """
    from forest_perception.collab.rover.dataset import scan_recordings
    from forest_perception.collab.rover.holdout import rover_split
    from forest_perception.collab.rover.training import build_local_data

    path = Path(data_dir)
    if not path.is_dir():
        raise NoDataError(f"rover data folder {path} does not exist")
    scan = scan_recordings(path)
    frames = {state.segment_id: state.frames for state in scan.segments}
    train_ids, held_ids = rover_split(frames, config.holdout_fraction, config.holdout_seed)
    if not train_ids:
        skipped = f"; {len(scan.errors)} unreadable segment(s), first: {next(iter(scan.errors.values()))}" \
            if scan.errors else ""
        raise NoDataError(f"rover data folder {path} holds no frames in Run-<N>/<segment>/ folders{skipped}")
    key = (
        str(path.resolve()), config.input_hw, config.min_depth, config.max_depth, config.holdout_fraction,
        config.holdout_seed, config.max_train_frames, config.max_holdout_frames,
        tuple((s.segment_id, str(s.path), s.frames, s.stamp) for s in scan.segments),
    )
    cached = _DATA_CACHE.get(key)
    if cached is not None:
        _DATA_CACHE.move_to_end(key)
        return cached
    try:
        data = build_local_data([scan.segment(i) for i in train_ids], [scan.segment(i) for i in held_ids], config,
                                config.max_train_frames, config.max_holdout_frames, label=str(path))
    except (OSError, ValueError) as exc:
        raise NoDataError(f"rover data folder {path}: {exc}") from exc
    _DATA_CACHE[key] = data
    while len(_DATA_CACHE) > 1 and sum(d.nbytes for d in _DATA_CACHE.values()) > _DATA_CACHE_BYTES:
        _DATA_CACHE.popitem(last=False)
    return data


def load_test_frames(folder: str | Path, config: TaskConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and depth of a test folder (forest layout, every segment), at most ``max_holdout_frames`` spread evenly.

    The coordinator's ``cloud-test``; ``ValueError`` naming the folder when it has no readable frames.
    """
    from forest_perception.collab.rover.dataset import scan_recordings
    from forest_perception.collab.rover.holdout import spread_indices
    from forest_perception.models.data import ForestDepthDataset

    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"cloud test folder {path} does not exist")
    scan = scan_recordings(path)
    segments = [scan.segment(s.segment_id) for s in scan.segments if s.frames > 0]
    if not segments:
        raise ValueError(f"cloud test folder {path} holds no frames in Run-<N>/<segment>/ folders")
    try:
        dataset = ForestDepthDataset(segments, input_hw=config.input_hw, min_depth=config.min_depth,
                                     max_depth=config.max_depth)
        return stack_frames(dataset, spread_indices(len(dataset), config.max_holdout_frames))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cloud test folder {path}: {exc}") from exc


# ---------------------------------------------------------------------------------------------- train / evaluate


def depth_loss(config: TaskConfig, variance_focus: float = 0.85) -> nn.Module:
    """The task's loss: silog + smoothness in ``config``'s depth range (``variance_focus`` 0: scale-sensitive)."""
    from forest_perception.models.losses import DepthLoss

    return DepthLoss(silog=1.0, smooth=0.001, min_depth=config.min_depth, max_depth=config.max_depth,
                     variance_focus=variance_focus)


BatchLoss = Callable[[torch.Tensor], torch.Tensor]
"""``batch_loss(indices)``: the loss of the model on those training frames (one scalar tensor)."""


def run_local_epochs(batch_loss: BatchLoss, optimizer: torch.optim.Optimizer, num_frames: int, config: TaskConfig,
                     seed: int, where: str) -> dict[str, float]:
    """``config.local_epochs`` epochs of shuffled mini-batches (at most ``config.local_steps`` steps).

    ``seed`` fixes the shuffle order and the network's own randomness (dropout; the global generator is restored
    afterwards); a non-finite loss raises ``FloatingPointError`` naming ``where``.
    Returns ``train-loss`` (frame-weighted mean), ``steps``, ``train-s``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _run_local_epochs(batch_loss, optimizer, num_frames, config, seed, where)


def _run_local_epochs(batch_loss: BatchLoss, optimizer: torch.optim.Optimizer, num_frames: int, config: TaskConfig,
                      seed: int, where: str) -> dict[str, float]:
    if config.threads:
        torch.set_num_threads(config.threads)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    steps, loss_sum, seen = 0, 0.0, 0
    for _ in range(config.local_epochs):
        order = torch.randperm(num_frames, generator=generator)
        for first in range(0, num_frames, config.batch_size):
            if config.local_steps and steps >= config.local_steps:
                break
            idx = order[first : first + config.batch_size]
            loss = batch_loss(idx)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"local training loss became {loss.item()} at step {steps} on {where}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            loss_sum += float(loss.detach()) * len(idx)
            seen += len(idx)
    return {"train-loss": loss_sum / max(seen, 1), "steps": float(steps), "train-s": time.perf_counter() - start}


def train_local(
    model: nn.Module, data: LocalData, config: TaskConfig, scope: str = "all", seed: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, float]:
    """Local epochs of AdamW (or SGD) on the rover's training frames; returns ``train-loss``, ``steps``, ``train-s``.

    BatchNorm statistics stay fixed when ``config.freeze_batchnorm`` (run config ``batchnorm``).

    ``seed`` fixes the shuffle order (the client passes :func:`round_seed`), so a round replayed after a
    coordinator restart trains the same way. ``optimizer``: step this one over ``model``'s parameters, its state
    kept from earlier calls and its learning rate set to ``config.lr``, instead of a fresh one.
    ``config.proximal_mu`` > 0 adds FedProx's proximal term, ``mu / 2 * |w - w0|^2`` over the trained parameters,
    ``w0`` being their values at the call (the round's global model).
    """
    _apply_scope(model, scope, config.freeze_batchnorm)
    if optimizer is not None:
        for group in optimizer.param_groups:
            group["lr"] = config.lr
    else:
        optimizer = local_optimizer(model, config)
    loss_fn = depth_loss(config)
    proximal = proximal_term(model, config.proximal_mu)

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        image = data.train_images[idx]
        loss = loss_fn(model(image), data.train_depth[idx], image)[0]
        return loss if proximal is None else loss + proximal()

    metrics = run_local_epochs(batch_loss, optimizer, data.num_train, config, seed, data.path)
    model.eval()
    return metrics


def local_optimizer(model: nn.Module, config: TaskConfig) -> torch.optim.Optimizer:
    """A fresh local optimiser over ``model``'s trainable parameters: ``config.optimizer`` at ``config.lr``."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(trainable, lr=config.lr)
    return torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)


def proximal_term(model: nn.Module, mu: float) -> Callable[[], torch.Tensor] | None:
    """FedProx's ``mu / 2 * sum |w - w0|^2`` over ``model``'s trainable parameters, ``w0`` their values now.

    Returns a function computing the term for the parameters as they are when called, or ``None`` for ``mu`` 0.
    """
    if mu <= 0:
        return None
    pairs = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]

    def term() -> torch.Tensor:
        return 0.5 * mu * sum(((p - p0) ** 2).sum() for p, p0 in pairs)

    return term


class ControlledStep:
    """An optimiser whose every step first adds ``correction`` to the gradients (SCAFFOLD's ``c - c_i``).

    It keeps the mean of the raw (uncorrected) gradients of its steps: the rover's control variate for the next
    round (:meth:`mean_gradient`). Stands in for the optimiser in :func:`train_local` (``param_groups``,
    ``zero_grad``, ``step``); ``correction`` (one tensor per parameter, or None: no correction) is not trained.
    """

    def __init__(self, inner: torch.optim.Optimizer, params: Sequence[nn.Parameter],
                 correction: Sequence[torch.Tensor | None] | None) -> None:
        if correction is not None and len(correction) != len(params):
            raise ValueError(f"{len(correction)} correction tensors for {len(params)} parameters")
        self.inner, self.params, self.correction = inner, list(params), correction
        self.grad_sum = [torch.zeros_like(p) for p in self.params]
        self.steps = 0

    @property
    def param_groups(self) -> list[dict]:
        """The wrapped optimiser's parameter groups (its learning rate is set there)."""
        return self.inner.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients."""
        self.inner.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        """Keep the raw gradients, correct them, step the wrapped optimiser."""
        with torch.no_grad():
            for i, p in enumerate(self.params):
                if p.grad is None:
                    continue
                self.grad_sum[i] += p.grad
                if self.correction is not None and self.correction[i] is not None:
                    p.grad += self.correction[i]
        self.steps += 1
        self.inner.step()

    def mean_gradient(self) -> list[torch.Tensor]:
        """The mean raw gradient over the steps so far."""
        return [g / max(self.steps, 1) for g in self.grad_sum]


def controlled_optimizer(model: nn.Module, config: TaskConfig, scope: str,
                         correction: Mapping[str, np.ndarray] | None) -> tuple[ControlledStep, list[str]]:
    """SCAFFOLD's local optimiser over the tensors ``scope`` trains, corrected by ``correction`` (by tensor name).

    Returns the optimiser and the names of the parameters it steps (the keys of the rover's control). A correction
    for a tensor that is not trained here, or of another shape, raises ``ValueError`` naming it.
    """
    _apply_scope(model, scope, config.freeze_batchnorm)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    tensors = None
    if correction is not None:
        shapes = {n: tuple(p.shape) for n, p in named}
        for name, value in correction.items():
            if name not in shapes:
                raise ValueError(f"SCAFFOLD correction for tensor {name!r}, which this rover does not train")
            if tuple(np.shape(value)) != shapes[name]:
                raise ValueError(f"SCAFFOLD correction of {name!r} has shape {tuple(np.shape(value))}, the tensor "
                                 f"{shapes[name]}")
        tensors = [None if n not in correction else torch.as_tensor(np.asarray(correction[n]), dtype=p.dtype)
                   for n, p in named]
    step = ControlledStep(local_optimizer(model, config), [p for _, p in named], tensors)
    return step, [n for n, _ in named]


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, depth: torch.Tensor, config: TaskConfig) -> dict[str, float]:
    """Loss and depth metrics (``absrel``, ``delta1``, ...) of the model on the given frames."""
    from forest_perception.models.metrics import MetricAccumulator

    if config.threads:
        torch.set_num_threads(config.threads)
    model.eval()
    loss_fn = depth_loss(config)
    accumulator = MetricAccumulator(config.min_depth, config.max_depth)
    loss_sum, count = 0.0, 0
    for first in range(0, images.shape[0], config.batch_size):
        image, target = images[first : first + config.batch_size], depth[first : first + config.batch_size]
        pred = model(image)
        loss, _ = loss_fn(pred, target, image)
        accumulator.update(pred, target)
        loss_sum += float(loss) * image.shape[0]
        count += image.shape[0]
    metrics = accumulator.result()
    return {"loss": loss_sum / max(count, 1), "absrel": metrics["absrel"], "delta1": metrics["delta1"],
            "rmse": metrics["rmse"], "num-examples": float(count)}


@dataclass
class LocalUpdate:
    """What a rover sends back for one chain: deltas (compact where ``rows`` names rows) and metrics."""

    deltas: NDArrays
    rows: dict[str, np.ndarray]
    metrics: dict[str, float]
    control: dict[str, np.ndarray] | None = None  # SCAFFOLD: the mean raw gradient of the round, by tensor name


def compute_delta(
    names: Sequence[str], global_arrays: Sequence[np.ndarray], model: nn.Module, scope: str = "all"
) -> tuple[NDArrays, dict[str, np.ndarray]]:
    """``local - global`` per tensor in the global dtypes; tensors outside ``scope`` go compact with no rows."""
    _, local = get_arrays(model)
    trained = scope_tensors(names, scope)
    deltas: NDArrays = []
    rows: dict[str, np.ndarray] = {}
    for name, base, value, used in zip(names, global_arrays, local, trained):
        base = np.asarray(base)
        if used or base.ndim == 0:
            deltas.append((value.astype(np.float64) - base.astype(np.float64)).astype(base.dtype))
        else:
            deltas.append(np.zeros((0,) + base.shape[1:], dtype=base.dtype))
            rows[name] = np.zeros(0, dtype=np.int64)
    return deltas, rows


def local_delta_function(
    names: Sequence[str], data: LocalData, config: TaskConfig, scope: str = "all", seed: int = 0
) -> Callable[[Sequence[np.ndarray]], NDArrays]:
    """``start -> delta``: the rover's local training from other starting weights, same frames and seed (float64).

    What Fed-Influence's directional changes re-run (:func:`forest_perception.collab.influence.directional_change`).
    """

    def run(start: Sequence[np.ndarray]) -> NDArrays:
        model = build_model(config)
        _, reference = get_arrays(model)  # the network's own dtypes
        start = [np.asarray(a, dtype=r.dtype) for a, r in zip(start, reference)]
        set_arrays(model, names, start)
        train_local(model, data, config, scope, seed)
        _, local = get_arrays(model)
        return [lv.astype(np.float64) - s.astype(np.float64) for lv, s in zip(local, start)]

    return run


def local_round(
    names: Sequence[str],
    global_arrays: Sequence[np.ndarray],
    data: LocalData,
    config: TaskConfig,
    scope: str = "all",
    seed: int = 0,
    scaffold: bool = False,
    correction: Mapping[str, np.ndarray] | None = None,
) -> LocalUpdate:
    """Train from the global model, evaluate the result on the validation frames, return the delta.

    With ``scaffold`` every gradient is first corrected by ``correction`` (``c - c_i`` by tensor name, none in the
    rover's first round) and the update carries the rover's new control (:class:`ControlledStep`).
    """
    model = build_model(config)
    set_arrays(model, names, global_arrays)
    optimizer, trained = (controlled_optimizer(model, config, scope, correction) if scaffold else (None, []))
    train_metrics = train_local(model, data, config, scope, seed, optimizer=optimizer)
    val = evaluate(model, data.val_images, data.val_depth, config)
    deltas, rows = compute_delta(names, global_arrays, model, scope)
    metrics = {
        "num-examples": float(data.num_train),
        "train-loss": train_metrics["train-loss"],
        "val-loss": val["loss"],
        "absrel": val["absrel"],
        "delta1": val["delta1"],
        "train-s": train_metrics["train-s"],
        "steps": train_metrics["steps"],
        "lr": float(config.lr),
        "val-is-train": float(data.val_is_train),
    }
    control = None
    if optimizer is not None:
        control = {n: g.detach().cpu().numpy().astype(np.float32) for n, g in zip(trained, optimizer.mean_gradient())}
    return LocalUpdate(deltas, rows, metrics, control)
