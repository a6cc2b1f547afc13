"""A Flower deployment on this machine: a SuperLink and one SuperNode per rover, TLS and SuperNode authentication on.

:class:`LocalDeployment` starts them as subprocesses in their own process groups (command lines from
:mod:`forest_perception.collab.deploy.supernode`), registers every rover's public key, submits the app with
``flwr run`` and stops every process it started by pid. What each process gets, the run folder and the
known limits: ``docs/federated.md``, "Deployment on loopback (TLS + SuperNode authentication)".
"""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from forest_perception.collab.deploy.certs import (
    DeploymentCerts,
    RoverKeys,
    check_deployment_certs,
    load_deployment_certs,
)
from forest_perception.collab.deploy.processes import (
    ManagedProcess,
    free_ports,
    group_members,
    is_alive,
    process_tree,
    remember_descendants,
    start_process,
    stop_process,
    strip_ansi,
    terminate_group,
)
from forest_perception.collab.deploy.supernode import (
    CLIENTAPP_MODES,
    SECRET_FILE,
    SUPERNODE_READY,
    WARM,
    RoverNode,
    flower_process_environment,
    supernode_tls_command,
    warm_command,
    write_toml_table,
)
from forest_perception.collab.flower import app_dir

CONNECTION = "forest"
"""Name of the SuperLink connection in the CLI's ``$FLWR_HOME/config.toml``."""
_RUN_ID = re.compile(r"Successfully started run (\d+)")


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
    start_supernodes: bool = True  # False: the SuperLink alone, rovers registered (their collab_nodes run SuperNodes)
    # how each rover runs its ClientApp: "warm" (our worker keeps one process alive across messages, SuperNode with
    # --isolation process) or "subprocess" (Flower's SuperExec: a new flwr-clientapp process per message)
    clientapp: str = WARM


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
        self.certs: DeploymentCerts = load_deployment_certs(Path(spec.certs_dir).resolve())  # processes run elsewhere
        check_deployment_certs(self.certs, hosts=[spec.host])
        ids = [r.rover_id for r in spec.rovers]
        if not ids:
            raise ValueError("a deployment needs at least one rover")
        if len(set(ids)) != len(ids):
            raise ValueError(f"rover ids are repeated: {ids}")
        if spec.clientapp not in CLIENTAPP_MODES:
            raise ValueError(f"clientapp must be one of {list(CLIENTAPP_MODES)}, got {spec.clientapp!r}")
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

    def supernode_command(self, rover: RoverNode, keys: RoverKeys | None = None, runtime_port: int | None = None,
                          name: str | None = None) -> list[str]:
        """What runs a rover's SuperNode (``keys``: another key set, e.g. to show that it is refused).

        ``clientapp="warm"``: the warm worker's argv wrapping ``flower-supernode --isolation process`` (its SuperExec
        secret in the process's home, ``homes/<name>/superexec.secret``); ``"subprocess"``: ``flower-supernode``.
        """
        keys = keys or self.certs.rover(rover.rover_id)
        port = runtime_port or self.runtime_ports.get(rover.rover_id) or free_ports(1)[0]
        warm = self.spec.clientapp == WARM
        secret = self.homes_dir / (name or f"supernode-{rover.rover_id}") / SECRET_FILE if warm else None
        argv = supernode_tls_command(self.bin_dir / "flower-supernode", self.superlink_address, self.certs.ca_cert,
                                     keys.auth_key, self._node_config_path(rover), port, keys.runtime_cert,
                                     keys.runtime_key, self.spec.connect_wait, secret_file=secret)
        return warm_command(argv, sys.executable) if warm else argv

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
        remember_descendants(superlink)
        self.nodes = self.register_rovers()
        if not self.spec.start_supernodes:
            return
        for rover in self.spec.rovers:
            self.start_supernode(rover)
        for rover in self.spec.rovers:
            node_id = self.wait_online(rover.rover_id)
            if node_id != self.nodes[rover.rover_id]:
                raise RuntimeError(f"rover {rover.rover_id}: SuperNode reports node id {node_id}, but its key was "
                                   f"registered as {self.nodes[rover.rover_id]} (see {self.nodes_path})")
        for process in self.processes.values():
            remember_descendants(process)

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
        return self._spawn(name, self.supernode_command(rover, keys, runtime_port, name), self.homes_dir / name)

    def wait_online(self, rover_id: str, name: str | None = None) -> int:
        """Wait until a rover's SuperNode has activated at the SuperLink; returns its node id."""
        process = self.processes[name or f"supernode-{rover_id}"]
        deadline = time.monotonic() + self.spec.start_timeout
        while time.monotonic() < deadline:
            match = re.search(SUPERNODE_READY, process.log_text())
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
        # the coordinator accepts a node as a rover only if that rover's registered key is the node's
        overrides.setdefault("node-registry", str(self.nodes_path.resolve()))
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
                terminate_group(process.pid)
                process.wait(10)
                raise RuntimeError(f"flwr run did not finish within {timeout:.0f} s; see {log_path}") from None
        wall = time.perf_counter() - start
        text = strip_ansi(log_path.read_text(errors="replace"))
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
            if is_alive(process.pid):
                out.append(process.pid)
            out += process_tree(process.pid) + group_members(process.pid)
            out += [pid for pid, started in process.seen.items() if is_alive(pid, started)]
        return sorted(set(out))

    def stop(self, grace: float = 10.0) -> None:
        """Stop every process (SuperNodes first, then the SuperLink) by pid and process group."""
        names = [n for n in self.processes if n != "superlink"] + [n for n in self.processes if n == "superlink"]
        for name in names:
            process = self.processes[name]
            remember_descendants(process)
            stop_process(process, grace)
            process.log_file.close()
        self.processes.clear()

    # ------------------------------------------------------------------ internals

    def _spawn(self, name: str, argv: list[str], home: Path) -> ManagedProcess:
        home.mkdir(parents=True, exist_ok=True)
        process = start_process(name, argv, self.logs_dir / f"{name}.log", self.environment(home), self.run_dir)
        self.processes[name] = process
        return process

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
