"""Federated aggregation algorithms against small cases computed by hand."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from forest_perception.collab.algorithms import (
    FedLaAvgServer,
    FedSubAvgServer,
    ScaffoldServer,
    SemiCyclicServer,
    fedavg,
    fedsubavg,
    normalisation_buffers,
    robust_fedavg,
    row_heat,
)
from forest_perception.collab.robust import clip_update_norm, trimmed_mean, trimmed_mean_params
from forest_perception.collab.state import pack_state, unpack_state
from forest_perception.collab.updates import ClientUpdate

BASE = np.array([[1.0, 2.0], [3.0, 4.0]])


def upd(cid, delta, n=1, rnd=1, **kwargs):
    """A delta update; a bare array becomes a one-tensor model."""
    params = delta if isinstance(delta, list) else [np.asarray(delta, dtype=np.float64)]
    assert all(isinstance(p, np.ndarray) for p in params), "pass a list of arrays or one array"
    return ClientUpdate(cid, rnd, n, params, **kwargs)


# ---------------------------------------------------------------------------------------------- FedAvg


def test_fedavg_sample_weighted_by_hand():
    global_params = [np.ones((2, 2))]
    updates = [upd("a", np.array([[1.0, 2], [3, 4]]), n=1), upd("b", np.array([[5.0, 6], [7, 8]]), n=3)]
    # (1*[1,2,3,4] + 3*[5,6,7,8]) / 4 = [4,5,6,7]
    new = fedavg(global_params, updates)
    np.testing.assert_allclose(new[0], [[5, 6], [7, 8]])
    half = fedavg(global_params, updates, server_lr=0.5)
    np.testing.assert_allclose(half[0], [[3, 3.5], [4, 4.5]])
    np.testing.assert_array_equal(global_params[0], np.ones((2, 2)))  # input untouched


def test_fedavg_weights_updates_equal_weighted_mean_of_local_models():
    global_params = [np.ones((2, 2))]
    updates = [
        ClientUpdate("a", 1, 1, [np.array([[2.0, 3], [4, 5]])], kind="weights"),
        ClientUpdate("b", 1, 3, [np.array([[6.0, 7], [8, 9]])], kind="weights"),
    ]
    np.testing.assert_allclose(fedavg(global_params, updates)[0], [[5, 6], [7, 8]])


def test_fedavg_keeps_dtypes_and_rounds_integer_tensors():
    global_params = [np.zeros((2, 2), dtype=np.float32), np.array(10, dtype=np.int64)]
    updates = [
        upd("a", [np.ones((2, 2), dtype=np.float32), np.array(1, dtype=np.int64)], n=1),
        upd("b", [np.ones((2, 2), dtype=np.float32), np.array(2, dtype=np.int64)], n=1),
    ]
    new = fedavg(global_params, updates)
    assert new[0].dtype == np.float32 and new[1].dtype == np.int64
    assert int(new[1]) == 12  # 10 + rint(1.5)
    assert all(isinstance(x, np.ndarray) for x in new)  # a 0-d tensor stays an array for Flower


@pytest.mark.parametrize("seed", range(5))
def test_fedavg_of_identical_updates_is_that_update(seed):
    rng = np.random.default_rng(seed)
    global_params = [rng.normal(size=(2, 2)), rng.normal(size=3)]
    delta = [rng.normal(size=(2, 2)), rng.normal(size=3)]
    updates = [upd(f"c{i}", [d.copy() for d in delta], n=int(rng.integers(1, 50))) for i in range(4)]
    new = fedavg(global_params, updates)
    for g, d, x in zip(global_params, delta, new):
        np.testing.assert_allclose(x, g + d, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_fedavg_invariant_to_client_order(seed):
    rng = np.random.default_rng(seed)
    global_params = [rng.normal(size=(2, 2))]
    updates = [upd(f"c{i}", rng.normal(size=(2, 2)), n=int(rng.integers(1, 50))) for i in range(5)]
    forward = fedavg(global_params, updates)
    shuffled = [updates[i] for i in rng.permutation(len(updates))]
    np.testing.assert_allclose(fedavg(global_params, shuffled)[0], forward[0], rtol=1e-12, atol=1e-12)
    # and it is a convex combination: inside the per-coordinate range of the clients
    stacked = np.stack([global_params[0] + u.params[0] for u in updates])
    assert np.all(forward[0] >= stacked.min(0) - 1e-12) and np.all(forward[0] <= stacked.max(0) + 1e-12)


def test_fedavg_needs_updates():
    with pytest.raises(ValueError, match="no updates"):
        fedavg([np.zeros(2)], [])


# ---------------------------------------------------------------------------------------------- FedSubAvg


def _sub_updates():
    # embedding of 3 rows x 2, plus a dense bias of 2
    a = ClientUpdate(
        "a",
        1,
        1,
        [np.array([[1.0, 1.0], [2.0, 2.0], [99.0, 99.0]]), np.array([1.0, 0.0])],
        rows=[np.array([True, True, False]), None],  # row 2's 99 is outside a's rows: ignored
    )
    b = ClientUpdate(
        "b",
        1,
        3,
        [np.array([[4.0, 4.0], [6.0, 6.0]]), np.array([3.0, 4.0])],  # compact upload of rows 1 and 2
        rows=[np.array([1, 2]), None],
    )
    return [a, b]


def test_row_heat_from_involvement_masks():
    heat = row_heat(_sub_updates(), [(3, 2), (2,)])
    np.testing.assert_array_equal(heat[0], [1, 4, 3])  # row 0: a (1); row 1: a+b (4); row 2: b (3)
    np.testing.assert_array_equal(heat[1], [4, 4])  # dense bias: everyone


def test_fedsubavg_heat_correction_by_hand():
    global_params = [np.zeros((3, 2)), np.zeros(2)]
    new = fedsubavg(global_params, _sub_updates())
    # row 0: coef 4/1 * (1*1)/4 = 1          (plain FedAvg would give 0.25)
    # row 1: coef 4/4 * (1*2 + 3*4)/4 = 3.5
    # row 2: coef 4/3 * (3*6)/4 = 6           (plain FedAvg would give 4.5)
    np.testing.assert_allclose(new[0], [[1, 1], [3.5, 3.5], [6, 6]])
    np.testing.assert_allclose(new[1], [(1 + 9) / 4, 12 / 4])  # dense tensor: plain FedAvg


def test_fedsubavg_with_population_heat_by_hand():
    global_params = [np.full((4, 2), 10.0), np.zeros(2)]
    updates = _sub_updates()
    for u in updates:  # a fourth row nobody involves, anywhere
        u.params[0] = np.concatenate([u.params[0], np.zeros((1, 2))]) if u.client_id == "a" else u.params[0]
    updates[0].rows[0] = np.array([True, True, False, False])
    heat = [np.array([2.0, 4.0, 6.0, 0.0]), np.array([8.0, 8.0])]
    new = fedsubavg(global_params, updates, heat=heat, total_examples=8)
    # coef = 8/heat; step = coef * sum n d / 4
    # row 0: 4 * 1/4 = 1; row 1: 2 * 14/4 = 7; row 2: 8/6 * 18/4 = 6; row 3: heat 0 -> unchanged
    np.testing.assert_allclose(new[0], [[11, 11], [17, 17], [16, 16], [10, 10]])
    np.testing.assert_allclose(new[1], [1 * 8 / 8 * 10 / 4, 12 / 4])


def test_fedsubavg_refuses_inconsistent_heat():
    global_params = [np.zeros((3, 2)), np.zeros(2)]
    with pytest.raises(ValueError, match="total_examples"):
        fedsubavg(global_params, _sub_updates(), heat=[np.ones(3), np.ones(2)])
    with pytest.raises(ValueError, match=r"heat\[0\] row 1"):
        fedsubavg(global_params, _sub_updates(), heat=[np.array([9.0, 1.0, 9.0]), np.full(2, 9.0)], total_examples=9)
    with pytest.raises(ValueError, match=r"heat\[0\] has shape"):
        fedsubavg(global_params, _sub_updates(), heat=[np.ones(2), np.ones(2)], total_examples=9)


def test_fedsubavg_without_rows_is_fedavg():
    rng = np.random.default_rng(3)
    global_params = [rng.normal(size=(3, 2))]
    updates = [upd(f"c{i}", rng.normal(size=(3, 2)), n=i + 1) for i in range(3)]
    np.testing.assert_allclose(fedsubavg(global_params, updates)[0], fedavg(global_params, updates)[0], rtol=1e-12)


def test_fedsubavg_server_counts_heat_over_the_population_as_the_paper_does():
    # rows 0-1 of the tensor: rover a (n=1) involves row 0 only, rover b (n=3) both rows
    a_rows, b_rows = [np.array([0])], [None]
    server = FedSubAvgServer([np.zeros((2, 2))])
    server.aggregate(1, [upd("a", np.ones((1, 2)), n=1, rows=a_rows), upd("b", np.full((2, 2), 2.0), n=3, rows=b_rows)])
    heat, total = server.population_heat()
    np.testing.assert_array_equal(heat[0], [4.0, 3.0])
    assert total == 4.0
    # round 1 holds the whole population: row 0 the mean of a and b, row 1 b's delta
    np.testing.assert_allclose(server.params[0], [[1.75, 1.75], [2.0, 2.0]])
    # round 2: only a trains: row 0 moves by coef = total / heat = 4 / 4 times a's delta, row 1 stays
    server.aggregate(2, [upd("a", np.ones((1, 2)), n=1, rnd=2, rows=a_rows)])
    np.testing.assert_allclose(server.params[0], [[1.75 + 4 / 4 * 1.0, 2.75], [2.0, 2.0]])
    # round 3: only b trains. Row 1 (heat 3 of 4) moves by 4/3 of b's delta, row 0 by 4/4; the per-round variant
    # would give row 1 exactly b's delta
    server.aggregate(3, [upd("b", np.full((2, 2), 3.0), n=3, rnd=3, rows=b_rows)])
    np.testing.assert_allclose(server.params[0], [[2.75 + 3.0, 5.75], [2.0 + 4 / 3 * 3.0, 6.0]])
    per_round = FedSubAvgServer([np.zeros((2, 2))], round_heat=True)
    for r, us in enumerate([[upd("a", np.ones((1, 2)), n=1, rows=a_rows), upd("b", np.full((2, 2), 2.0), n=3,
                                                                              rows=b_rows)],
                            [upd("a", np.ones((1, 2)), n=1, rows=a_rows)], [upd("b", np.full((2, 2), 3.0), n=3,
                                                                                 rows=b_rows)]], start=1):
        per_round.aggregate(r, [dataclasses.replace(u, round=r) for u in us])
    np.testing.assert_allclose(per_round.params[0][1], [5.0, 5.0])


def test_fedsubavg_server_resumes_with_the_population_it_had_seen():
    def rounds(server, first, last):
        for r in range(first, last + 1):
            cid = "ab"[r % 2]
            rows = [np.array([0])] if cid == "a" else [None]
            delta = np.ones((1, 2)) if cid == "a" else np.full((2, 2), float(r))
            server.aggregate(r, [upd(cid, delta, n=1 + 2 * (cid == "b"), rnd=r, rows=rows)])

    straight = FedSubAvgServer([np.zeros((2, 2))])
    rounds(straight, 1, 5)
    first = FedSubAvgServer([np.zeros((2, 2))])
    rounds(first, 1, 2)
    resumed = FedSubAvgServer([np.zeros((2, 2))])
    resumed.load_state_dict(unpack_state(pack_state(first.state_dict())))
    rounds(resumed, 3, 5)
    np.testing.assert_array_equal(resumed.params[0], straight.params[0])
    with pytest.raises(ValueError, match="round_heat"):
        FedSubAvgServer([np.zeros((2, 2))], round_heat=True).load_state_dict(first.state_dict())


# ---------------------------------------------------------------------------------------------- FedLaAvg


def test_fedlaavg_selection_order_and_all_n_averaging_by_hand():
    server = FedLaAvgServer([np.zeros((2, 2))])
    # round 1: nobody seen yet -> ties broken by id
    assert server.select(["c", "b", "a"], 2) == ["a", "b"]
    server.aggregate(1, [upd("a", BASE * 1, n=1, rnd=1), upd("b", BASE * 3, n=3, rnd=1)])
    np.testing.assert_allclose(server.params[0], BASE * 2)  # (1 + 3) / N=2
    # round 2: c never seen comes first, then a (tie with b at round 1, id order)
    assert server.select(["a", "b", "c"], 2) == ["c", "a"]
    server.aggregate(2, [upd("c", BASE * 4, n=2, rnd=2), upd("a", BASE * -1, n=1, rnd=2)])
    # latest: a=-1, b=3 (from round 1, reused), c=4 -> mean 2 -> 2 + 2
    np.testing.assert_allclose(server.params[0], BASE * 4)
    assert server.num_clients == 3
    # round 3: c is offline; b was seen in round 1, a in round 2
    assert server.select(["a", "b"], 1) == ["b"]
    assert server.select(["a", "b", "a"], 5) == ["b", "a"]
    server.aggregate(3, [upd("b", BASE * 0, n=3, rnd=3)])
    # latest: a=-1, b=0, c=4 -> mean 1 -> 4 + 1
    np.testing.assert_allclose(server.params[0], BASE * 5)
    assert [server.last_seen(c) for c in ("a", "b", "c", "z")] == [2, 3, 2, None]


def test_fedlaavg_sample_weighting_by_hand():
    server = FedLaAvgServer([np.zeros((2, 2))], weighting="samples", server_lr=0.5)
    server.aggregate(1, [upd("a", BASE * 1, n=1), upd("b", BASE * 3, n=3)])
    np.testing.assert_allclose(server.params[0], BASE * 0.5 * (1 * 1 + 3 * 3) / 4)


def test_fedlaavg_refusals_leave_model_and_roster_alone():
    server = FedLaAvgServer([np.zeros((2, 2))], max_staleness=1)
    server.aggregate(1, [upd("a", BASE, n=1, rnd=1)])
    before = server.params
    bad = upd("d", np.full((2, 2), np.nan), n=1, rnd=2)
    replay = upd("a", BASE * 7, n=1, rnd=1)  # within staleness, but not newer than a's stored update
    result = server.aggregate(2, [bad, replay])
    assert result.accepted == []
    assert sorted(r.reason for r in result.rejected) == ["non_finite", "stale"]
    np.testing.assert_array_equal(server.params[0], before[0])
    assert server.num_clients == 1 and server.last_seen("d") is None
    # the round goes on: a good update next to a bad one still counts
    result = server.aggregate(3, [upd("b", BASE * 3, n=1, rnd=3), upd("e", np.ones((3, 3)), rnd=3)])
    assert result.accepted == ["b"] and [r.reason for r in result.rejected] == ["shape"]
    np.testing.assert_allclose(server.params[0], BASE * (1 + (1 + 3) / 2))


def test_fedlaavg_divides_by_the_population_not_by_those_heard_from():
    # the paper's N: a rover never heard from counts as a zero gradient
    server = FedLaAvgServer([np.zeros((2, 2))], population=4)
    server.aggregate(1, [upd("a", BASE * 1), upd("b", BASE * 3)])
    np.testing.assert_allclose(server.params[0], BASE * (1 + 3) / 4)
    assert server.population_size == 4
    # the strategy may tell a larger population later; never fewer than those heard from
    server.aggregate(2, [upd("c", BASE * 2, rnd=2)], population=2)
    assert server.population_size == 3
    np.testing.assert_allclose(server.params[0], BASE * (1 + (1 + 3 + 2) / 3))


def test_fedlaavg_stores_gradients_and_steps_with_this_rounds_learning_rate():
    server = FedLaAvgServer([np.zeros(2)], population=2)
    # local SGD at lr 0.1: delta = -0.1 * gradient sum
    server.aggregate(1, [upd("a", np.array([-0.1, -0.2]), metrics={"lr": 0.1})])
    np.testing.assert_allclose(server.latest_gradient("a")[0], [-1.0, -2.0])
    np.testing.assert_allclose(server.params[0], [-0.05, -0.1])  # 0.1 * (g_a + 0) / 2
    # the schedule halved the learning rate: the stored gradient of a is re-used at the new rate
    server.aggregate(2, [upd("b", np.array([0.05, 0.0]), rnd=2, metrics={"lr": 0.05})])
    np.testing.assert_allclose(server.latest_gradient("b")[0], [1.0, 0.0])
    np.testing.assert_allclose(server.params[0], [-0.05 + 0.05 * 0.0 / 2, -0.1 + 0.05 * -2.0 / 2])
    # a rover reporting an unusable learning rate is refused, not divided by
    result = server.aggregate(3, [upd("c", np.ones(2), rnd=3, metrics={"lr": 0.0})])
    assert [r.reason for r in result.rejected] == ["bad_metric"] and server.latest_gradient("c") is None


def test_fedlaavg_warm_up_collects_gradients_before_moving():
    server = FedLaAvgServer([np.zeros(2)], warmup_rounds=2, population=3)
    server.aggregate(1, [upd("a", np.array([3.0, 0.0]))])
    server.aggregate(2, [upd("b", np.array([0.0, 3.0]), rnd=2)])
    np.testing.assert_array_equal(server.params[0], [0.0, 0.0])
    server.aggregate(3, [upd("c", np.array([3.0, 3.0]), rnd=3)])
    np.testing.assert_allclose(server.params[0], [2.0, 2.0])  # (a + b + c) / 3


def test_fedlaavg_averages_batchnorm_statistics_per_round_instead_of_re_adding_them():
    names = ["conv.weight", "bn.weight", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]
    mask = normalisation_buffers(names)
    assert mask == [False, False, True, True, True]
    init = [np.zeros(2), np.ones(1), np.zeros(1), np.ones(1), np.array(0, dtype=np.int64)]

    def local(cid, rnd, var, global_params):
        # a rover's local model: some weight change, and its own batch variance
        p = [np.full(2, 0.1), np.zeros(1), np.zeros(1), np.array([var - global_params[3][0]]), np.array(5)]
        return upd(cid, p, rnd=rnd)

    fixed = FedLaAvgServer(init, buffers=mask, population=4)
    naive = FedLaAvgServer(init, population=4)  # every tensor kept as a "latest update", as before the fix
    variances = [(1, "a", 0.3), (2, "b", 0.3), (3, "c", 0.3), (4, "d", 0.3), (5, "a", 0.3)]
    for rnd, cid, var in variances:
        fixed.aggregate(rnd, [local(cid, rnd, var, fixed.params)])
        naive.aggregate(rnd, [local(cid, rnd, var, naive.params)])
        # the global running variance is this round's rover's (the round's sample-weighted mean), always > 0
        np.testing.assert_allclose(fixed.params[3], [var])
        assert fixed.params[4] == 5 * rnd
    assert naive.params[3][0] < 0  # the bug the mask fixes: old variance deltas re-added each round
    # the trainable weight still moves by the mean of all latest gradients: 0.1 * (1 + 2 + 3 + 4 + 4) / 4
    np.testing.assert_allclose(fixed.params[0], np.full(2, 0.1 * 14 / 4))


def test_fedlaavg_rounds_must_increase():
    server = FedLaAvgServer([np.zeros(2)])
    server.aggregate(2, [upd("a", np.ones(2), rnd=2)])
    with pytest.raises(ValueError, match="not after"):
        server.aggregate(2, [])
    with pytest.raises(ValueError, match="k must be positive"):
        server.select(["a"], 0)


def _fedlaavg_rounds(server, rounds, rng):
    """Scripted rounds: random availability, the server's selection, random deltas; returns the picks."""
    ids = ["r0", "r1", "r2", "r3", "r4"]
    picks = []
    for r in rounds:
        available = [c for c in ids if rng.random() < 0.7] or ids[:1]
        chosen = server.select(available, 2)
        picks.append(chosen)
        deltas = [[rng.normal(size=(2, 2)).astype(np.float32), rng.normal(size=3).astype(np.float32)] for _ in chosen]
        server.aggregate(r, [upd(c, d, n=int(rng.integers(1, 9)), rnd=r) for c, d in zip(chosen, deltas)])
    return picks


