"""One MCAP file of a bag being written (a split), laid out as rosbag2's MCAP storage plugin lays it out.

Chunks reach the kernel as soon as they close (the file is unbuffered), so SIGKILL loses at most the
chunk being filled. Details: docs/runtime.md (`forest_perception.recorder`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

from mcap.writer import CompressionType, IndexType
from mcap.writer import Writer as McapWriter

from forest_perception.recorder.metadata import FileRecord
from forest_perception.recorder.qos import qos_yaml
from forest_perception.recorder.topic_spec import TopicSpec

MCAP_PROFILE = "ros2"
# the library name in every file's header; it names the package, not this module, as files always did
LIBRARY = "forest_perception.recorder"


class _UnbufferedFile:
    """Write-only file for ``mcap.writer.Writer`` whose writes reach the kernel at once.

    A buffered file would keep the end of the last chunk in this process, and SIGKILL would lose it.
    """

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._pos = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data)
        while view.nbytes:
            n = os.write(self._fd, view)
            view = view[n:]
            self._pos += n
        return len(data)

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        pass

    def fsync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class McapSplit:
    """One MCAP file of a bag being written: schemas, channels, chunked messages, then summary and footer."""

    def __init__(self, path: Path, topics: Sequence[TopicSpec], compression: str, chunk_bytes: int) -> None:
        self.path = Path(path)
        self._file = _UnbufferedFile(self.path)
        self._writer = McapWriter(
            self._file,
            chunk_size=int(chunk_bytes),
            compression=CompressionType.ZSTD if compression == "zstd" else CompressionType.NONE,
            index_types=IndexType.ALL,
        )
        self._writer.start(profile=MCAP_PROFILE, library=LIBRARY)
        self._schemas: dict[str, int] = {}
        self._channels: dict[str, int] = {}
        self.topic_counts: dict[str, int] = {}
        self.message_count = 0
        self.start_ns: int | None = None
        self.end_ns: int | None = None
        self._pending = 0  # message bytes in the chunk being filled (not in the file yet)
        self._flushed_pos = self._file.tell()
        self.chunk_opened_at: float | None = None  # monotonic time of the first message of that chunk
        for topic in topics:
            self.add_topic(topic)

    def add_topic(self, topic: TopicSpec) -> None:
        """Register the topic's schema (once per type) and channel."""
        if topic.name in self._channels:
            return
        schema_id = self._schemas.get(topic.type_name)
        if schema_id is None:
            schema_id = self._writer.register_schema(
                name=topic.type_name, encoding=topic.msgdef_encoding, data=topic.msgdef.encode()
            )
            self._schemas[topic.type_name] = schema_id
        self._channels[topic.name] = self._writer.register_channel(
            topic=topic.name,
            message_encoding=topic.serialization_format,
            schema_id=schema_id,
            metadata={"offered_qos_profiles": qos_yaml(topic.qos_profiles), "topic_type_hash": topic.type_hash},
        )
        self.topic_counts.setdefault(topic.name, 0)

    @property
    def size(self) -> int:
        """Bytes in the file plus those of the chunk being filled (uncompressed)."""
        return self._file.tell() + self._pending

    def write(self, topic: str, data: bytes, log_time_ns: int, publish_time_ns: int, sequence: int = 0) -> None:
        """Append one serialized message to the current chunk (the chunk is written out when full)."""
        self._writer.add_message(
            channel_id=self._channels[topic],
            log_time=int(log_time_ns),
            data=data,
            publish_time=int(publish_time_ns),
            sequence=int(sequence) & 0xFFFFFFFF,
        )
        self.message_count += 1
        self.topic_counts[topic] = self.topic_counts.get(topic, 0) + 1
        self.start_ns = log_time_ns if self.start_ns is None else min(self.start_ns, log_time_ns)
        self.end_ns = log_time_ns if self.end_ns is None else max(self.end_ns, log_time_ns)
        position = self._file.tell()
        if position != self._flushed_pos:  # the writer closed the chunk with this message in it
            self._flushed_pos, self._pending, self.chunk_opened_at = position, 0, None
        else:
            self._pending += len(data) + 31  # opcode, length and message header
            if self.chunk_opened_at is None:
                self.chunk_opened_at = time.monotonic()

    def flush_chunk(self) -> None:
        """Close the chunk being filled and write it out now (bounds what a crash can lose in time)."""
        self._writer.flush()
        self._flushed_pos, self._pending, self.chunk_opened_at = self._file.tell(), 0, None

    def record(self) -> FileRecord:
        """The FileRecord of this file as it stands."""
        return FileRecord(
            name=self.path.name,
            message_count=self.message_count,
            start_ns=self.start_ns or 0,
            end_ns=self.end_ns or 0,
            topic_counts=dict(self.topic_counts),
        )

    def finish(self, serialized_metadata: str) -> FileRecord:
        """Write the rosbag2 metadata record, summary and footer, fsync and close; the file is complete."""
        self._writer.add_metadata("rosbag2", {"serialized_metadata": serialized_metadata})
        self._writer.finish()
        self._file.fsync()
        self._file.close()
        return self.record()

    def abort(self) -> None:
        """Close without a footer (after a write error): :func:`dataset_tools.bag_repair.repair_bag` recovers it."""
        self._file.close()

