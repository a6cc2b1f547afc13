"""What a rover does between federated rounds: watch its recordings, validate global models, train locally.

Pure core of ``forest_perception.nodes.collab_node`` (no rclpy):

- **global model drop** (:func:`write_global_model`, :func:`read_candidate`, :class:`DropDirSource`): the rover's
  Flower ClientApp runs inside its SuperNode, not in the ROS graph; on every global model it receives it writes
  ``<drop dir>/global-r<round>.npz`` (named arrays + JSON meta, written to a hidden temporary name and moved into
  place, so a reader never sees half a file). A training checkpoint ``global-r<round>.pt`` is accepted too.
  :class:`StoreSource` reads a coordinator's SQLite file instead (a rover next to the coordinator, tests).
- **dataset watch** (:class:`DatasetWatcher`): new, grown and removed segments of the forest dataset layout the
  rover records into, with frame counts; only segments whose ``metadata.csv`` changed are parsed again.
- **hold-out split** (:func:`holdout_split`): by segment, never by frame (neighbouring frames are near-duplicates),
  from a hash of ``(seed, segment id)``, so a segment stays on its side as new segments arrive.
- **validation gate** (:class:`ValidationGate`): export the candidate to ONNX (+ model card) in a hidden staging
  folder of the models dir, evaluate it and the running model on the held-out frames with the runtime engine (ONNX
  Runtime), accept it only if it is not worse than the running model by more than a tolerance (AbsRel up,
  delta1 down), then move its files into the models dir (card first, ``.onnx`` last, ``os.replace``); a refused
  candidate goes to ``refused/`` with the decision, and the reason is returned.
- **local training** (:func:`train_locally`): :func:`collab.flower.task.local_round` on the rover's training
  segments, validated on the held-out ones; the trained model can go through the same gate.
- **idleness** (:class:`IdleDetector`): the rover trains only when odometry says it has stood still long enough.
- **ledger** (:class:`DeploymentLedger`): which candidates were decided, the deployed model and its arrays, in
  ``<models dir>/collab_ledger.json`` and ``current.npz``, so a restarted node neither re-gates nor forgets.

Torch, ONNX and ONNX Runtime are imported only by the functions that need them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import sqlite3
import time
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from forest_perception.dataset_tools.layout import METADATA_FILE, Segment, load_depth, load_rgb, read_segment

if TYPE_CHECKING:  # heavy imports only for type checkers
    from forest_perception.collab.flower.task import LocalData, TaskConfig

DROP_FORMAT = "forest-global-model/1"
DROP_PATTERN = re.compile(r"^global-r(\d+)\.(npz|pt)$")
LEDGER_FILE = "collab_ledger.json"
CURRENT_ARRAYS_FILE = "current.npz"
REFUSED_DIR = "refused"
EXPORTERS = ("dynamo", "torchscript")
TASK_META_KEYS = ("model", "base-channels", "input-height", "input-width", "min-depth", "max-depth")
"""Run-config keys a dropped model carries so the rover can rebuild its network."""

_RUN_RE = re.compile(r"^Run-(\d+)$")
_SEGMENT_RE = re.compile(r"^[a-z]+$")


# ---------------------------------------------------------------------------------------------- atomic files


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a hidden temporary name beside ``path``, fsync, then move it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _json_clean(value: Any) -> Any:  # noqa: ANN401 - any JSON-able value
    """NaN/Inf (not JSON) become None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_clean(v) for v in value]
    if isinstance(value, np.generic):
        return _json_clean(value.item())
    return value


# ---------------------------------------------------------------------------------------------- global models


@dataclass
class GlobalModel:
    """A depth model as named arrays (``state_dict`` float entries in order) with what rebuilds its network."""

    round: int | None
    names: list[str]
    arrays: list[np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)  # TASK_META_KEYS and free-form facts (source, ...)
    source: str = ""  # file or store it came from

    def task_config(self, base: TaskConfig) -> TaskConfig:
        """``base`` (the rover's training settings) with this model's architecture and depth range."""
        return task_from_meta(self.meta, base)


def task_meta(config: TaskConfig) -> dict[str, Any]:
    """The architecture part of a task config in run-config spelling (what a dropped model carries)."""
    return {
        "model": config.model,
        "base-channels": int(config.base_channels),
        "input-height": int(config.input_hw[0]),
        "input-width": int(config.input_hw[1]),
        "min-depth": float(config.min_depth),
        "max-depth": float(config.max_depth),
    }


def task_from_meta(meta: Mapping[str, Any], base: TaskConfig) -> TaskConfig:
    """``base`` overridden by the architecture keys present in ``meta``; ``ValueError`` naming a bad value."""
    from dataclasses import replace

    height = meta.get("input-height", base.input_hw[0])
    width = meta.get("input-width", base.input_hw[1])
    try:
        config = replace(
            base,
            model=str(meta.get("model", base.model)),
            base_channels=int(meta.get("base-channels", base.base_channels)),
            input_hw=(int(height), int(width)),
            min_depth=float(meta.get("min-depth", base.min_depth)),
            max_depth=float(meta.get("max-depth", base.max_depth)),
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"model meta {dict((k, meta.get(k)) for k in TASK_META_KEYS)} is not usable: {exc}") from None
    return config.validate()


