"""DC-CCL through Flower: rovers train only the small submodel on their frozen mimic, the coordinator averages it,
screens updates made with another mimic, refuses run configs and stores that do not fit, and a rover that drops
out of a round rejoins the next one with nothing counted twice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_flower_real_network import HW, write_segment

from forest_perception.collab import dcccl
from forest_perception.collab.dcccl import Part
from forest_perception.models.networks import AutoEncoderDepth
from forest_perception.models.networks.collaborative import LogDepthMember

CHANNELS = 2


def mimic_part(seed: int, large_version: str = "large-000000000000") -> Part:
    torch.manual_seed(seed)
    return Part("mimic", LogDepthMember(AutoEncoderDepth(base_channels=8), HW), "autoencoder", {"base_channels": 8},
                large_version)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("dcccl")
    for r in range(3):
        for i, segment in enumerate("abcd"):
            write_segment(base / f"rover_{r}", 1 + i // 2, segment, 2, seed=10 * r + i)
    write_segment(base / "cloud", 1, "a", 3, seed=99)
    mimic, old = mimic_part(0), mimic_part(1)
    paths = {"mimic_path": dcccl.save_part(mimic, base / "mimic.pt"),
             "old_path": dcccl.save_part(old, base / "old_mimic.pt")}
    small_of_old = dcccl.small_part_of(old, CHANNELS)
    paths["small_of_old"] = dcccl.save_part(small_of_old, base / "small_of_old.pt")
    return {"base": base, "mimic": mimic, "old": old, **paths}


def run_config(setup: dict, tmp_path: Path, **extra) -> dict:
    from forest_perception.collab.flower.task import merge_run_config

    folders = ":".join(str(setup["base"] / f"rover_{r}") for r in range(3))
    return merge_run_config({
        "algorithm": "dc-ccl", "dcccl-mimic": str(setup["mimic_path"]), "dcccl-small-channels": CHANNELS,
        "rover-data": folders, "state-db": str(tmp_path / "c.db"), "cloud-test": str(setup["base"] / "cloud"),
        "num-server-rounds": 2, "local-steps": 2, "lr": 0.01, "holdout-fraction": 0.3, **extra,
    })


def test_rovers_train_the_small_submodel_and_an_update_made_with_another_mimic_is_screened(setup, tmp_path):
    from forest_perception.collab.flower.client_app import make_client_app
    from forest_perception.collab.flower.local_grid import LocalGrid
    from forest_perception.collab.flower.server_app import build_coordinator
    from forest_perception.collab.flower.store import CoordinatorStore

    config = run_config(setup, tmp_path)
    coordinator = build_coordinator(config)
    names = coordinator.strategy.names
    small = dcccl.small_part_of(setup["mimic"], CHANNELS)
    assert len(names) == len([k for k, v in small.module.state_dict().items() if v.is_floating_point()])
    assert all(n.startswith("part.") for n in names)  # the mimic never travels
    # rover_2 still holds the old mimic; rover_1 loses the link in round 1 and comes back in round 2
    grid = LocalGrid(make_client_app(config), 3, run_config=config,
                     node_configs=[{}, {}, {"dcccl-mimic": str(setup["old_path"])}],
                     online=lambda node, server_round: not (node == 1002 and server_round == 1))
    records = coordinator.run(grid)
    coordinator.store.close()

    by = {(rec.server_round, e.rover_id): e for rec in records for e in rec.entries}
    assert by[(1, "rover_0")].status == "accepted"
    assert by[(1, "rover_1")].status == "missing"
    assert (by[(1, "rover_2")].status, by[(1, "rover_2")].reason) == ("rejected", "stale_mimic")
    assert setup["old"].version in by[(1, "rover_2")].message and setup["mimic"].version in by[(1, "rover_2")].message
    assert by[(2, "rover_1")].status == "accepted" and by[(2, "rover_0")].status == "accepted"
    assert records[1].train_metrics["accepted"] == 2 and records[1].train_metrics["rejected"] == 1
    assert records[1].train_metrics["num-examples"] == by[(2, "rover_0")].num_examples + \
        by[(2, "rover_1")].num_examples
    # only the small submodel goes down: far fewer bytes than the mimic
    mimic_bytes = dcccl.state_bytes(setup["mimic"].module)
    assert 0 < by[(1, "rover_0")].bytes_down < mimic_bytes

    with CoordinatorStore(tmp_path / "c.db", readonly=True) as store:
        assert store.identity["dcccl-mimic"] == setup["mimic"].version
        start, end = store.model(0)[1], store.model(2)[1]
        rows = store.evaluations()
    logit = names.index("part.net.decoder.logit.weight")
    assert not start[logit].any() and end[logit].any()  # the small submodel started at zero and learnt
    evaluated = {(r["round"], r["name"]) for r in rows if r["status"] == "ok"}
    assert {(2, "rover_0"), (2, "cloud")} <= evaluated


@pytest.mark.parametrize(("extra", "message"), [
    ({"algorithm": "fedavg"}, "belong to algorithm dc-ccl, not 'fedavg'"),
    ({"dcccl-mimic": ""}, "algorithm dc-ccl needs run config dcccl-mimic"),
    ({"init": "autoencoder_160x128"}, "not init: leave init unset"),
    ({"input-height": 64}, "leave input-height unset"),
    ({"dcccl-mimic": "/no/such/mimic.pt"}, "mimic file /no/such/mimic.pt does not exist"),
])
def test_a_dcccl_run_config_that_does_not_fit_is_refused_by_name(setup, tmp_path, extra, message):
    from forest_perception.collab.flower.server_app import build_coordinator

    with pytest.raises(ValueError, match=message):
        build_coordinator(run_config(setup, tmp_path, **extra))


def test_parts_of_another_mimic_or_kind_are_refused(setup, tmp_path):
    from forest_perception.collab.flower.server_app import build_coordinator

    with pytest.raises(ValueError, match="is a 'small', expected mimic"):
        build_coordinator(run_config(setup, tmp_path, **{"dcccl-mimic": str(setup["small_of_old"])}))
    with pytest.raises(dcccl.VersionMismatchError, match=f"trained with mimic {setup['old'].version}, the run's "
                                                         f"mimic is {setup['mimic'].version}"):
        build_coordinator(run_config(setup, tmp_path, **{"dcccl-small": str(setup["small_of_old"])}))
    # the same small submodel with its own mimic starts the run from its weights
    coordinator = build_coordinator(run_config(setup, tmp_path, **{"dcccl-mimic": str(setup["old_path"]),
                                                                   "dcccl-small": str(setup["small_of_old"]),
                                                                   "state-db": str(tmp_path / "s.db")}))
    coordinator.store.close()
    small = dcccl.load_part(setup["small_of_old"], "small")
    want = [v.numpy() for v in small.module.state_dict().values() if v.is_floating_point()]
    for got, ref in zip(coordinator.strategy.params, want):
        np.testing.assert_array_equal(got, ref)


def test_a_store_of_another_mimic_is_not_resumed(setup, tmp_path):
    from forest_perception.collab.flower.server_app import build_coordinator

    build_coordinator(run_config(setup, tmp_path)).store.close()
    with pytest.raises(ValueError, match=f"dcccl-mimic='{setup['mimic'].version}', this run has dcccl-mimic="
                                         f"'{setup['old'].version}'"):
        build_coordinator(run_config(setup, tmp_path, **{"dcccl-mimic": str(setup["old_path"])}))


def test_the_rover_gate_exports_mimic_plus_small_as_one_model_and_refuses_one_made_for_another_mimic(setup, tmp_path):
    from forest_perception.collab import rover
    from forest_perception.collab.flower.task import TaskConfig, build_model, get_arrays
    from forest_perception.inference import Preprocessor, load_engine

    task = TaskConfig(model="autoencoder", base_channels=8, input_hw=HW, dcccl_mimic=str(setup["mimic_path"]),
                      dcccl_small_channels=CHANNELS).validate()
    network = build_model(task)
    with torch.no_grad():
        network.part.net.decoder.logit.bias.fill_(0.3)  # the small submodel deepens everything by 35 %
    names, arrays = get_arrays(network)
    meta = rover.task_meta(task)
    assert meta["mimic-version"] == setup["mimic"].version
    scan = rover.DatasetWatcher(setup["base"] / "rover_0").scan()
    holdout = rover.make_holdout([scan.segment(s.segment_id) for s in scan.segments])
    gate = rover.ValidationGate(tmp_path / "models", rover.GateConfig(exporter="torchscript"))

    decision = gate.check(rover.GlobalModel(3, names, arrays, meta), None, holdout, task)
    assert decision.accepted and decision.code == "first_model", decision.reason
    engine = load_engine(decision.model_path, backend="onnxruntime", threads=1)
    image = np.random.default_rng(0).integers(0, 256, (HW[0], HW[1], 3), dtype=np.uint8)
    with torch.no_grad():
        want = network(torch.from_numpy(Preprocessor(HW, engine.mean, engine.std)(image).copy()))[0, 0].numpy()
    got = engine.predict(image)
    assert np.isfinite(got).mean() > 0.9
    np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(got)], rtol=1e-3, atol=1e-3)

    stale = dict(meta, **{"mimic-version": setup["old"].version})
    refused = gate.check(rover.GlobalModel(4, names, arrays, stale), decision.model_path, holdout, task)
    assert not refused.accepted and refused.code == "unreadable"
    assert f"made for mimic {setup['old'].version}" in refused.reason and setup["mimic"].version in refused.reason
