"""``forest-dataset curate``: keep sharp, distinct, spread-out frames in a new dataset and say why for each frame.

Scores every frame (``scores``), selects (``selection``), then writes the kept frames, ``curation.csv`` and
``curation.json`` through a staging folder. The steps, the options and the output files are described in
docs/dataset_tools.md ("curate"). Pure core, never rclpy.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from forest_perception.dataset_tools.layout import (
    DEPTH_DIR,
    METADATA_FILE,
    RGB_DIR,
    Segment,
    check_depth_encoding,
    iter_segments,
    read_text_file,
    segment_key,
)
from forest_perception.dataset_tools.metadata import stem_from_cell
from forest_perception.dataset_tools.parallel import default_workers, parallel_map
from forest_perception.dataset_tools.scores import (
    SCORES_FILE,
    cached_score,
    read_score_cache,
    score_frame_files,
    write_score_cache,
)
from forest_perception.dataset_tools.selection import REASONS, CurateConfig, FrameTable, frame_table, select_frames
from forest_perception.dataset_tools.settings import DatasetSettings, resolve_settings, write_settings

CURATION_CSV = "curation.csv"
CURATION_JSON = "curation.json"

CURATION_COLUMNS = (
    "run",
    "segment",
    "stem",
    "timestamp",
    "latitude",
    "longitude",
    "laplacian_var",
    "tenengrad",
    "sharpness_ratio",
    "depth_valid",
    "duplicate_of",
    "kept",
    "reason",
    "detail",
)
"""Columns of ``curation.csv``."""


def score_frames(
    table: FrameTable, *, workers: int | None = None, progress: bool = False, use_cache: bool = True
) -> int:
    """Fill sharpness and descriptors of every frame; mark frames that cannot be read ``unreadable``.

    Frames whose segment has a valid ``SCORES_FILE`` entry are taken from it without decoding;
    returns how many were.
    """
    todo: list[int] = []
    cached = 0
    caches = [read_score_cache(seg) if use_cache else {} for seg in table.segments]
    for i in range(len(table)):
        s, j = int(table.segment_of[i]), int(table.index_in_segment[i])
        hit = cached_score(caches[s], table.segments[s], j) if caches[s] else None
        if hit is None:
            todo.append(i)
            continue
        table.laplacian[i], table.tenengrad[i], table.descriptors[i] = hit
        cached += 1
    items = [(*table.paths(i), table.depth_encoding(i)) for i in todo]
    results = parallel_map(score_frame_files, items, workers=workers, progress=progress, desc="score")
    for i, (lap, ten, desc, error) in zip(todo, results):
        table.laplacian[i] = lap
        table.tenengrad[i] = ten
        if error is not None:
            table.reason[i] = "unreadable"
            table.detail[i] = error
        else:
            table.descriptors[i] = desc
    return cached


# --------------------------------------------------------------------------- output


def _filtered_metadata(segment: Segment, keep: set[str]) -> str:
    """``metadata.csv`` of ``segment`` with only the rows of the stems in ``keep``, cells unchanged."""
    text = read_text_file(segment.path / METADATA_FILE)
    rows = list(csv.reader(io.StringIO(text, newline="")))
    stem_col = next(i for i, h in enumerate(rows[0]) if segment.column_map.get(h.strip()) == "stem")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(rows[0])
    for row in rows[1:]:
        if stem_col < len(row) and stem_from_cell(row[stem_col]) in keep:
            writer.writerow(row)
    return out.getvalue()


def _place(src: Path, dst: Path, link: bool) -> bool:
    """Hard-link (True) or copy (False) ``src`` to ``dst``."""
    if link:
        try:
            os.link(src, dst)
            return True
        except OSError:
            pass
    shutil.copy2(src, dst)
    return False


def _fmt(value: float, digits: int = 4) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


def curation_rows(table: FrameTable) -> list[list[str]]:
    """``curation.csv`` rows (without header), one per input frame in dataset order."""
    rows = []
    for i in range(len(table)):
        segment = table.segments[int(table.segment_of[i])]
        frame = segment.frames[int(table.index_in_segment[i])]
        dup = int(table.duplicate_of[i])
        rows.append(
            [
                "" if segment.run is None else str(segment.run),
                segment.name,
                frame.stem,
                repr(float(table.timestamp[i])),
                "" if not math.isfinite(table.latitude[i]) else repr(float(table.latitude[i])),
                "" if not math.isfinite(table.longitude[i]) else repr(float(table.longitude[i])),
                _fmt(table.laplacian[i], 6),
                _fmt(table.tenengrad[i], 6),
                _fmt(table.sharpness_ratio[i], 4),
                _fmt(table.depth_valid[i], 4),
                table.frame_id(dup) if dup >= 0 else "",
                "yes" if table.reason[i] == "kept" else "no",
                table.reason[i],
                table.detail[i],
            ]
        )
    return rows


def read_curation(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of a ``curation.csv`` as dicts (column -> cell); ``ValueError`` naming the file if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"curation file {path} does not exist")
    reader = csv.DictReader(io.StringIO(read_text_file(path), newline=""))
    try:
        missing = [c for c in ("run", "segment", "stem", "kept", "reason") if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path} is not a curation.csv: missing columns {missing}")
        return list(reader)
    except csv.Error as exc:
        raise ValueError(f"{path} line {reader.line_num}: not valid CSV text ({exc})") from None


@dataclass
class CurationResult:
    """What ``curate`` did: the decisions, where they went and a JSON-ready summary."""

    table: FrameTable
    output: Path
    summary: dict

    def lines(self) -> list[str]:
        """Human-readable summary lines."""
        s = self.summary
        reasons = ", ".join(f"{k} {v}" for k, v in s["reasons"].items() if v)
        out = [
            f"kept {s['kept']} of {s['input_frames']} frames ({reasons})",
            f"wrote {s['output']} ({s['linked']} images hard-linked, {s['copied']} copied) "
            f"in {s['timing_s']['total_s']:.1f} s ({s['frames_per_s']:.0f} frames/s, {s['workers']} workers"
            + (f", {s['scores_from_cache']} frames scored from {SCORES_FILE}" if s.get("scores_from_cache") else "")
            + ")",
        ]
        if s["target"] is not None and s["kept"] < s["target"]:
            out.append(f"note: asked for {s['target']} frames, only {s['kept']} passed the filters")
        if s["reasons"].get("unreadable"):
            out.append(f"warning: {s['reasons']['unreadable']} unreadable frame(s); see {CURATION_CSV}")
        return out


def _check_output(src: Path, dst: Path) -> None:
    src_r, dst_r = src.resolve(), dst.resolve()
    if dst_r == src_r or src_r in dst_r.parents:
        raise ValueError(f"output {dst} must not be inside the input dataset {src} (the input is never modified)")
    if dst_r in src_r.parents:
        raise ValueError(f"output {dst} must not contain the input dataset {src}")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"output {dst} already exists and is not empty; it was left as it is: give a new "
                              "folder as --out")


# what to change when a reason dropped every frame
_ADVICE = {
    "unreadable": "run `forest-dataset validate` on the input to list every bad file",
    "blurry": "lower --blur-ratio (or --min-laplacian / --min-tenengrad)",
    "duplicate": "lower --duplicate-distance",
    "no_depth": "lower --min-depth-valid or give --no-depth-check",
    "not_selected": "raise --count / --fraction or lower --min-spacing / --min-interval",
}


def _nothing_kept(table: FrameTable, src: Path, dst: Path) -> ValueError:
    """The error for a curation that kept no frame: the reasons, an example and what to change."""
    counts = {r: table.reason.count(r) for r in REASONS if table.reason.count(r)}
    main = max(counts, key=counts.get)  # type: ignore[arg-type]
    example = next((table.frame_id(i), table.detail[i]) for i in range(len(table)) if table.reason[i] == main)
    reasons = ", ".join(f"{k} {v}" for k, v in counts.items())
    return ValueError(
        f"kept none of the {len(table)} frames of {src} ({reasons}; e.g. {example[0]}: {example[1] or main}); "
        f"nothing was written to {dst}: {_ADVICE.get(main, 'loosen the filters')}"
    )


def _check_readable(segments: list[Segment], src: Path) -> None:
    """Refuse, before any work, what curate cannot read: depth PNGs of an unstated encoding, frames without time."""
    for segment in segments:
        if not segment.frames:
            continue
        if not segment.has_timestamps:
            raise ValueError(
                f"{segment.path / METADATA_FILE}: frames without a timestamp (no time column, or empty cells); "
                f"curate compares frames over time (--duplicate-window, --min-interval): map the time column with "
                f"--column-alias NAME=timestamp or column_aliases in {src}/forest_dataset.yaml"
            )
    check_depth_encoding(segments)


def curate(
    source: str | os.PathLike,
    output: str | os.PathLike,
    config: CurateConfig | None = None,
    *,
    progress: bool = False,
    aliases: dict[str, str] | None = None,
    settings: DatasetSettings | None = None,
) -> CurationResult:
    """Curate the dataset at ``source`` into a new dataset folder ``output`` (docs/dataset_tools.md, "curate").

    ``settings`` (and ``aliases``) override the input's ``forest_dataset.yaml``; the output gets the
    settings it was read with. Raises ``FileNotFoundError`` / ``ValueError`` naming the folder or
    ``metadata.csv`` for a missing or non-dataset input, a depth encoding it does not state and a
    curation that keeps no frame, and ``FileExistsError`` for an existing non-empty output; in every
    failure nothing is left at ``output``.
    """
    config = (config or CurateConfig()).validate()
    src, dst = Path(source), Path(output)
    if not src.is_dir():
        raise FileNotFoundError(f"input dataset folder {src} does not exist or is not a folder")
    _check_output(src, dst)
    t_start = time.perf_counter()
    resolved = resolve_settings(src, settings, aliases)
    segments = list(iter_segments(src, check_files=False, settings=resolved))
    if not segments:
        raise ValueError(f"{src} holds no Run-<N>/<segment>/metadata.csv segments; is it a forest dataset?")
    table = frame_table(segments)
    if len(table) == 0:
        raise ValueError(f"{src} has {len(segments)} segment(s) but no frames")
    _check_readable(segments, src)
    t_scan = time.perf_counter()
    from_cache = score_frames(table, workers=config.workers, progress=progress)
    t_score = time.perf_counter()
    timings = select_frames(table, config, progress=progress)
    t_select = time.perf_counter()
    if not table.kept.any():
        raise _nothing_kept(table, src, dst)
    staging = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    try:
        linked, copied = _stage_output(table, staging, config, progress=progress)
        write_settings(staging, resolved)  # the output is read the way the input was
        t_end = time.perf_counter()
        timings = {
            "scan_s": t_scan - t_start,
            "score_s": t_score - t_scan,
            **timings,
            "write_s": t_end - t_select,
            "total_s": t_end - t_start,
        }
        summary = _summary(table, src, dst, config, timings, linked, copied)
        summary["scores_from_cache"] = from_cache
        (staging / CURATION_JSON).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        if dst.exists():
            dst.rmdir()  # empty (checked before); the rename needs the name free
        os.rename(staging, dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return CurationResult(table, dst, summary)


def _stage_output(table: FrameTable, staging: Path, config: CurateConfig, *, progress: bool) -> tuple[int, int]:
    """Write the kept frames and ``curation.csv`` under ``staging``; returns (linked, copied) files."""
    from tqdm import tqdm

    if staging.exists():
        shutil.rmtree(staging)
    linked = copied = 0
    kept = table.kept
    staging.mkdir(parents=True)
    with tqdm(total=int(kept.sum()), desc="write", unit="frame", disable=not progress, mininterval=1.0) as bar:
        for s, segment in enumerate(table.segments):
            members = np.flatnonzero((table.segment_of == s) & kept)
            if members.size == 0:
                continue
            seg_dir = staging / segment_key(segment)
            (seg_dir / RGB_DIR).mkdir(parents=True)
            (seg_dir / DEPTH_DIR).mkdir()
            stems = set()
            for i in members:
                j = int(table.index_in_segment[i])
                stems.add(segment.frames[j].stem)
                for src_path, sub in ((segment.rgb_path(j), RGB_DIR), (segment.depth_path(j), DEPTH_DIR)):
                    if _place(src_path, seg_dir / sub / src_path.name, config.link):
                        linked += 1
                    else:
                        copied += 1
                bar.update()
            (seg_dir / METADATA_FILE).write_text(_filtered_metadata(segment, stems), encoding="utf-8")
            scored = [i for i in members if np.isfinite(table.laplacian[i])]
            write_score_cache(seg_dir, [(segment.frames[int(table.index_in_segment[i])].stem, table.laplacian[i],
                                         table.tenengrad[i], table.descriptors[i]) for i in scored])
    with open(staging / CURATION_CSV, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(CURATION_COLUMNS)
        writer.writerows(curation_rows(table))
    return linked, copied


def _summary(
    table: FrameTable, src: Path, dst: Path, config: CurateConfig, timings: dict, linked: int, copied: int
) -> dict:
    reasons = {r: 0 for r in REASONS}
    for r in table.reason:
        reasons[r] += 1
    per_segment = []
    for s, segment in enumerate(table.segments):
        members = np.flatnonzero(table.segment_of == s)
        counts = {r: 0 for r in REASONS}
        for i in members:
            counts[table.reason[i]] += 1
        per_segment.append(
            {"segment": segment_key(segment), "frames": int(members.size), "has_gps": segment.has_gps, **counts}
        )
    total = timings["total_s"]
    return {
        "source": str(src),
        "output": str(dst),
        "input_frames": len(table),
        "kept": reasons["kept"],
        "target": config.target(len(table)),
        "reasons": reasons,
        "linked": linked,
        "copied": copied,
        "workers": config.workers or default_workers(),
        "frames_per_s": len(table) / total if total > 0 else math.inf,
        "timing_s": {k: round(v, 3) for k, v in timings.items()},
        "config": asdict(config),
        "per_segment": per_segment,
    }


def reasons_count(rows: Iterable[dict[str, str]]) -> dict[str, int]:
    """Frames per reason in ``curation.csv`` rows, in ``REASONS`` order (unknown reasons last)."""
    counts = {r: 0 for r in REASONS}
    for row in rows:
        counts[row.get("reason", "")] = counts.get(row.get("reason", ""), 0) + 1
    return counts
