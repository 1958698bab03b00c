"""Moving host data (numpy simulator outputs, banks read from disk) to the device where a
model's data live."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["to_device"]


def to_device(
    value: torch.Tensor | np.ndarray, device: torch.device, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``value`` as a tensor on ``device`` (in ``dtype`` if given). A CPU tensor or numpy
    array bound for a CUDA device is staged in pinned (page-locked) memory and copied
    without blocking, so that the copy overlaps the host's next work; on the CPU nothing is
    copied that need not be.

    :param value: a tensor or a numpy array.
    :param torch.device device: the target device.
    :param torch.dtype dtype: the target dtype (default: ``value``'s, numpy's float64 kept).
    """
    tensor = torch.as_tensor(value)
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        if dtype is not None:
            tensor = tensor.to(dtype)  # cast on the host: half the bytes cross for float32
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device=device, dtype=dtype)
