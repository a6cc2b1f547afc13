"""``forest-fl release``: create, list, promote, roll back and watch releases; serve them to the rovers."""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path
from typing import Any

from forest_perception.cli_args import existing_dir, non_negative_float, positive_int

DEFAULT_PORT = 8470


def _registry(args: argparse.Namespace) -> Any:  # noqa: ANN401 - ReleaseRegistry
    from forest_perception.collab.release.registry import ReleaseRegistry

    return ReleaseRegistry(args.registry)


def _list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def add_release(sub: argparse._SubParsersAction) -> None:
    """The ``release`` subcommand and its own subcommands."""
    release = sub.add_parser("release", help="model releases to the swarm: signed registry, staged rollouts, the "
                             "server rovers pull from (docs/releases.md)")
    steps = release.add_subparsers(dest="release_command", required=True, metavar="STEP")

    def step(name: str, text: str) -> argparse.ArgumentParser:
        parser = steps.add_parser(name, help=text, description=text)
        parser.add_argument("--registry", type=Path, default=Path("runs/registry"),
                            help="the registry folder (registry.db, objects/, the signing key)")
        return parser

    step("init", "make the registry and its ed25519 signing key (create does it too)")
    create = step("create", "add a release: an ONNX model with its card and checkpoint, signed")
    create.add_argument("model", help="an .onnx file (its .json card beside it) or a shipped model name")
    create.add_argument("--hardware", type=_list, default=None,
                        help="hardware classes it is for, comma-separated (pi4, jetson, pc; default from the name: "
                             "int8 auto-encoder <= 160x128 -> pi4,pc; other int8 -> pc; float -> jetson,pc)")
    create.add_argument("--providers", type=_list, default=None,
                        help="ONNX Runtime providers the rover should use, in order (default: CPU; float models "
                             "list TensorRT and CUDA first)")
    create.add_argument("--checkpoint", type=Path, default=None,
                        help="the PyTorch checkpoint (default: <model>.pt beside it, or the one its card names)")
    create.add_argument("--notes", default="", help="free text kept in the manifest")
    step("list", "list the releases")
    promote = step("promote", "roll a release out to the rovers a policy picks, canary first")
    promote.add_argument("release", help="release id, a unique prefix of it, or its number (3 or r0003)")
    promote.add_argument("--rovers", type=_list, default=[], help="only these rover ids")
    promote.add_argument("--groups", type=_list, default=[], help="only rovers with one of these group tags")
    promote.add_argument("--hardware", type=_list, default=[], help="only rovers of these hardware classes")
    stages = promote.add_mutually_exclusive_group()
    stages.add_argument("--canary", type=float, default=None, metavar="PERCENT",
                        help="first this share of the picked rovers, the rest once they are healthy")
    stages.add_argument("--stages", default=None, help="percentages of the picked rovers per stage, e.g. 10,50,100 "
                        "(default 100: all at once)")
    promote.add_argument("--soak", type=non_negative_float, default=20.0,
                         help="seconds each stage's rovers must run it healthy before the next stage")
    promote.add_argument("--min-reports", type=positive_int, default=2, help="health reports per rover first")
    promote.add_argument("--max-latency-ratio", type=float, default=1.3,
                         help="roll back when a rover's latency exceeds this times its latency before")
    promote.add_argument("--min-rate-ratio", type=float, default=0.8,
                         help="roll back when a rover's depth rate falls below this times its rate before")
    promote.add_argument("--max-crashes", type=int, default=0, help="depth node crashes tolerated per rover")
    promote.add_argument("--max-absrel-increase", type=non_negative_float, default=0.02,
                         help="roll back when a rover's held-out AbsRel rises more than this")
    promote.add_argument("--stage-timeout", type=non_negative_float, default=0.0,
                         help="roll back when a stage is not healthy after this many seconds (0: wait)")
    rollback = step("rollback", "stop a release's rollouts: its rovers go back to what they ran before")
    rollback.add_argument("release", help="release id, prefix or number")
    rollback.add_argument("--reason", default="", help="kept in the audit log")
    status = step("status", "releases, rollouts with each rover's state, rovers, the audit log")
    status.add_argument("--audit", type=positive_int, default=10, help="audit entries shown (newest)")
    status.add_argument("--plot", type=Path, default=None, help="draw the release timeline into this PNG")
    serve = step("serve", "serve the registry to the rovers over HTTPS (Ctrl-C stops it)")
    serve.add_argument("--certs", type=existing_dir, required=True,
                       help="a `forest-fl certs` folder: its CA signs the server certificate, its rover keys "
                            "authenticate the rovers")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    serve.add_argument("--port", type=positive_int, default=DEFAULT_PORT, help="port")
    serve.add_argument("--no-auth", action="store_true", help="accept unsigned rover requests (tests, trials)")


