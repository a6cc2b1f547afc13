r"""Recover a shipped network's PyTorch checkpoint from its fp32 ONNX file (the training checkpoints were not kept).

    forest-dataset synth --out DATA --runs 1 --seed 100 --segments 5 --frames 8 --interval 1.0 \
        --weather sunny,overcast,dusk,fog,rain
    forest-dataset synth --out TEST --runs 1 --seed 4242 --segments 2 --frames 6 --interval 1.0 --weather overcast,sunny
    python -m forest_perception.models.recover --stats-data DATA --stats-frames 40 --check-data TEST

Every Conv and Gemm weight of the graph is put into its PyTorch parameter: by name where the exporter kept the
parameter names, else by the order in which the network runs its layers; shapes and conv attributes (stride,
padding, groups) are checked either way. The exporter folded each BatchNorm into the convolution before it; the
BatchNorm is unfolded with the statistics of that convolution's output on real frames (running mean and variance
= those statistics, scale = their standard deviation, shift = folded bias + mean), so eval mode computes exactly the
exported function and train mode (batch statistics) starts close to it. The recovered network is compared with the
ONNX model on frames; above ``--tolerance`` nothing is written. docs/training.md, "Shipped checkpoints".
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from forest_perception.cli_args import (
    ArgumentParser,
    InputError,
    describe_error,
    existing_dir,
    positive_float,
    positive_int,
    run_command,
)
from forest_perception.depth_pipeline import synthetic_forest_image
from forest_perception.inference import (
    DEFAULT_MEAN,
    DEFAULT_STD,
    OnnxDepthEngine,
    Preprocessor,
    file_sha256,
    weights_sha256,
)
from forest_perception.models.cli_types import RawDefaultsHelpFormatter
from forest_perception.models.networks import build_model
from forest_perception.models.provenance import git_commit
from forest_perception.models.weights import weights_dir

PROG = "python -m forest_perception.models.recover"
CHECKPOINT_FORMAT = 1  # the trainer's (models.trainer.CHECKPOINT_FORMAT)
FOLDED_BIAS_SUFFIX = "_bias"  # the dynamo exporter names a folded bias "<conv>.weight_bias"


class RecoveryError(ValueError):
    """The ONNX graph does not fit the PyTorch network, or the recovered network does not match it."""


@dataclass
class LayerWeights:
    """The weights one Conv/Gemm node of the graph holds for one PyTorch layer."""

    module: str
    weight: np.ndarray
    bias: np.ndarray | None
    node: str


# --------------------------------------------------------------------------------------------- the graph


def _initializers(graph: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {init.name: numpy_helper.to_array(init) for init in graph.initializer}


def _attributes(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {attr.name: helper.get_attribute_value(attr) for attr in node.attribute}


def onnx_metadata(onnx_model: Any) -> dict[str, Any]:
    """The model's ``metadata_props``, JSON values decoded."""
    meta: dict[str, Any] = {}
    for entry in onnx_model.metadata_props:
        try:
            meta[entry.key] = json.loads(entry.value)
        except ValueError:
            meta[entry.key] = entry.value
    return meta


def _layers_in_call_order(model: nn.Module, input_hw: Sequence[int]) -> list[str]:
    """Names of the Conv2d and Linear modules in the order a forward pass runs them."""
    order: list[str] = []
    names = {module: name for name, module in model.named_modules()}
    hooks = [module.register_forward_pre_hook(lambda m, _inputs: order.append(names[m]))
             for module in model.modules() if isinstance(module, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, int(input_hw[0]), int(input_hw[1])))
    finally:
        for hook in hooks:
            hook.remove()
    return order


