"""Named forest styles for domain randomisation: ranges of every randomised factor, and samples of them.

A *factor* is one randomised quantity of a scene (a hill height, a stand density, a bark hue, a sun
elevation, a camera height); :class:`StyleFactors` holds one value of each, with its unit, its allowed
range and what it does. A *style* (:class:`Style`) is a named set of ranges; ``sample(style, seed)`` draws
a :class:`StyleSample` from it, the same for the same style and seed, which builds what the simulator
takes: ``world_config()``, ``mesh_detail()``, ``palette()``, ``weather()``, ``camera_effects()`` and
``rover_geometry()``. ``StyleFactors()`` is today's look. The tables of factors and styles:
docs/simulator.md (`styles`).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np

from forest_perception.frames import RoverGeometry
from forest_perception.sim.textures import Palette, Tone
from forest_perception.sim.weather import CameraEffects, WeatherPreset, sun_direction
from forest_perception.sim.world import WorldConfig
from forest_perception.sim.world_meshes import MeshDetail

RANDOMISED = "randomised"
"""The pseudo-style that mixes all styles: each group of factors comes from a style drawn per seed."""
WIDE = "wide"
"""The pseudo-style of plain domain randomisation: every factor drawn on its own from :func:`wide_range`."""
FULL = "full"
"""The pseudo-style of the widest scene randomisation: the scene on its whole allowed range (:func:`full_range`)."""
FULL_GROUPS: tuple[str, ...] = ("terrain", "stand", "crowns", "undergrowth", "palette")
"""The factor groups ``full`` draws on their whole allowed range; light and camera stay on ``wide``'s ranges."""
WIDE_MARGIN = 0.25
"""How far ``wide`` reaches past the styles it draws from, as a share of the width of their joint range."""
GROUPS = ("terrain", "stand", "crowns", "undergrowth", "palette", "light", "camera")
"""Factor groups, in the order of :class:`StyleFactors` (``randomised`` draws one style per group)."""


def _factor(default: float, low: float, high: float, typical: tuple[float, float], unit: str, group: str,
            doc: str) -> Any:  # noqa: ANN401 - a dataclass field
    """A :class:`StyleFactors` field: ``default`` (today's look), the allowed ``[low, high]``, the ``typical``
    range a style samples when it does not name the factor, its unit, group and meaning."""
    return field(default=default, metadata={"range": (low, high), "typical": typical, "unit": unit,
                                            "group": group, "doc": doc})


