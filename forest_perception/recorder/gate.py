"""Marked recording: hold serialized messages for a while and write only those around marked frames (no rclpy).

The core of capture_node's ``record_mode:=marked`` (docs/nodes.md, capture_node). Every message waits
``delay_ns`` (receive clock) in memory; a mark names a camera frame by its header stamp. When a message's wait
is over it is written if a mark covers it and discarded otherwise, so the bag is still written in arrival
order. A mark at stamp S covers a message of a *frame topic* (colour, depth, camera_info: one message per
frame) whose header stamp is within ``tolerance_ns`` of S, and a message of any other topic (IMU, GPS, wheels,
odometry: the sensor context) whose stamp is within ``context_ns`` of S. Stamps are read from the CDR bytes
(every recorded sensor message starts with a ``std_msgs/Header``), without deserialising.
"""

from __future__ import annotations

import bisect
import struct
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

MARK_TOPIC = "capture/mark"
"""Marks for capture_node (std_msgs/Header: the stamp of the frame to keep; frame_id: why), in the rover namespace."""

_CDR_LE = {0x0001, 0x0007}  # CDR_LE, CDR2_LE (final types: no DHEADER before the first member)
_CDR_BE = {0x0000, 0x0006}


def header_stamp_ns(data: bytes | memoryview) -> int | None:
    """The ``header.stamp`` (ns) of a serialized message that starts with a ``std_msgs/Header``; None when the bytes
    are too short or use an encapsulation this does not read."""
    if len(data) < 12:
        return None
    kind = (data[0] << 8) | data[1]
    if kind in _CDR_LE:
        sec, nanosec = struct.unpack_from("<iI", data, 4)
    elif kind in _CDR_BE:
        sec, nanosec = struct.unpack_from(">iI", data, 4)
    else:
        return None
    if nanosec >= 1_000_000_000:
        return None
    return sec * 1_000_000_000 + nanosec


