"""Run every experiment and write ``experiments/results/``: per-experiment JSON/CSV/PNG, costs, and README.md.

    .venv/bin/python -m experiments.run_all            # the full version (about 2 hours on 2 cores, 2 jobs at a time)
    .venv/bin/python -m experiments.run_all --quick    # a few minutes: one seed, fewer rovers and rounds
    .venv/bin/python -m experiments.run_all --only semicyclic --seeds 0 --out /tmp/results

Besides each experiment's files, it writes ``costs.csv`` / ``costs.png`` (wall time per round
and KiB down/up per rover per round of every federated run, in process on a LocalGrid) and
``README.md`` (every results table, the plots, the configurations and seeds).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from experiments import (
    adaptation,
    coda,
    dcccl,
    fed_vs_local_vs_central,
    fedlaavg_vs_fedavg,
    fedsubavg_sparse,
    iciia,
    influence_debug,
    semicyclic,
    triggers,
)
from experiments.cli import RESULTS_DIR, experiment_arguments, pick_config
from experiments.report import cost_summary, markdown_table, mean_std, write_csv, write_json

EXPERIMENTS: dict[str, tuple[ModuleType, type]] = {
    "fedlaavg_vs_fedavg": (fedlaavg_vs_fedavg, fedlaavg_vs_fedavg.LaAvgConfig),
    "fedsubavg_sparse": (fedsubavg_sparse, fedsubavg_sparse.SubAvgConfig),
    "semicyclic": (semicyclic, semicyclic.SemiCyclicConfig),
    "fed_vs_local_vs_central": (fed_vs_local_vs_central, fed_vs_local_vs_central.FedLocalCentralConfig),
    "adaptation": (adaptation, adaptation.AdaptationConfig),
    "dcccl": (dcccl, dcccl.DcCclConfig),
    "influence_debug": (influence_debug, influence_debug.InfluenceConfig),
    "triggers": (triggers, triggers.TriggersConfig),
    "iciia": (iciia, iciia.IciiaConfig),
    "coda": (coda, coda.CodaConfig),
}
"""Experiment name -> (module with ``run``/``table``, config class with a ``quick()`` preset)."""

SHORT = {"fedlaavg_vs_fedavg": "1 laavg", "fedsubavg_sparse": "2 subavg", "semicyclic": "3 cyclic",
         "fed_vs_local_vs_central": "4 fed/local/central", "adaptation": "5 new forest",
         "dcccl": "6 dc-ccl", "influence_debug": "7 fed-influence", "triggers": "8 triggers",
         "iciia": "9 iciia", "coda": "10 coda"}
TITLES = {
    "fedlaavg_vs_fedavg": "FedLaAvg vs FedAvg under intermittent availability",
    "fedsubavg_sparse": "FedSubAvg vs FedAvg on a sparse (per-place) embedding",
    "semicyclic": "MM-PSGD / MC-PSGD vs FedAvg on block-cyclic light",
    "fed_vs_local_vs_central": "Federated vs local-only vs central",
    "adaptation": "Adaptation to a new forest from the shipped weights (recorded over ROS, FedAvg on Flower/Ray)",
    "dcccl": "DC-CCL in the new forest: rover model (mimic + small) and cloud model (large + small)",
    "influence_debug": "Fed-Influence finds a faulty rover (client-level model debugging)",
    "triggers": "Stream triggers at the source: bytes kept vs accuracy after FedAvg, against all frames and uniform "
                "subsampling",
    "iciia": "ICIIA in the new forest: attention over each rover's own history, accuracy and FLOPs against P",
    "coda": "CoDA in the new forest: cloud samples like the rover's (coarse match + on-rover filter) against random "
            "and coarse, with few kept frames",
}


def run_label(run: Mapping[str, Any]) -> str:
    """How a run is named in the cost table: its variant or setting, else its algorithm."""
    return str(run.get("variant") or run.get("setting") or run.get("algorithm") or run.get("method"))


def cost_rows(results: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per experiment and run label: mean ± std over seeds of each federated run's per-round costs."""
    rows = []
    for name, result in results.items():
        labels: dict[str, list[dict]] = {}
        for run in result["runs"]:
            if run.get("reused_from"):  # another experiment's run (counted there)
                continue
            if any("wall_s" in r for r in run["rounds"]):  # federated runs only (local/central have no rounds)
                labels.setdefault(run_label(run), []).append(cost_summary(run["rounds"]))
        for label, costs in labels.items():
            row: dict[str, Any] = {"experiment": name, "run": label, "seeds": len(costs)}
            for key in ("rovers_per_round", "round1_s", "wall_s_per_round", "rover_train_s", "kib_down_per_rover",
                        "kib_up_per_rover"):
                stat = mean_std(c[key] for c in costs)
                row[key], row[f"{key}_std"] = stat["mean"], stat["std"]
            rows.append(row)
    return rows


