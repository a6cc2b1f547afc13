"""sim_node: a simulated forest with one or more rovers publishing the real rover topic contract.

Thin ROS wrapper over :class:`forest_perception.sim.simulator.ForestSimulator`. Topics and
parameters: docs/nodes.md (sim_node).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import deque

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from geometry_msgs.msg import Twist
from nav_msgs.msg import Odometry
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import CameraInfo, Image, Imu, JointState, NavSatFix

from forest_perception import msgs, topics
from forest_perception.frames import (
    FRAME_BASE,
    FRAME_CAMERA_OPTICAL,
    FRAME_GPS,
    FRAME_IMU,
    FRAME_ODOM,
    FRAME_WORLD,
    WHEEL_JOINTS,
    CameraIntrinsics,
)
from forest_perception.geo import quaternion_from_rpy
from forest_perception.nodes.common import ParamSpec, add_validated_updates, changed, declare_parameters, run_node
from forest_perception.sim.depth_camera import DepthCameraModel
from forest_perception.sim.gl_renderer import RENDERERS, resolve_renderer
from forest_perception.sim.simulator import (
    BEHAVIOURS,
    MAX_RENDER_WORKERS,
    ForestSimulator,
    RoverConfig,
    SimConfig,
)
from forest_perception.sim.styles import STYLE_NAMES, sample
from forest_perception.sim.weather import WEATHER_PRESETS, CameraEffects
from forest_perception.sim.world import WorldConfig, generate_world

AUTO_RENDER_WORKERS = -1
"""``render_workers`` default: OpenGL inline for one rover, in 1 process for more; TinyRenderer in 2 (2+ cores)."""


def auto_render_workers(renderer: str, rovers: int) -> int:
    """Render processes for a resolved renderer and a rover count (bench/bench_sim.py at 15 Hz on 2 cores).

    OpenGL on llvmpipe rasterises on every core: for one rover a worker only adds a copy (0.80x), for 3 and 5
    rovers one worker overlaps rendering with stepping (1.12x, 1.45x). TinyRenderer is single-threaded and holds
    the GIL: 2 workers raise the real-time factor 1.6-1.7x with 3 and 5 rovers.
    """
    if (os.cpu_count() or 1) < 2:
        return 0
    if renderer == "opengl":
        return 0 if rovers <= 1 else 1
    return 2
NO_STYLE = "none"
AUTO_WEATHER = "auto"
"""``weather`` entry: overcast, or the style's own sampled light when ``style`` is set."""


PARAMS = [
    ParamSpec("seed", 0, "world seed: the same seed gives the same forest", (0, 2**31 - 1), read_only=True),
    ParamSpec("style", NO_STYLE, "forest style (docs/simulator.md): samples the forest, textures, light, camera "
              "pipeline and mount from seed, replacing tree_density_per_ha and terrain_roughness_m; none: the "
              "parameters' forest", choices=(NO_STYLE, *STYLE_NAMES), read_only=True),
    ParamSpec("world_size_m", 60.0, "side of the square forest, metres", (10, 1000), read_only=True),
    ParamSpec("tree_density_per_ha", 600.0, "standing trees per hectare", (0, 5000), read_only=True),
    ParamSpec("terrain_roughness_m", 0.6, "peak amplitude of the rolling ground, metres", (0, 10), read_only=True),
    ParamSpec("datum_latitude_deg", 50.869, "WGS84 latitude of the world origin", (-90, 90), read_only=True),
    ParamSpec("datum_longitude_deg", -1.604, "WGS84 longitude of the world origin", (-180, 180), read_only=True),
    ParamSpec("datum_altitude_m", 40.0, "ellipsoidal altitude of the world origin", (-500, 9000), read_only=True),
    ParamSpec("rover_names", ["rover_0"], "rover namespaces, one rover each", read_only=True),
    ParamSpec("weather", [AUTO_WEATHER], "weather preset, one or one per rover; auto: overcast, or the style's "
              "own light", choices=(AUTO_WEATHER, *sorted(WEATHER_PRESETS)), read_only=True),
    ParamSpec("behaviour", "explore", "how rovers move", choices=tuple(BEHAVIOURS)),
    ParamSpec("camera_width", 320, "colour/depth image width, pixels", (16, 4096), read_only=True),
    ParamSpec("camera_height", 240, "colour/depth image height, pixels", (16, 4096), read_only=True),
    ParamSpec("camera_hfov_deg", 69.4, "horizontal field of view, degrees (D435 colour: 69.4)", (10, 170),
              read_only=True),
    ParamSpec("camera_rate_hz", 15.0, "camera frame rate", (0.5, 90), read_only=True),
    ParamSpec("imu_rate_hz", 200.0, "IMU rate (also the simulation step)", (10, 1000), read_only=True),
    ParamSpec("gps_rate_hz", 10.0, "GPS fix rate", (0.1, 50), read_only=True),
    ParamSpec("encoder_rate_hz", 50.0, "wheel encoder, joint_states and odom rate", (1, 1000), read_only=True),
    ParamSpec("depth_max_range_m", 10.0, "depth camera max range; beyond is NaN", (0.5, 65), read_only=True),
    ParamSpec("motion_blur", True, "blur colour images when the rover turns", read_only=True),
    ParamSpec("real_time_factor", 1.0, "simulated seconds per wall second; 0 runs as fast as possible", (0, 100)),
    ParamSpec("render_workers", AUTO_RENDER_WORKERS,
              "background camera render processes; 0 renders inline in the simulation loop; -1: opengl inline "
              "for one rover, 1 process for more; tiny 2 (on 2+ cores)", (AUTO_RENDER_WORKERS, MAX_RENDER_WORKERS),
              read_only=True),
    ParamSpec("renderer", "auto", "camera renderer: opengl (offscreen EGL; Mesa llvmpipe on a CPU), tiny (PyBullet's "
              "TinyRenderer, about 4x slower) or auto (opengl when it opens)", choices=RENDERERS, read_only=True),
    ParamSpec("frame_prefix", False, "prefix frame ids with the rover name (several rovers in one TF tree)",
              read_only=True),
]


