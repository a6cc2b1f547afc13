"""The command line every experiment script shares: ``--quick``, ``--seeds``, ``--out``.

Run from the repository root as ``python -m experiments.<name>`` (``make experiments`` runs
``python -m experiments.run_all``); see ``docs/experiments.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
"""Where ``run_all`` and the scripts write by default."""


def experiment_arguments(description: str) -> argparse.ArgumentParser:
    """The options every experiment script takes: ``--quick``, ``--seeds``, ``--out``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="the few-minute configuration (one seed, fewer rounds)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the configuration's seeds")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help=f"output folder (default {RESULTS_DIR})")
    return parser


def pick_config(config_class: type, quick: bool, seeds: Sequence[int] | None = None) -> Any:  # noqa: ANN401
    """``config_class.quick()`` or ``config_class()``, with ``seeds`` replaced when given."""
    config = config_class.quick() if quick else config_class()
    if seeds:
        config = dataclasses.replace(config, seeds=tuple(int(s) for s in seeds))
    return config


def run_experiment(experiment: ModuleType, config_class: type, argv: Sequence[str] | None = None) -> None:
    """An experiment script's ``main``: its configuration from the options, ``run``, then its table."""
    args = experiment_arguments(experiment.__doc__.split("\n")[0]).parse_args(argv)
    config = pick_config(config_class, args.quick, args.seeds)
    result = experiment.run(config, args.out)
    print(experiment.table(result))
    print(f"\n{experiment.NAME}: {result['elapsed_s']:.0f} s; results in {args.out}")
