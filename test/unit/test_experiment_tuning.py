"""The learning-rate tuning of the claim experiments (experiments/tuning.py) and run_all's job plan."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # experiments/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(REPO))

from experiments import run_all, tuning  # noqa: E402


def fake_runs(best_lr: dict[str, float], diverge: set[tuple[str, float]] = frozenset()):
    """A run_seed whose score is |log10(lr / best)| per setting (NaN for the pairs in ``diverge``); it logs calls."""
    calls = []

    def run_seed(seed, lr_of):
        calls.append((seed, dict(lr_of)))
        runs = []
        for setting, lr in lr_of.items():
            value = math.nan if (setting, lr) in diverge else abs(math.log10(lr / best_lr[setting]))
            runs.append({"setting": setting, "seed": seed, "rounds": [{"absrel": 9.0}, {"absrel": value}]})
        return runs

    return run_seed, calls


def score(run):
    return tuning.tail_mean(run["rounds"], "absrel", 1)


def test_each_setting_gets_its_own_best_rate_on_the_tuning_seed_only():
    run_seed, calls = fake_runs({"a": 0.01, "b": 0.001})
    best, trials = tuning.tune(["a", "b"], [0.001, 0.003, 0.01], 100, run_seed, score, log=lambda _: None)
    assert best == {"a": 0.01, "b": 0.001}
    assert [seed for seed, _ in calls] == [100, 100, 100]  # one call per rate, every setting at that rate
    assert [lr_of for _, lr_of in calls][1] == {"a": 0.003, "b": 0.003}
    assert len(trials) == 6 and all(t["seed"] == 100 for t in trials)
    rows = tuning.tuning_table(trials, best)
    assert rows[0][0] == "a" and rows[0][-1] == "0.01" and rows[1][1] == "0.000"
    assert tuning.tuning_header(trials, "AbsRel") == ["setting", "AbsRel at lr 0.001", "AbsRel at lr 0.003",
                                                      "AbsRel at lr 0.01", "chosen lr"]


def test_diverged_trials_lose_and_all_diverged_takes_the_smallest_rate():
    run_seed, _ = fake_runs({"a": 0.01, "b": 0.01}, diverge={("a", 0.01), ("b", 0.001), ("b", 0.01)})
    best, trials = tuning.tune(["a", "b"], [0.001, 0.01], 7, run_seed, score, log=lambda _: None)
    assert best == {"a": 0.001, "b": 0.001}
    assert "diverged" in tuning.tuning_table(trials, best)[0]
    run_seed, _ = fake_runs({"a": 0.01}, diverge={("a", 0.001), ("a", 0.01)})
    assert tuning.tune(["a"], [0.01, 0.001], 7, run_seed, score, log=lambda _: None)[0] == {"a": 0.001}


def test_one_rate_runs_nothing_and_bad_grids_are_refused():
    run_seed, calls = fake_runs({"a": 0.01})
    assert tuning.tune(["a"], [0.003], 100, run_seed, score) == ({"a": 0.003}, [])
    assert calls == []
    with pytest.raises(ValueError, match="grid is empty"):
        tuning.tune(["a"], [], 100, run_seed, score)
    with pytest.raises(ValueError, match="finite and > 0"):
        tuning.tune(["a"], [0.01, -1.0], 100, run_seed, score)
    with pytest.raises(ValueError, match=r"no run for \['b'\]"):
        tuning.tune(["a", "b"], [0.01, 0.1], 100, lambda seed, lr_of: fake_runs({"a": 1})[0](seed, {"a": 0.1}),
                    score, log=lambda _: None)


def test_tail_mean_skips_rounds_without_the_key_and_paired_matches_seeds():
    rows = [{"x": 1.0}, {}, {"x": 3.0}, {"x": 5.0}]
    assert tuning.tail_mean(rows, "x", 2) == 4.0
    assert math.isnan(tuning.tail_mean(rows + [{"x": math.nan}], "x", 2))
    assert math.isnan(tuning.tail_mean([{}], "x", 3))
    runs = [{"setting": "m", "seed": 0, "v": 1.0}, {"setting": "m", "seed": 1, "v": 2.0},
            {"setting": "t", "seed": 1, "v": 0.5}, {"setting": "t", "seed": 2, "v": 9.0}]
    diff = tuning.paired(runs, lambda r: r["v"], "m", "t", scale=100.0)
    assert diff["per_seed"] == {1: 150.0} and diff["mean"] == 150.0


def test_run_all_plans_dcccl_after_adaptation_in_one_job_longest_first():
    jobs = run_all.plan_jobs(list(run_all.EXPERIMENTS))
    assert jobs[0] == ("adaptation", "dcccl")
    assert sorted(n for job in jobs for n in job) == sorted(run_all.EXPERIMENTS)
    assert run_all.plan_jobs(["dcccl", "fedsubavg_sparse"], jobs=2) == [("dcccl",), ("fedsubavg_sparse",)]
    # side by side, DC-CCL's cloud side starts at once beside the chain that waits for the recording
    side = run_all.plan_jobs(list(run_all.EXPERIMENTS), jobs=2)
    assert side[:2] == [("adaptation", "dcccl"), ("dcccl:cloud",)] and side[2:] == jobs[1:]
    with pytest.raises(ValueError, match="jobs must be >= 1"):
        run_all.run_all(Path("/nonexistent"), only=["fedsubavg_sparse"], jobs=0)


def test_dcccl_takes_over_the_adaptation_runs_only_from_the_same_recording_and_training():
    import dataclasses

    from experiments import dcccl

    config = dcccl.DcCclConfig(seeds=(0, 1))
    runs = [{"method": m, "seed": s, "rounds": []} for s in (0, 1, 2) for m in ("shipped", "alone", "fedavg", "pooled")]
    result = {"config": dataclasses.replace(config.adaptation(), engine="ray", seeds=(0, 1, 2)), "runs": runs}
    taken = dcccl.reusable_baseline(config, result)
    assert sorted(taken) == [0, 1]
    assert sorted(r["method"] for r in taken[0]) == ["alone", "fedavg", "shipped"]
    as_json = {**result, "config": dataclasses.asdict(result["config"])}  # the JSON form works too
    assert sorted(dcccl.reusable_baseline(config, as_json)) == [0, 1]
    other_lr = {**result, "config": dataclasses.replace(result["config"], lr=0.001)}
    assert dcccl.reusable_baseline(config, other_lr) == {}
    assert dcccl.reusable_baseline(config, None) == {}
    no_fedavg = {**result, "runs": [r for r in runs if r["method"] != "fedavg"]}
    assert dcccl.reusable_baseline(config, no_fedavg) == {}


def test_run_all_keeps_going_when_a_job_fails_and_reports_what_finished(tmp_path, monkeypatch):
    import dataclasses
    import types

    @dataclasses.dataclass(frozen=True)
    class Config:
        seeds: tuple = (0,)

        @classmethod
        def quick(cls):
            return cls()

    def good_run(config, out_dir):
        return {"experiment": "good", "claim": "it runs", "config": config, "runs": [], "summary": {},
                "elapsed_s": 0.1}

    def bad_run(config, out_dir):
        raise ValueError("num_blocks must be >= 2")

    good = types.SimpleNamespace(run=good_run, table=lambda result: "| a |\n|---|\n| 1 |")
    bad = types.SimpleNamespace(run=bad_run, table=good.table)
    monkeypatch.setattr(run_all, "EXPERIMENTS", {"bad": (bad, Config), "good": (good, Config)})
    with pytest.raises(RuntimeError, match=r"1 experiment job\(s\) failed .*the 1 that finished.*bad: ValueError: "
                                           r"num_blocks must be >= 2"):
        run_all.run_all(tmp_path, jobs=1)
    readme = (tmp_path / "README.md").read_text()
    assert "Claim: it runs." in readme and "bad" not in readme


def test_costs_read_back_from_json_skip_the_nulls_that_nan_became():
    from experiments.report import cost_summary

    rows = [{"round": 0}, {"round": 1, "wall_s": 2.0, "selected": 4, "rover_train_s": None},
            {"round": 2, "wall_s": 1.0, "selected": 4, "rover_train_s": None, "kib_up_per_rover": 3.0}]
    costs = cost_summary(rows)  # as `run_all --report-only` reads a run whose rovers reported no training time
    assert costs["round1_s"] == 2.0 and costs["wall_s_per_round"] == 1.0 and costs["rovers_per_round"] == 4
    assert math.isnan(costs["rover_train_s"]) and costs["kib_up_per_rover"] == 3.0
