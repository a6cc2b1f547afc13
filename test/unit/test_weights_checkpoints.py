"""The PyTorch checkpoints shipped beside the fp32 ONNX models: cards match them, and they compute the ONNX output."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from forest_perception.depth_pipeline import synthetic_forest_image
from forest_perception.inference import OnnxDepthEngine, Preprocessor
from forest_perception.models.checkpoints import resolve_checkpoint, shipped_checkpoint_names
from forest_perception.models.torch_engine import load_torch_checkpoint
from forest_perception.models.weights import shipped_checkpoint, weights_dir

MODELS = weights_dir()
FP32 = sorted(p.stem for p in MODELS.glob("*.onnx") if not p.stem.endswith("_int8"))
MACHINE_FOLDER = re.compile(r"(^|[\s=:'\"])/(work|tmp|home|root|Users)/")


def test_every_fp32_network_ships_a_checkpoint():
    assert FP32, "no fp32 ONNX model shipped"
    assert shipped_checkpoint_names() == FP32


@pytest.mark.parametrize("name", FP32)
def test_checkpoint_reproduces_shipped_onnx(name):
    import torch

    model, meta = load_torch_checkpoint(shipped_checkpoint(name))
    engine = OnnxDepthEngine(MODELS / f"{name}.onnx", threads=1)
    assert list(meta["input_hw"]) == list(engine.input_hw)
    assert np.allclose(meta["mean"], engine.mean) and np.allclose(meta["std"], engine.std)
    frames = [synthetic_forest_image(480, 640, seed=s) for s in (7, 8)]
    preprocess = Preprocessor(engine.input_hw, engine.mean, engine.std)
    x = np.concatenate([preprocess(f).copy() for f in frames])
    expected = np.concatenate([engine._infer(x[i : i + 1]) for i in range(len(x))])
    with torch.inference_mode():
        got = model(torch.from_numpy(x)).numpy()
    assert got.shape == expected.shape
    assert float(np.abs(got - expected).max()) < 1e-3, "the shipped .pt does not compute its ONNX model"


@pytest.mark.parametrize("name", FP32)
def test_cards_record_the_checkpoint(name):
    pt = MODELS / f"{name}.pt"
    digest = hashlib.sha256(pt.read_bytes()).hexdigest()
    card = json.loads((MODELS / f"{name}.json").read_text())["checkpoint"]
    assert card["file"] == pt.name and card["sha256"] == digest and card["size_bytes"] == pt.stat().st_size
    assert card["max_abs_diff_vs_onnx_m"] < 1e-3
    command = card["made_with"]
    # recovered from an ONNX file, or saved by models.release from a training run
    assert ("python -m forest_perception.models.recover" in command or "forest-train train" in command), command
    assert not MACHINE_FOLDER.search(command)
    assert digest in (MODELS / f"{name}.md").read_text()
    int8_card = MODELS / f"{name}_int8.json"
    if int8_card.is_file():  # the int8 model points to the fp32 checkpoint it came from
        entry = json.loads(int8_card.read_text())["checkpoint"]
        assert entry["file"] == pt.name and entry["sha256"] == digest


@pytest.mark.parametrize("name", FP32)
def test_shipped_files_record_no_machine_folder(name):
    """Cards, ONNX metadata and the checkpoint's training record use placeholders (DATA, RUN), not this machine's
    folders (``models.release --path-alias``)."""
    import torch

    from forest_perception.inference import read_onnx_metadata

    files = sorted(MODELS.glob(f"{name}.*")) + sorted(MODELS.glob(f"{name}_int8.*"))
    texts = {path.name: path.read_text() for path in files if path.suffix in (".json", ".md")}
    for onnx in (p for p in files if p.suffix == ".onnx"):
        texts[onnx.name] = json.dumps(read_onnx_metadata(onnx))
    checkpoint = torch.load(MODELS / f"{name}.pt", map_location="cpu", weights_only=False)
    texts[f"{name}.pt"] = json.dumps({k: v for k, v in checkpoint.items() if not k.endswith("_state")}, default=str)
    for where, text in texts.items():
        assert not MACHINE_FOLDER.search(text), (where, MACHINE_FOLDER.search(text).group(0))


def test_checkpoints_are_package_data():
    setup = (Path(__file__).resolve().parents[2] / "setup.py").read_text()
    package_data = re.search(r"package_data=\{(.*?)\n    \}", setup, re.S)
    assert package_data and '"*.pt"' in package_data.group(1)


def test_shipped_names_resolve_to_checkpoints(tmp_path):
    assert resolve_checkpoint("multiscale_320x240") == shipped_checkpoint("multiscale_320x240")
    assert resolve_checkpoint("multiscale_320x240_int8") == MODELS / "multiscale_320x240.pt"
    with pytest.raises(ValueError, match="int8"):
        resolve_checkpoint("multiscale_320x240_int8", allow_int8=False)
    with pytest.raises(ValueError, match="shipped: autoencoder_160x128"):
        resolve_checkpoint("resnet50")
    with pytest.raises(ValueError, match="does not exist"):
        resolve_checkpoint(str(tmp_path / "none.pt"))
