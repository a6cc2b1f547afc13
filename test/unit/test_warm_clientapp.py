"""The warm ClientApp worker: its command line (consistent with the SuperNode's), its secret, its loop against a
fake Runtime API (tasks, app cache, error replies, stops, an absent SuperNode) and the program with a stand-in
SuperNode (exit codes, SIGTERM); the real SuperNode: test/e2e/test_flower_deploy.py."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.client_app import LoadClientAppError
from flwr.common.constant import ErrorCode, SubStatus

from forest_perception.collab.deploy.supernode import (
    SECRET_FILE,
    WARM_MODULE,
    argv_value,
    supernode_argv,
    supernode_tls_command,
    warm_command,
)
from forest_perception.collab.deploy.warm_clientapp import (
    WorkerOptions,
    exit_code,
    launch_problem,
    parse_args,
    write_secret,
)
from forest_perception.collab.deploy.warm_worker import AppCache, WarmWorker

REPO = Path(__file__).resolve().parents[2]


def _supernode(tmp_path: Path, secret: Path | None) -> list[str]:
    ca = tmp_path / "ca.crt"
    ca.write_text("ca\n")
    return supernode_tls_command("flower-supernode", "127.0.0.1:9092", ca, "auth.key", "node.toml", 9555,
                                 "runtime.crt", "runtime.key", secret_file=secret)


# ---------------------------------------------------------------------------------------------- command line


def test_warm_command_wraps_a_process_isolated_supernode_with_the_same_runtime_api_ca_and_secret(tmp_path):
    secret = tmp_path / "home" / SECRET_FILE
    supernode = _supernode(tmp_path, secret)
    assert argv_value(supernode, "--isolation") == "process"
    assert argv_value(supernode, "--superexec-auth-secret-file") == str(secret)
    assert argv_value(_supernode(tmp_path, None), "--isolation") == "subprocess"
    assert "--superexec-auth-secret-file" not in _supernode(tmp_path, None)

    argv = warm_command(supernode, "/venv/bin/python", poll_interval=0.5)
    assert argv[:3] == ["/venv/bin/python", "-m", WARM_MODULE]
    assert argv[argv.index("--") + 1:] == supernode  # the SuperNode's own argv, untouched
    assert not any("insecure" in arg for arg in argv)
    options = parse_args(argv[3:])
    assert options == WorkerOptions("127.0.0.1:9555", tmp_path / "ca.crt", secret, 0.5,
                                    ("forest_perception.collab.flower.client_app",), tuple(supernode))
    assert launch_problem(options) == ""
    # the worker's flags have their own names: a lookup of a SuperNode flag finds the SuperNode's value
    assert argv_value(argv, "--port") == "9555" and argv_value(argv, "--root-certificates") == str(tmp_path / "ca.crt")

    with pytest.raises(ValueError, match="--isolation process"):
        warm_command(_supernode(tmp_path, None))
    no_port = [a for a in supernode if a not in ("--port", "9555")]
    with pytest.raises(ValueError, match="lacks --port"):
        warm_command(no_port)


@pytest.mark.parametrize(("flag", "value", "problem"), [
    ("--isolation", "subprocess", "--isolation 'subprocess'"),
    ("--port", "9556", "--port '9556'"),
    ("--ssl-ca-certfile", "other.crt", "--ssl-ca-certfile 'other.crt'"),
    ("--superexec-auth-secret-file", "other.secret", "--superexec-auth-secret-file 'other.secret'"),
    ("--host", "127.0.0.2", "--host '127.0.0.2'"),
])
def test_launch_refuses_a_supernode_the_worker_would_not_serve(tmp_path, flag, value, problem):
    argv = warm_command(_supernode(tmp_path, tmp_path / SECRET_FILE))
    cut = argv.index("--")
    supernode = argv[cut + 1:]
    supernode[supernode.index(flag) + 1] = value
    assert problem in launch_problem(parse_args(argv[3:cut + 1] + supernode))


def test_launch_refuses_insecure_bad_addresses_missing_files_and_odd_polls(tmp_path):
    argv = warm_command(_supernode(tmp_path, tmp_path / SECRET_FILE))
    assert "--insecure" in launch_problem(parse_args(argv[3:] + ["--insecure"]))
    options = parse_args(argv[3:])
    assert "does not exist" in launch_problem(WorkerOptions(options.runtime_api_address, tmp_path / "no.crt",
                                                            options.secret_file, supernode=options.supernode))
    assert "not host:port" in launch_problem(WorkerOptions("127.0.0.1", options.runtime_ca, options.secret_file))
    assert "--poll-interval" in launch_problem(WorkerOptions(options.runtime_api_address, options.runtime_ca,
                                                             options.secret_file, poll_interval=0.0))
    # serving a SuperNode started elsewhere: its secret file must be there already
    alone = WorkerOptions(options.runtime_api_address, options.runtime_ca, tmp_path / "elsewhere.secret")
    assert "elsewhere.secret does not exist" in launch_problem(alone)
    write_secret(alone.secret_file)
    assert launch_problem(alone) == ""


def test_rover_supernode_argv_defaults_to_the_warm_worker_and_keeps_flowers_mode_on_request(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    common = dict(node_config_file=tmp_path / "sn" / "node_config.toml", runtime_port=9555,
                  runtime_cert="runtime.crt", runtime_key="runtime.key")
    warm = supernode_argv("127.0.0.1:9092", tmp_path / "ca.crt", "auth.key", data, "rover_7", tmp_path / "drop",
                          executable="/bin/flower-supernode", python="/venv/bin/python", **common)
    assert warm[:3] == ["/venv/bin/python", "-m", WARM_MODULE]
    supernode = warm[warm.index("--") + 1:]
    assert supernode[0] == "/bin/flower-supernode" and argv_value(supernode, "--isolation") == "process"
    assert argv_value(supernode, "--superexec-auth-secret-file") == str(tmp_path / "sn" / SECRET_FILE)
    assert argv_value(warm, "--secret-file") == str(tmp_path / "sn" / SECRET_FILE)
    flower = supernode_argv("127.0.0.1:9092", tmp_path / "ca.crt", "auth.key", data, "rover_7", tmp_path / "drop",
                            executable="/bin/flower-supernode", clientapp="subprocess", **common)
    assert flower[0] == "/bin/flower-supernode" and argv_value(flower, "--isolation") == "subprocess"
    assert flower == supernode_tls_command("/bin/flower-supernode", "127.0.0.1:9092", tmp_path / "ca.crt",
                                           "auth.key", common["node_config_file"], 9555, "runtime.crt", "runtime.key")
    with pytest.raises(ValueError, match="needs the TLS Runtime API"):
        supernode_argv("127.0.0.1:9092", "ca.crt", "auth.key", data, "rover_7", tmp_path / "drop")
    with pytest.raises(ValueError, match="clientapp must be one of"):
        supernode_argv("127.0.0.1:9092", "ca.crt", "auth.key", data, "rover_7", tmp_path / "drop",
                       clientapp="process", **common)


def test_secret_is_fresh_private_and_replaced(tmp_path):
    path = tmp_path / "home" / SECRET_FILE
    first = write_secret(path)
    assert path.read_bytes() == first and len(first) == 64 and stat.S_IMODE(path.stat().st_mode) == 0o600
    second = write_secret(path)
    assert second != first and path.read_bytes() == second
    assert sorted(p.name for p in path.parent.iterdir()) == [SECRET_FILE]  # no temporary left


def test_exit_codes_follow_the_supernode():
    assert exit_code(0) == 0 and exit_code(1) == 1 and exit_code(-signal.SIGKILL) == 137


# ---------------------------------------------------------------------------------------------- the loop


@dataclass
class FakeRun:
    fab_id: str = "forest-perception/forest-perception-fl"
    fab_version: str = "0.1.0"


@dataclass
class FakeFab:
    hash_str: str
    content: bytes = b"fab"


@dataclass
class FakeTask:
    task_id: int
    message_type: str = "train"
    fab_hash: str = "a" * 64


class FakeRuntime:
    """Stands in for a SuperNode's Runtime API: tasks to hand out, what the worker pushed back."""

    def __init__(self, tasks: list[FakeTask | Exception | None]) -> None:
        self.tasks = list(tasks)
        self.pushed: list[tuple[int, Message]] = []
        self.finished: list[tuple[int, str, str, bool, Context | None]] = []
        self.closed: list[int] = []
        self.heartbeats = 0
        self.handed: list[FakeTask] = []
        self.installs: list[bytes] = []

    def acquire(self) -> tuple[FakeTask, str] | None:
        item = self.tasks.pop(0) if self.tasks else None
        if isinstance(item, Exception):
            raise item
        return None if item is None else (item, f"token-{item.task_id}")

    # TaskIO
    def task_client(self, token: str) -> int:
        return int(token.split("-")[1])

    def pull(self, client: int) -> tuple[Message, Context, FakeRun, FakeFab]:
        from flwr.supercore.task_identity import TaskIdentity

        task = next(t for t in self.handed if t.task_id == client)
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = client, 7, 42
        message = Message(RecordDict({"config": ConfigRecord({"n": client})}), dst_node_id=42,
                          message_type=task.message_type)
        message.metadata.__dict__["_message_id"] = message.object_id
        context = Context(run_id=7, node_id=42, node_config={"rover-id": "rover_7"}, state=RecordDict(),
                          run_config={})
        return message, context, FakeRun(), FakeFab(task.fab_hash)

    def push_reply(self, client: int, reply: Message, context: Context) -> None:
        self.pushed.append((client, reply))

    def finish(self, client: int, context: Context | None, sub_status: str, details: str, stopping: bool) -> None:
        self.finished.append((client, sub_status, details, stopping, context))

    def heartbeat(self, client: int) -> bool:
        self.heartbeats += 1
        return True

    def close(self, client: int) -> None:
        self.closed.append(client)

    def worker(self, app_loader, poll: float = 0.25) -> tuple[WarmWorker, list[float]]:  # noqa: ANN001
        """A worker on this runtime with ``app_loader`` as Flower's ClientApp loader; and the sleeps it takes."""
        sleeps: list[float] = []

        def acquire() -> tuple[FakeTask, str] | None:
            got = self.acquire()
            if got is not None:
                self.handed.append(got[0])
            return got

        cache = AppCache(install=self.installs.append, load=app_loader)
        return WarmWorker(acquire, self, cache, poll_interval=poll, sleep=sleeps.append), sleeps


