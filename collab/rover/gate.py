"""The validation gate: a candidate model reaches the depth node only if it is not worse on held-out frames.

Export to ONNX (with its model card) in a hidden staging folder, evaluate it and the running model with
the runtime engine, compare, then publish into the models dir (card first, ``.onnx`` last) or under
``refused/``. See ``docs/federated.md`` ("The validation gate").
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from forest_perception.collab.rover.files import json_clean, write_bytes_atomic
from forest_perception.collab.rover.holdout import HoldoutSet
from forest_perception.collab.rover.models import GlobalModel, read_candidate
from forest_perception.models import bootstrap

if TYPE_CHECKING:  # torch is imported only by the functions that need it
    from forest_perception.collab.flower.task import TaskConfig

EXPORTERS = ("dynamo", "torchscript")
REFUSED_DIR = "refused"


@dataclass(frozen=True)
class FrameScores:
    """One engine on each held-out frame: valid pixels, the sum of their relative errors, how many are within 1.25.

    ``segments`` (optional) says which held-out segment each frame comes from, so that :func:`worse_by`
    resamples whole segments, then frames within them.
    """

    pixels: np.ndarray
    absrel_sum: np.ndarray
    delta1_count: np.ndarray
    segments: np.ndarray | None = None


def score_engines(
    engines: Mapping[str, Any], holdout: HoldoutSet, min_depth: float, max_depth: float
) -> tuple[dict[str, dict[str, float]], dict[str, FrameScores]]:
    """:func:`evaluate_engines`'s metrics and, per engine, its :class:`FrameScores` (for the gate's paired test)."""
    from forest_perception.models.metrics import MetricAccumulator

    accumulators = {name: MetricAccumulator(min_depth, max_depth) for name in engines}
    per_frame: dict[str, list[tuple[float, float, float]]] = {name: [] for name in engines}
    frames = 0
    for rgb, depth in holdout:
        frames += 1
        for name, engine in engines.items():
            per_frame[name].append(accumulators[name].update_frame(np.asarray(engine.predict(rgb), np.float32),
                                                                   depth))
    out, scores = {}, {}
    for name, accumulator in accumulators.items():
        result = accumulator.result()
        out[name] = {"absrel": result["absrel"], "delta1": result["delta1"], "rmse": result["rmse"],
                     "frames": float(frames), "pixels": float(accumulator.count)}
        table = np.asarray(per_frame[name], dtype=np.float64).reshape(-1, 3)
        segments = np.asarray([segment for segment, _ in holdout.frames[:frames]], dtype=np.int64)
        scores[name] = FrameScores(table[:, 0], table[:, 1], table[:, 2], segments)
    return out, scores


def evaluate_engines(
    engines: Mapping[str, Any], holdout: HoldoutSet, min_depth: float, max_depth: float
) -> dict[str, dict[str, float]]:
    """AbsRel, delta1, RMSE (pixels pooled) of each depth engine on the held-out frames, in one pass over them.

    Engines predict at the frame's resolution (as depth_node runs them); NaN predictions count as
    ``max_depth`` (``forest_perception.models.metrics``), ground truth outside ``(min_depth, max_depth]`` is ignored.
    """
    return score_engines(engines, holdout, min_depth, max_depth)[0]


BOOTSTRAP_DRAWS = bootstrap.DRAWS
BOOTSTRAP_CELLS = bootstrap.CELLS  # resample weights held at once (8 MB)


def _segment_groups(candidate: FrameScores, running: FrameScores, keep: np.ndarray) -> list[np.ndarray]:
    """Indices (into the kept frames) of each held-out segment; one group of all frames when segments are unknown.

    A lone segment is cut into runs of consecutive frames (``models.bootstrap.resampling_groups``): neighbouring
    frames of one drive are alike, so resampling them one by one would overstate what they show.
    """
    if (candidate.segments is None) != (running.segments is None) or (
            candidate.segments is not None and not np.array_equal(candidate.segments, running.segments)):
        raise ValueError("the two models were not scored on the same held-out segments")
    if candidate.segments is None:
        return bootstrap.resampling_groups(None, int(keep.sum()))
    segments = np.asarray(candidate.segments)
    if segments.shape != candidate.pixels.shape:
        raise ValueError(f"{segments.size} segment labels for {candidate.pixels.size} frames")
    return bootstrap.resampling_groups(segments[keep], int(keep.sum()))


def worse_by(
    candidate: FrameScores, running: FrameScores, confidence: float, draws: int = BOOTSTRAP_DRAWS, seed: int = 0
) -> dict[str, float]:
    """How much worse the candidate is than the running model on the same frames, at ``confidence``.

    ``absrel`` (candidate minus running) and ``delta1`` (running minus candidate), pixels pooled as the gate's
    metrics are; positive means worse. With ``confidence`` 0 these are the differences of the pooled figures;
    above 0 they are lower bounds from a paired bootstrap (``draws`` resamples, fixed ``seed``, so a decision
    replays): the candidate is worse by at least this much with that confidence. Frames of one segment are alike
    (one drive, one stretch of forest), so when the scores know their segments the bootstrap resamples segments
    first and frames within them: a loss on one segment alone is not taken for a loss everywhere. A lone segment is
    resampled in runs of consecutive frames (``models.bootstrap``), so a loss on one stretch of it is not
    either. Few frames or few segments give a wide spread and so a low bound: a handful of them cannot prove a
    small loss.
    """
    if not 0.0 <= confidence < 1.0:
        raise ValueError(f"confidence must be within [0, 1), got {confidence!r}")
    if candidate.pixels.shape != running.pixels.shape or not np.array_equal(candidate.pixels, running.pixels):
        raise ValueError("the two models were not scored on the same frames and pixels")
    keep = candidate.pixels > 0
    groups = _segment_groups(candidate, running, keep)
    pixels = candidate.pixels[keep]
    absrel = (candidate.absrel_sum - running.absrel_sum)[keep]
    delta1 = (running.delta1_count - candidate.delta1_count)[keep]
    if pixels.size == 0:
        return {"absrel": math.nan, "delta1": math.nan}
    if confidence == 0.0:
        return {"absrel": float(absrel.sum() / pixels.sum()), "delta1": float(delta1.sum() / pixels.sum())}
    bounds = bootstrap.pooled_ratio_quantiles(np.stack([absrel, delta1]), pixels, groups, [1.0 - confidence],
                                              draws, seed, BOOTSTRAP_CELLS)
    return {"absrel": float(bounds[0, 0]), "delta1": float(bounds[1, 0])}


# ---------------------------------------------------------------------------------------------- export


def build_network(model: GlobalModel, base: TaskConfig) -> tuple[Any, dict[str, Any], TaskConfig]:
    """``(torch module with the model's arrays, checkpoint-style meta, task config)``; ``ValueError`` if unusable."""
    from forest_perception.collab.flower.task import build_model, set_arrays

    config = model.task_config(base)
    if config.dcccl_mimic:
        check_mimic(model, config)
    network = build_model(config)
    try:
        set_arrays(network, model.names, model.arrays)  # refuses missing/unknown/mis-shaped/non-finite tensors
    except ValueError as exc:
        arch = f"{config.model} at {config.input_hw[1]}x{config.input_hw[0]} {config.network_kwargs()}"
        raise ValueError(f"its tensors are not those of the network it names ({arch}): {exc}") from None
    network.eval()
    if config.dcccl_mimic:  # dc-ccl: the rover's model is its mimic + the small submodel, one graph
        network = network.fused()
    kwargs = config.network_kwargs()
    meta = {
        "model_name": "dcccl_rover" if config.dcccl_mimic else config.model,
        "model_kwargs": kwargs,
        "input_hw": list(config.input_hw),
        "min_depth": config.min_depth,
        "max_depth": config.max_depth,
        "command": str(model.meta.get("command") or f"federated global model, round {model.round}"),
        "metrics": {},
    }
    return network, meta, config


def check_mimic(model: GlobalModel, config: TaskConfig) -> None:
    """A dc-ccl global model must have been made with the mimic this rover holds: ``VersionMismatchError`` otherwise."""
    from forest_perception.collab.dcccl import VersionMismatchError, read_part

    expected = str(model.meta.get("mimic-version", ""))
    held = read_part(config.dcccl_mimic, "mimic").version
    if expected != held:
        raise VersionMismatchError(f"the small submodel was made for mimic {expected or 'unknown'}, this rover's mimic "
                                   f"({config.dcccl_mimic}) is {held}")


def export_candidate(
    model: GlobalModel, out_path: str | os.PathLike, base: TaskConfig, exporter: str = "dynamo"
) -> tuple[Path, TaskConfig]:
    """Export ``model`` to ONNX (checked against PyTorch by :func:`forest_perception.models.export.export_onnx`)."""
    from forest_perception.models.export import export_onnx

    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {list(EXPORTERS)}, got {exporter!r}")
    network, meta, config = build_network(model, base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation and tracer warnings
        path = export_onnx((network, meta), out_path, input_hw=config.input_hw, exporter=exporter,
                           export_command=f"forest_perception.collab.rover.gate.export_candidate ({exporter})")
    return path, config


# ---------------------------------------------------------------------------------------------- gate


@dataclass
class GateConfig:
    """How strict the gate is."""

    tolerance_absrel: float = 0.0  # accept an AbsRel at most this much above the running model's
    tolerance_delta1: float = 0.01  # and a delta1 at most this much below it
    max_absrel: float = 1.0  # refuse above this AbsRel even with nothing to compare against
    min_holdout_frames: int = 1
    confidence: float = 0.9  # refuse only if worse beyond a tolerance with this confidence over the frames (0: as is)
    exporter: str = "dynamo"
    threads: int = 1  # ONNX Runtime intra-op threads while evaluating
    keep_refused: int = 3  # refused candidates kept in <models dir>/refused for inspection

    def validate(self) -> GateConfig:
        """Raise ``ValueError`` naming the first bad field."""
        for name in ("tolerance_absrel", "tolerance_delta1", "max_absrel"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0 and not math.isnan(value)):
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        if not (isinstance(self.confidence, (int, float)) and 0.0 <= self.confidence < 1.0):
            raise ValueError(f"confidence must be within [0, 1), got {self.confidence!r}")
        for name in ("min_holdout_frames", "threads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.keep_refused, int) or self.keep_refused < 0:
            raise ValueError(f"keep_refused must be a non-negative integer, got {self.keep_refused!r}")
        if self.exporter not in EXPORTERS:
            raise ValueError(f"exporter must be one of {list(EXPORTERS)}, got {self.exporter!r}")
        return self


GATE_CODES = ("accepted", "first_model", "worse", "too_inaccurate", "no_holdout", "unreadable", "export_failed",
              "running_model_failed")
"""``GateDecision.code`` values: the first two accept, the rest refuse."""


@dataclass
class GateDecision:
    """The gate's verdict on one candidate."""

    accepted: bool
    code: str
    reason: str
    label: str
    round: int | None = None
    model_path: str = ""  # the published .onnx (accepted) or its copy under refused/ ("" if none)
    model_version: str = ""
    candidate_metrics: dict[str, float] = field(default_factory=dict)
    running_metrics: dict[str, float] = field(default_factory=dict)
    running_model: str = ""
    worse_by: dict[str, float] = field(default_factory=dict)  # compare_metrics' margins (and their confidence)
    holdout_frames: int = 0
    seconds: float = 0.0
    decided_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN as null)."""
        return json_clean(asdict(self))


def _fmt(value: float) -> str:
    return "nan" if not math.isfinite(value) else f"{value:.4f}"


def compare_metrics(
    candidate: Mapping[str, float],
    running: Mapping[str, float] | None,
    config: GateConfig,
    frames: tuple[FrameScores, FrameScores] | None = None,
) -> tuple[bool, str, str]:
    """``(accepted, code, reason)`` from the held-out metrics of the candidate and the running model.

    With ``frames`` (the two models' :class:`FrameScores`) and ``config.confidence`` above 0, a candidate is
    refused as worse only if it is worse beyond a tolerance with that confidence (:func:`worse_by`); without,
    the pooled figures are compared as they are.
    """
    return _compare(candidate, running, config, frames)[:3]


def _compare(
    candidate: Mapping[str, float], running: Mapping[str, float] | None, config: GateConfig,
    frames: tuple[FrameScores, FrameScores] | None,
) -> tuple[bool, str, str, dict[str, float]]:
    absrel, delta1 = float(candidate.get("absrel", math.nan)), float(candidate.get("delta1", math.nan))
    if not (math.isfinite(absrel) and math.isfinite(delta1)):
        return False, "no_holdout", "candidate metrics are not finite (no valid ground-truth pixel held out)", {}
    if absrel > config.max_absrel:
        return False, "too_inaccurate", f"candidate absrel {_fmt(absrel)} above the limit {config.max_absrel}", {}
    if running is None:
        return True, "first_model", f"no running model to compare with; candidate absrel {_fmt(absrel)}", {}
    run_absrel, run_delta1 = float(running.get("absrel", math.nan)), float(running.get("delta1", math.nan))
    confidence = float(config.confidence) if frames is not None else 0.0
    if confidence > 0.0:
        margins = worse_by(*frames, confidence)
    else:
        margins = {"absrel": absrel - run_absrel, "delta1": run_delta1 - delta1}
    frame_count = int(np.count_nonzero(frames[0].pixels)) if frames is not None else 0
    sure = f" (worse by at least {{:.4f}} with {100 * confidence:g} % confidence over {frame_count} frames)" \
        if confidence > 0.0 else ""
    worse = []
    if math.isfinite(run_absrel) and margins["absrel"] > config.tolerance_absrel:
        worse.append(f"absrel {_fmt(absrel)} > running {_fmt(run_absrel)} + tolerance {config.tolerance_absrel}"
                     + sure.format(margins["absrel"]))
    if math.isfinite(run_delta1) and margins["delta1"] > config.tolerance_delta1:
        worse.append(f"delta1 {_fmt(delta1)} < running {_fmt(run_delta1)} - tolerance {config.tolerance_delta1}"
                     + sure.format(margins["delta1"]))
    margins = {**margins, "confidence": confidence}
    if worse:
        return False, "worse", "; ".join(worse), margins
    reason = f"absrel {_fmt(absrel)} (running {_fmt(run_absrel)}), delta1 {_fmt(delta1)} (running {_fmt(run_delta1)})"
    if confidence > 0.0 and (absrel > run_absrel + config.tolerance_absrel
                             or delta1 < run_delta1 - config.tolerance_delta1):
        reason += (f"; worse beyond the tolerance on these frames but not with {100 * confidence:g} % confidence "
                   f"over {frame_count} frames")
    return True, "accepted", reason, margins


class ValidationGate:
    """Exports candidates into a models dir and lets only those through that do not make depth worse."""

    def __init__(self, models_dir: str | os.PathLike, config: GateConfig | None = None) -> None:
        self.models_dir = Path(models_dir)
        self.config = (config or GateConfig()).validate()

    def _refused(self, label: str, server_round: int | None, code: str, reason: str, started: float,
                 **extra: Any) -> GateDecision:
        return GateDecision(False, code, reason, label, server_round, seconds=time.perf_counter() - started, **extra)

    def check(
        self,
        candidate: GlobalModel | str | os.PathLike,
        running_model: str | os.PathLike | None,
        holdout: HoldoutSet,
        base: TaskConfig,
        label: str | None = None,
    ) -> GateDecision:
        """Gate one candidate (named arrays or a dropped file) against the model the depth node runs now.

        Never raises for a bad candidate: an unreadable file, an export that does not match PyTorch or a
        model that is worse on the held-out frames gives a refused decision with the reason.
        """
        started = time.perf_counter()
        if not isinstance(candidate, GlobalModel):
            label = label or Path(candidate).stem
            try:
                candidate = read_candidate(candidate)
            except ValueError as exc:
                return self._refused(label, None, "unreadable", str(exc), started)
        label = _safe_label(label or (f"global-r{candidate.round:06d}" if candidate.round is not None else "model"))
        server_round = candidate.round
        if len(holdout) < self.config.min_holdout_frames:
            return self._refused(label, server_round, "no_holdout",
                                 f"{len(holdout)} held-out frames, need {self.config.min_holdout_frames}: the rover "
                                 "needs at least two recorded segments (one is held out)", started)
        self.models_dir.mkdir(parents=True, exist_ok=True)
        staging = self.models_dir / f".staging-{label}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            return self._check_staged(candidate, running_model, holdout, base, label, staging, started)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _check_staged(self, candidate: GlobalModel, running_model: str | os.PathLike | None, holdout: HoldoutSet,
                      base: TaskConfig, label: str, staging: Path, started: float) -> GateDecision:
        from forest_perception.models.torch_engine import load_engine

        server_round = candidate.round
        try:
            if candidate.onnx:  # exported already (a dc-ccl cloud model): gate the file as it is
                onnx_path, config = staging / f"{label}.onnx", base
                shutil.copyfile(candidate.onnx, onnx_path)
            else:
                onnx_path, config = export_candidate(candidate, staging / f"{label}.onnx", base, self.config.exporter)
        except OSError as exc:
            return self._refused(label, server_round, "unreadable", f"{candidate.source or label}: {exc}", started)
        except ValueError as exc:  # wrong tensors for the network, non-finite values, bad meta
            return self._refused(label, server_round, "unreadable", f"{candidate.source or label}: {exc}", started)
        except Exception as exc:  # noqa: BLE001 - exporter failures of any kind refuse the candidate
            return self._refused(label, server_round, "export_failed",
                                 f"ONNX export failed: {type(exc).__name__}: {str(exc)[:300]}", started)
        engines: dict[str, Any] = {}
        try:
            engines["candidate"] = load_engine(onnx_path, backend="onnxruntime", threads=self.config.threads)
        except Exception as exc:  # noqa: BLE001 - an export ONNX Runtime cannot open is refused
            return self._refused(label, server_round, "export_failed", f"exported model does not load: {exc}", started)
        version = engines["candidate"].model_version
        running_path = str(running_model or "")
        running_note = ""
        if running_path:
            try:
                engines["running"] = load_engine(running_path, threads=self.config.threads)
            except Exception as exc:  # noqa: BLE001 - compare against nothing, say so
                running_note = f"running model {running_path!r} not evaluated ({exc}); "
        try:
            metrics, frame_scores = score_engines(engines, holdout, config.min_depth, config.max_depth)
        except (OSError, ValueError) as exc:
            return self._refused(label, server_round, "no_holdout", f"held-out frames not readable: {exc}", started)
        running_metrics = metrics.get("running")
        paired = (frame_scores["candidate"], frame_scores["running"]) if running_metrics is not None else None
        accepted, code, reason, margins = _compare(metrics["candidate"], running_metrics, self.config, paired)
        if running_note and code == "first_model":
            reason = running_note + reason
        decision = GateDecision(
            accepted, code, f"{reason} on {len(holdout)} held-out frames", label, server_round,
            model_version=version, candidate_metrics=metrics["candidate"], running_metrics=running_metrics or {},
            running_model=running_path, worse_by=margins, holdout_frames=len(holdout),
        )
        card = {
            "metrics": {k: v for k, v in metrics["candidate"].items() if k in ("absrel", "delta1", "rmse")},
            "notes": f"Validation gate on the rover's held-out segments {holdout.segment_ids}: "
                     f"{'accepted' if accepted else 'refused'} ({code}): {decision.reason}.",
            "gate": {"code": code, "running_model": running_path, "running_metrics": running_metrics or {},
                     "round": server_round, "source": candidate.source},
            "train_command": str(candidate.meta.get("command") or f"federated learning, global round {server_round}"),
        }
        decision.model_path = str(self._publish(onnx_path, label, version, accepted, card, decision))
        decision.seconds = time.perf_counter() - started
        return decision

    def _publish(self, onnx_path: Path, label: str, version: str, accepted: bool, card: dict,
                 decision: GateDecision) -> Path:
        from forest_perception.models.export import write_model_card

        write_model_card(onnx_path, json_clean(card))
        suffix = version.rsplit("-", 1)[-1] if "-" in version else hashlib.sha256(version.encode()).hexdigest()[:12]
        dest_dir = self.models_dir if accepted else self.models_dir / REFUSED_DIR
        dest_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{label}-{suffix}"
        final = dest_dir / f"{stem}.onnx"
        if not accepted:
            write_bytes_atomic(dest_dir / f"{stem}.decision.json",
                                (json.dumps(decision.to_dict(), indent=2) + "\n").encode())
        # the card first and the model last: whoever sees the .onnx sees a complete model with its card
        for ext in (".json", ".md", ".onnx"):
            os.replace(onnx_path.with_suffix(ext), final.with_suffix(ext))
        if not accepted:
            self._prune_refused(dest_dir)
        return final

    def _prune_refused(self, folder: Path) -> None:
        models = sorted(folder.glob("*.onnx"), key=lambda p: p.stat().st_mtime_ns)
        for old in models[: max(0, len(models) - self.config.keep_refused)]:
            for ext in (".onnx", ".json", ".md", ".decision.json"):
                old.with_suffix(ext).unlink(missing_ok=True)


def prune_accepted(models_dir: str | os.PathLike, keep: int, protect: Sequence[str] | set[str] = ()) -> list[Path]:
    """Delete all but the ``keep`` newest accepted models (``.onnx`` + card) in ``models_dir``; return the deleted.

    Paths in ``protect`` (the deployed model) are never deleted and do not count against ``keep``.
    """
    folder = Path(models_dir)
    protected = {str(Path(p)) for p in protect}
    models = sorted((p for p in folder.glob("*.onnx") if str(p) not in protected),
                    key=lambda p: p.stat().st_mtime_ns, reverse=True)
    deleted = []
    for old in models[max(0, int(keep)):]:
        for ext in (".onnx", ".json", ".md"):
            old.with_suffix(ext).unlink(missing_ok=True)
        deleted.append(old)
    return deleted


def _safe_label(label: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_+-]", "_", str(label)).strip("_") or "model"
    return cleaned[:80]
