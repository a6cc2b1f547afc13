"""``forest-dataset extract``: a recorded rover bag -> frames in the forest dataset layout.

The bag's streams go through the rover's own ``forest_perception.sync.SensorSync`` and every synchronised
frame is written with ``layout.SegmentWriter``, plus the frame scores curation needs (``scores``). How
segments are cut and which frames are left out: docs/dataset_tools.md ("Bags"). A bag capture_node recorded in
marked mode (``record_mode: marked`` in its metadata.yaml ``custom_data``) holds frame sets seconds apart with
every stream silent between them: no sensor counts as missing over such a gap (``MARKED_MISSING_AFTER_S``). A
frame from before the first IMU message is written with empty IMU cells (``metadata.imu_problem`` has the one rule
every tool uses).
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from forest_perception import msgs
from forest_perception.dataset_tools.bags import BagError, bag_info, read_bag
from forest_perception.dataset_tools.layout import (
    FrameRecord,
    SegmentWriter,
    frame_stem,
    run_dir_name,
    segment_name,
)
from forest_perception.dataset_tools.scores import frame_scores, write_score_cache
from forest_perception.frames import WHEEL_JOINTS
from forest_perception.inference import SUPPORTED_ENCODINGS, convert_image_encoding
from forest_perception.sync import (
    TOPICS,
    SensorSync,
    SyncConfig,
    SyncedFrame,
    reading_from_msg,
    stamp_ns,
)

#: topic (relative to the rover namespace) -> SensorSync kind, as sensor_sync_node subscribes them
STREAMS = {topic: kind for kind, topic in TOPICS.items()}
#: extra metadata.csv columns written for every frame
EXTRA_COLUMNS = ("stamp_ns", "depth_offset_ms", "gps_age_s", "gps_stale", "sync_flags")
#: SyncConfig.missing_after_s for a marked bag: its gaps are choices of the recorder, not sensors gone quiet
MARKED_MISSING_AFTER_S = 1e6


def recorded_mode(bag: Path) -> str:
    """``custom_data.record_mode`` of a bag directory's metadata.yaml (``all`` when absent or unreadable)."""
    import yaml

    try:
        meta = yaml.safe_load((Path(bag) / "metadata.yaml").read_text()) or {}
        custom = (meta.get("rosbag2_bagfile_information") or {}).get("custom_data") or {}
        return str(custom.get("record_mode", "all"))
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return "all"


@dataclass
class ExtractConfig:
    """What :func:`extract_bag` takes from a bag and how it cuts it into segments."""

    namespace: str | None = None
    """rover namespace of the topics (e.g. ``/rover_0``); None: the only one in the bag"""
    run: int | None = None
    """number of the ``Run-N`` folder; None: the next free one under the output root"""
    sync: SyncConfig = field(default_factory=SyncConfig)
    every: int = 1
    """keep every n-th synchronised frame (a 30 Hz recording holds many near-identical frames)"""
    max_frames: int = 0
    """stop after this many frames (0: all)"""
    segment_gap_s: float = 2.0
    """a gap between frames longer than this starts a new segment"""
    segment_frames: int = 0
    """start a new segment after this many frames (0: no limit)"""
    left_wheel: str = WHEEL_JOINTS[0]
    right_wheel: str = WHEEL_JOINTS[1]

    def validate(self) -> ExtractConfig:
        """Raise ``ValueError`` naming the first bad field; return self."""
        self.sync.validate()
        if self.run is not None and int(self.run) < 0:
            raise ValueError(f"run must be >= 0, got {self.run}")
        if int(self.every) < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")
        if int(self.max_frames) < 0 or int(self.segment_frames) < 0:
            raise ValueError("max_frames and segment_frames must be >= 0")
        if not self.segment_gap_s > 0:
            raise ValueError(f"segment_gap_s must be > 0, got {self.segment_gap_s}")
        return self


@dataclass
class ExtractReport:
    """What :func:`extract_bag` did."""

    bag: Path
    out: Path
    namespace: str
    run: int
    segments: dict[str, int] = field(default_factory=dict)
    messages: Counter = field(default_factory=Counter)
    malformed: Counter = field(default_factory=Counter)
    frames_synced: int = 0
    frames_written: int = 0
    frames_without_imu: int = 0
    """written with empty IMU cells: no IMU message came before them (the layout's rule for such frames)"""
    skipped: Counter = field(default_factory=Counter)
    clock_resets: int = 0
    sync_summary: dict = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """Human-readable summary."""
        out = [
            f"bag {self.bag} ({self.namespace}) -> {self.out / run_dir_name(self.run)}",
            "  messages read: " + ", ".join(f"{k} {v}" for k, v in sorted(self.messages.items())),
            f"  synchronised frames: {self.frames_synced}, written: {self.frames_written} in "
            f"{len(self.segments)} segment(s): " + ", ".join(f"{k} {v}" for k, v in self.segments.items()),
        ]
        if self.frames_without_imu:
            out.append(f"  frames without an IMU reading (before the first IMU message; IMU cells left empty): "
                       f"{self.frames_without_imu}")
        if self.skipped:
            out.append("  frames left out: " + ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())))
        if self.malformed:
            bad = ", ".join(f"{k} {v}" for k, v in sorted(self.malformed.items()))
            out.append(f"  malformed messages skipped: {bad}")
        if self.clock_resets:
            out.append(f"  clock resets (a new segment after each): {self.clock_resets}")
        out.extend(f"  error: {e}" for e in self.errors)
        return out


