"""Triangle meshes of the forest world's objects (numpy arrays) and a Wavefront OBJ writer.

Builders take the world model's objects (terrain, trees, logs, bushes, rocks) and return a :class:`Mesh`
whose geometry matches the model; merging them per category and tile is :mod:`world_meshes`' job.
Details: docs/simulator.md (`meshes`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from forest_perception.sim import textures
from forest_perception.sim.terrain import Terrain
from forest_perception.sim.world import Bush, Fern, Log, Rock, Tree

# texture repeat lengths (metres per texture tile)
LITTER_TILE_M = 2.0
BARK_TILE_M = 1.0
FOLIAGE_TILE_M = 2.0
ROCK_TILE_M = 0.8
LOG_TILE_M = 1.2


@dataclass
class Mesh:
    """Indexed triangle mesh: (N, 3) vertices, (N, 3) unit normals, (N, 2) uvs, (M, 3) indices."""

    vertices: np.ndarray
    normals: np.ndarray
    uvs: np.ndarray
    indices: np.ndarray

    def __post_init__(self) -> None:
        self.vertices = np.asarray(self.vertices, dtype=np.float64).reshape(-1, 3)
        self.normals = np.asarray(self.normals, dtype=np.float64).reshape(-1, 3)
        self.uvs = np.asarray(self.uvs, dtype=np.float64).reshape(-1, 2)
        self.indices = np.asarray(self.indices, dtype=np.int64).reshape(-1, 3)
        n = len(self.vertices)
        if len(self.normals) != n or len(self.uvs) != n:
            raise ValueError(
                f"mesh needs one normal and one uv per vertex: {n} vertices, "
                f"{len(self.normals)} normals, {len(self.uvs)} uvs"
            )
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= n):
            raise ValueError(f"mesh indices must lie within [0, {n}), got [{self.indices.min()}, {self.indices.max()}]")

    @property
    def n_vertices(self) -> int:
        """Number of vertices."""
        return len(self.vertices)

    @property
    def n_triangles(self) -> int:
        """Number of triangles."""
        return len(self.indices)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned bounding box (min xyz, max xyz)."""
        if not self.n_vertices:
            return np.zeros(3), np.zeros(3)
        return self.vertices.min(axis=0), self.vertices.max(axis=0)

    @staticmethod
    def empty() -> Mesh:
        """A mesh with nothing in it."""
        return Mesh(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros((0, 2)), np.zeros((0, 3), dtype=np.int64))

    @staticmethod
    def merge(meshes: list[Mesh]) -> Mesh:
        """Concatenate meshes into one (indices re-based)."""
        meshes = [m for m in meshes if m.n_vertices]
        if not meshes:
            return Mesh.empty()
        offsets = np.cumsum([0] + [m.n_vertices for m in meshes[:-1]])
        return Mesh(
            np.concatenate([m.vertices for m in meshes]),
            np.concatenate([m.normals for m in meshes]),
            np.concatenate([m.uvs for m in meshes]),
            np.concatenate([m.indices + off for m, off in zip(meshes, offsets)]),
        )

    def without_degenerate(self, min_area: float = 1e-12) -> Mesh:
        """The same mesh minus zero-area triangles (e.g. the pole fans of a UV sphere)."""
        tri = self.vertices[self.indices]
        area2 = np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
        return Mesh(self.vertices, self.normals, self.uvs, self.indices[area2 > 2 * min_area])

    def transformed(self, rotation: np.ndarray, translation: np.ndarray) -> Mesh:
        """The mesh moved by ``x -> rotation @ x + translation`` (normals rotated)."""
        rot = np.asarray(rotation, dtype=np.float64).reshape(3, 3)
        t = np.asarray(translation, dtype=np.float64).reshape(3)
        return Mesh(self.vertices @ rot.T + t, self.normals @ rot.T, self.uvs, self.indices)

    def face_normals(self) -> np.ndarray:
        """(M, 3) unit geometric normals from the winding (counter-clockwise = outward)."""
        v = self.vertices
        n = np.cross(v[self.indices[:, 1]] - v[self.indices[:, 0]], v[self.indices[:, 2]] - v[self.indices[:, 0]])
        return n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def _grid_indices(rows: int, cols: int, offset: int = 0) -> np.ndarray:
    """Two triangles per quad of a rows x cols vertex grid (row-major), CCW with rows along +v."""
    r, c = np.meshgrid(np.arange(rows - 1), np.arange(cols - 1), indexing="ij")
    a = (r * cols + c).ravel() + offset
    b = a + 1
    d = a + cols
    e = d + 1
    return np.concatenate([np.stack([a, b, e], 1), np.stack([a, e, d], 1)])


