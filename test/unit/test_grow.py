"""``forest-train grow``: a bigger multi-scale network that predicts what the trained one did, and then trains."""

from __future__ import annotations

import pytest
import torch

from forest_perception.models import cli
from forest_perception.models.checkpoints import save_checkpoint
from forest_perception.models.grow import grow_checkpoint
from forest_perception.models.networks import MultiScaleDepth, build_model
from forest_perception.models.torch_engine import load_torch_checkpoint
from forest_perception.models.weights import shipped_checkpoint

HW = (64, 96)


def _trained_like(seed: int = 0, **kwargs: int) -> dict:
    """A small multi-scale checkpoint with non-trivial weights and BatchNorm statistics (a stand-in for training)."""
    torch.manual_seed(seed)
    model = MultiScaleDepth(input_hw=HW, min_depth=0.1, max_depth=10.0, coarse_hidden=32, **kwargs)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
    return {"model_name": "multiscale", "model_kwargs": {"coarse_hidden": 32, **kwargs}, "input_hw": list(HW),
            "normalisation": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}, "min_depth": 0.1,
            "max_depth": 10.0, "model_state": model.state_dict(), "metrics": {"val_absrel": 0.2}, "epoch": 3}


def _model(checkpoint: dict) -> torch.nn.Module:
    model = build_model("multiscale", checkpoint["input_hw"], **checkpoint["model_kwargs"],
                        min_depth=checkpoint["min_depth"], max_depth=checkpoint["max_depth"])
    model.load_state_dict(checkpoint["model_state"])
    return model.eval()


def _inputs(count: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, 3, *HW, generator=torch.Generator().manual_seed(seed))


def test_grown_network_is_bigger_and_predicts_what_the_source_did():
    source = _trained_like()
    grown = grow_checkpoint(source, coarse_blocks=2, coarse_squeeze=16, inputs=_inputs())
    old, new = _model(source), _model(grown)
    assert sum(p.numel() for p in new.parameters()) > sum(p.numel() for p in old.parameters())
    assert len(new.coarse.features) == len(old.coarse.features) + 2 and new.coarse.fc[1].in_features == 16 * 4 * 6
    fresh = _inputs(4, seed=7)  # frames the BatchNorm statistics were not taken on
    with torch.no_grad():
        assert torch.allclose(new(fresh), old(fresh), atol=1e-4)
    assert grown["grown_from"]["max_abs_diff_m"] < 1e-4
    assert grown["grown_from"]["coarse_blocks"] == [0, 2] and grown["grown_from"]["coarse_squeeze"] == [8, 16]
    assert grown["model_kwargs"] == {"coarse_hidden": 32, "coarse_blocks": 2, "coarse_squeeze": 16}
    assert "metrics" not in grown and "epoch" not in grown  # one run's facts do not describe the grown network
    # the new blocks are close to the identity in train mode too (batch statistics of the same frames; the same
    # dropout masks in both networks)
    new.train()
    old.train()
    with torch.no_grad():
        torch.manual_seed(0)
        grown_depth = new(_inputs())
        torch.manual_seed(0)
        drift = (torch.log(grown_depth) - torch.log(old(_inputs()))).abs().mean()
    assert float(drift) < 1e-3


def test_a_grown_network_grows_again_and_trains():
    once = grow_checkpoint(_trained_like(seed=2), coarse_blocks=1, coarse_squeeze=8, inputs=_inputs())
    twice = grow_checkpoint(once, coarse_blocks=3, coarse_squeeze=12, inputs=_inputs())
    with torch.no_grad():
        assert torch.allclose(_model(twice)(_inputs(3, 5)), _model(once)(_inputs(3, 5)), atol=1e-4)
    model = _model(twice).train()
    before = model.coarse.features[5][0].weight.detach().clone()  # a new block: it must learn
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = torch.log(model(_inputs())).mean()
    loss.backward()
    optimizer.step()
    assert not torch.equal(model.coarse.features[5][0].weight, before)


@pytest.mark.parametrize(("blocks", "squeeze", "message"), [
    (0, 8, "nothing to grow"),
    (1, 4, "only grows"),
])
def test_shrinking_or_no_change_is_refused(blocks, squeeze, message):
    with pytest.raises(ValueError, match=message):
        grow_checkpoint(_trained_like(), coarse_blocks=blocks, coarse_squeeze=squeeze, inputs=_inputs())


