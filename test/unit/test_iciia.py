"""ICIIA: partitioned projections and shuffling, the identity at start, the bank's mask, FLOPs, bad input, ONNX
against PyTorch, module files, training, the cloud command and the gate with history."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from forest_perception.models.networks import build_model, count_flops
from forest_perception.models.networks.iciia import (
    ICIIA,
    HistoryDepth,
    PartitionedLinear,
    RoverHistoryGraph,
    channel_shuffle,
    iciia_flops,
)

HW = (64, 96)


def _autoencoder(seed: int = 0) -> torch.nn.Module:
    """A small untrained auto-encoder, weights scaled up so that its depth follows its input (as a trained one's)."""
    torch.manual_seed(seed)
    model = build_model("autoencoder", input_hw=HW, base_channels=4).eval()
    with torch.no_grad():
        for weight in model.parameters():
            weight.mul_(1.5)
    return model


def _randomise_output(model: HistoryDepth, std: float = 1.0) -> None:
    with torch.no_grad():
        model.iciia.out.weight.normal_(0.0, std)


def test_partitioned_linear_is_block_diagonal():
    layer = PartitionedLinear(16, partitions=4)
    assert tuple(layer.weight.shape) == (4, 4, 4)  # P blocks of D/P x D/P: 1/P of a dense layer's weights
    x = torch.randn(3, 5, 16)
    y = layer(x)
    assert y.shape == x.shape
    bumped = x.clone()
    bumped[..., 4:8] += 1.0  # only partition 1 of the input changes ...
    changed = (layer(bumped) - y).abs().amax(dim=(0, 1)) > 1e-6
    assert changed[4:8].all() and not changed[:4].any() and not changed[8:].any()  # ... so only block 1 of the output
    assert layer.count_macs((x,), y) == 15 * 16 * 4


def test_channel_shuffle_mixes_every_partition_into_every_block():
    x = torch.arange(16.0).reshape(1, 16)  # partitions of 4: [0..3], [4..7], [8..11], [12..15]
    y = channel_shuffle(x, 4)
    assert sorted(y[0].tolist()) == x[0].tolist()  # a permutation
    for block in y[0].reshape(4, 4):
        assert sorted(int(v) // 4 for v in block) == [0, 1, 2, 3]  # one feature from each input partition
    assert torch.equal(channel_shuffle(x, 1), x)


@pytest.mark.parametrize("name", ["autoencoder", "multiscale"])
def test_zero_initialised_module_is_the_identity(name):
    torch.manual_seed(0)
    base = build_model(name, input_hw=HW, base_channels=4) if name == "autoencoder" else build_model(name, input_hw=HW)
    base.eval()
    model = HistoryDepth(base, partitions=4, heads=2).eval()
    x = torch.randn(2, 3, *HW)
    bank = torch.randn(2, 5, model.feature_dim)
    with torch.no_grad():
        assert torch.equal(model(x, bank, torch.ones(2, 5)), base(x))
        assert torch.equal(model(x), base(x))
        depth, feature = model.forward_with_feature(x)
    assert feature.shape == (2, model.feature_dim) and depth.shape == (2, 1, *HW)


def test_history_changes_the_depth_and_masked_slots_do_not():
    model = HistoryDepth(_autoencoder(), partitions=4, heads=2).eval()
    _randomise_output(model)
    x = torch.randn(1, 3, *HW)
    bank = 3 * torch.randn(1, 4, model.feature_dim)
    with torch.no_grad():
        alone = model(x)
        with_two = model(x, bank[:, :2], torch.ones(1, 2))
        garbage = bank.clone()
        garbage[:, 2:] = 1e3  # masked slots: whatever they hold is ignored
        masked = model(x, garbage, torch.tensor([[1.0, 1.0, 0.0, 0.0]]))
        empty = model(x, garbage, torch.zeros(1, 4))
    assert (with_two - alone).abs().max() > 1e-4
    assert torch.allclose(masked, with_two, atol=1e-5)
    assert torch.allclose(empty, alone, atol=1e-5)  # an all-masked bank is no bank: finite, the current frame only


def test_flops_fall_with_partitions_and_are_counted_as_written():
    base = _autoencoder()
    base_flops = count_flops(base, HW)
    previous = None
    for p in (1, 4, 16):
        model = HistoryDepth(base, partitions=p, heads=4)
        flops = iciia_flops(model, HW, bank_size=8)
        d, tokens, memory = model.feature_dim, (HW[0] // 16) * (HW[1] // 16), 9
        projections = (2 * tokens + 2 * memory) * d * (d // p)  # q and out over the tokens, k and v over the memory
        attention = 2 * tokens * memory * d
        assert flops["base"] == base_flops
        assert flops["iciia"] == 2 * (projections + attention)
        assert previous is None or flops["iciia"] < previous
        previous = flops["iciia"]


def test_bad_input_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match=r"P=3 must be a positive integer dividing the feature width 64 \(valid: 1, "):
        ICIIA(64, partitions=3)
    with pytest.raises(ValueError, match="heads=5"):
        ICIIA(64, partitions=4, heads=5)
    module = ICIIA(64, partitions=4)
    with pytest.raises(ValueError, match="built for 64-wide features, got a 32-channel"):
        module(torch.randn(1, 32, 2, 3))
    with pytest.raises(ValueError, match="frame feature width 64"):
        module(torch.randn(1, 64, 2, 3), torch.randn(1, 4, 48), torch.ones(1, 4))
    with pytest.raises(ValueError, match="bank mask must be BxK"):
        module(torch.randn(1, 64, 2, 3), torch.randn(1, 4, 64), torch.ones(1, 3))
    with pytest.raises(ValueError, match="wraps AutoEncoderDepth or MultiScaleDepth"):
        HistoryDepth(torch.nn.Conv2d(3, 1, 1))


def test_onnx_matches_pytorch_for_full_partial_and_empty_banks(tmp_path):
    import onnxruntime as ort

    from forest_perception.models.iciia import IciiaSpec, export_rover_model, verify_rover_onnx

    model = HistoryDepth(_autoencoder(), partitions=2, heads=2).eval()
    _randomise_output(model)
    spec = IciiaSpec(base="test", partitions=2, heads=2, bank_capacity=6)
    meta = {"version": "test-base", "input_hw": list(HW), "model_name": "autoencoder"}
    path = export_rover_model(model, spec, meta, tmp_path / "rover.onnx", exporter="torchscript", command="test")
    report = verify_rover_onnx(path, model, HW, 6)
    assert report["max_abs_error_m"] < 1e-4 and report["max_abs_error_feature"] < 1e-4
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image", "bank", "bank_mask"]
    assert [o.name for o in session.get_outputs()] == ["depth", "feature"]
    image, bank = torch.randn(1, 3, *HW), torch.randn(6, model.feature_dim)
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    with torch.no_grad():
        expected = RoverHistoryGraph(model)(image, bank, mask)[0].numpy()
    got = session.run(["depth"], {"image": image.numpy(), "bank": bank.numpy(), "bank_mask": mask.numpy()})[0]
    assert np.abs(got - expected).max() < 1e-4
    assert (tmp_path / "rover.md").is_file()  # the model card


def test_sample_banks_never_hold_the_target_and_respect_the_capacity():
    from forest_perception.models.iciia import sample_banks

    features = [torch.arange(5.0)[:, None].repeat(1, 3), 10 + torch.arange(3.0)[:, None].repeat(1, 3)]
    generator = torch.Generator().manual_seed(0)
    bank, mask = sample_banks(features, [(0, 2)] * 20 + [(1, 0)] * 20, capacity=3, generator=generator)
    assert bank.shape == (40, 3, 3) and mask.shape == (40, 3)
    for row in range(40):
        held = bank[row][mask[row] > 0][:, 0].tolist()
        if row < 20:
            assert 2.0 not in held and all(v in (0.0, 1.0, 3.0, 4.0) for v in held)
        else:
            assert 10.0 not in held and all(v in (11.0, 12.0) for v in held)
    assert set(mask.sum(1).tolist()) >= {0.0, 1.0, 2.0}  # empty and partial banks are trained too


def test_training_moves_only_the_module_and_predict_sequence_feeds_history():
    from forest_perception.models.iciia import TrainSettings, predict_sequence, train

    base = _autoencoder()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = HistoryDepth(base, partitions=2, heads=2)
    sequences = [(torch.randn(4, 3, *HW), torch.rand(4, 1, *HW) * 5 + 0.5) for _ in range(2)]
    summary = train(model, sequences, 4, TrainSettings(epochs=1, batch_size=4), 0.1, 20.0)
    assert summary["steps"] == 2 and np.isfinite(summary["loss_by_epoch"]).all()
    assert model.iciia.out.weight.abs().max() > 0  # the zero output left the identity
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())  # base and its BatchNorm unchanged
    _randomise_output(model)  # one step barely moves it: make the history's effect visible
    images = sequences[0][0] * torch.arange(1.0, 5.0)[:, None, None, None]  # frames that differ
    with_history = predict_sequence(model, images, history=True, capacity=2)
    without = predict_sequence(model, images, history=False)
    assert torch.allclose(with_history[0], without[0], atol=1e-5)  # the first frame has no history yet
    assert (with_history[1:] - without[1:]).abs().max() > 1e-4


def test_module_file_round_trip_and_refusals(tmp_path):
    from forest_perception.models import iciia

    spec = iciia.IciiaSpec(base="autoencoder_160x128", partitions=8, bank_capacity=4)
    model, meta = iciia.build(spec)
    _randomise_output(model, 0.01)
    path = iciia.save_module(model, spec, meta, tmp_path / "m.pt", {"note": "test"})
    loaded, loaded_spec, record = iciia.load_module(path)
    assert loaded_spec == spec and record["version"] == iciia.module_version(model)
    assert torch.equal(loaded.iciia.out.weight, model.iciia.out.weight)
    raw = torch.load(path, weights_only=True)
    raw["state"]["out.bias"] += 1.0
    torch.save(raw, tmp_path / "changed.pt")
    with pytest.raises(iciia.IciiaFileError, match="changed after it was written"):
        iciia.load_module(tmp_path / "changed.pt")
    raw["state"]["out.bias"] -= 1.0
    raw["base_version"] = "autoencoder-000000000000"
    torch.save(raw, tmp_path / "other_base.pt")
    with pytest.raises(iciia.IciiaFileError, match="was trained on autoencoder-000000000000"):
        iciia.load_module(tmp_path / "other_base.pt")
    torch.save({"format": "something else"}, tmp_path / "foreign.pt")
    with pytest.raises(iciia.IciiaFileError, match="is not an ICIIA module"):
        iciia.load_module(tmp_path / "foreign.pt")


def test_cloud_command_and_the_gate_feed_history_in_frame_order(tmp_path, capsys):
    from tiny_forest import write_tiny_dataset

    from forest_perception.collab.flower.cli import main
    from forest_perception.collab.flower.task import TaskConfig
    from forest_perception.collab.rover.dataset import scan_recordings
    from forest_perception.collab.rover.gate import GateConfig, ValidationGate, evaluate_engines
    from forest_perception.collab.rover.holdout import make_holdout
    from forest_perception.inference import HistoryDepthEngine, load_engine

    data = tmp_path / "cloud"
    write_tiny_dataset(data, segments=2)
    out, drop = tmp_path / "out", tmp_path / "drop"
    code = main(["iciia", "train", "--data", str(data), "--out", str(out), "--epochs", "1", "--partitions", "16",
                 "--bank", "4", "--exporter", "torchscript", "--drop", str(drop)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "rover model:" in printed and "% of the base" in printed
    assert {p.name for p in out.iterdir()} >= {"iciia.pt", "iciia_rover.onnx", "iciia_rover.md", "iciia.json"}
    dropped = drop / "global-r000001.onnx"
    assert dropped.is_file()
    assert main(["iciia", "train", "--data", str(data), "--out", str(out), "--partitions", "3"]) == 2
    assert "P=3 must be a positive integer dividing the feature width 256" in capsys.readouterr().err

    scan = scan_recordings(data)
    holdout = make_holdout([scan.segment(s.segment_id) for s in scan.segments])
    engine = load_engine(dropped, threads=1)
    assert isinstance(engine, HistoryDepthEngine)
    evaluate_engines({"candidate": engine}, holdout, 0.1, 10.0)
    assert engine.history_frames == min(4, len(holdout))  # every held-out frame went through the bank, in order
    decision = ValidationGate(tmp_path / "models", GateConfig(threads=1)).check(dropped, None, holdout,
                                                                                TaskConfig())
    assert decision.code == "first_model" and decision.accepted, decision.reason
    assert decision.model_version.startswith("iciia_autoencoder-")


def test_sequence_jitter_shifts_every_frame_of_a_sequence_alike():
    from forest_perception.models.iciia import jitter_sequences

    images = torch.ones(3, 3, 4, 4)
    (shifted, depth), (other, _) = jitter_sequences([(images, torch.ones(3, 1, 4, 4))] * 2, 0.3,
                                                    torch.Generator().manual_seed(0))
    assert torch.equal(depth, torch.ones(3, 1, 4, 4))
    assert torch.allclose(shifted[0], shifted[1]) and torch.allclose(shifted[0], shifted[2])  # one shift per sequence
    assert not torch.allclose(shifted, images) and not torch.allclose(shifted, other)  # sequences differ
    assert float((shifted - images).abs().max()) <= 0.6 + 1e-6
