"""Flower strategies (Message API) of the coordinator: one per aggregation algorithm.

Each is a :class:`~forest_perception.collab.flower.rover_strategy.RoverStrategy` (selection, messages, round
records) around its rule's pure numpy server of :mod:`forest_perception.collab.algorithms`; what each does:
``docs/federated.md`` ("The strategies").
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from forest_perception.collab.algorithms import (
    AggregateResult,
    FedLaAvgServer,
    FedSubAvgServer,
    SemiCyclicServer,
    fedavg,
    normalisation_buffers,
    robust_fedavg,
)
from forest_perception.collab.flower.messages import META_KEY, SEPARATE_KEY, arrays_to_record
from forest_perception.collab.flower.rover_strategy import Availability, AveragingServer, RoverStrategy, StrategyConfig
from forest_perception.collab.flower.store import params_digest
from forest_perception.collab.updates import ClientUpdate, NDArrays, UpdateRejected, screen_updates

LOG = logging.getLogger(__name__)

ALGORITHMS: tuple[str, ...] = ("fedavg", "fedsubavg", "fedlaavg", "mm-psgd", "mc-psgd", "robust", "dc-ccl")


class FedAvgStrategy(RoverStrategy):
    """Sample-weighted FedAvg of the rovers' deltas."""

    algorithm = "fedavg"


class FedSubAvgStrategy(RoverStrategy):
    """FedSubAvg: each row moves by ``total / heat_m`` times the round's sample-weighted mean delta on it.

    ``heat_m`` and the total count the samples of every rover heard from (the population's heat, as in the paper);
    rows nobody in the round involved stay put.
    """

    algorithm = "fedsubavg"

    def make_server(self, initial: NDArrays) -> FedSubAvgServer:
        """The FedSubAvg server (keeps each rover's involvement and sample count)."""
        s = self.settings
        return FedSubAvgServer(initial, server_lr=s.server_lr, max_norm=s.max_norm, max_staleness=s.max_staleness)


class DcCclStrategy(RoverStrategy):
    """DC-CCL: sample-weighted FedAvg of the rovers' small submodels, each trained on the running mimic.

    The mimic's version goes to every rover with the round config (``mimic-version``, from the train config); an
    update trained with any other mimic is refused (reason ``stale_mimic``) and counted in the round record.
    """

    algorithm = "dc-ccl"

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401 - RoverStrategy's arguments
        super().__init__(*args, **kwargs)
        self.mimic_version = str(self.train_config.get("mimic-version", ""))
        if not self.mimic_version:
            raise ValueError("the dc-ccl strategy needs the running mimic's version (train config mimic-version)")

    def make_server(self, initial: NDArrays) -> AveragingServer:
        """FedAvg of the small submodels."""
        s = self.settings
        return AveragingServer(
            "dc-ccl", initial, partial(fedavg, server_lr=s.server_lr), s.max_norm, s.max_staleness,
            {"server_lr": s.server_lr},
        )

    def screen_reply(self, content: RecordDict, rover: str, server_round: int) -> None:
        """Refuse an update whose rover trained with another mimic than the running one."""
        meta = content.config_records.get(META_KEY)
        version = None if meta is None else meta.get("mimic-version")
        if version != self.mimic_version:
            raise UpdateRejected(
                "stale_mimic",
                f"update from rover {rover!r} (round {server_round}) was trained with mimic {version or 'unknown'}, "
                f"the running mimic is {self.mimic_version}",
                rover,
            )


class RobustStrategy(RoverStrategy):
    """FedAvg with per-update norm clipping (``clip_norm``) and/or a coordinate-wise trimmed mean."""

    algorithm = "robust"

    def make_server(self, initial: NDArrays) -> AveragingServer:
        """Robust FedAvg."""
        s = self.settings
        rule = partial(robust_fedavg, clip_norm=s.clip_norm, trim_fraction=s.trim_fraction, server_lr=s.server_lr)
        return AveragingServer(
            "robust", initial, rule, s.max_norm, s.max_staleness,
            {"server_lr": s.server_lr, "clip_norm": s.clip_norm, "trim_fraction": s.trim_fraction},
        )


