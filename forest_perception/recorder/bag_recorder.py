"""BagRecorder: a rosbag2 MCAP bag written from serialized messages by one writer thread, with its stats.

The core of capture_node (no rclpy): ``write`` never blocks, splits by size or duration, a disk guard
stops recording cleanly. Details: docs/runtime.md (`forest_perception.recorder`).
"""

from __future__ import annotations

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

from forest_perception.recorder.mcap_split import McapSplit
from forest_perception.recorder.metadata import FileRecord, bag_metadata, write_metadata
from forest_perception.recorder.qos import qos_profile_from
from forest_perception.recorder.topic_spec import TopicSpec, message_definition

COMPRESSIONS = ("none", "zstd")
STATES = ("recording", "paused", "stopped", "closed")

_TYPE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*/(msg|srv|action)/[A-Za-z][A-Za-z0-9_]*$")
_DISK_CHECK_BYTES = 16 << 20  # check the free space at least every 16 MiB written


class RecorderError(RuntimeError):
    """The recorder cannot do what was asked (bag exists, disk full, already closed)."""


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
        profiles = tuple(qos_profile_from(p) for p in (qos_profiles or ()))
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

