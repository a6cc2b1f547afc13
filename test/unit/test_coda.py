"""CoDA core: descriptors from the depth encoder, the cloud's exact index and coarse match, the rover's own-vs-outside
classifier, the bytes each arm costs, and what is refused or handled when the pool or the rover has nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_flower_real_network import HW, write_segment

from forest_perception.collab import coda
from forest_perception.models.networks import AutoEncoderDepth

DIM = 32


def unit(n: int, seed: int, centre: np.ndarray | None = None, spread: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, DIM)) * spread + (0 if centre is None else centre)
    return coda.normalise(x).astype(np.float16)


def clusters(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two clusters: the rover's frames around one direction, outside frames around another."""
    rng = np.random.default_rng(seed)
    own_dir, other_dir = rng.normal(size=DIM) * 3, rng.normal(size=DIM) * 3
    return unit(60, seed + 1, own_dir), unit(200, seed + 2, other_dir), own_dir


def test_the_index_returns_the_true_nearest_neighbours_by_cosine():
    pool = unit(500, 0)
    index = coda.PoolIndex(pool, [f"f{i}" for i in range(500)], "encoder-x")
    queries = unit(7, 1)
    rows, sims = index.search(queries, 5)
    p = coda.normalise(pool.astype(np.float32))
    brute = coda.normalise(queries.astype(np.float32)) @ p.T
    np.testing.assert_array_equal(rows, np.argsort(-brute, axis=1)[:, :5])
    np.testing.assert_allclose(sims, np.sort(brute, axis=1)[:, ::-1][:, :5], rtol=1e-5, atol=1e-5)
    # a pool row queried with itself is its own nearest neighbour
    assert index.search(pool[[42]], 1)[0][0, 0] == 42


def test_the_coarse_match_ranks_pool_rows_by_how_many_rover_frames_point_at_them():
    own, outside, _ = clusters()
    near = coda.normalise(own.astype(np.float32)[:10] + 0.05).astype(np.float16)  # ten pool rows close to the rover
    pool = np.concatenate([outside, near])
    index = coda.PoolIndex(pool, [str(i) for i in range(len(pool))], "encoder-x")
    match = index.coarse(own, 10, per_query=5)
    assert set(match.indices.tolist()) == set(range(len(outside), len(pool)))
    assert list(match.votes) == sorted(match.votes, reverse=True)
    assert index.coarse(own, 3).indices.size == 3


def test_the_classifier_separates_own_from_outside_descriptors_and_keeps_own_like_candidates():
    own, outside, own_dir = clusters()
    classifier = coda.OwnDataFilter()
    fit = classifier.fit(own, outside)
    assert fit.accuracy > 0.97 and fit.own == 60 and fit.outside == 200
    assert fit.seconds > 0 and fit.peak_bytes > 0 and 1 <= fit.iterations <= 25
    fresh_own, fresh_out = unit(30, 9, own_dir), clusters(0)[1][:30]
    assert classifier.scores(fresh_own).mean() > 0.8 > 0.2 > classifier.scores(fresh_out).mean()
    candidates = np.concatenate([fresh_out[:20], fresh_own[:5]])
    assert set(classifier.select(candidates, 5).tolist()) == set(range(20, 25))
    assert classifier.nbytes == 8 * (3 * DIM + 1)  # weights, bias, the standardisation


def test_bytes_each_arm_costs_are_counted():
    own, outside, _ = clusters()
    index = coda.PoolIndex(np.concatenate([outside, own[:20]]), [str(i) for i in range(220)], "encoder-x")
    each = 1000
    assert coda.descriptor_bytes(own) == 60 * DIM * 2
    local = coda.retrieve(index, own, "local", 8)
    assert (local.bytes_up, local.bytes_down, len(local.rows)) == (0, 0, 0)
    rand = coda.retrieve(index, own, "random", 8, seed=1, sample_bytes_each=each)
    assert (rand.bytes_up, rand.bytes_down, len(rand.rows)) == (0, 8 * each, 8)
    coarse = coda.retrieve(index, own, "coarse", 8, sample_bytes_each=each)
    assert (coarse.bytes_up, coarse.bytes_down) == (60 * DIM * 2, 8 * each)
    filtered = coda.retrieve(index, own, "coda", 8, coarse_factor=2, outside=50, sample_bytes_each=each)
    assert len(filtered.rows) == 8 and filtered.candidates == 16
    assert filtered.bytes_up == 60 * DIM * 2 + 8 * 4  # descriptors, then the kept ids
    assert filtered.bytes_down == (16 + 50) * DIM * 2 + 8 * each  # candidates' and outside descriptors, then samples
    assert set(filtered.rows.tolist()) <= set(coda.retrieve(index, own, "coarse", 16).rows.tolist())
    assert filtered.fit is not None and filtered.summary()["filter_peak_bytes"] > 0
    assert set(filtered.rows.tolist()) <= set(range(200, 220))  # the kept ones are the pool's rover-like rows


