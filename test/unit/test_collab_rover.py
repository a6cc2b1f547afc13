"""collab.rover: global model drops, dataset watch, hold-out split, gate, local training, idleness, node cores."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from forest_perception.collab import rover

HW = (48, 64)  # network input; frames are 64x48 as recorded


def _task(**kwargs):
    from forest_perception.collab.flower.task import TaskConfig

    return TaskConfig(**{"base_channels": 4, "input_hw": HW, **kwargs}).validate()


def write_segment(root: Path, run: int, segment: str, frames: int, depth_m: float = 3.0, seed: int = 0,
                  first_stamp: float = 1.0):
    """A segment of textured 64x48 frames looking at a wall ``depth_m`` away."""
    from forest_perception.dataset_tools.layout import FrameRecord, ImuSample, SegmentWriter

    rng = np.random.default_rng(seed)
    writer = SegmentWriter(root, run, segment)
    for i in range(frames):
        rgb = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        depth = np.full((48, 64), depth_m, np.float32)
        depth[:4] = np.nan  # a few invalid pixels, as a real camera gives
        writer.write_frame(rgb, depth, FrameRecord(f"{i:06d}", first_stamp + i, ImuSample((0, 0, 0), (0, 0, 9.81))))
    return writer


def constant_model(depth_m: float, server_round: int = 1) -> rover.GlobalModel:
    """The small auto-encoder with its last layer set to predict ``depth_m`` everywhere."""
    model = rover.initial_model(_task())
    # LogDepthHead: depth = exp(log 0.1 + log(20 / 0.1) * sigmoid(logit)), the network's default range
    share = (math.log(depth_m) - math.log(0.1)) / (math.log(20.0) - math.log(0.1))
    logit = math.log(share / (1.0 - share))
    arrays = []
    for name, array in zip(model.names, model.arrays):
        if name == "decoder.logit.weight":
            array = np.zeros_like(array)
        elif name == "decoder.logit.bias":
            array = np.full_like(array, logit)
        arrays.append(array)
    return rover.GlobalModel(server_round, model.names, arrays, dict(model.meta), f"constant {depth_m} m")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Four segments of four frames; returns (root, train segments, held-out segments)."""
    root = tmp_path_factory.mktemp("forest")
    for i, name in enumerate("abcd"):
        write_segment(root, 1, name, 4, seed=i).close()
    scan = rover.DatasetWatcher(root).scan()
    train_ids, held_ids = rover.holdout_split([s.segment_id for s in scan.segments], 0.5, seed=0)
    return root, [scan.segment(i) for i in train_ids], [scan.segment(i) for i in held_ids]


@pytest.fixture(scope="module")
def running_models(tmp_path_factory):
    """Constant 2.5 m and 3.0 m models exported to ONNX: {depth: path}."""
    out = tmp_path_factory.mktemp("running")
    paths = {}
    for depth in (2.5, 3.0):
        path, _ = rover.export_candidate(constant_model(depth), out / f"const_{depth}.onnx", _task(), "torchscript")
        paths[depth] = str(path)
    return paths


# ---------------------------------------------------------------------------------------------- drops


def test_drop_roundtrip_listing_and_pruning(tmp_path):
    drop = tmp_path / "incoming"
    model = constant_model(3.0)
    meta = rover.task_meta(_task())
    for r in range(1, 8):
        rover.write_global_model(drop, r, model.names, model.arrays, meta, keep=5)
    (drop / ".global-r000009.npz.77.tmp").write_bytes(b"half a file")  # a writer that died
    (drop / "notes.txt").write_text("not a model")
    listed = rover.list_global_models(drop)
    assert [p.name for p in listed] == [f"global-r{r:06d}.npz" for r in range(3, 8)]
    back = rover.read_candidate(listed[-1])
    assert back.round == 7 and back.names == model.names and back.meta == meta
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(back.arrays, model.arrays))
    assert back.task_config(_task(base_channels=8)).base_channels == 4  # the model's own architecture wins

    source = rover.open_model_source(drop)
    ref = source.latest()
    assert isinstance(source, rover.DropDirSource) and ref.round == 7 and ref.label == "global-r000007"
    assert source.latest() == ref  # same content, same key
    other = constant_model(2.0)
    rover.write_global_model(drop, 7, other.names, other.arrays, meta)  # the same round sent again, other weights
    assert source.latest().key != ref.key
    with pytest.raises(ValueError, match="server_round"):
        rover.write_global_model(drop, -1, model.names, model.arrays)
    with pytest.raises(ValueError, match="names"):
        rover.write_global_model(drop, 8, model.names[:-1], model.arrays)


def test_bad_drops_are_refused_naming_the_file(tmp_path):
    model = constant_model(3.0)
    garbage = tmp_path / "global-r000001.npz"
    garbage.write_bytes(b"not a zip at all" * 20)
    with pytest.raises(ValueError, match="global-r000001.npz"):
        rover.read_candidate(garbage)
    no_header = tmp_path / "global-r000002.npz"
    np.savez(no_header, x=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="no header"):
        rover.read_candidate(no_header)
    good = rover.write_global_model(tmp_path / "ok", 3, model.names, model.arrays)
    with np.load(good) as archive:
        entries = {k: archive[k] for k in archive.files}
    short = dict(entries)
    del short["t00002"]
    np.savez(tmp_path / "global-r000003.npz", **short)
    with pytest.raises(ValueError, match="t00002"):
        rover.read_candidate(tmp_path / "global-r000003.npz")
    np.savez(tmp_path / "global-r000004.npz", **entries)  # header says round 3
    with pytest.raises(ValueError, match="round 4, header 3"):
        rover.read_candidate(tmp_path / "global-r000004.npz")
    ints = dict(entries, t00000=np.zeros(entries["t00000"].shape, np.int64))
    np.savez(tmp_path / "global-r000003.npz", **ints)
    with pytest.raises(ValueError, match="dtype int64"):
        rover.read_candidate(tmp_path / "global-r000003.npz")
    with pytest.raises(ValueError, match="does not exist"):
        rover.read_candidate(tmp_path / "global-r000099.npz")
    (tmp_path / "file.db.txt").write_text("x")
    with pytest.raises(ValueError, match="not a .db"):
        rover.open_model_source(tmp_path / "file.db.txt")


