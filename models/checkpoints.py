"""Checkpoints by file or by shipped name, and the slim checkpoint that ships beside an ONNX model.

``forest-train train --init NAME`` and ``forest-train eval --checkpoint NAME`` take a checkpoint file or the name of a
shipped network (``multiscale_320x240``; ``..._int8`` names their fp32 network for ``--init``). A shipped checkpoint
holds the weights and what rebuilds the network (trainer format, no optimizer); docs/training.md, "Fine-tuning".
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from forest_perception.inference import file_sha256
from forest_perception.models.weights import shipped_checkpoint, weights_dir

#: Keys of a training checkpoint that only resuming needs; a shipped (slim) checkpoint leaves them out.
RESUME_ONLY_KEYS = ("optimizer_state", "scheduler_state", "scaler_state", "history")


def shipped_checkpoint_names() -> list[str]:
    """Names of the shipped networks that have a PyTorch checkpoint, sorted."""
    return sorted(p.stem for p in weights_dir().glob("*.pt"))


def _looks_like_name(text: str) -> bool:
    return "/" not in text and os.sep not in text and Path(text).suffix.lower() not in (".pt", ".pth")


def resolve_checkpoint(text: str | os.PathLike, allow_int8: bool = True) -> Path:
    """The checkpoint file ``text`` names: an existing file, or a shipped network's ``models/weights/<name>.pt``.

    ``..._int8`` names give their fp32 network's checkpoint when ``allow_int8`` (fine-tuning starts from fp32
    weights); otherwise they are refused, since an int8 model runs in ONNX Runtime only. ``ValueError`` naming
    ``text``, what was expected and the shipped names.
    """
    text = str(text)
    path = Path(text)
    if path.is_file():
        return path
    shipped = ", ".join(shipped_checkpoint_names()) or "none"
    if path.is_dir():
        raise ValueError(f"{text!r} is a folder; give a checkpoint file (.pt) or a shipped model name ({shipped})")
    if not _looks_like_name(text):
        raise ValueError(f"checkpoint {text!r} does not exist; give a .pt written by 'forest-train train' or a "
                         f"shipped model name ({shipped})")
    stem = text[: -len(".onnx")] if text.endswith(".onnx") else text
    if stem.endswith("_int8") and not allow_int8:
        fp32 = stem[: -len("_int8")]
        raise ValueError(f"{text!r} is an int8 ONNX model, which runs in ONNX Runtime only: evaluate it with "
                         f"'forest-train eval-styles --model {stem}', or give its fp32 network {fp32} here")
    try:
        return shipped_checkpoint(stem)
    except FileNotFoundError:
        raise ValueError(f"{text!r} is neither a checkpoint file nor a shipped model name; shipped: {shipped}"
                         ) from None


def checkpoint_reference(text: str | os.PathLike, path: str | os.PathLike, checkpoint: Mapping[str, Any]
                         ) -> dict[str, Any]:
    """What a run started from, for its checkpoints and model card: the name or path given, file and sha256."""
    path = Path(path)
    shipped = path.resolve().parent == weights_dir().resolve()
    reference: dict[str, Any] = {
        "source": str(text),
        "file": path.name if shipped else str(path),
        "shipped": shipped,
        "sha256": file_sha256(path),
        "model_name": checkpoint.get("model_name"),
    }
    if checkpoint.get("version"):
        reference["version"] = checkpoint["version"]
    return reference


def save_checkpoint(checkpoint: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """``torch.save`` to a hidden temporary file beside ``path`` (its folder made), renamed when complete (never half a
    file)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(dict(checkpoint), tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def slim_checkpoint(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint without what only resuming needs (``RESUME_ONLY_KEYS``): weights and how to rebuild them."""
    return {key: value for key, value in checkpoint.items() if key not in RESUME_ONLY_KEYS}
