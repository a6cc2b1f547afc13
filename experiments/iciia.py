"""ICIIA in a new forest: attention over the rover's own history, accuracy and FLOPs overhead against the number of
partitions P, with and without the history.

The new-forest set-up of :mod:`experiments.adaptation` (four simulated rovers record a ``clustered_regrowth`` forest,
held out of all training, through capture_node; one dataset folder per rover, each with its own held-out segments).
The cloud trains the ICIIA module once per P and seed on its own ``wide`` domain-randomised forests (the DC-CCL
experiment's cloud forests, never a held-out style; each forest one sequence, so the bank is a real history) with the
shipped ``autoencoder_160x128`` frozen, then every rover runs it with no further training. Scored on every rover's
held-out frames fed one at a time in frame order, as ``depth_node`` and collab_node's gate run them: without history
(the bank empty: the module sees the current frame only), with the history of the held-out frames before each, and
with that history primed by the rover's other (training) segments, unlabelled. Set-up and results:
``docs/collaborative.md`` ("ICIIA").

    .venv/bin/python -m experiments.iciia [--quick] [--seeds 0 1 2] [--out DIR]
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments import adaptation, cli, report
from experiments.report import fmt, markdown_table, mean_std
from forest_perception.collab.flower.task import LocalData, TaskConfig

NAME = "iciia"
CLAIM = ("a history-attention module trained once on the cloud gives a large gain on every rover with no further "
         "training, for about 1.6 % extra FLOPs (paper); here: held-out AbsRel / delta1 in a new forest against P")
VARIANTS = ("no_history", "history", "history_primed")


@dataclass(frozen=True)
class IciiaConfig(adaptation.RecordingConfig):
    """The recording (as the adaptation experiment's), the cloud's forests, the module's sizes and its training."""

    cloud_forests: int = 50  # the DC-CCL experiment's 'wide' cloud forests (one sequence each), shared cache
    cloud_frames: int = 12
    partitions: tuple[int, ...] = (1, 4, 16, 64)
    control_partitions: tuple[int, ...] = (16,)  # also trained with every bank empty: the module without history
    heads: int = 4
    bank: int = 16
    epochs: int = 4
    lr: float = 1e-3
    batch_size: int = 8
    sequence_jitter: float = 0.0  # per-sequence photometric shift in the cloud's training (models.iciia.TrainSettings)
    flops_models: tuple[str, ...] = ("autoencoder_160x128", "multiscale_160x128")
    latency_runs: int = 30

    @classmethod
    def quick(cls) -> IciiaConfig:
        """A few-minute version: one seed, a shorter drive, two P, a smaller cloud set."""
        return cls(seeds=(0,), drive_s=24.0, segment_frames=8, cloud_forests=8, cloud_frames=8, partitions=(4, 64),
                   control_partitions=(64,), epochs=2, latency_runs=10)

    def adaptation(self) -> adaptation.AdaptationConfig:
        """The adaptation experiment's config with this recording (shares its recording cache)."""
        return adaptation.AdaptationConfig(**self.recording_fields(), engine="local")


def cloud_forests(config: IciiaConfig, out_dir: Path) -> Path:
    """The DC-CCL experiment's cloud forests (rendered once, cached under ``dcccl_cache``; its lock is shared)."""
    import fcntl

    from experiments import dcccl

    folder = Path(out_dir) / "dcccl_cache"
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return dcccl.cloud_data(dcccl.DcCclConfig(cloud_forests=config.cloud_forests,
                                                  cloud_frames=config.cloud_frames), out_dir)


# ---------------------------------------------------------------------------------------------- scoring


def score_predictions(preds: dict[str, torch.Tensor], held: dict[str, tuple[torch.Tensor, torch.Tensor]],
                      task: TaskConfig) -> dict[str, float]:
    """AbsRel / delta1 per rover and pooled (frame-weighted), as :func:`experiments.adaptation.score` pools them."""
    from forest_perception.models.metrics import MetricAccumulator

    row: dict[str, float] = {}
    parts = []
    for rover, (_images, depth) in held.items():
        accumulator = MetricAccumulator(task.min_depth, task.max_depth)
        accumulator.update(preds[rover], depth)
        metrics = accumulator.result()
        row[f"{rover}/absrel"], row[f"{rover}/delta1"] = metrics["absrel"], metrics["delta1"]
        parts.append((int(depth.shape[0]), metrics))
    total = sum(n for n, _ in parts)
    for key in ("absrel", "delta1"):
        row[key] = sum(n * m[key] for n, m in parts) / total if total else math.nan
    return row


def evaluate_module(model: Any, rovers: dict[str, LocalData], held: dict, task: TaskConfig,  # noqa: ANN401
                    bank: int) -> dict[str, dict[str, float]]:
    """Each variant's scores, frames fed one at a time in order (``models.iciia.predict_sequence``)."""
    from forest_perception.models.iciia import predict_sequence, sequence_features

    out = {}
    primes = {r: sequence_features(model, [d.train_images[-bank:]])[0] for r, d in rovers.items()}
    for variant in VARIANTS:
        preds = {r: predict_sequence(model, images, history=variant != "no_history", capacity=bank,
                                     prime=primes[r] if variant == "history_primed" else None)
                 for r, (images, _) in held.items()}
        out[variant] = score_predictions(preds, held, task)
    return out


def flops_table(config: IciiaConfig) -> list[dict[str, Any]]:
    """FLOPs of the base network and of ICIIA (full bank of ``config.bank``) for every P and base network."""
    from forest_perception.models.iciia import load_base
    from forest_perception.models.networks.iciia import HistoryDepth, iciia_flops

    rows = []
    for name in config.flops_models:
        base, meta = load_base(name)
        for partitions in sorted({*config.partitions, *config.control_partitions}):
            model = HistoryDepth(base, partitions, config.heads)
            flops = iciia_flops(model, meta["input_hw"], config.bank)
            rows.append({"base": name, "partitions": partitions, "feature_dim": model.feature_dim,
                         "base_flops": flops["base"], "iciia_flops": flops["iciia"],
                         "overhead": flops["iciia"] / flops["base"],
                         "iciia_params": sum(p.numel() for p in model.iciia.parameters())})
    return rows


def latencies(config: IciiaConfig, modules: dict[int, Any], spec_base: dict, work: Path,  # noqa: ANN401
              ) -> dict[str, dict[str, float]]:
    """ONNX Runtime latency (2 threads, the engine depth_node runs, bank full) of the shipped network and of the
    ICIIA rover model for each P, measured in turns so that load on the shared cores hits them alike."""
    from forest_perception.inference import load_engine
    from forest_perception.models.iciia import IciiaSpec, export_rover_model
    from forest_perception.models.styles import resolve_model_file

    engines = {"shipped": load_engine(resolve_model_file(config.model), threads=2)}
    for partitions, model in modules.items():
        spec = IciiaSpec(base=config.model, partitions=partitions, heads=config.heads, bank_capacity=config.bank)
        path = export_rover_model(model, spec, spec_base, work / f"iciia_p{partitions}.onnx", exporter="torchscript",
                                  command="experiments.iciia")
        engines[f"iciia P={partitions}"] = load_engine(path, threads=2)
    frames = [np.random.default_rng(i).integers(0, 256, (240, 320, 3), dtype=np.uint8) for i in range(4)]
    times: dict[str, list[float]] = {label: [] for label in engines}
    for index in range(3 + config.latency_runs):
        for label, engine in engines.items():
            engine.predict(frames[index % len(frames)])
            if index >= 3:
                times[label].append(engine.last_latency_ms)
    return {label: {"median_ms": float(np.median(t)), "p95_ms": float(np.percentile(t, 95))}
            for label, t in times.items()}


# ---------------------------------------------------------------------------------------------- run


def run(config: IciiaConfig, out_dir: Path) -> dict:
    """Record (or reuse) the swarm and the cloud forests, train the module per P and seed, score, write outputs."""
    from forest_perception.collab.iciia import load_sequences
    from forest_perception.models import iciia
    from forest_perception.models.iciia import predict_sequence

    started = time.perf_counter()
    threads = int(os.environ.get("EXPERIMENT_THREADS", "1") or 1)
    torch.set_num_threads(threads)
    folders, recording = adaptation.record(config.adaptation(), out_dir)
    cloud = cloud_forests(config, out_dir)
    adapt = config.adaptation()
    task = TaskConfig.from_run_config(adaptation.run_config(adapt, config.seeds[0]))
    loaded = adaptation.load_rovers(folders, task)
    rovers = {r: d for r, d in loaded.items() if isinstance(d, LocalData)}
    held = adaptation.held_out(rovers)
    if not held:
        raise ValueError(f"no rover has held-out frames: {loaded}")
    _probe, base_meta = iciia.build(iciia.IciiaSpec(base=config.model))
    sequences = load_sequences([cloud], base_meta["input_hw"], float(base_meta["min_depth"]),
                               float(base_meta["max_depth"]), max_frames=100_000)
    print(f"[{NAME}] cloud: {sum(len(s[0]) for s in sequences)} frames in {len(sequences)} sequences; rovers: "
          f"{', '.join(f'{r} {d.num_val} held-out' for r, d in rovers.items())}", flush=True)
    runs: list[dict] = [{"method": "shipped", "seed": s, "partitions": 0, "rounds": [
        {"round": 0.0, **adaptation.score(_probe.base, held, task)}]} for s in config.seeds]
    flops = {row["partitions"]: row for row in flops_table(config) if row["base"] == config.model}
    first_seed_modules: dict[int, Any] = {}
    for seed in config.seeds:
        for partitions in config.partitions:
            spec = iciia.IciiaSpec(base=config.model, partitions=partitions, heads=config.heads,
                                   bank_capacity=config.bank)
            model, _ = iciia.build(spec, seed=seed)
            settings = iciia.TrainSettings(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                                           seed=seed, threads=threads, sequence_jitter=config.sequence_jitter)
            summary = iciia.train(model, sequences, config.bank, settings, task.min_depth, task.max_depth)
            scores = evaluate_module(model, rovers, held, task, config.bank)
            print(f"[{NAME}] seed {seed} P={partitions}: loss {summary['loss_by_epoch'][0]:.4f} -> "
                  f"{summary['loss_by_epoch'][-1]:.4f} in {summary['train_s']:.0f} s; AbsRel "
                  + ", ".join(f"{v} {scores[v]['absrel']:.4f}" for v in VARIANTS), flush=True)
            for variant in VARIANTS:
                runs.append({"method": variant, "seed": seed, "partitions": partitions,
                             "train_s": summary["train_s"], "loss_by_epoch": summary["loss_by_epoch"],
                             "flops_overhead": flops[partitions]["overhead"],
                             "rounds": [{"round": 0.0, **scores[variant]}]})
            if seed == config.seeds[0]:
                first_seed_modules[partitions] = model
        for partitions in config.control_partitions:
            spec = iciia.IciiaSpec(base=config.model, partitions=partitions, heads=config.heads,
                                   bank_capacity=config.bank)
            model, _ = iciia.build(spec, seed=seed)
            settings = iciia.TrainSettings(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                                           seed=seed, threads=threads, use_history=False,
                                           sequence_jitter=config.sequence_jitter)
            summary = iciia.train(model, sequences, config.bank, settings, task.min_depth, task.max_depth)
            preds = {r: predict_sequence(model, images, history=False) for r, (images, _) in held.items()}
            scores = score_predictions(preds, held, task)
            print(f"[{NAME}] seed {seed} P={partitions} trained without history: AbsRel {scores['absrel']:.4f}",
                  flush=True)
            runs.append({"method": "trained_without_history", "seed": seed, "partitions": partitions,
                         "train_s": summary["train_s"], "loss_by_epoch": summary["loss_by_epoch"],
                         "flops_overhead": flops[partitions]["overhead"], "rounds": [{"round": 0.0, **scores}]})
    with tempfile.TemporaryDirectory(prefix="exp-iciia-") as tmp:
        lat = latencies(config, first_seed_modules, base_meta, Path(tmp))
    summary = summarise(config, runs)
    summary.update(flops=flops_table(config), latency_ms=lat,
                   rovers={r: {"train_frames": d.num_train, "held_out_frames": d.num_val} for r, d in rovers.items()},
                   cloud={"frames": sum(len(s[0]) for s in sequences), "sequences": len(sequences)})
    result = report.experiment_result(NAME, CLAIM, config, runs, summary, started, recording=recording)
    write_outputs(result, config, out_dir)
    return result


# ---------------------------------------------------------------------------------------------- summary and outputs


def _scores(runs: list[dict], method: str, partitions: int, key: str) -> dict[int, float]:
    return {r["seed"]: float(r["rounds"][-1][key]) for r in runs
            if r["method"] == method and r["partitions"] == partitions and r["rounds"]}


def summarise(config: IciiaConfig, runs: list[dict]) -> dict:
    """Per P and variant: AbsRel / delta1 mean ± std over seeds, paired differences against the shipped network and
    between history and no history."""
    shipped = {k: mean_std(_scores(runs, "shipped", 0, k).values()) for k in ("absrel", "delta1")}
    table: dict[str, Any] = {}
    paired: dict[str, Any] = {}
    for partitions in config.partitions:
        for variant in VARIANTS:
            table[f"{variant} P={partitions}"] = {k: mean_std(_scores(runs, variant, partitions, k).values())
                                                  for k in ("absrel", "delta1")}
        base = _scores(runs, "shipped", 0, "absrel")
        none = _scores(runs, "no_history", partitions, "absrel")
        for variant in ("history", "history_primed"):
            mine = _scores(runs, variant, partitions, "absrel")
            seeds = sorted(set(mine) & set(none))
            paired[f"{variant} - no_history, P={partitions}"] = mean_std(mine[s] - none[s] for s in seeds)
            paired[f"{variant} - shipped, P={partitions}"] = mean_std(mine[s] - base[s] for s in seeds if s in base)
        paired[f"no_history - shipped, P={partitions}"] = mean_std(none[s] - base[s] for s in none if s in base)
    for partitions in config.control_partitions:
        control = _scores(runs, "trained_without_history", partitions, "absrel")
        table[f"trained_without_history P={partitions}"] = {
            k: mean_std(_scores(runs, "trained_without_history", partitions, k).values()) for k in ("absrel", "delta1")}
        mine = _scores(runs, "history", partitions, "absrel")
        paired[f"history - trained_without_history, P={partitions}"] = mean_std(
            mine[s] - control[s] for s in sorted(set(mine) & set(control)))
    best = min(config.partitions, key=lambda p: table[f"history P={p}"]["absrel"]["mean"])
    gain = (shipped["absrel"]["mean"] - table[f"history P={best}"]["absrel"]["mean"]) / shipped["absrel"]["mean"]
    return {"shipped": shipped, "variants": table, "paired": paired, "best_partitions": best,
            "best_relative_gain_absrel": gain,
            "train_s": mean_std(r["train_s"] for r in runs if r["method"] == "history")}


def table(result: dict) -> str:
    """The results table (markdown): accuracy and FLOPs overhead against P, with and without history; latency."""
    config, s = result["config"], result["summary"]
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k)
    flops = {(r["base"], r["partitions"]): r for r in s["flops"]}
    model = get("model")
    lat = s.get("latency_ms", {})
    shipped_ms = lat.get("shipped", {}).get("median_ms", math.nan)
    rows = [["shipped network, no ICIIA", "-", fmt(s["shipped"]["absrel"]), fmt(s["shipped"]["delta1"]), "-", "-",
             "-", "-", f"{shipped_ms:.2f}"]]
    for partitions in get("partitions"):
        f = flops[(model, partitions)]
        v = s["variants"]
        ms = lat.get(f"iciia P={partitions}", {}).get("median_ms", math.nan)
        rows.append([f"ICIIA P={partitions}", f"{100 * f['overhead']:.2f} %",
                     fmt(v[f"no_history P={partitions}"]["absrel"]), fmt(v[f"no_history P={partitions}"]["delta1"]),
                     fmt(v[f"history P={partitions}"]["absrel"]), fmt(v[f"history P={partitions}"]["delta1"]),
                     fmt(v[f"history_primed P={partitions}"]["absrel"]),
                     fmt(v[f"history_primed P={partitions}"]["delta1"]),
                     f"{ms:.2f} ({ms / shipped_ms:.2f}x)" if math.isfinite(ms) and shipped_ms else "-"])
    for partitions in get("control_partitions"):
        c = s["variants"][f"trained_without_history P={partitions}"]
        rows.append([f"ICIIA P={partitions} trained without history (control)",
                     f"{100 * flops[(model, partitions)]['overhead']:.2f} %", fmt(c["absrel"]), fmt(c["delta1"]),
                     "-", "-", "-", "-", "-"])
    out = [markdown_table(["model (all rovers' held-out, in frame order)", "extra FLOPs",
                           "AbsRel no history", "δ<1.25 no history", "AbsRel history", "δ<1.25 history",
                           "AbsRel history primed", "δ<1.25 history primed", "latency ms (ORT, 2 threads)"], rows), ""]
    bases = sorted({r["base"] for r in s["flops"]})
    out.append("FLOPs overhead of the module (bank of " + str(get("bank")) + " frames) against P: " + "; ".join(
        f"{b} ({flops[(b, get('partitions')[0])]['base_flops'] / 1e6:.0f} MFLOPs): " + ", ".join(
            f"P={p} +{100 * flops[(b, p)]['overhead']:.2f} %" for p in get("partitions")) for b in bases) + ".")
    p = s["paired"]
    out.append("Paired differences of AbsRel over seeds (negative: the first is better): "
               + "; ".join(f"{k} {fmt(v)}" for k, v in p.items()) + ".")
    out.append(f"Best P by AbsRel with history: {s['best_partitions']}, "
               f"{100 * s['best_relative_gain_absrel']:.1f} % lower AbsRel than the shipped network "
               f"(the paper's claim: a large gain for about 1.6 % extra FLOPs).")
    near = min(get("partitions"), key=lambda q: abs(flops[(model, q)]["overhead"] - 0.016))
    v, ship = s["variants"][f"history P={near}"], s["shipped"]
    rel = (v["absrel"]["mean"] - ship["absrel"]["mean"]) / ship["absrel"]["mean"]
    hist = p.get(f"history - no_history, P={near}", {}).get("mean", math.nan)
    large = rel < -0.2 and v["delta1"]["mean"] >= ship["delta1"]["mean"]
    out.append(f"Verdict at the P nearest 1.6 % extra FLOPs (P={near}, +{100 * flops[(model, near)]['overhead']:.2f} "
               f"%): AbsRel {100 * rel:+.1f} % against the shipped network, δ<1.25 {ship['delta1']['mean']:.3f} -> "
               f"{v['delta1']['mean']:.3f}, the history itself {hist:+.3f} AbsRel against no history: "
               f"{'a large gain' if large else 'not the large gain the paper reports'}.")
    return "\n".join(out)


