"""PyBullet forest renderer: geometry against the world model, projection, presets, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest

from forest_perception.frames import CameraIntrinsics
from forest_perception.sim.meshes import (
    Mesh,
    box_mesh,
    cylinder_mesh,
    ellipsoid_mesh,
    log_mesh,
    terrain_mesh,
    trunk_heights,
    trunk_mesh,
    write_obj,
)
from forest_perception.sim.scene import CATEGORY_IDS, ForestScene, camera_rotation, measure_render_fps
from forest_perception.sim.terrain import Terrain
from forest_perception.sim.textures import ALL_TEXTURE_NAMES, TEXTURE_NAMES, generate_textures, make_texture
from forest_perception.sim.weather import NO_EFFECTS, apply_camera_pipeline, get_weather
from forest_perception.sim.world import ForestWorld, Log, Tree, WorldConfig, generate_world
from forest_perception.sim.world_meshes import CATEGORIES, MeshDetail, build_world_meshes

CAM_H = 0.2
# odd sizes put a pixel centre exactly on the optical axis
INTR = CameraIntrinsics(161, 121)
TRUNK_D = 4.0  # trunk axis straight ahead of the camera


def _flat_world(trees: list[Tree], size: float = 20.0) -> ForestWorld:
    n = int(size) + 1
    terrain = Terrain(heights=np.zeros((n, n)), resolution=1.0, x0=-size / 2, y0=-size / 2)
    return ForestWorld(config=WorldConfig(size_m=size), terrain=terrain, trees=trees)


def _tree(x: float, y: float, **kw) -> Tree:
    base = dict(z=0.0, dbh=0.3, height=14.0, crown_radius=2.0, crown_base=7.0, lean=0.0, lean_dir=0.0, conifer=False)
    base.update(kw)
    return Tree(x=x, y=y, **base)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("scene_cache")


@pytest.fixture(scope="module", params=["opengl", "tiny"])
def known_scene(cache_dir, request):
    """Flat ground, one trunk 4 m ahead, one 1 m to the right of it; no treeline, no cushions (both renderers)."""
    world = _flat_world([_tree(TRUNK_D, 0.0), _tree(6.0, -1.5, conifer=True)])
    detail = MeshDetail(treeline_offset_m=0.0, ground_patches_per_ha=0.0)
    with ForestScene(world, cache_dir=cache_dir, detail=detail, texture_size=64, renderer=request.param) as scene:
        yield scene


def _look_ahead(scene: ForestScene, weather: str = "overcast", **kw):
    return scene.render(np.array([0.0, 0.0, CAM_H]), camera_rotation(0.0), INTR, weather, **kw)


def test_centre_pixel_depth_is_distance_to_trunk_surface(known_scene):
    _, depth, seg = _look_ahead(known_scene)
    tree = known_scene.world.trees[0]
    expected = TRUNK_D - tree.radius_at(CAM_H)
    u, v = int(INTR.cx), int(INTR.cy)
    assert depth.dtype == np.float32 and seg.dtype == np.int32
    assert depth[v, u] == pytest.approx(expected, abs=0.02)
    assert known_scene.semantic_labels(seg)[v, u] == CATEGORY_IDS["trunk_broadleaf"]


def test_trunk_silhouette_lands_on_the_predicted_columns(known_scene):
    """A cylinder of radius r at distance D spans u = cx +- fx * tan(asin(r / D)) at the camera's height."""
    _, _, seg = _look_ahead(known_scene)
    labels = known_scene.semantic_labels(seg)
    row = labels[int(INTR.cy)]
    cols = np.flatnonzero(row == CATEGORY_IDS["trunk_broadleaf"])
    r = known_scene.world.trees[0].radius_at(CAM_H)
    half = INTR.fx * math.tan(math.asin(r / TRUNK_D))
    assert cols.min() == pytest.approx(INTR.cx - half, abs=1.0)
    assert cols.max() == pytest.approx(INTR.cx + half, abs=1.0)
    # the second (conifer) stem, 1.5 m to the right at 6 m: right of centre by fx * 1.5 / 6
    conifer_cols = np.flatnonzero(row == CATEGORY_IDS["trunk_conifer"])
    assert conifer_cols.mean() == pytest.approx(INTR.cx + INTR.fx * 1.5 / 6.0, abs=1.5)


