"""What a rover decided and deployed, kept in its models dir so that a restarted node neither re-gates nor forgets."""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

from forest_perception.collab.rover.files import json_clean, write_bytes_atomic
from forest_perception.collab.rover.gate import GateDecision
from forest_perception.collab.rover.models import GlobalModel, read_global_model_file, write_global_model_file

LEDGER_FILE = "collab_ledger.json"
CURRENT_ARRAYS_FILE = "current.npz"


class DeploymentLedger:
    """What this rover decided and deployed, kept in the models dir across restarts."""

    def __init__(self, models_dir: str | os.PathLike, history: int = 50) -> None:
        self.models_dir = Path(models_dir)
        self.path = self.models_dir / LEDGER_FILE
        self.history = int(history)
        self.current: dict[str, Any] | None = None
        self.previous: dict[str, Any] | None = None  # what ran before current: the instant local rollback
        self.release_base: dict[str, Any] | None = None  # what ran before the first release: "no release" goes here
        self.declined = ""  # a release this rover rolled back locally: not switched to again while it is assigned
        self.decisions: list[dict[str, Any]] = []
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
                self.current = data.get("current")
                self.previous = data.get("previous")
                self.release_base = data.get("release_base")
                self.declined = str(data.get("declined") or "")
                self.decisions = list(data.get("decisions") or [])
            except (OSError, ValueError, AttributeError) as exc:
                # a damaged ledger only costs re-gating: keep it aside, never crash the node
                aside = self.path.with_name(f"{self.path.name}.damaged-{int(time.time())}")
                os.replace(self.path, aside)
                warnings.warn(f"ledger {self.path} was unreadable ({exc}); moved to {aside.name}", stacklevel=2)

    def seen(self, key: str) -> bool:
        """Whether the candidate with this key was decided already."""
        return any(d.get("key") == key for d in self.decisions)

    def record(self, key: str, decision: GateDecision, deployed: bool, deploy_error: str = "",
               model: GlobalModel | None = None, running: tuple[str, str] = ("", "")) -> None:
        """Remember a decision; a deployed one becomes ``current`` (with its arrays, the base of local training),
        and ``running`` (path, version: what the depth node ran until now) becomes ``previous``."""
        entry = {**decision.to_dict(), "key": key, "deployed": bool(deployed), "deploy_error": deploy_error}
        self.decisions = (self.decisions + [entry])[-self.history:]
        if deployed:
            self._deployed(key, decision.model_path, decision.model_version, decision.label, running,
                           round=decision.round)
            if model is not None:
                write_global_model_file(self.models_dir / CURRENT_ARRAYS_FILE, model)
        self.save()

    def _deployed(self, key: str, path: str, version: str, label: str, running: tuple[str, str],
                  **extra: Any) -> None:
        is_release = key.startswith("release:")
        if running[0] and running[0] != path:
            self.previous = {"model_path": running[0], "model_version": running[1],
                             "key": (self.current or {}).get("key", "") if (self.current or {}).get("model_path")
                             == running[0] else ""}
        if is_release and not str((self.current or {}).get("key", "")).startswith("release:") and running[0]:
            self.release_base = {"model_path": running[0], "model_version": running[1]}
        self.current = {"model_path": path, "model_version": version, "label": label, "key": key,
                        "deployed_at": time.time(), **extra}

    def switched(self, key: str, path: str, version: str, label: str, running: tuple[str, str]) -> None:
        """Remember a switch to a model gated before (a rollback, or a release assigned again)."""
        self._deployed(key, path, version, label, running, switched=True)
        self.save()

    def accepted_path(self, key: str) -> tuple[str, str] | None:
        """``(model path, version)`` of the last accepted decision on ``key`` whose file is still there."""
        for entry in reversed(self.decisions):
            if entry.get("key") == key and entry.get("accepted") and entry.get("model_path"):
                path = str(entry["model_path"])
                return (path, str(entry.get("model_version") or "")) if Path(path).is_file() else None
        return None

    def save(self) -> None:
        """Write the ledger atomically."""
        self.models_dir.mkdir(parents=True, exist_ok=True)
        data = {"current": self.current, "previous": self.previous, "release_base": self.release_base,
                "declined": self.declined, "decisions": self.decisions}
        write_bytes_atomic(self.path, (json.dumps(json_clean(data), indent=1) + "\n").encode())

    def current_model(self) -> GlobalModel | None:
        """The deployed model's arrays, if they were kept and are readable."""
        path = self.models_dir / CURRENT_ARRAYS_FILE
        if not path.is_file():
            return None
        try:
            return read_global_model_file(path)
        except ValueError:
            return None