def object_rng(seed: int, kind: int, *key: float) -> np.random.Generator:
    """Deterministic per-object stream from the world seed, a kind number and the object's position.

    The same object gets the same shape in every build, whatever else the world holds.
    """
    ints = [int(seed), kind] + [int(round(k * 1000.0)) % (2**31) for k in key]
    return np.random.default_rng(ints)


def _smooth_periodic(rng: np.random.Generator, n: int, amp: float, harmonics: int = 3) -> np.ndarray:
    """Smooth random periodic function sampled at n points over one turn (for irregular outlines)."""
    t = np.arange(n) * 2 * math.pi / n
    out = np.zeros(n)
    for k in range(1, harmonics + 1):
        out += rng.normal(0, amp / k) * np.cos(k * t + rng.uniform(0, 2 * math.pi))
    return out


# ---------------------------------------------------------------- terrain


def terrain_mesh(
    terrain: Terrain,
    bounds: tuple[float, float, float, float] | None = None,
    uv_tile_m: float = LITTER_TILE_M,
    skirt_m: float = 0.0,
    skirt_step_m: float = 5.0,
) -> Mesh:
    """Heightfield as a triangle grid (one vertex per height sample, so it matches the grid exactly).

    ``bounds`` = (xmin, xmax, ymin, ymax) keeps only the grid cells inside (for tiling).
    ``skirt_m`` > 0 adds a coarse apron of clamped edge heights around the grid so the
    ground does not end at the world's border. UVs tile the litter texture every
    ``uv_tile_m`` metres and stay non-negative (the renderer wraps with ``modf``).
    """
    if uv_tile_m <= 0:
        raise ValueError(f"uv_tile_m must be > 0, got {uv_tile_m}")
    ny, nx = terrain.shape
    res = terrain.resolution
    i0, i1, j0, j1 = 0, nx - 1, 0, ny - 1
    if bounds is not None:
        xmin, xmax, ymin, ymax = bounds
        i0 = int(np.clip(math.floor((xmin - terrain.x0) / res + 1e-9), 0, nx - 1))
        i1 = int(np.clip(math.ceil((xmax - terrain.x0) / res - 1e-9), 0, nx - 1))
        j0 = int(np.clip(math.floor((ymin - terrain.y0) / res + 1e-9), 0, ny - 1))
        j1 = int(np.clip(math.ceil((ymax - terrain.y0) / res - 1e-9), 0, ny - 1))
        if i1 <= i0 or j1 <= j0:
            return Mesh.empty()
    xs = terrain.x0 + np.arange(i0, i1 + 1) * res
    ys = terrain.y0 + np.arange(j0, j1 + 1) * res
    meshes = [_height_grid(terrain, xs, ys, uv_tile_m)]
    if skirt_m > 0:
        meshes.extend(terrain_skirt(terrain, skirt_m, skirt_step_m, uv_tile_m))
    return Mesh.merge(meshes)


def _height_grid(terrain: Terrain, xs: np.ndarray, ys: np.ndarray, uv_tile_m: float) -> Mesh:
    gx, gy = np.meshgrid(xs, ys)  # rows along y
    gz = np.asarray(terrain.height_at(gx, gy), dtype=np.float64)
    d = terrain.resolution * 0.5
    dzdx = (np.asarray(terrain.height_at(gx + d, gy)) - np.asarray(terrain.height_at(gx - d, gy))) / (2 * d)
    dzdy = (np.asarray(terrain.height_at(gx, gy + d)) - np.asarray(terrain.height_at(gx, gy - d))) / (2 * d)
    normals = _unit(np.stack([-dzdx, -dzdy, np.ones_like(dzdx)], -1)).reshape(-1, 3)
    verts = np.stack([gx, gy, gz], -1).reshape(-1, 3)
    # offset keeps uvs positive well beyond the grid (the skirt reaches outside)
    uvs = (verts[:, :2] + 1000.0 * uv_tile_m) / uv_tile_m
    return Mesh(verts, normals, uvs, _grid_indices(len(ys), len(xs)))


def terrain_skirt(terrain: Terrain, skirt_m: float, step_m: float, uv_tile_m: float) -> list[Mesh]:
    """Four coarse strips, ``skirt_m`` wide, around the grid at the clamped edge heights (the ground apron)."""
    xmin, xmax, ymin, ymax = terrain.extent
    n_out = max(1, int(math.ceil(skirt_m / step_m)))
    out = np.linspace(0.0, skirt_m, n_out + 1)
    along_x = np.arange(xmin - skirt_m, xmax + skirt_m + 1e-9, step_m)
    along_y = np.arange(ymin, ymax + 1e-9, step_m)
    strips = [
        (along_x, ymax + out),  # north, including corners
        (along_x, ymin - out[::-1]),  # south
        (xmax + out, along_y),  # east
        (xmin - out[::-1], along_y),  # west
    ]
    meshes = []
    for xs, ys in strips:
        meshes.append(_height_grid(terrain, np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64),
                                   uv_tile_m))
    return meshes


