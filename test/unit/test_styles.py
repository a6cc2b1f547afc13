"""Forest styles (domain randomisation): factor ranges, sampling, the worlds and looks they make, synth --style."""

from __future__ import annotations

import json
from dataclasses import replace

import cv2
import numpy as np
import pytest

from forest_perception.dataset_tools.cli import build_parser
from forest_perception.dataset_tools.cli import main as dataset_cli
from forest_perception.dataset_tools.layout import STYLE_FILE, load_frame, read_segment
from forest_perception.dataset_tools.synth import SynthConfig, synthesize
from forest_perception.dataset_tools.validate import validate_dataset
from forest_perception.sim.styles import (
    FACTORS,
    FULL,
    FULL_GROUPS,
    GROUPS,
    HOLD_OUT,
    PSEUDO_STYLES,
    RANDOMISED,
    STYLE_NAMES,
    STYLES,
    WIDE,
    WIDE_MARGIN,
    Style,
    StyleFactors,
    factor_table,
    full_range,
    sample,
    wide_range,
)
from forest_perception.sim.terrain import Relief, generate_terrain, max_grid_slope
from forest_perception.sim.textures import Palette, Tone, apply_tone
from forest_perception.sim.world import WorldConfig, generate_world


def test_there_are_eight_styles_and_three_pseudo_styles():
    assert len(STYLES) >= 8
    assert PSEUDO_STYLES == (RANDOMISED, WIDE, FULL) and STYLE_NAMES == (*STYLES, RANDOMISED, WIDE, FULL)
    for row in factor_table():
        low, high = row["range"]
        t_low, t_high = row["typical"]
        assert low <= t_low <= t_high <= high, row["name"]
        assert low <= row["default"] <= high, row["name"]
        assert row["unit"] and row["doc"] and row["group"] in GROUPS


@pytest.mark.parametrize("name", STYLE_NAMES)
def test_every_style_samples_valid_factors_and_simulator_inputs(name):
    for seed in (0, 1, 2):
        s = sample(name, seed)
        s.factors.validate()
        for factor, meta in FACTORS.items():
            low, high = meta["range"]
            assert low <= getattr(s.factors, factor) <= high, factor
        s.world_config(size_m=30.0).validate()
        s.mesh_detail().validate()
        s.palette().validate()
        s.weather().validate()
        s.camera_effects().validate()
        geometry = s.rover_geometry()
        assert 0.12 <= geometry.camera_height_m <= 0.35
        assert json.loads(json.dumps(s.to_dict()))["style"] == name


def test_validate_names_the_factor_out_of_range():
    with pytest.raises(ValueError, match="hill_height_m"):
        StyleFactors(hill_height_m=50.0).validate()
    with pytest.raises(ValueError, match="camera_height_m"):
        StyleFactors(camera_height_m=1.0).validate()
    with pytest.raises(ValueError, match="valley_count"):
        StyleFactors(valley_count=1.5).validate()
    with pytest.raises(ValueError, match="sun_elevation_deg"):
        StyleFactors(sun_elevation_deg=float("nan")).validate()
    with pytest.raises(ValueError, match="style bad: range of hill_height_m"):
        Style("bad", "", {"hill_height_m": (0.0, 99.0)}).validate()
    with pytest.raises(ValueError, match="unknown factor 'nope'"):
        Style("bad", "", {"nope": (0.0, 1.0)}).validate()
    with pytest.raises(ValueError, match="unknown style 'nope'; known styles: temperate_mixed"):
        sample("nope", 0)
    with pytest.raises(ValueError, match="hill_height_m"):
        WorldConfig(hill_height_m=-1.0).validate()
    with pytest.raises(ValueError, match="conifer.hue_deg|conifer_foliage.hue_deg"):
        Palette(conifer_foliage=Tone(hue_deg=400.0)).validate()


def test_sampling_is_deterministic_per_style_and_seed():
    for name in STYLE_NAMES:
        assert sample(name, 7) == sample(name, 7)
        assert sample(name, 7).factors != sample(name, 8).factors
    # a style's draws stay inside its own ranges, not just the factor's
    hilly = STYLES["hilly_deadwood"]
    for seed in range(5):
        low, high = hilly.range_of("snag_fraction")
        assert low <= sample("hilly_deadwood", seed).factors.snag_fraction <= high


def test_randomised_mixes_styles_across_seeds():
    sources = [sample(RANDOMISED, seed).sources for seed in range(12)]
    for group in GROUPS:
        assert len({s[group] for s in sources}) >= 3, group
    # each group of factors comes from the style it names
    s = sample(RANDOMISED, 3)
    low, high = STYLES[s.sources["stand"]].range_of("tree_density_per_ha")
    assert low <= s.factors.tree_density_per_ha <= high


