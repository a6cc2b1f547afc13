"""Check a dataset folder in the forest layout and report every problem with its file, not just the first.

``validate_dataset`` collects ``Problem`` records (error or warning, path, message); the checks and what
counts as an error are listed in docs/dataset_tools.md ("validate"). Pure core, never rclpy.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from forest_perception.dataset_tools.curate import CURATION_CSV, CURATION_JSON
from forest_perception.dataset_tools.images import (
    IMAGE_SUFFIX,
    SETTINGS_FILE,
    DepthEncoding,
    DepthScaleError,
    grayscale_depth,
    png_info,
)
from forest_perception.dataset_tools.layout import (
    DEPTH_DIR,
    METADATA_FILE,
    RGB_DIR,
    RUN_PATTERN,
    SEGMENT_PATTERN,
    STYLE_FILE,
)
from forest_perception.dataset_tools.metadata import (
    ALIAS_HINT,
    ANGULAR_VELOCITY_COLUMNS,
    ENCODER_COLUMNS,
    GPS_COLUMNS,
    LINEAR_ACCELERATION_COLUMNS,
    ORIENTATION_COLUMNS,
    STEM_COLUMN,
    STEM_PATTERN,
    TIMESTAMP_COLUMN,
    TIMESTAMP_SCALES,
    imu_problem,  # the one rule for a frame's IMU cells, as the reader and the writer use it
    incomplete_column_groups,
    is_missing,
    map_columns,  # the reader's own header matching, so validate and the reader agree
    stem_from_cell,
)
from forest_perception.dataset_tools.parallel import parallel_map
from forest_perception.dataset_tools.report import REPORT_HTML
from forest_perception.dataset_tools.scores import SCORES_FILE
from forest_perception.dataset_tools.settings import DatasetSettings, load_settings
from forest_perception.dataset_tools.split import SPLIT_NAMES, SPLITS_JSON

ERROR = "error"
WARNING = "warning"

_NUMERIC_COLUMNS = (
    GPS_COLUMNS + ORIENTATION_COLUMNS + ANGULAR_VELOCITY_COLUMNS + LINEAR_ACCELERATION_COLUMNS + ENCODER_COLUMNS
)
ROOT_FILES = frozenset(
    {CURATION_CSV, CURATION_JSON, SPLITS_JSON, *(f"{name}.txt" for name in SPLIT_NAMES), REPORT_HTML, "README.md",
     SETTINGS_FILE}
)
"""Files our tools put at a dataset root; validate does not warn about them."""


@dataclass(frozen=True)
class Problem:
    """One finding: severity ('error' or 'warning'), the file or folder, and what is wrong."""

    severity: str
    path: Path
    message: str

    def line(self) -> str:
        """``ERROR   <path>: <message>``."""
        return f"{self.severity.upper():<7} {self.path}: {self.message}"


@dataclass(frozen=True)
class ValidateConfig:
    """Limits the checks hold a dataset to."""

    max_depth_m: float = 20.0
    """Depth beyond this is implausible for the RealSense-class sensors of the rovers."""
    max_far_fraction: float = 0.01
    """Error when more than this fraction of a depth image's valid pixels lies beyond ``max_depth_m``."""
    quaternion_tolerance: float = 0.01
    """Allowed deviation of the orientation quaternion's norm from 1."""
    decode: bool = True
    """Decode every PNG (corrupt data, depth range); False checks the PNG headers only."""
    workers: int | None = None
    """Decoding threads; None = one per core."""

    def validate(self) -> ValidateConfig:
        """Raise ``ValueError`` naming the first bad value."""
        if not (math.isfinite(self.max_depth_m) and self.max_depth_m > 0):
            raise ValueError(f"max_depth_m must be a positive number of metres, got {self.max_depth_m!r}")
        if not (0.0 <= self.max_far_fraction < 1.0):
            raise ValueError(f"max_far_fraction must be within [0, 1), got {self.max_far_fraction!r}")
        if not (0.0 < self.quaternion_tolerance < 1.0):
            raise ValueError(f"quaternion_tolerance must be within (0, 1), got {self.quaternion_tolerance!r}")
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 1):
            raise ValueError(f"workers must be a positive integer or None, got {self.workers!r}")
        return self


