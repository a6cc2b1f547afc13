"""Stream triggers: decide, frame by frame on the rover, which camera frames are worth keeping for training.

Four scores per frame (no ROS here; ``trigger_node`` is the thin node over this module, and
``experiments/triggers.py`` runs the same code offline over a recording):

- sharpness: variance of the Laplacian (:func:`forest_perception.image_scores.sharpness`, the function curation
  uses), compared with the running median of the last ``sharpness_window`` frames: a frame below
  ``blur_ratio`` times that median (or below ``min_laplacian``) is blurry and never kept;
- novelty: Euclidean distance of the frame's embedding to the nearest of the last ``memory`` kept frames'
  embeddings (unit-norm vectors, distances in [0, 2]). The embedding (``embedding``) is the curation
  descriptor of the colour image (``colour``), a 16x12 thumbnail of the log predicted depth (``depth``: the
  depth network's view of the scene's layout; the measured depth, holes filled with the frame's farthest
  valid depth, when no prediction came), or both halves together (``colour+depth``, the default);
- disagreement: AbsRel of the predicted depth (``depth/image``) against the measured depth
  (``camera/depth/image_raw``) over the pixels valid in both; high = the network is wrong there;
- GPS spacing: horizontal ENU distance (about the first fix) from where the last frame was kept.

Combination (:meth:`FrameTrigger.decide`), in this order: blurry -> skip; closer than ``1 / max_keep_rate_hz``
to the last kept frame -> skip (``rate``); nearer than ``duplicate_distance`` to a kept embedding -> skip
(``repeated``, whatever else fires); else keep when any of ``first`` (nothing kept yet), ``novel`` (distance
>= ``novelty_distance``), ``disagreement`` (AbsRel >= ``disagreement_absrel``), ``spacing`` (moved >=
``spacing_m``) or ``gap`` (nothing kept for ``max_gap_s``: the minimum keep rate) fires; otherwise skip
(``redundant``). So: keep if sharp AND under the rate cap AND not a repeat AND (novel OR disagreeing OR spaced
OR overdue). Every decision says why, and :class:`TriggerStats` counts the reasons.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass, field, fields

import cv2
import numpy as np

from forest_perception.geo import geodetic_to_enu, validate_lat_lon
from forest_perception.image_scores import frame_descriptor, sharpness
from forest_perception.readings import GpsFix

EMBEDDINGS = ("colour+depth", "colour", "depth")
"""What a frame's novelty is measured on (see the module docstring)."""
KEEP_REASONS = ("first", "novel", "disagreement", "spacing", "gap")
SKIP_REASONS = ("blurry", "rate", "repeated", "redundant")
DEPTH_THUMB = (16, 12)
"""Predicted-depth thumbnail of the ``depth`` embedding, (width, height)."""
_NO_FIX = -1  # sensor_msgs/NavSatStatus.STATUS_NO_FIX