@pytest.mark.parametrize(("bad", "message"), [
    (np.zeros(DIM, np.float32), "must be a 2-D array"),
    (np.zeros((3, DIM + 1), np.float32), f"have {DIM + 1} dimensions, the index holds {DIM}"),
    (np.full((3, DIM), np.nan, np.float32), "3 of 3 descriptors hold NaN/Inf"),
    (np.zeros((3, DIM), np.int64), "must be floating point"),
])
def test_bad_descriptors_are_refused_naming_the_fault(bad, message):
    index = coda.PoolIndex(unit(10, 0), [str(i) for i in range(10)], "encoder-x")
    with pytest.raises(ValueError, match=message):
        index.search(bad, 3)
    with pytest.raises(ValueError, match="own descriptors"):
        coda.retrieve(index, bad, "coarse", 3)


def test_other_bad_input_is_refused_by_name():
    index = coda.PoolIndex(unit(10, 0), [str(i) for i in range(10)], "encoder-x")
    with pytest.raises(ValueError, match="arm must be one of local, random, coarse, coda, got 'best'"):
        coda.retrieve(index, unit(3, 1), "best", 3)
    with pytest.raises(ValueError, match="10 pool descriptors but 9 ids"):
        coda.PoolIndex(unit(10, 0), [str(i) for i in range(9)], "encoder-x")
    with pytest.raises(ValueError, match="not fitted"):
        coda.OwnDataFilter().scores(unit(2, 0))
    with pytest.raises(ValueError, match="outside descriptors: no descriptors"):
        coda.OwnDataFilter().fit(unit(3, 0), np.zeros((0, DIM), np.float32))
    with pytest.raises(ValueError, match="l2 must be a positive"):
        coda.OwnDataFilter(l2=0)
    with pytest.raises(ValueError, match="candidate images must be N x H x W x 3 uint8"):
        coda.samples_to_tensors(np.zeros((2, 4, 4, 3), np.float32), np.zeros((2, 4, 4), np.float16))


def test_an_empty_pool_or_a_rover_without_frames_gets_no_candidates():
    empty = coda.PoolIndex(np.zeros((0, DIM), np.float16), [], "encoder-x")
    assert len(empty) == 0 and empty.search(unit(3, 0), 5)[0].shape == (3, 0)
    for arm in ("random", "coarse", "coda"):
        got = coda.retrieve(empty, unit(5, 0), arm, 4)
        assert len(got.rows) == 0 and got.info["reason"] == "the cloud pool is empty"
    index = coda.PoolIndex(unit(10, 0), [str(i) for i in range(10)], "encoder-x")
    for arm in ("coarse", "coda"):
        got = coda.retrieve(index, np.zeros((0, DIM), np.float16), arm, 4)
        assert len(got.rows) == 0 and "no kept frames" in got.info["reason"] and got.bytes_up == 0
    # a pool smaller than the candidates asked for gives what it has; outside data then come from the whole pool
    small = coda.retrieve(index, unit(5, 1), "coda", 8, coarse_factor=2, outside=4)
    assert len(small.rows) == 8


