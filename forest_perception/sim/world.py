"""Procedural forest world, deterministic from a seed.

Pure Python/numpy: no PyBullet, no ROS. Coordinates are ENU metres (REP 103), x east,
y north, z up, origin at the centre of the world and at the GPS datum.

Stand statistics follow temperate forest plots: 200-1500 stems per hectare, trunk
diameter at breast height (DBH) log-normal around 0.25 m, height from a DBH allometry,
a few tens of fallen logs per hectare, understorey bushes and rocks. The fields added for
domain randomisation (relief, spatial pattern, snags, crowns, ferns) default to values that
leave a world exactly as it was without them; :mod:`styles` samples them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from forest_perception.sim.terrain import Relief, Terrain, generate_terrain, max_grid_slope

HECTARE_M2 = 10_000.0
MIN_CROWN_BASE_M = 0.5
"""Lowest crown base, metres, before the allowance for drooping rims: crowns stay above the camera."""
FERN_OBSTACLE_SHARE = 0.6
"""Part of a fern clump's radius that is an obstacle circle."""


@dataclass(frozen=True)
class WorldConfig:
    """Parameters of a generated forest; ``validate()`` refuses impossible values."""

    seed: int = 0
    size_m: float = 60.0
    terrain_resolution_m: float = 1.0
    terrain_roughness_m: float = 0.6
    tree_density_per_ha: float = 600.0
    dbh_median_m: float = 0.25
    dbh_sigma: float = 0.45
    conifer_fraction: float = 0.4
    log_density_per_ha: float = 40.0
    bush_density_per_ha: float = 300.0
    rock_density_per_ha: float = 120.0
    clearing_radius_m: float = 3.0
    datum_lat_deg: float = 50.8690
    datum_lon_deg: float = -1.6040
    datum_alt_m: float = 40.0
    # --- relief (terrain.Relief): 0 hills/valleys/ridges is today's gently rolling floor
    terrain_bump_m: float = 0.05
    """Peak height of the fine ground bumps (one grid cell wide), [0, 0.5] m."""
    hill_height_m: float = 0.0
    """Peak height of smooth hills above/below the mean ground, [0, 20] m."""
    hill_wavelength_m: float = 40.0
    """Crest-to-crest distance of the hills, [5, 500] m."""
    valley_count: int = 0
    """Meandering valleys (gullies when narrow) cut across the world, [0, 6]."""
    valley_depth_m: float = 1.5
    """Depth of each valley on its line, [0, 10] m."""
    valley_width_m: float = 6.0
    """Half-width (Gaussian sigma) of a valley's cross-section, [1, 100] m."""
    ridge_count: int = 0
    """Meandering ridges across the world, [0, 6]."""
    ridge_height_m: float = 1.5
    """Height of each ridge on its line, [0, 10] m."""
    ridge_width_m: float = 6.0
    """Half-width (Gaussian sigma) of a ridge's cross-section, [1, 100] m."""
    terrain_max_slope: float = 1.0
    """Steepest ground slope allowed (rise over run; 1 = 45 degrees), [0.02, 1]: landforms are scaled to it."""
    # --- stand structure
    tree_pattern: float = 0.0
    """Spatial pattern of the stems, [-1, 1]: -1 clustered (groups), 0 random with spacing, 1 regular rows."""
    snag_fraction: float = 0.0
    """Share of standing dead trees (no foliage, broken top, weathered bark), [0, 1]."""
    # --- crowns
    conifer_crown_base: float = 0.35
    """Crown base of a conifer as a fraction of its height (about +-20 % per tree), [0.03, 0.9]."""
    broadleaf_crown_base: float = 0.5
    """Crown base of a broadleaf tree as a fraction of its height (about +-20 % per tree), [0.03, 0.9]."""
    conifer_crown_width: float = 1.0
    """Conifer crown radius relative to the DBH allometry (< 1: slender spires), [0.3, 2]."""
    broadleaf_crown_width: float = 1.0
    """Broadleaf crown radius relative to the DBH allometry, [0.3, 2]."""
    crown_irregularity: float = 0.3
    """Lumpiness of crowns, [0, 1]: 0 smooth cones and ellipsoids, 1 ragged, lopsided crowns."""
    # --- undergrowth
    fern_density_per_ha: float = 0.0
    """Fern clumps per hectare (obstacles to the rover, 0.3-0.9 m tall), [0, 3000]."""

    def validate(self) -> WorldConfig:
        """Raise ``ValueError`` naming the first bad parameter; return self when fine."""
        if not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not 10.0 <= self.size_m <= 1000.0:
            raise ValueError(f"size_m must be within [10, 1000] m, got {self.size_m}")
        if not 0.1 <= self.terrain_resolution_m <= self.size_m / 4:
            raise ValueError(
                f"terrain_resolution_m must be within [0.1, size_m/4] m, got {self.terrain_resolution_m}"
            )
        if not 0.0 <= self.terrain_roughness_m <= 10.0:
            raise ValueError(f"terrain_roughness_m must be within [0, 10] m, got {self.terrain_roughness_m}")
        for name in (
            "tree_density_per_ha",
            "log_density_per_ha",
            "bush_density_per_ha",
            "rock_density_per_ha",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0 per hectare, got {value}")
        if self.tree_density_per_ha > 5000:
            raise ValueError(
                f"tree_density_per_ha={self.tree_density_per_ha} is denser than any forest (max 5000)"
            )
        if not 0.03 <= self.dbh_median_m <= 2.0:
            raise ValueError(f"dbh_median_m must be within [0.03, 2] m, got {self.dbh_median_m}")
        if not 0.0 <= self.dbh_sigma <= 1.5:
            raise ValueError(f"dbh_sigma must be within [0, 1.5], got {self.dbh_sigma}")
        if not 0.0 <= self.conifer_fraction <= 1.0:
            raise ValueError(f"conifer_fraction must be within [0, 1], got {self.conifer_fraction}")
        if not 0.0 <= self.clearing_radius_m <= self.size_m / 4:
            raise ValueError(f"clearing_radius_m must be within [0, size_m/4], got {self.clearing_radius_m}")
        if not -90.0 <= self.datum_lat_deg <= 90.0:
            raise ValueError(f"datum_lat_deg must be within [-90, 90], got {self.datum_lat_deg}")
        if not -180.0 <= self.datum_lon_deg <= 180.0:
            raise ValueError(f"datum_lon_deg must be within [-180, 180], got {self.datum_lon_deg}")
        for name, low, high in _RANGES:
            value = getattr(self, name)
            if name in _INTEGER_FIELDS and not (isinstance(value, (int, np.integer)) and not isinstance(value, bool)):
                raise ValueError(f"{name} must be an integer within [{low:g}, {high:g}], got {value!r}")
            if not (isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(value)
                    and low <= value <= high):
                raise ValueError(f"{name} must be within [{low:g}, {high:g}], got {value!r}")
        return self

    @property
    def relief(self) -> Relief:
        """The terrain landforms these fields describe."""
        return Relief(
            hill_height_m=self.hill_height_m,
            hill_wavelength_m=self.hill_wavelength_m,
            valley_count=int(self.valley_count),
            valley_depth_m=self.valley_depth_m,
            valley_width_m=self.valley_width_m,
            ridge_count=int(self.ridge_count),
            ridge_height_m=self.ridge_height_m,
            ridge_width_m=self.ridge_width_m,
            max_slope=self.terrain_max_slope,
        )


# (field, low, high) of the fields added for domain randomisation, as their docstrings state
_RANGES: tuple[tuple[str, float, float], ...] = (
    ("terrain_bump_m", 0.0, 0.5),
    ("hill_height_m", 0.0, 20.0),
    ("hill_wavelength_m", 5.0, 500.0),
    ("valley_count", 0, 6),
    ("valley_depth_m", 0.0, 10.0),
    ("valley_width_m", 1.0, 100.0),
    ("ridge_count", 0, 6),
    ("ridge_height_m", 0.0, 10.0),
    ("ridge_width_m", 1.0, 100.0),
    ("terrain_max_slope", 0.02, 1.0),
    ("tree_pattern", -1.0, 1.0),
    ("snag_fraction", 0.0, 1.0),
    ("conifer_crown_base", 0.03, 0.9),
    ("broadleaf_crown_base", 0.03, 0.9),
    ("conifer_crown_width", 0.3, 2.0),
    ("broadleaf_crown_width", 0.3, 2.0),
    ("crown_irregularity", 0.0, 1.0),
    ("fern_density_per_ha", 0.0, 3000.0),
)
_INTEGER_FIELDS = frozenset({"valley_count", "ridge_count"})


@dataclass(frozen=True)
class Tree:
    """A standing tree; ``z`` is the ground height at the stem base."""

    x: float
    y: float
    z: float
    dbh: float
    height: float
    crown_radius: float
    crown_base: float
    lean: float
    lean_dir: float
    conifer: bool
    dead: bool = False
    """A snag: standing dead, no foliage (``crown_radius`` 0), the top broken off at ``height``."""
    crown_roughness: float = 0.3
    """Lumpiness of the crown mesh (``WorldConfig.crown_irregularity``)."""

    def radius_at(self, h: float) -> float:
        """Trunk radius ``h`` metres above its base: root flare below 0.5 m, linear taper above."""
        r_bh = self.dbh / 2.0
        if h < 0.5:
            return r_bh * (1.0 + 0.25 * (0.5 - max(h, 0.0)) / 0.5)
        return max(r_bh * (1.0 - 0.6 * (h - 1.3) / max(self.height - 1.3, 0.1)), 0.02)

    def axis_at(self, h: float) -> tuple[float, float]:
        """(x, y) of the trunk axis ``h`` metres above the base (trees lean a little)."""
        off = math.tan(self.lean) * h
        return self.x + off * math.cos(self.lean_dir), self.y + off * math.sin(self.lean_dir)


@dataclass(frozen=True)
class Log:
    """A fallen log lying on the ground, centred at (x, y, z)."""

    x: float
    y: float
    z: float
    yaw: float
    length: float
    diameter: float

    def endpoints(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """The two ends of the log's axis in the horizontal plane."""
        dx = 0.5 * self.length * math.cos(self.yaw)
        dy = 0.5 * self.length * math.sin(self.yaw)
        return (self.x - dx, self.y - dy), (self.x + dx, self.y + dy)


@dataclass(frozen=True)
class Bush:
    """An understorey shrub: a squashed ellipsoid of foliage."""

    x: float
    y: float
    z: float
    radius: float
    height: float


@dataclass(frozen=True)
class Rock:
    """A boulder, partly buried."""

    x: float
    y: float
    z: float
    radius: float
    squash: float
    yaw: float


@dataclass(frozen=True)
class Fern:
    """A fern clump: fronds arching out from (x, y, z) to ``radius``, ``height`` tall."""

    x: float
    y: float
    z: float
    radius: float
    height: float
    fronds: int


@dataclass
class ForestWorld:
    """A generated forest: terrain and every object in it."""

    config: WorldConfig
    terrain: Terrain
    trees: list[Tree] = field(default_factory=list)
    logs: list[Log] = field(default_factory=list)
    bushes: list[Bush] = field(default_factory=list)
    rocks: list[Rock] = field(default_factory=list)
    ferns: list[Fern] = field(default_factory=list)

    @property
    def half_size(self) -> float:
        """Half the side of the square world, in metres."""
        return self.config.size_m / 2.0

    def free_pose(self, rng: np.random.Generator, clearance_m: float = 1.2) -> tuple[float, float, float]:
        """A random pose (x, y, yaw) at least ``clearance_m`` from every obstacle, away from the edges."""
        circles = self.obstacle_circles()
        half = self.half_size - 3.0
        for _ in range(2000):
            x, y = rng.uniform(-half, half, size=2)
            if circles.size == 0 or (np.hypot(circles[:, 0] - x, circles[:, 1] - y)
                                     - circles[:, 2]).min() > clearance_m:
                return float(x), float(y), float(rng.uniform(-math.pi, math.pi))
        return 0.0, 0.0, 0.0  # the central clearing is always free

    def obstacle_circles(self, clearance_h: float = 0.3) -> np.ndarray:
        """(N, 3) array of (x, y, radius) footprints a low rover must not enter.

        Trunks at ``clearance_h`` height, bushes, rocks, and logs as chains of circles.
        """
        rows: list[tuple[float, float, float]] = []
        for t in self.trees:
            ax, ay = t.axis_at(clearance_h)
            rows.append((ax, ay, t.radius_at(clearance_h)))
        for b in self.bushes:
            rows.append((b.x, b.y, b.radius))
        for r in self.rocks:
            rows.append((r.x, r.y, r.radius))
        for f in self.ferns:
            # fronds bend aside; the dense centre is what stops a small rover
            rows.append((f.x, f.y, FERN_OBSTACLE_SHARE * f.radius))
        for log in self.logs:
            (x0, y0), (x1, y1) = log.endpoints()
            n = max(2, int(math.ceil(log.length / max(log.diameter, 0.1))) + 1)
            for s in np.linspace(0.0, 1.0, n):
                rows.append((x0 + s * (x1 - x0), y0 + s * (y1 - y0), log.diameter / 2.0))
        if not rows:
            return np.zeros((0, 3))
        return np.asarray(rows, dtype=np.float64)

    def canopy_cover(self, x: float, y: float) -> float:
        """Fraction of sky blocked above (x, y), in [0, 1], from overlapping crowns."""
        if not self.trees:
            return 0.0
        open_sky = 1.0
        for t in self.trees:
            d = math.hypot(t.x - x, t.y - y)
            if d < t.crown_radius:
                # a crown blocks most of the sky near its centre, less at its rim
                open_sky *= 1.0 - 0.85 * (1.0 - (d / t.crown_radius) ** 2)
        return 1.0 - open_sky

    def summary(self) -> dict:
        """Counts and stand statistics, for logs and reports."""
        area_ha = self.config.size_m**2 / HECTARE_M2
        dbh = np.array([t.dbh for t in self.trees]) if self.trees else np.zeros(1)
        return {
            "seed": self.config.seed,
            "size_m": self.config.size_m,
            "trees": len(self.trees),
            "stems_per_ha": len(self.trees) / area_ha,
            "dbh_mean_m": float(dbh.mean()),
            "dbh_max_m": float(dbh.max()),
            "logs": len(self.logs),
            "bushes": len(self.bushes),
            "rocks": len(self.rocks),
            "ferns": len(self.ferns),
            "snags": sum(1 for t in self.trees if t.dead),
            "max_slope": max_grid_slope(self.terrain.heights, self.terrain.resolution),
            "terrain_relief_m": float(self.terrain.heights.max() - self.terrain.heights.min()),
        }

    def to_dict(self) -> dict:
        """Plain-data form (JSON-serialisable apart from the height grid, given as a list)."""
        return {
            "config": asdict(self.config),
            "terrain": {
                "resolution": self.terrain.resolution,
                "x0": self.terrain.x0,
                "y0": self.terrain.y0,
                "heights": self.terrain.heights.tolist(),
            },
            "trees": [asdict(t) for t in self.trees],
            "logs": [asdict(o) for o in self.logs],
            "bushes": [asdict(o) for o in self.bushes],
            "rocks": [asdict(o) for o in self.rocks],
            "ferns": [asdict(o) for o in self.ferns],
        }


def _count(rng: np.random.Generator, density_per_ha: float, area_m2: float) -> int:
    return int(rng.poisson(density_per_ha * area_m2 / HECTARE_M2))


def generate_world(config: WorldConfig | None = None, **overrides) -> ForestWorld:
    """Generate a forest from ``config`` (or ``WorldConfig(**overrides)``); same seed, same world."""
    if config is None:
        config = WorldConfig(**overrides)
    elif overrides:
        config = WorldConfig(**{**asdict(config), **overrides})
    config.validate()
    rng = np.random.default_rng(config.seed)
    # the randomisation fields draw from streams of their own, so a world that leaves them at their
    # defaults is drawn exactly as before they existed
    relief_rng, pattern_rng, extra_rng = (np.random.default_rng([config.seed, k]) for k in (101, 102, 103))
    terrain = generate_terrain(
        rng, config.size_m, config.terrain_resolution_m, config.terrain_roughness_m,
        bump_m=config.terrain_bump_m, relief=config.relief, relief_rng=relief_rng,
    )
    half = config.size_m / 2.0
    margin = 1.0
    area = config.size_m**2

    def uniform_xy() -> tuple[float, float]:
        return (
            float(rng.uniform(-half + margin, half - margin)),
            float(rng.uniform(-half + margin, half - margin)),
        )

    def in_clearing(x: float, y: float, pad: float) -> bool:
        return math.hypot(x, y) < config.clearing_radius_m + pad

    trees: list[Tree] = []
    n_trees = _count(rng, config.tree_density_per_ha, area)
    stem_xy = _stem_positions(config.tree_pattern, n_trees, half - margin, pattern_rng)
    attempts = 0
    while len(trees) < n_trees and attempts < n_trees * 30:
        attempts += 1
        x, y = uniform_xy() if stem_xy is None else stem_xy()
        dbh = float(np.clip(rng.lognormal(math.log(config.dbh_median_m), config.dbh_sigma), 0.06, 1.2))
        if in_clearing(x, y, dbh):
            continue
        # stems keep roughly a crown-competition distance apart
        min_gap = 0.8 + 2.0 * dbh
        if any(math.hypot(t.x - x, t.y - y) < min_gap * 0.5 + t.dbh for t in trees):
            continue
        conifer = bool(rng.random() < config.conifer_fraction)
        # Naslund-type height curve: about 20 m at 0.3 m DBH, saturating near 32 m
        height = float(1.3 + (dbh * 100) ** 2 / (1.5 + 0.17 * dbh * 100) ** 2 * rng.uniform(0.85, 1.15))
        width = config.conifer_crown_width if conifer else config.broadleaf_crown_width
        crown_radius = float(np.clip((0.6 + 9.0 * dbh) * (0.7 if conifer else 1.0) * width, 0.6, 7.0))
        base_fraction = config.conifer_crown_base if conifer else config.broadleaf_crown_base
        crown_base = float(height * base_fraction * rng.uniform(0.8, 1.2))
        # a crown low enough to touch the camera would be driven through; tier rims droop up to ~0.2 r
        crown_base = max(crown_base, MIN_CROWN_BASE_M + 0.25 * crown_radius)
        lean = float(abs(rng.normal(0.0, 0.04)))
        lean_dir = float(rng.uniform(-math.pi, math.pi))
        dead = config.snag_fraction > 0 and bool(extra_rng.random() < config.snag_fraction)
        if dead:
            # snags lose their crown and, sooner or later, their top
            height = max(height * float(extra_rng.uniform(0.35, 0.95)), 2.0)
            crown_radius = 0.0
            crown_base = height
        trees.append(
            Tree(
                x=x,
                y=y,
                z=float(terrain.height_at(x, y)),
                dbh=dbh,
                height=height,
                crown_radius=crown_radius,
                crown_base=crown_base,
                lean=lean,
                lean_dir=lean_dir,
                conifer=conifer,
                dead=dead,
                crown_roughness=float(config.crown_irregularity),
            )
        )

    def clear_of_trees(x: float, y: float, r: float) -> bool:
        return all(math.hypot(t.x - x, t.y - y) > t.dbh / 2 + r + 0.2 for t in trees)

    logs: list[Log] = []
    for _ in range(_count(rng, config.log_density_per_ha, area)):
        for _try in range(20):
            x, y = uniform_xy()
            length = float(rng.uniform(1.5, 7.0))
            diameter = float(np.clip(rng.lognormal(math.log(0.22), 0.35), 0.08, 0.7))
            yaw = float(rng.uniform(-math.pi, math.pi))
            if in_clearing(x, y, length / 2 + 0.5):
                continue
            candidate = Log(x, y, 0.0, yaw, length, diameter)
            (x0, y0), (x1, y1) = candidate.endpoints()
            if not all(clear_of_trees(x0 + s * (x1 - x0), y0 + s * (y1 - y0), diameter / 2) for s in (0, 0.5, 1)):
                continue
            zc = min(float(terrain.height_at(x0, y0)), float(terrain.height_at(x1, y1)), float(terrain.height_at(x, y)))
            logs.append(Log(x, y, zc + diameter * 0.4, yaw, length, diameter))
            break

    bushes: list[Bush] = []
    for _ in range(_count(rng, config.bush_density_per_ha, area)):
        for _try in range(20):
            x, y = uniform_xy()
            radius = float(rng.uniform(0.25, 1.0))
            if in_clearing(x, y, radius) or not clear_of_trees(x, y, radius * 0.5):
                continue
            bushes.append(
                Bush(x, y, float(terrain.height_at(x, y)), radius, float(radius * rng.uniform(0.8, 1.6)))
            )
            break

    rocks: list[Rock] = []
    for _ in range(_count(rng, config.rock_density_per_ha, area)):
        for _try in range(20):
            x, y = uniform_xy()
            radius = float(np.clip(rng.lognormal(math.log(0.18), 0.5), 0.05, 0.9))
            if in_clearing(x, y, radius) or not clear_of_trees(x, y, radius):
                continue
            squash = float(rng.uniform(0.4, 0.8))
            rocks.append(
                Rock(
                    x,
                    y,
                    float(terrain.height_at(x, y)) - 0.3 * radius * squash,
                    radius,
                    squash,
                    float(rng.uniform(-math.pi, math.pi)),
                )
            )
            break

    ferns: list[Fern] = []
    for _ in range(_count(extra_rng, config.fern_density_per_ha, area)):
        for _try in range(20):
            x, y = (float(v) for v in extra_rng.uniform(-half + margin, half - margin, 2))
            radius = float(extra_rng.uniform(0.3, 0.8))
            if in_clearing(x, y, radius) or not clear_of_trees(x, y, radius * 0.5):
                continue
            height = float(min(radius * extra_rng.uniform(0.8, 1.3), 0.9))
            ferns.append(Fern(x, y, float(terrain.height_at(x, y)), radius, height, int(extra_rng.integers(5, 10))))
            break

    return ForestWorld(config=config, terrain=terrain, trees=trees, logs=logs, bushes=bushes, rocks=rocks,
                       ferns=ferns)


def _stem_positions(pattern: float, n_trees: int, half: float,
                    rng: np.random.Generator) -> Callable[[], tuple[float, float]] | None:
    """Candidate stem positions for a spatial ``pattern`` in [-1, 1]; None for 0 (uniform, the old draw).

    Clustered (< 0): a share ``-pattern`` of the candidates falls around cluster centres (groups of
    regeneration, 2-4 m across); regular (> 0): candidates sit on a rotated square grid of the
    stand's mean spacing, jittered by ``(1 - pattern)`` of a cell (1: plantation rows).
    """
    if pattern == 0 or n_trees == 0:
        return None
    lo, hi = -half, half

    def uniform() -> tuple[float, float]:
        return float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))

    if pattern < 0:
        share = -pattern
        per_cluster = 3.0 + 12.0 * share
        centres = rng.uniform(lo, hi, size=(max(1, int(round(n_trees / per_cluster))), 2))
        spread = 1.0 + 2.5 * (1.0 - share)

        def clustered() -> tuple[float, float]:
            if rng.random() >= share:
                return uniform()
            cx, cy = centres[rng.integers(len(centres))]
            return (float(np.clip(cx + rng.normal(0.0, spread), lo, hi)),
                    float(np.clip(cy + rng.normal(0.0, spread), lo, hi)))

        return clustered
    spacing = 2.0 * half / math.sqrt(n_trees)
    angle = rng.uniform(0.0, math.pi / 2)
    reach = int(math.ceil(math.sqrt(2.0) * half / spacing)) + 1
    ij = np.stack(np.meshgrid(np.arange(-reach, reach + 1), np.arange(-reach, reach + 1)), -1).reshape(-1, 2)
    offset = rng.uniform(0.0, spacing, 2)
    c, s = math.cos(angle), math.sin(angle)
    grid = ij * spacing + offset
    grid = grid @ np.array([[c, s], [-s, c]])
    grid = grid[(np.abs(grid) <= half).all(axis=1)]
    if len(grid) == 0:
        return uniform
    order = rng.permutation(len(grid))
    jitter = 0.5 * (1.0 - pattern) + 0.04
    state = {"k": 0}

    def regular() -> tuple[float, float]:
        gx, gy = grid[order[state["k"] % len(grid)]]
        state["k"] += 1
        return (float(np.clip(gx + rng.uniform(-jitter, jitter) * spacing, lo, hi)),
                float(np.clip(gy + rng.uniform(-jitter, jitter) * spacing, lo, hi)))

    return regular