class FedLaAvgStrategy(RoverStrategy):
    """FedLaAvg: the model moves by the mean latest gradient of all N rovers; least recently seen go first.

    N is ``fedlaavg_population`` or, when 0, every rover the coordinator has identified; BatchNorm statistics are
    averaged per round, never kept as latest updates; the server step is this round's local learning rate.
    """

    algorithm = "fedlaavg"

    def make_server(self, initial: NDArrays) -> FedLaAvgServer:
        """The FedLaAvg server (keeps every rover's latest gradient)."""
        s = self.settings
        return FedLaAvgServer(
            initial, weighting=s.weighting, server_lr=s.server_lr, max_norm=s.max_norm,
            max_staleness=s.max_staleness, clip_norm=s.clip_norm, buffers=normalisation_buffers(self.names),
            population=s.fedlaavg_population, warmup_rounds=s.fedlaavg_warmup,
        )

    def population(self) -> int:
        """N: the configured population, or the rovers identified so far."""
        return self.settings.fedlaavg_population or len(set(self.directory.values()))

    def run_server(
        self, server_round: int, updates: list[ClientUpdate], separate: list[ClientUpdate]
    ) -> AggregateResult:
        """Aggregate with N from the population and the step at this round's learning rate."""
        # rovers report the learning rate they used; raw deltas without one step as they are
        reported = any("lr" in u.metrics for u in updates)
        return self.server.aggregate(server_round, updates, population=self.population(),
                                     step_lr=self.round_lr(server_round) if reported else None)

    def select(self, available: dict[int, str], server_round: int, k: int) -> list[int]:
        """The ``k`` available rovers heard from least recently (``FedLaAvgServer.select``)."""
        by_rover = {r: n for n, r in available.items()}
        return [by_rover[r] for r in self.server.select(list(by_rover), k)]


