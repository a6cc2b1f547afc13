"""The forest world's geometry for the renderer: every object's mesh merged per category, tile and level of detail.

:func:`build_world_meshes` turns a :class:`ForestWorld` into a few large :class:`MeshGroup` s in
TinyRenderer's preferred drawing order, with render-only scenery (moss, twigs, ground apron, treeline
wall, backdrop trees); :class:`MeshDetail` sets tessellation and tiling. Details: docs/simulator.md
(`world_meshes`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from forest_perception.sim import textures
from forest_perception.sim.meshes import (
    LITTER_TILE_M,
    Mesh,
    broadleaf_crown_mesh,
    bush_mesh,
    conifer_crown_mesh,
    far_trunk_mesh,
    fern_mesh,
    ground_patch_mesh,
    log_mesh,
    object_rng,
    rock_mesh,
    terrain_mesh,
    terrain_skirt,
    treeline_mesh,
    trunk_mesh,
    twig_mesh,
)
from forest_perception.sim.world import ForestWorld, Tree

CATEGORIES: dict[str, str] = {
    # category -> texture name
    "terrain": "litter",
    "moss": "moss",
    "grass": "grass",
    "trunk_conifer": "bark_conifer",
    "trunk_broadleaf": "bark_broadleaf",
    "crown_conifer": "foliage_conifer",
    "crown_broadleaf": "foliage_broadleaf",
    "trunk_snag": "bark_snag",
    "log": "log",
    "bush": "bush",
    "fern": "fern",
    "rock": "rock",
    "treeline": "treeline",
    "twig": "log",
}


DRAW_ORDER = ("bush", "fern", "trunk_broadleaf", "trunk_conifer", "trunk_snag", "rock", "log", "twig", "moss", "grass",
              "terrain", "crown_broadleaf", "crown_conifer", "treeline")

LOD_ALL = -1
"""``MeshGroup.lod`` of geometry drawn at every distance; 0 = near variant, 1 = far variant."""


@dataclass
class MeshGroup:
    """Every object of one category inside one spatial tile, merged into a single mesh.

    ``lod`` is :data:`LOD_ALL`, or 0/1 for the near/far variant of the same objects
    (the renderer shows exactly one of the two per frame).
    """

    category: str
    texture: str
    tile: tuple[int, int]
    mesh: Mesh
    lod: int = LOD_ALL


@dataclass(frozen=True)
class MeshDetail:
    """Tessellation levels, merge tile size and the render-only scenery around the world.

    Trunks have a near variant (``trunk_sides``, >= 16, matching the model within a few
    mm) and a far variant (``far_trunk_sides``) that the renderer swaps in beyond
    ``lod_distance_m``; thin distant stems cost TinyRenderer mostly bounding-box scans.
    Ground (terrain, moss, grass) is tiled finer (``ground_tile_m``) and drawn with its
    full-resolution texture only within ``ground_lod_distance_m``, farther with a
    pre-filtered copy (TinyRenderer has no mipmaps; seen at grazing angles from 0.2 m,
    a sharp texture turns into sparkling noise).
    Around the world: ground goes on as a coarse apron, a painted treeline wall stands
    ``treeline_offset_m`` outside the border (0 = none), and ``backdrop_m`` > 0 adds
    copies of the world's trees in a band that wide (costly: ~10 ms a frame at 6 m).
    ``bark_tile_m`` is the bark texture's repeat up a stem (its scale); ``ground_patch_moss_fraction``
    the share of ground cushions that are moss (the rest grass).
    """

    trunk_sides: int = 16
    far_trunk_sides: int = 6
    lod_distance_m: float = 8.0
    ground_tile_m: float = 3.0
    ground_lod_distance_m: float = 1.5
    crown_sides: int = 9
    crown_lat: int = 5
    crown_lon: int = 9
    log_sides: int = 10
    bush_lat: int = 5
    bush_lon: int = 8
    rock_lat: int = 4
    rock_lon: int = 7
    tile_m: float = 10.0
    ground_patches_per_ha: float = 120.0
    twigs_per_ha: float = 800.0
    backdrop_m: float = 0.0
    treeline_offset_m: float = 6.0
    bark_tile_m: float = 1.0
    ground_patch_moss_fraction: float = 0.6

    def validate(self) -> MeshDetail:
        """Raise ``ValueError`` naming the first bad field; return self when fine."""
        if self.trunk_sides < 16:
            raise ValueError(f"trunk_sides must be >= 16 (near-trunk depth accuracy), got {self.trunk_sides}")
        for name in ("far_trunk_sides", "crown_sides", "crown_lon", "log_sides", "bush_lon", "rock_lon"):
            if getattr(self, name) < 3:
                raise ValueError(f"{name} must be >= 3, got {getattr(self, name)}")
        for name in ("crown_lat", "bush_lat", "rock_lat"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be >= 2, got {getattr(self, name)}")
        if not 2.0 <= self.tile_m <= 1000.0:
            raise ValueError(f"tile_m must be within [2, 1000] m, got {self.tile_m}")
        for name in ("lod_distance_m", "ground_lod_distance_m"):
            if not 0.0 <= getattr(self, name) <= 1000.0:
                raise ValueError(f"{name} must be within [0, 1000] m, got {getattr(self, name)}")
        if not 1.0 <= self.ground_tile_m <= 1000.0:
            raise ValueError(f"ground_tile_m must be within [1, 1000] m, got {self.ground_tile_m}")
        if self.ground_patches_per_ha < 0 or self.twigs_per_ha < 0:
            raise ValueError(f"ground_patches_per_ha and twigs_per_ha must be >= 0, got "
                             f"{self.ground_patches_per_ha}, {self.twigs_per_ha}")
        if not 0.0 <= self.backdrop_m <= 100.0:
            raise ValueError(f"backdrop_m must be within [0, 100] m, got {self.backdrop_m}")
        if not 0.0 <= self.treeline_offset_m <= 200.0:
            raise ValueError(f"treeline_offset_m must be within [0, 200] m, got {self.treeline_offset_m}")
        if not (math.isfinite(self.bark_tile_m) and 0.1 <= self.bark_tile_m <= 10.0):
            raise ValueError(f"bark_tile_m must be within [0.1, 10] m, got {self.bark_tile_m}")
        if not (math.isfinite(self.ground_patch_moss_fraction) and 0.0 <= self.ground_patch_moss_fraction <= 1.0):
            raise ValueError(f"ground_patch_moss_fraction must be within [0, 1], got {self.ground_patch_moss_fraction}")
        return self


def backdrop_trees(world: ForestWorld, band_m: float) -> list[Tree]:
    """Copies of the world's trees shifted by +-size into a band around the border.

    Render-only scenery so the forest does not end at the world's edge; the copies sit
    on the clamped edge heights of the terrain skirt. They are not obstacles.
    """
    if band_m <= 0:
        return []
    size = world.config.size_m
    half = world.half_size
    out: list[Tree] = []
    for dx in (-size, 0.0, size):
        for dy in (-size, 0.0, size):
            if dx == 0.0 and dy == 0.0:
                continue
            for t in world.trees:
                x, y = t.x + dx, t.y + dy
                if max(abs(x), abs(y)) <= half + band_m:
                    out.append(replace(t, x=x, y=y, z=float(world.terrain.height_at(x, y))))
    return out


def _tile_of(x: float, y: float, tile_m: float) -> tuple[int, int]:
    return int(math.floor(x / tile_m)), int(math.floor(y / tile_m))


def build_world_meshes(world: ForestWorld, detail: MeshDetail | None = None) -> list[MeshGroup]:
    """All of the world's geometry, merged per (category, tile, lod) into few large meshes.

    Meshes stay below 60k vertices each (PyBullet's per-shape limit is 131k). Groups
    come in TinyRenderer's preferred drawing order (:data:`DRAW_ORDER`).
    """
    detail = (detail or MeshDetail()).validate()
    seed = int(world.config.seed)
    tile = detail.tile_m
    parts: dict[tuple[str, tuple[int, int], int], list[Mesh]] = {}

    ground_tile = detail.ground_tile_m

    def add(category: str, x: float, y: float, mesh: Mesh, lod: int = LOD_ALL) -> None:
        size = ground_tile if CATEGORIES[category] in textures.GROUND_TEXTURES else tile
        parts.setdefault((category, _tile_of(x, y, size), lod), []).append(mesh)

    terrain = world.terrain
    xmin, xmax, ymin, ymax = terrain.extent
    gt = ground_tile
    for tx in range(_tile_of(xmin, 0, gt)[0], _tile_of(xmax - 1e-9, 0, gt)[0] + 1):
        for ty in range(_tile_of(0, ymin, gt)[1], _tile_of(0, ymax - 1e-9, gt)[1] + 1):
            bounds = (max(tx * gt, xmin), min((tx + 1) * gt, xmax), max(ty * gt, ymin), min((ty + 1) * gt, ymax))
            m = terrain_mesh(terrain, bounds)
            if m.n_vertices:
                parts.setdefault(("terrain", (tx, ty), LOD_ALL), []).append(m)
    # the ground goes on beyond the world, up to and under the treeline wall
    for k, strip in enumerate(terrain_skirt(terrain, detail.treeline_offset_m + 5.0, 4.0, LITTER_TILE_M)):
        parts.setdefault(("terrain", (100_000, k), LOD_ALL), []).append(strip)
    if detail.treeline_offset_m > 0:
        wall = treeline_mesh(terrain, world.half_size, detail.treeline_offset_m, np.random.default_rng([seed, 99]))
        parts.setdefault(("treeline", (100_000, 0), LOD_ALL), []).append(wall)

    # moss and grass cushions
    rng_patch = np.random.default_rng([seed, 77])
    area_ha = world.config.size_m**2 / 10_000.0
    for _ in range(int(rng_patch.poisson(detail.ground_patches_per_ha * area_ha))):
        x, y = rng_patch.uniform(-world.half_size + 1, world.half_size - 1, 2)
        radius = float(rng_patch.uniform(0.4, 2.0))
        kind = "moss" if rng_patch.random() < detail.ground_patch_moss_fraction else "grass"
        add(kind, x, y, ground_patch_mesh(terrain, float(x), float(y), radius, rng_patch))

    # fallen branches: render-only clutter with strong close-range depth cues
    rng_twig = np.random.default_rng([seed, 78])
    for _ in range(int(rng_twig.poisson(detail.twigs_per_ha * area_ha))):
        x, y = rng_twig.uniform(-world.half_size + 1, world.half_size - 1, 2)
        length = float(rng_twig.uniform(0.3, 1.6))
        diameter = float(rng_twig.uniform(0.012, 0.05))
        # near variant only: beyond lod_distance_m a twig is under a pixel wide, so it is dropped
        add("twig", x, y, twig_mesh(terrain, float(x), float(y), float(rng_twig.uniform(0, math.pi)), length,
                                    diameter, rng_twig), lod=0)

    for t in world.trees:
        rng = object_rng(seed, 1, t.x, t.y)
        kind = "conifer" if t.conifer else "broadleaf"
        trunk = "trunk_snag" if t.dead else f"trunk_{kind}"
        add(trunk, t.x, t.y, trunk_mesh(t, detail.trunk_sides, bark_tile_m=detail.bark_tile_m), lod=0)
        add(trunk, t.x, t.y, far_trunk_mesh(t, detail.far_trunk_sides, bark_tile_m=detail.bark_tile_m), lod=1)
        if t.dead:
            continue
        if t.conifer:
            crown = conifer_crown_mesh(t, rng, detail.crown_sides)
        else:
            crown = broadleaf_crown_mesh(t, rng, detail.crown_lat, detail.crown_lon)
        add(f"crown_{kind}", t.x, t.y, crown)
    for t in backdrop_trees(world, detail.backdrop_m):
        rng = object_rng(seed, 5, t.x, t.y)
        kind = "conifer" if t.conifer else "broadleaf"
        add("trunk_snag" if t.dead else f"trunk_{kind}", t.x, t.y,
            far_trunk_mesh(t, detail.far_trunk_sides, bark_tile_m=detail.bark_tile_m))
        if t.dead:
            continue
        if t.conifer:
            crown = conifer_crown_mesh(t, rng, max(6, detail.crown_sides - 3), tiers=2)
        else:
            crown = broadleaf_crown_mesh(t, rng, max(4, detail.crown_lat - 1), max(6, detail.crown_lon - 3))
        add(f"crown_{kind}", t.x, t.y, crown)
    for lg in world.logs:
        add("log", lg.x, lg.y, log_mesh(lg, detail.log_sides))
    for b in world.bushes:
        add("bush", b.x, b.y, bush_mesh(b, object_rng(seed, 2, b.x, b.y), detail.bush_lat, detail.bush_lon))
    for r in world.rocks:
        add("rock", r.x, r.y, rock_mesh(r, object_rng(seed, 3, r.x, r.y), detail.rock_lat, detail.rock_lon))
    for f in world.ferns:
        add("fern", f.x, f.y, fern_mesh(f, object_rng(seed, 4, f.x, f.y)))

    # TinyRenderer draws bodies in creation order and skips shading of z-rejected pixels:
    # put the near, opaque occluders first and the big background surfaces last
    order = {c: i for i, c in enumerate(DRAW_ORDER)}
    groups = []
    for (category, tile_key, lod), meshes in sorted(parts.items(), key=lambda kv: (order[kv[0][0]], kv[0][1:])):
        texture = CATEGORIES[category]
        for chunk in _chunks(meshes, max_vertices=60_000):
            merged = Mesh.merge(chunk)
            if texture in textures.GROUND_TEXTURES:
                # same ground twice: full-resolution texture near, pre-filtered texture far
                far = texture + textures.FAR_SUFFIX
                if lod == LOD_ALL and tile_key[0] >= 100_000:  # the apron beyond the world is always far
                    groups.append(MeshGroup(category, far, tile_key, merged, LOD_ALL))
                else:
                    groups.append(MeshGroup(category, texture, tile_key, merged, 0))
                    groups.append(MeshGroup(category, far, tile_key, merged, 1))
            else:
                groups.append(MeshGroup(category, texture, tile_key, merged, lod))
    return groups


def _chunks(meshes: list[Mesh], max_vertices: int) -> list[list[Mesh]]:
    out: list[list[Mesh]] = [[]]
    count = 0
    for m in meshes:
        if count + m.n_vertices > max_vertices and out[-1]:
            out.append([])
            count = 0
        out[-1].append(m)
        count += m.n_vertices
    return out
