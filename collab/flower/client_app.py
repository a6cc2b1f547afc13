"""The rover ``ClientApp``: trains the depth network on the rover's own recordings and sends back a delta.

Stateless, as in Flower's quickstart: where a rover finds its data (node config ``data-dir`` or
``rover-data``, run config ``population``, ``rover-data`` or ``data-root``, in this order), the messages it
answers and the faults tests inject are described in ``docs/federated.md`` ("Messages", "Bad input").
It trains only on the training segments of :func:`forest_perception.collab.rover.holdout.rover_split` and
evaluates on the held-out ones (node config ``holdout-fraction``/``holdout-seed`` win over the run config's,
so collab_node's gate holds out the same).
A rover without usable recordings answers ``no-data`` and the round goes on without it. With node config
``model-drop-dir`` every global model received for training is also handed to the rover's collab_node
(:func:`drop_global_model`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from forest_perception.collab.flower import coda_round, iciia_round
from forest_perception.collab.flower.messages import (
    CHAIN_KEYS,
    CHANGE_PREFIX,
    CONFIG_KEY,
    CONTROL_KEY,
    CORRECTION_KEY,
    INFLUENCE_PREFIX,
    NO_DATA,
    NO_HOLDOUT,
    SEPARATE_KEY,
    arrays_to_record,
    global_arrays,
    identity_reply,
    metrics_reply,
    prefixed_records,
    put_update,
    status_reply,
    train_reply,
    unpack_record,
)
from forest_perception.collab.flower.network import ARCHITECTURE_KEYS
from forest_perception.collab.flower.population import load_population, recorded_rover_ids, rover_data_folders
from forest_perception.collab.flower.task import (
    SCOPES,
    LocalData,
    NoDataError,
    TaskConfig,
    build_model,
    evaluate,
    load_local_data,
    local_delta_function,
    local_round,
    merge_run_config,
    round_seed,
)
from forest_perception.collab.flower.task import set_arrays as load_arrays
from forest_perception.collab.influence import directional_change

LOG = logging.getLogger(__name__)

FAULTS = ("", "nan", "inf", "shape", "dtype", "count", "huge", "stale", "no-data", "crash")

# run config keys the server sends with every message: local training and the network it trains
_ROUND_KEYS = ("local-epochs", "local-steps", "lr", "optimizer", "proximal-mu", "batch-size", *ARCHITECTURE_KEYS,
               "min-depth", "max-depth", "dcccl-small-channels", "coda-candidates")
# node config keys that win over the run config: the rover's own hold-out split (collab_node writes them) and,
# in dc-ccl, the rover's own copy of the mimic
NODE_SPLIT_KEYS = ("holdout-fraction", "holdout-seed")
NODE_OVERRIDE_KEYS = (*NODE_SPLIT_KEYS, "dcccl-mimic")


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
    elif node.get("rover-data") or (config.get("rover-data") and not config.get("population")):
        # node config rover-data (a deployed SuperNode: its own folder) wins over the run config's list
        where = "node config" if node.get("rover-data") else "run config"
        folders = rover_data_folders(str(node.get("rover-data") or config["rover-data"]))
        if "partition-id" not in node and len(folders) != 1:
            raise ValueError(f"{where} rover-data names {len(folders)} folders: the node config needs a partition-id")
        partition = 0 if len(folders) == 1 else int(node["partition-id"])  # one folder: this node's own
        if not 0 <= partition < len(folders):
            raise NoDataError(f"{where} rover-data names {len(folders)} folder(s), none for partition-id "
                              f"{partition}: run as many SuperNodes as folders")
        rover_id = str(node.get("rover-id", recorded_rover_ids(folders)[partition]))
        identity = RoverIdentity(rover_id, folders[partition], str(node.get("scope", "all")),
                                 str(node.get("fault", "")))
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
            "this rover has no data: set node config data-dir or rover-data (deployment) or run config population / "
            "rover-data / data-root"
        )
    if identity.scope not in SCOPES:
        raise ValueError(f"rover {identity.rover_id!r}: unknown scope {identity.scope!r}; choose one of {list(SCOPES)}")
    if identity.fault not in FAULTS:
        raise ValueError(f"rover {identity.rover_id!r}: unknown fault {identity.fault!r}; choose one of {FAULTS}")
    return identity


def _round_config(config: Mapping, message: Message, context: Context) -> tuple[dict, int]:
    record = message.content.config_records.get(CONFIG_KEY, ConfigRecord())
    server_round = record.get("server-round")
    if not isinstance(server_round, int):
        raise ValueError(f"message config has no integer server-round (got {server_round!r})")
    overrides = {k: record[k] for k in _ROUND_KEYS if k in record}
    node_split = {k: context.node_config[k] for k in NODE_OVERRIDE_KEYS if k in context.node_config}
    if "holdout-fraction" in node_split:
        node_split["holdout-fraction"] = float(node_split["holdout-fraction"])
    return merge_run_config(config, overrides, node_split), server_round


def _data_dir(identity: RoverIdentity) -> str:
    # fault "no-data": the rover looks for its recordings where there are none
    return str(Path(identity.data_dir) / "missing") if identity.fault == "no-data" else identity.data_dir


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
    """Train on the local training segments from the global model (and MC-PSGD's separate chain); reply with deltas.

    Under scaffold every local gradient is corrected by the message's ``scaffold-correction`` (from the rover's
    second round) and the reply carries the rover's new control (``scaffold-control``). A rover without usable
    recordings replies ``no-data`` (naming the folder) instead of an update.
    """
    base_config = merge_run_config(context.run_config, overrides)
    identity = resolve_rover(context, base_config)
    config, server_round = _round_config(base_config, message, context)
    if identity.fault == "crash":
        raise RuntimeError(f"rover {identity.rover_id!r} crashed on purpose (fault injection)")
    task = TaskConfig.from_run_config(config)
    try:
        data = load_local_data(_data_dir(identity), task)
    except NoDataError as exc:
        LOG.warning("rover %s round %d: no data: %s", identity.rover_id, server_round, exc)
        return status_reply(message, identity.rover_id, NO_DATA, str(exc))
    data, cloud_samples = coda_round.with_samples(message, data, task)  # coda: the cloud samples chosen for it
    seed = round_seed(task.seed, server_round, identity.rover_id)
    content = RecordDict()
    metrics: dict[str, float] = {}
    chains = ["mixed", "separate"] if SEPARATE_KEY in message.content.array_records else ["mixed"]
    base_round = server_round
    max_staleness = int(message.content.config_records[CONFIG_KEY].get("max-staleness", 0))
    scaffold = message.content.config_records[CONFIG_KEY].get("algorithm") == "scaffold"
    correction = (unpack_record(message.content.array_records[CORRECTION_KEY], CORRECTION_KEY)
                  if CORRECTION_KEY in message.content.array_records else None)
    for chain in chains:
        names, arrays = global_arrays(message, CHAIN_KEYS[chain][0])
        if chain == "mixed":
            drop_global_model(context, server_round, names, arrays, task)
        result = local_round(names, arrays, data, task, identity.scope, seed, scaffold=scaffold,
                             correction=correction)
        if result.control is not None:
            content[CONTROL_KEY] = arrays_to_record(list(result.control), list(result.control.values()))
        deltas, base_round = inject_fault(identity.fault, result.deltas, server_round, server_round, max_staleness)
        put_update(content, names[: len(deltas)], deltas, result.rows, chain)
        if chain == "mixed":
            metrics.update(result.metrics)
            put_influence_changes(message, content, names, arrays, result.deltas, data, task, identity.scope, seed)
        else:
            metrics["val-loss-separate"] = result.metrics["val-loss"]
    LOG.info(
        "rover %s round %d: train-loss %.4f val-loss %.4f absrel %.3f on %d frames",
        identity.rover_id, server_round, metrics["train-loss"], metrics["val-loss"], metrics["absrel"],
        int(metrics["num-examples"]),
    )
    if cloud_samples:
        metrics["coda-samples"] = float(cloud_samples)
    extra = {"mimic-version": mimic_version(task)} if task.dcccl_mimic else None
    return train_reply(message, content, metrics, identity.rover_id, base_round, identity.scope, extra)


def put_influence_changes(message: Message, content: RecordDict, names: list[str], arrays: list[np.ndarray],
                          deltas: list[np.ndarray], data: LocalData, task: TaskConfig, scope: str, seed: int) -> None:
    """Fed-Influence: for every rover's influence the coordinator sent, how this rover's delta would change had
    its round started from the global model moved by it (one more local round each; nothing of the data leaves)."""
    directions = prefixed_records(message.content, INFLUENCE_PREFIX, names)
    if not directions:
        return
    if scope != "all":
        LOG.warning("Fed-Influence needs the whole model trained; this rover trains scope %r and sends no changes",
                    scope)
        return
    run = local_delta_function(names, data, task, scope, seed)
    base = [np.asarray(d, dtype=np.float64) for d in deltas]
    for rover, direction in directions.items():
        change = directional_change(run, arrays, direction, base, eps=None)
        content[f"{CHANGE_PREFIX}{rover}"] = arrays_to_record(names, [c.astype(np.float32) for c in change])


def mimic_version(task: TaskConfig) -> str:
    """dc-ccl: the version of the mimic this rover trains with (what its update is screened by)."""
    from forest_perception.collab.dcccl import read_part

    return read_part(task.dcccl_mimic, "mimic").version


def handle_evaluate(message: Message, context: Context, overrides: Mapping | None = None) -> Message:
    """Score the model in the message on the rover's held-out segments (never trained on).

    Replies ``no-data`` without usable recordings and ``no-holdout`` when nothing is held out (one segment).
    MC-PSGD's ``score-chains`` message carries both averaged chains instead; both are scored on the frames the
    rover validates its training on (held-out segments, or its training frames when it has none). An iciia message
    carries the rover graph: :func:`~forest_perception.collab.flower.iciia_round.evaluate_reply` scores it as the
    gate does, with and without history (and drops it for collab_node with node config ``model-drop-dir``).
    """
    base_config = merge_run_config(context.run_config, overrides)
    identity = resolve_rover(context, base_config)
    config, _ = _round_config(base_config, message, context)
    task = TaskConfig.from_run_config(config)
    if iciia_round.ROVER_MODEL_KEY in message.content.array_records:  # iciia: score the rover graph, with history
        drop_dir = str(context.node_config.get("model-drop-dir", "") or "")
        return iciia_round.evaluate_reply(message, identity.rover_id, _data_dir(identity), task, drop_dir)
    try:
        data = load_local_data(_data_dir(identity), task)
    except NoDataError as exc:
        return status_reply(message, identity.rover_id, NO_DATA, str(exc))
    if message.content.config_records[CONFIG_KEY].get("score-chains"):
        scores: dict[str, float] = {}
        for chain, key in (("mixed", "eval-loss"), ("separate", "eval-loss-separate")):
            names, arrays = global_arrays(message, CHAIN_KEYS[chain][0])
            model = build_model(task)
            load_arrays(model, names, arrays)
            result = evaluate(model, data.val_images, data.val_depth, task)
            scores[key], scores["num-examples"] = result["loss"], result["num-examples"]
        return metrics_reply(message, {**scores, "num-examples": int(scores["num-examples"])}, identity.rover_id)
    if data.val_is_train:
        return status_reply(message, identity.rover_id, NO_HOLDOUT,
                            f"rover {identity.rover_id!r}: one segment ({data.segments[0]}), nothing held out")
    names, arrays = global_arrays(message)
    model = build_model(task)
    load_arrays(model, names, arrays)
    result = evaluate(model, data.val_images, data.val_depth, task)
    return metrics_reply(message, {"num-examples": int(result["num-examples"]), "eval-loss": result["loss"],
                                   "absrel": result["absrel"], "delta1": result["delta1"], "rmse": result["rmse"]},
                         identity.rover_id)


def handle_query(message: Message, context: Context, overrides: Mapping | None = None) -> Message:
    """Say which rover this node is; coda: describe the training frames, or filter the cloud's candidates."""
    identity = resolve_rover(context, merge_run_config(context.run_config, overrides))
    query = message.content.config_records.get(CONFIG_KEY, ConfigRecord()).get("query")
    if query in (coda_round.DESCRIBE, coda_round.FILTER):
        config, _ = _round_config(merge_run_config(context.run_config, overrides), message, context)
        try:
            data = load_local_data(_data_dir(identity), TaskConfig.from_run_config(config))
        except NoDataError as exc:
            return status_reply(message, identity.rover_id, NO_DATA, str(exc))
        coda_config = message.content.config_records[CONFIG_KEY]
        reply = coda_round.describe_reply if query == coda_round.DESCRIBE else coda_round.filter_reply
        return reply(message, identity.rover_id, data, coda_config)
    return identity_reply(message, identity.rover_id, identity.scope)


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

