"""The release registry beside the coordinator: content-addressed artefacts, signed manifests, rollouts, health, audit.

One folder: ``registry.db`` (SQLite), ``objects/<sha256>`` (every artefact once, named by its content),
``release_signing.key`` / ``.pub`` (the ed25519 pair; rovers trust the ``.pub``). A release is one model (ONNX +
card + PyTorch checkpoint) with a signed manifest. A rollout promotes a release to the rovers a
:class:`Selector` picks, in stages (percentages of those rovers; the first is the canary); a stage advances when
each of its rovers has reported healthy for ``soak_s``, and the rollout rolls back by itself when one regresses
(:class:`Thresholds`). Every change is in the audit log. See ``docs/releases.md``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from forest_perception.collab.release.hardware import check_hardware, default_release_hardware, fits
from forest_perception.collab.release.signing import (
    key_id,
    load_signing_key,
    make_signing_key,
    sign_manifest,
)

FORMAT = "forest-release/1"
DB_FILE = "registry.db"
OBJECTS_DIR = "objects"
KEY_FILE = "release_signing.key"
PUBLIC_KEY_FILE = "release_signing.pub"
ROLES = ("onnx", "card", "card_md", "checkpoint")
REPORT_KINDS = ("installed", "health", "refused", "failed", "rolled_back")
"""What a rover reports: it runs the release now; how the release runs (latency, rate, gate metric, crashes); its
gate or verification refused it (counts against the release); it could not install it (disk, network: does not);
it went back to an earlier model."""
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS releases (
    id TEXT PRIMARY KEY, seq INTEGER UNIQUE NOT NULL, created REAL NOT NULL, name TEXT NOT NULL,
    manifest TEXT NOT NULL, signature TEXT NOT NULL, key_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rollouts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, release TEXT NOT NULL REFERENCES releases(id), created REAL NOT NULL,
    selector TEXT NOT NULL, stages TEXT NOT NULL, stage INTEGER NOT NULL, state TEXT NOT NULL,
    thresholds TEXT NOT NULL, stage_started REAL NOT NULL, ended REAL, reason TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS cohort (
    rollout INTEGER NOT NULL, rover TEXT NOT NULL, stage INTEGER NOT NULL, joined REAL NOT NULL,
    PRIMARY KEY (rollout, rover));
CREATE TABLE IF NOT EXISTS rovers (
    id TEXT PRIMARY KEY, groups TEXT NOT NULL, hardware TEXT NOT NULL, first_seen REAL NOT NULL,
    last_seen REAL NOT NULL, running TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS reports (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, rover TEXT NOT NULL, release TEXT NOT NULL,
    kind TEXT NOT NULL, metrics TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS reports_by_rover ON reports (rover, release, ts);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
    release TEXT NOT NULL DEFAULT '', rollout INTEGER, detail TEXT NOT NULL DEFAULT '{}');
"""


class RegistryError(ValueError):
    """A release, rollout or request the registry cannot take; the message says what and why."""


@dataclass(frozen=True)
class RoverInfo:
    """A rover as it introduces itself when it asks for its release."""

    id: str
    groups: tuple[str, ...] = ()
    hardware: str = "pc"


@dataclass
class Selector:
    """Which rovers a rollout is for: every given criterion must hold (rover ids, group tags, hardware classes);
    within one criterion any listed value will do. Nothing given: every rover."""

    rovers: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    hardware: list[str] = field(default_factory=list)

    def matches(self, rover: RoverInfo) -> bool:
        """Whether ``rover`` is one this selector picks."""
        return ((not self.rovers or rover.id in self.rovers)
                and (not self.groups or bool(set(self.groups) & set(rover.groups)))
                and (not self.hardware or rover.hardware in self.hardware))

    def describe(self) -> str:
        """``rovers rover_1,rover_2; group north`` or ``every rover``."""
        parts = [f"{name} {','.join(values)}" for name, values in
                 (("rovers", self.rovers), ("groups", self.groups), ("hardware", self.hardware)) if values]
        return "; ".join(parts) or "every rover"


