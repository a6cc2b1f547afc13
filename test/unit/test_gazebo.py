"""Gazebo export: SDF completeness, terrain meshes, bridge config, determinism, CLI, launch file.

Gazebo is not installed here, so the SDF is checked structurally (xml.etree) against the
world model and the topic contract; nothing is loaded into gz-sim.
"""

from __future__ import annotations

import ast
import json
import math
import xml.etree.ElementTree as ET
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import yaml

from forest_perception.frames import WHEEL_JOINTS, CameraIntrinsics, RoverGeometry
from forest_perception.sim import gazebo
from forest_perception.sim.cli import WORLD_FLAGS, main
from forest_perception.sim.gazebo import (
    BRIDGED_TOPICS,
    bridge_entries,
    collision_terrain,
    export_gazebo,
    gz_topic,
    rotation_from_rpy,
    rpy_from_matrix,
    spawn_poses,
    world_sdf,
)
from forest_perception.sim.terrain import Terrain
from forest_perception.sim.weather import get_weather
from forest_perception.sim.world import WorldConfig, generate_world

ROOT = Path(__file__).resolve().parents[2]
SEED = 8  # a 20 m world with trees, logs, bushes and rocks
ROVERS = ("rover_0", "rover_1")
CAMERA = CameraIntrinsics(width=256, height=192, hfov_deg=80.0)
RATES = {"camera_rate_hz": 20.0, "imu_rate_hz": 100.0, "gps_rate_hz": 5.0, "encoder_rate_hz": 25.0}

# The rover topic contract of DESIGN.md, written out independently of the exporter.
CONTRACT = {
    "camera/image_raw": "sensor_msgs/msg/Image",
    "camera/camera_info": "sensor_msgs/msg/CameraInfo",
    "camera/depth/image_raw": "sensor_msgs/msg/Image",
    "imu/data": "sensor_msgs/msg/Imu",
    "gps/fix": "sensor_msgs/msg/NavSatFix",
    "joint_states": "sensor_msgs/msg/JointState",
    "odom": "nav_msgs/msg/Odometry",
    "cmd_vel": "geometry_msgs/msg/Twist",
}
# ROS <-> Gazebo pairs ros_gz_bridge can convert (its README's table, the ones we use)
VALID_PAIRS = {
    ("sensor_msgs/msg/Image", "gz.msgs.Image"),
    ("sensor_msgs/msg/CameraInfo", "gz.msgs.CameraInfo"),
    ("sensor_msgs/msg/Imu", "gz.msgs.IMU"),
    ("sensor_msgs/msg/NavSatFix", "gz.msgs.NavSat"),
    ("sensor_msgs/msg/JointState", "gz.msgs.Model"),
    ("nav_msgs/msg/Odometry", "gz.msgs.Odometry"),
    ("geometry_msgs/msg/Twist", "gz.msgs.Twist"),
    ("rosgraph_msgs/msg/Clock", "gz.msgs.Clock"),
}


@pytest.fixture(scope="module")
def world():
    return generate_world(seed=SEED, size_m=20.0)


@pytest.fixture(scope="module")
def export(world, tmp_path_factory):
    return export_gazebo(world, tmp_path_factory.mktemp("gz"), rover_names=ROVERS, intrinsics=CAMERA, **RATES)


@pytest.fixture(scope="module")
def sdf(export):
    return ET.parse(export.world_sdf).getroot()


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split()]


def model(sdf_root: ET.Element, name: str) -> ET.Element:
    found = sdf_root.find(f"world/model[@name='{name}']")
    assert found is not None, f"no model {name!r}"
    return found


def plugin(parent: ET.Element, name: str) -> ET.Element:
    found = parent.find(f"plugin[@name='{name}']")
    assert found is not None, f"no plugin {name!r}"
    return found


def sensor(rover: ET.Element, kind: str) -> ET.Element:
    found = rover.findall(f"link/sensor[@type='{kind}']")
    assert len(found) == 1, f"expected one {kind} sensor, found {len(found)}"
    return found[0]