def _check(p: dict) -> str:
    names, weathers = list(p["rover_names"]), list(p["weather"])
    if not names or len(set(names)) != len(names):
        return f"rover_names must be unique and not empty, got {names}"
    if len(weathers) not in (0, 1, len(names)):
        return f"weather must list one preset or one per rover ({len(names)}), got {weathers}"
    return ""


class SimNode(Node):
    """Thin ROS wrapper over :class:`ForestSimulator`."""

    def __init__(self, **kwargs) -> None:
        super().__init__("sim_node", **kwargs)
        self.p = p = declare_parameters(self, PARAMS, _check)
        world_args = dict(seed=p["seed"], size_m=p["world_size_m"], datum_lat_deg=p["datum_latitude_deg"],
                          datum_lon_deg=p["datum_longitude_deg"], datum_alt_m=p["datum_altitude_m"])
        style = None if p["style"] == NO_STYLE else sample(p["style"], p["seed"])
        if style is None:
            world_cfg = WorldConfig(**world_args, tree_density_per_ha=p["tree_density_per_ha"],
                                    terrain_roughness_m=p["terrain_roughness_m"]).validate()
        else:
            world_cfg = style.world_config(**world_args)
        try:
            renderer = resolve_renderer(p["renderer"])
        except RuntimeError as exc:  # opengl asked for where no EGL context opens: one line, not a traceback
            raise ValueError(f"renderer:={p['renderer']}: {exc}") from None
        workers = (p["render_workers"] if p["render_workers"] != AUTO_RENDER_WORKERS
                   else auto_render_workers(renderer, len(p["rover_names"])))
        sim_cfg = SimConfig(
            camera=CameraIntrinsics(p["camera_width"], p["camera_height"], p["camera_hfov_deg"]),
            camera_rate_hz=p["camera_rate_hz"],
            imu_rate_hz=p["imu_rate_hz"],
            gps_rate_hz=p["gps_rate_hz"],
            encoder_rate_hz=p["encoder_rate_hz"],
            depth=DepthCameraModel(max_range_m=p["depth_max_range_m"]),
            seed=p["seed"],
            render_workers=workers,
            renderer=renderer,
            **({} if style is None else {"geometry": style.rover_geometry()}),
        ).validate()
        names = list(p["rover_names"])
        weathers = list(p["weather"]) or [AUTO_WEATHER]
        auto = "overcast" if style is None else style.weather()
        effects = (CameraEffects(motion_blur=p["motion_blur"]) if style is None
                   else style.camera_effects(motion_blur=p["motion_blur"]))
        rovers = [
            RoverConfig(
                name=n,
                weather=auto if (w := weathers[i if len(weathers) > 1 else 0]) == AUTO_WEATHER else w,
                behaviour=p["behaviour"],
                effects=effects,
            )
            for i, n in enumerate(names)
        ]
        t0 = time.perf_counter()
        self.world = generate_world(world_cfg)
        self.sim = ForestSimulator(self.world, sim_cfg, rovers,
                                   palette=None if style is None else style.palette(),
                                   detail=None if style is None else style.mesh_detail())
        self.get_logger().info(
            f"forest seed {world_cfg.seed}{'' if style is None else ', style ' + style.style}: "
            f"{len(self.world.trees)} trees on {world_cfg.size_m:.0f} m square, "
            f"{len(rovers)} rover(s) {names}, built in {time.perf_counter() - t0:.1f} s; renderer {renderer}, "
            f"{'inline' if workers == 0 else f'{workers} render processes'}"
        )
        self.real_time_factor = float(p["real_time_factor"])
        self.frame_prefix = bool(p["frame_prefix"])
        self._lock = threading.Lock()
        self._make_interfaces(names)
        self._render_ms: deque[float] = deque(maxlen=100)
        self._step_wall: deque[tuple[float, int]] = deque(maxlen=400)
        self._frames = [0] * len(names)
        add_validated_updates(self, PARAMS, lambda: self.p, _check, self._commit)
        self.create_timer(1.0, self._publish_diagnostics)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sim_loop", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- parameters
    def _commit(self, old: dict, new: dict) -> None:
        self.p = new
        if changed(old, new, ["behaviour"]):
            with self._lock:
                for i in range(len(self.sim.rovers)):
                    self.sim.set_behaviour(i, new["behaviour"])
        self.real_time_factor = float(new["real_time_factor"])

    # ---------------------------------------------------------------- interfaces
    def _make_interfaces(self, names: list[str]) -> None:
        sensor = qos_profile_sensor_data
        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self.pub = []
        for i, name in enumerate(names):
            self.pub.append(
                {
                    "image": self.create_publisher(Image, f"{name}/camera/image_raw", sensor),
                    "info": self.create_publisher(CameraInfo, f"{name}/camera/camera_info", sensor),
                    "depth": self.create_publisher(Image, f"{name}/camera/depth/image_raw", sensor),
                    "imu": self.create_publisher(Imu, f"{name}/imu/data", sensor),
                    "gps": self.create_publisher(NavSatFix, f"{name}/gps/fix", sensor),
                    "joints": self.create_publisher(JointState, f"{name}/joint_states", reliable),
                    "odom": self.create_publisher(Odometry, f"{name}/odom", reliable),
                    "truth": self.create_publisher(Odometry, f"{name}/{topics.GROUND_TRUTH}", reliable),
                }
            )
            self.create_subscription(Twist, f"{name}/cmd_vel", lambda msg, idx=i: self._on_cmd_vel(idx, msg), reliable)
        self.clock_pub = self.create_publisher(Clock, "/clock", QoSProfile(depth=10))
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", QoSProfile(depth=10))

    def _frame(self, rover: int, frame: str) -> str:
        return f"{self.sim.rovers[rover].cfg.name}/{frame}" if self.frame_prefix else frame

    def _on_cmd_vel(self, rover: int, msg: Twist) -> None:
        v, w = msg.linear.x, msg.angular.z
        if not (math.isfinite(v) and math.isfinite(w)):
            self.get_logger().warn(f"dropped cmd_vel with non-finite values for {self.sim.rovers[rover].cfg.name}")
            return
        with self._lock:
            self.sim.set_cmd_vel(rover, v, w)

    # ---------------------------------------------------------------- loop
    def _run(self) -> None:
        wall_start = time.perf_counter()
        sim_start = self.sim.time_s
        while not self._stop.is_set() and rclpy.ok(context=self.context):
            t0 = time.perf_counter()
            with self._lock:
                events = self.sim.step()
                now_ns = self.sim.now_ns
            try:
                for event in events:
                    self._publish(event)
                self.clock_pub.publish(Clock(clock=msgs.time_from_ns(now_ns)))
            except Exception:
                if rclpy.ok(context=self.context):
                    raise
                return  # Ctrl-C: the context went down between the loop test and a publish
            self._step_wall.append((time.perf_counter(), now_ns))
            if any(e.kind == "camera" for e in events):
                self._render_ms.append((time.perf_counter() - t0) * 1e3)
            rtf = self.real_time_factor
            if rtf > 0:
                target = wall_start + (self.sim.time_s - sim_start) / rtf
                delay = target - time.perf_counter()
                if delay > 0:
                    self._stop.wait(delay)
                elif delay < -0.5:  # fell behind by more than half a second: do not try to catch up
                    wall_start, sim_start = time.perf_counter(), self.sim.time_s

    def _publish(self, event) -> None:  # noqa: ANN001 - SensorEvent
        stamp = msgs.time_from_ns(event.stamp_ns)
        i = event.rover
        pubs = self.pub[i]
        data = event.data
        if event.kind == "imu":
            pubs["imu"].publish(
                msgs.imu_msg(
                    stamp,
                    self._frame(i, FRAME_IMU),
                    data.orientation_xyzw,
                    data.angular_velocity,
                    data.linear_acceleration,
                    data.orientation_covariance,
                    data.angular_velocity_covariance,
                    data.linear_acceleration_covariance,
                )
            )
        elif event.kind == "camera":
            frame = self._frame(i, FRAME_CAMERA_OPTICAL)
            pubs["image"].publish(msgs.image_from_array(data.rgb, "rgb8", stamp, frame))
            pubs["depth"].publish(msgs.image_from_array(data.depth, "32FC1", stamp, frame))
            pubs["info"].publish(msgs.camera_info_from_intrinsics(self.sim.config.camera, stamp, frame))
            self._frames[i] += 1
        elif event.kind == "gps":
            pubs["gps"].publish(
                msgs.navsat_msg(
                    stamp,
                    self._frame(i, FRAME_GPS),
                    data.latitude,
                    data.longitude,
                    data.altitude,
                    data.status,
                    data.covariance,
                    data.covariance_type,
                )
            )
        elif event.kind == "wheels":
            pubs["joints"].publish(msgs.joint_state_msg(stamp, WHEEL_JOINTS, data.position, data.velocity))
        elif event.kind == "odom":
            odo = data
            pubs["odom"].publish(
                msgs.odometry_msg(
                    stamp,
                    self._frame(i, FRAME_ODOM),
                    self._frame(i, FRAME_BASE),
                    (odo.x, odo.y, 0.0),
                    odo.quaternion_xyzw(),
                    (odo.v, 0.0, 0.0),
                    (0.0, 0.0, odo.w),
                    odo.pose_covariance,
                    odo.twist_covariance,
                )
            )
            with self._lock:
                truth = self.sim.rovers[i].state
            pubs["truth"].publish(msgs.odometry_msg(
                stamp, FRAME_WORLD, self._frame(i, FRAME_BASE), truth.position,
                quaternion_from_rpy(truth.roll, truth.pitch, truth.yaw), (truth.v, 0.0, 0.0), (0.0, 0.0, truth.w),
                np.zeros(36), np.zeros(36)))

    def _publish_diagnostics(self) -> None:
        array = DiagnosticArray()
        array.header.stamp = self.get_clock().now().to_msg()
        rtf = 0.0
        if len(self._step_wall) >= 2:
            (w0, s0), (w1, s1) = self._step_wall[0], self._step_wall[-1]
            if w1 > w0:
                rtf = (s1 - s0) * 1e-9 / (w1 - w0)
        render = sorted(self._render_ms)
        p95 = render[int(0.95 * (len(render) - 1))] if render else 0.0
        level = DiagnosticStatus.OK
        message = "running"
        if self.real_time_factor > 0 and rtf < 0.8 * self.real_time_factor:
            level, message = DiagnosticStatus.WARN, "slower than the requested real-time factor"
        for i, r in enumerate(self.sim.rovers):
            array.status.append(
                msgs.diagnostic_status(
                    f"sim_node: {r.cfg.name}",
                    r.cfg.name,
                    level,
                    message,
                    {
                        "sim_time_s": self.sim.time_s,
                        "real_time_factor": rtf,
                        "requested_real_time_factor": self.real_time_factor,
                        "camera_frames": self._frames[i],
                        "step_with_render_ms_p95": p95,
                        "weather": getattr(r.cfg.weather, "name", r.cfg.weather),
                        "behaviour": r.cfg.behaviour,
                        "collided": bool(r.state.collided),
                    },
                )
            )
        self.diag_pub.publish(array)

    def destroy_node(self) -> None:
        """Stop the simulation thread, then the node (also after a constructor that failed half way)."""
        if hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join(timeout=5.0)
        if hasattr(self, "sim"):
            self.sim.close()
        super().destroy_node()


def main(args: list[str] | None = None) -> None:
    """Entry point of ``ros2 run forest_perception sim_node``."""
    run_node(SimNode, "sim_node", args, PARAMS, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
