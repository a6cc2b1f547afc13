"""Curate a forest dataset: keep sharp, distinct, spread-out frames and say why each was kept or dropped.

The low-viewpoint forest dataset kept ~9,700 of >100k recorded pairs, chosen for sharpness and
variety; this module does that selection for any dataset in the ``Run-N/<segment>/`` layout
(``forest_perception.dataset_tools.layout``). Five steps, every one deterministic for a seed:

1. **Score** every frame (one thread per core; PNG decoding dominates, and releases the GIL): variance
   of the Laplacian and Tenengrad (mean squared Sobel gradient) of the grayscale image, and a
   compact descriptor (``frame_descriptor``: a softened 16x12 grayscale thumbnail, zero-mean
   and unit-norm, plus a hue x saturation histogram, Hellinger-normalised). The depth PNG's
   header is checked (present, 16-bit single-channel, same size as the RGB); a frame that
   fails is ``unreadable``.
2. **Blur**: a frame is ``blurry`` when its sharpness ratio -- the geometric mean of its
   Laplacian variance and Tenengrad, each divided by the ``blur_percentile`` of its
   +-``blur_window`` neighbours in the same segment -- is below ``blur_ratio``, or when it is
   under an absolute floor (``min_laplacian``, ``min_tenengrad``). Motion blur on a bumpy
   track is transient, so a frame is judged against the frames around it, not against
   another forest.
3. **Duplicates**: greedy non-maximum suppression in order of sharpness: a frame whose
   descriptor lies within ``duplicate_distance`` of an already accepted frame in its
   neighbourhood -- the same segment within ``duplicate_window_s`` seconds, or, with GPS,
   any segment within ``duplicate_radius_m`` metres -- is a ``duplicate`` of it, so the
   sharpest frame of a cluster survives.
4. **Variety**: farthest-point sampling over the descriptors (their leading principal
   components) picks ``count`` frames (or ``fraction`` of the input), starting from a seeded
   random frame; a pick blocks the frames within ``min_spacing_m`` metres of it along the GPS
   track and the frames of its segment within ``min_interval_s`` seconds. Frames left over
   are ``not_selected``.
5. **Depth** of the picks is decoded (only theirs: decoding is the expensive part); a pick
   with less than ``min_depth_valid`` valid depth pixels is ``no_depth``, hands its place
   back to its duplicates, and the sampling runs again without it.

``curate`` writes a new dataset in the same layout with only the kept frames (hard links
where the file system allows, copies otherwise; the original ``metadata.csv`` rows are kept
verbatim), plus ``curation.csv`` (one row per input frame: scores, duplicate-of, kept,
reason, detail) and ``curation.json`` (summary). The output is built in a hidden staging
folder and renamed into place at the end, so a failure leaves nothing behind; the input is
only read.

This module is a pure core (numpy, OpenCV, pymap3d, standard library), never rclpy.
"""

from __future__ import annotations

import bisect
import csv
import io
import json
import math
import os
import shutil
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from forest_perception.dataset_tools.layout import (
    DEPTH_DIR,
    METADATA_FILE,
    RGB_DIR,
    Segment,
    iter_segments,
    run_dir_name,
)

CURATION_CSV = "curation.csv"
CURATION_JSON = "curation.json"

REASONS = ("kept", "unreadable", "blurry", "duplicate", "not_selected", "no_depth")
"""Why a frame was kept or dropped, in the order the steps run."""

CURATION_COLUMNS = (
    "run",
    "segment",
    "stem",
    "timestamp",
    "latitude",
    "longitude",
    "laplacian_var",
    "tenengrad",
    "sharpness_ratio",
    "depth_valid",
    "duplicate_of",
    "kept",
    "reason",
    "detail",
)
"""Columns of ``curation.csv``."""

THUMB_SIZE = (16, 12)
"""Grayscale thumbnail of the descriptor, (width, height)."""
HIST_BINS = (9, 4)
"""Hue x saturation bins of the descriptor's colour histogram."""
DESCRIPTOR_SIZE = THUMB_SIZE[0] * THUMB_SIZE[1] + HIST_BINS[0] * HIST_BINS[1]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOUR_TYPES = {0: "grayscale", 2: "RGB", 3: "palette", 4: "grayscale+alpha", 6: "RGBA"}


