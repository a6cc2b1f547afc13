"""Federated learning on the real networks: an ``init`` checkpoint starts the run (a wrong one is refused naming
the mismatch), rovers read recorded dataset folders (an empty or broken one reports no data, nothing is written),
and every round scores the global model on each rover's held-out segments and a cloud test folder."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

HW = (48, 64)  # network input (height, width); frames are stored at 64x48 too
TINY_MULTISCALE = {"coarse_hidden": 16, "fine_channels": 8}


def write_segment(root: Path, run: int, segment: str, frames: int, seed: int) -> None:
    from forest_perception.dataset_tools.layout import FrameRecord, ImuSample, SegmentWriter

    rng = np.random.default_rng(seed)
    with SegmentWriter(root, run, segment) as writer:
        for i in range(frames):
            rgb = rng.integers(0, 256, (HW[0], HW[1], 3), dtype=np.uint8)
            depth = np.linspace(1.0, 6.0, HW[0] * HW[1], dtype=np.float32).reshape(HW) * (1 + 0.1 * (seed % 3))
            writer.write_frame(rgb, depth, FrameRecord(f"{i:06d}", 1.0 + i, ImuSample((0, 0, 0), (0, 0, 9.81))))


def write_checkpoint(path: Path, model: str = "multiscale", kwargs: dict | None = None, input_hw=HW,
                     normalisation: dict | None = None, state_from: dict | None = None, seed: int = 3) -> Path:
    """A checkpoint as forest-train / models.recover write them (model_state, model_name, model_kwargs, ...)."""
    from forest_perception.models.data import image_normalisation
    from forest_perception.models.networks import build_model

    kwargs = dict(TINY_MULTISCALE if kwargs is None and model == "multiscale" else kwargs or {})
    torch.manual_seed(seed)
    network = build_model(model, input_hw, **(state_from or kwargs))
    mean, std = image_normalisation()
    torch.save({"format": 1, "model_name": model, "model_kwargs": kwargs, "input_hw": list(input_hw),
                "normalisation": normalisation or {"mean": list(mean), "std": list(std)},
                "min_depth": 0.1, "max_depth": 10.0, "model_state": network.state_dict()}, path)
    return path


def tree_digest(root: Path) -> str:
    """Names, sizes, modification times and contents of everything under ``root``."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        stat = path.stat()
        digest.update(f"{path.relative_to(root)} {stat.st_size} {stat.st_mtime_ns}".encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Two recorded rovers (4 segments each), an empty rover folder, a broken one and a cloud test folder."""
    base = tmp_path_factory.mktemp("recorded")
    for r in range(2):
        for i, segment in enumerate("abcd"):
            write_segment(base / f"rover_{r}", 1 + i // 2, segment, 2, seed=10 * r + i)
    (base / "empty").mkdir()
    broken = base / "broken" / "Run-1" / "a"
    broken.mkdir(parents=True)
    (broken / "metadata.csv").write_bytes(b"\x00\xff not a csv\n")
    write_segment(base / "cloud", 1, "a", 3, seed=99)
    return {"base": base, "rover_0": base / "rover_0", "rover_1": base / "rover_1", "empty": base / "empty",
            "broken": base / "broken", "cloud": base / "cloud"}


# ---------------------------------------------------------------------------------------------- init checkpoints


def test_init_checkpoint_gives_the_network_its_size_and_weights(tmp_path):
    from forest_perception.collab.flower.network import architecture_from_run_config
    from forest_perception.collab.flower.task import TaskConfig, build_model, get_arrays, merge_run_config

    path = write_checkpoint(tmp_path / "tiny.pt")
    config = merge_run_config({"init": str(path)})
    arch, init = architecture_from_run_config(config)
    assert (arch.model, arch.input_hw) == ("multiscale", HW)
    assert arch.kwargs["coarse_hidden"] == 16 and arch.kwargs["fine_channels"] == 8
    state = torch.load(path, weights_only=True)["model_state"]
    for name, array in zip(init.names, init.arrays):
        np.testing.assert_array_equal(array, state[name].numpy())
    task = TaskConfig.from_run_config(config)
    names, arrays = get_arrays(build_model(task))
    assert names == init.names and [a.shape for a in arrays] == [a.shape for a in init.arrays]
    # keys that agree with the checkpoint are accepted
    assert architecture_from_run_config(merge_run_config(
        {"init": str(path), "model": "multiscale", "input-height": HW[0], "input-width": HW[1]}))[0] == arch


@pytest.mark.parametrize(("overrides", "message"), [
    ({"model": "autoencoder"}, r"model='autoencoder' but init .* is a multiscale network"),
    ({"input-width": 80}, r"input-width=80 but init .* runs at 64x48"),
    ({"model-kwargs": '{"fine_channels": 16}'}, r"fine_channels=16 but init .* built with fine_channels=8"),
    ({"base-channels": 8}, r"base-channels=8 sizes the auto-encoder; model 'multiscale' takes no base-channels"),
])
def test_init_refuses_run_config_that_names_another_network(tmp_path, overrides, message):
    from forest_perception.collab.flower.network import architecture_from_run_config
    from forest_perception.collab.flower.task import merge_run_config

    path = write_checkpoint(tmp_path / "tiny.pt")
    with pytest.raises(ValueError, match=message):
        architecture_from_run_config(merge_run_config({"init": str(path), **overrides}))


def test_init_refuses_a_wrong_checkpoint_naming_the_mismatch(tmp_path):
    from forest_perception.collab.flower.network import read_init

    other = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    with pytest.raises(ValueError, match=r"normalised with mean \[0.5, 0.5, 0.5\].*the federated task feeds mean"):
        read_init(str(write_checkpoint(tmp_path / "norm.pt", normalisation=other)))
    # weights of another shape than the network its config names
    shape = write_checkpoint(tmp_path / "shape.pt", state_from={"coarse_hidden": 16, "fine_channels": 16})
    with pytest.raises(ValueError, match=r"cannot rebuild 'multiscale'.*size mismatch"):
        read_init(str(shape))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a forest-train checkpoint"):
        read_init(str(garbage))
    with pytest.raises(FileNotFoundError, match="'no_such_net' is neither a file nor a shipped network"):
        read_init("no_such_net")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_init(str(tmp_path / "missing.pt"))


def test_a_store_started_from_other_weights_is_not_resumed(tmp_path):
    """Same network, other starting weights (a newly shipped model): the old run's store is refused by name."""
    from forest_perception.collab.flower.server_app import build_coordinator
    from forest_perception.collab.flower.task import merge_run_config

    def coordinator(init: Path):
        return build_coordinator(merge_run_config({"init": str(init), "state-db": str(tmp_path / "c.db")}))

    first = write_checkpoint(tmp_path / "first.pt", seed=3)
    coordinator(first).store.close()
    coordinator(first).store.close()  # the same weights resume
    with pytest.raises(ValueError, match=r"holds a run with init-sha256='[0-9a-f]{16}', this run has init-sha256="):
        coordinator(write_checkpoint(tmp_path / "second.pt", seed=4))


def test_forest_fl_refuses_a_wrong_init_in_one_line_before_making_data(tmp_path, capsys):
    from forest_perception.collab.flower.cli import main

    path = write_checkpoint(tmp_path / "tiny.pt")
    out = tmp_path / "out"
    code = main(["simulate", "--out", str(out), "--rovers", "2", "--init", str(path), "--set", "input-width=80"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("forest-fl simulate: error:") and "input-width=80 but init" in err[0]
    assert not (out / "rovers").exists()


# ---------------------------------------------------------------------------------------------- the run


def test_rounds_from_init_on_recorded_rovers_evaluate_every_round(data, tmp_path, capsys):
    from forest_perception.collab.flower.cli import print_status
    from forest_perception.collab.flower.client_app import make_client_app
    from forest_perception.collab.flower.curves import curves_path
    from forest_perception.collab.flower.local_grid import LocalGrid
    from forest_perception.collab.flower.network import read_init
    from forest_perception.collab.flower.population import recorded_population
    from forest_perception.collab.flower.server_app import CloudTest, build_coordinator
    from forest_perception.collab.flower.store import CoordinatorStore
    from forest_perception.collab.flower.task import merge_run_config

    before = tree_digest(data["base"])
    init = write_checkpoint(tmp_path / "tiny.pt")
    folders = [data["rover_0"], data["rover_1"], data["empty"], data["broken"]]
    population = recorded_population(folders)
    assert [r.rover_id for r in population.rovers] == ["rover_0", "rover_1", "empty", "broken"]
    config = merge_run_config({
        "population": str(population.save(tmp_path / "population.json")), "state-db": str(tmp_path / "c.db"),
        "init": str(init), "cloud-test": str(data["cloud"]), "num-server-rounds": 2, "local-steps": 1,
        "holdout-fraction": 0.3,
    })
    coordinator = build_coordinator(config)
    records = coordinator.run(LocalGrid(make_client_app(config), len(population), run_config=config))
    coordinator.store.close()

    status = {(e.rover_id, e.status, e.reason) for e in records[0].entries}
    assert status == {("rover_0", "accepted", ""), ("rover_1", "accepted", ""),
                      ("empty", "failed", "no_data"), ("broken", "failed", "no_data")}
    with CoordinatorStore(tmp_path / "c.db", readonly=True) as store:
        rows = store.evaluations()
        # round 0 is the init checkpoint itself
        checkpoint = read_init(str(init))
        for got, want in zip(store.model(0)[1], checkpoint.arrays):
            np.testing.assert_array_equal(got, want)
        identity = store.identity
    assert identity["model"] == "multiscale" and identity["input"] == "64x48"
    by = {(r["round"], r["name"]): r for r in rows}
    assert {r for r, _ in by} == {0, 1, 2}
    for server_round in (0, 1, 2):
        for rover in ("rover_0", "rover_1"):
            row = by[(server_round, rover)]
            assert row["status"] == "ok" and row["frames"] > 0 and 0 <= row["delta1"] <= 1 and row["absrel"] > 0
        assert by[(server_round, "empty")]["status"] == "no_data"
        assert by[(server_round, "broken")]["status"] == "no_data"
        mean = by[(server_round, "rovers")]
        assert mean["frames"] == by[(server_round, "rover_0")]["frames"] + by[(server_round, "rover_1")]["frames"]
        weighted = sum(by[(server_round, r)]["absrel"] * by[(server_round, r)]["frames"]
                       for r in ("rover_0", "rover_1")) / mean["frames"]
        assert mean["absrel"] == pytest.approx(weighted)
        assert by[(server_round, "cloud")]["frames"] == 3
    # the cloud test of round 0 is the checkpoint's score on the cloud folder
    task = coordinator.settings.task
    fresh = CloudTest(str(data["cloud"]), task).evaluate(checkpoint.names, checkpoint.arrays)
    assert by[(0, "cloud")]["absrel"] == pytest.approx(fresh.metrics["absrel"])
    assert by[(2, "cloud")]["absrel"] != pytest.approx(by[(0, "cloud")]["absrel"])  # the model changed
    assert records[-1].eval_metrics["cloud-absrel"] == pytest.approx(by[(2, "cloud")]["absrel"])

    png = print_status(tmp_path / "c.db", plot=True)
    out = capsys.readouterr().out
    assert png == curves_path(tmp_path / "c.db") and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "federated evaluation of the global model" in out and "cloud test" in out and "rovers (mean)" in out
    assert "no_data" in out and "empty" in out
    assert tree_digest(data["base"]) == before, "an input folder was modified"


def test_rover_data_run_config_maps_partitions_to_folders(data, tmp_path):
    """The ``rover-data`` run-config key (what `flwr run` gets): partition i trains on folder i's training segments."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    from forest_perception.collab.flower.client_app import make_client_app
    from forest_perception.collab.flower.local_grid import LocalGrid
    from forest_perception.collab.flower.messages import ARRAYS_KEY, CONFIG_KEY, arrays_to_record, reply_status
    from forest_perception.collab.flower.task import TaskConfig, initial_arrays, merge_run_config

    folders = [data["rover_1"], data["empty"], data["rover_0"]]
    config = merge_run_config({"rover-data": ":".join(str(f) for f in folders), "input-height": HW[0],
                               "input-width": HW[1], "local-steps": 1})
    task = TaskConfig.from_run_config(config)
    names, arrays = initial_arrays(task)
    grid = LocalGrid(make_client_app(), len(folders), run_config=config)
    nodes = grid.get_node_ids()
    messages = [Message(content=RecordDict({ARRAYS_KEY: arrays_to_record(names, arrays), CONFIG_KEY: ConfigRecord(
        {"server-round": 1, **task.run_config()})}), message_type=MessageType.TRAIN, dst_node_id=n) for n in nodes]
    replies = {m.metadata.src_node_id: m for m in grid.send_and_receive(messages)}
    got = [replies[n].content.config_records["meta"]["rover-id"] for n in nodes]
    assert got == ["rover_1", "empty", "rover_0"]
    assert reply_status(replies[nodes[1]].content)[0] == "no-data"
    assert "holds no frames" in reply_status(replies[nodes[1]].content)[1]
    for n in (nodes[0], nodes[2]):
        assert reply_status(replies[n].content)[0] == "ok"
        assert replies[n].content["metrics"]["num-examples"] > 0


def test_deployed_supernode_names_its_own_folder_in_node_config_rover_data(data):
    """A deployed SuperNode's node config ``rover-data`` (one folder) wins over the run config's list."""
    from flwr.app import Context, RecordDict

    from forest_perception.collab.flower.client_app import resolve_rover

    def context(node: dict) -> Context:
        return Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={})

    run_config = {"rover-data": f"{data['rover_0']}:{data['rover_1']}"}
    own = resolve_rover(context({"partition-id": 3, "rover-data": str(data["rover_1"])}), run_config)
    assert (own.rover_id, own.data_dir) == ("rover_1", str(data["rover_1"]))
    named = resolve_rover(context({"rover-data": str(data["rover_0"]), "rover-id": "r7"}), {})
    assert (named.rover_id, named.data_dir) == ("r7", str(data["rover_0"]))
    assert resolve_rover(context({"partition-id": 1}), run_config).data_dir == str(data["rover_1"])
    with pytest.raises(ValueError, match="rover-data names 2 folders: the node config needs a partition-id"):
        resolve_rover(context({}), run_config)


def test_fed_influence_through_the_real_clientapp_and_quarantine(data, tmp_path, capsys):
    from forest_perception.collab.flower.client_app import make_client_app
    from forest_perception.collab.flower.local_grid import LocalGrid
    from forest_perception.collab.flower.population import recorded_population
    from forest_perception.collab.flower.server_app import build_coordinator
    from forest_perception.collab.flower.store import CoordinatorStore
    from forest_perception.collab.flower.task import merge_run_config

    init = write_checkpoint(tmp_path / "tiny.pt")
    population = recorded_population([data["rover_0"], data["rover_1"]])
    base = {"population": str(population.save(tmp_path / "population.json")), "init": str(init),
            "num-server-rounds": 3, "local-steps": 2, "holdout-fraction": 0.3, "evaluate-every": 0,
            "influence": True, "lr": 0.01, "optimizer": "sgd"}
    config = merge_run_config({**base, "state-db": str(tmp_path / "c.db")})
    coordinator = build_coordinator(config)
    grid = LocalGrid(make_client_app(config), 2, run_config=config)
    coordinator.run(grid, num_rounds=2)
    coordinator.store.close()
    # resumed for round 3: the estimate continues from the stored state
    coordinator = build_coordinator(config)
    records = coordinator.run(grid)
    coordinator.store.close()
    assert [r.server_round for r in records] == [3]
    strategy = coordinator.strategy
    assert strategy.influence_complete and strategy.influence.rounds == 3
    assert strategy.influence.rovers == ["rover_0", "rover_1"]
    for rover in ("rover_0", "rover_1"):
        influence = strategy.influence.influence(rover)
        assert [i.shape for i in influence] == [p.shape for p in strategy.params]
        assert all(np.isfinite(i).all() for i in influence) and any(np.abs(i).max() > 0 for i in influence)
    with CoordinatorStore(tmp_path / "c.db", readonly=True) as store:
        assert store.identity["influence"] == "on"
        state = store.latest()[3]
    assert sorted(state["influence"]["influence"]) == ["rover_0", "rover_1"]
    # forest-fl influence: the ranking on a test folder (the estimated effect is grad L . influence) and a plot
    from forest_perception.collab.flower import cli
    from forest_perception.collab.flower.influence_report import folder_loss_gradient, influence_report

    assert cli.main(["influence", "--db", str(tmp_path / "c.db"), "--test", str(data["cloud"])]) == 0
    out = capsys.readouterr().out
    assert "rover_0" in out and "rover_1" in out and "plot:" in out
    rows, png, complete = influence_report(tmp_path / "c.db", str(data["cloud"]))
    assert complete and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert rows[0].loss_change <= rows[1].loss_change
    grad = folder_loss_gradient(strategy.names, strategy.params, coordinator.settings.task, str(data["cloud"]))
    want = sum(float(np.sum(g * i)) for g, i in zip(grad, strategy.influence.influence(rows[0].rover)))
    assert rows[0].loss_change == pytest.approx(want, rel=1e-5, abs=1e-9)
    assert cli.main(["influence", "--db", str(tmp_path / "c.db"), "--test", str(data["empty"])]) == 2
    assert "--test" in capsys.readouterr().err
    # a store without the estimate is not resumed by a run that tracks it
    plain = merge_run_config({**base, "influence": False, "state-db": str(tmp_path / "plain.db")})
    build_coordinator(plain).store.close()
    with pytest.raises(ValueError, match="influence"):
        build_coordinator(merge_run_config({**base, "state-db": str(tmp_path / "plain.db")})).start()
    assert cli.main(["influence", "--db", str(tmp_path / "plain.db")]) == 2
    assert "no round yet" in capsys.readouterr().err
    with pytest.raises(ValueError, match="algorithm is 'fedlaavg'"):
        build_coordinator(merge_run_config({**base, "algorithm": "fedlaavg", "state-db": str(tmp_path / "x.db")}))
    # quarantine: the rover is never asked
    held = merge_run_config({**base, "influence": False, "quarantine": "rover_1", "num-server-rounds": 1,
                             "state-db": str(tmp_path / "q.db")})
    coordinator = build_coordinator(held)
    records = coordinator.run(LocalGrid(make_client_app(held), 2, run_config=held))
    coordinator.store.close()
    assert records[0].selected == ["rover_0"]


# ---------------------------------------------------------------------------------------------- SCAFFOLD


def test_scaffold_local_round_keeps_the_mean_raw_gradient_and_steps_with_the_correction(data, tmp_path):
    from forest_perception.collab.flower.network import read_init
    from forest_perception.collab.flower.task import TaskConfig, load_local_data, local_round, merge_run_config

    init = read_init(str(write_checkpoint(tmp_path / "tiny.pt")))
    task = TaskConfig.from_run_config(merge_run_config({"init": str(tmp_path / "tiny.pt"), "local-steps": 2,
                                                        "optimizer": "sgd", "lr": 0.01}))
    rover = load_local_data(data["rover_0"], task)
    plain = local_round(init.names, init.arrays, rover, task, seed=5)
    first = local_round(init.names, init.arrays, rover, task, seed=5, scaffold=True)
    assert plain.control is None
    # no correction yet: the same steps as plain training, and a control for every trained tensor
    for a, b in zip(plain.deltas, first.deltas):
        np.testing.assert_allclose(a, b, atol=1e-6)
    trained = [n for n in init.names if "running_" not in n and "num_batches" not in n]
    assert sorted(first.control) == sorted(trained)
    assert all(np.all(np.isfinite(c)) and c.dtype == np.float32 for c in first.control.values())
    # SGD with a constant correction g: every step moves each weight by a further -lr * g
    shift = {n: np.full(c.shape, 0.5, np.float32) for n, c in first.control.items()}
    corrected = local_round(init.names, init.arrays, rover, task, seed=5, scaffold=True, correction=shift)
    index = init.names.index(trained[0])
    moved = corrected.deltas[index] - first.deltas[index]
    assert float(np.abs(moved).max()) > 1e-4  # the correction changed the local steps
    with pytest.raises(ValueError, match="does not train"):
        local_round(init.names, init.arrays, rover, task, scaffold=True, correction={"no.such": np.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        local_round(init.names, init.arrays, rover, task, scaffold=True,
                    correction={trained[0]: np.zeros(1, np.float32)})


def test_scaffold_rounds_through_the_real_clientapp_keep_every_rovers_control(data, tmp_path):
    from forest_perception.collab.flower.client_app import make_client_app
    from forest_perception.collab.flower.local_grid import LocalGrid
    from forest_perception.collab.flower.population import recorded_population
    from forest_perception.collab.flower.server_app import build_coordinator
    from forest_perception.collab.flower.task import merge_run_config

    init = write_checkpoint(tmp_path / "tiny.pt")
    population = recorded_population([data["rover_0"], data["rover_1"], data["empty"]])
    config = merge_run_config({
        "population": str(population.save(tmp_path / "population.json")), "state-db": str(tmp_path / "c.db"),
        "init": str(init), "num-server-rounds": 2, "local-steps": 2, "algorithm": "scaffold",
    })
    coordinator = build_coordinator(config)
    records = coordinator.run(LocalGrid(make_client_app(config), len(population), run_config=config))
    coordinator.store.close()
    for record in records:
        status = {(e.rover_id, e.status, e.reason) for e in record.entries}
        assert status == {("rover_0", "accepted", ""), ("rover_1", "accepted", ""), ("empty", "failed", "no_data")}
    server = coordinator.strategy.server
    assert server.num_controls == 2 and server.control("empty") is None
    down = [{e.rover_id: e.bytes_down for e in r.entries} for r in records]
    up = [{e.rover_id: e.bytes_up for e in r.entries} for r in records]
    model_bytes = sum(a.nbytes for a in server.params)
    # round 2 carries each rover's correction: about one model more down; every reply carries a control
    assert down[1]["rover_0"] - down[0]["rover_0"] > 0.9 * model_bytes
    assert up[0]["rover_0"] > 1.9 * model_bytes