def find_namespaces(topics: Iterable[str]) -> list[str]:
    """Rover namespaces that have a ``camera/image_raw`` topic (``""`` for ``/camera/image_raw``)."""
    suffix = "/camera/image_raw"
    return sorted({t[: -len(suffix)] for t in topics if t.endswith(suffix)})


def _resolve_namespace(wanted: str | None, topics: list[str], bag: Path) -> str:
    found = find_namespaces(topics)
    if wanted is not None:
        ns = "/" + wanted.strip("/") if wanted.strip("/") else ""
        if ns not in found:
            raise BagError(f"{bag}: no topic {ns}/camera/image_raw; rover namespaces in the bag: {found or 'none'}")
        return ns
    if not found:
        raise BagError(f"{bag}: no camera/image_raw topic; topics in the bag: {sorted(topics)}")
    if len(found) > 1:
        raise BagError(f"{bag} holds several rovers {found}: choose one with --namespace")
    return found[0]


def _next_run(root: Path) -> int:
    taken = [int(p.name.split("-", 1)[1]) for p in root.glob("Run-*") if p.name.split("-", 1)[1].isdigit()]
    return max(taken, default=0) + 1


def _depth_metres(msg: object) -> np.ndarray:
    array = msgs.array_from_image(msg)
    if msg.encoding == "32FC1":
        return array.astype(np.float32, copy=False)
    if msg.encoding in ("16UC1", "mono16"):  # millimetres, 0 = invalid (REP 118)
        depth = array.astype(np.float32) / 1000.0
        depth[array == 0] = np.nan
        return depth
    raise ValueError(f"depth encoding {msg.encoding!r} is not 32FC1 or 16UC1")


def _record(frame: SyncedFrame, stem: str) -> FrameRecord:
    gps = frame.gps.fix if frame.gps is not None and not frame.gps.stale else None
    depth_offset = (frame.depth_stamp_ns - frame.stamp_ns) * 1e-6 if frame.depth_stamp_ns is not None else ""
    extras = {
        "stamp_ns": str(frame.stamp_ns),
        "depth_offset_ms": depth_offset,
        "gps_age_s": frame.gps.age_s if frame.gps is not None else "",
        "gps_stale": ("1" if frame.gps.stale else "0") if frame.gps is not None else "",
        "sync_flags": "|".join(sorted(frame.flags)),
    }
    # no IMU reading yet: empty IMU cells, the layout's form of "not recorded" (never NaN)
    return FrameRecord(stem, frame.stamp_s, frame.imu, gps, frame.wheels, extras)


class _SegmentCutter:
    """Opens Run-N/<segment> writers as frames come, cutting at gaps, resets and a frame limit."""

    def __init__(self, out: Path, run: int, config: ExtractConfig, report: ExtractReport) -> None:
        self.out, self.run, self.config, self.report = out, run, config, report
        self.writer: SegmentWriter | None = None
        self.scores: list[tuple[str, float, float, np.ndarray]] = []
        self.index = 0
        self.last_ns: int | None = None

    def cut(self) -> None:
        if self.writer is not None:
            self.writer.close()
            # curate's sharpness and descriptors, from the pixels in hand: curating needs no PNG decoding
            write_score_cache(self.writer.path, self.scores)
            self.writer = None
            self.scores = []

    def write(self, rgb: np.ndarray, depth: np.ndarray, frame: SyncedFrame) -> None:
        # a gap, or time going back (a clock reset: the simulator restarted inside the bag)
        gap = self.last_ns is not None and not 0 <= (frame.stamp_ns - self.last_ns) * 1e-9 <= self.config.segment_gap_s
        full = self.writer is not None and 0 < self.config.segment_frames <= self.writer.frames_written
        if gap or full:
            self.cut()
        if self.writer is None:
            name = segment_name(self.index)
            self.index += 1
            self.writer = SegmentWriter(self.out, self.run, name, extra_columns=EXTRA_COLUMNS)
            self.report.segments[name] = 0
        stem = frame_stem(self.writer.frames_written)
        self.writer.write_frame(rgb, depth, _record(frame, stem))
        self.scores.append((stem, *frame_scores(rgb)))
        self.report.segments[self.writer.segment] += 1
        self.report.frames_written += 1
        self.report.frames_without_imu += frame.imu is None
        self.last_ns = frame.stamp_ns


