"""CoDA, the pure core: cloud data that looks like the rover's, found without images leaving the rover.

The rover describes its kept frames with the shipped depth network's encoder (spatially pooled features, L2
normalised, float16: a few hundred bytes a frame, never an image). The cloud holds an exact nearest-neighbour index
(faiss) over the descriptors of its global pool (simulated forests of many styles, in the public dataset layout) and
returns a *coarse* match: the pool frames nearest to the rover's. On the rover a small classifier (L2-regularised
logistic regression on the descriptors) learns its own frames against outside frames (a random draw of the pool) and
keeps the candidates that look most like its own (*fine* filtering); only the kept samples come down, and the rover
fine-tunes on its own frames plus those. Nothing here imports Flower or ROS. Set-up and figures:
``docs/collaborative.md`` ("CoDA").
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import tracemalloc
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

INDEX_FORMAT = "forest_perception.coda-index"
INDEX_FORMAT_VERSION = 1
DESCRIPTOR_DTYPE = np.float16
"""What a descriptor travels as (and is stored as in the index file)."""
ARMS = ("local", "random", "coarse", "coda")
"""Where a rover's extra training samples come from: none, a random draw of the pool, the coarse match, the coarse
match filtered by the rover's classifier."""


# ---------------------------------------------------------------------------------------------- descriptors


def check_descriptors(x: object, dim: int | None = None, what: str = "descriptors",
                      allow_empty: bool = True) -> np.ndarray:
    """``x`` as a float32 ``N x D`` array; ``ValueError`` naming ``what`` and the fault (shape, dimension, NaN/Inf)."""
    try:
        array = np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what}: not an array ({exc})") from exc
    if array.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array (frames x dimensions), got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{what} must be floating point, got {array.dtype}")
    if array.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{what}: no descriptors (0 frames)")
    if dim is not None and array.shape[1] != dim:
        raise ValueError(f"{what} have {array.shape[1]} dimensions, the index holds {dim}-dimensional descriptors "
                         "(made by another encoder?)")
    if array.size and not np.all(np.isfinite(array)):
        bad = int(np.count_nonzero(~np.isfinite(array).all(axis=1)))
        raise ValueError(f"{what}: {bad} of {array.shape[0]} descriptors hold NaN/Inf values")
    return array.astype(np.float32, copy=False)


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (an all-zero row stays zero), float32."""
    x = np.asarray(x, np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def descriptor_bytes(descriptors: np.ndarray) -> int:
    """Bytes the descriptors take as sent (float16)."""
    array = np.asarray(descriptors)
    return int(array.shape[0] * array.shape[1] * np.dtype(DESCRIPTOR_DTYPE).itemsize) if array.ndim == 2 else 0


def pooled_features(network: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The network encoder's two coarsest feature maps, each averaged over the image, concatenated (``N x D``).

    ``network`` must have an ``encoder`` that returns a list of feature maps (the auto-encoder) or one map.
    """
    encoder = getattr(network, "encoder", None)
    if encoder is None:
        raise ValueError(f"{type(network).__name__} has no encoder to describe frames with; use an auto-encoder "
                         "network (autoencoder_160x128, ...)")
    features = encoder(images)
    maps = list(features[-2:]) if isinstance(features, (list, tuple)) else [features]
    return torch.cat([f.mean(dim=(2, 3)) for f in maps], dim=1)


def weights_version(network: nn.Module) -> str:
    """``encoder-<12 hex of the sha256 of the network's floating-point state>``: which encoder made descriptors."""
    digest = hashlib.sha256()
    for name, value in network.state_dict().items():
        if value.is_floating_point():
            digest.update(name.encode())
            digest.update(value.detach().cpu().numpy().astype(np.float32).tobytes())
    return f"encoder-{digest.hexdigest()[:12]}"