def _check_node(node: Any, module: nn.Module, weight: np.ndarray, where: str) -> None:
    """``RecoveryError`` unless the node computes what ``module`` does (kind, weight shape, conv attributes)."""
    attrs = _attributes(node)
    shape = tuple(module.weight.shape)
    if tuple(weight.shape) != shape:
        raise RecoveryError(f"{where}: weight of shape {tuple(weight.shape)} does not fit {type(module).__name__} "
                            f"weight {shape}")
    if node.op_type == "Conv":
        if not isinstance(module, nn.Conv2d):
            raise RecoveryError(f"{where}: a Conv node does not fit the {type(module).__name__}")
        ph, pw = module.padding if isinstance(module.padding, tuple) else (module.padding,) * 2
        expected = {"strides": list(module.stride), "pads": [ph, pw, ph, pw], "group": module.groups,
                    "dilations": list(module.dilation)}
        got = {"strides": list(attrs.get("strides", [1, 1])), "pads": list(attrs.get("pads", [0, 0, 0, 0])),
               "group": int(attrs.get("group", 1)), "dilations": list(attrs.get("dilations", [1, 1]))}
        if got != expected:
            raise RecoveryError(f"{where}: conv attributes {got} differ from the PyTorch layer's {expected}")
    elif node.op_type == "Gemm":
        if not isinstance(module, nn.Linear):
            raise RecoveryError(f"{where}: a Gemm node does not fit the {type(module).__name__}")
        got = {key: attrs.get(key, default) for key, default in
               (("transA", 0), ("transB", 0), ("alpha", 1.0), ("beta", 1.0))}
        if got != {"transA": 0, "transB": 1, "alpha": 1.0, "beta": 1.0}:
            raise RecoveryError(f"{where}: Gemm attributes {got} are not those of a torch Linear layer")


def match_layers(model: nn.Module, onnx_model: Any, input_hw: Sequence[int]) -> tuple[list[LayerWeights], str]:
    """The weights of every Conv2d/Linear of ``model`` from the graph, and how they were matched (name or order).

    By name when every Conv/Gemm weight initializer is named ``<module>.weight``; else the i-th Conv/Gemm node of
    the graph goes to the i-th layer the network runs. Shapes and attributes are checked either way.
    """
    graph = onnx_model.graph
    inits = _initializers(graph)
    nodes = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
    modules = dict(model.named_modules())
    order = _layers_in_call_order(model, input_hw)
    if len(nodes) != len(order):
        raise RecoveryError(f"the graph has {len(nodes)} Conv/Gemm nodes, the network {len(order)} Conv2d/Linear "
                            "layers: it is another network or another configuration (--model-kwarg)")
    by_name = all(len(n.input) > 1 and n.input[1].endswith(".weight") and n.input[1][: -len(".weight")] in modules
                  for n in nodes)
    layers = []
    for index, node in enumerate(nodes):
        weight_name = node.input[1]
        if weight_name not in inits:
            raise RecoveryError(f"node {node.name or node.op_type} #{index}: its weight {weight_name!r} is not an "
                                "initializer (not a constant-folded export)")
        name = weight_name[: -len(".weight")] if by_name else order[index]
        bias = inits[node.input[2]] if len(node.input) > 2 and node.input[2] else None
        if len(node.input) > 2 and node.input[2] and node.input[2] not in inits:
            raise RecoveryError(f"node {node.name or node.op_type} #{index}: its bias {node.input[2]!r} is not an "
                                "initializer")
        _check_node(node, modules[name], inits[weight_name], f"{node.op_type} node {weight_name!r} -> {name}")
        layers.append(LayerWeights(name, inits[weight_name], bias, weight_name))
    if sorted(layer.module for layer in layers) != sorted(order):
        raise RecoveryError("the graph's layers do not map one to one onto the network's")
    return layers, "name" if by_name else "order"


