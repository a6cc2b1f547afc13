"""The DC-CCL experiment's pieces on tiny data: every method scored on the same frames, round 0 of DC-CCL equal to the
mimic and to the large model (the small submodel starts at zero), the claims read from paired differences."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from experiments import dcccl as experiment


def test_claims_come_from_paired_differences_over_seeds():
    def run(method, seed, absrel):
        return {"method": method, "seed": seed, "rounds": [{"round": 1.0, "absrel": absrel, "delta1": 0.8}]}

    runs = [run("large", 0, 0.30), run("dcccl_cloud", 0, 0.25), run("large", 1, 0.30), run("dcccl_cloud", 1, 0.27),
            run("alone", 0, 0.20), run("alone", 0, 0.22), run("dcccl_rover", 0, 0.23),
            run("alone", 1, 0.20), run("dcccl_rover", 1, 0.19)]
    summary = experiment.summarise(experiment.DcCclConfig(seeds=(0, 1)), runs)
    assert summary["paired"]["dcccl_cloud - large"]["mean"] == pytest.approx(-0.04)
    # alone is averaged over its rovers first: seed 0 0.21, seed 1 0.20
    assert summary["paired"]["dcccl_rover - alone"]["mean"] == pytest.approx(((0.23 - 0.21) + (0.19 - 0.20)) / 2)
    claims = list(summary["claims"].values())
    assert claims == [True, False]


def test_a_cached_mimic_of_another_large_model_is_distilled_again(tmp_path, monkeypatch):
    import json
    from types import SimpleNamespace

    from forest_perception.collab import dcccl, dcccl_cloud

    config = experiment.DcCclConfig()
    cache = tmp_path / "dcccl_cache"
    cache.mkdir()
    cloud = cache / "cloud_2x30"
    path = cache / f"mimic_{cloud.name}_e{config.distil_epochs}.pt"
    path.write_bytes(b"cached")
    path.with_suffix(".json").write_text(json.dumps({"spec": {"large": list(config.large)},
                                                     "large_version": "large-aaaaaaaaaaaa"}))
    calls = []

    def distil(spec, folders, out, **kw):
        calls.append(out)
        return {"large_version": "large-bbbbbbbbbbbb", "spec": {"large": list(spec.large)}}

    monkeypatch.setattr(dcccl_cloud, "distil_from_folders", distil)
    monkeypatch.setattr(dcccl, "build_large", lambda spec: SimpleNamespace(version="large-aaaaaaaaaaaa"))
    assert experiment.distil_mimic(config, cloud, tmp_path)[1]["large_version"] == "large-aaaaaaaaaaaa"
    assert calls == []  # the same large model: the cached mimic is reused
    monkeypatch.setattr(dcccl, "build_large", lambda spec: SimpleNamespace(version="large-bbbbbbbbbbbb"))
    assert experiment.distil_mimic(config, cloud, tmp_path)[1]["large_version"] == "large-bbbbbbbbbbbb"
    assert calls == [path]  # the large model was re-shipped: its mimic is distilled again


@pytest.mark.slow
def test_a_seed_scores_every_method_on_the_same_frames(tmp_path):
    from forest_perception.collab import dcccl
    from forest_perception.collab.dcccl_cloud import distil_from_folders
    from forest_perception.dataset_tools.synth import SynthConfig, synthesize

    folders = {}
    for i in range(2):
        folders[f"rover_{i}"] = tmp_path / f"rover_{i}"
        synthesize(folders[f"rover_{i}"], SynthConfig(segments_per_run=3, frames_per_segment=2, seed=i, width=64,
                                                      height=48, weathers=("sunny",)), progress=False)
    # two local epochs: a single AdamW step moves every weight by exactly +-lr, so two rovers whose mimic errs in
    # opposite directions would cancel to the last bit in the average, and the small submodel would stay at zero
    config = dataclasses.replace(experiment.DcCclConfig(seeds=(0,), rounds=1, batch_size=4, holdout_fraction=0.4),
                                 small_channels=2, local_epochs=2)
    spec = dcccl.DcCclSpec(small_channels=2)
    mimic = tmp_path / "mimic.pt"
    distil_from_folders(spec, [folders["rover_0"]], mimic, epochs=1, max_frames=4, progress=False)
    large = dcccl.build_large(spec)
    work = tmp_path / "work"
    work.mkdir()
    runs = experiment.run_seed(config, folders, 0, work, mimic, large, spec)

    by = {r["method"]: r for r in runs if r["method"] != "alone"}
    assert set(experiment.METHODS) - {"alone"} <= set(by)
    assert sum(r["method"] == "alone" for r in runs) == 2
    first = {m: by[m]["rounds"][0] for m in ("mimic", "dcccl_rover", "dcccl_cloud", "large")}
    # round 0: the small submodel is zero, so DC-CCL's rover model is the mimic and its cloud model the large one
    assert first["dcccl_rover"]["absrel"] == pytest.approx(first["mimic"]["absrel"])
    assert first["dcccl_cloud"]["absrel"] == pytest.approx(first["large"]["absrel"], rel=1e-4)
    last = by["dcccl_rover"]["rounds"][-1]
    assert last["round"] == 1.0 and math.isfinite(last["absrel"]) and last["kib_up_per_rover"] > 0
    assert by["dcccl_rover"]["rounds"][-1]["absrel"] != pytest.approx(first["mimic"]["absrel"])
    assert math.isfinite(by["dcccl_cloud"]["rounds"][-1]["absrel"])
    assert by["rovers"]["status"] == {"rover_0": "ok", "rover_1": "ok"}


def test_the_cloud_distils_on_wide_forests_that_never_draw_a_held_out_style(tmp_path, monkeypatch):
    from forest_perception.dataset_tools import cli as dataset_cli
    from forest_perception.sim.styles import HOLD_OUT

    calls = []

    def synth(argv):
        calls.append(argv)
        Path(argv[argv.index("--out") + 1]).mkdir(parents=True)
        return 0

    monkeypatch.setattr(dataset_cli, "main", synth)
    config = experiment.DcCclConfig.quick()
    folder = experiment.cloud_data(config, tmp_path)
    argv = calls[0]
    assert argv[argv.index("--style") + 1] == "wide"
    assert set(argv[argv.index("--exclude-styles") + 1].split(",")) == set(HOLD_OUT)
    assert config.style in HOLD_OUT  # so the rovers' forest style is never among the cloud's
    assert int(argv[argv.index("--segments") + 1]) == config.cloud_forests
    assert (folder / "DONE").is_file()
    experiment.cloud_data(config, tmp_path)
    assert len(calls) == 1  # cached
