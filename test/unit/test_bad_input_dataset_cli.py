"""Bad input to ``forest-dataset`` and ``forest-sim``, table by table: exit status 2, one line on stderr naming the
file or the flag, no traceback, and every input file byte for byte as it was (nothing written either).

A new subcommand, or a new kind of bad input, joins ``DATASET_CASES`` / ``SIM_CASES``.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from forest_perception.dataset_tools.cli import build_parser as dataset_parser
from forest_perception.dataset_tools.cli import main as dataset_cli
from forest_perception.dataset_tools.layout import FrameRecord, GpsFix, ImuSample, SegmentWriter, frame_stem
from forest_perception.recorder import BagRecorder
from forest_perception.sim.cli import build_parser as sim_parser
from forest_perception.sim.cli import main as sim_cli

H, W = 24, 32


def _dataset(root: Path, segments: str = "ab", frames: int = 4) -> Path:
    for k, seg in enumerate(segments):
        rng = np.random.default_rng(k)
        with SegmentWriter(root, 1, seg) as writer:
            for i in range(frames):
                writer.write_frame(
                    rng.integers(0, 256, (H, W, 3), dtype=np.uint8),
                    rng.uniform(0.5, 8.0, (H, W)).astype(np.float32),
                    FrameRecord(frame_stem(i), 1.0 + i, ImuSample((0.0, 0.0, 0.1), (0.0, 0.0, 9.8)),
                                GpsFix(50.0 + 1e-4 * k + 1e-5 * i, 8.0)),
                )
    return root


def _bag(path: Path, messages: int = 40) -> Path:
    from forest_perception.recorder import typestore

    store = typestore()
    with BagRecorder(path, min_free_bytes=0) as recorder:
        recorder.add_topic("/rover_0/counter", "std_msgs/msg/String")
        for i in range(messages):
            data = store.serialize_cdr(store.types["std_msgs/msg/String"](data=f"{i:08d}" * 200),
                                       "std_msgs/msg/String")
            recorder.write("/rover_0/counter", data, 1_750_000_000_000_000_000 + i * 1_000_000)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Every input the cases use, built once; no case may change any of it."""
    root = tmp_path_factory.mktemp("inputs")
    good = _dataset(root / "good")
    (root / "a_file.txt").write_text("not a folder\n")
    (root / "not_a_dataset").mkdir()
    (root / "not_a_dataset" / "notes.txt").write_text("holiday photos\n")
    (root / "full_out").mkdir()
    (root / "full_out" / "keep.txt").write_text("earlier work\n")

    binary_csv = shutil.copytree(good, root / "binary_csv")
    (binary_csv / "Run-1" / "a" / "metadata.csv").write_bytes(bytes(range(256)) * 4)
    nul_csv = shutil.copytree(good, root / "nul_csv")
    (nul_csv / "Run-1" / "a" / "metadata.csv").write_bytes(b"stem,timestamp\n000000,1\x00\x00\n")
    no_stem = shutil.copytree(good, root / "no_stem")
    text = (no_stem / "Run-1" / "a" / "metadata.csv").read_text().replace("stem,", "picture,", 1)
    (no_stem / "Run-1" / "a" / "metadata.csv").write_text(text)
    bad_settings = shutil.copytree(good, root / "bad_settings")
    (bad_settings / "forest_dataset.yaml").write_text("depth_scale: [0.1\n")
    binary_settings = shutil.copytree(good, root / "binary_settings")
    (binary_settings / "forest_dataset.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff" * 8)
    eight_bit = shutil.copytree(good, root / "eight_bit")
    for png in eight_bit.rglob("depth_image/*.png"):
        cv2.imwrite(str(png), np.full((H, W), 40, np.uint8))
    no_depth = shutil.copytree(good, root / "no_depth")
    for png in no_depth.rglob("depth_image/*.png"):
        png.unlink()
    split_done = shutil.copytree(good, root / "split_done")
    assert dataset_cli(["split", str(split_done), "--fractions", "0.5,0.5,0"]) == 0
    reported = shutil.copytree(good, root / "reported")
    (reported / "report.html").write_text("<html>an earlier report</html>\n")
    (root / "binary.json").write_bytes(b"\xff\xfe\xfd" * 10)
    (root / "binary.csv").write_bytes(b"\xff\xfe\xfd" * 10)

    bag = _bag(root / "bag")
    mcap = next(bag.glob("*.mcap"))
    data = mcap.read_bytes()
    (root / "truncated.mcap").write_bytes(data[: len(data) // 2])
    cut_bag = shutil.copytree(bag, root / "cut_bag")
    (cut_bag / mcap.name).write_bytes(data[: len(data) // 2])
    garbage_meta = shutil.copytree(bag, root / "garbage_meta")
    (garbage_meta / "metadata.yaml").write_text("rosbag2_bagfile_information: [unclosed\n")
    binary_meta = shutil.copytree(bag, root / "binary_meta")
    (binary_meta / "metadata.yaml").write_bytes(bytes(range(128, 256)))
    (root / "only_garbage_meta").mkdir()
    (root / "only_garbage_meta" / "metadata.yaml").write_text("{{{ not yaml\n")

    assert sim_cli(["export-gazebo", "--out", str(root / "gz"), "--size", "20"]) == 0
    return root


def _snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` by relative path (new or removed files show as well)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# (id, argv with {in} for the inputs folder, words that the one error line must hold)
DATASET_CASES = [
    # info
    ("info-missing", ["info", "{in}/absent"], ["argument root", "absent", "does not exist"]),
    ("info-file", ["info", "{in}/a_file.txt"], ["a_file.txt", "is a file"]),
    ("info-not-a-dataset", ["info", "{in}/not_a_dataset"], ["not_a_dataset", "is not a dataset"]),
    ("info-binary-csv", ["info", "{in}/binary_csv"], ["binary_csv/Run-1/a/metadata.csv", "not a text file"]),
    ("info-nul-csv", ["info", "{in}/nul_csv"], ["nul_csv/Run-1/a/metadata.csv line 2", "must be a number"]),
    ("info-no-stem", ["info", "{in}/no_stem"], ["no_stem/Run-1/a/metadata.csv", "no file-name column",
                                                 "--column-alias"]),
    ("info-garbage-settings", ["info", "{in}/bad_settings"], ["bad_settings/forest_dataset.yaml", "not valid YAML"]),
    ("info-binary-settings", ["info", "{in}/binary_settings"], ["binary_settings/forest_dataset.yaml",
                                                                "not a text file"]),
    ("info-alias-no-equals", ["info", "{in}/good", "--column-alias", "gx"], ["--column-alias", "NAME=COLUMN"]),
    ("info-alias-bad-target", ["info", "{in}/good", "--column-alias", "gx=gyro"], ["--column-alias",
                                                                                   "not a standard column"]),
    # curate
    ("curate-out-under-file", ["curate", "{in}/good", "--out", "{in}/a_file.txt/out"], ["--out", "a_file.txt",
                                                                                          "is a file"]),
    ("curate-out-is-file", ["curate", "{in}/good", "--out", "{in}/a_file.txt"], ["--out", "is a file"]),
    ("curate-out-not-empty", ["curate", "{in}/good", "--out", "{in}/full_out"], ["full_out", "already exists",
                                                                                  "--out"]),
    ("curate-out-inside-source", ["curate", "{in}/good", "--out", "{in}/good/curated"], ["must not be inside"]),
    ("curate-8bit-no-scale", ["curate", "{in}/eight_bit", "--out", "{in}/new"], ["eight_bit/Run-1/a/depth_image",
                                                                                 "8-bit", "--depth-scale",
                                                                                 "eight_bit/forest_dataset.yaml"]),
    ("curate-8bit-no-direction", ["curate", "{in}/eight_bit", "--out", "{in}/new", "--depth-scale", "0.1"],
     ["whether larger values are farther", "--depth-larger"]),
    ("curate-keeps-nothing", ["curate", "{in}/no_depth", "--out", "{in}/new"], ["kept none", "unreadable",
                                                                                "nothing was written"]),
    ("curate-binary-csv", ["curate", "{in}/binary_csv", "--out", "{in}/new"], ["binary_csv/Run-1/a/metadata.csv"]),
    ("curate-not-a-dataset", ["curate", "{in}/not_a_dataset", "--out", "{in}/new"], ["not_a_dataset",
                                                                                     "no Run-<N>"]),
    ("curate-fraction", ["curate", "{in}/good", "--out", "{in}/new", "--fraction", "2"], ["--fraction", "'2'"]),
    ("curate-count", ["curate", "{in}/good", "--out", "{in}/new", "--count", "0"], ["--count", "'0'"]),
    ("curate-blur-ratio", ["curate", "{in}/good", "--out", "{in}/new", "--blur-ratio", "nan"], ["--blur-ratio"]),
    ("curate-depth-scale", ["curate", "{in}/good", "--out", "{in}/new", "--depth-scale", "-1"], ["--depth-scale"]),
    ("curate-depth-larger", ["curate", "{in}/good", "--out", "{in}/new", "--depth-larger", "up"], ["--depth-larger"]),
    ("curate-unknown-flag", ["curate", "{in}/good", "--out", "{in}/new", "--fast"], ["--fast"]),
    # split
    ("split-out-under-file", ["split", "{in}/good", "--out", "{in}/a_file.txt/s"], ["--out", "a_file.txt"]),
    ("split-existing", ["split", "{in}/split_done", "--fractions", "0.5,0.5,0"], ["split_done/splits.json",
                                                                                  "--overwrite"]),
    ("split-fractions", ["split", "{in}/good", "--fractions", "0.5,0.5,0.5"], ["--fractions", "sum to 1"]),
    ("split-too-few-groups", ["split", "{in}/good", "--by", "run", "--out", "{in}/new"], ["--by gps"]),
    ("split-binary-csv", ["split", "{in}/binary_csv", "--out", "{in}/new"], ["binary_csv/Run-1/a/metadata.csv"]),
    # validate (a dataset with problems exits 1 and lists them; these are bad command lines)
    ("validate-missing", ["validate", "{in}/absent"], ["absent", "does not exist"]),
    ("validate-far-fraction", ["validate", "{in}/good", "--max-far-fraction", "2"], ["--max-far-fraction"]),
    ("validate-workers", ["validate", "{in}/good", "--workers", "0"], ["--workers"]),
    # report
    ("report-out-under-file", ["report", "{in}/good", "--out", "{in}/a_file.txt/r.html"], ["--out", "a_file.txt"]),
    ("report-out-is-folder", ["report", "{in}/good", "--out", "{in}/not_a_dataset"], ["--out", "is a folder"]),
    ("report-existing", ["report", "{in}/reported"], ["reported/report.html", "--overwrite"]),
    ("report-binary-splits", ["report", "{in}/good", "--splits", "{in}/binary.json", "--out", "{in}/new.html"],
     ["binary.json", "not a text file"]),
    ("report-binary-curation", ["report", "{in}/good", "--curation", "{in}/binary.csv", "--out", "{in}/new.html"],
     ["binary.csv", "not a text file"]),
    ("report-missing-splits", ["report", "{in}/good", "--splits", "{in}/none.json"], ["--splits", "none.json"]),
    ("report-8bit-no-scale", ["report", "{in}/eight_bit", "--out", "{in}/new.html"], ["8-bit", "--depth-scale"]),
    # synth
    ("synth-out-under-file", ["synth", "--out", "{in}/a_file.txt/s"], ["--out", "a_file.txt"]),
    ("synth-existing-segment", ["synth", "--out", "{in}/good", "--frames", "1", "--segments", "1", "--size", "20"],
     ["good/Run-1/a", "--overwrite"]),
    ("synth-frames", ["synth", "--out", "{in}/new", "--frames", "0"], ["--frames"]),
    ("synth-weather", ["synth", "--out", "{in}/new", "--weather", "tornado"], ["tornado"]),
    ("synth-size", ["synth", "--out", "{in}/new", "--size", "1"], ["--size"]),
    ("synth-style", ["synth", "--out", "{in}/new", "--style", "jungle"], ["--style", "jungle", "hilly_deadwood"]),
    ("synth-style-excluded", ["synth", "--out", "{in}/new", "--style", "old_open", "--exclude-styles", "old_open"],
     ["old_open", "excluded"]),
    ("styles-montage-not-png", ["styles", "--montage", "{in}/m.jpg"], ["--montage", ".png"]),
    ("styles-montage-under-file", ["styles", "--montage", "{in}/a_file.txt/m.png"], ["--montage", "a_file.txt"]),
    ("styles-only", ["styles", "--montage", "{in}/m.png", "--only", "jungle"], ["--only", "jungle"]),
    # extract
    ("extract-truncated-mcap", ["extract", "{in}/truncated.mcap", "--out", "{in}/new"],
     ["truncated.mcap", "is truncated", "forest-dataset repair"]),
    ("extract-truncated-bag", ["extract", "{in}/cut_bag", "--out", "{in}/new"],
     ["cut_bag/bag_0.mcap", "is truncated", "forest-dataset repair"]),
    ("extract-garbage-metadata", ["extract", "{in}/garbage_meta", "--out", "{in}/new"],
     ["garbage_meta/metadata.yaml", "unreadable", "not valid YAML", "forest-dataset repair"]),
    ("extract-binary-metadata", ["extract", "{in}/binary_meta", "--out", "{in}/new"],
     ["binary_meta/metadata.yaml", "not a text file", "forest-dataset repair"]),
    ("extract-no-camera", ["extract", "{in}/bag", "--out", "{in}/new"], ["camera/image_raw", "/rover_0/counter"]),
    ("extract-missing", ["extract", "{in}/absent", "--out", "{in}/new"], ["absent", "does not exist"]),
    ("extract-not-a-bag", ["extract", "{in}/a_file.txt", "--out", "{in}/new"], ["a_file.txt", "not a bag"]),
    ("extract-out-under-file", ["extract", "{in}/bag", "--out", "{in}/a_file.txt/ds"], ["--out", "a_file.txt"]),
    ("extract-every", ["extract", "{in}/bag", "--out", "{in}/new", "--every", "0"], ["--every"]),
    ("extract-slop", ["extract", "{in}/bag", "--out", "{in}/new", "--slop", "-1"], ["--slop"]),
    # repair / bag-info
    ("repair-only-garbage-metadata", ["repair", "{in}/only_garbage_meta"],
     ["only_garbage_meta/metadata.yaml is unreadable", "no .mcap files", "nothing was changed"]),
    ("repair-missing", ["repair", "{in}/absent"], ["absent", "does not exist"]),
    ("repair-not-a-bag", ["repair", "{in}/a_file.txt"], ["a_file.txt", "not a bag"]),
    ("bag-info-binary-metadata", ["bag-info", "{in}/binary_meta"], ["binary_meta/metadata.yaml", "not a text file"]),
    ("bag-info-missing", ["bag-info", "{in}/absent"], ["absent", "does not exist"]),
    # the command line itself
    ("no-command", [], ["required: command"]),
    ("unknown-command", ["shuffle"], ["invalid choice", "shuffle"]),
]

SIM_CASES = [
    ("export-out-under-file", ["export-gazebo", "--out", "{in}/a_file.txt/gz"], ["--out", "a_file.txt"]),
    ("export-earlier-world", ["export-gazebo", "--out", "{in}/gz", "--size", "30"],
     ["gz", "world.sdf", "--overwrite"]),
    ("export-camera-rate", ["export-gazebo", "--out", "{in}/new", "--camera-rate", "0"], ["--camera-rate"]),
    ("export-image-size", ["export-gazebo", "--out", "{in}/new", "--image-size", "640*480"], ["--image-size"]),
    ("export-weather", ["export-gazebo", "--out", "{in}/new", "--weather", "tornado"], ["--weather", "tornado"]),
    ("export-world-value", ["export-gazebo", "--out", "{in}/new", "--conifer-fraction", "2"],
     ["--conifer-fraction"]),
    ("summary-size", ["summary", "--size", "5"], ["--size"]),
    ("summary-not-a-number", ["summary", "--tree-density", "dense"], ["--tree-density", "dense"]),
    ("unknown-command", ["grow"], ["invalid choice", "grow"]),
]


def _run(main, prog: str, argv: list[str], words: list[str], inputs: Path, capsys) -> None:
    argv = [a.replace("{in}", str(inputs)) for a in argv]
    before = _snapshot(inputs)
    status = main(argv)
    captured = capsys.readouterr()
    assert status == 2, (argv, captured)
    err = captured.err
    assert "Traceback" not in err and "Traceback" not in captured.out, err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err  # one line, last (after progress bars)
    line = errors[0]
    build = dataset_parser if prog == "forest-dataset" else sim_parser
    command = argv[0] if argv and argv[0] in _subcommands(build()) else ""
    # argparse names the top-level program for an unknown flag
    assert line.startswith((f"{prog} {command}: error: ", f"{prog}: error: ")), err
    for word in words:
        assert word in line, (word, line)
    for python_name in ("overwrite=", "aliases=", "=True", "_per_ha", "size_m"):
        assert python_name not in line, line
    assert _snapshot(inputs) == before, "a refused command changed or wrote files"


@pytest.mark.parametrize(("argv", "words"), [c[1:] for c in DATASET_CASES], ids=[c[0] for c in DATASET_CASES])
def test_forest_dataset_refuses_bad_input(inputs, capsys, argv, words):
    _run(dataset_cli, "forest-dataset", argv, words, inputs, capsys)


@pytest.mark.parametrize(("argv", "words"), [c[1:] for c in SIM_CASES], ids=[c[0] for c in SIM_CASES])
def test_forest_sim_refuses_bad_input(inputs, capsys, argv, words):
    _run(sim_cli, "forest-sim", argv, words, inputs, capsys)


def _subcommands(parser) -> dict:
    import argparse

    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


@pytest.mark.parametrize(("build", "prog"), [(dataset_parser, "forest-dataset"), (sim_parser, "forest-sim")])
def test_every_subcommand_is_in_the_table(build, prog):
    cases = DATASET_CASES if prog == "forest-dataset" else SIM_CASES
    covered = {c[1][0] for c in cases if c[1]}
    assert set(_subcommands(build())) <= covered, f"add the new {prog} subcommand's bad inputs to the table"


@pytest.mark.parametrize(("build", "prog"), [(dataset_parser, "forest-dataset"), (sim_parser, "forest-sim")])
def test_help_of_every_subcommand_shows_the_defaults(build, prog):
    import argparse

    for name, sub in _subcommands(build()).items():
        sub.format_help()  # formats without error
        for action in sub._actions:
            if not action.option_strings or action.default in (None, False, [], argparse.SUPPRESS):
                continue
            assert "default" in (sub._get_formatter()._expand_help(action) or "").lower(), (prog, name, action.dest)


def test_interrupt_exits_130_without_a_traceback(monkeypatch, capsys, tmp_path):
    import forest_perception.dataset_tools.layout as layout

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(layout, "open_dataset", interrupted)
    _dataset(tmp_path / "ds", "a", 1)
    assert dataset_cli(["info", str(tmp_path / "ds")]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "forest-dataset info: interrupted" and "Traceback" not in err
