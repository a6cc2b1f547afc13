"""Procedural forest textures (bark, leaf litter, moss, grass, rock, foliage, log, fern), made with numpy.

Every texture is seamless (it tiles in both directions, built from periodic spectral
noise and wrapped stamps) and deterministic from a seed. Textures carry the cues a
monocular depth network learns from: grain that shrinks with distance, furrows,
leaf-sized blotches; none is a flat colour. The renderer samples them nearest-neighbour
(TinyRenderer has no mipmaps), so most of the energy sits at low and middle
frequencies to keep distant surfaces from turning into salt-and-pepper noise.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import cv2
import numpy as np

# bump when a generator changes, so stale cached PNGs are not reused
TEXTURE_VERSION = 7

TEXTURE_NAMES = (
    "bark_conifer",
    "bark_broadleaf",
    "litter",
    "moss",
    "grass",
    "rock",
    "foliage_conifer",
    "foliage_broadleaf",
    "bush",
    "log",
    "treeline",
    "bark_snag",
    "fern",
)

# seen from 0.2 m, these get 4x the pixels (nearest-neighbour sampling is blocky up close):
# 1024 px per 2 m litter tile is 2 mm a texel, about a pixel at 0.5 m for a 640 px wide image
GROUND_TEXTURES = ("litter", "moss", "grass")
# TinyRenderer samples nearest-neighbour without mipmaps: far ground uses these
# pre-filtered copies (area-averaged FAR_FACTOR x down), swapped in per tile by distance
FAR_SUFFIX = "_far"
FAR_FACTOR = 16
FAR_TEXTURE_NAMES = tuple(n + FAR_SUFFIX for n in GROUND_TEXTURES)
ALL_TEXTURE_NAMES = TEXTURE_NAMES + FAR_TEXTURE_NAMES

# Log texture atlas: bark on u in [0, LOG_BARK_U), end-grain rings in the square
# LOG_CAP_U0..1 x LOG_CAP_V0..LOG_CAP_V1 (meshes.py maps cylinder sides and caps there).
LOG_BARK_U = 0.75
LOG_CAP_U = (0.75, 1.0)
LOG_CAP_V = (0.375, 0.625)


def spectral_noise(
    rng: np.random.Generator,
    shape: tuple[int, int],
    beta: float = 2.0,
    stretch: tuple[float, float] = (1.0, 1.0),
    fmin: float = 1.0,
    fmax: float | None = None,
) -> np.ndarray:
    """Periodic 1/f^beta noise, zero mean and unit standard deviation.

    ``shape`` is (rows, cols). ``stretch`` = (sx, sy) weighs the column and row
    frequencies: sy > sx makes features long along the rows' axis (vertical streaks).
    ``fmin``/``fmax`` band-limit the spectrum in cycles per tile.
    """
    h, w = shape
    white = rng.standard_normal((h, w))
    fy = np.fft.fftfreq(h)[:, None] * h
    fx = np.fft.fftfreq(w)[None, :] * w
    f = np.sqrt((fx * stretch[0]) ** 2 + (fy * stretch[1]) ** 2)
    amp = np.zeros_like(f)
    band = f >= fmin
    if fmax is not None:
        band &= f <= fmax
    amp[band] = f[band] ** (-beta / 2.0)
    out = np.real(np.fft.ifft2(np.fft.fft2(white) * amp))
    out -= out.mean()
    std = out.std()
    return out / std if std > 0 else out


def _palette_mix(t: np.ndarray, colours: list[tuple[int, int, int]]) -> np.ndarray:
    """Map ``t`` in [0, 1] through a piecewise-linear colour ramp -> float RGB image."""
    stops = np.linspace(0.0, 1.0, len(colours))
    cols = np.asarray(colours, dtype=np.float64)
    t = np.clip(t, 0.0, 1.0)
    out = np.empty(t.shape + (3,), dtype=np.float64)
    for c in range(3):
        out[..., c] = np.interp(t, stops, cols[:, c])
    return out


def _cdf(x: np.ndarray) -> np.ndarray:
    """Squash unit-variance noise to [0, 1] (logistic approximation of the normal CDF)."""
    return 1.0 / (1.0 + np.exp(-1.7 * x))


def _wrapped_centres(x: float, y: float, reach: float, width: int, height: int) -> list[tuple[float, float]]:
    """(x, y) and its copies shifted by one tile that come within ``reach`` of the tile (seamless stamping)."""
    out = []
    for dx in (-width, 0, width):
        for dy in (-height, 0, height):
            cx, cy = x + dx, y + dy
            if -reach <= cx <= width + reach and -reach <= cy <= height + reach:
                out.append((cx, cy))
    return out


def _line_wrapped(img: np.ndarray, x: float, y: float, length: float, angle: float,
                  colour: tuple[float, float, float], thickness: int = 1) -> None:
    """Anti-aliased line of ``length`` px centred on (x, y), drawn seamlessly."""
    ex, ey = length * math.cos(angle) / 2, length * math.sin(angle) / 2
    for cx, cy in _wrapped_centres(x, y, length, img.shape[1], img.shape[0]):
        cv2.line(img, (int(round(cx - ex)), int(round(cy - ey))), (int(round(cx + ex)), int(round(cy + ey))),
                 colour, thickness, lineType=cv2.LINE_AA)


def _px(size: int, at_256: float) -> int:
    """A stroke width given for a 256 px texture, scaled to ``size`` (at least 1 px)."""
    return max(1, int(round(at_256 * size / 256.0)))


def _stamp_leaves(
    rng: np.random.Generator,
    img: np.ndarray,
    count: int,
    size_px: tuple[float, float],
    palette: list[tuple[int, int, int]],
    jitter: float = 0.15,
    midrib: bool = True,
) -> None:
    """Scatter elliptic leaves (with a darker midrib) over ``img`` in place, seamlessly."""
    pal = np.asarray(palette, dtype=np.float64)
    for _ in range(count):
        x, y = rng.uniform(0, img.shape[1]), rng.uniform(0, img.shape[0])
        a = rng.uniform(*size_px)
        b = a * rng.uniform(0.35, 0.6)
        ang = float(rng.uniform(0, 180))
        base = pal[rng.integers(len(pal))] * rng.uniform(1.0 - jitter, 1.0 + jitter)
        colour = tuple(float(c) for c in np.clip(base, 0, 255))
        rib = tuple(float(c) * 0.7 for c in colour)
        axes = (max(1, int(round(a))), max(1, int(round(b))))
        for cx, cy in _wrapped_centres(x, y, a + 2, img.shape[1], img.shape[0]):
            centre = (int(round(cx)), int(round(cy)))
            cv2.ellipse(img, centre, axes, ang, 0, 360, colour, -1, lineType=cv2.LINE_AA)
        if midrib and axes[0] >= 3:
            _line_wrapped(img, x, y, 1.8 * axes[0], math.radians(ang), rib, max(1, axes[1] // 5))


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def bark_texture(rng: np.random.Generator, size: int = 256, conifer: bool = True) -> np.ndarray:
    """Bark with vertical furrows (rows = height along the stem).

    Conifer bark is reddish-brown with scaly plates; broadleaf bark is grey-olive and
    smoother, with lichen-green patches.
    """
    shape = (size, size)
    furrow = spectral_noise(rng, shape, beta=2.2, stretch=(1.0, 7.0 if conifer else 10.0), fmin=3.0)
    ridges = 1.0 - np.abs(np.tanh(0.9 * furrow))  # bright ridges, dark narrow furrows
    plates = spectral_noise(rng, shape, beta=2.5, stretch=(1.0, 2.0), fmin=2.0)
    grain = spectral_noise(rng, shape, beta=1.0, fmin=16.0)
    blotch = spectral_noise(rng, shape, beta=3.0, fmin=1.0)
    if conifer:
        colours = [(38, 26, 20), (82, 52, 36), (122, 80, 54), (150, 104, 74)]
        t = 0.55 * ridges + 0.2 * _cdf(plates) + 0.08 * grain + 0.1 * _cdf(blotch)
    else:
        colours = [(42, 40, 34), (88, 84, 74), (126, 122, 110), (152, 150, 138)]
        t = 0.45 * ridges + 0.3 * _cdf(blotch) + 0.06 * grain + 0.1 * _cdf(plates)
    img = _palette_mix(t, colours)
    if not conifer:
        # lichen and algae on the weather side
        lichen = _cdf(1.6 * (spectral_noise(rng, shape, beta=2.8, fmin=2.0) - 0.6))
        img = img * (1 - 0.55 * lichen[..., None]) + np.array([96, 118, 70]) * 0.55 * lichen[..., None]
    return _to_uint8(img)


def litter_texture(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """Leaf-litter forest floor: humus, brown/orange leaves, needles, twigs, a little green."""
    shape = (size, size)
    big = spectral_noise(rng, shape, beta=3.0, fmin=1.0)
    mid = spectral_noise(rng, shape, beta=2.0, fmin=4.0)
    humus = _palette_mix(0.5 + 0.18 * big + 0.15 * mid, [(26, 19, 13), (48, 35, 24), (74, 55, 37)])
    img = humus.copy()
    leaves = [
        (88, 60, 36), (104, 72, 44), (122, 86, 52), (136, 94, 52), (150, 110, 66),
        (66, 48, 32), (124, 108, 78), (98, 90, 78), (80, 86, 46), (114, 66, 40),
    ]
    scale = size / 512.0  # leaf sizes are set for 512 px per litter tile (2 m)
    _stamp_leaves(rng, img, int(5200 * scale**2), (5.0 * scale, 15.0 * scale), leaves, jitter=0.2)
    # twigs and needles: thin dark lines
    for _ in range(int(300 * scale)):
        x, y = rng.uniform(0, size, 2)
        length = rng.uniform(8, 44) * scale
        ang = rng.uniform(0, math.pi)
        colour = tuple(float(c) for c in np.array([58, 40, 26]) * rng.uniform(0.7, 1.4))
        _line_wrapped(img, x, y, length, ang, colour, _px(size, rng.uniform(0.15, 0.5)))
    # multi-scale damp/dry blotches modulate the whole floor
    shade = 1.0 + 0.22 * big + 0.1 * spectral_noise(rng, shape, beta=2.0, fmin=6.0)
    img = img * shade[..., None]
    fine = spectral_noise(rng, shape, beta=0.5, fmin=32.0)
    img = img * (1.0 + 0.06 * fine[..., None])
    return _to_uint8(img)


def moss_texture(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """Cushion moss: yellow-green to dark green with fine grain and a few litter specks."""
    shape = (size, size)
    big = spectral_noise(rng, shape, beta=2.8, fmin=1.0)
    cushions = spectral_noise(rng, shape, beta=2.0, fmin=6.0)
    grain = spectral_noise(rng, shape, beta=0.8, fmin=24.0)
    t = 0.5 + 0.16 * big + 0.16 * cushions + 0.12 * grain
    img = _palette_mix(t, [(30, 44, 16), (58, 82, 26), (92, 114, 36), (138, 146, 58)])
    k = size / 256
    _stamp_leaves(rng, img, int(90 * k**2), (2.0 * k, 5.0 * k), [(110, 74, 38), (140, 96, 46)], midrib=False)
    return _to_uint8(img)


def grass_texture(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """Tufted woodland grass: thin blades of mixed greens and straw over dark soil."""
    shape = (size, size)
    img = _palette_mix(0.5 + 0.2 * spectral_noise(rng, shape, beta=2.5), [(30, 34, 16), (52, 58, 26), (70, 70, 34)])
    blades = [(74, 110, 38), (96, 132, 48), (120, 150, 60), (150, 150, 84), (60, 90, 30)]
    pal = np.asarray(blades, dtype=np.float64)
    n = int(2600 * size / 256)  # blades get longer and wider with the size, so the count grows slower
    for _ in range(n):
        x, y = rng.uniform(0, size, 2)
        length = rng.uniform(5, 14) * size / 256
        ang = rng.uniform(0, math.pi)
        colour = tuple(float(c) for c in np.clip(pal[rng.integers(len(pal))] * rng.uniform(0.8, 1.2), 0, 255))
        _line_wrapped(img, x, y, length, ang, colour, _px(size, 0.5))
    shade = 1.0 + 0.18 * spectral_noise(rng, shape, beta=3.0)
    return _to_uint8(img * shade[..., None])


def rock_texture(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """Grey granular rock with darker cracks, mineral speckle and lichen spots."""
    shape = (size, size)
    big = spectral_noise(rng, shape, beta=3.0)
    grains = spectral_noise(rng, shape, beta=0.3, fmin=40.0)
    cracks = np.abs(spectral_noise(rng, shape, beta=2.2, fmin=3.0))
    t = 0.55 + 0.12 * big + 0.13 * grains
    img = _palette_mix(t, [(52, 52, 50), (98, 96, 92), (138, 136, 130), (176, 174, 168)])
    img *= (0.6 + 0.4 * np.clip(cracks / 0.12, 0, 1))[..., None]  # thin dark crack network
    spots = _cdf(3.0 * (spectral_noise(rng, shape, beta=2.0, fmin=4.0) - 1.1))
    lichen = np.array([150, 152, 110])
    img = img * (1 - 0.6 * spots[..., None]) + lichen * 0.6 * spots[..., None]
    moss = _cdf(2.5 * (big - 0.9))
    img = img * (1 - 0.7 * moss[..., None]) + np.array([70, 92, 34]) * 0.7 * moss[..., None]
    return _to_uint8(img)


def foliage_texture(rng: np.random.Generator, size: int = 256, conifer: bool = True) -> np.ndarray:
    """Crown foliage: clustered greens with dark gaps between the clumps."""
    shape = (size, size)
    clumps = spectral_noise(rng, shape, beta=2.2, fmin=3.0)
    fine = spectral_noise(rng, shape, beta=0.8, fmin=20.0)
    big = spectral_noise(rng, shape, beta=3.0)
    if conifer:
        colours = [(10, 18, 12), (24, 46, 28), (40, 70, 40), (62, 92, 54)]
        t = 0.5 + 0.2 * clumps + 0.14 * fine + 0.08 * big
    else:
        colours = [(14, 22, 8), (40, 66, 20), (74, 106, 34), (118, 146, 58)]
        t = 0.5 + 0.18 * clumps + 0.1 * fine + 0.1 * big
    img = _palette_mix(t, colours)
    gaps = clumps < -0.9  # deep shadow between the clumps
    img[gaps] *= 0.35
    if not conifer:
        _stamp_leaves(rng, img, int(700 * (size / 256) ** 2), (2.5, 6.0),
                      [(70, 104, 32), (96, 130, 44), (56, 86, 26), (120, 150, 60)], midrib=False)
    return _to_uint8(img)


def bush_texture(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """Understorey shrub (bramble, holly, young beech): mixed greens, a few dead leaves."""
    shape = (size, size)
    clumps = spectral_noise(rng, shape, beta=2.0, fmin=4.0)
    img = _palette_mix(0.5 + 0.2 * clumps, [(12, 20, 8), (36, 58, 22), (64, 92, 32)])
    _stamp_leaves(rng, img, int(1100 * (size / 256) ** 2), (3.0, 7.5),
                  [(58, 92, 28), (82, 118, 38), (104, 136, 48), (46, 72, 24), (120, 96, 46)], jitter=0.25)
    img[clumps < -1.1] *= 0.4
    return _to_uint8(img)


def log_texture(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """Fallen-log atlas: weathered, mossy bark on the left 3/4, end-grain rings on the right."""
    bark_w = int(round(size * LOG_BARK_U))
    shape = (size, bark_w)
    furrow = spectral_noise(rng, shape, beta=2.2, stretch=(1.0, 8.0), fmin=3.0)  # along the log axis (v)
    ridges = 1.0 - np.abs(np.tanh(0.9 * furrow))
    blotch = spectral_noise(rng, shape, beta=3.0)
    grain = spectral_noise(rng, shape, beta=1.0, fmin=16.0)
    t = 0.5 * ridges + 0.25 * _cdf(blotch) + 0.08 * grain
    bark = _palette_mix(t, [(30, 22, 16), (70, 52, 36), (108, 86, 64), (134, 116, 92)])
    moss = _cdf(2.5 * (spectral_noise(rng, shape, beta=2.6) - 0.5))
    bark = bark * (1 - 0.75 * moss[..., None]) + np.array([72, 96, 32]) * 0.75 * moss[..., None]
    cap_w = size - bark_w
    yy, xx = np.mgrid[0:size, 0:cap_w].astype(np.float64)
    cy = size * (1.0 - (LOG_CAP_V[0] + LOG_CAP_V[1]) / 2.0)
    r = np.hypot(xx - (cap_w - 1) / 2.0, (yy - cy))
    wobble = 0.8 * spectral_noise(rng, (size, cap_w), beta=2.5)
    rings = 0.5 + 0.5 * np.sin(r * 1.3 + wobble)
    cap = _palette_mix(0.35 + 0.4 * rings + 0.1 * spectral_noise(rng, (size, cap_w), beta=1.0),
                       [(92, 66, 40), (150, 114, 74), (186, 150, 102)])
    cap[r > cap_w * 0.47] *= 0.55  # bark rim
    img = np.concatenate([bark, cap], axis=1)
    return _to_uint8(img)


def treeline_texture(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """Distant forest seen through the stand: trunks and understorey below, foliage above.

    Painted on the render-only wall around the world (rows: top = canopy). Colours are
    darker than near surfaces: the fog/haze of the camera pipeline lightens them by depth.
    """
    shape = (size, size)
    rows = np.linspace(1.0, 0.0, size)[:, None]  # 1 at the top row
    canopy = _palette_mix(0.5 + 0.22 * spectral_noise(rng, shape, beta=2.2, stretch=(1.0, 1.0), fmin=3.0),
                          [(14, 24, 14), (34, 54, 28), (58, 80, 40)])
    under = _palette_mix(0.5 + 0.2 * spectral_noise(rng, shape, beta=2.4, fmin=2.0),
                         [(22, 22, 14), (44, 46, 26), (64, 62, 40)])
    edge = 0.45 + 0.08 * spectral_noise(rng, (1, size), beta=2.0, fmin=2.0)
    blend = _cdf((rows - edge) * 14.0)[..., None]
    img = under * (1 - blend) + canopy * blend
    # trunks: vertical bars of varied width and tone, fading into the canopy
    x = np.arange(size)
    for _ in range(int(26 * size / 256)):
        cx = rng.uniform(0, size)
        half = rng.uniform(0.6, 3.5) * size / 256
        tone = np.array([70, 60, 50]) * rng.uniform(0.5, 1.2)
        dist = np.minimum(np.abs(x - cx), size - np.abs(x - cx))
        cover = np.clip(half + 0.5 - dist, 0, 1)[None, :] * (1 - _cdf((rows - rng.uniform(0.5, 0.8)) * 12.0))
        img = img * (1 - cover[..., None]) + tone * cover[..., None]
    img *= (1.0 + 0.08 * spectral_noise(rng, shape, beta=1.0, fmin=20.0))[..., None]
    return _to_uint8(img)


def snag_bark_texture(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """Standing dead wood: silver-grey weathered wood with long checks, bark left in dark patches."""
    shape = (size, size)
    checks = spectral_noise(rng, shape, beta=2.0, stretch=(1.0, 12.0), fmin=4.0)
    cracks = 1.0 - np.abs(np.tanh(1.4 * checks))  # thin dark checks along the stem
    grain = spectral_noise(rng, shape, beta=1.2, stretch=(1.0, 6.0), fmin=10.0)
    wood = _palette_mix(0.55 + 0.15 * grain + 0.25 * (cracks - 0.5),
                        [(58, 54, 50), (112, 106, 98), (150, 144, 134), (178, 172, 160)])
    bark_left = _cdf(2.2 * (spectral_noise(rng, shape, beta=2.6, stretch=(1.0, 2.5), fmin=2.0) - 0.5))
    bark = _palette_mix(0.5 + 0.2 * spectral_noise(rng, shape, beta=1.5, fmin=8.0),
                        [(30, 24, 20), (62, 50, 40), (88, 72, 58)])
    img = wood * (1 - bark_left[..., None]) + bark * bark_left[..., None]
    return _to_uint8(img)


def fern_texture(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A fern frond seen from above: midrib down the middle (v), pinnae angled out to both edges (u)."""
    img = _palette_mix(0.5 + 0.2 * spectral_noise(rng, (size, size), beta=2.0, fmin=2.0),
                       [(14, 26, 8), (26, 44, 14), (40, 60, 20)])
    greens = np.asarray([(70, 122, 34), (88, 140, 40), (104, 150, 52), (62, 108, 30)], dtype=np.float64)
    rows = np.arange(0, size, max(2, size // 40))
    for y in rows:
        for sign in (-1.0, 1.0):
            colour = tuple(float(c) for c in greens[rng.integers(len(greens))] * rng.uniform(0.85, 1.15))
            length = size * rng.uniform(0.36, 0.48)
            angle = math.radians(90.0 + sign * rng.uniform(58.0, 72.0))
            x0, y0 = size / 2.0, float(y)
            x1, y1 = x0 - sign * length * abs(math.sin(angle)), y0 + length * math.cos(angle) * 0.4
            cv2.line(img, (int(x0), int(y0)), (int(round(x1)), int(round(y1))), colour,
                     _px(size, 3.0), lineType=cv2.LINE_AA)
    cv2.line(img, (size // 2, 0), (size // 2, size - 1), (96, 120, 44), _px(size, 2.0), lineType=cv2.LINE_AA)
    return _to_uint8(img)


_GENERATORS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "bark_conifer": lambda rng, s: bark_texture(rng, s, conifer=True),
    "bark_broadleaf": lambda rng, s: bark_texture(rng, s, conifer=False),
    "litter": litter_texture,
    "moss": moss_texture,
    "grass": grass_texture,
    "rock": rock_texture,
    "foliage_conifer": lambda rng, s: foliage_texture(rng, s, conifer=True),
    "foliage_broadleaf": lambda rng, s: foliage_texture(rng, s, conifer=False),
    "bush": bush_texture,
    "log": log_texture,
    "treeline": treeline_texture,
    "bark_snag": snag_bark_texture,
    "fern": fern_texture,
}


@dataclass(frozen=True)
class Tone:
    """A colour change of a texture: hue rotation (degrees), saturation and value (brightness) factors.

    ``Tone()`` leaves a texture as it is. Hue turns the HSV hue circle: green foliage at -40
    degrees turns autumn yellow-orange, at +20 blue-green.
    """

    hue_deg: float = 0.0
    saturation: float = 1.0
    value: float = 1.0

    def validate(self, name: str = "tone") -> Tone:
        """Raise ``ValueError`` naming ``name`` and the field out of range; return self when fine."""
        if not (math.isfinite(self.hue_deg) and -180.0 <= self.hue_deg <= 180.0):
            raise ValueError(f"{name}.hue_deg must be within [-180, 180] degrees, got {self.hue_deg}")
        for field_name in ("saturation", "value"):
            v = getattr(self, field_name)
            if not (math.isfinite(v) and 0.0 <= v <= 3.0):
                raise ValueError(f"{name}.{field_name} must be within [0, 3], got {v}")
        return self

    @property
    def is_identity(self) -> bool:
        """True when the tone changes nothing."""
        return self.hue_deg == 0.0 and self.saturation == 1.0 and self.value == 1.0

    def key(self) -> str:
        """A short file-name-safe key of the tone (rounded)."""
        return f"h{self.hue_deg:+.1f}s{self.saturation:.3f}v{self.value:.3f}"


def apply_tone(rgb: np.ndarray, tone: Tone) -> np.ndarray:
    """``rgb`` (uint8, H x W x 3) with its hue turned and saturation and value scaled, as uint8."""
    if tone.is_identity:
        return rgb
    hsv = cv2.cvtColor(rgb.astype(np.float32) / np.float32(255.0), cv2.COLOR_RGB2HSV)  # H in [0, 360)
    hsv[..., 0] = np.mod(hsv[..., 0] + np.float32(tone.hue_deg), np.float32(360.0))
    hsv[..., 1] = np.clip(hsv[..., 1] * np.float32(tone.saturation), 0.0, 1.0)
    hsv[..., 2] = hsv[..., 2] * np.float32(tone.value)  # kept unclipped: HSV2RGB scales, the clip is below
    out = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * np.float32(255.0)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Palette:
    """Colour of every texture group of a scene; ``Palette()`` is today's look.

    Which textures each group tones: ``litter`` (the forest floor), ``moss`` and ``grass`` (ground
    cushions), ``bark`` (both barks, snags, logs and twigs), ``rock``, ``conifer_foliage`` (conifer
    crowns and the treeline wall), ``broadleaf_foliage`` (broadleaf crowns, bushes, ferns).
    """

    litter: Tone = Tone()
    moss: Tone = Tone()
    grass: Tone = Tone()
    bark: Tone = Tone()
    rock: Tone = Tone()
    conifer_foliage: Tone = Tone()
    broadleaf_foliage: Tone = Tone()

    def validate(self) -> Palette:
        """Raise ``ValueError`` naming the first group whose tone is out of range."""
        for f in fields(self):
            getattr(self, f.name).validate(f.name)
        return self

    def tone_of(self, texture: str) -> Tone:
        """The tone a texture (or its ``_far`` copy) gets."""
        base = texture[: -len(FAR_SUFFIX)] if texture.endswith(FAR_SUFFIX) else texture
        return getattr(self, TEXTURE_GROUPS[base])

    @property
    def is_identity(self) -> bool:
        """True when no texture changes."""
        return all(getattr(self, f.name).is_identity for f in fields(self))


TEXTURE_GROUPS: dict[str, str] = {
    "litter": "litter",
    "moss": "moss",
    "grass": "grass",
    "bark_conifer": "bark",
    "bark_broadleaf": "bark",
    "bark_snag": "bark",
    "log": "bark",
    "rock": "rock",
    "foliage_conifer": "conifer_foliage",
    "treeline": "conifer_foliage",
    "foliage_broadleaf": "broadleaf_foliage",
    "bush": "broadleaf_foliage",
    "fern": "broadleaf_foliage",
}
"""Texture -> the :class:`Palette` group whose tone it gets."""


def toned_textures(paths: dict[str, Path], palette: Palette, out_dir: str | Path) -> dict[str, Path]:
    """Copies of the textures in ``paths`` with ``palette``'s tones, written into ``out_dir``; name -> path.

    Textures whose tone is the identity keep their path. The copies are throw-away files for one
    scene (PyBullet loads textures from files): PNG at the fastest compression.
    """
    palette.validate()
    out = Path(out_dir)
    toned: dict[str, Path] = {}
    for name, path in paths.items():
        tone = palette.tone_of(name)
        if tone.is_identity:
            toned[name] = path
            continue
        rgb = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        target = out / f"{name}_{tone.key()}.png"
        if not cv2.imwrite(str(target), cv2.cvtColor(apply_tone(rgb, tone), cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_PNG_COMPRESSION, 0]):
            raise OSError(f"could not write texture {name!r} to {target}")
        toned[name] = target
    return toned


def make_texture(name: str, seed: int = 0, size: int = 256) -> np.ndarray:
    """Generate one texture as an (size, size, 3) uint8 RGB array; same name and seed, same image."""
    if name not in _GENERATORS:
        raise ValueError(f"unknown texture {name!r}; known textures: {', '.join(TEXTURE_NAMES)}")
    if not (isinstance(size, (int, np.integer)) and 32 <= size <= 2048 and size % 4 == 0):
        raise ValueError(f"texture size must be an integer multiple of 4 within [32, 2048], got {size!r}")
    # one independent stream per texture name, so adding a texture never changes the others
    name_key = int.from_bytes(name.encode(), "little") % (2**63)
    rng = np.random.default_rng([int(seed), name_key])
    return _GENERATORS[name](rng, int(size))


def default_cache_dir() -> Path:
    """Shared texture cache under the system temp dir (textures take seconds to make, so they are kept)."""
    return Path(tempfile.gettempdir()) / "forest_perception_textures"


def generate_textures(
    cache_dir: str | Path | None = None, seed: int = 0, size: int = 256, names: tuple[str, ...] = ALL_TEXTURE_NAMES
) -> dict[str, Path]:
    """Write the textures as PNG files into ``cache_dir`` (default: :func:`default_cache_dir`); return name -> path.

    ``size`` is the base edge in pixels; see :func:`texture_size`. Files already in the
    cache (same name, seed, size and generator version) are reused; new files appear
    atomically, so processes can share one cache.
    """
    out_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    unknown = [n for n in names if n not in ALL_TEXTURE_NAMES]
    if unknown:
        raise ValueError(f"unknown textures {unknown}; known textures: {', '.join(ALL_TEXTURE_NAMES)}")
    for name in names:
        px = texture_size(name, int(size))
        path = out_dir / f"{name}_s{int(seed)}_{px}_v{TEXTURE_VERSION}.png"
        if not path.is_file():
            if name.endswith(FAR_SUFFIX):
                base = generate_textures(out_dir, seed, size, (name[: -len(FAR_SUFFIX)],))[name[: -len(FAR_SUFFIX)]]
                full = cv2.cvtColor(cv2.imread(str(base), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
                img = cv2.resize(full, (px, px), interpolation=cv2.INTER_AREA)
            else:
                img = make_texture(name, seed, px)
            fd, tmp_name = tempfile.mkstemp(suffix=".png", dir=out_dir)
            os.close(fd)
            tmp = Path(tmp_name)
            try:
                if not cv2.imwrite(str(tmp), cv2.cvtColor(img, cv2.COLOR_RGB2BGR)):
                    raise OSError(f"could not write texture {name!r} to {tmp}")
                tmp.replace(path)  # atomic, so a parallel process never reads half a file
            finally:
                tmp.unlink(missing_ok=True)
        paths[name] = path
    return paths


def texture_size(name: str, base_size: int) -> int:
    """Pixel size used for ``name``: ground textures get four times the base (the camera is 0.2 m above them)."""
    if name.endswith(FAR_SUFFIX):
        return texture_size(name[: -len(FAR_SUFFIX)], base_size) // FAR_FACTOR
    return base_size * 4 if name in GROUND_TEXTURES else base_size
