"""``metadata.csv`` of a segment: its columns, how a header is matched, and rows to and from ``FrameRecord``.

Column names, units and the matching rules for other datasets' headers are in docs/dataset_layout.md.
Pure core: numpy and the standard library.
"""

from __future__ import annotations

import csv
import io
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from forest_perception.readings import GpsFix, ImuSample, WheelEncoders

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
"""Standard ``metadata.csv`` columns in the order they are written."""

MISSING_CELLS = frozenset({"", "--", "na", "n/a", "none", "null"})
"""Cells that mean "not recorded" (lower case); "--" is how the dataset README marks missing metadata."""


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
            f"g{axis}",
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

TIMESTAMP_SCALES = {
    "timestamp_ms": 1e-3,
    "time_ms": 1e-3,
    "timestamp_us": 1e-6,
    "timestamp_ns": 1e-9,
    "time_ns": 1e-9,
}
"""Timestamp columns in other units -> their factor to seconds."""

STEM_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")
"""A plain file-name stem: letters, digits, ``_ . + -``, not starting with ``.`` or ``-``."""

ALIAS_HINT = "map it with --column-alias NAME=COLUMN or column_aliases in forest_dataset.yaml"
"""How a user maps a column of their own name onto a standard one (the flag and the settings file)."""


@dataclass(frozen=True)
class FrameRecord:
    """The ``metadata.csv`` row of one RGB/depth pair.

    ``timestamp`` is None only for a dataset without a time column; ``imu`` is None for a frame without an
    IMU reading (``imu_from_values`` has the rule), ``gps`` and ``encoders`` when not recorded.
    """

    stem: str
    timestamp: float | None
    imu: ImuSample | None = None
    gps: GpsFix | None = None
    encoders: WheelEncoders | None = None
    extras: Mapping[str, str | float] = field(default_factory=dict)


# --------------------------------------------------------------------------- writing


def _cell(value: float | int | str | None) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    return repr(float(value))


def record_cells(record: FrameRecord, extra_columns: Sequence[str]) -> list[str]:
    """The cells of ``record``'s row: the standard columns, then ``extra_columns`` (no IMU: empty IMU cells)."""
    gps = record.gps
    imu = record.imu
    enc = record.encoders
    orientation = imu.orientation if imu is not None and imu.orientation is not None else (None,) * 4
    angular = imu.angular_velocity if imu is not None else (None,) * 3
    linear = imu.linear_acceleration if imu is not None else (None,) * 3
    cells = [record.stem, _cell(record.timestamp)]
    cells += [
        _cell(gps.latitude if gps else None),
        _cell(gps.longitude if gps else None),
        _cell(gps.altitude if gps else None),
        _cell(gps.status if gps else None),
    ]
    cells += [_cell(v) for v in orientation]
    cells += [_cell(v) for v in angular]
    cells += [_cell(v) for v in linear]
    cells += [
        _cell(enc.left_position if enc else None),
        _cell(enc.right_position if enc else None),
        _cell(enc.left_velocity if enc else None),
        _cell(enc.right_velocity if enc else None),
    ]
    cells += [_cell(record.extras.get(name)) for name in extra_columns]
    return cells


def csv_line(cells: Sequence[str]) -> str:
    """One CSV line (with its newline) of ``cells``."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(cells)
    return buf.getvalue()


def check_extra_columns(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` as extra columns; ``ValueError`` for a blank, repeated or standard name (or a synonym of one)."""
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


# --------------------------------------------------------------------------- reading


def _normalise(header: str) -> str:
    name = re.sub(r"\s*[\[(][^\])]*[\])]\s*$", "", header.strip())  # drop "[s]" / "(deg)"
    name = re.sub(r"[\s.\-/]+", "_", name.lower())
    return re.sub(r"_+", "_", name).strip("_")


def check_aliases(aliases: Mapping[str, str] | None) -> None:
    """``ValueError`` unless every alias maps a column name onto a standard column (or '' = keep it plain)."""
    allowed = set(METADATA_COLUMNS) | set(TIMESTAMP_SCALES)
    for name, target in (aliases or {}).items():
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"a column alias needs a column name, got {name!r}")
        if not isinstance(target, str) or (target and target not in allowed):
            raise ValueError(
                f"column alias {name}={target}: {target!r} is not a standard column; the standard columns are "
                f"{', '.join(METADATA_COLUMNS)} (or timestamp_ms/_us/_ns; nothing after '=' keeps {name!r} a "
                f"plain column)"
            )


