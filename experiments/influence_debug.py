"""Fed-Influence finds a faulty rover: its influence ranks it most harmful, and leaving it out helps.

The four rovers of the adaptation recording (``clustered_regrowth``, a style kept out of training) run FedAvg from
the shipped network with run config ``influence = true``; one rover's recording is spoiled the way a real rover's
can be: a depth camera whose scale is off by 30 %, a smeared lens, or colour and depth misaligned by a few pixels.
Each rover's estimated effect on the honest rovers' held-out loss (``grad L . Delta_k``, scale-sensitive log loss)
ranks the rovers; the same run with the faulty rover quarantined (leave-one-rover-out retraining, the ground truth
of its influence) shows what leaving it out changes. Results: ``docs/experiments.md``, "Fed-Influence".

    .venv/bin/python -m experiments.influence_debug [--quick] [--seeds 0 1 2] [--out DIR]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from experiments import adaptation, cli, report
from experiments.report import fmt, markdown_table, mean_std

NAME = "influence_debug"
CLAIM = ("Fed-Influence ranks a faulty rover as the most harmful, and excluding it improves held-out accuracy "
         "(paper: client-level model debugging)")
FAULTS = ("depth-scale", "smeared-lens", "misaligned")


@dataclass(frozen=True)
class InfluenceConfig:
    """The recording is the adaptation experiment's; the runs are short FedAvg runs of the shipped network."""

    seeds: tuple[int, ...] = (0, 1, 2)
    faults: tuple[str, ...] = FAULTS
    faulty: str = "rover_3"
    model: str = "autoencoder_160x128"
    rounds: int = 5
    local_steps: int = 6
    batch_size: int = 8
    lr: float = 0.0003
    scale: float = 1.3  # depth-scale: depth reads 30 % too far
    blur_sigma_px: float = 2.5  # smeared-lens: Gaussian blur of the colour image
    shift_px: int = 4  # misaligned: colour shifted right against depth
    recording: str = "full"  # the adaptation experiment's recording: "full" or "quick" (its --quick drive)

    @classmethod
    def quick(cls) -> InfluenceConfig:
        """One seed, one fault, three rounds, on the adaptation experiment's quick recording."""
        return cls(seeds=(0,), faults=("depth-scale",), rounds=3, recording="quick")


def spoil(rgb: np.ndarray, depth: np.ndarray, fault: str, config: InfluenceConfig) -> tuple[np.ndarray, np.ndarray]:
    """One frame as the faulty rover records it."""
    import cv2

    if fault == "depth-scale":
        return rgb, depth * np.float32(config.scale)
    if fault == "smeared-lens":
        return cv2.GaussianBlur(rgb, (0, 0), config.blur_sigma_px), depth
    if fault == "misaligned":
        shifted = np.empty_like(rgb)
        shifted[:, config.shift_px:] = rgb[:, : -config.shift_px]
        shifted[:, : config.shift_px] = rgb[:, :1]
        return shifted, depth
    raise ValueError(f"unknown fault {fault!r}; choose one of {', '.join(FAULTS)}")


def write_faulty_copy(source: Path, target: Path, fault: str, config: InfluenceConfig) -> Path:
    """A copy of a rover's dataset folder with every frame spoiled by ``fault`` (the source is only read)."""
    from forest_perception.dataset_tools.layout import SegmentWriter, iter_segments, load_frame

    for segment in iter_segments(source):
        extras = list(dict.fromkeys(k for record in segment.frames for k in (record.extras or {})))
        with SegmentWriter(target, segment.run or 1, segment.name, extra_columns=extras) as writer:
            for i in range(len(segment)):
                rgb, depth, record = load_frame(segment, i)
                rgb, depth = spoil(rgb, depth, fault, config)
                writer.write_frame(rgb, depth, record)
    return target


def run_config(config: InfluenceConfig, seed: int, state_db: Path, **extra: Any) -> dict:  # noqa: ANN401
    """The FedAvg run config (from the shipped weights, every rover every round)."""
    from forest_perception.collab.flower.task import merge_run_config

    return merge_run_config({
        "num-server-rounds": config.rounds, "algorithm": "fedavg", "seed": seed, "init": config.model,
        "lr": config.lr, "local-steps": config.local_steps, "batch-size": config.batch_size,
        "holdout-fraction": 0.25, "evaluate-every": 0, "state-db": str(state_db), "max-norm": 0.0,
    }, extra)


