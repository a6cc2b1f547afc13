"""The demo's steps in order, with what each measured printed as it goes."""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np

from forest_perception.rosenv import apply_loopback_environment

SWARM_STYLE = "clustered_regrowth"
"""The new forest of the swarm steps: a style kept out of all training of the shipped networks."""


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


def drive_section(drive, model: str, seconds: float):  # noqa: ANN001, ANN201 - DriveResult -> Section
    """The single-rover drive in the report."""
    from forest_perception.demo.report import Section

    section = Section(f"2. One rover over ROS 2 for {seconds:.0f} s: sim_node, depth_node, sensor_sync_node, "
                      "capture_node")
    section.text(f"Simulated {drive.sim_s:.1f} s in {drive.wall_s:.1f} s wall (real-time factor "
                 f"{drive.sim_s / max(drive.wall_s, 1e-9):.2f}).")
    section.table(["topic", "Hz"], [[f"/rover_0/{t}", float(r)] for t, r in drive.rates.items()])
    if drive.live is not None:
        section.text(f"depth_node ({model}) live against the simulated RealSense depth: AbsRel "
                     f"{drive.live['absrel']:.3f}, RMSE {drive.live['rmse']:.2f} m, delta1 {drive.live['delta1']:.3f} "
                     f"over {drive.depth_images} depth images.")
    return section


def swarm_section(out: Path, swarm: dict):  # noqa: ANN201 - Section
    """Recording, data kept and FedAvg rounds in the report."""
    from forest_perception.demo.report import Section, folder_bytes, plot_data_kept, plot_rounds

    recording, fl = swarm["recording"], swarm["result"]
    section = Section("4. The swarm records a new forest and learns together (FedAvg from the shipped weights)")
    section.lines(recording.lines())
    bags = {r: folder_bytes(out / "federated" / "swarm" / "bags" / r) for r in recording.folders}
    kept = {r: folder_bytes(f) for r, f in recording.folders.items()}
    everything = {r: g.get("bytes_written", 0) + g.get("bytes_discarded", 0) for r, g in recording.source.items()}
    if recording.source:
        section.text("Each rover kept at the source only the frames its trigger_node marked (sharp, novel, or where "
                     "its depth disagreed with the measured depth): capture_node wrote those frame sets with their "
                     "sensor context and discarded the rest in memory.")
    section.image(plot_data_kept(recording.frames, bags, kept, out / "data_kept.png", everything or None),
                  "per rover: what recording everything would have written, what the marked bag holds, and what "
                  "curation kept for training")
    section.table(["round", "updates accepted", "train loss", "wall s", "MB down", "MB up"],
                  [[r["round"], f"{r['num_accepted']}/{r['num_selected']}",
                    float((r.get("train_metrics") or {}).get("train-loss", float("nan"))), float(r["wall_s"]),
                    r["bytes_down"] / 1e6, r["bytes_up"] / 1e6] for r in fl.rounds])
    if swarm["accuracy"]:
        section.image(plot_rounds(swarm["accuracy"], fl.rounds, out / "rounds.png"),
                      f"global model on the rovers' held-out segments ({swarm['held_out_frames']} frames) and bytes "
                      "per round")
        section.table(["round", "AbsRel", "delta1", "RMSE m"],
                      [[k, v["absrel"], v["delta1"], v["rmse"]] for k, v in sorted(swarm["accuracy"].items())])
    return section


