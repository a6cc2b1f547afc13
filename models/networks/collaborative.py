"""Building blocks of device-cloud collaborative depth (DC-CCL): submodels that add up in log depth.

A base depth model is split vertically into submodels that all see the same image and whose outputs are summed in
log depth (metres): ``depth = exp(clamp(sum_k s_k(x), log min_depth, log max_depth))``. Each submodel is a
:class:`LogDepthMember`: a network run at its own input size (the image is resized in the graph) whose output
becomes log depth at the fused model's output size. A large cloud submodel is a :class:`LogDepthMember` (or a
:class:`LogDepthEnsemble` of them) around a big depth network; the small device submodel is a
:class:`ResidualDepthNet` that starts at zero, so a fused model starts where its other parts are. What each part is
for and how they train: ``docs/collaborative.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812 - the PyTorch convention
from torch import nn

from forest_perception.models.networks.autoencoder import DepthDecoder, DepthEncoder
from forest_perception.models.networks.layers import check_input_hw


def _resize(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize to ``hw`` (a no-op at that size already)."""
    if tuple(int(s) for s in x.shape[-2:]) == hw:
        return x
    return F.interpolate(x, size=hw, mode="bilinear", align_corners=False)


class ResidualDepthNet(nn.Module):
    """Small encoder-decoder that outputs a log-depth correction ``Bx1xHxW``, exactly zero before training.

    The auto-encoder's layout (:class:`~forest_perception.models.networks.autoencoder.DepthEncoder` and decoder)
    at ``base_channels`` (8 by default: about a quarter of the rover auto-encoder's FLOPs), with its last
    convolution zero-initialised and no depth head: the output is added to the other submodels' log depth.
    """

    def __init__(self, base_channels: int = 8) -> None:
        super().__init__()
        if base_channels < 1:
            raise ValueError(f"base_channels must be >= 1, got {base_channels}")
        self.encoder = DepthEncoder(base_channels)
        self.decoder = DepthDecoder(self.encoder.channels, base_channels)
        nn.init.zeros_(self.decoder.logit.weight)
        nn.init.zeros_(self.decoder.logit.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log-depth correction at the input resolution."""
        return self.decoder(self.encoder(x))


class LogDepthMember(nn.Module):
    """A network run at its own input size whose output is log depth (metres).

    ``log_output=False``: ``net`` returns metric depth (one of our depth networks) and the member takes its log;
    ``True``: ``net`` already returns log depth (a :class:`ResidualDepthNet`). ``flip`` averages the prediction with
    that of the mirrored image (twice the cost; a cheap ensemble for a cloud model).
    """

    def __init__(self, net: nn.Module, input_hw: Sequence[int], log_output: bool = False, flip: bool = False) -> None:
        super().__init__()
        self.input_hw = (int(input_hw[0]), int(input_hw[1]))
        check_input_hw(*self.input_hw)
        self.net = net
        self.log_output = bool(log_output)
        self.flip = bool(flip)

    def _log_depth(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        return y if self.log_output else torch.log(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log depth ``Bx1xhxw`` at ``input_hw`` from normalised RGB of any size."""
        x = _resize(x, self.input_hw)
        y = self._log_depth(x)
        if self.flip:
            y = 0.5 * (y + torch.flip(self._log_depth(torch.flip(x, dims=[3])), dims=[3]))
        return y


class LogDepthEnsemble(nn.Module):
    """Mean log depth of several members, at the first member's input size."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.input_hw = tuple(members[0].input_hw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of the members' log depth ``Bx1xhxw``."""
        outputs = [_resize(member(x), self.input_hw) for member in self.members]
        return torch.stack(outputs, dim=0).mean(dim=0)


class FusedDepth(nn.Module):
    """Submodels summed in log depth: ``depth = exp(clamp(sum_k part_k(x), log min_depth, log max_depth))``.

    Input: normalised RGB ``Bx3xHxW`` at ``input_hw``; every part resizes it to its own size and its log depth
    is resized to ``input_hw``. Output: metric depth ``Bx1xHxW`` in metres, like the other depth networks, so the
    fused model exports to ONNX and runs in ``depth_node`` as they do.
    """

    def __init__(self, parts: Sequence[nn.Module], input_hw: Sequence[int], min_depth: float = 0.1,
                 max_depth: float = 10.0) -> None:
        super().__init__()
        if not parts:
            raise ValueError("a fused model needs at least one part")
        if not 0.0 < min_depth < max_depth:
            raise ValueError(f"need 0 < min_depth < max_depth, got min_depth={min_depth}, max_depth={max_depth}")
        self.parts = nn.ModuleList(parts)
        self.input_hw = (int(input_hw[0]), int(input_hw[1]))
        check_input_hw(*self.input_hw)
        self.min_depth = float(min_depth)
        self.max_depth = float(max_depth)

    def log_depth(self, x: torch.Tensor) -> torch.Tensor:
        """The summed log depth before the clamp, ``Bx1xHxW``."""
        if not torch.jit.is_tracing() and (x.ndim != 4 or x.shape[1] != 3):
            raise ValueError(f"input must be Bx3xHxW normalised RGB, got shape {tuple(x.shape)}")
        total = _resize(self.parts[0](x), self.input_hw)
        for part in self.parts[1:]:
            total = total + _resize(part(x), self.input_hw)
        return total

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Metric depth ``Bx1xHxW`` in ``[min_depth, max_depth]``."""
        return torch.exp(torch.clamp(self.log_depth(x), math.log(self.min_depth), math.log(self.max_depth)))

    def extra_repr(self) -> str:
        """Show the input size and depth range in ``print(model)``."""
        return f"input_hw={self.input_hw}, min_depth={self.min_depth}, max_depth={self.max_depth}"


def fuse_log_depth(base_log: torch.Tensor, residual: torch.Tensor, min_depth: float, max_depth: float) -> torch.Tensor:
    """Depth from a cached log depth plus a residual, as :class:`FusedDepth` computes it (same clamp)."""
    return torch.exp(torch.clamp(base_log + _resize(residual, tuple(base_log.shape[-2:])),
                                 math.log(min_depth), math.log(max_depth)))


class ResidualOnFrozen(nn.Module):
    """A trainable part on a frozen base, fused as :class:`FusedDepth` fuses them; only the part is state.

    The base (a rover's mimic) is kept outside the module tree: ``state_dict``, ``parameters``, ``train()`` and
    ``eval()`` see the trainable part alone, so federated code that sends, trains and averages "the model" sends,
    trains and averages the small submodel, while the forward pass is the whole rover model. :meth:`fused` gives
    the same network with both parts registered (for ONNX export).
    """

    def __init__(self, base: nn.Module, part: nn.Module, input_hw: Sequence[int], min_depth: float = 0.1,
                 max_depth: float = 10.0) -> None:
        super().__init__()
        base.eval().requires_grad_(False)
        object.__setattr__(self, "base", base)  # deliberately not a registered submodule
        self.part = part
        self.input_hw = (int(input_hw[0]), int(input_hw[1]))
        check_input_hw(*self.input_hw)
        if not 0.0 < min_depth < max_depth:
            raise ValueError(f"need 0 < min_depth < max_depth, got min_depth={min_depth}, max_depth={max_depth}")
        self.min_depth = float(min_depth)
        self.max_depth = float(max_depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Metric depth ``Bx1xHxW``: ``exp(clamp(base(x) + part(x)))`` at ``input_hw``."""
        with torch.no_grad():
            base = _resize(self.base(x), self.input_hw)
        return fuse_log_depth(base, self.part(x), self.min_depth, self.max_depth)

    def fused(self) -> FusedDepth:
        """Base and part as one :class:`FusedDepth` (both registered; what is exported and deployed)."""
        return FusedDepth([self.base, self.part], self.input_hw, self.min_depth, self.max_depth).eval()
