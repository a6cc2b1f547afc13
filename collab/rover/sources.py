"""Where the rover's global models come from: its drop folder, or a coordinator's SQLite store."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from forest_perception.collab.rover.models import (
    DROP_PATTERN,
    GlobalModel,
    global_model_name,
    list_global_models,
    read_candidate,
)


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class CandidateRef:
    """The newest model a source offers: a stable ``key`` (content hash), its round and a label for files."""

    key: str
    round: int | None
    label: str
    location: str
    assigned: bool = False  # the coordinator says this rover should run it (a release), not merely "newest"


class SourceUnavailableError(RuntimeError):
    """A candidate that cannot be read now but may be later (disk full, network): tried again, never decided."""


class ModelSource(Protocol):
    """Where the rover's global models come from."""

    def latest(self) -> CandidateRef | None:
        """The newest model on offer, or None."""
        ...

    def load(self, ref: CandidateRef) -> GlobalModel:
        """Read it (``ValueError`` naming what is wrong)."""
        ...


class DropDirSource:
    """Global models dropped into a folder by the rover's ClientApp (``global-r<round>.npz`` / ``.pt``), or exported
    models (``global-r<round>.onnx``: a dc-ccl cloud model for a base station)."""

    def __init__(self, drop_dir: str | os.PathLike) -> None:
        self.path = Path(drop_dir)
        self._digests: dict[tuple[str, int, int], str] = {}

    def latest(self) -> CandidateRef | None:
        """The drop with the highest round (keyed by content, so a rewritten file counts as new)."""
        files = list_global_models(self.path)
        if not files:
            return None
        path = files[-1]
        try:
            stat = path.stat()
            stamp = (path.name, stat.st_mtime_ns, stat.st_size)
            digest = self._digests.get(stamp) or _file_digest(path)
        except OSError:  # replaced or pruned between listing and reading: next poll
            return None
        self._digests = {stamp: digest}
        match = DROP_PATTERN.match(path.name)
        server_round = int(match.group(1)) if match else None
        return CandidateRef(f"drop:{digest}", server_round, path.stem, str(path))

    def load(self, ref: CandidateRef) -> GlobalModel:
        """Read the dropped file."""
        return read_candidate(ref.location)


class StoreSource:
    """The last completed round's model in a coordinator's SQLite store (read-only)."""

    def __init__(self, db_path: str | os.PathLike) -> None:
        self.path = Path(db_path)

    def _open(self) -> Any:  # noqa: ANN401 - CoordinatorStore
        from forest_perception.collab.flower.store import CoordinatorStore

        return CoordinatorStore(self.path, readonly=True)

    def latest(self) -> CandidateRef | None:
        """The last completed round (None while the store does not exist or is empty)."""
        if not self.path.is_file():
            return None
        try:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5.0)
            try:
                row = conn.execute("SELECT round, sha256 FROM models ORDER BY round DESC LIMIT 1").fetchone()
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise ValueError(f"coordinator store {str(self.path)!r} is not readable: {exc}") from None
        if row is None:
            return None
        last = int(row[0])
        digest = row[1] or f"round{last}"
        return CandidateRef(f"store:{digest}", last, global_model_name(last).rsplit(".", 1)[0], str(self.path))

    def load(self, ref: CandidateRef) -> GlobalModel:
        """The model of ``ref.round`` with the run's architecture from the store's identity."""
        try:
            with self._open() as store:
                names, arrays = store.model(ref.round)
                identity = store.identity
        except (sqlite3.Error, LookupError, ValueError) as exc:
            raise ValueError(f"coordinator store {str(self.path)!r}, round {ref.round}: {exc}") from None
        meta = {k: identity[k] for k in ("model", "model-kwargs", "base-channels") if k in identity}
        if isinstance(identity.get("input"), str) and "x" in identity["input"]:  # "WIDTHxHEIGHT"
            width, height = identity["input"].split("x", 1)
            meta.update({"input-width": int(width), "input-height": int(height)})
        return GlobalModel(ref.round, names, [np.asarray(a) for a in arrays], meta, str(self.path))


def open_model_source(location: str | os.PathLike) -> ModelSource:
    """A coordinator store for a ``.db``/``.sqlite`` file, else a drop directory (created on first drop)."""
    path = Path(location)
    if path.suffix in (".db", ".sqlite", ".sqlite3"):
        return StoreSource(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"model source {str(path)!r} is a file but not a .db/.sqlite coordinator store")
    return DropDirSource(path)
