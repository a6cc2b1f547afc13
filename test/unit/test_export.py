"""ONNX export, int8 quantisation, model cards and ``forest-train export``, on small (64x96) depth networks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from forest_perception.inference import ModelLoadError, file_sha256, read_onnx_metadata, weights_sha256
from forest_perception.models.cli import main as train_cli
from forest_perception.models.export import (
    STACK_TRACE_KEY,
    ExportVerificationError,
    compare_int8,
    export_onnx,
    iter_calibration_images,
    keep_int8,
    quantize_int8,
    strip_stack_traces,
    synthetic_forest_image,
    verify_onnx,
    write_model_card,
)
from forest_perception.models.networks import build_model

INPUT_HW = (64, 96)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A training-style checkpoint of an untrained auto-encoder at 64x96."""
    torch.manual_seed(0)
    model = build_model("autoencoder", input_hw=INPUT_HW).eval()
    path = tmp_path_factory.mktemp("ckpt") / "autoencoder.pt"
    torch.save({"model_name": "autoencoder", "model_kwargs": {}, "input_hw": list(INPUT_HW),
                "state_dict": model.state_dict(), "max_depth": 10.0, "mean": [0.485, 0.456, 0.406],
                "std": [0.229, 0.224, 0.225], "metrics": {"absrel": 0.25}, "command": "forest-train train --x 1"},
               path)
    return path, model


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    """The checkpoint exported with the legacy exporter (fast; the default one is tested on its own)."""
    path, _ = checkpoint
    return export_onnx(path, tmp_path_factory.mktemp("onnx") / "autoencoder.onnx", INPUT_HW, exporter="torchscript")


@pytest.fixture(scope="module")
def frames():
    return [synthetic_forest_image(120, 160, seed=seed) for seed in range(8)]


@pytest.fixture(scope="module")
def quantised(exported, frames):
    return quantize_int8(exported, frames, exported.with_name("autoencoder_int8.onnx"))


def test_export_matches_pytorch(exported, checkpoint):
    _, model = checkpoint
    assert verify_onnx(exported.read_bytes(), model, INPUT_HW) == verify_onnx(exported, model, INPUT_HW)
    report = verify_onnx(exported, model, INPUT_HW)
    print("ONNX vs PyTorch:", report)
    assert report["max_abs_error_m"] < 1e-4


@pytest.mark.slow
def test_default_dynamo_export(checkpoint, tmp_path, monkeypatch):
    """The default exporter (torch.export based): ~30 s on first use in a process."""
    import onnx

    path, model = checkpoint
    saves, save = [], onnx.save
    monkeypatch.setattr(onnx, "save", lambda proto, f, *a, **k: (saves.append(str(f)), save(proto, f, *a, **k))[1])
    out = export_onnx(path, tmp_path / "dynamo.onnx", INPUT_HW)
    monkeypatch.undo()
    assert len(saves) == 1  # exported, stripped, verified and labelled in memory: one write of the file
    assert verify_onnx(out, model, INPUT_HW)["max_abs_error_m"] < 1e-4
    graph = onnx.load(str(out)).graph
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == [1, 3, *INPUT_HW]
    assert "BatchNormalization" not in {node.op_type for node in graph.node}
    assert read_onnx_metadata(out)["exporter"].endswith("dynamo")
    # no traceback naming this machine's folders travels with the weights
    assert not any(entry.key == STACK_TRACE_KEY for node in graph.node for entry in node.metadata_props)
    assert str(Path(__file__).resolve().parents[2]).encode() not in out.read_bytes()