def test_store_source_offers_the_last_round(tmp_path):
    from forest_perception.collab.flower.store import CoordinatorStore

    db = tmp_path / "coordinator.db"
    source = rover.open_model_source(db)
    assert isinstance(source, rover.StoreSource) and source.latest() is None  # not there yet
    model = constant_model(3.0)
    with CoordinatorStore(db, identity={"model": "autoencoder", "base-channels": 4}) as store:
        assert source.latest() is None  # empty store
        store.save_initial(model.names, model.arrays, {})
    ref = source.latest()
    assert ref.round == 0 and ref.key.startswith("store:")
    loaded = source.load(ref)
    assert loaded.names == model.names and loaded.meta == {"model": "autoencoder", "base-channels": 4}
    assert all(np.array_equal(a, b) for a, b in zip(loaded.arrays, model.arrays))
    db.write_bytes(b"garbage, not sqlite" * 100)
    with pytest.raises(ValueError, match="coordinator.db"):
        source.latest()


# ---------------------------------------------------------------------------------------------- dataset


def test_dataset_watcher_reports_new_grown_and_removed_segments(tmp_path):
    from forest_perception.dataset_tools.layout import FrameRecord, ImuSample

    root = tmp_path / "forest"
    watcher = rover.DatasetWatcher(root)
    empty = watcher.scan()
    assert empty.segments == [] and not empty.errors and not empty.changed  # nothing recorded yet is normal

    write_segment(root, 1, "a", 3).close()
    recording = write_segment(root, 1, "b", 2, seed=1)  # still being recorded
    first = watcher.scan()
    assert sorted(first.new) == ["1a", "1b"] and first.frames == 5 and first.new_frames == 5
    assert not watcher.scan().changed  # nothing happened in between

    recording.write_frame(np.zeros((48, 64, 3), np.uint8), np.full((48, 64), 2.0, np.float32),
                          FrameRecord("000002", 10.0, ImuSample((0, 0, 0), (0, 0, 9.81))))
    grown = watcher.scan()
    assert grown.grown == ["1b"] and grown.new == [] and grown.new_frames == 1 and grown.frames == 6
    assert len(grown.segment("1b")) == 3
    recording.close()

    write_segment(root, 2, "a", 1).close()
    broken = root / "Run-2" / "b"
    broken.mkdir()
    (broken / "metadata.csv").write_text("what,is,this\n1,2,3\n")
    shutil.rmtree(root / "Run-1" / "a")
    third = watcher.scan()
    assert third.removed == ["1a"] and third.new == ["2a"] and third.frames == 4
    assert list(third.errors) == [str(broken)] and "metadata.csv" in third.errors[str(broken)]
    with pytest.raises(KeyError, match="1a"):
        third.segment("1a")


def test_holdout_split_is_by_segment_deterministic_and_stable():
    ids = [f"{run}{name}" for run in range(1, 5) for name in "abcde"]
    train, held = rover.holdout_split(ids, 0.25, seed=3)
    assert rover.holdout_split(list(reversed(ids)), 0.25, seed=3) == (train, held)
    assert set(train) | set(held) == set(ids) and not set(train) & set(held)
    assert 2 <= len(held) <= 10  # ~5 of 20
    more = ids + [f"{run}{name}" for run in range(5, 9) for name in "abcde"]
    train2, held2 = rover.holdout_split(more, 0.25, seed=3)
    assert set(held) <= set(held2) and set(train) <= set(train2)  # new segments never move old ones
    assert rover.holdout_split(ids, 0.25, seed=4) != (train, held)
    # small numbers: something on each side with two or more segments, nothing held out with one
    for pair in (["1a", "1b"], ["7x", "9y"]):
        tr, ho = rover.holdout_split(pair, 0.01)
        assert len(tr) == 1 and len(ho) == 1
        tr, ho = rover.holdout_split(pair, 0.99)
        assert len(tr) == 1 and len(ho) == 1
    assert rover.holdout_split(["1a"], 0.5) == (["1a"], [])
    assert rover.holdout_split(ids, 0.0) == (sorted(ids), [])
    with pytest.raises(ValueError, match="fraction"):
        rover.holdout_split(ids, 1.0)


def test_make_holdout_spreads_frames(dataset):
    _, train, held = dataset
    everything = train + held
    full = rover.make_holdout(everything, max_frames=1000)
    assert len(full) == 16
    capped = rover.make_holdout(everything, max_frames=5)
    assert len(capped) == 5 and capped.frames[0] == (0, 0) and capped.frames[-1] == (3, 3)
    assert capped.signature != full.signature
    frames = list(capped)
    assert frames[0][0].shape == (48, 64, 3) and frames[0][1].dtype == np.float32
    with pytest.raises(ValueError, match="max_frames"):
        rover.make_holdout(everything, 0)


# ---------------------------------------------------------------------------------------------- gate


