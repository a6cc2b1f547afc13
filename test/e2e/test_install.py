"""The package installs four ways (pip editable, pip, setup.py develop, wheel) and every module imports from outside
the source tree; only ``forest_perception`` lands in site-packages, with its weights and Flower app."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SITE = Path(sysconfig.get_paths()["purelib"]).relative_to(sys.prefix)  # lib/pythonX.Y/site-packages

# Run in a fresh interpreter from a folder outside any source tree: forget the test venv's own
# (editable) forest_perception, add the install under test, import every module and check the data.
CHECK = r"""
import importlib, os, pkgutil, site, sys
from pathlib import Path

sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in str(getattr(f, "__module__", "")).lower()]
for name in [m for m in sys.modules if "editable" in m]:  # the install under test has a finder of the same name
    del sys.modules[name]
sys.path[:] = [p for p in sys.path if p and Path(p).resolve() != Path(os.environ["SOURCE"]).resolve()]
sys.path.insert(0, os.environ["SITE_DIR"])  # before the test venv: its .pth files import modules of the same names
site.addsitedir(os.environ["SITE_DIR"])
import forest_perception

where = Path(forest_perception.__file__).resolve()
assert str(where).startswith(os.environ["EXPECT_UNDER"]), f"forest_perception imported from {where}"
names = [m.name for m in pkgutil.walk_packages(forest_perception.__path__, "forest_perception.")]
for name in names:
    importlib.import_module(name)
for top in ("models", "collab", "dataset_tools", "experiments"):
    try:
        importlib.import_module(top)
    except ImportError:
        continue
    raise AssertionError(f"top-level package {top!r} is importable: only forest_perception may be installed")

from forest_perception.collab.flower import app_dir
from forest_perception.models.weights import shipped_model, shipped_models
from forest_perception.rosenv import fastdds_profile_path

assert (app_dir() / "pyproject.toml").is_file(), app_dir()
assert len(shipped_models()) >= 8 and shipped_model().stat().st_size > 100_000, shipped_models()
assert fastdds_profile_path().is_file()
print(len(names), "modules")
"""


def _copy_source(dest: Path) -> Path:
    """The files git knows (tracked and untracked, not ignored), symlinks kept: a clean checkout to build from."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src, dst = ROOT / rel, dest / rel
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the work tree
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        else:
            shutil.copy2(src, dst)
    return dest


def _run(command: list[str], cwd: Path, env: dict | None = None) -> None:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return _copy_source(tmp_path_factory.mktemp("src") / "forest_perception")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["pip-editable", "pip", "develop", "wheel"])
def test_install_and_import_every_module(how, source, tmp_path):
    # --ignore-installed: never uninstall the forest_perception of the environment running the tests
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--ignore-installed"]
    prefix = tmp_path / "prefix"
    site_dir = prefix / SITE
    expect_under = source
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    if how == "pip-editable":
        _run([*pip, "--prefix", str(prefix), "-e", "."], source, env)
    elif how == "pip":
        _run([*pip, "--prefix", str(prefix), "."], source, env)
        expect_under = site_dir
    elif how == "develop":
        site_dir = tmp_path / "develop"
        site_dir.mkdir()
        # what `colcon build --symlink-install` runs for an ament_python package
        _run([sys.executable, "setup.py", "-q", "develop", "--no-deps", "--install-dir", str(site_dir)], source,
             {**env, "PYTHONPATH": str(site_dir)})
    else:
        wheels = tmp_path / "wheels"
        _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), "."],
             source, env)
        (wheel,) = wheels.glob("forest_perception-*.whl")
        _run([*pip, "--prefix", str(prefix), str(wheel)], tmp_path, env)
        expect_under = site_dir
    if how in ("pip", "wheel"):
        installed = sorted(p.name for p in site_dir.iterdir() if not p.name.endswith((".dist-info", ".pth")))
        assert installed == ["forest_perception"], installed
        assert (prefix / "share" / "forest_perception" / "launch" / "rover.launch.py").is_file()
    assert importlib.util.find_spec("forest_perception").origin.startswith(str(ROOT)), "the test venv lost its install"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    check_env = {**env, "SITE_DIR": str(site_dir), "EXPECT_UNDER": str(expect_under.resolve()), "SOURCE": str(ROOT)}
    check_env.pop("PYTHONPATH", None)
    result = subprocess.run([sys.executable, "-c", CHECK], cwd=outside, env=check_env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "modules" in result.stdout
