r"""Turn a trained checkpoint into shipped weights: ONNX (+ int8 when worth it), held-out metrics, model card.

    python -m forest_perception.models.release --checkpoint runs/ms/checkpoints/best.pt --name multiscale_320x240 \
        --test /srv/forest_data/test --calib /srv/forest_data/train/Run-11 --out models/weights \
        --train-command "forest-train train ..." --data-command "forest-dataset synth ..." \
        --path-alias DATA=/srv/forest_data

Metrics are measured through the rover runtime (``OnnxDepthEngine`` on full-resolution camera frames, depth
upsampled back), pooled over every valid pixel of the held-out forests; docs/training.md ("Shipping weights").
Every input is checked before the export starts, and the files are made in a hidden folder inside ``--out`` and
moved into place only when all of them are complete: a failed release writes nothing (exit 2, one line; 1 when the
export differs from PyTorch). The commands recorded in the cards, the ONNX metadata and the shipped checkpoint are
written so that another person can run them: each ``--path-alias NAME=DIR`` folder becomes its placeholder, and a
release that would still record an absolute path of this machine is refused before anything is written (unless
``--keep-machine-paths``).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from forest_perception.cli_args import (
    ArgumentParser,
    InputError,
    describe_error,
    existing_dir,
    existing_file,
    format_image_size,
    non_negative_float,
    run_command,
)
from forest_perception.dataset_tools.layout import load_frame
from forest_perception.inference import OnnxDepthEngine
from forest_perception.models.cli_types import RawDefaultsHelpFormatter, output_folder
from forest_perception.models.metrics import MetricAccumulator, format_metric_table
from forest_perception.models.provenance import (
    PathAlias,
    machine_paths,
    path_alias_arg,
    recorded_argv,
    replace_paths,
    replace_recorded_paths,
    training_record,
)

PROG = "python -m forest_perception.models.release"
EXIT_VERIFICATION = 1
NAME_PATTERN = re.compile(r"^(?P<model>[a-z][a-z0-9]*)_(?P<width>\d+)x(?P<height>\d+)$")


def held_out_frames(root: str | Path, limit: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(rgb, depth) pairs of every frame under ``root`` (a dataset root or segment folder), in order."""
    from forest_perception.models.data import collect_segments

    frames = []
    for segment in collect_segments(root):
        for i in range(len(segment)):
            rgb, depth, _record = load_frame(segment, i)
            frames.append((rgb, depth))
            if limit is not None and len(frames) >= limit:
                return frames
    if not frames:
        raise ValueError(f"no frames under {root}")
    return frames


def evaluate_engine(
    path: str | Path, frames: list[tuple[np.ndarray, np.ndarray]], max_depth: float = 10.0, threads: int = 2
) -> dict[str, float]:
    """Pooled metrics and mean latency of an ONNX model on (rgb, depth) frames."""
    engine = OnnxDepthEngine(path, threads=threads)
    acc = MetricAccumulator(min_depth=0.1, max_depth=max_depth)
    latency = []
    for rgb, depth in frames:
        pred = engine.predict(rgb)
        latency.append(engine.last_latency_ms)
        pred = np.where(np.isfinite(pred), pred, max_depth)
        acc.update(pred, np.nan_to_num(depth, nan=0.0))
    result = dict(acc.result())
    result["latency_ms"] = float(np.median(latency))
    return result


