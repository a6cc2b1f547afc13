"""collab_node in-process with a real depth_node: gate, deploy via the parameter service, refuse, train when idle."""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from forest_perception.collab import rover

HW = (48, 64)


def _task(**kwargs):
    from forest_perception.collab.flower.task import TaskConfig

    return TaskConfig(**{"base_channels": 4, "input_hw": HW, **kwargs}).validate()


def _write_segment(root: Path, segment: str, frames: int, seed: int) -> None:
    from forest_perception.dataset_tools.layout import FrameRecord, ImuSample, SegmentWriter

    rng = np.random.default_rng(seed)
    with SegmentWriter(root, 1, segment) as writer:
        for i in range(frames):
            depth = np.full((48, 64), 3.0, np.float32)  # a wall 3 m away
            writer.write_frame(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), depth,
                               FrameRecord(f"{i:06d}", 1.0 + i, ImuSample((0, 0, 0), (0, 0, 9.81))))


def _constant_model(depth_m: float, server_round: int) -> rover.GlobalModel:
    """About ``depth_m`` everywhere (within a millimetre: depth_node refuses an exactly constant model)."""
    model = rover.initial_model(_task())
    share = (math.log(depth_m) - math.log(0.1)) / (math.log(20.0) - math.log(0.1))
    arrays = [
        np.full_like(a, math.log(share / (1 - share))) if n == "decoder.logit.bias" else a
        for n, a in zip(model.names, model.arrays)
    ]
    return rover.GlobalModel(server_round, model.names, arrays, dict(model.meta))


def _params(**values):
    from rclpy.parameter import Parameter

    return [Parameter(k, value=v) for k, v in values.items()]


def _decision(node, label: str):
    agent = node.agent
    with agent.lock:
        last = agent.last_decision
    return last if last and last["label"].startswith(label) and agent.state == "idle" else None


class Probe:
    """A node in the rover namespace: publishes odometry at 20 Hz, listens to collab/status and /diagnostics."""

    def __init__(self, context, wait) -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from nav_msgs.msg import Odometry
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        from std_msgs.msg import String
        from std_srvs.srv import Trigger

        self.wait = wait
        self.node = rclpy.create_node("probe", namespace="rover_0", context=context)
        self.speed: float | None = None  # None: publish no odometry
        self.statuses: list[dict] = []
        self.diagnostics: list = []
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.node.create_subscription(String, "collab/status", lambda m: self.statuses.append(json.loads(m.data)),
                                      latched)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self.diagnostics.append, QoSProfile(depth=50))
        self.odom = self.node.create_publisher(Odometry, "odom", 10)
        self.train_now = self.node.create_client(Trigger, "collab_node/train_now")
        self.node.create_timer(0.05, self._publish_odom)

    def _publish_odom(self) -> None:
        from nav_msgs.msg import Odometry

        if self.speed is None:
            return
        msg = Odometry()
        msg.header.frame_id, msg.child_frame_id = "odom", "base_link"
        msg.twist.twist.linear.x = float(self.speed)
        self.odom.publish(msg)

    def call_train_now(self):
        from std_srvs.srv import Trigger

        assert self.train_now.wait_for_service(timeout_sec=5.0)
        future = self.train_now.call_async(Trigger.Request())
        assert self.wait(future.done, timeout=10.0)
        return future.result()


@pytest.fixture(scope="module")
def shipped_model(tmp_path_factory) -> str:
    """The model the depth node starts with: a constant 2.5 m (the wall is at 3 m), exported once."""
    out = tmp_path_factory.mktemp("shipped") / "shipped.onnx"
    path, _ = rover.export_candidate(_constant_model(2.5, 0), out, _task(), "torchscript")
    return str(path)


