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
        self.decisions: list[dict[str, Any]] = []
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
                self.current = data.get("current")
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
               model: GlobalModel | None = None) -> None:
        """Remember a decision; a deployed one becomes ``current`` (with its arrays, the base of local training)."""
        entry = {**decision.to_dict(), "key": key, "deployed": bool(deployed), "deploy_error": deploy_error}
        self.decisions = (self.decisions + [entry])[-self.history:]
        if deployed:
            self.current = {"model_path": decision.model_path, "model_version": decision.model_version,
                            "round": decision.round, "label": decision.label, "deployed_at": time.time()}
            if model is not None:
                write_global_model_file(self.models_dir / CURRENT_ARRAYS_FILE, model)
        self.save()

    def save(self) -> None:
        """Write the ledger atomically."""
        self.models_dir.mkdir(parents=True, exist_ok=True)
        data = {"current": self.current, "decisions": self.decisions}
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
