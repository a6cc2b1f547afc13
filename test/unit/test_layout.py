"""Tests of the dataset layout reader/writer (forest_perception.dataset_tools.layout)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest

from forest_perception.dataset_tools import layout
from forest_perception.dataset_tools.layout import (
    METADATA_COLUMNS,
    FrameRecord,
    GpsFix,
    ImuSample,
    SegmentWriter,
    WheelEncoders,
    dataset_summary,
    decode_depth_mm,
    encode_depth_mm,
    frame_stem,
    load_frame,
    next_segment_name,
    open_dataset,
    read_segment,
    segment_index,
    segment_name,
)

H, W = 6, 8
REPO = Path(__file__).resolve().parents[2]


def _imu(i: int = 0) -> ImuSample:
    return ImuSample(
        angular_velocity=(0.01 * i, -0.02, 0.3),
        linear_acceleration=(0.1, -0.2 * i, 9.81),
        orientation=(0.0, 0.0, 0.0, 1.0),
    )


def _record(i: int, **kw) -> FrameRecord:
    fields = {"stem": frame_stem(i), "timestamp": 1700000000.0 + 0.1 * i, "imu": _imu(i)}
    fields.update(kw)
    return FrameRecord(**fields)


def _images(i: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    rgb = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    depth = rng.uniform(0.15, 30.0, size=(H, W)).astype(np.float32)
    depth[0, 0] = np.nan
    return rgb, depth


def _write_segment(root: Path, run: int, seg: str, n: int, **record_kw) -> list:
    rng = np.random.default_rng(run * 100 + segment_index(seg))
    written = []
    with SegmentWriter(root, run, seg) as writer:
        for i in range(n):
            rgb, depth = _images(i, rng)
            rec = _record(i, **record_kw)
            writer.write_frame(rgb, depth, rec)
            written.append((rgb, depth, rec))
    return written


def _close_depth(a: np.ndarray, b: np.ndarray) -> bool:
    same_nan = np.array_equal(np.isnan(a), np.isnan(b))
    ok = np.abs(a - b)[~np.isnan(a)] <= 0.0005 + 1e-6
    return bool(same_nan and ok.all())


# ------------------------------------------------------------------ depth codec


def test_depth_round_trip_within_half_millimetre():
    rng = np.random.default_rng(0)
    depth = rng.uniform(0.001, 65.5, size=(50, 60)).astype(np.float32)
    decoded = decode_depth_mm(encode_depth_mm(depth))
    assert decoded.dtype == np.float32
    assert np.nanmax(np.abs(decoded - depth)) <= 0.0005 + 1e-6
    assert not np.isnan(decoded).any()


def test_depth_invalid_values_become_zero_and_nan():
    depth = np.array(
        [np.nan, np.inf, -np.inf, -1.0, 0.0, 0.0004, 65.5356, 66.0, 100.0, 1e9, 65.535, 1.2344], np.float32
    )
    mm = encode_depth_mm(depth)
    assert mm.dtype == np.uint16
    # nothing may wrap around: 66 m must not come back as 0.464 m
    assert mm.tolist() == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 65535, 1234]
    back = decode_depth_mm(mm)
    assert np.isnan(back[:10]).all()
    assert back[10] == pytest.approx(65.535)


def test_depth_codec_rejects_wrong_dtypes():
    with pytest.raises(ValueError, match="depth_m must be a floating-point"):
        encode_depth_mm(np.ones((2, 2), np.uint16))
    with pytest.raises(ValueError, match="depth_mm must be a uint16"):
        decode_depth_mm(np.ones((2, 2), np.float32))


# ------------------------------------------------------------------ naming


def test_segment_names_follow_spreadsheet_order():
    assert [segment_name(i) for i in (0, 1, 25, 26, 27, 51, 52, 701, 702)] == [
        "a", "b", "z", "aa", "ab", "az", "ba", "zz", "aaa",
    ]  # fmt: skip
    for i in range(1000):
        assert segment_index(segment_name(i)) == i
    for bad in ("", "A", "a1", "Run-1"):
        with pytest.raises(ValueError, match="segment name"):
            segment_index(bad)
    with pytest.raises(ValueError, match="segment index"):
        segment_name(-1)


def test_next_segment_name(tmp_path):
    assert next_segment_name(tmp_path, 1) == "a"
    _write_segment(tmp_path, 1, "a", 1)
    _write_segment(tmp_path, 1, "z", 1)
    assert next_segment_name(tmp_path, 1) == "aa"


# ------------------------------------------------------------------ round trips


def test_rgb_round_trip_is_exact_and_stored_bgr_for_opencv(tmp_path):
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[..., 0] = 200  # pure-ish red
    rgb[..., 1] = 10
    rgb[..., 2] = 60
    rgb[2, 3] = (1, 2, 3)
    with SegmentWriter(tmp_path, 0, "a") as writer:
        writer.write_frame(rgb, np.full((H, W), 2.0, np.float32), _record(0))
    seg = read_segment(tmp_path / "Run-0" / "a")
    loaded, _, _ = load_frame(seg, 0)
    assert loaded.dtype == np.uint8 and loaded.shape == (H, W, 3)
    np.testing.assert_array_equal(loaded, rgb)
    # Any OpenCV tool reading the PNG must see the same colours in BGR order.
    on_disk = cv2.imread(str(seg.rgb_path(0)), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(on_disk, rgb[..., ::-1])


def test_written_segment_reads_back_identically(tmp_path):
    gps = GpsFix(latitude=50.9351234567, longitude=-1.3962345678, altitude=41.25, status=0)
    enc = WheelEncoders(left_position=12.5, right_position=-3.25, left_velocity=0.7, right_velocity=0.69)
    extras = {"weather": "light rain, wind", "world_seed": 7, "pose_x": 1.25, "pose_y": -0.5, "pose_yaw": 0.1}
    written = _write_segment(tmp_path, 3, "b", 5, gps=gps, encoders=enc, extras=extras)

    seg = read_segment(tmp_path / "Run-3" / "b")
    assert (seg.run, seg.name, len(seg)) == (3, "b", 5)
    assert seg.columns == METADATA_COLUMNS + tuple(extras)
    assert seg.has_gps and seg.has_encoders
    for i, (rgb, depth, rec) in enumerate(written):
        rgb2, depth2, rec2 = load_frame(seg, i)
        np.testing.assert_array_equal(rgb2, rgb)
        assert depth2.dtype == np.float32 and _close_depth(depth2, depth)
        assert rec2 == rec
        assert rec2.extras["weather"] == "light rain, wind"
        assert rec2.timestamp == rec.timestamp  # exact, not approximately


def test_timestamp_style_stems_with_dots_survive(tmp_path):
    rng = np.random.default_rng(1)
    with SegmentWriter(tmp_path, 1, "a") as writer:
        for i, stem in enumerate(("1583412345.100000", "1583412345.200000")):
            rgb, depth = _images(i, rng)
            writer.write_frame(rgb, depth, _record(i, stem=stem))
    seg = read_segment(tmp_path / "Run-1" / "a")
    assert [f.stem for f in seg.frames] == ["1583412345.100000", "1583412345.200000"]
    assert seg.rgb_path(1).name == "1583412345.200000.png"


def test_dataset_index_and_summary(tmp_path):
    _write_segment(tmp_path, 1, "a", 2, gps=GpsFix(50.0, -1.0))
    _write_segment(tmp_path, 1, "b", 3)
    _write_segment(tmp_path, 2, "a", 1, encoders=WheelEncoders(1.0, 2.0, 0.1, 0.2))
    ds = open_dataset(tmp_path)
    assert len(ds) == 6 and ds.runs == [1, 2]
    assert [s.segment_id for s in ds.segments] == ["1a", "1b", "2a"]
    _, _, rec = ds[2]
    assert rec.stem == "000000" and ds.segment(1, "b").frames[0] == rec
    _, _, last = ds[-1]
    assert last.encoders == WheelEncoders(1.0, 2.0, 0.1, 0.2)
    with pytest.raises(IndexError):
        ds[6]

    summary = dataset_summary(tmp_path)
    assert (summary["runs"], summary["segments"], summary["frames"]) == (2, 3, 6)
    assert summary["segments_with_gps"] == ["1a"]
    assert summary["segments_with_encoders"] == ["2a"]
    assert [s["unindexed_files"] for s in summary["per_segment"]] == [0, 0, 0]


# ------------------------------------------------------------------ tolerant reader


def _write_pair(seg_dir: Path, stem: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    (seg_dir / "rgb_image").mkdir(parents=True, exist_ok=True)
    (seg_dir / "depth_image").mkdir(parents=True, exist_ok=True)
    rgb, depth = _images(0, rng)
    cv2.imwrite(str(seg_dir / "rgb_image" / f"{stem}.png"), rgb[..., ::-1])
    cv2.imwrite(str(seg_dir / "depth_image" / f"{stem}.png"), encode_depth_mm(depth))
    return rgb, depth


def test_missing_gps_and_encoder_columns_are_tolerated(tmp_path):
    seg_dir = tmp_path / "Run-2" / "c"
    rng = np.random.default_rng(2)
    imu_cols = list(layout.IMU_COLUMNS)
    rows = [["stem", "timestamp", *imu_cols, "operator_note"]]
    for i in range(3):
        _write_pair(seg_dir, frame_stem(i), rng)
        rows.append([frame_stem(i), f"{10 + i}.5", *["0.5"] * len(imu_cols), "" if i == 1 else f"note {i}"])
    with open(seg_dir / "metadata.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)

    seg = read_segment(seg_dir)
    assert len(seg) == 3 and not seg.has_gps and not seg.has_encoders
    rec = seg.frames[0]
    assert rec.gps is None and rec.encoders is None
    assert rec.imu.orientation == (0.5, 0.5, 0.5, 0.5)
    assert rec.extras == {"operator_note": "note 0"}
    assert seg.frames[1].extras == {}  # an empty cell is "not recorded"
    rgb, depth, _ = load_frame(seg, 2)
    assert rgb.shape == (H, W, 3) and depth.shape == (H, W)


def test_empty_gps_cells_from_writer_read_as_none(tmp_path):
    _write_segment(tmp_path, 5, "a", 2)  # no GPS, no encoders: empty cells
    seg = read_segment(tmp_path / "Run-5" / "a")
    assert all(f.gps is None and f.encoders is None for f in seg.frames)


def test_foreign_column_names_and_aliases(tmp_path):
    seg_dir = tmp_path / "Run-1" / "a"
    rng = np.random.default_rng(3)
    _write_pair(seg_dir, "000001", rng)
    header = ["Picture", "Timestamp [s]", "lat", "lon", "Alt (m)", "gyro.x", "gyro.y", "gyro.z"]
    header += ["acc_x", "acc_y", "acc_z", "LeftTicks", "weather"]
    row = [
        "rgb_image/000001.png",
        "12.25",
        "50.5",
        "-1.5",
        "20",
        "0.1",
        "0.2",
        "0.3",
        "1",
        "2",
        "9.8",
        "42",
        "sun",
    ]
    with open(seg_dir / "metadata.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, row])

    seg = read_segment(seg_dir, aliases={"Picture": "stem", "LeftTicks": "left_wheel_position"})
    rec = seg.frames[0]
    assert rec.stem == "000001" and rec.timestamp == 12.25
    assert rec.gps == GpsFix(50.5, -1.5, 20.0, None)
    assert rec.imu.angular_velocity == (0.1, 0.2, 0.3) and rec.imu.orientation is None
    assert rec.encoders == WheelEncoders(left_position=42.0)
    assert rec.extras == {"weather": "sun"}

    # Without the alias the file-name column is unknown, and the error says how to fix it.
    with pytest.raises(ValueError, match="no file-name column.*aliases"):
        read_segment(seg_dir)


def test_crlf_line_endings_and_nan_gps_status(tmp_path):
    seg_dir = tmp_path / "Run-1" / "a"
    _write_pair(seg_dir, "f1", np.random.default_rng(12))
    header = ["stem", "timestamp", "latitude", "longitude", "gps_status", *layout.ANGULAR_VELOCITY_COLUMNS]
    header += [*layout.LINEAR_ACCELERATION_COLUMNS, "note"]
    row = ["f1", "1.0", "50", "-1", "nan", "0", "0", "0", "0", "0", "9.8", "a\u2028b"]
    (seg_dir / "metadata.csv").write_bytes(("\r\n".join([",".join(header), ",".join(row)]) + "\r\n").encode())
    rec = read_segment(seg_dir).frames[0]
    assert rec.gps == GpsFix(50.0, -1.0, None, None)
    assert rec.extras == {"note": "a\u2028b"}


def test_timestamp_in_milliseconds_is_scaled(tmp_path):
    seg_dir = tmp_path / "Run-1" / "a"
    _write_pair(seg_dir, "f1", np.random.default_rng(4))
    header = [
        "filename",
        "timestamp_ms",
        *layout.ANGULAR_VELOCITY_COLUMNS,
        *layout.LINEAR_ACCELERATION_COLUMNS,
    ]
    with open(seg_dir / "metadata.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, ["f1.png", "1500", "0", "0", "0", "0", "0", "9.8"]])
    assert read_segment(seg_dir).frames[0].timestamp == pytest.approx(1.5)


# ------------------------------------------------------------------ reader errors


def test_missing_metadata_csv_is_a_clear_error(tmp_path):
    seg_dir = tmp_path / "Run-1" / "a"
    _write_pair(seg_dir, "000000", np.random.default_rng(5))
    with pytest.raises(FileNotFoundError, match="has no metadata.csv"):
        read_segment(seg_dir)
    with pytest.raises(FileNotFoundError, match="has no metadata.csv"):
        open_dataset(tmp_path)


def test_row_with_missing_files_is_a_clear_error(tmp_path):
    _write_segment(tmp_path, 1, "a", 3)
    seg_dir = tmp_path / "Run-1" / "a"
    (seg_dir / "depth_image" / "000001.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"stem '000001'.*depth_image"):
        read_segment(seg_dir)
    seg = read_segment(seg_dir, check_files=False)
    with pytest.raises(FileNotFoundError, match="depth image .*000001.png does not exist"):
        load_frame(seg, 1)


def test_8_bit_depth_png_without_a_stated_scale_names_the_flags_and_the_file(tmp_path):
    _write_segment(tmp_path, 1, "a", 1)
    seg = read_segment(tmp_path / "Run-1" / "a")
    cv2.imwrite(str(seg.depth_path(0)), np.full((H, W), 128, np.uint8))  # 8-bit grayscale
    with pytest.raises(ValueError, match="8-bit PNG.*--depth-scale.*--depth-larger.*forest_dataset.yaml") as error:
        load_frame(seg, 0)
    assert str(seg.depth_path(0)) in str(error.value) and str(tmp_path / "forest_dataset.yaml") in str(error.value)
    cv2.imwrite(str(seg.depth_path(0)), np.full((H, W), 128, np.uint32).astype(np.float32))  # 32-bit float
    with pytest.raises(ValueError, match="depth"):
        load_frame(seg, 0)


def test_a_segment_without_imu_columns_reads_with_imu_none(tmp_path):
    seg_dir = tmp_path / "Run-1" / "a"
    _write_pair(seg_dir, "x", np.random.default_rng(6))
    (seg_dir / "metadata.csv").write_text("stem,timestamp,latitude,longitude\nx,1.0,50,1\n")
    seg = read_segment(seg_dir)
    assert seg.frames[0].imu is None and not seg.has_imu and seg.frames[0].gps.latitude == 50.0
    # half an IMU (only the gyro) is read as no IMU; its columns stay plain columns, nothing is lost
    (seg_dir / "metadata.csv").write_text("stem,timestamp,gx,gy,gz\nx,1.0,0.1,0.2,0.3\n")
    seg = read_segment(seg_dir)
    assert seg.frames[0].imu is None and seg.frames[0].extras == {"gx": 0.1, "gy": 0.2, "gz": 0.3}


# ------------------------------------------------------------------ crash safety


def test_abandoned_writer_process_leaves_earlier_frames_readable(tmp_path):
    # A real crash: the writer process dies (no close, no cleanup) after 3 frames
    # and while the 4th frame's depth image is half-way to disk.
    script = textwrap.dedent(
        f"""
        import os, numpy as np
        from forest_perception.dataset_tools import images, layout
        from forest_perception.dataset_tools.layout import FrameRecord, ImuSample, SegmentWriter
        w = SegmentWriter({str(tmp_path)!r}, 1, "a")
        imu = ImuSample((0, 0, 0), (0, 0, 9.81), (0, 0, 0, 1))
        rgb = np.full((6, 8, 3), 7, np.uint8)
        depth = np.full((6, 8), 1.5, np.float32)
        for i in range(3):
            w.write_frame(rgb, depth, FrameRecord(f"{{i:06d}}", float(i), imu))
        real_write = layout.write_atomic
        def dying_write(final, data, fsync):
            if final.parent.name == "depth_image":
                open(images.temporary_path(final), "wb").write(data[: len(data) // 2])
                os._exit(17)
            real_write(final, data, fsync)
        layout.write_atomic = dying_write
        w.write_frame(rgb, depth, FrameRecord("000003", 3.0, imu))
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 17, proc.stderr

    seg_dir = tmp_path / "Run-1" / "a"
    assert (seg_dir / "rgb_image" / "000003.png").exists()  # the interrupted frame's RGB landed
    assert any(p.name.endswith(".tmp") for p in (seg_dir / "depth_image").iterdir())
    seg = read_segment(seg_dir)
    assert [f.stem for f in seg.frames] == ["000000", "000001", "000002"]
    for i in range(3):
        rgb, depth, _ = load_frame(seg, i)
        assert (rgb == 7).all() and np.allclose(depth, 1.5)
    summary = dataset_summary(tmp_path)
    assert summary["frames"] == 3 and summary["per_segment"][0]["unindexed_files"] == 2


def test_failed_write_mid_frame_keeps_writer_consistent(tmp_path, monkeypatch):
    rng = np.random.default_rng(7)
    writer = SegmentWriter(tmp_path, 1, "a")
    for i in range(2):
        writer.write_frame(*_images(i, rng), _record(i))
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(dst).parent.name == "depth_image":
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        writer.write_frame(*_images(2, rng), _record(2))
    monkeypatch.setattr(os, "replace", real_replace)
    seg_dir = tmp_path / "Run-1" / "a"
    assert not any(p.name.endswith(".tmp") for p in (seg_dir / "depth_image").iterdir())
    assert len(read_segment(seg_dir)) == 2
    # The failed frame was not recorded, so the same stem and timestamp can be retried.
    writer.write_frame(*_images(2, rng), _record(2))
    writer.close()
    assert [f.stem for f in read_segment(seg_dir).frames] == ["000000", "000001", "000002"]


def test_torn_last_csv_line_is_skipped_with_warning(tmp_path):
    _write_segment(tmp_path, 1, "a", 3)
    csv_path = tmp_path / "Run-1" / "a" / "metadata.csv"
    with open(csv_path, "a") as f:
        f.write("000003,1700000000.3,,,")  # a row cut short, no newline
    with pytest.warns(UserWarning, match="unterminated last row"):
        seg = read_segment(csv_path.parent)
    assert len(seg) == 3


def test_stray_temp_files_and_empty_segment_dirs_are_ignored(tmp_path):
    _write_segment(tmp_path, 1, "a", 2)
    seg_dir = tmp_path / "Run-1" / "a"
    (seg_dir / "rgb_image" / ".000002.png.999.tmp").write_bytes(b"\x89PNG partial")
    (seg_dir / ".metadata.csv.999.tmp").write_text("stem\n")
    (tmp_path / "Run-1" / "b" / "rgb_image").mkdir(parents=True)  # writer died before the header
    ds = open_dataset(tmp_path)
    assert [s.segment_id for s in ds.segments] == ["1a"] and len(ds) == 2


# ------------------------------------------------------------------ writer validation


@pytest.mark.parametrize(
    ("rgb", "depth", "message"),
    [
        (
            np.zeros((H, W, 3), np.float32),
            np.ones((H, W), np.float32),
            r"rgb must be an HxWx3 uint8.*float32",
        ),
        (np.zeros((H, W), np.uint8), np.ones((H, W), np.float32), r"rgb must be an HxWx3 uint8.*\(6, 8\)"),
        (np.zeros((H, W, 4), np.uint8), np.ones((H, W), np.float32), r"rgb must be an HxWx3"),
        ([[0]], np.ones((H, W), np.float32), r"rgb must be .*got list"),
        (
            np.zeros((H, W, 3), np.uint8),
            np.ones((H, W), np.uint16),
            r"depth_m must be an HxW floating.*uint16",
        ),
        (np.zeros((H, W, 3), np.uint8), np.ones((H, W, 1), np.float32), r"depth_m must be an HxW"),
        (
            np.zeros((H, W, 3), np.uint8),
            np.ones((H + 1, W), np.float32),
            r"depth_m size 8x7 differs from rgb size 8x6",
        ),
    ],
)
def test_bad_images_raise_value_error_naming_the_input(tmp_path, rgb, depth, message):
    with SegmentWriter(tmp_path, 1, "a") as writer:
        with pytest.raises(ValueError, match=message):
            writer.write_frame(rgb, depth, _record(0))
        assert writer.frames_written == 0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"timestamp": float("nan")}, "record.timestamp must be a finite number"),
        ({"timestamp": float("inf")}, "record.timestamp must be a finite number"),
        ({"timestamp": "12.0"}, "record.timestamp must be a finite number"),
        ({"stem": "../escape"}, "record.stem must be a plain file name"),
        ({"stem": ".hidden"}, "record.stem must be a plain file name"),
        ({"stem": ""}, "record.stem must be a plain file name"),
        ({"imu": (0, 0, 0)}, "record.imu must be an ImuSample"),
        ({"gps": (50.0, 1.0)}, "record.gps must be a GpsFix"),
        ({"extras": {"weather": ["rain"]}}, r"record.extras\['weather'\] must be a str or a number"),
    ],
)
def test_bad_records_raise_value_error_naming_the_field(tmp_path, changes, message):
    rng = np.random.default_rng(8)
    with SegmentWriter(tmp_path, 1, "a") as writer:
        with pytest.raises(ValueError, match=message):
            writer.write_frame(*_images(0, rng), _record(0, **changes))


