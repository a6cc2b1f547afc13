"""The rover in the Gazebo export: its SDF model (body, wheels, RGB-D camera, IMU, NavSat) and start poses.

The model follows :class:`RoverGeometry` and the frame names of the topic contract; sensor noise is
MEMS/consumer-GPS class. Details: docs/simulator.md (`forest_perception.sim.gazebo`).
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import numpy as np

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
from forest_perception.sim.gazebo.bridge import CAMERA_GZ_TOPIC, gz_topic
from forest_perception.sim.gazebo.sdf import (
    PHYSICS_STEP_S,
    add_frame_id,
    add_geometry,
    add_inertial,
    add_noise,
    add_plugin,
    add_pose,
    add_shape,
    num,
    nums,
    sub,
)
from forest_perception.sim.world import ForestWorld

MAX_SENSOR_RATE_HZ = 1.0 / PHYSICS_STEP_S

# RealSense D435: depth is valid from about 0.28 m to 10 m; colour sees from a few cm
DEPTH_NEAR_M = 0.28
DEPTH_FAR_M = 10.0
COLOR_NEAR_M = 0.05
COLOR_FAR_M = 120.0

WHEEL_WIDTH_M = 0.04
WHEEL_MASS_KG = 0.25
CASTER_RADIUS_M = 0.025
SPAWN_DROP_M = 0.01  # rovers start this far above the highest ground under their contacts

IMU_GYRO_STDDEV = 0.002  # rad/s, MEMS class
IMU_ACCEL_STDDEV = 0.02  # m/s^2
GPS_HORIZONTAL_STDDEV_M = 1.5
GPS_VERTICAL_STDDEV_M = 3.0
GPS_VELOCITY_STDDEV_MPS = 0.05


def check_rate(name: str, value: float) -> float:
    """``value`` as a float; ``ValueError`` naming ``name`` unless it is a rate the physics step can serve."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 < value <= MAX_SENSOR_RATE_HZ):
        raise ValueError(
            f"{name} must be within (0, {MAX_SENSOR_RATE_HZ:g}] Hz (the physics step is 1 ms), got {value!r}"
        )
    return float(value)


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


