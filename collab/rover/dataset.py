"""The rover's recordings as they grow: segments of the forest dataset layout with their frame counts.

Only segments whose ``metadata.csv`` changed are parsed again.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from forest_perception.dataset_tools.layout import METADATA_FILE, Segment, read_segment

_RUN_RE = re.compile(r"^Run-(\d+)$")
_SEGMENT_RE = re.compile(r"^[a-z]+$")


@dataclass(frozen=True)
class SegmentState:
    """One recorded segment as last scanned."""

    segment_id: str  # '1a' = Run-1/a, as in the dataset README
    path: Path
    frames: int
    stamp: tuple[int, int]  # metadata.csv (mtime_ns, size)
    segment: Segment = field(compare=False, repr=False)  # parsed metadata.csv (frame records, file paths)


@dataclass
class DatasetScan:
    """The dataset at one scan and what changed since the previous one."""

    segments: list[SegmentState]
    new: list[str] = field(default_factory=list)
    grown: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # segment path -> why it was skipped
    new_frames: int = 0

    @property
    def frames(self) -> int:
        """Frames in all readable segments."""
        return sum(s.frames for s in self.segments)

    def segment(self, segment_id: str) -> Segment:
        """The parsed segment with this id (``KeyError`` naming it when it is not in this scan)."""
        for state in self.segments:
            if state.segment_id == segment_id:
                return state.segment
        raise KeyError(f"segment {segment_id!r} is not in the scan ({[s.segment_id for s in self.segments]})")

    @property
    def changed(self) -> bool:
        """Whether any segment appeared, grew, shrank or went away."""
        return bool(self.new or self.grown or self.removed)


class DatasetWatcher:
    """Scans ``Run-<N>/<segment>/metadata.csv`` under a root; re-reads only the CSVs that changed."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self._known: dict[str, SegmentState] = {}

    def _segment_dirs(self) -> Iterator[Path]:
        if not self.root.is_dir():
            return
        runs = sorted((int(m.group(1)), p) for p in self.root.iterdir() if (m := _RUN_RE.match(p.name)) and p.is_dir())
        for _, run_dir in runs:
            for seg in sorted(run_dir.iterdir(), key=lambda p: (len(p.name), p.name)):
                if seg.is_dir() and _SEGMENT_RE.match(seg.name) and (seg / METADATA_FILE).is_file():
                    yield seg

    def scan(self) -> DatasetScan:
        """Current segments with frame counts; new/grown/removed relative to the previous scan."""
        states: dict[str, SegmentState] = {}
        scan = DatasetScan([])
        for seg_dir in self._segment_dirs():
            segment_id = f"{seg_dir.parent.name[4:]}{seg_dir.name}"
            try:
                stat = (seg_dir / METADATA_FILE).stat()
                stamp = (stat.st_mtime_ns, stat.st_size)
                known = self._known.get(segment_id)
                if known is not None and known.stamp == stamp and known.path == seg_dir:
                    states[segment_id] = known
                    continue
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # a torn last row while the recorder writes it
                    segment = read_segment(seg_dir, check_files=False)
            except (OSError, ValueError) as exc:
                scan.errors[str(seg_dir)] = f"{type(exc).__name__}: {exc}"
                continue
            states[segment_id] = SegmentState(segment_id, seg_dir, len(segment), stamp, segment)
        for segment_id, state in states.items():
            before = self._known.get(segment_id)
            if before is None:
                scan.new.append(segment_id)
                scan.new_frames += state.frames
            elif state.frames != before.frames:
                scan.grown.append(segment_id)
                scan.new_frames += max(0, state.frames - before.frames)
        scan.removed = sorted(set(self._known) - set(states))
        self._known = states
        scan.segments = list(states.values())
        return scan

    def segment(self, segment_id: str) -> Segment:
        """The parsed segment of the last scan (``KeyError`` if it was not there)."""
        return self._known[segment_id].segment


def scan_recordings(root: str | os.PathLike) -> DatasetScan:
    """One scan of a rover's recordings (what collab_node's watcher sees): readable segments and skipped ones.

    The rover's ClientApp and collab_node both find the segments this way, so they agree on what the rover
    recorded; an unreadable segment is in ``errors``, not in ``segments``.
    """
    return DatasetWatcher(root).scan()
