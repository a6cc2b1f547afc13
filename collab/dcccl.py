"""Device-cloud collaborative depth learning (DC-CCL), the pure core: submodels, distillation, local training.

The base depth model is split vertically into a large cloud submodel and a small rover submodel whose outputs add
up in log depth (:mod:`forest_perception.models.networks.collaborative`). The cloud distils a light *mimic* of its
large submodel on cloud data; mimic and small submodel go to the rovers, where the mimic stays frozen and the small
submodel trains on ``loss(mimic(x) + small(x), depth)``. Small submodels are averaged across rovers; the cloud then
serves large + small, the rovers mimic + small. Every part carries a version, and a part that belongs to another
version is refused by name. Nothing here imports Flower or ROS; the strategy and ClientApp sit on top.
Set-up and figures: ``docs/collaborative.md``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the PyTorch convention
from torch import nn

from forest_perception.inference import weights_sha256
from forest_perception.models.networks.collaborative import (
    FusedDepth,
    LogDepthEnsemble,
    LogDepthMember,
    ResidualDepthNet,
    ResidualOnFrozen,
    fuse_log_depth,
)

LOG = logging.getLogger(__name__)

BUNDLE_FORMAT = "forest_perception.dcccl"
BUNDLE_FORMAT_VERSION = 1
PART_KINDS = ("mimic", "small")


class VersionMismatchError(ValueError):
    """A DC-CCL part belongs to another large model or mimic than the one it is combined with."""


@dataclass(frozen=True)
class DcCclSpec:
    """What the parts are: the large submodel's networks, the rover's input size, the mimic and small networks.

    ``large`` names shipped networks or checkpoint files (their mean log depth is the large submodel, each
    flip-averaged when ``large_flip``); ``mimic_init`` is the network the mimic starts from before distillation
    (a shipped name or checkpoint; it fixes the mimic's architecture and input size, which is the rover's).
    """

    large: tuple[str, ...] = ("multiscale_320x240",)
    large_flip: bool = True
    mimic_init: str = "autoencoder_160x128"
    small_channels: int = 8
    min_depth: float = 0.1
    max_depth: float = 10.0

    def validate(self) -> DcCclSpec:
        """Raise ``ValueError`` naming the first bad field."""
        if not self.large or not all(isinstance(name, str) and name for name in self.large):
            raise ValueError(f"large must name at least one network, got {self.large!r}")
        if not self.mimic_init:
            raise ValueError("mimic_init must name a network (a shipped name or a checkpoint file)")
        if not isinstance(self.small_channels, int) or self.small_channels < 1:
            raise ValueError(f"small_channels must be a positive integer, got {self.small_channels!r}")
        if not 0.0 < self.min_depth < self.max_depth:
            raise ValueError(f"need 0 < min_depth < max_depth, got {self.min_depth} and {self.max_depth}")
        return self


def _load_network(source: str) -> tuple[nn.Module, dict[str, Any]]:
    from forest_perception.models.checkpoints import resolve_checkpoint
    from forest_perception.models.torch_engine import load_torch_checkpoint

    return load_torch_checkpoint(resolve_checkpoint(source))


def module_version(kind: str, module: nn.Module) -> str:
    """``<kind>-<first 12 hex of the weights' sha256>``: changes whenever any weight changes."""
    return f"{kind}-{weights_sha256(module.state_dict())[:12]}"


# ---------------------------------------------------------------------------------------------- parts


@dataclass
class LargeSubmodel:
    """The cloud's large submodel (log depth at ``input_hw``), its version and what it was built from."""

    module: nn.Module
    input_hw: tuple[int, int]
    version: str
    sources: list[dict[str, Any]] = field(default_factory=list)


def build_large(spec: DcCclSpec) -> LargeSubmodel:
    """The large submodel of ``spec``: the named networks, flip-averaged, mean log depth, frozen (eval mode)."""
    spec.validate()
    members, sources = [], []
    for name in spec.large:
        net, meta = _load_network(name)
        hw = tuple(int(v) for v in meta["input_hw"])
        members.append(LogDepthMember(net, hw, log_output=False, flip=spec.large_flip))
        sources.append({"source": name, "model_name": meta.get("model_name"), "input_hw": list(hw),
                        "weights_sha256": meta.get("weights_sha256")})
    module = members[0] if len(members) == 1 else LogDepthEnsemble(members)
    module.eval().requires_grad_(False)
    hw = tuple(module.input_hw)
    return LargeSubmodel(module, (int(hw[0]), int(hw[1])), module_version("large", module), sources)