@dataclass(frozen=True)
class TriggerConfig:
    """Thresholds of the triggers and the combination rule (defaults: docs/nodes.md, trigger_node)."""

    blur_ratio: float = 0.35
    """blurry below this fraction of the running median Laplacian variance (0 = off)"""
    min_laplacian: float = 0.0
    """blurry below this Laplacian variance whatever the median (0 = off)"""
    sharpness_window: int = 30
    """frames in the running sharpness median"""
    embedding: str = "colour+depth"
    """``colour``, ``depth`` or ``colour+depth``"""
    novelty_distance: float = 0.4
    """novel when the nearest kept embedding is at least this far (embeddings are unit vectors: 0..2)"""
    duplicate_distance: float = 0.08
    """a repeated view, never kept, when a kept embedding is nearer than this"""
    memory: int = 200
    """kept embeddings remembered (the last ones)"""
    disagreement_absrel: float = 0.4
    """keep when predicted vs measured depth AbsRel reaches this (0 = off)"""
    min_valid_fraction: float = 0.05
    """pixels valid in both depths below this fraction: disagreement unknown"""
    spacing_m: float = 5.0
    """keep when moved this far (GPS, horizontal) since the last kept frame (0 = off)"""
    max_keep_rate_hz: float = 2.0
    """at most this many kept frames per second of stamps (0 = no cap)"""
    max_gap_s: float = 10.0
    """keep a sharp, non-repeated frame when none was kept for this long (0 = off)"""

    def validate(self) -> TriggerConfig:
        """Raise ``ValueError`` naming the first field out of its range."""
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {', '.join(EMBEDDINGS)}, got {self.embedding!r}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "embedding":
                continue
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{f.name} must be a finite number >= 0, got {value!r}")
        if self.sharpness_window < 1 or self.memory < 1:
            raise ValueError(f"sharpness_window and memory must be >= 1, got {self.sharpness_window}, {self.memory}")
        if not self.blur_ratio <= 1.0 or not self.min_valid_fraction <= 1.0:
            raise ValueError(f"blur_ratio and min_valid_fraction must be within [0, 1], got {self.blur_ratio}, "
                             f"{self.min_valid_fraction}")
        if self.duplicate_distance > self.novelty_distance:
            raise ValueError(f"duplicate_distance ({self.duplicate_distance}) must not exceed novelty_distance "
                             f"({self.novelty_distance})")
        return self


@dataclass(frozen=True)
class TriggerFrame:
    """One camera frame set: colour, the measured and (optionally) predicted depth, the latest GPS fix."""

    stamp_s: float
    rgb: np.ndarray
    """HxWx3 uint8, RGB order"""
    measured_depth: np.ndarray | None = None
    """HxW metres, NaN (or 0) = invalid, aligned to the colour image"""
    predicted_depth: np.ndarray | None = None
    """HxW metres from the depth network (``depth/image``), NaN = invalid"""
    gps: GpsFix | None = None


@dataclass(frozen=True)
class FrameScores:
    """What :func:`score_frame` measures of a frame; NaN where it could not be measured."""

    stamp_s: float
    laplacian: float
    embedding: np.ndarray
    disagreement: float = math.nan
    """AbsRel of predicted against measured depth"""
    latitude: float = math.nan
    longitude: float = math.nan


@dataclass(frozen=True)
class TriggerDecision:
    """Keep or skip, why, and the scores behind it."""

    keep: bool
    reasons: tuple[str, ...]
    """the keep reasons that fired (keep) or the one skip reason (skip)"""
    scores: FrameScores
    sharpness_median: float
    novelty: float
    """distance to the nearest kept embedding (inf when nothing is kept yet)"""
    moved_m: float
    """horizontal metres since the last kept frame (NaN without GPS)"""


@dataclass
class TriggerStats:
    """Counters of a trigger's decisions: frames seen, kept and skipped by reason, malformed frames refused."""

    frames: int = 0
    kept: int = 0
    malformed: int = 0
    kept_by: Counter = field(default_factory=Counter)
    skipped_by: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, int]:
        """Flat counters (``kept``, ``kept novel``, ``skipped blurry``, ...) for /diagnostics and reports."""
        out = {"frames": self.frames, "kept": self.kept, "skipped": self.frames - self.kept,
               "malformed": self.malformed}
        out.update({f"kept {r}": int(self.kept_by.get(r, 0)) for r in KEEP_REASONS})
        out.update({f"skipped {r}": int(self.skipped_by.get(r, 0)) for r in SKIP_REASONS})
        return out


# ---------------------------------------------------------------------------------------------- scores


def _image(array: object, name: str) -> np.ndarray:
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3 \
            or array.size == 0:
        shape, dtype = getattr(array, "shape", None), getattr(array, "dtype", type(array).__name__)
        raise ValueError(f"{name} must be a non-empty HxWx3 uint8 RGB image, got shape {shape} dtype {dtype}")
    return array


def _depth(array: object, name: str, hw: tuple[int, int]) -> np.ndarray:
    if not isinstance(array, np.ndarray) or array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        shape, dtype = getattr(array, "shape", None), getattr(array, "dtype", type(array).__name__)
        raise ValueError(f"{name} must be an HxW float depth image in metres, got shape {shape} dtype {dtype}")
    if array.shape != hw:
        raise ValueError(f"{name} is {array.shape[1]}x{array.shape[0]}, the colour image {hw[1]}x{hw[0]}: "
                         "depth must be aligned to colour")
    return array


