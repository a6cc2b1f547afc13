"""``forest-train``: train, evaluate and export the depth networks on forest dataset folders.

Examples::

    forest-train train --model autoencoder --data data/synth --val-fraction 0.2 --epochs 20 --out runs/ae
    forest-train train --model autoencoder --data data/synth --resume runs/ae/checkpoints/last.pt --out runs/ae
    forest-train eval --checkpoint runs/ae/checkpoints/best.pt --data data/test --out runs/ae/eval
    forest-train export --checkpoint runs/ae/checkpoints/best.pt --out runs/ae/autoencoder_320x240.onnx

Bad input (a missing folder, an unknown model, a bad input size, no frames) gives a one-line error on stderr
and exit status 2; an export that differs from PyTorch beyond the tolerance exits 1. docs/training.md has more.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from forest_perception.cli_args import (
    ArgumentParser,
    UsageError,
    existing_dir,
    existing_file,
    format_image_size,
    image_size,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from forest_perception.models.trainer import SCHEDULERS, TrainOptions

PROG = "forest-train"
EXIT_USAGE = 2
EXIT_VERIFICATION = 1


class _InputError(Exception):
    pass


def _model_kwarg(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"model kwarg must be KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _add_train(sub: argparse._SubParsersAction) -> None:
    defaults = TrainOptions()
    train = sub.add_parser("train", help="train a depth network")
    train.add_argument("--model", default=defaults.model, help="network name (autoencoder, multiscale)")
    train.add_argument("--model-kwarg", action="append", type=_model_kwarg, default=[], metavar="KEY=VALUE",
                       help="constructor argument of the network, repeatable (value parsed as JSON)")
    train.add_argument("--image-size", dest="input_hw", type=image_size, default=defaults.input_hw,
                       metavar="WIDTHxHEIGHT", help="network input, multiples of 16 "
                       f"(default {format_image_size(defaults.input_hw)})")
    train.add_argument("--data", nargs="+", required=True, type=existing_dir, metavar="DIR",
                       help="training dataset roots/segments")
    train.add_argument("--val", nargs="+", default=[], type=existing_dir, metavar="DIR",
                       help="validation roots (else --val-fraction)")
    train.add_argument("--val-fraction", type=float, default=defaults.val_fraction,
                       help="fraction of training segments held out for validation when no --val")
    train.add_argument("--epochs", type=positive_int, default=defaults.epochs)
    train.add_argument("--batch-size", type=positive_int, default=defaults.batch_size)
    train.add_argument("--lr", type=positive_float, default=defaults.lr)
    train.add_argument("--weight-decay", type=non_negative_float, default=defaults.weight_decay)
    train.add_argument("--scheduler", choices=SCHEDULERS, default=defaults.scheduler)
    train.add_argument("--step-size", type=positive_int, default=defaults.step_size,
                       help="epochs per step (step scheduler)")
    train.add_argument("--gamma", type=non_negative_float, default=defaults.gamma,
                       help="lr factor per step (step scheduler)")
    train.add_argument("--loss-silog", type=non_negative_float, default=defaults.loss_silog)
    train.add_argument("--loss-berhu", type=non_negative_float, default=defaults.loss_berhu)
    train.add_argument("--loss-l1", type=non_negative_float, default=defaults.loss_l1)
    train.add_argument("--loss-smooth", type=non_negative_float, default=defaults.loss_smooth)
    train.add_argument("--min-depth", type=positive_float, default=defaults.min_depth)
    train.add_argument("--max-depth", type=positive_float, default=defaults.max_depth)
    train.add_argument("--no-augment", dest="augment", action="store_false", help="no flip/jitter/blur")
    train.add_argument("--workers", type=non_negative_int, default=defaults.workers,
                       help="DataLoader worker processes")
    train.add_argument("--seed", type=non_negative_int, default=defaults.seed)
    train.add_argument("--out", default=defaults.out, help="output folder (checkpoints/, log.csv, curves.png)")
    train.add_argument("--device", default=defaults.device, help="cpu, cuda, cuda:N or auto")
    train.add_argument("--threads", type=non_negative_int, default=defaults.threads,
                       help="torch CPU threads (0 = default)")
    train.add_argument("--resume", default=None, type=existing_file, metavar="CHECKPOINT",
                       help="continue from a last.pt")
    train.add_argument("--eval-every", type=positive_int, default=defaults.eval_every,
                       help="validate every N epochs")
    train.add_argument("--max-batches", type=non_negative_int, default=defaults.max_batches,
                       help="stop each epoch after N batches (0 = all; for quick runs and benchmarks)")
    train.add_argument("--quiet", dest="progress", action="store_false", help="no progress bars")
    train.set_defaults(handler=_train)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="evaluate a checkpoint")
    ev.add_argument("--checkpoint", required=True, type=existing_file, help="a .pt written by 'forest-train train'")
    ev.add_argument("--data", nargs="+", required=True, type=existing_dir, metavar="DIR",
                    help="dataset roots/segments")
    ev.add_argument("--out", default=None, help="folder for example pictures and metrics.json")
    ev.add_argument("--max-depth", type=positive_float, default=None, help="default: the checkpoint's")
    ev.add_argument("--min-depth", type=positive_float, default=None, help="default: the checkpoint's")
    ev.add_argument("--batch-size", type=positive_int, default=8)
    ev.add_argument("--examples", type=non_negative_int, default=8, help="number of example pictures")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--workers", type=non_negative_int, default=0)
    ev.add_argument("--quiet", dest="progress", action="store_false")
    ev.set_defaults(handler=_eval)


def _add_export(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser("export", help="checkpoint -> verified ONNX, model card, optional int8")
    export.add_argument("--checkpoint", required=True, type=existing_file, help="training checkpoint (.pt/.pth)")
    export.add_argument("--out", required=True, type=Path, help="output .onnx path")
    export.add_argument("--image-size", dest="input_hw", type=image_size, default=None, metavar="WIDTHxHEIGHT",
                        help="network input (default: the checkpoint's)")
    export.add_argument("--opset", type=positive_int, default=17)
    export.add_argument("--dynamic-batch", action="store_true", help="dynamic batch dimension")
    export.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo")
    export.add_argument("--tolerance", type=positive_float, default=1e-3, help="max abs error vs PyTorch, metres")
    export.add_argument("--int8", action="store_true", help="also write <out>_int8.onnx (needs --calib)")
    export.add_argument("--calib", type=existing_dir, help="folder of RGB calibration images (searched recursively)")
    export.add_argument("--calib-count", type=positive_int, default=64, help="calibration frames to use")
    export.add_argument("--keep-int8-anyway", action="store_true",
                        help="keep the int8 model even when keep_int8() says it is not worth it")
    export.set_defaults(handler=_export)


def build_parser() -> argparse.ArgumentParser:
    """The ``forest-train`` argument parser with its ``train``, ``eval`` and ``export`` subcommands."""
    parser = ArgumentParser(prog=PROG, description="Train, evaluate and export forest depth networks.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    _add_train(sub)
    _add_eval(sub)
    _add_export(sub)
    return parser


def _train(args: argparse.Namespace, command: str) -> int:
    from forest_perception.models.trainer import Trainer

    opts = TrainOptions(
        model=args.model, model_kwargs=dict(args.model_kwarg), input_hw=args.input_hw,
        data=[str(p) for p in args.data], val=[str(p) for p in args.val], val_fraction=args.val_fraction,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        scheduler=args.scheduler, step_size=args.step_size, gamma=args.gamma, loss_silog=args.loss_silog,
        loss_berhu=args.loss_berhu, loss_l1=args.loss_l1, loss_smooth=args.loss_smooth, min_depth=args.min_depth,
        max_depth=args.max_depth, augment=args.augment, workers=args.workers, seed=args.seed, out=args.out,
        device=args.device, threads=args.threads, resume=None if args.resume is None else str(args.resume),
        eval_every=args.eval_every, max_batches=args.max_batches, progress=args.progress, command=command,
    )
    try:
        trainer = Trainer(opts)
    except (ValueError, FileNotFoundError) as exc:
        raise _InputError(str(exc)) from None
    # errors past this point are bugs or hardware trouble: let them show their traceback
    history = trainer.train()
    last = history[-1] if history else {}
    summary = ", ".join(f"{k} {last[k]:.4f}" for k in ("train_loss", "val_absrel", "val_delta1") if k in last)
    print(f"done: {trainer.epoch} epoch(s){'; ' + summary if summary else ''}; "
          f"checkpoints in {trainer.checkpoint_dir}")
    return 0


def _eval(args: argparse.Namespace, command: str) -> int:
    from forest_perception.models.evaluate import evaluate

    try:
        evaluate(args.checkpoint, [str(p) for p in args.data], max_depth=args.max_depth, min_depth=args.min_depth,
                 out=args.out, batch_size=args.batch_size, num_examples=args.examples, device=args.device,
                 workers=args.workers, progress=args.progress)
    except (ValueError, FileNotFoundError) as exc:
        raise _InputError(str(exc)) from None
    return 0


def _export(args: argparse.Namespace, command: str) -> int:
    from forest_perception.inference import ModelLoadError
    from forest_perception.models.export import (
        ExportVerificationError,
        compare_int8,
        export_onnx,
        iter_calibration_images,
        keep_int8,
        model_info,
        quantize_int8,
        write_model_card,
    )

    if args.out.suffix.lower() != ".onnx":
        raise _InputError(f"--out {str(args.out)!r} must end in .onnx")
    if args.int8 and not args.calib:
        raise _InputError("--int8 needs --calib DIR (calibration images)")
    try:
        path = export_onnx(str(args.checkpoint), args.out, args.input_hw, opset=args.opset,
                           dynamic_batch=args.dynamic_batch, exporter=args.exporter, tolerance_m=args.tolerance,
                           export_command=command)
        info = model_info(str(args.checkpoint))
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
    except (ModelLoadError, ValueError) as exc:
        raise _InputError(str(exc).splitlines()[0] if str(exc) else repr(exc)) from None
    except ExportVerificationError as exc:
        print(f"{PROG} export: error: {exc}", file=sys.stderr)
        return EXIT_VERIFICATION
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``forest-train``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = shlex.join([PROG, *argv])
    try:
        args = build_parser().parse_args(argv)
        return args.handler(args, command)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except _InputError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
