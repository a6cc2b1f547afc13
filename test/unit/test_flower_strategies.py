"""Flower strategies driven through real Flower messages (no Ray): fake numpy rovers behind an in-process grid."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from forest_perception.collab.algorithms import FedLaAvgServer, SemiCyclicServer, fedavg, fedsubavg, robust_fedavg
from forest_perception.collab.flower.local_grid import LocalGrid
from forest_perception.collab.flower.messages import (
    ARRAYS_KEY,
    CONFIG_KEY,
    CONTROL_KEY,
    CORRECTION_KEY,
    META_KEY,
    METRICS_KEY,
    ROWS_KEY,
    SEPARATE_KEY,
    UPDATE_KEY,
    arrays_to_record,
    identity_reply,
    metrics_reply,
    parse_update,
    put_update,
    record_to_arrays,
    train_reply,
    unpack_record,
)
from forest_perception.collab.flower.strategies import AveragingServer, StrategyConfig, build_strategy
from forest_perception.collab.state import pack_state, unpack_state
from forest_perception.collab.updates import ClientUpdate, UpdateRejected

NAMES = ["encoder.conv.weight", "decoder.conv.weight", "decoder.conv.bias"]
SHAPES = [(64, 8), (5, 2), (5,)]


def initial() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.normal(size=s).astype(np.float32) for s in SHAPES]


def honest_delta(rover: int, server_round: int) -> list[np.ndarray]:
    rng = np.random.default_rng([rover, server_round])
    return [(0.05 * rng.normal(size=s)).astype(np.float32) for s in SHAPES]


def rover_id(context: Context) -> str:
    return str(context.node_config.get("rover-id", f"rover_{int(context.node_config['partition-id'])}"))


def chain_score(arrays) -> float:
    """The fake rovers' loss of a model: its distance from the origin of the first tensor's first row."""
    return float(np.abs(arrays[0][0]).sum())


def fake_control(rover: int, server_round: int, name: str) -> np.ndarray:
    """The fake rovers' SCAFFOLD control of one tensor: a function of (rover, round, tensor)."""
    rng = np.random.default_rng([rover, server_round, NAMES.index(name)])
    return rng.normal(size=SHAPES[NAMES.index(name)]).astype(np.float32)


def fake_rover_app(behaviour: dict[str, str] | None = None, num_examples: dict[str, int] | None = None,
                   corrections: dict | None = None) -> ClientApp:
    """Numpy rovers: an honest delta from (rover, round), or a misbehaviour named in ``behaviour``.

    Under scaffold each rover also sends a control (:func:`fake_control`) and notes in ``corrections`` the correction
    it was sent (``{rover: {round: {tensor: array}}}``).
    """
    behaviour = behaviour or {}
    corrections = {} if corrections is None else corrections
    num_examples = num_examples or {}
    app = ClientApp()

    @app.query()
    def query(message: Message, context: Context) -> Message:
        return identity_reply(message, rover_id(context))

    @app.train()
    def train(message: Message, context: Context) -> Message:
        rover = rover_id(context)
        kind = behaviour.get(rover, "")
        config = message.content[CONFIG_KEY]
        server_round = int(config["server-round"])
        if kind == "crash":
            raise RuntimeError("wheel motor stalled")
        record_to_arrays(message.content[ARRAYS_KEY], NAMES)  # the rover can read the model it was sent
        deltas = honest_delta(int(rover.split("_")[1]), server_round)
        names, rows, base_round, claimed = list(NAMES), None, server_round, rover
        if kind == "nan":
            deltas[1][0, 0] = np.nan
        elif kind == "shape":
            deltas[0] = deltas[0][:3]
        elif kind == "dtype":
            deltas[2] = deltas[2].astype(np.float64)
        elif kind == "huge":
            deltas = [d * 1e5 for d in deltas]
        elif kind == "stale":
            base_round = server_round - 1
        elif kind == "count":
            names, deltas = names[:2], deltas[:2]
        elif kind == "spoof":
            claimed = "rover_0"
        elif kind == "decoder":  # trained only the decoder: the encoder goes compact, no rows
            deltas[0] = np.zeros((0, 8), np.float32)
            rows = {NAMES[0]: np.zeros(0, np.int64)}
        content = RecordDict()
        put_update(content, names, deltas, rows)
        if config.get("algorithm") == "scaffold" and kind != "no-control":
            if CORRECTION_KEY in message.content.array_records:  # what the coordinator told this rover
                corrections.setdefault(rover, {})[server_round] = unpack_record(message.content[CORRECTION_KEY])
            trained = names[1:] if kind == "decoder" else names
            control = {n: fake_control(int(rover.split("_")[1]), server_round, n) for n in trained}
            if kind == "bad-control":
                control[NAMES[1]] = control[NAMES[1]] * np.nan
            content[CONTROL_KEY] = arrays_to_record(list(control), list(control.values()))
        metrics = {"num-examples": num_examples.get(rover, 10), "train-loss": 1.0 + 0.1 * int(rover[-1]),
                   "val-loss": float(config.get("block", 0)) + 0.5, "absrel": 0.2, "delta1": 0.7}
        if SEPARATE_KEY in message.content.array_records:
            put_update(content, NAMES, [d * 0.5 for d in honest_delta(99, server_round)], chain="separate")
            metrics["val-loss-separate"] = 0.1  # the separate chain fits this block better
        return train_reply(message, content, metrics, claimed, base_round)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        arrays = record_to_arrays(message.content[ARRAYS_KEY], NAMES)
        scores = {"num-examples": 5, "eval-loss": chain_score(arrays)}
        if message.content[CONFIG_KEY].get("score-chains"):  # MC-PSGD: both averaged chains
            scores["eval-loss-separate"] = chain_score(record_to_arrays(message.content[SEPARATE_KEY], NAMES))
        return metrics_reply(message, scores)

    return app


