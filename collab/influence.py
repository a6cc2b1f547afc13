"""Fed-Influence: how much each rover moved the global model, estimated without retraining (pure numpy).

Fed-Influence (Xue et al., "Toward Understanding the Influence of Individual Clients in Federated Learning",
AAAI 2021) of rover ``k`` is the change of the final parameters had ``k`` never taken part:
``I_k = theta_{-k} - theta`` (same rounds, same selection, ``k``'s updates left out). It is estimated alongside
training, with no retraining and no replay of earlier rounds, by carrying ``Delta_k ~ I_k`` through every FedAvg round
``theta' = theta + lr * sum_i p_i delta_i(theta)`` (``p_i = n_i / sum_S n``) to first order:

    Delta_k' = Delta_k + lr * sum_{i in S, i != k} p'_i D_i Delta_k + lr * (u_{-k} - u)

with ``u = sum_i p_i delta_i`` the round's step, ``u_{-k}`` the same mean without ``k`` (weights ``p'_i``
renormalised; ``u_{-k} = u`` and ``p' = p`` when ``k`` is not in the round, ``u_{-k} = 0`` when ``k`` was alone), and
``D_i Delta`` rover ``i``'s directional derivative of its local delta: how its delta changes when its round starts
from ``theta + Delta`` instead of ``theta``. The rover computes it from its own data (:func:`directional_change`, one
more local round per tracked rover: linear cost) and sends only that vector, nothing of its data; the coordinator's
extra work is linear in the rovers and the parameters. Nothing assumes a convex loss or an optimal final model:
the recursion follows the actual trajectory. For a loss ``L`` (a cloud test set, a rover's held-out loss)
``grad L(theta) . Delta_k`` estimates ``L(theta_{-k}) - L(theta)``: negative means the model would be better without
rover ``k`` (:meth:`InfluenceEstimator.loss_change`). docs/collab_algorithms.md, "Fed-Influence".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from forest_perception.collab.updates import ClientUpdate, NDArrays, update_delta

LocalDelta = Callable[[NDArrays], NDArrays]
"""``local_delta(start_params)``: a rover's local round from ``start_params`` (same data, same seed), its delta."""


def directional_change(local_delta: LocalDelta, params: Sequence[np.ndarray], direction: Sequence[np.ndarray],
                       delta_at_params: Sequence[np.ndarray] | None = None, eps: float | None = 1e-3) -> NDArrays:
    """``D Delta``: the change of a rover's local delta per unit step along ``direction``, by finite differences.

    ``local_delta`` must be deterministic (same batches, same seed). The step is ``eps`` in norm along the direction
    (scaled back afterwards); ``eps=None`` steps the whole direction (a secant: ``delta(theta + Delta) - delta(theta)``,
    the right scale for float32 networks, whose rounding would swamp a tiny step). A zero direction gives zeros
    without training. One extra local round (two without ``delta_at_params``).
    """
    params64 = [np.asarray(p, dtype=np.float64) for p in params]
    dir64 = [np.asarray(d, dtype=np.float64) for d in direction]
    norm = float(np.sqrt(sum(float(np.sum(d * d)) for d in dir64)))
    if norm == 0.0:
        return [np.zeros_like(p) for p in params64]
    h = 1.0 if eps is None else eps / norm
    base = delta_at_params if delta_at_params is not None else local_delta([p.copy() for p in params64])
    moved = local_delta([p + h * d for p, d in zip(params64, dir64)])
    return [(np.asarray(m, dtype=np.float64) - np.asarray(b, dtype=np.float64)) / h for m, b in zip(moved, base)]