def _mean_slope(world) -> float:
    h, res = world.terrain.heights, world.terrain.resolution
    gy, gx = np.gradient(h, res)
    return float(np.hypot(gx, gy).mean())


def test_styles_make_different_worlds():
    hilly = [generate_world(sample("hilly_deadwood", s).world_config(size_m=40.0)) for s in range(3)]
    default = [generate_world(sample("temperate_mixed", s).world_config(size_m=40.0)) for s in range(3)]
    assert np.mean([_mean_slope(w) for w in hilly]) > 1.5 * np.mean([_mean_slope(w) for w in default])
    assert min(w.summary()["snags"] for w in hilly) > max(w.summary()["snags"] for w in default)
    dense = generate_world(sample("boreal_dense", 0).world_config(size_m=40.0))
    open_ = generate_world(sample("old_open", 0).world_config(size_m=40.0))
    assert dense.summary()["stems_per_ha"] > 5 * open_.summary()["stems_per_ha"]
    assert dense.summary()["dbh_mean_m"] < open_.summary()["dbh_mean_m"]
    # crowns of the young dense conifers reach lower (relative to height) than the old broadleaves
    rel_base = [np.mean([t.crown_base / t.height for t in w.trees if not t.dead]) for w in (dense, open_)]
    assert rel_base[0] < rel_base[1]


def test_relief_respects_the_slope_cap_and_default_world_has_none():
    rng = np.random.default_rng(0)
    relief = Relief(hill_height_m=8.0, hill_wavelength_m=20.0, valley_count=2, valley_depth_m=4.0, max_slope=0.4)
    t = generate_terrain(rng, 40.0, 0.5, 0.6, relief=relief, relief_rng=np.random.default_rng(1))
    assert max_grid_slope(t.heights, t.resolution) <= 0.4 + 1e-9
    assert np.ptp(t.heights) > 1.5
    flat = generate_world(WorldConfig(size_m=30.0, seed=4))
    assert flat.summary()["ferns"] == 0 and flat.summary()["snags"] == 0


def test_palettes_differ_between_styles_and_tone_textures():
    autumn = sample("autumn_broadleaf", 0).palette()
    default = sample("temperate_mixed", 0).palette()
    assert autumn.broadleaf_foliage.hue_deg < -25 < default.broadleaf_foliage.hue_deg
    green = np.zeros((4, 4, 3), np.uint8)
    green[...] = (60, 140, 40)
    assert np.array_equal(apply_tone(green, Tone()), green)
    turned = apply_tone(green, autumn.broadleaf_foliage)
    assert turned[0, 0, 0] > turned[0, 0, 2] and turned[0, 0, 0] > green[0, 0, 0]  # redder: autumn
    assert sample("dark_wet", 0).weather().ambient < sample("bright_meadow_edge", 0).weather().ambient
    assert sample("foggy_ravine", 0).weather().fog_density_per_m > 4 * sample("old_open", 0).weather().fog_density_per_m


STYLED = dict(runs=1, segments_per_run=2, frames_per_segment=2, seed=5, width=64, height=48,
              frame_interval_s=0.3, world=WorldConfig(size_m=20.0))


