"""Input frames, the parts every source shares: preprocessing, where a frame came from, the
`FrameSource` interface and `FrameError`.

Preprocessing reproduces upstream StreamVGGT `load_and_preprocess_images(image_path_list, mode)`
bit for bit (PIL bicubic resize, uint8 / 255 in float32, white padding), with the target width as a
parameter (default 518, the published model's), or a fixed frame size (H, W) (`--size HxW`: resize,
then centre crop or white padding to exactly H x W; see `_layout`).

The sources build on this module: image folders and preprocessed `.npz` files in `io.image_files`,
videos in `io.video`; `io.sources.open_frames` picks one for an input path. Every source is read
lazily: opening it only reads headers / metadata, and iterating decodes one frame at a time, so a
long video or a large folder is never held in memory as a whole.

Size rule (decided here, upstream has none): the check is made on the size *after* preprocessing,
which is what the model sees. Upstream happily upsamples a tiny image, so a 10x10 photo is accepted
(crop mode makes it 518x518), but an image whose aspect ratio rounds one preprocessed side below one
patch (14 px, e.g. a 1000x10 strip -> 518x0) is rejected with a `FrameError` naming the file.

Every source also describes where each model frame came from (`FrameSource.frames_info`, one
`FrameInfo` per frame: a file name, the original size, the preprocessing transform and the video
presentation time), which the exports use to name images and to map intrinsics back to the
original images.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

from xsvggt_jax.io.rgb import to_uint8_rgb
from xsvggt_jax.errors import InputError

log = logging.getLogger(__name__)

PATCH = 14
DEFAULT_TARGET = 518
MODES = ("crop", "pad")
PAD_VALUE = 1.0  # white, as upstream


class FrameError(InputError):
    """An input that cannot be turned into frames; the message is one line naming the file."""


# ----------------------------------------------------------------------------------------------
# colour conversion
# ----------------------------------------------------------------------------------------------

INTEGER_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})  # 16-bit grey (PNG) and 32-bit int
ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


def _grey_to_l(img: Image.Image) -> Image.Image:
    """A 16-bit ("I;16*", or "I" as a 16-bit PNG may open) or float ("F") grey image -> 8-bit "L".

    Integer modes are scaled by 65535 (the full 16-bit range: 65535 -> 255); "F" is taken as
    intensity in [0, 1] (clipped). PIL's own conversion clips instead, making most 16-bit images white."""
    arr = np.asarray(img).astype(np.float64)
    unit = arr / 65535.0 if img.mode in INTEGER_MODES else arr
    return Image.fromarray(np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8), "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> mode "RGB" with every kind of transparency composited on white.

    RGBA takes upstream's path exactly (alpha-composite on opaque white, then drop alpha); LA, La,
    PA, RGBa, a palette or grey/RGB image with a `transparency` entry go through RGBA first, so a
    transparent pixel is white whatever colour it stores. 16-bit and float grey are scaled (see
    `_grey_to_l`); CMYK, YCbCr, 1-bit, ... use PIL's conversion."""
    if img.mode in INTEGER_MODES or img.mode == "F":
        img = _grey_to_l(img)
    if img.mode == "La":  # premultiplied: PIL converts it to RGBA only through LA
        img = img.convert("LA")
    if img.mode in ALPHA_MODES or "transparency" in img.info:
        if img.mode != "RGBA":
            img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img if img.mode == "RGB" else img.convert("RGB")


# ----------------------------------------------------------------------------------------------
# preprocessing (upstream load_and_preprocess_images)
# ----------------------------------------------------------------------------------------------

Target = Union[int, tuple[int, int]]  # a width (upstream's rule) or a fixed (H, W) frame size


def check_args(mode: str, target: Target) -> None:
    """Raise FrameError unless `mode` is one of `MODES` and `target` a positive multiple of `PATCH` (a
    width) or a pair (H, W) of them (a fixed frame size)."""
    if mode not in MODES:
        raise FrameError(f"mode must be one of {MODES}, got {mode!r}")
    sides = tuple(target) if isinstance(target, (tuple, list)) and len(target) == 2 else (target,)
    if not all(isinstance(t, (int, np.integer)) and t >= PATCH and not t % PATCH for t in sides):
        raise FrameError(f"target must be a positive multiple of the patch size {PATCH} or a pair (H, W) of them, "
                         f"got {target!r}")


def parse_size(text: str) -> tuple[int, int]:
    """`HxW` (e.g. "84x112") -> (H, W), both positive multiples of `PATCH`; FrameError otherwise."""
    parts = str(text).lower().replace("\u00d7", "x").split("x")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        size = ()
    if len(size) != 2 or any(v < PATCH or v % PATCH for v in size):
        raise FrameError(f"a frame size is HxW with both sides positive multiples of the patch size {PATCH} "
                         f"(e.g. 84x112, 392x518), got {text!r}")
    return size