def test_compare_metrics_tolerances():
    config = rover.GateConfig(tolerance_absrel=0.02, tolerance_delta1=0.05, max_absrel=0.5)
    running = {"absrel": 0.10, "delta1": 0.90}
    assert rover.compare_metrics({"absrel": 0.11, "delta1": 0.86}, running, config)[:2] == (True, "accepted")
    ok, code, reason = rover.compare_metrics({"absrel": 0.13, "delta1": 0.95}, running, config)
    assert not ok and code == "worse" and "absrel 0.1300 > running 0.1000" in reason
    ok, code, reason = rover.compare_metrics({"absrel": 0.05, "delta1": 0.80}, running, config)
    assert not ok and code == "worse" and "delta1" in reason and "absrel" not in reason
    assert rover.compare_metrics({"absrel": 0.4, "delta1": 0.5}, None, config)[:2] == (True, "first_model")
    assert rover.compare_metrics({"absrel": 0.6, "delta1": 0.5}, None, config)[:2] == (False, "too_inaccurate")
    assert rover.compare_metrics({"absrel": math.nan, "delta1": math.nan}, running, config)[1] == "no_holdout"
    with pytest.raises(ValueError, match="tolerance_absrel"):
        rover.GateConfig(tolerance_absrel=-1.0).validate()
    with pytest.raises(ValueError, match="exporter"):
        rover.GateConfig(exporter="tflite").validate()


def _frame_scores(absrel: np.ndarray, delta1: np.ndarray, pixels: int = 1000) -> rover.FrameScores:
    """Per-frame scores of a model with these per-frame AbsRel and delta1 (``pixels`` valid pixels a frame)."""
    n = np.full(len(absrel), float(pixels))
    return rover.FrameScores(n, np.asarray(absrel) * n, np.asarray(delta1) * n)


def test_worse_by_is_the_pooled_difference_at_confidence_zero_and_a_lower_bound_above():
    rng = np.random.default_rng(3)
    running = _frame_scores(np.full(10, 0.20), np.full(10, 0.70))
    steady = _frame_scores(0.25 + rng.normal(0, 0.002, 10), 0.65 + rng.normal(0, 0.002, 10))
    point = rover.worse_by(steady, running, 0.0)
    assert point["absrel"] == pytest.approx(float(np.mean(steady.absrel_sum / 1000)) - 0.20)
    assert point["delta1"] == pytest.approx(0.70 - float(np.mean(steady.delta1_count / 1000)))
    sure = rover.worse_by(steady, running, 0.9)
    assert 0.045 < sure["absrel"] < point["absrel"] and 0.045 < sure["delta1"] < point["delta1"]
    assert rover.worse_by(steady, running, 0.9) == sure  # a fixed seed: a decision replays
    assert rover.worse_by(steady, running, 0.99)["absrel"] <= sure["absrel"]
    with pytest.raises(ValueError, match="confidence"):
        rover.worse_by(steady, running, 1.0)
    with pytest.raises(ValueError, match="same frames"):
        rover.worse_by(_frame_scores(np.full(9, 0.2), np.full(9, 0.7)), running, 0.9)
    nothing = rover.FrameScores(np.zeros(3), np.zeros(3), np.zeros(3))
    assert math.isnan(rover.worse_by(nothing, nothing, 0.9)["absrel"])


def test_worse_by_resamples_in_chunks_without_changing_the_answer(monkeypatch):
    from forest_perception.collab.rover import gate

    rng = np.random.default_rng(5)
    running = _frame_scores(np.full(50, 0.2), np.full(50, 0.7))
    candidate = _frame_scores(0.2 + rng.normal(0.01, 0.05, 50), 0.7 + rng.normal(0, 0.05, 50))
    whole = rover.worse_by(candidate, running, 0.9, draws=300)
    monkeypatch.setattr(gate, "BOOTSTRAP_CELLS", 120)  # two draws of 50 frames at a time
    assert rover.worse_by(candidate, running, 0.9, draws=300) == pytest.approx(whole, abs=1e-12)


def _segment_scores(absrel: np.ndarray, delta1: np.ndarray, segments: np.ndarray) -> rover.FrameScores:
    plain = _frame_scores(absrel, delta1)
    return rover.FrameScores(plain.pixels, plain.absrel_sum, plain.delta1_count, np.asarray(segments))


def test_worse_by_resamples_segments_so_one_bad_segment_is_not_a_loss_everywhere(monkeypatch):
    """Worse on one of four held-out drives, a little better on the other three: frames alone look like a sure loss."""
    from forest_perception.collab.rover import gate

    rng = np.random.default_rng(11)
    segments = np.repeat(np.arange(4), 20)
    change = np.where(segments == 0, 0.08, -0.01) + rng.normal(0, 0.002, 80)
    running = _segment_scores(np.full(80, 0.2), np.full(80, 0.7), segments)
    candidate = _segment_scores(0.2 + change, np.full(80, 0.7), segments)
    as_frames = rover.worse_by(_frame_scores(0.2 + change, np.full(80, 0.7)), _frame_scores(np.full(80, 0.2),
                                                                                           np.full(80, 0.7)), 0.9)
    by_segment = rover.worse_by(candidate, running, 0.9)
    assert as_frames["absrel"] > 0.005  # 80 frames that look independent: worse, with 90 % confidence
    assert by_segment["absrel"] < 0.0  # four drives, one of them bad: not shown to be worse
    assert rover.worse_by(candidate, running, 0.0) == pytest.approx(rover.worse_by(
        _frame_scores(0.2 + change, np.full(80, 0.7)), _frame_scores(np.full(80, 0.2), np.full(80, 0.7)), 0.0))

    # worse on every drive: still refused with segments resampled
    everywhere = _segment_scores(0.2 + 0.02 + rng.normal(0, 0.005, 80), np.full(80, 0.7), segments)
    assert rover.worse_by(everywhere, running, 0.9)["absrel"] > 0.015

    # the answer does not depend on how many draws are held at once
    whole = rover.worse_by(candidate, running, 0.9, draws=300)
    monkeypatch.setattr(gate, "BOOTSTRAP_CELLS", 170)  # two draws of 80 frames at a time
    assert rover.worse_by(candidate, running, 0.9, draws=300) == pytest.approx(whole, abs=1e-12)

    with pytest.raises(ValueError, match="segments"):
        rover.worse_by(candidate, _frame_scores(np.full(80, 0.2), np.full(80, 0.7)), 0.9)
    with pytest.raises(ValueError, match="segments"):
        rover.worse_by(candidate, _segment_scores(np.full(80, 0.2), np.full(80, 0.7), segments[::-1]), 0.9)
    with pytest.raises(ValueError, match="segment labels"):
        short = _segment_scores(0.2 + change, np.full(80, 0.7), segments)
        short = rover.FrameScores(short.pixels, short.absrel_sum, short.delta1_count, segments[:10])
        rover.worse_by(short, rover.FrameScores(running.pixels, running.absrel_sum, running.delta1_count,
                                                segments[:10]), 0.9)


