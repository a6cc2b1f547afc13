"""collab_node: the rover's side of collaborative learning in the ROS graph: validate, deploy, train locally.

Thin ROS wrapper over :mod:`forest_perception.collab.rover`: :class:`~forest_perception.collab.rover.agent.CollabAgent`
gates, deploys and trains; :class:`~forest_perception.collab.rover.federation.RoverSuperNode` runs the
rover's Flower SuperNode. Topics, services, parameters and the gate's rules: ``docs/federated.md``
("The rover's collab_node").
"""

from __future__ import annotations

import threading
from typing import Any

from diagnostic_msgs.msg import DiagnosticArray
from nav_msgs.msg import Odometry
from rcl_interfaces.msg import Parameter as ParameterMsg
from rcl_interfaces.msg import ParameterType, ParameterValue
from rcl_interfaces.srv import GetParameters, SetParameters
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from std_msgs.msg import String
from std_srvs.srv import Trigger

from forest_perception.collab.rover.agent import CollabAgent, Job
from forest_perception.collab.rover.federation import POLL_PERIOD_S, RoverSuperNode
from forest_perception.collab.rover.gate import EXPORTERS
from forest_perception.collab.rover.releases import DepthHealth, is_release_url, release_source, release_source_problem
from forest_perception.collab.rover.settings import parameter_problem, supernode_rover_id
from forest_perception.collab.rover.status import collab_health, status_text
from forest_perception.collab.supervisor import BACKOFF, FAILED
from forest_perception.models.networks import MODEL_NAMES
from forest_perception.nodes.common import (
    ParamSpec,
    add_validated_updates,
    declare_parameters,
    publish_node_diagnostics,
    run_node,
    worker_error_handler,
)
from forest_perception.worker import SlotWorker

