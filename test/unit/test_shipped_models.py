"""The depth models shipped in models/: cards match the files, and they see depth in a forest never trained on."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from forest_perception.inference import load_engine
from forest_perception.models.metrics import depth_metrics
from forest_perception.models.weights import weights_dir

MODELS = weights_dir()
SHIPPED = sorted(MODELS.glob("*.onnx"))


def test_both_networks_ship_at_both_sizes():
    names = {p.stem for p in SHIPPED}
    for net in ("autoencoder", "multiscale"):
        for size in ("320x240", "160x128"):
            assert f"{net}_{size}" in names, f"models/{net}_{size}.onnx is missing"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_model_card_matches_file(path):
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert card["size_bytes"] == path.stat().st_size
    # the training run, after the grow step that made its starting network when there was one
    assert card["train_command"].startswith(("forest-train train", "forest-train grow"))
    assert "forest-train train" in card["train_command"]
    assert "forest-dataset synth" in card["data_command"]
    assert 0 < card["metrics"]["absrel"] < 0.2 and card["metrics"]["delta1"] > 0.8
    assert path.with_suffix(".md").is_file()
    assert card["params"] > 0 and card["flops"] > 0


@pytest.fixture(scope="module")
def held_out_frames():
    """Frames of a forest seed that no shipped model was trained on (training used 100..111)."""
    from forest_perception.frames import CameraIntrinsics
    from forest_perception.sim.simulator import ForestSimulator, RoverConfig, SimConfig
    from forest_perception.sim.world import generate_world

    world = generate_world(seed=4242, size_m=30.0)
    frames = []
    with ForestSimulator(world, SimConfig(camera=CameraIntrinsics(320, 240), seed=1), [RoverConfig()]) as sim:
        for _ in range(4):
            sim.run(1.5, render=False)
            frame = sim.render_camera(0)
            frames.append((frame.rgb, frame.depth_true))
    return frames


@pytest.mark.parametrize("name", ["multiscale_320x240", "autoencoder_160x128_int8"])
def test_shipped_model_predicts_forest_depth(held_out_frames, name):
    engine = load_engine(str(MODELS / f"{name}.onnx"))
    preds, truths = [], []
    for rgb, truth in held_out_frames:
        pred = engine.predict(rgb)
        assert pred.shape == truth.shape and pred.dtype == np.float32
        preds.append(np.where(np.isfinite(pred), pred, 10.0))
        truths.append(np.nan_to_num(truth, nan=0.0))
    metrics = depth_metrics(np.stack(preds), np.stack(truths), min_depth=0.28, max_depth=10.0)
    # generous bounds: a broken model (constant output, swapped channels, wrong scale) lands far outside
    assert metrics["absrel"] < 0.25, metrics
    assert metrics["delta1"] > 0.7, metrics
