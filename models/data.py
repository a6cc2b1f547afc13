"""Torch dataset of RGB/depth pairs in the forest dataset layout, with seeded train-time augmentation.

Frames are resized to the network input (depth by nearest neighbour); splits are by segment or run, never
by frame. Details in docs/training.md.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from forest_perception.cli_args import describe_error
from forest_perception.dataset_tools.layout import (
    Segment,
    check_depth_encoding,
    iter_segments,
    load_frame,
    read_segment,
)
from forest_perception.dataset_tools.settings import DatasetSettings
from forest_perception.depth_geometry import camera_matrix_from_hfov, tilt_depth, tilt_image
from forest_perception.frames import CAMERA_HFOV_DEG
from forest_perception.inference import DEFAULT_MEAN, DEFAULT_STD
from forest_perception.models.frame_cache import MAX_CACHED_DEPTH_M, FrameCache
from forest_perception.models.networks.layers import check_input_hw as check_network_input

MIN_DEPTH_M = 0.1
"""Depth below this (metres) is treated as invalid: the RealSense gives no usable data that close."""


class FrameLoadError(ValueError):
    """A frame's RGB or depth file cannot be read; the message names the file and the frame."""


def image_normalisation() -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """(mean, std) per RGB channel of images scaled to [0, 1], as the networks and the rover runtime expect."""
    return DEFAULT_MEAN, DEFAULT_STD


def check_input_hw(input_hw: Sequence[int]) -> tuple[int, int]:
    """A network input size (height, width) as two ints; ``ValueError`` unless both are positive multiples of 16."""
    try:
        height, width = (int(v) for v in input_hw)
    except (TypeError, ValueError):
        raise ValueError(f"input size must be two integers (height, width), got {input_hw!r}") from None
    check_network_input(height, width)
    return height, width


# --------------------------------------------------------------------------- segments


def _as_path_list(source: str | os.PathLike | Iterable) -> list:
    if isinstance(source, (str, os.PathLike, Segment)):
        return [source]
    return list(source)


def collect_segments(
    source: str | os.PathLike | Segment | Iterable, settings: DatasetSettings | None = None
) -> list[Segment]:
    """Segments from a dataset root, a segment folder, a ``Segment``, or a list of those.

    Each dataset is read as its ``forest_dataset.yaml`` says (depth encoding, column aliases), with
    ``settings`` (e.g. from command-line flags) over it; only the file-name column is required.
    Raises ``FileNotFoundError`` for a path that does not exist and ``ValueError`` when a
    root holds no ``Run-<N>/<segment>`` folders.
    """
    segments: list[Segment] = []
    for item in _as_path_list(source):
        if isinstance(item, Segment):
            segments.append(item)
            continue
        path = Path(item)
        if not path.is_dir():
            raise FileNotFoundError(f"dataset folder {path} does not exist")
        if (path / "metadata.csv").is_file():
            segments.append(read_segment(path, settings=settings))
            continue
        found = list(iter_segments(path, settings=settings))
        if not found:
            raise ValueError(f"dataset folder {path} holds no Run-<N>/<segment>/metadata.csv segments")
        segments.extend(found)
    return segments


