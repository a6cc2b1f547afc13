"""Evaluation of a trained depth network on forest dataset folders: metric table and example pictures.

``evaluate(checkpoint_or_model, data)`` runs the model over every frame of the given
roots/segments at the model's input size, accumulates the standard depth metrics
(``forest_perception.models.metrics``) per segment and overall, prints the table and, with ``out``, writes
``metrics.json``, ``metrics.csv`` and example pictures ``RGB | GT depth | predicted depth |
abs error`` (colourised; invalid ground truth black) to that folder.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn
from torch.nn import functional
from torch.utils.data import DataLoader
from tqdm import tqdm

from forest_perception.models.data import MIN_DEPTH_M, ForestDepthDataset, FrameLoadError, denormalise_image
from forest_perception.models.trainer import load_checkpoint, resolve_device, worker_error_message
from forest_perception.sim.preview import colorize_depth

OVERALL = "all"


def colorize_error(error_m: np.ndarray, valid: np.ndarray, max_error_m: float) -> np.ndarray:
    """RGB uint8 picture of an absolute depth error (inferno, black = 0 or no ground truth)."""
    scaled = np.clip(error_m / max(max_error_m, 1e-6), 0.0, 1.0)
    scaled = (255 * np.nan_to_num(scaled)).astype(np.uint8)
    rgb = cv2.cvtColor(cv2.applyColorMap(scaled, cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB)
    rgb[~valid] = 0
    return rgb


def _label(image: np.ndarray, text: str, origin: tuple[int, int]) -> None:
    # white on a black outline: readable on every colour map
    for colour, thickness in (((0, 0, 0), 3), ((255, 255, 255), 1)):
        cv2.putText(image, text, origin, cv2.FONT_HERSHEY_SIMPLEX, 0.35, colour, thickness, cv2.LINE_AA)


def example_picture(
    rgb: np.ndarray, depth_gt: np.ndarray, depth_pred: np.ndarray, valid: np.ndarray, max_depth: float, label: str = ""
) -> np.ndarray:
    """One row ``RGB | GT depth | predicted depth | abs error`` as an RGB uint8 image."""
    gt = np.where(valid, depth_gt, np.nan).astype(np.float32)
    error = np.where(valid, np.abs(depth_pred - depth_gt), 0.0).astype(np.float32)
    tiles = [
        rgb,
        colorize_depth(gt, max_depth),
        colorize_depth(depth_pred.astype(np.float32), max_depth),
        colorize_error(error, valid, max_error_m=0.25 * max_depth),
    ]
    names = ["rgb", "ground truth", "prediction", f"abs error (0-{0.25 * max_depth:g} m)"]
    for tile, name in zip(tiles, names):
        _label(tile, name, (4, 12))
    row = np.hstack(tiles)
    if label:
        _label(row, label, (4, row.shape[0] - 6))
    return row


@contextlib.contextmanager
def _clean_frame_errors() -> Iterator[None]:
    """A frame that cannot be read: its one-line message, without a DataLoader worker's traceback text."""
    try:
        yield
    except FrameLoadError as exc:
        raise FrameLoadError(worker_error_message(exc)) from exc


def _accumulator(min_depth: float, max_depth: float) -> object:
    from forest_perception.models.metrics import MetricAccumulator

    return MetricAccumulator(min_depth=min_depth, max_depth=max_depth)


