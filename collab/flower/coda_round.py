"""CoDA through Flower: descriptors up, the coarse match (and the rover's filter) once per rover, samples down.

Before a rover first trains in a run, the coordinator asks it for the descriptors of its kept training frames
(``coda-describe`` query), finds the coarse match in the cloud's index and, for arm ``coda``, sends the candidates'
and a random outside draw's descriptors (``coda-filter`` query); the rover fits its own-vs-outside classifier and
answers which candidates it keeps. Every train message then carries the global model and the rover's cloud samples
(``coda-samples``: RGB uint8 and depth float16 at the network input); the rover trains on its frames plus those, and
the coordinator averages the deltas (FedAvg). The kept pool rows are the strategy's state, so a resumed run does not
ask again. The pure parts are in :mod:`forest_perception.collab.coda`; set-up: ``docs/collaborative.md`` ("CoDA").
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from collections.abc import Iterable, Mapping
from functools import lru_cache, partial
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from forest_perception.collab import coda
from forest_perception.collab.algorithms import fedavg
from forest_perception.collab.flower.messages import (
    CONFIG_KEY,
    META_KEY,
    METRICS_KEY,
    NO_DATA,
    arrays_to_record,
    metric_value,
    record_bytes,
    reply_status,
    send_and_receive,
    unpack_record,
)
from forest_perception.collab.flower.rover_strategy import AveragingServer, RoverStrategy
from forest_perception.collab.flower.task import LocalData, TaskConfig
from forest_perception.collab.updates import NDArrays

LOG = logging.getLogger(__name__)

DESCRIBE = "coda-describe"  # query: the rover's descriptors, please
FILTER = "coda-filter"  # query: fit your classifier, keep the best candidates
DESCRIPTORS_KEY = "coda-descriptors"  # rover -> server: float16 descriptors of its kept training frames
CANDIDATES_KEY = "coda-candidates"  # server -> rover: the coarse candidates' and the outside draw's descriptors
KEPT_KEY = "coda-kept"  # rover -> server: positions of the candidates it keeps (int32)
SAMPLES_KEY = "coda-samples"  # server -> rover (train): its cloud samples
ARMS = ("random", "coarse", "coda")
COARSE_FACTOR = 2
"""Arm ``coda`` looks at this many times ``coda-candidates`` coarse candidates and keeps ``coda-candidates``."""


def coda_train_config(c: Mapping[str, Any], task: TaskConfig) -> dict[str, Any]:
    """What a coda run adds to the train config: the index, arm, budget and the encoder rovers describe with.

    ``ValueError`` naming the key when coda keys come with another algorithm, the index is missing or unreadable, or
    its samples are not at the run's network input.
    """
    if c["algorithm"] != "coda":
        if c["coda-index"]:
            raise ValueError(f"run config coda-index belongs to algorithm coda, not {c['algorithm']!r}")
        return {}
    if not c["coda-index"]:
        raise ValueError("algorithm coda needs run config coda-index: the cloud's index file (forest-fl coda index)")
    if c["coda-arm"] not in ARMS:
        raise ValueError(f"run config coda-arm must be one of {', '.join(ARMS)}, got {c['coda-arm']!r}")
    for key in ("coda-candidates", "coda-outside"):
        if c[key] < 1:
            raise ValueError(f"run config {key} must be >= 1, got {c[key]}")
    if not 0.0 <= c["coda-gate"] < 1.0:
        raise ValueError(f"run config coda-gate must be a quantile within [0, 1) (0: keep the top coda-candidates), "
                         f"got {c['coda-gate']}")
    index = coda.PoolIndex.load(c["coda-index"])
    if not index.encoder_name:
        raise ValueError(f"CoDA index {c['coda-index']} does not name the network its descriptors came from")
    if index.input_hw != tuple(task.input_hw):
        raise ValueError(f"CoDA index {c['coda-index']} holds {index.input_hw[1]}x{index.input_hw[0]} samples, the "
                         f"run's network input is {task.input_hw[1]}x{task.input_hw[0]}: build the index with the "
                         "run's network")
    return {"coda-index": str(c["coda-index"]), "coda-arm": c["coda-arm"], "coda-candidates": c["coda-candidates"],
            "coda-outside": c["coda-outside"], "coda-gate": c["coda-gate"], "coda-encoder": index.encoder_name,
            "coda-encoder-version": index.encoder}


# ---------------------------------------------------------------------------------------------- rover side


@lru_cache(maxsize=2)
def _encoder(name: str) -> coda.DescriptorEncoder:
    return coda.DescriptorEncoder.from_init(name)


def rover_encoder(config: Mapping[str, Any]) -> coda.DescriptorEncoder:
    """The encoder the coordinator's index was made with; ``ValueError`` when this rover's copy has other weights."""
    encoder = _encoder(str(config.get("coda-encoder", "")))
    expected = str(config.get("coda-encoder-version", ""))
    if encoder.version != expected:
        raise ValueError(f"this rover's encoder {config.get('coda-encoder')} is {encoder.version}, the cloud's "
                         f"descriptors were made by {expected or 'an unnamed encoder'}")
    return encoder


def _meta(rover_id: str) -> ConfigRecord:
    return ConfigRecord({"rover-id": rover_id, "status": "ok"})


def describe_reply(message: Message, rover_id: str, data: LocalData, config: Mapping[str, Any]) -> Message:
    """The descriptors of the rover's training frames (float16, never an image)."""
    own = rover_encoder(config).describe(data.train_images)
    return Message(content=RecordDict({DESCRIPTORS_KEY: arrays_to_record(["descriptors"], [own]),
                                       META_KEY: _meta(rover_id)}), reply_to=message)