def test_ground_rows_match_the_pinhole_model_and_depth_is_z_not_ray_length(known_scene):
    _, depth, seg = _look_ahead(known_scene)
    labels = known_scene.semantic_labels(seg)
    for v in (75, 90, 110, 120):
        expected = CAM_H * INTR.fy / (v - INTR.cy)  # flat ground seen from a level camera
        ground = labels[v] == CATEGORY_IDS["terrain"]
        assert ground.sum() > 100
        # z-depth of a horizontal plane is the same across a row (ray length would grow sideways)
        np.testing.assert_allclose(depth[v][ground], expected, rtol=0.01)


def test_sky_is_inf_depth_and_minus_one(known_scene):
    _, depth, seg = _look_ahead(known_scene)
    sky = seg == -1
    assert sky[0].any()  # the top row sees sky beside the crowns
    assert np.all(np.isinf(depth[sky]))
    assert np.all(np.isfinite(depth[~sky]))
    assert np.all(known_scene.semantic_labels(seg)[sky] == -1)


def test_rover_body_is_visible_and_can_be_hidden(known_scene):
    body = known_scene.add_rover_body(color=(0.1, 0.4, 0.8))
    try:
        known_scene.set_body_pose(body, (1.5, 0.6, 0.06), (0.0, 0.0, math.sin(0.4), math.cos(0.4)))
        _, _, seg = _look_ahead(known_scene)
        hits = np.argwhere(seg == body)
        assert len(hits) > 50
        # body 1.5 m ahead and 0.6 m left: left of centre by about fx * 0.6 / 1.5
        assert hits[:, 1].mean() == pytest.approx(INTR.cx - INTR.fx * 0.6 / 1.5, abs=8)
        _, _, seg_hidden = _look_ahead(known_scene, hidden_bodies=(body,))
        assert not np.any(seg_hidden == body)
        _, _, seg_again = _look_ahead(known_scene)
        assert np.any(seg_again == body)
    finally:
        known_scene.set_body_pose(body, (0.0, 0.0, -50.0), (0.0, 0.0, 0.0, 1.0))


def test_a_rover_camera_does_not_see_its_own_body(known_scene):
    from forest_perception.frames import RoverGeometry

    geom = RoverGeometry()
    body = known_scene.add_rover_body()
    try:
        base = np.array([1.0, -2.0, geom.wheel_radius_m])
        known_scene.set_body_pose(body, base, (0.0, 0.0, 0.0, 1.0))
        camera = base + np.array(geom.camera_offset_m)
        _, _, seg = known_scene.render(camera, camera_rotation(0.0), INTR, "overcast")
        assert not np.any(seg == body)
        # seen from behind, it is there
        _, _, seg = known_scene.render(camera - np.array([1.0, 0.0, 0.0]), camera_rotation(0.0), INTR, "overcast")
        assert np.any(seg == body)
    finally:
        known_scene.set_body_pose(body, (0.0, 0.0, -50.0), (0.0, 0.0, 0.0, 1.0))


def test_depth_to_world_recovers_the_trunk_front(known_scene):
    from forest_perception.sim.projection import depth_to_world

    _, depth, _ = _look_ahead(known_scene)
    points = depth_to_world(depth, INTR, np.array([0.0, 0.0, CAM_H]), camera_rotation(0.0))
    front = points[int(INTR.cy), int(INTR.cx)]
    r = known_scene.world.trees[0].radius_at(CAM_H)
    np.testing.assert_allclose(front, [TRUNK_D - r, 0.0, CAM_H], atol=0.02)


