"""CoDA through Flower: a round carries the rovers' descriptors up and their cloud samples down, rovers train on their
own frames plus those, the coordinator averages them; a rover without data is handled, the plans are made once, run
configs that do not fit are refused by name, and collab_node's gate takes the result like any global model."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_flower_real_network import HW, write_checkpoint, write_segment

from forest_perception.collab import coda

K = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("coda")
    for r in range(2):
        for i, segment in enumerate("abcd"):
            write_segment(base / f"rover_{r}", 1 + i // 2, segment, 2, seed=10 * r + i)
    (base / "rover_2").mkdir()  # a rover that recorded nothing
    for i, segment in enumerate("abc"):
        write_segment(base / "pool", 1, segment, 3, seed=50 + i)
    init = write_checkpoint(base / "net.pt", "autoencoder", {"base_channels": 4})
    encoder = coda.DescriptorEncoder.from_init(str(init))
    index = coda.build_pool_index([base / "pool"], encoder).save(base / "index.npz")
    return {"base": base, "init": init, "index": index, "pool_frames": 9}


def run_config(setup: dict, tmp_path: Path, **extra) -> dict:
    from forest_perception.collab.flower.task import merge_run_config

    folders = ":".join(str(setup["base"] / f"rover_{r}") for r in range(3))
    return merge_run_config({
        "algorithm": "coda", "init": str(setup["init"]), "coda-index": str(setup["index"]), "coda-candidates": K,
        "coda-outside": 4, "rover-data": folders, "state-db": str(tmp_path / "c.db"), "num-server-rounds": 2,
        "local-steps": 2, "lr": 0.01, "holdout-fraction": 0.3, **extra,
    })


def test_a_coda_round_sends_descriptors_up_and_samples_down_and_the_rovers_train_on_both(setup, tmp_path):
    from forest_perception.collab.flower.client_app import make_client_app
    from forest_perception.collab.flower.local_grid import LocalGrid
    from forest_perception.collab.flower.server_app import build_coordinator
    from forest_perception.collab.flower.store import CoordinatorStore

    config = run_config(setup, tmp_path)
    coordinator = build_coordinator(config)
    assert "coda-index" not in coordinator.strategy.train_config  # the cloud's path is not sent to rovers
    records = coordinator.run(LocalGrid(make_client_app(config), 3, run_config=config))
    coordinator.store.close()
    by = {(rec.server_round, e.rover_id): e for rec in records for e in rec.entries}
    assert by[(1, "rover_0")].status == "accepted" and by[(1, "rover_1")].status == "accepted"
    assert (by[(1, "rover_2")].status, by[(1, "rover_2")].reason) == ("failed", "no_data")
    plans = coordinator.strategy.plans
    assert set(plans) == {"rover_0", "rover_1"}  # the rover without data got no plan
    for rover in ("rover_0", "rover_1"):
        plan = plans[rover]
        assert len(plan["rows"]) == K and len(set(plan["rows"])) == K and plan["candidates"] == 2 * K
        assert plan["coda-fit-s"] > 0 and plan["coda-peak-bytes"] > 0
        assert by[(1, rover)].num_examples == 6 + K  # trained on its 6 training frames plus the K cloud samples
    # round 1: model + descriptors of the candidates and the outside draw + samples down; descriptors + ids + delta up
    sample = HW[0] * HW[1] * (3 + 2)
    dim = coda.PoolIndex.load(setup["index"]).dim
    first, second = by[(1, "rover_0")], by[(2, "rover_0")]
    header = 256  # each serialised array carries a small .npy header
    # the filter's query, once per run: 2K candidates' and 3 outside descriptors (the pool frames not candidates)
    assert 9 * dim * 2 <= first.bytes_down - second.bytes_down <= 9 * dim * 2 + header
    assert second.bytes_down > K * sample
    # up, once per run: the descriptors of the 6 training frames, then the K kept ids
    assert 6 * dim * 2 + 4 * K <= first.bytes_up - second.bytes_up <= 6 * dim * 2 + 4 * K + 2 * header
    with CoordinatorStore(tmp_path / "c.db", readonly=True) as store:
        assert store.identity["coda"].startswith(f"coda/{K}/gate 0/encoder-")
        assert store.last_round() == 2


def test_the_coarse_and_random_arms_choose_without_the_filter(setup, tmp_path):
    from forest_perception.collab.flower.client_app import make_client_app
    from forest_perception.collab.flower.local_grid import LocalGrid
    from forest_perception.collab.flower.server_app import build_coordinator

    for arm in ("coarse", "random"):
        config = run_config(setup, tmp_path, **{"coda-arm": arm, "num-server-rounds": 1,
                                                "state-db": str(tmp_path / f"{arm}.db")})
        coordinator = build_coordinator(config)
        coordinator.run(LocalGrid(make_client_app(config), 3, run_config=config))
        coordinator.store.close()
        plans = coordinator.strategy.plans
        assert all(len(p["rows"]) == K and "coda-fit-s" not in p for p in plans.values())
    # with the gate a rover keeps at most K, only those as own-like as its own frames (here random frames: maybe none)
    config = run_config(setup, tmp_path, **{"coda-gate": 0.5, "num-server-rounds": 1,
                                            "state-db": str(tmp_path / "g.db")})
    coordinator = build_coordinator(config)
    records = coordinator.run(LocalGrid(make_client_app(config), 3, run_config=config))
    coordinator.store.close()
    assert all(len(p["rows"]) <= K and p["coda-fit-s"] > 0 for p in coordinator.strategy.plans.values())
    assert {e.rover_id for e in records[0].entries if e.status == "accepted"} == {"rover_0", "rover_1"}
    # the coarse match is the rover's nearest pool frames: what the index answers for its descriptors
    from forest_perception.collab.flower.task import TaskConfig, load_local_data

    task = TaskConfig.from_run_config(config)
    own = coda.DescriptorEncoder.from_init(str(setup["init"])).describe(
        load_local_data(setup["base"] / "rover_0", task).train_images)
    config = run_config(setup, tmp_path, **{"coda-arm": "coarse", "num-server-rounds": 1,
                                            "state-db": str(tmp_path / "coarse2.db")})
    coordinator = build_coordinator(config)
    coordinator.run(LocalGrid(make_client_app(config), 3, run_config=config))
    coordinator.store.close()
    assert coordinator.strategy.plans["rover_0"]["rows"] == \
        coda.PoolIndex.load(setup["index"]).coarse(own, K).indices.tolist()


@pytest.mark.parametrize(("extra", "message"), [
    ({"algorithm": "fedavg"}, "coda-index belongs to algorithm coda, not 'fedavg'"),
    ({"coda-index": ""}, "algorithm coda needs run config coda-index"),
    ({"coda-arm": "best"}, "coda-arm must be one of random, coarse, coda, got 'best'"),
    ({"coda-candidates": 0}, "coda-candidates must be >= 1"),
    ({"coda-gate": 1.5}, r"coda-gate must be a quantile within \[0, 1\)"),
    ({"coda-index": "/no/such/index.npz"}, "CoDA index /no/such/index.npz does not exist"),
])
def test_a_coda_run_config_that_does_not_fit_is_refused_by_name(setup, tmp_path, extra, message):
    from forest_perception.collab.flower.server_app import build_coordinator

    with pytest.raises(ValueError, match=message):
        build_coordinator(run_config(setup, tmp_path, **extra))


def test_an_index_at_another_input_size_is_refused(setup, tmp_path):
    from forest_perception.collab.flower.server_app import build_coordinator

    other = write_checkpoint(tmp_path / "wide.pt", "autoencoder", {"base_channels": 4}, input_hw=(64, 96))
    with pytest.raises(ValueError, match="holds 64x48 samples, the run's network input is 96x64"):
        build_coordinator(run_config(setup, tmp_path, init=str(other)))


def test_the_gate_takes_a_coda_global_model_like_any_other(setup, tmp_path):
    from forest_perception.collab import rover
    from forest_perception.collab.flower.client_app import make_client_app
    from forest_perception.collab.flower.local_grid import LocalGrid
    from forest_perception.collab.flower.server_app import build_coordinator
    from forest_perception.collab.flower.task import TaskConfig

    drop = tmp_path / "drop"
    config = run_config(setup, tmp_path, **{"num-server-rounds": 2})
    coordinator = build_coordinator(config)
    coordinator.run(LocalGrid(make_client_app(config), 3, run_config=config,
                              node_configs=[{"model-drop-dir": str(drop)}, {}, {}]))
    coordinator.store.close()
    model = rover.read_global_model_file(sorted(drop.glob("global-r*"))[-1])
    assert model.round == 1  # round 2's train message carried round 1's global model
    scan = rover.DatasetWatcher(setup["base"] / "rover_0").scan()
    holdout = rover.make_holdout([scan.segment(s.segment_id) for s in scan.segments])
    gate = rover.ValidationGate(tmp_path / "models", rover.GateConfig(exporter="torchscript"))
    decision = gate.check(model, None, holdout, TaskConfig.from_run_config(config))
    assert decision.accepted and decision.code == "first_model", decision.reason


def test_forest_fl_coda_index_writes_the_index_the_run_reads(setup, tmp_path, capsys):
    from forest_perception.collab.flower.cli import main

    out = tmp_path / "cloud" / "index.npz"
    assert main(["coda", "index", "--data", str(setup["base"] / "pool"), "--out", str(out),
                 "--encoder", str(setup["init"])]) == 0
    assert f"{out}: 9 pool frames" in capsys.readouterr().out
    index = coda.PoolIndex.load(out)
    assert len(index) == 9 and index.encoder_name == str(setup["init"]) and index.input_hw == HW
    assert main(["coda", "index", "--data", str(setup["base"] / "pool"), "--out", str(tmp_path / "i.json")]) == 2
    assert "must end in .npz" in capsys.readouterr().err


def test_a_resumed_coda_run_keeps_its_plans_and_does_not_ask_again(setup, tmp_path):
    from forest_perception.collab.flower.client_app import make_client_app
    from forest_perception.collab.flower.local_grid import LocalGrid
    from forest_perception.collab.flower.server_app import build_coordinator

    config = run_config(setup, tmp_path, **{"num-server-rounds": 1})
    first = build_coordinator(config)
    first.run(LocalGrid(make_client_app(config), 3, run_config=config))
    first.store.close()
    config = run_config(setup, tmp_path, **{"num-server-rounds": 2})
    again = build_coordinator(config)
    records = again.run(LocalGrid(make_client_app(config), 3, run_config=config))
    again.store.close()
    assert again.resumed_from == 1 and again.strategy.plans == first.strategy.plans
    entry = next(e for e in records[-1].entries if e.rover_id == "rover_0")
    sample = HW[0] * HW[1] * (3 + 2)
    model = sum(a.nbytes for a in again.strategy.params)
    assert entry.status == "accepted" and entry.bytes_down < model + K * sample + 1024  # no filter query this time