def evaluate(
    model: nn.Module | str | os.PathLike,
    data: str | os.PathLike | Iterable,
    max_depth: float | None = None,
    min_depth: float | None = None,
    input_hw: Sequence[int] | None = None,
    out: str | os.PathLike | None = None,
    batch_size: int = 8,
    num_examples: int = 8,
    device: str = "cpu",
    workers: int = 0,
    progress: bool = True,
    name: str | None = None,
) -> dict:
    """Depth metrics of a checkpoint (path) or model over ``data``; prints the metric table.

    Depth range and input size default to the checkpoint's (``input_hw`` is required for a
    bare model). Returns ``{"metrics": overall, "per_segment": {id: metrics}, "frames": n,
    "table": text, "examples": [paths]}``.
    """
    from forest_perception.models.metrics import format_metric_table

    torch_device = resolve_device(device)
    if isinstance(model, (str, os.PathLike)):
        checkpoint_path = Path(model)
        model, ckpt = load_checkpoint(checkpoint_path, torch_device)
        input_hw = input_hw or tuple(ckpt["input_hw"])
        max_depth = max_depth if max_depth is not None else float(ckpt.get("max_depth", 10.0))
        min_depth = min_depth if min_depth is not None else float(ckpt.get("min_depth", MIN_DEPTH_M))
        name = name or f"{ckpt['model_name']} ({checkpoint_path.name}, epoch {ckpt.get('epoch', '?')})"
    else:
        if input_hw is None:
            raise ValueError("input_hw is needed to evaluate a model object (a checkpoint records it)")
        model = model.to(torch_device)
        name = name or type(model).__name__
    max_depth = 10.0 if max_depth is None else float(max_depth)
    min_depth = MIN_DEPTH_M if min_depth is None else float(min_depth)
    if not 0 < min_depth < max_depth:
        raise ValueError(f"--min-depth {min_depth:g} must be below --max-depth {max_depth:g} (each the checkpoint's "
                         "unless given)")

    dataset = ForestDepthDataset(data, input_hw=input_hw, augment=False, max_depth=max_depth, min_depth=min_depth)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    # spread the example pictures over the whole set rather than its first segment
    example_ids = set(np.linspace(0, len(dataset) - 1, min(num_examples, len(dataset))).round().astype(int).tolist())
    overall = _accumulator(min_depth, max_depth)
    per_segment: dict[str, object] = {}
    examples: list[tuple[int, np.ndarray]] = []
    model.eval()
    with torch.no_grad(), _clean_frame_errors():
        for batch in tqdm(loader, desc="eval", disable=not progress, dynamic_ncols=True):
            pred = model(batch["image"].to(torch_device))
            target = batch["depth"].to(torch_device)
            if pred.shape[-2:] != target.shape[-2:]:
                pred = functional.interpolate(pred, size=target.shape[-2:], mode="bilinear", align_corners=False)
            overall.update(pred, target)
            for j, segment_id in enumerate(batch["segment"]):
                acc = per_segment.setdefault(segment_id, _accumulator(min_depth, max_depth))
                acc.update(pred[j : j + 1], target[j : j + 1])
                index = int(batch["index"][j])
                if out is not None and index in example_ids:
                    picture = example_picture(
                        denormalise_image(batch["image"][j]),
                        batch["depth"][j, 0].numpy(),
                        pred[j, 0].float().cpu().numpy(),
                        batch["valid"][j, 0].numpy(),
                        max_depth,
                        label=f"{segment_id}/{batch['stem'][j]}",
                    )
                    examples.append((index, picture))

    metrics = {k: float(v) for k, v in overall.result().items()}
    segment_metrics = {sid: {k: float(v) for k, v in acc.result().items()} for sid, acc in per_segment.items()}
    rows = {f"segment {sid}": m for sid, m in segment_metrics.items()} if len(per_segment) > 1 else {}
    rows[f"{name}: {OVERALL} ({len(dataset)} frames)"] = metrics
    table = format_metric_table(rows)
    if progress:
        print(f"model: {name}; data: {dataset.describe()}; depth {min_depth:g}-{max_depth:g} m")
    print(table)

    result = {"metrics": metrics, "per_segment": segment_metrics, "frames": len(dataset), "table": table,
              "examples": []}
    if out is not None:
        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        for index, picture in sorted(examples, key=lambda e: e[0]):
            path = out_dir / f"example_{index:05d}.png"
            if not cv2.imwrite(str(path), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR)):
                raise OSError(f"cannot write the example picture {path}")
            result["examples"].append(str(path))
        (out_dir / "metrics.json").write_text(json.dumps(
            {"model": name, "frames": len(dataset), "min_depth": min_depth, "max_depth": max_depth,
             "metrics": metrics, "per_segment": segment_metrics}, indent=2) + "\n")
        with open(out_dir / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["segment", *metrics])
            writer.writeheader()
            for sid, m in segment_metrics.items():
                writer.writerow({"segment": sid, **m})
            writer.writerow({"segment": OVERALL, **metrics})
        if progress:
            print(f"wrote {len(result['examples'])} example picture(s) and metrics to {out_dir}")
    return result