@dataclass
class Part:
    """A mimic or small submodel with its version and the versions it belongs to (what a bundle file holds)."""

    kind: str
    module: LogDepthMember
    network: str
    network_kwargs: dict[str, Any]
    large_version: str
    mimic_version: str = ""  # small submodels: the mimic they were trained with
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def input_hw(self) -> tuple[int, int]:
        """The rover input size the part runs at."""
        return self.module.input_hw

    @property
    def version(self) -> str:
        """``<kind>-<sha12>`` of its weights."""
        return module_version(self.kind, self.module)


def build_mimic(spec: DcCclSpec, large: LargeSubmodel) -> Part:
    """The mimic before distillation: ``spec.mimic_init``'s network (its weights and input size)."""
    net, meta = _load_network(spec.mimic_init)
    hw = tuple(int(v) for v in meta["input_hw"])
    kwargs = dict(meta.get("model_kwargs") or {})
    member = LogDepthMember(net, hw, log_output=False)
    return Part("mimic", member, str(meta["model_name"]), kwargs, large.version,
                info={"init": spec.mimic_init, "init_weights_sha256": meta.get("weights_sha256")})


def build_small(spec: DcCclSpec, mimic: Part, seed: int = 0) -> Part:
    """A fresh small submodel at the mimic's input size (zero output: the fused model starts as the mimic)."""
    return small_part_of(mimic, spec.small_channels, seed)


def rover_model(mimic: Part, small: Part, spec: DcCclSpec) -> FusedDepth:
    """mimic + small as one network at the rover's input size (what ``depth_node`` runs)."""
    check_pair(mimic, small)
    return FusedDepth([mimic.module, small.module], mimic.input_hw, spec.min_depth, spec.max_depth).eval()


def cloud_model(large: LargeSubmodel, small: Part, spec: DcCclSpec) -> FusedDepth:
    """large + small as one network at the large submodel's input size (the base station's offline model).

    The small submodel sees the image resized to the rover's input size inside the graph and its log depth is
    resized back, so it works as it did on the rovers.
    """
    if small.large_version != large.version:
        raise VersionMismatchError(f"small submodel {small.version} belongs to large model {small.large_version}, "
                                   f"not the running {large.version}")
    return FusedDepth([large.module, small.module], large.input_hw, spec.min_depth, spec.max_depth).eval()


def large_model(large: LargeSubmodel, spec: DcCclSpec) -> FusedDepth:
    """The large submodel alone as a depth network (the cloud model without rover data)."""
    return FusedDepth([large.module], large.input_hw, spec.min_depth, spec.max_depth).eval()


def check_pair(mimic: Part, small: Part, large_version: str | None = None) -> None:
    """``VersionMismatchError`` unless ``small`` was trained with ``mimic`` and both belong to ``large_version``."""
    if mimic.kind != "mimic" or small.kind != "small":
        raise VersionMismatchError(f"expected a mimic and a small submodel, got {mimic.kind} and {small.kind}")
    if large_version is not None and mimic.large_version != large_version:
        raise VersionMismatchError(f"mimic {mimic.version} was distilled from large model {mimic.large_version}, "
                                   f"not the running {large_version}")
    if small.mimic_version != mimic.version:
        raise VersionMismatchError(f"small submodel {small.version} was trained with mimic {small.mimic_version}, "
                                   f"not {mimic.version}")
    if small.large_version != mimic.large_version:
        raise VersionMismatchError(f"small submodel {small.version} belongs to large model {small.large_version}, "
                                   f"the mimic {mimic.version} to {mimic.large_version}")


# ---------------------------------------------------------------------------------------------- bundles