def test_worse_by_resamples_a_lone_segment_in_runs_of_consecutive_frames():
    """One held-out drive, worse on its first quarter and a little better after: frames alone look like a sure loss."""
    from forest_perception.collab.rover import gate
    from forest_perception.models import bootstrap

    rng = np.random.default_rng(12)
    change = np.where(np.arange(80) < 20, 0.08, -0.01) + rng.normal(0, 0.002, 80)
    one_drive = np.zeros(80, dtype=np.int64)
    running = _segment_scores(np.full(80, 0.2), np.full(80, 0.7), one_drive)
    candidate = _segment_scores(0.2 + change, np.full(80, 0.7), one_drive)
    as_frames = rover.worse_by(_frame_scores(0.2 + change, np.full(80, 0.7)), _frame_scores(np.full(80, 0.2),
                                                                                           np.full(80, 0.7)), 0.9)
    in_runs = rover.worse_by(candidate, running, 0.9)
    assert as_frames["absrel"] > 0.005  # 80 frames taken as independent: worse, with 90 % confidence
    assert in_runs["absrel"] < 0.0  # one bad stretch of the drive: not shown to be worse
    groups = gate._segment_groups(candidate, running, np.ones(80, dtype=bool))
    assert len(groups) == bootstrap.SINGLE_SEGMENT_BLOCKS and np.array_equal(np.concatenate(groups), np.arange(80))
    assert all(np.array_equal(g, np.arange(g[0], g[-1] + 1)) for g in groups)  # runs of consecutive frames
    # worse all along the drive: still refused
    everywhere = _segment_scores(0.2 + 0.02 + rng.normal(0, 0.005, 80), np.full(80, 0.7), one_drive)
    assert rover.worse_by(everywhere, running, 0.9)["absrel"] > 0.015
    # fewer frames than blocks: one frame a block, the plain bootstrap over frames
    few = _segment_scores(np.full(5, 0.2), np.full(5, 0.7), np.zeros(5, dtype=np.int64))
    assert len(gate._segment_groups(few, few, np.ones(5, dtype=bool))) == 5


def test_score_engines_labels_each_frame_with_its_held_out_segment(dataset, running_models):
    from forest_perception.inference import load_engine

    _, _, held = dataset
    holdout = rover.make_holdout(held)
    engines = {"a": load_engine(running_models[2.5], threads=1), "b": load_engine(running_models[3.0], threads=1)}
    _, scores = rover.score_engines(engines, holdout, 0.1, 10.0)
    expected = np.asarray([segment for segment, _ in holdout.frames])
    assert len(set(expected.tolist())) == len(held) >= 2
    for name in engines:
        assert np.array_equal(scores[name].segments, expected) and scores[name].pixels.size == len(holdout)
    assert np.isfinite(rover.worse_by(scores["b"], scores["a"], 0.9)["absrel"])


def test_gate_needs_more_frames_to_refuse_a_small_noisy_loss():
    """A candidate 0.02 worse on average but better on many frames: a few frames cannot show it, many can."""
    config = rover.GateConfig(tolerance_absrel=0.0, tolerance_delta1=0.01, confidence=0.9)

    def case(frames: int) -> tuple[dict, dict, tuple]:
        rng = np.random.default_rng(frames)
        diff = rng.normal(0.0, 0.1, frames)
        diff += 0.02 - diff.mean()  # exactly 0.02 worse over these frames, pixels pooled
        running = _frame_scores(np.full(frames, 0.2), np.full(frames, 0.7))
        candidate = _frame_scores(0.2 + diff, np.full(frames, 0.7))
        metrics = ({"absrel": 0.22, "delta1": 0.7}, {"absrel": 0.2, "delta1": 0.7})
        return metrics[0], metrics[1], (candidate, running)

    candidate, running, few = case(8)
    ok, code, reason = rover.compare_metrics(candidate, running, config, few)
    assert ok and code == "accepted" and "not with 90 % confidence over 8 frames" in reason
    # the same figures compared as they are (confidence 0, or no per-frame scores): refused
    as_is = dataclasses.replace(config, confidence=0.0)
    assert rover.compare_metrics(candidate, running, as_is, few)[:2] == (False, "worse")
    assert rover.compare_metrics(candidate, running, config)[:2] == (False, "worse")
    candidate, running, many = case(400)
    ok, code, reason = rover.compare_metrics(candidate, running, config, many)
    assert not ok and code == "worse" and "with 90 % confidence over 400 frames" in reason
    with pytest.raises(ValueError, match="confidence"):
        rover.GateConfig(confidence=1.0).validate()


