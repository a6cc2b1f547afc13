"""collab_node: the rover's side of collaborative learning in the ROS graph — validate, deploy, train locally.

The rover's Flower ClientApp runs inside its SuperNode, outside ROS; on every global model it receives it
writes ``<model_source>/global-r<round>.npz`` (node config ``model-drop-dir``; see ``docs/federated.md``).
This node polls that drop directory (or, with ``model_source`` ending in ``.db``, a coordinator's SQLite
store) every ``poll_period_s``. A new model goes through the validation gate of :mod:`collab.rover`: exported
to ONNX (+ model card) into ``models_dir``, evaluated with the model the depth node runs now on the rover's
held-out segments of ``dataset_dir``, accepted only if it is not worse than that model by more than
``gate_tolerance_absrel`` / ``gate_tolerance_delta1``. An accepted model is deployed by setting the depth
node's ``model_path`` through its parameter service (``<depth_node>/set_parameters``), which hot-swaps it;
the depth node's answer is reported. A refused model leaves the depth node alone; the reason is reported.

``~/train_now`` (std_srvs/Trigger) starts a local round (:func:`collab.flower.task.local_round` on the rover's
training segments, from the deployed model) whose result goes through the same gate; it is refused with the
reason while the rover moves (``odom`` speed above ``idle_speed_mps`` within the last ``idle_seconds``) and
``train_only_when_idle`` is set, or while the node is busy. ``auto_train_min_new_frames`` > 0 starts one by
itself when that many frames were recorded since the last and the rover is idle.

Publishes ``collab/status`` (std_msgs/String, JSON, reliable + transient local: a late subscriber gets the
last one) and ``/diagnostics``. Gating and training run on a worker thread; the ROS callbacks only poll and
queue. What was decided and deployed is kept in ``<models_dir>/collab_ledger.json`` (a restarted node does
not gate the same model again, and with ``restore_on_start`` puts the deployed model back on the depth node).

With ``supernode`` set, the node also takes part in federated rounds: it runs the rover's ``flower-supernode``
(TLS with ``root_certificates``, SuperNode authentication with ``auth_private_key``, a TLS Runtime API with the
``runtime.crt``/``runtime.key`` next to that key, node config ``data-dir`` = ``dataset_dir`` and
``model-drop-dir`` = ``model_source``) under :class:`collab.supervisor.SuperNodeSupervisor`, which restarts it
with backoff; its state is in ``collab/status`` (``supernode``) and ``/diagnostics``; it is stopped with the node.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from nav_msgs.msg import Odometry
from rcl_interfaces.msg import Parameter as ParameterMsg
from rcl_interfaces.msg import ParameterType, ParameterValue
from rcl_interfaces.srv import GetParameters, SetParameters
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from std_msgs.msg import String
from std_srvs.srv import Trigger

from forest_perception.collab.deploy.certs import ROVER_ID_PATTERN
from forest_perception.collab.deploy.processes import free_ports
from forest_perception.collab.deploy.supernode import SUPERNODE_READY, supernode_argv, supernode_environment
from forest_perception.collab.rover import (
    EXPORTERS,
    CandidateRef,
    DatasetScan,
    DatasetWatcher,
    DeploymentLedger,
    GateConfig,
    GateDecision,
    GlobalModel,
    IdleDetector,
    ValidationGate,
    build_local_data,
    holdout_split,
    initial_model,
    make_holdout,
    odometry_speed,
    open_model_source,
    prune_accepted,
    train_locally,
    train_permission,
)
from forest_perception.collab.supervisor import BACKOFF, FAILED, STOPPED, SuperNodeSupervisor
from forest_perception.nodes.common import (
    ParamSpec,
    add_validated_updates,
    declare_parameters,
    publish_node_diagnostics,
    run_node,
)

MODELS = ("autoencoder", "multiscale")
# wiring: fixed for the node's life
SUPERNODE_POLL_S = 1.0


PARAMS = [
    ParamSpec("dataset_dir", "data/forest", "the rover's recordings (forest dataset layout: Run-N/<segment>/...)",
              read_only=True),
    ParamSpec("models_dir", "models/deployed", "where gated models (ONNX + card), refused/ and the ledger go",
              read_only=True),
    ParamSpec("model_source", "models/incoming",
              "drop folder the rover's ClientApp writes global-r<round>.npz into, or a coordinator SQLite store (.db)",
              read_only=True),
    ParamSpec("depth_node", "depth_node", "depth node whose model_path is set (relative: in this namespace)",
              read_only=True),
    ParamSpec("holdout_fraction", 0.2, "share of segments held out for the gate (by segment hash)", (0.0, 0.9)),
    ParamSpec("holdout_seed", 0, "seed of the segment hash of the hold-out split", (0, 2**31 - 1)),
    ParamSpec("max_holdout_frames", 200, "held-out frames evaluated at most (spread evenly)", (1, 100_000)),
    ParamSpec("gate_tolerance_absrel", 0.0, "accept a candidate with AbsRel at most this much above the running model",
              (0.0, 1.0)),
    ParamSpec("gate_tolerance_delta1", 0.01, "accept a candidate with delta1 at most this much below the running model",
              (0.0, 1.0)),
    ParamSpec("gate_max_absrel", 1.0, "refuse a candidate above this AbsRel even with no running model", (0.0, 100.0)),
    ParamSpec("onnx_exporter", "dynamo", f"torch ONNX exporter: {list(EXPORTERS)}"),
    ParamSpec("keep_refused", 3, "refused candidates kept under models_dir/refused", (0, 1000)),
    ParamSpec("keep_accepted", 5, "accepted models kept in models_dir besides the deployed one", (1, 1000)),
    ParamSpec("train_only_when_idle", True, "refuse local training unless the rover stands still"),
    ParamSpec("idle_speed_mps", 0.05, "odometry speed at or below which the rover stands still", (0.0, 10.0)),
    ParamSpec("idle_seconds", 10.0, "how long the rover must stand still to be idle", (0.0, 3600.0)),
    ParamSpec("odom_timeout_s", 1.0, "no odometry for this long: not idle (odometry may be down)", (0.01, 600.0)),
    ParamSpec("auto_train_min_new_frames", 0,
              "train by itself when idle and this many new frames were recorded since the last training; "
              "0 = only ~/train_now", (0, 10_000_000)),
    ParamSpec("model", "autoencoder", f"network of global models without architecture meta: {list(MODELS)}"),
    ParamSpec("base_channels", 4, "auto-encoder width of global models without meta", (1, 256)),
    ParamSpec("input_height", 64, "network input height (multiple of 16)", (16, 4096)),
    ParamSpec("input_width", 80, "network input width (multiple of 16)", (16, 4096)),
    ParamSpec("min_depth_m", 0.1, "valid ground-truth depth from (training and evaluation)", (0.01, 100.0)),
    ParamSpec("max_depth_m", 10.0, "valid ground-truth depth up to", (0.1, 1000.0)),
    ParamSpec("batch_size", 4, "local training batch size", (1, 1024)),
    ParamSpec("local_epochs", 1, "local training epochs", (1, 1000)),
    ParamSpec("local_steps", 0, "local optimiser steps at most (0: whole epochs)", (0, 1_000_000)),
    ParamSpec("lr", 1e-3, "local AdamW learning rate", (1e-7, 1.0)),
    ParamSpec("max_train_frames", 2000, "training frames at most (spread evenly; memory)", (1, 1_000_000)),
    ParamSpec("torch_threads", 1, "threads for local training and evaluation", (1, 64)),
    ParamSpec("restore_on_start", True, "put the last deployed model back on the depth node at start"),
    ParamSpec("service_timeout_s", 10.0, "wait this long for the depth node's parameter services", (0.1, 600.0)),
    ParamSpec("poll_period_s", 5.0, "period of checking the model source and the dataset (read-only)",
              (0.05, 3600.0), read_only=True),
    ParamSpec("status_period_s", 2.0, "period of collab/status (read-only)", (0.1, 3600.0), read_only=True),
    ParamSpec("diagnostics_period_s", 1.0, "period of /diagnostics (read-only)", (0.1, 60.0), read_only=True),
    ParamSpec("supernode", False, "run and supervise the rover's flower-supernode (read-only)", read_only=True),
    ParamSpec("superlink_address", "127.0.0.1:8000", "host:port of the SuperLink's Fleet API (read-only)",
              read_only=True),
    ParamSpec("root_certificates", "", "CA certificate (PEM) verifying the SuperLink, e.g. certs/ca.crt (read-only)",
              read_only=True),
    ParamSpec("auth_private_key", "",
              "the rover's SuperNode authentication key, e.g. certs/rovers/<id>/auth.key; "
              "runtime.crt and runtime.key are taken from its folder (read-only)", read_only=True),
    ParamSpec("rover_id", "", "rover id in the SuperNode's node config; empty: the namespace (read-only)",
              read_only=True),
    ParamSpec("supernode_executable", "flower-supernode", "SuperNode program: a path or a name on PATH (read-only)",
              read_only=True),
    ParamSpec("supernode_log", "", "SuperNode log file; empty: <models_dir>/supernode/supernode.log (read-only)",
              read_only=True),
]


class CollabNode(Node):
    """Thin ROS wrapper over :mod:`forest_perception.collab.rover` (gate, local training, idleness, ledger)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("collab_node", **kwargs)
        self.p = declare_parameters(self, PARAMS, self._validate)
        self._lock = threading.Lock()  # guards everything the worker and the callbacks share
        self._wake = threading.Condition(self._lock)
        self._pending: tuple[str, Any] | None = None
        self.state = "idle"
        self.activity = ""
        self.counts = {"accepted": 0, "refused": 0, "deployed": 0, "deploy_failed": 0, "trainings": 0,
                       "training_failed": 0, "odom_malformed": 0, "source_errors": 0, "dataset_errors": 0,
                       "depth_node_errors": 0}
        self.last_error = ""
        self.fault = ""  # what stops the node from doing its job right now (ERROR diagnostics)
        self.last_decision: dict[str, Any] | None = None
        self.local_metrics: dict[str, float] = {}
        self.latest_round: int | None = None
        self.running_model = ""
        self.running_version = ""
        self._retry_after: dict[str, float] = {}
        self._waiting_for_data: set[str] = set()  # candidates refused for want of held-out frames
        # first job: learn what the depth node runs (and put the deployed model back); retried until it answers
        self._sync_wanted = True
        self._dataset_errors: dict[str, str] = {}
        self._scan = DatasetScan([])
        self._frames_at_last_train: int | None = None
        self._train_counter = 0

        self._idle = IdleDetector(self.p["idle_speed_mps"], self.p["idle_seconds"], self.p["odom_timeout_s"])
        self._watcher = DatasetWatcher(self.p["dataset_dir"])
        self._source = open_model_source(self.p["model_source"])
        self._ledger = DeploymentLedger(self.p["models_dir"])
        if self._ledger.current:
            self.running_model = str(self._ledger.current.get("model_path") or "")
            self.running_version = str(self._ledger.current.get("model_version") or "")

        depth = self.p["depth_node"].rstrip("/")
        self._set_client = self.create_client(SetParameters, f"{depth}/set_parameters")
        self._get_client = self.create_client(GetParameters, f"{depth}/get_parameters")
        latched = QoSProfile(
            depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
        )
        self.status_pub = self.create_publisher(String, "collab/status", latched)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", QoSProfile(depth=10))
        # best effort subscribes to reliable and best-effort odometry publishers alike
        self.create_subscription(Odometry, "odom", self._on_odom, qos_profile_sensor_data)
        self.create_service(Trigger, "~/train_now", self._on_train_now)
        add_validated_updates(self, PARAMS, lambda: self.p, self._validate, self._commit)
        self.create_timer(self.p["poll_period_s"], self._poll)
        self.create_timer(self.p["status_period_s"], self.publish_status)
        self.create_timer(self.p["diagnostics_period_s"], self._publish_diagnostics)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="collab_worker", daemon=True)
        self._thread.start()
        # the rover's Flower SuperNode (optional); a problem with it is reported, the node runs on
        self._supernode_lock = threading.Lock()
        self.supervisor: SuperNodeSupervisor | None = None
        self.supernode_error = ""
        if self.p["supernode"]:
            self._start_supernode()
            self.create_timer(SUPERNODE_POLL_S, self._poll_supernode)

    # ---------------------------------------------------------------- parameters
    @staticmethod
    def _validate(p: dict[str, Any]) -> str:
        """Why ``p`` is not a usable configuration ("" if it is)."""
        if p["onnx_exporter"] not in EXPORTERS:
            return f"onnx_exporter must be one of {list(EXPORTERS)}, got {p['onnx_exporter']!r}"
        if p["model"] not in MODELS:
            return f"model must be one of {list(MODELS)}, got {p['model']!r}"
        for name in ("input_height", "input_width"):
            if p[name] % 16:
                return f"{name} must be a multiple of 16, got {p[name]}"
        if p["min_depth_m"] >= p["max_depth_m"]:
            return f"min_depth_m ({p['min_depth_m']}) must be below max_depth_m ({p['max_depth_m']})"
        for name in ("dataset_dir", "models_dir", "model_source", "depth_node"):
            if not str(p[name]).strip():
                return f"{name} must not be empty"
        return ""

    def _commit(self, _old: dict[str, Any], new: dict[str, Any]) -> None:
        with self._lock:
            self.p = new
            # thresholds apply to the samples already seen: no history is lost
            self._idle.idle_speed_mps = float(new["idle_speed_mps"])
            self._idle.idle_seconds = float(new["idle_seconds"])
            self._idle.odom_timeout_s = float(new["odom_timeout_s"])

    def task_config(self, p: dict[str, Any] | None = None) -> Any:  # noqa: ANN401 - forest_perception.collab.flower.task.TaskConfig
        """The rover's task settings from the parameters (architecture of models that carry none)."""
        from forest_perception.collab.flower.task import TaskConfig

        p = p or self.p
        return TaskConfig(
            model=p["model"], base_channels=p["base_channels"], input_hw=(p["input_height"], p["input_width"]),
            batch_size=p["batch_size"], local_epochs=p["local_epochs"], local_steps=p["local_steps"], lr=p["lr"],
            min_depth=p["min_depth_m"], max_depth=p["max_depth_m"], seed=p["holdout_seed"],
            threads=p["torch_threads"],
        ).validate()

    def _gate(self, p: dict[str, Any]) -> ValidationGate:
        config = GateConfig(
            tolerance_absrel=p["gate_tolerance_absrel"], tolerance_delta1=p["gate_tolerance_delta1"],
            max_absrel=p["gate_max_absrel"], exporter=p["onnx_exporter"], threads=p["torch_threads"],
            keep_refused=p["keep_refused"],
        )
        return ValidationGate(p["models_dir"], config)

    # ---------------------------------------------------------------- inputs
    def _now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _on_odom(self, msg: Odometry) -> None:
        linear = msg.twist.twist.linear
        try:
            speed = odometry_speed((linear.x, linear.y, linear.z))
            with self._lock:
                self._idle.update(self._now(), speed)
        except ValueError as exc:
            with self._lock:
                self.counts["odom_malformed"] += 1
                self.last_error = f"odom: {exc}"
            self.get_logger().warning(f"dropped odometry: {exc}", throttle_duration_sec=5.0)

    def idle_state(self) -> tuple[bool, str]:
        """``(idle, why)`` now."""
        with self._lock:
            return self._idle.state(self._now())

    def _busy(self) -> str:
        if self._pending is not None:
            return f"{self._pending[0]} queued"
        return "" if self.state == "idle" else f"{self.state} {self.activity}".strip()

    def _on_train_now(self, _request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        ok, message = self.request_training("~/train_now")
        response.success, response.message = ok, message
        return response

    def request_training(self, why: str) -> tuple[bool, str]:
        """Queue a local training if the rover may train now; ``(queued, reason)``."""
        idle, idle_reason = self.idle_state()
        with self._lock:
            ok, reason = train_permission(idle, idle_reason, bool(self.p["train_only_when_idle"]), self._busy())
            if ok:
                train, _ = self._split_locked()
                if not train:
                    ok, reason = False, f"no training frames in {self.p['dataset_dir']} (need a recorded segment " \
                                        "that is not held out)"
            if ok:
                self._pending = ("train", why)
                self._wake.notify()
        if ok:
            self.get_logger().info(f"local training queued ({why}; {reason})")
            return True, f"local training started ({reason})"
        return False, f"local training refused: {reason}"

    # ---------------------------------------------------------------- polling
    def _split_locked(self) -> tuple[list[str], list[str]]:
        ids = [s.segment_id for s in self._scan.segments if s.frames > 0]
        return holdout_split(ids, float(self.p["holdout_fraction"]), int(self.p["holdout_seed"]))

    def _poll(self) -> None:
        scan = self._watcher.scan()
        with self._lock:
            self._scan = scan
            new_errors = {k: v for k, v in scan.errors.items() if self._dataset_errors.get(k) != v}
            self._dataset_errors = dict(scan.errors)
            self.counts["dataset_errors"] += len(new_errors)
            if self._frames_at_last_train is None:
                self._frames_at_last_train = scan.frames
            if scan.changed:
                self._waiting_for_data.clear()  # new frames: a candidate refused for want of them gets its turn
        for path, error in new_errors.items():
            self.get_logger().warning(f"segment {path} skipped: {error}")
        try:
            ref = self._source.latest()
        except ValueError as exc:
            self._set_fault(f"model source: {exc}", "source_errors")
            ref = None
        now = time.monotonic()
        with self._lock:
            if ref is not None:
                self.latest_round = ref.round if ref.round is not None else self.latest_round
            if self.fault.startswith("model source") and ref is not None:
                self.fault = ""
            free = self._pending is None and self.state == "idle"
            wanted = (free and ref is not None and not self._ledger.seen(ref.key)
                      and ref.key not in self._waiting_for_data and now >= self._retry_after.get(ref.key, 0.0))
            if wanted:
                self._pending = ("gate", ref)
                self._wake.notify()
            elif free and self._sync_wanted and now >= self._retry_after.get("sync", 0.0):
                self._pending = ("sync", None)
                self._wake.notify()
                wanted = True
        if not wanted and self.p["auto_train_min_new_frames"] > 0:
            self._maybe_auto_train()

    def _maybe_auto_train(self) -> None:
        with self._lock:
            new_frames = self._scan.frames - (self._frames_at_last_train or 0)
            due = new_frames >= self.p["auto_train_min_new_frames"] and not self._busy()
        if due and self.idle_state()[0]:
            self.request_training(f"auto: {new_frames} new frames")

    def _set_fault(self, error: str, counter: str) -> None:
        with self._lock:
            self.fault = self.last_error = error
            self.counts[counter] += 1
        self.get_logger().error(error, throttle_duration_sec=10.0)

    # ---------------------------------------------------------------- the SuperNode
    def supernode_config_error(self) -> str:
        """Why the SuperNode cannot be started with the parameters ("" if it can); names the missing file."""
        p = self.p
        if not str(p["superlink_address"]).strip():
            return "superlink_address must not be empty"
        if str(p["model_source"]).endswith(".db"):
            return f"model_source {p['model_source']!r} is a coordinator store; the SuperNode needs a drop folder"
        if not ROVER_ID_PATTERN.match(self.supernode_rover_id()):
            return (f"rover_id {self.supernode_rover_id()!r} is not a rover id (letters, digits, '_', '.', '-'); "
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

    def supernode_rover_id(self) -> str:
        """``rover_id``, or the node's namespace without slashes."""
        return str(self.p["rover_id"]).strip() or self.get_namespace().strip("/").replace("/", "_")

    def _start_supernode(self) -> None:
        p = self.p
        error = self.supernode_config_error()
        if error:
            self.supernode_error = f"SuperNode not started: {error}"
            self.get_logger().error(self.supernode_error)
            return
        log = Path(p["supernode_log"] or Path(p["models_dir"]) / "supernode" / "supernode.log").resolve()
        home = log.parent / "flwr_home"
        key = Path(p["auth_private_key"]).resolve()
        Path(p["model_source"]).mkdir(parents=True, exist_ok=True)
        try:
            argv = supernode_argv(
                str(p["superlink_address"]), Path(p["root_certificates"]).resolve(), key, p["dataset_dir"],
                self.supernode_rover_id(), p["model_source"], executable=str(p["supernode_executable"]),
                node_config_file=log.parent / "node_config.toml", runtime_port=free_ports(1)[0],
                runtime_cert=key.with_name("runtime.crt"), runtime_key=key.with_name("runtime.key"))
            supervisor = SuperNodeSupervisor(argv, supernode_environment(home, log.parent / "cache"), log,
                                             ready_pattern=SUPERNODE_READY)
        except (ValueError, OSError) as exc:
            self.supernode_error = f"SuperNode not started: {exc}"
            self.get_logger().error(self.supernode_error)
            return
        with self._supernode_lock:
            self.supervisor = supervisor
            state = supervisor.start()
        if state == FAILED:
            self.get_logger().error(f"SuperNode: {supervisor.reason}")
        else:
            self.get_logger().info(f"SuperNode of rover {self.supernode_rover_id()} started for "
                                   f"{p['superlink_address']} (log {log})")

    def _poll_supernode(self) -> None:
        with self._supernode_lock:
            if self.supervisor is None:
                return
            before = self.supervisor.state
            state = self.supervisor.poll()
            reason = self.supervisor.reason
        if state == before:
            return
        # rclpy refuses two severities from one call site: one call per severity
        if state in (BACKOFF, FAILED):
            self.get_logger().warning(f"SuperNode {before} -> {state}: {reason}")
        else:
            self.get_logger().info(f"SuperNode {before} -> {state}: {reason}")

    def supernode_status(self) -> dict[str, Any]:
        """The SuperNode part of ``collab/status``: state, restarts, node id, last log line, reason."""
        with self._supernode_lock:
            if self.supervisor is None:
                enabled = bool(self.p["supernode"])
                return {"enabled": enabled, "state": FAILED if enabled else STOPPED, "restarts": 0,
                        "reason": self.supernode_error, "node_id": "", "last_line": "", "pid": None}
            status = self.supervisor.status()
        status["node_id"] = status.pop("ready_match")
        status["enabled"] = True
        return status

    # ---------------------------------------------------------------- worker
    def _run(self) -> None:
        while not self._stop.is_set():
            with self._wake:
                if self._pending is None:
                    self._wake.wait(timeout=0.2)
                job, self._pending = self._pending, None
                if job is not None:
                    self.state = {"gate": "gating", "train": "training", "sync": "syncing"}[job[0]]
                    self.activity = job[1].label if isinstance(job[1], CandidateRef) else str(job[1] or "")
            if job is None:
                continue
            self.publish_status()
            try:
                if job[0] == "gate":
                    self._gate_global(job[1])
                elif job[0] == "train":
                    self._train()
                else:
                    self._sync()
            except Exception as exc:  # noqa: BLE001 - a failed job is reported, the worker lives on
                with self._lock:
                    self.last_error = f"{job[0]}: {type(exc).__name__}: {exc}"
                self.get_logger().error(self.last_error)
            finally:
                with self._lock:
                    self.state, self.activity = "idle", ""
                self.publish_status()

    def _call(self, client: Any, request: Any, what: str) -> Any:  # noqa: ANN401 - rclpy client/request/response
        timeout = float(self.p["service_timeout_s"])
        if not client.wait_for_service(timeout_sec=timeout):
            raise RuntimeError(f"{what}: service {client.srv_name} not available after {timeout} s")
        future = client.call_async(request)
        done = threading.Event()
        future.add_done_callback(lambda _future: done.set())
        if not done.wait(timeout) or future.result() is None:
            client.remove_pending_request(future)
            raise RuntimeError(f"{what}: no answer from {client.srv_name} within {timeout} s")
        return future.result()

    def depth_model_path(self) -> str:
        """The depth node's ``model_path`` now (``RuntimeError`` when its parameter service does not answer)."""
        request = GetParameters.Request(names=["model_path"])
        response = self._call(self._get_client, request, "reading the depth node's model_path")
        if not response.values:
            raise RuntimeError(f"{self._get_client.srv_name} returned no value for model_path")
        return str(response.values[0].string_value)

    def set_depth_model_path(self, path: str) -> tuple[bool, str]:
        """Set the depth node's ``model_path``; ``(successful, reason)`` as the depth node answers."""
        value = ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=str(path))
        request = SetParameters.Request(parameters=[ParameterMsg(name="model_path", value=value)])
        response = self._call(self._set_client, request, "setting the depth node's model_path")
        if not response.results:
            return False, f"{self._set_client.srv_name} returned no result"
        result = response.results[0]
        return bool(result.successful), str(result.reason)

    def _running_model(self) -> str | None:
        try:
            path = self.depth_model_path()
        except RuntimeError as exc:
            self._set_fault(f"depth node: {exc}", "depth_node_errors")
            return None
        version = self.running_version if path == self.running_model else _onnx_version(path)
        with self._lock:
            if self.fault.startswith("depth node"):
                self.fault = ""
            self.running_model, self.running_version = path, version
        return path

    def _holdout(self) -> tuple[Any, list, list]:
        with self._lock:
            train_ids, held_ids = self._split_locked()
            parsed = {s.segment_id: s.segment for s in self._scan.segments}
            max_frames = int(self.p["max_holdout_frames"])
        train = [parsed[i] for i in train_ids]
        held = [parsed[i] for i in held_ids]
        return make_holdout(held, max_frames), train, held

    def _gate_global(self, ref: CandidateRef) -> None:
        running = self._running_model()
        if running is None:
            with self._lock:  # depth node away: try this candidate again later, do not mark it decided
                self._retry_after[ref.key] = time.monotonic() + max(5.0, float(self.p["service_timeout_s"]))
            return
        p = dict(self.p)
        try:
            candidate: GlobalModel | str = self._source.load(ref)
        except ValueError as exc:
            decision = GateDecision(False, "unreadable", str(exc), ref.label, ref.round)
            self._finish(ref.key, decision, None)
            return
        holdout, _, _ = self._holdout()
        decision = self._gate(p).check(candidate, running, holdout, self.task_config(p), label=ref.label)
        self._finish(ref.key, decision, candidate if decision.accepted else None)

    def _train(self) -> None:
        p = dict(self.p)
        task = self.task_config(p)
        holdout, train, held = self._holdout()
        with self._lock:
            self._frames_at_last_train = self._scan.frames
            self._train_counter += 1
            label = f"local-{time.strftime('%Y%m%d-%H%M%S')}-{self._train_counter}"
        base = self._ledger.current_model() or initial_model(task)
        try:
            data = build_local_data(train, held, base.task_config(task), p["max_train_frames"],
                                    p["max_holdout_frames"], label=str(p["dataset_dir"]))
            result = train_locally(base, data, task, seed=self._train_counter, label=label)
        except (ValueError, FloatingPointError, OSError) as exc:
            with self._lock:
                self.counts["training_failed"] += 1
                self.last_error = f"local training: {exc}"
            self.get_logger().error(self.last_error)
            return
        with self._lock:
            self.counts["trainings"] += 1
            self.local_metrics = {k: float(v) for k, v in result.metrics.items()}
        self.get_logger().info(f"local training {label}: " + ", ".join(
            f"{k} {v:.4g}" for k, v in result.metrics.items() if k in ("train-loss", "absrel", "delta1", "steps")))
        running = self._running_model()
        if running is None:
            return
        decision = self._gate(p).check(result.model, running, holdout, task, label=label)
        self._finish(f"local:{label}", decision, result.model if decision.accepted else None)

    def _finish(self, key: str, decision: GateDecision, model: GlobalModel | None) -> None:
        deployed, deploy_error = False, ""
        if decision.accepted:
            with self._lock:
                self.state = "deploying"
            try:
                deployed, deploy_error = self.set_depth_model_path(decision.model_path)
            except RuntimeError as exc:
                deploy_error = str(exc)
            if not deployed:
                deploy_error = f"depth node refused model_path {decision.model_path!r}: {deploy_error}"
        with self._lock:
            if decision.code == "no_holdout":
                self._waiting_for_data.add(key)  # not decided: gated again when the dataset changes
            else:
                self._ledger.record(key, decision, deployed, deploy_error, model)
            if deployed:
                prune_accepted(self.p["models_dir"], int(self.p["keep_accepted"]), {decision.model_path})
            self.counts["accepted" if decision.accepted else "refused"] += 1
            entry = decision.to_dict()
            entry.update({"deployed": deployed, "deploy_error": deploy_error})
            self.last_decision = entry
            if deployed:
                self.counts["deployed"] += 1
                self.running_model, self.running_version = decision.model_path, decision.model_version
            elif deploy_error:
                self.counts["deploy_failed"] += 1
                self.last_error = deploy_error
        if deployed:
            self.get_logger().info(f"deployed {decision.label} ({decision.model_version}): {decision.reason}")
        elif decision.accepted:
            self.get_logger().error(f"{decision.label} passed the gate but was not deployed: {deploy_error}")
        else:
            self.get_logger().warning(f"refused {decision.label} ({decision.code}): {decision.reason}")

    def _sync(self) -> None:
        running = self._running_model()
        if running is None:  # depth node not up yet: again later
            with self._lock:
                self._retry_after["sync"] = time.monotonic() + max(5.0, float(self.p["service_timeout_s"]))
            return
        self._sync_wanted = False
        current = self._ledger.current or {}
        path = str(current.get("model_path") or "")
        if not self.p["restore_on_start"] or not path or running == path:
            return
        if not Path(path).is_file():
            with self._lock:
                self.last_error = f"deployed model {path!r} is gone; the depth node keeps {running!r}"
            self.get_logger().warning(self.last_error)
            return
        ok, reason = self.set_depth_model_path(path)
        with self._lock:
            if ok:
                self.running_model = path
                self.running_version = str(current.get("model_version") or "")
            else:
                self.last_error = f"restoring {path!r} on the depth node failed: {reason}"
        self.get_logger().info(f"restored deployed model {path}" if ok else self.last_error)

    # ---------------------------------------------------------------- status and diagnostics
    def status_dict(self) -> dict[str, Any]:
        """What ``collab/status`` carries (JSON object)."""
        idle, idle_reason = self.idle_state()
        with self._lock:
            train_ids, held_ids = self._split_locked()
            frames = {s.segment_id: s.frames for s in self._scan.segments}
            status = {
                "state": self.state,
                "activity": self.activity,
                "round": self.latest_round,
                "model_version": self.running_version,
                "model_path": self.running_model,
                "deployed": self._ledger.current,
                "local_metrics": dict(self.local_metrics),
                "last_gate": self.last_decision,
                "idle": idle,
                "idle_reason": idle_reason,
                "dataset": {
                    "segments": len(frames),
                    "frames": sum(frames.values()),
                    "train_segments": train_ids,
                    "holdout_segments": held_ids,
                    "holdout_frames": sum(frames.get(i, 0) for i in held_ids),
                    "new_frames_since_training": self._scan.frames - (self._frames_at_last_train or 0),
                },
                "counts": dict(self.counts),
                "last_error": self.last_error,
                "fault": self.fault,
            }
        status["supernode"] = self.supernode_status()
        return status

    def publish_status(self) -> None:
        """Publish ``collab/status`` now."""
        text = json.dumps(_clean(self.status_dict()), sort_keys=True)
        self.status_pub.publish(String(data=text))

    def diagnostics_values(self) -> tuple[int, str, dict[str, object]]:
        """(level, message, key/values) of the node's health right now."""
        status = self.status_dict()
        last = status["last_gate"] or {}
        values: dict[str, object] = {
            "state": status["state"],
            "global_round": status["round"],
            "model_version": status["model_version"],
            "model_path": status["model_path"],
            "last_gate": f"{last.get('label', '')}: {last.get('code', '')}: {last.get('reason', '')}" if last else "",
            "idle": status["idle"],
            "idle_reason": status["idle_reason"],
            "dataset_frames": status["dataset"]["frames"],
            "holdout_frames": status["dataset"]["holdout_frames"],
            **{f"count_{k}": v for k, v in status["counts"].items()},
            "last_error": status["last_error"],
        }
        supernode = status["supernode"]
        if supernode["enabled"]:
            values.update({"supernode_state": supernode["state"], "supernode_restarts": supernode["restarts"],
                           "supernode_node_id": supernode["node_id"], "supernode_last_line": supernode["last_line"],
                           "supernode_reason": supernode["reason"]})
        errors = [status["fault"]] if status["fault"] else []
        if supernode["enabled"] and supernode["state"] == FAILED:
            errors.append(f"SuperNode: {supernode['reason']}")
        if errors:
            return DiagnosticStatus.ERROR, "; ".join(errors), values
        if supernode["enabled"] and supernode["state"] == BACKOFF:
            return DiagnosticStatus.WARN, f"SuperNode: {supernode['reason']}", values
        if last.get("deploy_error"):
            return DiagnosticStatus.WARN, f"deploy failed: {last['deploy_error']}", values
        if not status["dataset"]["holdout_frames"]:
            return DiagnosticStatus.WARN, "no held-out frames: new models cannot be validated", values
        return DiagnosticStatus.OK, status["state"], values

    def _publish_diagnostics(self) -> None:
        publish_node_diagnostics(self, self.diag_pub, "collab_node", *self.diagnostics_values())

    def destroy_node(self) -> None:
        """Stop the SuperNode (its whole process group), the worker (after its current job), then the node."""
        with self._supernode_lock:  # kept (state "stopped"): polling a stopped supervisor starts nothing
            if self.supervisor is not None:
                self.supervisor.stop()
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=30.0)
        super().destroy_node()


def _onnx_version(path: str) -> str:
    """``version`` from an ONNX model's metadata ("" when there is none or the file does not read)."""
    if not path.endswith(".onnx"):
        return ""
    try:
        from forest_perception.inference import read_onnx_metadata

        return str(read_onnx_metadata(path).get("version", ""))
    except Exception:  # noqa: BLE001 - only a label for the status
        return ""


def _clean(value: Any) -> Any:  # noqa: ANN401 - JSON-able value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def main(args: list[str] | None = None) -> None:
    """Entry point of ``ros2 run forest_perception collab_node``."""
    run_node(CollabNode, "collab_node", args)


if __name__ == "__main__":
    main()

