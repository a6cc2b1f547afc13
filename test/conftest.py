"""Shared fixtures: every test session gets its own ROS domain on loopback."""

from __future__ import annotations

import os
import random

import pytest

from forest_perception.rosenv import apply_loopback_environment


def _session_domain_id() -> int:
    if "FP_TEST_DOMAIN_ID" in os.environ:
        return int(os.environ["FP_TEST_DOMAIN_ID"])
    # spread parallel CI jobs over the domains that do not collide with 0 (the default)
    return random.Random(os.getpid()).randint(30, 99)


@pytest.fixture(scope="session", autouse=True)
def ros_env(tmp_path_factory):
    """Loopback-only ROS environment (domain id, discovery range, DDS profile, log dir), for every test."""
    env = apply_loopback_environment(_session_domain_id(), tmp_path_factory.mktemp("ros_log"))
    return env


@pytest.fixture
def rclpy_context(ros_env):
    """An initialised rclpy context, shut down after the test even when it fails."""
    import rclpy
    from rclpy.context import Context

    context = Context()
    rclpy.init(context=context)
    try:
        yield context
    finally:
        rclpy.try_shutdown(context=context)
