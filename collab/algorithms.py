"""Federated aggregation for the rover swarm, in plain numpy (no torch, no Flower).

Every rule works on deltas ``d_i = local_i - global`` in float64 and returns ``global + server_lr * step``
in the global model's dtypes: :func:`fedavg`, :func:`fedsubavg`, :func:`robust_fedavg`, and the stateful
:class:`FedLaAvgServer`, :class:`ScaffoldServer` and :class:`SemiCyclicServer` (MM-/MC-PSGD), which screen updates
and resume from ``state_dict()``. Formulas, variants and references: ``docs/collab_algorithms.md``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from forest_perception.collab.robust import clip_update_norm, trimmed_mean_params
from forest_perception.collab.updates import (
    ClientUpdate,
    NDArrays,
    Rejection,
    involvement,
    screen_updates,
    update_delta,
)

LOG = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclass
class AggregateResult:
    """What one aggregation round did: the new global model and which updates went in or were refused."""

    params: NDArrays
    server_round: int
    accepted: list[str] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    block: int | None = None  # SemiCyclicServer: the block this round belongs to
    chosen: str | None = None  # MC-PSGD: "mixed" or "separate", the chain that fed the block's predictor
    losses: dict[str, float] = field(default_factory=dict)  # MC-PSGD: loss of each chain's new model


def _check_updates_nonempty(updates: Sequence[ClientUpdate], what: str) -> None:
    if len(updates) == 0:
        raise ValueError(f"{what}: no updates to aggregate")


def _apply(global_params: Sequence[np.ndarray], step: Sequence[np.ndarray], server_lr: float) -> NDArrays:
    """``global + server_lr * step`` with each tensor back in the global model's dtype (integers rounded)."""
    out = []
    for base, s in zip(global_params, step):
        base = np.asarray(base)
        value = base.astype(np.float64) + server_lr * np.asarray(s, dtype=np.float64)
        if np.issubdtype(base.dtype, np.integer):
            value = np.rint(value)
        out.append(np.asarray(value.astype(base.dtype)))  # 0-d tensors stay arrays, not numpy scalars
    return out


def _weighted_mean(deltas: Sequence[Sequence[np.ndarray]], weights: Sequence[float]) -> NDArrays:
    """``sum_i w_i d_i / sum_i w_i`` tensor by tensor, float64."""
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"weights must sum to a positive number, got {total}")
    out = [np.zeros(np.shape(d), dtype=np.float64) for d in deltas[0]]
    for delta, w in zip(deltas, weights):
        for t, d in enumerate(delta):
            out[t] += (w / total) * np.asarray(d, dtype=np.float64)
    return out


def fedavg(global_params: Sequence[np.ndarray], updates: Sequence[ClientUpdate], server_lr: float = 1.0) -> NDArrays:
    """Sample-weighted FedAvg: ``global + server_lr * sum_i n_i d_i / sum_i n_i``.

    ``updates`` should have passed :func:`forest_perception.collab.updates.validate_update`; with ``server_lr = 1``
    and ``weights`` updates this is the sample-weighted mean of the local models.
    """
    _check_updates_nonempty(updates, "fedavg")
    deltas = [update_delta(u, global_params) for u in updates]
    return _apply(global_params, _weighted_mean(deltas, [u.num_examples for u in updates]), server_lr)


def robust_fedavg(
    global_params: Sequence[np.ndarray],
    updates: Sequence[ClientUpdate],
    clip_norm: float | None = None,
    trim_fraction: float = 0.0,
    server_lr: float = 1.0,
) -> NDArrays:
    """FedAvg hardened against outliers.

    Each delta is first clipped to L2 norm ``clip_norm`` (if given). With ``trim_fraction = 0``
    the clipped deltas are sample-weighted as in :func:`fedavg`; with ``trim_fraction > 0``
    they are combined by an unweighted coordinate-wise trimmed mean (sample counts are
    client-reported, so a robust rule must not trust them).
    """
    _check_updates_nonempty(updates, "robust_fedavg")
    deltas = [update_delta(u, global_params) for u in updates]
    if clip_norm is not None:
        deltas = [clip_update_norm(d, clip_norm)[0] for d in deltas]
    if trim_fraction > 0:
        step = trimmed_mean_params(deltas, trim_fraction)
    else:
        step = _weighted_mean(deltas, [u.num_examples for u in updates])
    return _apply(global_params, step, server_lr)


def row_heat(updates: Sequence[ClientUpdate], shapes: Sequence[tuple[int, ...]]) -> NDArrays:
    """Per tensor, the number of samples whose data involve each row: ``heat_m = sum_{i involves m} n_i``.

    A tensor without ``rows`` in an update counts as involving all its rows. Returns float64
    arrays of shape ``(shape[0],)`` (shape ``()`` for scalar tensors).
    """
    heat = [np.zeros(shape[:1], dtype=np.float64) for shape in shapes]
    for update in updates:
        for t, mask in enumerate(involvement(update, shapes)):
            heat[t] += update.num_examples * (1.0 if mask is None else mask.astype(np.float64))
    return heat