def plot_costs(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Two bar panels per run: steady wall s per round (and per rover trained), KiB down/up per rover per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [f"{SHORT.get(r['experiment'], r['experiment'])}: {r['run']}" for r in rows]
    y = np.arange(len(rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 0.42 * len(rows) + 1.6), sharey=True)
    wall = [r["wall_s_per_round"] for r in rows]
    per_rover = [r["wall_s_per_round"] / r["rovers_per_round"] if r["rovers_per_round"] else math.nan for r in rows]
    ax1.barh(y - 0.2, wall, height=0.4, xerr=[r["wall_s_per_round_std"] for r in rows], label="s per round")
    ax1.barh(y + 0.2, per_rover, height=0.4, label="s per round / rovers in it")
    ax1.set_xlabel("seconds (in-process LocalGrid, rovers one after the other)")
    ax1.set_yticks(y, labels, fontsize=8)
    ax1.invert_yaxis()
    ax1.legend(fontsize=8)
    ax2.barh(y - 0.2, [r["kib_down_per_rover"] for r in rows], height=0.4, label="KiB down / rover / round")
    ax2.barh(y + 0.2, [r["kib_up_per_rover"] for r in rows], height=0.4, label="KiB up / rover / round")
    ax2.set_xlabel("KiB of tensors per rover per round")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cost_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The costs as a markdown table."""

    def pm(row: Mapping[str, Any], key: str, digits: int) -> str:
        value, spread = row[key], row[f"{key}_std"]
        return "-" if not math.isfinite(value) else f"{value:.{digits}f} ± {spread:.{digits}f}"

    return markdown_table(
        ["experiment", "run", "rovers/round", "round 1 s", "steady s/round", "rover training s", "KiB down/rover/round",
         "KiB up/rover/round"],
        [[r["experiment"], r["run"], pm(r, "rovers_per_round", 1), pm(r, "round1_s", 2), pm(r, "wall_s_per_round", 2),
          pm(r, "rover_train_s", 3), pm(r, "kib_down_per_rover", 1), pm(r, "kib_up_per_rover", 1)] for r in rows])


def _config_line(config: Any) -> str:  # noqa: ANN401 - one of the experiments' config dataclasses
    import dataclasses

    return ", ".join(f"{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(config))


def write_report(out_dir: Path, results: Mapping[str, Mapping[str, Any]], meta: Mapping[str, Any]) -> Path:
    """``costs.csv``, ``costs.png``, ``run_all.json`` and ``README.md`` from the experiments' results."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    costs = cost_rows(results)
    write_csv(out_dir / "costs.csv", costs)
    if costs:
        plot_costs(out_dir / "costs.png", costs)
    write_json(out_dir / "run_all.json", {
        **meta, "experiments": {name: {"claim": r["claim"], "config": r["config"], "summary": r["summary"],
                                       "elapsed_s": r["elapsed_s"]} for name, r in results.items()},
        "costs": costs,
    })
    lines = [
        "# Experiment results",
        "",
        f"Written by `python -m experiments.run_all{' --quick' if meta.get('quick') else ''}` on {meta['date']} "
        f"in {meta['elapsed_s'] / 60:.1f} min, {meta.get('jobs', 1)} job(s) side by side ({meta['machine']}). "
        "Discussion: "
        "[docs/experiments.md](../../docs/experiments.md). Every number is mean ± sample standard deviation over "
        "the seeds listed; every federated run is the real coordinator (strategy, screening, SQLite store) and "
        "rover ClientApps on an in-process `LocalGrid`.",
        "",
    ]
    for i, (name, result) in enumerate(results.items(), start=1):
        module, _ = EXPERIMENTS[name]
        lines += [
            f"## {i}. {TITLES.get(name, name)}",
            "",
            f"Claim: {result['claim']}.",
            "",
            f"Configuration: `{_config_line(result['config'])}` ({result['elapsed_s']:.0f} s).",
            "",
            module.table(result),
            "",
            f"![{name}]({name}.png)",
            "",
            f"Files: [{name}.json]({name}.json) (configuration, every run's rounds, summary), "
            f"[{name}.csv]({name}.csv) (one row per run and round).",
            "",
        ]
    if costs:
        lines += [
            "## Costs per round",
            "",
            "Wall time of a coordinator round with the rovers training one after the other in this process "
            "(round 1 also asks every node who it is), and tensor bytes per rover per round (model down to each "
            "selected rover, update up from each that replied). For the same figures through Ray, see "
            "`bench/bench_federated.py` and the Figures section of [docs/federated.md](../../docs/federated.md).",
            "",
            cost_table(costs),
            "",
            "![costs](costs.png)",
            "",
        ]
    path = out_dir / "README.md"
    path.write_text("\n".join(lines))
    return path


def config_from_json(config_class: type, data: Mapping[str, Any]) -> Any:  # noqa: ANN401 - a config dataclass
    """A config dataclass back from its JSON form (lists become tuples again)."""
    import dataclasses

    def tuples(value: Any) -> Any:  # noqa: ANN401
        return tuple(tuples(v) for v in value) if isinstance(value, list) else value

    names = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{config_class.__name__}: unknown field(s) {unknown} in the saved configuration")
    return config_class(**{k: tuples(v) for k, v in data.items()})


def rewrite_report(out_dir: Path = RESULTS_DIR) -> Path:
    """Write ``README.md`` and the costs again from the experiments' JSON files in ``out_dir`` (no rerun)."""
    out_dir = Path(out_dir)
    results = {}
    for name, (_, config_class) in EXPERIMENTS.items():
        path = out_dir / f"{name}.json"
        if path.is_file():
            result = json.loads(path.read_text())
            result["config"] = config_from_json(config_class, result["config"])
            results[name] = result
    if not results:
        raise FileNotFoundError(f"no experiment results (<name>.json) in {out_dir}")
    previous = out_dir / "run_all.json"
    meta = json.loads(previous.read_text()) if previous.is_file() else {}
    meta = {k: meta.get(k, default) for k, default in
            (("date", "unknown"), ("quick", False), ("jobs", 1), ("elapsed_s", math.nan), ("machine", "unknown"))}
    return write_report(out_dir, results, meta)


CHAINS: tuple[tuple[str, ...], ...] = (("adaptation", "dcccl"),)
"""Experiments that run one after the other in one job: DC-CCL reuses the adaptation experiment's recording and its
shipped / alone / FedAvg runs."""

EXPECTED_MIN = {"adaptation": 105, "dcccl": 15, "semicyclic": 20, "influence_debug": 16, "fedlaavg_vs_fedavg": 15,
                "fed_vs_local_vs_central": 10, "fedsubavg_sparse": 6, "triggers": 18,
                "iciia": 12, "coda": 12}
"""Rough minutes of each full configuration on one core, only to start the longest jobs first."""


PREPARE = {"dcccl": "dcccl:cloud"}
"""Steps that need no other experiment (DC-CCL's cloud forests and mimic) and run as a job of their own while the
chain they shorten waits for its recording; the experiment itself then finds them cached."""


def plan_jobs(names: Sequence[str], jobs: int = 1) -> list[tuple[str, ...]]:
    """The jobs for ``names``: each chain of :data:`CHAINS` (its members in ``names``) as one, the others alone;
    longest expected first. With ``jobs`` > 1, each :data:`PREPARE` step of a chained experiment comes right after
    the longest job, so it runs beside it."""
    planned, taken = [], set()
    for chain in CHAINS:
        members = tuple(n for n in chain if n in names)
        if members:
            planned.append(members)
            taken.update(members)
    planned += [(n,) for n in names if n not in taken]
    planned.sort(key=lambda job: -sum(EXPECTED_MIN.get(n, 10) for n in job))
    if jobs > 1:
        steps = [(PREPARE[n],) for job in planned if len(job) > 1 for n in job if n in PREPARE]
        planned[1:1] = steps
    return planned


def run_job(names: Sequence[str], configs: Mapping[str, Any], out_dir: Path, threads: int | None = None,
            ) -> dict[str, dict[str, Any]]:
    """Run the experiments of one job in order (with ``threads`` torch threads); their results by name."""
    if threads:
        torch.set_num_threads(threads)
        os.environ["EXPERIMENT_THREADS"] = str(threads)
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        if name in PREPARE.values():
            experiment = next(n for n, step in PREPARE.items() if step == name)
            print(f"[run_all] {name} (cached for {experiment}) ...", flush=True)
            EXPERIMENTS[experiment][0].prepare_cloud(configs[experiment], out_dir)
            continue
        module, _ = EXPERIMENTS[name]
        print(f"[run_all] {name} ...", flush=True)
        if name == "dcccl" and "adaptation" in results:
            results[name] = module.run(configs[name], out_dir, adaptation_result=results["adaptation"])
        else:
            results[name] = module.run(configs[name], out_dir)
        print(f"[run_all] {name}: {results[name]['elapsed_s']:.0f} s", flush=True)
    return results


def default_jobs() -> int:
    """Two jobs side by side where there are at least two cores (the experiments' small networks barely use a
    second thread, so two single-threaded jobs nearly halve the wall time); else one."""
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def run_all(
    out_dir: Path = RESULTS_DIR,
    quick: bool = False,
    seeds: Sequence[int] | None = None,
    only: Sequence[str] | None = None,
    configs: Mapping[str, Any] | None = None,
    jobs: int = 1,
) -> dict[str, Any]:
    """Run the experiments (all, or ``only``) and write the report; ``configs`` replaces a name's configuration.

    ``jobs`` > 1 runs that many jobs (:func:`plan_jobs`) side by side in worker processes, each with
    ``cpu_count // jobs`` torch threads; the results and the report are the same as one after the other.
    """
    unknown = [n for n in (only or []) if n not in EXPERIMENTS]
    if unknown:
        raise ValueError(f"unknown experiment(s) {unknown}; known: {', '.join(EXPERIMENTS)}")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    started = time.perf_counter()
    names = [n for n in EXPERIMENTS if not only or n in only]
    chosen = {n: (configs or {}).get(n) or pick_config(EXPERIMENTS[n][1], quick, seeds) for n in names}
    planned = plan_jobs(names, jobs)
    found: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}  # job -> error: the other jobs go on, and the report keeps what finished
    if jobs == 1 or len(planned) == 1:
        for job in planned:
            try:
                found.update(run_job(job, chosen, out_dir))
            except Exception as error:  # noqa: BLE001 - reported below, after the others ran
                failed[" -> ".join(job)] = f"{type(error).__name__}: {error}"
                print(f"[run_all] FAILED: {' -> '.join(job)}: {failed[' -> '.join(job)]}", flush=True)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        threads = max(1, (os.cpu_count() or 1) // jobs)
        print(f"[run_all] {len(planned)} jobs, {jobs} at a time, {threads} torch thread(s) each: "
              + "; ".join(" -> ".join(job) for job in planned), flush=True)
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(run_job, job, {n: chosen[n] for n in {*job, *PREPARE} & set(chosen)}, out_dir,
                                   threads): job for job in planned}
            for future in as_completed(futures):
                label = " -> ".join(futures[future])
                try:
                    found.update(future.result())
                except Exception as error:  # noqa: BLE001 - reported below, after the others ran
                    failed[label] = f"{type(error).__name__}: {error}"
                    print(f"[run_all] FAILED: {label}: {failed[label]}", flush=True)
                    continue
                print(f"[run_all] done: {', '.join(futures[future])} "
                      f"({(time.perf_counter() - started) / 60:.1f} min so far)", flush=True)
    results = {n: found[n] for n in names if n in found}
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "quick": quick,
        "jobs": jobs,
        "elapsed_s": time.perf_counter() - started,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s), load average "
                   f"{', '.join(f'{v:.1f}' for v in os.getloadavg())} at the end, Python {platform.python_version()}, "
                   f"torch {torch.__version__}",
    }
    if results:
        write_report(out_dir, results, meta)
    if failed:
        raise RuntimeError(f"{len(failed)} experiment job(s) failed (the report has the {len(results)} that "
                           "finished): " + "; ".join(f"{job}: {error}" for job, error in failed.items()))
    return {"meta": meta, "results": results}


def main(argv: list[str] | None = None) -> None:
    """Command line entry."""
    parser = experiment_arguments(__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(EXPERIMENTS), help="run only these experiments")
    parser.add_argument("--report-only", action="store_true", help="rewrite README.md and costs from the JSON files")
    parser.add_argument("--jobs", type=int, default=default_jobs(),
                        help="experiments run side by side (default: 2 with at least two cores, else 1)")
    args = parser.parse_args(argv)
    if args.report_only:
        print(f"report: {rewrite_report(args.out)}")
        return
    out = run_all(args.out, args.quick, args.seeds, args.only, jobs=args.jobs)
    print(f"\nall done in {out['meta']['elapsed_s'] / 60:.1f} min; report: {Path(args.out) / 'README.md'}")


if __name__ == "__main__":
    main()
