"""The depth models we ship: ONNX files with their model cards, training logs and curves, and the PyTorch
checkpoint of every fp32 network (``<name>.pt``, for fine-tuning).

Package data of ``forest_perception.models.weights``, so the same lookup works from the source
tree, an editable install, a wheel and a colcon build. Importing this module loads no torch.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

# the camera resolution each shipped network was trained for, as "WxH" in its file name
SHIPPED_SIZES = ("320x240", "160x128")
DEFAULT_MODEL = "multiscale_320x240_int8"


def weights_dir() -> Path:
    """The folder that holds the shipped ``.onnx`` files and their cards."""
    return Path(str(resources.files(__name__)))


def shipped_models() -> list[str]:
    """Names (file stems) of every shipped ONNX model, sorted."""
    return sorted(p.stem for p in weights_dir().glob("*.onnx"))


def shipped_checkpoint(name: str) -> Path:
    """Path of the PyTorch checkpoint (``<name>.pt``) beside a shipped ONNX model, for fine-tuning.

    ``name`` is a shipped model name (a trailing ``.pt`` or ``.onnx`` is allowed); an int8 name (``..._int8``) gives
    its fp32 network's checkpoint. Raises ``FileNotFoundError`` that lists the shipped checkpoints when there is none.
    """
    stem = name
    for suffix in (".pt", ".onnx"):
        stem = stem[: -len(suffix)] if stem.endswith(suffix) else stem
    stem = stem[: -len("_int8")] if stem.endswith("_int8") else stem
    path = weights_dir() / f"{stem}.pt"
    if not path.is_file():
        have = sorted(p.stem for p in weights_dir().glob("*.pt"))
        raise FileNotFoundError(
            f"no shipped checkpoint {name!r} in {weights_dir()}; shipped: {', '.join(have) or 'none'}"
        )
    return path


def shipped_model(name: str = DEFAULT_MODEL) -> Path:
    """Path of a shipped model by name (``multiscale_320x240_int8``; a trailing ``.onnx`` is allowed).

    Raises ``FileNotFoundError`` that lists the shipped names when there is no such model.
    """
    stem = name[: -len(".onnx")] if name.endswith(".onnx") else name
    path = weights_dir() / f"{stem}.onnx"
    if not path.is_file():
        raise FileNotFoundError(
            f"no shipped model {name!r} in {weights_dir()}; shipped: {', '.join(shipped_models()) or 'none'}"
        )
    return path