@dataclass
class DescriptorEncoder:
    """The frozen depth network whose encoder describes frames; ``version`` names its weights."""

    network: nn.Module
    input_hw: tuple[int, int]
    name: str = ""
    version: str = ""

    def __post_init__(self) -> None:
        self.network.eval()
        self.input_hw = (int(self.input_hw[0]), int(self.input_hw[1]))
        if not self.version:
            self.version = weights_version(self.network)

    @classmethod
    def from_init(cls, init: str) -> DescriptorEncoder:
        """The encoder of a shipped network or checkpoint (``autoencoder_160x128``, a ``.pt`` file)."""
        from forest_perception.collab.flower.network import read_init
        from forest_perception.models.networks import build_model

        checkpoint = read_init(init)
        arch = checkpoint.architecture
        network = build_model(arch.model, arch.input_hw, **arch.kwargs)
        state = network.state_dict()
        for name, array in zip(checkpoint.names, checkpoint.arrays):
            state[name] = torch.as_tensor(np.asarray(array)).to(state[name].dtype)
        network.load_state_dict(state)
        return cls(network, arch.input_hw, str(init))

    @torch.no_grad()
    def describe(self, images: torch.Tensor, batch_size: int = 32) -> np.ndarray:
        """Descriptors of normalised images ``N x 3 x H x W`` at the encoder's input: unit norm, float16 ``N x D``."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a N x 3 x H x W tensor, got {shape}")
        if tuple(images.shape[-2:]) != self.input_hw:
            raise ValueError(f"images are {images.shape[-1]}x{images.shape[-2]}, the encoder {self.name or ''} "
                             f"describes {self.input_hw[1]}x{self.input_hw[0]} frames")
        self.network.eval()
        out = [pooled_features(self.network, images[i:i + batch_size]) for i in range(0, images.shape[0], batch_size)]
        if not out:
            return np.zeros((0, self.dim), DESCRIPTOR_DTYPE)
        return normalise(torch.cat(out).numpy()).astype(DESCRIPTOR_DTYPE)

    @property
    def dim(self) -> int:
        """Descriptor dimensions."""
        with torch.no_grad():
            return int(pooled_features(self.network, torch.zeros(1, 3, *self.input_hw)).shape[1])


# ---------------------------------------------------------------------------------------------- the cloud's index


@dataclass
class CoarseMatch:
    """The cloud's answer: pool rows ranked (most rover frames pointing at them first, then nearest)."""

    indices: np.ndarray  # pool rows, int64
    votes: np.ndarray  # how many of the rover's frames have each among their nearest
    similarity: np.ndarray  # best cosine similarity to any of the rover's frames