class SemiCyclicStrategy(RoverStrategy):
    """MM-PSGD (``mode="mm"``) / MC-PSGD (``mode="mc"``) for block-cyclic data.

    Round ``r`` belongs to block ``((r - 1) // rounds_per_block) % num_blocks``; rovers are told
    the block (``config["block"]``). Evaluation uses the block's predictor. In MC mode every
    selected rover trains both the mixed model and the block's separate chain (two deltas in
    one reply, twice the traffic), and the chain whose accepted rovers report the lower mean
    local validation loss feeds the block's predictor (the paper compares the clients'
    average local losses).
    """

    def __init__(self, *args: Any, mode: str = "mm", **kwargs: Any) -> None:  # noqa: ANN401
        if mode not in ("mm", "mc"):
            raise ValueError(f"SemiCyclicStrategy: mode must be 'mm' or 'mc', got {mode!r}")
        self.mode = mode
        self.algorithm = "mm-psgd" if mode == "mm" else "mc-psgd"
        super().__init__(*args, **kwargs)

    def make_server(self, initial: NDArrays) -> SemiCyclicServer:
        """The semi-cyclic server (mixed chain, separate chains in MC mode, per-block predictors)."""
        s = self.settings
        return SemiCyclicServer(
            initial, num_blocks=s.num_blocks, rounds_per_block=s.rounds_per_block, mode=self.mode,
            server_lr=s.server_lr, max_norm=s.max_norm, max_staleness=s.max_staleness,
        )

    def chains(self) -> tuple[str, ...]:
        """MC-PSGD trains the mixed and the block's separate chain."""
        return ("mixed", "separate") if self.mode == "mc" else ("mixed",)

    def block_of(self, server_round: int) -> int:
        """The block of a round."""
        return self.server.block_of(server_round)

    def round_extras(self, server_round: int) -> dict:
        """Tell rovers the block and the chains to train."""
        return {"block": self.block_of(server_round), "chains": ",".join(self.chains())}

    def train_content(self, server_round: int, config: ConfigRecord) -> RecordDict:
        """Global (mixed) model, plus the block's separate chain in MC mode."""
        content = super().train_content(server_round, config)
        if self.mode == "mc":
            separate = self.server.chain_params(self.block_of(server_round))
            content[SEPARATE_KEY] = arrays_to_record(self.names, separate)
        return content

    def eval_params(self, server_round: int) -> NDArrays:
        """The predictor of the round's block (the mixed model before the block has one)."""
        predictor = self.server.predictor(self.block_of(server_round))
        return self.params if predictor is None else predictor

    def run_server(
        self, server_round: int, updates: list[ClientUpdate], separate: list[ClientUpdate]
    ) -> AggregateResult:
        """MM: FedAvg the mixed chain. MC: both chains, the lower mean reported validation loss wins."""
        if self.mode == "mm":
            return self.server.aggregate(server_round, updates)
        block = self.block_of(server_round)
        s = self.settings
        quiet = logging.getLogger(f"{__name__}.prescreen")
        quiet.disabled = True
        # the server screens again inside; this copy only tells which rovers' losses count
        good_mixed, _ = screen_updates(updates, self.server.params, server_round, s.max_norm, s.max_staleness, quiet)
        good_sep, _ = screen_updates(
            separate, self.server.chain_params(block), server_round, s.max_norm, s.max_staleness, quiet
        )
        losses = [_mean_loss(good_mixed, "val-loss"), _mean_loss(good_sep, "val-loss-separate")]
        seen: list[str] = []

        def loss_fn(_block: int, params: NDArrays) -> float:
            seen.append(params_digest(params))
            return losses[len(seen) - 1]

        result = self.server.aggregate(server_round, updates, separate, loss_fn=loss_fn)
        if seen and seen[0] != params_digest(self.server.params):
            raise RuntimeError("SemiCyclicServer asked for the chains' losses in an unexpected order")
        return result


def _mean_loss(updates: Sequence[ClientUpdate], key: str) -> float:
    pairs = [(u.num_examples, u.metrics[key]) for u in updates if math.isfinite(u.metrics.get(key, math.nan))]
    total = sum(n for n, _ in pairs)
    return sum(n * v for n, v in pairs) / total if total else math.nan


def build_strategy(
    algorithm: str,
    names: Sequence[str],
    initial: Sequence[np.ndarray],
    config: StrategyConfig | None = None,
    train_config: dict | None = None,
    availability: Availability | None = None,
) -> RoverStrategy:
    """The strategy of ``algorithm`` (one of :data:`ALGORITHMS`)."""
    kwargs = {"config": copy.copy(config), "train_config": train_config, "availability": availability}
    if algorithm == "fedavg":
        return FedAvgStrategy(names, initial, **kwargs)
    if algorithm == "fedsubavg":
        return FedSubAvgStrategy(names, initial, **kwargs)
    if algorithm == "robust":
        return RobustStrategy(names, initial, **kwargs)
    if algorithm == "dc-ccl":
        return DcCclStrategy(names, initial, **kwargs)
    if algorithm == "fedlaavg":
        return FedLaAvgStrategy(names, initial, **kwargs)
    if algorithm in ("mm-psgd", "mc-psgd"):
        return SemiCyclicStrategy(names, initial, mode=algorithm[:2], **kwargs)
    raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")


__all__ = [
    "ALGORITHMS",
    "AveragingServer",
    "DcCclStrategy",
    "FedAvgStrategy",
    "FedLaAvgStrategy",
    "FedSubAvgStrategy",
    "RobustStrategy",
    "RoverStrategy",
    "SemiCyclicStrategy",
    "StrategyConfig",
    "build_strategy",
]
