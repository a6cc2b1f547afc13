"""Approximate-time matching of camera streams, with the policy of message_filters (docs/sensor_sync.md)."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from forest_perception.sync.base import NS_PER_S, check_stamp, seconds_to_ns


class Stamped(NamedTuple):
    """An item with its stamp (integer nanoseconds)."""

    stamp_ns: int
    item: Any


@dataclass
class ChannelCounts:
    """What happened to one channel's messages in an :class:`ApproximateTimeSynchronizer`."""

    added: int = 0
    duplicates: int = 0
    matched: int = 0
    dropped_overflow: int = 0
    dropped_cleared: int = 0


DropCallback = Callable[[str, int, Any, str], None]


class ApproximateTimeSynchronizer:
    """Approximate-time matching of several stamped streams (``message_filters`` semantics).

    ``add(channel, stamp_ns, item)`` queues the item (a second item with the same stamp on the
    same channel replaces the first and counts as a duplicate), trims the channel's queue to
    ``queue_size`` by dropping its oldest stamp, then looks for a set: for every other channel
    the queued stamps within ``slop`` of the new one, sorted closest first; combinations are
    tried in that order and the first whose stamps span at most ``slop`` is returned (as
    ``{channel: Stamped}``) and removed from the queues. ``on_drop(channel, stamp_ns, item,
    reason)`` hears of every item that leaves a queue unmatched (``"overflow"``, ``"cleared"``).
    """

    def __init__(
        self,
        channels: Sequence[str],
        queue_size: int,
        slop_s: float,
        on_drop: DropCallback | None = None,
    ) -> None:
        channels = tuple(channels)
        if len(channels) < 1 or len(set(channels)) != len(channels):
            raise ValueError(f"channels must be distinct names, got {channels!r}")
        if isinstance(queue_size, bool) or not isinstance(queue_size, (int, np.integer)) or queue_size < 1:
            raise ValueError(f"queue_size must be an integer >= 1, got {queue_size!r}")
        self.channels = channels
        self.queue_size = int(queue_size)
        self.slop_ns = seconds_to_ns("slop_s", slop_s)
        self.on_drop = on_drop
        self._queues: dict[str, dict[int, Any]] = {c: {} for c in channels}
        # stamps already emitted per channel, so a late duplicate is never emitted twice
        history = max(64, 4 * self.queue_size)
        self._emitted: dict[str, deque[int]] = {c: deque(maxlen=history) for c in channels}
        self._emitted_set: dict[str, set[int]] = {c: set() for c in channels}
        self.counts = {c: ChannelCounts() for c in channels}
        self.last_status = ""

    @property
    def slop_s(self) -> float:
        """Slop in seconds."""
        return self.slop_ns / NS_PER_S

    def _queue(self, channel: str) -> dict[int, Any]:
        try:
            return self._queues[channel]
        except KeyError:
            raise ValueError(f"unknown channel {channel!r}; channels are {list(self.channels)}") from None

    def queued(self, channel: str) -> list[int]:
        """Sorted stamps waiting in ``channel``'s queue."""
        return sorted(self._queue(channel))

    def _drop(self, channel: str, stamp_ns: int, item: Any, reason: str) -> None:
        if reason == "overflow":
            self.counts[channel].dropped_overflow += 1
        else:
            self.counts[channel].dropped_cleared += 1
        if self.on_drop is not None:
            self.on_drop(channel, stamp_ns, item, reason)

    def _mark_emitted(self, channel: str, stamp_ns: int) -> None:
        history = self._emitted[channel]
        if len(history) == history.maxlen:
            self._emitted_set[channel].discard(history[0])
        history.append(stamp_ns)
        self._emitted_set[channel].add(stamp_ns)
        self.counts[channel].matched += 1

    def _take(self, chosen: dict[str, int]) -> dict[str, Stamped]:
        out = {}
        for channel, stamp_ns in chosen.items():
            out[channel] = Stamped(stamp_ns, self._queues[channel].pop(stamp_ns))
            self._mark_emitted(channel, stamp_ns)
        return out

    def add(self, channel: str, stamp_ns: int, item: Any) -> list[dict[str, Stamped]]:
        """Queue one item; return the matched set it completes (at most one), as ``[{channel: Stamped}]``.

        ``last_status`` says what became of the item: ``"queued"``, ``"matched"``, ``"duplicate"``
        (same stamp already queued: replaced; or already emitted: dropped) or ``"overflow"``.
        """
        queue = self._queue(channel)
        stamp_ns = check_stamp(channel, stamp_ns)
        counts = self.counts[channel]
        counts.added += 1
        if stamp_ns in self._emitted_set[channel]:
            counts.duplicates += 1
            self.last_status = "duplicate"
            return []
        if stamp_ns in queue:
            counts.duplicates += 1
            queue[stamp_ns] = item
            self.last_status = "duplicate"
            return []
        queue[stamp_ns] = item
        self.last_status = "queued"
        while len(queue) > self.queue_size:
            oldest = min(queue)
            self._drop(channel, oldest, queue.pop(oldest), "overflow")
            if oldest == stamp_ns:
                self.last_status = "overflow"
        if stamp_ns not in queue:
            return []
        index = self.channels.index(channel)
        candidates: list[list[int]] = []
        for other in self.channels:
            if other == channel:
                continue
            near = [s for s in self._queues[other] if abs(s - stamp_ns) <= self.slop_ns]
            if not near:
                return []
            near.sort(key=lambda s: abs(s - stamp_ns))  # stable: ties keep arrival order
            candidates.append(near)
        for combo in itertools.product(*candidates):
            stamps = list(combo)
            stamps.insert(index, stamp_ns)
            if max(stamps) - min(stamps) <= self.slop_ns:
                self.last_status = "matched"
                return [self._take(dict(zip(self.channels, stamps)))]
        return []

    def partners(self, anchor: str, stamp_ns: int) -> dict[str, int]:
        """For the queued ``anchor`` entry, the closest queued stamp of each other channel within slop
        (channels in order, each kept only if the set still spans at most ``slop``)."""
        chosen = {anchor: stamp_ns}
        for other in self.channels:
            if other == anchor:
                continue
            lo, hi = min(chosen.values()), max(chosen.values())
            near = [s for s in self._queues[other] if max(hi, s) - min(lo, s) <= self.slop_ns]
            if near:
                chosen[other] = min(near, key=lambda s: abs(s - stamp_ns))
        return chosen

    def take_partial(self, anchor: str, stamp_ns: int) -> dict[str, Stamped]:
        """Remove and return the queued ``anchor`` entry with :meth:`partners` (an incomplete set)."""
        if stamp_ns not in self._queue(anchor):
            raise KeyError(f"no {anchor} entry stamped {stamp_ns} ns is queued")
        return self._take(self.partners(anchor, stamp_ns))

    def clear(self) -> int:
        """Empty every queue (items reported to ``on_drop`` as ``"cleared"``); return how many were dropped."""
        dropped = 0
        for channel, queue in self._queues.items():
            for stamp_ns in sorted(queue):
                self._drop(channel, stamp_ns, queue[stamp_ns], "cleared")
                dropped += 1
            queue.clear()
        return dropped

    def forget_history(self) -> None:
        """Forget which stamps were emitted (after a clock reset the same stamps come again)."""
        for channel in self.channels:
            self._emitted[channel].clear()
            self._emitted_set[channel].clear()
