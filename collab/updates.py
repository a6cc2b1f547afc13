"""Client updates and the checks that keep bad ones out of the global model.

A :class:`ClientUpdate` is a rover's delta (or full weights) with optional FedSubAvg ``rows``;
:func:`validate_update` refuses a bad one with a short ``reason`` code and :func:`screen_updates` keeps a
round going without it. See ``docs/collab_algorithms.md`` ("Parameters and updates", "Bad input").
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

NDArrays = list[np.ndarray]
"""Model parameters as Flower ships them: one numpy array per tensor, in a fixed order."""

UpdateKind = Literal["delta", "weights"]

LOG = logging.getLogger(__name__)

# the reason codes UpdateRejected.reason takes, for diagnostics counters
REJECT_REASONS = (
    "client_id",  # empty or non-string client id
    "num_examples",  # not a positive integer
    "kind",  # neither "delta" nor "weights"
    "count",  # number of tensors differs from the model's
    "type",  # a tensor that is not a numpy array
    "dtype",  # a tensor's dtype differs from the model's
    "shape",  # a tensor's shape differs from the model's (or from its rows)
    "rows",  # malformed row-involvement entry
    "non_finite",  # NaN or Inf in a tensor
    "norm",  # delta's L2 norm above max_norm
    "round",  # round is not an integer
    "stale",  # trained from a round older than current_round - max_staleness
    "future_round",  # claims a round the server has not started
    "duplicate",  # second update from the same client in one batch
    "stale_mimic",  # dc-ccl: trained with another mimic than the running one
    "bad_metric",  # fedlaavg: a reported learning rate that is not a positive number
    "pack",  # the packed arrays' index is malformed or does not match their buffers
)


class UpdateRejected(ValueError):  # noqa: N818 - the name the Flower strategies are written against
    """A client update refused by :func:`validate_update`; ``reason`` is one of ``REJECT_REASONS``."""

    def __init__(self, reason: str, message: str, client_id: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.client_id = client_id


@dataclass
class ClientUpdate:
    """One client's contribution to a round.

    ``params`` holds deltas (``local - global``) when ``kind == "delta"`` and full local
    weights when ``kind == "weights"``. ``round`` is the server round whose global model
    the client trained from. ``rows`` (FedSubAvg only) has one entry per tensor: ``None``
    (the tensor is dense, all rows involved) or a boolean mask of length ``shape[0]`` or
    an array of row indices; with indices, the tensor may be uploaded compact with shape
    ``(len(indices),) + shape[1:]``. Values outside the involved rows are ignored.
    """

    client_id: str
    round: int
    num_examples: int
    params: NDArrays
    kind: UpdateKind = "delta"
    rows: list[np.ndarray | None] | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Rejection:
    """A refused update, as logged and reported back in aggregation results."""

    client_id: str
    round: int
    reason: str
    message: str


def _reference_specs(reference: Sequence) -> list[tuple[tuple[int, ...], np.dtype]]:
    """``(shape, dtype)`` per tensor, from either the global arrays or ``(shape, dtype)`` pairs."""
    specs = []
    for item in reference:
        if isinstance(item, np.ndarray):
            specs.append((tuple(item.shape), item.dtype))
        else:
            shape, dtype = item
            specs.append((tuple(int(s) for s in shape), np.dtype(dtype)))
    return specs


def row_indices(rows: np.ndarray | None, num_rows: int, where: str = "rows") -> np.ndarray:
    """Sorted unique row indices from a boolean mask or an index array (``None`` means all rows).

    Raises ``ValueError`` naming ``where`` for a mask of the wrong length, indices out of
    range or repeated, or a non-integer, non-boolean array.
    """
    if rows is None:
        return np.arange(num_rows)
    rows = np.asarray(rows)
    if rows.ndim != 1:
        raise ValueError(f"{where}: expected a 1-D mask or index array, got shape {rows.shape}")
    if rows.dtype == np.bool_:
        if rows.shape[0] != num_rows:
            raise ValueError(f"{where}: mask has {rows.shape[0]} entries, tensor has {num_rows} rows")
        return np.flatnonzero(rows)
    if not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"{where}: expected a boolean mask or integer indices, got dtype {rows.dtype}")
    if rows.size and (rows.min() < 0 or rows.max() >= num_rows):
        raise ValueError(f"{where}: index out of range [0, {num_rows}): {rows.min()}..{rows.max()}")
    unique = np.unique(rows)
    if unique.size != rows.size:
        raise ValueError(f"{where}: repeated row indices")
    return unique.astype(np.int64)


def involvement(update: ClientUpdate, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray | None]:
    """Per tensor, a boolean row mask of the rows this update involves (``None`` for dense tensors)."""
    masks: list[np.ndarray | None] = []
    for t, shape in enumerate(shapes):
        rows = None if update.rows is None else update.rows[t]
        if rows is None or len(shape) == 0:
            masks.append(None)
            continue
        mask = np.zeros(shape[0], dtype=bool)
        mask[row_indices(rows, shape[0], f"client {update.client_id!r} rows[{t}]")] = True
        masks.append(mask)
    return masks


def update_delta(update: ClientUpdate, global_params: Sequence[np.ndarray]) -> NDArrays:
    """The update as full-shape float64 deltas against ``global_params``.

    Compact FedSubAvg tensors are scattered into their rows; rows a tensor does not
    involve are zero, whatever the upload held there. A tensor count or shape that does
    not fit the model raises ``ValueError``.
    """
    who = f"client {update.client_id!r}"
    if len(update.params) != len(global_params):
        raise ValueError(f"{who}: {len(update.params)} tensors, the model has {len(global_params)}")
    if update.rows is not None and len(update.rows) != len(global_params):
        raise ValueError(f"{who}: rows has {len(update.rows)} entries, the model has {len(global_params)} tensors")
    deltas = []
    for t, (value, base) in enumerate(zip(update.params, global_params)):
        value = np.asarray(value, dtype=np.float64)
        base = np.asarray(base, dtype=np.float64)
        rows = None if update.rows is None else update.rows[t]
        if rows is None or base.ndim == 0:
            if value.shape != base.shape:
                raise ValueError(f"{who}: tensor {t} has shape {value.shape}, expected {base.shape}")
            deltas.append(np.asarray(value - base) if update.kind == "weights" else value.copy())
            continue
        idx = row_indices(rows, base.shape[0], f"{who} rows[{t}]")
        compact = value[idx] if value.shape == base.shape else value
        if compact.shape != (idx.size,) + base.shape[1:]:
            raise ValueError(
                f"{who}: tensor {t} has shape {value.shape}, expected {base.shape} "
                f"or {(idx.size,) + base.shape[1:]} for its {idx.size} rows"
            )
        if update.kind == "weights":
            compact = compact - base[idx]
        delta = np.zeros_like(base)
        delta[idx] = compact
        deltas.append(delta)
    return deltas


def params_norm(arrays: Sequence[np.ndarray]) -> float:
    """L2 norm over all tensors together, as if they were one flat vector."""
    return math.sqrt(sum(float(np.sum(np.square(np.asarray(a, dtype=np.float64)))) for a in arrays))


def validate_update(
    update: ClientUpdate,
    reference: Sequence,
    current_round: int,
    max_norm: float | None = None,
    max_staleness: int = 0,
) -> None:
    """Raise :class:`UpdateRejected` if ``update`` must not enter round ``current_round``.

    ``reference`` is the global model (arrays) or its ``(shape, dtype)`` pairs; a
    ``weights`` update with ``max_norm`` set needs the arrays, since its norm is that of
    ``weights - global``. Accepted rounds are ``current_round - max_staleness`` to
    ``current_round``. Checks, in order: client id, sample count, kind, round, tensor
    count, rows, type, dtype, shape, NaN/Inf, norm.
    """
    cid = update.client_id

    def refuse(reason: str, message: str) -> UpdateRejected:
        return UpdateRejected(reason, f"update from client {cid!r} (round {update.round}): {message}", str(cid))

    if not isinstance(cid, str) or not cid:
        raise refuse("client_id", "client_id must be a non-empty string")
    n = update.num_examples
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
        raise refuse("num_examples", f"num_examples must be a positive integer, got {n!r}")
    if update.kind not in ("delta", "weights"):
        raise refuse("kind", f"kind must be 'delta' or 'weights', got {update.kind!r}")
    if isinstance(update.round, bool) or not isinstance(update.round, (int, np.integer)):
        raise refuse("round", f"round must be an integer, got {update.round!r}")
    if update.round > current_round:
        raise refuse("future_round", f"round {update.round} is ahead of the server's round {current_round}")
    if update.round < current_round - max_staleness:
        raise refuse("stale", f"round {update.round} is older than {current_round} - max_staleness {max_staleness}")
    specs = _reference_specs(reference)
    if len(update.params) != len(specs):
        raise refuse("count", f"{len(update.params)} tensors, the model has {len(specs)}")
    if update.rows is not None and len(update.rows) != len(specs):
        raise refuse("rows", f"rows has {len(update.rows)} entries, the model has {len(specs)} tensors")
    for t, (value, (shape, dtype)) in enumerate(zip(update.params, specs)):
        if not isinstance(value, np.ndarray):
            raise refuse("type", f"tensor {t} is a {type(value).__name__}, expected numpy.ndarray")
        if value.dtype != dtype:
            raise refuse("dtype", f"tensor {t} has dtype {value.dtype}, expected {dtype}")
        rows = None if update.rows is None else update.rows[t]
        expected = [shape]
        if rows is not None:
            if len(shape) == 0:
                raise refuse("rows", f"rows[{t}] given for a scalar tensor")
            try:
                idx = row_indices(rows, shape[0], f"rows[{t}]")
            except ValueError as exc:
                raise refuse("rows", str(exc)) from None
            expected.append((idx.size,) + shape[1:])
        if tuple(value.shape) not in expected:
            wanted = " or ".join(map(str, expected))
            raise refuse("shape", f"tensor {t} has shape {tuple(value.shape)}, expected {wanted}")
        if not np.all(np.isfinite(value)):
            bad = int(np.count_nonzero(~np.isfinite(value)))
            raise refuse("non_finite", f"tensor {t} has {bad} NaN/Inf value(s)")
    if max_norm is not None:
        if update.kind == "weights":
            if not all(isinstance(r, np.ndarray) for r in reference):
                raise TypeError("validate_update: max_norm on a 'weights' update needs the global arrays as reference")
            norm = params_norm(update_delta(update, reference))
        elif update.rows is None:
            norm = params_norm(update.params)
        else:
            norm = params_norm(update_delta(update, [np.zeros(s, dtype=np.float64) for s, _ in specs]))
        if not norm <= max_norm:
            raise refuse("norm", f"delta L2 norm {norm:.6g} exceeds max_norm {max_norm:.6g}")


def screen_updates(
    updates: Sequence[ClientUpdate],
    reference: Sequence,
    current_round: int,
    max_norm: float | None = None,
    max_staleness: int = 0,
    logger: logging.Logger | None = None,
) -> tuple[list[ClientUpdate], list[Rejection]]:
    """Split a round's updates into accepted and refused; every refusal is logged with its reason.

    A second update from a client already accepted in this batch is refused as ``duplicate``.
    """
    logger = logger or LOG
    accepted: list[ClientUpdate] = []
    rejected: list[Rejection] = []
    seen: set[str] = set()
    for update in updates:
        try:
            validate_update(update, reference, current_round, max_norm=max_norm, max_staleness=max_staleness)
            if update.client_id in seen:
                raise UpdateRejected(
                    "duplicate",
                    f"update from client {update.client_id!r} (round {update.round}): second update in round "
                    f"{current_round}, the first was kept",
                    update.client_id,
                )
        except UpdateRejected as exc:
            rejection = Rejection(str(update.client_id), int(update.round), exc.reason, str(exc))
            logger.warning("refused %s [%s]", rejection.message, rejection.reason)
            rejected.append(rejection)
            continue
        seen.add(update.client_id)
        accepted.append(update)
    return accepted, rejected
