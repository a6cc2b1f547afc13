"""Options of a training run (``TrainOptions``) and how a run starts from a checkpoint (``--init``).

``TrainOptions`` holds every flag of ``forest-train train``; ``validate`` names a bad one by its flag. With ``--init``
the network, input size and depth range come from the checkpoint (a file or a shipped model name), and flags that
disagree with it are refused naming the mismatch (``settle``, ``load_init_weights``, ``check_init_normalisation``).
docs/training.md, "Fine-tuning a shipped model".
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from forest_perception.cli_args import format_image_size
from forest_perception.dataset_tools.settings import DatasetSettings
from forest_perception.models.checkpoints import resolve_checkpoint
from forest_perception.models.data import MAX_PITCH_DEG, MAX_ROLL_DEG, MIN_DEPTH_M, check_input_hw, image_normalisation
from forest_perception.models.networks import MODEL_NAMES, build_model
from forest_perception.models.outputs import check_output_folder

CHECKPOINT_FORMAT = 1
DEFAULT_MODEL = "autoencoder"
DEFAULT_INPUT_HW = (240, 320)
DEFAULT_MAX_DEPTH_M = 10.0
SCHEDULERS = ("cosine", "step", "none")
RUN_FILES = ("checkpoints/last.pt", "checkpoints/best.pt", "log.csv", "command.txt", "curves.png")
"""The files of a run in its ``out`` folder; any of them there means the folder holds a run."""


class RunExistsError(FileExistsError):
    """The output folder already holds a training run that this one would write over."""


def check_image_size(input_hw: Sequence[int]) -> tuple[int, int]:
    """``check_input_hw`` with a message in the ``--image-size WIDTHxHEIGHT`` spelling of the command lines."""
    try:
        return check_input_hw(input_hw)
    except ValueError:
        shown = format_image_size(input_hw) if len(input_hw) == 2 else repr(input_hw)
        raise ValueError(f"--image-size {shown}: width and height must be positive multiples of 16 "
                         "(e.g. 320x240, 160x128, 96x64)") from None


def _flag(name: str) -> str:
    """The command-line flag of a ``TrainOptions`` field (``val_fraction`` -> ``--val-fraction``)."""
    return "--image-size" if name == "input_hw" else "--" + name.replace("_", "-")


def existing_run_files(out: str | os.PathLike) -> list[str]:
    """The ``RUN_FILES`` present in ``out`` (relative names), empty when it holds no run."""
    out = Path(out)
    return [name for name in RUN_FILES if (out / name).is_file()]


def _inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


def worker_error_message(exc: BaseException) -> str:
    """The original one-line message of an exception re-raised by a DataLoader worker (no worker traceback)."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    _, sep, message = last.partition(": ")
    return message if sep else last