def test_fedlaavg_resume_from_state_equals_uninterrupted_run():
    init = [np.zeros((2, 2), dtype=np.float32), np.zeros(3, dtype=np.float32)]
    straight = FedLaAvgServer(init, weighting="samples")
    picks_straight = _fedlaavg_rounds(straight, range(1, 8), np.random.default_rng(7))

    rng = np.random.default_rng(7)
    first = FedLaAvgServer(init, weighting="samples")
    picks = _fedlaavg_rounds(first, range(1, 4), rng)
    blob = pack_state(first.state_dict())
    del first
    resumed = FedLaAvgServer(init, weighting="samples")
    resumed.load_state_dict(unpack_state(blob))
    picks += _fedlaavg_rounds(resumed, range(4, 8), rng)
    assert picks == picks_straight
    assert resumed.num_clients == straight.num_clients >= 3
    for a, b in zip(resumed.params, straight.params):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, b)


def test_fedlaavg_state_refuses_other_config():
    server = FedLaAvgServer([np.zeros(2)])
    state = server.state_dict()
    with pytest.raises(ValueError, match="weighting"):
        FedLaAvgServer([np.zeros(2)], weighting="samples").load_state_dict(state)
    with pytest.raises(ValueError, match="shape"):
        FedLaAvgServer([np.zeros(3)]).load_state_dict(state)
    with pytest.raises(ValueError, match="semicyclic"):
        FedLaAvgServer([np.zeros(2)]).load_state_dict(SemiCyclicServer([np.zeros(2)], 2).state_dict())


