"""What every forest_perception node shares: parameter ranges and the ``main()`` spin loop."""

from __future__ import annotations

from collections.abc import Callable

import rclpy
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node


def float_range(lo: float, hi: float) -> list[FloatingPointRange]:
    """A continuous ``floating_point_range`` for a ParameterDescriptor."""
    return [FloatingPointRange(from_value=float(lo), to_value=float(hi), step=0.0)]


def int_range(lo: int, hi: int) -> list[IntegerRange]:
    """An ``integer_range`` with step 1 for a ParameterDescriptor."""
    return [IntegerRange(from_value=int(lo), to_value=int(hi), step=1)]


def declare_parameters(
    node: Node,
    specs: list[tuple[str, object, str, list | None]],
    read_only: frozenset[str] | set[str] = frozenset(),
) -> dict[str, object]:
    """Declare ``(name, default, description, range or None)`` parameters with descriptors; return their values."""
    values = {}
    for name, default, description, value_range in specs:
        descriptor = ParameterDescriptor(description=description, read_only=name in read_only)
        if value_range is not None:
            if isinstance(value_range[0], FloatingPointRange):
                descriptor.floating_point_range = value_range
            else:
                descriptor.integer_range = value_range
        values[name] = node.declare_parameter(name, default, descriptor).value
    return values


def publish_node_diagnostics(node: Node, publisher: object, kind: str, level: int | bytes, message: str,
                             values: dict[str, object]) -> None:
    """Publish one DiagnosticArray with the status ``"<kind>: <namespace>"`` (hardware id: the namespace)."""
    from diagnostic_msgs.msg import DiagnosticArray

    from forest_perception import msgs

    array = DiagnosticArray()
    array.header.stamp = node.get_clock().now().to_msg()
    namespace = node.get_namespace().strip("/") or kind
    array.status.append(msgs.diagnostic_status(f"{kind}: {namespace}", namespace, level, message, values))
    publisher.publish(array)


def run_node(factory: Callable[[], Node], name: str, args: list[str] | None = None) -> None:
    """Init rclpy, build and spin a node until Ctrl-C; a bad parameter exits 2 with its message."""
    rclpy.init(args=args)
    node = None
    try:
        node = factory()
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except ValueError as exc:  # a bad parameter: say which, no traceback
        print(f"{name}: {exc}")
        raise SystemExit(2) from None
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
