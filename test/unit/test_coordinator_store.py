"""The coordinator's SQLite store and the resumable round loop (no Ray: fake rovers on an in-process grid)."""

from __future__ import annotations

import math
import sqlite3

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from forest_perception.collab.flower.local_grid import LocalGrid
from forest_perception.collab.flower.messages import (
    ARRAYS_KEY,
    CONFIG_KEY,
    identity_reply,
    put_update,
    record_to_arrays,
    train_reply,
)
from forest_perception.collab.flower.server_app import Coordinator, ServerSettings
from forest_perception.collab.flower.store import CoordinatorStore, RoundRecord, UpdateEntry
from forest_perception.collab.flower.strategies import StrategyConfig, build_strategy
from forest_perception.collab.updates import ClientUpdate

NAMES = ["w", "b"]
IDENTITY = {"algorithm": "fedavg", "model": "toy"}


def params(value: float = 0.0) -> list[np.ndarray]:
    return [np.full((3, 2), value, np.float32), np.full(2, value, np.float32)]


def record(server_round: int, *entries: UpdateEntry, **metrics: float) -> RoundRecord:
    return RoundRecord(server_round=server_round, started=100.0 + server_round, finished=101.0 + server_round,
                       num_available=3, selected=[e.rover_id for e in entries], entries=list(entries),
                       train_metrics=dict(metrics))


def test_rounds_models_and_updates_round_trip(tmp_path):
    path = tmp_path / "coordinator.db"
    update = ClientUpdate("rover_1", 1, 12, [np.ones((0, 2), np.float32), np.full(2, 0.5, np.float32)],
                          rows=[np.zeros(0, np.int64), None])
    with CoordinatorStore(path, IDENTITY, keep_updates=True) as store:
        assert store.last_round() is None and store.latest() is None
        store.save_initial(NAMES, params(0.0), {"algorithm": "fedavg", "step": 0})
        store.commit_round(
            record(1,
                   UpdateEntry("rover_1", 2**64 - 5, "accepted", num_examples=12, base_round=1, bytes_up=300,
                               metrics={"absrel": 0.3, "val-loss": math.nan}, update=update),
                   UpdateEntry("rover_2", 7, "rejected", reason="non_finite",
                               message="tensor 0 has 1 NaN/Inf value(s)"),
                   UpdateEntry("rover_3", 8, "missing", reason="no_reply")),
            NAMES, params(1.0), {"algorithm": "fedavg", "step": 1}, )
    with CoordinatorStore(path, readonly=True) as store:
        last, names, values, state = store.latest()
        assert (last, names, state) == (1, NAMES, {"algorithm": "fedavg", "step": 1})
        np.testing.assert_array_equal(values[0], params(1.0)[0])
        np.testing.assert_array_equal(store.model(0)[1][1], params(0.0)[1])
        rounds = store.rounds()
        assert [r["round"] for r in rounds] == [1]
        assert (rounds[0]["num_accepted"], rounds[0]["num_rejected"], rounds[0]["num_failed"]) == (1, 1, 1)
        assert rounds[0]["bytes_up"] == 300 and rounds[0]["wall_s"] == pytest.approx(1.0)
        rejected = store.rejections(1)
        assert [(r["rover_id"], r["reason"]) for r in rejected] == [("rover_2", "non_finite")]
        accepted = store.updates(1, "accepted")[0]
        assert accepted["node_id"] == str(2**64 - 5)  # beyond SQLite's signed INTEGER: kept as text
        assert accepted["metrics"] == {"absrel": 0.3, "val-loss": None}
        (stored,) = store.stored_updates(1)
        assert stored.client_id == "rover_1" and stored.num_examples == 12 and stored.rows[1] is None
        np.testing.assert_array_equal(stored.params[1], update.params[1])
        assert store.summary()["rejection_reasons"] == {"non_finite": 1}
        with pytest.raises(PermissionError, match="read-only"):
            store.commit_round(record(2), NAMES, params(2.0), {})


def test_a_round_is_committed_once_and_in_order(tmp_path):
    with CoordinatorStore(tmp_path / "c.db", IDENTITY) as store:
        with pytest.raises(ValueError, match="no initial model"):
            store.commit_round(record(1), NAMES, params(), {})
        store.save_initial(NAMES, params(), {})
        with pytest.raises(ValueError, match="already has a model"):
            store.save_initial(NAMES, params(), {})
        store.commit_round(record(1), NAMES, params(1.0), {})
        with pytest.raises(ValueError, match="round 1 cannot be committed: the last completed round is 1"):
            store.commit_round(record(1), NAMES, params(9.0), {})
        with pytest.raises(ValueError, match="the next must be 2"):
            store.commit_round(record(3), NAMES, params(9.0), {})
        with pytest.raises(ValueError, match="two entries for rover 'rover_1'"):
            store.commit_round(record(2, UpdateEntry("rover_1", 1, "accepted"), UpdateEntry("rover_1", 1, "rejected")),
                               NAMES, params(9.0), {})
        assert store.last_round() == 1
        np.testing.assert_array_equal(store.model()[1][0], params(1.0)[0])


