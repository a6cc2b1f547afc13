"""Frame ids, rover geometry and camera intrinsics of the topic contract (REP 103 units, REP 105 frames)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Frame ids of the topic contract (prefixed with the rover namespace by the nodes
# only when ``frame_prefix`` is set, so a single rover matches a real RealSense rig).
FRAME_WORLD = "world"  # the simulated forest's ENU frame about its datum (ground truth)
FRAME_ODOM = "odom"
FRAME_BASE = "base_link"
FRAME_CAMERA = "camera_link"
FRAME_CAMERA_OPTICAL = "camera_color_optical_frame"
FRAME_IMU = "imu_link"
FRAME_GPS = "gps_link"
WHEEL_JOINTS = ("left_wheel_joint", "right_wheel_joint")


@dataclass(frozen=True)
class RoverGeometry:
    """A small skid/differential-drive forest rover with a low camera.

    ``base_link`` sits on the axle centre; the camera is ``camera_height_m`` above the
    ground it drives on (the low-viewpoint dataset's rig was about 0.2 m).
    """

    wheel_radius_m: float = 0.06
    track_width_m: float = 0.30
    body_length_m: float = 0.40
    body_width_m: float = 0.26
    body_height_m: float = 0.12
    camera_height_m: float = 0.20
    camera_forward_m: float = 0.17
    camera_pitch_rad: float = 0.0
    imu_offset_m: tuple[float, float, float] = (0.0, 0.0, 0.05)
    gps_offset_m: tuple[float, float, float] = (-0.10, 0.0, 0.25)
    mass_kg: float = 4.5
    max_linear_mps: float = 1.0
    max_angular_rps: float = 2.0

    @property
    def camera_offset_m(self) -> tuple[float, float, float]:
        """camera_link origin in base_link (x forward, z up)."""
        return (self.camera_forward_m, 0.0, self.camera_height_m - self.wheel_radius_m)

    @property
    def footprint_radius_m(self) -> float:
        """Radius of the circle that encloses the body, for collision checks."""
        return 0.5 * math.hypot(self.body_length_m, max(self.body_width_m, self.track_width_m + 0.05))


CAMERA_HFOV_DEG = 69.4
"""Horizontal field of view of the simulator's camera (the D435 colour sensor's in its 16:9 modes), which the
shipped networks were trained with."""


@dataclass(frozen=True)
class CameraIntrinsics:
    """Pinhole intrinsics of the colour camera (depth is aligned to it)."""

    width: int = 320
    height: int = 240
    hfov_deg: float = CAMERA_HFOV_DEG

    def validate(self) -> CameraIntrinsics:
        """Raise ``ValueError`` for a resolution or field of view no camera has."""
        if int(self.width) != self.width or int(self.height) != self.height:
            raise ValueError(f"camera resolution must be integers, got {self.width}x{self.height}")
        if not (16 <= self.width <= 4096 and 16 <= self.height <= 4096):
            raise ValueError(
                f"camera resolution must be within 16..4096 px per side, got {self.width}x{self.height}"
            )
        if not 10.0 <= self.hfov_deg <= 170.0:
            raise ValueError(f"hfov_deg must be within [10, 170] degrees, got {self.hfov_deg}")
        return self

    @property
    def fx(self) -> float:
        """Focal length in pixels (square pixels, fx == fy)."""
        return self.width / (2.0 * math.tan(math.radians(self.hfov_deg) / 2.0))

    @property
    def fy(self) -> float:
        """Focal length in pixels along y."""
        return self.fx

    @property
    def cx(self) -> float:
        """Principal point x (pixel centres at integer + 0.5 convention of ROS: (w-1)/2)."""
        return (self.width - 1) / 2.0

    @property
    def cy(self) -> float:
        """Principal point y."""
        return (self.height - 1) / 2.0

    @property
    def vfov_deg(self) -> float:
        """Vertical field of view implied by the aspect ratio."""
        return math.degrees(2.0 * math.atan(self.height / (2.0 * self.fy)))

    @property
    def k(self) -> np.ndarray:
        """3x3 camera matrix."""
        return np.array([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]])
