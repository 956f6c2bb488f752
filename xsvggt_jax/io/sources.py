"""`open_frames`: the frame source for an input path (a folder of images, one image, a video, or a
preprocessed `.npz`), with the checks of the options that pick frames (stride, fps)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from xsvggt_jax.io.frames import DEFAULT_TARGET, FrameError, FrameSource, Target, check_args
from xsvggt_jax.io.fsutil import link_problem
from xsvggt_jax.io.image_files import IMAGE_EXTENSIONS, ImageFolderSource, NpzSource, list_images
from xsvggt_jax.io.video import VideoSource

VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".avi", ".mov", ".mkv", ".webm", ".gif", ".mpg", ".mpeg",
                              ".wmv", ".flv", ".ts"})


def open_frames(path: str | Path, *, mode: str = "crop", target: Target = DEFAULT_TARGET,
                fps: float | None = None, stride: int = 1) -> FrameSource:
    """Open `path` (a folder of images, one image, a video, or a preprocessed `.npz`) as a lazy
    `FrameSource`. `mode`/`target` are upstream's preprocessing, `target` a width or a fixed (H, W) frame size
    (`io.frames._layout`; ignored for `.npz`, which is already preprocessed); `stride` keeps every stride-th frame; `fps` resamples a video to that frame rate."""
    path = Path(path)
    check_args(mode, target)
    if not isinstance(stride, (int, np.integer)) or stride < 1:
        raise FrameError(f"stride must be a positive integer, got {stride!r}")
    if fps is not None and (not math.isfinite(fps) or fps <= 0):
        raise FrameError(f"fps must be a positive number, got {fps!r}")
    if fps is not None and stride != 1:
        raise FrameError("give either fps or stride, not both")
    if not path.exists():
        raise FrameError(f"{path}: {link_problem(path) or 'input not found'}")
    suffix = path.suffix.lower()
    if fps is not None and not (path.is_file() and suffix in VIDEO_EXTENSIONS):
        raise FrameError(f"{path}: fps resampling applies to videos only (use stride)")
    if path.is_dir():
        paths = list_images(path)
        if not paths:
            raise FrameError(f"{path}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in folder")
        return ImageFolderSource(paths[::stride], str(path), mode, target)
    if suffix == ".npz":
        return NpzSource(path, stride)
    if suffix in IMAGE_EXTENSIONS:
        return ImageFolderSource([path], str(path), mode, target)
    if suffix in VIDEO_EXTENSIONS:
        return VideoSource(path, mode, target, fps, stride)
    raise FrameError(f"{path}: unsupported input type {suffix or '(no extension)'!r}: expected a folder of "
                     f"images, an image, a video ({', '.join(sorted(VIDEO_EXTENSIONS))}) or an .npz")
