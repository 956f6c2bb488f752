"""Input frames for `xsvggt reconstruct INPUT`: image folders, videos and preprocessed `.npz` files.

Preprocessing reproduces upstream StreamVGGT `load_and_preprocess_images(image_path_list, mode)`
bit for bit (PIL bicubic resize, uint8 / 255 in float32, white padding), with the target width as a
parameter (default 518, the published model's).

Every source is read lazily: `open_frames` only reads headers / metadata, and iterating decodes one
frame at a time, so a long video or a large folder is never held in memory as a whole.

Size rule (decided here, upstream has none): the check is made on the size *after* preprocessing,
which is what the model sees. Upstream happily upsamples a tiny image, so a 10x10 photo is accepted
(crop mode makes it 518x518), but an image whose aspect ratio rounds one preprocessed side below one
patch (14 px, e.g. a 1000x10 strip -> 518x0) is rejected with a `FrameError` naming the file.
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

log = logging.getLogger(__name__)

PATCH = 14
DEFAULT_TARGET = 518
MODES = ("crop", "pad")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".avi", ".mov", ".mkv", ".webm", ".gif", ".mpg", ".mpeg",
                              ".wmv", ".flv", ".ts"})
PAD_VALUE = 1.0  # white, as upstream


class FrameError(ValueError):
    """An input that cannot be turned into frames; the message is one line naming the file."""


# ----------------------------------------------------------------------------------------------
# preprocessing (upstream load_and_preprocess_images)
# ----------------------------------------------------------------------------------------------

def _check_args(mode: str, target: int) -> None:
    if mode not in MODES:
        raise FrameError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(target, (int, np.integer)) or target < PATCH or target % PATCH:
        raise FrameError(f"target must be a positive multiple of the patch size {PATCH}, got {target!r}")


def resized_size(width: int, height: int, mode: str = "crop", target: int = DEFAULT_TARGET) -> tuple[int, int]:
    """(new_width, new_height) of upstream's bicubic resize, before crop / pad."""
    _check_args(mode, target)
    if mode == "pad" and width < height:
        return round(width * (target / height) / PATCH) * PATCH, target
    return target, round(height * (target / width) / PATCH) * PATCH


def preprocessed_size(width: int, height: int, mode: str = "crop", target: int = DEFAULT_TARGET) -> tuple[int, int]:
    """(H, W) of the array `preprocess_image` returns for a `width` x `height` image."""
    new_w, new_h = resized_size(width, height, mode, target)
    if mode == "pad":
        return target, target
    return min(new_h, target), new_w


def _check_size(width: int, height: int, mode: str, target: int, name: str) -> tuple[int, int]:
    new_w, new_h = resized_size(width, height, mode, target)
    if new_w < PATCH or new_h < PATCH:
        raise FrameError(f"{name}: image of {width}x{height} px resizes to {new_w}x{new_h} px "
                         f"({mode} mode, target {target}), smaller than one {PATCH}-px patch")
    return preprocessed_size(width, height, mode, target)


def preprocess_image(pil_image: Image.Image, mode: str = "crop", target: int = DEFAULT_TARGET, *,
                     name: str = "image") -> np.ndarray:
    """One PIL image -> float32 [3, H, W] in [0, 1], exactly as upstream preprocesses it."""
    _check_args(mode, target)
    img = pil_image
    if img.mode == "RGBA":
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    img = img.convert("RGB")
    width, height = img.size
    _check_size(width, height, mode, target, name)
    new_w, new_h = resized_size(width, height, mode, target)
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    # torchvision ToTensor: uint8 -> float32, divided by 255 (IEEE division, same rounding as torch)
    arr = np.asarray(img, dtype=np.uint8).astype(np.float32).transpose(2, 0, 1) / np.float32(255.0)
    if mode == "crop" and new_h > target:
        start_y = (new_h - target) // 2
        arr = arr[:, start_y:start_y + target, :]
    if mode == "pad":
        arr = pad_frame(arr, target, target)
    return np.ascontiguousarray(arr, dtype=np.float32)


def pad_frame(frame: np.ndarray, height: int, width: int, value: float = PAD_VALUE) -> np.ndarray:
    """Pad a [3, h, w] frame to [3, height, width] with `value`, centred (extra row/column bottom/right)."""
    h_pad, w_pad = height - frame.shape[1], width - frame.shape[2]
    if h_pad < 0 or w_pad < 0:
        raise ValueError(f"cannot pad a {frame.shape[1]}x{frame.shape[2]} frame to {height}x{width}")
    if h_pad == 0 and w_pad == 0:
        return frame
    top, left = h_pad // 2, w_pad // 2
    return np.pad(frame, ((0, 0), (top, h_pad - top), (left, w_pad - left)),
                  mode="constant", constant_values=np.float32(value))


