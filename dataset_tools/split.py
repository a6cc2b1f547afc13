"""Train / val / test splits by place, never by random frame: whole segments, runs or GPS cells go to one split.

How groups are formed and dealt, and the files ``write_splits`` writes (``train.txt``, ``val.txt``, ``test.txt``,
``splits.json``) that ``load_splits`` reads back: docs/dataset_tools.md ("split"). Pure core, never rclpy.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from forest_perception.dataset_tools.gps import local_enu
from forest_perception.dataset_tools.images import write_atomic
from forest_perception.dataset_tools.layout import (
    METADATA_FILE,
    Segment,
    iter_segments,
    read_segment,
    read_text_file,
    segment_key,
)
from forest_perception.dataset_tools.settings import DatasetSettings

SPLIT_NAMES = ("train", "val", "test")
SPLITS_JSON = "splits.json"
SPLIT_BY = ("segment", "run", "gps")


def parse_fractions(text: str | Sequence[float]) -> tuple[float, float, float]:
    """``"0.8,0.1,0.1"`` (or three numbers) -> (train, val, test); ``ValueError`` unless they sum to 1."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        values = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"fractions must be three numbers train,val,test like 0.8,0.1,0.1, got {text!r}") from None
    if len(values) != 3:
        raise ValueError(f"fractions must be three numbers train,val,test, got {len(values)}: {text!r}")
    for name, v in zip(SPLIT_NAMES, values):
        if not (math.isfinite(v) and 0.0 <= v <= 1.0):
            raise ValueError(f"{name} fraction must be within [0, 1], got {v!r}")
    if abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {'+'.join(f'{v:g}' for v in values)} = {sum(values):g}")
    if values[0] <= 0:
        raise ValueError("the train fraction must be > 0")
    return values  # type: ignore[return-value]


@dataclass
class SplitResult:
    """Which split every frame went to, and why."""

    root: Path
    by: str
    fractions: tuple[float, float, float]
    seed: int
    cell_m: float
    gap_m: float
    segments: list[Segment]
    frame_split: list[np.ndarray]
    """Per segment, the split index (0 train, 1 val, 2 test, -1 left out by the gap) of each frame."""
    groups: dict[str, str]
    """Group id -> split name."""
    origin: tuple[float, float] | None = None
    counts: dict[str, dict[str, int]] = field(default_factory=dict)

    def entries(self, split: str) -> list[str]:
        """Lines of ``<split>.txt``: whole segments as ``Run-N/seg``, single frames as ``Run-N/seg/stem``."""
        k = SPLIT_NAMES.index(split)
        lines = []
        for segment, assign in zip(self.segments, self.frame_split):
            mine = assign == k
            if not mine.any():
                continue
            if mine.all():
                lines.append(segment_key(segment))
            else:
                lines.extend(f"{segment_key(segment)}/{segment.frames[j].stem}" for j in np.flatnonzero(mine))
        return lines

    def lines(self) -> list[str]:
        """Human-readable summary."""
        total = sum(c["frames"] for c in self.counts.values()) + self.counts_left_out
        out = [f"split {self.root} by {self.by} (seed {self.seed}): {len(self.groups)} groups, {total} frames"]
        for name in SPLIT_NAMES:
            c = self.counts[name]
            share = c["frames"] / total if total else 0.0
            target = 100 * self.fractions[SPLIT_NAMES.index(name)]
            out.append(
                f"  {name:<5} {c['frames']:>7} frames ({100 * share:5.1f} %, target {target:g} %) "
                f"in {c['groups']} group(s), {c['segments']} segment(s)"
            )
        if self.gap_m > 0:
            out.append(f"  left out {self.counts_left_out} frames within {self.gap_m:g} m of another split")
        return out

    @property
    def counts_left_out(self) -> int:
        """Frames in no split (guard band)."""
        return int(sum((a == -1).sum() for a in self.frame_split))

    def to_dict(self) -> dict:
        """Contents of ``splits.json``."""
        return {
            "version": 1,
            "by": self.by,
            "fractions": dict(zip(SPLIT_NAMES, self.fractions)),
            "seed": self.seed,
            "cell_m": self.cell_m if self.by == "gps" else None,
            "gap_m": self.gap_m if self.by == "gps" else None,
            "origin": None if self.origin is None else {"latitude": self.origin[0], "longitude": self.origin[1]},
            "counts": self.counts,
            "left_out": self.counts_left_out,
            "files": {name: f"{name}.txt" for name in SPLIT_NAMES},
            "groups": self.groups,
        }


