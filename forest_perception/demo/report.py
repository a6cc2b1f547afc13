"""The demo's run report: one self-contained HTML file (pictures inlined) with what each step measured."""

from __future__ import annotations

import base64
import datetime
import html
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .8em 0; } td, th { border: 1px solid #ccc; padding: .25em .6em; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #eee; margin: .5em 0; } pre { background: #f7f7f7; padding: .6em; }
.better { color: #1a7f37; } .worse { color: #b42318; }
"""


@dataclass
class Section:
    """One step of the run: a heading, then paragraphs, tables and pictures in order."""

    title: str
    parts: list[tuple[str, Any]] = field(default_factory=list)

    def text(self, text: str) -> Section:
        """A paragraph."""
        self.parts.append(("text", text))
        return self

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Section:
        """A table; floats are printed with 3 decimals."""
        self.parts.append(("table", (list(header), [list(r) for r in rows])))
        return self

    def image(self, path: str | Path | None, caption: str = "") -> Section:
        """A PNG, inlined (skipped when missing)."""
        if path is not None and Path(path).is_file():
            self.parts.append(("image", (Path(path), caption)))
        return self

    def lines(self, lines: Sequence[str]) -> Section:
        """Preformatted lines (a log)."""
        self.parts.append(("pre", "\n".join(lines)))
        return self


def _cell(value: Any) -> str:  # noqa: ANN401 - anything printable
    if isinstance(value, float):
        return f'<td class="num">{value:.3f}</td>'
    if isinstance(value, int):
        return f'<td class="num">{value}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def write_report(path: str | Path, title: str, sections: Sequence[Section], wall_s: float) -> Path:
    """Write the report; the path."""
    body = [f"<h1>{html.escape(title)}</h1>",
            f"<p>{datetime.datetime.now():%Y-%m-%d %H:%M}, {html.escape(platform.node())} "
            f"({html.escape(platform.machine())}, Python {platform.python_version()}), {wall_s / 60:.1f} min in all. "
            "Everything ran on this machine; DDS and every server on 127.0.0.1.</p>"]
    for section in sections:
        body.append(f"<h2>{html.escape(section.title)}</h2>")
        for kind, content in section.parts:
            if kind == "text":
                body.append(f"<p>{html.escape(content)}</p>")
            elif kind == "pre":
                body.append(f"<pre>{html.escape(content)}</pre>")
            elif kind == "table":
                header, rows = content
                body.append("<table><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>"
                            + "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
                            + "</table>")
            elif kind == "image":
                image, caption = content
                data = base64.b64encode(image.read_bytes()).decode()
                body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
                            f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n")
    path = Path(path)
    path.write_text(page)
    return path


def _pyplot():  # noqa: ANN202 - matplotlib.pyplot
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str | Path) -> Path:  # noqa: ANN001 - a matplotlib Figure
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    _pyplot().close(fig)
    return out


def plot_rounds(accuracy: dict[int, dict[str, float]], rounds: Sequence[dict[str, Any]], out: str | Path) -> Path:
    """Held-out AbsRel / delta1 per round (round 0: the shipped weights) and MB moved per round, side by side."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4))
    xs = sorted(accuracy)
    left.plot(xs, [accuracy[x]["absrel"] for x in xs], "o-", label="AbsRel")
    left.plot(xs, [accuracy[x]["delta1"] for x in xs], "s-", label="delta1")
    left.set_xlabel("round (0: shipped weights)")
    left.set_title("global model on the rovers' held-out segments")
    left.set_xticks(xs)
    left.grid(alpha=0.3)
    left.legend()
    rs = [r["round"] for r in rounds]
    right.bar([r - 0.2 for r in rs], [r["bytes_down"] / 1e6 for r in rounds], 0.4, label="down (to rovers)")
    right.bar([r + 0.2 for r in rs], [r["bytes_up"] / 1e6 for r in rounds], 0.4, label="up (updates)")
    right.set_xlabel("round")
    right.set_ylabel("MB")
    right.set_title("bytes moved per round")
    right.set_xticks(rs)
    right.legend()
    return _save(fig, out)


def _grouped_bars(rovers: Sequence[str], series: Sequence[tuple[str, dict[str, float]]], ylabel: str, title: str,
                  out: str | Path, notes: dict[str, str] | None = None) -> Path:
    """One group of bars per rover, one bar per series; ``notes`` are written above each rover's last bar."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    xs = range(len(rovers))
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series):
        offset = (i - (len(series) - 1) / 2) * width
        ax.bar([x + offset for x in xs], [values.get(r, float("nan")) for r in rovers], width, label=label)
    last = series[-1][1]
    for x, r in zip(xs, rovers):
        if notes and r in notes:
            ax.annotate(notes[r], (x + 0.4 - width / 2, last.get(r, 0.0)), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), rovers)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    return _save(fig, out)


def plot_before_after(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]],
                      out: str | Path) -> Path:
    """Live AbsRel per rover before and after its swap."""
    rovers = sorted(set(before) | set(after))
    series = [("shipped model", {r: v["absrel"] for r, v in before.items()}),
              ("released model", {r: v["absrel"] for r, v in after.items()})]
    return _grouped_bars(rovers, series, "live AbsRel", "depth_node on the driving rovers", out)


def plot_data_kept(frames: dict[str, int], bag_bytes: dict[str, int], kept_bytes: dict[str, int],
                   out: str | Path, everything: dict[str, int] | None = None) -> Path:
    """Per rover: MB recorded (bag) and MB kept (curated dataset), with the frames kept; ``everything``: what
    recording every message would have written (triggered capture)."""
    def mb(values: dict[str, int]) -> dict[str, float]:
        return {r: v / 1e6 for r, v in values.items()}

    series = ([("all messages (record_mode all)", mb(everything))] if everything else []) + [
        ("recorded (bag)", mb(bag_bytes)), ("kept (curated)", mb(kept_bytes))]
    return _grouped_bars(sorted(frames), series, "MB", "data recorded and kept per rover", out,
                         {r: f"{n} frames" for r, n in frames.items()})


def folder_bytes(path: str | Path) -> int:
    """Bytes of every file under ``path`` (0 when it does not exist)."""
    root = Path(path)
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0
