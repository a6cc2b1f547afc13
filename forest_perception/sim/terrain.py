"""Forest-floor terrain: a fractal heightfield with optional hills, valleys and ridges, and bilinear look-ups."""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np


def fractal_noise(
    rng: np.random.Generator, shape: tuple[int, int], octaves: int = 5, persistence: float = 0.5
) -> np.ndarray:
    """Sum of bilinearly upsampled random grids (value noise), normalised to [-1, 1]."""
    ny, nx = shape
    out = np.zeros(shape, dtype=np.float64)
    amplitude = 1.0
    for octave in range(octaves):
        cells = 2 ** (octave + 1)
        grid = rng.uniform(-1.0, 1.0, size=(cells + 1, cells + 1))
        ys = np.linspace(0, cells, ny)
        xs = np.linspace(0, cells, nx)
        y0 = np.clip(np.floor(ys).astype(int), 0, cells - 1)
        x0 = np.clip(np.floor(xs).astype(int), 0, cells - 1)
        fy = (ys - y0)[:, None]
        fx = (xs - x0)[None, :]
        # smoothstep keeps the gradient continuous across cell borders
        fy = fy * fy * (3 - 2 * fy)
        fx = fx * fx * (3 - 2 * fx)
        g00 = grid[np.ix_(y0, x0)]
        g01 = grid[np.ix_(y0, x0 + 1)]
        g10 = grid[np.ix_(y0 + 1, x0)]
        g11 = grid[np.ix_(y0 + 1, x0 + 1)]
        layer = (g00 * (1 - fx) + g01 * fx) * (1 - fy) + (g10 * (1 - fx) + g11 * fx) * fy
        out += amplitude * layer
        amplitude *= persistence
    peak = np.abs(out).max()
    return out / peak if peak > 0 else out


@dataclass
class Terrain:
    """Heightfield over a square area centred on the world origin (ENU, metres).

    ``heights[j, i]`` is the ground height at ``x = x0 + i * resolution``,
    ``y = y0 + j * resolution``.
    """

    heights: np.ndarray
    resolution: float
    x0: float
    y0: float

    @property
    def shape(self) -> tuple[int, int]:
        """Grid shape (ny, nx)."""
        return self.heights.shape  # type: ignore[return-value]

    @property
    def extent(self) -> tuple[float, float, float, float]:
        """(xmin, xmax, ymin, ymax) covered by the grid."""
        ny, nx = self.heights.shape
        return (
            self.x0,
            self.x0 + (nx - 1) * self.resolution,
            self.y0,
            self.y0 + (ny - 1) * self.resolution,
        )

    def height_at(self, x: float | np.ndarray, y: float | np.ndarray) -> float | np.ndarray:
        """Bilinearly interpolated ground height; points outside are clamped to the edge."""
        ny, nx = self.heights.shape
        u = np.clip((np.asarray(x, dtype=np.float64) - self.x0) / self.resolution, 0, nx - 1 - 1e-9)
        v = np.clip((np.asarray(y, dtype=np.float64) - self.y0) / self.resolution, 0, ny - 1 - 1e-9)
        i = np.floor(u).astype(int)
        j = np.floor(v).astype(int)
        fu = u - i
        fv = v - j
        h = self.heights
        z = (h[j, i] * (1 - fu) + h[j, i + 1] * fu) * (1 - fv) + (
            h[j + 1, i] * (1 - fu) + h[j + 1, i + 1] * fu
        ) * fv
        return float(z) if np.ndim(z) == 0 else z

    def gradient_at(self, x: float, y: float) -> tuple[float, float]:
        """Slope (dz/dx, dz/dy) by central differences over one grid cell."""
        d = self.resolution * 0.5
        dzdx = (self.height_at(x + d, y) - self.height_at(x - d, y)) / (2 * d)
        dzdy = (self.height_at(x, y + d) - self.height_at(x, y - d)) / (2 * d)
        return float(dzdx), float(dzdy)

    def normal_at(self, x: float, y: float) -> np.ndarray:
        """Unit upward surface normal."""
        gx, gy = self.gradient_at(x, y)
        n = np.array([-gx, -gy, 1.0])
        return n / np.linalg.norm(n)


@dataclass(frozen=True)
class Relief:
    """Large landforms on top of the rolling ground (all zero: today's gentle fractal bumps only).

    ``hill_height_m`` is the peak height of smooth hills of about ``hill_wavelength_m`` from crest
    to crest; ``valley_count`` meandering valleys (gullies when narrow) are cut ``valley_depth_m``
    deep with a Gaussian cross-section of half-width ``valley_width_m``; ``ridge_count`` ridges
    rise the same way. ``max_slope`` (rise over run) caps the steepest ground slope of the whole
    grid: landforms are scaled down until it holds, so the rover can always drive.
    """

    hill_height_m: float = 0.0
    hill_wavelength_m: float = 40.0
    valley_count: int = 0
    valley_depth_m: float = 1.5
    valley_width_m: float = 6.0
    ridge_count: int = 0
    ridge_height_m: float = 1.5
    ridge_width_m: float = 6.0
    max_slope: float = 1.0


