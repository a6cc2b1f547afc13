"""``forest-train``: train and evaluate the depth networks on forest dataset folders.

Examples::

    forest-train train --model autoencoder --data data/synth --val-fraction 0.2 --epochs 20 --out runs/ae
    forest-train train --model autoencoder --data data/synth --resume runs/ae/checkpoints/last.pt --out runs/ae
    forest-train eval --checkpoint runs/ae/checkpoints/best.pt --data data/test --out runs/ae/eval

Bad input (a missing folder, an unknown model, a bad input size, no frames) gives a
one-line error on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from forest_perception.models.trainer import SCHEDULERS, TrainOptions

PROG = "forest-train"
EXIT_USAGE = 2


class _UsageError(Exception):
    pass


class _InputError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line instead of usage text + message."""

    def error(self, message: str) -> None:  # noqa: D102
        raise _UsageError(f"{self.prog}: error: {message}")


def _input_hw(text: str) -> tuple[int, int]:
    parts = text.lower().replace(",", "x").split("x")
    try:
        height, width = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"input size must be HEIGHTxWIDTH like 240x320, got {text!r}") from None
    return height, width


def _model_kwarg(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"model kwarg must be KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _build_parser() -> _Parser:
    defaults = TrainOptions()
    parser = _Parser(prog=PROG, description="Train and evaluate forest depth networks.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train a depth network")
    train.add_argument("--model", default=defaults.model, help="network name (autoencoder, multiscale)")
    train.add_argument("--model-kwarg", action="append", type=_model_kwarg, default=[], metavar="KEY=VALUE",
                       help="constructor argument of the network, repeatable (value parsed as JSON)")
    train.add_argument("--input-hw", type=_input_hw, default=defaults.input_hw, metavar="HxW",
                       help="network input HEIGHTxWIDTH, multiples of 16 (default 240x320)")
    train.add_argument("--data", nargs="+", required=True, metavar="DIR", help="training dataset roots/segments")
    train.add_argument("--val", nargs="+", default=[], metavar="DIR", help="validation roots (else --val-fraction)")
    train.add_argument("--val-fraction", type=float, default=defaults.val_fraction,
                       help="fraction of training segments held out for validation when no --val")
    train.add_argument("--epochs", type=int, default=defaults.epochs)
    train.add_argument("--batch-size", type=int, default=defaults.batch_size)
    train.add_argument("--lr", type=float, default=defaults.lr)
    train.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    train.add_argument("--scheduler", choices=SCHEDULERS, default=defaults.scheduler)
    train.add_argument("--step-size", type=int, default=defaults.step_size, help="epochs per step (step scheduler)")
    train.add_argument("--gamma", type=float, default=defaults.gamma, help="lr factor per step (step scheduler)")
    train.add_argument("--loss-silog", type=float, default=defaults.loss_silog)
    train.add_argument("--loss-berhu", type=float, default=defaults.loss_berhu)
    train.add_argument("--loss-l1", type=float, default=defaults.loss_l1)
    train.add_argument("--loss-smooth", type=float, default=defaults.loss_smooth)
    train.add_argument("--min-depth", type=float, default=defaults.min_depth)
    train.add_argument("--max-depth", type=float, default=defaults.max_depth)
    train.add_argument("--no-augment", dest="augment", action="store_false", help="no flip/jitter/blur")
    train.add_argument("--workers", type=int, default=defaults.workers, help="DataLoader worker processes")
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument("--out", default=defaults.out, help="output folder (checkpoints/, log.csv, curves.png)")
    train.add_argument("--device", default=defaults.device, help="cpu, cuda, cuda:N or auto")
    train.add_argument("--threads", type=int, default=defaults.threads, help="torch CPU threads (0 = default)")
    train.add_argument("--resume", default=None, metavar="CHECKPOINT", help="continue from a last.pt")
    train.add_argument("--eval-every", type=int, default=defaults.eval_every, help="validate every N epochs")
    train.add_argument("--max-batches", type=int, default=defaults.max_batches,
                       help="stop each epoch after N batches (0 = all; for quick runs and benchmarks)")
    train.add_argument("--quiet", dest="progress", action="store_false", help="no progress bars")

    ev = sub.add_parser("eval", help="evaluate a checkpoint")
    ev.add_argument("--checkpoint", required=True, help="a .pt written by 'forest-train train'")
    ev.add_argument("--data", nargs="+", required=True, metavar="DIR", help="dataset roots/segments")
    ev.add_argument("--out", default=None, help="folder for example pictures and metrics.json")
    ev.add_argument("--max-depth", type=float, default=None, help="default: the checkpoint's")
    ev.add_argument("--min-depth", type=float, default=None, help="default: the checkpoint's")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--examples", type=int, default=8, help="number of example pictures")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--workers", type=int, default=0)
    ev.add_argument("--quiet", dest="progress", action="store_false")
    return parser


def _check_dirs(paths: Sequence[str], what: str) -> None:
    for path in paths:
        if not Path(path).is_dir():
            raise _InputError(f"{what} folder {path} does not exist")


def _train(args: argparse.Namespace, command: str) -> int:
    from forest_perception.models.trainer import Trainer

    _check_dirs(args.data, "training data")
    _check_dirs(args.val, "validation data")
    opts = TrainOptions(
        model=args.model, model_kwargs=dict(args.model_kwarg), input_hw=args.input_hw, data=list(args.data),
        val=list(args.val), val_fraction=args.val_fraction, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, weight_decay=args.weight_decay, scheduler=args.scheduler, step_size=args.step_size,
        gamma=args.gamma, loss_silog=args.loss_silog, loss_berhu=args.loss_berhu, loss_l1=args.loss_l1,
        loss_smooth=args.loss_smooth, min_depth=args.min_depth, max_depth=args.max_depth, augment=args.augment,
        workers=args.workers, seed=args.seed, out=args.out, device=args.device, threads=args.threads,
        resume=args.resume, eval_every=args.eval_every, max_batches=args.max_batches, progress=args.progress,
        command=command,
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


def _eval(args: argparse.Namespace) -> int:
    from forest_perception.models.evaluate import evaluate

    if not Path(args.checkpoint).is_file():
        raise _InputError(f"checkpoint {args.checkpoint} does not exist")
    _check_dirs(args.data, "evaluation data")
    if args.batch_size < 1:
        raise _InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        evaluate(args.checkpoint, args.data, max_depth=args.max_depth, min_depth=args.min_depth, out=args.out,
                 batch_size=args.batch_size, num_examples=args.examples, device=args.device, workers=args.workers,
                 progress=args.progress)
    except (ValueError, FileNotFoundError) as exc:
        raise _InputError(str(exc)) from None
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``forest-train``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = shlex.join([PROG, *argv])
    try:
        args = _build_parser().parse_args(argv)
        if args.command == "train":
            return _train(args, command)
        return _eval(args)
    except _UsageError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except _InputError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