def extract_bag(
    bag: str | os.PathLike,
    out: str | os.PathLike,
    config: ExtractConfig | None = None,
    *,
    progress: bool = False,
    on_frame: Callable[[int], None] | None = None,
) -> ExtractReport:
    """Write the synchronised frames of ``bag`` under ``out/Run-N``; see the module docstring.

    Raises :class:`BagError` for a bag that cannot be read (nothing written), ``FileExistsError``
    when ``Run-N`` already exists, ``ValueError`` for a bad config.
    """
    config = (config or ExtractConfig()).validate()
    bag, out = Path(bag), Path(out)
    info = bag_info(bag)
    # a damaged file is the reason, not "no camera topic": say so before looking for topics
    for f in info.files:
        if f.problem and (f.listed or bag.is_file()):
            what = "is listed in metadata.yaml but missing" if f.problem == "missing" else f.problem
            raise BagError(
                f"{bag if bag.is_file() else bag / f.name} {what}; nothing was extracted: run "
                f"`forest-dataset repair {bag}` to recover its complete messages, then extract again"
            )
    topics = [t.name for t in info.topics]
    namespace = _resolve_namespace(config.namespace, topics, bag)
    kinds = {f"{namespace}/{rel}": kind for rel, kind in STREAMS.items()}
    run = int(config.run) if config.run is not None else _next_run(out)
    if (out / run_dir_name(run)).exists():
        raise FileExistsError(
            f"{out / run_dir_name(run)} already exists and was left as it is: choose another --run or --out"
        )
    messages = read_bag(bag, [t for t in kinds if t in topics])  # checks the bag before anything is written
    report = ExtractReport(bag, out, namespace or "/", run)
    sync_config = config.sync
    if bag.is_dir() and recorded_mode(bag) == "marked" and sync_config.missing_after_s < MARKED_MISSING_AFTER_S:
        sync_config = dataclasses.replace(sync_config, missing_after_s=MARKED_MISSING_AFTER_S)
    sync = SensorSync(sync_config)
    cutter = _SegmentCutter(out, run, config, report)
    synced = 0

    def emit(frames: list[SyncedFrame]) -> bool:
        nonlocal synced
        for frame in frames:
            synced += 1
            report.frames_synced += 1
            if (synced - 1) % config.every:
                continue
            if frame.depth is None:
                report.skipped["no_depth"] += 1
                continue
            try:
                rgb = convert_image_encoding(msgs.array_from_image(frame.image), frame.image.encoding)
                depth = _depth_metres(frame.depth)
            except ValueError as exc:
                report.skipped["bad_image"] += 1
                report.malformed["image"] += 1
                if len(report.errors) < 20:
                    report.errors.append(f"frame at {frame.stamp_ns} ns: {exc}")
                continue
            if depth.shape != rgb.shape[:2]:
                report.skipped["depth_size_mismatch"] += 1
                continue
            cutter.write(rgb, depth, frame)
            if on_frame is not None:
                on_frame(report.frames_written)
            if config.max_frames and report.frames_written >= config.max_frames:
                return False
        return True

    bar = None
    if progress:
        from tqdm import tqdm

        total = sum(t.message_count for t in info.topics if t.name in kinds)
        bar = tqdm(total=total, unit="msg", desc=f"extract {bag.name}", leave=False)
    going = True
    try:
        for item in messages:
            if bar is not None:
                bar.update(1)
            kind = kinds.get(item.topic)
            if kind is None:
                continue
            report.messages[kind] += 1
            try:
                stamp = stamp_ns(item.message)
                if kind == "image" and item.message.encoding not in SUPPORTED_ENCODINGS:
                    raise ValueError(f"colour encoding {item.message.encoding!r} is not one of {SUPPORTED_ENCODINGS}")
                value, covariance = reading_from_msg(kind, item.message, config.left_wheel, config.right_wheel)
                frames = sync.add(kind, stamp, value, covariance)
            except ValueError as exc:
                report.malformed[kind] += 1
                if len(report.errors) < 20:
                    report.errors.append(f"{item.topic} at {item.log_time_ns} ns: {exc}")
                continue
            report.clock_resets += sum(event.kind == "clock_reset" for event in sync.pop_events())
            if not emit(frames):
                going = False
                break
        if going:
            emit(sync.flush())
    finally:
        cutter.cut()
        if bar is not None:
            bar.close()
    report.sync_summary = sync.summary()
    return report
