"""Smoke tests of the experiments (experiments/): each script in a tiny configuration, the report, the helpers.

No assertion here says which algorithm wins; they check that every script runs the real
coordinator for the configured rounds, writes its JSON/CSV/PNG, and that what it reports
is sane (finite where nothing diverged, counts that add up, per-rover bytes that fit).
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # experiments/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(REPO))

from experiments import heldout, run_all  # noqa: E402
from experiments.fed_vs_local_vs_central import FedLocalCentralConfig  # noqa: E402
from experiments.fedlaavg_vs_fedavg import LaAvgConfig  # noqa: E402
from experiments.fedsubavg_sparse import PlaceScaledDepth, SubAvgConfig, assign_places, make_places  # noqa: E402
from experiments.report import curve_stats, fmt, mean_std, rounds_to_target  # noqa: E402
from experiments.semicyclic import SemiCyclicConfig  # noqa: E402

HW = (32, 48)  # the smallest input the networks take comfortably; every script accepts it
TINY = {
    "fedlaavg_vs_fedavg": LaAvgConfig(seeds=(0,), num_rovers=4, rounds=3, frames_per_rover=4, held_out_per_rover=1,
                                      fraction_train=0.5, hw=HW, variants=(("fedavg", 0.03), ("fedlaavg", 0.03))),
    "fedsubavg_sparse": SubAvgConfig(seeds=(0,), num_rovers=3, num_places=64, places_per_rover=1,
                                     frames_per_place=3, held_out_per_place=1, hot_rovers=2, rounds=3,
                                     fraction_train=1.0, hw=HW, pretrain_forests=2, pretrain_frames=2,
                                     pretrain_epochs=1, lrs=(0.001,)),
    "semicyclic": SemiCyclicConfig(seeds=(0,), num_rovers=4, num_blocks=2, rounds_per_block=1, rounds=4,
                                   frames_per_rover=4, held_out_per_rover=1, hw=HW, pretrain_forests=2,
                                   pretrain_frames=2, pretrain_epochs=1, lrs=(0.003,)),
    "fed_vs_local_vs_central": FedLocalCentralConfig(seeds=(0,), num_rovers=3, rounds=2, frames_per_rover=4,
                                                     held_out_per_rover=1, unseen_forests=1, unseen_per_forest=2,
                                                     hw=HW, lrs=(0.003, 0.03), tail_rounds=1),
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Every experiment in TINY once, through run_all with two jobs side by side (so the report is written too); the
    adaptation experiment records rovers over ROS and has its own tests (test/unit/test_adaptation.py)."""
    out = tmp_path_factory.mktemp("results")
    return out, run_all.run_all(out, configs=TINY, only=list(TINY), jobs=2)


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _outputs(out: Path, name: str, runs: int, rounds: int) -> dict:
    """The JSON as written, after checking the CSV has one row per run and round (round 0 included) and the PNG."""
    data = json.loads((out / f"{name}.json").read_text())
    assert len(data["runs"]) == runs
    for run in data["runs"]:
        assert [r["round"] for r in run["rounds"]] == list(range(rounds + 1))
    with (out / f"{name}.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == runs * (rounds + 1) and {r["experiment"] for r in rows} == {name}
    png = (out / f"{name}.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert data["table"].count("\n|") >= 2  # header, rule and at least one row
    return data


def _costs_are_sane(rounds: list[dict], rovers: int, kib_model: float) -> None:
    for row in rounds[1:]:
        assert row["wall_s"] > 0 and 0 < row["selected"] <= rovers
        assert row["accepted"] + row["rejected"] + row["failed"] == row["selected"]
        assert row["kib_down_per_rover"] == pytest.approx(kib_model, rel=0.05)


def test_fedlaavg_vs_fedavg_tiny(report):
    out, _ = report
    config = TINY["fedlaavg_vs_fedavg"]
    data = _outputs(out, "fedlaavg_vs_fedavg", runs=2, rounds=config.rounds)
    kib = data["runs"][0]["rounds"][1]["kib_down_per_rover"]
    assert 100 < kib < 140  # the base-channels 4 auto-encoder: 28,625 float32 values
    for run in data["runs"]:
        _costs_are_sane(run["rounds"], config.num_rovers, kib)
        assert 0 <= sum(r["rare_trained"] for r in run["rounds"][1:]) <= sum(r["accepted"] for r in run["rounds"][1:])
    # both start from the same initial model: round 0 scores are identical
    first = [run["rounds"][0]["all/absrel"] for run in data["runs"]]
    assert _finite(first[0]) and first[0] == pytest.approx(first[1])
    fedavg = data["summary"]["variants"]["fedavg lr=0.03"]
    assert _finite(fedavg["all/absrel"]["mean"]) and 0 <= fedavg["all/delta1"]["mean"] <= 1
    assert data["summary"]["best"] == {"fedavg": "fedavg lr=0.03", "fedlaavg": "fedlaavg lr=0.03"}
    assert set(data["summary"]["paired"]) == {"fedlaavg lr=0.03 - fedavg lr=0.03, all/delta1 (points)",
                                              "fedlaavg lr=0.03 - fedavg lr=0.03, all/absrel"}


def test_fedsubavg_sparse_tiny(report):
    out, _ = report
    config = TINY["fedsubavg_sparse"]
    data = _outputs(out, "fedsubavg_sparse", runs=2, rounds=config.rounds)
    for run in data["runs"]:
        rounds = run["rounds"]
        assert all(r["selected"] == config.num_rovers and r["accepted"] == config.num_rovers for r in rounds[1:])
        # the place table goes down whole (64 rows) but up compact: only the rover's own place (plus its index)
        assert all(r["kib_up_per_rover"] < r["kib_down_per_rover"] for r in rounds[1:])
        assert all(_finite(r["all/loss"]) and _finite(r["all/absrel"]) for r in rounds)
    population = data["populations"][0]
    assert sum(population["visitors_per_place"].values()) == config.num_rovers * config.places_per_rover
    for algorithm, s in data["summary"]["algorithms"].items():
        for q in config.target_fractions:
            stat = s[f"rounds_to_{q:g}_all/loss"]
            reached = [h for h in stat["per_seed"] if h is not None]
            assert all(0 <= h <= config.rounds for h in reached), (algorithm, stat)
            assert stat["never"] == len(stat["per_seed"]) - len(reached)


def test_semicyclic_tiny(report):
    out, _ = report
    config = TINY["semicyclic"]
    data = _outputs(out, "semicyclic", runs=6, rounds=config.rounds)
    by_setting = {run["setting"]: run["rounds"] for run in data["runs"]}
    assert set(by_setting) == {f"{a}, {s}" for a in config.algorithms for s in config.starts}
    for setting, rounds in by_setting.items():
        _costs_are_sane(rounds, config.num_rovers, rounds[1]["kib_down_per_rover"])
        # the schedule: round r belongs to block (r - 1) % 2 and only that block's rovers train
        if not setting.startswith("fedavg"):
            assert [r["block"] for r in rounds[1:]] == [0.0, 1.0, 0.0, 1.0]
        assert all(r["selected"] <= config.num_rovers // config.num_blocks for r in rounds[1:])
        # sparse scores: round 0, every cycle's end (2) and the whole last cycle (3, 4); round 1 is not scored
        assert [r["round"] for r in rounds if "mean/absrel" in r] == [0, 2, 3, 4]
        for r in rounds:
            if "mean/absrel" not in r:
                continue
            assert r["mean/absrel"] == pytest.approx(np.mean([r["block0/absrel"], r["block1/absrel"]]))
            assert _finite(r["average/absrel"])
        # the control (plain average of every global model so far) is the initial model at round 0
        assert rounds[0]["average/absrel"] == pytest.approx(rounds[0]["mean/absrel"], rel=1e-5)
    # MM-PSGD's mixed chain is FedAvg: same global model every round, only the predictors differ
    for start in config.starts:
        fedavg, mm = by_setting[f"fedavg, {start}"], by_setting[f"mm-psgd, {start}"]
        scored = [r["global/absrel"] for r in mm if "global/absrel" in r]
        theirs = [r["global/absrel"] for r in fedavg if "global/absrel" in r]
        assert len(scored) == 4 and scored == pytest.approx(theirs)
        mc = by_setting[f"mc-psgd, {start}"]
        assert mc[1]["kib_down_per_rover"] == pytest.approx(2 * fedavg[1]["kib_down_per_rover"], rel=0.01)
    # the pretrained start begins better than the untrained network
    assert by_setting["fedavg, pretrained"][0]["mean/absrel"] < by_setting["fedavg, scratch"][0]["mean/absrel"]


def test_fed_vs_local_vs_central_tiny(report):
    out, _ = report
    config = TINY["fed_vs_local_vs_central"]
    data = _outputs(out, "fed_vs_local_vs_central", runs=3, rounds=config.rounds)
    runs = {run["setting"]: run["rounds"] for run in data["runs"]}
    assert set(runs) == {"federated", "local", "central"}
    # the same initial network everywhere: identical round-0 scores
    start = runs["federated"][0]["own/absrel"]
    assert all(runs[s][0]["own/absrel"] == pytest.approx(start) for s in runs)
    for setting, rounds in runs.items():
        assert all(_finite(r[k]) for r in rounds for k in ("own/absrel", "all/absrel", "unseen/absrel")), setting
        assert all(0 <= r["own/delta1"] <= 1 for r in rounds)
    assert all(r["selected"] == config.num_rovers for r in runs["federated"][1:])
    assert all(r["train_s"] > 0 for r in runs["central"][1:] + runs["local"][1:])
    # two learning rates: each setting was tuned on seed 100 (never reported) and runs at the better one
    tuning = data["tuning"]
    assert {(t["setting"], t["lr"], t["seed"]) for t in tuning["trials"]} == {
        (s, lr, 100) for s in ("federated", "local", "central") for lr in config.lrs}
    for setting in runs:
        mine = {t["lr"]: t["score"] for t in tuning["trials"] if t["setting"] == setting}
        assert tuning["best"][setting] == min(mine, key=mine.get)
        assert data["summary"]["settings"][setting]["lr"] == tuning["best"][setting]
    assert "tuned on seed 100" in data["table"]
    assert set(data["summary"]["paired"]) == {f"federated - {o}, {k}/absrel (last 1 rounds)"
                                              for o in ("local", "central") for k in ("own", "unseen")}


def test_report_lists_every_experiment_and_the_costs(report):
    out, result = report
    readme = (out / "README.md").read_text()
    for name in TINY:
        assert f"({name}.png)" in readme and name in result["results"]
    assert "## Costs per round" in readme and (out / "costs.png").stat().st_size > 10_000
    with (out / "costs.csv").open() as f:
        costs = list(csv.DictReader(f))
    # one cost row per federated run label: 2 + 2 + 6 + 1 (local/central are not federated runs)
    assert len(costs) == 11 and all(float(c["wall_s_per_round"]) > 0 for c in costs)
    mc = [c for c in costs if c["run"].startswith("mc-psgd")]
    assert mc and all(float(c["kib_up_per_rover"]) > 200 for c in mc)  # two chains of 112 KiB each way
    first = readme
    assert run_all.rewrite_report(out) == out / "README.md"  # from the JSON files alone, the same report
    assert (out / "README.md").read_text() == first
    summary = json.loads((out / "run_all.json").read_text())
    assert set(summary["experiments"]) == set(TINY) and summary["elapsed_s"] > 0
    with pytest.raises(ValueError, match="unknown experiment"):
        run_all.run_all(out, only=["nope"])


# ---------------------------------------------------------------------------------------------- helpers


def test_held_out_groups_restrict_and_complain():
    parts = {name: (torch.full((n, 3, 4, 4), float(i)), torch.full((n, 1, 4, 4), float(i + 1)))
             for i, (name, n) in enumerate([("a", 2), ("b", 3), ("c", 1)])}
    held = heldout.HeldOut.build(parts, {"ab": ["a", "b"], "c": ["c"], "all": ["a", "b", "c"]})
    assert len(held) == 6 and list(held.groups["c"]) == [5]
    sub = held.restrict(["c", "ab"])
    assert len(sub) == 6  # every frame is in one of them: nothing dropped
    only_c = held.restrict(["c"])
    assert len(only_c) == 1 and float(only_c.images[only_c.groups["c"]][0, 0, 0, 0]) == 2.0
    with pytest.raises(ValueError, match="names unknown or no parts: \\['z'\\]"):
        heldout.HeldOut.build(parts, {"bad": ["a", "z"]})
    with pytest.raises(ValueError, match="unknown"):
        held.restrict(["nope"])


def test_summaries_and_targets():
    stat = mean_std([1.0, 3.0, math.nan])
    assert (stat["mean"], stat["n"], stat["nonfinite"]) == (2.0, 2, 1) and stat["std"] == pytest.approx(math.sqrt(2))
    assert fmt(stat, 1) == "2.0 ± 1.4 (1 diverged)"
    assert fmt(mean_std([math.nan])) == "diverged"
    rows = [{"round": 0, "loss": 5.0}, {"round": 1, "loss": 4.0}, {"round": 2, "loss": math.nan},
            {"round": 3, "loss": 2.0}]
    assert rounds_to_target(rows, "loss", 3.0) == 3
    assert rounds_to_target(rows, "loss", 1.0) is None
    rounds, mean, std = curve_stats([rows, rows], "loss")
    assert list(rounds) == [0, 1, 2, 3] and mean[1] == 4.0 and std[1] == 0.0 and math.isnan(mean[2])


def test_place_model_scales_by_place_and_places_are_drawn_distinct():
    net = torch.nn.Conv2d(3, 1, 1)
    model = PlaceScaledDepth(net, num_places=4)
    image = torch.rand(2, 3, 8, 8)
    base = net(image)
    with torch.no_grad():
        model.place_log_scale.weight[2] = math.log(2.0)
    out = model(image, torch.tensor([2, 0]))
    assert torch.allclose(out[0], 2.0 * base[0]) and torch.allclose(out[1], base[1])
    with pytest.raises(ValueError, match="one place id per image"):
        model(image, torch.tensor([1]))
    visits = assign_places(50, 10, 3, zipf=1.2, seed=4)
    assert all(len(set(v)) == 3 and all(0 <= p < 10 for p in v) for v in visits)
    counts = np.bincount(np.concatenate(visits), minlength=10)
    assert counts.max() > 2 * max(counts.min(), 1)  # hot and cold places
    assert visits == assign_places(50, 10, 3, zipf=1.2, seed=4)
    with pytest.raises(ValueError, match="places_per_rover must be within \\[1, 10\\], got 11"):
        assign_places(5, 10, 11, zipf=1.0, seed=0)
    heights = [p.camera_height for p in make_places(20, 0, (0.12, 0.36))]
    assert min(heights) >= 0.12 and max(heights) <= 0.36 and len(set(heights)) == 20
