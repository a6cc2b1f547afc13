"""Deployment: certificates and keys, the commands and environment built, process control, and (slow) a real
SuperLink with two authenticated SuperNodes over TLS on 127.0.0.1, an unregistered SuperNode refused."""

from __future__ import annotations

import json
import os
import socket
import ssl
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from forest_perception.collab.algorithms import fedavg
from forest_perception.collab.deploy.certs import (
    certificate_hosts,
    check_auth_pair,
    check_deployment_certs,
    check_key_matches,
    check_signed_by,
    load_deployment_certs,
    make_deployment_certs,
    public_key_fingerprint,
)
from forest_perception.collab.deploy.local import DeploySpec, LocalDeployment
from forest_perception.collab.deploy.processes import (
    ManagedProcess,
    group_members,
    listening_sockets,
    process_tree,
    stop_process,
)
from forest_perception.collab.deploy.supernode import SECRET_FILE, WARM_MODULE, RoverNode, write_toml_table
from forest_perception.collab.flower.cli import main as forest_fl
from forest_perception.collab.flower.store import CoordinatorStore

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_deployment_certs(tmp_path_factory.mktemp("certs"), ["rover_000", "rover_001", "rover_002", "intruder"])


def _rover_dirs(root: Path, count: int = 2) -> list[Path]:
    dirs = [root / f"rover_{i:03d}" for i in range(count)]
    for folder in dirs:
        folder.mkdir(parents=True, exist_ok=True)
    return dirs


# ---------------------------------------------------------------------------------------------- certificates


def test_certificates_chain_to_the_ca_name_loopback_and_match_their_keys(certs):
    check_deployment_certs(certs)
    check_signed_by(certs.server_cert, certs.ca_cert)
    check_key_matches(certs.server_cert, certs.server_key)
    assert certificate_hosts(certs.server_cert) == {"127.0.0.1", "localhost"}
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    assert server.issuer == ca.subject and server.subject != ca.subject
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for keys in certs.rovers.values():
        check_auth_pair(keys.auth_key, keys.auth_pub)
        check_signed_by(keys.runtime_cert, certs.ca_cert)
        assert certificate_hosts(keys.runtime_cert) == {"127.0.0.1", "localhost"}
    private_keys = [certs.ca_key, certs.server_key] + [k.auth_key for k in certs.rovers.values()]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in private_keys)
    # the rovers' keys differ, and the manifest records their fingerprints
    fingerprints = {keys.fingerprint for keys in certs.rovers.values()}
    assert len(fingerprints) == len(certs.rovers) == 4 and all(f.startswith("SHA256:") for f in fingerprints)
    assert load_deployment_certs(certs.root).rovers.keys() == certs.rovers.keys()


def test_keys_are_in_the_formats_flower_loads(certs):
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import bytes_to_public_key

    keys = certs.rover("rover_000")
    registered = bytes_to_public_key(try_load_public_key(keys.auth_pub))  # what `flwr supernode register` sends
    # what flower-supernode --auth-supernode-private-key loads
    private = serialization.load_ssh_private_key(keys.auth_key.read_bytes(), None)
    assert private.public_key().public_numbers() == registered.public_numbers()
    assert registered.curve.name == "secp384r1"
    assert keys.auth_pub.read_text().startswith("ecdsa-sha2-nistp384 ") and "rover_000" in keys.auth_pub.read_text()


