"""Depth metrics of models on several dataset folders at once (``forest-train eval-styles``): one row per folder.

Each model (an ``.onnx`` or ``.pt`` file, or a shipped name, which opens the shipped ONNX model the rover runs) goes
through ``models.torch_engine.load_engine`` and predicts the full camera frames as on the rover (resized to its
input, depth upsampled back, NaN outside its range); the metrics pool every valid pixel of a folder. The worst
folder is the one with the highest absrel. With ``tilts`` every folder is scored again with the camera tilted up or
down by each angle (``models.data.pitch_pair``), which shows how much a camera mounted a few degrees off costs.
Writes ``styles.json``, ``styles.csv`` and ``styles.png`` (bars per folder; ``tilt.png`` with tilts).
docs/training.md, "Evaluating on forest styles".
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from forest_perception.cli_args import describe_error
from forest_perception.dataset_tools.layout import load_frame
from forest_perception.dataset_tools.settings import DatasetSettings
from forest_perception.frames import CAMERA_HFOV_DEG
from forest_perception.models import bootstrap
from forest_perception.models.data import MAX_PITCH_DEG, FrameLoadError, collect_segments, pitch_pair
from forest_perception.models.metrics import METRIC_NAMES, MetricAccumulator, format_metric_table
from forest_perception.models.weights import shipped_model, shipped_models

MODEL_SUFFIXES = (".onnx", ".pt", ".pth")
WORST_BY = "absrel"


def resolve_model_file(text: str | os.PathLike) -> Path:
    """A model file (``.onnx``, ``.pt``, ``.pth``) or a shipped model name (-> its ONNX file); ``ValueError`` else."""
    text = str(text)
    path = Path(text)
    if path.is_file():
        if path.suffix.lower() not in MODEL_SUFFIXES:
            raise ValueError(f"model {text!r} is neither ONNX (.onnx) nor a PyTorch checkpoint (.pt, .pth)")
        return path
    if path.is_dir():
        raise ValueError(f"model {text!r} is a folder; give a .onnx or .pt file or a shipped model name")
    try:
        return shipped_model(text)
    except FileNotFoundError:
        raise ValueError(f"model {text!r} is neither a model file nor a shipped model; shipped: "
                         f"{', '.join(shipped_models())}") from None


def folder_labels(folders: Sequence[str | os.PathLike]) -> list[str]:
    """Short unique names for the folders: their last path parts, as many as tell them apart."""
    parts = [Path(os.path.abspath(f)).parts for f in folders]
    for depth in range(1, max((len(p) for p in parts), default=1) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(f) for f in folders]


def _frames(folder: str | os.PathLike, settings: DatasetSettings | None, max_frames: int) -> list[tuple[Any, int]]:
    index = [(segment, i) for segment in collect_segments(folder, settings) for i in range(len(segment))]
    if not index:
        raise ValueError(f"dataset folder {folder} holds no frames")
    if max_frames and len(index) > max_frames:
        picks = np.unique(np.linspace(0, len(index) - 1, max_frames).round().astype(int))
        index = [index[i] for i in picks]
    return index


def evaluate_folder(engine: Any, frames: Sequence[tuple[Any, int]], min_depth: float, max_depth: float,
                    progress: bool = False, label: str = "", tilt_deg: float = 0.0,
                    hfov_deg: float = CAMERA_HFOV_DEG) -> dict[str, float]:
    """Pooled metrics of ``engine`` on full camera frames ``(segment, index)``, with frames and median latency.

    ``tilt_deg`` != 0 first tilts every frame and its depth as a camera pitched that much further nose-down (negative:
    up) would see it, with ``hfov_deg`` its horizontal field of view; the rows from outside the frame are not scored.
    ``absrel_lo``/``absrel_hi`` and ``delta1_lo``/``delta1_hi`` bound a 90 % interval from a bootstrap over the
    folder's ``segments`` (``models.bootstrap``): what other forests of the same kind could have scored.
    """
    accumulator = MetricAccumulator(min_depth=min_depth, max_depth=max_depth)
    latency = []
    per_frame: list[tuple[int, float, float]] = []
    for segment, i in tqdm(frames, desc=label or "eval", disable=not progress, leave=False, dynamic_ncols=True):
        try:
            rgb, depth, _ = load_frame(segment, i)
        except (OSError, ValueError) as exc:
            raise FrameLoadError(f"frame {segment.frames[i].stem} of segment {segment.segment_id} ({segment.path}): "
                                 f"{describe_error(exc)}; fix or remove that frame") from exc
        if tilt_deg:
            rgb, depth = pitch_pair(rgb, depth, tilt_deg, hfov_deg)
        pred = engine.predict(rgb)
        latency.append(engine.last_latency_ms)
        per_frame.append(accumulator.update_frame(np.where(np.isfinite(pred), pred, max_depth),
                                                  np.nan_to_num(depth, nan=0.0)))
    labels = [str(segment.path) for segment, _ in frames]
    return {**accumulator.result(), **_interval(per_frame, labels), "frames": len(frames),
            "segments": len(set(labels)), "valid_pixels": accumulator.count, "latency_ms": float(np.median(latency))}


INTERVAL = (0.05, 0.95)
"""quantiles of the bootstrap interval that ``evaluate_folder`` reports (90 %)"""


def _interval(per_frame: Sequence[tuple[int, float, float]], labels: Sequence[str]) -> dict[str, float]:
    """absrel and delta1 bounds of a bootstrap over segments and their frames (NaN without a valid pixel)."""
    table = np.asarray(per_frame, dtype=np.float64).reshape(-1, 3)
    keep = table[:, 0] > 0
    if not keep.any():
        return dict.fromkeys(("absrel_lo", "absrel_hi", "delta1_lo", "delta1_hi"), float("nan"))
    codes = np.unique(np.asarray(labels), return_inverse=True)[1][keep]
    groups = bootstrap.resampling_groups(codes, int(keep.sum()))
    bounds = bootstrap.pooled_ratio_quantiles(table[keep, 1:].T, table[keep, 0], groups, INTERVAL)
    return {"absrel_lo": float(bounds[0, 0]), "absrel_hi": float(bounds[0, 1]),
            "delta1_lo": float(bounds[1, 0]), "delta1_hi": float(bounds[1, 1])}


def evaluate_styles(models: Sequence[str | os.PathLike], folders: Sequence[str | os.PathLike],
                    out: str | os.PathLike | None = None, max_frames: int = 0, threads: int = 2,
                    min_depth: float | None = None, max_depth: float | None = None,
                    settings: DatasetSettings | None = None, progress: bool = True,
                    tilts: Sequence[float] = (), hfov_deg: float = CAMERA_HFOV_DEG,
                    flip_average: bool = False) -> dict[str, Any]:
    """Metrics of every model on every folder; prints the table and, with ``out``, writes JSON, CSV and a chart.

    The depth range defaults to the first model's. Returns ``{"models": [{"model", "file", "version", "backend",
    "rows": [{"folder", "path", "frames", "tilt_deg", metrics...}], "worst": row, "tilted": [rows]}], "tilts",
    "min_depth", "max_depth", "table"}``. ``tilted`` holds a row per folder and angle of ``tilts`` (degrees,
    positive nose-down, each non-zero and within +-20); the worst folder is chosen on the untilted rows. With
    ``flip_average`` every model runs as depth_node's ``flip_average`` runs it (``FlipAveragedEngine``).
    """
    tilts = [float(t) for t in tilts]
    for tilt in tilts:
        if not (np.isfinite(tilt) and 0.0 < abs(tilt) <= MAX_PITCH_DEG):
            raise ValueError(f"--tilt {tilt:g}: each angle must be non-zero and within +-{MAX_PITCH_DEG:g} degrees")
    if len(set(tilts)) != len(tilts):
        raise ValueError(f"--tilt {' '.join(f'{t:g}' for t in tilts)}: an angle is given twice")
    from forest_perception.models.torch_engine import load_engine

    labels = folder_labels(folders)
    frames = {label: _frames(folder, settings, max_frames) for label, folder in zip(labels, folders)}
    engines = [(str(spec), load_engine(resolve_model_file(spec), threads=threads)) for spec in models]
    if flip_average:
        from forest_perception.depth_pipeline import FlipAveragedEngine

        engines = [(f"{spec} flip-averaged", FlipAveragedEngine(engine)) for spec, engine in engines]
    first = engines[0][1]
    min_depth = float(first.min_depth if min_depth is None else min_depth)
    max_depth = float(first.max_depth if max_depth is None else max_depth)
    if not 0 < min_depth < max_depth:
        raise ValueError(f"--min-depth {min_depth:g} must be above 0 and below --max-depth {max_depth:g} (each the "
                         "first model's unless given)")
    result: dict[str, Any] = {"min_depth": min_depth, "max_depth": max_depth, "tilts": tilts,
                              "flip_average": bool(flip_average), "models": []}
    tables = []
    for spec, engine in engines:
        rows = []
        for label, folder in zip(labels, folders):
            metrics = evaluate_folder(engine, frames[label], min_depth, max_depth, progress, f"{spec} on {label}")
            rows.append({"folder": label, "path": str(folder), "tilt_deg": 0.0, **metrics})
        tilted = [{"folder": label, "path": str(folder), "tilt_deg": tilt,
                   **evaluate_folder(engine, frames[label], min_depth, max_depth, progress,
                                     f"{spec} on {label} tilted {tilt:+g} deg", tilt, hfov_deg)}
                  for label, folder in zip(labels, folders) for tilt in tilts]
        scored = [row for row in rows if np.isfinite(row[WORST_BY])]
        worst = max(scored, key=lambda row: row[WORST_BY]) if scored else rows[0]
        result["models"].append({"model": spec, "file": str(getattr(engine, "path", "") or ""),
                                 "version": engine.model_version, "backend": engine.backend, "rows": rows,
                                 "worst": worst, "tilted": tilted})
        table_rows = {f"{row['folder']} ({row['frames']} frames)": row for row in rows}
        table_rows[f"worst by {WORST_BY}: {worst['folder']}"] = worst
        table_rows.update({f"{row['folder']} tilted {row['tilt_deg']:+g} deg": row for row in tilted})
        tables.append(f"{spec} ({engine.model_version}, {engine.backend}), depth {min_depth:g}-{max_depth:g} m\n"
                      + format_metric_table(table_rows).replace("| model |", "| folder |", 1) + "\n\n"
                      + _interval_table(rows))
    result["table"] = "\n\n".join(tables)
    print(result["table"])
    if out is not None:
        written = write_styles(result, out)
        if progress:
            print(f"wrote {', '.join(str(p) for p in written)}")
    return result


def _interval_table(rows: Sequence[dict[str, Any]]) -> str:
    """Each folder's absrel and delta1 with their 90 % bootstrap intervals over segments."""
    lines = ["| folder | segments | absrel (90 % interval over segments) | delta1 (90 % interval) |",
             "|---|---:|---|---|"]
    for row in rows:
        lines.append(f"| {row['folder']} | {row['segments']} | {row['absrel']:.3f} ({row['absrel_lo']:.3f}-"
                     f"{row['absrel_hi']:.3f}) | {row['delta1']:.3f} ({row['delta1_lo']:.3f}-{row['delta1_hi']:.3f}) |")
    return "\n".join(lines)


