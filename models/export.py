"""ONNX export, int8 quantisation and model cards of the depth networks (``forest-train export``).

Every export is checked against PyTorch in ONNX Runtime and refused above a tolerance; which exporter is used
and what the card records: docs/training.md ("Export"). Models and cards are written to a hidden temporary file
and moved into place when complete, so a failed or interrupted export leaves no half-written file.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import shlex
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from forest_perception.depth_pipeline import synthetic_forest_image
from forest_perception.inference import (
    DEFAULT_MAX_DEPTH_M,
    DEFAULT_MEAN,
    DEFAULT_MIN_DEPTH_M,
    DEFAULT_STD,
    DepthEngine,
    OnnxDepthEngine,
    Preprocessor,
    file_sha256,
    read_onnx_metadata,
    weights_sha256,
)
from forest_perception.models.cards import remove_model_files, update_model_card, write_model_card  # re-exported
from forest_perception.models.networks import model_version
from forest_perception.models.outputs import temporary_sibling
from forest_perception.models.provenance import git_commit
from forest_perception.models.torch_engine import load_torch_checkpoint

_LOG = logging.getLogger(__name__)

EXPORT_FORMAT_VERSION = "1"
INPUT_NAME = "image"
OUTPUT_NAME = "depth"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


class ExportVerificationError(RuntimeError):
    """ONNX Runtime's output differs from PyTorch's by more than the tolerance."""


# --------------------------------------------------------------------------------------------- export


def _depth_range(model: nn.Module, meta: Mapping[str, Any]) -> tuple[float, float]:
    """Valid depth range: the checkpoint's (training labels) if given, else the network head's, else defaults."""
    head_min, head_max = DEFAULT_MIN_DEPTH_M, DEFAULT_MAX_DEPTH_M
    for module in model.modules():
        if hasattr(module, "min_depth") and hasattr(module, "max_depth"):
            head_min, head_max = float(module.min_depth), float(module.max_depth)
            break
    min_depth = float(meta.get("min_depth") or head_min)
    max_depth = float(meta.get("max_depth") or head_max)
    return min_depth, max_depth


def resolve_model(model_or_checkpoint: nn.Module | str | os.PathLike | tuple[nn.Module, Mapping[str, Any]],
                  ) -> tuple[nn.Module, dict[str, Any]]:
    """``(model in eval mode, meta)`` from a module, a ``(module, meta)`` pair or a checkpoint path."""
    if isinstance(model_or_checkpoint, (str, os.PathLike)):
        return load_torch_checkpoint(model_or_checkpoint)
    if isinstance(model_or_checkpoint, tuple):
        model, meta = model_or_checkpoint
        return model.eval(), dict(meta)
    if isinstance(model_or_checkpoint, nn.Module):
        return model_or_checkpoint.eval(), {}
    raise TypeError(f"expected an nn.Module, (module, meta) or a checkpoint path, got {type(model_or_checkpoint)}")


def _run_exporter(model: nn.Module, example: torch.Tensor, opset: int, dynamic_batch: bool, exporter: str) -> Any:
    """The exported graph as an in-memory ``onnx.ModelProto`` (the dynamo exporter's tracebacks dropped)."""
    import onnx

    if exporter == "dynamo":
        dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=256)},) if dynamic_batch else None
        # the dynamo exporter prints progress and notes on opset down-conversion; keep the console readable
        # (failures still raise)
        exporter_log = logging.getLogger("torch.onnx")
        level = exporter_log.level
        exporter_log.setLevel(logging.ERROR)
        try:
            chatter = io.StringIO()
            with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset,
                                            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                            dynamic_shapes=dynamic_shapes, optimize=True, verbose=False)
        finally:
            exporter_log.setLevel(level)
        proto = program.model_proto
        _strip_stack_traces(proto)
        return proto
    if exporter == "torchscript":
        dynamic_axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), buffer, dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=dynamic_axes,
                              do_constant_folding=True)
        return onnx.load_from_string(buffer.getvalue())
    raise ValueError(f"exporter must be 'dynamo' or 'torchscript', got {exporter!r}")


STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"  # the dynamo exporter's per-node Python traceback


def strip_stack_traces(onnx_path: str | Path) -> int:
    """Drop the per-node Python tracebacks the dynamo exporter writes (they name the exporting machine's folders);
    returns how many were dropped. The graph and its other metadata are unchanged; the file is rewritten only
    when there was something to drop. (Exports drop them before the file is first written.)"""
    import onnx

    model = onnx.load(str(onnx_path))
    dropped = _strip_stack_traces(model)
    if dropped:
        onnx.save(model, str(onnx_path))
    return dropped


def _strip_stack_traces(model: Any) -> int:
    graphs = [model.graph, *(function for function in model.functions)]
    dropped = 0
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            for index in reversed(range(len(node.metadata_props))):
                if node.metadata_props[index].key == STACK_TRACE_KEY:
                    del node.metadata_props[index]
                    dropped += 1
            for attr in node.attribute:  # the branches and bodies of If / Loop nodes
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)
    return dropped


def verify_onnx(onnx_path: str | Path | bytes, model: nn.Module, input_hw: Sequence[int],
                mean: Sequence[float] = DEFAULT_MEAN, std: Sequence[float] = DEFAULT_STD,
                image: np.ndarray | None = None, batch: int = 1) -> dict[str, float]:
    """Max abs error (metres) of ONNX Runtime vs PyTorch on a random input and on a real-looking frame.

    ``onnx_path`` is a file or the serialised model itself (bytes)."""
    import onnxruntime as ort

    height, width = int(input_hw[0]), int(input_hw[1])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    source = onnx_path if isinstance(onnx_path, bytes) else str(onnx_path)
    label = "the exported graph" if isinstance(onnx_path, bytes) else str(onnx_path)
    session = ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    random_input = torch.randn(batch, 3, height, width, generator=generator)
    frame = image if image is not None else synthetic_forest_image(height, width)
    frame_input = torch.from_numpy(Preprocessor((height, width), mean, std)(frame).copy()).repeat(batch, 1, 1, 1)
    report: dict[str, float] = {}
    for label, tensor in (("random", random_input), ("image", frame_input)):
        with torch.inference_mode():
            expected = model(tensor).numpy()
        got = session.run(None, {session.get_inputs()[0].name: tensor.numpy()})[0]
        if got.shape != expected.shape:
            raise ExportVerificationError(f"{label}: ONNX output shape {got.shape} != PyTorch {expected.shape}")
        report[f"max_abs_error_{label}_m"] = float(np.max(np.abs(got - expected)))
        report[f"max_rel_error_{label}"] = float(np.max(np.abs(got - expected) / np.maximum(np.abs(expected), 1e-6)))
    report["max_abs_error_m"] = max(report["max_abs_error_random_m"], report["max_abs_error_image_m"])
    return report


def set_metadata(onnx_path: str | Path, props: Mapping[str, Any]) -> None:
    """Write ``props`` (values JSON-encoded unless strings) into the model's metadata_props, in place."""
    import onnx

    model = onnx.load(str(onnx_path))
    _set_metadata(model, props)
    onnx.save(model, str(onnx_path))


def _set_metadata(model: Any, props: Mapping[str, Any]) -> None:
    existing = {entry.key: entry.value for entry in model.metadata_props}
    existing.update({key: value if isinstance(value, str) else json.dumps(value) for key, value in props.items()})
    del model.metadata_props[:]
    for key, value in existing.items():
        model.metadata_props.add(key=key, value=value)


