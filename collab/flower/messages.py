"""The messages between the coordinator and the rovers: record keys, array conversions, replies and their parsing.

The contract the ServerApp's strategies and every rover ClientApp share (the real one, the experiments'
and the tests' fakes); the keys and what each carries are in ``docs/federated.md`` ("Messages").
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from forest_perception.collab.updates import ClientUpdate, NDArrays, UpdateRejected

if TYPE_CHECKING:
    from flwr.serverapp import Grid

ARRAYS_KEY = "arrays"  # server -> rover: the global model, packed ArrayRecord (arrays_to_record) of named tensors
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
CORRECTION_KEY = "scaffold-correction"  # server -> rover (scaffold): c - c_i per trained tensor, from round 2
CONTROL_KEY = "scaffold-control"  # rover -> server (scaffold): c_i, the mean raw gradient of its local steps
NO_DATA = "no-data"  # meta status of a rover that has no usable recordings (nothing trained or evaluated)
NO_HOLDOUT = "no-holdout"  # meta status of an evaluation by a rover with nothing held out (a single segment)

REPORTED_METRICS = ("train-loss", "val-loss", "absrel", "delta1")
"""Rover metrics the strategies average (weighted by num-examples) over the accepted updates."""

CHAIN_KEYS: dict[str, tuple[str, str, str]] = {
    "mixed": (ARRAYS_KEY, UPDATE_KEY, ROWS_KEY),
    "separate": (SEPARATE_KEY, SEPARATE_UPDATE_KEY, SEPARATE_ROWS_KEY),
}
"""Per model chain a rover trains: (global model key, delta key, rows key); MC-PSGD adds the separate chain."""


PACK_INDEX = "pack:index"
"""Key of a packed record's index: uint8 UTF-8 JSON ``{"version": 1, "tensors": [[name, dtype, shape, offset]]}``."""
PACK_PREFIX = "pack:"
"""A packed ArrayRecord holds one flat buffer per dtype, ``pack:<dtype>`` (e.g. ``pack:float32``), and the index."""
PACK_VERSION = 1
PACK_DTYPES = frozenset({"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                         "float16", "float32", "float64"})
"""The dtypes a packed record may carry (numeric only: nothing that needs pickling)."""
REPLY_POLL_S = 0.25
"""How often :func:`send_and_receive` asks a deployed SuperLink for replies (Flower's HttpGrid waits 3 s)."""


class PackError(ValueError):
    """A packed ArrayRecord whose index or buffers are malformed or do not match each other."""


def arrays_to_record(names: Sequence[str], arrays: Sequence[np.ndarray]) -> ArrayRecord:
    """The arrays as one packed ArrayRecord: a flat buffer per dtype and an index (names in model order).

    Flower sends every Array of a record as its own object (and every chunk of it), one signed
    request each over the deployment's hops; a model of 142 tensors was ~288 objects per message.
    Packed it is a few. :func:`unpack_record` gives back exactly the named arrays.
    """
    if len(names) != len(arrays):
        raise ValueError(f"{len(names)} tensor names for {len(arrays)} arrays")
    if len(set(names)) != len(names):
        raise ValueError("duplicate tensor names")
    entries: list[list] = []
    parts: dict[str, list[np.ndarray]] = {}
    sizes: dict[str, int] = {}
    for name, array in zip(names, arrays):
        a = np.asarray(array)
        dtype = a.dtype.name
        if dtype not in PACK_DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be packed")
        entries.append([str(name), dtype, [int(d) for d in a.shape], sizes.get(dtype, 0)])
        parts.setdefault(dtype, []).append(a.reshape(-1))
        sizes[dtype] = sizes.get(dtype, 0) + a.size
    index = json.dumps({"version": PACK_VERSION, "tensors": entries}, separators=(",", ":")).encode()
    record = {PACK_INDEX: Array(np.frombuffer(index, dtype=np.uint8).copy())}
    for dtype, chunks in parts.items():
        record[PACK_PREFIX + dtype] = Array(np.ascontiguousarray(np.concatenate(chunks)))
    return ArrayRecord(record)


def is_packed(record: ArrayRecord) -> bool:
    """Whether ``record`` is (or claims to be) packed by :func:`arrays_to_record`."""
    return any(k.startswith(PACK_PREFIX) for k in record.keys())


def _decode(record: ArrayRecord, key: str, what: str) -> np.ndarray:
    try:
        return record[key].numpy()
    except Exception as exc:  # bytes that do not decode to an array
        raise PackError(f"{what}: {key} does not decode to an array ({exc})") from None


def _index_entries(record: ArrayRecord, what: str) -> list[tuple[str, str, tuple[int, ...], int]]:
    """The checked entries of a packed record's index."""
    if PACK_INDEX not in record:
        raise PackError(f"{what}: packed buffers {sorted(record.keys())[:3]} without the {PACK_INDEX!r} index")
    raw = _decode(record, PACK_INDEX, what)
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise PackError(f"{what}: malformed index: a {raw.dtype} array of shape {raw.shape}, not 1-D uint8")
    try:
        index = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise PackError(f"{what}: malformed index: not UTF-8 JSON ({exc})") from None
    if not (isinstance(index, dict) and index.get("version") == PACK_VERSION
            and isinstance(index.get("tensors"), list)):
        raise PackError(f"{what}: malformed index: not {{'version': {PACK_VERSION}, 'tensors': [...]}}")
    entries = []
    seen: set[str] = set()
    for i, entry in enumerate(index["tensors"]):
        if not (isinstance(entry, list) and len(entry) == 4):
            raise PackError(f"{what}: malformed index entry {i}: not [name, dtype, shape, offset]")
        name, dtype, shape, offset = entry
        if not isinstance(name, str) or not name:
            raise PackError(f"{what}: malformed index entry {i}: name {name!r} is not a non-empty string")
        if name in seen:
            raise PackError(f"{what}: malformed index: tensor {name!r} listed twice")
        seen.add(name)
        if dtype not in PACK_DTYPES:
            raise PackError(f"{what}: malformed index entry {name!r}: dtype {dtype!r} is not a numeric dtype")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                for d in shape)):
            raise PackError(f"{what}: malformed index entry {name!r}: shape {shape!r} is not a list of sizes >= 0")
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise PackError(f"{what}: malformed index entry {name!r}: offset {offset!r} is not an integer >= 0")
        entries.append((name, dtype, tuple(shape), offset))
    return entries