@dataclass(frozen=True)
class StyleFactors:
    """One value of every randomised factor of a scene; the defaults are today's look.

    ``validate()`` refuses a value outside its factor's range, naming the factor. Each field's
    metadata holds ``range`` (allowed), ``typical`` (sampled by styles that do not name it),
    ``unit``, ``group`` and ``doc``; :func:`factor_table` lists them.
    """

    # ------------------------------------------------------------------ terrain (WorldConfig)
    terrain_roughness_m: float = _factor(0.6, 0.0, 3.0, (0.3, 1.0), "m", "terrain",
                                         "peak amplitude of the fractal rolling ground")
    terrain_bump_m: float = _factor(0.05, 0.0, 0.15, (0.02, 0.08), "m", "terrain",
                                    "peak height of the fine bumps, one grid cell wide")
    hill_height_m: float = _factor(0.0, 0.0, 12.0, (0.0, 1.5), "m", "terrain",
                                   "peak height of smooth hills above or below the mean ground")
    hill_wavelength_m: float = _factor(40.0, 15.0, 120.0, (30.0, 80.0), "m", "terrain",
                                       "crest-to-crest distance of the hills")
    valley_count: int = _factor(0, 0, 3, (0, 0), "count", "terrain",
                                "meandering valleys (gullies when narrow) across the world")
    valley_depth_m: float = _factor(1.5, 0.3, 6.0, (0.5, 2.0), "m", "terrain", "depth of a valley on its line")
    valley_width_m: float = _factor(6.0, 2.0, 20.0, (4.0, 10.0), "m", "terrain",
                                    "half-width (Gaussian sigma) of a valley's cross-section")
    ridge_count: int = _factor(0, 0, 3, (0, 0), "count", "terrain", "meandering ridges across the world")
    ridge_height_m: float = _factor(1.5, 0.3, 5.0, (0.5, 2.0), "m", "terrain", "height of a ridge on its line")
    ridge_width_m: float = _factor(6.0, 2.0, 20.0, (4.0, 10.0), "m", "terrain",
                                   "half-width (Gaussian sigma) of a ridge's cross-section")
    terrain_max_slope: float = _factor(1.0, 0.05, 1.0, (0.3, 0.45), "rise/run", "terrain",
                                       "steepest ground slope; landforms are scaled down to it (1: 45 degrees)")
    # ------------------------------------------------------------------ stand (WorldConfig)
    tree_density_per_ha: float = _factor(600.0, 0.0, 4000.0, (350.0, 900.0), "stems/ha", "stand",
                                         "standing trees (alive and dead) per hectare")
    dbh_median_m: float = _factor(0.25, 0.05, 1.0, (0.18, 0.35), "m", "stand",
                                  "median trunk diameter at breast height (log-normal)")
    dbh_sigma: float = _factor(0.45, 0.1, 0.8, (0.35, 0.55), "log", "stand",
                               "spread of the trunk diameters (sigma of the log-normal)")
    conifer_fraction: float = _factor(0.4, 0.0, 1.0, (0.2, 0.7), "share", "stand", "share of conifers")
    tree_pattern: float = _factor(0.0, -1.0, 1.0, (-0.3, 0.3), "-1..1", "stand",
                                  "spatial pattern: -1 clustered groups, 0 random with spacing, 1 regular rows")
    snag_fraction: float = _factor(0.0, 0.0, 0.7, (0.0, 0.08), "share", "stand",
                                   "standing dead trees: no foliage, broken top, grey wood")
    log_density_per_ha: float = _factor(40.0, 0.0, 400.0, (20.0, 80.0), "logs/ha", "stand",
                                        "fallen logs per hectare")
    # ------------------------------------------------------------------ crowns (WorldConfig)
    conifer_crown_base: float = _factor(0.35, 0.05, 0.8, (0.25, 0.45), "of height", "crowns",
                                        "conifer crown base as a share of tree height (low: branches near the ground)")
    broadleaf_crown_base: float = _factor(0.5, 0.1, 0.8, (0.35, 0.6), "of height", "crowns",
                                          "broadleaf crown base as a share of tree height")
    conifer_crown_width: float = _factor(1.0, 0.4, 1.6, (0.8, 1.2), "x allometry", "crowns",
                                         "conifer crown radius (< 1: slender spires, > 1: broad cones)")
    broadleaf_crown_width: float = _factor(1.0, 0.5, 1.6, (0.8, 1.2), "x allometry", "crowns",
                                           "broadleaf crown radius")
    crown_irregularity: float = _factor(0.3, 0.0, 1.0, (0.2, 0.5), "0..1", "crowns",
                                        "0 smooth cones and ellipsoids, 1 ragged and lopsided crowns")
    # ------------------------------------------------------------------ undergrowth (WorldConfig, MeshDetail)
    bush_density_per_ha: float = _factor(300.0, 0.0, 2000.0, (150.0, 500.0), "/ha", "undergrowth",
                                         "shrubs per hectare")
    fern_density_per_ha: float = _factor(0.0, 0.0, 1500.0, (0.0, 150.0), "/ha", "undergrowth",
                                         "fern clumps per hectare (0.3-0.9 m tall)")
    rock_density_per_ha: float = _factor(120.0, 0.0, 800.0, (50.0, 200.0), "/ha", "undergrowth",
                                         "boulders per hectare")
    ground_patches_per_ha: float = _factor(120.0, 0.0, 1500.0, (60.0, 250.0), "/ha", "undergrowth",
                                           "moss and grass cushions per hectare (0.4-2 m across, render-only)")
    ground_patch_moss_fraction: float = _factor(0.6, 0.0, 1.0, (0.4, 0.8), "share", "undergrowth",
                                                "share of the cushions that are moss (the rest grass)")
    twigs_per_ha: float = _factor(800.0, 0.0, 3000.0, (400.0, 1200.0), "/ha", "undergrowth",
                                  "fallen branches per hectare (render-only)")
    # ------------------------------------------------------------------ palette (textures.Palette, MeshDetail)
    litter_hue_deg: float = _factor(0.0, -30.0, 30.0, (-8.0, 8.0), "deg", "palette",
                                    "hue turn of the leaf litter (-: redder, +: yellower/greener)")
    litter_saturation: float = _factor(1.0, 0.4, 1.6, (0.85, 1.15), "x", "palette", "litter saturation")
    litter_value: float = _factor(1.0, 0.5, 1.6, (0.85, 1.15), "x", "palette", "litter brightness")
    moss_hue_deg: float = _factor(0.0, -30.0, 30.0, (-8.0, 8.0), "deg", "palette", "hue turn of moss")
    moss_value: float = _factor(1.0, 0.5, 1.6, (0.85, 1.15), "x", "palette", "moss brightness")
    grass_hue_deg: float = _factor(0.0, -40.0, 20.0, (-10.0, 5.0), "deg", "palette",
                                   "hue turn of grass (-: dry straw, +: blue-green)")
    grass_value: float = _factor(1.0, 0.5, 1.6, (0.85, 1.15), "x", "palette", "grass brightness")
    bark_hue_deg: float = _factor(0.0, -20.0, 20.0, (-5.0, 5.0), "deg", "palette",
                                  "hue turn of bark, snags and logs")
    bark_saturation: float = _factor(1.0, 0.2, 1.6, (0.8, 1.2), "x", "palette",
                                     "bark saturation (low: grey beech, high: orange pine)")
    bark_value: float = _factor(1.0, 0.5, 1.6, (0.85, 1.15), "x", "palette", "bark brightness")
    bark_tile_m: float = _factor(1.0, 0.4, 2.5, (0.8, 1.3), "m", "palette",
                                 "bark texture repeat up the stem (its scale: coarse plates when large)")
    rock_hue_deg: float = _factor(0.0, -30.0, 30.0, (-5.0, 5.0), "deg", "palette", "hue turn of rock")
    rock_value: float = _factor(1.0, 0.5, 1.5, (0.85, 1.15), "x", "palette", "rock brightness")
    conifer_foliage_hue_deg: float = _factor(0.0, -20.0, 25.0, (-5.0, 5.0), "deg", "palette",
                                             "hue turn of conifer crowns and the treeline (+: blue spruce)")
    broadleaf_foliage_hue_deg: float = _factor(0.0, -60.0, 25.0, (-8.0, 8.0), "deg", "palette",
                                               "hue turn of broadleaf crowns, bushes, ferns (-40: autumn)")
    foliage_saturation: float = _factor(1.0, 0.4, 1.5, (0.85, 1.15), "x", "palette", "foliage saturation")
    foliage_value: float = _factor(1.0, 0.5, 1.5, (0.85, 1.15), "x", "palette", "foliage brightness")
    # ------------------------------------------------------------------ light (weather.WeatherPreset)
    sun_elevation_deg: float = _factor(75.0, 3.0, 85.0, (20.0, 70.0), "deg", "light", "sun above the horizon")
    sun_azimuth_deg: float = _factor(120.0, 0.0, 360.0, (0.0, 360.0), "deg", "light",
                                     "sun direction, counter-clockwise from east")
    sun_warmth: float = _factor(0.0, -1.0, 1.0, (-0.3, 0.3), "-1..1", "light",
                                "sunlight colour: -1 cool blue, 0 white, 1 warm orange (low evening sun)")
    cloud_cover: float = _factor(0.85, 0.0, 1.0, (0.0, 1.0), "0..1", "light",
                                 "0 clear (direct sun, shadows, blue sky), 1 overcast (diffuse, grey sky)")
    ambient: float = _factor(0.78, 0.2, 0.95, (0.45, 0.8), "coeff", "light",
                             "ambient (sky) light level: low is a dark day")
    specular: float = _factor(0.0, 0.0, 0.2, (0.0, 0.04), "coeff", "light", "specular sheen (wet surfaces)")
    haze_density_per_m: float = _factor(0.012, 0.0, 0.12, (0.002, 0.02), "1/m", "light",
                                        "haze/fog extinction: a surface d m away keeps exp(-density d) of its colour")
    # ------------------------------------------------------------------ camera (CameraEffects, RoverGeometry)
    exposure_ev: float = _factor(0.0, -1.5, 1.5, (-0.5, 0.5), "EV", "camera",
                                 "exposure error of the auto-exposure (-: dark frames)")
    white_balance_warmth: float = _factor(0.0, -1.0, 1.0, (-0.3, 0.3), "-1..1", "camera",
                                          "white-balance error along blue (-) to amber (+), up to 8 % per channel")
    white_balance_tint: float = _factor(0.0, -1.0, 1.0, (-0.2, 0.2), "-1..1", "camera",
                                        "white-balance error along magenta (-) to green (+), up to 5 %")
    colour_saturation: float = _factor(1.0, 0.5, 1.5, (0.85, 1.15), "x", "camera",
                                       "colour saturation of the camera on top of the light's")
    read_noise_dn: float = _factor(1.5, 0.0, 6.0, (0.8, 3.0), "DN", "camera", "sensor read noise (8-bit numbers)")
    shot_noise_gain: float = _factor(0.08, 0.0, 0.4, (0.04, 0.15), "DN/DN", "camera",
                                     "sensor shot noise: variance per unit of signal")
    lens_blur_sigma_px: float = _factor(0.5, 0.0, 1.5, (0.3, 0.8), "px", "camera", "optical softness (Gaussian)")
    vignetting: float = _factor(0.25, 0.0, 0.5, (0.1, 0.35), "share", "camera", "brightness lost in the corners")
    exposure_time_s: float = _factor(0.008, 0.002, 0.03, (0.004, 0.012), "s", "camera",
                                     "exposure time: motion blur while turning")
    camera_height_m: float = _factor(0.2, 0.12, 0.35, (0.17, 0.25), "m", "camera",
                                     "optical centre above the ground the rover stands on (the rig: 0.2 m)")
    camera_pitch_deg: float = _factor(0.0, -10.0, 10.0, (-4.0, 4.0), "deg", "camera",
                                      "camera tilt on its mount, + down (REP 103 pitch)")

    def validate(self) -> StyleFactors:
        """Raise ``ValueError`` naming the first factor outside its range (or of the wrong kind); return self."""
        for f in fields(self):
            value = getattr(self, f.name)
            low, high = f.metadata["range"]
            if f.type in ("int", int):
                if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
                    raise ValueError(f"factor {f.name} must be an integer within [{low}, {high}], got {value!r}")
                continue
            if (isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating))
                    or not math.isfinite(value) or not low <= value <= high):
                raise ValueError(
                    f"factor {f.name} must be within [{low:g}, {high:g}] {f.metadata['unit']}, got {value!r}")
        return self


