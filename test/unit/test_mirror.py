"""Mirror-symmetric coarse FC layers of the multi-scale network (``coarse_mirror``, ``forest-train mirror``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from forest_perception.models import cli
from forest_perception.models.checkpoints import save_checkpoint
from forest_perception.models.mirror import mirror_checkpoint, mirror_symmetric
from forest_perception.models.networks import MultiScaleDepth, build_model

HW = (64, 96)  # coarse map 4 x 6


def _trained_like(seed: int = 0) -> dict:
    """A small multi-scale checkpoint with random (so mirror-asymmetric) FC layers."""
    torch.manual_seed(seed)
    model = MultiScaleDepth(input_hw=HW, min_depth=0.1, max_depth=10.0, coarse_hidden=32)
    with torch.no_grad():
        model.coarse.fc[4].weight.mul_(20.0)  # an untrained last layer hardly moves the depth: make it count
    return {"model_name": "multiscale", "model_kwargs": {"coarse_hidden": 32}, "input_hw": list(HW),
            "normalisation": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}, "min_depth": 0.1,
            "max_depth": 10.0, "model_state": model.state_dict(), "metrics": {"val_absrel": 0.2}, "epoch": 3}


def _model(checkpoint: dict) -> MultiScaleDepth:
    model = build_model("multiscale", checkpoint["input_hw"], **checkpoint["model_kwargs"],
                        min_depth=checkpoint["min_depth"], max_depth=checkpoint["max_depth"])
    model.load_state_dict(checkpoint["model_state"])
    return model.eval()


def _coarse_from_features(model: MultiScaleDepth, features: torch.Tensor) -> torch.Tensor:
    """The coarse logits of ``features`` (the coarse network after its convolutions)."""
    saved = model.coarse.features
    model.coarse.features = torch.nn.Identity()
    try:
        return model.coarse(features)
    finally:
        model.coarse.features = saved


def test_symmetric_fc_layers_are_the_mean_with_their_mirror_image_and_mirror_equivariant():
    source = _model(_trained_like())
    mirrored = mirror_symmetric(source)
    features = torch.rand(3, source.coarse.squeeze, *source.coarse.coarse_hw)
    with torch.no_grad():
        own = _coarse_from_features(source, features)
        from_mirror = torch.flip(_coarse_from_features(source, torch.flip(features, [-1])), [-1])
        assert (own - from_mirror).abs().max() > 0.1  # the source is not mirror-equivariant
        torch.testing.assert_close(_coarse_from_features(mirrored, features), (own + from_mirror) / 2)
        torch.testing.assert_close(_coarse_from_features(mirrored, torch.flip(features, [-1])),
                                   torch.flip(_coarse_from_features(mirrored, features), [-1]))
    assert not source.coarse.mirror  # the source is left as it was
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), mirrored.state_dict().values()))
    with pytest.raises(ValueError, match="coarse_mirror must be true or false"):
        MultiScaleDepth(input_hw=HW, coarse_mirror="yes")


def test_fine_tuning_keeps_the_symmetry():
    model = mirror_symmetric(_model(_trained_like())).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    image, target = torch.randn(4, 3, *HW), torch.rand(4, 1, *HW) * 5 + 0.5
    for _ in range(3):
        optimizer.zero_grad()
        (model(image) - target).abs().mean().backward()
        optimizer.step()
    features = torch.rand(2, model.coarse.squeeze, *model.coarse.coarse_hw)
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(_coarse_from_features(model, torch.flip(features, [-1])),
                                   torch.flip(_coarse_from_features(model, features), [-1]))


def test_the_checkpoint_rebuilds_from_its_kwargs_exports_and_runs_in_the_rover_engine(tmp_path):
    from forest_perception.depth_pipeline import synthetic_forest_image
    from forest_perception.inference import OnnxDepthEngine
    from forest_perception.models.export import export_onnx
    from forest_perception.models.torch_engine import TorchDepthEngine

    source = _trained_like()
    checkpoint = mirror_checkpoint(source)
    assert checkpoint["model_kwargs"] == {"coarse_hidden": 32, "coarse_mirror": True}
    assert checkpoint["mirrored_from"] == {"coarse_mirror": [False, True]}
    image = torch.randn(2, 3, *HW)
    with torch.no_grad():
        torch.testing.assert_close(_model(checkpoint)(image), mirror_symmetric(_model(source))(image))
    path = save_checkpoint(checkpoint, tmp_path / "mirrored.pt")
    onnx_path = export_onnx(path, tmp_path / "mirrored.onnx", exporter="torchscript")
    frame = synthetic_forest_image(HW[0], HW[1], seed=3)
    onnx_depth = OnnxDepthEngine(onnx_path, threads=1).predict(frame)
    torch_depth = TorchDepthEngine(path, threads=1).predict(frame)
    plain = TorchDepthEngine(save_checkpoint(source, tmp_path / "plain.pt"), threads=1).predict(frame)
    effect = np.abs(torch_depth - plain).max()  # the symmetric layers change the depth; the graph carries that
    assert effect > 1e-3 and np.abs(onnx_depth - torch_depth).max() < effect / 100
    # the same weights compute another depth: the version depth_node, releases and ICIIA go by differs
    plain_version = TorchDepthEngine(tmp_path / "plain.pt", threads=1).model_version
    assert OnnxDepthEngine(onnx_path, threads=1).model_version == plain_version + "-mirror"
    assert TorchDepthEngine(path, threads=1).model_version == plain_version + "-mirror"
    with pytest.raises(ValueError, match="mirror-symmetric already"):
        mirror_checkpoint(checkpoint)


def test_cli_mirrors_a_checkpoint_and_refuses_other_networks(tmp_path, capsys):
    source = save_checkpoint(_trained_like(), tmp_path / "source.pt")
    out = tmp_path / "mirrored.pt"
    assert cli.main(["mirror", "--checkpoint", str(source), "--out", str(out)]) == 0
    assert "mirror-symmetric coarse FC layers" in capsys.readouterr().out
    saved = torch.load(out, weights_only=True)
    assert saved["mirrored_from"]["file"].endswith("source.pt") and saved["command"].startswith("forest-train mirror")
    assert saved["model_kwargs"]["coarse_mirror"] is True and saved["init"]["file"].endswith("source.pt")
    assert cli.main(["mirror", "--checkpoint", str(source), "--out", str(out)]) == 2  # no silent overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["mirror", "--checkpoint", "autoencoder_160x128", "--out", str(tmp_path / "ae.pt")]) == 2
    assert "only the multi-scale network" in capsys.readouterr().err
    assert not (tmp_path / "ae.pt").exists()
