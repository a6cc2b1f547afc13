"""Which frames curation keeps: its configuration, the frame table, and the blur, duplicate, variety and depth steps.

Each step is described in docs/dataset_tools.md ("curate"); ``curate`` scores the table first and writes the result.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from forest_perception.dataset_tools.gps import local_enu
from forest_perception.dataset_tools.layout import DepthEncoding, Segment, segment_key
from forest_perception.dataset_tools.parallel import parallel_map
from forest_perception.dataset_tools.scores import DESCRIPTOR_SIZE, depth_valid_fraction

REASONS = ("kept", "unreadable", "blurry", "duplicate", "not_selected", "no_depth")
"""Why a frame was kept or dropped, in the order the steps run."""


@dataclass(frozen=True)
class CurateConfig:
    """How to curate; docs/dataset_tools.md ("curate") says what each step does with these."""

    count: int | None = None
    """Frames to keep; None with ``fraction`` None keeps every frame that passes the filters."""
    fraction: float | None = None
    """Fraction of the input frames to keep, in (0, 1]; exclusive with ``count``."""
    blur_ratio: float = 0.35
    """Blurry below this sharpness ratio against the local reference (0 turns the relative test off)."""
    blur_window: int = 25
    """Frames either side of a frame in its segment that make its local sharpness reference."""
    blur_percentile: float = 75.0
    """Percentile of the window's sharpness used as the reference (above 50 tolerates more blurred frames)."""
    min_laplacian: float = 0.0
    """Absolute floor of the variance of the Laplacian (0 = none)."""
    min_tenengrad: float = 0.0
    """Absolute floor of the Tenengrad score (0 = none)."""
    duplicate_distance: float = 0.15
    """Descriptor distance (0..2) under which two frames are near duplicates (0 turns it off)."""
    duplicate_window_s: float = 5.0
    """Seconds either side within a segment in which frames are compared for duplicates."""
    duplicate_radius_m: float = 2.0
    """With GPS, frames of any segment within this distance are compared too (0 = off)."""
    min_depth_valid: float = 0.05
    """Frames with a smaller fraction of valid depth pixels are dropped as no_depth."""
    check_depth: bool = True
    """Decode the depth of every kept frame (valid fraction, corrupt data); False skips it."""
    min_spacing_m: float = 0.0
    """Minimum GPS distance between kept frames, metres (0 = none)."""
    min_interval_s: float = 0.0
    """Minimum time between kept frames of one segment, seconds (0 = none)."""
    seed: int = 0
    """Seed of the first farthest-point pick."""
    workers: int | None = None
    """Scoring threads; None = one per core."""
    link: bool = True
    """Hard-link kept images into the output (copies when linking fails); False always copies."""

    def validate(self) -> CurateConfig:
        """Raise ``ValueError`` naming the first bad value."""
        if self.count is not None and self.fraction is not None:
            raise ValueError("give either count or fraction, not both")
        if self.count is not None and (
            isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1
        ):
            raise ValueError(f"count must be a positive integer, got {self.count!r}")
        if self.fraction is not None and not (math.isfinite(self.fraction) and 0.0 < self.fraction <= 1.0):
            raise ValueError(f"fraction must be within (0, 1], got {self.fraction!r}")
        ranges = {
            "blur_ratio": (0.0, 1.0),
            "blur_percentile": (0.0, 100.0),
            "min_laplacian": (0.0, math.inf),
            "min_tenengrad": (0.0, math.inf),
            "duplicate_distance": (0.0, 2.0),
            "duplicate_window_s": (0.0, math.inf),
            "duplicate_radius_m": (0.0, math.inf),
            "min_depth_valid": (0.0, 1.0),
            "min_spacing_m": (0.0, math.inf),
            "min_interval_s": (0.0, math.inf),
        }
        for name, (low, high) in ranges.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                math.isfinite(value) and low <= value <= high
            ):
                raise ValueError(f"{name} must be a number within [{low}, {high}], got {value!r}")
        if isinstance(self.blur_window, bool) or not isinstance(self.blur_window, int) or self.blur_window < 1:
            raise ValueError(f"blur_window must be a positive integer (frames), got {self.blur_window!r}")
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 1):
            raise ValueError(f"workers must be a positive integer or None, got {self.workers!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        return self

    def target(self, total: int) -> int | None:
        """Frames to keep out of ``total`` input frames (None: all that pass)."""
        if self.count is not None:
            return self.count
        if self.fraction is not None:
            return max(1, round(self.fraction * total))
        return None


# --------------------------------------------------------------------------- frame table


@dataclass
class FrameTable:
    """Every input frame in dataset order, with its scores and the decision about it."""

    segments: list[Segment]
    segment_of: np.ndarray
    index_in_segment: np.ndarray
    timestamp: np.ndarray
    latitude: np.ndarray
    longitude: np.ndarray
    laplacian: np.ndarray = field(default_factory=lambda: np.zeros(0))
    tenengrad: np.ndarray = field(default_factory=lambda: np.zeros(0))
    descriptors: np.ndarray = field(default_factory=lambda: np.zeros((0, DESCRIPTOR_SIZE), np.float32))
    sharpness_ratio: np.ndarray = field(default_factory=lambda: np.zeros(0))
    depth_valid: np.ndarray = field(default_factory=lambda: np.zeros(0))
    duplicate_of: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    reason: list[str] = field(default_factory=list)
    detail: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.segment_of)

    def frame_id(self, i: int) -> str:
        """``Run-N/<segment>/<stem>`` of frame ``i``."""
        segment = self.segments[int(self.segment_of[i])]
        return f"{segment_key(segment)}/{segment.frames[int(self.index_in_segment[i])].stem}"

    def paths(self, i: int) -> tuple[str, str]:
        """(RGB path, depth path) of frame ``i``."""
        segment = self.segments[int(self.segment_of[i])]
        j = int(self.index_in_segment[i])
        return str(segment.rgb_path(j)), str(segment.depth_path(j))

    def depth_encoding(self, i: int) -> DepthEncoding:
        """How frame ``i``'s depth PNG maps to metres."""
        return self.segments[int(self.segment_of[i])].depth_encoding

    @property
    def kept(self) -> np.ndarray:
        """Boolean mask of the kept frames."""
        return np.array([r == "kept" for r in self.reason], bool)


