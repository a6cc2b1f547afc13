"""What every forest_perception node shares: parameter specs, validated updates, diagnostics, ``main()``."""

from __future__ import annotations

import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import rclpy
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node

Check = Callable[[dict[str, Any]], str]
"""Validates a whole parameter set; returns the reason it is refused, "" when it is fine."""
Commit = Callable[[dict[str, Any], dict[str, Any]], None]
"""Applies an accepted change: ``commit(old_values, new_values)``."""


@dataclass(frozen=True)
class ParamSpec:
    """One ROS parameter: name, default (its type is the parameter's type), description and constraints.

    ``range`` is inclusive ``(lo, hi)`` for numbers; ``choices`` the allowed strings (each element,
    for a string array); ``read_only`` parameters are set at start-up only.
    """

    name: str
    default: Any
    description: str
    range: tuple[float, float] | None = None
    choices: tuple[str, ...] = ()
    read_only: bool = False

    def descriptor(self) -> ParameterDescriptor:
        """The ParameterDescriptor that ``ros2 param describe`` shows."""
        text = self.description + (f" (one of {', '.join(self.choices)})" if self.choices else "")
        descriptor = ParameterDescriptor(description=text, read_only=self.read_only)
        if self.range is not None:
            lo, hi = self.range
            if isinstance(self.default, bool):
                raise TypeError(f"parameter {self.name}: a bool takes no range")
            if isinstance(self.default, int):
                descriptor.integer_range = [IntegerRange(from_value=int(lo), to_value=int(hi), step=1)]
            else:
                descriptor.floating_point_range = [FloatingPointRange(from_value=float(lo), to_value=float(hi),
                                                                      step=0.0)]
        return descriptor

    def problem(self, value: Any) -> str:  # noqa: ANN401 - any parameter value
        """Why ``value`` is not allowed ("" if it is): names the parameter, the value and what is allowed."""
        if self.range is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            lo, hi = self.range
            if not lo <= value <= hi:
                return f"{self.name}:={value!r} is outside its range [{lo}, {hi}]"
        if self.choices:
            values = [value] if isinstance(value, str) else list(value)
            bad = [v for v in values if v not in self.choices]
            if bad:
                return f"{self.name}:={value!r} is not allowed: choose from {', '.join(self.choices)}"
        return ""


def plain_value(value: Any) -> Any:  # noqa: ANN401 - any parameter value
    """A parameter value as plain Python: arrays (rclpy gives ``array.array`` for numbers) become lists."""
    if isinstance(value, (array.array, tuple)):
        return list(value)
    return value


def declare_parameters(node: Node, specs: Sequence[ParamSpec], check: Check | None = None) -> dict[str, Any]:
    """Declare ``specs`` with descriptors; return their values, or raise ``ValueError`` naming a bad one.

    A start-up value of the wrong type or outside its range or choices, or one ``check`` refuses,
    raises ``ValueError`` with a one-line reason (``run_node`` prints it and exits 2).
    """
    from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException

    values = {}
    for spec in specs:
        try:
            value = node.declare_parameter(spec.name, spec.default, spec.descriptor()).value
        except InvalidParameterTypeException as exc:
            raise ValueError(f"{spec.name}: expected a {type(spec.default).__name__} "
                             f"({spec.description}): {exc}") from None
        except InvalidParameterValueException:
            given = node.get_parameter_overrides().get(spec.name) if hasattr(node, "get_parameter_overrides") else None
            shown = f":={given.value!r}" if given is not None else ""
            raise ValueError(f"{spec.name}{shown} is outside its range {list(spec.range or ())}") from None
        values[spec.name] = plain_value(value)
        reason = spec.problem(values[spec.name])
        if reason:
            raise ValueError(reason)
    reason = check(values) if check is not None else ""
    if reason:
        raise ValueError(reason)
    return values


def add_validated_updates(node: Node, specs: Sequence[ParamSpec], current: Callable[[], dict[str, Any]],
                          check: Check, commit: Commit) -> None:
    """Take run-time parameter changes only as a whole set that ``check`` accepts, then ``commit`` them.

    The set is the current values with the changed ones replaced; a refusal answers the caller
    (``ros2 param set``) with ``check``'s reason and changes nothing.
    """
    by_name = {spec.name: spec for spec in specs}

    def on_set(params: list) -> SetParametersResult:
        old = current()
        new = dict(old)
        for param in params:
            new[param.name] = plain_value(param.value)
            spec = by_name.get(param.name)
            reason = spec.problem(new[param.name]) if spec is not None else ""
            if reason:
                return SetParametersResult(successful=False, reason=reason)
        reason = check(new)
        if reason:
            return SetParametersResult(successful=False, reason=reason)
        commit(old, new)
        return SetParametersResult(successful=True)

    node.add_on_set_parameters_callback(on_set)


def changed(old: dict[str, Any], new: dict[str, Any], names: Sequence[str]) -> list[str]:
    """Which of ``names`` differ between two parameter sets."""
    return [name for name in names if old.get(name) != new.get(name)]


def publish_node_diagnostics(node: Node, publisher: object, kind: str, level: int | bytes, message: str,
                             values: dict[str, object]) -> None:
    """Publish one DiagnosticArray with the status ``"<kind>: <namespace>"`` (hardware id: the namespace)."""
    from diagnostic_msgs.msg import DiagnosticArray

    from forest_perception import msgs

    array_msg = DiagnosticArray()
    array_msg.header.stamp = node.get_clock().now().to_msg()
    namespace = node.get_namespace().strip("/") or kind
    array_msg.status.append(msgs.diagnostic_status(f"{kind}: {namespace}", namespace, level, message, values))
    publisher.publish(array_msg)


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
