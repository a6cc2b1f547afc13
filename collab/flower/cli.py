"""``forest-fl``: run a simulated federated swarm, prepare a population for ``flwr run``, inspect a coordinator.

Also ``certs`` (the deployment's CA and keys) and ``deploy`` (a SuperLink and SuperNodes on this machine
with TLS and SuperNode authentication). ``--init`` starts from a shipped network or a checkpoint,
``--rover-data`` gives each rover a recorded dataset folder, ``--cloud-test`` a test folder the coordinator
scores every round. Examples: ``docs/federated.md`` ("Quick start", "The real networks", "Deployment on
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
from functools import partial
from pathlib import Path

from forest_perception.cli_args import (
    InputError,
    command_parser,
    existing_dir,
    existing_file,
    float_within,
    image_size,
    int_within,
    non_negative_float,
    non_negative_int,
    output_dir,
    output_file,
    positive_float,
    positive_int,
    run_command,
)
from forest_perception.collab.release.cli import add_release, run_release

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


def _add_network_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--init", default=None, metavar="NAME|CHECKPOINT",
                        help="initial global model: a shipped network (multiscale_160x128, autoencoder_320x240, ...)"
                             " or a forest-train checkpoint; the run trains that network at its size (run config "
                             "init; default: the quick 27k-parameter net from random weights)")
    parser.add_argument("--cloud-test", type=existing_dir, default=None, metavar="DIR",
                        help="a test folder (forest dataset layout) the coordinator scores the global model on "
                             "every round (run config cloud-test)")


def _add_population_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=output_dir,
                        help="output folder (population, data, coordinator.db)")
    parser.add_argument("--rovers", type=positive_int, default=None,
                        help="number of virtual rovers (default 10; not with --rover-data)")
    parser.add_argument("--rover-data", nargs="+", type=existing_dir, default=None, metavar="DIR",
                        help="one recorded dataset folder per rover (forest dataset layout; only read, never "
                             "written), instead of generated rovers")
    parser.add_argument("--frames", type=positive_int, default=8, help="frames per generated rover (two segments)")
    parser.add_argument("--image-size", dest="data_size", type=image_size, default=None, metavar="WIDTHxHEIGHT",
                        help="generated rovers' frames (default: the network's input size, 80x64 without --init)")
    parser.add_argument("--data-source", choices=("procedural", "synth"), default="procedural",
                        help="how generated rover frames are made")
    parser.add_argument("--data-root", type=output_dir, default=None,
                        help="where generated rover data live (default OUT/rovers)")
    parser.add_argument("--availability", type=float_within(0.0, 1.0), nargs=2, default=None,
                        metavar=("LO", "HI"), help="range of each rover's probability of being out in a round "
                                                   "(default 0.6 1.0; 1 1 with --rover-data)")
    parser.add_argument("--decoder-fraction", type=float_within(0.0, 1.0), default=0.0,
                        help="share of rovers that train only the decoder (FedSubAvg submodels)")
    parser.add_argument("--fault", action="append", default=[], metavar="I=KIND",
                        help="make rover I misbehave: nan, inf, shape, dtype, count, huge, stale, no-data, crash")
    parser.add_argument("--population-seed", type=non_negative_int, default=0, help="seed of the rover population")
    parser.add_argument("--algorithm", default=None,
                        help="fedavg, fedsubavg, fedlaavg, mm-psgd, mc-psgd, robust, scaffold, dc-ccl (needs --set "
                             "dcccl-mimic=FILE), coda (needs --set coda-index=FILE), iciia (needs --set "
                             "iciia-module=FILE; the rovers score it with and without history, nothing trains)")
    parser.add_argument("--rounds", type=positive_int, default=None,
                        help="num-server-rounds (default: the run config's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any run config key of [tool.flwr.app.config] (repeatable)")
    _add_network_args(parser)


def _network_size(run_config: dict, unset: tuple[int, int] | None = None) -> tuple[int, int]:
    """The network input (height, width) a run config trains at (``unset`` when neither init nor an input size
    is given); its init checkpoint is read and checked now, so a wrong ``--init`` fails before anything starts."""
    from forest_perception.collab.flower.network import architecture_from_run_config
    from forest_perception.collab.flower.task import merge_run_config

    config = merge_run_config(run_config)
    architecture, _ = architecture_from_run_config(config)
    if unset is not None and not config["init"] and not (config["input-height"] or config["input-width"]):
        return unset
    return architecture.input_hw


def data_size(args: argparse.Namespace) -> tuple[int, int]:
    """Generated rovers' frame size (height, width): ``--image-size``, else the network's input size, else the
    command's default (80x64 for simulate/prepare, 64x48 for deploy). Reads and checks ``--init``."""
    unset = DEPLOY_IMAGE_HW if args.command == "deploy" else SIMULATE_IMAGE_HW
    network = _network_size(_run_config(args), unset)
    return tuple(args.data_size) if args.data_size else network