def unpack_record(record: ArrayRecord, what: str = "arrays") -> dict[str, np.ndarray]:
    """The named arrays of a record, in the order packed: ``{tensor name: array}``.

    A packed record (:func:`arrays_to_record`) is checked whole: its index (JSON, version, one
    ``[name, dtype, shape, offset]`` per tensor, no name twice), and each dtype's buffer (1-D, of
    that dtype, its tensors laid end to end in index order from offset 0, filling it exactly, no
    buffer without tensors, no other keys); :class:`PackError` says what does not fit. A record
    keyed by tensor name (the format before packing) is read as it is.
    """
    if not is_packed(record):
        try:
            return {k: record[k].numpy() for k in record.keys()}
        except Exception as exc:  # bytes that do not decode to an array: not a PackError (nothing was packed)
            raise ValueError(f"{what}: undecodable tensor ({exc})") from None
    entries = _index_entries(record, what)
    dtypes = {dtype for _, dtype, _, _ in entries}
    unexpected = [k for k in record.keys() if k != PACK_INDEX and k[len(PACK_PREFIX):] not in dtypes]
    if unexpected:
        raise PackError(f"{what}: buffers or keys the index does not use: {unexpected[:3]}")
    buffers: dict[str, np.ndarray] = {}
    for dtype in dtypes:
        key = PACK_PREFIX + dtype
        if key not in record:
            raise PackError(f"{what}: the index lists {dtype} tensors but the record has no {key!r} buffer")
        buffer = _decode(record, key, what)
        if buffer.ndim != 1 or buffer.dtype.name != dtype:
            raise PackError(f"{what}: buffer {key!r} is a {buffer.dtype} array of shape {buffer.shape}, "
                            f"not 1-D {dtype}")
        buffers[dtype] = buffer
    out: dict[str, np.ndarray] = {}
    used = dict.fromkeys(dtypes, 0)
    for name, dtype, shape, offset in entries:
        size = math.prod(shape)
        if offset != used[dtype]:
            raise PackError(f"{what}: buffer does not match the index: tensor {name!r} at {dtype} offset {offset}, "
                            f"expected {used[dtype]} (tensors must lie end to end)")
        if offset + size > buffers[dtype].size:
            raise PackError(f"{what}: buffer does not match the index: tensor {name!r} needs {dtype} elements "
                            f"{offset}..{offset + size}, the buffer has {buffers[dtype].size}")
        out[name] = buffers[dtype][offset:offset + size].reshape(shape)
        used[dtype] = offset + size
    for dtype, n in used.items():
        if n != buffers[dtype].size:
            raise PackError(f"{what}: buffer does not match the index: {PACK_PREFIX}{dtype} has "
                            f"{buffers[dtype].size} elements, the index lists {n}")
    return out


