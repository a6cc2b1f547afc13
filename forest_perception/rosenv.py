"""Environment for running ROS 2 on loopback only: domain id, discovery range, DDS profile, logs.

Used by the tests, the benchmarks and the demo so that no DDS traffic leaves 127.0.0.1.
"""

from __future__ import annotations

import os
from pathlib import Path

from forest_perception.share import share_path


def fastdds_profile_path() -> Path:
    """The loopback Fast DDS profile (``config/fastdds_loopback.xml``), from the source tree or an install."""
    return share_path("config", "fastdds_loopback.xml")


def loopback_environment(domain_id: int, log_dir: Path | str | None = None) -> dict[str, str]:
    """Environment variables that keep ROS 2 discovery and data on 127.0.0.1."""
    if not 0 <= int(domain_id) <= 101:
        raise ValueError(f"ROS_DOMAIN_ID must be within 0..101 on Linux, got {domain_id}")
    profile = str(fastdds_profile_path())
    env = {
        "ROS_DOMAIN_ID": str(int(domain_id)),
        "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
        "ROS_LOCALHOST_ONLY": "1",
        "RMW_IMPLEMENTATION": "rmw_fastrtps_cpp",
        # Fast DDS 3 (Jazzy, Kilted); Humble's Fast DDS 2 reads FASTRTPS_DEFAULT_PROFILES_FILE instead
        "FASTDDS_DEFAULT_PROFILES_FILE": profile,
        "RCUTILS_COLORIZED_OUTPUT": "0",
    }
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        env["ROS_LOG_DIR"] = str(log_dir)
    return env


def apply_loopback_environment(domain_id: int, log_dir: Path | str | None = None) -> dict[str, str]:
    """Set :func:`loopback_environment` in ``os.environ`` (before rclpy.init) and return it."""
    env = loopback_environment(domain_id, log_dir)
    os.environ.update(env)
    # ROS_LOCALHOST_ONLY is deprecated since Jazzy and warns beside the new variable
    os.environ.pop("ROS_LOCALHOST_ONLY", None)
    return env
