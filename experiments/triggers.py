"""Stream triggers at the source: bytes kept vs held-out accuracy after FedAvg, against all frames and uniform
subsampling.

The adaptation experiment's recording (:mod:`experiments.adaptation`: four rovers drive a ``clustered_regrowth``
forest over ROS 2 and record through capture_node; extract + curate give one dataset folder per rover) is replayed
through :class:`forest_perception.triggers.FrameTrigger` frame by frame in time order (offline: the same decisions
``trigger_node`` takes live, with the predicted depth of the shipped ONNX network the rovers adapt, as depth_node
would publish it). Each rover's held-out segments (``rover_split``) stay whole for every variant; the training
segments keep all frames, the trigger's frames, or a uniform subsample with the same number of frames per rover.
Every variant runs the same FedAvg (in process: each rover fine-tunes the global model one local epoch a round with
the ClientApp's ``train_local``, frame-weighted average) from the shipped weights. Set-up and results:
``docs/experiments.md``, "Stream triggers".

    .venv/bin/python -m experiments.triggers [--quick] [--seeds 0 1 2] [--out DIR]
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments import adaptation, cli, federated, report
from experiments.report import fmt, markdown_table, mean_std

NAME = "triggers"
CLAIM = ("triggers over the live streams (sharpness, novelty, predicted vs measured depth, GPS spacing) keep a "
         "fraction of a drive and lose less held-out accuracy after federated training than uniform subsampling "
         "to the same number of frames")


@dataclass(frozen=True)
class TriggersConfig(adaptation.AdaptationConfig):
    """The adaptation experiment's recording and training (its fields), the trigger operating points and budgets."""

    points: tuple[tuple[str, float, float, float, float], ...] = (
        ("default", 0.4, 0.4, 5.0, 2.0), ("content", 0.5, 0.4, 5.0, 0.0), ("strict", 0.5, 0.5, 10.0, 2.0))
    """trigger operating points: (name, novelty_distance, disagreement_absrel, spacing_m, max_keep_rate_hz); the
    rest as trigger_node's defaults. ``content`` keeps about as many frames as ``default`` with no rate cap."""
    budgets: tuple[str, ...] = ("epochs",)
    """``epochs``: the same rounds x local epochs (fewer frames, fewer steps); ``steps``: as many optimiser steps
    per round as all frames take"""
    scaffold_local_epochs: int = 0
    """no SCAFFOLD run here (the triggers are compared with FedAvg only)"""

    @classmethod
    def quick(cls) -> TriggersConfig:
        """A few-minute version: the quick adaptation recording, one seed, 3 rounds, one point, one budget."""
        return cls(seeds=(0,), drive_s=24.0, segment_frames=8, rounds=3, points=(("default", 0.4, 0.4, 5.0, 2.0),),
                   budgets=("epochs",))

    def adaptation_config(self) -> adaptation.AdaptationConfig:
        """The adaptation experiment's configuration with this recording and training (shares its cache)."""
        return adaptation.AdaptationConfig(**{f.name: getattr(self, f.name)
                                              for f in dataclasses.fields(adaptation.AdaptationConfig)})


# ---------------------------------------------------------------------------------------------- the triggers offline


@dataclass
class RoverFrames:
    """One rover's recorded frames in time order: where they are, their scores, and the training rows."""

    rover: str
    keys: list[tuple[str, int]]  # (segment id, frame index) in time order
    stamps_ns: list[int]
    png_bytes: list[int]
    scores: list[Any]  # forest_perception.triggers.FrameScores
    train_rows: dict[tuple[str, int], int]  # (segment id, frame index) -> row of LocalData.train_*


