"""Record serialized ROS 2 messages into a rosbag2 bag with MCAP storage: the core of capture_node (no rclpy).

Details: docs/runtime.md (`recorder`).
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from mcap.writer import CompressionType, IndexType
from mcap.writer import Writer as McapWriter

METADATA_VERSION = 9  # rosbag2 metadata.yaml format written (Jazzy and Kilted read it)
STORAGE_ID = "mcap"
MCAP_PROFILE = "ros2"
LIBRARY = "forest_perception.recorder"
COMPRESSIONS = ("none", "zstd")
STATES = ("recording", "paused", "stopped", "closed")

HISTORY = ("system_default", "keep_last", "keep_all", "unknown")
RELIABILITY = ("system_default", "reliable", "best_effort", "unknown", "best_available")
DURABILITY = ("system_default", "transient_local", "volatile", "unknown", "best_available")
LIVELINESS = ("system_default", "automatic", "manual_by_node", "manual_by_topic", "unknown", "best_available")

_TYPE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*/(msg|srv|action)/[A-Za-z][A-Za-z0-9_]*$")
_DISK_CHECK_BYTES = 16 << 20  # check the free space at least every 16 MiB written


class RecorderError(RuntimeError):
    """The recorder cannot do what was asked (bag exists, disk full, already closed)."""


# ------------------------------------------------------------------------------------------ QoS
def _duration(ns: int) -> dict[str, int]:
    ns = int(ns)
    if ns < 0:
        raise ValueError(f"QoS durations must be >= 0 ns, got {ns}")
    return {"sec": ns // 1_000_000_000, "nsec": ns % 1_000_000_000}


def _policy(name: str, value: str, allowed: tuple[str, ...]) -> str:
    value = str(value).lower()
    if value not in allowed:
        raise ValueError(f"QoS {name} must be one of {list(allowed)}, got {value!r}")
    return value


def qos_profile(
    *,
    history: str = "keep_last",
    depth: int = 10,
    reliability: str = "reliable",
    durability: str = "volatile",
    deadline_ns: int = 0,
    lifespan_ns: int = 0,
    liveliness: str = "system_default",
    liveliness_lease_duration_ns: int = 0,
    avoid_ros_namespace_conventions: bool = False,
) -> dict[str, Any]:
    """One offered QoS profile as rosbag2 (metadata version 9) stores it; policies by name, durations in ns."""
    if int(depth) < 0:
        raise ValueError(f"QoS depth must be >= 0, got {depth}")
    return {
        "history": _policy("history", history, HISTORY),
        "depth": int(depth),
        "reliability": _policy("reliability", reliability, RELIABILITY),
        "durability": _policy("durability", durability, DURABILITY),
        "deadline": _duration(deadline_ns),
        "lifespan": _duration(lifespan_ns),
        "liveliness": _policy("liveliness", liveliness, LIVELINESS),
        "liveliness_lease_duration": _duration(liveliness_lease_duration_ns),
        "avoid_ros_namespace_conventions": bool(avoid_ros_namespace_conventions),
    }


def qos_yaml(profiles: Sequence[Mapping[str, Any]]) -> str:
    """The ``offered_qos_profiles`` string of an MCAP channel's metadata (a YAML list, as rosbag2 writes it)."""
    return yaml.safe_dump([dict(p) for p in profiles], sort_keys=False, default_flow_style=False).strip()