def global_model_name(server_round: int, suffix: str = "npz") -> str:
    """File name of the global model after ``server_round`` in a drop directory."""
    return f"global-r{int(server_round):06d}.{suffix}"


def write_global_model_file(path: str | os.PathLike, model: GlobalModel) -> Path:
    """Write ``model`` to exactly ``path`` (``.npz``, the drop format), atomically."""
    import io

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": DROP_FORMAT, "round": model.round, "names": list(model.names),
              "meta": _json_clean(dict(model.meta)), "written": time.time()}
    buffer = io.BytesIO()
    np.savez(buffer, header=np.array(json.dumps(header)),
             **{f"t{i:05d}": np.ascontiguousarray(a) for i, a in enumerate(model.arrays)})
    _write_bytes_atomic(path, buffer.getvalue())
    return path


def write_global_model(
    drop_dir: str | os.PathLike,
    server_round: int,
    names: Sequence[str],
    arrays: Sequence[np.ndarray],
    meta: Mapping[str, Any] | None = None,
    keep: int = 5,
) -> Path:
    """Write ``global-r<round>.npz`` into ``drop_dir`` atomically; keep the newest ``keep`` drops (0: all)."""
    if isinstance(server_round, bool) or not isinstance(server_round, (int, np.integer)) or server_round < 0:
        raise ValueError(f"server_round must be a non-negative integer, got {server_round!r}")
    names = [str(n) for n in names]
    if len(names) != len(arrays):
        raise ValueError(f"global model of round {server_round}: {len(names)} names for {len(arrays)} arrays")
    if len(set(names)) != len(names):
        raise ValueError(f"global model of round {server_round}: tensor names repeat")
    drop = Path(drop_dir)
    path = write_global_model_file(
        drop / global_model_name(server_round), GlobalModel(int(server_round), names, list(arrays), dict(meta or {}))
    )
    if keep > 0:
        for old in list_global_models(drop)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def list_global_models(drop_dir: str | os.PathLike) -> list[Path]:
    """``global-r<round>.npz|pt`` files in ``drop_dir``, oldest round first (hidden/temporary files ignored)."""
    drop = Path(drop_dir)
    if not drop.is_dir():
        return []
    found = []
    for path in drop.iterdir():
        match = DROP_PATTERN.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path.suffix == ".npz", path))
    return [p for _, _, p in sorted(found)]


class _BadDropError(ValueError):
    """A drop file whose content is wrong (message complete, naming the file)."""


def _read_npz(path: Path) -> GlobalModel:
    where = f"global model {str(path)!r}"
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not hasattr(archive, "files"):
                raise _BadDropError(f"{where} is a single array, not an archive written by write_global_model")
            if "header" not in archive.files:
                raise _BadDropError(f"{where} has no header entry; expected a file written by write_global_model")
            header = json.loads(str(archive["header"]))
            if not isinstance(header, dict) or header.get("format") != DROP_FORMAT:
                raise _BadDropError(f"{where}: format {header.get('format') if isinstance(header, dict) else header!r},"
                               f" expected {DROP_FORMAT!r}")
            names = header.get("names")
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise _BadDropError(f"{where}: header names must be a list of tensor names")
            keys = [f"t{i:05d}" for i in range(len(names))]
            missing = [k for k in keys if k not in archive.files]
            if missing:
                raise _BadDropError(f"{where}: {len(names)} names but tensors {missing[:3]} are missing")
            arrays = [archive[k] for k in keys]
    except _BadDropError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError, zlib.error) as exc:
        # numpy says ValueError ("pickled data") for a file that is no archive at all
        raise ValueError(f"{where} is not readable: {type(exc).__name__}: {str(exc)[:200]}") from None
    for name, array in zip(names, arrays):
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"{where}: tensor {name!r} has dtype {array.dtype}, expected floating point")
    server_round = header.get("round")
    if server_round is not None and (not isinstance(server_round, int) or server_round < 0):
        raise ValueError(f"{where}: round must be a non-negative integer, got {server_round!r}")
    meta = header.get("meta") or {}
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: meta must be a JSON object, got {type(meta).__name__}")
    return GlobalModel(server_round, list(names), arrays, meta, str(path))


def _read_checkpoint(path: Path, server_round: int | None) -> GlobalModel:
    from forest_perception.collab.flower.task import get_arrays
    from forest_perception.models.torch_engine import load_torch_checkpoint

    try:
        model, meta = load_torch_checkpoint(path)
    except ValueError as exc:  # ModelLoadError names the path
        raise ValueError(str(exc)) from None
    names, arrays = get_arrays(model)
    kwargs = dict(meta.get("model_kwargs") or {})
    height, width = (int(v) for v in meta["input_hw"])
    task = {"model": str(meta["model_name"]), "input-height": height, "input-width": width}
    if "base_channels" in kwargs:
        task["base-channels"] = int(kwargs["base_channels"])
    for key, meta_key in (("min-depth", "min_depth"), ("max-depth", "max_depth")):
        if meta.get(meta_key) is not None:
            task[key] = float(meta[meta_key])
    return GlobalModel(server_round, names, arrays, {**task, "checkpoint": str(path)}, str(path))


