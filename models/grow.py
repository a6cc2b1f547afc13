"""Growing a trained depth network without changing what it predicts (``forest-train grow``).

A bigger network trained from scratch needs far more compute than a fine-tuning stage. Growing starts the bigger
network *as* the trained one ("Net2Net", Chen, Goodfellow and Shlens 2016), so fine-tuning only has to use the new
capacity:

- **more coarse blocks** (``coarse_blocks``): each new 128 -> 128 3x3 conv at 1/16 starts as the identity (a centre
  tap of 1 per channel); its BatchNorm gets the mean and variance of its input on real frames with
  ``weight = sqrt(var + eps)`` and ``bias = mean``, so it is the identity in eval mode and close to it in train
  mode (batch statistics of similar frames), and the ReLU after it passes its non-negative input unchanged;
- **a wider squeeze** (``coarse_squeeze``): the new channels of the 1x1 squeeze start at the constructor's random
  weights, and the first FC layer's weights reading them start at zero, so they add nothing until trained;
- **an image-level context block** for the auto-encoder (``global_context``, ``layers.GlobalContext`` at 1/16):
  its last 1x1 starts at zero, so it adds nothing until trained.

The grown checkpoint records its source and how far the two networks' outputs are apart on the frames used
(``grown_from``). docs/training.md, "Growing a network".
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch

from forest_perception.models.blend import RUN_ONLY_KEYS
from forest_perception.models.networks import build_model
from forest_perception.models.networks.multiscale import COARSE_FIRST_BLOCK, MultiScaleDepth
from forest_perception.models.recover import input_statistics, set_pass_through
from forest_perception.models.torch_engine import model_from_checkpoint


def _renamed(key: str, old_blocks: int, added: int) -> str:
    """The name of an old network's tensor in the grown one (layers after the 1/16 blocks move down)."""
    prefix = "coarse.features."
    if not key.startswith(prefix):
        return key
    index, rest = key[len(prefix):].split(".", 1)
    if int(index) > COARSE_FIRST_BLOCK + old_blocks:  # the squeeze (and nothing else) sits after the blocks
        return f"{prefix}{int(index) + added}.{rest}"
    return key


@torch.no_grad()
def _set_identity_blocks(model: MultiScaleDepth, first: int, count: int, inputs: torch.Tensor) -> None:
    """Make ``features[first:first + count]`` identities, their BatchNorm statistics from ``inputs``, in order.

    Each BatchNorm passes its input through in eval mode (``recover.set_pass_through``) with the statistics of its
    input in train mode, so it is close to the identity in train mode too.
    """
    for index in range(first, first + count):
        conv, bn = model.coarse.features[index][0], model.coarse.features[index][1]
        conv.weight.zero_()
        centre = conv.kernel_size[0] // 2
        for channel in range(conv.out_channels):
            conv.weight[channel, channel, centre, centre] = 1.0
        # the block's input as training sees it (earlier BatchNorms on batch statistics), on a copy so that no
        # running statistic of the network moves; eval mode is the identity whatever the statistics are
        prefix = copy.deepcopy(model.coarse.features[: index + 1]).train()
        name = f"{index}.1"
        set_pass_through(bn, *input_statistics(prefix, [name], inputs)[name])


