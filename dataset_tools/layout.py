"""Reader and writer of the low-viewpoint forest depth dataset layout.

The public low-viewpoint forest depth dataset (Niu, Tarapore, Zauner; Zenodo record
3945526) stores every recording as ``Run-<N>/<segment>/`` with segments named ``a``,
``b``, ``c``, ...; each segment holds ``rgb_image/``, ``depth_image/`` and a
``metadata.csv`` with one row of IMU/GPS/encoder data per image, RGB and depth paired
by file name. GPS and encoder data are missing for some segments; IMU is always there.
This module writes that layout for our own recordings and reads it back::

    <root>/Run-<N>/<segment>/metadata.csv
    <root>/Run-<N>/<segment>/rgb_image/<stem>.png     8-bit colour PNG (OpenCV BGR order on disk)
    <root>/Run-<N>/<segment>/depth_image/<stem>.png   16-bit single-channel PNG, millimetres

Depth encoding: ``uint16`` millimetres along the optical z axis, rounded to the nearest
millimetre; ``0`` means invalid (no return, NaN/inf, zero or negative, or anything that
rounds to more than 65535 mm, i.e. >= 65.5355 m). Decoded depth is ``float32`` metres
with ``NaN`` for invalid pixels (REP 118).

``metadata.csv`` columns (``METADATA_COLUMNS``, in this order; an empty cell means
"not recorded"):

==========================  ======  ==========================================================
column                      unit    meaning
==========================  ======  ==========================================================
stem                        --      file name stem; the frame is ``rgb_image/<stem>.png`` and
                                    ``depth_image/<stem>.png``
timestamp                   s       capture time (float seconds, ROS time / sim time)
latitude                    deg     WGS84 latitude, empty when the segment has no GPS
longitude                   deg     WGS84 longitude, empty when no GPS
altitude                    m       WGS84 altitude above the ellipsoid, empty when unknown
gps_status                  --      ``sensor_msgs/NavSatStatus`` status: -1 no fix, 0 fix,
                                    1 SBAS fix, 2 GBAS fix; empty when unknown
orientation_x .. _w         --      IMU orientation quaternion (x, y, z, w); empty when the
                                    IMU gives no orientation (e.g. a bare gyro/accel unit)
angular_velocity_x/_y/_z    rad/s   IMU angular velocity in the IMU frame
linear_acceleration_x/_y/_z m/s^2   IMU linear acceleration in the IMU frame, incl. gravity
left_wheel_position         rad     left wheel joint position, empty when no encoders
right_wheel_position        rad     right wheel joint position
left_wheel_velocity         rad/s   left wheel joint velocity
right_wheel_velocity        rad/s   right wheel joint velocity
==========================  ======  ==========================================================

Any further columns are *extras* (``FrameRecord.extras``), e.g. ``weather``,
``world_seed``, ``pose_x`` / ``pose_y`` / ``pose_yaw`` of our synthetic data; a reader
keeps unknown columns as extras (values that parse as numbers come back as ``float``,
the rest as ``str``).

Naming of the real dataset: its README (Zenodo 3945526) documents the folder layout
above and which segments lack GPS/encoders, but its ``metadata.csv`` header and image
file naming were not available to us, so the reader cannot claim to know them. It
matches column names case-insensitively after normalising separators (``.``, ``-``,
spaces -> ``_``) and dropping a trailing unit in brackets (``"Timestamp [s]"`` ->
``timestamp``), accepts the common synonyms in ``COLUMN_SYNONYMS`` (``lat``, ``lon``,
``qx``, ``gyro_x``, ``acc_x``, ``time``, ``filename``, ...; these are generic synonyms,
not verified against the real files) and takes an ``aliases`` mapping for anything else.

Crash safety: each image is written to a hidden temporary name and moved into place with
``os.replace``; the metadata row is appended (and flushed) only after both images of the
frame are in place. ``metadata.csv`` is the index: files without a row (a frame that was
being written when the process died, stray ``.*.tmp`` files) are ignored by the reader.

This module is a pure core: numpy, OpenCV and the standard library only, never rclpy.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import shutil
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from forest_perception.readings import GpsFix, ImuSample, WheelEncoders

RGB_DIR = "rgb_image"
DEPTH_DIR = "depth_image"
METADATA_FILE = "metadata.csv"
IMAGE_SUFFIX = ".png"
RUN_PREFIX = "Run-"

DEPTH_SCALE_MM_PER_M = 1000.0
DEPTH_MAX_MM = 65535
DEPTH_INVALID = 0

STEM_COLUMN = "stem"
TIMESTAMP_COLUMN = "timestamp"
GPS_COLUMNS = ("latitude", "longitude", "altitude", "gps_status")
ORIENTATION_COLUMNS = ("orientation_x", "orientation_y", "orientation_z", "orientation_w")
ANGULAR_VELOCITY_COLUMNS = ("angular_velocity_x", "angular_velocity_y", "angular_velocity_z")
LINEAR_ACCELERATION_COLUMNS = ("linear_acceleration_x", "linear_acceleration_y", "linear_acceleration_z")
IMU_COLUMNS = ORIENTATION_COLUMNS + ANGULAR_VELOCITY_COLUMNS + LINEAR_ACCELERATION_COLUMNS
ENCODER_COLUMNS = (
    "left_wheel_position",
    "right_wheel_position",
    "left_wheel_velocity",
    "right_wheel_velocity",
)

METADATA_COLUMNS: tuple[str, ...] = (
    (STEM_COLUMN, TIMESTAMP_COLUMN) + GPS_COLUMNS + IMU_COLUMNS + ENCODER_COLUMNS
)
"""Standard ``metadata.csv`` columns in the order they are written (see module docstring)."""

# Cells that mean "not recorded". "--" is how the dataset README marks missing metadata.
_MISSING_CELLS = frozenset({"", "--", "na", "n/a", "none", "null"})


def _synonyms() -> dict[str, str]:
    table: dict[str, str] = {}
    for name in ("file", "filename", "file_name", "image", "image_name", "image_file", "frame", "name"):
        table[name] = STEM_COLUMN
    for name in ("time", "stamp", "time_stamp", "timestamp_s", "time_s", "t"):
        table[name] = TIMESTAMP_COLUMN
    for canonical, names in {
        "latitude": ("lat", "gps_lat", "gps_latitude"),
        "longitude": ("lon", "lng", "long", "gps_lon", "gps_long", "gps_longitude"),
        "altitude": ("alt", "gps_alt", "gps_altitude"),
        "gps_status": ("status", "fix", "gps_fix", "fix_status", "gps_fix_status"),
    }.items():
        for name in names:
            table[name] = canonical
    for axis in "xyzw":
        for name in (
            f"q{axis}",
            f"quat_{axis}",
            f"quaternion_{axis}",
            f"imu_orientation_{axis}",
            f"orient_{axis}",
        ):
            table[name] = f"orientation_{axis}"
    for axis in "xyz":
        for name in (
            f"gyro_{axis}",
            f"gyr_{axis}",
            f"w{axis}",
            f"imu_angular_velocity_{axis}",
            f"ang_vel_{axis}",
        ):
            table[name] = f"angular_velocity_{axis}"
        for name in (
            f"acc_{axis}",
            f"accel_{axis}",
            f"a{axis}",
            f"imu_linear_acceleration_{axis}",
            f"lin_acc_{axis}",
        ):
            table[name] = f"linear_acceleration_{axis}"
    for side in ("left", "right"):
        for name in (
            f"{side}_position",
            f"{side}_wheel_pos",
            f"{side}_encoder",
            f"encoder_{side}",
            f"{side}_pos",
        ):
            table[name] = f"{side}_wheel_position"
        for name in (f"{side}_velocity", f"{side}_wheel_vel", f"{side}_vel", f"encoder_{side}_velocity"):
            table[name] = f"{side}_wheel_velocity"
    return table


COLUMN_SYNONYMS: Mapping[str, str] = _synonyms()
"""Normalised header name -> standard column; generic synonyms, not taken from the real dataset."""

# Timestamp columns in other units, scaled to seconds.
_TIMESTAMP_SCALES = {
    "timestamp_ms": 1e-3,
    "time_ms": 1e-3,
    "timestamp_us": 1e-6,
    "timestamp_ns": 1e-9,
    "time_ns": 1e-9,
}

_STEM_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")
_SEGMENT_RE = re.compile(r"^[a-z]+$")
_RUN_RE = re.compile(r"^Run-(\d+)$")


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


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class FrameRecord:
    """The ``metadata.csv`` row of one RGB/depth pair."""

    stem: str
    timestamp: float
    imu: ImuSample
    gps: GpsFix | None = None
    encoders: WheelEncoders | None = None
    extras: Mapping[str, str | float] = field(default_factory=dict)


def frame_stem(index: int, width: int = 6) -> str:
    """Zero-padded frame index used as a file stem: ``frame_stem(42) == '000042'``."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"frame index must be a non-negative int, got {index!r}")
    return f"{int(index):0{width}d}"