def parse_obj(path: Path) -> dict[str, list[list[str]]]:
    rows: dict[str, list[list[str]]] = {"v": [], "vt": [], "vn": [], "f": []}
    for line in path.read_text().splitlines():
        parts = line.split()
        if parts and parts[0] in rows:
            rows[parts[0]].append(parts[1:])
    return rows


# ----------------------------------------------------------------------------- SDF


def test_sdf_is_well_formed_with_one_world(sdf, world):
    assert sdf.tag == "sdf" and sdf.get("version") == gazebo.SDF_VERSION
    worlds = sdf.findall("world")
    assert len(worlds) == 1 and worlds[0].get("name") == f"forest_seed{SEED}"
    assert float(worlds[0].findtext("physics/max_step_size")) <= 1.0 / RATES["imu_rate_hz"]
    assert worlds[0].find("light[@type='directional']") is not None


def test_world_systems_are_loaded(sdf):
    plugins = {p.get("filename"): p for p in sdf.findall("world/plugin")}
    for needed in (
        "gz-sim-physics-system",
        "gz-sim-user-commands-system",
        "gz-sim-scene-broadcaster-system",
        "gz-sim-sensors-system",
        "gz-sim-imu-system",
        "gz-sim-navsat-system",
    ):
        assert needed in plugins, f"world lacks {needed}"
        assert plugins[needed].get("name").startswith("gz::sim::systems::")
    assert plugins["gz-sim-sensors-system"].findtext("render_engine") == "ogre2"


def test_spherical_coordinates_are_the_world_datum(sdf, world):
    sph = sdf.find("world/spherical_coordinates")
    cfg = world.config
    assert sph.findtext("surface_model") == "EARTH_WGS84"
    assert sph.findtext("world_frame_orientation") == "ENU"
    assert float(sph.findtext("latitude_deg")) == pytest.approx(cfg.datum_lat_deg, abs=1e-9)
    assert float(sph.findtext("longitude_deg")) == pytest.approx(cfg.datum_lon_deg, abs=1e-9)
    assert float(sph.findtext("elevation")) == pytest.approx(cfg.datum_alt_m, abs=1e-4)


@pytest.mark.parametrize("kind", ["trees", "logs", "bushes", "rocks"])
def test_one_static_model_per_world_object_at_its_position(sdf, world, kind):
    prefix = {"trees": "tree", "logs": "log", "bushes": "bush", "rocks": "rock"}[kind]
    objects = getattr(world, kind)
    assert objects, f"test world has no {kind}"
    names = [m.get("name") for m in sdf.findall("world/model") if m.get("name").startswith(prefix + "_")]
    assert names == [f"{prefix}_{i}" for i in range(len(objects))]
    for i, obj in enumerate(objects):
        m = model(sdf, f"{prefix}_{i}")
        assert m.findtext("static") == "true"
        x, y, z, _roll, _pitch, yaw = floats(m.findtext("pose"))
        assert (x, y, z) == pytest.approx((obj.x, obj.y, obj.z), abs=1e-4)
        if hasattr(obj, "yaw"):
            assert yaw == pytest.approx(obj.yaw, abs=1e-6)
        assert m.find("link/visual") is not None


