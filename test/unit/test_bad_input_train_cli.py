"""Every bad input of ``forest-train`` (train, eval, export) and ``models.release``: exit 2, one line naming the
file or flag, no traceback, the inputs unchanged (sha256 of every file) and nothing written to ``--out``.

The commands run in-process (``main(argv)``) on a 2-segment, 2-frame dataset at 64x48 with a tiny network.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from forest_perception.dataset_tools.layout import FrameRecord, ImuSample, SegmentWriter, frame_stem
from forest_perception.models import cli, release
from forest_perception.models.networks import build_model

HEIGHT, WIDTH = 48, 64
SIZE = f"{WIDTH}x{HEIGHT}"
KWARGS = {"base_channels": 4}
TRAIN_PROG, RELEASE_PROG = "forest-train", release.PROG


def _write_dataset(root: Path, segments: int = 2, frames: int = 2) -> None:
    imu = ImuSample(angular_velocity=(0, 0, 0), linear_acceleration=(0, 0, 9.81))
    rng = np.random.default_rng(0)
    for s in range(segments):
        with SegmentWriter(root, run=1, segment="ab"[s]) as writer:
            for i in range(frames):
                rgb = rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)
                depth = rng.uniform(0.5, 8.0, (HEIGHT, WIDTH)).astype(np.float32)
                writer.write_frame(rgb, depth, FrameRecord(stem=frame_stem(i), timestamp=0.1 * (i + 1), imu=imu))


def _checkpoint(model_kwargs: dict = KWARGS) -> dict:
    torch.manual_seed(0)
    model = build_model("autoencoder", input_hw=(HEIGHT, WIDTH), **model_kwargs)
    return {"model_name": "autoencoder", "model_kwargs": dict(model_kwargs), "input_hw": [HEIGHT, WIDTH],
            "model_state": model.state_dict(), "min_depth": 0.1, "max_depth": 10.0, "epoch": 1}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Every input a case may name, in one folder whose files are checksummed around each command."""
    root = tmp_path_factory.mktemp("inputs")
    _write_dataset(root / "data")
    _write_dataset(root / "one_segment", segments=1)
    shutil.copytree(root / "data", root / "bad_data")
    (root / "bad_data/Run-1/a/rgb_image/000001.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "empty").mkdir()
    (root / "not_data").mkdir()
    (root / "not_data/notes.txt").write_text("no dataset here\n")
    (root / "a_file").write_text("a file, not a folder\n")
    torch.save(_checkpoint(), root / "good.pt")
    torch.save(_checkpoint({"base_channels": 8}), root / "wide.pt")
    (root / "empty.pt").write_bytes(b"")
    (root / "random.pt").write_bytes(np.random.default_rng(1).bytes(4096))
    good = (root / "good.pt").read_bytes()
    (root / "truncated.pt").write_bytes(good[: len(good) // 2])
    torch.save(argparse.Namespace(model_name="autoencoder"), root / "pickled_object.pt")
    torch.save([1, 2, 3], root / "list.pt")
    run = root / "run"  # an earlier run: refused unless --resume or --overwrite
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(root / "good.pt", run / "checkpoints/last.pt")
    (run / "log.csv").write_text("epoch,train_loss\n1,0.5\n")
    (run / "command.txt").write_text("forest-train train ...\n")
    fresh = root / "fresh_run_of_another"  # a checkpoint outside --out must not write over the run in --out
    (fresh / "checkpoints").mkdir(parents=True)
    shutil.copy(root / "good.pt", fresh / "checkpoints/last.pt")
    return {p.name.replace(".", "_"): p for p in root.iterdir()} | {"root": root}


def _checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


TRAIN = ["train", "--image-size", SIZE, "--epochs", "1", "--batch-size", "2", "--threads", "1", "--quiet",
         "--model-kwarg", "base_channels=4"]
CASES = [
    # (id, argv with {names} of inputs and {out}, words the message must hold)
    # --- forest-train train
    ("train-data-missing", TRAIN + ["--data", "{root}/nope", "--out", "{out}"], ["--data", "nope", "does not exist"]),
    ("train-data-is-file", TRAIN + ["--data", "{a_file}", "--out", "{out}"], ["--data", "a_file"]),
    ("train-data-empty-folder", TRAIN + ["--data", "{empty}", "--out", "{out}"], ["empty", "Run-"]),
    ("train-data-not-a-dataset", TRAIN + ["--data", "{not_data}", "--out", "{out}"], ["not_data", "Run-"]),
    ("train-corrupt-png", TRAIN + ["--data", "{bad_data}", "--val-fraction", "0", "--out", "{out}"],
     ["000001.png", "epoch 1", "nothing was written"]),
    ("train-roll-too-large", TRAIN + ["--data", "{data}", "--roll-deg", "50", "--out", "{out}"],
     ["--roll-deg", "within [0, 45]", "'50'"]),
    ("train-pitch-too-large", TRAIN + ["--data", "{data}", "--pitch-deg", "25", "--out", "{out}"],
     ["--pitch-deg", "within [0, 20]", "'25'"]),
    ("train-teacher-flip-without-teacher", TRAIN + ["--data", "{data}", "--teacher-flip", "--out", "{out}"],
     ["--teacher-flip", "no --teacher"]),
    ("train-teacher-missing", TRAIN + ["--data", "{data}", "--teacher", "{root}/nope.pt", "--out", "{out}"],
     ["--teacher", "nope.pt", "does not exist"]),
    ("train-teacher-other-size", TRAIN + ["--data", "{data}", "--teacher", "autoencoder_160x128", "--out", "{out}"],
     ["--teacher autoencoder_160x128", "160x128", "64x48", "input size mismatch"]),
    ("train-teacher-weight-zero", TRAIN + ["--data", "{data}", "--teacher", "{good_pt}", "--loss-teacher", "0",
                                           "--out", "{out}"], ["--loss-teacher 0", "--teacher"]),
    ("train-out-is-file", TRAIN + ["--data", "{data}", "--out", "{a_file}"], ["--out", "a_file", "is a file"]),
    ("train-out-under-file", TRAIN + ["--data", "{data}", "--out", "{a_file}/run"], ["--out", "a_file"]),
    ("train-existing-run", TRAIN + ["--data", "{data}", "--out", "{run}"], ["--out", "run", "--resume", "--overwrite"]),
    ("train-existing-run-resume-elsewhere",
     TRAIN + ["--data", "{data}", "--out", "{run}", "--resume", "{fresh_run_of_another}/checkpoints/last.pt"],
     ["--out", "--resume", "another training run"]),
    ("train-resume-without-run", TRAIN + ["--data", "{data}", "--out", "{out}", "--resume"], ["--resume", "last.pt"]),
    ("train-resume-and-overwrite", TRAIN + ["--data", "{data}", "--out", "{run}", "--resume", "--overwrite"],
     ["--overwrite", "--resume"]),
    ("train-resume-missing", TRAIN + ["--data", "{data}", "--out", "{out}", "--resume", "{root}/nope.pt"],
     ["--resume", "nope.pt"]),
    ("train-resume-empty", TRAIN + ["--data", "{data}", "--out", "{out}", "--resume", "{empty_pt}"],
     ["empty.pt", "empty (0 bytes)"]),
    ("train-resume-random", TRAIN + ["--data", "{data}", "--out", "{out}", "--resume", "{random_pt}"],
     ["random.pt", "not a forest-train checkpoint"]),
    ("train-resume-truncated", TRAIN + ["--data", "{data}", "--out", "{out}", "--resume", "{truncated_pt}"],
     ["truncated.pt", "truncated"]),
    ("train-resume-other-size", TRAIN[:2] + ["96x64"] + TRAIN[3:] + ["--data", "{data}", "--out", "{out}",
                                                                     "--resume", "{good_pt}"],
     ["--resume", "good.pt", "--image-size 64x48"]),
    ("train-resume-other-kwargs", TRAIN + ["--data", "{data}", "--out", "{out}", "--resume", "{wide_pt}"],
     ["--resume", "wide.pt", "--model-kwarg"]),
    ("train-one-segment-to-split", TRAIN + ["--data", "{one_segment}", "--out", "{out}"], ["--val-fraction", "--val"]),
    ("train-epochs-0", TRAIN + ["--data", "{data}", "--out", "{out}", "--epochs", "0"], ["--epochs", "'0'"]),
    ("train-lr-negative", TRAIN + ["--data", "{data}", "--out", "{out}", "--lr=-1"], ["--lr", "'-1'"]),
    ("train-size-not-16", TRAIN + ["--data", "{data}", "--out", "{out}", "--image-size", "60x48"],
     ["--image-size", "60x48", "16"]),
    ("train-size-garbage", TRAIN + ["--data", "{data}", "--out", "{out}", "--image-size", "big"],
     ["--image-size", "'big'"]),
    ("train-val-fraction-1", TRAIN + ["--data", "{data}", "--out", "{out}", "--val-fraction", "1"],
     ["--val-fraction", "'1'"]),
    ("train-model-unknown", TRAIN + ["--data", "{data}", "--out", "{out}", "--model", "resnet"], ["--model", "resnet"]),
    ("train-model-kwarg-unknown", TRAIN + ["--data", "{data}", "--out", "{out}", "--model-kwarg", "wings=2"],
     ["--model-kwarg", "wings"]),
    ("train-depth-range", TRAIN + ["--data", "{data}", "--out", "{out}", "--min-depth", "5", "--max-depth", "2"],
     ["--min-depth", "--max-depth"]),
    ("train-device-unknown", TRAIN + ["--data", "{data}", "--out", "{out}", "--device", "tpu"], ["--device", "tpu"]),
    ("train-workers-negative", TRAIN + ["--data", "{data}", "--out", "{out}", "--workers=-2"], ["--workers"]),
    # --- forest-train eval
    ("eval-checkpoint-missing", ["eval", "--checkpoint", "{root}/nope.pt", "--data", "{data}", "--out", "{out}"],
     ["--checkpoint", "nope.pt"]),
    ("eval-checkpoint-empty", ["eval", "--checkpoint", "{empty_pt}", "--data", "{data}", "--out", "{out}"],
     ["empty.pt", "empty (0 bytes)"]),
    ("eval-checkpoint-random", ["eval", "--checkpoint", "{random_pt}", "--data", "{data}", "--out", "{out}"],
     ["random.pt", "not a forest-train checkpoint"]),
    ("eval-checkpoint-truncated", ["eval", "--checkpoint", "{truncated_pt}", "--data", "{data}", "--out", "{out}"],
     ["truncated.pt", "truncated"]),
    ("eval-checkpoint-pickled-object",
     ["eval", "--checkpoint", "{pickled_object_pt}", "--data", "{data}", "--out", "{out}"],
     ["pickled_object.pt", "not a forest-train checkpoint"]),
    ("eval-checkpoint-list", ["eval", "--checkpoint", "{list_pt}", "--data", "{data}", "--out", "{out}"],
     ["list.pt", "not a forest-train checkpoint"]),
    ("eval-checkpoint-is-folder", ["eval", "--checkpoint", "{empty}", "--data", "{data}", "--out", "{out}"],
     ["--checkpoint", "empty"]),
    ("eval-data-not-a-dataset", ["eval", "--checkpoint", "{good_pt}", "--data", "{not_data}", "--out", "{out}"],
     ["not_data", "Run-"]),
    ("eval-corrupt-png", ["eval", "--checkpoint", "{good_pt}", "--data", "{bad_data}", "--out", "{out}", "--quiet"],
     ["000001.png"]),
    ("eval-out-under-file", ["eval", "--checkpoint", "{good_pt}", "--data", "{data}", "--out", "{a_file}/ev"],
     ["--out", "a_file"]),
    ("eval-batch-size-0", ["eval", "--checkpoint", "{good_pt}", "--data", "{data}", "--batch-size", "0"],
     ["--batch-size"]),
    ("eval-device-unknown", ["eval", "--checkpoint", "{good_pt}", "--data", "{data}", "--device", "tpu"],
     ["--device", "tpu"]),
    ("eval-depth-range", ["eval", "--checkpoint", "{good_pt}", "--data", "{data}", "--min-depth", "20"],
     ["--min-depth 20", "--max-depth 10"]),
    # --- forest-train export
    ("export-checkpoint-empty", ["export", "--checkpoint", "{empty_pt}", "--out", "{out}/m.onnx"], ["empty.pt"]),
    ("export-checkpoint-random", ["export", "--checkpoint", "{random_pt}", "--out", "{out}/m.onnx"],
     ["random.pt", "not a forest-train checkpoint"]),
    ("export-checkpoint-truncated", ["export", "--checkpoint", "{truncated_pt}", "--out", "{out}/m.onnx"],
     ["truncated.pt"]),
    ("export-out-not-onnx", ["export", "--checkpoint", "{good_pt}", "--out", "{out}/m.pt"], ["--out", ".onnx"]),
    ("export-out-under-file", ["export", "--checkpoint", "{good_pt}", "--out", "{a_file}/m.onnx"],
     ["--out", "a_file"]),
    ("export-int8-without-calib", ["export", "--checkpoint", "{good_pt}", "--out", "{out}/m.onnx", "--int8"],
     ["--int8", "--calib"]),
    ("export-calib-without-images",
     ["export", "--checkpoint", "{good_pt}", "--out", "{out}/m.onnx", "--int8", "--calib", "{empty}"],
     ["--calib", "empty"]),
    ("export-size-not-16", ["export", "--checkpoint", "{good_pt}", "--out", "{out}/m.onnx", "--image-size", "50x50"],
     ["--image-size", "50x50"]),
    ("export-opset-0", ["export", "--checkpoint", "{good_pt}", "--out", "{out}/m.onnx", "--opset", "0"], ["--opset"]),
    ("subcommand-unknown", ["bogus"], ["invalid choice", "bogus"]),
]
RELEASE = ["--name", f"autoencoder_{SIZE}", "--calib", "{data}"]
RELEASE_CASES = [
    ("release-test-empty", RELEASE + ["--checkpoint", "{good_pt}", "--test", "{empty}", "--out", "{out}"],
     ["--test", "empty"]),
    ("release-test-not-a-dataset", RELEASE + ["--checkpoint", "{good_pt}", "--test", "{not_data}", "--out", "{out}"],
     ["--test", "not_data"]),
    ("release-test-corrupt-png", RELEASE + ["--checkpoint", "{good_pt}", "--test", "{bad_data}", "--out", "{out}"],
     ["--test", "000001.png"]),
    ("release-checkpoint-empty", RELEASE + ["--checkpoint", "{empty_pt}", "--test", "{data}", "--out", "{out}"],
     ["empty.pt"]),
    ("release-checkpoint-random", RELEASE + ["--checkpoint", "{random_pt}", "--test", "{data}", "--out", "{out}"],
     ["random.pt", "not a forest-train checkpoint"]),
    ("release-checkpoint-missing", RELEASE + ["--checkpoint", "{root}/nope.pt", "--test", "{data}", "--out", "{out}"],
     ["--checkpoint", "nope.pt"]),
    ("release-out-under-file", RELEASE + ["--checkpoint", "{good_pt}", "--test", "{data}", "--out", "{a_file}/w"],
     ["--out", "a_file"]),
    ("release-name-swapped-size",
     ["--name", "autoencoder_48x64", "--calib", "{data}", "--checkpoint", "{good_pt}", "--test", "{data}",
      "--out", "{out}"], ["--name", "autoencoder_64x48"]),
    ("release-name-other-model",
     ["--name", f"multiscale_{SIZE}", "--calib", "{data}", "--checkpoint", "{good_pt}", "--test", "{data}",
      "--out", "{out}"], ["--name", "autoencoder"]),
    ("release-name-path",
     ["--name", "../x.onnx", "--calib", "{data}", "--checkpoint", "{good_pt}", "--test", "{data}", "--out", "{out}"],
     ["--name", "../x.onnx"]),
    ("release-calib-without-images",
     ["--name", f"autoencoder_{SIZE}", "--calib", "{empty}", "--checkpoint", "{good_pt}", "--test", "{data}",
      "--out", "{out}"], ["--calib", "empty"]),
    ("release-name-missing", ["--calib", "{data}", "--checkpoint", "{good_pt}", "--test", "{data}", "--out", "{out}"],
     ["--name"]),
    ("release-held-out-style-unknown", RELEASE + ["--checkpoint", "{good_pt}", "--test", "{data}", "--out", "{out}",
                                                  "--styles", "{data}", "--held-out-styles", "boreal"],
     ["--held-out-styles boreal", "not among the --styles"]),
    ("release-absrel-negative", RELEASE + ["--checkpoint", "{good_pt}", "--test", "{data}", "--out", "{out}",
                                           "--max-absrel-increase=-1"], ["--max-absrel-increase"]),
]


def _run(main, prog, argv, needles, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    names = {key: str(value) for key, value in inputs.items()} | {"out": str(out)}
    before = _checksums(inputs["root"])
    status = main([arg.format(**names) for arg in argv])
    printed = capsys.readouterr()
    err = printed.err.strip()
    assert status == 2, err
    assert "Traceback" not in printed.out + printed.err
    assert len(err.splitlines()) == 1 and err.startswith(prog) and ": error: " in err, err
    for needle in needles:
        assert needle.format(**names) in err, (needle, err)
    assert "weights_only" not in err  # torch's advice to unpickle anything is never passed on
    assert _checksums(inputs["root"]) == before, "an input changed"
    assert not out.exists() or not any(out.rglob("*")), f"a failed command wrote {list(out.rglob('*'))}"


@pytest.mark.parametrize(("argv", "needles"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_forest_train_bad_input(argv, needles, inputs, tmp_path, capsys):
    _run(cli.main, TRAIN_PROG, argv, needles, inputs, tmp_path, capsys)


@pytest.mark.parametrize(("argv", "needles"), [case[1:] for case in RELEASE_CASES],
                         ids=[case[0] for case in RELEASE_CASES])
def test_release_bad_input(argv, needles, inputs, tmp_path, capsys):
    _run(release.main, RELEASE_PROG, argv, needles, inputs, tmp_path, capsys)


@pytest.mark.parametrize(("main", "argv", "shown"), [
    (cli.main, ["--help"], ["train", "eval", "export"]),
    (cli.main, ["train", "--help"], ["(default: 320x240)", "(default: runs/depth)", "(default: 20)", "--overwrite"]),
    (cli.main, ["eval", "--help"], ["(default: 8)", "(default: the checkpoint's)"]),
    (cli.main, ["export", "--help"], ["(default: 17)", "(default: dynamo)", "(default: the checkpoint's)"]),
    (release.main, ["--help"], ["(default: models/weights)", "(default: 0.01)", "multiscale_320x240 \\\n"]),
], ids=["forest-train", "train", "eval", "export", "release"])
def test_help_shows_defaults(main, argv, shown, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for needle in shown:
        assert needle in text, needle
    assert "240x320" not in text and "(default: None)" not in text and "(default: False)" not in text