def _canonical(header: str, aliases: Mapping[str, str] | None) -> str | None:
    if aliases and header in aliases:
        return aliases[header] or None
    norm = _normalise(header)
    if aliases:
        for key, value in aliases.items():
            if _normalise(key) == norm:
                return value or None
    if norm in METADATA_COLUMNS:
        return norm
    if norm in TIMESTAMP_SCALES:
        return norm
    return COLUMN_SYNONYMS.get(norm)


def map_columns(header: Sequence[str], aliases: Mapping[str, str] | None) -> dict[str, int]:
    """Standard column (or a scaled timestamp variant) -> index in ``header``.

    An incomplete group of IMU columns (some of the three gyro and three accelerometer columns, or some of the
    four orientation columns) is left unmapped: those columns stay plain columns, nothing is read from them.
    """
    check_aliases(aliases)
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
    for group in (ANGULAR_VELOCITY_COLUMNS + LINEAR_ACCELERATION_COLUMNS, ORIENTATION_COLUMNS):
        if not all(c in found for c in group):
            for c in group:
                found.pop(c, None)
    return found


def incomplete_column_groups(header: Sequence[str], aliases: Mapping[str, str] | None) -> list[tuple[str, list[str]]]:
    """(group, header names) of every IMU column group the header has only part of; ``map_columns`` reads none
    of those columns."""
    out = []
    for group, columns in (
        ("IMU gyro/accelerometer", ANGULAR_VELOCITY_COLUMNS + LINEAR_ACCELERATION_COLUMNS),
        ("IMU orientation", ORIENTATION_COLUMNS),
    ):
        matched = [h for h in header if _canonical(h, aliases) in columns]
        if matched and len({_canonical(h, aliases) for h in matched}) < len(columns):
            out.append((f"{group} ({', '.join(columns)})", matched))
    return out


def is_missing(cell: str | None) -> bool:
    """True for a cell that means "not recorded" (``MISSING_CELLS``)."""
    return cell is None or cell.strip().lower() in MISSING_CELLS


def _parse_extra(cell: str) -> str | float:
    try:
        return float(cell)
    except ValueError:
        return cell


class RowError(ValueError):
    """A row that cannot be read; the caller adds the file and line."""


def _float_cell(row: Sequence[str], idx: int | None, column: str, name: str = "") -> float | None:
    """The number in ``row[idx]`` (None when missing); ``RowError`` naming the column (``name`` in the file)."""
    if idx is None or idx >= len(row) or is_missing(row[idx]):
        return None
    try:
        return float(row[idx])
    except ValueError:
        name = name or column
        if name == column:
            raise RowError(f"column {column!r} must be a number, got {row[idx]!r}") from None
        raise RowError(
            f"column {name!r} (read as {column}) must be a number, got {row[idx]!r}; if {name!r} is not {column}, "
            f"keep it a plain column with --column-alias {name}= or column_aliases in forest_dataset.yaml"
        ) from None


