"""Shared fixtures: every test session gets its own ROS domain on loopback."""

from __future__ import annotations

import functools
import os
import random
import time
from collections import defaultdict
from collections.abc import Callable

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


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, period: float = 0.01) -> object:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; its last value (truthy on success)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(period)
    return predicate()


def spin_and_listen(context, nodes, seconds: float, topics: dict, step=None) -> dict[str, list]:
    """Spin ``nodes`` with a listener on ``topics`` for ``seconds``; {name: [msg, ...]}.

    ``topics`` maps a name to its message type, or to ``(type, reliable)``; by default sensor topics
    are heard best effort (deep queue, so a busy machine loses nothing) and ``/diagnostics`` reliably.
    ``step(listener)`` runs after every spin.
    """
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    got = defaultdict(list)
    listener = rclpy.create_node("test_listener", context=context)
    for name, kind in topics.items():
        kind, reliable = kind if isinstance(kind, tuple) else (kind, name == "/diagnostics")
        qos = QoSProfile(depth=50) if reliable else QoSProfile(depth=500, reliability=ReliabilityPolicy.BEST_EFFORT)
        listener.create_subscription(kind, name, lambda m, n=name: got[n].append(m), qos)
    executor = SingleThreadedExecutor(context=context)
    for node in [*nodes, listener]:
        executor.add_node(node)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.01)
            if step is not None:
                step(listener)
    finally:
        for node in [*nodes, listener]:
            executor.remove_node(node)
        listener.destroy_node()
        executor.shutdown()
    return got


@pytest.fixture
def wait():
    """:func:`wait_until`: poll a predicate with a timeout."""
    return wait_until


@pytest.fixture
def spin(rclpy_context):
    """:func:`spin_and_listen` bound to this test's rclpy context: ``spin(nodes, seconds, topics, step=None)``."""
    return functools.partial(spin_and_listen, rclpy_context)
