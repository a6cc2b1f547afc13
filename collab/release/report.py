"""The release timeline as a picture: what happened to each release (created, promoted, stages, rollbacks) and
what the rovers reported (installed, refused, rolled back), over time."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

MARKERS = {
    "create": ("o", "tab:gray"), "promote": ("^", "tab:blue"), "advance": (">", "tab:cyan"),
    "done": ("*", "tab:green"), "rollback": ("X", "tab:red"), "installed": ("s", "tab:olive"),
    "refused": ("x", "tab:orange"), "failed": ("d", "tab:brown"), "rolled_back": ("v", "tab:purple"),
}


def plot_timeline(registry: Any, out: str | os.PathLike) -> Path:  # noqa: ANN401 - ReleaseRegistry
    """Draw every audit entry of ``registry`` as a marker on its release's row; the PNG written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [e for e in registry.audit() if e["release"]]
    releases = [r["id"] for r in registry.releases()]
    # one row for what the coordinator (or the command line) did to each release, one per rover that reported on it
    rows: list[tuple[str, str]] = []
    for release in releases:
        rows.append((release, ""))
        rows += sorted({(release, e["actor"][6:]) for e in entries
                        if e["release"] == release and e["actor"].startswith("rover:")})
    start = min((e["ts"] for e in entries), default=0.0)
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.35 * max(1, len(rows))))
    seen = set()
    for e in entries:
        marker, color = MARKERS.get(e["action"], (".", "black"))
        rover = e["actor"][6:] if e["actor"].startswith("rover:") else ""
        row = rows.index((e["release"], rover)) if (e["release"], rover) in rows else -1
        label = e["action"] if e["action"] not in seen else None
        seen.add(e["action"])
        ax.scatter(e["ts"] - start, row, marker=marker, color=color, s=60, label=label, zorder=3)
    ax.set_yticks(range(len(rows)), [f"{r}: {who}" if who else r for r, who in rows], fontsize=7)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlabel("seconds since the first release event")
    ax.grid(axis="x", alpha=0.3)
    if seen:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("release timeline")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