# ---------------------------------------------------------------------------------------------- MM-/MC-PSGD


def test_block_schedule():
    server = SemiCyclicServer([np.zeros(1)], num_blocks=3, rounds_per_block=2)
    assert [server.block_of(r) for r in range(1, 9)] == [0, 0, 1, 1, 2, 2, 0, 0]
    with pytest.raises(ValueError, match="count from 1"):
        server.block_of(0)


def test_mm_psgd_per_block_running_average_over_two_cycles_by_hand():
    server = SemiCyclicServer([np.zeros((2, 2))], num_blocks=2, mode="mm")
    assert server.predictor(0) is None
    # cycle 1
    res = server.aggregate(1, [upd("a", BASE * 1, n=1, rnd=1), upd("b", BASE * 3, n=1, rnd=1)])  # x1 = 2
    assert res.block == 0 and res.chosen == "mixed"
    server.aggregate(2, [upd("c", BASE * 4, n=5, rnd=2)])  # x2 = 6, block 1
    np.testing.assert_allclose(server.predictor(0)[0], BASE * 2)
    np.testing.assert_allclose(server.predictor(1)[0], BASE * 6)
    # cycle 2
    server.aggregate(3, [upd("a", BASE * -2, n=2, rnd=3)])  # x3 = 4, block 0
    server.aggregate(4, [upd("c", BASE * 2, n=1, rnd=4), upd("d", BASE * 6, n=3, rnd=4)])  # x4 = 4 + 5 = 9
    np.testing.assert_allclose(server.params[0], BASE * 9)
    np.testing.assert_allclose(server.predictor(0)[0], BASE * (2 + 4) / 2)
    np.testing.assert_allclose(server.predictor(1)[0], BASE * (6 + 9) / 2)
    assert server.predictor_rounds(0) == 2 and server.predictor_rounds(1) == 2
    # a third visit of block 0 averages three models
    server.aggregate(5, [upd("a", BASE * 3, rnd=5)])  # x5 = 12
    np.testing.assert_allclose(server.predictor(0)[0], BASE * (2 + 4 + 12) / 3)