def depth_disagreement(predicted: np.ndarray, measured: np.ndarray, min_valid_fraction: float = 0.05) -> float:
    """AbsRel ``mean(|predicted - measured| / measured)`` over pixels valid (finite, > 0) in both; NaN when fewer
    than ``min_valid_fraction`` of the pixels are."""
    valid = np.isfinite(predicted) & np.isfinite(measured) & (measured > 0) & (predicted > 0)
    count = int(np.count_nonzero(valid))
    if count == 0 or count < min_valid_fraction * valid.size:
        return math.nan
    m = measured[valid]
    return float(np.mean(np.abs(predicted[valid] - m) / m))


def depth_embedding(depth: np.ndarray) -> np.ndarray:
    """Unit-norm float32 16x12 thumbnail of log depth, mean removed (the layout of the scene, not its scale);
    invalid pixels take the frame's farthest valid depth (sky, beyond range). Zeros when nothing is valid."""
    valid = np.isfinite(depth) & (depth > 0)
    if not valid.any():
        return np.zeros(DEPTH_THUMB[0] * DEPTH_THUMB[1], np.float32)
    filled = np.where(valid, depth, np.float32(np.max(depth[valid]))).astype(np.float32)
    thumb = cv2.resize(np.log(filled), DEPTH_THUMB, interpolation=cv2.INTER_AREA).ravel()
    thumb -= thumb.mean()
    norm = float(np.linalg.norm(thumb))
    return (thumb / norm).astype(np.float32) if norm > 1e-6 else np.zeros_like(thumb)


def score_frame(frame: TriggerFrame, config: TriggerConfig) -> FrameScores:
    """Sharpness, embedding, disagreement and GPS position of one frame; ``ValueError`` on malformed input."""
    stamp = float(frame.stamp_s)
    if not math.isfinite(stamp):
        raise ValueError(f"stamp must be finite, got {frame.stamp_s!r}")
    rgb = _image(frame.rgb, "rgb")
    hw = rgb.shape[:2]
    measured = _depth(frame.measured_depth, "measured depth", hw) if frame.measured_depth is not None else None
    predicted = _depth(frame.predicted_depth, "predicted depth", hw) if frame.predicted_depth is not None else None
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    laplacian, _ = sharpness(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))
    parts = []
    if config.embedding in ("colour", "colour+depth"):
        parts.append(frame_descriptor(bgr))
    if config.embedding in ("depth", "colour+depth"):
        source = predicted if predicted is not None else measured
        parts.append(depth_embedding(source) if source is not None
                     else np.zeros(DEPTH_THUMB[0] * DEPTH_THUMB[1], np.float32))
    embedding = parts[0] if len(parts) == 1 else np.concatenate(parts) * np.float32(math.sqrt(0.5))
    disagreement = math.nan
    if predicted is not None and measured is not None:
        disagreement = depth_disagreement(predicted, measured, config.min_valid_fraction)
    lat = lon = math.nan
    gps = frame.gps
    if gps is not None and (gps.status is None or gps.status > _NO_FIX):
        validate_lat_lon(gps.latitude, gps.longitude, prefix="gps ")
        lat, lon = float(gps.latitude), float(gps.longitude)
    return FrameScores(stamp, float(laplacian), embedding.astype(np.float32), disagreement, lat, lon)


# ---------------------------------------------------------------------------------------------- decision