def _batchnorm_after(model: nn.Module) -> dict[str, str]:
    """``{conv name: name of the BatchNorm2d right after it}`` (ConvBNReLU and any Sequential built that way)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            children = list(module.named_children())
            for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                    found[f"{name}.{conv_name}" if name else conv_name] = f"{name}.{bn_name}" if name else bn_name
    return found


# --------------------------------------------------------------------------------------------- weights


def load_layers(model: nn.Module, layers: Iterable[LayerWeights]) -> dict[str, np.ndarray]:
    """Put the graph's weights into ``model``; returns ``{batchnorm name: bias folded into the conv before it}``.

    Each such BatchNorm is set to the identity plus that bias (mean 0, variance 1 - eps, scale 1), which with the
    conv computes the folded layer exactly; ``unfold_batchnorm`` then gives it real statistics.
    """
    modules = dict(model.named_modules())
    batchnorm_after = _batchnorm_after(model)
    folded: dict[str, np.ndarray] = {}
    assigned: set[str] = set()
    with torch.no_grad():
        for layer in layers:
            module = modules[layer.module]
            module.weight.copy_(torch.from_numpy(np.array(layer.weight, np.float32)))
            assigned.add(f"{layer.module}.weight")
            outputs = module.weight.shape[0]
            bias = np.zeros(outputs, np.float32) if layer.bias is None else np.array(layer.bias, np.float32)
            if bias.shape != (module.weight.shape[0],):
                raise RecoveryError(f"{layer.node}: bias of shape {bias.shape} for {module.weight.shape[0]} outputs")
            if layer.module in batchnorm_after:
                if module.bias is not None:
                    raise RecoveryError(f"{layer.module} has a bias and a BatchNorm after it: the folded bias cannot "
                                        "be split between them")
                bn_name = batchnorm_after[layer.module]
                bn = modules[bn_name]
                bn.running_mean.zero_()
                bn.running_var.fill_(1.0 - bn.eps)
                bn.weight.fill_(1.0)
                bn.bias.copy_(torch.from_numpy(bias))
                folded[bn_name] = bias
                assigned.update(f"{bn_name}.{key}" for key in ("weight", "bias"))
            elif module.bias is not None:
                module.bias.copy_(torch.from_numpy(bias))
                assigned.add(f"{layer.module}.bias")
            elif np.any(bias != 0):
                raise RecoveryError(f"{layer.node}: the graph adds a bias that {layer.module} has no place for")
    missing = sorted(name for name, _ in model.named_parameters() if name not in assigned)
    if missing:
        raise RecoveryError(f"no weights in the graph for {', '.join(missing[:8])}")
    return folded


def network_inputs(frames: Iterable[np.ndarray], input_hw: Sequence[int], mean: Sequence[float] = DEFAULT_MEAN,
                   std: Sequence[float] = DEFAULT_STD) -> torch.Tensor:
    """rgb8 camera frames -> the ``Nx3xHxW`` network inputs the rover runtime makes of them (``Preprocessor``)."""
    preprocess = Preprocessor(input_hw, mean, std)
    return torch.from_numpy(np.concatenate([preprocess(frame).copy() for frame in frames]))


@torch.no_grad()
def input_statistics(model: nn.Module, names: Iterable[str], inputs: torch.Tensor,
                     batch_size: int = 8) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel mean and variance (float64) of the input of each named module of ``model`` over ``inputs``.

    The model runs in the mode it is in (eval: running statistics; train: batch statistics), in batches of
    ``batch_size``; nothing else of it changes.
    """
    modules = dict(model.named_modules())
    sums = {name: [0.0, 0.0, 0] for name in names}

    def collect(name: str) -> Any:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].double()
            stats = sums[name]
            stats[0] = stats[0] + x.sum(dim=(0, 2, 3))
            stats[1] = stats[1] + (x * x).sum(dim=(0, 2, 3))
            stats[2] += x.numel() // x.shape[1]
        return hook

    hooks = [modules[name].register_forward_pre_hook(collect(name)) for name in sums]
    try:
        for start in range(0, len(inputs), batch_size):
            model(inputs[start : start + batch_size])
    finally:
        for hook in hooks:
            hook.remove()
    out = {}
    for name, (total, total_sq, count) in sums.items():
        mean = total / count
        out[name] = (mean, (total_sq / count - mean * mean).clamp(min=0.0))
    return out


@torch.no_grad()
def set_pass_through(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor,
                     bias: torch.Tensor | float = 0.0) -> None:
    """``bn`` with running statistics ``mean`` / ``var`` that adds ``bias`` to its input in eval mode.

    ``weight = sqrt(var + eps)``, ``bias = bias + mean``: ``(x - mean) / sqrt(var + eps) * sqrt(var + eps) + bias +
    mean = x + bias``; in train mode the batch statistics of similar inputs are close to ``mean`` and ``var``.
    """
    bn.running_mean.copy_(mean.float())
    bn.running_var.copy_(var.float())
    bn.weight.copy_(torch.sqrt(var + bn.eps).float())
    bn.bias.copy_(bias + mean.float())
    bn.num_batches_tracked.zero_()