# --------------------------------------------------------------------------- naming


def segment_name(index: int) -> str:
    """0 -> 'a', 25 -> 'z', 26 -> 'aa', 27 -> 'ab', ... (spreadsheet-column order)."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"segment index must be a non-negative int, got {index!r}")
    n = int(index) + 1
    letters = []
    while n > 0:
        n, rem = divmod(n - 1, 26)
        letters.append(chr(ord("a") + rem))
    return "".join(reversed(letters))


def segment_index(name: str) -> int:
    """Inverse of ``segment_name``: 'a' -> 0, 'z' -> 25, 'aa' -> 26."""
    if not isinstance(name, str) or not _SEGMENT_RE.match(name):
        raise ValueError(f"segment name must be lowercase letters a-z (a, b, ..., z, aa, ...), got {name!r}")
    n = 0
    for ch in name:
        n = n * 26 + (ord(ch) - ord("a") + 1)
    return n - 1


def run_dir_name(run: int) -> str:
    """``run_dir_name(3) == 'Run-3'``."""
    if isinstance(run, bool) or not isinstance(run, (int, np.integer)) or run < 0:
        raise ValueError(f"run must be a non-negative int, got {run!r}")
    return f"{RUN_PREFIX}{int(run)}"


def next_segment_name(root: str | os.PathLike, run: int) -> str:
    """First segment name after the existing segments of ``Run-<run>`` ('a' for a new run)."""
    run_dir = Path(root) / run_dir_name(run)
    existing = [segment_index(p.name) for p in _segment_dirs(run_dir)] if run_dir.is_dir() else []
    return segment_name(max(existing) + 1 if existing else 0)


def _segment_dirs(run_dir: Path) -> list[Path]:
    dirs = [p for p in run_dir.iterdir() if p.is_dir() and _SEGMENT_RE.match(p.name)]
    return sorted(dirs, key=lambda p: segment_index(p.name))


def _run_dirs(root: Path) -> list[tuple[int, Path]]:
    runs = []
    for p in root.iterdir():
        m = _RUN_RE.match(p.name)
        if m and p.is_dir():
            runs.append((int(m.group(1)), p))
    return sorted(runs)


# --------------------------------------------------------------------------- atomic I/O


def _tmp_path(final: Path) -> Path:
    # Hidden and with a suffix no reader looks for, so a leftover never passes for a frame.
    return final.with_name(f".{final.name}.{os.getpid()}.tmp")


def _write_atomic(final: Path, data: bytes, fsync: bool) -> None:
    tmp = _tmp_path(final)
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


def _encode_png(image: np.ndarray, what: str) -> bytes:
    ok, buf = cv2.imencode(IMAGE_SUFFIX, image)
    if not ok:
        raise OSError(f"OpenCV could not encode the {what} image as PNG")
    return buf.tobytes()


def _cell(value: float | int | str | None) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    return repr(float(value))


def _record_cells(record: FrameRecord, extra_columns: Sequence[str]) -> list[str]:
    gps = record.gps
    imu = record.imu
    enc = record.encoders
    orientation = imu.orientation if imu.orientation is not None else (None,) * 4
    cells = [record.stem, _cell(record.timestamp)]
    cells += [
        _cell(gps.latitude if gps else None),
        _cell(gps.longitude if gps else None),
        _cell(gps.altitude if gps else None),
        _cell(gps.status if gps else None),
    ]
    cells += [_cell(v) for v in orientation]
    cells += [_cell(v) for v in imu.angular_velocity]
    cells += [_cell(v) for v in imu.linear_acceleration]
    cells += [
        _cell(enc.left_position if enc else None),
        _cell(enc.right_position if enc else None),
        _cell(enc.left_velocity if enc else None),
        _cell(enc.right_velocity if enc else None),
    ]
    cells += [_cell(record.extras.get(name)) for name in extra_columns]
    return cells


def _csv_line(cells: Sequence[str]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(cells)
    return buf.getvalue()


# --------------------------------------------------------------------------- writer


class SegmentWriter:
    """Writes one ``Run-<run>/<segment>/`` directory frame by frame.

    Every call to ``write_frame`` leaves a complete, readable segment behind: images are
    written under temporary names and moved into place, then the metadata row is
    appended and flushed. ``fsync=True`` also syncs each file to disk (power-loss safety
    at the cost of write speed). Extra columns are fixed by ``extra_columns`` or, when
    that is None, by the first frame's ``extras`` keys.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        run: int,
        segment: str,
        *,
        overwrite: bool = False,
        extra_columns: Sequence[str] | None = None,
        fsync: bool = False,
    ) -> None:
        segment_index(segment)  # validates the name
        self.root = Path(root)
        self.run = int(run)
        self.segment = segment
        self.path = self.root / run_dir_name(run) / segment
        self.fsync = fsync
        self._extra_columns: tuple[str, ...] | None = None
        if extra_columns is not None:
            self._extra_columns = _check_extra_columns(extra_columns)
        self._stems: set[str] = set()
        self._last_timestamp = -math.inf
        self._csv: io.TextIOWrapper | None = None
        self._closed = False
        self.frames_written = 0

        if self.path.exists():
            if not self.path.is_dir():
                raise FileExistsError(f"segment path {self.path} exists and is not a directory")
            if any(self.path.iterdir()):
                if not overwrite:
                    raise FileExistsError(
                        f"segment {self.path} already exists; pass overwrite=True to replace it "
                        f"or write to segment {next_segment_name(self.root, self.run)!r}"
                    )
                shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / RGB_DIR).mkdir(exist_ok=True)
        (self.path / DEPTH_DIR).mkdir(exist_ok=True)
        if self._extra_columns is not None:
            self._open_csv()

    @property
    def columns(self) -> tuple[str, ...]:
        """Header of ``metadata.csv`` (standard columns, then extras); empty until known."""
        if self._extra_columns is None:
            return ()
        return METADATA_COLUMNS + self._extra_columns

    def _open_csv(self) -> None:
        csv_path = self.path / METADATA_FILE
        _write_atomic(csv_path, _csv_line(self.columns).encode("utf-8"), self.fsync)
        self._csv = open(csv_path, "a", encoding="utf-8", newline="")

    def write_frame(self, rgb: np.ndarray, depth_m: np.ndarray, record: FrameRecord) -> None:
        """Validate and write one RGB (``rgb8``, HxWx3 uint8) / depth (HxW float metres) pair."""
        if self._closed:
            raise RuntimeError(f"writer for {self.path} is closed")
        self._validate(rgb, depth_m, record)
        if self._extra_columns is None:
            self._extra_columns = _check_extra_columns(tuple(record.extras))
            self._open_csv()
        unknown = sorted(set(record.extras) - set(self._extra_columns))
        if unknown:
            raise ValueError(
                f"record {record.stem!r} has extras {unknown} that are not columns of this segment "
                f"(extra columns: {list(self._extra_columns)}); declare them with extra_columns="
            )
        line = _csv_line(_record_cells(record, self._extra_columns))

        rgb_png = _encode_png(np.ascontiguousarray(rgb[..., ::-1]), "RGB")  # OpenCV writes BGR
        depth_png = _encode_png(encode_depth_mm(depth_m), "depth")
        name = record.stem + IMAGE_SUFFIX
        _write_atomic(self.path / RGB_DIR / name, rgb_png, self.fsync)
        _write_atomic(self.path / DEPTH_DIR / name, depth_png, self.fsync)
        # The row goes last: a crash before this line leaves only unindexed files.
        assert self._csv is not None
        self._csv.write(line)
        self._csv.flush()
        if self.fsync:
            os.fsync(self._csv.fileno())
        self._stems.add(record.stem)
        self._last_timestamp = record.timestamp
        self.frames_written += 1

    def _validate(self, rgb: np.ndarray, depth_m: np.ndarray, record: FrameRecord) -> None:
        if not isinstance(record, FrameRecord):
            raise ValueError(f"record must be a FrameRecord, got {type(record).__name__}")
        if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"rgb must be an HxWx3 uint8 array (rgb8), got {_describe(rgb)}")
        if (
            not isinstance(depth_m, np.ndarray)
            or not np.issubdtype(depth_m.dtype, np.floating)
            or depth_m.ndim != 2
        ):
            raise ValueError(
                f"depth_m must be an HxW floating-point array in metres, got {_describe(depth_m)}"
            )
        if rgb.shape[0] == 0 or rgb.shape[1] == 0:
            raise ValueError(f"rgb must not be empty, got shape {rgb.shape}")
        if depth_m.shape != rgb.shape[:2]:
            raise ValueError(
                f"depth_m size {depth_m.shape[1]}x{depth_m.shape[0]} differs from rgb size "
                f"{rgb.shape[1]}x{rgb.shape[0]} (depth must be aligned to colour)"
            )
        stem = record.stem
        if not isinstance(stem, str) or not _STEM_RE.match(stem):
            raise ValueError(
                f"record.stem must be a plain file name stem (letters, digits, '_', '.', '+', '-', "
                f"not starting with '.' or '-'), got {stem!r}"
            )
        if stem in self._stems:
            raise ValueError(f"record.stem {stem!r} was already written to {self.path}")
        ts = record.timestamp
        if (
            isinstance(ts, bool)
            or not isinstance(ts, (int, float, np.floating, np.integer))
            or not math.isfinite(ts)
        ):
            raise ValueError(f"record.timestamp must be a finite number of seconds, got {ts!r}")
        if ts <= self._last_timestamp:
            raise ValueError(
                f"record.timestamp {ts!r} of {stem!r} is not after the previous frame's "
                f"{self._last_timestamp!r}; timestamps must increase strictly"
            )
        if not isinstance(record.imu, ImuSample):
            raise ValueError(f"record.imu must be an ImuSample, got {type(record.imu).__name__}")
        if record.gps is not None and not isinstance(record.gps, GpsFix):
            raise ValueError(f"record.gps must be a GpsFix or None, got {type(record.gps).__name__}")
        if record.encoders is not None and not isinstance(record.encoders, WheelEncoders):
            raise ValueError(
                f"record.encoders must be WheelEncoders or None, got {type(record.encoders).__name__}"
            )
        for key, value in record.extras.items():
            if isinstance(value, bool) or not isinstance(value, (str, int, float, np.integer, np.floating)):
                raise ValueError(f"record.extras[{key!r}] must be a str or a number, got {value!r}")
            if isinstance(value, str) and ("\n" in value or "\r" in value):
                raise ValueError(f"record.extras[{key!r}] must be a single line, got {value!r}")

    def close(self) -> None:
        """Close ``metadata.csv``; a segment closed before its first frame gets a header-only CSV."""
        if self._closed:
            return
        if self._csv is None:
            self._extra_columns = self._extra_columns or ()
            self._open_csv()
        assert self._csv is not None
        self._csv.close()
        self._csv = None
        self._closed = True

    @property
    def closed(self) -> bool:
        """True after ``close``."""
        return self._closed

    def __enter__(self) -> SegmentWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _check_extra_columns(names: Sequence[str]) -> tuple[str, ...]:
    names = tuple(names)
    standard = set(METADATA_COLUMNS)
    for name in names:
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            raise ValueError(
                f"extra column names must be non-empty strings without outer spaces, got {name!r}"
            )
        if name in standard or _canonical(name, None) is not None:
            raise ValueError(f"extra column {name!r} clashes with a standard metadata column or its synonym")
        if any(ch in name for ch in "\n\r"):
            raise ValueError(f"extra column name must be a single line, got {name!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"extra column names must be unique, got {list(names)}")
    return names


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"shape {value.shape} dtype {value.dtype}"
    return f"{type(value).__name__}"


# --------------------------------------------------------------------------- reader


@dataclass
class Segment:
    """One segment directory: its frames (``metadata.csv`` rows) and where they live."""

    path: Path
    run: int | None
    name: str
    frames: list[FrameRecord]
    columns: tuple[str, ...]
    column_map: dict[str, str]

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def has_gps(self) -> bool:
        """True when at least one frame has a GPS fix."""
        return any(f.gps is not None for f in self.frames)

    @property
    def has_encoders(self) -> bool:
        """True when at least one frame has wheel encoder data."""
        return any(f.encoders is not None for f in self.frames)

    @property
    def segment_id(self) -> str:
        """Short id as in the dataset README, e.g. '3b'."""
        return f"{self.run if self.run is not None else '?'}{self.name}"

    def rgb_path(self, i: int) -> Path:
        """Path of frame ``i``'s RGB PNG."""
        return self.path / RGB_DIR / (self.frames[i].stem + IMAGE_SUFFIX)

    def depth_path(self, i: int) -> Path:
        """Path of frame ``i``'s depth PNG."""
        return self.path / DEPTH_DIR / (self.frames[i].stem + IMAGE_SUFFIX)


def _normalise(header: str) -> str:
    name = re.sub(r"\s*[\[(][^\])]*[\])]\s*$", "", header.strip())  # drop "[s]" / "(deg)"
    name = re.sub(r"[\s.\-/]+", "_", name.lower())
    return re.sub(r"_+", "_", name).strip("_")


def _canonical(header: str, aliases: Mapping[str, str] | None) -> str | None:
    if aliases and header in aliases:
        return aliases[header]
    norm = _normalise(header)
    if aliases:
        for key, value in aliases.items():
            if _normalise(key) == norm:
                return value
    if norm in METADATA_COLUMNS:
        return norm
    if norm in _TIMESTAMP_SCALES:
        return norm
    return COLUMN_SYNONYMS.get(norm)


def map_columns(header: Sequence[str], aliases: Mapping[str, str] | None) -> dict[str, int]:
    """Standard column (or a scaled timestamp variant) -> index in ``header``."""
    if aliases:
        bad = {k: v for k, v in aliases.items() if v not in METADATA_COLUMNS}
        if bad:
            raise ValueError(f"aliases must map to standard columns {list(METADATA_COLUMNS)}, got {bad}")
    found: dict[str, int] = {}
    exact: set[str] = set()
    for idx, raw in enumerate(header):
        canonical = _canonical(raw, aliases)
        if canonical is None:
            continue
        is_exact = _normalise(raw) == canonical
        # An exact standard name beats a synonym for the same column.
        if canonical not in found or (is_exact and canonical not in exact):
            found[canonical] = idx
            if is_exact:
                exact.add(canonical)
    return found


def _is_missing(cell: str | None) -> bool:
    return cell is None or cell.strip().lower() in _MISSING_CELLS


def _parse_extra(cell: str) -> str | float:
    try:
        return float(cell)
    except ValueError:
        return cell


class _RowError(ValueError):
    pass


def _float_cell(row: Sequence[str], idx: int | None, column: str) -> float | None:
    if idx is None or idx >= len(row) or _is_missing(row[idx]):
        return None
    try:
        return float(row[idx])
    except ValueError:
        raise _RowError(f"column {column!r} must be a number, got {row[idx]!r}") from None


def _stem_from_cell(cell: str) -> str:
    name = cell.strip().replace("\\", "/").rsplit("/", 1)[-1]
    for suffix in (".png", ".jpg", ".jpeg"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _parse_row(
    row: Sequence[str], cols: Mapping[str, int], extra_cols: Sequence[tuple[int, str]]
) -> FrameRecord:
    def num(column: str) -> float | None:
        return _float_cell(row, cols.get(column), column)

    stem_idx = cols[STEM_COLUMN]
    stem = _stem_from_cell(row[stem_idx]) if stem_idx < len(row) else ""
    if not stem:
        raise _RowError("the stem cell is empty")

    timestamp = num(TIMESTAMP_COLUMN)
    if timestamp is None:
        for variant, scale in _TIMESTAMP_SCALES.items():
            if variant in cols:
                value = _float_cell(row, cols[variant], variant)
                timestamp = None if value is None else value * scale
                break
    if timestamp is None:
        raise _RowError("the timestamp cell is empty")

    latitude, longitude = num("latitude"), num("longitude")
    gps = None
    if latitude is not None and longitude is not None:
        status = num("gps_status")
        status_int = int(status) if status is not None and math.isfinite(status) else None
        gps = GpsFix(latitude, longitude, num("altitude"), status_int)

    angular = [num(c) for c in ANGULAR_VELOCITY_COLUMNS]
    linear = [num(c) for c in LINEAR_ACCELERATION_COLUMNS]
    if any(v is None for v in angular + linear):
        raise _RowError("IMU angular velocity / linear acceleration cells are empty")
    orientation = [num(c) for c in ORIENTATION_COLUMNS]
    imu = ImuSample(
        tuple(angular),  # type: ignore[arg-type]
        tuple(linear),  # type: ignore[arg-type]
        None if any(v is None for v in orientation) else tuple(orientation),  # type: ignore[arg-type]
    )

    wheels = [num(c) for c in ENCODER_COLUMNS]
    encoders = None if all(v is None for v in wheels) else WheelEncoders(*wheels)

    extras = {
        name: _parse_extra(row[idx])
        for idx, name in extra_cols
        if idx < len(row) and not _is_missing(row[idx])
    }
    return FrameRecord(stem, timestamp, imu, gps, encoders, extras)


def _parse_run_segment(path: Path) -> tuple[int | None, str]:
    m = _RUN_RE.match(path.parent.name)
    return (int(m.group(1)) if m else None), path.name


def read_segment(
    path: str | os.PathLike, *, aliases: Mapping[str, str] | None = None, check_files: bool = True
) -> Segment:
    """Read ``<path>/metadata.csv`` into a ``Segment``.

    Missing GPS/encoder columns or empty cells give ``None`` fields; unknown columns are
    kept as extras. ``aliases`` maps extra header names to standard columns. With
    ``check_files`` every row's RGB and depth PNG must exist (FileNotFoundError otherwise).
    An unterminated, unparseable last line (a write torn by a crash) is skipped with a warning.
    """
    path = Path(path)
    csv_path = path / METADATA_FILE
    if not path.is_dir():
        raise FileNotFoundError(f"segment directory {path} does not exist")
    if not csv_path.is_file():
        raise FileNotFoundError(f"segment {path} has no {METADATA_FILE}")
    text = csv_path.read_text(encoding="utf-8-sig")
    run, name = _parse_run_segment(path)
    if not text.strip():
        warnings.warn(f"{csv_path} is empty; reading segment as 0 frames", stacklevel=2)
        return Segment(path, run, name, [], (), {})
    torn_tail = not text.endswith(("\n", "\r"))
    rows = list(csv.reader(io.StringIO(text, newline="")))
    header = [h.strip() for h in rows[0]]
    cols = map_columns(header, aliases)
    if STEM_COLUMN not in cols:
        raise ValueError(
            f"{csv_path}: no file-name column (expected {STEM_COLUMN!r} or one of "
            f"{sorted(k for k, v in COLUMN_SYNONYMS.items() if v == STEM_COLUMN)}); header is {header}; "
            f"pass aliases={{'<column>': {STEM_COLUMN!r}}}"
        )
    has_time = TIMESTAMP_COLUMN in cols or any(v in cols for v in _TIMESTAMP_SCALES)
    missing_imu = [c for c in ANGULAR_VELOCITY_COLUMNS + LINEAR_ACCELERATION_COLUMNS if c not in cols]
    if not has_time or missing_imu:
        need = ([TIMESTAMP_COLUMN] if not has_time else []) + missing_imu
        raise ValueError(
            f"{csv_path}: missing required columns {need}; header is {header}; "
            f"map them with aliases={{'<column>': '<standard name>'}}"
        )
    used = set(cols.values())
    extra_cols = [(i, h) for i, h in enumerate(header) if i not in used and h]

    frames: list[FrameRecord] = []
    body = rows[1:]
    for n, row in enumerate(body):
        line_no = n + 2
        if not any(cell.strip() for cell in row):
            continue
        is_last = n == len(body) - 1
        try:
            if len(row) > len(header):
                raise _RowError(f"{len(row)} cells for {len(header)} columns")
            if is_last and torn_tail and len(row) != len(header):
                raise _RowError(f"{len(row)} cells for {len(header)} columns")
            frames.append(_parse_row(row, cols, extra_cols))
        except _RowError as exc:
            if is_last and torn_tail:
                warnings.warn(
                    f"{csv_path} line {line_no}: skipping unterminated last row ({exc})", stacklevel=2
                )
                continue
            raise ValueError(f"{csv_path} line {line_no}: {exc}") from None

    seen: set[str] = set()
    for frame in frames:
        if frame.stem in seen:
            raise ValueError(f"{csv_path}: stem {frame.stem!r} appears in more than one row")
        seen.add(frame.stem)

    segment = Segment(path, run, name, frames, tuple(header), {header[i]: c for c, i in cols.items()})
    if check_files:
        for i, frame in enumerate(frames):
            missing = [str(p) for p in (segment.rgb_path(i), segment.depth_path(i)) if not p.is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{csv_path}: row for stem {frame.stem!r} has missing files {missing}"
                )
    return segment


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read a colour PNG as an HxWx3 ``uint8`` RGB array."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"RGB image {path} does not exist")
    bgr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if bgr is None:
        raise ValueError(f"RGB image {path} is not a readable image")
    if bgr.dtype != np.uint8 or bgr.ndim != 3 or bgr.shape[2] not in (3, 4):
        raise ValueError(f"RGB image {path} must be 8-bit colour, got shape {bgr.shape} dtype {bgr.dtype}")
    return np.ascontiguousarray(bgr[..., 2::-1])


def load_depth(path: str | os.PathLike) -> np.ndarray:
    """Read a 16-bit millimetre depth PNG as HxW ``float32`` metres (NaN invalid)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"depth image {path} does not exist")
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise ValueError(f"depth image {path} is not a readable image")
    if raw.dtype != np.uint16 or raw.ndim != 2:
        raise ValueError(
            f"depth image {path} must be a single-channel 16-bit PNG in millimetres, "
            f"got shape {raw.shape} dtype {raw.dtype}"
        )
    return decode_depth_mm(raw)


def load_frame(segment: Segment, i: int) -> tuple[np.ndarray, np.ndarray, FrameRecord]:
    """Frame ``i`` of ``segment``: (RGB HxWx3 uint8, depth HxW float32 metres NaN invalid, record)."""
    n = len(segment.frames)
    if not -n <= i < n:
        raise IndexError(f"frame index {i} out of range for segment {segment.path} with {n} frames")
    rgb = load_rgb(segment.rgb_path(i))
    depth = load_depth(segment.depth_path(i))
    if depth.shape != rgb.shape[:2]:
        raise ValueError(
            f"frame {segment.frames[i].stem!r} of {segment.path}: depth size {depth.shape[::-1]} "
            f"differs from RGB size {rgb.shape[1::-1]}"
        )
    return rgb, depth, segment.frames[i]


# --------------------------------------------------------------------------- dataset


def _is_abandoned(seg_dir: Path) -> bool:
    # A writer that died before the header landed leaves empty folders / hidden temp files only.
    for p in seg_dir.rglob("*"):
        if p.is_file() and not p.name.startswith("."):
            return False
    return True


def iter_segments(
    root: str | os.PathLike, *, aliases: Mapping[str, str] | None = None, check_files: bool = True
) -> Iterator[Segment]:
    """Segments under ``root`` in (run number, segment order), read one at a time."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist")
    for _, run_dir in _run_dirs(root):
        for seg_dir in _segment_dirs(run_dir):
            if not (seg_dir / METADATA_FILE).exists() and _is_abandoned(seg_dir):
                continue
            yield read_segment(seg_dir, aliases=aliases, check_files=check_files)


@dataclass
class ForestDataset:
    """All segments under a root, indexable frame by frame across segments."""

    root: Path
    segments: list[Segment]

    def __post_init__(self) -> None:
        self._offsets = np.cumsum([0] + [len(s) for s in self.segments])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, FrameRecord]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"frame index {i} out of range for dataset {self.root} with {n} frames")
        i %= n
        s = int(np.searchsorted(self._offsets, i, side="right")) - 1
        return load_frame(self.segments[s], i - int(self._offsets[s]))

    @property
    def runs(self) -> list[int]:
        """Run numbers present, ascending."""
        return sorted({s.run for s in self.segments if s.run is not None})

    def segment(self, run: int, name: str) -> Segment:
        """The segment ``Run-<run>/<name>``."""
        for s in self.segments:
            if s.run == run and s.name == name:
                return s
        raise KeyError(f"no segment Run-{run}/{name} under {self.root}")