def test_gate_accepts_a_better_model_and_refuses_worse_and_broken_ones(tmp_path, dataset, running_models):
    _, _, held = dataset
    holdout = rover.make_holdout(held)
    models_dir = tmp_path / "models"
    gate = rover.ValidationGate(models_dir, rover.GateConfig(exporter="torchscript", keep_refused=1))

    better = gate.check(constant_model(3.0, server_round=4), running_models[2.5], holdout, _task())
    assert better.accepted and better.code == "accepted", better.reason
    assert better.label == "global-r000004" and better.round == 4
    assert better.candidate_metrics["absrel"] < 0.01 and better.running_metrics["absrel"] > 0.1
    published = Path(better.model_path)
    assert published.parent == models_dir and published.is_file() and published.name.startswith("global-r000004-")
    card = json.loads(published.with_suffix(".json").read_text())
    assert card["version"] == better.model_version and card["metrics"]["absrel"] == pytest.approx(
        better.candidate_metrics["absrel"])
    assert "accepted" in published.with_suffix(".md").read_text()
    assert not [p for p in models_dir.iterdir() if p.name.startswith(".")]  # no staging left behind

    # random weights (another seed) are worse than the running model
    random_model = rover.initial_model(_task(seed=5))
    random_model.round = 5
    worse = gate.check(random_model, published, holdout, _task())
    assert not worse.accepted and worse.code == "worse" and "absrel" in worse.reason
    assert worse.running_model == str(published)
    refused = Path(worse.model_path)
    assert refused.parent == models_dir / "refused" and refused.is_file()
    assert json.loads(refused.with_suffix(".decision.json").read_text())["code"] == "worse"
    assert sorted(p.name for p in models_dir.glob("*.onnx")) == [published.name]

    corrupt = tmp_path / "global-r000006.npz"
    corrupt.write_bytes(os.urandom(2000))
    broken = gate.check(corrupt, published, holdout, _task())
    assert not broken.accepted and broken.code == "unreadable" and "global-r000006.npz" in broken.reason
    assert broken.model_path == ""

    nan_model = constant_model(3.0, server_round=7)
    nan_model.arrays[0] = nan_model.arrays[0].copy()
    nan_model.arrays[0].flat[0] = np.nan
    with_nan = gate.check(nan_model, published, holdout, _task())
    assert with_nan.code == "unreadable" and "NaN" in with_nan.reason
    wider = rover.initial_model(_task(base_channels=8))
    wider.meta = {}  # a model without architecture meta is read as the rover's own (4 channels): does not fit
    mismatch = gate.check(wider, published, holdout, _task(), label="wider")
    assert mismatch.code == "unreadable" and "shape" in mismatch.reason

    nothing = gate.check(constant_model(3.0), published, rover.make_holdout([]), _task())
    assert nothing.code == "no_holdout" and "two recorded segments" in nothing.reason
    assert sorted(p.name for p in models_dir.glob("*.onnx")) == [published.name]


def test_gate_tolerance_and_no_running_model(tmp_path, dataset, running_models):
    _, _, held = dataset
    holdout = rover.make_holdout(held)
    slightly_worse = constant_model(2.85)  # absrel 0.05 against a perfect running model
    lenient = rover.ValidationGate(tmp_path, rover.GateConfig(exporter="torchscript", tolerance_absrel=0.1))
    decision = lenient.check(slightly_worse, running_models[3.0], holdout, _task(), label="lenient")
    assert decision.accepted and decision.candidate_metrics["absrel"] == pytest.approx(0.05, abs=0.002)
    strict = rover.ValidationGate(tmp_path, rover.GateConfig(exporter="torchscript", tolerance_absrel=0.01))
    decision = strict.check(slightly_worse, running_models[3.0], holdout, _task(), label="strict")
    assert not decision.accepted and "tolerance 0.01" in decision.reason
    # worse on every frame: sure of it at the default 90 %, by about the whole 0.05
    assert decision.worse_by["confidence"] == 0.9 and 0.04 < decision.worse_by["absrel"] <= 0.051
    # nothing to compare with (the depth node runs no model, or one that does not load): accepted, said so
    first = strict.check(slightly_worse, str(tmp_path / "gone.onnx"), holdout, _task(), label="first")
    assert first.accepted and first.code == "first_model" and "gone.onnx" in first.reason


# ---------------------------------------------------------------------------------------------- local training


def test_local_training_uses_training_segments_and_returns_the_trained_model(dataset):
    from forest_perception.collab.flower.task import evaluate

    _, train, held = dataset
    task = _task(local_epochs=2)
    data = rover.build_local_data(train, held, task)
    assert data.num_train == sum(len(s) for s in train) and data.num_val == sum(len(s) for s in held)
    assert not data.val_is_train
    base = constant_model(2.5)
    result = rover.train_locally(base, data, task, seed=1)
    assert result.metrics["steps"] == 2 * math.ceil(data.num_train / task.batch_size)
    assert all(math.isfinite(result.metrics[k]) for k in ("train-loss", "val-loss", "absrel", "delta1"))
    changed = [n for n, a, b in zip(base.names, base.arrays, result.model.arrays) if not np.array_equal(a, b)]
    assert changed and result.model.names == base.names
    # the returned model is the one that was evaluated: its held-out AbsRel matches the round's report
    network, _, config = rover.build_network(result.model, task)
    assert evaluate(network, data.val_images, data.val_depth, config)["absrel"] == pytest.approx(
        result.metrics["absrel"], rel=1e-4)
    with pytest.raises(ValueError, match="no training frames"):
        rover.build_local_data([], held, task)