@dataclass
class ValidationReport:
    """Every problem found under ``root``, with what was checked."""

    root: Path
    problems: list[Problem] = field(default_factory=list)
    segments: int = 0
    frames: int = 0
    images_decoded: int = 0

    @property
    def errors(self) -> list[Problem]:
        """Problems of severity 'error'."""
        return [p for p in self.problems if p.severity == ERROR]

    @property
    def warnings(self) -> list[Problem]:
        """Problems of severity 'warning'."""
        return [p for p in self.problems if p.severity == WARNING]

    @property
    def ok(self) -> bool:
        """True when there is no error (warnings allowed)."""
        return not self.errors

    def lines(self) -> list[str]:
        """One line per problem, then a summary line."""
        out = [p.line() for p in self.problems]
        verdict = "OK" if self.ok else "FAILED"
        out.append(
            f"{verdict}: {len(self.errors)} error(s), {len(self.warnings)} warning(s) in {self.segments} segment(s), "
            f"{self.frames} frame(s) under {self.root}"
        )
        return out

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "root": str(self.root),
            "ok": self.ok,
            "segments": self.segments,
            "frames": self.frames,
            "images_decoded": self.images_decoded,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "problems": [{"severity": p.severity, "path": str(p.path), "message": p.message} for p in self.problems],
        }


class _Collector:
    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def error(self, path: Path, message: str) -> None:
        self.problems.append(Problem(ERROR, path, message))

    def warning(self, path: Path, message: str) -> None:
        self.problems.append(Problem(WARNING, path, message))


# --------------------------------------------------------------------------- metadata.csv


