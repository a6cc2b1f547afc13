"""One self-contained HTML page about a dataset: GPS track, sharpness, depth, example frames, curation, splits.

What the page shows: docs/dataset_tools.md ("report"). Plots are drawn with matplotlib's Agg canvas, never
pyplot's global state, and embedded as data URIs. Pure core, never rclpy.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from forest_perception.dataset_tools.curate import CURATION_CSV, CURATION_JSON, read_curation, reasons_count
from forest_perception.dataset_tools.gps import local_enu
from forest_perception.dataset_tools.images import load_depth, load_rgb, write_atomic
from forest_perception.dataset_tools.layout import Segment, check_depth_encoding, iter_segments, segment_key
from forest_perception.dataset_tools.scores import sharpness
from forest_perception.dataset_tools.settings import DatasetSettings
from forest_perception.dataset_tools.split import SPLIT_NAMES, SPLITS_JSON, read_split_file

REPORT_HTML = "report.html"

_REASON_COLOURS = {
    "kept": "#1a9641",
    "blurry": "#fdae61",
    "duplicate": "#2b83ba",
    "no_depth": "#984ea3",
    "not_selected": "#bababa",
    "unreadable": "#d7191c",
}
_SPLIT_COLOURS = {"train": "#1a9641", "val": "#2b83ba", "test": "#d7191c", "none": "#bababa"}


# --------------------------------------------------------------------------- inputs


def _frames_table(segments: Sequence[Segment]) -> dict[str, np.ndarray]:
    keys, stems, lat, lon = [], [], [], []
    for s in segments:
        key = segment_key(s)
        for f in s.frames:
            keys.append(key)
            stems.append(f.stem)
            lat.append(f.gps.latitude if f.gps else math.nan)
            lon.append(f.gps.longitude if f.gps else math.nan)
    return {
        "segment": np.asarray(keys, object),
        "stem": np.asarray(stems, object),
        "latitude": np.asarray(lat, np.float64),
        "longitude": np.asarray(lon, np.float64),
    }


def _float(cell: str | None) -> float:
    try:
        return float(cell) if cell not in (None, "") else math.nan
    except ValueError:
        return math.nan


def _load_splits(path: Path) -> tuple[dict, dict[str, str]]:
    """splits.json contents and (segment key or frame key) -> split of its list files."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not a splits.json: not a text file (byte {exc.start} is not UTF-8); give "
                         "another --splits or remove it") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a readable splits.json ({exc}); give another --splits or remove it") from None
    if not isinstance(data, dict) or "counts" not in data:
        raise ValueError(f"{path} is not a splits.json written by forest-dataset split (no 'counts')")
    membership: dict[str, str] = {}
    for name in SPLIT_NAMES:
        list_path = path.parent / data.get("files", {}).get(name, f"{name}.txt")
        if list_path.is_file():
            for entry in read_split_file(list_path):
                membership[entry] = name
    return data, membership