def _target_loss(targets):
    def loss_fn(block, params):
        return float(np.mean((params[0] - targets[block]) ** 2))

    return loss_fn


def test_mc_psgd_keeps_the_lower_loss_chain_by_hand():
    server = SemiCyclicServer([np.zeros((2, 2))], num_blocks=2, mode="mc")
    loss_fn = _target_loss({0: np.full((2, 2), 10.0), 1: np.full((2, 2), -10.0)})
    ones = np.ones((2, 2))
    # round 1, block 0: x = 2 (loss 64), y0 = 5 (loss 25) -> separate
    res = server.aggregate(1, [upd("a", ones * 2, rnd=1)], [upd("a", ones * 5, rnd=1)], loss_fn=loss_fn)
    assert res.chosen == "separate" and res.losses == {"mixed": 64.0, "separate": 25.0}
    assert res.accepted == ["a", "a@separate"]
    # round 2, block 1: x = 3 (loss 169), y1 = -4 (loss 36) -> separate; y0 untouched
    res = server.aggregate(2, [upd("b", ones * 1, rnd=2)], [upd("b", ones * -4, rnd=2)], loss_fn=loss_fn)
    assert res.chosen == "separate"
    np.testing.assert_allclose(server.chain_params(0)[0], ones * 5)
    np.testing.assert_allclose(server.chain_params(1)[0], ones * -4)
    # round 3, block 0: x = 12 (loss 4), y0 = 6 (loss 16) -> mixed
    res = server.aggregate(3, [upd("a", ones * 9, rnd=3)], [upd("a", ones * 1, rnd=3)], loss_fn=loss_fn)
    assert res.chosen == "mixed" and res.losses == {"mixed": 4.0, "separate": 16.0}
    np.testing.assert_allclose(server.params[0], ones * 12)
    np.testing.assert_allclose(server.predictor(0)[0], ones * (5 + 12) / 2)
    np.testing.assert_allclose(server.predictor(1)[0], ones * -4)


