"""Depth image geometry: back-projection, voxel downsampling and the ground-free laser scan."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from forest_perception import depth_geometry as dg

W, H, HFOV = 160, 120, 69.4


def _k() -> np.ndarray:
    return dg.camera_matrix_from_hfov(W, H, HFOV)


def _rays(K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x/z, y/z) of every pixel centre."""
    u, v = np.meshgrid(np.arange(W, dtype=np.float64), np.arange(H, dtype=np.float64))
    return (u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1]


def _scene(K: np.ndarray, camera_height: float = 0.2) -> np.ndarray:
    """Flat ground, a wall 2 m ahead in the centre, a post 1.5 m ahead on the left, canopy at 2 m on the right."""
    a, b = _rays(K)
    depth = np.full((H, W), np.inf)
    with np.errstate(divide="ignore"):
        ground = np.where(b > 0, camera_height / b, np.inf)  # optical y is down: ground at y = +h
        canopy = np.where((b < 0) & (a > 0.3), (2.0 - camera_height) / -b, np.inf)
    depth = np.minimum(np.minimum(depth, ground), canopy)
    wall = (np.abs(a) < 0.1) & (2.0 * b >= -(0.6 - camera_height))  # 0.6 m high
    depth = np.where(wall, np.minimum(depth, 2.0), depth)
    post = (a > -0.35) & (a < -0.25)  # image left: positive bearings
    depth = np.where(post, np.minimum(depth, 1.5), depth)
    depth[depth > 10.0] = np.nan
    return depth.astype(np.float32)


def test_points_of_a_wall_land_at_the_right_xyz():
    K = _k()
    depth = np.full((H, W), 3.0, dtype=np.float32)
    depth[0, 0] = np.nan
    depth[1, 1] = 0.0
    points = dg.depth_to_points(depth, K)
    assert points.dtype == np.float32 and points.shape == (H * W - 2, 3)
    assert np.allclose(points[:, 2], 3.0)
    # pixel (u=W-1, v=H-1) is bottom right: +x right, +y down in the optical frame
    corner = points[-1]
    assert corner == pytest.approx([(W - 1 - K[0, 2]) / K[0, 0] * 3.0, (H - 1 - K[1, 2]) / K[1, 1] * 3.0, 3.0])
    assert corner[0] > 0 and corner[1] > 0
    # half the horizontal field of view spans the wall's half width
    assert points[:, 0].max() == pytest.approx(3.0 * math.tan(math.radians(HFOV / 2)) * (W - 1) / W, rel=1e-4)
    strided = dg.depth_to_points(depth, K, stride=4)
    assert len(strided) == len(range(0, H, 4)) * len(range(0, W, 4)) - 1  # (0, 0) is NaN


def test_points_refuse_bad_input():
    with pytest.raises(ValueError, match="HxW"):
        dg.depth_to_points(np.zeros((4, 4, 3)), _k())
    with pytest.raises(ValueError, match="stride"):
        dg.depth_to_points(np.zeros((4, 4)), _k(), stride=0)
    with pytest.raises(ValueError, match="3x3"):
        dg.depth_to_points(np.zeros((4, 4)), np.eye(2))


def test_scan_layout_covers_the_field_of_view():
    layout = dg.scan_layout(_k(), W)
    half = math.atan2((W - 1) / 2, _k()[0, 0])
    assert layout.angle_min == pytest.approx(-half) and layout.angle_max <= half + 1e-9
    assert layout.angle_max == pytest.approx(layout.angle_min + (layout.count - 1) * layout.angle_increment)
    # one pixel at the centre: bearings thin out towards the edges, where pixels subtend less angle
    assert 0.8 * W < layout.count <= W


