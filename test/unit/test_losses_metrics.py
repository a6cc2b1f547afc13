"""Depth losses and metrics, checked by hand on tiny arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from forest_perception.models.losses import (
    DepthLoss,
    berhu_loss,
    edge_aware_smoothness,
    l1_loss,
    log_l1_loss,
    rel_l1_loss,
    silog_loss,
    valid_mask,
)
from forest_perception.models.metrics import METRIC_NAMES, MetricAccumulator, depth_metrics, format_metric_table


def _target() -> torch.Tensor:
    t = torch.tensor([[1.0, 2.0, 4.0], [8.0, float("nan"), 0.0]])
    return t.view(1, 1, 2, 3)


# ---------------------------------------------------------------- losses


def test_valid_mask_drops_nan_zero_and_far():
    mask = valid_mask(_target(), min_depth=0.1, max_depth=5.0)
    assert mask.view(-1).tolist() == [True, True, True, False, False, False]


def test_silog_zero_for_perfect_and_scale_invariant_with_focus_one():
    target = _target()
    mask = valid_mask(target)
    perfect = torch.where(mask, target, torch.ones_like(target))
    assert float(silog_loss(perfect, target, mask)) == pytest.approx(0.0, abs=1e-6)
    assert float(silog_loss(perfect * 2.0, target, mask, variance_focus=1.0)) == pytest.approx(0.0, abs=1e-3)
    assert float(silog_loss(perfect * 2.0, target, mask, variance_focus=0.85)) > 0.5


def test_silog_value_by_hand():
    target = torch.tensor([1.0, 1.0]).view(1, 1, 1, 2)
    pred = torch.tensor([math.e, 1.0]).view(1, 1, 1, 2)  # d = [1, 0]
    mask = torch.ones_like(target, dtype=torch.bool)
    expected = 10.0 * math.sqrt(0.5 - 0.85 * 0.25)
    assert float(silog_loss(pred, target, mask)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("loss_fn", [silog_loss, l1_loss, berhu_loss])
def test_no_valid_pixels_gives_zero_and_finite_grad(loss_fn):
    pred = torch.full((2, 1, 4, 4), 3.0, requires_grad=True)
    target = torch.full((2, 1, 4, 4), float("nan"))
    target[1] = 0.0
    loss = loss_fn(pred, target, valid_mask(target))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(pred.grad).all()


def test_losses_ignore_masked_pixels_and_have_finite_grads():
    target = _target()
    pred = torch.full_like(target, 2.0, requires_grad=True)
    mask = valid_mask(target)
    total, parts = DepthLoss(silog=1.0, berhu=1.0, l1=1.0, smooth=0.1)(pred, target, image=torch.rand(1, 3, 2, 3))
    total.backward()
    assert set(parts) == {"silog", "berhu", "l1", "smooth"}
    assert torch.isfinite(total) and torch.isfinite(pred.grad).all()
    assert (pred.grad[~mask] == 0).all()
    # L1 by hand: |2-1| + |2-2| + |2-4| + |2-8| over 4 valid pixels
    assert float(parts["l1"]) == pytest.approx(9.0 / 4.0)


def test_berhu_is_l1_below_c_and_quadratic_above():
    target = torch.zeros(1, 1, 1, 2) + 1.0
    pred = torch.tensor([1.1, 2.0]).view(1, 1, 1, 2)  # |x| = 0.1, 1.0; c = 0.2 * 1.0
    mask = torch.ones_like(target, dtype=torch.bool)
    expected = (0.1 + (1.0 + 0.04) / 0.4) / 2.0
    assert float(berhu_loss(pred, target, mask)) == pytest.approx(expected, rel=1e-5)


def test_smoothness_zero_for_constant_depth_and_lower_across_edges():
    depth = torch.full((1, 1, 4, 4), 2.0)
    assert float(edge_aware_smoothness(depth, torch.rand(1, 3, 4, 4))) == pytest.approx(0.0, abs=1e-6)
    step = torch.ones(1, 1, 4, 4)
    step[..., 2:] = 4.0
    flat_image = torch.zeros(1, 3, 4, 4)
    edge_image = torch.zeros(1, 3, 4, 4)
    edge_image[..., 2:] = 5.0
    assert float(edge_aware_smoothness(step, edge_image)) < float(edge_aware_smoothness(step, flat_image))


def test_rel_l1_is_absrel_and_costs_too_far_more_than_too_near():
    target = _target()
    mask = valid_mask(target)
    perfect = torch.where(mask, target, torch.ones_like(target))
    assert float(rel_l1_loss(perfect, target, mask)) == pytest.approx(0.0, abs=1e-7)
    assert float(rel_l1_loss(perfect * 1.1, target, mask)) == pytest.approx(0.1, rel=1e-5)
    assert float(rel_l1_loss(perfect * 2.0, target, mask)) == pytest.approx(1.0, rel=1e-5)
    assert float(rel_l1_loss(perfect * 0.5, target, mask)) == pytest.approx(0.5, rel=1e-5)
    # log_l1 weighs the two alike: the asymmetry is what makes rel_l1 lean nearer where the scale is unsure
    assert float(log_l1_loss(perfect * 2.0, target, mask)) == pytest.approx(float(log_l1_loss(perfect * 0.5, target,
                                                                                              mask)), rel=1e-5)
    assert float(rel_l1_loss(perfect, target, torch.zeros_like(mask))) == 0.0
    pred = (perfect * 1.3).requires_grad_(True)
    total, parts = DepthLoss(silog=0.0, smooth=0.0, rel_l1=2.0)(pred, target)
    assert float(total) == pytest.approx(2.0 * 0.3, rel=1e-5) and set(parts) == {"rel_l1"}
    total.backward()
    assert torch.isfinite(pred.grad).all() and float(pred.grad[mask].min()) > 0


def test_train_options_take_the_rel_l1_weight_and_refuse_a_negative_one():
    from forest_perception.models.train_options import TrainOptions, build_loss

    loss = build_loss(TrainOptions(data=["x"], loss_rel_l1=0.7, min_depth=0.1, max_depth=10.0))
    assert loss.weights["rel_l1"] == 0.7
    with pytest.raises(ValueError, match="--loss-rel-l1"):
        TrainOptions(data=["x"], loss_rel_l1=-1.0).validate()


def test_depth_loss_rejects_negative_weight():
    with pytest.raises(ValueError, match="smooth"):
        DepthLoss(smooth=-1.0)


# ---------------------------------------------------------------- metrics


def test_perfect_prediction():
    target = np.array([[0.5, 1.0], [3.0, 9.0]])
    metrics = depth_metrics(target.copy(), target)
    assert list(metrics) == list(METRIC_NAMES)
    assert metrics["absrel"] == 0.0 and metrics["rmse"] == 0.0
    assert metrics["delta1"] == metrics["delta2"] == metrics["delta3"] == 1.0


def test_ten_percent_overestimate():
    target = np.array([0.5, 1.0, 3.0, 9.0])
    metrics = depth_metrics(target * 1.1, target)
    assert metrics["absrel"] == pytest.approx(0.1, abs=1e-12)
    assert metrics["rmse_log"] == pytest.approx(math.log(1.1))
    assert metrics["log10"] == pytest.approx(math.log10(1.1))
    assert metrics["delta1"] == 1.0


def test_scale_is_the_geometric_mean_ratio_so_a_global_bias_shows_apart_from_the_structure():
    target = np.array([0.5, 1.0, 3.0, 9.0])
    assert depth_metrics(target.copy(), target)["scale"] == pytest.approx(1.0)
    assert depth_metrics(target * 1.08, target)["scale"] == pytest.approx(1.08)
    assert depth_metrics(target * 0.95, target)["scale"] == pytest.approx(0.95)
    # twice too far on half the pixels, half as far on the others: large errors, no global bias
    spread = depth_metrics(target * np.array([2.0, 0.5, 2.0, 0.5]), target)
    assert spread["scale"] == pytest.approx(1.0) and spread["absrel"] > 0.5
    accumulator = MetricAccumulator()
    accumulator.update(np.array([2.0]), np.array([1.0]))
    accumulator.update(np.ones(3), np.ones(3))
    assert accumulator.result()["scale"] == pytest.approx(2.0 ** 0.25)  # pixels pooled, as every metric
    assert "scale →1" in format_metric_table({"m": spread}) and "absrel ↓" in format_metric_table({"m": spread})
    assert math.isnan(depth_metrics(target, np.full(4, np.nan))["scale"])


def test_masked_pixels_ignored_and_max_depth_cap():
    target = np.array([1.0, np.nan, 0.0, 50.0, 2.0])
    pred = np.array([1.0, 7.0, 7.0, 7.0, 30.0])  # pred 30 clamps to max_depth 10
    metrics = depth_metrics(pred, target, min_depth=0.1, max_depth=10.0)
    assert metrics["absrel"] == pytest.approx((0.0 + 8.0 / 2.0) / 2.0)
    assert metrics["delta1"] == 0.5
    assert math.isnan(depth_metrics(pred, np.full(5, np.nan))["absrel"])


def test_accepts_torch_and_rejects_shape_mismatch():
    target = torch.tensor([1.0, 2.0])
    assert depth_metrics(target * 1.1, target)["absrel"] == pytest.approx(0.1, rel=1e-6)
    with pytest.raises(ValueError, match="shapes differ"):
        depth_metrics(np.ones(3), np.ones(2))


def test_accumulator_pools_pixels_not_images():
    accumulator = MetricAccumulator()
    accumulator.update(np.array([1.1]), np.array([1.0]))  # absrel 0.1 on 1 pixel
    accumulator.update(np.ones(3), np.ones(3))  # absrel 0 on 3 pixels
    result = accumulator.result()
    assert result["absrel"] == pytest.approx(0.1 / 4)  # the mean of per-image means would be 0.05
    assert result["rmse"] == pytest.approx(math.sqrt(0.01 / 4))


def test_format_metric_table():
    table = format_metric_table({"autoencoder": depth_metrics(np.ones(2), np.ones(2)), "empty": {}})
    lines = table.splitlines()
    assert lines[0].startswith("| model | absrel ↓") and "delta1 ↑" in lines[0]
    assert lines[2] == "| autoencoder | 0.000 | 0.000 | 0.000 | 0.000 | 0.000 | 1.000 | 1.000 | 1.000 | 1.000 |"
    assert lines[3].endswith("| - |")


def test_update_frame_returns_the_frames_own_sums():
    acc = MetricAccumulator(min_depth=0.1, max_depth=10.0)
    target = np.array([[1.0, 2.0], [4.0, np.nan]])
    first = acc.update_frame(np.array([[1.1, 2.0], [8.0, 3.0]]), target)
    assert first[0] == 3 and first[1] == pytest.approx(0.1 + 0.0 + 1.0) and first[2] == 2  # 8 m for 4 m: not in 1.25
    second = acc.update_frame(np.array([[1.0, 1.0], [4.0, 1.0]]), target)
    assert second == (3, pytest.approx(0.5), 2)
    assert acc.count == 6 and acc.result()["absrel"] == pytest.approx(1.6 / 6) and acc.result()["delta1"] == 4 / 6