def ground_patch_mesh(terrain: Terrain, x: float, y: float, radius: float, rng: np.random.Generator,
                      sides: int = 12, lift_m: float = 0.03) -> Mesh:
    """Irregular moss/grass cushion draped on the terrain, ``lift_m`` proud in the middle."""
    rings = 3
    outline = radius * np.exp(_smooth_periodic(rng, sides, 0.25))
    verts = [[x, y]]
    for k in range(1, rings + 1):
        s = k / rings
        ang = np.arange(sides) * 2 * math.pi / sides
        verts.extend(np.stack([x + s * outline * np.cos(ang), y + s * outline * np.sin(ang)], -1).tolist())
    xy = np.asarray(verts)
    s_all = np.concatenate([[0.0], np.repeat(np.arange(1, rings + 1) / rings, sides)])
    z = np.asarray(terrain.height_at(xy[:, 0], xy[:, 1])) + lift_m * (1.0 - s_all**2) + 0.004
    v = np.column_stack([xy, z])
    normals = np.tile([0.0, 0.0, 1.0], (len(v), 1))
    uvs = (xy + 1000.0 * LITTER_TILE_M) / LITTER_TILE_M
    idx = []
    for j in range(sides):  # centre fan
        idx.append([0, 1 + j, 1 + (j + 1) % sides])
    for k in range(rings - 1):
        a0, b0 = 1 + k * sides, 1 + (k + 1) * sides
        for j in range(sides):
            j1 = (j + 1) % sides
            idx.append([a0 + j, b0 + j, b0 + j1])
            idx.append([a0 + j, b0 + j1, a0 + j1])
    return Mesh(v, normals, uvs, np.asarray(idx))


# ---------------------------------------------------------------- solids of revolution


def _ring_mesh(centres: np.ndarray, radii: np.ndarray, sides: int, u_repeats: float, v_coords: np.ndarray,
               radial_noise: np.ndarray | None = None, axis_dirs: np.ndarray | None = None) -> Mesh:
    """Tube through ring centres (K, 3) with radii (K,), `sides` segments, seam duplicated for uvs.

    Rings are perpendicular to ``axis_dirs`` (default +z). ``radial_noise`` (K, sides)
    multiplies the radius per vertex.
    """
    k = len(centres)
    ang = np.arange(sides + 1) * 2 * math.pi / sides
    if axis_dirs is None:
        axis_dirs = np.tile([0.0, 0.0, 1.0], (k, 1))
    axis_dirs = _unit(np.asarray(axis_dirs, dtype=np.float64))
    ref = np.where(np.abs(axis_dirs[:, 2:3]) < 0.9, np.array([[0.0, 0.0, 1.0]]), np.array([[1.0, 0.0, 0.0]]))
    e1 = _unit(np.cross(ref, axis_dirs))
    e2 = np.cross(axis_dirs, e1)
    # for a vertical axis e1 = +x... keep angle 0 along +x for a z axis
    dirs = np.cos(ang)[None, :, None] * e1[:, None, :] + np.sin(ang)[None, :, None] * e2[:, None, :]
    r = np.repeat(radii[:, None], sides + 1, axis=1)
    if radial_noise is not None:
        r = r * np.concatenate([radial_noise, radial_noise[:, :1]], axis=1)
    verts = centres[:, None, :] + r[..., None] * dirs
    normals = np.broadcast_to(dirs, verts.shape)
    u = np.broadcast_to(ang[None, :] / (2 * math.pi) * u_repeats, (k, sides + 1))
    v = np.broadcast_to(v_coords[:, None], (k, sides + 1))
    uvs = np.stack([u, v], -1)
    return Mesh(verts.reshape(-1, 3), normals.reshape(-1, 3), uvs.reshape(-1, 2), _grid_indices(k, sides + 1))


def _polygon_area_radius(r: float | np.ndarray, sides: int) -> float | np.ndarray:
    """Vertex radius of a regular polygon with the same area as a circle of radius ``r``."""
    return r * math.sqrt(2 * math.pi / (sides * math.sin(2 * math.pi / sides)))


