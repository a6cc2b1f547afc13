"""The ros_gz_bridge side of the Gazebo export: which Gazebo topic carries which contract topic, and the config.

``BRIDGED_TOPICS`` maps the rover topic contract (docs/architecture.md) onto the topics the Gazebo
sensors and systems publish; :func:`bridge_yaml` is the ``parameter_bridge`` config for a set of rovers.
Details: docs/simulator.md (`forest_perception.sim.gazebo`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import yaml

_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_RESERVED_PREFIXES = ("tree_", "log_", "bush_", "rock_")
_RESERVED_NAMES = ("terrain", "sun")

GZ_TO_ROS = "GZ_TO_ROS"
ROS_TO_GZ = "ROS_TO_GZ"


@dataclass(frozen=True)
class BridgedTopic:
    """One ROS <-> Gazebo topic pair of the contract.

    Names without a leading ``/`` are relative to the rover namespace (``/<ns>/<name>``);
    absolute names (``/clock``) are global and bridged once.
    """

    ros_topic: str
    gz_topic: str
    ros_type: str
    gz_type: str
    direction: str

    @property
    def is_global(self) -> bool:
        """True for a topic shared by all rovers (bridged once)."""
        return self.ros_topic.startswith("/")

    def ros_name(self, namespace: str) -> str:
        """The ROS topic for ``namespace`` (unchanged when global)."""
        return self.ros_topic if self.is_global else f"/{namespace}/{self.ros_topic}"

    def gz_name(self, namespace: str) -> str:
        """The Gazebo topic for ``namespace`` (unchanged when global)."""
        return self.gz_topic if self.gz_topic.startswith("/") else f"/{namespace}/{self.gz_topic}"

    def entry(self, namespace: str) -> dict[str, str]:
        """The parameter_bridge YAML entry for ``namespace``."""
        return {
            "ros_topic_name": self.ros_name(namespace),
            "gz_topic_name": self.gz_name(namespace),
            "ros_type_name": self.ros_type,
            "gz_type_name": self.gz_type,
            "direction": self.direction,
        }


# The rgbd_camera sensor publishes <topic>/image, <topic>/depth_image, <topic>/camera_info
# (gz-sensors RgbdCameraSensor), so the camera's gz topic base is "camera".
CAMERA_GZ_TOPIC = "camera"
_SENSOR = "sensor_msgs/msg/"
BRIDGED_TOPICS: tuple[BridgedTopic, ...] = (
    BridgedTopic("camera/image_raw", "camera/image", _SENSOR + "Image", "gz.msgs.Image", GZ_TO_ROS),
    BridgedTopic(
        "camera/camera_info", "camera/camera_info", _SENSOR + "CameraInfo", "gz.msgs.CameraInfo", GZ_TO_ROS
    ),
    BridgedTopic(
        "camera/depth/image_raw", "camera/depth_image", _SENSOR + "Image", "gz.msgs.Image", GZ_TO_ROS
    ),
    BridgedTopic("imu/data", "imu", _SENSOR + "Imu", "gz.msgs.IMU", GZ_TO_ROS),
    BridgedTopic("gps/fix", "navsat", _SENSOR + "NavSatFix", "gz.msgs.NavSat", GZ_TO_ROS),
    BridgedTopic("joint_states", "joint_states", _SENSOR + "JointState", "gz.msgs.Model", GZ_TO_ROS),
    BridgedTopic("odom", "odometry", "nav_msgs/msg/Odometry", "gz.msgs.Odometry", GZ_TO_ROS),
    BridgedTopic("cmd_vel", "cmd_vel", "geometry_msgs/msg/Twist", "gz.msgs.Twist", ROS_TO_GZ),
    BridgedTopic("/clock", "/clock", "rosgraph_msgs/msg/Clock", "gz.msgs.Clock", GZ_TO_ROS),
)
_BY_ROS = {t.ros_topic: t for t in BRIDGED_TOPICS}


def gz_topic(namespace: str, ros_topic: str) -> str:
    """Gazebo topic that feeds (or is fed by) contract topic ``ros_topic`` of rover ``namespace``."""
    try:
        return _BY_ROS[ros_topic].gz_name(namespace)
    except KeyError:
        raise ValueError(f"{ros_topic!r} is not a bridged topic; expected one of {sorted(_BY_ROS)}") from None


def bridge_entries(rover_names: Iterable[str]) -> list[dict[str, str]]:
    """parameter_bridge entries for every rover (per-rover topics, then the global ones once)."""
    names = check_rover_names(rover_names)
    entries = [t.entry(ns) for ns in names for t in BRIDGED_TOPICS if not t.is_global]
    entries += [t.entry("") for t in BRIDGED_TOPICS if t.is_global]
    return entries


def bridge_yaml(rover_names: Iterable[str]) -> str:
    """parameter_bridge configuration text for ``rover_names``."""
    header = (
        "# ros_gz_bridge parameter_bridge configuration (forest_perception rover topic contract)\n"
        "# ros2 run ros_gz_bridge parameter_bridge --ros-args -p config_file:=<this file>"
        " -p use_sim_time:=true\n"
    )
    return header + yaml.safe_dump(bridge_entries(rover_names), sort_keys=False, default_flow_style=False)


def check_rover_names(rover_names: Iterable[str]) -> tuple[str, ...]:
    """The rover names as a tuple; ``ValueError`` unless each is a ROS namespace and Gazebo model name of its own.

    A name must not clash with the world's models (``terrain``, ``sun``, ``tree_<i>``...).
    """
    if isinstance(rover_names, str):
        raise ValueError(f"rover_names must be a sequence of names, got the string {rover_names!r}")
    names = tuple(rover_names)
    if not names:
        raise ValueError("rover_names must name at least one rover")
    for name in names:
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError(
                f"rover name {name!r} is not a valid ROS namespace / Gazebo model name "
                "(a letter, then letters, digits or _)"
            )
        if name in _RESERVED_NAMES or name.startswith(_RESERVED_PREFIXES):
            raise ValueError(f"rover name {name!r} clashes with the world's model names {_RESERVED_PREFIXES}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"rover names must be unique, repeated: {dupes}")
    return names
