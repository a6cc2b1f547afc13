"""Federated figures on this machine: per algorithm, wall time per round and bytes per rover per round; then
100 simulated rovers x 10 rounds with the small network. Every run is a real Ray simulation of the coordinator
ServerApp and the rover ClientApps (forest_perception.collab.flower.simulation.run_simulation), all on 127.0.0.1.

    .venv/bin/python bench/bench_federated.py                 # all algorithms, then 100 x 10
    .venv/bin/python bench/bench_federated.py --skip-swarm --algorithms fedavg fedlaavg --rounds 4

Round 1 includes starting Ray's actors (Python + torch import) and asking every node who it is;
the "steady" figure is the mean over the later rounds.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

from forest_perception.collab.flower.simulation import SimulationSpec, run_simulation
from forest_perception.collab.flower.strategies import ALGORITHMS


def run(out: Path, rovers: int, rounds: int, algorithm: str, client_cpus: float, data_root: Path,
        extra: dict | None = None) -> tuple[object, float]:
    config = {"algorithm": algorithm, "num-server-rounds": rounds, "fraction-evaluate": 0.0, **(extra or {})}
    spec = SimulationSpec(out_dir=out, num_rovers=rovers, run_config=config, frames_per_rover=8,
                          data_size=(64, 80), data_root=data_root, availability=(0.6, 1.0),
                          decoder_fraction=0.3 if algorithm == "fedsubavg" else 0.0, client_cpus=client_cpus)
    start = time.perf_counter()
    result = run_simulation(spec)
    return result, time.perf_counter() - start


def per_rover(result: object) -> tuple[float, float]:
    """Mean KiB sent to each selected rover and received from each replying rover, per round."""
    from forest_perception.collab.flower.store import CoordinatorStore

    with CoordinatorStore(result.state_db, readonly=True) as store:
        updates = store.updates()
    down = [u["bytes_down"] for u in updates if u["chain"] == "mixed"]
    up = [u["bytes_up"] for u in updates if u["chain"] == "mixed" and u["status"] in ("accepted", "rejected")]
    return statistics.mean(down) / 1024, statistics.mean(up) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    parser.add_argument("--rovers", type=int, default=10, help="rovers per algorithm run")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per algorithm run")
    parser.add_argument("--client-cpus", type=float, default=1.0)
    parser.add_argument("--swarm", type=int, default=100, help="rovers of the swarm run")
    parser.add_argument("--swarm-rounds", type=int, default=10)
    parser.add_argument("--swarm-client-cpus", type=float, default=0.5)
    parser.add_argument("--skip-swarm", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="keep runs here (default: a temporary folder)")
    args = parser.parse_args()
    logging.getLogger("forest_perception.collab").setLevel(logging.ERROR)  # refusals and round lines: in the store

    tmp = tempfile.TemporaryDirectory(prefix="bench-fl-")
    root = args.out or Path(tmp.name)
    data_root = root / "rovers"
    rows = []
    for algorithm in args.algorithms:
        extra = {"trim-fraction": 0.2} if algorithm == "robust" else {}
        result, total = run(root / algorithm, args.rovers, args.rounds, algorithm, args.client_cpus, data_root, extra)
        rounds = result.rounds
        steady = [r["wall_s"] for r in rounds[1:]] or [rounds[0]["wall_s"]]
        down, up = per_rover(result)
        last = rounds[-1]["train_metrics"]
        rows.append((algorithm, statistics.mean(r["num_selected"] for r in rounds), rounds[0]["wall_s"],
                     statistics.mean(steady), down, up, last.get("train-loss"), total))
    print(f"\nper algorithm: {args.rovers} virtual rovers, {args.rounds} rounds, auto-encoder base-channels 4 "
          f"(28,625 travelling values), 64x80 input, 8 frames per rover, {args.client_cpus} CPU per ClientApp actor")
    print("| algorithm | rovers/round | round 1 s | steady s/round | KiB down/rover/round | KiB up/rover/round "
          "| last train-loss | run s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for algorithm, selected, first, steady, down, up, loss, total in rows:
        print(f"| {algorithm} | {selected:.1f} | {first:.1f} | {steady:.2f} | {down:.1f} | {up:.1f} | "
              f"{loss if loss is None else f'{loss:.3f}'} | {total:.1f} |")

    if not args.skip_swarm:
        result, total = run(root / "swarm", args.swarm, args.swarm_rounds, "fedavg", args.swarm_client_cpus,
                            data_root)
        rounds = result.rounds
        down, up = per_rover(result)
        trained = sum(r["num_accepted"] for r in rounds)
        print(f"\nswarm: {args.swarm} virtual rovers x {args.swarm_rounds} rounds (fedavg, availability 0.6-1.0, "
              f"{args.swarm_client_cpus} CPU per actor on 2 cores)")
        print(f"  total {total:.1f} s (data {result.data_s:.1f} s, simulation {result.wall_s:.1f} s); "
              f"{trained} rover trainings; round 1 {rounds[0]['wall_s']:.1f} s, later rounds "
              f"{statistics.mean(r['wall_s'] for r in rounds[1:]):.1f} s each on average; "
              f"{down:.1f} KiB down and {up:.1f} KiB up per rover per round")
    tmp.cleanup()


if __name__ == "__main__":
    main()
