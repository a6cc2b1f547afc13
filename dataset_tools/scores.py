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
from forest_perception.image_scores import (  # noqa: F401 - re-exported: curation's scores are the rover's
    DESCRIPTOR_SIZE,
    frame_descriptor,
    frame_scores,
    sharpness,
)


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