def test_render_refuses_bad_inputs(known_scene):
    with pytest.raises(ValueError, match="rotation"):
        known_scene.render((0, 0, 0.2), np.eye(3) * 2.0, INTR, "sunny")
    with pytest.raises(ValueError, match="near"):
        known_scene.render((0, 0, 0.2), np.eye(3), INTR, "sunny", near=1.0, far=0.5)
    with pytest.raises(ValueError, match="blizzard"):
        known_scene.render((0, 0, 0.2), np.eye(3), INTR, "blizzard")
    with pytest.raises(ValueError, match="quat"):
        known_scene.set_body_pose(known_scene.add_rover_body(), (0, 0, 0), (0, 0, 0, 0))
    with pytest.raises(ValueError, match="rover"):
        known_scene.set_body_pose(10_000, (0, 0, 0), (0, 0, 0, 1))


@pytest.fixture(scope="module")
def forest_scene(cache_dir):
    world = generate_world(seed=3, size_m=24.0, tree_density_per_ha=900.0)
    with ForestScene(world, cache_dir=cache_dir, texture_size=64) as scene:
        yield scene


def _forest_frame(scene: ForestScene, weather: str, seed: int = 0, effects=NO_EFFECTS):
    pos = np.array([0.4, 0.3, scene.world.terrain.height_at(0.4, 0.3) + CAM_H])
    rot = camera_rotation(0.7)
    rgb, depth, seg = scene.render(pos, rot, INTR, weather)
    out = apply_camera_pipeline(rgb, depth, get_weather(weather), effects, np.random.default_rng(seed), 0.5, INTR, rot)
    return out, depth, seg


def _far_detail(frame: np.ndarray, depth: np.ndarray) -> float:
    """Mean horizontal luminance step between neighbouring pixels that are both beyond 12 m."""
    luma = frame.astype(np.float64).mean(axis=2)
    far = np.isfinite(depth) & (depth > 12.0)
    both = far[:, 1:] & far[:, :-1]
    return float(np.abs(np.diff(luma, axis=1))[both].mean())


def test_weather_presets_look_clearly_different(forest_scene):
    frames = {w: _forest_frame(forest_scene, w) for w in ("sunny", "overcast", "dusk", "fog")}
    means = {w: f[0].astype(np.float64).mean(axis=(0, 1)) for w, f in frames.items()}
    names = list(means)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert np.abs(means[a] - means[b]).max() > 8.0, (a, b, means[a], means[b])
    assert means["dusk"].mean() < means["overcast"].mean() - 15  # dusk is dark
    red_minus_blue = {w: m[0] - m[2] for w, m in means.items()}
    assert red_minus_blue["dusk"] > red_minus_blue["overcast"] + 10  # warm low sun
    assert red_minus_blue["sunny"] > red_minus_blue["overcast"] + 5  # warm sun, cool overcast
    # fog washes out the texture of distant surfaces
    assert _far_detail(*frames["fog"][:2]) < 0.5 * _far_detail(*frames["sunny"][:2])


def test_fog_contrast_falls_with_distance(forest_scene):
    rgb, depth, _ = _forest_frame(forest_scene, "fog")
    fog = np.asarray(get_weather("fog").fog_color)
    diff = np.abs(rgb.astype(np.float64) - fog).mean(axis=2)
    near = np.isfinite(depth) & (depth < 3.0)
    far = np.isfinite(depth) & (depth > 15.0)
    assert near.sum() > 100 and far.sum() > 100
    assert diff[far].mean() < 0.5 * diff[near].mean()


def test_sun_shadows_darken_shadowed_ground(forest_scene):
    weather = get_weather("sunny")
    sun_map = forest_scene.sun_shadow_map(weather)
    assert np.isfinite(sun_map.depth).mean() > 0.5
    pos = np.array([0.4, 0.3, forest_scene.world.terrain.height_at(0.4, 0.3) + CAM_H])
    rgb, depth, seg = forest_scene.render(pos, camera_rotation(0.7), INTR, weather)
    from forest_perception.sim.sun_shadows import world_components

    finite, comps = world_components(depth, INTR, pos, camera_rotation(0.7))
    lit = sun_map.lit_fraction(*comps, 0.1)
    ground = (forest_scene.semantic_labels(seg) == CATEGORY_IDS["terrain"]) & finite
    shadowed = ground & (lit < 0.05)
    sunlit = ground & (lit > 0.95)
    if shadowed.sum() < 50 or sunlit.sum() < 50:
        pytest.skip("this view has no sun/shade contrast on the ground")
    assert rgb[shadowed].mean() < 0.8 * rgb[sunlit].mean()