def adapted_subscription_qos(profiles: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
    """(reliability, durability) a recorder subscribes with to hear every publisher, as rosbag2 adapts them.

    Reliable only when every publisher offers reliable (a reliable reader never matches a best-effort
    writer); transient-local only when every publisher offers it.
    """
    if profiles and all(p.get("reliability") == "reliable" for p in profiles):
        reliability = "reliable"
    else:
        reliability = "best_effort"
    if profiles and all(p.get("durability") == "transient_local" for p in profiles):
        durability = "transient_local"
    else:
        durability = "volatile"
    return reliability, durability


# --------------------------------------------------------------------------------------- topics
_TYPESTORE = None
_TYPESTORE_LOCK = threading.Lock()


def typestore() -> Any:
    """The rosbags ROS 2 Kilted typestore (loaded once): message definitions and RIHS01 type hashes."""
    global _TYPESTORE
    with _TYPESTORE_LOCK:
        if _TYPESTORE is None:
            from rosbags.typesys import Stores, get_typestore

            _TYPESTORE = get_typestore(Stores.ROS2_KILTED)
        return _TYPESTORE


def message_definition(type_name: str) -> tuple[str, str]:
    """(full concatenated ``ros2msg`` definition, RIHS01 type hash) of a message type from the typestore."""
    store = typestore()
    if type_name not in store.fielddefs:
        raise ValueError(
            f"message type {type_name!r} is not in the rosbags ROS 2 Kilted typestore: "
            "pass msgdef= and type_hash= to add_topic"
        )
    msgdef, _ = store.generate_msgdef(type_name, ros_version=2)
    return msgdef, store.hash_rihs01(type_name)


@dataclass(frozen=True)
class TopicSpec:
    """A recorded topic: absolute name, ROS type, message definition, type hash and offered QoS profiles."""

    name: str
    type_name: str
    msgdef: str
    type_hash: str = ""
    qos_profiles: tuple[dict[str, Any], ...] = ()
    serialization_format: str = "cdr"
    msgdef_encoding: str = "ros2msg"

    def metadata_entry(self, message_count: int) -> dict[str, Any]:
        """This topic's entry of ``topics_with_message_count`` in metadata.yaml."""
        return {
            "topic_metadata": {
                "name": self.name,
                "type": self.type_name,
                "serialization_format": self.serialization_format,
                "offered_qos_profiles": [dict(p) for p in self.qos_profiles],
                "type_description_hash": self.type_hash,
            },
            "message_count": int(message_count),
        }


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


# ------------------------------------------------------------------------------------ MCAP file
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
        """Close without a footer (after a write error): :func:`dataset_tools.bags.repair_bag` recovers it."""
        self._file.close()


# ------------------------------------------------------------------------------------- recorder
@dataclass
class TopicStats:
    """Per-topic counters: messages handed to ``write`` while recording, written to the bag, dropped."""

    received: int = 0
    written: int = 0
    dropped: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class RecorderStats:
    """A snapshot of the recorder: state, per-topic counters, files, queue and disk."""

    state: str
    stop_reason: str
    bag_path: str
    topics: Mapping[str, TopicStats]
    files: tuple[str, ...]
    current_file: str
    file_bytes: int
    queue_bytes: int
    queue_peak_bytes: int
    disk_free_bytes: int
    last_error: str

    @property
    def received(self) -> int:
        """Messages offered while recording, all topics."""
        return sum(t.received for t in self.topics.values())

    @property
    def written(self) -> int:
        """Messages written to the bag, all topics."""
        return sum(t.written for t in self.topics.values())

    @property
    def dropped(self) -> int:
        """Messages dropped (queue full, or queued when recording stopped), all topics."""
        return sum(t.dropped for t in self.topics.values())

    @property
    def bytes_written(self) -> int:
        """Serialized message bytes written, all topics."""
        return sum(t.bytes for t in self.topics.values())

    def summary(self) -> str:
        """One line for a log."""
        text = (
            f"bag {self.bag_path} ({self.state}): {self.written} messages written, {self.dropped} dropped, "
            f"{self.file_bytes / 1e6:.1f} MB in {len(self.files) + bool(self.current_file)} file(s)"
        )
        return text + (f"; {self.stop_reason}" if self.stop_reason else "")


@dataclass
class _Command:
    kind: str  # "topic", "split", "close"
    arg: Any = None
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None


DiskUsage = Callable[[str], Any]  # shutil.disk_usage-like: returns an object with .free (bytes)


class BagRecorder:
    """Writes a rosbag2 MCAP bag from serialized messages, off the caller's thread.

    ``add_topic`` before writing a topic; ``write`` queues a message and returns at once (False when
    it is not recorded: paused, stopped, or dropped because the queue is full); ``split`` finishes
    the current file; ``close`` drains the queue, finishes the bag and writes metadata.yaml.
    Splits happen before a message whose log time is ``max_split_duration_s`` past the split's first
    message, and after the message that makes the file reach ``max_split_bytes`` (0 = no limit).
    """

    def __init__(
        self,
        path: Path | str,
        *,
        max_split_bytes: int = 0,
        max_split_duration_s: float = 0.0,
        compression: str = "none",
        chunk_bytes: int = 1 << 20,
        flush_interval_s: float = 1.0,
        min_free_bytes: int = 64 << 20,
        queue_max_bytes: int = 128 << 20,
        disk_check_interval_s: float = 1.0,
        disk_usage: DiskUsage | None = None,
        custom_data: Mapping[str, str] | None = None,
        ros_distro: str = "kilted",
        paused: bool = False,
    ) -> None:
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {list(COMPRESSIONS)}, got {compression!r}")
        for name, value in (
            ("max_split_bytes", max_split_bytes),
            ("max_split_duration_s", max_split_duration_s),
            ("min_free_bytes", min_free_bytes),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0 (0 = off), got {value}")
        for name, value in (
            ("chunk_bytes", chunk_bytes),
            ("queue_max_bytes", queue_max_bytes),
            ("flush_interval_s", flush_interval_s),
            ("disk_check_interval_s", disk_check_interval_s),
        ):
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        self.path = Path(path)
        if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
            raise RecorderError(f"bag path {self.path} exists and is not an empty directory: not overwriting")
        self._disk_usage: DiskUsage = disk_usage or shutil.disk_usage
        self._max_split_bytes = int(max_split_bytes)
        self._max_split_ns = int(round(max_split_duration_s * 1e9))
        self._compression = compression
        self._chunk_bytes = int(chunk_bytes)
        self._flush_interval_s = float(flush_interval_s)
        self._min_free_bytes = int(min_free_bytes)
        self._queue_max_bytes = int(queue_max_bytes)
        self._disk_interval_s = float(disk_check_interval_s)
        self._custom_data = dict(custom_data or {})
        self._ros_distro = ros_distro

        self._disk_free = -1
        existing = next(p for p in (self.path, *self.path.parents) if p.exists())
        free = self._check_disk(existing)
        if self._min_free_bytes and free < self._min_free_bytes:
            raise RecorderError(self._disk_reason(free))
        self.path.mkdir(parents=True, exist_ok=True)

        self._cond = threading.Condition()  # guards everything below that both threads touch
        self._queue: deque[tuple | _Command] = deque()
        self._queued_bytes = 0
        self._queue_peak = 0
        self._topics: dict[str, TopicSpec] = {}
        self._stats: dict[str, TopicStats] = {}
        self._state = "paused" if paused else "recording"
        self._closing = False
        self._stop_reason = ""
        self._last_error = ""
        self._files: list[FileRecord] = []
        self._finished_bytes = 0
        # writer-thread state
        self._split: McapSplit | None = None
        self._next_index = 0
        self._last_disk_check = time.monotonic()
        self._bytes_since_disk_check = 0

        write_metadata(self.path, self._metadata([]))
        self._thread = threading.Thread(target=self._run, name=f"bag_writer:{self.path.name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------ public API
    def add_topic(
        self,
        name: str,
        type_name: str,
        qos_profiles: Sequence[Mapping[str, Any]] | None = None,
        *,
        msgdef: str | None = None,
        type_hash: str | None = None,
    ) -> TopicSpec:
        """Declare a topic (absolute name, ``pkg/msg/Type``); its definition comes from the typestore unless given."""
        if not name.startswith("/"):
            raise ValueError(f"topic name must be absolute (start with '/'), got {name!r}")
        if not _TYPE_NAME.match(type_name):
            raise ValueError(f"type name must look like 'sensor_msgs/msg/Image', got {type_name!r}")
        if msgdef is None:
            msgdef, store_hash = message_definition(type_name)
            type_hash = type_hash or store_hash
        profiles = tuple(qos_profile(**_profile_kwargs(p)) for p in (qos_profiles or ()))
        spec = TopicSpec(
            name=name, type_name=type_name, msgdef=msgdef, type_hash=type_hash or "", qos_profiles=profiles
        )
        with self._cond:
            self._ensure_open()
            known = self._topics.get(name)
            if known is not None:
                if known.type_name != type_name:
                    raise ValueError(f"topic {name} is already recorded as {known.type_name}, not {type_name}")
                return known
            self._topics[name] = spec
            self._stats[name] = TopicStats()
            self._queue.append(_Command("topic", spec))
            self._cond.notify()
        return spec

    def write(self, topic: str, data: bytes, log_time_ns: int, publish_time_ns: int | None = None,
              sequence: int = 0) -> bool:
        """Queue one serialized (CDR) message; never blocks. False when it is not recorded (paused, stopped, full)."""
        size = len(data)
        with self._cond:
            stats = self._stats.get(topic)
            if stats is None:
                raise KeyError(f"topic {topic!r} was not added to the recorder (call add_topic first)")
            if self._state != "recording" or self._closing:
                return False
            stats.received += 1
            if self._queued_bytes + size > self._queue_max_bytes:
                stats.dropped += 1
                return False
            self._queue.append((topic, data, int(log_time_ns), int(publish_time_ns or log_time_ns), int(sequence)))
            self._queued_bytes += size
            self._queue_peak = max(self._queue_peak, self._queued_bytes)
            self._cond.notify()
        return True

    def split(self, timeout: float = 30.0) -> str | None:
        """Finish the current file once the messages queued before are in it; its name, or None if it was empty."""
        command = self._command("split")
        if not command.done.wait(timeout):
            raise RecorderError(f"split of {self.path} did not finish within {timeout} s")
        return command.result

    def pause(self) -> None:
        """Stop recording new messages until :meth:`resume` (messages already queued are written)."""
        with self._cond:
            self._ensure_open()
            if self._state == "recording":
                self._state = "paused"

    def resume(self) -> None:
        """Record again after :meth:`pause`."""
        with self._cond:
            self._ensure_open()
            if self._state == "paused":
                self._state = "recording"

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until every queued message and command is handled; False on timeout."""
        command = self._command("sync")
        return command.done.wait(timeout)

    def close(self, timeout: float = 120.0) -> RecorderStats:
        """Write what is queued, finish the last file and metadata.yaml, end the writer thread; the final stats."""
        with self._cond:
            if not self._closing:
                self._closing = True
                self._queue.append(_Command("close"))
                self._cond.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RecorderError(f"closing {self.path} did not finish within {timeout} s")
        return self.stats

    @property
    def state(self) -> str:
        """'recording', 'paused', 'stopped' (disk guard or write error: see stop_reason) or 'closed'."""
        with self._cond:
            return self._state

    @property
    def stop_reason(self) -> str:
        """Why recording stopped by itself ('' while it did not)."""
        with self._cond:
            return self._stop_reason

    @property
    def files(self) -> list[Path]:
        """Finished (complete) MCAP files, in order."""
        with self._cond:
            return [self.path / f.name for f in self._files]

    @property
    def topics(self) -> dict[str, TopicSpec]:
        """Topics added so far, by name."""
        with self._cond:
            return dict(self._topics)

    @property
    def stats(self) -> RecorderStats:
        """A consistent snapshot of the counters."""
        with self._cond:
            split = self._split
            return RecorderStats(
                state=self._state,
                stop_reason=self._stop_reason,
                bag_path=str(self.path),
                topics={k: replace(v) for k, v in self._stats.items()},
                files=tuple(f.name for f in self._files),
                current_file=split.path.name if split is not None else "",
                file_bytes=self._finished_bytes + (split.size if split is not None else 0),
                queue_bytes=self._queued_bytes,
                queue_peak_bytes=self._queue_peak,
                disk_free_bytes=self._disk_free,
                last_error=self._last_error,
            )

    def __enter__(self) -> BagRecorder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------- internals
    def _ensure_open(self) -> None:
        if self._closing or self._state == "closed":
            raise RecorderError(f"recorder of {self.path} is closed")

    def _command(self, kind: str) -> _Command:
        command = _Command(kind)
        with self._cond:
            self._ensure_open()
            self._queue.append(command)
            self._cond.notify()
        return command

    def _metadata(self, files: Sequence[FileRecord]) -> dict[str, Any]:
        with self._cond:
            topics = list(self._topics.values())
        return bag_metadata(files, topics, custom_data=self._custom_data, ros_distro=self._ros_distro)

    def _check_disk(self, where: Path | None = None) -> int:
        self._disk_free = int(self._disk_usage(str(where or self.path)).free)
        self._last_disk_check = time.monotonic()
        self._bytes_since_disk_check = 0
        return self._disk_free

    def _disk_reason(self, free: int) -> str:
        return (
            f"free disk space at {self.path} is {free / 1e6:.0f} MB, below the minimum of "
            f"{self._min_free_bytes / 1e6:.0f} MB: recording stopped"
        )

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    if not self._queue:
                        self._cond.wait(timeout=self._idle_timeout())
                    item = self._queue.popleft() if self._queue else None
                    if isinstance(item, tuple):
                        self._queued_bytes -= len(item[1])
                try:
                    if isinstance(item, _Command):
                        finished = self._handle(item)
                        item.done.set()
                        if finished:
                            return
                    elif item is not None:
                        self._write_message(*item)
                    self._housekeeping()
                except OSError as exc:
                    where = self._split.path.name if self._split is not None else str(self.path)
                    self._stop(f"writing {where} failed: {exc}", clean=False)
                    if isinstance(item, _Command):
                        item.done.set()
                        if item.kind == "close":
                            with self._cond:
                                self._state = "closed"
                            return
        except Exception as exc:  # noqa: BLE001 - a bug must not leave a silently dead writer
            try:
                self._stop(f"writer thread failed: {type(exc).__name__}: {exc}", clean=False)
            finally:
                with self._cond:
                    for pending in self._queue:
                        if isinstance(pending, _Command):
                            pending.done.set()
                    self._state = "closed"

    def _idle_timeout(self) -> float:
        timeout = self._disk_interval_s
        split = self._split
        if split is not None and split.chunk_opened_at is not None:
            timeout = min(timeout, max(0.0, split.chunk_opened_at + self._flush_interval_s - time.monotonic()))
        return max(timeout, 0.01)

    def _handle(self, command: _Command) -> bool:
        if command.kind == "topic":
            if self._split is not None:
                self._split.add_topic(command.arg)
        elif command.kind == "split":
            if self._split is not None and self._split.message_count:
                command.result = self._finish_split()
        elif command.kind == "close":
            if self._split is None and not self._files and self._state != "stopped":
                self._open_split()  # a bag with no messages still gets one (empty) file, as rosbag2 does
            if self._split is not None:
                self._finish_split()
            write_metadata(self.path, self._metadata(self._files))
            with self._cond:
                self._state = "closed"
            return True
        return False

    def _write_message(self, topic: str, data: bytes, log_time: int, publish_time: int, sequence: int) -> None:
        if self._state == "stopped":
            self._count_dropped(topic)
            return
        split = self._split
        if (
            split is not None
            and self._max_split_ns
            and split.start_ns is not None
            and log_time - split.start_ns >= self._max_split_ns
        ):
            self._finish_split()
        if self._split is None:
            self._open_split()
            if self._split is None:  # the disk guard stopped recording
                self._count_dropped(topic)
                return
        split = self._split
        split.write(topic, data, log_time, publish_time, sequence)
        with self._cond:
            stats = self._stats[topic]
            stats.written += 1
            stats.bytes += len(data)
        self._bytes_since_disk_check += len(data)
        if self._max_split_bytes and split.size >= self._max_split_bytes:
            self._finish_split()

    def _count_dropped(self, topic: str) -> None:
        with self._cond:
            self._stats[topic].dropped += 1

    def _open_split(self) -> None:
        free = self._check_disk()
        if self._min_free_bytes and free < self._min_free_bytes:
            self._stop(self._disk_reason(free), clean=True)
            return
        path = self.path / f"{self.path.name}_{self._next_index}.mcap"
        self._next_index += 1
        with self._cond:
            topics = list(self._topics.values())
        split = McapSplit(path, topics, self._compression, self._chunk_bytes)
        with self._cond:
            self._split = split

    def _finish_split(self) -> str:
        split = self._split
        assert split is not None
        record = split.record()
        files = [*self._files, record]
        # the rosbag2 record inside the file describes the bag as of this file, as rosbag2 writes it
        split.finish(yaml.safe_dump(self._metadata(files), sort_keys=False))
        size = split.path.stat().st_size
        with self._cond:
            self._files = files
            self._finished_bytes += size
            self._split = None
        write_metadata(self.path, self._metadata(files))
        return record.name

    def _housekeeping(self) -> None:
        split = self._split
        now = time.monotonic()
        opened = split.chunk_opened_at if split is not None else None
        if opened is not None and now - opened >= self._flush_interval_s:
            split.flush_chunk()
        if self._state != "stopped" and (
            now - self._last_disk_check >= self._disk_interval_s or self._bytes_since_disk_check >= _DISK_CHECK_BYTES
        ):
            free = self._check_disk()
            if self._min_free_bytes and free < self._min_free_bytes:
                self._stop(self._disk_reason(free), clean=True)

    def _stop(self, reason: str, clean: bool) -> None:
        """Stop recording by itself: finish the split if it can, list the finished files, drop what is queued."""
        split = self._split
        if split is not None:
            try:
                if not clean:
                    raise OSError("not finishing after a write error")
                self._finish_split()
            except OSError:
                split.abort()  # left without a footer: repair_bag recovers its chunks
                with self._cond:
                    self._split = None
        try:
            write_metadata(self.path, self._metadata(self._files))
        except OSError as exc:
            reason += f"; metadata.yaml not rewritten: {exc}"
        with self._cond:
            if self._state != "closed":
                self._state = "stopped"
            self._stop_reason = self._stop_reason or reason
            self._last_error = reason
            kept: deque[tuple | _Command] = deque()
            for item in self._queue:
                if isinstance(item, tuple):
                    self._stats[item[0]].dropped += 1
                else:
                    kept.append(item)
            self._queue = kept
            self._queued_bytes = 0


def _profile_kwargs(profile: Mapping[str, Any]) -> dict[str, Any]:
    """qos_profile() keyword arguments from a profile mapping (metadata form or keyword form)."""
    def ns(value: Any) -> int:
        if isinstance(value, Mapping):
            return int(value.get("sec", 0)) * 1_000_000_000 + int(value.get("nsec", 0))
        return int(value)

    out: dict[str, Any] = {}
    for key, value in profile.items():
        if key in ("deadline", "lifespan", "liveliness_lease_duration"):
            out[f"{key}_ns"] = ns(value)
        elif key.endswith("_ns"):
            out[key] = ns(value)
        elif key in ("history", "depth", "reliability", "durability", "liveliness", "avoid_ros_namespace_conventions"):
            out[key] = value
        else:
            raise ValueError(f"unknown QoS profile field {key!r}")
    return out
