"""forest-fl on bad input: one line naming the flag or file, exit 2, no traceback, inputs unchanged; a failed first
simulation leaves no half-made rover data. New subcommands and bad inputs join the table."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from forest_perception.collab.flower import cli

# (argv with {tmp} for this test's folder, words the error line must hold)
BAD_INPUT = [
    (["simulate", "--out", "{tmp}/run", "--rounds", "0"], ["--rounds", "'0'"]),
    (["simulate", "--out", "{tmp}/run", "--rovers", "0"], ["--rovers"]),
    (["simulate", "--out", "{tmp}/afile/run"], ["afile", "is a file"]),
    (["simulate", "--out", "{tmp}/run", "--availability", "2", "3"], ["--availability", "'2'"]),
    (["simulate", "--out", "{tmp}/run", "--availability", "0.9", "0.1"], ["--availability", "LO"]),
    (["simulate", "--out", "{tmp}/run", "--fault", "x=nan"], ["--fault", "x=nan"]),
    (["simulate", "--out", "{tmp}/run", "--set", "novalue"], ["--set", "novalue", "KEY=VALUE"]),
    (["simulate", "--out", "{tmp}/run", "--set", "foo=1"], ["unknown run config key 'foo'"]),
    (["simulate", "--out", "{tmp}/run", "--set", "lr=fast"], ["lr"]),
    (["simulate", "--out", "{tmp}/run", "--image-size", "80"], ["--image-size", "WIDTHxHEIGHT"]),
    (["prepare", "--out", "{tmp}/run", "--frames", "-1"], ["--frames"]),
    (["status", "--db", "{tmp}/none.db"], ["--db", "none.db"]),
    (["status", "--db", "{tmp}/garbage.db"], ["--db", "garbage.db", "not a readable coordinator store"]),
    (["certs", "--out", "{tmp}/certs", "--days", "0"], ["--days"]),
    (["certs", "--out", "{tmp}/afile"], ["afile", "is a file"]),
    (["deploy", "--certs", "{tmp}/nocerts", "--run-dir", "{tmp}/dep", "--rover", "r=x"], ["--certs", "nocerts"]),
    (["deploy", "--certs", "{tmp}/certs_in", "--run-dir", "{tmp}/dep", "--rover", "rover_0"], ["--rover", "ID=DATA"]),
    (["deploy", "--certs", "{tmp}/certs_in", "--run-dir", "{tmp}/dep"], ["--rover", "--virtual-rovers"]),
    (["deploy", "--certs", "{tmp}/certs_in", "--run-dir", "{tmp}/dep", "--port", "70000"], ["--port"]),
    (["deploy", "--certs", "{tmp}/certs_in", "--run-dir", "{tmp}/dep", "--virtual-rovers", "1", "--set", "x=1"],
     ["unknown run config key 'x'"]),
    (["dcccl", "distil", "--data", "{tmp}/certs_in", "--out", "{tmp}/afile/mimic.pt"], ["--out", "afile"]),
    (["dcccl", "distil", "--data", "{tmp}/certs_in", "--out", "{tmp}/mimic.onnx"], ["--out", "must end in .pt"]),
    (["simulte", "--out", "{tmp}/run"], ["invalid choice", "simulte"]),
]


def _inputs(tmp: Path) -> dict[str, str]:
    (tmp / "afile").write_text("a file, not a folder")
    (tmp / "garbage.db").write_bytes(b"\x00\x01 not sqlite " * 64)
    (tmp / "certs_in").mkdir()
    (tmp / "certs_in" / "ca.crt").write_text("not a certificate")
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp.rglob("*") if p.is_file()}


@pytest.mark.parametrize(("argv", "words"), BAD_INPUT, ids=[" ".join(a[:1] + a[3:5]) for a, _ in BAD_INPUT])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(argv, words, tmp_path, capsys):
    before = _inputs(tmp_path)
    status = cli.main([a.format(tmp=tmp_path) for a in argv])
    out, err = capsys.readouterr()
    assert status == 2, out + err
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.startswith("forest-fl")]
    assert len(lines) == 1 and ": error: " in lines[0], err
    for word in words:
        assert word in lines[0], (word, lines[0])
    after = {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before, "an input file changed or a new file was written"


@pytest.mark.parametrize("command", ["simulate", "prepare", "status", "certs", "deploy"])
def test_help_shows_defaults(command, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    if command in ("simulate", "prepare", "certs", "deploy"):
        assert "(default: " in text


def test_a_failed_first_simulation_removes_the_rover_data_it_began(tmp_path, monkeypatch, capsys):
    from forest_perception.collab.flower import simulation

    def fails_after_the_data(spec):  # noqa: ANN001, ANN202 - stands in for run_simulation
        simulation.prepare_population(spec)
        assert (Path(spec.out_dir) / "rovers").is_dir()
        raise RuntimeError("flwr run failed with code 1: a rover crashed")

    monkeypatch.setattr(simulation, "run_simulation", fails_after_the_data)
    status = cli.main(["simulate", "--out", str(tmp_path / "run"), "--rovers", "2", "--frames", "2",
                       "--image-size", "32x16"])
    err = capsys.readouterr().err
    assert status == 2 and "a rover crashed" in err and "removed the rover data" in err
    assert not (tmp_path / "run" / "rovers").exists()
    # rover data that were there before a run are kept
    (tmp_path / "run2" / "rovers").mkdir(parents=True)
    (tmp_path / "run2" / "rovers" / "keep.txt").write_text("earlier")
    status = cli.main(["simulate", "--out", str(tmp_path / "run2"), "--rovers", "2", "--frames", "2",
                       "--image-size", "32x16"])
    assert status == 2 and (tmp_path / "run2" / "rovers" / "keep.txt").read_text() == "earlier"