@dataclass(frozen=True)
class GateConfig:
    """What a mark covers and how long messages wait for one."""

    frame_topics: frozenset[str]
    """topics with one message per camera frame: written when their stamp is within ``tolerance_ns`` of a mark"""
    tolerance_ns: int = 1_000_000
    context_ns: int = 500_000_000
    """other topics: written when their stamp is within this of a mark"""
    delay_ns: int = 2_000_000_000
    """how long a message waits for a mark (receive clock)"""
    max_bytes: int = 256 * 1024 * 1024
    """memory for waiting messages; beyond it the oldest are decided early"""

    def validate(self) -> GateConfig:
        """Raise ``ValueError`` naming the first bad field."""
        for name in ("tolerance_ns", "context_ns", "delay_ns"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {self.max_bytes}")
        return self


class MarkWindows:
    """The marks received so far (sorted stamps) and which messages they cover."""

    def __init__(self, config: GateConfig, keep: int = 10_000) -> None:
        self.config = config
        self._stamps: list[int] = []
        self._keep = keep

    def __len__(self) -> int:
        return len(self._stamps)

    def add(self, stamp_ns: int) -> bool:
        """Record a mark; False when the same stamp was marked already."""
        i = bisect.bisect_left(self._stamps, stamp_ns)
        if i < len(self._stamps) and self._stamps[i] == stamp_ns:
            return False
        self._stamps.insert(i, int(stamp_ns))
        if len(self._stamps) > self._keep:
            del self._stamps[0]
        return True

    def covers(self, topic: str, stamp_ns: int) -> bool:
        """Whether a mark covers a message of ``topic`` stamped ``stamp_ns``."""
        reach = self.config.tolerance_ns if topic in self.config.frame_topics else self.config.context_ns
        i = bisect.bisect_left(self._stamps, stamp_ns - reach)
        return i < len(self._stamps) and self._stamps[i] <= stamp_ns + reach

    def forget_before(self, stamp_ns: int) -> None:
        """Drop marks that can cover nothing stamped ``stamp_ns`` or later."""
        reach = max(self.config.tolerance_ns, self.config.context_ns)
        del self._stamps[: bisect.bisect_left(self._stamps, stamp_ns - reach)]


@dataclass(frozen=True)
class HeldMessage:
    """One serialized message waiting in the gate."""

    topic: str
    data: bytes
    receive_ns: int
    publish_ns: int
    sequence: int
    stamp_ns: int


@dataclass
class GateStats:
    """What the gate did: marks, messages written and discarded, early decisions, late marks."""

    marks: int = 0
    duplicate_marks: int = 0
    late_marks: int = 0
    frames_written: int = 0
    written: int = 0
    discarded: int = 0
    bytes_written: int = 0
    bytes_discarded: int = 0
    decided_early: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters by name (for /diagnostics)."""
        return dict(self.__dict__)


class MarkGate:
    """Messages wait ``delay_ns``; then a mark covering them writes them, else they are discarded (arrival order)."""

    def __init__(self, config: GateConfig) -> None:
        self.config = config.validate()
        self.marks = MarkWindows(config)
        self.stats = GateStats()
        self._queue: deque[HeldMessage] = deque()
        self._bytes = 0
        self._clock_offset: int | None = None  # header stamp - receive time of the latest stamped message
        self._last_frame_stamp: int | None = None  # newest frame-topic stamp already decided

    @property
    def waiting_bytes(self) -> int:
        """Bytes of the messages waiting now."""
        return self._bytes

    @property
    def newest_frame_stamp(self) -> int | None:
        """Stamp of the newest waiting frame-topic message (what ``~/mark`` marks), None when none waits."""
        for held in reversed(self._queue):
            if held.topic in self.config.frame_topics:
                return held.stamp_ns
        return None

    def push(self, topic: str, data: bytes, receive_ns: int, publish_ns: int = 0, sequence: int = 0
             ) -> list[HeldMessage]:
        """Hold one message; returns those decided early to stay within ``max_bytes`` that are to be written."""
        stamp = header_stamp_ns(data)
        if stamp is not None:
            self._clock_offset = stamp - receive_ns
        else:  # no header: place it on the stamps' clock by the latest offset seen
            stamp = receive_ns + (self._clock_offset or 0)
        self._queue.append(HeldMessage(topic, bytes(data), int(receive_ns), int(publish_ns or receive_ns),
                                       int(sequence), stamp))
        self._bytes += len(data)
        out: list[HeldMessage] = []
        while self._bytes > self.config.max_bytes and len(self._queue) > 1:
            self.stats.decided_early += 1
            out += self._decide(self._queue.popleft())
        return out

    def mark(self, stamp_ns: int) -> bool:
        """Mark the frame stamped ``stamp_ns``; False for a stamp marked before. A mark for a frame already
        discarded is counted as late (its context still waiting is written)."""
        if not self.marks.add(int(stamp_ns)):
            self.stats.duplicate_marks += 1
            return False
        self.stats.marks += 1
        if self._last_frame_stamp is not None and stamp_ns <= self._last_frame_stamp - self.config.tolerance_ns:
            self.stats.late_marks += 1
        return True

    def release(self, now_ns: int) -> list[HeldMessage]:
        """Decide every message that has waited ``delay_ns``: those a mark covers, in arrival order, to write."""
        out: list[HeldMessage] = []
        while self._queue and self._queue[0].receive_ns <= now_ns - self.config.delay_ns:
            out += self._decide(self._queue.popleft())
        if self._queue:
            self.marks.forget_before(min(h.stamp_ns for h in self._queue) - self.config.delay_ns)
        return out

    def flush(self) -> list[HeldMessage]:
        """Decide everything waiting now (recording stops): those covered by the marks received so far."""
        out: list[HeldMessage] = []
        while self._queue:
            out += self._decide(self._queue.popleft())
        return out

    def _decide(self, held: HeldMessage) -> list[HeldMessage]:
        self._bytes -= len(held.data)
        frame_topic = held.topic in self.config.frame_topics
        if frame_topic:
            self._last_frame_stamp = max(held.stamp_ns, self._last_frame_stamp or held.stamp_ns)
        if self.marks.covers(held.topic, held.stamp_ns):
            self.stats.written += 1
            self.stats.bytes_written += len(held.data)
            self.stats.frames_written += int(frame_topic)
            return [held]
        self.stats.discarded += 1
        self.stats.bytes_discarded += len(held.data)
        return []


def covered_bytes(messages: Iterable[tuple[str, bytes]], marks: Iterable[int], config: GateConfig) -> tuple[int, int]:
    """(bytes, messages) of ``(topic, serialized)`` pairs that marks at ``marks`` cover: what a marked recording
    of those messages writes (used to size a marked bag from a full one)."""
    windows = MarkWindows(config, keep=1 << 30)
    for stamp in marks:
        windows.add(int(stamp))
    total = count = 0
    for topic, data in messages:
        stamp = header_stamp_ns(data)
        if stamp is not None and windows.covers(topic, stamp):
            total += len(data)
            count += 1
    return total, count
