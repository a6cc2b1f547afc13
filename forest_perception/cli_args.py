"""Input checks shared by every command line (forest-dataset, forest-train, forest-sim, forest-fl) and node.

Each one turns the text of one argument into a value or raises ``argparse.ArgumentTypeError`` naming the
text and what was expected (argparse puts the flag in front). Image sizes are written ``WIDTHxHEIGHT``
(``320x240``), as cameras and the shipped model files write them, and come back as ``(height, width)``,
the order numpy and the networks use. ``ArgumentParser`` reports a bad command line in one line.
docs/dataset_tools.md ("Command-line conventions") lists the flags.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import NoReturn


class UsageError(Exception):
    """A bad command line; the message is one line naming the program and what is wrong."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises ``UsageError`` (one line) instead of printing the usage and exiting.

    Give it to ``add_subparsers(parser_class=...)`` too; the entry point prints the error and returns 2.
    """

    def error(self, message: str) -> NoReturn:  # noqa: D102 - argparse hook
        raise UsageError(f"{self.prog}: error: {message}")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """``--help`` that shows every option's default, unless its help text already names one.

    Unlike ``argparse.ArgumentDefaultsHelpFormatter`` it leaves out defaults that say nothing
    (None, False, empty lists, on/off flags) and never repeats a default the help text gives itself.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "default" in text.lower()
            or default is None
            or default is False
            or default == []
            or default is argparse.SUPPRESS
            or not action.option_strings
            or action.nargs == 0  # flags (store_true / store_false): the default is the flag's absence
        ):
            return action.help
        as_size = action.type is image_size and not isinstance(default, str)  # argparse passes string defaults
        shown = str(format_image_size(default) if as_size else default).replace("%", "%%")
        return f"{text} (default: {shown})" if text else f"default: {shown}"


def command_parser(prog: str, description: str, **subparsers: object
                   ) -> tuple[ArgumentParser, argparse._SubParsersAction]:
    """A command's parser and its subcommand group (``dest="command"``): one-line errors and defaults in
    ``--help`` at every level; ``subparsers`` go to ``add_subparsers`` (e.g. ``metavar``)."""
    parser = ArgumentParser(prog=prog, description=description, formatter_class=DefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, **subparsers,
                                parser_class=partial(ArgumentParser, formatter_class=DefaultsHelpFormatter))
    return parser, sub


def image_size(text: str) -> tuple[int, int]:
    """``"320x240"`` (WIDTHxHEIGHT, pixels) -> ``(240, 320)``, i.e. (height, width)."""
    parts = text.strip().lower().split("x")
    try:
        width, height = (int(part) for part in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"image size must be WIDTHxHEIGHT in pixels like 320x240, got {text!r}"
        ) from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"image size must be positive WIDTHxHEIGHT like 320x240, got {text!r}")
    return height, width


def format_image_size(height_width: tuple[int, int]) -> str:
    """``(240, 320)`` -> ``"320x240"``: an (height, width) pair written as ``image_size`` reads it."""
    height, width = height_width
    return f"{int(width)}x{int(height)}"


def _number(text: str, kind: type, expected: str, allowed: Callable[[float], bool]) -> int | float:
    """``kind(text)`` if it is finite and ``allowed``; else ``ArgumentTypeError`` saying what was ``expected``."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or not allowed(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _number(text, int, "a positive integer", lambda value: value >= 1)


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    return _number(text, int, "an integer >= 0", lambda value: value >= 0)


def positive_float(text: str) -> float:
    """A finite number > 0."""
    return _number(text, float, "a number > 0", lambda value: value > 0)


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    return _number(text, float, "a number >= 0", lambda value: value >= 0)


def fraction(text: str) -> float:
    """A share of something, within (0, 1]."""
    return _number(text, float, "a fraction within (0, 1]", lambda value: 0 < value <= 1)


def float_within(low: float, high: float, *, high_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number within [``low``, ``high``] (``high`` excluded with ``high_open``)."""
    span = f"[{low:g}, {high:g}{')' if high_open else ']'}"

    def within(text: str) -> float:
        return _number(text, float, f"a number within {span}",
                       lambda value: low <= value and (value < high if high_open else value <= high))

    within.__name__ = f"number within {span}"
    return within