def release_section(out: Path, release):  # noqa: ANN001, ANN201 - ReleaseDemo -> Section
    """The release, its timeline and the live accuracy before/after in the report."""
    from forest_perception.demo.report import Section, plot_before_after

    section = Section("5. The release: signed, canary first, gated and hot-swapped on every rover")
    section.text(f"Rollout {release.state} in {release.wall_s:.0f} s; the rovers pulled "
                 f"{release.bytes_pulled / 1e6:.1f} MB in all.")
    section.lines(release.lines)
    section.image(release.timeline, "release timeline: what the coordinator did and what each rover reported")
    rows = []
    for rover in sorted(set(release.before) | set(release.after)):
        before, after = release.before.get(rover, {}), release.after.get(rover, {})
        rows.append([rover, before.get("absrel", float("nan")), after.get("absrel", float("nan")),
                     before.get("delta1", float("nan")), after.get("delta1", float("nan")),
                     int(before.get("frames", 0)), int(after.get("frames", 0))])
    section.table(["rover", "AbsRel before", "AbsRel after", "delta1 before", "delta1 after", "frames before",
                   "frames after"], rows)
    shipped, released = release.same_frames.get("shipped", {}), release.same_frames.get("released", {})
    if shipped:
        section.text("Before and after are different stretches of each rover's drive; the demo also ran both models "
                     "itself on the same live frames:")
        section.table(["rover", "frames", "AbsRel shipped", "AbsRel released", "delta1 shipped", "delta1 released"],
                      [[r, int(shipped[r]["frames"]), shipped[r]["absrel"], released[r]["absrel"],
                        shipped[r]["delta1"], released[r]["delta1"]] for r in sorted(shipped)])
    if release.after:
        section.image(plot_before_after(release.before, release.after, out / "live_before_after.png"),
                      "live depth accuracy of each rover before and after its swap")
    return section