FACTORS: dict[str, dict] = {f.name: dict(f.metadata) for f in fields(StyleFactors)}
"""Every factor's metadata: ``range``, ``typical``, ``unit``, ``group``, ``doc``."""
_INTEGER_FACTORS = frozenset(f.name for f in fields(StyleFactors) if f.type in ("int", int))


@dataclass(frozen=True)
class Style:
    """A named set of factor ranges; a factor the style does not name is drawn from its ``typical`` range."""

    name: str
    description: str
    ranges: Mapping[str, tuple[float, float]] = field(default_factory=dict)

    def validate(self) -> Style:
        """Raise ``ValueError`` naming the style and the factor whose range is unknown, reversed or too wide."""
        if not self.name or not all(c.isalnum() or c == "_" for c in self.name):
            raise ValueError(f"style name {self.name!r} must be letters, digits and _")
        for name, bounds in self.ranges.items():
            if name not in FACTORS:
                raise ValueError(f"style {self.name}: unknown factor {name!r}; factors: {', '.join(FACTORS)}")
            low, high = bounds
            lo_allowed, hi_allowed = FACTORS[name]["range"]
            if not (math.isfinite(low) and math.isfinite(high) and low <= high):
                raise ValueError(f"style {self.name}: range of {name} must be finite with low <= high, got {bounds}")
            if low < lo_allowed or high > hi_allowed:
                raise ValueError(f"style {self.name}: range of {name} {bounds} leaves the factor's range "
                                 f"[{lo_allowed:g}, {hi_allowed:g}]")
        return self

    def range_of(self, factor: str) -> tuple[float, float]:
        """The range this style draws ``factor`` from."""
        if factor not in FACTORS:
            raise ValueError(f"unknown factor {factor!r}; factors: {', '.join(FACTORS)}")
        low, high = self.ranges.get(factor, FACTORS[factor]["typical"])
        return float(low), float(high)