def test_scan_sees_the_wall_removes_ground_and_ignores_canopy():
    K = _k()
    layout = dg.scan_layout(K, W)
    angles = layout.angle_min + np.arange(layout.count) * layout.angle_increment
    ranges = dg.depth_to_scan(_scene(K), K, camera_height_m=0.2)
    assert ranges.dtype == np.float32 and ranges.shape == (layout.count,)
    centre = np.abs(angles) < math.atan(0.08)
    # horizontal distance to a wall 2 m ahead: 2 / cos(bearing)
    assert np.allclose(ranges[centre], 2.0 / np.cos(angles[centre]), atol=0.01)
    assert ranges[np.argmin(np.abs(angles))] == pytest.approx(2.0, abs=0.01)
    post = (np.tan(angles) > 0.26) & (np.tan(angles) < 0.34)  # positive bearing = image left
    assert post.any() and np.allclose(ranges[post], 1.5 / np.cos(angles[post]), atol=0.01)
    # the ground (everywhere) and the canopy (image right: negative bearings) leave no return
    empty = (np.abs(np.tan(angles)) > 0.11) & ~((np.tan(angles) > 0.24) & (np.tan(angles) < 0.36))
    assert np.isinf(ranges[empty]).all()
    assert np.isinf(dg.depth_to_scan(_scene(K), K, max_obstacle_height_m=5.0)[angles < -0.35]).sum() < (
        angles < -0.35
    ).sum(), "with a 5 m height limit the canopy at 2 m becomes an obstacle"


def test_scan_with_pitch_levels_the_ground():
    K = _k()
    pitch = math.radians(10.0)  # looking down
    a, b = _rays(K)
    # ground 0.2 m below a camera pitched down: ray direction in the levelled frame
    c, s = math.cos(pitch), math.sin(pitch)
    fwd, up = c * 1.0 + s * -b, -s * 1.0 + c * -b  # per unit optical z
    with np.errstate(divide="ignore", invalid="ignore"):
        depth = np.where(up < 0, 0.2 / -up, np.nan).astype(np.float32)
    depth[depth > 10.0] = np.nan
    assert np.isinf(dg.depth_to_scan(depth, K, camera_pitch_rad=pitch)).all()
    # the same ground, unpitched in the model, looks like an obstacle sloping up
    assert np.isfinite(dg.depth_to_scan(depth, K, camera_pitch_rad=0.0)).any()
    assert np.all(fwd > 0)


def test_scan_range_limits_and_empty_input():
    K = _k()
    near = np.full((H, W), 0.2, dtype=np.float32)  # closer than range_min
    assert np.isinf(dg.depth_to_scan(near, K)).all()
    assert np.isinf(dg.depth_to_scan(np.full((H, W), np.nan, dtype=np.float32), K)).all()


def test_scan_is_fast_at_320x240():
    K = dg.camera_matrix_from_hfov(320, 240, HFOV)
    depth = np.random.default_rng(0).uniform(0.3, 10.0, (240, 320)).astype(np.float32)
    dg.depth_to_scan(depth, K)
    t0 = time.perf_counter()
    for _ in range(5):
        dg.depth_to_scan(depth, K)
    assert (time.perf_counter() - t0) / 5 < 0.05


def test_voxel_downsample_numpy_matches_open3d():
    rng = np.random.default_rng(1)
    points = rng.uniform(-2, 2, (20000, 3)).astype(np.float32)
    ours = dg.voxel_downsample(points, 0.25, use_open3d=False)
    assert ours.dtype == np.float32
    assert len(ours) <= 17**3 and len(ours) > 0.9 * 16**3
    pytest.importorskip("open3d")
    theirs = dg.voxel_downsample(points, 0.25, use_open3d=True)
    assert abs(len(ours) - len(theirs)) <= 0.01 * len(theirs)
    key = lambda p: p[np.lexsort(p.T[::-1])]  # noqa: E731
    if len(ours) == len(theirs):
        assert np.allclose(key(ours), key(theirs), atol=1e-4)


def test_voxel_downsample_counts_and_centroids():
    # two clusters a metre apart, each inside one 0.5 m voxel
    points = np.array([[0.0, 0.0, 0.0], [0.1, 0.1, 0.1], [1.0, 1.0, 1.0], [1.1, 1.0, 1.0]], dtype=np.float32)
    out = dg.voxel_downsample(points, 0.5, use_open3d=False)
    assert len(out) == 2
    assert sorted(map(tuple, np.round(out, 3))) == [(0.05, 0.05, 0.05), (1.05, 1.0, 1.0)]
    assert dg.voxel_downsample(points, 0.0) is not None and len(dg.voxel_downsample(points, 0.0)) == 4
    assert dg.voxel_downsample(np.zeros((0, 3), np.float32), 0.1).shape == (0, 3)