@dataclass
class Thresholds:
    """When a canary stage is healthy, and what counts as a regression (against the rover's own last health
    report on the model it ran before)."""

    soak_s: float = 20.0  # a stage's rovers run the release this long before it advances
    min_reports: int = 2  # health reports per rover before it counts as healthy (and latency/rate are judged)
    max_latency_ratio: float = 1.3  # mean latency at most this times the rover's baseline
    min_rate_ratio: float = 0.8  # mean rate at least this times the baseline
    max_crashes: int = 0  # depth node crashes / load failures tolerated
    max_absrel_increase: float = 0.02  # gate AbsRel on the rover's held-out frames vs the model it replaced
    stage_timeout_s: float = 0.0  # roll back when a stage is not healthy after this long (0: wait)

    def validate(self) -> Thresholds:
        """Self, or ``RegistryError`` naming the bad value."""
        checks = {"soak_s": self.soak_s >= 0, "min_reports": self.min_reports >= 1,
                  "max_latency_ratio": self.max_latency_ratio >= 1, "min_rate_ratio": 0 <= self.min_rate_ratio <= 1,
                  "max_crashes": self.max_crashes >= 0, "max_absrel_increase": self.max_absrel_increase >= 0,
                  "stage_timeout_s": self.stage_timeout_s >= 0}
        for name, ok in checks.items():
            if not ok or not math.isfinite(float(getattr(self, name))):
                raise RegistryError(f"threshold {name} = {getattr(self, name)!r} is out of range")
        return self


@dataclass
class Announcement:
    """The small message that tells a rover which release it should run (``release`` None: none; it keeps or
    goes back to the model it ran before any release)."""

    release: str | None
    manifest: dict[str, Any] | None = None
    signature: str | None = None
    rollout: int | None = None
    stage: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Announcement:
        """From its JSON form; ``ValueError`` when it is not one."""
        if not isinstance(data, dict) or "release" not in data:
            raise ValueError("not a release announcement (no 'release' key)")
        manifest = data.get("manifest")
        if data["release"] is not None and not isinstance(manifest, dict):
            raise ValueError(f"announcement of release {data['release']!r} carries no manifest")
        return cls(data["release"], manifest, data.get("signature"), data.get("rollout"), data.get("stage"))


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def rank(rollout: int, rover: str) -> str:
    """The order in which a rollout's stages take rovers (stable, spread evenly, independent between rollouts)."""
    return hashlib.sha256(f"{rollout}:{rover}".encode()).hexdigest()


def parse_stages(text: str | Sequence[float]) -> list[float]:
    """``"10,50,100"`` -> ``[10.0, 50.0, 100.0]``: increasing percentages ending at 100; ``RegistryError`` else."""
    try:
        values = [float(v) for v in (text.split(",") if isinstance(text, str) else text) if str(v).strip()]
    except ValueError:
        raise RegistryError(f"stages {text!r}: give percentages such as 10,50,100") from None
    if not values or values[-1] != 100 or any(not 0 < v <= 100 for v in values) or values != sorted(set(values)):
        raise RegistryError(f"stages {text!r}: increasing percentages in (0, 100], the last one 100")
    return values