def _styles(*styles: Style) -> dict[str, Style]:
    return {s.name: s.validate() for s in styles}


STYLES: dict[str, Style] = _styles(
    Style("temperate_mixed", "today's look: mixed broadleaf and conifer stand on gently rolling ground, "
          "moderate undergrowth, any weather"),
    Style("boreal_dense", "young dense spruce: many thin stems with slender crowns down to the ground, "
          "moss carpet, cool low sun", {
              "terrain_roughness_m": (0.3, 0.8), "tree_density_per_ha": (1800.0, 3200.0),
              "dbh_median_m": (0.07, 0.13), "dbh_sigma": (0.25, 0.4), "conifer_fraction": (0.85, 1.0),
              "tree_pattern": (-0.4, 0.2), "snag_fraction": (0.02, 0.1), "log_density_per_ha": (30.0, 90.0),
              "conifer_crown_base": (0.08, 0.25), "conifer_crown_width": (0.45, 0.75),
              "crown_irregularity": (0.1, 0.35), "bush_density_per_ha": (0.0, 80.0),
              "fern_density_per_ha": (0.0, 50.0), "rock_density_per_ha": (30.0, 150.0),
              "ground_patches_per_ha": (400.0, 900.0), "ground_patch_moss_fraction": (0.8, 1.0),
              "litter_hue_deg": (-6.0, 4.0), "litter_value": (0.7, 0.95), "moss_hue_deg": (0.0, 15.0),
              "moss_value": (0.9, 1.2), "conifer_foliage_hue_deg": (2.0, 12.0), "foliage_value": (0.6, 0.85),
              "sun_elevation_deg": (6.0, 30.0), "sun_warmth": (-0.6, 0.2), "cloud_cover": (0.2, 1.0),
              "ambient": (0.4, 0.7), "haze_density_per_m": (0.005, 0.03),
          }),
    Style("old_open", "old open broadleaf stand: few thick trees with broad high crowns, long views, "
          "grass and litter, sunny", {
              "tree_density_per_ha": (60.0, 180.0), "dbh_median_m": (0.5, 0.85), "dbh_sigma": (0.25, 0.45),
              "conifer_fraction": (0.0, 0.35), "tree_pattern": (0.0, 0.4), "log_density_per_ha": (10.0, 60.0),
              "broadleaf_crown_base": (0.25, 0.45), "broadleaf_crown_width": (1.1, 1.5),
              "crown_irregularity": (0.4, 0.8), "bush_density_per_ha": (50.0, 250.0),
              "fern_density_per_ha": (0.0, 200.0), "ground_patches_per_ha": (150.0, 500.0),
              "ground_patch_moss_fraction": (0.2, 0.6), "twigs_per_ha": (600.0, 1500.0),
              "bark_value": (0.9, 1.3), "bark_tile_m": (1.2, 2.2), "sun_elevation_deg": (30.0, 75.0),
              "cloud_cover": (0.0, 0.6), "ambient": (0.5, 0.8), "haze_density_per_m": (0.002, 0.012),
          }),
    Style("hilly_deadwood", "steep hills cut by gullies and ridges, many snags and fallen logs, boulders", {
              "hill_height_m": (4.0, 9.0), "hill_wavelength_m": (25.0, 50.0), "valley_count": (1, 2),
              "valley_depth_m": (1.5, 4.0), "valley_width_m": (3.0, 8.0), "ridge_count": (0, 1),
              "ridge_height_m": (1.0, 3.0), "ridge_width_m": (4.0, 10.0), "terrain_max_slope": (0.45, 0.6),
              "tree_density_per_ha": (250.0, 600.0), "conifer_fraction": (0.5, 0.9),
              "snag_fraction": (0.25, 0.55), "log_density_per_ha": (120.0, 300.0),
              "crown_irregularity": (0.3, 0.7), "bush_density_per_ha": (50.0, 200.0),
              "rock_density_per_ha": (150.0, 400.0), "litter_hue_deg": (-8.0, 3.0), "litter_value": (0.8, 1.05),
              "bark_value": (0.7, 1.0), "foliage_value": (0.75, 1.0), "sun_elevation_deg": (15.0, 55.0),
              "cloud_cover": (0.3, 1.0),
          }),
    Style("bright_meadow_edge", "forest edge on a meadow: scattered groups of trees, grass, ferns and shrubs "
          "in bright high sun", {
              "terrain_roughness_m": (0.2, 0.7), "tree_density_per_ha": (40.0, 200.0),
              "dbh_median_m": (0.2, 0.45), "tree_pattern": (-0.8, -0.3), "conifer_fraction": (0.1, 0.5),
              "log_density_per_ha": (0.0, 30.0), "broadleaf_crown_base": (0.2, 0.4),
              "fern_density_per_ha": (200.0, 700.0), "bush_density_per_ha": (150.0, 500.0),
              "ground_patches_per_ha": (900.0, 1500.0), "ground_patch_moss_fraction": (0.0, 0.25),
              "twigs_per_ha": (100.0, 500.0), "grass_hue_deg": (-15.0, 5.0), "grass_value": (1.0, 1.3),
              "litter_value": (1.0, 1.3), "foliage_value": (1.0, 1.3), "broadleaf_foliage_hue_deg": (-10.0, 5.0),
              "sun_elevation_deg": (35.0, 80.0), "cloud_cover": (0.0, 0.35), "ambient": (0.55, 0.85),
              "haze_density_per_m": (0.001, 0.008), "exposure_ev": (-0.2, 0.6), "colour_saturation": (1.0, 1.3),
          }),
    Style("dark_wet", "dense stand on a dark rainy day: wet sheen, dark bark and litter, haze, noisy "
          "under-exposed frames", {
              "tree_density_per_ha": (700.0, 1400.0), "dbh_median_m": (0.15, 0.3),
              "conifer_fraction": (0.4, 0.9), "fern_density_per_ha": (100.0, 400.0),
              "ground_patches_per_ha": (300.0, 800.0), "ground_patch_moss_fraction": (0.8, 1.0),
              "litter_saturation": (1.0, 1.3), "litter_value": (0.55, 0.8), "moss_value": (0.8, 1.1),
              "bark_value": (0.55, 0.8), "rock_value": (0.6, 0.85), "foliage_value": (0.6, 0.85),
              "sun_elevation_deg": (40.0, 80.0), "cloud_cover": (0.85, 1.0), "ambient": (0.25, 0.45),
              "specular": (0.06, 0.18), "haze_density_per_m": (0.02, 0.06), "exposure_ev": (-1.2, -0.3),
              "white_balance_warmth": (-0.6, -0.1), "read_noise_dn": (2.0, 5.0), "shot_noise_gain": (0.1, 0.3),
              "exposure_time_s": (0.012, 0.03),
          }),
    Style("autumn_broadleaf", "broadleaf stand in autumn: yellow-orange crowns and fresh bright litter, "
          "low warm sun", {
              "conifer_fraction": (0.0, 0.15), "tree_density_per_ha": (300.0, 700.0), "dbh_median_m": (0.2, 0.45),
              "bush_density_per_ha": (100.0, 400.0), "ground_patch_moss_fraction": (0.3, 0.6),
              "broadleaf_foliage_hue_deg": (-55.0, -30.0), "foliage_saturation": (1.0, 1.4),
              "foliage_value": (1.0, 1.3), "litter_hue_deg": (-5.0, 8.0), "litter_saturation": (1.2, 1.6),
              "litter_value": (1.1, 1.5), "grass_hue_deg": (-35.0, -15.0), "sun_elevation_deg": (8.0, 35.0),
              "sun_warmth": (0.2, 0.8), "cloud_cover": (0.0, 0.7), "haze_density_per_m": (0.005, 0.025),
              "white_balance_warmth": (0.0, 0.5),
          }),
    Style("pine_plantation", "even-aged pine in regular rows: straight orange stems of one size, high crowns, "
          "needle litter, little undergrowth, flat ground", {
              "terrain_roughness_m": (0.1, 0.4), "hill_height_m": (0.0, 0.3), "tree_pattern": (0.75, 1.0),
              "conifer_fraction": (1.0, 1.0),
              "tree_density_per_ha": (500.0, 1100.0), "dbh_median_m": (0.18, 0.3), "dbh_sigma": (0.1, 0.2),
              "snag_fraction": (0.0, 0.03), "log_density_per_ha": (5.0, 30.0), "conifer_crown_base": (0.5, 0.7),
              "conifer_crown_width": (0.9, 1.3), "crown_irregularity": (0.1, 0.3),
              "bush_density_per_ha": (0.0, 60.0), "fern_density_per_ha": (0.0, 100.0),
              "rock_density_per_ha": (0.0, 60.0), "ground_patches_per_ha": (20.0, 120.0),
              "twigs_per_ha": (1000.0, 2500.0), "litter_hue_deg": (-12.0, -3.0), "litter_value": (0.9, 1.2),
              "bark_hue_deg": (-12.0, -4.0), "bark_saturation": (1.1, 1.5), "bark_value": (1.0, 1.3),
              "conifer_foliage_hue_deg": (-8.0, 2.0), "sun_elevation_deg": (25.0, 70.0), "cloud_cover": (0.0, 0.5),
          }),
    Style("foggy_ravine", "ravine in thick fog: valleys and ridges, mossy boulders and ferns, soft grey light", {
              "hill_height_m": (1.0, 4.0), "valley_count": (1, 3), "valley_depth_m": (2.0, 5.0),
              "valley_width_m": (2.5, 6.0), "ridge_count": (1, 2), "ridge_height_m": (1.0, 3.0),
              "ridge_width_m": (3.0, 8.0), "terrain_max_slope": (0.35, 0.5), "tree_density_per_ha": (400.0, 900.0),
              "conifer_fraction": (0.3, 0.8), "rock_density_per_ha": (250.0, 700.0),
              "fern_density_per_ha": (300.0, 900.0), "ground_patches_per_ha": (500.0, 1200.0),
              "ground_patch_moss_fraction": (0.85, 1.0), "moss_value": (1.0, 1.3), "rock_value": (0.7, 1.0),
              "cloud_cover": (0.8, 1.0), "ambient": (0.6, 0.9), "haze_density_per_m": (0.05, 0.12),
              "colour_saturation": (0.6, 0.9),
          }),
    Style("clustered_regrowth", "regeneration in clumps among a few old trees: clustered young stems, "
          "low irregular crowns, thick shrubs", {
              "tree_pattern": (-1.0, -0.6), "tree_density_per_ha": (700.0, 1600.0), "dbh_median_m": (0.1, 0.2),
              "dbh_sigma": (0.6, 0.8), "conifer_fraction": (0.3, 0.7), "snag_fraction": (0.05, 0.15),
              "log_density_per_ha": (50.0, 120.0), "conifer_crown_base": (0.1, 0.3),
              "broadleaf_crown_base": (0.15, 0.35), "crown_irregularity": (0.4, 0.8),
              "bush_density_per_ha": (400.0, 900.0), "fern_density_per_ha": (100.0, 400.0),
              "sun_elevation_deg": (15.0, 60.0),
          }),
)
"""The registry of named styles."""
PSEUDO_STYLES: tuple[str, ...] = (RANDOMISED, WIDE, FULL)
"""The names :func:`sample` takes besides the styles: mixes of the styles, no ranges of their own."""
STYLE_NAMES: tuple[str, ...] = (*STYLES, *PSEUDO_STYLES)
"""Every name :func:`sample` takes: the styles, then the pseudo-styles ``randomised``, ``wide`` and ``full``."""
HOLD_OUT: tuple[str, ...] = ("hilly_deadwood", "autumn_broadleaf", "clustered_regrowth")
"""The styles kept out of all training of the shipped networks, for evaluation on forests never seen: steep
hills cut by gullies with many snags and logs (the relief of ``foggy_ravine``, in training, is gentler); a
yellow-orange autumn palette under low warm sun; clumped regrowth with thick shrubs, the new forest of the
adaptation experiment (docs/experiments.md)."""


