"""CoDA in a new forest: each rover fine-tunes the shipped network on its own frames alone, or with cloud samples
drawn at random, with the coarse match of its descriptors, or with the coarse match filtered by its own classifier.

The new-forest set-up of :mod:`experiments.adaptation` (four simulated rovers record a ``clustered_regrowth`` forest
through capture_node; one dataset folder per rover, each with its own held-out segments). Each rover keeps few
frames (``own_frames``, spread over its training segments). Two cloud pools, each indexed with faiss over
descriptors from the shipped network's encoder (the rovers' descriptors go up, never images): ``wide``, the DC-CCL
experiment's domain-randomised forests (never a held-out style, so nothing from the rovers' forest), and
``wide+shared``, the same plus ``shared_frames`` frames each rover chose to share from its training segments (a rover
never gets its own back). Every arm adds the same number of cloud samples (CoDA with the gate: at most that many, only
those its classifier finds as own-like as the rover's frames); scores are each rover's model on its own held-out
segments (and on every rover's). Set-up and results: ``docs/collaborative.md`` ("CoDA").

    .venv/bin/python -m experiments.coda [--quick] [--seeds 0 1 2] [--out DIR]
"""

from __future__ import annotations

import dataclasses
import fcntl
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments import adaptation, cli, federated, report
from experiments.report import fmt, last_round_mean, markdown_table, mean_std
from forest_perception.collab import coda
from forest_perception.collab.flower.task import LocalData, TaskConfig, round_seed, train_local

NAME = "coda"
CLAIM = ("cloud samples chosen by the coarse match of the rover's descriptors and filtered by its own classifier "
         "help its fine-tuning more than random cloud samples or the coarse match alone, for a few KiB of "
         "descriptors up")
ARMS = coda.ARMS
POOLS = ("wide", "wide+shared")
CLOUD_ARMS = (*ARMS[1:], "coda-gate")
"""The arms that add cloud samples; ``coda-gate`` is CoDA keeping only the candidates whose ``p(own)`` reaches the
``gate`` quantile of the rover's own frames' (possibly none)."""
METHODS = ("local", *(f"{arm}@{pool}" for pool in POOLS for arm in CLOUD_ARMS))
"""The local arm, then every arm that adds cloud samples with each pool."""
LABELS = {"local": "local fine-tuning alone", "random": "local + random cloud samples",
          "coarse": "local + coarse matches", "coda": "CoDA: coarse + on-rover filter (top k)",
          "coda-gate": "CoDA with a gate: only candidates as own-like as its own frames"}


def label(method: str) -> str:
    """A method's row label: the arm's, and the pool."""
    arm, _, pool = method.partition("@")
    return LABELS[arm] + (f" (pool {pool})" if pool else "")


@dataclass(frozen=True)
class CodaConfig(adaptation.RecordingConfig):
    """The recording (the adaptation experiment's), each rover's kept frames, the pool, the retrieval, the training."""

    own_frames: int = 40  # frames a rover kept (spread over its training segments)
    shared_frames: int = 30  # frames each rover shares into the wide+shared pool (from its training segments)
    candidates: int = 20  # cloud samples each arm adds
    coarse_factor: int = 2  # CoDA looks at this many times more coarse candidates, keeps `candidates`
    outside: int = 256  # random pool descriptors the rover's classifier learns as outside data
    gate: float = 0.1  # coda-gate: a candidate needs the p(own) of this quantile of the rover's own frames
    per_query: int = 0  # nearest pool frames of each rover frame in the coarse match (0: as many as it returns)
    epochs: int = 6
    lr: float = 0.0003
    batch_size: int = 8
    cloud_forests: int = 50  # the pool: DC-CCL's 'wide' cloud forests (cached there)
    cloud_frames: int = 12

    @classmethod
    def quick(cls) -> CodaConfig:
        """A few-minute version: one seed, a shorter drive, fewer epochs, a smaller pool."""
        return cls(seeds=(0,), drive_s=24.0, segment_frames=8, own_frames=24, shared_frames=12, candidates=12,
                   outside=64, epochs=3, cloud_forests=8, cloud_frames=8)

    def adaptation(self) -> adaptation.AdaptationConfig:
        """The adaptation experiment's config with this recording (shares its recording cache)."""
        return adaptation.AdaptationConfig(**self.recording_fields(), rounds=self.epochs, lr=self.lr,
                                           batch_size=self.batch_size, engine="local")


