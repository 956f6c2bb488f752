"""Ground truth in the model's input frame: the camera and depth of a frame after upstream's
`load_and_preprocess_images` (`xsvggt_jax.io.frames.preprocess_image`: resize, then centre crop or
white pad), so that predictions at the model's resolution can be compared pixel for pixel.

Resizing by (sx, sy) maps pixel centres as x' + 0.5 = sx (x + 0.5) (PIL's convention), so with the
project's integer pixel indices fx' = sx fx, cx' = sx (cx + 0.5) - 0.5, then the crop / pad offset is
added. Depth is resampled by nearest neighbour at the source position of each output pixel centre
(never interpolated across depth edges); padded pixels get depth 0 (invalid).
"""

from __future__ import annotations

import numpy as np

from xsvggt_jax.io.frames import preprocess_image, preprocessed_size, resized_size
from xsvggt_jax.data.base import DataError, Sequence


def _layout(width: int, height: int, mode: str, target: int) -> tuple[int, int, int, int, int, int]:
    """(new_w, new_h, left, top, out_w, out_h): resized size, offset of the resized image in the
    output (negative: cropped) and the output size."""
    new_w, new_h = resized_size(width, height, mode, target)
    out_h, out_w = preprocessed_size(width, height, mode, target)
    left = (out_w - new_w) // 2  # > 0 only when padding
    top = (out_h - new_h) // 2 if mode == "pad" else -((new_h - out_h) // 2)  # crop: minus the rows cut
    return new_w, new_h, left, top, out_w, out_h


def preprocess_intrinsics(k: np.ndarray, size: tuple[int, int], mode: str = "crop", target: int = 518) -> np.ndarray:
    """Intrinsics [..., 3, 3] of a (W, H) = size frame -> those of its preprocessed frame."""
    width, height = size
    new_w, new_h, left, top, _, _ = _layout(width, height, mode, target)
    sx, sy = new_w / width, new_h / height
    affine = np.array([[sx, 0, 0.5 * sx - 0.5 + left], [0, sy, 0.5 * sy - 0.5 + top], [0, 0, 1.0]])
    return affine @ np.asarray(k, np.float64)


def preprocess_depth(depth: np.ndarray, mode: str = "crop", target: int = 518) -> np.ndarray:
    """Depth [H, W] -> [H', W'] on the preprocessed frame's pixel grid (nearest; 0 where padded)."""
    height, width = depth.shape
    new_w, new_h, left, top, out_w, out_h = _layout(width, height, mode, target)
    sx, sy = new_w / width, new_h / height
    xs = np.arange(out_w) - left  # positions in the resized image
    ys = np.arange(out_h) - top
    src_x = np.clip(np.floor((xs + 0.5) / sx), 0, width - 1).astype(int)  # source pixel containing the centre
    src_y = np.clip(np.floor((ys + 0.5) / sy), 0, height - 1).astype(int)
    out = depth[src_y[:, None], src_x[None, :]]
    inside = ((xs >= 0) & (xs < new_w))[None, :] & ((ys >= 0) & (ys < new_h))[:, None]
    return np.where(inside, out, 0).astype(np.float32)


def preprocess_frame(seq: Sequence, i: int, mode: str = "crop", target: int = 518
                     ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Frame i of a sequence as the model sees it: (image [H', W', 3] float32, depth [H', W'] or None,
    intrinsics [3, 3] or None). The depth must share the colour frames' camera and size."""
    pil = seq.pil(i)
    image = preprocess_image(pil, mode, target, name=f"{seq.name}/{seq.frame_ids[i]}")
    k = None if seq.intrinsics is None else preprocess_intrinsics(seq.intrinsics[i], pil.size, mode, target)
    depth = None
    if seq.load_depth is not None:
        if seq.depth_intrinsics is not None:
            raise DataError(f"{seq.name}: the depth maps have their own camera; reproject them to the colour "
                            "camera before preprocessing")
        d = seq.depth(i)
        if d.shape != (pil.size[1], pil.size[0]):
            raise DataError(f"{seq.name}/{seq.frame_ids[i]}: depth {d.shape[1]}x{d.shape[0]} does not match the "
                            f"{pil.size[0]}x{pil.size[1]} frame")
        depth = preprocess_depth(d, mode, target)
    return image, depth, k