def _key(text: str) -> int:
    """A stable number for a name (Python's ``hash`` of a string changes between runs)."""
    return zlib.crc32(text.encode())


def _draw(rng: np.random.Generator, factor: str, low: float, high: float) -> float | int:
    if factor in _INTEGER_FACTORS:
        return int(rng.integers(int(round(low)), int(round(high)) + 1))
    return float(low) if low == high else float(rng.uniform(low, high))


@dataclass(frozen=True)
class StyleSample:
    """One concrete scene configuration drawn from a style: the factors, and what the simulator takes.

    ``sources`` says which style each factor group was drawn from (all the same but for ``randomised``).
    """

    style: str
    seed: int
    factors: StyleFactors
    sources: Mapping[str, str] = field(default_factory=dict)

    def world_config(self, size_m: float = 60.0, seed: int | None = None, **overrides: Any) -> WorldConfig:  # noqa: ANN401
        """The world of this sample: its terrain, stand, crown and undergrowth factors (seed: the sample's)."""
        world_fields = {f.name for f in fields(WorldConfig)}
        values = {k: v for k, v in asdict(self.factors).items() if k in world_fields}
        return WorldConfig(**{**values, "seed": self.seed if seed is None else seed, "size_m": size_m,
                              **overrides}).validate()

    def mesh_detail(self, base: MeshDetail | None = None) -> MeshDetail:
        """``base`` (default ``MeshDetail()``) with this sample's render-only ground cover and bark scale."""
        f = self.factors
        return replace(base or MeshDetail(), ground_patches_per_ha=f.ground_patches_per_ha,
                       ground_patch_moss_fraction=f.ground_patch_moss_fraction, twigs_per_ha=f.twigs_per_ha,
                       bark_tile_m=f.bark_tile_m).validate()

    def palette(self) -> Palette:
        """The texture colours of this sample."""
        f = self.factors
        return Palette(
            litter=Tone(f.litter_hue_deg, f.litter_saturation, f.litter_value),
            moss=Tone(f.moss_hue_deg, 1.0, f.moss_value),
            grass=Tone(f.grass_hue_deg, 1.0, f.grass_value),
            bark=Tone(f.bark_hue_deg, f.bark_saturation, f.bark_value),
            rock=Tone(f.rock_hue_deg, 1.0, f.rock_value),
            conifer_foliage=Tone(f.conifer_foliage_hue_deg, f.foliage_saturation, f.foliage_value),
            broadleaf_foliage=Tone(f.broadleaf_foliage_hue_deg, f.foliage_saturation, f.foliage_value),
        ).validate()

    def weather(self) -> WeatherPreset:
        """The light and atmosphere of this sample, as a :class:`WeatherPreset` named ``style:<style>``."""
        return weather_from_factors(self.factors, f"style:{self.style}")

    def camera_effects(self, motion_blur: bool = True) -> CameraEffects:
        """The colour sensor of this sample (exposure error, noise, softness, vignetting, exposure time)."""
        f = self.factors
        return CameraEffects(exposure_ev=f.exposure_ev, read_noise_dn=f.read_noise_dn,
                             shot_noise_gain=f.shot_noise_gain, motion_blur=motion_blur,
                             exposure_time_s=f.exposure_time_s, vignetting=f.vignetting,
                             lens_blur_sigma_px=f.lens_blur_sigma_px).validate()

    def rover_geometry(self, base: RoverGeometry | None = None) -> RoverGeometry:
        """``base`` (default ``RoverGeometry()``) with this sample's camera height and pitch on the mount."""
        f = self.factors
        return replace(base or RoverGeometry(), camera_height_m=f.camera_height_m,
                       camera_pitch_rad=math.radians(f.camera_pitch_deg))

    def to_dict(self) -> dict:
        """Plain data for a JSON file beside a dataset segment: style, seed, sources and every factor."""
        return {"style": self.style, "seed": self.seed, "sources": dict(self.sources),
                "factors": asdict(self.factors)}


