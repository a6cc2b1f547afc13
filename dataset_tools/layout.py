"""Reader and writer of the forest dataset layout: ``Run-N/<segment>/{rgb_image/, depth_image/, metadata.csv}``.

The layout, the depth encoding, the ``metadata.csv`` columns and the crash-safety rules are described in
docs/dataset_layout.md; ``images`` holds the PNG side and ``metadata`` the CSV side, both re-exported here.
Pure core: numpy, OpenCV and the standard library, never rclpy.
"""

from __future__ import annotations

import io
import math
import os
import re
import shutil
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from forest_perception.dataset_tools.images import (
    DEPTH_INVALID,
    DEPTH_MAX_MM,
    DEPTH_SCALE_MM_PER_M,
    IMAGE_SUFFIX,
    DepthEncoding,
    decode_depth_mm,
    encode_depth_mm,
    encode_png,
    load_depth,
    load_rgb,
    png_info,
    write_atomic,
)
from forest_perception.dataset_tools.metadata import (
    ANGULAR_VELOCITY_COLUMNS,
    COLUMN_SYNONYMS,
    ENCODER_COLUMNS,
    GPS_COLUMNS,
    IMU_COLUMNS,
    LINEAR_ACCELERATION_COLUMNS,
    METADATA_COLUMNS,
    ORIENTATION_COLUMNS,
    STEM_COLUMN,
    STEM_PATTERN,
    TIMESTAMP_COLUMN,
    FrameRecord,
    check_extra_columns,
    csv_line,
    imu_problem,
    map_columns,
    parse_metadata,
    record_cells,
)
from forest_perception.dataset_tools.settings import DatasetSettings, dataset_root_of, resolve_settings
from forest_perception.readings import GpsFix, ImuSample, WheelEncoders

__all__ = [
    "ANGULAR_VELOCITY_COLUMNS",
    "COLUMN_SYNONYMS",
    "DEPTH_DIR",
    "DEPTH_INVALID",
    "DEPTH_MAX_MM",
    "DEPTH_SCALE_MM_PER_M",
    "ENCODER_COLUMNS",
    "GPS_COLUMNS",
    "IMAGE_SUFFIX",
    "IMU_COLUMNS",
    "LINEAR_ACCELERATION_COLUMNS",
    "METADATA_COLUMNS",
    "METADATA_FILE",
    "ORIENTATION_COLUMNS",
    "RGB_DIR",
    "RUN_PATTERN",
    "RUN_PREFIX",
    "SEGMENT_PATTERN",
    "STEM_COLUMN",
    "TIMESTAMP_COLUMN",
    "DatasetSettings",
    "DepthEncoding",
    "ForestDataset",
    "FrameRecord",
    "GpsFix",
    "ImuSample",
    "Segment",
    "SegmentWriter",
    "WheelEncoders",
    "check_depth_encoding",
    "dataset_summary",
    "decode_depth_mm",
    "encode_depth_mm",
    "frame_stem",
    "iter_segments",
    "load_depth",
    "load_frame",
    "load_rgb",
    "map_columns",
    "next_segment_name",
    "open_dataset",
    "read_segment",
    "run_dir_name",
    "segment_index",
    "segment_key",
    "segment_name",
]

RGB_DIR = "rgb_image"
DEPTH_DIR = "depth_image"
METADATA_FILE = "metadata.csv"
STYLE_FILE = "style.json"
"""Beside a synthetic segment's metadata.csv (``forest-dataset synth --style``): what forest style made it."""
RUN_PREFIX = "Run-"
RUN_PATTERN = re.compile(rf"^{re.escape(RUN_PREFIX)}(\d+)$")
"""A run folder's name; group 1 is its number."""
SEGMENT_PATTERN = re.compile(r"^[a-z]+$")
"""A segment folder's name: a, b, ..., z, aa, ab, ..."""


# --------------------------------------------------------------------------- naming


