"""Frame scores for curation: sharpness, a view descriptor, and the per-segment cache that spares PNG decoding.

What the scores measure and how the cache is kept valid: docs/dataset_tools.md ("curate", step 1).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from forest_perception.dataset_tools.images import (
    IMAGE_SUFFIX,
    DepthEncoding,
    check_depth_header,
    grayscale_depth,
    png_info,
    write_atomic,
)
from forest_perception.dataset_tools.layout import RGB_DIR, Segment

THUMB_SIZE = (16, 12)
"""Grayscale thumbnail of the descriptor, (width, height)."""
HIST_BINS = (9, 4)
"""Hue x saturation bins of the descriptor's colour histogram."""
DESCRIPTOR_SIZE = THUMB_SIZE[0] * THUMB_SIZE[1] + HIST_BINS[0] * HIST_BINS[1]


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


def score_frame_files(paths: tuple) -> tuple:
    """(laplacian_var, tenengrad, descriptor or None, error or None) of one frame's (RGB, depth[, encoding]).

    Checks both PNG headers (the depth one against the ``DepthEncoding``, 16-bit millimetres when not
    given) and decodes only the RGB; never raises for a bad file (the error says which).
    """
    rgb_path, depth_path, *rest = paths
    encoding = rest[0] if rest else DepthEncoding()
    try:
        rgb_info = png_info(rgb_path)
        if not rgb_info.is_rgb8:
            raise ValueError(f"RGB image {rgb_path} must be an 8-bit colour PNG, got {rgb_info.describe()}")
        depth_info = png_info(depth_path)
        check_depth_header(depth_info, encoding, depth_path)
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


def depth_valid_fraction(item: str | tuple[str, DepthEncoding]) -> tuple[float, str | None]:
    """(fraction of valid depth pixels, error or None) of one depth PNG path (or (path, encoding)).

    Never raises for a bad file; the encoding (16-bit millimetres when not given) must be able to read it.
    """
    depth_path, encoding = (item, DepthEncoding()) if isinstance(item, (str, os.PathLike)) else item
    raw = cv2.imread(str(depth_path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        return math.nan, f"depth image {depth_path} could not be decoded (corrupt PNG data)"
    try:
        values = grayscale_depth(raw, depth_path)
        encoding.scale_for(16 if values.dtype == np.uint16 else 8, depth_path)
    except ValueError as exc:
        return math.nan, str(exc)
    return cv2.countNonZero(values) / values.size, None


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
    keys = [_file_key(segment_dir / RGB_DIR / f"{stem}{IMAGE_SUFFIX}") for stem, *_ in rows]
    buffer = io.BytesIO()
    np.savez(
        buffer,
        stems=np.array([r[0] for r in rows], dtype=str),
        size=np.array([k[0] for k in keys], np.int64),
        mtime_ns=np.array([k[1] for k in keys], np.int64),
        laplacian=np.array([r[1] for r in rows], np.float64),
        tenengrad=np.array([r[2] for r in rows], np.float64),
        descriptors=np.stack([r[3] for r in rows]).astype(np.float32)
        if rows else np.zeros((0, DESCRIPTOR_SIZE), np.float32),
    )
    final = segment_dir / SCORES_FILE
    write_atomic(final, buffer.getvalue(), fsync=False)
    return final


def read_score_cache(segment: Segment) -> dict[str, tuple[int, int, float, float, np.ndarray]]:
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


def cached_score(cache: dict, segment: Segment, j: int) -> tuple[float, float, np.ndarray] | None:
    """Frame ``j``'s (laplacian_var, tenengrad, descriptor) from ``read_score_cache``, None when stale or absent."""
    entry = cache.get(segment.frames[j].stem)
    if entry is None:
        return None
    try:
        if _file_key(segment.rgb_path(j)) != entry[:2] or not segment.depth_path(j).is_file():
            return None
    except OSError:
        return None
    return entry[2], entry[3], entry[4]