def test_same_inputs_same_images(forest_scene):
    from forest_perception.sim.weather import CameraEffects

    a, da, sa = _forest_frame(forest_scene, "sunny", seed=5, effects=CameraEffects())
    b, db, sb = _forest_frame(forest_scene, "sunny", seed=5, effects=CameraEffects())
    c, _, _ = _forest_frame(forest_scene, "sunny", seed=6, effects=CameraEffects())
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(da, db)
    np.testing.assert_array_equal(sa, sb)
    assert np.any(a != c)


def test_two_scenes_of_one_world_render_identically(cache_dir):
    world = generate_world(seed=4, size_m=16.0)
    frames = []
    for _ in range(2):
        with ForestScene(world, cache_dir=cache_dir, texture_size=64) as scene:
            frames.append(scene.render((0.3, 0.2, world.terrain.height_at(0.3, 0.2) + CAM_H), camera_rotation(1.0),
                                       INTR, "dusk"))
    for x, y in zip(*frames):
        np.testing.assert_array_equal(x, y)


def test_camera_standing_on_a_terrain_vertex_still_sees_the_ground(known_scene):
    """A grid vertex right below the camera has w == 0 in clip space (TinyRenderer divides by it)."""
    _, _, seg = known_scene.render((2.0, 3.0, CAM_H), camera_rotation(0.0), INTR, "overcast")
    assert np.all(seg[-10:] >= 0)


def test_measure_render_fps_is_positive(cache_dir):
    fps = measure_render_fps(generate_world(seed=1, size_m=12.0), CameraIntrinsics(64, 48), n=2,
                             cache_dir=cache_dir, texture_size=64)
    assert fps > 0


# ------------------------------------------------------------------ meshes and textures


def test_trunk_rings_follow_the_world_model():
    tree = _tree(1.0, 2.0, lean=0.05, lean_dir=0.7, z=0.3)
    mesh = trunk_mesh(tree, sides=16)
    hs = trunk_heights(tree)
    ring = 17  # sides + seam
    assert mesh.n_vertices == ring * len(hs)
    for k, h in enumerate(hs):
        verts = mesh.vertices[k * ring:(k + 1) * ring]
        ax, ay = tree.axis_at(h)
        np.testing.assert_allclose(verts[:, 2].mean(), tree.z + h, atol=0.02)
        radial = np.hypot(verts[:, 0] - ax, verts[:, 1] - ay)
        # polygon vertices sit just outside the circle so that the areas agree (16 sides: +1.3 %)
        np.testing.assert_allclose(radial, tree.radius_at(max(h, 0.0)) * 1.013, rtol=0.03)
    centroids = mesh.vertices[mesh.indices].mean(axis=1)
    axis_xy = np.array([tree.axis_at(z - tree.z) for z in centroids[:, 2]])
    outward = np.column_stack([centroids[:, :2] - axis_xy, np.zeros(len(centroids))])
    # faces point out (TinyRenderer culls back faces); the 0.5 m ledge faces point down, not in
    assert np.all(np.sum(mesh.face_normals() * outward, axis=1) > -1e-9)
    assert np.mean(np.sum(mesh.face_normals() * outward, axis=1) > 0) > 0.8


def test_closed_shapes_face_outward():
    rng = np.random.default_rng(0)
    for mesh in (ellipsoid_mesh(np.array([1.0, 2.0, 3.0]), (1.0, 0.8, 0.6), rng),
                 log_mesh(Log(0.0, 0.0, 0.2, 0.3, 3.0, 0.3)), box_mesh((0.2, 0.1, 0.05)), cylinder_mesh(0.1, 0.04)):
        centre = mesh.vertices.mean(axis=0)
        centroids = mesh.vertices[mesh.indices].mean(axis=1)
        assert np.mean(np.sum(mesh.face_normals() * (centroids - centre), axis=1) > 0) > 0.97
        tri = mesh.vertices[mesh.indices]
        area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
        assert area.min() > 0  # no degenerate triangles (they still cost TinyRenderer vertex work)


