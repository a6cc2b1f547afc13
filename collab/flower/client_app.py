"""The rover ``ClientApp``: trains the depth network on the rover's own recordings and sends back a delta.

Where a rover finds itself (first match wins):

1. node config (deployment, ``flower-supernode --node-config "data-dir='/data/forest' rover-id='rover_3'"``):
   ``data-dir``, optional ``rover-id`` (default: the folder name) and ``scope`` (``all`` or ``decoder``);
   optional ``model-drop-dir``: every global model received for training is also written there as
   ``global-r<round>.npz`` (:func:`collab.rover.write_global_model`) for the rover's ROS ``collab_node``,
   which validates it on the rover's held-out frames before the depth node runs it;
2. run config ``population`` (simulation): the JSON written by :mod:`forest_perception.collab.flower.simulation`, entry
   ``partition-id`` of the node config (rover id, data folder, scope, and a fault to inject in tests);
3. run config ``data-root``: ``<data-root>/rover_<partition-id>``.

Messages (keys in :mod:`forest_perception.collab.flower.strategies`): ``train`` gets the global model and the
round's config and replies with the delta (``update``; tensors outside the rover's scope
compact with their ``rows``), the metrics (``num-examples``, ``train-loss``, ``val-loss``,
``absrel``, ``delta1``, ``train-s``) and ``meta`` (``rover-id``, ``base-round``, ``kind``);
MC-PSGD rounds also carry the block's separate chain, trained and returned alongside.
``evaluate`` scores the model it is sent on the rover's validation frames. ``query`` says
which rover this node is. The app is stateless: everything comes with the message.

Faults (simulation and tests only, from the population entry or node config ``fault``) make
a rover misbehave on purpose so the coordinator's screening can be exercised through the
real Flower path: ``nan``, ``inf``, ``shape``, ``dtype``, ``count``, ``huge``, ``stale``,
``no-data`` (a data folder that does not exist) and ``crash`` (raises).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from forest_perception.collab.flower.population import load_population
from forest_perception.collab.flower.strategies import (
    ARRAYS_KEY,
    CONFIG_KEY,
    META_KEY,
    METRICS_KEY,
    ROWS_KEY,
    SEPARATE_KEY,
    SEPARATE_ROWS_KEY,
    SEPARATE_UPDATE_KEY,
    UPDATE_KEY,
    arrays_to_record,
)
from forest_perception.collab.flower.task import (
    SCOPES,
    TaskConfig,
    build_model,
    evaluate,
    load_local_data,
    local_round,
    merge_run_config,
)
from forest_perception.collab.flower.task import set_arrays as load_arrays

LOG = logging.getLogger(__name__)

FAULTS = ("", "nan", "inf", "shape", "dtype", "count", "huge", "stale", "no-data", "crash")

# run config keys the server may override per round (sent in the message's config record)
_ROUND_KEYS = ("local-epochs", "local-steps", "lr", "batch-size")


@dataclass(frozen=True)
class RoverIdentity:
    """Who this node is and where its data lives."""

    rover_id: str
    data_dir: str
    scope: str = "all"
    fault: str = ""


def resolve_rover(context: Context, config: Mapping) -> RoverIdentity:
    """This node's rover (see the module docstring for the order of sources)."""
    node = context.node_config
    if "data-dir" in node:
        data_dir = str(node["data-dir"])
        identity = RoverIdentity(
            rover_id=str(node.get("rover-id", Path(data_dir).name)),
            data_dir=data_dir,
            scope=str(node.get("scope", "all")),
            fault=str(node.get("fault", "")),
        )
    elif config.get("population"):
        if "partition-id" not in node:
            raise ValueError("run config names a population but the node config has no partition-id")
        rover = load_population(str(config["population"])).by_partition(int(node["partition-id"]))
        identity = RoverIdentity(rover.rover_id, rover.data_dir, rover.scope, rover.fault)
    elif config.get("data-root"):
        if "partition-id" not in node:
            raise ValueError("run config data-root needs a partition-id in the node config")
        rover_id = f"rover_{int(node['partition-id']):03d}"
        identity = RoverIdentity(rover_id, str(Path(str(config["data-root"])) / rover_id))
    else:
        raise ValueError(
            "this rover has no data: set node config data-dir (deployment) or run config population / data-root"
        )
    if identity.scope not in SCOPES:
        raise ValueError(f"rover {identity.rover_id!r}: unknown scope {identity.scope!r}; choose one of {list(SCOPES)}")
    if identity.fault not in FAULTS:
        raise ValueError(f"rover {identity.rover_id!r}: unknown fault {identity.fault!r}; choose one of {FAULTS}")
    return identity


