"""Flower apps of the swarm: the cloud coordinator ServerApp, the rover ClientApp and what they share.

The apps (:mod:`.server_app`, :mod:`.client_app`), their task (:mod:`.task`), messages (:mod:`.messages`),
strategies (:mod:`.rover_strategy`, :mod:`.strategies`), the coordinator's store (:mod:`.store`), the
simulated population (:mod:`.population`, :mod:`.rover_data`), :mod:`.local_grid`, and the harnesses on top:
:mod:`.simulation` and :mod:`.cli` (``forest-fl``). Importing this package imports nothing heavy.
"""

from importlib import resources
from pathlib import Path

LOOPBACK_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    # Ray resolves 127.0.0.1 to the machine's external address unless "clusters" are off;
    # with them off every Ray gRPC server binds to 127.0.0.1 only
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}
"""Environment of every Flower and Ray process started here: no telemetry, update checks or installs; loopback."""


def app_dir() -> Path:
    """The Flower app folder (``app/pyproject.toml``: components and run config) that ``flwr run`` submits."""
    return Path(str(resources.files(__name__) / "app"))
