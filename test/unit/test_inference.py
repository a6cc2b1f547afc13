"""Depth engines (ONNX Runtime and torch), pre/post-processing, image encodings and load errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from forest_perception.inference import (
    ModelLoadError,
    OnnxDepthEngine,
    Preprocessor,
    convert_image_encoding,
    postprocess_depth,
)
from forest_perception.inference import load_engine as load_onnx_engine
from forest_perception.models.export import export_onnx, synthetic_forest_image
from forest_perception.models.networks import build_model
from forest_perception.models.torch_engine import TorchDepthEngine, load_engine

INPUT_HW = (64, 96)
CAMERA_HW = (240, 320)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """An untrained multi-scale net at 64x96 as a checkpoint and as ONNX (legacy exporter: fast)."""
    torch.manual_seed(1)
    model = build_model("multiscale", input_hw=INPUT_HW).eval()
    folder = tmp_path_factory.mktemp("models")
    checkpoint = folder / "multiscale.pt"
    # the trainer's checkpoint layout ("model_state", "normalisation", optimizer state)
    torch.save({"model_name": "multiscale", "model_kwargs": {}, "input_hw": list(INPUT_HW),
                "model_state": model.state_dict(), "optimizer_state": {}, "min_depth": 0.1, "max_depth": 15.0,
                "normalisation": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
                "command": "forest-train train --model multiscale"}, checkpoint)
    onnx_path = export_onnx(checkpoint, folder / "multiscale.onnx", exporter="torchscript")
    return checkpoint, onnx_path


@pytest.fixture
def frame():
    return synthetic_forest_image(*CAMERA_HW, seed=3)


def test_onnx_and_torch_engines_agree(model_files, frame):
    checkpoint, onnx_path = model_files
    onnx_engine, torch_engine = load_engine(onnx_path), load_engine(checkpoint)
    assert onnx_engine.backend == "onnxruntime" and torch_engine.backend == "torch"
    assert onnx_engine.model_version == torch_engine.model_version
    assert onnx_engine.model_version.startswith("multiscale-") and len(onnx_engine.model_version) == 23
    a, b = onnx_engine.predict(frame), torch_engine.predict(frame)
    assert a.shape == b.shape == CAMERA_HW and a.dtype == np.float32
    both = np.isfinite(a) & np.isfinite(b)
    assert both.mean() > 0.99
    assert np.max(np.abs(a[both] - b[both])) < 1e-3
    for engine in (onnx_engine, torch_engine):
        assert engine.input_hw == INPUT_HW and engine.max_depth == 15.0
        assert engine.mean == (0.5, 0.5, 0.5) and engine.std == (0.25, 0.25, 0.25)
        assert 0 < engine.last_latency_ms <= engine.last_total_ms


@pytest.mark.parametrize("camera_hw", [(240, 320), (48, 80), (64, 96), (480, 640)])
def test_output_matches_camera_resolution(model_files, camera_hw):
    engine = load_engine(model_files[1])
    depth = engine.predict(synthetic_forest_image(*camera_hw))
    assert depth.shape == camera_hw


def test_nan_outside_valid_range(model_files, frame):
    # the untrained net predicts ~1.2-1.5 m: a range that cuts through it must NaN the rest
    engine = OnnxDepthEngine(model_files[1], min_depth=0.1, max_depth=1.35)
    depth = engine.predict(frame)
    assert np.isnan(depth).any() and np.isfinite(depth).any()
    assert np.nanmax(depth) <= 1.35 and np.nanmin(depth) >= 0.1


def test_postprocess_depth_rules():
    raw = np.array([[0.05, 0.5], [np.inf, 25.0]], np.float32)
    out = postprocess_depth(raw, (2, 2), 0.1, 20.0)
    assert np.isnan(out[0, 0]) and out[0, 1] == 0.5 and np.isnan(out[1, 0]) and np.isnan(out[1, 1])
    edge = postprocess_depth(np.array([[20.0000019, 0.0999999]], np.float32), (1, 2), 0.1, 20.0)
    assert edge[0].tolist() == pytest.approx([20.0, 0.1])
    up = postprocess_depth(np.ones((4, 6), np.float32), (8, 12), 0.1, 20.0, upsample="nearest")
    assert up.shape == (8, 12)
    with pytest.raises(ValueError, match="upsample"):
        postprocess_depth(np.ones((4, 6), np.float32), (8, 12), 0.1, 20.0, upsample="cubic")


def test_preprocessor_matches_reference_normalisation():
    rgb = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    out = Preprocessor((64, 96))(rgb)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    expected = ((rgb / 255.0 - mean) / std).transpose(2, 0, 1)[None]
    assert out.shape == (1, 3, 64, 96) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-5)
    with pytest.raises(ValueError, match="rgb8"):
        Preprocessor((64, 96))(rgb.astype(np.float32))


def test_torch_engine_from_model_and_meta(frame):
    model = build_model("autoencoder", input_hw=INPUT_HW)
    engine = TorchDepthEngine((model, {"model_name": "autoencoder", "input_hw": list(INPUT_HW)}))
    assert engine.model_version.startswith("autoencoder-") and engine.max_depth == 20.0
    assert engine.predict(frame).shape == CAMERA_HW


def test_encodings_convert():
    rgb = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    assert np.array_equal(convert_image_encoding(rgb, "rgb8"), rgb)
    assert np.array_equal(convert_image_encoding(rgb[:, :, ::-1], "bgr8"), rgb)
    alpha = np.full((4, 5, 1), 7, np.uint8)
    assert np.array_equal(convert_image_encoding(np.concatenate([rgb, alpha], 2), "rgba8"), rgb)
    assert np.array_equal(convert_image_encoding(np.concatenate([rgb[:, :, ::-1], alpha], 2), "bgra8"), rgb)
    mono = rgb[:, :, 0]
    out = convert_image_encoding(mono, "mono8")
    assert out.shape == (4, 5, 3) and all(np.array_equal(out[:, :, c], mono) for c in range(3))
    assert convert_image_encoding(mono[:, :, None], "mono8").shape == (4, 5, 3)


@pytest.mark.parametrize("data, encoding, needle", [
    (np.zeros((4, 5, 3), np.uint8), "yuv422", "yuv422"),
    (np.zeros((4, 5), np.uint16), "16UC1", "16UC1"),
    (np.zeros((4, 5, 3), np.uint8), "rgba8", "rgba8"),
    (np.zeros((4, 5, 3), np.float32), "rgb8", "uint8"),
])
def test_bad_encodings_raise(data, encoding, needle):
    with pytest.raises(ValueError, match=needle):
        convert_image_encoding(data, encoding)


def test_missing_and_corrupt_models_raise(tmp_path):
    missing = tmp_path / "nope.onnx"
    with pytest.raises(ModelLoadError, match="nope.onnx"):
        load_engine(missing)
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelLoadError, match="corrupt.onnx"):
        load_engine(corrupt)
    corrupt_pt = tmp_path / "corrupt.pt"
    corrupt_pt.write_bytes(np.random.default_rng(1).bytes(4096))
    with pytest.raises(ModelLoadError, match="corrupt.pt"):
        load_engine(corrupt_pt)
    with pytest.raises(ModelLoadError, match="suffix"):
        load_engine(tmp_path / "model.tflite")


def test_wrong_input_channels_raise(tmp_path):
    path = tmp_path / "gray.onnx"
    torch.onnx.export(torch.nn.Conv2d(1, 1, 3, padding=1).eval(), (torch.zeros(1, 1, 32, 32),), str(path),
                      dynamo=False, input_names=["image"])
    with pytest.raises(ModelLoadError, match=r"gray\.onnx.*Nx3xHxW"):
        OnnxDepthEngine(path)
    with pytest.raises(ModelLoadError, match="1x3x64x96"):
        TorchDepthEngine((torch.nn.Conv2d(1, 1, 3), {"input_hw": [64, 96]}))


def test_unavailable_gpu_provider_falls_back_to_cpu(model_files, frame):
    import onnxruntime as ort

    if {"TensorrtExecutionProvider", "CUDAExecutionProvider"} & set(ort.get_available_providers()):
        pytest.skip("this ONNX Runtime has a GPU provider")
    with pytest.warns(RuntimeWarning, match="CPUExecutionProvider"):
        engine = load_engine(model_files[1], providers=("TensorrtExecutionProvider", "CUDAExecutionProvider"))
    assert engine.providers == ["CPUExecutionProvider"]
    assert engine.predict(frame).shape == CAMERA_HW


def test_the_rover_runtime_opens_onnx_and_points_checkpoints_to_the_torch_engine(model_files):
    checkpoint, onnx_path = model_files
    assert load_onnx_engine(onnx_path).backend == "onnxruntime"
    with pytest.raises(ModelLoadError, match="PyTorch checkpoint.*models.torch_engine"):
        load_onnx_engine(checkpoint)


def test_rover_runtime_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys, forest_perception.inference, forest_perception.nodes.depth_node; "
            "heavy = [m for m in ('torch', 'open3d', 'pybullet', 'flwr') if m in sys.modules]; "
            "print(','.join(heavy), file=sys.stderr); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, f"imported by the depth node: {result.stderr.strip()}"
