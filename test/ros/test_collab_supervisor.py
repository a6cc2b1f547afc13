"""SuperNodeSupervisor with fake executables (ready, backoff restarts, group stop), the warm ClientApp worker with a
fake SuperNode under it (both restarted when either dies), and collab_node running one."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from forest_perception.collab.deploy.local import DeploySpec, LocalDeployment
from forest_perception.collab.deploy.supernode import (
    SECRET_FILE,
    SUPERNODE_READY,
    WARM_MODULE,
    RoverNode,
    argv_value,
    supernode_argv,
    supernode_tls_command,
    warm_command,
)
from forest_perception.collab.supervisor import (
    BACKOFF,
    FAILED,
    RUNNING,
    STARTING,
    STOPPED,
    Backoff,
    SuperNodeSupervisor,
)


def _fake(tmp_path: Path, name: str, body: str) -> Path:
    """An executable Python script standing in for flower-supernode."""
    path = tmp_path / name
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)
    return path


# prints its argv to argv.json beside itself, starts a child that ignores nothing, logs its node id, sleeps
_SUPERNODE_LIKE = """\
import json, os, subprocess, sys, time
from pathlib import Path
Path(__file__).with_name("argv.json").write_text(json.dumps(sys.argv[1:]))
Path(__file__).with_name("supernode.pid").write_text(str(os.getpid()))
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
Path(__file__).with_name("child.pid").write_text(str(child.pid))
print("INFO :      Starting Flower SuperNode", flush=True)
print("\\x1b[92mINFO \\x1b[0m:      SuperNode ID: 4242", flush=True)
time.sleep(600)
"""


class Clock:
    """A monotonic clock the test moves by hand (process exits still happen in real time)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


def _wait_exit(sup: SuperNodeSupervisor) -> None:
    """Wait until the supervised process has exited (without polling the supervisor)."""
    process = sup._process
    assert process is not None
    process.popen.wait(10.0)


def test_running_state_node_id_and_stop_ends_the_group_with_its_child(tmp_path, wait):
    exe = _fake(tmp_path, "fake-supernode", _SUPERNODE_LIKE)
    sup = SuperNodeSupervisor([str(exe), "--superlink", "127.0.0.1:1"], dict(os.environ), tmp_path / "log" / "sn.log",
                              ready_pattern=SUPERNODE_READY, stop_grace_s=5.0)
    assert sup.state == STOPPED
    try:
        assert sup.start() == STARTING
        pid = sup.pid
        assert pid is not None and os.getpgid(pid) == pid  # its own process group
        assert wait(lambda: sup.poll() == RUNNING), sup.status()
        status = sup.status()
        assert status["ready_match"] == "4242" and status["restarts"] == 0 and status["pid"] == pid
        assert status["last_line"] == "INFO :      SuperNode ID: 4242"  # colour codes removed
        assert json.loads((tmp_path / "argv.json").read_text()) == ["--superlink", "127.0.0.1:1"]
        child = int((tmp_path / "child.pid").read_text())
        assert os.getpgid(child) == pid and child in sup.pids()
        start = time.monotonic()
        sup.stop()
        assert time.monotonic() - start < 5.0  # SIGTERM was enough
        assert sup.state == STOPPED and sup.pid is None and _gone(pid) and _gone(child)
        assert sup.poll() == STOPPED  # a stopped supervisor starts nothing
        assert "SuperNode ID: 4242" in (tmp_path / "log" / "sn.log").read_text()
    finally:
        sup.stop()


def test_a_crashing_process_is_restarted_with_exponential_backoff_and_reset(tmp_path):
    exe = _fake(tmp_path, "crash", "import sys\nprint('boom: cannot reach the SuperLink', flush=True)\nsys.exit(3)\n")
    clock = Clock()
    sup = SuperNodeSupervisor([str(exe)], None, tmp_path / "crash.log", clock=clock,
                              backoff=Backoff(initial_s=1.0, max_s=4.0, reset_after_s=30.0))
    try:
        sup.start()
        delays = []
        for _ in range(4):
            _wait_exit(sup)
            clock.now += 0.1
            assert sup.poll() == BACKOFF
            assert sup.exit_code == 3 and "exited with code 3" in sup.reason and "boom" in sup.reason, sup.reason
            delay = sup.retry_in()
            delays.append(delay)
            clock.now += delay - 0.05
            assert sup.poll() == BACKOFF  # not yet
            clock.now += 0.05
            assert sup.poll() == STARTING
        assert delays == [1.0, 2.0, 4.0, 4.0]  # doubling, capped at max_s
        assert sup.restarts == 4 and sup.starts == 5
        assert sup.status()["last_line"] == "boom: cannot reach the SuperLink"
        # a run that lasted reset_after_s starts the backoff over
        _wait_exit(sup)
        clock.now += 31.0
        assert sup.poll() == BACKOFF and sup.retry_in() == 1.0
    finally:
        sup.stop()
    assert sup.state == STOPPED


