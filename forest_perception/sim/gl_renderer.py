"""Offscreen OpenGL renderer for the forest scene (moderngl on EGL: Mesa's llvmpipe on a CPU, a GPU where there is one).

It draws the same meshes, textures and lights as PyBullet's TinyRenderer with the same shading formula
(ambient + diffuse + specular, nearest texel, no anti-aliasing), so a network trained on TinyRenderer
frames sees the same images, but rasterises with llvmpipe's threaded SIMD code: several times faster on
a CPU. Depth is written as metres along the optical axis from the fragment's view-space position (no
z-buffer inversion), and every pixel carries the id of the body it hit. Details: docs/simulator.md
(`renderer`).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from forest_perception.sim.meshes import Mesh

RENDERERS = ("auto", "opengl", "tiny")
"""``ForestScene(renderer=...)``: "auto" takes OpenGL when an offscreen EGL context opens, else TinyRenderer."""
RENDERER_ENV = "FOREST_SIM_RENDERER"
"""Environment variable that overrides "auto" (e.g. ``FOREST_SIM_RENDERER=tiny``)."""
TEXTURE_FILTERS = ("nearest", "trilinear")
"""``nearest``: one texel per pixel, as TinyRenderer (sharp, aliased at a distance); ``trilinear``: mipmaps with
linear and 8x anisotropic filtering, as a game engine or a real lens would smooth fine texture (OpenGL only)."""
TEXTURE_FILTER_ENV = "FOREST_SIM_TEXTURE_FILTER"
"""Environment variable with the default texture filter of OpenGL scenes (``nearest`` when unset)."""
_LOG = logging.getLogger(__name__)
_GL_PROBLEM: list[str | None] = []  # cached result of gl_renderer.egl_problem(), once per process

_VERTEX = """
#version 330
uniform mat4 mvp;
uniform mat4 model;
in vec3 in_pos;
in vec3 in_normal;
in vec2 in_uv;
out vec3 v_normal;
out vec2 v_uv;
out vec3 v_world;
void main() {
    vec4 world = model * vec4(in_pos, 1.0);
    v_world = world.xyz;
    v_normal = mat3(model) * in_normal;
    v_uv = in_uv;
    gl_Position = mvp * vec4(in_pos, 1.0);
}
"""

# TinyRenderer's fragment shader (Bullet's TinyRenderer.cpp): colour = texel * rgba;
# out = ambient * colour + (diffuse * max(n.l, 0) + specular * max(r.z, 0)^2) * colour * light_colour,
# truncated to an integer and clipped at 255; r is the light reflected about the normal.
_FRAGMENT = """
#version 330
uniform sampler2D tex;
uniform bool textured;
uniform vec4 rgba;
uniform vec3 light_dir;
uniform vec3 light_color;
uniform vec3 coeffs;  // ambient, diffuse, specular
uniform vec3 eye;
uniform vec3 forward;
uniform float body_id;
in vec3 v_normal;
in vec2 v_uv;
in vec3 v_world;
layout(location = 0) out vec4 out_color;
layout(location = 1) out vec2 out_aux;
void main() {
    vec3 n = normalize(v_normal);
    vec3 base = (textured ? texture(tex, v_uv).rgb : vec3(1.0)) * rgba.rgb * 255.0;
    float diffuse = max(dot(n, light_dir), 0.0);
    vec3 r = normalize(n * (2.0 * dot(n, light_dir)) - light_dir);
    float specular = pow(max(r.z, 0.0), 2.0);
    vec3 c = coeffs.x * base + (coeffs.y * diffuse + coeffs.z * specular) * base * light_color;
    out_color = vec4(min(floor(c), 255.0) / 255.0, 1.0);
    out_aux = vec2(dot(v_world - eye, forward), body_id + 1.0);
}
"""


_F = TypeVar("_F", bound=Callable)


def _current(method: _F) -> _F:
    """Run a method with the renderer's context current (several scenes, hence contexts, may live in a process)."""

    @functools.wraps(method)
    def wrapper(self: GLRenderer, *args: object, **kwargs: object) -> object:
        if self._ctx is None:
            raise RuntimeError("the OpenGL renderer is closed")
        with self._ctx:
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def egl_problem() -> str | None:
    """Why an offscreen OpenGL 3.3 context cannot be made here, or None when it can."""
    try:
        import moderngl
    except ImportError as exc:  # pragma: no cover - moderngl is a pinned dependency
        return f"moderngl is not installed ({exc})"
    try:
        ctx = moderngl.create_standalone_context(backend="egl", require=330)
    except Exception as exc:  # noqa: BLE001 - any driver failure means "no GL here"
        return (f"no offscreen OpenGL 3.3 context over EGL ({exc}); on Debian/Ubuntu install libegl1, "
                "libegl-mesa0 and libgl1-mesa-dri")
    ctx.release()
    return None


