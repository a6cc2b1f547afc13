"""The rover's history bank: the features of its most recent frames, for a depth model with ICIIA (no ROS, no torch).

Bounded (the oldest frame leaves when a new one comes), thread-safe, in memory only: nothing is written to disk
unless :meth:`FeatureBank.save` is called. ``depth_node`` keeps one per running model. Details: docs/nodes.md
(depth_node, "History").
"""

from __future__ import annotations

import os
import threading
from collections import deque
from pathlib import Path

import numpy as np


class FeatureBank:
    """The last ``capacity`` frame features (float32 vectors of one width ``dim``), oldest first."""

    def __init__(self, capacity: int, dim: int) -> None:
        if not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"feature width must be a positive integer, got {dim!r}")
        self.dim = int(dim)
        self._lock = threading.Lock()
        self._frames: deque[np.ndarray] = deque(maxlen=1)
        self.resize(capacity)

    @property
    def capacity(self) -> int:
        """Most frames kept (0: the bank keeps nothing)."""
        return self._capacity

    def resize(self, capacity: int) -> None:
        """Change the bound and empty the bank (features of a differently-sized history are not reused)."""
        if not isinstance(capacity, (int, np.integer)) or isinstance(capacity, bool) or capacity < 0:
            raise ValueError(f"history capacity must be a non-negative integer, got {capacity!r}")
        with self._lock:
            self._capacity = int(capacity)
            self._frames = deque(maxlen=max(1, self._capacity))

    def reset(self) -> int:
        """Forget every frame; returns how many were dropped."""
        with self._lock:
            dropped = len(self._frames)
            self._frames.clear()
        return dropped

    def __len__(self) -> int:
        with self._lock:
            return len(self._frames)

    def add(self, feature: np.ndarray) -> None:
        """Append one frame's feature (``D`` or ``1xD``); ``ValueError`` for another width or a non-finite value."""
        vector = np.asarray(feature, np.float32).reshape(-1)
        if vector.size != self.dim:
            raise ValueError(f"history feature must have {self.dim} values, got shape {np.shape(feature)}")
        if not np.all(np.isfinite(vector)):
            raise ValueError("history feature has non-finite values; not added")
        with self._lock:
            if self._capacity:
                self._frames.append(vector.copy())

    def inputs(self, slots: int) -> tuple[np.ndarray, np.ndarray]:
        """``(bank slots x D, mask slots)`` float32 for the model: the newest ``slots`` frames first-in-first, the
        remaining slots zero with mask 0."""
        bank = np.zeros((int(slots), self.dim), np.float32)
        mask = np.zeros(int(slots), np.float32)
        with self._lock:
            frames = list(self._frames)[-int(slots):] if slots else []
        if frames:
            bank[:len(frames)] = np.stack(frames)
            mask[:len(frames)] = 1.0
        return bank, mask

    def save(self, path: str | os.PathLike) -> Path:
        """Write the bank to ``path`` (``.npz``: ``features`` NxD oldest first). Only ever on request."""
        path = Path(path)
        with self._lock:
            features = np.stack(list(self._frames)) if self._frames else np.zeros((0, self.dim), np.float32)
        np.savez(path, features=features)
        return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")


__all__ = ["FeatureBank"]
