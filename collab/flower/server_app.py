"""The cloud coordinator ``ServerApp``: runs the rounds of one algorithm and keeps its state in SQLite.

Everything comes from the run config (:data:`forest_perception.collab.flower.task.DEFAULT_RUN_CONFIG`); the
initial global model is the ``init`` checkpoint when the run config names one. :class:`Coordinator` is the
round loop that, unlike Flower's ``Strategy.start``, resumes from the last round its store committed and
evaluates the global model after every round (round 0: the initial model) on each rover's held-out segments
and the ``cloud-test`` folder; see ``docs/federated.md`` ("Coordinator state (SQLite) and resuming",
"Federated evaluation").
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from forest_perception.collab.flower.messages import arrays_to_record, send_and_receive
from forest_perception.collab.flower.network import InitCheckpoint, architecture_from_run_config, kwargs_text
from forest_perception.collab.flower.population import load_population
from forest_perception.collab.flower.rover_strategy import RoverStrategy, StrategyConfig
from forest_perception.collab.flower.store import (
    CLOUD,
    CoordinatorStore,
    EvalEntry,
    RoundRecord,
    aggregate_evaluations,
)
from forest_perception.collab.flower.strategies import ALGORITHMS, build_strategy
from forest_perception.collab.flower.task import (
    TaskConfig,
    build_model,
    evaluate,
    get_arrays,
    initial_arrays,
    load_test_frames,
    merge_run_config,
    set_arrays,
)
from forest_perception.collab.updates import NDArrays

LOG = logging.getLogger(__name__)


@dataclass
class ServerSettings:
    """The coordinator's settings, read from the run config."""

    algorithm: str = "fedavg"
    num_rounds: int = 3
    state_db: str = "coordinator.db"
    keep_updates: bool = False
    evaluate_every: int = 1
    round_timeout: float = 600.0
    population: str = ""
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    train_config: dict = field(default_factory=dict)
    init: InitCheckpoint | None = None
    cloud_test: str = ""
    dcccl_mimic_version: str = ""  # dc-ccl: the running mimic (its file is run config dcccl-mimic)
    dcccl_small: str = ""  # dc-ccl: a small submodel file to start from ("": a fresh one)

    @classmethod
    def from_run_config(cls, config: Mapping) -> ServerSettings:
        """Validate and convert a run config (kebab-case keys, defaults filled in)."""
        c = merge_run_config(config)
        if c["algorithm"] not in ALGORITHMS:
            raise ValueError(f"run config algorithm {c['algorithm']!r} is not one of {', '.join(ALGORITHMS)}")
        for key in ("num-server-rounds", "evaluate-every"):
            if c[key] < 0 or (key == "num-server-rounds" and c[key] < 1):
                raise ValueError(f"run config {key} must be {'>= 1' if key == 'num-server-rounds' else '>= 0'}, "
                                 f"got {c[key]}")
        if not c["round-timeout"] > 0:
            raise ValueError(f"run config round-timeout must be > 0 s, got {c['round-timeout']}")
        if c["influence"] and c["algorithm"] != "fedavg":
            raise ValueError(f"run config influence tracks Fed-Influence through FedAvg rounds; algorithm is "
                             f"{c['algorithm']!r}")
        if not c["state-db"]:
            raise ValueError("run config state-db must name the coordinator's SQLite file")
        strategy = StrategyConfig(
            fraction_train=c["fraction-train"],
            min_train_nodes=c["min-train-nodes"],
            fraction_evaluate=c["fraction-evaluate"],
            min_evaluate_nodes=c["min-evaluate-nodes"],
            max_norm=c["max-norm"] if c["max-norm"] > 0 else None,
            max_staleness=c["max-staleness"],
            server_lr=c["server-lr"],
            seed=c["seed"],
            clip_norm=c["clip-norm"] if c["clip-norm"] > 0 else None,
            trim_fraction=c["trim-fraction"],
            weighting=c["fedlaavg-weighting"],
            fedlaavg_population=c["fedlaavg-population"],
            fedlaavg_warmup=c["fedlaavg-warmup"],
            lr_decay=c["lr-decay"],
            lr_decay_every=c["lr-decay-every"],
            influence=c["influence"],
            quarantine=tuple(r.strip() for r in c["quarantine"].split(",") if r.strip()),
            node_registry=c["node-registry"],
            num_blocks=c["num-blocks"],
            rounds_per_block=c["rounds-per-block"],
        ).validate()
        mimic_version = ""
        if c["algorithm"] == "dc-ccl" or c["dcccl-mimic"] or c["dcccl-small"]:
            c, mimic_version = dcccl_run_config(c)
        from forest_perception.collab.flower.iciia_round import iciia_run_config

        c, iciia_info = iciia_run_config(c)  # iciia: the module's base network is the architecture
        architecture, init = architecture_from_run_config(c)  # reads and checks init against the set keys
        task = TaskConfig.from_run_config({
            **c, "model": architecture.model, "model-kwargs": kwargs_text(architecture.kwargs), "base-channels": 0,
            "input-height": architecture.input_hw[0], "input-width": architecture.input_hw[1]})
        if init is not None and init.max_depth is not None and init.max_depth != task.max_depth:
            LOG.warning("init %s was trained up to %.1f m, this run trains and scores up to max-depth %.1f m",
                        init.init, init.max_depth, task.max_depth)
        # sent with every message: local training, and the network every rover must build
        train_config = {k: c[k] for k in ("local-epochs", "local-steps", "lr", "optimizer", "proximal-mu",
                                          "batch-size", "max-staleness")}
        train_config.update(task.run_config())
        if mimic_version:
            train_config["mimic-version"] = mimic_version
        from forest_perception.collab.flower.coda_round import coda_train_config

        train_config.update(coda_train_config(c, task))
        train_config.update(iciia_info)
        return cls(
            algorithm=c["algorithm"],
            num_rounds=c["num-server-rounds"],
            state_db=c["state-db"],
            keep_updates=c["store-updates"],
            evaluate_every=c["evaluate-every"],
            round_timeout=c["round-timeout"],
            population=c["population"],
            strategy=strategy,
            task=task,
            train_config=train_config,
            init=init,
            cloud_test=c["cloud-test"],
            dcccl_mimic_version=mimic_version,
            dcccl_small=c["dcccl-small"],
        )