def _handshake(cert: Path, key: Path, cafile: Path, server_hostname: str) -> str:
    """A TLS handshake over 127.0.0.1 between a server with ``cert`` and a client trusting ``cafile``."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client_ctx = ssl.create_default_context(cafile=str(cafile))
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
                version = tls.version()
                tls.sendall(b"x")
                return version
    finally:
        thread.join(5)
        listener.close()


def test_tls_handshake_succeeds_with_the_ca_and_fails_for_others(certs, tmp_path):
    assert _handshake(certs.server_cert, certs.server_key, certs.ca_cert, "127.0.0.1").startswith("TLS")
    assert _handshake(certs.server_cert, certs.server_key, certs.ca_cert, "localhost").startswith("TLS")
    with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch|doesn't match"):
        _handshake(certs.server_cert, certs.server_key, certs.ca_cert, "10.1.2.3")
    other = make_deployment_certs(tmp_path / "other", [])
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        _handshake(certs.server_cert, certs.server_key, other.ca_cert, "127.0.0.1")


def test_certificate_problems_are_named(certs, tmp_path):
    other = make_deployment_certs(tmp_path / "other", ["rover_000"])
    with pytest.raises(ValueError, match=r"superlink.crt is not signed by the CA .*other/ca.crt"):
        check_signed_by(certs.server_cert, other.ca_cert)
    with pytest.raises(ValueError, match="does not belong to certificate"):
        check_key_matches(certs.server_cert, other.server_key)
    with pytest.raises(ValueError, match="does not match public key"):
        check_auth_pair(certs.rover("rover_000").auth_key, other.rover("rover_000").auth_pub)
    with pytest.raises(ValueError, match=r"is for \['127.0.0.1', 'localhost'\], not \['10.0.0.5'\]"):
        check_deployment_certs(certs, hosts=["10.0.0.5"])
    with pytest.raises(ValueError, match="no keys for rover 'rover_009'"):
        certs.rover("rover_009")
    with pytest.raises(ValueError, match="rover id '../x' must be"):
        make_deployment_certs(tmp_path / "bad", ["../x"])
    (other.root / "superlink.key").unlink()
    with pytest.raises(FileNotFoundError, match="lacks .*superlink.key"):
        load_deployment_certs(other.root)
    with pytest.raises(FileNotFoundError, match="manifest.json does not exist"):
        load_deployment_certs(tmp_path / "nothing")
    (tmp_path / "junk.pub").write_text("not a key\n")
    with pytest.raises(ValueError, match="junk.pub is not an OpenSSH public key"):
        public_key_fingerprint(tmp_path / "junk.pub")


def test_adding_a_rover_keeps_the_ca_and_the_other_keys(tmp_path):
    first = make_deployment_certs(tmp_path, ["rover_000"])
    ca, fingerprint = first.ca_cert.read_bytes(), first.rover("rover_000").fingerprint
    second = make_deployment_certs(tmp_path, ["rover_001"])
    assert second.ca_cert.read_bytes() == ca and sorted(second.rovers) == ["rover_000", "rover_001"]
    assert second.rover("rover_000").fingerprint == fingerprint
    check_deployment_certs(second)
    moved = make_deployment_certs(tmp_path, [], hosts=("127.0.0.1", "10.0.0.5"))  # new address: new server cert
    assert certificate_hosts(moved.server_cert) == {"127.0.0.1", "10.0.0.5"} and moved.ca_cert.read_bytes() == ca
    fresh = make_deployment_certs(tmp_path, ["rover_000"], overwrite=True)
    assert fresh.ca_cert.read_bytes() != ca and fresh.rover("rover_000").fingerprint != fingerprint
    assert sorted(fresh.rovers) == ["rover_000"]


def test_cli_and_script_make_certificates(tmp_path, capsys):
    assert forest_fl(["certs", "--out", str(tmp_path / "a"), "--rovers", "2", "--rover", "scout"]) == 0
    assert "rover_001: rovers/rover_001/auth.pub SHA256:" in capsys.readouterr().out
    assert sorted(load_deployment_certs(tmp_path / "a").rovers) == ["rover_000", "rover_001", "scout"]
    env = {**os.environ, "PYTHON": sys.executable}
    run = subprocess.run(["bash", str(REPO / "scripts" / "make_certs.sh"), "b", "--rovers", "1", "--host", "127.0.0.1"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    certs = load_deployment_certs(tmp_path / "b")  # relative to the caller's folder
    check_deployment_certs(certs)
    assert certificate_hosts(certs.server_cert) == {"127.0.0.1"} and list(certs.rovers) == ["rover_000"]


# ---------------------------------------------------------------------------------------------- commands


def test_default_commands_use_tls_and_node_auth_on_loopback_and_never_insecure(certs, tmp_path):
    rovers = [RoverNode(f"rover_{i:03d}", d) for i, d in enumerate(_rover_dirs(tmp_path / "data"))]
    deployment = LocalDeployment(DeploySpec(run_dir=tmp_path / "run", certs_dir=certs.root, rovers=rovers))
    commands = deployment.commands()
    assert sorted(commands) == ["register-rover_000", "register-rover_001", "run", "superlink",
                                "supernode-rover_000", "supernode-rover_001"]
    for argv in commands.values():
        assert not any("insecure" in arg for arg in argv), argv
    superlink = commands["superlink"]

    def value(argv: list[str], flag: str) -> str:
        return argv[argv.index(flag) + 1]

    assert Path(superlink[0]).name == "flower-superlink" and "--enable-supernode-auth" in superlink
    assert value(superlink, "--ssl-certfile") == str(certs.server_cert)
    assert value(superlink, "--ssl-keyfile") == str(certs.server_key)
    assert value(superlink, "--ssl-ca-certfile") == str(certs.ca_cert)
    assert value(superlink, "--host") == "127.0.0.1" and "--disable-runtime-dependency-installation" in superlink
    port = int(value(superlink, "--port"))
    for rover in rovers:
        node = commands[f"supernode-{rover.rover_id}"]
        assert value(node, "--superlink") == f"127.0.0.1:{port}"
        assert value(node, "--root-certificates") == str(certs.ca_cert)
        assert value(node, "--auth-supernode-private-key") == str(certs.rover(rover.rover_id).auth_key)
        assert value(node, "--host") == "127.0.0.1" and value(node, "--ssl-certfile").endswith("runtime.crt")
        assert value(node, "--node-config").endswith(f"{rover.rover_id}.toml")
        register = commands[f"register-{rover.rover_id}"]
        assert register[1:4] == ["supernode", "register", str(certs.rover(rover.rover_id).auth_pub)]
    assert len({value(commands[f"supernode-{r.rover_id}"], "--port") for r in rovers} | {str(port)}) == 3
    # default: the warm ClientApp worker runs each SuperNode (process isolation) and serves its Runtime API
    for rover in rovers:
        node = commands[f"supernode-{rover.rover_id}"]
        supernode = node[node.index("--") + 1:]
        assert node[:3] == [sys.executable, "-m", WARM_MODULE] and Path(supernode[0]).name == "flower-supernode"
        assert value(supernode, "--isolation") == "process"
        secret = tmp_path / "run" / "homes" / f"supernode-{rover.rover_id}" / SECRET_FILE
        assert value(supernode, "--superexec-auth-secret-file") == value(node, "--secret-file") == str(secret)
        assert value(node, "--runtime-api-address") == f"127.0.0.1:{value(supernode, '--port')}"
        assert value(node, "--runtime-ca") == value(supernode, "--ssl-ca-certfile") == str(certs.ca_cert)
    # Flower's own mode on request: flower-supernode alone, a new flwr-clientapp per message
    flower = LocalDeployment(DeploySpec(run_dir=tmp_path / "run", certs_dir=certs.root, rovers=rovers,
                                        clientapp="subprocess")).commands()
    for rover in rovers:
        node = flower[f"supernode-{rover.rover_id}"]
        assert Path(node[0]).name == "flower-supernode" and value(node, "--isolation") == "subprocess"
        assert "--superexec-auth-secret-file" not in node and not any("insecure" in arg for arg in node)
    with pytest.raises(ValueError, match="clientapp must be one of"):
        LocalDeployment(DeploySpec(run_dir=tmp_path / "run", certs_dir=certs.root, rovers=rovers, clientapp="hot"))

    env = deployment.environment(tmp_path / "home")
    assert env["FLWR_HOME"] == str(tmp_path / "home") and env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert "FLWR_INTERNAL_GRPC_FLEET_API" not in env  # would open a gRPC Fleet API on 0.0.0.0:9092


def test_node_config_file_is_what_flower_parses(tmp_path):
    from flwr.common.config import parse_config_args

    odd = tmp_path / 'data "dir" with spaces'
    odd.mkdir()
    rover = RoverNode("rover_000", odd, scope="decoder", extra_config={"fault": "nan", "weight": 2.5, "on": True})
    path = write_toml_table(tmp_path / "node.toml", rover.node_config())
    assert parse_config_args([str(path)]) == {"data-dir": str(odd.resolve()), "rover-id": "rover_000",
                                              "scope": "decoder", "fault": "nan", "weight": 2.5, "on": True}
    with pytest.raises(ValueError, match="config key 'bad key'"):
        write_toml_table(tmp_path / "x.toml", {"bad key": 1})


def test_a_deployment_refuses_bad_input_before_starting_anything(certs, tmp_path, capsys):
    data = _rover_dirs(tmp_path / "data")
    with pytest.raises(ValueError, match="no keys for rover 'rover_777'"):
        LocalDeployment(DeploySpec(tmp_path / "run", certs.root, [RoverNode("rover_777", data[0])]))
    with pytest.raises(FileNotFoundError, match="rover rover_000: data dir .*missing does not exist"):
        LocalDeployment(DeploySpec(tmp_path / "run", certs.root, [RoverNode("rover_000", tmp_path / "missing")]))
    with pytest.raises(ValueError, match="rover ids are repeated"):
        LocalDeployment(DeploySpec(tmp_path / "run", certs.root, [RoverNode("rover_000", data[0])] * 2))
    with pytest.raises(ValueError, match=r"not \['10.9.8.7'\]"):  # the certificate does not name that address
        LocalDeployment(DeploySpec(tmp_path / "run", certs.root, [RoverNode("rover_000", data[0])], host="10.9.8.7"))
    code = forest_fl(["deploy", "--certs", str(certs.root), "--run-dir", str(tmp_path / "run"),
                      "--rover", f"rover_555={data[0]}"])
    assert code == 2 and "no keys for rover 'rover_555'" in capsys.readouterr().err
    assert forest_fl(["deploy", "--certs", str(certs.root), "--run-dir", str(tmp_path / "run"),
                      "--rover", "rover_000"]) == 2
    assert "is not ID=DATA_DIR" in capsys.readouterr().err
    assert not (tmp_path / "run" / "logs").exists()  # nothing was started


def test_deploy_rover_data_runs_one_supernode_per_folder_that_reads_only_that_folder(certs, tmp_path, capsys):
    """`forest-fl deploy --rover-data A B`: each folder becomes a SuperNode named after it, whose node config
    makes the ClientApp train on exactly that folder; a folder without keys is refused before anything starts."""
    from flwr.app import Context, RecordDict
    from flwr.common.config import parse_config_args

    from forest_perception.collab.flower.cli import _deploy_rovers, build_parser
    from forest_perception.collab.flower.client_app import resolve_rover

    folders = _rover_dirs(tmp_path / "recordings")
    args = build_parser().parse_args(["deploy", "--certs", str(certs.root), "--run-dir", str(tmp_path / "run"),
                                      "--rover-data", *map(str, folders)])
    rovers = _deploy_rovers(args)
    assert [(r.rover_id, Path(r.data_dir)) for r in rovers] == [("rover_000", folders[0].resolve()),
                                                                ("rover_001", folders[1].resolve())]
    deployment = LocalDeployment(DeploySpec(tmp_path / "run", certs.root, rovers))
    for rover, folder in zip(rovers, folders):
        argv = deployment.commands()[f"supernode-{rover.rover_id}"]
        path = write_toml_table(Path(argv[argv.index("--node-config") + 1]), rover.node_config())
        node = parse_config_args([str(path)])
        context = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={})
        # the run config's list (what `flwr run` gets) does not override a deployed node's own folder
        identity = resolve_rover(context, {"rover-data": str(tmp_path / "elsewhere")})
        assert (identity.rover_id, Path(identity.data_dir)) == (rover.rover_id, folder.resolve())

    stranger = tmp_path / "recordings" / "rover_999"
    stranger.mkdir()
    code = forest_fl(["deploy", "--certs", str(certs.root), "--run-dir", str(tmp_path / "run2"),
                      "--rover-data", str(folders[0]), str(stranger)])
    assert code == 2 and "no keys for rover 'rover_999'" in capsys.readouterr().err
    assert not (tmp_path / "run2" / "logs").exists()


# ---------------------------------------------------------------------------------------------- processes


_DETACHING_PARENT = textwrap.dedent("""
    import socket, subprocess, sys, time
    # like flower-superlink: a child in a session of its own (its SuperExec), plus one in our group
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    server = socket.create_server(("127.0.0.1", 0))
    print("ready", server.getsockname()[1], flush=True)
    time.sleep(600)