def write_styles(result: dict[str, Any], out: str | os.PathLike) -> list[Path]:
    """``styles.json``, ``styles.csv`` (one line per model, folder and tilt) and ``styles.png`` in ``out``; with
    tilts also ``tilt.png``."""
    from forest_perception.models.outputs import write_text_atomic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    saved = {key: value for key, value in result.items() if key != "table"}
    json_path = write_text_atomic(out / "styles.json", json.dumps(saved, indent=2, default=float) + "\n")
    columns = ["model", "folder", "path", "tilt_deg", "frames", "segments", *METRIC_NAMES, "absrel_lo", "absrel_hi",
               "delta1_lo", "delta1_hi", "valid_pixels", "latency_ms", "worst"]
    csv_path = out / "styles.csv"
    with open(csv_path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for entry in result["models"]:
            for row in entry["rows"]:
                writer.writerow({**row, "model": entry["model"], "worst": row["folder"] == entry["worst"]["folder"]})
            for row in entry.get("tilted", []):
                writer.writerow({**row, "model": entry["model"], "worst": False})
    written = [json_path, csv_path, plot_styles(result, out / "styles.png")]
    if result.get("tilts"):
        written.append(plot_tilts(result, out / "tilt.png"))
    return written


def plot_styles(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Bars of absrel and delta1 per folder, one bar per model, with their 90 % intervals over segments; each model's
    worst folder is outlined in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = result["models"]
    folders = [row["folder"] for row in entries[0]["rows"]]
    x = np.arange(len(folders))
    width = 0.8 / max(len(entries), 1)
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 1.2 * len(folders) + 4), 3.8))
    for ax, metric, arrow in ((axes[0], "absrel", "lower is better"), (axes[1], "delta1", "higher is better")):
        for k, entry in enumerate(entries):
            values = np.asarray([row[metric] for row in entry["rows"]])
            low = np.asarray([row.get(f"{metric}_lo", np.nan) for row in entry["rows"]])
            high = np.asarray([row.get(f"{metric}_hi", np.nan) for row in entry["rows"]])
            spread = np.nan_to_num(np.stack([values - low, high - values]), nan=0.0).clip(min=0.0)
            bars = ax.bar(x + (k - (len(entries) - 1) / 2) * width, values, width, label=Path(entry["model"]).name,
                          yerr=spread, capsize=2, error_kw={"elinewidth": 0.8})
            worst = folders.index(entry["worst"]["folder"])
            bars[worst].set_edgecolor("red")
            bars[worst].set_linewidth(2.0)
        ax.set_xticks(x, folders, rotation=30, ha="right")
        ax.set_title(f"{metric} ({arrow})")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.suptitle(f"depth {result['min_depth']:g}-{result['max_depth']:g} m; red outline: worst folder by {WORST_BY}; "
                 "whiskers: 90 % interval over segments")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def plot_tilts(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Absrel and delta1 against the camera's tilt: a row of two panels per model, a line per folder (0: the frames
    as recorded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = result["models"]
    folders = list(dict.fromkeys(row["folder"] for row in entries[0]["rows"]))
    fig, axes = plt.subplots(len(entries), 2, figsize=(11.0, 3.0 * len(entries) + 0.6), squeeze=False)
    for (ax_rel, ax_d1), entry in zip(axes, entries):
        rows = entry["rows"] + entry.get("tilted", [])
        for j, folder in enumerate(folders):
            line = sorted((row["tilt_deg"], row) for row in rows if row["folder"] == folder)
            for ax, metric in ((ax_rel, "absrel"), (ax_d1, "delta1")):
                ax.plot([t for t, _ in line], [row[metric] for _, row in line], marker="o", color=f"C{j % 10}",
                        linestyle="-" if j < 10 else "--", label=folder)
        for ax, metric, arrow in ((ax_rel, "absrel", "lower is better"), (ax_d1, "delta1", "higher is better")):
            ax.set_title(f"{Path(entry['model']).name}: {metric} ({arrow})", fontsize="medium")
            ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("camera tilt, degrees (positive: nose down)")
    axes[0][1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(f"depth {result['min_depth']:g}-{result['max_depth']:g} m with the camera tilted")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)
