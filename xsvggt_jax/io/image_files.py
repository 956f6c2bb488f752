"""Frame sources read from files: a folder of images (or one image) and a preprocessed `.npz`.

Both are lazy (`io.frames`): a folder source reads every image's header when it is opened and
decodes one image per frame when iterated; an `.npz` source streams its `images` array out of the
zip member one frame at a time. `load_and_preprocess_images` is upstream's eager function.
"""

from __future__ import annotations

import logging
import math
import re
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from xsvggt_jax.io.frames import (DEFAULT_TARGET, PATCH, FrameError, FrameInfo, FrameSource, Target, check_args,
                                  check_size, common_size, frame_info_for, harmonize_frames, pad_frame,
                                  preprocess_image)

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp"})


def _natural_key(path: Path) -> list:
    return [(0, int(t), t) if t.isdigit() else (1, 0, t.lower()) for t in re.split(r"(\d+)", path.name) if t]


def list_images(folder: Path) -> list[Path]:
    """Supported images directly in `folder` (not recursive, dotfiles skipped), natural order."""
    files = [p for p in folder.iterdir()
             if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()]
    return sorted(files, key=_natural_key)


def _image_header_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as img:  # reads the header only, no pixel decode
            return img.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise FrameError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e


def _decode_image(path: Path, mode: str, target: Target) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img.load()
            return preprocess_image(img, mode, target, name=str(path))
    except FrameError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise FrameError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e


def load_and_preprocess_images(paths: Sequence[str | Path], mode: str = "crop",
                               target: Target = DEFAULT_TARGET) -> np.ndarray:
    """Upstream's function, eager: [S, H, W, 3] float32 (upstream lays it out [S, 3, H, W])."""
    if not paths:
        raise FrameError("at least one image is required")
    return np.stack(harmonize_frames([_decode_image(Path(p), mode, target) for p in paths]))


class ImageFolderSource(FrameSource):
    """A folder of images (or a single image file), decoded one by one in natural order.

    A header-only first pass computes every image's preprocessed size, so mixed sizes can be padded
    to the common (max) size lazily, exactly as upstream pads after loading everything."""

    def __init__(self, paths: Sequence[Path], name: str, mode: str = "crop", target: Target = DEFAULT_TARGET):
        check_args(mode, target)
        self.paths = list(paths)
        self.mode, self.target = mode, target
        self.sizes = []
        originals = []
        for p in self.paths:
            w, h = _image_header_size(p)
            originals.append((w, h))
            self.sizes.append(check_size(w, h, mode, target, str(p)))
        height, width = common_size(self.sizes, [p.name for p in self.paths])
        infos = [frame_info_for(p.name, w, h, mode, target, (height, width), index=i)
                 for i, (p, (w, h)) in enumerate(zip(self.paths, originals))]
        super().__init__(name, len(self.paths), height, width, frames_info=infos)

    def __iter__(self) -> Iterator[np.ndarray]:
        for path, size in zip(self.paths, self.sizes):
            frame = _decode_image(path, self.mode, self.target)
            if frame.shape[:2] != size:  # header lied (e.g. file changed since open_frames)
                raise FrameError(f"{path}: decoded to {frame.shape[0]}x{frame.shape[1]}, "
                                 f"header said {size[0]}x{size[1]}")
            yield pad_frame(frame, self.height, self.width)

    def iter_originals(self) -> Iterator[Path]:
        yield from self.paths


