"""The offscreen OpenGL renderer draws what TinyRenderer draws, faster, and refuses what it cannot draw."""

from __future__ import annotations

import numpy as np
import pytest

from forest_perception.frames import CameraIntrinsics
from forest_perception.sim import gl_renderer
from forest_perception.sim.gl_renderer import GLRenderer, resolve_renderer
from forest_perception.sim.meshes import Mesh, box_mesh
from forest_perception.sim.projection import camera_rotation, projection_matrix, view_matrix
from forest_perception.sim.scene import ForestScene
from forest_perception.sim.world import generate_world

INTR = CameraIntrinsics(161, 121)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """One forest with hills, trees, logs and a treeline, in both renderers, each with a rover body."""
    world = generate_world(seed=3, size_m=24.0, tree_density_per_ha=900.0)
    cache = tmp_path_factory.mktemp("gl_cache")
    out = {}
    for name in ("opengl", "tiny"):
        scene = ForestScene(world, cache_dir=cache, texture_size=64, renderer=name)
        body = scene.add_rover_body(color=(0.9, 0.3, 0.1))
        scene.set_body_pose(body, (2.0, 1.6, world.terrain.height_at(2.0, 1.6) + 0.06), (0.0, 0.0, 0.3, 0.95))
        out[name] = (scene, body)
    yield out
    for scene, _ in out.values():
        scene.close()


def _both(scenes, weather: str, yaw: float = 0.7):
    world = scenes["tiny"][0].world
    pos = np.array([0.4, 0.3, world.terrain.height_at(0.4, 0.3) + 0.2])
    return {name: scene.render(pos, camera_rotation(yaw), INTR, weather) for name, (scene, _) in scenes.items()}


@pytest.mark.parametrize("weather", ["overcast", "sunny", "dusk"])
def test_opengl_frames_match_tinyrenderer(scenes, weather):
    frames = _both(scenes, weather)
    (rgb_g, depth_g, seg_g), (rgb_t, depth_t, seg_t) = frames["opengl"], frames["tiny"]
    # the same geometry: sky, bodies and metric depth agree pixel for pixel
    assert np.mean(np.isinf(depth_g) == np.isinf(depth_t)) > 0.998
    hit = np.isfinite(depth_g) & np.isfinite(depth_t)
    assert np.median(np.abs(depth_g[hit] - depth_t[hit]) / depth_t[hit]) < 1e-3
    assert np.mean(scenes["opengl"][0].semantic_labels(seg_g) == scenes["tiny"][0].semantic_labels(seg_t)) > 0.995
    # the same shading (sun shadows included): only texel picks on edges differ
    diff = np.abs(rgb_g.astype(np.int16) - rgb_t.astype(np.int16))
    assert diff[hit].mean() < 3.0, diff[hit].mean()
    assert np.mean(diff.max(axis=2) == 0) > 0.7


def test_rover_body_seen_and_labelled_in_both(scenes):
    frames = _both(scenes, "overcast", yaw=0.85)
    for name, (scene, body) in scenes.items():
        seg = frames[name][2]
        assert np.count_nonzero(seg == body) > 30, name
        assert np.all(scene.semantic_labels(seg)[seg == body] == scene.semantic_labels(np.array([body]))[0])


def test_sun_shadow_maps_agree(scenes):
    """One-sided triangles, as TinyRenderer: the treeline's back faces must not hide the forest from the sun."""
    from forest_perception.sim.weather import get_weather

    maps = {name: scene.sun_shadow_map(get_weather("dusk")) for name, (scene, _) in scenes.items()}
    a, b = maps["opengl"].depth, maps["tiny"].depth
    assert a.shape == b.shape
    both = np.isfinite(a) & np.isfinite(b)
    assert np.mean(np.isfinite(a) == np.isfinite(b)) > 0.998
    assert np.percentile(np.abs(a[both] - b[both]), 99) < 0.05