@pytest.fixture
def rig(rclpy_context, tmp_path, request, shipped_model, wait):
    """A depth node running a constant-2.5 m model, a collab node watching a drop folder, a probe, spinning.

    The rover has recorded four segments of four frames (``indirect`` parameter: how many segments).
    """
    from rclpy.executors import SingleThreadedExecutor

    from forest_perception.nodes.collab_node import CollabNode
    from forest_perception.nodes.depth_node import DepthNode

    data = tmp_path / "forest"
    for i, name in enumerate("abcd"[: getattr(request, "param", 4)]):
        _write_segment(data, name, 4, seed=i)
    shipped = shipped_model
    depth = DepthNode(context=rclpy_context, namespace="rover_0", parameter_overrides=_params(
        model_path=str(shipped), publish_points=False, publish_scan=False))
    collab_params = dict(
        dataset_dir=str(data), models_dir=str(tmp_path / "deployed"), model_source=str(tmp_path / "incoming"),
        onnx_exporter="torchscript", input_height=HW[0], input_width=HW[1], holdout_fraction=0.5,
        poll_period_s=0.2, status_period_s=0.3, diagnostics_period_s=0.3, idle_seconds=0.4, odom_timeout_s=1.0,
        service_timeout_s=5.0,
    )
    nodes = {"depth": depth, "collab": CollabNode(context=rclpy_context, namespace="rover_0",
                                                  parameter_overrides=_params(**collab_params))}
    probe = Probe(rclpy_context, wait)
    executor = SingleThreadedExecutor(context=rclpy_context)
    for node in (*nodes.values(), probe.node):
        executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()

    def restart_collab():
        """Destroy the collab node and start a new one on the same folders (a rover reboot)."""
        executor.remove_node(nodes["collab"])
        nodes["collab"].destroy_node()
        nodes["collab"] = CollabNode(context=rclpy_context, namespace="rover_0",
                                     parameter_overrides=_params(**collab_params))
        executor.add_node(nodes["collab"])
        return nodes["collab"]

    try:
        yield {"depth": depth, "collab": lambda: nodes["collab"], "probe": probe, "drop": tmp_path / "incoming",
               "shipped": str(shipped), "restart_collab": restart_collab, "data": data}
    finally:
        executor.shutdown(timeout_sec=1.0)
        spinner.join(timeout=5.0)
        for node in (*nodes.values(), probe.node):
            node.destroy_node()


def test_collab_node_gates_deploys_refuses_and_trains_when_idle(rig, wait):
    depth, collab, probe, drop = rig["depth"], rig["collab"](), rig["probe"], rig["drop"]
    first_version = depth.diagnostics_values()[2]["model_version"]
    assert first_version and depth.get_parameter("model_path").value == rig["shipped"]
    assert wait(lambda: probe.statuses and probe.statuses[-1]["dataset"]["frames"] == 16, timeout=10.0)
    assert probe.statuses[-1]["dataset"]["holdout_frames"] > 0
    # the node asked the depth node what it runs
    assert wait(lambda: probe.statuses[-1]["model_path"] == rig["shipped"], timeout=10.0)
    assert probe.statuses[-1]["model_version"] == first_version and probe.statuses[-1]["state"] == "idle"

    # a better global model (the wall's true distance) is accepted and swapped into the depth node
    better = _constant_model(3.0, 1)
    rover.write_global_model(drop, 1, better.names, better.arrays, rover.task_meta(_task()))
    assert wait(lambda: _decision(collab, "global-r000001"), timeout=30.0), collab.agent.last_error
    decision = _decision(collab, "global-r000001")
    assert decision["accepted"] and decision["deployed"] and decision["code"] == "accepted", decision
    assert decision["running_model"] == rig["shipped"]
    deployed_path = decision["model_path"]
    assert Path(deployed_path).is_file() and depth.get_parameter("model_path").value == deployed_path
    version = depth.diagnostics_values()[2]["model_version"]
    assert version == decision["model_version"] and version != first_version
    assert wait(lambda: probe.statuses[-1]["model_version"] == version and probe.statuses[-1]["round"] == 1,
                timeout=30.0)

    # random weights: worse on the held-out frames, refused with the reason; the depth node keeps its model
    random_model = rover.initial_model(_task(seed=7))
    rover.write_global_model(drop, 2, random_model.names, random_model.arrays, rover.task_meta(_task()))
    assert wait(lambda: _decision(collab, "global-r000002"), timeout=30.0), collab.agent.last_error
    decision = _decision(collab, "global-r000002")
    assert not decision["accepted"] and not decision["deployed"] and decision["code"] == "worse"
    assert "absrel" in decision["reason"] and decision["running_model"] == deployed_path
    assert depth.get_parameter("model_path").value == deployed_path
    assert depth.diagnostics_values()[2]["model_version"] == version

    # a corrupt drop: refused as unreadable, naming the file
    (drop / "global-r000003.npz").write_bytes(b"\x00garbage" * 300)
    assert wait(lambda: _decision(collab, "global-r000003"), timeout=30.0), collab.agent.last_error
    decision = _decision(collab, "global-r000003")
    assert decision["code"] == "unreadable" and "global-r000003.npz" in decision["reason"]
    assert depth.get_parameter("model_path").value == deployed_path
    assert wait(lambda: probe.statuses[-1]["last_gate"]["label"] == "global-r000003", timeout=30.0)
    assert probe.statuses[-1]["counts"]["accepted"] == 1 and probe.statuses[-1]["counts"]["refused"] == 2

    # local training: refused while the rover moves or without odometry, accepted once it has stood still
    response = probe.call_train_now()
    assert not response.success and "no odometry" in response.message
    probe.speed = 0.6
    assert wait(lambda: "moving" in collab.agent.idle_state()[1], timeout=5.0)
    response = probe.call_train_now()
    assert not response.success and "moving at 0.60 m/s" in response.message
    probe.speed = 0.0
    assert wait(lambda: collab.agent.idle_state()[0], timeout=5.0)
    response = probe.call_train_now()
    assert response.success, response.message
    assert wait(lambda: _decision(collab, "local-"), timeout=30.0), collab.agent.last_error
    assert collab.agent.counts["trainings"] == 1 and collab.agent.counts["training_failed"] == 0
    assert wait(lambda: probe.statuses[-1]["local_metrics"].get("steps", 0) > 0, timeout=30.0)
    local = probe.statuses[-1]["local_metrics"]
    assert local["val-is-train"] == 0.0 and math.isfinite(local["absrel"])
    local_decision = _decision(collab, "local-")
    # whatever the gate said, the depth node runs what the decision says
    expected = local_decision["model_path"] if local_decision["deployed"] else deployed_path
    assert depth.get_parameter("model_path").value == expected

    running_version = depth.diagnostics_values()[2]["model_version"]

    def collab_diagnostics():
        ours = [a.status[0] for a in probe.diagnostics if a.status and a.status[0].name == "collab_node: rover_0"]
        return {kv.key: kv.value for kv in ours[-1].values} if ours else {}

    assert wait(lambda: collab_diagnostics().get("model_version") == running_version
                 and collab_diagnostics().get("state") == "idle", timeout=5.0)
    values = collab_diagnostics()
    assert int(values["count_refused"]) >= 2 and values["global_round"] == "3" and values["count_trainings"] == "1"