def _number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def _check_metadata(
    csv_path: Path, out: _Collector, aliases: Mapping[str, str] | None = None, quaternion_tolerance: float = 0.01
) -> list[tuple[str, int]] | None:
    """Check one ``metadata.csv``; returns the (stem, line number) of every row with a usable stem.

    None when the file cannot index any frame (unreadable, no header, no stem column).
    """
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        out.error(csv_path, f"is not a text file (byte {exc.start} is not UTF-8); it may be damaged")
        return None
    except OSError as exc:
        out.error(csv_path, f"cannot be read ({exc.strerror or exc})")
        return None
    if not text.strip():
        out.error(csv_path, "is empty (no header line)")
        return None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in next(reader)]
    except csv.Error as exc:
        out.error(csv_path, f"header line is not valid CSV ({exc})")
        return None
    try:
        cols = map_columns(header, aliases)
    except ValueError as exc:
        out.error(csv_path, str(exc))
        return None
    if STEM_COLUMN not in cols:
        out.error(
            csv_path,
            f"no file-name column ({STEM_COLUMN!r} or a synonym such as 'filename'); header is {header}; "
            f"{ALIAS_HINT} (COLUMN {STEM_COLUMN})",
        )
        return None
    time_col = (
        TIMESTAMP_COLUMN if TIMESTAMP_COLUMN in cols else next((v for v in TIMESTAMP_SCALES if v in cols), None)
    )
    if not time_col:
        out.warning(
            csv_path,
            f"no timestamp column (header is {header}): training reads the frames, but curate needs times; "
            f"{ALIAS_HINT} (COLUMN {TIMESTAMP_COLUMN})",
        )
    for group, names in incomplete_column_groups(header, aliases):
        out.warning(
            csv_path,
            f"only part of the {group} columns: {names}; none of them is read; {ALIAS_HINT}",
        )
    scale = TIMESTAMP_SCALES.get(time_col, 1.0) if time_col else 1.0
    torn_tail = not text.endswith(("\n", "\r"))

    rows: list[tuple[str, int]] = []
    seen: dict[str, int] = {}
    last_time: tuple[float, str, int] | None = None
    try:
        body = [(reader.line_num, row) for row in reader]
    except csv.Error as exc:
        out.error(csv_path, f"line {reader.line_num}: not valid CSV ({exc})")
        return rows
    for n, (line, row) in enumerate(body):
        if not any(cell.strip() for cell in row):
            continue
        where = f"line {line}"
        if n == len(body) - 1 and torn_tail and len(row) != len(header):
            out.warning(
                csv_path, f"{where}: last line is cut off ({len(row)} of {len(header)} cells); readers skip it"
            )
            continue
        if len(row) > len(header):
            out.error(csv_path, f"{where}: {len(row)} cells for {len(header)} columns")
            continue
        if len(row) < len(header):
            out.warning(
                csv_path, f"{where}: {len(row)} cells for {len(header)} columns (the missing ones read as empty)"
            )

        def cell(column: str, row: list[str] = row) -> str:
            idx = cols.get(column)
            return row[idx] if idx is not None and idx < len(row) else ""

        stem = stem_from_cell(cell(STEM_COLUMN))
        stem_ok = True
        if not stem:
            out.error(csv_path, f"{where}: the file-name cell is empty")
            stem_ok = False
        elif not STEM_PATTERN.match(stem):
            out.error(csv_path, f"{where}: stem {stem!r} is not a plain file name (letters, digits, '_.+-')")
            stem_ok = False
        elif stem in seen:
            out.error(csv_path, f"{where}: stem {stem!r} repeats the row at line {seen[stem]}")
            stem_ok = False
        else:
            seen[stem] = line
        label = f"{where} (stem {stem!r})"

        values: dict[str, float | None] = {}
        for column in _NUMERIC_COLUMNS:
            raw = cell(column)
            if column not in cols or is_missing(raw):
                values[column] = None
                continue
            value = _number(raw)
            if value is None or not math.isfinite(value):
                out.error(csv_path, f"{label}: column {column!r} must be a finite number, got {raw!r}")
            values[column] = value if value is not None and math.isfinite(value) else math.nan

        if time_col:
            raw = cell(time_col)
            t = None if is_missing(raw) else _number(raw)
            if t is None or not math.isfinite(t):
                out.error(csv_path, f"{label}: timestamp must be a finite number of seconds, got {raw!r}")
            else:
                t *= scale
                if last_time is not None and t <= last_time[0]:
                    out.error(
                        csv_path,
                        f"{label}: timestamp {t!r} is not after {last_time[0]!r} of stem {last_time[1]!r} "
                        f"(line {last_time[2]}); timestamps must increase strictly",
                    )
                last_time = (t, stem, line)

        imu_why = imu_problem(
            [values[c] for c in ANGULAR_VELOCITY_COLUMNS], [values[c] for c in LINEAR_ACCELERATION_COLUMNS]
        )
        if imu_why and "finite" not in imu_why:  # non-finite cells are reported above, cell by cell
            out.error(csv_path, f"{label}: {imu_why}")

        lat, lon = values["latitude"], values["longitude"]
        if (lat is None) != (lon is None):
            out.error(csv_path, f"{label}: latitude and longitude must both be given or both be empty")
        if lat is not None and math.isfinite(lat) and not -90.0 <= lat <= 90.0:
            out.error(csv_path, f"{label}: latitude {lat!r} is outside [-90, 90] degrees")
        if lon is not None and math.isfinite(lon) and not -180.0 <= lon <= 180.0:
            out.error(csv_path, f"{label}: longitude {lon!r} is outside [-180, 180] degrees")
        status = values["gps_status"]
        if status is not None and math.isfinite(status) and status not in (-1, 0, 1, 2):
            out.warning(csv_path, f"{label}: gps_status {status!r} is not a NavSatStatus value (-1, 0, 1, 2)")

        quat = [values[c] for c in ORIENTATION_COLUMNS]
        given = [q is not None for q in quat]
        if any(given) and not all(given):
            out.error(csv_path, f"{label}: orientation needs all of x, y, z, w or none")
        elif all(given) and all(math.isfinite(q) for q in quat):  # type: ignore[arg-type]
            norm = math.sqrt(sum(q * q for q in quat))  # type: ignore[operator]
            if abs(norm - 1.0) > quaternion_tolerance:
                out.error(
                    csv_path, f"{label}: orientation quaternion norm {norm:.4f} is not 1 (+-{quaternion_tolerance})"
                )

        if stem_ok:
            rows.append((stem, line))
    return rows


# --------------------------------------------------------------------------- images


