"""depth_node with an ICIIA model: the history bank is bounded, emptied by history_size, ~/reset_history and a swap."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from forest_perception.history import FeatureBank


def _params(**values):
    from rclpy.parameter import Parameter

    return [Parameter(k, value=v) for k, v in values.items()]


def _image(value: int):
    from forest_perception import msgs

    rng = np.random.default_rng(value)
    array = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    return msgs.image_from_array(array, "rgb8", msgs.time_from_sec(1.0 + value), "camera_color_optical_frame")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """An ICIIA rover model (bank capacity 4) and the same base exported without ICIIA: (iciia, plain)."""
    torch = pytest.importorskip("torch")
    from forest_perception.models.iciia import IciiaSpec, export_rover_model
    from forest_perception.models.networks import build_model
    from forest_perception.models.networks.iciia import HistoryDepth

    out = tmp_path_factory.mktemp("iciia_node")
    torch.manual_seed(0)
    base = build_model("autoencoder", input_hw=(64, 96)).eval()
    with torch.no_grad():
        for weight in base.parameters():
            weight.mul_(1.5)  # untrained, the depth would be flat and refused; scaled it follows the image
    model = HistoryDepth(base, partitions=4, heads=4).eval()
    with torch.no_grad():
        model.iciia.out.weight.normal_(0.0, 0.2)  # not the identity: the history changes the depth
    spec = IciiaSpec(base="test-autoencoder", partitions=4, heads=4, bank_capacity=4)
    meta = {"version": "autoencoder-test", "input_hw": [64, 96], "model_name": "autoencoder"}
    iciia = export_rover_model(model, spec, meta, out / "iciia.onnx", exporter="torchscript", command="test")
    plain = out / "plain.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(base, (torch.rand(1, 3, 64, 96),), str(plain), dynamo=False, input_names=["image"],
                          output_names=["depth"])
    return str(iciia), str(plain)


def test_feature_bank_is_bounded_resets_and_refuses_bad_features():
    bank = FeatureBank(3, 2)
    for value in range(5):
        bank.add(np.full(2, value, np.float32))
    features, mask = bank.inputs(4)
    assert len(bank) == 3 and mask.tolist() == [1, 1, 1, 0]
    assert features[:, 0].tolist() == [2, 3, 4, 0]  # the newest three, oldest first; the free slot is zero
    with pytest.raises(ValueError, match="2 values"):
        bank.add(np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        bank.add(np.array([0.0, np.nan]))
    assert bank.reset() == 3 and len(bank) == 0
    bank.add(np.ones(2))
    bank.resize(2)
    assert len(bank) == 0 and bank.capacity == 2  # a new size empties it
    bank.resize(0)
    bank.add(np.ones(2))
    assert len(bank) == 0  # size 0 keeps nothing
    with pytest.raises(ValueError, match="non-negative"):
        bank.resize(-1)


def test_history_engine_feeds_the_bank_in_order(models):
    from forest_perception.inference import HistoryDepthEngine, OnnxDepthEngine, load_engine

    iciia, plain = models
    engine = load_engine(iciia, threads=1)
    assert isinstance(engine, HistoryDepthEngine) and engine.history_capacity == 4 and engine.history_size == 4
    assert type(load_engine(plain, threads=1)) is OnnxDepthEngine  # a model without ICIIA: the plain engine
    frames = [np.random.default_rng(i).integers(0, 256, (64, 96, 3), dtype=np.uint8) for i in range(6)]
    first = engine.predict(frames[0])
    for frame in frames[1:]:
        engine.predict(frame)
    assert engine.history_frames == 4  # bounded by the capacity
    again = engine.predict(frames[0])
    assert np.nanmax(np.abs(again - first)) > 1e-4  # the same frame with a history gives another depth
    assert engine.reset_history() == 4 and engine.history_frames == 0
    assert np.allclose(engine.predict(frames[0]), first, atol=1e-5, equal_nan=True)  # empty bank: as the first time
    assert engine.set_history_size(99) == 4  # clamped to the model's bank
    assert engine.set_history_size(0) == 0
    for frame in frames:
        engine.predict(frame)
    assert engine.history_frames == 0
    assert np.allclose(engine.predict(frames[0]), first, atol=1e-5, equal_nan=True)  # no history: no bank


def _history_node(rclpy_context, model: str, wait, frames: int):
    """depth_node on an ICIIA model with a bank of 3, after ``frames`` camera frames were handled."""
    from forest_perception.nodes.depth_node import DepthNode

    node = DepthNode(context=rclpy_context, parameter_overrides=_params(model_path=model, history_size=3,
                                                                         publish_points=False, publish_scan=False))
    try:
        for index in range(frames):
            node._on_image(_image(index))
            assert wait(lambda index=index: node.counts["processed"] + node.counts["skipped"] >= index + 1)
    except BaseException:
        node.destroy_node()
        raise
    return node


def test_depth_node_keeps_a_bounded_bank_and_resets_it(rclpy_context, models, wait, tmp_path, monkeypatch):
    from rclpy.parameter import Parameter
    from std_srvs.srv import Trigger

    monkeypatch.chdir(tmp_path)
    iciia, plain = models
    node = _history_node(rclpy_context, iciia, wait, frames=5)
    try:
        assert any(name.endswith("/reset_history") for name, _ in node.get_service_names_and_types_by_node(
            "depth_node", "/"))
        assert wait(lambda: node._engine.history_frames == min(3, node.counts["processed"]))
        values = node.diagnostics_values()[2]
        assert values["history_size"] == 3 and values["history_frames"] <= 3
        assert values["backend"] == "onnxruntime+history"

        response = node._on_reset_history(Trigger.Request(), Trigger.Response())
        assert response.success and "dropped" in response.message and node._engine.history_frames == 0

        node._on_image(_image(10))
        assert wait(lambda: node._engine.history_frames == 1)
        assert node.set_parameters([Parameter("history_size", value=2)])[0].successful
        assert node._engine.history_frames == 0 and node._engine.history_size == 2  # a new size empties it
        assert not node.set_parameters([Parameter("history_size", value=-1)])[0].successful
        assert node.set_parameters([Parameter("history_size", value=500)])[0].successful
        assert node._engine.history_size == 4  # the model's bank holds 4

        # a model without ICIIA: it runs as before, and there is no history to reset
        assert node.set_parameters([Parameter("model_path", value=plain)])[0].successful
        before = node.counts["processed"]
        node._on_image(_image(20))
        assert wait(lambda: node.counts["processed"] > before)
        response = node._on_reset_history(Trigger.Request(), Trigger.Response())
        assert not response.success and "no history" in response.message
        assert "history_frames" not in node.diagnostics_values()[2]

        # back to the ICIIA model: a fresh engine, an empty bank (the swap's check frame is not history)
        assert node.set_parameters([Parameter("model_path", value=iciia)])[0].successful
        assert node._engine.history_frames == 0
    finally:
        node.destroy_node()
    assert list(tmp_path.iterdir()) == []  # nothing written to disk


def test_save_history_writes_the_bank_only_when_asked_and_refuses_without_a_folder(rclpy_context, models, wait,
                                                                                   tmp_path, monkeypatch):
    from rclpy.parameter import Parameter
    from std_srvs.srv import Trigger

    monkeypatch.chdir(tmp_path)
    iciia, plain = models
    node = _history_node(rclpy_context, iciia, wait, frames=4)
    try:
        assert any(name.endswith("/save_history") for name, _ in node.get_service_names_and_types_by_node(
            "depth_node", "/"))
        assert wait(lambda: node._engine.history_frames == min(3, node.counts["processed"]) > 0)
        # no folder (the default): refused, and nothing is written anywhere
        response = node._on_save_history(Trigger.Request(), Trigger.Response())
        assert not response.success and "history_save_dir is empty" in response.message
        assert list(tmp_path.iterdir()) == []

        folder = tmp_path / "banks" / "rover_0"
        assert node.set_parameters([Parameter("history_save_dir", value=str(folder))])[0].successful
        assert list(tmp_path.iterdir()) == []  # setting the folder writes nothing: only the service does
        frames = node._engine.history_frames
        expected, _ = node._engine.bank.inputs(frames)
        response = node._on_save_history(Trigger.Request(), Trigger.Response())
        assert response.success and f"{frames} frames" in response.message, response.message
        (saved,) = folder.glob("history-*.npz")
        assert str(saved) in response.message
        with np.load(saved) as bank:
            assert bank["features"].shape == (frames, node._engine.feature_dim)
            np.testing.assert_array_equal(bank["features"], expected)  # the bank, oldest first

        # a model without ICIIA has no bank to save
        assert node.set_parameters([Parameter("model_path", value=plain)])[0].successful
        response = node._on_save_history(Trigger.Request(), Trigger.Response())
        assert not response.success and "no history" in response.message
        assert len(list(folder.iterdir())) == 1
    finally:
        node.destroy_node()