@torch.no_grad()
def unfold_batchnorm(model: nn.Module, folded: Mapping[str, np.ndarray], inputs: torch.Tensor,
                     batch_size: int = 8) -> dict[str, int]:
    """Give each BatchNorm of ``folded`` the statistics of its input on ``inputs``, keeping eval mode's function.

    ``running_mean = mu``, ``running_var = var``, ``weight = sqrt(var + eps)``, ``bias = folded bias + mu``: in eval
    mode ``(x - mu) / sqrt(var + eps) * sqrt(var + eps) + b + mu = x + b``, the exported layer; in train mode the
    batch statistics of similar frames are close to ``mu`` and ``var``, so fine-tuning starts from the same network.
    """
    modules = dict(model.named_modules())
    model.eval()
    stats = input_statistics(model, folded, inputs, batch_size)
    for name, bias in folded.items():
        set_pass_through(modules[name], *stats[name], bias=torch.from_numpy(bias))
    return {"batchnorm_layers": len(folded), "frames": int(len(inputs))}


# --------------------------------------------------------------------------------------------- checks


def compare_with_onnx(model: nn.Module, onnx_path: str | Path, frames: Sequence[np.ndarray],
                      meta: Mapping[str, Any], threads: int = 2) -> dict[str, float]:
    """How far the PyTorch network is from the ONNX model on rgb8 camera frames.

    ``max_abs_diff_m``/``max_rel_diff``: network outputs on the same inputs; ``engine_max_abs_diff_m``: depth of the
    two rover engines (``OnnxDepthEngine``, ``TorchDepthEngine``) on the full frames, where both are valid;
    ``engine_valid_agreement``: fraction of pixels that both call valid or both invalid.
    """
    from forest_perception.models.torch_engine import TorchDepthEngine

    onnx_engine = OnnxDepthEngine(onnx_path, threads=threads)
    torch_engine = TorchDepthEngine((model, meta), threads=threads)
    inputs = network_inputs(frames, onnx_engine.input_hw, onnx_engine.mean, onnx_engine.std)
    max_abs, max_rel, engine_abs, agree, pixels = 0.0, 0.0, 0.0, 0, 0
    for i, frame in enumerate(frames):
        x = inputs[i : i + 1]
        expected = onnx_engine._infer(x.numpy())
        with torch.inference_mode():
            got = model(x).numpy()
        diff = np.abs(got - expected)
        max_abs = max(max_abs, float(diff.max()))
        max_rel = max(max_rel, float((diff / np.maximum(np.abs(expected), 1e-6)).max()))
        a, b = onnx_engine.predict(frame), torch_engine.predict(frame)
        both = np.isfinite(a) & np.isfinite(b)
        if both.any():
            engine_abs = max(engine_abs, float(np.abs(a[both] - b[both]).max()))
        agree += int(np.sum(np.isfinite(a) == np.isfinite(b)))
        pixels += a.size
    return {"frames": len(frames), "max_abs_diff_m": max_abs, "max_rel_diff": max_rel,
            "engine_max_abs_diff_m": engine_abs, "engine_valid_agreement": agree / max(pixels, 1)}