def _curation_config(path: Path) -> dict:
    """The ``config`` of a ``curation.json`` (thresholds for the plots); empty when absent or unreadable."""
    try:
        config = json.loads(path.read_text(encoding="utf-8")).get("config", {})
    except (OSError, ValueError, AttributeError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return {}
    return config if isinstance(config, dict) else {}


def _sample_indices(n: int, k: int) -> np.ndarray:
    if n == 0 or k <= 0:
        return np.zeros(0, np.int64)
    return np.unique(np.linspace(0, n - 1, min(n, k)).round().astype(np.int64))


# --------------------------------------------------------------------------- pictures


def _figure(width: float, height: float, **margins: float):  # noqa: ANN202 - matplotlib Figure
    from matplotlib.figure import Figure

    # fixed margins: a layout engine would draw every figure twice
    fig = Figure(figsize=(width, height), dpi=100)
    fig.subplots_adjust(**{"left": 0.1, "right": 0.97, "bottom": 0.14, "top": 0.92, "wspace": 0.3, **margins})
    return fig


def _png_uri(fig) -> str:  # noqa: ANN001 - matplotlib Figure
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _jpeg_uri(rgb: np.ndarray) -> str:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise OSError("OpenCV could not encode an example picture as JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


def _track_plot(east: np.ndarray, north: np.ndarray, labels: np.ndarray, colours: Mapping[str, str], title: str) -> str:
    fig = _figure(7.0, 6.0, bottom=0.09, top=0.94, left=0.11)
    ax = fig.add_subplot()
    order = [k for k in colours if k != "kept"] + (["kept"] if "kept" in colours else [])
    for label in order + sorted(set(labels) - set(order)):
        mask = (labels == label) & np.isfinite(east)
        if not mask.any():
            continue
        size = 14 if label in ("kept", "train", "val", "test") else 5
        ax.scatter(east[mask], north[mask], s=size, c=colours.get(label, None), label=f"{label} ({int(mask.sum())})")
    ax.set_xlabel("east (m)")
    ax.set_ylabel("north (m)")
    ax.set_aspect("equal", adjustable="datalim")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8, markerscale=1.5)
    ax.set_title(title)
    return _png_uri(fig)


def _segment_track_plot(east: np.ndarray, north: np.ndarray, segments: np.ndarray) -> str:
    fig = _figure(7.0, 6.0, bottom=0.09, top=0.94, left=0.11)
    ax = fig.add_subplot()
    for key in dict.fromkeys(segments):
        mask = (segments == key) & np.isfinite(east)
        if mask.any():
            ax.plot(east[mask], north[mask], ".-", ms=3, lw=0.8, label=str(key))
    ax.set_xlabel("east (m)")
    ax.set_ylabel("north (m)")
    ax.set_aspect("equal", adjustable="datalim")
    ax.grid(True, alpha=0.3)
    if len(set(segments)) <= 20:
        ax.legend(loc="best", fontsize=8)
    ax.set_title("GPS track by segment (no curation.csv)")
    return _png_uri(fig)


def _hist(ax, values: np.ndarray, groups: np.ndarray | None, bins: np.ndarray, colours: Mapping[str, str]) -> None:  # noqa: ANN001
    finite = np.isfinite(values)
    if groups is None:
        ax.hist(values[finite], bins=bins, histtype="stepfilled", color="#2b83ba")
        return
    labels = [g for g in colours if ((groups == g) & finite).any()]
    data = [values[(groups == g) & finite] for g in labels]
    if data:
        ax.hist(data, bins=bins, stacked=True, histtype="stepfilled", color=[colours[g] for g in labels], label=labels)
        ax.legend(fontsize=8)


def _sharpness_plot(lap: np.ndarray, ten: np.ndarray, ratio: np.ndarray | None, reasons: np.ndarray | None,
                    config: Mapping) -> str:
    panels = 3 if ratio is not None and np.isfinite(ratio).any() else 2
    fig = _figure(4.0 * panels, 3.5, left=0.06 * 3 / panels, right=0.99)
    axes = fig.subplots(1, panels)
    for ax, values, name, floor_key in (
        (axes[0], lap, "variance of the Laplacian", "min_laplacian"),
        (axes[1], ten, "Tenengrad", "min_tenengrad"),
    ):
        logv = np.log10(np.where(values > 0, values, np.nan))
        finite = logv[np.isfinite(logv)]
        bins = np.linspace(finite.min(), finite.max() + 1e-9, 40) if finite.size else np.linspace(0, 1, 10)
        _hist(ax, logv, reasons, bins, _REASON_COLOURS)
        floor = float(config.get(floor_key) or 0.0)
        if floor > 0:
            ax.axvline(math.log10(floor), color="k", ls="--", label=f"{floor_key} {floor:g}")
            ax.legend(fontsize=8)
        ax.set_xlabel(f"log10 {name}")
        ax.set_ylabel("frames")
    if panels == 3:
        ax = axes[2]
        _hist(ax, ratio, reasons, np.linspace(0, max(1.5, float(np.nanmax(ratio))), 40), _REASON_COLOURS)
        threshold = config.get("blur_ratio")
        if threshold:
            ax.axvline(float(threshold), color="k", ls="--")
            ax.text(float(threshold), ax.get_ylim()[1] * 0.95, f" blur_ratio {threshold:g}", fontsize=8, va="top")
        ax.set_xlabel("sharpness ratio (vs. neighbours)")
        ax.set_ylabel("frames")
    return _png_uri(fig)


def _depth_plot(depths: np.ndarray, valid_fractions: np.ndarray, max_depth_m: float) -> str:
    fig = _figure(10.0, 3.5, left=0.08, right=0.98, wspace=0.25)
    ax1, ax2 = fig.subplots(1, 2)
    if depths.size:
        bins = np.linspace(0.0, max(max_depth_m, float(depths.max())), 60)
        ax1.hist(depths, bins=bins, histtype="stepfilled", color="#2b83ba")
    ax1.set_xlabel("depth (m), valid pixels of the sampled frames")
    ax1.set_ylabel("pixels")
    ax2.hist(valid_fractions, bins=np.linspace(0.0, 1.0, 21), histtype="stepfilled", color="#1a9641")
    ax2.set_xlabel("fraction of valid depth pixels per frame")
    ax2.set_ylabel("frames")
    return _png_uri(fig)


def _split_plot(counts: Mapping[str, Mapping[str, int]]) -> str:
    fig = _figure(5.0, 3.0, left=0.16)
    ax = fig.add_subplot()
    names = [n for n in SPLIT_NAMES if n in counts]
    values = [int(counts[n].get("frames", 0)) for n in names]
    bars = ax.bar(names, values, color=[_SPLIT_COLOURS[n] for n in names])
    ax.bar_label(bars)
    ax.set_ylabel("frames")
    return _png_uri(fig)


def _example_sheet(pairs: Sequence[tuple[np.ndarray, np.ndarray, str]], max_depth_m: float) -> str:
    from forest_perception.sim.preview import colorize_depth

    tiles = []
    for rgb, depth, label in pairs:
        h, w = rgb.shape[:2]
        scale = 320.0 / w
        size = (320, max(1, round(h * scale)))
        small_rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        small_depth = cv2.resize(depth, size, interpolation=cv2.INTER_NEAREST)
        row = np.hstack([small_rgb, colorize_depth(small_depth, max_depth_m)])
        (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)
        cv2.rectangle(row, (2, 2), (10 + tw, 8 + th), (0, 0, 0), -1)
        cv2.putText(row, label, (6, 4 + th), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
        tiles.append(row)
    height = max(t.shape[0] for t in tiles)
    tiles = [np.pad(t, ((0, height - t.shape[0]), (0, 0), (0, 0))) for t in tiles]
    rows = [np.hstack(tiles[i : i + 2]) if i + 1 < len(tiles) else tiles[i] for i in range(0, len(tiles), 2)]
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return _jpeg_uri(np.vstack(rows))


# --------------------------------------------------------------------------- HTML


def _table(rows: Sequence[Sequence[object]], header: Sequence[str] | None = None) -> str:
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>")
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


_STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 1300px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; font-size: 0.9em; }
th { background: #f0f0f0; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.3em 0; }
.note { color: #666; font-style: italic; }
"""


@dataclass
class _Sample:
    """What the evenly sampled frames say: depth, valid fractions, image sizes, sharpness."""

    count: int = 0
    depths: list[np.ndarray] = field(default_factory=list)
    valid_fractions: list[float] = field(default_factory=list)
    laplacian: list[float] = field(default_factory=list)
    tenengrad: list[float] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)
    unreadable: list[str] = field(default_factory=list)


def _sample_frames(flat: Sequence[tuple[Segment, int]], sample: int, sharpness_too: bool) -> _Sample:
    out = _Sample()
    indices = _sample_indices(len(flat), sample)
    out.count = len(indices)
    for i in indices:
        segment, j = flat[int(i)]
        try:
            rgb = load_rgb(segment.rgb_path(j))
            depth = load_depth(segment.depth_path(j), segment.depth_encoding)
        except (OSError, ValueError) as exc:
            out.unreadable.append(str(exc))
            continue
        size = f"{rgb.shape[1]}x{rgb.shape[0]}"
        out.sizes[size] = out.sizes.get(size, 0) + 1
        ok = np.isfinite(depth)
        out.valid_fractions.append(float(ok.mean()))
        out.depths.append(depth[ok][:: max(1, int(ok.sum()) // 2000)])  # ~2000 pixels per frame suffice
        if sharpness_too:
            lap, ten = sharpness(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
            out.laplacian.append(lap)
            out.tenengrad.append(ten)
    return out


def _summary_section(root: Path, segments: Sequence[Segment], sampled: _Sample) -> str:
    gps_ids = ", ".join(s.segment_id for s in segments if s.has_gps)
    rows: list[tuple[str, object]] = [
        ("dataset", str(root.resolve())),
        ("runs", len({s.run for s in segments})),
        ("segments", len(segments)),
        ("frames", sum(len(s) for s in segments)),
        ("segments with GPS", f"{sum(s.has_gps for s in segments)} ({gps_ids or '-'})"),
        ("segments with wheel encoders", sum(s.has_encoders for s in segments)),
        ("image sizes (sampled)", ", ".join(f"{k} x{v}" for k, v in sampled.sizes.items()) or "-"),
        ("frames decoded for this report", f"{sampled.count - len(sampled.unreadable)} of {sampled.count} sampled"),
    ]
    if sampled.unreadable:
        rows.append(("unreadable sampled frames", "; ".join(sampled.unreadable[:5])))
    seg_rows = [
        (segment_key(s), len(s), "yes" if s.has_gps else "no", "yes" if s.has_encoders else "no") for s in segments
    ]
    return (
        "<h2>Summary</h2>" + _table(rows) + "<details><summary>Segments</summary>"
        + _table(seg_rows, ("segment", "frames", "GPS", "encoders")) + "</details>"
    )


def _track_section(frames: Mapping[str, np.ndarray], cur_rows: list[dict] | None, membership: Mapping[str, str]) -> str:
    if cur_rows is not None:  # every input frame, kept or not
        lat = np.array([_float(r.get("latitude")) for r in cur_rows])
        lon = np.array([_float(r.get("longitude")) for r in cur_rows])
    else:
        lat, lon = frames["latitude"], frames["longitude"]
    east, north, origin = local_enu(lat, lon)
    parts = ["<h2>GPS track</h2>"]
    if origin is None:
        parts.append('<p class="note">No frame of this dataset has a GPS fix: no map.</p>')
        return "\n".join(parts)
    parts.append(
        f"<p>Local east/north metres from the first fix ({origin[0]:.6f}, {origin[1]:.6f}); "
        f"{int(np.isfinite(east).sum())} of {len(east)} frames have a fix.</p>"
    )
    if cur_rows is not None:
        reasons = np.array([r.get("reason", "") for r in cur_rows], object)
        plot = _track_plot(east, north, reasons, _REASON_COLOURS, "frames by curation decision")
        parts.append(_img(plot, "GPS track coloured by curation decision"))
    else:
        parts.append(_img(_segment_track_plot(east, north, frames["segment"]), "GPS track by segment"))
    if membership:
        f_east, f_north, _ = local_enu(frames["latitude"], frames["longitude"], origin)
        labels = np.array(
            [
                membership.get(f"{seg}/{stem}", membership.get(seg, "none"))
                for seg, stem in zip(frames["segment"], frames["stem"])
            ],
            object,
        )
        plot = _track_plot(f_east, f_north, labels, _SPLIT_COLOURS, "frames by split")
        parts.append(_img(plot, "GPS track coloured by split"))
    return "\n".join(parts)


def _sharpness_section(cur_rows: list[dict] | None, cur_config: Mapping, sampled: _Sample) -> str:
    parts = ["<h2>Sharpness</h2>"]
    if cur_rows is not None:
        lap = np.array([_float(r.get("laplacian_var")) for r in cur_rows])
        ten = np.array([_float(r.get("tenengrad")) for r in cur_rows])
        ratio = np.array([_float(r.get("sharpness_ratio")) for r in cur_rows])
        reasons = np.array([r.get("reason", "") for r in cur_rows], object)
        parts.append(
            f"<p>All {len(cur_rows)} input frames of the curation, stacked by decision; dashed line: "
            f"blur_ratio {html.escape(str(cur_config.get('blur_ratio', '?')))} (a frame is blurry below it).</p>"
        )
        parts.append(_img(_sharpness_plot(lap, ten, ratio, reasons, cur_config), "sharpness histograms"))
    elif sampled.laplacian:
        parts.append(f"<p>{len(sampled.laplacian)} sampled frames (no curation.csv, so no threshold).</p>")
        plot = _sharpness_plot(np.array(sampled.laplacian), np.array(sampled.tenengrad), None, None, {})
        parts.append(_img(plot, "sharpness histograms"))
    else:
        parts.append('<p class="note">No frame could be decoded.</p>')
    return "\n".join(parts)


def _examples_section(
    flat: Sequence[tuple[Segment, int]], cur_rows: list[dict] | None, examples: int, max_depth_m: float
) -> str:
    pool = flat
    if cur_rows is not None:
        kept = {(r["run"], r["segment"], r["stem"]) for r in cur_rows if r.get("reason") == "kept"}
        pool = [(s, j) for s, j in flat if (str(s.run), s.name, s.frames[j].stem) in kept] or flat
    pairs = []
    for i in _sample_indices(len(pool), examples):
        segment, j = pool[int(i)]
        try:
            label = f"{segment_key(segment)}/{segment.frames[j].stem}"
            pairs.append((load_rgb(segment.rgb_path(j)), load_depth(segment.depth_path(j), segment.depth_encoding),
                          label))
        except (OSError, ValueError):
            continue
    if not pairs:
        return ""
    return (
        f"<h2>Example frames</h2><p>RGB and depth (turbo colour map, red near, blue at {max_depth_m:g} m "
        "and beyond, black invalid)" + (", kept frames" if cur_rows is not None else "") + ".</p>"
        + _img(_example_sheet(pairs, max_depth_m), "example frames")
    )


def _splits_section(split_data: Mapping, splits_path: Path) -> str:
    counts = split_data.get("counts", {})
    rows = [
        (n, counts[n].get("frames", 0), counts[n].get("segments", 0), counts[n].get("groups", 0))
        for n in SPLIT_NAMES
        if n in counts
    ]
    fractions = ", ".join(f"{k} {v:g}" for k, v in split_data.get("fractions", {}).items())
    left_out = split_data.get("left_out")
    return (
        f"<h2>Splits</h2><p>{html.escape(str(splits_path))}: by {html.escape(str(split_data.get('by')))}, "
        f"seed {html.escape(str(split_data.get('seed')))}, target fractions {html.escape(fractions)}"
        + (f", {left_out} frames left out by the gap" if left_out else "")
        + ".</p>"
        + _table(rows, ("split", "frames", "segments", "groups"))
        + _img(_split_plot(counts), "frames per split")
    )


def build_report(
    root: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    curation: str | os.PathLike | None = None,
    splits: str | os.PathLike | None = None,
    examples: int = 6,
    sample: int = 200,
    max_depth_m: float = 10.0,
    overwrite: bool = False,
    aliases: Mapping[str, str] | None = None,
    settings: DatasetSettings | None = None,
) -> Path:
    """Write the HTML report of the dataset at ``root`` to ``out`` (default ``root/report.html``).

    ``curation`` / ``splits`` default to ``root/curation.csv`` and ``root/splits.json`` when
    those exist. ``sample`` frames (evenly spaced) are decoded for the depth histogram and,
    without a curation file, for the sharpness histograms. Raises ``FileNotFoundError`` /
    ``ValueError`` naming the input for a missing or non-dataset folder or a bad curation /
    splits file or depth PNGs of an encoding the dataset does not state, ``FileExistsError`` for an
    existing ``out`` unless ``overwrite``. ``settings`` / ``aliases`` override the dataset's
    ``forest_dataset.yaml``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist or is not a folder")
    out_path = Path(out) if out is not None else root / REPORT_HTML
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path} already exists and was left as it is; give another --out, or "
                              "--overwrite to replace it")
    if not (math.isfinite(max_depth_m) and max_depth_m > 0):
        raise ValueError(f"max_depth_m must be a positive number of metres, got {max_depth_m!r}")
    if examples < 0 or sample < 0:
        raise ValueError(f"examples and sample must be >= 0, got {examples} and {sample}")
    segments = list(iter_segments(root, aliases=aliases, check_files=False, settings=settings))
    if not segments:
        raise ValueError(f"{root} holds no Run-<N>/<segment>/metadata.csv segments; is it a forest dataset?")
    check_depth_encoding(segments)
    frames = _frames_table(segments)
    curation_path = Path(curation) if curation is not None else root / CURATION_CSV
    cur_rows = read_curation(curation_path) if (curation is not None or curation_path.is_file()) else None
    splits_path = Path(splits) if splits is not None else root / SPLITS_JSON
    split_data, membership = (
        _load_splits(splits_path) if (splits is not None or splits_path.is_file()) else (None, {})
    )
    flat = [(seg, j) for seg in segments for j in range(len(seg))]
    sampled = _sample_frames(flat, sample, sharpness_too=cur_rows is None)

    sections = [_summary_section(root, segments, sampled)]
    if cur_rows is not None:
        counts = reasons_count(cur_rows)
        sections.append(
            f"<h2>Curation</h2><p>{html.escape(str(curation_path))}: kept {counts.get('kept', 0)} of {len(cur_rows)} "
            "input frames.</p>" + _table([(r, c) for r, c in counts.items() if c], ("reason", "frames"))
        )
    sections.append(_track_section(frames, cur_rows, membership))
    sections.append(_sharpness_section(cur_rows, _curation_config(curation_path.parent / CURATION_JSON), sampled))
    if sampled.valid_fractions:
        depth_values = np.concatenate(sampled.depths) if sampled.depths else np.zeros(0)
        low, high = (depth_values.min(), depth_values.max()) if depth_values.size else (0.0, 0.0)
        sections.append(
            f"<h2>Depth</h2><p>{len(sampled.valid_fractions)} sampled frames; median valid fraction "
            f"{np.median(sampled.valid_fractions):.2f}; valid depth from {low:.2f} to {high:.2f} m.</p>"
            + _img(_depth_plot(depth_values, np.array(sampled.valid_fractions), max_depth_m), "depth histograms")
        )
    if examples > 0:
        sections.append(_examples_section(flat, cur_rows, examples, max_depth_m))
    if split_data is not None:
        sections.append(_splits_section(split_data, splits_path))

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    name = root.resolve().name
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>Dataset report: {html.escape(name)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f"<h1>Dataset report: {html.escape(name)}</h1>\n<p class=\"note\">forest-dataset report, {now}</p>\n"
        + "\n".join(section for section in sections if section)
        + "\n</body>\n</html>\n"
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out_path, page.encode("utf-8"), fsync=False)
    return out_path

