"""Depth inference engines for the rover runtime (no ROS imports).

Details: docs/runtime.md (`inference`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

_LOG = logging.getLogger(__name__)

DEFAULT_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
DEFAULT_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
DEFAULT_MIN_DEPTH_M = 0.1
DEFAULT_MAX_DEPTH_M = 20.0
#: Relative slack at the ends of the depth range: values within it are clamped, not invalidated (float rounding
#: of the network's bounded head lands a hair outside the range).
RANGE_SLACK = 1e-4

SUPPORTED_ENCODINGS = ("rgb8", "bgr8", "rgba8", "bgra8", "mono8")


class ModelLoadError(ValueError):
    """A model file is missing, unreadable or does not look like a depth network (the message names the path)."""


# --------------------------------------------------------------------------------------------- image encodings


def convert_image_encoding(data: np.ndarray, encoding: str) -> np.ndarray:
    """Convert a ROS image array (``rgb8``, ``bgr8``, ``rgba8``, ``bgra8``, ``mono8``) to contiguous RGB uint8 HxWx3."""
    array = np.asarray(data)
    if array.dtype != np.uint8:
        raise ValueError(f"image with encoding {encoding!r} must be uint8, got {array.dtype}")
    channels = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}.get(encoding)
    if channels is None:
        raise ValueError(f"unsupported image encoding {encoding!r}; expected one of {', '.join(SUPPORTED_ENCODINGS)}")
    if channels == 1 and array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    expected_ndim = 2 if channels == 1 else 3
    if array.ndim != expected_ndim or (channels > 1 and array.shape[2] != channels):
        raise ValueError(f"image with encoding {encoding!r} must be HxW{'' if channels == 1 else f'x{channels}'}, "
                         f"got shape {array.shape}")
    if encoding == "rgb8":
        return np.ascontiguousarray(array)
    code = {"bgr8": cv2.COLOR_BGR2RGB, "rgba8": cv2.COLOR_RGBA2RGB, "bgra8": cv2.COLOR_BGRA2RGB,
            "mono8": cv2.COLOR_GRAY2RGB}[encoding]
    return cv2.cvtColor(np.ascontiguousarray(array), code)


# --------------------------------------------------------------------------------------------- pre/post-processing


class Preprocessor:
    """rgb8 frame -> normalised 1x3xHxW float32 network input, reusing its buffers between frames."""

    def __init__(self, input_hw: Sequence[int], mean: Sequence[float] = DEFAULT_MEAN,
                 std: Sequence[float] = DEFAULT_STD) -> None:
        self.input_hw = (int(input_hw[0]), int(input_hw[1]))
        mean_arr = np.asarray(mean, np.float32).reshape(3)
        std_arr = np.asarray(std, np.float32).reshape(3)
        if np.any(std_arr <= 0):
            raise ValueError(f"normalisation std must be positive, got {tuple(std_arr)}")
        # (x/255 - mean)/std == x*scale + offset: one multiply-add per pixel
        self._scale = (1.0 / (255.0 * std_arr)).reshape(3, 1, 1)
        self._offset = (-mean_arr / std_arr).reshape(3, 1, 1)
        height, width = self.input_hw
        self._resized = np.empty((height, width, 3), np.uint8)
        self._chw = np.empty((3, height, width), np.float32)
        self._nchw = np.empty((1, 3, height, width), np.float32)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """Return the network input for ``rgb`` (HxWx3 uint8); the returned array is reused by the next call."""
        if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            shape = getattr(rgb, "shape", None)
            dtype = getattr(rgb, "dtype", type(rgb).__name__)
            raise ValueError(f"expected an rgb8 image (HxWx3 uint8), got shape {shape} dtype {dtype}")
        height, width = self.input_hw
        if rgb.shape[:2] == self.input_hw:
            resized = rgb
        else:
            shrinking = rgb.shape[0] >= height and rgb.shape[1] >= width
            interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
            resized = cv2.resize(rgb, (width, height), dst=self._resized, interpolation=interpolation)
        np.copyto(self._chw, resized.transpose(2, 0, 1))
        np.multiply(self._chw, self._scale, out=self._chw)
        np.add(self._chw, self._offset, out=self._nchw[0])
        return self._nchw


def postprocess_depth(depth: np.ndarray, out_hw: Sequence[int], min_depth: float, max_depth: float,
                      upsample: str = "linear") -> np.ndarray:
    """Network depth (HxW, or 1x1xHxW) -> float32 ``out_hw`` metres, NaN where non-finite or outside the range."""
    depth = np.asarray(depth, np.float32).reshape(np.asarray(depth).shape[-2:])
    out_h, out_w = int(out_hw[0]), int(out_hw[1])
    if depth.shape != (out_h, out_w):
        interpolation = {"linear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}.get(upsample)
        if interpolation is None:
            raise ValueError(f"upsample must be 'linear' or 'nearest', got {upsample!r}")
        depth = cv2.resize(depth, (out_w, out_h), interpolation=interpolation)
    depth = np.array(depth, np.float32, copy=True)
    # NaN compares False, so non-finite values are caught by the same mask
    invalid = ~((depth >= min_depth * (1.0 - RANGE_SLACK)) & (depth <= max_depth * (1.0 + RANGE_SLACK)))
    np.clip(depth, min_depth, max_depth, out=depth)
    depth[invalid] = np.nan
    return depth


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(state_dict: Mapping[str, Any]) -> str:
    """Hex sha256 over a state dict's names, dtypes, shapes and values (sorted by name)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name]
        array = tensor.detach().cpu().contiguous().numpy() if hasattr(tensor, "detach") else np.asarray(tensor)
        digest.update(f"{name}:{array.dtype}:{array.shape};".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _meta_float(meta: Mapping[str, Any], key: str, default: float) -> float:
    value = meta.get(key)
    try:
        return float(value) if value is not None and value != "" else default
    except (TypeError, ValueError):
        return default


def _meta_triplet(meta: Mapping[str, Any], key: str, default: Sequence[float]) -> tuple[float, float, float]:
    value = meta.get(key)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return tuple(default)
    try:
        triplet = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return tuple(default)
    return triplet if len(triplet) == 3 else tuple(default)


def meta_input_hw(meta: Mapping[str, Any]) -> tuple[int, int] | None:
    """``(height, width)`` from a model's ``input_hw`` metadata (a list or its JSON), None if absent or bad."""
    value = meta.get("input_hw")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    try:
        height, width = (int(v) for v in value)
    except (TypeError, ValueError):
        return None
    return height, width


# --------------------------------------------------------------------------------------------- engines


class DepthEngine(ABC):
    """Monocular depth: ``predict(rgb8 HxWx3) -> float32 HxW metres`` at the input resolution, NaN = invalid."""

    backend: str = "abstract"

    def __init__(self, input_hw: Sequence[int], meta: Mapping[str, Any], min_depth: float | None,
                 max_depth: float | None, upsample: str = "linear") -> None:
        self.metadata: dict[str, Any] = dict(meta)
        self._input_hw = (int(input_hw[0]), int(input_hw[1]))
        self.mean = _meta_triplet(meta, "mean", DEFAULT_MEAN)
        self.std = _meta_triplet(meta, "std", DEFAULT_STD)
        self.min_depth = float(min_depth) if min_depth is not None else _meta_float(meta, "min_depth",
                                                                                     DEFAULT_MIN_DEPTH_M)
        self.max_depth = float(max_depth) if max_depth is not None else _meta_float(meta, "max_depth",
                                                                                     DEFAULT_MAX_DEPTH_M)
        if not 0.0 <= self.min_depth < self.max_depth:
            raise ValueError(f"need 0 <= min_depth < max_depth, got {self.min_depth}, {self.max_depth}")
        if upsample not in ("linear", "nearest"):
            raise ValueError(f"upsample must be 'linear' or 'nearest', got {upsample!r}")
        self.upsample = upsample
        self._preprocess = Preprocessor(self._input_hw, self.mean, self.std)
        self.last_latency_ms = float("nan")
        self.last_total_ms = float("nan")

    @property
    def input_hw(self) -> tuple[int, int]:
        """Network input (height, width)."""
        return self._input_hw

    @property
    def model_version(self) -> str:
        """Model name and the first 12 hex digits of its weights' sha256."""
        return str(self.metadata.get("version") or "unknown")

    @abstractmethod
    def _infer(self, nchw: np.ndarray) -> np.ndarray:
        """Run the network on a 1x3xHxW float32 input; return its depth (any shape ending in HxW)."""

    def predict(self, rgb: np.ndarray) -> np.ndarray:
        """Metric depth (float32 HxW metres, NaN = invalid) for one rgb8 frame, at the frame's resolution."""
        start = time.perf_counter()
        nchw = self._preprocess(rgb)
        infer_start = time.perf_counter()
        raw = self._infer(nchw)
        infer_end = time.perf_counter()
        depth = postprocess_depth(raw, rgb.shape[:2], self.min_depth, self.max_depth, self.upsample)
        self.last_latency_ms = (infer_end - infer_start) * 1e3
        self.last_total_ms = (time.perf_counter() - start) * 1e3
        return depth

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(version={self.model_version!r}, input_hw={self.input_hw}, "
                f"backend={self.backend!r}, depth=[{self.min_depth}, {self.max_depth}] m)")


def select_providers(requested: Sequence[str]) -> list[str]:
    """Keep the requested ONNX Runtime providers that exist here; warn and fall back to CPU for the others."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    requested = [requested] if isinstance(requested, str) else list(requested)
    chosen = [name for name in requested if name in available]
    missing = [name for name in requested if name not in available]
    if missing:
        warnings.warn(f"ONNX Runtime providers {missing} are not available (available: {available}); "
                      f"{'using ' + str(chosen + ['CPUExecutionProvider']) if chosen else 'falling back to CPU'}",
                      RuntimeWarning, stacklevel=3)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def read_onnx_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX model file (strings), read through ONNX Runtime."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = _open_session(Path(path), options, ["CPUExecutionProvider"])
    return dict(session.get_modelmeta().custom_metadata_map)


def open_rover_session(path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 2,
                       ) -> Any:  # noqa: ANN401 - an onnxruntime.InferenceSession
    """An ONNX Runtime session set up as on a rover: ``threads`` intra-op threads that sleep between runs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ORT's worker threads spin-wait between runs by default; on a 2-4 core rover that steals the
    # cores the ROS executor and the camera driver need, so they sleep instead.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return _open_session(Path(path), options, select_providers(providers))


def _open_session(path: Path, options: Any, providers: list[str]) -> Any:
    import onnxruntime as ort

    if not path.is_file():
        raise ModelLoadError(f"model file {str(path)!r} does not exist")
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as error:  # ORT raises its own pybind exception types
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"cannot load ONNX model {str(path)!r}: {detail[:300]}") from error


