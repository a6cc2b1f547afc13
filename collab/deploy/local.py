"""A Flower deployment on one machine: a SuperLink and one SuperNode per rover, TLS and SuperNode authentication on.

:class:`LocalDeployment` starts, as subprocesses in their own process groups, Flower 1.42's

- ``flower-superlink`` with ``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile`` and
  ``--enable-supernode-auth`` on ``host:port`` (one HTTPS port serves the Fleet, Control and
  Runtime APIs in 1.42), its link state in memory (registrations are made again on each start);
- one ``flower-supernode`` per rover with ``--root-certificates`` (the deployment CA),
  ``--auth-supernode-private-key`` (the rover's key), ``--node-config`` (a TOML file with the
  rover's ``data-dir``, ``rover-id`` and ``scope``, read by the ClientApp) and its local
  Runtime API on ``127.0.0.1`` with the rover's own TLS certificate.

In 1.42 SuperNode authentication means: the SuperLink refuses to let SuperNodes register
themselves; every rover's public key is registered beforehand through the Control API
(``flwr supernode register <key.pub> <superlink>``), which returns the rover's node id, and a
SuperNode may only activate with a registered key (it signs every request with it). A SuperNode
with any other key is refused (``Failed to activate SuperNode``, exit code 305 in its log) and
exits. The node id of each rover is kept in ``<run_dir>/nodes.json`` and checked against the id
each SuperNode reports, so the coordinator's ``node_id -> rover-id`` directory can be audited
against the registered keys.

:meth:`LocalDeployment.run` submits the app with ``flwr run <app_dir> <connection> --stream``
and a run config whose ``state-db`` is ``<run_dir>/coordinator.db``: a second submission (or
one after a crash) resumes the coordinator from its last completed round.

No command carries ``--insecure``; every listener binds the given host (``127.0.0.1``);
``FLWR_HOME`` of each process (the SuperLink, each rover, the ``flwr`` CLI) lives under
``<run_dir>/homes``, logs under ``<run_dir>/logs``; telemetry, update checks and runtime
dependency installation are off. :meth:`LocalDeployment.stop` ends every process it started by
pid: the process group of each, then the descendants recorded while it ran (the SuperLink's
SuperExec runs in a session of its own), SIGTERM first, SIGKILL after a grace period.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from forest_perception.collab.deploy.certs import (
    DeploymentCerts,
    RoverKeys,
    check_deployment_certs,
    load_deployment_certs,
)
from forest_perception.collab.flower import app_dir

CONNECTION = "forest"
"""Name of the SuperLink connection in the CLI's ``$FLWR_HOME/config.toml``."""
_NODE_ID = re.compile(r"SuperNode ID: (\d+)")
_RUN_ID = re.compile(r"Successfully started run (\d+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# environment variables that would make Flower open extra (gRPC) listeners on its default addresses
_EXTRA_LISTENER_ENV = ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API")


@dataclass(frozen=True)
class RoverNode:
    """One rover of a deployment: its id (which names its keys), where its recordings are, its training scope."""

    rover_id: str
    data_dir: str | Path
    scope: str = "all"
    extra_config: Mapping[str, str | int | float | bool] = field(default_factory=dict)

    def node_config(self) -> dict[str, str | int | float | bool]:
        """The SuperNode's ``--node-config`` (what the ClientApp reads as ``context.node_config``)."""
        return {"data-dir": str(Path(self.data_dir).resolve()), "rover-id": self.rover_id, "scope": self.scope,
                **dict(self.extra_config)}


@dataclass
class DeploySpec:
    """What to deploy: certificates, rovers, where runs and logs go, on which address."""

    run_dir: str | Path
    certs_dir: str | Path
    rovers: Sequence[RoverNode]
    run_config: Mapping[str, bool | int | float | str] = field(default_factory=dict)
    app_dir: str | Path = field(default_factory=app_dir)
    host: str = "127.0.0.1"
    superlink_port: int = 0  # 0: a free port
    start_timeout: float = 120.0
    connect_wait: float | None = None  # SuperNode --max-wait-time (None: retry for ever, as a rover should)
    # SuperLink link state: None keeps it in memory (Flower's default). A file (``--database``) keeps
    # registrations across restarts, but its 5 s SQLite lock timeout failed a ServerApp heartbeat
    # ("database is locked") on this loaded 2-core machine and killed the run.
    superlink_database: str | Path | None = None


@dataclass
class DeployResult:
    """What a submitted run left: its id, the coordinator store's rounds and updates, the log."""

    run_id: int | None
    state_db: Path
    rounds: list[dict]
    updates: list[dict]
    summary: dict
    nodes: dict[str, int]
    wall_s: float
    log: Path


@dataclass
class ManagedProcess:
    """A subprocess this deployment started, with its log and the descendants seen while it ran."""

    name: str
    argv: list[str]
    popen: subprocess.Popen
    log_path: Path
    log_file: IO[bytes]
    seen: dict[int, int] = field(default_factory=dict)  # pid -> start time (guards against pid reuse)

    @property
    def pid(self) -> int:
        """The process id (also its process group id)."""
        return self.popen.pid

    def log_text(self) -> str:
        """The log so far, colour codes removed."""
        if not self.log_file.closed:
            self.log_file.flush()
        return _ANSI.sub("", self.log_path.read_text(errors="replace"))


# ---------------------------------------------------------------------------------------------- /proc helpers


def _proc_stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, pgrp, starttime) of a live process, None when gone (Linux /proc)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError, OSError):
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[2]), int(fields[19])


