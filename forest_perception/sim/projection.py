"""Camera projection for the PyBullet renderer: ROS pinhole intrinsics as OpenGL matrices, z-buffer to depth.

Pixel (u, v) of a rendered image sees exactly the ray through ((u - cx) / fx, (v - cy) / fy) in the
optical frame; camera poses are world_from_camera_link with REP 103 body axes. Details:
docs/simulator.md (`scene`).
"""

from __future__ import annotations

import numpy as np

from forest_perception.frames import CameraIntrinsics
from forest_perception.geo import rot_x, rot_y, rot_z


def camera_rotation(yaw: float, pitch: float = 0.0, roll: float = 0.0) -> np.ndarray:
    """world_from_camera_link for a camera with REP 103 yaw (about z), pitch (about y, + looks down), roll."""
    return rot_z(yaw) @ rot_y(pitch) @ rot_x(roll)


def view_matrix(position: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """4x4 OpenGL view matrix (camera looks down -Z, Y up) from a camera_link pose (REP 103)."""
    pos = np.asarray(position, dtype=np.float64).reshape(3)
    rot = np.asarray(rotation, dtype=np.float64).reshape(3, 3)
    # OpenGL camera axes in world: X = right = -y_link, Y = up = z_link, Z = backward = -x_link
    world_from_gl = np.column_stack([-rot[:, 1], rot[:, 2], -rot[:, 0]])
    view = np.eye(4)
    view[:3, :3] = world_from_gl.T
    view[:3, 3] = -world_from_gl.T @ pos
    return view


def projection_matrix(intrinsics: CameraIntrinsics, near: float, far: float) -> np.ndarray:
    """4x4 OpenGL projection whose pixel (u, v) is the ROS pinhole pixel (u, v) of ``intrinsics``.

    Same frustum as ``computeProjectionMatrixFOV(vfov, width/height)`` up to the
    sub-pixel alignment described in :func:`pinhole_projection`.
    """
    return pinhole_projection(intrinsics.fx, intrinsics.fy, intrinsics.cx, intrinsics.cy, intrinsics.width,
                              intrinsics.height, near, far)


def pinhole_projection(fx: float, fy: float, cx: float, cy: float, width: int, height: int,
                       near: float, far: float) -> np.ndarray:
    """4x4 OpenGL projection for TinyRenderer from pinhole intrinsics (ROS pixel-centre convention).

    TinyRenderer evaluates pixel column i at viewport x = i (not i + 0.5) and returns
    rows flipped, so the matrix is shifted so that column i and row j see exactly the
    ray through ((i - cx) / fx, (j - cy) / fy).
    """
    proj = np.zeros((4, 4))
    proj[0, 0] = 2.0 * fx / width
    proj[1, 1] = 2.0 * fy / height
    # column i is sampled at NDC x = 2 i / w - 1; it must see x_opt / z = (i - cx) / fx
    proj[0, 2] = 1.0 - 2.0 * cx / width
    # output row j is viewport row (h - 1 - j), sampled at NDC y = 2 (h - 1 - j) / h - 1
    proj[1, 2] = 2.0 * (cy + 1.0) / height - 1.0
    proj[2, 2] = -(far + near) / (far - near)
    proj[2, 3] = -2.0 * far * near / (far - near)
    proj[3, 2] = -1.0
    return proj


def zbuffer_to_depth(zbuf: np.ndarray, near: float, far: float) -> np.ndarray:
    """TinyRenderer z-buffer in [0, 1] -> metric z-depth (float32)."""
    z = np.asarray(zbuf, dtype=np.float64)
    return (far * near / (far - (far - near) * z)).astype(np.float32)


def pixel_rays_optical(intrinsics: CameraIntrinsics) -> np.ndarray:
    """(H, W, 2) float32 (x/z, y/z) of every pixel's ray in the optical frame."""
    u = (np.arange(intrinsics.width, dtype=np.float32) - np.float32(intrinsics.cx)) / np.float32(intrinsics.fx)
    v = (np.arange(intrinsics.height, dtype=np.float32) - np.float32(intrinsics.cy)) / np.float32(intrinsics.fy)
    out = np.empty((intrinsics.height, intrinsics.width, 2), dtype=np.float32)
    out[..., 0] = u[None, :]
    out[..., 1] = v[:, None]
    return out


def depth_to_world(depth: np.ndarray, intrinsics: CameraIntrinsics, position: np.ndarray,
                   rotation: np.ndarray) -> np.ndarray:
    """(H, W, 3) float32 world points of a z-depth image (non-finite depth gives non-finite points)."""
    rays = pixel_rays_optical(intrinsics)
    z = np.asarray(depth, dtype=np.float32)
    # optical (x right, y down, z forward) -> camera_link (x forward, y left, z up)
    with np.errstate(invalid="ignore"):  # inf depth (sky) times a zero ray component
        link = np.stack([z, -rays[..., 0] * z, -rays[..., 1] * z], axis=-1)
        return link @ np.asarray(rotation, dtype=np.float32).T + np.asarray(position, dtype=np.float32)