""")


def _start_ready(tmp_path: Path, code: str) -> tuple[ManagedProcess, Path]:
    """``code`` in a new session with its output (and its children's) logged; returns once "ready" is logged."""
    log_path = tmp_path / "p.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed by the test
    popen = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    deadline = time.monotonic() + 30
    while "ready" not in log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    return ManagedProcess("parent", [], popen, log_path, log), log_path


def test_stop_ends_the_process_group_and_detached_descendants(tmp_path):
    process, log_path = _start_ready(tmp_path, _DETACHING_PARENT)
    popen, log = process.popen, process.log_file
    try:
        port = int(log_path.read_text().split()[1])
        children = process_tree(popen.pid)
        assert len(children) == 2 and popen.pid in group_members(popen.pid)
        assert listening_sockets([popen.pid] + children) == [("127.0.0.1", port, popen.pid)]
        for pid in children:
            process.seen[pid] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        start = time.monotonic()
        stop_process(process, grace=5.0)
        assert time.monotonic() - start < 5.0  # they all obey SIGTERM
        assert popen.poll() is not None and group_members(popen.pid) == []
        for pid in children:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] \
                if Path(f"/proc/{pid}").exists() else "gone"
            assert state in ("Z", "gone")
    finally:
        stop_process(process, grace=1.0)
        log.close()