def resolve_renderer(renderer: str = "auto") -> str:
    """"opengl" or "tiny" for a requested renderer; "opengl" without an EGL context is a clear error."""
    if renderer not in RENDERERS:
        raise ValueError(f"renderer must be one of {RENDERERS}, got {renderer!r}")
    if renderer == "auto":
        env = os.environ.get(RENDERER_ENV, "").strip()
        if env:
            if env not in ("opengl", "tiny"):
                raise ValueError(f"{RENDERER_ENV} must be 'opengl' or 'tiny', got {env!r}")
            renderer = env
    if renderer == "tiny":
        return "tiny"
    if not _GL_PROBLEM:
        _GL_PROBLEM.append(egl_problem())
    problem = _GL_PROBLEM[0]
    if problem is None:
        return "opengl"
    if renderer == "opengl":
        raise RuntimeError(f"renderer 'opengl' requested, but {problem}")
    _LOG.warning("rendering with PyBullet's TinyRenderer (about 4x slower): %s", problem)
    return "tiny"


@dataclass
class _Body:
    vao: object
    buffers: list
    texture: str | None
    seg_id: int
    rgba: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    model: np.ndarray | None = None  # world_from_body; None: identity (world geometry)
    visible: bool = True


class GLRenderer:
    """Meshes, textures and bodies in one offscreen EGL context; :meth:`draw` renders a frame.

    Bodies are numbered from 0 in the order they are added. A body is one mesh with one texture (or a
    plain colour) and a model matrix (identity for world geometry, the rover's pose for a rover part).
    """

    def __init__(self, threads: int | None = None, texture_filter: str | None = None) -> None:
        import moderngl

        texture_filter = texture_filter or os.environ.get(TEXTURE_FILTER_ENV, "").strip() or "nearest"
        if texture_filter not in TEXTURE_FILTERS:
            raise ValueError(f"texture_filter must be one of {TEXTURE_FILTERS} (or {TEXTURE_FILTER_ENV}), "
                             f"got {texture_filter!r}")
        self.texture_filter = texture_filter

        if threads is not None:
            # llvmpipe's rasteriser threads; read when the context is made
            os.environ["LP_NUM_THREADS"] = str(int(threads))
        try:
            self._ctx = moderngl.create_standalone_context(backend="egl", require=330)
        except Exception as exc:  # noqa: BLE001 - name the missing piece, whatever the driver said
            raise RuntimeError(f"the OpenGL renderer needs an offscreen EGL context: {egl_problem() or exc}") from exc
        self._prog = self._ctx.program(vertex_shader=_VERTEX, fragment_shader=_FRAGMENT)
        self._textures: dict[str, object] = {}
        self._bodies: list[_Body] = []
        self._fbo = None
        self._fbo_parts: list = []
        self._fbo_size = (0, 0)
        self.renderer_name = str(self._ctx.info.get("GL_RENDERER", "unknown"))

    # ------------------------------------------------------------ content

    @_current
    def add_texture(self, name: str, rgb: np.ndarray) -> None:
        """Upload an (H, W, 3) uint8 RGB texture: its top row at v = 1, repeated, nearest texel (as TinyRenderer)."""
        import moderngl

        img = np.asarray(rgb, dtype=np.uint8)
        if img.ndim != 3 or img.shape[2] != 3 or img.shape[0] < 1 or img.shape[1] < 1:
            raise ValueError(f"texture {name!r} must be HxWx3 uint8, got shape {img.shape}")
        img = np.ascontiguousarray(img[::-1])  # OpenGL's first row is v = 0, the image's bottom
        tex = self._ctx.texture((img.shape[1], img.shape[0]), 3, img.tobytes())
        if self.texture_filter == "trilinear":
            tex.build_mipmaps()
            tex.filter = (moderngl.LINEAR_MIPMAP_LINEAR, moderngl.LINEAR)
            tex.anisotropy = 8.0
        else:
            tex.filter = (moderngl.NEAREST, moderngl.NEAREST)
        tex.repeat_x = tex.repeat_y = True
        self._textures[name] = tex

    def add_texture_file(self, name: str, path: str | Path) -> None:
        """Upload a PNG/JPEG texture file."""
        import cv2

        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"cannot read texture {name!r} from {path}")
        self.add_texture(name, bgr[..., ::-1])

    @_current
    def add_mesh(self, mesh: Mesh, texture: str | None, rgba: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0),
                 seg_id: int | None = None) -> int:
        """Add one body drawing ``mesh`` with ``texture`` (a name given to :meth:`add_texture`) -> its id.

        ``texture`` None draws the plain ``rgba`` colour. The segmentation shows ``seg_id`` (by default the
        new body's own id) where the body is seen: the parts of one rover share the first part's id.
        """
        if texture is not None and texture not in self._textures:
            raise ValueError(f"unknown texture {texture!r}; known: {sorted(self._textures)}")
        if mesh.n_triangles == 0:
            raise ValueError("a body needs a mesh with at least one triangle")
        data = np.hstack([mesh.vertices, mesh.normals, mesh.uvs]).astype(np.float32)
        vbo = self._ctx.buffer(data.tobytes())
        ibo = self._ctx.buffer(np.asarray(mesh.indices, dtype=np.int32).tobytes())
        vao = self._ctx.vertex_array(self._prog, [(vbo, "3f 3f 2f", "in_pos", "in_normal", "in_uv")],
                                     index_buffer=ibo, index_element_size=4)
        body = len(self._bodies)
        self._bodies.append(_Body(vao, [vbo, ibo], texture, body if seg_id is None else int(seg_id),
                                  tuple(float(c) for c in rgba)))
        return body

    @property
    def n_bodies(self) -> int:
        """Bodies added so far."""
        return len(self._bodies)

    def set_visible(self, body: int, visible: bool) -> None:
        """Show or hide a body."""
        self._bodies[body].visible = bool(visible)

    def set_color(self, body: int, rgba: tuple[float, ...]) -> None:
        """Set a body's colour (multiplies its texture); alpha 0 hides it."""
        self._bodies[body].rgba = tuple(float(c) for c in rgba)

    def set_model(self, body: int, model: np.ndarray) -> None:
        """Set a body's 4x4 world_from_body matrix."""
        self._bodies[body].model = np.asarray(model, dtype=np.float64).reshape(4, 4)

    # ------------------------------------------------------------ drawing

    def _framebuffer(self, width: int, height: int) -> object:
        if self._fbo_size != (width, height):
            self._release_framebuffer()
            color = self._ctx.renderbuffer((width, height), 4)
            aux = self._ctx.renderbuffer((width, height), 2, dtype="f4")
            depth = self._ctx.depth_renderbuffer((width, height))
            self._fbo = self._ctx.framebuffer(color_attachments=[color, aux], depth_attachment=depth)
            self._fbo_parts = [color, aux, depth]
            self._fbo_size = (width, height)
        return self._fbo

    def _release_framebuffer(self) -> None:
        if self._fbo is not None:
            self._fbo.release()
            for part in self._fbo_parts:
                part.release()
            self._fbo, self._fbo_parts, self._fbo_size = None, [], (0, 0)

    @_current
    def draw(self, view: np.ndarray, proj: np.ndarray, width: int, height: int,
             light_direction: tuple[float, float, float], light_color: tuple[float, float, float],
             ambient: float, diffuse: float, specular: float,
             hidden: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Render -> (rgb uint8 HxWx3, z-depth float32 HxW with +inf where nothing was hit, body id int32, -1 sky).

        ``view`` and ``proj`` are OpenGL 4x4 matrices (those of :mod:`projection`, whose pixel (u, v) is the
        ROS pinhole pixel); ``hidden`` lists bodies left out of this frame.
        """
        import moderngl

        ctx = self._ctx
        fbo = self._framebuffer(int(width), int(height))
        fbo.use()
        fbo.clear(0.0, 0.0, 0.0, 0.0, depth=1.0)
        # TinyRenderer draws one-sided triangles (counter-clockwise = front); the y flip below mirrors the
        # image, which turns a front face clockwise on screen
        ctx.enable(moderngl.DEPTH_TEST | moderngl.CULL_FACE)
        ctx.front_face = "cw"
        ctx.cull_face = "back"
        view = np.asarray(view, dtype=np.float64)
        # TinyRenderer's projection (projection.pinhole_projection) samples column i at NDC 2i/w - 1 and returns
        # rows flipped; OpenGL samples pixel centres at NDC (2i + 1)/w - 1 with row 0 at the bottom: shift by half a
        # pixel in x and flip y, so both produce the same image for the same matrices.
        fix = np.eye(4)
        fix[0, 3] = 1.0 / width
        fix[1, 1] = -1.0
        fix[1, 3] = -1.0 / height
        viewproj = fix @ np.asarray(proj, dtype=np.float64) @ view
        cam_from_world = np.linalg.inv(view)
        eye = cam_from_world[:3, 3]
        forward = -cam_from_world[:3, 2]
        light = np.asarray(light_direction, dtype=np.float64)
        light = light / max(np.linalg.norm(light), 1e-12)
        prog = self._prog
        prog["light_dir"].value = tuple(light)
        prog["light_color"].value = tuple(float(c) for c in light_color)
        prog["coeffs"].value = (float(ambient), float(diffuse), float(specular))
        prog["eye"].value = tuple(eye)
        prog["forward"].value = tuple(forward)
        hidden_set = set(hidden)
        bound = None
        world_mvp = viewproj.T.astype(np.float32).tobytes()  # world geometry: model = identity, one matrix a frame
        identity = np.eye(4, dtype=np.float32).tobytes()
        posed = False  # whether the last body drawn had a model matrix of its own
        prog["mvp"].write(world_mvp)
        prog["model"].write(identity)
        for i, body in enumerate(self._bodies):
            if not body.visible or i in hidden_set or body.rgba[3] <= 0.0:
                continue
            if body.model is not None:
                prog["mvp"].write((viewproj @ body.model).T.astype(np.float32).tobytes())
                prog["model"].write(body.model.T.astype(np.float32).tobytes())
                posed = True
            elif posed:
                prog["mvp"].write(world_mvp)
                prog["model"].write(identity)
                posed = False
            prog["rgba"].value = body.rgba
            prog["body_id"].value = float(body.seg_id)
            prog["textured"].value = body.texture is not None
            if body.texture is not None and body.texture != bound:
                self._textures[body.texture].use(0)
                bound = body.texture
            body.vao.render(moderngl.TRIANGLES)
        w, h = int(width), int(height)
        rgba = np.frombuffer(fbo.read(components=4, attachment=0), dtype=np.uint8).reshape(h, w, 4)
        aux = np.frombuffer(fbo.read(components=2, attachment=1, dtype="f4"), dtype=np.float32).reshape(h, w, 2)
        # OpenGL rows start at the bottom; the flip in ``fix`` drew the image upside down, so rows come out top first
        rgb = rgba[..., :3].copy()
        seg = aux[..., 1].astype(np.int32) - 1
        depth = aux[..., 0].copy()
        depth[seg < 0] = np.inf
        return rgb, depth, seg

    def close(self) -> None:
        """Release the context and everything in it; safe to call twice."""
        ctx = getattr(self, "_ctx", None)
        if ctx is not None:
            with ctx:
                for body in self._bodies:
                    body.vao.release()
                    for buf in body.buffers:
                        buf.release()
                for tex in self._textures.values():
                    tex.release()
                self._release_framebuffer()
            ctx.release()
            self._ctx = None
            self._bodies.clear()
            self._textures.clear()
