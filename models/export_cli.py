"""``export`` subcommand: checkpoint -> verified ONNX (+ optional int8) with model cards.

Meant to be wired as ``forest-train export ...``; runs on its own as ``python -m models.export_cli export ...``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from forest_perception.inference import ModelLoadError


class _UsageError(Exception):
    """Bad command line (reported on one line, exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # noqa: D102 - argparse hook
        raise _UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """Parser for ``export --checkpoint PATH --out PATH [--int8 --calib DIR]``."""
    parser = _Parser(prog="forest-train", description="Export depth networks to ONNX.")
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="checkpoint -> verified ONNX, model card, optional int8")
    add_export_arguments(export)
    return parser


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the export options to ``parser`` (for wiring into another CLI's subparsers)."""
    parser.add_argument("--checkpoint", required=True, help="training checkpoint (.pt/.pth)")
    parser.add_argument("--out", required=True, help="output .onnx path")
    parser.add_argument("--input-hw", type=int, nargs=2, metavar=("H", "W"), help="network input (default: checkpoint)")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--dynamic-batch", action="store_true", help="dynamic batch dimension")
    parser.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="max abs error vs PyTorch, metres")
    parser.add_argument("--int8", action="store_true", help="also write <out>_int8.onnx (needs --calib)")
    parser.add_argument("--calib", help="folder of RGB calibration images (searched recursively)")
    parser.add_argument("--calib-count", type=int, default=64, help="calibration frames to use")
    parser.add_argument("--keep-int8-anyway", action="store_true",
                        help="keep the int8 model even when keep_int8() says it is not worth it")


def run_export(args: argparse.Namespace, command: str) -> int:
    """Do the export described by parsed ``args``; returns the exit status."""
    from forest_perception.models.export import (
        compare_int8,
        export_onnx,
        iter_calibration_images,
        keep_int8,
        quantize_int8,
        write_model_card,
    )

    checkpoint, out = Path(args.checkpoint), Path(args.out)
    if not checkpoint.is_file():
        raise _UsageError(f"--checkpoint {str(checkpoint)!r} does not exist")
    if out.suffix.lower() != ".onnx":
        raise _UsageError(f"--out {str(out)!r} must end in .onnx")
    if args.int8 and not args.calib:
        raise _UsageError("--int8 needs --calib DIR (calibration images)")
    if args.calib and not Path(args.calib).is_dir():
        raise _UsageError(f"--calib {args.calib!r} is not a folder")
    path = export_onnx(str(checkpoint), out, args.input_hw, opset=args.opset, dynamic_batch=args.dynamic_batch,
                       exporter=args.exporter, tolerance_m=args.tolerance, export_command=command)
    info = _model_info(str(checkpoint))
    write_model_card(path, info)
    print(f"wrote {path} and {path.with_suffix('.md').name}")
    if args.int8:
        int8_path = path.with_name(f"{path.stem}_int8.onnx")
        frames = list(iter_calibration_images(args.calib, args.calib_count))
        quantize_int8(path, frames, int8_path)
        report = compare_int8(path, int8_path, frames[:16])
        keep, reason = keep_int8(report)
        print(reason)
        if keep or args.keep_int8_anyway:
            write_model_card(int8_path, {**info, "int8": report})
            print(f"wrote {int8_path}")
        else:
            int8_path.unlink(missing_ok=True)
    return 0


def _model_info(checkpoint: str) -> dict[str, object]:
    from forest_perception.models.torch_engine import load_torch_checkpoint

    model, meta = load_torch_checkpoint(checkpoint)
    info: dict[str, object] = {}
    try:
        from forest_perception.models.networks import count_flops, count_parameters

        info["params"] = count_parameters(model)
        info["flops"] = count_flops(model, meta["input_hw"])
    except (ImportError, RuntimeError, ValueError):
        pass
    return info


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``export --checkpoint PATH --out PATH [--int8 --calib DIR]``; 2 on bad input."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = shlex.join(["forest-train", *argv])
    from forest_perception.models.export import ExportVerificationError

    try:
        args = build_parser().parse_args(argv)
        return run_export(args, command)
    except (_UsageError, ModelLoadError, ValueError) as error:
        print(f"forest-train export: error: {str(error).splitlines()[0] if str(error) else error!r}", file=sys.stderr)
        return 2
    except ExportVerificationError as error:
        print(f"forest-train export: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