def test_max_restarts_gives_up_as_failed(tmp_path):
    exe = _fake(tmp_path, "crash", "raise SystemExit(1)\n")
    clock = Clock()
    sup = SuperNodeSupervisor([str(exe)], None, tmp_path / "c.log", clock=clock, max_restarts=1)
    sup.start()
    _wait_exit(sup)
    assert sup.poll() == BACKOFF
    clock.now += 1.0
    assert sup.poll() == STARTING and sup.restarts == 1
    _wait_exit(sup)
    assert sup.poll() == BACKOFF
    clock.now += 2.0
    assert sup.poll() == FAILED and "gave up after 1 restarts" in sup.reason
    sup.stop()


def test_a_missing_or_not_executable_program_fails_with_the_reason(tmp_path):
    sup = SuperNodeSupervisor([str(tmp_path / "nope" / "flower-supernode")], None, tmp_path / "a.log")
    assert sup.start() == FAILED and sup.poll() == FAILED
    assert str(tmp_path / "nope" / "flower-supernode") in sup.reason and "not an executable" in sup.reason
    plain = tmp_path / "plain.py"
    plain.write_text("print(1)\n")
    assert SuperNodeSupervisor([str(plain)], None, tmp_path / "b.log").start() == FAILED
    env = {**os.environ, "PATH": str(tmp_path)}
    sup = SuperNodeSupervisor(["flower-supernode-not-installed"], env, tmp_path / "c.log")
    assert sup.start() == FAILED
    assert "'flower-supernode-not-installed': not found on PATH" in sup.reason and str(tmp_path) in sup.reason
    assert sup.status()["state"] == FAILED and sup.pid is None
    with pytest.raises(ValueError, match="argv"):
        SuperNodeSupervisor([], None, tmp_path / "d.log")


def test_supernode_argv_is_the_deployments_tls_and_auth_command_and_never_insecure(tmp_path):
    from flwr.common.config import parse_config_args

    from forest_perception.collab.deploy.certs import make_deployment_certs

    certs = make_deployment_certs(tmp_path / "certs", ["rover_000"])
    keys = certs.rover("rover_000")
    data, drop = tmp_path / "data dir", tmp_path / "drop's"
    data.mkdir()
    rover = RoverNode("rover_000", data, extra_config={"model-drop-dir": str(drop.resolve())})
    config_file = tmp_path / "run" / "nodes" / "rover_000.toml"
    for mode in ("warm", "subprocess"):
        deployment = LocalDeployment(DeploySpec(run_dir=tmp_path / "run", certs_dir=certs.root, rovers=[rover],
                                                superlink_port=9443, clientapp=mode))
        expected = deployment.supernode_command(rover, runtime_port=9555)
        supernode = expected[expected.index("--") + 1:] if mode == "warm" else expected
        argv = supernode_argv("127.0.0.1:9443", certs.ca_cert, keys.auth_key, data, "rover_000", drop,
                              executable=supernode[0], node_config_file=config_file, runtime_port=9555,
                              runtime_cert=keys.runtime_cert, runtime_key=keys.runtime_key, clientapp=mode,
                              secret_file=tmp_path / "run" / "homes" / "supernode-rover_000" / SECRET_FILE,
                              python=sys.executable)
        assert argv == expected
        assert not any("insecure" in arg for arg in argv)
        assert argv_value(argv, "--isolation") == ("process" if mode == "warm" else "subprocess")
        if mode == "warm":
            assert argv[:3] == [sys.executable, "-m", WARM_MODULE]
        else:
            assert argv[0].endswith("flower-supernode")
    for flag, value in (("--root-certificates", certs.ca_cert), ("--auth-supernode-private-key", keys.auth_key),
                        ("--ssl-certfile", keys.runtime_cert), ("--ssl-keyfile", keys.runtime_key)):
        assert argv[argv.index(flag) + 1] == str(value)
    assert parse_config_args([str(config_file)]) == {
        "data-dir": str(data.resolve()), "rover-id": "rover_000", "scope": "all", "model-drop-dir": str(drop.resolve())}

    # inline node config (no file): what Flower parses, extra keys included; a quote needs the file
    inline = supernode_argv("10.0.0.5:8000", "ca.crt", "auth.key", data, "rover_7", tmp_path / "in",
                            extra_node_config={"scope": "decoder", "max-frames": 50}, clientapp="subprocess")
    assert inline[0] == "flower-supernode" and not any("insecure" in arg for arg in inline)
    assert inline[inline.index("--superlink") + 1] == "10.0.0.5:8000"
    assert parse_config_args([inline[inline.index("--node-config") + 1]]) == {
        "data-dir": str(data.resolve()), "rover-id": "rover_7", "scope": "decoder",
        "model-drop-dir": str((tmp_path / "in").resolve()), "max-frames": 50}
    with pytest.raises(ValueError, match="quote"):
        supernode_argv("127.0.0.1:1", "ca.crt", "auth.key", data, "rover_7", drop, clientapp="subprocess")
    with pytest.raises(ValueError, match="superlink_address"):
        supernode_argv(" ", "ca.crt", "auth.key", data, "rover_7", tmp_path / "in")