def stem_from_cell(cell: str) -> str:
    """The file stem a file-name cell names: a bare stem, a name with an image suffix, or a path."""
    name = cell.strip().replace("\\", "/").rsplit("/", 1)[-1]
    for suffix in (".png", ".jpg", ".jpeg"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def imu_problem(angular: Sequence[float | None], linear: Sequence[float | None]) -> str:
    """Why a row's gyro / accelerometer values break the IMU rule ('' when they follow it).

    The rule, one for every tool (extract, the writer, the reader, curate, split, validate): a frame either
    has an IMU reading (all six gyro and accelerometer values, finite) or has none (all six cells empty: a
    frame recorded before the first IMU message, or a dataset without IMU columns); six cells half filled
    are an error.
    """
    values = list(angular) + list(linear)
    given = [v is not None for v in values]
    if any(given) and not all(given):
        return (
            f"IMU cells are only partly filled ({sum(given)} of 6 gyro/accelerometer values); "
            "a frame has all six or, without an IMU reading, none"
        )
    if all(given) and not all(math.isfinite(v) for v in values):  # type: ignore[arg-type]
        return "IMU gyro/accelerometer values must be finite numbers; a frame without an IMU reading has empty cells"
    return ""


def imu_from_values(
    angular: Sequence[float | None], linear: Sequence[float | None], orientation: Sequence[float | None]
) -> ImuSample | None:
    """The ``ImuSample`` of a row's IMU values, None for a frame without an IMU reading (``imu_problem``'s rule).

    ``RowError`` for values that break the rule; an orientation with a missing component is None.
    """
    why = imu_problem(angular, linear)
    if why:
        raise RowError(why)
    if any(v is None for v in angular):
        return None
    return ImuSample(
        tuple(angular),  # type: ignore[arg-type]
        tuple(linear),  # type: ignore[arg-type]
        None if any(v is None for v in orientation) else tuple(orientation),  # type: ignore[arg-type]
    )


def parse_row(
    row: Sequence[str],
    cols: Mapping[str, int],
    extra_cols: Sequence[tuple[int, str]],
    header: Sequence[str] | None = None,
) -> FrameRecord:
    """The ``FrameRecord`` of one row; ``RowError`` saying which cell is wrong (by its ``header`` name)."""

    def num(column: str) -> float | None:
        idx = cols.get(column)
        name = header[idx] if header is not None and idx is not None and idx < len(header) else column
        return _float_cell(row, idx, column, name)

    stem_idx = cols[STEM_COLUMN]
    stem = stem_from_cell(row[stem_idx]) if stem_idx < len(row) else ""
    if not stem:
        raise RowError("the stem cell is empty")

    timestamp = num(TIMESTAMP_COLUMN)
    if timestamp is None:
        for variant, scale in TIMESTAMP_SCALES.items():
            if variant in cols:
                value = _float_cell(row, cols[variant], variant)
                timestamp = None if value is None else value * scale
                break

    latitude, longitude = num("latitude"), num("longitude")
    gps = None
    if latitude is not None and longitude is not None:
        status = num("gps_status")
        status_int = int(status) if status is not None and math.isfinite(status) else None
        gps = GpsFix(latitude, longitude, num("altitude"), status_int)

    imu = imu_from_values(
        [num(c) for c in ANGULAR_VELOCITY_COLUMNS],
        [num(c) for c in LINEAR_ACCELERATION_COLUMNS],
        [num(c) for c in ORIENTATION_COLUMNS],
    )

    wheels = [num(c) for c in ENCODER_COLUMNS]
    encoders = None if all(v is None for v in wheels) else WheelEncoders(*wheels)

    extras = {
        name: _parse_extra(row[idx])
        for idx, name in extra_cols
        if idx < len(row) and not is_missing(row[idx])
    }
    return FrameRecord(stem, timestamp, imu, gps, encoders, extras)


def parse_metadata(
    text: str, csv_path: Path, aliases: Mapping[str, str] | None = None
) -> tuple[list[str], dict[str, int], list[FrameRecord]]:
    """(header, standard column -> index, one ``FrameRecord`` per row) of a ``metadata.csv``'s non-empty text.

    Only the file-name column is required (it pairs the RGB and depth images); every other standard column
    is read when present and every unknown column is kept in ``FrameRecord.extras``. ``ValueError`` naming
    ``csv_path`` and the line for a missing file-name column, text that is not CSV or a bad row; an
    unterminated, unparseable last line (a write torn by a crash) is skipped with a warning.
    """
    torn_tail = not text.endswith(("\n", "\r"))
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        rows = list(reader)
    except csv.Error as exc:
        raise ValueError(f"{csv_path} line {reader.line_num}: not valid CSV text ({exc})") from None
    header = [h.strip() for h in rows[0]]
    try:
        cols = map_columns(header, aliases)
    except ValueError as exc:
        raise ValueError(f"{csv_path}: {exc}") from None
    if STEM_COLUMN not in cols:
        raise ValueError(
            f"{csv_path}: no file-name column (expected {STEM_COLUMN!r} or one of "
            f"{sorted(k for k, v in COLUMN_SYNONYMS.items() if v == STEM_COLUMN)}); header is {header}; "
            f"{ALIAS_HINT} (COLUMN {STEM_COLUMN})"
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
                raise RowError(f"{len(row)} cells for {len(header)} columns")
            if is_last and torn_tail and len(row) != len(header):
                raise RowError(f"{len(row)} cells for {len(header)} columns")
            frames.append(parse_row(row, cols, extra_cols, header))
        except RowError as exc:
            if is_last and torn_tail:
                # stacklevel 3: the warning points at whoever asked to read the segment
                warnings.warn(f"{csv_path} line {line_no}: skipping unterminated last row ({exc})", stacklevel=3)
                continue
            raise ValueError(f"{csv_path} line {line_no}: {exc}") from None

    seen: set[str] = set()
    for frame in frames:
        if frame.stem in seen:
            raise ValueError(f"{csv_path}: stem {frame.stem!r} appears in more than one row")
        seen.add(frame.stem)
    return header, cols, frames