def save_part(part: Part, path: str | os.PathLike, spec: DcCclSpec | None = None) -> Path:
    """Write a mimic or small submodel (weights, how to rebuild it, versions) atomically; returns the path."""
    from forest_perception.models.checkpoints import save_checkpoint

    bundle = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        "kind": part.kind,
        "version": part.version,
        "network": part.network,
        "network_kwargs": dict(part.network_kwargs),
        "input_hw": list(part.input_hw),
        "large_version": part.large_version,
        "mimic_version": part.mimic_version,
        "info": dict(part.info),
        "spec": asdict(spec) if spec is not None else None,
        "state": part.module.net.state_dict(),
    }
    return save_checkpoint(bundle, path)


def load_part(path: str | os.PathLike, kind: str | None = None) -> Part:
    """Read a part written by :func:`save_part`; ``ValueError`` naming the file and what is wrong with it.

    The stored version must match the weights (a file edited after writing is refused), and ``kind`` (when
    given) the part's kind.
    """
    from forest_perception.models.networks import build_model

    path = Path(path)
    try:
        bundle = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is refused with its reason
        raise ValueError(f"DC-CCL part {path}: not readable ({type(exc).__name__}: {str(exc)[:200]})") from exc
    if not isinstance(bundle, dict) or bundle.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"DC-CCL part {path}: not a {BUNDLE_FORMAT} file")
    if bundle.get("format_version") != BUNDLE_FORMAT_VERSION:
        raise ValueError(f"DC-CCL part {path}: format version {bundle.get('format_version')!r}, this reader knows "
                         f"{BUNDLE_FORMAT_VERSION}")
    if bundle.get("kind") not in PART_KINDS or (kind is not None and bundle["kind"] != kind):
        raise ValueError(f"DC-CCL part {path} is a {bundle.get('kind')!r}, expected {kind or ' or '.join(PART_KINDS)}")
    hw = tuple(int(v) for v in bundle["input_hw"])
    if bundle["kind"] == "small":
        net = ResidualDepthNet(int(bundle["network_kwargs"].get("base_channels", 8)))
        member = LogDepthMember(net, hw, log_output=True)
    else:
        net = build_model(bundle["network"], hw, **bundle["network_kwargs"])
        member = LogDepthMember(net, hw, log_output=False)
    try:
        member.net.load_state_dict(bundle["state"])
    except RuntimeError as exc:
        raise ValueError(f"DC-CCL part {path}: weights do not fit a {bundle['network']} "
                         f"{bundle['network_kwargs']}: {str(exc).splitlines()[0]}") from exc
    part = Part(bundle["kind"], member.eval(), bundle["network"], dict(bundle["network_kwargs"]),
                bundle["large_version"], bundle.get("mimic_version", ""), dict(bundle.get("info") or {}))
    if part.version != bundle["version"]:
        raise ValueError(f"DC-CCL part {path}: its weights are {part.version}, the file says {bundle['version']} "
                         "(changed after it was written)")
    return part


@lru_cache(maxsize=4)
def _load_part_cached(path: str, kind: str | None, stamp: tuple[int, int]) -> Part:
    return load_part(path, kind)


def read_part(path: str | os.PathLike, kind: str | None = None) -> Part:
    """:func:`load_part`, cached per process until the file changes (a Ray actor plays many rovers)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"DC-CCL {kind or 'part'} file {path} does not exist")
    stat = path.stat()
    return _load_part_cached(str(path), kind, (stat.st_mtime_ns, stat.st_size))


def small_part_of(mimic: Part, channels: int, seed: int = 0) -> Part:
    """A fresh small submodel (zero output) at ``mimic``'s input size, trained with ``mimic``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ResidualDepthNet(channels)
    return Part("small", LogDepthMember(net, mimic.input_hw, log_output=True), "residual",
                {"base_channels": int(channels)}, mimic.large_version, mimic.version)


def rover_training_model(mimic_path: str | os.PathLike, channels: int, input_hw: Sequence[int], min_depth: float,
                         max_depth: float, seed: int = 0) -> ResidualOnFrozen:
    """What a dc-ccl rover trains: its mimic (read from ``mimic_path``, frozen) + a fresh small submodel.

    Only the small submodel is state (what travels and trains); ``ValueError`` when the mimic does not run at
    ``input_hw`` (the run's network input).
    """
    mimic = read_part(mimic_path, "mimic")
    hw = (int(input_hw[0]), int(input_hw[1]))
    if mimic.input_hw != hw:
        raise ValueError(f"mimic {mimic.version} ({mimic_path}) runs at {mimic.input_hw[1]}x{mimic.input_hw[0]}, the "
                         f"run's network input is {hw[1]}x{hw[0]}")
    small = small_part_of(mimic, channels, seed)
    return ResidualOnFrozen(mimic.module, small.module, hw, min_depth, max_depth)


