"""What the experiments report: statistics over seeds, per-round costs, JSON, CSV, plots and markdown tables."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import statistics
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def mean_std(values: Iterable[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min, max and count of the finite values; ``nonfinite``."""
    values = [float(v) for v in values]
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "n": 0,
                "nonfinite": len(values)}
    return {
        "mean": statistics.fmean(finite),
        "std": statistics.stdev(finite) if len(finite) > 1 else 0.0,
        "min": min(finite),
        "max": max(finite),
        "n": len(finite),
        "nonfinite": len(values) - len(finite),
    }


def fmt(stat: Mapping[str, float], digits: int = 3) -> str:
    """``mean ± std`` (and ``(k diverged)`` when some runs gave NaN)."""
    if not stat or stat.get("n", 0) == 0:
        return "diverged" if stat and stat.get("nonfinite") else "-"
    text = f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
    if stat.get("nonfinite"):
        text += f" ({stat['nonfinite']} diverged)"
    return text


def curve(rows: Sequence[Mapping[str, float]], key: str) -> np.ndarray:
    """One run's values of ``key`` per round (NaN where missing)."""
    return np.array([float(r.get(key, math.nan)) for r in rows], dtype=np.float64)


def curve_stats(runs: Sequence[Sequence[Mapping[str, float]]], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rounds, mean and standard deviation of ``key`` over runs of equal length (NaN-aware)."""
    if not runs:
        raise ValueError(f"curve_stats({key!r}): no runs")
    stack = np.stack([curve(rows, key) for rows in runs])
    rounds = curve(runs[0], "round")
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rounds (every seed diverged) stay NaN
        mean = np.nanmean(stack, axis=0)
        std = np.nanstd(stack, axis=0, ddof=1) if len(runs) > 1 else np.zeros_like(mean)
    return rounds, mean, std


def rounds_to_target(rows: Sequence[Mapping[str, float]], key: str, target: float) -> int | None:
    """The first round whose ``key`` is at or below ``target``; None if never."""
    for row in rows:
        value = float(row.get(key, math.nan))
        if math.isfinite(value) and value <= target:
            return int(row["round"])
    return None


def cost_summary(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Per-round costs of one run: mean wall s per round (round 1 apart: identity queries), KiB per rover."""

    def mean_of(key: str, part: Sequence[Mapping[str, float]]) -> float:
        # None: a NaN read back from a result's JSON (which writes non-finite numbers as null)
        values = [r[key] for r in part if r.get(key) is not None and math.isfinite(r[key])]
        return statistics.fmean(values) if values else math.nan

    rows = [r for r in rows if r.get("round", 1) >= 1]  # round 0: the initial model's scores, no cost
    steady = rows[1:] or rows
    return {
        "round1_s": float(rows[0]["wall_s"]) if rows else math.nan,
        "wall_s_per_round": mean_of("wall_s", steady),
        "rovers_per_round": mean_of("selected", rows),
        "kib_down_per_rover": mean_of("kib_down_per_rover", rows),
        "kib_up_per_rover": mean_of("kib_up_per_rover", rows),
        "rover_train_s": mean_of("rover_train_s", rows),
    }


# ---------------------------------------------------------------------------------------------- output


def _jsonable(value: Any) -> Any:  # noqa: ANN401 - any JSON-like tree
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (np.floating, np.integer)):
        return _jsonable(value.item())
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: str | Path, data: Any) -> Path:  # noqa: ANN401 - any JSON-like tree
    """Write ``data`` as JSON (NaN/Inf as null, numpy and dataclasses converted)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(data), indent=1) + "\n")
    return path


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write rows as CSV; the columns are every key, in first-seen order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in columns})
    return path


def _csv_value(value: Any) -> Any:  # noqa: ANN401
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else ""
    return "" if value is None else value


def long_rows(experiment: str, runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One CSV row per (run, round): the run's labels (``algorithm``, ``seed``, ...) then the round's values."""
    out = []
    for run in runs:
        labels = {k: v for k, v in run.items() if k != "rounds"}
        for row in run["rounds"]:
            out.append({"experiment": experiment, **labels, **row})
    return out


def plot_panels(path: str | Path, panels: Sequence[Mapping[str, Any]], title: str = "", ncols: int = 3) -> Path:
    """Line plots, one panel each: ``{"title", "ylabel", "curves": {label: (x, mean, std)}, "xlabel"?, "hline"?}``.

    Panels fill rows of ``ncols``. The band is mean ± one standard deviation over seeds. Rounds without a finite
    mean (not scored, or every seed diverged) are skipped, so sparsely scored curves stay connected lines.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ncols = max(1, min(ncols, len(panels)))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, panel in zip(axes.flat, panels):
        for label, (x, mean, std) in panel["curves"].items():
            keep = np.isfinite(mean)  # (tables say which runs diverged)
            x, mean, std = np.asarray(x)[keep], np.asarray(mean)[keep], np.nan_to_num(np.asarray(std)[keep])
            (line,) = ax.plot(x, mean, label=label, linewidth=1.6)
            if np.any(std > 0):
                ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.18, linewidth=0)
        if panel.get("hline") is not None:
            ax.axhline(panel["hline"], color="grey", linestyle=":", linewidth=1)
        ax.set_title(panel["title"], fontsize=10)
        ax.set_xlabel(panel.get("xlabel", "round"))
        ax.set_ylabel(panel["ylabel"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table (first column left-aligned, the others right-aligned)."""
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- an experiment's result


COST_KEYS = ("wall_s_per_round", "kib_down_per_rover", "kib_up_per_rover", "rovers_per_round")


def cost_stats(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean ± std over ``runs`` of each per-round cost (:data:`COST_KEYS`) of :func:`cost_summary`."""
    return {k: mean_std(cost_summary(r["rounds"])[k] for r in runs) for k in COST_KEYS}


def experiment_result(name: str, claim: str, config: Any, runs: list[dict], summary: dict, started: float,  # noqa: ANN401
                      **extra: Any) -> dict:  # noqa: ANN401 - JSON-like values
    """What an experiment's ``run`` returns and writes: its name, claim, configuration, runs, summary, time."""
    return {"experiment": name, "claim": claim, "config": config, **extra, "runs": runs, "summary": summary,
            "elapsed_s": time.perf_counter() - started}


def write_result(out_dir: str | Path, result: Mapping[str, Any], table: str) -> Path:
    """``<out>/<name>.json`` (everything and the table) and ``<name>.csv`` (one row per run and round)."""
    out_dir, name = Path(out_dir), result["experiment"]
    write_csv(out_dir / f"{name}.csv", long_rows(name, result["runs"]))
    return write_json(out_dir / f"{name}.json", {**result, "table": table})


def last_round_mean(runs: Sequence[Mapping[str, Any]], method: str, key: str) -> dict[str, float]:
    """Mean ± std over seeds of ``key`` in the last round of ``method``'s runs (several runs of one seed, such as one
    per rover, are averaged first)."""
    import statistics

    per_seed: dict[int, list[float]] = {}
    for run in runs:
        if run["method"] == method and run["rounds"]:
            per_seed.setdefault(run["seed"], []).append(float(run["rounds"][-1].get(key, math.nan)))
    return mean_std(statistics.fmean(v) for v in per_seed.values())
