"""``make demo``: a forest, a rover exploring it over ROS 2 on loopback, its recording curated into a dataset.

Steps: generate a forest from a seed and print its stand statistics; run ``sim_node``,
``depth_node`` (live accuracy against the simulated depth camera), ``sensor_sync_node`` and
``capture_node`` in-process with one exploring rover, recording its topics to an MCAP bag; turn
the bag into a dataset (extract, curate, split, validate, HTML report); export the same forest
for Gazebo; render a small synthetic dataset in the low-viewpoint forest dataset layout and
read it back; draw a map and a contact sheet.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from forest_perception.rosenv import apply_loopback_environment


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def drive_over_ros(
    seed: int, seconds: float, weather: str, model_path: str | None = None, bag_dir: Path | None = None
) -> dict:
    """Run sim_node with one exploring rover, sensor_sync_node, depth_node when a model is given and
    capture_node when ``bag_dir`` is given (recording the rover's topics there); count what arrives."""
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from nav_msgs.msg import Odometry
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import CameraInfo, Image, Imu, JointState, NavSatFix

    from forest_perception.nodes.sensor_sync_node import SensorSyncNode
    from forest_perception.nodes.sim_node import SimNode

    rclpy.init()
    counts: dict[str, int] = defaultdict(int)
    last: dict[str, object] = {}
    sim = SimNode(parameter_overrides=[Parameter("seed", value=seed), Parameter("weather", value=[weather])])
    listener = rclpy.create_node("demo_listener")
    sync_node = SensorSyncNode(namespace="rover_0", parameter_overrides=[Parameter("use_sim_time", value=True)])
    capture = None
    if bag_dir is not None:
        from forest_perception.nodes.capture_node import CaptureNode

        capture = CaptureNode(namespace="rover_0", parameter_overrides=[
            Parameter("output_dir", value=str(bag_dir.parent)),
            Parameter("bag_name", value=bag_dir.name),
            Parameter("max_split_duration_s", value=10.0),
            Parameter("min_free_space_mb", value=256),
        ])
    depth_node = None
    live = None
    if model_path is not None:
        from forest_perception.models.metrics import MetricAccumulator
        from forest_perception.msgs import array_from_image
        from forest_perception.nodes.depth_node import DepthNode

        depth_node = DepthNode(namespace="rover_0", parameter_overrides=[Parameter("model_path", value=model_path)])
        live = MetricAccumulator(min_depth=0.1, max_depth=10.0)
        sensor_by_stamp: dict[tuple[int, int], object] = {}

        def on_sensor_depth(msg: Image) -> None:
            sensor_by_stamp[(msg.header.stamp.sec, msg.header.stamp.nanosec)] = msg
            while len(sensor_by_stamp) > 60:
                sensor_by_stamp.pop(next(iter(sensor_by_stamp)))

        def on_predicted(msg: Image) -> None:
            counts["/rover_0/depth/image"] += 1
            truth = sensor_by_stamp.get((msg.header.stamp.sec, msg.header.stamp.nanosec))
            if truth is not None:
                pred = array_from_image(msg)
                live.update(np.where(np.isfinite(pred), pred, 10.0), np.nan_to_num(array_from_image(truth), nan=0.0))

    topics = {
        "/rover_0/camera/image_raw": Image,
        "/rover_0/camera/camera_info": CameraInfo,
        "/rover_0/camera/depth/image_raw": Image,
        "/rover_0/imu/data": Imu,
        "/rover_0/gps/fix": NavSatFix,
        "/rover_0/joint_states": JointState,
        "/rover_0/odom": Odometry,
        "/rover_0/odom/fused": Odometry,
        "/rover_0/sync/image": Image,
        "/clock": Clock,
        "/diagnostics": DiagnosticArray,
    }

    def make_cb(name: str):  # noqa: ANN202
        def cb(msg: object) -> None:
            counts[name] += 1
            last[name] = msg

        return cb

    # best effort like the publishers' sensor QoS, with a deep queue so the demo's own listener drops nothing
    sensor_qos = QoSProfile(depth=500, reliability=ReliabilityPolicy.BEST_EFFORT)
    reliable = ("/clock", "/diagnostics", "/rover_0/odom", "/rover_0/joint_states", "/rover_0/odom/fused")
    for name, kind in topics.items():
        qos = QoSProfile(depth=100) if name in reliable else sensor_qos
        listener.create_subscription(kind, name, make_cb(name), qos)
    if depth_node is not None:
        listener.create_subscription(Image, "/rover_0/camera/depth/image_raw", on_sensor_depth, sensor_qos)
        listener.create_subscription(Image, "/rover_0/depth/image", on_predicted, sensor_qos)
    executor = SingleThreadedExecutor()
    executor.add_node(sim)
    executor.add_node(listener)
    executor.add_node(sync_node)
    for extra in (depth_node, capture):
        if extra is not None:
            executor.add_node(extra)
    t0 = time.perf_counter()
    sim_t0 = sim.sim.time_s
    next_print = t0 + 5.0
    track = []
    while time.perf_counter() - t0 < seconds:
        executor.spin_once(timeout_sec=0.05)
        st = sim.sim.rovers[0].state
        track.append((st.x, st.y))
        if time.perf_counter() >= next_print:
            st = sim.sim.rovers[0].state
            print(
                f"  t_sim={sim.sim.time_s:6.1f} s  rover at ({st.x:6.2f}, {st.y:6.2f}) m  "
                f"v={st.v:4.2f} m/s  frames={counts['/rover_0/camera/image_raw']}"
                + (
                    f"  depth_node: {counts['/rover_0/depth/image']} depth images, live absrel "
                    f"{live.result()['absrel']:.3f} delta1 {live.result()['delta1']:.3f}"
                    if live is not None and counts["/rover_0/depth/image"]
                    else ""
                ),
                flush=True,
            )
            next_print += 5.0
    wall = time.perf_counter() - t0
    sim_elapsed = sim.sim.time_s - sim_t0
    state = sim.sim.rovers[0].state
    capture_stats = None
    if capture is not None:
        capture.stop()
        capture_stats = capture.last_stats
    sync_summary = sync_node.sync.summary()
    result = {
        "wall_s": wall,
        "sim_s": sim_elapsed,
        "rates": {k: counts[k] / max(sim_elapsed, 1e-9) for k in topics},
        "gps": last.get("/rover_0/gps/fix"),
        "odom": last.get("/rover_0/odom"),
        "final_pose": (state.x, state.y, state.yaw),
        "collided": state.collided,
        "track": track,
        "live": live.result() if live is not None and counts["/rover_0/depth/image"] else None,
        "depth_images": counts["/rover_0/depth/image"],
        "fused": last.get("/rover_0/odom/fused"),
        "sync": sync_summary,
        "capture": capture_stats,
    }
    for extra in (depth_node, capture, sync_node):
        if extra is not None:
            extra.destroy_node()
    executor.shutdown()
    listener.destroy_node()
    sim.destroy_node()
    rclpy.try_shutdown()
    return result


def federated_swarm(out: Path, rovers: int = 3, rounds: int = 4, frames: int = 24) -> dict:
    """A swarm of ``rovers`` simulated rovers (own forest, weather) through FedAvg rounds on Flower's Ray
    simulation; the global depth model's accuracy on a held-out forest before and after."""
    import torch

    from forest_perception.collab.flower.simulation import (
        SimulationSpec,
        ensure_rover_data,
        make_population,
        run_simulation,
    )
    from forest_perception.collab.flower.store import CoordinatorStore
    from forest_perception.collab.flower.task import (
        TaskConfig,
        build_model,
        evaluate,
        load_local_data,
        merge_run_config,
        set_arrays,
    )

    run_config = {"num-server-rounds": rounds, "algorithm": "fedavg", "base-channels": 8, "local-epochs": 2,
                  "lr": 0.003, "input-height": 64, "input-width": 80, "fraction-evaluate": 1.0}
    spec = SimulationSpec(out_dir=out, num_rovers=rovers, run_config=run_config, frames_per_rover=frames,
                          data_source="synth", availability=(1.0, 1.0), client_cpus=1.0)
    result = run_simulation(spec)
    # a held-out rover in a forest none of the swarm drove in
    held_out = make_population(1, out / "held_out", seed=99, frames=frames, availability=(1.0, 1.0))
    ensure_rover_data(held_out.rovers[0], 80, 64, "synth")
    config = TaskConfig.from_run_config(merge_run_config(run_config))
    data = load_local_data(held_out.rovers[0].data_dir, config)
    images = torch.cat([data.train_images, data.val_images]) if not data.val_is_train else data.train_images
    depth = torch.cat([data.train_depth, data.val_depth]) if not data.val_is_train else data.train_depth
    model = build_model(config)
    accuracy = {}
    with CoordinatorStore(result.state_db, readonly=True) as store, torch.no_grad():
        for label, server_round in (("before", 0), ("after", result.rounds[-1]["round"])):
            names, params = store.model(server_round)
            set_arrays(model, names, params)
            accuracy[label] = evaluate(model, images, depth, config)
    return {"result": result, "accuracy": accuracy, "held_out_frames": int(images.shape[0])}


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns a process exit code."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo_output", help="where the dataset and exports go")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--drive-seconds", type=float, default=20.0, help="wall seconds of ROS driving")
    parser.add_argument("--frames", type=int, default=24, help="frames per dataset segment")
    parser.add_argument("--model", default="multiscale_320x240.onnx", help="shipped depth model (models/weights)")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = apply_loopback_environment(int(os.environ.get("ROS_DOMAIN_ID") or random.randint(30, 99)), out / "ros_log")
    print(
        f"ROS_DOMAIN_ID={env['ROS_DOMAIN_ID']} ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST, "
        f"DDS profile {env['FASTDDS_DEFAULT_PROFILES_FILE']}"
    )

    from forest_perception.dataset_tools.layout import dataset_summary, load_frame, read_segment
    from forest_perception.dataset_tools.synth import SynthConfig, synthesize
    from forest_perception.models.weights import shipped_model
    from forest_perception.sim.gazebo import export_gazebo
    from forest_perception.sim.preview import contact_sheet, save_rgb, world_map
    from forest_perception.sim.world import generate_world

    _banner(f"1. Forest from seed {args.seed}")
    world = generate_world(seed=args.seed)
    for key, value in world.summary().items():
        print(f"  {key:>18}: {value:.3g}" if isinstance(value, float) else f"  {key:>18}: {value}")

    _banner(
        f"2. sim_node + depth_node + sensor_sync_node + capture_node: one rover exploring for "
        f"{args.drive_seconds:.0f} s over ROS 2 (loopback), recorded to a bag"
    )
    model = shipped_model(args.model)
    bag_dir = out / "bags" / "rover_0_drive"
    for stale in (out / "bags", out / "recorded", out / "curated"):
        shutil.rmtree(stale, ignore_errors=True)  # a demo run starts from scratch
    result = drive_over_ros(
        args.seed, args.drive_seconds, "sunny", str(model), bag_dir=bag_dir
    )
    print(
        f"  simulated {result['sim_s']:.1f} s in {result['wall_s']:.1f} s wall "
        f"(real-time factor {result['sim_s'] / result['wall_s']:.2f})"
    )
    for topic, rate in result["rates"].items():
        print(f"  {topic:<34} {rate:7.1f} Hz")
    gps = result["gps"]
    if gps is not None:
        sigma = math.sqrt(gps.position_covariance[0])
        print(
            f"  last GPS fix: {gps.latitude:.7f}, {gps.longitude:.7f}, status {gps.status.status}, sigma {sigma:.1f} m"
        )
    if result["live"] is not None:
        m = result["live"]
        print(
            f"  depth_node ({args.model}): {result['depth_images']} depth images; live accuracy against the "
            f"simulated RealSense depth: absrel {m['absrel']:.3f}, rmse {m['rmse']:.2f} m, delta1 {m['delta1']:.3f}"
        )
    x, y, _ = result["final_pose"]
    print(f"  rover ended at ({x:.2f}, {y:.2f}) m, collided: {result['collided']}")
    fused, odom = result["fused"], result["odom"]
    if fused is not None and odom is not None:
        fx, fy = fused.pose.pose.position.x, fused.pose.pose.position.y
        ox, oy = odom.pose.pose.position.x, odom.pose.pose.position.y
        print(
            f"  sensor_sync_node: {result['sync']['frames_released']} synchronised frame sets, fused odometry "
            f"({fx:.2f}, {fy:.2f}) m vs sim wheel odometry ({ox:.2f}, {oy:.2f}) m, "
            f"clock resets {result['sync']['clock_resets']}"
        )
    if result["capture"] is not None:
        c = result["capture"]
        print(f"  capture_node: {c.written} messages written, {c.dropped} dropped, {c.bytes_written / 1e6:.1f} MB "
              f"in {len(c.files)} file(s) -> {bag_dir}")

    _banner("3. The recorded bag -> extracted, curated, split, validated dataset with a report")
    from forest_perception.dataset_tools.bags import bag_info
    from forest_perception.dataset_tools.curate import CurateConfig, curate
    from forest_perception.dataset_tools.extract import ExtractConfig, extract_bag
    from forest_perception.dataset_tools.report import build_report
    from forest_perception.dataset_tools.split import split_dataset, write_splits
    from forest_perception.dataset_tools.validate import validate_dataset

    info = bag_info(bag_dir)
    print(f"  bag: {len(info.files)} MCAP file(s), {info.message_count} messages, {info.duration_ns / 1e9:.1f} s, "
          f"{len(info.topics)} topics, {'no problems' if info.ok else '; '.join(info.problems)}")
    extracted = extract_bag(bag_dir, out / "recorded", ExtractConfig(run=1, segment_frames=40))
    for line in extracted.lines()[1:]:
        print(f"  {line.strip()}")
    curated = curate(out / "recorded", out / "curated", CurateConfig(fraction=0.4))
    for line in curated.lines():
        print(f"  curate: {line}")
    try:
        split = split_dataset(out / "curated", by="segment", fractions=(0.6, 0.2, 0.2), seed=0)
        write_splits(split, overwrite=True)
        for line in split.lines():
            print(f"  {line.strip()}")
    except ValueError as exc:  # a very short drive: too few segments to fill three splits
        print(f"  split skipped: {exc}")
    validation = validate_dataset(out / "curated")
    print(f"  validate: {len(validation.errors)} error(s), {len(validation.warnings)} warning(s)")
    report_path = build_report(out / "curated", out / "dataset_report.html", overwrite=True)
    print(f"  report: {report_path}")

    _banner("4. Federated learning: a swarm of 3 simulated rovers, FedAvg rounds on Flower (Ray, 127.0.0.1)")
    shutil.rmtree(out / "federated", ignore_errors=True)
    swarm = federated_swarm(out / "federated")
    fl = swarm["result"]
    print(f"  rover data rendered in {fl.data_s:.1f} s; {len(fl.rounds)} rounds in {fl.wall_s:.1f} s; "
          f"coordinator state in {fl.state_db}")
    for r in fl.rounds:
        train = r.get("train_metrics") or {}
        print(f"  round {r['round']}: {r['num_accepted']} of {r['num_selected']} updates accepted, "
              f"train loss {train.get('train-loss', float('nan')):.3f}, {r['wall_s']:.1f} s, "
              f"{r['bytes_up'] / 1e3:.0f} kB up")
    before, after = swarm["accuracy"]["before"], swarm["accuracy"]["after"]
    print(f"  global model on a held-out forest ({swarm['held_out_frames']} frames, 80x64): "
          f"absrel {before['absrel']:.3f} -> {after['absrel']:.3f}, delta1 {before['delta1']:.3f} -> "
          f"{after['delta1']:.3f}")

    _banner("5. Gazebo export of the same forest")
    export = export_gazebo(world, out / "gazebo", rover_names=("rover_0",))
    print(f"  {export.world_sdf}")
    for path in export.bridge_yamls if hasattr(export, "bridge_yamls") else [export.bridge_yaml]:
        print(f"  {path}")

    _banner("6. Synthetic dataset in the low-viewpoint forest dataset layout")
    config = SynthConfig(
        runs=1,
        segments_per_run=2,
        frames_per_segment=args.frames,
        seed=args.seed,
        weathers=("sunny", "fog"),
    )
    samples = []
    poses = []

    def keep(path, record, rgb, depth):  # noqa: ANN001
        poses.append((record.extras["pose_x"], record.extras["pose_y"]))
        if int(record.stem) % 8 == 0:
            samples.append((rgb, depth, f"{path.parent.name}/{path.name} {record.stem} {record.extras['weather']}"))

    report = synthesize(out / "dataset", config, overwrite=True, on_frame=keep)
    for line in report.lines():
        print(f"  {line}")
    summary = dataset_summary(out / "dataset")
    print(f"  read back: {summary['runs']} run(s), {summary['segments']} segment(s), {summary['frames']} frames")
    segment = read_segment(out / "dataset" / "Run-1" / "a")
    rgb, depth, record = load_frame(segment, len(segment) - 1)
    print(
        f"  last frame: rgb {rgb.shape} {rgb.dtype}, depth {depth.dtype} "
        f"median {float(_nanmedian(depth)):.2f} m, GPS {record.gps is not None}, "
        f"IMU az {record.imu.linear_acceleration[2]:.2f} m/s^2"
    )

    _banner("7. Pictures")
    map_path = out / "forest_map.png"
    save_rgb(str(map_path), world_map(world, [np.array(result["track"])], marks=poses))
    sheet_path = out / "frames.png"
    save_rgb(str(sheet_path), contact_sheet([(r, d) for r, d, _ in samples[:6]], [lbl for *_, lbl in samples[:6]]))
    print(f"  {map_path}: top-down map, the ROS drive in red, dataset frames as crosses")
    print(f"  {sheet_path}: dataset frames, RGB | depth (red near, blue far, black invalid)")
    print(f"\nDone. Everything is under {out}")
    return 0


def _nanmedian(array):  # noqa: ANN001, ANN202
    import numpy as np

    return np.nanmedian(array) if np.isfinite(array).any() else float("nan")


if __name__ == "__main__":
    raise SystemExit(main())
