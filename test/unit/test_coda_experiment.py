"""The CoDA experiment's summary, table and plot from made-up runs (the real run: python -m experiments.coda)."""

from __future__ import annotations

import math

import pytest

from experiments import coda as experiment


def run(method: str, seed: int, rover: str, absrel: float, **extra: float) -> dict:
    last = {"round": 6.0, "own/absrel": absrel, "own/delta1": 1 - absrel, "absrel": absrel + 0.01,
            "delta1": 0.8, "cloud_samples": 0.0 if method == "local" else 20.0, "bytes_up": 0.0,
            "bytes_down": 0.0, "train_s": 1.0, **extra}
    if method != "local":
        last.update(similarity_to_held_out=0.97, from_rovers=10.0 if "shared" in method else 0.0)
    return {"method": method, "seed": seed, "rover": rover,
            "rounds": [{"round": 0.0, "own/absrel": 0.3, "own/delta1": 0.6, "absrel": 0.3, "delta1": 0.6}, last]}


def fake_runs() -> list[dict]:
    runs = []
    for seed in (0, 1):
        for r, rover in enumerate(("rover_0", "rover_1")):
            base = 0.15 + 0.01 * r + 0.002 * seed
            for i, method in enumerate(experiment.METHODS):
                extra = {"filter_fit_s": 0.01, "filter_score_s": 0.001, "filter_peak_bytes": 4096.0,
                         "filter_accuracy": 0.9, "candidates": 40.0} if method.startswith("coda") else {}
                runs.append(run(method, seed, rover, base + 0.001 * i, **extra))
    return runs


def test_summary_pairs_arms_per_seed_and_tests_the_claims():
    config = experiment.CodaConfig(seeds=(0, 1))
    summary = experiment.summarise(config, fake_runs())
    methods = experiment.METHODS
    gap = methods.index("coda@wide") - methods.index("local")
    assert summary["paired"]["coda@wide - local"]["mean"] == pytest.approx(0.001 * gap)
    assert summary["paired"]["coda@wide - local"]["n"] == 2
    assert summary["claims"]["pool wide: CoDA better than local fine-tuning alone"] is False
    assert summary["shipped"]["own/absrel"]["mean"] == pytest.approx(0.3)
    assert summary["filter"]["filter_peak_bytes"]["mean"] == 4096.0
    assert summary["methods"]["coarse@wide+shared"]["from_rovers"]["mean"] == 10.0


def test_table_and_plot_are_written(tmp_path):
    config = experiment.CodaConfig(seeds=(0, 1))
    runs = fake_runs()
    result = experiment.report.experiment_result(experiment.NAME, experiment.CLAIM, config, runs,
                                                 experiment.summarise(config, runs), 0.0)
    text = experiment.table(result)
    assert "CoDA: coarse + on-rover filter (top k) (pool wide+shared)" in text and "peak memory 4 KiB" in text
    assert "Claims:" in text and not any(math.isnan(v) for v in [result["elapsed_s"]])
    experiment.write_outputs(result, config, tmp_path)
    assert (tmp_path / "coda.png").stat().st_size > 10_000 and (tmp_path / "coda.csv").is_file()
