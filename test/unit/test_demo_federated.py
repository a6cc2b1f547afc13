"""The demo's federated step keeps its coordinator store in its own output folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from forest_perception.collab.flower import simulation
from forest_perception.demo import federated, swarm


class _StopError(Exception):
    pass


def test_the_demo_store_lives_in_the_demo_folder_not_the_working_folder(tmp_path, monkeypatch):
    """A store in the working folder would be resumed by the next `make demo`, showing the last run's rounds."""
    seen = {}

    def fake_record(spec, out, reuse=True):
        return swarm.SwarmResult({"rover_0": Path(out) / "rovers" / "rover_0"})

    def fake_run(spec):
        seen["spec"] = spec
        raise _StopError

    monkeypatch.setattr(swarm, "record_swarm", fake_record)
    monkeypatch.setattr(simulation, "run_simulation", fake_run)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(_StopError):
        federated.federated_swarm(tmp_path / "demo_output" / "federated", rovers=1, rounds=1)
    state_db = Path(seen["spec"].run_config["state-db"])
    assert state_db.is_absolute() and (tmp_path / "demo_output" / "federated") in state_db.parents
