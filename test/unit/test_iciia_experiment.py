"""The ICIIA experiment's scoring, summary, table and outputs on made-up runs (the run itself is experiments.iciia)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments import iciia, run_all  # noqa: E402


def _runs(config: iciia.IciiaConfig) -> list[dict]:
    runs = []
    for seed in config.seeds:
        runs.append({"method": "shipped", "seed": seed, "partitions": 0,
                     "rounds": [{"round": 0.0, "absrel": 0.30, "delta1": 0.60}]})
        for p in config.partitions:
            for variant, absrel in (("no_history", 0.28), ("history", 0.25 - 0.001 * p), ("history_primed", 0.24)):
                runs.append({"method": variant, "seed": seed, "partitions": p, "train_s": 1.0,
                             "rounds": [{"round": 0.0, "absrel": absrel + 0.001 * seed, "delta1": 0.7}]})
        for p in config.control_partitions:
            runs.append({"method": "trained_without_history", "seed": seed, "partitions": p, "train_s": 1.0,
                         "rounds": [{"round": 0.0, "absrel": 0.27, "delta1": 0.65}]})
    return runs


def test_summary_table_and_outputs(tmp_path):
    config = dataclasses.replace(iciia.IciiaConfig(), seeds=(0, 1), partitions=(4, 16), control_partitions=(16,),
                                 flops_models=("autoencoder_160x128",))
    runs = _runs(config)
    summary = iciia.summarise(config, runs)
    assert summary["best_partitions"] == 16
    assert abs(summary["paired"]["history - no_history, P=4"]["mean"] - (0.246 - 0.28)) < 1e-9
    assert abs(summary["paired"]["history - trained_without_history, P=16"]["mean"] - (0.2345 - 0.27)) < 1e-9
    summary.update(flops=iciia.flops_table(config), latency_ms={"shipped": {"median_ms": 2.0},
                                                                 "iciia P=4": {"median_ms": 2.5}})
    overheads = {r["partitions"]: r["overhead"] for r in summary["flops"]}
    assert overheads[16] < overheads[4] < 0.1
    result = {"experiment": "iciia", "claim": iciia.CLAIM, "config": config, "runs": runs, "summary": summary,
              "elapsed_s": 1.0}
    text = iciia.table(result)
    assert "ICIIA P=16 trained without history (control)" in text and "2.50 (1.25x)" in text
    iciia.write_outputs(result, config, tmp_path)
    saved = json.loads((tmp_path / "iciia.json").read_text())
    assert saved["experiment"] == "iciia" and (tmp_path / "iciia.png").is_file() and (tmp_path / "iciia.csv").is_file()
    assert "iciia" in run_all.EXPERIMENTS and run_all.EXPERIMENTS["iciia"][1] is iciia.IciiaConfig


def test_score_predictions_pools_rovers_by_frames():
    from forest_perception.collab.flower.task import TaskConfig

    depth = torch.full((2, 1, 4, 4), 2.0)
    held = {"a": (torch.zeros(2, 3, 4, 4), depth), "b": (torch.zeros(1, 3, 4, 4), depth[:1])}
    preds = {"a": depth * 1.1, "b": depth[:1] * 1.4}
    row = iciia.score_predictions(preds, held, TaskConfig())
    assert abs(row["a/absrel"] - 0.1) < 1e-5 and abs(row["b/absrel"] - 0.4) < 1e-5
    assert abs(row["absrel"] - (2 * 0.1 + 0.4) / 3) < 1e-5 and row["b/delta1"] == 0.0