def wide_range(factor: str, exclude: Sequence[str] = ()) -> tuple[float, float]:
    """The range ``wide`` draws ``factor`` from: the union of every style's range of it (but those in
    ``exclude``), stretched by :data:`WIDE_MARGIN` of its width at both ends, within the factor's allowed range.

    A factor that every style keeps at one value stays there (no width to stretch).
    """
    if factor not in FACTORS:
        raise ValueError(f"unknown factor {factor!r}; factors: {', '.join(FACTORS)}")
    ranges = [s.range_of(factor) for name, s in STYLES.items() if name not in exclude]
    if not ranges:
        raise ValueError("every style is excluded: wide has nothing left to span")
    low, high = min(r[0] for r in ranges), max(r[1] for r in ranges)
    allowed_low, allowed_high = FACTORS[factor]["range"]
    margin = WIDE_MARGIN * (high - low)
    return max(float(allowed_low), low - margin), min(float(allowed_high), high + margin)


def full_range(factor: str, exclude: Sequence[str] = ()) -> tuple[float, float]:
    """The range ``full`` draws ``factor`` from: for the scene (:data:`FULL_GROUPS`: terrain, stand, crowns,
    undergrowth, palette) its whole allowed range, no style looked at; the light and the camera (exposure, noise,
    the mount) stay on :func:`wide_range`, which ``exclude`` shapes (thick haze and extreme exposure in every other
    frame would hide the scene that ``full`` is for)."""
    if factor not in FACTORS:
        raise ValueError(f"unknown factor {factor!r}; factors: {', '.join(FACTORS)}")
    if FACTORS[factor]["group"] not in FULL_GROUPS:
        return wide_range(factor, exclude)
    low, high = FACTORS[factor]["range"]
    return float(low), float(high)