def test_mc_psgd_non_finite_loss_loses():
    server = SemiCyclicServer([np.zeros(2)], num_blocks=1, mode="mc")

    def loss_fn(block, params):
        return math.nan if params[0][0] > 1 else 1.0

    res = server.aggregate(1, [upd("a", np.full(2, 5.0))], [upd("a", np.full(2, 1.0))], loss_fn=loss_fn)
    assert res.chosen == "separate"
    np.testing.assert_allclose(server.predictor(0)[0], [1, 1])
    both_bad = server.aggregate(2, [upd("a", np.ones(2), rnd=2)], [upd("a", np.ones(2), rnd=2)], lambda b, p: math.inf)
    res = both_bad
    assert res.chosen is None and server.predictor_rounds(0) == 1  # nothing trustworthy to average in


def test_mc_psgd_failing_loss_fn_leaves_state_and_round_retryable():
    server = SemiCyclicServer([np.zeros(2)], num_blocks=1, mode="mc")

    def broken(block, params):
        raise RuntimeError("evaluator down")

    with pytest.raises(RuntimeError, match="evaluator down"):
        server.aggregate(1, [upd("a", np.ones(2))], [upd("a", np.ones(2))], loss_fn=broken)
    np.testing.assert_array_equal(server.params[0], [0, 0])
    np.testing.assert_array_equal(server.chain_params(0)[0], [0, 0])
    res = server.aggregate(1, [upd("a", np.ones(2))], [upd("a", np.full(2, 2.0))], loss_fn=lambda b, p: -p[0][0])
    assert res.chosen == "separate"
    np.testing.assert_array_equal(server.predictor(0)[0], [2, 2])


