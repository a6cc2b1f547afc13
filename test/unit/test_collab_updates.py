"""Client-update checks: every refusal reason, and the round going on without the bad update."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from forest_perception.collab.algorithms import fedavg
from forest_perception.collab.updates import (
    REJECT_REASONS,
    ClientUpdate,
    UpdateRejected,
    involvement,
    params_norm,
    row_indices,
    screen_updates,
    update_delta,
    validate_update,
)

GLOBAL = [np.zeros((2, 2), dtype=np.float32), np.zeros(3, dtype=np.float32)]


def good(cid="a", rnd=5, n=10, scale=1.0):
    return ClientUpdate(cid, rnd, n, [np.full((2, 2), scale, dtype=np.float32), np.full(3, scale, dtype=np.float32)])


def reason_of(update, **kwargs):
    kwargs.setdefault("current_round", 5)
    with pytest.raises(UpdateRejected) as info:
        validate_update(update, GLOBAL, **kwargs)
    assert info.value.reason in REJECT_REASONS
    assert info.value.client_id == str(update.client_id)
    return info.value.reason, str(info.value)


def test_a_good_update_passes():
    validate_update(good(), GLOBAL, current_round=5, max_norm=10.0)
    validate_update(good(rnd=3), GLOBAL, current_round=5, max_staleness=2)
    # (shape, dtype) pairs work as the reference too
    validate_update(good(), [((2, 2), "float32"), ((3,), np.float32)], current_round=5, max_norm=10.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_is_refused(bad):
    update = good()
    update.params[1][2] = bad
    reason, message = reason_of(update)
    assert reason == "non_finite" and "tensor 1" in message and "'a'" in message


def test_wrong_shape_dtype_count_type_are_refused():
    update = good()
    update.params[0] = np.zeros((2, 3), dtype=np.float32)
    reason, message = reason_of(update)
    assert reason == "shape" and "(2, 3)" in message and "(2, 2)" in message

    update = good()
    update.params[1] = update.params[1].astype(np.float64)
    reason, message = reason_of(update)
    assert reason == "dtype" and "float64" in message and "float32" in message

    update = good()
    update.params.append(np.zeros(1, dtype=np.float32))
    assert reason_of(update)[0] == "count"

    update = good()
    update.params[0] = [[0.0, 0.0], [0.0, 0.0]]
    assert reason_of(update)[0] == "type"


def test_huge_norm_is_refused():
    update = good(scale=3.0)  # norm = 3 * sqrt(7) = 7.94
    validate_update(update, GLOBAL, current_round=5, max_norm=8.0)
    reason, message = reason_of(update, max_norm=7.9)
    assert reason == "norm" and "7.93725" in message
    # a weights update is measured against the global model
    weights = ClientUpdate("w", 5, 1, [np.full((2, 2), 1.0, dtype=np.float32), np.zeros(3, dtype=np.float32)])
    weights.kind = "weights"
    base = [np.full((2, 2), 1.0, dtype=np.float32), np.full(3, 100.0, dtype=np.float32)]
    with pytest.raises(UpdateRejected, match="norm 173.2"):
        validate_update(weights, base, current_round=5, max_norm=100.0)
    with pytest.raises(TypeError, match="global arrays"):
        validate_update(weights, [((2, 2), "float32"), ((3,), "float32")], current_round=5, max_norm=100.0)


def test_stale_and_future_rounds_are_refused():
    reason, message = reason_of(good(rnd=4))
    assert reason == "stale" and "round 4" in message
    assert reason_of(good(rnd=2), max_staleness=2)[0] == "stale"
    assert reason_of(good(rnd=6))[0] == "future_round"
    assert reason_of(good(rnd="5"))[0] == "round"


def test_bad_identity_count_and_kind_are_refused():
    assert reason_of(good(cid=""))[0] == "client_id"
    for n in (0, -3, 2.5, True):
        assert reason_of(good(n=n))[0] == "num_examples"
    update = good()
    update.kind = "gradient"
    assert reason_of(update)[0] == "kind"


def test_rows_are_checked():
    update = good()
    update.rows = [np.array([True, False, True]), None]  # 3 entries for 2 rows
    reason, message = reason_of(update)
    assert reason == "rows" and "3 entries" in message
    update.rows = [np.array([0, 2]), None]
    assert reason_of(update)[0] == "rows"
    update.rows = [np.array([1, 1]), None]
    assert reason_of(update)[0] == "rows"
    update.rows = [None, None, None]
    assert reason_of(update)[0] == "rows"
    # a compact upload of row 1 only is fine; a compact upload of the wrong row count is not
    update = good()
    update.rows = [np.array([1]), None]
    update.params[0] = np.ones((1, 2), dtype=np.float32)
    validate_update(update, GLOBAL, current_round=5)
    update.params[0] = np.ones((3, 2), dtype=np.float32)
    assert reason_of(update)[0] == "shape"


def test_row_helpers():
    np.testing.assert_array_equal(row_indices(np.array([False, True, True]), 3), [1, 2])
    np.testing.assert_array_equal(row_indices(np.array([2, 0]), 3), [0, 2])
    np.testing.assert_array_equal(row_indices(None, 2), [0, 1])
    with pytest.raises(ValueError, match="dtype float64"):
        row_indices(np.array([0.0]), 3)
    update = ClientUpdate("a", 1, 1, [np.array([[5.0, 5.0]]), np.zeros(3)], rows=[np.array([1]), None])
    masks = involvement(update, [(2, 2), (3,)])
    np.testing.assert_array_equal(masks[0], [False, True])
    assert masks[1] is None
    delta = update_delta(update, [np.ones((2, 2)), np.ones(3)])
    np.testing.assert_array_equal(delta[0], [[0, 0], [5, 5]])
    update.kind = "weights"
    np.testing.assert_array_equal(update_delta(update, [np.ones((2, 2)), np.ones(3)])[0], [[0, 0], [4, 4]])
    with pytest.raises(ValueError, match="2 tensors, the model has 1"):
        update_delta(update, [np.ones((2, 2))])
    assert params_norm([np.array([3.0]), np.array([[4.0]])]) == pytest.approx(5.0)


def test_screen_logs_each_refusal_and_keeps_the_good(caplog):
    nan_update = good("nan")
    nan_update.params[0][0, 0] = np.nan
    updates = [good("a", n=1, scale=1.0), nan_update, good("old", rnd=1), good("b", n=3, scale=5.0), good("a", n=9)]
    with caplog.at_level(logging.WARNING, logger="forest_perception.collab.updates"):
        accepted, rejected = screen_updates(updates, GLOBAL, current_round=5)
    assert [u.client_id for u in accepted] == ["a", "b"]
    assert [(r.client_id, r.reason) for r in rejected] == [("nan", "non_finite"), ("old", "stale"), ("a", "duplicate")]
    logged = caplog.text
    assert "[non_finite]" in logged and "[stale]" in logged and "[duplicate]" in logged and "'nan'" in logged
    # the round goes on: the global model moves by the good updates only, and the input model is untouched
    new = fedavg(GLOBAL, accepted)
    np.testing.assert_allclose(new[0], np.full((2, 2), (1 * 1 + 3 * 5) / 4))
    assert np.all(GLOBAL[0] == 0)
