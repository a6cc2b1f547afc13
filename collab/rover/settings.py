"""collab_node's parameters as the cores take them: checks, task and gate settings, the SuperNode's start.

Parameter values come as a plain dict (name -> value, as ``declare_parameters`` returns them); every
check returns the reason a value is refused ("" when it is fine), naming the parameter.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forest_perception.cli_args import writable_folder_problem
from forest_perception.collab.deploy.certs import ROVER_ID_PATTERN
from forest_perception.collab.deploy.processes import free_ports
from forest_perception.collab.deploy.supernode import (
    CLIENTAPP_MODES,
    WARM,
    supernode_argv,
    supernode_environment,
)
from forest_perception.collab.rover.gate import EXPORTERS, GateConfig
from forest_perception.models.networks import MODEL_NAMES

if TYPE_CHECKING:
    from forest_perception.collab.flower.task import TaskConfig

Params = dict[str, Any]


def parameter_problem(p: Params) -> str:
    """Why ``p`` is not a usable configuration of collab_node ("" if it is)."""
    if p["onnx_exporter"] not in EXPORTERS:
        return f"onnx_exporter must be one of {list(EXPORTERS)}, got {p['onnx_exporter']!r}"
    if p["model"] not in MODEL_NAMES:
        return f"model must be one of {list(MODEL_NAMES)}, got {p['model']!r}"
    for name in ("input_height", "input_width"):
        if p[name] % 16:
            return f"{name} must be a multiple of 16, got {p[name]}"
    if p["min_depth_m"] >= p["max_depth_m"]:
        return f"min_depth_m ({p['min_depth_m']}) must be below max_depth_m ({p['max_depth_m']})"
    for name in ("dataset_dir", "models_dir", "model_source", "depth_node"):
        if not str(p[name]).strip():
            return f"{name} must not be empty"
    return writable_folder_problem("models_dir", p["models_dir"])


def task_config(p: Params) -> TaskConfig:
    """The rover's task settings (architecture of models that carry none, local training)."""
    from forest_perception.collab.flower.task import TaskConfig

    return TaskConfig(
        model=p["model"], base_channels=p["base_channels"], input_hw=(p["input_height"], p["input_width"]),
        batch_size=p["batch_size"], local_epochs=p["local_epochs"], local_steps=p["local_steps"], lr=p["lr"],
        min_depth=p["min_depth_m"], max_depth=p["max_depth_m"], seed=p["holdout_seed"],
        threads=p["torch_threads"], holdout_fraction=float(p["holdout_fraction"]), holdout_seed=p["holdout_seed"],
        max_train_frames=p["max_train_frames"], max_holdout_frames=p["max_holdout_frames"],
    ).validate()


def gate_config(p: Params) -> GateConfig:
    """How strict the validation gate is."""
    return GateConfig(
        tolerance_absrel=p["gate_tolerance_absrel"], tolerance_delta1=p["gate_tolerance_delta1"],
        max_absrel=p["gate_max_absrel"], confidence=p["gate_confidence"], exporter=p["onnx_exporter"],
        threads=p["torch_threads"], keep_refused=p["keep_refused"],
    )


# ---------------------------------------------------------------------------------------------- the SuperNode


def supernode_rover_id(p: Params, namespace: str) -> str:
    """``rover_id``, or the node's namespace without slashes."""
    return str(p["rover_id"]).strip() or namespace.strip("/").replace("/", "_")


def supernode_clientapp(p: Params) -> str:
    """How the rover's ClientApp runs: ``supernode_clientapp`` (``warm``, the default, or ``subprocess``)."""
    return str(p.get("supernode_clientapp", WARM) or WARM)


def supernode_problem(p: Params, rover_id: str) -> str:
    """Why the SuperNode cannot be started with ``p`` ("" if it can); names the missing file."""
    if supernode_clientapp(p) not in CLIENTAPP_MODES:
        return f"supernode_clientapp must be one of {list(CLIENTAPP_MODES)}, got {supernode_clientapp(p)!r}"
    if not str(p["superlink_address"]).strip():
        return "superlink_address must not be empty"
    if str(p["model_source"]).endswith(".db"):
        return f"model_source {p['model_source']!r} is a coordinator store; the SuperNode needs a drop folder"
    if not ROVER_ID_PATTERN.match(rover_id):
        return (f"rover_id {rover_id!r} is not a rover id (letters, digits, '_', '.', '-'); "
                "set rover_id or run the node in the rover's namespace")
    for name in ("root_certificates", "auth_private_key"):
        if not str(p[name]).strip():
            return f"{name} is not set: the SuperNode runs only with TLS and SuperNode authentication"
    key = Path(p["auth_private_key"])
    files = {"root_certificates": Path(p["root_certificates"]), "auth_private_key": key,
             "runtime certificate": key.with_name("runtime.crt"), "runtime key": key.with_name("runtime.key")}
    for what, path in files.items():
        if not path.is_file():
            return f"{what}: {path} does not exist (make it with `forest-fl certs`)"
        if not os.access(path, os.R_OK):
            return f"{what}: {path} is not readable"
    return ""


def split_node_config(p: Params) -> dict[str, float | int]:
    """The hold-out split in node-config spelling: the rover's ClientApp uses it over the run config's."""
    return {"holdout-fraction": float(p["holdout_fraction"]), "holdout-seed": int(p["holdout_seed"])}


def supernode_log(p: Params) -> Path:
    """The SuperNode's log file: ``supernode_log``, else ``<models_dir>/supernode/supernode.log``."""
    return Path(p["supernode_log"] or Path(p["models_dir"]) / "supernode" / "supernode.log").resolve()


def supernode_launch(p: Params, rover_id: str) -> tuple[list[str], dict[str, str]]:
    """The SuperNode's argv and environment; its home, node config, caches (and SuperExec secret) go beside its log.

    ``supernode_clientapp`` ``warm``: the warm ClientApp worker (this Python) starting ``flower-supernode
    --isolation process``, the executable resolved here on the environment's ``PATH``; ``subprocess``:
    ``flower-supernode --isolation subprocess`` alone. The node config carries the node's
    ``holdout_fraction``/``holdout_seed``, so the ClientApp never trains on the segments this node's gate holds
    out (:func:`split_node_config`). Creates the drop folder the ClientApp writes into. ``ValueError``/``OSError``
    when they cannot be made (a SuperNode program that is not there, named).
    """
    log = supernode_log(p)
    key = Path(p["auth_private_key"]).resolve()
    Path(p["model_source"]).mkdir(parents=True, exist_ok=True)
    env = supernode_environment(log.parent / "flwr_home", log.parent / "cache")
    clientapp = supernode_clientapp(p)
    executable = str(p["supernode_executable"])
    if clientapp == WARM:  # the worker starts it: find it now, so that a missing one is reported as today
        found = shutil.which(executable, path=env.get("PATH", os.defpath))
        if found is None:
            where = "not an executable file" if os.sep in executable else f"not found on PATH ({env.get('PATH')})"
            raise ValueError(f"supernode_executable {executable!r}: {where}")
        executable = os.path.abspath(found)
    argv = supernode_argv(
        str(p["superlink_address"]), Path(p["root_certificates"]).resolve(), key, p["dataset_dir"], rover_id,
        p["model_source"], split_node_config(p), executable=executable,
        node_config_file=log.parent / "node_config.toml",
        runtime_port=free_ports(1)[0], runtime_cert=key.with_name("runtime.crt"),
        runtime_key=key.with_name("runtime.key"), clientapp=clientapp)
    return argv, env