def test_trees_have_trunk_collision_crown_and_lean(sdf, world):
    for i, tree in enumerate(world.trees):
        link = model(sdf, f"tree_{i}").find("link")
        trunk = link.find("collision[@name='trunk_collision']/geometry/cylinder")
        assert float(trunk.findtext("radius")) == pytest.approx(tree.dbh / 2, abs=1e-4)
        crown = link.find("visual[@name='crown_visual']")
        radii = floats(crown.findtext("geometry/ellipsoid/radii"))
        assert radii[0] == pytest.approx(tree.crown_radius, abs=1e-4)
        assert floats(crown.findtext("pose"))[2] + radii[2] == pytest.approx(tree.height, abs=1e-3)
        assert link.find("collision[@name='crown_collision']") is None  # a low rover never touches crowns
        # the link's rotation tilts the trunk axis as Tree.axis_at does
        rot = rotation_from_rpy(*floats(link.findtext("pose"))[3:])
        axis = rot @ np.array([0.0, 0.0, 1.0])
        h = 10.0
        ax, ay = tree.axis_at(h)
        assert tree.x + axis[0] / axis[2] * h == pytest.approx(ax, abs=1e-4)
        assert tree.y + axis[1] / axis[2] * h == pytest.approx(ay, abs=1e-4)


def test_logs_lie_along_their_yaw(sdf, world):
    for i, log in enumerate(world.logs):
        m = model(sdf, f"log_{i}")
        yaw = floats(m.findtext("pose"))[5]
        col = m.find("link/collision")
        rot = rotation_from_rpy(0, 0, yaw) @ rotation_from_rpy(*floats(col.findtext("pose"))[3:])
        axis = rot @ np.array([0.0, 0.0, 1.0])
        assert axis == pytest.approx([math.cos(log.yaw), math.sin(log.yaw), 0.0], abs=1e-5)
        assert float(col.findtext("geometry/cylinder/length")) == pytest.approx(log.length, abs=1e-4)


def test_every_rover_has_diff_drive_with_the_geometry(sdf):
    geo = RoverGeometry()
    for ns in ROVERS:
        rover = model(sdf, ns)
        dd = plugin(rover, "gz::sim::systems::DiffDrive")
        assert dd.get("filename") == "gz-sim-diff-drive-system"
        assert (dd.findtext("left_joint"), dd.findtext("right_joint")) == WHEEL_JOINTS
        assert float(dd.findtext("wheel_separation")) == pytest.approx(geo.track_width_m)
        assert float(dd.findtext("wheel_radius")) == pytest.approx(geo.wheel_radius_m)
        assert dd.findtext("topic") == f"/{ns}/cmd_vel"
        assert dd.findtext("odom_topic") == gz_topic(ns, "odom")
        assert (dd.findtext("frame_id"), dd.findtext("child_frame_id")) == ("odom", "base_link")
        assert float(dd.findtext("odom_publish_frequency")) == RATES["encoder_rate_hz"]
        links = {link.get("name"): link for link in rover.findall("link")}
        assert next(iter(links)) == "base_link"  # the canonical link, child frame of odom
        for joint_name, side in zip(WHEEL_JOINTS, (1, -1)):
            joint = rover.find(f"joint[@name='{joint_name}']")
            assert joint.get("type") == "revolute"
            assert joint.findtext("parent") == "base_link"
            wheel = links[joint.findtext("child")]
            x, y, z, roll, _, _ = floats(wheel.findtext("pose"))
            assert (x, y, z) == pytest.approx((0.0, side * geo.track_width_m / 2, 0.0))
            # the joint axis (z of the wheel link) must point left so positive spin drives forward
            axis = rotation_from_rpy(roll, 0, 0) @ np.array(floats(joint.findtext("axis/xyz")))
            assert axis == pytest.approx([0.0, 1.0, 0.0], abs=1e-6)
            wheel_col = wheel.find("collision/geometry/cylinder")
            assert float(wheel_col.findtext("radius")) == pytest.approx(geo.wheel_radius_m)
        jsp = plugin(rover, "gz::sim::systems::JointStatePublisher")
        assert jsp.findtext("topic") == gz_topic(ns, "joint_states")
        assert tuple(e.text for e in jsp.findall("joint_name")) == WHEEL_JOINTS


