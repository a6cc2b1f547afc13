"""Every node on bad start-up parameters: one line naming the parameter, its value and what is allowed, exit 2,
no traceback; ``--help`` lists every parameter with its default. New nodes join the table."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

# (node, --ros-args parameters, words the one-line message must hold)
BAD_PARAMETERS = [
    ("sim_node", ["camera_rate_hz:=0.0"], ["camera_rate_hz:=0.0", "[0.5, 90]"]),
    ("sim_node", ["weather:=[tornado]"], ["weather", "tornado", "sunny"]),
    ("sim_node", ["rover_names:=[a, a]"], ["rover_names", "unique"]),
    ("sim_node", ["seed:=abc"], ["seed:='abc'", "integer"]),
    ("sim_node", ["renderer:=vulkan"], ["renderer", "vulkan", "opengl"]),
    ("depth_node", ["threads:=0"], ["threads:=0", "[1, 16]"]),
    ("depth_node", ["threads:=abc"], ["threads:='abc'", "integer"]),
    ("depth_node", ["backend:=tensorflow"], ["backend", "tensorflow", "onnxruntime"]),
    ("depth_node", ["min_depth_m:=20.0", "max_depth_m:=10.0"], ["min_depth_m", "max_depth_m"]),
    ("sensor_sync_node", ["queue_size:=0"], ["queue_size:=0", "[1, 1000]"]),
    ("sensor_sync_node", ["left_wheel_joint:=w", "right_wheel_joint:=w"], ["left_wheel_joint", "different"]),
    ("capture_node", ["topics:=[]"], ["topics", "at least one"]),
    ("capture_node", ["compression:=rar"], ["compression", "rar", "zstd"]),
    ("capture_node", ["output_dir:={file}/bags"], ["output_dir", "is a file"]),
    ("capture_node", ["record_mode:=some"], ["record_mode", "some", "marked"]),
    ("trigger_node", ["novelty_distance:=3.0"], ["novelty_distance:=3.0", "[0.0, 2.0]"]),
    ("trigger_node", ["embedding:=rgb"], ["embedding", "rgb", "colour+depth"]),
    ("trigger_node", ["duplicate_distance:=0.5", "novelty_distance:=0.3"], ["duplicate_distance", "novelty_distance"]),
    ("collab_node", ["holdout_fraction:=2.0"], ["holdout_fraction:=2.0", "[0.0, 0.9]"]),
    ("collab_node", ["models_dir:={file}/models"], ["models_dir", "is a file"]),
    ("collab_node", ["model:=resnet"], ["model", "resnet", "autoencoder"]),
]


def _run(node: str, arguments: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "ROS_LOG_DIR": str(tmp_path / "ros_log")}
    return subprocess.run([sys.executable, "-m", f"forest_perception.nodes.{node}", *arguments], env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize(("node", "parameters", "words"), BAD_PARAMETERS,
                         ids=[f"{n}-{'-'.join(p)}" for n, p, _ in BAD_PARAMETERS])
def test_bad_start_up_parameter_is_one_line_and_exit_2(node, parameters, words, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    arguments = ["--ros-args"] + [a for p in parameters for a in ("-p", p.format(file=afile))]
    result = _run(node, arguments, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output, output
    line = next(line for line in result.stderr.splitlines() if line.startswith(f"{node}: error:"))
    for word in words:
        assert word in line, (word, line)


@pytest.mark.parametrize("node", ["sim_node", "depth_node", "sensor_sync_node", "capture_node", "trigger_node",
                                  "collab_node"])
def test_help_lists_every_parameter_with_its_default_and_exits(node, tmp_path):
    result = _run(node, ["--help"], tmp_path)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    for spec in importlib.import_module(f"forest_perception.nodes.{node}").PARAMS:
        line = next((line for line in result.stdout.splitlines() if line.strip().startswith(spec.name + " ")), "")
        assert f"default {spec.default!r}" in line, (spec.name, result.stdout)
