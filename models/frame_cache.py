"""On-disk cache of frames resized to the network input, read memory-mapped (``forest-train train --cache DIR``).

Per segment two ``.npy`` shards: RGB ``uint8 NxHxWx3`` and depth ``uint16 NxHxW`` in millimetres (0 invalid). An
epoch then reads ~0.4 MB per 320x240 frame from pages the OS may drop at any time, instead of decoding two
full-size PNGs, so 20k+ frames train in bounded memory. A shard is named by a hash of its segment's folder, frame
files (name, size, mtime), depth encoding and input size: changed data or another size makes a new shard, never a
stale read. docs/training.md, "Many frames".
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from forest_perception.dataset_tools.layout import Segment

CACHE_VERSION = 1
DEPTH_UNIT_M = 0.001
MAX_CACHED_DEPTH_M = 65.534
"""Depth beyond this is stored as 65.535 m (still beyond any training range; masked out of the loss)."""


def depth_to_millimetres(depth_m: np.ndarray) -> np.ndarray:
    """Metres (NaN or <= 0 invalid) -> uint16 millimetres, 0 invalid, rounded to the nearest millimetre."""
    depth = np.nan_to_num(np.asarray(depth_m, np.float32), nan=0.0, posinf=MAX_CACHED_DEPTH_M + DEPTH_UNIT_M)
    millimetres = np.rint(np.clip(depth, 0.0, MAX_CACHED_DEPTH_M + DEPTH_UNIT_M) / DEPTH_UNIT_M)
    return millimetres.astype(np.uint16)


def depth_from_millimetres(millimetres: np.ndarray) -> np.ndarray:
    """uint16 millimetres -> float32 metres with NaN where invalid (0), as ``load_frame`` gives depth."""
    depth = np.asarray(millimetres, np.float32) * np.float32(DEPTH_UNIT_M)
    depth[millimetres == 0] = np.nan
    return depth


def _file_facts(path: Path) -> list[Any]:
    try:
        stat = path.stat()
    except OSError:
        return [path.name, None]
    return [path.name, stat.st_size, stat.st_mtime_ns]


def shard_key(segment: Segment, input_hw: Sequence[int]) -> str:
    """16 hex digits naming what a segment's shards hold (data files, depth encoding, size, cache version)."""
    encoding = segment.depth_encoding
    digest = hashlib.sha256(json.dumps([CACHE_VERSION, str(Path(segment.path).resolve()), list(input_hw),
                                        encoding.scale_m_per_unit, encoding.larger_is_farther]).encode())
    for i in range(len(segment)):
        facts = _file_facts(segment.rgb_path(i)) + _file_facts(segment.depth_path(i))
        digest.update(json.dumps(facts).encode())
    return digest.hexdigest()[:16]


class _ResizedFrames:
    """(segment, frame, RGB, depth in millimetres) of the frames to cache, for a DataLoader's workers."""

    def __init__(self, pairs: list[tuple[int, int]],
                 load_resized: Callable[[int, int], tuple[np.ndarray, np.ndarray]]) -> None:
        self.pairs = pairs
        self.load_resized = load_resized

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, k: int) -> tuple[int, int, np.ndarray, np.ndarray]:
        si, fi = self.pairs[k]
        rgb, depth = self.load_resized(si, fi)
        return si, fi, rgb, depth_to_millimetres(depth)