def fedsubavg(
    global_params: Sequence[np.ndarray],
    updates: Sequence[ClientUpdate],
    heat: Sequence[np.ndarray] | None = None,
    total_examples: float | None = None,
    server_lr: float = 1.0,
) -> NDArrays:
    """Federated submodel averaging, row by row: ``x_m += coef_m * sum_i n_i d_im / sum_i n_i``.

    ``coef_m = total / heat_m``. With ``heat=None`` the heat and total come from this round's
    updates (their ``rows`` masks), so each row becomes the sample-weighted mean of the deltas
    of the clients that involve it, and rows nobody involves stay put. With a server-side
    population ``heat`` (per tensor, samples involving each row over all rovers) pass the
    population ``total_examples`` too: the per-row step is then unbiased under client sampling,
    as in the paper. A row of heat 0 is left unchanged.
    """
    _check_updates_nonempty(updates, "fedsubavg")
    shapes = [tuple(np.shape(p)) for p in global_params]
    round_total = float(sum(u.num_examples for u in updates))
    round_heat = row_heat(updates, shapes)
    if heat is None:
        heat, total = round_heat, round_total
    else:
        if total_examples is None:
            raise ValueError("fedsubavg: a given heat needs total_examples (the population's sample count)")
        total = float(total_examples)
        if len(heat) != len(shapes):
            raise ValueError(f"fedsubavg: heat has {len(heat)} entries, the model has {len(shapes)} tensors")
        heat = [np.asarray(h, dtype=np.float64) for h in heat]
        for t, (h, rh, shape) in enumerate(zip(heat, round_heat, shapes)):
            if h.shape != tuple(shape[:1]):
                raise ValueError(f"fedsubavg: heat[{t}] has shape {h.shape}, expected {tuple(shape[:1])}")
            if np.any(h < rh - 1e-9 * max(1.0, float(np.max(rh, initial=0.0)))):
                m = int(np.argmax(rh - h)) if h.ndim else 0
                raise ValueError(f"fedsubavg: heat[{t}] row {m} is below the samples that involve it in this round")
        if total < round_total:
            raise ValueError(f"fedsubavg: total_examples {total} is below this round's {round_total} samples")
    step = []
    deltas = [update_delta(u, global_params) for u in updates]
    for t, shape in enumerate(shapes):
        weighted = np.zeros(shape, dtype=np.float64)
        for u, d in zip(updates, deltas):
            weighted += u.num_examples * d[t]
        h = heat[t]
        coef = np.divide(total, h, out=np.zeros_like(h), where=h > 0)
        coef = coef.reshape(coef.shape + (1,) * (len(shape) - coef.ndim))
        step.append(coef * weighted / round_total)
    return _apply(global_params, step, server_lr)


# ---------------------------------------------------------------------------------------------- state helpers


def _copy_arrays(arrays: Sequence[np.ndarray]) -> NDArrays:
    return [np.array(a, copy=True) for a in arrays]