# ---------------------------------------------------------------------------------------------- the cloud


def cloud_index(config: CodaConfig, out_dir: Path, encoder: coda.DescriptorEncoder) -> tuple[coda.PoolIndex, Path]:
    """The cloud pool (DC-CCL's ``wide`` forests, rendered once and cached) and its index (cached per encoder)."""
    from experiments import dcccl

    dc = dcccl.DcCclConfig(cloud_forests=config.cloud_forests, cloud_frames=config.cloud_frames)
    folder = Path(out_dir) / "dcccl_cache"
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("w") as lock:  # DC-CCL may be rendering the same forests
        fcntl.flock(lock, fcntl.LOCK_EX)
        pool = dcccl.cloud_data(dc, out_dir)
    path = Path(out_dir) / "coda_cache" / f"index_{pool.name}_{encoder.version}.npz"
    if path.is_file():
        return coda.PoolIndex.load(path), pool
    start = time.perf_counter()
    index = coda.build_pool_index([pool], encoder)
    index.save(path)
    print(f"[{NAME}] indexed {len(index)} pool frames ({index.dim}-d) in {time.perf_counter() - start:.1f} s "
          f"-> {path}", flush=True)
    return index, pool


# ---------------------------------------------------------------------------------------------- one seed


class SampleCache:
    """Pool samples as training tensors, loaded once per row (the arms and seeds share them)."""

    def __init__(self, task: TaskConfig, input_hw: tuple[int, int]) -> None:
        self.task, self.input_hw = task, input_hw
        self.samples: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        h, w = input_hw
        self.bytes_each = h * w * 3 + h * w * 2  # uint8 RGB + float16 depth, as sent

    def tensors(self, index: coda.PoolIndex, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and depth of ``index``'s ``rows`` (``0 x ...`` for none)."""
        new = [int(r) for r in rows if index.ids[int(r)] not in self.samples]
        if new:
            images, depth = index.samples(new)
            x, d = coda.samples_to_tensors(images, depth, self.task.min_depth)
            self.samples.update({index.ids[r]: (x[i], d[i]) for i, r in enumerate(new)})
        if len(rows) == 0:
            return torch.zeros(0, 3, *self.input_hw), torch.zeros(0, 1, *self.input_hw)
        picked = [self.samples[index.ids[int(r)]] for r in rows]
        return torch.stack([p[0] for p in picked]), torch.stack([p[1] for p in picked])


def arm_run(config: CodaConfig, task: TaskConfig, rover: str, data: LocalData, retrieval: coda.Retrieval,
            samples: SampleCache, held: dict, seed: int, shipped_row: dict, held_desc: np.ndarray,
            index: coda.PoolIndex, method: str) -> dict:
    """One rover fine-tunes the shipped network on its frames plus the arm's cloud samples; scored after."""
    images, depth = samples.tensors(index, retrieval.rows)
    train = LocalData(data.path, torch.cat([data.train_images, images]), torch.cat([data.train_depth, depth]),
                      data.val_images, data.val_depth)
    model = adaptation.shipped_model(config.adaptation(), task)
    start = time.perf_counter()
    for r in range(1, config.epochs + 1):
        train_local(model, train, task, seed=round_seed(seed, r, rover))
    row = {"round": float(config.epochs), "train_s": time.perf_counter() - start,
           **adaptation.score(model, held, task, alone=rover), **retrieval.summary(),
           "own_frames": float(data.num_train)}
    if len(retrieval.rows) and held_desc.shape[0]:
        # how like the rover's held-out frames the cloud samples are (cosine of descriptors, mean of the best match)
        sims = index.descriptors[retrieval.rows] @ coda.normalise(held_desc.astype(np.float32)).T
        row["similarity_to_held_out"] = float(sims.max(axis=0).mean())
        # how many come from the rovers' forest (frames other rovers shared)
        row["from_rovers"] = float(sum(index.ids[int(r)].startswith("rover_") for r in retrieval.rows))
    return {"method": method, "seed": seed, "rover": rover, "rounds": [shipped_row, row],
            "info": retrieval.info}


def shared_index(config: CodaConfig, folders: dict[str, Path], rovers: dict[str, LocalData | str],
                 wide: coda.PoolIndex, encoder: coda.DescriptorEncoder) -> tuple[coda.PoolIndex, dict[str, list[int]]]:
    """The wide pool plus ``shared_frames`` of each rover's training segments, and each rover's own rows in it."""
    names = [r for r in sorted(rovers) if isinstance(rovers[r], LocalData)]
    shared = coda.build_pool_index([folders[r] for r in names], encoder,
                                   segments=[rovers[r].train_segments for r in names], per_folder=config.shared_frames)
    joined = coda.PoolIndex.concat([wide, shared])
    own = {r: [i for i, s in enumerate(joined.sources) if joined.folders[s[0]] == str(Path(folders[r]).resolve())]
           for r in names}
    return joined, own


def run_seed(config: CodaConfig, folders: dict[str, Path], seed: int, index: coda.PoolIndex,
             encoder: coda.DescriptorEncoder, samples: SampleCache | None = None,
             shared: tuple[coda.PoolIndex, dict[str, list[int]]] | None = None) -> list[dict]:
    """Every arm for every rover on one seed, with each pool."""
    adapt = config.adaptation()
    task = TaskConfig.from_run_config(adaptation.run_config(adapt, seed, **{"max-train-frames": config.own_frames}))
    rovers = adaptation.load_rovers(folders, task)
    held = adaptation.held_out(rovers)
    if not held:
        raise ValueError(f"no rover has held-out frames: {rovers}")
    local_task = dataclasses.replace(task, threads=federated.local_threads())
    samples = samples or SampleCache(task, index.input_hw)
    joined, own_rows = shared or shared_index(config, folders, rovers, index, encoder)
    pools = {"wide": (index, {}), "wide+shared": (joined, own_rows)}
    shipped = adaptation.shipped_model(adapt, task)
    runs: list[dict] = []
    for number, (rover, data) in enumerate(sorted(rovers.items())):
        if not isinstance(data, LocalData):
            print(f"[{NAME}] {rover}: {data}", flush=True)
            continue
        own = encoder.describe(data.train_images)
        held_desc = encoder.describe(data.val_images)
        shipped_row = {"round": 0.0, **adaptation.score(shipped, held, task, alone=rover)}
        for method in METHODS:
            arm, _, pool = method.partition("@")
            pool_index, exclude = pools[pool or "wide"]
            gate = config.gate if arm == "coda-gate" else None
            retrieval = coda.retrieve(pool_index, own, "coda" if arm == "coda-gate" else arm, config.candidates,
                                      seed=seed * 1000 + number, gate=gate,
                                      coarse_factor=config.coarse_factor, outside=config.outside,
                                      per_query=config.per_query or None, sample_bytes_each=samples.bytes_each,
                                      exclude=exclude.get(rover, []))
            run = arm_run(config, local_task, rover, data, retrieval, samples, held, seed, shipped_row, held_desc,
                          pool_index, method)
            runs.append(run)
            last = run["rounds"][-1]
            print(f"[{NAME}] seed {seed} {rover} {method:18s}: own held-out AbsRel {last['own/absrel']:.4f} delta1 "
                  f"{last['own/delta1']:.3f} ({int(last['cloud_samples'])} cloud samples, "
                  f"{int(last.get('from_rovers', 0))} from rovers, {last['train_s']:.0f} s)",
                  flush=True)
    runs.append({"method": "rovers", "seed": seed, "rounds": [],
                 "status": {r: ("ok" if isinstance(d, LocalData) else d) for r, d in rovers.items()},
                 "train_frames": {r: d.num_train for r, d in rovers.items() if isinstance(d, LocalData)},
                 "held_out_frames": {r: d.num_val for r, d in rovers.items() if isinstance(d, LocalData)}})
    return runs


def run(config: CodaConfig, out_dir: Path) -> dict:
    """Record (or reuse) the swarm, index the pool, run every arm on every seed, write ``<out>/coda.{json,csv,png}``."""
    started = time.perf_counter()
    folders, recording = adaptation.record(config.adaptation(), out_dir)
    encoder = coda.DescriptorEncoder.from_init(config.model)
    index, pool = cloud_index(config, out_dir, encoder)
    runs: list[dict] = []
    task = TaskConfig.from_run_config(adaptation.run_config(config.adaptation(), 0,
                                                            **{"max-train-frames": config.own_frames}))
    samples = SampleCache(task, index.input_hw)
    shared = shared_index(config, folders, adaptation.load_rovers(folders, task), index, encoder)  # seed-independent
    for seed in config.seeds:
        print(f"[{NAME}] seed {seed} ...", flush=True)
        runs += run_seed(config, folders, seed, index, encoder, samples, shared)
    summary = summarise(config, runs)
    summary["pool"] = {"folder": pool.name, "frames": len(index), "shared_frames": len(shared[0]) - len(index),
                       "dim": index.dim, "encoder": encoder.version, "descriptor_bytes": index.dim * 2}
    result = report.experiment_result(NAME, CLAIM, config, runs, summary, started, recording=recording)
    write_outputs(result, config, out_dir)
    return result


# ---------------------------------------------------------------------------------------------- summary and outputs


def _per_seed(runs: list[dict], arm: str, key: str) -> dict[int, float]:
    """Per seed, the mean over rovers of ``key`` in the last row of ``arm``'s runs."""
    values: dict[int, list[float]] = {}
    for run in runs:
        if run["method"] == arm and run["rounds"]:
            values.setdefault(run["seed"], []).append(float(run["rounds"][-1].get(key, math.nan)))
    return {seed: statistics.fmean(v) for seed, v in values.items()}


def paired(runs: list[dict], a: str, b: str, key: str = "own/absrel") -> dict[str, float]:
    """Mean ± std over seeds of ``key(a) - key(b)`` (rovers averaged per seed; negative AbsRel: a is better)."""
    first, second = _per_seed(runs, a, key), _per_seed(runs, b, key)
    return mean_std(first[s] - second[s] for s in sorted(set(first) & set(second)))


def summarise(config: CodaConfig, runs: list[dict]) -> dict:
    """Per arm: scores, bytes, cloud samples, similarity; the classifier's costs; paired differences; the claim."""
    keys = ("own/absrel", "own/delta1", "absrel", "delta1", "bytes_up", "bytes_down", "cloud_samples",
            "similarity_to_held_out", "from_rovers", "train_s")
    summary: dict[str, Any] = {"methods": {m: {k: last_round_mean(runs, m, k) for k in keys} for m in METHODS}}
    shipped: dict[int, list[dict]] = {}
    for run in runs:
        if run["method"] == "local":
            shipped.setdefault(run["seed"], []).append(run["rounds"][0])
    summary["shipped"] = {k: mean_std(statistics.fmean(r[k] for r in rows) for rows in shipped.values())
                          for k in ("own/absrel", "own/delta1", "absrel", "delta1")}
    fits = [run["rounds"][-1] for run in runs
            if run["method"].startswith("coda") and "filter_fit_s" in run["rounds"][-1]]
    summary["filter"] = {k: mean_std(r[k] for r in fits)
                         for k in ("filter_fit_s", "filter_score_s", "filter_peak_bytes", "filter_accuracy",
                                   "candidates")}
    if fits:
        summary["filter"]["filter_fit_s_median"] = statistics.median(r["filter_fit_s"] for r in fits)
    pairs = [("random@wide", "local"), ("coda@wide", "local")]
    for pool in POOLS:
        pairs += [(f"coarse@{pool}", f"random@{pool}"), (f"coda@{pool}", f"coarse@{pool}"),
                  (f"coda@{pool}", f"random@{pool}")]
    pairs += [("coda@wide+shared", "local"), ("coda-gate@wide", "local"), ("coda-gate@wide+shared", "local"),
              ("coda-gate@wide", "coda@wide"), ("coda-gate@wide+shared", "coarse@wide+shared")]
    summary["paired"] = {f"{a} - {b}": paired(runs, a, b) for a, b in pairs}
    p = summary["paired"]
    summary["claims"] = {}
    for pool in POOLS:
        summary["claims"].update({
            f"pool {pool}: CoDA better than local fine-tuning alone": paired(runs, f"coda@{pool}", "local")["mean"] < 0,
            f"pool {pool}: CoDA better than random cloud samples": p[f"coda@{pool} - random@{pool}"]["mean"] < 0,
            f"pool {pool}: CoDA better than the coarse match alone": p[f"coda@{pool} - coarse@{pool}"]["mean"] < 0,
            f"pool {pool}: CoDA with the gate better than local alone":
                p[f"coda-gate@{pool} - local"]["mean"] < 0,
        })
    return summary


def _finite(stat: dict) -> bool:
    """Whether a mean ± std has a finite mean (NaN comes back from JSON as None)."""
    mean = (stat or {}).get("mean")
    return mean is not None and math.isfinite(mean)


def table(result: dict) -> str:
    """The results table (markdown): per arm scores and bytes, the classifier's costs, paired differences, claims."""
    config, s = result["config"], result["summary"]
    m = s["methods"]

    def kib(stat: dict) -> str:
        return "-" if not stat or not math.isfinite(stat.get("mean", math.nan)) else f"{stat['mean'] / 1024:.1f}"

    rows = [["shipped (no training)", fmt(s["shipped"]["own/absrel"]), fmt(s["shipped"]["own/delta1"]),
             fmt(s["shipped"]["absrel"]), "-", "-", "-", "-"]]
    for method in METHODS:
        a = m[method]
        rows.append([label(method), fmt(a["own/absrel"]), fmt(a["own/delta1"]), fmt(a["absrel"]),
                     f"{a['cloud_samples']['mean']:.1f}" + (f" ({a['from_rovers']['mean']:.1f})"
                                                           if "shared" in method else ""),
                     kib(a["bytes_up"]), kib(a["bytes_down"]),
                     fmt(a["similarity_to_held_out"]) if _finite(a["similarity_to_held_out"]) else "-"])
    out = [markdown_table(["arm (each rover's model)", "AbsRel, own held-out", "δ<1.25, own held-out",
                           "AbsRel, all rovers' held-out", "cloud samples (from other rovers)", "KiB up / rover",
                           "KiB down / rover", "similarity to own held-out"], rows), ""]
    f = s["filter"]
    if f and f["filter_fit_s"].get("n"):
        out.append(f"On-rover classifier (logistic regression on {s.get('pool', {}).get('dim', '?')}-d descriptors, "
                   f"{config.own_frames} own vs {config.outside} outside frames, this machine's CPU, 1 thread): fit "
                   f"{1000 * f['filter_fit_s']['mean']:.1f} ± {1000 * f['filter_fit_s']['std']:.1f} ms (median "
                   f"{1000 * f.get('filter_fit_s_median', math.nan):.1f} ms, {f['filter_fit_s']['n']} fits), scoring "
                   f"{int(f['candidates']['mean'])} candidates {1000 * f['filter_score_s']['mean']:.2f} ms, peak "
                   f"memory {f['filter_peak_bytes']['mean'] / 1024:.0f} KiB (tracemalloc), training accuracy "
                   f"{f['filter_accuracy']['mean']:.3f}.")
    out.append("Paired differences of own held-out AbsRel over seeds (rovers averaged; negative: the first is "
               "better): " + "; ".join(f"{k} {fmt(v, 4)}" for k, v in s["paired"].items()) + ".")
    out.append("Claims: " + "; ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in s["claims"].items()) + ".")
    if "coarse@wide+shared" in m and "local" in m:
        shared = {a: m[f"{a}@wide+shared"] for a in CLOUD_ARMS}
        local = m["local"]["own/absrel"]["mean"]
        worse = sum(m[f"{a}@wide"]["own/absrel"]["mean"] > local for a in CLOUD_ARMS)
        verdict = ("every cloud arm is worse than local fine-tuning" if worse == len(CLOUD_ARMS) else
                   f"{worse} of {len(CLOUD_ARMS)} cloud arms are worse than local fine-tuning")
        out += ["", (
            f"Reading: when the pool holds frames of the rovers' forest (wide+shared), the coarse match takes "
            f"{shared['coarse']['from_rovers']['mean']:.0f} of its {config.candidates} samples from them (a random "
            f"draw {shared['random']['from_rovers']['mean']:.1f}) and own held-out AbsRel goes from "
            f"{m['local']['own/absrel']['mean']:.3f} (local alone) to {shared['coarse']['own/absrel']['mean']:.3f}, "
            f"for {m['coarse@wide']['bytes_up']['mean'] / 1024:.0f} KiB of descriptors up and no image; the on-rover "
            f"filter then gives {shared['coda']['own/absrel']['mean']:.3f}. With the wide pool alone (no frame of the "
            f"rovers' forest) {verdict}: random "
            f"{m['random@wide']['own/absrel']['mean']:.3f}, coarse {m['coarse@wide']['own/absrel']['mean']:.3f}, "
            f"CoDA {m['coda@wide']['own/absrel']['mean']:.3f}, CoDA with the gate "
            f"{m['coda-gate@wide']['own/absrel']['mean']:.3f} ({m['coda-gate@wide']['cloud_samples']['mean']:.1f} "
            f"samples kept; {shared['coda-gate']['cloud_samples']['mean']:.1f} with wide+shared, scoring "
            f"{shared['coda-gate']['own/absrel']['mean']:.3f}). Discussion: docs/collaborative.md (CoDA).")]
    return "\n".join(out)


def write_outputs(result: dict, config: CodaConfig, out_dir: Path) -> None:
    """JSON (everything), CSV (one row per run), PNG (per arm: own held-out AbsRel and δ<1.25, KiB each way)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report.write_result(out_dir, result, table(result))
    s = result["summary"]["methods"]
    x = np.arange(len(METHODS))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for ax, key, label in ((axes[0], "own/absrel", "AbsRel, own held-out"),
                           (axes[1], "own/delta1", "δ<1.25, own held-out")):
        ax.bar(x, [s[a][key]["mean"] for a in METHODS], yerr=[s[a][key]["std"] for a in METHODS], capsize=4,
               color=["grey"] + ["tab:blue", "tab:orange", "tab:green", "tab:olive"] * len(POOLS),
               alpha=1.0)
        lo = min(s[a][key]["mean"] - 2 * max(s[a][key]["std"], 1e-3) for a in METHODS)
        hi = max(s[a][key]["mean"] + 2 * max(s[a][key]["std"], 1e-3) for a in METHODS)
        ax.set_ylim(lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))
        ax.set_title(label, fontsize=10)
    axes[2].bar(x - 0.2, [s[a]["bytes_up"]["mean"] / 1024 for a in METHODS], width=0.4, label="KiB up / rover")
    axes[2].bar(x + 0.2, [s[a]["bytes_down"]["mean"] / 1024 for a in METHODS], width=0.4, label="KiB down / rover")
    axes[2].set_yscale("symlog", linthresh=1.0)
    axes[2].legend(fontsize=8)
    axes[2].set_title("bytes per rover (once per run)", fontsize=10)
    for ax in axes:
        ax.set_xticks(x, [m.replace("@", "\n") for m in METHODS], fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"CoDA in a new forest ({config.style}), {config.rovers} rovers x {config.own_frames} own frames "
                 f"+ {config.candidates} cloud samples, {config.epochs} epochs, {len(config.seeds)} seed(s)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(Path(out_dir) / f"{NAME}.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Command line entry: ``--quick``, ``--seeds``, ``--out``."""
    cli.run_experiment(sys.modules[__name__], CodaConfig, argv)


if __name__ == "__main__":
    main()