def frame_table(segments: Sequence[Segment]) -> FrameTable:
    """A ``FrameTable`` of the frames of ``segments`` (metadata only; nothing is decoded)."""
    seg_of, idx, ts, lat, lon = [], [], [], [], []
    for s, segment in enumerate(segments):
        for j, frame in enumerate(segment.frames):
            seg_of.append(s)
            idx.append(j)
            ts.append(math.nan if frame.timestamp is None else frame.timestamp)
            lat.append(frame.gps.latitude if frame.gps else math.nan)
            lon.append(frame.gps.longitude if frame.gps else math.nan)
    n = len(seg_of)
    return FrameTable(
        segments=list(segments),
        segment_of=np.asarray(seg_of, np.int64),
        index_in_segment=np.asarray(idx, np.int64),
        timestamp=np.asarray(ts, np.float64),
        latitude=np.asarray(lat, np.float64),
        longitude=np.asarray(lon, np.float64),
        laplacian=np.full(n, math.nan),
        tenengrad=np.full(n, math.nan),
        descriptors=np.zeros((n, DESCRIPTOR_SIZE), np.float32),
        sharpness_ratio=np.full(n, math.nan),
        depth_valid=np.full(n, math.nan),
        duplicate_of=np.full(n, -1, np.int64),
        reason=[""] * n,
        detail=[""] * n,
    )


# --------------------------------------------------------------------------- steps


def _local_reference(values: np.ndarray, window: int, percentile: float) -> np.ndarray:
    """Percentile of ``values`` over +-``window`` samples around each one (NaN: no value, skipped).

    NaN entries (unreadable frames) stand in as the median so the windows stay full and
    the percentile vectorised; windows at the ends are mirrored.
    """
    n = len(values)
    finite = values[np.isfinite(values)]
    if n == 0 or finite.size == 0:
        return np.full(n, math.nan)
    if 2 * window + 1 >= n:
        return np.full(n, float(np.percentile(finite, percentile)))
    filled = np.where(np.isfinite(values), values, float(np.median(finite)))
    padded = np.pad(filled, window, mode="reflect")
    windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * window + 1)
    return np.percentile(windows, percentile, axis=1)


