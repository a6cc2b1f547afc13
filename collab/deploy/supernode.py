"""How a rover's ``flower-supernode`` is started: node config, command line and environment.

One definition for the loopback deployment (``collab.deploy.local``) and the rover's collab_node
(``collab.supervisor``): TLS to the SuperLink, SuperNode authentication, a TLS Runtime API on
127.0.0.1, never ``--insecure``. Two ways to run the rover's ClientApp (:data:`CLIENTAPP_MODES`):
``warm`` (default) starts the SuperNode with ``--isolation process`` under our warm ClientApp worker
(:mod:`.warm_clientapp`: one long-lived process imports torch and the app once and answers every message),
``subprocess`` is Flower's own (``--isolation subprocess``: a new ``flwr-clientapp`` process per message).
See ``docs/federated.md`` ("Deployment on loopback", "The warm ClientApp worker").
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from forest_perception.collab.flower import LOOPBACK_ENV

SUPERNODE_READY = r"SuperNode ID: (\d+)"
"""What a Flower 1.42 SuperNode logs once it has activated at the SuperLink (group 1: its node id)."""
# environment variables that would make Flower open extra (gRPC) listeners on its default addresses
_EXTRA_LISTENER_ENV = ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API")

ConfigValue = bool | int | float | str

WARM, SUBPROCESS = "warm", "subprocess"
CLIENTAPP_MODES = (WARM, SUBPROCESS)
"""How a rover's ClientApp runs: ``warm`` (our worker, kept alive across messages) or ``subprocess`` (Flower's)."""
WARM_MODULE = "forest_perception.collab.deploy.warm_clientapp"
"""The warm worker's program (``python -m``), which also starts the SuperNode it serves."""
SECRET_FILE = "superexec.secret"
"""Name of the file the warm worker writes its fresh SuperExec secret to (beside the SuperNode's home)."""


@dataclass(frozen=True)
class RoverNode:
    """One rover of a deployment: its id (which names its keys), where its recordings are, its training scope."""

    rover_id: str
    data_dir: str | Path
    scope: str = "all"
    extra_config: Mapping[str, ConfigValue] = field(default_factory=dict)

    def node_config(self) -> dict[str, ConfigValue]:
        """The SuperNode's ``--node-config`` (what the ClientApp reads as ``context.node_config``)."""
        return {"data-dir": str(Path(self.data_dir).resolve()), "rover-id": self.rover_id, "scope": self.scope,
                **dict(self.extra_config)}


