"""Server state to bytes and back, for a SQLite BLOB column (no pickle).

A state is nested dicts (str keys) and lists of numpy arrays, str, int, float, bool and
None, as the ``state_dict()`` of :mod:`forest_perception.collab.algorithms` servers returns. :func:`pack_state`
writes it as an ``.npz`` archive: every array under its own key, plus the JSON skeleton
with each array replaced by a reference. :func:`unpack_state` loads with
``allow_pickle=False``, so a tampered blob cannot run code.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

_SKELETON = "__skeleton__"
_REF = "__ndarray__"


def pack_state(state: dict) -> bytes:
    """Serialise a state dict to bytes; dtypes and shapes of arrays are kept exactly."""
    arrays: dict[str, np.ndarray] = {}

    def encode(value: Any, where: str) -> Any:
        if isinstance(value, np.ndarray):
            if value.dtype == object:
                raise TypeError(f"pack_state: {where} is an object array, which cannot be stored without pickle")
            key = f"a{len(arrays)}"
            arrays[key] = value
            return {_REF: key}
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                if not isinstance(k, str):
                    raise TypeError(f"pack_state: {where} has a non-string key {k!r}")
                if k == _REF:
                    raise ValueError(f"pack_state: {where} uses the reserved key {_REF!r}")
                out[k] = encode(v, f"{where}.{k}")
            return out
        if isinstance(value, (list, tuple)):
            return [encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, np.generic):
            return value.item()
        if value is None or isinstance(value, (str, bool, int, float)):
            return value
        raise TypeError(f"pack_state: {where} is a {type(value).__name__}, not a numpy array or JSON value")

    skeleton = encode(state, "state")
    buffer = io.BytesIO()
    text = json.dumps(skeleton, allow_nan=True).encode("utf-8")
    np.savez(buffer, **arrays, **{_SKELETON: np.frombuffer(text, dtype=np.uint8)})
    return buffer.getvalue()


def unpack_state(blob: bytes) -> dict:
    """Read back a state written by :func:`pack_state`."""
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (ValueError, OSError) as exc:
        raise ValueError(f"unpack_state: not a packed state ({exc})") from None
    if _SKELETON not in arrays:
        raise ValueError("unpack_state: blob has no state skeleton")
    skeleton = json.loads(arrays.pop(_SKELETON).tobytes().decode("utf-8"))

    def decode(value: Any) -> Any:
        if isinstance(value, dict):
            if set(value) == {_REF}:
                key = value[_REF]
                if key not in arrays:
                    raise ValueError(f"unpack_state: skeleton refers to missing array {key!r}")
                return arrays[key]
            return {k: decode(v) for k, v in value.items()}
        if isinstance(value, list):
            return [decode(v) for v in value]
        return value

    return decode(skeleton)