# ---------------------------------------------------------------------------------------------- idleness, ledger


def test_idle_detector():
    idle = rover.IdleDetector(idle_speed_mps=0.05, idle_seconds=2.0, odom_timeout_s=0.5)
    assert idle.state(0.0) == (False, "no odometry received yet")
    idle.update(0.0, 0.8)
    ok, why = idle.state(0.1)
    assert not ok and "moving at 0.80 m/s" in why
    for t in np.arange(0.1, 1.5, 0.1):
        idle.update(float(t), 0.01)
    ok, why = idle.state(1.45)
    assert not ok and "stopped for 1.4 s of the 2.0 s" in why
    for t in np.arange(1.5, 2.3, 0.1):
        idle.update(float(t), 0.0)
    assert idle.state(2.25)[0]
    ok, why = idle.state(3.0)  # odometry went quiet: may be driving blind
    assert not ok and "no odometry for" in why
    idle.update(1.0, 0.0)  # time went backwards (simulation reset): history forgotten
    assert not idle.state(1.0)[0]
    with pytest.raises(ValueError, match="finite"):
        idle.update(5.0, math.nan)
    assert rover.odometry_speed((3.0, 4.0, 0.0)) == pytest.approx(5.0)
    assert rover.train_permission(False, "moving", True, "")[0] is False
    assert rover.train_permission(False, "moving", False, "")[0] is True
    assert rover.train_permission(True, "", True, "gating global-r000003") == (False, "busy: gating global-r000003")


def test_ledger_survives_restarts_and_damage(tmp_path):
    ledger = rover.DeploymentLedger(tmp_path)
    model = constant_model(3.0, server_round=2)
    decision = rover.GateDecision(True, "accepted", "better", "global-r000002", 2, str(tmp_path / "m.onnx"), "v1",
                                  {"absrel": math.nan})
    ledger.record("drop:abc", decision, deployed=True, model=model)
    ledger.record("drop:def", rover.GateDecision(False, "worse", "worse", "global-r000003", 3), deployed=False)
    again = rover.DeploymentLedger(tmp_path)
    assert again.seen("drop:abc") and again.seen("drop:def") and not again.seen("drop:xyz")
    assert again.current["model_version"] == "v1" and again.current["round"] == 2
    assert again.decisions[0]["candidate_metrics"]["absrel"] is None  # NaN stored as null
    current = again.current_model()
    assert current.round == 2 and all(np.array_equal(a, b) for a, b in zip(current.arrays, model.arrays))
    (tmp_path / rover.LEDGER_FILE).write_text("{ not json")
    with pytest.warns(UserWarning, match="unreadable"):
        damaged = rover.DeploymentLedger(tmp_path)
    assert damaged.current is None and list(tmp_path.glob(f"{rover.LEDGER_FILE}.damaged-*"))


def test_prune_accepted_keeps_the_newest_and_the_deployed(tmp_path):
    for i, name in enumerate(("old", "deployed", "mid", "new")):
        for ext in (".onnx", ".json", ".md"):
            path = tmp_path / f"{name}{ext}"
            path.write_text(name)
            os.utime(path, ns=(10**18 + i * 10**9, 10**18 + i * 10**9))
    (tmp_path / "refused").mkdir()
    (tmp_path / "refused" / "x.onnx").write_text("refused ones are pruned by the gate")
    deleted = rover.prune_accepted(tmp_path, keep=1, protect={str(tmp_path / "deployed.onnx")})
    assert sorted(p.name for p in deleted) == ["mid.onnx", "old.onnx"]
    assert sorted(p.name for p in tmp_path.glob("*.*")) == [
        "deployed.json", "deployed.md", "deployed.onnx", "new.json", "new.md", "new.onnx"]
    assert (tmp_path / "refused" / "x.onnx").is_file()


# ---------------------------------------------------------------------------------------------- collab_node's cores


def node_params(root: Path, out: Path, **overrides) -> dict:
    """collab_node's parameter values (its defaults where they matter) for a rover recording into ``root``."""
    return {
        "dataset_dir": str(root), "models_dir": str(out / "deployed"), "model_source": str(out / "incoming"),
        "depth_node": "depth_node", "holdout_fraction": 0.5, "holdout_seed": 0, "max_holdout_frames": 200,
        "gate_tolerance_absrel": 0.0, "gate_tolerance_delta1": 0.01, "gate_max_absrel": 1.0,
        "gate_confidence": 0.9,
        "onnx_exporter": "torchscript", "keep_refused": 3, "keep_accepted": 5, "train_only_when_idle": True,
        "idle_speed_mps": 0.05, "idle_seconds": 10.0, "odom_timeout_s": 1.0, "auto_train_min_new_frames": 0,
        "model": "autoencoder", "base_channels": 4, "input_height": HW[0], "input_width": HW[1], "min_depth_m": 0.1,
        "max_depth_m": 10.0, "batch_size": 4, "local_epochs": 1, "local_steps": 0, "lr": 1e-3,
        "max_train_frames": 2000, "torch_threads": 1, "restore_on_start": True, "service_timeout_s": 1.0,
        "superlink_address": "127.0.0.1:8000", "root_certificates": "", "auth_private_key": "", "rover_id": "",
        "supernode_executable": "flower-supernode", "supernode_log": "", **overrides,
    }