class PoolIndex:
    """An exact cosine-similarity index (faiss ``IndexFlatIP`` on unit vectors) over the cloud pool's descriptors.

    ``ids`` name the pool frames (``<folder>:<segment>/<stem>``); ``sources`` map each row to
    ``(folder number, segment id, frame number)`` so the cloud can load the sample; ``encoder`` is the version of the
    encoder that made the descriptors (queries from another encoder are meaningless: the caller checks it).
    """

    def __init__(self, descriptors: np.ndarray, ids: Sequence[str], encoder: str, folders: Sequence[str] = (),
                 sources: Sequence[tuple[int, str, int]] = (), input_hw: Sequence[int] = (0, 0),
                 encoder_name: str = "") -> None:
        import faiss

        array = check_descriptors(descriptors, what="pool descriptors")
        if len(ids) != array.shape[0]:
            raise ValueError(f"{array.shape[0]} pool descriptors but {len(ids)} ids")
        if sources and len(sources) != array.shape[0]:
            raise ValueError(f"{array.shape[0]} pool descriptors but {len(sources)} sources")
        self.descriptors = normalise(array)
        self.ids = [str(i) for i in ids]
        self.encoder = str(encoder)
        self.encoder_name = str(encoder_name)  # the network (shipped name or checkpoint) rovers describe frames with
        self.folders = [str(f) for f in folders]
        self.sources = [(int(a), str(b), int(c)) for a, b, c in sources]
        self.input_hw = (int(input_hw[0]), int(input_hw[1]))
        self.dim = int(array.shape[1])
        self._index = faiss.IndexFlatIP(self.dim)
        if len(self.ids):
            self._index.add(np.ascontiguousarray(self.descriptors))

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest pool rows of each query (``n x k`` rows, cosine similarities), nearest first.

        Fewer than ``k`` columns when the pool is smaller; ``n x 0`` from an empty pool.
        """
        q = normalise(check_descriptors(queries, self.dim, "query descriptors"))
        k = min(int(k), len(self))
        if k <= 0 or q.shape[0] == 0:
            return np.zeros((q.shape[0], 0), np.int64), np.zeros((q.shape[0], 0), np.float32)
        similarity, rows = self._index.search(np.ascontiguousarray(q), k)
        return rows.astype(np.int64), similarity.astype(np.float32)

    def coarse(self, queries: np.ndarray, k: int, per_query: int | None = None,
               exclude: Sequence[int] = ()) -> CoarseMatch:
        """The coarse match of a rover: the union of each frame's ``per_query`` (default ``k``) nearest pool rows
        (never one of ``exclude``, such as the rover's own shared frames), ranked by how many of the rover's frames
        have them among their nearest, then by best similarity; at most ``k`` rows."""
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        skip = {int(r) for r in exclude}
        rows, sims = self.search(queries, max(1, k if per_query is None else per_query) + len(skip))
        votes: dict[int, int] = {}
        best: dict[int, float] = {}
        for r, s in zip(rows.ravel().tolist(), sims.ravel().tolist()):
            if r in skip:
                continue
            votes[r] = votes.get(r, 0) + 1
            best[r] = max(best.get(r, -math.inf), s)
        order = sorted(votes, key=lambda r: (-votes[r], -best[r], r))[:k]
        return CoarseMatch(np.asarray(order, np.int64), np.asarray([votes[r] for r in order], np.int64),
                           np.asarray([best[r] for r in order], np.float32))

    def random(self, k: int, seed: int, exclude: Sequence[int] = ()) -> np.ndarray:
        """``k`` pool rows drawn at random (seeded) without replacement, none of ``exclude``."""
        left = np.setdiff1d(np.arange(len(self)), np.asarray(list(exclude), np.int64))
        k = min(int(k), left.size)
        return np.sort(np.random.default_rng(seed).choice(left, size=k, replace=False)).astype(np.int64) if k else \
            np.zeros(0, np.int64)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index (descriptors as float16, ids, sources, encoder version) to one ``.npz``, atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": INDEX_FORMAT, "format_version": INDEX_FORMAT_VERSION, "encoder": self.encoder,
                "encoder_name": self.encoder_name,
                "folders": self.folders, "input_hw": list(self.input_hw), "ids": self.ids,
                "sources": [list(s) for s in self.sources]}
        staged = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
        try:
            np.savez(staged, descriptors=self.descriptors.astype(DESCRIPTOR_DTYPE), meta=np.asarray(json.dumps(meta)))
            os.replace(staged, path)
        finally:
            staged.unlink(missing_ok=True)
        return path

    @classmethod
    def concat(cls, parts: Sequence[PoolIndex]) -> PoolIndex:
        """One index over the rows of ``parts`` in order (made by the same encoder, at the same input size)."""
        if not parts:
            raise ValueError("concat needs at least one index")
        first = parts[0]
        for part in parts[1:]:
            if (part.encoder, part.dim, part.input_hw) != (first.encoder, first.dim, first.input_hw):
                raise ValueError(f"cannot join an index of {part.encoder} ({part.dim}-d, {part.input_hw}) to one of "
                                 f"{first.encoder} ({first.dim}-d, {first.input_hw})")
        folders, sources = [], []
        for part in parts:
            sources += [(a + len(folders), b, c) for a, b, c in part.sources]
            folders += part.folders
        return cls(np.concatenate([p.descriptors for p in parts]), [i for p in parts for i in p.ids], first.encoder,
                   folders, sources, first.input_hw, first.encoder_name)

    @classmethod
    def load(cls, path: str | os.PathLike) -> PoolIndex:
        """Read :meth:`save`'s file; ``ValueError`` naming the file when it is not a CoDA index."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"CoDA index {path} does not exist (build it with forest-fl coda index)")
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                descriptors = data["descriptors"]
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"CoDA index {path}: not readable ({type(exc).__name__}: {str(exc)[:200]})") from exc
        if meta.get("format") != INDEX_FORMAT or meta.get("format_version") != INDEX_FORMAT_VERSION:
            raise ValueError(f"CoDA index {path}: not a {INDEX_FORMAT} file of version {INDEX_FORMAT_VERSION}")
        return cls(descriptors, meta["ids"], meta["encoder"], meta["folders"], [tuple(s) for s in meta["sources"]],
                   meta["input_hw"], meta.get("encoder_name", ""))

    def samples(self, rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The pool frames of ``rows`` as sent to a rover: RGB ``N x H x W x 3`` uint8 and depth ``N x H x W``
        float16 metres (NaN invalid), at the index's input size."""
        from forest_perception.models.data import ForestDepthDataset

        rows = [int(r) for r in rows]
        h, w = self.input_hw
        if not rows:
            return np.zeros((0, h, w, 3), np.uint8), np.zeros((0, h, w), np.float16)
        if not self.sources:
            raise ValueError("this CoDA index has no sources: it cannot load pool samples")
        bad = [r for r in rows if not 0 <= r < len(self)]
        if bad:
            raise ValueError(f"pool rows {bad[:5]} are outside the index's {len(self)} rows")
        datasets: dict[int, ForestDepthDataset] = {}
        images, depths = [], []
        for r in rows:
            folder, segment_id, frame = self.sources[r]
            if folder not in datasets:
                datasets[folder] = ForestDepthDataset(self.folders[folder], input_hw=self.input_hw)
            dataset = datasets[folder]
            si = next((i for i, s in enumerate(dataset.segments) if s.segment_id == segment_id), None)
            if si is None:
                raise ValueError(f"pool sample {self.ids[r]}: segment {segment_id} is gone from {self.folders[folder]}")
            rgb, depth = dataset.load_resized(si, frame)
            images.append(rgb.astype(np.uint8))
            depths.append(depth.astype(np.float16))
        return np.stack(images), np.stack(depths)


def build_pool_index(folders: Sequence[str | os.PathLike], encoder: DescriptorEncoder, max_frames: int = 5000,
                     batch_size: int = 32, segments: Sequence[Sequence[str]] | None = None,
                     per_folder: int | None = None) -> PoolIndex:
    """Describe up to ``max_frames`` frames (spread evenly; at most ``per_folder`` of each folder) of the pool
    ``folders`` (public layout) and index them; ``segments`` (one list per folder) keeps only those segment ids."""
    from forest_perception.collab.rover.holdout import spread_indices
    from forest_perception.models.data import ForestDepthDataset

    paths = [Path(f) for f in folders]
    missing = [str(p) for p in paths if not p.is_dir()]
    if missing:
        raise ValueError(f"cloud pool folder(s) {', '.join(missing)} do not exist")
    descriptors, ids, sources = [], [], []
    for number, path in enumerate(paths):
        try:
            source = path
            if segments is not None:
                from forest_perception.models.data import collect_segments

                source = [s for s in collect_segments(path) if s.segment_id in set(segments[number])]
            dataset = ForestDepthDataset(source, input_hw=encoder.input_hw)
        except ValueError:
            continue  # a folder without frames adds nothing to the pool
        budget = max(0, max_frames - len(ids))
        picks = spread_indices(len(dataset), budget if per_folder is None else min(per_folder, budget))
        for first in range(0, len(picks), batch_size):
            items = [dataset[i] for i in picks[first:first + batch_size]]
            descriptors.append(encoder.describe(torch.stack([it["image"] for it in items])))
            for i, it in zip(picks[first:first + batch_size], items):
                si, fi = dataset.index[i]
                ids.append(f"{path.name}:{it['segment']}/{it['stem']}")
                sources.append((number, dataset.segments[si].segment_id, fi))
    array = np.concatenate(descriptors) if descriptors else np.zeros((0, encoder.dim), DESCRIPTOR_DTYPE)
    return PoolIndex(array, ids, encoder.version, [str(p.resolve()) for p in paths], sources, encoder.input_hw,
                     encoder.name)


def samples_to_tensors(images: np.ndarray, depth: np.ndarray, min_depth: float = 0.1,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Received samples as training tensors: normalised images ``N x 3 x H x W``, depth ``N x 1 x H x W`` (0 invalid),
    as :class:`forest_perception.models.data.ForestDepthDataset` makes them."""
    from forest_perception.models.data import image_normalisation

    images, depth = np.asarray(images), np.asarray(depth)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"candidate images must be N x H x W x 3 uint8, got {images.shape} {images.dtype}")
    if depth.shape != images.shape[:3]:
        raise ValueError(f"candidate depth must be N x H x W matching the images {images.shape[:3]}, got {depth.shape}")
    mean, std = (np.asarray(v, np.float32) for v in image_normalisation())
    x = (images.astype(np.float32) / 255.0 - mean) / std
    d = depth.astype(np.float32)
    d = np.where(np.isfinite(d) & (d > min_depth), d, 0.0).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), torch.from_numpy(d[:, None])


def sample_bytes(images: np.ndarray, depth: np.ndarray) -> int:
    """Bytes of samples as sent (uint8 RGB + float16 depth)."""
    return int(np.asarray(images).nbytes + np.asarray(depth).astype(np.float16).nbytes)


# ---------------------------------------------------------------------------------------------- the rover's filter


@dataclass
class FilterFit:
    """How fitting the rover's classifier went: time, peak memory (tracemalloc), iterations, training accuracy."""

    seconds: float
    peak_bytes: int
    iterations: int
    accuracy: float
    own: int
    outside: int


class OwnDataFilter:
    """Logistic regression ``p(own | descriptor)`` with an L2 penalty, fitted by Newton's method (IRLS) in numpy.

    Descriptors are standardised first (per dimension, over the fitted frames): unit-norm descriptors of one kind of
    scene differ in small deviations around a common direction. Own frames and outside frames weigh equally in the
    loss whatever their counts. Its parameters are ``3 D + 1`` floats (weights, bias, the standardisation); fitting
    holds the descriptors and one ``D x D`` Hessian.
    """

    def __init__(self, l2: float = 30.0, max_iter: int = 25, tol: float = 1e-6) -> None:
        if not (math.isfinite(l2) and l2 > 0):
            raise ValueError(f"l2 must be a positive finite number, got {l2!r}")
        self.l2, self.max_iter, self.tol = float(l2), int(max_iter), float(tol)
        self.weights: np.ndarray | None = None
        self.mean: np.ndarray | None = None
        self.scale: np.ndarray | None = None

    def fit(self, own: np.ndarray, outside: np.ndarray) -> FilterFit:
        """Learn own (label 1) vs outside (label 0); ``ValueError`` when a side is empty or the shapes disagree."""
        own = check_descriptors(own, what="own descriptors", allow_empty=False)
        outside = check_descriptors(outside, own.shape[1], "outside descriptors", allow_empty=False)
        tracemalloc.start()
        start = time.perf_counter()
        try:
            x = np.concatenate([own, outside]).astype(np.float64)
            self.mean, self.scale = x.mean(axis=0), x.std(axis=0) + 1e-6
            x = np.concatenate([(x - self.mean) / self.scale, np.ones((x.shape[0], 1))], axis=1)
            y = np.concatenate([np.ones(own.shape[0]), np.zeros(outside.shape[0])])
            sample_w = np.where(y > 0, 0.5 / own.shape[0], 0.5 / outside.shape[0])
            w = np.zeros(x.shape[1])
            penalty = np.full(x.shape[1], self.l2 / x.shape[0])
            penalty[-1] = 0.0  # the bias is not penalised
            iterations = 0
            while iterations < self.max_iter:
                iterations += 1
                p = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -30, 30)))
                grad = x.T @ (sample_w * (p - y)) + penalty * w
                hessian = (x * (sample_w * p * (1 - p))[:, None]).T @ x + np.diag(penalty + 1e-9)
                step = np.linalg.solve(hessian, grad)
                w -= step
                if float(np.abs(step).max()) < self.tol:
                    break
            self.weights = w
            accuracy = float(np.mean((self.scores(np.concatenate([own, outside])) >= 0.5) == (y > 0)))
            seconds = time.perf_counter() - start
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        return FilterFit(seconds, int(peak), iterations, accuracy, int(own.shape[0]), int(outside.shape[0]))

    def scores(self, descriptors: np.ndarray) -> np.ndarray:
        """``p(own)`` of each descriptor."""
        if self.weights is None:
            raise ValueError("the filter is not fitted: call fit(own, outside) first")
        x = check_descriptors(descriptors, self.weights.size - 1, "candidate descriptors").astype(np.float64)
        x = (x - self.mean) / self.scale
        return 1.0 / (1.0 + np.exp(-np.clip(x @ self.weights[:-1] + self.weights[-1], -30, 30)))

    def select(self, candidates: np.ndarray, keep: int, threshold: float | None = None) -> np.ndarray:
        """Positions of the ``keep`` candidates most like the rover's own frames (highest ``p(own)`` first); with
        ``threshold``, only those with ``p(own) >= threshold`` (so possibly none)."""
        scores = self.scores(candidates)
        order = np.argsort(-scores, kind="stable")[:max(0, int(keep))]
        if threshold is not None:
            order = order[scores[order] >= threshold]
        return order.astype(np.int64)

    @property
    def nbytes(self) -> int:
        """Bytes of the fitted parameters."""
        return 0 if self.weights is None else int(self.weights.nbytes + self.mean.nbytes + self.scale.nbytes)