def export_onnx(model_or_checkpoint: nn.Module | str | os.PathLike | tuple[nn.Module, Mapping[str, Any]],
                out_path: str | os.PathLike, input_hw: Sequence[int] | None = None, opset: int = 17,
                dynamic_batch: bool = False, *, exporter: str = "dynamo", tolerance_m: float = 1e-3,
                image: np.ndarray | None = None, export_command: str | None = None) -> Path:
    """Export a depth network to ONNX with metadata, verify it against PyTorch, return the path.

    ``input_hw`` defaults to the checkpoint's. Raises ``ExportVerificationError`` (and writes nothing) when
    ONNX Runtime differs from PyTorch by more than ``tolerance_m`` metres on a random input or on ``image``
    (a synthetic forest frame if not given). The verification figures are stored in the metadata too.
    The file appears at ``out_path`` only once it is verified and complete; until then an earlier file there is kept.
    """
    model, meta = resolve_model(model_or_checkpoint)
    if input_hw is None:
        input_hw = meta.get("input_hw") or getattr(model, "input_hw", None)
        if input_hw is None:
            raise ValueError("input_hw not given and not in the checkpoint")
    height, width = int(input_hw[0]), int(input_hw[1])
    mean = tuple(float(v) for v in (meta.get("mean") or DEFAULT_MEAN))
    std = tuple(float(v) for v in (meta.get("std") or DEFAULT_STD))
    min_depth, max_depth = _depth_range(model, meta)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    staged = temporary_sibling(out_path)
    try:
        _export_verified(model, meta, staged, (height, width), mean, std, min_depth, max_depth, opset, dynamic_batch,
                         exporter, tolerance_m, image, export_command)
        os.replace(staged, out_path)
    finally:
        staged.unlink(missing_ok=True)
    return out_path


def _export_verified(model: nn.Module, meta: Mapping[str, Any], out_path: Path, input_hw: tuple[int, int],
                     mean: tuple[float, ...], std: tuple[float, ...], min_depth: float, max_depth: float, opset: int,
                     dynamic_batch: bool, exporter: str, tolerance_m: float, image: np.ndarray | None,
                     export_command: str | None) -> None:
    """Export, verify against PyTorch (``ExportVerificationError`` beyond tolerance), add metadata, then write
    ``out_path`` once."""
    import onnx

    height, width = input_hw
    model = model.cpu().eval()
    example = torch.randn(2 if dynamic_batch else 1, 3, height, width)
    started = time.perf_counter()
    proto = _run_exporter(model, example, opset, dynamic_batch, exporter)
    export_s = time.perf_counter() - started
    report = verify_onnx(proto.SerializeToString(), model, (height, width), mean, std, image,
                         batch=2 if dynamic_batch else 1)
    if not math.isfinite(report["max_abs_error_m"]) or report["max_abs_error_m"] > tolerance_m:
        raise ExportVerificationError(f"ONNX export of {meta.get('model_name', type(model).__name__)} differs from "
                                      f"PyTorch by {report['max_abs_error_m']:.3g} m > tolerance {tolerance_m} m")
    name = str(meta.get("model_name") or type(model).__name__)
    sha = str(meta.get("weights_sha256") or weights_sha256(model.state_dict()))
    command = meta.get("command")
    if isinstance(command, (list, tuple)):
        command = shlex.join(str(part) for part in command)
    props = {
        "model_name": name,
        "model_kwargs": dict(meta.get("model_kwargs") or {}),
        "input_hw": [height, width],
        "input_format": "RGB float32 Nx3xHxW, (rgb/255 - mean)/std",
        "output_format": "metric depth float32 Nx1xHxW metres along the optical axis",
        "mean": list(mean),
        "std": list(std),
        "min_depth": min_depth,
        "max_depth": max_depth,
        "weights_sha256": sha,
        "version": model_version(name, sha, model),
        "export_format_version": EXPORT_FORMAT_VERSION,
        "exporter": f"torch {torch.__version__} {exporter}",
        "train_command": str(command or "unknown"),
        "export_command": export_command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "metrics": dict(meta.get("metrics") or {}),
        "git_commit": git_commit() or "unknown",
        "train_git_commit": str(meta.get("git_commit") or "unknown"),
        "verify_max_abs_error_m": report["max_abs_error_m"],
    }
    if meta.get("init"):  # a fine-tuned network: the checkpoint it started from (name, file, sha256)
        props["init"] = dict(meta["init"])
    if meta.get("blend"):  # a weight-space blend: its source checkpoints (name, file, sha256, weight)
        props["blend"] = [dict(source) for source in meta["blend"]]
    _set_metadata(proto, props)
    onnx.save(proto, str(out_path))
    _LOG.info("exported %s in %.1f s, max abs error vs PyTorch %.2e m", name, export_s, report["max_abs_error_m"])