_COUNTING_CHILD = textwrap.dedent("""
    import os, signal, sys, time
    def mark(what):
        with open(sys.argv[1], "a") as out:
            out.write(what)
    def graceful(signum, frame):  # as Flower's handler: the default action is back after the first signal
        mark("x")
        signal.signal(signal.SIGTERM, lambda *a: (mark("y"), os._exit(1)))
        time.sleep(0.5)
        sys.exit(0)
    signal.signal(signal.SIGTERM, graceful)
    print("ready", flush=True)
    time.sleep(600)
""")


def test_stop_sends_a_group_member_one_sigterm_so_it_can_exit_gracefully(tmp_path, monkeypatch):
    """A recorded descendant still in the group (the SuperNode under the warm worker) gets the group's SIGTERM only:
    a second one, once its handler ran, would kill it before it deactivates at the SuperLink."""
    import signal

    real_kill, signalled = os.kill, []

    def spy(pid: int, sig: int) -> None:
        signalled.append((pid, sig))
        real_kill(pid, sig)

    monkeypatch.setattr(os, "kill", spy)
    marks = tmp_path / "marks"
    parent = f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {_COUNTING_CHILD!r}, " \
             f"{str(marks)!r}])\ntime.sleep(600)\n"
    process, _ = _start_ready(tmp_path, parent)
    popen, log = process.popen, process.log_file
    try:
        [child] = process_tree(popen.pid)
        process.seen[child] = int(Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[19])
        stop_process(process, grace=5.0)
        assert marks.read_text() == "x" and group_members(popen.pid) == []
        assert (child, signal.SIGTERM) not in signalled  # the group's SIGTERM was its only one
    finally:
        stop_process(process, grace=1.0)
        log.close()


