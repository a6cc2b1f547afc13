"""The health of a sensor_sync_node, per sensor and as a whole, from the assembler's summary."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from forest_perception.diagnostics import ERROR, OK, WARN, worse
from forest_perception.sync.base import GPS_STALE, KINDS, TOPICS
from forest_perception.sync.odometry import OdometryState

Status = tuple[bytes, str, dict[str, Any]]


def sensor_health(kind: str, stream: Mapping[str, Any], malformed: int, missing: bool, used: bool,
                  gps_stale: bool) -> Status:
    """(level, message, values) of one sensor stream: ERROR when colour images are missing, WARN others."""
    values = {
        "topic": TOPICS[kind], "rate_hz": stream["rate_hz"], "lag_s": stream["lag_s"],
        "received": stream["received"], "malformed": malformed, "duplicates": stream["duplicates"],
        "late": stream["late"], "dropped": stream["dropped"], "used_in_frames": stream["used"],
        "missing_in_frames": stream["missing_in_frames"],
    }
    if kind == "gps":
        values.update({"stale_frames": stream["stale"], "no_fix": stream["no_fix"]})
    if not used:
        return OK, "not used (use_depth is false)", values
    if missing:
        level = ERROR if kind == "image" else WARN
        return level, "missing: no messages" if stream["received"] == 0 else "missing: stopped", values
    if kind == "gps" and gps_stale:
        return WARN, "stale fix", values
    return OK, "ok", values


def sync_health(summary: Mapping[str, Any], malformed: Mapping[str, int], odometry: OdometryState,
                odometry_counts: Mapping[str, int], published: Mapping[str, int], last_flags: frozenset[str],
                use_depth: bool, last_error: str, resets_reported: int) -> tuple[Status, dict[str, Status]]:
    """The node's status and one per sensor, from :meth:`SensorSync.summary` and the node's counters.

    Missing colour images are an ERROR (no frames at all); other missing sensors, a stale GPS fix
    and a clock reset not reported before are WARN.
    """
    missing = [k for k in summary["missing"] if k != "depth" or use_depth]
    streams = summary["streams"]
    gps_stale = GPS_STALE in last_flags
    per_sensor = {kind: sensor_health(kind, streams[kind], malformed[kind], kind in missing,
                                      kind != "depth" or use_depth, gps_stale) for kind in KINDS}
    values: dict[str, Any] = {
        "frames_published": published["frames"], "frames_incomplete": summary["frames_incomplete"],
        "frames_pending": summary["pending"], "missing_sensors": ",".join(missing) or "none",
        "gps_stale": gps_stale, "clock_resets": summary["clock_resets"], "malformed": sum(malformed.values()),
        "last_error": last_error, "odom_published": published["odom"], "odom_x_m": odometry.x,
        "odom_y_m": odometry.y, "odom_yaw_rad": odometry.yaw, "odom_distance_m": odometry.distance_m,
        "odom_imu_gaps": odometry_counts["imu_gaps"], "odom_encoder_jumps": odometry_counts["jumps"],
        "gps_enu_published": published["enu"],
    }
    for kind in KINDS:
        values[f"{kind}_rate_hz"] = streams[kind]["rate_hz"]
        values[f"{kind}_dropped"] = streams[kind]["dropped"] + streams[kind]["late"] + malformed[kind]
    level, message = OK, "synchronising"
    if "image" in missing:
        level, message = ERROR, "no colour images: no frames"
    elif missing:
        level, message = WARN, f"missing sensors: {', '.join(missing)}"
    elif gps_stale:
        level, message = WARN, "gps fix is stale"
    if summary["clock_resets"] > resets_reported:
        level = worse(level, WARN)
        message += f"; clock reset ({summary['clock_resets']} so far)"
    return (level, message, values), per_sensor
