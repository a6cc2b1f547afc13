"""``forest-fl influence``: rank the rovers of a run by their Fed-Influence, from the coordinator's store.

The store of a run with run config ``influence = true`` holds every rover's estimated influence
``Delta_k = theta_{-k} - theta`` (:mod:`forest_perception.collab.influence`). Given a test folder, each rover's
effect on that folder's (scale-sensitive log) loss is ``grad L(theta) . Delta_k``: the estimated change of the loss
had the rover never taken part, so the most negative is the most harmful rover (the one to look at, and to
``quarantine``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from forest_perception.cli_args import InputError


@dataclass
class InfluenceRow:
    """One rover: the size of its influence and, with a test folder, its estimated effect on the test loss."""

    rover: str
    norm: float
    relative: float  # ||Delta_k|| / ||theta||
    loss_change: float = math.nan  # L(theta_-k) - L(theta) on the test folder; < 0: better without the rover


def _task_from_identity(identity: dict):  # noqa: ANN202 - TaskConfig, imported lazily (torch)
    from forest_perception.collab.flower.task import TaskConfig, merge_run_config

    width, height = (int(v) for v in str(identity["input"]).split("x"))
    return TaskConfig.from_run_config(merge_run_config({
        "model": identity["model"], "model-kwargs": identity.get("model-kwargs", ""), "input-height": height,
        "input-width": width}))


def loss_gradient(names: list[str], params: list[np.ndarray], task: object, images: object, depth: object,
                  variance_focus: float = 0.0) -> list[np.ndarray]:
    """The gradient of the depth loss on ``images`` / ``depth`` (tensors) at ``params``, per tensor (zero for
    buffers). ``variance_focus`` 0 (the default) makes the log loss scale-sensitive, so a rover whose depth is off
    in scale shows as harmful; the task trains with 0.85, which forgives most of a scale error."""
    from forest_perception.collab.flower.task import build_model, depth_loss, set_arrays

    model = build_model(task)
    set_arrays(model, names, params)
    model.eval()
    model.zero_grad(set_to_none=True)
    loss, _ = depth_loss(task, variance_focus)(model(images), depth, images)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return [np.zeros(np.shape(a)) if grads.get(n) is None else grads[n].detach().numpy().astype(np.float64)
            for n, a in zip(names, params)]


def folder_loss_gradient(names: list[str], params: list[np.ndarray], task: object, folder: str) -> list[np.ndarray]:
    """:func:`loss_gradient` over a test folder's frames (forest layout, at most ``max-holdout-frames``)."""
    from forest_perception.collab.flower.task import load_test_frames

    images, depth = load_test_frames(folder, task)
    return loss_gradient(names, params, task, images, depth)


def influence_report(db: str | Path, test: str | None = None, out: str | Path | None = None
                     ) -> tuple[list[InfluenceRow], Path, bool]:
    """Rows ranked (most harmful first with ``test``, else the largest influence first), the plot's path and
    whether the estimate is complete. ``InputError`` for a store without Fed-Influence."""
    import sqlite3

    from forest_perception.collab.flower.store import CoordinatorStore

    db = Path(db)
    try:
        with CoordinatorStore(db, readonly=True) as store:
            latest = store.latest()
            identity = store.identity
    except sqlite3.DatabaseError as exc:
        raise InputError(f"--db {str(db)!r} is not a readable coordinator store ({exc})") from None
    if latest is None:
        raise InputError(f"--db {db}: the store holds no round yet")
    last, names, params, state = latest
    influence = state.get("influence")
    if not influence:
        raise InputError(f"--db {db}: this run did not track Fed-Influence; run it with run config influence = true")
    theta = math.sqrt(sum(float(np.sum(np.asarray(p, dtype=np.float64) ** 2)) for p in params)) or 1.0
    grad = None
    if test is not None:
        try:
            grad = folder_loss_gradient(names, params, _task_from_identity(identity), test)
        except (OSError, ValueError) as exc:
            raise InputError(f"--test {test}: {exc}") from None
    rows = []
    for rover, delta in sorted(influence["influence"].items()):
        norm = math.sqrt(sum(float(np.sum(np.asarray(d) ** 2)) for d in delta))
        row = InfluenceRow(rover, norm, norm / theta)
        if grad is not None:
            row.loss_change = float(sum(np.sum(g * np.asarray(d, dtype=np.float64)) for g, d in zip(grad, delta)))
        rows.append(row)
    rows.sort(key=(lambda r: r.loss_change) if grad is not None else (lambda r: -r.norm))
    png = Path(out) if out is not None else db.with_name(f"{db.stem}_influence.png")
    _plot(rows, png, grad is not None, last)
    return rows, png, bool(influence.get("complete", True))


def _plot(rows: list[InfluenceRow], path: Path, with_loss: bool, last_round: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [r.loss_change if with_loss else r.relative for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 0.4 * len(rows) + 1.6))
    colours = ["tab:red" if with_loss and v < 0 else "tab:blue" for v in values]
    ax.barh([r.rover for r in rows][::-1], values[::-1], color=colours[::-1])
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("estimated change of the test loss without the rover (< 0: the rover hurts)" if with_loss
                  else "||influence|| / ||model||")
    ax.set_title(f"Fed-Influence after round {last_round}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_influence(db: str | Path, test: str | None = None, out: str | Path | None = None) -> Path:
    """Print the ranking (and the rover to look at) and write the plot; returns the plot's path."""
    rows, png, complete = influence_report(db, test, out)
    print(f"Fed-Influence of every rover ({len(rows)}), {'most harmful first' if test else 'largest first'}:")
    print("rover                 ||influence||  relative   test loss without it - with it")
    for r in rows:
        change = "" if math.isnan(r.loss_change) else f"{r.loss_change:+.5f}"
        print(f"{r.rover[:20]:20}  {r.norm:13.4g}  {r.relative:8.4f}   {change}")
    if test is not None and rows and rows[0].loss_change < 0:
        print(f"most harmful: {rows[0].rover} (the test loss would drop by {-rows[0].loss_change:.5f} without it); "
              f"run config quarantine = '{rows[0].rover}' keeps it out of later rounds")
    if not complete:
        print("warning: a round's rover sent no influence changes, so the estimate is incomplete from then on")
    print(f"plot: {png}")
    return png


__all__ = ["InfluenceRow", "folder_loss_gradient", "influence_report", "loss_gradient", "print_influence"]