def int_within(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer within [``low``, ``high``]."""
    def within(text: str) -> int:
        return _number(text, int, f"an integer within [{low}, {high}]", lambda value: low <= value <= high)

    within.__name__ = f"integer within [{low}, {high}]"
    return within


def _existing(text: str, kind: str) -> Path:
    """``text`` as a path to an existing ``kind`` ('folder' or 'file')."""
    path = Path(text)
    present, other = (path.is_dir(), "file") if kind == "folder" else (path.is_file(), "folder")
    if not present:
        what = f"is a {other}, not a {kind}" if path.exists() else "does not exist"
        raise argparse.ArgumentTypeError(f"{kind} {text!r} {what}")
    return path


def existing_dir(text: str) -> Path:
    """A folder that exists."""
    return _existing(text, "folder")


def existing_file(text: str) -> Path:
    """A file that exists."""
    return _existing(text, "file")


def folder_problem(path: str | os.PathLike, label: str, holds_output: bool = False) -> str:
    """Why nothing can be written into the folder ``path``, "" when it can (it need not exist yet).

    The nearest existing one of the path and the folders above it decides: a file there, or a
    folder that refuses new entries. ``label`` names the input in the message (``"--out 'runs/x'"``,
    ``"output_dir:='bags'"``); with ``holds_output`` the label names a file to be written in ``path``.
    Creates nothing.
    """
    path = Path(os.path.expanduser(str(path)))
    for folder in (path, *path.absolute().parents):
        if not (folder.exists() or folder.is_symlink()):
            continue
        if not folder.is_dir():
            if folder == path and not holds_output:
                return f"{label} is a file, not a folder; give a folder"
            return f"{label} cannot be created: {str(folder)!r} is a file, not a folder; give a path not under a file"
        if not os.access(folder, os.W_OK | os.X_OK):
            return f"{label} cannot be written: the folder {str(folder)!r} is not writable"
        return ""
    return ""


def output_dir(text: str) -> Path:
    """A folder to write into: it may exist or not, but must not be a file nor lie under one."""
    problem = folder_problem(text, f"output folder {text!r}")
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return Path(text)


def output_file(text: str, suffix: str | None = None) -> Path:
    """A file to write: it may exist or not, but must not be a folder nor lie under a file."""
    path = Path(text)
    if suffix is not None and path.suffix.lower() != suffix:
        raise argparse.ArgumentTypeError(f"output file {text!r} must end in {suffix}")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"output file {text!r} is a folder; give a file name")
    problem = folder_problem(path.parent, f"output file {text!r}", holds_output=True)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return path


EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class InputError(Exception):
    """Input the command cannot use (a file, a flag's value, the state of a folder): one line for the user.

    Its message says what is wrong, which file or flag, and what to do; it is printed without a
    traceback. Raise it (or a ``ValueError`` / ``OSError``, which are expected too) from command code.
    """


# the failures a user can cause and fix; anything else (TypeError, KeyError, ...) is a bug and keeps its traceback
EXPECTED_ERRORS = (InputError, ValueError, OSError)


def describe_error(exc: BaseException) -> str:
    """One line for an expected failure; OS errors name their file ("No space left on device: 'x.png'")."""
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
        if exc.errno == errno.ENOTDIR:
            text = "a part of the path is a file, not a folder"
        names = [n for n in (exc.filename, exc.filename2) if n is not None]
        return f"{text}: {', '.join(repr(str(n)) for n in names)}" if names else text
    if isinstance(exc, UnicodeDecodeError):
        return f"not a text file (byte {exc.start} is not {exc.encoding}): {exc.reason}"
    return " ".join(str(exc).split()) or type(exc).__name__


def run_command(prog: str, parser: argparse.ArgumentParser, handle: Callable[[argparse.Namespace], int | None],
                argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run ``handle(args)``: THE place that turns expected failures into
    ``<prog> <command>: error: <what>`` on stderr and exit status 2; Ctrl-C exits 130 without a traceback.

    Unexpected exceptions propagate with their traceback (they are bugs to report); with
    ``FOREST_DEBUG=1`` in the environment expected ones do too.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    where = " ".join([prog, *[str(getattr(args, name)) for name in ("command", "verb") if getattr(args, name, None)]])
    try:
        return int(handle(args) or 0)
    except KeyboardInterrupt:
        print(f"{where}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except EXPECTED_ERRORS as exc:
        if os.environ.get("FOREST_DEBUG"):
            raise
        print(f"{where}: error: {describe_error(exc)}", file=sys.stderr)
        return EXIT_USAGE


def writable_folder_problem(name: str, folder: str) -> str:
    """Why a node could not write into ``folder`` (parameter ``name``), "" when it can (it may not exist yet)."""
    return folder_problem(folder, f"{name}:={str(folder)!r}")