def test_strip_stack_traces_drops_tracebacks_in_the_graph_and_its_branches(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    def traced(node: onnx.NodeProto) -> onnx.NodeProto:
        node.metadata_props.add(key=STACK_TRACE_KEY, value='File "/home/me/secret/net.py", line 3')
        node.metadata_props.add(key="namespace", value="encoder")
        return node

    branch = helper.make_graph([traced(helper.make_node("Identity", ["x"], ["y_then"]))], "then", [],
                               [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, [1])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["y_else"])], "else", [],
                              [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, [1])])
    graph = helper.make_graph(
        [traced(helper.make_node("Cast", ["c"], ["b"], to=TensorProto.BOOL)),
         helper.make_node("If", ["b"], ["y"], then_branch=branch, else_branch=other)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]),
              helper.make_tensor_value_info("c", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "traced.onnx"
    onnx.save(helper.make_model(graph), str(path))
    assert strip_stack_traces(path) == 2
    assert b"/home/me/secret" not in path.read_bytes()
    model = onnx.load(str(path))
    assert [[e.key for e in n.metadata_props] for n in model.graph.node] == [["namespace"], []]
    then = next(attr.g for attr in model.graph.node[1].attribute if attr.name == "then_branch")
    assert [e.key for e in then.node[0].metadata_props] == ["namespace"]
    assert strip_stack_traces(path) == 0


def test_metadata_round_trip(exported, checkpoint):
    _, model = checkpoint
    meta = read_onnx_metadata(exported)
    assert meta["model_name"] == "autoencoder"
    assert json.loads(meta["input_hw"]) == list(INPUT_HW)
    assert json.loads(meta["mean"]) == pytest.approx([0.485, 0.456, 0.406])
    assert json.loads(meta["std"]) == pytest.approx([0.229, 0.224, 0.225])
    assert float(meta["max_depth"]) == 10.0 and float(meta["min_depth"]) == pytest.approx(0.1)
    sha = weights_sha256(model.state_dict())
    assert meta["weights_sha256"] == sha and meta["version"] == f"autoencoder-{sha[:12]}"
    assert meta["train_command"] == "forest-train train --x 1"
    assert json.loads(meta["metrics"]) == {"absrel": 0.25}


def test_export_graph_is_static_and_bn_folded(exported):
    import onnx

    graph = onnx.load(str(exported)).graph
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, *INPUT_HW]
    assert "BatchNormalization" not in {node.op_type for node in graph.node}


def test_export_refuses_above_tolerance(checkpoint, tmp_path, monkeypatch, capsys):
    from forest_perception.models import export

    path, _ = checkpoint
    out = tmp_path / "strict.onnx"
    with pytest.raises(ExportVerificationError, match="tolerance"):
        export_onnx(path, out, INPUT_HW, exporter="torchscript", tolerance_m=-1.0)
    assert not out.exists() and not list(tmp_path.iterdir())
    # an earlier model under that name is kept as it was: the new file only replaces it once verified
    out.write_bytes(b"earlier model")
    monkeypatch.setattr(export, "verify_onnx", lambda *_args, **_kwargs: {"max_abs_error_m": 0.5})
    assert train_cli(["export", "--checkpoint", str(path), "--out", str(out), "--exporter", "torchscript"]) == 1
    err = capsys.readouterr().err
    assert "0.5 m > tolerance" in err and "nothing was written" in err and "Traceback" not in err
    assert out.read_bytes() == b"earlier model" and [p.name for p in tmp_path.iterdir()] == ["strict.onnx"]


def test_dynamic_batch_torchscript(checkpoint, tmp_path):
    import onnxruntime as ort

    path = export_onnx(checkpoint[0], tmp_path / "dyn.onnx", INPUT_HW, dynamic_batch=True, exporter="torchscript")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {"image": np.zeros((3, 3, *INPUT_HW), np.float32)})[0]
    assert out.shape == (3, 1, *INPUT_HW)


def test_int8_correlates_with_fp32(exported, quantised, frames):
    meta = read_onnx_metadata(quantised)
    assert "int8" in meta["quantization"] and meta["model_name"] == "autoencoder"
    depths = [np.full(frame.shape[:2], 1.4, np.float32) for frame in frames]
    report = compare_int8(exported, quantised, frames, depths, runs=5, warmup=1)
    print("int8 vs fp32:", json.dumps(report, indent=1))
    assert report["agreement"]["mean_rel_diff"] < 0.05
    assert report["size_ratio"] < 0.5
    assert "absrel" in report["fp32"]["metrics"] and "absrel" in report["int8"]["metrics"]
    keep, reason = keep_int8(report, max_absrel_increase=0.05)
    assert isinstance(keep, bool) and reason


def _quantised_weights(path) -> set[str]:
    """Names of the nodes whose weight input comes through a DequantizeLinear (i.e. is stored in int8)."""
    import onnx

    graph = onnx.load(str(path)).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {n.name for n in graph.node if n.op_type == "Conv" and n.input[1] in dequantized}


