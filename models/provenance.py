"""Where a checkpoint or an exported model came from: the git commit of the code that made it, and the commands
recorded with it, written so that another person can run them (placeholders such as ``DATA`` for this machine's
folders)."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: A placeholder's name: upper case, as ``DATA``, ``RUN`` or ``CACHE`` in docs/training.md.
ALIAS_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
#: An absolute (or home-relative) path inside a recorded string; not the ``//`` of a URL, not ``a/b``.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])(~?/[\w.-][^\s'\",;)\]]*)")


def git_commit(path: str | os.PathLike | None = None) -> str | None:
    """Short (12-digit) commit of the repository holding ``path`` (default: this code), ``-dirty`` when modified.

    None outside a git checkout (an installed package) or when git is missing.
    """
    cwd = Path(path) if path else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True,
            timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "") if commit else None


@dataclass(frozen=True)
class PathAlias:
    """A placeholder written instead of one of this machine's folders in recorded commands (``DATA=/srv/forest``)."""

    name: str
    folder: str

    def spellings(self) -> list[str]:
        """The folder as given (absolute) and, when a symlink leads to it, its real path."""
        real = os.path.realpath(self.folder)
        return [self.folder] if real == self.folder else [self.folder, real]


def parse_path_alias(text: str) -> PathAlias:
    """``NAME=DIR`` as a :class:`PathAlias` (DIR made absolute); ``ValueError`` naming what is wrong."""
    name, sep, folder = text.partition("=")
    if not sep or not folder:
        raise ValueError(f"{text!r} is not NAME=DIR (for example DATA=/srv/forest_data)")
    if not ALIAS_NAME.match(name):
        raise ValueError(f"{text!r}: the placeholder {name!r} must be upper case letters, digits and _ (e.g. DATA)")
    absolute = os.path.abspath(os.path.expanduser(folder))
    if absolute == os.path.abspath(os.sep):
        raise ValueError(f"{text!r}: the root folder cannot be a placeholder (it would replace every path)")
    return PathAlias(name, absolute)


def replace_paths(value: Any, aliases: list[PathAlias] | tuple[PathAlias, ...]) -> Any:  # noqa: ANN401
    """``value`` with every aliased folder in its strings (also inside lists, tuples and dict values) written as its
    placeholder; the longest folder first, and only whole path components (``/data2`` is not ``/data`` + ``2``)."""
    pairs = sorted(((spelling, alias.name) for alias in aliases for spelling in alias.spellings()),
                   key=lambda pair: -len(pair[0]))
    patterns = [(re.compile(re.escape(folder.rstrip("/")) + r"(?![\w.-])"), name) for folder, name in pairs]

    def walk(item: Any) -> Any:  # noqa: ANN401
        if isinstance(item, str):
            for pattern, name in patterns:
                item = pattern.sub(name, item)
            return item
        if isinstance(item, (list, tuple)):
            return type(item)(walk(x) for x in item)
        if isinstance(item, dict):
            return {key: walk(x) for key, x in item.items()}
        return item

    return walk(value)


def training_record(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's entries but its tensors (``model_state``, ``optimizer_state``, ...): what it records."""
    return {key: value for key, value in checkpoint.items() if not key.endswith("_state")}


def replace_recorded_paths(checkpoint: Mapping[str, Any], aliases: Sequence[PathAlias]) -> dict[str, Any]:
    """``checkpoint`` (or its meta) with :func:`replace_paths` applied to its :func:`training_record`; tensors as
    they are."""
    return {**checkpoint, **replace_paths(training_record(checkpoint), list(aliases))}


def machine_paths(value: Any) -> list[str]:  # noqa: ANN401
    """Absolute paths (``/...``, ``~/...``) in the strings of ``value`` (lists, tuples, dict values), in order, once."""
    found: list[str] = []

    def walk(item: Any) -> None:  # noqa: ANN401
        if isinstance(item, str):
            for match in _ABSOLUTE_PATH.finditer(item):
                if match.group(1) not in found:
                    found.append(match.group(1))
        elif isinstance(item, (list, tuple)):
            for x in item:
                walk(x)
        elif isinstance(item, dict):
            for x in item.values():
                walk(x)

    walk(value)
    return found


def path_alias_arg(text: str) -> PathAlias:
    """argparse type of ``--path-alias NAME=DIR``."""
    try:
        return parse_path_alias(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


#: Options about how paths are recorded; left out of the command a card records.
RECORDING_FLAGS = ("--path-alias", "--keep-machine-paths")


def recorded_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--path-alias NAME=DIR`` and ``--keep-machine-paths``: they change no file but the recorded
    paths, and would record the very folders they hide."""
    out: list[str] = []
    skip = False
    for token in argv:
        if skip:
            skip = False
        elif token == "--path-alias":
            skip = True
        elif token not in RECORDING_FLAGS and not token.startswith(tuple(f"{flag}=" for flag in RECORDING_FLAGS)):
            out.append(token)
    return out
