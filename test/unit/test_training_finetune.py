"""Fine-tuning a shipped network (``forest-train train --init``), the frame cache, augmentation and eval by name."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from tiny_forest import FRAMES, write_tiny_dataset

from forest_perception.models import cli
from forest_perception.models.data import ForestDepthDataset
from forest_perception.models.evaluate import evaluate
from forest_perception.models.networks import encoder_modules
from forest_perception.models.trainer import Trainer, TrainOptions
from forest_perception.models.weights import shipped_checkpoint

AE = "autoencoder_160x128"  # the smallest shipped network: quick on CPU


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    folder = tmp_path_factory.mktemp("forest")
    write_tiny_dataset(folder, runs=(1, 2))
    return folder


def _opts(root, out, **kw) -> TrainOptions:
    base = dict(data=[str(root)], val=[str(root)], epochs=2, batch_size=4, lr=1e-3, out=str(out), seed=1,
                progress=False, threads=1, augment=False, scheduler="none", init=AE)
    base.update(kw)
    return TrainOptions(**base)


def _state(name: str) -> dict:
    return torch.load(shipped_checkpoint(name), weights_only=True)


# --------------------------------------------------------------------------- --init


def test_init_from_shipped_name_starts_at_shipped_metrics_and_improves(root, tmp_path):
    trainer = Trainer(_opts(root, tmp_path / "ft", epochs=3))
    saved = _state(AE)
    assert (trainer.opts.model, tuple(trainer.opts.input_hw)) == ("autoencoder", (128, 160))
    assert (trainer.opts.min_depth, trainer.opts.max_depth) == (saved["min_depth"], saved["max_depth"])
    assert trainer.init["file"] == f"{AE}.pt" and trainer.init["shipped"]
    history = trainer.train()
    # epoch 0: the shipped network as 'forest-train eval' of the shipped name sees it
    shipped = evaluate(shipped_checkpoint(AE), root, progress=False, batch_size=4)["metrics"]
    for key in ("absrel", "rmse", "delta1"):
        assert trainer.start_metrics[f"val_{key}"] == pytest.approx(shipped[key], rel=1e-4, abs=1e-5)
    # fine-tuning on these frames lowers the loss on them
    assert history[-1]["val_loss"] < trainer.start_metrics["val_loss"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    ckpt = torch.load(tmp_path / "ft/checkpoints/last.pt", weights_only=True)
    assert ckpt["init"]["sha256"] == trainer.init["sha256"] and ckpt["start_metrics"]


def test_int8_name_inits_from_its_fp32_checkpoint(root, tmp_path):
    trainer = Trainer(_opts(root, tmp_path / "q", init=f"{AE}_int8", epochs=1))
    assert trainer.init["file"] == f"{AE}.pt"
    for key, value in _state(AE)["model_state"].items():
        assert torch.equal(trainer.model.state_dict()[key], value)


@pytest.mark.parametrize("name", [AE, "multiscale_160x128"])
def test_freeze_encoder_keeps_encoder_bit_identical(root, tmp_path, name):
    trainer = Trainer(_opts(root, tmp_path / "fz", init=name, epochs=1, freeze_encoder=True, val=[], val_fraction=0.0,
                            max_batches=2, augment=True))
    trainer.train()
    saved = _state(name)["model_state"]
    encoder = {id(t) for m in encoder_modules(trainer.model) for t in [*m.parameters(), *m.buffers()]}
    state = trainer.model.state_dict(keep_vars=True)
    changed_outside = False
    for key, tensor in state.items():
        same = torch.equal(tensor.detach(), saved[key])
        if id(tensor) in encoder:
            assert same, f"{key} of the frozen encoder changed"
        elif tensor.dtype.is_floating_point and not same:
            changed_outside = True
    assert changed_outside, "nothing outside the encoder trained"
    assert 0 < trainer.frozen_parameters < sum(p.numel() for p in trainer.model.parameters())


def test_mismatches_with_the_init_checkpoint_are_refused(root, tmp_path):
    with pytest.raises(ValueError, match="holds a 'autoencoder' network, not --model multiscale"):
        Trainer(_opts(root, tmp_path / "a", model="multiscale"))
    with pytest.raises(ValueError, match=r"--image-size 96x64 .*trained at 160x128 \(input shape mismatch\)"):
        Trainer(_opts(root, tmp_path / "b", input_hw=(64, 96)))
    with pytest.raises(ValueError, match=r"is \(16, 3, 3, 3\) in the checkpoint but \(2, 3, 3, 3\) with --model-kwarg"):
        Trainer(_opts(root, tmp_path / "c", model_kwargs={"base_channels": 2}))
    other = _state(AE)
    other["normalisation"] = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    torch.save(other, tmp_path / "other_norm.pt")
    with pytest.raises(ValueError, match=r"normalised with mean \[0.5, 0.5, 0.5\]"):
        Trainer(_opts(root, tmp_path / "d", init=str(tmp_path / "other_norm.pt")))
    with pytest.raises(ValueError, match="neither a checkpoint file nor a shipped model name"):
        Trainer(_opts(root, tmp_path / "e", init="resnet_101"))
    with pytest.raises(ValueError, match="without the optimizer state of a run.*with --init instead"):
        Trainer(_opts(root, tmp_path / "f", init=None, resume=str(shipped_checkpoint(AE))))
    assert not any((tmp_path / name).exists() for name in "abcdef")


def test_cli_fine_tunes_from_shipped_name_and_refuses_broken_checkpoint(root, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--init", AE, "--data", str(root), "--val-fraction", "0.25", "--epochs", "1",
                     "--max-batches", "1", "--batch-size", "2", "--threads", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "epoch 0 (--init autoencoder_160x128, before training)" in printed and "img/s" in printed
    assert torch.load(out / "checkpoints/last.pt", weights_only=True)["input_hw"] == [128, 160]
    (tmp_path / "junk.pt").write_bytes(b"PK\x03\x04 not a zip")
    assert cli.main(["train", "--init", str(tmp_path / "junk.pt"), "--data", str(root), "--out",
                     str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("forest-train train: error:") and "junk.pt" in err and len(err.splitlines()) == 1


# --------------------------------------------------------------------------- data: cache and augmentation


def test_frame_cache_is_built_once_reused_and_matches_decoding(root, tmp_path):
    cache = tmp_path / "cache"
    ds = ForestDepthDataset(root, input_hw=(64, 96), cache=cache)
    assert ds.prepare_cache() == len(ds)
    shards = sorted(p.name for p in cache.iterdir())
    assert len(shards) == 2 * len(ds.segments) and not any(name.startswith(".") for name in shards)
    again = ForestDepthDataset(root, input_hw=(64, 96), cache=cache)
    assert again.prepare_cache() == 0  # reused, nothing decoded again
    plain = ForestDepthDataset(root, input_hw=(64, 96))
    for i in (0, len(ds) - 1):
        cached, decoded = again[i], plain[i]
        assert torch.equal(cached["image"], decoded["image"]) and torch.equal(cached["valid"], decoded["valid"])
        assert float((cached["depth"] - decoded["depth"]).abs().max()) <= 0.0006  # millimetre storage
    # frames are read memory-mapped, a frame at a time: nothing of the data set is held in memory
    maps = next(iter(again.cache._maps.values()))
    assert all(isinstance(m, np.memmap) for m in maps)
    # another input size is another shard; the input folder is never written
    ForestDepthDataset(root, input_hw=(48, 64), cache=cache).prepare_cache()
    assert len(list(cache.iterdir())) == 4 * len(ds.segments)
    assert not any("npy" in p.name for p in root.rglob("*"))


def test_augmentation_changes_only_train_images(root, tmp_path):
    trainer = Trainer(_opts(root, tmp_path / "aug", augment=True, val=[], val_fraction=0.5, epochs=1))
    train, val = trainer.train_dataset, trainer.val_dataset
    assert train.augment and not val.augment
    plain_train = ForestDepthDataset(train.segments, input_hw=(128, 160))
    changed = 0
    for epoch in range(3):
        train.set_epoch(epoch)
        for i in range(len(train)):
            item, plain = train[i], plain_train[i]
            depth_same = torch.equal(item["depth"], plain["depth"])
            assert depth_same or torch.equal(item["depth"], plain["depth"].flip(-1))  # depth: flipped at most
            image = item["image"] if depth_same else item["image"].flip(-1)
            changed += int(not torch.allclose(image, plain["image"], atol=1e-5))
    assert changed > 0
    plain_val = ForestDepthDataset(val.segments, input_hw=(128, 160))
    for i in range(len(val)):
        assert torch.equal(val[i]["image"], plain_val[i]["image"])


# --------------------------------------------------------------------------- evaluation by name


def test_eval_takes_a_shipped_name(root, tmp_path, capsys):
    assert cli.main(["eval", "--model", AE, "--data", str(root), "--out", str(tmp_path / "ev"), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "ev/metrics.json").read_text())
    assert metrics["frames"] == 4 * FRAMES and 0 < metrics["metrics"]["absrel"] < 10
    capsys.readouterr()
    assert cli.main(["eval", "--model", f"{AE}_int8", "--data", str(root)]) == 2
    assert "eval-styles" in capsys.readouterr().err


def test_eval_styles_one_row_per_folder_and_worst(tmp_path, capsys):
    folders = [tmp_path / "style_a", tmp_path / "style_b"]
    write_tiny_dataset(folders[0], runs=(1,), segments=1)
    write_tiny_dataset(folders[1], runs=(3,), segments=1)
    assert cli.main(["eval-styles", "--model", AE, "--data", *map(str, folders), "--out", str(tmp_path / "s"),
                     "--threads", "1", "--quiet"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "s/styles.csv")))
    assert [r["folder"] for r in rows] == ["style_a", "style_b"]
    assert sum(r["worst"] == "True" for r in rows) == 1
    result = json.loads((tmp_path / "s/styles.json").read_text())["models"][0]
    assert result["worst"]["absrel"] == max(r["absrel"] for r in result["rows"])
    for row in result["rows"]:  # a 90 % interval over the folder's segment (one: runs of its frames)
        assert row["segments"] == 1
        assert row["absrel_lo"] <= row["absrel"] <= row["absrel_hi"] and row["absrel_lo"] < row["absrel_hi"]
        assert row["delta1_lo"] <= row["delta1"] <= row["delta1_hi"]
    assert float(rows[0]["absrel_lo"]) == pytest.approx(result["rows"][0]["absrel_lo"])
    assert (tmp_path / "s/styles.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "worst by absrel" in out and "90 % interval over segments" in out


def test_eval_styles_scores_each_folder_with_the_camera_tilted(tmp_path, capsys):
    folders = [tmp_path / "style_a", tmp_path / "style_b"]
    write_tiny_dataset(folders[0], runs=(1,), segments=1)
    write_tiny_dataset(folders[1], runs=(3,), segments=1)
    assert cli.main(["eval-styles", "--model", AE, "--data", *map(str, folders), "--out", str(tmp_path / "s"),
                     "--threads", "1", "--quiet", "--tilt", "-6", "6"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "s/styles.csv")))
    assert [(r["folder"], float(r["tilt_deg"])) for r in rows] == [
        ("style_a", 0.0), ("style_b", 0.0), ("style_a", -6.0), ("style_a", 6.0), ("style_b", -6.0), ("style_b", 6.0)]
    assert [r["worst"] for r in rows[2:]] == ["False"] * 4  # the worst folder is chosen on the frames as recorded
    by = {(r["folder"], float(r["tilt_deg"])): r for r in rows}
    for folder in ("style_a", "style_b"):
        # nose down: the ground at the bottom comes from below the frame and is not scored; the scores move
        assert int(by[folder, 6.0]["valid_pixels"]) < int(by[folder, 0.0]["valid_pixels"])
        assert by[folder, 6.0]["absrel"] != by[folder, 0.0]["absrel"] != by[folder, -6.0]["absrel"]
    result = json.loads((tmp_path / "s/styles.json").read_text())
    assert result["tilts"] == [-6.0, 6.0] and len(result["models"][0]["tilted"]) == 4
    assert (tmp_path / "s/tilt.png").stat().st_size > 0
    assert "style_b tilted +6 deg" in capsys.readouterr().out
    for tilt, message in ((["0"], "--tilt 0: each angle must be non-zero"), (["5", "5"], "an angle is given twice"),
                          (["25"], "within [-20, 20]")):
        assert cli.main(["eval-styles", "--model", AE, "--data", str(folders[0]), "--tilt", *tilt]) == 2
        assert message in capsys.readouterr().err


def test_eval_styles_flip_average_runs_the_model_on_the_mirror_image_too(tmp_path, capsys):
    from forest_perception.depth_pipeline import FlipAveragedEngine
    from forest_perception.models.styles import _frames, evaluate_folder
    from forest_perception.models.torch_engine import load_engine

    folder = tmp_path / "style_a"
    write_tiny_dataset(folder, runs=(1,), segments=1)
    assert cli.main(["eval-styles", "--model", AE, "--data", str(folder), "--out", str(tmp_path / "s"),
                     "--threads", "1", "--quiet", "--flip-average"]) == 0
    result = json.loads((tmp_path / "s/styles.json").read_text())
    assert result["flip_average"] is True and result["models"][0]["model"] == f"{AE} flip-averaged"
    row = result["models"][0]["rows"][0]
    engine = load_engine(shipped_checkpoint(AE).with_suffix(".onnx"), threads=1)
    frames = _frames(folder, None, 0)
    depth_range = (result["min_depth"], result["max_depth"])
    plain = evaluate_folder(engine, frames, *depth_range)
    averaged = evaluate_folder(FlipAveragedEngine(engine), frames, *depth_range)
    assert row["absrel"] == pytest.approx(averaged["absrel"], rel=1e-6) and row["absrel"] != plain["absrel"]
    assert f"{AE} flip-averaged" in capsys.readouterr().out