class FrameTrigger:
    """Stateful keep/skip decisions over one stream of frames (one rover's camera), with counters."""

    def __init__(self, config: TriggerConfig | None = None) -> None:
        self.config = (config or TriggerConfig()).validate()
        self.stats = TriggerStats()
        self._sharpness: deque[float] = deque(maxlen=self.config.sharpness_window)
        self._kept: deque[np.ndarray] = deque(maxlen=self.config.memory)
        self._last_kept_s: float | None = None
        self._last_kept_enu: tuple[float, float] | None = None
        self._datum: tuple[float, float] | None = None
        self._last_stamp_s: float | None = None

    def reset(self) -> None:
        """Forget everything kept (a new drive); the counters stay."""
        self._sharpness.clear()
        self._kept.clear()
        self._last_kept_s = self._last_kept_enu = self._datum = self._last_stamp_s = None

    def reconfigure(self, config: TriggerConfig) -> None:
        """Use new thresholds from the next frame on, keeping what was kept (the last ``memory`` of it)."""
        self.config = config.validate()
        self._sharpness = deque(self._sharpness, maxlen=config.sharpness_window)
        self._kept = deque(self._kept, maxlen=config.memory)

    @property
    def kept_embeddings(self) -> int:
        """How many kept embeddings novelty is measured against now."""
        return len(self._kept)

    def decide(self, frame: TriggerFrame) -> TriggerDecision:
        """Score ``frame`` and decide; a malformed frame raises ``ValueError`` (counted as ``malformed``)."""
        try:
            scores = score_frame(frame, self.config)
        except ValueError:
            self.stats.malformed += 1
            raise
        return self.decide_scores(scores)

    def _enu(self, scores: FrameScores) -> tuple[float, float] | None:
        if not (math.isfinite(scores.latitude) and math.isfinite(scores.longitude)):
            return None
        if self._datum is None:
            self._datum = (scores.latitude, scores.longitude)
        e, n, _ = geodetic_to_enu(scores.latitude, scores.longitude, 0.0, self._datum[0], self._datum[1], 0.0)
        return float(e), float(n)

    def decide_scores(self, scores: FrameScores) -> TriggerDecision:
        """Decide on scores already measured (:func:`score_frame`); updates the memory and the counters."""
        c = self.config
        if self._last_stamp_s is not None and scores.stamp_s < self._last_stamp_s - 1.0:
            self._last_kept_s = None  # time went back (a bag played again, a restarted simulation): no rate history
        self._last_stamp_s = scores.stamp_s
        self._sharpness.append(scores.laplacian)
        median = float(np.median(self._sharpness))
        if self._kept:
            novelty = float(np.min(np.linalg.norm(np.stack(self._kept) - scores.embedding, axis=1)))
        else:
            novelty = math.inf
        enu = self._enu(scores)
        moved = math.hypot(enu[0] - self._last_kept_enu[0], enu[1] - self._last_kept_enu[1]) \
            if enu is not None and self._last_kept_enu is not None else math.nan
        since = scores.stamp_s - self._last_kept_s if self._last_kept_s is not None else math.inf

        skip = ""
        if scores.laplacian < c.min_laplacian or scores.laplacian < c.blur_ratio * median:
            skip = "blurry"
        elif c.max_keep_rate_hz > 0 and since < 1.0 / c.max_keep_rate_hz:
            skip = "rate"
        elif novelty < c.duplicate_distance:
            skip = "repeated"
        reasons: tuple[str, ...] = ()
        if not skip:
            fired = {
                "first": not self._kept,
                "novel": novelty >= c.novelty_distance,
                "disagreement": c.disagreement_absrel > 0 and scores.disagreement >= c.disagreement_absrel,
                "spacing": c.spacing_m > 0 and (moved >= c.spacing_m
                                                or (enu is not None and self._last_kept_enu is None)),
                "gap": c.max_gap_s > 0 and since >= c.max_gap_s,
            }
            reasons = tuple(r for r in KEEP_REASONS if fired[r])
            skip = "" if reasons else "redundant"

        self.stats.frames += 1
        if skip:
            self.stats.skipped_by[skip] += 1
            return TriggerDecision(False, (skip,), scores, median, novelty, moved)
        self.stats.kept += 1
        self.stats.kept_by.update(reasons)
        self._kept.append(scores.embedding)
        self._last_kept_s = scores.stamp_s
        if enu is not None:
            self._last_kept_enu = enu
        return TriggerDecision(True, reasons, scores, median, novelty, moved)
