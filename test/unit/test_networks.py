"""Depth networks: shapes, ranges, size checks, cost counters, overfitting a tiny batch, ONNX export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from forest_perception.inference import DEFAULT_MEAN
from forest_perception.models.losses import DepthLoss
from forest_perception.models.networks import (
    MODEL_NAMES,
    AutoEncoderDepth,
    MultiScaleDepth,
    build_model,
    count_flops,
    count_parameters,
)
from forest_perception.models.transforms import normalise_image

SIZES = [(240, 320), (128, 160)]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: on a loaded 2-core runner, 2 OpenMP threads made training steps 15x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_output_shape_and_range(name, hw):
    torch.manual_seed(0)
    model = build_model(name, hw, min_depth=0.2, max_depth=15.0).eval()
    with torch.no_grad():
        depth = model(torch.randn(2, 3, *hw) * 3)
    assert depth.shape == (2, 1, *hw)
    assert torch.isfinite(depth).all()
    assert float(depth.min()) >= 0.2 - 1e-5 and float(depth.max()) <= 15.0 + 1e-4


def test_multiscale_forward_multi_shapes():
    model = MultiScaleDepth(input_hw=(128, 160)).eval()
    x = torch.randn(1, 3, 128, 160)
    with torch.no_grad():
        coarse, fine = model.forward_multi(x)
        assert coarse.shape == fine.shape == (1, 1, 128, 160)
        torch.testing.assert_close(fine, model(x))


def test_autoencoder_takes_any_valid_size():
    model = AutoEncoderDepth().eval()
    with torch.no_grad():
        for hw in [(64, 96), (128, 160), (240, 320)]:
            assert model(torch.zeros(1, 3, *hw)).shape == (1, 1, *hw)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_bad_input_size_is_a_clear_error(name):
    with pytest.raises(ValueError, match="multiples of 16.*100x130"):
        build_model(name, (100, 130))
    with pytest.raises(ValueError, match="multiples of 16"):
        build_model(name, (0, 320))
    model = build_model(name, (128, 160)).eval()
    with pytest.raises(ValueError, match="multiples of 16|built for input_hw"):
        model(torch.zeros(1, 3, 120, 150))


def test_multiscale_rejects_other_valid_size():
    model = build_model("multiscale", (128, 160)).eval()
    with pytest.raises(ValueError, match="built for input_hw=128x160.*240x320"):
        model(torch.zeros(1, 3, 240, 320))


def test_unknown_model_name_lists_known():
    with pytest.raises(ValueError, match="'resnet'.*autoencoder, multiscale"):
        build_model("resnet")


@pytest.mark.parametrize("hw", SIZES)
def test_costs_autoencoder_lighter_than_multiscale(hw):
    auto, multi = build_model("autoencoder", hw), build_model("multiscale", hw)
    auto_params, multi_params = count_parameters(auto), count_parameters(multi)
    auto_flops, multi_flops = count_flops(auto, hw), count_flops(multi, hw)
    assert 0 < auto_params < multi_params
    assert 0 < auto_flops < multi_flops
    if hw == (240, 320):
        assert auto_flops < 1e9  # the Raspberry Pi 4 budget
        assert multi_params < 5e6


def test_count_flops_by_hand():
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 32 * 32, 5))
    macs = 4 * 32 * 32 * 3 * 9 + 4 * 32 * 32 * 5
    assert count_flops(model, (32, 32)) == 2 * macs


def _tiny_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    rgb = torch.rand(2, 3, 64, 96, generator=generator)
    # depth grows towards the top of the image, like a ground plane, plus a near "trunk" block
    rows = torch.linspace(8.0, 1.0, 64).view(1, 1, 64, 1).expand(2, 1, 64, 96).clone()
    rows[:, :, 10:50, 30:45] = 0.8
    rgb[:, :, 10:50, 30:45] = 0.2
    return normalise_image(rgb), rows


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_overfits_tiny_batch(name):
    torch.manual_seed(0)
    kwargs = {"dropout": 0.0} if name == "multiscale" else {}
    model = build_model(name, (64, 96), **kwargs).train()
    image, target = _tiny_batch()
    criterion = DepthLoss(silog=1.0, smooth=0.0)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss, _ = criterion(model(image), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


def test_normalise_image_numpy_and_torch_agree():
    rgb = np.random.default_rng(0).integers(0, 256, size=(4, 6, 3), dtype=np.uint8)
    from_numpy = normalise_image(rgb)
    from_torch = normalise_image(torch.from_numpy(rgb).permute(2, 0, 1))
    assert from_numpy.shape == (3, 4, 6) and from_numpy.dtype == np.float32
    np.testing.assert_allclose(from_numpy, from_torch.numpy(), atol=1e-6)
    np.testing.assert_allclose(normalise_image(np.full((1, 1, 3), DEFAULT_MEAN, np.float32)), 0.0, atol=1e-6)
    with pytest.raises(ValueError, match="channels last"):
        normalise_image(np.zeros((3, 4, 6), np.uint8))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_onnx_export_matches_onnxruntime(name, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    hw = (64, 96)
    torch.manual_seed(0)
    model = build_model(name, hw).eval()
    x = torch.randn(1, 3, *hw)
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(
        model, (x,), str(path), input_names=["image"], output_names=["depth"], opset_version=17, dynamo=False
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_depth,) = session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        torch_depth = model(x).numpy()
    np.testing.assert_allclose(onnx_depth, torch_depth, rtol=1e-3, atol=1e-5)