def add_rover(world_el: ET.Element, name: str, pose: tuple[float, float, float, float], geo: RoverGeometry,
              cam: CameraIntrinsics, rates: dict[str, float]) -> None:
    """Add a differential-drive rover model ``name`` at ``pose`` (x, y, z, yaw of base_link) to the world.

    Body, casters, wheels, RGB-D camera, IMU and NavSat sensors, the DiffDrive and JointStatePublisher
    systems, on the topics of namespace ``name``; ``rates`` holds the "camera", "imu", "gps" and
    "encoder" rates in Hz.
    """
    model = sub(world_el, "model", name=name)
    add_pose(model, pose[0], pose[1], pose[2], 0.0, 0.0, pose[3])

    # base_link on the axle centre (RoverGeometry); the body box sits a little above it
    base = sub(model, "link", name=FRAME_BASE)
    body_z = 0.5 * geo.body_height_m - 0.02
    body_mass = max(geo.mass_kg - 2 * WHEEL_MASS_KG, 0.1)
    lx, ly, lz = geo.body_length_m, geo.body_width_m, geo.body_height_m
    add_inertial(base, body_mass, body_mass / 12 * (ly**2 + lz**2), body_mass / 12 * (lx**2 + lz**2),
              body_mass / 12 * (lx**2 + ly**2), (0, 0, body_z))
    add_shape(base, "body", "box", (0, 0, body_z), {"size": nums(lx, ly, lz)}, (0.85, 0.45, 0.10), True)
    caster_x = 0.5 * lx - 0.05
    for label, cx in (("front_caster", caster_x), ("rear_caster", -caster_x)):
        caster_pose = (cx, 0, CASTER_RADIUS_M - geo.wheel_radius_m)
        add_shape(base, label, "sphere", caster_pose, {"radius": num(CASTER_RADIUS_M)}, (0.1, 0.1, 0.1), False)
        col = sub(base, "collision", name=f"{label}_collision")
        add_pose(col, *caster_pose)
        add_geometry(col, "sphere", radius=num(CASTER_RADIUS_M))
        friction = sub(sub(sub(col, "surface"), "friction"), "ode")
        sub(friction, "mu", "0")  # a frictionless ball stands in for a swivel caster
        sub(friction, "mu2", "0")

    # sensors sit on base_link at the geometry's offsets; frame ids follow the topic contract
    cx_, cy_, cz_ = geo.camera_offset_m
    camera = sub(base, "sensor", name="rgbd_camera", type="rgbd_camera")
    add_pose(camera, cx_, cy_, cz_, 0.0, geo.camera_pitch_rad, 0.0)
    sub(camera, "always_on", "true")
    sub(camera, "update_rate", num(rates["camera"]))
    sub(camera, "visualize", "false")
    sub(camera, "topic", f"/{name}/{CAMERA_GZ_TOPIC}")
    add_frame_id(camera, FRAME_CAMERA)
    cam_el = sub(camera, "camera", name="color")
    sub(cam_el, "horizontal_fov", num(math.radians(cam.hfov_deg), 6))
    image = sub(cam_el, "image")
    sub(image, "width", str(int(cam.width)))
    sub(image, "height", str(int(cam.height)))
    sub(image, "format", "R8G8B8")
    clip = sub(cam_el, "clip")
    sub(clip, "near", num(COLOR_NEAR_M))
    sub(clip, "far", num(COLOR_FAR_M))
    depth_clip = sub(sub(cam_el, "depth_camera"), "clip")
    sub(depth_clip, "near", num(DEPTH_NEAR_M))
    sub(depth_clip, "far", num(DEPTH_FAR_M))
    intrinsics = sub(sub(cam_el, "lens"), "intrinsics")
    for key, value in (("fx", cam.fx), ("fy", cam.fy), ("cx", cam.cx), ("cy", cam.cy), ("s", 0.0)):
        sub(intrinsics, key, num(value, 6))
    sub(cam_el, "optical_frame_id", FRAME_CAMERA_OPTICAL)

    imu = sub(base, "sensor", name="imu", type="imu")
    add_pose(imu, *geo.imu_offset_m)
    sub(imu, "always_on", "true")
    sub(imu, "update_rate", num(rates["imu"]))
    sub(imu, "topic", gz_topic(name, "imu/data"))
    add_frame_id(imu, FRAME_IMU)
    imu_el = sub(imu, "imu")
    sub(sub(imu_el, "orientation_reference_frame"), "localization", "ENU")
    for group, stddev in (("angular_velocity", IMU_GYRO_STDDEV), ("linear_acceleration", IMU_ACCEL_STDDEV)):
        group_el = sub(imu_el, group)
        for axis in "xyz":
            add_noise(sub(group_el, axis), stddev)

    navsat = sub(base, "sensor", name="navsat", type="navsat")
    add_pose(navsat, *geo.gps_offset_m)
    sub(navsat, "always_on", "true")
    sub(navsat, "update_rate", num(rates["gps"]))
    sub(navsat, "topic", gz_topic(name, "gps/fix"))
    add_frame_id(navsat, FRAME_GPS)
    nav_el = sub(navsat, "navsat")
    for group, horizontal, vertical in (
        ("position_sensing", GPS_HORIZONTAL_STDDEV_M, GPS_VERTICAL_STDDEV_M),
        ("velocity_sensing", GPS_VELOCITY_STDDEV_MPS, GPS_VELOCITY_STDDEV_MPS),
    ):
        group_el = sub(nav_el, group)
        add_noise(sub(group_el, "horizontal"), horizontal)
        add_noise(sub(group_el, "vertical"), vertical)

    # driven wheels: a cylinder's axis is z, rolled onto +y so positive spin drives forward
    r, half_track = geo.wheel_radius_m, 0.5 * geo.track_width_m
    i_radial = WHEEL_MASS_KG * (3 * r**2 + WHEEL_WIDTH_M**2) / 12
    i_axial = WHEEL_MASS_KG * r**2 / 2
    for joint_name, side in zip(WHEEL_JOINTS, (1.0, -1.0)):
        link_name = joint_name.replace("_joint", "")
        wheel = sub(model, "link", name=link_name)
        add_pose(wheel, 0.0, side * half_track, 0.0, -math.pi / 2, 0.0, 0.0)
        add_inertial(wheel, WHEEL_MASS_KG, i_radial, i_radial, i_axial)
        add_shape(wheel, "wheel", "cylinder", (0, 0, 0), {"radius": num(r), "length": num(WHEEL_WIDTH_M)},
               (0.08, 0.08, 0.08), True)
        joint = sub(model, "joint", name=joint_name, type="revolute")
        sub(joint, "parent", FRAME_BASE)
        sub(joint, "child", link_name)
        axis = sub(joint, "axis")
        sub(axis, "xyz", "0 0 1")
        limit = sub(axis, "limit")
        sub(limit, "lower", "-1.79769e+308")  # continuous, as in gz-sim's diff_drive example
        sub(limit, "upper", "1.79769e+308")

    add_plugin(
        model, "gz-sim-diff-drive-system", "gz::sim::systems::DiffDrive",
        left_joint=WHEEL_JOINTS[0],
        right_joint=WHEEL_JOINTS[1],
        wheel_separation=num(geo.track_width_m, 6),
        wheel_radius=num(geo.wheel_radius_m, 6),
        odom_publish_frequency=num(rates["encoder"]),
        max_linear_velocity=num(geo.max_linear_mps),
        max_angular_velocity=num(geo.max_angular_rps),
        topic=gz_topic(name, "cmd_vel"),
        odom_topic=gz_topic(name, "odom"),
        tf_topic=f"/{name}/tf",
        frame_id=FRAME_ODOM,
        child_frame_id=FRAME_BASE,
    )
    add_plugin(
        model, "gz-sim-joint-state-publisher-system", "gz::sim::systems::JointStatePublisher",
        topic=gz_topic(name, "joint_states"),
        joint_name=list(WHEEL_JOINTS),
        update_rate=num(rates["encoder"]),
    )