def score_rover(folder: Path, engine: Any, train_segments: list[str]) -> RoverFrames:  # noqa: ANN401
    """Score every frame of a rover folder (colour, measured depth PNG, the engine's predicted depth, GPS)."""
    from forest_perception.dataset_tools.layout import iter_segments, load_frame
    from forest_perception.triggers import TriggerConfig, TriggerFrame, score_frame

    frames = []
    counts = {}
    for segment in iter_segments(folder):
        counts[segment.segment_id] = len(segment)
        for j in range(len(segment)):
            rgb, depth, record = load_frame(segment, j)
            stamp_ns = int(float(record.extras.get("stamp_ns") or round((record.timestamp or 0.0) * 1e9)))
            png = segment.rgb_path(j).stat().st_size + segment.depth_path(j).stat().st_size
            frame = TriggerFrame(stamp_ns * 1e-9, rgb, depth, engine.predict(rgb), record.gps)
            frames.append((stamp_ns, (segment.segment_id, j), png, score_frame(frame, TriggerConfig())))
    frames.sort(key=lambda f: f[0])
    rows = {}
    for sid in train_segments:
        for j in range(counts.get(sid, 0)):
            rows[(sid, j)] = len(rows)
    return RoverFrames(folder.name, [f[1] for f in frames], [f[0] for f in frames], [f[2] for f in frames],
                       [f[3] for f in frames], rows)


def trigger_kept(frames: RoverFrames, point: tuple) -> tuple[list[int], dict[str, int]]:
    """Indices (time order) of the frames the trigger keeps at an operating point, and its counters."""
    from forest_perception.triggers import FrameTrigger, TriggerConfig

    _, novelty, disagreement, spacing, *rate = point
    trigger = FrameTrigger(TriggerConfig(novelty_distance=novelty, disagreement_absrel=disagreement,
                                         spacing_m=spacing, **({"max_keep_rate_hz": rate[0]} if rate else {})))
    kept = [i for i, s in enumerate(frames.scores) if trigger.decide_scores(s).keep]
    return kept, trigger.stats.as_dict()


def bag_bytes(bag: Path, marks_ns: list[int] | None) -> tuple[int, int]:
    """(bytes, messages) of a rover's bag: every message (``marks_ns`` None), or those capture_node's marked mode
    writes for marks at ``marks_ns`` with its default windows (the same :mod:`forest_perception.recorder.gate`)."""
    from forest_perception.dataset_tools.bags import read_bag
    from forest_perception.recorder.gate import GateConfig, covered_bytes
    from forest_perception.topics import CAMERA_DEPTH, CAMERA_IMAGE, CAMERA_INFO

    messages = ((m.topic, bytes(m.message)) for m in read_bag(bag, raw=True))
    if marks_ns is None:
        total = count = 0
        for _, data in messages:
            total, count = total + len(data), count + 1
        return total, count
    frame_topics = frozenset(f"/{bag.name}/{t}" for t in (CAMERA_IMAGE, CAMERA_INFO, CAMERA_DEPTH))
    return covered_bytes(messages, marks_ns, GateConfig(frame_topics=frame_topics))


# ---------------------------------------------------------------------------------------------- training


def subset(data: Any, rows: list[int]) -> Any:  # noqa: ANN401 - LocalData
    """The rover's LocalData with only ``rows`` of its training frames (held-out frames unchanged)."""
    index = torch.as_tensor(sorted(rows), dtype=torch.long)
    return dataclasses.replace(data, train_images=data.train_images[index], train_depth=data.train_depth[index])


def fedavg(task: Any, rovers: dict[str, Any], held: dict, config: TriggersConfig, seed: int,  # noqa: ANN401
           steps: dict[str, int] | None = None) -> dict[str, float]:
    """FedAvg from the shipped weights, in process: each round every rover trains the global model with
    ``train_local`` (one local epoch, or ``steps[rover]`` optimiser steps) and the server takes the frame-weighted
    average. Held-out scores of the last global model, and the wall time."""
    from forest_perception.collab.flower.network import read_init
    from forest_perception.collab.flower.task import build_model, get_arrays, round_seed, set_arrays, train_local

    init = read_init(config.model)
    model = build_model(task)
    set_arrays(model, init.names, init.arrays)
    names, arrays = get_arrays(model)
    arrays = [np.array(a, copy=True) for a in arrays]
    start = time.perf_counter()
    for server_round in range(1, config.rounds + 1):
        total, summed = 0, [np.zeros(a.shape, np.float64) for a in arrays]
        for rover, data in rovers.items():
            set_arrays(model, names, arrays)
            local = task
            if steps is not None:
                epochs = math.ceil(steps[rover] * task.batch_size / max(data.num_train, 1)) + 1
                local = dataclasses.replace(task, local_epochs=epochs, local_steps=steps[rover])
            train_local(model, data, local, seed=round_seed(seed, server_round, rover))
            _, trained = get_arrays(model)
            total += data.num_train
            for acc, a in zip(summed, trained):
                acc += data.num_train * np.asarray(a, np.float64)
        arrays = [(acc / total).astype(a.dtype) for acc, a in zip(summed, arrays)]
    set_arrays(model, names, arrays)
    model.eval()
    return {**adaptation.score(model, held, task), "train_s": time.perf_counter() - start}


