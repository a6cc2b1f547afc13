"""The cloud coordinator's state in SQLite: global model versions, round metrics, who sent what.

Pure Python (sqlite3 + numpy, no Flower or torch), so the rover's collab_node and the tools can read it;
one transaction per completed round, so a coordinator killed mid-round repeats that round and applies no
update twice. Tables and resuming: ``docs/federated.md`` ("Coordinator state (SQLite) and resuming").
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from forest_perception.collab.state import pack_state, unpack_state
from forest_perception.collab.updates import ClientUpdate, NDArrays

SCHEMA_VERSION = 2
_READABLE_SCHEMAS = (1, 2)  # version 1 had no evaluations table; opened for writing it is upgraded

UPDATE_STATUSES = ("accepted", "rejected", "failed", "missing")
"""``accepted``/``rejected``: screened by the server; ``failed``: the rover replied with an error;
``missing``: no reply before the round's timeout."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    started REAL NOT NULL,
    finished REAL NOT NULL,
    wall_s REAL NOT NULL,
    num_available INTEGER NOT NULL,
    num_selected INTEGER NOT NULL,
    num_accepted INTEGER NOT NULL,
    num_rejected INTEGER NOT NULL,
    num_failed INTEGER NOT NULL,
    bytes_down INTEGER NOT NULL,
    bytes_up INTEGER NOT NULL,
    block INTEGER,
    chosen TEXT,
    train_metrics TEXT NOT NULL,
    eval_metrics TEXT NOT NULL,
    resumed INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS updates (
    round INTEGER NOT NULL REFERENCES rounds(round),
    rover_id TEXT NOT NULL,
    chain TEXT NOT NULL,
    node_id TEXT NOT NULL,  -- Flower node ids are unsigned 64-bit, beyond SQLite's INTEGER
    status TEXT NOT NULL,
    reason TEXT NOT NULL,
    message TEXT NOT NULL,
    num_examples INTEGER NOT NULL,
    base_round INTEGER,
    bytes_down INTEGER NOT NULL,
    bytes_up INTEGER NOT NULL,
    digest TEXT NOT NULL,
    metrics TEXT NOT NULL,
    PRIMARY KEY (round, rover_id, chain)
);
CREATE TABLE IF NOT EXISTS models (
    round INTEGER PRIMARY KEY,
    params BLOB NOT NULL,
    sha256 TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS server_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    round INTEGER NOT NULL,
    state BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS evaluations (
    round INTEGER NOT NULL,
    name TEXT NOT NULL,  -- a rover id, "rovers" (their frame-weighted mean) or "cloud"
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    frames INTEGER NOT NULL,
    absrel REAL,
    delta1 REAL,
    rmse REAL,
    loss REAL,
    message TEXT NOT NULL,
    PRIMARY KEY (round, name)
);
CREATE TABLE IF NOT EXISTS update_blobs (
    round INTEGER NOT NULL,
    rover_id TEXT NOT NULL,
    chain TEXT NOT NULL,
    seq INTEGER NOT NULL,
    blob BLOB NOT NULL,
    PRIMARY KEY (round, rover_id, chain)
);
"""


@dataclass
class UpdateEntry:
    """What one rover did in one round, as the coordinator saw it."""

    rover_id: str
    node_id: int
    status: str
    chain: str = "mixed"  # MC-PSGD: "mixed" or "separate"
    reason: str = ""
    message: str = ""
    num_examples: int = 0
    base_round: int | None = None
    bytes_down: int = 0
    bytes_up: int = 0
    digest: str = ""  # sha256 of the received tensors, "" when nothing usable arrived
    metrics: dict[str, float] = field(default_factory=dict)
    update: ClientUpdate | None = None  # the parsed update, written to update_blobs when kept


EVAL_KINDS = ("rover", "rovers", "cloud")
"""``rover``: one rover's held-out segments; ``rovers``: their frame-weighted mean; ``cloud``: the cloud test folder."""
EVAL_STATUSES = ("ok", "no_data", "no_holdout", "failed", "missing")
AGGREGATE = "rovers"
CLOUD = "cloud"


@dataclass
class EvalEntry:
    """The global model of one round scored on one rover's held-out segments, their mean, or the cloud test."""

    name: str  # rover id, AGGREGATE or CLOUD
    kind: str = "rover"
    status: str = "ok"
    frames: int = 0
    metrics: dict[str, float] = field(default_factory=dict)  # absrel, delta1, rmse, eval-loss
    message: str = ""


def aggregate_evaluations(entries: Sequence[EvalEntry]) -> EvalEntry:
    """The frame-weighted mean of the rovers' ``ok`` evaluations (status ``missing`` when there is none)."""
    scored = [e for e in entries if e.kind == "rover" and e.status == "ok" and e.frames > 0]
    frames = sum(e.frames for e in scored)
    metrics: dict[str, float] = {}
    for key in ("absrel", "delta1", "rmse", "eval-loss"):
        pairs = [(e.frames, e.metrics[key]) for e in scored if math.isfinite(e.metrics.get(key, math.nan))]
        weight = sum(n for n, _ in pairs)
        if weight:
            metrics[key] = sum(n * v for n, v in pairs) / weight
    status = "ok" if scored else "missing"
    return EvalEntry(AGGREGATE, "rovers", status, frames, metrics, f"{len(scored)} of {len(entries)} rover(s)")


@dataclass
class RoundRecord:
    """Everything one completed round leaves in the store (besides the model and state)."""

    server_round: int
    started: float
    finished: float = 0.0
    num_available: int = 0
    selected: list[str] = field(default_factory=list)
    entries: list[UpdateEntry] = field(default_factory=list)
    block: int | None = None
    chosen: str | None = None
    train_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    evaluations: list[EvalEntry] = field(default_factory=list)
    resumed: bool = False

    def count(self, status: str) -> int:
        """Number of entries with ``status``."""
        return sum(1 for e in self.entries if e.status == status)

    @property
    def bytes_down(self) -> int:
        """Bytes of model sent to the rovers this round."""
        return sum(e.bytes_down for e in self.entries)

    @property
    def bytes_up(self) -> int:
        """Bytes of updates received from the rovers this round."""
        return sum(e.bytes_up for e in self.entries)


def params_digest(arrays: Sequence[np.ndarray]) -> str:
    """sha256 over dtype, shape and bytes of every tensor, in order."""
    digest = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(f"{a.dtype.str}{a.shape};".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def _json(value: dict) -> str:
    # NaN/Inf are not JSON; a metric that is not finite is stored as null
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in value.items()}
    return json.dumps(clean, sort_keys=True)


class CoordinatorStore:
    """SQLite file of one federated run; see the module docstring.

    ``identity`` describes the run (algorithm, model, ...): a new file records it, an
    existing one must match it (a different value is refused, naming the key), so a
    coordinator never resumes another run's state. Use from one thread (the ServerApp's).
    """

    def __init__(
        self,
        path: str | Path,
        identity: dict | None = None,
        keep_updates: bool = False,
        readonly: bool = False,
    ) -> None:
        self.path = Path(path)
        self.keep_updates = bool(keep_updates)
        self.readonly = bool(readonly)
        if readonly:
            if not self.path.is_file():
                raise FileNotFoundError(f"coordinator store {self.path} does not exist")
            self._conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None, timeout=30.0)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=30.0)
            try:
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("PRAGMA synchronous=FULL")
                self._conn.executescript(_SCHEMA)
            except sqlite3.DatabaseError as exc:
                self._conn.close()
                raise ValueError(f"coordinator store {self.path} is not a usable SQLite database: {exc}") from None
        self._check_schema()
        if identity is not None:
            self.check_identity(identity)

    # ------------------------------------------------------------------ plumbing

    def close(self) -> None:
        """Close the connection (idempotent)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> CoordinatorStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        if self.readonly:
            raise PermissionError(f"coordinator store {self.path} is open read-only")
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def _meta(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def _check_schema(self) -> None:
        version = self._meta("schema_version")
        if version is None:
            if not self.readonly:
                with self._transaction() as conn:
                    conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            return
        if int(version) not in _READABLE_SCHEMAS:
            raise ValueError(
                f"coordinator store {self.path} has schema version {version}, this code reads "
                f"{', '.join(map(str, _READABLE_SCHEMAS))}"
            )
        if int(version) < SCHEMA_VERSION and not self.readonly:  # the schema script added the new tables
            with self._transaction() as conn:
                conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))

    # ------------------------------------------------------------------ identity

    @property
    def identity(self) -> dict:
        """The run description recorded when the store was created ({} if none)."""
        value = self._meta("identity")
        return {} if value is None else json.loads(value)

    def check_identity(self, identity: dict) -> None:
        """Record ``identity`` in a new store or refuse one that differs from the recorded one."""
        recorded = self._meta("identity")
        if recorded is None:
            if self.readonly:
                return
            with self._transaction() as conn:
                conn.execute("INSERT INTO meta VALUES ('identity', ?)", (json.dumps(identity, sort_keys=True),))
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('created', ?)", (repr(time.time()),))
            return
        saved = json.loads(recorded)
        for key in sorted(set(saved) | set(identity)):
            if saved.get(key) != identity.get(key):
                raise ValueError(
                    f"coordinator store {self.path} holds a run with {key}={saved.get(key)!r}, this run has "
                    f"{key}={identity.get(key)!r}; use another state file to start a new run"
                )

    # ------------------------------------------------------------------ writing

    def last_round(self) -> int | None:
        """The last completed round (0 = only the initial model saved), or None for an empty store."""
        row = self._conn.execute("SELECT MAX(round) FROM models").fetchone()
        return None if row[0] is None else int(row[0])

    def save_initial(self, names: Sequence[str], params: Sequence[np.ndarray], state: dict) -> None:
        """Store the initial global model as round 0, with the server state it starts from."""
        if self.last_round() is not None:
            raise ValueError(f"coordinator store {self.path} already has a model (round {self.last_round()})")
        with self._transaction() as conn:
            self._insert_model(conn, 0, names, params)
            conn.execute("INSERT OR REPLACE INTO server_state VALUES (1, 0, ?)", (pack_state(state),))

    def commit_round(
        self, record: RoundRecord, names: Sequence[str], params: Sequence[np.ndarray], state: dict
    ) -> None:
        """Commit one completed round in one transaction: its row, its updates, the new model and state.

        Refuses (``ValueError``) a round that is not the one after the last completed round, so a
        round can never be counted twice.
        """
        last = self.last_round()
        if last is None:
            raise ValueError(f"coordinator store {self.path} has no initial model; call save_initial first")
        if record.server_round != last + 1:
            raise ValueError(
                f"round {record.server_round} cannot be committed: the last completed round is {last}, "
                f"the next must be {last + 1}"
            )
        seen: set[tuple[str, str]] = set()
        for entry in record.entries:
            if entry.status not in UPDATE_STATUSES:
                raise ValueError(f"update from {entry.rover_id!r}: status {entry.status!r} not in {UPDATE_STATUSES}")
            key = (entry.rover_id, entry.chain)
            if key in seen:
                raise ValueError(
                    f"round {record.server_round}: two entries for rover {entry.rover_id!r} ({entry.chain})"
                )
            seen.add(key)
        finished = record.finished or time.time()
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO rounds VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.server_round,
                    record.started,
                    finished,
                    finished - record.started,
                    record.num_available,
                    len(record.selected),
                    record.count("accepted"),
                    record.count("rejected"),
                    record.count("failed") + record.count("missing"),
                    record.bytes_down,
                    record.bytes_up,
                    record.block,
                    record.chosen,
                    _json(record.train_metrics),
                    _json(record.eval_metrics),
                    int(record.resumed),
                ),
            )
            seq = 0
            for entry in record.entries:
                conn.execute(
                    "INSERT INTO updates VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        record.server_round,
                        entry.rover_id,
                        entry.chain,
                        str(entry.node_id),
                        entry.status,
                        entry.reason,
                        entry.message,
                        int(entry.num_examples),
                        entry.base_round,
                        int(entry.bytes_down),
                        int(entry.bytes_up),
                        entry.digest,
                        _json(entry.metrics),
                    ),
                )
                if self.keep_updates and entry.status == "accepted" and entry.update is not None:
                    blob = pack_state(_update_state(entry.update))
                    conn.execute(
                        "INSERT INTO update_blobs VALUES (?, ?, ?, ?, ?)",
                        (record.server_round, entry.rover_id, entry.chain, seq, blob),
                    )
                    seq += 1
            self._insert_evaluations(conn, record.server_round, record.evaluations)
            self._insert_model(conn, record.server_round, names, params)
            conn.execute(
                "INSERT OR REPLACE INTO server_state VALUES (1, ?, ?)", (record.server_round, pack_state(state))
            )

    def commit_evaluation(self, server_round: int, entries: Sequence[EvalEntry]) -> None:
        """Store the evaluations of an already committed round's model (round 0: the initial model) at once."""
        last = self.last_round()
        if last is None or server_round > last:
            raise ValueError(f"coordinator store {self.path}: no model of round {server_round} to have evaluated")
        with self._transaction() as conn:
            conn.execute("DELETE FROM evaluations WHERE round = ?", (int(server_round),))
            self._insert_evaluations(conn, server_round, entries)

    @staticmethod
    def _insert_evaluations(conn: sqlite3.Connection, server_round: int, entries: Sequence[EvalEntry]) -> None:
        for e in entries:
            if e.kind not in EVAL_KINDS or e.status not in EVAL_STATUSES:
                raise ValueError(f"evaluation {e.name!r} of round {server_round}: kind {e.kind!r} / status "
                                 f"{e.status!r} not in {EVAL_KINDS} / {EVAL_STATUSES}")

            def number(key: str, metrics: dict = e.metrics) -> float | None:
                value = metrics.get(key)
                return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None

            conn.execute(
                "INSERT INTO evaluations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (int(server_round), e.name, e.kind, e.status, int(e.frames), number("absrel"), number("delta1"),
                 number("rmse"), number("eval-loss"), e.message),
            )

    @staticmethod
    def _insert_model(conn: sqlite3.Connection, server_round: int, names: Sequence[str], params: Sequence) -> None:
        if len(names) != len(params):
            raise ValueError(f"model of round {server_round}: {len(names)} names for {len(params)} tensors")
        arrays = [np.asarray(p) for p in params]
        blob = pack_state({"names": list(names), "params": arrays})
        conn.execute(
            "INSERT INTO models VALUES (?, ?, ?, ?)", (server_round, blob, params_digest(arrays), time.time())
        )

    # ------------------------------------------------------------------ reading

    def model(self, server_round: int | None = None) -> tuple[list[str], NDArrays]:
        """Tensor names and global model after ``server_round`` (default: the last completed round)."""
        if server_round is None:
            server_round = self.last_round()
            if server_round is None:
                raise LookupError(f"coordinator store {self.path} holds no model yet")
        row = self._conn.execute("SELECT params FROM models WHERE round = ?", (int(server_round),)).fetchone()
        if row is None:
            raise LookupError(f"coordinator store {self.path} has no model for round {server_round}")
        state = unpack_state(row[0])
        return list(state["names"]), list(state["params"])

    def latest(self) -> tuple[int, list[str], NDArrays, dict] | None:
        """``(round, names, params, server state)`` of the last completed round, or None for an empty store."""
        last = self.last_round()
        if last is None:
            return None
        row = self._conn.execute("SELECT round, state FROM server_state WHERE id = 1").fetchone()
        if row is None or int(row[0]) != last:
            raise ValueError(
                f"coordinator store {self.path}: server state is for round {None if row is None else row[0]}, "
                f"the last model for round {last}; the file was edited outside the coordinator"
            )
        names, params = self.model(last)
        return last, names, params, unpack_state(row[1])

    def rounds(self) -> list[dict]:
        """One dict per completed round, in order (metrics decoded)."""
        cursor = self._conn.execute("SELECT * FROM rounds ORDER BY round")
        columns = [c[0] for c in cursor.description]
        out = []
        for row in cursor.fetchall():
            item = dict(zip(columns, row))
            item["train_metrics"] = json.loads(item["train_metrics"])
            item["eval_metrics"] = json.loads(item["eval_metrics"])
            item["resumed"] = bool(item["resumed"])
            out.append(item)
        return out

    def updates(self, server_round: int | None = None, status: str | None = None) -> list[dict]:
        """Per-rover rows, optionally of one round and/or one status, ordered by round and rover."""
        query, args = "SELECT * FROM updates", []
        clauses = []
        if server_round is not None:
            clauses.append("round = ?")
            args.append(int(server_round))
        if status is not None:
            clauses.append("status = ?")
            args.append(status)
        if clauses:
            query += " WHERE " + " AND ".join(clauses)
        cursor = self._conn.execute(query + " ORDER BY round, rover_id, chain", args)
        columns = [c[0] for c in cursor.description]
        out = []
        for row in cursor.fetchall():
            item = dict(zip(columns, row))
            item["metrics"] = json.loads(item["metrics"])
            out.append(item)
        return out

    def evaluations(self, server_round: int | None = None) -> list[dict]:
        """Evaluation rows (round, name, kind, status, frames, absrel, delta1, rmse, loss, message) by round, name.

        A store of schema version 1 has none.
        """
        if self._conn.execute("SELECT name FROM sqlite_master WHERE name = 'evaluations'").fetchone() is None:
            return []
        query, args = "SELECT * FROM evaluations", []
        if server_round is not None:
            query, args = query + " WHERE round = ?", [int(server_round)]
        cursor = self._conn.execute(
            query + " ORDER BY round, CASE kind WHEN 'rovers' THEN 0 WHEN 'cloud' THEN 1 ELSE 2 END, name", args)
        columns = [c[0] for c in cursor.description]
        return [dict(zip(columns, row)) for row in cursor.fetchall()]

    def rejections(self, server_round: int | None = None) -> list[dict]:
        """The refused updates (with ``reason`` and ``message``)."""
        return self.updates(server_round, status="rejected")

    def stored_updates(self, server_round: int, chain: str = "mixed") -> list[ClientUpdate]:
        """The accepted updates of a round as received, in aggregation order (needs ``keep_updates``)."""
        rows = self._conn.execute(
            "SELECT blob FROM update_blobs WHERE round = ? AND chain = ? ORDER BY seq", (int(server_round), chain)
        ).fetchall()
        return [_update_from_state(unpack_state(r[0])) for r in rows]

    def summary(self) -> dict:
        """Totals for reports: rounds, updates by status, rejection reasons, bytes."""
        rounds = self.rounds()
        by_status = dict(self._conn.execute("SELECT status, COUNT(*) FROM updates GROUP BY status").fetchall())
        reasons = dict(
            self._conn.execute("SELECT reason, COUNT(*) FROM updates WHERE status = 'rejected' GROUP BY reason")
        )
        return {
            "identity": self.identity,
            "last_round": self.last_round(),
            "rounds": len(rounds),
            "updates": by_status,
            "rejection_reasons": reasons,
            "bytes_down": sum(r["bytes_down"] for r in rounds),
            "bytes_up": sum(r["bytes_up"] for r in rounds),
            "wall_s": sum(r["wall_s"] for r in rounds),
        }


def _update_state(update: ClientUpdate) -> dict:
    return {
        "client_id": update.client_id,
        "round": int(update.round),
        "num_examples": int(update.num_examples),
        "kind": update.kind,
        "params": [np.asarray(p) for p in update.params],
        "rows": None if update.rows is None else [None if r is None else np.asarray(r) for r in update.rows],
    }


def _update_from_state(state: dict) -> ClientUpdate:
    return ClientUpdate(
        client_id=state["client_id"],
        round=int(state["round"]),
        num_examples=int(state["num_examples"]),
        params=list(state["params"]),
        kind=state["kind"],
        rows=state["rows"],
    )