def trunk_heights(tree: Tree, crown_top_fraction: float | None = None) -> np.ndarray:
    """Ring heights (above the stem base) used for a trunk; rings follow ``Tree.radius_at`` exactly.

    Starts 0.4 m below the base so the stem meets sloping ground without a gap, and has
    two rings at 0.5 m where the flare law hands over to the taper law (the radius is
    linear in height between rings, so the rings reproduce the model exactly). Above,
    segments are short where a camera 0.2 m up sees them close and grow with height:
    TinyRenderer scans each triangle's screen bounding box, and a long segment of a
    leaning stem has a box far wider than the stem.
    """
    if crown_top_fraction is None:
        crown_top_fraction = 0.92 if tree.conifer else 0.5
    top = max(tree.crown_base + crown_top_fraction * (tree.height - tree.crown_base), 1.0)
    hs = [-0.4, 0.0, 0.5 - 1e-4, 0.5]
    step = float(np.clip(0.04 / max(tree.lean, 1e-4), 0.8, 3.0))
    h = 0.5
    while h + step < top - 0.3 * step:
        h += step
        hs.append(h)
        step *= 1.5
    hs.append(top)
    return np.array(hs)


def _snag_tip(tree: Tree, hs: np.ndarray, radii: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A snag's broken top: one more ring, narrow and a little above the break, so the tube is closed."""
    r_top = float(radii[-1])
    return np.append(hs, hs[-1] + 1.5 * r_top + 0.05), np.append(radii, 0.25 * r_top)


def trunk_mesh(tree: Tree, sides: int = 16, heights: np.ndarray | None = None,
               bark_tile_m: float = BARK_TILE_M) -> Mesh:
    """Tapered, leaning trunk: horizontal rings centred on ``Tree.axis_at(h)`` with ``Tree.radius_at(h)``.

    That is exactly the world model's cross-section at each ring height (the model is
    linear in between). Vertex radii are scaled so the polygon has the circle's area
    (surface within ~1 % of the model's radius whichever way one looks at it). The bark
    texture repeats every ``bark_tile_m`` up the stem. A snag (``tree.dead``) gets a pointed,
    broken top.
    """
    if sides < 3:
        raise ValueError(f"trunk needs at least 3 sides, got {sides}")
    if not bark_tile_m > 0:
        raise ValueError(f"bark_tile_m must be > 0, got {bark_tile_m}")
    hs = trunk_heights(tree) if heights is None else np.asarray(heights, dtype=np.float64)
    radii = np.array([_polygon_area_radius(tree.radius_at(h), sides) for h in hs])
    if tree.dead and heights is None:
        hs, radii = _snag_tip(tree, hs, radii)
    centres = np.array([[*tree.axis_at(h), tree.z + h] for h in hs])
    circumference = 2 * math.pi * tree.dbh / 2
    u_rep = max(1.0, round(circumference / (bark_tile_m * 0.6)))
    return _ring_mesh(centres, radii, sides, u_rep, (hs + 1.0) / bark_tile_m)


def far_trunk_mesh(tree: Tree, sides: int = 6, bark_tile_m: float = BARK_TILE_M) -> Mesh:
    """Cheap trunk for distant views: few sides, rings at the base, 0.5 m and the top only."""
    hs = trunk_heights(tree)
    hs = np.array([hs[0], 0.5, hs[-1]])
    radii = np.array([_polygon_area_radius(tree.radius_at(max(h, 0.0)), sides) for h in hs])
    if tree.dead:
        hs, radii = _snag_tip(tree, hs, radii)
    centres = np.array([[*tree.axis_at(h), tree.z + h] for h in hs])
    return _ring_mesh(centres, radii, sides, 1.0, (hs + 1.0) / bark_tile_m)


def conifer_crown_mesh(tree: Tree, rng: np.random.Generator, sides: int = 10, tiers: int = 3) -> Mesh:
    """Spruce/fir crown: one surface of revolution with a stepped (tiered), ragged profile.

    Each tier is a cone skirt whose rim overhangs the next tier's underside; a shallow
    inverted cone closes the bottom. One surface, so no tier is drawn over another
    (TinyRenderer pays for every covered pixel of every triangle).
    """
    span = tree.height - tree.crown_base
    # profile (height above base, radius) from the lowest rim up to the apex
    prof_h: list[float] = []
    prof_r: list[float] = []
    for t in range(tiers):
        frac = 1.0 - t / (tiers + 0.35)
        rim_h = tree.crown_base + span * t / (tiers + 0.5)
        prof_h.append(rim_h)
        prof_r.append(tree.crown_radius * frac)
        if t < tiers - 1:  # waist where the next tier starts: above this rim, well inside it
            prof_h.append(rim_h + span * 0.9 / (tiers + 0.5))
            prof_r.append(tree.crown_radius * frac * 0.42)
    prof_h.append(tree.height)
    prof_r.append(0.02)
    hs = np.asarray(prof_h)
    centres = np.array([[*tree.axis_at(h), tree.z + h] for h in hs])
    k = _irregularity_scale(tree)
    rag = np.exp(np.stack([_smooth_periodic(rng, sides, 0.1 * k, harmonics=4) + rng.normal(0, 0.07 * k, sides)
                           for _ in hs]))
    u_rep = max(1.0, round(2 * math.pi * tree.crown_radius / FOLIAGE_TILE_M))
    # v runs along the profile (not the height), so the overhanging tier skirts are not streaked
    along = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(hs), np.diff(prof_r)))])
    side = _ring_mesh(centres, np.asarray(prof_r), sides, u_rep, along / FOLIAGE_TILE_M, radial_noise=rag)
    # rims droop a little: lower every other ring's vertices (the tier rims)
    ring_len = sides + 1
    for k in range(0, len(hs) - 1, 2):
        droop = 0.12 * prof_r[k] * rng.uniform(0.3, 1.5, sides)
        side.vertices[k * ring_len: k * ring_len + sides, 2] -= droop
        side.vertices[k * ring_len + sides, 2] = side.vertices[k * ring_len, 2]
    # underside: from the lowest rim to a hub lifted into the crown, facing down
    rim = side.vertices[:ring_len]
    hub_h = tree.crown_base + 0.25 * span / (tiers + 0.5)
    hub = np.array([*tree.axis_at(hub_h), tree.z + hub_h])
    j = np.arange(sides)
    under_v = np.vstack([rim, hub[None]])
    under_uv = (under_v[:, :2] + 1000.0 * FOLIAGE_TILE_M) / FOLIAGE_TILE_M  # planar: no streaks to the hub
    under = Mesh(under_v, np.zeros((ring_len + 1, 3)), under_uv, np.column_stack([j + 1, j, np.full(sides, ring_len)]))
    return smooth_normals(Mesh.merge([side, under]))


