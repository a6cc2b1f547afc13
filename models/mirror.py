"""Mirror-symmetric global layers for the multi-scale network (``forest-train mirror``).

A forest seen in a mirror is as likely as the forest itself, so the depth of a mirrored frame should be the mirror
of the depth. The convolutions nearly learn that from flip augmentation; the coarse network's fully-connected layers,
which see the whole frame at once and decide the global layout, do not: their output for the mirrored features,
mirrored back, differs from their output. With ``coarse_mirror`` (a constructor argument of ``MultiScaleDepth``) the
coarse network uses the mean of the two,

    fc_sym(F) = (fc(F) + mirror(fc(mirror(F)))) / 2,

which is exactly mirror-equivariant, keeps the same weights (so a trained network can be switched over, and
fine-tuning keeps the symmetry) and runs both in one batch through the FC layers, whose weights are then read once:
the FC layers are a fraction of a percent of the network's compute. ``mirror_checkpoint`` switches a trained
network's checkpoint over. docs/training.md, "Mirror-symmetric global layers".
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch

from forest_perception.models.blend import RUN_ONLY_KEYS
from forest_perception.models.networks.multiscale import MultiScaleDepth
from forest_perception.models.torch_engine import model_from_checkpoint


def mirror_symmetric(model: MultiScaleDepth) -> MultiScaleDepth:
    """A copy of ``model`` whose coarse FC layers are mirror-symmetric (the same weights; see the module)."""
    new = copy.deepcopy(model)
    new.coarse.mirror = True
    return new


@torch.no_grad()
def mirror_checkpoint(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint of ``checkpoint``'s multi-scale network with ``coarse_mirror`` on (weights unchanged).

    ``ValueError`` for another network or one that has it on already. The result records ``mirrored_from`` and
    drops the training run's optimizer state.
    """
    name = checkpoint.get("model_name")
    if name != "multiscale":
        raise ValueError(f"only the multi-scale network has global FC layers to make mirror-symmetric; this checkpoint "
                         f"is {name!r} (run any network on the mirror image too with depth_node's flip_average)")
    kwargs = dict(checkpoint.get("model_kwargs") or {})
    if kwargs.get("coarse_mirror"):
        raise ValueError("this checkpoint's FC layers are mirror-symmetric already (model kwarg coarse_mirror)")
    model_from_checkpoint(checkpoint, "to make mirror-symmetric")  # the weights must build the network
    out = {key: value for key, value in checkpoint.items() if key not in RUN_ONLY_KEYS}
    out.pop("init", None)
    out["model_kwargs"] = {**kwargs, "coarse_mirror": True}
    out["mirrored_from"] = {"coarse_mirror": [False, True]}
    return out


__all__ = ["mirror_checkpoint", "mirror_symmetric"]