def check_name(name: str, model_name: str, input_hw: Sequence[int]) -> str:
    """``name`` if it is ``<model>_<WIDTHxHEIGHT>`` of the checkpoint's network; ``InputError`` saying the right one."""
    expected = f"{model_name}_{format_image_size(input_hw)}"
    match = NAME_PATTERN.match(name)
    if match is None:
        raise InputError(f"--name {name!r} must be a file stem <model>_<WIDTHxHEIGHT>, without folder or .onnx; "
                         f"for this checkpoint: --name {expected}")
    if match["model"] != model_name:
        raise InputError(f"--name {name} names the model {match['model']!r}, but the checkpoint holds "
                         f"{model_name!r}: give --name {expected}")
    size = f"{match['width']}x{match['height']}"
    if size != format_image_size(input_hw):
        swapped = " (HEIGHTxWIDTH; sizes are written WIDTHxHEIGHT)" if size == f"{input_hw[0]}x{input_hw[1]}" else ""
        raise InputError(f"--name {name} says {size}{swapped}, but the checkpoint's input is "
                         f"{format_image_size(input_hw)}: give --name {expected}")
    return name


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m forest_perception.models.release`` argument parser."""
    parser = ArgumentParser(prog=PROG, description=__doc__, formatter_class=RawDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=existing_file, help="a .pt written by forest-train")
    parser.add_argument("--name", required=True, help="file stem: <model>_<WIDTHxHEIGHT>, e.g. multiscale_320x240")
    parser.add_argument("--test", required=True, type=existing_dir, help="held-out forests (never used in training)")
    parser.add_argument("--calib", required=True, type=existing_dir,
                        help="calibration images for int8 (training forests)")
    parser.add_argument("--out", default="models/weights", type=output_folder,
                        help="folder of the shipped weights; files of the same name are replaced")
    parser.add_argument("--train-command", default="", help="the training command, for the model card")
    parser.add_argument("--data-command", default="", help="the command that made the data, for the model card")
    parser.add_argument("--styles", nargs="+", type=existing_dir, default=[], metavar="DIR",
                        help="dataset folders named after their forest style (other seeds of training styles and "
                             "styles kept out of training): a per-style table in the card")
    parser.add_argument("--held-out-styles", nargs="+", default=[], metavar="NAME",
                        help="which --styles folders are styles kept out of training entirely")
    parser.add_argument("--max-absrel-increase", type=non_negative_float, default=0.01,
                        help="int8 is dropped when its absrel is higher than fp32's by more than this")
    parser.add_argument("--path-alias", action="append", type=path_alias_arg, default=[], metavar="NAME=DIR",
                        help="write DIR as NAME in every recorded command (the training command inside the "
                             "checkpoint, --train-command, --data-command, this release's own); repeat per folder")
    parser.add_argument("--keep-machine-paths", action="store_true",
                        help="record absolute paths of this machine that no --path-alias covers, instead of refusing")
    return parser


def recorded_checkpoint(path: Path, aliases: Sequence[PathAlias]) -> dict:
    """The checkpoint at ``path`` with its recorded strings (training command, options, blend and init sources)
    written through ``aliases``; weights untouched."""
    from forest_perception.models.torch_engine import read_checkpoint_file

    return replace_recorded_paths(read_checkpoint_file(path), aliases)


def check_recorded_paths(recorded: dict[str, object], keep: bool) -> None:
    """``InputError`` naming the absolute paths that the release would record (``recorded``: what -> strings)."""
    found = {where: paths for where, value in recorded.items() if (paths := machine_paths(value))}
    if not found or keep:
        return
    listed = "; ".join(f"{where}: {', '.join(paths[:3])}{' ...' if len(paths) > 3 else ''}"
                       for where, paths in found.items())
    raise InputError(f"the model card would record folders of this machine ({listed}); name them with --path-alias "
                     "NAME=DIR (for example --path-alias DATA=/srv/forest_data), give paths relative to the "
                     "repository, or pass --keep-machine-paths")


def _inputs(args: argparse.Namespace) -> tuple[dict, list[tuple[np.ndarray, np.ndarray]], list[np.ndarray]]:
    """Check every input before anything is written: checkpoint meta, held-out frames, calibration frames."""
    from forest_perception.models import export
    from forest_perception.models.torch_engine import load_torch_checkpoint

    _model, meta = load_torch_checkpoint(args.checkpoint)
    check_name(args.name, str(meta["model_name"]), meta["input_hw"])
    try:
        frames = held_out_frames(args.test)
    except (ValueError, OSError) as exc:
        raise InputError(f"--test {args.test}: {describe_error(exc)}") from exc
    try:
        calib = list(export.iter_calibration_images(args.calib, 64))
    except (ValueError, OSError) as exc:
        raise InputError(f"--calib {args.calib}: {describe_error(exc)}") from exc
    if not calib:
        raise InputError(f"--calib {args.calib}: none of its images can be read; give a folder of RGB images")
    labels = {Path(folder).name for folder in args.styles}
    unknown = sorted(set(args.held_out_styles) - labels)
    if unknown:
        raise InputError(f"--held-out-styles {', '.join(unknown)}: not among the --styles folders "
                         f"({', '.join(sorted(labels)) or 'none given'})")
    return meta, frames, calib


def style_table(onnx_path: Path, folders: Sequence[str | Path], held_out: Sequence[str]) -> dict:
    """The card's ``styles`` entry: metrics per style folder (labels only, no paths) and the worst held-out style."""
    from forest_perception.models.styles import evaluate_styles

    result = evaluate_styles([onnx_path], folders, progress=False)["models"][0]
    keep = ("folder", "frames", "absrel", "sqrel", "rmse", "rmse_log", "delta1", "delta2", "delta3", "scale")
    rows = [{key: row[key] for key in keep if key in row} for row in result["rows"]]
    scored = [row for row in rows if row["folder"] in set(held_out) and np.isfinite(row["absrel"])]
    return {
        "note": "each folder is forests of one style with seeds never used in training; 'held out' styles were "
                "kept out of training entirely (docs/training.md, 'Forest styles')",
        "held_out": list(held_out),
        "rows": rows,
        "worst_held_out": max(scored, key=lambda row: row["absrel"]) if scored else None,
    }


