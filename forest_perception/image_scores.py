"""Per-frame image scores shared by the rover and the dataset tools: sharpness and a compact view descriptor.

Pure numerics on numpy/OpenCV arrays (no ROS): ``forest_perception.triggers`` scores live frames with them on
the rover, ``dataset_tools`` curation scores recorded frames with exactly the same functions
(docs/dataset_tools.md, "curate", step 1).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

THUMB_SIZE = (16, 12)
"""Grayscale thumbnail of the descriptor, (width, height)."""
HIST_BINS = (9, 4)
"""Hue x saturation bins of the descriptor's colour histogram."""
DESCRIPTOR_SIZE = THUMB_SIZE[0] * THUMB_SIZE[1] + HIST_BINS[0] * HIST_BINS[1]


def sharpness(gray: np.ndarray) -> tuple[float, float]:
    """(variance of the Laplacian, Tenengrad = mean squared 3x3 Sobel gradient) of a uint8 gray image."""
    if gray.dtype != np.uint8 or gray.ndim != 2:
        raise ValueError(f"sharpness needs an HxW uint8 grayscale image, got shape {gray.shape} dtype {gray.dtype}")
    _, std = cv2.meanStdDev(cv2.Laplacian(gray, cv2.CV_16S))
    gx = cv2.Sobel(gray, cv2.CV_16S, 1, 0)
    gy = cv2.Sobel(gray, cv2.CV_16S, 0, 1)
    tenengrad = (cv2.norm(gx, cv2.NORM_L2SQR) + cv2.norm(gy, cv2.NORM_L2SQR)) / gray.size
    return float(std[0, 0] ** 2), float(tenengrad)


def frame_descriptor(bgr: np.ndarray) -> np.ndarray:
    """Unit-norm ``float32`` descriptor of an 8-bit colour image (OpenCV BGR order).

    Half its energy is a 16x12 grayscale thumbnail of the softened image (zero mean, unit
    norm: the layout of the view, indifferent to exposure and to a shift of a few pixels),
    half a 9x4 hue x saturation histogram (square root of the frequencies, the Hellinger
    embedding: the colours, indifferent to brightness). The Euclidean distance of two
    descriptors is within [0, 2]: ~0.02 for the same view with sensor noise or another
    exposure, ~0.3 for views 0.1 m apart, ~0.8 for views across a forest.
    """
    if bgr.dtype != np.uint8 or bgr.ndim != 3 or bgr.shape[2] != 3:
        raise ValueError(f"frame_descriptor needs an HxWx3 uint8 image, got shape {bgr.shape} dtype {bgr.dtype}")
    small = cv2.resize(bgr, (THUMB_SIZE[0] * 4, THUMB_SIZE[1] * 4), interpolation=cv2.INTER_AREA)
    gray = cv2.GaussianBlur(cv2.cvtColor(small, cv2.COLOR_BGR2GRAY).astype(np.float32), (0, 0), 2.0)
    thumb = cv2.resize(gray, THUMB_SIZE, interpolation=cv2.INTER_AREA).ravel()
    thumb -= thumb.mean()
    norm = float(np.linalg.norm(thumb))
    thumb = thumb / norm if norm > 1e-3 else np.zeros_like(thumb)
    hsv = cv2.cvtColor(small, cv2.COLOR_BGR2HSV)
    hist = cv2.calcHist([hsv], [0, 1], None, list(HIST_BINS), [0, 180, 0, 256]).ravel()
    hist = np.sqrt(hist / max(float(hist.sum()), 1.0))
    return (np.concatenate([thumb, hist]) * np.float32(math.sqrt(0.5))).astype(np.float32)


def frame_scores(rgb: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(laplacian_var, tenengrad, descriptor) of an HxWx3 uint8 RGB frame, exactly as scoring its PNG gives."""
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    lap, ten = sharpness(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))
    return lap, ten, frame_descriptor(bgr)