# ---------------------------------------------------------------------------------------------- distillation


@torch.no_grad()
def log_depth_outputs(module: nn.Module, images: torch.Tensor, out_hw: Sequence[int] | None = None,
                      batch_size: int = 16) -> torch.Tensor:
    """A frozen submodel's log depth on ``images`` (batched, no grad), area-resized to ``out_hw`` when given."""
    module.eval()
    outputs = []
    for first in range(0, images.shape[0], batch_size):
        y = module(images[first:first + batch_size])
        if out_hw is not None and tuple(y.shape[-2:]) != tuple(out_hw):
            y = F.interpolate(y, size=tuple(int(v) for v in out_hw), mode="area")
        outputs.append(y)
    return torch.cat(outputs) if outputs else torch.zeros(0, 1, *(out_hw or (1, 1)))


@dataclass
class DistilResult:
    """How distillation went: loss per epoch (mean squared log-depth error), and the time it took."""

    epoch_loss: list[float]
    start_loss: float
    seconds: float
    frames: int


def distil(student: Part, images: torch.Tensor, targets: torch.Tensor, epochs: int = 3, lr: float = 3e-4,
           batch_size: int = 8, seed: int = 0, log_range: tuple[float, float] | None = None,
           progress: Callable[[int, float], None] | None = None, freeze_batchnorm: bool = True) -> DistilResult:
    """Train ``student`` to output ``targets`` (the teacher's log depth) on ``images``: MSE in log depth, AdamW.

    ``images`` are at the student's input size; ``targets`` ``Nx1xhxw`` at its output size. ``log_range`` clamps the
    targets (the fused models' depth range). ``progress(epoch, loss)`` is called after every epoch. With
    ``freeze_batchnorm`` (the default) BatchNorm keeps the statistics the student was trained with: a few hundred cloud
    frames would otherwise replace them and cost more than distillation gains.
    """
    if images.shape[0] != targets.shape[0] or images.shape[0] == 0:
        raise ValueError(f"distillation needs as many targets as images (> 0), got {images.shape[0]} images and "
                         f"{targets.shape[0]} targets")
    if log_range is not None:
        targets = targets.clamp(*log_range)
    module = student.module
    start = time.perf_counter()
    start_loss = float(F.mse_loss(log_depth_outputs(module, images), targets))
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for epoch in range(epochs):
        module.train()
        if freeze_batchnorm:
            for layer in module.modules():
                if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                    layer.eval()
        order = torch.randperm(images.shape[0], generator=generator)
        total, seen = 0.0, 0
        for first in range(0, images.shape[0], batch_size):
            idx = order[first:first + batch_size]
            loss = F.mse_loss(module(images[idx]), targets[idx])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"distillation loss became {loss.item()} in epoch {epoch + 1}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        scheduler.step()
        losses.append(total / max(seen, 1))
        if progress is not None:
            progress(epoch + 1, losses[-1])
    module.eval()
    return DistilResult(losses, start_loss, time.perf_counter() - start, int(images.shape[0]))


def distil_mimic(mimic: Part, large: LargeSubmodel, large_images: torch.Tensor, rover_images: torch.Tensor,
                 spec: DcCclSpec, **kwargs: Any) -> DistilResult:  # noqa: ANN401 - passed on to distil
    """Distil the large submodel into ``mimic`` on cloud frames (the same frames at both input sizes).

    The teacher's log depth is computed once (frozen, no grad) and area-resized to the mimic's size; afterwards
    ``mimic`` belongs to ``large`` (its ``large_version``), and its own version has changed.
    """
    if large_images.shape[0] != rover_images.shape[0]:
        raise ValueError(f"{large_images.shape[0]} frames at the large model's size but {rover_images.shape[0]} at "
                         "the rover's: give the same frames at both sizes")
    targets = log_depth_outputs(large.module, large_images, mimic.input_hw)
    log_range = (math.log(spec.min_depth), math.log(spec.max_depth))
    result = distil(mimic, rover_images, targets, log_range=log_range, **kwargs)
    mimic.large_version = large.version
    mimic.info.update({"distilled_from": large.version, "distil_frames": result.frames,
                       "distil_epochs": len(result.epoch_loss), "distil_loss": result.epoch_loss[-1:] or None})
    return result


