"""The demo's steps in order, with what each measured printed as it goes."""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
from pathlib import Path

import numpy as np

from forest_perception.rosenv import apply_loopback_environment


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def _print_drive(result, model: str, bag_dir: Path) -> None:  # noqa: ANN001 - demo.drive.DriveResult
    print(f"  simulated {result.sim_s:.1f} s in {result.wall_s:.1f} s wall "
          f"(real-time factor {result.sim_s / max(result.wall_s, 1e-9):.2f})")
    for topic, rate in result.rates.items():
        print(f"  /rover_0/{topic:<28} {rate:7.1f} Hz")
    gps = result.last.get("gps/fix")
    if gps is not None:
        print(f"  last GPS fix: {gps.latitude:.7f}, {gps.longitude:.7f}, status {gps.status.status}, "
              f"sigma {math.sqrt(gps.position_covariance[0]):.1f} m")
    if result.live is not None:
        m = result.live
        print(f"  depth_node ({model}): {result.depth_images} depth images; live accuracy against the simulated "
              f"RealSense depth: absrel {m['absrel']:.3f}, rmse {m['rmse']:.2f} m, delta1 {m['delta1']:.3f}")
    if result.track:
        x, y = result.track[-1]
        print(f"  rover ended at ({x:.2f}, {y:.2f}) m (ground truth), collided: {result.collided}")
    fused, odom = result.last.get("odom/fused"), result.last.get("odom")
    if fused is not None and odom is not None:
        f, o = fused.pose.pose.position, odom.pose.pose.position
        print(f"  sensor_sync_node: {result.sync['frames_published']} synchronised frame sets, fused odometry "
              f"({f.x:.2f}, {f.y:.2f}) m vs sim wheel odometry ({o.x:.2f}, {o.y:.2f}) m, "
              f"clock resets {result.sync['clock_resets']}")
    if result.capture is not None:
        c = result.capture
        print(f"  capture_node: {c.written} messages written, {c.dropped} dropped, {c.bytes_written / 1e6:.1f} MB "
              f"in {len(c.files)} file(s) -> {bag_dir}")


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns a process exit code."""
    parser = argparse.ArgumentParser(prog="python -m forest_perception.demo",
                                     description="A simulated rover swarm, end to end, on this machine only.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="demo_output", help="where the dataset, bags and pictures go")
    parser.add_argument("--seed", type=int, default=3, help="forest seed")
    parser.add_argument("--drive-seconds", type=float, default=20.0, help="wall seconds of ROS driving")
    parser.add_argument("--frames", type=int, default=24, help="frames per synthetic dataset segment")
    parser.add_argument("--model", default="multiscale_320x240", help="shipped depth model (models/weights)")
    parser.add_argument("--swarm-rovers", type=int, default=3, help="rovers recording the new forest")
    parser.add_argument("--swarm-seconds", type=float, default=20.0, help="simulated seconds the swarm records")
    parser.add_argument("--swarm-rounds", type=int, default=3, help="FedAvg rounds from the shipped weights")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = apply_loopback_environment(int(os.environ.get("ROS_DOMAIN_ID") or random.randint(30, 99)), out / "ros_log")
    print(f"ROS_DOMAIN_ID={env['ROS_DOMAIN_ID']} ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST, "
          f"DDS profile {env['FASTDDS_DEFAULT_PROFILES_FILE']}")

    from forest_perception.demo.dataset import bag_to_dataset, synthetic_dataset
    from forest_perception.demo.drive import drive_over_ros
    from forest_perception.demo.federated import federated_swarm
    from forest_perception.models.weights import shipped_model
    from forest_perception.sim.gazebo import export_gazebo
    from forest_perception.sim.preview import contact_sheet, save_rgb, world_map
    from forest_perception.sim.world import generate_world

    model = shipped_model(args.model)
    _banner(f"1. Forest from seed {args.seed}")
    world = generate_world(seed=args.seed)
    for key, value in world.summary().items():
        print(f"  {key:>18}: {value:.3g}" if isinstance(value, float) else f"  {key:>18}: {value}")

    _banner(f"2. sim_node + depth_node + sensor_sync_node + capture_node: one rover exploring for "
            f"{args.drive_seconds:.0f} s over ROS 2 (loopback), recorded to a bag")
    bag_dir = out / "bags" / "rover_0_drive"
    for stale in (out / "bags", out / "recorded", out / "curated"):
        shutil.rmtree(stale, ignore_errors=True)  # a demo run starts from scratch
    drive = drive_over_ros(args.seed, args.drive_seconds, "sunny", str(model), bag_dir=bag_dir)
    _print_drive(drive, model.stem, bag_dir)

    _banner("3. The recorded bag -> extracted, curated, split, validated dataset with a report")
    for line in bag_to_dataset(bag_dir, out):
        print(f"  {line}")

    _banner(f"4. Adapting to a new forest: {args.swarm_rovers} rovers record a clustered_regrowth forest (kept out "
            f"of all training) over ROS 2, then FedAvg from the shipped autoencoder_160x128 on Flower (Ray, 127.0.0.1)")
    shutil.rmtree(out / "federated", ignore_errors=True)
    swarm = federated_swarm(out / "federated", rovers=args.swarm_rovers, rounds=args.swarm_rounds,
                            seconds=args.swarm_seconds)
    for line in swarm["recording"].lines():
        print(f"  {line}")
    for name, status in swarm["status"].items():
        print(f"  {name}: {status}")
    fl = swarm["result"]
    print(f"  {len(fl.rounds)} rounds in {fl.wall_s:.1f} s; coordinator state in {fl.state_db}")
    for r in fl.rounds:
        loss = (r.get("train_metrics") or {}).get("train-loss")
        print(f"  round {r['round']}: {r['num_accepted']} of {r['num_selected']} updates accepted, "
              f"train loss {float('nan') if loss is None else loss:.3f}, {r['wall_s']:.1f} s, "
              f"{r['bytes_up'] / 1e6:.1f} MB up")
    accuracy = swarm["accuracy"]
    if accuracy:
        before, after = accuracy[0], accuracy[max(accuracy)]
        print(f"  global model on the rovers' held-out segments ({swarm['held_out_frames']} frames): "
              f"absrel {before['absrel']:.3f} (shipped) -> {after['absrel']:.3f} (round {max(accuracy)}), "
              f"delta1 {before['delta1']:.3f} -> {after['delta1']:.3f}")
    else:
        print("  no rover held out any segment: nothing to score")

    _banner("5. Gazebo export of the same forest")
    export = export_gazebo(world, out / "gazebo", rover_names=("rover_0",), overwrite=True)  # a demo run starts anew
    print(f"  {export.world_sdf}")
    print(f"  {export.bridge_yaml}")

    _banner("6. Synthetic dataset in the low-viewpoint forest dataset layout")
    lines, samples, poses = synthetic_dataset(out / "dataset", args.seed, args.frames)
    for line in lines:
        print(f"  {line}")

    _banner("7. Pictures")
    map_path, sheet_path = out / "forest_map.png", out / "frames.png"
    save_rgb(str(map_path), world_map(world, [np.array(drive.track)], marks=poses))
    save_rgb(str(sheet_path), contact_sheet([(r, d) for r, d, _ in samples[:6]], [lbl for *_, lbl in samples[:6]]))
    print(f"  {map_path}: top-down map, the ROS drive in red, dataset frames as crosses")
    print(f"  {sheet_path}: dataset frames, RGB | depth (red near, blue far, black invalid)")
    print(f"\nDone. Everything is under {out}")
    return 0
