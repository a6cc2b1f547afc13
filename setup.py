"""ament_python package definition for forest_perception."""

from glob import glob

from setuptools import find_packages, setup
from setuptools.command.develop import develop

PACKAGE = "forest_perception"
# `ros2 run` looks for executables in lib/<package>: setup.cfg says so for `install`; `develop` (what
# `colcon build --symlink-install` runs) takes the same option only before setuptools 80, which refuses
# it, so it is set here where supported instead of in setup.cfg.
_DEVELOP_OPTIONS = (
    {"develop": {"script_dir": f"$base/lib/{PACKAGE}"}}
    if any(opt[0].startswith("script-dir") for opt in develop.user_options) else {}
)


def _files(pattern: str) -> list[str]:
    return sorted(p for p in glob(pattern, recursive=True) if not p.endswith(".pyc"))


setup(
    name=PACKAGE,
    version="0.1.0",
    # Only forest_perception is installed; models/, collab/ and dataset_tools/ stay top-level folders of
    # the repository and are its subpackages through the symlinks forest_perception/{models,collab,
    # dataset_tools} (docs/architecture.md): the same tree for pip (editable or not), wheels and develop.
    packages=find_packages(include=[PACKAGE, f"{PACKAGE}.*"]),
    package_data={
        f"{PACKAGE}.models.weights": ["*.onnx", "*.pt", "*.md", "*.json", "*.csv", "*.png"],
        f"{PACKAGE}.collab.flower": ["app/pyproject.toml"],
    },
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", _files("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", _files("config/*.yaml") + _files("config/*.xml")),
        (f"share/{PACKAGE}/scripts", ["scripts/make_certs.sh"]),
        (f"share/{PACKAGE}/models", _files("models/weights/*.onnx") + _files("models/weights/*.pt")
         + _files("models/weights/*.md")
         + _files("models/weights/*.json")),
    ],
    options=_DEVELOP_OPTIONS,
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="forest_perception developers",
    maintainer_email="forest-perception@example.org",
    description="Perception and learning stack for a swarm of small forest rovers.",
    license="Apache-2.0",
    tests_require=["pytest"],
    entry_points={
        "console_scripts": [
            # ROS 2 nodes (ros2 run forest_perception <name>)
            "sim_node = forest_perception.nodes.sim_node:main",
            "depth_node = forest_perception.nodes.depth_node:main",
            "sensor_sync_node = forest_perception.nodes.sensor_sync_node:main",
            "capture_node = forest_perception.nodes.capture_node:main",
            "trigger_node = forest_perception.nodes.trigger_node:main",
            "collab_node = forest_perception.nodes.collab_node:main",
            # command-line tools
            "forest-sim = forest_perception.sim.cli:main",
            "forest-dataset = forest_perception.dataset_tools.cli:main",
            "forest-train = forest_perception.models.cli:main",
            "forest-fl = forest_perception.collab.flower.cli:main",
        ],
    },
)