class FrameCache:
    """The resized frames of some segments in ``folder``; ``read`` is None for a frame whose shard is not built."""

    def __init__(self, folder: str | os.PathLike, segments: Sequence[Segment], input_hw: Sequence[int]) -> None:
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"--cache {self.folder} is a file; give a folder for the frame cache")
        self.input_hw = (int(input_hw[0]), int(input_hw[1]))
        self.names = [f"{segment.segment_id}-{shard_key(segment, self.input_hw)}" for segment in segments]
        self.lengths = [len(segment) for segment in segments]
        self._maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __getstate__(self) -> dict[str, Any]:
        # memory maps are reopened in each DataLoader worker, never pickled (that would copy the data)
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state

    def shard_paths(self, si: int) -> tuple[Path, Path]:
        """(RGB shard, depth shard) of segment ``si``."""
        return self.folder / f"{self.names[si]}.rgb.npy", self.folder / f"{self.names[si]}.depth.npy"

    def has(self, si: int) -> bool:
        """Whether segment ``si``'s shards are built."""
        return all(path.is_file() for path in self.shard_paths(si))

    def missing(self) -> list[int]:
        """Segments whose shards are not built yet."""
        return [si for si in range(len(self.names)) if not self.has(si)]

    def read(self, si: int, fi: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Frame ``fi`` of segment ``si`` resized: (RGB uint8 HxWx3, depth float32 metres NaN invalid), or None."""
        maps = self._maps.get(si)
        if maps is None:
            if not self.has(si):
                return None
            rgb_path, depth_path = self.shard_paths(si)
            maps = (np.load(rgb_path, mmap_mode="r"), np.load(depth_path, mmap_mode="r"))
            self._maps[si] = maps
        rgb, depth = maps
        return np.array(rgb[fi]), depth_from_millimetres(depth[fi])

    def build(self, load_resized: Callable[[int, int], tuple[np.ndarray, np.ndarray]], workers: int = 0,
              progress: bool = False) -> int:
        """Write the missing shards with ``load_resized(si, fi)``; returns the number of frames written.

        Each shard is written to a hidden temporary file and renamed when complete: an interrupted build leaves
        whole shards and no half ones, and the next build goes on from there. With ``workers`` the frames are
        decoded in that many processes.
        """
        from torch.utils.data import DataLoader
        from tqdm import tqdm

        todo = self.missing()
        if not todo:
            return 0
        self.folder.mkdir(parents=True, exist_ok=True)
        height, width = self.input_hw
        pairs = [(si, fi) for si in todo for fi in range(self.lengths[si])]
        loader = DataLoader(_ResizedFrames(pairs, load_resized), batch_size=None, shuffle=False, num_workers=workers)
        open_shards: dict[int, tuple[np.ndarray, np.ndarray, Path, Path, int]] = {}
        written = 0
        try:
            for si, fi, rgb, millimetres in tqdm(loader, total=len(pairs), desc="frame cache", disable=not progress,
                                                 leave=False, dynamic_ncols=True):
                if si not in open_shards:
                    rgb_path, depth_path = self.shard_paths(si)
                    rgb_tmp = rgb_path.with_name(f".{rgb_path.name}.{os.getpid()}.tmp")
                    depth_tmp = depth_path.with_name(f".{depth_path.name}.{os.getpid()}.tmp")
                    n = self.lengths[si]
                    open_shards[si] = (
                        np.lib.format.open_memmap(rgb_tmp, mode="w+", dtype=np.uint8, shape=(n, height, width, 3)),
                        np.lib.format.open_memmap(depth_tmp, mode="w+", dtype=np.uint16, shape=(n, height, width)),
                        rgb_tmp, depth_tmp, 0)
                rgb_map, depth_map, rgb_tmp, depth_tmp, done = open_shards[si]
                rgb_map[fi] = np.asarray(rgb)
                depth_map[fi] = np.asarray(millimetres)
                done += 1
                written += 1
                open_shards[si] = (rgb_map, depth_map, rgb_tmp, depth_tmp, done)
                if done == self.lengths[si]:
                    rgb_map.flush()
                    depth_map.flush()
                    del open_shards[si]
                    del rgb_map, depth_map
                    rgb_path, depth_path = self.shard_paths(si)
                    os.replace(depth_tmp, depth_path)
                    os.replace(rgb_tmp, rgb_path)
        finally:
            for _rgb, _depth, rgb_tmp, depth_tmp, _done in open_shards.values():
                Path(rgb_tmp).unlink(missing_ok=True)
                Path(depth_tmp).unlink(missing_ok=True)
        return written

    def describe(self) -> str:
        """One line: where, how many shards built."""
        built = len(self.names) - len(self.missing())
        return f"frame cache {self.folder}: {built}/{len(self.names)} segment shard(s) built"