def checkpoint_vs_onnx(checkpoint_path: Path, onnx_path: Path) -> float:
    """Largest difference (metres) between a checkpoint in PyTorch and its ONNX model, on two synthetic frames."""
    import torch

    from forest_perception.depth_pipeline import synthetic_forest_image
    from forest_perception.inference import Preprocessor
    from forest_perception.models.torch_engine import load_torch_checkpoint

    model, _meta = load_torch_checkpoint(checkpoint_path)
    engine = OnnxDepthEngine(onnx_path, threads=1)
    preprocess = Preprocessor(engine.input_hw, engine.mean, engine.std)
    worst = 0.0
    for seed in (7, 8):
        x = preprocess(synthetic_forest_image(480, 640, seed=seed)).copy()
        with torch.inference_mode():
            got = model(torch.from_numpy(x)).numpy()
        worst = max(worst, float(np.abs(got - engine._infer(x)).max()))
    return worst


def write_checkpoint(checkpoint_path: Path, out_pt: Path, onnx_path: Path, made_with: str) -> dict:
    """Save the slim checkpoint (weights, no optimizer) as ``out_pt``; returns the card's ``checkpoint`` entry."""
    import torch

    from forest_perception.inference import file_sha256, weights_sha256
    from forest_perception.models.checkpoints import save_checkpoint, slim_checkpoint

    checkpoint = slim_checkpoint(torch.load(checkpoint_path, map_location="cpu", weights_only=False))
    save_checkpoint(checkpoint, out_pt)
    return {
        "file": out_pt.name,
        "size_bytes": out_pt.stat().st_size,
        "sha256": file_sha256(out_pt),
        "weights_sha256": weights_sha256(checkpoint["model_state"]),
        "holds": "state dict, model name and kwargs, input size, normalisation, depth range (no optimizer)",
        "max_abs_diff_vs_onnx_m": checkpoint_vs_onnx(out_pt, onnx_path),
        "frames_compared": 2,
        "made_with": made_with,
    }


def _release(args: argparse.Namespace, command: str) -> int:
    import torch

    inputs = _inputs(args)  # checked on the checkpoint as given, so that errors name the user's file
    aliases = list(args.path_alias)
    checkpoint = recorded_checkpoint(Path(args.checkpoint), aliases)
    command = replace_paths(command, aliases)
    args.train_command, args.data_command = replace_paths([args.train_command, args.data_command], aliases)
    test_label = replace_paths(str(args.test), aliases)
    check_recorded_paths({"the checkpoint's training record": training_record(checkpoint),
                          "--train-command": args.train_command, "--data-command": args.data_command,
                          "this release's command": command}, args.keep_machine_paths)
    with tempfile.TemporaryDirectory(prefix="forest-release-") as scratch:
        # export, card and shipped .pt all read the checkpoint with its recorded paths already replaced
        source = Path(scratch) / Path(args.checkpoint).name
        torch.save(checkpoint, source)
        args.checkpoint = str(source)
        return _release_checked(args, command, test_label, inputs)