def write_outputs(result: dict, config: IciiaConfig, out_dir: Path) -> None:
    """JSON (everything), CSV (one row per run), PNG (AbsRel and FLOPs overhead against P, per variant)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report.write_result(out_dir, result, table(result))
    s = result["summary"]
    parts = list(config.partitions)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for variant in VARIANTS:
        means = [s["variants"][f"{variant} P={p}"]["absrel"]["mean"] for p in parts]
        stds = [s["variants"][f"{variant} P={p}"]["absrel"]["std"] for p in parts]
        ax1.errorbar(parts, means, yerr=np.nan_to_num(stds), marker="o", capsize=3, label=variant.replace("_", " "))
    ax1.axhline(s["shipped"]["absrel"]["mean"], color="grey", linestyle=":", label="shipped, no ICIIA")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("partitions P")
    ax1.set_ylabel("AbsRel, all rovers' held-out")
    ax1.legend(fontsize=8)
    for base in sorted({r["base"] for r in s["flops"]}):
        rows = [r for r in s["flops"] if r["base"] == base]
        ax2.plot([r["partitions"] for r in rows], [100 * r["overhead"] for r in rows], marker="o", label=base)
    ax2.axhline(1.6, color="grey", linestyle=":", label="paper: 1.6 %")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("partitions P")
    ax2.set_ylabel(f"extra FLOPs, % of the base (bank {config.bank})")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.suptitle(f"ICIIA in a new forest ({config.style}), {config.rovers} rovers, {len(config.seeds)} seed(s)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(Path(out_dir) / f"{NAME}.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Command line entry: ``--quick``, ``--seeds``, ``--out``."""
    cli.run_experiment(sys.modules[__name__], IciiaConfig, argv)


if __name__ == "__main__":
    main()

__all__ = ["IciiaConfig", "evaluate_module", "flops_table", "run", "score_predictions", "summarise", "table"]