# --------------------------------------------------------------------------- PNG header


@dataclass(frozen=True)
class PngInfo:
    """What a PNG's IHDR chunk says: size, bit depth per channel and colour type."""

    width: int
    height: int
    bit_depth: int
    colour_type: int

    @property
    def channels(self) -> int:
        """Channels of the decoded image (palette counts as 3)."""
        return {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}.get(self.colour_type, 0)

    @property
    def is_rgb8(self) -> bool:
        """8-bit colour (RGB or RGBA), what an RGB frame must be."""
        return self.bit_depth == 8 and self.colour_type in (2, 6)

    @property
    def is_depth16(self) -> bool:
        """16-bit single channel, what a millimetre depth frame must be."""
        return self.bit_depth == 16 and self.colour_type == 0

    def describe(self) -> str:
        """E.g. '640x480 8-bit RGB'."""
        kind = _PNG_COLOUR_TYPES.get(self.colour_type, f"colour type {self.colour_type}")
        return f"{self.width}x{self.height} {self.bit_depth}-bit {kind}"


def png_info(path: str | os.PathLike) -> PngInfo:
    """Read a PNG's header (33 bytes) without decoding it.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file for
    anything that is not a PNG.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(33)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a directory, not a PNG file") from None
    if len(head) < 33 or not head.startswith(_PNG_SIGNATURE) or head[12:16] != b"IHDR":
        raise ValueError(f"{path} is not a PNG file ({len(head)} header bytes, no PNG signature/IHDR)")
    width, height, bit_depth, colour_type = struct.unpack(">IIBB", head[16:26])
    return PngInfo(width, height, bit_depth, colour_type)


# --------------------------------------------------------------------------- parallel map


def default_workers() -> int:
    """CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def parallel_map(
    fn: Callable,
    items: Sequence,
    *,
    workers: int | None = None,
    progress: bool = False,
    desc: str = "",
    min_parallel: int = 16,
) -> list:
    """``[fn(x) for x in items]`` on ``workers`` threads (order kept), with an optional tqdm bar.

    Meant for per-frame work that spends its time in OpenCV and numpy, which release the GIL
    (PNG decoding, filters), so threads use every core without the start-up, pickling and
    ``__main__``-guard pitfalls of a process pool. OpenCV's own thread pool is set to one
    thread meanwhile (restored afterwards) so the two do not oversubscribe the cores. Runs
    in the calling thread for one worker or fewer than ``min_parallel`` items.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    workers = default_workers() if workers is None else int(workers)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    bar = tqdm(total=len(items), desc=desc, unit="frame", disable=not progress, mininterval=1.0)
    out = []
    try:
        if workers == 1 or len(items) < min_parallel:
            for item in items:
                out.append(fn(item))
                bar.update()
            return out
        cv_threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="curate") as pool:
                for result in pool.map(fn, items):
                    out.append(result)
                    bar.update()
        finally:
            cv2.setNumThreads(cv_threads)
        return out
    finally:
        bar.close()


# --------------------------------------------------------------------------- geometry


def local_enu(
    latitude: np.ndarray, longitude: np.ndarray, origin: tuple[float, float] | None = None
) -> tuple[np.ndarray, np.ndarray, tuple[float, float] | None]:
    """East and north metres of WGS84 fixes in a local tangent plane (NaN in, NaN out).

    ``origin`` (latitude, longitude) defaults to the first finite fix; returns (east, north,
    origin), origin None when there is no fix at all.
    """
    import pymap3d

    lat = np.asarray(latitude, np.float64)
    lon = np.asarray(longitude, np.float64)
    finite = np.isfinite(lat) & np.isfinite(lon)
    if origin is None:
        if not finite.any():
            return np.full(lat.shape, np.nan), np.full(lat.shape, np.nan), None
        first = int(np.argmax(finite))
        origin = (float(lat[first]), float(lon[first]))
    east, north, _ = pymap3d.geodetic2enu(lat, lon, 0.0, origin[0], origin[1], 0.0)
    return np.asarray(east, np.float64), np.asarray(north, np.float64), origin


# --------------------------------------------------------------------------- per-frame scores


def sharpness(gray: np.ndarray) -> tuple[float, float]:
    """(variance of the Laplacian, Tenengrad = mean squared 3x3 Sobel gradient) of a uint8 gray image."""
    if gray.dtype != np.uint8 or gray.ndim != 2:
        raise ValueError(f"sharpness needs an HxW uint8 grayscale image, got shape {gray.shape} dtype {gray.dtype}")
    _, std = cv2.meanStdDev(cv2.Laplacian(gray, cv2.CV_16S))
    gx = cv2.Sobel(gray, cv2.CV_16S, 1, 0)
    gy = cv2.Sobel(gray, cv2.CV_16S, 0, 1)
    tenengrad = (cv2.norm(gx, cv2.NORM_L2SQR) + cv2.norm(gy, cv2.NORM_L2SQR)) / gray.size
    return float(std[0, 0] ** 2), float(tenengrad)


def frame_descriptor(bgr: np.ndarray) -> np.ndarray:
    """Unit-norm ``float32`` descriptor of an 8-bit colour image (OpenCV BGR order).

    Half its energy is a 16x12 grayscale thumbnail of the softened image (zero mean, unit
    norm: the layout of the view, indifferent to exposure and to a shift of a few pixels),
    half a 9x4 hue x saturation histogram (square root of the frequencies, the Hellinger
    embedding: the colours, indifferent to brightness). The Euclidean distance of two
    descriptors is within [0, 2]: ~0.02 for the same view with sensor noise or another
    exposure, ~0.3 for views 0.1 m apart, ~0.8 for views across a forest.
    """
    if bgr.dtype != np.uint8 or bgr.ndim != 3 or bgr.shape[2] != 3:
        raise ValueError(f"frame_descriptor needs an HxWx3 uint8 image, got shape {bgr.shape} dtype {bgr.dtype}")
    small = cv2.resize(bgr, (THUMB_SIZE[0] * 4, THUMB_SIZE[1] * 4), interpolation=cv2.INTER_AREA)
    gray = cv2.GaussianBlur(cv2.cvtColor(small, cv2.COLOR_BGR2GRAY).astype(np.float32), (0, 0), 2.0)
    thumb = cv2.resize(gray, THUMB_SIZE, interpolation=cv2.INTER_AREA).ravel()
    thumb -= thumb.mean()
    norm = float(np.linalg.norm(thumb))
    thumb = thumb / norm if norm > 1e-3 else np.zeros_like(thumb)
    hsv = cv2.cvtColor(small, cv2.COLOR_BGR2HSV)
    hist = cv2.calcHist([hsv], [0, 1], None, list(HIST_BINS), [0, 180, 0, 256]).ravel()
    hist = np.sqrt(hist / max(float(hist.sum()), 1.0))
    return (np.concatenate([thumb, hist]) * np.float32(math.sqrt(0.5))).astype(np.float32)


def _score_frame(paths: tuple[str, str]) -> tuple:
    """Worker: (laplacian_var, tenengrad, descriptor or None, error or None) of one frame."""
    rgb_path, depth_path = paths
    try:
        rgb_info = png_info(rgb_path)
        if not rgb_info.is_rgb8:
            raise ValueError(f"RGB image {rgb_path} must be an 8-bit colour PNG, got {rgb_info.describe()}")
        depth_info = png_info(depth_path)
        if not depth_info.is_depth16:
            raise ValueError(
                f"depth image {depth_path} must be a 16-bit single-channel PNG (millimetres), "
                f"got {depth_info.describe()}"
            )
        if (depth_info.width, depth_info.height) != (rgb_info.width, rgb_info.height):
            raise ValueError(
                f"depth image {depth_path} is {depth_info.width}x{depth_info.height}, "
                f"its RGB image is {rgb_info.width}x{rgb_info.height}"
            )
        bgr = cv2.imread(rgb_path, cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"RGB image {rgb_path} could not be decoded (corrupt PNG data)")
        lap, ten = sharpness(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))
        return lap, ten, frame_descriptor(bgr), None
    except (OSError, ValueError, cv2.error) as exc:
        return math.nan, math.nan, None, str(exc)


def _depth_valid(depth_path: str) -> tuple[float, str | None]:
    """Worker: (fraction of valid depth pixels, error or None) of one depth PNG."""
    raw = cv2.imread(depth_path, cv2.IMREAD_UNCHANGED)
    if raw is None:
        return math.nan, f"depth image {depth_path} could not be decoded (corrupt PNG data)"
    if raw.dtype != np.uint16 or raw.ndim != 2:
        return math.nan, f"depth image {depth_path} decoded as shape {raw.shape} dtype {raw.dtype}, not 16-bit"
    return cv2.countNonZero(raw) / raw.size, None


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class CurateConfig:
    """How to curate; see the module docstring for what each step does."""

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

    @property
    def kept(self) -> np.ndarray:
        """Boolean mask of the kept frames."""
        return np.array([r == "kept" for r in self.reason], bool)


def segment_key(segment: Segment) -> str:
    """``Run-N/<segment>``, the dataset-relative name of a segment."""
    run = run_dir_name(segment.run) if segment.run is not None else segment.path.parent.name
    return f"{run}/{segment.name}"


def frame_table(segments: Sequence[Segment]) -> FrameTable:
    """A ``FrameTable`` of the frames of ``segments`` (metadata only; nothing is decoded)."""
    seg_of, idx, ts, lat, lon = [], [], [], [], []
    for s, segment in enumerate(segments):
        for j, frame in enumerate(segment.frames):
            seg_of.append(s)
            idx.append(j)
            ts.append(frame.timestamp)
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


# --------------------------------------------------------------------------- score cache

SCORES_FILE = "frame_scores.npz"
"""Per-segment cache of sharpness and descriptors, written by ``forest-dataset extract`` (and by
``curate`` for its output): decoding the RGB PNG is most of what scoring costs, and the tool that
wrote the PNG had the pixels in memory anyway."""


def frame_scores(rgb: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(laplacian_var, tenengrad, descriptor) of an HxWx3 uint8 RGB frame, exactly as scoring its PNG gives."""
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    lap, ten = sharpness(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))
    return lap, ten, frame_descriptor(bgr)