def run_fault(config: InfluenceConfig, folders: dict[str, Path], fault: str, seed: int, work: Path) -> dict:
    """One fault, one seed: the influence run, its ranking, and the run without the faulty rover."""
    import torch

    from experiments.federated import run_federated
    from forest_perception.collab.flower.client_app import make_client_app
    from forest_perception.collab.flower.influence_report import loss_gradient
    from forest_perception.collab.flower.population import recorded_population
    from forest_perception.collab.flower.store import CoordinatorStore
    from forest_perception.collab.flower.task import TaskConfig, build_model, merge_run_config, set_arrays

    rovers = dict(folders)
    rovers[config.faulty] = write_faulty_copy(folders[config.faulty], work / f"{config.faulty}_{fault}", fault, config)
    population = recorded_population([str(rovers[r]) for r in sorted(rovers)], seed=seed)
    names = [r.rover_id for r in population.rovers]
    faulty_id = names[sorted(rovers).index(config.faulty)]
    base = {"population": str(population.save(work / "population.json"))}
    task = TaskConfig.from_run_config(run_config(config, seed, work / "x.db"))
    # the honest rovers' held-out segments (what a coordinator could score on: a clean test set of this forest)
    honest = {r: f for r, f in folders.items() if r != config.faulty}
    held = adaptation.held_out(adaptation.load_rovers(honest, task))
    images = torch.cat([i for i, _ in held.values()])
    depth = torch.cat([d for _, d in held.values()])

    runs = {}
    for label, extra in (("all", {"influence": True}), ("without", {"quarantine": faulty_id})):
        settings = merge_run_config(run_config(config, seed, work / f"{label}.db", **extra), base)
        start = time.perf_counter()
        run_federated(settings, make_client_app(settings), len(names))
        runs[label] = {"wall_s": time.perf_counter() - start}
        with CoordinatorStore(work / f"{label}.db", readonly=True) as store:
            _, tensor_names, params, state = store.latest()
        model = build_model(task)
        set_arrays(model, tensor_names, params)
        runs[label].update(adaptation.score(model, held, task))
        runs[label]["params"], runs[label]["state"] = params, state
    grad = loss_gradient(tensor_names, runs["all"]["params"], task, images, depth)
    influence = runs["all"]["state"]["influence"]["influence"]
    estimated = {r: float(sum(np.sum(g * np.asarray(d, dtype=np.float64)) for g, d in zip(grad, influence[r])))
                 for r in sorted(influence)}
    ranking = sorted(estimated, key=estimated.get)

    def scale_sensitive_loss(params: list) -> float:
        from forest_perception.collab.flower.task import depth_loss

        model = build_model(task)
        set_arrays(model, tensor_names, params)
        model.eval()
        with torch.no_grad():
            return float(depth_loss(task, 0.0)(model(images), depth, images)[0])

    true_change = scale_sensitive_loss(runs["without"]["params"]) - scale_sensitive_loss(runs["all"]["params"])
    return {
        "fault": fault, "seed": seed, "faulty": faulty_id, "ranking": ranking,
        "faulty_rank": ranking.index(faulty_id) + 1, "estimated": estimated,
        "true_change_faulty": true_change,
        "absrel_all": runs["all"]["absrel"], "delta1_all": runs["all"]["delta1"],
        "absrel_without": runs["without"]["absrel"], "delta1_without": runs["without"]["delta1"],
        "wall_s_influence": runs["all"]["wall_s"], "wall_s_plain": runs["without"]["wall_s"],
        "complete": bool(runs["all"]["state"]["influence"].get("complete", True)),
    }


def run(config: InfluenceConfig, out_dir: Path, folders: dict[str, Path] | None = None) -> dict:
    """Reuse (or make) the adaptation recording, run every fault on every seed, write the outputs."""
    started = time.perf_counter()
    if folders is None:
        drive = adaptation.AdaptationConfig.quick() if config.recording == "quick" else adaptation.AdaptationConfig()
        folders, _ = adaptation.record(drive, out_dir)
    rows = []
    with tempfile.TemporaryDirectory(prefix="exp-influence-") as tmp:
        for fault in config.faults:
            for seed in config.seeds:
                work = Path(tmp) / f"{fault}_{seed}"
                shutil.rmtree(work, ignore_errors=True)
                work.mkdir(parents=True)
                print(f"[{NAME}] {fault}, seed {seed} ...", flush=True)
                rows.append(run_fault(config, folders, fault, seed, work))
                r = rows[-1]
                print(f"[{NAME}]   ranking {r['ranking']} (faulty {r['faulty']} at {r['faulty_rank']}); absrel "
                      f"{r['absrel_all']:.4f} with it, {r['absrel_without']:.4f} without", flush=True)
    summary = summarise(config, rows)
    result = report.experiment_result(NAME, CLAIM, config, [{"method": "fault", **r, "rounds": []} for r in rows],
                                      summary, started)
    write_outputs(result, out_dir)
    return result


