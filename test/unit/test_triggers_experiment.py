"""The stream-trigger experiment's pieces on tiny synthetic rovers: variants, matched counts, same held-out frames."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from experiments import triggers


@pytest.fixture(scope="module")
def rover_folders(tmp_path_factory):
    from forest_perception.dataset_tools.synth import SynthConfig, synthesize

    root = tmp_path_factory.mktemp("trigger_rovers")
    folders = {}
    for i in range(2):
        folders[f"rover_{i}"] = root / f"rover_{i}"
        synthesize(folders[f"rover_{i}"], SynthConfig(segments_per_run=4, frames_per_segment=4, seed=i, width=64,
                                                      height=48, weathers=("sunny",)))
    return folders


def test_every_variant_trains_on_matched_counts_and_is_scored_on_the_same_frames(rover_folders, tmp_path):
    config = dataclasses.replace(triggers.TriggersConfig.quick(), rounds=1, batch_size=4, holdout_fraction=0.3,
                                 budgets=("epochs", "steps"))
    result = triggers.run(config, tmp_path, folders=rover_folders)
    summary = result["summary"]
    assert set(summary["variants"]) == {"all|any", "trigger:default|epochs", "uniform:default|epochs",
                                        "trigger:default|steps", "uniform:default|steps"}
    all_ = summary["variants"]["all|any"]
    trig, uni = summary["variants"]["trigger:default|epochs"], summary["variants"]["uniform:default|epochs"]
    assert 0 < trig["train_frames"] == uni["train_frames"] <= all_["train_frames"]
    assert trig["drive_frames"] == uni["drive_frames"] <= all_["drive_frames"] == 32
    assert trig["train_png_mb"] <= all_["train_png_mb"]
    for entry in summary["variants"].values():
        assert math.isfinite(entry["absrel"]["mean"]) and 0 <= entry["delta1"]["mean"] <= 1
    counts = summary["counters"]["default"]
    assert counts["frames"] == 32 and counts["kept"] == trig["drive_frames"]
    assert "default|epochs" in summary["paired"] and summary["paired"]["default|epochs"]["seeds"] == 1
    saved = json.loads((tmp_path / "triggers.json").read_text())
    assert saved["experiment"] == "triggers" and "trigger (default" in saved["table"]
    assert (tmp_path / "triggers.png").is_file() and (tmp_path / "triggers.csv").is_file()


def test_subset_keeps_the_held_out_frames(rover_folders):
    import torch

    from forest_perception.collab.flower.task import LocalData

    data = LocalData("x", torch.arange(5.0)[:, None], torch.arange(5.0)[:, None], torch.ones(2, 1),
                     torch.ones(2, 1))
    picked = triggers.subset(data, [3, 1])
    assert picked.train_images.flatten().tolist() == [1.0, 3.0] and picked.val_images is data.val_images