def frame_stem(index: int, width: int = 6) -> str:
    """Zero-padded frame index used as a file stem: ``frame_stem(42) == '000042'``."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"frame index must be a non-negative int, got {index!r}")
    return f"{int(index):0{width}d}"


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
    if not isinstance(name, str) or not SEGMENT_PATTERN.match(name):
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


def segment_key(segment: Segment) -> str:
    """``Run-N/<segment>``, the dataset-relative name of a segment."""
    run = run_dir_name(segment.run) if segment.run is not None else segment.path.parent.name
    return f"{run}/{segment.name}"


def next_segment_name(root: str | os.PathLike, run: int) -> str:
    """First segment name after the existing segments of ``Run-<run>`` ('a' for a new run)."""
    run_dir = Path(root) / run_dir_name(run)
    existing = [segment_index(p.name) for p in _segment_dirs(run_dir)] if run_dir.is_dir() else []
    return segment_name(max(existing) + 1 if existing else 0)


def _segment_dirs(run_dir: Path) -> list[Path]:
    dirs = [p for p in run_dir.iterdir() if p.is_dir() and SEGMENT_PATTERN.match(p.name)]
    return sorted(dirs, key=lambda p: segment_index(p.name))


def _run_dirs(root: Path) -> list[tuple[int, Path]]:
    runs = []
    for p in root.iterdir():
        m = RUN_PATTERN.match(p.name)
        if m and p.is_dir():
            runs.append((int(m.group(1)), p))
    return sorted(runs)


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
            self._extra_columns = check_extra_columns(extra_columns)
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
                        f"segment {self.path} already exists and was left as it is; write to segment "
                        f"{next_segment_name(self.root, self.run)!r}, another run or another folder, or replace "
                        f"it on purpose (--overwrite)"
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
        write_atomic(csv_path, csv_line(self.columns).encode("utf-8"), self.fsync)
        self._csv = open(csv_path, "a", encoding="utf-8", newline="")

    def write_frame(self, rgb: np.ndarray, depth_m: np.ndarray, record: FrameRecord) -> None:
        """Validate and write one RGB (``rgb8``, HxWx3 uint8) / depth (HxW float metres) pair."""
        if self._closed:
            raise RuntimeError(f"writer for {self.path} is closed")
        self._validate(rgb, depth_m, record)
        if self._extra_columns is None:
            self._extra_columns = check_extra_columns(tuple(record.extras))
            self._open_csv()
        unknown = sorted(set(record.extras) - set(self._extra_columns))
        if unknown:
            raise ValueError(
                f"record {record.stem!r} has extras {unknown} that are not columns of this segment "
                f"(extra columns: {list(self._extra_columns)}); declare them with extra_columns="
            )
        line = csv_line(record_cells(record, self._extra_columns))

        rgb_png = encode_png(np.ascontiguousarray(rgb[..., ::-1]), "RGB")  # OpenCV writes BGR
        depth_png = encode_png(encode_depth_mm(depth_m), "depth")
        name = record.stem + IMAGE_SUFFIX
        write_atomic(self.path / RGB_DIR / name, rgb_png, self.fsync)
        write_atomic(self.path / DEPTH_DIR / name, depth_png, self.fsync)
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
        if not isinstance(stem, str) or not STEM_PATTERN.match(stem):
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
        if record.imu is not None:
            if not isinstance(record.imu, ImuSample):
                raise ValueError(f"record.imu must be an ImuSample or None, got {type(record.imu).__name__}")
            why = imu_problem(record.imu.angular_velocity, record.imu.linear_acceleration)
            orientation = record.imu.orientation
            if not why and orientation is not None and not all(math.isfinite(v) for v in orientation):
                why = "IMU orientation must be finite (or None)"
            if why:
                raise ValueError(f"record {stem!r}: {why}; a frame without an IMU reading has imu=None")
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
    settings: DatasetSettings = field(default_factory=DatasetSettings)
    """How the dataset is read (depth encoding, column aliases): its forest_dataset.yaml and the flags."""

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def depth_encoding(self) -> DepthEncoding:
        """How this segment's depth PNGs map to metres."""
        return self.settings.depth_encoding()

    @property
    def has_timestamps(self) -> bool:
        """True when every frame has a timestamp (a dataset may lack a time column)."""
        return all(f.timestamp is not None for f in self.frames)

    @property
    def has_imu(self) -> bool:
        """True when at least one frame has an IMU reading."""
        return any(f.imu is not None for f in self.frames)

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


def _parse_run_segment(path: Path) -> tuple[int | None, str]:
    m = RUN_PATTERN.match(path.parent.name)
    return (int(m.group(1)) if m else None), path.name