def record_to_arrays(record: ArrayRecord, names: Sequence[str], what: str = "arrays") -> NDArrays:
    """The arrays of ``record`` in the order of ``names``; ``ValueError`` naming missing/unexpected tensors.

    :class:`PackError` (a ``ValueError``) when a packed record is malformed (:func:`unpack_record`).
    """
    arrays = unpack_record(record, what)
    keys = list(arrays)
    missing = [n for n in names if n not in arrays]
    extra = [k for k in keys if k not in set(names)]
    if missing or extra:
        raise ValueError(
            f"{what}: {len(keys)} tensors, the model has {len(names)}"
            + (f"; missing {missing[:3]}{'...' if len(missing) > 3 else ''}" if missing else "")
            + (f"; unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}" if extra else "")
        )
    return [arrays[n] for n in names]


def send_and_receive(grid: Grid, messages: Sequence[Message], timeout: float | None) -> list[Message]:
    """``grid.send_and_receive(messages, timeout=timeout)``, polling a deployed SuperLink every :data:`REPLY_POLL_S`.

    Flower's HttpGrid (the deployed ServerApp's grid) sleeps a fixed 3 s between its pulls; this
    does what it does (push, pull until every reply is in or ``timeout`` has passed; ``None``:
    wait for all) with a shorter sleep. Any other grid (simulation, the tests') is asked as it is.
    """
    from flwr.superlink.grid import HttpGrid  # noqa: PLC0415 - the ServerApp's side only

    if not isinstance(grid, HttpGrid):
        return list(grid.send_and_receive(messages, timeout=timeout))
    ids = set(grid.push_messages(messages))
    end = time.time() + (timeout if timeout is not None else 0.0)
    replies: list[Message] = []
    while timeout is None or time.time() < end:
        pulled = list(grid.pull_messages(ids))
        replies.extend(pulled)
        ids.difference_update(m.metadata.reply_to_message_id for m in pulled)
        if not ids:
            break
        time.sleep(REPLY_POLL_S)
    return replies


def record_bytes(content: RecordDict) -> int:
    """Bytes of tensor payload in a message (the serialised arrays of every ArrayRecord); a pack's index is
    metadata (names, dtypes, shapes), like the header of each Array, and is not counted."""
    return sum(len(a.data) for rec in content.array_records.values() for key, a in rec.items() if key != PACK_INDEX)


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
    try:
        tensors = unpack_record(record, update_key)
    except PackError as exc:
        raise refuse("pack", str(exc)) from None
    except ValueError as exc:
        raise refuse("type", str(exc)) from None
    if set(tensors) != set(names):
        try:
            record_to_arrays(record, names, update_key)
        except ValueError as exc:
            raise refuse("count", str(exc)) from None
    params = [tensors[n] for n in names]
    rows: list[np.ndarray | None] | None = None
    if rows_key in content.array_records:
        try:
            indices = unpack_record(content.array_records[rows_key], rows_key)
        except PackError as exc:
            raise refuse("pack", str(exc)) from None
        except ValueError as exc:
            raise refuse("rows", str(exc)) from None
        unknown = [k for k in indices if k not in set(names)]
        if unknown:
            raise refuse("rows", f"{rows_key} names tensors the model does not have: {unknown[:3]}")
        rows = [indices.get(n) for n in names]
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
    arrays = unpack_record(message.content.array_records[key], key)
    return list(arrays), list(arrays.values())


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