def _file_key(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def write_score_cache(segment_dir: str | os.PathLike, rows: Sequence[tuple[str, float, float, np.ndarray]]) -> Path:
    """Write ``SCORES_FILE`` for ``(stem, laplacian, tenengrad, descriptor)`` rows of a segment (atomically).

    Each row is tied to its RGB file's size and mtime: a frame whose PNG changed later is scored again.
    """
    segment_dir = Path(segment_dir)
    keys = [_file_key(segment_dir / RGB_DIR / f"{stem}.png") for stem, *_ in rows]
    final = segment_dir / SCORES_FILE
    tmp = segment_dir / f".{SCORES_FILE}.tmp"
    with open(tmp, "wb") as f:
        np.savez(
            f,
            stems=np.array([r[0] for r in rows], dtype=str),
            size=np.array([k[0] for k in keys], np.int64),
            mtime_ns=np.array([k[1] for k in keys], np.int64),
            laplacian=np.array([r[1] for r in rows], np.float64),
            tenengrad=np.array([r[2] for r in rows], np.float64),
            descriptors=np.stack([r[3] for r in rows]).astype(np.float32)
            if rows else np.zeros((0, DESCRIPTOR_SIZE), np.float32),
        )
    os.replace(tmp, final)
    return final


def _read_score_cache(segment: Segment) -> dict[str, tuple[int, int, float, float, np.ndarray]]:
    """stem -> (size, mtime_ns, laplacian, tenengrad, descriptor); empty when absent or unreadable."""
    path = segment.path / SCORES_FILE
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as z:
            stems, size, mtime = z["stems"], z["size"], z["mtime_ns"]
            lap, ten, desc = z["laplacian"], z["tenengrad"], z["descriptors"]
            if desc.shape[1:] != (DESCRIPTOR_SIZE,) or not (len(stems) == len(size) == len(lap) == len(desc)):
                return {}
            return {str(st): (int(size[k]), int(mtime[k]), float(lap[k]), float(ten[k]), desc[k])
                    for k, st in enumerate(stems)}
    except (OSError, ValueError, KeyError):
        return {}  # a damaged cache is only a lost shortcut: score from the PNGs


def _cached_score(cache: dict, segment: Segment, j: int) -> tuple[float, float, np.ndarray] | None:
    entry = cache.get(segment.frames[j].stem)
    if entry is None:
        return None
    try:
        if _file_key(segment.rgb_path(j)) != entry[:2] or not segment.depth_path(j).is_file():
            return None
    except OSError:
        return None
    return entry[2], entry[3], entry[4]


def score_frames(
    table: FrameTable, *, workers: int | None = None, progress: bool = False, use_cache: bool = True
) -> int:
    """Fill sharpness and descriptors of every frame; mark frames that cannot be read ``unreadable``.

    Frames whose segment has a valid ``SCORES_FILE`` entry are taken from it without decoding;
    returns how many were.
    """
    todo: list[int] = []
    cached = 0
    caches = [_read_score_cache(seg) if use_cache else {} for seg in table.segments]
    for i in range(len(table)):
        s, j = int(table.segment_of[i]), int(table.index_in_segment[i])
        hit = _cached_score(caches[s], table.segments[s], j) if caches[s] else None
        if hit is None:
            todo.append(i)
            continue
        table.laplacian[i], table.tenengrad[i], table.descriptors[i] = hit
        cached += 1
    results = parallel_map(_score_frame, [table.paths(i) for i in todo], workers=workers, progress=progress,
                           desc="score")
    for i, (lap, ten, desc, error) in zip(todo, results):
        table.laplacian[i] = lap
        table.tenengrad[i] = ten
        if error is not None:
            table.reason[i] = "unreadable"
            table.detail[i] = error
        else:
            table.descriptors[i] = desc
    return cached


# --------------------------------------------------------------------------- selection steps


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
    results = parallel_map(
        _depth_valid, [table.paths(i)[1] for i in frames], workers=config.workers, progress=progress, desc="depth"
    )
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


# --------------------------------------------------------------------------- output


def _row_stem(cell: str) -> str:
    # Same rule as the layout reader: a path or a name with an image suffix names the stem.
    name = cell.strip().replace("\\", "/").rsplit("/", 1)[-1]
    for suffix in (".png", ".jpg", ".jpeg"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _filtered_metadata(segment: Segment, keep: set[str]) -> str:
    """``metadata.csv`` of ``segment`` with only the rows of the stems in ``keep``, cells unchanged."""
    text = (segment.path / METADATA_FILE).read_text(encoding="utf-8-sig")
    rows = list(csv.reader(io.StringIO(text, newline="")))
    stem_col = next(i for i, h in enumerate(rows[0]) if segment.column_map.get(h.strip()) == "stem")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(rows[0])
    for row in rows[1:]:
        if stem_col < len(row) and _row_stem(row[stem_col]) in keep:
            writer.writerow(row)
    return out.getvalue()


def _place(src: Path, dst: Path, link: bool) -> bool:
    """Hard-link (True) or copy (False) ``src`` to ``dst``."""
    if link:
        try:
            os.link(src, dst)
            return True
        except OSError:
            pass
    shutil.copy2(src, dst)
    return False


def _fmt(value: float, digits: int = 4) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


def curation_rows(table: FrameTable) -> list[list[str]]:
    """``curation.csv`` rows (without header), one per input frame in dataset order."""
    rows = []
    for i in range(len(table)):
        segment = table.segments[int(table.segment_of[i])]
        frame = segment.frames[int(table.index_in_segment[i])]
        dup = int(table.duplicate_of[i])
        rows.append(
            [
                "" if segment.run is None else str(segment.run),
                segment.name,
                frame.stem,
                repr(float(table.timestamp[i])),
                "" if not math.isfinite(table.latitude[i]) else repr(float(table.latitude[i])),
                "" if not math.isfinite(table.longitude[i]) else repr(float(table.longitude[i])),
                _fmt(table.laplacian[i], 6),
                _fmt(table.tenengrad[i], 6),
                _fmt(table.sharpness_ratio[i], 4),
                _fmt(table.depth_valid[i], 4),
                table.frame_id(dup) if dup >= 0 else "",
                "yes" if table.reason[i] == "kept" else "no",
                table.reason[i],
                table.detail[i],
            ]
        )
    return rows


def read_curation(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of a ``curation.csv`` as dicts (column -> cell); ``ValueError`` naming the file if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"curation file {path} does not exist")
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("run", "segment", "stem", "kept", "reason") if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path} is not a curation.csv: missing columns {missing}")
        return list(reader)


@dataclass
class CurationResult:
    """What ``curate`` did: the decisions, where they went and a JSON-ready summary."""

    table: FrameTable
    output: Path
    summary: dict

    def lines(self) -> list[str]:
        """Human-readable summary lines."""
        s = self.summary
        reasons = ", ".join(f"{k} {v}" for k, v in s["reasons"].items() if v)
        out = [
            f"kept {s['kept']} of {s['input_frames']} frames ({reasons})",
            f"wrote {s['output']} ({s['linked']} images hard-linked, {s['copied']} copied) "
            f"in {s['timing_s']['total_s']:.1f} s ({s['frames_per_s']:.0f} frames/s, {s['workers']} workers"
            + (f", {s['scores_from_cache']} frames scored from {SCORES_FILE}" if s.get("scores_from_cache") else "")
            + ")",
        ]
        if s["target"] is not None and s["kept"] < s["target"]:
            out.append(f"note: asked for {s['target']} frames, only {s['kept']} passed the filters")
        if s["kept"] == 0:
            out.append("warning: no frame was kept; see the reasons in " + CURATION_CSV)
        if s["reasons"].get("unreadable"):
            out.append(f"warning: {s['reasons']['unreadable']} unreadable frame(s); see {CURATION_CSV}")
        return out


def _check_output(src: Path, dst: Path) -> None:
    src_r, dst_r = src.resolve(), dst.resolve()
    if dst_r == src_r or src_r in dst_r.parents:
        raise ValueError(f"output {dst} must not be inside the input dataset {src} (the input is never modified)")
    if dst_r in src_r.parents:
        raise ValueError(f"output {dst} must not contain the input dataset {src}")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"output {dst} already exists; choose a new folder or remove it")


