"""``forest-train``: train, evaluate and export the depth networks on forest dataset folders.

Examples::

    forest-train train --model autoencoder --data data/synth --val-fraction 0.2 --epochs 20 --out runs/ae
    forest-train train --model autoencoder --data data/synth --epochs 40 --out runs/ae --resume
    forest-train eval --checkpoint runs/ae/checkpoints/best.pt --data data/test --out runs/ae/eval
    forest-train export --checkpoint runs/ae/checkpoints/best.pt --out runs/ae/autoencoder_320x240.onnx
    forest-train train --init multiscale_320x240 --data DATA/rover_1 DATA/rover_2 --epochs 5 --lr 1e-4 --out runs/ft
    forest-train eval --model multiscale_320x240 --data data/test
    forest-train eval-styles --model multiscale_320x240 autoencoder_160x128 --data styles/hilly styles/dense --out r
    forest-train blend --checkpoint autoencoder_320x240 runs/ft/checkpoints/best.pt --weights 0.5 0.5 --out b.pt
    forest-train grow --checkpoint multiscale_320x240 --coarse-blocks 2 --coarse-squeeze 16 --data DATA --out g.pt
    forest-train grow --checkpoint autoencoder_320x240 --global-context 64 --data DATA --out g.pt

A ``--out`` that already holds a run is refused unless ``--resume`` continues it or ``--overwrite`` replaces it.
Bad input (a missing or broken file, a folder that is no dataset, a bad flag value, an ``--out`` that cannot be
written) gives a one-line error on stderr and exit status 2, through ``forest_perception.cli_args.run_command``;
an export that differs from PyTorch beyond the tolerance exits 1. docs/training.md has more.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from forest_perception.cli_args import (
    InputError,
    command_parser,
    existing_dir,
    existing_file,
    float_within,
    format_image_size,
    image_size,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    run_command,
)
from forest_perception.dataset_tools.settings import add_reading_arguments
from forest_perception.frames import CAMERA_HFOV_DEG
from forest_perception.models.cli_types import DefaultsHelpFormatter, onnx_output, output_folder
from forest_perception.models.data import MAX_PITCH_DEG, MAX_ROLL_DEG, MIN_DEPTH_M
from forest_perception.models.networks import MODEL_NAMES
from forest_perception.models.provenance import (
    path_alias_arg,
    recorded_argv,
    replace_paths,
    replace_recorded_paths,
)
from forest_perception.models.train_options import (
    DEFAULT_INPUT_HW,
    DEFAULT_MAX_DEPTH_M,
    DEFAULT_MODEL,
    SCHEDULERS,
    TrainOptions,
    check_image_size,
)

PROG = "forest-train"
EXIT_VERIFICATION = 1


def _fraction_below_one(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction within [0, 1), got {text!r}")
    return value


def _model_kwarg(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"model kwarg must be KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _checkpoint_or_name(text: str) -> Path:
    """A checkpoint file or a shipped fp32 network's name (its ``models/weights/<name>.pt``)."""
    from forest_perception.models.checkpoints import resolve_checkpoint

    try:
        return resolve_checkpoint(text, allow_int8=False)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_train(sub: argparse._SubParsersAction) -> None:
    defaults = TrainOptions()
    train = sub.add_parser("train", help="train a depth network", formatter_class=DefaultsHelpFormatter,
                           description="Train a depth network; --out gets checkpoints/, log.csv, curves.png and "
                           "command.txt once the first epoch is done. A --out that holds a run is refused unless "
                           "--resume continues it or --overwrite replaces it.")
    train.add_argument("--model", default=None, choices=MODEL_NAMES,
                       help=f"network; with --init the checkpoint's (default: {DEFAULT_MODEL})")
    train.add_argument("--init", default=None, metavar="CHECKPOINT_OR_NAME",
                       help="start from these weights (fine-tuning): a .pt file or a shipped model name such as "
                       "multiscale_320x240 (an ..._int8 name means its fp32 network); network, input size and depth "
                       "range come from it, flags that disagree are refused")
    train.add_argument("--freeze-encoder", action="store_true", default=None,
                       help="keep the encoder fixed (auto-encoder: its encoder; multi-scale: the coarse global "
                       "network); weights and BatchNorm statistics stay bit-identical")
    train.add_argument("--old-layers-lr", type=float, default=None, metavar="FACTOR",
                       help="with --init of a grown checkpoint (forest-train grow): the tensors the network had "
                       "before it grew train at FACTOR x --lr, the grown ones at --lr (default 1; resumed: the run's)")
    train.add_argument("--model-kwarg", action="append", type=_model_kwarg, default=[], metavar="KEY=VALUE",
                       help="constructor argument of the network, repeatable (value parsed as JSON)")
    # a string default goes through image_size like a typed value; --help shows it as written
    train.add_argument("--image-size", dest="input_hw", type=image_size, default=None, metavar="WIDTHxHEIGHT",
                       help="network input, multiples of 16; with --init the checkpoint's "
                       f"(default: {format_image_size(DEFAULT_INPUT_HW)})")
    train.add_argument("--data", nargs="+", required=True, type=existing_dir, metavar="DIR",
                       help="training dataset roots/segments")
    train.add_argument("--val", nargs="+", default=[], type=existing_dir, metavar="DIR",
                       help="validation roots (else --val-fraction)")
    train.add_argument("--val-fraction", type=_fraction_below_one, default=defaults.val_fraction,
                       help="fraction of training segments held out for validation when no --val (0 = none)")
    train.add_argument("--epochs", type=positive_int, default=defaults.epochs, help="epochs in all (a resumed run "
                       "counts the ones done)")
    train.add_argument("--batch-size", type=positive_int, default=defaults.batch_size, help="frames per batch")
    train.add_argument("--lr", type=positive_float, default=defaults.lr, help="learning rate (AdamW)")
    train.add_argument("--weight-decay", type=non_negative_float, default=defaults.weight_decay,
                       help="AdamW weight decay")
    train.add_argument("--scheduler", choices=SCHEDULERS, default=defaults.scheduler, help="learning-rate schedule")
    train.add_argument("--step-size", type=positive_int, default=defaults.step_size,
                       help="epochs per step (step scheduler)")
    train.add_argument("--gamma", type=non_negative_float, default=defaults.gamma,
                       help="lr factor per step (step scheduler)")
    train.add_argument("--loss-silog", type=non_negative_float, default=defaults.loss_silog,
                       help="weight of the scale-invariant log loss")
    train.add_argument("--loss-berhu", type=non_negative_float, default=defaults.loss_berhu,
                       help="weight of the berHu loss")
    train.add_argument("--loss-l1", type=non_negative_float, default=defaults.loss_l1, help="weight of the L1 loss")
    train.add_argument("--loss-smooth", type=non_negative_float, default=defaults.loss_smooth,
                       help="weight of the edge-aware smoothness loss")
    train.add_argument("--loss-log-l1", type=non_negative_float, default=defaults.loss_log_l1,
                       help="weight of the L1 loss on log depth (metric scale, relative error)")
    train.add_argument("--loss-rel-l1", type=non_negative_float, default=defaults.loss_rel_l1,
                       help="weight of |pred - target| / target (absrel as a loss: leans nearer where unsure)")
    train.add_argument("--loss-gradient", type=non_negative_float, default=defaults.loss_gradient,
                       help="weight of the multi-scale gradient matching loss on log depth (scale-invariant)")
    train.add_argument("--loss-silog-scale", type=non_negative_float, default=defaults.loss_silog_scale,
                       help="share of the global scale error inside silog, within [0, 1] (0: fully "
                       "scale-invariant; 1: log RMSE)")
    train.add_argument("--min-depth", type=positive_float, default=None,
                       help=f"metres; closer depth is invalid; with --init the checkpoint's (default: {MIN_DEPTH_M:g})")
    train.add_argument("--max-depth", type=positive_float, default=None,
                       help="metres; farther depth is left out of the loss and the metrics; with --init the "
                       f"checkpoint's (default: {DEFAULT_MAX_DEPTH_M:g})")
    train.add_argument("--no-augment", dest="augment", action="store_false",
                       help="no augmentation (flip; white balance, colour jitter, gamma, blur, noise)")
    train.add_argument("--roll-deg", type=float_within(0, MAX_ROLL_DEG), default=defaults.roll_deg, metavar="DEG",
                       help="augmentation: turn image and depth together by a random angle in [-DEG, DEG] about the "
                       "optical axis (a rover tilted on a slope; depth along the axis stays true); 0: off")
    train.add_argument("--pitch-deg", type=float_within(0, MAX_PITCH_DEG), default=defaults.pitch_deg,
                       metavar="DEG",
                       help="augmentation: tilt the camera up or down by a random angle in [-DEG, DEG] (the horizon "
                       "moves; depth is recomputed for the tilted axis; assumes a 69.4 deg horizontal field of "
                       "view); 0: off")
    train.add_argument("--teacher", default=None, metavar="CHECKPOINT_OR_MODEL_NAME",
                       help="distillation: a frozen network (a checkpoint or a shipped model name, same input size) "
                       "whose depth the loss also follows (L1 on log depth, weight --loss-teacher)")
    train.add_argument("--teacher-flip", action="store_true",
                       help="the teacher's depth is the geometric mean of its depth and the mirror of its depth on "
                       "the mirrored frame (flip averaging: better on unseen forests, taught to one pass)")
    train.add_argument("--loss-teacher", type=non_negative_float, default=defaults.loss_teacher,
                       help="weight of the teacher term (with --teacher)")
    train.add_argument("--cache", type=output_folder, default=None, metavar="DIR",
                       help="frame cache folder: frames resized once to the input size and read memory-mapped "
                       "after that (bounded memory, reused by later runs on the same data and size)")
    train.add_argument("--amp", action="store_true",
                       help="mixed precision autocast (bfloat16, float16 on GPUs without it); losses in float32")
    train.add_argument("--workers", type=non_negative_int, default=defaults.workers,
                       help="DataLoader worker processes")
    train.add_argument("--seed", type=non_negative_int, default=defaults.seed, help="seed of the split, "
                       "augmentation and weights")
    train.add_argument("--out", type=output_folder, default=defaults.out,
                       help="run folder (checkpoints/, log.csv, curves.png, command.txt)")
    train.add_argument("--device", default=defaults.device, help="cpu, cuda, cuda:N or auto")
    train.add_argument("--threads", type=non_negative_int, default=defaults.threads,
                       help="torch CPU threads (0 = torch's default)")
    again = train.add_mutually_exclusive_group()
    again.add_argument("--resume", nargs="?", const=True, default=None, type=existing_file, metavar="CHECKPOINT",
                       help="continue the run in --out from its checkpoints/last.pt, or from CHECKPOINT")
    again.add_argument("--overwrite", action="store_true",
                       help="replace the run already in --out (once this run's first epoch is done)")
    train.add_argument("--eval-every", type=positive_int, default=defaults.eval_every,
                       help="validate every N epochs")
    train.add_argument("--max-batches", type=non_negative_int, default=defaults.max_batches,
                       help="stop each epoch after N batches (0 = all; for quick runs and benchmarks)")
    train.add_argument("--quiet", dest="progress", action="store_false", help="no progress bars")
    add_reading_arguments(train)
    train.set_defaults(handler=_train)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="evaluate a checkpoint", formatter_class=DefaultsHelpFormatter,
                        description="Metric table of a checkpoint on dataset folders; with --out also example "
                        "pictures, metrics.json and metrics.csv (replaced when there).")
    which = ev.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", type=_checkpoint_or_name,
                       help="a .pt written by 'forest-train train', or a shipped model name")
    which.add_argument("--model", dest="checkpoint", type=_checkpoint_or_name,
                       help="a shipped model name such as multiscale_320x240 (its PyTorch checkpoint), or a .pt")
    ev.add_argument("--data", nargs="+", required=True, type=existing_dir, metavar="DIR",
                    help="dataset roots/segments")
    ev.add_argument("--out", type=output_folder, default=None,
                    help="folder for example pictures, metrics.json and metrics.csv (default: print only)")
    ev.add_argument("--max-depth", type=positive_float, default=None, help="metres (default: the checkpoint's)")
    ev.add_argument("--min-depth", type=positive_float, default=None, help="metres (default: the checkpoint's)")
    add_reading_arguments(ev)
    ev.add_argument("--batch-size", type=positive_int, default=8, help="frames per batch")
    ev.add_argument("--examples", type=non_negative_int, default=8, help="number of example pictures")
    ev.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    ev.add_argument("--workers", type=non_negative_int, default=0, help="DataLoader worker processes")
    ev.add_argument("--quiet", dest="progress", action="store_false", help="no progress bar")
    ev.set_defaults(handler=_eval)


