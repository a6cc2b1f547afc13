"""Several rovers drive one simulated forest over ROS 2 and record it; each rover's bag becomes its dataset folder.

The new-forest adaptation set-up (docs/experiments.md, "Adaptation to a new forest"): one ``sim_node`` with
``rover_names`` (the rovers start spread on a circle in the central clearing, each heading outward in its own
direction, so each explores its own part of the forest), one ``capture_node`` per rover namespace, then
``extract`` -> ``curate`` per bag: one dataset folder per rover in the public layout, with the segments that
:func:`forest_perception.collab.rover.holdout.rover_split` later splits into training and held-out ones.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

DONE_FILE = "recording.json"
"""Written last into a recording folder; a folder with it (and the same settings) is reused as it is."""


@dataclass(frozen=True)
class SwarmRecording:
    """What to record: the forest (seed, style), the rovers, how long and how densely."""

    seed: int = 11
    style: str = "clustered_regrowth"
    rovers: int = 4
    seconds: float = 60.0
    camera_rate_hz: float = 3.0
    segment_frames: int = 20
    camera_width: int = 320
    camera_height: int = 240
    triggers: bool = False  # keep at the source: depth_node + trigger_node mark frames, capture_node records marked
    trigger_model: str = "autoencoder_160x128_int8"  # depth_node's model for the disagreement trigger

    def rover_names(self) -> list[str]:
        """``rover_0`` ... ``rover_{n-1}``."""
        return [f"rover_{i}" for i in range(self.rovers)]

    def validate(self) -> SwarmRecording:
        """Raise ``ValueError`` naming the first bad field."""
        from forest_perception.sim.styles import STYLES

        if self.style not in STYLES:
            raise ValueError(f"style {self.style!r} is not a forest style; known: {', '.join(STYLES)}")
        if not 1 <= self.rovers <= 16:
            raise ValueError(f"rovers must be within 1..16, got {self.rovers}")
        if not self.seconds > 0 or not self.camera_rate_hz > 0:
            raise ValueError(f"seconds and camera_rate_hz must be > 0, got {self.seconds}, {self.camera_rate_hz}")
        if self.segment_frames < 2:
            raise ValueError(f"segment_frames must be >= 2, got {self.segment_frames}")
        return self


@dataclass
class SwarmResult:
    """Per rover: its dataset folder, frames and segments kept; the drive's wall/sim time and end positions."""

    folders: dict[str, Path]
    frames: dict[str, int] = field(default_factory=dict)
    segments: dict[str, int] = field(default_factory=dict)
    ends: dict[str, tuple[float, float]] = field(default_factory=dict)
    source: dict[str, dict[str, int]] = field(default_factory=dict)  # triggered capture: the gate's counters
    drive_wall_s: float = 0.0
    sim_s: float = 0.0
    dataset_s: float = 0.0
    reused: bool = False

    def lines(self) -> list[str]:
        """Human-readable summary, one line per rover."""
        out = [f"{'reused' if self.reused else 'recorded'} {len(self.folders)} rover(s): {self.sim_s:.0f} s simulated "
               f"in {self.drive_wall_s:.0f} s wall, datasets in {self.dataset_s:.0f} s"]
        for name, folder in self.folders.items():
            end = self.ends.get(name)
            where = f", ended at ({end[0]:.1f}, {end[1]:.1f}) m" if end else ""
            gate = self.source.get(name)
            kept = ""
            if gate:
                total = gate.get("bytes_written", 0) + gate.get("bytes_discarded", 0)
                kept = (f", {gate.get('marks', 0) - gate.get('late_marks', 0)} frames marked at the source: "
                        f"{gate.get('bytes_written', 0) / 1e6:.1f} of {total / 1e6:.1f} MB written")
            out.append(f"{name}: {self.frames.get(name, 0)} frames in {self.segments.get(name, 0)} segment(s)"
                       f"{where}{kept} -> {folder}")
        return out


