"""PyTorch inference: depth from a training checkpoint or an in-memory model (needs torch; not on the rover).

:func:`load_engine` opens either kind of model file: ``.onnx`` through the rover runtime
(:mod:`forest_perception.inference`), ``.pt`` / ``.pth`` checkpoints here.
"""

from __future__ import annotations

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


def load_torch_checkpoint(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """Load a training checkpoint into ``(model in eval mode, meta)``; ``ModelLoadError`` naming the path otherwise."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {str(path)!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ModelLoadError(f"cannot read checkpoint {str(path)!r}: {str(error).strip()[:200]}") from error
    # the trainer writes "model_state"; older/other tools "state_dict"
    state_key = next((key for key in ("model_state", "state_dict") if isinstance(checkpoint, Mapping)
                      and key in checkpoint), None)
    if state_key is None:
        raise ModelLoadError(f"checkpoint {str(path)!r} is not a training checkpoint "
                             "(no 'model_state' or 'state_dict' key)")
    if not checkpoint.get("model_name"):
        raise ModelLoadError(f"checkpoint {str(path)!r} has no 'model_name'; cannot rebuild the network")
    skip = {"model_state", "state_dict", "optimizer_state", "scheduler_state", "history"}
    meta = {key: value for key, value in checkpoint.items() if key not in skip}
    normalisation = meta.get("normalisation")
    if isinstance(normalisation, Mapping):
        meta.setdefault("mean", normalisation.get("mean"))
        meta.setdefault("std", normalisation.get("std"))
    input_hw = meta_input_hw(meta) or (240, 320)
    kwargs = dict(meta.get("model_kwargs") or {})
    kwargs.pop("input_hw", None)
    try:
        from forest_perception.models.networks import build_model

        model = build_model(str(meta["model_name"]), input_hw=input_hw, **kwargs)
        model.load_state_dict(checkpoint[state_key])
    except Exception as error:
        raise ModelLoadError(f"checkpoint {str(path)!r}: cannot rebuild {meta['model_name']!r} "
                             f"with {kwargs}: {str(error).strip()[:300]}") from error
    model.eval()
    meta["input_hw"] = list(input_hw)
    meta.setdefault("weights_sha256", weights_sha256(checkpoint[state_key]))
    return model, meta


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
            meta["version"] = f"{name}-{meta['weights_sha256'][:12]}"
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
