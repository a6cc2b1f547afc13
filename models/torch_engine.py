"""PyTorch inference: depth from a training checkpoint or an in-memory model (needs torch; not on the rover).

:func:`load_engine` opens either kind of model file: ``.onnx`` through the rover runtime
(:mod:`forest_perception.inference`), ``.pt`` / ``.pth`` checkpoints here.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from forest_perception.inference import (
    TORCH_SUFFIXES,
    DepthEngine,
    ModelLoadError,
    meta_input_hw,
    weights_sha256,
)
from forest_perception.inference import load_engine as load_onnx_engine
from forest_perception.models.networks import model_version

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive (since torch 1.6)
_PICKLE_MAGIC = b"\x80"  # the legacy format starts with a pickle protocol opcode
_CHECKPOINT_HINT = "give a .pt file written by 'forest-train train' (the run's checkpoints/best.pt or last.pt)"


def read_checkpoint_file(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """The dict a training checkpoint holds; ``ModelLoadError`` naming the file and what is wrong with it.

    Only tensors and plain values are unpickled (``weights_only=True``): a file that holds other Python objects
    is refused as not a forest-train checkpoint. torch's advice to load it with ``weights_only=False`` would let
    the file run code, so it is never passed on. Empty, truncated and foreign files get a message of their own.
    """
    import torch

    path = Path(path)
    where = f"checkpoint {str(path)!r}"
    not_ours = f"{where} is not a forest-train checkpoint"
    if path.is_dir():
        raise ModelLoadError(f"{where} is a folder, not a file; {_CHECKPOINT_HINT}")
    if not path.is_file():
        raise ModelLoadError(f"{where} does not exist; {_CHECKPOINT_HINT}")
    size = path.stat().st_size
    if size == 0:
        raise ModelLoadError(f"{where} is empty (0 bytes): it was cut off while being written; {_CHECKPOINT_HINT}")
    with open(path, "rb") as stream:
        head = stream.read(len(_ZIP_MAGIC))
    if head.startswith(_ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, ValueError) as error:
            raise ModelLoadError(f"{where} is truncated or damaged ({size} bytes, an incomplete zip archive): "
                                 f"copy it again or {_CHECKPOINT_HINT}") from error
        if not any(name.endswith("data.pkl") for name in names):
            raise ModelLoadError(f"{not_ours} (a zip archive without PyTorch data); {_CHECKPOINT_HINT}")
    elif not head.startswith(_PICKLE_MAGIC):
        raise ModelLoadError(f"{not_ours} (not a PyTorch file); {_CHECKPOINT_HINT}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch's text may advise weights_only=False: never show it
        if "weights only load failed" in str(error).lower():
            raise ModelLoadError(f"{not_ours}: it holds Python objects other than tensors, numbers, strings, lists "
                                 f"and dicts, which are not loaded (they could run code); {_CHECKPOINT_HINT}"
                                 ) from error
        raise ModelLoadError(f"{where} is damaged and cannot be read ({type(error).__name__}): copy it again or "
                             f"{_CHECKPOINT_HINT}") from error
    if not isinstance(checkpoint, Mapping):
        raise ModelLoadError(f"{not_ours}: it holds a {type(checkpoint).__name__}, not a dict of model state and "
                             f"settings; {_CHECKPOINT_HINT}")
    return dict(checkpoint)


def model_from_checkpoint(checkpoint: Mapping[str, Any], path: str | Path) -> tuple[Any, dict[str, Any]]:
    """``(model in eval mode, meta)`` rebuilt from a checkpoint dict read from ``path`` (named in errors)."""
    where = f"checkpoint {str(path)!r}"
    # the trainer writes "model_state"; older/other tools "state_dict"
    state_key = next((key for key in ("model_state", "state_dict") if key in checkpoint), None)
    if state_key is None:
        raise ModelLoadError(f"{where} is not a forest-train checkpoint (no 'model_state' or 'state_dict' key); "
                             f"{_CHECKPOINT_HINT}")
    if not checkpoint.get("model_name"):
        raise ModelLoadError(f"{where} has no 'model_name'; cannot rebuild the network; {_CHECKPOINT_HINT}")
    skip = {"model_state", "state_dict", "optimizer_state", "scheduler_state", "history"}
    meta = {key: value for key, value in checkpoint.items() if key not in skip}
    normalisation = meta.get("normalisation")
    if isinstance(normalisation, Mapping):
        meta.setdefault("mean", normalisation.get("mean"))
        meta.setdefault("std", normalisation.get("std"))
    input_hw = meta_input_hw(meta) or (240, 320)
    kwargs = meta.get("model_kwargs") or {}
    kwargs = dict(kwargs) if isinstance(kwargs, Mapping) else {}
    kwargs.pop("input_hw", None)
    try:
        from forest_perception.models.networks import build_model

        model = build_model(str(meta["model_name"]), input_hw=input_hw, **kwargs)
        model.load_state_dict(checkpoint[state_key])
    except Exception as error:
        detail = " ".join(str(error).split())[:300]
        raise ModelLoadError(f"{where}: cannot rebuild {meta['model_name']!r} with {kwargs}: {detail}") from error
    model.eval()
    meta["input_hw"] = list(input_hw)
    meta.setdefault("weights_sha256", weights_sha256(checkpoint[state_key]))
    return model, meta


def load_torch_checkpoint(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """Load a training checkpoint into ``(model in eval mode, meta)``; ``ModelLoadError`` naming the path otherwise."""
    return model_from_checkpoint(read_checkpoint_file(path), path)


class TorchDepthEngine(DepthEngine):
    """Depth from a PyTorch model (a training checkpoint path, or ``(model, meta)``), eager mode, no grad."""

    backend = "torch"

    def __init__(self, source: str | Path | tuple[Any, Mapping[str, Any]], threads: int = 2, device: str = "cpu",
                 min_depth: float | None = None, max_depth: float | None = None, upsample: str = "linear") -> None:
        import torch

        if isinstance(source, (str, Path)):
            self.path: Path | None = Path(source)
            model, meta = load_torch_checkpoint(self.path)
        else:
            self.path = None
            model, meta = source
            meta = dict(meta)
        where = f"checkpoint {str(self.path)!r}" if self.path else f"model {type(model).__name__}"
        input_hw = meta_input_hw(meta) or tuple(getattr(model, "input_hw", (240, 320)))
        # torch's thread pool is process-wide: this also affects any other torch work in the process
        if threads:
            torch.set_num_threads(int(threads))
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        if not meta.get("weights_sha256"):
            meta["weights_sha256"] = weights_sha256(self.model.state_dict())
        if not meta.get("version"):
            name = meta.get("model_name") or type(model).__name__
            meta["version"] = model_version(str(name), meta["weights_sha256"], self.model)
        try:
            with torch.inference_mode():
                probe = self.model(torch.zeros(1, 3, *input_hw, device=self.device))
        except Exception as error:
            raise ModelLoadError(f"{where} does not accept a 1x3x{input_hw[0]}x{input_hw[1]} image: "
                                 f"{str(error).strip()[:300]}") from error
        if probe.ndim not in (3, 4) or (probe.ndim == 4 and probe.shape[1] != 1):
            raise ModelLoadError(f"{where} must output Nx1xHxW depth, got {tuple(probe.shape)}")
        super().__init__(input_hw, meta, min_depth, max_depth, upsample)

    def _infer(self, nchw: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model(torch.from_numpy(nchw).to(self.device)).cpu().numpy()


def load_engine(path: str | Path, backend: str = "auto", providers: Sequence[str] = ("CPUExecutionProvider",),
                threads: int = 2, **kwargs: Any) -> DepthEngine:
    """Open a depth model: ``auto`` picks ONNX Runtime for ``.onnx`` and torch for ``.pt``/``.pth``."""
    path = Path(path)
    if backend == "torch" or (backend == "auto" and path.suffix.lower() in TORCH_SUFFIXES):
        if not path.is_file():
            raise ModelLoadError(f"model file {str(path)!r} does not exist")
        return TorchDepthEngine(path, threads=threads, **kwargs)
    return load_onnx_engine(path, backend=backend, providers=providers, threads=threads, **kwargs)