def mark_blurry(table: FrameTable, config: CurateConfig) -> None:
    """Sharpness ratio of every readable frame against its segment neighbourhood; mark ``blurry`` ones."""
    readable = np.array([r == "" for r in table.reason], bool)
    log_lap = np.log(np.maximum(table.laplacian, 0.0) + 1e-6)
    log_ten = np.log(np.maximum(table.tenengrad, 0.0) + 1e-6)
    for s in range(len(table.segments)):
        members = np.flatnonzero(table.segment_of == s)
        if members.size == 0:
            continue
        ok = readable[members]
        lap = np.where(ok, log_lap[members], np.nan)
        ten = np.where(ok, log_ten[members], np.nan)
        ref_lap = _local_reference(lap, config.blur_window, config.blur_percentile)
        ref_ten = _local_reference(ten, config.blur_window, config.blur_percentile)
        table.sharpness_ratio[members] = np.exp(0.5 * ((lap - ref_lap) + (ten - ref_ten)))
    for i in np.flatnonzero(readable):
        ratio = table.sharpness_ratio[i]
        why = []
        if config.blur_ratio > 0 and ratio < config.blur_ratio:
            why.append(f"sharpness ratio {ratio:.2f} < {config.blur_ratio:g} of its neighbours")
        if table.laplacian[i] < config.min_laplacian:
            why.append(f"Laplacian variance {table.laplacian[i]:.1f} < {config.min_laplacian:g}")
        if table.tenengrad[i] < config.min_tenengrad:
            why.append(f"Tenengrad {table.tenengrad[i]:.1f} < {config.min_tenengrad:g}")
        if why:
            table.reason[i] = "blurry"
            table.detail[i] = "; ".join(why)


FPS_DIMS = 32
"""Principal components of the descriptors that farthest-point sampling works in (memory traffic per pick)."""


def principal_components(vectors: np.ndarray, dims: int = FPS_DIMS) -> np.ndarray:
    """``vectors`` projected on their ``dims`` leading principal components (unchanged when not wider)."""
    vectors = np.asarray(vectors, np.float32)
    if vectors.shape[1] <= dims or len(vectors) <= dims:
        return vectors
    centred = vectors - vectors.mean(axis=0)
    _, eigvecs = np.linalg.eigh(centred.T.astype(np.float64) @ centred.astype(np.float64))
    return np.ascontiguousarray(centred @ eigvecs[:, ::-1][:, :dims].astype(np.float32))


def _gps_cell(east: float, north: float, size: float) -> tuple[int, int]:
    return math.floor(east / size), math.floor(north / size)