def process_tree(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children first); empty where /proc is not available."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if entry.isdigit():
            stat = _proc_stat(int(entry))
            if stat is not None and stat[0] != "Z":
                children.setdefault(stat[1], []).append(int(entry))
    out, queue = [], list(children.get(pid, []))
    while queue:
        child = queue.pop(0)
        out.append(child)
        queue.extend(children.get(child, []))
    return out


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid`` (Linux /proc)."""
    out = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for entry in entries:
        if entry.isdigit():
            stat = _proc_stat(int(entry))
            if stat is not None and stat[0] != "Z" and stat[2] == pgid:
                out.append(int(entry))
    return out


def _alive(pid: int, started: int | None = None) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[0] != "Z" and (started is None or stat[3] == started)


def _hex_address(text: str) -> str:
    raw = bytes.fromhex(text)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    # /proc/net/tcp6: four 32-bit words, each in host (little-endian) order
    return socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))


def listening_sockets(pids: Iterable[int]) -> list[tuple[str, int, int]]:
    """``(address, port, pid)`` of every TCP socket in LISTEN state that one of ``pids`` holds (Linux)."""
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:
            continue
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and parts[3] == "0A" and parts[9] in inodes:
                address, port = parts[1].split(":")
                out.append((_hex_address(address), int(port, 16), inodes[parts[9]]))
    return sorted(out)


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports free on ``host`` right now."""
    sockets, ports = [], []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
            ports.append(sock.getsockname()[1])
    finally:
        for sock in sockets:
            sock.close()
    return ports


