"""Dataset, trainer, evaluation and CLI of models/ on a tiny synthetic dataset (CPU, a few seconds)."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from tiny_forest import FRAMES, write_tiny_dataset

from forest_perception.models import cli
from forest_perception.models.data import (
    ForestDepthDataset,
    augment_pair,
    pitch_pair,
    roll_pair,
    split_segments,
)
from forest_perception.models.evaluate import evaluate
from forest_perception.models.trainer import Trainer, TrainOptions, load_checkpoint

INPUT_HW = (64, 96)  # the networks' input; tiny_forest stores 48x64 frames


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("forest")
    write_tiny_dataset(root, runs=(1, 2), segments=2)
    return root


def _options(root, out, **kw) -> TrainOptions:
    base = dict(model="autoencoder", model_kwargs={"base_channels": 4}, input_hw=INPUT_HW, data=[str(root)],
                val_fraction=0.25, epochs=2, batch_size=4, lr=2e-3, out=str(out), seed=3, progress=False,
                threads=1)
    base.update(kw)
    return TrainOptions(**base)


# --------------------------------------------------------------------------- dataset


def test_dataset_shapes_masks_and_meta(dataset_root):
    ds = ForestDepthDataset(dataset_root, input_hw=INPUT_HW, max_depth=5.0)
    assert len(ds) == 4 * FRAMES
    item = ds[0]
    assert item["image"].shape == (3, *INPUT_HW) and item["image"].dtype == torch.float32
    assert item["depth"].shape == (1, *INPUT_HW) and item["depth"].dtype == torch.float32
    assert item["valid"].shape == (1, *INPUT_HW) and item["valid"].dtype == torch.bool
    assert (item["segment"], item["stem"]) == ("1a", "000000")
    depth, valid = item["depth"][0].numpy(), item["valid"][0].numpy()
    assert np.isfinite(depth).all()
    # NaN rows (top of the stored frame) are 0 and invalid; beyond max_depth is invalid too
    assert (depth[:4] == 0).all() and not valid[:4].any()
    assert valid.any() and (depth[valid] <= 5.0).all() and not valid[depth > 5.0].any()
    # nearest-neighbour resize: every depth value is one of the stored values (no blends with invalid 0)
    stored = ForestDepthDataset(dataset_root, input_hw=INPUT_HW).load(0)[1]
    assert set(np.unique(depth[depth > 0])) <= set(np.unique(stored[np.isfinite(stored)]))


def test_flip_moves_image_and_depth_together():
    rgb = np.random.default_rng(0).random((16, 32, 3), dtype=np.float32)
    depth = np.tile(np.arange(32, dtype=np.float32), (16, 1))
    rng = np.random.default_rng(1)
    out_rgb, out_depth = augment_pair(rgb, depth, rng, flip_p=1.0, photometric=None)
    np.testing.assert_array_equal(out_rgb, rgb[:, ::-1])
    np.testing.assert_array_equal(out_depth, depth[:, ::-1])


def test_roll_turns_image_and_depth_together_and_keeps_depth_values():
    height, width = 31, 41  # odd: the centre is a pixel
    depth = np.full((height, width), 2.0, np.float32)
    depth[15, 30] = 7.0  # a point 10 px right of the centre
    rgb = np.zeros((height, width, 3), np.float32)
    rgb[15, 30] = 1.0
    out_rgb, out_depth = roll_pair(rgb, depth, 90.0)  # counter-clockwise on the image: right of centre goes up
    assert out_depth[5, 20] == 7.0 and out_rgb[5, 20].max() == pytest.approx(1.0)
    assert out_depth[15, 30] == 2.0
    # depth values are moved, never blended or rescaled (depth along the optical axis is unchanged by a roll)
    wide = np.random.default_rng(0).uniform(1, 9, (48, 64)).astype(np.float32)
    _, turned = roll_pair(np.zeros((48, 64, 3), np.float32), wide, 7.0)
    finite = np.isfinite(turned)
    assert 0.8 < finite.mean() < 1.0 and np.isnan(turned[0, 0])  # corners from outside the frame: invalid
    assert set(np.unique(turned[finite])) <= set(np.unique(wide))
    same_rgb, same_depth = roll_pair(rgb, depth, 0.0)
    np.testing.assert_array_equal(same_depth, depth)
    np.testing.assert_allclose(same_rgb, rgb)


def test_dataset_roll_augmentation(dataset_root):
    plain = ForestDepthDataset(dataset_root, input_hw=INPUT_HW, augment=True, seed=5)
    rolled = ForestDepthDataset(dataset_root, input_hw=INPUT_HW, augment=True, seed=5, roll_deg=20.0)
    a, b = plain[3], rolled[3]
    assert not torch.equal(a["depth"], b["depth"])
    # the rolled frame's corners are invalid (outside the frame); its values are the stored ones
    assert not b["valid"][0, 0, 0] and not b["valid"][0, -1, -1]
    assert set(np.unique(b["depth"][b["valid"]].numpy())) <= set(np.unique(a["depth"][a["valid"]].numpy())) | {0.0}
    with pytest.raises(ValueError, match="roll_deg"):
        ForestDepthDataset(dataset_root, input_hw=INPUT_HW, roll_deg=60.0)


def _ground_depth(pitch_deg: float, height: int = 240, width: int = 320, hfov_deg: float = 69.4,
                  camera_height_m: float = 0.2) -> np.ndarray:
    """Depth along the optical axis of flat ground seen by a camera tilted nose-down by ``pitch_deg`` (NaN: sky)."""
    focal = (width / 2) / math.tan(math.radians(hfov_deg) / 2)
    a = math.radians(pitch_deg)
    rows = (np.arange(height) - (height - 1) / 2) / focal
    down = rows * math.cos(a) + math.sin(a)  # how far a pixel's ray (z = 1) drops per unit of optical depth
    depth = np.where(down > 1e-3, camera_height_m / np.maximum(down, 1e-3), np.nan)
    return np.repeat(np.where(depth < 30, depth, np.nan)[:, None], width, axis=1).astype(np.float32)


@pytest.mark.parametrize(("start", "tilt"), [(5.0, 5.0), (5.0, -3.0), (0.0, 8.0), (10.0, -8.0)])
def test_pitch_turns_ground_as_a_tilted_camera_sees_it(start, tilt):
    # flat ground under a camera at 5 deg, tilted 5 deg more, is the ground a camera at 10 deg sees: the horizon
    # moves and every depth along the new optical axis is recomputed, not just shifted
    _, tilted = pitch_pair(np.zeros((240, 320, 3), np.float32), _ground_depth(start), tilt)
    expected = _ground_depth(start + tilt)
    both = np.isfinite(tilted) & np.isfinite(expected)
    assert both.sum() > 0.7 * np.isfinite(expected).sum()  # less the rows that came from outside the frame
    error = np.abs(tilted[both] - expected[both]) / expected[both]
    assert np.median(error) < 0.01 and np.quantile(error, 0.9) < 0.03  # nearest-neighbour rows near the horizon
    before = _ground_depth(start)
    unchanged = both & np.isfinite(before)
    untilted_error = np.abs(before[unchanged] - expected[unchanged]) / expected[unchanged]
    assert np.median(untilted_error) > 5 * np.median(error)  # the ground before the tilt is far off: this can fail


def test_pitch_moves_the_image_and_leaves_new_rows_invalid():
    rgb = np.zeros((240, 320, 3), np.float32)
    rgb[119:121, :] = 1.0  # a bright line through the centre
    depth = np.full((240, 320), 4.0, np.float32)
    out_rgb, out_depth = pitch_pair(rgb, depth, 6.0)  # nose down: what was ahead moves up the image
    line_row = int(np.argmax(out_rgb[:, 160, 0]))
    focal = 160 / math.tan(math.radians(69.4) / 2)
    assert line_row == pytest.approx(119.5 - focal * math.tan(math.radians(6.0)), abs=1.5)
    assert np.isnan(out_depth[-1]).all() and np.isfinite(out_depth[0]).all()  # rows from below the frame: invalid
    same_rgb, same_depth = pitch_pair(rgb, depth, 0.0)
    np.testing.assert_allclose(same_depth, depth)
    np.testing.assert_allclose(same_rgb, rgb)


def test_dataset_pitch_augmentation(dataset_root):
    plain = ForestDepthDataset(dataset_root, input_hw=INPUT_HW, augment=True, seed=5)
    tilted = ForestDepthDataset(dataset_root, input_hw=INPUT_HW, augment=True, seed=5, pitch_deg=10.0)
    a, b = plain[3], tilted[3]
    assert not torch.equal(a["depth"], b["depth"]) and not torch.equal(a["image"], b["image"])
    # the tiny forest's ground reaches the bottom row; a nose-down tilt brings rows from below the frame (invalid)
    assert all(plain[i]["valid"][0, -1].any() for i in range(6))
    assert not all(tilted[i]["valid"][0, -1].any() for i in range(6))
    with pytest.raises(ValueError, match="pitch_deg"):
        ForestDepthDataset(dataset_root, input_hw=INPUT_HW, pitch_deg=30.0)


def test_augmentation_is_deterministic_per_epoch(dataset_root):
    ds = ForestDepthDataset(dataset_root, input_hw=INPUT_HW, augment=True, seed=5)
    first = ds[2]["image"]
    assert torch.equal(first, ds[2]["image"])
    plain = ForestDepthDataset(dataset_root, input_hw=INPUT_HW)[2]["image"]
    draws = []
    for epoch in range(4):
        ds.set_epoch(epoch)
        draws.append(ds[2]["image"])
    assert any(not torch.equal(d, plain) for d in draws)
    assert any(not torch.equal(d, draws[0]) for d in draws[1:])


def test_split_by_segment_and_errors(dataset_root, tmp_path):
    train, val, test = split_segments(dataset_root, val_fraction=0.25, test_fraction=0.25, seed=0)
    ids = [s.segment_id for s in train + val + test]
    assert sorted(ids) == ["1a", "1b", "2a", "2b"] and len(val) == 1 and len(test) == 1
    train_r, val_r, _ = split_segments(dataset_root, val_fraction=0.5, seed=0, by="run")
    assert {s.run for s in train_r}.isdisjoint({s.run for s in val_r})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ForestDepthDataset(tmp_path / "missing")
    with pytest.raises(ValueError, match="no Run-"):
        ForestDepthDataset(tmp_path)
    with pytest.raises(ValueError, match="multiples of 16"):
        ForestDepthDataset(dataset_root, input_hw=(60, 96))


# --------------------------------------------------------------------------- training


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained(dataset_root, tmp_path_factory):
    """One uninterrupted 2-epoch run, shared by the tests that need a trained model."""
    out = tmp_path_factory.mktemp("full")
    trainer = Trainer(_options(dataset_root, out))
    trainer.train()
    return trainer, out


def test_train_two_epochs_writes_everything(trained):
    trainer, out = trained
    history = trainer.history
    assert [r["epoch"] for r in history] == [1, 2]
    assert (out / "checkpoints" / "last.pt").is_file() and (out / "checkpoints" / "best.pt").is_file()
    assert (out / "curves.png").stat().st_size > 1000
    rows = _rows(out / "log.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"train_loss", "val_absrel", "lr", "seconds"} <= set(rows[0])
    model, ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["model_name"] == "autoencoder" and ckpt["input_hw"] == list(INPUT_HW)
    assert ckpt["normalisation"]["mean"] and ckpt["options"]["epochs"] == 2 and "val_absrel" in ckpt["metrics"]
    with torch.no_grad():
        assert model(torch.zeros(1, 3, *INPUT_HW)).shape == (1, 1, *INPUT_HW)


def test_resume_matches_uninterrupted_run(dataset_root, trained, tmp_path):
    full = trained[0]
    Trainer(_options(dataset_root, tmp_path / "part")).train(max_epochs=1)  # as if killed after epoch 1
    resumed = Trainer(_options(dataset_root, tmp_path / "part", resume=str(tmp_path / "part/checkpoints/last.pt")))
    assert resumed.epoch == 1
    resumed.train()
    assert resumed.epoch == 2 and resumed.step == full.step
    assert [r["epoch"] for r in _rows(tmp_path / "part" / "log.csv")] == ["1", "2"]
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name
    assert resumed.scheduler.last_epoch == full.scheduler.last_epoch
    assert resumed.optimizer.param_groups[0]["lr"] == full.optimizer.param_groups[0]["lr"]


def test_resume_with_more_epochs_stretches_cosine(dataset_root, tmp_path):
    Trainer(_options(dataset_root, tmp_path / "r", epochs=1, max_batches=1)).train()
    longer = Trainer(_options(dataset_root, tmp_path / "r", epochs=3, max_batches=1,
                              resume=str(tmp_path / "r/checkpoints/last.pt")))
    lr0 = longer.opts.lr
    assert longer.optimizer.param_groups[0]["lr"] == pytest.approx(lr0 * (1 + np.cos(np.pi / 3)) / 2)
    assert [r["epoch"] for r in longer.train(max_epochs=1)] == [1, 2]


def test_multiscale_trains_both_scales(dataset_root, tmp_path):
    trainer = Trainer(_options(dataset_root, tmp_path / "ms", model="multiscale",
                               model_kwargs={"coarse_hidden": 16, "fine_channels": 8}, epochs=1, max_batches=1))
    row = trainer.train()[-1]
    assert "train_scale0_total" in row and "train_scale1_total" in row


def test_evaluate_prints_table_and_writes_pictures(dataset_root, trained, tmp_path, capsys):
    result = evaluate(trained[1] / "checkpoints/last.pt", dataset_root, out=tmp_path / "eval", num_examples=3,
                      progress=False)
    printed = capsys.readouterr().out
    assert "absrel" in printed.lower()
    assert result["frames"] == 4 * FRAMES and set(result["per_segment"]) == {"1a", "1b", "2a", "2b"}
    assert len(result["examples"]) == 3 and (tmp_path / "eval" / "metrics.json").is_file()
    import cv2

    picture = cv2.imread(result["examples"][0])
    assert picture.shape == (INPUT_HW[0], 4 * INPUT_HW[1], 3)


# --------------------------------------------------------------------------- CLI


def test_cli_train_and_eval(dataset_root, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["train", "--data", str(dataset_root), "--image-size", "96x64", "--epochs", "1", "--batch-size", "4",
            "--max-batches", "1",
            "--model-kwarg", "base_channels=4", "--out", str(out), "--quiet", "--threads", "1"]
    assert cli.main(argv) == 0
    assert "forest-train train --data" in (out / "command.txt").read_text()
    ckpt = torch.load(out / "checkpoints/last.pt", weights_only=True)
    assert ckpt["command"].startswith("forest-train train")
    assert cli.main(["eval", "--checkpoint", str(out / "checkpoints/last.pt"), "--data", str(dataset_root),
                     "--out", str(tmp_path / "ev"), "--quiet"]) == 0
    assert "absrel" in capsys.readouterr().out.lower()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data", "{missing}"], "does not exist"),
        (["--data", "{root}", "--model", "resnet"], "argument --model: invalid choice: 'resnet'"),
        (["--data", "{root}", "--image-size", "96x60"], "multiples of 16"),
        (["--data", "{empty}"], "no Run-"),
        (["--data", "{root}", "--epochs", "0"], "epochs"),
        (["--data", "{root}", "--model-kwarg", "wings=2"], "does not take"),
    ],
)
def test_cli_errors_exit_2_with_one_line(dataset_root, tmp_path, capsys, extra, message):
    (tmp_path / "empty").mkdir()
    names = {"missing": tmp_path / "missing", "root": dataset_root, "empty": tmp_path / "empty"}
    argv = ["train", *(a.format(**names) for a in extra), "--out", str(tmp_path / "o"), "--quiet"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_cli_eval_missing_or_bad_checkpoint_exits_2(dataset_root, tmp_path, capsys):
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "none.pt"), "--data", str(tmp_path)]) == 2
    assert "checkpoint" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "junk.pt"), "--data", str(dataset_root)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not a forest-train checkpoint" in err and len(err.splitlines()) == 1
    assert cli.main(["train", "--data", str(dataset_root), "--resume", str(tmp_path / "junk.pt"),
                     "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "is not a forest-train checkpoint" in capsys.readouterr().err


# --------------------------------------------------------------------------- the run folder


def _sha(folder):
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_cli_run_folder_refused_resumed_overwritten(dataset_root, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--data", str(dataset_root), "--image-size", "96x64", "--batch-size", "4", "--max-batches", "1",
            "--model-kwarg", "base_channels=4", "--out", str(out), "--quiet", "--threads", "1"]
    assert cli.main([*argv, "--epochs", "1"]) == 0
    first = _sha(out)
    assert {"checkpoints/last.pt", "checkpoints/best.pt", "log.csv", "command.txt", "curves.png"} <= set(first)

    # the same command again: refused, naming the folder and both ways on; nothing of the run touched
    capsys.readouterr()
    assert cli.main([*argv, "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--resume" in err and "--overwrite" in err and "Traceback" not in err
    assert _sha(out) == first

    # --resume alone continues the run in --out from its last.pt
    assert cli.main([*argv, "--epochs", "2", "--resume"]) == 0
    assert [r["epoch"] for r in _rows(out / "log.csv")] == ["1", "2"]
    assert len((out / "command.txt").read_text().splitlines()) == 2
    assert torch.load(out / "checkpoints/last.pt", weights_only=True)["epoch"] == 2

    # --overwrite starts afresh in the same folder
    assert cli.main([*argv, "--epochs", "1", "--overwrite"]) == 0
    assert [r["epoch"] for r in _rows(out / "log.csv")] == ["1"]
    assert (out / "command.txt").read_text().count("forest-train train") == 1
    assert torch.load(out / "checkpoints/last.pt", weights_only=True)["epoch"] == 1


def test_overwrite_keeps_the_earlier_run_until_the_first_epoch_is_done(dataset_root, tmp_path):
    out = tmp_path / "run"
    Trainer(_options(dataset_root, out, epochs=1, max_batches=1)).train()
    earlier = _sha(out)
    # refused through the Python API too, before anything is read or written
    with pytest.raises(FileExistsError, match="--overwrite"):
        Trainer(_options(dataset_root, out, epochs=1))
    trainer = Trainer(_options(dataset_root, out, epochs=2, eval_every=2, max_batches=1, overwrite=True))
    assert _sha(out) == earlier  # nothing replaced yet
    trainer.train(max_epochs=1)  # stopped after an epoch without validation: no best.pt of its own yet
    assert not (out / "checkpoints/best.pt").exists(), "the earlier run's best.pt must not pass for this run's"
    assert torch.load(out / "checkpoints/last.pt", weights_only=True)["epoch"] == 1
    assert _sha(out)["checkpoints/last.pt"] != earlier["checkpoints/last.pt"]


def test_corrupt_frame_after_the_first_epoch_keeps_the_run_resumable(dataset_root, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(dataset_root / "Run-2", bad / "Run-2")
    (bad / "Run-2/a/depth_image/000001.png").write_bytes(b"")
    out = tmp_path / "run"
    # the bad frame is only read by the validation of epoch 2
    argv = ["train", "--data", str(dataset_root / "Run-1/a"), str(dataset_root / "Run-1/b"), "--val", str(bad),
            "--image-size", "96x64",
            "--batch-size", "4", "--max-batches", "1", "--epochs", "2", "--eval-every", "2",
            "--model-kwarg", "base_channels=4", "--out", str(out), "--quiet", "--threads", "1"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "000001.png" in err and "epoch 2" in err and "--resume" in err
    assert torch.load(out / "checkpoints/last.pt", weights_only=True)["epoch"] == 1


def test_cli_default_out_is_not_written_over_either(dataset_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    earlier = tmp_path / "runs/depth"
    (earlier / "checkpoints").mkdir(parents=True)
    (earlier / "checkpoints/best.pt").write_bytes(b"the best model of an earlier run")
    assert cli.main(["train", "--data", str(dataset_root), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--out runs/depth already holds a training run (checkpoints/best.pt)" in err and "--resume" in err
    assert (earlier / "checkpoints/best.pt").read_bytes() == b"the best model of an earlier run"


def test_cli_diverged_run_says_what_to_change(dataset_root, tmp_path, monkeypatch, capsys):
    from torch import nn

    from forest_perception.models import trainer as trainer_module

    class NanLoss(nn.Module):
        def forward(self, pred, target, image):
            return pred.mean() * float("nan"), {}

    monkeypatch.setattr(trainer_module, "build_loss", lambda opts: NanLoss())
    out = tmp_path / "run"
    argv = ["train", "--data", str(dataset_root), "--image-size", "96x64", "--batch-size", "4", "--epochs", "1",
            "--model-kwarg", "base_channels=4", "--out", str(out), "--quiet", "--threads", "1"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "loss became nan in epoch 1" in err and "--lr" in err and "nothing was written" in err
    assert not out.exists()