def _round_config(config: Mapping, message: Message) -> tuple[dict, int]:
    record = message.content.config_records.get(CONFIG_KEY, ConfigRecord())
    server_round = record.get("server-round")
    if not isinstance(server_round, int):
        raise ValueError(f"message config has no integer server-round (got {server_round!r})")
    overrides = {k: record[k] for k in _ROUND_KEYS if k in record}
    return merge_run_config(config, overrides), server_round


def _global_arrays(message: Message, key: str) -> tuple[list[str], list[np.ndarray]]:
    if key not in message.content.array_records:
        raise ValueError(f"message has no {key!r} ArrayRecord (records: {sorted(message.content.keys())})")
    record = message.content.array_records[key]
    names = list(record.keys())
    return names, [record[n].numpy() for n in names]


def _data_dir(identity: RoverIdentity) -> str:
    # fault "no-data": the rover looks for its recordings where there are none
    return str(Path(identity.data_dir) / "missing") if identity.fault == "no-data" else identity.data_dir


def _round_seed(seed: int, server_round: int, rover_id: str) -> int:
    return (seed * 1_000_003 + server_round * 7919 + zlib.crc32(rover_id.encode())) % (2**63)


def inject_fault(
    fault: str, deltas: list[np.ndarray], base_round: int, server_round: int, max_staleness: int
) -> tuple[list[np.ndarray], int]:
    """Spoil an honest update the way ``fault`` says (tests of the coordinator's screening)."""
    deltas = [d.copy() for d in deltas]
    if fault in ("nan", "inf"):
        target = next(i for i, d in enumerate(deltas) if d.size)
        deltas[target].flat[0] = np.nan if fault == "nan" else np.inf
    elif fault == "shape":
        target = next(i for i, d in enumerate(deltas) if d.ndim >= 1 and d.shape[0] > 1)
        deltas[target] = deltas[target][:-1]
    elif fault == "dtype":
        deltas[0] = deltas[0].astype(np.float64)
    elif fault == "count":
        deltas = deltas[:-1]
    elif fault == "huge":
        deltas = [d * np.asarray(1e6, dtype=d.dtype) for d in deltas]
    elif fault == "stale":
        base_round = server_round - 1 - max_staleness
    return deltas, base_round


def drop_global_model(context: Context, server_round: int, names: list[str], arrays: list[np.ndarray],
                      task: TaskConfig) -> None:
    """Deployment: hand the global model of ``server_round - 1`` to the rover's collab_node (``model-drop-dir``)."""
    drop_dir = str(context.node_config.get("model-drop-dir", "") or "")
    if not drop_dir:
        return
    from forest_perception.collab.rover import task_meta, write_global_model

    try:
        write_global_model(drop_dir, server_round - 1, names, arrays, task_meta(task))
    except (OSError, ValueError) as exc:  # a full disk on the rover must not fail the round
        LOG.warning("could not drop the global model of round %d into %s: %s", server_round - 1, drop_dir, exc)