def mark_duplicates(table: FrameTable, config: CurateConfig, east: np.ndarray, north: np.ndarray) -> None:
    """Greedy suppression of near duplicates among the frames not yet dropped, sharpest first."""
    if config.duplicate_distance <= 0:
        return
    candidates = np.array([i for i in range(len(table)) if table.reason[i] == ""], np.int64)
    if candidates.size == 0:
        return
    score = np.log(np.maximum(table.laplacian[candidates], 0) + 1e-6) + np.log(
        np.maximum(table.tenengrad[candidates], 0) + 1e-6
    )
    order = candidates[np.lexsort((candidates, -score))]
    accepted_times: dict[int, list[float]] = {}
    accepted_ids: dict[int, list[int]] = {}
    use_gps = config.duplicate_radius_m > 0
    cells: dict[tuple[int, int], list[int]] = {}
    threshold_sq = config.duplicate_distance**2
    radius_sq = config.duplicate_radius_m**2
    desc = table.descriptors
    # Projections on the leading principal components never lengthen a distance: a cheap
    # prefilter, with the full descriptors deciding for the few pairs that pass it.
    reduced = np.zeros((len(table), min(FPS_DIMS, desc.shape[1])), np.float32)
    reduced[candidates] = principal_components(desc[candidates])[:, : reduced.shape[1]]
    for i in order:
        s = int(table.segment_of[i])
        t = float(table.timestamp[i])
        times = accepted_times.setdefault(s, [])
        ids = accepted_ids.setdefault(s, [])
        lo = bisect.bisect_left(times, t - config.duplicate_window_s)
        hi = bisect.bisect_right(times, t + config.duplicate_window_s)
        near_arr = np.asarray(ids[lo:hi], np.int64)
        has_gps = use_gps and math.isfinite(east[i])
        if has_gps:
            cx, cy = _gps_cell(east[i], north[i], config.duplicate_radius_m)
            around = [j for dx in (-1, 0, 1) for dy in (-1, 0, 1) for j in cells.get((cx + dx, cy + dy), ())]
            if around:
                around_arr = np.asarray(around, np.int64)
                d2_m = (east[around_arr] - east[i]) ** 2 + (north[around_arr] - north[i]) ** 2
                near_arr = np.concatenate([near_arr, around_arr[d2_m <= radius_sq]])
        if near_arr.size:
            near_arr = near_arr[((reduced[near_arr] - reduced[i]) ** 2).sum(axis=1) < threshold_sq]
        if near_arr.size:
            d2 = ((desc[near_arr] - desc[i]) ** 2).sum(axis=1)
            k = int(np.argmin(d2))
            if d2[k] < threshold_sq:
                j = int(near_arr[k])
                table.reason[i] = "duplicate"
                table.duplicate_of[i] = j
                table.detail[i] = f"descriptor distance {math.sqrt(float(d2[k])):.3f} to {table.frame_id(j)}"
                continue
        pos = bisect.bisect_right(times, t)
        times.insert(pos, t)
        ids.insert(pos, int(i))
        if has_gps:
            cells.setdefault(_gps_cell(east[i], north[i], config.duplicate_radius_m), []).append(int(i))


def select_spread(
    descriptors: np.ndarray,
    target: int | None,
    *,
    seed: int = 0,
    east: np.ndarray | None = None,
    north: np.ndarray | None = None,
    min_spacing_m: float = 0.0,
    groups: np.ndarray | None = None,
    times: np.ndarray | None = None,
    min_interval_s: float = 0.0,
) -> tuple[list[int], np.ndarray, list[str]]:
    """Farthest-point sampling of up to ``target`` rows of ``descriptors`` (all when None).

    The first pick is drawn with ``seed``; each next pick is the row farthest (Euclidean)
    from every pick so far. A pick blocks the rows within ``min_spacing_m`` of it in
    (``east``, ``north``) metres (NaN positions are never blocked) and the rows of the same
    ``groups`` value within ``min_interval_s`` of it in ``times``. Returns (picks in order,
    the pick that blocked each row or -1, and why: 'spacing' / 'interval' / '').
    """
    desc = np.asarray(descriptors, np.float32)
    n = len(desc)
    blocked_by = np.full(n, -1, np.int64)
    why = [""] * n
    if n == 0 or (target is not None and target <= 0):
        return [], blocked_by, why
    spacing = min_spacing_m > 0 and east is not None and north is not None
    interval = min_interval_s > 0 and groups is not None and times is not None
    if target is None and not spacing and not interval:
        return list(range(n)), blocked_by, why
    rng = np.random.default_rng(seed)
    spacing_sq = min_spacing_m**2
    sq = np.einsum("ij,ij->i", desc, desc)
    nearest = np.full(n, np.inf, np.float32)
    available = np.ones(n, bool)
    picks: list[int] = []
    pick = int(rng.integers(n))
    limit = n if target is None else min(target, n)
    while True:
        picks.append(pick)
        available[pick] = False
        d2 = sq + sq[pick] - 2.0 * (desc @ desc[pick])
        np.minimum(nearest, d2, out=nearest)
        if spacing:
            with np.errstate(invalid="ignore"):
                close = available & ((east - east[pick]) ** 2 + (north - north[pick]) ** 2 < spacing_sq)
            for j in np.flatnonzero(close):
                blocked_by[j], why[j] = pick, "spacing"
            available &= ~close
        if interval:
            close = available & (groups == groups[pick]) & (np.abs(times - times[pick]) < min_interval_s)
            for j in np.flatnonzero(close):
                blocked_by[j], why[j] = pick, "interval"
            available &= ~close
        if len(picks) >= limit or not available.any():
            break
        pick = int(np.argmax(np.where(available, nearest, -np.inf)))
    return picks, blocked_by, why


