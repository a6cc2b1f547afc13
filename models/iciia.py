"""ICIIA on the cloud: train the history module on sequences with the base network frozen, save it, export the rover
graph that ``depth_node`` runs (``image, bank, bank_mask -> depth, feature``).

The module (:mod:`forest_perception.models.networks.iciia`) is trained once, on frame sequences (one forest segment
each) so that its bank is a real history: for every target frame the bank holds features of other frames of the same
sequence (a random number of them, the rest masked, so the module learns partial and empty banks too). Only the
module trains; the base network's weights and BatchNorm statistics are those shipped. Details: docs/collaborative.md
("ICIIA").
"""

from __future__ import annotations

import io
import json
import math
import os
import shlex
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from forest_perception.inference import DEFAULT_MEAN, DEFAULT_STD, weights_sha256
from forest_perception.models.networks import model_version
from forest_perception.models.networks.iciia import HistoryDepth, RoverHistoryGraph, iciia_flops
from forest_perception.models.outputs import temporary_sibling

PART_FORMAT = "forest_perception.iciia/1"
#: ONNX input / output names of the rover graph (``forest_perception.inference.HistoryDepthEngine`` reads them).
ROVER_INPUTS = ("image", "bank", "bank_mask")
ROVER_OUTPUTS = ("depth", "feature")


class IciiaFileError(ValueError):
    """An ICIIA module file is missing, of another format, or made for another base network."""