def test_collab_node_restores_its_model_and_does_not_regate_after_a_restart(rig, wait):
    depth, collab, drop = rig["depth"], rig["collab"](), rig["drop"]
    better = _constant_model(3.0, 4)
    rover.write_global_model(drop, 4, better.names, better.arrays, rover.task_meta(_task()))
    assert wait(lambda: _decision(collab, "global-r000004"), timeout=30.0), collab.agent.last_error
    deployed = _decision(collab, "global-r000004")["model_path"]
    assert depth.get_parameter("model_path").value == deployed
    # the depth node restarts with its launch-file model; the collab node restarts too
    from rclpy.parameter import Parameter

    assert depth.set_parameters([Parameter("model_path", value=rig["shipped"])])[0].successful
    collab = rig["restart_collab"]()
    assert wait(lambda: depth.get_parameter("model_path").value == deployed, timeout=15.0)
    time.sleep(1.0)  # several polls: the model it decided on before is not gated again
    agent = collab.agent
    assert agent.last_decision is None and agent.counts["accepted"] == agent.counts["refused"] == 0
    assert collab.status_dict()["round"] == 4
    # a bad parameter update is refused with the reason
    result = collab.set_parameters([Parameter("input_height", value=50)])[0]
    assert not result.successful and "multiple of 16" in result.reason
    assert not collab.set_parameters([Parameter("models_dir", value="/elsewhere")])[0].successful  # read-only


@pytest.mark.parametrize("rig", [1], indirect=True)
def test_a_model_waits_for_held_out_frames(rig, wait):
    depth, collab, drop = rig["depth"], rig["collab"](), rig["drop"]
    better = _constant_model(3.0, 1)
    rover.write_global_model(drop, 1, better.names, better.arrays, rover.task_meta(_task()))
    # one segment: nothing can be held out, so nothing is validated and the depth node keeps its model
    assert wait(lambda: _decision(collab, "global-r000001"), timeout=30.0), collab.agent.last_error
    decision = _decision(collab, "global-r000001")
    assert decision["code"] == "no_holdout" and not decision["accepted"]
    assert depth.get_parameter("model_path").value == rig["shipped"]
    level, message, _ = collab.diagnostics_values()
    assert level == b"\x01" and "no held-out frames" in message
    # the rover records a second segment: the same model is gated again and deployed
    _write_segment(rig["data"], "b", 4, seed=1)
    deployed = wait(lambda: (_decision(collab, "global-r000001") or {}).get("deployed"), timeout=30.0)
    assert deployed, collab.agent.last_error
    assert depth.get_parameter("model_path").value == collab.agent.last_decision["model_path"]