def read_segment(
    path: str | os.PathLike,
    *,
    aliases: Mapping[str, str] | None = None,
    check_files: bool = True,
    settings: DatasetSettings | None = None,
) -> Segment:
    """Read ``<path>/metadata.csv`` into a ``Segment``.

    Missing GPS/encoder/IMU/time columns or empty cells give ``None`` fields; unknown columns are
    kept as extras. The dataset's ``forest_dataset.yaml`` (at the root above ``Run-N``) is read, then
    ``settings`` and ``aliases`` (header name -> standard column) override it. With ``check_files``
    every row's RGB and depth PNG must exist (FileNotFoundError otherwise). An unterminated,
    unparseable last line (a write torn by a crash) is skipped with a warning.
    """
    path = Path(path)
    return _read_segment(path, resolve_settings(dataset_root_of(path), settings, aliases), check_files)


def _read_segment(path: Path, settings: DatasetSettings, check_files: bool) -> Segment:
    csv_path = path / METADATA_FILE
    if not path.is_dir():
        raise FileNotFoundError(f"segment directory {path} does not exist")
    if not csv_path.is_file():
        raise FileNotFoundError(f"segment {path} has no {METADATA_FILE}")
    text = read_text_file(csv_path)
    run, name = _parse_run_segment(path)
    if not text.strip():
        warnings.warn(f"{csv_path} is empty; reading segment as 0 frames", stacklevel=3)
        return Segment(path, run, name, [], (), {}, settings)
    header, cols, frames = parse_metadata(text, csv_path, settings.column_aliases)
    segment = Segment(path, run, name, frames, tuple(header), {header[i]: c for c, i in cols.items()}, settings)
    if check_files:
        for i, frame in enumerate(frames):
            missing = [str(p) for p in (segment.rgb_path(i), segment.depth_path(i)) if not p.is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{csv_path}: row for stem {frame.stem!r} has missing files {missing}"
                )
    return segment


def read_text_file(path: Path) -> str:
    """The UTF-8 text of ``path`` (a leading BOM dropped); ``ValueError`` naming the file when it is not text."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path} is not a text file (byte {exc.start} is not UTF-8); it may be damaged: replace it with a "
            "good copy"
        ) from None


def load_frame(segment: Segment, i: int) -> tuple[np.ndarray, np.ndarray, FrameRecord]:
    """Frame ``i`` of ``segment``: (RGB HxWx3 uint8, depth HxW float32 metres NaN invalid, record).

    Depth is decoded with the segment's ``depth_encoding`` (16-bit millimetres unless the dataset states
    otherwise; 8-bit PNGs need a stated scale).
    """
    n = len(segment.frames)
    if not -n <= i < n:
        raise IndexError(f"frame index {i} out of range for segment {segment.path} with {n} frames")
    rgb = load_rgb(segment.rgb_path(i))
    depth = load_depth(segment.depth_path(i), segment.depth_encoding)
    if depth.shape != rgb.shape[:2]:
        raise ValueError(
            f"frame {segment.frames[i].stem!r} of {segment.path}: depth size {depth.shape[::-1]} "
            f"differs from RGB size {rgb.shape[1::-1]}"
        )
    return rgb, depth, segment.frames[i]


def check_depth_encoding(segments: Sequence[Segment]) -> None:
    """``DepthScaleError`` (naming the file, the flags and the settings file) when a segment's depth PNGs are
    of a bit depth its encoding does not state (8-bit without a scale); each segment's first frame is looked at."""
    for segment in segments:
        if not segment.frames:
            continue
        path = segment.depth_path(0)
        try:
            bits = png_info(path).depth_bits
        except (OSError, ValueError):
            continue  # a bad file is that frame's problem, reported where the frame is read
        if bits is not None:
            segment.depth_encoding.scale_for(bits, path)


# --------------------------------------------------------------------------- dataset


def _is_abandoned(seg_dir: Path) -> bool:
    # A writer that died before the header landed leaves empty folders / hidden temp files only.
    for p in seg_dir.rglob("*"):
        if p.is_file() and not p.name.startswith("."):
            return False
    return True


