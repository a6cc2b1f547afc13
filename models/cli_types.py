"""Help formatting and output-path types shared by ``forest-train`` and ``python -m forest_perception.models.release``.

The input types (existing files and folders, sizes, numbers) are ``forest_perception.cli_args``'s; these add the
checks of ``models.outputs`` for what the commands write, so a bad ``--out`` is refused before any work starts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from forest_perception.cli_args import DefaultsHelpFormatter
from forest_perception.models.outputs import check_output_file, check_output_folder


class RawDefaultsHelpFormatter(DefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``DefaultsHelpFormatter`` that prints the description as written (a module docstring with examples)."""


def output_folder(text: str) -> Path:
    """An output folder that exists or can be created: neither it nor a folder above it is a file."""
    try:
        return check_output_folder(text, flag="folder")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def onnx_output(text: str) -> Path:
    """An output ``.onnx`` file in a folder that exists or can be created."""
    try:
        return check_output_file(text, flag="file", suffix=".onnx")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
