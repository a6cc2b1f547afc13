"""Train/val/test splits by place (dataset_tools.split): whole groups, deterministic, files round-trip."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from forest_perception.dataset_tools.cli import main as dataset_cli
from forest_perception.dataset_tools.gps import local_enu
from forest_perception.dataset_tools.layout import (
    FrameRecord,
    GpsFix,
    ImuSample,
    SegmentWriter,
    frame_stem,
    segment_name,
)
from forest_perception.dataset_tools.split import (
    load_splits,
    parse_fractions,
    read_split_file,
    resolve_entries,
    split_dataset,
    write_splits,
)

LAT0, LON0 = 50.0, 8.0
M_PER_DEG_LAT = 111_200.0
M_PER_DEG_LON = 111_200.0 * math.cos(math.radians(LAT0))


def _write(root: Path, run: int, seg: str, track: list[tuple[float, float] | None]) -> None:
    """A segment of tiny frames along ``track`` (east, north metres from LAT0/LON0; None = no fix)."""
    rgb = np.zeros((4, 4, 3), np.uint8)
    depth = np.ones((4, 4), np.float32)
    with SegmentWriter(root, run, seg) as writer:
        for i, pos in enumerate(track):
            gps = None
            if pos is not None:
                gps = GpsFix(LAT0 + pos[1] / M_PER_DEG_LAT, LON0 + pos[0] / M_PER_DEG_LON)
            writer.write_frame(
                rgb,
                depth,
                FrameRecord(frame_stem(i), 1.0 + i, ImuSample((0, 0, 0), (0, 0, 9.8)), gps=gps),
            )


def _segments_dataset(root: Path, runs: int = 3, per_run: int = 4) -> None:
    rng = np.random.default_rng(0)
    for r in range(1, runs + 1):
        for s in range(per_run):
            _write(root, r, segment_name(s), [None] * int(rng.integers(3, 12)))


def _frame_splits(result) -> dict[tuple[str, str], str]:
    out = {}
    for name in ("train", "val", "test"):
        k = ("train", "val", "test").index(name)
        for seg, assign in zip(result.segments, result.frame_split):
            for j in np.flatnonzero(assign == k):
                out[(f"Run-{seg.run}/{seg.name}", seg.frames[j].stem)] = name
    return out


def test_parse_fractions_refuses_bad_input():
    assert parse_fractions("0.7, 0.2, 0.1") == (0.7, 0.2, 0.1)
    assert parse_fractions([0.9, 0.1, 0]) == (0.9, 0.1, 0.0)
    for text, words in (
        ("0.8,0.1,0.2", "must sum to 1, got 0.8+0.1+0.2 = 1.1"),
        ("0.8,0.2", "three numbers"),
        ("a,b,c", "three numbers"),
        ("1.2,-0.1,-0.1", "train fraction must be within [0, 1]"),
        ("0,0.5,0.5", "train fraction must be > 0"),
    ):
        with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]").replace("+", r"\+")):
            parse_fractions(text)


def test_split_by_segment_keeps_segments_whole_and_is_deterministic(tmp_path):
    _segments_dataset(tmp_path)
    result = split_dataset(tmp_path, fractions=(0.6, 0.2, 0.2), seed=3)
    # each segment lies entirely in one split
    for assign in result.frame_split:
        assert len(set(assign.tolist())) == 1
    assert set(result.groups.values()) == {"train", "val", "test"}
    total = sum(len(s) for s in result.segments)
    assert sum(c["frames"] for c in result.counts.values()) == total
    assert result.counts["train"]["frames"] > result.counts["val"]["frames"]
    # every segment is listed exactly once, as a whole segment
    listed = [e for name in ("train", "val", "test") for e in result.entries(name)]
    assert sorted(listed) == sorted(f"Run-{s.run}/{s.name}" for s in result.segments)

    again = split_dataset(tmp_path, fractions=(0.6, 0.2, 0.2), seed=3)
    assert again.groups == result.groups
    others = [split_dataset(tmp_path, fractions=(0.6, 0.2, 0.2), seed=s).groups for s in range(4, 9)]
    assert any(g != result.groups for g in others), "the seed must matter"

    by_run = split_dataset(tmp_path, by="run", seed=1)
    assert sorted(by_run.groups) == ["Run-1", "Run-2", "Run-3"]
    for run in (1, 2, 3):
        splits = {a[0] for s, a in zip(by_run.segments, by_run.frame_split) if s.run == run}
        assert len(splits) == 1


def test_every_wanted_split_gets_a_group_and_too_few_groups_are_refused(tmp_path):
    _write(tmp_path, 1, "a", [None] * 100)
    _write(tmp_path, 1, "b", [None] * 3)
    _write(tmp_path, 1, "c", [None] * 3)
    for seed in range(6):
        result = split_dataset(tmp_path, seed=seed)
        assert all(result.counts[n]["groups"] == 1 for n in ("train", "val", "test")), seed
    with pytest.raises(ValueError, match="only 1 run group"):
        split_dataset(tmp_path, by="run")
    two = tmp_path / "two"
    _write(two, 1, "a", [None] * 5)
    _write(two, 1, "b", [None] * 5)
    with pytest.raises(ValueError, match="only 2 segment group.*need at least 3.*--by gps"):
        split_dataset(two)
    assert split_dataset(two, fractions="0.5,0.5,0").counts["test"]["frames"] == 0
    with pytest.raises(ValueError, match="holds no Run-<N>"):
        split_dataset(tmp_path / "Run-1")
    with pytest.raises(ValueError, match="split by must be one of"):
        split_dataset(two, by="frame")


def test_split_by_gps_region(tmp_path):
    # two drives criss-crossing the same 200 m x 200 m patch, one drive without GPS
    rng = np.random.default_rng(4)
    track_a = [(float(x), float(y)) for x, y in rng.uniform(0, 200, (80, 2))]
    track_b = [(float(x), float(y)) for x, y in rng.uniform(0, 200, (60, 2))]
    track_b[10] = None  # a frame without a fix in a GPS segment
    track_b[11] = (track_b[12][0], track_b[12][1]) if track_b[12] else None
    _write(tmp_path, 1, "a", track_a)
    _write(tmp_path, 1, "b", track_b)
    _write(tmp_path, 2, "a", [None] * 7)
    result = split_dataset(tmp_path, by="gps", cell_m=50.0, seed=0)
    assert "Run-2/a" in result.groups
    assert result.origin is not None and abs(result.origin[0] - LAT0) < 0.01

    east, north, _ = local_enu(
        np.array([f.gps.latitude if f.gps else np.nan for s in result.segments for f in s.frames]),
        np.array([f.gps.longitude if f.gps else np.nan for s in result.segments for f in s.frames]),
        result.origin,
    )
    assign = np.concatenate(result.frame_split)
    cells = {}
    for e, n, a in zip(east, north, assign):
        if np.isfinite(e):
            cells.setdefault((math.floor(e / 50.0), math.floor(n / 50.0)), set()).add(int(a))
    assert len(cells) >= 9 and all(len(v) == 1 for v in cells.values()), "a cell never spans two splits"
    seg_b = result.frame_split[1]
    assert seg_b[10] in (seg_b[9], seg_b[11])  # the frame without a fix follows a neighbour in time
    assert len(set(result.frame_split[2].tolist())) == 1
    # segments crossing cells of different splits are listed frame by frame
    lines = [e for n in ("train", "val", "test") for e in result.entries(n)]
    assert any(line.startswith("Run-1/a/") for line in lines) and "Run-2/a" in lines
    assert len([x for x in lines if x.startswith("Run-1/")]) == 140

    gapped = split_dataset(tmp_path, by="gps", cell_m=50.0, seed=0, gap_m=8.0)
    kept = np.concatenate(gapped.frame_split)
    assert gapped.counts_left_out > 0 and (kept == -1).sum() == gapped.counts_left_out
    ok = np.isfinite(east) & (kept >= 0)
    for i in np.flatnonzero(ok):
        d = np.hypot(east[ok] - east[i], north[ok] - north[i])
        assert not np.any((d < 8.0) & (kept[ok] != kept[i])), "frames closer than the gap in two splits"
    assert not any(line in ("Run-1/a", "Run-1/b") for n in ("train", "val", "test") for line in gapped.entries(n))


def test_write_read_and_resolve_split_files(tmp_path):
    _segments_dataset(tmp_path / "ds")
    result = split_dataset(tmp_path / "ds", seed=2)
    paths = write_splits(result)
    assert [p.name for p in paths] == ["splits.json", "train.txt", "val.txt", "test.txt"]
    data = json.loads((tmp_path / "ds" / "splits.json").read_text())
    assert data["by"] == "segment" and data["seed"] == 2 and data["counts"] == result.counts
    assert data["fractions"] == {"train": 0.8, "val": 0.1, "test": 0.1} and data["dataset"] == "."
    assert read_split_file(tmp_path / "ds" / "val.txt") == result.entries("val")
    with pytest.raises(FileExistsError, match="splits.json already exists"):
        write_splits(result)
    write_splits(result, overwrite=True)

    loaded = load_splits(tmp_path / "ds")
    for name in ("train", "val", "test"):
        got = sorted(f"Run-{s.run}/{s.name}" for s, idx in loaded[name] if idx == list(range(len(s))))
        assert got == sorted(result.entries(name))

    # elsewhere, with frame entries
    gps_root = tmp_path / "gps"
    _write(gps_root, 1, "a", [(float(i) * 30, 0.0) for i in range(20)])
    _write(gps_root, 1, "b", [(float(i) * 30, 500.0) for i in range(20)])
    gps_split = split_dataset(gps_root, by="gps", cell_m=100.0, seed=0)
    write_splits(gps_split, tmp_path / "lists")
    assert not (gps_root / "splits.json").exists()
    loaded = load_splits(tmp_path / "lists" / "splits.json")
    frames = {(f"Run-{s.run}/{s.name}", s.frames[i].stem): n for n, items in loaded.items() for s, idx in items
              for i in idx}
    assert frames == _frame_splits(gps_split) and len(frames) == 40

    with pytest.raises(ValueError, match="val.txt: entry 'Run-1/a/999999': segment Run-1/a has no frame"):
        (tmp_path / "lists" / "val.txt").write_text("Run-1/a/999999\n")
        load_splits(tmp_path / "lists")
    with pytest.raises(ValueError, match="no segment"):
        resolve_entries(gps_root, ["Run-9/a"])


def test_cli_split(tmp_path, capsys):
    _segments_dataset(tmp_path)
    assert dataset_cli(["split", str(tmp_path), "--seed", "1", "--fractions", "0.5,0.25,0.25"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "target 50 %" in out and (tmp_path / "test.txt").is_file()
    assert dataset_cli(["split", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert dataset_cli(["split", str(tmp_path), "--fractions", "0.5,0.5,0.5", "--overwrite"]) == 2
    assert "must sum to 1" in capsys.readouterr().err
    assert dataset_cli(["split", str(tmp_path / "absent")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_split_by_gps_without_gps_falls_back_to_segments(tmp_path, capsys):
    _segments_dataset(tmp_path, runs=1, per_run=3)
    assert dataset_cli(["split", str(tmp_path), "--by", "gps"]) == 0
    groups = json.loads((tmp_path / "splits.json").read_text())["groups"]
    assert sorted(groups) == ["Run-1/a", "Run-1/b", "Run-1/c"]
