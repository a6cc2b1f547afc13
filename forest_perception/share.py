"""Where the package's share files (``config/``, ``launch/``, ``scripts/``) are, installed or not.

``setup.py`` installs them under ``<prefix>/share/forest_perception``; a colcon workspace names that
folder in the ament index; in a source checkout they sit beside ``package.xml``.
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

PACKAGE = "forest_perception"


def share_dirs() -> list[Path]:
    """Candidate share folders, most specific first: source tree, ament index, install prefixes."""
    candidates = []
    source = Path(__file__).resolve().parent.parent
    if (source / "package.xml").is_file() and (source / PACKAGE).is_dir():
        candidates.append(source)
    try:  # a colcon / ROS install
        from ament_index_python.packages import get_package_share_directory

        candidates.append(Path(get_package_share_directory(PACKAGE)))
    except Exception:  # noqa: BLE001 - no ament index, or the package is not in it
        pass
    # pip puts data_files under the prefix of the interpreter, or of --prefix (<prefix>/lib/pythonX.Y/site-packages)
    prefixes = [Path(sysconfig.get_paths()["data"]), Path(sys.prefix)]
    site = Path(__file__).resolve().parents[1]
    if site.name in ("site-packages", "dist-packages"):
        prefixes.append(site.parents[2])
    candidates += [prefix / "share" / PACKAGE for prefix in prefixes]
    return list(dict.fromkeys(candidates))


def share_path(*parts: str) -> Path:
    """The first existing ``<share>/<parts>``; ``FileNotFoundError`` naming every folder searched."""
    tried = []
    for root in share_dirs():
        path = root.joinpath(*parts)
        if path.exists():
            return path
        tried.append(str(path))
    raise FileNotFoundError(f"{'/'.join(parts)} not found; looked in {', '.join(tried)}")
