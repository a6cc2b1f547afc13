"""Procedural forest world: determinism, realism of the stand, validation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from forest_perception.sim.world import WorldConfig, generate_world


def test_same_seed_same_world_and_different_seed_differs():
    a = generate_world(seed=7, size_m=30.0)
    b = generate_world(seed=7, size_m=30.0)
    c = generate_world(seed=8, size_m=30.0)
    assert a.to_dict() == b.to_dict()
    assert a.trees[0] != c.trees[0]
    assert not np.array_equal(a.terrain.heights, c.terrain.heights)


def test_stand_statistics_are_forest_like():
    world = generate_world(seed=1, size_m=100.0, tree_density_per_ha=600.0)
    s = world.summary()
    # Poisson count around the asked density (1 ha here), the spacing rule may drop a few
    assert 450 <= s["stems_per_ha"] <= 700
    dbh = np.array([t.dbh for t in world.trees])
    assert 0.15 < np.median(dbh) < 0.35
    heights = np.array([t.height for t in world.trees])
    assert 8.0 < np.median(heights) < 30.0
    # taller with thicker stems (allometry), crowns above the camera
    assert np.corrcoef(dbh, heights)[0, 1] > 0.8
    assert all(t.crown_base > 2.0 for t in world.trees)
    assert s["logs"] > 0 and s["bushes"] > 0 and s["rocks"] > 0


def test_terrain_is_uneven_and_objects_sit_on_it():
    world = generate_world(seed=2, size_m=40.0, terrain_roughness_m=0.8)
    relief = world.terrain.heights.max() - world.terrain.heights.min()
    assert relief > 0.4
    for t in world.trees[:20]:
        assert t.z == pytest.approx(world.terrain.height_at(t.x, t.y), abs=1e-9)
    slope = np.hypot(*world.terrain.gradient_at(3.0, -4.0))
    assert slope < 1.0  # drivable: under 45 degrees


def test_trunks_do_not_overlap_and_clearing_is_free():
    world = generate_world(seed=4, size_m=50.0, tree_density_per_ha=1200.0, clearing_radius_m=3.0)
    xy = np.array([(t.x, t.y) for t in world.trees])
    r = np.array([t.dbh / 2 for t in world.trees])
    d = np.hypot(xy[:, None, 0] - xy[None, :, 0], xy[:, None, 1] - xy[None, :, 1])
    np.fill_diagonal(d, np.inf)
    assert (d > r[:, None] + r[None, :]).all()
    circles = world.obstacle_circles()
    assert (np.hypot(circles[:, 0], circles[:, 1]) - circles[:, 2] > 2.0).all()


def test_trunk_taper_and_flare():
    tree = generate_world(seed=5, size_m=30.0).trees[0]
    assert tree.radius_at(0.0) > tree.radius_at(1.3) == pytest.approx(tree.dbh / 2)
    assert tree.radius_at(tree.height * 0.9) < tree.radius_at(1.3)


def test_canopy_cover_higher_under_crowns():
    world = generate_world(seed=6, size_m=60.0, tree_density_per_ha=900.0)
    big = max(world.trees, key=lambda t: t.crown_radius)
    assert world.canopy_cover(big.x, big.y) > 0.8
    empty = generate_world(seed=6, size_m=60.0, tree_density_per_ha=0.0)
    assert empty.canopy_cover(0.0, 0.0) == 0.0


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("tree_density_per_ha", -3.0, "tree_density_per_ha"),
        ("tree_density_per_ha", math.nan, "tree_density_per_ha"),
        ("size_m", 0.0, "size_m"),
        ("terrain_roughness_m", -1.0, "terrain_roughness_m"),
        ("seed", -1, "seed"),
        ("datum_lat_deg", 91.0, "datum_lat_deg"),
        ("conifer_fraction", 1.5, "conifer_fraction"),
    ],
)
def test_invalid_world_parameters_are_refused(field, value, words):
    with pytest.raises(ValueError, match=words):
        generate_world(WorldConfig(**{field: value}))