def test_other_networks_and_wrong_frames_are_refused():
    ae = torch.load(shipped_checkpoint("autoencoder_160x128"), weights_only=True)
    with pytest.raises(ValueError, match="coarse_blocks and coarse_squeeze are for the multi-scale network"):
        grow_checkpoint(ae, coarse_blocks=1, coarse_squeeze=8, inputs=_inputs())
    with pytest.raises(ValueError, match="global_context is for the auto-encoder"):
        grow_checkpoint(_trained_like(), None, None, _inputs(), global_context=16)
    with pytest.raises(ValueError, match="can grow; this checkpoint is 'dcccl_rover'"):
        grow_checkpoint({**ae, "model_name": "dcccl_rover"}, None, None, _inputs())
    with pytest.raises(ValueError, match="inputs must be Nx3x64x96"):
        grow_checkpoint(_trained_like(), coarse_blocks=1, coarse_squeeze=8, inputs=torch.zeros(2, 3, 32, 32))


def test_default_network_keeps_the_shipped_layout():
    """The new constructor keywords default to the shipped network: its checkpoint loads strictly."""
    shipped = torch.load(shipped_checkpoint("multiscale_160x128"), weights_only=True)
    model = build_model("multiscale", shipped["input_hw"], **shipped["model_kwargs"],
                        min_depth=shipped["min_depth"], max_depth=shipped["max_depth"])
    model.load_state_dict(shipped["model_state"], strict=True)
    with pytest.raises(ValueError, match="coarse blocks must be >= 0"):
        MultiScaleDepth(input_hw=HW, coarse_blocks=-1)


def test_cli_grows_a_checkpoint_from_dataset_frames(tmp_path, capsys):
    from tiny_forest import write_tiny_dataset

    write_tiny_dataset(tmp_path / "data")
    source = save_checkpoint(_trained_like(seed=4), tmp_path / "src.pt")
    out = tmp_path / "grown.pt"
    args = ["grow", "--checkpoint", str(source), "--coarse-blocks", "1", "--coarse-squeeze", "12", "--data",
            str(tmp_path / "data"), "--frames", "4", "--out", str(out)]
    assert cli.main(args) == 0
    assert "differs from" in capsys.readouterr().out
    model, meta = load_torch_checkpoint(out)
    assert meta["model_kwargs"]["coarse_blocks"] == 1 and meta["grown_from"]["frames"] == 4
    assert len(meta["grown_from"]["sha256"]) == 64 and meta["command"].startswith("forest-train grow")
    assert isinstance(model, MultiScaleDepth) and len(model.coarse.features) == 7
    before = out.read_bytes()
    assert cli.main(args) == 2 and "--overwrite" in capsys.readouterr().err and out.read_bytes() == before
    bad = tmp_path / "bad.pt"
    assert cli.main(["grow", "--checkpoint", "autoencoder_160x128", "--coarse-blocks", "1", "--coarse-squeeze", "8",
                     "--data", str(tmp_path / "data"), "--out", str(bad)]) == 2
    assert "are for the multi-scale network" in capsys.readouterr().err and not bad.exists()


def _autoencoder_like(seed: int = 0, **kwargs: int) -> dict:
    """A small auto-encoder checkpoint with non-trivial weights and BatchNorm statistics."""
    torch.manual_seed(seed)
    model = build_model("autoencoder", HW, base_channels=8, min_depth=0.1, max_depth=10.0, **kwargs)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.bias.uniform_(-0.1, 0.1)
    return {"model_name": "autoencoder", "model_kwargs": {"base_channels": 8, **kwargs}, "input_hw": list(HW),
            "normalisation": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}, "min_depth": 0.1,
            "max_depth": 10.0, "model_state": model.state_dict(), "epoch": 2}


def _autoencoder(checkpoint: dict) -> torch.nn.Module:
    model = build_model("autoencoder", checkpoint["input_hw"], **checkpoint["model_kwargs"],
                        min_depth=checkpoint["min_depth"], max_depth=checkpoint["max_depth"])
    model.load_state_dict(checkpoint["model_state"])
    return model.eval()