def _check_pair_headers(rgb: Path, depth: Path, line: int, out: _Collector, encoding: DepthEncoding,
                        unstated: list[Path]) -> bool:
    """Existence, PNG type and matching size of one pair; True when both can be decoded further.

    A depth PNG of a bit depth ``encoding`` does not state goes to ``unstated`` (reported once per segment).
    """
    infos = {}
    for path, kind in ((rgb, "RGB"), (depth, "depth")):
        try:
            infos[kind] = png_info(path)
        except FileNotFoundError:
            out.error(path, f"{kind} image is missing (row at line {line} of {METADATA_FILE})")
        except ValueError as exc:
            out.error(path, f"{kind} image is not a PNG ({exc})")
    ok = True
    if "RGB" in infos:
        info = infos["RGB"]
        if info.colour_type == 6 and info.bit_depth == 8:
            out.warning(rgb, f"RGB image has an alpha channel ({info.describe()}); readers drop it")
        elif not info.is_rgb8:
            out.error(rgb, f"RGB image must be an 8-bit 3-channel PNG, got {info.describe()}")
            ok = False
    if "depth" in infos:
        bits = infos["depth"].depth_bits
        if bits is None:
            got = infos["depth"].describe()
            out.error(depth, f"depth image must be a single-channel 16-bit (millimetres) or 8-bit PNG, got {got}")
            ok = False
        else:
            try:
                encoding.scale_for(bits, depth)
            except DepthScaleError:
                unstated.append(depth)
                ok = False
    if len(infos) == 2:
        a, b = infos["RGB"], infos["depth"]
        if (a.width, a.height) != (b.width, b.height):
            out.error(
                depth, f"depth image is {b.width}x{b.height} but its RGB image {rgb.name} is {a.width}x{a.height}"
            )
            ok = False
    return ok and len(infos) == 2


def _decode_pair(task: tuple[str, str, float, float, DepthEncoding]) -> list[tuple[str, str, str]]:
    """Worker: decode one pair; (severity, path, message) of what is wrong."""
    rgb, depth, max_depth_m, max_far_fraction, encoding = task
    found = []
    if cv2.imread(rgb, cv2.IMREAD_UNCHANGED) is None:
        found.append((ERROR, rgb, "RGB image could not be decoded (corrupt PNG data)"))
    raw = cv2.imread(depth, cv2.IMREAD_UNCHANGED)
    if raw is None:
        found.append((ERROR, depth, "depth image could not be decoded (corrupt PNG data)"))
        return found
    try:
        values = grayscale_depth(raw, depth)
        metres = encoding.to_metres(values, depth)
    except ValueError as exc:
        found.append((ERROR, depth, str(exc).replace(f"depth image {depth} ", "depth image ")))
        return found
    valid = int(cv2.countNonZero(values))
    if valid == 0:
        found.append((WARNING, depth, "depth image has no valid pixel (all 0)"))
        return found
    with np.errstate(invalid="ignore"):
        far = int(np.count_nonzero(metres > max_depth_m))
    if far > max_far_fraction * valid:
        found.append(
            (
                ERROR,
                depth,
                f"{100 * far / valid:.1f} % of the valid depth pixels are beyond {max_depth_m:g} m "
                f"(max {np.nanmax(metres):.3f} m); wrong units or scale ({encoding.describe()})?",
            )
        )
    return found


# --------------------------------------------------------------------------- walk


def _check_image_folder(folder: Path, indexed: set[str], out: _Collector) -> None:
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") and p.name.endswith(".tmp"):
            out.warning(p, "stray temporary file of an interrupted write; safe to delete")
        elif p.is_dir():
            out.warning(p, "unexpected folder inside an image folder")
        elif p.suffix.lower() != IMAGE_SUFFIX:
            out.warning(p, f"unexpected file (not {IMAGE_SUFFIX})")
        elif p.stem not in indexed:
            out.warning(p, f"has no row in {METADATA_FILE}; readers ignore it")