def split_segments(
    source: str | os.PathLike | Iterable,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    by: str = "segment",
    settings: DatasetSettings | None = None,
) -> tuple[list[Segment], list[Segment], list[Segment]]:
    """Split segments into (train, val, test) by segment or by run (``by="run"``), never by frame.

    Groups are shuffled with ``seed``; a non-zero fraction gets at least one group and
    train always keeps at least one. Raises ``ValueError`` when there are too few groups.
    """
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not (math.isfinite(value) and 0.0 <= value < 1.0):
            raise ValueError(f"{name} must be within [0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction + test_fraction}")
    if by not in ("segment", "run"):
        raise ValueError(f"split by must be 'segment' or 'run', got {by!r}")
    segments = [s for s in collect_segments(source, settings) if len(s) > 0]
    groups: dict[str, list[Segment]] = {}
    for s in segments:
        key = str(s.path.parent) if by == "run" else str(s.path)
        groups.setdefault(key, []).append(s)
    keys = sorted(groups)
    wanted = [int(test_fraction > 0), int(val_fraction > 0)]
    if len(keys) < 1 + sum(wanted):
        raise ValueError(
            f"need at least {1 + sum(wanted)} {by}s with frames to split train/val/test "
            f"(val_fraction={val_fraction}, test_fraction={test_fraction}), found {len(keys)}"
        )
    order = np.random.default_rng(seed).permutation(len(keys))
    keys = [keys[i] for i in order]
    n_test = max(wanted[0], round(test_fraction * len(keys)))
    n_val = max(wanted[1], round(val_fraction * len(keys)))
    while n_test + n_val > len(keys) - 1:
        if n_val >= n_test and n_val > wanted[1]:
            n_val -= 1
        else:
            n_test -= 1
    test_keys, val_keys, train_keys = keys[:n_test], keys[n_test : n_test + n_val], keys[n_test + n_val :]

    def pick(chosen: list[str]) -> list[Segment]:
        return sorted((s for k in chosen for s in groups[k]), key=lambda s: (s.run or 0, str(s.path)))

    return pick(train_keys), pick(val_keys), pick(test_keys)


# --------------------------------------------------------------------------- augmentation


