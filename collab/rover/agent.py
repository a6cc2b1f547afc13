"""What collab_node decides and does, without ROS: watch, gate, deploy, sync and train, one job at a time.

:class:`CollabAgent` holds the node's state. The node's timer calls :meth:`~CollabAgent.poll`, which
returns the next job; its worker thread runs it with :meth:`~CollabAgent.run`. The depth node is reached
through two callables (read and set its ``model_path``), so the agent runs in tests without ROS.
See ``docs/federated.md`` ("The rover's collab_node").
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from forest_perception.collab.rover.dataset import DatasetScan, DatasetWatcher
from forest_perception.collab.rover.gate import GateDecision, ValidationGate, prune_accepted
from forest_perception.collab.rover.holdout import HoldoutSet, make_holdout, rover_split
from forest_perception.collab.rover.idle import IdleDetector, odometry_speed, train_permission
from forest_perception.collab.rover.ledger import DeploymentLedger
from forest_perception.collab.rover.models import GlobalModel
from forest_perception.collab.rover.releases import NO_RELEASE_KEY
from forest_perception.collab.rover.settings import Params, gate_config, task_config
from forest_perception.collab.rover.sources import CandidateRef, SourceUnavailableError, open_model_source
from forest_perception.collab.rover.training import build_local_data, initial_model, train_locally
from forest_perception.dataset_tools.layout import Segment

Job = tuple[str, Any]
"""``("gate", CandidateRef)``, ``("train", why)``, ``("sync", None)``, ``("switch", (key, path, version, why))`` or
``("rollback", None)``."""
JOB_STATES = {"gate": "gating", "train": "training", "sync": "syncing", "switch": "switching",
              "rollback": "rolling back"}
COUNTS = ("accepted", "refused", "deployed", "deploy_failed", "trainings", "training_failed", "odom_malformed",
          "source_errors", "dataset_errors", "depth_node_errors", "switches", "rollbacks")
FAULT_LOG_PERIOD_S = 10.0


class Log(Protocol):
    """What the agent logs through (an rclpy or a ``logging`` logger)."""

    def info(self, message: str) -> Any:  # noqa: ANN401 - whatever the logger returns
        """Log at INFO."""

    def warning(self, message: str) -> Any:  # noqa: ANN401
        """Log at WARN."""

    def error(self, message: str) -> Any:  # noqa: ANN401
        """Log at ERROR."""


class CollabAgent:
    """The rover's collaborative-learning state and jobs; every attribute the callbacks share is under ``lock``.

    ``depth_model_path()`` returns the depth node's ``model_path`` and ``set_depth_model_path(path)`` sets it
    (``(successful, reason)``); both raise ``RuntimeError`` when the depth node does not answer. ``now`` is
    the clock of odometry stamps (ROS time in the node), ``on_change`` is called when a job starts and ends.
    """

    def __init__(self, p: Params, depth_model_path: Callable[[], str],
                 set_depth_model_path: Callable[[str], tuple[bool, str]], log: Log,
                 now: Callable[[], float] = time.monotonic, on_change: Callable[[], None] = lambda: None,
                 source: Any = None) -> None:  # noqa: ANN401 - a model source (sources.ModelSource)
        self.p = p
        self._get_depth = depth_model_path
        self._set_depth = set_depth_model_path
        self.log = log
        self.now = now
        self.on_change = on_change
        self.lock = threading.Lock()
        self.state = "idle"
        self.activity = ""
        self.queued: Job | None = None  # handed to the worker, not started yet
        self.counts = dict.fromkeys(COUNTS, 0)
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
        self._fault_logged: tuple[str, float] = ("", 0.0)
        self.idle = IdleDetector(p["idle_speed_mps"], p["idle_seconds"], p["odom_timeout_s"])
        self._watcher = DatasetWatcher(p["dataset_dir"])
        self._source = source if source is not None else open_model_source(p["model_source"])
        self.ledger = DeploymentLedger(p["models_dir"])
        if self.ledger.current:
            self.running_model = str(self.ledger.current.get("model_path") or "")
            self.running_version = str(self.ledger.current.get("model_version") or "")

    @property
    def source(self) -> Any:  # noqa: ANN401 - a model source (sources.ModelSource)
        """Where the agent's candidate models come from."""
        return self._source

    def set_parameters(self, p: Params) -> None:
        """Take a validated parameter set; idleness thresholds apply to the samples already seen."""
        with self.lock:
            self.p = p
            self.idle.idle_speed_mps = float(p["idle_speed_mps"])
            self.idle.idle_seconds = float(p["idle_seconds"])
            self.idle.odom_timeout_s = float(p["odom_timeout_s"])

    # ---------------------------------------------------------------- inputs
    def odometry(self, linear: tuple[float, float, float]) -> str:
        """Add an odometry sample (linear velocity, m/s) at ``now()``; the reason it was dropped, or ""."""
        try:
            speed = odometry_speed(linear)
            with self.lock:
                self.idle.update(self.now(), speed)
        except ValueError as exc:
            with self.lock:
                self.counts["odom_malformed"] += 1
                self.last_error = f"odom: {exc}"
            return str(exc)
        return ""

    def idle_state(self) -> tuple[bool, str]:
        """``(idle, why)`` now."""
        with self.lock:
            return self.idle.state(self.now())

    def _busy(self) -> str:
        if self.queued is not None:
            return f"{self.queued[0]} queued"
        return "" if self.state == "idle" else f"{self.state} {self.activity}".strip()

    def request_training(self, why: str) -> tuple[Job | None, str]:
        """A local training job if the rover may train now (for the worker), and the answer to the caller."""
        idle, idle_reason = self.idle_state()
        with self.lock:
            ok, reason = train_permission(idle, idle_reason, bool(self.p["train_only_when_idle"]), self._busy())
            if ok and not self._split_locked()[0]:
                ok, reason = False, f"no training frames in {self.p['dataset_dir']} (need a recorded segment " \
                                    "that is not held out)"
            job: Job | None = ("train", why) if ok else None
            self.queued = job or self.queued
        if job is None:
            return None, f"local training refused: {reason}"
        self.log.info(f"local training queued ({why}; {reason})")
        return job, f"local training started ({reason})"

    # ---------------------------------------------------------------- polling
    def _split_locked(self) -> tuple[list[str], list[str]]:
        frames = {s.segment_id: s.frames for s in self._scan.segments}
        return rover_split(frames, float(self.p["holdout_fraction"]), int(self.p["holdout_seed"]))

    def poll(self) -> Job | None:
        """Rescan the dataset and the model source; the job to run next (gate, sync or auto-training), if any."""
        scan = self._watcher.scan()
        with self.lock:
            self._scan = scan
            new_errors = {k: v for k, v in scan.errors.items() if self._dataset_errors.get(k) != v}
            self._dataset_errors = dict(scan.errors)
            self.counts["dataset_errors"] += len(new_errors)
            if self._frames_at_last_train is None:
                self._frames_at_last_train = scan.frames
            if scan.changed:
                self._waiting_for_data.clear()  # new frames: a candidate refused for want of them gets its turn
        for path, error in new_errors.items():
            self.log.warning(f"segment {path} skipped: {error}")
        try:
            ref = self._source.latest()
        except ValueError as exc:
            self._set_fault(f"model source: {exc}", "source_errors")
            ref = None
        now = time.monotonic()
        with self.lock:
            if ref is not None:
                self.latest_round = ref.round if ref.round is not None else self.latest_round
            if self.fault.startswith("model source") and ref is not None:
                self.fault = ""
            free = self.queued is None and self.state == "idle"
            job: Job | None = None
            switch = self._assigned_switch(ref) if free and ref is not None and ref.assigned else None
            if switch is not None:
                job = ("switch", switch)
            elif (free and ref is not None and ref.key != NO_RELEASE_KEY and not self.ledger.seen(ref.key)
                    and ref.key not in self._waiting_for_data and now >= self._retry_after.get(ref.key, 0.0)):
                job = ("gate", ref)
            elif free and self._sync_wanted and now >= self._retry_after.get("sync", 0.0):
                job = ("sync", None)
            self.queued = job or self.queued
        if job is None and self.p["auto_train_min_new_frames"] > 0:
            job = self._auto_training()
        return job

    def _assigned_switch(self, ref: CandidateRef) -> tuple[str, str, str, str] | None:
        """For a model the coordinator assigns (lock held): ``(key, path, version, why)`` when the rover already has
        it gated and only has to switch to it (a release accepted before, or "no release": the model it ran before
        any release), else None (gate it, or nothing to do)."""
        current_key = str((self.ledger.current or {}).get("key", ""))
        if self.ledger.declined and ref.key != self.ledger.declined:
            self.ledger.declined = ""  # the coordinator moved on from the release this rover rolled back
            self.ledger.save()
        if ref.key in (current_key, self.ledger.declined):
            return None
        if ref.key == NO_RELEASE_KEY:
            base = self.ledger.release_base
            if not current_key.startswith("release:") or not base or not Path(str(base["model_path"])).is_file():
                return None
            return ("", str(base["model_path"]), str(base.get("model_version") or ""),
                    f"the coordinator withdrew {current_key.split(':', 1)[1]}: back to the model before releases")
        known = self.ledger.accepted_path(ref.key)
        if known is None:
            return None
        return (ref.key, known[0], known[1], f"the coordinator assigns {ref.label} again (gated before)")

    def request_rollback(self) -> tuple[Job | None, str]:
        """A job that switches the depth node back to the model it ran before the current one (the instant local
        rollback), and the answer to the caller; None with the reason when there is nothing to go back to."""
        with self.lock:
            previous = self.ledger.previous
            busy = self._busy()
            if not previous or not previous.get("model_path"):
                return None, "nothing to roll back to: no model was deployed before the current one"
            if not Path(str(previous["model_path"])).is_file():
                return None, f"the previous model {previous['model_path']} is gone"
            if busy:
                return None, f"busy ({busy}); try again"
            self.queued = ("rollback", None)
        return self.queued, f"rolling back to {previous['model_path']}"

    def _rollback(self) -> None:
        with self.lock:
            previous = dict(self.ledger.previous or {})
            current_key = str((self.ledger.current or {}).get("key", ""))
        path = str(previous.get("model_path") or "")
        self._switch(str(previous.get("key") or ""), path, str(previous.get("model_version") or ""), "local rollback")
        with self.lock:
            if path and self.running_model == path:
                self.counts["rollbacks"] += 1
                if current_key.startswith("release:"):  # keep it off while the coordinator still assigns it
                    self.ledger.declined = current_key
                    self.ledger.save()

    def _auto_training(self) -> Job | None:
        with self.lock:
            new_frames = self._scan.frames - (self._frames_at_last_train or 0)
            due = new_frames >= self.p["auto_train_min_new_frames"] and not self._busy()
        if due and self.idle_state()[0]:
            return self.request_training(f"auto: {new_frames} new frames")[0]
        return None

    def _set_fault(self, error: str, counter: str) -> None:
        with self.lock:
            self.fault = self.last_error = error
            self.counts[counter] += 1
        text, logged_at = self._fault_logged
        if error != text or time.monotonic() - logged_at >= FAULT_LOG_PERIOD_S:
            self._fault_logged = (error, time.monotonic())
            self.log.error(error)

    # ---------------------------------------------------------------- jobs
    def run(self, job: Job) -> None:
        """Run one job on the caller's (worker) thread; a failure is reported, never raised."""
        with self.lock:
            self.queued = None
            self.state = JOB_STATES[job[0]]
            self.activity = job[1].label if isinstance(job[1], CandidateRef) else str(job[1] or "")
        self.on_change()
        try:
            if job[0] == "gate":
                self._gate_global(job[1])
            elif job[0] == "switch":
                self._switch(*job[1])
            elif job[0] == "rollback":
                self._rollback()
            elif job[0] == "train":
                self._train()
            else:
                self._sync()
        except Exception as exc:  # noqa: BLE001 - a failed job is reported, the worker lives on
            with self.lock:
                self.last_error = f"{job[0]}: {type(exc).__name__}: {exc}"
            self.log.error(self.last_error)
        finally:
            with self.lock:
                self.state, self.activity = "idle", ""
            self.on_change()

    def _running_model(self) -> str | None:
        try:
            path = self._get_depth()
        except RuntimeError as exc:
            self._set_fault(f"depth node: {exc}", "depth_node_errors")
            return None
        if not path:  # the depth node has no model yet (an empty model_path waits for its first camera frame)
            return None
        version = self.running_version if path == self.running_model else onnx_version(path)
        with self.lock:
            if self.fault.startswith("depth node"):
                self.fault = ""
            self.running_model, self.running_version = path, version
        return path

    def _retry_later(self, key: str) -> None:
        with self.lock:  # depth node away: try again later, do not mark anything decided
            self._retry_after[key] = time.monotonic() + max(5.0, float(self.p["service_timeout_s"]))

    def _holdout(self) -> tuple[HoldoutSet, list[Segment], list[Segment]]:
        with self.lock:
            train_ids, held_ids = self._split_locked()
            parsed = {s.segment_id: s.segment for s in self._scan.segments}
            max_frames = int(self.p["max_holdout_frames"])
        train = [parsed[i] for i in train_ids]
        held = [parsed[i] for i in held_ids]
        return make_holdout(held, max_frames), train, held

    def _gate_global(self, ref: CandidateRef) -> None:
        running = self._running_model()
        if running is None:
            self._retry_later(ref.key)
            return
        p = dict(self.p)
        try:
            candidate = self._source.load(ref)
        except SourceUnavailableError as exc:
            self._set_fault(f"model source: {exc}", "source_errors")
            self._retry_later(ref.key)
            return
        except ValueError as exc:
            self._finish(ref.key, GateDecision(False, "unreadable", str(exc), ref.label, ref.round), None, ref)
            return
        holdout, _, _ = self._holdout()
        decision = ValidationGate(p["models_dir"], gate_config(p)).check(candidate, running, holdout, task_config(p),
                                                                          label=ref.label)
        # an exported model has no arrays to train on: local training keeps the last model that had them
        self._finish(ref.key, decision, candidate if decision.accepted and not candidate.onnx else None, ref)

    def _train(self) -> None:
        p = dict(self.p)
        task = task_config(p)
        holdout, train, held = self._holdout()
        with self.lock:
            self._frames_at_last_train = self._scan.frames
            self._train_counter += 1
            label = f"local-{time.strftime('%Y%m%d-%H%M%S')}-{self._train_counter}"
        base = self.ledger.current_model() or initial_model(task)
        try:
            data = build_local_data(train, held, base.task_config(task), p["max_train_frames"],
                                    p["max_holdout_frames"], label=str(p["dataset_dir"]))
            result = train_locally(base, data, task, seed=self._train_counter, label=label)
        except (ValueError, FloatingPointError, OSError) as exc:
            with self.lock:
                self.counts["training_failed"] += 1
                self.last_error = f"local training: {exc}"
            self.log.error(self.last_error)
            return
        with self.lock:
            self.counts["trainings"] += 1
            self.local_metrics = {k: float(v) for k, v in result.metrics.items()}
        self.log.info(f"local training {label}: " + ", ".join(
            f"{k} {v:.4g}" for k, v in result.metrics.items() if k in ("train-loss", "absrel", "delta1", "steps")))
        running = self._running_model()
        if running is None:
            return
        decision = ValidationGate(p["models_dir"], gate_config(p)).check(result.model, running, holdout, task,
                                                                          label=label)
        self._finish(f"local:{label}", decision, result.model if decision.accepted else None)

    def _finish(self, key: str, decision: GateDecision, model: GlobalModel | None,
                ref: CandidateRef | None = None) -> None:
        deployed, deploy_error = False, ""
        with self.lock:
            running = (self.running_model, self.running_version)
        if decision.accepted:
            with self.lock:
                self.state = "deploying"
            try:
                deployed, deploy_error = self._set_depth(decision.model_path)
            except RuntimeError as exc:
                deploy_error = str(exc)
            if not deployed:
                deploy_error = f"depth node refused model_path {decision.model_path!r}: {deploy_error}"
        with self.lock:
            if decision.code == "no_holdout":
                self._waiting_for_data.add(key)  # not decided: gated again when the dataset changes
            else:
                self.ledger.record(key, decision, deployed, deploy_error, model, running)
            if deployed:
                prune_accepted(self.p["models_dir"], int(self.p["keep_accepted"]), self._protected())
            self.counts["accepted" if decision.accepted else "refused"] += 1
            self.last_decision = {**decision.to_dict(), "deployed": deployed, "deploy_error": deploy_error}
            if deployed:
                self.counts["deployed"] += 1
                self.running_model, self.running_version = decision.model_path, decision.model_version
            elif deploy_error:
                self.counts["deploy_failed"] += 1
                self.last_error = deploy_error
        if ref is not None and ref.assigned and hasattr(self._source, "decided") and decision.code != "no_holdout":
            metrics = {}
            if decision.candidate_metrics.get("absrel") is not None:
                metrics["gate_absrel"] = float(decision.candidate_metrics["absrel"])
            if decision.running_metrics.get("absrel") is not None:
                metrics["gate_absrel_before"] = float(decision.running_metrics["absrel"])
            self._source.decided(ref, decision.accepted, deployed, decision.code, decision.reason, metrics)
        if deployed:
            self.log.info(f"deployed {decision.label} ({decision.model_version}): {decision.reason}")
        elif decision.accepted:
            self.log.error(f"{decision.label} passed the gate but was not deployed: {deploy_error}")
        else:
            self.log.warning(f"refused {decision.label} ({decision.code}): {decision.reason}")

    def _protected(self) -> set[str]:
        """Model files never pruned: the deployed one, the rollback target, the model before releases."""
        entries = (self.ledger.current, self.ledger.previous, self.ledger.release_base)
        return {str(e["model_path"]) for e in entries if e and e.get("model_path")}

    def _switch(self, key: str, path: str, version: str, why: str) -> None:
        """Point the depth node at a model gated before (no gate: it passed once on this rover)."""
        try:
            ok, reason = self._set_depth(path)
        except RuntimeError as exc:
            ok, reason = False, str(exc)
        with self.lock:
            previous_key = str((self.ledger.current or {}).get("key", ""))
            running = (self.running_model, self.running_version)
            if not ok:
                self.counts["deploy_failed"] += 1
                self.last_error = f"switch to {path!r} ({why}) failed: {reason}"
                retry = max(5.0, float(self.p["service_timeout_s"]))
                self._retry_after[key or NO_RELEASE_KEY] = time.monotonic() + retry
            else:
                self.counts["switches"] += 1
                label = Path(path).stem
                self.ledger.switched(key, path, version, label, running)
                self.running_model, self.running_version = path, version
        if not ok:
            self.log.error(self.last_error)
            return
        self.log.info(f"switched the depth node to {path} ({why})")
        if hasattr(self._source, "switched"):  # a release source: it reports leaving a release
            self._source.switched(_release_of(key), _release_of(previous_key))

    def close(self) -> None:
        """Stop the model source's thread, if it has one."""
        if hasattr(self._source, "stop"):
            self._source.stop()

    def _sync(self) -> None:
        running = self._running_model()
        if running is None:  # depth node not up yet: again later
            self._retry_later("sync")
            return
        self._sync_wanted = False
        current = self.ledger.current or {}
        path = str(current.get("model_path") or "")
        if not self.p["restore_on_start"] or not path or running == path:
            return
        if not Path(path).is_file():
            with self.lock:
                self.last_error = f"deployed model {path!r} is gone; the depth node keeps {running!r}"
            self.log.warning(self.last_error)
            return
        ok, reason = self._set_depth(path)
        with self.lock:
            if ok:
                self.running_model = path
                self.running_version = str(current.get("model_version") or "")
            else:
                self.last_error = f"restoring {path!r} on the depth node failed: {reason}"
        self.log.info(f"restored deployed model {path}" if ok else self.last_error)

    # ---------------------------------------------------------------- status
    def status(self, supernode: dict[str, Any]) -> dict[str, Any]:
        """What ``collab/status`` carries (a JSON object), with ``supernode`` as its SuperNode part."""
        idle, idle_reason = self.idle_state()
        with self.lock:
            train_ids, held_ids = self._split_locked()
            frames = {s.segment_id: s.frames for s in self._scan.segments}
            return {
                "state": self.state,
                "activity": self.activity,
                "round": self.latest_round,
                "model_version": self.running_version,
                "model_path": self.running_model,
                "deployed": self.ledger.current,
                "local_metrics": dict(self.local_metrics),
                "last_gate": self.last_decision,
                "idle": idle,
                "idle_reason": idle_reason,
                "dataset": {
                    "dir": str(self.p["dataset_dir"]),
                    "dir_exists": Path(self.p["dataset_dir"]).is_dir(),
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
                "supernode": supernode,
            }


def _release_of(key: str) -> str:
    """The release id of a ledger key ``release:<id>``; "" for any other model."""
    return key.split(":", 1)[1] if key.startswith("release:") and key != NO_RELEASE_KEY else ""


def onnx_version(path: str) -> str:
    """``version`` from an ONNX model's metadata ("" when there is none or the file does not read)."""
    if not path.endswith(".onnx"):
        return ""
    try:
        from forest_perception.inference import read_onnx_metadata

        return str(read_onnx_metadata(path).get("version", ""))
    except Exception:  # noqa: BLE001 - only a label for the status
        return ""