def summarise(config: InfluenceConfig, rows: list[dict]) -> dict:
    """Per fault: how often the faulty rover ranks first, absrel with and without it, the paired difference."""
    out: dict[str, Any] = {}
    for fault in config.faults:
        mine = [r for r in rows if r["fault"] == fault]
        if not mine:
            continue
        diff = [r["absrel_without"] - r["absrel_all"] for r in mine]
        out[fault] = {
            "ranked_first": sum(r["faulty_rank"] == 1 for r in mine), "runs": len(mine),
            "absrel_all": mean_std([r["absrel_all"] for r in mine]),
            "absrel_without": mean_std([r["absrel_without"] for r in mine]),
            "absrel_without_minus_all": mean_std(diff),
            "estimated_faulty": mean_std([r["estimated"][r["faulty"]] for r in mine]),
            "true_change_faulty": mean_std([r["true_change_faulty"] for r in mine]),
            "overhead": mean_std([r["wall_s_influence"] / r["wall_s_plain"] for r in mine]),
        }
    return out


def table(result: dict) -> str:
    """The markdown table of the README and docs."""
    rows = []
    for fault, s in result["summary"].items():
        rows.append([fault, f"{s['ranked_first']} of {s['runs']}", fmt(s["estimated_faulty"]),
                     fmt(s["true_change_faulty"]), fmt(s["absrel_all"]), fmt(s["absrel_without"]),
                     fmt(s["absrel_without_minus_all"]), fmt(s["overhead"], 1)])
    return markdown_table(["fault of rover_3", "ranked most harmful", "estimated loss change without it",
                           "true loss change without it", "AbsRel with it", "AbsRel without it",
                           "paired difference", "run time with influence (x)"], rows)


def plot(result: dict, path: Path) -> Path:
    """One panel per fault: each rover's estimated change of the held-out loss without it (mean ± std over seeds),
    the faulty rover's retrained (true) change beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    faults = list(result["summary"])
    fig, axes = plt.subplots(1, len(faults), figsize=(4.4 * len(faults), 3.4), squeeze=False)
    for ax, fault in zip(axes[0], faults):
        runs = [r for r in result["runs"] if r["fault"] == fault]
        faulty = runs[0]["faulty"]
        names = [faulty] + sorted(k for k in runs[0]["estimated"] if k != faulty)
        values = [[r["estimated"][n] for r in runs] for n in names]
        labels = [f"{n.split('_' + fault)[0]} (faulty)" if n == faulty else n for n in names]
        ax.bar(range(len(names)), [np.mean(v) for v in values], yerr=[np.std(v) for v in values],
               color=["tab:red"] + ["tab:blue"] * (len(names) - 1), label="estimated (Fed-Influence)")
        ax.scatter([0], [np.mean([r["true_change_faulty"] for r in runs])], color="black", zorder=3,
                   label="retrained without it")
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(names)), labels, fontsize=8)
        ax.set_title(fault)
        ax.set_ylabel("held-out loss change without the rover")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(result: dict, out_dir: Path) -> None:
    """``<out>/influence_debug.json`` (everything, with the table), ``.csv`` (one row per run) and ``.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [{**r, "rounds": r.get("rounds", [])} for r in result["runs"]]
    result = {**result, "runs": runs}
    report.write_json(out_dir / f"{NAME}.json", {**result, "table": table(result)})
    report.write_csv(out_dir / f"{NAME}.csv", [{k: v for k, v in r.items() if k not in ("rounds", "estimated")}
                                               for r in runs])
    plot(result, out_dir / f"{NAME}.png")


def main(argv: list[str] | None = None) -> None:
    """``python -m experiments.influence_debug``."""
    cli.run_experiment(sys.modules[__name__], InfluenceConfig, argv)


if __name__ == "__main__":
    main()