def smooth_normals(mesh: Mesh) -> Mesh:
    """Replace normals by area-weighted face normals averaged over coincident vertices."""
    v = mesh.vertices
    fn = np.cross(v[mesh.indices[:, 1]] - v[mesh.indices[:, 0]], v[mesh.indices[:, 2]] - v[mesh.indices[:, 0]])
    _, key = np.unique(np.round(v, 5), axis=0, return_inverse=True)
    key = key.ravel()
    acc = np.zeros((key.max() + 1, 3))
    for c in range(3):
        np.add.at(acc, key[mesh.indices[:, c]], fn)
    n = acc[key]
    bad = np.linalg.norm(n, axis=1) < 1e-12
    n[bad] = [0.0, 0.0, 1.0]
    return Mesh(mesh.vertices, _unit(n), mesh.uvs, mesh.indices)


def ellipsoid_mesh(centre: np.ndarray, semi_axes: tuple[float, float, float], rng: np.random.Generator | None,
                   lat: int = 6, lon: int = 10, roughness: float = 0.15, yaw: float = 0.0,
                   uv_tile_m: float = FOLIAGE_TILE_M) -> Mesh:
    """Irregular ellipsoid (UV sphere with smooth radial noise), yaw-rotated about z."""
    theta = np.linspace(0.0, math.pi, lat + 1)  # from the top pole down
    phi = np.arange(lon + 1) * 2 * math.pi / lon
    st, ct = np.sin(theta)[:, None], np.cos(theta)[:, None]
    unit = np.stack([st * np.cos(phi)[None], st * np.sin(phi)[None], np.broadcast_to(ct, (lat + 1, lon + 1))], -1)
    if rng is not None and roughness > 0:
        noise = np.zeros((lat + 1, lon))
        for _k in range(3):
            a, b = rng.normal(0, 1, 3), rng.uniform(0, 2 * math.pi)
            lobe = unit[..., :lon, :] @ _unit(a)
            noise += np.cos(2.2 * lobe + b)
        noise = np.exp(roughness * noise / 1.8 + rng.normal(0, roughness * 0.25, noise.shape))
        noise[0, :] = noise[0].mean()  # poles stay single points
        noise[-1, :] = noise[-1].mean()
        noise = np.concatenate([noise, noise[:, :1]], axis=1)
    else:
        noise = np.ones((lat + 1, lon + 1))
    a, b, c = semi_axes
    local = unit * noise[..., None] * np.array([a, b, c])
    cy, sy = math.cos(yaw), math.sin(yaw)
    rot = np.array([[cy, -sy, 0.0], [sy, cy, 0.0], [0.0, 0.0, 1.0]])
    verts = local.reshape(-1, 3) @ rot.T + centre
    normals = _unit((unit / np.array([a, b, c])).reshape(-1, 3) @ rot.T)
    circumference = 2 * math.pi * max(a, b)
    u = phi / (2 * math.pi) * max(1.0, round(circumference / uv_tile_m))
    v = theta / math.pi * max(1.0, round(math.pi * c / uv_tile_m))
    uvs = np.stack(np.meshgrid(u, v), -1).reshape(-1, 2)
    # rows run from the top pole downward: flip the quad winding so faces point out
    idx = _grid_indices(lat + 1, lon + 1)[:, [0, 2, 1]]
    return Mesh(verts, normals, uvs, idx).without_degenerate()


