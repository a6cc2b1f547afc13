"""Uneven forest-floor terrain: a fractal heightfield with bilinear look-ups."""

from __future__ import annotations

from dataclasses import dataclass

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


def generate_terrain(
    rng: np.random.Generator, size_m: float, resolution: float, roughness_m: float
) -> Terrain:
    """Rolling ground with ``roughness_m`` peak amplitude plus fine bumps (about 5 cm)."""
    n = int(round(size_m / resolution)) + 1
    broad = fractal_noise(rng, (n, n), octaves=4, persistence=0.45)
    fine = rng.normal(0.0, 1.0, size=(n, n))
    # light 3x3 box blur so the fine bumps are bumps, not spikes
    padded = np.pad(fine, 1, mode="edge")
    fine = sum(padded[dy : dy + n, dx : dx + n] for dy in range(3) for dx in range(3)) / 9.0
    heights = roughness_m * broad + 0.05 * fine / max(np.abs(fine).max(), 1e-9)
    half = (n - 1) * resolution / 2.0
    return Terrain(heights=heights.astype(np.float64), resolution=resolution, x0=-half, y0=-half)
