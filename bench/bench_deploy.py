"""A deployed federated round's overhead: Flower's subprocess ClientApps vs the warm ClientApp worker, same run.

Each mode gets its own deployment on 127.0.0.1 (collab.deploy.local.LocalDeployment, as ``forest-fl deploy
--virtual-rovers N --rounds R`` runs it: SuperLink + one SuperNode per rover, TLS, SuperNode authentication) on the
same certificates and the same virtual rovers' recordings; the modes run one after the other (``--repeat`` runs
the sequence again), so both see about the same load. Per round it prints the round's wall time from the
coordinator store (train + evaluate stage, aggregation, commit), the training time the rovers' ClientApps report
(``train-s`` in each update's metrics: the local optimiser loop; the rovers train side by side, so the round
waits for the slowest: ``max``) and overhead = wall - max training. Per run: start (SuperLink healthy, keys
registered, SuperNodes online), ``flwr run`` wall, and what came before round 1 (ServerApp start, FAB, identity
queries, round 0's evaluation).

    .venv/bin/python bench/bench_deploy.py                       # 3 rovers, 2 rounds, subprocess then warm
    .venv/bin/python bench/bench_deploy.py --rounds 3 --modes warm subprocess --repeat 2 --out /tmp/bd
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from forest_perception.collab.deploy.certs import make_deployment_certs
from forest_perception.collab.deploy.local import DeploySpec, LocalDeployment
from forest_perception.collab.deploy.supernode import CLIENTAPP_MODES, SUBPROCESS, WARM, RoverNode
from forest_perception.collab.flower.population import make_population
from forest_perception.collab.flower.rover_data import ensure_rover_data


def run_mode(mode: str, out: Path, certs: Path, rovers: list[RoverNode], rounds: int, run_config: dict) -> dict:
    """One deployment in ``mode``: start it, run ``rounds`` rounds, stop it; times and the store's rounds."""
    spec = DeploySpec(run_dir=out, certs_dir=certs, rovers=rovers, clientapp=mode, start_timeout=300.0,
                      run_config={**run_config, "num-server-rounds": rounds})
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    with LocalDeployment(spec) as deployment:
        started = time.perf_counter() - start
        result = deployment.run(timeout=3600.0)
    rows = []
    for record in result.rounds:
        trained = [float(u["metrics"].get("train-s", 0.0)) for u in result.updates
                   if u["round"] == record["round"] and u["status"] == "accepted"]
        slowest = max(trained) if trained else 0.0
        rows.append({"round": record["round"], "wall": record["wall_s"], "train_max": slowest,
                     "train_sum": sum(trained), "rovers": len(trained), "overhead": record["wall_s"] - slowest})
    return {"mode": mode, "start": started, "run": result.wall_s, "rounds": rows,
            "before_round_1": result.wall_s - sum(r["wall"] for r in rows), "load": (load_before, os.getloadavg()[0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rovers", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=[SUBPROCESS, WARM], choices=CLIENTAPP_MODES)
    parser.add_argument("--repeat", type=int, default=1, help="run the modes' sequence this many times")
    parser.add_argument("--frames", type=int, default=4, help="frames per virtual rover")
    parser.add_argument("--local-steps", type=int, default=0, help="optimiser steps per round (0: one epoch)")
    parser.add_argument("--out", type=Path, default=None, help="keep runs here (default: a temporary folder)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_deploy_") as scratch:
        out = (args.out or Path(scratch)).resolve()
        ids = [f"rover_{i:03d}" for i in range(args.rovers)]
        certs = make_deployment_certs(out / "certs", ids).root
        population = make_population(args.rovers, out / "rovers", frames=args.frames, availability=(1.0, 1.0))
        rovers = []
        for rover in population.rovers:
            ensure_rover_data(rover, 64, 48)
            rovers.append(RoverNode(rover.rover_id, rover.data_dir))
        # forest-fl deploy's defaults: the small auto-encoder at 64x48
        run_config = {"input-height": 48, "input-width": 64, "local-steps": args.local_steps}
        results = []
        for repeat in range(args.repeat):
            for mode in args.modes:
                print(f"-- {mode} (repeat {repeat + 1}/{args.repeat}) ...", flush=True)
                results.append(run_mode(mode, out / f"{mode}_{repeat}", certs, rovers, args.rounds, run_config))

        print(f"\n{args.rovers} rovers on 127.0.0.1 (TLS, SuperNode authentication), {args.rounds} rounds, "
              f"{args.frames} frames per rover, {os.cpu_count()} CPUs")
        print(f"{'mode':<11}{'round':>6}{'wall s':>9}{'train s (max)':>15}{'train s (sum)':>15}{'overhead s':>12}")
        for result in results:
            for row in result["rounds"]:
                print(f"{result['mode']:<11}{row['round']:>6}{row['wall']:>9.1f}{row['train_max']:>15.2f}"
                      f"{row['train_sum']:>15.2f}{row['overhead']:>12.1f}")
        print(f"\n{'mode':<11}{'start s':>9}{'flwr run s':>12}{'before round 1 s':>18}{'mean overhead s':>17}"
              f"{'load (1 min) before/after':>28}")
        for result in results:
            overhead = statistics.mean(r["overhead"] for r in result["rounds"])
            print(f"{result['mode']:<11}{result['start']:>9.1f}{result['run']:>12.1f}{result['before_round_1']:>18.1f}"
                  f"{overhead:>17.1f}{result['load'][0]:>19.2f} / {result['load'][1]:.2f}")


if __name__ == "__main__":
    main()