def test_semicyclic_argument_checks_and_refusals():
    with pytest.raises(ValueError, match="mode"):
        SemiCyclicServer([np.zeros(2)], 2, mode="xx")
    mm = SemiCyclicServer([np.zeros(2)], 2)
    with pytest.raises(ValueError, match="separate_updates"):
        mm.aggregate(1, [], [upd("a", np.ones(2))])
    with pytest.raises(ValueError, match="chain"):
        mm.chain_params(0)
    mc = SemiCyclicServer([np.zeros(2)], 2, mode="mc")
    # without loss_fn an MC round waits for choose(): nothing is committed or saved meanwhile
    pending = mc.aggregate(1, [upd("a", np.ones(2))], [upd("a", np.full(2, 2.0))])
    assert pending.chosen is None and mc.predictor(0) is None
    np.testing.assert_array_equal(mc.params[0], [0.0, 0.0])
    block, x, y = mc.pending_chains()
    assert block == 0
    np.testing.assert_array_equal(x[0], [1.0, 1.0])
    np.testing.assert_array_equal(y[0], [2.0, 2.0])
    with pytest.raises(ValueError, match="waits for choose"):
        mc.state_dict()
    with pytest.raises(ValueError, match="waits for choose"):
        mc.aggregate(2, [upd("a", np.ones(2), rnd=2)])
    done = mc.choose(0.5, 0.25)  # the averaged separate chain scores better
    assert done.chosen == "separate" and done.losses == {"mixed": 0.5, "separate": 0.25}
    np.testing.assert_array_equal(mc.predictor(0)[0], [2.0, 2.0])
    np.testing.assert_array_equal(mc.params[0], [1.0, 1.0])
    assert mc.pending_chains() is None
    with pytest.raises(ValueError, match="no round is waiting"):
        mc.choose(0.1, 0.2)
    # all refused: nothing moves, no predictor
    res = mm.aggregate(1, [upd("a", np.array([np.inf, 0.0]))])
    assert [r.reason for r in res.rejected] == ["non_finite"] and res.chosen is None
    np.testing.assert_array_equal(mm.params[0], [0, 0])
    assert mm.predictor(0) is None


def _semicyclic_round(server, r, rng, loss_fn):
    mixed = [upd(f"r{i}", [rng.normal(size=(2, 2))], n=int(rng.integers(1, 9)), rnd=r) for i in range(2)]
    separate = [upd(f"r{i}", [rng.normal(size=(2, 2))], n=int(rng.integers(1, 9)), rnd=r) for i in range(2)]
    return server.aggregate(r, mixed, separate, loss_fn=loss_fn)


def test_semicyclic_resume_from_state_equals_uninterrupted_run():
    init = [np.zeros((2, 2))]
    loss_fn = _target_loss({0: np.full((2, 2), 1.0), 1: np.full((2, 2), -1.0)})
    rng = np.random.default_rng(11)
    straight = SemiCyclicServer(init, num_blocks=2, mode="mc")
    chosen_straight = [_semicyclic_round(straight, r, rng, loss_fn).chosen for r in range(1, 9)]

    rng = np.random.default_rng(11)
    first = SemiCyclicServer(init, num_blocks=2, mode="mc")
    chosen = [_semicyclic_round(first, r, rng, loss_fn).chosen for r in range(1, 4)]
    blob = pack_state(first.state_dict())
    resumed = SemiCyclicServer(init, num_blocks=2, mode="mc")
    resumed.load_state_dict(unpack_state(blob))
    chosen += [_semicyclic_round(resumed, r, rng, loss_fn).chosen for r in range(4, 9)]
    assert chosen == chosen_straight and {"mixed", "separate"} <= set(chosen)
    np.testing.assert_array_equal(resumed.params[0], straight.params[0])
    for m in range(2):
        np.testing.assert_array_equal(resumed.predictor(m)[0], straight.predictor(m)[0])
        np.testing.assert_array_equal(resumed.chain_params(m)[0], straight.chain_params(m)[0])
    with pytest.raises(ValueError, match="not after"):
        resumed.aggregate(8, [])