def _echo_app(loads: list[str]):  # noqa: ANN202 - a ClientApp loader that counts its loads
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        context.state["calls"] = ConfigRecord({"n": int(message.content["config"]["n"])})
        return Message(RecordDict({"config": ConfigRecord({"echo": int(message.content["config"]["n"])})}),
                       reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        raise ValueError(f"no held-out frames for task {message.content['config']['n']}")

    def load(fab_id: str, fab_version: str, fab_hash: str) -> ClientApp:
        loads.append(fab_hash)
        return app

    return load


def test_worker_runs_tasks_in_this_process_and_loads_each_fab_once():
    runtime = FakeRuntime([None, FakeTask(1), FakeTask(2), None, FakeTask(3, fab_hash="b" * 64), FakeTask(4)])
    loads: list[str] = []
    worker, sleeps = runtime.worker(_echo_app(loads))
    assert worker.serve(max_tasks=4) is None
    assert [r.sub_status for r in worker.results] == [SubStatus.COMPLETED] * 4
    assert loads == ["a" * 64, "b" * 64] and runtime.installs == [b"fab", b"fab"]  # once per FAB hash
    assert [(client, reply.content["config"]["echo"]) for client, reply in runtime.pushed] == \
        [(1, 1), (2, 2), (3, 3), (4, 4)]
    assert all(reply.metadata.reply_to_message_id for _, reply in runtime.pushed)
    # the context the app changed goes back with the task's end; every task client is closed
    assert [(c, s, stopping) for c, s, _, stopping, _ in runtime.finished] == \
        [(i, SubStatus.COMPLETED, False) for i in (1, 2, 3, 4)]
    assert runtime.finished[1][4].state["calls"]["n"] == 2
    assert runtime.closed == [1, 2, 3, 4] and runtime.heartbeats >= 4
    assert sleeps == [0.25, 0.25]  # idle polls only: the next task is asked for at once after one ends
    assert all(set(r.phases) == {"pull", "app", "push", "finish"} for r in worker.results)


def test_a_failing_app_or_app_load_fails_only_its_task_with_flowers_error_reply():
    runtime = FakeRuntime([FakeTask(1, "evaluate"), FakeTask(2), FakeTask(3, fab_hash="c" * 64)])
    loads: list[str] = []
    good = _echo_app(loads)

    def loader(fab_id: str, fab_version: str, fab_hash: str):  # noqa: ANN202
        if fab_hash == "c" * 64:
            raise LoadClientAppError("no module named rover_app")
        return good(fab_id, fab_version, fab_hash)

    worker, _ = runtime.worker(loader)
    worker.serve(max_tasks=3)
    failed, ok, unloadable = worker.results
    assert failed.sub_status == SubStatus.FAILED and "no held-out frames for task 1" in failed.details
    assert runtime.pushed[0][1].has_error() and runtime.pushed[0][1].error.code == \
        ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert ok.sub_status == SubStatus.COMPLETED and runtime.pushed[1][1].content["config"]["echo"] == 2
    assert unloadable.sub_status == SubStatus.FAILED and "load `ClientApp`" in unloadable.details
    assert runtime.pushed[2][1].error.code == ErrorCode.LOAD_CLIENT_APP_EXCEPTION
    assert "c" * 64 not in worker.apps.apps  # a FAB that did not load is tried again next time


def test_a_stop_during_a_task_reports_it_failed_at_once_and_propagates():
    class Stop(BaseException):
        pass

    runtime = FakeRuntime([FakeTask(1)])

    def loader(fab_id: str, fab_version: str, fab_hash: str):  # noqa: ANN202
        raise Stop

    worker, _ = runtime.worker(loader)
    with pytest.raises(Stop):
        worker.serve()
    assert runtime.pushed == []  # no reply: the task is reported failed, without waiting for retries
    [(client, sub_status, details, stopping, _)] = runtime.finished
    assert (client, sub_status, stopping) == (1, SubStatus.FAILED, True) and "stopped" in details
    assert runtime.closed == [1]


def test_worker_waits_for_a_runtime_api_that_does_not_answer_and_ends_with_the_supernode():
    refused = httpx.ConnectError("connection refused")
    runtime = FakeRuntime([refused, refused, refused, refused, refused, FakeTask(1), None, None])
    worker, sleeps = runtime.worker(_echo_app([]), poll=0.25)
    calls = iter([None] * 8 + [3])
    assert worker.serve(exited=lambda: next(calls)) == 3  # the SuperNode's exit code
    assert sleeps == [0.5, 1.0, 2.0, 2.0, 2.0, 0.25, 0.25]  # backoff up to 2 s, then polls again
    assert [r.sub_status for r in worker.results] == [SubStatus.COMPLETED]


# ---------------------------------------------------------------------------------------------- the program


_FAKE_SUPERNODE = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    here = Path(sys.argv[0]).parent
    secret = sys.argv[sys.argv.index("--superexec-auth-secret-file") + 1]
    (here / "seen").write_text(f"{os.getpid()} {os.getpgrp()} {Path(secret).read_text()}")
    print("INFO :      SuperNode ID: 4242", flush=True)

    def mark(what):
        with open(here / "sigterms", "a") as out:
            out.write(what)

    def graceful(signum, frame):  # like Flower's: a slow graceful exit, which a second SIGTERM cuts short
        mark("x")
        signal.signal(signal.SIGTERM, lambda *a: (mark("y"), os._exit(1)))
        time.sleep(1.0)
        sys.exit(0)

    signal.signal(signal.SIGTERM, graceful)
    if "--exit-with" in sys.argv:
        time.sleep(1.0)
        sys.exit(int(sys.argv[sys.argv.index("--exit-with") + 1]))
    time.sleep(600)
""")


def _program(tmp_path: Path, extra: list[str]) -> tuple[subprocess.Popen, Path]:
    fake = tmp_path / "fake-supernode"
    fake.write_text(f"#!{sys.executable}\n{_FAKE_SUPERNODE}")
    fake.chmod(0o755)
    from forest_perception.collab.deploy.certs import make_deployment_certs

    certs = make_deployment_certs(tmp_path / "certs", ["rover_0"])
    argv = supernode_tls_command(str(fake), "127.0.0.1:1", certs.ca_cert, "auth.key", "node.toml", 1,
                                 "runtime.crt", "runtime.key", secret_file=tmp_path / SECRET_FILE) + extra
    command = warm_command(argv, sys.executable, poll_interval=0.05, preload=())
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        popen = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)
    return popen, log


def _wait_for(path: Path, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text():
            return path.read_text()
        time.sleep(0.05)
    raise AssertionError(f"{path} did not appear")


def test_program_starts_the_supernode_in_its_group_with_a_fresh_secret_and_exits_with_its_code(tmp_path):
    popen, log = _program(tmp_path, ["--exit-with", "3"])
    try:
        pid, group, secret = _wait_for(tmp_path / "seen").split()
        assert int(group) == popen.pid and int(pid) != popen.pid  # the SuperNode is a child in the worker's group
        assert secret == (tmp_path / SECRET_FILE).read_text() and len(secret) == 64
        assert stat.S_IMODE((tmp_path / SECRET_FILE).stat().st_mode) == 0o600
        assert popen.wait(60) == 3
        assert "the SuperNode exited with code 3" in log.read_text()
    finally:
        if popen.poll() is None:
            os.killpg(popen.pid, signal.SIGKILL)


@pytest.mark.parametrize("to_group", [True, False])
def test_program_stops_the_supernode_on_sigterm_with_one_signal_and_exits_0(tmp_path, to_group):
    """A supervisor signals the group: the SuperNode exits by itself, gracefully (a second SIGTERM from the worker
    would kill it mid-way); a signal to the worker alone: the worker sends the SuperNode its one SIGTERM."""
    popen, log = _program(tmp_path, [])
    try:
        supernode = int(_wait_for(tmp_path / "seen").split()[0])
        time.sleep(0.5)
        if to_group:
            os.killpg(popen.pid, signal.SIGTERM)
        else:
            popen.send_signal(signal.SIGTERM)
        assert popen.wait(30) == 0, log.read_text()
        assert not Path(f"/proc/{supernode}").exists()  # reaped by the worker before it exited
        assert (tmp_path / "sigterms").read_text() == "x"
    finally:
        if popen.poll() is None:
            os.killpg(popen.pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------- collab_node


def _node_params(tmp_path: Path, **overrides: object) -> dict:
    from forest_perception.collab.deploy.certs import make_deployment_certs

    certs = make_deployment_certs(tmp_path / "certs", ["rover_7"])
    (tmp_path / "forest").mkdir(exist_ok=True)
    return {"superlink_address": "127.0.0.1:9092", "root_certificates": str(certs.ca_cert),
            "auth_private_key": str(certs.rover("rover_7").auth_key), "dataset_dir": str(tmp_path / "forest"),
            "model_source": str(tmp_path / "incoming"), "models_dir": str(tmp_path / "deployed"),
            "supernode_log": "", "supernode_executable": "flower-supernode", "holdout_fraction": 0.2,
            "holdout_seed": 0, "rover_id": "", **overrides}


def test_collab_nodes_supernode_runs_under_the_warm_worker_unless_told_otherwise(tmp_path):
    from forest_perception.collab.rover import settings

    p = _node_params(tmp_path)  # a node configured before supernode_clientapp existed: warm
    argv, env = settings.supernode_launch(p, "rover_7")
    supernode = argv[argv.index("--") + 1:]
    assert argv[:3] == [sys.executable, "-m", WARM_MODULE] and settings.supernode_problem(p, "rover_7") == ""
    assert supernode[0] == str(Path(sys.executable).parent / "flower-supernode")  # found on the node's PATH
    log_dir = tmp_path / "deployed" / "supernode"
    assert argv_value(argv, "--secret-file") == str(log_dir / SECRET_FILE) == \
        argv_value(supernode, "--superexec-auth-secret-file")
    assert env["FLWR_HOME"] == str(log_dir / "flwr_home") and launch_problem(parse_args(argv[3:])) == ""

    flower, _ = settings.supernode_launch({**p, "supernode_clientapp": "subprocess"}, "rover_7")
    assert flower[0] == "flower-supernode" and argv_value(flower, "--isolation") == "subprocess"
    with pytest.raises(ValueError, match="'no-such-supernode': not found on PATH"):
        settings.supernode_launch({**p, "supernode_executable": "no-such-supernode"}, "rover_7")
    assert "supernode_clientapp must be one of" in settings.supernode_problem({**p, "supernode_clientapp": "hot"},
                                                                              "rover_7")


def test_launch_compares_paths_as_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ca.crt").write_text("ca\n")
    supernode = supernode_tls_command("flower-supernode", "127.0.0.1:9092", "./ca.crt", "auth.key", "node.toml",
                                      9555, "runtime.crt", "runtime.key", secret_file="./sn//superexec.secret")
    assert launch_problem(parse_args(warm_command(supernode)[3:])) == ""
