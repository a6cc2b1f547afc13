"""The depth models we ship: ONNX files with their model cards, training logs and curves, and the PyTorch
checkpoint of every fp32 network (``<name>.pt``, for fine-tuning).

Package data of ``forest_perception.models.weights``, so the same lookup works from the source
tree, an editable install, a wheel and a colcon build. Importing this module loads no torch.
"""

from __future__ import annotations

import platform
import re
from collections.abc import Iterable, Sequence
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


FAMILIES = ("multiscale", "autoencoder")
"""The shipped network families, in the order :func:`choose_for_camera` breaks ties."""
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
_NAME = re.compile(r"^(?P<family>[a-z]+)_(?P<width>\d+)x(?P<height>\d+)(?P<int8>_int8)?$")


def parse_model_name(name: str) -> tuple[str, int, int, bool] | None:
    """``(family, width, height, int8)`` of a shipped model name such as ``multiscale_320x240_int8``; None if the
    name does not follow that pattern."""
    match = _NAME.match(name)
    if not match:
        return None
    return match["family"], int(match["width"]), int(match["height"]), bool(match["int8"])


def default_family(machine: str | None = None, providers: Sequence[str] = ()) -> str:
    """The family for this board: the auto-encoder on an ARM board without a GPU provider (Raspberry Pi class: the
    multi-scale network is 2.6x its FLOPs), else the more accurate multi-scale network (x86, Jetson with CUDA)."""
    machine = (machine if machine is not None else platform.machine()).lower()
    arm = machine.startswith(("arm", "aarch64"))
    return "autoencoder" if arm and not any(p in GPU_PROVIDERS for p in providers) else "multiscale"


def choose_for_camera(names: Iterable[str], width: int, height: int, family: str, int8: bool) -> str:
    """The model of ``family`` that fits a ``width`` x ``height`` camera: the largest input no larger than the
    camera on either side (fewest pixels thrown away by resizing down, none made up), closest in aspect ratio; a
    camera smaller than every input gets the smallest. At that size the asked precision (``int8`` or float) when
    shipped, else the other; the other family only when ``names`` has none of ``family``. Raises ``ValueError``
    naming what was asked."""
    if width < 1 or height < 1:
        raise ValueError(f"camera size must be positive, got {width}x{height}")
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    names = list(names)
    parsed = {n: v for n in names if (v := parse_model_name(n)) is not None}
    for fam in (family, *[f for f in FAMILIES if f != family]):
        pool = {n: v for n, v in parsed.items() if v[0] == fam}
        if not pool:
            continue
        sizes = {(w, h) for _, w, h, _ in pool.values()}
        fitting = [s for s in sizes if s[0] <= width and s[1] <= height]
        aspect = width / height
        size = (max(fitting, key=lambda s: (s[0] * s[1], -abs(s[0] / s[1] - aspect))) if fitting
                else min(sizes, key=lambda s: s[0] * s[1]))
        at_size = sorted((n for n, (_, w, h, _) in pool.items() if (w, h) == size),
                         key=lambda n: pool[n][3] != int8)  # the asked precision first
        return at_size[0]
    raise ValueError(f"no shipped model of the families {FAMILIES} among {sorted(names) or 'none'}")


def model_for_camera(width: int, height: int, family: str = "auto", providers: Sequence[str] = ()) -> Path:
    """The shipped ONNX model for a ``width`` x ``height`` camera on this board (``family`` "auto":
    :func:`default_family`); int8 on the CPU, float with a GPU provider."""
    fam = default_family(providers=providers) if family == "auto" else family
    int8 = not any(p in GPU_PROVIDERS for p in providers)
    return shipped_model(choose_for_camera(shipped_models(), width, height, fam, int8))
