"""Multi-scale depth network after Eigen, Puhrsch and Fergus (NIPS 2014).

A coarse global network sees the whole scene: strided convs down to 1/16, then fully-connected layers
predict a coarse depth map at 1/16 resolution (every output pixel depends on the whole image). A fine network
takes the image and the upsampled coarse prediction at 1/4 resolution and refines it with local convs. Unlike
Eigen (fine output at 1/4), the fine prediction is upsampled bilinearly to the input size, and the fine network
predicts a residual on the coarse logits, which trains jointly without the two-stage schedule of the paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 - the PyTorch convention
from torch import nn

from forest_perception.models.networks.layers import SIZE_MULTIPLE, ConvBNReLU, LogDepthHead, check_input_hw

#: Resolution of the coarse prediction relative to the input.
COARSE_STRIDE = 16
#: Resolution the fine network works at relative to the input.
FINE_STRIDE = 4


#: Index of the first 128 -> 128 conv at 1/16 in ``CoarseNet.features``; ``blocks`` more follow it, then the squeeze.
COARSE_FIRST_BLOCK = 4


class CoarseNet(nn.Module):
    """Global network: convs to 1/16, a 1x1 channel squeeze, then FC -> FC giving a 1/16 logit map.

    ``blocks`` adds that many 128 -> 128 3x3 convs at 1/16 after the first (more context before the squeeze, about
    6 % more compute each at 320x240); ``squeeze`` is how many channels reach the FC layers. With ``mirror`` the FC
    layers are mirror-symmetric: their output is the mean of their output on the features and the mirror image of
    their output on the mirrored features (both in one batch, so the weights are read once; models/mirror.py).
    """

    def __init__(self, input_hw: tuple[int, int], hidden: int = 512, squeeze: int = 8, dropout: float = 0.1,
                 blocks: int = 0, mirror: bool = False) -> None:
        super().__init__()
        if int(blocks) < 0 or int(squeeze) < 1:
            raise ValueError(f"coarse blocks must be >= 0 and squeeze >= 1, got blocks={blocks}, squeeze={squeeze}")
        if not isinstance(mirror, bool):
            raise ValueError(f"coarse_mirror must be true or false, got {mirror!r}")
        self.blocks, self.squeeze, self.mirror = int(blocks), int(squeeze), mirror
        self.coarse_hw = (input_hw[0] // COARSE_STRIDE, input_hw[1] // COARSE_STRIDE)
        self.features = nn.Sequential(
            ConvBNReLU(3, 32, 3, stride=2),
            ConvBNReLU(32, 64, 3, stride=2),
            ConvBNReLU(64, 96, 3, stride=2),
            ConvBNReLU(96, 128, 3, stride=2),
            *[ConvBNReLU(128, 128, 3) for _ in range(1 + self.blocks)],
            # the squeeze keeps the first FC layer small: its input is squeeze * H/16 * W/16
            ConvBNReLU(128, self.squeeze, 1),
        )
        n_coarse = self.coarse_hw[0] * self.coarse_hw[1]
        self.fc = nn.Sequential(
            nn.Flatten(1),
            nn.Linear(squeeze * n_coarse, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, n_coarse),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Coarse logits ``Bx1x(H/16)x(W/16)``."""
        features = self.features(x)
        if not self.mirror:
            return self.fc(features).reshape(-1, 1, self.coarse_hw[0], self.coarse_hw[1])
        both = self.fc(torch.cat([features, torch.flip(features, dims=[-1])]))
        both = both.reshape(2, -1, 1, self.coarse_hw[0], self.coarse_hw[1])
        return (both[0] + torch.flip(both[1], dims=[-1])) / 2


class FineNet(nn.Module):
    """Local network at 1/4: image features concatenated with the coarse prediction, convs to a logit residual."""

    def __init__(self, channels: int = 64) -> None:
        super().__init__()
        self.image_features = nn.Sequential(
            ConvBNReLU(3, 32, 3, stride=2),
            ConvBNReLU(32, channels - 1, 3, stride=2),
        )
        self.refine = nn.Sequential(
            ConvBNReLU(channels, channels, 3),
            ConvBNReLU(channels, channels, 3),
            nn.Conv2d(channels, 1, 3, padding=1),
        )

    def forward(self, x: torch.Tensor, coarse_logit_quarter: torch.Tensor) -> torch.Tensor:
        """Refined logits at 1/4 resolution."""
        # the coarse map enters as sigmoid (bounded in [0, 1], friendly to int8), the residual is added to its logit
        features = torch.cat([self.image_features(x), torch.sigmoid(coarse_logit_quarter)], dim=1)
        return coarse_logit_quarter + self.refine(features)


class MultiScaleDepth(nn.Module):
    """Coarse global + fine refinement depth network (Eigen et al. 2014 style).

    The coarse FC layers fix the input size: build with ``input_hw=(H, W)`` (multiples of 16; default 240x320)
    and feed exactly that size. Output: metric depth ``Bx1xHxW`` in metres in ``[min_depth, max_depth]``,
    uniform in log depth (see ``LogDepthHead``). ``coarse_mirror`` makes the coarse FC layers mirror-symmetric
    (``CoarseNet``).
    """

    def __init__(
        self,
        input_hw: tuple[int, int] = (240, 320),
        min_depth: float = 0.1,
        max_depth: float = 20.0,
        coarse_hidden: int = 512,
        fine_channels: int = 64,
        dropout: float = 0.1,
        coarse_blocks: int = 0,
        coarse_squeeze: int = 8,
        coarse_mirror: bool = False,
    ) -> None:
        super().__init__()
        check_input_hw(int(input_hw[0]), int(input_hw[1]), SIZE_MULTIPLE)
        self.input_hw = (int(input_hw[0]), int(input_hw[1]))
        self.coarse = CoarseNet(self.input_hw, hidden=coarse_hidden, squeeze=coarse_squeeze, dropout=dropout,
                                blocks=coarse_blocks, mirror=coarse_mirror)
        self.fine = FineNet(fine_channels)
        self.head = LogDepthHead(min_depth, max_depth)

    def _check(self, x: torch.Tensor) -> None:
        if torch.jit.is_tracing():  # shapes are fixed by the example input when exporting
            return
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"input must be Bx3xHxW normalised RGB, got shape {tuple(x.shape)}")
        hw = (int(x.shape[2]), int(x.shape[3]))
        if hw != self.input_hw:
            raise ValueError(
                f"MultiScaleDepth was built for input_hw={self.input_hw[0]}x{self.input_hw[1]} "
                f"(its FC layer depends on it), got {hw[0]}x{hw[1]}"
            )

    def _logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(x)
        coarse = self.coarse(x)
        scale = float(COARSE_STRIDE // FINE_STRIDE)
        coarse_quarter = F.interpolate(coarse, scale_factor=scale, mode="bilinear", align_corners=False)
        return coarse, self.fine(x, coarse_quarter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Metric depth ``Bx1xHxW`` from normalised RGB ``Bx3xHxW`` (the fine prediction)."""
        _, fine = self._logits(x)
        return self.head(F.interpolate(fine, scale_factor=float(FINE_STRIDE), mode="bilinear", align_corners=False))

    def forward_multi(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(coarse, fine)`` depth, both upsampled to ``Bx1xHxW``, to put a loss on each."""
        coarse, fine = self._logits(x)
        up = F.interpolate
        coarse_full = up(coarse, scale_factor=float(COARSE_STRIDE), mode="bilinear", align_corners=False)
        fine_full = up(fine, scale_factor=float(FINE_STRIDE), mode="bilinear", align_corners=False)
        return self.head(coarse_full), self.head(fine_full)
