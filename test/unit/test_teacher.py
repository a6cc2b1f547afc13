"""Distillation from a frozen, flip-averaged teacher (``forest-train train --teacher --teacher-flip``)."""

from __future__ import annotations

import pytest
import torch
from tiny_forest import write_tiny_dataset

from forest_perception.models.data import MIN_DEPTH_M, ForestDepthDataset
from forest_perception.models.networks import build_model
from forest_perception.models.teacher import FlipAveraged, load_teacher, teacher_loss
from forest_perception.models.trainer import Trainer, TrainOptions

TEACHER = "multiscale_160x128"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    folder = tmp_path_factory.mktemp("forest")
    write_tiny_dataset(folder, runs=(1,))
    return folder


def test_flip_averaged_is_the_geometric_mean_with_the_mirrored_pass():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 1, 3, padding=1)  # an asymmetric kernel: not mirror-equivariant
    net = torch.nn.Sequential(conv, torch.nn.Softplus())
    image = torch.randn(2, 3, 16, 20)
    with torch.no_grad():
        direct = net(image)
        mirrored = torch.flip(net(torch.flip(image, [-1])), [-1])
        averaged = FlipAveraged(net)(image)
    torch.testing.assert_close(averaged, torch.sqrt(direct * mirrored))
    assert not torch.allclose(direct, mirrored, rtol=1e-3)
    pointwise = torch.nn.Softplus()  # a mirror-equivariant network is left as it is
    torch.testing.assert_close(FlipAveraged(pointwise)(image[:, :1]), pointwise(image[:, :1]))


def test_teacher_loss_is_the_log_distance_on_the_mask():
    pred = torch.full((1, 1, 2, 2), 2.0, requires_grad=True)
    wanted = torch.tensor([[[[2.0, 4.0], [1.0, 2.0]]]])
    mask = torch.tensor([[[[True, True], [False, False]]]])
    loss = teacher_loss(pred, wanted, mask)
    assert float(loss.detach()) == pytest.approx(0.5 * abs(torch.log(torch.tensor(0.5)).item()))
    loss.backward()
    assert pred.grad is not None and float(pred.grad[0, 0, 1].abs().sum()) == 0.0  # masked pixels get nothing
    nothing = teacher_loss(pred, wanted, torch.zeros_like(mask))
    assert float(nothing) == 0.0 and nothing.requires_grad


def test_load_teacher_freezes_it_and_refuses_another_size():
    teacher, checkpoint = load_teacher(TEACHER, (128, 160), flip=True)
    assert isinstance(teacher, FlipAveraged) and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert checkpoint["model_name"] == "multiscale"
    with pytest.raises(ValueError, match=r"--teacher multiscale_160x128 was trained at 160x128.*320x240"):
        load_teacher(TEACHER, (240, 320), flip=False)


def _teacher_file(path) -> str:
    """A multi-scale network at 64x48 saved as 'forest-train train' saves one: a teacher unlike any student."""
    torch.manual_seed(3)
    model = build_model("multiscale", (48, 64))
    torch.save({"model_name": "multiscale", "model_kwargs": {}, "input_hw": [48, 64], "model_state": model.state_dict(),
                "min_depth": MIN_DEPTH_M, "max_depth": 10.0, "epoch": 1}, path)
    return str(path)


def _distance_to_teacher(model: torch.nn.Module, teacher: torch.nn.Module, root) -> float:
    data = ForestDepthDataset(root, input_hw=(48, 64))
    image = torch.stack([data[i]["image"] for i in range(len(data))])
    with torch.no_grad():
        return float((torch.log(model.eval()(image)) - torch.log(teacher(image))).abs().mean())


def _train(root, out, teacher_opts: dict) -> Trainer:
    # with a teacher its term is the only loss; without one, the depth loss alone
    losses = {"loss_silog": 0.0, "loss_smooth": 0.0} if teacher_opts else {}
    trainer = Trainer(TrainOptions(data=[str(root)], val_fraction=0.0, epochs=12, batch_size=6, lr=3e-3, seed=1,
                                   out=str(out), progress=False, threads=1, augment=False, scheduler="none",
                                   model="autoencoder", model_kwargs={"base_channels": 4}, input_hw=(48, 64),
                                   **teacher_opts, **losses))
    trainer.history = trainer.train()
    return trainer


def test_training_with_the_teacher_term_pulls_the_student_to_the_flip_averaged_teacher(root, tmp_path):
    teacher_path = _teacher_file(tmp_path / "teacher.pt")
    teacher, _ = load_teacher(teacher_path, (48, 64), flip=True)
    start = _distance_to_teacher(Trainer(TrainOptions(
        data=[str(root)], val_fraction=0.0, seed=1, out=str(tmp_path / "unused"), progress=False, model="autoencoder",
        model_kwargs={"base_channels": 4}, input_hw=(48, 64))).model, teacher, root)
    taught = _train(root, tmp_path / "kd", {"teacher": teacher_path, "teacher_flip": True, "loss_teacher": 1.0})
    alone = _train(root, tmp_path / "alone", {})
    with_teacher = _distance_to_teacher(taught.model, teacher, root)
    without = _distance_to_teacher(alone.model, teacher, root)
    assert with_teacher < 0.7 * start and with_teacher < 0.5 * without, (start, with_teacher, without)
    assert taught.history[-1]["train_teacher"] < 0.7 * taught.history[0]["train_teacher"]
    assert "train_teacher" not in alone.history[-1]
    saved = torch.load(tmp_path / "kd/checkpoints/last.pt", weights_only=True)
    assert saved["options"]["teacher"] == teacher_path and saved["options"]["teacher_flip"] is True