def _check_like(what: str, arrays: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> None:
    if len(arrays) != len(reference):
        raise ValueError(f"{what}: {len(arrays)} tensors, the model has {len(reference)}")
    for t, (a, r) in enumerate(zip(arrays, reference)):
        if np.shape(a) != np.shape(r):
            raise ValueError(f"{what}: tensor {t} has shape {np.shape(a)}, the model has {np.shape(r)}")


def state_header(algorithm: str, config: dict, last_round: int, version: int = STATE_VERSION) -> dict:
    """What every server's state starts with: algorithm, state version, config and last round."""
    return {"algorithm": algorithm, "version": version, "config": config, "last_round": last_round}


def check_state_header(state: dict, algorithm: str, config: dict, version: int = STATE_VERSION) -> None:
    """Refuse (``ValueError``) a state of another algorithm, state version or config."""
    if state.get("algorithm") != algorithm:
        raise ValueError(f"state is for {state.get('algorithm')!r}, not {algorithm!r}")
    if state.get("version") != version:
        raise ValueError(f"state version {state.get('version')!r}, this code reads version {version}")
    saved = state.get("config", {})
    for key, value in config.items():
        if saved.get(key) != value:
            raise ValueError(f"state config {key}={saved.get(key)!r} differs from this server's {value!r}")


# ---------------------------------------------------------------------------------------------- FedSubAvg


class FedSubAvgServer:
    """FedSubAvg with the population's heat, as the paper and its official code run it.

    Each rover's update names the rows its data involve (``rows``) and its sample count. The server keeps every
    rover's latest involvement and count, so that ``heat_m`` (samples of all rovers whose data involve row ``m``) and
    the total are counted over the population heard from so far, not over this round's rovers; each row then moves by
    ``(total / heat_m) * sum_i n_i d_im / sum_i n_i`` (:func:`fedsubavg`). Once every rover has reported, this is the
    official ``coef = total samples / samples of the clients involving the row``; the per-round variant (heat of this
    round's rovers only) is ``round_heat=True``. A round whose updates are all refused leaves the model unchanged.
    """

    ALGORITHM = "fedsubavg"

    def __init__(
        self,
        initial_params: Sequence[np.ndarray],
        server_lr: float = 1.0,
        max_norm: float | None = None,
        max_staleness: int = 0,
        round_heat: bool = False,
    ) -> None:
        if max_staleness < 0:
            raise ValueError(f"FedSubAvgServer: max_staleness must be >= 0, got {max_staleness}")
        self.server_lr = float(server_lr)
        self.max_norm = max_norm
        self.max_staleness = int(max_staleness)
        self.round_heat = bool(round_heat)
        self._params = _copy_arrays(initial_params)
        self._shapes = [tuple(np.shape(p)) for p in self._params]
        self._rovers: dict[str, dict] = {}  # client_id -> {"num_examples", "rows": [row indices or None per tensor]}
        self._last_round = 0

    @property
    def params(self) -> NDArrays:
        """A copy of the current global model."""
        return _copy_arrays(self._params)

    def population_heat(self) -> tuple[NDArrays, float]:
        """Per tensor, the samples of all known rovers involving each row, and their total sample count."""
        heat = [np.zeros(shape[:1], dtype=np.float64) for shape in self._shapes]
        for stats in self._rovers.values():
            for t, rows in enumerate(stats["rows"]):
                if rows is None:
                    heat[t] += stats["num_examples"]
                else:
                    heat[t][rows] += stats["num_examples"]
        return heat, float(sum(s["num_examples"] for s in self._rovers.values()))

    def aggregate(self, server_round: int, updates: Sequence[ClientUpdate]) -> AggregateResult:
        """Screen, record the rovers' involvement, and move each row by the population-weighted FedSubAvg step."""
        if server_round <= self._last_round:
            raise ValueError(f"FedSubAvgServer: round {server_round} is not after the last round {self._last_round}")
        accepted, rejected = screen_updates(
            updates, self._params, server_round, max_norm=self.max_norm, max_staleness=self.max_staleness, logger=LOG
        )
        self._last_round = int(server_round)
        if not accepted:
            return AggregateResult(self.params, int(server_round), [], rejected)
        for update in accepted:
            masks = involvement(update, self._shapes)
            self._rovers[update.client_id] = {
                "num_examples": int(update.num_examples),
                "rows": [None if m is None else np.flatnonzero(m).astype(np.int64) for m in masks],
            }
        if self.round_heat:
            self._params = fedsubavg(self._params, accepted, server_lr=self.server_lr)
        else:
            heat, total = self.population_heat()
            self._params = fedsubavg(self._params, accepted, heat=heat, total_examples=total,
                                     server_lr=self.server_lr)
        return AggregateResult(self.params, int(server_round), [u.client_id for u in accepted], rejected)

    def _config(self) -> dict:
        return {"server_lr": self.server_lr, "max_norm": self.max_norm, "max_staleness": self.max_staleness,
                "round_heat": self.round_heat}

    def state_dict(self) -> dict:
        """Everything needed to resume: the model and every rover's latest involvement."""
        return {
            **state_header(self.ALGORITHM, self._config(), self._last_round),
            "params": _copy_arrays(self._params),
            "rovers": {cid: {"num_examples": s["num_examples"],
                             "rows": [None if r is None else np.array(r, copy=True) for r in s["rows"]]}
                       for cid, s in self._rovers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`; refuses a state of another algorithm, config or model shape."""
        check_state_header(state, self.ALGORITHM, self._config())
        _check_like("state params", state["params"], self._params)
        rovers = {}
        for cid, s in state["rovers"].items():
            if len(s["rows"]) != len(self._shapes):
                raise ValueError(f"state rovers[{cid!r}] has {len(s['rows'])} row entries, the model has "
                                 f"{len(self._shapes)} tensors")
            rovers[str(cid)] = {"num_examples": int(s["num_examples"]),
                                "rows": [None if r is None else np.asarray(r, dtype=np.int64) for r in s["rows"]]}
        self._params = [np.asarray(a).astype(p.dtype) for a, p in zip(state["params"], self._params)]
        self._rovers = rovers
        self._last_round = int(state["last_round"])


# ---------------------------------------------------------------------------------------------- FedLaAvg


NORMALISATION_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
"""State-dict name endings of normalisation statistics: buffers, not parameters trained by gradients."""


def normalisation_buffers(names: Sequence[str]) -> list[bool]:
    """Per tensor name, whether it is a normalisation buffer (BatchNorm running statistics or batch counter)."""
    return [str(name).rsplit(".", 1)[-1] in NORMALISATION_BUFFER_SUFFIXES for name in names]


class FedLaAvgServer:
    """Federated Latest Averaging (Yan et al. 2020): every round, the mean of all N rovers' latest updates.

    The server keeps each rover's latest *scaled gradient sum* ``g_i = delta_i / lr_i`` (``lr_i`` is the local
    learning rate the rover reports as metric ``lr``; 1 when it reports none), over the trainable tensors only, and
    moves the model by ``server_lr * lr * sum_i w_i g_i / W`` with ``lr`` the learning rate of this round (the
    server step equals the local one). ``W`` counts the whole population: ``population`` rovers (at least those heard
    from), so a rover never heard from counts as zero, as in the paper. ``weighting="uniform"`` gives every rover
    ``1/N``; ``"samples"`` weighs ``n_i`` and counts an unheard rover as the mean sample count. During the first
    ``warmup_rounds`` rounds latest gradients are collected and the model stays put (the official code's warm-up).

    ``buffers`` marks normalisation statistics (BatchNorm running mean / variance / counter, see
    :func:`normalisation_buffers`). They are no gradients: re-adding their old deltas every round drives the running
    variance below zero within a few rounds. They are averaged over this round's updates instead (FedAvg).
    :meth:`select` picks the rovers heard from least recently. A round whose updates are all refused leaves the
    model unchanged.
    """

    ALGORITHM = "fedlaavg"
    STATE_VERSION = 2

    def __init__(
        self,
        initial_params: Sequence[np.ndarray],
        weighting: Literal["uniform", "samples"] = "uniform",
        server_lr: float = 1.0,
        max_norm: float | None = None,
        max_staleness: int = 0,
        clip_norm: float | None = None,
        buffers: Sequence[bool] | None = None,
        population: int = 0,
        warmup_rounds: int = 0,
    ) -> None:
        if weighting not in ("uniform", "samples"):
            raise ValueError(f"FedLaAvgServer: weighting must be 'uniform' or 'samples', got {weighting!r}")
        if max_staleness < 0:
            raise ValueError(f"FedLaAvgServer: max_staleness must be >= 0, got {max_staleness}")
        if warmup_rounds < 0:
            raise ValueError(f"FedLaAvgServer: warmup_rounds must be >= 0, got {warmup_rounds}")
        if population < 0:
            raise ValueError(f"FedLaAvgServer: population must be >= 0, got {population}")
        self._params = _copy_arrays(initial_params)
        buffers = [False] * len(self._params) if buffers is None else [bool(b) for b in buffers]
        if len(buffers) != len(self._params):
            raise ValueError(f"FedLaAvgServer: buffers marks {len(buffers)} tensors, the model has {len(self._params)}")
        self.weighting = weighting
        self.server_lr = float(server_lr)
        self.max_norm = max_norm
        self.max_staleness = int(max_staleness)
        self.clip_norm = clip_norm
        self.buffers = buffers
        self.warmup_rounds = int(warmup_rounds)
        self.population = int(population)
        self._trainable = [t for t, b in enumerate(buffers) if not b]
        self._latest: dict[str, dict] = {}  # client_id -> {"grad": float64 arrays (trainable), "num_examples", "round"}
        self._last_seen: dict[str, int] = {}  # client_id -> server round its last update was accepted
        self._last_round = 0

    @property
    def params(self) -> NDArrays:
        """A copy of the current global model."""
        return _copy_arrays(self._params)

    @property
    def num_clients(self) -> int:
        """How many rovers have a stored latest update."""
        return len(self._latest)

    @property
    def population_size(self) -> int:
        """N of the average: the population, or the rovers heard from when that is more."""
        return max(self.population, len(self._latest))

    def last_seen(self, client_id: str) -> int | None:
        """The server round in which ``client_id``'s last update was accepted, or None if never."""
        return self._last_seen.get(client_id)

    def latest_gradient(self, client_id: str) -> NDArrays | None:
        """A copy of ``client_id``'s stored scaled gradient sum over the trainable tensors, or None."""
        stored = self._latest.get(client_id)
        return None if stored is None else _copy_arrays(stored["grad"])

    def select(self, available_ids: Sequence[str], k: int) -> list[str]:
        """Up to ``k`` of ``available_ids``, least recently seen first (never seen before all); ties by id."""
        if k <= 0:
            raise ValueError(f"FedLaAvgServer.select: k must be positive, got {k}")
        unique = sorted(set(available_ids))
        unique.sort(key=lambda cid: self._last_seen.get(cid, -math.inf))
        return unique[:k]

    def _screen_replays(self, accepted: Sequence[ClientUpdate], rejected: list[Rejection]) -> list[ClientUpdate]:
        kept = []
        for update in accepted:
            stored = self._latest.get(update.client_id)
            lr = update.metrics.get("lr", 1.0)
            if stored is not None and update.round <= stored["round"]:
                reason, message = "stale", (f"update from client {update.client_id!r} (round {update.round}): not "
                                            f"newer than its stored update from round {stored['round']}")
            elif not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
                reason, message = "bad_metric", (f"update from client {update.client_id!r} (round {update.round}) "
                                                 f"reports learning rate {lr!r}; expected a positive number")
            else:
                kept.append(update)
                continue
            rejection = Rejection(update.client_id, int(update.round), reason, message)
            LOG.warning("refused %s [%s]", rejection.message, rejection.reason)
            rejected.append(rejection)
        return kept

    def aggregate(
        self, server_round: int, updates: Sequence[ClientUpdate], population: int | None = None,
        step_lr: float | None = None,
    ) -> AggregateResult:
        """Store this round's good updates as their rovers' latest and step with the mean over all N.

        ``population`` updates N (the strategy passes the rovers it knows); ``step_lr`` is this round's learning
        rate (default: the mean ``lr`` the accepted updates report, 1 when none does).
        """
        if server_round <= self._last_round:
            raise ValueError(f"FedLaAvgServer: round {server_round} is not after the last round {self._last_round}")
        if population is not None:
            if population < 0:
                raise ValueError(f"FedLaAvgServer: population must be >= 0, got {population}")
            self.population = int(population)
        accepted, rejected = screen_updates(
            updates, self._params, server_round, max_norm=self.max_norm, max_staleness=self.max_staleness, logger=LOG
        )
        kept = self._screen_replays(accepted, rejected)
        self._last_round = int(server_round)
        if not kept:
            return AggregateResult(self.params, int(server_round), [], rejected)
        deltas = [update_delta(u, self._params) for u in kept]
        rates = [float(u.metrics.get("lr", 1.0)) for u in kept]
        for update, delta, lr in zip(kept, deltas, rates):
            trainable = [delta[t] for t in self._trainable]
            if self.clip_norm is not None:
                trainable = clip_update_norm(trainable, self.clip_norm)[0]
            self._latest[update.client_id] = {
                "grad": [np.asarray(d, dtype=np.float64) / lr for d in trainable],
                "num_examples": int(update.num_examples),
                "round": int(update.round),
            }
            self._last_seen[update.client_id] = int(server_round)
        if server_round <= self.warmup_rounds:
            return AggregateResult(self.params, int(server_round), [u.client_id for u in kept], rejected)
        lr = float(step_lr) if step_lr is not None else float(np.mean(rates))
        ids = sorted(self._latest)
        weights = [1.0 if self.weighting == "uniform" else float(self._latest[c]["num_examples"]) for c in ids]
        # W: N rovers; an unheard rover weighs 1 (uniform) or the mean sample count of those heard from (samples)
        total = self.population_size * float(np.mean(weights))
        step = [np.zeros(p.shape, dtype=np.float64) for p in self._params]
        for j, t in enumerate(self._trainable):
            acc = np.zeros(self._params[t].shape, dtype=np.float64)
            for cid, w in zip(ids, weights):
                acc += w * self._latest[cid]["grad"][j]
            step[t] = self.server_lr * lr * acc / total
        buffer_ids = [t for t, b in enumerate(self.buffers) if b]
        if buffer_ids:  # normalisation statistics: this round's sample-weighted mean, never re-added later
            mean = _weighted_mean([[d[t] for t in buffer_ids] for d in deltas], [u.num_examples for u in kept])
            for t, value in zip(buffer_ids, mean):
                step[t] = value
        self._params = _apply(self._params, step, 1.0)
        return AggregateResult(self.params, int(server_round), [u.client_id for u in kept], rejected)

    def _config(self) -> dict:
        return {
            "weighting": self.weighting,
            "server_lr": self.server_lr,
            "max_norm": self.max_norm,
            "max_staleness": self.max_staleness,
            "clip_norm": self.clip_norm,
            "buffers": list(self.buffers),
            "warmup_rounds": self.warmup_rounds,
        }

    def state_dict(self) -> dict:
        """Everything needed to resume: numpy arrays, str, int, float, None, lists and dicts only."""
        return {
            **state_header(self.ALGORITHM, self._config(), self._last_round, self.STATE_VERSION),
            "params": _copy_arrays(self._params),
            "population": self.population,
            "latest": {
                cid: {"grad": _copy_arrays(s["grad"]), "num_examples": s["num_examples"], "round": s["round"]}
                for cid, s in self._latest.items()
            },
            "last_seen": dict(self._last_seen),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`; refuses a state of another algorithm, version, config or model shape."""
        check_state_header(state, self.ALGORITHM, self._config(), self.STATE_VERSION)
        _check_like("state params", state["params"], self._params)
        trainable_ref = [self._params[t] for t in self._trainable]
        for cid, s in state["latest"].items():
            _check_like(f"state latest[{cid!r}]", s["grad"], trainable_ref)
        self._params = [np.asarray(a).astype(p.dtype) for a, p in zip(state["params"], self._params)]
        self.population = int(state.get("population", 0))
        self._latest = {
            str(cid): {
                "grad": [np.asarray(d, dtype=np.float64) for d in s["grad"]],
                "num_examples": int(s["num_examples"]),
                "round": int(s["round"]),
            }
            for cid, s in state["latest"].items()
        }
        self._last_seen = {str(cid): int(r) for cid, r in state["last_seen"].items()}
        self._last_round = int(state["last_round"])


# ---------------------------------------------------------------------------------------------- SCAFFOLD


Control = dict[str, np.ndarray]
"""A rover's control variate: ``{tensor name: array}`` over the tensors it trains."""


class ScaffoldServer:
    """SCAFFOLD (Karimireddy et al. 2020): FedAvg plus control variates that cancel the rovers' client drift.

    Each rover's control ``c_i`` is the mean raw gradient of its last round's local steps (over the tensors it
    trains, keyed by name); the swarm's control ``c`` is the mean of the latest ``c_i`` of every rover heard from.
    A selected rover is sent ``c - c_i`` (:meth:`correction`), adds it to every local gradient before its optimiser
    step, and answers with its delta and its new ``c_i``: twice the bytes of FedAvg each way. A rover not yet heard
    from trains uncorrected. The model moves by the sample-weighted mean delta (:func:`fedavg`).

    An update whose control is missing, names a tensor the model lacks, has the wrong shape or is not finite is
    refused (``bad_control``) and its delta not applied. A round whose updates are all refused leaves the model and
    the controls unchanged.
    """

    ALGORITHM = "scaffold"

    def __init__(self, initial_params: Sequence[np.ndarray], names: Sequence[str], server_lr: float = 1.0,
                 max_norm: float | None = None, max_staleness: int = 0) -> None:
        if len(names) != len(initial_params):
            raise ValueError(f"ScaffoldServer: {len(names)} tensor names for {len(initial_params)} tensors")
        if max_staleness < 0:
            raise ValueError(f"ScaffoldServer: max_staleness must be >= 0, got {max_staleness}")
        self._params = _copy_arrays(initial_params)
        self.names = [str(n) for n in names]
        self._shapes = {n: np.shape(p) for n, p in zip(self.names, self._params)}
        self.server_lr = float(server_lr)
        self.max_norm = max_norm
        self.max_staleness = int(max_staleness)
        self._controls: dict[str, Control] = {}  # rover -> its latest control (float64)
        self._swarm: Control | None = None  # their mean, kept until the controls change
        self._last_round = 0

    @property
    def params(self) -> NDArrays:
        """A copy of the current global model."""
        return _copy_arrays(self._params)

    @property
    def num_controls(self) -> int:
        """How many rovers have a stored control."""
        return len(self._controls)

    def control(self, client_id: str) -> Control | None:
        """A copy of ``client_id``'s latest control, or None."""
        own = self._controls.get(client_id)
        return None if own is None else {n: a.copy() for n, a in own.items()}

    def _swarm_mean(self) -> Control:
        """``c``, computed once after the controls change (every selected rover's correction reads it)."""
        if self._swarm is None:
            sums: dict[str, np.ndarray] = {}
            counts: dict[str, int] = {}
            for own in self._controls.values():
                for name, value in own.items():
                    sums[name] = sums.get(name, 0.0) + value
                    counts[name] = counts.get(name, 0) + 1
            self._swarm = {n: sums[n] / counts[n] for n in sums}
        return self._swarm

    def swarm_control(self) -> Control:
        """``c``: per tensor, the mean of the stored controls that have it (empty before any); a copy."""
        return {n: a.copy() for n, a in self._swarm_mean().items()}

    def correction(self, client_id: str) -> Control | None:
        """``c - c_i`` over the tensors of ``client_id``'s control (float32), or None for a rover not heard from."""
        own = self._controls.get(client_id)
        if own is None:
            return None
        swarm = self._swarm_mean()
        return {n: (swarm[n] - value).astype(np.float32) for n, value in own.items()}

    def check_control(self, client_id: str, control: Control | None) -> Control:
        """The control as float64 arrays; ``ValueError`` naming what is wrong (missing, name, shape, not finite)."""
        if control is None or len(control) == 0:
            raise ValueError(f"client {client_id!r} sent no control variate")
        out: Control = {}
        for name, value in control.items():
            if name not in self._shapes:
                raise ValueError(f"client {client_id!r}: control for tensor {name!r}, which the model does not have")
            value = np.asarray(value)
            if value.shape != self._shapes[name]:
                raise ValueError(f"client {client_id!r}: control of {name!r} has shape {value.shape}, the model's "
                                 f"tensor {self._shapes[name]}")
            if not np.issubdtype(value.dtype, np.floating) or not np.all(np.isfinite(value)):
                raise ValueError(f"client {client_id!r}: control of {name!r} is not finite floating point")
            out[name] = value.astype(np.float64)
        return out

    def aggregate(self, server_round: int, updates: Sequence[ClientUpdate],
                  controls: Mapping[str, Control | None]) -> AggregateResult:
        """Screen the updates and their ``controls`` (by client id), FedAvg the good ones, store their controls."""
        if server_round <= self._last_round:
            raise ValueError(f"ScaffoldServer: round {server_round} is not after the last round {self._last_round}")
        accepted, rejected = screen_updates(
            updates, self._params, server_round, max_norm=self.max_norm, max_staleness=self.max_staleness, logger=LOG
        )
        kept, checked = [], {}
        for update in accepted:
            try:
                checked[update.client_id] = self.check_control(update.client_id, controls.get(update.client_id))
            except ValueError as exc:
                rejection = Rejection(update.client_id, int(update.round), "bad_control",
                                      f"update of round {update.round} refused: {exc}")
                LOG.warning("refused %s [%s]", rejection.message, rejection.reason)
                rejected.append(rejection)
                continue
            kept.append(update)
        self._last_round = int(server_round)
        if kept:
            self._params = fedavg(self._params, kept, server_lr=self.server_lr)
            self._controls.update(checked)
            self._swarm = None
        return AggregateResult(self.params, int(server_round), [u.client_id for u in kept], rejected)

    def _config(self) -> dict:
        return {"server_lr": self.server_lr, "max_norm": self.max_norm, "max_staleness": self.max_staleness}

    def state_dict(self) -> dict:
        """Everything needed to resume: the model and every rover's latest control."""
        return {
            **state_header(self.ALGORITHM, self._config(), self._last_round),
            "params": _copy_arrays(self._params),
            "controls": {cid: {n: a.copy() for n, a in own.items()} for cid, own in self._controls.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`; refuses another algorithm, config, model shape or a bad control."""
        check_state_header(state, self.ALGORITHM, self._config())
        _check_like("state params", state["params"], self._params)
        controls = {str(cid): self.check_control(str(cid), own) for cid, own in state["controls"].items()}
        self._params = [np.asarray(a).astype(p.dtype) for a, p in zip(state["params"], self._params)]
        self._controls = controls
        self._swarm = None
        self._last_round = int(state["last_round"])


# ---------------------------------------------------------------------------------------------- MM-/MC-PSGD


LossFn = Callable[[int, NDArrays], float]
"""``loss_fn(block, params)``: the validation loss of ``params`` on ``block``'s data."""


class SemiCyclicServer:
    """MM-PSGD / MC-PSGD for block-cyclic data (e.g. lighting blocks through a day).

    Rounds ``1, 2, ...`` fall into blocks ``block_of(r) = ((r - 1) // rounds_per_block) % num_blocks``
    (or the caller names the block). The *mixed* chain ``x`` is trained by every block's rovers
    with sample-weighted FedAvg. The predictor of block ``m`` is the running average of the
    models chosen in block ``m``'s rounds over all cycles: ``p_m += (u - p_m) / (r_m + 1)``.
    MM-PSGD (``mode="mm"``) uses ``u = x``. MC-PSGD (``mode="mc"``) also keeps a *separate*
    chain ``y_m`` per block, trained only in block ``m``'s rounds, and uses whichever of the
    new averaged ``x`` and ``y_m`` has the lower loss on block ``m``'s data (``loss_fn(m, .)``, or the losses
    given to :meth:`choose`; ties go to ``x``; a NaN/Inf loss loses).
    A round with no accepted update in any chain leaves every model and predictor unchanged.
    """

    ALGORITHM = "semicyclic"

    def __init__(
        self,
        initial_params: Sequence[np.ndarray],
        num_blocks: int,
        rounds_per_block: int = 1,
        mode: Literal["mm", "mc"] = "mm",
        server_lr: float = 1.0,
        max_norm: float | None = None,
        max_staleness: int = 0,
    ) -> None:
        if mode not in ("mm", "mc"):
            raise ValueError(f"SemiCyclicServer: mode must be 'mm' or 'mc', got {mode!r}")
        if num_blocks < 1 or rounds_per_block < 1:
            raise ValueError(
                f"SemiCyclicServer: num_blocks and rounds_per_block must be >= 1, got {num_blocks}, {rounds_per_block}"
            )
        if max_staleness < 0:
            raise ValueError(f"SemiCyclicServer: max_staleness must be >= 0, got {max_staleness}")
        self.mode = mode
        self.num_blocks = int(num_blocks)
        self.rounds_per_block = int(rounds_per_block)
        self.server_lr = float(server_lr)
        self.max_norm = max_norm
        self.max_staleness = int(max_staleness)
        self._mixed = _copy_arrays(initial_params)
        self._separate = [_copy_arrays(initial_params) for _ in range(num_blocks)] if mode == "mc" else []
        self._predictors: list[NDArrays | None] = [None] * self.num_blocks  # float64
        self._counts = [0] * self.num_blocks
        self._last_round = 0
        self._pending: dict | None = None  # MC: an aggregated round waiting for choose()

    def block_of(self, server_round: int) -> int:
        """The block of round ``server_round`` (rounds count from 1) under the fixed cyclic schedule."""
        if server_round < 1:
            raise ValueError(f"SemiCyclicServer: rounds count from 1, got {server_round}")
        return ((server_round - 1) // self.rounds_per_block) % self.num_blocks

    @property
    def params(self) -> NDArrays:
        """A copy of the mixed chain's current model ``x``."""
        return _copy_arrays(self._mixed)

    def chain_params(self, block: int) -> NDArrays:
        """A copy of block ``block``'s separate chain ``y_block`` (MC-PSGD only)."""
        if self.mode != "mc":
            raise ValueError("SemiCyclicServer: separate chains exist only in mode 'mc'")
        return _copy_arrays(self._separate[self._check_block(block)])

    def predictor(self, block: int) -> NDArrays | None:
        """Block ``block``'s predictor in the model's dtypes, or None before any of its rounds."""
        p = self._predictors[self._check_block(block)]
        if p is None:
            return None
        return [np.asarray(a.astype(ref.dtype)) for a, ref in zip(p, self._mixed)]

    def predictor_rounds(self, block: int) -> int:
        """How many models block ``block``'s predictor averages."""
        return self._counts[self._check_block(block)]

    def _check_block(self, block: int) -> int:
        if not 0 <= block < self.num_blocks:
            raise ValueError(f"SemiCyclicServer: block {block} outside [0, {self.num_blocks})")
        return int(block)

    def _train_chain(
        self, chain: NDArrays, server_round: int, updates: Sequence[ClientUpdate]
    ) -> tuple[NDArrays, list[str], list[Rejection]]:
        accepted, rejected = screen_updates(
            updates, chain, server_round, max_norm=self.max_norm, max_staleness=self.max_staleness, logger=LOG
        )
        if not accepted:
            return chain, [], rejected
        return fedavg(chain, accepted, self.server_lr), [u.client_id for u in accepted], rejected

    def aggregate(
        self,
        server_round: int,
        updates: Sequence[ClientUpdate],
        separate_updates: Sequence[ClientUpdate] = (),
        loss_fn: LossFn | None = None,
        block: int | None = None,
    ) -> AggregateResult:
        """One round: FedAvg the mixed chain (and, MC, block's separate chain) and update the block's predictor.

        ``updates`` are deltas against :attr:`params`; ``separate_updates`` (MC only) deltas against
        :meth:`chain_params` of the block. The result's ``params`` is the new mixed model; ``accepted`` lists ``"id"``
        for mixed-chain and ``"id@separate"`` for separate-chain updates.

        MC mode compares the two *averaged* chains, as the paper does: with ``loss_fn(block, params)`` given, at once;
        without it the round stays pending (:meth:`pending_chains` hands out both averaged models to score, and
        :meth:`choose` commits the round with their losses). Nothing changes until the round is committed.
        """
        if self._pending is not None:
            raise ValueError(f"SemiCyclicServer: round {self._pending['round']} waits for choose() first")
        if server_round <= self._last_round:
            raise ValueError(f"SemiCyclicServer: round {server_round} is not after the last round {self._last_round}")
        block = self.block_of(server_round) if block is None else self._check_block(block)
        if self.mode == "mm" and len(separate_updates):
            raise ValueError("SemiCyclicServer: separate_updates given in mode 'mm'")
        mixed, accepted, rejected = self._train_chain(self._mixed, server_round, updates)
        result = AggregateResult([], int(server_round), accepted, rejected, block=block)
        separate = None
        if self.mode == "mc":
            separate, sep_accepted, sep_rejected = self._train_chain(
                self._separate[block], server_round, separate_updates
            )
            result.accepted += [f"{cid}@separate" for cid in sep_accepted]
            result.rejected += sep_rejected
        if not result.accepted:
            self._last_round = int(server_round)
            result.params = self.params
            return result
        self._pending = {"round": int(server_round), "block": block, "mixed": mixed, "separate": separate,
                         "result": result}
        if self.mode == "mm":
            return self._commit("mixed", mixed)
        if loss_fn is None:
            result.params = self.params
            return result
        try:
            loss_mixed = float(loss_fn(block, _copy_arrays(mixed)))
            loss_separate = float(loss_fn(block, _copy_arrays(separate)))
        except BaseException:
            self._pending = None  # a loss_fn that raises leaves the server as it was; the round can be retried
            raise
        return self.choose(loss_mixed, loss_separate)

    def pending_chains(self) -> tuple[int, NDArrays, NDArrays] | None:
        """MC, a round waiting for :meth:`choose`: ``(block, averaged mixed x, averaged separate y_block)``."""
        if self._pending is None:
            return None
        p = self._pending
        return p["block"], _copy_arrays(p["mixed"]), _copy_arrays(p["separate"])

    def choose(self, loss_mixed: float, loss_separate: float) -> AggregateResult:
        """Commit the pending MC round: the averaged chain of lower loss feeds the block's predictor.

        Ties go to ``x``; a NaN/Inf loss loses; with both non-finite the predictor is not updated (the chains are).
        """
        if self._pending is None:
            raise ValueError("SemiCyclicServer.choose: no round is waiting for a choice")
        p = self._pending
        p["result"].losses = {"mixed": float(loss_mixed), "separate": float(loss_separate)}
        finite_mixed, finite_separate = math.isfinite(loss_mixed), math.isfinite(loss_separate)
        if not finite_mixed and not finite_separate:
            LOG.warning("round %d block %d: both chain losses are non-finite; predictor not updated",
                        p["round"], p["block"])
            return self._commit(None, None)
        if not finite_mixed or (finite_separate and loss_separate < loss_mixed):
            return self._commit("separate", p["separate"])
        return self._commit("mixed", p["mixed"])

    def _commit(self, chosen: str | None, model: NDArrays | None) -> AggregateResult:
        p, self._pending = self._pending, None
        block, result = p["block"], p["result"]
        self._last_round = p["round"]
        self._mixed = p["mixed"]
        if self.mode == "mc":
            self._separate[block] = _copy_arrays(p["separate"])
        result.chosen = chosen
        if model is not None:
            count = self._counts[block]
            current = self._predictors[block]
            model64 = [np.asarray(a, dtype=np.float64) for a in model]
            if current is None:
                self._predictors[block] = model64
            else:
                self._predictors[block] = [np.asarray(p + (u - p) / (count + 1)) for p, u in zip(current, model64)]
            self._counts[block] = count + 1
        result.params = self.params
        return result

    def _config(self) -> dict:
        return {
            "mode": self.mode,
            "num_blocks": self.num_blocks,
            "rounds_per_block": self.rounds_per_block,
            "server_lr": self.server_lr,
            "max_norm": self.max_norm,
            "max_staleness": self.max_staleness,
        }

    def state_dict(self) -> dict:
        """Everything needed to resume: numpy arrays, str, int, float, None, lists and dicts only.

        A pending MC round is not part of it (it is committed or replayed as a whole); asking then is an error.
        """
        if self._pending is not None:
            raise ValueError(f"SemiCyclicServer: round {self._pending['round']} waits for choose(); no state to save")
        return {
            **state_header(self.ALGORITHM, self._config(), self._last_round),
            "mixed": _copy_arrays(self._mixed),
            "separate": [_copy_arrays(y) for y in self._separate],
            "predictors": [None if p is None else _copy_arrays(p) for p in self._predictors],
            "counts": list(self._counts),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`; refuses a state of another algorithm, config or model shape."""
        check_state_header(state, self.ALGORITHM, self._config())
        _check_like("state mixed", state["mixed"], self._mixed)
        if len(state["separate"]) != len(self._separate):
            raise ValueError(f"state has {len(state['separate'])} separate chains, expected {len(self._separate)}")
        for m, y in enumerate(state["separate"]):
            _check_like(f"state separate[{m}]", y, self._mixed)
        if len(state["predictors"]) != self.num_blocks or len(state["counts"]) != self.num_blocks:
            raise ValueError(f"state predictors/counts are not one per block ({self.num_blocks})")
        for m, p in enumerate(state["predictors"]):
            if p is not None:
                _check_like(f"state predictors[{m}]", p, self._mixed)
        ref = self._mixed
        self._mixed = [np.asarray(a).astype(r.dtype) for a, r in zip(state["mixed"], ref)]
        self._separate = [[np.asarray(a).astype(r.dtype) for a, r in zip(y, ref)] for y in state["separate"]]
        self._predictors = [
            None if p is None else [np.asarray(a, dtype=np.float64) for a in p] for p in state["predictors"]
        ]
        self._counts = [int(c) for c in state["counts"]]
        self._last_round = int(state["last_round"])