def filter_reply(message: Message, rover_id: str, data: LocalData, config: Mapping[str, Any]) -> Message:
    """Fit the own-vs-outside classifier and answer the positions of the candidates kept (the top ``coda-candidates``;
    with ``coda-gate`` only those as own-like as that quantile of the rover's frames), with its time and memory."""
    record = message.content.array_records.get(CANDIDATES_KEY)
    if record is None:
        raise ValueError(f"a {FILTER} query without its {CANDIDATES_KEY!r} record")
    arrays = unpack_record(record, CANDIDATES_KEY)
    own = rover_encoder(config).describe(data.train_images)
    classifier = coda.OwnDataFilter()
    fit = classifier.fit(own, arrays["outside"])
    gate = float(config.get("coda-gate", 0.0))
    threshold = coda.gate_threshold(classifier, own, gate) if gate > 0 else None
    kept = classifier.select(arrays["candidates"], int(config.get("coda-candidates", 0)), threshold)
    metrics = {"coda-fit-s": fit.seconds, "coda-peak-bytes": float(fit.peak_bytes), "coda-accuracy": fit.accuracy}
    return Message(content=RecordDict({KEPT_KEY: arrays_to_record(["kept"], [kept.astype(np.int32)]),
                                       METRICS_KEY: MetricRecord(metrics), META_KEY: _meta(rover_id)}),
                   reply_to=message)


def with_samples(message: Message, data: LocalData, task: TaskConfig) -> tuple[LocalData, int]:
    """``data`` with the train message's cloud samples added to its training frames, and how many there were."""
    record = message.content.array_records.get(SAMPLES_KEY)
    if record is None:
        return data, 0
    arrays = unpack_record(record, SAMPLES_KEY)
    images, depth = arrays.get("images"), arrays.get("depth")
    if images is None or depth is None:
        raise ValueError(f"{SAMPLES_KEY}: needs 'images' and 'depth', got {sorted(arrays)}")
    if tuple(images.shape[1:3]) != tuple(task.input_hw):
        raise ValueError(f"{SAMPLES_KEY}: samples are {images.shape[2]}x{images.shape[1]}, this rover trains at "
                         f"{task.input_hw[1]}x{task.input_hw[0]}")
    x, d = coda.samples_to_tensors(images, depth, task.min_depth)
    import torch

    return dataclasses.replace(data, train_images=torch.cat([data.train_images, x]),
                               train_depth=torch.cat([data.train_depth, d])), int(x.shape[0])