def open_dataset(
    root: str | os.PathLike, *, aliases: Mapping[str, str] | None = None, check_files: bool = True
) -> ForestDataset:
    """Read every segment's metadata under ``root`` (images are loaded on access)."""
    return ForestDataset(Path(root), list(iter_segments(root, aliases=aliases, check_files=check_files)))


def _unindexed_files(segment: Segment) -> int:
    indexed = {f.stem + IMAGE_SUFFIX for f in segment.frames}
    count = 0
    for sub in (RGB_DIR, DEPTH_DIR):
        folder = segment.path / sub
        if folder.is_dir():
            count += sum(1 for p in folder.iterdir() if p.is_file() and p.name not in indexed)
    return count


def dataset_summary(
    root: str | os.PathLike, *, aliases: Mapping[str, str] | None = None, check_files: bool = False
) -> dict:
    """Counts of runs, segments and frames, and which segments carry GPS / encoders.

    ``unindexed_files`` counts files in the image folders without a metadata row (temp
    files or the half-written frame of an interrupted recording).
    """
    dataset = open_dataset(root, aliases=aliases, check_files=check_files)
    per_segment = []
    for s in dataset.segments:
        per_segment.append(
            {
                "run": s.run,
                "segment": s.name,
                "path": str(s.path),
                "frames": len(s),
                "gps_frames": sum(f.gps is not None for f in s.frames),
                "encoder_frames": sum(f.encoders is not None for f in s.frames),
                "has_gps": s.has_gps,
                "has_encoders": s.has_encoders,
                "extra_columns": [c for c in s.columns if c not in s.column_map],
                "unindexed_files": _unindexed_files(s),
            }
        )
    return {
        "root": str(dataset.root),
        "runs": len(dataset.runs),
        "segments": len(dataset.segments),
        "frames": len(dataset),
        "segments_with_gps": [s.segment_id for s in dataset.segments if s.has_gps],
        "segments_with_encoders": [s.segment_id for s in dataset.segments if s.has_encoders],
        "per_segment": per_segment,
    }