@dataclass
class TrainOptions:
    """Everything a training run depends on; stored in every checkpoint."""

    # None: from the --init or --resume checkpoint, else DEFAULT_MODEL, {}, DEFAULT_INPUT_HW
    model: str | None = None
    model_kwargs: dict | None = None
    input_hw: tuple[int, int] | None = None
    data: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    val_fraction: float = 0.2
    epochs: int = 20
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    scheduler: str = "cosine"
    step_size: int = 10
    gamma: float = 0.5
    loss_silog: float = 1.0
    loss_berhu: float = 0.0
    loss_l1: float = 0.0
    loss_smooth: float = 0.001
    loss_log_l1: float = 0.0
    loss_rel_l1: float = 0.0
    loss_gradient: float = 0.0
    loss_silog_scale: float = 0.15
    # None: the --init/--resume checkpoint's, else MIN_DEPTH_M and DEFAULT_MAX_DEPTH_M
    min_depth: float | None = None
    max_depth: float | None = None
    augment: bool = True
    roll_deg: float = 0.0  # random roll of image and depth about the optical axis, degrees (0: off)
    pitch_deg: float = 0.0  # random tilt of the camera about its x axis, degrees (0: off)
    teacher: str | None = None  # a frozen network (checkpoint or shipped name) whose depth the loss also follows
    teacher_flip: bool = False  # the teacher's depth is averaged with that of the mirrored frame
    loss_teacher: float = 1.0  # weight of the L1 loss on log depth towards the teacher's depth
    workers: int = 0
    seed: int = 0
    out: str = "runs/depth"
    device: str = "cpu"
    threads: int = 0
    resume: str | None = None
    init: str | None = None
    freeze_encoder: bool | None = None  # None: the --resume checkpoint's, else False
    # learning-rate factor of the tensors a grown network (forest-train grow) had before it grew; its new tensors
    # train at --lr. None: the --resume checkpoint's, else 1.0
    old_layers_lr: float | None = None
    new_tensors: list = field(default_factory=list)  # the grown tensors' names, from the --init/--resume checkpoint
    cache: str | None = None
    amp: bool = False
    eval_every: int = 1
    max_batches: int = 0
    progress: bool = True
    command: str = ""
    overwrite: bool = False
    # how to read the datasets, over their forest_dataset.yaml (--depth-scale, --depth-larger, --column-alias)
    depth_scale: float | None = None
    depth_larger: str | None = None
    column_aliases: dict = field(default_factory=dict)

    def dataset_settings(self) -> DatasetSettings:
        """The reading settings the options state (none stated: each dataset's own file decides)."""
        return DatasetSettings(
            depth_scale_m_per_unit=self.depth_scale,
            depth_larger_is_farther=None if self.depth_larger is None else self.depth_larger == "farther",
            column_aliases=dict(self.column_aliases), source="the command line")

    def check_sources(self) -> Path | None:
        """Check ``--init`` and ``--resume`` (not both, each there); returns the checkpoint file ``--init`` names."""
        if self.resume is not None and self.init is not None:
            raise ValueError(f"--init {self.init} starts a new run from a checkpoint's weights, --resume continues a "
                             "run with its optimizer and schedule: give one of them, not both")
        if self.resume is not None and not Path(self.resume).is_file():
            raise FileNotFoundError(f"--resume {self.resume} does not exist; give a checkpoint of the run to "
                                    "continue (its checkpoints/last.pt)")
        if self.init is None:
            return None
        try:
            return resolve_checkpoint(self.init, allow_int8=True)
        except ValueError as exc:
            raise ValueError(f"--init: {exc}") from None

    def settle(self, source: dict | None = None) -> TrainOptions:
        """Fill the options left unset (None) from ``source``, the ``--init`` or ``--resume`` checkpoint, else the
        defaults. ``--init``: a given ``--model`` must be the checkpoint's network and given ``--model-kwarg``s are
        added to its own; ``--resume``: what is given is checked against the run in ``load_model``."""
        source = source or {}
        options = source.get("options") if isinstance(source.get("options"), dict) else {}
        if self.init is not None and source:
            saved = source.get("model_name")
            if self.model is not None and self.model != saved:
                raise ValueError(f"--init {self.init} holds a {saved!r} network, not --model {self.model}: leave out "
                                 "--model (it comes from the checkpoint) or give a checkpoint of that network")
            self.model_kwargs = {**dict(source.get("model_kwargs") or {}), **dict(self.model_kwargs or {})}
        if self.model is None:
            self.model = str(source.get("model_name") or DEFAULT_MODEL)
        if self.model_kwargs is None:
            self.model_kwargs = dict(source.get("model_kwargs") or {})
        if self.input_hw is None:
            saved_hw = source.get("input_hw")
            self.input_hw = tuple(int(v) for v in saved_hw) if saved_hw else DEFAULT_INPUT_HW
        if self.min_depth is None:
            self.min_depth = float(source.get("min_depth") or MIN_DEPTH_M)
        if self.max_depth is None:
            self.max_depth = float(source.get("max_depth") or DEFAULT_MAX_DEPTH_M)
        if self.freeze_encoder is None:
            self.freeze_encoder = bool(options.get("freeze_encoder", False)) if self.resume is not None else False
        if self.old_layers_lr is None:
            self.old_layers_lr = float(options.get("old_layers_lr", 1.0)) if self.resume is not None else 1.0
        if not self.new_tensors and source:
            grown = source.get("grown_from") if self.resume is None else None
            named = grown.get("new_tensors") if isinstance(grown, dict) else options.get("new_tensors")
            self.new_tensors = [str(name) for name in named or []]
        return self

    def validate(self) -> TrainOptions:
        """Raise ``ValueError`` naming the first bad option by its command-line flag (writes nothing)."""
        self.check_sources()
        self.settle()  # fills what is still unset with the defaults
        self.input_hw = check_image_size(self.input_hw)
        if not self.data:
            raise ValueError("no training data: give at least one dataset folder (--data)")
        positive_ints = ("epochs", "batch_size", "eval_every", "step_size")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{_flag(name)} must be a positive integer, got {value!r}")
        for name in ("workers", "threads", "seed", "max_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{_flag(name)} must be an integer >= 0, got {value!r}")
        for name in ("lr", "weight_decay", "gamma", "loss_silog", "loss_berhu", "loss_l1", "loss_smooth", "loss_log_l1",
                     "loss_rel_l1", "loss_gradient", "loss_silog_scale", "loss_teacher"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{_flag(name)} must be a finite number >= 0, got {value!r}")
        if not (isinstance(self.roll_deg, (int, float)) and 0.0 <= self.roll_deg <= MAX_ROLL_DEG):
            raise ValueError(f"--roll-deg must be within [0, {MAX_ROLL_DEG:g}] degrees, got {self.roll_deg!r}")
        if not (isinstance(self.pitch_deg, (int, float)) and 0.0 <= self.pitch_deg <= MAX_PITCH_DEG):
            raise ValueError(f"--pitch-deg must be within [0, {MAX_PITCH_DEG:g}] degrees, got {self.pitch_deg!r}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.teacher_flip and self.teacher is None:
            raise ValueError("--teacher-flip averages a teacher's depth with its mirror image's, but no --teacher is "
                             "given: name one (a checkpoint or a shipped model)")
        if self.teacher is not None and self.loss_teacher == 0:
            raise ValueError(f"--teacher {self.teacher} with --loss-teacher 0 would run the teacher for nothing: "
                             "give --loss-teacher > 0 or leave out --teacher")
        if not (isinstance(self.old_layers_lr, (int, float)) and 0.0 <= self.old_layers_lr <= 1.0):
            raise ValueError(f"--old-layers-lr must be within [0, 1] (a factor of --lr), got {self.old_layers_lr!r}")
        if self.old_layers_lr != 1.0 and not self.new_tensors:
            raise ValueError(f"--old-layers-lr {self.old_layers_lr:g} needs --init of a grown checkpoint "
                             "('forest-train grow' names the tensors it added): this run has no grown tensors")
        if self.loss_silog_scale > 1:
            raise ValueError(f"--loss-silog-scale must be within [0, 1] (0: silog is scale-invariant, 1: it is the "
                             f"log RMSE), got {self.loss_silog_scale}")
        if not (0 < self.min_depth < self.max_depth and math.isfinite(self.max_depth)):
            raise ValueError(f"--min-depth ({self.min_depth}) must be above 0 and below --max-depth "
                             f"({self.max_depth})")
        if not (0.0 <= self.val_fraction < 1.0):
            raise ValueError(f"--val-fraction must be within [0, 1), got {self.val_fraction}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        check_device(self.device)
        if self.model not in MODEL_NAMES:
            raise ValueError(f"unknown model {self.model!r} (--model); choose one of {', '.join(MODEL_NAMES)}")
        if self.resume is not None and self.overwrite:
            raise ValueError(f"--resume continues the run in --out {self.out}, --overwrite replaces it: give one "
                             "of them, not both")
        if self.cache is not None:
            check_output_folder(self.cache, "--cache")
        check_output_folder(self.out, "--out")
        return self

    def check_run_folder(self) -> None:
        """Refuse (``RunExistsError``) an ``out`` that holds a run this one would write over; reads only.

        Allowed: a new or run-free folder, ``resume`` from a checkpoint inside ``out`` (continuing that run),
        or ``overwrite``.
        """
        found = existing_run_files(self.out)
        if not found or self.overwrite:
            return
        listing = ", ".join(found)
        if self.resume is None:
            raise RunExistsError(f"--out {self.out} already holds a training run ({listing}); continue it with "
                                 "--resume, replace it with --overwrite, or give another --out")
        if not _inside(self.resume, self.out):
            raise RunExistsError(f"--out {self.out} already holds another training run ({listing}) and "
                                 f"--resume {self.resume} is not one of its checkpoints: give --out the folder of "
                                 "the run to continue, or a new folder to branch off from that checkpoint")

    def to_dict(self) -> dict:
        """Plain dict (lists, not tuples) for checkpoints and logs."""
        out = dataclasses.asdict(self)
        out["input_hw"] = list(self.input_hw)
        return out




def build_loss(opts: TrainOptions) -> nn.Module:
    """The depth loss with the weights of ``opts``."""
    from forest_perception.models.losses import DepthLoss

    return DepthLoss(silog=opts.loss_silog, berhu=opts.loss_berhu, l1=opts.loss_l1, smooth=opts.loss_smooth,
                     log_l1=opts.loss_log_l1, rel_l1=opts.loss_rel_l1, gradient=opts.loss_gradient,
                     variance_focus=1.0 - opts.loss_silog_scale, min_depth=opts.min_depth, max_depth=opts.max_depth)



def check_device(name: str) -> str:
    """``name`` if it is cpu, cuda, cuda:N or auto and usable here; ``ValueError`` naming ``--device`` otherwise."""
    if name not in ("cpu", "cuda", "auto") and not re.fullmatch(r"cuda:\d+", name):
        raise ValueError(f"--device must be cpu, cuda, cuda:N or auto, got {name!r}")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name} asked for but CUDA is not available here; use --device cpu")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s) here")
    return name


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available else cpu; anything else as given (checked by ``check_device``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(check_device(name))




def check_init_normalisation(checkpoint: dict, init: str) -> None:
    """``ValueError`` unless the ``--init`` checkpoint was trained on images normalised as the trainer does it."""
    mean, std = image_normalisation()
    saved = checkpoint.get("normalisation") or {}
    saved_mean = [float(v) for v in saved.get("mean", mean)]
    saved_std = [float(v) for v in saved.get("std", std)]
    if not (np.allclose(saved_mean, mean, atol=1e-6) and np.allclose(saved_std, std, atol=1e-6)):
        raise ValueError(f"--init {init} was trained on images normalised with mean {saved_mean} and std {saved_std}, "
                         f"forest-train normalises with mean {list(mean)} and std {list(std)}: its weights would see "
                         "other inputs than they learnt; fine-tune a checkpoint made with these statistics")


def load_init_weights(model: nn.Module, checkpoint: dict, opts: TrainOptions) -> None:
    """Put the ``--init`` checkpoint's weights into the freshly built ``model``; ``ValueError`` naming what differs.

    Refused: another network, another ``--image-size`` (the multi-scale net's FC layers are sized for its input; the
    auto-encoder would run, but at another field of view per pixel than it learnt, so it is refused too), a
    parameter of another shape (another ``--model-kwarg``) and a depth head of another range.
    """
    where = f"--init {opts.init}"
    saved_hw = [int(v) for v in checkpoint.get("input_hw") or []]
    if saved_hw and saved_hw != list(opts.input_hw):
        raise ValueError(f"--image-size {format_image_size(opts.input_hw)} does not fit {where}: its {opts.model} "
                         f"network was trained at {format_image_size(saved_hw)} (input shape mismatch); leave out "
                         "--image-size, or start from a checkpoint trained at that size")
    state = checkpoint.get("model_state") or checkpoint.get("state_dict")
    if not isinstance(state, dict):
        raise ValueError(f"{where} has no 'model_state': it is not a checkpoint written by 'forest-train train'")
    ours = model.state_dict()
    missing = [key for key in ours if key not in state]
    unexpected = [key for key in state if key not in ours]
    if missing or unexpected:
        raise ValueError(f"{where} does not hold the layers of --model {opts.model} (missing "
                         f"{', '.join(missing[:3]) or 'none'}; extra {', '.join(unexpected[:3]) or 'none'}): give a "
                         "checkpoint of that network")
    for key, value in ours.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise ValueError(f"{where}: {key} is {tuple(state[key].shape)} in the checkpoint but "
                             f"{tuple(value.shape)} with --model-kwarg {opts.model_kwargs or 'none'}; leave out the "
                             f"--model-kwarg that changes it (the checkpoint's: "
                             f"{checkpoint.get('model_kwargs') or {}})")
    saved_head = build_model(str(checkpoint.get("model_name") or opts.model), saved_hw or opts.input_hw,
                             **dict(checkpoint.get("model_kwargs") or {})).head
    if (saved_head.min_depth, saved_head.max_depth) != (model.head.min_depth, model.head.max_depth):
        raise ValueError(f"{where} predicts depth in {saved_head.min_depth:g}-{saved_head.max_depth:g} m, "
                         f"--model-kwarg asks for {model.head.min_depth:g}-{model.head.max_depth:g} m: its weights "
                         "would mean other depths; leave out the min_depth/max_depth --model-kwarg")
    model.load_state_dict(state)