def run_round(strategy, grid, server_round):
    messages = list(strategy.configure_train(server_round, arrays_to_record(NAMES, strategy.params), ConfigRecord(),
                                             grid))
    replies = grid.send_and_receive(messages)
    arrays, metrics = strategy.aggregate_train(server_round, replies)
    strategy.after_train(server_round, grid, 10.0)
    return messages, strategy.params, strategy.last_record.train_metrics


def updates_of(rovers, server_round, factor=1.0):
    return [ClientUpdate(f"rover_{r}", server_round, 10, [d * factor for d in honest_delta(r, server_round)])
            for r in rovers]


# ---------------------------------------------------------------------------------------------- FedAvg and bad input


def test_bad_updates_are_refused_with_reasons_and_the_model_is_the_mean_of_the_good_ones():
    behaviour = {"rover_2": "nan", "rover_3": "shape", "rover_4": "dtype", "rover_5": "huge", "rover_6": "stale",
                 "rover_7": "count", "rover_8": "spoof", "rover_9": "crash"}
    silent = 1011  # node of rover_10: says who it is, then never answers a train message
    grid = LocalGrid(fake_rover_app(behaviour, {"rover_1": 30}), 11,
                     online=lambda node, rnd: node != silent or rnd == 0)
    strategy = build_strategy("fedavg", NAMES, initial(), StrategyConfig(max_norm=10.0))
    messages, params, metrics = run_round(strategy, grid, 1)

    assert len(messages) == 11 and all(m.metadata.message_type == "train" for m in messages)
    expected = fedavg(initial(), [ClientUpdate("rover_0", 1, 10, honest_delta(0, 1)),
                                  ClientUpdate("rover_1", 1, 30, honest_delta(1, 1))])
    for got, want in zip(params, expected):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
    assert all(np.all(np.isfinite(p)) for p in params)
    status = {e.rover_id: (e.status, e.reason) for e in strategy.last_record.entries}
    assert status == {
        "rover_0": ("accepted", ""), "rover_1": ("accepted", ""), "rover_2": ("rejected", "non_finite"),
        "rover_3": ("rejected", "shape"), "rover_4": ("rejected", "dtype"), "rover_5": ("rejected", "norm"),
        "rover_6": ("rejected", "stale"), "rover_7": ("rejected", "count"), "rover_8": ("rejected", "client_id"),
        "rover_9": ("failed", "client_error"), "rover_10": ("missing", "no_reply"),
    }
    messages_by_rover = {e.rover_id: e.message for e in strategy.last_record.entries}
    assert "rover_2" in messages_by_rover["rover_2"] and "NaN" in messages_by_rover["rover_2"]
    assert "wheel motor stalled" in messages_by_rover["rover_9"]
    assert metrics["accepted"] == 2 and metrics["rejected"] == 7 and metrics["failed"] == 2
    # the round's metrics are the sample-weighted mean over the accepted rovers only
    assert metrics["train-loss"] == pytest.approx((10 * 1.0 + 30 * 1.1) / 40)
    entry = next(e for e in strategy.last_record.entries if e.rover_id == "rover_0")
    assert entry.bytes_down > 4 * sum(np.prod(s) for s in SHAPES) and entry.bytes_up > 0


