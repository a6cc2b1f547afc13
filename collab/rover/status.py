"""collab_node's health from its status: the ``/diagnostics`` level, message and values, and the status text."""

from __future__ import annotations

import json
from typing import Any

from forest_perception.collab.rover.files import json_clean
from forest_perception.collab.supervisor import BACKOFF, FAILED
from forest_perception.diagnostics import ERROR, OK, WARN


def status_text(status: dict[str, Any]) -> str:
    """``collab/status`` as JSON text (NaN as null, keys sorted)."""
    return json.dumps(json_clean(status), sort_keys=True)


def collab_health(status: dict[str, Any]) -> tuple[bytes, str, dict[str, object]]:
    """(level, message, key/values) of a :meth:`~forest_perception.collab.rover.agent.CollabAgent.status`."""
    last = status["last_gate"] or {}
    values: dict[str, object] = {
        "state": status["state"],
        "global_round": status["round"],
        "model_version": status["model_version"],
        "model_path": status["model_path"],
        "last_gate": f"{last.get('label', '')}: {last.get('code', '')}: {last.get('reason', '')}" if last else "",
        "idle": status["idle"],
        "idle_reason": status["idle_reason"],
        "dataset_frames": status["dataset"]["frames"],
        "holdout_frames": status["dataset"]["holdout_frames"],
        **{f"count_{k}": v for k, v in status["counts"].items()},
        "last_error": status["last_error"],
    }
    supernode = status["supernode"]
    if supernode["enabled"]:
        values.update({"supernode_state": supernode["state"], "supernode_restarts": supernode["restarts"],
                       "supernode_node_id": supernode["node_id"], "supernode_last_line": supernode["last_line"],
                       "supernode_reason": supernode["reason"]})
    errors = [status["fault"]] if status["fault"] else []
    if supernode["enabled"] and supernode["state"] == FAILED:
        errors.append(f"SuperNode: {supernode['reason']}")
    if errors:
        return ERROR, "; ".join(errors), values
    if supernode["enabled"] and supernode["state"] == BACKOFF:
        return WARN, f"SuperNode: {supernode['reason']}", values
    if last.get("deploy_error"):
        return WARN, f"deploy failed: {last['deploy_error']}", values
    dataset = status["dataset"]
    if not dataset.get("dir_exists", True):
        return WARN, (f"dataset_dir {dataset['dir']!r} does not exist: no recordings to validate new models "
                      "on or to train with (record with capture_node, then forest-dataset extract)"), values
    if not dataset["holdout_frames"]:
        return WARN, "no held-out frames: new models cannot be validated", values
    return OK, status["state"], values
