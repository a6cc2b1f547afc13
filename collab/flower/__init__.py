"""Flower apps of the swarm: the cloud coordinator ServerApp, the rover ClientApp and their simulation.

- :mod:`.strategies`: one Flower strategy per algorithm of :mod:`forest_perception.collab.algorithms`;
- :mod:`.server_app`: the coordinator (resumable round loop, state in SQLite);
- :mod:`.client_app`: the rover (local training of the depth network);
- :mod:`.store`: the coordinator's SQLite store;
- :mod:`.task`: model, local data, train and evaluate, run config defaults;
- :mod:`.simulation`: virtual rover population and the Ray simulation runner;
- :mod:`.cli`: the ``forest-fl`` command.

Importing this package imports nothing heavy; import the module you need.
"""

from importlib import resources
from pathlib import Path


def app_dir() -> Path:
    """The Flower app folder (``app/pyproject.toml``: components and run config) that ``flwr run`` submits."""
    return Path(str(resources.files(__name__) / "app"))
