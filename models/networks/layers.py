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


class GlobalContext(nn.Module):
    """Image-level context added to every position of a feature map: mean over the image, 1x1 -> ReLU -> 1x1.

    A network whose receptive field covers only part of the frame sees the whole frame through it (the scale of a
    scene is a property of the whole image). The last 1x1 starts at zero, so a network that gains the block
    predicts what it did before until the block is trained (``forest-train grow --global-context``).
    """

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        if channels < 1 or hidden < 1:
            raise ValueError(f"channels and hidden must be >= 1, got {channels} and {hidden}")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.expand = nn.Conv2d(hidden, channels, 1)
        nn.init.zeros_(self.expand.weight)
        nn.init.zeros_(self.expand.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` plus the context of its whole image, broadcast over the positions."""
        return x + self.expand(torch.relu(self.reduce(self.pool(x))))


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
