"""A rover's warm ClientApp worker: its Flower SuperNode and one long-lived ClientApp process for every message.

Flower 1.42's ``flower-supernode --isolation subprocess`` starts ``flower-superexec``, which starts a new
``flwr-clientapp`` process for every message (train, evaluate, the identity query): Python, torch and the app
are imported again each time. With ``--isolation process`` the SuperNode starts no executor and leaves its tasks
to a process outside it; this program is that process::

    python -m forest_perception.collab.deploy.warm_clientapp --runtime-api-address 127.0.0.1:Q \\
        --runtime-ca ca.crt --secret-file superexec.secret [--preload MODULE] [--poll-interval S] \\
        -- flower-supernode ... --isolation process --superexec-auth-secret-file superexec.secret ...

It writes a fresh random SuperExec secret to ``--secret-file`` (0600), starts the SuperNode argv after ``--`` as
its child (same process group, same log), imports the ``--preload`` modules (torch, the rover ClientApp), then
loops (:class:`~.warm_worker.WarmWorker`): ``AcquireTask`` signed with the secret over TLS, the ClientApp run in
this process, reply and context pushed. It exits when the SuperNode does (with its exit code, so a supervisor
restarts both), and on SIGTERM/SIGINT stops the SuperNode (which a signal to the group reached too: it gets
a few seconds to exit by itself first) and exits 0. Without ``--`` it serves a SuperNode
started elsewhere (reading the secret file). The argv comes from
:func:`forest_perception.collab.deploy.supernode.warm_command`; see ``docs/federated.md``, "The warm ClientApp
worker".
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from forest_perception.collab.deploy.supernode import argv_value

SECRET_BYTES = 32
DEFAULT_POLL_S = 0.25
"""How often an idle worker asks the Runtime API for a task (Flower's SuperExec: 1 s)."""
STOP_GRACE_S = 10.0
"""How long the SuperNode may take to stop after SIGTERM before it is killed."""
SIGNALLED_GRACE_S = 5.0
"""After a signal to the worker, how long the SuperNode may take to exit by itself before the worker sends it
SIGTERM: a supervisor signals the whole process group, and a second SIGTERM would cut Flower's graceful exit short
(its handler restores the default one), leaving the node active at the SuperLink until its heartbeat expires."""


@dataclass(frozen=True)
class WorkerOptions:
    """The worker's command line."""

    runtime_api_address: str
    runtime_ca: Path
    secret_file: Path
    poll_interval: float = DEFAULT_POLL_S
    preload: tuple[str, ...] = ()
    supernode: tuple[str, ...] = ()  # the SuperNode argv to start; empty: serve one started elsewhere


def parse_args(argv: list[str]) -> WorkerOptions:
    """Options from ``argv`` (without the program name); the SuperNode argv follows ``--``."""
    supernode: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, supernode = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(prog="python -m forest_perception.collab.deploy.warm_clientapp",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, host:port (TLS)")
    parser.add_argument("--runtime-ca", required=True, type=Path, help="CA certificate of the Runtime API")
    parser.add_argument("--secret-file", required=True, type=Path,
                        help="SuperExec secret: written fresh here when starting the SuperNode, else read")
    parser.add_argument("--poll-interval", type=float, default=DEFAULT_POLL_S, help="seconds between idle polls")
    parser.add_argument("--preload", action="append", default=[], help="module to import at start (repeatable)")
    args = parser.parse_args(argv)
    return WorkerOptions(args.runtime_api_address, args.runtime_ca, args.secret_file, args.poll_interval,
                         tuple(args.preload), tuple(supernode))


def launch_problem(options: WorkerOptions) -> str:
    """Why these options cannot run ("" if they can): a SuperNode argv that another executor would serve, or one
    whose Runtime API, CA or secret is not the worker's."""
    if not 0.01 <= options.poll_interval <= 60.0:
        return f"--poll-interval must be within 0.01-60 s, got {options.poll_interval}"
    if not options.runtime_ca.is_file():
        return f"--runtime-ca {options.runtime_ca} does not exist"
    host, _, port = options.runtime_api_address.rpartition(":")
    if not host or not port.isdigit():
        return f"--runtime-api-address {options.runtime_api_address!r} is not host:port"
    supernode = list(options.supernode)
    if not supernode:
        return "" if options.secret_file.is_file() else f"--secret-file {options.secret_file} does not exist"
    if "--insecure" in supernode:
        return "the SuperNode argv has --insecure; the warm worker talks TLS only"
    checks = {"--isolation": "process", "--port": port, "--ssl-ca-certfile": str(options.runtime_ca),
              "--superexec-auth-secret-file": str(options.secret_file),
              "--host": host.strip("[]") if argv_value(supernode, "--host") is not None else None}
    paths = ("--ssl-ca-certfile", "--superexec-auth-secret-file")
    for flag, want in checks.items():
        got = argv_value(supernode, flag)
        same = got is not None and Path(got) == Path(want) if flag in paths and want is not None else got == want
        if want is not None and not same:
            return f"the SuperNode argv has {flag} {got!r}, the worker expects {want!r}"
    return ""


def write_secret(path: Path) -> bytes:
    """A fresh random SuperExec secret in ``path`` (0600, replaced atomically); returns it."""
    secret = secrets.token_hex(SECRET_BYTES).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, secret)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    return secret


def exit_code(returncode: int) -> int:
    """A child's ``returncode`` as this process's exit code (killed by signal N: 128 + N, as a shell reports)."""
    return returncode if returncode >= 0 else 128 - returncode


class WorkerStopped(BaseException):  # noqa: N818 - a stop request, like KeyboardInterrupt, not an error
    """Raised from the signal handler to stop the worker, also in the middle of a task (which then fails)."""


class _Signals:
    """SIGTERM/SIGINT raise :class:`WorkerStopped` once; later ones are ignored while the worker winds down."""

    def __init__(self) -> None:
        self.received: int | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.received is not None:
            return
        self.received = signum
        raise WorkerStopped(f"signal {signum}")


def stop_child(child: subprocess.Popen | None, grace: float = STOP_GRACE_S, signalled: bool = False) -> None:
    """SIGTERM the SuperNode, SIGKILL it after ``grace``; ``signalled``: the worker got a stop signal, which
    reached the SuperNode too when it went to the process group, so it gets :data:`SIGNALLED_GRACE_S` first."""
    if child is None or child.poll() is not None:
        return
    if signalled:
        try:
            child.wait(SIGNALLED_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            pass
    child.terminate()
    try:
        child.wait(grace)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait(5.0)


def main(argv: list[str] | None = None) -> int:
    """Run the worker (and the SuperNode after ``--``); the exit code is the SuperNode's, or 0 when told to stop."""
    options = parse_args(list(sys.argv[1:] if argv is None else argv))
    problem = launch_problem(options)
    if problem:
        print(f"warm-clientapp: error: {problem}", file=sys.stderr)
        return 2
    child: subprocess.Popen | None = None
    worker = None
    signals = _Signals()
    try:
        # light imports so far: the SuperNode starts first, Flower, torch and the app load while it connects
        if options.supernode:
            secret = write_secret(options.secret_file)
            child = subprocess.Popen(list(options.supernode), stdin=subprocess.DEVNULL)
        else:
            secret = options.secret_file.read_bytes()
        from forest_perception.collab.deploy.warm_worker import WarmWorker, preload

        preload(options.preload)
        worker = WarmWorker.connect(options.runtime_api_address, options.runtime_ca.read_bytes(), secret,
                                    options.poll_interval)
        code = worker.serve(lambda: None if child is None or child.poll() is None else exit_code(child.returncode))
        print(f"warm-clientapp: the SuperNode exited with code {code}; stopping", file=sys.stderr, flush=True)
        return int(code or 0)
    except WorkerStopped:
        return 0
    finally:
        if worker is not None:
            worker.close()
        stop_child(child, signalled=signals.received is not None)


if __name__ == "__main__":
    sys.exit(main())