def test_imu_sample_checks_its_vectors():
    with pytest.raises(ValueError, match="angular_velocity must have 3 components"):
        ImuSample((0, 0), (0, 0, 9.8))
    with pytest.raises(ValueError, match="orientation must be 4 numbers"):
        ImuSample((0, 0, 0), (0, 0, 9.8), ("a", 0, 0, 1))


def test_non_monotonic_timestamps_are_refused(tmp_path):
    rng = np.random.default_rng(9)
    with SegmentWriter(tmp_path, 1, "a") as writer:
        writer.write_frame(*_images(0, rng), _record(0, timestamp=5.0))
        with pytest.raises(ValueError, match=r"timestamp 5.0 .* not after the previous frame's 5.0"):
            writer.write_frame(*_images(1, rng), _record(1, timestamp=5.0))
        with pytest.raises(ValueError, match="timestamps must increase strictly"):
            writer.write_frame(*_images(1, rng), _record(1, timestamp=4.9))
        writer.write_frame(*_images(1, rng), _record(1, timestamp=5.1))  # still usable
    assert [f.timestamp for f in read_segment(tmp_path / "Run-1" / "a").frames] == [5.0, 5.1]


def test_duplicate_stem_and_undeclared_extras_are_refused(tmp_path):
    rng = np.random.default_rng(10)
    with SegmentWriter(tmp_path, 1, "a") as writer:
        writer.write_frame(*_images(0, rng), _record(0, extras={"weather": "sun"}))
        with pytest.raises(ValueError, match="stem '000000' was already written"):
            writer.write_frame(*_images(1, rng), _record(0, timestamp=1e10))
        with pytest.raises(ValueError, match=r"extras \['wind'\] that are not columns"):
            writer.write_frame(*_images(1, rng), _record(1, extras={"weather": "sun", "wind": 3.0}))
    with pytest.raises(ValueError, match="clashes with a standard metadata column"):
        SegmentWriter(tmp_path, 1, "b", extra_columns=["latitude"])


