"""Dataset validation (forest_perception.dataset_tools.validate): every planted problem is found, with its file."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from forest_perception.dataset_tools.cli import main as dataset_cli
from forest_perception.dataset_tools.layout import FrameRecord, GpsFix, ImuSample, SegmentWriter, frame_stem
from forest_perception.dataset_tools.validate import ValidateConfig, validate_dataset

H, W = 24, 32


def _write(root: Path, run: int, seg: str, n: int, gps: bool = True) -> Path:
    rng = np.random.default_rng(run * 10 + len(seg))
    with SegmentWriter(root, run, seg) as writer:
        for i in range(n):
            rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
            depth = rng.uniform(0.5, 8.0, (H, W)).astype(np.float32)
            writer.write_frame(
                rgb,
                depth,
                FrameRecord(
                    stem=frame_stem(i),
                    timestamp=10.0 + i,
                    imu=ImuSample((0.0, 0.1, 0.2), (0.0, 0.0, 9.81), (0.0, 0.0, 0.0, 1.0)),
                    gps=GpsFix(50.0 + i * 1e-5, 8.0, 100.0, 0) if gps else None,
                ),
            )
    return root / f"Run-{run}" / seg


def _found(report, severity: str | None = None) -> list[tuple[str, str, str]]:
    return [(p.severity, str(p.path), p.message) for p in report.problems if severity in (None, p.severity)]


def _has(report, severity: str, path: Path, *words: str) -> bool:
    return any(
        p.severity == severity and p.path == path and all(w in p.message for w in words) for p in report.problems
    )


FAST = ValidateConfig(workers=1)


def test_clean_dataset_passes_with_and_without_gps(tmp_path):
    _write(tmp_path, 1, "a", 4)
    _write(tmp_path, 1, "b", 3, gps=False)
    (tmp_path / "curation.csv").write_text("run,segment\n")  # our own root files are fine
    report = validate_dataset(tmp_path, FAST)
    assert report.ok and report.problems == [], _found(report)
    assert (report.segments, report.frames, report.images_decoded) == (2, 7, 14)
    assert report.lines()[-1].startswith("OK: 0 error(s), 0 warning(s) in 2 segment(s), 7 frame(s)")


def test_every_planted_file_problem_is_reported_with_its_file(tmp_path):
    seg = _write(tmp_path, 1, "a", 9)
    rgb, depth = seg / "rgb_image", seg / "depth_image"
    (depth / "000001.png").unlink()  # missing depth
    cv2.imwrite(str(rgb / "000002.png"), np.zeros((H, W), np.uint16))  # RGB as 16-bit gray
    cv2.imwrite(str(depth / "000003.png"), np.zeros((H, W), np.uint8))  # depth as 8-bit
    cv2.imwrite(str(depth / "000004.png"), np.full((H // 2, W), 1000, np.uint16))  # size mismatch
    good = (rgb / "000005.png").read_bytes()
    (rgb / "000005.png").write_bytes(good[:40] + b"\x00" * (len(good) - 40))  # header fine, data corrupt
    cv2.imwrite(str(depth / "000006.png"), np.full((H, W), 60000, np.uint16))  # 60 m everywhere: wrong scale
    cv2.imwrite(str(depth / "000007.png"), np.zeros((H, W), np.uint16))  # no valid depth
    (rgb / "000099.png").write_bytes(good)  # no metadata row
    (depth / ".000008.png.1234.tmp").write_bytes(b"partial")  # interrupted write
    (seg / "notes.txt").write_text("hi")

    report = validate_dataset(tmp_path, FAST)
    assert not report.ok
    assert _has(report, "error", depth / "000001.png", "depth image is missing", "line 3")
    assert _has(report, "error", rgb / "000002.png", "8-bit 3-channel", "16-bit grayscale")
    assert _has(report, "error", depth / "000003.png", "8-bit depth image", "--depth-scale", "forest_dataset.yaml")
    assert _has(report, "error", depth / "000004.png", "32x12", "000004.png is 32x24")
    assert _has(report, "error", rgb / "000005.png", "could not be decoded")
    assert _has(report, "error", depth / "000006.png", "100.0 % of the valid depth pixels are beyond 20 m")
    assert _has(report, "warning", depth / "000007.png", "no valid pixel")
    assert _has(report, "warning", rgb / "000099.png", "no row in metadata.csv")
    assert _has(report, "warning", depth / ".000008.png.1234.tmp", "stray temporary file")
    assert _has(report, "warning", seg / "notes.txt", "unexpected")
    assert len(report.errors) == 6, _found(report, "error")
    # frame 0 and 8 are fine: nothing names them
    assert not any("000000" in str(p.path) or "000008.png" == p.path.name for p in report.problems)

    quick = validate_dataset(tmp_path, ValidateConfig(decode=False))
    assert quick.images_decoded == 0
    assert not any("could not be decoded" in p.message or "beyond" in p.message for p in quick.problems)
    assert len(quick.errors) == 4


def test_every_planted_metadata_problem_is_reported_with_its_line(tmp_path):
    seg = _write(tmp_path, 2, "a", 8)
    csv_path = seg / "metadata.csv"
    lines = csv_path.read_text().splitlines()
    header = lines[0].split(",")
    col = {name: i for i, name in enumerate(header)}

    def edit(row: int, **cells: str) -> None:
        parts = lines[row].split(",")
        for name, value in cells.items():
            parts[col[name]] = value
        lines[row] = ",".join(parts)

    edit(2, timestamp="5.0")  # frame 1 goes back in time
    edit(3, angular_velocity_y="fast")  # not a number
    edit(4, latitude="95.0")  # outside [-90, 90]
    edit(5, orientation_w="0.5")  # |q| = 0.5
    edit(6, longitude="")  # latitude without longitude
    edit(7, linear_acceleration_x="")  # an IMU cell empty, the others not
    lines.append(lines[8])  # stem 000007 twice (and a timestamp that does not increase)
    csv_path.write_text("\n".join(lines) + "\n")

    report = validate_dataset(tmp_path, FAST)
    assert _has(report, "error", csv_path, "line 3 (stem '000001')", "timestamp 5.0 is not after 10.0")
    assert _has(report, "error", csv_path, "line 4", "'angular_velocity_y' must be a finite number", "'fast'")
    assert _has(report, "error", csv_path, "line 5", "latitude 95.0 is outside [-90, 90]")
    assert _has(report, "error", csv_path, "line 6", "quaternion norm 0.5000")
    assert _has(report, "error", csv_path, "line 7", "latitude and longitude must both be given")
    assert _has(report, "error", csv_path, "line 8", "IMU cells are only partly filled (5 of 6")
    assert _has(report, "error", csv_path, "line 10", "stem '000007' repeats the row at line 9")
    # the files themselves are fine
    assert all(p.path == csv_path for p in report.errors), _found(report, "error")


def test_structure_problems(tmp_path):
    assert not validate_dataset(tmp_path, FAST).ok  # an empty folder is not a dataset
    assert _has(validate_dataset(tmp_path, FAST), "error", tmp_path, "no Run-<N> folders")

    _write(tmp_path, 1, "a", 2)
    orphan = tmp_path / "Run-1" / "b"
    (orphan / "rgb_image").mkdir(parents=True)
    (orphan / "rgb_image" / "000000.png").write_bytes(b"x")  # files, but no metadata.csv
    (tmp_path / "Run-1" / "c").mkdir()  # abandoned empty segment
    (tmp_path / "Run-1" / "Extra").mkdir()
    (tmp_path / "stuff").mkdir()
    no_header = _write(tmp_path, 3, "a", 1)
    (no_header / "metadata.csv").write_text("")
    gone = _write(tmp_path, 4, "a", 2)
    for p in (gone / "depth_image").iterdir():
        p.unlink()
    (gone / "depth_image").rmdir()

    report = validate_dataset(tmp_path, FAST)
    assert _has(report, "error", orphan, "no metadata.csv")
    assert _has(report, "warning", tmp_path / "Run-1" / "c", "empty segment folder")
    assert _has(report, "warning", tmp_path / "Run-1" / "Extra", "not a segment folder")
    assert _has(report, "warning", tmp_path / "stuff", "not a Run-<N> folder")
    assert _has(report, "error", no_header / "metadata.csv", "is empty")
    assert _has(report, "error", gone / "depth_image", "folder is missing; 2 frame(s)")
    assert len(report.errors) == 3, _found(report, "error")

    with pytest.raises(FileNotFoundError, match="does not exist"):
        validate_dataset(tmp_path / "nothing")
    with pytest.raises(ValueError, match="max_depth_m"):
        validate_dataset(tmp_path, ValidateConfig(max_depth_m=-1))


def test_real_dataset_style_header_and_missing_columns(tmp_path):
    seg = tmp_path / "Run-7" / "a"
    (seg / "rgb_image").mkdir(parents=True)
    (seg / "depth_image").mkdir()
    rows = ["Image Name,Timestamp [s],gyro_x,gyro_y,gyro_z,acc_x,acc_y,acc_z,lat,lon"]
    for i in range(3):
        cv2.imwrite(str(seg / "rgb_image" / f"{i}.png"), np.zeros((H, W, 3), np.uint8))
        cv2.imwrite(str(seg / "depth_image" / f"{i}.png"), np.full((H, W), 2000, np.uint16))
        rows.append(f"{i}.png,{i},0,0,0,0,0,9.8,--,--")
    (seg / "metadata.csv").write_text("\n".join(rows) + "\n")
    assert validate_dataset(tmp_path, FAST).problems == []

    # only the file-name column is required: no time and half an IMU are warnings (curate needs time)
    (seg / "metadata.csv").write_text("Image Name,gyro_x\n0.png,0\n")
    report = validate_dataset(tmp_path, FAST)
    assert report.ok, _found(report, "error")
    assert _has(report, "warning", seg / "metadata.csv", "no timestamp column", "--column-alias")
    assert _has(report, "warning", seg / "metadata.csv", "only part of the IMU gyro/accelerometer", "['gyro_x']")
    (seg / "metadata.csv").write_text("Time,gyro_x\n0.0,0\n")
    assert _has(validate_dataset(tmp_path, FAST), "error", seg / "metadata.csv", "no file-name column",
                "--column-alias NAME=COLUMN")


def test_cli_validate_exit_codes_and_json(tmp_path, capsys):
    seg = _write(tmp_path, 1, "a", 3)
    assert dataset_cli(["validate", str(tmp_path), "--quiet", "--workers", "1"]) == 0
    assert "OK: 0 error(s)" in capsys.readouterr().out

    (seg / "rgb_image" / "000099.png").write_bytes(b"stray")
    assert dataset_cli(["validate", str(tmp_path), "--quiet", "--workers", "1"]) == 0
    assert dataset_cli(["validate", str(tmp_path), "--quiet", "--strict", "--workers", "1"]) == 1
    capsys.readouterr()

    (seg / "depth_image" / "000002.png").unlink()
    assert dataset_cli(["validate", str(tmp_path), "--json", "--workers", "1"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and data["errors"] == 1
    assert data["problems"][0]["path"].endswith("depth_image/000002.png")

    assert dataset_cli(["validate", str(tmp_path / "absent")]) == 2
    assert "does not exist" in capsys.readouterr().err
