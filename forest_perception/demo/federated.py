"""Demo step: a swarm of simulated rovers through FedAvg rounds on Flower's Ray simulation (127.0.0.1)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def federated_swarm(out: Path, rovers: int = 3, rounds: int = 4, frames: int = 24) -> dict[str, Any]:
    """``rovers`` simulated rovers (own forest and weather) through FedAvg rounds; the global depth
    model's accuracy on a held-out forest before and after."""
    import torch

    from forest_perception.collab.flower.population import make_population
    from forest_perception.collab.flower.rover_data import ensure_rover_data
    from forest_perception.collab.flower.simulation import SimulationSpec, run_simulation
    from forest_perception.collab.flower.store import CoordinatorStore
    from forest_perception.collab.flower.task import (
        TaskConfig,
        build_model,
        evaluate,
        load_local_data,
        merge_run_config,
        set_arrays,
    )

    run_config = {"num-server-rounds": rounds, "algorithm": "fedavg", "base-channels": 8, "local-epochs": 2,
                  "lr": 0.003, "input-height": 64, "input-width": 80, "fraction-evaluate": 1.0}
    spec = SimulationSpec(out_dir=out, num_rovers=rovers, run_config=run_config, frames_per_rover=frames,
                          data_source="synth", availability=(1.0, 1.0), client_cpus=1.0)
    result = run_simulation(spec)
    # a held-out rover in a forest none of the swarm drove in
    held_out = make_population(1, out / "held_out", seed=99, frames=frames, availability=(1.0, 1.0))
    ensure_rover_data(held_out.rovers[0], 80, 64, "synth")
    config = TaskConfig.from_run_config(merge_run_config(run_config))
    data = load_local_data(held_out.rovers[0].data_dir, config)
    images = torch.cat([data.train_images, data.val_images]) if not data.val_is_train else data.train_images
    depth = torch.cat([data.train_depth, data.val_depth]) if not data.val_is_train else data.train_depth
    model = build_model(config)
    accuracy = {}
    with CoordinatorStore(result.state_db, readonly=True) as store, torch.no_grad():
        for label, server_round in (("before", 0), ("after", result.rounds[-1]["round"])):
            names, params = store.model(server_round)
            set_arrays(model, names, params)
            accuracy[label] = evaluate(model, images, depth, config)
    return {"result": result, "accuracy": accuracy, "held_out_frames": int(images.shape[0])}