def test_the_warm_worker_and_its_supernode_are_supervised_together(tmp_path, wait):
    """The supervisor runs the warm worker, which runs the SuperNode in its group: the SuperNode's death ends the
    worker (its exit code), a worker's death ends the SuperNode; both come back together; stop ends both."""
    from forest_perception.collab.deploy.certs import make_deployment_certs

    certs = make_deployment_certs(tmp_path / "certs", ["rover_0"])
    exe = _fake(tmp_path, "fake-supernode", _SUPERNODE_LIKE)
    supernode = supernode_tls_command(str(exe), "127.0.0.1:1", certs.ca_cert, "auth.key", "node.toml", 1,
                                      "runtime.crt", "runtime.key", secret_file=tmp_path / "sn" / SECRET_FILE)
    argv = warm_command(supernode, sys.executable, poll_interval=0.1, preload=())
    clock = Clock()
    sup = SuperNodeSupervisor(argv, dict(os.environ), tmp_path / "sn" / "sn.log", ready_pattern=SUPERNODE_READY,
                              stop_grace_s=5.0, clock=clock)
    try:
        assert sup.start() == STARTING
        assert wait(lambda: sup.poll() == RUNNING, timeout=30.0), sup.status()
        worker = sup.pid
        node = int((tmp_path / "supernode.pid").read_text())
        child = int((tmp_path / "child.pid").read_text())
        assert os.getpgid(node) == worker and os.getpgid(child) == worker and {node, child} <= set(sup.pids())
        assert json.loads((tmp_path / "argv.json").read_text()) == supernode[1:]
        assert (tmp_path / "sn" / SECRET_FILE).stat().st_mode & 0o077 == 0

        os.kill(node, signal.SIGKILL)  # the SuperNode dies: the worker follows with its code, the group is ended
        assert wait(lambda: sup.poll() == BACKOFF, timeout=30.0), sup.status()
        assert sup.exit_code == 137 and "exited with code 137" in sup.reason, sup.reason
        assert wait(lambda: _gone(worker) and _gone(child), timeout=10.0)
        clock.now += sup.retry_in()
        assert sup.poll() == STARTING and wait(lambda: sup.poll() == RUNNING, timeout=30.0), sup.status()
        assert sup.restarts == 1 and sup.pid != worker

        worker = sup.pid  # the worker dies: the supervisor ends the SuperNode it left, then starts both again
        node = int((tmp_path / "supernode.pid").read_text())
        os.kill(worker, signal.SIGKILL)
        assert wait(lambda: sup.poll() == BACKOFF, timeout=10.0) and "exited with code -9" in sup.reason
        assert wait(lambda: _gone(node), timeout=10.0)
        clock.now += sup.retry_in()
        assert sup.poll() == STARTING and wait(lambda: sup.poll() == RUNNING, timeout=30.0), sup.status()

        worker, node = sup.pid, int((tmp_path / "supernode.pid").read_text())
        sup.stop()
        assert _gone(worker) and _gone(node) and sup.state == STOPPED
    finally:
        sup.stop()


# ---------------------------------------------------------------------------------------------- in the node


def _rover_certs(root: Path) -> dict[str, str]:
    """Certificates where collab_node looks for them (the fake SuperNode ignores them; the warm worker reads the CA)."""
    from forest_perception.collab.deploy.certs import make_deployment_certs

    make_deployment_certs(root, ["rover_0"])
    return {"root_certificates": str(root / "ca.crt"), "auth_private_key": str(root / "rovers/rover_0/auth.key")}


