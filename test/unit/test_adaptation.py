"""The adaptation experiment's pieces on tiny data: rover folders, scoring, FedAvg round 0 = shipped, no-data rovers."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from experiments import adaptation
from forest_perception.collab.flower.task import (
    TaskConfig,
    batchnorm_frozen,
    build_model,
    merge_run_config,
    train_local,
)


@pytest.fixture(scope="module")
def rover_folders(tmp_path_factory):
    """Two rovers with three tiny synthetic segments each, and one empty folder."""
    from forest_perception.dataset_tools.synth import SynthConfig, synthesize

    root = tmp_path_factory.mktemp("rovers")
    folders = {}
    for i in range(2):
        folders[f"rover_{i}"] = root / f"rover_{i}"
        synthesize(folders[f"rover_{i}"], SynthConfig(segments_per_run=3, frames_per_segment=2, seed=i, width=64,
                                                      height=48, weathers=("sunny",)))
    (root / "rover_empty").mkdir()
    folders["rover_empty"] = root / "rover_empty"
    return folders


def tiny_config(**overrides) -> adaptation.AdaptationConfig:
    return dataclasses.replace(adaptation.AdaptationConfig(seeds=(0,), rounds=1, engine="local", batch_size=4,
                                                           holdout_fraction=0.4), **overrides)


def test_batchnorm_frozen_with_init_by_default_and_statistics_stay():
    assert batchnorm_frozen(merge_run_config({"init": "autoencoder_160x128"}))
    assert not batchnorm_frozen(merge_run_config({}))
    assert batchnorm_frozen(merge_run_config({"batchnorm": "frozen"}))
    assert not batchnorm_frozen(merge_run_config({"init": "autoencoder_160x128", "batchnorm": "train"}))
    with pytest.raises(ValueError, match="batchnorm"):
        batchnorm_frozen(merge_run_config({"batchnorm": "sometimes"}))
    task = TaskConfig.from_run_config(merge_run_config({"batchnorm": "frozen"}))
    assert task.freeze_batchnorm
    model = build_model(task)
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k}
    assert stats, "the quick network has BatchNorm layers"
    from forest_perception.collab.flower.task import LocalData

    images = torch.randn(4, 3, *task.input_hw)
    depth = torch.rand(4, 1, *task.input_hw) * 5 + 1
    data = LocalData("x", images, depth, images, depth, val_is_train=True)
    train_local(model, data, task)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in stats.items())
    moved = build_model(dataclasses.replace(task, freeze_batchnorm=False))
    train_local(moved, data, dataclasses.replace(task, freeze_batchnorm=False))
    assert any(not torch.equal(moved.state_dict()[k], v) for k, v in stats.items())


def test_empty_rover_folder_reports_no_data(rover_folders):
    config = tiny_config()
    task = TaskConfig.from_run_config(adaptation.run_config(config, 0))
    rovers = adaptation.load_rovers(rover_folders, task)
    assert isinstance(rovers["rover_empty"], str) and rovers["rover_empty"].startswith(adaptation.NO_DATA)
    held = adaptation.held_out(rovers)
    assert sorted(held) == ["rover_0", "rover_1"]
    row = adaptation.score(adaptation.shipped_model(config, task), held, task, alone="rover_0")
    assert row["own/absrel"] == row["rover_0/absrel"] and row["others/absrel"] == row["rover_1/absrel"]
    n0, n1 = held["rover_0"][0].shape[0], held["rover_1"][0].shape[0]
    assert row["absrel"] == pytest.approx((n0 * row["rover_0/absrel"] + n1 * row["rover_1/absrel"]) / (n0 + n1))


@pytest.mark.slow
def test_every_method_runs_and_fedavg_round0_is_the_shipped_model(rover_folders, tmp_path):
    result = adaptation.run(tiny_config(rounds=2, scaffold_local_epochs=2), tmp_path, folders=rover_folders)
    runs = result["runs"]
    methods = [r["method"] for r in runs]
    assert methods.count("alone") == 2
    assert {"shipped", "fedavg", "scaffold", "pooled", "pooled_long", "rovers"} <= set(methods)
    shipped = next(r for r in runs if r["method"] == "shipped")["rounds"][0]
    fed = next(r for r in runs if r["method"] == "fedavg")["rounds"]
    assert [r["round"] for r in fed] == [0.0, 1.0, 2.0]
    assert fed[0]["absrel"] == shipped["absrel"] and fed[0]["delta1"] == shipped["delta1"]
    assert fed[1]["selected"] == 3 and fed[1]["accepted"] == 2  # the empty rover replied no data; the round went on
    assert fed[1]["bytes_up"] > 0 and fed[1]["absrel"] != shipped["absrel"]
    # SCAFFOLD: the same start; each reply carries a control, and from round 2 each message a correction
    scaffold = next(r for r in runs if r["method"] == "scaffold")["rounds"]
    assert [r["round"] for r in scaffold] == [0.0, 1.0, 2.0] and scaffold[0]["absrel"] == shipped["absrel"]
    assert scaffold[1]["bytes_up"] > 1.8 * fed[1]["bytes_up"]
    # two of the three rovers sent controls (the empty one has no data): two corrections more, about 5/3 as much
    assert scaffold[2]["bytes_down"] > 1.5 * scaffold[1]["bytes_down"] and scaffold[2]["absrel"] != fed[2]["absrel"]
    # pooled training scored after every epoch: 2 epochs for FedAvg's comparison, 4 as long as SCAFFOLD's rovers
    pooled = next(r for r in runs if r["method"] == "pooled")["rounds"]
    long = next(r for r in runs if r["method"] == "pooled_long")["rounds"]
    assert [r["round"] for r in long] == [0.0, 1.0, 2.0, 3.0, 4.0] and pooled == long[:3]
    goal = result["summary"]["goal"]
    assert goal["scaffold_vs_pooled_long"] == pytest.approx(
        result["summary"]["methods"]["scaffold"]["absrel"]["mean"] / long[-1]["absrel"] - 1)
    status = result["summary"]["rovers"]
    assert status["rover_0"] == "ok" and status["rover_empty"].startswith(adaptation.NO_DATA)
    assert math.isfinite(result["summary"]["goal"]["fedavg_gain_vs_shipped"])
    for suffix in ("json", "csv", "png"):
        assert (tmp_path / f"adaptation.{suffix}").is_file()
    assert "FedAvg" in adaptation.table(result) and "rover_empty" in adaptation.table(result)
    assert "SCAFFOLD (Flower, 2 rounds, 2 local epochs)" in adaptation.table(result)
    assert not any(p.name != "Run-1" for p in rover_folders["rover_0"].iterdir() if p.is_dir())  # inputs untouched


def test_bad_engine_is_refused(rover_folders, tmp_path):
    with pytest.raises(ValueError, match="engine"):
        adaptation.run_fedavg(tiny_config(engine="grpc"), rover_folders, tmp_path, 0)


def test_local_sgd_takes_plain_gradient_steps_and_a_bad_optimizer_is_refused():
    from forest_perception.collab.flower.task import LocalData, get_arrays, local_round

    task = TaskConfig.from_run_config(merge_run_config({"optimizer": "sgd", "lr": 0.01, "local-steps": 1,
                                                        "batch-size": 4, "batchnorm": "frozen"}))
    assert task.optimizer == "sgd"
    torch.manual_seed(0)
    images = torch.randn(4, 3, *task.input_hw)
    depth = torch.rand(4, 1, *task.input_hw) * 5 + 1
    data = LocalData("x", images, depth, images, depth, val_is_train=True)
    names, arrays = get_arrays(build_model(task))
    # one SGD step: delta = -lr * gradient of the first batch
    from forest_perception.collab.flower.task import depth_loss

    reference = build_model(task)
    reference.eval()  # frozen BatchNorm, as the task trains it
    loss = depth_loss(task)(reference(images), depth, images)[0]
    loss.backward()
    grads = {n: p.grad for n, p in reference.named_parameters()}
    update = local_round(names, arrays, data, task, seed=0)
    assert update.metrics["lr"] == 0.01 and update.metrics["steps"] == 1
    for name, delta in zip(names, update.deltas):
        if name in grads and grads[name] is not None:
            torch.testing.assert_close(torch.from_numpy(delta), -0.01 * grads[name], atol=1e-6, rtol=1e-4)
    with pytest.raises(ValueError, match="optimizer must be one of adamw, sgd"):
        TaskConfig.from_run_config(merge_run_config({"optimizer": "adam"}))


def test_influence_debug_spoils_a_copy_and_ranks_every_rover(rover_folders, tmp_path):
    import numpy as np

    from experiments import influence_debug
    from forest_perception.dataset_tools.layout import iter_segments, load_frame

    config = influence_debug.InfluenceConfig(seeds=(0,), faults=("depth-scale",), rounds=1, local_steps=1,
                                             batch_size=2, faulty="rover_1")
    source = rover_folders["rover_1"]
    before = {p: p.stat().st_mtime_ns for p in source.rglob("*")}
    copy = influence_debug.write_faulty_copy(source, tmp_path / "spoilt", "depth-scale", config)
    for a, b in zip(iter_segments(source), iter_segments(copy)):
        rgb_a, depth_a, _ = load_frame(a, 0)
        rgb_b, depth_b, _ = load_frame(b, 0)
        np.testing.assert_array_equal(rgb_a, rgb_b)
        valid = np.isfinite(depth_a) & np.isfinite(depth_b)
        np.testing.assert_allclose(depth_b[valid], 1.3 * depth_a[valid], rtol=0.01)
    rgb = np.zeros((8, 12, 3), np.uint8)
    rgb[:, 5] = 255
    shifted, _ = influence_debug.spoil(rgb, np.ones((8, 12), np.float32), "misaligned", config)
    assert shifted[0, 5 + config.shift_px, 0] == 255 and shifted[0, 5, 0] == 0
    with pytest.raises(ValueError, match="unknown fault"):
        influence_debug.spoil(rgb, np.ones((8, 12), np.float32), "wobbly", config)

    work = tmp_path / "work"
    work.mkdir()
    folders = {r: f for r, f in rover_folders.items() if r != "rover_empty"}
    row = influence_debug.run_fault(config, folders, "depth-scale", 0, work)
    assert row["faulty"] == "rover_1_depth-scale" and sorted(row["ranking"]) == sorted(row["estimated"])
    assert len(row["estimated"]) == 2 and all(math.isfinite(v) for v in row["estimated"].values())
    assert row["complete"] and 1 <= row["faulty_rank"] <= 2
    assert math.isfinite(row["absrel_all"]) and math.isfinite(row["absrel_without"])
    assert {p: p.stat().st_mtime_ns for p in source.rglob("*")} == before  # the source folder is only read


def test_fedprox_term_pulls_local_training_back_to_the_round_start_and_travels_in_every_message():
    from types import SimpleNamespace

    from flwr.app import ConfigRecord, RecordDict

    from forest_perception.collab.flower import client_app
    from forest_perception.collab.flower.server_app import ServerSettings
    from forest_perception.collab.flower.task import LocalData, proximal_term

    assert proximal_term(torch.nn.Linear(2, 2), 0.0) is None
    layer = torch.nn.Linear(3, 2)
    layer.bias.requires_grad_(False)  # not trained: not in the term
    term = proximal_term(layer, 4.0)
    assert float(term().detach()) == 0.0
    with torch.no_grad():
        layer.weight += 0.5
        layer.bias += 10.0
    assert float(term().detach()) == pytest.approx(0.5 * 4.0 * 6 * 0.25)

    def distance_after_training(mu: float) -> float:
        task = TaskConfig.from_run_config(merge_run_config({"optimizer": "sgd", "lr": 0.05, "local-steps": 6,
                                                            "batch-size": 2, "batchnorm": "frozen",
                                                            "proximal-mu": mu}))
        assert task.proximal_mu == mu
        torch.manual_seed(0)
        model = build_model(task)
        start = [p.detach().clone() for p in model.parameters()]
        images = torch.randn(8, 3, *task.input_hw)
        depth = torch.rand(8, 1, *task.input_hw) * 5 + 1
        train_local(model, LocalData("x", images, depth, images, depth, val_is_train=True), task)
        return math.sqrt(sum(float(((p - s) ** 2).sum()) for p, s in zip(model.parameters(), start)))

    free, held = distance_after_training(0.0), distance_after_training(5.0)
    assert 0 < held < 0.9 * free, (free, held)
    with pytest.raises(ValueError, match="proximal_mu must be a non-negative"):
        TaskConfig.from_run_config(merge_run_config({"proximal-mu": -0.1}))
    # the coordinator sends it each round and the rover trains with it
    settings = ServerSettings.from_run_config({"proximal-mu": 0.05})
    assert settings.train_config["proximal-mu"] == 0.05
    record = ConfigRecord({"server-round": 3, "proximal-mu": 0.05})
    message = SimpleNamespace(content=RecordDict({client_app.CONFIG_KEY: record}))  # what _round_config reads
    context = SimpleNamespace(node_config={})
    merged, server_round = client_app._round_config(merge_run_config({}), message, context)
    assert server_round == 3 and TaskConfig.from_run_config(merged).proximal_mu == 0.05
