"""Learning-rate tuning shared by the claim experiments: the same small grid for every method, best of each.

Each method (a "setting": an algorithm, or an algorithm and a start) is run at every learning rate of
the grid on a tuning seed that is not one of the reported seeds; the learning rate with the lowest score
(a held-out AbsRel averaged over the last rounds) is kept for that method, and the reported seeds run
at it. Reporting seeds the grid never saw keeps the choice from flattering any method. Experiment 1
(FedLaAvg) instead reports the whole grid on every seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from experiments.report import fmt, markdown_table, mean_std

RunSeed = Callable[[int, Mapping[str, float]], list[dict]]
"""``run_seed(seed, lr_of_setting)``: every setting on one seed, each at its learning rate; one run dict per setting."""


def tail_mean(rows: Sequence[Mapping[str, float]], key: str, count: int) -> float:
    """The mean of ``key`` over the last ``count`` rows that have it (NaN if none, or any of them is not finite)."""
    values = [float(row[key]) for row in rows if key in row][-count:]
    return float(np.mean(values)) if values and all(math.isfinite(v) for v in values) else math.nan


def tune(
    settings: Sequence[str],
    lrs: Sequence[float],
    tune_seed: int,
    run_seed: RunSeed,
    score: Callable[[dict], float],
    log: Callable[[str], None] = print,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Each setting's best learning rate of ``lrs`` on ``tune_seed`` (lowest finite ``score(run)``); and every trial.

    With one learning rate there is nothing to choose: it is returned for every setting and nothing runs.
    A setting whose every trial diverged (NaN score) gets the smallest learning rate of the grid.
    ``run_seed`` must return runs with a ``setting`` key naming one of ``settings``.
    """
    if not lrs:
        raise ValueError("the learning-rate grid is empty")
    if any(not (math.isfinite(lr) and lr > 0) for lr in lrs):
        raise ValueError(f"learning rates must be finite and > 0, got {list(lrs)}")
    if len(lrs) == 1:
        return {s: float(lrs[0]) for s in settings}, []
    trials: list[dict[str, Any]] = []
    for lr in lrs:
        runs = run_seed(tune_seed, {s: float(lr) for s in settings})
        found = {run["setting"]: run for run in runs}
        missing = sorted(set(settings) - set(found))
        if missing:
            raise ValueError(f"tuning run at lr {lr:g} returned no run for {missing}")
        for setting in settings:
            value = float(score(found[setting]))
            trials.append({"setting": setting, "lr": float(lr), "seed": tune_seed, "score": value})
        log(f"  tuning lr {lr:g}: " + ", ".join(f"{t['setting']} {t['score']:.3f}" for t in trials[-len(settings):]))
    best = {}
    for setting in settings:
        mine = [t for t in trials if t["setting"] == setting and math.isfinite(t["score"])]
        best[setting] = min(mine, key=lambda t: t["score"])["lr"] if mine else float(min(lrs))
    return best, trials


def tuning_table(trials: Sequence[Mapping[str, Any]], best: Mapping[str, float]) -> list[list[str]]:
    """Rows ``setting | score at each lr | chosen lr`` for a markdown table (empty without trials)."""
    lrs = sorted({t["lr"] for t in trials})
    rows = []
    for setting in dict.fromkeys(t["setting"] for t in trials):
        by_lr = {t["lr"]: t["score"] for t in trials if t["setting"] == setting}
        rows.append([setting, *[f"{by_lr[lr]:.3f}" if lr in by_lr and math.isfinite(by_lr[lr]) else "diverged"
                                for lr in lrs], f"{best[setting]:g}"])
    return rows


def tuning_header(trials: Sequence[Mapping[str, Any]], what: str) -> list[str]:
    """The header of :func:`tuning_table`: one column per learning rate of the grid."""
    return ["setting", *[f"{what} at lr {lr:g}" for lr in sorted({t["lr"] for t in trials})], "chosen lr"]


def paired_and_tuning_tables(result: Mapping[str, Any], better: str, rate: str, score: str) -> str:
    """The markdown that follows an experiment's results table: its paired differences (``better``: what a
    negative difference means) and, when it tuned, every trial (``rate`` names what was tuned, ``score`` what
    chose it); empty when it has neither."""
    text = ""
    rows = [[key, fmt(stat)] for key, stat in result["summary"].get("paired", {}).items()]
    if rows:
        text += "\n\n" + markdown_table([f"paired difference, same seeds (negative: {better})", "mean ± std"], rows)
    trials = result.get("tuning", {}).get("trials", [])
    if trials:
        text += (f"\n\n{rate}, tuned on seed {trials[0]['seed']} (not reported): {score}.\n\n"
                 + markdown_table(tuning_header(trials, "AbsRel"), tuning_table(trials, result["tuning"]["best"])))
    return text


def paired(
    runs: Iterable[Mapping[str, Any]], key: Callable[[Mapping[str, Any]], float], mine: str, theirs: str,
    by: str = "setting", scale: float = 1.0,
) -> dict[str, Any]:
    """``scale * (key(mine) - key(theirs))`` over the seeds both have (mean ± std and per seed)."""
    values: dict[str, dict[int, float]] = {mine: {}, theirs: {}}
    for run in runs:
        if run.get(by) in values:
            values[run[by]][int(run["seed"])] = float(key(run))
    seeds = sorted(set(values[mine]) & set(values[theirs]))
    diffs = [scale * (values[mine][s] - values[theirs][s]) for s in seeds]
    return {**mean_std(diffs), "per_seed": dict(zip(seeds, diffs))}