def gate_threshold(classifier: OwnDataFilter, own: np.ndarray, gate: float) -> float:
    """The ``p(own)`` a candidate needs to pass the gate: the ``gate`` quantile of the rover's own frames' scores."""
    return float(np.quantile(classifier.scores(np.asarray(own).astype(DESCRIPTOR_DTYPE)), gate))


# ---------------------------------------------------------------------------------------------- one rover's retrieval


@dataclass
class Retrieval:
    """What one rover gets from the cloud under an arm, and what it cost on the link and on the rover."""

    arm: str
    rows: np.ndarray  # pool rows the rover trains on
    bytes_up: int = 0  # descriptors, kept ids
    bytes_down: int = 0  # candidate and outside descriptors (coda), then the samples
    candidates: int = 0  # coarse candidates looked at
    fit: FilterFit | None = None
    scoring_s: float = 0.0
    info: dict = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        """Flat numbers for a results row."""
        out = {"cloud_samples": float(len(self.rows)), "bytes_up": float(self.bytes_up),
               "bytes_down": float(self.bytes_down), "candidates": float(self.candidates)}
        if self.fit is not None:
            out.update(filter_fit_s=self.fit.seconds, filter_score_s=self.scoring_s,
                       filter_peak_bytes=float(self.fit.peak_bytes), filter_accuracy=self.fit.accuracy)
        return out