class OnnxDepthEngine(DepthEngine):
    """Depth from an ONNX model through ONNX Runtime; normalisation and depth range from its metadata_props."""

    backend = "onnxruntime"

    #: Inputs beyond the image this engine feeds (a subclass's); a plain depth model has none.
    extra_inputs: tuple[str, ...] = ()

    def __init__(self, path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 2,
                 min_depth: float | None = None, max_depth: float | None = None, upsample: str = "linear",
                 session: Any = None) -> None:  # noqa: ANN401 - an onnxruntime.InferenceSession
        self.path = Path(path)
        # ``session``: already opened by :func:`load_engine` (which looks at the inputs to choose the engine)
        self.session = session if session is not None else open_rover_session(self.path, providers, threads)
        self.providers = self.session.get_providers()
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        where = f"ONNX model {str(self.path)!r}"
        if len(inputs) != 1 + len(self.extra_inputs) or len(outputs) < 1:
            raise ModelLoadError(f"{where} must have one image input and a depth output, "
                                 f"has {len(inputs)} inputs and {len(outputs)} outputs")
        shape = inputs[0].shape
        if len(shape) != 4 or shape[1] != 3:
            raise ModelLoadError(f"{where} input {inputs[0].name!r} must be Nx3xHxW, got {shape}")
        if inputs[0].type != "tensor(float)":
            raise ModelLoadError(f"{where} input {inputs[0].name!r} must be float32, got {inputs[0].type}")
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        if isinstance(shape[2], int) and isinstance(shape[3], int):
            input_hw = (shape[2], shape[3])
        else:
            input_hw = meta_input_hw(meta)
            if input_hw is None:
                raise ModelLoadError(f"{where} has a dynamic input size {shape} and no input_hw in its metadata")
        out_shape = outputs[0].shape
        if len(out_shape) not in (3, 4) or (len(out_shape) == 4 and isinstance(out_shape[1], int)
                                            and out_shape[1] != 1):
            raise ModelLoadError(f"{where} output {outputs[0].name!r} must be Nx1xHxW depth, got {out_shape}")
        if not meta.get("version"):
            name = meta.get("model_name") or self.path.stem
            meta["version"] = f"{name}-{(meta.get('weights_sha256') or file_sha256(self.path))[:12]}"
        self._input_name = inputs[0].name
        self._output_name = outputs[0].name
        super().__init__(input_hw, meta, min_depth, max_depth, upsample)

    def _infer(self, nchw: np.ndarray) -> np.ndarray:
        return self.session.run([self._output_name], {self._input_name: nchw})[0]