def test_descriptors_index_file_and_samples_from_a_pool_folder(tmp_path):
    torch.manual_seed(0)
    encoder = coda.DescriptorEncoder(AutoEncoderDepth(base_channels=4), HW, "tiny")
    assert encoder.version.startswith("encoder-") and encoder.dim == 8 * 4 + 16 * 4
    write_segment(tmp_path / "pool", 1, "a", 3, seed=1)
    write_segment(tmp_path / "pool", 1, "b", 2, seed=2)
    (tmp_path / "empty").mkdir()
    index = coda.build_pool_index([tmp_path / "pool", tmp_path / "empty"], encoder)
    assert len(index) == 5 and index.dim == encoder.dim and index.encoder == encoder.version
    assert index.ids[3] == "pool:1b/000000"
    norms = np.linalg.norm(index.descriptors, axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=2e-3)
    path = index.save(tmp_path / "idx" / "pool.npz")
    again = coda.PoolIndex.load(path)
    assert again.ids == index.ids and again.sources == index.sources and again.input_hw == HW
    np.testing.assert_array_equal(again.search(index.descriptors[:2], 2)[0][:, 0], [0, 1])
    images, depth = again.samples([4, 0])
    assert images.shape == (2, *HW, 3) and images.dtype == np.uint8 and depth.dtype == np.float16
    assert coda.sample_bytes(images, depth) == 2 * HW[0] * HW[1] * 5
    x, d = coda.samples_to_tensors(images, depth)
    assert x.shape == (2, 3, *HW) and d.shape == (2, 1, *HW) and torch.isfinite(x).all()
    with pytest.raises(ValueError, match="outside the index's 5 rows"):
        again.samples([5])
    with pytest.raises(ValueError, match="describes 64x48 frames"):
        encoder.describe(torch.zeros(1, 3, 32, 32))
    (tmp_path / "bad.npz").write_bytes(b"not an index")
    with pytest.raises(ValueError, match="bad.npz: not readable"):
        coda.PoolIndex.load(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="missing do not exist"):
        coda.build_pool_index([tmp_path / "missing"], encoder)


def test_a_rovers_own_shared_rows_are_never_its_candidates_and_indices_join():
    own, outside, _ = clusters()
    mine = coda.normalise(own.astype(np.float32)[:5] + 0.01).astype(np.float16)  # the rover's own shared frames
    others = coda.normalise(own.astype(np.float32)[5:15] + 0.05).astype(np.float16)  # another rover's, same forest
    wide = coda.PoolIndex(outside, [f"wide:{i}" for i in range(200)], "encoder-x", ["/w"], [(0, "1a", i)
                                                                                         for i in range(200)])
    shared = coda.PoolIndex(np.concatenate([mine, others]), [f"r:{i}" for i in range(15)], "encoder-x", ["/r"],
                            [(0, "1a", i) for i in range(15)])
    pool = coda.PoolIndex.concat([wide, shared])
    assert len(pool) == 215 and pool.folders == ["/w", "/r"] and pool.sources[200] == (1, "1a", 0)
    exclude = list(range(200, 205))
    for arm in ("random", "coarse", "coda"):
        got = coda.retrieve(pool, own, arm, 10, seed=3, exclude=exclude, outside=50)
        assert len(got.rows) == 10 and not set(got.rows.tolist()) & set(exclude)
    assert set(coda.retrieve(pool, own, "coarse", 10, exclude=exclude).rows.tolist()) == set(range(205, 215))
    with pytest.raises(ValueError, match="cannot join an index of encoder-y"):
        coda.PoolIndex.concat([wide, coda.PoolIndex(outside, [str(i) for i in range(200)], "encoder-y")])


def test_the_core_imports_neither_flower_nor_ros():
    import subprocess
    import sys

    code = ("import sys\nfrom forest_perception.collab import coda\n"
            "coda.DescriptorEncoder.from_init('autoencoder_160x128')\n"
            "print(sorted(m for m in ('flwr', 'rclpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_the_gate_keeps_only_candidates_as_own_like_as_the_rovers_frames_and_possibly_none():
    own, outside, own_dir = clusters()
    like = unit(15, 7, own_dir)
    pool = coda.PoolIndex(np.concatenate([outside, like]), [str(i) for i in range(215)], "encoder-x")
    got = coda.retrieve(pool, own, "coda", 10, outside=100, gate=0.1)
    assert len(got.rows) == 10 and set(got.rows.tolist()) <= set(range(200, 215))
    assert 0 < got.info["threshold"] < 1
    foreign = coda.PoolIndex(outside, [str(i) for i in range(200)], "encoder-x")
    none = coda.retrieve(foreign, own, "coda", 10, outside=100, gate=0.1)
    assert len(none.rows) == 0 and none.bytes_up == coda.descriptor_bytes(own)  # no ids, no samples
    assert none.bytes_down == (20 + 100) * DIM * 2  # only the descriptors came down
    with pytest.raises(ValueError, match="gate must be a quantile within"):
        coda.retrieve(pool, own, "coda", 10, gate=1.5)