def broadleaf_crown_mesh(tree: Tree, rng: np.random.Generator, lat: int = 6, lon: int = 10) -> Mesh:
    """Irregular crown: one lumpy ellipsoid, its centre pushed off the stem axis a little.

    A single closed surface (rather than overlapping lobes) keeps the overdraw low.
    """
    span = tree.height - tree.crown_base
    cx, cy = tree.axis_at(tree.crown_base + 0.5 * span)
    k = _irregularity_scale(tree)
    off = rng.normal(0, 0.12 * k * tree.crown_radius, 2)
    centre = np.array([cx + off[0], cy + off[1], tree.z + tree.crown_base + 0.5 * span])
    r = tree.crown_radius
    crown = ellipsoid_mesh(centre, (r, r * rng.uniform(0.8, 1.0), 0.55 * span), rng, lat, lon,
                           roughness=0.3 * k**0.6, yaw=float(rng.uniform(0, math.pi)))
    return smooth_normals(crown)


def _irregularity_scale(tree: Tree) -> float:
    """Crown raggedness relative to the default ``crown_roughness`` of 0.3 (exactly 1.0 for it)."""
    return tree.crown_roughness / 0.3


def fern_mesh(fern: Fern, rng: np.random.Generator, segments: int = 4) -> Mesh:
    """A fern clump: ``fern.fronds`` arching strips from the centre, two-sided (TinyRenderer culls back faces).

    Each frond rises to about ``fern.height`` half-way out and droops toward its tip at
    ``fern.radius``; the texture's v runs along the frond, u across it.
    """
    s = np.linspace(0.0, 1.0, segments + 1)
    rise = s * (1.15 - s) / 0.330625  # 1 at its top, s = 0.575
    meshes = []
    for k in range(fern.fronds):
        ang = 2 * math.pi * (k + rng.uniform(-0.3, 0.3)) / fern.fronds
        length = fern.radius * rng.uniform(0.8, 1.1)
        lift = fern.height * rng.uniform(0.75, 1.0)
        half_w = 0.14 * length * np.sin(math.pi * np.clip(s, 0.04, 0.96)) ** 0.7
        along = np.array([math.cos(ang), math.sin(ang)])
        side = np.array([-along[1], along[0]])
        cx = fern.x + along[0] * length * s
        cy = fern.y + along[1] * length * s
        cz = fern.z + 0.02 + lift * rise
        left = np.column_stack([cx + side[0] * half_w, cy + side[1] * half_w, cz - 0.35 * half_w])
        right = np.column_stack([cx - side[0] * half_w, cy - side[1] * half_w, cz - 0.35 * half_w])
        verts = np.stack([left, right], axis=1).reshape(-1, 3)  # rows along the frond, 2 columns
        uvs = np.stack([np.stack([np.zeros_like(s), s * length / 0.5], -1),
                        np.stack([np.ones_like(s), s * length / 0.5], -1)], axis=1).reshape(-1, 2)
        idx = _grid_indices(len(s), 2)
        top = Mesh(verts, np.tile([0.0, 0.0, 1.0], (len(verts), 1)), uvs, idx)
        if np.mean(top.face_normals()[:, 2]) < 0:
            top.indices = top.indices[:, [0, 2, 1]]
        under = Mesh(verts, np.tile([0.0, 0.0, -1.0], (len(verts), 1)), uvs, top.indices[:, [0, 2, 1]])
        meshes.extend([top, under])
    return Mesh.merge(meshes)


def log_mesh(log: Log, sides: int = 12) -> Mesh:
    """Horizontal cylinder along the log's yaw, with end-grain caps (log texture atlas).

    Around the log, u spans the atlas' bark columns once; along it, v repeats every
    ``LOG_TILE_M``; the caps map onto the atlas' end-grain square.
    """
    (x0, y0), (x1, y1) = log.endpoints()
    r = _polygon_area_radius(log.diameter / 2.0, sides)
    centres = np.array([[x0, y0, log.z], [x1, y1, log.z]])
    axis = _unit(centres[1] - centres[0])
    v_len = max(1.0, round(log.length / LOG_TILE_M))
    side = _ring_mesh(centres, np.array([r, r]), sides, textures.LOG_BARK_U * 0.999, np.array([0.0, v_len]),
                      axis_dirs=np.tile(axis, (2, 1)))
    cu0, cu1 = textures.LOG_CAP_U
    cv0, cv1 = textures.LOG_CAP_V
    caps = []
    for k, sign in ((0, -1.0), (1, 1.0)):
        ring = side.vertices[k * (sides + 1): k * (sides + 1) + sides]
        end = centres[k]
        n = axis * sign
        e1 = _unit(np.cross([0.0, 0.0, 1.0], n))
        e2 = np.cross(n, e1)
        rel = ring - end
        pu = (rel @ e1) / (2 * r) + 0.5
        pv = (rel @ e2) / (2 * r) + 0.5
        uvs = np.vstack([np.column_stack([cu0 + pu * (cu1 - cu0), cv0 + pv * (cv1 - cv0)]),
                         [[(cu0 + cu1) / 2, (cv0 + cv1) / 2]]])
        j = np.arange(sides)
        cap = Mesh(np.vstack([ring, end[None]]), np.tile(n, (sides + 1, 1)), uvs,
                   np.column_stack([j, (j + 1) % sides, np.full(sides, sides)]))
        if np.mean(cap.face_normals() @ n) < 0:  # face outward along n
            cap.indices = cap.indices[:, [0, 2, 1]]
        caps.append(cap)
    return Mesh.merge([side, *caps])


