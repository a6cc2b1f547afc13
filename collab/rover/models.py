"""Global models handed from the rover's Flower ClientApp to its collab_node: the drop folder's file format.

``<drop dir>/global-r<round>.npz`` holds the named arrays and a JSON header (round, architecture keys);
it is written under a hidden name and moved into place, so a reader never sees half a file. A training
checkpoint ``global-r<round>.pt`` is read too. See ``docs/federated.md`` ("The rover's collab_node").
"""

from __future__ import annotations

import io
import json
import os
import re
import time
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from forest_perception.collab.rover.files import json_clean, write_bytes_atomic

if TYPE_CHECKING:  # torch is imported only by the functions that need it
    from forest_perception.collab.flower.task import TaskConfig

DROP_FORMAT = "forest-global-model/1"
DROP_PATTERN = re.compile(r"^global-r(\d+)\.(npz|pt|onnx)$")
TASK_META_KEYS = ("model", "model-kwargs", "base-channels", "input-height", "input-width", "min-depth", "max-depth",
                  "dcccl-mimic", "dcccl-small-channels")
"""Run-config keys a dropped model carries so the rover can rebuild its network (and ``normalisation``); a dc-ccl
model also names the rover's mimic file and carries its ``mimic-version``."""


@dataclass
class GlobalModel:
    """A depth model as named arrays (``state_dict`` float entries in order) with what rebuilds its network."""

    round: int | None
    names: list[str]
    arrays: list[np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)  # TASK_META_KEYS and free-form facts (source, ...)
    source: str = ""  # file or store it came from

    @property
    def onnx(self) -> str:
        """The ONNX file of an already exported model (a dc-ccl cloud model for the base station), else ""."""
        return str(self.meta.get("onnx", ""))

    def task_config(self, base: TaskConfig) -> TaskConfig:
        """``base`` (the rover's training settings) with this model's architecture and depth range."""
        return task_from_meta(self.meta, base)


def task_meta(config: TaskConfig) -> dict[str, Any]:
    """The architecture part of a task config in run-config spelling, and the image normalisation it was trained
    with (what a dropped model carries)."""
    from forest_perception.collab.flower.network import image_normalisation

    run_config = config.run_config()
    mean, std = image_normalisation()
    meta = {
        "model": config.model,
        "model-kwargs": run_config["model-kwargs"],
        "base-channels": int(config.base_channels),
        "input-height": int(config.input_hw[0]),
        "input-width": int(config.input_hw[1]),
        "min-depth": float(config.min_depth),
        "max-depth": float(config.max_depth),
        "normalisation": {"mean": mean, "std": std},
    }
    if config.dcccl_mimic:
        from forest_perception.collab.dcccl import read_part

        meta.update({"dcccl-mimic": str(config.dcccl_mimic), "dcccl-small-channels": int(config.dcccl_small_channels),
                     "mimic-version": read_part(config.dcccl_mimic, "mimic").version})
    return meta


def task_from_meta(meta: Mapping[str, Any], base: TaskConfig) -> TaskConfig:
    """``base`` overridden by the architecture keys present in ``meta``; ``ValueError`` naming a bad value.

    A model of another network than ``base``'s without ``model-kwargs`` gets that network's defaults; one trained
    with another image normalisation than the task's is refused naming both.
    """
    from dataclasses import replace

    from forest_perception.collab.flower.network import normalisation_problem, parse_model_kwargs

    problem = normalisation_problem(meta.get("normalisation"), "the model")
    if problem:
        raise ValueError(problem)
    height = meta.get("input-height", base.input_hw[0])
    width = meta.get("input-width", base.input_hw[1])
    model = str(meta.get("model", base.model))
    try:
        if "model-kwargs" in meta:
            kwargs = parse_model_kwargs(str(meta["model-kwargs"]))
        else:
            kwargs = dict(base.model_kwargs) if model == base.model else {}
        if "base-channels" in meta and model == "autoencoder":
            kwargs["base_channels"] = int(meta["base-channels"])
        config = replace(
            base,
            model=model,
            model_kwargs=kwargs,
            base_channels=int(kwargs.get("base_channels", base.base_channels)),
            input_hw=(int(height), int(width)),
            min_depth=float(meta.get("min-depth", base.min_depth)),
            max_depth=float(meta.get("max-depth", base.max_depth)),
            dcccl_mimic=str(meta.get("dcccl-mimic", "")),
            dcccl_small_channels=int(meta.get("dcccl-small-channels", base.dcccl_small_channels)),
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"model meta {dict((k, meta.get(k)) for k in TASK_META_KEYS)} is not usable: {exc}") from None
    return config.validate()


