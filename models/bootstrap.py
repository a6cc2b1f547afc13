"""Bootstrap of pooled per-pixel depth metrics over frames that come in segments (numpy only).

Frames of one segment are alike (one drive, one stretch of forest), so a resample draws segments with replacement,
then frames within each drawn segment; a lone segment is cut into runs of consecutive frames that are drawn as
segments would be (a block bootstrap). Used by the rover's validation gate (a paired lower bound) and by
``forest-train eval-styles`` (an interval per folder). docs/federated.md, "The validation gate".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DRAWS = 2000
CELLS = 1_000_000
"""resample weights held at once (8 MB): draws x frames stays small on a Pi with many frames"""
SINGLE_SEGMENT_BLOCKS = 8
"""A lone segment is cut into this many runs of consecutive frames, resampled as segments are."""


def resampling_groups(labels: np.ndarray | None, frames: int) -> list[np.ndarray]:
    """Indices of the frames of each segment (``labels``: one per frame, in recording order).

    Unknown segments (``None``): one group of all frames, the plain bootstrap over frames. A lone segment:
    :data:`SINGLE_SEGMENT_BLOCKS` runs of consecutive frames (one frame a run when there are fewer frames).
    """
    if labels is None:
        return [np.arange(frames)]
    labels = np.asarray(labels)
    if labels.shape != (frames,):
        raise ValueError(f"{labels.size} segment labels for {frames} frames")
    groups = [np.flatnonzero(labels == label) for label in np.unique(labels)]
    if len(groups) == 1 and groups[0].size > 1:
        return list(np.array_split(groups[0], min(SINGLE_SEGMENT_BLOCKS, groups[0].size)))
    return groups


class TwoStageBootstrap:
    """Weights of a two-stage bootstrap: groups with replacement, then frames within each drawn group.

    A group drawn ``c`` times contributes ``c`` independent resamples of its ``n`` frames, which together are
    one multinomial of ``c * n`` over them. With one group this is the plain bootstrap over frames. Group
    counts are drawn for all draws at once and each group has its own stream, so the weights do not depend on
    how many draws are made at a time.
    """

    def __init__(self, groups: list[np.ndarray], frames: int, draws: int, seed: int) -> None:
        self.groups, self.frames = groups, frames
        if len(groups) == 1:
            self.counts = np.ones((draws, 1), dtype=np.int64)
        else:
            self.counts = np.random.default_rng([seed, 0]).multinomial(
                len(groups), np.full(len(groups), 1.0 / len(groups)), size=draws)
        self.streams = [np.random.default_rng([seed, g + 1]) for g in range(len(groups))]

    def weights(self, first: int, count: int) -> np.ndarray:
        """``count x frames`` weights of draws ``first .. first + count - 1`` (call in order)."""
        out = np.zeros((count, self.frames), dtype=np.float64)
        for g, members in enumerate(self.groups):
            trials = self.counts[first:first + count, g] * members.size
            out[:, members] = self.streams[g].multinomial(trials, np.full(members.size, 1.0 / members.size))
        return out


def pooled_ratio_quantiles(numerators: np.ndarray, pixels: np.ndarray, groups: list[np.ndarray],
                           quantiles: Sequence[float], draws: int = DRAWS, seed: int = 0,
                           cells: int = CELLS) -> np.ndarray:
    """Quantiles of ``sum(w * numerator) / sum(w * pixels)`` over bootstrap weights ``w``, per numerator row.

    ``numerators`` is ``k x frames`` (per-frame sums, e.g. of relative errors), ``pixels`` the frames' valid pixel
    counts (all > 0). Returns ``k x len(quantiles)``; a fixed ``seed`` gives the same answer, whatever ``cells``.
    """
    numerators = np.atleast_2d(np.asarray(numerators, dtype=np.float64))
    pixels = np.asarray(pixels, dtype=np.float64)
    bootstrap = TwoStageBootstrap(groups, pixels.size, draws, seed)
    chunk = max(1, cells // max(pixels.size, 1))
    drawn: list[np.ndarray] = []
    for first in range(0, draws, chunk):
        weights = bootstrap.weights(first, min(chunk, draws - first))
        drawn.append((numerators @ weights.T) / (weights @ pixels))
    samples = np.concatenate(drawn, axis=1)
    return np.quantile(samples, list(quantiles), axis=1).T