def bush_mesh(bush: Bush, rng: np.random.Generator, lat: int = 5, lon: int = 9) -> Mesh:
    """Squashed irregular ellipsoid, its lower part sunk into the ground."""
    centre = np.array([bush.x, bush.y, bush.z + 0.42 * bush.height])
    return ellipsoid_mesh(centre, (bush.radius, bush.radius * rng.uniform(0.75, 1.0), 0.55 * bush.height), rng,
                          lat, lon, roughness=0.22, yaw=float(rng.uniform(0, math.pi)), uv_tile_m=1.0)


def rock_mesh(rock: Rock, rng: np.random.Generator, lat: int = 5, lon: int = 8) -> Mesh:
    """Squashed irregular sphere, yawed, partly buried (the world model puts its centre low)."""
    centre = np.array([rock.x, rock.y, rock.z])
    r = rock.radius
    return ellipsoid_mesh(centre, (r * 1.15, r * 0.9, r * rock.squash), rng, lat, lon, roughness=0.18,
                          yaw=rock.yaw, uv_tile_m=ROCK_TILE_M)


def twig_mesh(terrain: Terrain, x: float, y: float, yaw: float, length: float, diameter: float,
              rng: np.random.Generator, sides: int = 5) -> Mesh:
    """A fallen branch: a thin, slightly bent cylinder resting on the ground (render-only clutter)."""
    t = np.array([-0.5, 0.0, 0.5])
    xs = x + t * length * math.cos(yaw)
    ys = y + t * length * math.sin(yaw)
    zs = np.asarray(terrain.height_at(xs, ys)) + diameter * 0.45
    zs[1] += rng.uniform(0.0, 0.4) * diameter  # bowed up a little
    centres = np.column_stack([xs, ys, zs])
    axis = np.tile(centres[-1] - centres[0], (3, 1))
    radii = np.full(3, diameter / 2) * np.array([1.0, 0.9, 0.75])
    v = (t + 0.5) * length / LOG_TILE_M
    return _ring_mesh(centres, radii, sides, textures.LOG_BARK_U * 0.999, v, axis_dirs=axis)


def treeline_mesh(terrain: Terrain, half_size: float, offset_m: float, rng: np.random.Generator,
                  segment_m: float = 3.0, uv_tile_m: float = 8.0) -> Mesh:
    """Render-only wall of distant forest: a square ring ``offset_m`` outside the world, facing in.

    Its top is ragged (crown silhouettes 12-24 m up); it stands on the clamped edge
    heights of the terrain (and reaches 1 m below them). Like a skybox, it keeps the
    horizon from showing the world's end; it is not an obstacle.
    """
    r = half_size + offset_m
    corners = np.array([[-r, -r], [r, -r], [r, r], [-r, r], [-r, -r]])
    pts = []
    for a, b in zip(corners[:-1], corners[1:]):
        n = max(2, int(math.ceil(np.linalg.norm(b - a) / segment_m)))
        pts.extend(a + (b - a) * t for t in np.arange(n) / n)
    xy = np.asarray(pts + [corners[0]])
    k = len(xy)
    ground = np.asarray(terrain.height_at(xy[:, 0], xy[:, 1]))
    tops = 18.0 + 6.0 * _smooth_periodic(rng, k - 1, 0.35, harmonics=24) + rng.uniform(-2.0, 2.0, k - 1)
    tops = np.append(tops, tops[0])
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(xy, axis=0), axis=1))])
    bottom = np.column_stack([xy, ground - 1.0])
    top = np.column_stack([xy, ground + np.clip(tops, 10.0, 26.0)])
    verts = np.vstack([bottom, top])
    inward = _unit(np.column_stack([-xy, np.zeros(k)]))
    normals = np.vstack([inward, inward])
    u = arc / uv_tile_m
    uvs = np.vstack([np.column_stack([u, np.full(k, 0.001)]), np.column_stack([u, np.full(k, 0.999)])])
    # counter-clockwise ring seen from above: (bottom j, top j, bottom j+1) faces the centre
    j = np.arange(k - 1)
    idx = np.concatenate([np.column_stack([j, k + j, j + 1]), np.column_stack([j + 1, k + j, k + j + 1])])
    mesh = Mesh(verts, normals, uvs, idx)
    if np.mean(np.sum(mesh.face_normals()[:, :2] * -mesh.vertices[idx[:, 0], :2], axis=1)) < 0:
        mesh.indices = mesh.indices[:, [0, 2, 1]]
    return mesh