# ---------------------------------------------------------------------------------------------- robust


def test_clip_update_norm_by_hand():
    delta = [np.array([[3.0, 0.0], [0.0, 0.0]]), np.array([4.0], dtype=np.float32)]  # norm 5
    clipped, scale = clip_update_norm(delta, 1.0)
    assert scale == pytest.approx(0.2)
    np.testing.assert_allclose(clipped[0], [[0.6, 0], [0, 0]])
    np.testing.assert_allclose(clipped[1], [0.8], rtol=1e-6)
    assert clipped[1].dtype == np.float32
    same, scale = clip_update_norm(delta, 5.0)
    assert scale == 1.0
    np.testing.assert_array_equal(same[0], delta[0])
    with pytest.raises(ValueError, match="max_norm"):
        clip_update_norm(delta, 0.0)
    with pytest.raises(ValueError, match="NaN"):
        clip_update_norm([np.array([np.nan])], 1.0)


def test_trimmed_mean_by_hand():
    values = [
        np.array([[1.0, 10.0], [0.0, -5.0]]),
        np.array([[2.0, 20.0], [0.0, 5.0]]),
        np.array([[3.0, -100.0], [0.0, 0.0]]),
        np.array([[4.0, 30.0], [0.0, 1.0]]),
        np.array([[100.0, 40.0], [9.0, 2.0]]),
    ]
    # k = floor(0.2 * 5) = 1 per end, per coordinate
    np.testing.assert_allclose(trimmed_mean(values, 0.2), [[3, 20], [0, 1]])
    np.testing.assert_allclose(trimmed_mean(values, 0.1), np.mean(values, axis=0))  # k = 0
    np.testing.assert_allclose(trimmed_mean_params([[v] for v in values], 0.2)[0], [[3, 20], [0, 1]])
    with pytest.raises(ValueError, match="trim_fraction"):
        trimmed_mean(values, 0.5)
    with pytest.raises(ValueError, match="different shapes"):
        trimmed_mean([np.zeros(2), np.zeros(3)], 0.0)
    with pytest.raises(ValueError, match="no values"):
        trimmed_mean([], 0.1)


def test_robust_fedavg_resists_one_attacker():
    global_params = [np.zeros((2, 2))]
    honest = [upd("a", BASE * 1.0, n=1), upd("b", BASE * 2.0, n=1), upd("c", BASE * 3.0, n=1)]
    attacker = upd("x", BASE * 1e6, n=1000)
    np.testing.assert_allclose(robust_fedavg(global_params, [*honest, attacker], trim_fraction=0.25)[0], BASE * 2.5)
    clipped = robust_fedavg(global_params, [*honest, attacker], clip_norm=1.0)
    assert np.linalg.norm(clipped[0]) <= 1.0 + 1e-9  # a convex combination of norm-1 deltas
    assert np.linalg.norm(fedavg(global_params, [*honest, attacker])[0]) > 1e5


# ---------------------------------------------------------------------------------------------- state blobs


def test_pack_state_round_trip_keeps_dtypes_and_structure():
    state = {
        "params": [np.arange(4, dtype=np.float32).reshape(2, 2), np.array(3, dtype=np.int64)],
        "nested": {"x": [None, 1, 2.5, "s", True], "y": {"z": np.zeros((0, 3))}},
        "scalar": np.float64(0.5),
    }
    back = unpack_state(pack_state(state))
    assert back["params"][0].dtype == np.float32 and back["params"][0].shape == (2, 2)
    assert back["params"][1].dtype == np.int64 and back["params"][1].shape == ()
    np.testing.assert_array_equal(back["params"][0], state["params"][0])
    assert back["nested"]["x"] == [None, 1, 2.5, "s", True]
    assert back["nested"]["y"]["z"].shape == (0, 3)
    assert back["scalar"] == 0.5


def test_pack_state_refuses_what_it_cannot_store():
    with pytest.raises(TypeError, match="object array"):
        pack_state({"a": np.array([object()], dtype=object)})
    with pytest.raises(TypeError, match="non-string key"):
        pack_state({"a": {1: 2}})
    with pytest.raises(TypeError, match="set"):
        pack_state({"a": {1, 2}})
    with pytest.raises(ValueError, match="not a packed state"):
        unpack_state(b"garbage")


