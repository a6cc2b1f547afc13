"""Hardware classes of the swarm, and which shipped model and ONNX Runtime providers each one runs."""

from __future__ import annotations

import platform
from collections.abc import Sequence

from forest_perception.models.weights import GPU_PROVIDERS, parse_model_name

HARDWARE_CLASSES: dict[str, str] = {
    "pi4": "Raspberry Pi 4 class: ARM CPU, no GPU provider; runs the low-resolution int8 auto-encoder",
    "jetson": "Jetson class: ARM with the CUDA/TensorRT providers; runs the float multi-scale network",
    "pc": "x86-64 CPU (a base station, the simulator machine); runs any int8 or float model on the CPU",
}
"""Every hardware class a release can target, with what it means."""

CPU = ("CPUExecutionProvider",)
JETSON_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def detect_hardware_class(machine: str | None = None, providers: Sequence[str] | None = None) -> str:
    """This board's class: ``jetson`` on ARM with a GPU provider, ``pi4`` on ARM without, else ``pc``."""
    if providers is None:
        try:
            import onnxruntime

            providers = onnxruntime.get_available_providers()
        except ImportError:
            providers = ()
    machine = (machine if machine is not None else platform.machine()).lower()
    if machine.startswith(("arm", "aarch64")):
        return "jetson" if any(p in GPU_PROVIDERS for p in providers) else "pi4"
    return "pc"


def check_hardware(names: Sequence[str], what: str = "hardware") -> list[str]:
    """``names`` if every one is a hardware class; ``ValueError`` naming the unknown ones otherwise."""
    unknown = [n for n in names if n not in HARDWARE_CLASSES]
    if unknown:
        raise ValueError(f"{what}: unknown hardware class {', '.join(map(repr, unknown))}; known: "
                         f"{', '.join(HARDWARE_CLASSES)}")
    return list(names)


def default_release_hardware(model_name: str) -> tuple[list[str], list[str]]:
    """``(hardware classes, providers)`` a model is released for when not told: int8 models run on the CPU of a
    ``pi4`` (auto-encoder at 160x128 or less) or a ``pc``; float models on a ``jetson`` (its GPU providers listed)
    and a ``pc``. A name that is not a shipped-style name counts as a float model for ``pc`` alone."""
    parsed = parse_model_name(model_name)
    if parsed is None:
        return ["pc"], list(CPU)
    family, width, height, int8 = parsed
    if int8:
        small = family == "autoencoder" and width * height <= 160 * 128
        return (["pi4", "pc"] if small else ["pc"]), list(CPU)
    return ["jetson", "pc"], list(JETSON_PROVIDERS)


def fits(manifest_hardware: Sequence[str], hardware_class: str) -> bool:
    """Whether a release made for ``manifest_hardware`` may run on a ``hardware_class`` rover."""
    return hardware_class in manifest_hardware
