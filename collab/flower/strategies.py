"""Flower strategies (Message API) of the coordinator: one per aggregation algorithm.

Each is a :class:`~forest_perception.collab.flower.rover_strategy.RoverStrategy` (selection, messages, round
records) around its rule's pure numpy server of :mod:`forest_perception.collab.algorithms`; what each does:
``docs/federated.md`` ("The strategies").
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from forest_perception.collab.algorithms import (
    AggregateResult,
    FedLaAvgServer,
    FedSubAvgServer,
    ScaffoldServer,
    SemiCyclicServer,
    fedavg,
    normalisation_buffers,
    robust_fedavg,
)
from forest_perception.collab.flower.messages import (
    ARRAYS_KEY,
    CHANGE_PREFIX,
    CONFIG_KEY,
    CONTROL_KEY,
    CORRECTION_KEY,
    INFLUENCE_PREFIX,
    META_KEY,
    METRICS_KEY,
    NUM_EXAMPLES,
    SEPARATE_KEY,
    arrays_to_record,
    metric_value,
    prefixed_records,
    record_bytes,
    send_and_receive,
    unpack_record,
)
from forest_perception.collab.flower.rover_strategy import Availability, AveragingServer, RoverStrategy, StrategyConfig
from forest_perception.collab.influence import InfluenceEstimator
from forest_perception.collab.updates import ClientUpdate, NDArrays, UpdateRejected

LOG = logging.getLogger(__name__)

ALGORITHMS: tuple[str, ...] = ("fedavg", "fedsubavg", "fedlaavg", "mm-psgd", "mc-psgd", "robust", "scaffold", "dc-ccl",
                                 "coda", "iciia")


class FedAvgStrategy(RoverStrategy):
    """Sample-weighted FedAvg of the rovers' deltas; with ``influence`` it also tracks every rover's Fed-Influence.

    Fed-Influence (:class:`~forest_perception.collab.influence.InfluenceEstimator`): each train message carries
    the current influence of every rover heard from (``influence:<rover>``), each rover answers with how its delta
    would change along each (``change:<rover>``), and the estimate moves with the round. A round in which an
    accepted rover sent no changes leaves the estimate incomplete (``influence_complete`` False, logged).
    """

    algorithm = "fedavg"

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401 - RoverStrategy's arguments
        super().__init__(*args, **kwargs)
        self.influence = InfluenceEstimator(self.params, self.settings.server_lr) if self.settings.influence else None
        self.influence_complete = True

    def train_content(self, server_round: int, config: ConfigRecord) -> RecordDict:
        """The global model, and every tracked rover's influence when Fed-Influence is on."""
        content = super().train_content(server_round, config)
        if self.influence is not None:
            dtypes = [p.dtype for p in self.params]
            for rover, direction in self.influence.directions().items():
                content[f"{INFLUENCE_PREFIX}{rover}"] = arrays_to_record(
                    self.names, [d.astype(t) for d, t in zip(direction, dtypes)])
        return content

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg; then the influence estimate moves with the round's accepted updates and their changes."""
        replies = list(replies)
        before = self.params
        out = super().aggregate_train(server_round, replies)
        if self.influence is None:
            return out
        accepted = {e.rover_id: e.update for e in self.last_record.entries
                    if e.status == "accepted" and e.chain == "mixed" and e.update is not None}
        changes: dict[str, dict] = {}
        for reply in replies:
            rover = self.directory.get(reply.metadata.src_node_id)
            if rover in accepted and not reply.has_error():
                try:
                    changes[rover] = prefixed_records(reply.content, CHANGE_PREFIX, self.names)
                except ValueError as exc:
                    LOG.warning("round %d: rover %r sent unusable influence changes: %s", server_round, rover, exc)
        try:
            self.influence.step([accepted[r] for r in sorted(accepted)], changes, before)
        except ValueError as exc:
            self.influence_complete = False
            LOG.warning("round %d: Fed-Influence estimate incomplete from here on: %s", server_round, exc)
        return out

    def state_dict(self) -> dict:
        """The server's state, and the influence estimate."""
        state = super().state_dict()
        if self.influence is not None:
            state["influence"] = {**self.influence.state_dict(), "complete": self.influence_complete}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Resume the server and the influence estimate."""
        super().load_state_dict(state)
        if self.influence is not None:
            if "influence" not in state:
                raise ValueError("this run tracks Fed-Influence, the saved state has none")
            self.influence.load_state_dict(state["influence"])
            self.influence_complete = bool(state["influence"].get("complete", True))


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


class ScaffoldStrategy(RoverStrategy):
    """SCAFFOLD: FedAvg with control variates (:class:`~forest_perception.collab.algorithms.ScaffoldServer`).

    The coordinator keeps every rover's control ``c_i`` and sends each selected rover its own correction
    ``c - c_i`` (``scaffold-correction``) beside the global model, so the rovers stay stateless; each rover answers
    with its delta and its new control (``scaffold-control``). An update without a usable control is refused
    (``bad_control``).
    """

    algorithm = "scaffold"

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401 - RoverStrategy's arguments
        super().__init__(*args, **kwargs)
        self._round_controls: dict[str, dict | None] = {}

    def make_server(self, initial: NDArrays) -> ScaffoldServer:
        """The SCAFFOLD server (global model and every rover's latest control)."""
        s = self.settings
        return ScaffoldServer(initial, self.names, server_lr=s.server_lr, max_norm=s.max_norm,
                              max_staleness=s.max_staleness)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The round's train messages, each rover heard from before with its own correction added."""
        out = []
        for message in super().configure_train(server_round, arrays, config, grid):
            node = message.metadata.dst_node_id
            rover = self.directory.get(node, f"node-{node}")
            correction = self.server.correction(rover)
            if correction is None:
                out.append(message)
                continue
            content = RecordDict(dict(message.content.items()))  # the shared records, and this rover's own
            content[CORRECTION_KEY] = arrays_to_record(list(correction), list(correction.values()))
            self._entry(self.last_record, node, rover, "mixed").bytes_down = record_bytes(content)
            out.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node))
        return out

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Read every reply's control, then aggregate as FedAvg (the server refuses updates without one)."""
        replies = list(replies)
        self._round_controls = {}
        for reply in replies:
            if reply.has_error():
                continue
            node = reply.metadata.src_node_id
            rover = self.directory.get(node, f"node-{node}")
            record = reply.content.array_records.get(CONTROL_KEY)
            try:
                self._round_controls[rover] = None if record is None else unpack_record(record, CONTROL_KEY)
            except ValueError as exc:
                LOG.warning("round %d: rover %r sent an unreadable control variate: %s", server_round, rover, exc)
                self._round_controls[rover] = None
        return super().aggregate_train(server_round, replies)

    def run_server(
        self, server_round: int, updates: list[ClientUpdate], separate: list[ClientUpdate]
    ) -> AggregateResult:
        """FedAvg of the updates whose controls pass; their controls are kept."""
        return self.server.aggregate(server_round, updates, self._round_controls)


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
    one reply, twice the traffic); after averaging, the round's rovers score both averaged
    chains on their data and the lower mean loss feeds the block's predictor, as in the paper.
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
        """MM: FedAvg the mixed chain. MC: both chains, the choice waits for :meth:`after_train`'s scores."""
        return self.server.aggregate(server_round, updates, separate)

    def after_train(self, server_round: int, grid: Grid, timeout: float) -> None:
        """MC: the round's rovers score both *averaged* chains on their data; the lower mean loss feeds the predictor.

        The rovers whose updates went in hold the block's data; each scores the new mixed ``x`` and the block's new
        separate ``y`` on its validation frames (``score-chains`` evaluate message, both models in one message).
        Their frame-weighted mean losses go to :meth:`SemiCyclicServer.choose`; without any usable score both are
        NaN and only the predictor stays as it was.
        """
        pending = self.server.pending_chains()
        if pending is None:
            return
        block, mixed, separate = pending
        record = self.last_record
        by_rover = {rover: node for node, rover in self.directory.items()}
        scorers = sorted({by_rover[e.rover_id] for e in record.entries
                          if e.status == "accepted" and e.rover_id in by_rover})
        config = ConfigRecord({**self.train_config, "server-round": server_round, "block": block,
                               "score-chains": True})
        content = RecordDict({ARRAYS_KEY: arrays_to_record(self.names, mixed),
                              SEPARATE_KEY: arrays_to_record(self.names, separate), CONFIG_KEY: config})
        sums = {"mixed": [0.0, 0.0], "separate": [0.0, 0.0]}
        messages = list(self._construct_messages(content, scorers, MessageType.EVALUATE)) if scorers else []
        for reply in send_and_receive(grid, messages, timeout) if messages else []:
            rover = self.directory.get(reply.metadata.src_node_id, "?")
            scores = None if reply.has_error() else reply.content.metric_records.get(METRICS_KEY)
            n = metric_value(scores, NUM_EXAMPLES)
            if not n or n <= 0:
                LOG.warning("round %d: rover %r gave no chain scores", server_round, rover)
                continue
            for chain, key in (("mixed", "eval-loss"), ("separate", "eval-loss-separate")):
                value = metric_value(scores, key)
                if value is not None and math.isfinite(value):
                    sums[chain][0] += n * value
                    sums[chain][1] += n
        losses = {chain: (total / frames if frames else math.nan) for chain, (total, frames) in sums.items()}
        result = self.server.choose(losses["mixed"], losses["separate"])
        record.chosen = result.chosen
        record.train_metrics.update({f"loss-{chain}": loss for chain, loss in losses.items()})
        LOG.info("round %d block %d: averaged chains scored mixed %.4f separate %.4f by %d rover(s); %s chosen",
                 server_round, block, losses["mixed"], losses["separate"], len(scorers), result.chosen)


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
    if algorithm == "coda":
        from forest_perception.collab.flower.coda_round import CodaStrategy

        return CodaStrategy(names, initial, **kwargs)
    if algorithm == "iciia":
        from forest_perception.collab.flower.iciia_round import IciiaStrategy

        return IciiaStrategy(names, initial, **kwargs)
    if algorithm == "fedlaavg":
        return FedLaAvgStrategy(names, initial, **kwargs)
    if algorithm == "scaffold":
        return ScaffoldStrategy(names, initial, **kwargs)
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
    "ScaffoldStrategy",
    "SemiCyclicStrategy",
    "StrategyConfig",
    "build_strategy",
]