def iter_segments(
    root: str | os.PathLike,
    *,
    aliases: Mapping[str, str] | None = None,
    check_files: bool = True,
    settings: DatasetSettings | None = None,
) -> Iterator[Segment]:
    """Segments under ``root`` in (run number, segment order), read one at a time.

    ``root/forest_dataset.yaml`` is read once, then ``settings`` and ``aliases`` override it.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist")
    resolved = resolve_settings(root, settings, aliases)
    for _, run_dir in _run_dirs(root):
        for seg_dir in _segment_dirs(run_dir):
            if not (seg_dir / METADATA_FILE).exists() and _is_abandoned(seg_dir):
                continue
            yield _read_segment(seg_dir, resolved, check_files)


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
    root: str | os.PathLike,
    *,
    aliases: Mapping[str, str] | None = None,
    check_files: bool = True,
    settings: DatasetSettings | None = None,
) -> ForestDataset:
    """Read every segment's metadata under ``root`` (images are loaded on access)."""
    segments = iter_segments(root, aliases=aliases, check_files=check_files, settings=settings)
    return ForestDataset(Path(root), list(segments))


def _unindexed_files(segment: Segment) -> int:
    indexed = {f.stem + IMAGE_SUFFIX for f in segment.frames}
    count = 0
    for sub in (RGB_DIR, DEPTH_DIR):
        folder = segment.path / sub
        if folder.is_dir():
            count += sum(1 for p in folder.iterdir() if p.is_file() and p.name not in indexed)
    return count


def _depth_png(segment: Segment) -> tuple[str, str]:
    """(what the first depth PNG of ``segment`` is, why it cannot be read or ''); ('', '') without frames."""
    if not segment.frames:
        return "", ""
    path = segment.depth_path(0)
    try:
        info = png_info(path)
    except (OSError, ValueError) as exc:
        return "", str(exc)
    kind = info.describe().split(" ", 1)[1]  # '8-bit grayscale', without the size
    if info.depth_bits is None:
        return kind, f"{path}: not a depth map"
    try:
        segment.depth_encoding.scale_for(info.depth_bits, path)
    except ValueError as exc:
        return kind, str(exc)
    return kind, ""


def dataset_summary(
    root: str | os.PathLike,
    *,
    aliases: Mapping[str, str] | None = None,
    check_files: bool = False,
    settings: DatasetSettings | None = None,
) -> dict:
    """Counts of runs, segments and frames, which segments carry GPS / encoders / IMU, the columns used.

    ``unindexed_files`` counts files in the image folders without a metadata row (temp
    files or the half-written frame of an interrupted recording); ``depth_png`` describes each
    segment's first depth PNG and ``depth_problem`` says why it cannot be read ('' when it can).
    """
    dataset = open_dataset(root, aliases=aliases, check_files=check_files, settings=settings)
    per_segment = []
    for s in dataset.segments:
        depth_png, depth_problem = _depth_png(s)
        per_segment.append(
            {
                "run": s.run,
                "segment": s.name,
                "path": str(s.path),
                "frames": len(s),
                "gps_frames": sum(f.gps is not None for f in s.frames),
                "encoder_frames": sum(f.encoders is not None for f in s.frames),
                "imu_frames": sum(f.imu is not None for f in s.frames),
                "has_gps": s.has_gps,
                "has_encoders": s.has_encoders,
                "has_imu": s.has_imu,
                "has_timestamps": s.has_timestamps,
                "columns_used": {h: c for h, c in s.column_map.items() if h != c},
                "extra_columns": [c for c in s.columns if c not in s.column_map],
                "depth_png": depth_png,
                "depth_problem": depth_problem,
                "unindexed_files": _unindexed_files(s),
            }
        )
    settings_used = resolve_settings(Path(root), settings, aliases)
    renamed: dict[str, str] = {}
    extras: list[str] = []
    for entry in per_segment:
        renamed.update(entry["columns_used"])
        extras += [c for c in entry["extra_columns"] if c not in extras]
    return {
        "root": str(dataset.root),
        "runs": len(dataset.runs),
        "segments": len(dataset.segments),
        "frames": len(dataset),
        "segments_with_gps": [s.segment_id for s in dataset.segments if s.has_gps],
        "segments_with_encoders": [s.segment_id for s in dataset.segments if s.has_encoders],
        "segments_with_imu": [s.segment_id for s in dataset.segments if s.has_imu],
        "frames_without_imu": sum(f.imu is None for s in dataset.segments for f in s.frames),
        "columns_read_as": renamed,
        "plain_columns": extras,
        "depth_pngs": sorted({e["depth_png"] for e in per_segment if e["depth_png"]}),
        "depth_encoding": settings_used.depth_encoding().describe(),
        "depth_problem": next((e["depth_problem"] for e in per_segment if e["depth_problem"]), ""),
        "settings_file": settings_used.source if Path(settings_used.source).is_file() else None,
        "per_segment": per_segment,
    }