PARAMS = [
    ParamSpec("dataset_dir", "data/forest", "the rover's recordings (forest dataset layout: Run-N/<segment>/...)",
              read_only=True),
    ParamSpec("models_dir", "models/deployed", "where gated models (ONNX + card), refused/ and the ledger go",
              read_only=True),
    ParamSpec("model_source", "models/incoming",
              "drop folder the rover's ClientApp writes global-r<round>.npz into, a coordinator SQLite store (.db), or "
              "a release server (https://host:port, docs/releases.md)",
              read_only=True),
    ParamSpec("depth_node", "depth_node", "depth node whose model_path is set (relative: in this namespace)",
              read_only=True),
    ParamSpec("holdout_fraction", 0.2, "share of segments held out for the gate (by segment hash)", (0.0, 0.9)),
    ParamSpec("holdout_seed", 0, "seed of the segment hash of the hold-out split", (0, 2**31 - 1)),
    ParamSpec("max_holdout_frames", 200, "held-out frames evaluated at most (spread evenly)", (1, 100_000)),
    ParamSpec("gate_tolerance_absrel", 0.0, "accept a candidate with AbsRel at most this much above the running model",
              (0.0, 1.0)),
    ParamSpec("gate_tolerance_delta1", 0.01, "accept a candidate with delta1 at most this much below the running model",
              (0.0, 1.0)),
    ParamSpec("gate_confidence", 0.9,
              "refuse a candidate as worse only if it is worse beyond a tolerance with this confidence (paired "
              "bootstrap over the held-out segments and their frames, a lone segment in runs of consecutive "
              "frames); 0 compares the pooled figures as they are",
              (0.0, 0.999)),
    ParamSpec("gate_max_absrel", 1.0, "refuse a candidate above this AbsRel even with no running model", (0.0, 100.0)),
    ParamSpec("onnx_exporter", "dynamo", f"torch ONNX exporter: {list(EXPORTERS)}"),
    ParamSpec("keep_refused", 3, "refused candidates kept under models_dir/refused", (0, 1000)),
    ParamSpec("keep_accepted", 5, "accepted models kept in models_dir besides the deployed one", (1, 1000)),
    ParamSpec("train_only_when_idle", True, "refuse local training unless the rover stands still"),
    ParamSpec("idle_speed_mps", 0.05, "odometry speed at or below which the rover stands still", (0.0, 10.0)),
    ParamSpec("idle_seconds", 10.0, "how long the rover must stand still to be idle", (0.0, 3600.0)),
    ParamSpec("odom_timeout_s", 1.0, "no odometry for this long: not idle (odometry may be down)", (0.01, 600.0)),
    ParamSpec("auto_train_min_new_frames", 0,
              "train by itself when idle and this many new frames were recorded since the last training; "
              "0 = only ~/train_now", (0, 10_000_000)),
    ParamSpec("model", "autoencoder", f"network of global models without architecture meta: {list(MODEL_NAMES)}"),
    ParamSpec("base_channels", 4, "auto-encoder width of global models without meta", (1, 256)),
    ParamSpec("input_height", 64, "network input height (multiple of 16)", (16, 4096)),
    ParamSpec("input_width", 80, "network input width (multiple of 16)", (16, 4096)),
    ParamSpec("min_depth_m", 0.1, "valid ground-truth depth from (training and evaluation)", (0.01, 100.0)),
    ParamSpec("max_depth_m", 10.0, "valid ground-truth depth up to", (0.1, 1000.0)),
    ParamSpec("batch_size", 4, "local training batch size", (1, 1024)),
    ParamSpec("local_epochs", 1, "local training epochs", (1, 1000)),
    ParamSpec("local_steps", 0, "local optimiser steps at most (0: whole epochs)", (0, 1_000_000)),
    ParamSpec("lr", 1e-3, "local AdamW learning rate", (1e-7, 1.0)),
    ParamSpec("max_train_frames", 2000, "training frames at most (spread evenly; memory)", (1, 1_000_000)),
    ParamSpec("torch_threads", 1, "threads for local training and evaluation", (1, 64)),
    ParamSpec("restore_on_start", True, "put the last deployed model back on the depth node at start"),
    ParamSpec("service_timeout_s", 10.0, "wait this long for the depth node's parameter services", (0.1, 600.0)),
    ParamSpec("poll_period_s", 5.0, "period of checking the model source and the dataset (read-only)",
              (0.05, 3600.0), read_only=True),
    ParamSpec("status_period_s", 2.0, "period of collab/status (read-only)", (0.1, 3600.0), read_only=True),
    ParamSpec("diagnostics_period_s", 1.0, "period of /diagnostics (read-only)", (0.1, 60.0), read_only=True),
    ParamSpec("supernode", False, "run and supervise the rover's flower-supernode (read-only)", read_only=True),
    ParamSpec("superlink_address", "127.0.0.1:8000", "host:port of the SuperLink's Fleet API (read-only)",
              read_only=True),
    ParamSpec("root_certificates", "", "CA certificate (PEM) verifying the SuperLink, e.g. certs/ca.crt (read-only)",
              read_only=True),
    ParamSpec("auth_private_key", "",
              "the rover's SuperNode authentication key, e.g. certs/rovers/<id>/auth.key; "
              "runtime.crt and runtime.key are taken from its folder (read-only)", read_only=True),
    ParamSpec("rover_id", "", "rover id in the SuperNode's node config; empty: the namespace (read-only)",
              read_only=True),
    ParamSpec("supernode_executable", "flower-supernode", "SuperNode program: a path or a name on PATH (read-only)",
              read_only=True),
    ParamSpec("supernode_clientapp", "warm", "how the SuperNode runs the ClientApp: warm (one process kept alive "
              "across messages) or subprocess (Flower's: a new process per message) (read-only)",
              choices=("warm", "subprocess"), read_only=True),
    ParamSpec("supernode_log", "", "SuperNode log file; empty: <models_dir>/supernode/supernode.log (read-only)",
              read_only=True),
    ParamSpec("release_public_key", "",
              "with an https:// model_source: the registry's release_signing.pub that every release must be signed "
              "with (read-only)", read_only=True),
    ParamSpec("rover_groups", "", "group tags release policies select this rover by, comma-separated (read-only)",
              read_only=True),
    ParamSpec("hardware_class", "auto", "hardware class for releases: auto, pi4, jetson or pc (read-only)",
              read_only=True),
    ParamSpec("release_wait_s", 30.0, "how long one announcement request waits for a change (read-only)",
              (0.0, 60.0), read_only=True),
    ParamSpec("release_report_period_s", 10.0, "period of the health reports to the release server (read-only)",
              (0.5, 3600.0), read_only=True),
]


