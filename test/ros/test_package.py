"""Packaging checks: package.xml, setup.py entry points, launch files against the nodes' parameters."""

from __future__ import annotations

import ast
import importlib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _setup_call() -> ast.Call:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup":
            return node
    raise AssertionError("setup() call not found in setup.py")


def console_scripts() -> dict[str, str]:
    """name -> 'module:function' from setup.py."""
    call = _setup_call()
    for kw in call.keywords:
        if kw.arg == "entry_points":
            entry_points = ast.literal_eval(kw.value)
            return dict((part.strip() for part in line.split("=", 1)) for line in entry_points["console_scripts"])
    raise AssertionError("no entry_points in setup.py")


def launch_nodes() -> list[tuple[Path, dict]]:
    """Every launch_ros Node(...) in launch/*.launch.py with its literal keyword arguments."""
    found = []
    for path in sorted((ROOT / "launch").glob("*.launch.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "Node":
                kwargs = {}
                for kw in node.keywords:
                    if kw.arg in ("package", "executable", "name") and isinstance(kw.value, ast.Constant):
                        kwargs[kw.arg] = kw.value.value
                    if kw.arg == "parameters" and isinstance(kw.value, ast.List):
                        keys = []
                        for item in kw.value.elts:
                            if isinstance(item, ast.Dict):
                                keys += [k.value for k in item.keys if isinstance(k, ast.Constant)]
                        kwargs["parameter_keys"] = keys
                found.append((path, kwargs))
    return found


def test_package_xml_is_format_3_ament_python():
    root = ET.parse(ROOT / "package.xml").getroot()
    assert root.tag == "package" and root.get("format") == "3"
    assert root.findtext("name") == "forest_perception"
    assert root.find("export/build_type").text == "ament_python"
    deps = {e.text for e in root.findall("exec_depend")}
    for needed in ("rclpy", "sensor_msgs", "nav_msgs", "diagnostic_msgs", "rosgraph_msgs", "launch_ros"):
        assert needed in deps, f"package.xml lacks exec_depend {needed}"


def test_package_xml_lists_message_packages_the_code_imports():
    deps = {e.text for e in ET.parse(ROOT / "package.xml").getroot().findall("exec_depend")}
    imported = set()
    for path in list((ROOT / "forest_perception").rglob("*.py")) + list((ROOT / "dataset_tools").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                top = node.module.split(".")[0]
                if top.endswith("_msgs") or top in ("rclpy", "rosgraph_msgs", "builtin_interfaces"):
                    imported.add(top)
    imported.discard("builtin_interfaces")  # pulled in by every message package
    missing = imported - deps
    assert not missing, f"imported but not exec_depend in package.xml: {sorted(missing)}"


def test_every_console_script_resolves():
    scripts = console_scripts()
    assert "sim_node" in scripts
    for name, target in scripts.items():
        module, func = target.split(":")
        mod = importlib.import_module(module)
        assert callable(getattr(mod, func)), f"{name} -> {target} is not callable"


def test_every_node_module_is_a_console_script():
    scripts = set(console_scripts().values())
    for path in sorted((ROOT / "forest_perception" / "nodes").glob("*_node.py")):
        target = f"forest_perception.nodes.{path.stem}:main"
        assert target in scripts, f"{path.name} has no console_scripts entry"


def test_launch_files_use_existing_executables_and_declared_parameters(rclpy_context):
    from rclpy.parameter import Parameter

    from forest_perception.nodes.sim_node import SimNode

    declared = {}

    node = SimNode(
        context=rclpy_context,
        parameter_overrides=[Parameter("world_size_m", value=12.0), Parameter("real_time_factor", value=0.0)],
    )
    try:
        declared["sim_node"] = set(node._parameters)
    finally:
        node.destroy_node()
    from forest_perception.nodes.depth_node import DepthNode

    # a model that does not exist: the node must still construct (and report the error on /diagnostics)
    node = DepthNode(context=rclpy_context, parameter_overrides=[Parameter("model_path", value="/no/such/model.onnx")])
    try:
        declared["depth_node"] = set(node._parameters)
    finally:
        node.destroy_node()

    from forest_perception.nodes.sensor_sync_node import SensorSyncNode

    node = SensorSyncNode(context=rclpy_context)
    try:
        declared["sensor_sync_node"] = set(node._parameters)
    finally:
        node.destroy_node()
    from forest_perception.nodes.capture_node import CaptureNode

    node = CaptureNode(context=rclpy_context, parameter_overrides=[Parameter("autostart", value=False)])
    try:
        declared["capture_node"] = set(node._parameters)
    finally:
        node.destroy_node()

    from forest_perception.nodes.trigger_node import TriggerNode

    node = TriggerNode(context=rclpy_context)
    try:
        declared["trigger_node"] = set(node._parameters)
    finally:
        node.destroy_node()

    from forest_perception.nodes.collab_node import CollabNode

    node = CollabNode(context=rclpy_context)
    try:
        declared["collab_node"] = set(node._parameters)
    finally:
        node.destroy_node()

    scripts = console_scripts()
    nodes = launch_nodes()
    assert nodes, "no launch_ros Node actions found in launch/"
    for path, kwargs in nodes:
        if kwargs.get("package") != "forest_perception":
            continue
        executable = kwargs["executable"]
        assert executable in scripts, f"{path.name}: executable {executable!r} is not a console script"
        for key in kwargs.get("parameter_keys", []):
            assert key in declared.get(executable, set()), f"{path.name}: {executable} declares no {key!r}"

    checked = set()
    for cfg in sorted((ROOT / "config").glob("*.yaml")):
        for node_name, parameters in yaml_node_parameters(yaml.safe_load(cfg.read_text())):
            if node_name not in declared:
                continue
            checked.add(node_name)
            unknown = set(parameters) - declared[node_name]
            assert not unknown, f"{cfg.name}: {node_name} has undeclared parameters {sorted(unknown)}"
    assert checked == set(declared), f"no YAML parameters found for {sorted(set(declared) - checked)}"
    launched = {kwargs.get("executable") for _, kwargs in nodes}
    for executable in ("depth_node", "sensor_sync_node", "capture_node", "trigger_node", "collab_node"):
        assert executable in launched, f"no launch file starts {executable}"


def yaml_node_parameters(data: dict, prefix: str = "") -> list[tuple[str, dict]]:
    """(node name, ros__parameters) of a ROS 2 parameter file: ``node:``, ``/ns/node:``, ``/**/node:`` or nested."""
    found = []
    for key, body in (data or {}).items():
        if not isinstance(body, dict):
            continue
        path = f"{prefix}/{key}".strip("/")
        if "ros__parameters" in body:
            found.append((path.rsplit("/", 1)[-1], body["ros__parameters"]))
        else:
            found += yaml_node_parameters(body, path)
    return found


def test_fastdds_profile_keeps_udp_on_loopback():
    root = ET.parse(ROOT / "config" / "fastdds_loopback.xml").getroot()
    ns = {"d": "http://www.eprosima.com"}
    addresses = [a.text for a in root.iterfind(".//d:interfaceWhiteList/d:address", ns)]
    assert addresses == ["127.0.0.1"]
    segment = root.find(".//d:segment_size", ns)
    assert segment is not None and int(segment.text) >= 640 * 480 * 3 * 2


def test_ros_env_fixture_sets_loopback(ros_env):
    import os

    assert os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "LOCALHOST"
    assert 0 < int(os.environ["ROS_DOMAIN_ID"]) <= 101
    assert Path(os.environ["FASTDDS_DEFAULT_PROFILES_FILE"]).is_file()


@pytest.mark.parametrize("node", ["sim_node", "depth_node", "sensor_sync_node", "capture_node", "trigger_node",
                                  "collab_node"])
def test_docs_list_every_parameter_of_every_node(node):
    text = (ROOT / "docs" / "nodes.md").read_text()
    start = text.index(f"## {node}\n")
    end = text.find("\n## ", start + 1)
    section = text[start:end if end > 0 else None]
    for spec in importlib.import_module(f"forest_perception.nodes.{node}").PARAMS:
        assert f"| `{spec.name}` | `{spec.default!r}` |" in section, f"docs/nodes.md ({node}) lacks {spec.name}"
