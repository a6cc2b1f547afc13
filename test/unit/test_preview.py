"""Top-down forest map and RGB|depth contact sheets."""

from __future__ import annotations

import numpy as np
import pytest

from forest_perception.sim.preview import colorize_depth, contact_sheet, world_map
from forest_perception.sim.world import generate_world


def test_world_map_draws_trunks_and_tracks():
    world = generate_world(seed=1, size_m=20.0)
    plain = world_map(world, size_px=200)
    with_track = world_map(world, [np.array([[0.0, 0.0], [5.0, 5.0]])], size_px=200)
    assert plain.shape == (200, 200, 3) and plain.dtype == np.uint8
    changed = np.any(plain != with_track, axis=2)
    # the track runs north-east from the centre: image up and to the right of the middle
    ys, xs = np.nonzero(changed)
    assert xs.mean() > 100 and ys.mean() < 100
    t = max(world.trees, key=lambda tree: tree.y)  # far from the scale bar in the lower-left corner
    u, v = int((t.x + 10) * 10), int((10 - t.y) * 10)
    assert tuple(plain[v, u]) == (90, 50, 25)  # trunk colour at the trunk position


def test_depth_colours_and_invalid_black():
    depth = np.array([[0.5, 9.5, np.nan]], dtype=np.float32)
    rgb = colorize_depth(depth)
    assert tuple(rgb[0, 2]) == (0, 0, 0)
    assert rgb[0, 0, 0] > rgb[0, 0, 2] and rgb[0, 1, 2] > rgb[0, 1, 0]  # near red, far blue


def test_contact_sheet_stacks_rows():
    rgb = np.zeros((10, 12, 3), np.uint8)
    depth = np.ones((10, 12), np.float32)
    sheet = contact_sheet([(rgb, depth), (rgb, depth)], ["a", "b"])
    assert sheet.shape == (20, 24, 3)
    with pytest.raises(ValueError, match="at least one"):
        contact_sheet([])
