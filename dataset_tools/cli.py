"""``forest-dataset``: make, inspect, extract (from bags), repair, curate, split, validate, report datasets.

Bad input gives a one-line message on stderr and exit status 2 (``cli_args.run_command``); docs/dataset_tools.md
has every command.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from functools import partial

from forest_perception.cli_args import (
    InputError,
    command_parser,
    existing_dir,
    existing_file,
    float_within,
    fraction,
    image_size,
    non_negative_float,
    non_negative_int,
    output_dir,
    output_file,
    positive_float,
    positive_int,
    run_command,
)
from forest_perception.dataset_tools.layout import dataset_summary
from forest_perception.dataset_tools.settings import add_reading_arguments, settings_from_args

PROG = "forest-dataset"
SYNTH_IMAGE_HW = (240, 320)
SYNTH_MIN_SIZE_M = 12.0
"""The smallest forest ``WorldConfig`` allows around its default central clearing (4 x 3 m)."""


def style_names(text: str) -> tuple[str, ...]:
    """``--style``: comma-separated style names (``forest_perception.sim.styles.STYLE_NAMES``)."""
    from forest_perception.sim.styles import STYLE_NAMES

    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"give at least one style; known styles: {', '.join(STYLE_NAMES)}")
    for name in names:
        if name not in STYLE_NAMES:
            raise argparse.ArgumentTypeError(f"unknown style {name!r}; known styles: {', '.join(STYLE_NAMES)}")
    return names


def _add_synth(sub: argparse._SubParsersAction) -> None:
    from forest_perception.sim.styles import HOLD_OUT

    p = sub.add_parser("synth", help="render a synthetic dataset from simulated forests")
    p.add_argument("--out", required=True, type=output_dir, help="dataset root folder")
    p.add_argument("--runs", type=positive_int, default=1, help="forests (Run-N folders), seeds seed..seed+runs-1")
    p.add_argument("--segments", type=positive_int, default=2, help="drives per run (segments a, b, ...)")
    p.add_argument("--frames", type=positive_int, default=50, help="frames per segment")
    p.add_argument("--seed", type=non_negative_int, default=0, help="first world seed")
    p.add_argument("--first-run", type=non_negative_int, default=1, help="number of the first Run-N folder")
    p.add_argument("--style", type=style_names, default=(), metavar="NAME[,NAME...]",
                   help="forest styles cycled over the segments, each segment a forest of its own sampled from "
                        "its style (randomised: mixes the styles; wide: every factor on its own, on the styles' ranges "
                        "stretched; full: the scene on every value the simulator allows, wide's light and camera); "
                        "see 'forest-dataset styles'")
    p.add_argument("--exclude-styles", type=style_names, default=(), metavar="NAME[,NAME...]",
                   help="styles randomised and wide never draw from: those held out of training "
                        f"(the shipped networks': {','.join(HOLD_OUT)})")
    p.add_argument("--weather", default="",
                   help="comma-separated presets, cycled over segments (default: overcast; with --style, each "
                        "style's own sampled light)")
    p.add_argument("--image-size", type=image_size, default=SYNTH_IMAGE_HW, metavar="WIDTHxHEIGHT",
                   help="camera frames")
    p.add_argument("--interval", type=float_within(0.01, 60), default=0.5,
                   help="simulated seconds between saved frames")
    p.add_argument("--size", type=float_within(SYNTH_MIN_SIZE_M, 1000), default=60.0,
                   help=f"forest side length, metres ({SYNTH_MIN_SIZE_M:g} to 1000)")
    p.add_argument("--tree-density", type=float_within(0, 5000), default=None,
                   help="trees per hectare (default: 600; with --style, the style's sampled density)")
    p.add_argument("--min-spacing", type=float_within(0, 20), default=0.0,
                   help="hold a frame back until the rover moved this far (m) or turned 30 degrees; 0: off")
    p.add_argument("--overwrite", action="store_true", help="replace segments that already exist")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _synth(args: argparse.Namespace) -> int:
    from forest_perception.dataset_tools.synth import SynthConfig, synthesize
    from forest_perception.sim.world import WorldConfig

    density = args.tree_density
    config = SynthConfig(
        runs=args.runs,
        segments_per_run=args.segments,
        frames_per_segment=args.frames,
        seed=args.seed,
        first_run=args.first_run,
        weathers=tuple(w.strip() for w in args.weather.split(",") if w.strip()),
        width=args.image_size[1],
        height=args.image_size[0],
        frame_interval_s=args.interval,
        world=WorldConfig(size_m=args.size, tree_density_per_ha=600.0 if density is None else density),
        styles=args.style,
        world_overrides=(("tree_density_per_ha", density),) if args.style and density is not None else (),
        min_spacing_m=args.min_spacing,
        exclude_styles=args.exclude_styles,
    )
    config.validate()
    from forest_perception.dataset_tools.synth import fork_available

    # each forest in a child process: PyBullet keeps memory of every scene, so a long job would grow
    report = synthesize(args.out, config, progress=not args.quiet, overwrite=args.overwrite,
                        isolate=fork_available())
    print("\n".join(report.lines()))
    return 0


def _add_styles(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("styles", help="list the forest styles of synth --style, their factors, or render a montage")
    p.add_argument("--factors", action="store_true", help="list every randomised factor: unit, range, meaning")
    p.add_argument("--json", action="store_true", help="print the styles (and factors) as JSON")
    p.add_argument("--montage", type=partial(output_file, suffix=".png"), default=None, metavar="PNG",
                   help="render one frame of each style (RGB | depth) into this PNG, and time the renders")
    p.add_argument("--only", type=style_names, default=None, metavar="NAME[,NAME...]",
                   help="styles for --montage (default: all)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="style seed of the montage frames")
    p.add_argument("--image-size", type=image_size, default=(120, 160), metavar="WIDTHxHEIGHT",
                   help="montage frames")
    p.add_argument("--frames", type=positive_int, default=1,
                   help="frames rendered per style, 0.5 s apart (more: steadier timing; the last is shown)")


def _styles(args: argparse.Namespace) -> int:
    from forest_perception.sim.styles import (
        FACTORS,
        FULL,
        RANDOMISED,
        STYLES,
        WIDE,
        factor_table,
        full_range,
        wide_range,
    )

    if args.montage is not None:
        from forest_perception.sim.style_preview import style_montage
        from forest_perception.sim.styles import STYLE_NAMES

        frames = style_montage(args.montage, args.only or STYLE_NAMES, seed=args.seed, width=args.image_size[1],
                               height=args.image_size[0], frames=args.frames)
        h, w = args.image_size
        print(f"wrote {args.montage}: {len(frames)} styles, {w}x{h}, seed {args.seed}")
        for f in frames:
            print(f"  {f.style.style:<20} scene built in {f.build_s:5.2f} s, first frame {f.render_ms[0]:6.1f} ms, "
                  f"then {f.median_render_ms:6.1f} ms/frame")
        return 0
    styles = {name: {"description": s.description, "ranges": {k: list(v) for k, v in s.ranges.items()}}
              for name, s in STYLES.items()}
    styles[RANDOMISED] = {"description": "mixes the styles: each group of factors from a style drawn per seed",
                          "ranges": {}}
    styles[WIDE] = {"description": "plain domain randomisation: every factor on its own, uniformly on the styles' "
                                   "joint range stretched by a quarter at both ends",
                    "ranges": {f: list(wide_range(f)) for f in FACTORS}}
    styles[FULL] = {"description": "the widest scene randomisation: terrain, stand, crowns, undergrowth and "
                                   "palette factors each on its own, uniformly on its whole allowed range; light "
                                   "and camera as in wide",
                    "ranges": {f: list(full_range(f)) for f in FACTORS}}
    if args.json:
        data = {"styles": styles}
        if args.factors:
            data["factors"] = factor_table()
        print(json.dumps(data, indent=2))
        return 0
    if args.factors:
        width = max(len(n) for n in FACTORS)
        for row in factor_table():
            low, high = row["range"]
            print(f"{row['name']:<{width}}  {row['group']:<11} [{low:g}, {high:g}] {row['unit']}: {row['doc']}")
        return 0
    width = max(len(n) for n in styles)
    for name, style in styles.items():
        print(f"{name:<{width}}  {style['description']}")
    return 0


def _info(args: argparse.Namespace) -> int:
    summary = dataset_summary(args.root, settings=settings_from_args(args))
    if not summary["segments"]:
        raise InputError(
            f"{args.root} is not a dataset: it holds no Run-<N>/<segment>/metadata.csv folders; give the folder "
            "above the Run-N folders (docs/dataset_layout.md)"
        )
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        for key, value in summary.items():
            if key == "per_segment":
                continue
            if isinstance(value, dict):
                value = ", ".join(f"{k} -> {v or '(plain)'}" for k, v in value.items()) or "-"
            elif isinstance(value, list):
                value = ", ".join(str(v) for v in value) or "-"
            print(f"{key:>24}: {'-' if value in ('', None) else value}")
    return 0


def _add_curate(sub: argparse._SubParsersAction) -> None:
    from forest_perception.dataset_tools.curate import CurateConfig

    d = CurateConfig()
    p = sub.add_parser(
        "curate",
        help="keep sharp, distinct, spread-out frames into a new dataset (+ curation.csv with every decision)",
    )
    p.add_argument("source", type=existing_dir, help="input dataset root (Run-N/<segment>/ folders); only read")
    p.add_argument("--out", required=True, type=output_dir, help="new dataset folder (must not exist or be empty)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--count", type=positive_int, help="frames to keep (default: all that pass the filters)")
    target.add_argument("--fraction", type=fraction, help="fraction of the input frames to keep, (0, 1]")
    p.add_argument("--blur-ratio", type=float_within(0, 1), default=d.blur_ratio,
                   help="blurry below this fraction of the neighbours' sharpness (0 = off)")
    p.add_argument("--blur-window", type=positive_int, default=d.blur_window, help="neighbours either side, frames")
    p.add_argument("--blur-percentile", type=float_within(0, 100), default=d.blur_percentile,
                   help="percentile of the neighbours' sharpness used as reference")
    p.add_argument("--min-laplacian", type=non_negative_float, default=d.min_laplacian,
                   help="absolute floor of the variance of the Laplacian")
    p.add_argument("--min-tenengrad", type=non_negative_float, default=d.min_tenengrad,
                   help="absolute floor of Tenengrad")
    p.add_argument("--duplicate-distance", type=float_within(0, 2), default=d.duplicate_distance,
                   help="descriptor distance (0..2) under which frames are near duplicates (0 = off)")
    p.add_argument("--duplicate-window", type=non_negative_float, default=d.duplicate_window_s,
                   help="seconds either side within a segment compared for duplicates")
    p.add_argument("--duplicate-radius", type=non_negative_float, default=d.duplicate_radius_m,
                   help="with GPS, also compare frames of any segment within this many metres (0 = off)")
    p.add_argument("--min-depth-valid", type=float_within(0, 1), default=d.min_depth_valid,
                   help="drop frames with a smaller fraction of valid depth pixels")
    p.add_argument("--no-depth-check", action="store_true", help="do not decode depth (faster; no no_depth drops)")
    p.add_argument("--min-spacing", type=non_negative_float, default=d.min_spacing_m,
                   help="metres between kept frames (GPS)")
    p.add_argument("--min-interval", type=non_negative_float, default=d.min_interval_s,
                   help="seconds between kept frames of one segment")
    p.add_argument("--seed", type=non_negative_int, default=d.seed, help="seed of the first farthest-point pick")
    p.add_argument("--workers", type=positive_int, help="scoring threads (default: one per core)")
    p.add_argument("--copy", action="store_true", help="copy images instead of hard-linking them")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_reading_arguments(p)


def _curate(args: argparse.Namespace) -> int:
    from forest_perception.dataset_tools.curate import CurateConfig, curate

    config = CurateConfig(
        count=args.count,
        fraction=args.fraction,
        blur_ratio=args.blur_ratio,
        blur_window=args.blur_window,
        blur_percentile=args.blur_percentile,
        min_laplacian=args.min_laplacian,
        min_tenengrad=args.min_tenengrad,
        duplicate_distance=args.duplicate_distance,
        duplicate_window_s=args.duplicate_window,
        duplicate_radius_m=args.duplicate_radius,
        min_depth_valid=args.min_depth_valid,
        check_depth=not args.no_depth_check,
        min_spacing_m=args.min_spacing,
        min_interval_s=args.min_interval,
        seed=args.seed,
        workers=args.workers,
        link=not args.copy,
    )
    result = curate(args.source, args.out, config, progress=not args.quiet, settings=settings_from_args(args))
    print("\n".join(result.lines()))
    return 0


def _fractions(text: str) -> tuple[float, float, float]:
    from forest_perception.dataset_tools.split import parse_fractions

    try:
        return parse_fractions(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_split(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("split", help="train/val/test split by segment, run or GPS region (never by frame)")
    p.add_argument("root", type=existing_dir, help="dataset root")
    p.add_argument("--by", choices=("segment", "run", "gps"), default="segment", help="what a group is")
    p.add_argument("--fractions", type=_fractions, default="0.8,0.1,0.1",
                   help="train,val,test fractions summing to 1")
    p.add_argument("--seed", type=non_negative_int, default=0, help="shuffle seed")
    p.add_argument("--cell", type=positive_float, default=50.0, help="--by gps: grid cell side, metres")
    p.add_argument("--gap", type=non_negative_float, default=0.0,
                   help="--by gps: leave out frames closer than this many metres to another split")
    p.add_argument("--out", type=output_dir,
                   help="folder for splits.json and train/val/test.txt (default: the dataset root)")
    p.add_argument("--overwrite", action="store_true", help="replace existing split files")
    add_reading_arguments(p)


def _split(args: argparse.Namespace) -> int:
    from forest_perception.dataset_tools.split import split_dataset, write_splits

    result = split_dataset(args.root, by=args.by, fractions=args.fractions, seed=args.seed, cell_m=args.cell,
                           gap_m=args.gap, settings=settings_from_args(args))
    paths = write_splits(result, args.out, overwrite=args.overwrite)
    print("\n".join(result.lines()))
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


def _add_validate(sub: argparse._SubParsersAction) -> None:
    from forest_perception.dataset_tools.validate import ValidateConfig

    d = ValidateConfig()
    p = sub.add_parser("validate", help="check a dataset folder; list every problem with its file (exit 1 on errors)")
    p.add_argument("root", type=existing_dir, help="dataset root")
    p.add_argument("--max-depth", type=positive_float, default=d.max_depth_m, help="plausible depth limit, metres")
    p.add_argument("--max-far-fraction", type=float_within(0, 1, high_open=True), default=d.max_far_fraction,
                   help="error when more of a depth image's valid pixels lie beyond --max-depth")
    p.add_argument("--quick", action="store_true", help="check PNG headers only, do not decode images")
    p.add_argument("--workers", type=positive_int, help="decoding threads (default: one per core)")
    p.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_reading_arguments(p)


def _validate(args: argparse.Namespace) -> int:
    from forest_perception.dataset_tools.validate import ValidateConfig, validate_dataset

    config = ValidateConfig(
        max_depth_m=args.max_depth, max_far_fraction=args.max_far_fraction, decode=not args.quick,
        workers=args.workers,
    )
    report = validate_dataset(args.root, config, progress=not args.quiet and not args.json,
                              settings=settings_from_args(args))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print("\n".join(report.lines()))
    failed = not report.ok or (args.strict and report.warnings)
    return 1 if failed else 0


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write a self-contained HTML report (plots, examples, curation, splits)")
    p.add_argument("root", type=existing_dir, help="dataset root")
    p.add_argument("--out", type=output_file, help="HTML file (default: ROOT/report.html)")
    p.add_argument("--curation", type=existing_file,
                   help="curation.csv to show (default: ROOT/curation.csv when present)")
    p.add_argument("--splits", type=existing_file, help="splits.json to show (default: ROOT/splits.json when present)")
    p.add_argument("--examples", type=non_negative_int, default=6, help="example frames to show")
    p.add_argument("--sample", type=non_negative_int, default=200,
                   help="frames decoded for the depth/sharpness histograms")
    p.add_argument("--max-depth", type=positive_float, default=10.0, help="far end of the depth colour map, metres")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")
    add_reading_arguments(p)


def _report(args: argparse.Namespace) -> int:
    from forest_perception.dataset_tools.report import build_report

    path = build_report(
        args.root, args.out, curation=args.curation, splits=args.splits, examples=args.examples,
        sample=args.sample, max_depth_m=args.max_depth, overwrite=args.overwrite, settings=settings_from_args(args),
    )
    print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB)")
    return 0


def _add_bags(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract", help="bag -> frames in the dataset layout, through the rover's sensor sync")
    p.add_argument("bag", help="rosbag2 bag directory (MCAP or sqlite3) or a single .mcap file")
    p.add_argument("--out", required=True, type=output_dir, help="dataset root; frames go to <out>/Run-N/<a, b, ...>")
    p.add_argument("--run", type=non_negative_int, default=None, help="Run-N number (default: the next free one)")
    p.add_argument("--namespace", default=None, help="rover namespace in the bag (default: the only one)")
    p.add_argument("--every", type=positive_int, default=1, help="keep every n-th synchronised frame")
    p.add_argument("--max-frames", type=non_negative_int, default=0, help="stop after this many frames (0: all)")
    p.add_argument("--segment-gap", type=positive_float, default=2.0,
                   help="a gap longer than this (s) starts a segment")
    p.add_argument("--segment-frames", type=non_negative_int, default=0,
                   help="frames per segment at most (0: no limit)")
    p.add_argument("--slop", type=positive_float, default=0.02, help="approximate-time slop for colour/depth/info (s)")
    p.add_argument("--queue-size", type=positive_int, default=10, help="approximate-time queue size per camera stream")
    p.add_argument("--gps-tolerance", type=positive_float, default=1.0, help="a GPS fix older than this (s) is stale")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p = sub.add_parser("repair", help="recover the MCAP files of a bag cut short (or one .mcap file) and rebuild "
                                      "metadata.yaml")
    p.add_argument("bag", help="rosbag2 bag directory or a single .mcap file")
    p = sub.add_parser("bag-info", help="summarise a bag like `ros2 bag info` and list what is wrong with it")
    p.add_argument("bag", help="rosbag2 bag directory or .mcap file")


def _extract(args: argparse.Namespace) -> int:
    from forest_perception.dataset_tools.extract import ExtractConfig, extract_bag
    from forest_perception.sync import SyncConfig

    sync = SyncConfig(queue_size=args.queue_size, slop_s=args.slop, gps_tolerance_s=args.gps_tolerance)
    config = ExtractConfig(
        namespace=args.namespace, run=args.run, sync=sync, every=args.every, max_frames=args.max_frames,
        segment_gap_s=args.segment_gap, segment_frames=args.segment_frames,
    )
    report = extract_bag(args.bag, args.out, config, progress=not args.quiet)
    print("\n".join(report.lines()))
    return 0 if report.frames_written else 1


def _repair(args: argparse.Namespace) -> int:
    from forest_perception.dataset_tools.bag_repair import repair_bag

    print(repair_bag(args.bag).summary())
    return 0


def _bag_info(args: argparse.Namespace) -> int:
    from forest_perception.dataset_tools.bags import bag_info

    info = bag_info(args.bag)
    print(info.summary())
    return 0 if info.ok else 1


def build_parser() -> argparse.ArgumentParser:
    """The ``forest-dataset`` argument parser (every subcommand's ``--help`` shows the defaults)."""
    parser, sub = command_parser(PROG, __doc__.split("\n")[0])
    _add_synth(sub)
    _add_styles(sub)
    p = sub.add_parser("info", help="summarise a dataset folder: runs, segments, frames, columns, depth PNGs")
    p.add_argument("root", type=existing_dir, help="dataset root (the folder above the Run-N folders)")
    p.add_argument("--json", action="store_true", help="print every field, per segment too, as JSON")
    add_reading_arguments(p)
    _add_curate(sub)
    _add_split(sub)
    _add_validate(sub)
    _add_report(sub)
    _add_bags(sub)
    return parser


HANDLERS = {
    "synth": _synth,
    "styles": _styles,
    "info": _info,
    "curate": _curate,
    "split": _split,
    "validate": _validate,
    "report": _report,
    "extract": _extract,
    "repair": _repair,
    "bag-info": _bag_info,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status: 2 with ``forest-dataset <command>: error: ...`` on bad input."""
    return run_command(PROG, build_parser(), lambda args: HANDLERS[args.command](args), argv)


if __name__ == "__main__":
    sys.exit(main())