def _add_export(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser("export", help="checkpoint -> verified ONNX, model card, optional int8",
                            formatter_class=DefaultsHelpFormatter,
                            description="Export a checkpoint to ONNX, check it against PyTorch (exit 1 beyond "
                            "--tolerance, nothing written) and write its model card beside it; files appear whole "
                            "or not at all.")
    export.add_argument("--checkpoint", required=True, type=existing_file, help="training checkpoint (.pt/.pth)")
    export.add_argument("--out", required=True, type=onnx_output, help="output .onnx path")
    export.add_argument("--image-size", dest="input_hw", type=image_size, default=None, metavar="WIDTHxHEIGHT",
                        help="network input (default: the checkpoint's)")
    export.add_argument("--opset", type=positive_int, default=17, help="ONNX opset written")
    export.add_argument("--dynamic-batch", action="store_true", help="dynamic batch dimension")
    export.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo",
                        help="torch.onnx exporter (torchscript: legacy, much faster to run)")
    export.add_argument("--tolerance", type=positive_float, default=1e-3, help="max abs error vs PyTorch, metres")
    export.add_argument("--int8", action="store_true", help="also write <out>_int8.onnx (needs --calib)")
    export.add_argument("--calib", type=existing_dir, help="folder of RGB calibration images (searched recursively)")
    export.add_argument("--calib-count", type=positive_int, default=64, help="calibration frames to use")
    export.add_argument("--keep-int8-anyway", action="store_true",
                        help="keep the int8 model even when it is neither faster nor smaller, or loses "
                        "more than 0.01 absrel")
    export.add_argument("--path-alias", action="append", type=path_alias_arg, default=[], metavar="NAME=DIR",
                        help="write DIR as NAME in the recorded commands (the checkpoint's training command and "
                             "options, this export's); repeat per folder")
    export.set_defaults(handler=_export)


