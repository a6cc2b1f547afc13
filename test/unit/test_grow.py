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
    with pytest.raises(ValueError, match="only the multi-scale network can grow"):
        grow_checkpoint(ae, coarse_blocks=1, coarse_squeeze=8, inputs=_inputs())
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
    assert "only the multi-scale network" in capsys.readouterr().err and not bad.exists()