# ---------------------------------------------------------------------------------------------- the run


def prepare(config: TriggersConfig, folders: dict[str, Path], task: Any) -> dict:  # noqa: ANN401
    """Score every rover's frames, run the trigger at each point, and pick each variant's training rows."""
    from forest_perception.collab.flower.task import LocalData, load_local_data
    from forest_perception.collab.rover.holdout import spread_indices
    from forest_perception.inference import load_engine
    from forest_perception.models.weights import shipped_model

    engine = load_engine(shipped_model(config.model), threads=federated.local_threads())
    rovers, frames, variants, counters, stored = {}, {}, {"all": {}}, {}, {}
    for rover, folder in folders.items():
        data = load_local_data(folder, task)
        if not isinstance(data, LocalData) or data.val_is_train:
            raise ValueError(f"{rover}: {folder} has no held-out segments")
        rovers[rover] = data
        frames[rover] = f = score_rover(Path(folder), engine, data.train_segments)
        if len(f.train_rows) != data.num_train:
            raise ValueError(f"{rover}: {len(f.train_rows)} training frames on disk, {data.num_train} loaded")
        train = [i for i, key in enumerate(f.keys) if key in f.train_rows]
        variants["all"][rover] = train
        stored.setdefault("all", {})[rover] = list(range(len(f.keys)))
        for point in config.points:
            kept, stats = trigger_kept(f, point)
            kept_train = [i for i in kept if f.keys[i] in f.train_rows]
            variants.setdefault(f"trigger:{point[0]}", {})[rover] = kept_train
            variants.setdefault(f"uniform:{point[0]}", {})[rover] = [train[k] for k in
                                                                     spread_indices(len(train), len(kept_train))]
            stored.setdefault(f"trigger:{point[0]}", {})[rover] = kept
            stored.setdefault(f"uniform:{point[0]}", {})[rover] = list(spread_indices(len(f.keys), len(kept)))
            for key, value in stats.items():
                counters.setdefault(point[0], {}).setdefault(key, 0)
                counters[point[0]][key] += value
    return {"rovers": rovers, "frames": frames, "variants": variants, "stored": stored, "counters": counters}


def measure_bytes(prepared: dict, bags: Path | None) -> dict[str, dict[str, float]]:
    """Per variant: frames and PNG bytes of its training frames, frames of the whole drive kept, and the bag bytes
    a marked recording of those frames writes (all: the full bag's messages)."""
    out: dict[str, dict[str, float]] = {}
    frames = prepared["frames"]
    for variant, per_rover in prepared["variants"].items():
        stored = prepared["stored"][variant]
        row = {"train_frames": sum(len(v) for v in per_rover.values()),
               "train_png_mb": sum(frames[r].png_bytes[i] for r, v in per_rover.items() for i in v) / 1e6,
               "drive_frames": sum(len(v) for v in stored.values()),
               "drive_png_mb": sum(frames[r].png_bytes[i] for r, v in stored.items() for i in v) / 1e6}
        if bags is not None and all((bags / r).is_dir() for r in stored):
            total = 0
            for rover, kept in stored.items():
                marks = None if variant == "all" else [frames[rover].stamps_ns[i] for i in kept]
                total += bag_bytes(bags / rover, marks)[0]
            row["bag_mb"] = total / 1e6
        out[variant] = row
    return out


