"""Standard monocular depth metrics (Eigen et al. 2014), numpy, accepting torch tensors too.

Pixels count when the target is finite and in ``(min_depth, max_depth]``; predictions are clamped to
``[min_depth, max_depth]`` first (the usual KITTI/NYU protocol).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

#: Metric names in report order.
METRIC_NAMES: tuple[str, ...] = ("absrel", "sqrel", "rmse", "rmse_log", "log10", "delta1", "delta2", "delta3",
                                  "scale")
#: Metrics where a larger value is better.
HIGHER_IS_BETTER: frozenset[str] = frozenset({"delta1", "delta2", "delta3"})
#: Metrics that are best at 1: ``scale``, the geometric mean of prediction / target over the pixels (1.08: the
#: depth reads 8 % too far on the whole; 0.95: 5 % too near), the global scale error a new forest can bring.
#: The rest of :data:`METRIC_NAMES`: smaller is better.
BEST_AT_ONE: frozenset[str] = frozenset({"scale"})

_SUMS = ("abs_rel", "sq_rel", "sq_err", "sq_log_err", "abs_log10_err", "delta1", "delta2", "delta3", "log_ratio")


def _to_numpy(array: Any) -> np.ndarray:  # noqa: ANN401 - numpy array or torch tensor
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    return np.asarray(array, dtype=np.float64)


class MetricAccumulator:
    """Accumulates per-pixel sums over a whole dataset; ``result()`` gives the metrics of all pixels pooled.

    This is not the mean of per-image metrics (the monodepth2/BTS eval scripts do that): here an image with
    more valid pixels weighs more, and RMSE is ``sqrt(total squared error / total pixels)``.
    """

    def __init__(self, min_depth: float = 0.1, max_depth: float = 10.0) -> None:
        if not 0.0 < min_depth < max_depth:
            raise ValueError(f"need 0 < min_depth < max_depth, got min_depth={min_depth}, max_depth={max_depth}")
        self.min_depth = float(min_depth)
        self.max_depth = float(max_depth)
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        self.count = 0
        self.sums = dict.fromkeys(_SUMS, 0.0)

    def update(self, pred: Any, target: Any) -> int:  # noqa: ANN401 - numpy array or torch tensor
        """Add one prediction/target pair (any matching shapes); returns the number of valid pixels it added."""
        pred_np, target_np = _to_numpy(pred), _to_numpy(target)
        if pred_np.shape != target_np.shape:
            raise ValueError(f"pred and target shapes differ: {pred_np.shape} vs {target_np.shape}")
        with np.errstate(invalid="ignore"):
            mask = np.isfinite(target_np) & (target_np > self.min_depth) & (target_np <= self.max_depth)
        gt = target_np[mask]
        p = np.clip(np.nan_to_num(pred_np[mask], nan=self.max_depth), self.min_depth, self.max_depth)
        if gt.size == 0:
            return 0
        ratio = np.maximum(p / gt, gt / p)
        log_err = np.log(p) - np.log(gt)
        s = self.sums
        s["abs_rel"] += float(np.sum(np.abs(p - gt) / gt))
        s["sq_rel"] += float(np.sum((p - gt) ** 2 / gt))
        s["sq_err"] += float(np.sum((p - gt) ** 2))
        s["sq_log_err"] += float(np.sum(log_err**2))
        s["abs_log10_err"] += float(np.sum(np.abs(np.log10(p) - np.log10(gt))))
        s["log_ratio"] += float(np.sum(log_err))
        for k in (1, 2, 3):
            s[f"delta{k}"] += float(np.sum(ratio < 1.25**k))
        self.count += int(gt.size)
        return int(gt.size)

    def update_frame(self, pred: Any, target: Any) -> tuple[int, float, float]:  # noqa: ANN401 - array or tensor
        """:meth:`update`, returning this frame's valid pixels, sum of relative errors and pixels within 1.25 (the
        per-frame sums a bootstrap over frames resamples, ``models.bootstrap``)."""
        before = (self.sums["abs_rel"], self.sums["delta1"])
        pixels = self.update(pred, target)
        return pixels, self.sums["abs_rel"] - before[0], self.sums["delta1"] - before[1]

    def result(self) -> dict[str, float]:
        """Metrics over every pixel seen so far, in ``METRIC_NAMES`` order; NaN for all if no valid pixel."""
        if self.count == 0:
            return dict.fromkeys(METRIC_NAMES, math.nan)
        n = float(self.count)
        s = self.sums
        return {
            "absrel": s["abs_rel"] / n,
            "sqrel": s["sq_rel"] / n,
            "rmse": math.sqrt(s["sq_err"] / n),
            "rmse_log": math.sqrt(s["sq_log_err"] / n),
            "log10": s["abs_log10_err"] / n,
            "delta1": s["delta1"] / n,
            "delta2": s["delta2"] / n,
            "delta3": s["delta3"] / n,
            "scale": math.exp(s["log_ratio"] / n),
        }


def depth_metrics(
    pred: Any,  # noqa: ANN401 - numpy array or torch tensor
    target: Any,  # noqa: ANN401
    min_depth: float = 0.1,
    max_depth: float = 10.0,
) -> dict[str, float]:
    """Depth metrics of one prediction against its target (same shape; NaN or 0 in target = invalid)."""
    accumulator = MetricAccumulator(min_depth, max_depth)
    accumulator.update(pred, target)
    return accumulator.result()


def metric_arrow(name: str) -> str:
    """Which way is better for a metric: ``↑``, ``↓`` or ``→1`` (:data:`BEST_AT_ONE`)."""
    return "→1" if name in BEST_AT_ONE else "↑" if name in HIGHER_IS_BETTER else "↓"


def format_metric_table(rows: dict[str, dict[str, float]], digits: int = 3) -> str:
    """Markdown table, one row per model/run, columns in ``METRIC_NAMES`` order with arrows (↓ lower is better,
    →1 best at one)."""
    header = ["model"] + [f"{name} {metric_arrow(name)}" for name in METRIC_NAMES]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(METRIC_NAMES)) + "|"]
    for label, metrics in rows.items():
        cells = [label]
        for name in METRIC_NAMES:
            value = metrics.get(name)
            cells.append("-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
