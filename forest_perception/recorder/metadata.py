"""A bag's ``metadata.yaml`` (rosbag2 format version 9): its files, topics and counts, written atomically.

Details: docs/runtime.md (`forest_perception.recorder`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from forest_perception.recorder.topic_spec import TopicSpec

METADATA_VERSION = 9  # rosbag2 metadata.yaml format written (Jazzy and Kilted read it)
STORAGE_ID = "mcap"


@dataclass(frozen=True)
class FileRecord:
    """One finished MCAP file of a bag: its name, message count, log-time range and per-topic counts."""

    name: str
    message_count: int
    start_ns: int
    end_ns: int
    topic_counts: Mapping[str, int] = field(default_factory=dict)

    def metadata_entry(self) -> dict[str, Any]:
        """This file's entry of ``files`` in metadata.yaml."""
        return {
            "path": self.name,
            "starting_time": {"nanoseconds_since_epoch": int(self.start_ns if self.message_count else 0)},
            "duration": {"nanoseconds": int(self.end_ns - self.start_ns if self.message_count else 0)},
            "message_count": int(self.message_count),
        }


def bag_metadata(
    files: Sequence[FileRecord],
    topics: Sequence[TopicSpec],
    *,
    custom_data: Mapping[str, str] | None = None,
    ros_distro: str = "kilted",
) -> dict[str, Any]:
    """The ``rosbag2_bagfile_information`` mapping of metadata.yaml for these files and topics."""
    counts: dict[str, int] = {t.name: 0 for t in topics}
    for f in files:
        for name, n in f.topic_counts.items():
            counts[name] = counts.get(name, 0) + int(n)
    with_messages = [f for f in files if f.message_count]
    start = min((f.start_ns for f in with_messages), default=0)
    end = max((f.end_ns for f in with_messages), default=0)
    return {
        "version": METADATA_VERSION,
        "storage_identifier": STORAGE_ID,
        "duration": {"nanoseconds": int(end - start)},
        "starting_time": {"nanoseconds_since_epoch": int(start)},
        "message_count": int(sum(f.message_count for f in files)),
        "topics_with_message_count": [t.metadata_entry(counts.get(t.name, 0)) for t in topics],
        # chunk compression is internal to the MCAP files: rosbag2 leaves these empty for it
        "compression_format": "",
        "compression_mode": "",
        "relative_file_paths": [f.name for f in files],
        "files": [f.metadata_entry() for f in files],
        "custom_data": {str(k): str(v) for k, v in (custom_data or {}).items()},
        "ros_distro": str(ros_distro),
    }


def metadata_yaml(information: Mapping[str, Any]) -> str:
    """metadata.yaml text for a ``rosbag2_bagfile_information`` mapping."""
    return yaml.safe_dump({"rosbag2_bagfile_information": dict(information)}, sort_keys=False)


def write_metadata(bag_dir: Path | str, information: Mapping[str, Any]) -> Path:
    """Write ``<bag_dir>/metadata.yaml`` atomically (tmp file, fsync, rename); a crash leaves the old or the new."""
    bag_dir = Path(bag_dir)
    target = bag_dir / "metadata.yaml"
    tmp = bag_dir / ".metadata.yaml.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(metadata_yaml(information))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    _fsync_dir(bag_dir)
    return target


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)