def _gps_groups(
    segments: Sequence[Segment], cell_m: float
) -> tuple[list[list[str]], tuple[float, float] | None, list[np.ndarray], list[np.ndarray]]:
    """Group id of every frame, the ENU origin, and every frame's east / north (NaN without GPS)."""
    lat = np.array([f.gps.latitude if f.gps else math.nan for s in segments for f in s.frames], np.float64)
    lon = np.array([f.gps.longitude if f.gps else math.nan for s in segments for f in s.frames], np.float64)
    east_all, north_all, origin = local_enu(lat, lon)
    labels, easts, norths = [], [], []
    offset = 0
    for segment in segments:
        n = len(segment)
        east, north = east_all[offset : offset + n], north_all[offset : offset + n]
        offset += n
        easts.append(east)
        norths.append(north)
        fixed = np.flatnonzero(np.isfinite(east) & np.isfinite(north))
        if fixed.size == 0:
            labels.append([segment_key(segment)] * n)
            continue
        # without timestamps, capture order (the row order) stands in for time
        times = np.array([f.timestamp for f in segment.frames] if segment.has_timestamps else range(n), np.float64)
        nearest = fixed if fixed.size == n else _nearest_in_time(times, fixed)
        cx = np.floor(east[nearest] / cell_m).astype(np.int64)
        cy = np.floor(north[nearest] / cell_m).astype(np.int64)
        labels.append([f"cell({x},{y})" for x, y in zip(cx, cy)])
    return labels, origin, easts, norths


def _nearest_in_time(times: np.ndarray, fixed: np.ndarray) -> np.ndarray:
    """For every frame, the index of the frame in ``fixed`` (frames with a GPS fix) nearest in time."""
    order = fixed[np.argsort(times[fixed], kind="stable")]
    fixed_times = times[order]
    right = np.clip(np.searchsorted(fixed_times, times), 0, len(order) - 1)
    left = np.clip(right - 1, 0, len(order) - 1)
    take_left = np.abs(times - fixed_times[left]) <= np.abs(fixed_times[right] - times)
    return np.where(take_left, order[left], order[right])


def _deal(
    keys: list[str], sizes: Mapping[str, int], fractions: Sequence[float], seed: int
) -> dict[str, int]:
    """Shuffle groups with ``seed``; each goes to the split furthest below its frame target."""
    order = [keys[i] for i in np.random.default_rng(seed).permutation(len(keys))]
    total = sum(sizes.values())
    targets = [f * total for f in fractions]
    active = [k for k, f in enumerate(fractions) if f > 0]
    filled = [0.0] * len(fractions)
    members: list[list[str]] = [[] for _ in fractions]
    assignment: dict[str, int] = {}
    for key in order:
        k = max(active, key=lambda k: (targets[k] - filled[k], -k))
        assignment[key] = k
        filled[k] += sizes[key]
        members[k].append(key)
    # every wanted split gets a group: take the smallest from the split with the most groups
    for k in active:
        if members[k]:
            continue
        donor = max((d for d in active if len(members[d]) > 1), key=lambda d: (len(members[d]), -d))
        moved = min(members[donor], key=lambda g: (sizes[g], g))
        members[donor].remove(moved)
        members[k].append(moved)
        assignment[moved] = k
    return assignment


