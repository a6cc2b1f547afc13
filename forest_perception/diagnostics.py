"""Health levels of ``/diagnostics`` (diagnostic_msgs/DiagnosticStatus), for cores that import no ROS."""

from __future__ import annotations

# the DiagnosticStatus level constants, as bytes like rclpy's message class has them
OK, WARN, ERROR, STALE = b"\x00", b"\x01", b"\x02", b"\x03"


def worse(a: bytes, b: bytes) -> bytes:
    """The more severe of two levels."""
    return max(a, b)
