"""Export a generated forest to Gazebo (Harmonic, gz-sim 8) with a ros_gz_bridge config.

Details: docs/simulator.md (`gazebo`).
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from forest_perception.frames import (
    FRAME_BASE,
    FRAME_CAMERA,
    FRAME_CAMERA_OPTICAL,
    FRAME_GPS,
    FRAME_IMU,
    FRAME_ODOM,
    WHEEL_JOINTS,
    CameraIntrinsics,
    RoverGeometry,
)
from forest_perception.sim.meshes import terrain_mesh, write_obj
from forest_perception.sim.terrain import Terrain
from forest_perception.sim.weather import WEATHER_PRESETS, WeatherPreset, get_weather
from forest_perception.sim.world import ForestWorld

SDF_VERSION = "1.10"
PHYSICS_STEP_S = 0.001
MAX_SENSOR_RATE_HZ = 1.0 / PHYSICS_STEP_S
WORLD_SDF_NAME = "world.sdf"
BRIDGE_YAML_NAME = "bridge.yaml"
TERRAIN_MESH_NAME = "meshes/terrain.obj"
TERRAIN_COLLISION_MESH_NAME = "meshes/terrain_collision.obj"
# the collision mesh keeps at most this many cells per side (a 1000 m world at 0.1 m would
# otherwise hand the physics engine 200 M triangles); the visual mesh keeps every cell
COLLISION_MAX_CELLS = 512
DEFAULT_WEATHER = "overcast"  # the simulator's default preset

# RealSense D435: depth is valid from about 0.28 m to 10 m; colour sees from a few cm
DEPTH_NEAR_M = 0.28
DEPTH_FAR_M = 10.0
COLOR_NEAR_M = 0.05
COLOR_FAR_M = 120.0

WHEEL_WIDTH_M = 0.04
WHEEL_MASS_KG = 0.25
CASTER_RADIUS_M = 0.025
TRUNK_SINK_M = 0.3
SPAWN_DROP_M = 0.01  # rovers start this far above the highest ground under their contacts

IMU_GYRO_STDDEV = 0.002  # rad/s, MEMS class
IMU_ACCEL_STDDEV = 0.02  # m/s^2
GPS_HORIZONTAL_STDDEV_M = 1.5
GPS_VERTICAL_STDDEV_M = 3.0
GPS_VELOCITY_STDDEV_MPS = 0.05

_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_RESERVED_PREFIXES = ("tree_", "log_", "bush_", "rock_")
_RESERVED_NAMES = ("terrain", "sun")

GZ_TO_ROS = "GZ_TO_ROS"
ROS_TO_GZ = "ROS_TO_GZ"


@dataclass(frozen=True)
class BridgedTopic:
    """One ROS <-> Gazebo topic pair of the contract.

    Names without a leading ``/`` are relative to the rover namespace (``/<ns>/<name>``);
    absolute names (``/clock``) are global and bridged once.
    """

    ros_topic: str
    gz_topic: str
    ros_type: str
    gz_type: str
    direction: str

    @property
    def is_global(self) -> bool:
        """True for a topic shared by all rovers (bridged once)."""
        return self.ros_topic.startswith("/")

    def ros_name(self, namespace: str) -> str:
        """The ROS topic for ``namespace`` (unchanged when global)."""
        return self.ros_topic if self.is_global else f"/{namespace}/{self.ros_topic}"

    def gz_name(self, namespace: str) -> str:
        """The Gazebo topic for ``namespace`` (unchanged when global)."""
        return self.gz_topic if self.gz_topic.startswith("/") else f"/{namespace}/{self.gz_topic}"

    def entry(self, namespace: str) -> dict[str, str]:
        """The parameter_bridge YAML entry for ``namespace``."""
        return {
            "ros_topic_name": self.ros_name(namespace),
            "gz_topic_name": self.gz_name(namespace),
            "ros_type_name": self.ros_type,
            "gz_type_name": self.gz_type,
            "direction": self.direction,
        }


# The rgbd_camera sensor publishes <topic>/image, <topic>/depth_image, <topic>/camera_info
# (gz-sensors RgbdCameraSensor), so the camera's gz topic base is "camera".
CAMERA_GZ_TOPIC = "camera"
_SENSOR = "sensor_msgs/msg/"
BRIDGED_TOPICS: tuple[BridgedTopic, ...] = (
    BridgedTopic("camera/image_raw", "camera/image", _SENSOR + "Image", "gz.msgs.Image", GZ_TO_ROS),
    BridgedTopic(
        "camera/camera_info", "camera/camera_info", _SENSOR + "CameraInfo", "gz.msgs.CameraInfo", GZ_TO_ROS
    ),
    BridgedTopic(
        "camera/depth/image_raw", "camera/depth_image", _SENSOR + "Image", "gz.msgs.Image", GZ_TO_ROS
    ),
    BridgedTopic("imu/data", "imu", _SENSOR + "Imu", "gz.msgs.IMU", GZ_TO_ROS),
    BridgedTopic("gps/fix", "navsat", _SENSOR + "NavSatFix", "gz.msgs.NavSat", GZ_TO_ROS),
    BridgedTopic("joint_states", "joint_states", _SENSOR + "JointState", "gz.msgs.Model", GZ_TO_ROS),
    BridgedTopic("odom", "odometry", "nav_msgs/msg/Odometry", "gz.msgs.Odometry", GZ_TO_ROS),
    BridgedTopic("cmd_vel", "cmd_vel", "geometry_msgs/msg/Twist", "gz.msgs.Twist", ROS_TO_GZ),
    BridgedTopic("/clock", "/clock", "rosgraph_msgs/msg/Clock", "gz.msgs.Clock", GZ_TO_ROS),
)
_BY_ROS = {t.ros_topic: t for t in BRIDGED_TOPICS}


def gz_topic(namespace: str, ros_topic: str) -> str:
    """Gazebo topic that feeds (or is fed by) contract topic ``ros_topic`` of rover ``namespace``."""
    try:
        return _BY_ROS[ros_topic].gz_name(namespace)
    except KeyError:
        raise ValueError(f"{ros_topic!r} is not a bridged topic; expected one of {sorted(_BY_ROS)}") from None


def bridge_entries(rover_names: Iterable[str]) -> list[dict[str, str]]:
    """parameter_bridge entries for every rover (per-rover topics, then the global ones once)."""
    names = _check_rover_names(rover_names)
    entries = [t.entry(ns) for ns in names for t in BRIDGED_TOPICS if not t.is_global]
    entries += [t.entry("") for t in BRIDGED_TOPICS if t.is_global]
    return entries


def resolve_weather(weather: WeatherPreset | str | None) -> WeatherPreset:
    """The simulator's weather preset for ``weather`` (a preset, its name, or None for the default)."""
    if weather is None:
        weather = DEFAULT_WEATHER
    if isinstance(weather, str):
        return get_weather(weather)
    if isinstance(weather, WeatherPreset):
        return weather.validate()
    raise ValueError(f"weather must be a WeatherPreset or one of {sorted(WEATHER_PRESETS)}, got {weather!r}")