@torch.no_grad()
def train_mode_drift(model: nn.Module, inputs: torch.Tensor, batch_size: int = 8) -> float:
    """Mean |log depth| change when BatchNorm uses batch statistics (train mode, dropout off) instead of its running
    statistics: how far the first fine-tuning step starts from the recovered network (0 would be no change)."""
    was_training = model.training
    model.train()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.eval()
    saved = {name: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    try:
        changes = []
        for start in range(0, len(inputs), batch_size):
            batch = inputs[start : start + batch_size]
            if len(batch) < 2:
                continue
            train_depth = model(batch)
            model.eval()
            eval_depth = model(batch)
            model.train()
            for module in model.modules():
                if isinstance(module, nn.Dropout):
                    module.eval()
            changes.append(torch.log(train_depth / eval_depth).abs().mean().item())
    finally:
        modules = dict(model.named_modules())
        for name, (mean, var, count) in saved.items():  # train mode updated the running statistics
            modules[name].running_mean.copy_(mean)
            modules[name].running_var.copy_(var)
            modules[name].num_batches_tracked.copy_(count)
        model.train(was_training)
    return float(np.mean(changes)) if changes else math.nan


# --------------------------------------------------------------------------------------------- recovery


def recover_network(onnx_path: str | Path, stats_frames: Sequence[np.ndarray]) -> tuple[nn.Module, dict[str, Any]]:
    """``(model in eval mode, report)``: the network of an fp32 ONNX file, rebuilt from its metadata and weights."""
    import onnx

    onnx_model = onnx.load(str(onnx_path))
    meta = onnx_metadata(onnx_model)
    where = f"ONNX model {str(onnx_path)!r}"
    for key in ("model_name", "input_hw"):
        if key not in meta:
            raise RecoveryError(f"{where} has no {key!r} in its metadata: it was not exported by forest-train")
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in onnx_model.graph.node):
        raise RecoveryError(f"{where} is quantised (int8): recover from its fp32 model")
    input_hw = [int(v) for v in meta["input_hw"]]
    kwargs = dict(meta.get("model_kwargs") or {})
    model = build_model(str(meta["model_name"]), input_hw=input_hw, **kwargs).eval()
    layers, matched_by = match_layers(model, onnx_model, input_hw)
    folded = load_layers(model, layers)
    mean, std = meta.get("mean", DEFAULT_MEAN), meta.get("std", DEFAULT_STD)
    inputs = network_inputs(stats_frames, input_hw, mean, std)
    stats = unfold_batchnorm(model, folded, inputs)
    model.eval()
    report = {"matched_by": matched_by, "layers": len(layers), **stats,
              "train_mode_drift_log": train_mode_drift(model, inputs), "onnx_meta": meta}
    return model, report


def recovered_checkpoint(model: nn.Module, onnx_path: str | Path, report: Mapping[str, Any],
                         card: Mapping[str, Any] | None = None, command: str = "") -> dict[str, Any]:
    """The trainer's checkpoint format for a recovered network: weights, how to rebuild them, where they came from.

    No optimizer or scheduler state: it is for ``--init`` (fine-tuning), evaluation and export, not ``--resume``.
    ``version`` is the ONNX model's, so both engines report the same model version.
    """
    meta = report["onnx_meta"]
    card = dict(card or {})
    train_metrics = meta.get("metrics") if isinstance(meta.get("metrics"), Mapping) else {}
    return {
        "format": CHECKPOINT_FORMAT,
        "model_name": str(meta["model_name"]),
        "model_kwargs": dict(meta.get("model_kwargs") or {}),
        "input_hw": [int(v) for v in meta["input_hw"]],
        "normalisation": {"mean": [float(v) for v in meta.get("mean", DEFAULT_MEAN)],
                          "std": [float(v) for v in meta.get("std", DEFAULT_STD)]},
        "min_depth": float(meta.get("min_depth", 0.1)),
        "max_depth": float(meta.get("max_depth", 10.0)),
        "model_state": {key: value.detach().clone() for key, value in model.state_dict().items()},
        "epoch": int(train_metrics.get("epoch", 0)),
        "metrics": {key: float(value) for key, value in train_metrics.items() if isinstance(value, (int, float))},
        "held_out_metrics": {key: float(value) for key, value in (card.get("metrics") or {}).items()},
        "command": str(card.get("train_command") or meta.get("train_command") or ""),
        "git_commit": str(meta.get("train_git_commit") or "unknown"),
        "version": str(meta.get("version") or ""),
        "recovered_from": {
            "file": Path(onnx_path).name,
            "sha256": file_sha256(onnx_path),
            "weights_sha256": str(meta.get("weights_sha256") or ""),
            "matched_by": report["matched_by"],
            "batchnorm": (f"folded into the convs by the exporter; unfolded with the statistics of "
                          f"{report['frames']} frames"),
            "train_mode_drift_log": float(report["train_mode_drift_log"]),
            "check": dict(report.get("check") or {}),
            "command": command,
            "git_commit": git_commit() or "unknown",
        },
        "torch_version": str(torch.__version__),
    }


