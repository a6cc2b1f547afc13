"""The FedAvg-gap study (experiments.adaptation_gap) on tiny rover folders: variants, IID shards, outputs."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from experiments import adaptation, adaptation_gap
from forest_perception.collab.flower.task import LocalData, TaskConfig


@pytest.fixture(scope="module")
def rover_folders(tmp_path_factory):
    """Two rovers with three tiny synthetic segments each, and one empty folder."""
    from forest_perception.dataset_tools.synth import SynthConfig, synthesize

    root = tmp_path_factory.mktemp("gap_rovers")
    folders = {}
    for i in range(2):
        folders[f"rover_{i}"] = root / f"rover_{i}"
        synthesize(folders[f"rover_{i}"], SynthConfig(segments_per_run=3, frames_per_segment=2, seed=10 + i, width=64,
                                                      height=48, weathers=("sunny",)))
    (root / "rover_empty").mkdir()
    folders["rover_empty"] = root / "rover_empty"
    return folders


def tiny_config() -> adaptation.AdaptationConfig:
    return adaptation.AdaptationConfig(seeds=(0,), rounds=2, engine="local", batch_size=4, holdout_fraction=0.4)


def test_variants_parse_and_a_bad_part_is_named():
    v = adaptation_gap.parse_variant("iid+stateful+server-lr=1.5+local-epochs=4+lr=2e-4+cosine+sgd+prox=0.01"
                                     "+scaffold")
    assert (v.iid, v.stateful, v.cosine, v.sgd, v.server_lr, v.local_epochs, v.lr, v.prox, v.scaffold) == (
        True, True, True, True, 1.5, 4, 2e-4, 0.01, True)
    assert adaptation_gap.parse_variant("plain") == adaptation_gap.Variant("plain")
    for bad, part in (("iid+momentum", "momentum"), ("server-lr=0", "server-lr=0"),
                      ("local-epochs=x", "local-epochs=x"), ("lr=-1", "lr=-1"),
                      ("prox=-0.1", "prox=-0.1")):
        with pytest.raises(ValueError, match=f"cannot read '{part}'"):
            adaptation_gap.parse_variant(bad)
    task = TaskConfig()
    changed = adaptation_gap.variant_task(task, adaptation_gap.parse_variant("sgd+local-epochs=3+lr=1e-3+prox=0.1"))
    assert (changed.optimizer, changed.local_epochs, changed.lr, changed.proximal_mu) == ("sgd", 3, 1e-3, 0.1)
    assert adaptation_gap.variant_task(task, adaptation_gap.Variant("plain")) == task


def test_cosine_learning_rate_falls_from_lr_towards_a_tenth():
    lrs = [adaptation_gap.round_lr(3e-4, r, 10, cosine=True) for r in range(1, 11)]
    assert lrs[0] == pytest.approx(3e-4)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert lrs[-1] > adaptation_gap.COSINE_FLOOR * 3e-4
    assert lrs[-1] < 0.2 * 3e-4
    assert adaptation_gap.round_lr(3e-4, 7, 10, cosine=False) == 3e-4


def test_iid_shards_deal_the_same_frames_in_the_same_sizes_and_keep_each_rovers_held_out():
    def rover(name, n, offset):
        images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 2, 2) + offset
        val = torch.full((2, 3, 2, 2), -offset)
        return LocalData(name, images, images[:, :1] + 1, val, val[:, :1])

    rovers = {"a": rover("a", 6, 0.0), "b": rover("b", 4, 100.0)}
    shards = adaptation_gap.iid_shards(rovers, seed=3)
    assert {r: d.num_train for r, d in shards.items()} == {"a": 6, "b": 4}
    before = sorted(torch.cat([d.train_images[:, 0, 0, 0] for d in rovers.values()]).tolist())
    after = sorted(torch.cat([d.train_images[:, 0, 0, 0] for d in shards.values()]).tolist())
    assert before == after
    assert any(v >= 100 for v in shards["a"].train_images[:, 0, 0, 0].tolist()), "rover a got none of b's frames"
    for name in rovers:
        assert torch.equal(shards[name].val_images, rovers[name].val_images)
        assert torch.equal(shards[name].train_depth, shards[name].train_images[:, :1] + 1), "pairs stay together"
    assert torch.equal(adaptation_gap.iid_shards(rovers, 3)["a"].train_images, shards["a"].train_images)


def test_study_runs_every_variant_beside_pooled_and_writes_its_outputs(rover_folders, tmp_path, capsys):
    variants = ["plain", "iid+stateful+cosine", "server-lr=1.5+local-epochs=2", "scaffold+prox=0.1"]
    result = adaptation_gap.run(tiny_config(), tmp_path, variants, rounds=2, folders=rover_folders)
    assert "rover_empty: no data" in capsys.readouterr().out
    for suffix in ("json", "csv", "png"):
        assert (tmp_path / f"adaptation_gap.{suffix}").stat().st_size > 0
    runs = {r["variant"]: r for r in result["runs"]}
    assert sorted(runs) == sorted(["pooled", *variants])
    start = runs["pooled"]["rounds"][0]["absrel"]
    for run in runs.values():
        assert [row["round"] for row in run["rounds"]] == [0.0, 1.0, 2.0]
        assert run["rounds"][0]["absrel"] == pytest.approx(start), "every method starts from the shipped weights"
        assert all(math.isfinite(row["absrel"]) for row in run["rounds"])
        assert run["rounds"][-1]["absrel"] != pytest.approx(start), f"{run['variant']} did not train"
    cosine = [row["lr"] for row in runs["iid+stateful+cosine"]["rounds"][1:]]
    assert cosine[0] > cosine[1]
    assert runs["plain"]["rounds"][1]["lr"] == runs["plain"]["rounds"][2]["lr"]
    assert runs["plain"]["rounds"][-1]["absrel"] != runs["iid+stateful+cosine"]["rounds"][-1]["absrel"]
    summary = result["summary"]["variants"]
    pooled = result["summary"]["pooled_absrel"]
    assert summary["plain"]["vs_pooled"] == pytest.approx(summary["plain"]["absrel"]["mean"] / pooled - 1)
    assert "against pooled" in adaptation_gap.table(result)
    written = json.loads((tmp_path / "adaptation_gap.json").read_text())
    assert written["config"]["variants"] == variants and written["config"]["rounds"] == 2


def test_bad_variant_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="cannot read 'fedprox'"):
        adaptation_gap.run(tiny_config(), tmp_path, ["plain+fedprox"], rounds=1, folders={})
    with pytest.raises(ValueError, match="rounds must be at least 1"):
        adaptation_gap.run(tiny_config(), tmp_path, ["plain"], rounds=0, folders={})
    with pytest.raises(SystemExit, match="adaptation_gap: variant"):
        adaptation_gap.main(["--variants", "plain", "what", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_controlled_step_corrects_each_gradient_and_keeps_the_raw_mean():
    weight = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    step = adaptation_gap.ControlledStep(torch.optim.SGD([weight], lr=0.5), [weight], [torch.tensor([1.0, -1.0])])
    step.param_groups[0]["lr"] = 1.0  # train_local sets the round's rate through param_groups
    for grad in ([2.0, 0.0], [0.0, 4.0]):
        step.zero_grad()
        (weight * torch.tensor(grad)).sum().backward()
        step.step()
    # each step moved by -(raw gradient + correction)
    torch.testing.assert_close(weight.detach(), torch.tensor([1.0 - 3.0 - 1.0, 2.0 + 1.0 - 3.0]))
    torch.testing.assert_close(step.mean_gradient()[0], torch.tensor([1.0, 2.0]))
    plain = adaptation_gap.ControlledStep(torch.optim.SGD([weight], lr=1.0), [weight], None)
    plain.zero_grad()
    weight.sum().backward()
    before = weight.detach().clone()
    plain.step()
    torch.testing.assert_close(weight.detach(), before - 1.0)


def test_stateful_rovers_keep_their_optimiser_between_rounds(rover_folders, monkeypatch):
    config = tiny_config()
    task = TaskConfig.from_run_config(adaptation.run_config(config, 0))
    rovers = {r: d for r, d in adaptation.load_rovers(rover_folders, task).items() if isinstance(d, LocalData)}
    seen: list[int] = []
    real = adaptation_gap._local_round

    def spy(model, data, task, seed, optimizer):
        real(model, data, task, seed, optimizer)
        seen.append(id(optimizer))

    monkeypatch.setattr(adaptation_gap, "_local_round", spy)
    held = adaptation.held_out(rovers)
    adaptation_gap.run_fedavg_variant(config, task, adaptation_gap.parse_variant("stateful"), rovers, held, 0, 2,
                                      progress=False)
    assert len(seen) == 2 * len(rovers) and seen[: len(rovers)] == seen[len(rovers):]
    assert id(None) not in seen
    seen.clear()
    adaptation_gap.run_fedavg_variant(config, dataclasses.replace(task), adaptation_gap.Variant("plain"), rovers,
                                      held, 0, 1, progress=False)
    assert seen == [id(None)] * len(rovers)