def _apply_gap(
    frame_split: list[np.ndarray], easts: list[np.ndarray], norths: list[np.ndarray], gap_m: float
) -> None:
    """Leave out (-1) every frame within ``gap_m`` of a frame of another split."""
    east = np.concatenate(easts)
    north = np.concatenate(norths)
    split = np.concatenate(frame_split)
    has = np.flatnonzero(np.isfinite(east) & np.isfinite(north))
    cells: dict[tuple[int, int], list[int]] = {}
    for i in has:
        cells.setdefault((math.floor(east[i] / gap_m), math.floor(north[i] / gap_m)), []).append(int(i))
    drop = np.zeros(len(split), bool)
    for (cx, cy), members in cells.items():
        near = [j for dx in (-1, 0, 1) for dy in (-1, 0, 1) for j in cells.get((cx + dx, cy + dy), ())]
        a = np.asarray(members)
        b = np.asarray(near)
        other = split[a][:, None] != split[b][None, :]
        close = np.hypot(east[a][:, None] - east[b][None, :], north[a][:, None] - north[b][None, :]) < gap_m
        drop[a[(other & close).any(axis=1)]] = True
    offset = 0
    for arr in frame_split:
        n = len(arr)
        arr[drop[offset : offset + n]] = -1
        offset += n


def split_dataset(
    root: str | os.PathLike,
    *,
    by: str = "segment",
    fractions: Sequence[float] | str = (0.8, 0.1, 0.1),
    seed: int = 0,
    cell_m: float = 50.0,
    gap_m: float = 0.0,
    aliases: Mapping[str, str] | None = None,
    settings: DatasetSettings | None = None,
) -> SplitResult:
    """Split the dataset at ``root`` into train/val/test by place (see the module docstring).

    ``settings`` and ``aliases`` override the dataset's ``forest_dataset.yaml`` (column names).

    Raises ``ValueError`` for bad fractions, an unknown ``by``, a folder without segments or
    fewer groups than splits to fill; ``FileNotFoundError`` for a missing folder.
    """
    fracs = parse_fractions(fractions)
    if by not in SPLIT_BY:
        raise ValueError(f"split by must be one of {SPLIT_BY}, got {by!r}")
    if not (math.isfinite(cell_m) and cell_m > 0):
        raise ValueError(f"cell_m must be a positive number of metres, got {cell_m!r}")
    if not (math.isfinite(gap_m) and gap_m >= 0):
        raise ValueError(f"gap_m must be a number of metres >= 0, got {gap_m!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist or is not a folder")
    segments = [s for s in iter_segments(root, aliases=aliases, check_files=False, settings=settings) if len(s) > 0]
    if not segments:
        raise ValueError(f"{root} holds no Run-<N>/<segment>/metadata.csv segments with frames")

    origin = None
    easts = norths = None
    if by == "gps":
        labels, origin, easts, norths = _gps_groups(segments, cell_m)
    elif by == "run":
        labels = [[segment_key(s).split("/")[0]] * len(s) for s in segments]
    else:
        labels = [[segment_key(s)] * len(s) for s in segments]

    sizes: dict[str, int] = {}
    for seg_labels in labels:
        for label in seg_labels:
            sizes[label] = sizes.get(label, 0) + 1
    wanted = sum(1 for f in fracs if f > 0)
    if len(sizes) < wanted:
        hint = "a smaller --cell, " if by == "gps" else "--by gps, "
        raise ValueError(
            f"only {len(sizes)} {by} group(s) with frames under {root}, need at least {wanted} to fill "
            f"{', '.join(n for n, f in zip(SPLIT_NAMES, fracs) if f > 0)}; use {hint}or a fraction of 0"
        )
    assignment = _deal(sorted(sizes), sizes, fracs, seed)
    frame_split = [np.array([assignment[label] for label in seg_labels], np.int64) for seg_labels in labels]
    if by == "gps" and gap_m > 0:
        _apply_gap(frame_split, easts, norths, gap_m)  # type: ignore[arg-type]

    counts = {}
    for k, name in enumerate(SPLIT_NAMES):
        counts[name] = {
            "groups": sum(1 for v in assignment.values() if v == k),
            "segments": sum(1 for a in frame_split if (a == k).any()),
            "frames": int(sum((a == k).sum() for a in frame_split)),
        }
    return SplitResult(
        root=root,
        by=by,
        fractions=fracs,
        seed=seed,
        cell_m=float(cell_m),
        gap_m=float(gap_m),
        segments=segments,
        frame_split=frame_split,
        groups={g: SPLIT_NAMES[k] for g, k in sorted(assignment.items())},
        origin=origin,
        counts=counts,
    )