def _add_eval_styles(sub: argparse._SubParsersAction) -> None:
    styles = sub.add_parser("eval-styles", help="metrics of models per dataset folder (forest style) and the worst",
                            formatter_class=DefaultsHelpFormatter,
                            description="One row per dataset folder and the worst folder (highest absrel) for every "
                            "model, on full camera frames as the rover runs it; with --out also styles.json, "
                            "styles.csv and styles.png.")
    styles.add_argument("--model", nargs="+", required=True, metavar="MODEL",
                        help="shipped model names (their ONNX files, int8 too), .onnx files or .pt checkpoints")
    styles.add_argument("--data", nargs="+", required=True, type=existing_dir, metavar="DIR",
                        help="dataset folders, one per style (each a row)")
    styles.add_argument("--out", type=output_folder, default=None, help="folder for styles.json/.csv/.png")
    styles.add_argument("--max-frames", type=non_negative_int, default=0,
                        help="frames per folder, spread evenly (0 = all)")
    styles.add_argument("--threads", type=positive_int, default=2, help="CPU threads of the engines")
    styles.add_argument("--min-depth", type=positive_float, default=None, help="metres (default: the first model's)")
    styles.add_argument("--max-depth", type=positive_float, default=None, help="metres (default: the first model's)")
    styles.add_argument("--tilt", nargs="+", type=float_within(-MAX_PITCH_DEG, MAX_PITCH_DEG), default=[],
                        metavar="DEG",
                        help="also score every folder with the camera tilted by each angle (positive: nose down; the "
                        "image moves, depth is recomputed for the tilted axis); rows and tilt.png show what a camera "
                        "mounted a few degrees off costs")
    styles.add_argument("--hfov", type=float_within(10, 170), default=CAMERA_HFOV_DEG, metavar="DEG",
                        help="horizontal field of view of the frames' camera, for --tilt")
    styles.add_argument("--flip-average", action="store_true",
                        help="run every model as depth_node's flip_average does: on the frame and its mirror image, "
                        "the geometric mean of the two depths (twice the time)")
    add_reading_arguments(styles)
    styles.add_argument("--quiet", dest="progress", action="store_false", help="no progress bar")
    styles.set_defaults(handler=_eval_styles)