@dataclass(frozen=True)
class IciiaSpec:
    """What the module is: its base network (a shipped name or a .pt checkpoint), width split and bank size."""

    base: str = "autoencoder_160x128"
    partitions: int = 4
    heads: int = 4
    bank_capacity: int = 16  # K: bank slots of the rover graph (depth_node's history_size is at most this)

    def validate(self) -> IciiaSpec:
        """``ValueError`` naming the first bad field."""
        if not isinstance(self.bank_capacity, int) or not 1 <= self.bank_capacity <= 1024:
            raise ValueError(f"bank_capacity must be an integer in [1, 1024], got {self.bank_capacity!r}")
        for name in ("partitions", "heads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        return self


@dataclass(frozen=True)
class TrainSettings:
    """How the module is trained on the cloud."""

    epochs: int = 4
    batch_size: int = 8
    lr: float = 1e-3
    seed: int = 0
    threads: int = 1
    variance_focus: float = 0.85  # of the silog loss, as the federated task's (0: scale-sensitive)
    use_history: bool = True  # False: every bank empty (a control: the module without history)
    sequence_jitter: float = 0.0  # per sequence and epoch, one photometric shift of all its frames (0: none)


def base_checkpoint(base: str) -> Path:
    """The ``.pt`` checkpoint of a base network: a file as given, or a shipped model name's checkpoint."""
    path = Path(base)
    if path.suffix.lower() in (".pt", ".pth"):
        if not path.is_file():
            raise IciiaFileError(f"base checkpoint {base!r} does not exist")
        return path
    from forest_perception.models.weights import shipped_model

    try:
        onnx = shipped_model(str(base))
    except FileNotFoundError as exc:
        raise IciiaFileError(f"base {base!r} is neither a .pt checkpoint nor a shipped model: {exc}") from None
    checkpoint = onnx.with_name(onnx.name.replace("_int8", "")).with_suffix(".pt")
    if not checkpoint.is_file():
        raise IciiaFileError(f"shipped model {base!r} has no PyTorch checkpoint {checkpoint.name} to wrap")
    return checkpoint


def load_base(base: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The base network (eval mode) and its checkpoint meta, with ``version`` (``<name>-<sha12 of weights>``)."""
    from forest_perception.models.torch_engine import load_torch_checkpoint

    network, meta = load_torch_checkpoint(base_checkpoint(base))
    meta = dict(meta)
    name = str(meta.get("model_name") or "base")
    meta["version"] = model_version(name, weights_sha256(network.state_dict()), network)
    return network.eval(), meta


def build(spec: IciiaSpec, seed: int | None = None) -> tuple[HistoryDepth, dict[str, Any]]:
    """A fresh (identity) ICIIA model on the spec's base network, frozen base; and the base's meta. ``seed`` fixes the
    module's initial weights (else torch's global generator draws them)."""
    spec.validate()
    network, meta = load_base(spec.base)
    if seed is not None:
        torch.manual_seed(seed)
    return HistoryDepth(network, spec.partitions, spec.heads).freeze_base(), meta


def module_version(model: HistoryDepth) -> str:
    """``iciia-<first 12 hex of the sha256 of the module's weights>``."""
    return f"iciia-{weights_sha256(model.iciia.state_dict())[:12]}"


# ---------------------------------------------------------------------------------------------- training


def sequence_features(model: HistoryDepth, sequences: Sequence[torch.Tensor], batch: int = 16) -> list[torch.Tensor]:
    """Each sequence's history features ``NxD`` (the frozen encoder's, computed once)."""
    out = []
    with torch.no_grad():
        for images in sequences:
            out.append(torch.cat([model.frame_feature(images[i:i + batch]) for i in range(0, len(images), batch)]))
    return out


def sample_banks(features: Sequence[torch.Tensor], pairs: Sequence[tuple[int, int]], capacity: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Banks ``BxKxD`` and masks ``BxK`` for ``(sequence, frame)`` targets: a random number (0..K) of other frames of
    the target's sequence, in random slots of the bank."""
    dim = features[0].shape[1]
    bank = torch.zeros(len(pairs), capacity, dim)
    mask = torch.zeros(len(pairs), capacity)
    for row, (s, i) in enumerate(pairs):
        others = [j for j in range(features[s].shape[0]) if j != i]
        count = int(torch.randint(0, min(capacity, len(others)) + 1, (1,), generator=generator))
        if count == 0:
            continue
        chosen = torch.randperm(len(others), generator=generator)[:count]
        slots = torch.randperm(capacity, generator=generator)[:count]
        bank[row, slots] = features[s][[others[int(c)] for c in chosen]]
        mask[row, slots] = 1.0
    return bank, mask


def jitter_sequences(sequences: Sequence[tuple[torch.Tensor, torch.Tensor]], strength: float,
                     generator: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each sequence's images with one photometric shift for all its frames: per channel ``x * a + b`` on the
    normalised image, ``a`` in ``1 +- strength``, ``b`` in ``+- strength`` (what a new forest's light and colours do;
    the history is what shows the shift)."""
    out = []
    for images, depth in sequences:
        gain = 1.0 + strength * (2.0 * torch.rand(1, 3, 1, 1, generator=generator) - 1.0)
        shift = strength * (2.0 * torch.rand(1, 3, 1, 1, generator=generator) - 1.0)
        out.append((images * gain + shift, depth))
    return out


def train(model: HistoryDepth, sequences: Sequence[tuple[torch.Tensor, torch.Tensor]], capacity: int,
          settings: TrainSettings, min_depth: float, max_depth: float,
          progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train the ICIIA module (the base stays frozen) on ``(images Nx3xHxW, depth Nx1xHxW)`` sequences; a summary.

    The loss is the federated task's (silog + smoothness in the depth range). ``FloatingPointError`` on a
    non-finite loss.
    """
    from forest_perception.models.losses import DepthLoss

    usable = [(images, depth) for images, depth in sequences if images.shape[0] >= 2]
    if not usable:
        raise ValueError("ICIIA trains on sequences of at least two frames (a history); none given")
    torch.set_num_threads(int(settings.threads))
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    model.freeze_base()
    original = usable
    loss_fn = DepthLoss(silog=1.0, smooth=0.001, min_depth=min_depth, max_depth=max_depth,
                        variance_focus=settings.variance_focus)
    optimizer = torch.optim.AdamW(model.iciia.parameters(), lr=settings.lr, weight_decay=0.0)
    pairs = [(s, i) for s, (images, _) in enumerate(usable) for i in range(images.shape[0])]
    started = time.perf_counter()
    losses: list[float] = []
    steps = 0
    for epoch in range(int(settings.epochs)):
        if settings.sequence_jitter > 0 or epoch == 0:
            usable = jitter_sequences(original, settings.sequence_jitter, generator) if settings.sequence_jitter > 0 \
                else original
            features = sequence_features(model, [images for images, _ in usable])
        model.train()
        order = torch.randperm(len(pairs), generator=generator)
        total, seen = 0.0, 0
        for first in range(0, len(pairs), settings.batch_size):
            chosen = [pairs[int(k)] for k in order[first:first + settings.batch_size]]
            images = torch.stack([usable[s][0][i] for s, i in chosen])
            depth = torch.stack([usable[s][1][i] for s, i in chosen])
            bank, mask = sample_banks(features, chosen, capacity, generator)
            if not settings.use_history:
                bank, mask = bank[:, :0], mask[:, :0]
            loss = loss_fn(model(images, bank, mask), depth, images)[0]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"ICIIA training loss became {loss.item()} at step {steps}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            total += float(loss.detach()) * len(chosen)
            seen += len(chosen)
        losses.append(total / max(seen, 1))
        if progress is not None:
            progress(f"epoch {epoch + 1}/{settings.epochs}: loss {losses[-1]:.4f}")
    model.eval()
    return {"loss_by_epoch": losses, "steps": steps, "frames": len(pairs), "sequences": len(usable),
            "train_s": time.perf_counter() - started}


@torch.no_grad()
def predict_sequence(model: HistoryDepth, images: torch.Tensor, history: bool = True, capacity: int = 16,
                     prime: torch.Tensor | None = None) -> torch.Tensor:
    """Depth of frames fed one at a time in order, as a rover runs them: the bank holds the features of the last
    ``capacity`` frames before each (none with ``history=False``); ``prime`` (``MxD``) is history already there."""
    model.eval()
    bank: list[torch.Tensor] = [] if prime is None else list(prime[-capacity:])
    outputs = []
    for index in range(images.shape[0]):
        frame = images[index:index + 1]
        if history and bank:
            stacked = torch.stack(bank)[None]
            depth, feature = model.forward_with_feature(frame, stacked, torch.ones(1, len(bank)))
        else:
            depth, feature = model.forward_with_feature(frame)
        outputs.append(depth)
        if history:
            bank = (bank + [feature[0]])[-capacity:]
    return torch.cat(outputs)


# ---------------------------------------------------------------------------------------------- files


def save_module(model: HistoryDepth, spec: IciiaSpec, base_meta: Mapping[str, Any], path: str | os.PathLike,
                summary: Mapping[str, Any] | None = None) -> Path:
    """Write the module (its weights only: the base is named by ``spec.base`` and its version), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"format": PART_FORMAT, "spec": asdict(spec), "base_version": str(base_meta["version"]),
              "version": module_version(model), "state": model.iciia.state_dict(),
              "summary": json.loads(json.dumps(dict(summary or {}), default=str))}
    staged = temporary_sibling(path)
    try:
        torch.save(record, staged)
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)
    return path


def load_module(path: str | os.PathLike) -> tuple[HistoryDepth, IciiaSpec, dict[str, Any]]:
    """``(model on its base, spec, record without the weights)``; :class:`IciiaFileError` naming the file if it is not
    an ICIIA module, its base network changed since, or its weights do not match its version."""
    path = Path(path)
    if not path.is_file():
        raise IciiaFileError(f"ICIIA module {str(path)!r} does not exist")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is refused with its reason
        raise IciiaFileError(f"ICIIA module {str(path)!r} is not readable: {str(exc)[:200]}") from None
    if not isinstance(record, dict) or record.get("format") != PART_FORMAT:
        raise IciiaFileError(f"{str(path)!r} is not an ICIIA module ({PART_FORMAT})")
    spec = IciiaSpec(**record["spec"])
    model, base_meta = build(spec)
    if base_meta["version"] != record["base_version"]:
        raise IciiaFileError(f"ICIIA module {str(path)!r} was trained on {record['base_version']}, but {spec.base} is "
                             f"now {base_meta['version']}: train it again")
    model.iciia.load_state_dict(record["state"])
    if module_version(model) != record["version"]:
        raise IciiaFileError(f"ICIIA module {str(path)!r} changed after it was written")
    return model.eval(), spec, {k: v for k, v in record.items() if k != "state"}


# ---------------------------------------------------------------------------------------------- export


def _export_graph(graph: RoverHistoryGraph, example: tuple[torch.Tensor, ...], out: Path, exporter: str) -> None:
    names = {"input_names": list(ROVER_INPUTS), "output_names": list(ROVER_OUTPUTS)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(graph, example, str(out), dynamo=False, opset_version=17, do_constant_folding=True,
                              **names)
            return
        if exporter != "dynamo":
            raise ValueError(f"exporter must be 'dynamo' or 'torchscript', got {exporter!r}")
        chatter = io.StringIO()
        import contextlib
        import logging

        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            program = torch.onnx.export(graph, example, dynamo=True, opset_version=17, optimize=True, verbose=False,
                                        **names)
        program.save(str(out))


def verify_rover_onnx(path: str | os.PathLike, model: HistoryDepth, input_hw: Sequence[int],
                      capacity: int) -> dict[str, float]:
    """Max abs differences of ONNX Runtime vs PyTorch (depth in m, feature) for a full, a half-filled and an empty
    bank on random inputs."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, int(input_hw[0]), int(input_hw[1]), generator=generator)
    bank = torch.randn(capacity, model.feature_dim, generator=generator).abs()
    report = {"max_abs_error_m": 0.0, "max_abs_error_feature": 0.0}
    for filled in (capacity, capacity // 2, 0):
        mask = torch.zeros(capacity)
        mask[:filled] = 1.0
        with torch.no_grad():
            depth, feature = RoverHistoryGraph(model).eval()(image, bank, mask)
        feeds = {"image": image.numpy(), "bank": bank.numpy(), "bank_mask": mask.numpy()}
        got = session.run(list(ROVER_OUTPUTS), feeds)
        report["max_abs_error_m"] = max(report["max_abs_error_m"], float(np.max(np.abs(got[0] - depth.numpy()))))
        report["max_abs_error_feature"] = max(report["max_abs_error_feature"],
                                              float(np.max(np.abs(got[1] - feature.numpy()))))
    return report


def export_rover_model(model: HistoryDepth, spec: IciiaSpec, base_meta: Mapping[str, Any], out_path: str | os.PathLike,
                       exporter: str = "dynamo", tolerance_m: float = 1e-3, command: str = "",
                       metrics: Mapping[str, Any] | None = None) -> Path:
    """Export the rover graph with its metadata (``history``: capacity, feature width, partitions, versions) and
    a model card, verified against PyTorch (``ExportVerificationError`` beyond ``tolerance_m``, nothing written)."""
    from forest_perception.models.cards import write_model_card
    from forest_perception.models.export import ExportVerificationError, set_metadata
    from forest_perception.models.provenance import git_commit

    spec.validate()
    hw = base_meta.get("input_hw") or model.input_hw
    if not hw:
        raise ValueError(f"the base network {spec.base} records no input_hw")
    height, width = int(hw[0]), int(hw[1])
    model = model.cpu().eval()
    graph = RoverHistoryGraph(model).eval()
    example = (torch.randn(1, 3, height, width), torch.randn(spec.bank_capacity, model.feature_dim),
               torch.ones(spec.bank_capacity))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    staged = temporary_sibling(out_path)
    try:
        _export_graph(graph, example, staged, exporter)
        report = verify_rover_onnx(staged, model, (height, width), spec.bank_capacity)
        if not math.isfinite(report["max_abs_error_m"]) or report["max_abs_error_m"] > tolerance_m:
            raise ExportVerificationError(f"ONNX export of the ICIIA rover model differs from PyTorch by "
                                          f"{report['max_abs_error_m']:.3g} m > tolerance {tolerance_m} m")
        sha = weights_sha256(model.state_dict())
        base_name = str(base_meta.get("model_name") or "base")
        name = f"iciia_{base_name}"
        flops = iciia_flops(model, (height, width), spec.bank_capacity)
        set_metadata(staged, {
            "model_name": name,
            "model_kwargs": dict(base_meta.get("model_kwargs") or {}),
            "input_hw": [height, width],
            "input_format": "image: RGB float32 1x3xHxW, (rgb/255 - mean)/std; bank: float32 KxD history features; "
                            "bank_mask: float32 K, 1 = a frame, 0 = an empty slot",
            "output_format": "depth: metric depth float32 1x1xHxW metres; feature: float32 1xD, this frame's history "
                             "feature (append it to the bank)",
            "mean": list(base_meta.get("mean") or DEFAULT_MEAN),
            "std": list(base_meta.get("std") or DEFAULT_STD),
            "min_depth": float(base_meta.get("min_depth") or model.base.head.min_depth),
            "max_depth": float(base_meta.get("max_depth") or model.base.head.max_depth),
            "weights_sha256": sha,
            "version": f"{name}-{sha[:12]}",
            "history": {"capacity": spec.bank_capacity, "feature_dim": model.feature_dim,
                        "partitions": spec.partitions, "heads": spec.heads, "base": spec.base,
                        "base_version": str(base_meta["version"]), "module_version": module_version(model),
                        "inputs": list(ROVER_INPUTS), "outputs": list(ROVER_OUTPUTS)},
            "flops": flops,
            "exporter": f"torch {torch.__version__} {exporter}",
            "export_command": command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "metrics": dict(metrics or {}),
            "git_commit": git_commit() or "unknown",
            "verify_max_abs_error_m": report["max_abs_error_m"],
        })
        os.replace(staged, out_path)
    finally:
        staged.unlink(missing_ok=True)
    write_model_card(out_path, {"flops": flops["total"], "params": sum(p.numel() for p in model.parameters()),
                                "metrics": dict(metrics or {}),
                                "notes": f"ICIIA (history attention, P={spec.partitions}, {spec.heads} heads, bank "
                                         f"of {spec.bank_capacity}) on {base_meta['version']}: "
                                         f"+{flops['iciia'] / 1e6:.2f} MFLOPs "
                                         f"({100 * flops['iciia'] / flops['base']:.2f} % of the base)."})
    return out_path


__all__ = [
    "PART_FORMAT",
    "ROVER_INPUTS",
    "ROVER_OUTPUTS",
    "IciiaFileError",
    "IciiaSpec",
    "TrainSettings",
    "base_checkpoint",
    "build",
    "export_rover_model",
    "load_base",
    "load_module",
    "module_version",
    "predict_sequence",
    "sample_banks",
    "save_module",
    "sequence_features",
    "train",
    "verify_rover_onnx",
]