def _toml_value(value: bool | int | float | str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def write_toml_table(path: str | Path, values: Mapping[str, bool | int | float | str]) -> Path:
    """A flat TOML file of ``key = value`` lines (what ``--node-config`` and ``--run-config`` accept as a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for key, value in values.items():
        if not re.fullmatch(r"[A-Za-z0-9_-]+", key):
            raise ValueError(f"{path}: config key {key!r} must be letters, digits, '-' or '_'")
        if not isinstance(value, (bool, int, float, str)):
            raise ValueError(f"{path}: config {key} must be a bool, number or string, got {value!r}")
        lines.append(f"{key} = {_toml_value(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------------------------- shared builders


def supernode_tls_command(executable: str | Path, superlink_address: str, root_cert: str | Path,
                          auth_key: str | Path, node_config: str | Path, runtime_port: int,
                          runtime_cert: str | Path, runtime_key: str | Path, connect_wait: float | None = None
                          ) -> list[str]:
    """``flower-supernode`` argv with TLS to the SuperLink, SuperNode authentication and a TLS Runtime API.

    ``node_config``: a TOML file (or Flower's ``key=value`` text); the Runtime API listens on
    ``127.0.0.1:<runtime_port>`` with ``runtime_cert``/``runtime_key``, verified with ``root_cert``.
    """
    argv = [
        str(executable),
        "--superlink", superlink_address,
        "--root-certificates", str(root_cert),
        "--auth-supernode-private-key", str(auth_key),
        "--node-config", str(node_config),
        "--isolation", "subprocess",
        # the rover's local Runtime API (its SuperExec and ClientApps), TLS too
        "--host", "127.0.0.1", "--port", str(runtime_port),
        "--ssl-certfile", str(runtime_cert), "--ssl-keyfile", str(runtime_key),
        "--ssl-ca-certfile", str(root_cert),
    ]
    if connect_wait is not None:
        argv += ["--max-wait-time", str(float(connect_wait))]
    return argv


def flower_process_environment(home: str | Path, bin_dir: str | Path, cache_dir: str | Path) -> dict[str, str]:
    """Environment of a Flower process: its own ``FLWR_HOME``, ``bin_dir`` first on ``PATH``, no telemetry/installs."""
    from forest_perception.collab.flower.simulation import LOOPBACK_ENV

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


# ---------------------------------------------------------------------------------------------- deployment


class LocalDeployment:
    """A SuperLink and one SuperNode per rover on this machine, with TLS and SuperNode authentication.

    Use as a context manager (everything is stopped on exit, also after an error)::

        spec = DeploySpec(run_dir="runs/deploy", certs_dir="certs", rovers=[RoverNode("rover_000", "/data/r0")])
        with LocalDeployment(spec) as deployment:
            result = deployment.run({"num-server-rounds": 2})
    """

    def __init__(self, spec: DeploySpec) -> None:
        self.spec = spec
        self.run_dir = Path(spec.run_dir).resolve()
        self.app_dir = Path(spec.app_dir).resolve()
        if not (self.app_dir / "pyproject.toml").is_file():
            raise FileNotFoundError(f"app dir {self.app_dir} has no pyproject.toml naming the Flower apps")
        self.certs: DeploymentCerts = load_deployment_certs(spec.certs_dir)
        check_deployment_certs(self.certs, hosts=[spec.host])
        ids = [r.rover_id for r in spec.rovers]
        if not ids:
            raise ValueError("a deployment needs at least one rover")
        if len(set(ids)) != len(ids):
            raise ValueError(f"rover ids are repeated: {ids}")
        for rover in spec.rovers:
            self.certs.rover(rover.rover_id)  # raises naming the rover without keys
            if not Path(rover.data_dir).is_dir():
                raise FileNotFoundError(f"rover {rover.rover_id}: data dir {rover.data_dir} does not exist")
        self.logs_dir = self.run_dir / "logs"
        self.homes_dir = self.run_dir / "homes"
        self.state_db = self.run_dir / "coordinator.db"
        self.nodes_path = self.run_dir / "nodes.json"
        self.bin_dir = Path(sys.executable).parent
        port = spec.superlink_port or free_ports(1, spec.host)[0]
        self.superlink_address = f"[{spec.host}]:{port}" if ":" in spec.host else f"{spec.host}:{port}"
        self.superlink_port = port
        self.runtime_ports = dict(zip(ids, free_ports(len(ids), "127.0.0.1")))
        self.processes: dict[str, ManagedProcess] = {}
        self.nodes: dict[str, int] = {}
        self._runs = 0

    # ------------------------------------------------------------------ commands (pure: tests inspect them)

    def superlink_command(self) -> list[str]:
        """``flower-superlink`` argv: TLS with the deployment's certificate, SuperNode authentication on."""
        certs = self.certs
        return [
            str(self.bin_dir / "flower-superlink"),
            "--ssl-ca-certfile", str(certs.ca_cert), "--ssl-certfile", str(certs.server_cert),
            "--ssl-keyfile", str(certs.server_key),
            "--enable-supernode-auth",
            "--host", self.spec.host, "--port", str(self.superlink_port),
            "--isolation", "subprocess",
            "--disable-runtime-dependency-installation",
        ] + (["--database", str(Path(self.spec.superlink_database).resolve())] if self.spec.superlink_database else [])

    def supernode_command(self, rover: RoverNode, keys: RoverKeys | None = None, runtime_port: int | None = None
                          ) -> list[str]:
        """``flower-supernode`` argv of a rover (``keys``: another key set, e.g. to show that it is refused)."""
        keys = keys or self.certs.rover(rover.rover_id)
        port = runtime_port or self.runtime_ports.get(rover.rover_id) or free_ports(1)[0]
        return supernode_tls_command(self.bin_dir / "flower-supernode", self.superlink_address, self.certs.ca_cert,
                                     keys.auth_key, self._node_config_path(rover), port, keys.runtime_cert,
                                     keys.runtime_key, self.spec.connect_wait)

    def register_command(self, rover_id: str) -> list[str]:
        """``flwr supernode register`` argv for a rover's public key."""
        keys = self.certs.rover(rover_id)
        return [str(self.bin_dir / "flwr"), "supernode", "register", str(keys.auth_pub), CONNECTION,
                "--name", rover_id, "--format", "json"]

    def run_command(self, run_config_path: Path) -> list[str]:
        """``flwr run`` argv submitting the app with a run config file."""
        return [str(self.bin_dir / "flwr"), "run", str(self.app_dir), CONNECTION, "--stream",
                "--run-config", str(run_config_path)]

    def commands(self) -> dict[str, list[str]]:
        """Every argv this deployment runs by default, by process name."""
        out = {"superlink": self.superlink_command()}
        for rover in self.spec.rovers:
            out[f"register-{rover.rover_id}"] = self.register_command(rover.rover_id)
            out[f"supernode-{rover.rover_id}"] = self.supernode_command(rover)
        out["run"] = self.run_command(self.run_dir / "run_config.toml")
        return out

    def environment(self, home: str | Path) -> dict[str, str]:
        """Environment of a Flower process: its own ``FLWR_HOME``, venv on ``PATH``, telemetry and installs off."""
        return flower_process_environment(home, self.bin_dir, self.run_dir / "cache")

    def cli_home(self) -> Path:
        """``FLWR_HOME`` of the ``flwr`` CLI; its ``config.toml`` names the SuperLink connection ``forest``."""
        return self.homes_dir / "cli"

    def _node_config_path(self, rover: RoverNode) -> Path:
        return self.run_dir / "nodes" / f"{rover.rover_id}.toml"

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> LocalDeployment:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the SuperLink, register every rover's key, start the SuperNodes and wait until all are online."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        for folder in (self.logs_dir, self.homes_dir, self.cli_home()):
            folder.mkdir(parents=True, exist_ok=True)
        (self.cli_home() / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{self.superlink_address}"\nroot-certificates = "{self.certs.ca_cert.resolve()}"\n'
        )
        superlink = self._spawn("superlink", self.superlink_command(), self.homes_dir / "superlink")
        self._wait_healthy(superlink)
        self._remember_tree(superlink)
        self.nodes = self.register_rovers()
        for rover in self.spec.rovers:
            self.start_supernode(rover)
        for rover in self.spec.rovers:
            node_id = self.wait_online(rover.rover_id)
            if node_id != self.nodes[rover.rover_id]:
                raise RuntimeError(f"rover {rover.rover_id}: SuperNode reports node id {node_id}, but its key was "
                                   f"registered as {self.nodes[rover.rover_id]} (see {self.nodes_path})")
        for process in self.processes.values():
            self._remember_tree(process)

    def register_rovers(self) -> dict[str, int]:
        """Register each rover's public key at the SuperLink (``flwr supernode register``); rover -> node id.

        A key the SuperLink already knows (a link state ``--database`` kept from a former start) keeps the node id
        recorded in ``nodes.json``, as long as the key's fingerprint is the one recorded.
        """
        known = json.loads(self.nodes_path.read_text()) if self.nodes_path.is_file() else {}
        nodes = {}
        env = self.environment(self.cli_home())
        for rover in self.spec.rovers:
            keys = self.certs.rover(rover.rover_id)
            result = subprocess.run(self.register_command(rover.rover_id), env=env, capture_output=True, text=True,
                                    timeout=self.spec.start_timeout)
            with open(self.logs_dir / "register.log", "a") as log:
                log.write(f"$ {' '.join(self.register_command(rover.rover_id))}\n{result.stdout}{result.stderr}\n")
            reply = _last_json(result.stdout)
            if reply.get("success") and "node-id" in reply:
                nodes[rover.rover_id] = int(reply["node-id"])
                continue
            message = str(reply.get("error-message") or result.stderr.strip() or result.stdout.strip())
            previous = known.get(rover.rover_id, {})
            if "already in use" in message and previous.get("fingerprint") == keys.fingerprint:
                nodes[rover.rover_id] = int(previous["node_id"])
                continue
            raise RuntimeError(f"registering rover {rover.rover_id} ({keys.auth_pub}) failed: {message[-800:]}")
        record = {rid: {"node_id": nid, "fingerprint": self.certs.rover(rid).fingerprint, "public_key":
                        str(self.certs.rover(rid).auth_pub)} for rid, nid in nodes.items()}
        self.nodes_path.write_text(json.dumps({**known, **record}, indent=1) + "\n")
        return nodes

    def start_supernode(self, rover: RoverNode, keys: RoverKeys | None = None, name: str | None = None
                        ) -> ManagedProcess:
        """Start one SuperNode (not waiting for it); ``keys`` overrides the rover's own key set."""
        write_toml_table(self._node_config_path(rover), rover.node_config())
        name = name or f"supernode-{rover.rover_id}"
        runtime_port = None if keys is None else free_ports(1)[0]
        return self._spawn(name, self.supernode_command(rover, keys, runtime_port), self.homes_dir / name)

    def wait_online(self, rover_id: str, name: str | None = None) -> int:
        """Wait until a rover's SuperNode has activated at the SuperLink; returns its node id."""
        process = self.processes[name or f"supernode-{rover_id}"]
        deadline = time.monotonic() + self.spec.start_timeout
        while time.monotonic() < deadline:
            match = _NODE_ID.search(process.log_text())
            if match:
                return int(match.group(1))
            if process.popen.poll() is not None:
                raise RuntimeError(f"SuperNode of rover {rover_id} exited with code {process.popen.returncode} "
                                   f"before connecting: {_tail(process.log_text())}")
            time.sleep(0.3)
        raise RuntimeError(f"SuperNode of rover {rover_id} did not connect within {self.spec.start_timeout:.0f} s; "
                           f"see {process.log_path}")

    def run(self, run_config: Mapping[str, bool | int | float | str] | None = None, timeout: float = 1800.0
            ) -> DeployResult:
        """Submit the app (``flwr run --stream``) and wait for it; coordinator state in ``<run_dir>/coordinator.db``."""
        from forest_perception.collab.flower.store import CoordinatorStore
        from forest_perception.collab.flower.task import merge_run_config

        if "superlink" not in self.processes:
            raise RuntimeError("the deployment is not started")
        overrides = {**dict(self.spec.run_config), **dict(run_config or {})}
        overrides["state-db"] = str(Path(overrides.get("state-db") or self.state_db).resolve())
        merged = merge_run_config(overrides)  # refuses unknown keys and wrong types before anything is sent
        self._runs += 1
        config_path = write_toml_table(self.run_dir / f"run_config_{self._runs}.toml",
                                       {k: merged[k] for k in overrides})
        log_path = self.logs_dir / f"flwr_run_{self._runs}.log"
        start = time.perf_counter()
        with open(log_path, "wb") as log:
            process = subprocess.Popen(self.run_command(config_path), env=self.environment(self.cli_home()),
                                       stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code = process.wait(timeout)
            except subprocess.TimeoutExpired:
                _terminate_group(process.pid)
                process.wait(10)
                raise RuntimeError(f"flwr run did not finish within {timeout:.0f} s; see {log_path}") from None
        wall = time.perf_counter() - start
        text = _ANSI.sub("", log_path.read_text(errors="replace"))
        if code != 0:
            raise RuntimeError(f"flwr run failed with code {code}: {_tail(text)}")
        match = _RUN_ID.search(text)
        state_db = Path(merged["state-db"])
        if not state_db.is_file():
            raise RuntimeError(f"the run left no coordinator store at {state_db}: {_tail(text)}")
        with CoordinatorStore(state_db, readonly=True) as store:
            rounds, updates, summary = store.rounds(), store.updates(), store.summary()
        if not rounds or rounds[-1]["round"] < merged["num-server-rounds"]:
            raise RuntimeError(f"the run ended after round {rounds[-1]['round'] if rounds else 0} of "
                               f"{merged['num-server-rounds']}; see {log_path} and {self.logs_dir}/superlink.log: "
                               f"{_tail(text, 600)}")
        return DeployResult(int(match.group(1)) if match else None, state_db, rounds, updates, summary,
                            dict(self.nodes), wall, log_path)

    def pids(self) -> list[int]:
        """Every live process of this deployment: the started ones and their descendants."""
        out = []
        for process in self.processes.values():
            if _alive(process.pid):
                out.append(process.pid)
            out += process_tree(process.pid) + group_members(process.pid)
            out += [pid for pid, started in process.seen.items() if _alive(pid, started)]
        return sorted(set(out))

    def stop(self, grace: float = 10.0) -> None:
        """Stop every process (SuperNodes first, then the SuperLink) by pid and process group."""
        names = [n for n in self.processes if n != "superlink"] + [n for n in self.processes if n == "superlink"]
        for name in names:
            process = self.processes[name]
            self._remember_tree(process)
            stop_process(process, grace)
            process.log_file.close()
        self.processes.clear()

    # ------------------------------------------------------------------ internals

    def _spawn(self, name: str, argv: list[str], home: Path) -> ManagedProcess:
        home.mkdir(parents=True, exist_ok=True)
        log_path = self.logs_dir / f"{name}.log"
        log_file = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        log_file.write(f"$ {' '.join(argv)}\n".encode())
        log_file.flush()
        try:
            popen = subprocess.Popen(argv, env=self.environment(home), cwd=str(self.run_dir), stdout=log_file,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        except BaseException:
            log_file.close()
            raise
        process = ManagedProcess(name, argv, popen, log_path, log_file)
        self.processes[name] = process
        return process

    def _remember_tree(self, process: ManagedProcess) -> None:
        for pid in process_tree(process.pid):
            stat = _proc_stat(pid)
            if stat is not None:
                process.seen.setdefault(pid, stat[3])

    def _wait_healthy(self, process: ManagedProcess) -> None:
        context = ssl.create_default_context(cafile=str(self.certs.ca_cert))
        url = f"https://{self.superlink_address}/health"
        deadline = time.monotonic() + self.spec.start_timeout
        while time.monotonic() < deadline:
            if process.popen.poll() is not None:
                raise RuntimeError(f"flower-superlink exited with code {process.popen.returncode} while starting: "
                                   f"{_tail(process.log_text())}")
            try:
                with urllib.request.urlopen(url, timeout=1.0, context=context) as response:
                    if response.status == 200:
                        return
            except ssl.SSLCertVerificationError as exc:
                raise RuntimeError(f"the SuperLink at {url} presents a certificate the CA {self.certs.ca_cert} "
                                   f"does not verify: {exc}") from None
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"flower-superlink did not answer {url} within {self.spec.start_timeout:.0f} s; "
                           f"see {process.log_path}")


def _last_json(text: str) -> dict:
    start = text.find("{")
    if start < 0:
        return {}
    try:
        value = json.loads(text[start:])
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _tail(text: str, chars: int = 1500) -> str:
    return text[-chars:].strip()


def _terminate_group(pgid: int, sig: int = signal.SIGTERM) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_process(process: ManagedProcess, grace: float = 10.0) -> None:
    """SIGTERM the process group and every recorded descendant, then SIGKILL what is left after ``grace``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        _terminate_group(process.pid, sig)
        for pid, started in process.seen.items():
            if _alive(pid, started):
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline:
            if (process.popen.poll() is not None and not any(_alive(p, s) for p, s in process.seen.items())
                    and not group_members(process.pid)):
                break
            time.sleep(0.1)
        else:
            continue
        break
    try:
        process.popen.wait(1.0)
    except subprocess.TimeoutExpired:
        pass
