"""Training of the monocular depth networks on the forest dataset layout (monodepth2-style ``Trainer``).

``Trainer(opts).train()`` writes checkpoints, ``log.csv`` and ``curves.png`` after every epoch and resumes
exactly from ``last.pt``; what each file holds and why runs are reproducible: docs/training.md.

Nothing of a run is lost: a folder that already holds a run is refused unless the run is continued (``resume``
with one of its checkpoints) or replaced (``overwrite``), and nothing is written before the first epoch is done,
so a run that fails on its data leaves no empty folders behind (docs/training.md, "The run folder").
"""

from __future__ import annotations

import csv
import math
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional
from torch.utils.data import DataLoader
from tqdm import tqdm

from forest_perception.cli_args import format_image_size
from forest_perception.models.checkpoints import checkpoint_reference, save_checkpoint
from forest_perception.models.data import (
    ForestDepthDataset,
    FrameLoadError,
    collect_segments,
    image_normalisation,
    split_segments,
)
from forest_perception.models.networks import build_model, freeze_encoder, set_train_mode
from forest_perception.models.provenance import git_commit
from forest_perception.models.torch_engine import model_from_checkpoint, read_checkpoint_file

# the options and --init checks live in train_options; re-exported here, where callers have always found them
from forest_perception.models.train_options import (  # noqa: F401
    CHECKPOINT_FORMAT,
    DEFAULT_INPUT_HW,
    DEFAULT_MAX_DEPTH_M,
    DEFAULT_MODEL,
    RUN_FILES,
    SCHEDULERS,
    RunExistsError,
    TrainOptions,
    build_loss,
    check_device,
    check_image_size,
    check_init_normalisation,
    existing_run_files,
    load_init_weights,
    resolve_device,
    worker_error_message,
)