def test_scenes_in_one_process_keep_their_own_context(tmp_path):
    """Each scene's draws go to its own GL context, whatever scene was made or closed last."""
    world = generate_world(seed=4, size_m=16.0)
    pos = (0.3, 0.2, world.terrain.height_at(0.3, 0.2) + 0.2)
    with ForestScene(world, cache_dir=tmp_path, texture_size=64, renderer="opengl") as first:
        before = first.render(pos, camera_rotation(1.0), INTR, "overcast")
        with ForestScene(generate_world(seed=9, size_m=16.0), cache_dir=tmp_path, texture_size=64,
                         renderer="opengl") as other:
            other.render(pos, camera_rotation(0.0), INTR, "sunny")
            during = first.render(pos, camera_rotation(1.0), INTR, "overcast")
        after = first.render(pos, camera_rotation(1.0), INTR, "overcast")
    for x, y, z in zip(before, during, after):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(x, z)


def test_gl_renderer_draws_a_box_at_its_metric_depth():
    gl = GLRenderer()
    try:
        gl.add_texture("white", np.full((4, 4, 3), 255, dtype=np.uint8))
        body = gl.add_mesh(box_mesh((0.5, 0.5, 0.5)), "white")
        model = np.eye(4)
        model[:3, 3] = (3.0, 0.0, 0.0)  # front face at x = 2.5 m, straight ahead
        gl.set_model(body, model)
        view = view_matrix(np.zeros(3), camera_rotation(0.0))
        rgb, depth, seg = gl.draw(view, projection_matrix(INTR, 0.05, 50.0), INTR.width, INTR.height,
                                  (-1.0, 0.0, 0.0), (1.0, 1.0, 1.0), 0.5, 0.5, 0.0)
        c = (INTR.height // 2, INTR.width // 2)
        assert depth[c] == pytest.approx(2.5, abs=1e-4)
        assert seg[c] == body and seg[0, 0] == -1 and np.isinf(depth[0, 0])
        # ambient 0.5 + diffuse 0.5 * (n . l = 1) on white: full white, truncated like TinyRenderer
        assert tuple(rgb[c]) == (255, 255, 255)
        gl.set_visible(body, False)
        _, depth, seg = gl.draw(view, projection_matrix(INTR, 0.05, 50.0), INTR.width, INTR.height,
                                (-1.0, 0.0, 0.0), (1.0, 1.0, 1.0), 0.5, 0.5, 0.0)
        assert np.all(seg == -1) and np.all(np.isinf(depth))
    finally:
        gl.close()
        gl.close()  # twice is fine


def test_gl_renderer_refuses_what_it_cannot_draw():
    gl = GLRenderer()
    try:
        with pytest.raises(ValueError, match="HxWx3"):
            gl.add_texture("flat", np.zeros((4, 4), dtype=np.uint8))
        with pytest.raises(ValueError, match="unknown texture 'bark'"):
            gl.add_mesh(box_mesh((1.0, 1.0, 1.0)), "bark")
        with pytest.raises(ValueError, match="at least one triangle"):
            gl.add_mesh(Mesh.empty(), None)
        with pytest.raises(ValueError, match="cannot read texture"):
            gl.add_texture_file("missing", "/nonexistent/texture.png")
    finally:
        gl.close()
    with pytest.raises(RuntimeError, match="closed"):
        gl.add_mesh(box_mesh((1.0, 1.0, 1.0)), None)


def test_resolve_renderer(monkeypatch):
    monkeypatch.delenv(gl_renderer.RENDERER_ENV, raising=False)
    assert resolve_renderer("tiny") == "tiny"
    assert resolve_renderer("auto") == "opengl"  # make installs Mesa's EGL: no silent fallback here
    monkeypatch.setenv(gl_renderer.RENDERER_ENV, "tiny")
    assert resolve_renderer("auto") == "tiny"
    assert resolve_renderer("opengl") == "opengl"  # an explicit choice wins over the environment
    monkeypatch.setenv(gl_renderer.RENDERER_ENV, "vulkan")
    with pytest.raises(ValueError, match="FOREST_SIM_RENDERER"):
        resolve_renderer("auto")
    with pytest.raises(ValueError, match="renderer must be one of"):
        resolve_renderer("raytracer")
    monkeypatch.delenv(gl_renderer.RENDERER_ENV)
    # without an EGL context: auto falls back to TinyRenderer, an explicit opengl is a clear error
    monkeypatch.setattr(gl_renderer, "_GL_PROBLEM", ["no offscreen OpenGL 3.3 context over EGL (test)"])
    assert resolve_renderer("auto") == "tiny"
    with pytest.raises(RuntimeError, match="renderer 'opengl' requested, but no offscreen OpenGL"):
        resolve_renderer("opengl")


def test_trilinear_texture_filter_smooths_far_texture_only(tmp_path, monkeypatch):
    world = generate_world(seed=3, size_m=24.0, tree_density_per_ha=900.0)
    pos = np.array([0.4, 0.3, world.terrain.height_at(0.4, 0.3) + 0.2])
    frames = {}
    for name in ("nearest", "trilinear"):
        with ForestScene(world, cache_dir=tmp_path, texture_size=64, renderer="opengl", texture_filter=name) as scene:
            frames[name] = scene.render(pos, camera_rotation(0.7), INTR, "overcast")
    (rgb_n, depth_n, seg_n), (rgb_t, depth_t, seg_t) = frames["nearest"], frames["trilinear"]
    np.testing.assert_array_equal(depth_n, depth_t)  # the same geometry
    np.testing.assert_array_equal(seg_n, seg_t)

    def detail(rgb: np.ndarray, mask: np.ndarray) -> float:
        luma = rgb.astype(np.float64).mean(axis=2)
        both = mask[:, 1:] & mask[:, :-1]
        return float(np.abs(np.diff(luma, axis=1))[both].mean())

    far = np.isfinite(depth_n) & (depth_n > 6.0)
    assert detail(rgb_t, far) < 0.8 * detail(rgb_n, far)
    with pytest.raises(ValueError, match="texture_filter must be one of"):
        GLRenderer(texture_filter="bicubic")
    monkeypatch.setenv(gl_renderer.TEXTURE_FILTER_ENV, "trilinear")
    gl = GLRenderer()
    assert gl.texture_filter == "trilinear"
    gl.close()


def test_isolated_synth_runs_beside_a_live_gl_context(tmp_path):
    """synth renders each forest in a child process; forked from a process holding an OpenGL context (llvmpipe's
    threads) such a child hangs on its first frame, so the children must come from a clean fork server."""
    import threading

    from forest_perception.dataset_tools.synth import SynthConfig, synthesize
    from forest_perception.sim.world import WorldConfig

    gl = GLRenderer()
    gl.add_texture("white", np.full((4, 4, 3), 255, dtype=np.uint8))
    gl.add_mesh(box_mesh((0.5, 0.5, 0.5)), "white")
    gl.draw(view_matrix(np.zeros(3), camera_rotation(0.0)), projection_matrix(INTR, 0.05, 50.0), INTR.width,
            INTR.height, (0.0, 0.0, 1.0), (1.0, 1.0, 1.0), 0.6, 0.4, 0.0)  # llvmpipe's threads are running
    config = SynthConfig(runs=1, segments_per_run=1, frames_per_segment=2, width=48, height=36,
                         world=WorldConfig(size_m=16.0), styles=("hilly_deadwood",))
    result: list = []
    worker = threading.Thread(target=lambda: result.append(synthesize(tmp_path / "data", config, progress=False,
                                                                      isolate=True)), daemon=True)
    worker.start()
    worker.join(timeout=180)
    gl.close()
    assert not worker.is_alive(), "synth's child process hung"
    assert result and result[0].frames == 2