def test_collab_node_follows_a_release_server_and_rolls_back_on_request(rclpy_context, tmp_path, shipped_model, wait):
    """An https:// model_source: the assigned release is pulled, verified, gated and swapped in, reported as
    installed; ``~/rollback`` puts the shipped model back at once and the coordinator rolls the release back."""
    from rclpy.executors import SingleThreadedExecutor
    from std_srvs.srv import Trigger

    from forest_perception.collab.deploy.certs import make_deployment_certs
    from forest_perception.collab.deploy.processes import free_ports
    from forest_perception.collab.release.auth import load_rover_public_keys
    from forest_perception.collab.release.registry import ReleaseRegistry, Thresholds
    from forest_perception.collab.release.server import ReleaseServer, server_certificate
    from forest_perception.models.export import write_model_card
    from forest_perception.nodes.collab_node import CollabNode
    from forest_perception.nodes.depth_node import DepthNode

    data = tmp_path / "forest"
    for i, name in enumerate("abcd"):
        _write_segment(data, name, 4, seed=i)
    release_file = tmp_path / "release" / "wall_3m.onnx"
    rover.export_candidate(_constant_model(3.0, 1), release_file, _task(), "torchscript")
    write_model_card(release_file, {"notes": "a wall 3 m away"})
    certs = make_deployment_certs(tmp_path / "certs", ["rover_0"])
    registry = ReleaseRegistry(tmp_path / "registry")
    release = registry.create(release_file)["release"]
    cert, key = server_certificate(certs.root)
    server = ReleaseServer(registry, port=free_ports(1)[0], certfile=cert, keyfile=key,
                           rover_keys=load_rover_public_keys(certs.root), log_level="critical").start()
    depth = DepthNode(context=rclpy_context, namespace="rover_0", parameter_overrides=_params(
        model_path=shipped_model, publish_points=False, publish_scan=False))
    collab = CollabNode(context=rclpy_context, namespace="rover_0", parameter_overrides=_params(
        dataset_dir=str(data), models_dir=str(tmp_path / "deployed"), model_source=server.url,
        release_public_key=str(registry.public_key_path), root_certificates=str(certs.ca_cert),
        auth_private_key=str(certs.rover("rover_0").auth_key), rover_groups="north,test", hardware_class="pc",
        holdout_fraction=0.5, poll_period_s=0.2, release_wait_s=0.5, release_report_period_s=0.5,
        service_timeout_s=5.0))
    client_node = __import__("rclpy").create_node("rollback_client", context=rclpy_context)
    rollback = client_node.create_client(Trigger, "/rover_0/collab_node/rollback")
    executor = SingleThreadedExecutor(context=rclpy_context)
    for node in (depth, collab, client_node):
        executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        assert wait(lambda: registry.status()["rovers"], timeout=20.0), collab.agent.last_error
        assert registry.status()["rovers"][0]["groups"] == ["north", "test"]
        registry.promote(release, thresholds=Thresholds(soak_s=0, min_reports=1))
        assert wait(lambda: _decision(collab, release), timeout=60.0), collab.agent.last_error
        assert _decision(collab, release)["deployed"]
        deployed = depth.get_parameter("model_path").value
        assert deployed == _decision(collab, release)["model_path"] != shipped_model
        assert wait(lambda: any(e["action"] == "installed" for e in registry.audit()), timeout=20.0)
        installed = next(e for e in registry.audit() if e["action"] == "installed")
        assert installed["actor"] == "rover:rover_0" and installed["detail"]["gate_absrel"] < \
            installed["detail"]["gate_absrel_before"]
        assert (tmp_path / "deployed" / "releases" / release / "manifest.json").is_file()

        assert rollback.wait_for_service(timeout_sec=5.0)
        future = rollback.call_async(Trigger.Request())
        assert wait(future.done, timeout=20.0)
        assert future.result().success, future.result().message
        assert wait(lambda: depth.get_parameter("model_path").value == shipped_model, timeout=20.0)
        assert wait(lambda: registry.status()["rollouts"][0]["state"] == "rolled_back", timeout=20.0)
        assert "rover_0 rolled it back" in registry.status()["rollouts"][0]["reason"]
        time.sleep(1.0)  # the withdrawal reaches the rover; it stays on the shipped model
        assert depth.get_parameter("model_path").value == shipped_model and Path(deployed).is_file()
    finally:
        executor.shutdown(timeout_sec=1.0)
        spinner.join(timeout=5.0)
        for node in (depth, collab, client_node):
            node.destroy_node()
        server.stop()