def test_a_round_of_only_bad_updates_leaves_the_model_unchanged():
    grid = LocalGrid(fake_rover_app({"rover_0": "nan", "rover_1": "crash"}), 2)
    strategy = build_strategy("fedavg", NAMES, initial())
    _, params, metrics = run_round(strategy, grid, 1)
    for got, want in zip(params, initial()):
        np.testing.assert_array_equal(got, want)
    assert metrics["accepted"] == 0 and math.isnan(strategy.last_record.train_metrics["train-loss"])


def test_parse_update_names_what_is_missing():
    with pytest.raises(UpdateRejected) as info:
        parse_update(RecordDict({METRICS_KEY: MetricRecord({"num-examples": 1})}), NAMES, "rover_1", 3)
    assert info.value.reason == "count" and "rover_1" in str(info.value)
    content = RecordDict({UPDATE_KEY: arrays_to_record(NAMES, initial())})
    with pytest.raises(UpdateRejected, match="meta"):
        parse_update(content, NAMES, "rover_1", 3)
    content[METRICS_KEY] = MetricRecord({"num-examples": 1})
    content[META_KEY] = ConfigRecord({"rover-id": "rover_1", "base-round": 2})
    content[ROWS_KEY] = arrays_to_record(["no.such.tensor"], [np.zeros(1, np.int64)])
    with pytest.raises(UpdateRejected) as info:
        parse_update(content, NAMES, "rover_1", 3)
    assert info.value.reason == "rows" and "no.such.tensor" in str(info.value)
    del content[ROWS_KEY]
    # a record keyed by tensor name (the format before packing) is still read, and checked as before
    content[UPDATE_KEY] = ArrayRecord({n: Array(a) for n, a in zip(NAMES, initial())})
    content[UPDATE_KEY][NAMES[2]] = Array(dtype="float32", shape=(5,), stype="numpy.ndarray", data=b"not an array")
    with pytest.raises(UpdateRejected) as info:
        parse_update(content, NAMES, "rover_1", 3)
    assert info.value.reason == "type" and "undecodable" in str(info.value)


# ---------------------------------------------------------------------------------------------- the other rules


def test_fedsubavg_moves_a_row_by_the_mean_of_the_rovers_that_trained_it():
    grid = LocalGrid(fake_rover_app({"rover_0": "decoder"}), 2)
    sub = build_strategy("fedsubavg", NAMES, initial())
    _, params, _ = run_round(sub, grid, 1)
    d1 = honest_delta(1, 1)
    # only rover_1 trained the encoder: it moves by rover_1's whole delta (FedAvg would halve it)
    np.testing.assert_allclose(params[0], initial()[0] + d1[0], atol=1e-7)
    expected = fedsubavg(initial(), [
        ClientUpdate("rover_0", 1, 10, [np.zeros((0, 8), np.float32)] + honest_delta(0, 1)[1:],
                     rows=[np.zeros(0, np.int64), None, None]),
        ClientUpdate("rover_1", 1, 10, d1),
    ])
    for got, want in zip(params, expected):
        np.testing.assert_allclose(got, want, atol=1e-7)
    entries = {e.rover_id: e for e in sub.last_record.entries}
    assert entries["rover_0"].bytes_up < entries["rover_1"].bytes_up  # the compact upload is smaller

    plain = build_strategy("fedavg", NAMES, initial())
    _, averaged, _ = run_round(plain, LocalGrid(fake_rover_app({"rover_0": "decoder"}), 2), 1)
    np.testing.assert_allclose(averaged[0], initial()[0] + d1[0] / 2, atol=1e-7)


