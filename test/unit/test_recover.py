"""``models.recover``: a PyTorch checkpoint rebuilt from an fp32 ONNX file computes what the file does."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from forest_perception.depth_pipeline import synthetic_forest_image
from forest_perception.models import recover
from forest_perception.models.export import export_onnx, set_metadata, write_model_card
from forest_perception.models.networks import build_model
from forest_perception.models.torch_engine import load_torch_checkpoint

HW = (64, 96)
KWARGS = {"coarse_hidden": 32}


def _trained_like(seed: int = 0) -> nn.Module:
    """A small multi-scale network with non-trivial BatchNorm statistics (a stand-in for a trained one)."""
    torch.manual_seed(seed)
    model = build_model("multiscale", HW, **KWARGS)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[nn.Module, object]:
    """The network and its ONNX file (legacy exporter: fast, and its weights are not named by module)."""
    model = _trained_like()
    folder = tmp_path_factory.mktemp("weights")
    path = export_onnx((model, {"model_name": "multiscale", "model_kwargs": KWARGS, "input_hw": list(HW)}),
                       folder / "multiscale_96x64.onnx", exporter="torchscript")
    return model, path


def _frames(count: int, first: int = 0) -> list[np.ndarray]:
    return [synthetic_forest_image(120, 160, seed=first + i) for i in range(count)]


def test_recovered_network_computes_the_onnx_model_and_has_real_batchnorm_statistics(exported):
    source, path = exported
    model, report = recover.recover_network(path, _frames(12))
    assert report["layers"] == sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    assert report["matched_by"] in ("name", "order")
    assert report["batchnorm_layers"] == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) > 0
    check = recover.compare_with_onnx(model, path, _frames(3, first=50), report["onnx_meta"], threads=1)
    assert check["max_abs_diff_m"] < 1e-3 and check["engine_max_abs_diff_m"] < 1e-3
    assert check["engine_valid_agreement"] > 0.999
    inputs = recover.network_inputs(_frames(2, first=80), HW)
    with torch.no_grad():
        np.testing.assert_allclose(model(inputs).numpy(), source(inputs).numpy(), rtol=1e-3, atol=1e-4)
    # the unfolded statistics are those of real inputs, not the identity load_layers leaves behind
    variances = [m.running_var for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert not all(torch.allclose(v, torch.ones_like(v), atol=1e-3) for v in variances)
    # train mode (batch statistics) starts near the exported function
    assert 0.0 < report["train_mode_drift_log"] < 0.5


def test_unfold_batchnorm_keeps_eval_output_and_sets_input_statistics():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
    folded = {"1": np.array([0.1, -0.2, 0.3, 0.0], np.float32)}
    inputs = torch.randn(10, 3, 8, 8) * 2 + 1
    with torch.no_grad():
        expected = model[0](inputs) + torch.from_numpy(folded["1"]).view(1, -1, 1, 1)
    report = recover.unfold_batchnorm(model, folded, inputs, batch_size=3)
    assert report == {"batchnorm_layers": 1, "frames": 10}
    with torch.no_grad():
        conv_out = model[0](inputs).double()
        torch.testing.assert_close(model(inputs), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model[1].running_mean.double(), conv_out.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[1].running_var.double(), conv_out.var(dim=(0, 2, 3), unbiased=False),
                               rtol=1e-4, atol=1e-6)


def test_other_network_or_missing_metadata_is_refused_by_name(exported, tmp_path):
    _, path = exported
    other = tmp_path / "other.onnx"
    other.write_bytes(path.read_bytes())
    set_metadata(other, {"model_name": "autoencoder", "model_kwargs": {}})
    with pytest.raises(recover.RecoveryError, match="another network or another configuration"):
        recover.recover_network(other, _frames(2))
    bare = onnx.load(str(path))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    with pytest.raises(recover.RecoveryError, match="no 'model_name' in its metadata"):
        recover.recover_network(tmp_path / "bare.onnx", _frames(2))


def test_cli_writes_a_checkpoint_that_loads_and_refuses_beyond_tolerance(exported, tmp_path, capsys):
    source, path = exported
    weights = tmp_path / "weights"
    weights.mkdir()
    onnx_path = weights / path.name
    onnx_path.write_bytes(path.read_bytes())
    write_model_card(onnx_path, {"train_command": "forest-train train --data DATA"})
    name = onnx_path.stem
    # a tolerance no float network meets: nothing is written
    assert recover.main(["--weights", str(weights), "--name", name, "--stats-frames", "4", "--check-frames", "1",
                         "--threads", "1", "--tolerance", "1e-30"]) == 1
    assert "nothing was written" in capsys.readouterr().err
    assert not (weights / f"{name}.pt").exists()
    assert recover.main(["--weights", str(weights), "--name", "nope"]) == 2
    assert "no fp32 model nope.onnx" in capsys.readouterr().err
    assert recover.main(["--weights", str(weights), "--name", name, "--stats-frames", "6", "--check-frames", "2",
                         "--threads", "1"]) == 0
    model, meta = load_torch_checkpoint(weights / f"{name}.pt")
    inputs = recover.network_inputs(_frames(2, first=90), HW)
    with torch.no_grad():
        np.testing.assert_allclose(model.eval()(inputs).numpy(), source(inputs).numpy(), rtol=1e-3, atol=1e-4)
    card = json.loads(onnx_path.with_suffix(".json").read_text())
    assert card["checkpoint"]["file"] == f"{name}.pt"
    assert card["checkpoint"]["max_abs_diff_vs_onnx_m"] < 1e-3
    assert card["checkpoint"]["recovered_from"] == onnx_path.name
    saved = torch.load(weights / f"{name}.pt", weights_only=True)
    assert saved["recovered_from"]["command"].startswith("python -m forest_perception.models.recover --weights WEIGHTS")
    assert str(tmp_path) not in json.dumps(saved["recovered_from"]["command"])