def resize_pair(rgb: np.ndarray, depth: np.ndarray, input_hw: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Resize RGB (area) and depth (nearest: never blends valid and invalid pixels) to (height, width)."""
    height, width = int(input_hw[0]), int(input_hw[1])
    if rgb.shape[:2] != (height, width):
        interpolation = cv2.INTER_AREA if rgb.shape[0] >= height else cv2.INTER_LINEAR
        rgb = cv2.resize(rgb, (width, height), interpolation=interpolation)
    if depth.shape[:2] != (height, width):
        depth = cv2.resize(depth, (width, height), interpolation=cv2.INTER_NEAREST)
    return rgb, depth


def colour_jitter(
    rgb: np.ndarray,
    rng: np.random.Generator,
    brightness: float = 0.2,
    contrast: float = 0.2,
    saturation: float = 0.2,
    hue: float = 0.05,
) -> np.ndarray:
    """Random brightness, contrast, saturation and hue change of an RGB float image in [0, 1]."""
    out = rgb * rng.uniform(1 - brightness, 1 + brightness)
    mean = out.mean()
    out = (out - mean) * rng.uniform(1 - contrast, 1 + contrast) + mean
    grey = out @ np.array([0.299, 0.587, 0.114], np.float32)
    out = (out - grey[..., None]) * rng.uniform(1 - saturation, 1 + saturation) + grey[..., None]
    out = np.clip(out, 0.0, 1.0).astype(np.float32)
    shift = rng.uniform(-hue, hue)
    if shift:
        hsv = cv2.cvtColor(out, cv2.COLOR_RGB2HSV)  # float input: hue in degrees [0, 360)
        hsv[..., 0] = np.mod(hsv[..., 0] + 360.0 * shift, 360.0)
        out = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class PhotometricAugment:
    """Train-time changes of the image alone (the depth stays true): each applied with its probability.

    White balance (a gain per channel), colour jitter (brightness, contrast, saturation, hue), gamma, Gaussian blur
    and sensor noise, in that order; the image stays in [0, 1]. They stand in for other cameras, exposures and
    light than those of the training forests.
    """

    white_balance_p: float = 0.5
    white_balance: float = 0.12
    """each channel's gain is drawn from [1 - white_balance, 1 + white_balance]"""
    jitter_p: float = 0.8
    brightness: float = 0.25
    contrast: float = 0.25
    saturation: float = 0.3
    hue: float = 0.05
    gamma_p: float = 0.5
    gamma: tuple[float, float] = (0.7, 1.5)
    """``image ** g`` with ``g`` log-uniform in this range"""
    blur_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.3, 1.2)
    noise_p: float = 0.3
    noise_std: float = 0.03
    """Gaussian noise with a standard deviation drawn from [0, noise_std] (image units)"""

    def __call__(self, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The changed copy of an RGB float32 image in [0, 1]."""
        out = np.asarray(rgb, np.float32)
        if rng.random() < self.white_balance_p:
            gains = rng.uniform(1 - self.white_balance, 1 + self.white_balance, 3).astype(np.float32)
            out = np.clip(out * gains, 0.0, 1.0)
        if rng.random() < self.jitter_p:
            out = colour_jitter(out, rng, self.brightness, self.contrast, self.saturation, self.hue)
        if rng.random() < self.gamma_p:
            gamma = math.exp(rng.uniform(math.log(self.gamma[0]), math.log(self.gamma[1])))
            out = np.power(np.clip(out, 0.0, 1.0), gamma, dtype=np.float32)
        if rng.random() < self.blur_p:
            sigma = float(rng.uniform(*self.blur_sigma))
            out = cv2.GaussianBlur(np.ascontiguousarray(out), (0, 0), sigmaX=sigma)
        if rng.random() < self.noise_p:
            std = float(rng.uniform(0.0, self.noise_std))
            out = np.clip(out + rng.normal(0.0, std, out.shape).astype(np.float32), 0.0, 1.0)
        return np.ascontiguousarray(out, dtype=np.float32)


DEFAULT_PHOTOMETRIC = PhotometricAugment()
MAX_ROLL_DEG = 45.0
"""the largest ``roll_deg`` accepted: beyond it a frame is more corner than forest"""


def roll_pair(rgb: np.ndarray, depth: np.ndarray, angle_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Image and depth as the camera would see them rolled by ``angle_deg`` about its optical axis.

    A roll about the optical axis moves pixels but keeps every point's depth along that axis, so the depth map
    turns with the image and its values stay true (REP 118 depth is along optical z). The turn is about the image
    centre (the principal point of a centred camera, square pixels). The RGB corners that come from outside the
    frame are mirrored in; their depth is NaN (left out of the loss).
    """
    height, width = depth.shape[:2]
    matrix = cv2.getRotationMatrix2D(((width - 1) / 2.0, (height - 1) / 2.0), float(angle_deg), 1.0)
    rgb = cv2.warpAffine(np.ascontiguousarray(rgb), matrix, (width, height), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REFLECT_101)
    depth = cv2.warpAffine(np.ascontiguousarray(depth, dtype=np.float32), matrix, (width, height),
                           flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=float("nan"))
    return rgb, depth


MAX_PITCH_DEG = 20.0
"""the largest ``pitch_deg`` accepted: beyond it a rover camera sees mostly sky or mostly ground"""


def pitch_pair(rgb: np.ndarray, depth: np.ndarray, angle_deg: float,
               hfov_deg: float = CAMERA_HFOV_DEG) -> tuple[np.ndarray, np.ndarray]:
    """Image and depth as the camera would see them tilted by ``angle_deg`` about its x axis (positive: nose down).

    A pure rotation of a pinhole camera (square pixels, principal point at the centre, horizontal field of view
    ``hfov_deg``) moves pixels by the homography K R K^-1. Unlike a roll it changes depth along the optical axis;
    ``depth_geometry.tilt_depth`` recomputes it, so the values stay true metres (REP 118). The rows that come from
    outside the frame are mirrored in for the image; their depth is NaN (left out of the loss).
    """
    height, width = depth.shape[:2]
    k = camera_matrix_from_hfov(width, height, hfov_deg)
    pitch = math.radians(float(angle_deg))
    return tilt_image(rgb, k, pitch), tilt_depth(depth, k, pitch)


def augment_pair(
    rgb: np.ndarray,
    depth: np.ndarray,
    rng: np.random.Generator,
    flip_p: float = 0.5,
    photometric: PhotometricAugment | None = DEFAULT_PHOTOMETRIC,
    roll_deg: float = 0.0,
    pitch_deg: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Train-time augmentation of an RGB float [0, 1] image and its depth.

    Horizontal flip moves image and depth together (a mirrored scene has the same metric depth for the same
    camera); with ``roll_deg`` > 0 both turn by an angle drawn uniformly from [-roll_deg, roll_deg] about the
    optical axis (``roll_pair``: a rover tilted sideways on a slope; depth along the axis is unchanged); with
    ``pitch_deg`` > 0 the camera tilts up or down by an angle drawn from [-pitch_deg, pitch_deg] (``pitch_pair``:
    the horizon moves, depth is recomputed for the new axis); ``photometric`` touches only the image. Nothing crops
    or rescales: a crop resized back to the input is a longer focal length, which would teach the network wrong
    metric depth for the rover's camera.
    """
    if rng.random() < flip_p:
        rgb = rgb[:, ::-1]
        depth = depth[:, ::-1]
    if roll_deg > 0:
        rgb, depth = roll_pair(rgb, depth, float(rng.uniform(-roll_deg, roll_deg)))
    if pitch_deg > 0:
        rgb, depth = pitch_pair(rgb, depth, float(rng.uniform(-pitch_deg, pitch_deg)))
    if photometric is not None:
        rgb = photometric(np.ascontiguousarray(rgb), rng)
    return np.ascontiguousarray(rgb), np.ascontiguousarray(depth)


# --------------------------------------------------------------------------- dataset


class ForestDepthDataset(Dataset):
    """RGB/depth pairs from one or more dataset roots or segments, ready for a depth network.

    Each item is a dict: ``image`` float32 3xHxW normalised, ``depth`` float32 1xHxW metres
    with 0 where invalid (NaN, <= ``min_depth``), ``valid`` bool 1xHxW (``min_depth < d <=
    max_depth``), ``segment`` (id like ``'1a'``), ``stem`` and ``index``.

    Frames are read when an item is asked for (nothing is held in memory); with ``cache`` (a folder) they come
    from the memory-mapped shards of ``models.frame_cache`` once ``prepare_cache`` has built them.
    ``photometric`` is the image augmentation used when ``augment`` (horizontal flip is always part of it);
    ``roll_deg`` > 0 adds a random roll of image and depth about the optical axis, ``pitch_deg`` > 0 a random tilt
    about the camera's x axis (``augment_pair``).
    """

    def __init__(
        self,
        source: str | os.PathLike | Segment | Iterable,
        input_hw: Sequence[int] = (240, 320),
        augment: bool = False,
        max_depth: float = 10.0,
        seed: int = 0,
        min_depth: float = MIN_DEPTH_M,
        settings: DatasetSettings | None = None,
        cache: str | os.PathLike | None = None,
        photometric: PhotometricAugment | None = DEFAULT_PHOTOMETRIC,
        roll_deg: float = 0.0,
        pitch_deg: float = 0.0,
    ) -> None:
        self.input_hw = check_input_hw(input_hw)
        if not (math.isfinite(roll_deg) and 0.0 <= roll_deg <= MAX_ROLL_DEG):
            raise ValueError(f"roll_deg must be within [0, {MAX_ROLL_DEG:g}] degrees, got {roll_deg}")
        if not (math.isfinite(pitch_deg) and 0.0 <= pitch_deg <= MAX_PITCH_DEG):
            raise ValueError(f"pitch_deg must be within [0, {MAX_PITCH_DEG:g}] degrees, got {pitch_deg}")
        if not (math.isfinite(max_depth) and max_depth > min_depth > 0):
            raise ValueError(f"need 0 < min_depth < max_depth, got min_depth={min_depth}, max_depth={max_depth}")
        self.segments = [s for s in collect_segments(source, settings) if len(s) > 0]
        check_depth_encoding(self.segments)  # an 8-bit dataset without a stated scale: say so now, not mid-epoch
        self.index = [(si, fi) for si, s in enumerate(self.segments) for fi in range(len(s))]
        if not self.index:
            raise ValueError(f"no frames found in {_describe_source(source)}")
        self.augment = bool(augment)
        self.photometric = photometric
        self.roll_deg = float(roll_deg)
        self.pitch_deg = float(pitch_deg)
        if cache is not None and max_depth > MAX_CACHED_DEPTH_M:
            raise ValueError(f"--max-depth {max_depth:g} is beyond the {MAX_CACHED_DEPTH_M:g} m the frame cache "
                             "stores (uint16 millimetres); lower --max-depth or train without --cache")
        self.cache = FrameCache(cache, self.segments, self.input_hw) if cache is not None else None
        self.max_depth = float(max_depth)
        self.min_depth = float(min_depth)
        self.seed = int(seed)
        self.epoch = 0
        mean, std = image_normalisation()
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)

    def set_epoch(self, epoch: int) -> None:
        """Choose the augmentation draw of an epoch (call before iterating a loader)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.index)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw frame ``i``: RGB HxWx3 uint8 and depth HxW float32 metres (NaN invalid), full size."""
        si, fi = self.index[i]
        rgb, depth, _ = load_frame(self.segments[si], fi)
        return rgb, depth

    def load_resized(self, si: int, fi: int) -> tuple[np.ndarray, np.ndarray]:
        """Frame ``fi`` of segment ``si`` at the input size: from the frame cache when it holds it, else decoded and
        resized (``resize_pair``). ``FrameLoadError`` naming the frame when its files cannot be read."""
        if self.cache is not None:
            cached = self.cache.read(si, fi)
            if cached is not None:
                return cached
        segment = self.segments[si]
        try:
            rgb, depth, _ = load_frame(segment, fi)
        except (OSError, ValueError) as exc:
            raise FrameLoadError(f"frame {segment.frames[fi].stem} of segment {segment.segment_id}: "
                                 f"{describe_error(exc)}; fix or remove that frame") from exc
        return resize_pair(rgb, depth, self.input_hw)

    def prepare_cache(self, workers: int = 0, progress: bool = False) -> int:
        """Build the frame cache's missing shards (no-op without a cache); returns the frames written."""
        if self.cache is None:
            return 0
        return self.cache.build(self.load_resized, workers=workers, progress=progress)

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for a dataset of {len(self)} frames")
        i %= len(self)
        rgb, depth = self.load_resized(*self.index[i])
        image = rgb.astype(np.float32) / 255.0
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            image, depth = augment_pair(image, depth, rng, photometric=self.photometric, roll_deg=self.roll_deg,
                                         pitch_deg=self.pitch_deg)
        depth = np.where(np.isfinite(depth) & (depth > self.min_depth), depth, 0.0).astype(np.float32)
        valid = (depth > 0) & (depth <= self.max_depth)
        image = (image - self.mean) / self.std
        si, fi = self.index[i]
        segment = self.segments[si]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "depth": torch.from_numpy(depth[None]),
            "valid": torch.from_numpy(valid[None]),
            "segment": segment.segment_id,
            "stem": segment.frames[fi].stem,
            "index": i,
        }

    def describe(self) -> str:
        """One line: frames, segments, input size."""
        ids = ",".join(s.segment_id for s in self.segments[:8]) + ("..." if len(self.segments) > 8 else "")
        line = f"{len(self)} frames in {len(self.segments)} segment(s) [{ids}] at {self.input_hw[1]}x{self.input_hw[0]}"
        return f"{line}; {self.cache.describe()}" if self.cache is not None else line


def _describe_source(source: object) -> str:
    names = [str(s.path) if isinstance(s, Segment) else str(s) for s in _as_path_list(source)]
    return ", ".join(names) if names else "an empty list of segments"


def denormalise_image(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """Normalised 3xHxW image -> HxWx3 uint8 RGB, for pictures."""
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    mean, std = image_normalisation()
    rgb = array.transpose(1, 2, 0) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return np.ascontiguousarray((np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))