def toml_value(value: ConfigValue) -> str:
    """``value`` as a TOML value (a JSON string is a valid TOML basic string)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def write_toml_table(path: str | Path, values: Mapping[str, ConfigValue]) -> Path:
    """A flat TOML file of ``key = value`` lines (what ``--node-config`` and ``--run-config`` accept as a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for key, value in values.items():
        if not re.fullmatch(r"[A-Za-z0-9_-]+", key):
            raise ValueError(f"{path}: config key {key!r} must be letters, digits, '-' or '_'")
        if not isinstance(value, (bool, int, float, str)):
            raise ValueError(f"{path}: config {key} must be a bool, number or string, got {value!r}")
        lines.append(f"{key} = {toml_value(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def flower_process_environment(home: str | Path, bin_dir: str | Path, cache_dir: str | Path) -> dict[str, str]:
    """Environment of a Flower process: its own ``FLWR_HOME``, ``bin_dir`` first on ``PATH``, no telemetry/installs."""
    env = {k: v for k, v in os.environ.items() if k not in _EXTRA_LISTENER_ENV}
    env.update(LOOPBACK_ENV)
    env.update(
        FLWR_HOME=str(home),
        PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        TORCHINDUCTOR_CACHE_DIR=str(Path(cache_dir) / "torchinductor"),
        PYTHONUNBUFFERED="1",
    )
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def supernode_environment(home: str | Path, cache_dir: str | Path | None = None) -> dict[str, str]:
    """Environment of a rover's SuperNode: :func:`flower_process_environment` with this Python's ``bin`` first."""
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    return flower_process_environment(home, Path(sys.executable).parent, cache_dir or home / "cache")


def supernode_tls_command(executable: str | Path, superlink_address: str, root_cert: str | Path,
                          auth_key: str | Path, node_config: str | Path, runtime_port: int,
                          runtime_cert: str | Path, runtime_key: str | Path, connect_wait: float | None = None,
                          *, secret_file: str | Path | None = None) -> list[str]:
    """``flower-supernode`` argv with TLS to the SuperLink, SuperNode authentication and a TLS Runtime API.

    ``node_config``: a TOML file (or Flower's ``key=value`` text); the Runtime API listens on
    ``127.0.0.1:<runtime_port>`` with ``runtime_cert``/``runtime_key``, verified with ``root_cert``.
    Without ``secret_file``: ``--isolation subprocess`` (the SuperNode runs Flower's SuperExec, one
    ``flwr-clientapp`` process per message). With it: ``--isolation process`` and
    ``--superexec-auth-secret-file``, for the warm worker (:func:`warm_command`), the only one that can
    acquire tasks from the Runtime API with that secret.
    """
    argv = [
        str(executable),
        "--superlink", superlink_address,
        "--root-certificates", str(root_cert),
        "--auth-supernode-private-key", str(auth_key),
        "--node-config", str(node_config),
        "--isolation", "subprocess" if secret_file is None else "process",
        # the rover's local Runtime API (its SuperExec or warm worker, and ClientApps), TLS too
        "--host", "127.0.0.1", "--port", str(runtime_port),
        "--ssl-certfile", str(runtime_cert), "--ssl-keyfile", str(runtime_key),
        "--ssl-ca-certfile", str(root_cert),
    ]
    if secret_file is not None:
        argv += ["--superexec-auth-secret-file", str(secret_file)]
    if connect_wait is not None:
        argv += ["--max-wait-time", str(float(connect_wait))]
    return argv


def argv_value(argv: list[str] | tuple[str, ...], flag: str) -> str | None:
    """The value after ``flag`` in ``argv`` (``--flag value`` or ``--flag=value``), None if absent."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg[len(flag) + 1:]
    return None


def warm_command(supernode: list[str], python: str | Path | None = None, poll_interval: float | None = None,
                 preload: tuple[str, ...] = ("forest_perception.collab.flower.client_app",)) -> list[str]:
    """The warm worker's argv (``python -m`` :data:`WARM_MODULE`), which starts the ``supernode`` argv and serves it.

    ``supernode`` must be a :func:`supernode_tls_command` with a ``secret_file`` (process isolation, TLS Runtime
    API); the worker's Runtime API address, CA and secret are read from it, so the two cannot disagree.
    ``preload``: modules imported once when the worker starts (torch and the rover ClientApp).
    """
    if argv_value(supernode, "--isolation") != "process":
        raise ValueError("warm ClientApp worker: the SuperNode must run with --isolation process")
    values = {flag: argv_value(supernode, flag) for flag in ("--port", "--ssl-ca-certfile",
                                                             "--superexec-auth-secret-file")}
    missing = [flag for flag, value in values.items() if not value]
    if missing:
        raise ValueError(f"warm ClientApp worker: the SuperNode argv lacks {', '.join(missing)} (a TLS Runtime API "
                         "and a SuperExec secret)")
    host = argv_value(supernode, "--host") or "127.0.0.1"
    argv = [str(python or sys.executable), "-m", WARM_MODULE,
            "--runtime-api-address", f"[{host}]:{values['--port']}" if ":" in host else f"{host}:{values['--port']}",
            "--runtime-ca", str(values["--ssl-ca-certfile"]),
            "--secret-file", str(values["--superexec-auth-secret-file"])]
    if poll_interval is not None:
        argv += ["--poll-interval", str(float(poll_interval))]
    for module in preload:
        argv += ["--preload", module]
    return argv + ["--", *supernode]


def supernode_node_config(data_dir: str | Path, rover_id: str, model_drop_dir: str | Path,
                          extra_node_config: Mapping[str, ConfigValue] | None = None) -> dict[str, ConfigValue]:
    """The SuperNode's node config as :class:`RoverNode` makes it, plus ``model-drop-dir``."""
    extra = {"model-drop-dir": str(Path(model_drop_dir).resolve()), **dict(extra_node_config or {})}
    return RoverNode(rover_id, data_dir, extra_config=extra).node_config()


def supernode_argv(superlink_address: str, root_cert: str | Path, private_key: str | Path, data_dir: str | Path,
                   rover_id: str, model_drop_dir: str | Path,
                   extra_node_config: Mapping[str, ConfigValue] | None = None,
                   executable: str = "flower-supernode", *, node_config_file: str | Path | None = None,
                   runtime_port: int | None = None, runtime_cert: str | Path | None = None,
                   runtime_key: str | Path | None = None, connect_wait: float | None = None,
                   clientapp: str = WARM, secret_file: str | Path | None = None,
                   python: str | Path | None = None) -> list[str]:
    """The argv that runs a rover's SuperNode with TLS (``root_cert``) and SuperNode authentication (``private_key``).

    The node config goes to ``node_config_file`` (TOML, written here; paths with spaces or quotes survive),
    else inline as Flower's ``key="value"`` text. With ``runtime_cert``/``runtime_key`` the Runtime API gets
    TLS on ``127.0.0.1:<runtime_port>`` as :func:`supernode_tls_command` has it; without them it keeps
    Flower's default Runtime API (127.0.0.1:9094), which only ``clientapp="subprocess"`` allows.
    ``clientapp="warm"`` (default): the warm worker's argv (:func:`warm_command`, run by ``python``) wrapping
    ``flower-supernode --isolation process``; its secret goes to ``secret_file`` (default: :data:`SECRET_FILE`
    beside ``node_config_file``). ``"subprocess"``: ``flower-supernode --isolation subprocess`` alone.
    """
    if not str(superlink_address).strip():
        raise ValueError("supernode: superlink_address must not be empty")
    if clientapp not in CLIENTAPP_MODES:
        raise ValueError(f"supernode: clientapp must be one of {list(CLIENTAPP_MODES)}, got {clientapp!r}")
    config = supernode_node_config(data_dir, rover_id, model_drop_dir, extra_node_config)
    if node_config_file is not None:
        node_config: str | Path = write_toml_table(node_config_file, config)
    else:
        node_config = _inline_config(config)
    if (runtime_cert is None) != (runtime_key is None):
        raise ValueError("supernode: runtime_cert and runtime_key go together")
    if runtime_cert is not None:
        if not runtime_port:
            raise ValueError("supernode: a TLS Runtime API needs runtime_port")
        secret = None
        if clientapp == WARM:
            if secret_file is None and node_config_file is None:
                raise ValueError("supernode: the warm ClientApp worker needs secret_file (or node_config_file)")
            secret = Path(secret_file) if secret_file is not None else Path(node_config_file).with_name(SECRET_FILE)
        argv = supernode_tls_command(executable, superlink_address, root_cert, private_key, node_config,
                                     int(runtime_port), runtime_cert, runtime_key, connect_wait, secret_file=secret)
        return warm_command(argv, python) if clientapp == WARM else argv
    if clientapp == WARM:
        raise ValueError("supernode: the warm ClientApp worker needs the TLS Runtime API (runtime_port, runtime_cert, "
                         "runtime_key); without it use clientapp='subprocess'")
    argv = [str(executable), "--superlink", superlink_address, "--root-certificates", str(root_cert),
            "--auth-supernode-private-key", str(private_key), "--node-config", str(node_config),
            "--isolation", "subprocess"]
    if runtime_port:
        argv += ["--host", "127.0.0.1", "--port", str(int(runtime_port))]
    if connect_wait is not None:
        argv += ["--max-wait-time", str(float(connect_wait))]
    return argv


def _inline_config(config: Mapping[str, ConfigValue]) -> str:
    parts = []
    for key, value in config.items():
        if not isinstance(value, str):
            parts.append(f"{key}={toml_value(value)}")
            continue
        if any(c in value for c in "\"'\\\n"):
            raise ValueError(f"supernode: node config {key}={value!r} has a quote or backslash; pass node_config_file")
        parts.append(f'{key}="{value}"')
    return " ".join(parts)
