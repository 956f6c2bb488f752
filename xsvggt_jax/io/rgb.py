"""Frames in [0, 1] to 8-bit colours: the one conversion every writer uses."""

from __future__ import annotations

import numpy as np


def to_uint8_rgb(images: np.ndarray) -> np.ndarray:
    """Channels-first images [..., 3, H, W] in [0, 1] -> channels-last colours [..., H, W, 3] uint8
    (rounded, clipped; NaN becomes 0)."""
    images = np.asarray(images)
    if images.ndim < 3 or images.shape[-3] != 3:
        raise ValueError(f"images must be [..., 3, H, W], got {images.shape}")
    rgb = np.nan_to_num(np.moveaxis(images, -3, -1).astype(np.float32), nan=0.0)
    return np.clip(np.rint(rgb * np.float32(255)), 0, 255).astype(np.uint8)