def test_fedsubavg_weighs_rows_by_the_population_heat_when_a_rover_is_away():
    def away(rover, server_round):
        return not (rover == "rover_0" and server_round == 2)

    grid = LocalGrid(fake_rover_app({"rover_0": "decoder"}), 2)
    sub = build_strategy("fedsubavg", NAMES, initial(), availability=away)
    _, after_1, _ = run_round(sub, grid, 1)
    _, after_2, _ = run_round(sub, grid, 2)
    d2 = honest_delta(1, 2)
    # both rovers' 10 samples involve the decoder, only rover_1's the encoder: heat 20 vs 10 of total 20
    np.testing.assert_allclose(after_2[0], after_1[0] + 2.0 * d2[0], atol=1e-6)
    np.testing.assert_allclose(after_2[1], after_1[1] + d2[1], atol=1e-6)


def test_fedlaavg_asks_the_least_recently_seen_rovers_and_averages_everyones_latest_delta():
    grid = LocalGrid(fake_rover_app(), 4)
    strategy = build_strategy("fedlaavg", NAMES, initial(), StrategyConfig(fraction_train=0.5))
    # N = the 4 identified rovers from round 1 on, though only 2 have been heard from
    reference = FedLaAvgServer(initial(), max_norm=100.0, population=4)
    picked = []
    for server_round in (1, 2, 3):
        messages, params, _ = run_round(strategy, grid, server_round)
        rovers = sorted(strategy.directory[m.metadata.dst_node_id] for m in messages)
        picked.append(rovers)
        reference.aggregate(server_round, updates_of([int(r[-1]) for r in rovers], server_round))
        for got, want in zip(params, reference.params):
            np.testing.assert_allclose(got, want, atol=1e-7)
    assert picked == [["rover_0", "rover_1"], ["rover_2", "rover_3"], ["rover_0", "rover_1"]]


def test_robust_trimmed_mean_keeps_one_outlier_within_the_norm_limit_out():
    grid = LocalGrid(fake_rover_app({"rover_4": "huge"}), 5)
    config = StrategyConfig(max_norm=1e6, trim_fraction=0.2)
    strategy = build_strategy("robust", NAMES, initial(), config)
    _, params, _ = run_round(strategy, grid, 1)
    updates = updates_of(range(4), 1) + [ClientUpdate("rover_4", 1, 10, [d * 1e5 for d in honest_delta(4, 1)])]
    for got, want in zip(params, robust_fedavg(initial(), updates, trim_fraction=0.2)):
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert max(float(np.abs(g - i).max()) for g, i in zip(params, initial())) < 1.0  # FedAvg would jump ~1e4


def test_scaffold_sends_each_rover_its_own_correction_and_refuses_an_update_without_a_usable_control():
    corrections: dict = {}
    grid = LocalGrid(fake_rover_app({"rover_2": "no-control", "rover_3": "bad-control"}, corrections=corrections), 4)
    strategy = build_strategy("scaffold", NAMES, initial())
    messages, params, metrics = run_round(strategy, grid, 1)
    assert all(CORRECTION_KEY not in m.content.array_records for m in messages)  # nobody has a control yet
    status = {e.rover_id: (e.status, e.reason) for e in strategy.last_record.entries}
    assert status == {"rover_0": ("accepted", ""), "rover_1": ("accepted", ""),
                      "rover_2": ("rejected", "bad_control"), "rover_3": ("rejected", "bad_control")}
    refusals = {e.rover_id: e.message for e in strategy.last_record.entries}
    assert "no control" in refusals["rover_2"] and "not finite" in refusals["rover_3"]
    # the model moved by the accepted rovers' mean delta only
    for got, want in zip(params, fedavg(initial(), updates_of([0, 1], 1))):
        np.testing.assert_allclose(got, want, atol=1e-7)
    bytes_1 = {e.rover_id: e.bytes_down for e in strategy.last_record.entries}

    messages, _, _ = run_round(strategy, grid, 2)
    swarm = {n: (fake_control(0, 1, n) + fake_control(1, 1, n)) / 2 for n in NAMES}
    assert sorted(corrections) == ["rover_0", "rover_1"]  # the refused rovers have no control on the coordinator
    for r in (0, 1):
        got = corrections[f"rover_{r}"][2]
        assert sorted(got) == sorted(NAMES)
        for n in NAMES:
            np.testing.assert_allclose(got[n], swarm[n] - fake_control(r, 1, n), atol=1e-6)
    bytes_2 = {e.rover_id: e.bytes_down for e in strategy.last_record.entries}
    model_bytes = 4 * sum(int(np.prod(s)) for s in SHAPES)
    assert bytes_2["rover_0"] - bytes_1["rover_0"] >= model_bytes and bytes_2["rover_2"] == bytes_1["rover_2"]


