"""A frozen teacher network for distillation (``forest-train train --teacher``).

A depth network's prediction and the mirror of its prediction on the mirrored frame differ; their geometric mean
(flip averaging, ``FlipAveraged``) is the better depth on forests never trained on, at twice the compute. Training
a network towards such a teacher's depth (``teacher_loss``, L1 on log depth) puts some of that gain into one pass
at the rover's own cost. docs/training.md, "Distillation from a flip-averaged teacher".
"""

from __future__ import annotations

import os

import torch
from torch import nn

from forest_perception.cli_args import format_image_size
from forest_perception.models.checkpoints import resolve_checkpoint

_EPS = 1e-6


def _single_output(raw: object) -> torch.Tensor:
    return raw[-1] if isinstance(raw, (list, tuple)) else raw  # type: ignore[return-value]


class FlipAveraged(nn.Module):
    """``sqrt(f(x) * mirror(f(mirror(x))))``: a network's depth averaged (in log) with that of the mirrored frame."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Depth ``Bx1xHxW`` of a normalised ``Bx3xHxW`` batch; both passes run as one batch."""
        both = _single_output(self.model(torch.cat([image, torch.flip(image, dims=[-1])])))
        direct, mirrored = both.split(image.shape[0])
        mirrored = torch.flip(mirrored, dims=[-1])
        return torch.sqrt(direct.clamp(min=_EPS) * mirrored.clamp(min=_EPS))


def load_teacher(text: str | os.PathLike, input_hw: tuple[int, int], flip: bool,
                 device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """The frozen teacher that ``text`` names (a checkpoint file or a shipped network's name) and its checkpoint.

    ``ValueError`` naming ``--teacher`` when it is no PyTorch checkpoint, was trained at another input size than the
    student's ``input_hw`` (it would see the frame at another scale) or on other image statistics.
    """
    from forest_perception.models.train_options import check_init_normalisation
    from forest_perception.models.trainer import load_checkpoint

    try:
        path = resolve_checkpoint(text, allow_int8=False)
    except ValueError as exc:
        raise ValueError(f"--teacher: {exc}") from None
    model, checkpoint = load_checkpoint(path, device=device)
    saved_hw = tuple(int(v) for v in checkpoint.get("input_hw") or input_hw)
    if saved_hw != tuple(input_hw):
        raise ValueError(f"--teacher {text} was trained at {format_image_size(saved_hw)}, the network trained here "
                         f"runs at {format_image_size(input_hw)} (input size mismatch); give a teacher of that size")
    try:
        check_init_normalisation(checkpoint, str(text))
    except ValueError as exc:
        raise ValueError(str(exc).replace("--init", "--teacher", 1)) from None
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    teacher = FlipAveraged(model) if flip else model
    return teacher.eval().to(device), checkpoint


def teacher_loss(pred: torch.Tensor, teacher_depth: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean ``|log pred - log teacher|`` over ``mask`` (0, still in the graph, when no pixel is valid)."""
    if pred.shape != teacher_depth.shape or pred.shape != mask.shape:
        raise ValueError(f"pred, teacher depth and mask must have the same shape, got {tuple(pred.shape)}, "
                         f"{tuple(teacher_depth.shape)}, {tuple(mask.shape)}")
    if not bool(mask.any()):
        return pred.sum() * 0.0
    return (torch.log(pred[mask].clamp(min=_EPS)) - torch.log(teacher_depth[mask].clamp(min=_EPS))).abs().mean()