def read_candidate(path: str | os.PathLike) -> GlobalModel:
    """A dropped global model (``.npz`` of :func:`write_global_model` or a training checkpoint ``.pt``).

    Raises ``ValueError`` naming the file and what is wrong with it.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"global model {str(path)!r} does not exist")
    match = DROP_PATTERN.match(path.name)
    file_round = int(match.group(1)) if match else None
    if path.suffix == ".npz":
        model = _read_npz(path)
        if file_round is not None and model.round is not None and model.round != file_round:
            raise ValueError(f"global model {str(path)!r}: file name says round {file_round}, header {model.round}")
        model.round = model.round if model.round is not None else file_round
        return model
    if path.suffix in (".pt", ".pth"):
        return _read_checkpoint(path, file_round)
    raise ValueError(f"global model {str(path)!r}: unknown suffix {path.suffix!r}; expected .npz or .pt")


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


class ModelSource(Protocol):
    """Where the rover's global models come from."""

    def latest(self) -> CandidateRef | None:
        """The newest model on offer, or None."""
        ...

    def load(self, ref: CandidateRef) -> GlobalModel:
        """Read it (``ValueError`` naming what is wrong)."""
        ...


class DropDirSource:
    """Global models dropped into a folder by the rover's ClientApp (``global-r<round>.npz`` / ``.pt``)."""

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
        meta = {k: identity[k] for k in ("model", "base-channels") if k in identity}
        return GlobalModel(ref.round, names, [np.asarray(a) for a in arrays], meta, str(self.path))


def open_model_source(location: str | os.PathLike) -> ModelSource:
    """A coordinator store for a ``.db``/``.sqlite`` file, else a drop directory (created on first drop)."""
    path = Path(location)
    if path.suffix in (".db", ".sqlite", ".sqlite3"):
        return StoreSource(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"model source {str(path)!r} is a file but not a .db/.sqlite coordinator store")
    return DropDirSource(path)


# ---------------------------------------------------------------------------------------------- dataset watch


@dataclass(frozen=True)
class SegmentState:
    """One recorded segment as last scanned."""

    segment_id: str  # '1a' = Run-1/a, as in the dataset README
    path: Path
    frames: int
    stamp: tuple[int, int]  # metadata.csv (mtime_ns, size)
    segment: Segment = field(compare=False, repr=False)  # parsed metadata.csv (frame records, file paths)


@dataclass
class DatasetScan:
    """The dataset at one scan and what changed since the previous one."""

    segments: list[SegmentState]
    new: list[str] = field(default_factory=list)
    grown: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # segment path -> why it was skipped
    new_frames: int = 0

    @property
    def frames(self) -> int:
        """Frames in all readable segments."""
        return sum(s.frames for s in self.segments)

    def segment(self, segment_id: str) -> Segment:
        """The parsed segment with this id (``KeyError`` naming it when it is not in this scan)."""
        for state in self.segments:
            if state.segment_id == segment_id:
                return state.segment
        raise KeyError(f"segment {segment_id!r} is not in the scan ({[s.segment_id for s in self.segments]})")

    @property
    def changed(self) -> bool:
        """Whether any segment appeared, grew, shrank or went away."""
        return bool(self.new or self.grown or self.removed)


