"""``forest-dataset``: create and inspect datasets in the low-viewpoint forest dataset layout."""

from __future__ import annotations

import argparse
import json
import sys

from dataset_tools.layout import dataset_summary


def _parse_resolution(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"resolution must look like 320x240, got {text!r}") from None
    return width, height


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="render a synthetic dataset from simulated forests")
    p.add_argument("--out", required=True, help="dataset root folder")
    p.add_argument("--runs", type=int, default=1, help="forests (Run-N folders), seeds seed..seed+runs-1")
    p.add_argument("--segments", type=int, default=2, help="drives per run (segments a, b, ...)")
    p.add_argument("--frames", type=int, default=50, help="frames per segment")
    p.add_argument("--seed", type=int, default=0, help="first world seed")
    p.add_argument("--first-run", type=int, default=1, help="number of the first Run-N folder")
    p.add_argument("--weather", default="overcast", help="comma-separated presets, cycled over segments")
    p.add_argument("--resolution", type=_parse_resolution, default=(320, 240), help="WIDTHxHEIGHT")
    p.add_argument("--interval", type=float, default=0.5, help="simulated seconds between saved frames")
    p.add_argument("--size", type=float, default=60.0, help="forest side length, metres")
    p.add_argument("--tree-density", type=float, default=600.0, help="trees per hectare")
    p.add_argument("--overwrite", action="store_true", help="replace segments that already exist")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _synth(args: argparse.Namespace) -> int:
    from dataset_tools.synth import SynthConfig, synthesize
    from forest_perception.sim.world import WorldConfig

    config = SynthConfig(
        runs=args.runs,
        segments_per_run=args.segments,
        frames_per_segment=args.frames,
        seed=args.seed,
        first_run=args.first_run,
        weathers=tuple(w.strip() for w in args.weather.split(",") if w.strip()),
        width=args.resolution[0],
        height=args.resolution[1],
        frame_interval_s=args.interval,
        world=WorldConfig(size_m=args.size, tree_density_per_ha=args.tree_density),
    )
    config.validate()
    report = synthesize(args.out, config, progress=not args.quiet, overwrite=args.overwrite)
    print("\n".join(report.lines()))
    return 0


def _info(args: argparse.Namespace) -> int:
    summary = dataset_summary(args.root)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        for key, value in summary.items():
            if key != "per_segment":
                print(f"{key:>24}: {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``forest-dataset`` argument parser."""
    parser = argparse.ArgumentParser(prog="forest-dataset", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_synth(sub)
    p = sub.add_parser("info", help="summarise a dataset folder")
    p.add_argument("root")
    p.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; exits 2 with a one-line message on bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"synth": _synth, "info": _info}
    try:
        return handlers[args.command](args)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"forest-dataset {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