def dcccl_run_config(c: Mapping) -> tuple[dict, str]:
    """A dc-ccl run config with the mimic's network as the architecture, and the mimic's version.

    ``ValueError`` naming the key when dc-ccl keys come with another algorithm, the mimic is missing or not a
    mimic, ``init`` or architecture keys are set (the rovers train at the mimic's input).
    """
    from forest_perception.collab.dcccl import read_part
    from forest_perception.collab.flower.network import complete_kwargs, explicit_architecture

    if c["algorithm"] != "dc-ccl":
        raise ValueError(f"run config dcccl-mimic / dcccl-small belong to algorithm dc-ccl, not {c['algorithm']!r}")
    if not c["dcccl-mimic"]:
        raise ValueError("algorithm dc-ccl needs run config dcccl-mimic: the mimic file the rovers train on "
                         "(written by forest-fl dcccl distil)")
    if str(c["init"]).strip():
        raise ValueError("algorithm dc-ccl starts from dcccl-small (or a fresh small submodel), not init: leave init "
                         "unset")
    given = explicit_architecture(c)
    if given:
        raise ValueError(f"algorithm dc-ccl trains at the mimic's network input: leave {', '.join(sorted(given))} "
                         "unset")
    mimic = read_part(c["dcccl-mimic"], "mimic")
    arch = {"model": mimic.network, "model-kwargs": kwargs_text(complete_kwargs(mimic.network, mimic.network_kwargs)),
            "input-height": mimic.input_hw[0], "input-width": mimic.input_hw[1]}
    return {**c, **arch}, mimic.version


def run_identity(settings: ServerSettings, names: list[str], shapes: list[tuple[int, ...]]) -> dict:
    """What a state file must match to be resumed: algorithm, model, its tensor layout and (with ``init``) the
    starting weights, so a run from other weights (say, a newly shipped model) never resumes an old one."""
    layout = hashlib.sha256(json.dumps([names, [list(s) for s in shapes]]).encode()).hexdigest()[:16]
    task = settings.task
    identity = {
        "algorithm": settings.algorithm,
        "model": task.model,
        "model-kwargs": kwargs_text(task.network_kwargs()),
        "input": f"{task.input_hw[1]}x{task.input_hw[0]}",
        "tensors": layout,
    }
    if settings.init is not None:
        identity["init-sha256"] = settings.init.weights_sha256[:16]
    if settings.dcccl_mimic_version:
        identity["dcccl-mimic"] = settings.dcccl_mimic_version
    if settings.algorithm == "coda":  # another arm, budget or encoder is another run
        t = settings.train_config
        identity["coda"] = f"{t['coda-arm']}/{t['coda-candidates']}/gate {t['coda-gate']:g}/{t['coda-encoder-version']}"
    if settings.algorithm == "iciia":  # another module or base network is another run
        t = settings.train_config
        identity["iciia"] = f"{t['iciia-module-version']}/{t['iciia-base-version']}"
    if settings.strategy.influence:
        identity["influence"] = "on"  # an estimate must follow the run from its first round
    return identity


