"""``forest-train blend``: weight-space blends of checkpoints of one network, refused across networks."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from forest_perception.models import cli
from forest_perception.models.blend import blend_checkpoints, check_blend_weights
from forest_perception.models.checkpoints import save_checkpoint
from forest_perception.models.torch_engine import TorchDepthEngine, load_torch_checkpoint
from forest_perception.models.weights import shipped_checkpoint

AE = "autoencoder_160x128"


def _shipped(name: str = AE) -> dict:
    return torch.load(shipped_checkpoint(name), weights_only=True)


def _moved(checkpoint: dict, seed: int) -> dict:
    """The checkpoint with every floating tensor shifted by seeded noise (a stand-in for a fine-tuned copy)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in checkpoint["model_state"].items():
        if value.is_floating_point():
            noise = 0.01 * torch.randn(value.shape, generator=gen, dtype=value.dtype)
            state[key] = value + (noise.abs() if key.endswith("running_var") else noise)
        else:
            state[key] = value + 1
    return {**checkpoint, "model_state": state, "metrics": {"val_absrel": 0.5}, "epoch": 9}


def test_blend_is_the_weighted_mean_of_floating_tensors_and_keeps_the_lead_counters():
    a = _shipped()
    b = _moved(a, 1)
    out = blend_checkpoints([a, b], [0.25, 0.75])
    for key, value in out["model_state"].items():
        if value.is_floating_point():
            want = 0.25 * a["model_state"][key].double() + 0.75 * b["model_state"][key].double()
            assert torch.allclose(value.double(), want, atol=1e-6), key
        else:  # integer counters come from the checkpoint of the largest weight
            assert torch.equal(value, b["model_state"][key]), key
    # the run's own facts are dropped, what rebuilds the network is kept
    assert "metrics" not in out and "epoch" not in out
    assert (out["model_name"], out["input_hw"]) == (a["model_name"], a["input_hw"])


def test_end_points_reproduce_the_checkpoints():
    a, b = _shipped(), _moved(_shipped(), 2)
    for weights, want in (([1.0, 0.0], a), ([0.0, 1.0], b)):
        out = blend_checkpoints([a, b], weights)
        for key, value in out["model_state"].items():
            if value.is_floating_point():
                assert torch.equal(value, want["model_state"][key]), key


@pytest.mark.parametrize(
    ("weights", "message"),
    [([0.5], "1 weight(s) for 2"), ([0.7, 0.7], "sum to 1.4"), ([1.3, -0.3], "weight 1 is 1.3"),
     ([float("nan"), 1.0], "weight 1 is nan")],
)
def test_bad_weights_are_refused_by_name(weights, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_blend_weights(weights, 2)


def test_checkpoints_of_other_networks_or_shapes_are_refused():
    a = _shipped()
    with pytest.raises(ValueError, match="model_name 'multiscale'"):
        blend_checkpoints([a, _shipped("multiscale_160x128")], [0.5, 0.5], names=["a", "b"])
    with pytest.raises(ValueError, match="input_hw"):
        blend_checkpoints([a, {**a, "input_hw": [240, 320]}], [0.5, 0.5])
    with pytest.raises(ValueError, match="input_hw"):  # the shipped 320x240 auto-encoder: the same layers
        blend_checkpoints([a, _shipped("autoencoder_320x240")], [0.5, 0.5])
    with pytest.raises(ValueError, match="not the same network as checkpoint 1: model_kwargs"):
        blend_checkpoints([a, {**a, "model_kwargs": {**a["model_kwargs"], "base_channels": 8}}], [0.5, 0.5])
    other_norm = {**a, "normalisation": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}
    with pytest.raises(ValueError, match="normalisation"):
        blend_checkpoints([a, other_norm], [0.5, 0.5])
    key = next(iter(a["model_state"]))
    cut = {**a, "model_state": {**a["model_state"], key: a["model_state"][key][:1]}}
    with pytest.raises(ValueError, match=f"tensor {key} has shape"):
        blend_checkpoints([a, cut], [0.5, 0.5])


def test_one_network_spelt_two_ways_blends():
    """Constructor defaults left out or spelt out, tuples or lists: the same network, not refused."""
    from forest_perception.models.networks import build_model, full_model_kwargs

    a = _shipped()
    spelt = full_model_kwargs("autoencoder", a["model_kwargs"])
    assert spelt["global_context"] == a["model_kwargs"].get("global_context", 0) and "input_hw" not in spelt
    for other in ({**a, "model_kwargs": spelt}, {**a, "input_hw": tuple(a["input_hw"])}):
        out = blend_checkpoints([a, _moved(other, 4)], [0.5, 0.5])
        assert out["model_state"].keys() == a["model_state"].keys()
    # a default changed is another network, and an argument the network does not take is named
    with pytest.raises(ValueError, match="model_kwargs"):
        blend_checkpoints([a, {**a, "model_kwargs": {**spelt, "global_context": spelt["global_context"] + 8}}],
                          [0.5, 0.5])
    with pytest.raises(ValueError, match="'wings'"):
        blend_checkpoints([a, {**a, "model_kwargs": {**spelt, "wings": 2}}], [0.5, 0.5], names=["a", "b"])
    with pytest.raises(ValueError, match="unknown model name"):
        full_model_kwargs("pointnet", {})
    # the filled-in arguments build the network the checkpoint holds
    build_model("autoencoder", a["input_hw"], **spelt).load_state_dict(a["model_state"])


def test_cli_writes_a_checkpoint_that_runs_and_names_its_sources(tmp_path, capsys):
    moved = save_checkpoint(_moved(_shipped(), 3), tmp_path / "ft.pt")
    out = tmp_path / "blend.pt"
    assert cli.main(["blend", "--checkpoint", AE, str(moved), "--weights", "0.5", "0.5", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    model, meta = load_torch_checkpoint(out)
    sources = meta["blend"]
    assert [s["weight"] for s in sources] == [0.5, 0.5]
    assert sources[0]["shipped"] and sources[0]["file"] == f"{AE}.pt" and len(sources[0]["sha256"]) == 64
    assert sources[0]["source"] == AE  # the name as given, no folder of this machine
    assert meta["command"].startswith("forest-train blend")
    depth = TorchDepthEngine((model, meta), threads=1).predict(np.full((128, 160, 3), 90, np.uint8))
    assert np.isfinite(depth).any()
    json.dumps(sources)  # plain values only, for the model card
    # an existing --out is kept unless --overwrite
    before = out.read_bytes()
    assert cli.main(["blend", "--checkpoint", AE, str(moved), "--weights", "0.5", "0.5", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == before


def test_cli_refuses_mismatched_networks_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "x.pt"
    rc = cli.main(["blend", "--checkpoint", AE, "multiscale_160x128", "--weights", "0.5", "0.5", "--out", str(out)])
    assert rc == 2 and not out.exists()
    assert "not the same network" in capsys.readouterr().err
