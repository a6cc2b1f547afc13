"""Robust aggregation: update-norm clipping and coordinate-wise trimmed mean.

Clipping bounds how far one rover can move the model in a round; the trimmed mean
drops, for every coordinate separately, the ``k = floor(trim_fraction * n)`` largest
and ``k`` smallest of the ``n`` client values before averaging, so up to ``k``
arbitrarily bad rovers cannot drag any coordinate outside the range of the good ones.
Both work on deltas (``local - global``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from forest_perception.collab.updates import NDArrays, params_norm


def clip_update_norm(delta: Sequence[np.ndarray], max_norm: float) -> tuple[NDArrays, float]:
    """Scale ``delta`` so its L2 norm over all tensors is at most ``max_norm``; return it and the factor used.

    The factor is ``min(1, max_norm / norm)``; a delta already within the bound is returned
    unchanged (copied) with factor 1.0. dtypes are kept.
    """
    if not max_norm > 0 or not math.isfinite(max_norm):
        raise ValueError(f"clip_update_norm: max_norm must be a positive finite number, got {max_norm!r}")
    norm = params_norm(delta)
    if not math.isfinite(norm):
        raise ValueError("clip_update_norm: delta has NaN/Inf values; refuse it instead of clipping")
    scale = 1.0 if norm <= max_norm else max_norm / norm
    clipped = [np.asarray((np.asarray(d, dtype=np.float64) * scale).astype(np.asarray(d).dtype)) for d in delta]
    return clipped, scale


def trimmed_mean(values: Sequence[np.ndarray], trim_fraction: float) -> np.ndarray:
    """Coordinate-wise mean of equally shaped arrays after dropping the ``k`` largest and ``k`` smallest.

    ``k = floor(trim_fraction * len(values))``; ``trim_fraction`` in ``[0, 0.5)`` and at least
    one value must remain. Returns float64.
    """
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trimmed_mean: trim_fraction must be in [0, 0.5), got {trim_fraction!r}")
    if len(values) == 0:
        raise ValueError("trimmed_mean: no values to average")
    shapes = {np.shape(v) for v in values}
    if len(shapes) != 1:
        raise ValueError(f"trimmed_mean: values have different shapes {sorted(shapes)}")
    n = len(values)
    k = math.floor(trim_fraction * n)
    if n - 2 * k < 1:
        raise ValueError(f"trimmed_mean: trimming {k} from each end of {n} values leaves none")
    stacked = np.sort(np.stack([np.asarray(v, dtype=np.float64) for v in values]), axis=0)
    return np.asarray(stacked[k : n - k].mean(axis=0))


def trimmed_mean_params(deltas: Sequence[Sequence[np.ndarray]], trim_fraction: float) -> NDArrays:
    """:func:`trimmed_mean` tensor by tensor over several clients' deltas (unweighted); float64."""
    if len(deltas) == 0:
        raise ValueError("trimmed_mean_params: no deltas to average")
    counts = {len(d) for d in deltas}
    if len(counts) != 1:
        raise ValueError(f"trimmed_mean_params: deltas have different tensor counts {sorted(counts)}")
    return [trimmed_mean([d[t] for d in deltas], trim_fraction) for t in range(counts.pop())]