# ---------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_deployed_rovers_train_over_tls_and_an_unregistered_node_is_refused(certs, tmp_path):
    from forest_perception.collab.flower.population import make_population
    from forest_perception.collab.flower.rover_data import ensure_rover_data

    population = make_population(3, tmp_path / "rovers", seed=3, frames=4, availability=(1.0, 1.0))
    for rover in population.rovers:
        ensure_rover_data(rover, 64, 48)
    rovers = [RoverNode(r.rover_id, r.data_dir) for r in population.rovers]
    spec = DeploySpec(run_dir=tmp_path / "run", certs_dir=certs.root, rovers=rovers, start_timeout=180.0,
                      run_config={"input-height": 48, "input-width": 64, "local-steps": 1, "store-updates": True,
                                  "round-timeout": 300.0})
    deployment = LocalDeployment(spec)
    pids: list[int] = []
    try:
        deployment.start()
        first_nodes = dict(deployment.nodes)
        assert sorted(first_nodes) == ["rover_000", "rover_001", "rover_002"] and len(set(first_nodes.values())) == 3
        pids = deployment.pids()
        # SuperLink, its SuperExec, three warm ClientApp workers and their SuperNodes: all on 127.0.0.1 only
        assert len(pids) >= 8
        sockets = listening_sockets(pids)
        assert {address for address, _, _ in sockets} == {"127.0.0.1"}
        assert deployment.superlink_port in {port for _, port, _ in sockets}
        for pid in pids:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            assert b"--insecure" not in argv, argv

        # an intruder with a valid CA but a key nobody registered claims to be rover_000: refused, it exits
        intruder = deployment.start_supernode(rovers[0], keys=certs.rover("intruder"), name="intruder")
        assert intruder.popen.wait(120) != 0
        assert "Failed to activate SuperNode" in intruder.log_text()
        assert "No SuperNode found with the given public key" in deployment.processes["superlink"].log_text()
        # a registered rover (rover_002's key) that claims to be rover_000: the SuperLink lets it in, the
        # coordinator refuses it, since rover_000's registered key is another node
        honest = deployment.processes.pop("supernode-rover_002")
        stop_process(honest)
        honest.log_file.close()
        deployment.start_supernode(rovers[0], keys=certs.rover("rover_002"), name="liar")
        liar_node = deployment.wait_online("rover_000", name="liar")
        assert liar_node == first_nodes["rover_002"]

        first = deployment.run({"num-server-rounds": 1}, timeout=600)
        # each rover's messages (identity query, evaluations, training) ran in its one warm worker process:
        # under the worker only the SuperNode, no Flower SuperExec starting a flwr-clientapp per message
        for name in ("supernode-rover_000", "supernode-rover_001"):
            process = deployment.processes[name]
            programs = {Path(arg.decode()).name for pid in process_tree(process.pid)
                        for arg in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:2]}
            assert "flower-supernode" in programs, programs
            assert not programs & {"flower-superexec", "flwr-clientapp"}, programs
            tasks = [line for line in process.log_text().splitlines() if "[warm-clientapp] task" in line]
            assert len(tasks) >= 3 and all("completed" in line for line in tasks), tasks
            assert process.log_text().count("[warm-clientapp] preloaded") == 1
        # a SuperLink restart (link state in memory): the deployment registers its rovers' keys again, and only
        # those; the never-registered key is still refused; the run resumes with the new node ids enforced
        deployment.stop()
        deployment.start()
        second_nodes = dict(deployment.nodes)
        assert sorted(second_nodes) == sorted(first_nodes)
        assert json.loads((tmp_path / "run" / "nodes.json").read_text())["rover_000"]["node_id"] == \
            second_nodes["rover_000"]
        intruder = deployment.start_supernode(rovers[0], keys=certs.rover("intruder"), name="intruder-2")
        assert intruder.popen.wait(120) != 0
        second = deployment.run({"num-server-rounds": 2}, timeout=600)  # same state-db: resumes at round 2
        assert first.run_id != second.run_id and second.state_db == (tmp_path / "run" / "coordinator.db")
    finally:
        pids += deployment.pids()
        deployment.stop()
    assert [pid for pid in set(pids) if Path(f"/proc/{pid}").exists()
            and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"] == []

    with CoordinatorStore(tmp_path / "run" / "coordinator.db", readonly=True) as store:
        rounds = store.rounds()
        assert [r["round"] for r in rounds] == [1, 2] and [r["resumed"] for r in rounds] == [False, True]
        assert [(r["num_accepted"], r["num_available"]) for r in rounds] == [(2, 2), (3, 3)]
        updates = store.updates()
        # who sent what: each rover's update came from the node its registered key was given at the time
        expected = {(1, rover, node, "accepted") for rover, node in first_nodes.items() if rover != "rover_002"}
        expected |= {(2, rover, node, "accepted") for rover, node in second_nodes.items()}
        expected.add((1, f"node-{liar_node}", liar_node, "rejected"))
        assert {(u["round"], u["rover_id"], int(u["node_id"]), u["status"]) for u in updates} == expected
        refused = [u for u in updates if u["status"] == "rejected"]
        assert refused[0]["reason"] == "identity" and "claims rover 'rover_000'" in refused[0]["message"]
        assert all(u["num_examples"] > 0 and len(u["digest"]) == 64 for u in updates if u["status"] == "accepted")
        for server_round in (1, 2):
            accepted = store.stored_updates(server_round)
            expected_model = fedavg(store.model(server_round - 1)[1], accepted)
            for got, want in zip(store.model(server_round)[1], expected_model):
                np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