def test_a_failed_commit_leaves_nothing_of_the_round(tmp_path, monkeypatch):
    store = CoordinatorStore(tmp_path / "c.db", IDENTITY)
    store.save_initial(NAMES, params(), {"n": 0})

    def torn(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(CoordinatorStore, "_insert_model", staticmethod(torn))
    with pytest.raises(OSError, match="disk full"):
        store.commit_round(record(1, UpdateEntry("rover_1", 1, "accepted")), NAMES, params(1.0), {"n": 1})
    monkeypatch.undo()
    assert store.last_round() == 0 and store.rounds() == [] and store.updates() == []
    assert store.latest()[3] == {"n": 0}
    store.commit_round(record(1, UpdateEntry("rover_1", 1, "accepted")), NAMES, params(1.0), {"n": 1})
    assert store.last_round() == 1
    store.close()


def test_a_store_refuses_another_run_and_a_foreign_file(tmp_path):
    path = tmp_path / "c.db"
    CoordinatorStore(path, IDENTITY).close()
    with pytest.raises(ValueError, match="algorithm='fedavg', this run has algorithm='fedlaavg'"):
        CoordinatorStore(path, {**IDENTITY, "algorithm": "fedlaavg"})
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ValueError, match="junk.db is not a usable SQLite database"):
        CoordinatorStore(junk)
    with pytest.raises(FileNotFoundError, match="missing.db does not exist"):
        CoordinatorStore(tmp_path / "missing.db", readonly=True)
    with sqlite3.connect(path) as conn:  # a file edited by hand: state and model of different rounds
        conn.execute("INSERT INTO models VALUES (0, x'00', 'x', 0)")
        conn.execute("INSERT INTO server_state VALUES (1, 5, x'00')")
    with CoordinatorStore(path, IDENTITY) as store, pytest.raises(ValueError, match="edited outside"):
        store.latest()


# ---------------------------------------------------------------------------------------------- resume


def toy_rover_app() -> ClientApp:
    """Rover i sends delta (i + 1) * 0.01 * round, from 5 + i samples."""
    app = ClientApp()

    @app.query()
    def query(message: Message, context: Context) -> Message:
        return identity_reply(message, f"rover_{context.node_config['partition-id']}")

    @app.train()
    def train(message: Message, context: Context) -> Message:
        i = int(context.node_config["partition-id"])
        server_round = int(message.content[CONFIG_KEY]["server-round"])
        current = record_to_arrays(message.content[ARRAYS_KEY], NAMES)
        deltas = [np.full_like(a, (i + 1) * 0.01 * server_round) + 0.001 * a for a in current]
        content = RecordDict()
        put_update(content, NAMES, deltas)
        return train_reply(message, content, {"num-examples": 5 + i, "train-loss": 1.0 / server_round},
                           f"rover_{i}", server_round)

    return app


class KilledGrid(LocalGrid):
    """Delivers round ``kill_round``'s train messages (the rovers do the work), then the coordinator dies."""

    def __init__(self, *args, kill_round: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.kill_round = kill_round

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout=timeout)
        config = messages[0].content.config_records.get(CONFIG_KEY) if messages else None
        if config is not None and config.get("server-round") == self.kill_round and "algorithm" in config:
            raise KeyboardInterrupt("coordinator killed mid-round")
        return replies


def coordinator(path, algorithm="fedlaavg"):
    settings = ServerSettings(algorithm=algorithm, num_rounds=5, state_db=str(path))

    def availability(rover, server_round):  # rovers come and go
        return (int(rover[-1]) + server_round) % 3 != 0

    strategy = build_strategy(algorithm, NAMES, params(0.1), StrategyConfig(fraction_train=0.7, seed=3),
                              availability=availability)
    return Coordinator(strategy, CoordinatorStore(path, {"algorithm": algorithm, "model": "toy"}), settings)


@pytest.mark.parametrize("algorithm", ["fedlaavg", "mc-psgd"])
def test_a_coordinator_killed_mid_round_resumes_without_losing_or_repeating_updates(tmp_path, algorithm):
    straight = coordinator(tmp_path / "straight.db", algorithm)
    straight.run(LocalGrid(toy_rover_app(), 6))
    straight.store.close()

    killed = coordinator(tmp_path / "killed.db", algorithm)
    grid = KilledGrid(toy_rover_app(), 6, kill_round=3)
    with pytest.raises(KeyboardInterrupt):
        killed.run(grid)
    killed.store.close()
    with CoordinatorStore(tmp_path / "killed.db", readonly=True) as store:
        assert store.last_round() == 2 and store.updates(3) == []  # round 3's replies were never applied

    resumed = coordinator(tmp_path / "killed.db", algorithm)
    records = resumed.run(LocalGrid(toy_rover_app(), 6))
    resumed.store.close()
    assert [r.server_round for r in records] == [3, 4, 5] and records[0].resumed and not records[1].resumed

    with CoordinatorStore(tmp_path / "straight.db", readonly=True) as a, \
            CoordinatorStore(tmp_path / "killed.db", readonly=True) as b:
        assert [r["round"] for r in b.rounds()] == [1, 2, 3, 4, 5]
        for server_round in range(6):
            for x, y in zip(a.model(server_round)[1], b.model(server_round)[1]):
                np.testing.assert_array_equal(x, y)
        rows = [(u["round"], u["rover_id"], u["chain"], u["status"], u["digest"]) for u in a.updates()]
        assert rows == [(u["round"], u["rover_id"], u["chain"], u["status"], u["digest"]) for u in b.updates()]
        assert len({(r, rover, chain) for r, rover, chain, *_ in rows}) == len(rows)
        np.testing.assert_array_equal(a.model()[1][0], b.model()[1][0])


def test_the_coordinator_refuses_a_state_file_of_another_run(tmp_path):
    first = coordinator(tmp_path / "c.db", "fedlaavg")
    first.run(LocalGrid(toy_rover_app(), 3), num_rounds=1)
    first.store.close()
    with pytest.raises(ValueError, match="algorithm='fedlaavg', this run has algorithm='fedavg'"):
        coordinator(tmp_path / "c.db", "fedavg")