def write_splits(
    result: SplitResult, out_dir: str | os.PathLike | None = None, *, overwrite: bool = False
) -> list[Path]:
    """Write ``splits.json`` and ``train.txt`` / ``val.txt`` / ``test.txt`` (default: the dataset root).

    Raises ``FileExistsError`` naming the file when one exists and ``overwrite`` is False.
    """
    out = Path(out_dir) if out_dir is not None else result.root
    paths = [out / SPLITS_JSON] + [out / f"{name}.txt" for name in SPLIT_NAMES]
    if not overwrite:
        for p in paths:
            if p.exists():
                raise FileExistsError(f"{p} already exists and was left as it is; give another --out folder, or "
                                      "--overwrite to replace the split")
    out.mkdir(parents=True, exist_ok=True)
    for name, p in zip(SPLIT_NAMES, paths[1:]):
        entries = result.entries(name)
        write_atomic(p, "".join(line + "\n" for line in entries).encode("utf-8"), fsync=False)
    data = result.to_dict()
    data["dataset"] = os.path.relpath(result.root.resolve(), out.resolve())
    # last: its presence means the set is complete
    write_atomic(paths[0], (json.dumps(data, indent=2) + "\n").encode("utf-8"), fsync=False)
    return paths


def read_split_file(path: str | os.PathLike) -> list[str]:
    """Entries of a ``<split>.txt`` (blank lines and ``#`` comments skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} does not exist")
    lines = (line.strip() for line in read_text_file(path).splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def resolve_entries(
    root: str | os.PathLike, entries: Sequence[str], *, where: str = ""
) -> list[tuple[Segment, list[int]]]:
    """``Run-N/seg`` / ``Run-N/seg/stem`` entries -> (segment, frame indices) in entry order of segments.

    Raises ``ValueError`` naming the entry that does not exist under ``root``.
    """
    root = Path(root)
    cache: dict[str, Segment] = {}
    picked: dict[str, list[int] | None] = {}
    order: list[str] = []
    for entry in entries:
        parts = entry.strip("/").split("/")
        if len(parts) not in (2, 3):
            raise ValueError(f"{where}entry {entry!r} must be Run-N/<segment> or Run-N/<segment>/<stem>")
        key = "/".join(parts[:2])
        if key not in cache:
            seg_dir = root / key
            if not (seg_dir / METADATA_FILE).is_file():
                raise ValueError(f"{where}entry {entry!r}: no segment {seg_dir}")
            cache[key] = read_segment(seg_dir, check_files=False)
            order.append(key)
        segment = cache[key]
        if len(parts) == 2:
            picked[key] = None
        elif picked.get(key, []) is not None:
            stems = {f.stem: i for i, f in enumerate(segment.frames)}
            if parts[2] not in stems:
                raise ValueError(f"{where}entry {entry!r}: segment {key} has no frame {parts[2]!r}")
            picked.setdefault(key, []).append(stems[parts[2]])  # type: ignore[union-attr]
    out = []
    for key in order:
        segment = cache[key]
        chosen = picked[key]
        out.append((segment, list(range(len(segment))) if chosen is None else sorted(chosen)))
    return out


def load_splits(path: str | os.PathLike) -> dict[str, list[tuple[Segment, list[int]]]]:
    """Read ``splits.json`` (or the folder holding it) and its ``<split>.txt`` files.

    Returns split name -> list of (segment, frame indices); entries are resolved against the
    dataset recorded in ``splits.json`` (relative to its folder).
    """
    path = Path(path)
    json_path = path / SPLITS_JSON if path.is_dir() else path
    if not json_path.is_file():
        raise FileNotFoundError(f"no {SPLITS_JSON} at {path}")
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
        files = data["files"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{json_path} is not a splits.json written by forest-dataset split ({exc})") from None
    root = (json_path.parent / data.get("dataset", ".")).resolve()
    return {
        name: resolve_entries(root, read_split_file(json_path.parent / files[name]), where=f"{files[name]}: ")
        for name in SPLIT_NAMES
        if name in files
    }