def test_synth_with_styles_writes_a_valid_deterministic_dataset(tmp_path):
    cfg = SynthConfig(**STYLED, styles=("hilly_deadwood", "dark_wet"))
    report = synthesize(tmp_path / "a", cfg, progress=False)
    assert [s["style"] for s in report.segments] == ["hilly_deadwood", "dark_wet"]
    result = validate_dataset(tmp_path / "a")
    assert result.ok and not result.warnings, [str(p) for p in result.problems]
    for seg_name, style in (("a", "hilly_deadwood"), ("b", "dark_wet")):
        seg_dir = tmp_path / "a" / "Run-1" / seg_name
        recorded = json.loads((seg_dir / STYLE_FILE).read_text())
        assert recorded["style"] == style
        assert recorded["factors"] == sample(style, recorded["seed"]).to_dict()["factors"]
        segment = read_segment(seg_dir)
        assert len(segment) == 2
        for i in range(2):
            rgb, depth, record = load_frame(segment, i)
            assert rgb.shape == (48, 64, 3)
            ok = np.isfinite(depth)
            assert ok.mean() > 0.2 and depth[ok].min() >= 0.28 - 1e-3 and depth[ok].max() <= 10.0 + 1e-3
            assert record.extras["style"] == style
            assert abs(float(record.extras["camera_height_m"]) - recorded["camera_height_m"]) < 1e-9
    synthesize(tmp_path / "b", cfg, progress=False)
    for rel in ("Run-1/a/rgb_image/000001.png", "Run-1/b/depth_image/000001.png", "Run-1/b/metadata.csv"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_synth_randomised_varies_the_style_per_segment(tmp_path):
    cfg = SynthConfig(**{**STYLED, "segments_per_run": 3, "frames_per_segment": 1}, styles=(RANDOMISED,))
    report = synthesize(tmp_path, cfg, progress=False)
    seeds = {s["style_seed"] for s in report.segments}
    assert len(seeds) == 3
    sources = [json.loads((tmp_path / "Run-1" / n / STYLE_FILE).read_text())["sources"] for n in "abc"]
    assert len({tuple(sorted(s.items())) for s in sources}) == 3
    rgbs = [cv2.imread(str(tmp_path / "Run-1" / n / "rgb_image" / "000000.png")).mean(axis=(0, 1)) for n in "abc"]
    assert max(np.abs(rgbs[0] - r).max() for r in rgbs[1:]) > 3.0  # the looks differ


def test_synth_config_refuses_unknown_style():
    with pytest.raises(ValueError, match="unknown style 'nope'; known styles: .*randomised"):
        SynthConfig(styles=("nope",)).validate()
    with pytest.raises(ValueError, match="world_overrides"):
        SynthConfig(world_overrides=(("tree_density_per_ha", 100.0),)).validate()
    with pytest.raises(ValueError, match="hill_height_m"):
        SynthConfig(styles=("old_open",), world_overrides=(("hill_height_m", -3.0),)).validate()
    # the overrides win over the style's draw
    cfg = SynthConfig(styles=("old_open",), world_overrides=(("tree_density_per_ha", 999.0),))
    assert cfg.segment_world(sample("old_open", 0)).tree_density_per_ha == 999.0
    assert replace(cfg, world=WorldConfig(size_m=33.0)).segment_world(sample("old_open", 0)).size_m == 33.0


def test_cli_style_flag_lists_and_refuses(tmp_path, capsys):
    assert dataset_cli(["synth", "--out", str(tmp_path / "x"), "--style", "hilly,old_open"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown style 'hilly'" in err and "hilly_deadwood" in err
    assert not (tmp_path / "x").exists()
    assert dataset_cli(["styles"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in STYLE_NAMES)
    assert dataset_cli(["styles", "--factors", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["styles"]) == set(STYLE_NAMES) and len(data["factors"]) == len(FACTORS)


def test_cli_synth_style_and_montage(tmp_path, capsys):
    out = tmp_path / "ds"
    assert dataset_cli(["synth", "--out", str(out), "--style", "pine_plantation", "--segments", "1", "--frames", "1",
                        "--image-size", "64x48", "--size", "20", "--quiet"]) == 0
    assert "style pine_plantation" in capsys.readouterr().out
    assert json.loads((out / "Run-1" / "a" / STYLE_FILE).read_text())["world"]["trees"] > 0
    png = tmp_path / "m" / "styles.png"
    from forest_perception.sim.style_preview import style_montage

    frames = style_montage(png, ["temperate_mixed", "foggy_ravine"], width=64, height=48, columns=2, size_m=20.0,
                           texture_size=64)
    image = cv2.imread(str(png))
    assert image.shape == (48 + 2, 2 * (2 * 64 + 2), 3)
    assert all(f.render_ms and np.isfinite(f.depth).any() for f in frames)
    assert np.abs(frames[0].rgb.astype(int) - frames[1].rgb.astype(int)).mean() > 5


def test_randomised_never_draws_the_held_out_styles(capsys):
    assert set(HOLD_OUT) <= set(STYLES) and len(HOLD_OUT) >= 2
    for seed in range(30):
        assert not set(sample(RANDOMISED, seed, exclude=HOLD_OUT).sources.values()) & set(HOLD_OUT)
    assert sample(RANDOMISED, 4, exclude=()) == sample(RANDOMISED, 4)
    with pytest.raises(ValueError, match="held out"):
        sample(HOLD_OUT[0], 0, exclude=HOLD_OUT)
    with pytest.raises(ValueError, match="both asked for and excluded"):
        SynthConfig(styles=(HOLD_OUT[0],), exclude_styles=HOLD_OUT).validate()
    with pytest.raises(ValueError, match="no style"):
        SynthConfig(styles=(RANDOMISED,), exclude_styles=tuple(STYLES)).validate()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["synth", "--help"])
    assert ",".join(HOLD_OUT) in capsys.readouterr().out.replace("\n", " ").replace(" ", "")


def test_wide_draws_every_factor_on_its_own_within_the_stretched_union_of_the_styles():
    kept = [n for n in STYLES if n not in HOLD_OUT]
    for factor, meta in FACTORS.items():
        low, high = wide_range(factor, HOLD_OUT)
        union = (min(STYLES[n].range_of(factor)[0] for n in kept), max(STYLES[n].range_of(factor)[1] for n in kept))
        margin = WIDE_MARGIN * (union[1] - union[0])
        assert low == pytest.approx(max(meta["range"][0], union[0] - margin)), factor
        assert high == pytest.approx(min(meta["range"][1], union[1] + margin)), factor
    # the hold-out is not spanned: clustered_regrowth's 400-900 shrubs/ha reach past the others' 0-500 (+25 %)
    assert wide_range("bush_density_per_ha", HOLD_OUT) == pytest.approx((0.0, 625.0))
    assert wide_range("bush_density_per_ha")[1] > 900.0
    assert wide_range("hill_height_m", HOLD_OUT)[1] < STYLES["hilly_deadwood"].range_of("hill_height_m")[1]
    draws = [sample(WIDE, seed, exclude=HOLD_OUT) for seed in range(40)]
    assert all(set(d.sources.values()) == {WIDE} and d.style == WIDE for d in draws)
    for factor in ("tree_density_per_ha", "sun_elevation_deg", "bark_hue_deg", "camera_height_m"):
        values = np.array([getattr(d.factors, factor) for d in draws])
        low, high = wide_range(factor, HOLD_OUT)
        assert values.min() >= low and values.max() <= high, factor
        assert values.max() - values.min() > 0.6 * (high - low), factor  # spread over the range, not a style's
    # factors are drawn independently: dense stands come with any light, unlike in a single style
    dens = np.array([d.factors.tree_density_per_ha for d in draws])
    sun = np.array([d.factors.sun_elevation_deg for d in draws])
    assert abs(np.corrcoef(dens, sun)[0, 1]) < 0.5
    assert sample(WIDE, 7, exclude=HOLD_OUT) == sample(WIDE, 7, exclude=HOLD_OUT)
    assert sample(WIDE, 7) != sample(WIDE, 7, exclude=HOLD_OUT)
    with pytest.raises(ValueError, match="unknown factor 'nope'"):
        wide_range("nope")
    with pytest.raises(ValueError, match="every style is excluded"):
        sample(WIDE, 0, exclude=tuple(STYLES))
    with pytest.raises(ValueError, match="unknown style 'wide' to exclude"):
        SynthConfig(styles=(RANDOMISED,), exclude_styles=(WIDE,)).validate()


def test_full_spans_every_scene_factor_and_keeps_wides_light_and_camera():
    for factor, meta in FACTORS.items():
        if meta["group"] in FULL_GROUPS:
            assert full_range(factor, HOLD_OUT) == pytest.approx(meta["range"]), factor
        else:
            assert full_range(factor, HOLD_OUT) == pytest.approx(wide_range(factor, HOLD_OUT)), factor
    assert set(FULL_GROUPS) | {"light", "camera"} == set(GROUPS)
    draws = [sample(FULL, seed, exclude=HOLD_OUT) for seed in range(60)]
    assert all(set(d.sources.values()) == {FULL} and d.style == FULL for d in draws)
    for factor in ("hill_height_m", "snag_fraction", "bush_density_per_ha", "broadleaf_foliage_hue_deg",
                   "sun_elevation_deg", "camera_height_m"):
        values = np.array([getattr(d.factors, factor) for d in draws])
        low, high = full_range(factor, HOLD_OUT)
        assert values.min() >= low and values.max() <= high, factor
        assert values.max() - values.min() > 0.6 * (high - low), factor
    # it reaches the held-out styles' scene values that wide (built from the other styles) stops short of ...
    hills = np.array([d.factors.hill_height_m for d in draws])
    assert (hills > wide_range("hill_height_m", HOLD_OUT)[1]).mean() > 0.3  # hilly_deadwood's 4-9 m hills
    snags = np.array([d.factors.snag_fraction for d in draws])
    assert (snags > STYLES["hilly_deadwood"].range_of("snag_fraction")[0]).mean() > 0.3
    # ... but the camera mount stays the rig's
    heights = np.array([d.factors.camera_height_m for d in draws])
    assert heights.min() >= wide_range("camera_height_m", HOLD_OUT)[0]
    assert sample(FULL, 7, exclude=HOLD_OUT) == sample(FULL, 7, exclude=HOLD_OUT)
    assert sample(FULL, 7).factors != sample(WIDE, 7).factors
    with pytest.raises(ValueError, match="unknown factor 'nope'"):
        full_range("nope")


def test_docs_list_every_factor_and_style():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    text = (root / "docs" / "simulator.md").read_text()
    section = text[text.index("## Styles"):]
    for row in factor_table():
        low, high = row["range"]
        assert f"| `{row['name']}` | {row['group']} | {row['unit']} | {low:g} .. {high:g} |" in section, row["name"]
    for name in STYLE_NAMES:
        assert f"| `{name}` |" in section, name
    assert "images/styles.png" in section
    montage_png = root / "docs" / "images" / "styles.png"
    assert montage_png.is_file() and montage_png.stat().st_size < 400_000