def test_autoencoder_gains_a_context_block_that_changes_nothing_until_it_trains():
    source = _autoencoder_like()
    grown = grow_checkpoint(source, None, None, _inputs(), global_context=16)
    assert grown["model_kwargs"] == {"base_channels": 8, "global_context": 16}
    assert grown["grown_from"]["global_context"] == [0, 16] and grown["grown_from"]["max_abs_diff_m"] == 0.0
    added = set(grown["model_state"]) - set(source["model_state"])
    assert added == {f"encoder.context.{layer}.{p}" for layer in ("reduce", "expand") for p in ("weight", "bias")}
    old, new = _autoencoder(source), _autoencoder(grown)
    unseen = _inputs(seed=9)
    with torch.no_grad():
        torch.testing.assert_close(new(unseen), old(unseen))
        # the context is the image's: a different frame size gives the same per-frame treatment
        assert new(torch.randn(1, 3, 96, 128)).shape == (1, 1, 96, 128)
    # the block trains: after one step it reads the image and changes the output
    new.train()
    optimizer = torch.optim.SGD(new.parameters(), lr=0.5)
    loss = torch.log(new(_inputs()) / 2.0).pow(2).mean()
    loss.backward()
    optimizer.step()
    assert new.encoder.context.expand.weight.abs().sum() > 0
    new.eval()
    with torch.no_grad():
        assert not torch.allclose(new(unseen), old(unseen))


def test_autoencoder_growth_is_refused_when_there_is_nothing_to_add():
    with pytest.raises(ValueError, match="nothing to grow: give the auto-encoder a context block"):
        grow_checkpoint(_autoencoder_like(), None, None, _inputs())
    with pytest.raises(ValueError, match="already has a context block of 16"):
        grow_checkpoint(_autoencoder_like(global_context=16), None, None, _inputs(), global_context=32)
    with pytest.raises(ValueError, match="global_context must be >= 0"):
        build_model("autoencoder", HW, global_context=-1)
    # a checkpoint from before the keyword (no context block) loads strictly with the default
    plain = _autoencoder_like()
    build_model("autoencoder", HW, base_channels=8).load_state_dict(plain["model_state"])
    # the shipped auto-encoders have the block, and their checkpoints name it
    shipped = torch.load(shipped_checkpoint("autoencoder_160x128"), weights_only=True)
    assert shipped["model_kwargs"]["global_context"] == 64
    build_model("autoencoder", shipped["input_hw"], **shipped["model_kwargs"]).load_state_dict(shipped["model_state"])


def test_grown_autoencoder_exports_and_runs_in_the_rover_engine(tmp_path):
    import numpy as np

    from forest_perception.depth_pipeline import synthetic_forest_image
    from forest_perception.inference import OnnxDepthEngine
    from forest_perception.models.export import export_onnx
    from forest_perception.models.torch_engine import TorchDepthEngine

    source = _autoencoder_like()
    with torch.no_grad():  # an untrained logit layer hardly reads the features: make the depth depend on them
        source["model_state"]["decoder.logit.weight"].mul_(30.0)
    grown = grow_checkpoint(source, None, None, _inputs(), global_context=16)
    with torch.no_grad():  # a trained block: the ONNX graph must carry it
        grown["model_state"]["encoder.context.reduce.bias"].fill_(1.0)
        grown["model_state"]["encoder.context.expand.weight"].normal_(0, 1.0)
    path = save_checkpoint(grown, tmp_path / "grown.pt")
    onnx_path = export_onnx(path, tmp_path / "grown.onnx", exporter="torchscript")
    frame = synthetic_forest_image(120, 160, seed=3)
    onnx_depth = OnnxDepthEngine(onnx_path, threads=1).predict(frame)
    torch_depth = TorchDepthEngine(path, threads=1).predict(frame)
    plain = TorchDepthEngine(save_checkpoint(source, tmp_path / "plain.pt"), threads=1).predict(frame)
    # the block's effect on depth is well above the export's error: the graph computes it
    effect = np.abs(torch_depth - plain).max()
    assert effect > 1e-3 and np.abs(onnx_depth - torch_depth).max() < effect / 100


def test_cli_grows_an_autoencoder(tmp_path, capsys):
    from tiny_forest import write_tiny_dataset

    write_tiny_dataset(tmp_path / "data")
    source = save_checkpoint(_autoencoder_like(seed=5), tmp_path / "src.pt")
    out = tmp_path / "ae.pt"
    assert cli.main(["grow", "--checkpoint", str(source), "--global-context", "32", "--data",
                     str(tmp_path / "data"), "--frames", "3", "--out", str(out)]) == 0
    assert "autoencoder with a context block of 32 channels" in capsys.readouterr().out
    model, meta = load_torch_checkpoint(out)
    assert meta["model_kwargs"]["global_context"] == 32 and meta["grown_from"]["max_abs_diff_m"] == 0.0
    assert meta["grown_from"]["source"] == str(source) and len(meta["grown_from"]["sha256"]) == 64
    bad = tmp_path / "bad.pt"
    # the shipped auto-encoders already have a block: refused by name, nothing written
    for checkpoint in (str(out), "autoencoder_160x128"):
        assert cli.main(["grow", "--checkpoint", checkpoint, "--global-context", "64", "--data",
                         str(tmp_path / "data"), "--out", str(bad)]) == 2
        assert "already has a context block" in capsys.readouterr().err and not bad.exists()


