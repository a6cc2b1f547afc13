"""A worker thread with a one-item slot: the newest job replaces a waiting one, never a queue.

Nodes hand their heavy work (a network on the newest frame, gating a model) to it so that ROS
callbacks return at once; ``submit`` tells the caller which waiting job it replaced.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

Job = TypeVar("Job")


class SlotWorker(Generic[Job]):
    """Runs ``handle(job)`` on its own thread for the newest submitted job, one at a time."""

    def __init__(self, name: str, handle: Callable[[Job], None], on_start: Callable[[], None] | None = None,
                 on_error: Callable[[Exception], bool] | None = None) -> None:
        """``on_error(exc)`` is called when ``handle`` raises: True goes on with the next job, False ends the
        thread quietly; without it the exception ends the thread."""
        self._handle = handle
        self._on_start = on_start
        self._on_error = on_error
        self._wake = threading.Condition()
        self._pending: Job | None = None
        self._running = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Job | None:
        """Hand a job over; returns the waiting job it replaced (None if the slot was empty)."""
        with self._wake:
            replaced, self._pending = self._pending, job
            self._wake.notify()
        return replaced

    @property
    def pending(self) -> Job | None:
        """The job waiting for the thread, if any."""
        with self._wake:
            return self._pending

    @property
    def busy(self) -> bool:
        """True while a job waits or runs."""
        with self._wake:
            return self._pending is not None or self._running

    @property
    def alive(self) -> bool:
        """True while the thread runs (a job that raised ends it: a handler catches what it can take)."""
        return self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop after the running job (a waiting one is dropped); True when the thread ended in time."""
        self._stop.set()
        with self._wake:
            self._pending = None
            self._wake.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=timeout)
        return not self._thread.is_alive()

    def _loop(self) -> None:
        if self._on_start is not None:
            self._on_start()
        while not self._stop.is_set():
            with self._wake:
                if self._pending is None:
                    self._wake.wait(timeout=0.1)
                job, self._pending = self._pending, None
                self._running = job is not None
            if job is None:
                continue
            try:
                self._handle(job)
            except Exception as exc:
                if self._on_error is None:
                    raise
                if not self._on_error(exc):
                    return
            finally:
                with self._wake:
                    self._running = False
