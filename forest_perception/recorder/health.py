"""capture_node's health from its recorder's statistics: the ``/diagnostics`` level, message and values."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

from forest_perception.diagnostics import ERROR, OK, WARN
from forest_perception.recorder.bag_recorder import RecorderStats

MB = 1_000_000


class WriteRate:
    """Messages and megabytes written per second over the last ``window`` samples of the counters."""

    def __init__(self, window: int = 30) -> None:
        self._samples: deque[tuple[float, int, int]] = deque(maxlen=window)  # (monotonic, written, bytes)

    def clear(self) -> None:
        """Forget the samples (a new bag)."""
        self._samples.clear()

    def add(self, now: float, written: int, bytes_written: int) -> None:
        """One reading of the recorder's counters."""
        self._samples.append((now, written, bytes_written))

    def rates(self) -> tuple[float, float]:
        """(messages per second, MB per second); zeros with fewer than two samples."""
        if len(self._samples) < 2 or self._samples[-1][0] <= self._samples[0][0]:
            return 0.0, 0.0
        (t0, n0, b0), (t1, n1, b1) = self._samples[0], self._samples[-1]
        return (n1 - n0) / (t1 - t0), (b1 - b0) / (t1 - t0) / MB


def recorder_health(stats: RecorderStats | None, recording: bool, rates: tuple[float, float],
                    transport_lost: Mapping[str, int], waiting: Mapping[str, str],
                    last_error: str) -> tuple[bytes, str, dict[str, object]]:
    """(level, message, key/values) of a capture node.

    ERROR: recording stopped by itself (disk guard, write error) or a start that failed; WARN: messages
    dropped or lost in transport, paused, or topics still waited for.
    """
    lost = sum(transport_lost.values())
    values: dict[str, Any] = {"state": stats.state if recording and stats is not None else "idle"}
    if stats is not None:
        rate_hz, mb_s = rates
        values.update({
            "bag": stats.bag_path, "current_file": stats.current_file, "files_finished": len(stats.files),
            "messages_received": stats.received, "messages_written": stats.written,
            "messages_dropped": stats.dropped, "messages_lost_in_transport": lost,
            "mb_written": stats.file_bytes / MB, "write_rate_hz": rate_hz, "write_rate_mb_s": mb_s,
            "queue_mb": stats.queue_bytes / MB, "queue_peak_mb": stats.queue_peak_bytes / MB,
            "disk_free_mb": stats.disk_free_bytes / MB if stats.disk_free_bytes >= 0 else -1.0,
        })
        for name, topic in stats.topics.items():
            lost_here = transport_lost.get(name, 0)
            values[f"topic {name}"] = f"written {topic.written}, dropped {topic.dropped}, lost {lost_here}"
    for topic, why in waiting.items():
        values[f"waiting {topic}"] = why
    values["last_error"] = last_error
    if not recording or stats is None:
        return (ERROR, last_error, values) if last_error else (OK, "idle", values)
    if stats.state == "stopped":
        return ERROR, stats.stop_reason, values
    if stats.dropped or lost:
        return WARN, f"recording; {stats.dropped} dropped, {lost} lost in transport", values
    if stats.state == "paused":
        return WARN, "paused", values
    if waiting:
        return WARN, f"recording; waiting for {len(waiting)} topic(s)", values
    return OK, "recording", values
