"""Weight-space blending of checkpoints of one network (``forest-train blend``).

A fine-tuned network often wins on new forests and loses a little on the forests it knew. Averaging its weights with
the network it started from (weight-space ensembling, "WiSE-FT", Wortsman et al. 2022) trades the two smoothly, with
no training and no extra cost at run time: ``blend = sum_k w_k * theta_k`` over every floating tensor, weights in
[0, 1] summing to 1. Only checkpoints of one network blend: same network, constructor arguments, input size,
normalisation and depth range, and the same tensors of the same shapes; anything else is refused by name.
docs/training.md, "Blending checkpoints".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

#: Checkpoint keys that must agree for two checkpoints to be one network.
SAME_NETWORK_KEYS = ("model_name", "model_kwargs", "input_hw", "normalisation", "min_depth", "max_depth")

#: Keys of a training checkpoint that describe one training run and mean nothing for a blend.
RUN_ONLY_KEYS = ("optimizer_state", "scheduler_state", "scaler_state", "history", "metrics", "held_out_metrics",
                 "epoch", "step", "best_score", "best_epoch", "start_metrics", "options", "recovered_from",
                 "version", "weights_sha256")


def check_blend_weights(weights: Sequence[float], count: int) -> list[float]:
    """The weights as floats; ``ValueError`` unless there is one per checkpoint, each in [0, 1], summing to 1."""
    if count < 2:
        raise ValueError(f"blending needs at least two checkpoints, got {count}")
    if len(weights) != count:
        raise ValueError(f"{len(weights)} weight(s) for {count} checkpoints: give one weight per checkpoint")
    out = [float(w) for w in weights]
    for k, w in enumerate(out):
        if not math.isfinite(w) or not 0.0 <= w <= 1.0:
            raise ValueError(f"weight {k + 1} is {weights[k]!r}; each weight must lie in [0, 1] (extrapolating past "
                             "a checkpoint can push BatchNorm variances below zero)")
    if abs(sum(out) - 1.0) > 1e-6:
        raise ValueError(f"the weights sum to {sum(out):.6g}, not 1")
    return out


def _state(checkpoint: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    state = checkpoint.get("model_state", checkpoint.get("state_dict"))
    if not isinstance(state, Mapping):
        raise ValueError(f"{name} has no 'model_state': it is not a checkpoint written by 'forest-train train'")
    return state


def _setting(checkpoint: Mapping[str, Any], key: str, name: str) -> Any:
    """One of :data:`SAME_NETWORK_KEYS`, spelt one way: constructor defaults filled in, tuples as lists."""
    from forest_perception.models.networks import MODEL_NAMES, full_model_kwargs

    value = checkpoint.get(key)
    if key == "model_kwargs":
        model_name = checkpoint.get("model_name")
        if model_name in MODEL_NAMES and (value is None or isinstance(value, Mapping)):
            try:
                return full_model_kwargs(model_name, value)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
    if isinstance(value, tuple):
        return list(value)
    return value


def blend_checkpoints(checkpoints: Sequence[Mapping[str, Any]], weights: Sequence[float],
                      names: Sequence[str] | None = None) -> dict[str, Any]:
    """One checkpoint whose floating tensors are ``sum_k weights[k] * checkpoints[k]``.

    Integer tensors (BatchNorm's batch counters) come from the checkpoint of the largest weight, as do the settings
    that rebuild the network. What describes a single training run (metrics, optimizer, epoch, version) is dropped.
    ``names`` label the checkpoints in errors. ``ValueError`` naming the first mismatch.
    """
    import torch

    weights = check_blend_weights(weights, len(checkpoints))
    names = list(names) if names is not None else [f"checkpoint {k + 1}" for k in range(len(checkpoints))]
    first, first_name = checkpoints[0], names[0]
    for other, name in zip(checkpoints[1:], names[1:]):
        for key in SAME_NETWORK_KEYS:
            if _setting(other, key, name) != _setting(first, key, first_name):
                raise ValueError(f"{name} is not the same network as {first_name}: {key} {other.get(key)!r} vs "
                                 f"{first.get(key)!r}")
    states = [_state(c, n) for c, n in zip(checkpoints, names)]
    keys = list(states[0])
    for state, name in zip(states[1:], names[1:]):
        missing = [k for k in keys if k not in state]
        extra = [k for k in state if k not in states[0]]
        if missing or extra:
            raise ValueError(f"{name} has other tensors than {first_name}: missing {missing[:3]}, extra {extra[:3]}")
        for k in keys:
            if tuple(state[k].shape) != tuple(states[0][k].shape):
                raise ValueError(f"{name}: tensor {k} has shape {tuple(state[k].shape)}, {first_name} has "
                                 f"{tuple(states[0][k].shape)}")
    lead = max(range(len(weights)), key=lambda k: weights[k])
    blended: dict[str, Any] = {}
    for k in keys:
        if torch.is_floating_point(states[0][k]):
            total = torch.zeros_like(states[0][k], dtype=torch.float64)
            for state, w in zip(states, weights):
                total += w * state[k].detach().to(torch.float64)
            blended[k] = total.to(states[0][k].dtype)
        else:
            blended[k] = states[lead][k].clone()
    out = {key: value for key, value in checkpoints[lead].items() if key not in RUN_ONLY_KEYS}
    out.pop("state_dict", None)
    out["model_state"] = blended
    out.pop("init", None)
    return out


__all__ = ["RUN_ONLY_KEYS", "SAME_NETWORK_KEYS", "blend_checkpoints", "check_blend_weights"]
