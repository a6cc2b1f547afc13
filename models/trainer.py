"""Training of the monocular depth networks on the forest dataset layout (monodepth2-style ``Trainer``).

``Trainer(opts).train()`` writes checkpoints, ``log.csv`` and ``curves.png`` after every epoch and resumes
exactly from ``last.pt``; what each file holds and why runs are reproducible: docs/training.md.

Nothing of a run is lost: a folder that already holds a run is refused unless the run is continued (``resume``
with one of its checkpoints) or replaced (``overwrite``), and nothing is written before the first epoch is done,
so a run that fails on its data leaves no empty folders behind (docs/training.md, "The run folder").
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional
from torch.utils.data import DataLoader
from tqdm import tqdm

from forest_perception.cli_args import format_image_size
from forest_perception.dataset_tools.settings import DatasetSettings
from forest_perception.models.data import (
    MIN_DEPTH_M,
    ForestDepthDataset,
    FrameLoadError,
    check_input_hw,
    collect_segments,
    image_normalisation,
    split_segments,
)
from forest_perception.models.networks import MODEL_NAMES, build_model
from forest_perception.models.outputs import check_output_folder
from forest_perception.models.provenance import git_commit
from forest_perception.models.torch_engine import model_from_checkpoint, read_checkpoint_file

CHECKPOINT_FORMAT = 1
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

    model: str = "autoencoder"
    model_kwargs: dict = field(default_factory=dict)
    input_hw: tuple[int, int] = (240, 320)
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
    min_depth: float = MIN_DEPTH_M
    max_depth: float = 10.0
    augment: bool = True
    workers: int = 0
    seed: int = 0
    out: str = "runs/depth"
    device: str = "cpu"
    threads: int = 0
    resume: str | None = None
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

    def validate(self) -> TrainOptions:
        """Raise ``ValueError`` naming the first bad option by its command-line flag (writes nothing)."""
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
        for name in ("lr", "weight_decay", "gamma", "loss_silog", "loss_berhu", "loss_l1", "loss_smooth"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{_flag(name)} must be a finite number >= 0, got {value!r}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
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
        if self.resume is not None and not Path(self.resume).is_file():
            raise FileNotFoundError(f"--resume {self.resume} does not exist; give a checkpoint of the run to "
                                    "continue (its checkpoints/last.pt)")
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


# --------------------------------------------------------------------------- model plumbing


def build_loss(opts: TrainOptions) -> nn.Module:
    """The depth loss with the weights of ``opts``."""
    from forest_perception.models.losses import DepthLoss

    return DepthLoss(silog=opts.loss_silog, berhu=opts.loss_berhu, l1=opts.loss_l1, smooth=opts.loss_smooth,
                     min_depth=opts.min_depth, max_depth=opts.max_depth)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def read_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict:
    """The dict saved by ``Trainer.save_model`` (tensors only unpickled: ``weights_only=True``).

    ``ModelLoadError`` (a ``ValueError``) naming the file when it is missing, empty, truncated or not ours.
    """
    return read_checkpoint_file(path, map_location=device)


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model saved in a checkpoint; returns (model in eval mode, checkpoint dict)."""
    ckpt = read_checkpoint(path, device)
    for key in ("model_name", "model_kwargs", "input_hw", "model_state"):
        if key not in ckpt:
            raise ValueError(f"checkpoint {str(path)!r} has no {key!r}: it is not a checkpoint written by "
                             "'forest-train train'")
    model, _meta = model_from_checkpoint(ckpt, path)
    return model.to(device).eval(), ckpt


def _as_outputs(raw: object) -> list[torch.Tensor]:
    if isinstance(raw, torch.Tensor):
        return [raw]
    if isinstance(raw, dict):
        return list(raw.values())
    return list(raw)


def _atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- trainer