def _check_segment(
    seg_dir: Path, out: _Collector, aliases: Mapping[str, str] | None, config: ValidateConfig, tasks: list,
    encoding: DepthEncoding,
) -> int:
    csv_path = seg_dir / METADATA_FILE
    if not csv_path.is_file():
        if all(p.name.startswith(".") for p in seg_dir.rglob("*") if p.is_file()):
            out.warning(seg_dir, "empty segment folder without metadata.csv (an abandoned write?)")
        else:
            out.error(seg_dir, f"segment folder has files but no {METADATA_FILE}")
        return 0
    for p in sorted(seg_dir.iterdir()):
        if p.name in (METADATA_FILE, RGB_DIR, DEPTH_DIR, SCORES_FILE, STYLE_FILE):
            continue
        if p.name.startswith(".") and p.name.endswith(".tmp"):
            out.warning(p, "stray temporary file of an interrupted write; safe to delete")
        else:
            out.warning(p, "unexpected entry in a segment folder")
    rows = _check_metadata(csv_path, out, aliases, config.quaternion_tolerance)
    if rows is None:
        return 0
    if not rows:
        out.warning(csv_path, "segment has no frames (header only)")
    folders_ok = True
    for sub in (RGB_DIR, DEPTH_DIR):
        if not (seg_dir / sub).is_dir():
            if rows:
                out.error(seg_dir / sub, f"folder is missing; {len(rows)} frame(s) in {METADATA_FILE} need it")
            folders_ok = False
    indexed = {stem for stem, _ in rows}
    for sub in (RGB_DIR, DEPTH_DIR):
        if (seg_dir / sub).is_dir():
            _check_image_folder(seg_dir / sub, indexed, out)
    if folders_ok:
        unstated: list[Path] = []
        for stem, line in rows:
            rgb = seg_dir / RGB_DIR / (stem + IMAGE_SUFFIX)
            depth = seg_dir / DEPTH_DIR / (stem + IMAGE_SUFFIX)
            if _check_pair_headers(rgb, depth, line, out, encoding, unstated) and config.decode:
                tasks.append((str(rgb), str(depth), config.max_depth_m, config.max_far_fraction, encoding))
        if unstated:
            more = f" ({len(unstated) - 1} more depth image(s) of this segment alike)" if len(unstated) > 1 else ""
            out.error(unstated[0], encoding.unstated_8bit().join(("8-bit depth image, and ", more)))
    return len(rows)


def validate_dataset(
    root: str | os.PathLike,
    config: ValidateConfig | None = None,
    *,
    aliases: Mapping[str, str] | None = None,
    progress: bool = False,
    settings: DatasetSettings | None = None,
) -> ValidationReport:
    """Check every segment under ``root``; never raises for a problem in the data, only reports it.

    The dataset is read as its ``forest_dataset.yaml`` says, with ``settings`` and ``aliases`` over it.
    Raises ``FileNotFoundError`` when ``root`` is not a folder.
    """
    config = (config or ValidateConfig()).validate()
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist or is not a folder")
    report = ValidationReport(root)
    out = _Collector()
    try:
        stated = load_settings(root)
    except ValueError as exc:
        out.error(root / SETTINGS_FILE, str(exc).replace(f"{root / SETTINGS_FILE}: ", "").replace(
            f"{root / SETTINGS_FILE} ", ""))
        stated = DatasetSettings(source=str(root / SETTINGS_FILE))
    resolved = stated.merged(settings).with_aliases(aliases)
    aliases = resolved.column_aliases
    encoding = resolved.depth_encoding()
    tasks: list = []
    runs = []
    for p in sorted(root.iterdir()):
        if RUN_PATTERN.match(p.name) and p.is_dir():
            runs.append(p)
        elif p.name.startswith(".") and p.name.endswith(".tmp"):
            out.warning(p, "stray temporary file of an interrupted write; safe to delete")
        elif p.is_dir() and not p.name.startswith("."):
            out.warning(p, "not a Run-<N> folder; ignored by readers")
        elif p.is_file() and p.name not in ROOT_FILES and not p.name.startswith("."):
            out.warning(p, "unexpected file at the dataset root")
    if not runs:
        out.error(root, "no Run-<N> folders: not a dataset in the Run-N/<segment>/ layout")
    for run_dir in sorted(runs, key=lambda p: int(RUN_PATTERN.match(p.name).group(1))):  # type: ignore[union-attr]
        segments = [p for p in sorted(run_dir.iterdir(), key=lambda p: (len(p.name), p.name))]
        seg_dirs = [p for p in segments if p.is_dir() and SEGMENT_PATTERN.match(p.name)]
        for p in segments:
            if p not in seg_dirs:
                out.warning(p, "not a segment folder (segments are named a, b, ..., z, aa, ...); ignored by readers")
        if not seg_dirs:
            out.warning(run_dir, "run folder holds no segment")
        for seg_dir in seg_dirs:
            report.segments += 1
            report.frames += _check_segment(seg_dir, out, aliases, config, tasks, encoding)
    if tasks:
        for found in parallel_map(_decode_pair, tasks, workers=config.workers, progress=progress, desc="decode"):
            for severity, path, message in found:
                out.problems.append(Problem(severity, Path(path), message))
        report.images_decoded = 2 * len(tasks)
    report.problems = sorted(out.problems, key=lambda p: str(p.path))  # stable: a file's findings in order
    return report