@dataclass
class CloudTest:
    """The coordinator's own test folder (forest layout): every frame's segment, at most ``max_frames`` of them."""

    folder: str
    task: TaskConfig
    images: object = None
    depth: object = None

    def __post_init__(self) -> None:
        self.images, self.depth = load_test_frames(self.folder, self.task)

    def evaluate(self, names: list[str], params: NDArrays) -> EvalEntry:
        """The model's AbsRel, delta1, RMSE and loss on the test frames (at the network's input size)."""
        model = build_model(self.task)
        set_arrays(model, names, params)
        result = evaluate(model, self.images, self.depth, self.task)
        metrics = {"absrel": result["absrel"], "delta1": result["delta1"], "rmse": result["rmse"],
                   "eval-loss": result["loss"]}
        return EvalEntry(CLOUD, "cloud", "ok", int(result["num-examples"]), metrics, self.folder)


class Coordinator:
    """The resumable round loop around a strategy and a store."""

    def __init__(self, strategy: RoverStrategy, store: CoordinatorStore, settings: ServerSettings,
                 cloud: CloudTest | None = None) -> None:
        self.strategy = strategy
        self.store = store
        self.settings = settings
        self.cloud = cloud
        self.records: list[RoundRecord] = []
        self.resumed_from: int | None = None

    def start(self) -> int:
        """Load the last completed round (or save round 0); returns the last completed round."""
        latest = self.store.latest()
        if latest is None:
            self.store.save_initial(self.strategy.names, self.strategy.params, self.strategy.state_dict())
            LOG.info("coordinator: new run in %s (%s)", self.store.path, self.settings.algorithm)
            return 0
        last, names, _params, state = latest
        if names != self.strategy.names:
            raise ValueError(f"coordinator store {self.store.path} holds a model with other tensors than this run's")
        self.strategy.load_state_dict(state)
        self.resumed_from = last
        LOG.info("coordinator: resuming %s from round %d (%s)", self.store.path, last, self.settings.algorithm)
        return last

    def run_round(self, grid: Grid, server_round: int) -> RoundRecord:
        """Train (and maybe evaluate) one round, then commit it."""
        strategy = self.strategy
        arrays = arrays_to_record(strategy.names, strategy.params)
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
        replies = send_and_receive(grid, messages, self.settings.round_timeout) if messages else []
        strategy.aggregate_train(server_round, replies)
        strategy.after_train(server_round, grid, self.settings.round_timeout)
        record = strategy.last_record
        every = self.settings.evaluate_every
        if every and (server_round % every == 0 or server_round == self.settings.num_rounds):
            record.evaluations, record.eval_metrics = self.evaluate(grid, server_round)
        record.finished = time.time()
        record.resumed = self.resumed_from is not None and server_round == self.resumed_from + 1
        self.store.commit_round(record, strategy.names, strategy.params, strategy.state_dict())
        self.records.append(record)
        LOG.info(
            "round %d committed: %d accepted, %d rejected, %d failed/missing; train-loss %s absrel %s; %.1f s",
            server_round, record.count("accepted"), record.count("rejected"),
            record.count("failed") + record.count("missing"),
            _fmt(record.train_metrics.get("train-loss")), _fmt(record.train_metrics.get("absrel")),
            record.finished - record.started,
        )
        return record

    def evaluate(self, grid: Grid, server_round: int) -> tuple[list[EvalEntry], dict[str, float]]:
        """The model after ``server_round`` on every selected rover's held-out segments and the cloud test.

        Returns the entries (per rover, their frame-weighted mean, the cloud test) and the round's
        ``eval_metrics`` (the mean's, and the cloud test's as ``cloud-<metric>``).
        """
        strategy = self.strategy
        arrays = arrays_to_record(strategy.names, strategy.params)
        messages = list(strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid))
        replies = send_and_receive(grid, messages, self.settings.round_timeout) if messages else []
        metrics = strategy.aggregate_evaluate(server_round, replies) if messages else None
        entries = sorted(strategy.last_evaluation.values(), key=lambda e: e.name)
        summary = {} if metrics is None else {k: float(v) for k, v in metrics.items()}
        if entries:
            entries.append(aggregate_evaluations(entries))
        entries.extend(strategy.extra_evaluations())  # iciia: the same rovers without history
        if self.cloud is not None:
            params = strategy.params if server_round == 0 else strategy.eval_params(server_round)
            cloud = self.cloud.evaluate(strategy.names, params)
            entries.append(cloud)
            summary.update({f"cloud-{k}": v for k, v in cloud.metrics.items()})
            summary["cloud-frames"] = float(cloud.frames)
        if summary:
            LOG.info("round %d evaluated: held-out absrel %s delta1 %s (%d frames); cloud absrel %s", server_round,
                     _fmt(summary.get("absrel")), _fmt(summary.get("delta1")), int(summary.get("frames", 0)),
                     _fmt(summary.get("cloud-absrel")))
        return entries, summary

    def evaluate_initial(self, grid: Grid) -> None:
        """Evaluate the initial model (round 0) once per store: the curves' starting point."""
        if not self.settings.evaluate_every or self.store.evaluations(0):
            return
        entries, _ = self.evaluate(grid, 0)
        if entries:
            self.store.commit_evaluation(0, entries)

    def run(self, grid: Grid, num_rounds: int | None = None) -> list[RoundRecord]:
        """Resume or start (evaluating the initial model), then run rounds up to ``num_rounds`` (default: settings')."""
        last = self.start()
        if last == 0:
            self.evaluate_initial(grid)
        total = self.settings.num_rounds if num_rounds is None else int(num_rounds)
        for server_round in range(last + 1, total + 1):
            self.run_round(grid, server_round)
        return self.records


