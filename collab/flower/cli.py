"""``forest-fl``: run a simulated federated swarm, prepare a population for ``flwr run``, inspect a coordinator.

Examples::

    forest-fl simulate --out runs/fl --rovers 10 --rounds 3 --algorithm fedavg
    forest-fl simulate --out runs/fl --rovers 6 --rounds 3 --fault 2=nan --fault 3=stale --set store-updates=true
    forest-fl prepare --out runs/pop --rovers 10
    flwr run . --run-config "population='runs/pop/population.json'"   # the same apps through Flower's CLI
    forest-fl status --db runs/fl/coordinator.db

``simulate`` on an ``--out`` that already holds a coordinator store resumes it (same algorithm
and model) from the last completed round.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path


def _parse_value(text: str) -> bool | int | float | str:
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _key_values(items: Sequence[str], what: str) -> dict[str, bool | int | float | str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"forest-fl: {what} {item!r} is not KEY=VALUE")
        key, value = item.split("=", 1)
        out[key.strip()] = _parse_value(value)
    return out


def _faults(items: Sequence[str]) -> dict[int, str]:
    faults = {}
    for key, value in _key_values(items, "--fault").items():
        try:
            faults[int(key)] = str(value)
        except ValueError:
            raise SystemExit(f"forest-fl: --fault {key}={value}: the key must be a rover index") from None
    return faults


def _add_population_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="output folder (population, data, coordinator.db)")
    parser.add_argument("--rovers", type=int, default=10, help="number of virtual rovers")
    parser.add_argument("--frames", type=int, default=8, help="frames per rover (two segments)")
    parser.add_argument("--data-size", type=int, nargs=2, default=(64, 80), metavar=("H", "W"),
                        help="height and width of the stored frames")
    parser.add_argument("--data-source", choices=("procedural", "synth"), default="procedural")
    parser.add_argument("--data-root", type=Path, default=None, help="where rover data live (default OUT/rovers)")
    parser.add_argument("--availability", type=float, nargs=2, default=(0.6, 1.0), metavar=("LO", "HI"),
                        help="range of each rover's probability of being out in a round")
    parser.add_argument("--decoder-fraction", type=float, default=0.0,
                        help="share of rovers that train only the decoder (FedSubAvg submodels)")
    parser.add_argument("--fault", action="append", default=[], metavar="I=KIND",
                        help="make rover I misbehave: nan, inf, shape, dtype, count, huge, stale, no-data, crash")
    parser.add_argument("--population-seed", type=int, default=0)
    parser.add_argument("--algorithm", default=None, help="fedavg, fedsubavg, fedlaavg, mm-psgd, mc-psgd, robust")
    parser.add_argument("--rounds", type=int, default=None, help="num-server-rounds")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any run config key of [tool.flwr.app.config] (repeatable)")


def _spec(args: argparse.Namespace) -> object:
    from collab.flower.simulation import SimulationSpec

    run_config = _key_values(args.set, "--set")
    if args.algorithm:
        run_config["algorithm"] = args.algorithm
    if args.rounds:
        run_config["num-server-rounds"] = args.rounds
    return SimulationSpec(
        out_dir=args.out, num_rovers=args.rovers, run_config=run_config, frames_per_rover=args.frames,
        data_size=tuple(args.data_size), data_source=args.data_source, data_root=args.data_root,
        availability=tuple(args.availability), decoder_fraction=args.decoder_fraction, faults=_faults(args.fault),
        population_seed=args.population_seed, client_cpus=getattr(args, "client_cpus", 1.0),
        ray_cpus=getattr(args, "ray_cpus", 2), verbose=getattr(args, "verbose", False),
    )


def _fmt(value: object, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def print_status(db: Path, show_updates: bool = False) -> None:
    """Print a coordinator store: identity, one line per round, rejections."""
    from collab.flower.store import CoordinatorStore

    with CoordinatorStore(db, readonly=True) as store:
        summary = store.summary()
        print(f"{db}: {json.dumps(summary['identity'])}")
        print(f"last completed round {summary['last_round']}; updates {summary['updates']}; "
              f"rejections {summary['rejection_reasons'] or '{}'}")
        print("round  avail  sel  acc  rej  fail   train-loss  absrel   delta1   KiB down  KiB up   wall s")
        for r in store.rounds():
            m = r["train_metrics"]
            print(f"{r['round']:5d}  {r['num_available']:5d}  {r['num_selected']:3d}  {r['num_accepted']:3d}  "
                  f"{r['num_rejected']:3d}  {r['num_failed']:4d}   {_fmt(m.get('train-loss')):>10}  "
                  f"{_fmt(m.get('absrel')):>6}  {_fmt(m.get('delta1')):>7}  {r['bytes_down'] / 1024:9.1f}  "
                  f"{r['bytes_up'] / 1024:7.1f}  {r['wall_s']:7.2f}{'  (resumed)' if r['resumed'] else ''}")
        for u in store.updates():
            if u["status"] != "accepted" and (show_updates or u["status"] == "rejected"):
                print(f"  round {u['round']} {u['rover_id']} [{u['chain']}] {u['status']} {u['reason']}: "
                      f"{u['message']}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``forest-fl``."""
    parser = argparse.ArgumentParser(prog="forest-fl", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    simulate = sub.add_parser("simulate", help="run a federated simulation on Ray (resumes a run in --out)")
    _add_population_args(simulate)
    simulate.add_argument("--client-cpus", type=float, default=1.0, help="Ray CPUs per ClientApp actor")
    simulate.add_argument("--ray-cpus", type=int, default=2, help="CPUs Ray may use in total")
    simulate.add_argument("--verbose", action="store_true", help="Flower debug logging")
    simulate.add_argument("--via", choices=("run-simulation", "flwr-run"), default="run-simulation",
                          help="flwr.simulation.run_simulation in this process, or a SuperLink and `flwr run`")
    prepare = sub.add_parser("prepare", help="write a population and its data (for flwr run)")
    _add_population_args(prepare)
    status = sub.add_parser("status", help="print a coordinator store")
    status.add_argument("--db", required=True, type=Path)
    status.add_argument("--all", action="store_true", help="also list failed and missing updates")
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    collab_log = logging.getLogger("collab")  # Flower logs through its own handler
    collab_log.addHandler(handler)
    collab_log.setLevel(logging.INFO)
    collab_log.propagate = False

    try:
        if args.command == "status":
            print_status(args.db, args.all)
            return 0
        spec = _spec(args)
        if args.command == "prepare":
            from collab.flower.simulation import prepare_population

            population, path, seconds = prepare_population(spec)
            print(f"wrote {path} ({len(population)} rovers, data in {population.rovers[0].data_dir.rsplit('/', 1)[0]}"
                  f") in {seconds:.1f} s")
            print(f"flwr run . --run-config \"population='{path.resolve()}'\"")
            return 0
        from collab.flower.simulation import run_simulation, run_with_flwr_cli

        result = run_with_flwr_cli(spec) if args.via == "flwr-run" else run_simulation(spec)
        print(f"simulation done in {result.wall_s:.1f} s (data {result.data_s:.1f} s); state in {result.state_db}")
        print_status(result.state_db)
        return 0
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"forest-fl: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