class DatasetWatcher:
    """Scans ``Run-<N>/<segment>/metadata.csv`` under a root; re-reads only the CSVs that changed."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self._known: dict[str, SegmentState] = {}

    def _segment_dirs(self) -> Iterator[Path]:
        if not self.root.is_dir():
            return
        runs = sorted((int(m.group(1)), p) for p in self.root.iterdir() if (m := _RUN_RE.match(p.name)) and p.is_dir())
        for _, run_dir in runs:
            for seg in sorted(run_dir.iterdir(), key=lambda p: (len(p.name), p.name)):
                if seg.is_dir() and _SEGMENT_RE.match(seg.name) and (seg / METADATA_FILE).is_file():
                    yield seg

    def scan(self) -> DatasetScan:
        """Current segments with frame counts; new/grown/removed relative to the previous scan."""
        states: dict[str, SegmentState] = {}
        scan = DatasetScan([])
        for seg_dir in self._segment_dirs():
            segment_id = f"{seg_dir.parent.name[4:]}{seg_dir.name}"
            try:
                stat = (seg_dir / METADATA_FILE).stat()
                stamp = (stat.st_mtime_ns, stat.st_size)
                known = self._known.get(segment_id)
                if known is not None and known.stamp == stamp and known.path == seg_dir:
                    states[segment_id] = known
                    continue
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # a torn last row while the recorder writes it
                    segment = read_segment(seg_dir, check_files=False)
            except (OSError, ValueError) as exc:
                scan.errors[str(seg_dir)] = f"{type(exc).__name__}: {exc}"
                continue
            states[segment_id] = SegmentState(segment_id, seg_dir, len(segment), stamp, segment)
        for segment_id, state in states.items():
            before = self._known.get(segment_id)
            if before is None:
                scan.new.append(segment_id)
                scan.new_frames += state.frames
            elif state.frames != before.frames:
                scan.grown.append(segment_id)
                scan.new_frames += max(0, state.frames - before.frames)
        scan.removed = sorted(set(self._known) - set(states))
        self._known = states
        scan.segments = list(states.values())
        return scan

    def segment(self, segment_id: str) -> Segment:
        """The parsed segment of the last scan (``KeyError`` if it was not there)."""
        return self._known[segment_id].segment


# ---------------------------------------------------------------------------------------------- hold-out


def _holdout_score(segment_id: str, seed: int) -> float:
    digest = hashlib.sha256(f"{int(seed)}:{segment_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def holdout_split(segment_ids: Sequence[str], fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """``(train, holdout)`` segment ids: a segment is held out when its hash score is below ``fraction``.

    The score depends only on ``(seed, segment id)``, so adding segments never moves an existing one
    (except in the small-number fallbacks: with two or more segments and ``fraction > 0`` at least one is
    held out and at least one kept for training). Fewer than two segments: nothing is held out.
    """
    if not (isinstance(fraction, (int, float)) and math.isfinite(fraction) and 0.0 <= fraction < 1.0):
        raise ValueError(f"holdout fraction must be within [0, 1), got {fraction!r}")
    ids = sorted(set(segment_ids))
    if fraction == 0.0 or len(ids) < 2:
        return ids, []
    scores = {s: _holdout_score(s, seed) for s in ids}
    holdout = {s for s in ids if scores[s] < fraction}
    if not holdout:
        holdout = {min(ids, key=scores.__getitem__)}
    if len(holdout) == len(ids):
        holdout.discard(max(ids, key=scores.__getitem__))
    return [s for s in ids if s not in holdout], [s for s in ids if s in holdout]


@dataclass
class HoldoutSet:
    """Held-out frames as (segment, frame index) references, loaded from disk one at a time."""

    segments: list[Segment]
    frames: list[tuple[int, int]]  # (index into segments, frame index)

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def segment_ids(self) -> list[str]:
        """Ids of the held-out segments."""
        return [s.segment_id for s in self.segments]

    @property
    def signature(self) -> str:
        """Changes whenever the held-out frames do."""
        text = ";".join(f"{self.segments[s].path}/{self.segments[s].frames[i].stem}" for s, i in self.frames)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(rgb8 HxWx3, depth HxW metres NaN invalid) per held-out frame."""
        for s, i in self.frames:
            segment = self.segments[s]
            rgb, depth = load_rgb(segment.rgb_path(i)), load_depth(segment.depth_path(i))
            if depth.shape != rgb.shape[:2]:
                raise ValueError(f"frame {segment.frames[i].stem!r} of {segment.path}: depth {depth.shape} "
                                 f"and RGB {rgb.shape[:2]} differ in size")
            yield rgb, depth


def make_holdout(segments: Sequence[Segment], max_frames: int = 200) -> HoldoutSet:
    """The frames of ``segments``, at most ``max_frames`` of them evenly spread over all (deterministic)."""
    if max_frames < 1:
        raise ValueError(f"max_frames must be at least 1, got {max_frames}")
    segments = [s for s in segments if len(s) > 0]
    refs = [(si, fi) for si, s in enumerate(segments) for fi in range(len(s))]
    if len(refs) > max_frames:
        picks = np.unique(np.round(np.linspace(0, len(refs) - 1, max_frames)).astype(int))
        refs = [refs[i] for i in picks]
    return HoldoutSet(list(segments), refs)


# ---------------------------------------------------------------------------------------------- evaluation


def evaluate_engines(
    engines: Mapping[str, Any], holdout: HoldoutSet, min_depth: float, max_depth: float
) -> dict[str, dict[str, float]]:
    """AbsRel, delta1, RMSE (pixels pooled) of each depth engine on the held-out frames, in one pass over them.

    Engines predict at the frame's resolution (as depth_node runs them); NaN predictions count as
    ``max_depth`` (``forest_perception.models.metrics``), ground truth outside ``(min_depth, max_depth]`` is ignored.
    """
    from forest_perception.models.metrics import MetricAccumulator

    accumulators = {name: MetricAccumulator(min_depth, max_depth) for name in engines}
    frames = 0
    for rgb, depth in holdout:
        frames += 1
        for name, engine in engines.items():
            accumulators[name].update(np.asarray(engine.predict(rgb), np.float32), depth)
    out = {}
    for name, accumulator in accumulators.items():
        result = accumulator.result()
        out[name] = {"absrel": result["absrel"], "delta1": result["delta1"], "rmse": result["rmse"],
                     "frames": float(frames), "pixels": float(accumulator.count)}
    return out


# ---------------------------------------------------------------------------------------------- export


def build_network(model: GlobalModel, base: TaskConfig) -> tuple[Any, dict[str, Any], TaskConfig]:
    """``(torch module with the model's arrays, checkpoint-style meta, task config)``; ``ValueError`` if unusable."""
    from forest_perception.collab.flower.task import build_model, set_arrays

    config = model.task_config(base)
    network = build_model(config)
    set_arrays(network, model.names, model.arrays)  # refuses missing/unknown/mis-shaped/non-finite tensors
    network.eval()
    kwargs = {"base_channels": config.base_channels} if config.model == "autoencoder" else {}
    meta = {
        "model_name": config.model,
        "model_kwargs": kwargs,
        "input_hw": list(config.input_hw),
        "min_depth": config.min_depth,
        "max_depth": config.max_depth,
        "command": str(model.meta.get("command") or f"federated global model, round {model.round}"),
        "metrics": {},
    }
    return network, meta, config


