"""The federated evaluation curves of a coordinator store: AbsRel and delta1 of the global model per round.

One line per rover (its held-out segments), their frame-weighted mean and the cloud test folder; round 0 is
the initial model. Written beside the store (``forest-fl status --plot``, the end of ``forest-fl simulate``).
"""

from __future__ import annotations

import math
from pathlib import Path

from forest_perception.collab.flower.store import AGGREGATE, CLOUD, CoordinatorStore

MAX_LABELLED_ROVERS = 10
"""More rovers than this share one legend entry."""


def curves_path(db: str | Path) -> Path:
    """Where the curves of a store go: ``<store stem>_curves.png`` beside it."""
    db = Path(db)
    return db.with_name(f"{db.stem}_curves.png")


def evaluation_series(rows: list[dict]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """``{name: {"absrel": [(round, value), ...], "delta1": [...]}}`` of the ``ok`` evaluations, by round."""
    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for row in rows:
        if row["status"] != "ok":
            continue
        for key in ("absrel", "delta1"):
            value = row[key]
            if value is not None and math.isfinite(value):
                series.setdefault(row["name"], {"absrel": [], "delta1": []})[key].append((int(row["round"]), value))
    return series


def plot_store_curves(db: str | Path, out: str | Path | None = None) -> Path:
    """Draw the store's evaluation curves into ``out`` (default :func:`curves_path`); returns the PNG's path.

    ``ValueError`` when the store holds no evaluation (run with ``fraction-evaluate`` > 0 or a cloud test).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with CoordinatorStore(db, readonly=True) as store:
        rows = store.evaluations()
        identity = store.identity
    series = evaluation_series(rows)
    if not series:
        raise ValueError(f"coordinator store {db} holds no federated evaluation to plot (rounds ran with "
                         "fraction-evaluate 0 and no cloud-test)")
    pooled = sorted(n for n in series if n.startswith(f"{AGGREGATE}/"))  # iciia: rovers/no-history
    rovers = sorted(n for n in series if n not in (AGGREGATE, CLOUD, *pooled))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "absrel", "AbsRel (lower is better)"),
                           (axes[1], "delta1", "delta1 (higher is better)")):
        for i, name in enumerate(rovers):
            points = series[name][key]
            label = name if len(rovers) <= MAX_LABELLED_ROVERS else ("rovers, each" if i == 0 else None)
            ax.plot([r for r, _ in points], [v for _, v in points], lw=0.9, alpha=0.55, marker=".", label=label)
        for name, style in ((AGGREGATE, {"color": "black", "lw": 2.4, "label": "rovers' held-out (mean)"}),
                            (CLOUD, {"color": "tab:red", "lw": 2.4, "ls": "--", "label": "cloud test"})):
            points = series.get(name, {}).get(key, [])
            if points:
                ax.plot([r for r, _ in points], [v for _, v in points], marker="o", **style)
        for name in pooled:
            points = series[name][key]
            ax.plot([r for r, _ in points], [v for _, v in points], marker="s", color="grey", lw=2.0, ls=":",
                    label=f"rovers' held-out (mean), {name[len(AGGREGATE) + 1:]}")
        ax.set_title(title)
        ax.set_xlabel("round (0 = initial model)")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[1].legend(fontsize=7, loc="best")
    what = ", ".join(f"{k} {identity[k]}" for k in ("algorithm", "model", "input") if k in identity)
    fig.suptitle(f"global model on held-out data per round ({what})", fontsize=10)
    fig.tight_layout()
    path = Path(out) if out is not None else curves_path(db)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