def test_grown_checkpoints_name_their_new_tensors():
    from forest_perception.models.networks.multiscale import COARSE_FIRST_BLOCK

    grown = grow_checkpoint(_trained_like(seed=6), coarse_blocks=1, coarse_squeeze=12, inputs=_inputs())
    new = set(grown["grown_from"]["new_tensors"])
    block = f"coarse.features.{COARSE_FIRST_BLOCK + 1}."
    params = dict(_model(grown).named_parameters())
    assert {n for n in params if n.startswith(block)} <= new and "coarse.fc.1.weight" in new
    squeeze = f"coarse.features.{COARSE_FIRST_BLOCK + 2}."  # the wider squeeze, moved down one place
    assert {n for n in params if n.startswith(squeeze)} <= new
    assert not any(n.startswith(("fine.", "coarse.features.0.")) or n == "coarse.fc.1.bias" for n in new)
    assert new <= set(params)  # parameters only: BatchNorm statistics are not trained by the optimizer
    context = grow_checkpoint(_autoencoder_like(seed=6), None, None, inputs=_inputs(), global_context=8)
    names = context["grown_from"]["new_tensors"]
    assert names and all(n.startswith("encoder.context.") for n in names)
    assert set(names) == {n for n, _ in _autoencoder(context).named_parameters() if n.startswith("encoder.context.")}


def test_old_layers_train_slower_than_grown_ones(tmp_path, capsys):
    from tiny_forest import write_tiny_dataset

    from forest_perception.models.trainer import Trainer, TrainOptions

    write_tiny_dataset(tmp_path / "data", runs=(1, 2), segments=2)
    source = save_checkpoint(_autoencoder_like(seed=8), tmp_path / "src.pt")
    grown_ckpt = grow_checkpoint(torch.load(source, weights_only=True), None, None, inputs=_inputs(),
                                 global_context=8)
    grown = save_checkpoint(grown_ckpt, tmp_path / "grown.pt")

    def options(out: str, **kw: object) -> TrainOptions:
        return TrainOptions(**{"data": [str(tmp_path / "data")], "val_fraction": 0.25, "epochs": 1, "batch_size": 4,
                               "lr": 1e-3, "out": str(tmp_path / out), "seed": 3, "progress": False, "threads": 1,
                               "scheduler": "none", **kw})

    trainer = Trainer(options("run", init=str(grown), old_layers_lr=0.25))
    groups = trainer.optimizer.param_groups
    assert [g["lr"] for g in groups] == pytest.approx([2.5e-4, 1e-3])
    named = {id(p): n for n, p in trainer.model.named_parameters()}
    assert {named[id(p)] for p in groups[1]["params"]} == set(grown_ckpt["grown_from"]["new_tensors"])
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(named)
    trainer.train()
    assert trainer.history[-1]["lr"] == pytest.approx(1e-3)  # the log's lr is --lr's, the grown tensors' rate
    # a resumed run keeps the split without being told again
    resumed = Trainer(options("run", resume=str(tmp_path / "run" / "checkpoints" / "last.pt"), epochs=2))
    assert [g["lr"] for g in resumed.optimizer.param_groups] == pytest.approx([2.5e-4, 1e-3])
    # without the flag: one group at --lr
    assert [g["lr"] for g in Trainer(options("plain", init=str(grown))).optimizer.param_groups] == [1e-3]
    # a network that did not grow has no new layers to favour: refused, by the flag's name
    args = ["train", "--init", str(source), "--data", str(tmp_path / "data"), "--epochs", "1", "--old-layers-lr",
            "0.5", "--out", str(tmp_path / "refused")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "--old-layers-lr 0.5 needs --init of a grown checkpoint" in err and not (tmp_path / "refused").exists()
    assert cli.main([*args[:-4], "--old-layers-lr", "1.5", "--out", str(tmp_path / "refused")]) == 2
    assert "within [0, 1]" in capsys.readouterr().err
