"""Geodesy and rotation helpers (WGS84 <-> ENU, quaternions, Euler angles) shared by every layer.

Conventions: ENU world frame (REP 103), quaternions in ROS order ``(x, y, z, w)``,
Euler angles as ROS/tf use them: ``R = Rz(yaw) @ Ry(pitch) @ Rx(roll)`` (fixed-axis
roll, then pitch, then yaw). WGS84 conversions use pymap3d; heights are ellipsoidal.
"""

from __future__ import annotations

import math

import numpy as np
import pymap3d

ArrayLike = float | np.ndarray


def validate_lat_lon(lat_deg: float, lon_deg: float, prefix: str = "") -> None:
    """Raise ``ValueError`` naming ``<prefix>lat``/``<prefix>lon`` if out of range or not finite."""
    lat = float(lat_deg)
    lon = float(lon_deg)
    if not (math.isfinite(lat) and -90.0 <= lat <= 90.0):
        raise ValueError(f"{prefix}lat must be a finite latitude within [-90, 90] degrees, got {lat_deg!r}")
    if not (math.isfinite(lon) and -180.0 <= lon <= 180.0):
        raise ValueError(f"{prefix}lon must be a finite longitude within [-180, 180] degrees, got {lon_deg!r}")


def enu_to_geodetic(
    e: ArrayLike, n: ArrayLike, u: ArrayLike, lat0: float, lon0: float, alt0: float
) -> tuple[ArrayLike, ArrayLike, ArrayLike]:
    """ENU metres about the datum ``(lat0, lon0, alt0)`` to WGS84 (degrees, ellipsoidal metres)."""
    validate_lat_lon(lat0, lon0, prefix="datum_")
    lat, lon, alt = pymap3d.enu2geodetic(e, n, u, lat0, lon0, alt0, deg=True)
    if np.ndim(lat) == 0:
        return float(lat), float(lon), float(alt)
    return np.asarray(lat), np.asarray(lon), np.asarray(alt)


def geodetic_to_enu(
    lat: ArrayLike, lon: ArrayLike, alt: ArrayLike, lat0: float, lon0: float, alt0: float
) -> tuple[ArrayLike, ArrayLike, ArrayLike]:
    """WGS84 (degrees, ellipsoidal metres) to ENU metres about the datum ``(lat0, lon0, alt0)``."""
    validate_lat_lon(lat0, lon0, prefix="datum_")
    e, n, u = pymap3d.geodetic2enu(lat, lon, alt, lat0, lon0, alt0, deg=True)
    if np.ndim(e) == 0:
        return float(e), float(n), float(u)
    return np.asarray(e), np.asarray(n), np.asarray(u)


def wrap_angle(a: float) -> float:
    """Wrap an angle to ``[-pi, pi)``."""
    return (a + math.pi) % (2.0 * math.pi) - math.pi


def rot_x(a: float) -> np.ndarray:
    """Rotation by ``a`` radians about x."""
    c, s = math.cos(a), math.sin(a)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def rot_y(a: float) -> np.ndarray:
    """Rotation by ``a`` radians about y (positive pitch turns x toward -z: nose down)."""
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def rot_z(a: float) -> np.ndarray:
    """Rotation by ``a`` radians about z."""
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def rotation_from_rpy(roll: float, pitch: float, yaw: float) -> np.ndarray:
    """``Rz(yaw) @ Ry(pitch) @ Rx(roll)``: maps body vectors into the world frame."""
    cr, sr = math.cos(roll), math.sin(roll)
    cp, sp = math.cos(pitch), math.sin(pitch)
    cy, sy = math.cos(yaw), math.sin(yaw)
    return np.array(
        [
            [cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr],
            [sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr],
            [-sp, cp * sr, cp * cr],
        ]
    )


def rpy_from_rotation(R: np.ndarray) -> tuple[float, float, float]:
    """Inverse of :func:`rotation_from_rpy`; pitch in ``[-pi/2, pi/2]``."""
    R = np.asarray(R, dtype=np.float64)
    if R.shape != (3, 3):
        raise ValueError(f"R must be a 3x3 rotation matrix, got shape {R.shape}")
    pitch = math.asin(max(-1.0, min(1.0, -R[2, 0])))
    if abs(R[2, 0]) < 1.0 - 1e-12:
        roll = math.atan2(R[2, 1], R[2, 2])
        yaw = math.atan2(R[1, 0], R[0, 0])
    else:  # gimbal lock: put everything into yaw
        roll = 0.0
        yaw = math.atan2(-R[0, 1], R[1, 1])
    return roll, pitch, yaw


def quaternion_from_rpy(roll: float, pitch: float, yaw: float) -> np.ndarray:
    """Unit quaternion ``(x, y, z, w)`` of :func:`rotation_from_rpy` (same as tf's ``setRPY``)."""
    cr, sr = math.cos(roll / 2), math.sin(roll / 2)
    cp, sp = math.cos(pitch / 2), math.sin(pitch / 2)
    cy, sy = math.cos(yaw / 2), math.sin(yaw / 2)
    return np.array(
        [
            sr * cp * cy - cr * sp * sy,
            cr * sp * cy + sr * cp * sy,
            cr * cp * sy - sr * sp * cy,
            cr * cp * cy + sr * sp * sy,
        ]
    )