def run(config: TriggersConfig, out_dir: Path, folders: dict[str, Path] | None = None,
        bags: Path | None = None) -> dict:
    """Record (or reuse) the adaptation swarm, run the triggers, train every variant on every seed, write
    ``<out>/triggers.{json,csv,png}``."""
    from forest_perception.collab.flower.task import TaskConfig

    started = time.perf_counter()
    recording: dict = {}
    if folders is None:
        folders, recording = adaptation.record(config.adaptation_config(), out_dir)
        bags = Path(next(iter(folders.values()))).parent.parent / "bags"
    federated.quiet_logs()
    task = TaskConfig.from_run_config(adaptation.run_config(config.adaptation_config(), config.seeds[0]))
    task = dataclasses.replace(task, threads=federated.local_threads())
    t0 = time.perf_counter()
    prepared = prepare(config, folders, task)
    triggers_s = time.perf_counter() - t0
    sizes = measure_bytes(prepared, bags)
    data, frames = prepared["rovers"], prepared["frames"]
    held = adaptation.held_out(data)
    all_steps = {r: math.ceil(d.num_train / task.batch_size) for r, d in data.items()}
    runs: list[dict] = [{"method": "shipped", "seed": s, "rounds": [
        {"round": 0.0, **adaptation.score(adaptation.shipped_model(config.adaptation_config(), task), held, task)}]}
        for s in config.seeds[:1]]
    for seed in config.seeds:
        for variant, per_rover in prepared["variants"].items():
            rovers = {r: adaptation_subset(data[r], frames[r], rows) for r, rows in per_rover.items()}
            for budget in config.budgets:
                if variant == "all" and budget != config.budgets[0]:
                    continue  # all frames: both budgets are the same run
                steps = all_steps if budget == "steps" else None
                print(f"[{NAME}] seed {seed} {variant} ({budget}) ...", flush=True)
                scores = fedavg(task, rovers, held, config, seed, steps)
                runs.append({"method": variant, "budget": "any" if variant == "all" else budget, "seed": seed,
                             "rounds": [{"round": float(config.rounds), **scores}]})
    summary = summarise(config, runs, sizes, prepared["counters"], triggers_s,
                        sum(len(f.keys) for f in frames.values()))
    result = report.experiment_result(NAME, CLAIM, config, runs, summary, started, recording=recording)
    write_outputs(result, out_dir)
    return result


def adaptation_subset(data: Any, frames: RoverFrames, indices: list[int]) -> Any:  # noqa: ANN401
    """``subset`` of a rover's training tensors for frames given by time-order index."""
    return subset(data, [frames.train_rows[frames.keys[i]] for i in indices])


def summarise(config: TriggersConfig, runs: list[dict], sizes: dict, counters: dict, triggers_s: float,
              frames: int) -> dict:
    """Per variant and budget: sizes, AbsRel / delta1 over seeds; trigger minus uniform paired per seed."""
    def last(run: dict, key: str) -> float:
        return float(run["rounds"][-1][key])

    summary: dict[str, Any] = {"variants": {}, "paired": {}, "counters": counters,
                               "trigger_ms_per_frame": 1e3 * triggers_s / max(frames, 1)}
    shipped = [r for r in runs if r["method"] == "shipped"]
    if shipped:
        summary["shipped"] = {k: last(shipped[0], k) for k in ("absrel", "delta1")}
    for run in runs:
        if run["method"] == "shipped":
            continue
        key = f"{run['method']}|{run['budget']}"
        entry = summary["variants"].setdefault(key, {"variant": run["method"], "budget": run["budget"],
                                                     **sizes.get(run["method"], {}), "runs": []})
        entry["runs"].append({k: last(run, k) for k in ("absrel", "delta1", "train_s")})
    for entry in summary["variants"].values():
        for k in ("absrel", "delta1", "train_s"):
            entry[k] = mean_std(r[k] for r in entry["runs"])
        del entry["runs"]
    for point in config.points:
        for budget in config.budgets:
            trig = {r["seed"]: last(r, "absrel") for r in runs if r["method"] == f"trigger:{point[0]}"
                    and r["budget"] == budget}
            uni = {r["seed"]: last(r, "absrel") for r in runs if r["method"] == f"uniform:{point[0]}"
                   and r["budget"] == budget}
            diffs = [trig[s] - uni[s] for s in trig if s in uni]
            if diffs:
                summary["paired"][f"{point[0]}|{budget}"] = {
                    **mean_std(diffs), "trigger_better": sum(d < 0 for d in diffs), "seeds": len(diffs)}
    return summary