def node_parameter_problem(p: dict[str, Any]) -> str:
    """Why ``p`` is not a usable configuration ("" if it is)."""
    return parameter_problem(p) or release_source_problem(p)


class CollabNode(Node):
    """Subscribes odom; serves ~/train_now; publishes collab/status and /diagnostics; sets the depth node's model."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("collab_node", **kwargs)
        self.p = declare_parameters(self, PARAMS, node_parameter_problem)
        depth = self.p["depth_node"].rstrip("/")
        self._set_client = self.create_client(SetParameters, f"{depth}/set_parameters")
        self._get_client = self.create_client(GetParameters, f"{depth}/get_parameters")
        self.depth_health = DepthHealth()
        self._health_lock = threading.Lock()
        source = None
        if is_release_url(self.p["model_source"]):
            source = release_source(self.p, supernode_rover_id(self.p, self.get_namespace()), self._depth_metrics,
                                    self.get_logger().info)
        self.agent = CollabAgent(self.p, self.depth_model_path, self.set_depth_model_path, self.get_logger(),
                                 now=lambda: self.get_clock().now().nanoseconds * 1e-9, on_change=self.publish_status,
                                 source=source)
        self.supernode = RoverSuperNode(self.p["supernode"])
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.status_pub = self.create_publisher(String, "collab/status", latched)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", QoSProfile(depth=10))
        # best effort subscribes to reliable and best-effort odometry publishers alike
        self.create_subscription(Odometry, "odom", self._on_odom, qos_profile_sensor_data)
        self.create_service(Trigger, "~/train_now", self._on_train_now)
        self.create_service(Trigger, "~/rollback", self._on_rollback)
        self._depth_status = f"depth_node: {self.get_namespace().strip('/') or 'depth_node'}"
        self.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, QoSProfile(depth=50))
        add_validated_updates(self, PARAMS, lambda: self.p, node_parameter_problem, self._commit)
        self.create_timer(self.p["poll_period_s"], self._poll)
        self.create_timer(self.p["status_period_s"], self.publish_status)
        self.create_timer(self.p["diagnostics_period_s"], self._publish_diagnostics)
        self.worker: SlotWorker[Job] = SlotWorker("collab_worker", self.agent.run,
                                                 on_error=worker_error_handler(self, "collab job"))
        if self.p["supernode"]:
            self._start_supernode()
            self.create_timer(POLL_PERIOD_S, self._poll_supernode)

    def _commit(self, _old: dict[str, Any], new: dict[str, Any]) -> None:
        self.p = new
        self.agent.set_parameters(new)

    # ---------------------------------------------------------------- callbacks
    def _on_odom(self, msg: Odometry) -> None:
        linear = msg.twist.twist.linear
        error = self.agent.odometry((linear.x, linear.y, linear.z))
        if error:
            self.get_logger().warning(f"dropped odometry: {error}", throttle_duration_sec=5.0)

    def _on_train_now(self, _request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        response.success, response.message = self.request_training("~/train_now")
        return response

    def _on_rollback(self, _request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        job, response.message = self.agent.request_rollback()
        response.success = job is not None
        if job is not None:  # the switch calls the depth node's services: on the worker, never in this callback
            self.worker.submit(job)
            self.get_logger().info(f"~/rollback: {response.message}")
        else:  # rclpy refuses two severities from one call site
            self.get_logger().warning(f"~/rollback: {response.message}")
        return response

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name == self._depth_status:
                with self._health_lock:
                    self.depth_health.update({kv.key: kv.value for kv in status.values})

    def _depth_metrics(self) -> dict[str, float] | None:
        with self._health_lock:
            return self.depth_health.metrics()

    def request_training(self, why: str) -> tuple[bool, str]:
        """Start a local training if the rover may train now; ``(started, reason)``."""
        job, message = self.agent.request_training(why)
        if job is not None:
            self.worker.submit(job)
        return job is not None, message

    def _poll(self) -> None:
        job = self.agent.poll()
        if job is not None:
            self.worker.submit(job)

    # ---------------------------------------------------------------- the depth node's model_path
    def _call(self, client: Any, request: Any, what: str) -> Any:  # noqa: ANN401 - rclpy client/request/response
        timeout = float(self.p["service_timeout_s"])
        if not client.wait_for_service(timeout_sec=timeout):
            raise RuntimeError(f"{what}: service {client.srv_name} not available after {timeout} s")
        future = client.call_async(request)
        done = threading.Event()
        future.add_done_callback(lambda _future: done.set())
        if not done.wait(timeout) or future.result() is None:
            client.remove_pending_request(future)
            raise RuntimeError(f"{what}: no answer from {client.srv_name} within {timeout} s")
        return future.result()

    def depth_model_path(self) -> str:
        """The depth node's ``model_path`` now (``RuntimeError`` when its parameter service does not answer)."""
        response = self._call(self._get_client, GetParameters.Request(names=["model_path"]),
                              "reading the depth node's model_path")
        if not response.values:
            raise RuntimeError(f"{self._get_client.srv_name} returned no value for model_path")
        return str(response.values[0].string_value)

    def set_depth_model_path(self, path: str) -> tuple[bool, str]:
        """Set the depth node's ``model_path``; ``(successful, reason)`` as the depth node answers."""
        value = ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=str(path))
        request = SetParameters.Request(parameters=[ParameterMsg(name="model_path", value=value)])
        response = self._call(self._set_client, request, "setting the depth node's model_path")
        if not response.results:
            return False, f"{self._set_client.srv_name} returned no result"
        return bool(response.results[0].successful), str(response.results[0].reason)

    # ---------------------------------------------------------------- the SuperNode
    def _start_supernode(self) -> None:
        started, message = self.supernode.start(self.p, supernode_rover_id(self.p, self.get_namespace()))
        if started:
            self.get_logger().info(message)
        else:
            self.get_logger().error(message)

    def _poll_supernode(self) -> None:
        change = self.supernode.poll()
        if change is None:
            return
        before, state, reason = change
        # rclpy refuses two severities from one call site: one call per severity
        if state in (BACKOFF, FAILED):
            self.get_logger().warning(f"SuperNode {before} -> {state}: {reason}")
        else:
            self.get_logger().info(f"SuperNode {before} -> {state}: {reason}")

    # ---------------------------------------------------------------- status and diagnostics
    def status_dict(self) -> dict[str, Any]:
        """What ``collab/status`` carries (JSON object)."""
        return self.agent.status(self.supernode.status())

    def publish_status(self) -> None:
        """Publish ``collab/status`` now."""
        self.status_pub.publish(String(data=status_text(self.status_dict())))

    def diagnostics_values(self) -> tuple[bytes, str, dict[str, object]]:
        """(level, message, key/values) of the node's health right now."""
        return collab_health(self.status_dict())

    def _publish_diagnostics(self) -> None:
        publish_node_diagnostics(self, self.diag_pub, "collab_node", *self.diagnostics_values())

    def destroy_node(self) -> None:
        """Stop the SuperNode (its whole process group), the worker (after its current job), then the node
        (also after a constructor that failed half way)."""
        if hasattr(self, "supernode"):
            self.supernode.stop()
        if hasattr(self, "agent"):
            self.agent.close()
        if hasattr(self, "worker"):
            self.worker.stop(timeout=30.0)
        super().destroy_node()


def main(args: list[str] | None = None) -> None:
    """Entry point of ``ros2 run forest_perception collab_node``."""
    run_node(CollabNode, "collab_node", args, PARAMS, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
