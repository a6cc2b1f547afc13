"""What every forest_perception node shares: parameter specs, validated updates, diagnostics, ``main()``."""

from __future__ import annotations

import array
import os
import sys
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


def _type_name(default: Any) -> str:  # noqa: ANN401 - any parameter default
    if isinstance(default, bool):
        return "true or false"
    if isinstance(default, int):
        return "an integer"
    if isinstance(default, float):
        return "a number"
    if isinstance(default, (list, tuple)):
        return "a list like [a, b]"
    return "a string"


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

    overrides = getattr(node, "_parameter_overrides", {})  # what --ros-args -p / a YAML file gave
    values = {}
    for spec in specs:
        given = overrides.get(spec.name)
        shown = f"{spec.name}:={plain_value(given.value)!r}" if given is not None else spec.name
        try:
            value = node.declare_parameter(spec.name, spec.default, spec.descriptor()).value
        except InvalidParameterTypeException:
            raise ValueError(f"{shown} has the wrong type: expected {_type_name(spec.default)} "
                             f"({spec.description})") from None
        except InvalidParameterValueException:
            lo, hi = spec.range or (None, None)
            raise ValueError(f"{shown} is outside its range [{lo}, {hi}] ({spec.description})") from None
        if value is None and isinstance(spec.default, (list, tuple)):
            value = []  # `-p topics:=[]` is an empty array of no type: rclpy leaves the parameter unset
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


def worker_error_handler(node: Node, what: str) -> Callable[[Exception], bool]:
    """A ``SlotWorker`` ``on_error`` for a node: after shutdown (Ctrl-C) the thread ends quietly; before, the
    error is logged with ``what`` failed and the worker takes the next job."""
    def on_error(exc: Exception) -> bool:
        if not rclpy.ok(context=node.context):
            return False
        node.get_logger().error(f"{what} failed: {type(exc).__name__}: {exc}")
        return True

    return on_error


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


def parameter_help(name: str, summary: str, specs: Sequence[ParamSpec]) -> str:
    """``<node> --help``: what the node does and every parameter with its default and constraints."""
    lines = [f"usage: ros2 run forest_perception {name} [--ros-args -p NAME:=VALUE ...]",
             f"       (or .venv/bin/{name} [--ros-args ...] without a ROS install)", "", summary, "", "parameters:"]
    for spec in specs:
        facts = [f"default {spec.default!r}"]
        if spec.range is not None:
            facts.append(f"range [{spec.range[0]}, {spec.range[1]}]")
        if spec.choices:
            facts.append(f"one of {', '.join(spec.choices)}")
        if spec.read_only:
            facts.append("read-only")
        lines.append(f"  {spec.name:<28} {spec.description} ({'; '.join(facts)})")
    return "\n".join(lines)


def close_nodes(executor: Any, nodes: Sequence[Node]) -> None:  # noqa: ANN401 - any rclpy executor
    """Take ``nodes`` off ``executor``, destroy them, shut the executor down and rclpy with it (a script that ran a
    graph of nodes in one process)."""
    for node in nodes:
        executor.remove_node(node)
        node.destroy_node()
    executor.shutdown()
    rclpy.try_shutdown()


def run_node(factory: Callable[[], Node], name: str, args: list[str] | None = None,
             specs: Sequence[ParamSpec] = (), summary: str = "") -> None:
    """Init rclpy, build and spin a node until Ctrl-C; a bad parameter exits 2 with its message.

    ``--help`` (before any ``--ros-args``) prints :func:`parameter_help` and exits.
    """
    argv = list(sys.argv[1:] if args is None else args)
    own = argv[: argv.index("--ros-args")] if "--ros-args" in argv else argv
    if "-h" in own or "--help" in own:
        try:
            print(parameter_help(name, summary, specs), flush=True)
        except BrokenPipeError:  # `| head`: the reader left early
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0)
    rclpy.init(args=args)
    node = None
    try:
        node = factory()
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except ValueError as exc:  # a bad parameter: say which, no traceback
        print(f"{name}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception:
        if rclpy.ok():
            raise
        # Ctrl-C while the node was starting: rclpy's signal handler shut the context down under it
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