@dataclass(frozen=True)
class GazeboExport:
    """What ``export_gazebo`` wrote, and where the rovers start (x, y, z, yaw in the world).

    One ``bridge_yaml`` covers every rover and ``/clock``.
    """

    out_dir: Path
    world_sdf: Path
    bridge_yaml: Path
    terrain_obj: Path
    terrain_collision_obj: Path
    world_name: str
    rover_names: tuple[str, ...]
    rover_poses: tuple[tuple[float, float, float, float], ...]

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file written."""
        return (self.world_sdf, self.bridge_yaml, self.terrain_obj, self.terrain_collision_obj)


# --------------------------------------------------------------------------- helpers


def _num(value: float, digits: int = 4) -> str:
    """Fixed-precision number without trailing zeros and without '-0'."""
    text = f"{float(value):.{digits}f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "", "-") else text


def _nums(*values: float, digits: int = 4) -> str:
    return " ".join(_num(v, digits) for v in values)


def _sub(parent: ET.Element, tag: str, text: str | float | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text if isinstance(text, str) else _num(text)
    return el


def _pose(parent: ET.Element, x: float, y: float, z: float, roll: float = 0.0, pitch: float = 0.0,
          yaw: float = 0.0) -> ET.Element:
    return _sub(parent, "pose", _nums(x, y, z) + " " + _nums(roll, pitch, yaw, digits=6))


def _material(parent: ET.Element, rgb: tuple[float, float, float], specular: float = 0.05) -> None:
    mat = _sub(parent, "material")
    r, g, b = rgb
    _sub(mat, "ambient", _nums(r * 0.6, g * 0.6, b * 0.6, 1.0, digits=3))
    _sub(mat, "diffuse", _nums(r, g, b, 1.0, digits=3))
    _sub(mat, "specular", _nums(specular, specular, specular, 1.0, digits=3))


def _geometry(parent: ET.Element, kind: str, **params: str) -> None:
    geom = _sub(_sub(parent, "geometry"), kind)
    for key, value in params.items():
        _sub(geom, key, value)


def _shape(link: ET.Element, name: str, kind: str, pose: tuple[float, ...], params: dict[str, str],
           rgb: tuple[float, float, float] | None, collide: bool) -> None:
    """A visual (when ``rgb``) and/or collision of one primitive at ``pose`` in the link."""
    if rgb is not None:
        vis = _sub(link, "visual", name=f"{name}_visual")
        _pose(vis, *pose)
        _geometry(vis, kind, **params)
        _material(vis, rgb)
    if collide:
        col = _sub(link, "collision", name=f"{name}_collision")
        _pose(col, *pose)
        _geometry(col, kind, **params)


def _inertial(link: ET.Element, mass: float, ixx: float, iyy: float, izz: float,
              pose: tuple[float, ...] | None = None) -> None:
    inertial = _sub(link, "inertial")
    if pose is not None:
        _pose(inertial, *pose)
    _sub(inertial, "mass", _num(mass, 6))
    inertia = _sub(inertial, "inertia")
    for key, value in (("ixx", ixx), ("ixy", 0.0), ("ixz", 0.0), ("iyy", iyy), ("iyz", 0.0), ("izz", izz)):
        _sub(inertia, key, _num(value, 8))


def _plugin(parent: ET.Element, filename: str, name: str, **params: str | Iterable[str]) -> ET.Element:
    plugin = _sub(parent, "plugin", filename=filename, name=name)
    for key, value in params.items():
        for item in [value] if isinstance(value, str) else value:
            _sub(plugin, key, item)
    return plugin


def _clip_rgb(rgb: np.ndarray) -> tuple[float, float, float]:
    r, g, b = np.clip(np.asarray(rgb, dtype=np.float64), 0.0, 1.0)
    return float(r), float(g), float(b)


def _frame_id(sensor: ET.Element, frame: str) -> None:
    # Harmonic (gz-sensors 8) reads <gz_frame_id>; Ionic and later read <frame_id> and
    # deprecate the other. Each warns about the element it does not know.
    _sub(sensor, "gz_frame_id", frame)
    _sub(sensor, "frame_id", frame)


def _noise(parent: ET.Element, stddev: float) -> None:
    noise = _sub(parent, "noise", type="gaussian")
    _sub(noise, "mean", "0")
    _sub(noise, "stddev", _num(stddev, 6))


def rpy_from_matrix(rot: np.ndarray) -> tuple[float, float, float]:
    """SDF roll, pitch, yaw (extrinsic X-Y-Z, ``R = Rz(yaw) Ry(pitch) Rx(roll)``) of a rotation matrix."""
    pitch = math.asin(max(-1.0, min(1.0, -float(rot[2, 0]))))
    if abs(math.cos(pitch)) > 1e-9:
        roll = math.atan2(float(rot[2, 1]), float(rot[2, 2]))
        yaw = math.atan2(float(rot[1, 0]), float(rot[0, 0]))
    else:  # gimbal lock: fold yaw into roll
        roll = math.atan2(-float(rot[1, 2]), float(rot[1, 1]))
        yaw = 0.0
    return roll, pitch, yaw


def rotation_from_rpy(roll: float, pitch: float, yaw: float) -> np.ndarray:
    """Rotation matrix ``Rz(yaw) Ry(pitch) Rx(roll)`` of an SDF pose."""
    cr, sr, cp, sp, cy, sy = (math.cos(roll), math.sin(roll), math.cos(pitch), math.sin(pitch),
                              math.cos(yaw), math.sin(yaw))
    return np.array([
        [cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr],
        [sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr],
        [-sp, cp * sr, cp * cr],
    ])


def _lean_rpy(lean: float, lean_dir: float) -> tuple[float, float, float]:
    """Orientation that tilts +z by ``lean`` towards bearing ``lean_dir`` (Rz(d) Ry(lean) Rz(-d))."""
    c, s = math.cos(lean_dir), math.sin(lean_dir)
    rz = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    cl, sl = math.cos(lean), math.sin(lean)
    ry = np.array([[cl, 0.0, sl], [0.0, 1.0, 0.0], [-sl, 0.0, cl]])
    return rpy_from_matrix(rz @ ry @ rz.T)


def _check_rate(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 < value <= MAX_SENSOR_RATE_HZ):
        raise ValueError(
            f"{name} must be within (0, {MAX_SENSOR_RATE_HZ:g}] Hz (the physics step is 1 ms), got {value!r}"
        )
    return float(value)


def _check_rover_names(rover_names: Iterable[str]) -> tuple[str, ...]:
    if isinstance(rover_names, str):
        raise ValueError(f"rover_names must be a sequence of names, got the string {rover_names!r}")
    names = tuple(rover_names)
    if not names:
        raise ValueError("rover_names must name at least one rover")
    for name in names:
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError(
                f"rover name {name!r} is not a valid ROS namespace / Gazebo model name "
                "(a letter, then letters, digits or _)"
            )
        if name in _RESERVED_NAMES or name.startswith(_RESERVED_PREFIXES):
            raise ValueError(f"rover name {name!r} clashes with the world's model names {_RESERVED_PREFIXES}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"rover names must be unique, repeated: {dupes}")
    return names


# --------------------------------------------------------------------------- terrain mesh


def collision_terrain(terrain: Terrain, max_cells: int = COLLISION_MAX_CELLS) -> Terrain:
    """``terrain`` itself, or a bilinear resampling of it with at most ``max_cells`` cells per side."""
    ny, nx = terrain.shape
    cells = max(nx, ny) - 1
    if cells <= max_cells:
        return terrain
    xmin, xmax, ymin, ymax = terrain.extent
    n = max_cells + 1
    resolution = (xmax - xmin) / max_cells
    xs = np.linspace(xmin, xmax, n)
    ys = np.linspace(ymin, ymax, n)
    gx, gy = np.meshgrid(xs, ys)
    heights = np.asarray(terrain.height_at(gx, gy), dtype=np.float64)
    return Terrain(heights=heights, resolution=resolution, x0=xmin, y0=ymin)


# --------------------------------------------------------------------------- world content

_BARK = (0.36, 0.27, 0.19)
_CONIFER = (0.13, 0.30, 0.14)
_BROADLEAF = (0.25, 0.45, 0.16)
_LOG = (0.42, 0.33, 0.24)
_BUSH = (0.22, 0.40, 0.15)
_ROCK = (0.50, 0.49, 0.46)
_GROUND = (0.33, 0.28, 0.20)


def _static_model(world_el: ET.Element, name: str, x: float, y: float, z: float, yaw: float = 0.0,
                  link_rpy: tuple[float, float, float] | None = None) -> ET.Element:
    model = _sub(world_el, "model", name=name)
    _sub(model, "static", "true")
    _pose(model, x, y, z, 0.0, 0.0, yaw)
    link = _sub(model, "link", name="link")
    if link_rpy is not None:
        _pose(link, 0.0, 0.0, 0.0, *link_rpy)
    return link


def _add_terrain(world_el: ET.Element) -> None:
    link = _static_model(world_el, "terrain", 0.0, 0.0, 0.0)
    col = _sub(link, "collision", name="collision")
    _sub(_sub(_sub(col, "geometry"), "mesh"), "uri", TERRAIN_COLLISION_MESH_NAME)
    surface = _sub(_sub(_sub(col, "surface"), "friction"), "ode")
    _sub(surface, "mu", "0.9")
    _sub(surface, "mu2", "0.9")
    vis = _sub(link, "visual", name="visual")
    _sub(_sub(_sub(vis, "geometry"), "mesh"), "uri", TERRAIN_MESH_NAME)
    _material(vis, _GROUND)


def _add_trees(world_el: ET.Element, world: ForestWorld) -> None:
    for i, tree in enumerate(world.trees):
        # the link carries the lean so trunk and crown tilt together about the stem base
        link = _static_model(world_el, f"tree_{i}", tree.x, tree.y, tree.z,
                             link_rpy=_lean_rpy(tree.lean, tree.lean_dir))
        # both cylinders reach TRUNK_SINK_M underground so no gap opens on the downhill side
        flare_top, trunk_top = 0.5, 0.9 * tree.height
        _shape(link, "flare", "cylinder", (0, 0, 0.5 * (flare_top - TRUNK_SINK_M)),
               {"radius": _num(tree.radius_at(0.25)), "length": _num(flare_top + TRUNK_SINK_M)}, _BARK, True)
        _shape(link, "trunk", "cylinder", (0, 0, 0.5 * (trunk_top - TRUNK_SINK_M)),
               {"radius": _num(tree.dbh / 2.0), "length": _num(trunk_top + TRUNK_SINK_M)}, _BARK, True)
        crown_half = max((tree.height - tree.crown_base) / 2.0, 0.3)
        _shape(link, "crown", "ellipsoid", (0, 0, tree.height - crown_half),
               {"radii": _nums(tree.crown_radius, tree.crown_radius, crown_half)},
               _CONIFER if tree.conifer else _BROADLEAF, False)


def _add_ground_cover(world_el: ET.Element, world: ForestWorld) -> None:
    for i, log in enumerate(world.logs):
        link = _static_model(world_el, f"log_{i}", log.x, log.y, log.z, log.yaw)
        # a cylinder's axis is z; pitch it onto x, which the model's yaw turns along the log
        _shape(link, "log", "cylinder", (0, 0, 0, 0, math.pi / 2, 0),
               {"radius": _num(log.diameter / 2.0), "length": _num(log.length)}, _LOG, True)
    for i, bush in enumerate(world.bushes):
        link = _static_model(world_el, f"bush_{i}", bush.x, bush.y, bush.z)
        _shape(link, "bush", "ellipsoid", (0, 0, 0.45 * bush.height),
               {"radii": _nums(bush.radius, bush.radius, bush.height / 2.0)}, _BUSH, True)
    for i, rock in enumerate(world.rocks):
        link = _static_model(world_el, f"rock_{i}", rock.x, rock.y, rock.z, rock.yaw)
        _shape(link, "rock", "ellipsoid", (0, 0, 0),
               {"radii": _nums(rock.radius, 0.85 * rock.radius, rock.squash * rock.radius)}, _ROCK, True)


def spawn_poses(world: ForestWorld, count: int, geometry: RoverGeometry | None = None
                ) -> list[tuple[float, float, float, float]]:
    """Start poses (x, y, z of base_link, yaw) clear of obstacles and of each other.

    Candidates spiral out from the world origin (the clearing); z puts the wheels
    ``SPAWN_DROP_M`` above the highest ground under the wheels and casters.
    """
    geo = geometry or RoverGeometry()
    if count < 1:
        raise ValueError(f"rover count must be >= 1, got {count}")
    obstacles = world.obstacle_circles(clearance_h=0.1)
    foot = geo.footprint_radius_m
    limit = world.half_size - 1.0 - foot
    poses: list[tuple[float, float, float, float]] = []
    golden = math.pi * (3.0 - math.sqrt(5.0))
    caster_x = 0.5 * geo.body_length_m - 0.05
    half_track = 0.5 * geo.track_width_m
    contacts = ((0.0, half_track), (0.0, -half_track), (caster_x, 0.0), (-caster_x, 0.0))
    for k in range(20_000):
        r = 0.35 * math.sqrt(k)
        x, y = r * math.cos(k * golden), r * math.sin(k * golden)
        if abs(x) > limit or abs(y) > limit:
            if r > math.sqrt(2.0) * limit:
                break
            continue
        gaps = np.hypot(obstacles[:, 0] - x, obstacles[:, 1] - y) - obstacles[:, 2]
        if np.any(gaps < foot + 0.15):
            continue
        if any(math.hypot(px - x, py - y) < 2.0 * foot + 0.3 for px, py, _, _ in poses):
            continue
        ground = max(float(world.terrain.height_at(x + cx, y + cy)) for cx, cy in contacts)
        poses.append((x, y, ground + geo.wheel_radius_m + SPAWN_DROP_M, 0.0))
        if len(poses) == count:
            return poses
    raise ValueError(f"found room for only {len(poses)} of {count} rovers clear of obstacles in this world")


def _add_rover(world_el: ET.Element, name: str, pose: tuple[float, float, float, float], geo: RoverGeometry,
               cam: CameraIntrinsics, rates: dict[str, float]) -> None:
    model = _sub(world_el, "model", name=name)
    _pose(model, pose[0], pose[1], pose[2], 0.0, 0.0, pose[3])

    # base_link on the axle centre (RoverGeometry); the body box sits a little above it
    base = _sub(model, "link", name=FRAME_BASE)
    body_z = 0.5 * geo.body_height_m - 0.02
    body_mass = max(geo.mass_kg - 2 * WHEEL_MASS_KG, 0.1)
    lx, ly, lz = geo.body_length_m, geo.body_width_m, geo.body_height_m
    _inertial(base, body_mass, body_mass / 12 * (ly**2 + lz**2), body_mass / 12 * (lx**2 + lz**2),
              body_mass / 12 * (lx**2 + ly**2), (0, 0, body_z))
    _shape(base, "body", "box", (0, 0, body_z), {"size": _nums(lx, ly, lz)}, (0.85, 0.45, 0.10), True)
    caster_x = 0.5 * lx - 0.05
    for label, cx in (("front_caster", caster_x), ("rear_caster", -caster_x)):
        caster_pose = (cx, 0, CASTER_RADIUS_M - geo.wheel_radius_m)
        _shape(base, label, "sphere", caster_pose, {"radius": _num(CASTER_RADIUS_M)}, (0.1, 0.1, 0.1), False)
        col = _sub(base, "collision", name=f"{label}_collision")
        _pose(col, *caster_pose)
        _geometry(col, "sphere", radius=_num(CASTER_RADIUS_M))
        friction = _sub(_sub(_sub(col, "surface"), "friction"), "ode")
        _sub(friction, "mu", "0")  # a frictionless ball stands in for a swivel caster
        _sub(friction, "mu2", "0")

    # sensors sit on base_link at the geometry's offsets; frame ids follow the topic contract
    cx_, cy_, cz_ = geo.camera_offset_m
    camera = _sub(base, "sensor", name="rgbd_camera", type="rgbd_camera")
    _pose(camera, cx_, cy_, cz_, 0.0, geo.camera_pitch_rad, 0.0)
    _sub(camera, "always_on", "true")
    _sub(camera, "update_rate", _num(rates["camera"]))
    _sub(camera, "visualize", "false")
    _sub(camera, "topic", f"/{name}/{CAMERA_GZ_TOPIC}")
    _frame_id(camera, FRAME_CAMERA)
    cam_el = _sub(camera, "camera", name="color")
    _sub(cam_el, "horizontal_fov", _num(math.radians(cam.hfov_deg), 6))
    image = _sub(cam_el, "image")
    _sub(image, "width", str(int(cam.width)))
    _sub(image, "height", str(int(cam.height)))
    _sub(image, "format", "R8G8B8")
    clip = _sub(cam_el, "clip")
    _sub(clip, "near", _num(COLOR_NEAR_M))
    _sub(clip, "far", _num(COLOR_FAR_M))
    depth_clip = _sub(_sub(cam_el, "depth_camera"), "clip")
    _sub(depth_clip, "near", _num(DEPTH_NEAR_M))
    _sub(depth_clip, "far", _num(DEPTH_FAR_M))
    intrinsics = _sub(_sub(cam_el, "lens"), "intrinsics")
    for key, value in (("fx", cam.fx), ("fy", cam.fy), ("cx", cam.cx), ("cy", cam.cy), ("s", 0.0)):
        _sub(intrinsics, key, _num(value, 6))
    _sub(cam_el, "optical_frame_id", FRAME_CAMERA_OPTICAL)

    imu = _sub(base, "sensor", name="imu", type="imu")
    _pose(imu, *geo.imu_offset_m)
    _sub(imu, "always_on", "true")
    _sub(imu, "update_rate", _num(rates["imu"]))
    _sub(imu, "topic", gz_topic(name, "imu/data"))
    _frame_id(imu, FRAME_IMU)
    imu_el = _sub(imu, "imu")
    _sub(_sub(imu_el, "orientation_reference_frame"), "localization", "ENU")
    for group, stddev in (("angular_velocity", IMU_GYRO_STDDEV), ("linear_acceleration", IMU_ACCEL_STDDEV)):
        group_el = _sub(imu_el, group)
        for axis in "xyz":
            _noise(_sub(group_el, axis), stddev)

    navsat = _sub(base, "sensor", name="navsat", type="navsat")
    _pose(navsat, *geo.gps_offset_m)
    _sub(navsat, "always_on", "true")
    _sub(navsat, "update_rate", _num(rates["gps"]))
    _sub(navsat, "topic", gz_topic(name, "gps/fix"))
    _frame_id(navsat, FRAME_GPS)
    nav_el = _sub(navsat, "navsat")
    for group, horizontal, vertical in (
        ("position_sensing", GPS_HORIZONTAL_STDDEV_M, GPS_VERTICAL_STDDEV_M),
        ("velocity_sensing", GPS_VELOCITY_STDDEV_MPS, GPS_VELOCITY_STDDEV_MPS),
    ):
        group_el = _sub(nav_el, group)
        _noise(_sub(group_el, "horizontal"), horizontal)
        _noise(_sub(group_el, "vertical"), vertical)

    # driven wheels: a cylinder's axis is z, rolled onto +y so positive spin drives forward
    r, half_track = geo.wheel_radius_m, 0.5 * geo.track_width_m
    i_radial = WHEEL_MASS_KG * (3 * r**2 + WHEEL_WIDTH_M**2) / 12
    i_axial = WHEEL_MASS_KG * r**2 / 2
    for joint_name, side in zip(WHEEL_JOINTS, (1.0, -1.0)):
        link_name = joint_name.replace("_joint", "")
        wheel = _sub(model, "link", name=link_name)
        _pose(wheel, 0.0, side * half_track, 0.0, -math.pi / 2, 0.0, 0.0)
        _inertial(wheel, WHEEL_MASS_KG, i_radial, i_radial, i_axial)
        _shape(wheel, "wheel", "cylinder", (0, 0, 0), {"radius": _num(r), "length": _num(WHEEL_WIDTH_M)},
               (0.08, 0.08, 0.08), True)
        joint = _sub(model, "joint", name=joint_name, type="revolute")
        _sub(joint, "parent", FRAME_BASE)
        _sub(joint, "child", link_name)
        axis = _sub(joint, "axis")
        _sub(axis, "xyz", "0 0 1")
        limit = _sub(axis, "limit")
        _sub(limit, "lower", "-1.79769e+308")  # continuous, as in gz-sim's diff_drive example
        _sub(limit, "upper", "1.79769e+308")

    _plugin(
        model, "gz-sim-diff-drive-system", "gz::sim::systems::DiffDrive",
        left_joint=WHEEL_JOINTS[0],
        right_joint=WHEEL_JOINTS[1],
        wheel_separation=_num(geo.track_width_m, 6),
        wheel_radius=_num(geo.wheel_radius_m, 6),
        odom_publish_frequency=_num(rates["encoder"]),
        max_linear_velocity=_num(geo.max_linear_mps),
        max_angular_velocity=_num(geo.max_angular_rps),
        topic=gz_topic(name, "cmd_vel"),
        odom_topic=gz_topic(name, "odom"),
        tf_topic=f"/{name}/tf",
        frame_id=FRAME_ODOM,
        child_frame_id=FRAME_BASE,
    )
    _plugin(
        model, "gz-sim-joint-state-publisher-system", "gz::sim::systems::JointStatePublisher",
        topic=gz_topic(name, "joint_states"),
        joint_name=list(WHEEL_JOINTS),
        update_rate=_num(rates["encoder"]),
    )


@dataclass(frozen=True)
class _Plan:
    """Validated export arguments and the rover start poses."""

    names: tuple[str, ...]
    camera: CameraIntrinsics
    geometry: RoverGeometry
    rates: dict[str, float]
    weather: WeatherPreset
    poses: tuple[tuple[float, float, float, float], ...]


def _plan(world: ForestWorld, rover_names: Iterable[str], intrinsics: CameraIntrinsics | None,
          camera_rate_hz: float, imu_rate_hz: float, gps_rate_hz: float, encoder_rate_hz: float,
          weather: WeatherPreset | str | None,
          geometry: RoverGeometry | None) -> _Plan:
    names = _check_rover_names(rover_names)
    geo = geometry or RoverGeometry()
    return _Plan(
        names=names,
        camera=(intrinsics or CameraIntrinsics()).validate(),
        geometry=geo,
        rates={
            "camera": _check_rate("camera_rate_hz", camera_rate_hz),
            "imu": _check_rate("imu_rate_hz", imu_rate_hz),
            "gps": _check_rate("gps_rate_hz", gps_rate_hz),
            "encoder": _check_rate("encoder_rate_hz", encoder_rate_hz),
        },
        weather=resolve_weather(weather),
        poses=tuple(spawn_poses(world, len(names), geo)),
    )


def world_sdf(world: ForestWorld, rover_names: Iterable[str] = ("rover_0",),
              intrinsics: CameraIntrinsics | None = None, camera_rate_hz: float = 15.0,
              imu_rate_hz: float = 200.0, gps_rate_hz: float = 10.0, encoder_rate_hz: float = 50.0,
              weather: WeatherPreset | str | None = None,
              geometry: RoverGeometry | None = None) -> str:
    """The SDF text of ``world`` with one rover per name (arguments as in ``export_gazebo``)."""
    plan = _plan(world, rover_names, intrinsics, camera_rate_hz, imu_rate_hz, gps_rate_hz, encoder_rate_hz,
                 weather, geometry)
    return _render_sdf(world, plan)


def _render_sdf(world: ForestWorld, plan: _Plan) -> str:
    cfg = world.config
    light = plan.weather
    names = plan.names

    root = ET.Element("sdf", version=SDF_VERSION)
    world_el = _sub(root, "world", name=world_name(world))

    physics = _sub(world_el, "physics", name="1ms", type="ignored")
    _sub(physics, "max_step_size", _num(PHYSICS_STEP_S, 6))
    _sub(physics, "real_time_factor", "1")
    _sub(world_el, "gravity", "0 0 -9.80665")

    _plugin(world_el, "gz-sim-physics-system", "gz::sim::systems::Physics")
    _plugin(world_el, "gz-sim-user-commands-system", "gz::sim::systems::UserCommands")
    _plugin(world_el, "gz-sim-scene-broadcaster-system", "gz::sim::systems::SceneBroadcaster")
    _plugin(world_el, "gz-sim-sensors-system", "gz::sim::systems::Sensors", render_engine="ogre2")
    _plugin(world_el, "gz-sim-imu-system", "gz::sim::systems::Imu")
    _plugin(world_el, "gz-sim-navsat-system", "gz::sim::systems::NavSat")

    sph = _sub(world_el, "spherical_coordinates")
    _sub(sph, "surface_model", "EARTH_WGS84")
    _sub(sph, "world_frame_orientation", "ENU")
    _sub(sph, "latitude_deg", _num(cfg.datum_lat_deg, 9))
    _sub(sph, "longitude_deg", _num(cfg.datum_lon_deg, 9))
    _sub(sph, "elevation", _num(cfg.datum_alt_m, 4))
    _sub(sph, "heading_deg", "0")

    # Gazebo has no fog or rain: a preset sets the sun, the ambient light and the sky colour
    shadows = "true" if light.shadows else "false"
    scene = _sub(world_el, "scene")
    _sub(scene, "ambient", _nums(*_clip_rgb(np.multiply(light.ambient, light.light_color)), 1.0, digits=3))
    _sub(scene, "background", _nums(*_clip_rgb(np.divide(light.sky_horizon, 255.0)), 1.0, digits=3))
    _sub(scene, "shadows", shadows)
    _sub(scene, "grid", "false")

    sun = _sub(world_el, "light", type="directional", name="sun")
    _sub(sun, "cast_shadows", shadows)
    _pose(sun, 0.0, 0.0, 100.0)
    _sub(sun, "diffuse", _nums(*_clip_rgb(np.multiply(light.diffuse, light.light_color)), 1.0, digits=3))
    _sub(sun, "specular", _nums(*_clip_rgb(np.multiply(light.specular, light.light_color)), 1.0, digits=3))
    # the preset points towards the light; SDF wants the direction the light travels
    _sub(sun, "direction", _nums(*(-np.asarray(light.light_direction, dtype=np.float64)), digits=6))

    _add_terrain(world_el)
    _add_trees(world_el, world)
    _add_ground_cover(world_el, world)
    for name, pose in zip(names, plan.poses):
        _add_rover(world_el, name, pose, plan.geometry, plan.camera, plan.rates)

    ET.indent(root, space="  ")
    comment = (
        f"<!-- forest_perception forest world: seed {cfg.seed}, {cfg.size_m:g} m, {len(world.trees)} trees, "
        f"{len(world.logs)} logs, {len(world.bushes)} bushes, {len(world.rocks)} rocks, "
        f"rovers {', '.join(names)}. Written by forest_perception.sim.gazebo; run: gz sim -r world.sdf -->\n"
    )
    return '<?xml version="1.0" ?>\n' + comment + ET.tostring(root, encoding="unicode") + "\n"


def world_name(world: ForestWorld) -> str:
    """Gazebo world name (it appears in gz topics such as ``/world/<name>/clock``)."""
    return f"forest_seed{world.config.seed}"


def bridge_yaml(rover_names: Iterable[str]) -> str:
    """parameter_bridge configuration text for ``rover_names``."""
    header = (
        "# ros_gz_bridge parameter_bridge configuration (forest_perception rover topic contract)\n"
        "# ros2 run ros_gz_bridge parameter_bridge --ros-args -p config_file:=<this file>"
        " -p use_sim_time:=true\n"
    )
    return header + yaml.safe_dump(bridge_entries(rover_names), sort_keys=False, default_flow_style=False)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)


def export_gazebo(
    world: ForestWorld,
    out_dir: Path | str,
    rover_names: Iterable[str] = ("rover_0",),
    intrinsics: CameraIntrinsics | None = None,
    camera_rate_hz: float = 15.0,
    imu_rate_hz: float = 200.0,
    gps_rate_hz: float = 10.0,
    encoder_rate_hz: float = 50.0,
    weather: WeatherPreset | str | None = None,
    geometry: RoverGeometry | None = None,
    overwrite: bool = False,
) -> GazeboExport:
    """Write ``world.sdf``, ``bridge.yaml`` and the terrain meshes of ``world`` into ``out_dir``.

    ``intrinsics`` defaults to ``CameraIntrinsics()``; ``weather`` sets the sun and sky (see
    :func:`resolve_weather`). Raises ``ValueError`` naming a bad rover name, rate or camera, and
    ``FileExistsError`` naming the files when ``out_dir`` holds an earlier export and ``overwrite``
    is False (then nothing is written).
    """
    plan = _plan(world, rover_names, intrinsics, camera_rate_hz, imu_rate_hz, gps_rate_hz, encoder_rate_hz,
                 weather, geometry)
    sdf_text = _render_sdf(world, plan)
    out = Path(out_dir)
    result = GazeboExport(
        out_dir=out,
        world_sdf=out / WORLD_SDF_NAME,
        bridge_yaml=out / BRIDGE_YAML_NAME,
        terrain_obj=out / TERRAIN_MESH_NAME,
        terrain_collision_obj=out / TERRAIN_COLLISION_MESH_NAME,
        world_name=world_name(world),
        rover_names=plan.names,
        rover_poses=plan.poses,
    )
    earlier = [p.name for p in result.files if p.exists()]
    if earlier and not overwrite:
        raise FileExistsError(
            f"{out} already holds an exported world ({', '.join(earlier)}); nothing was replaced: give another "
            "folder, or replace it on purpose (--overwrite)"
        )
    write_obj(terrain_mesh(world.terrain), result.terrain_obj)
    write_obj(terrain_mesh(collision_terrain(world.terrain)), result.terrain_collision_obj)
    _write(result.bridge_yaml, bridge_yaml(plan.names))
    _write(result.world_sdf, sdf_text)
    return result