def check_depth(table: FrameTable, frames: Sequence[int], config: CurateConfig, *, progress: bool = False) -> list[int]:
    """Decode the depth of ``frames``; mark and return the ones that are unreadable or lack valid depth."""
    depth_paths = [(table.paths(i)[1], table.depth_encoding(i)) for i in frames]
    results = parallel_map(depth_valid_fraction, depth_paths, workers=config.workers, progress=progress, desc="depth")
    failed = []
    for i, (valid, error) in zip(frames, results):
        table.depth_valid[i] = valid
        if error is not None:
            table.reason[i], table.detail[i] = "unreadable", error
            failed.append(int(i))
        elif valid < config.min_depth_valid:
            table.reason[i] = "no_depth"
            table.detail[i] = f"{100 * valid:.1f} % valid depth pixels < {100 * config.min_depth_valid:g} %"
            failed.append(int(i))
    return failed


def select_frames(table: FrameTable, config: CurateConfig, *, progress: bool = False) -> dict:
    """Run blur, duplicate, variety and depth selection on a scored table; returns step timings.

    Depth is decoded only for the frames farthest-point sampling picks (the PNG decode is the
    expensive part); a pick without usable depth is dropped, hands its place back to its
    duplicates, and the sampling runs again without it until every pick has depth.
    """
    timings = {"blur_s": 0.0, "duplicates_s": 0.0, "select_s": 0.0, "depth_s": 0.0}
    t0 = time.perf_counter()
    east, north, _ = local_enu(table.latitude, table.longitude)
    mark_blurry(table, config)
    timings["blur_s"] = time.perf_counter() - t0
    target = config.target(len(table))
    while True:
        t0 = time.perf_counter()
        mark_duplicates(table, config, east, north)
        t1 = time.perf_counter()
        candidates = np.array([i for i in range(len(table)) if table.reason[i] == ""], np.int64)
        picks, blocked_by, why = select_spread(
            principal_components(table.descriptors[candidates]),
            target,
            seed=config.seed,
            east=east[candidates],
            north=north[candidates],
            min_spacing_m=config.min_spacing_m,
            groups=table.segment_of[candidates],
            times=table.timestamp[candidates],
            min_interval_s=config.min_interval_s,
        )
        t2 = time.perf_counter()
        timings["duplicates_s"] += t1 - t0
        timings["select_s"] += t2 - t1
        if not config.check_depth:
            break
        todo = [int(candidates[k]) for k in picks if not math.isfinite(table.depth_valid[candidates[k]])]
        failed = set(check_depth(table, todo, config, progress=progress))
        timings["depth_s"] += time.perf_counter() - t2
        if not failed:
            break
        for i in range(len(table)):
            if table.reason[i] == "duplicate" and int(table.duplicate_of[i]) in failed:
                table.reason[i], table.detail[i], table.duplicate_of[i] = "", "", -1

    picked = set(picks)
    for k, i in enumerate(candidates):
        if k in picked:
            table.reason[i] = "kept"
            continue
        table.reason[i] = "not_selected"
        if why[k] == "spacing":
            j = int(candidates[blocked_by[k]])
            dist = math.hypot(east[i] - east[j], north[i] - north[j])
            table.detail[i] = f"{dist:.2f} m from kept {table.frame_id(j)} (< {config.min_spacing_m:g} m)"
        elif why[k] == "interval":
            j = int(candidates[blocked_by[k]])
            gap = abs(table.timestamp[i] - table.timestamp[j])
            table.detail[i] = f"{gap:.2f} s from kept {table.frame_id(j)} (< {config.min_interval_s:g} s)"
        else:
            table.detail[i] = f"target of {target} frames reached"
    return timings