def test_every_rover_has_rgbd_imu_and_navsat_at_the_requested_rates(sdf):
    for ns in ROVERS:
        rover = model(sdf, ns)
        cam = sensor(rover, "rgbd_camera")
        assert float(cam.findtext("update_rate")) == RATES["camera_rate_hz"]
        assert int(cam.findtext("camera/image/width")) == CAMERA.width
        assert int(cam.findtext("camera/image/height")) == CAMERA.height
        hfov = float(cam.findtext("camera/horizontal_fov"))
        assert hfov == pytest.approx(math.radians(CAMERA.hfov_deg), abs=1e-6)
        assert float(cam.findtext("camera/depth_camera/clip/near")) == pytest.approx(0.28)
        assert float(cam.findtext("camera/depth_camera/clip/far")) == pytest.approx(10.0)
        assert float(cam.findtext("camera/lens/intrinsics/fx")) == pytest.approx(CAMERA.fx, abs=1e-5)
        assert float(cam.findtext("camera/lens/intrinsics/cx")) == pytest.approx(CAMERA.cx)
        assert cam.findtext("camera/optical_frame_id") == "camera_color_optical_frame"
        imu = sensor(rover, "imu")
        assert float(imu.findtext("update_rate")) == RATES["imu_rate_hz"]
        assert imu.findtext("imu/orientation_reference_frame/localization") == "ENU"
        nav = sensor(rover, "navsat")
        assert float(nav.findtext("update_rate")) == RATES["gps_rate_hz"]
        for s, frame in ((cam, "camera_link"), (imu, "imu_link"), (nav, "gps_link")):
            assert s.findtext("always_on") == "true"
            assert s.findtext("gz_frame_id") == s.findtext("frame_id") == frame


def test_camera_is_about_0p2_m_above_the_local_ground(sdf, world):
    geo = RoverGeometry()
    for ns in ROVERS:
        rover = model(sdf, ns)
        x, y, z, roll, pitch, yaw = floats(rover.findtext("pose"))
        cam_offset = floats(sensor(rover, "rgbd_camera").findtext("pose"))[:3]
        cam = np.array([x, y, z]) + rotation_from_rpy(roll, pitch, yaw) @ np.array(cam_offset)
        ground = world.terrain.height_at(cam[0], cam[1])
        assert cam[2] - ground == pytest.approx(geo.camera_height_m, abs=0.03)


def test_gz_topics_are_unique_per_rover(sdf):
    seen = []
    for ns in ROVERS:
        rover = model(sdf, ns)
        topics = [e.text for e in rover.iter("topic")] + [e.text for e in rover.iter("odom_topic")]
        topics += [e.text for e in rover.iter("tf_topic")]
        assert topics and all(t.startswith(f"/{ns}/") for t in topics), topics
        seen += topics
    assert len(seen) == len(set(seen))


def test_sdf_topics_feed_the_bridge(sdf):
    for ns in ROVERS:
        rover = model(sdf, ns)
        base = sensor(rover, "rgbd_camera").findtext("topic")
        # gz-sensors' rgbd_camera publishes <topic>/image, /depth_image and /camera_info
        assert gz_topic(ns, "camera/image_raw") == base + "/image"
        assert gz_topic(ns, "camera/depth/image_raw") == base + "/depth_image"
        assert gz_topic(ns, "camera/camera_info") == base + "/camera_info"
        assert sensor(rover, "imu").findtext("topic") == gz_topic(ns, "imu/data")
        assert sensor(rover, "navsat").findtext("topic") == gz_topic(ns, "gps/fix")


def test_spawn_poses_are_clear_of_obstacles_and_each_other(world):
    geo = RoverGeometry()
    poses = spawn_poses(world, 4, geo)
    obstacles = world.obstacle_circles(clearance_h=0.1)
    for i, (x, y, z, _yaw) in enumerate(poses):
        gaps = np.hypot(obstacles[:, 0] - x, obstacles[:, 1] - y) - obstacles[:, 2]
        assert gaps.min() > geo.footprint_radius_m
        assert z > world.terrain.height_at(x, y) + geo.wheel_radius_m - 1e-9
        for x2, y2, _, _ in poses[i + 1:]:
            assert math.hypot(x2 - x, y2 - y) > 2 * geo.footprint_radius_m