# --------------------------------------------------------------------------------------------- int8


def iter_calibration_images(source: str | os.PathLike | Iterable[np.ndarray], limit: int | None = None,
                            ) -> Iterator[np.ndarray]:
    """rgb8 frames from an iterable of arrays or a folder (searched recursively for png/jpg/bmp).

    From a folder with more than ``limit`` images, ``limit`` of them spread evenly over its sorted paths, so that
    every run, segment and style of a dataset folder is represented (the first ``limit`` would all come from its
    first few segments).
    """
    import cv2

    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        if not folder.is_dir():
            raise ValueError(f"calibration folder {str(folder)!r} does not exist")
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                       and "depth" not in p.parent.name)
        if not files:
            raise ValueError(f"calibration folder {str(folder)!r} has no {'/'.join(IMAGE_SUFFIXES)} images")
        if limit is not None and 0 < limit < len(files):
            files = [files[i] for i in sorted({round(k * (len(files) - 1) / max(limit - 1, 1))
                                               for k in range(limit)})]
        source = (cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB) for bgr in (cv2.imread(str(f), cv2.IMREAD_COLOR)
                                                                   for f in files) if bgr is not None)
    for count, frame in enumerate(source):
        if limit is not None and count >= limit:
            return
        yield frame


def _calibration_reader(onnx_path: Path, images: Iterable[np.ndarray]) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    engine = OnnxDepthEngine(onnx_path)

    class _Reader(CalibrationDataReader):
        """Feeds frames through the inference engine's own pre-processing."""

        def __init__(self) -> None:
            self._frames = iter(images)
            self._preprocess = Preprocessor(engine.input_hw, engine.mean, engine.std)
            self._input_name = engine.session.get_inputs()[0].name
            self.count = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            frame = next(self._frames, None)
            if frame is None:
                return None
            self.count += 1
            return {self._input_name: self._preprocess(frame).copy()}

    return _Reader()


def input_layers(onnx_path: str | os.PathLike) -> list[str]:
    """Names of the nodes that read the model's image input (the first layers of each branch)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    inputs = {i.name for i in graph.input} - {t.name for t in graph.initializer}
    return [n.name for n in graph.node if inputs & set(n.input)]


def quantize_int8(onnx_path: str | os.PathLike, calibration_images: str | os.PathLike | Iterable[np.ndarray],
                  out_path: str | os.PathLike, per_channel: bool = True, max_images: int = 64,
                  calibrate_method: str = "MinMax", fp32_input_layers: bool = True) -> Path:
    """Static int8 QDQ quantisation (uint8 activations, int8 weights) calibrated on rgb8 frames; returns the path.

    ``fp32_input_layers`` keeps the layers that read the image in fp32 (:func:`input_layers`): quantising them cost
    the multi-scale 320x240 network most of its int8 loss in low-contrast forests (fog: AbsRel 0.083 fp32, 0.133
    all int8, 0.085 with them in fp32), for no measurable latency. Metadata of the fp32 model is copied over and
    ``quantization`` is added.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if not onnx_path.is_file():
        raise ValueError(f"fp32 model {str(onnx_path)!r} does not exist")
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}.get(calibrate_method.lower())
    if method is None:
        raise ValueError(f"calibrate_method must be MinMax, Entropy or Percentile, got {calibrate_method!r}")
    reader = _calibration_reader(onnx_path, iter_calibration_images(calibration_images, max_images))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    staged = temporary_sibling(out_path)
    prepared = staged.with_name(f"{staged.name}.prep")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
            kept = input_layers(prepared) if fp32_input_layers else []
            quantize_static(str(prepared), str(staged), reader, quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=method, nodes_to_exclude=kept)
        if reader.count == 0:
            raise ValueError("no calibration images were given")
        props = dict(read_onnx_metadata(onnx_path))
        props["quantization"] = (f"int8 static QDQ, U8 activations / S8 weights, "
                                 f"{'per-channel' if per_channel else 'per-tensor'}, {calibrate_method} on "
                                 f"{reader.count} frames" + (f"; fp32 kept: {', '.join(kept)}" if kept else ""))
        props["fp32_sha256"] = file_sha256(onnx_path)
        set_metadata(staged, props)
        os.replace(staged, out_path)
    finally:
        prepared.unlink(missing_ok=True)
        staged.unlink(missing_ok=True)
    return out_path