def _spec(args: argparse.Namespace) -> object:
    from forest_perception.collab.flower.simulation import SimulationSpec
    from forest_perception.collab.flower.task import merge_run_config

    run_config = _run_config(args)
    merge_run_config(run_config)  # refuse an unknown key or a mistyped value before any data are made
    size = data_size(args)  # a wrong --init fails here, before any data are made
    recorded = list(args.rover_data or [])
    if recorded and args.rovers is not None:
        raise InputError(f"--rovers {args.rovers} and --rover-data: give one of them (--rover-data makes one rover "
                         "per folder)")
    lo, hi = args.availability or ((1.0, 1.0) if recorded else (0.6, 1.0))
    if lo > hi:
        raise InputError(f"--availability {lo} {hi}: LO must not be above HI")
    return SimulationSpec(
        out_dir=args.out, num_rovers=len(recorded) or args.rovers or 10, run_config=run_config,
        frames_per_rover=args.frames, data_size=size, data_source=args.data_source,
        data_root=args.data_root, availability=(lo, hi), decoder_fraction=args.decoder_fraction,
        faults=_faults(args.fault), population_seed=args.population_seed, rover_data=[str(p) for p in recorded],
        client_cpus=getattr(args, "client_cpus", 1.0), ray_cpus=getattr(args, "ray_cpus", 2),
        verbose=getattr(args, "verbose", False),
    )


def _run_config(args: argparse.Namespace) -> dict[str, bool | int | float | str]:
    """``--set`` KEY=VALUE pairs with ``--algorithm``, ``--rounds``, ``--init`` and ``--cloud-test`` over them.

    Paths become absolute: the apps may run elsewhere (``flwr run`` installs them under ``FLWR_HOME``).
    """
    run_config = _key_values(args.set, "--set")
    if args.algorithm:
        run_config["algorithm"] = args.algorithm
    if args.rounds is not None:
        run_config["num-server-rounds"] = args.rounds
    init = getattr(args, "init", None)
    if init is not None:
        run_config["init"] = str(Path(init).resolve()) if Path(init).is_file() else init
    if getattr(args, "cloud_test", None) is not None:
        run_config["cloud-test"] = str(Path(args.cloud_test).resolve())
    return run_config