def _add_blend(sub: argparse._SubParsersAction) -> None:
    blend = sub.add_parser("blend", help="weight-space blend of checkpoints of one network (WiSE-FT)",
                           formatter_class=DefaultsHelpFormatter,
                           description="Average the weights of two or more checkpoints of the same network, "
                           "weights in [0, 1] summing to 1: a fine-tuned network blended with the one it started "
                           "from trades what the fine-tuning won against what it lost, at no run-time cost. The "
                           "output is a checkpoint for eval, export, --init and the release; it names its sources "
                           "and their sha256.")
    blend.add_argument("--checkpoint", nargs="+", required=True, metavar="CKPT",
                       help="checkpoint files or shipped model names, two or more")
    blend.add_argument("--weights", nargs="+", required=True, type=float, metavar="W",
                       help="one weight per checkpoint, in [0, 1], summing to 1")
    blend.add_argument("--out", required=True, type=Path, help="output checkpoint (.pt)")
    blend.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    blend.set_defaults(handler=_blend)


def _add_grow(sub: argparse._SubParsersAction) -> None:
    grow = sub.add_parser("grow", help="a bigger network that starts as a trained one (Net2Net)",
                          formatter_class=DefaultsHelpFormatter,
                          description="Multi-scale: add 128-channel 3x3 conv blocks at 1/16 to the coarse network "
                          "(each starts as the identity) and/or widen the squeeze before its FC layers (the new "
                          "channels start unread). Auto-encoder: add an image-level context block at 1/16 (it "
                          "starts adding nothing). The output checkpoint predicts what the source does, and "
                          "fine-tuning it with 'train --init' uses the new capacity. The frames of --data give the "
                          "new BatchNorm statistics and the check.")
    grow.add_argument("--checkpoint", required=True, metavar="CKPT",
                      help="a multi-scale or auto-encoder checkpoint file or shipped model name")
    grow.add_argument("--coarse-blocks", type=int, default=None, metavar="N",
                      help="multi-scale: coarse 1/16 blocks after the first, in the grown network (at least the "
                      "source's; default: the source's)")
    grow.add_argument("--coarse-squeeze", type=int, default=None, metavar="N",
                      help="multi-scale: channels of the squeeze before the FC layers (at least the source's; "
                      "shipped: 8; default: the source's)")
    grow.add_argument("--global-context", type=positive_int, default=None, metavar="N",
                      help="auto-encoder: hidden channels of an image-level context block at 1/16 (e.g. 64)")
    grow.add_argument("--data", nargs="+", required=True, metavar="DIR", help="dataset folders for the frames")
    grow.add_argument("--frames", type=positive_int, default=64, help="frames, spread evenly over --data")
    grow.add_argument("--out", required=True, type=Path, help="output checkpoint (.pt)")
    grow.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    grow.set_defaults(handler=_grow)