def _fallback_metrics(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    valid = np.isfinite(pred) & np.isfinite(gt) & (gt > 0)
    p, g = pred[valid].astype(np.float64), gt[valid].astype(np.float64)
    if p.size == 0:
        return {"absrel": float("nan"), "rmse": float("nan"), "delta1": float("nan")}
    ratio = np.maximum(p / g, g / p)
    return {"absrel": float(np.mean(np.abs(p - g) / g)), "rmse": float(np.sqrt(np.mean((p - g) ** 2))),
            "delta1": float(np.mean(ratio < 1.25))}


def _depth_metrics(preds: list[np.ndarray], depths: list[np.ndarray]) -> dict[str, float]:
    """Mean over frames of ``models.metrics.depth_metrics`` (or absrel/rmse/delta1 if it is not there)."""
    try:
        from forest_perception.models.metrics import depth_metrics
    except ImportError:
        depth_metrics = None
    per_frame: list[dict[str, float]] = []
    for pred, gt in zip(preds, depths):
        gt = np.asarray(gt, np.float32)
        if depth_metrics is not None:
            try:
                valid = np.isfinite(pred) & np.isfinite(gt) & (gt > 0)
                result = depth_metrics(np.where(valid, pred, 0.0), np.where(valid, gt, 0.0))
                per_frame.append({k: float(v) for k, v in dict(result).items()
                                  if isinstance(v, (int, float, np.floating))})
                continue
            except (TypeError, ValueError):
                pass
        per_frame.append(_fallback_metrics(pred, gt))
    keys = per_frame[0].keys() if per_frame else ()
    return {key: float(np.nanmean([frame.get(key, np.nan) for frame in per_frame])) for key in keys}


def engine_latency(engine: DepthEngine, frames: Sequence[np.ndarray], runs: int, warmup: int) -> dict[str, float]:
    """Inference-only median and p95, and whole-call median (ms) of ``engine.predict`` cycling over ``frames``."""
    for index in range(warmup):
        engine.predict(frames[index % len(frames)])
    infer, total = [], []
    for index in range(runs):
        engine.predict(frames[index % len(frames)])
        infer.append(engine.last_latency_ms)
        total.append(engine.last_total_ms)
    return {"median_ms": float(np.median(infer)), "p95_ms": float(np.percentile(infer, 95)),
            "total_median_ms": float(np.median(total))}


def compare_int8(fp32_path: str | os.PathLike, int8_path: str | os.PathLike, images: Sequence[np.ndarray],
                 depths: Sequence[np.ndarray] | None = None, threads: int = 2, runs: int = 30,
                 warmup: int = 5) -> dict[str, Any]:
    """Latency (on this CPU), file size, fp32-vs-int8 agreement and, with ``depths``, depth metrics of both."""
    frames = [np.asarray(frame) for frame in images]
    if not frames:
        raise ValueError("compare_int8 needs at least one image")
    if depths is not None and len(depths) != len(frames):
        raise ValueError(f"got {len(frames)} images but {len(depths)} depth maps")
    engines = {"fp32": OnnxDepthEngine(fp32_path, threads=threads), "int8": OnnxDepthEngine(int8_path, threads=threads)}
    report: dict[str, Any] = {"threads": threads, "runs": runs}
    preds: dict[str, list[np.ndarray]] = {}
    for label, engine in engines.items():
        path = Path(fp32_path if label == "fp32" else int8_path)
        preds[label] = [engine.predict(frame) for frame in frames]
        report[label] = {"size_bytes": path.stat().st_size, **engine_latency(engine, frames, runs, warmup)}
        if depths is not None:
            report[label]["metrics"] = _depth_metrics(preds[label], list(depths))
    fp32 = np.concatenate([p.ravel() for p in preds["fp32"]])
    int8 = np.concatenate([p.ravel() for p in preds["int8"]])
    both = np.isfinite(fp32) & np.isfinite(int8)
    diff = np.abs(fp32[both] - int8[both])
    report["agreement"] = {
        "max_abs_diff_m": float(diff.max()) if diff.size else float("nan"),
        "mean_abs_diff_m": float(diff.mean()) if diff.size else float("nan"),
        "mean_rel_diff": float(np.mean(diff / np.maximum(fp32[both], 1e-6))) if diff.size else float("nan"),
        "correlation": float(np.corrcoef(fp32[both], int8[both])[0, 1]) if diff.size > 1 else float("nan"),
        "valid_fraction_fp32": float(np.isfinite(fp32).mean()),
        "valid_fraction_int8": float(np.isfinite(int8).mean()),
    }
    report["speedup"] = report["fp32"]["median_ms"] / max(report["int8"]["median_ms"], 1e-9)
    report["size_ratio"] = report["int8"]["size_bytes"] / max(report["fp32"]["size_bytes"], 1)
    return report


def keep_int8(report: Mapping[str, Any], max_absrel_increase: float = 0.01) -> tuple[bool, str]:
    """Keep the int8 model only if it is faster or smaller AND its absrel rises by at most ``max_absrel_increase``.

    "Faster" means a median speed-up above 1.05x, "smaller" a file under 0.9x the fp32 one.
    Without ground-truth metrics the mean relative fp32-vs-int8 difference stands in for the absrel increase.
    """
    faster = report["speedup"] > 1.05
    smaller = report["size_ratio"] < 0.9
    gain = (f"{report['speedup']:.2f}x speed, {report['size_ratio']:.2f}x size "
            f"({report['fp32']['median_ms']:.1f} -> {report['int8']['median_ms']:.1f} ms)")
    fp32_absrel = report["fp32"].get("metrics", {}).get("absrel")
    int8_absrel = report["int8"].get("metrics", {}).get("absrel")
    if fp32_absrel is not None and int8_absrel is not None and math.isfinite(fp32_absrel + int8_absrel):
        increase, basis = int8_absrel - fp32_absrel, f"absrel {fp32_absrel:.4f} -> {int8_absrel:.4f}"
    else:
        increase, basis = report["agreement"]["mean_rel_diff"], "no ground truth; mean relative fp32/int8 difference"
    accuracy = f"{basis} (+{increase:.4f}, allowed +{max_absrel_increase})"
    if not (faster or smaller):
        return False, f"int8 is neither faster nor smaller: {gain}"
    if not math.isfinite(increase) or increase > max_absrel_increase:
        return False, f"int8 loses too much accuracy: {accuracy}"
    return True, f"int8 kept: {gain}; {accuracy}"


# --------------------------------------------------------------------------------------------- model card


def model_info(checkpoint: str | os.PathLike | tuple[nn.Module, Mapping[str, Any]]) -> dict[str, object]:
    """``params`` and ``flops`` of a checkpoint's network (a path or the ``(model, meta)`` it loads into) for its
    model card; empty when they cannot be counted."""
    from forest_perception.models.networks import count_flops, count_parameters

    model, meta = resolve_model(checkpoint)
    info: dict[str, object] = {}
    try:
        info["params"] = count_parameters(model)
        info["flops"] = count_flops(model, meta["input_hw"])
    except (RuntimeError, ValueError):
        pass
    return info


__all__ = [
    "ExportVerificationError",
    "compare_int8",
    "export_onnx",
    "input_layers",
    "iter_calibration_images",
    "keep_int8",
    "model_info",
    "quantize_int8",
    "remove_model_files",
    "resolve_model",
    "set_metadata",
    "update_model_card",
    "verify_onnx",
    "write_model_card",
]
