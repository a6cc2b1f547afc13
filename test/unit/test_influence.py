"""Fed-Influence against its ground truth (leave-one-rover-out retraining) on a small non-convex problem."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

from forest_perception.collab.influence import InfluenceEstimator, directional_change
from forest_perception.collab.updates import ClientUpdate

SHAPES = [(8, 3), (8,), (8,), (1,)]
FAULTY = "r5"


def forward(params, x):
    w1, b1, w2, b2 = params
    return np.tanh(x @ w1.T + b1) @ w2 + b2[0]


def loss(params, x, y):
    return float(np.mean((forward(params, x) - y) ** 2))


def gradient(params, x, y):
    w1, b1, w2, b2 = params
    hidden = np.tanh(x @ w1.T + b1)
    err = 2.0 * (hidden @ w2 + b2[0] - y) / len(y)
    back = np.outer(err, w2) * (1 - hidden ** 2)
    return [back.T @ x, back.sum(0), hidden.T @ err, np.array([err.sum()])]


def local_delta(data, params, steps=5, lr=0.1):
    """Five full-batch gradient steps on the rover's data (deterministic): the rover's delta."""
    x, y = data
    current = [np.array(p, dtype=np.float64) for p in params]
    for _ in range(steps):
        current = [p - lr * g for p, g in zip(current, gradient(current, x, y))]
    return [c - p for c, p in zip(current, params)]


def make_problem(seed=0):
    rng = np.random.default_rng(seed)
    truth = rng.normal(size=3)

    def draw(n, shift):
        x = rng.normal(shift, 1.0, size=(n, 3))
        return x, np.sin(x @ truth) + 0.05 * rng.normal(size=n)

    rovers = {f"r{i}": draw(int(rng.integers(20, 60)), 0.1 * i - 0.25) for i in range(6)}
    x, y = rovers[FAULTY]
    rovers[FAULTY] = (x, y + np.log(1.3))  # y as log-depth: a depth camera whose scale is off by 30 %
    held = draw(200, 0.0)
    init = [0.5 * rng.normal(size=s) for s in SHAPES]
    schedule = [sorted(rng.choice(sorted(rovers), size=3, replace=False)) for _ in range(25)]
    return rovers, held, init, schedule


def federate(rovers, init, schedule, leave_out=None, estimator=None):
    params = [p.copy() for p in init]
    for server_round, chosen in enumerate(schedule, start=1):
        chosen = [c for c in chosen if c != leave_out]
        if not chosen:
            continue
        deltas = {c: local_delta(rovers[c], params) for c in chosen}
        updates = [ClientUpdate(c, server_round, len(rovers[c][1]), deltas[c]) for c in chosen]
        if estimator is not None:
            estimator.track(chosen)
            directions = estimator.directions()
            changes = {c: {k: directional_change(partial(local_delta, rovers[c]), params, d, deltas[c], eps=1e-4)
                           for k, d in directions.items()} for c in chosen}
            estimator.step(updates, changes, params)
        total = sum(u.num_examples for u in updates)
        params = [p + sum(u.num_examples * deltas[u.client_id][t] for u in updates) / total
                  for t, p in enumerate(params)]
    return params


def influence_check(seed):
    """Estimated vs leave-one-rover-out influence for one problem: loss-change correlation, median relative
    parameter error, and who is the most harmful rover by each."""
    rovers, (hx, hy), init, schedule = make_problem(seed)
    estimator = InfluenceEstimator(init)
    final = federate(rovers, init, schedule, estimator=estimator)
    grad = gradient(final, hx, hy)
    base = loss(final, hx, hy)
    true_change, est_change, rel_errors = {}, {}, []
    for k in sorted(rovers):
        without = federate(rovers, init, schedule, leave_out=k)
        truth = [w - f for w, f in zip(without, final)]
        est = estimator.influence(k)
        rel_errors.append(np.sqrt(sum(np.sum((e - t) ** 2) for e, t in zip(est, truth)))
                          / np.sqrt(sum(np.sum(t ** 2) for t in truth)))
        true_change[k] = loss(without, hx, hy) - base
        est_change[k] = estimator.loss_change(k, grad)
    keys = sorted(rovers)
    corr = float(np.corrcoef([true_change[k] for k in keys], [est_change[k] for k in keys])[0, 1])
    return (corr, float(np.median(rel_errors)), min(true_change, key=true_change.get),
            min(est_change, key=est_change.get))


def test_fed_influence_tracks_leave_one_rover_out_retraining_and_finds_the_faulty_rover():
    checks = [influence_check(seed) for seed in range(5)]
    corrs = [c[0] for c in checks]
    # the estimate follows retraining without each rover (non-convex model, 25 rounds of partial participation)
    assert np.median(corrs) > 0.9 and min(corrs) > 0.7, corrs
    assert all(c[1] < 0.25 for c in checks), [c[1] for c in checks]
    # the rover with the miscalibrated depth is the most harmful (without it the held-out loss drops most),
    # and the estimate says so in every problem
    assert all(c[2] == FAULTY and c[3] == FAULTY for c in checks), checks


def test_influence_of_a_linear_round_is_exact_and_bad_rounds_are_refused():
    # one round, no prior influence: Delta_k = lr * (u_{-k} - u) exactly
    est = InfluenceEstimator([np.zeros(2)], server_lr=0.5)
    updates = [ClientUpdate("a", 1, 1, [np.array([1.0, 0.0])]), ClientUpdate("b", 1, 3, [np.array([0.0, 4.0])])]
    est.step(updates, {})
    u = np.array([0.25, 3.0])
    np.testing.assert_allclose(est.influence("a")[0], 0.5 * (np.array([0.0, 4.0]) - u))
    np.testing.assert_allclose(est.influence("b")[0], 0.5 * (np.array([1.0, 0.0]) - u))
    # the next round needs every rover's change along every non-zero influence
    with pytest.raises(ValueError, match="no directional change along"):
        est.step([ClientUpdate("a", 2, 1, [np.array([1.0, 1.0])])], {"a": {"a": [np.zeros(2)]}})
    with pytest.raises(KeyError, match="not tracked"):
        est.influence("z")
    assert directional_change(lambda p: p, [np.ones(2)], [np.zeros(2)])[0].tolist() == [0.0, 0.0]