def export_candidate(
    model: GlobalModel, out_path: str | os.PathLike, base: TaskConfig, exporter: str = "dynamo"
) -> tuple[Path, TaskConfig]:
    """Export ``model`` to ONNX (checked against PyTorch by :func:`forest_perception.models.export.export_onnx`)."""
    from forest_perception.models.export import export_onnx

    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {list(EXPORTERS)}, got {exporter!r}")
    network, meta, config = build_network(model, base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation and tracer warnings
        path = export_onnx((network, meta), out_path, input_hw=config.input_hw, exporter=exporter,
                           export_command=f"forest_perception.collab.rover.export_candidate ({exporter})")
    return path, config


# ---------------------------------------------------------------------------------------------- gate


@dataclass
class GateConfig:
    """How strict the gate is."""

    tolerance_absrel: float = 0.0  # accept an AbsRel at most this much above the running model's
    tolerance_delta1: float = 0.01  # and a delta1 at most this much below it
    max_absrel: float = 1.0  # refuse above this AbsRel even with nothing to compare against
    min_holdout_frames: int = 1
    exporter: str = "dynamo"
    threads: int = 1  # ONNX Runtime intra-op threads while evaluating
    keep_refused: int = 3  # refused candidates kept in <models dir>/refused for inspection

    def validate(self) -> GateConfig:
        """Raise ``ValueError`` naming the first bad field."""
        for name in ("tolerance_absrel", "tolerance_delta1", "max_absrel"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0 and not math.isnan(value)):
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        for name in ("min_holdout_frames", "threads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.keep_refused, int) or self.keep_refused < 0:
            raise ValueError(f"keep_refused must be a non-negative integer, got {self.keep_refused!r}")
        if self.exporter not in EXPORTERS:
            raise ValueError(f"exporter must be one of {list(EXPORTERS)}, got {self.exporter!r}")
        return self


GATE_CODES = ("accepted", "first_model", "worse", "too_inaccurate", "no_holdout", "unreadable", "export_failed",
              "running_model_failed")
"""``GateDecision.code`` values: the first two accept, the rest refuse."""


@dataclass
class GateDecision:
    """The gate's verdict on one candidate."""

    accepted: bool
    code: str
    reason: str
    label: str
    round: int | None = None
    model_path: str = ""  # the published .onnx (accepted) or its copy under refused/ ("" if none)
    model_version: str = ""
    candidate_metrics: dict[str, float] = field(default_factory=dict)
    running_metrics: dict[str, float] = field(default_factory=dict)
    running_model: str = ""
    holdout_frames: int = 0
    seconds: float = 0.0
    decided_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN as null)."""
        return _json_clean(asdict(self))


def _fmt(value: float) -> str:
    return "nan" if not math.isfinite(value) else f"{value:.4f}"


def compare_metrics(
    candidate: Mapping[str, float], running: Mapping[str, float] | None, config: GateConfig
) -> tuple[bool, str, str]:
    """``(accepted, code, reason)`` from the held-out metrics of the candidate and the running model."""
    absrel, delta1 = float(candidate.get("absrel", math.nan)), float(candidate.get("delta1", math.nan))
    if not (math.isfinite(absrel) and math.isfinite(delta1)):
        return False, "no_holdout", "candidate metrics are not finite (no valid ground-truth pixel held out)"
    if absrel > config.max_absrel:
        return False, "too_inaccurate", f"candidate absrel {_fmt(absrel)} above the limit {config.max_absrel}"
    if running is None:
        return True, "first_model", f"no running model to compare with; candidate absrel {_fmt(absrel)}"
    run_absrel, run_delta1 = float(running.get("absrel", math.nan)), float(running.get("delta1", math.nan))
    worse = []
    if math.isfinite(run_absrel) and absrel > run_absrel + config.tolerance_absrel:
        worse.append(f"absrel {_fmt(absrel)} > running {_fmt(run_absrel)} + tolerance {config.tolerance_absrel}")
    if math.isfinite(run_delta1) and delta1 < run_delta1 - config.tolerance_delta1:
        worse.append(f"delta1 {_fmt(delta1)} < running {_fmt(run_delta1)} - tolerance {config.tolerance_delta1}")
    if worse:
        return False, "worse", "; ".join(worse)
    return True, "accepted", (f"absrel {_fmt(absrel)} (running {_fmt(run_absrel)}), "
                              f"delta1 {_fmt(delta1)} (running {_fmt(run_delta1)})")


class ValidationGate:
    """Exports candidates into a models dir and lets only those through that do not make depth worse."""

    def __init__(self, models_dir: str | os.PathLike, config: GateConfig | None = None) -> None:
        self.models_dir = Path(models_dir)
        self.config = (config or GateConfig()).validate()

    def _refused(self, label: str, server_round: int | None, code: str, reason: str, started: float,
                 **extra: Any) -> GateDecision:
        return GateDecision(False, code, reason, label, server_round, seconds=time.perf_counter() - started, **extra)

    def check(
        self,
        candidate: GlobalModel | str | os.PathLike,
        running_model: str | os.PathLike | None,
        holdout: HoldoutSet,
        base: TaskConfig,
        label: str | None = None,
    ) -> GateDecision:
        """Gate one candidate (named arrays or a dropped file) against the model the depth node runs now.

        Never raises for a bad candidate: an unreadable file, an export that does not match PyTorch or a
        model that is worse on the held-out frames gives a refused decision with the reason.
        """
        started = time.perf_counter()
        if not isinstance(candidate, GlobalModel):
            label = label or Path(candidate).stem
            try:
                candidate = read_candidate(candidate)
            except ValueError as exc:
                return self._refused(label, None, "unreadable", str(exc), started)
        label = _safe_label(label or (f"global-r{candidate.round:06d}" if candidate.round is not None else "model"))
        server_round = candidate.round
        if len(holdout) < self.config.min_holdout_frames:
            return self._refused(label, server_round, "no_holdout",
                                 f"{len(holdout)} held-out frames, need {self.config.min_holdout_frames}: the rover "
                                 "needs at least two recorded segments (one is held out)", started)
        self.models_dir.mkdir(parents=True, exist_ok=True)
        staging = self.models_dir / f".staging-{label}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            return self._check_staged(candidate, running_model, holdout, base, label, staging, started)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _check_staged(self, candidate: GlobalModel, running_model: str | os.PathLike | None, holdout: HoldoutSet,
                      base: TaskConfig, label: str, staging: Path, started: float) -> GateDecision:
        from forest_perception.models.torch_engine import load_engine

        server_round = candidate.round
        try:
            onnx_path, config = export_candidate(candidate, staging / f"{label}.onnx", base, self.config.exporter)
        except ValueError as exc:  # wrong tensors for the network, non-finite values, bad meta
            return self._refused(label, server_round, "unreadable", f"{candidate.source or label}: {exc}", started)
        except Exception as exc:  # noqa: BLE001 - exporter failures of any kind refuse the candidate
            return self._refused(label, server_round, "export_failed",
                                 f"ONNX export failed: {type(exc).__name__}: {str(exc)[:300]}", started)
        engines: dict[str, Any] = {}
        try:
            engines["candidate"] = load_engine(onnx_path, backend="onnxruntime", threads=self.config.threads)
        except Exception as exc:  # noqa: BLE001 - an export ONNX Runtime cannot open is refused
            return self._refused(label, server_round, "export_failed", f"exported model does not load: {exc}", started)
        version = engines["candidate"].model_version
        running_path = str(running_model or "")
        running_note = ""
        if running_path:
            try:
                engines["running"] = load_engine(running_path, threads=self.config.threads)
            except Exception as exc:  # noqa: BLE001 - compare against nothing, say so
                running_note = f"running model {running_path!r} not evaluated ({exc}); "
        try:
            metrics = evaluate_engines(engines, holdout, config.min_depth, config.max_depth)
        except (OSError, ValueError) as exc:
            return self._refused(label, server_round, "no_holdout", f"held-out frames not readable: {exc}", started)
        running_metrics = metrics.get("running")
        accepted, code, reason = compare_metrics(metrics["candidate"], running_metrics, self.config)
        if running_note and code == "first_model":
            reason = running_note + reason
        decision = GateDecision(
            accepted, code, f"{reason} on {len(holdout)} held-out frames", label, server_round,
            model_version=version, candidate_metrics=metrics["candidate"], running_metrics=running_metrics or {},
            running_model=running_path, holdout_frames=len(holdout),
        )
        card = {
            "metrics": {k: v for k, v in metrics["candidate"].items() if k in ("absrel", "delta1", "rmse")},
            "notes": f"Validation gate on the rover's held-out segments {holdout.segment_ids}: "
                     f"{'accepted' if accepted else 'refused'} ({code}): {decision.reason}.",
            "gate": {"code": code, "running_model": running_path, "running_metrics": running_metrics or {},
                     "round": server_round, "source": candidate.source},
            "train_command": str(candidate.meta.get("command") or f"federated learning, global round {server_round}"),
        }
        decision.model_path = str(self._publish(onnx_path, label, version, accepted, card, decision))
        decision.seconds = time.perf_counter() - started
        return decision

    def _publish(self, onnx_path: Path, label: str, version: str, accepted: bool, card: dict,
                 decision: GateDecision) -> Path:
        from forest_perception.models.export import write_model_card

        write_model_card(onnx_path, _json_clean(card))
        suffix = version.rsplit("-", 1)[-1] if "-" in version else hashlib.sha256(version.encode()).hexdigest()[:12]
        dest_dir = self.models_dir if accepted else self.models_dir / REFUSED_DIR
        dest_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{label}-{suffix}"
        final = dest_dir / f"{stem}.onnx"
        if not accepted:
            _write_bytes_atomic(dest_dir / f"{stem}.decision.json",
                                (json.dumps(decision.to_dict(), indent=2) + "\n").encode())
        # the card first and the model last: whoever sees the .onnx sees a complete model with its card
        for ext in (".json", ".md", ".onnx"):
            os.replace(onnx_path.with_suffix(ext), final.with_suffix(ext))
        if not accepted:
            self._prune_refused(dest_dir)
        return final

    def _prune_refused(self, folder: Path) -> None:
        models = sorted(folder.glob("*.onnx"), key=lambda p: p.stat().st_mtime_ns)
        for old in models[: max(0, len(models) - self.config.keep_refused)]:
            for ext in (".onnx", ".json", ".md", ".decision.json"):
                old.with_suffix(ext).unlink(missing_ok=True)


def prune_accepted(models_dir: str | os.PathLike, keep: int, protect: Sequence[str] | set[str] = ()) -> list[Path]:
    """Delete all but the ``keep`` newest accepted models (``.onnx`` + card) in ``models_dir``; return the deleted.

    Paths in ``protect`` (the deployed model) are never deleted and do not count against ``keep``.
    """
    folder = Path(models_dir)
    protected = {str(Path(p)) for p in protect}
    models = sorted((p for p in folder.glob("*.onnx") if str(p) not in protected),
                    key=lambda p: p.stat().st_mtime_ns, reverse=True)
    deleted = []
    for old in models[max(0, int(keep)):]:
        for ext in (".onnx", ".json", ".md"):
            old.with_suffix(ext).unlink(missing_ok=True)
        deleted.append(old)
    return deleted


def _safe_label(label: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_+-]", "_", str(label)).strip("_") or "model"
    return cleaned[:80]


# ---------------------------------------------------------------------------------------------- local training


@dataclass
class LocalTraining:
    """A local round's result: the trained model (base + delta) and its metrics on the held-out frames."""

    model: GlobalModel
    metrics: dict[str, float]


def _stack(dataset: Any, indices: Sequence[int]) -> tuple[Any, Any]:  # noqa: ANN401 - torch tensors
    import torch

    items = [dataset[i] for i in indices]
    return torch.stack([it["image"] for it in items]), torch.stack([it["depth"] for it in items])


def _spread(count: int, limit: int) -> list[int]:
    if count <= limit:
        return list(range(count))
    return sorted(set(np.round(np.linspace(0, count - 1, limit)).astype(int).tolist()))


def build_local_data(
    train_segments: Sequence[Segment],
    holdout_segments: Sequence[Segment],
    config: TaskConfig,
    max_train_frames: int = 2000,
    max_holdout_frames: int = 200,
    label: str = "rover",
) -> LocalData:
    """Tensors for :func:`collab.flower.task.local_round`: train on ``train_segments``, validate on the held out.

    Frames are spread evenly when a side has more than its limit (memory on a small board).
    """
    from forest_perception.collab.flower.task import LocalData
    from forest_perception.models.data import ForestDepthDataset

    train = [s for s in train_segments if len(s) > 0]
    held = [s for s in holdout_segments if len(s) > 0]
    if not train:
        raise ValueError(f"{label}: no training frames (every segment with frames is held out or none recorded)")
    common = {"input_hw": config.input_hw, "min_depth": config.min_depth, "max_depth": config.max_depth}
    train_set = ForestDepthDataset(train, **common)
    train_images, train_depth = _stack(train_set, _spread(len(train_set), max_train_frames))
    if held:
        val_set = ForestDepthDataset(held, **common)
        val_images, val_depth = _stack(val_set, _spread(len(val_set), max_holdout_frames))
        val_is_train = False
    else:
        val_images, val_depth, val_is_train = train_images, train_depth, True
    return LocalData(label, train_images, train_depth, val_images, val_depth,
                     [s.segment_id for s in train + held], val_is_train)


def train_locally(
    base: GlobalModel, data: LocalData, config: TaskConfig, seed: int = 0, label: str = "local"
) -> LocalTraining:
    """One :func:`collab.flower.task.local_round` from ``base`` on the rover's frames; the trained model back."""
    from forest_perception.collab.flower.task import local_round

    task = base.task_config(config)
    update = local_round(base.names, base.arrays, data, task, scope="all", seed=seed)
    trained = [
        (np.asarray(a, np.float64) + np.asarray(d, np.float64)).astype(np.asarray(a).dtype)
        for a, d in zip(base.arrays, update.deltas)
    ]
    meta = {**base.meta, **task_meta(task), "command": f"{label}: local round from {base.source or 'initial model'}",
            "base-round": base.round}
    return LocalTraining(GlobalModel(base.round, list(base.names), trained, meta, label), dict(update.metrics))


def initial_model(config: TaskConfig) -> GlobalModel:
    """The network as the coordinator initialises it (round 0 of a run with the same seed)."""
    from forest_perception.collab.flower.task import initial_arrays

    names, arrays = initial_arrays(config)
    return GlobalModel(0, names, arrays, {**task_meta(config), "command": "initial model"}, "initial")


# ---------------------------------------------------------------------------------------------- idleness


class IdleDetector:
    """Whether the rover stands still: odometry speed at most ``idle_speed_mps`` for ``idle_seconds``.

    No odometry yet, or none for ``odom_timeout_s``, is not idle: a rover whose odometry is down may be
    driving. Times are seconds on one clock (ROS time in the node); time going backwards (a simulation
    reset) forgets the history.
    """

    def __init__(self, idle_speed_mps: float, idle_seconds: float, odom_timeout_s: float = 1.0) -> None:
        for name, value in (("idle_speed_mps", idle_speed_mps), ("idle_seconds", idle_seconds),
                            ("odom_timeout_s", odom_timeout_s)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        self.idle_speed_mps = float(idle_speed_mps)
        self.idle_seconds = float(idle_seconds)
        self.odom_timeout_s = float(odom_timeout_s)
        self.reset()

    def reset(self) -> None:
        """Forget every sample."""
        self._first: float | None = None
        self._last: float | None = None
        self._last_moving: float | None = None
        self._last_speed = math.nan

    def update(self, t: float, speed: float) -> None:
        """Add one odometry sample (seconds, m/s); ``ValueError`` for a non-finite speed or time."""
        if not (math.isfinite(t) and math.isfinite(speed)):
            raise ValueError(f"odometry sample must be finite, got t={t!r} speed={speed!r}")
        if self._last is not None and t < self._last:
            self.reset()
        if self._first is None:
            self._first = t
        self._last, self._last_speed = t, abs(float(speed))
        if self._last_speed > self.idle_speed_mps:
            self._last_moving = t

    def state(self, now: float) -> tuple[bool, str]:
        """``(idle, why)`` at time ``now``."""
        if self._last is None:
            return False, "no odometry received yet"
        age = now - self._last
        if age > self.odom_timeout_s:
            return False, f"no odometry for {age:.1f} s (timeout {self.odom_timeout_s} s)"
        if self._last_speed > self.idle_speed_mps:
            return False, f"moving at {self._last_speed:.2f} m/s (idle at or below {self.idle_speed_mps} m/s)"
        since = self._last_moving if self._last_moving is not None else self._first
        still = now - since
        if still < self.idle_seconds:
            return False, f"stopped for {still:.1f} s of the {self.idle_seconds} s required"
        return True, f"stopped for {still:.1f} s"


def odometry_speed(linear: Sequence[float]) -> float:
    """Speed (m/s) from an odometry twist's linear velocity (x, y, z)."""
    values = [float(v) for v in linear]
    if len(values) != 3:
        raise ValueError(f"linear velocity must have 3 components, got {len(values)}")
    return math.sqrt(sum(v * v for v in values))


def train_permission(idle: bool, idle_reason: str, train_only_when_idle: bool, busy: str) -> tuple[bool, str]:
    """Whether a local training may start now, and why (not)."""
    if busy:
        return False, f"busy: {busy}"
    if train_only_when_idle and not idle:
        return False, f"rover not idle: {idle_reason}"
    return True, "idle" if idle else f"training while not idle ({idle_reason}): train_only_when_idle is false"


# ---------------------------------------------------------------------------------------------- ledger


class DeploymentLedger:
    """What this rover decided and deployed, kept in the models dir across restarts."""

    def __init__(self, models_dir: str | os.PathLike, history: int = 50) -> None:
        self.models_dir = Path(models_dir)
        self.path = self.models_dir / LEDGER_FILE
        self.history = int(history)
        self.current: dict[str, Any] | None = None
        self.decisions: list[dict[str, Any]] = []
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
                self.current = data.get("current")
                self.decisions = list(data.get("decisions") or [])
            except (OSError, ValueError, AttributeError) as exc:
                # a damaged ledger only costs re-gating: keep it aside, never crash the node
                aside = self.path.with_name(f"{self.path.name}.damaged-{int(time.time())}")
                os.replace(self.path, aside)
                warnings.warn(f"ledger {self.path} was unreadable ({exc}); moved to {aside.name}", stacklevel=2)

    def seen(self, key: str) -> bool:
        """Whether the candidate with this key was decided already."""
        return any(d.get("key") == key for d in self.decisions)

    def record(self, key: str, decision: GateDecision, deployed: bool, deploy_error: str = "",
               model: GlobalModel | None = None) -> None:
        """Remember a decision; a deployed one becomes ``current`` (with its arrays, the base of local training)."""
        entry = {**decision.to_dict(), "key": key, "deployed": bool(deployed), "deploy_error": deploy_error}
        self.decisions = (self.decisions + [entry])[-self.history:]
        if deployed:
            self.current = {"model_path": decision.model_path, "model_version": decision.model_version,
                            "round": decision.round, "label": decision.label, "deployed_at": time.time()}
            if model is not None:
                write_global_model_file(self.models_dir / CURRENT_ARRAYS_FILE, model)
        self.save()

    def save(self) -> None:
        """Write the ledger atomically."""
        self.models_dir.mkdir(parents=True, exist_ok=True)
        data = {"current": self.current, "decisions": self.decisions}
        _write_bytes_atomic(self.path, (json.dumps(_json_clean(data), indent=1) + "\n").encode())

    def current_model(self) -> GlobalModel | None:
        """The deployed model's arrays, if they were kept and are readable."""
        path = self.models_dir / CURRENT_ARRAYS_FILE
        if not path.is_file():
            return None
        try:
            return _read_npz(path)
        except ValueError:
            return None
