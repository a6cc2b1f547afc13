"""One hold-out split: the segments a rover's Flower ClientApp trains on and the segments collab_node's gate holds
out are disjoint and together cover the rover's recordings, for the same folder and settings."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import tomllib

from forest_perception.collab.rover import holdout_split, rover_split

HW = (32, 48)


def write_segment(root: Path, run: int, segment: str, frames: int, seed: int = 0) -> None:
    from forest_perception.dataset_tools.layout import FrameRecord, ImuSample, SegmentWriter

    rng = np.random.default_rng(seed)
    with SegmentWriter(root, run, segment) as writer:
        for i in range(frames):
            rgb = rng.integers(0, 256, (HW[0], HW[1], 3), dtype=np.uint8)
            depth = np.full(HW, 2.0 + seed % 5, np.float32)
            writer.write_frame(rgb, depth, FrameRecord(f"{i:06d}", 1.0 + i, ImuSample((0, 0, 0), (0, 0, 9.81))))


@pytest.fixture(scope="module")
def recordings(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    """A rover's folder: 7 segments over three runs with 1-4 frames, an empty one and an unreadable one."""
    root = tmp_path_factory.mktemp("rover") / "rover_7"
    layout = {(1, "a"): 3, (1, "b"): 2, (1, "c"): 4, (2, "a"): 1, (2, "b"): 3, (3, "a"): 2, (3, "b"): 2}
    for i, ((run, name), frames) in enumerate(layout.items()):
        write_segment(root, run, name, frames, seed=i)
    write_segment(root, 3, "c", 0)  # a segment the recorder opened and never wrote into
    broken = root / "Run-4" / "a"
    broken.mkdir(parents=True)
    (broken / "metadata.csv").write_bytes(b"\x00\xff not a csv header\n")
    return root, {f"{run}{name}": n for (run, name), n in layout.items()}


def test_rover_split_is_disjoint_covering_deterministic_and_stable():
    frames = {f"{r}{s}": 3 for r in range(1, 6) for s in "abcd"} | {"9z": 0}
    train, held = rover_split(frames, 0.3, seed=5)
    assert not set(train) & set(held) and set(train) | set(held) == set(frames) - {"9z"}
    assert (train, held) == rover_split(dict(reversed(frames.items())), 0.3, seed=5)  # order does not matter
    assert (train, held) == holdout_split([s for s, n in frames.items() if n], 0.3, 5)
    grown = rover_split({**frames, "7a": 2, "7b": 5}, 0.3, seed=5)[1]
    assert set(held) <= set(grown)  # a new segment never moves an old one
    assert rover_split({"1a": 4}, 0.3) == (["1a"], [])  # one segment: nothing to hold out
    with pytest.raises(ValueError, match="holdout fraction"):
        rover_split(frames, 1.0)


@pytest.mark.parametrize(("fraction", "seed"), [(0.2, 0), (0.45, 3), (0.7, 11)])
def test_the_clientapp_trains_only_on_what_the_gate_does_not_hold_out(recordings, tmp_path, monkeypatch, fraction,
                                                                     seed):
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    from forest_perception.collab.flower import client_app
    from forest_perception.collab.flower.client_app import make_client_app
    from forest_perception.collab.flower.local_grid import LocalGrid
    from forest_perception.collab.flower.messages import ARRAYS_KEY, CONFIG_KEY, arrays_to_record
    from forest_perception.collab.flower.task import TaskConfig, initial_arrays, merge_run_config
    from forest_perception.collab.rover import settings
    from forest_perception.collab.rover.agent import CollabAgent

    root, frames = recordings
    # collab_node's parameters as the node declares them (its defaults), with this case's split
    p = {"dataset_dir": str(root), "models_dir": str(tmp_path / "deployed"), "model_source": str(tmp_path / "drop"),
         "depth_node": "depth_node", "holdout_fraction": fraction, "holdout_seed": seed, "max_holdout_frames": 200,
         "gate_tolerance_absrel": 0.0, "gate_tolerance_delta1": 0.01, "gate_max_absrel": 1.0,
         "gate_confidence": 0.9,
         "onnx_exporter": "torchscript", "keep_refused": 3, "keep_accepted": 5, "train_only_when_idle": True,
         "idle_speed_mps": 0.05, "idle_seconds": 10.0, "odom_timeout_s": 1.0, "auto_train_min_new_frames": 0,
         "model": "autoencoder", "base_channels": 4, "input_height": HW[0], "input_width": HW[1],
         "min_depth_m": 0.1, "max_depth_m": 10.0, "batch_size": 4, "local_epochs": 1, "local_steps": 1, "lr": 1e-3,
         "max_train_frames": 2000, "torch_threads": 1, "restore_on_start": True, "service_timeout_s": 1.0,
         "superlink_address": "127.0.0.1:8000", "root_certificates": str(tmp_path / "ca.crt"),
         "auth_private_key": str(tmp_path / "rovers" / "rover_7" / "auth.key"), "rover_id": "",
         "supernode_executable": "flower-supernode", "supernode_log": ""}

    # the gate's held-out segments
    agent = CollabAgent(p, lambda: "", lambda path: (True, ""), logging.getLogger("test"))
    agent.poll()
    holdout, _, _ = agent._holdout()
    gate_held = holdout.segment_ids

    # the node config collab_node gives its SuperNode, and a run config that says otherwise
    settings.supernode_launch(p, "rover_7")
    node_config = tomllib.loads((Path(settings.supernode_log(p)).parent / "node_config.toml").read_text())
    assert node_config["data-dir"] == str(root.resolve()) and node_config["holdout-fraction"] == fraction
    run_config = merge_run_config({"input-height": HW[0], "input-width": HW[1], "holdout-fraction": 0.5,
                                   "holdout-seed": 99, "local-steps": 1})

    loaded = []
    real_load = client_app.load_local_data

    def recording_load(data_dir, task):  # noqa: ANN001, ANN202 - spies on the ClientApp's data
        data = real_load(data_dir, task)
        loaded.append(data)
        return data

    monkeypatch.setattr(client_app, "load_local_data", recording_load)
    grid = LocalGrid(make_client_app(), 1, run_config=run_config, node_configs=[node_config])
    task = TaskConfig.from_run_config(run_config)
    names, arrays = initial_arrays(task)
    content = RecordDict({ARRAYS_KEY: arrays_to_record(names, arrays),
                          CONFIG_KEY: ConfigRecord({"server-round": 1, **task.run_config()})})
    reply = next(iter(grid.send_and_receive([Message(content=content, message_type=MessageType.TRAIN,
                                                     dst_node_id=1001)])))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    data = loaded[-1]
    trained, held = data.train_segments, data.holdout_segments

    assert not set(trained) & set(gate_held), "the ClientApp trained on segments the gate holds out"
    assert set(trained) | set(gate_held) == set(frames), "the two sides do not cover the rover's recordings"
    assert held == gate_held  # the ClientApp's federated evaluation scores the gate's frames
    assert data.num_train == sum(frames[s] for s in trained)  # every training frame, none held out
    assert data.num_val == len(holdout) == sum(frames[s] for s in gate_held)
    assert reply.content["metrics"]["num-examples"] == data.num_train
