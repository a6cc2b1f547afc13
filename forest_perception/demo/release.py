"""Demo step: the swarm's model goes out as a signed release, canary first, and the rovers swap it in live.

The coordinator side: the last FedAvg round exported to ONNX + card + checkpoint, a release in a registry
(:mod:`forest_perception.collab.release`), the HTTPS release server on 127.0.0.1 with rover authentication, and a
staged rollout (one canary rover, then the rest once it is healthy). The rover side is the real thing over ROS 2:
sim_node drives the rovers through the forest they recorded (from the same start, so their first seconds retrace
the recording, then new ground), each rover runs
depth_node with the shipped network and collab_node following the release server, which pulls, verifies, gates on
the rover's held-out segments and hot-swaps depth_node's model. Live depth accuracy (depth_node's output against the
simulated RealSense depth) is scored per rover before and after its swap, and both models are also run by the
demo itself on the same live frames, which compares them fairly (before and after are different stretches of road).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from forest_perception import topics


@dataclass
class ReleaseDemo:
    """What the release step did and measured."""

    release: str
    state: str
    lines: list[str] = field(default_factory=list)
    before: dict[str, dict[str, float]] = field(default_factory=dict)  # depth_node live, before its swap
    after: dict[str, dict[str, float]] = field(default_factory=dict)  # depth_node live, after its swap
    same_frames: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # model -> rover -> metrics
    swapped_at: dict[str, float] = field(default_factory=dict)
    bytes_pulled: int = 0
    wall_s: float = 0.0
    timeline: Path | None = None
    audit: list[dict[str, Any]] = field(default_factory=list)


def release_to_swarm(out: Path, folders: dict[str, Path], onnx: Path, running_model: Path, seed: int, style: str,
                     before_s: float = 12.0, after_s: float = 20.0, timeout_s: float = 180.0,
                     holdout_fraction: float = 0.25, progress_every_s: float = 10.0) -> ReleaseDemo:
    """Release ``onnx`` to the rovers of ``folders`` (rover -> its curated dataset) through a canary rollout while
    they drive; ``running_model`` is what their depth_node runs before. Prints progress as it goes."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    from forest_perception.collab.deploy.certs import make_deployment_certs
    from forest_perception.collab.deploy.processes import free_ports
    from forest_perception.collab.release.auth import load_rover_public_keys
    from forest_perception.collab.release.registry import ReleaseRegistry, Thresholds
    from forest_perception.collab.release.report import plot_timeline
    from forest_perception.collab.release.server import ReleaseServer, server_certificate
    from forest_perception.models.metrics import MetricAccumulator
    from forest_perception.models.torch_engine import load_engine
    from forest_perception.msgs import array_from_image
    from forest_perception.nodes.collab_node import CollabNode
    from forest_perception.nodes.common import close_nodes
    from forest_perception.nodes.depth_node import DepthNode
    from forest_perception.nodes.sim_node import SimNode

    names = sorted(folders)
    certs = make_deployment_certs(out / "certs", names)
    registry = ReleaseRegistry(out / "registry")
    manifest = registry.create(onnx, hardware=["pi4", "jetson", "pc"],
                               notes="FedAvg of the swarm's recordings of the new forest (make demo)")
    result = ReleaseDemo(manifest["release"], "active")
    size = sum(a["size"] for a in manifest["artefacts"])
    result.lines.append(f"created {manifest['release']} ({len(manifest['artefacts'])} artefacts, {size / 1e6:.1f} MB, "
                        f"signed by key {manifest['key_id']})")
    cert, key = server_certificate(certs.root)
    server = ReleaseServer(registry, port=free_ports(1)[0], certfile=cert, keyfile=key,
                           rover_keys=load_rover_public_keys(certs.root), log_level="critical").start()
    result.lines.append(f"release server {server.url} (TLS, {len(names)} rover keys)")

    rclpy.init()
    sim = SimNode(parameter_overrides=[
        Parameter("seed", value=seed), Parameter("style", value=style), Parameter("rover_names", value=names),
        Parameter("camera_rate_hz", value=3.0), Parameter("camera_width", value=320),
        Parameter("camera_height", value=240)])
    depth_nodes = {n: DepthNode(namespace=n, parameter_overrides=[Parameter("model_path", value=str(running_model))])
                   for n in names}
    collab_nodes = {n: CollabNode(namespace=n, parameter_overrides=[
        Parameter("dataset_dir", value=str(folders[n])), Parameter("models_dir", value=str(out / "rovers" / n)),
        Parameter("model_source", value=server.url),
        Parameter("release_public_key", value=str(registry.public_key_path)),
        Parameter("root_certificates", value=str(certs.ca_cert)),
        Parameter("auth_private_key", value=str(certs.rover(n).auth_key)), Parameter("rover_id", value=n),
        Parameter("holdout_fraction", value=holdout_fraction), Parameter("poll_period_s", value=1.0),
        Parameter("release_wait_s", value=2.0), Parameter("release_report_period_s", value=2.0),
        Parameter("service_timeout_s", value=30.0)]) for n in names}
    listener = rclpy.create_node("release_listener")
    # a frame is scored once its colour image, measured depth and depth_node output have all arrived (in any order)
    pending: dict[str, dict[tuple[int, int], dict[str, Image]]] = {n: {} for n in names}
    # both models on the same live frames (the listener runs them itself): a fair comparison of the two
    engines = {"shipped": load_engine(running_model, threads=1), "released": load_engine(onnx, threads=1)}
    same = {m: {n: MetricAccumulator(0.1, 10.0) for n in names} for m in engines}
    scores = {n: {"before": MetricAccumulator(0.1, 10.0), "after": MetricAccumulator(0.1, 10.0)} for n in names}
    frames = {n: {"before": 0, "after": 0} for n in names}
    swapped: dict[str, bool] = dict.fromkeys(names, False)

    def stamp(msg: Image) -> tuple[int, int]:
        return msg.header.stamp.sec, msg.header.stamp.nanosec

    def score(name: str, parts: dict[str, Image]) -> None:
        msg, measured, rgb = parts["depth"], parts["truth"], parts["rgb"]
        phase = "after" if swapped[name] else "before"
        gt = np.nan_to_num(array_from_image(measured), nan=0.0)
        predicted = array_from_image(msg)
        scores[name][phase].update(np.where(np.isfinite(predicted), predicted, 10.0), gt)
        frames[name][phase] += 1
        image = array_from_image(rgb)
        for model, engine in engines.items():
            other = np.asarray(engine.predict(image), np.float32)
            same[model][name].update(np.where(np.isfinite(other), other, 10.0), gt)

    def arrive(name: str, part: str):  # noqa: ANN202 - a subscription callback
        def callback(msg: Image) -> None:
            parts = pending[name].setdefault(stamp(msg), {})
            parts[part] = msg
            if len(parts) == 3:
                score(name, pending[name].pop(stamp(msg)))
            while len(pending[name]) > 60:  # frames depth_node skipped never complete: forget the oldest
                pending[name].pop(next(iter(pending[name])))
        return callback

    sensor_qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.BEST_EFFORT)
    for n in names:
        listener.create_subscription(Image, f"/{n}/{topics.CAMERA_DEPTH}", arrive(n, "truth"), sensor_qos)
        listener.create_subscription(Image, f"/{n}/{topics.CAMERA_IMAGE}", arrive(n, "rgb"), sensor_qos)
        listener.create_subscription(Image, f"/{n}/{topics.DEPTH_IMAGE}", arrive(n, "depth"), sensor_qos)
    nodes = [sim, *depth_nodes.values(), *collab_nodes.values(), listener]
    executor = SingleThreadedExecutor()
    for node in nodes:
        executor.add_node(node)
    t0 = time.perf_counter()
    seen_audit = len(registry.audit())
    promoted_at = None
    done_at = None
    next_print = t0 + progress_every_s

    def elapsed() -> float:
        return time.perf_counter() - t0

    try:
        while True:
            executor.spin_once(timeout_sec=0.05)
            for n in names:
                # depth_node accepts a model_path only once it has loaded it: a changed value is the swap
                if not swapped[n] and depth_nodes[n].get_parameter("model_path").value != str(running_model):
                    swapped[n] = True
                    result.swapped_at[n] = elapsed()
            if promoted_at is None and elapsed() >= before_s and all(frames[n]["before"] for n in names):
                registry.promote(result.release, stages=[34, 100],
                                 thresholds=Thresholds(soak_s=4.0, min_reports=2, max_latency_ratio=2.0,
                                                       min_rate_ratio=0.5, stage_timeout_s=120.0))
                promoted_at = elapsed()
                result.lines.append(f"{promoted_at:5.1f} s  promoted {result.release}: one canary rover first, "
                                    "the rest once it reports healthy")
            for entry in registry.audit()[seen_audit:]:
                seen_audit += 1
                if entry["action"] == "promote":
                    continue
                detail = entry["detail"].get("reason") or ""
                if entry["action"] == "installed":
                    detail = (f"gate AbsRel {entry['detail'].get('gate_absrel_before', float('nan')):.3f} -> "
                              f"{entry['detail'].get('gate_absrel', float('nan')):.3f} on its held-out segments")
                elif entry["action"] == "advance":
                    detail = f"stage {entry['detail']['stage'] + 1}: every rover ({entry['detail']['percent']:g} %)"
                line = f"{elapsed():5.1f} s  {entry['actor']}: {entry['action']}" + (f" ({detail})" if detail else "")
                result.lines.append(line)
                print(f"  {line}", flush=True)
            state = registry.status()["rollouts"][0]["state"] if promoted_at is not None else "active"
            if done_at is None and state != "active":
                done_at, result.state = elapsed(), state
            if done_at is not None and (elapsed() - done_at >= after_s or state == "rolled_back"):
                break
            if promoted_at is not None and elapsed() - promoted_at > timeout_s:
                result.state = "timed out"
                result.lines.append(f"the rollout did not finish within {timeout_s:.0f} s")
                break
            if time.perf_counter() >= next_print:
                next_print += progress_every_s
                print(f"  {elapsed():5.1f} s  live frames scored: " + ", ".join(
                    f"{n} {frames[n]['before']}/{frames[n]['after']}" for n in names) + " (before/after its swap)",
                      flush=True)
        result.bytes_pulled = sum(c.agent.source.client.bytes_downloaded for c in collab_nodes.values())
    finally:
        close_nodes(executor, nodes)
        server.stop()
    result.wall_s = elapsed()
    for n in names:
        for phase in ("before", "after"):
            if frames[n][phase]:
                getattr(result, phase)[n] = {**scores[n][phase].result(), "frames": float(frames[n][phase])}
        if frames[n]["before"] + frames[n]["after"]:
            for model in engines:
                result.same_frames.setdefault(model, {})[n] = {
                    **same[model][n].result(), "frames": float(frames[n]["before"] + frames[n]["after"])}
    result.audit = registry.audit()
    result.timeline = plot_timeline(registry, out / "release_timeline.png")
    return result