class Trainer:
    """Trains one depth network; see the module docstring for what it writes."""

    def __init__(self, opts: TrainOptions) -> None:
        # Nothing is written here: the run folder and its files appear once the first epoch is done.
        self.opts = opts.validate()
        opts.check_run_folder()
        self.out = Path(opts.out)
        self.checkpoint_dir = self.out / "checkpoints"
        self._output_open = False
        if opts.threads:
            torch.set_num_threads(opts.threads)
        self.device = resolve_device(opts.device)
        seed_everything(opts.seed)

        reading = opts.dataset_settings()
        if opts.val:
            train_segments, val_segments = collect_segments(opts.data, reading), collect_segments(opts.val, reading)
        elif opts.val_fraction > 0:
            segments = [s for s in collect_segments(opts.data, reading) if len(s) > 0]
            if len(segments) < 2:
                raise ValueError(f"--data {' '.join(opts.data)} holds {len(segments)} segment(s) with frames: too "
                                 f"few to hold out --val-fraction {opts.val_fraction} of them for validation; give "
                                 "--val DIR, or --val-fraction 0 to train without validation")
            train_segments, val_segments, _ = split_segments(segments, opts.val_fraction, 0.0, opts.seed)
        else:
            train_segments, val_segments = collect_segments(opts.data, reading), []
        common = {"input_hw": opts.input_hw, "max_depth": opts.max_depth, "min_depth": opts.min_depth}
        self.train_dataset = ForestDepthDataset(train_segments, augment=opts.augment, seed=opts.seed, **common)
        self.val_dataset = ForestDepthDataset(val_segments, **common) if val_segments else None

        try:
            self.model = build_model(opts.model, opts.input_hw, **opts.model_kwargs).to(self.device)
        except (TypeError, ValueError) as exc:
            given = " ".join(f"{key}={value}" for key, value in opts.model_kwargs.items())
            raise ValueError(f"--model-kwarg {given}: model {opts.model!r} does not take these arguments "
                             f"({exc})") from None
        self.loss_fn = build_loss(opts).to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
        if opts.scheduler == "cosine":
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=opts.epochs)
        elif opts.scheduler == "step":
            self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, opts.step_size, opts.gamma)
        else:
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0)

        self.epoch = 0  # next epoch to run
        self.step = 0  # optimizer steps taken
        self.history: list[dict] = []
        self.best_score = math.inf
        self.best_epoch: int | None = None
        self.git_commit = git_commit()
        self._last_plot = -math.inf
        if opts.resume:
            self.load_model(opts.resume)

    def _open_output(self) -> None:
        """Create the run folder on the first write; ``overwrite`` drops the earlier run's best.pt then."""
        if self._output_open:
            return
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        if self.opts.overwrite:
            # last.pt, log.csv and curves.png are replaced as this epoch is written; best.pt might not be
            (self.checkpoint_dir / "best.pt").unlink(missing_ok=True)
        # appended, so a resumed run keeps the command that started it
        with open(self.out / "command.txt", "w" if self.opts.overwrite else "a") as f:
            f.write((self.opts.command or "(python API) Trainer(TrainOptions(...))") + "\n")
        self._output_open = True

    def stop_message(self, reason: str) -> str:
        """``reason`` plus what is left of the run and how to go on."""
        if self._output_open:
            return f"{reason}; {self.checkpoint_dir / 'last.pt'} holds epoch {self.epoch}: continue with --resume"
        return f"{reason}; nothing was written to {self.out}"

    # ----------------------------------------------------------------- one batch

    def process_batch(self, batch: dict) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """Forward a batch (coarse and fine outputs of ``forward_multi`` when training) and its losses."""
        image = batch["image"].to(self.device, non_blocking=True)
        if self.model.training and hasattr(self.model, "forward_multi"):
            outputs = _as_outputs(self.model.forward_multi(image))
        else:
            outputs = _as_outputs(self.model(image))
        return outputs, self.compute_losses(batch, outputs)

    def compute_losses(self, batch: dict, outputs: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Loss of every output scale (upsampled to the target size), summed into ``loss``."""
        target = batch["depth"].to(self.device, non_blocking=True)
        image = batch["image"].to(self.device, non_blocking=True)
        losses: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=self.device)
        for i, pred in enumerate(outputs):
            if pred.shape[-2:] != target.shape[-2:]:
                pred = functional.interpolate(pred, size=target.shape[-2:], mode="bilinear", align_corners=False)
            scale_total, parts = self.loss_fn(pred, target, image)
            total = total + scale_total
            prefix = "" if i == len(outputs) - 1 else f"scale{i}_"
            for name, value in parts.items():
                losses[prefix + name] = value.detach() if isinstance(value, torch.Tensor) else torch.tensor(value)
            if len(outputs) > 1:
                losses[f"scale{i}_total"] = scale_total.detach()
        losses["loss"] = total
        return losses

    # ----------------------------------------------------------------- epochs

    def _loader(self, dataset: ForestDepthDataset, shuffle: bool, epoch: int) -> DataLoader:
        generator = torch.Generator().manual_seed(self.opts.seed * 100003 + epoch)
        return DataLoader(
            dataset,
            batch_size=self.opts.batch_size,
            shuffle=shuffle,
            num_workers=self.opts.workers,
            generator=generator,
            drop_last=False,
            pin_memory=self.device.type == "cuda",
        )

    def run_epoch(self) -> dict[str, float]:
        """One pass over the training data; returns mean loss parts, images and seconds."""
        epoch = self.epoch
        torch.manual_seed(self.opts.seed * 100003 + epoch)  # dropout etc. identical on resume
        self.train_dataset.set_epoch(epoch)
        self.model.train()
        sums: dict[str, float] = {}
        count = 0
        start = time.perf_counter()
        loader = self._loader(self.train_dataset, shuffle=True, epoch=epoch)
        total = min(len(loader), self.opts.max_batches) if self.opts.max_batches else len(loader)
        bar = tqdm(loader, total=total, desc=f"epoch {epoch + 1}/{self.opts.epochs}", leave=False,
                   disable=not self.opts.progress, dynamic_ncols=True)
        for b, batch in enumerate(bar):
            if self.opts.max_batches and b >= self.opts.max_batches:
                break
            _, losses = self.process_batch(batch)
            loss = losses["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the loss became {loss.item()} in epoch {epoch + 1}, batch {b + 1}: "
                                         f"training diverged; lower --lr (now {self.opts.lr:g}) or check the data")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.step += 1
            n = batch["image"].shape[0]
            count += n
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach()) * n
            bar.set_postfix(loss=f"{sums['loss'] / count:.4f}")
        bar.close()
        seconds = time.perf_counter() - start
        result = {f"train_{k}": v / max(count, 1) for k, v in sums.items()}
        result.update(train_images=count, train_seconds=seconds, images_per_s=count / max(seconds, 1e-9))
        return result

    @torch.no_grad()
    def val(self) -> dict[str, float]:
        """Metrics (``val_absrel``, ...) and mean loss on the validation set; {} without one."""
        if self.val_dataset is None:
            return {}
        from forest_perception.models.metrics import MetricAccumulator

        self.model.eval()
        accumulator = MetricAccumulator(min_depth=self.opts.min_depth, max_depth=self.opts.max_depth)
        loss_sum, count = 0.0, 0
        loader = self._loader(self.val_dataset, shuffle=False, epoch=0)
        for batch in tqdm(loader, desc="val", leave=False, disable=not self.opts.progress, dynamic_ncols=True):
            outputs, losses = self.process_batch(batch)
            pred = outputs[-1]
            target = batch["depth"].to(self.device)
            if pred.shape[-2:] != target.shape[-2:]:
                pred = functional.interpolate(pred, size=target.shape[-2:], mode="bilinear", align_corners=False)
            accumulator.update(pred, target)
            n = target.shape[0]
            loss_sum += float(losses["loss"]) * n
            count += n
        metrics = {f"val_{k}": float(v) for k, v in accumulator.result().items()}
        metrics["val_loss"] = loss_sum / max(count, 1)
        return metrics

    def train(self, max_epochs: int | None = None) -> list[dict]:
        """Run the remaining epochs (at most ``max_epochs`` of them in this call); returns the history."""
        opts = self.opts
        stop = opts.epochs if max_epochs is None else min(opts.epochs, self.epoch + max_epochs)
        if opts.progress:
            print(f"train: {self.train_dataset.describe()}")
            if self.val_dataset is not None:
                print(f"val:   {self.val_dataset.describe()}")
            print(f"model: {opts.model} on {self.device}, {sum(p.numel() for p in self.model.parameters()):,} "
                  f"parameters; epochs {self.epoch + 1}..{opts.epochs}; out {self.out}")
        while self.epoch < stop:
            lr = self.optimizer.param_groups[0]["lr"]
            row: dict = {"epoch": self.epoch + 1, "lr": lr}
            start = time.perf_counter()
            try:
                row.update(self.run_epoch())
                if (self.epoch + 1) % opts.eval_every == 0 or self.epoch + 1 == opts.epochs:
                    row.update(self.val())
            except FrameLoadError as exc:
                raise FrameLoadError(self.stop_message(f"epoch {self.epoch + 1}: {worker_error_message(exc)}")) from exc
            except FloatingPointError as exc:
                raise FloatingPointError(self.stop_message(str(exc))) from exc
            self.scheduler.step()
            row["seconds"] = time.perf_counter() - start
            row["step"] = self.step
            self.history.append(row)
            self.epoch += 1
            self.save_model()
            self.log(row, plot=self.epoch == stop)
        return self.history

    # ----------------------------------------------------------------- logging and checkpoints

    def log(self, row: dict, plot: bool = False) -> None:
        """Print a one-line epoch summary, rewrite ``log.csv`` and redraw ``curves.png``.

        The plot (about a second) is redrawn when ``plot`` is set or the last one is over 30 s old.
        """
        if self.opts.progress:
            shown = [f"epoch {row['epoch']}/{self.opts.epochs}", f"loss {row.get('train_loss', math.nan):.4f}"]
            for key in ("val_absrel", "val_rmse", "val_delta1"):
                if key in row:
                    shown.append(f"{key[4:]} {row[key]:.4f}")
            shown += [f"lr {row['lr']:.2e}", f"{row['images_per_s']:.1f} img/s", f"{row['seconds']:.1f} s"]
            tqdm.write("  ".join(shown))
        self._open_output()
        write_log_csv(self.history, self.out / "log.csv")
        if not plot and time.monotonic() - self._last_plot < 30.0:
            return
        self._last_plot = time.monotonic()
        try:
            plot_curves(self.history, self.out / "curves.png")
        except Exception as exc:  # a plot is a convenience: never lose a run over it
            tqdm.write(f"warning: could not draw {self.out / 'curves.png'}: {exc}")

    def _score(self, row: dict) -> float:
        return float(row.get("val_absrel", math.inf) if self.val_dataset else row.get("train_loss", math.inf))

    def checkpoint(self) -> dict:
        """Everything needed to rebuild the model and to resume training."""
        mean, std = image_normalisation()
        last = self.history[-1] if self.history else {}
        return {
            "format": CHECKPOINT_FORMAT,
            "model_name": self.opts.model,
            "model_kwargs": dict(self.opts.model_kwargs),
            "input_hw": list(self.opts.input_hw),
            "normalisation": {"mean": list(mean), "std": list(std)},
            "min_depth": self.opts.min_depth,
            "max_depth": self.opts.max_depth,
            "model_state": self.model.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "scheduler_state": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "metrics": {k: float(v) for k, v in last.items() if isinstance(v, (int, float))},
            "history": [{k: float(v) for k, v in r.items()} for r in self.history],
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "options": self.opts.to_dict(),
            "command": self.opts.command,
            "git_commit": self.git_commit,
            "torch_version": str(torch.__version__),
        }

    def save_model(self) -> Path:
        """Write ``last.pt`` (and ``best.pt`` when the epoch's score is the best yet); returns last.pt."""
        self._open_output()
        last = self.checkpoint_dir / "last.pt"
        row = self.history[-1] if self.history else {}
        score = self._score(row)
        improved = bool(row) and score < self.best_score and ("val_absrel" in row or self.val_dataset is None)
        if improved:
            self.best_score, self.best_epoch = score, self.epoch
        ckpt = self.checkpoint()
        _atomic_save(ckpt, last)
        if improved:
            _atomic_save(ckpt, self.checkpoint_dir / "best.pt")
        return last

    def load_model(self, path: str | os.PathLike) -> None:
        """Restore model, optimizer, scheduler, epoch and history from a checkpoint to continue training."""
        ckpt = read_checkpoint(path, self.device)
        where = f"--resume {path}"
        if "model_state" not in ckpt:
            raise ValueError(f"{where} has no 'model_state': it is not a checkpoint written by 'forest-train train'")
        if ckpt.get("model_name") != self.opts.model:
            raise ValueError(f"{where} holds a {ckpt.get('model_name')!r} model, not --model {self.opts.model}: "
                             "give the --model it was trained with")
        saved_hw = ckpt.get("input_hw")
        if list(saved_hw or []) != list(self.opts.input_hw):
            saved = format_image_size(saved_hw) if saved_hw and len(saved_hw) == 2 else repr(saved_hw)
            raise ValueError(f"{where} was trained at --image-size {saved}, not "
                             f"{format_image_size(self.opts.input_hw)}: give the --image-size it was trained with")
        try:
            self.model.load_state_dict(ckpt["model_state"])
            if "optimizer_state" in ckpt:
                self.optimizer.load_state_dict(ckpt["optimizer_state"])
            if "scheduler_state" in ckpt:
                self.scheduler.load_state_dict(ckpt["scheduler_state"])
                self._stretch_cosine()
            self.epoch = int(ckpt.get("epoch", 0))
            self.step = int(ckpt.get("step", 0))
            self.history = [dict(r) for r in ckpt.get("history", [])]
            for r in self.history:
                r["epoch"] = int(r["epoch"])
            self.best_score = float(ckpt.get("best_score", math.inf))
            self.best_epoch = ckpt.get("best_epoch")
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            detail = " ".join(str(exc).split())[:200]
            raise ValueError(f"{where} does not fit this run (saved with --model-kwarg "
                             f"{ckpt.get('model_kwargs') or 'none'}, --scheduler "
                             f"{(ckpt.get('options') or {}).get('scheduler', '?')}): {detail}; give the flags it was "
                             "trained with") from exc
        if self.opts.progress:
            print(f"resumed from {path}: {self.epoch} epoch(s), {self.step} step(s) done")


    def _stretch_cosine(self) -> None:
        # A run resumed with a different --epochs keeps its cosine curve's start but ends at the new last epoch.
        scheduler = self.scheduler
        if not isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR) or scheduler.T_max == self.opts.epochs:
            return
        scheduler.T_max = self.opts.epochs
        t = min(scheduler.last_epoch, scheduler.T_max)
        for group, base_lr in zip(self.optimizer.param_groups, scheduler.base_lrs):
            cosine = (1 + math.cos(math.pi * t / scheduler.T_max)) / 2
            group["lr"] = scheduler.eta_min + (base_lr - scheduler.eta_min) * cosine
        scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def write_log_csv(history: Sequence[dict], path: str | os.PathLike) -> None:
    """One row per epoch; columns are the union of the rows' keys (empty where an epoch had no value)."""
    columns: list[str] = []
    for row in history:
        columns.extend(k for k in row if k not in columns)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        for row in history:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    os.replace(tmp, path)


def plot_curves(history: Sequence[dict], path: str | os.PathLike) -> None:
    """Learning curves: train/val loss, val absrel and delta1, learning rate (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]

    def series(key: str) -> tuple[list, list]:
        pairs = [(r["epoch"], r[key]) for r in history if key in r]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for key, label in (("train_loss", "train"), ("val_loss", "val")):
        x, y = series(key)
        if x:
            axes[0].plot(x, y, marker="o", label=label)
    axes[0].set_title("loss")
    axes[0].legend()
    for key in ("val_absrel", "val_delta1"):
        x, y = series(key)
        if x:
            axes[1].plot(x, y, marker="o", label=key[4:])
    axes[1].set_title("validation")
    if axes[1].lines:
        axes[1].legend()
    axes[2].plot(epochs, [r["lr"] for r in history], marker="o")
    axes[2].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