def test_existing_segment_is_not_overwritten_unless_asked(tmp_path):
    _write_segment(tmp_path, 1, "a", 3)
    with pytest.raises(FileExistsError, match=r"Run-1/a already exists.*'b'.*--overwrite"):
        SegmentWriter(tmp_path, 1, "a")
    assert len(read_segment(tmp_path / "Run-1" / "a")) == 3  # untouched

    rng = np.random.default_rng(11)
    with SegmentWriter(tmp_path, 1, "a", overwrite=True) as writer:
        writer.write_frame(*_images(0, rng), _record(7))
    seg = read_segment(tmp_path / "Run-1" / "a")
    assert [f.stem for f in seg.frames] == ["000007"]
    assert sorted(p.name for p in (seg.path / "rgb_image").iterdir()) == ["000007.png"]


def test_writer_rejects_bad_names_and_use_after_close(tmp_path):
    with pytest.raises(ValueError, match="segment name"):
        SegmentWriter(tmp_path, 1, "A")
    with pytest.raises(ValueError, match="run must be a non-negative int"):
        SegmentWriter(tmp_path, -1, "a")
    writer = SegmentWriter(tmp_path, 1, "a")
    writer.close()
    assert read_segment(tmp_path / "Run-1" / "a").frames == []  # header-only segment
    with pytest.raises(RuntimeError, match="closed"):
        writer.write_frame(*_images(0, np.random.default_rng(0)), _record(0))


def test_layout_core_does_not_import_rclpy():
    code = "import sys, forest_perception.dataset_tools.layout; sys.exit('rclpy' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=60).returncode == 0