def write_obj(mesh: Mesh, path: str | Path, texture: str | Path | None = None) -> Path:
    """Write ``mesh`` as a Wavefront OBJ (v/vt/vn, 1-based faces); with ``texture``, also an MTL beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# forest_perception mesh: {mesh.n_vertices} vertices, {mesh.n_triangles} triangles"]
    if texture is not None:
        mtl = path.with_suffix(".mtl")
        mtl.write_text(f"newmtl surface\nKa 1 1 1\nKd 1 1 1\nKs 0 0 0\nmap_Kd {Path(texture).resolve()}\n")
        lines += [f"mtllib {mtl.name}", "usemtl surface"]
    body = [
        "\n".join(f"v {x:.5f} {y:.5f} {z:.5f}" for x, y, z in mesh.vertices),
        "\n".join(f"vt {u:.5f} {v:.5f}" for u, v in mesh.uvs),
        "\n".join(f"vn {x:.4f} {y:.4f} {z:.4f}" for x, y, z in mesh.normals),
        "\n".join(f"f {a}/{a}/{a} {b}/{b}/{b} {c}/{c}/{c}" for a, b, c in mesh.indices + 1),
    ]
    path.write_text("\n".join(lines + [b for b in body if b]) + "\n")
    return path


def box_mesh(half_extents: tuple[float, float, float]) -> Mesh:
    """Axis-aligned box centred on the origin: 6 faces with their own normals, uvs in [0, 1]."""
    h = np.asarray(half_extents, dtype=np.float64).reshape(3)
    if np.any(h <= 0):
        raise ValueError(f"box half extents must be > 0, got {tuple(h)}")
    verts, normals, uvs, idx = [], [], [], []
    for axis in range(3):
        for sign in (-1.0, 1.0):
            n = np.zeros(3)
            n[axis] = sign
            a, b = (axis + 1) % 3, (axis + 2) % 3  # e_a x e_b = e_axis
            if sign < 0:
                a, b = b, a  # keep the winding counter-clockwise seen from outside
            base = len(verts)
            for du, dv in ((-1, -1), (1, -1), (1, 1), (-1, 1)):
                v = n * h
                v[a] = du * h[a]
                v[b] = dv * h[b]
                verts.append(v)
                normals.append(n)
                uvs.append(((du + 1) / 2, (dv + 1) / 2))
            idx += [(base, base + 1, base + 2), (base, base + 2, base + 3)]
    return Mesh(np.array(verts), np.array(normals), np.array(uvs), np.array(idx))


def cylinder_mesh(radius: float, length: float, sides: int = 16) -> Mesh:
    """Closed cylinder along z, centred on the origin (the shape of PyBullet's GEOM_CYLINDER)."""
    if radius <= 0 or length <= 0 or sides < 3:
        raise ValueError(f"cylinder needs radius > 0, length > 0 and sides >= 3, got {radius}, {length}, {sides}")
    half = length / 2
    side = _ring_mesh(np.array([[0.0, 0.0, -half], [0.0, 0.0, half]]), np.array([radius, radius]), sides, 1.0,
                      np.array([0.0, 1.0]))
    ang = np.arange(sides) * 2 * math.pi / sides
    caps = []
    for z, sign in ((-half, -1.0), (half, 1.0)):
        rim = np.column_stack([radius * np.cos(ang), radius * np.sin(ang), np.full(sides, z)])
        verts = np.vstack([[0.0, 0.0, z], rim])
        normals = np.tile([0.0, 0.0, sign], (sides + 1, 1))
        uvs = np.vstack([[0.5, 0.5], 0.5 + 0.5 * np.column_stack([np.cos(ang), np.sin(ang)])])
        k = np.arange(sides)
        tris = np.column_stack([np.zeros(sides, dtype=np.int64), 1 + k, 1 + (k + 1) % sides])
        if sign < 0:
            tris = tris[:, [0, 2, 1]]
        caps.append(Mesh(verts, normals, uvs, tris))
    return Mesh.merge([side, *caps])
