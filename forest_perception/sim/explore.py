"""Rover behaviours for the simulator: autonomous exploration and cmd_vel teleoperation.

Details: docs/simulator.md (`explore`).
"""

from __future__ import annotations

import math

import numpy as np

from forest_perception.frames import RoverGeometry
from forest_perception.geo import wrap_angle
from forest_perception.sim.rover import RoverState, validate_bounds, validate_obstacles


def _positive(name: str, value: float, allow_zero: bool = False) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return value


def range_fan(
    x: float,
    y: float,
    headings: np.ndarray,
    obstacles: np.ndarray,
    bounds: tuple[float, float, float, float] | None,
    inflate_m: float,
    max_range_m: float,
) -> np.ndarray:
    """Free distance along each heading from (x, y) before a circle of the inflated obstacles or bounds.

    Obstacle radii are grown by ``inflate_m`` and the bounds shrunk by it, so the result
    is how far a disc of radius ``inflate_m`` centred at (x, y) can move straight along
    each heading. Rays leaving an inflated circle the point is already inside are free
    of that circle; rays into it are 0. Capped at ``max_range_m``.
    """
    headings = np.asarray(headings, dtype=np.float64)
    cos_h, sin_h = np.cos(headings), np.sin(headings)
    out = np.full(len(headings), float(max_range_m))
    obs = np.asarray(obstacles, dtype=np.float64).reshape(-1, 3)
    if len(obs):
        rx = obs[:, 0] - x
        ry = obs[:, 1] - y
        rad = obs[:, 2] + inflate_m
        dist2 = rx * rx + ry * ry
        near = dist2 < (max_range_m + rad) ** 2
        if near.any():
            rx, ry, rad, dist2 = rx[near], ry[near], rad[near], dist2[near]
            t_ca = np.outer(cos_h, rx) + np.outer(sin_h, ry)  # (n, m) distance to closest approach
            half_chord2 = (rad * rad - dist2)[None, :] + t_ca * t_ca
            hits = (half_chord2 > 0) & (t_ca > 0)
            t_hit = t_ca - np.sqrt(np.maximum(half_chord2, 0.0))
            # already inside an inflated circle: rays into it are blocked at 0, rays out are free
            t_hit[:, dist2 < rad * rad] = 0.0
            t_hit[~hits] = np.inf
            out = np.minimum(out, t_hit.min(axis=1))
    if bounds is not None:
        xmin, xmax, ymin, ymax = bounds
        lo = np.array([xmin + inflate_m, ymin + inflate_m])
        hi = np.array([xmax - inflate_m, ymax - inflate_m])
        p = np.array([x, y])
        dirs = np.stack([cos_h, sin_h], axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            t_wall = np.where(dirs > 1e-12, (hi - p) / dirs, np.where(dirs < -1e-12, (lo - p) / dirs, np.inf))
        out = np.minimum(out, np.maximum(t_wall.min(axis=1), 0.0))
    return out


class ExplorationController:
    """Wander inside ``bounds`` among ``obstacles`` (N, 3: x, y, radius) without hitting them.

    ``command(state) -> (v, w)``; call it every control period (10 Hz is plenty) with the
    rover's state (only ``t``, ``x``, ``y``, ``yaw`` and ``collided`` are used). Statistics
    are kept in ``distance_m``, ``escapes``, ``mode`` and ``visited`` (seconds spent per
    ``cell_size_m`` cell).

    Main knobs: ``sensor_range_m`` and ``n_rays`` (the 360 degree fan), ``safety_margin_m``
    (kept between footprint and obstacles), ``stop_distance_m`` (turn in place below this
    much free space ahead), ``brake_decel`` (speed is capped so the rover can stop in the
    free space ahead), ``look_ahead_m`` (free space beyond this counts as fully open),
    ``heading_drift`` (rad per sqrt(s) of the preferred-heading random walk),
    ``edge_margin_m`` (start steering back this far from the bounds), ``stuck_timeout_s``
    (less than 0.3 m progress in this time triggers an escape) and ``novelty_weight``
    (pull toward cells not visited yet).
    """

    def __init__(
        self,
        obstacles: np.ndarray | None,
        bounds: tuple[float, float, float, float],
        geometry: RoverGeometry,
        rng: np.random.Generator,
        cruise_speed: float = 0.5,
        *,
        sensor_range_m: float = 4.0,
        n_rays: int = 72,
        safety_margin_m: float = 0.15,
        stop_distance_m: float = 0.25,
        look_ahead_m: float = 3.0,
        brake_decel: float = 0.4,
        max_turn_rate: float = 1.2,
        heading_gain: float = 2.0,
        heading_drift: float = 0.35,
        edge_margin_m: float = 4.0,
        stuck_timeout_s: float = 5.0,
        cell_size_m: float = 2.0,
        novelty_weight: float = 0.6,
    ) -> None:
        self.obstacles = validate_obstacles(obstacles)
        self.bounds = validate_bounds(bounds)
        if not isinstance(rng, np.random.Generator):
            raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        self.geometry = geometry
        self.rng = rng
        self.cruise_speed = _positive("cruise_speed", cruise_speed)
        if self.cruise_speed > geometry.max_linear_mps:
            raise ValueError(
                f"cruise_speed must be <= geometry.max_linear_mps ({geometry.max_linear_mps}), got {cruise_speed}"
            )
        self.sensor_range_m = _positive("sensor_range_m", sensor_range_m)
        if int(n_rays) != n_rays or n_rays < 8:
            raise ValueError(f"n_rays must be an integer >= 8, got {n_rays!r}")
        self.n_rays = int(n_rays)
        self.safety_margin_m = _positive("safety_margin_m", safety_margin_m, allow_zero=True)
        self.stop_distance_m = _positive("stop_distance_m", stop_distance_m)
        self.look_ahead_m = _positive("look_ahead_m", look_ahead_m)
        if self.look_ahead_m <= self.stop_distance_m:
            raise ValueError(f"look_ahead_m ({look_ahead_m}) must be greater than stop_distance_m ({stop_distance_m})")
        self.brake_decel = _positive("brake_decel", brake_decel)
        self.max_turn_rate = min(_positive("max_turn_rate", max_turn_rate), geometry.max_angular_rps)
        self.heading_gain = _positive("heading_gain", heading_gain)
        self.heading_drift = _positive("heading_drift", heading_drift, allow_zero=True)
        self.edge_margin_m = _positive("edge_margin_m", edge_margin_m, allow_zero=True)
        self.stuck_timeout_s = _positive("stuck_timeout_s", stuck_timeout_s)
        self.cell_size_m = _positive("cell_size_m", cell_size_m)
        self.novelty_weight = _positive("novelty_weight", novelty_weight, allow_zero=True)

        self.inflate_m = geometry.footprint_radius_m + self.safety_margin_m
        self.rel_angles = np.linspace(-math.pi, math.pi, self.n_rays, endpoint=False)
        self._ahead = int(np.argmin(np.abs(self.rel_angles)))
        self._rear = np.abs(np.abs(self.rel_angles) - math.pi) <= math.radians(25.0) + 1e-9
        xmin, xmax, ymin, ymax = self.bounds
        self._grid_shape = (
            max(1, math.ceil((ymax - ymin) / self.cell_size_m)),
            max(1, math.ceil((xmax - xmin) / self.cell_size_m)),
        )
        self.visited = np.zeros(self._grid_shape)
        self.preferred_heading: float | None = None
        self.distance_m = 0.0
        self.escapes = 0
        self.mode = "cruise"
        self._last: tuple[float, float, float] | None = None  # t, x, y
        self._progress_ref: tuple[float, float, float] | None = None  # t, x, y
        self._escape_until = -math.inf
        self._escape_heading = 0.0
        self._escape_backing_until = -math.inf
        self._turn_dir = 1.0

    # ----------------------------------------------------------------- helpers
    def ranges(self, x: float, y: float, yaw: float) -> np.ndarray:
        """Free distance (m) for the rover's centre along each fan heading ``yaw + rel_angles``."""
        return range_fan(x, y, yaw + self.rel_angles, self.obstacles, self.bounds, self.inflate_m, self.sensor_range_m)

    def _cell(self, x: np.ndarray | float, y: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        xmin, _, ymin, _ = self.bounds
        i = ((np.asarray(x) - xmin) / self.cell_size_m).astype(int)
        j = ((np.asarray(y) - ymin) / self.cell_size_m).astype(int)
        ny, nx = self._grid_shape
        return np.minimum(np.maximum(j, 0), ny - 1), np.minimum(np.maximum(i, 0), nx - 1)

    def cells_visited(self) -> int:
        """Number of distinct grid cells the rover has been in."""
        return int(np.count_nonzero(self.visited))

    def _inward(self, x: float, y: float) -> np.ndarray:
        """Vector pointing back inside, growing from 0 at ``edge_margin_m`` from an edge to 1 at it."""
        xmin, xmax, ymin, ymax = self.bounds
        m = max(self.edge_margin_m, 1e-9)
        vec = np.zeros(2)
        vec[0] += max(0.0, 1.0 - (x - xmin) / m) - max(0.0, 1.0 - (xmax - x) / m)
        vec[1] += max(0.0, 1.0 - (y - ymin) / m) - max(0.0, 1.0 - (ymax - y) / m)
        return vec

    def _update_preferred(self, x: float, y: float, dt: float) -> float:
        pref = self.preferred_heading
        assert pref is not None
        pref += self.heading_drift * math.sqrt(dt) * float(self.rng.standard_normal())
        inward = self._inward(x, y)
        depth = float(np.hypot(inward[0], inward[1]))
        if depth > 0:
            # turn the preference toward the inside, faster the closer the edge
            target = math.atan2(inward[1], inward[0])
            err = wrap_angle(target - pref)
            pref += err * min(1.0, 1.5 * depth * dt)
            # deep in the margin, never prefer to keep heading outward
            limit = math.radians(80.0)
            err = wrap_angle(pref - target)
            if depth > 0.5 and abs(err) > limit:
                pref = target + math.copysign(limit, err)
        self.preferred_heading = wrap_angle(pref)
        return self.preferred_heading

    # ----------------------------------------------------------------- control
    def command(self, state: RoverState) -> tuple[float, float]:
        """Return (v m/s, w rad/s) for the rover's current ``state``."""
        t, x, y, yaw = float(state.t), float(state.x), float(state.y), float(state.yaw)
        if self.preferred_heading is None:
            self.preferred_heading = yaw
        dt = 0.0
        if self._last is not None:
            dt = max(0.0, t - self._last[0])
            self.distance_m += math.hypot(x - self._last[1], y - self._last[2])
        self._last = (t, x, y)
        j, i = self._cell(x, y)
        self.visited[j, i] += max(dt, 1e-6)
        pref = self._update_preferred(x, y, dt)

        ranges = self.ranges(x, y, yaw)
        # a gap must be wide enough at the ray resolution: take the worse neighbour
        wrapped = np.concatenate((ranges[-1:], ranges, ranges[:1]))
        clear = np.minimum(np.minimum(wrapped[:-2], wrapped[1:-1]), wrapped[2:])
        headings = yaw + self.rel_angles
        # straight-ahead room: the ray along the heading and its neighbours
        front = float(clear[self._ahead])

        # progress watchdog: no real displacement for stuck_timeout_s means stuck
        if self._progress_ref is None or state.collided:
            self._progress_ref = (t, x, y)
        if state.collided or (
            t - self._progress_ref[0] > self.stuck_timeout_s
            and math.hypot(x - self._progress_ref[1], y - self._progress_ref[2]) < 0.3
        ):
            self._start_escape(t, x, y, yaw, clear, headings)
        elif t - self._progress_ref[0] > self.stuck_timeout_s:
            self._progress_ref = (t, x, y)

        if t < self._escape_until:
            return self._escape_command(t, yaw, ranges)

        eligible = clear > self.stop_distance_m + 0.35
        if not eligible.any():
            # boxed in: turn in place, one consistent way, until a heading opens
            self.mode = "blocked"
            return 0.0, self._turn_dir * self.max_turn_rate

        openness = np.minimum(clear, self.look_ahead_m) / self.look_ahead_m
        align = 0.5 * (1.0 + np.cos(headings - pref))
        turn = np.abs(self.rel_angles) / math.pi
        score = 1.0 * openness + 0.8 * align - 0.5 * turn
        if self.novelty_weight > 0:
            reach = np.minimum(clear, 2.5)
            cj, ci = self._cell(x + reach * np.cos(headings), y + reach * np.sin(headings))
            score += self.novelty_weight / (1.0 + self.visited[cj, ci] / 5.0)
        score = np.where(eligible, score, -np.inf)
        k = int(np.argmax(score))
        err = float(self.rel_angles[k])
        self._turn_dir = 1.0 if err >= 0 else -1.0
        w = max(-self.max_turn_rate, min(self.max_turn_rate, self.heading_gain * err))
        if abs(err) > math.radians(60.0) or front <= self.stop_distance_m:
            self.mode = "turn"
            return 0.0, self._turn_dir * max(abs(w), 0.4)
        self.mode = "cruise"
        # a speed the rover can brake from (at brake_decel) within the free space ahead
        room = max(front - self.stop_distance_m, 0.0)
        v = min(self.cruise_speed, math.sqrt(2.0 * self.brake_decel * room))
        v *= max(0.0, math.cos(err))
        return v, w

    def _start_escape(self, t: float, x: float, y: float, yaw: float, clear: np.ndarray, headings: np.ndarray) -> None:
        """Back off (if the rear is free) then turn to a random open heading, which becomes preferred."""
        self.escapes += 1
        open_idx = np.flatnonzero(clear > self.stop_distance_m + 0.35)
        if len(open_idx) == 0:
            open_idx = np.array([int(np.argmax(clear))])
        # favour the most open half of the candidates, pick one at random
        order = open_idx[np.argsort(-clear[open_idx])]
        pick = int(order[int(self.rng.integers(0, max(1, (len(order) + 1) // 2)))])
        self._escape_heading = float(wrap_angle(headings[pick]))
        self.preferred_heading = self._escape_heading
        self._escape_backing_until = t + 1.0
        self._escape_until = t + 4.0
        self._progress_ref = (t, x, y)

    def _escape_command(self, t: float, yaw: float, ranges: np.ndarray) -> tuple[float, float]:
        self.mode = "escape"
        rear = float(ranges[self._rear].min())
        if t < self._escape_backing_until and rear > self.stop_distance_m + 0.1:
            return -0.5 * self.cruise_speed, 0.0
        err = wrap_angle(self._escape_heading - yaw)
        if abs(err) < math.radians(10.0):
            self._escape_until = t  # aligned: hand back to normal wandering
            return 0.0, 0.0
        return 0.0, max(-self.max_turn_rate, min(self.max_turn_rate, self.heading_gain * err))


class CmdVelController:
    """Holds the last teleop (v, w); returns zero once ``timeout_s`` passed without a new one."""

    def __init__(self, timeout_s: float = 0.5) -> None:
        self.timeout_s = _positive("timeout_s", timeout_s)
        self._cmd = (0.0, 0.0)
        self._stamp: float | None = None

    def set(self, v: float, w: float, t: float) -> None:
        """Record a ``cmd_vel`` (v m/s, w rad/s) received at time ``t`` (s)."""
        v, w, t = float(v), float(w), float(t)
        if not (math.isfinite(v) and math.isfinite(w)):
            raise ValueError(f"cmd_vel must be finite, got v={v!r}, w={w!r}")
        if not math.isfinite(t):
            raise ValueError(f"t must be finite, got {t!r}")
        self._cmd = (v, w)
        self._stamp = t

    def command(self, state: RoverState | float) -> tuple[float, float]:
        """(v, w) to apply now (a :class:`RoverState` or a time in s): the last command, or zeros if none or stale."""
        t = float(state.t) if isinstance(state, RoverState) else float(state)
        if self._stamp is None or t - self._stamp > self.timeout_s:
            return 0.0, 0.0
        return self._cmd
