"""A coordinator's global model as release files: ONNX (verified against PyTorch), model card and checkpoint."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from forest_perception.collab.flower.task import TaskConfig


def export_release_files(names: Sequence[str], arrays: Sequence[np.ndarray], task: TaskConfig,
                         out_onnx: str | os.PathLike, command: str, metrics: Mapping[str, float] | None = None,
                         notes: str = "", exporter: str = "dynamo") -> Path:
    """Write ``out_onnx`` with its card (``.json``/``.md``) and slim PyTorch checkpoint (``.pt``) for the network
    ``task`` describes holding ``arrays``; what ``forest-fl release create`` takes. ``ValueError`` if the arrays
    are not that network's."""
    import torch

    from forest_perception.collab.flower.network import image_normalisation
    from forest_perception.collab.rover.gate import build_network
    from forest_perception.collab.rover.models import GlobalModel, task_meta
    from forest_perception.models.checkpoints import save_checkpoint
    from forest_perception.models.export import export_onnx, write_model_card

    out_onnx = Path(out_onnx)
    out_onnx.parent.mkdir(parents=True, exist_ok=True)
    model = GlobalModel(None, list(names), [np.asarray(a) for a in arrays], task_meta(task), command)
    network, meta, config = build_network(model, task)
    meta["command"] = command
    meta["metrics"] = dict(metrics or {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation and tracer warnings
        export_onnx((network, meta), out_onnx, input_hw=config.input_hw, exporter=exporter,
                    export_command=command)
    mean, std = image_normalisation()
    checkpoint: dict[str, Any] = {
        "format": 1, "model_name": meta["model_name"], "model_kwargs": meta["model_kwargs"],
        "input_hw": list(config.input_hw), "normalisation": {"mean": list(mean), "std": list(std)},
        "min_depth": config.min_depth, "max_depth": config.max_depth,
        "model_state": {k: v.detach().cpu() for k, v in network.state_dict().items()},
        "command": command, "torch_version": torch.__version__,
    }
    save_checkpoint(checkpoint, out_onnx.with_suffix(".pt"))
    write_model_card(out_onnx, {"metrics": dict(metrics or {}), "notes": notes, "train_command": command})
    return out_onnx
