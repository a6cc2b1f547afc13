"""The rover's Flower SuperNode under collab_node: started from the node's parameters, polled, reported.

By default (``supernode_clientapp`` ``warm``) the supervised process is the warm ClientApp worker, which runs the
SuperNode as its child in its process group: either one exiting ends the other, and the supervisor restarts both
(and stops both with the group). A problem with it is reported and the node runs on (gating and training do not
need it). See ``docs/federated.md`` ("Taking part in rounds: the SuperNode under collab_node").
"""

from __future__ import annotations

import threading
from typing import Any

from forest_perception.collab.deploy.supernode import SUPERNODE_READY
from forest_perception.collab.rover.settings import (
    Params,
    supernode_clientapp,
    supernode_launch,
    supernode_log,
    supernode_problem,
)
from forest_perception.collab.supervisor import FAILED, STOPPED, SuperNodeSupervisor

POLL_PERIOD_S = 1.0
"""How often collab_node looks at its SuperNode."""


class RoverSuperNode:
    """The supervisor of the rover's SuperNode (None until started), guarded for the node's callbacks."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = bool(enabled)
        self.supervisor: SuperNodeSupervisor | None = None
        self.error = ""  # why it was not started
        self._lock = threading.Lock()

    def start(self, p: Params, rover_id: str) -> tuple[bool, str]:
        """Start it with TLS and SuperNode authentication; ``(started, what to log)``."""
        problem = supernode_problem(p, rover_id)
        if not problem:
            try:
                argv, env = supernode_launch(p, rover_id)
                supervisor = SuperNodeSupervisor(argv, env, supernode_log(p), ready_pattern=SUPERNODE_READY)
            except (ValueError, OSError) as exc:
                problem = str(exc)
        if problem:
            self.error = f"SuperNode not started: {problem}"
            return False, self.error
        with self._lock:
            self.supervisor = supervisor
            state = supervisor.start()
        if state == FAILED:
            return False, f"SuperNode: {supervisor.reason}"
        return True, (f"SuperNode of rover {rover_id} started for {p['superlink_address']}, ClientApp "
                      f"{supernode_clientapp(p)} (log {supervisor.log_path})")

    def poll(self) -> tuple[str, str, str] | None:
        """Let the supervisor look at the process; ``(before, now, reason)`` when its state changed."""
        with self._lock:
            if self.supervisor is None:
                return None
            before = self.supervisor.state
            state = self.supervisor.poll()
            reason = self.supervisor.reason
        return None if state == before else (before, state, reason)

    def status(self) -> dict[str, Any]:
        """The SuperNode part of ``collab/status``: state, restarts, node id, last log line, reason."""
        with self._lock:
            if self.supervisor is None:
                return {"enabled": self.enabled, "state": FAILED if self.enabled else STOPPED, "restarts": 0,
                        "reason": self.error, "node_id": "", "last_line": "", "pid": None}
            status = self.supervisor.status()
        status["node_id"] = status.pop("ready_match")
        status["enabled"] = True
        return status

    def stop(self) -> None:
        """End its whole process group; the supervisor stays (``stopped``: polling it starts nothing)."""
        with self._lock:
            if self.supervisor is not None:
                self.supervisor.stop()
