"""Frames in [0, 1] to 8-bit colours: the one conversion every writer uses."""

from __future__ import annotations

import numpy as np


def to_uint8_rgb(images: np.ndarray) -> np.ndarray:
    """Frames [..., H, W, 3] in [0, 1] -> colours [..., H, W, 3] uint8 (rounded, clipped; NaN becomes 0)."""
    images = np.asarray(images)
    if images.ndim < 3 or images.shape[-1] != 3:
        raise ValueError(f"images must be [..., H, W, 3], got {images.shape}")
    rgb = np.nan_to_num(images.astype(np.float32), nan=0.0)
    return np.clip(np.rint(rgb * np.float32(255)), 0, 255).astype(np.uint8)