def _ground(K: np.ndarray, shape: tuple[int, int], pitch_rad: float, height_m: float = 0.2) -> np.ndarray:
    """Depth along the optical axis of flat ground under a camera pitched ``pitch_rad`` nose-down (NaN: no ground)."""
    rows = (np.arange(shape[0]) - K[1, 2]) / K[1, 1]
    down = rows * math.cos(pitch_rad) + math.sin(pitch_rad)
    depth = np.where(down > 1e-3, height_m / np.maximum(down, 1e-3), np.nan)
    return np.repeat(np.where(depth < 30, depth, np.nan)[:, None], shape[1], axis=1).astype(np.float32)


def test_tilt_depth_is_the_ground_a_tilted_camera_sees_and_tilting_back_restores_it():
    K = dg.camera_matrix(300.0, 310.0, 150.0, 125.0)  # fx != fy, principal point off the centre
    level = _ground(K, (240, 320), 0.0)
    tilted = dg.tilt_depth(level, K, math.radians(6.0))
    expected = _ground(K, (240, 320), math.radians(6.0))
    both = np.isfinite(tilted) & np.isfinite(expected)
    error = np.abs(tilted[both] - expected[both]) / expected[both]
    assert both.sum() > 0.7 * np.isfinite(expected).sum() and np.median(error) < 0.01
    back = dg.tilt_depth(tilted, K, math.radians(-6.0))
    kept = np.isfinite(back) & np.isfinite(level)
    assert kept.sum() > 0.7 * np.isfinite(level).sum()
    assert np.median(np.abs(back[kept] - level[kept]) / level[kept]) < 0.01
    assert np.isnan(tilted[-1]).all()  # nose down: the bottom rows come from below the frame
    np.testing.assert_allclose(dg.tilt_depth(level, K, 0.0), level)
    with pytest.raises(ValueError, match="HxW"):
        dg.tilt_depth(np.zeros((4, 4, 3)), K, 0.1)


def test_tilt_image_moves_what_was_ahead_up_when_the_camera_turns_down():
    K = dg.camera_matrix_from_hfov(320, 240, 69.4)
    image = np.zeros((240, 320, 3), np.uint8)
    image[119:121] = 255
    moved = dg.tilt_image(image, K, math.radians(5.0))
    row = int(np.argmax(moved[:, 160, 0]))
    assert row == pytest.approx(119.5 - K[1, 1] * math.tan(math.radians(5.0)), abs=1.5)
    assert moved.dtype == np.uint8 and moved.shape == image.shape


def test_canonical_view_of_a_narrower_camera_and_back():
    K = dg.camera_matrix_from_hfov(320, 240, 69.4)
    assert dg.canonical_map(K, 320, 240, 69.4) is None  # the network's own camera: nothing to do
    narrow = dg.camera_matrix(300.0, 300.0, 150.0, 118.0)  # ~56 deg, principal point off the centre
    affine = dg.canonical_map(narrow, 320, 240, 69.4)
    scale = K[0, 0] / 300.0
    np.testing.assert_allclose(affine, [[scale, 0, K[0, 2] - scale * 150.0], [0, scale, K[1, 2] - scale * 118.0]])
    # the real camera's principal point lands on the canonical one
    image = np.zeros((240, 320, 3), np.uint8)
    image[117:120, 149:152] = 255
    seen = dg.to_canonical(image, affine)
    row, col = np.unravel_index(np.argmax(seen[..., 0]), seen.shape[:2])
    assert abs(row - K[1, 2]) <= 1 and abs(col - K[0, 2]) <= 1
    # depth comes back to the real pixels with its values: a left-right ramp stays where it was
    depth = np.tile(np.linspace(1.0, 9.0, 320, dtype=np.float32), (240, 1))
    back = dg.from_canonical(dg.to_canonical(depth, affine), affine)
    inside = np.isfinite(back)
    assert inside.mean() > 0.95 and np.median(np.abs(back[inside] - depth[inside])) < 0.05
