"""DC-CCL core: submodels summed in log depth, versions, part files, distillation and the rover's local training."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from forest_perception.collab import dcccl
from forest_perception.collab.dcccl import DcCclSpec, Part, VersionMismatchError
from forest_perception.models.networks import AutoEncoderDepth
from forest_perception.models.networks.collaborative import (
    FusedDepth,
    LogDepthEnsemble,
    LogDepthMember,
    ResidualDepthNet,
    fuse_log_depth,
)

HW = (32, 48)
SPEC = DcCclSpec(small_channels=2)


class ConstantDepth(nn.Module):
    """Metric depth ``value`` everywhere (a stand-in network with known output)."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.tensor(float(value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value.expand(x.shape[0], 1, x.shape[2], x.shape[3])


class LeftRightDepth(nn.Module):
    """Depth 1 m on the left half of the image, 4 m on the right (not mirror symmetric)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        depth = torch.ones(x.shape[0], 1, x.shape[2], x.shape[3])
        depth[..., x.shape[3] // 2:] = 4.0
        return depth


def tiny_mimic(seed: int = 0, large_version: str = "large-aaaaaaaaaaaa") -> Part:
    torch.manual_seed(seed)
    return Part("mimic", LogDepthMember(AutoEncoderDepth(base_channels=2), HW), "autoencoder",
                {"base_channels": 2}, large_version)


def images(n: int, hw: tuple[int, int] = HW, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, *hw, generator=torch.Generator().manual_seed(seed))


def test_the_small_submodel_starts_at_zero_so_the_fused_model_starts_as_the_mimic():
    mimic = tiny_mimic()
    small = dcccl.build_small(SPEC, mimic, seed=3)
    x = images(2)
    assert torch.count_nonzero(small.module(x)) == 0
    fused = dcccl.rover_model(mimic, small, SPEC)
    expected = mimic.module.net(x).clamp(SPEC.min_depth, SPEC.max_depth)
    assert torch.allclose(fused(x), expected, rtol=1e-5)
    # ... yet the zero output still trains: the last convolution gets a gradient
    fused.train()
    torch.log(fused(x)).mean().backward()
    assert small.module.net.decoder.logit.weight.grad.abs().sum() > 0


def test_parts_add_up_in_log_depth_and_the_sum_is_clamped_to_the_depth_range():
    x = images(1)
    fused = FusedDepth([LogDepthMember(ConstantDepth(2.0), HW), LogDepthMember(ConstantDepth(3.0), HW)], HW,
                       min_depth=0.1, max_depth=10.0)
    assert torch.allclose(fused(x), torch.full((1, 1, *HW), 6.0))  # exp(log 2 + log 3)
    big = FusedDepth([LogDepthMember(ConstantDepth(5.0), HW), LogDepthMember(ConstantDepth(5.0), HW)], HW, 0.1, 10.0)
    assert torch.allclose(big(x), torch.full((1, 1, *HW), 10.0))  # 25 m clamped to max_depth
    assert torch.allclose(fuse_log_depth(torch.full((1, 1, *HW), math.log(2.0)), torch.zeros(1, 1, 16, 16),
                                         0.1, 10.0), torch.full((1, 1, *HW), 2.0))


def test_members_run_at_their_own_size_and_flip_averaging_mirrors_the_second_pass():
    member = LogDepthMember(LeftRightDepth(), (16, 32), flip=True)
    out = member(images(1, (32, 64)))
    assert out.shape == (1, 1, 16, 32)  # the image was resized to the member's input size
    # left half: mean of log 1 (direct) and log 4 (mirrored); the same on the right
    assert torch.allclose(out, torch.full_like(out, 0.5 * math.log(4.0)))
    ensemble = LogDepthEnsemble([LogDepthMember(ConstantDepth(1.0), (16, 32)), LogDepthMember(ConstantDepth(4.0), HW)])
    assert ensemble.input_hw == (16, 32)
    assert torch.allclose(ensemble(images(1, HW)), torch.full((1, 1, 16, 32), 0.5 * math.log(4.0)))


def test_the_cloud_model_runs_the_small_submodel_at_the_rover_size_inside_the_graph():
    small_net = ResidualDepthNet(2)
    nn.init.constant_(small_net.decoder.logit.bias, math.log(2.0))  # the small part doubles the depth
    small = Part("small", LogDepthMember(small_net, HW, log_output=True), "residual", {"base_channels": 2},
                 "large-x", "mimic-y")
    large = dcccl.LargeSubmodel(LogDepthMember(ConstantDepth(1.5), (64, 96)), (64, 96), "large-x")
    cloud = dcccl.cloud_model(large, small, SPEC)
    out = cloud(images(2, (64, 96)))
    assert out.shape == (2, 1, 64, 96)
    assert torch.allclose(out, torch.full_like(out, 3.0), rtol=1e-5)


def test_a_small_submodel_of_another_mimic_or_large_model_is_refused_by_name():
    mimic = tiny_mimic()
    small = dcccl.build_small(SPEC, mimic)
    other = tiny_mimic(seed=1)
    with pytest.raises(VersionMismatchError, match=f"trained with mimic {mimic.version}, not {other.version}"):
        dcccl.rover_model(other, small, SPEC)
    with pytest.raises(VersionMismatchError, match="distilled from large model large-aaaaaaaaaaaa, not the running "
                                                   "large-bbbbbbbbbbbb"):
        dcccl.check_pair(mimic, small, "large-bbbbbbbbbbbb")
    large = dcccl.LargeSubmodel(LogDepthMember(ConstantDepth(1.0), HW), HW, "large-bbbbbbbbbbbb")
    with pytest.raises(VersionMismatchError, match="belongs to large model large-aaaaaaaaaaaa, not the running"):
        dcccl.cloud_model(large, small, SPEC)
    # a mimic whose weights changed after the small submodel was trained is another mimic
    with torch.no_grad():
        next(mimic.module.parameters()).add_(0.01)
    with pytest.raises(VersionMismatchError, match="trained with mimic"):
        dcccl.check_pair(mimic, small)


def test_parts_round_trip_through_files_and_bad_files_are_refused(tmp_path):
    mimic = tiny_mimic()
    small = dcccl.build_small(SPEC, mimic)
    with torch.no_grad():
        next(small.module.parameters()).add_(0.5)
    mimic_path = dcccl.save_part(mimic, tmp_path / "mimic.pt", SPEC)
    small_path = dcccl.save_part(small, tmp_path / "small.pt", SPEC)
    mimic2, small2 = dcccl.load_part(mimic_path, "mimic"), dcccl.load_part(small_path, "small")
    assert (mimic2.version, small2.version, small2.mimic_version) == (mimic.version, small.version, mimic.version)
    x = images(2)
    assert torch.allclose(dcccl.rover_model(mimic2, small2, SPEC)(x), dcccl.rover_model(mimic, small, SPEC)(x))

    with pytest.raises(ValueError, match="is a 'small', expected mimic"):
        dcccl.load_part(small_path, "mimic")
    bundle = torch.load(small_path, weights_only=True)
    first = next(iter(bundle["state"]))
    bundle["state"][first] = bundle["state"][first] + 1.0
    torch.save(bundle, tmp_path / "edited.pt")
    with pytest.raises(ValueError, match="changed after it was written"):
        dcccl.load_part(tmp_path / "edited.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt: not readable"):
        dcccl.load_part(tmp_path / "junk.pt")
    torch.save({"model_state": {}}, tmp_path / "trainer.pt")
    with pytest.raises(ValueError, match="not a forest_perception.dcccl file"):
        dcccl.load_part(tmp_path / "trainer.pt")


def test_distillation_brings_the_mimic_close_to_the_teacher():
    teacher = LogDepthMember(AutoEncoderDepth(base_channels=4), (64, 96)).eval()
    with torch.no_grad():  # a teacher with a clear structure: its depth depends on the image
        teacher.net.decoder.logit.weight.mul_(20.0)
    large = dcccl.LargeSubmodel(teacher, (64, 96), "large-cccccccccccc")
    mimic = tiny_mimic()
    big = images(48, (64, 96), seed=1)
    small_images = torch.nn.functional.interpolate(big, size=HW, mode="area")
    stats = {k: v.clone() for k, v in mimic.module.state_dict().items() if "running" in k}
    result = dcccl.distil_mimic(mimic, large, big, small_images, SPEC, epochs=12, lr=3e-3, batch_size=8)
    assert result.epoch_loss[-1] < 0.5 * result.start_loss
    # BatchNorm keeps the statistics the mimic was trained with (a few cloud frames must not replace them)
    assert all(torch.equal(stats[k], v) for k, v in mimic.module.state_dict().items() if k in stats)
    assert mimic.large_version == "large-cccccccccccc"
    assert mimic.info["distilled_from"] == "large-cccccccccccc"


def test_the_rover_trains_only_the_small_submodel_against_its_depth():
    from forest_perception.models.losses import DepthLoss

    mimic = tiny_mimic()
    small = dcccl.build_small(SPEC, mimic)
    x = images(24, seed=2)
    mimic_log = dcccl.log_depth_outputs(mimic.module, x)
    depth = (torch.exp(mimic_log) * 1.7).clamp(0.2, 9.0)  # the rover's forest is 70 % deeper than the mimic thinks
    before = {k: v.clone() for k, v in mimic.module.state_dict().items()}
    loss_fn = DepthLoss(silog=1.0, smooth=0.0, min_depth=0.1, max_depth=10.0, variance_focus=0.0)

    def run_epochs(batch_loss, optimizer, num_frames):
        losses = []
        for _ in range(30):
            loss = batch_loss(torch.arange(num_frames))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        return {"first": losses[0], "last": losses[-1]}

    metrics = dcccl.train_small(small, mimic_log, x, depth, loss_fn, 3e-3, run_epochs, SPEC)
    assert metrics["last"] < 0.5 * metrics["first"]
    assert all(torch.equal(before[k], v) for k, v in mimic.module.state_dict().items())
    pred = dcccl.fused_predictions(small, mimic_log, x, SPEC)
    assert torch.allclose(pred, dcccl.rover_model(mimic, small, SPEC)(x), rtol=1e-4, atol=1e-5)
    ratio = float(torch.median(pred / torch.exp(mimic_log)))
    assert 1.4 < ratio < 2.0


def test_bytes_per_round_count_the_mimic_only_when_it_is_sent():
    mimic = tiny_mimic()
    small = dcccl.build_small(SPEC, mimic)
    large = dcccl.LargeSubmodel(LogDepthMember(AutoEncoderDepth(base_channels=8), HW), HW, "large-x")
    first = dcccl.round_bytes(large, mimic, small, rovers=3, mimic_sent=True)
    later = dcccl.round_bytes(large, mimic, small, rovers=3, mimic_sent=False)
    small_bytes = sum(4 * p.numel() for p in small.module.state_dict().values() if p.is_floating_point())
    assert later["up_per_rover"] == later["down_per_rover"] == small_bytes
    assert first["down_per_rover"] == small_bytes + first["mimic_bytes"]
    assert later["total"] == 3 * 2 * small_bytes
    assert first["whole_large_down"] == 3 * first["large_bytes"] > first["total"]


def test_the_shipped_parts_meet_the_cost_split_of_the_design():
    large = dcccl.build_large(DcCclSpec())
    mimic = dcccl.build_mimic(DcCclSpec(), large)
    small = dcccl.build_small(DcCclSpec(), mimic)
    flops = dcccl.flops_table(large, mimic, small, DcCclSpec())
    assert flops["large_over_rover_reference"] >= 10.0
    assert flops["mimic"] < 0.1 * flops["large"]
    assert flops["small"] < flops["mimic"]
    assert large.version.startswith("large-") and not any(p.requires_grad for p in large.module.parameters())
    assert np.isfinite(float(dcccl.large_model(large, DcCclSpec())(images(1, large.input_hw)).mean()))


def test_the_rover_model_exports_to_onnx_and_matches_pytorch(tmp_path):
    from forest_perception.inference import read_onnx_metadata
    from forest_perception.models.export import export_onnx

    mimic = tiny_mimic()
    small = dcccl.build_small(SPEC, mimic)
    with torch.no_grad():
        for p in small.module.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model = dcccl.rover_model(mimic, small, SPEC)
    path = export_onnx((model, {"model_name": "dcccl_rover"}), tmp_path / "rover.onnx", input_hw=HW,
                       export_command="test")
    meta = read_onnx_metadata(path)
    assert float(meta["max_depth"]) == SPEC.max_depth
    assert float(meta["verify_max_abs_error_m"]) < 1e-3


@pytest.mark.slow
def test_forest_fl_dcccl_distils_the_shipped_large_model_and_exports_both_deployables(tmp_path, capsys):
    import json

    from tiny_forest import write_tiny_dataset

    from forest_perception.collab.flower.cli import main
    from forest_perception.inference import load_engine

    write_tiny_dataset(tmp_path / "cloud", segments=2)
    mimic_path = tmp_path / "runs" / "dcccl" / "mimic.pt"  # folders that do not exist yet are made
    assert main(["dcccl", "distil", "--data", str(tmp_path / "cloud"), "--out", str(mimic_path), "--epochs", "2",
                 "--max-frames", "6", "--lr", "1e-3"]) == 0
    summary = json.loads(mimic_path.with_suffix(".json").read_text())
    assert summary["frames"] == 6 and len(summary["loss_by_epoch"]) == 2
    assert summary["flops"]["large_over_rover_reference"] >= 10
    assert summary["mimic_version"] != summary["mimic_start_version"]  # distillation changed the weights
    mimic = dcccl.load_part(mimic_path, "mimic")
    assert mimic.large_version == summary["large_version"] and "distilled_from" in mimic.info

    small = dcccl.build_small(DcCclSpec(), mimic)
    dcccl.save_part(small, tmp_path / "small.pt")
    assert main(["dcccl", "export", "--mimic", str(mimic_path), "--small", str(tmp_path / "small.pt"), "--out",
                 str(tmp_path / "deploy")]) == 0
    out = capsys.readouterr().out
    assert "rover:" in out and "cloud:" in out
    rover = load_engine(tmp_path / "deploy" / "dcccl_rover_160x128.onnx", backend="onnxruntime", threads=1)
    cloud = load_engine(tmp_path / "deploy" / "dcccl_cloud_320x240.onnx", backend="onnxruntime", threads=1)
    card = json.loads((tmp_path / "deploy" / "dcccl_cloud_320x240.json").read_text())
    assert card["dcccl"]["versions"] == {"large": summary["large_version"], "mimic": mimic.version,
                                         "small": small.version}
    image = np.random.default_rng(1).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    assert rover.input_hw == (128, 160) and cloud.input_hw == (240, 320)
    assert np.isfinite(rover.predict(image)).mean() > 0.5 and np.isfinite(cloud.predict(image)).mean() > 0.5

    # the base station's collab_node gates the cloud model from its drop folder like any global model
    from forest_perception.collab import rover
    from forest_perception.collab.flower.task import TaskConfig

    assert main(["dcccl", "export", "--mimic", str(mimic_path), "--small", str(tmp_path / "small.pt"), "--out",
                 str(tmp_path / "deploy"), "--base-station-drop", str(tmp_path / "drop")]) == 0
    dropped = rover.DropDirSource(tmp_path / "drop")
    ref = dropped.latest()
    assert ref.location.endswith("global-r000001.onnx")
    candidate = dropped.load(ref)
    scan = rover.DatasetWatcher(tmp_path / "cloud").scan()
    holdout = rover.make_holdout([scan.segment(s.segment_id) for s in scan.segments])
    decision = rover.ValidationGate(tmp_path / "models").check(candidate, None, holdout, TaskConfig().validate(),
                                                               label=ref.label)
    assert decision.accepted and decision.code == "first_model", decision.reason
    assert decision.model_version == cloud.model_version and Path(decision.model_path).is_file()

    # a small submodel of another mimic is refused by name, and nothing is written
    other = dcccl.build_small(DcCclSpec(), tiny_mimic())
    dcccl.save_part(other, tmp_path / "other.pt")
    assert main(["dcccl", "export", "--mimic", str(mimic_path), "--small", str(tmp_path / "other.pt"), "--out",
                 str(tmp_path / "refused")]) == 2
    assert f"not {mimic.version}" in capsys.readouterr().err
    assert not list((tmp_path / "refused").glob("*.onnx"))