def _as_quaternion(q: np.ndarray) -> np.ndarray:
    q = np.asarray(q, dtype=np.float64)
    if q.shape != (4,):
        raise ValueError(f"q must be a quaternion (x, y, z, w) of shape (4,), got shape {q.shape}")
    norm = float(np.linalg.norm(q))
    if not math.isfinite(norm) or norm < 1e-12:
        raise ValueError(f"q must be a non-zero finite quaternion, got {q.tolist()}")
    return q / norm


def rotation_from_quaternion(q: np.ndarray) -> np.ndarray:
    """3x3 rotation matrix of a quaternion ``(x, y, z, w)`` (normalised first)."""
    x, y, z, w = _as_quaternion(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def quaternion_from_rotation(R: np.ndarray) -> np.ndarray:
    """Unit quaternion ``(x, y, z, w)`` with ``w >= 0`` of a 3x3 rotation matrix (Shepperd's method)."""
    R = np.asarray(R, dtype=np.float64)
    if R.shape != (3, 3):
        raise ValueError(f"R must be a 3x3 rotation matrix, got shape {R.shape}")
    tr = R[0, 0] + R[1, 1] + R[2, 2]
    if tr > 0:
        s = 2.0 * math.sqrt(tr + 1.0)
        q = np.array([(R[2, 1] - R[1, 2]) / s, (R[0, 2] - R[2, 0]) / s, (R[1, 0] - R[0, 1]) / s, 0.25 * s])
    elif R[0, 0] > R[1, 1] and R[0, 0] > R[2, 2]:
        s = 2.0 * math.sqrt(1.0 + R[0, 0] - R[1, 1] - R[2, 2])
        q = np.array([0.25 * s, (R[0, 1] + R[1, 0]) / s, (R[0, 2] + R[2, 0]) / s, (R[2, 1] - R[1, 2]) / s])
    elif R[1, 1] > R[2, 2]:
        s = 2.0 * math.sqrt(1.0 + R[1, 1] - R[0, 0] - R[2, 2])
        q = np.array([(R[0, 1] + R[1, 0]) / s, 0.25 * s, (R[1, 2] + R[2, 1]) / s, (R[0, 2] - R[2, 0]) / s])
    else:
        s = 2.0 * math.sqrt(1.0 + R[2, 2] - R[0, 0] - R[1, 1])
        q = np.array([(R[0, 2] + R[2, 0]) / s, (R[1, 2] + R[2, 1]) / s, 0.25 * s, (R[1, 0] - R[0, 1]) / s])
    q /= np.linalg.norm(q)
    return -q if q[3] < 0 else q


def rpy_from_quaternion(q: np.ndarray) -> tuple[float, float, float]:
    """(roll, pitch, yaw) of a quaternion ``(x, y, z, w)``."""
    return rpy_from_rotation(rotation_from_quaternion(q))


def yaw_from_quaternion(q: np.ndarray) -> float:
    """Heading (yaw about world z, radians in ``[-pi, pi]``) of a quaternion ``(x, y, z, w)``."""
    x, y, z, w = _as_quaternion(q)
    return math.atan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z))


def quaternion_multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product ``a * b`` of quaternions ``(x, y, z, w)`` (rotation ``b`` first, then ``a``)."""
    ax, ay, az, aw = np.asarray(a, dtype=np.float64)
    bx, by, bz, bw = np.asarray(b, dtype=np.float64)
    return np.array(
        [
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
            aw * bw - ax * bx - ay * by - az * bz,
        ]
    )


def skew(v: np.ndarray) -> np.ndarray:
    """Cross-product matrix ``[v]x`` so that ``skew(v) @ u == np.cross(v, u)``."""
    x, y, z = np.asarray(v, dtype=np.float64)
    return np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])


def rotation_exp(rotvec: np.ndarray) -> np.ndarray:
    """Rotation matrix of a rotation vector (axis times angle, radians), by Rodrigues' formula."""
    rv = np.asarray(rotvec, dtype=np.float64)
    theta = float(np.linalg.norm(rv))
    K = skew(rv)
    if theta < 1e-8:
        return np.eye(3) + K + 0.5 * K @ K
    return np.eye(3) + math.sin(theta) / theta * K + (1.0 - math.cos(theta)) / theta**2 * K @ K


def rotation_log(R: np.ndarray) -> np.ndarray:
    """Rotation vector (axis times angle) of a rotation matrix; inverse of :func:`rotation_exp`."""
    R = np.asarray(R, dtype=np.float64)
    cos_theta = max(-1.0, min(1.0, 0.5 * (R[0, 0] + R[1, 1] + R[2, 2] - 1.0)))
    theta = math.acos(cos_theta)
    vee = 0.5 * np.array([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]])
    if theta < 1e-6:
        return vee  # sin(theta)/theta ~ 1
    if math.pi - theta < 1e-6:
        # near a half turn the skew part vanishes: take the axis from the symmetric part
        axis = np.sqrt(np.maximum(0.0, (np.diag(R) + 1.0) / 2.0))
        k = int(np.argmax(axis))
        axis[np.arange(3) != k] = (R[k, np.arange(3) != k] + R[np.arange(3) != k, k]) / (4.0 * axis[k])
        return theta * axis / np.linalg.norm(axis)
    return theta / math.sin(theta) * vee


def transform_matrix(R: np.ndarray, p: np.ndarray) -> np.ndarray:
    """4x4 homogeneous transform from a 3x3 rotation and a translation."""
    T = np.eye(4)
    T[:3, :3] = R
    T[:3, 3] = np.asarray(p, dtype=np.float64).reshape(3)
    return T
