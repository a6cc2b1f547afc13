"""``forest-fl``: run a simulated federated swarm, prepare a population for ``flwr run``, inspect a coordinator.

Also ``certs`` (the deployment's CA and keys) and ``deploy`` (a SuperLink and SuperNodes on this machine
with TLS and SuperNode authentication). Examples: ``docs/federated.md`` ("Quick start", "Deployment on
loopback"); ``simulate`` on an ``--out`` that holds a coordinator store resumes it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from forest_perception.cli_args import (
    InputError,
    command_parser,
    existing_dir,
    existing_file,
    float_within,
    image_size,
    int_within,
    non_negative_int,
    output_dir,
    positive_float,
    positive_int,
    run_command,
)

PROG = "forest-fl"

SIMULATE_IMAGE_HW = (64, 80)
DEPLOY_IMAGE_HW = (48, 64)


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
            raise InputError(f"{what} {item!r} is not KEY=VALUE")
        key, value = item.split("=", 1)
        out[key.strip()] = _parse_value(value)
    return out


def _faults(items: Sequence[str]) -> dict[int, str]:
    faults = {}
    for key, value in _key_values(items, "--fault").items():
        try:
            faults[int(key)] = str(value)
        except ValueError:
            raise InputError(f"--fault {key}={value}: the key must be a rover index, like --fault 2=nan") from None
    return faults


def _add_population_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=output_dir,
                        help="output folder (population, data, coordinator.db)")
    parser.add_argument("--rovers", type=positive_int, default=10, help="number of virtual rovers")
    parser.add_argument("--frames", type=positive_int, default=8, help="frames per rover (two segments)")
    parser.add_argument("--image-size", dest="data_size", type=image_size, default=SIMULATE_IMAGE_HW,
                        metavar="WIDTHxHEIGHT", help="stored frames")
    parser.add_argument("--data-source", choices=("procedural", "synth"), default="procedural",
                        help="how rover frames are made")
    parser.add_argument("--data-root", type=output_dir, default=None,
                        help="where rover data live (default OUT/rovers)")
    parser.add_argument("--availability", type=float_within(0.0, 1.0), nargs=2, default=(0.6, 1.0),
                        metavar=("LO", "HI"), help="range of each rover's probability of being out in a round")
    parser.add_argument("--decoder-fraction", type=float_within(0.0, 1.0), default=0.0,
                        help="share of rovers that train only the decoder (FedSubAvg submodels)")
    parser.add_argument("--fault", action="append", default=[], metavar="I=KIND",
                        help="make rover I misbehave: nan, inf, shape, dtype, count, huge, stale, no-data, crash")
    parser.add_argument("--population-seed", type=non_negative_int, default=0, help="seed of the rover population")
    parser.add_argument("--algorithm", default=None, help="fedavg, fedsubavg, fedlaavg, mm-psgd, mc-psgd, robust")
    parser.add_argument("--rounds", type=positive_int, default=None,
                        help="num-server-rounds (default: the run config's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any run config key of [tool.flwr.app.config] (repeatable)")


def _spec(args: argparse.Namespace) -> object:
    from forest_perception.collab.flower.simulation import SimulationSpec
    from forest_perception.collab.flower.task import merge_run_config

    run_config = _run_config(args)
    lo, hi = args.availability
    if lo > hi:
        raise InputError(f"--availability {lo} {hi}: LO must not be above HI")
    merge_run_config(run_config)  # refuse an unknown key or a mistyped value before any data are made
    return SimulationSpec(
        out_dir=args.out, num_rovers=args.rovers, run_config=run_config, frames_per_rover=args.frames,
        data_size=tuple(args.data_size), data_source=args.data_source, data_root=args.data_root,
        availability=tuple(args.availability), decoder_fraction=args.decoder_fraction, faults=_faults(args.fault),
        population_seed=args.population_seed, client_cpus=getattr(args, "client_cpus", 1.0),
        ray_cpus=getattr(args, "ray_cpus", 2), verbose=getattr(args, "verbose", False),
    )


def _run_config(args: argparse.Namespace) -> dict[str, bool | int | float | str]:
    """``--set`` KEY=VALUE pairs with ``--algorithm`` and ``--rounds`` over them."""
    run_config = _key_values(args.set, "--set")
    if args.algorithm:
        run_config["algorithm"] = args.algorithm
    if args.rounds is not None:
        run_config["num-server-rounds"] = args.rounds
    return run_config


def _fmt(value: object, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def print_status(db: Path, show_updates: bool = False) -> None:
    """Print a coordinator store: identity, one line per round, rejections."""
    import sqlite3

    from forest_perception.collab.flower.store import CoordinatorStore

    try:
        _print_store(CoordinatorStore(db, readonly=True), db, show_updates)
    except sqlite3.DatabaseError as exc:
        raise InputError(f"--db {str(db)!r} is not a readable coordinator store ({exc})") from None


def _print_store(store: object, db: Path, show_updates: bool) -> None:
    with store:
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


def _add_certs(sub: argparse._SubParsersAction) -> None:
    certs = sub.add_parser("certs", help="make a CA, the SuperLink's TLS certificate and SuperNode keys per rover")
    certs.add_argument("--out", required=True, type=output_dir,
                       help="certificate folder (an existing one is extended)")
    certs.add_argument("--rovers", type=non_negative_int, default=0, help="keys for rover_000 .. rover_<N-1>")
    certs.add_argument("--rover", action="append", default=[], metavar="ID", help="keys for this rover (repeatable)")
    certs.add_argument("--host", action="append", default=None, metavar="HOST",
                       help="address or name the SuperLink is reached at (repeatable; default 127.0.0.1, localhost)")
    certs.add_argument("--days", type=positive_int, default=365, help="validity of the TLS certificates")
    certs.add_argument("--overwrite", action="store_true", help="make a new CA and new keys for every rover")


def _certs(args: argparse.Namespace) -> int:
    from forest_perception.collab.deploy.certs import DEFAULT_HOSTS, check_deployment_certs, make_deployment_certs

    rover_ids = [f"rover_{i:03d}" for i in range(args.rovers)] + list(args.rover)
    certs = make_deployment_certs(args.out, rover_ids, hosts=tuple(args.host or DEFAULT_HOSTS), days=args.days,
                                  overwrite=args.overwrite)
    check_deployment_certs(certs)
    print(f"{certs.root}: CA {certs.ca_cert.name}, SuperLink {certs.server_cert.name} for {', '.join(certs.hosts)}")
    for rover_id, keys in sorted(certs.rovers.items()):
        print(f"  {rover_id}: {keys.auth_pub.relative_to(certs.root)} {keys.fingerprint}")
    print(f"keep {certs.ca_key} off the rovers; each rover needs ca.crt and its own rovers/<id>/ folder")
    return 0


def _add_deploy(sub: argparse._SubParsersAction) -> None:
    deploy = sub.add_parser("deploy", help="a SuperLink and one SuperNode per rover on this machine (TLS, SuperNode "
                                           "authentication), then submit the app")
    deploy.add_argument("--certs", required=True, type=existing_dir, help="certificate folder of `forest-fl certs`")
    deploy.add_argument("--run-dir", required=True, type=output_dir,
                        help="logs, Flower homes, coordinator.db, nodes.json")
    deploy.add_argument("--rover", action="append", default=[], metavar="ID=DATA_DIR",
                        help="a rover and its recordings (forest dataset layout); repeatable")
    deploy.add_argument("--virtual-rovers", type=non_negative_int, default=0,
                        help="also N simulated rovers rover_000.. with procedural data in RUN_DIR/rovers")
    deploy.add_argument("--frames", type=positive_int, default=4, help="frames per virtual rover")
    deploy.add_argument("--image-size", dest="data_size", type=image_size, default=DEPLOY_IMAGE_HW,
                        metavar="WIDTHxHEIGHT", help="virtual rovers' frames")
    deploy.add_argument("--rounds", type=non_negative_int, default=None,
                        help="num-server-rounds (0: start the swarm, submit nothing)")
    deploy.add_argument("--algorithm", default=None, help="fedavg, fedsubavg, fedlaavg, mm-psgd, mc-psgd, robust")
    deploy.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any run config key")
    deploy.add_argument("--host", default="127.0.0.1", help="address the SuperLink listens on")
    deploy.add_argument("--port", type=int_within(0, 65535), default=0, help="SuperLink port (0: a free one)")
    deploy.add_argument("--timeout", type=positive_float, default=1800.0, help="seconds the run may take")
    deploy.add_argument("--serve", action="store_true",
                        help="keep the SuperLink and SuperNodes running (Ctrl-C stops them) for more `flwr run`s")


def _deploy_rovers(args: argparse.Namespace) -> list:
    from forest_perception.collab.deploy.supernode import RoverNode

    rovers = []
    if args.virtual_rovers:
        from forest_perception.collab.flower.population import make_population
        from forest_perception.collab.flower.rover_data import ensure_rover_data

        height, width = args.data_size
        population = make_population(args.virtual_rovers, args.run_dir.resolve() / "rovers", frames=args.frames,
                                     availability=(1.0, 1.0))
        for rover in population.rovers:
            ensure_rover_data(rover, width, height)
            rovers.append(RoverNode(rover.rover_id, rover.data_dir))
    for item in args.rover:
        rover_id, sep, data_dir = item.partition("=")
        if not sep or not rover_id or not data_dir:
            raise ValueError(f"--rover {item!r} is not ID=DATA_DIR")
        rovers.append(RoverNode(rover_id.strip(), Path(data_dir.strip())))
    if not rovers:
        raise ValueError("name the rovers: --rover ID=DATA_DIR (repeatable) or --virtual-rovers N")
    return rovers


def _deploy(args: argparse.Namespace) -> int:
    import time

    from forest_perception.collab.deploy.local import DeploySpec, LocalDeployment
    from forest_perception.collab.flower.task import merge_run_config

    run_config = _run_config(args)
    if args.rounds == 0:
        run_config.pop("num-server-rounds")
    merge_run_config(run_config)  # an unknown key or a mistyped value: refused before anything starts
    spec = DeploySpec(run_dir=args.run_dir, certs_dir=args.certs, rovers=_deploy_rovers(args), run_config=run_config,
                      host=args.host, superlink_port=args.port)
    deployment = LocalDeployment(spec)
    try:
        deployment.start()
        print(f"SuperLink https://{deployment.superlink_address} (TLS, SuperNode authentication); "
              f"logs in {deployment.logs_dir}")
        for rover_id, node_id in deployment.nodes.items():
            print(f"  {rover_id}: node {node_id}")
        if args.rounds != 0:
            result = deployment.run(timeout=args.timeout)
            print(f"run {result.run_id} done in {result.wall_s:.1f} s; state in {result.state_db}")
            print_status(result.state_db)
        if args.serve:
            print(f"serving; submit more runs with: FLWR_HOME={deployment.cli_home()} flwr run "
                  f"{deployment.app_dir} forest --stream --run-config \"state-db='{deployment.state_db}'\"")
            while all(p.popen.poll() is None for p in deployment.processes.values()):
                time.sleep(1.0)
            print("forest-fl: a deployment process exited; stopping", file=sys.stderr)
            return 1
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        deployment.stop()


def build_parser() -> argparse.ArgumentParser:
    """The ``forest-fl`` argument parser with its subcommands."""
    parser, sub = command_parser(PROG, __doc__.split("\n")[0])

    simulate = sub.add_parser("simulate", help="run a federated simulation on Ray (resumes a run in --out)")
    _add_population_args(simulate)
    simulate.add_argument("--client-cpus", type=positive_float, default=1.0, help="Ray CPUs per ClientApp actor")
    simulate.add_argument("--ray-cpus", type=positive_int, default=2, help="CPUs Ray may use in total")
    simulate.add_argument("--verbose", action="store_true", help="Flower debug logging")
    simulate.add_argument("--via", choices=("run-simulation", "flwr-run"), default="run-simulation",
                          help="flwr.simulation.run_simulation in this process, or a SuperLink and `flwr run`")
    prepare = sub.add_parser("prepare", help="write a population and its data (for flwr run)")
    _add_population_args(prepare)
    status = sub.add_parser("status", help="print a coordinator store")
    status.add_argument("--db", required=True, type=existing_file, help="the coordinator's SQLite store")
    status.add_argument("--all", action="store_true", help="also list failed and missing updates")
    _add_certs(sub)
    _add_deploy(sub)
    return parser


def _rover_data_root(args: argparse.Namespace) -> Path:
    return Path(args.data_root) if args.data_root else Path(args.out) / "rovers"


def _run(args: argparse.Namespace) -> int:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    collab_log = logging.getLogger("forest_perception.collab")  # Flower logs through its own handler
    collab_log.addHandler(handler)
    collab_log.setLevel(logging.INFO)
    collab_log.propagate = False
    if args.command == "status":
        print_status(args.db, args.all)
        return 0
    if args.command == "certs":
        return _certs(args)
    if args.command == "deploy":
        return _deploy(args)
    spec = _spec(args)
    data_root = _rover_data_root(args)
    made_here = not data_root.exists()  # a failed first run must not leave half-made rover data
    try:
        if args.command == "prepare":
            from forest_perception.collab.flower import app_dir
            from forest_perception.collab.flower.simulation import prepare_population

            population, path, seconds = prepare_population(spec)
            print(f"wrote {path} ({len(population)} rovers, data in {data_root}) in {seconds:.1f} s")
            print(f"flwr run {app_dir()} <connection> --run-config \"population='{path.resolve()}'\"")
            return 0
        from forest_perception.collab.flower.simulation import run_simulation, run_with_flwr_cli

        result = run_with_flwr_cli(spec) if args.via == "flwr-run" else run_simulation(spec)
    except BaseException as exc:
        if made_here and data_root.exists():
            shutil.rmtree(data_root, ignore_errors=True)
            print(f"{PROG} {args.command}: removed the rover data this run had begun in {data_root}", file=sys.stderr)
        if isinstance(exc, RuntimeError):  # a failed Flower run: its message says why and where the log is
            raise InputError(str(exc)) from exc
        raise
    print(f"simulation done in {result.wall_s:.1f} s (data {result.data_s:.1f} s); state in {result.state_db}")
    print_status(result.state_db)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``forest-fl``; expected failures are one line and exit status 2."""
    return run_command(PROG, build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
