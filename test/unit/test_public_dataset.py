"""The public low-viewpoint forest dataset as it may be published: unknown column names, segments without GPS or
encoders (2a-2e without encoders; 3a, 3c without GPS and encoders), depth as 8-bit or 16-bit PNGs.

Each variant goes through load, info, curate, split, validate and the training data loader, with the dataset's
settings from ``forest_dataset.yaml`` or from the command-line flags.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from forest_perception.dataset_tools.cli import main as dataset_cli
from forest_perception.dataset_tools.images import DepthEncoding, DepthScaleError, load_depth
from forest_perception.dataset_tools.layout import load_frame, open_dataset, read_segment
from forest_perception.dataset_tools.settings import SETTINGS_FILE, DatasetSettings, load_settings
from forest_perception.dataset_tools.split import load_splits

H, W = 48, 64
FRAMES = 6
SCALE_8BIT = 0.05  # metres per unit of the 8-bit maps: 255 units = 12.75 m
# 2a-2e: GPS but no encoders; 3a, 3c: neither; 3b: everything
SEGMENTS = {(2, s): ("gps",) for s in "abcde"} | {(3, "a"): (), (3, "b"): ("gps", "encoders"), (3, "c"): ()}
# names nobody told us: IMU as gx.. / qx.. / ax.., a file column and encoders no synonym knows, a column of theirs
HEADER = ["img", "Time (s)", "gx", "gy", "gz", "ax", "ay", "az", "qx", "qy", "qz", "qw"]
ALIASES = {"img": "stem", "EncL": "left_wheel_position", "EncR": "right_wheel_position"}


def _truth(run: int, seg: str, i: int) -> np.ndarray:
    """Depth in metres on the 8-bit grid (so both encodings store it exactly); a hole of invalid pixels."""
    rng = np.random.default_rng([run, ord(seg), i])
    units = rng.integers(10, 200, (H, W)).astype(np.float64)
    units[:4, :4] = 0
    return units * SCALE_8BIT


def _write(root: Path, bits: int) -> Path:
    for (run, seg), has in SEGMENTS.items():
        folder = root / f"Run-{run}" / seg
        (folder / "rgb_image").mkdir(parents=True)
        (folder / "depth_image").mkdir()
        header = HEADER + (["Latitude", "Longitude"] if "gps" in has else []) + (
            ["EncL", "EncR"] if "encoders" in has else []) + ["Temperature"]
        rows = [",".join(header)]
        for i in range(FRAMES):
            name = f"{1583412345 + 10 * run + i}.{ord(seg):06d}"
            rng = np.random.default_rng([run, ord(seg), i, 7])
            cv2.imwrite(str(folder / "rgb_image" / f"{name}.png"), rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
            metres = _truth(run, seg, i)
            raw = np.rint(metres / SCALE_8BIT).astype(np.uint8) if bits == 8 else np.rint(metres * 1000).astype(
                np.uint16)
            cv2.imwrite(str(folder / "depth_image" / f"{name}.png"), raw)
            cells = [f"{name}.png", f"{0.2 * i:.1f}", "0.01", "0.02", "0.03", "0.1", "0.2", "9.8", "0", "0", "0", "1"]
            if "gps" in has:
                cells += [f"{50 + 1e-4 * (10 * run + ord(seg) - 97) + 1e-6 * i:.8f}", "-1.4"]
            if "encoders" in has:
                cells += [f"{0.1 * i}", f"{0.1 * i}"]
            rows.append(",".join(cells + ["12.5"]))
        (folder / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root


def _settings_file(root: Path, bits: int) -> None:
    lines = ["column_aliases:"] + [f"  {k}: {v}" for k, v in ALIASES.items()]
    if bits == 8:
        lines += [f"depth_scale_m_per_unit: {SCALE_8BIT}", "depth_larger_is_farther: true"]
    (root / SETTINGS_FILE).write_text("\n".join(lines) + "\n")


FLAGS_8BIT = ["--depth-scale", str(SCALE_8BIT), "--depth-larger", "farther"]
ALIAS_FLAGS = [arg for k, v in ALIASES.items() for arg in ("--column-alias", f"{k}={v}")]


def _checks_loaded(root: Path) -> None:
    dataset = open_dataset(root)
    assert len(dataset.segments) == 8 and len(dataset) == 8 * FRAMES
    by_id = {s.segment_id: s for s in dataset.segments}
    assert [k for k, s in by_id.items() if s.has_gps] == ["2a", "2b", "2c", "2d", "2e", "3b"]
    assert [k for k, s in by_id.items() if s.has_encoders] == ["3b"]
    assert all(s.has_imu and s.has_timestamps for s in dataset.segments)
    seg = by_id["3c"]
    rgb, depth, record = load_frame(seg, 2)
    truth = _truth(3, "c", 2)
    assert rgb.shape == (H, W, 3) and record.gps is None and record.encoders is None
    assert record.imu.angular_velocity == (0.01, 0.02, 0.03) and record.imu.orientation == (0.0, 0.0, 0.0, 1.0)
    assert record.extras == {"Temperature": 12.5}  # their column, kept
    np.testing.assert_array_equal(np.isnan(depth), truth == 0)
    np.testing.assert_allclose(depth[truth > 0], truth[truth > 0], rtol=1e-6)
    assert by_id["3b"].frames[3].encoders.left_position == pytest.approx(0.3)


@pytest.mark.parametrize("bits", [8, 16])
def test_published_layout_with_a_settings_file_loads_curates_splits_validates_and_trains(tmp_path, capsys, bits):
    root = _write(tmp_path / "public", bits)
    # before the dataset states anything: the file-name column is unknown, and an 8-bit depth has no scale
    assert dataset_cli(["info", str(root)]) == 2
    err = capsys.readouterr().err
    assert "no file-name column" in err and "--column-alias" in err and "Traceback" not in err

    _settings_file(root, bits)
    _checks_loaded(root)
    assert dataset_cli(["info", str(root)]) == 0
    out = capsys.readouterr().out
    assert "img -> stem" in out and "Temperature" in out and f"{bits}-bit grayscale" in out
    assert dataset_cli(["validate", str(root), "--quiet", "--workers", "1", "--strict"]) == 0, capsys.readouterr()

    cur = tmp_path / "curated"
    assert dataset_cli(["curate", str(root), "--out", str(cur), "--quiet", "--workers", "1", "--fraction", "0.5",
                        "--duplicate-distance", "0", "--blur-ratio", "0"]) == 0
    capsys.readouterr()
    stated, given = load_settings(cur), load_settings(root)  # the output is read the way the input was
    assert (stated.depth_scale_m_per_unit, stated.depth_larger_is_farther, dict(stated.column_aliases)) == (
        given.depth_scale_m_per_unit, given.depth_larger_is_farther, dict(given.column_aliases))
    assert len(open_dataset(cur)) == 4 * FRAMES
    assert dataset_cli(["validate", str(cur), "--quiet", "--workers", "1"]) == 0
    assert dataset_cli(["split", str(cur), "--by", "gps", "--cell", "5"]) == 0
    capsys.readouterr()
    splits = load_splits(cur)
    assert sum(len(frames) for part in splits.values() for _, frames in part) == 4 * FRAMES

    from forest_perception.models.data import ForestDepthDataset, split_segments

    train, val, _ = split_segments(root, val_fraction=0.25, seed=1)
    data = ForestDepthDataset(train, input_hw=(48, 64), max_depth=20.0)
    item = data[0]
    segment = data.segments[0]
    truth = _truth(segment.run, segment.name, 0)
    valid = item["valid"][0].numpy()
    np.testing.assert_allclose(item["depth"][0].numpy()[valid], truth[valid], rtol=1e-6)
    assert valid.sum() == (truth > 0.1).sum()


def test_a_training_run_on_the_published_layout_with_8_bit_depth(tmp_path, capsys):
    from forest_perception.models.cli import main as train_cli

    root = _write(tmp_path / "public", 8)
    _settings_file(root, 8)
    argv = ["train", "--data", str(root), "--epochs", "1", "--image-size", "64x48", "--batch-size", "4",
            "--max-batches", "2", "--workers", "0", "--threads", "1", "--quiet", "--model", "autoencoder",
            "--out", str(tmp_path / "run")]
    assert train_cli(argv) == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "checkpoints").is_dir()
    # without the settings the same data is refused before any training, naming the flags and the file
    (root / SETTINGS_FILE).write_text("column_aliases: {img: stem}\n")
    assert train_cli([*argv[:-1], str(tmp_path / "run2")]) == 2
    err = capsys.readouterr().err
    assert "8-bit PNG" in err and "--depth-scale" in err and SETTINGS_FILE in err and "Traceback" not in err


def test_flags_instead_of_a_settings_file(tmp_path, capsys):
    root = _write(tmp_path / "public", 8)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert dataset_cli(["curate", str(root), "--out", str(tmp_path / "c0"), "--quiet", *ALIAS_FLAGS]) == 2
    err = capsys.readouterr().err
    assert err.startswith("forest-dataset curate: error: depth image ") and "8-bit PNG" in err
    assert "--depth-scale METRES_PER_UNIT and --depth-larger farther|nearer" in err
    assert str(root / SETTINGS_FILE) in err and not (tmp_path / "c0").exists()

    cur = tmp_path / "curated"
    assert dataset_cli(["curate", str(root), "--out", str(cur), "--quiet", "--workers", "1", *ALIAS_FLAGS,
                        *FLAGS_8BIT]) == 0
    capsys.readouterr()
    # the curated dataset carries what the flags said: it reads without them
    stated = load_settings(cur)
    assert stated.depth_scale_m_per_unit == SCALE_8BIT and stated.depth_larger_is_farther is True
    assert dict(stated.column_aliases) == ALIASES
    _, depth, _ = load_frame(open_dataset(cur).segments[0], 0)
    assert np.nanmax(depth) <= 255 * SCALE_8BIT
    for command in (["validate", "--quiet", "--workers", "1"], ["split", "--by", "segment"],
                    ["report", "--examples", "1", "--sample", "4"], ["info"]):
        assert dataset_cli([command[0], str(root), *command[1:], *ALIAS_FLAGS, *FLAGS_8BIT]) == 0, command
    capsys.readouterr()
    # the input's images and metadata are untouched (split and report add their own files beside them)
    assert all(p.read_bytes() == data for p, data in before.items())


def test_depth_encodings():
    raw8 = np.array([[0, 1, 100, 255]], np.uint8)
    farther = DepthEncoding(0.04, True).to_metres(raw8)
    np.testing.assert_allclose(farther, [[math.nan, 0.04, 4.0, 10.2]], rtol=1e-6)
    nearer = DepthEncoding(0.04, False).to_metres(raw8)
    np.testing.assert_allclose(nearer, [[math.nan, 10.2, 6.24, 0.04]], rtol=1e-6)
    raw16 = np.array([[0, 1500, 65535]], np.uint16)
    np.testing.assert_allclose(DepthEncoding().to_metres(raw16), [[math.nan, 1.5, 65.535]], rtol=1e-6)
    np.testing.assert_allclose(DepthEncoding(1e-4).to_metres(raw16), [[math.nan, 0.15, 6.5535]], rtol=1e-6)
    grey_as_colour = np.repeat(raw8[..., None], 3, axis=2)  # a grayscale map saved as RGB
    np.testing.assert_allclose(DepthEncoding(0.04, True).to_metres(grey_as_colour), farther)
    with pytest.raises(ValueError, match="channels differ"):
        DepthEncoding(0.04, True).to_metres(np.dstack([raw8, raw8, raw8 // 2]))
    for encoding, missing in ((DepthEncoding(), "its scale nor whether"), (DepthEncoding(0.04), "whether larger"),
                              (DepthEncoding(None, True), "its scale:")):
        with pytest.raises(DepthScaleError, match=missing):
            encoding.to_metres(raw8, "x.png")
    with pytest.raises(ValueError, match="positive number of metres"):
        DepthEncoding(-1.0)


def test_settings_file_errors_name_the_file_and_the_key(tmp_path):
    path = tmp_path / SETTINGS_FILE
    for text, words in [
        ("depth_scale: 0.1\n", "unknown key(s) ['depth_scale']"),
        ("depth_scale_m_per_unit: fast\n", "depth_scale_m_per_unit must be a number"),
        ("depth_scale_m_per_unit: -2\n", "positive number of metres per unit"),
        ("depth_larger_is_farther: maybe\n", "depth_larger_is_farther must be true or false"),
        ("column_aliases: {gx: gyro}\n", "'gyro' is not a standard column"),
        ("column_aliases: [gx]\n", "column_aliases must map"),
        ("- 1\n- 2\n", "must be a YAML mapping"),
        ("depth_scale_m_per_unit: [1,\n", "not valid YAML"),
    ]:
        path.write_text(text)
        with pytest.raises(ValueError, match=r".*".join(map(__import__("re").escape, (str(path), words)))):
            load_settings(tmp_path)
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="is not a text file"):
        load_settings(tmp_path)
    path.write_text("column_aliases: {status: ''}\n")  # a column a synonym would misread, kept plain
    assert load_settings(tmp_path).column_aliases == {"status": ""}
    assert DatasetSettings(0.1).merged(DatasetSettings(None, False, {"a": "stem"})) == DatasetSettings(
        0.1, False, {"a": "stem"})


def test_load_depth_keeps_refusing_8_bit_without_an_encoding(tmp_path):
    path = tmp_path / "d.png"
    cv2.imwrite(str(path), np.full((4, 4), 9, np.uint8))
    with pytest.raises(DepthScaleError, match="--depth-scale"):
        load_depth(path)
    np.testing.assert_allclose(load_depth(path, DepthEncoding(0.5, True)), np.full((4, 4), 4.5))


def test_a_column_a_synonym_misreads_can_be_kept_plain(tmp_path):
    root = _write(tmp_path / "public", 16)
    seg_dir = root / "Run-2" / "a"  # a segment with GPS: 'status' reads as gps_status there
    text = (seg_dir / "metadata.csv").read_text().replace("Temperature", "status").replace("12.5", "OK")
    (seg_dir / "metadata.csv").write_text(text)
    with pytest.raises(ValueError, match=r"line 2: column 'status' \(read as gps_status\) must be a number, "
                                         r"got 'OK'.*--column-alias status="):
        read_segment(seg_dir, aliases={"img": "stem"})
    seg = read_segment(seg_dir, aliases={"img": "stem", "status": ""})
    assert seg.frames[0].extras == {"status": "OK"}


def test_without_a_time_column_every_tool_but_curate_works_and_curate_says_why(tmp_path, capsys):
    root = _write(tmp_path / "public", 16)
    _settings_file(root, 16)
    for csv_path in root.rglob("metadata.csv"):
        lines = [line.split(",") for line in csv_path.read_text().splitlines()]
        csv_path.write_text("\n".join(",".join(cells[:1] + cells[2:]) for cells in lines) + "\n")
    assert not any(s.has_timestamps for s in open_dataset(root).segments)
    from forest_perception.models.data import ForestDepthDataset

    assert len(ForestDepthDataset(root, input_hw=(48, 64))) == 8 * FRAMES
    assert dataset_cli(["split", str(root), "--by", "gps", "--cell", "5", "--out", str(tmp_path / "s")]) == 0
    assert dataset_cli(["validate", str(root), "--quiet", "--workers", "1"]) == 0
    assert "no timestamp column" in capsys.readouterr().out
    assert dataset_cli(["curate", str(root), "--out", str(tmp_path / "c"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "frames without a timestamp" in err and "--column-alias NAME=timestamp" in err
    assert not (tmp_path / "c").exists()