def curate(
    source: str | os.PathLike,
    output: str | os.PathLike,
    config: CurateConfig | None = None,
    *,
    progress: bool = False,
    aliases: dict[str, str] | None = None,
) -> CurationResult:
    """Curate the dataset at ``source`` into a new dataset folder ``output`` (see module docstring).

    Raises ``FileNotFoundError`` / ``ValueError`` naming the folder or ``metadata.csv`` for a
    missing or non-dataset input and ``FileExistsError`` for an existing non-empty output; in
    every failure nothing is left at ``output``.
    """
    config = (config or CurateConfig()).validate()
    src, dst = Path(source), Path(output)
    if not src.is_dir():
        raise FileNotFoundError(f"input dataset folder {src} does not exist or is not a folder")
    _check_output(src, dst)
    t_start = time.perf_counter()
    segments = list(iter_segments(src, aliases=aliases, check_files=False))
    if not segments:
        raise ValueError(f"{src} holds no Run-<N>/<segment>/metadata.csv segments; is it a forest dataset?")
    table = frame_table(segments)
    if len(table) == 0:
        raise ValueError(f"{src} has {len(segments)} segment(s) but no frames")
    t_scan = time.perf_counter()
    from_cache = score_frames(table, workers=config.workers, progress=progress)
    t_score = time.perf_counter()
    timings = select_frames(table, config, progress=progress)
    t_select = time.perf_counter()
    staging = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    try:
        linked, copied = _stage_output(table, staging, config, progress=progress)
        t_end = time.perf_counter()
        timings = {
            "scan_s": t_scan - t_start,
            "score_s": t_score - t_scan,
            **timings,
            "write_s": t_end - t_select,
            "total_s": t_end - t_start,
        }
        summary = _summary(table, src, dst, config, timings, linked, copied)
        summary["scores_from_cache"] = from_cache
        (staging / CURATION_JSON).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        if dst.exists():
            dst.rmdir()  # empty (checked before); the rename needs the name free
        os.rename(staging, dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return CurationResult(table, dst, summary)


def _stage_output(table: FrameTable, staging: Path, config: CurateConfig, *, progress: bool) -> tuple[int, int]:
    """Write the kept frames and ``curation.csv`` under ``staging``; returns (linked, copied) files."""
    from tqdm import tqdm

    if staging.exists():
        shutil.rmtree(staging)
    linked = copied = 0
    kept = table.kept
    staging.mkdir(parents=True)
    with tqdm(total=int(kept.sum()), desc="write", unit="frame", disable=not progress, mininterval=1.0) as bar:
        for s, segment in enumerate(table.segments):
            members = np.flatnonzero((table.segment_of == s) & kept)
            if members.size == 0:
                continue
            seg_dir = staging / segment_key(segment)
            (seg_dir / RGB_DIR).mkdir(parents=True)
            (seg_dir / DEPTH_DIR).mkdir()
            stems = set()
            for i in members:
                j = int(table.index_in_segment[i])
                stems.add(segment.frames[j].stem)
                for src_path, sub in ((segment.rgb_path(j), RGB_DIR), (segment.depth_path(j), DEPTH_DIR)):
                    if _place(src_path, seg_dir / sub / src_path.name, config.link):
                        linked += 1
                    else:
                        copied += 1
                bar.update()
            (seg_dir / METADATA_FILE).write_text(_filtered_metadata(segment, stems), encoding="utf-8")
            scored = [i for i in members if np.isfinite(table.laplacian[i])]
            write_score_cache(seg_dir, [(segment.frames[int(table.index_in_segment[i])].stem, table.laplacian[i],
                                         table.tenengrad[i], table.descriptors[i]) for i in scored])
    with open(staging / CURATION_CSV, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(CURATION_COLUMNS)
        writer.writerows(curation_rows(table))
    return linked, copied


def _summary(
    table: FrameTable, src: Path, dst: Path, config: CurateConfig, timings: dict, linked: int, copied: int
) -> dict:
    reasons = {r: 0 for r in REASONS}
    for r in table.reason:
        reasons[r] += 1
    per_segment = []
    for s, segment in enumerate(table.segments):
        members = np.flatnonzero(table.segment_of == s)
        counts = {r: 0 for r in REASONS}
        for i in members:
            counts[table.reason[i]] += 1
        per_segment.append(
            {"segment": segment_key(segment), "frames": int(members.size), "has_gps": segment.has_gps, **counts}
        )
    total = timings["total_s"]
    return {
        "source": str(src),
        "output": str(dst),
        "input_frames": len(table),
        "kept": reasons["kept"],
        "target": config.target(len(table)),
        "reasons": reasons,
        "linked": linked,
        "copied": copied,
        "workers": config.workers or default_workers(),
        "frames_per_s": len(table) / total if total > 0 else math.inf,
        "timing_s": {k: round(v, 3) for k, v in timings.items()},
        "config": asdict(config),
        "per_segment": per_segment,
    }


def reasons_count(rows: Iterable[dict[str, str]]) -> dict[str, int]:
    """Frames per reason in ``curation.csv`` rows, in ``REASONS`` order (unknown reasons last)."""
    counts = {r: 0 for r in REASONS}
    for row in rows:
        counts[row.get("reason", "")] = counts.get(row.get("reason", ""), 0) + 1
    return counts