# --------------------------------------------------------------------------- model plumbing


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def amp_dtype(device: torch.device) -> torch.dtype:
    """The autocast type of ``--amp``: bfloat16 where the device has it (no loss scaling needed), else float16."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


class _NotARunError(Exception):
    """A ``--resume`` checkpoint with weights only (no optimizer state)."""


def _as_outputs(raw: object) -> list[torch.Tensor]:
    if isinstance(raw, torch.Tensor):
        return [raw]
    if isinstance(raw, dict):
        return list(raw.values())
    return list(raw)


def parameter_groups(model: nn.Module, opts: TrainOptions) -> list[dict]:
    """AdamW's parameter groups: one at ``--lr``; with ``--old-layers-lr`` below 1, a grown network's new tensors
    at ``--lr`` and the tensors it had before at ``old_layers_lr * lr``. ``ValueError`` for a grown tensor the
    network lacks."""
    if opts.old_layers_lr == 1.0 or not opts.new_tensors:
        return [{"params": list(model.parameters()), "lr": opts.lr}]
    named = dict(model.named_parameters())
    missing = sorted(set(opts.new_tensors) - set(named))
    if missing:
        raise ValueError(f"--old-layers-lr: the checkpoint names grown tensors this network lacks: {missing[:3]}")
    new = set(opts.new_tensors)
    return [{"params": [p for n, p in named.items() if n not in new], "lr": opts.lr * opts.old_layers_lr},
            {"params": [p for n, p in named.items() if n in new], "lr": opts.lr}]


# --------------------------------------------------------------------------- trainer


class Trainer:
    """Trains one depth network; see the module docstring for what it writes."""

    def __init__(self, opts: TrainOptions) -> None:
        # Nothing is written here: the run folder and its files appear once the first epoch is done.
        init_path = opts.check_sources()
        source = None
        if opts.resume is not None:
            source = read_checkpoint(opts.resume)
        elif init_path is not None:
            source = read_checkpoint(init_path)
            check_init_normalisation(source, opts.init)
        self.opts = opts.settle(source).validate()
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
        common = {"input_hw": opts.input_hw, "max_depth": opts.max_depth, "min_depth": opts.min_depth,
                  "cache": opts.cache}
        self.train_dataset = ForestDepthDataset(train_segments, augment=opts.augment, seed=opts.seed,
                                                roll_deg=opts.roll_deg, pitch_deg=opts.pitch_deg, **common)
        self.val_dataset = ForestDepthDataset(val_segments, **common) if val_segments else None

        try:
            model = build_model(opts.model, opts.input_hw, **opts.model_kwargs)
        except (TypeError, ValueError) as exc:
            given = " ".join(f"{key}={value}" for key, value in opts.model_kwargs.items())
            raise ValueError(f"--model-kwarg {given}: model {opts.model!r} does not take these arguments "
                             f"({exc})") from None
        # what the run started from: the --init checkpoint now, the run's own record when resumed
        self.init: dict | None = None
        if init_path is not None:
            load_init_weights(model, source, opts)
            self.init = checkpoint_reference(opts.init, init_path, source)
        elif source is not None and isinstance(source.get("init"), dict):
            self.init = dict(source["init"])
        self.start_metrics: dict[str, float] = {}  # the --init network's validation metrics before training
        self.frozen_parameters = freeze_encoder(model) if opts.freeze_encoder else 0
        self.model = model.to(self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels once
        self.amp_dtype = amp_dtype(self.device) if opts.amp else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.loss_fn = build_loss(opts).to(self.device)
        self.teacher: nn.Module | None = None
        if opts.teacher is not None:
            from forest_perception.models.teacher import load_teacher

            self.teacher, _ = load_teacher(opts.teacher, opts.input_hw, opts.teacher_flip, self.device)
        # frozen parameters get no gradient, so AdamW leaves them (and their weight decay) alone; keeping them in
        # the optimizer keeps its state the same shape with and without --freeze-encoder
        self.optimizer = torch.optim.AdamW(parameter_groups(self.model, opts), lr=opts.lr,
                                           weight_decay=opts.weight_decay)
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
        """Forward a batch (coarse and fine outputs of ``forward_multi`` when training) and its losses.

        With ``amp`` the network runs in bfloat16/float16 autocast; the losses are always computed in float32.
        """
        image = batch["image"].to(self.device, non_blocking=True)
        autocast = self.amp_dtype is not None
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16, enabled=autocast):
            if self.model.training and hasattr(self.model, "forward_multi"):
                outputs = _as_outputs(self.model.forward_multi(image))
            else:
                outputs = _as_outputs(self.model(image))
        outputs = [output.float() for output in outputs]
        return outputs, self.compute_losses(batch, outputs)

    def compute_losses(self, batch: dict, outputs: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Loss of every output scale (upsampled to the target size), summed into ``loss``; in training with a
        ``--teacher``, plus ``loss_teacher`` times every scale's distance to the teacher's depth (``teacher``)."""
        from forest_perception.models.losses import valid_mask
        from forest_perception.models.teacher import teacher_loss

        target = batch["depth"].to(self.device, non_blocking=True)
        image = batch["image"].to(self.device, non_blocking=True)
        wanted = self._teacher_depth(image, target) if self.teacher is not None and self.model.training else None
        mask = valid_mask(target, self.opts.min_depth, self.opts.max_depth) if wanted is not None else None
        losses: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=self.device)
        teacher_total = torch.zeros((), device=self.device)
        for i, pred in enumerate(outputs):
            if pred.shape[-2:] != target.shape[-2:]:
                pred = functional.interpolate(pred, size=target.shape[-2:], mode="bilinear", align_corners=False)
            scale_total, parts = self.loss_fn(pred, target, image)
            total = total + scale_total
            if wanted is not None:
                teacher_total = teacher_total + teacher_loss(pred, wanted, mask)
            prefix = "" if i == len(outputs) - 1 else f"scale{i}_"
            for name, value in parts.items():
                losses[prefix + name] = value.detach() if isinstance(value, torch.Tensor) else torch.tensor(value)
            if len(outputs) > 1:
                losses[f"scale{i}_total"] = scale_total.detach()
        if wanted is not None:
            losses["teacher"] = teacher_total.detach()
            total = total + self.opts.loss_teacher * teacher_total
        losses["loss"] = total
        return losses

    @torch.no_grad()
    def _teacher_depth(self, image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The frozen teacher's depth of the batch at the target's size."""
        wanted = self.teacher(image).float()
        if wanted.shape[-2:] != target.shape[-2:]:
            wanted = functional.interpolate(wanted, size=target.shape[-2:], mode="bilinear", align_corners=False)
        return wanted

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
        set_train_mode(self.model, frozen_encoder=bool(self.opts.freeze_encoder))
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
            self.scaler.scale(loss).backward()  # the scaler passes through unless float16 autocast needs it
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.step += 1
            n = batch["image"].shape[0]
            count += n
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach()) * n
            bar.set_postfix(loss=f"{sums['loss'] / count:.4f}", img_s=f"{count / (time.perf_counter() - start):.1f}")
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
        if opts.cache is not None and self.epoch < stop:
            try:
                for dataset in (self.train_dataset, self.val_dataset):
                    if dataset is not None:
                        dataset.prepare_cache(workers=opts.workers, progress=opts.progress)
            except FrameLoadError as exc:
                raise FrameLoadError(self.stop_message(f"--cache {opts.cache}: {worker_error_message(exc)}")) from exc
        if opts.progress:
            print(f"train: {self.train_dataset.describe()}")
            if self.val_dataset is not None:
                print(f"val:   {self.val_dataset.describe()}")
            total = sum(p.numel() for p in self.model.parameters())
            trainable = total - self.frozen_parameters
            started = f"; from {self.init['source']}" if self.init else ""
            print(f"model: {opts.model} on {self.device}{' with ' + str(self.amp_dtype) if self.amp_dtype else ''}, "
                  f"{total:,} parameters ({trainable:,} trained){started}; epochs {self.epoch + 1}..{opts.epochs}; "
                  f"out {self.out}")
            groups = self.optimizer.param_groups
            if len(groups) == 2:
                grown = sum(p.numel() for p in groups[1]["params"])
                print(f"lr: {opts.lr:g} for the {len(opts.new_tensors)} grown tensor(s) ({grown:,} parameters), "
                      f"x{opts.old_layers_lr:g} for the layers the network had before it grew (--old-layers-lr)")
        if self.init is not None and self.epoch == 0 and self.val_dataset is not None and not self.start_metrics:
            # where fine-tuning starts: the --init network on the validation data, before any step
            self.start_metrics = self.val()
            if opts.progress:
                shown = "  ".join(f"{key[4:]} {self.start_metrics[key]:.4f}" for key in
                                  ("val_loss", "val_absrel", "val_rmse", "val_delta1") if key in self.start_metrics)
                tqdm.write(f"epoch 0 (--init {opts.init}, before training)  {shown}")
        while self.epoch < stop:
            lr = self.optimizer.param_groups[-1]["lr"]  # the group at --lr (the grown tensors with --old-layers-lr)
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
            "scaler_state": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "init": self.init,
            "start_metrics": dict(self.start_metrics),
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
        save_checkpoint(ckpt, last)
        if improved:
            save_checkpoint(ckpt, self.checkpoint_dir / "best.pt")
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
            if "optimizer_state" not in ckpt:  # checked once the weights fit, so a misfit is named first
                raise _NotARunError()
            if "optimizer_state" in ckpt:
                self.optimizer.load_state_dict(ckpt["optimizer_state"])
            if "scheduler_state" in ckpt:
                self.scheduler.load_state_dict(ckpt["scheduler_state"])
                self._stretch_cosine()
            if ckpt.get("scaler_state") and self.scaler.is_enabled():
                self.scaler.load_state_dict(ckpt["scaler_state"])
            self.epoch = int(ckpt.get("epoch", 0))
            self.step = int(ckpt.get("step", 0))
            self.history = [dict(r) for r in ckpt.get("history", [])]
            self.start_metrics = {k: float(v) for k, v in (ckpt.get("start_metrics") or {}).items()}
            for r in self.history:
                r["epoch"] = int(r["epoch"])
            self.best_score = float(ckpt.get("best_score", math.inf))
            self.best_epoch = ckpt.get("best_epoch")
        except _NotARunError:
            raise ValueError(f"{where} holds weights without the optimizer state of a run (a shipped or released "
                             "checkpoint): start a new run from it with --init instead") from None
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
