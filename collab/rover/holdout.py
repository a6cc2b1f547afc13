"""The rover's held-out frames: split by segment, never by frame, stable as new segments arrive.

:func:`rover_split` is THE split of a rover's recordings: the rover's Flower ClientApp trains only on its
``train`` segments and evaluates on its ``holdout`` segments, and collab_node's gate evaluates candidates on
exactly those ``holdout`` segments (``docs/federated.md``, "One hold-out split").
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from forest_perception.dataset_tools.layout import Segment, load_depth, load_rgb


def spread_indices(count: int, limit: int) -> list[int]:
    """At most ``limit`` of ``range(count)``, evenly spread (all of them when ``count <= limit``)."""
    if count <= limit:
        return list(range(count))
    return sorted(set(np.round(np.linspace(0, count - 1, limit)).astype(int).tolist()))


def _holdout_score(segment_id: str, seed: int) -> float:
    digest = hashlib.sha256(f"{int(seed)}:{segment_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def holdout_split(segment_ids: Sequence[str], fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """``(train, holdout)`` segment ids: a segment is held out when its hash score is below ``fraction``.

    The score depends only on ``(seed, segment id)``, so adding segments never moves an existing one
    (except in the small-number fallbacks: with two or more segments and ``fraction > 0`` at least one is
    held out and at least one kept for training). Fewer than two segments: nothing is held out.
    """
    if not (isinstance(fraction, (int, float)) and math.isfinite(fraction) and 0.0 <= fraction < 1.0):
        raise ValueError(f"holdout fraction must be within [0, 1), got {fraction!r}")
    ids = sorted(set(segment_ids))
    if fraction == 0.0 or len(ids) < 2:
        return ids, []
    scores = {s: _holdout_score(s, seed) for s in ids}
    holdout = {s for s in ids if scores[s] < fraction}
    if not holdout:
        holdout = {min(ids, key=scores.__getitem__)}
    if len(holdout) == len(ids):
        holdout.discard(max(ids, key=scores.__getitem__))
    return [s for s in ids if s not in holdout], [s for s in ids if s in holdout]


DEFAULT_HOLDOUT_FRACTION = 0.2
"""Share of a rover's segments held out, for collab_node (``holdout_fraction``) and the ClientApp alike."""


def rover_split(frames_by_segment: Mapping[str, int], fraction: float = DEFAULT_HOLDOUT_FRACTION,
                seed: int = 0) -> tuple[list[str], list[str]]:
    """``(train, holdout)`` segment ids of a rover's recordings: :func:`holdout_split` of the segments with frames.

    ``frames_by_segment`` maps segment ids (``'1a'`` = ``Run-1/a``) to their frame counts, as
    :func:`forest_perception.collab.rover.dataset.scan_recordings` finds them. Segments without frames are on
    neither side. The two lists are disjoint and together hold every segment with frames.
    """
    return holdout_split([s for s, n in frames_by_segment.items() if n > 0], fraction, seed)


@dataclass
class HoldoutSet:
    """Held-out frames as (segment, frame index) references, loaded from disk one at a time."""

    segments: list[Segment]
    frames: list[tuple[int, int]]  # (index into segments, frame index)

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def segment_ids(self) -> list[str]:
        """Ids of the held-out segments."""
        return [s.segment_id for s in self.segments]

    @property
    def signature(self) -> str:
        """Changes whenever the held-out frames do."""
        text = ";".join(f"{self.segments[s].path}/{self.segments[s].frames[i].stem}" for s, i in self.frames)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(rgb8 HxWx3, depth HxW metres NaN invalid) per held-out frame."""
        for s, i in self.frames:
            segment = self.segments[s]
            rgb, depth = load_rgb(segment.rgb_path(i)), load_depth(segment.depth_path(i), segment.depth_encoding)
            if depth.shape != rgb.shape[:2]:
                raise ValueError(f"frame {segment.frames[i].stem!r} of {segment.path}: depth {depth.shape} "
                                 f"and RGB {rgb.shape[:2]} differ in size")
            yield rgb, depth


def make_holdout(segments: Sequence[Segment], max_frames: int = 200) -> HoldoutSet:
    """The frames of ``segments``, at most ``max_frames`` of them evenly spread over all (deterministic)."""
    if max_frames < 1:
        raise ValueError(f"max_frames must be at least 1, got {max_frames}")
    segments = [s for s in segments if len(s) > 0]
    refs = [(si, fi) for si, s in enumerate(segments) for fi in range(len(s))]
    refs = [refs[i] for i in spread_indices(len(refs), max_frames)]
    return HoldoutSet(list(segments), refs)
