"""The swarm and cloud launch files, executed against a stand-in for the launch API (launch and launch_ros are not
installable here): the actions each produces for the arguments it is given."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


class Config:
    """LaunchConfiguration / PathJoinSubstitution / FindPackagePrefix stand-in: remembers what it names."""

    def __init__(self, name) -> None:  # noqa: ANN001
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


class Action:
    """Any launch action: its positional and keyword arguments."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        self.args, self.kwargs = args, kwargs


class Description:
    """LaunchDescription stand-in."""

    def __init__(self, entities) -> None:  # noqa: ANN001
        self.entities = list(entities)


@pytest.fixture
def launch_stubs(monkeypatch):
    modules = {
        "launch": {"LaunchDescription": Description},
        "launch.actions": {n: type(n, (Action,), {}) for n in ("DeclareLaunchArgument", "ExecuteProcess",
                                                              "IncludeLaunchDescription", "OpaqueFunction")},
        "launch.conditions": {"IfCondition": Action},
        "launch.launch_description_sources": {"PythonLaunchDescriptionSource": Action},
        "launch.substitutions": {"LaunchConfiguration": Config, "PathJoinSubstitution": Config},
        "launch_ros.actions": {"Node": type("Node", (Action,), {})},
        "launch_ros.substitutions": {"FindPackagePrefix": Config},
        "ament_index_python.packages": {"get_package_share_directory": lambda package: f"/share/{package}"},
    }
    for name, attributes in modules.items():
        module = types.ModuleType(name)
        module.__dict__.update(attributes)
        monkeypatch.setitem(sys.modules, name, module)
    for parent in ("launch_ros", "ament_index_python"):
        monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))


def load(name: str):  # noqa: ANN201
    spec = importlib.util.spec_from_file_location(name.replace(".", "_"), ROOT / "launch" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.generate_launch_description()


def arguments(description) -> dict[str, str]:  # noqa: ANN001
    return {a.args[0]: a.kwargs["default_value"] for a in description.entities
            if type(a).__name__ == "DeclareLaunchArgument"}


def test_swarm_sim_launches_every_rover_and_includes_the_cloud(launch_stubs):
    description = load("swarm_sim.launch.py")
    defaults = arguments(description)
    include = next(a for a in description.entities if type(a).__name__ == "IncludeLaunchDescription")
    assert include.args[0].args[0] == "/share/forest_perception/launch/cloud.launch.py"
    swarm = next(a for a in description.entities if type(a).__name__ == "OpaqueFunction").kwargs["function"]
    context = types.SimpleNamespace(launch_configurations={**defaults, "rovers": "3", "supernode": "False"})
    nodes = swarm(context)
    sim = [n for n in nodes if n.kwargs["executable"] == "sim_node"]
    assert len(sim) == 1 and sim[0].kwargs["parameters"][1]["rover_names"] == ["rover_0", "rover_1", "rover_2"]
    per_rover = {}
    for node in nodes[1:]:
        per_rover.setdefault(node.kwargs["namespace"], []).append(node.kwargs["executable"])
    assert per_rover == {f"rover_{i}": ["depth_node", "sensor_sync_node", "capture_node", "trigger_node",
                                        "collab_node"] for i in range(3)}
    collab = [n for n in nodes if n.kwargs["executable"] == "collab_node"][1].kwargs["parameters"][1]
    assert collab["model_source"] == "https://127.0.0.1:8470" and collab["supernode"] is False
    assert collab["auth_private_key"] == "certs/rovers/rover_1/auth.key"
    assert collab["dataset_dir"] == "data/swarm/rover_1" and collab["rover_id"] == "rover_1"
    capture = [n for n in nodes if n.kwargs["executable"] == "capture_node"][2].kwargs["parameters"][1]
    assert capture["output_dir"] == "bags/rover_2" and capture["record_mode"] == "marked"
    everything = swarm(types.SimpleNamespace(launch_configurations={**defaults, "rovers": "1", "triggers": "false"}))
    assert [n.kwargs["executable"] for n in everything].count("trigger_node") == 0
    assert [n for n in everything if n.kwargs["executable"] == "capture_node"][0].kwargs["parameters"][1][
        "record_mode"] == "all"
    quiet = swarm(types.SimpleNamespace(launch_configurations={**defaults, "rovers": "2", "record": "false",
                                                               "collab": "false"}))
    assert [n.kwargs["executable"] for n in quiet] == ["sim_node"] + ["depth_node", "sensor_sync_node"] * 2
    with pytest.raises(ValueError, match="rovers must be 1..64"):
        swarm(types.SimpleNamespace(launch_configurations={**defaults, "rovers": "0"}))


def test_cloud_launch_runs_the_superlink_and_the_release_server_on_loopback(launch_stubs, tmp_path):
    description = load("cloud.launch.py")
    assert arguments(description)["host"] == "127.0.0.1"
    processes = {a.kwargs["name"]: a.kwargs["cmd"] for a in description.entities
                 if type(a).__name__ == "ExecuteProcess"}
    assert set(processes) == {"superlink", "release_server"}
    assert processes["superlink"][1:3] == ["deploy", "--coordinator-only"]
    assert processes["release_server"][1:3] == ["release", "serve"]
    from forest_perception.collab.flower.cli import build_parser

    for cmd in processes.values():  # every flag the launch file passes is one forest-fl takes
        argv = [str(x) if not isinstance(x, Config) else "1" if x.name.endswith(("port", "host")) else str(tmp_path)
                for x in cmd[1:]]
        parsed = build_parser().parse_args(argv)
        assert parsed.host == "1"  # the host argument reached its flag
