"""Packed model messages (collab.flower.messages): round trips, and every malformed pack refused with its reason."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.superlink.grid import HttpGrid
from test_flower_strategies import NAMES, fake_rover_app, initial, run_round

from forest_perception.collab.flower import messages as fm
from forest_perception.collab.flower.local_grid import LocalGrid
from forest_perception.collab.flower.messages import (
    META_KEY,
    METRICS_KEY,
    PACK_INDEX,
    ROWS_KEY,
    UPDATE_KEY,
    PackError,
    arrays_to_record,
    global_arrays,
    parse_update,
    prefixed_records,
    record_to_arrays,
    unpack_record,
)
from forest_perception.collab.flower.strategies import build_strategy
from forest_perception.collab.updates import UpdateRejected

MIXED = {
    "enc.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
    "enc.bias": np.array([1.5, -2.0], np.float32),
    "bn.num_batches_tracked": np.array(7, np.int64),
    "half": np.array([[0.5, 1.0]], np.float16),
    "mask": np.array([True, False, True]),
    "empty": np.zeros((0, 3), np.float32),
    "dec.weight": np.full((5, 1), -3.25, np.float32),
    "rows": np.array([4, 0, 2], np.int64),
    "double": np.array([np.pi], np.float64),
}


def test_round_trip_gives_back_exactly_the_named_arrays_in_order():
    names, arrays = list(MIXED), list(MIXED.values())
    record = arrays_to_record(names, arrays)
    # one buffer per dtype and the index, whatever the number of tensors
    assert sorted(record.keys()) == sorted([PACK_INDEX] + [f"pack:{t}" for t in
                                                           ("float32", "int64", "float16", "bool", "float64")])
    back = unpack_record(record)
    assert list(back) == names
    for name, want in MIXED.items():
        assert back[name].dtype == want.dtype and back[name].shape == want.shape
        np.testing.assert_array_equal(back[name], want)
    got = record_to_arrays(record, list(reversed(names)))
    for g, w in zip(got, reversed(arrays)):
        np.testing.assert_array_equal(g, w)
    message = SimpleNamespace(content=RecordDict({"arrays": record}))
    gnames, garrays = global_arrays(message)
    assert gnames == names and all(np.array_equal(g, w) for g, w in zip(garrays, arrays))


def test_empty_model_and_prefixed_records_round_trip():
    assert unpack_record(arrays_to_record([], [])) == {}
    content = RecordDict({"change:rover_1": arrays_to_record(NAMES, initial()), "other": arrays_to_record([], [])})
    got = prefixed_records(content, "change:", NAMES)
    assert list(got) == ["rover_1"] and all(np.array_equal(g, w) for g, w in zip(got["rover_1"], initial()))


def test_record_to_arrays_names_missing_and_unexpected_tensors():
    record = arrays_to_record(NAMES[:2] + ["extra"], initial())
    with pytest.raises(ValueError, match="missing.*decoder.conv.bias.*unexpected.*extra"):
        record_to_arrays(record, NAMES)


def test_unpackable_input_is_refused_when_packing():
    with pytest.raises(ValueError, match="cannot be packed"):
        arrays_to_record(["x"], [np.array(["a"], dtype=object)])
    with pytest.raises(ValueError, match="duplicate"):
        arrays_to_record(["x", "x"], [np.zeros(1), np.zeros(1)])


def index_array(doc) -> Array:
    raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return Array(np.frombuffer(raw, dtype=np.uint8).copy())


def good_entries():
    return [[n, "float32", list(a.shape), sum(int(np.prod(b.shape)) for b in initial()[:i])]
            for i, (n, a) in enumerate(zip(NAMES, initial()))]


def good_buffer() -> np.ndarray:
    return np.concatenate([a.reshape(-1) for a in initial()])


def packed(index=None, buffers=None) -> ArrayRecord:
    index = index_array({"version": 1, "tensors": good_entries()}) if index is None else index
    buffers = {"pack:float32": Array(good_buffer())} if buffers is None else buffers
    return ArrayRecord({PACK_INDEX: index, **buffers})


def reply(update: ArrayRecord, rows: ArrayRecord | None = None) -> RecordDict:
    content = RecordDict({UPDATE_KEY: update, METRICS_KEY: MetricRecord({"num-examples": 3}),
                          META_KEY: ConfigRecord({"rover-id": "rover_1", "base-round": 2})})
    if rows is not None:
        content[ROWS_KEY] = rows
    return content


def test_the_hand_built_pack_is_accepted():
    update = parse_update(reply(packed()), NAMES, "rover_1", 2)
    assert all(np.array_equal(g, w) for g, w in zip(update.params, initial()))


def entries_with(i, field, value):
    entries = good_entries()
    entries[i][field] = value
    return {"version": 1, "tensors": entries}


BAD_PACKS = {
    "index not JSON": (packed(index=index_array(b"\xff{not json")), "not UTF-8 JSON"),
    "index not uint8": (packed(index=Array(np.zeros(4, np.float32))), "not 1-D uint8"),
    "index version": (packed(index=index_array({"version": 2, "tensors": good_entries()})), "malformed index"),
    "index not a dict": (packed(index=index_array([1, 2])), "malformed index"),
    "entry not 4 fields": (packed(index=index_array({"version": 1, "tensors": [["a", "float32", [1]]]})),
                           "not \\[name, dtype, shape, offset\\]"),
    "empty name": (packed(index=index_array(entries_with(0, 0, ""))), "non-empty string"),
    "duplicate name": (packed(index=index_array(entries_with(1, 0, NAMES[0]))), "listed twice"),
    "bad dtype": (packed(index=index_array(entries_with(0, 1, "object"))), "not a numeric dtype"),
    "negative size": (packed(index=index_array(entries_with(2, 2, [-5]))), "not a list of sizes"),
    "bool size": (packed(index=index_array(entries_with(2, 2, [True]))), "not a list of sizes"),
    "shape not a list": (packed(index=index_array(entries_with(2, 2, 5))), "not a list of sizes"),
    "negative offset": (packed(index=index_array(entries_with(0, 3, -1))), "offset -1"),
    "float offset": (packed(index=index_array(entries_with(0, 3, 0.5))), "offset 0.5"),
    "gap or overlap": (packed(index=index_array(entries_with(1, 3, 0))), "expected 512"),
    "buffer too short": (packed(buffers={"pack:float32": Array(good_buffer()[:-1])}), "the buffer has 526"),
    "buffer too long": (packed(buffers={"pack:float32": Array(np.zeros(600, np.float32))}),
                        "has 600 elements, the index lists 527"),
    "missing buffer": (packed(buffers={}), "no 'pack:float32' buffer"),
    "unexpected buffer": (packed(buffers={"pack:float32": Array(good_buffer()), "pack:int64": Array(np.zeros(2))}),
                          "does not use"),
    "unexpected key": (packed(buffers={"pack:float32": Array(good_buffer()), NAMES[0]: Array(np.zeros(2))}),
                       "does not use"),
    "buffer of another dtype": (packed(buffers={"pack:float32": Array(good_buffer().astype(np.float64))}),
                                "not 1-D float32"),
    "buffer not 1-D": (packed(buffers={"pack:float32": Array(good_buffer().reshape(17, 31))}), "not 1-D float32"),
    "undecodable buffer": (packed(buffers={"pack:float32": Array(dtype="float32", shape=(527,),
                                                                   stype="numpy.ndarray", data=b"garbage")}),
                           "does not decode"),
    "buffers without index": (ArrayRecord({"pack:float32": Array(good_buffer())}), "without the 'pack:index'"),
}


@pytest.mark.parametrize("case", list(BAD_PACKS))
def test_a_malformed_pack_is_refused_with_a_clear_reason(case):
    record, reason = BAD_PACKS[case]
    with pytest.raises(PackError, match=reason):
        unpack_record(record, UPDATE_KEY)
    with pytest.raises(UpdateRejected, match=reason) as info:
        parse_update(reply(record), NAMES, "rover_1", 2)
    assert info.value.reason == "pack" and "rover_1" in str(info.value)
    # the same malformed pack as a reply's row indices
    with pytest.raises(UpdateRejected) as info:
        parse_update(reply(arrays_to_record(NAMES, initial()), rows=record), NAMES, "rover_1", 2)
    assert info.value.reason == "pack" and ROWS_KEY in str(info.value)


def test_a_rover_sending_a_malformed_pack_is_recorded_as_rejected_and_the_round_goes_on(monkeypatch):
    grid = LocalGrid(fake_rover_app(), 3)
    strategy = build_strategy("fedavg", NAMES, initial())
    real_parse = fm.parse_update

    def parse(content, names, rover_id, server_round, *args, **kwargs):
        if rover_id == "rover_1":
            content[UPDATE_KEY] = packed(buffers={"pack:float32": Array(good_buffer()[:-3])})
        return real_parse(content, names, rover_id, server_round, *args, **kwargs)

    import forest_perception.collab.flower.rover_strategy as rs
    monkeypatch.setattr(rs, "parse_update", parse)
    _, params, metrics = run_round(strategy, grid, 1)
    status = {e.rover_id: (e.status, e.reason) for e in strategy.last_record.entries}
    assert status == {"rover_0": ("accepted", ""), "rover_1": ("rejected", "pack"), "rover_2": ("accepted", "")}
    message = next(e.message for e in strategy.last_record.entries if e.rover_id == "rover_1")
    assert "buffer does not match the index" in message
    assert metrics["accepted"] == 2 and all(np.all(np.isfinite(p)) for p in params)


class FakeHttpGrid(HttpGrid):
    """An HttpGrid whose SuperLink answers one reply per pull (and never for message 'lost')."""

    def __init__(self, ids):  # no connection: only push/pull are used
        self.ids = ids
        self.pulls = 0

    def push_messages(self, messages):
        return list(self.ids)

    def pull_messages(self, message_ids):
        self.pulls += 1
        waiting = sorted(i for i in message_ids if i != "lost")
        if not waiting:
            return []
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=waiting[0]))]


def test_send_and_receive_polls_a_deployed_grid_until_every_reply_or_the_timeout(monkeypatch):
    monkeypatch.setattr(fm.time, "sleep", lambda s: None)
    grid = FakeHttpGrid(["a", "b", "c"])
    replies = fm.send_and_receive(grid, [], None)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b", "c"] and grid.pulls == 3
    clock = iter(range(1000))
    monkeypatch.setattr(fm.time, "time", lambda: float(next(clock)))
    grid = FakeHttpGrid(["a", "lost"])
    replies = fm.send_and_receive(grid, [], 5.0)  # 'lost' never answers: the timeout ends the wait
    assert [r.metadata.reply_to_message_id for r in replies] == ["a"] and grid.pulls == 4
    assert fm.send_and_receive(FakeHttpGrid(["a"]), [], 0.0) == []  # Flower's semantics: timeout 0 pulls nothing
