"""The messages between the coordinator and the rovers: record keys, array conversions, replies and their parsing.

The contract the ServerApp's strategies and every rover ClientApp share (the real one, the experiments'
and the tests' fakes); the keys and what each carries are in ``docs/federated.md`` ("Messages").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from forest_perception.collab.updates import ClientUpdate, NDArrays, UpdateRejected

ARRAYS_KEY = "arrays"  # server -> rover: the global model, ArrayRecord keyed by tensor name
SEPARATE_KEY = "separate"  # server -> rover (MC-PSGD): the block's separate chain
CONFIG_KEY = "config"  # server -> rover: ConfigRecord (server-round, local-epochs, lr, ...)
UPDATE_KEY = "update"  # rover -> server: delta per tensor name (compact where ROWS_KEY has rows)
ROWS_KEY = "rows"  # rover -> server: int64 row indices of the tensors uploaded compact
SEPARATE_UPDATE_KEY = "update-separate"  # rover -> server (MC-PSGD): delta against the separate chain
SEPARATE_ROWS_KEY = "rows-separate"
METRICS_KEY = "metrics"  # rover -> server: MetricRecord with num-examples, train-loss, val-loss, absrel, delta1
META_KEY = "meta"  # rover -> server: ConfigRecord with rover-id, base-round, kind
NUM_EXAMPLES = "num-examples"
INFLUENCE_PREFIX = "influence:"  # server -> rover (Fed-Influence): "influence:<rover>", that rover's Delta per tensor
CHANGE_PREFIX = "change:"  # rover -> server: "change:<rover>", the change of this rover's delta along that Delta
NO_DATA = "no-data"  # meta status of a rover that has no usable recordings (nothing trained or evaluated)
NO_HOLDOUT = "no-holdout"  # meta status of an evaluation by a rover with nothing held out (a single segment)

REPORTED_METRICS = ("train-loss", "val-loss", "absrel", "delta1")
"""Rover metrics the strategies average (weighted by num-examples) over the accepted updates."""

CHAIN_KEYS: dict[str, tuple[str, str, str]] = {
    "mixed": (ARRAYS_KEY, UPDATE_KEY, ROWS_KEY),
    "separate": (SEPARATE_KEY, SEPARATE_UPDATE_KEY, SEPARATE_ROWS_KEY),
}
"""Per model chain a rover trains: (global model key, delta key, rows key); MC-PSGD adds the separate chain."""


def arrays_to_record(names: Sequence[str], arrays: Sequence[np.ndarray]) -> ArrayRecord:
    """An ArrayRecord keyed by tensor name, in model order."""
    if len(names) != len(arrays):
        raise ValueError(f"{len(names)} tensor names for {len(arrays)} arrays")
    return ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in zip(names, arrays)})


def record_to_arrays(record: ArrayRecord, names: Sequence[str], what: str = "arrays") -> NDArrays:
    """The arrays of ``record`` in the order of ``names``; ``ValueError`` naming missing/unexpected keys."""
    keys = list(record.keys())
    missing = [n for n in names if n not in record]
    extra = [k for k in keys if k not in set(names)]
    if missing or extra:
        raise ValueError(
            f"{what}: {len(keys)} tensors, the model has {len(names)}"
            + (f"; missing {missing[:3]}{'...' if len(missing) > 3 else ''}" if missing else "")
            + (f"; unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}" if extra else "")
        )
    return [record[n].numpy() for n in names]


def record_bytes(content: RecordDict) -> int:
    """Bytes of tensor payload in a message (the serialised arrays of every ArrayRecord)."""
    return sum(len(a.data) for rec in content.array_records.values() for a in rec.values())


def metric_value(record: MetricRecord | None, key: str) -> float | None:
    """``record[key]`` as a float; None when it is missing or not a number."""
    if record is None or key not in record:
        return None
    value = record[key]
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def parse_update(
    content: RecordDict,
    names: Sequence[str],
    rover_id: str,
    server_round: int,
    update_key: str = UPDATE_KEY,
    rows_key: str = ROWS_KEY,
) -> ClientUpdate:
    """A rover's reply content as a :class:`ClientUpdate`; :class:`UpdateRejected` if it cannot be one.

    Only the message structure is checked here (records present, tensor names, decodable
    arrays, row indices); values, shapes, dtypes, norm and round are left to
    :func:`forest_perception.collab.updates.validate_update`.
    """

    def refuse(reason: str, message: str) -> UpdateRejected:
        return UpdateRejected(reason, f"update from rover {rover_id!r} (round {server_round}): {message}", rover_id)

    if update_key not in content.array_records:
        raise refuse("count", f"reply has no {update_key!r} ArrayRecord (records: {sorted(content.keys())})")
    metrics = content.metric_records.get(METRICS_KEY)
    meta = content.config_records.get(META_KEY)
    if metrics is None or meta is None:
        raise refuse("num_examples", f"reply lacks the {METRICS_KEY!r} MetricRecord or the {META_KEY!r} ConfigRecord")
    record = content.array_records[update_key]
    if set(record.keys()) != set(names):
        try:
            record_to_arrays(record, names, update_key)
        except ValueError as exc:
            raise refuse("count", str(exc)) from None
    try:
        params = [record[n].numpy() for n in names]
    except Exception as exc:  # bytes that do not decode to an array
        raise refuse("type", f"{update_key}: undecodable tensor ({exc})") from None
    rows: list[np.ndarray | None] | None = None
    if rows_key in content.array_records:
        record = content.array_records[rows_key]
        unknown = [k for k in record.keys() if k not in set(names)]
        if unknown:
            raise refuse("rows", f"{rows_key} names tensors the model does not have: {unknown[:3]}")
        try:
            rows = [record[n].numpy() if n in record else None for n in names]
        except Exception as exc:
            raise refuse("rows", f"{rows_key}: undecodable index array ({exc})") from None
    n = metrics.get(NUM_EXAMPLES)
    num_examples = int(n) if isinstance(n, (int, float)) and not isinstance(n, bool) and float(n).is_integer() else n
    base_round = meta.get("base-round", server_round)
    kind = meta.get("kind", "delta")
    reported = {}
    for key in REPORTED_METRICS + ("val-loss-separate", "train-s"):
        value = metric_value(metrics, key)
        if value is not None:
            reported[key] = value
    return ClientUpdate(
        client_id=rover_id,
        round=base_round,
        num_examples=num_examples,
        params=params,
        kind=kind,
        rows=rows,
        metrics=reported,
    )


# ---------------------------------------------------------------------------------------------- replies


def global_arrays(message: Message, key: str = ARRAYS_KEY) -> tuple[list[str], NDArrays]:
    """Tensor names and arrays of the model a message carries under ``key``; ``ValueError`` if it has none."""
    if key not in message.content.array_records:
        raise ValueError(f"message has no {key!r} ArrayRecord (records: {sorted(message.content.keys())})")
    record = message.content.array_records[key]
    names = list(record.keys())
    return names, [record[n].numpy() for n in names]


def prefixed_records(content: RecordDict, prefix: str, names: Sequence[str]) -> dict[str, NDArrays]:
    """The ArrayRecords whose key starts with ``prefix``, as ``{rest of the key: arrays in names' order}``."""
    return {key[len(prefix):]: record_to_arrays(record, names, key)
            for key, record in content.array_records.items() if key.startswith(prefix)}


def put_update(content: RecordDict, names: Sequence[str], deltas: Sequence[np.ndarray],
               rows: Mapping[str, np.ndarray] | None = None, chain: str = "mixed") -> None:
    """Put one chain's deltas into a train reply, with the row indices of the tensors sent compact."""
    _, update_key, rows_key = CHAIN_KEYS[chain]
    content[update_key] = arrays_to_record(names, deltas)
    if rows:
        content[rows_key] = arrays_to_record(list(rows), list(rows.values()))


def train_reply(message: Message, content: RecordDict, metrics: Mapping[str, float], rover_id: str,
                base_round: int, scope: str = "all", extra_meta: Mapping[str, str] | None = None) -> Message:
    """The reply to a train message: ``content`` (from :func:`put_update`), the metrics and the rover's meta.

    ``extra_meta`` adds entries to the meta (dc-ccl: the ``mimic-version`` the rover trained with).
    """
    content[METRICS_KEY] = MetricRecord(dict(metrics))
    content[META_KEY] = ConfigRecord(
        {"rover-id": rover_id, "base-round": int(base_round), "kind": "delta", "scope": scope, **(extra_meta or {})})
    return Message(content=content, reply_to=message)


def metrics_reply(message: Message, metrics: Mapping[str, float], rover_id: str | None = None) -> Message:
    """The reply to an evaluate message (with the rover's id in ``meta`` when given)."""
    content = RecordDict({METRICS_KEY: MetricRecord(dict(metrics))})
    if rover_id is not None:
        content[META_KEY] = ConfigRecord({"rover-id": rover_id, "status": "ok"})
    return Message(content=content, reply_to=message)


def status_reply(message: Message, rover_id: str, status: str, reason: str) -> Message:
    """A rover's answer that it trained or evaluated nothing (``status`` :data:`NO_DATA` or :data:`NO_HOLDOUT`)."""
    content = RecordDict({
        METRICS_KEY: MetricRecord({NUM_EXAMPLES: 0}),
        META_KEY: ConfigRecord({"rover-id": rover_id, "status": status, "message": reason}),
    })
    return Message(content=content, reply_to=message)


def reply_status(content: RecordDict) -> tuple[str, str]:
    """``(status, message)`` a reply's meta states (``("ok", "")`` when it states none)."""
    meta = content.config_records.get(META_KEY)
    if meta is None:
        return "ok", ""
    return str(meta.get("status", "ok")), str(meta.get("message", ""))


def identity_reply(message: Message, rover_id: str, scope: str = "all") -> Message:
    """The reply to the coordinator's identity query: which rover this node is."""
    return Message(content=RecordDict({META_KEY: ConfigRecord({"rover-id": rover_id, "scope": scope})}),
                   reply_to=message)