def _hills(rng: np.random.Generator, n: int, resolution: float, wavelength_m: float) -> np.ndarray:
    """Smooth random hills, peak |h| = 1: white noise low-passed to about ``wavelength_m`` crest to crest."""
    sigma_cells = max(wavelength_m / (2.0 * math.pi * resolution), 0.5)
    pad = int(math.ceil(3 * sigma_cells))
    # noise beyond the grid, so the hills do not flatten at the border the way reflected noise would
    white = rng.standard_normal((n + 2 * pad, n + 2 * pad)).astype(np.float32)
    smooth = cv2.GaussianBlur(white, (0, 0), sigma_cells, borderType=cv2.BORDER_REFLECT)[pad:pad + n, pad:pad + n]
    smooth = smooth.astype(np.float64) - float(smooth.mean())
    peak = float(np.abs(smooth).max())
    return smooth / peak if peak > 0 else smooth


def _meander_profile(rng: np.random.Generator, gx: np.ndarray, gy: np.ndarray, size_m: float,
                     width_m: float) -> np.ndarray:
    """A Gaussian trough profile (1 on the line, 0 far away) along a meandering line across the world."""
    heading = rng.uniform(0.0, math.pi)
    offset = rng.uniform(-0.3, 0.3) * size_m  # where the line crosses the centre, across it
    along = gx * math.cos(heading) + gy * math.sin(heading)
    across = -gx * math.sin(heading) + gy * math.cos(heading) - offset
    # meanders: a few bends per world, an amplitude of a tenth of the world
    bend_m = rng.uniform(0.6, 1.2) * size_m / 2.0
    amp = rng.uniform(0.05, 0.12) * size_m
    phase = rng.uniform(0.0, 2.0 * math.pi)
    centre = amp * np.sin(2.0 * math.pi * along / bend_m + phase)
    slope = amp * 2.0 * math.pi / bend_m * np.cos(2.0 * math.pi * along / bend_m + phase)
    distance = (across - centre) / np.sqrt(1.0 + slope * slope)  # perpendicular distance to the line, roughly
    return np.exp(-0.5 * (distance / width_m) ** 2)


def max_grid_slope(heights: np.ndarray, resolution: float) -> float:
    """Steepest slope (rise over run) between grid neighbours, along x, y or a diagonal."""
    if heights.shape[0] < 2 or heights.shape[1] < 2:
        return 0.0
    sx = np.abs(np.diff(heights, axis=1)).max() / resolution
    sy = np.abs(np.diff(heights, axis=0)).max() / resolution
    # the mesh triangulates each cell along a diagonal: its slope is what the rover drives on
    gx = np.diff(heights, axis=1)[:-1, :] / resolution
    gy = np.diff(heights, axis=0)[:, :-1] / resolution
    return float(max(sx, sy, np.hypot(gx, gy).max()))


def generate_terrain(
    rng: np.random.Generator, size_m: float, resolution: float, roughness_m: float, bump_m: float = 0.05,
    relief: Relief | None = None, relief_rng: np.random.Generator | None = None,
) -> Terrain:
    """Rolling ground with ``roughness_m`` peak amplitude plus fine bumps (``bump_m``, about 5 cm), plus ``relief``.

    The landforms of ``relief`` draw from ``relief_rng`` (not ``rng``), so a world without them is
    the same as before they existed; their slope is capped at ``relief.max_slope``.
    """
    n = int(round(size_m / resolution)) + 1
    broad = fractal_noise(rng, (n, n), octaves=4, persistence=0.45)
    fine = rng.normal(0.0, 1.0, size=(n, n))
    # light 3x3 box blur so the fine bumps are bumps, not spikes
    padded = np.pad(fine, 1, mode="edge")
    fine = sum(padded[dy : dy + n, dx : dx + n] for dy in range(3) for dx in range(3)) / 9.0
    bumps = bump_m * fine / max(np.abs(fine).max(), 1e-9)
    landforms = roughness_m * broad
    relief = relief or Relief()
    if relief.hill_height_m > 0 or relief.valley_count > 0 or relief.ridge_count > 0:
        relief_rng = relief_rng if relief_rng is not None else np.random.default_rng(0)
        half = (n - 1) * resolution / 2.0
        axis = np.linspace(-half, half, n)
        gx, gy = np.meshgrid(axis, axis)
        if relief.hill_height_m > 0:
            landforms = landforms + relief.hill_height_m * _hills(relief_rng, n, resolution, relief.hill_wavelength_m)
        for _ in range(int(relief.valley_count)):
            landforms = landforms - relief.valley_depth_m * _meander_profile(relief_rng, gx, gy, size_m,
                                                                             relief.valley_width_m)
        for _ in range(int(relief.ridge_count)):
            landforms = landforms + relief.ridge_height_m * _meander_profile(relief_rng, gx, gy, size_m,
                                                                             relief.ridge_width_m)
    # the steepest slope of the sum is at most the sum of the steepest slopes: scale the landforms
    # so that, with the bumps at their steepest, no cell is steeper than max_slope
    slope_landforms = max_grid_slope(landforms, resolution)
    room = relief.max_slope - max_grid_slope(bumps, resolution)
    if slope_landforms > room:
        landforms = landforms * max(room, 0.0) / slope_landforms
    heights = landforms + bumps
    half = (n - 1) * resolution / 2.0
    return Terrain(heights=heights.astype(np.float64), resolution=resolution, x0=-half, y0=-half)
