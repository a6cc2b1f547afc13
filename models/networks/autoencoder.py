"""Light encoder-decoder depth network with skip connections, sized for a Raspberry Pi 4.

MobileNet-v1 style depthwise-separable encoder (four stride-2 stages, 1/16 at the bottleneck) and a U-Net style
decoder (nearest x2 upsample, concat the encoder skip, two separable convs) back to full resolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 - the PyTorch convention
from torch import nn

from forest_perception.models.networks.layers import (
    SIZE_MULTIPLE,
    ConvBNReLU,
    GlobalContext,
    LogDepthHead,
    SeparableConv,
    check_input_hw,
)


class DepthEncoder(nn.Module):
    """Four stride-2 stages; returns the features at 1/2, 1/4, 1/8 and 1/16 resolution.

    ``global_context > 0`` adds a :class:`GlobalContext` block of that many hidden channels to the 1/16 features
    (the whole frame's context, which the stages' receptive field does not cover at 320x240); 0 leaves it out.
    """

    def __init__(self, base_channels: int = 16, global_context: int = 0) -> None:
        super().__init__()
        b = base_channels
        self.channels = (b, 4 * b, 8 * b, 16 * b)
        # 1/2 resolution is kept thin: its layers are memory-bound and dominate CPU latency
        self.stage1 = nn.Sequential(ConvBNReLU(3, b, 3, stride=2), SeparableConv(b, b))
        self.stage2 = nn.Sequential(SeparableConv(b, 4 * b, stride=2), SeparableConv(4 * b, 4 * b))
        self.stage3 = nn.Sequential(SeparableConv(4 * b, 8 * b, stride=2), SeparableConv(8 * b, 8 * b))
        # the bottleneck gets extra blocks: at 1/16 they are cheap and widen the receptive field
        self.stage4 = nn.Sequential(
            SeparableConv(8 * b, 16 * b, stride=2),
            SeparableConv(16 * b, 16 * b),
            SeparableConv(16 * b, 16 * b),
            SeparableConv(16 * b, 16 * b),
        )
        if global_context < 0:
            raise ValueError(f"global_context must be >= 0, got {global_context}")
        self.global_context = int(global_context)
        self.context = GlobalContext(16 * b, self.global_context) if self.global_context else None

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Features from fine (1/2) to coarse (1/16)."""
        f1 = self.stage1(x)
        f2 = self.stage2(f1)
        f3 = self.stage3(f2)
        f4 = self.stage4(f3)
        if self.context is not None:
            f4 = self.context(f4)
        return [f1, f2, f3, f4]


class UpBlock(nn.Module):
    """1x1 squeeze at the coarse level, nearest x2 upsample, concat the skip, one separable conv."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int) -> None:
        super().__init__()
        # squeezing before the upsample is 4x cheaper than after it
        self.squeeze = ConvBNReLU(in_ch, out_ch, 1)
        self.fuse = SeparableConv(out_ch + skip_ch, out_ch)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Features at the skip's resolution."""
        x = F.interpolate(self.squeeze(x), scale_factor=2.0, mode="nearest")
        return self.fuse(torch.cat([x, skip], dim=1))


class DepthDecoder(nn.Module):
    """U-Net style decoder from 1/16 to 1/2; the 1/2 logit map is upsampled bilinearly to full resolution.

    Predicting at 1/2 and upsampling the logits saves the most memory-bound layers (full-resolution convs)
    at no visible cost: the depth camera targets are smooth at that scale anyway.
    """

    def __init__(self, encoder_channels: tuple[int, int, int, int], base_channels: int = 16) -> None:
        super().__init__()
        c1, c2, c3, c4 = encoder_channels
        b = base_channels
        self.up3 = UpBlock(c4, c3, 8 * b)  # 1/8
        self.up2 = UpBlock(8 * b, c2, 4 * b)  # 1/4
        self.up1 = UpBlock(4 * b, c1, b)  # 1/2
        self.logit = nn.Conv2d(b, 1, 3, padding=1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Logits ``Bx1xHxW`` at the input resolution (twice that of ``features[0]``)."""
        f1, f2, f3, f4 = features
        x = self.up1(self.up2(self.up3(f4, f3), f2), f1)
        return F.interpolate(self.logit(x), scale_factor=2.0, mode="bilinear", align_corners=False)


class AutoEncoderDepth(nn.Module):
    """Encoder-decoder monocular depth network.

    Input: normalised RGB ``Bx3xHxW`` (see ``models.transforms.normalise_image``), H and W multiples of 16
    (240x320, 128x160, 64x96, ...); any such size works with the same weights.
    Output: metric depth ``Bx1xHxW`` in metres, in ``[min_depth, max_depth]``, uniform in log depth
    (see ``LogDepthHead``). ``global_context``: hidden channels of the image-level context block at 1/16
    (``DepthEncoder``); 0 (the shipped networks) leaves it out.
    """

    def __init__(self, base_channels: int = 16, min_depth: float = 0.1, max_depth: float = 20.0,
                 global_context: int = 0) -> None:
        super().__init__()
        if base_channels < 1:
            raise ValueError(f"base_channels must be >= 1, got {base_channels}")
        self.encoder = DepthEncoder(base_channels, global_context)
        self.decoder = DepthDecoder(self.encoder.channels, base_channels)
        self.head = LogDepthHead(min_depth, max_depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Metric depth ``Bx1xHxW`` from normalised RGB ``Bx3xHxW``."""
        if not torch.jit.is_tracing():  # shapes are fixed by the example input when exporting
            if x.ndim != 4 or x.shape[1] != 3:
                raise ValueError(f"input must be Bx3xHxW normalised RGB, got shape {tuple(x.shape)}")
            check_input_hw(int(x.shape[2]), int(x.shape[3]), SIZE_MULTIPLE)
        return self.head(self.decoder(self.encoder(x)))