def test_terrain_mesh_uses_the_grid_heights_and_tiles_uvs():
    world = generate_world(seed=2, size_m=20.0)
    mesh = terrain_mesh(world.terrain)
    assert mesh.n_vertices == world.terrain.heights.size
    np.testing.assert_allclose(np.sort(mesh.vertices[:, 2]), np.sort(world.terrain.heights.ravel()))
    assert np.all(mesh.face_normals()[:, 2] > 0)
    # uvs advance by one texture tile every 2 m and stay positive (TinyRenderer wraps with modf)
    assert mesh.uvs.min() > 0
    step = mesh.uvs[1] - mesh.uvs[0]
    np.testing.assert_allclose(step, [world.terrain.resolution / 2.0, 0.0])


def test_world_meshes_are_few_bodies_with_known_textures():
    world = generate_world(seed=0)
    groups = build_world_meshes(world)
    # ~900 objects and 3600 terrain cells; ground tiles come twice (near/far texture)
    assert len(groups) < 1500
    assert {g.texture for g in groups} <= set(ALL_TEXTURE_NAMES)
    assert {g.category for g in groups} <= set(CATEGORIES)
    assert all(g.mesh.n_vertices < 65_000 for g in groups)
    triangles = sum(g.mesh.n_triangles for g in groups if g.lod != 1)
    assert triangles < 200_000


def test_write_obj_round_trip(tmp_path):
    mesh = ellipsoid_mesh(np.zeros(3), (1.0, 1.0, 1.0), None, lat=3, lon=4)
    path = write_obj(mesh, tmp_path / "blob.obj", texture=tmp_path / "tex.png")
    lines = path.read_text().splitlines()
    assert sum(line.startswith("v ") for line in lines) == mesh.n_vertices
    assert sum(line.startswith("vt ") for line in lines) == mesh.n_vertices
    assert sum(line.startswith("f ") for line in lines) == mesh.n_triangles
    assert (tmp_path / "blob.mtl").read_text().count("map_Kd") == 1


def test_mesh_refuses_inconsistent_arrays():
    with pytest.raises(ValueError, match="normal"):
        Mesh(np.zeros((3, 3)), np.zeros((2, 3)), np.zeros((3, 2)), [[0, 1, 2]])
    with pytest.raises(ValueError, match="indices"):
        Mesh(np.zeros((3, 3)), np.zeros((3, 3)), np.zeros((3, 2)), [[0, 1, 3]])
    with pytest.raises(ValueError, match="trunk_sides"):
        MeshDetail(trunk_sides=8).validate()


def test_textures_are_deterministic_textured_and_cached(tmp_path):
    for name in TEXTURE_NAMES:
        img = make_texture(name, seed=1, size=64)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        assert img.reshape(-1, 3).std(axis=0).max() > 6.0, f"{name} is nearly flat"
        np.testing.assert_array_equal(img, make_texture(name, seed=1, size=64))
    assert np.any(make_texture("litter", seed=1, size=64) != make_texture("litter", seed=2, size=64))
    paths = generate_textures(tmp_path, seed=0, size=32)
    assert set(paths) == set(ALL_TEXTURE_NAMES) and all(p.is_file() for p in paths.values())
    stamp = {n: p.stat().st_mtime_ns for n, p in paths.items()}
    again = generate_textures(tmp_path, seed=0, size=32)
    assert {n: p.stat().st_mtime_ns for n, p in again.items()} == stamp
    with pytest.raises(ValueError, match="unknown texture 'lava'"):
        make_texture("lava")


def test_bark_texture_has_vertical_furrows():
    img = make_texture("bark_conifer", seed=0, size=128).astype(np.float64).mean(axis=2)
    along_columns = np.abs(np.diff(img, axis=0)).mean()  # change going up the stem
    across_columns = np.abs(np.diff(img, axis=1)).mean()  # change going around it
    assert across_columns > 1.5 * along_columns