def sample(style: str | Style, seed: int, exclude: Sequence[str] = ()) -> StyleSample:
    """Draw one configuration from ``style`` (a registered name, ``randomised`` or a :class:`Style`) and ``seed``.

    Deterministic: every factor has its own random stream from (seed, style, factor), so the same
    style and seed always give the same factors, and adding a factor changes no other. ``randomised``
    draws, per seed, a registered style for each factor group (:data:`GROUPS`) and samples the group's
    factors from it: new combinations, each group plausible on its own; it never draws from the
    styles in ``exclude`` (those held out of training, e.g. :data:`HOLD_OUT`), and the other draws of
    a seed stay as they are when ``exclude`` is empty. ``wide`` draws every factor on its own, uniformly
    on :func:`wide_range` (the styles but ``exclude``, stretched): combinations and values no style
    has, the plain domain randomisation. ``full`` draws every factor on its own on :func:`full_range`: the
    scene on the whole range the simulator allows, so it reaches every style's scene values (held-out ones
    included, but never their combinations), in ``wide``'s light and camera.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"style seed must be a non-negative integer, got {seed!r}")
    if isinstance(style, Style):
        chosen = style.validate()
    elif style in PSEUDO_STYLES:
        chosen = None
    elif isinstance(style, str) and style in STYLES:
        chosen = STYLES[style]
    else:
        raise ValueError(f"unknown style {style!r}; known styles: {', '.join(STYLE_NAMES)}")
    for held in exclude:
        if held not in STYLES:
            raise ValueError(f"unknown style {held!r} to exclude; known styles: {', '.join(STYLES)}")
    name = str(style) if chosen is None else chosen.name
    if chosen is not None and name in exclude:
        raise ValueError(f"style {name} is held out (excluded); choose another or stop excluding it")
    names = sorted(set(STYLES) - set(exclude))
    if not names:
        raise ValueError(f"every style is excluded: {name} has nothing left to draw from")
    if name in (WIDE, FULL):
        span = wide_range if name == WIDE else full_range
        values = {factor: _draw(np.random.default_rng([int(seed), _key(name), _key(factor)]), factor,
                                *span(factor, exclude)) for factor in FACTORS}
        return StyleSample(style=name, seed=int(seed), factors=StyleFactors(**values).validate(),
                           sources=dict.fromkeys(GROUPS, name))
    sources: dict[str, str] = {}
    for group in GROUPS:
        if chosen is None:
            pick = np.random.default_rng([int(seed), _key(RANDOMISED), _key(group)]).integers(len(names))
            sources[group] = names[int(pick)]
        else:
            sources[group] = chosen.name
    values: dict[str, float | int] = {}
    for factor, meta in FACTORS.items():
        source = chosen if chosen is not None else STYLES[sources[meta["group"]]]
        low, high = source.range_of(factor)
        values[factor] = _draw(np.random.default_rng([int(seed), _key(name), _key(factor)]), factor, low, high)
    return StyleSample(style=name, seed=int(seed), factors=StyleFactors(**values).validate(), sources=sources)


# sky and light colours of the presets this generalises (weather.WEATHER_PRESETS)
_CLEAR_SKY = ((62.0, 122.0, 208.0), (178.0, 208.0, 236.0))  # top, horizon
_OVERCAST_SKY = ((168.0, 172.0, 178.0), (206.0, 208.0, 212.0))
_SUNSET_HORIZON = (236.0, 142.0, 78.0)
_NEUTRAL_SUN = (1.08, 1.04, 0.95)
_WARM_SUN = (1.3, 0.76, 0.44)
_COOL_SUN = (0.86, 0.96, 1.16)
_CLOUD_LIGHT = (0.92, 0.95, 1.0)


def _mix(a: tuple[float, ...], b: tuple[float, ...], t: float) -> tuple[float, ...]:
    return tuple(x + t * (y - x) for x, y in zip(a, b))


def weather_from_factors(f: StyleFactors, name: str = "style") -> WeatherPreset:
    """A :class:`WeatherPreset` from the light and camera factors: the presets, generalised into ranges.

    Clouds turn the direct sun (diffuse light, shadows, blue sky, glow) into the grey, shadowless
    light of the ``overcast`` preset; warmth colours the sunlight (and, with a low sun, the horizon);
    the auto-exposure gain keeps an average forest frame at about the presets' brightness (the
    ``exposure_ev`` error is applied by the camera).
    """
    f.validate()
    cc = f.cloud_cover
    warm = f.sun_warmth
    sun = _mix(_NEUTRAL_SUN, _WARM_SUN if warm >= 0 else _COOL_SUN, abs(warm))
    light = _mix(sun, _CLOUD_LIGHT, cc)
    diffuse = 1.0 - 0.75 * cc
    shadows = cc < 0.55
    low_sun = float(np.clip((25.0 - f.sun_elevation_deg) / 20.0, 0.0, 1.0))
    top = _mix(_CLEAR_SKY[0], _OVERCAST_SKY[0], cc)
    horizon = _mix(_CLEAR_SKY[1], _OVERCAST_SKY[1], cc)
    horizon = _mix(horizon, _SUNSET_HORIZON, max(warm, 0.0) * low_sun * (1.0 - cc))
    top = tuple(c * (1.0 - 0.45 * low_sun * (1.0 - cc)) for c in top)
    # a dark day has a dark sky too
    sky_level = min(0.6 + 0.5 * f.ambient, 1.0)
    top = tuple(min(c * sky_level, 255.0) for c in top)
    horizon = tuple(min(c * sky_level, 255.0) for c in horizon)
    sin_el = math.sin(math.radians(f.sun_elevation_deg))
    # in a forest most of the floor is in the crowns' shadow when there are shadows
    key = f.ambient + 0.45 * diffuse * sin_el * (0.35 if shadows else 1.0)
    tint = (1.0 + 0.08 * f.white_balance_warmth, 1.0 + 0.05 * f.white_balance_tint, 1.0 - 0.08 * f.white_balance_warmth)
    return WeatherPreset(
        name=name,
        light_direction=sun_direction(f.sun_elevation_deg, f.sun_azimuth_deg),
        light_color=tuple(float(np.clip(c, 0.0, 2.0)) for c in light),
        ambient=f.ambient,
        diffuse=diffuse,
        specular=f.specular,
        shadows=shadows,
        sky_top=top,
        sky_horizon=horizon,
        fog_density_per_m=f.haze_density_per_m,
        fog_color=tuple(0.96 * c for c in horizon),
        exposure_gain=float(np.clip(0.97 / key, 0.6, 1.8)),
        tint=tint,
        sun_glow=0.6 * (1.0 - cc),
        saturation=float(np.clip(f.colour_saturation * (1.2 - 0.45 * cc), 0.0, 2.0)),
    ).validate()


def factor_table() -> list[dict]:
    """One row per factor (name, group, unit, range, typical, default, doc), in :class:`StyleFactors` order."""
    defaults = StyleFactors()
    return [{"name": n, "group": m["group"], "unit": m["unit"], "range": m["range"], "typical": m["typical"],
             "default": getattr(defaults, n), "doc": m["doc"]} for n, m in FACTORS.items()]
