"""Which depth network a federated run trains: from the run config's architecture keys or an ``init`` checkpoint.

``init`` names a shipped network (``multiscale_160x128``, an ``_int8`` name gives its fp32 network) or a
``forest-train`` checkpoint file; the run then trains that network at its own input size from its weights.
Architecture keys left unset (``model`` "", ``model-kwargs`` "", ``base-channels``/``input-height``/
``input-width`` 0) come from it; keys that are set must agree with it, and its image normalisation must be
the one the task feeds. See ``docs/federated.md`` ("The real networks").
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

QUICK_MODEL = "autoencoder"
QUICK_BASE_CHANNELS = 4
QUICK_INPUT_HW = (64, 80)
"""The 27k-parameter network of quick tests: what a run without ``init`` and architecture keys trains."""

ARCHITECTURE_KEYS = ("model", "model-kwargs", "base-channels", "input-height", "input-width")
"""Run-config keys that define the network; the coordinator sends their resolved values with every message."""


@dataclass(frozen=True)
class Architecture:
    """A network as ``build_model`` takes it: name, complete constructor kwargs, input size (height, width)."""

    model: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    input_hw: tuple[int, int] = QUICK_INPUT_HW

    def describe(self) -> str:
        """``multiscale at 160x128 {hidden: 512, ...}``: what error messages name."""
        return f"{self.model} at {self.input_hw[1]}x{self.input_hw[0]} {json.dumps(self.kwargs, sort_keys=True)}"


def network_class(model: str) -> type:
    """The ``nn.Module`` class ``build_model(model, ...)`` builds; ``ValueError`` naming the known ones."""
    from forest_perception.models.networks import AutoEncoderDepth, MultiScaleDepth

    classes = {"autoencoder": AutoEncoderDepth, "multiscale": MultiScaleDepth}
    if model not in classes:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(classes)}")
    return classes[model]


@lru_cache(maxsize=8)
def _constructor_defaults(model: str) -> tuple[tuple[str, Any], ...]:
    parameters = inspect.signature(network_class(model).__init__).parameters
    return tuple((name, p.default) for name, p in parameters.items()
                 if name not in ("self", "input_hw") and p.kind is p.POSITIONAL_OR_KEYWORD)


def complete_kwargs(model: str, kwargs: Mapping[str, Any], where: str = "model kwargs") -> dict[str, Any]:
    """``kwargs`` with every constructor default of ``model`` made explicit (so two sides compare equal).

    ``ValueError`` naming ``where`` for a keyword the network does not take.
    """
    defaults = dict(_constructor_defaults(model))
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        raise ValueError(f"{where}: {model} takes no {', '.join(unknown)}; it takes {', '.join(sorted(defaults))}")
    missing = [name for name, value in defaults.items() if value is inspect.Parameter.empty and name not in kwargs]
    if missing:
        raise ValueError(f"{where}: {model} needs {', '.join(missing)}")
    return {**defaults, **dict(kwargs)}


def parse_model_kwargs(text: str) -> dict[str, Any]:
    """Run config ``model-kwargs``: a JSON object of numbers, strings and booleans ("" = none)."""
    if not str(text).strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"run config model-kwargs {text!r} is not JSON ({exc.msg}); write it like "
                         "'{\"base_channels\": 16}'") from None
    if not isinstance(value, dict) or not all(isinstance(v, (int, float, str, bool)) for v in value.values()):
        raise ValueError(f"run config model-kwargs {text!r} must be a JSON object of numbers, strings or booleans")
    return value


def kwargs_text(kwargs: Mapping[str, Any]) -> str:
    """``model-kwargs`` as the run config and the messages carry it (sorted JSON)."""
    return json.dumps(dict(kwargs), sort_keys=True)


# ---------------------------------------------------------------------------------------------- init checkpoints


@dataclass(frozen=True)
class InitCheckpoint:
    """An ``init`` checkpoint as read: its network, weights (travelling tensors) and where it came from."""

    init: str  # as given (a shipped name or a path)
    path: Path
    architecture: Architecture
    names: list[str]
    arrays: list[np.ndarray]
    weights_sha256: str
    min_depth: float | None = None
    max_depth: float | None = None


def init_path(init: str) -> Path:
    """The checkpoint file ``init`` names: an existing file, else a shipped network's checkpoint.

    ``FileNotFoundError`` naming ``init``, the shipped checkpoints and what to give otherwise.
    """
    from forest_perception.models.weights import shipped_checkpoint

    text = str(init).strip()
    path = Path(text).expanduser()
    if path.is_file():
        return path.resolve()
    if path.is_dir():
        raise FileNotFoundError(f"init {text!r} is a folder; give a checkpoint file (.pt) or a shipped network name")
    hint = "give a checkpoint written by `forest-train train` or a shipped network name"
    if "/" in text or path.suffix in (".pt", ".pth"):
        raise FileNotFoundError(f"init {text!r} does not exist; {hint}")
    try:
        return shipped_checkpoint(text)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"init {text!r} is neither a file nor a shipped network ({exc}); {hint}") from None


def image_normalisation() -> tuple[list[float], list[float]]:
    """(mean, std) the federated task feeds the network (that of ``forest_perception.models.data``)."""
    from forest_perception.models.data import image_normalisation as task_normalisation

    mean, std = task_normalisation()
    return [float(v) for v in mean], [float(v) for v in std]


def normalisation_problem(normalisation: object, where: str) -> str:
    """Why a checkpoint's ``normalisation`` (``{"mean": [...], "std": [...]}``) is not the task's ("" if it is)."""
    if normalisation is None:
        return ""  # older checkpoints carry none: they were trained with the task's (the only one there is)
    mean, std = image_normalisation()
    try:
        theirs_mean = [float(v) for v in normalisation["mean"]]
        theirs_std = [float(v) for v in normalisation["std"]]
    except (KeyError, TypeError, ValueError):
        return f"{where}: normalisation {normalisation!r} is not {{'mean': [r, g, b], 'std': [r, g, b]}}"
    if len(theirs_mean) != 3 or len(theirs_std) != 3 or not all(
            math.isclose(a, b, abs_tol=1e-6) for a, b in zip(theirs_mean + theirs_std, mean + std)):
        return (f"{where} was trained on images normalised with mean {theirs_mean} std {theirs_std}; the federated "
                f"task feeds mean {mean} std {std} (forest_perception.models.data.image_normalisation): fine-tune "
                "a network trained with that normalisation")
    return ""


@lru_cache(maxsize=4)
def _read_init_cached(init: str, path: str, stamp: tuple[int, int]) -> InitCheckpoint:
    from forest_perception.collab.flower.task import get_arrays
    from forest_perception.inference import ModelLoadError, weights_sha256
    from forest_perception.models.torch_engine import model_from_checkpoint, read_checkpoint_file

    where = f"init {init!r} ({path})" if init != path else f"init {path!r}"
    try:
        checkpoint = read_checkpoint_file(path)
        model, meta = model_from_checkpoint(checkpoint, path)
    except ModelLoadError as exc:
        raise ValueError(f"init {init!r}: {exc}") from None
    problem = normalisation_problem(checkpoint.get("normalisation"), where)
    if problem:
        raise ValueError(problem)
    name = str(meta["model_name"])
    input_hw = tuple(int(v) for v in meta["input_hw"])
    kwargs = complete_kwargs(name, dict(meta.get("model_kwargs") or {}), f"{where}: model_kwargs")
    names, arrays = get_arrays(model)
    state = checkpoint.get("model_state", checkpoint.get("state_dict"))
    return InitCheckpoint(
        init, Path(path), Architecture(name, kwargs, (input_hw[0], input_hw[1])), names, arrays,
        str(meta.get("weights_sha256") or weights_sha256(state)),
        None if meta.get("min_depth") is None else float(meta["min_depth"]),
        None if meta.get("max_depth") is None else float(meta["max_depth"]),
    )


def read_init(init: str) -> InitCheckpoint:
    """Read the checkpoint ``init`` names (cached per process until the file changes).

    ``FileNotFoundError`` / ``ValueError`` naming ``init`` when it is missing, not a checkpoint, does not rebuild
    its network, or was trained with another image normalisation.
    """
    path = init_path(init)
    stat = path.stat()
    return _read_init_cached(str(init), str(path), (stat.st_mtime_ns, stat.st_size))


# ---------------------------------------------------------------------------------------------- run config


def explicit_architecture(config: Mapping[str, Any]) -> dict[str, Any]:
    """The architecture keys a (merged) run config sets, with their values (unset: "" or 0 are left out)."""
    return {key: config[key] for key in ARCHITECTURE_KEYS if config.get(key) not in ("", 0, None)}


def architecture_from_run_config(config: Mapping[str, Any]) -> tuple[Architecture, InitCheckpoint | None]:
    """The network a run config asks for, and the ``init`` checkpoint when it names one.

    With ``init`` the checkpoint gives every unset key and must agree with every set one;
    without it unset keys give the quick 27k-parameter auto-encoder at 80x64. ``ValueError`` names the
    mismatching key, the checkpoint's value and what to do.
    """
    given = explicit_architecture(config)
    kwargs_given = parse_model_kwargs(str(config.get("model-kwargs", "")))
    init = str(config.get("init", "") or "").strip()
    checkpoint = read_init(init) if init else None
    if checkpoint is not None:
        base = checkpoint.architecture
        model = str(given.get("model", base.model))
        if model != base.model:
            raise ValueError(f"run config model={model!r} but init {init!r} is a {base.model} network; leave model "
                             f"unset (or \"\") to train the checkpoint's, or give a checkpoint of a {model} network")
    else:
        model = str(given.get("model", QUICK_MODEL))
    kwargs = dict(kwargs_given)
    if "base-channels" in given:
        if model != "autoencoder":
            raise ValueError(f"run config base-channels={given['base-channels']} sizes the auto-encoder; "
                             f"model {model!r} takes no base-channels (leave it 0)")
        if kwargs.get("base_channels", given["base-channels"]) != given["base-channels"]:
            raise ValueError(f"run config base-channels={given['base-channels']} and model-kwargs base_channels="
                             f"{kwargs['base_channels']} differ; give one of them")
        kwargs["base_channels"] = given["base-channels"]
    height, width = int(config.get("input-height", 0) or 0), int(config.get("input-width", 0) or 0)
    if checkpoint is None:
        if model == "autoencoder":
            kwargs.setdefault("base_channels", QUICK_BASE_CHANNELS)
        input_hw = (height or QUICK_INPUT_HW[0], width or QUICK_INPUT_HW[1])
        return Architecture(model, complete_kwargs(model, kwargs, "run config model-kwargs"), input_hw), None
    base = checkpoint.architecture
    for key, value in kwargs.items():
        if key not in base.kwargs:
            complete_kwargs(model, {key: value}, "run config model-kwargs")  # names the keyword it does not take
        if base.kwargs.get(key) != value:
            flag = "base-channels" if key == "base_channels" and "base-channels" in given else f"model-kwargs {key}"
            raise ValueError(f"run config {flag}={value!r} but init {init!r} was built with {key}={base.kwargs[key]!r}"
                             f"; leave it unset to train the checkpoint's network")
    for key, value, theirs in (("input-height", height, base.input_hw[0]), ("input-width", width, base.input_hw[1])):
        if value and value != theirs:
            raise ValueError(f"run config {key}={value} but init {init!r} runs at {base.input_hw[1]}x"
                             f"{base.input_hw[0]} (WIDTHxHEIGHT); leave {key} 0 to train at the checkpoint's size, "
                             "or give a checkpoint trained at the size you want")
    return base, checkpoint
