"""Curation (dataset_tools.curate): blur, duplicates, farthest-point variety, output dataset, curation.csv."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from forest_perception.dataset_tools import curate as curate_mod
from forest_perception.dataset_tools.cli import main as dataset_cli
from forest_perception.dataset_tools.curate import CURATION_COLUMNS, CurateConfig, curate
from forest_perception.dataset_tools.images import png_info
from forest_perception.dataset_tools.layout import (
    FrameRecord,
    GpsFix,
    ImuSample,
    SegmentWriter,
    frame_stem,
    open_dataset,
)
from forest_perception.dataset_tools.parallel import parallel_map
from forest_perception.dataset_tools.scores import frame_descriptor, score_frame_files, sharpness
from forest_perception.dataset_tools.selection import REASONS, select_spread

H, W = 72, 96


def texture(seed: int, h: int = H, w: int = W) -> np.ndarray:
    """A distinct, sharp, colourful uint8 RGB texture per seed."""
    rng = np.random.default_rng(seed)
    out = np.zeros((h, w, 3), np.float32)
    for scale in (2, 4, 8, 16):
        noise = rng.random((max(2, h // scale), max(2, w // scale), 3)).astype(np.float32)
        out += cv2.resize(noise, (w, h), interpolation=cv2.INTER_LINEAR) * scale**0.5
    out -= out.min()
    out /= out.max()
    for _ in range(3):  # a few bold shapes give every view its own layout
        x, y = int(rng.integers(w - 20)), int(rng.integers(h - 20))
        out[y : y + int(rng.integers(8, 30)), x : x + int(rng.integers(8, 30))] = rng.random(3)
    return (out * 255).astype(np.uint8)


def depth_map(seed: int, h: int = H, w: int = W, valid: bool = True) -> np.ndarray:
    rng = np.random.default_rng(seed + 1000)
    depth = (1.0 + 5.0 * rng.random((h, w))).astype(np.float32)
    depth[rng.random((h, w)) < 0.1] = np.nan
    if not valid:
        depth[:] = np.nan
    return depth


def record(i: int, gps: tuple[float, float] | None = None, t0: float = 100.0) -> FrameRecord:
    return FrameRecord(
        stem=frame_stem(i),
        timestamp=t0 + 0.1 * i,
        imu=ImuSample((0.0, 0.0, 0.1), (0.0, 0.0, 9.81), (0.0, 0.0, 0.0, 1.0)),
        gps=None if gps is None else GpsFix(gps[0], gps[1], 10.0, 0),
    )


def write_segment(root: Path, run: int, seg: str, images: list, gps: list | None = None, depths: list | None = None):
    with SegmentWriter(root, run, seg) as writer:
        for i, rgb in enumerate(images):
            depth = depths[i] if depths is not None else depth_map(i)
            writer.write_frame(rgb, depth, record(i, gps[i] if gps else None))
    return root / f"Run-{run}" / seg


def reasons(result) -> dict[str, str]:
    table = result.table
    return {table.frame_id(i): table.reason[i] for i in range(len(table))}


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() + f":{p.stat().st_mtime_ns}"
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


FAST = dict(workers=1)


# ------------------------------------------------------------------ scores


def test_sharpness_and_descriptor_respond_to_blur_and_content():
    img = texture(1)
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    lap, ten = sharpness(gray)
    lap_b, ten_b = sharpness(cv2.GaussianBlur(gray, (0, 0), 2.0))
    assert lap_b < 0.2 * lap and ten_b < 0.6 * ten
    assert sharpness(np.full((H, W), 128, np.uint8)) == (0.0, 0.0)

    d = frame_descriptor(img)
    assert d.dtype == np.float32 and abs(float(np.linalg.norm(d)) - 1.0) < 1e-4
    noisy = np.clip(img.astype(np.int16) + np.random.default_rng(0).integers(-4, 5, img.shape), 0, 255).astype(np.uint8)
    brighter = np.clip(img.astype(np.float32) * 1.1, 0, 255).astype(np.uint8)
    # both well under the default duplicate distance (0.15); another view is far beyond it
    assert np.linalg.norm(frame_descriptor(noisy) - d) < 0.1
    assert np.linalg.norm(frame_descriptor(brighter) - d) < 0.1
    assert np.linalg.norm(frame_descriptor(texture(2)) - d) > 0.5
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        frame_descriptor(img.astype(np.float32))


def test_png_info_reads_header_and_names_bad_files(tmp_path):
    cv2.imwrite(str(tmp_path / "rgb.png"), texture(0))
    cv2.imwrite(str(tmp_path / "d.png"), np.ones((H, W), np.uint16))
    rgb, depth = png_info(tmp_path / "rgb.png"), png_info(tmp_path / "d.png")
    assert (rgb.width, rgb.height, rgb.is_rgb8, rgb.is_depth16) == (W, H, True, False)
    assert depth.is_depth16 and depth.describe() == f"{W}x{H} 16-bit grayscale"
    (tmp_path / "bad.png").write_bytes(b"not a png at all, just some text here")
    with pytest.raises(ValueError, match="bad.png is not a PNG"):
        png_info(tmp_path / "bad.png")
    with pytest.raises(FileNotFoundError, match="gone.png"):
        png_info(tmp_path / "gone.png")


def test_parallel_map_on_threads_matches_serial_and_restores_opencv_threads(tmp_path):
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"{i}.png"), texture(i)[..., ::-1])
        cv2.imwrite(str(tmp_path / f"d{i}.png"), np.full((H, W), 1000 + i, np.uint16))
    items = [(str(tmp_path / f"{i}.png"), str(tmp_path / f"d{i}.png")) for i in range(3)]
    serial = parallel_map(score_frame_files, items, workers=1)
    cv_threads = cv2.getNumThreads()
    pooled = parallel_map(score_frame_files, items, workers=2, min_parallel=1)
    assert cv2.getNumThreads() == cv_threads
    for a, b in zip(serial, pooled):
        assert a[:2] == b[:2] and np.array_equal(a[2], b[2]) and a[3] is None and b[3] is None
    with pytest.raises(ValueError, match="workers"):
        parallel_map(score_frame_files, items, workers=0)


# ------------------------------------------------------------------ selection


def test_select_spread_takes_one_frame_per_cluster_then_spreads():
    rng = np.random.default_rng(0)
    centres = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [-1.0, 0, 0]], np.float32)
    points = np.concatenate([c + 0.01 * rng.standard_normal((25, 3)) for c in centres]).astype(np.float32)
    for seed in range(5):
        picks, _, _ = select_spread(points, 4, seed=seed)
        assert len(picks) == 4 and sorted(p // 25 for p in picks) == [0, 1, 2, 3], seed
    assert select_spread(points, 4, seed=3)[0] == select_spread(points, 4, seed=3)[0]
    everything, _, _ = select_spread(points, None)
    assert everything == list(range(100))


def test_select_spread_spacing_and_interval_block_close_frames():
    desc = np.random.default_rng(1).standard_normal((50, 8)).astype(np.float32)
    east = np.arange(50, dtype=np.float64) * 1.0  # one metre apart along a line
    north = np.zeros(50)
    picks, blocked_by, why = select_spread(desc, None, east=east, north=north, min_spacing_m=4.5)
    chosen = np.sort(east[picks])
    assert np.diff(chosen).min() >= 4.5
    assert len(picks) >= 50 // 9  # greedy packing of a 49 m line at 4.5 m spacing
    for j in range(50):
        if j not in picks:
            assert why[j] == "spacing" and abs(east[j] - east[blocked_by[j]]) < 4.5
    # no GPS for a frame: never blocked by spacing
    east_nan = east.copy()
    east_nan[10] = np.nan
    picks, _, why = select_spread(desc, None, east=east_nan, north=north, min_spacing_m=100.0)
    assert 10 in picks
    # time interval within a group only
    groups = np.repeat([0, 1], 25)
    times = np.tile(np.arange(25) * 0.1, 2)
    picks, _, why = select_spread(desc, None, groups=groups, times=times, min_interval_s=1.0)
    for g in (0, 1):
        mine = [p for p in picks if groups[p] == g]
        t = np.sort(times[mine])
        assert len(t) >= 2 and np.diff(t).min() >= 1.0 - 1e-9
        # maximal: every frame left out is within the interval of a pick of its own segment
        for j in np.flatnonzero(groups == g):
            if j not in picks:
                assert why[j] == "interval" and np.abs(times[mine] - times[j]).min() < 1.0


# ------------------------------------------------------------------ end to end


def test_blurry_frames_are_dropped_and_explained(tmp_path):
    images = [texture(i) for i in range(30)]
    blurred = {5, 17, 18}
    for i in blurred:
        images[i] = cv2.GaussianBlur(images[i], (0, 0), 2.0)
    src = tmp_path / "src"
    write_segment(src, 1, "a", images)
    result = curate(src, tmp_path / "out", CurateConfig(**FAST))
    got = reasons(result)
    assert {k for k, v in got.items() if v == "blurry"} == {f"Run-1/a/{frame_stem(i)}" for i in blurred}
    assert result.summary["reasons"]["kept"] == 27
    rows = list(csv.DictReader(open(tmp_path / "out" / "curation.csv")))
    blurry_row = next(r for r in rows if r["stem"] == frame_stem(5))
    assert blurry_row["kept"] == "no" and "sharpness ratio" in blurry_row["detail"]
    assert float(blurry_row["sharpness_ratio"]) < 0.35
    sharp_row = next(r for r in rows if r["stem"] == frame_stem(6))
    assert float(sharp_row["sharpness_ratio"]) > 0.5 and float(sharp_row["laplacian_var"]) > 0


def test_absolute_sharpness_floor(tmp_path):
    images = [texture(i) for i in range(6)]
    src = tmp_path / "src"
    write_segment(src, 1, "a", images)
    laps = [sharpness(cv2.cvtColor(im, cv2.COLOR_RGB2GRAY))[0] for im in images]
    floor = float(np.median(laps))
    result = curate(src, tmp_path / "out", CurateConfig(min_laplacian=floor, blur_ratio=0.0, **FAST))
    got = reasons(result)
    for i, lap in enumerate(laps):
        assert (got[f"Run-1/a/{frame_stem(i)}"] == "blurry") == (lap < floor)


def test_near_duplicates_within_segment_and_across_segments_by_gps(tmp_path):
    src = tmp_path / "src"
    rng = np.random.default_rng(5)
    images_a = [texture(i) for i in range(12)]
    # 4 is 3 with sensor noise (sharper, so 4 survives and 3 is its duplicate); 9 repeats 2 exactly
    noise = rng.integers(-3, 4, images_a[3].shape)
    images_a[4] = np.clip(images_a[3].astype(np.int16) + noise, 0, 255).astype(np.uint8)
    images_a[9] = images_a[2].copy()
    gps_a = [(50.0 + 1e-4 * i, 8.0) for i in range(12)]  # ~11 m apart
    write_segment(src, 1, "a", images_a, gps_a)
    # segment b: frame 0 repeats a/7 at the same place; frame 1 repeats a/8 but 1 km away
    images_b = [images_a[7].copy(), images_a[8].copy()] + [texture(100 + i) for i in range(4)]
    gps_b = [gps_a[7], (51.0, 8.0)] + [(52.0 + 1e-4 * i, 8.0) for i in range(4)]
    write_segment(src, 1, "b", images_b, gps_b)

    result = curate(src, tmp_path / "out", CurateConfig(**FAST))
    got = reasons(result)
    table = result.table
    dup_of = {table.frame_id(i): table.frame_id(int(table.duplicate_of[i])) for i in range(len(table))
              if table.reason[i] == "duplicate"}
    assert dup_of == {
        "Run-1/a/000003": "Run-1/a/000004",
        "Run-1/a/000009": "Run-1/a/000002",
        "Run-1/b/000000": "Run-1/a/000007",
    }
    assert got["Run-1/b/000001"] == "kept"  # same view, but 1 km away and another segment
    rows = {r["segment"] + "/" + r["stem"]: r for r in csv.DictReader(open(tmp_path / "out" / "curation.csv"))}
    assert rows["a/000009"]["duplicate_of"] == "Run-1/a/000002"
    assert "descriptor distance 0.000" in rows["a/000009"]["detail"]

    # the temporal window: without GPS and with a window shorter than 0.7 s, 9 no longer meets 2
    result = curate(src, tmp_path / "out2", CurateConfig(duplicate_window_s=0.5, duplicate_radius_m=0.0, **FAST))
    got = reasons(result)
    assert got["Run-1/a/000009"] == "kept" and got["Run-1/a/000003"] == "duplicate"
    assert got["Run-1/b/000000"] == "kept"


def test_count_fraction_and_variety(tmp_path):
    src = tmp_path / "src"
    rng = np.random.default_rng(2)
    scenes = [texture(50 + k) for k in range(3)]
    images = []
    for i in range(24):  # 3 scenes, 8 slightly different views of each
        base = scenes[i % 3].astype(np.float32) * rng.uniform(0.97, 1.03)
        images.append(np.clip(base + rng.normal(0, 2, base.shape), 0, 255).astype(np.uint8))
    write_segment(src, 1, "a", images)
    base_config = dict(duplicate_distance=0.0, **FAST)

    result = curate(src, tmp_path / "three", CurateConfig(count=3, **base_config))
    kept = [i for i in range(24) if result.table.reason[i] == "kept"]
    assert len(kept) == 3 and sorted(i % 3 for i in kept) == [0, 1, 2]
    assert sorted(p.stem for p in (tmp_path / "three" / "Run-1" / "a" / "rgb_image").iterdir()) == [
        frame_stem(i) for i in kept
    ]
    again = curate(src, tmp_path / "again", CurateConfig(count=3, **base_config))
    assert again.table.reason == result.table.reason

    result = curate(src, tmp_path / "quarter", CurateConfig(fraction=0.25, **base_config))
    assert result.summary["kept"] == 6 and result.summary["reasons"]["not_selected"] == 18
    assert all(d == "target of 6 frames reached" for d, r in zip(result.table.detail, result.table.reason)
               if r == "not_selected")

    result = curate(src, tmp_path / "more", CurateConfig(count=100, **base_config))
    assert result.summary["kept"] == 24 and any("only 24 passed" in line for line in result.lines())


def test_output_dataset_curation_csv_and_untouched_input(tmp_path):
    src = tmp_path / "src"
    images = [texture(i) for i in range(10)]
    images[3] = cv2.GaussianBlur(images[3], (0, 0), 2.5)
    write_segment(src, 2, "a", images, [(50.0 + 1e-4 * i, 8.0) for i in range(10)])
    write_segment(src, 2, "b", [texture(200 + i) for i in range(4)])  # no GPS
    before = tree_digest(src)

    out = tmp_path / "out"
    result = curate(src, out, CurateConfig(count=8, **FAST))
    assert tree_digest(src) == before, "the input dataset must not change"

    rows = list(csv.DictReader(open(out / "curation.csv")))
    assert tuple(rows[0].keys()) == CURATION_COLUMNS and len(rows) == 14
    assert [r["stem"] for r in rows[:10]] == [frame_stem(i) for i in range(10)]
    assert rows[3]["reason"] == "blurry"
    assert rows[0]["latitude"] and not rows[10]["latitude"]
    assert {r["reason"] for r in rows} <= set(REASONS)
    kept = {(r["run"], r["segment"], r["stem"]) for r in rows if r["kept"] == "yes"}
    assert len(kept) == 8 and all(r["reason"] == "kept" for r in rows if r["kept"] == "yes")

    # the output is a dataset in the same layout with exactly the kept frames, rows verbatim
    ds = open_dataset(out)
    assert {(str(s.run), s.name, f.stem) for s in ds.segments for f in s.frames} == kept
    for seg in ds.segments:
        src_lines = (src / f"Run-{seg.run}" / seg.name / "metadata.csv").read_text().splitlines()
        out_lines = (out / f"Run-{seg.run}" / seg.name / "metadata.csv").read_text().splitlines()
        assert out_lines[0] == src_lines[0]
        assert set(out_lines[1:]) <= set(src_lines[1:]) and len(out_lines) == len(seg) + 1
        for i in range(len(seg)):
            a = seg.rgb_path(i)
            b = src / f"Run-{seg.run}" / seg.name / "rgb_image" / a.name
            assert a.read_bytes() == b.read_bytes()
            assert a.stat().st_ino == b.stat().st_ino  # hard link on one file system
    summary = json.loads((out / "curation.json").read_text())
    assert summary["kept"] == 8 and summary["input_frames"] == 14 and summary["linked"] == 16
    assert summary["config"]["count"] == 8 and summary["reasons"]["blurry"] == 1
    assert not list(tmp_path.glob(".out.partial-*"))

    copied = curate(src, tmp_path / "copied", CurateConfig(count=8, link=False, **FAST))
    assert copied.summary["copied"] == 16 and copied.summary["linked"] == 0
    assert copied.table.reason == result.table.reason


def test_unreadable_frames_are_dropped_with_their_file_named(tmp_path):
    src = tmp_path / "src"
    seg = write_segment(src, 1, "a", [texture(i) for i in range(8)])
    (seg / "depth_image" / "000001.png").unlink()
    (seg / "rgb_image" / "000002.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)
    cv2.imwrite(str(seg / "depth_image" / "000003.png"), np.ones((H // 2, W // 2), np.uint16))
    cv2.imwrite(str(seg / "depth_image" / "000004.png"), np.ones((H, W), np.uint8))
    before = tree_digest(src)

    result = curate(src, tmp_path / "out", CurateConfig(**FAST))
    rows = {r["stem"]: r for r in csv.DictReader(open(tmp_path / "out" / "curation.csv"))}
    assert {s for s, r in rows.items() if r["reason"] == "unreadable"} == {"000001", "000002", "000003", "000004"}
    assert "000001.png does not exist" in rows["000001"]["detail"]
    assert "rgb_image/000002.png is not a PNG" in rows["000002"]["detail"]
    assert "is 48x36, its RGB image is 96x72" in rows["000003"]["detail"]
    assert "is an 8-bit PNG and the dataset does not state" in rows["000004"]["detail"]
    assert result.summary["kept"] == 4 and any("4 unreadable" in line for line in result.lines())
    assert sorted(p.name for p in (tmp_path / "out" / "Run-1" / "a" / "depth_image").iterdir()) == [
        f"00000{i}.png" for i in (0, 5, 6, 7)
    ]
    assert tree_digest(src) == before


def test_frames_without_depth_and_the_duplicate_that_replaces_them(tmp_path):
    src = tmp_path / "src"
    images = [texture(i) for i in range(6)]
    # 1 is a sharper (noisier) copy of 0 without any depth: 0 must take its place again
    images[1] = np.clip(images[0].astype(np.int16) + np.random.default_rng(0).integers(-3, 4, images[0].shape),
                        0, 255).astype(np.uint8)
    depths = [depth_map(i, valid=(i != 1)) for i in range(6)]
    write_segment(src, 1, "a", images, depths=depths)
    result = curate(src, tmp_path / "out", CurateConfig(**FAST))
    got = reasons(result)
    assert got["Run-1/a/000001"] == "no_depth" and got["Run-1/a/000000"] == "kept"
    assert "0.0 % valid depth pixels" in result.table.detail[1]
    assert 0.85 < result.table.depth_valid[0] < 0.95

    result = curate(src, tmp_path / "nodepth", CurateConfig(check_depth=False, **FAST))
    got = reasons(result)
    assert got["Run-1/a/000001"] == "kept" and got["Run-1/a/000000"] == "duplicate"
    assert math.isnan(result.table.depth_valid[0])


def test_real_dataset_style_csv_without_gps_is_curated_and_copied_verbatim(tmp_path):
    seg = tmp_path / "src" / "Run-3" / "c"
    (seg / "rgb_image").mkdir(parents=True)
    (seg / "depth_image").mkdir()
    lines = ["Filename,Time [s],gyro_x,gyro_y,gyro_z,acc_x,acc_y,acc_z,Left Encoder,note"]
    for i in range(5):
        name = f"img_{i:04d}"
        cv2.imwrite(str(seg / "rgb_image" / f"{name}.png"), texture(i)[..., ::-1])
        cv2.imwrite(str(seg / "depth_image" / f"{name}.png"), np.full((H, W), 1500, np.uint16))
        lines.append(f"{name}.png,{10 + i * 0.5},0.1,0.2,0.3,0.0,0.0,9.8,--,\"a, b\"")
    (seg / "metadata.csv").write_text("\n".join(lines) + "\n")
    result = curate(tmp_path / "src", tmp_path / "out", CurateConfig(count=3, **FAST))
    assert result.summary["kept"] == 3
    out_lines = (tmp_path / "out" / "Run-3" / "c" / "metadata.csv").read_text().splitlines()
    assert out_lines[0] == lines[0] and set(out_lines[1:]) <= set(lines[1:]) and len(out_lines) == 4
    rows = list(csv.DictReader(open(tmp_path / "out" / "curation.csv")))
    assert [r["stem"] for r in rows] == [f"img_{i:04d}" for i in range(5)] and rows[0]["run"] == "3"


def test_refusals_leave_nothing_behind(tmp_path, monkeypatch):
    src = tmp_path / "src"
    write_segment(src, 1, "a", [texture(i) for i in range(4)])
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="holds no Run-<N>/<segment>"):
        curate(tmp_path / "plain", tmp_path / "o1")
    with pytest.raises(FileNotFoundError, match="missing"):
        curate(tmp_path / "missing", tmp_path / "o2")
    with pytest.raises(FileExistsError, match="already exists"):
        curate(src, tmp_path / "plain")
    with pytest.raises(ValueError, match="inside the input"):
        curate(src, src / "curated")
    with pytest.raises(ValueError, match="either count or fraction"):
        curate(src, tmp_path / "o3", CurateConfig(count=2, fraction=0.5))
    with pytest.raises(ValueError, match="blur_ratio"):
        CurateConfig(blur_ratio=1.5).validate()

    bad = tmp_path / "bad"
    write_segment(bad, 1, "a", [texture(i) for i in range(3)])
    csv_path = bad / "Run-1" / "a" / "metadata.csv"
    csv_path.write_text(csv_path.read_text().replace("9.81", "nine", 1))
    with pytest.raises(ValueError, match=r"metadata.csv line 2: column 'linear_acceleration_z' must be a number"):
        curate(bad, tmp_path / "o4")

    calls = {"n": 0}
    real_place = curate_mod._place

    def failing_place(a, b, link):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError("disk full")
        return real_place(a, b, link)

    monkeypatch.setattr(curate_mod, "_place", failing_place)
    with pytest.raises(OSError, match="disk full"):
        curate(src, tmp_path / "o5", CurateConfig(**FAST))
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == ["bad", "plain", "src"], leftovers


def test_cli_curate(tmp_path, capsys):
    src = tmp_path / "src"
    write_segment(src, 1, "a", [texture(i) for i in range(10)])
    code = dataset_cli(["curate", str(src), "--out", str(tmp_path / "out"), "--count", "4", "--quiet",
                        "--workers", "1", "--copy"])
    printed = capsys.readouterr().out
    assert code == 0 and "kept 4 of 10 frames" in printed and "8 copied" in printed
    assert dataset_cli(["curate", str(src), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert dataset_cli(["curate", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert dataset_cli(["curate", str(src), "--out", str(tmp_path / "o"), "--fraction", "2", "--quiet"]) == 2
    assert "argument --fraction: expected a fraction within (0, 1], got '2'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_threads_give_the_same_decisions_and_nothing_kept_is_reported(tmp_path):
    src = tmp_path / "src"
    images = [texture(i) for i in range(40)]
    for i in (7, 21):
        images[i] = cv2.GaussianBlur(images[i], (0, 0), 2.0)
    images[30] = images[29].copy()
    write_segment(src, 1, "a", images, [(50.0 + 1e-4 * i, 8.0) for i in range(40)])
    one = curate(src, tmp_path / "one", CurateConfig(count=12, workers=1))
    two = curate(src, tmp_path / "two", CurateConfig(count=12, workers=2))
    assert one.table.reason == two.table.reason and one.table.detail == two.table.detail
    assert np.array_equal(one.table.descriptors, two.table.descriptors)
    assert one.summary["reasons"]["blurry"] == 2 and one.summary["reasons"]["duplicate"] == 1

    dark = tmp_path / "dark"
    seg = write_segment(dark, 1, "a", [texture(i) for i in range(3)])
    for p in (seg / "depth_image").iterdir():
        p.unlink()
    with pytest.raises(ValueError, match=r"kept none of the 3 frames .*unreadable 3; e.g. Run-1/a/000000: .*"
                                         r"000000.png does not exist.*nothing was written.*validate"):
        curate(dark, tmp_path / "none", CurateConfig(**FAST))
    assert not (tmp_path / "none").exists()