def test_collab_node_runs_the_supernode_reports_it_and_stops_it(rclpy_context, tmp_path, wait):
    import rclpy
    from diagnostic_msgs.msg import DiagnosticStatus
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from std_msgs.msg import String

    from forest_perception.nodes.collab_node import CollabNode

    exe = _fake(tmp_path, "fake-supernode", _SUPERNODE_LIKE)
    base = dict(dataset_dir=str(tmp_path / "forest"), models_dir=str(tmp_path / "deployed"),
                model_source=str(tmp_path / "incoming"), poll_period_s=0.2, status_period_s=0.2,
                diagnostics_period_s=0.2, service_timeout_s=0.2, supernode=True,
                superlink_address="127.0.0.1:9443", supernode_executable=str(exe))
    certs = _rover_certs(tmp_path / "certs")
    node = CollabNode(context=rclpy_context, namespace="rover_0", parameter_overrides=[
        Parameter(k, value=v) for k, v in {**base, **certs, "service_timeout_s": 3.0}.items()])
    # a second rover whose CA file is missing: no SuperNode, the reason names the file, the node runs on
    missing = {**certs, "root_certificates": str(tmp_path / "certs" / "missing-ca.crt")}
    broken = CollabNode(context=rclpy_context, namespace="rover_1", parameter_overrides=[
        Parameter(k, value=v) for k, v in {**base, **missing, "rover_id": "rover_1",
                                            "models_dir": str(tmp_path / "deployed1")}.items()])
    probe = rclpy.create_node("probe", context=rclpy_context)
    # stands in for rover_0's depth node: only its parameter services are used here
    depth = rclpy.create_node("depth_node", namespace="rover_0", context=rclpy_context,
                              parameter_overrides=[Parameter("model_path", value="")],
                              automatically_declare_parameters_from_overrides=True)
    statuses: dict[str, list[dict]] = {"rover_0": [], "rover_1": []}
    latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    for ns in statuses:
        probe.create_subscription(String, f"/{ns}/collab/status",
                                  lambda m, ns=ns: statuses[ns].append(json.loads(m.data)), latched)
    live = [node, broken, probe, depth]
    executor = SingleThreadedExecutor(context=rclpy_context)
    for n in live:
        executor.add_node(n)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        assert wait(lambda: statuses["rover_0"] and statuses["rover_0"][-1]["supernode"]["state"] == RUNNING,
                     timeout=15.0), statuses["rover_0"][-1:] or node.supernode.status()
        supernode = statuses["rover_0"][-1]["supernode"]
        assert supernode["node_id"] == "4242" and supernode["restarts"] == 0 and supernode["enabled"]
        assert "SuperNode ID: 4242" in supernode["last_line"]
        pid = supernode["pid"]
        child = int((tmp_path / "child.pid").read_text())
        argv = json.loads((tmp_path / "argv.json").read_text())
        assert "--insecure" not in argv and argv[argv.index("--superlink") + 1] == "127.0.0.1:9443"
        assert argv[argv.index("--root-certificates") + 1] == certs["root_certificates"]
        assert argv[argv.index("--auth-supernode-private-key") + 1] == certs["auth_private_key"]
        assert argv[argv.index("--ssl-certfile") + 1].endswith("rovers/rover_0/runtime.crt")
        config = Path(argv[argv.index("--node-config") + 1]).read_text()
        assert f'data-dir = "{tmp_path / "forest"}"' in config and 'rover-id = "rover_0"' in config
        assert f'model-drop-dir = "{tmp_path / "incoming"}"' in config
        level, _, values = node.diagnostics_values()
        assert values["supernode_state"] == RUNNING and values["supernode_node_id"] == "4242"

        # the SuperNode dies: WARN while backing off (its orphaned child is ended), then it runs again
        agent = node.agent
        assert wait(lambda: node.diagnostics_values()[0] == DiagnosticStatus.OK or not agent.fault), agent.fault
        os.kill(pid, signal.SIGKILL)
        assert wait(lambda: node.supernode.status()["state"] == BACKOFF, timeout=5.0)
        level, message, _ = node.diagnostics_values()
        assert level == DiagnosticStatus.WARN and "exited with code -9" in message, message
        assert wait(lambda: _gone(child), timeout=5.0)
        assert wait(lambda: statuses["rover_0"][-1]["supernode"]["state"] == RUNNING
                     and statuses["rover_0"][-1]["supernode"]["restarts"] == 1, timeout=10.0), node.supernode.status()
        pid = statuses["rover_0"][-1]["supernode"]["pid"]
        child = int((tmp_path / "child.pid").read_text())

        assert wait(lambda: statuses["rover_1"] and statuses["rover_1"][-1]["supernode"]["state"] == FAILED)
        reason = statuses["rover_1"][-1]["supernode"]["reason"]
        assert "root_certificates" in reason and "missing-ca.crt" in reason and "does not exist" in reason
        level, message, _ = broken.diagnostics_values()
        assert level == DiagnosticStatus.ERROR and "SuperNode: " in message and "missing-ca.crt" in message
        assert broken.supernode.supervisor is None and broken.request_training("test")[1]  # the node itself works

        executor.remove_node(node)
        live.remove(node)
        node.destroy_node()
        assert _gone(pid) and _gone(child)
        assert node.supernode.status()["state"] == STOPPED
    finally:
        executor.shutdown(timeout_sec=1.0)
        spinner.join(timeout=5.0)
        for n in live:
            n.destroy_node()