def _add_mirror(sub: argparse._SubParsersAction) -> None:
    mirror = sub.add_parser("mirror", help="mirror-symmetric global layers for a multi-scale network",
                            formatter_class=DefaultsHelpFormatter,
                            description="Make the coarse network's FC layers the mean of their output and the mirror "
                            "image of their output on the mirrored features (model kwarg coarse_mirror, the same "
                            "weights): a mirrored forest then gets the mirrored global layout. The output is an "
                            "ordinary checkpoint, for eval-styles, train --init (which keeps the symmetry) and "
                            "models.release.")
    mirror.add_argument("--checkpoint", required=True, metavar="CKPT",
                        help="a multi-scale checkpoint file or shipped model name")
    mirror.add_argument("--out", required=True, type=Path, help="output checkpoint (.pt)")
    mirror.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    mirror.set_defaults(handler=_mirror)


def build_parser() -> argparse.ArgumentParser:
    """The ``forest-train`` parser: ``train``, ``eval``, ``eval-styles``, ``export``, ``blend``, ``grow`` and
    ``mirror``."""
    parser, sub = command_parser(PROG, "Train, evaluate and export forest depth networks.")
    _add_train(sub)
    _add_eval(sub)
    _add_eval_styles(sub)
    _add_export(sub)
    _add_blend(sub)
    _add_grow(sub)
    _add_mirror(sub)
    return parser