def handle_train(message: Message, context: Context, overrides: Mapping | None = None) -> Message:
    """Train on the local data from the global model (and MC-PSGD's separate chain); reply with the deltas."""
    base_config = merge_run_config(context.run_config, overrides)
    identity = resolve_rover(context, base_config)
    config, server_round = _round_config(base_config, message)
    if identity.fault == "crash":
        raise RuntimeError(f"rover {identity.rover_id!r} crashed on purpose (fault injection)")
    task = TaskConfig.from_run_config(config)
    data = load_local_data(_data_dir(identity), task)
    seed = _round_seed(task.seed, server_round, identity.rover_id)
    content = RecordDict()
    metrics: dict[str, float] = {}
    chains = [(ARRAYS_KEY, UPDATE_KEY, ROWS_KEY, "")]
    if SEPARATE_KEY in message.content.array_records:
        chains.append((SEPARATE_KEY, SEPARATE_UPDATE_KEY, SEPARATE_ROWS_KEY, "-separate"))
    base_round = server_round
    max_staleness = int(message.content.config_records[CONFIG_KEY].get("max-staleness", 0))
    for arrays_key, update_key, rows_key, suffix in chains:
        names, global_arrays = _global_arrays(message, arrays_key)
        if not suffix:
            drop_global_model(context, server_round, names, global_arrays, task)
        result = local_round(names, global_arrays, data, task, identity.scope, seed)
        deltas, reported_round = inject_fault(identity.fault, result.deltas, server_round, server_round, max_staleness)
        base_round = reported_round
        sent_names = names[: len(deltas)]
        content[update_key] = arrays_to_record(sent_names, deltas)
        if result.rows:
            content[rows_key] = arrays_to_record(list(result.rows), list(result.rows.values()))
        if suffix:
            metrics[f"val-loss{suffix}"] = result.metrics["val-loss"]
        else:
            metrics.update(result.metrics)
    content[METRICS_KEY] = MetricRecord(metrics)
    content[META_KEY] = ConfigRecord(
        {"rover-id": identity.rover_id, "base-round": int(base_round), "kind": "delta", "scope": identity.scope}
    )
    LOG.info(
        "rover %s round %d: train-loss %.4f val-loss %.4f absrel %.3f on %d frames",
        identity.rover_id, server_round, metrics["train-loss"], metrics["val-loss"], metrics["absrel"],
        int(metrics["num-examples"]),
    )
    return Message(content=content, reply_to=message)


def handle_evaluate(message: Message, context: Context, overrides: Mapping | None = None) -> Message:
    """Score the model in the message on the rover's validation frames."""
    base_config = merge_run_config(context.run_config, overrides)
    identity = resolve_rover(context, base_config)
    config, _ = _round_config(base_config, message)
    task = TaskConfig.from_run_config(config)
    data = load_local_data(_data_dir(identity), task)
    names, arrays = _global_arrays(message, ARRAYS_KEY)
    model = build_model(task)
    load_arrays(model, names, arrays)
    result = evaluate(model, data.val_images, data.val_depth, task)
    metrics = MetricRecord(
        {"num-examples": int(result["num-examples"]), "eval-loss": result["loss"], "absrel": result["absrel"],
         "delta1": result["delta1"], "rmse": result["rmse"]}
    )
    return Message(content=RecordDict({METRICS_KEY: metrics}), reply_to=message)


def handle_query(message: Message, context: Context, overrides: Mapping | None = None) -> Message:
    """Say which rover this node is."""
    identity = resolve_rover(context, merge_run_config(context.run_config, overrides))
    meta = ConfigRecord({"rover-id": identity.rover_id, "scope": identity.scope})
    return Message(content=RecordDict({META_KEY: meta}), reply_to=message)


def make_client_app(overrides: Mapping | None = None) -> ClientApp:
    """A rover ClientApp; ``overrides`` win over the run config (the simulation runner binds its config here)."""
    bound = dict(overrides or {})
    merge_run_config(bound)  # refuse unknown keys now, not in every rover
    client = ClientApp()

    @client.train()
    def train(message: Message, context: Context) -> Message:
        return handle_train(message, context, bound)

    @client.evaluate()
    def evaluate_model(message: Message, context: Context) -> Message:
        return handle_evaluate(message, context, bound)

    @client.query()
    def query(message: Message, context: Context) -> Message:
        return handle_query(message, context, bound)

    return client


app = make_client_app()
"""The ClientApp ``pyproject.toml`` names (``collab.flower.client_app:app``); configured by the run config."""

