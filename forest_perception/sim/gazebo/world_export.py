"""Export a generated forest to Gazebo (Harmonic, gz-sim 8): world.sdf, the terrain meshes and bridge.yaml.

The world's SDF holds physics and the world systems, the GPS datum, the sun and sky of a weather
preset, the terrain, one static model per tree, log, bush and rock, and the rovers
(:mod:`rover_model`). Details: docs/simulator.md (`forest_perception.sim.gazebo`).
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from forest_perception.frames import CameraIntrinsics, RoverGeometry
from forest_perception.geo import rot_y, rot_z, rpy_from_rotation
from forest_perception.sim.gazebo.bridge import bridge_yaml, check_rover_names
from forest_perception.sim.gazebo.rover_model import add_rover, check_rate, spawn_poses
from forest_perception.sim.gazebo.sdf import (
    PHYSICS_STEP_S,
    SDF_VERSION,
    add_material,
    add_plugin,
    add_pose,
    add_shape,
    clip_rgb,
    num,
    nums,
    sub,
)
from forest_perception.sim.meshes import terrain_mesh, write_obj
from forest_perception.sim.terrain import Terrain
from forest_perception.sim.weather import WEATHER_PRESETS, WeatherPreset, get_weather
from forest_perception.sim.world import ForestWorld

WORLD_SDF_NAME = "world.sdf"
BRIDGE_YAML_NAME = "bridge.yaml"
TERRAIN_MESH_NAME = "meshes/terrain.obj"
TERRAIN_COLLISION_MESH_NAME = "meshes/terrain_collision.obj"
# the collision mesh keeps at most this many cells per side (a 1000 m world at 0.1 m would
# otherwise hand the physics engine 200 M triangles); the visual mesh keeps every cell
COLLISION_MAX_CELLS = 512
DEFAULT_WEATHER = "overcast"  # the simulator's default preset
TRUNK_SINK_M = 0.3


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


def _lean_rpy(lean: float, lean_dir: float) -> tuple[float, float, float]:
    """Orientation that tilts +z by ``lean`` towards bearing ``lean_dir`` (Rz(d) Ry(lean) Rz(-d))."""
    rz = rot_z(lean_dir)
    return rpy_from_rotation(rz @ rot_y(lean) @ rz.T)


_BARK = (0.36, 0.27, 0.19)
_CONIFER = (0.13, 0.30, 0.14)
_BROADLEAF = (0.25, 0.45, 0.16)
_LOG = (0.42, 0.33, 0.24)
_BUSH = (0.22, 0.40, 0.15)
_ROCK = (0.50, 0.49, 0.46)
_GROUND = (0.33, 0.28, 0.20)


def _static_model(world_el: ET.Element, name: str, x: float, y: float, z: float, yaw: float = 0.0,
                  link_rpy: tuple[float, float, float] | None = None) -> ET.Element:
    model = sub(world_el, "model", name=name)
    sub(model, "static", "true")
    add_pose(model, x, y, z, 0.0, 0.0, yaw)
    link = sub(model, "link", name="link")
    if link_rpy is not None:
        add_pose(link, 0.0, 0.0, 0.0, *link_rpy)
    return link


def _add_terrain(world_el: ET.Element) -> None:
    link = _static_model(world_el, "terrain", 0.0, 0.0, 0.0)
    col = sub(link, "collision", name="collision")
    sub(sub(sub(col, "geometry"), "mesh"), "uri", TERRAIN_COLLISION_MESH_NAME)
    surface = sub(sub(sub(col, "surface"), "friction"), "ode")
    sub(surface, "mu", "0.9")
    sub(surface, "mu2", "0.9")
    vis = sub(link, "visual", name="visual")
    sub(sub(sub(vis, "geometry"), "mesh"), "uri", TERRAIN_MESH_NAME)
    add_material(vis, _GROUND)


def _add_trees(world_el: ET.Element, world: ForestWorld) -> None:
    for i, tree in enumerate(world.trees):
        # the link carries the lean so trunk and crown tilt together about the stem base
        link = _static_model(world_el, f"tree_{i}", tree.x, tree.y, tree.z,
                             link_rpy=_lean_rpy(tree.lean, tree.lean_dir))
        # both cylinders reach TRUNK_SINK_M underground so no gap opens on the downhill side
        flare_top, trunk_top = 0.5, 0.9 * tree.height
        add_shape(link, "flare", "cylinder", (0, 0, 0.5 * (flare_top - TRUNK_SINK_M)),
               {"radius": num(tree.radius_at(0.25)), "length": num(flare_top + TRUNK_SINK_M)}, _BARK, True)
        add_shape(link, "trunk", "cylinder", (0, 0, 0.5 * (trunk_top - TRUNK_SINK_M)),
               {"radius": num(tree.dbh / 2.0), "length": num(trunk_top + TRUNK_SINK_M)}, _BARK, True)
        crown_half = max((tree.height - tree.crown_base) / 2.0, 0.3)
        add_shape(link, "crown", "ellipsoid", (0, 0, tree.height - crown_half),
               {"radii": nums(tree.crown_radius, tree.crown_radius, crown_half)},
               _CONIFER if tree.conifer else _BROADLEAF, False)


def _add_ground_cover(world_el: ET.Element, world: ForestWorld) -> None:
    for i, log in enumerate(world.logs):
        link = _static_model(world_el, f"log_{i}", log.x, log.y, log.z, log.yaw)
        # a cylinder's axis is z; pitch it onto x, which the model's yaw turns along the log
        add_shape(link, "log", "cylinder", (0, 0, 0, 0, math.pi / 2, 0),
               {"radius": num(log.diameter / 2.0), "length": num(log.length)}, _LOG, True)
    for i, bush in enumerate(world.bushes):
        link = _static_model(world_el, f"bush_{i}", bush.x, bush.y, bush.z)
        add_shape(link, "bush", "ellipsoid", (0, 0, 0.45 * bush.height),
               {"radii": nums(bush.radius, bush.radius, bush.height / 2.0)}, _BUSH, True)
    for i, rock in enumerate(world.rocks):
        link = _static_model(world_el, f"rock_{i}", rock.x, rock.y, rock.z, rock.yaw)
        add_shape(link, "rock", "ellipsoid", (0, 0, 0),
               {"radii": nums(rock.radius, 0.85 * rock.radius, rock.squash * rock.radius)}, _ROCK, True)


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
    names = check_rover_names(rover_names)
    geo = geometry or RoverGeometry()
    return _Plan(
        names=names,
        camera=(intrinsics or CameraIntrinsics()).validate(),
        geometry=geo,
        rates={
            "camera": check_rate("camera_rate_hz", camera_rate_hz),
            "imu": check_rate("imu_rate_hz", imu_rate_hz),
            "gps": check_rate("gps_rate_hz", gps_rate_hz),
            "encoder": check_rate("encoder_rate_hz", encoder_rate_hz),
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
    world_el = sub(root, "world", name=world_name(world))

    physics = sub(world_el, "physics", name="1ms", type="ignored")
    sub(physics, "max_step_size", num(PHYSICS_STEP_S, 6))
    sub(physics, "real_time_factor", "1")
    sub(world_el, "gravity", "0 0 -9.80665")

    add_plugin(world_el, "gz-sim-physics-system", "gz::sim::systems::Physics")
    add_plugin(world_el, "gz-sim-user-commands-system", "gz::sim::systems::UserCommands")
    add_plugin(world_el, "gz-sim-scene-broadcaster-system", "gz::sim::systems::SceneBroadcaster")
    add_plugin(world_el, "gz-sim-sensors-system", "gz::sim::systems::Sensors", render_engine="ogre2")
    add_plugin(world_el, "gz-sim-imu-system", "gz::sim::systems::Imu")
    add_plugin(world_el, "gz-sim-navsat-system", "gz::sim::systems::NavSat")

    sph = sub(world_el, "spherical_coordinates")
    sub(sph, "surface_model", "EARTH_WGS84")
    sub(sph, "world_frame_orientation", "ENU")
    sub(sph, "latitude_deg", num(cfg.datum_lat_deg, 9))
    sub(sph, "longitude_deg", num(cfg.datum_lon_deg, 9))
    sub(sph, "elevation", num(cfg.datum_alt_m, 4))
    sub(sph, "heading_deg", "0")

    # Gazebo has no fog or rain: a preset sets the sun, the ambient light and the sky colour
    shadows = "true" if light.shadows else "false"
    scene = sub(world_el, "scene")
    sub(scene, "ambient", nums(*clip_rgb(np.multiply(light.ambient, light.light_color)), 1.0, digits=3))
    sub(scene, "background", nums(*clip_rgb(np.divide(light.sky_horizon, 255.0)), 1.0, digits=3))
    sub(scene, "shadows", shadows)
    sub(scene, "grid", "false")

    sun = sub(world_el, "light", type="directional", name="sun")
    sub(sun, "cast_shadows", shadows)
    add_pose(sun, 0.0, 0.0, 100.0)
    sub(sun, "diffuse", nums(*clip_rgb(np.multiply(light.diffuse, light.light_color)), 1.0, digits=3))
    sub(sun, "specular", nums(*clip_rgb(np.multiply(light.specular, light.light_color)), 1.0, digits=3))
    # the preset points towards the light; SDF wants the direction the light travels
    sub(sun, "direction", nums(*(-np.asarray(light.light_direction, dtype=np.float64)), digits=6))

    _add_terrain(world_el)
    _add_trees(world_el, world)
    _add_ground_cover(world_el, world)
    for name, pose in zip(names, plan.poses):
        add_rover(world_el, name, pose, plan.geometry, plan.camera, plan.rates)

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