def _source(checkpoint: Mapping[str, Any], inputs: torch.Tensor) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The checkpoint's network as ``train --init`` builds it (eval mode, weights loaded) and its constructor
    keywords; checks ``inputs``. ``ValueError`` (``ModelLoadError``) when the weights do not rebuild it."""
    state = checkpoint.get("model_state")
    if not isinstance(state, Mapping):
        raise ValueError("the checkpoint has no 'model_state': it is not a checkpoint written by 'forest-train train'")
    input_hw = tuple(int(v) for v in checkpoint["input_hw"])
    if inputs.ndim != 4 or inputs.shape[1] != 3 or tuple(inputs.shape[2:]) != input_hw or len(inputs) == 0:
        raise ValueError(f"inputs must be Nx3x{input_hw[0]}x{input_hw[1]} frames, got {tuple(inputs.shape)}")
    model, _meta = model_from_checkpoint(checkpoint, "to grow")
    return model, dict(checkpoint.get("model_kwargs") or {})


def _grow_multiscale(checkpoint: Mapping[str, Any], old: MultiScaleDepth, old_kwargs: dict[str, Any],
                     coarse_blocks: int | None, coarse_squeeze: int | None,
                     inputs: torch.Tensor) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    old_blocks, old_squeeze = old.coarse.blocks, old.coarse.squeeze
    coarse_blocks = old_blocks if coarse_blocks is None else int(coarse_blocks)
    coarse_squeeze = old_squeeze if coarse_squeeze is None else int(coarse_squeeze)
    if coarse_blocks < old_blocks or coarse_squeeze < old_squeeze:
        raise ValueError(f"a network only grows: it has {old_blocks} coarse block(s) and a squeeze of {old_squeeze}, "
                         f"asked for {coarse_blocks} and {coarse_squeeze}")
    if (coarse_blocks, coarse_squeeze) == (old_blocks, old_squeeze):
        raise ValueError(f"the network already has {old_blocks} coarse block(s) and a squeeze of {old_squeeze}: "
                         "nothing to grow")
    new_kwargs = {**old_kwargs, "coarse_blocks": coarse_blocks, "coarse_squeeze": coarse_squeeze}
    new = build_model("multiscale", old.input_hw, **new_kwargs)
    added = coarse_blocks - old_blocks
    new_state = new.state_dict()
    for key, tensor in checkpoint["model_state"].items():
        target = new_state[_renamed(key, old_blocks, added)]
        if target.shape == tensor.shape:
            target.copy_(tensor)
        elif key == "coarse.fc.1.weight":  # FC columns of the new squeeze channels read nothing yet
            target.zero_()
            target[:, : tensor.shape[1]] = tensor
        else:  # the squeeze's conv and BatchNorm: old channels first, the new ones keep their initial values
            target[: tensor.shape[0]] = tensor
    new.load_state_dict(new_state)
    _set_identity_blocks(new, COARSE_FIRST_BLOCK + 1 + old_blocks, added, inputs)
    return new, new_kwargs, {"coarse_blocks": [old_blocks, coarse_blocks],
                             "coarse_squeeze": [old_squeeze, coarse_squeeze]}


def _grow_autoencoder(checkpoint: Mapping[str, Any], old: torch.nn.Module, old_kwargs: dict[str, Any],
                      global_context: int | None) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    had = old.encoder.global_context
    if had:
        raise ValueError(f"the auto-encoder already has a context block of {had} channel(s); it cannot be resized")
    if global_context is None:
        raise ValueError("nothing to grow: give the auto-encoder a context block (global_context)")
    if int(global_context) < 1:
        raise ValueError(f"global_context must be >= 1, got {global_context}")
    new_kwargs = {**old_kwargs, "global_context": int(global_context)}
    new = build_model("autoencoder", checkpoint["input_hw"], **new_kwargs)
    missing, unexpected = new.load_state_dict(checkpoint["model_state"], strict=False)
    if unexpected or any(not key.startswith("encoder.context.") for key in missing):
        raise ValueError(f"the checkpoint's tensors do not fit the auto-encoder: missing {missing}, unexpected "
                         f"{unexpected}")
    return new, new_kwargs, {"global_context": [0, int(global_context)]}


@torch.no_grad()
def grow_checkpoint(checkpoint: Mapping[str, Any], coarse_blocks: int | None, coarse_squeeze: int | None,
                    inputs: torch.Tensor, *, global_context: int | None = None) -> dict[str, Any]:
    """A checkpoint of a bigger network that predicts what the network of ``checkpoint`` does.

    Multi-scale: more coarse blocks and/or a wider squeeze (``None`` keeps the source's). Auto-encoder: an
    image-level context block of ``global_context`` hidden channels. ``inputs`` (``Nx3xHxW``, normalised as the
    network expects) are real frames for the new BatchNorm statistics and the check; the result's
    ``grown_from["max_abs_diff_m"]`` is how far the two networks are apart on them (eval mode). ``ValueError`` for
    another network, a smaller or unchanged size, a size the network does not have, or inputs of the wrong shape.
    """
    name = checkpoint.get("model_name")
    if name not in ("multiscale", "autoencoder"):
        raise ValueError(f"only the multi-scale network and the auto-encoder can grow; this checkpoint is {name!r}")
    if name == "multiscale" and global_context is not None:
        raise ValueError("global_context is for the auto-encoder; the multi-scale network grows by coarse_blocks and "
                         "coarse_squeeze")
    if name == "autoencoder" and (coarse_blocks is not None or coarse_squeeze is not None):
        raise ValueError("coarse_blocks and coarse_squeeze are for the multi-scale network; the auto-encoder grows by "
                         "global_context")
    old, old_kwargs = _source(checkpoint, inputs)
    if name == "multiscale":
        new, new_kwargs, sizes = _grow_multiscale(checkpoint, old, old_kwargs, coarse_blocks, coarse_squeeze, inputs)
    else:
        new, new_kwargs, sizes = _grow_autoencoder(checkpoint, old, old_kwargs, global_context)
    new.eval()
    diff = float((new(inputs) - old(inputs)).abs().max())
    out = {key: value for key, value in checkpoint.items() if key not in RUN_ONLY_KEYS}
    out.pop("blend", None)
    out.pop("init", None)
    out["model_kwargs"] = new_kwargs
    out["model_state"] = {k: v.detach().clone() for k, v in new.state_dict().items()}
    out["grown_from"] = {**sizes, "frames": len(inputs), "max_abs_diff_m": diff,
                         "new_tensors": _new_tensors(new, old, sizes)}
    return out


def _new_tensors(new: torch.nn.Module, old: torch.nn.Module, sizes: Mapping[str, Any]) -> list[str]:
    """Names of the grown network's parameters that the source did not have, or had at another shape."""
    old_blocks = int(sizes["coarse_blocks"][0]) if "coarse_blocks" in sizes else 0
    added = int(sizes["coarse_blocks"][1]) - old_blocks if "coarse_blocks" in sizes else 0
    kept = {_renamed(name, old_blocks, added): tuple(p.shape) for name, p in old.named_parameters()}
    return sorted(name for name, p in new.named_parameters() if kept.get(name) != tuple(p.shape))


__all__ = ["grow_checkpoint"]
