"""The coordinator's side of a round with the swarm: selection by rover id, messages, reply parsing, round records.

:class:`RoverStrategy` (a Flower ``FedAvg``) holds an algorithm server of :mod:`forest_perception.collab.algorithms`
as the single source of truth for the global model; :mod:`.strategies` has one subclass per algorithm.
See ``docs/federated.md`` ("The strategies", "Bad input").
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from forest_perception.collab.algorithms import AggregateResult, check_state_header, fedavg, state_header
from forest_perception.collab.flower.messages import (
    ARRAYS_KEY,
    CHAIN_KEYS,
    CONFIG_KEY,
    META_KEY,
    METRICS_KEY,
    NO_DATA,
    NO_HOLDOUT,
    NUM_EXAMPLES,
    REPORTED_METRICS,
    arrays_to_record,
    metric_value,
    parse_update,
    record_bytes,
    reply_status,
    send_and_receive,
)
from forest_perception.collab.flower.store import (
    EvalEntry,
    RoundRecord,
    UpdateEntry,
    aggregate_evaluations,
    params_digest,
)
from forest_perception.collab.updates import ClientUpdate, NDArrays, Rejection, UpdateRejected, screen_updates

LOG = logging.getLogger(__name__)

Availability = Callable[[str, int], bool]
"""``availability(rover_id, server_round)``: whether that rover can be asked in that round."""


# ---------------------------------------------------------------------------------------------- config


@dataclass
class StrategyConfig:
    """Knobs shared by every strategy, plus the algorithm-specific ones (ignored by the others)."""

    fraction_train: float = 1.0
    min_train_nodes: int = 1
    fraction_evaluate: float = 0.0
    min_evaluate_nodes: int = 0
    max_norm: float | None = 100.0  # refuse deltas above this L2 norm (None: no limit)
    max_staleness: int = 0  # accept updates trained from rounds >= current - max_staleness
    server_lr: float = 1.0
    seed: int = 0
    query_timeout: float = 60.0
    # robust
    clip_norm: float | None = None
    trim_fraction: float = 0.0
    # fedlaavg
    weighting: str = "uniform"
    fedlaavg_population: int = 0  # N of the average; 0: every rover the coordinator has identified
    fedlaavg_warmup: int = 0  # rounds that only collect latest gradients
    # the local learning rate of round r: lr * lr_decay ** ((r - 1) // lr_decay_every) (sent with every round)
    lr_decay: float = 1.0
    lr_decay_every: int = 1
    # fedavg: track every rover's Fed-Influence (collab/influence.py); rovers never selected
    influence: bool = False
    quarantine: tuple[str, ...] = ()
    # deployment: the registered node of each rover (the SuperLink's node id of its authenticated key), JSON
    # {rover: {"node_id": n, ...}} as the deployment's nodes.json; "" trusts the rover id a node reports
    node_registry: str = ""
    # mm-psgd / mc-psgd
    num_blocks: int = 2
    rounds_per_block: int = 1

    def validate(self) -> StrategyConfig:
        """Raise ``ValueError`` naming the first bad field."""
        for name in ("fraction_train", "fraction_evaluate"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name} must be within [0, 1], got {value!r}")
        for name in ("min_train_nodes", "min_evaluate_nodes", "max_staleness", "seed", "fedlaavg_population",
                     "fedlaavg_warmup"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("num_blocks", "rounds_per_block", "lr_decay_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_norm", "clip_norm"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number or None, got {value!r}")
        if not (isinstance(self.lr_decay, (int, float)) and math.isfinite(self.lr_decay) and 0 < self.lr_decay <= 1):
            raise ValueError(f"lr_decay must be within (0, 1], got {self.lr_decay!r}")
        if not (math.isfinite(self.server_lr) and self.server_lr > 0):
            raise ValueError(f"server_lr must be a positive finite number, got {self.server_lr!r}")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be within [0, 0.5), got {self.trim_fraction!r}")
        if self.weighting not in ("uniform", "samples"):
            raise ValueError(f"weighting must be 'uniform' or 'samples', got {self.weighting!r}")
        if not self.query_timeout > 0:
            raise ValueError(f"query_timeout must be > 0 s, got {self.query_timeout!r}")
        return self


# ---------------------------------------------------------------------------------------------- servers


class AveragingServer:
    """FedAvg, FedSubAvg and robust FedAvg behind the stateful servers' interface.

    Holds the global model, screens each round's updates (:func:`forest_perception.collab.updates.screen_updates`),
    applies ``rule(global, accepted)`` and keeps ``last_round`` so rounds run in order; a round
    whose updates are all refused leaves the model unchanged.
    """

    def __init__(
        self,
        algorithm: str,
        initial_params: Sequence[np.ndarray],
        rule: Callable[[Sequence[np.ndarray], Sequence[ClientUpdate]], NDArrays],
        max_norm: float | None = None,
        max_staleness: int = 0,
        config: dict | None = None,
    ) -> None:
        self.ALGORITHM = algorithm
        self.rule = rule
        self.max_norm = max_norm
        self.max_staleness = int(max_staleness)
        self._config = {"max_norm": max_norm, "max_staleness": self.max_staleness, **(config or {})}
        self._params = [np.array(p, copy=True) for p in initial_params]
        self._last_round = 0

    @property
    def params(self) -> NDArrays:
        """A copy of the current global model."""
        return [np.array(p, copy=True) for p in self._params]

    def aggregate(self, server_round: int, updates: Sequence[ClientUpdate]) -> AggregateResult:
        """Screen, then apply the rule to the accepted updates."""
        if server_round <= self._last_round:
            raise ValueError(f"{self.ALGORITHM}: round {server_round} is not after the last round {self._last_round}")
        accepted, rejected = screen_updates(
            updates, self._params, server_round, max_norm=self.max_norm, max_staleness=self.max_staleness, logger=LOG
        )
        if accepted:
            self._params = self.rule(self._params, accepted)
        self._last_round = int(server_round)
        return AggregateResult(self.params, int(server_round), [u.client_id for u in accepted], rejected)

    def state_dict(self) -> dict:
        """Algorithm, config, last round and the global model."""
        return {**state_header(self.ALGORITHM, dict(self._config), self._last_round), "params": self.params}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`; refuses another algorithm, config or model shape."""
        check_state_header(state, self.ALGORITHM, self._config)
        params = state["params"]
        if len(params) != len(self._params) or any(np.shape(a) != b.shape for a, b in zip(params, self._params)):
            raise ValueError("state params do not fit the model's tensors")
        self._params = [np.asarray(a).astype(b.dtype) for a, b in zip(params, self._params)]
        self._last_round = int(state["last_round"])