def _when(ts: float | None) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def print_status(registry: Any, audit: int = 10) -> None:  # noqa: ANN401 - ReleaseRegistry
    """The registry's releases, rollouts, rovers and latest audit entries, as text."""
    status = registry.status()
    print(f"releases ({len(status['releases'])}):")
    for r in status["releases"]:
        print(f"  {r['id']}  {r['version'] or '-'}  for {','.join(r['hardware'])}  {r['bytes'] / 1e6:.1f} MB  "
              f"{_when(r['created'])}  rollouts: {', '.join(r['rollouts']) or 'none'}")
    print(f"rollouts ({len(status['rollouts'])}):")
    for r in status["rollouts"]:
        stage = f"stage {r['stage'] + 1}/{len(r['stages'])} ({r['stages'][r['stage']]:g} %)"
        print(f"  #{r['id']} {r['release']} -> {r['selector']}: {r['state']}, {stage}"
              + (f": {r['reason']}" if r["reason"] else ""))
        for why in r["rovers"].values():
            print(f"      {why}")
    print(f"rovers ({len(status['rovers'])}):")
    for r in status["rovers"]:
        health = ", ".join(f"{k} {v:.3g}" for k, v in r["health"].items()) or "no health report"
        print(f"  {r['id']} ({r['hardware']}{'; ' + ','.join(r['groups']) if r['groups'] else ''}): runs "
              f"{r['running'] or 'no release'}; {health}; seen {_when(r['last_seen'])}")
    entries = registry.audit(audit)
    print(f"audit (last {len(entries)}):")
    for e in entries:
        detail = e["detail"].get("reason") or e["detail"].get("selector") or ""
        print(f"  {_when(e['ts'])} {e['actor']}: {e['action']} {e['release']}" + (f" ({detail})" if detail else ""))


def run_release(args: argparse.Namespace) -> int:
    """Run one ``forest-fl release`` step."""
    from forest_perception.collab.release.registry import Selector, Thresholds, parse_stages

    registry = _registry(args)
    command = args.release_command
    if command == "init":
        made = registry.ensure_key()
        print(f"{'made' if made else 'kept'} the release signing key {registry.key_path}; rovers trust "
              f"{registry.public_key_path} (collab_node release_public_key)")
    elif command == "create":
        from forest_perception.models.weights import shipped_model

        model = Path(args.model)
        if not model.exists() and model.suffix != ".onnx":
            model = shipped_model(args.model)
        made_key = registry.ensure_key()
        manifest = registry.create(model, args.hardware, args.providers, args.checkpoint, args.notes)
        if made_key:
            print(f"made the release signing key {registry.key_path}; give rovers {registry.public_key_path} "
                  "(collab_node release_public_key)")
        size = sum(a["size"] for a in manifest["artefacts"])
        print(f"created {manifest['release']} ({manifest['name']} {manifest['version']}, for "
              f"{','.join(manifest['hardware'])}, {len(manifest['artefacts'])} artefacts, {size / 1e6:.1f} MB, "
              f"signed by key {manifest['key_id']})")
    elif command == "list":
        for r in registry.releases():
            print(f"{r['id']}\t{r['version']}\t{','.join(r['hardware'])}\t{', '.join(r['rollouts']) or '-'}")
    elif command == "promote":
        stages = parse_stages([args.canary, 100] if args.canary is not None and args.canary < 100 else
                              (args.stages or "100"))
        thresholds = Thresholds(args.soak, args.min_reports, args.max_latency_ratio, args.min_rate_ratio,
                                args.max_crashes, args.max_absrel_increase, args.stage_timeout)
        selector = Selector(args.rovers, args.groups, args.hardware)
        rollout = registry.promote(args.release, selector, stages, thresholds)
        print(f"rollout #{rollout}: {registry.resolve(args.release)} -> {selector.describe()}, stages "
              f"{', '.join(f'{s:g} %' for s in stages)}")
    elif command == "rollback":
        rollouts = registry.rollback(args.release, args.reason)
        print(f"rolled back {registry.resolve(args.release)} (rollouts {', '.join(f'#{r}' for r in rollouts)})")
    elif command == "status":
        print_status(registry, args.audit)
        if args.plot:
            from forest_perception.collab.release.report import plot_timeline

            print(f"timeline: {plot_timeline(registry, args.plot)}")
    elif command == "serve":
        return _serve(registry, args)
    return 0


def _serve(registry: Any, args: argparse.Namespace) -> int:  # noqa: ANN401 - ReleaseRegistry
    from forest_perception.collab.release.auth import load_rover_public_keys
    from forest_perception.collab.release.server import ReleaseServer, server_certificate

    cert, key = server_certificate(args.certs)
    keys = None if args.no_auth else load_rover_public_keys(args.certs)
    server = ReleaseServer(registry, args.host, args.port, cert, key, keys, log_level="info")
    auth = "no rover authentication" if keys is None else f"{len(keys)} rover keys"
    print(f"serving {registry.root} on {server.url} ({auth}); rovers trust {cert.parent / 'ca.crt'} and "
          f"{registry.public_key_path}", flush=True)
    server.run()  # uvicorn ends on SIGINT / SIGTERM
    return 0