def test_weather_sets_the_sun(world):
    dusk = get_weather("dusk")
    root = ET.fromstring(world_sdf(world, weather="dusk"))
    direction = floats(root.findtext("world/light[@name='sun']/direction"))
    assert direction == pytest.approx([-c for c in dusk.light_direction], abs=1e-6)
    assert root.findtext("world/scene/shadows") == "true"
    with pytest.raises(ValueError, match="weather"):
        world_sdf(world, weather="hail")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rover_names": ("rover_0", "rover_0")}, "unique"),
        ({"rover_names": ("0rover",)}, "rover name"),
        ({"rover_names": "rover_0"}, "rover_names"),
        ({"rover_names": ("tree_9",)}, "clashes"),
        ({"rover_names": ()}, "at least one"),
        ({"camera_rate_hz": 0.0}, "camera_rate_hz"),
        ({"imu_rate_hz": float("nan")}, "imu_rate_hz"),
        ({"gps_rate_hz": 5000.0}, "gps_rate_hz"),
        ({"intrinsics": CameraIntrinsics(width=8)}, "camera resolution"),
    ],
)
def test_bad_arguments_are_refused_by_name(world, kwargs, message):
    with pytest.raises(ValueError, match=message):
        world_sdf(world, **kwargs)


def test_rpy_round_trip():
    rng = np.random.default_rng(0)
    for roll, pitch, yaw in rng.uniform(-1.4, 1.4, size=(20, 3)):
        rot = rotation_from_rpy(roll, pitch, yaw)
        assert rotation_from_rpy(*rpy_from_matrix(rot)) == pytest.approx(rot, abs=1e-12)


# ----------------------------------------------------------------------------- terrain meshes


def test_terrain_obj_has_every_height_sample_with_normals_and_uvs(export, world):
    ny, nx = world.terrain.heights.shape
    obj = parse_obj(export.terrain_obj)
    verts = np.array(obj["v"], dtype=float)
    assert verts.shape == (nx * ny, 3)
    assert verts[:, 2] == pytest.approx(world.terrain.heights.ravel(), abs=1e-4)
    assert verts[:, 0].min() == pytest.approx(world.terrain.extent[0])
    assert verts[:, 1].max() == pytest.approx(world.terrain.extent[3])
    assert len(obj["vt"]) == len(obj["vn"]) == nx * ny
    normals = np.array(obj["vn"], dtype=float)
    assert np.linalg.norm(normals, axis=1) == pytest.approx(np.ones(nx * ny), abs=1e-3)
    assert (normals[:, 2] > 0).all()
    assert len(obj["f"]) == 2 * (nx - 1) * (ny - 1)
    indices = np.array([[int(c.split("/")[0]) for c in face] for face in obj["f"]])
    assert indices.min() == 1 and indices.max() == nx * ny
    # counter-clockwise seen from above: geometric normals point up
    tri = verts[indices - 1]
    assert (np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])[:, 2] > 0).all()


def test_collision_mesh_is_written_and_referenced(export, sdf, world):
    obj = parse_obj(export.terrain_collision_obj)
    assert len(obj["v"]) == world.terrain.heights.size  # small grids are not decimated
    terrain = model(sdf, "terrain")
    assert terrain.findtext("static") == "true"
    col_uri = terrain.findtext("link/collision/geometry/mesh/uri")
    vis_uri = terrain.findtext("link/visual/geometry/mesh/uri")
    assert export.world_sdf.parent / col_uri == export.terrain_collision_obj
    assert export.world_sdf.parent / vis_uri == export.terrain_obj
    assert not Path(col_uri).is_absolute()