#: Inputs and outputs of a depth model with ICIIA history attention (``models/iciia.py`` exports it).
HISTORY_INPUTS = ("image", "bank", "bank_mask")
HISTORY_OUTPUTS = ("depth", "feature")


class HistoryDepthEngine(OnnxDepthEngine):
    """An ICIIA depth model: each frame is run with the bank of the rover's recent frame features, and its own
    feature then joins the bank (:class:`~forest_perception.history.FeatureBank`, in memory only).

    ``history_size`` frames are kept, at most the graph's bank capacity K (``set_history_size`` clamps and says so);
    0 runs the model with an empty bank every frame. Frames are fed in the order ``predict`` sees them.
    """

    backend = "onnxruntime+history"
    extra_inputs = HISTORY_INPUTS[1:]

    def __init__(self, path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 2,
                 min_depth: float | None = None, max_depth: float | None = None, upsample: str = "linear",
                 session: Any = None, history_size: int | None = None) -> None:  # noqa: ANN401
        from forest_perception.history import FeatureBank

        super().__init__(path, providers, threads, min_depth, max_depth, upsample, session)
        where = f"ONNX model {str(self.path)!r}"
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        if list(inputs) != list(HISTORY_INPUTS) or outputs[:2] != list(HISTORY_OUTPUTS):
            raise ModelLoadError(f"{where} is no history model: inputs {list(inputs)} (need {list(HISTORY_INPUTS)}), "
                                 f"outputs {outputs} (need {list(HISTORY_OUTPUTS)})")
        bank_shape, mask_shape = inputs["bank"].shape, inputs["bank_mask"].shape
        if (len(bank_shape) != 2 or not all(isinstance(v, int) and v > 0 for v in bank_shape)
                or list(mask_shape) != [bank_shape[0]]):
            raise ModelLoadError(f"{where}: bank must be a fixed KxD and bank_mask K, "
                                 f"got {bank_shape} and {mask_shape}")
        self.history_capacity, self.feature_dim = int(bank_shape[0]), int(bank_shape[1])
        self.bank = FeatureBank(self.history_capacity, self.feature_dim)
        self.set_history_size(self.history_capacity if history_size is None else history_size)

    @property
    def history_size(self) -> int:
        """Frames of history kept and attended to (0: none)."""
        return self.bank.capacity

    @property
    def history_frames(self) -> int:
        """Frames in the bank now."""
        return len(self.bank)

    def set_history_size(self, size: int) -> int:
        """Keep ``size`` frames (clamped to the graph's capacity), emptying the bank; returns the size used."""
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 0:
            raise ValueError(f"history_size must be a non-negative integer, got {size!r}")
        used = min(int(size), self.history_capacity)
        if used != size:
            _LOG.warning("%s: history_size %d is above the model's bank capacity %d; using %d", self.path.name, size,
                         self.history_capacity, used)
        self.bank.resize(used)
        return used

    def reset_history(self) -> int:
        """Empty the bank; returns how many frames were dropped."""
        return self.bank.reset()

    def _infer(self, nchw: np.ndarray) -> np.ndarray:
        bank, mask = self.bank.inputs(self.history_capacity)
        if not self.bank.capacity:
            mask[:] = 0.0
        depth, feature = self.session.run(list(HISTORY_OUTPUTS), {"image": nchw, "bank": bank, "bank_mask": mask})
        if self.bank.capacity and np.all(np.isfinite(feature)):
            self.bank.add(feature[0])
        return depth