def global_model_name(server_round: int, suffix: str = "npz") -> str:
    """File name of the global model after ``server_round`` in a drop directory."""
    return f"global-r{int(server_round):06d}.{suffix}"


def write_global_model_file(path: str | os.PathLike, model: GlobalModel) -> Path:
    """Write ``model`` to exactly ``path`` (``.npz``, the drop format), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": DROP_FORMAT, "round": model.round, "names": list(model.names),
              "meta": json_clean(dict(model.meta)), "written": time.time()}
    buffer = io.BytesIO()
    np.savez(buffer, header=np.array(json.dumps(header)),
             **{f"t{i:05d}": np.ascontiguousarray(a) for i, a in enumerate(model.arrays)})
    write_bytes_atomic(path, buffer.getvalue())
    return path


def write_global_model(
    drop_dir: str | os.PathLike,
    server_round: int,
    names: Sequence[str],
    arrays: Sequence[np.ndarray],
    meta: Mapping[str, Any] | None = None,
    keep: int = 5,
) -> Path:
    """Write ``global-r<round>.npz`` into ``drop_dir`` atomically; keep the newest ``keep`` drops (0: all)."""
    if isinstance(server_round, bool) or not isinstance(server_round, (int, np.integer)) or server_round < 0:
        raise ValueError(f"server_round must be a non-negative integer, got {server_round!r}")
    names = [str(n) for n in names]
    if len(names) != len(arrays):
        raise ValueError(f"global model of round {server_round}: {len(names)} names for {len(arrays)} arrays")
    if len(set(names)) != len(names):
        raise ValueError(f"global model of round {server_round}: tensor names repeat")
    drop = Path(drop_dir)
    path = write_global_model_file(
        drop / global_model_name(server_round), GlobalModel(int(server_round), names, list(arrays), dict(meta or {}))
    )
    if keep > 0:
        for old in list_global_models(drop)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def list_global_models(drop_dir: str | os.PathLike) -> list[Path]:
    """``global-r<round>.npz|pt`` files in ``drop_dir``, oldest round first (hidden/temporary files ignored)."""
    drop = Path(drop_dir)
    if not drop.is_dir():
        return []
    found = []
    for path in drop.iterdir():
        match = DROP_PATTERN.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path.suffix == ".npz", path))
    return [p for _, _, p in sorted(found)]


class _BadDropError(ValueError):
    """A drop file whose content is wrong (message complete, naming the file)."""


def read_global_model_file(path: Path) -> GlobalModel:
    """A model written by :func:`write_global_model_file` (``ValueError`` naming the file and the problem)."""
    where = f"global model {str(path)!r}"
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not hasattr(archive, "files"):
                raise _BadDropError(f"{where} is a single array, not an archive written by write_global_model")
            if "header" not in archive.files:
                raise _BadDropError(f"{where} has no header entry; expected a file written by write_global_model")
            header = json.loads(str(archive["header"]))
            if not isinstance(header, dict) or header.get("format") != DROP_FORMAT:
                raise _BadDropError(f"{where}: format {header.get('format') if isinstance(header, dict) else header!r},"
                               f" expected {DROP_FORMAT!r}")
            names = header.get("names")
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise _BadDropError(f"{where}: header names must be a list of tensor names")
            keys = [f"t{i:05d}" for i in range(len(names))]
            missing = [k for k in keys if k not in archive.files]
            if missing:
                raise _BadDropError(f"{where}: {len(names)} names but tensors {missing[:3]} are missing")
            arrays = [archive[k] for k in keys]
    except _BadDropError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError, zlib.error) as exc:
        # numpy says ValueError ("pickled data") for a file that is no archive at all
        raise ValueError(f"{where} is not readable: {type(exc).__name__}: {str(exc)[:200]}") from None
    for name, array in zip(names, arrays):
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"{where}: tensor {name!r} has dtype {array.dtype}, expected floating point")
    server_round = header.get("round")
    if server_round is not None and (not isinstance(server_round, int) or server_round < 0):
        raise ValueError(f"{where}: round must be a non-negative integer, got {server_round!r}")
    meta = header.get("meta") or {}
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: meta must be a JSON object, got {type(meta).__name__}")
    return GlobalModel(server_round, list(names), arrays, meta, str(path))


def _read_checkpoint(path: Path, server_round: int | None) -> GlobalModel:
    from forest_perception.collab.flower.network import complete_kwargs, kwargs_text, normalisation_problem
    from forest_perception.collab.flower.task import get_arrays
    from forest_perception.models.torch_engine import load_torch_checkpoint

    try:
        model, meta = load_torch_checkpoint(path)
    except ValueError as exc:  # ModelLoadError names the path
        raise ValueError(str(exc)) from None
    problem = normalisation_problem(meta.get("normalisation"), f"checkpoint {str(path)!r}")
    if problem:
        raise ValueError(problem)
    names, arrays = get_arrays(model)
    name = str(meta["model_name"])
    kwargs = complete_kwargs(name, dict(meta.get("model_kwargs") or {}), f"checkpoint {str(path)!r}: model_kwargs")
    height, width = (int(v) for v in meta["input_hw"])
    task = {"model": name, "model-kwargs": kwargs_text(kwargs), "input-height": height, "input-width": width}
    if "base_channels" in kwargs:
        task["base-channels"] = int(kwargs["base_channels"])
    for key, meta_key in (("min-depth", "min_depth"), ("max-depth", "max_depth")):
        if meta.get(meta_key) is not None:
            task[key] = float(meta[meta_key])
    return GlobalModel(server_round, names, arrays, {**task, "checkpoint": str(path)}, str(path))


def read_candidate(path: str | os.PathLike) -> GlobalModel:
    """A dropped global model (``.npz`` of :func:`write_global_model` or a training checkpoint ``.pt``).

    Raises ``ValueError`` naming the file and what is wrong with it.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"global model {str(path)!r} does not exist")
    match = DROP_PATTERN.match(path.name)
    file_round = int(match.group(1)) if match else None
    if path.suffix == ".npz":
        model = read_global_model_file(path)
        if file_round is not None and model.round is not None and model.round != file_round:
            raise ValueError(f"global model {str(path)!r}: file name says round {file_round}, header {model.round}")
        model.round = model.round if model.round is not None else file_round
        return model
    if path.suffix in (".pt", ".pth"):
        return _read_checkpoint(path, file_round)
    if path.suffix == ".onnx":
        return _read_onnx(path, file_round)
    raise ValueError(f"global model {str(path)!r}: unknown suffix {path.suffix!r}; expected .npz, .pt or .onnx")


def _read_onnx(path: Path, server_round: int | None) -> GlobalModel:
    """An exported model (no arrays): gated as it is, on its own metadata (``ValueError`` if it is no depth model)."""
    from forest_perception.inference import read_onnx_metadata

    try:
        meta = dict(read_onnx_metadata(path))
    except Exception as exc:  # noqa: BLE001 - any unreadable file is refused with its reason
        raise ValueError(f"global model {str(path)!r} is not a readable ONNX model: {str(exc)[:200]}") from None
    if "input_hw" not in meta:
        raise ValueError(f"global model {str(path)!r} has no input_hw in its metadata: not a forest_perception export")
    return GlobalModel(server_round, [], [], {"onnx": str(path), "version": meta.get("version", ""),
                                              "model_name": meta.get("model_name", "")}, str(path))
