"""Synthetic dataset generator and the forest-dataset CLI."""

from __future__ import annotations

import numpy as np
import pytest

from forest_perception.dataset_tools.cli import main as dataset_cli
from forest_perception.dataset_tools.layout import load_frame, read_segment
from forest_perception.dataset_tools.synth import SynthConfig, fork_available, synthesize
from forest_perception.sim.world import WorldConfig

SMALL = dict(
    runs=1,
    segments_per_run=2,
    frames_per_segment=3,
    seed=11,
    weathers=("sunny", "fog"),
    width=96,
    height=72,
    frame_interval_s=0.4,
    world=WorldConfig(size_m=24.0),
)


def test_synth_round_trips_and_is_deterministic(tmp_path):
    written = {}

    def keep(path, record, rgb, depth):
        written[(path.name, record.stem)] = (rgb.copy(), depth.copy(), record)

    report = synthesize(tmp_path / "a", SynthConfig(**SMALL), progress=False, on_frame=keep)
    assert report.frames == 6 and len(report.segments) == 2
    for seg_name in ("a", "b"):
        segment = read_segment(tmp_path / "a" / "Run-1" / seg_name)
        assert len(segment) == 3 and segment.has_gps and segment.has_encoders
        times = [f.timestamp for f in segment.frames]
        assert np.all(np.diff(times) > 0)
        for i in range(3):
            rgb, depth, record = load_frame(segment, i)
            rgb0, depth0, record0 = written[(seg_name, record.stem)]
            assert np.array_equal(rgb, rgb0)
            # 16-bit millimetres: within half a millimetre, NaN exactly where the sensor had no depth
            assert np.array_equal(np.isnan(depth), ~np.isfinite(depth0))
            ok = np.isfinite(depth0)
            assert np.abs(depth[ok] - depth0[ok]).max() <= 0.0005 + 1e-6
            assert depth[ok].min() >= 0.28 - 1e-3 and depth[ok].max() <= 10.0 + 1e-3
            assert abs(record.gps.latitude - 50.869) < 0.01
            assert 9.0 < record.imu.linear_acceleration[2] < 10.6
            assert record.extras["weather"] == ("sunny", "fog")[ord(seg_name) - ord("a")]
            assert record == record0

    synthesize(tmp_path / "b", SynthConfig(**SMALL), progress=False)
    for rel in ("Run-1/a/rgb_image/000002.png", "Run-1/b/depth_image/000001.png", "Run-1/a/metadata.csv"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


@pytest.mark.skipif(not fork_available(), reason="isolate forks child processes")
@pytest.mark.parametrize("styles", [(), ("wide", "boreal_dense")])
def test_isolated_children_write_the_same_frames_as_one_process(tmp_path, styles):
    cfg = SynthConfig(**{**SMALL, "runs": 2, "frames_per_segment": 2}, styles=styles)
    one = synthesize(tmp_path / "one", cfg, progress=False)
    forked = synthesize(tmp_path / "forked", cfg, progress=False, isolate=True)
    assert forked.frames == one.frames == 8 and len(forked.segments) == 4
    assert [e["distance_m"] for e in forked.segments] == [e["distance_m"] for e in one.segments]
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert len(files) == 4 * (1 + 2 * 2 + (1 if styles else 0))
    for rel in files:  # the run's random stream passes from child to child: every byte the same
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "forked" / rel).read_bytes(), rel


@pytest.mark.skipif(not fork_available(), reason="isolate forks child processes")
def _second_fails(root, config, r, s, *rest, **kw):
    """A render unit whose second segment fails (module level: the child process imports it by name)."""
    from forest_perception.dataset_tools import synth

    if s == 1:
        raise MemoryError("no room")
    return synth._render_unit(root, config, r, s, *rest, **kw)


def _second_dies(root, config, r, s, *rest, **kw):
    """A render unit whose second segment's process dies."""
    import os

    from forest_perception.dataset_tools import synth

    if s == 1:
        os._exit(9)
    return synth._render_unit(root, config, r, s, *rest, **kw)


def test_a_child_that_fails_or_dies_is_named_and_earlier_segments_stay(tmp_path, monkeypatch):
    from forest_perception.dataset_tools import synth

    cfg = SynthConfig(**{**SMALL, "frames_per_segment": 1}, styles=("temperate_mixed",))
    # the children come from a fork server: they see the unit function synthesize hands them, not this
    # process's monkeypatching, so the stand-ins are module-level functions the child imports
    monkeypatch.setattr(synth, "_render_unit", _second_fails)
    with pytest.raises(RuntimeError, match="rendering Run-1/b failed: MemoryError: no room"):
        synthesize(tmp_path / "a", cfg, progress=False, isolate=True)
    assert len(read_segment(tmp_path / "a" / "Run-1" / "a")) == 1

    monkeypatch.setattr(synth, "_render_unit", _second_dies)
    with pytest.raises(RuntimeError, match="rendering Run-1/b died \\(exit code 9"):
        synthesize(tmp_path / "b", cfg, progress=False, isolate=True)
    assert len(read_segment(tmp_path / "b" / "Run-1" / "a")) == 1
    with pytest.raises(ValueError, match="no on_frame"):
        synthesize(tmp_path / "c", cfg, progress=False, isolate=True, on_frame=lambda *a: None)


def test_synth_refuses_to_overwrite(tmp_path):
    cfg = SynthConfig(**{**SMALL, "segments_per_run": 1, "frames_per_segment": 1})
    synthesize(tmp_path, cfg, progress=False)
    with pytest.raises(FileExistsError):
        synthesize(tmp_path, cfg, progress=False)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--frames", "0"], "argument --frames: expected a positive integer"),
        (["--weather", "tornado"], "tornado"),
        (["--image-size", "0x240"], "image size"),
        (["--tree-density", "-1"], "argument --tree-density"),
    ],
)
def test_cli_refuses_bad_input(tmp_path, capsys, args, words):
    assert dataset_cli(["synth", "--out", str(tmp_path), "--quiet", *args]) == 2
    assert words in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "nothing is written for a refused request"


def test_cli_synth_and_info(tmp_path, capsys):
    args = ["synth", "--out", str(tmp_path), "--frames", "2", "--segments", "1", "--image-size", "64x48",
            "--size", "20", "--quiet"]
    assert dataset_cli(args) == 0
    assert "wrote 2 frames" in capsys.readouterr().out
    assert dataset_cli(["info", str(tmp_path)]) == 0
    assert "frames" in capsys.readouterr().out