class ReleaseRegistry:
    """The registry folder; every method opens its own SQLite connection, so one registry serves many threads."""

    def __init__(self, root: str | os.PathLike, clock: Any = time.time) -> None:  # noqa: ANN401 - a callable
        self.root = Path(root)
        self.clock = clock
        if self.root.exists() and not self.root.is_dir():
            raise RegistryError(f"release registry {self.root} is a file, not a folder")
        (self.root / OBJECTS_DIR).mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / DB_FILE
        with self._connect(transaction=False) as conn:  # the journal mode cannot change inside a transaction
            conn.execute("PRAGMA journal_mode=WAL")  # kept in the file: every later connection is in WAL mode
            conn.executescript(SCHEMA)
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?)", (FORMAT,))
            found = conn.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()[0]
        if found != FORMAT:
            raise RegistryError(f"{self.db_path} is a {found} registry, this is {FORMAT}")

    @contextmanager
    def _connect(self, transaction: bool = True) -> Iterator[sqlite3.Connection]:
        try:
            conn = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None)
        except sqlite3.Error as exc:
            raise RegistryError(f"release registry {self.db_path} cannot be opened: {exc}") from None
        try:
            conn.row_factory = sqlite3.Row
            if transaction:
                conn.execute("BEGIN IMMEDIATE")
            yield conn
            if conn.in_transaction:
                conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            conn.close()

    # ------------------------------------------------------------------------------------------ keys, objects
    @property
    def key_path(self) -> Path:
        """The ed25519 signing key (private: stays with the coordinator)."""
        return self.root / KEY_FILE

    @property
    def public_key_path(self) -> Path:
        """The public key every rover trusts (``release_public_key`` of collab_node)."""
        return self.root / PUBLIC_KEY_FILE

    def ensure_key(self) -> bool:
        """Make the signing key pair unless it exists; whether it was made now."""
        if self.key_path.is_file():
            return False
        if self.public_key_path.exists():
            raise RegistryError(f"{self.public_key_path} exists without its private key {self.key_path}: restore the "
                                "key, or move both away to start with a new pair (rovers must then trust the new .pub)")
        make_signing_key(self.key_path, self.public_key_path)
        return True

    def object_path(self, sha256: str) -> Path:
        """Where the artefact with this hash lives (``RegistryError`` for a name that is not a SHA-256)."""
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise RegistryError(f"{sha256!r} is not a SHA-256 hex digest")
        return self.root / OBJECTS_DIR / sha256

    def _store_object(self, path: Path) -> tuple[str, int]:
        digest = file_sha256(path)
        dest = self.object_path(digest)
        if not dest.is_file() or dest.stat().st_size != path.stat().st_size:
            tmp = dest.with_name(f".{digest}.{os.getpid()}.tmp")
            shutil.copyfile(path, tmp)
            if file_sha256(tmp) != digest:
                tmp.unlink(missing_ok=True)
                raise RegistryError(f"{path} changed while it was copied into the registry; try again")
            os.replace(tmp, dest)
        return digest, dest.stat().st_size

    # ------------------------------------------------------------------------------------------ releases
    def create(self, onnx: str | os.PathLike, hardware: Sequence[str] | None = None,
               providers: Sequence[str] | None = None, checkpoint: str | os.PathLike | None = None, notes: str = "",
               actor: str = "cli") -> dict[str, Any]:
        """Add a release of the ONNX model ``onnx`` with its card (``.json``/``.md`` beside it) and PyTorch
        checkpoint (``checkpoint``, else ``<stem>.pt`` beside it, else the one its card names). Returns the signed
        manifest. ``RegistryError`` naming a missing or unreadable file."""
        from forest_perception.inference import ModelLoadError, read_onnx_metadata

        onnx = Path(onnx)
        if onnx.suffix != ".onnx" or not onnx.is_file():
            raise RegistryError(f"release model {onnx}: not an existing .onnx file")
        try:
            metadata = read_onnx_metadata(onnx)
        except ModelLoadError as exc:
            raise RegistryError(f"release model {onnx}: {exc}") from None
        card = onnx.with_suffix(".json")
        if not card.is_file():
            raise RegistryError(f"release model {onnx}: its model card {card.name} is missing (forest-train export "
                                "writes it)")
        try:
            card_data = json.loads(card.read_text())
        except (OSError, ValueError) as exc:
            raise RegistryError(f"model card {card}: not readable JSON ({exc})") from None
        checkpoint = Path(checkpoint) if checkpoint else self._find_checkpoint(onnx, card_data)
        default_hw, default_providers = default_release_hardware(onnx.stem)
        hardware = check_hardware(list(hardware or default_hw), "release hardware")
        providers = list(providers or default_providers)
        files = {"onnx": onnx, "card": card}
        if onnx.with_suffix(".md").is_file():
            files["card_md"] = onnx.with_suffix(".md")
        if checkpoint is not None:
            if not checkpoint.is_file():
                raise RegistryError(f"release checkpoint {checkpoint} does not exist")
            files["checkpoint"] = checkpoint
        self.ensure_key()
        key = load_signing_key(self.key_path)
        artefacts = []
        for role, path in files.items():
            digest, size = self._store_object(path)
            artefacts.append({"role": role, "file": path.name, "sha256": digest, "size": size})
        onnx_sha = artefacts[0]["sha256"]
        with self._connect() as conn:
            seq = int(conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM releases").fetchone()[0])
            release_id = f"r{seq:04d}-{onnx.stem}-{onnx_sha[:8]}"
            manifest = {
                "format": FORMAT, "release": release_id, "name": onnx.stem,
                "version": str(metadata.get("version", "")), "created": round(float(self.clock()), 3),
                "hardware": hardware, "providers": providers,
                "input": f"{metadata.get('input_width', '?')}x{metadata.get('input_height', '?')}",
                "artefacts": artefacts, "key_id": key_id(key), "notes": str(notes),
                "metrics": card_data.get("metrics", {}) if isinstance(card_data.get("metrics"), dict) else {},
            }
            signature = sign_manifest(manifest, key)
            conn.execute("INSERT INTO releases VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (release_id, seq, manifest["created"], onnx.stem, json.dumps(manifest), signature,
                          manifest["key_id"]))
            self._audit(conn, actor, "create", release_id, None,
                        {"name": onnx.stem, "version": manifest["version"], "hardware": hardware,
                         "bytes": sum(a["size"] for a in artefacts)})
        return manifest

    @staticmethod
    def _find_checkpoint(onnx: Path, card: dict[str, Any]) -> Path | None:
        beside = onnx.with_suffix(".pt")
        if beside.is_file():
            return beside
        named = card.get("checkpoint", {}).get("file") if isinstance(card.get("checkpoint"), dict) else None
        if named and (onnx.parent / Path(str(named)).name).is_file():
            return onnx.parent / Path(str(named)).name
        return None

    def resolve(self, name: str) -> str:
        """The release id that ``name`` (an id, a unique id prefix or the release number ``3``/``r0003``) means."""
        with self._connect() as conn:
            return self._resolve(conn, name)

    @staticmethod
    def _resolve(conn: sqlite3.Connection, name: str) -> str:
        name = str(name).strip()
        digits = name[1:] if name[:1] == "r" else name
        if digits.isdigit():
            row = conn.execute("SELECT id FROM releases WHERE seq = ?", (int(digits),)).fetchone()
            if row:
                return str(row[0])
        rows = conn.execute("SELECT id FROM releases WHERE id = ? OR id LIKE ? ORDER BY seq",
                            (name, name.replace("%", "") + "%")).fetchall()
        ids = [r[0] for r in rows]
        if name in ids:
            return name
        if len(ids) == 1:
            return str(ids[0])
        have = [r[0] for r in conn.execute("SELECT id FROM releases ORDER BY seq").fetchall()]
        if not ids:
            raise RegistryError(f"no release {name!r}; releases: {', '.join(have) or 'none yet'}")
        raise RegistryError(f"release {name!r} is ambiguous: {', '.join(ids)}")

    def release(self, name: str) -> tuple[dict[str, Any], str]:
        """``(manifest, signature)`` of a release."""
        with self._connect() as conn:
            row = conn.execute("SELECT manifest, signature FROM releases WHERE id = ?",
                               (self._resolve(conn, name),)).fetchone()
        return json.loads(row[0]), str(row[1])

    def releases(self) -> list[dict[str, Any]]:
        """Every release, oldest first: id, name, version, created, hardware, bytes, rollout states."""
        with self._connect() as conn:
            rows = conn.execute("SELECT id, manifest FROM releases ORDER BY seq").fetchall()
            states = conn.execute("SELECT release, state FROM rollouts ORDER BY id").fetchall()
        out = []
        for row in rows:
            manifest = json.loads(row["manifest"])
            out.append({"id": row["id"], "name": manifest["name"], "version": manifest["version"],
                        "created": manifest["created"], "hardware": manifest["hardware"],
                        "bytes": sum(a["size"] for a in manifest["artefacts"]),
                        "rollouts": [s["state"] for s in states if s["release"] == row["id"]]})
        return out

    # ------------------------------------------------------------------------------------------ rollouts
    def promote(self, name: str, selector: Selector | None = None, stages: Sequence[float] = (100.0,),
                thresholds: Thresholds | None = None, actor: str = "cli") -> int:
        """Start a rollout of a release to the rovers ``selector`` picks, in ``stages``; its id."""
        selector = selector or Selector()
        check_hardware(selector.hardware, "promote --hardware")
        stages = parse_stages(stages)
        thresholds = (thresholds or Thresholds()).validate()
        with self._connect() as conn:
            release_id = self._resolve(conn, name)
            manifest = json.loads(conn.execute("SELECT manifest FROM releases WHERE id = ?",
                                               (release_id,)).fetchone()[0])
            if selector.hardware and not set(selector.hardware) & set(manifest["hardware"]):
                raise RegistryError(f"release {release_id} is made for {', '.join(manifest['hardware'])}, not for "
                                    f"{', '.join(selector.hardware)}: no rover could take it")
            active = conn.execute("SELECT id, selector FROM rollouts WHERE release = ? AND state = 'active'",
                                  (release_id,)).fetchall()
            for row in active:
                if json.loads(row["selector"]) == asdict(selector):
                    raise RegistryError(f"release {release_id} is already rolling out to {selector.describe()} "
                                        f"(rollout {row['id']})")
            now = float(self.clock())
            cursor = conn.execute(
                "INSERT INTO rollouts (release, created, selector, stages, stage, state, thresholds, stage_started) "
                "VALUES (?, ?, ?, ?, 0, 'active', ?, ?)",
                (release_id, now, json.dumps(asdict(selector)), json.dumps(stages), json.dumps(asdict(thresholds)),
                 now))
            rollout = int(cursor.lastrowid)
            self._audit(conn, actor, "promote", release_id, rollout,
                        {"selector": selector.describe(), "stages": stages, "thresholds": asdict(thresholds)})
        return rollout

    def rollback(self, name: str, reason: str = "", actor: str = "cli") -> list[int]:
        """Stop every active or finished rollout of a release: its rovers go back to what they ran before."""
        with self._connect() as conn:
            release_id = self._resolve(conn, name)
            rows = conn.execute("SELECT id FROM rollouts WHERE release = ? AND state IN ('active', 'done')",
                                (release_id,)).fetchall()
            if not rows:
                raise RegistryError(f"release {release_id} has no active or finished rollout to roll back")
            for row in rows:
                self._end(conn, int(row["id"]), release_id, "rolled_back", reason or "rolled back by hand", actor)
        return [int(r["id"]) for r in rows]

    def _end(self, conn: sqlite3.Connection, rollout: int, release_id: str, state: str, reason: str,
             actor: str) -> None:
        conn.execute("UPDATE rollouts SET state = ?, ended = ?, reason = ? WHERE id = ?",
                     (state, float(self.clock()), reason, rollout))
        self._audit(conn, actor, "rollback" if state == "rolled_back" else state, release_id, rollout,
                    {"reason": reason})

    # ------------------------------------------------------------------------------------------ rovers
    def register(self, rover: RoverInfo) -> None:
        """Remember a rover (its groups and hardware as it last told them)."""
        with self._connect() as conn:
            self._register(conn, rover)

    def _register(self, conn: sqlite3.Connection, rover: RoverInfo) -> None:
        now = float(self.clock())
        conn.execute("INSERT INTO rovers (id, groups, hardware, first_seen, last_seen) VALUES (?, ?, ?, ?, ?) "
                     "ON CONFLICT(id) DO UPDATE SET groups = excluded.groups, hardware = excluded.hardware, "
                     "last_seen = excluded.last_seen",
                     (rover.id, json.dumps(sorted(rover.groups)), rover.hardware, now, now))

    def _rovers(self, conn: sqlite3.Connection) -> list[RoverInfo]:
        return [RoverInfo(r["id"], tuple(json.loads(r["groups"])), r["hardware"])
                for r in conn.execute("SELECT id, groups, hardware FROM rovers ORDER BY id").fetchall()]

    def _cohort(self, conn: sqlite3.Connection, rollout: sqlite3.Row) -> dict[str, tuple[int, float]]:
        """The rollout's rovers so far (``rover -> (stage joined, time joined)``), topped up to the current stage."""
        rid = int(rollout["id"])
        members = {r["rover"]: (int(r["stage"]), float(r["joined"]))
                   for r in conn.execute("SELECT rover, stage, joined FROM cohort WHERE rollout = ?", (rid,))}
        if rollout["state"] != "active":
            return members
        selector = Selector(**json.loads(rollout["selector"]))
        hardware = json.loads(conn.execute("SELECT manifest FROM releases WHERE id = ?",
                                           (rollout["release"],)).fetchone()[0])["hardware"]
        eligible = [r.id for r in self._rovers(conn) if selector.matches(r) and fits(hardware, r.hardware)]
        stage = int(rollout["stage"])
        pct = json.loads(rollout["stages"])[stage]
        quota = min(len(eligible), max(1, math.floor(pct / 100.0 * len(eligible) + 0.5))) if eligible else 0
        now = float(self.clock())
        for rover in sorted((r for r in eligible if r not in members), key=lambda r: rank(rid, r)):
            if sum(1 for m in members if m in eligible) >= quota:
                break
            members[rover] = (stage, now)
            conn.execute("INSERT INTO cohort VALUES (?, ?, ?, ?)", (rid, rover, stage, now))
        return members

    def announce(self, rover: RoverInfo) -> Announcement:
        """Register ``rover`` and return the release it should run (:meth:`assignment`)."""
        self.register(rover)
        return self.assignment(rover)

    def assignment(self, rover: RoverInfo) -> Announcement:
        """The release a registered rover should run: the newest rollout (active or done) that picks it and whose
        release fits its hardware, where an active rollout picks it only once its stage includes it. Moves the
        rollouts on first (:meth:`evaluate`: stage timeouts need no report to fire)."""
        self.evaluate()
        with self._connect() as conn:
            rows = conn.execute("SELECT * FROM rollouts WHERE state IN ('active', 'done') ORDER BY id DESC").fetchall()
            for row in rows:
                selector = Selector(**json.loads(row["selector"]))
                manifest_row = conn.execute("SELECT manifest, signature FROM releases WHERE id = ?",
                                            (row["release"],)).fetchone()
                manifest = json.loads(manifest_row["manifest"])
                if not selector.matches(rover) or not fits(manifest["hardware"], rover.hardware):
                    continue
                if row["state"] == "active" and rover.id not in self._cohort(conn, row):
                    continue
                return Announcement(row["release"], manifest, manifest_row["signature"], int(row["id"]),
                                    int(row["stage"]))
        return Announcement(None)

    # ------------------------------------------------------------------------------------------ health
    def report(self, rover_id: str, release: str, kind: str, metrics: dict[str, Any] | None = None,
               reason: str = "") -> list[dict[str, Any]]:
        """Take a rover's report on a release (``REPORT_KINDS``) and move the rollouts on; what changed."""
        if kind not in REPORT_KINDS:
            raise RegistryError(f"report kind {kind!r} is not one of {', '.join(REPORT_KINDS)}")
        clean = {}
        for name, value in (metrics or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                clean[str(name)] = float(value)
        with self._connect() as conn:
            release_id = self._resolve(conn, release) if release else ""
            if not conn.execute("SELECT 1 FROM rovers WHERE id = ?", (rover_id,)).fetchone():
                raise RegistryError(f"rover {rover_id!r} never asked for a release; reports come after announce")
            conn.execute("INSERT INTO reports (ts, rover, release, kind, metrics, reason) VALUES (?, ?, ?, ?, ?, ?)",
                         (float(self.clock()), rover_id, release_id, kind, json.dumps(clean), str(reason)[:1000]))
            if kind in ("installed", "health"):
                conn.execute("UPDATE rovers SET running = ? WHERE id = ?", (release_id, rover_id))
            elif kind == "rolled_back":
                conn.execute("UPDATE rovers SET running = '' WHERE id = ? AND running = ?", (rover_id, release_id))
            if kind != "health":
                self._audit(conn, f"rover:{rover_id}", kind, release_id, None, {"reason": reason, **clean})
        return self.evaluate()

    def _member_state(self, conn: sqlite3.Connection, rollout: sqlite3.Row, rover: str, joined: float,
                      t: Thresholds) -> tuple[str, str]:
        """``("healthy" | "waiting" | "regressed", why)`` of one rover of a rollout."""
        rows = conn.execute("SELECT ts, kind, metrics, reason FROM reports WHERE rover = ? AND release = ? AND ts >= ? "
                            "ORDER BY ts", (rover, rollout["release"], joined)).fetchall()
        for row in rows:
            if row["kind"] == "refused":
                return "regressed", f"{rover} refused it: {row['reason']}"
            if row["kind"] == "rolled_back":
                return "regressed", f"{rover} rolled it back: {row['reason']}"
        gated = [json.loads(r["metrics"]) for r in rows if r["kind"] in ("installed", "health")]
        increase = [g["gate_absrel"] - g["gate_absrel_before"] for g in gated
                    if "gate_absrel" in g and "gate_absrel_before" in g]
        if increase and max(increase) > t.max_absrel_increase:
            return "regressed", (f"{rover}: held-out AbsRel up {max(increase):.4f} over the model it replaced "
                                 f"(allowed {t.max_absrel_increase})")
        health = [json.loads(r["metrics"]) | {"ts": r["ts"]} for r in rows if r["kind"] == "health"]
        if not health:
            failed = [r["reason"] for r in rows if r["kind"] == "failed"]
            return "waiting", (f"{rover} could not install it yet ({failed[-1]})" if failed
                               else f"{rover}: no health report yet")
        crashes = max(h.get("crashes", 0.0) for h in health)
        if crashes > t.max_crashes:
            return "regressed", f"{rover}: {crashes:g} depth node crash(es) (allowed {t.max_crashes})"
        if len(health) < t.min_reports:
            return "waiting", f"{rover}: {len(health)}/{t.min_reports} health reports"
        base_row = conn.execute("SELECT metrics FROM reports WHERE rover = ? AND kind = 'health' AND release != ? "
                                "AND ts <= ? ORDER BY ts DESC LIMIT 1", (rover, rollout["release"], joined)).fetchone()
        base = json.loads(base_row["metrics"]) if base_row else {}
        latency = [h["latency_ms"] for h in health if "latency_ms" in h]
        rate = [h["rate_hz"] for h in health if "rate_hz" in h]
        if latency and base.get("latency_ms"):
            ratio = (sum(latency) / len(latency)) / base["latency_ms"]
            if ratio > t.max_latency_ratio:
                return "regressed", (f"{rover}: latency {sum(latency) / len(latency):.1f} ms is {ratio:.2f}x its "
                                     f"{base['latency_ms']:.1f} ms before (allowed {t.max_latency_ratio}x)")
        if rate and base.get("rate_hz"):
            ratio = (sum(rate) / len(rate)) / base["rate_hz"]
            if ratio < t.min_rate_ratio:
                return "regressed", (f"{rover}: rate {sum(rate) / len(rate):.2f} Hz is {ratio:.2f}x its "
                                     f"{base['rate_hz']:.2f} Hz before (allowed {t.min_rate_ratio}x)")
        soaked = health[-1]["ts"] - joined
        if soaked < t.soak_s:
            return "waiting", f"{rover}: healthy for {soaked:.0f}/{t.soak_s:.0f} s"
        return "healthy", f"{rover}: healthy ({len(health)} reports over {soaked:.0f} s)"

    def evaluate(self) -> list[dict[str, Any]]:
        """Advance the stages whose rovers are all healthy, roll back rollouts with a regressed rover; the changes."""
        events = []
        with self._connect() as conn:
            for row in conn.execute("SELECT * FROM rollouts WHERE state = 'active' ORDER BY id").fetchall():
                t = Thresholds(**json.loads(row["thresholds"]))
                members = self._cohort(conn, row)
                states = {r: self._member_state(conn, row, r, joined, t) for r, (_, joined) in members.items()}
                regressed = [why for state, why in states.values() if state == "regressed"]
                now = float(self.clock())
                stages = json.loads(row["stages"])
                if regressed:
                    reason = "automatic rollback: " + "; ".join(regressed)
                    self._end(conn, int(row["id"]), row["release"], "rolled_back", reason, "coordinator")
                    events.append({"rollout": int(row["id"]), "release": row["release"], "event": "rolled_back",
                                   "reason": reason})
                elif members and all(state == "healthy" for state, _ in states.values()):
                    stage = int(row["stage"])
                    if stage + 1 >= len(stages):
                        self._end(conn, int(row["id"]), row["release"], "done",
                                  f"every stage healthy ({len(members)} rovers)", "coordinator")
                        events.append({"rollout": int(row["id"]), "release": row["release"], "event": "done"})
                    else:
                        conn.execute("UPDATE rollouts SET stage = ?, stage_started = ? WHERE id = ?",
                                     (stage + 1, now, int(row["id"])))
                        self._audit(conn, "coordinator", "advance", row["release"], int(row["id"]),
                                    {"stage": stage + 1, "percent": stages[stage + 1],
                                     "healthy": sorted(members)})
                        events.append({"rollout": int(row["id"]), "release": row["release"], "event": "advance",
                                       "stage": stage + 1})
                elif t.stage_timeout_s and now - float(row["stage_started"]) > t.stage_timeout_s:
                    waiting = "; ".join(why for state, why in states.values() if state != "healthy") or "no rover"
                    reason = f"automatic rollback: stage {int(row['stage']) + 1} not healthy after " \
                             f"{t.stage_timeout_s:g} s ({waiting})"
                    self._end(conn, int(row["id"]), row["release"], "rolled_back", reason, "coordinator")
                    events.append({"rollout": int(row["id"]), "release": row["release"], "event": "rolled_back",
                                   "reason": reason})
        return events

    # ------------------------------------------------------------------------------------------ status, audit
    @staticmethod
    def _audit(conn: sqlite3.Connection, actor: str, action: str, release: str, rollout: int | None,
               detail: dict[str, Any]) -> None:
        conn.execute("INSERT INTO audit (ts, actor, action, release, rollout, detail) VALUES (?, ?, ?, ?, ?, ?)",
                     (time.time(), actor, action, release, rollout, json.dumps(detail, default=str)))

    def audit(self, limit: int = 0) -> list[dict[str, Any]]:
        """The audit log, oldest first (the last ``limit`` entries when ``limit`` > 0)."""
        with self._connect() as conn:
            rows = conn.execute("SELECT * FROM audit ORDER BY id").fetchall()
        entries = [dict(r) | {"detail": json.loads(r["detail"])} for r in rows]
        return entries[-limit:] if limit > 0 else entries

    def status(self) -> dict[str, Any]:
        """Releases, rollouts (stage, each rover's state) and rovers (what each runs, its last health)."""
        with self._connect() as conn:
            rollouts = []
            for row in conn.execute("SELECT * FROM rollouts ORDER BY id").fetchall():
                t = Thresholds(**json.loads(row["thresholds"]))
                members = self._cohort(conn, row)
                rollouts.append({
                    "id": int(row["id"]), "release": row["release"], "state": row["state"],
                    "selector": Selector(**json.loads(row["selector"])).describe(),
                    "stages": json.loads(row["stages"]), "stage": int(row["stage"]), "created": row["created"],
                    "ended": row["ended"], "reason": row["reason"],
                    "rovers": {r: self._member_state(conn, row, r, joined, t)[1] for r, (_, joined) in
                               sorted(members.items())},
                })
            rovers = []
            for row in conn.execute("SELECT * FROM rovers ORDER BY id").fetchall():
                last = conn.execute("SELECT ts, release, metrics FROM reports WHERE rover = ? AND kind = 'health' "
                                    "ORDER BY ts DESC LIMIT 1", (row["id"],)).fetchone()
                rovers.append({"id": row["id"], "groups": json.loads(row["groups"]), "hardware": row["hardware"],
                               "running": row["running"], "last_seen": row["last_seen"],
                               "health": json.loads(last["metrics"]) if last else {}})
        return {"releases": self.releases(), "rollouts": rollouts, "rovers": rovers}
