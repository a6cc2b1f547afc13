"""Images of the dataset layout on disk: depth as 16-bit millimetre PNG, PNG headers, crash-safe writes.

Encoding and units are described in docs/dataset_layout.md; ``layout`` uses these to read and write segments.
Pure core: numpy, OpenCV and the standard library.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIX = ".png"

DEPTH_SCALE_MM_PER_M = 1000.0
DEPTH_MAX_MM = 65535
DEPTH_INVALID = 0

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOUR_TYPES = {0: "grayscale", 2: "RGB", 3: "palette", 4: "grayscale+alpha", 6: "RGBA"}


# --------------------------------------------------------------------------- depth codec


def encode_depth_mm(depth_m: np.ndarray) -> np.ndarray:
    """Metres (NaN/inf invalid) -> ``uint16`` millimetres, 0 = invalid.

    Rounds to the nearest millimetre; NaN, +-inf, values <= 0 and values that round to
    more than 65535 mm become 0.
    """
    depth = np.asarray(depth_m)
    if not np.issubdtype(depth.dtype, np.floating):
        raise ValueError(f"depth_m must be a floating-point array in metres, got dtype {depth.dtype}")
    with np.errstate(invalid="ignore", over="ignore"):
        mm = np.rint(depth.astype(np.float64) * DEPTH_SCALE_MM_PER_M)
        valid = np.isfinite(mm) & (mm > 0) & (mm <= DEPTH_MAX_MM)
    out = np.zeros(depth.shape, dtype=np.uint16)
    out[valid] = mm[valid].astype(np.uint16)
    return out


def decode_depth_mm(depth_mm: np.ndarray) -> np.ndarray:
    """``uint16`` millimetres -> ``float32`` metres with NaN where the value is 0."""
    depth = np.asarray(depth_mm)
    if depth.dtype != np.uint16:
        raise ValueError(f"depth_mm must be a uint16 array of millimetres, got dtype {depth.dtype}")
    out = depth.astype(np.float32) / np.float32(DEPTH_SCALE_MM_PER_M)
    out[depth == DEPTH_INVALID] = np.nan
    return out


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


# --------------------------------------------------------------------------- writing


def encode_png(image: np.ndarray, what: str) -> bytes:
    """PNG bytes of ``image`` (OpenCV channel order); ``what`` names the image in the error."""
    ok, buf = cv2.imencode(IMAGE_SUFFIX, image)
    if not ok:
        raise OSError(f"OpenCV could not encode the {what} image as PNG")
    return buf.tobytes()


def temporary_path(final: Path) -> Path:
    """Where ``write_atomic`` puts the data before moving it to ``final``."""
    # Hidden and with a suffix no reader looks for, so a leftover never passes for a frame.
    return final.with_name(f".{final.name}.{os.getpid()}.tmp")


def write_atomic(final: Path, data: bytes, fsync: bool) -> None:
    """Write ``data`` to ``final`` through a temporary file, so ``final`` is either absent or complete."""
    tmp = temporary_path(final)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


# --------------------------------------------------------------------------- reading


def _read_png(path: str | os.PathLike, what: str) -> np.ndarray:
    """The PNG at ``path`` as stored (no conversion); ``what`` ('RGB', 'depth') names it in errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} image {path} does not exist")
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"{what} image {path} is not a readable image")
    return image


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read a colour PNG as an HxWx3 ``uint8`` RGB array."""
    bgr = _read_png(path, "RGB")
    if bgr.dtype != np.uint8 or bgr.ndim != 3 or bgr.shape[2] not in (3, 4):
        raise ValueError(f"RGB image {path} must be 8-bit colour, got shape {bgr.shape} dtype {bgr.dtype}")
    return np.ascontiguousarray(bgr[..., 2::-1])


def load_depth(path: str | os.PathLike) -> np.ndarray:
    """Read a 16-bit millimetre depth PNG as HxW ``float32`` metres (NaN invalid)."""
    raw = _read_png(path, "depth")
    if raw.dtype != np.uint16 or raw.ndim != 2:
        raise ValueError(
            f"depth image {path} must be a single-channel 16-bit PNG in millimetres, "
            f"got shape {raw.shape} dtype {raw.dtype}"
        )
    return decode_depth_mm(raw)