SAMPLE_BYTES_KEY = "sample_bytes"


def retrieve(index: PoolIndex, own: np.ndarray, arm: str, k: int, seed: int = 0, coarse_factor: int = 2,
             outside: int = 256, per_query: int | None = None, sample_bytes_each: int = 0,
             exclude: Sequence[int] = (), gate: float | None = None) -> Retrieval:
    """The pool rows one rover trains on under ``arm`` (:data:`ARMS`), and the bytes each way.

    ``random``: ``k`` rows at random (nothing goes up). ``coarse``: the rover's descriptors go up, the ``k`` best
    coarse rows come back. ``coda``: descriptors up; the ``coarse_factor * k`` best coarse rows' descriptors and
    ``outside`` random other rows' descriptors come down; the rover fits :class:`OwnDataFilter` on its own vs the
    outside descriptors, keeps the ``k`` candidates most like its own (with ``gate``: only those whose ``p(own)`` is
    at least the ``gate`` quantile of its own frames' ``p(own)``, possibly none) and sends their ids (int32) up.
    Every arm then
    gets its rows' samples down (``sample_bytes_each`` apiece); no arm gets a row of ``exclude`` (the rover's own
    shared frames). An empty pool or a rover without descriptors gets
    nothing (with ``info["reason"]``).
    """
    if arm not in ARMS:
        raise ValueError(f"arm must be one of {', '.join(ARMS)}, got {arm!r}")
    if k < 0 or coarse_factor < 1 or outside < 1:
        raise ValueError(f"need k >= 0, coarse_factor >= 1 and outside >= 1, got {k}, {coarse_factor}, {outside}")
    if gate is not None and not 0.0 <= gate < 1.0:
        raise ValueError(f"gate must be a quantile within [0, 1), got {gate!r}")
    own = check_descriptors(own, index.dim, "own descriptors")
    empty = np.zeros(0, np.int64)
    if arm == "local" or k == 0:
        return Retrieval(arm, empty)
    if len(index) == 0:
        return Retrieval(arm, empty, info={"reason": "the cloud pool is empty"})
    if arm == "random":
        rows = index.random(k, seed, exclude)
        return Retrieval(arm, rows, bytes_down=len(rows) * sample_bytes_each)
    if own.shape[0] == 0:
        return Retrieval(arm, empty, info={"reason": "the rover has no kept frames to describe"})
    up = descriptor_bytes(own)
    if arm == "coarse":
        rows = index.coarse(own, k, per_query, exclude).indices
        return Retrieval(arm, rows, bytes_up=up, bytes_down=len(rows) * sample_bytes_each, candidates=len(rows))
    match = index.coarse(own, coarse_factor * k, per_query, exclude)
    negatives = index.random(outside, seed, exclude=np.concatenate([match.indices, np.asarray(exclude, np.int64)]))
    if negatives.size == 0:  # every pool row is a candidate: the rest of the pool cannot stand for outside data
        negatives = index.random(outside, seed, exclude)
    candidate_desc = index.descriptors[match.indices]
    outside_desc = index.descriptors[negatives]
    down = descriptor_bytes(candidate_desc) + descriptor_bytes(outside_desc)
    classifier = OwnDataFilter()
    fit = classifier.fit(own.astype(DESCRIPTOR_DTYPE), outside_desc.astype(DESCRIPTOR_DTYPE))
    start = time.perf_counter()
    threshold = None if gate is None else gate_threshold(classifier, own, gate)
    kept = classifier.select(candidate_desc.astype(DESCRIPTOR_DTYPE), k, threshold)
    scoring_s = time.perf_counter() - start
    rows = match.indices[kept]
    up += 4 * len(rows)
    return Retrieval(arm, rows, bytes_up=up, bytes_down=down + len(rows) * sample_bytes_each,
                     candidates=len(match.indices), fit=fit, scoring_s=scoring_s,
                     info={"outside": int(negatives.size), "classifier_bytes": classifier.nbytes,
                           "threshold": threshold})
