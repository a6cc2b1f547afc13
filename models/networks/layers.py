"""Building blocks shared by the depth networks: conv blocks, input-size checks, the depth head."""

from __future__ import annotations

import math

import torch
from torch import nn

#: Every spatial size the networks accept must be a multiple of this (four stride-2 stages: 1/16).
SIZE_MULTIPLE = 16


def check_input_hw(height: int, width: int, multiple: int = SIZE_MULTIPLE) -> None:
    """Raise ``ValueError`` unless ``height`` and ``width`` are positive multiples of ``multiple``."""
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise ValueError(
            f"input height x width must be positive multiples of {multiple} "
            f"(e.g. 240x320, 128x160, 64x96), got {height}x{width}"
        )


class ConvBNReLU(nn.Sequential):
    """``Conv2d -> BatchNorm2d -> ReLU`` with 'same' padding."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class SeparableConv(nn.Sequential):
    """Depthwise 3x3 (optionally strided) then pointwise 1x1, each with BatchNorm + ReLU (MobileNet v1 block)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__(
            ConvBNReLU(in_ch, in_ch, 3, stride=stride, groups=in_ch),
            ConvBNReLU(in_ch, out_ch, 1),
        )


class LogDepthHead(nn.Module):
    """Map unbounded logits to metric depth, uniform in log depth.

    ``depth = exp(log(min_depth) + (log(max_depth) - log(min_depth)) * sigmoid(logit))``

    Why log space: the scale-invariant log loss then sees a gradient that does not depend on the depth itself,
    and a zero-initialised logit starts at the geometric mean of the range (1.41 m for 0.1-20 m), so training
    is stable for near grass and far trunks alike. Output is always in ``[min_depth, max_depth]``.
    """

    def __init__(self, min_depth: float, max_depth: float) -> None:
        super().__init__()
        if not 0.0 < min_depth < max_depth:
            raise ValueError(f"need 0 < min_depth < max_depth, got min_depth={min_depth}, max_depth={max_depth}")
        self.min_depth = float(min_depth)
        self.max_depth = float(max_depth)
        self.log_min = math.log(min_depth)
        self.log_span = math.log(max_depth) - math.log(min_depth)

    def forward(self, logit: torch.Tensor) -> torch.Tensor:
        """Depth in metres from logits of any shape."""
        return torch.exp(self.log_min + self.log_span * torch.sigmoid(logit))

    def extra_repr(self) -> str:
        """Show the depth range in ``print(model)``."""
        return f"min_depth={self.min_depth}, max_depth={self.max_depth}"