# ---------------------------------------------------------------------------------------------- strategies


class RoverStrategy(FedAvg):
    """Base of the rover strategies: selection, message building, reply parsing and round records.

    ``names``/``initial`` are the global model's tensor names and arrays. ``train_config``
    goes to every rover in the ``config`` record (local-epochs, lr, batch-size, ...).
    Subclasses set ``algorithm`` and build their server in :meth:`make_server`.
    """

    algorithm = "fedavg"

    def __init__(
        self,
        names: Sequence[str],
        initial: Sequence[np.ndarray],
        config: StrategyConfig | None = None,
        train_config: dict | None = None,
        availability: Availability | None = None,
    ) -> None:
        self.settings = (config or StrategyConfig()).validate()
        super().__init__(
            fraction_train=self.settings.fraction_train,
            fraction_evaluate=self.settings.fraction_evaluate,
            min_train_nodes=self.settings.min_train_nodes,
            min_evaluate_nodes=self.settings.min_evaluate_nodes,
            min_available_nodes=0,
            weighted_by_key=NUM_EXAMPLES,
        )
        if len(names) != len(initial) or len(set(names)) != len(names):
            raise ValueError(f"{len(names)} tensor names (unique: {len(set(names))}) for {len(initial)} tensors")
        self.names = list(names)
        self.train_config = dict(train_config or {})
        self.availability = availability
        self.directory: dict[int, str] = {}  # Flower node id -> rover id
        self._unusable: set[int] = set()  # nodes whose identity answer was refused
        self.identity_refusals: list[UpdateEntry] = []  # refused identity claims not yet in a round record
        self.last_record: RoundRecord | None = None
        self.last_evaluation: dict[int, EvalEntry] = {}  # node -> its evaluation in the last evaluate stage
        self.server = self.make_server([np.asarray(a) for a in initial])

    # ------------------------------------------------------------------ algorithm hooks

    def make_server(self, initial: NDArrays) -> Any:  # noqa: ANN401 - one of the forest_perception.collab.algorithms servers
        """The algorithm server holding the global model."""
        s = self.settings
        return AveragingServer(
            "fedavg", initial, partial(fedavg, server_lr=s.server_lr), s.max_norm, s.max_staleness,
            {"server_lr": s.server_lr},
        )

    @property
    def params(self) -> NDArrays:
        """The current global model (what rovers are sent)."""
        return self.server.params

    def eval_params(self, server_round: int) -> NDArrays:
        """The model rovers evaluate after ``server_round`` (the global model)."""
        return self.params

    def round_lr(self, server_round: int) -> float:
        """The local learning rate of ``server_round`` under the schedule (train config ``lr``, ``lr_decay``)."""
        lr = float(self.train_config.get("lr", 1.0))
        steps = max(server_round - 1, 0) // self.settings.lr_decay_every
        return lr * self.settings.lr_decay ** steps

    def round_extras(self, server_round: int) -> dict:
        """Extra config entries for this round's train messages."""
        return {}

    def after_train(self, server_round: int, grid: Grid, timeout: float) -> None:
        """After ``aggregate_train`` and before the round is committed: more exchanges a rule needs (MC-PSGD)."""

    def screen_reply(self, content: RecordDict, rover: str, server_round: int) -> None:
        """Refuse a whole reply before its update is parsed (raise ``UpdateRejected``); every reply passes here."""

    def run_server(
        self, server_round: int, updates: list[ClientUpdate], separate: list[ClientUpdate]
    ) -> AggregateResult:
        """Aggregate one round's parsed updates with the algorithm server."""
        return self.server.aggregate(server_round, updates)

    def state_dict(self) -> dict:
        """The strategy's resumable state (the algorithm server's state)."""
        return {"algorithm": self.algorithm, "server": self.server.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`; refuses another algorithm's state."""
        if state.get("algorithm") != self.algorithm:
            raise ValueError(f"state is for strategy {state.get('algorithm')!r}, this is {self.algorithm!r}")
        self.server.load_state_dict(state["server"])

    def summary(self) -> None:
        """Log the configuration."""
        LOG.info("%s strategy: %s", self.algorithm, self.settings)

    # ------------------------------------------------------------------ rovers and selection

    def refresh_directory(self, grid: Grid) -> None:
        """Ask connected nodes not yet in the directory for their rover id (one query message each).

        A node that does not answer is asked again next round; one that answers without a usable
        rover id, or claims a rover another connected node already is, is not used (and not asked again).
        """
        connected = set(grid.get_node_ids())
        unknown = [n for n in connected if n not in self.directory and n not in self._unusable]
        if not unknown:
            return
        content = RecordDict({CONFIG_KEY: ConfigRecord({"query": "identity"})})
        messages = [Message(content=content, message_type=MessageType.QUERY, dst_node_id=n) for n in unknown]
        registry = self.registered_nodes()
        for reply in send_and_receive(grid, messages, self.settings.query_timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                LOG.warning("node %s did not say which rover it is: %s", node, reply.error.reason)
                continue
            meta = reply.content.config_records.get(META_KEY)
            rover = None if meta is None else meta.get("rover-id")
            if not isinstance(rover, str) or not rover:
                LOG.warning("node %s answered the identity query without a rover-id; it is not used", node)
                self._unusable.add(node)
                continue
            refusal = _registry_refusal(registry, node, rover)
            if refusal:
                LOG.warning("refused identity: %s; the node is not used", refusal)
                self._unusable.add(node)
                self.identity_refusals.append(UpdateEntry(rover_id=f"node-{node}", node_id=node, status="rejected",
                                                          reason="identity", message=refusal))
                continue
            # a rover that reconnected gets a new node id: its old one is gone from the grid
            holders = [n for n, r in self.directory.items() if r == rover and n != node]
            if any(n in connected for n in holders):
                LOG.warning("node %s claims rover %r, which connected node %s already is; it is not used",
                            node, rover, holders[0])
                self._unusable.add(node)
                continue
            for stale in holders:
                del self.directory[stale]
            self.directory[node] = rover

    def registered_nodes(self) -> dict[str, int] | None:
        """The node registry (rover -> node id) of ``node_registry``, read now; None without one.

        ``ValueError`` naming the file when it cannot be read: a coordinator told to enforce identities never falls
        back to trusting them.
        """
        path = self.settings.node_registry
        if not path:
            return None
        try:
            raw = json.loads(Path(path).read_text())
            return {str(rover): int(entry["node_id"] if isinstance(entry, Mapping) else entry)
                    for rover, entry in raw.items()}
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ValueError(f"node registry {path}: cannot be read as rover -> node id ({exc})") from exc

    def available(self, grid: Grid, server_round: int) -> dict[int, str]:
        """Connected, identified nodes whose rover is available in ``server_round`` (node -> rover)."""
        self.refresh_directory(grid)
        nodes = {n: self.directory[n] for n in grid.get_node_ids() if n in self.directory}
        if self.settings.quarantine:
            held = sorted(r for r in nodes.values() if r in self.settings.quarantine)
            if held:
                LOG.info("round %d: quarantined rover(s) %s not asked", server_round, ", ".join(held))
            nodes = {n: r for n, r in nodes.items() if r not in self.settings.quarantine}
        if self.availability is not None:
            nodes = {n: r for n, r in nodes.items() if self.availability(r, server_round)}
        return nodes

    def _sample_size(self, fraction: float, minimum: int, available: int) -> int:
        if fraction == 0.0 or available == 0:
            return 0
        return min(available, max(minimum, math.ceil(fraction * available)))

    def select(self, available: dict[int, str], server_round: int, k: int) -> list[int]:
        """``k`` of the available nodes, drawn from ``(seed, round)`` (sorted by rover id first)."""
        ordered = sorted(available, key=lambda n: available[n])
        rng = np.random.default_rng([self.settings.seed, server_round])
        return [ordered[i] for i in sorted(rng.choice(len(ordered), size=k, replace=False))]

    # ------------------------------------------------------------------ train

    def train_content(self, server_round: int, config: ConfigRecord) -> RecordDict:
        """The train message content: global model and config (extended by MC-PSGD)."""
        return RecordDict({ARRAYS_KEY: arrays_to_record(self.names, self.params), CONFIG_KEY: config})

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Select available rovers and send them the global model (the strategy's, which ``arrays`` mirrors)."""
        record = RoundRecord(server_round=server_round, started=time.time())
        self.last_record = record
        available = self.available(grid, server_round)
        record.entries.extend(self.identity_refusals)  # refused identity claims show in the round's updates
        self.identity_refusals = []
        record.num_available = len(available)
        k = self._sample_size(self.settings.fraction_train, self.settings.min_train_nodes, len(available))
        if len(available) < self.settings.min_train_nodes:
            LOG.warning(
                "round %d: %d rover(s) available, fewer than min_train_nodes=%d; training with those",
                server_round, len(available), self.settings.min_train_nodes,
            )
        nodes = self.select(available, server_round, k) if k else []
        merged = ConfigRecord({**self.train_config, **dict(config.items())})
        merged["server-round"] = server_round
        merged["algorithm"] = self.algorithm
        if "lr" in merged:
            merged["lr"] = self.round_lr(server_round)
        for key, value in self.round_extras(server_round).items():
            merged[key] = value
        content = self.train_content(server_round, merged)
        down = record_bytes(content)
        chains = self.chains()
        for n in nodes:
            for chain in chains:
                record.entries.append(
                    UpdateEntry(
                        rover_id=available[n], node_id=n, status="missing", chain=chain, reason="no_reply",
                        message=f"rover {available[n]!r} sent no reply in round {server_round}",
                        bytes_down=down if chain == chains[0] else 0,
                    )
                )
        record.selected = [available[n] for n in nodes]
        LOG.info("round %d: %d of %d available rover(s) selected", server_round, len(nodes), len(available))
        return self._construct_messages(content, nodes, MessageType.TRAIN)

    def chains(self) -> tuple[str, ...]:
        """The model chains each rover trains ("mixed"; MC-PSGD adds "separate")."""
        return ("mixed",)

    def _entry(self, record: RoundRecord, node: int, rover: str, chain: str) -> UpdateEntry:
        for entry in record.entries:
            if entry.node_id == node and entry.chain == chain:
                return entry
        entry = UpdateEntry(rover_id=rover, node_id=node, status="missing", chain=chain)
        record.entries.append(entry)
        return entry

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Parse replies into updates, let the algorithm server screen and aggregate them, record who sent what."""
        record = self.last_record
        if record is None or record.server_round != server_round:
            record = RoundRecord(server_round=server_round, started=time.time())
            self.last_record = record
        updates: list[ClientUpdate] = []
        separate: list[ClientUpdate] = []
        chains = self.chains()
        for msg in replies:
            node = msg.metadata.src_node_id
            rover = self.directory.get(node, f"node-{node}")
            if msg.has_error():
                for chain in chains:
                    entry = self._entry(record, node, rover, chain)
                    entry.status, entry.reason, entry.message = "failed", "client_error", str(msg.error.reason)
                LOG.warning("round %d: rover %r failed: %s", server_round, rover, msg.error.reason)
                continue
            content = msg.content
            up = record_bytes(content)
            status, reason = reply_status(content)
            if status == NO_DATA:
                for chain in chains:
                    entry = self._entry(record, node, rover, chain)
                    entry.status, entry.reason, entry.message = "failed", "no_data", reason
                LOG.warning("round %d: rover %r has no data: %s", server_round, rover, reason)
                continue
            meta = content.config_records.get(META_KEY)
            claimed = None if meta is None else meta.get("rover-id")
            for c, chain in enumerate(chains):
                entry = self._entry(record, node, rover, chain)
                entry.bytes_up = up if c == 0 else 0
                keys = CHAIN_KEYS[chain][1:]
                try:
                    if claimed is not None and claimed != rover:
                        raise UpdateRejected(
                            "client_id",
                            f"update from node {node} (round {server_round}) claims rover {claimed!r}, "
                            f"the node is {rover!r}",
                            rover,
                        )
                    self.screen_reply(content, rover, server_round)
                    update = parse_update(content, self.names, rover, server_round, *keys)
                except UpdateRejected as exc:
                    entry.status, entry.reason, entry.message = "rejected", exc.reason, str(exc)
                    LOG.warning("refused %s [%s]", exc, exc.reason)
                    continue
                entry.status, entry.reason, entry.message = "pending", "", ""
                entry.num_examples = update.num_examples if isinstance(update.num_examples, int) else 0
                entry.base_round = update.round if isinstance(update.round, int) else None
                entry.metrics = dict(update.metrics)
                entry.digest = params_digest(update.params)
                entry.update = update
                (updates if chain == "mixed" else separate).append(update)
        result = self.run_server(server_round, updates, separate)
        accepted = set(result.accepted)
        rejected = _match_rejections(result.rejected, updates, separate, accepted)
        for entry in record.entries:
            if entry.status != "pending":
                continue
            tag = entry.rover_id if entry.chain == "mixed" else f"{entry.rover_id}@separate"
            if tag in accepted:
                entry.status = "accepted"
                continue
            rejection = rejected.get((entry.rover_id, entry.chain))
            entry.status = "rejected"
            entry.reason = rejection.reason if rejection else "unknown"
            entry.message = rejection.message if rejection else "refused by the algorithm server"
            entry.update = None
        record.block, record.chosen = result.block, result.chosen
        record.train_metrics = self._train_metrics(record, result)
        metrics = MetricRecord({k: float(v) for k, v in record.train_metrics.items() if math.isfinite(v)})
        return arrays_to_record(self.names, self.params), metrics

    def _train_metrics(self, record: RoundRecord, result: AggregateResult) -> dict[str, float]:
        accepted = [e for e in record.entries if e.status == "accepted" and e.chain == "mixed"]
        total = sum(e.num_examples for e in accepted)
        out: dict[str, float] = {}
        for key in REPORTED_METRICS:
            pairs = [(e.num_examples, e.metrics[key]) for e in accepted if math.isfinite(e.metrics.get(key, math.nan))]
            weight = sum(n for n, _ in pairs)
            out[key] = sum(n * v for n, v in pairs) / weight if weight else math.nan
        out.update(
            {
                "num-examples": float(total),
                "accepted": float(record.count("accepted")),
                "rejected": float(record.count("rejected")),
                "failed": float(record.count("failed") + record.count("missing")),
                "bytes-down": float(record.bytes_down),
                "bytes-up": float(record.bytes_up),
            }
        )
        for chain, loss in result.losses.items():
            out[f"loss-{chain}"] = float(loss)
        return out

    # ------------------------------------------------------------------ evaluate

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the model to evaluate (global, or the block's predictor) to a sample of available rovers.

        ``server_round`` 0 evaluates the initial model.
        """
        available = self.available(grid, server_round)
        k = self._sample_size(self.settings.fraction_evaluate, self.settings.min_evaluate_nodes, len(available))
        self.last_evaluation = {}
        if not k:
            return []
        nodes = self.select(available, server_round + 1_000_003, k)
        merged = ConfigRecord({**self.train_config, **dict(config.items())})
        merged["server-round"] = server_round
        params = self.params if server_round == 0 else self.eval_params(server_round)
        content = RecordDict({ARRAYS_KEY: arrays_to_record(self.names, params), CONFIG_KEY: merged})
        self.last_evaluation = {
            n: EvalEntry(available[n], status="missing", message=f"no reply in round {server_round}") for n in nodes
        }
        return self._construct_messages(content, nodes, MessageType.EVALUATE)

    def extra_evaluations(self) -> list[EvalEntry]:
        """More entries of the last evaluate stage, stored after the rovers' mean (iciia: without history)."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Frame-weighted mean of the rovers' held-out metrics; each rover's result kept in ``last_evaluation``.

        Error replies, rovers without data or held-out segments and non-finite values are left out of the mean.
        """
        for msg in replies:
            node = msg.metadata.src_node_id
            entry = self.last_evaluation.setdefault(node, EvalEntry(self.directory.get(node, f"node-{node}")))
            if msg.has_error():
                entry.status, entry.message = "failed", str(msg.error.reason)
                continue
            status, reason = reply_status(msg.content)
            record = msg.content.metric_records.get(METRICS_KEY)
            n = metric_value(record, NUM_EXAMPLES)
            if status in (NO_DATA, NO_HOLDOUT):
                entry.status, entry.message = status.replace("-", "_"), reason
                continue
            if record is None or n is None or n <= 0:
                entry.status, entry.message = "failed", "reply without metrics or num-examples"
                continue
            entry.status, entry.frames, entry.message = "ok", int(n), ""
            entry.metrics = {key: value for key in record.keys() if key != NUM_EXAMPLES
                             and (value := metric_value(record, key)) is not None and math.isfinite(value)}
        mean = aggregate_evaluations(list(self.last_evaluation.values()))
        if mean.status != "ok":
            return None
        rovers = sum(1 for e in self.last_evaluation.values() if e.status == "ok" and e.frames > 0)
        return MetricRecord({**mean.metrics, "frames": float(mean.frames), "rovers": float(rovers)})


def _registry_refusal(registry: Mapping[str, int] | None, node: int, rover: str) -> str:
    """Why ``node`` may not be ``rover`` under the registry ("" when it may, or when there is no registry)."""
    if registry is None:
        return ""
    if rover not in registry:
        return f"node {node} claims rover {rover!r}, which is not registered"
    if registry[rover] != node:
        return f"node {node} claims rover {rover!r}, whose registered key is node {registry[rover]}"
    return ""


def _match_rejections(
    rejections: Sequence[Rejection], updates: Sequence[ClientUpdate], separate: Sequence[ClientUpdate],
    accepted: set[str],
) -> dict[tuple[str, str], Rejection]:
    """Map the server's rejections back to (rover, chain); the mixed chain's come first."""
    out: dict[tuple[str, str], Rejection] = {}
    open_mixed = {u.client_id for u in updates} - accepted
    open_separate = {u.client_id for u in separate} - {a.rsplit("@", 1)[0] for a in accepted if a.endswith("@separate")}
    for r in rejections:
        if r.client_id in open_mixed and (r.client_id, "mixed") not in out:
            out[(r.client_id, "mixed")] = r
        elif r.client_id in open_separate and (r.client_id, "separate") not in out:
            out[(r.client_id, "separate")] = r
    return out