def drive_swarm(spec: SwarmRecording, bags: Path, progress_every_s: float = 10.0) -> tuple[dict, float, float]:
    """sim_node with ``spec.rovers`` rovers and one capture_node per rover in one executor, for ``spec.seconds``
    of simulated time; returns ({rover: bag dir}, wall s, sim s) with the rovers' last true positions in
    the dict's ``"_ends"`` entry."""
    import rclpy
    from nav_msgs.msg import Odometry
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter
    from rclpy.qos import QoSProfile
    from rosgraph_msgs.msg import Clock

    from forest_perception import topics
    from forest_perception.nodes.capture_node import CaptureNode
    from forest_perception.nodes.common import close_nodes
    from forest_perception.nodes.sim_node import SimNode

    names = spec.rover_names()
    bags.mkdir(parents=True, exist_ok=True)
    mode = "marked" if spec.triggers else "all"
    rclpy.init()
    sim = SimNode(parameter_overrides=[
        Parameter("seed", value=spec.seed), Parameter("style", value=spec.style),
        Parameter("rover_names", value=names), Parameter("camera_rate_hz", value=float(spec.camera_rate_hz)),
        Parameter("camera_width", value=spec.camera_width), Parameter("camera_height", value=spec.camera_height)])
    captures = [CaptureNode(namespace=n, parameter_overrides=[
        Parameter("output_dir", value=str(bags)), Parameter("bag_name", value=n),
        Parameter("min_free_space_mb", value=256), Parameter("record_mode", value=mode)]) for n in names]
    at_source = []
    if spec.triggers:  # the rover's own depth and the trigger decide which frames capture_node writes
        from forest_perception.models.weights import shipped_model
        from forest_perception.nodes.depth_node import DepthNode
        from forest_perception.nodes.trigger_node import TriggerNode

        model = str(shipped_model(spec.trigger_model))
        for n in names:
            at_source.append(DepthNode(namespace=n, parameter_overrides=[
                Parameter("model_path", value=model), Parameter("threads", value=1),
                Parameter("publish_points", value=False), Parameter("publish_scan", value=False)]))
            at_source.append(TriggerNode(namespace=n))
    listener = rclpy.create_node("swarm_listener")
    clock = {"first": None, "now": 0.0}
    ends: dict[str, tuple[float, float]] = {}

    def on_clock(msg: Clock) -> None:
        now = msg.clock.sec + msg.clock.nanosec * 1e-9
        clock["first"] = now if clock["first"] is None else clock["first"]
        clock["now"] = now

    def on_truth(name: str):  # noqa: ANN202 - a subscription callback
        def callback(msg: Odometry) -> None:
            ends[name] = (msg.pose.pose.position.x, msg.pose.pose.position.y)
        return callback

    listener.create_subscription(Clock, topics.CLOCK, on_clock, QoSProfile(depth=10))
    for n in names:
        listener.create_subscription(Odometry, f"/{n}/{topics.GROUND_TRUTH}", on_truth(n), QoSProfile(depth=10))
    executor = SingleThreadedExecutor()
    nodes = [sim, *captures, listener]
    for node in nodes:
        executor.add_node(node)
    # depth and trigger work on their own thread: the 200 Hz IMU must reach capture_node while a frame is decided
    side = SingleThreadedExecutor()
    for node in at_source:
        side.add_node(node)
    spinner = threading.Thread(target=side.spin, name="at_source", daemon=True)
    if at_source:
        spinner.start()
    t0 = time.perf_counter()
    next_print = t0 + progress_every_s
    try:
        while clock["now"] - (clock["first"] if clock["first"] is not None else clock["now"]) < spec.seconds:
            executor.spin_once(timeout_sec=0.05)
            if time.perf_counter() > t0 + 60.0 + 20.0 * spec.seconds:
                raise RuntimeError(f"the swarm drive did not reach {spec.seconds} simulated s in time")
            if time.perf_counter() >= next_print:
                next_print += progress_every_s
                print(f"  t_sim={clock['now'] - (clock['first'] or clock['now']):5.1f} s  "
                      + "  ".join(f"{n} ({x:5.1f}, {y:5.1f})" for n, (x, y) in sorted(ends.items())), flush=True)
        wall = time.perf_counter() - t0
        for capture in captures:
            capture.stop()
        gates = {n: dict(c.last_gate) for n, c in zip(names, captures)}
    finally:
        side.shutdown(timeout_sec=2.0)
        if spinner.is_alive():
            spinner.join(timeout=5.0)
        for node in at_source:
            node.destroy_node()
        close_nodes(executor, nodes)
    out: dict = {n: bags / n for n in names}
    out["_ends"] = ends
    out["_gates"] = gates if spec.triggers else {}
    return out, wall, clock["now"] - (clock["first"] or clock["now"])


def bag_to_rover_folder(bag: Path, work: Path, folder: Path, segment_frames: int) -> tuple[int, int]:
    """``extract`` (``segment_frames`` a segment) then ``curate`` a rover's bag into ``folder``; (frames, segments)."""
    import shutil

    from forest_perception.dataset_tools.curate import CurateConfig, curate
    from forest_perception.dataset_tools.extract import ExtractConfig, extract_bag
    from forest_perception.dataset_tools.layout import dataset_summary

    extracted = work / f"{folder.name}_extracted"
    shutil.rmtree(extracted, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    extract_bag(bag, extracted, ExtractConfig(run=1, segment_frames=segment_frames))
    curate(extracted, folder, CurateConfig())
    shutil.rmtree(extracted, ignore_errors=True)  # the curated folder holds copies of the frames it keeps
    summary = dataset_summary(folder)
    return int(summary["frames"]), int(summary["segments"])


def record_swarm(spec: SwarmRecording, out: Path, reuse: bool = True) -> SwarmResult:
    """Drive and record the swarm, then one curated dataset folder per rover under ``out/rovers/<name>``.

    With ``reuse`` a folder that already holds a finished recording of the same ``spec`` is read back
    instead (the experiment's seeds share one recording). Bags go to ``out/bags`` and are kept.
    """
    spec.validate()
    out = Path(out)
    done = out / DONE_FILE
    if reuse and done.is_file():
        saved = json.loads(done.read_text())
        if saved.get("spec") == asdict(spec):
            return SwarmResult({n: out / "rovers" / n for n in spec.rover_names()}, saved["frames"],
                               saved["segments"], {k: tuple(v) for k, v in saved["ends"].items()},
                               saved.get("source", {}), saved["drive_wall_s"], saved["sim_s"], saved["dataset_s"],
                               reused=True)
    import shutil

    done.unlink(missing_ok=True)
    for stale in ("bags", "rovers"):
        shutil.rmtree(out / stale, ignore_errors=True)
    bags, wall, sim_s = drive_swarm(spec, out / "bags")
    ends = bags.pop("_ends")
    gates = bags.pop("_gates")
    start = time.perf_counter()
    result = SwarmResult({}, ends=ends, source=gates, drive_wall_s=wall, sim_s=sim_s)
    for name, bag in bags.items():
        folder = out / "rovers" / name
        result.folders[name] = folder
        result.frames[name], result.segments[name] = bag_to_rover_folder(bag, out, folder, spec.segment_frames)
    result.dataset_s = time.perf_counter() - start
    done.write_text(json.dumps({"spec": asdict(spec), "frames": result.frames, "segments": result.segments,
                                "ends": result.ends, "source": result.source, "drive_wall_s": wall, "sim_s": sim_s,
                                "dataset_s": result.dataset_s}, indent=1))
    return result