# ---------------------------------------------------------------------------------------------- rover side


def train_small(small: Part, mimic_log: torch.Tensor, images: torch.Tensor, depth: torch.Tensor,
                loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, Any]], lr: float,
                run_epochs: Callable[..., dict[str, float]], spec: DcCclSpec) -> dict[str, float]:
    """Train the small submodel on ``loss(mimic(x) + small(x), depth)`` with the mimic's log depth cached.

    The mimic is frozen, so its output on the rover's frames is computed once (``mimic_log``, from
    :func:`log_depth_outputs`) and only the small submodel runs forward and backward, with AdamW at ``lr``.
    ``run_epochs(batch_loss, optimizer, num_frames)`` runs the epochs (the Flower task's loop); returns its metrics.
    """
    if not (images.shape[0] == depth.shape[0] == mimic_log.shape[0]):
        raise ValueError(f"{images.shape[0]} images, {depth.shape[0]} depth maps and {mimic_log.shape[0]} mimic "
                         "outputs: they must be the same frames")
    module = small.module
    module.train()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        pred = fuse_log_depth(mimic_log[idx], module(images[idx]), spec.min_depth, spec.max_depth)
        return loss_fn(pred, depth[idx], images[idx])[0]

    metrics = run_epochs(batch_loss, optimizer, int(images.shape[0]))
    module.eval()
    return metrics


@torch.no_grad()
def fused_predictions(small: Part, mimic_log: torch.Tensor, images: torch.Tensor, spec: DcCclSpec,
                      batch_size: int = 16) -> torch.Tensor:
    """Depth of mimic + small on ``images`` from the cached mimic log depth."""
    small.module.eval()
    out = [fuse_log_depth(mimic_log[i:i + batch_size], small.module(images[i:i + batch_size]), spec.min_depth,
                          spec.max_depth) for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------- bytes


def state_bytes(module: nn.Module) -> int:
    """Bytes of a module's floating-point state (what travels when it is sent as float32 arrays)."""
    return int(sum(4 * v.numel() for v in module.state_dict().values() if v.is_floating_point()))


def round_bytes(large: LargeSubmodel, mimic: Part, small: Part, rovers: int, mimic_sent: bool) -> dict[str, float]:
    """Bytes per round: down (small, plus the mimic when it changed) and up (small delta), per rover and in all.

    ``whole_large_down`` is what shipping the large submodel to every rover would cost instead.
    """
    small_b, mimic_b, large_b = state_bytes(small.module), state_bytes(mimic.module), state_bytes(large.module)
    down = small_b + (mimic_b if mimic_sent else 0)
    return {"down_per_rover": float(down), "up_per_rover": float(small_b), "total": float(rovers * (down + small_b)),
            "mimic_bytes": float(mimic_b), "small_bytes": float(small_b), "large_bytes": float(large_b),
            "whole_large_down": float(rovers * large_b)}


def flops_table(large: LargeSubmodel, mimic: Part, small: Part, spec: DcCclSpec,
                rover_reference: str = "autoencoder_160x128") -> dict[str, float]:
    """FLOPs of one image (``count_flops``) of every part, and the large submodel's ratio to the rover network."""
    from forest_perception.models.networks import count_flops

    reference, meta = _load_network(rover_reference)
    ref = count_flops(reference, tuple(meta["input_hw"]))
    table = {
        "large": float(count_flops(large_model(large, spec), large.input_hw)),
        "mimic": float(count_flops(mimic.module, mimic.input_hw)),
        "small": float(count_flops(small.module, small.input_hw)),
        "rover_reference": float(ref),
    }
    table["rover_model"] = table["mimic"] + table["small"]
    table["large_over_rover_reference"] = table["large"] / ref
    return table