@pytest.mark.parametrize("mode", ["mm", "mc"])
def test_semicyclic_rounds_carry_their_block_and_evaluation_uses_its_predictor(mode):
    grid = LocalGrid(fake_rover_app(), 3)
    strategy = build_strategy(f"{mode}-psgd", NAMES, initial(), StrategyConfig(num_blocks=2, fraction_evaluate=1.0))
    reference = SemiCyclicServer(initial(), num_blocks=2, mode=mode, max_norm=100.0)
    for server_round in (1, 2, 3):
        messages, params, metrics = run_round(strategy, grid, server_round)
        config = messages[0].content[CONFIG_KEY]
        assert config["block"] == (server_round - 1) % 2
        assert (SEPARATE_KEY in messages[0].content.array_records) == (mode == "mc")
        separate = []
        if mode == "mc":
            separate = [ClientUpdate(f"rover_{r}", server_round, 10, [d * 0.5 for d in honest_delta(99, server_round)])
                        for r in range(3)]
        # MC: the rovers score the two averaged chains (not their local models) and the lower wins
        result = reference.aggregate(server_round, updates_of(range(3), server_round), separate,
                                     loss_fn=lambda block, p: chain_score(p))
        for got, want in zip(params, reference.params):
            np.testing.assert_allclose(got, want, atol=1e-7)
        if mode == "mc":
            assert strategy.last_record.chosen == result.chosen is not None
            assert metrics["loss-separate"] == pytest.approx(result.losses["separate"], rel=1e-6)
            assert metrics["loss-mixed"] == pytest.approx(result.losses["mixed"], rel=1e-6)
            assert {e.chain for e in strategy.last_record.entries} == {"mixed", "separate"}
    evaluations = list(strategy.configure_evaluate(3, arrays_to_record(NAMES, strategy.params), ConfigRecord(), grid))
    sent = record_to_arrays(evaluations[0].content[ARRAYS_KEY], NAMES)
    for got, want in zip(sent, reference.predictor(0)):
        np.testing.assert_allclose(got, want, atol=1e-7)
    summary = strategy.aggregate_evaluate(3, grid.send_and_receive(evaluations))
    assert summary["rovers"] == 3 and summary["eval-loss"] > 0


# ---------------------------------------------------------------------------------------------- selection and state


def test_availability_limits_selection_and_sampling_repeats_for_the_same_seed_and_round():
    def out(rover, server_round):
        return int(rover[-1]) % 2 == server_round % 2

    config = StrategyConfig(fraction_train=0.5, seed=7)
    picks = []
    for _ in range(2):
        grid = LocalGrid(fake_rover_app(), 8)
        strategy = build_strategy("fedavg", NAMES, initial(), config, availability=out)
        messages, _, _ = run_round(strategy, grid, 3)
        rovers = sorted(strategy.directory[m.metadata.dst_node_id] for m in messages)
        assert len(rovers) == 2 and all(int(r[-1]) % 2 == 1 for r in rovers)
        assert strategy.last_record.num_available == 4
        picks.append(rovers)
    assert picks[0] == picks[1]


def test_the_directory_refuses_a_second_claim_to_a_rover_and_follows_a_reconnected_one():
    grid = LocalGrid(fake_rover_app(), 3, node_configs=[{}, {"rover-id": "rover_0"}, {}])
    strategy = build_strategy("fedavg", NAMES, initial())
    messages, _, _ = run_round(strategy, grid, 1)
    assert strategy.directory == {1001: "rover_0", 1003: "rover_2"}
    assert sorted(m.metadata.dst_node_id for m in messages) == [1001, 1003]
    # rover_0's SuperNode restarts: its old node id is gone, a new one says it is rover_0
    moved = grid.contexts.pop(1001)
    grid.contexts[2001] = Context(run_id=1, node_id=2001, node_config=dict(moved.node_config), state=RecordDict(),
                                  run_config={})
    messages, _, metrics = run_round(strategy, grid, 2)
    assert strategy.directory == {2001: "rover_0", 1003: "rover_2"}
    assert metrics["accepted"] == 2 and {e.rover_id for e in strategy.last_record.entries} == {"rover_0", "rover_2"}