def _resume_checkpoint(args: argparse.Namespace) -> str | None:
    """The checkpoint ``--resume`` names: its value, or the last.pt of the run in ``--out`` when given alone."""
    if args.resume is None:
        return None
    if args.resume is True:
        last = Path(args.out) / "checkpoints" / "last.pt"
        if not last.is_file():
            raise InputError(f"--resume continues the run in --out {args.out}, but {last} does not exist; start a "
                             "new run without --resume, or give --resume CHECKPOINT")
        return str(last)
    return str(args.resume)


def _train(args: argparse.Namespace, command: str) -> int:
    import torch

    from forest_perception.models.trainer import Trainer

    opts = TrainOptions(
        model=args.model, model_kwargs=dict(args.model_kwarg) if args.model_kwarg else None, input_hw=args.input_hw,
        data=[str(p) for p in args.data], val=[str(p) for p in args.val], val_fraction=args.val_fraction,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        scheduler=args.scheduler, step_size=args.step_size, gamma=args.gamma, loss_silog=args.loss_silog,
        loss_berhu=args.loss_berhu, loss_l1=args.loss_l1, loss_smooth=args.loss_smooth, loss_log_l1=args.loss_log_l1,
        loss_rel_l1=args.loss_rel_l1, loss_gradient=args.loss_gradient, loss_silog_scale=args.loss_silog_scale,
        min_depth=args.min_depth, max_depth=args.max_depth, augment=args.augment, roll_deg=args.roll_deg,
        pitch_deg=args.pitch_deg, teacher=args.teacher, teacher_flip=args.teacher_flip,
        loss_teacher=args.loss_teacher,
        workers=args.workers, seed=args.seed,
        out=str(args.out), device=args.device, threads=args.threads, resume=_resume_checkpoint(args),
        overwrite=args.overwrite, eval_every=args.eval_every, max_batches=args.max_batches, progress=args.progress,
        command=command,
        init=args.init, freeze_encoder=args.freeze_encoder, old_layers_lr=args.old_layers_lr,
        cache=None if args.cache is None else str(args.cache),
        amp=args.amp,
        depth_scale=args.depth_scale, depth_larger=args.depth_larger, column_aliases=dict(args.column_aliases),
    )
    trainer = Trainer(opts)
    out_of_memory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    try:
        history = trainer.train()
    except FloatingPointError as exc:  # a diverged run: the message says what is left and what to change
        raise InputError(str(exc)) from exc
    except out_of_memory as exc:
        raise InputError(trainer.stop_message(f"out of memory on {trainer.device}: lower --batch-size or "
                                          "--image-size")) from exc
    except KeyboardInterrupt:
        note = trainer.stop_message("stopped by Ctrl-C")
        print(f"{PROG} train: {note}", file=sys.stderr)
        raise
    last = history[-1] if history else {}
    summary = ", ".join(f"{k} {last[k]:.4f}" for k in ("train_loss", "val_absrel", "val_delta1") if k in last)
    print(f"done: {trainer.epoch} epoch(s){'; ' + summary if summary else ''}; "
          f"checkpoints in {trainer.checkpoint_dir}")
    return 0


def _eval(args: argparse.Namespace, command: str) -> int:
    from forest_perception.dataset_tools.settings import settings_from_args
    from forest_perception.models.data import collect_segments
    from forest_perception.models.evaluate import evaluate

    data = collect_segments([str(p) for p in args.data], settings_from_args(args))
    evaluate(args.checkpoint, data, max_depth=args.max_depth, min_depth=args.min_depth,
             out=args.out, batch_size=args.batch_size, num_examples=args.examples, device=args.device,
             workers=args.workers, progress=args.progress)
    return 0