def table(result: dict) -> str:
    """The results table (markdown) and the paired differences."""
    s, config = result["summary"], result["config"]
    points = {p[0]: p for p in config.points}
    rows = []
    if "shipped" in s:
        rows.append(["shipped (no training)", "-", "-", "-", "-", "-", f"{s['shipped']['absrel']:.3f}",
                     f"{s['shipped']['delta1']:.3f}", "-"])
    for entry in s["variants"].values():
        name = entry["variant"]
        if ":" in name:
            kind, point = name.split(":")
            p = points.get(point)
            name = f"{kind} ({point}" + (f": novelty {p[1]}, AbsRel {p[2]}, {p[3]:g} m, cap "
                                         f"{f'{p[4]:g} Hz' if len(p) > 4 and p[4] else 'none'}"
                                         if p and kind == "trigger" else "") + ")"
        rows.append([name, entry["budget"], str(int(entry.get("drive_frames", 0))),
                     f"{entry['bag_mb']:.1f}" if "bag_mb" in entry else "-",
                     str(int(entry.get("train_frames", 0))), f"{entry.get('train_png_mb', math.nan):.1f}",
                     fmt(entry["absrel"]), fmt(entry["delta1"]), fmt(entry["train_s"], 0)])
    out = [markdown_table(["frames kept", "budget", "drive frames", "bag MB (drive)", "training frames",
                           "training PNG MB", f"AbsRel (round {config.rounds})",
                           "δ<1.25", "train s"], rows), ""]
    if s.get("paired"):
        out.append("Trigger minus uniform (same frames per rover), AbsRel paired by seed: " + "; ".join(
            f"{k.replace('|', ', ')} {v['mean']:+.4f} ± {v['std']:.4f} (trigger better in {v['trigger_better']} "
            f"of {v['seeds']})" for k, v in s["paired"].items()) + ".")
    for point, counts in s.get("counters", {}).items():
        out.append(f"Trigger ({point}) over the whole drive: " + ", ".join(f"{k} {v}" for k, v in counts.items()
                                                                          if v) + ".")
    out.append(f"Trigger cost offline: {s.get('trigger_ms_per_frame', math.nan):.1f} ms a frame (scores and the "
               "network's prediction, 320x240).")
    return "\n".join(out)


def write_outputs(result: dict, out_dir: Path) -> None:
    """JSON, CSV and a PNG of held-out AbsRel against the training PNG bytes of each variant."""
    report.write_result(out_dir, result, table(result))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colours = {"all": "black", "trigger": "tab:red", "uniform": "tab:blue"}
    markers = {"any": "s", "epochs": "v", "steps": "o"}
    for entry in result["summary"]["variants"].values():
        kind = entry["variant"].split(":")[0]
        shift = {"trigger": 0.5, "uniform": -0.5}.get(kind, 0.0)  # side by side at the same bytes
        ax.errorbar(entry.get("train_png_mb", math.nan) + shift, entry["absrel"]["mean"], yerr=entry["absrel"]["std"],
                    color=colours.get(kind, "grey"), marker=markers.get(entry["budget"], "x"), linestyle="none",
                    capsize=3, label=f"{entry['variant']} ({entry['budget']})")
    shipped = result["summary"].get("shipped", {}).get("absrel")
    ax.set_title(f"shipped network: AbsRel {shipped:.3f}" if shipped is not None else "", fontsize=9)
    ax.set_xlabel("training frames kept, PNG MB (4 rovers)")
    ax.set_ylabel("held-out AbsRel after FedAvg")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(Path(out_dir) / f"{NAME}.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Command line entry: ``--quick``, ``--seeds``, ``--out``, ``--budgets``."""
    parser = cli.experiment_arguments(__doc__.split("\n")[0])
    parser.add_argument("--budgets", nargs="+", choices=("epochs", "steps"), default=None,
                        help="training budget of the subsets: the same epochs (default) and/or the same steps as all")
    args = parser.parse_args(argv)
    config = cli.pick_config(TriggersConfig, args.quick, args.seeds)
    if args.budgets:
        config = dataclasses.replace(config, budgets=tuple(args.budgets))
    result = run(config, args.out)
    print(table(result))
    print(f"\n{NAME}: {result['elapsed_s']:.0f} s; results in {args.out}")


if __name__ == "__main__":
    main()

