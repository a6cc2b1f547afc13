"""The topic contract of one rover, relative to its namespace: the same names in sim and on hardware.

Types, units and QoS are in docs/architecture.md ("Topic contract").
"""

from __future__ import annotations

CAMERA_IMAGE = "camera/image_raw"
CAMERA_INFO = "camera/camera_info"
CAMERA_DEPTH = "camera/depth/image_raw"
IMU = "imu/data"
GPS = "gps/fix"
JOINT_STATES = "joint_states"
ODOM = "odom"
CMD_VEL = "cmd_vel"
GROUND_TRUTH = "ground_truth/odom"  # sim only: true pose of base_link in the world (ENU) frame
DEPTH_IMAGE = "depth/image"
DEPTH_POINTS = "depth/points"
DEPTH_SCAN = "depth/scan"
DIAGNOSTICS = "/diagnostics"
CLOCK = "/clock"

#: what a rover's sensors publish: what capture_node records by default
SENSOR_TOPICS = (CAMERA_IMAGE, CAMERA_INFO, CAMERA_DEPTH, IMU, GPS, JOINT_STATES, ODOM)