def _eval_styles(args: argparse.Namespace, command: str) -> int:
    from forest_perception.dataset_tools.settings import settings_from_args
    from forest_perception.models.styles import evaluate_styles

    evaluate_styles(args.model, [str(p) for p in args.data], out=args.out, max_frames=args.max_frames,
                    threads=args.threads, min_depth=args.min_depth, max_depth=args.max_depth,
                    settings=settings_from_args(args), progress=args.progress, tilts=args.tilt, hfov_deg=args.hfov,
                    flip_average=args.flip_average)
    return 0


def _export(args: argparse.Namespace, command: str) -> int:
    from forest_perception.models.export import (
        ExportVerificationError,
        compare_int8,
        export_onnx,
        iter_calibration_images,
        keep_int8,
        model_info,
        quantize_int8,
        remove_model_files,
        write_model_card,
    )
    from forest_perception.models.outputs import temporary_sibling
    from forest_perception.models.torch_engine import load_torch_checkpoint

    # everything the export needs is checked before anything is written
    if args.int8 and not args.calib:
        raise InputError("--int8 needs --calib DIR (calibration images)")
    frames = []
    if args.int8:
        try:
            frames = list(iter_calibration_images(args.calib, args.calib_count))
        except ValueError as exc:
            raise InputError(f"--calib {args.calib}: {exc}") from exc
        if not frames:
            raise InputError(f"--calib {args.calib}: none of its images can be read; give a folder of RGB images")
    if args.input_hw is not None:
        check_image_size(args.input_hw)
    model, meta = load_torch_checkpoint(args.checkpoint)
    meta = replace_recorded_paths(meta, args.path_alias)
    command = replace_paths(command, args.path_alias)
    try:
        path = export_onnx((model, meta), args.out, args.input_hw, opset=args.opset,
                           dynamic_batch=args.dynamic_batch, exporter=args.exporter, tolerance_m=args.tolerance,
                           export_command=command)
    except ExportVerificationError as exc:
        print(f"{PROG} export: error: {exc}; nothing was written", file=sys.stderr)
        return EXIT_VERIFICATION
    info = model_info((model, meta))
    write_model_card(path, info)
    print(f"wrote {path} and {path.with_suffix('.md').name}")
    if args.int8:
        int8_path = path.with_name(f"{path.stem}_int8.onnx")
        staged = temporary_sibling(int8_path)
        try:
            quantize_int8(path, frames, staged)
            report = compare_int8(path, staged, frames[:16])
            keep, reason = keep_int8(report)
            print(reason)
            if keep or args.keep_int8_anyway:
                os.replace(staged, int8_path)
                write_model_card(int8_path, {**info, "int8": report})
                print(f"wrote {int8_path}")
            else:
                for old in remove_model_files(int8_path):  # an earlier int8 of another fp32 model
                    print(f"removed {old}: it belonged to an earlier export")
        finally:
            staged.unlink(missing_ok=True)
    return 0


def _checkpoint_out(out: Path, overwrite: bool) -> Path:
    """``out`` if it names a ``.pt`` file that may be written; ``InputError`` otherwise."""
    if out.suffix.lower() not in (".pt", ".pth"):
        raise InputError(f"--out {out}: give a checkpoint file name ending in .pt")
    if out.is_dir():
        raise InputError(f"--out {out} is a folder; give a checkpoint file name ending in .pt")
    if out.exists() and not overwrite:
        raise InputError(f"--out {out} exists; add --overwrite to replace it")
    return out