def checkpoint_card_entry(checkpoint_path: Path, checkpoint: Mapping[str, Any], command: str) -> dict[str, Any]:
    """The ``checkpoint`` entry of a model card for the checkpoint written at ``checkpoint_path``."""
    recovered = checkpoint["recovered_from"]
    check = recovered.get("check") or {}
    return {
        "file": checkpoint_path.name,
        "size_bytes": checkpoint_path.stat().st_size,
        "sha256": file_sha256(checkpoint_path),
        "weights_sha256": weights_sha256(checkpoint["model_state"]),
        "holds": "state dict, model name and kwargs, input size, normalisation, depth range (no optimizer)",
        "recovered_from": recovered["file"],
        "batchnorm": recovered["batchnorm"],
        "max_abs_diff_vs_onnx_m": check.get("max_abs_diff_m"),
        "engine_max_abs_diff_vs_onnx_m": check.get("engine_max_abs_diff_m"),
        "frames_compared": check.get("frames"),
        "made_with": command,
    }


# --------------------------------------------------------------------------------------------- command line


def dataset_frames(folders: Sequence[str | Path], count: int) -> list[np.ndarray]:
    """Up to ``count`` rgb8 frames spread evenly over every frame of the dataset folders."""
    from forest_perception.dataset_tools.layout import load_frame
    from forest_perception.models.data import collect_segments

    index = [(segment, i) for segment in collect_segments([str(f) for f in folders]) for i in range(len(segment))]
    if not index:
        raise ValueError(f"no frames in {', '.join(str(f) for f in folders)}")
    picks = np.unique(np.linspace(0, len(index) - 1, min(count, len(index))).round().astype(int))
    return [load_frame(*index[i])[0] for i in picks]


