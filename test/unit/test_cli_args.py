"""The shared argparse types (forest_perception.cli_args) and every CLI's parser, built without ROS."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from forest_perception import cli_args
from forest_perception.cli_args import UsageError
from forest_perception.collab.flower import cli as fl_cli
from forest_perception.dataset_tools import cli as dataset_cli
from forest_perception.models import cli as train_cli
from forest_perception.models import release
from forest_perception.sim import cli as sim_cli


@pytest.mark.parametrize(
    ("text", "height_width"), [("320x240", (240, 320)), ("160X128", (128, 160)), (" 8x6 ", (6, 8))]
)
def test_image_size_reads_width_x_height(text, height_width):
    assert cli_args.image_size(text) == height_width
    assert cli_args.image_size(cli_args.format_image_size(height_width)) == height_width


@pytest.mark.parametrize("text", ["320", "320x240x3", "320,240", "0x240", "-320x240", "wide x tall", ""])
def test_image_size_names_the_text_and_the_spelling(text):
    with pytest.raises(argparse.ArgumentTypeError, match="WIDTHxHEIGHT") as error:
        cli_args.image_size(text)
    assert repr(text) in str(error.value)


@pytest.mark.parametrize(
    ("kind", "good", "bad"),
    [
        (cli_args.positive_int, {"1": 1, "12": 12}, ["0", "-3", "1.5", "one"]),
        (cli_args.non_negative_int, {"0": 0, "7": 7}, ["-1", "x"]),
        (cli_args.positive_float, {"0.5": 0.5, "3": 3.0}, ["0", "-1", "nan", "inf", "abc"]),
        (cli_args.non_negative_float, {"0": 0.0, "2.5": 2.5}, ["-0.1", "nan"]),
        (cli_args.fraction, {"1": 1.0, "0.1": 0.1}, ["0", "1.5", "nan"]),
    ],
)
def test_numbers(kind, good, bad):
    for text, value in good.items():
        assert kind(text) == value
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError, match=f"got {text!r}"):
            kind(text)


def test_paths(tmp_path):
    folder, file = tmp_path / "d", tmp_path / "f.txt"
    folder.mkdir()
    file.write_text("x")
    assert cli_args.existing_dir(str(folder)) == folder
    assert cli_args.existing_file(str(file)) == file
    assert cli_args.output_dir(str(folder)) == folder and cli_args.output_dir(str(tmp_path / "new")) == tmp_path / "new"
    for kind, text, words in [
        (cli_args.existing_dir, str(tmp_path / "gone"), "does not exist"),
        (cli_args.existing_dir, str(file), "is a file"),
        (cli_args.existing_file, str(folder), "is a folder"),
        (cli_args.existing_file, str(tmp_path / "gone.pt"), "does not exist"),
        (cli_args.output_dir, str(file), "is a file"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError, match=words) as error:
            kind(text)
        assert repr(text) in str(error.value)


def test_outputs_under_a_file_are_refused(tmp_path):
    file = tmp_path / "f.txt"
    file.write_text("x")
    for kind, text in [(cli_args.output_dir, file / "out"), (cli_args.output_dir, file / "a" / "b"),
                       (cli_args.output_file, file / "report.html")]:
        with pytest.raises(argparse.ArgumentTypeError, match="cannot be created: .*f.txt.* is a file") as error:
            kind(str(text))
        assert repr(str(text)) in str(error.value)
    with pytest.raises(argparse.ArgumentTypeError, match="is a folder"):
        cli_args.output_file(str(tmp_path))
    assert cli_args.output_file(str(tmp_path / "new" / "r.html")) == tmp_path / "new" / "r.html"
    assert cli_args.output_dir("relative/new") == Path("relative/new")


def test_float_within():
    unit = cli_args.float_within(0, 1)
    below_one = cli_args.float_within(0, 1, high_open=True)
    assert unit("1") == 1.0 and below_one("0.5") == 0.5
    for kind, text, span in [(unit, "1.5", "[0, 1]"), (below_one, "1", "[0, 1)"), (unit, "nan", "[0, 1]")]:
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(f"a number within {span}, got {text!r}")):
            kind(text)


def test_help_shows_defaults_once():
    parser = cli_args.ArgumentParser(prog="tool", formatter_class=cli_args.DefaultsHelpFormatter)
    parser.add_argument("--rate", type=float, default=2.5, help="Hz")
    parser.add_argument("--size", type=cli_args.image_size, default=(240, 320), help="frames")
    parser.add_argument("--ratio", type=float, default=0.5, help="share (default 0.5)")
    parser.add_argument("--quiet", action="store_true", help="no bar")
    parser.add_argument("--no-augment", dest="augment", action="store_false", help="plain frames")
    parser.add_argument("--name", default=None, help="who")
    text = " ".join(parser.format_help().split())
    assert "Hz (default: 2.5)" in text and "frames (default: 320x240)" in text
    assert "share (default 0.5) " in text and text.count("default") == 3
    assert "no bar" in text and "who" in text and "plain frames" in text


def test_one_line_parser_raises_usage_error():
    parser = cli_args.ArgumentParser(prog="tool")
    parser.add_argument("--size", type=cli_args.image_size)
    with pytest.raises(UsageError, match=r"^tool: error: argument --size: image size must be WIDTHxHEIGHT"):
        parser.parse_args(["--size", "big"])


# ----------------------------------------------------------------------------- one parser per CLI


@pytest.fixture
def dataset_parser():
    return dataset_cli.build_parser()


@pytest.fixture
def train_parser():
    return train_cli.build_parser()


@pytest.fixture
def release_parser():
    return release.build_parser()


@pytest.fixture
def sim_parser():
    return sim_cli.build_parser()


@pytest.fixture
def fl_parser():
    return fl_cli.build_parser()


def test_forest_dataset_synth_image_size(dataset_parser, tmp_path):
    args = dataset_parser.parse_args(["synth", "--out", str(tmp_path), "--image-size", "96x64", "--size", "30"])
    assert args.image_size == (64, 96) and args.size == 30.0
    assert dataset_parser.parse_args(["synth", "--out", str(tmp_path)]).image_size == (240, 320)
    with pytest.raises(UsageError, match="argument --image-size: .*'96'"):
        dataset_parser.parse_args(["synth", "--out", str(tmp_path), "--image-size", "96"])
    with pytest.raises(UsageError, match="--workers: expected a positive integer, got '0'"):
        dataset_parser.parse_args(["curate", str(tmp_path), "--out", str(tmp_path / "o"), "--workers", "0"])
    with pytest.raises(UsageError, match="does not exist"):
        dataset_parser.parse_args(["validate", str(tmp_path / "absent")])


def test_forest_train_image_size(train_parser, tmp_path):
    args = train_parser.parse_args(["train", "--data", str(tmp_path), "--image-size", "160x128"])
    assert args.input_hw == (128, 160) and args.data == [tmp_path]
    # no --image-size: the --init checkpoint's, else 320x240 (TrainOptions.settle)
    assert train_parser.parse_args(["train", "--data", str(tmp_path)]).input_hw is None
    with pytest.raises(UsageError, match="argument --image-size: .*'128 160'"):
        train_parser.parse_args(["train", "--data", str(tmp_path), "--image-size", "128 160"])
    with pytest.raises(UsageError, match="argument --epochs"):
        train_parser.parse_args(["train", "--data", str(tmp_path), "--epochs", "0"])


def test_forest_train_export_image_size(train_parser, tmp_path):
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(b"")
    base = ["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "m.onnx")]
    assert train_parser.parse_args(base).input_hw is None
    assert train_parser.parse_args([*base, "--image-size", "320x240"]).input_hw == (240, 320)
    with pytest.raises(UsageError, match="argument --image-size"):
        train_parser.parse_args([*base, "--image-size", "240", "320"])
    with pytest.raises(UsageError, match="argument --calib: folder .* does not exist"):
        train_parser.parse_args([*base, "--calib", str(tmp_path / "none")])


def test_release_paths(release_parser, tmp_path):
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(b"")
    argv = ["--checkpoint", str(checkpoint), "--name", "multiscale_320x240", "--test", str(tmp_path),
            "--calib", str(tmp_path)]
    assert release_parser.parse_args(argv).out.as_posix() == "models/weights"
    with pytest.raises(UsageError, match="argument --checkpoint: file .*missing.pt.* does not exist"):
        release_parser.parse_args([*argv[:1], str(tmp_path / "missing.pt"), *argv[2:]])


def test_forest_sim_camera_image_size(sim_parser, tmp_path, capsys):
    args = sim_parser.parse_args(["export-gazebo", "--out", str(tmp_path), "--image-size", "640x480"])
    assert args.image_size == (480, 640)
    assert sim_parser.parse_args(["export-gazebo", "--out", str(tmp_path)]).image_size == (240, 320)
    with pytest.raises(UsageError, match="argument --image-size"):
        sim_parser.parse_args(["export-gazebo", "--out", str(tmp_path), "--image-size", "640*480"])


@pytest.mark.parametrize(("command", "default"), [("simulate", (64, 80)), ("deploy", (48, 64))])
def test_forest_fl_image_size(fl_parser, tmp_path, capsys, command, default):
    base = ["simulate", "--out", str(tmp_path)] if command == "simulate" else [
        "deploy", "--certs", str(tmp_path), "--run-dir", str(tmp_path)]
    from forest_perception.collab.flower.cli import data_size

    args = fl_parser.parse_args(base)
    assert args.data_size is None and data_size(args) == default  # no --init: the command's default
    assert fl_parser.parse_args([*base, "--image-size", "64x48"]).data_size == (48, 64)
    with pytest.raises(UsageError, match="argument --image-size: image size must be WIDTHxHEIGHT"):
        fl_parser.parse_args([*base, "--image-size", "48", "64"])
