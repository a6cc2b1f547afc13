"""ICIIA through Flower: the coordinator sends the rover graph, nothing trains, each rover scores it on its held-out
segments in frame order with and without its history; the store, `forest-fl status` and the curves hold both; a rover
without data is recorded and the round goes on; module files that do not fit are refused by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_flower_real_network import write_checkpoint, write_segment


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    from forest_perception.models import iciia

    base = tmp_path_factory.mktemp("iciia_fl")
    for r in range(2):
        for i, segment in enumerate("abcd"):
            write_segment(base / f"rover_{r}", 1 + i // 2, segment, 3, seed=10 * r + i)
    (base / "rover_2").mkdir()  # a rover that recorded nothing
    checkpoint = write_checkpoint(base / "net.pt", "autoencoder", {"base_channels": 4})
    raw = torch.load(checkpoint, weights_only=True)  # untrained features hardly differ between frames: scaled, they do
    raw["model_state"] = {k: v * 1.5 if v.is_floating_point() and "running" not in k else v
                          for k, v in raw["model_state"].items()}
    torch.save(raw, checkpoint)
    spec = iciia.IciiaSpec(base=str(checkpoint), partitions=4, heads=2, bank_capacity=4)
    model, meta = iciia.build(spec, seed=0)
    with torch.no_grad():
        model.iciia.out.weight.normal_(0.0, 0.5)  # not the identity: the history changes the depth
    module = iciia.save_module(model, spec, meta, base / "iciia.pt")
    return {"base": base, "checkpoint": checkpoint, "module": module, "version": iciia.module_version(model)}


def run_config(setup: dict, tmp_path: Path, **extra) -> dict:
    from forest_perception.collab.flower.task import merge_run_config

    folders = ":".join(str(setup["base"] / f"rover_{r}") for r in range(3))
    return merge_run_config({"algorithm": "iciia", "iciia-module": str(setup["module"]), "rover-data": folders,
                             "state-db": str(tmp_path / "c.db"), "num-server-rounds": 1, "holdout-fraction": 0.3,
                             **extra})


def test_an_iciia_round_scores_the_module_with_and_without_history_and_trains_nothing(setup, tmp_path, capsys):
    from forest_perception.collab.flower.cli import print_status
    from forest_perception.collab.flower.client_app import make_client_app
    from forest_perception.collab.flower.iciia_round import module_arrays
    from forest_perception.collab.flower.local_grid import LocalGrid
    from forest_perception.collab.flower.server_app import build_coordinator
    from forest_perception.collab.flower.store import CoordinatorStore
    from forest_perception.collab.rover.models import read_candidate

    module_bytes = setup["module"].read_bytes()
    config = run_config(setup, tmp_path, **{"num-server-rounds": 2})
    coordinator = build_coordinator(config)
    assert "iciia-module" not in coordinator.strategy.train_config  # the cloud's path is not sent to the rovers
    drop = tmp_path / "drop"
    grid = LocalGrid(make_client_app(config), 3, run_config=config,
                     node_configs=[{"model-drop-dir": str(drop)}, {}, {}])
    records = coordinator.run(grid)
    coordinator.store.close()
    assert all(not rec.entries and not rec.selected for rec in records)  # no train message, no update
    assert setup["module"].read_bytes() == module_bytes
    names, arrays = module_arrays(setup["module"])
    with CoordinatorStore(tmp_path / "c.db", readonly=True) as store:
        assert store.identity["iciia"].startswith(setup["version"] + "/autoencoder-")
        assert store.updates() == []
        for server_round in (0, 1, 2):  # the global model is the module, unchanged by the rounds
            got_names, got = store.model(server_round)
            assert got_names == names and all(np.array_equal(a, b) for a, b in zip(got, arrays))
        rows = {(r["round"], r["name"]): r for r in store.evaluations()}
        rounds = [r["eval_metrics"] for r in store.rounds()]
    assert not any(r == 0 for r, _ in rows)  # the model never changes: round 0 is not scored again
    for server_round in (1, 2):
        for rover in ("rover_0", "rover_1"):
            with_history, without = rows[(server_round, rover)], rows[(server_round, f"{rover}/no-history")]
            assert with_history["status"] == without["status"] == "ok"
            assert with_history["frames"] == without["frames"] >= 3  # one held-out segment or more, 3 frames each
            assert 0 < with_history["absrel"] and 0 < without["absrel"] and with_history["delta1"] is not None
        assert rows[(server_round, "rover_2")]["status"] == rows[(server_round, "rover_2/no-history")]["status"] \
            == "no_data"
        pooled, pooled_without = rows[(server_round, "rovers")], rows[(server_round, "rovers/no-history")]
        assert pooled["status"] == pooled_without["status"] == "ok"
        assert pooled["frames"] == rows[(server_round, "rover_0")]["frames"] + rows[(server_round, "rover_1")]["frames"]
    # the history changes the depth (the first held-out frame has none, the later ones do)
    assert any(abs(rows[(1, r)]["absrel"] - rows[(1, f"{r}/no-history")]["absrel"]) > 1e-6
               for r in ("rover_0", "rover_1"))
    assert rows[(1, "rover_0")]["absrel"] == pytest.approx(rows[(2, "rover_0")]["absrel"])  # same model, same frames
    assert rounds[0]["no-history-absrel"] == pytest.approx(rows[(1, "rovers/no-history")]["absrel"])
    graph = coordinator.strategy.graph.nbytes  # to each rover asked, with a small .npy header
    assert 3 * graph <= rounds[0]["bytes-down"] <= 3 * (graph + 256)
    # the rover with model-drop-dir hands the graph to its collab_node once (the same graph is not dropped again)
    dropped = sorted(drop.glob("global-r*.onnx"))
    assert [p.name for p in dropped] == ["global-r000001.onnx"]
    assert read_candidate(dropped[0]).meta["version"].startswith("iciia_autoencoder-")
    png = print_status(tmp_path / "c.db", plot=True)
    out = capsys.readouterr().out
    assert "rover_0/no-history" in out and "rovers (mean)/no-history" in out and png.is_file()


def test_a_bad_or_mismatched_module_is_refused_by_name(setup, tmp_path):
    from forest_perception.collab.flower.server_app import build_coordinator
    from forest_perception.models.iciia import IciiaFileError

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a module")
    with pytest.raises(IciiaFileError, match="junk.pt' is not readable"):
        build_coordinator(run_config(setup, tmp_path, **{"iciia-module": str(junk)}))
    raw = torch.load(setup["module"], weights_only=True)
    raw["base_version"] = "autoencoder-000000000000"
    torch.save(raw, tmp_path / "other_base.pt")
    with pytest.raises(IciiaFileError, match="was trained on autoencoder-000000000000, but .* is now autoencoder-"):
        build_coordinator(run_config(setup, tmp_path, **{"iciia-module": str(tmp_path / "other_base.pt")}))
    other = write_checkpoint(tmp_path / "other.pt", "autoencoder", {"base_channels": 4}, seed=7)
    with pytest.raises(ValueError, match=r"was trained on autoencoder-\w+, run config init .* is autoencoder-"):
        build_coordinator(run_config(setup, tmp_path, init=str(other)))
    with pytest.raises(ValueError, match="iciia-module belongs to algorithm iciia, not 'fedavg'"):
        build_coordinator(run_config(setup, tmp_path, algorithm="fedavg"))
    with pytest.raises(ValueError, match="algorithm iciia needs run config iciia-module"):
        build_coordinator(run_config(setup, tmp_path, **{"iciia-module": ""}))
    with pytest.raises(ValueError, match="leave input-height unset"):
        build_coordinator(run_config(setup, tmp_path, **{"input-height": 64}))


def test_a_rover_refuses_a_graph_of_another_module_and_the_round_goes_on(setup, tmp_path):
    from forest_perception.collab.flower.client_app import make_client_app
    from forest_perception.collab.flower.local_grid import LocalGrid
    from forest_perception.collab.flower.server_app import build_coordinator

    config = run_config(setup, tmp_path)
    coordinator = build_coordinator(config)
    coordinator.strategy.train_config["iciia-module-version"] = "iciia-000000000000"  # what another module would be
    records = coordinator.run(LocalGrid(make_client_app(config), 3, run_config=config))
    coordinator.store.close()
    entries = {e.name: e for e in records[0].evaluations}
    assert entries["rover_0"].status == "failed"
    assert "coordinator names iciia-000000000000" in entries["rover_0"].message
    assert setup["version"] in entries["rover_0"].message
    assert entries["rover_2"].status == "no_data" and entries["rovers"].status == "missing"
