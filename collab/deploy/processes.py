"""Processes the deployment and the rover's supervisor start: own process group, log file, stopped by pid.

Descendants, group members and listening sockets are read from Linux ``/proc`` (empty elsewhere);
nothing is ever looked up or ended by name. See ``docs/federated.md`` ("What LocalDeployment starts").
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
"""Colour codes Flower writes into its logs."""


def strip_ansi(text: str) -> str:
    """``text`` without terminal colour codes."""
    return ANSI_ESCAPE.sub("", text)


@dataclass
class ManagedProcess:
    """A subprocess started here, with its log and the descendants seen while it ran."""

    name: str
    argv: list[str]
    popen: subprocess.Popen
    log_path: Path
    log_file: IO[bytes]
    seen: dict[int, int] = field(default_factory=dict)  # pid -> start time (guards against pid reuse)
    log_offset: int = 0  # bytes of the log written before this process (an earlier start of the same name)

    @property
    def pid(self) -> int:
        """The process id (also its process group id)."""
        return self.popen.pid

    def log_text(self) -> str:
        """This process's log so far (not an earlier start's under the same name), colour codes removed."""
        if not self.log_file.closed:
            self.log_file.flush()
        with open(self.log_path, "rb") as stream:
            stream.seek(self.log_offset)
            return strip_ansi(stream.read().decode(errors="replace"))


def start_process(name: str, argv: Sequence[str], log_path: str | Path, env: Mapping[str, str], cwd: str | Path,
                  program: str | None = None) -> ManagedProcess:
    """Start ``argv`` in a session of its own, stdout and stderr appended to ``log_path`` after a ``$ argv`` line.

    ``program`` (a resolved path) runs in place of ``argv[0]``; the log line keeps ``argv`` as given.
    Raises what ``subprocess.Popen`` raises (``OSError`` for a program that does not start).
    """
    log_path = Path(log_path)
    offset = log_path.stat().st_size if log_path.is_file() else 0
    log_file = open(log_path, "ab")  # noqa: SIM115 - closed by whoever stops the process
    log_file.write(f"$ {' '.join(argv)}\n".encode())
    log_file.flush()
    command = [program, *argv[1:]] if program else list(argv)
    try:
        popen = subprocess.Popen(command, env=dict(env), cwd=str(cwd), stdout=log_file, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
    except BaseException:
        log_file.close()
        raise
    return ManagedProcess(name, list(argv), popen, log_path, log_file, log_offset=offset)


# ---------------------------------------------------------------------------------------------- /proc


def proc_stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, pgrp, starttime) of a live process, None when gone (Linux /proc)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError, OSError):
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[2]), int(fields[19])


def _live_stats() -> dict[int, tuple[str, int, int, int]]:
    try:
        entries = os.listdir("/proc")
    except OSError:
        return {}
    stats = {}
    for entry in entries:
        if entry.isdigit():
            stat = proc_stat(int(entry))
            if stat is not None and stat[0] != "Z":
                stats[int(entry)] = stat
    return stats


def process_tree(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children first); empty where /proc is not available."""
    children: dict[int, list[int]] = {}
    for child, stat in _live_stats().items():
        children.setdefault(stat[1], []).append(child)
    out, queue = [], list(children.get(pid, []))
    while queue:
        child = queue.pop(0)
        out.append(child)
        queue.extend(children.get(child, []))
    return out


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid`` (Linux /proc)."""
    return [pid for pid, stat in _live_stats().items() if stat[2] == pgid]


def is_alive(pid: int, started: int | None = None) -> bool:
    """Whether ``pid`` runs and is not a zombie (and, with ``started``, is the process that started then)."""
    stat = proc_stat(pid)
    return stat is not None and stat[0] != "Z" and (started is None or stat[3] == started)


def remember_descendants(process: ManagedProcess) -> None:
    """Record the live descendants of ``process`` (with their start times), so that stopping it finds them."""
    for pid in process_tree(process.pid):
        stat = proc_stat(pid)
        if stat is not None:
            process.seen.setdefault(pid, stat[3])


def _hex_address(text: str) -> str:
    raw = bytes.fromhex(text)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    # /proc/net/tcp6: four 32-bit words, each in host (little-endian) order
    return socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))


def listening_sockets(pids: Iterable[int]) -> list[tuple[str, int, int]]:
    """``(address, port, pid)`` of every TCP socket in LISTEN state that one of ``pids`` holds (Linux)."""
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:
            continue
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and parts[3] == "0A" and parts[9] in inodes:
                address, port = parts[1].split(":")
                out.append((_hex_address(address), int(port, 16), inodes[parts[9]]))
    return sorted(out)


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports free on ``host`` right now."""
    sockets, ports = [], []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
            ports.append(sock.getsockname()[1])
    finally:
        for sock in sockets:
            sock.close()
    return ports


# ---------------------------------------------------------------------------------------------- stopping


def terminate_group(pgid: int, sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to process group ``pgid`` (nothing if it is gone)."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_process(process: ManagedProcess, grace: float = 10.0) -> None:
    """SIGTERM the process group and every recorded descendant, then SIGKILL what is left after ``grace``.

    A descendant still in the group gets the group's SIGTERM only: a second one would cut a graceful exit short
    (Flower's handlers restore the default action after the first signal, so a SuperNode under the warm worker
    died before deactivating at the SuperLink). Descendants that left the group (their own session) get theirs.
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        terminate_group(process.pid, sig)
        for pid, started in process.seen.items():
            stat = proc_stat(pid)
            if sig == signal.SIGTERM and stat is not None and stat[2] == process.pid:
                continue  # the group signal reached it
            if is_alive(pid, started):
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline:
            if (process.popen.poll() is not None and not any(is_alive(p, s) for p, s in process.seen.items())
                    and not group_members(process.pid)):
                break
            time.sleep(0.1)
        else:
            continue
        break
    try:
        process.popen.wait(1.0)
    except subprocess.TimeoutExpired:
        pass
