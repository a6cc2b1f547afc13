"""Demo step: rovers record a forest no shipped network was trained on, then adapt the shipped network by FedAvg.

The adaptation path of ``experiments/adaptation.py`` at demo size: :func:`forest_perception.demo.swarm.record_swarm`
(sim_node with several rovers in a ``clustered_regrowth`` forest, capture_node per rover, extract + curate into
one dataset folder per rover), then ``forest-fl simulate --init autoencoder_160x128 --rover-data ...`` (the
ServerApp and ClientApps on Flower's Ray simulation, 127.0.0.1), and the global model scored on every rover's
held-out segments (the ClientApp's own split) before (round 0 = the shipped weights) and after.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DEMO_RUN_CONFIG: dict[str, Any] = {"algorithm": "fedavg", "init": "autoencoder_160x128", "lr": 0.0003,
                                   "local-epochs": 1, "batch-size": 8, "holdout-fraction": 0.25,
                                   "fraction-evaluate": 1.0, "max-norm": 0.0}
"""What the demo's swarm trains with (the experiment's settings); ``batchnorm`` auto: frozen, as ``init`` is set."""


def federated_swarm(out: Path, rovers: int = 3, rounds: int = 3, seconds: float = 20.0, seed: int = 11,
                    style: str = "clustered_regrowth", triggers: bool = True) -> dict[str, Any]:
    """Record ``rovers`` rovers for ``seconds`` simulated seconds (``triggers``: keeping at the source only the frames
    trigger_node marks), then ``rounds`` FedAvg rounds from the shipped weights; returns the recording, the
    simulation result and the pooled held-out score per round."""
    import torch

    from forest_perception.collab.flower.simulation import SimulationSpec, run_simulation
    from forest_perception.collab.flower.store import CoordinatorStore
    from forest_perception.collab.flower.task import (
        LocalData,
        NoDataError,
        TaskConfig,
        build_model,
        evaluate,
        load_local_data,
        merge_run_config,
        set_arrays,
    )
    from forest_perception.demo.swarm import SwarmRecording, record_swarm

    recording = record_swarm(SwarmRecording(seed=seed, style=style, rovers=rovers, seconds=seconds,
                                            segment_frames=10, triggers=triggers), out / "swarm", reuse=False)
    # the store lives in the demo's own (wiped) folder: the default "coordinator.db" is relative to the working folder
    run_config = merge_run_config(DEMO_RUN_CONFIG, {"num-server-rounds": rounds,
                                                    "state-db": str(out / "flower" / "coordinator.db")})
    result = run_simulation(SimulationSpec(out_dir=out / "flower", num_rovers=rovers, run_config=run_config,
                                           rover_data=[str(f) for f in recording.folders.values()],
                                           availability=(1.0, 1.0), client_cpus=1.0))
    task = TaskConfig.from_run_config(run_config)
    held, status = [], {}
    for name, folder in recording.folders.items():
        try:
            data: LocalData = load_local_data(folder, task)
        except NoDataError as exc:
            status[name] = f"no data: {exc}"
            continue
        status[name] = f"{data.num_train} training / {data.num_val} held-out frames"
        if not data.val_is_train:
            held.append((data.val_images, data.val_depth))
    accuracy = {}
    if held:
        images, depth = torch.cat([h[0] for h in held]), torch.cat([h[1] for h in held])
        model = build_model(task)
        with CoordinatorStore(result.state_db, readonly=True) as store:
            for server_round in range(0, result.rounds[-1]["round"] + 1):
                set_arrays(model, *store.model(server_round))
                accuracy[server_round] = evaluate(model, images, depth, task)
    return {"recording": recording, "result": result, "accuracy": accuracy, "status": status,
            "held_out_frames": int(sum(h[0].shape[0] for h in held)), "task": task, "run_config": run_config}


def export_last_round(state_db: Path, task: Any, out_onnx: Path, accuracy: dict[int, dict[str, float]]) -> Path:  # noqa: ANN401 - TaskConfig
    """The last round's global model of ``state_db`` as release files (ONNX, card, checkpoint) at ``out_onnx``."""
    from forest_perception.collab.flower.store import CoordinatorStore
    from forest_perception.collab.release.export import export_release_files

    with CoordinatorStore(state_db, readonly=True) as store:
        last = store.rounds()[-1]["round"]
        names, arrays = store.model(last)
    metrics = {k: float(v) for k, v in accuracy.get(last, {}).items() if k in ("absrel", "delta1", "rmse")}
    return export_release_files(names, arrays, task, out_onnx,
                                f"make demo: FedAvg round {last} of the swarm from autoencoder_160x128", metrics,
                                notes="scored on the rovers' held-out segments of the recorded forest")
