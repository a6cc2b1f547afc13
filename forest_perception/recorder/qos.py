"""Offered QoS profiles as rosbag2 stores them, and the QoS a recorder subscribes with.

A profile is a plain dict in the form of rosbag2's metadata version 9 (policies by name, durations as
``{sec, nsec}``); the same text goes into metadata.yaml and into each MCAP channel's metadata.
Details: docs/runtime.md (`forest_perception.recorder`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import yaml

HISTORY = ("system_default", "keep_last", "keep_all", "unknown")
RELIABILITY = ("system_default", "reliable", "best_effort", "unknown", "best_available")
DURABILITY = ("system_default", "transient_local", "volatile", "unknown", "best_available")
LIVELINESS = ("system_default", "automatic", "manual_by_node", "manual_by_topic", "unknown", "best_available")


def _duration(ns: int) -> dict[str, int]:
    ns = int(ns)
    if ns < 0:
        raise ValueError(f"QoS durations must be >= 0 ns, got {ns}")
    return {"sec": ns // 1_000_000_000, "nsec": ns % 1_000_000_000}


def _policy(name: str, value: str, allowed: tuple[str, ...]) -> str:
    value = str(value).lower()
    if value not in allowed:
        raise ValueError(f"QoS {name} must be one of {list(allowed)}, got {value!r}")
    return value


def qos_profile(
    *,
    history: str = "keep_last",
    depth: int = 10,
    reliability: str = "reliable",
    durability: str = "volatile",
    deadline_ns: int = 0,
    lifespan_ns: int = 0,
    liveliness: str = "system_default",
    liveliness_lease_duration_ns: int = 0,
    avoid_ros_namespace_conventions: bool = False,
) -> dict[str, Any]:
    """One offered QoS profile as rosbag2 (metadata version 9) stores it; policies by name, durations in ns."""
    if int(depth) < 0:
        raise ValueError(f"QoS depth must be >= 0, got {depth}")
    return {
        "history": _policy("history", history, HISTORY),
        "depth": int(depth),
        "reliability": _policy("reliability", reliability, RELIABILITY),
        "durability": _policy("durability", durability, DURABILITY),
        "deadline": _duration(deadline_ns),
        "lifespan": _duration(lifespan_ns),
        "liveliness": _policy("liveliness", liveliness, LIVELINESS),
        "liveliness_lease_duration": _duration(liveliness_lease_duration_ns),
        "avoid_ros_namespace_conventions": bool(avoid_ros_namespace_conventions),
    }


def qos_yaml(profiles: Sequence[Mapping[str, Any]]) -> str:
    """The ``offered_qos_profiles`` string of an MCAP channel's metadata (a YAML list, as rosbag2 writes it)."""
    return yaml.safe_dump([dict(p) for p in profiles], sort_keys=False, default_flow_style=False).strip()


def adapted_subscription_qos(profiles: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
    """(reliability, durability) a recorder subscribes with to hear every publisher, as rosbag2 adapts them.

    Reliable only when every publisher offers reliable (a reliable reader never matches a best-effort
    writer); transient-local only when every publisher offers it.
    """
    if profiles and all(p.get("reliability") == "reliable" for p in profiles):
        reliability = "reliable"
    else:
        reliability = "best_effort"
    if profiles and all(p.get("durability") == "transient_local" for p in profiles):
        durability = "transient_local"
    else:
        durability = "volatile"
    return reliability, durability


def qos_profile_from(profile: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`qos_profile` of a mapping in metadata form (durations as ``{sec, nsec}``) or in keyword form.

    Raises ``ValueError`` naming an unknown field or a bad policy.
    """
    return qos_profile(**_profile_kwargs(profile))


def _profile_kwargs(profile: Mapping[str, Any]) -> dict[str, Any]:
    """qos_profile() keyword arguments from a profile mapping (metadata form or keyword form)."""
    def ns(value: Any) -> int:
        if isinstance(value, Mapping):
            return int(value.get("sec", 0)) * 1_000_000_000 + int(value.get("nsec", 0))
        return int(value)

    out: dict[str, Any] = {}
    for key, value in profile.items():
        if key in ("deadline", "lifespan", "liveliness_lease_duration"):
            out[f"{key}_ns"] = ns(value)
        elif key.endswith("_ns"):
            out[key] = ns(value)
        elif key in ("history", "depth", "reliability", "durability", "liveliness", "avoid_ros_namespace_conventions"):
            out[key] = value
        else:
            raise ValueError(f"unknown QoS profile field {key!r}")
    return out