def _fmt(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4f}"


def build_coordinator(config: Mapping) -> Coordinator:
    """Strategy, store and loop from a (merged) run config."""
    settings = ServerSettings.from_run_config(config)
    if settings.init is not None:
        names, initial = settings.init.names, settings.init.arrays
        set_arrays(build_model(settings.task), names, initial)  # the network every rover builds takes them
        LOG.info("coordinator: initial model %s (%s, weights %s)", settings.init.init,
                 settings.task.model, settings.init.weights_sha256[:12])
    elif settings.dcccl_small:
        names, initial = dcccl_start(settings)
    elif settings.algorithm == "iciia":  # the module's tensors; they never change
        from forest_perception.collab.flower.iciia_round import module_arrays

        names, initial = module_arrays(settings.train_config["iciia-module"])
    else:
        names, initial = initial_arrays(settings.task)
    cloud = CloudTest(settings.cloud_test, settings.task) if settings.cloud_test else None
    availability = None
    if settings.population:
        availability = load_population(settings.population).is_available
    strategy = build_strategy(
        settings.algorithm, names, initial, settings.strategy, settings.train_config, availability
    )
    identity = run_identity(settings, names, [tuple(a.shape) for a in initial])
    store = CoordinatorStore(Path(settings.state_db), identity=identity, keep_updates=settings.keep_updates)
    return Coordinator(strategy, store, settings, cloud)


def dcccl_start(settings: ServerSettings) -> tuple[list[str], NDArrays]:
    """The global model of a dc-ccl run that starts from the small submodel file ``settings.dcccl_small``.

    ``VersionMismatchError`` when that small submodel was trained with another mimic than the running one.
    """
    from forest_perception.collab.dcccl import VersionMismatchError, read_part

    small = read_part(settings.dcccl_small, "small")
    if small.mimic_version != settings.dcccl_mimic_version:
        raise VersionMismatchError(f"dcccl-small {settings.dcccl_small} ({small.version}) was trained with mimic "
                                   f"{small.mimic_version}, the run's mimic is {settings.dcccl_mimic_version}")
    channels = int(small.network_kwargs.get("base_channels", 0))
    if channels != settings.task.dcccl_small_channels:
        raise ValueError(f"dcccl-small {settings.dcccl_small} has {channels} base channels, run config "
                         f"dcccl-small-channels is {settings.task.dcccl_small_channels}")
    model = build_model(settings.task)
    model.part.load_state_dict(small.module.state_dict())
    return get_arrays(model)


def make_server_app(overrides: Mapping | None = None) -> ServerApp:
    """A coordinator ServerApp; ``overrides`` win over the run config (the simulation runner binds its config here)."""
    bound = dict(overrides or {})
    merge_run_config(bound)
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        coordinator = build_coordinator(merge_run_config(context.run_config, bound))
        try:
            coordinator.run(grid)
        finally:
            coordinator.store.close()

    return server


app = make_server_app()
"""The ServerApp ``pyproject.toml`` names (``collab.flower.server_app:app``); configured by the run config."""