def _blend(args: argparse.Namespace, command: str) -> int:
    from forest_perception.inference import ModelLoadError
    from forest_perception.models.blend import blend_checkpoints
    from forest_perception.models.checkpoints import checkpoint_reference, resolve_checkpoint, save_checkpoint
    from forest_perception.models.torch_engine import read_checkpoint_file

    out = _checkpoint_out(Path(args.out), args.overwrite)
    sources = [str(p) for p in args.checkpoint]  # as given: a shipped name stays a name in the provenance
    try:
        paths = [resolve_checkpoint(s, allow_int8=False) for s in sources]
        checkpoints = [read_checkpoint_file(p) for p in paths]
        blended = blend_checkpoints(checkpoints, args.weights, names=sources)
    except (ModelLoadError, ValueError) as exc:
        raise InputError(str(exc)) from exc
    blended["blend"] = [
        {**checkpoint_reference(source, path, ckpt), "weight": float(w)}
        for source, path, ckpt, w in zip(sources, paths, checkpoints, args.weights)
    ]
    blended["command"] = command
    save_checkpoint(blended, out)
    parts = " + ".join(f"{w:g} x {Path(s).name}" for s, w in zip(sources, args.weights))
    print(f"wrote {out}: {blended['model_name']} = {parts}")
    return 0


def _grow(args: argparse.Namespace, command: str) -> int:
    from forest_perception.inference import ModelLoadError
    from forest_perception.models.checkpoints import checkpoint_reference, resolve_checkpoint, save_checkpoint
    from forest_perception.models.grow import grow_checkpoint
    from forest_perception.models.recover import dataset_frames, network_inputs
    from forest_perception.models.torch_engine import read_checkpoint_file

    out = _checkpoint_out(Path(args.out), args.overwrite)
    try:
        path = resolve_checkpoint(args.checkpoint, allow_int8=False)
        checkpoint = read_checkpoint_file(path)
        norm = checkpoint.get("normalisation") or {}
        frames = dataset_frames(args.data, args.frames)
        inputs = network_inputs(frames, checkpoint["input_hw"], **{k: norm[k] for k in ("mean", "std") if k in norm})
        grown = grow_checkpoint(checkpoint, args.coarse_blocks, args.coarse_squeeze, inputs,
                                global_context=args.global_context)
    except (ModelLoadError, ValueError, KeyError) as exc:
        raise InputError(str(exc)) from exc
    grown["grown_from"] = {**checkpoint_reference(args.checkpoint, path, checkpoint), **grown["grown_from"]}
    grown["command"] = command
    save_checkpoint(grown, out)
    info = grown["grown_from"]
    if "global_context" in info:
        what = f"autoencoder with a context block of {info['global_context'][1]} channels"
    else:
        what = (f"multiscale with {info['coarse_blocks'][1]} extra coarse block(s) and a squeeze of "
                f"{info['coarse_squeeze'][1]} (was {info['coarse_blocks'][0]} and {info['coarse_squeeze'][0]})")
    print(f"wrote {out}: {what}; output differs from {args.checkpoint} by at most {info['max_abs_diff_m']:.2g} m "
          f"on {info['frames']} frames")
    return 0


def _mirror(args: argparse.Namespace, command: str) -> int:
    from forest_perception.inference import ModelLoadError
    from forest_perception.models.checkpoints import checkpoint_reference, resolve_checkpoint, save_checkpoint
    from forest_perception.models.mirror import mirror_checkpoint
    from forest_perception.models.torch_engine import read_checkpoint_file

    out = _checkpoint_out(Path(args.out), args.overwrite)
    try:
        path = resolve_checkpoint(args.checkpoint, allow_int8=False)
        checkpoint = read_checkpoint_file(path)
        mirrored = mirror_checkpoint(checkpoint)
    except (ModelLoadError, ValueError, KeyError) as exc:
        raise InputError(str(exc)) from exc
    source = checkpoint_reference(args.checkpoint, path, checkpoint)
    mirrored["mirrored_from"] = {**source, **mirrored["mirrored_from"]}
    mirrored["init"] = source  # what the network started from, for export and the model card
    mirrored["command"] = command
    save_checkpoint(mirrored, out)
    print(f"wrote {out}: {args.checkpoint} with mirror-symmetric coarse FC layers (coarse_mirror, same weights)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``forest-train``; returns the exit status (2 for bad input, with one line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = shlex.join([PROG, *recorded_argv(argv)])
    return run_command(PROG, build_parser(), lambda args: args.handler(args, command), argv)


if __name__ == "__main__":
    sys.exit(main())
