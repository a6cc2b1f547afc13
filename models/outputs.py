"""What the model tools write: output paths checked before any work starts, files that appear whole or not at all.

``check_output_folder`` refuses, without creating anything, a folder that cannot be made (it or a folder above
it is a file, or the nearest existing folder is read-only); ``temporary_sibling`` names the hidden file a result
is written to before ``os.replace`` moves it into place, so an interrupted or failed command leaves no half-written
file under the real name. The rules are in docs/training.md ("What a run writes", "Export").
"""

from __future__ import annotations

import os
from pathlib import Path

from forest_perception.cli_args import folder_problem


def check_output_folder(path: str | os.PathLike, flag: str = "--out") -> Path:
    """``path`` as a folder that exists or can be created; ``ValueError`` naming ``flag`` otherwise (writes nothing)."""
    problem = folder_problem(path, f"{flag} {str(path)!r}")
    if problem:
        raise ValueError(problem)
    return Path(path)


def check_output_file(path: str | os.PathLike, flag: str = "--out", suffix: str | None = None) -> Path:
    """``path`` as a file that can be written, in a folder that exists or can be created (writes nothing)."""
    path = Path(path)
    if suffix is not None and path.suffix.lower() != suffix:
        raise ValueError(f"{flag} {str(path)!r} must end in {suffix}")
    if path.is_dir():
        ending = f" ending in {suffix}" if suffix else ""
        raise ValueError(f"{flag} {str(path)!r} is a folder; give a file name{ending}")
    problem = folder_problem(path.parent, f"{flag} {str(path)!r}", holds_output=True)
    if problem:
        raise ValueError(problem)
    return path


def temporary_sibling(path: str | os.PathLike) -> Path:
    """A hidden ``.tmp`` name beside ``path`` for writing before ``os.replace(tmp, path)``.

    It does not end in the real suffix, so nobody looking for ``*.onnx`` models picks up a half-written one.
    """
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary sibling: readers see the old file or the new one, never half."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