class FakeDepthNode:
    """The depth node's model_path as collab_node reaches it: read, set (refusing paths that do not exist), or away."""

    def __init__(self, model_path: str) -> None:
        self.model_path = model_path
        self.away = False

    def get(self) -> str:
        if self.away:
            raise RuntimeError("service depth_node/get_parameters not available after 1.0 s")
        return self.model_path

    def set(self, path: str) -> tuple[bool, str]:
        if not Path(path).is_file():
            return False, f"{path} does not exist"
        self.model_path = path
        return True, ""


def test_node_settings_name_the_bad_parameter(tmp_path, dataset):
    from forest_perception.collab.rover import settings

    root = dataset[0]
    assert settings.parameter_problem(node_params(root, tmp_path)) == ""
    assert "multiple of 16" in settings.parameter_problem(node_params(root, tmp_path, input_height=50))
    assert "model must be one of" in settings.parameter_problem(node_params(root, tmp_path, model="unet"))
    assert "below max_depth_m" in settings.parameter_problem(node_params(root, tmp_path, min_depth_m=20.0))
    assert settings.task_config(node_params(root, tmp_path)).input_hw == HW
    assert settings.gate_config(node_params(root, tmp_path)).validate().exporter == "torchscript"
    assert settings.supernode_rover_id(node_params(root, tmp_path), "/rover_3") == "rover_3"
    assert "TLS" in settings.supernode_problem(node_params(root, tmp_path), "rover_3")
    assert "not a rover id" in settings.supernode_problem(node_params(root, tmp_path), "rover 3")
    missing = node_params(root, tmp_path, root_certificates=str(tmp_path / "ca.crt"),
                          auth_private_key=str(tmp_path / "auth.key"))
    assert str(tmp_path / "ca.crt") in settings.supernode_problem(missing, "rover_3")


def test_agent_syncs_gates_deploys_and_reports_without_ros(tmp_path, dataset, running_models):
    import logging

    from forest_perception.collab.rover.agent import CollabAgent
    from forest_perception.collab.rover.status import collab_health, status_text

    depth = FakeDepthNode(running_models[2.5])
    changes = []
    agent = CollabAgent(node_params(dataset[0], tmp_path), depth.get, depth.set, logging.getLogger("test"),
                        now=lambda: 100.0, on_change=lambda: changes.append(agent.state))
    supernode = {"enabled": False, "state": "stopped"}
    job = agent.poll()  # first: learn what the depth node runs
    assert job == ("sync", None) and agent.poll() is None  # one job at a time
    agent.run(job)
    assert agent.running_model == running_models[2.5] and changes == ["syncing", "idle"]

    better = constant_model(3.0, server_round=1)
    rover.write_global_model(tmp_path / "incoming", 1, better.names, better.arrays, rover.task_meta(_task()))
    job = agent.poll()
    assert job[0] == "gate" and job[1].round == 1
    refused, message = agent.request_training("test")
    assert refused is None and "busy: gate queued" in message
    agent.run(job)
    decision = agent.last_decision
    assert decision["accepted"] and decision["deployed"] and depth.model_path == decision["model_path"]
    assert agent.counts["accepted"] == agent.counts["deployed"] == 1 and agent.ledger.seen(job[1].key)
    assert agent.poll() is None  # decided once
    status = agent.status(supernode)
    assert status["round"] == 1 and status["model_path"] == decision["model_path"] and status["dataset"]["frames"] == 16
    assert json.loads(status_text(status))["last_gate"]["code"] == "accepted"
    level, message, values = collab_health(status)
    assert level == b"\x00" and values["count_deployed"] == 1

    # odometry: a malformed sample is counted; without recent odometry the rover may not train
    assert "3 components" in agent.odometry((1.0, 2.0))
    assert agent.counts["odom_malformed"] == 1
    job, message = agent.request_training("test")
    assert job is None and "no odometry" in message

    # the depth node goes away: ERROR with the reason, and the candidate waits for it
    depth.away = True
    worse = rover.initial_model(_task(seed=3))
    rover.write_global_model(tmp_path / "incoming", 2, worse.names, worse.arrays, rover.task_meta(_task()))
    agent.run(agent.poll())
    level, message, _ = collab_health(agent.status(supernode))
    assert level == b"\x02" and message.startswith("depth node: ") and agent.last_decision["label"].endswith("1")
    assert agent.poll() is None  # retried after service_timeout_s, not at once


def test_a_missing_dataset_dir_and_an_unusable_models_dir_are_said(tmp_path, dataset):
    import logging

    from forest_perception.collab.rover import settings
    from forest_perception.collab.rover.agent import CollabAgent
    from forest_perception.collab.rover.status import collab_health

    afile = tmp_path / "afile"
    afile.write_text("x")
    problem = settings.parameter_problem(node_params(dataset[0], tmp_path, models_dir=str(afile / "models")))
    assert "models_dir" in problem and "is a file" in problem
    missing = tmp_path / "never_recorded"
    depth = FakeDepthNode("")
    agent = CollabAgent(node_params(missing, tmp_path), depth.get, depth.set, logging.getLogger("test"),
                        now=lambda: 100.0)
    agent.poll()
    level, message, _ = collab_health(agent.status({"enabled": False, "state": "stopped"}))
    assert level == b"\x01" and str(missing) in message and "does not exist" in message