def common_size(sizes: Sequence[tuple[int, int]], names: Sequence[str] | None = None) -> tuple[int, int]:
    """Max (H, W) over `sizes`; logs upstream's warning when they differ."""
    distinct = sorted(set(sizes))
    if len(distinct) > 1:
        log.warning("found frames of %d different sizes %s (H x W)%s: padding all to the largest, white and "
                    "centred, as upstream does", len(distinct), distinct,
                    f" in {names[0]}..{names[-1]}" if names else "")
    return max(h for h, _ in sizes), max(w for _, w in sizes)


def harmonize_frames(frames: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Upstream's final step: when shapes differ, pad every frame to the max H and max W with white."""
    if not frames:
        return []
    height, width = common_size([(f.shape[1], f.shape[2]) for f in frames])
    return [pad_frame(f, height, width) for f in frames]


def load_and_preprocess_images(paths: Sequence[str | Path], mode: str = "crop",
                               target: int = DEFAULT_TARGET) -> np.ndarray:
    """Upstream's function, eager: [S, 3, H, W] float32."""
    if not paths:
        raise FrameError("at least one image is required")
    return np.stack(harmonize_frames([_decode_image(Path(p), mode, target) for p in paths]))


# ----------------------------------------------------------------------------------------------
# sources
# ----------------------------------------------------------------------------------------------

class FrameSource:
    """Lazily read frames: `.num_frames` (None when unknown), `.height`, `.width`, `.query_points`,
    `.name`; iterating yields float32 [3, height, width] frames, decoding one at a time."""

    def __init__(self, name: str, num_frames: int | None, height: int, width: int,
                 query_points: np.ndarray | None = None):
        self.name = name
        self.num_frames = num_frames
        self.height = height
        self.width = width
        self.query_points = query_points

    def __iter__(self) -> Iterator[np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, num_frames={self.num_frames}, "
                f"{self.height}x{self.width})")


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


def _decode_image(path: Path, mode: str, target: int) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img.load()
            return preprocess_image(img, mode, target, name=str(path))
    except FrameError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise FrameError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e


class ImageFolderSource(FrameSource):
    """A folder of images (or a single image file), decoded one by one in natural order.

    A header-only first pass computes every image's preprocessed size, so mixed sizes can be padded
    to the common (max) size lazily, exactly as upstream pads after loading everything."""

    def __init__(self, paths: Sequence[Path], name: str, mode: str = "crop", target: int = DEFAULT_TARGET):
        _check_args(mode, target)
        self.paths = list(paths)
        self.mode, self.target = mode, target
        self.sizes = []
        for p in self.paths:
            w, h = _image_header_size(p)
            self.sizes.append(_check_size(w, h, mode, target, str(p)))
        height, width = common_size(self.sizes, [p.name for p in self.paths])
        super().__init__(name, len(self.paths), height, width)

    def __iter__(self) -> Iterator[np.ndarray]:
        for path, size in zip(self.paths, self.sizes):
            frame = _decode_image(path, self.mode, self.target)
            if frame.shape[1:] != size:  # header lied (e.g. file changed since open_frames)
                raise FrameError(f"{path}: decoded to {frame.shape[1]}x{frame.shape[2]}, "
                                 f"header said {size[0]}x{size[1]}")
            yield pad_frame(frame, self.height, self.width)


def _resample_indices(num_frames: int | None, src_fps: float, fps: float) -> Iterator[int]:
    """Indices of the frames kept when resampling `src_fps` to `fps`: frame ceil(k * src_fps / fps)
    for k = 0, 1, ... (the first frame at or after each target time k / fps). Unbounded when
    num_frames is None. With fps >= src_fps every frame is kept."""
    ratio = max(src_fps / fps, 1.0)
    k = 0
    while True:
        i = math.ceil(k * ratio - 1e-9)
        if num_frames is not None and i >= num_frames:
            return
        yield i
        k += 1


def _count_resampled(num_frames: int, src_fps: float, fps: float) -> int:
    return sum(1 for _ in _resample_indices(num_frames, src_fps, fps))


def _import_imageio_pyav():
    try:
        import av  # noqa: F401  (the pyav plugin needs it)
        import imageio.v3 as iio
    except ImportError as e:
        raise FrameError(f"reading videos needs imageio and PyAV (pip install imageio av): {e}") from e
    return iio


class VideoSource(FrameSource):
    """A video decoded with imageio's pyav plugin, one frame at a time, every `stride`-th frame or
    resampled to `fps` (using the container's frame rate; exact for constant-frame-rate video).
    `num_frames` comes from the container (None when it does not say, e.g. most mkv/webm)."""

    def __init__(self, path: Path, mode: str = "crop", target: int = DEFAULT_TARGET,
                 fps: float | None = None, stride: int = 1):
        _check_args(mode, target)
        iio = _import_imageio_pyav()
        self.path, self.mode, self.target, self.fps, self.stride = path, mode, target, fps, stride
        try:
            with iio.imopen(path, "r", plugin="pyav") as video:
                props, meta = video.properties(), video.metadata()
                first = next(iter(video.iter()), None)  # decode one frame: proves the stream decodes
        except Exception as e:  # noqa: BLE001 - any decoder failure is the file's problem
            raise FrameError(f"{path}: cannot decode video ({type(e).__name__}: {e})") from e
        if first is None:
            raise FrameError(f"{path}: video has no frames")
        self.src_fps = float(meta.get("fps") or 0.0) or None
        n_src = int(props.n_images) if props.n_images else None
        if fps is not None and self.src_fps is None:
            raise FrameError(f"{path}: frame rate unknown, cannot resample to {fps} fps (use stride instead)")
        height, width = _check_size(first.shape[1], first.shape[0], mode, target, str(path))
        if n_src is None:
            num = None
        elif fps is not None:
            num = _count_resampled(n_src, self.src_fps, fps)
        else:
            num = -(-n_src // stride)
        if fps is not None and fps > self.src_fps:
            log.warning("%s: requested %g fps exceeds the video's %g fps: keeping every frame", path, fps,
                        self.src_fps)
        super().__init__(str(path), num, height, width)

    def __iter__(self) -> Iterator[np.ndarray]:
        iio = _import_imageio_pyav()
        if self.fps is not None:
            wanted = _resample_indices(None, self.src_fps, self.fps)
        else:
            wanted = iter(range(0, 2**62, self.stride))
        want = next(wanted)
        i = -1
        try:
            for i, frame in enumerate(iio.imiter(self.path, plugin="pyav")):
                if i != want:
                    continue
                want = next(wanted)
                out = preprocess_image(Image.fromarray(np.asarray(frame, np.uint8)).convert("RGB"), self.mode,
                                       self.target, name=f"{self.path} frame {i}")
                if out.shape[1:] != (self.height, self.width):
                    raise FrameError(f"{self.path}: frame {i} preprocesses to {out.shape[1]}x{out.shape[2]}, "
                                     f"expected {self.height}x{self.width} (frame size changed mid-video)")
                yield out
        except FrameError:
            raise
        except Exception as e:  # noqa: BLE001
            raise FrameError(f"{self.path}: cannot decode video after frame {i} ({type(e).__name__}: {e})") from e


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
    `query_points` [N, 2]. Frames are streamed out of the zip member one at a time; `open_frames`
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
        super().__init__(str(path), -(-s // stride), h, w, qp)
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
            yield frame.astype(np.float32)  # copies: frombuffer views are read-only


def open_frames(path: str | Path, *, mode: str = "crop", target: int = DEFAULT_TARGET,
                fps: float | None = None, stride: int = 1) -> FrameSource:
    """Open `path` (a folder of images, one image, a video, or a preprocessed `.npz`) as a lazy
    `FrameSource`. `mode`/`target` are upstream's preprocessing (ignored for `.npz`, which is already
    preprocessed); `stride` keeps every stride-th frame; `fps` resamples a video to that frame rate."""
    path = Path(path)
    _check_args(mode, target)
    if not isinstance(stride, (int, np.integer)) or stride < 1:
        raise FrameError(f"stride must be a positive integer, got {stride!r}")
    if fps is not None and (not math.isfinite(fps) or fps <= 0):
        raise FrameError(f"fps must be a positive number, got {fps!r}")
    if fps is not None and stride != 1:
        raise FrameError("give either fps or stride, not both")
    if not path.exists():
        raise FrameError(f"{path}: input not found")
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
