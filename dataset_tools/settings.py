"""How to read one dataset: its depth encoding and column aliases, from ``forest_dataset.yaml`` and flags.

A dataset root may hold ``forest_dataset.yaml`` (``SETTINGS_FILE``); every tool that reads the dataset reads
it, and the command-line flags of ``add_reading_arguments`` override it key by key. The format is in
docs/dataset_layout.md ("Reading another dataset"). Pure core: PyYAML and the standard library.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from forest_perception.dataset_tools.images import (
    DEPTH_LARGER_FLAG,
    DEPTH_SCALE_FLAG,
    SETTINGS_FILE,
    DepthEncoding,
)
from forest_perception.dataset_tools.metadata import check_aliases

__all__ = [
    "COLUMN_ALIAS_FLAG",
    "SETTINGS_FILE",
    "DatasetSettings",
    "add_reading_arguments",
    "column_alias",
    "dataset_root_of",
    "load_settings",
    "resolve_settings",
    "settings_from_args",
    "write_settings",
]

COLUMN_ALIAS_FLAG = "--column-alias"
_RUN_DIR = re.compile(r"^Run-\d+$")
_KEYS = ("depth_scale_m_per_unit", "depth_larger_is_farther", "column_aliases")


@dataclass(frozen=True)
class DatasetSettings:
    """What a dataset states about itself; None / empty = not stated (the layout's defaults apply).

    ``source`` is the settings file these came from (or would come from), for messages.
    """

    depth_scale_m_per_unit: float | None = None
    depth_larger_is_farther: bool | None = None
    column_aliases: Mapping[str, str] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        self.depth_encoding()  # checks scale and direction
        check_aliases(self.column_aliases)

    def depth_encoding(self) -> DepthEncoding:
        """The ``DepthEncoding`` these settings state."""
        return DepthEncoding(self.depth_scale_m_per_unit, self.depth_larger_is_farther, self.source)

    @property
    def is_default(self) -> bool:
        """True when nothing is stated."""
        return self.depth_scale_m_per_unit is None and self.depth_larger_is_farther is None and not self.column_aliases

    def merged(self, overrides: DatasetSettings | None) -> DatasetSettings:
        """These settings with every value ``overrides`` states put over them (aliases key by key)."""
        if overrides is None:
            return self
        return replace(
            self,
            depth_scale_m_per_unit=_first(overrides.depth_scale_m_per_unit, self.depth_scale_m_per_unit),
            depth_larger_is_farther=_first(overrides.depth_larger_is_farther, self.depth_larger_is_farther),
            column_aliases={**self.column_aliases, **overrides.column_aliases},
        )

    def with_aliases(self, aliases: Mapping[str, str] | None) -> DatasetSettings:
        """These settings with ``aliases`` added over the stated ones."""
        return self if not aliases else replace(self, column_aliases={**self.column_aliases, **aliases})

    def to_yaml(self) -> str:
        """The text of a ``forest_dataset.yaml`` stating these settings."""
        data: dict[str, Any] = {}
        if self.depth_scale_m_per_unit is not None:
            data["depth_scale_m_per_unit"] = float(self.depth_scale_m_per_unit)
        if self.depth_larger_is_farther is not None:
            data["depth_larger_is_farther"] = bool(self.depth_larger_is_farther)
        if self.column_aliases:
            data["column_aliases"] = dict(self.column_aliases)
        head = "# How to read this dataset (docs/dataset_layout.md); forest-dataset and forest-train read it.\n"
        return head + (yaml.safe_dump(data, sort_keys=False) if data else "{}\n")


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML parser's complaint in a few words with its line: 'expected ',' or ']' at line 1, column 39'."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).split("\n", 1)[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def load_settings(root: str | os.PathLike) -> DatasetSettings:
    """The settings stated in ``root/forest_dataset.yaml`` (none stated when there is no such file).

    ``ValueError`` naming the file and the key for a file that is not text, not YAML, has unknown keys
    or a value of the wrong kind.
    """
    path = Path(root) / SETTINGS_FILE
    if not path.is_file():
        return DatasetSettings(source=str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not a text file (byte {exc.start} is not UTF-8); write it as YAML "
                         f"(docs/dataset_layout.md) or remove it") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML ({yaml_problem(exc)}); fix it or remove it") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must be a YAML mapping with keys {list(_KEYS)}, got {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in _KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; the keys are {list(_KEYS)}")
    scale = data.get("depth_scale_m_per_unit")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise ValueError(f"{path}: depth_scale_m_per_unit must be a number of metres per unit, got {scale!r}")
    farther = data.get("depth_larger_is_farther")
    if farther is not None and not isinstance(farther, bool):
        raise ValueError(f"{path}: depth_larger_is_farther must be true or false, got {farther!r}")
    aliases = data.get("column_aliases") or {}
    if not isinstance(aliases, dict) or not all(isinstance(k, str) for k in aliases):
        raise ValueError(f"{path}: column_aliases must map metadata.csv column names to standard columns, "
                         f"got {aliases!r}")
    aliases = {k: "" if v is None else str(v) for k, v in aliases.items()}
    try:
        return DatasetSettings(
            None if scale is None else float(scale), farther, aliases, source=str(path)
        )
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def dataset_root_of(segment_dir: str | os.PathLike) -> Path:
    """The dataset root a segment folder belongs to: the folder above its ``Run-N`` (else its parent)."""
    segment_dir = Path(segment_dir)
    parent = segment_dir.parent
    return parent.parent if _RUN_DIR.match(parent.name) else parent


def resolve_settings(
    root: str | os.PathLike, overrides: DatasetSettings | None = None, aliases: Mapping[str, str] | None = None
) -> DatasetSettings:
    """The settings a tool reads the dataset at ``root`` with: the file's, then ``overrides``, then ``aliases``."""
    return load_settings(root).merged(overrides).with_aliases(aliases)


def write_settings(root: str | os.PathLike, settings: DatasetSettings) -> Path | None:
    """Write ``settings`` as ``root/forest_dataset.yaml`` when they state anything; the path, or None."""
    if settings.is_default:
        return None
    path = Path(root) / SETTINGS_FILE
    path.write_text(settings.to_yaml(), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- command line


def column_alias(text: str) -> tuple[str, str]:
    """``"gx=angular_velocity_x"`` -> ``("gx", "angular_velocity_x")``; ``"status="`` keeps a column plain."""
    name, sep, target = text.partition("=")
    name, target = name.strip(), target.strip()
    if not sep or not name:
        raise argparse.ArgumentTypeError(
            f"expected NAME=COLUMN (a metadata.csv column name = a standard column, e.g. gx=angular_velocity_x), "
            f"got {text!r}"
        )
    try:
        check_aliases({name: target})
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return name, target


def add_reading_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that say how to read a dataset (they override its ``forest_dataset.yaml``)."""
    group = parser.add_argument_group(
        "reading the dataset", f"override {SETTINGS_FILE} at the dataset root (docs/dataset_layout.md)"
    )
    group.add_argument(
        DEPTH_SCALE_FLAG, dest="depth_scale", type=_positive_number, metavar="METRES_PER_UNIT",
        help="metres per depth PNG unit; needed for 8-bit depth PNGs (default: 16-bit PNGs are millimetres)",
    )
    group.add_argument(
        DEPTH_LARGER_FLAG, dest="depth_larger", choices=("farther", "nearer"),
        help="whether larger depth values are farther or nearer; needed for 8-bit depth PNGs "
             "(default: farther for 16-bit)",
    )
    group.add_argument(
        COLUMN_ALIAS_FLAG, dest="column_aliases", type=column_alias, action="append", default=[],
        metavar="NAME=COLUMN",
        help="read metadata.csv column NAME as the standard COLUMN (e.g. gx=angular_velocity_x; NAME= keeps it "
             "a plain column); repeat for more",
    )


def settings_from_args(args: argparse.Namespace) -> DatasetSettings:
    """The settings the flags of ``add_reading_arguments`` state (none stated when they were not given)."""
    larger = getattr(args, "depth_larger", None)
    return DatasetSettings(
        depth_scale_m_per_unit=getattr(args, "depth_scale", None),
        depth_larger_is_farther=None if larger is None else larger == "farther",
        column_aliases=dict(getattr(args, "column_aliases", None) or []),
        source="the command line",
    )


def _positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a number of metres per unit > 0, got {text!r}")
    return value
