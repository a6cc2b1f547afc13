"""Kinematic differential-drive rover on a heightfield, with IMU-grade derivatives.

Details: docs/simulator.md (`rover`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from forest_perception.frames import RoverGeometry
from forest_perception.geo import (
    quaternion_from_rpy,
    rot_y,
    rotation_from_rpy,
    rotation_log,
    transform_matrix,
    wrap_angle,
)
from forest_perception.sim.terrain import Terrain

GRAVITY = 9.80665  # m/s^2, standard gravity


def _vec3() -> np.ndarray:
    return np.zeros(3)


def _vec2() -> np.ndarray:
    return np.zeros(2)


@dataclass
class RoverState:
    """Ground-truth state of the rover at time ``t`` (seconds).

    Pose of ``base_link`` in the ENU world (metres, radians); ``v`` (m/s along the ground)
    and ``w`` (rad/s, heading rate) are the true body velocities (after slip);
    ``wheel_position``/``wheel_velocity`` are (left, right) wheel joint angles (rad) and
    rates (rad/s); ``linear_acceleration`` is the body-frame specific force (m/s^2,
    gravity included, +g on z at rest) and ``angular_velocity`` the body-frame rate (rad/s);
    ``collided`` is True on a step whose motion was refused.
    """

    t: float = 0.0
    x: float = 0.0
    y: float = 0.0
    z: float = 0.0
    roll: float = 0.0
    pitch: float = 0.0
    yaw: float = 0.0
    v: float = 0.0
    w: float = 0.0
    wheel_position: np.ndarray = field(default_factory=_vec2)
    wheel_velocity: np.ndarray = field(default_factory=_vec2)
    linear_acceleration: np.ndarray = field(default_factory=_vec3)
    angular_velocity: np.ndarray = field(default_factory=_vec3)
    collided: bool = False

    @property
    def position(self) -> np.ndarray:
        """(x, y, z) of ``base_link`` in the world."""
        return np.array([self.x, self.y, self.z])

    def rotation(self) -> np.ndarray:
        """3x3 world_from_base rotation."""
        return rotation_from_rpy(self.roll, self.pitch, self.yaw)

    def quaternion_xyzw(self) -> np.ndarray:
        """Orientation of ``base_link`` in the world as a quaternion (x, y, z, w)."""
        return quaternion_from_rpy(self.roll, self.pitch, self.yaw)

    def copy(self) -> RoverState:
        """Deep copy (the arrays are copied too)."""
        return replace(
            self,
            wheel_position=self.wheel_position.copy(),
            wheel_velocity=self.wheel_velocity.copy(),
            linear_acceleration=self.linear_acceleration.copy(),
            angular_velocity=self.angular_velocity.copy(),
        )


def _check_positive(name: str, value: float, allow_zero: bool = False) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return value


def validate_obstacles(obstacles: np.ndarray | None) -> np.ndarray:
    """Return obstacles as a float (N, 3) array of (x, y, radius); ``ValueError`` naming ``obstacles``."""
    if obstacles is None:
        return np.zeros((0, 3))
    obs = np.asarray(obstacles, dtype=np.float64)
    if obs.size == 0:
        return np.zeros((0, 3))
    if obs.ndim != 2 or obs.shape[1] != 3:
        raise ValueError(f"obstacles must be an (N, 3) array of (x, y, radius), got shape {obs.shape}")
    if not np.all(np.isfinite(obs)):
        raise ValueError("obstacles must be finite")
    if np.any(obs[:, 2] < 0):
        raise ValueError(f"obstacles radii must be >= 0, got min {obs[:, 2].min()}")
    return obs


def validate_bounds(bounds: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    """Return (xmin, xmax, ymin, ymax) as floats; ``ValueError`` naming ``bounds`` if empty or not finite."""
    if len(bounds) != 4:
        raise ValueError(f"bounds must be (xmin, xmax, ymin, ymax), got {bounds!r}")
    xmin, xmax, ymin, ymax = (float(b) for b in bounds)
    if not all(math.isfinite(b) for b in (xmin, xmax, ymin, ymax)) or xmin >= xmax or ymin >= ymax:
        raise ValueError(f"bounds must be finite with xmin < xmax and ymin < ymax, got {bounds!r}")
    return xmin, xmax, ymin, ymax


class DiffDriveRover:
    """Differential-drive rover kinematics on ``terrain`` among circular ``obstacles``.

    ``command(v, w)`` sets the target body velocities (clamped to the geometry's limits);
    ``step(dt)`` ramps toward them under acceleration limits and advances the state.
    ``slip_std`` > 0 adds wheel slip: each wheel's ground speed is its rim speed times
    ``1 - s`` with ``s`` a Gauss-Markov process (std ``slip_std``, correlation time
    ``slip_tau_s``) drawn from ``rng``; wheel angles still integrate the rim speeds.
    """

    def __init__(
        self,
        geometry: RoverGeometry,
        terrain: Terrain,
        obstacles: np.ndarray | None = None,
        start: tuple[float, float, float] = (0.0, 0.0, 0.0),
        *,
        bounds: tuple[float, float, float, float] | None = None,
        max_linear_accel: float = 1.0,
        max_angular_accel: float = 4.0,
        slip_std: float = 0.0,
        slip_tau_s: float = 0.5,
        suspension_hz: float = 5.0,
        rng: np.random.Generator | None = None,
    ) -> None:
        self.geometry = geometry
        self.terrain = terrain
        self.obstacles = validate_obstacles(obstacles)
        self.bounds = validate_bounds(bounds if bounds is not None else terrain.extent)
        self.max_linear_accel = _check_positive("max_linear_accel", max_linear_accel)
        self.max_angular_accel = _check_positive("max_angular_accel", max_angular_accel)
        self.slip_std = _check_positive("slip_std", slip_std, allow_zero=True)
        if self.slip_std >= 0.5:
            raise ValueError(f"slip_std must be < 0.5 (fraction of wheel speed), got {slip_std}")
        self.slip_tau_s = _check_positive("slip_tau_s", slip_tau_s)
        self.suspension_hz = _check_positive("suspension_hz", suspension_hz)
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self.radius = geometry.footprint_radius_m
        self.collisions = 0
        # ground probes: centre and the four wheel contacts (forward u, left s offsets)
        hl, hw = 0.5 * geometry.body_length_m, 0.5 * geometry.track_width_m
        self._probes = ((0.0, 0.0), (hl, hw), (hl, -hw), (-hl, hw), (-hl, -hw))
        self._probe_uu = 4.0 * hl * hl
        self._probe_ss = 4.0 * hw * hw
        # obstacles near the rover, refreshed when it has moved half the cache margin
        self._near_centre = (math.inf, math.inf)
        self._near = self.obstacles
        self._near_margin = 2.0
        self.reset(start)

    # ------------------------------------------------------------------ set-up
    def reset(self, start: tuple[float, float, float]) -> RoverState:
        """Place the rover at rest at ``start = (x, y, yaw)``; ``ValueError`` naming ``start`` if not free."""
        if len(start) != 3 or not all(math.isfinite(float(s)) for s in start):
            raise ValueError(f"start must be a finite (x, y, yaw), got {start!r}")
        x, y, yaw = (float(s) for s in start)
        if not self.is_free(x, y):
            raise ValueError(
                f"start {start!r} puts the footprint (radius {self.radius:.3f} m) on an obstacle "
                f"or outside bounds {self.bounds}"
            )
        yaw = wrap_angle(yaw)
        roll, pitch, z = self._terrain_pose(x, y, yaw)
        self._zdot = 0.0
        self._v_drive = 0.0
        self._w_drive = 0.0
        self._v_cmd = 0.0
        self._w_cmd = 0.0
        self._v_h = 0.0
        self._slip = np.zeros(2)
        R = rotation_from_rpy(roll, pitch, yaw)
        self.state = RoverState(
            t=0.0,
            x=x,
            y=y,
            z=z,
            roll=roll,
            pitch=pitch,
            yaw=yaw,
            linear_acceleration=R.T @ np.array([0.0, 0.0, GRAVITY]),
        )
        return self.state

    def is_free(self, x: float, y: float, from_xy: tuple[float, float] | None = None) -> bool:
        """True if the footprint circle at (x, y) is inside bounds and touches no obstacle.

        With ``from_xy`` the whole straight sweep from there to (x, y) must be free, so that
        a long step cannot jump over a thin obstacle.
        """
        xmin, xmax, ymin, ymax = self.bounds
        r = self.radius
        if x - r < xmin or x + r > xmax or y - r < ymin or y + r > ymax:
            return False  # the box is convex: a free end point means a free sweep
        if len(self.obstacles) == 0:
            return True
        x0, y0 = (x, y) if from_xy is None else from_xy
        sweep = math.hypot(x - x0, y - y0)
        if sweep > 0.5 * self._near_margin:
            obs = self.obstacles
        else:
            cx, cy = self._near_centre
            if math.hypot(x - cx, y - cy) > 0.5 * self._near_margin:
                reach = self._near_margin + r + float(self.obstacles[:, 2].max())
                d2 = (self.obstacles[:, 0] - x) ** 2 + (self.obstacles[:, 1] - y) ** 2
                self._near = self.obstacles[d2 < reach * reach]
                self._near_centre = (x, y)
            obs = self._near
        if len(obs) == 0:
            return True
        px, py = obs[:, 0] - x, obs[:, 1] - y
        if sweep > 0:
            # closest point of the segment end -> start to each obstacle centre
            ux, uy = (x0 - x) / sweep, (y0 - y) / sweep
            along = np.clip(px * ux + py * uy, 0.0, sweep)
            px, py = px - along * ux, py - along * uy
        return bool(np.all(px * px + py * py >= (obs[:, 2] + r) ** 2))

    def _ground_height(self, x: float, y: float) -> float:
        """Scalar ``terrain.height_at`` (same bilinear interpolation and edge clamping), without numpy overhead."""
        t = self.terrain
        h = t.heights
        ny, nx = h.shape
        u = min(max((x - t.x0) / t.resolution, 0.0), nx - 1 - 1e-9)
        v = min(max((y - t.y0) / t.resolution, 0.0), ny - 1 - 1e-9)
        i, j = int(u), int(v)
        fu, fv = u - i, v - j
        return (h.item(j, i) * (1 - fu) + h.item(j, i + 1) * fu) * (1 - fv) + (
            h.item(j + 1, i) * (1 - fu) + h.item(j + 1, i + 1) * fu
        ) * fv

    def _terrain_pose(self, x: float, y: float, yaw: float) -> tuple[float, float, float]:
        """(roll, pitch, z of base_link) from a plane fitted under the wheels at (x, y, yaw)."""
        g = self.geometry
        c, sn = math.cos(yaw), math.sin(yaw)
        a = b = cl = 0.0
        for u, s in self._probes:
            h = self._ground_height(x + c * u - sn * s, y + sn * u + c * s)
            a += h
            b += h * u
            cl += h * s
        a /= len(self._probes)
        b /= self._probe_uu  # dz per metre forward (least squares over symmetric probes)
        cl /= self._probe_ss  # dz per metre to the left
        pitch = -math.atan(b)  # REP 103: nose up is negative pitch
        roll = math.atan2(cl, math.sqrt(1.0 + b * b))
        # base_link is one wheel radius from the ground plane along its normal
        z = a + g.wheel_radius_m * math.sqrt(1.0 + b * b + cl * cl)
        return roll, pitch, z

    # ---------------------------------------------------------------- driving
    def command(self, v: float, w: float) -> tuple[float, float]:
        """Set target speed ``v`` (m/s) and turn rate ``w`` (rad/s); returns them after clamping."""
        v = float(v)
        w = float(w)
        if not (math.isfinite(v) and math.isfinite(w)):
            raise ValueError(f"command(v, w) must be finite, got v={v!r}, w={w!r}")
        g = self.geometry
        self._v_cmd = max(-g.max_linear_mps, min(g.max_linear_mps, v))
        self._w_cmd = max(-g.max_angular_rps, min(g.max_angular_rps, w))
        return self._v_cmd, self._w_cmd

    def step(self, dt: float) -> RoverState:
        """Advance the simulation by ``dt`` seconds and return the new state."""
        dt = float(dt)
        if not math.isfinite(dt) or dt <= 0 or dt > 1.0:
            raise ValueError(f"dt must be within (0, 1] s, got {dt!r}")
        g = self.geometry
        st = self.state
        half_track = 0.5 * g.track_width_m

        # 1. ramp the drive velocities toward the command under acceleration limits
        v0, w0 = self._v_drive, self._w_drive
        dv = self.max_linear_accel * dt
        dw = self.max_angular_accel * dt
        v1 = v0 + max(-dv, min(dv, self._v_cmd - v0))
        w1 = w0 + max(-dw, min(dw, self._w_cmd - w0))
        v_mid, w_mid = 0.5 * (v0 + v1), 0.5 * (w0 + w1)
        rim = np.array([v_mid - w_mid * half_track, v_mid + w_mid * half_track])  # rim speeds, m/s

        # 2. wheel slip: ground speed = rim speed * (1 - s)
        if self.slip_std > 0:
            phi = math.exp(-dt / self.slip_tau_s)
            self._slip = phi * self._slip + math.sqrt(1 - phi * phi) * self.slip_std * self.rng.standard_normal(2)
            ground = rim * (1.0 - np.clip(self._slip, -0.5, 0.5))
        else:
            ground = rim
        v_body = 0.5 * float(ground[0] + ground[1])
        w_body = float(ground[1] - ground[0]) / g.track_width_m

        # 3. horizontal motion: exact arc at the mean rates over the step
        v_h = v_body * math.cos(st.pitch)
        dpsi = w_body * dt
        if abs(dpsi) > 1e-9:
            rad = v_h / w_body
            dx = rad * (math.sin(st.yaw + dpsi) - math.sin(st.yaw))
            dy = -rad * (math.cos(st.yaw + dpsi) - math.cos(st.yaw))
        else:
            dx = v_h * dt * math.cos(st.yaw)
            dy = v_h * dt * math.sin(st.yaw)
        x1, y1 = st.x + dx, st.y + dy
        collided = (dx != 0.0 or dy != 0.0) and not self.is_free(x1, y1, from_xy=(st.x, st.y))
        if collided:  # refuse the motion: the rover stops where it is, wheels stalled
            x1, y1, dpsi = st.x, st.y, 0.0
            v1 = w1 = v_body = w_body = v_h = 0.0
            rim = np.zeros(2)
            self._v_cmd = self._w_cmd = 0.0
            self.collisions += 1
        yaw1 = wrap_angle(st.yaw + dpsi)

        # 4. terrain following: attitude from the ground plane, height through the suspension
        roll1, pitch1, z_target = self._terrain_pose(x1, y1, yaw1)
        wn = 2.0 * math.pi * self.suspension_hz
        e0, ed0 = st.z - z_target, self._zdot
        c2 = ed0 + wn * e0
        decay = math.exp(-wn * dt)
        e1 = (e0 + c2 * dt) * decay
        zdot1 = (c2 - wn * (e0 + c2 * dt)) * decay
        z1 = z_target + e1
        az = (zdot1 - self._zdot) / dt

        # 5. world acceleration -> body specific force; attitude change -> body rate
        rim_end = np.array([v1 - w1 * half_track, v1 + w1 * half_track])
        ground_end = rim_end * (1.0 - np.clip(self._slip, -0.5, 0.5)) if self.slip_std > 0 else rim_end
        v_end = 0.5 * float(ground_end[0] + ground_end[1])
        w_end = float(ground_end[1] - ground_end[0]) / g.track_width_m
        v_h1 = v_end * math.cos(pitch1)
        along = (v_h1 - self._v_h) / dt
        centripetal = v_h * w_body
        c, s = math.cos(yaw1), math.sin(yaw1)
        a_world = np.array([along * c - centripetal * s, along * s + centripetal * c, az + GRAVITY])
        R0 = st.rotation()
        R1 = rotation_from_rpy(roll1, pitch1, yaw1)
        f_body = R1.T @ a_world
        omega = rotation_log(R0.T @ R1) / dt

        self._v_drive, self._w_drive = v1, w1
        self._zdot = zdot1
        self._v_h = v_h1
        self.state = RoverState(
            t=st.t + dt,
            x=x1,
            y=y1,
            z=z1,
            roll=roll1,
            pitch=pitch1,
            yaw=yaw1,
            v=v_end,
            w=w_end,
            wheel_position=st.wheel_position + rim * dt / g.wheel_radius_m,
            wheel_velocity=rim_end / g.wheel_radius_m,
            linear_acceleration=f_body,
            angular_velocity=omega,
            collided=bool(collided),
        )
        return self.state

    # ---------------------------------------------------------------- frames
    def world_from_base(self) -> np.ndarray:
        """4x4 homogeneous transform world_from_base_link of the current state."""
        return transform_matrix(self.state.rotation(), self.state.position)

    def quaternion_xyzw(self) -> np.ndarray:
        """Current orientation of ``base_link`` in the world, quaternion (x, y, z, w)."""
        return self.state.quaternion_xyzw()

    def point_in_world(self, offset_base: tuple[float, float, float] | np.ndarray) -> np.ndarray:
        """World position of a point given in ``base_link`` (e.g. the IMU or GPS antenna offset)."""
        return self.state.position + self.state.rotation() @ np.asarray(offset_base, dtype=np.float64)

    def camera_pose(self) -> tuple[np.ndarray, np.ndarray]:
        """(position (3,), rotation 3x3 world_from_camera_link); camera_link is x forward, z up.

        A positive ``geometry.camera_pitch_rad`` tilts the camera down (REP 103 pitch).
        """
        R = self.state.rotation()
        position = self.state.position + R @ np.asarray(self.geometry.camera_offset_m, dtype=np.float64)
        return position, R @ rot_y(self.geometry.camera_pitch_rad)