def test_collision_terrain_decimates_large_grids():
    n = 1201
    xs = np.arange(n) * 0.1 - 60.0
    plane = 0.1 * xs[None, :] + 0.2 * xs[:, None]
    terrain = Terrain(heights=plane, resolution=0.1, x0=-60.0, y0=-60.0)
    coarse = collision_terrain(terrain, max_cells=100)
    assert coarse.heights.shape == (101, 101)
    assert coarse.extent == pytest.approx(terrain.extent)
    gx, gy = np.meshgrid(np.linspace(-60, 60, 101), np.linspace(-60, 60, 101))
    assert coarse.heights == pytest.approx(0.1 * gx + 0.2 * gy, abs=1e-9)
    assert collision_terrain(coarse, max_cells=100) is coarse


# ----------------------------------------------------------------------------- bridge


def test_bridged_topics_are_the_design_contract():
    per_rover = {t.ros_topic: t for t in BRIDGED_TOPICS if not t.is_global}
    assert {k: t.ros_type for k, t in per_rover.items()} == CONTRACT
    assert [t.ros_topic for t in BRIDGED_TOPICS if t.is_global] == ["/clock"]


def test_bridge_yaml_covers_exactly_the_contract_per_rover(export):
    entries = yaml.safe_load(export.bridge_yaml.read_text())
    assert isinstance(entries, list)
    keys = {"ros_topic_name", "gz_topic_name", "ros_type_name", "gz_type_name", "direction"}
    assert all(set(e) == keys for e in entries)
    ros_topics = [e["ros_topic_name"] for e in entries]
    expected = {f"/{ns}/{topic}" for ns in ROVERS for topic in CONTRACT} | {"/clock"}
    assert sorted(ros_topics) == sorted(expected)  # every topic, each once
    gz_topics = [e["gz_topic_name"] for e in entries]
    assert len(gz_topics) == len(set(gz_topics))
    for e in entries:
        assert (e["ros_type_name"], e["gz_type_name"]) in VALID_PAIRS, e
        relative = e["ros_topic_name"].split("/", 2)[-1]
        if e["ros_topic_name"] != "/clock":
            assert e["ros_type_name"] == CONTRACT[relative]
        assert e["direction"] == ("ROS_TO_GZ" if relative == "cmd_vel" else "GZ_TO_ROS"), e
    assert entries == bridge_entries(ROVERS)


def test_bridge_entries_reject_bad_names():
    with pytest.raises(ValueError, match="rover name"):
        bridge_entries(["rover 0"])
    with pytest.raises(ValueError, match="not a bridged topic"):
        gz_topic("rover_0", "depth/points")


# ----------------------------------------------------------------------------- determinism


def test_export_is_deterministic(world, export, tmp_path):
    again = export_gazebo(generate_world(seed=SEED, size_m=20.0), tmp_path / "again", rover_names=ROVERS,
                          intrinsics=CAMERA, **RATES)
    for first, second in zip(export.files, again.files):
        assert first.read_bytes() == second.read_bytes(), first.name
    assert again.rover_poses == export.rover_poses
    other = world_sdf(generate_world(seed=SEED + 1, size_m=20.0), rover_names=ROVERS)
    assert other != export.world_sdf.read_text()


# ----------------------------------------------------------------------------- CLI


def test_cli_flags_cover_every_world_config_field():
    assert set(WORLD_FLAGS) == {f.name for f in fields(WorldConfig)}
    assert WORLD_FLAGS["size_m"] == "--size"
    assert WORLD_FLAGS["tree_density_per_ha"] == "--tree-density"
    assert len(set(WORLD_FLAGS.values())) == len(WORLD_FLAGS)