def _fmt(value: object, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def print_status(db: Path, show_updates: bool = False, plot: bool = False) -> Path | None:
    """Print a coordinator store: identity, one line per round, the federated evaluation, rejections.

    With ``plot`` also draw the evaluation curves beside the store; returns the PNG's path.
    """
    import sqlite3

    from forest_perception.collab.flower.store import CoordinatorStore

    try:
        _print_store(CoordinatorStore(db, readonly=True), db, show_updates)
    except sqlite3.DatabaseError as exc:
        raise InputError(f"--db {str(db)!r} is not a readable coordinator store ({exc})") from None
    if not plot:
        return None
    from forest_perception.collab.flower.curves import plot_store_curves

    path = plot_store_curves(db)
    print(f"curves: {path}")
    return path


MAX_ROVER_LINES = 12
"""More rovers than this: per-rover evaluation lines only with ``--all``."""


def _print_store(store: object, db: Path, show_updates: bool) -> None:
    with store:
        summary = store.summary()
        print(f"{db}: {json.dumps(summary['identity'])}")
        print(f"last completed round {summary['last_round']}; updates {summary['updates']}; "
              f"rejections {summary['rejection_reasons'] or '{}'}")
        print("round  avail  sel  acc  rej  fail   train-loss  absrel   delta1   KiB down  KiB up   wall s"
              "   (absrel, delta1: the rovers' trained models on their held-out segments)")
        for r in store.rounds():
            m = r["train_metrics"]
            print(f"{r['round']:5d}  {r['num_available']:5d}  {r['num_selected']:3d}  {r['num_accepted']:3d}  "
                  f"{r['num_rejected']:3d}  {r['num_failed']:4d}   {_fmt(m.get('train-loss')):>10}  "
                  f"{_fmt(m.get('absrel')):>6}  {_fmt(m.get('delta1')):>7}  {r['bytes_down'] / 1024:9.1f}  "
                  f"{r['bytes_up'] / 1024:7.1f}  {r['wall_s']:7.2f}{'  (resumed)' if r['resumed'] else ''}")
        _print_evaluations(store.evaluations(), show_updates)
        for u in store.updates():
            if u["status"] != "accepted" and (show_updates or u["status"] in ("rejected", "failed")):
                print(f"  round {u['round']} {u['rover_id']} [{u['chain']}] {u['status']} {u['reason']}: "
                      f"{u['message']}")


def _print_evaluations(rows: list[dict], show_all: bool) -> None:
    if not rows:
        return
    rovers = {r["name"] for r in rows if r["kind"] == "rover"}
    per_rover = show_all or len(rovers) <= MAX_ROVER_LINES
    note = "" if per_rover else f" (per rover: --all, {len(rovers)} rovers)"
    print(f"federated evaluation of the global model (round 0: the initial model){note}")
    print("round  who                         status      frames  absrel   delta1     rmse")
    for r in rows:
        if r["kind"] == "rover" and not per_rover:
            continue
        who = {"rovers": "rovers (mean)" + r["name"][len("rovers"):], "cloud": "cloud test"}.get(r["kind"], r["name"])
        print(f"{r['round']:5d}  {who[:26]:26}  {r['status']:10}  {r['frames']:6d}  {_fmt(r['absrel']):>6}  "
              f"{_fmt(r['delta1']):>7}  {_fmt(r['rmse']):>7}")


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


def _add_dcccl(sub: argparse._SubParsersAction) -> None:
    dc = sub.add_parser("dcccl", help="device-cloud collaborative learning: distil the mimic, export the two models")
    steps = dc.add_subparsers(dest="dcccl_command", metavar="STEP", required=True)
    distil = steps.add_parser("distil", help="distil the large cloud submodel into the mimic the rovers train on")
    distil.add_argument("--data", nargs="+", required=True, type=existing_dir, metavar="DIR",
                        help="cloud dataset folders (public layout) to distil on")
    distil.add_argument("--out", required=True, type=partial(output_file, suffix=".pt"),
                        help="the mimic part file to write (.pt; a .json summary beside it; folders are made)")
    distil.add_argument("--large", nargs="+", default=["multiscale_320x240"], metavar="MODEL",
                        help="shipped networks or checkpoints whose mean log depth is the large submodel")
    distil.add_argument("--no-flip", action="store_true", help="do not average the large submodel with its mirror")
    distil.add_argument("--mimic-init", default="autoencoder_160x128", metavar="MODEL",
                        help="the network the mimic starts from (its architecture and input size are the rover's)")
    distil.add_argument("--small-channels", type=positive_int, default=8,
                        help="width of the rovers' small submodel (its FLOPs and bytes go into the summary)")
    distil.add_argument("--epochs", type=positive_int, default=4)
    distil.add_argument("--lr", type=positive_float, default=3e-4)
    distil.add_argument("--max-frames", type=positive_int, default=1200, help="cloud frames used at most")
    distil.add_argument("--batch-size", type=positive_int, default=8)
    distil.add_argument("--seed", type=non_negative_int, default=0)
    distil.add_argument("--cache", default=None, metavar="DIR", help="frame cache folder (as forest-train --cache)")
    distil.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (0: torch's default)")
    export = steps.add_parser("export", help="the rover model (mimic + small) and the base-station model (large + "
                                             "small) as ONNX with model cards")
    export.add_argument("--mimic", required=True, type=existing_file, help="the mimic part file (distil's --out)")
    small = export.add_mutually_exclusive_group(required=True)
    small.add_argument("--db", type=existing_file, help="a dc-ccl coordinator store: its averaged small submodel")
    small.add_argument("--small", type=existing_file, help="a small submodel part file")
    export.add_argument("--round", type=non_negative_int, default=None, help="the store's round (default: the last)")
    export.add_argument("--out", required=True, type=output_dir, help="folder for the two ONNX models and cards")
    export.add_argument("--base-station-drop", type=output_dir, default=None, metavar="DIR",
                        help="also hand the cloud model to a base station's collab_node: global-r<round>.onnx in its "
                             "model_drop_dir, gated there on its held-out segments like any global model")


def _add_iciia(sub: argparse._SubParsersAction) -> None:
    ic = sub.add_parser("iciia", help="ICIIA history attention: train the module once on the cloud, export the rover "
                                      "model, hand it to rovers' collab_node gates")
    steps = ic.add_subparsers(dest="iciia_command", metavar="STEP", required=True)
    train = steps.add_parser("train", help="train the module on cloud forest sequences (base frozen); write iciia.pt, "
                                           "iciia_rover.onnx (+ card) and iciia.json")
    train.add_argument("--data", nargs="+", required=True, type=existing_dir, metavar="DIR",
                       help="cloud dataset folders (public layout); each segment is one history sequence")
    train.add_argument("--out", required=True, type=output_dir, help="folder for the module, rover model and summary")
    train.add_argument("--base", default="autoencoder_160x128", metavar="MODEL",
                       help="the shipped network (or .pt checkpoint) the module plugs into; it stays frozen")
    train.add_argument("--partitions", type=positive_int, default=4, help="P: block-diagonal partitions (divides the "
                       "bottleneck width)")
    train.add_argument("--heads", type=positive_int, default=4, help="attention heads (divides the bottleneck width)")
    train.add_argument("--bank", type=positive_int, default=16, help="K: history frames the rover graph takes")
    train.add_argument("--epochs", type=positive_int, default=4)
    train.add_argument("--lr", type=positive_float, default=1e-3)
    train.add_argument("--batch-size", type=positive_int, default=8)
    train.add_argument("--seed", type=non_negative_int, default=0)
    train.add_argument("--threads", type=positive_int, default=1, help="torch threads")
    train.add_argument("--jitter", type=non_negative_float, default=0.0,
                       help="per sequence and epoch, one photometric shift of all its frames (gain and offset "
                            "+- this on the normalised image); 0: none")
    train.add_argument("--max-frames", type=positive_int, default=2000, help="cloud frames used at most")
    train.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo")
    train.add_argument("--drop", nargs="+", type=output_dir, default=[], metavar="DIR",
                       help="also copy the rover model into these rovers' model drop folders (global-r<N>.onnx): "
                            "each collab_node gates it on its held-out segments, history fed in frame order")
    export = steps.add_parser("export", help="export the rover model of a saved module (and drop it)")
    export.add_argument("--module", required=True, type=existing_file, help="the module file (train's iciia.pt)")
    export.add_argument("--out", required=True, type=partial(output_file, suffix=".onnx"), help="the .onnx to write")
    export.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo")
    export.add_argument("--drop", nargs="+", type=output_dir, default=[], metavar="DIR",
                        help="also copy it into these rovers' model drop folders")


def _iciia(args: argparse.Namespace, argv_text: str) -> int:
    from forest_perception.collab import iciia as iciia_cloud
    from forest_perception.models.iciia import IciiaFileError, IciiaSpec, TrainSettings

    try:
        if args.iciia_command == "train":
            spec = IciiaSpec(base=args.base, partitions=args.partitions, heads=args.heads,
                             bank_capacity=args.bank).validate()
            settings = TrainSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                     threads=args.threads, sequence_jitter=args.jitter)
            summary = iciia_cloud.train_from_folders(spec, args.data, args.out, settings, args.max_frames,
                                                     args.exporter, argv_text)
            rover = Path(summary["rover_model"])
            print(f"ICIIA {summary['module_version']} on {summary['base_version']}: {summary['frames']} frames in "
                  f"{summary['sequences']} sequences, loss {summary['loss_by_epoch'][0]:.4f} -> "
                  f"{summary['loss_by_epoch'][-1]:.4f} in {summary['train_s']:.0f} s; +"
                  f"{summary['flops']['iciia'] / 1e6:.2f} MFLOPs ({100 * summary['flops_overhead']:.2f} % of the base)")
            print(f"module: {summary['module']}\nrover model: {rover} (card {rover.with_suffix('.md').name})")
        else:
            rover = iciia_cloud.export_from_module(args.module, args.out, args.exporter, argv_text)
            print(f"rover model: {rover} (card {rover.with_suffix('.md').name})")
    except (IciiaFileError, ValueError) as exc:
        print(f"{PROG} iciia: error: {exc}", file=sys.stderr)
        return 2
    for drop in iciia_cloud.drop_rover_model(rover, args.drop):
        print(f"dropped for the gate: {drop}")
    return 0


def _dcccl(args: argparse.Namespace, argv_text: str) -> int:
    import torch

    from forest_perception.collab import dcccl, dcccl_cloud

    if args.dcccl_command == "distil":
        if args.threads:
            torch.set_num_threads(args.threads)
        spec = dcccl.DcCclSpec(large=tuple(args.large), large_flip=not args.no_flip, mimic_init=args.mimic_init,
                               small_channels=args.small_channels).validate()
        summary = dcccl_cloud.distil_from_folders(
            spec, args.data, args.out, epochs=args.epochs, lr=args.lr, max_frames=args.max_frames,
            batch_size=args.batch_size, seed=args.seed, cache=args.cache, command=argv_text)
        flops = summary["flops"]
        print(f"mimic {summary['mimic_version']} (from {summary['large_version']}) written to {summary['mimic']}: "
              f"{summary['frames']} frames, mse(log depth) {summary['loss_start']:.4f} -> "
              f"{summary['loss_by_epoch'][-1]:.4f} in {summary['teacher_s'] + summary['distil_s']:.0f} s; large "
              f"{flops['large'] / 1e9:.2f} GFLOPs ({flops['large_over_rover_reference']:.1f}x the rover auto-encoder),"
              f" rover model {flops['rover_model'] / 1e9:.3f} GFLOPs")
        return 0
    mimic = dcccl.load_part(args.mimic, "mimic")
    spec_dict = torch.load(args.mimic, map_location="cpu", weights_only=True).get("spec") or {}
    spec = dcccl.DcCclSpec(**{**spec_dict, "large": tuple(spec_dict.get("large", dcccl.DcCclSpec().large))})
    small = dcccl_cloud.small_from_store(args.db, mimic, args.round) if args.db else dcccl.load_part(args.small,
                                                                                                      "small")
    written = dcccl_cloud.export_deployables(spec, mimic, small, args.out, command=argv_text)
    for kind, path in written.items():
        print(f"{kind}: {path} (card {path.with_suffix('.md').name})")
    if args.base_station_drop:
        server_round = small.info.get("from_store", {}).get("round") if args.db else None
        drop = dcccl_cloud.drop_cloud_model(written["cloud"], args.base_station_drop, server_round)
        print(f"base station: {drop}")
    return 0


def _add_coda(sub: argparse._SubParsersAction) -> None:
    coda = sub.add_parser("coda", help="CoDA: index the cloud's pool for the rovers' descriptors")
    steps = coda.add_subparsers(dest="coda_command", metavar="STEP", required=True)
    index = steps.add_parser("index", help="describe the pool's frames with a network's encoder and index them "
                                           "(the run's coda-index)")
    index.add_argument("--data", nargs="+", required=True, type=existing_dir, metavar="DIR",
                       help="cloud pool folders (public dataset layout, e.g. forest-dataset synth output)")
    index.add_argument("--out", required=True, type=partial(output_file, suffix=".npz"), help="the index file (.npz)")
    index.add_argument("--encoder", default="autoencoder_160x128", metavar="MODEL",
                       help="the shipped network or checkpoint whose encoder describes frames: the run's init")
    index.add_argument("--max-frames", type=positive_int, default=5000, help="pool frames indexed at most")


def _coda(args: argparse.Namespace) -> int:
    from forest_perception.collab import coda

    encoder = coda.DescriptorEncoder.from_init(str(Path(args.encoder).resolve()) if Path(args.encoder).is_file()
                                               else args.encoder)
    index = coda.build_pool_index(args.data, encoder, max_frames=args.max_frames)
    path = index.save(args.out)
    print(f"{path}: {len(index)} pool frames, {index.dim}-d descriptors ({index.dim * 2} bytes each as sent) by "
          f"{encoder.name} ({encoder.version}), samples at {index.input_hw[1]}x{index.input_hw[0]}")
    if not len(index):
        print("the pool is empty: rovers of a coda run get no cloud samples", file=sys.stderr)
    return 0


def _add_deploy(sub: argparse._SubParsersAction) -> None:
    deploy = sub.add_parser("deploy", help="a SuperLink and one SuperNode per rover on this machine (TLS, SuperNode "
                                           "authentication), then submit the app")
    deploy.add_argument("--certs", required=True, type=existing_dir, help="certificate folder of `forest-fl certs`")
    deploy.add_argument("--run-dir", required=True, type=output_dir,
                        help="logs, Flower homes, coordinator.db, nodes.json")
    deploy.add_argument("--rover", action="append", default=[], metavar="ID=DATA_DIR",
                        help="a rover and its recordings (forest dataset layout); repeatable")
    deploy.add_argument("--rover-data", nargs="+", type=existing_dir, default=[], metavar="DIR",
                        help="recorded dataset folders, one SuperNode each, named after the folder (certs must "
                             "hold keys for those names); only read, never written")
    deploy.add_argument("--virtual-rovers", type=non_negative_int, default=0,
                        help="also N simulated rovers rover_000.. with procedural data in RUN_DIR/rovers")
    deploy.add_argument("--frames", type=positive_int, default=4, help="frames per virtual rover")
    deploy.add_argument("--image-size", dest="data_size", type=image_size, default=None, metavar="WIDTHxHEIGHT",
                        help="virtual rovers' frames (default: the network's input size, 64x48 without --init)")
    deploy.add_argument("--rounds", type=non_negative_int, default=None,
                        help="num-server-rounds (0: start the swarm, submit nothing)")
    deploy.add_argument("--algorithm", default=None,
                        help="fedavg, fedsubavg, fedlaavg, mm-psgd, mc-psgd, robust, scaffold")
    deploy.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any run config key")
    _add_network_args(deploy)
    deploy.add_argument("--host", default="127.0.0.1", help="address the SuperLink listens on")
    deploy.add_argument("--port", type=int_within(0, 65535), default=0, help="SuperLink port (0: a free one)")
    deploy.add_argument("--timeout", type=positive_float, default=1800.0, help="seconds the run may take")
    deploy.add_argument("--clientapp", choices=("warm", "subprocess"), default="warm",
                        help="how each SuperNode runs the rover ClientApp: warm (one process kept alive across "
                             "messages) or subprocess (Flower's: a new process per message)")
    deploy.add_argument("--serve", action="store_true",
                        help="keep the SuperLink and SuperNodes running (Ctrl-C stops them) for more `flwr run`s")
    deploy.add_argument("--coordinator-only", action="store_true",
                        help="the SuperLink alone, every rover key of --certs registered, no SuperNodes (each rover's "
                             "collab_node runs its own); implies --rounds 0 --serve (launch/cloud.launch.py)")


def _deploy_rovers(args: argparse.Namespace) -> list:
    from forest_perception.collab.deploy.supernode import RoverNode

    rovers = []
    if args.coordinator_only:
        from forest_perception.collab.deploy.certs import load_deployment_certs

        ids = sorted(load_deployment_certs(args.certs).rovers)
        if not ids:
            raise ValueError(f"--certs {args.certs} holds no rover keys (forest-fl certs --rover ID ...)")
        return [RoverNode(rover_id, Path(".")) for rover_id in ids]
    if args.virtual_rovers:
        from forest_perception.collab.flower.population import make_population
        from forest_perception.collab.flower.rover_data import ensure_rover_data

        height, width = data_size(args)
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
    if args.rover_data:
        from forest_perception.collab.flower.population import recorded_rover_ids

        folders = [Path(d).resolve() for d in args.rover_data]
        rovers += [RoverNode(rover_id, folder) for rover_id, folder in zip(recorded_rover_ids(folders), folders)]
    if not rovers:
        raise ValueError("name the rovers: --rover ID=DATA_DIR (repeatable), --rover-data DIR [DIR ...] or "
                         "--virtual-rovers N")
    return rovers


def _deploy(args: argparse.Namespace) -> int:
    import time

    from forest_perception.collab.deploy.local import DeploySpec, LocalDeployment
    from forest_perception.collab.flower.task import merge_run_config

    if args.coordinator_only:
        args.rounds, args.serve = 0, True
    run_config = _run_config(args)
    if args.rounds == 0:
        run_config.pop("num-server-rounds")
    merge_run_config(run_config)  # an unknown key or a mistyped value: refused before anything starts
    _network_size(run_config)  # so is a wrong --init
    spec = DeploySpec(run_dir=args.run_dir, certs_dir=args.certs, rovers=_deploy_rovers(args), run_config=run_config,
                      host=args.host, superlink_port=args.port, start_supernodes=not args.coordinator_only,
                      clientapp=args.clientapp)
    deployment = LocalDeployment(spec)
    try:
        try:
            deployment.start()
        except RuntimeError as exc:  # a Flower process that would not start: its message names the log
            raise InputError(str(exc)) from exc
        print(f"SuperLink https://{deployment.superlink_address} (TLS, SuperNode authentication); "
              f"logs in {deployment.logs_dir}")
        for rover_id, node_id in deployment.nodes.items():
            print(f"  {rover_id}: node {node_id}")
        if args.rounds != 0:
            result = deployment.run(timeout=args.timeout)
            print(f"run {result.run_id} done in {result.wall_s:.1f} s; state in {result.state_db}")
            print_status(result.state_db, plot=_has_evaluations(result.state_db))
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
    status.add_argument("--all", action="store_true",
                        help="also list missing updates and every rover's evaluation")
    status.add_argument("--plot", action="store_true",
                        help="draw AbsRel and delta1 per round (each rover, their mean, the cloud test) into "
                             "<store>_curves.png beside the store")
    influence = sub.add_parser("influence", help="rank the rovers of a run by their Fed-Influence (run config "
                               "influence = true) and plot it")
    influence.add_argument("--db", required=True, type=existing_file, help="the coordinator's SQLite store")
    influence.add_argument("--test", type=existing_dir, default=None,
                           help="a test folder (forest layout): rank by each rover's estimated effect on its loss")
    influence.add_argument("--out", type=Path, default=None,
                           help="the plot (default: <store>_influence.png beside the store)")
    _add_certs(sub)
    _add_deploy(sub)
    _add_dcccl(sub)
    _add_iciia(sub)
    _add_coda(sub)
    add_release(sub)
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
        print_status(args.db, args.all, args.plot)
        return 0
    if args.command == "influence":
        from forest_perception.collab.flower.influence_report import print_influence

        print_influence(args.db, None if args.test is None else str(args.test), args.out)
        return 0
    if args.command == "certs":
        return _certs(args)
    if args.command == "deploy":
        return _deploy(args)
    if args.command == "release":
        return run_release(args)
    if args.command == "dcccl":
        return _dcccl(args, " ".join([PROG, *sys.argv[1:]]))
    if args.command == "iciia":
        return _iciia(args, " ".join([PROG, *sys.argv[1:]]))
    if args.command == "coda":
        return _coda(args)
    spec = _spec(args)
    data_root = _rover_data_root(args)
    # a failed first run must not leave half-made rover data (recorded rover folders are never touched)
    made_here = not spec.rover_data and not data_root.exists()
    try:
        if args.command == "prepare":
            from forest_perception.collab.flower import app_dir
            from forest_perception.collab.flower.simulation import prepare_population

            population, path, seconds = prepare_population(spec)
            where = f"recorded data in {len(spec.rover_data)} folder(s)" if spec.rover_data else f"data in {data_root}"
            print(f"wrote {path} ({len(population)} rovers, {where}) in {seconds:.1f} s")
            extra = "".join(f" {k}='{v}'" for k, v in spec.run_config.items() if k in ("init", "cloud-test"))
            print(f"flwr run {app_dir()} <connection> --run-config \"population='{path.resolve()}'{extra}\"")
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
    print_status(result.state_db, plot=_has_evaluations(result.state_db))
    return 0


def _has_evaluations(db: Path) -> bool:
    from forest_perception.collab.flower.store import CoordinatorStore

    with CoordinatorStore(db, readonly=True) as store:
        return bool(store.evaluations())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``forest-fl``; expected failures are one line and exit status 2."""
    return run_command(PROG, build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