@pytest.mark.parametrize("algorithm", ["fedavg", "fedsubavg", "fedlaavg", "mm-psgd", "mc-psgd", "robust", "scaffold"])
def test_state_dict_survives_a_blob_and_resumes_identically(algorithm):
    config = StrategyConfig(fraction_train=0.75, clip_norm=1.0 if algorithm == "robust" else None)
    first = build_strategy(algorithm, NAMES, initial(), config)
    grid = LocalGrid(fake_rover_app({"rover_1": "decoder"}), 4)
    for server_round in (1, 2):
        run_round(first, grid, server_round)
    resumed = build_strategy(algorithm, NAMES, initial(), config)
    resumed.load_state_dict(unpack_state(pack_state(first.state_dict())))
    _, a, _ = run_round(first, grid, 3)
    _, b, _ = run_round(resumed, LocalGrid(fake_rover_app({"rover_1": "decoder"}), 4), 3)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="algorithm|strategy"):
        other = "fedavg" if algorithm != "fedavg" else "robust"
        build_strategy(other, NAMES, initial(), config).load_state_dict(first.state_dict())


def test_configuration_errors_name_the_field():
    with pytest.raises(ValueError, match="unknown algorithm 'fedprox'"):
        build_strategy("fedprox", NAMES, initial())
    with pytest.raises(ValueError, match="fraction_train"):
        StrategyConfig(fraction_train=1.5).validate()
    with pytest.raises(ValueError, match="trim_fraction"):
        StrategyConfig(trim_fraction=0.5).validate()
    with pytest.raises(ValueError, match="3 tensor names"):
        build_strategy("fedavg", NAMES, initial()[:2])
    server = AveragingServer("fedavg", initial(), fedavg)
    server.aggregate(1, updates_of([0], 1))
    with pytest.raises(ValueError, match="round 1 is not after"):
        server.aggregate(1, updates_of([0], 1))


def test_the_learning_rate_schedule_travels_with_each_round():
    grid = LocalGrid(fake_rover_app(), 2)
    config = StrategyConfig(lr_decay=0.5, lr_decay_every=2)
    strategy = build_strategy("fedavg", NAMES, initial(), config, train_config={"lr": 0.01, "local-epochs": 1})
    sent = []
    for server_round in (1, 2, 3, 4, 5):
        messages, _, _ = run_round(strategy, grid, server_round)
        sent.append(messages[0].content[CONFIG_KEY]["lr"])
    np.testing.assert_allclose(sent, [0.01, 0.01, 0.005, 0.005, 0.0025])
    with pytest.raises(ValueError, match="lr_decay"):
        StrategyConfig(lr_decay=1.5).validate()


def test_a_node_registry_refuses_a_node_claiming_a_rover_whose_key_is_another_node(tmp_path):
    import json

    registry = tmp_path / "nodes.json"
    # LocalGrid's nodes are 1001, 1002, 1003 (rover_0, rover_1, rover_2); rover_1's key was registered as 1077
    registry.write_text(json.dumps({"rover_0": {"node_id": 1001}, "rover_1": {"node_id": 1077}}))
    grid = LocalGrid(fake_rover_app(), 3)
    strategy = build_strategy("fedavg", NAMES, initial(), StrategyConfig(node_registry=str(registry)))
    messages, _, _ = run_round(strategy, grid, 1)
    assert [strategy.directory[m.metadata.dst_node_id] for m in messages] == ["rover_0"]
    refused = {e.node_id: e for e in strategy.last_record.entries if e.reason == "identity"}
    assert sorted(refused) == [1002, 1003]
    assert "whose registered key is node 1077" in refused[1002].message
    assert "not registered" in refused[1003].message and refused[1003].rover_id == "node-1003"
    # refused once, recorded once: the next round neither asks them again nor records them again
    run_round(strategy, grid, 2)
    assert not [e for e in strategy.last_record.entries if e.reason == "identity"]
    registry.write_text("{not json")
    with pytest.raises(ValueError, match="node registry"):
        build_strategy("fedavg", NAMES, initial(), StrategyConfig(node_registry=str(registry))).available(grid, 1)
