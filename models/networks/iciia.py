"""ICIIA: attention from the current frame to the rover's own history of unlabelled frames.

A plug-in between the encoder and the decoder of a shipped depth network (which stays frozen): the current frame's
bottleneck tokens attend, with multi-head attention, to a bank of the rover's recent frame features (one pooled
vector per frame) plus the current frame's own, and the result is added to the bottleneck (residual, output
projection zero-initialised, so an untrained module is exactly the identity). The projections are partitioned
(block diagonal, ``partitions`` blocks: ``1/P`` of the weights and multiply-adds of a dense one) and the features are
shuffled between partitions before the output projection so that information still crosses the blocks.

The bank's features are the frozen encoder's pooled bottleneck (:meth:`HistoryDepth.frame_feature`), independent of
the module's weights, so a rover's history stays valid when the module is replaced. Details: docs/collaborative.md
("ICIIA").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812 - the PyTorch convention
from torch import nn

from forest_perception.models.networks.autoencoder import AutoEncoderDepth
from forest_perception.models.networks.multiscale import COARSE_STRIDE, FINE_STRIDE, MultiScaleDepth

#: Additive attention bias of an empty bank slot (finite, so a graph never makes NaN from an all-masked row).
MASKED_BIAS = -1.0e4


def check_partitions(dim: int, partitions: int, heads: int) -> None:
    """``ValueError`` unless ``partitions`` and ``heads`` are positive and divide the feature width ``dim``."""
    if dim < 1:
        raise ValueError(f"feature width must be positive, got {dim}")
    if not isinstance(partitions, int) or partitions < 1 or dim % partitions:
        raise ValueError(f"partitions P={partitions!r} must be a positive integer dividing the feature width {dim} "
                         f"(valid: {', '.join(str(p) for p in range(1, dim + 1) if dim % p == 0)})")
    if not isinstance(heads, int) or heads < 1 or dim % heads:
        raise ValueError(f"heads={heads!r} must be a positive integer dividing the feature width {dim}")


def channel_shuffle(x: torch.Tensor, partitions: int) -> torch.Tensor:
    """Interleave the ``partitions`` blocks of the last dimension (ShuffleNet): block ``p``'s ``j``-th feature goes to
    position ``j * partitions + p``, so each block of the result holds features of every input block."""
    if partitions == 1:
        return x
    *lead, dim = x.shape
    return x.reshape(*lead, partitions, dim // partitions).transpose(-1, -2).reshape(*lead, dim)


class PartitionedLinear(nn.Module):
    """A block-diagonal linear map ``D -> D``: ``partitions`` independent ``D/P x D/P`` blocks (and a bias)."""

    def __init__(self, dim: int, partitions: int = 1, zero_init: bool = False) -> None:
        super().__init__()
        check_partitions(dim, partitions, 1)
        self.dim, self.partitions, self.block = int(dim), int(partitions), int(dim) // int(partitions)
        self.weight = nn.Parameter(torch.empty(self.partitions, self.block, self.block))
        self.bias = nn.Parameter(torch.zeros(self.dim))
        if zero_init:
            nn.init.zeros_(self.weight)
        else:
            bound = 1.0 / math.sqrt(self.block)
            nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``...xD`` -> ``...xD``; block ``p`` of the output depends on block ``p`` of the input only."""
        lead = x.shape[:-1]
        blocks = x.reshape(-1, self.partitions, self.block).transpose(0, 1)  # P x M x D/P
        out = torch.matmul(blocks, self.weight).transpose(0, 1).reshape(*lead, self.dim)
        return out + self.bias

    def count_macs(self, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> int:
        """Multiply-accumulates of one call (``count_flops`` hook): ``rows x D x D/P``."""
        return int(output.numel() // self.dim) * self.dim * self.block

    def extra_repr(self) -> str:
        """Width and partitions in ``print(model)``."""
        return f"dim={self.dim}, partitions={self.partitions}"


class AttentionCore(nn.Module):
    """Masked multi-head scaled dot-product attention (no weights; a module so that FLOPs are counted)."""

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.heads = int(heads)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``q`` BxNxD, ``k``/``v`` BxMxD, ``bias`` BxM additive (0 or :data:`MASKED_BIAS`) -> BxNxD."""
        b, n, d = q.shape
        m, h = k.shape[1], self.heads
        qh = q.reshape(b, n, h, d // h).transpose(1, 2)
        kh = k.reshape(b, m, h, d // h).transpose(1, 2)
        vh = v.reshape(b, m, h, d // h).transpose(1, 2)
        scores = torch.matmul(qh, kh.transpose(-1, -2)) * (1.0 / math.sqrt(d // h)) + bias[:, None, None, :]
        return torch.matmul(torch.softmax(scores, dim=-1), vh).transpose(1, 2).reshape(b, n, d)

    def count_macs(self, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> int:
        """``q k^T`` and ``softmax v``: ``2 x B x N x M x D``."""
        q, k = inputs[0], inputs[1]
        return 2 * int(q.shape[0]) * int(q.shape[1]) * int(k.shape[1]) * int(q.shape[2])


class ICIIA(nn.Module):
    """Calibrate a ``BxDxhxw`` feature map with attention over ``[current frame, bank]`` frame features.

    ``bank`` is ``BxKxD`` (pooled features of earlier frames), ``mask`` ``BxK`` (1 = a frame, 0 = an empty slot); with
    no bank the memory is the current frame alone. Output = input + zero-initialised projection of the attention.
    """

    def __init__(self, dim: int, partitions: int = 4, heads: int = 4) -> None:
        super().__init__()
        check_partitions(dim, partitions, heads)
        self.dim, self.partitions, self.heads = int(dim), int(partitions), int(heads)
        self.norm_query = nn.LayerNorm(dim)
        self.norm_memory = nn.LayerNorm(dim)
        self.query = PartitionedLinear(dim, partitions)
        self.key = PartitionedLinear(dim, partitions)
        self.value = PartitionedLinear(dim, partitions)
        self.attend = AttentionCore(heads)
        self.out = PartitionedLinear(dim, partitions, zero_init=True)

    def check_bank(self, bank: torch.Tensor, mask: torch.Tensor, batch: int) -> None:
        """``ValueError`` naming the shapes unless ``bank`` is ``BxKxD`` and ``mask`` ``BxK`` for this module's D."""
        if bank.ndim != 3 or bank.shape[2] != self.dim or bank.shape[0] != batch:
            raise ValueError(f"history bank must be Bx K x {self.dim} (B={batch}, the frame feature width {self.dim}),"
                             f" got shape {tuple(bank.shape)}")
        if tuple(mask.shape) != tuple(bank.shape[:2]):
            raise ValueError(f"bank mask must be BxK = {tuple(bank.shape[:2])}, got shape {tuple(mask.shape)}")

    def forward(self, features: torch.Tensor, bank: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """The calibrated feature map, same shape as ``features``."""
        b, d, h, w = features.shape
        if not torch.jit.is_tracing() and d != self.dim:
            raise ValueError(f"ICIIA was built for {self.dim}-wide features, got a {d}-channel feature map")
        tokens = features.flatten(2).transpose(1, 2)  # B x hw x D
        memory = tokens.mean(dim=1, keepdim=True)  # the current frame's own feature: never an empty memory
        bias = torch.zeros(b, 1, dtype=features.dtype, device=features.device)
        if bank is not None:
            if mask is None:
                mask = torch.ones(bank.shape[:2], dtype=features.dtype, device=features.device)
            if not torch.jit.is_tracing():
                self.check_bank(bank, mask, b)
            memory = torch.cat([memory, bank.to(features.dtype)], dim=1)
            bias = torch.cat([bias, (1.0 - mask.to(features.dtype)) * MASKED_BIAS], dim=1)
        q = self.query(self.norm_query(tokens))
        kv = self.norm_memory(memory)
        attended = self.attend(q, self.key(kv), self.value(kv), bias)
        delta = self.out(channel_shuffle(attended, self.partitions))
        return features + delta.transpose(1, 2).reshape(b, d, h, w)

    def extra_repr(self) -> str:
        """Width, partitions and heads in ``print(model)``."""
        return f"dim={self.dim}, partitions={self.partitions}, heads={self.heads}"


def pooled_feature(features: torch.Tensor) -> torch.Tensor:
    """A frame's history feature: its bottleneck map averaged over space, ``BxD``."""
    return features.mean(dim=(2, 3))


class HistoryDepth(nn.Module):
    """A shipped depth network with ICIIA between its encoder and decoder: ``encoder -> ICIIA(bank) -> decoder``.

    Supports :class:`AutoEncoderDepth` (ICIIA on the 1/16 bottleneck, 16 x base channels) and
    :class:`MultiScaleDepth` (on the coarse network's 1/16 features before its channel squeeze). ``forward(x, bank,
    mask)`` returns depth; :meth:`forward_with_feature` also the current frame's history feature (what a rover adds
    to its bank). The base network's weights are not changed; :meth:`freeze_base` stops their gradients and keeps
    their BatchNorm statistics.
    """

    def __init__(self, base: nn.Module, partitions: int = 4, heads: int = 4) -> None:
        super().__init__()
        if isinstance(base, AutoEncoderDepth):
            self.kind, dim = "autoencoder", int(base.encoder.channels[-1])
        elif isinstance(base, MultiScaleDepth):
            self.kind, dim = "multiscale", int(base.coarse.features[-1][0].in_channels)
        else:
            raise ValueError(f"ICIIA wraps AutoEncoderDepth or MultiScaleDepth, got {type(base).__name__}")
        self.base = base
        self.iciia = ICIIA(dim, partitions, heads)
        self.input_hw = tuple(getattr(base, "input_hw", ())) or None

    @property
    def feature_dim(self) -> int:
        """Width D of a history feature."""
        return self.iciia.dim

    def freeze_base(self) -> HistoryDepth:
        """Stop the base network's gradients (its BatchNorm stays in eval mode: see :meth:`train`)."""
        self.base.requires_grad_(False)
        self.base.eval()
        return self

    def train(self, mode: bool = True) -> HistoryDepth:
        """Train mode for the module; a frozen base stays in eval mode (fixed BatchNorm statistics)."""
        super().train(mode)
        if not any(p.requires_grad for p in self.base.parameters()):
            self.base.eval()
        return self

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``(what the decoder needs, the bottleneck map ICIIA calibrates)`` of normalised images."""
        if self.kind == "autoencoder":
            if not torch.jit.is_tracing() and (x.ndim != 4 or x.shape[1] != 3):
                raise ValueError(f"input must be Bx3xHxW normalised RGB, got shape {tuple(x.shape)}")
            feats = self.base.encoder(x)
            return feats[:3], feats[3]
        self.base._check(x)  # noqa: SLF001 - the network's own input check
        return [], self.base.coarse.features[:-1](x)

    def decode(self, x: torch.Tensor, skips: list[torch.Tensor], bottleneck: torch.Tensor) -> torch.Tensor:
        """Depth ``Bx1xHxW`` from the (calibrated) bottleneck."""
        base = self.base
        if self.kind == "autoencoder":
            return base.head(base.decoder([*skips, bottleneck]))
        coarse_net = base.coarse
        coarse = coarse_net.fc(coarse_net.features[-1](bottleneck)).reshape(-1, 1, *coarse_net.coarse_hw)
        quarter = F.interpolate(coarse, scale_factor=float(COARSE_STRIDE // FINE_STRIDE), mode="bilinear",
                                align_corners=False)
        fine = base.fine(x, quarter)
        return base.head(F.interpolate(fine, scale_factor=float(FINE_STRIDE), mode="bilinear", align_corners=False))

    def frame_feature(self, x: torch.Tensor) -> torch.Tensor:
        """The history feature ``BxD`` of images (the frozen encoder's pooled bottleneck)."""
        return pooled_feature(self.encode(x)[1])

    def forward_with_feature(self, x: torch.Tensor, bank: torch.Tensor | None = None,
                             mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(depth Bx1xHxW, history feature BxD)`` of normalised images with a bank ``BxKxD`` / mask ``BxK``."""
        skips, bottleneck = self.encode(x)
        feature = pooled_feature(bottleneck)
        return self.decode(x, skips, self.iciia(bottleneck, bank, mask)), feature

    def forward(self, x: torch.Tensor, bank: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Metric depth ``Bx1xHxW``."""
        return self.forward_with_feature(x, bank, mask)[0]


class RoverHistoryGraph(nn.Module):
    """The graph ``depth_node`` runs: ``(image 1x3xHxW, bank KxD, bank_mask K) -> (depth 1x1xHxW, feature 1xD)``."""

    def __init__(self, model: HistoryDepth) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, bank: torch.Tensor,
                bank_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One frame with its history bank."""
        return self.model.forward_with_feature(image, bank[None], bank_mask[None])


def iciia_flops(model: HistoryDepth, input_hw: Sequence[int], bank_size: int) -> dict[str, int]:
    """FLOPs (``2 x MACs``, as :func:`~forest_perception.models.networks.count_flops`) of one frame with a full
    bank of ``bank_size`` frames: ``{"base", "iciia", "total"}``."""
    from forest_perception.models.networks import count_flops

    height, width = int(input_hw[0]), int(input_hw[1])
    device = next(model.parameters()).device
    image = torch.zeros(1, 3, height, width, device=device)
    bank = torch.zeros(1, int(bank_size), model.feature_dim, device=device)
    mask = torch.ones(1, int(bank_size), device=device)
    total = count_flops(model, inputs=(image, bank, mask) if bank_size else (image,))
    base = count_flops(model.base, (height, width))
    return {"base": base, "iciia": total - base, "total": total}


__all__ = [
    "ICIIA",
    "MASKED_BIAS",
    "AttentionCore",
    "HistoryDepth",
    "PartitionedLinear",
    "RoverHistoryGraph",
    "channel_shuffle",
    "check_partitions",
    "iciia_flops",
    "pooled_feature",
]