def _read_npy_header(f, path: Path):
    """Read an .npy header from file object `f`, leaving it at the data; (shape, fortran, dtype)."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise FrameError(f"{path}: 'images' uses .npy format version {version}, unsupported for streaming")


class NpzSource(FrameSource):
    """An `.npz` with `images` [S, 3, H, W] float in [0, 1] (already preprocessed) and optional
    `query_points` [N, 2]. Frames are streamed out of the zip member one at a time (and yielded
    [H, W, 3] like every source's); `open_frames`
    makes one streaming pass to check every value is finite (same checks as the CLI's loader)."""

    def __init__(self, path: Path, stride: int = 1):
        self.path, self.stride = path, stride
        try:
            with zipfile.ZipFile(path) as zf:
                names = set(zf.namelist())
                if "images.npy" not in names:
                    found = sorted(n.removesuffix(".npy") for n in names)
                    raise FrameError(f"{path}: no 'images' array (found: {found or 'none'})")
                with zf.open("images.npy") as f:
                    shape, fortran, dtype = _read_npy_header(f, path)
        except FrameError:
            raise
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise FrameError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from e
        if dtype.kind != "f":
            raise FrameError(f"{path}: 'images' must be float in [0, 1], got dtype {dtype}")
        if len(shape) != 4 or shape[1] != 3 or shape[0] < 1:
            raise FrameError(f"{path}: 'images' must have shape [S, 3, H, W] with S >= 1, got {list(shape)}")
        s, _, h, w = shape
        if h < PATCH or w < PATCH or h % PATCH or w % PATCH:
            raise FrameError(f"{path}: 'images' {list(shape)}: frame size {h}x{w} must be positive multiples "
                             f"of the patch size {PATCH}")
        if fortran:
            raise FrameError(f"{path}: 'images' is stored in Fortran order; save it C-contiguous")
        self._shape, self._dtype = tuple(shape), dtype
        qp = None
        if "query_points.npy" in names:
            try:
                with np.load(path, allow_pickle=False) as npz:
                    qp = npz["query_points"]
            except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
                raise FrameError(f"{path}: unreadable 'query_points' ({type(e).__name__}: {e})") from e
            if not np.issubdtype(qp.dtype, np.number) or qp.ndim != 2 or qp.shape[1] != 2 or qp.shape[0] < 1:
                raise FrameError(f"{path}: 'query_points' must have shape [N, 2] with N >= 1, "
                                 f"got {list(qp.shape)} ({qp.dtype})")
            if not np.all(np.isfinite(qp)):
                raise FrameError(f"{path}: 'query_points' contains non-finite values")
            qp = qp.astype(np.float32)
        infos = [FrameInfo(f"frame_{i:06d}.png", w, h, index=i) for i in range(0, s, stride)]
        super().__init__(str(path), len(infos), h, w, qp, infos)
        self._validate_values()

    def _raw_frames(self, stride: int) -> Iterator[tuple[int, np.ndarray]]:
        s, c, h, w = self._shape
        nbytes = c * h * w * self._dtype.itemsize
        try:
            with zipfile.ZipFile(self.path) as zf, zf.open("images.npy") as f:
                _read_npy_header(f, self.path)
                for i in range(s):
                    buf = f.read(nbytes)
                    if len(buf) != nbytes:
                        raise FrameError(f"{self.path}: 'images' truncated at frame {i} of {s}")
                    if i % stride == 0:
                        yield i, np.frombuffer(buf, self._dtype).reshape(c, h, w)
        except FrameError:
            raise
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise FrameError(f"{self.path}: cannot read 'images' ({type(e).__name__}: {e})") from e

    def _validate_values(self) -> None:
        lo, hi = math.inf, -math.inf
        for i, frame in self._raw_frames(1):
            bad = ~np.isfinite(frame)
            if bad.any():
                raise FrameError(f"{self.path}: 'images' frame {i} contains {int(bad.sum())} non-finite values")
            lo, hi = min(lo, float(frame.min())), max(hi, float(frame.max()))
        if lo < 0.0 or hi > 1.0:
            log.warning("%s: 'images' values span [%g, %g], expected [0, 1]", self.path, lo, hi)

    def __iter__(self) -> Iterator[np.ndarray]:
        for _, frame in self._raw_frames(self.stride):
            yield np.ascontiguousarray(frame.transpose(1, 2, 0), np.float32)  # a copy: frombuffer is read-only