def _release_checked(args: argparse.Namespace, command: str, test_label: str,
                     inputs: tuple[dict, list[tuple[np.ndarray, np.ndarray]], list[np.ndarray]]) -> int:
    from forest_perception.models import export

    t0 = time.perf_counter()
    _meta, frames, calib = inputs
    out = Path(args.out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    stage = out / f".release-{args.name}-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        onnx_path = stage / f"{args.name}.onnx"
        try:
            export.export_onnx(args.checkpoint, onnx_path, export_command=command)
        except export.ExportVerificationError as exc:
            print(f"{PROG}: error: {exc}; nothing was written", file=sys.stderr)
            return EXIT_VERIFICATION
        fp32 = evaluate_engine(onnx_path, frames)
        int8_path = stage / f"{args.name}_int8.onnx"
        export.quantize_int8(onnx_path, calib, int8_path)
        int8 = evaluate_engine(int8_path, frames)
        report = {
            "fp32": {"median_ms": fp32["latency_ms"], "metrics": fp32, "bytes": onnx_path.stat().st_size},
            "int8": {"median_ms": int8["latency_ms"], "metrics": int8, "bytes": int8_path.stat().st_size},
            "speedup": fp32["latency_ms"] / max(int8["latency_ms"], 1e-9),
            "size_ratio": int8_path.stat().st_size / onnx_path.stat().st_size,
            "agreement": {"mean_rel_diff": float("nan")},
        }
        keep, reason = export.keep_int8(report, args.max_absrel_increase)
        info = export.model_info(args.checkpoint)
        info.update(
            {
                "metrics": {k: v for k, v in fp32.items() if k != "latency_ms"},
                "held_out": f"{len(frames)} frames of {test_label} (forest seeds never used in training)",
                "train_command": args.train_command,
                "data_command": args.data_command,
            }
        )
        info["checkpoint"] = write_checkpoint(Path(args.checkpoint), stage / f"{args.name}.pt", onnx_path,
                                              f"{args.train_command} (its best checkpoint, without optimizer state)")
        if args.styles:
            info["styles"] = style_table(onnx_path, args.styles, args.held_out_styles)
        export.write_model_card(onnx_path, info)
        if keep:
            int8_info = {**info, "metrics": {k: v for k, v in int8.items() if k != "latency_ms"}, "int8": report,
                         "checkpoint": {**{k: info["checkpoint"][k] for k in ("file", "size_bytes", "sha256",
                                                                              "weights_sha256")},
                                        "holds": f"the weights of the fp32 network {args.name} (fine-tuning "
                                                 "starts from them)"}}
            if args.styles:
                int8_info["styles"] = style_table(int8_path, args.styles, args.held_out_styles)
            export.write_model_card(int8_path, int8_info)
        else:
            export.remove_model_files(int8_path)
            for old in export.remove_model_files(out / int8_path.name):  # it belonged to an earlier fp32 model
                print(f"removed {old}: the int8 model of an earlier release")
        # everything is complete: move it into place, the fp32 model last
        for path in sorted(stage.iterdir(), key=lambda p: p.name == onnx_path.name):
            os.replace(path, out / path.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if created and not any(out.iterdir()):
            out.rmdir()
    rows = {f"{args.name} fp32": fp32, f"{args.name} int8": int8}
    print(format_metric_table({k: {m: v for m, v in r.items() if m != "latency_ms"} for k, r in rows.items()}))
    print(f"latency (this CPU, 2 threads): fp32 {fp32['latency_ms']:.1f} ms, int8 {int8['latency_ms']:.1f} ms")
    print(f"{reason if keep else 'int8 dropped: ' + reason} ({time.perf_counter() - t0:.0f} s)")
    print(f"wrote {args.name}.onnx{f' and {args.name}_int8.onnx' if keep else ''} with their cards to {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Export, quantise, evaluate and write the model card; prints the metric table. Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = shlex.join([PROG, *recorded_argv(argv)])
    return run_command(PROG, build_parser(), lambda args: _release(args, command), argv)


if __name__ == "__main__":
    sys.exit(main())