def test_fedlaavg_trains_a_batchnorm_network_without_breaking_its_statistics():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)

    def net():
        return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                   torch.nn.Conv2d(4, 1, 1))

    model = net()
    names = list(model.state_dict())
    init = [t.detach().numpy().copy() for t in model.state_dict().values()]
    rng = np.random.default_rng(0)
    # four rovers whose images differ in brightness and contrast; target: a fixed function of the image
    data = {f"r{i}": torch.tensor(rng.normal(0.5 * i, 1.0 + i, size=(16, 1, 6, 6)), dtype=torch.float32)
            for i in range(4)}

    def target(x):
        return 0.5 * x + 1.0

    def local_update(cid, rnd, params):
        m = net()
        m.load_state_dict({k: torch.tensor(v) for k, v in zip(names, params)})
        m.train()
        opt = torch.optim.SGD(m.parameters(), lr=0.02)
        for _ in range(3):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(m(data[cid]), target(data[cid]))
            loss.backward()
            opt.step()
        local = [t.detach().numpy() for t in m.state_dict().values()]
        return ClientUpdate(cid, rnd, 16, [np.asarray(a - b) for a, b in zip(local, params)], metrics={"lr": 0.02})

    def pooled_loss(params):
        m = net()
        m.load_state_dict({k: torch.tensor(v) for k, v in zip(names, params)})
        m.eval()
        with torch.no_grad():
            return float(sum(torch.nn.functional.mse_loss(m(x), target(x)) for x in data.values()))

    fixed = FedLaAvgServer(init, buffers=normalisation_buffers(names), population=4)
    var, mean = names.index("1.running_var"), names.index("1.running_mean")
    for rnd in range(1, 13):
        chosen = fixed.select(list(data), 2)
        updates = [local_update(c, rnd, fixed.params) for c in chosen]
        before = fixed.params
        fixed.aggregate(rnd, updates)
        # the statistics are this round's mean of the rovers' local statistics, never older rounds' deltas
        for t in (var, mean):
            want = before[t] + np.mean([u.params[t] for u in updates], axis=0)
            np.testing.assert_allclose(fixed.params[t], want, rtol=1e-5)
        assert np.all(fixed.params[var] > 0), f"round {rnd}: running variance {fixed.params[var]}"
    assert math.isfinite(pooled_loss(fixed.params)) and pooled_loss(fixed.params) < pooled_loss(init)


# ---------------------------------------------------------------------------------------------- SCAFFOLD


def test_scaffold_corrections_are_the_swarm_mean_control_minus_the_rovers_own():
    names = ["a", "b"]
    start = [np.zeros((2, 2), np.float32), np.zeros(3, np.float32)]
    server = ScaffoldServer(start, names)
    assert server.correction("r0") is None and server.swarm_control() == {}
    updates = [ClientUpdate("r0", 1, 10, [np.ones((2, 2), np.float32), np.zeros(3, np.float32)]),
               ClientUpdate("r1", 1, 30, [np.full((2, 2), 2.0, np.float32), np.ones(3, np.float32)])]
    controls = {"r0": {"a": np.full((2, 2), 1.0, np.float32), "b": np.array([1.0, 2.0, 3.0], np.float32)},
                "r1": {"a": np.full((2, 2), 3.0, np.float32)}}  # r1 trained only "a"
    result = server.aggregate(1, updates, controls)
    assert result.accepted == ["r0", "r1"]
    np.testing.assert_allclose(result.params[0], np.full((2, 2), (10 * 1 + 30 * 2) / 40))  # sample-weighted FedAvg
    swarm = server.swarm_control()
    np.testing.assert_allclose(swarm["a"], 2.0)
    np.testing.assert_allclose(swarm["b"], [1.0, 2.0, 3.0])  # only r0 has a control of "b"
    r1 = server.correction("r1")
    assert sorted(r1) == ["a"] and r1["a"].dtype == np.float32
    np.testing.assert_allclose(r1["a"], -1.0)
    np.testing.assert_allclose(server.correction("r0")["a"], 1.0)
    np.testing.assert_allclose(server.correction("r0")["b"], 0.0)
    assert server.correction("r2") is None  # not heard from: trains uncorrected


@pytest.mark.parametrize("control, words", [
    (None, "no control"),
    ({"c": np.zeros(3, np.float32)}, "'c'"),
    ({"b": np.zeros(4, np.float32)}, "shape"),
    ({"b": np.array([0.0, np.inf, 0.0], np.float32)}, "not finite"),
])
def test_scaffold_refuses_an_update_whose_control_is_unusable_and_keeps_the_model(control, words):
    start = [np.zeros((2, 2), np.float32), np.zeros(3, np.float32)]
    server = ScaffoldServer(start, ["a", "b"])
    result = server.aggregate(1, [ClientUpdate("r0", 1, 10, [np.ones((2, 2), np.float32), np.ones(3, np.float32)])],
                              {"r0": control})
    assert result.accepted == [] and [r.reason for r in result.rejected] == ["bad_control"]
    assert words in result.rejected[0].message and "r0" in result.rejected[0].message
    np.testing.assert_array_equal(result.params[0], start[0])
    assert server.num_controls == 0


def test_scaffold_state_survives_a_blob_and_refuses_another_config():
    start = [np.zeros(2, np.float32)]
    server = ScaffoldServer(start, ["w"], server_lr=1.0)
    server.aggregate(1, [ClientUpdate("r0", 1, 5, [np.ones(2, np.float32)])], {"r0": {"w": np.ones(2, np.float32)}})
    resumed = ScaffoldServer(start, ["w"], server_lr=1.0)
    resumed.load_state_dict(unpack_state(pack_state(server.state_dict())))
    np.testing.assert_array_equal(resumed.params[0], server.params[0])
    np.testing.assert_array_equal(resumed.control("r0")["w"], server.control("r0")["w"])
    with pytest.raises(ValueError, match="not after"):
        resumed.aggregate(1, [], {})
    with pytest.raises(ValueError, match="server_lr"):
        ScaffoldServer(start, ["w"], server_lr=0.5).load_state_dict(server.state_dict())