class InfluenceEstimator:
    """Carries every tracked rover's Fed-Influence ``Delta_k`` through FedAvg rounds (see the module docstring).

    ``server_lr`` is the aggregation's global step. Rovers are tracked from their first round (their influence
    starts at zero); :meth:`directions` lists what each round's rovers need to compute their directional changes.
    """

    def __init__(self, initial_params: Sequence[np.ndarray], server_lr: float = 1.0) -> None:
        self._shapes = [tuple(np.shape(p)) for p in initial_params]
        self._reference = [np.asarray(p) for p in initial_params]
        self.server_lr = float(server_lr)
        self._delta: dict[str, NDArrays] = {}
        self.rounds = 0

    @property
    def rovers(self) -> list[str]:
        """The tracked rovers, sorted."""
        return sorted(self._delta)

    def track(self, client_ids: Sequence[str]) -> None:
        """Start tracking rovers not tracked yet (influence zero: they have not moved the model)."""
        for cid in client_ids:
            self._delta.setdefault(str(cid), [np.zeros(s, dtype=np.float64) for s in self._shapes])

    def _nonzero(self) -> list[str]:
        return [k for k, v in self._delta.items() if any(np.any(x) for x in v)]

    def directions(self) -> dict[str, NDArrays]:
        """Copies of the current ``Delta_k`` of every tracked rover (the directions a round's rovers differentiate
        along); rovers whose ``Delta_k`` is still zero are left out (their change is zero)."""
        return {k: [d.copy() for d in self._delta[k]] for k in self._nonzero()}

    def influence(self, client_id: str) -> NDArrays:
        """``Delta_k``: the estimated change of the parameters had rover ``client_id`` never taken part."""
        if client_id not in self._delta:
            raise KeyError(f"rover {client_id!r} is not tracked; tracked: {', '.join(self.rovers) or 'none'}")
        return [d.copy() for d in self._delta[client_id]]

    def loss_change(self, client_id: str, loss_gradient: Sequence[np.ndarray]) -> float:
        """``grad L . Delta_k``: the estimated ``L(theta_{-k}) - L(theta)``; negative: better without the rover."""
        return float(sum(np.sum(np.asarray(g, dtype=np.float64) * d)
                         for g, d in zip(loss_gradient, self.influence(client_id))))

    def state_dict(self) -> dict:
        """The tracked influences and the round count (numpy arrays, str, int, float, dicts only)."""
        return {"server_lr": self.server_lr, "rounds": self.rounds,
                "influence": {k: [d.copy() for d in v] for k, v in self._delta.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        """Resume from :meth:`state_dict`; ``ValueError`` for another server step or other tensor shapes."""
        if float(state["server_lr"]) != self.server_lr:
            raise ValueError(f"influence state has server_lr {state['server_lr']}, this run {self.server_lr}")
        delta = {}
        for k, arrays in state["influence"].items():
            if [tuple(np.shape(a)) for a in arrays] != self._shapes:
                raise ValueError(f"influence state of rover {k!r} does not fit the model's tensors")
            delta[str(k)] = [np.asarray(a, dtype=np.float64) for a in arrays]
        self._delta = delta
        self.rounds = int(state["rounds"])

    def step(self, updates: Sequence[ClientUpdate], changes: Mapping[str, Mapping[str, Sequence[np.ndarray]]],
             global_params: Sequence[np.ndarray] | None = None) -> None:
        """One FedAvg round: ``updates`` are its accepted deltas, ``changes[i][k]`` rover ``i``'s ``D_i Delta_k``.

        A direction missing from ``changes[i]`` counts as zero change only when ``Delta_k`` is zero; otherwise the
        round is refused (``ValueError`` naming rover and direction), since leaving it out would bias every estimate.
        """
        if not updates:
            self.rounds += 1
            return
        reference = self._reference if global_params is None else global_params
        ids = [u.client_id for u in updates]
        if len(set(ids)) != len(ids):
            raise ValueError(f"influence step: a rover appears twice in the round ({ids})")
        self.track(ids)
        deltas = {u.client_id: update_delta(u, reference) for u in updates}
        weights = {u.client_id: float(u.num_examples) for u in updates}
        total = sum(weights.values())
        step = [sum(weights[c] * deltas[c][t] for c in ids) / total for t in range(len(self._shapes))]
        needed = set(self._nonzero())
        for i in ids:
            missing = [k for k in needed if k not in changes.get(i, {})]
            if missing:
                raise ValueError(f"influence step: rover {i!r} sent no directional change along {missing}")
        new: dict[str, NDArrays] = {}
        for k, current in self._delta.items():
            members = [i for i in ids if i != k]
            rest = sum(weights[i] for i in members)
            out = [d.copy() for d in current]
            if members and k in needed:
                for i in members:
                    change = changes[i][k]
                    for t in range(len(out)):
                        out[t] += self.server_lr * weights[i] / rest * np.asarray(change[t], dtype=np.float64)
            if k in weights:  # u_{-k} - u: the round's step without k's update
                for t in range(len(out)):
                    without = sum(weights[i] * deltas[i][t] for i in members) / rest if members else 0.0
                    out[t] += self.server_lr * (without - step[t])
            new[k] = out
        self._delta = new
        self.rounds += 1


__all__ = ["InfluenceEstimator", "LocalDelta", "directional_change"]
