"""Supervise one long-running process (the rover's Flower SuperNode): start, watch, restart with backoff, stop.

Pure Python, no rclpy: :class:`SuperNodeSupervisor` is driven by :meth:`~SuperNodeSupervisor.poll` from the
caller's timer (no thread of its own). The SuperNode's command line and environment come from
:mod:`forest_perception.collab.deploy.supernode`; states, backoff and what collab_node reports:
``docs/federated.md`` ("Taking part in rounds: the SuperNode under collab_node").
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forest_perception.collab.deploy import processes
from forest_perception.collab.deploy.processes import ManagedProcess

STOPPED, STARTING, RUNNING, BACKOFF, FAILED = "stopped", "starting", "running", "backoff", "failed"
STATES = (STOPPED, STARTING, RUNNING, BACKOFF, FAILED)
_READ_CHUNK = 1 << 16


@dataclass(frozen=True)
class Backoff:
    """Restart delays: ``initial_s`` doubling (``factor``) up to ``max_s``; reset after a run of ``reset_after_s``."""

    initial_s: float = 1.0
    max_s: float = 60.0
    factor: float = 2.0
    reset_after_s: float = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s:
            raise ValueError(f"backoff: need 0 < initial_s <= max_s, got {self.initial_s}, {self.max_s}")
        if self.factor < 1.0 or self.reset_after_s < 0:
            raise ValueError(f"backoff: need factor >= 1 and reset_after_s >= 0, got {self.factor}, "
                             f"{self.reset_after_s}")


class SuperNodeSupervisor:
    """Runs ``argv`` in its own process group, restarts it with backoff, keeps its log tail; see the module doc.

    ``ready_pattern``: a regex that marks the process ``running`` when it appears in its log (group 1, if
    any, is kept as ``ready_match``, e.g. the SuperNode's node id); without one it is ``running`` once it
    has been up ``ready_after_s``. ``max_restarts``: ``failed`` after that many restarts (None: no limit).
    """

    def __init__(self, argv: list[str], env: Mapping[str, str] | None = None, log_path: str | Path = "supernode.log",
                 *, cwd: str | Path | None = None, backoff: Backoff | None = None, ready_pattern: str | None = None,
                 ready_after_s: float = 1.0, stop_grace_s: float = 10.0, tail_lines: int = 20,
                 max_log_bytes: int = 5 * 1024 * 1024, max_restarts: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not argv or not all(isinstance(a, str) for a in argv):
            raise ValueError(f"supervisor: argv must be a non-empty list of str, got {argv!r}")
        self.argv = list(argv)
        self.env = dict(os.environ if env is None else env)
        self.log_path = Path(log_path)
        self.cwd = Path(cwd) if cwd is not None else self.log_path.parent
        self.backoff = backoff or Backoff()
        self.ready_pattern = re.compile(ready_pattern) if ready_pattern else None
        self.ready_after_s = float(ready_after_s)
        self.stop_grace_s = float(stop_grace_s)
        self.max_log_bytes = int(max_log_bytes)
        self.max_restarts = max_restarts
        self._clock = clock
        self.state = STOPPED
        self.reason = "not started"
        self.restarts = 0
        self.starts = 0
        self.exit_code: int | None = None
        self.ready_match = ""
        self.tail: collections.deque[str] = collections.deque(maxlen=max(1, int(tail_lines)))
        self._process: ManagedProcess | None = None
        self._started_at = 0.0
        self._next_start = 0.0
        self._delay = self.backoff.initial_s
        self._read_pos = 0
        self._partial = b""

    # ------------------------------------------------------------------ control
    def start(self) -> str:
        """Start the process now (from any state but a live one); returns the state."""
        if self._process is not None and self._process.popen.poll() is None:
            return self.state
        self._delay = self.backoff.initial_s
        self._spawn()
        return self.state

    def poll(self) -> str:
        """Look at the process: read its log, notice an exit, restart when its backoff is over; returns the state."""
        now = self._clock()
        process = self._process
        if process is not None:
            self._read_log()
            processes.remember_descendants(process)
            code = process.popen.poll()
            if code is None:
                if self.state == STARTING and self._ready(now):
                    self.state = RUNNING
                    self.reason = f"up, ready ({self.ready_match})" if self.ready_match else "up"
                return self.state
            self._exited(process, code, now)
        if self.state == BACKOFF and now >= self._next_start:
            if self.max_restarts is not None and self.restarts >= self.max_restarts:
                self.state = FAILED
                self.reason = f"gave up after {self.restarts} restarts; last: {self.reason}"
                return self.state
            self.restarts += 1
            self._spawn()
        return self.state

    def stop(self) -> None:
        """End the process group and every descendant seen (SIGTERM, SIGKILL after ``stop_grace_s``)."""
        process, self._process = self._process, None
        if process is not None:
            processes.remember_descendants(process)
            processes.stop_process(process, self.stop_grace_s)
            self._read_log(process)
            if process.popen.returncode is not None:
                self.exit_code = process.popen.returncode
            process.log_file.close()
        self.state, self.reason = STOPPED, "stopped"

    # ------------------------------------------------------------------ what it looks like
    @property
    def pid(self) -> int | None:
        """The process id (= its process group id) while one runs."""
        process = self._process
        return process.pid if process is not None and process.popen.poll() is None else None

    def pids(self) -> list[int]:
        """The live process and every live descendant seen (by pid and start time)."""
        process = self._process
        if process is None:
            return []
        out = [process.pid] if process.popen.poll() is None else []
        out += [pid for pid in processes.process_tree(process.pid) if pid not in out]
        out += [pid for pid, started in process.seen.items() if pid not in out and processes.is_alive(pid, started)]
        return out

    def retry_in(self) -> float | None:
        """Seconds until the next restart while backing off, else None."""
        return max(0.0, self._next_start - self._clock()) if self.state == BACKOFF else None

    def status(self) -> dict[str, Any]:
        """State, pid, restarts, exit code, reason, node id (``ready_match``), the log's last line and path."""
        retry = self.retry_in()
        return {
            "state": self.state,
            "pid": self.pid,
            "restarts": self.restarts,
            "exit_code": self.exit_code,
            "reason": self.reason,
            "ready_match": self.ready_match,
            "retry_in_s": round(retry, 1) if retry is not None else None,
            "uptime_s": round(self._clock() - self._started_at, 1) if self.pid is not None else None,
            "last_line": self.tail[-1] if self.tail else "",
            "log": str(self.log_path),
        }

    # ------------------------------------------------------------------ internals
    def _ready(self, now: float) -> bool:
        if self.ready_pattern is None:
            return now - self._started_at >= self.ready_after_s
        return bool(self.ready_match)

    def _exited(self, process: ManagedProcess, code: int, now: float) -> None:
        processes.stop_process(process, grace=1.0)  # whatever it left in its group
        self._read_log(process)
        process.log_file.close()
        self._process = None
        self.exit_code = code
        ran = now - self._started_at
        if ran >= self.backoff.reset_after_s:
            self._delay = self.backoff.initial_s
        delay = self._delay
        self._delay = min(self.backoff.max_s, self._delay * self.backoff.factor)
        self._next_start = now + delay
        last = self.tail[-1] if self.tail else "no output"
        self.state = BACKOFF
        self.reason = f"{Path(self.argv[0]).name} exited with code {code} after {ran:.1f} s ({last}); " \
                      f"restart in {delay:.0f} s"
        self.ready_match = ""

    def _executable(self) -> str | None:
        exe = self.argv[0]
        if os.sep in exe:
            return exe if os.path.isfile(exe) and os.access(exe, os.X_OK) else None
        return shutil.which(exe, path=self.env.get("PATH", os.defpath))

    def _spawn(self) -> None:
        exe = self._executable()
        if exe is None:
            where = "not an executable file" if os.sep in self.argv[0] else \
                f"not found on PATH ({self.env.get('PATH', os.defpath)})"
            self.state, self.reason = FAILED, f"executable {self.argv[0]!r}: {where}"
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._rotate_log()
        try:
            self._read_pos = self.log_path.stat().st_size  # the new run's lines start here
        except FileNotFoundError:
            self._read_pos = 0
        self._partial = b""
        try:
            self._process = processes.start_process(Path(exe).name, self.argv, self.log_path, self.env, self.cwd,
                                                    program=exe)
        except OSError as exc:
            self.state, self.reason = FAILED, f"executable {self.argv[0]!r} did not start: {exc}"
            return
        self._started_at = self._clock()
        self.starts += 1
        self.exit_code = None
        self.ready_match = ""
        waiting = f", waiting for /{self.ready_pattern.pattern}/ in its log" if self.ready_pattern else ""
        self.state, self.reason = STARTING, f"started pid {self._process.pid}{waiting}"

    def _rotate_log(self) -> None:
        try:
            if self.log_path.stat().st_size > self.max_log_bytes:
                os.replace(self.log_path, self.log_path.with_name(self.log_path.name + ".1"))
        except FileNotFoundError:
            pass

    def _read_log(self, process: ManagedProcess | None = None) -> None:
        process = process or self._process
        if process is None:
            return
        if not process.log_file.closed:
            process.log_file.flush()
        try:
            with open(self.log_path, "rb") as handle:
                handle.seek(self._read_pos)
                data = handle.read(_READ_CHUNK * 4)
        except OSError:
            return
        self._read_pos += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()[-_READ_CHUNK:]
        for raw in lines:
            line = processes.strip_ansi(raw.decode(errors="replace")).strip()
            if not line or line.startswith("$ "):
                continue
            self.tail.append(line)
            if self.ready_pattern is not None and not self.ready_match:
                match = self.ready_pattern.search(line)
                if match:
                    self.ready_match = (match.group(1) if match.groups() else "") or match.group(0)