TORCH_SUFFIXES = (".pt", ".pth")


def load_engine(path: str | Path, backend: str = "auto", providers: Sequence[str] = ("CPUExecutionProvider",),
                threads: int = 2, **kwargs: Any) -> DepthEngine:
    """Open an exported ``.onnx`` depth model with ONNX Runtime (the rover's engine; no torch here).

    PyTorch checkpoints (``.pt``) are opened by :func:`forest_perception.models.torch_engine.load_engine`,
    which takes both kinds.
    """
    path = Path(path)
    if backend == "torch" or (backend == "auto" and path.suffix.lower() in TORCH_SUFFIXES):
        raise ModelLoadError(f"{str(path)!r} is a PyTorch checkpoint: the rover runtime runs exported .onnx "
                             "models; open checkpoints with forest_perception.models.torch_engine.load_engine")
    if backend == "auto" and path.suffix.lower() != ".onnx":
        raise ModelLoadError(f"cannot tell the backend of {str(path)!r} from its suffix {path.suffix.lower()!r}; "
                             "expected .onnx, .pt or .pth, or pass backend='onnxruntime'/'torch'")
    if backend not in ("auto", "onnxruntime", "onnx", "ort"):
        raise ValueError(f"unknown backend {backend!r}; expected 'auto', 'onnxruntime' or 'torch'")
    if not path.is_file():
        raise ModelLoadError(f"model file {str(path)!r} does not exist")
    history_size = kwargs.pop("history_size", None)
    session = open_rover_session(path, providers, threads)
    if [i.name for i in session.get_inputs()] == list(HISTORY_INPUTS):  # ICIIA: the engine keeps the bank
        return HistoryDepthEngine(path, providers=providers, threads=threads, session=session,
                                  history_size=history_size, **kwargs)
    return OnnxDepthEngine(path, providers=providers, threads=threads, session=session, **kwargs)
