"""Image normalisation for the depth networks in training: RGB in [0, 1], ImageNet statistics, channels first.

The statistics are the rover runtime's (``forest_perception.inference``), so training and inference agree.
"""

from __future__ import annotations

import numpy as np
import torch

from forest_perception.inference import DEFAULT_MEAN, DEFAULT_STD


def normalise_image(rgb: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Normalise RGB for the depth networks: ``(rgb01 - DEFAULT_MEAN) / DEFAULT_STD``, float32, channels first.

    - numpy: channels last, ``HxWx3`` or ``BxHxWx3`` (a camera frame); returns ``3xHxW`` / ``Bx3xHxW`` float32,
      ready for onnxruntime.
    - torch: channels first, ``3xHxW`` or ``Bx3xHxW``; returns the same layout as a float32 tensor.

    ``uint8`` input is scaled by 1/255; float input is taken to be in [0, 1] already.
    """
    if isinstance(rgb, np.ndarray):
        if rgb.ndim not in (3, 4) or rgb.shape[-1] != 3:
            raise ValueError(f"numpy rgb must be HxWx3 or BxHxWx3 (channels last), got shape {rgb.shape}")
        image = rgb.astype(np.float32) / 255.0 if rgb.dtype == np.uint8 else rgb.astype(np.float32)
        mean = np.asarray(DEFAULT_MEAN, dtype=np.float32)
        std = np.asarray(DEFAULT_STD, dtype=np.float32)
        image = (image - mean) / std
        return np.ascontiguousarray(np.moveaxis(image, -1, -3))
    if isinstance(rgb, torch.Tensor):
        if rgb.ndim not in (3, 4) or rgb.shape[-3] != 3:
            raise ValueError(f"torch rgb must be 3xHxW or Bx3xHxW (channels first), got shape {tuple(rgb.shape)}")
        image = rgb.float() / 255.0 if rgb.dtype == torch.uint8 else rgb.float()
        mean = torch.tensor(DEFAULT_MEAN, dtype=torch.float32, device=image.device).view(3, 1, 1)
        std = torch.tensor(DEFAULT_STD, dtype=torch.float32, device=image.device).view(3, 1, 1)
        return (image - mean) / std
    raise TypeError(f"rgb must be a numpy array or a torch tensor, got {type(rgb).__name__}")