def test_cli_summary_json(capsys):
    assert main(["summary", "--seed", "3", "--size", "20", "--tree-density", "800", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = generate_world(seed=3, size_m=20.0, tree_density_per_ha=800).summary()
    assert printed == json.loads(json.dumps(expected))


def test_cli_summary_table(capsys):
    assert main(["summary", "--seed", "3", "--size", "20"]) == 0
    out = capsys.readouterr().out
    assert "trees" in out and "terrain_relief_m" in out


def test_cli_export_gazebo(tmp_path, capsys):
    out = tmp_path / "forest"
    assert main(["export-gazebo", "--out", str(out), "--rovers", "2", "--seed", "4", "--size", "20",
                 "--weather", "sunny", "--camera-rate", "30"]) == 0
    printed = capsys.readouterr().out
    for name in ("world.sdf", "bridge.yaml", "meshes/terrain.obj", "meshes/terrain_collision.obj"):
        assert (out / name).is_file()
        assert str((out / name).resolve()) in printed
    assert f"gz sim -r {(out / 'world.sdf').resolve()}" in printed
    assert f"parameter_bridge --ros-args -p config_file:={(out / 'bridge.yaml').resolve()}" in printed
    root = ET.parse(out / "world.sdf").getroot()
    assert {m.get("name") for m in root.findall("world/model")} >= {"rover_0", "rover_1"}
    assert float(root.findtext(".//sensor[@type='rgbd_camera']/update_rate")) == 30.0


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["summary", "--tree-density", "-1"], ("--tree-density",)),
        (["summary", "--size", "5"], ("--size",)),
        (["summary", "--terrain-resolution", "100"], ("--terrain-resolution", "--size/4")),
        (["export-gazebo", "--out", "{tmp}", "--conifer-fraction", "2"], ("--conifer-fraction",)),
        (["export-gazebo", "--out", "{tmp}", "--imu-rate", "0"], ("--imu-rate",)),
        (["export-gazebo", "--out", "{tmp}", "--rovers", "0"], ("--rovers",)),
    ],
)
def test_cli_refuses_bad_values_with_exit_2_naming_the_flag(argv, names, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith(f"forest-sim {argv[0]}: error: ")
    for name in names:
        assert name in err
    for python_name in ("tree_density_per_ha", "size_m", "terrain_resolution_m", "conifer_fraction", "imu_rate_hz"):
        assert python_name not in err


def test_export_into_a_folder_with_an_earlier_world_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "forest"
    argv = ["export-gazebo", "--out", str(out), "--seed", "4", "--size", "20"]
    assert main(argv) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main([*argv[:-2], "--size", "30"]) == 2
    err = capsys.readouterr().err
    assert "already holds an exported world" in err and "--overwrite" in err and "overwrite=" not in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing replaced
    assert main([*argv[:-2], "--size", "30", "--overwrite"]) == 0
    assert (out / "world.sdf").read_bytes() != before[out / "world.sdf"]
    with pytest.raises(FileExistsError, match="nothing was replaced"):
        export_gazebo(generate_world(seed=4, size_m=20.0), out)


# ----------------------------------------------------------------------------- launch file


def test_gazebo_launch_file_starts_gz_sim_and_the_bridge():
    path = ROOT / "launch" / "gazebo_sim.launch.py"
    tree = ast.parse(path.read_text())
    functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert "generate_launch_description" in functions
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    for needed in ("ros_gz_sim", "gz_sim.launch.py", "gz_args", "ros_gz_bridge", "parameter_bridge",
                   "config_file", "use_sim_time", "world_sdf", "bridge_config"):
        assert needed in strings, f"launch file never mentions {needed!r}"
    assert any(s.strip() == "-r" for s in strings)
    calls = {getattr(n.func, "id", "") for n in ast.walk(tree) if isinstance(n, ast.Call)}
    assert {"IncludeLaunchDescription", "DeclareLaunchArgument", "Node", "LaunchConfiguration"} <= calls
    sim_time = [n for n in ast.walk(tree) if isinstance(n, ast.Dict)
                and any(isinstance(k, ast.Constant) and k.value == "use_sim_time" for k in n.keys)]
    assert sim_time and all(
        isinstance(v, ast.Constant) and v.value is True
        for d in sim_time for k, v in zip(d.keys, d.values) if getattr(k, "value", None) == "use_sim_time"
    )
