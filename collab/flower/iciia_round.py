"""ICIIA through Flower: the coordinator sends the rover model (base + history module, one ONNX graph) to the rovers,
nothing trains on them, and each rover scores it on its own held-out segments in frame order with its own history bank,
as collab_node's gate does (:func:`forest_perception.collab.rover.gate.evaluate_engines`), with and without history.

The module is trained once on the cloud (``forest-fl iciia train``); run config ``iciia-module`` names its file. The
global model in the coordinator's store is the module's tensors, the same every round. Each round's federated
evaluation holds, per rover, the model with history (``<rover>``) and without (``<rover>/no-history``), and their
frame-weighted means (``rovers``, ``rovers/no-history``). Set-up: ``docs/collaborative.md`` ("ICIIA").
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from forest_perception.collab.flower.messages import (
    CONFIG_KEY,
    NO_DATA,
    NO_HOLDOUT,
    NUM_EXAMPLES,
    arrays_to_record,
    metrics_reply,
    record_bytes,
    status_reply,
    unpack_record,
)
from forest_perception.collab.flower.rover_strategy import AveragingServer, RoverStrategy
from forest_perception.collab.flower.store import AGGREGATE, EvalEntry, RoundRecord, aggregate_evaluations
from forest_perception.collab.flower.task import NoDataError, TaskConfig
from forest_perception.collab.updates import NDArrays

LOG = logging.getLogger(__name__)

ALGORITHM = "iciia"
ROVER_MODEL_KEY = "iciia-rover-model"  # server -> rover (evaluate): the rover graph's ONNX bytes (uint8)
NO_HISTORY = "/no-history"  # suffix of the evaluations without history (per rover and pooled)
NO_HISTORY_PREFIX = "no-history-"  # rover -> server: metrics of the run without history
EXPORTER = "torchscript"  # the coordinator's export of the rover graph (checked against PyTorch either way)


# ---------------------------------------------------------------------------------------------- run config


@lru_cache(maxsize=2)
def _load(path: str, stamp: tuple[int, int]) -> tuple[Any, Any, dict, dict]:
    from forest_perception.models import iciia

    model, spec, record = iciia.load_module(path)
    _base, base_meta = iciia.load_base(spec.base)
    return model, spec, record, base_meta


def load_module(path: str | os.PathLike) -> tuple[Any, Any, dict, dict]:
    """``(model, spec, record, base meta)`` of a module file (cached while the file is unchanged).

    :class:`~forest_perception.models.iciia.IciiaFileError` naming the file when it is missing, not a module, was
    trained on another base network than the one there now, or changed after it was written.
    """
    resolved = Path(path).resolve()
    try:
        stat = resolved.stat()
    except OSError:
        stat = None
    return _load(str(resolved), (stat.st_mtime_ns, stat.st_size) if stat else (0, 0))


def iciia_run_config(c: Mapping[str, Any]) -> tuple[dict, dict[str, str]]:
    """An iciia run config with the module's base network as the architecture, and what the coordinator sends.

    ``ValueError`` naming the key when ``iciia-module`` comes with another algorithm or is missing, when the module
    file is refused, when ``init`` names another base network than the module's, when architecture keys are set or
    when ``cloud-test`` is set (the cloud test scores a network without history in PyTorch).
    """
    from forest_perception.collab.flower.network import complete_kwargs, explicit_architecture, kwargs_text

    if c["algorithm"] != ALGORITHM:
        if c["iciia-module"]:
            raise ValueError(f"run config iciia-module belongs to algorithm iciia, not {c['algorithm']!r}")
        return dict(c), {}
    if not c["iciia-module"]:
        raise ValueError("algorithm iciia needs run config iciia-module: the module file written by "
                         "forest-fl iciia train (iciia.pt)")
    given = explicit_architecture(c)
    if given:
        raise ValueError(f"algorithm iciia runs the module's base network: leave {', '.join(sorted(given))} unset")
    if c["cloud-test"]:
        raise ValueError("run config cloud-test scores a network without history in PyTorch; algorithm iciia is "
                         "scored on the rovers only: leave cloud-test unset")
    _model, spec, record, base_meta = load_module(c["iciia-module"])
    if str(c["init"]).strip():
        from forest_perception.models import iciia

        _init, init_meta = iciia.load_base(str(c["init"]).strip())
        if init_meta["version"] != record["base_version"]:
            raise ValueError(f"iciia-module {c['iciia-module']} was trained on {record['base_version']}, run config "
                             f"init {c['init']} is {init_meta['version']}: leave init unset or name the module's base")
    name = str(base_meta.get("model_name") or "")
    hw = base_meta.get("input_hw")
    if not name or not hw:
        raise ValueError(f"the base network {spec.base} of iciia-module records no model_name / input_hw")
    kwargs = complete_kwargs(name, dict(base_meta.get("model_kwargs") or {}))
    arch = {"model": name, "model-kwargs": kwargs_text(kwargs), "input-height": int(hw[0]),
            "input-width": int(hw[1]), "init": ""}  # init, when given, is the module's base: checked above
    info = {"iciia-module": str(Path(c["iciia-module"]).resolve()), "iciia-module-version": str(record["version"]),
            "iciia-base-version": str(record["base_version"])}
    return {**c, **arch}, info


def module_arrays(path: str | os.PathLike) -> tuple[list[str], NDArrays]:
    """The module's tensors as named arrays: the run's global model (it never changes)."""
    from forest_perception.collab.flower.task import get_arrays

    model, _spec, _record, _meta = load_module(path)
    return get_arrays(model.iciia)


def export_rover_graph(path: str | os.PathLike) -> bytes:
    """The rover model (base + module) as ONNX bytes, exported from the module file and checked against PyTorch."""
    from forest_perception.models.iciia import export_rover_model

    model, spec, _record, base_meta = load_module(path)
    with tempfile.TemporaryDirectory(prefix="iciia-rover-") as folder:
        out = export_rover_model(model, spec, base_meta, Path(folder) / "iciia_rover.onnx", exporter=EXPORTER,
                                 command=f"forest-fl coordinator, algorithm iciia, from {Path(path).name}")
        return out.read_bytes()


# ---------------------------------------------------------------------------------------------- rover side


def rover_holdout(data_dir: str | os.PathLike, task: TaskConfig) -> Any:  # noqa: ANN401 - HoldoutSet
    """The rover's held-out frames as collab_node's gate takes them (the same split as the ClientApp's training).

    :class:`NoDataError` naming the folder when it is missing or holds no frames.
    """
    from forest_perception.collab.rover.dataset import scan_recordings
    from forest_perception.collab.rover.holdout import make_holdout, rover_split

    path = Path(data_dir)
    if not path.is_dir():
        raise NoDataError(f"rover data folder {path} does not exist")
    scan = scan_recordings(path)
    train_ids, held_ids = rover_split({s.segment_id: s.frames for s in scan.segments}, task.holdout_fraction,
                                      task.holdout_seed)
    if not train_ids:
        raise NoDataError(f"rover data folder {path} holds no frames in Run-<N>/<segment>/ folders")
    return make_holdout([scan.segment(i) for i in held_ids], task.max_holdout_frames)


def evaluate_reply(message: Message, rover_id: str, data_dir: str, task: TaskConfig,
                   drop_dir: str = "") -> Message:
    """Score the rover graph of ``message`` on the rover's held-out frames, fed in frame order, with its own history
    bank and without history (one pass, two engines, as the gate scores candidates). ``no-data`` / ``no-holdout``
    when there is nothing to score; ``ValueError`` when the graph is not the module the coordinator names."""
    from forest_perception.collab.rover.gate import evaluate_engines
    from forest_perception.inference import HistoryDepthEngine, load_engine, read_onnx_metadata

    try:
        holdout = rover_holdout(data_dir, task)
    except NoDataError as exc:
        LOG.warning("rover %s: no data: %s", rover_id, exc)
        return status_reply(message, rover_id, NO_DATA, str(exc))
    if len(holdout) == 0:
        return status_reply(message, rover_id, NO_HOLDOUT, f"rover {rover_id!r}: one segment, nothing held out")
    graph = unpack_record(message.content.array_records[ROVER_MODEL_KEY], ROVER_MODEL_KEY).get("onnx")
    if graph is None or graph.dtype != np.uint8 or graph.ndim != 1:
        raise ValueError(f"{ROVER_MODEL_KEY}: needs one uint8 array 'onnx'")
    config = message.content.config_records.get(CONFIG_KEY, ConfigRecord())
    expected = str(config.get("iciia-module-version", ""))
    server_round = int(config.get("server-round", 0))
    with tempfile.TemporaryDirectory(prefix="iciia-eval-") as folder:
        path = Path(folder) / "iciia_rover.onnx"
        path.write_bytes(graph.tobytes())
        history = _history_meta(read_onnx_metadata(path).get("history", ""))
        if not expected or history.get("module_version") != expected:
            raise ValueError(f"the rover model sent is ICIIA module {history.get('module_version') or '(none)'}, the "
                             f"coordinator names {expected or '(none)'}")
        engines = {"history": load_engine(path, threads=task.threads),
                   "no-history": load_engine(path, threads=task.threads, history_size=0)}
        if not all(isinstance(e, HistoryDepthEngine) for e in engines.values()):
            raise ValueError("the rover model sent has no history inputs (image, bank, bank_mask)")
        started = time.perf_counter()
        metrics = evaluate_engines(engines, holdout, task.min_depth, task.max_depth)
        seconds = time.perf_counter() - started
        if drop_dir:
            drop_rover_graph(path, drop_dir, server_round)
    with_history, without = metrics["history"], metrics["no-history"]
    LOG.info("rover %s round %d: ICIIA on %d held-out frames: absrel %.4f with history, %.4f without", rover_id,
             server_round, len(holdout), with_history["absrel"], without["absrel"])
    out = {NUM_EXAMPLES: int(with_history["frames"]), "eval-s": seconds,
           **{k: with_history[k] for k in ("absrel", "delta1", "rmse")},
           **{f"{NO_HISTORY_PREFIX}{k}": without[k] for k in ("absrel", "delta1", "rmse")}}
    return metrics_reply(message, out, rover_id)


def _history_meta(text: str) -> dict:
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def drop_rover_graph(path: Path, drop_dir: str | os.PathLike, server_round: int) -> Path | None:
    """Hand the rover model to the rover's collab_node (``global-r<round>.onnx`` in ``model-drop-dir``), unless the
    newest drop there is already this graph; a full disk does not fail the evaluation (logged, None)."""
    from forest_perception.collab.dcccl_cloud import drop_cloud_model
    from forest_perception.collab.rover.models import list_global_models

    try:
        drops = list_global_models(drop_dir) if Path(drop_dir).is_dir() else []
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if drops and hashlib.sha256(drops[-1].read_bytes()).hexdigest() == digest:
            return None
        return drop_cloud_model(path, drop_dir, server_round)
    except OSError as exc:
        LOG.warning("could not drop the ICIIA rover model into %s: %s", drop_dir, exc)
        return None


# ---------------------------------------------------------------------------------------------- the coordinator


def _no_training(params: NDArrays, updates: object) -> NDArrays:
    raise RuntimeError("algorithm iciia trains nothing on the rovers; no update can be aggregated")


class IciiaStrategy(RoverStrategy):
    """No training: every round, the selected rovers score the rover model with and without their history."""

    algorithm = ALGORITHM

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401 - RoverStrategy's arguments
        super().__init__(*args, **kwargs)
        path = str(self.train_config.pop("iciia-module", ""))  # the cloud's file: the rovers get the graph
        if not path:
            raise ValueError("the iciia strategy needs the module file (train config iciia-module)")
        names, arrays = module_arrays(path)
        if names != self.names or any(a.shape != b.shape or not np.array_equal(a, b)
                                      for a, b in zip(arrays, self.params)):
            raise ValueError(f"the iciia strategy's model is not the module in {path}")
        self.module_version = str(self.train_config.get("iciia-module-version", ""))
        self.graph = np.frombuffer(export_rover_graph(path), dtype=np.uint8)
        self.no_history: list[EvalEntry] = []
        self.bytes_down = 0  # the rover graph, to every rover asked in the last evaluate stage

    def make_server(self, initial: NDArrays) -> AveragingServer:
        """Holds the module's tensors; it never aggregates anything."""
        return AveragingServer(ALGORITHM, initial, _no_training, None, 0, {})

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid,
                        ) -> Iterable[Message]:
        """No train messages: the round's record counts the available rovers only."""
        record = RoundRecord(server_round=server_round, started=time.time())
        self.last_record = record
        available = self.available(grid, server_round)
        record.entries.extend(self.identity_refusals)
        self.identity_refusals = []
        record.num_available = len(available)
        LOG.info("round %d: iciia trains nothing on the rovers (module %s); %d rover(s) available", server_round,
                 self.module_version, len(available))
        return []

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid,
                           ) -> Iterable[Message]:
        """The selected rovers get the rover graph (round 0 is skipped: the model never changes)."""
        self.no_history, self.bytes_down = [], 0
        if server_round == 0:
            self.last_evaluation = {}
            return []
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        if not messages:
            return []
        merged = ConfigRecord({**self.train_config, **dict(config.items()), "server-round": server_round,
                               "algorithm": ALGORITHM})
        content = RecordDict({ROVER_MODEL_KEY: arrays_to_record(["onnx"], [self.graph]), CONFIG_KEY: merged})
        self.bytes_down = record_bytes(content) * len(messages)
        return [Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=m.metadata.dst_node_id)
                for m in messages]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The rovers' scores with history (``last_evaluation``) and without (:meth:`extra_evaluations`)."""
        mean = super().aggregate_evaluate(server_round, replies)
        entries = []
        for entry in self.last_evaluation.values():
            without = {k[len(NO_HISTORY_PREFIX):]: v for k, v in entry.metrics.items()
                       if k.startswith(NO_HISTORY_PREFIX)}
            entry.metrics = {k: v for k, v in entry.metrics.items() if not k.startswith(NO_HISTORY_PREFIX)}
            entries.append(EvalEntry(f"{entry.name}{NO_HISTORY}", "rover", entry.status, entry.frames, without,
                                     entry.message))
        pooled = aggregate_evaluations(entries)
        pooled.name = f"{AGGREGATE}{NO_HISTORY}"
        self.no_history = sorted(entries, key=lambda e: e.name) + [pooled]
        if mean is None:
            return None
        extra = {f"{NO_HISTORY_PREFIX}{k}": v for k, v in pooled.metrics.items() if math.isfinite(v)}
        return MetricRecord({**{k: float(v) for k, v in mean.items()}, **extra, "bytes-down": float(self.bytes_down)})

    def extra_evaluations(self) -> list[EvalEntry]:
        """Per rover and pooled, the rover model without history."""
        return list(self.no_history)


__all__ = [
    "ALGORITHM",
    "NO_HISTORY",
    "ROVER_MODEL_KEY",
    "IciiaStrategy",
    "evaluate_reply",
    "export_rover_graph",
    "iciia_run_config",
    "load_module",
    "module_arrays",
    "rover_holdout",
]