def _to_patches(x: float) -> int:
    return round(x / PATCH) * PATCH


def _layout(width: int, height: int, mode: str, target: Target) -> tuple[int, int, int, int, int, int]:
    """(new_w, new_h, out_h, out_w, left, top) of preprocessing a `width` x `height` image: the size
    it is resized to, the output size, and where the resized image's top-left corner lands in the
    output (negative: cut off by the centre crop; positive: white padding).

    A width `target` is upstream's rule: crop mode resizes to that width (height in whole patches)
    and centre-crops a taller image to a square; pad mode fits the longer side and pads to a square.
    A fixed (H, W): crop mode resizes to width W (height in whole patches) unless that is shorter
    than H, then to height H (width in whole patches, at least W), and centre-crops to H x W; pad mode
    resizes to width W unless that is taller than H, then to height H (width at most W), and pads
    white, centred, to H x W. So (H, W) equal to what upstream's rule gives an image (e.g. 392x518 for
    4:3 photos in crop mode, (T, T) in pad mode) preprocesses it exactly as the width T does."""
    check_args(mode, target)
    if isinstance(target, (tuple, list)):
        out_h, out_w = int(target[0]), int(target[1])
        new_w, new_h = out_w, _to_patches(height * (out_w / width))
        if mode == "crop" and new_h < out_h:
            new_w, new_h = max(out_w, _to_patches(width * (out_h / height))), out_h
        elif mode == "pad" and new_h > out_h:
            new_w, new_h = min(out_w, _to_patches(width * (out_h / height))), out_h
    else:
        if mode == "pad" and width < height:
            new_w, new_h = _to_patches(width * (target / height)), target
        else:
            new_w, new_h = target, _to_patches(height * (target / width))
        out_h, out_w = (target, target) if mode == "pad" else (min(new_h, target), new_w)
    if mode == "pad":
        left, top = (out_w - new_w) // 2, (out_h - new_h) // 2
    else:
        left, top = -((new_w - out_w) // 2), -((new_h - out_h) // 2)
    return new_w, new_h, out_h, out_w, left, top


def resized_size(width: int, height: int, mode: str = "crop", target: Target = DEFAULT_TARGET) -> tuple[int, int]:
    """(new_width, new_height) of upstream's bicubic resize, before crop / pad."""
    return _layout(width, height, mode, target)[:2]


def preprocessed_size(width: int, height: int, mode: str = "crop",
                      target: Target = DEFAULT_TARGET) -> tuple[int, int]:
    """(H, W) of the array `preprocess_image` returns for a `width` x `height` image."""
    return _layout(width, height, mode, target)[2:4]


def check_size(width: int, height: int, mode: str, target: Target, name: str) -> tuple[int, int]:
    """(H, W) of a `width` x `height` image after preprocessing; FrameError naming `name` when a side
    would be smaller than one patch."""
    new_w, new_h = resized_size(width, height, mode, target)
    if new_w < PATCH or new_h < PATCH:
        raise FrameError(f"{name}: image of {width}x{height} px resizes to {new_w}x{new_h} px "
                         f"({mode} mode, target {target}), smaller than one {PATCH}-px patch")
    return preprocessed_size(width, height, mode, target)


def preprocess_image(pil_image: Image.Image, mode: str = "crop", target: Target = DEFAULT_TARGET, *,
                     name: str = "image") -> np.ndarray:
    """One PIL image -> float32 [H, W, 3] in [0, 1], the values upstream's preprocessing gives (upstream
    lays them out [3, H, W]); a fixed (H, W) `target` gives H x W frames (see `_layout`)."""
    check_args(mode, target)
    img = to_rgb(pil_image)
    width, height = img.size
    check_size(width, height, mode, target, name)
    new_w, new_h, out_h, out_w, left, top = _layout(width, height, mode, target)
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    # torchvision ToTensor: uint8 -> float32, divided by 255 (IEEE division, same rounding as torch)
    arr = np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
    if mode == "crop":
        arr = arr[-top:-top + out_h, -left:-left + out_w]
    else:
        arr = pad_frame(arr, out_h, out_w)
    return np.ascontiguousarray(arr, dtype=np.float32)


def pad_frame(frame: np.ndarray, height: int, width: int, value: float = PAD_VALUE) -> np.ndarray:
    """Pad an [h, w, 3] frame to [height, width, 3] with `value`, centred (extra row/column bottom/right)."""
    h_pad, w_pad = height - frame.shape[0], width - frame.shape[1]
    if h_pad < 0 or w_pad < 0:
        raise ValueError(f"cannot pad a {frame.shape[0]}x{frame.shape[1]} frame to {height}x{width}")
    if h_pad == 0 and w_pad == 0:
        return frame
    top, left = h_pad // 2, w_pad // 2
    return np.pad(frame, ((top, h_pad - top), (left, w_pad - left), (0, 0)),
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
    height, width = common_size([f.shape[:2] for f in frames])
    return [pad_frame(f, height, width) for f in frames]


def preprocess_transform(width: int, height: int, mode: str = "crop",
                         target: Target = DEFAULT_TARGET) -> tuple[float, float, float, float]:
    """(scale_x, scale_y, offset_x, offset_y) of `preprocess_image` on a `width` x `height` image:
    a point at (x, y) of the original lands at (scale_x * x + offset_x, scale_y * y + offset_y) of
    the preprocessed frame, in continuous pixel coordinates whose origin is the top-left image corner
    (the bicubic resize maps corners to corners; the centre crop shifts up / left, the white padding
    down / right)."""
    new_w, new_h, _, _, left, top = _layout(width, height, mode, target)
    return new_w / width, new_h / height, float(left), float(top)


# ----------------------------------------------------------------------------------------------
# sources
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FrameInfo:
    """Where one model frame came from.

    name: file name for exports (an image's own name; `frame_000123.jpg` for video frame 123 and
        `frame_000123.png` for an `.npz` frame); width, height: original size in pixels, before
        preprocessing; scale_x, scale_y, offset_x, offset_y: the map original -> model frame (see
        `preprocess_transform`, including the padding to the common frame size); time: presentation
        time in seconds (videos) or None; index: position in the source (video frame number)."""

    name: str
    width: int
    height: int
    scale_x: float = 1.0
    scale_y: float = 1.0
    offset_x: float = 0.0
    offset_y: float = 0.0
    time: float | None = None
    index: int = 0

    def intrinsics_to_original(self, intr: np.ndarray) -> np.ndarray:
        """Intrinsics [..., 3, 3] of the model frame -> the same camera in the original image:
        K_original = A^-1 K with A = [[scale_x, 0, offset_x], [0, scale_y, offset_y], [0, 0, 1]]."""
        intr = np.asarray(intr, np.float64)
        a_inv = np.array([[1.0 / self.scale_x, 0.0, -self.offset_x / self.scale_x],
                          [0.0, 1.0 / self.scale_y, -self.offset_y / self.scale_y],
                          [0.0, 0.0, 1.0]])
        return a_inv @ intr


def frame_info_for(name: str, width: int, height: int, mode: str, target: Target, frame_hw: tuple[int, int],
                   *, time: float | None = None, index: int = 0) -> FrameInfo:
    """The `FrameInfo` of a `width` x `height` image preprocessed (`mode`, `target`) and then padded,
    centred, to the common frame size `frame_hw` (H, W)."""
    sx, sy, ox, oy = preprocess_transform(width, height, mode, target)
    h, w = preprocessed_size(width, height, mode, target)
    return FrameInfo(name, width, height, sx, sy, ox + (frame_hw[1] - w) // 2, oy + (frame_hw[0] - h) // 2,
                     time, index)


class FrameSource:
    """Lazily read frames: `.num_frames`, `.height`, `.width`, `.query_points`, `.name` and
    `.frames_info` (one `FrameInfo` per frame; by default `frame_{i:06d}.png` at the frame size, no
    transform, no time); iterating yields float32 [height, width, 3] frames in [0, 1] (NHWC, the layout the step
    takes), decoding one at a time.
    `iter_originals()` yields each frame's original picture for exports."""

    def __init__(self, name: str, num_frames: int, height: int, width: int,
                 query_points: np.ndarray | None = None, frames_info: Sequence[FrameInfo] | None = None):
        self.name = name
        self.num_frames = num_frames
        self.height = height
        self.width = width
        self.query_points = query_points
        if frames_info is None:
            frames_info = [FrameInfo(f"frame_{i:06d}.png", width, height, index=i) for i in range(num_frames)]
        if len(frames_info) != num_frames:
            raise ValueError(f"{num_frames} frames but {len(frames_info)} frame infos")
        self.frames_info = list(frames_info)

    def __iter__(self) -> Iterator[np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def iter_originals(self) -> Iterator[Path | np.ndarray]:
        """Per frame, in order: the original image file (a Path), or its pixels as uint8 [h, w, 3]
        at the original size. Default: the model frames themselves."""
        for frame in self:
            yield to_uint8_rgb(frame)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, num_frames={self.num_frames}, "
                f"{self.height}x{self.width})")