def release_step(out: Path, swarm: dict, args: argparse.Namespace):  # noqa: ANN201 - demo.release.ReleaseDemo
    """Export the swarm's last round, release it canary first to rovers driving a new forest of the same style."""
    from forest_perception.demo.federated import export_last_round
    from forest_perception.demo.release import release_to_swarm
    from forest_perception.models.weights import shipped_model

    for stale in ("release", "registry", "rovers", "certs"):
        shutil.rmtree(out / stale, ignore_errors=True)  # a demo run starts from scratch
    onnx = export_last_round(swarm["result"].state_db, swarm["task"], out / "release" / "swarm_fedavg.onnx",
                             swarm["accuracy"])
    print(f"  exported the last round: {onnx} (+ card, checkpoint)")
    seed = args.swarm_seed
    print(f"  the rovers drive on in the {SWARM_STYLE} forest they recorded (seed {seed}), depth_node on the shipped "
          "autoencoder_160x128")
    result = release_to_swarm(out, swarm["recording"].folders, onnx, shipped_model("autoencoder_160x128"), seed,
                              SWARM_STYLE, holdout_fraction=float(swarm["run_config"]["holdout-fraction"]))
    for line in result.lines[:2]:
        print(f"  {line}")
    print(f"  rollout {result.state} in {result.wall_s:.0f} s; {result.bytes_pulled / 1e6:.1f} MB pulled by the rovers "
          f"in all; timeline {result.timeline}")
    for rover in sorted(swarm["recording"].folders):
        before, after = result.before.get(rover), result.after.get(rover)
        if before and after:
            print(f"  {rover}: live depth absrel {before['absrel']:.3f} -> {after['absrel']:.3f}, delta1 "
                  f"{before['delta1']:.3f} -> {after['delta1']:.3f} ({before['frames']:.0f} / {after['frames']:.0f} "
                  f"frames; swapped at {result.swapped_at.get(rover, float('nan')):.0f} s)")
        else:
            print(f"  {rover}: not swapped (live absrel {before['absrel']:.3f} on the shipped model)" if before
                  else f"  {rover}: no live depth scored")
    shipped, released = result.same_frames.get("shipped", {}), result.same_frames.get("released", {})
    for rover in sorted(shipped):
        print(f"  {rover}, both models on the same {shipped[rover]['frames']:.0f} live frames: absrel shipped "
              f"{shipped[rover]['absrel']:.3f}, released {released[rover]['absrel']:.3f}; delta1 "
              f"{shipped[rover]['delta1']:.3f} vs {released[rover]['delta1']:.3f}")
    return result


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
    parser.add_argument("--swarm-seed", type=int, default=11, help="seed of the new forest the swarm records")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = apply_loopback_environment(int(os.environ.get("ROS_DOMAIN_ID") or random.randint(30, 99)), out / "ros_log")
    print(f"ROS_DOMAIN_ID={env['ROS_DOMAIN_ID']} ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST, "
          f"DDS profile {env['FASTDDS_DEFAULT_PROFILES_FILE']}")

    from forest_perception.demo.dataset import bag_to_dataset, synthetic_dataset
    from forest_perception.demo.drive import drive_over_ros
    from forest_perception.demo.federated import federated_swarm
    from forest_perception.demo.report import Section, write_report
    from forest_perception.models.weights import shipped_model
    from forest_perception.sim.gazebo import export_gazebo
    from forest_perception.sim.preview import contact_sheet, save_rgb, world_map
    from forest_perception.sim.world import generate_world

    started = time.perf_counter()
    model = shipped_model(args.model)
    _banner(f"1. Forest from seed {args.seed}")
    world = generate_world(seed=args.seed)
    for key, value in world.summary().items():
        print(f"  {key:>18}: {value:.3g}" if isinstance(value, float) else f"  {key:>18}: {value}")
    sections = [Section(f"1. Forest from seed {args.seed}").table(["property", "value"], list(world.summary().items()))]

    _banner(f"2. sim_node + depth_node + sensor_sync_node + capture_node: one rover exploring for "
            f"{args.drive_seconds:.0f} s over ROS 2 (loopback), recorded to a bag")
    bag_dir = out / "bags" / "rover_0_drive"
    for stale in (out / "bags", out / "recorded", out / "curated"):
        shutil.rmtree(stale, ignore_errors=True)  # a demo run starts from scratch
    drive = drive_over_ros(args.seed, args.drive_seconds, "sunny", str(model), bag_dir=bag_dir)
    _print_drive(drive, model.stem, bag_dir)
    sections.append(drive_section(drive, model.stem, args.drive_seconds))

    _banner("3. The recorded bag -> extracted, curated, split, validated dataset with a report")
    dataset_lines = bag_to_dataset(bag_dir, out)
    for line in dataset_lines:
        print(f"  {line}")
    sections.append(Section("3. The recorded bag as a curated dataset").lines(dataset_lines))

    _banner(f"4. Adapting to a new forest: {args.swarm_rovers} rovers record a clustered_regrowth forest (kept out "
            f"of all training) over ROS 2, keeping at the source the frames trigger_node marks, then FedAvg from the "
            f"shipped autoencoder_160x128 on Flower (Ray, 127.0.0.1)")
    shutil.rmtree(out / "federated", ignore_errors=True)
    swarm = federated_swarm(out / "federated", rovers=args.swarm_rovers, rounds=args.swarm_rounds,
                            seconds=args.swarm_seconds, seed=args.swarm_seed, style=SWARM_STYLE)
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
    sections.append(swarm_section(out, swarm))

    _banner("5. The swarm's model goes out as a signed release: canary first, gated and hot-swapped on every rover, "
            "live depth scored before and after")
    release = release_step(out, swarm, args)
    sections.append(release_section(out, release))

    _banner("6. Gazebo export of the same forest")
    export = export_gazebo(world, out / "gazebo", rover_names=("rover_0",), overwrite=True)  # a demo run starts anew
    print(f"  {export.world_sdf}")
    print(f"  {export.bridge_yaml}")

    _banner("7. Synthetic dataset in the low-viewpoint forest dataset layout")
    lines, samples, poses = synthetic_dataset(out / "dataset", args.seed, args.frames)
    for line in lines:
        print(f"  {line}")

    _banner("8. Pictures")
    map_path, sheet_path = out / "forest_map.png", out / "frames.png"
    save_rgb(str(map_path), world_map(world, [np.array(drive.track)], marks=poses))
    save_rgb(str(sheet_path), contact_sheet([(r, d) for r, d, _ in samples[:6]], [lbl for *_, lbl in samples[:6]]))
    print(f"  {map_path}: top-down map, the ROS drive in red, dataset frames as crosses")
    print(f"  {sheet_path}: dataset frames, RGB | depth (red near, blue far, black invalid)")
    sections.append(Section("6-8. Gazebo export, synthetic dataset, pictures")
                    .text(f"Gazebo world {export.world_sdf}, bridge {export.bridge_yaml}.").lines(lines)
                    .image(map_path, "top-down map: the ROS drive in red, dataset frames as crosses")
                    .image(sheet_path, "dataset frames, RGB | depth (red near, blue far, black invalid)"))
    report = write_report(out / "report.html", "forest_perception: a simulated swarm, end to end", sections,
                          time.perf_counter() - started)
    print(f"\nRun report: {report}")
    print(f"Done in {(time.perf_counter() - started) / 60:.1f} min. Everything is under {out}")
    return 0