def test_int8_keeps_the_layers_reading_the_image_in_fp32(exported, quantised, frames, tmp_path):
    from forest_perception.models.export import input_layers

    first = input_layers(exported)
    assert first, "the auto-encoder has a layer reading the image"
    int8_convs = _quantised_weights(quantised)
    assert int8_convs and not int8_convs & set(first)
    assert all(name in read_onnx_metadata(quantised)["quantization"] for name in first)
    everything = quantize_int8(exported, frames, tmp_path / "all_int8.onnx", fp32_input_layers=False)
    assert set(first) <= _quantised_weights(everything)
    assert "fp32 kept" not in read_onnx_metadata(everything)["quantization"]


def test_calibration_frames_spread_over_the_whole_folder(tmp_path):
    import cv2

    for segment in "abcd":
        (tmp_path / "Run-1" / segment / "rgb_image").mkdir(parents=True)
        (tmp_path / "Run-1" / segment / "depth_image").mkdir()
        for k in range(5):
            value = 10 * ("abcd".index(segment) * 5 + k)
            cv2.imwrite(str(tmp_path / "Run-1" / segment / "rgb_image" / f"{k:06d}.png"),
                        np.full((4, 4, 3), value, np.uint8))
            cv2.imwrite(str(tmp_path / "Run-1" / segment / "depth_image" / f"{k:06d}.png"),
                        np.zeros((4, 4), np.uint16))
    picked = [int(f[0, 0, 0]) // 10 for f in iter_calibration_images(tmp_path, 4)]
    assert picked == [0, 6, 13, 19], "first and last frame, and every segment between"
    assert len(list(iter_calibration_images(tmp_path, 100))) == 20
    assert [int(f[0, 0, 0]) // 10 for f in iter_calibration_images(tmp_path, 1)] == [0]


def test_keep_int8_decision():
    base = {"fp32": {"median_ms": 10.0, "metrics": {"absrel": 0.10}}, "agreement": {"mean_rel_diff": 0.0}}
    slower_bigger = {**base, "int8": {"median_ms": 12.0, "metrics": {"absrel": 0.10}}, "speedup": 0.8,
                     "size_ratio": 1.0}
    assert keep_int8(slower_bigger)[0] is False
    assert "neither faster nor smaller" in keep_int8(slower_bigger)[1]
    worse = {**base, "int8": {"median_ms": 5.0, "metrics": {"absrel": 0.13}}, "speedup": 2.0, "size_ratio": 0.3}
    assert keep_int8(worse)[0] is False and "accuracy" in keep_int8(worse)[1]
    good = {**base, "int8": {"median_ms": 12.0, "metrics": {"absrel": 0.105}}, "speedup": 0.8, "size_ratio": 0.3}
    assert keep_int8(good)[0] is True


def test_model_card_sha_matches_file(exported):
    md = write_model_card(exported, {"params": 123, "flops": 456})
    card = json.loads(exported.with_suffix(".json").read_text())
    assert md == exported.with_suffix(".md") and md.is_file()
    assert card["sha256"] == file_sha256(exported)
    assert card["sha256"] in md.read_text()
    assert card["opset"] in (17, 18) and card["input_hw"] == list(INPUT_HW)
    assert card["train_command"] == "forest-train train --x 1" and card["params"] == 123
    assert "absrel" in md.read_text()


def test_cli_export_with_int8(checkpoint, tmp_path, capsys):
    calib = tmp_path / "calib" / "rgb_image"
    calib.mkdir(parents=True)
    import cv2

    for seed in range(4):
        cv2.imwrite(str(calib / f"{seed}.png"), synthetic_forest_image(96, 128, seed=seed))
    out = tmp_path / "cli.onnx"
    status = train_cli(["export", "--checkpoint", str(checkpoint[0]), "--out", str(out), "--exporter",
                          "torchscript", "--int8", "--calib", str(tmp_path / "calib"), "--keep-int8-anyway"])
    assert status == 0, capsys.readouterr().err
    assert out.is_file() and out.with_suffix(".md").is_file() and (tmp_path / "cli_int8.onnx").is_file()
    assert "forest-train export" in read_onnx_metadata(out)["export_command"]


def test_cli_export_path_alias(checkpoint, tmp_path, capsys):
    ckpt = tmp_path / "recorded.pt"
    saved = torch.load(checkpoint[0], weights_only=False)
    saved["command"] = f"forest-train train --data {tmp_path}/data --out {tmp_path}/run"
    torch.save(saved, ckpt)
    out = tmp_path / "alias.onnx"
    status = train_cli(["export", "--checkpoint", str(ckpt), "--out", str(out), "--exporter", "torchscript",
                        "--path-alias", f"DATA={tmp_path}/data", "--path-alias", f"WORK={tmp_path}"])
    assert status == 0, capsys.readouterr().err
    meta = read_onnx_metadata(out)
    assert meta["train_command"] == "forest-train train --data DATA --out WORK/run"
    assert meta["export_command"].endswith("--checkpoint WORK/recorded.pt --out WORK/alias.onnx --exporter torchscript")
    assert str(tmp_path) not in out.with_suffix(".md").read_text()
    assert torch.load(ckpt, weights_only=False)["command"] == saved["command"]  # the checkpoint is not touched
    assert train_cli(["export", "--checkpoint", str(ckpt), "--out", str(out), "--path-alias", "lower=/x"]) == 2
    assert "upper case" in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["export", "--checkpoint", "/nonexistent.pt", "--out", "x.onnx"], "/nonexistent.pt"),
    (["export", "--out", "x.onnx"], "--checkpoint"),
    (["bogus"], "invalid choice"),
])
def test_cli_bad_input_exit_2(argv, needle, capsys):
    assert train_cli(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_cli_corrupt_checkpoint_and_int8_without_calib(checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00not a checkpoint" * 10)
    assert train_cli(["export", "--checkpoint", str(bad), "--out", str(tmp_path / "o.onnx")]) == 2
    assert str(bad) in capsys.readouterr().err
    assert train_cli(["export", "--checkpoint", str(checkpoint[0]), "--out", str(tmp_path / "o.onnx"),
                        "--int8"]) == 2
    assert "--calib" in capsys.readouterr().err


def test_checkpoint_without_model_name_is_rejected(tmp_path):
    path = tmp_path / "weights_only.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ModelLoadError, match="model_name"):
        export_onnx(path, tmp_path / "o.onnx", INPUT_HW)


# --------------------------------------------------------------------------- models.release


@pytest.fixture
def release_inputs(tmp_path, monkeypatch):
    """A 64x96 checkpoint in the trainer's format, a 1-segment held-out set, and a fast (torchscript) export."""
    import functools

    from forest_perception.dataset_tools.layout import FrameRecord, ImuSample, SegmentWriter, frame_stem
    from forest_perception.models import export

    torch.manual_seed(0)
    model = build_model("autoencoder", input_hw=INPUT_HW, base_channels=4)
    ckpt = tmp_path / "best.pt"
    torch.save({"model_name": "autoencoder", "model_kwargs": {"base_channels": 4}, "input_hw": list(INPUT_HW),
                "model_state": model.state_dict(), "max_depth": 10.0}, ckpt)
    imu = ImuSample(angular_velocity=(0, 0, 0), linear_acceleration=(0, 0, 9.81))
    with SegmentWriter(tmp_path / "test", run=1, segment="a") as writer:
        for i in range(2):
            rgb = synthetic_forest_image(INPUT_HW[0], INPUT_HW[1], seed=i)
            depth = np.full(INPUT_HW, 3.0 + i, np.float32)
            writer.write_frame(rgb, depth, FrameRecord(stem=frame_stem(i), timestamp=0.1 * (i + 1), imu=imu))
    monkeypatch.setattr(export, "export_onnx", functools.partial(export.export_onnx, exporter="torchscript"))
    argv = ["--checkpoint", str(ckpt), "--name", "autoencoder_96x64", "--test", str(tmp_path / "test"),
            "--calib", str(tmp_path / "test"), "--out", str(tmp_path / "weights"), "--path-alias", f"WORK={tmp_path}"]
    return argv, tmp_path / "weights"


def test_release_writes_all_or_nothing(release_inputs, monkeypatch, capsys):
    from forest_perception.models import export, release

    argv, out = release_inputs
    assert release.main(argv) == 0, capsys.readouterr().err
    names = {p.name for p in out.iterdir()}
    assert {"autoencoder_96x64.onnx", "autoencoder_96x64.md", "autoencoder_96x64.json"} <= names
    assert not [n for n in names if n.startswith(".")], names
    shipped = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()

    # a failure half-way (after the fp32 export) leaves the earlier release exactly as it was
    def broken(*_args, **_kwargs):
        raise ValueError("quantisation failed")

    monkeypatch.setattr(export, "quantize_int8", broken)
    assert release.main(argv) == 2
    err = capsys.readouterr().err
    assert "quantisation failed" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == shipped


def test_release_drops_an_int8_model_of_an_earlier_release(release_inputs, monkeypatch, capsys):
    from forest_perception.models import export, release

    argv, out = release_inputs
    out.mkdir()
    for suffix in (".onnx", ".md", ".json"):
        (out / f"autoencoder_96x64_int8{suffix}").write_text("an earlier int8 model")
    monkeypatch.setattr(export, "keep_int8", lambda *_args: (False, "int8 loses too much accuracy: test"))
    assert release.main(argv) == 0, capsys.readouterr().err
    assert "int8 dropped" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["autoencoder_96x64.json", "autoencoder_96x64.md",
                                                      "autoencoder_96x64.onnx", "autoencoder_96x64.pt"]


def test_release_ships_the_checkpoint_and_a_style_table(release_inputs, tmp_path, capsys):
    import json
    import shutil

    from forest_perception.inference import weights_sha256
    from forest_perception.models import release

    argv, out = release_inputs
    for style in ("mossy", "sunny"):  # folders named after their style
        shutil.copytree(tmp_path / "test", tmp_path / "styles" / style)
    # the second style's depth is twice as far: the same predictions are worse there
    for depth_png in (tmp_path / "styles" / "sunny").rglob("depth_image/*.png"):
        import cv2

        cv2.imwrite(str(depth_png), (cv2.imread(str(depth_png), cv2.IMREAD_UNCHANGED) * 2).astype(np.uint16))
    styles = [str(tmp_path / "styles" / s) for s in ("mossy", "sunny")]
    assert release.main(argv + ["--styles", *styles, "--held-out-styles", "sunny"]) == 0, capsys.readouterr().err
    card = json.loads((out / "autoencoder_96x64.json").read_text())
    rows = {row["folder"]: row for row in card["styles"]["rows"]}
    assert set(rows) == {"mossy", "sunny"} and card["styles"]["held_out"] == ["sunny"]
    assert card["styles"]["worst_held_out"]["folder"] == "sunny"
    assert rows["sunny"]["absrel"] != rows["mossy"]["absrel"]
    assert str(tmp_path) not in json.dumps(card["styles"])  # labels only, no machine folders
    shipped = torch.load(out / "autoencoder_96x64.pt", weights_only=False)
    original = torch.load(argv[argv.index("--checkpoint") + 1], weights_only=False)
    assert weights_sha256(shipped["model_state"]) == weights_sha256(original["model_state"])
    assert card["checkpoint"]["weights_sha256"] == weights_sha256(original["model_state"])
    assert "optimizer_state" not in shipped
    assert card["checkpoint"]["max_abs_diff_vs_onnx_m"] < 1e-3
    assert "## Forest styles" in (out / "autoencoder_96x64.md").read_text()


def _with_training_record(ckpt, tmp_path):
    """Give the fixture's checkpoint the record a training run leaves: its command and options, with machine paths."""
    checkpoint = torch.load(ckpt, weights_only=False)
    checkpoint["command"] = (f"forest-train train --data {tmp_path}/data/Run-1 --cache {tmp_path}/cache "
                             f"--out {tmp_path}/run")
    checkpoint["options"] = {"data": [f"{tmp_path}/data/Run-1"], "cache": f"{tmp_path}/cache", "lr": 0.001}
    torch.save(checkpoint, ckpt)


def test_release_records_placeholders_instead_of_machine_folders(release_inputs, tmp_path, capsys):
    import json

    from forest_perception.models import release

    argv, out = release_inputs
    ckpt = Path(argv[argv.index("--checkpoint") + 1])
    _with_training_record(ckpt, tmp_path)
    before = ckpt.read_bytes()
    argv = argv + ["--path-alias", f"DATA={tmp_path}/data",
                   "--train-command", f"forest-train train --out {tmp_path}/run"]
    assert release.main(argv) == 0, capsys.readouterr().err
    assert ckpt.read_bytes() == before  # the input checkpoint is not touched
    for path in out.iterdir():  # no file of the release holds a folder of this machine, nor its scratch copy
        assert str(tmp_path).encode() not in path.read_bytes(), path.name
        assert b"forest-release-" not in path.read_bytes(), path.name
    card = json.loads((out / "autoencoder_96x64.json").read_text())
    shipped = torch.load(out / "autoencoder_96x64.pt", weights_only=False)
    assert shipped["command"] == "forest-train train --data DATA/Run-1 --cache WORK/cache --out WORK/run"
    assert shipped["options"] == {"data": ["DATA/Run-1"], "cache": "WORK/cache", "lr": 0.001}
    assert card["train_command"] == "forest-train train --out WORK/run"  # --train-command, through the aliases
    assert read_onnx_metadata(out / "autoencoder_96x64.onnx")["train_command"] == shipped["command"]
    assert "--checkpoint WORK/best.pt" in card["export_command"] and "--path-alias" not in card["export_command"]
    assert card["checkpoint"]["made_with"].startswith("forest-train train --out WORK/run")
    assert "frames of WORK/test" in card["held_out"]


def test_release_refuses_to_record_machine_folders(release_inputs, tmp_path, capsys):
    from forest_perception.models import release

    argv, out = release_inputs
    _with_training_record(Path(argv[argv.index("--checkpoint") + 1]), tmp_path)
    # without any alias the training record and the release's own command name folders of this machine
    assert release.main(argv[: argv.index("--path-alias")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}/data/Run-1" in err and "--path-alias NAME=DIR" in err and "Traceback" not in err
    assert not out.exists()
    # an alias for the data only: the cache and run folders are still named
    assert release.main(argv[: argv.index("--path-alias")] + ["--path-alias", f"DATA={tmp_path}/data"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}/cache" in err and f"{tmp_path}/data/Run-1" not in err
    assert not out.exists()
    # asked for, they are recorded as they are
    assert release.main(argv[: argv.index("--path-alias")] + ["--keep-machine-paths"]) == 0, capsys.readouterr().err
    shipped = torch.load(out / "autoencoder_96x64.pt", weights_only=False)
    assert f"{tmp_path}/cache" in shipped["command"]


@pytest.mark.parametrize("text, message", [
    ("DATA", "is not NAME=DIR"),
    ("data=/srv/x", "upper case"),
    ("DATA=/", "root folder"),
    ("DATA=", "is not NAME=DIR"),
])
def test_release_refuses_a_bad_path_alias(release_inputs, text, message, capsys):
    from forest_perception.models import release

    argv, out = release_inputs
    assert release.main(argv + ["--path-alias", text]) == 2
    err = capsys.readouterr().err
    assert "--path-alias" in err and message in err
    assert not out.exists()


def test_replace_paths_and_machine_paths():
    from forest_perception.models.provenance import machine_paths, parse_path_alias, replace_paths

    aliases = [parse_path_alias("DATA=/srv/data"), parse_path_alias("RUN=/srv/data/runs/a")]
    text = "--data /srv/data/Run-1 /srv/data2/x --out=/srv/data/runs/a --cache ~/cache https://host/p a/b 1/8"
    replaced = replace_paths({"command": text, "data": ["/srv/data"], "lr": 0.1}, aliases)
    # the longest folder wins, and /srv/data2 is not /srv/data followed by 2
    assert replaced["command"] == "--data DATA/Run-1 /srv/data2/x --out=RUN --cache ~/cache https://host/p a/b 1/8"
    assert replaced["data"] == ["DATA"] and replaced["lr"] == 0.1
    assert machine_paths(replaced) == ["/srv/data2/x", "~/cache"]  # not the URL, not relative paths
    assert machine_paths(["/a/b", ("/a/b",), {"k": "x=/c"}]) == ["/a/b", "/c"]