def test_a_depth_node_still_choosing_its_model_makes_the_gate_wait_not_fail(tmp_path, dataset, running_models):
    import logging

    from forest_perception.collab.rover.agent import CollabAgent

    depth = FakeDepthNode("")  # depth_node with no parameters before its first camera frame
    agent = CollabAgent(node_params(dataset[0], tmp_path), depth.get, depth.set, logging.getLogger("test"),
                        now=lambda: 100.0)
    better = constant_model(3.0, server_round=1)
    rover.write_global_model(tmp_path / "incoming", 1, better.names, better.arrays, rover.task_meta(_task()))
    agent.run(agent.poll())  # the first sync finds no model: later
    job = agent.poll()
    while job is not None and job[0] != "gate":
        agent.run(job)
        job = agent.poll()
    if job is not None:
        agent.run(job)
    assert agent.counts["accepted"] == agent.counts["refused"] == 0 and agent.fault == ""
    assert not agent.last_decision  # nothing decided: the candidate waits for a running model to compare with
    depth.model_path = running_models[2.5]  # the first frame came: the chosen file is in model_path
    agent._retry_after.clear()
    for _ in range(4):
        job = agent.poll()
        if job is None:
            break
        agent.run(job)
    assert agent.counts["accepted"] == 1 and depth.model_path == agent.last_decision["model_path"]


def test_agent_runs_what_the_release_server_assigns_and_reports_back(tmp_path, dataset, running_models, wait):
    """A release through the whole rover path: announced, pulled, verified, gated, hot-swapped, health reported;
    a worse one is refused and the coordinator rolls it back by itself; local rollback, switch back, withdrawal."""
    import logging
    import time

    from forest_perception.collab.deploy.certs import make_deployment_certs
    from forest_perception.collab.deploy.processes import free_ports
    from forest_perception.collab.release.client import ReleaseClient
    from forest_perception.collab.release.registry import ReleaseRegistry, RoverInfo, Thresholds
    from forest_perception.collab.release.server import ReleaseServer, server_certificate
    from forest_perception.collab.rover.agent import CollabAgent
    from forest_perception.collab.rover.releases import ReleaseSource
    from forest_perception.models.export import write_model_card

    def release_file(depth: float) -> Path:
        path = tmp_path / "exports" / f"const_{depth}" / f"const_{depth}.onnx"
        path.parent.mkdir(parents=True)
        shutil.copyfile(running_models[depth], path)
        write_model_card(path, {"notes": f"constant {depth} m"})
        return path

    certs = make_deployment_certs(tmp_path / "certs", ["rover_0"])
    registry = ReleaseRegistry(tmp_path / "registry")
    better = registry.create(release_file(3.0))["release"]  # the walls are 3 m away
    worse = registry.create(release_file(2.5))["release"]
    cert, key = server_certificate(certs.root)
    server = ReleaseServer(registry, port=free_ports(1)[0], certfile=cert, keyfile=key,
                           log_level="critical").start()
    params = node_params(dataset[0], tmp_path)
    client = ReleaseClient(server.url, RoverInfo("rover_0"), Path(params["models_dir"]) / "releases",
                           registry.public_key_path, certs.ca_cert)
    source = ReleaseSource(client, lambda: {"latency_ms": 5.0, "rate_hz": 15.0, "crashes": 0.0}, wait_s=0.5,
                           report_period_s=0.2).start()
    depth = FakeDepthNode(running_models[2.5])
    agent = CollabAgent(params, depth.get, depth.set, logging.getLogger("test"), source=source)
    try:
        agent.run(agent.poll())  # sync with the depth node
        assert wait(lambda: source.announcement is not None, timeout=20.0)
        assert agent.poll() is None  # no release for this rover: nothing to do

        registry.promote(better, thresholds=Thresholds(soak_s=0, min_reports=1))
        job = wait(agent.poll, timeout=20.0)
        assert job, "no job came"
        assert job[0] == "gate" and job[1].label == better
        agent.run(job)
        assert agent.last_decision["accepted"] and agent.last_decision["deployed"]
        assert depth.model_path == agent.last_decision["model_path"]
        assert wait(lambda: registry.status()["rollouts"][0]["state"] == "done", timeout=20.0)
        assert registry.status()["rovers"][0]["running"] == better

        registry.promote(worse, thresholds=Thresholds(soak_s=0, min_reports=1))
        job = wait(agent.poll, timeout=20.0)
        assert job, "no job came"
        agent.run(job)
        assert not agent.last_decision["accepted"] and depth.model_path.endswith(".onnx")
        assert wait(lambda: registry.status()["rollouts"][1]["state"] == "rolled_back", timeout=20.0)
        assert "rover_0 refused it: worse" in registry.status()["rollouts"][1]["reason"]
        deployed = depth.model_path

        job, message = agent.request_rollback()  # the instant local rollback: the model before the release
        assert job == ("rollback", None) and agent.request_rollback()[0] is None  # one at a time
        agent.run(job)
        assert depth.model_path == running_models[2.5] and agent.counts["rollbacks"] == 1, message
        time.sleep(0.3)
        assert agent.poll() is None  # still assigned, but declined here until the coordinator moves on
        registry.rollback(better)
        assert wait(lambda: source.announcement.release is None, timeout=20.0)
        assert agent.poll() is None  # already on the model before releases
        registry.promote(better)  # assigned again: gated before, so switched to at once
        job = wait(agent.poll, timeout=20.0)
        assert job, "no job came"
        assert job[0] == "switch"
        agent.run(job)
        assert depth.model_path == deployed and agent.counts["switches"] == 2
        registry.rollback(better)  # withdrawn: back to what ran before any release
        job = wait(agent.poll, timeout=20.0)
        assert job, "no job came"
        agent.run(job)
        assert depth.model_path == running_models[2.5]
        assert any(e["action"] == "rolled_back" and e["actor"] == "rover:rover_0" for e in registry.audit())
    finally:
        agent.close()
        server.stop()
