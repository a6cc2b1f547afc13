"""Monocular depth networks: a light auto-encoder and an Eigen-style multi-scale network.

Both take normalised RGB ``Bx3xHxW`` (``models.transforms.normalise_image``) with H and W multiples of 16 and
return metric depth ``Bx1xHxW`` in metres.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from forest_perception.models.networks.autoencoder import AutoEncoderDepth, DepthDecoder, DepthEncoder
from forest_perception.models.networks.layers import (
    SIZE_MULTIPLE,
    ConvBNReLU,
    LogDepthHead,
    SeparableConv,
    check_input_hw,
)
from forest_perception.models.networks.multiscale import CoarseNet, FineNet, MultiScaleDepth
from forest_perception.models.transforms import normalise_image

__all__ = [
    "ENCODER_PARTS",
    "MODEL_NAMES",
    "SIZE_MULTIPLE",
    "AutoEncoderDepth",
    "CoarseNet",
    "ConvBNReLU",
    "DepthDecoder",
    "DepthEncoder",
    "FineNet",
    "LogDepthHead",
    "MultiScaleDepth",
    "SeparableConv",
    "build_model",
    "check_input_hw",
    "count_flops",
    "count_parameters",
    "encoder_modules",
    "freeze_encoder",
    "full_model_kwargs",
    "model_version",
    "normalise_image",
    "set_train_mode",
]

MODEL_NAMES: tuple[str, ...] = ("autoencoder", "multiscale")
_CLASSES: dict[str, type[nn.Module]] = {"autoencoder": AutoEncoderDepth, "multiscale": MultiScaleDepth}

#: What ``--freeze-encoder`` keeps fixed, per network: the auto-encoder's image encoder (its decoder and depth
#: head train), the multi-scale network's coarse global network, convs and FC layers (its fine refinement network
#: trains). The frozen part's BatchNorm statistics are frozen too.
ENCODER_PARTS: dict[str, tuple[str, ...]] = {"autoencoder": ("encoder",), "multiscale": ("coarse",)}


def build_model(name: str, input_hw: Sequence[int] = (240, 320), **kwargs: object) -> nn.Module:
    """Build a depth network by name (one of ``MODEL_NAMES``).

    ``input_hw`` (H, W) must be positive multiples of 16; the multi-scale net is built for exactly that size,
    the auto-encoder accepts any valid size. ``kwargs`` go to the network's constructor
    (e.g. ``base_channels``, ``min_depth``, ``max_depth``).
    """
    if len(input_hw) != 2:
        raise ValueError(f"input_hw must be (height, width), got {input_hw!r}")
    height, width = int(input_hw[0]), int(input_hw[1])
    check_input_hw(height, width)
    if name == "autoencoder":
        return AutoEncoderDepth(**kwargs)
    if name == "multiscale":
        return MultiScaleDepth(input_hw=(height, width), **kwargs)
    raise ValueError(f"unknown model name {name!r}; known: {', '.join(MODEL_NAMES)}")


def full_model_kwargs(name: str, kwargs: Mapping[str, object] | None) -> dict[str, object]:
    """``kwargs`` with the network's constructor defaults filled in: ``{}`` and the defaults spelt out are equal.

    Tuples become lists (a checkpoint read back from JSON holds lists). ``ValueError`` for an unknown network or
    an argument its constructor does not take.
    """
    if name not in _CLASSES:
        raise ValueError(f"unknown model name {name!r}; known: {', '.join(MODEL_NAMES)}")
    parameters = inspect.signature(_CLASSES[name]).parameters
    given = dict(kwargs or {})
    unknown = sorted(k for k in given if k not in parameters or k == "input_hw")
    if unknown:
        raise ValueError(f"{name} takes no argument {', '.join(map(repr, unknown))}")
    full = {k: p.default for k, p in parameters.items()
            if k != "input_hw" and p.default is not inspect.Parameter.empty}
    full.update(given)
    return {k: _plain(v) for k, v in sorted(full.items())}


def _plain(value: object) -> object:
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def model_version(name: str, weights_sha: str, model: nn.Module) -> str:
    """``<name>-<first 12 hex of the weights' sha256>``, and ``-mirror`` for a multi-scale network with
    mirror-symmetric FC layers (``coarse_mirror``): the same weights compute another depth there, so the version that
    depth_node, the release registry and ICIIA's base check go by must differ."""
    suffix = "-mirror" if getattr(getattr(model, "coarse", None), "mirror", False) else ""
    return f"{name}-{weights_sha[:12]}{suffix}"


def encoder_modules(model: nn.Module) -> list[nn.Module]:
    """The submodules of ``model`` that ``--freeze-encoder`` keeps fixed (``ENCODER_PARTS``)."""
    for name, parts in ENCODER_PARTS.items():
        if isinstance(model, _CLASSES[name]):
            return [model.get_submodule(part) for part in parts]
    raise ValueError(f"no encoder is defined for {type(model).__name__}; known networks: {', '.join(MODEL_NAMES)}")


def freeze_encoder(model: nn.Module) -> int:
    """Stop the gradients of the encoder part (``encoder_modules``); returns the number of parameters frozen.

    Their BatchNorm layers must also stay in eval mode while training (``set_train_mode``), or their running
    statistics would still drift with the new data.
    """
    frozen = 0
    for module in encoder_modules(model):
        for parameter in module.parameters():
            parameter.requires_grad_(False)
            frozen += parameter.numel()
    return frozen


def set_train_mode(model: nn.Module, frozen_encoder: bool = False) -> nn.Module:
    """``model.train()``, with the encoder part in eval mode when it is frozen (fixed BatchNorm statistics)."""
    model.train()
    if frozen_encoder:
        for module in encoder_modules(model):
            module.eval()
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all of them, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _macs(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> int:
    count_macs = getattr(module, "count_macs", None)
    if callable(count_macs):  # a module that knows its own cost (ICIIA's partitioned projections and attention)
        return int(count_macs(inputs, output))
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return output.numel() * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.ConvTranspose2d):
        kh, kw = module.kernel_size
        return inputs[0].numel() * (module.out_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    return 0


def count_flops(model: nn.Module, input_hw: Sequence[int] = (240, 320),
                inputs: Sequence[torch.Tensor] | None = None) -> int:
    """FLOPs of one forward pass on one ``3xHxW`` image, counted as ``2 * MACs``.

    Only the multiply-accumulates of ``Conv2d``, ``ConvTranspose2d``, ``Linear`` and modules with a
    ``count_macs(inputs, output)`` method are counted (with forward hooks); BatchNorm, activations, interpolation
    and the depth head are left out (they are a few % and fold or fuse at export). Divide by 2 for the MAC count
    that some papers call FLOPs. ``inputs``: the forward's arguments instead of one zero image (a history bank).
    """
    total = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        total += _macs(module, inputs, output)

    kinds = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, kinds) or callable(getattr(m, "count_macs", None))]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            if inputs is not None:
                model(*(t.to(device) for t in inputs))
            else:
                model(torch.zeros(1, 3, int(input_hw[0]), int(input_hw[1]), device=device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return 2 * total
