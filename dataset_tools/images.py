"""Images of the dataset layout on disk: depth PNGs (16-bit millimetres, or 8-bit at a stated scale), PNG
headers, crash-safe writes.

Encodings and units are described in docs/dataset_layout.md; ``layout`` uses these to read and write segments.
Pure core: numpy, OpenCV and the standard library.
"""

from __future__ import annotations

import math
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

SETTINGS_FILE = "forest_dataset.yaml"
"""The per-dataset settings file at a dataset root (depth encoding, column aliases); ``settings`` reads it."""
DEPTH_SCALE_FLAG = "--depth-scale"
DEPTH_LARGER_FLAG = "--depth-larger"

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


class DepthScaleError(ValueError):
    """A depth PNG whose values cannot be turned into metres with what the dataset states (an 8-bit one)."""


@dataclass(frozen=True)
class DepthEncoding:
    """How the depth PNGs of a dataset map to metres; 0 is invalid in every encoding.

    16-bit PNGs are millimetres unless ``scale_m_per_unit`` says otherwise. 8-bit PNGs (the public
    dataset's "grayscale depth maps" may be such) are read only when both ``scale_m_per_unit`` and
    ``larger_is_farther`` are stated. Larger is farther: metres = value x scale; larger is nearer:
    metres = (2^bits - value) x scale. ``settings_file`` is where the dataset's settings are (or would
    be), named in messages.
    """

    scale_m_per_unit: float | None = None
    larger_is_farther: bool | None = None
    settings_file: str = ""

    def __post_init__(self) -> None:
        scale = self.scale_m_per_unit
        if scale is not None and (
            isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0)
        ):
            raise ValueError(f"the depth scale must be a positive number of metres per unit, got {scale!r}")
        if self.larger_is_farther is not None and not isinstance(self.larger_is_farther, bool):
            raise ValueError(f"whether larger depth values are farther must be true or false, got "
                             f"{self.larger_is_farther!r}")

    @property
    def is_default(self) -> bool:
        """True when nothing is stated (16-bit millimetres, 8-bit refused)."""
        return self.scale_m_per_unit is None and self.larger_is_farther is None

    def unstated_8bit(self) -> str:
        """Why an 8-bit depth PNG cannot be read with this encoding ('' when it can)."""
        missing = [what for what, value in (("its scale", self.scale_m_per_unit),
                                            ("whether larger values are farther or nearer", self.larger_is_farther))
                   if value is None]
        if not missing:
            return ""
        where = self.settings_file or f"{SETTINGS_FILE} at the dataset root"
        return (
            f"the dataset does not state {' nor '.join(missing)}: give {DEPTH_SCALE_FLAG} METRES_PER_UNIT and "
            f"{DEPTH_LARGER_FLAG} farther|nearer, or write depth_scale_m_per_unit and depth_larger_is_farther "
            f"into {where}"
        )

    def scale_for(self, bit_depth: int, path: str | os.PathLike) -> tuple[float, bool]:
        """(metres per unit, larger is farther) for a depth PNG of ``bit_depth`` bits.

        ``DepthScaleError`` naming ``path``, the flags and the settings file for an 8-bit PNG without a stated
        scale and direction; ``ValueError`` for a bit depth that is neither 8 nor 16.
        """
        if bit_depth == 16:
            scale = self.scale_m_per_unit if self.scale_m_per_unit is not None else 1.0 / DEPTH_SCALE_MM_PER_M
            return scale, True if self.larger_is_farther is None else self.larger_is_farther
        if bit_depth == 8:
            why = self.unstated_8bit()
            if why:
                raise DepthScaleError(f"depth image {path} is an 8-bit PNG and {why}")
            return float(self.scale_m_per_unit), bool(self.larger_is_farther)  # type: ignore[arg-type]
        raise ValueError(f"depth image {path} is a {bit_depth}-bit PNG; depth PNGs must be 8-bit or 16-bit")

    def to_metres(self, raw: np.ndarray, path: str | os.PathLike = "depth") -> np.ndarray:
        """A decoded depth PNG (as ``cv2.IMREAD_UNCHANGED`` gives it) -> HxW ``float32`` metres, NaN invalid."""
        values = grayscale_depth(raw, path)
        bits = 16 if values.dtype == np.uint16 else 8
        scale, farther = self.scale_for(bits, path)
        if bits == 16 and farther and self.scale_m_per_unit is None:
            return decode_depth_mm(values)  # the layout's own encoding, bit for bit as it always was
        units = values.astype(np.float64) if farther else float(1 << bits) - values.astype(np.float64)
        out = (units * scale).astype(np.float32)
        out[values == DEPTH_INVALID] = np.nan
        return out

    def describe(self) -> str:
        """E.g. '16-bit millimetres' or '8-bit x 0.04 m, larger is farther'."""
        if self.is_default:
            return "16-bit millimetres (8-bit not stated)"
        direction = {True: "larger is farther", False: "larger is nearer", None: "direction not stated"}
        scale = "millimetres for 16-bit" if self.scale_m_per_unit is None else f"{self.scale_m_per_unit:g} m per unit"
        return f"{scale}, {direction[self.larger_is_farther]}"


def grayscale_depth(raw: np.ndarray, path: str | os.PathLike = "depth") -> np.ndarray:
    """The single channel of a decoded depth PNG: a grayscale one as is, a colour one whose channels are equal
    (a grayscale map saved as RGB) as its first channel; ``ValueError`` naming ``path`` otherwise."""
    if raw.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"depth image {path} must be an 8-bit or 16-bit PNG, got dtype {raw.dtype}")
    if raw.ndim == 2:
        return raw
    if raw.ndim == 3 and raw.shape[2] in (3, 4):
        colour = raw[..., :3]
        if np.array_equal(colour[..., 0], colour[..., 1]) and np.array_equal(colour[..., 0], colour[..., 2]):
            return np.ascontiguousarray(colour[..., 0])
        raise ValueError(f"depth image {path} is a colour image whose channels differ, not a grayscale depth map")
    raise ValueError(f"depth image {path} must be a single-channel depth map, got shape {raw.shape}")


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

    @property
    def depth_bits(self) -> int | None:
        """8 or 16 when this PNG can hold a depth map (grayscale, or grayscale saved as colour), else None."""
        if self.colour_type == 0 and self.bit_depth in (8, 16):
            return self.bit_depth
        if self.colour_type in (2, 6) and self.bit_depth in (8, 16):
            return self.bit_depth
        if self.colour_type == 3 and self.bit_depth == 8:
            return 8
        return None

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


def check_depth_header(info: PngInfo, encoding: DepthEncoding, path: str | os.PathLike) -> None:
    """``ValueError`` naming ``path`` unless a depth PNG with this header can be read with ``encoding``
    (``DepthScaleError`` for an 8-bit one whose scale the dataset does not state)."""
    bits = info.depth_bits
    if bits is None:
        raise ValueError(
            f"depth image {path} must be a single-channel 16-bit (millimetres) or 8-bit PNG, got {info.describe()}"
        )
    encoding.scale_for(bits, path)


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


def load_depth(path: str | os.PathLike, encoding: DepthEncoding | None = None) -> np.ndarray:
    """Read a depth PNG as HxW ``float32`` metres (NaN invalid).

    Without ``encoding`` (or with the default one) it must be a 16-bit PNG in millimetres; an 8-bit one
    needs an encoding that states its scale (``DepthScaleError`` otherwise, naming the flags and the file).
    """
    raw = _read_png(path, "depth")
    return (encoding or DepthEncoding()).to_metres(raw, path)
