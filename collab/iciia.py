"""ICIIA on the cloud: train the history module once on the cloud's forest sequences, export the rover model, and
hand it to rovers' drop folders, where ``collab_node``'s gate scores it on each rover's held-out segments (fed in
frame order, so the history builds up as on the rover) before ``depth_node`` runs it.

What ``forest-fl iciia train`` runs. The module is trained once and used on every rover with no further training;
Flower rounds of algorithm ``iciia`` (:mod:`forest_perception.collab.flower.iciia_round`) only score it on the rovers.
The pure parts are in :mod:`forest_perception.models.iciia`; set-up and figures: ``docs/collaborative.md`` ("ICIIA").
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from forest_perception.models import iciia
from forest_perception.models.iciia import IciiaSpec, TrainSettings


def load_sequences(folders: Sequence[str | os.PathLike], input_hw: Sequence[int], min_depth: float, max_depth: float,
                   max_frames: int = 2000) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(images Nx3xHxW, depth Nx1xHxW)`` per segment of ``folders`` (forest layout), frames in recording order;
    at most ``max_frames`` frames in all (whole segments, first come). ``ValueError`` naming missing folders."""
    from forest_perception.models.data import ForestDepthDataset

    sources = [Path(f) for f in folders]
    missing = [str(f) for f in sources if not f.is_dir()]
    if missing:
        raise ValueError(f"cloud data folder(s) {', '.join(missing)} do not exist")
    data = ForestDepthDataset(sources, input_hw=tuple(int(v) for v in input_hw), min_depth=min_depth,
                              max_depth=max_depth)
    by_segment: dict[int, list[int]] = {}
    for position, (segment, _frame) in enumerate(data.index):
        by_segment.setdefault(segment, []).append(position)
    sequences, total = [], 0
    for positions in by_segment.values():
        if total + len(positions) > max_frames:
            break
        items = [data[p] for p in positions]
        sequences.append((torch.stack([i["image"] for i in items]), torch.stack([i["depth"] for i in items])))
        total += len(positions)
    if not sequences:
        raise ValueError(f"no frames found in {', '.join(str(s) for s in sources)} (forest layout Run-N/<segment>/)")
    return sequences


def train_from_folders(spec: IciiaSpec, folders: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                       settings: TrainSettings | None = None, max_frames: int = 2000, exporter: str = "dynamo",
                       command: str = "", progress: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Train the module of ``spec`` on the cloud's sequences, write ``iciia.pt`` (the module) and ``iciia_rover.onnx``
    (the rover graph, with its card) under ``out_dir``, and ``iciia.json`` (summary). Returns the summary."""
    settings = settings or TrainSettings()
    started = time.perf_counter()
    model, base_meta = iciia.build(spec, seed=settings.seed)
    hw = base_meta["input_hw"]
    sequences = load_sequences(folders, hw, float(base_meta["min_depth"]), float(base_meta["max_depth"]), max_frames)
    load_s = time.perf_counter() - started
    result = iciia.train(model, sequences, spec.bank_capacity, settings, float(base_meta["min_depth"]),
                         float(base_meta["max_depth"]), progress)
    out = Path(out_dir)
    flops = iciia.iciia_flops(model, hw, spec.bank_capacity)
    summary: dict[str, Any] = {
        "spec": asdict(spec), "settings": asdict(settings), "base_version": base_meta["version"],
        "folders": [Path(f).name for f in folders], "load_s": load_s, **result, "flops": flops,
        "flops_overhead": flops["iciia"] / flops["base"], "command": command,
    }
    module = iciia.save_module(model, spec, base_meta, out / "iciia.pt", summary)
    summary["module"], summary["module_version"] = str(module), iciia.module_version(model)
    rover = iciia.export_rover_model(model, spec, base_meta, out / "iciia_rover.onnx", exporter=exporter,
                                     command=command)
    summary["rover_model"] = str(rover)
    (out / "iciia.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def export_from_module(module: str | os.PathLike, out_path: str | os.PathLike, exporter: str = "dynamo",
                       command: str = "") -> Path:
    """Export the rover graph of a saved module (its base must still be the one it was trained on)."""
    model, spec, _record = iciia.load_module(module)
    _base, base_meta = iciia.load_base(spec.base)
    return iciia.export_rover_model(model, spec, base_meta, out_path, exporter=exporter, command=command)


def drop_rover_model(onnx_path: str | os.PathLike, drop_dirs: Sequence[str | os.PathLike]) -> list[Path]:
    """Copy the rover model into each rover's drop folder (``global-r<N>.onnx``, the next round number there), where
    its collab_node gates it on the rover's held-out segments like any global model."""
    from forest_perception.collab.dcccl_cloud import drop_cloud_model

    return [drop_cloud_model(onnx_path, folder) for folder in drop_dirs]


__all__ = ["drop_rover_model", "export_from_module", "load_sequences", "train_from_folders"]
