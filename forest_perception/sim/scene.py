"""The rendered scene of a :class:`ForestWorld`: offscreen OpenGL (:mod:`gl_renderer`) or PyBullet's TinyRenderer.

The scene owns the renderer, the world's bodies and the rovers' bodies, culls tiles per frame and
renders rgb, depth and segmentation; the camera model is :mod:`projection`'s, the sun's shadows
:mod:`sun_shadows`'. Both renderers draw the same meshes with the same shading formula; OpenGL on
Mesa's llvmpipe is about four times faster on a CPU. Details: docs/simulator.md (`scene`, `renderer`).
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pybullet as p

from forest_perception.frames import CameraIntrinsics, RoverGeometry
from forest_perception.sim.gl_renderer import resolve_renderer
from forest_perception.sim.meshes import Mesh, box_mesh, cylinder_mesh
from forest_perception.sim.projection import (
    camera_rotation,
    pinhole_projection,
    projection_matrix,
    view_matrix,
    zbuffer_to_depth,
)
from forest_perception.sim.sun_shadows import SunShadowMap, shadow_shading
from forest_perception.sim.textures import (
    GROUND_TEXTURES,
    Palette,
    default_cache_dir,
    generate_textures,
    toned_textures,
)
from forest_perception.sim.weather import CameraEffects, WeatherPreset, apply_camera_pipeline, get_weather
from forest_perception.sim.world import ForestWorld
from forest_perception.sim.world_meshes import CATEGORIES, LOD_ALL, MeshDetail, build_world_meshes

SKY_ID = -1
TEXTURE_VARIANTS = 4
"""Worlds share textures made from ``seed % TEXTURE_VARIANTS`` (texture sets take seconds to make)."""
CATEGORY_IDS: dict[str, int] = {name: i for i, name in enumerate([*CATEGORIES, "rover"])}
"""Semantic class ids for :meth:`ForestScene.semantic_labels` (sky is -1)."""


@dataclass(frozen=True)
class BodyInfo:
    """What a renderer body is: its category, spatial tile and bounding box."""

    category: str
    tile: tuple[int, int] | None
    aabb_min: np.ndarray
    aabb_max: np.ndarray
    n_triangles: int
    lod: int = LOD_ALL


def _part_mesh(shape_type: int, spec: dict) -> Mesh:
    """A rover part (PyBullet primitive) as a mesh in base_link coordinates, for the OpenGL renderer."""
    if shape_type == p.GEOM_BOX:
        mesh = box_mesh(tuple(spec["halfExtents"]))
    else:
        mesh = cylinder_mesh(spec["radius"], spec["length"])
    quat = spec.get("visualFrameOrientation", [0.0, 0.0, 0.0, 1.0])
    rot = np.asarray(p.getMatrixFromQuaternion(quat), dtype=np.float64).reshape(3, 3)
    return mesh.transformed(rot, np.asarray(spec["visualFramePosition"], dtype=np.float64))


def _rover_mesh_parts(geom: RoverGeometry) -> list[tuple[int, dict]]:
    """Primitive visual shapes (type, kwargs) of a rover in base_link coordinates."""
    body_z = 0.02
    parts: list[tuple[int, dict]] = [
        (p.GEOM_BOX, {"halfExtents": [geom.body_length_m / 2, geom.body_width_m / 2, geom.body_height_m / 2],
                      "visualFramePosition": [0.0, 0.0, body_z], "color": "body"}),
    ]
    wheel_x = geom.body_length_m * 0.32
    quat = p.getQuaternionFromEuler([math.pi / 2, 0.0, 0.0])
    for sx in (-1, 1):
        for sy in (-1, 1):
            parts.append((p.GEOM_CYLINDER, {
                "radius": geom.wheel_radius_m, "length": 0.04,
                "visualFramePosition": [sx * wheel_x, sy * geom.track_width_m / 2, 0.0],
                "visualFrameOrientation": quat, "color": "wheel"}))
    cam_z = geom.camera_height_m - geom.wheel_radius_m
    top = body_z + geom.body_height_m / 2
    mast_x = geom.camera_forward_m - 0.06
    # a camera mounted below the body top (a low rig) needs no mast: keep a stub, PyBullet refuses sizes <= 0
    mast_half, mast_z = ((cam_z - top) / 2, (cam_z + top) / 2) if cam_z - top > 0.01 else (0.005, top + 0.005)
    parts.append((p.GEOM_BOX, {"halfExtents": [0.012, 0.012, mast_half],
                               "visualFramePosition": [mast_x, 0.0, mast_z], "color": "wheel"}))
    # camera head sits behind the optical centre, so the rover's own camera never sees it
    parts.append((p.GEOM_BOX, {"halfExtents": [0.025, 0.05, 0.015],
                               "visualFramePosition": [geom.camera_forward_m - 0.035, 0.0, cam_z],
                               "color": "head"}))
    return parts


class ForestScene:
    """A rendered forest: world geometry, rover bodies, and a camera that renders rgb/depth/seg.

    ``ForestScene(world)`` builds textures (PNG, cached in ``cache_dir``, by default a
    shared dir under the system temp dir), meshes and the renderer's bodies. ``renderer``
    is one of :data:`RENDERERS`; :attr:`renderer` tells which one runs. ``texture_filter``
    (OpenGL only, :data:`gl_renderer.TEXTURE_FILTERS`) smooths distant texture; TinyRenderer
    always takes the nearest texel. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, world: ForestWorld, cache_dir: str | Path | None = None,
                 detail: MeshDetail | None = None, texture_size: int = 256, cull: bool = True,
                 texture_seed: int | None = None, palette: Palette | None = None, renderer: str = "auto",
                 texture_filter: str | None = None) -> None:
        self.world = world
        self.renderer = resolve_renderer(renderer)
        self._gl = None
        self.detail = (detail or MeshDetail()).validate()
        self.palette = (palette or Palette()).validate()
        self.cull = cull
        self.texture_size = int(texture_size)
        # a few texture variants across worlds; each is made once and cached
        self.texture_seed = int(world.config.seed) % TEXTURE_VARIANTS if texture_seed is None else int(texture_seed)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._client = -1
        if self.renderer == "opengl":
            from forest_perception.sim.gl_renderer import GLRenderer

            self._gl = GLRenderer(texture_filter=texture_filter)
        else:
            self._client = p.connect(p.DIRECT)
            if self._client < 0:
                raise RuntimeError("could not start a PyBullet DIRECT client")
        self.bodies: dict[int, BodyInfo] = {}
        self._visible: dict[int, bool] = {}
        self._rovers: dict[int, list[int]] = {}  # body -> visual shape indices (TinyRenderer) or GL bodies
        self._rover_colors: dict[int, list[list[float]]] = {}
        self._sun_maps: dict[tuple[float, ...], SunShadowMap] = {}
        try:
            self._build(texture_size)
        except Exception:
            self.close()
            raise
        cullable = [b for b, info in self.bodies.items() if info.category != "rover"]
        self._cull_ids = np.array(cullable, dtype=np.int64)
        self._cull_min = np.array([self.bodies[b].aabb_min for b in cullable]).reshape(-1, 3)
        self._cull_max = np.array([self.bodies[b].aabb_max for b in cullable]).reshape(-1, 3)
        self._cull_lod = np.array([self.bodies[b].lod for b in cullable], dtype=np.int64)
        ground = {c for c, t in CATEGORIES.items() if t in GROUND_TEXTURES}
        self._lod_distance = np.array([self.detail.ground_lod_distance_m if self.bodies[b].category in ground
                                       else self.detail.lod_distance_m for b in cullable])

    # ------------------------------------------------------------ building

    def _load_textures(self, paths: dict[str, Path]) -> None:
        if self._gl is not None:
            for name, path in paths.items():
                self._gl.add_texture_file(name, path)
            self._textures = {name: name for name in paths}
        else:
            self._textures = {name: p.loadTexture(str(path), physicsClientId=self._client)
                              for name, path in paths.items()}

    def _build(self, texture_size: int) -> None:
        tex_paths = generate_textures(self.cache_dir, seed=self.texture_seed, size=texture_size)
        if self.palette.is_identity:
            self._load_textures(tex_paths)
        else:
            # toned copies are throw-away files: a cache of every sampled palette would grow without end,
            # and the renderer holds the pixels once a texture is loaded
            with tempfile.TemporaryDirectory(prefix="forest_palette_") as tmp:
                self._load_textures(toned_textures(tex_paths, self.palette, tmp))
        for group in build_world_meshes(self.world, self.detail):
            body = self._add_mesh_body(group.mesh, self._textures[group.texture])
            lo, hi = group.mesh.bounds()
            self.bodies[body] = BodyInfo(group.category, group.tile, lo - 0.05, hi + 0.05, group.mesh.n_triangles,
                                         group.lod)
            self._visible[body] = True

    def _add_mesh_body(self, mesh: Mesh, texture_id: int | str) -> int:
        if self._gl is not None:
            return self._gl.add_mesh(mesh, str(texture_id))
        cid = self._client
        shape = p.createVisualShape(
            p.GEOM_MESH,
            vertices=mesh.vertices.tolist(),
            indices=mesh.indices.ravel().tolist(),
            uvs=mesh.uvs.tolist(),
            normals=mesh.normals.tolist(),
            physicsClientId=cid,
        )
        if shape < 0:
            raise RuntimeError(f"PyBullet refused a mesh of {mesh.n_vertices} vertices")
        body = p.createMultiBody(baseMass=0.0, baseCollisionShapeIndex=-1, baseVisualShapeIndex=shape,
                                 physicsClientId=cid)
        p.changeVisualShape(body, -1, textureUniqueId=texture_id, rgbaColor=[1, 1, 1, 1], physicsClientId=cid)
        return body

    # ------------------------------------------------------------ rovers

    def add_rover_body(self, color: tuple[float, ...] = (0.85, 0.45, 0.1, 1.0),
                       geometry: RoverGeometry | None = None) -> int:
        """Add a rover visual (chassis, four wheels, camera mast) and return its body id.

        ``color`` is RGB or RGBA within [0, 1]. The body has no collision shape; place it
        with :meth:`set_body_pose` (base_link pose). It starts out of sight, below the ground.
        """
        if len(color) not in (3, 4) or not all(0.0 <= float(c) <= 1.0 for c in color):
            raise ValueError(f"color must be RGB or RGBA within [0, 1], got {color}")
        rgba = [float(c) for c in color] + ([1.0] if len(color) == 3 else [])
        geom = geometry or RoverGeometry()
        palette = {"body": rgba, "wheel": [0.08, 0.08, 0.08, 1.0], "head": [0.15, 0.15, 0.17, 1.0]}
        parts = _rover_mesh_parts(geom)
        if self._gl is not None:
            colours = [palette[spec["color"]] for _, spec in parts]
            first = self._gl.n_bodies
            ids = [self._gl.add_mesh(_part_mesh(t, spec), None, c, seg_id=first)
                   for (t, spec), c in zip(parts, colours)]
            self.bodies[first] = BodyInfo("rover", None, np.zeros(3), np.zeros(3), 12 * len(parts))
            self._rovers[first] = ids
            self._rover_colors[first] = colours
            self.set_body_pose(first, (0.0, 0.0, -100.0), (0.0, 0.0, 0.0, 1.0))
            return first
        kwargs: dict[str, list] = {"shapeTypes": [], "halfExtents": [], "radii": [], "lengths": [],
                                   "rgbaColors": [], "visualFramePositions": [], "visualFrameOrientations": []}
        for shape_type, spec in parts:
            kwargs["shapeTypes"].append(shape_type)
            kwargs["halfExtents"].append(spec.get("halfExtents", [0.0, 0.0, 0.0]))
            kwargs["radii"].append(spec.get("radius", 0.0))
            kwargs["lengths"].append(spec.get("length", 0.0))
            kwargs["rgbaColors"].append(palette[spec["color"]])
            kwargs["visualFramePositions"].append(spec["visualFramePosition"])
            kwargs["visualFrameOrientations"].append(spec.get("visualFrameOrientation", [0.0, 0.0, 0.0, 1.0]))
        shape = p.createVisualShapeArray(physicsClientId=self._client, **kwargs)
        if shape < 0:
            raise RuntimeError("PyBullet refused the rover's visual shapes")
        body = p.createMultiBody(baseMass=0.0, baseCollisionShapeIndex=-1, baseVisualShapeIndex=shape,
                                 basePosition=[0.0, 0.0, -100.0], physicsClientId=self._client)
        z = np.zeros(3)
        self.bodies[body] = BodyInfo("rover", None, z, z, 12 * len(parts))
        self._rovers[body] = list(range(len(parts)))
        self._rover_colors[body] = kwargs["rgbaColors"]
        return body

    def set_body_pose(self, body_id: int, position: np.ndarray | tuple[float, float, float],
                      quat_xyzw: np.ndarray | tuple[float, float, float, float]) -> None:
        """Place a rover body: base_link position (ENU, m) and orientation quaternion (x, y, z, w)."""
        if body_id not in self._rovers:
            raise ValueError(f"body {body_id} is not a rover body of this scene (rovers: {sorted(self._rovers)})")
        q = np.asarray(quat_xyzw, dtype=np.float64).reshape(4)
        norm = np.linalg.norm(q)
        if not np.isfinite(norm) or norm < 1e-6:
            raise ValueError(f"quat_xyzw must be a non-zero quaternion, got {quat_xyzw}")
        pos = np.asarray(position, dtype=np.float64).reshape(3)
        if not np.all(np.isfinite(pos)):
            raise ValueError(f"position must be finite, got {position}")
        if self._gl is not None:
            model = np.eye(4)
            model[:3, :3] = np.asarray(p.getMatrixFromQuaternion((q / norm).tolist())).reshape(3, 3)
            model[:3, 3] = pos
            for part in self._rovers[body_id]:
                self._gl.set_model(part, model)
            return
        p.resetBasePositionAndOrientation(body_id, pos.tolist(), (q / norm).tolist(), physicsClientId=self._client)

    def _set_rover_alpha(self, body_id: int, visible: bool) -> None:
        if self._gl is not None:
            for part in self._rovers[body_id]:
                self._gl.set_visible(part, visible)
            return
        for k, rgba in zip(self._rovers[body_id], self._rover_colors[body_id]):
            colour = list(rgba[:3]) + [rgba[3] if visible else 0.0]
            p.changeVisualShape(body_id, -1, shapeIndex=k, rgbaColor=colour, physicsClientId=self._client)

    # ------------------------------------------------------------ rendering

    def _update_culling(self, position: np.ndarray, rotation: np.ndarray, intr: CameraIntrinsics,
                        near: float, far: float) -> None:
        if len(self._cull_ids) == 0:
            return
        lo, hi = self._cull_min, self._cull_max
        # level of detail by the distance from the camera to the tile's box
        dist = np.linalg.norm(np.clip(position, lo, hi) - position, axis=1)
        is_near = dist < self._lod_distance
        lod_ok = (self._cull_lod == LOD_ALL) | ((self._cull_lod == 0) & is_near) | ((self._cull_lod == 1) & ~is_near)
        if not self.cull:
            want = lod_ok
        else:
            corners = np.stack([np.where(np.array([(k >> i) & 1 for i in range(3)], dtype=bool), hi, lo)
                                for k in range(8)], axis=1)  # (B, 8, 3)
            cam = (corners - position) @ rotation  # camera_link coordinates
            x, y, z = cam[..., 0], cam[..., 1], cam[..., 2]
            tan_h = (intr.width / 2 + 1) / intr.fx
            tan_v = (intr.height / 2 + 1) / intr.fy
            outside = (
                np.all(x < near, axis=1)
                | np.all(y > x * tan_h, axis=1)
                | np.all(y < -x * tan_h, axis=1)
                | np.all(z > x * tan_v, axis=1)
                | np.all(z < -x * tan_v, axis=1)
            )
            outside |= dist > far
            want = ~outside & lod_ok
        for body, vis in zip(self._cull_ids.tolist(), want.tolist()):
            self._set_visible(body, vis)

    def _set_visible(self, body: int, visible: bool) -> None:
        """Show or hide a world body (TinyRenderer skips a body whose alpha is 0)."""
        if self._visible[body] == visible:
            return
        if self._gl is not None:
            self._gl.set_visible(body, visible)
        else:
            p.changeVisualShape(body, -1, rgbaColor=[1, 1, 1, 1.0 if visible else 0.0], physicsClientId=self._client)
        self._visible[body] = visible

    def render(
        self,
        position: np.ndarray | tuple[float, float, float],
        rotation: np.ndarray,
        intrinsics: CameraIntrinsics,
        weather: WeatherPreset | str,
        near: float = 0.05,
        far: float = 80.0,
        hidden_bodies: tuple[int, ...] = (),
        effects: CameraEffects | None = None,
        rng: np.random.Generator | None = None,
        yaw_rate_rps: float = 0.0,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Render one frame -> (rgb uint8 HxWx3, depth float32 HxW z-depth in m, seg int32 HxW).

        ``seg`` holds the body id hit by each pixel (-1 for sky); see :meth:`semantic_labels`.
        ``depth`` is +inf for sky. Without ``effects`` the rgb is the renderer's raw
        output (lighting only; sky pixels unfilled): run
        :func:`weather.apply_camera_pipeline` on it. With ``effects`` (and ``rng``)
        the pipeline is applied here. ``hidden_bodies`` (e.g. the rendering rover's own
        body) are left out of this frame.
        """
        if isinstance(weather, str):
            weather = get_weather(weather)
        intr = intrinsics.validate()
        if not (0.0 < near < far):
            raise ValueError(f"need 0 < near < far, got near={near}, far={far}")
        pos = np.asarray(position, dtype=np.float64).reshape(3)
        rot = np.asarray(rotation, dtype=np.float64)
        if rot.shape != (3, 3) or not np.allclose(rot.T @ rot, np.eye(3), atol=1e-4) or np.linalg.det(rot) < 0:
            raise ValueError(f"rotation must be a 3x3 proper rotation matrix (world_from_camera_link), got {rot}")
        if not np.all(np.isfinite(pos)):
            raise ValueError(f"position must be finite, got {position}")
        for b in hidden_bodies:
            if b not in self._rovers:
                raise ValueError(f"hidden_bodies may only name rover bodies, got {b}")
        sun_map = self.sun_shadow_map(weather) if weather.shadows else None
        self._update_culling(pos, rot, intr, near, far)
        # TinyRenderer divides by w without a guard: a vertex exactly in the camera's
        # plane (w == 0, e.g. a terrain grid vertex right below a camera standing on the
        # grid) wrecks its triangles. A 0.1 mm nudge along the view keeps w != 0 (both
        # renderers take it, so they see the same frame).
        eye = pos + rot[:, 0] * 1e-4
        for b in hidden_bodies:
            self._set_rover_alpha(b, False)
        try:
            rgb, depth, seg = self._draw(view_matrix(eye, rot), projection_matrix(intr, near, far), intr.width,
                                         intr.height, near, far, weather)
        finally:
            for b in hidden_bodies:
                self._set_rover_alpha(b, True)
        depth += np.float32(1e-4)  # back to z-depth from ``position`` (inf stays inf)
        if sun_map is not None:
            # shadows are soft at this scale: half resolution is plenty above 320 px and 4x cheaper
            stride = 2 if intr.width >= 320 else 1
            rgb = shadow_shading(rgb, depth, intr, pos, rot, weather, sun_map, stride)
        if effects is not None:
            rng = rng if rng is not None else np.random.default_rng(0)
            rgb = apply_camera_pipeline(rgb, depth, weather, effects, rng, yaw_rate_rps, intr, rot)
        return rgb, depth, seg

    def _draw(self, view: np.ndarray, proj: np.ndarray, width: int, height: int, near: float, far: float,
              weather: WeatherPreset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One renderer pass -> (rgb uint8, z-depth float32 with +inf for sky, seg int32)."""
        if self._gl is not None:
            return self._gl.draw(view, proj, width, height, weather.light_direction, weather.light_color,
                                 weather.ambient, weather.diffuse, weather.specular)
        _, _, rgba, zbuf, seg = p.getCameraImage(
            width,
            height,
            viewMatrix=view.T.ravel().tolist(),
            projectionMatrix=proj.T.ravel().tolist(),
            lightDirection=list(weather.light_direction),
            lightColor=list(weather.light_color),
            lightDistance=100.0,
            # TinyRenderer's own shadows triple the frame time, only dim the diffuse term by
            # 20 % and use a light frustum fixed on the origin; see sun_shadow_map instead
            shadow=0,
            lightAmbientCoeff=weather.ambient,
            lightDiffuseCoeff=weather.diffuse,
            lightSpecularCoeff=weather.specular,
            renderer=p.ER_TINY_RENDERER,
            physicsClientId=self._client,
        )
        rgb = np.asarray(rgba, dtype=np.uint8).reshape(height, width, 4)[..., :3].copy()
        seg = np.asarray(seg, dtype=np.int32).reshape(height, width)
        depth = zbuffer_to_depth(np.asarray(zbuf, dtype=np.float32).reshape(height, width), near, far)
        depth[seg < 0] = np.inf
        return rgb, depth, seg

    def sun_shadow_map(self, weather: WeatherPreset, texel_m: float = 0.06,
                       max_pixels: int = 2048) -> SunShadowMap:
        """The sun's depth map for ``weather.light_direction`` (rendered on first use, then cached).

        Covers the world and the scenery up to the treeline; rovers cast no shadows.
        """
        key = tuple(round(float(c), 6) for c in weather.light_direction)
        if key in self._sun_maps:
            return self._sun_maps[key]
        d = np.asarray(weather.light_direction, dtype=np.float64)
        d /= np.linalg.norm(d)
        if d[2] <= 0.02:
            raise ValueError(f"{weather.name}: the sun must be above the horizon for shadows, direction {tuple(d)}")
        reach = self.world.half_size + self.detail.treeline_offset_m
        heights = self.world.terrain.heights
        top = max([t.z + t.height for t in self.world.trees], default=float(heights.max())) + 1.0
        box = np.array([[x, y, z] for x in (-reach, reach) for y in (-reach, reach)
                        for z in (float(heights.min()) - 1.0, top)])
        centre = box.mean(axis=0)
        distance = 1000.0
        eye = centre + d * distance
        fwd = -d
        left = np.cross([0.0, 0.0, 1.0], fwd)
        left /= np.linalg.norm(left)
        up = np.cross(fwd, left)
        rot = np.column_stack([fwd, left, up])
        c = (box - eye) @ rot
        tan_x = np.max(np.abs(c[:, 1] / c[:, 0]))
        tan_y = np.max(np.abs(c[:, 2] / c[:, 0]))
        fx = distance / texel_m
        fx = min(fx, max_pixels / (2 * tan_x), max_pixels / (2 * tan_y))
        w = int(math.ceil(2 * tan_x * fx)) + 2
        h = int(math.ceil(2 * tan_y * fx)) + 2
        near = float(c[:, 0].min()) - 5.0
        far = float(c[:, 0].max()) + 5.0
        # every world body at its cheap level of detail, rovers out; the next render's
        # culling pass sets the visibility it needs again
        for body, info in self.bodies.items():
            if info.category == "rover":
                self._set_rover_alpha(body, False)
                continue
            self._set_visible(body, info.lod != 0)
        try:
            proj = pinhole_projection(fx, fx, (w - 1) / 2, (h - 1) / 2, w, h, near, far)
            _, depth, _ = self._draw(view_matrix(eye, rot), proj, w, h, near, far, weather)
        finally:
            for body in self._rovers:
                self._set_rover_alpha(body, True)
        sun_map = SunShadowMap(rot, eye, fx, (w - 1) / 2, (h - 1) / 2, depth, distance / fx)
        self._sun_maps[key] = sun_map
        return sun_map

    def semantic_labels(self, seg: np.ndarray) -> np.ndarray:
        """Map a body-id segmentation to :data:`CATEGORY_IDS` class ids (sky stays -1)."""
        seg = np.asarray(seg)
        lut_size = max(self.bodies, default=0) + 2
        lut = np.full(lut_size, SKY_ID, dtype=np.int32)
        for body, info in self.bodies.items():
            lut[body + 1] = CATEGORY_IDS[info.category]
        return lut[np.clip(seg, -1, lut_size - 2) + 1]

    @property
    def n_triangles(self) -> int:
        """Triangles in the world geometry (rovers excluded)."""
        return sum(b.n_triangles for b in self.bodies.values() if b.category != "rover")

    def close(self) -> None:
        """Release the renderer (OpenGL context or PyBullet client); safe to call twice."""
        gl = getattr(self, "_gl", None)
        if gl is not None:
            gl.close()
            self._gl = None
        if getattr(self, "_client", -1) >= 0:
            try:
                p.disconnect(physicsClientId=self._client)
            except p.error:
                pass
            self._client = -1

    def __enter__(self) -> ForestScene:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def measure_render_fps(world: ForestWorld, intrinsics: CameraIntrinsics, n: int = 20, weather: str = "sunny",
                       cache_dir: str | Path | None = None, texture_size: int = 256) -> float:
    """Frames per second of :meth:`ForestScene.render` along a loop 0.2 m above the ground.

    ``render`` includes the sun-shadow pass for presets with shadows (sunny, dusk) but
    not the camera pipeline. The camera walks a circle of 8 m radius around the origin
    (or of a third of the world's half size, if smaller), looking along the path; the
    scene build, the sun's shadow map and one warm-up frame are not counted.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    radius = min(8.0, world.half_size / 3.0)
    with ForestScene(world, cache_dir=cache_dir, texture_size=texture_size) as scene:
        poses = []
        for k in range(n + 1):
            a = 2 * math.pi * k / max(n, 1)
            x, y = radius * math.cos(a), radius * math.sin(a)
            z = float(world.terrain.height_at(x, y)) + 0.2
            poses.append((np.array([x, y, z]), camera_rotation(a + math.pi / 2)))
        scene.render(*poses[0], intrinsics, weather)
        t0 = time.perf_counter()
        for pos, rot in poses[1:]:
            scene.render(pos, rot, intrinsics, weather)
        return n / (time.perf_counter() - t0)