# ---------------------------------------------------------------------------------------------- the coordinator


class CodaStrategy(RoverStrategy):
    """FedAvg of rovers that each train on their own frames plus cloud samples chosen for them (see the module)."""

    algorithm = "coda"

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401 - RoverStrategy's arguments
        super().__init__(*args, **kwargs)
        path = str(self.train_config.pop("coda-index", ""))  # the cloud's file: not sent to the rovers
        if not path:
            raise ValueError("the coda strategy needs the cloud's index (train config coda-index)")
        self.index = coda.PoolIndex.load(path)
        self.arm = str(self.train_config.get("coda-arm", "coda"))
        self.k = int(self.train_config.get("coda-candidates", 20))
        self.outside = int(self.train_config.get("coda-outside", 256))
        self.plans: dict[str, dict[str, Any]] = {}  # rover -> {"rows": pool rows, and the filter's figures}
        self._exchange_up: dict[int, int] = {}  # this round's query bytes per node
        self._exchange_down: dict[int, int] = {}

    def make_server(self, initial: NDArrays) -> AveragingServer:
        """FedAvg of the rovers' deltas."""
        s = self.settings
        return AveragingServer("coda", initial, partial(fedavg, server_lr=s.server_lr), s.max_norm, s.max_staleness,
                               {"server_lr": s.server_lr})

    def state_dict(self) -> dict:
        """The server's state and every rover's kept pool rows."""
        return {**super().state_dict(), "coda-plans": self.plans}

    def load_state_dict(self, state: dict) -> None:
        """Resume the server and the rovers' plans."""
        super().load_state_dict(state)
        self.plans = {str(r): dict(p) for r, p in (state.get("coda-plans") or {}).items()}

    def _seed(self, rover: str) -> int:
        return (self.settings.seed * 1_000_003 + zlib.crc32(rover.encode())) % (2**31)

    def _query(self, grid: Grid, contents: dict[int, RecordDict]) -> dict[int, Message]:
        """One query per node; the usable replies by node (errors and no-data logged), bytes each way counted."""
        messages = [Message(content=c, message_type=MessageType.QUERY, dst_node_id=n) for n, c in contents.items()]
        down = {n: record_bytes(c) for n, c in contents.items()}
        replies = send_and_receive(grid, messages, self.settings.query_timeout)
        out = {}
        for node, size in down.items():
            self._exchange_down[node] = self._exchange_down.get(node, 0) + size
        for reply in replies:
            node = reply.metadata.src_node_id
            rover = self.directory.get(node, f"node-{node}")
            if reply.has_error():
                LOG.warning("coda: rover %r did not answer its query: %s", rover, reply.error.reason)
                continue
            self._exchange_up[node] = self._exchange_up.get(node, 0) + record_bytes(reply.content)
            status, reason = reply_status(reply.content)
            if status == NO_DATA:
                LOG.warning("coda: rover %r has no data: %s", rover, reason)
                continue
            out[node] = reply
        return out

    def make_plans(self, grid: Grid, rovers: dict[int, str], server_round: int) -> None:
        """Choose the pool rows of every rover in ``rovers`` (node -> rover) that has none yet."""
        if self.arm == "random" or len(self.index) == 0:
            for rover in rovers.values():
                self.plans[rover] = {"rows": self.index.random(self.k, self._seed(rover)).tolist()}
            return
        config = {**self.train_config, "server-round": server_round}
        asks = {n: RecordDict({CONFIG_KEY: ConfigRecord({**config, "query": DESCRIBE})}) for n in rovers}
        matches = {}
        for node, reply in self._query(grid, asks).items():
            try:
                own = unpack_record(reply.content.array_records[DESCRIPTORS_KEY], DESCRIPTORS_KEY)["descriptors"]
                own = coda.check_descriptors(own, self.index.dim, f"descriptors of rover {rovers[node]!r}")
            except (KeyError, ValueError) as exc:
                LOG.warning("coda: %s", exc)
                continue
            if own.shape[0] == 0:
                continue
            size = self.k if self.arm == "coarse" else COARSE_FACTOR * self.k
            matches[node] = self.index.coarse(own, size).indices
        if self.arm == "coarse":
            for node, rows in matches.items():
                self.plans[rovers[node]] = {"rows": rows.tolist()}
            return
        filters = {}
        for node, rows in matches.items():
            outside = self.index.random(self.outside, self._seed(rovers[node]), exclude=rows)
            if outside.size == 0:
                outside = self.index.random(self.outside, self._seed(rovers[node]))
            record = arrays_to_record(["candidates", "outside"], [self.index.descriptors[rows].astype(np.float16),
                                                                  self.index.descriptors[outside].astype(np.float16)])
            filters[node] = RecordDict({CONFIG_KEY: ConfigRecord({**config, "query": FILTER}),
                                        CANDIDATES_KEY: record})
        for node, reply in self._query(grid, filters).items():
            rover, rows = rovers[node], matches[node]
            try:
                kept = unpack_record(reply.content.array_records[KEPT_KEY], KEPT_KEY)["kept"].astype(np.int64)
            except (KeyError, ValueError) as exc:
                LOG.warning("coda: rover %r sent no usable kept candidates: %s", rover, exc)
                continue
            if kept.ndim != 1 or kept.size > self.k or np.unique(kept).size != kept.size or \
                    (kept.size and not (0 <= kept.min() and kept.max() < rows.size)):
                LOG.warning("coda: rover %r kept positions %s of %d candidates: refused", rover, kept[:5].tolist(),
                            rows.size)
                continue
            metrics = reply.content.metric_records.get(METRICS_KEY)
            figures = {k: metric_value(metrics, k) for k in ("coda-fit-s", "coda-peak-bytes", "coda-accuracy")}
            self.plans[rover] = {"rows": rows[kept].tolist(), "candidates": int(rows.size), **figures}
            LOG.info("coda: rover %s kept %d of %d candidates (classifier fit %.1f ms, peak %.0f KiB)", rover,
                     kept.size, rows.size, 1000 * (figures["coda-fit-s"] or 0),
                     (figures["coda-peak-bytes"] or 0) / 1024)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid,
                        ) -> Iterable[Message]:
        """The base selection and messages; each rover's message also carries its cloud samples."""
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._exchange_down, self._exchange_up = {}, {}
        rovers = {m.metadata.dst_node_id: self.directory[m.metadata.dst_node_id] for m in messages}
        missing = {n: r for n, r in rovers.items() if r not in self.plans}
        if missing:
            self.make_plans(grid, missing, server_round)
        out = []
        for message in messages:
            node = message.metadata.dst_node_id
            content = RecordDict(dict(message.content.items()))  # the model record is shared, not copied
            rows = self.plans.get(rovers[node], {}).get("rows", [])
            extra = self._exchange_down.get(node, 0)
            if rows:
                images, depth = self.index.samples(rows)
                content[SAMPLES_KEY] = arrays_to_record(["images", "depth"], [images, depth])
                extra += record_bytes(RecordDict({SAMPLES_KEY: content[SAMPLES_KEY]}))
            self._entry(self.last_record, node, rovers[node], "mixed").bytes_down += extra
            out.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node))
        return out

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[Any, Any]:
        """FedAvg; the round's bytes up also count the rovers' descriptors and kept ids."""
        out = super().aggregate_train(server_round, replies)
        record = self.last_record
        for node, size in self._exchange_up.items():
            self._entry(record, node, self.directory.get(node, f"node-{node}"), "mixed").bytes_up += size
        record.train_metrics["bytes-up"] = float(record.bytes_up)
        record.train_metrics["bytes-down"] = float(record.bytes_down)
        self._exchange_up = {}
        return out