def _recorded_command(argv: Sequence[str], weights: Path) -> str:
    """The command as run, with machine folders replaced by placeholders (DATA, TEST, models/weights or WEIGHTS);
    ``--data-command`` is left out (it is recorded before the command)."""
    shown: list[str] = []
    flag = None
    for arg in argv:
        if arg.startswith("--"):
            flag = arg
            if flag != "--data-command":
                shown.append(arg)
        elif flag == "--data-command":
            continue
        elif flag in ("--stats-data", "--check-data"):
            shown.append("DATA" if flag == "--stats-data" else "TEST")
        elif flag == "--weights":
            shown.append("models/weights" if weights.resolve() == weights_dir().resolve() else "WEIGHTS")
        else:
            shown.append(arg)
    return f"{PROG} {shlex.join(shown)}".strip()


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m forest_perception.models.recover`` argument parser."""
    parser = ArgumentParser(prog=PROG, description=__doc__, formatter_class=RawDefaultsHelpFormatter)
    parser.add_argument("--name", nargs="+", default=None, metavar="NAME",
                        help="fp32 models to recover, e.g. multiscale_320x240 (default: every fp32 model in --weights)")
    parser.add_argument("--weights", type=existing_dir, default=str(weights_dir()),
                        help="folder of the ONNX models and their cards; the .pt files are written there")
    parser.add_argument("--stats-data", nargs="+", type=existing_dir, default=None, metavar="DIR",
                        help="dataset folders whose frames give the BatchNorm statistics (default: synthetic frames)")
    parser.add_argument("--stats-frames", type=positive_int, default=64, help="frames for the BatchNorm statistics")
    parser.add_argument("--check-data", nargs="+", type=existing_dir, default=None, metavar="DIR",
                        help="dataset folders to compare PyTorch and ONNX on (default: --stats-data)")
    parser.add_argument("--check-frames", type=positive_int, default=16, help="frames to compare on")
    parser.add_argument("--data-command", default="",
                        help="the commands that made --stats-data and --check-data, for the model cards")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch and ONNX Runtime CPU threads")
    parser.add_argument("--tolerance", type=positive_float, default=1e-3,
                        help="max abs depth difference from the ONNX model, metres; above it nothing is written")
    return parser


def _frames(folders: Sequence[Path] | None, count: int, flag: str) -> list[np.ndarray]:
    if not folders:
        return [synthetic_forest_image(480, 640, seed=i) for i in range(count)]
    try:
        return dataset_frames(folders, count)
    except (OSError, ValueError) as exc:
        raise InputError(f"{flag} {' '.join(str(f) for f in folders)}: {describe_error(exc)}") from exc


def _recover(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from forest_perception.models.checkpoints import save_checkpoint
    from forest_perception.models.export import update_model_card

    torch.set_num_threads(args.threads)
    weights = Path(args.weights)
    names = args.name or sorted(p.stem for p in weights.glob("*.onnx") if not p.stem.endswith("_int8"))
    for name in names:
        if not (weights / f"{name}.onnx").is_file() or name.endswith("_int8"):
            raise InputError(f"--name {name}: no fp32 model {name}.onnx in --weights {weights}; fp32 models there: "
                             f"{', '.join(p.stem for p in sorted(weights.glob('*.onnx')) if '_int8' not in p.stem)}")
    command = _recorded_command(argv, weights)
    if args.data_command:
        command = f"{args.data_command}; {command}"
    stats = _frames(args.stats_data, args.stats_frames, "--stats-data")
    check = _frames(args.check_data or args.stats_data, args.check_frames, "--check-data")
    check += [synthetic_forest_image(480, 640, seed=100 + i) for i in range(2)]
    for name in names:
        onnx_path = weights / f"{name}.onnx"
        try:
            model, report = recover_network(onnx_path, stats)
        except RecoveryError as exc:
            raise InputError(f"{onnx_path}: {exc}") from exc
        meta = report["onnx_meta"]
        engine_meta = {**{k: meta[k] for k in ("model_name", "model_kwargs", "input_hw", "mean", "std", "min_depth",
                                               "max_depth", "version") if k in meta}}
        report["check"] = compare_with_onnx(model, onnx_path, check, engine_meta, threads=args.threads)
        diff = max(report["check"]["max_abs_diff_m"], report["check"]["engine_max_abs_diff_m"])
        if not math.isfinite(diff) or diff > args.tolerance:
            print(f"{PROG}: error: {name}: the recovered network differs from {onnx_path.name} by {diff:.3g} m > "
                  f"--tolerance {args.tolerance} m; nothing was written", file=sys.stderr)
            return 1
        card_path = onnx_path.with_suffix(".json")
        card = json.loads(card_path.read_text()) if card_path.is_file() else {}
        checkpoint = recovered_checkpoint(model, onnx_path, report, card, command)
        checkpoint_path = weights / f"{name}.pt"
        save_checkpoint(checkpoint, checkpoint_path)
        entry = checkpoint_card_entry(checkpoint_path, checkpoint, command)
        if card_path.is_file():
            update_model_card(onnx_path, {"checkpoint": entry})
        int8_path = weights / f"{name}_int8.onnx"
        if int8_path.with_suffix(".json").is_file():
            update_model_card(int8_path, {"checkpoint": {
                **{k: entry[k] for k in ("file", "size_bytes", "sha256", "weights_sha256")},
                "holds": f"the weights of the fp32 network {name} (fine-tuning starts from them)"}})
        check_report = report["check"]
        print(f"{name}: matched {report['layers']} layers by {report['matched_by']}, BatchNorm unfolded on "
              f"{report['frames']} frames (train-mode drift {report['train_mode_drift_log']:.4f} log); vs ONNX on "
              f"{check_report['frames']} frames: max abs {check_report['max_abs_diff_m']:.2e} m, rover engines "
              f"{check_report['engine_max_abs_diff_m']:.2e} m; wrote {checkpoint_path} "
              f"({checkpoint_path.stat().st_size:,} bytes)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Recover, check and write the checkpoints; returns the exit status (2 bad input, 1 check failed)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_command(PROG, build_parser(), lambda args: _recover(args, argv), argv)


if __name__ == "__main__":
    sys.exit(main())

