"""Live frame sources for `xsvggt live`: a camera, a network stream, a video file (as fast as it
decodes, or at its own frame rate) or a folder that another program writes images into.

`open_capture(spec, ...)` picks the kind and proves the source delivers before any model work: a
camera or stream is opened (PyAV / FFmpeg, through `open_av`, the one capture layer: V4L2 for
cameras) and its first frame decoded within `timeout` seconds; a video file is opened as `reconstruct`
opens it (`io.video.VideoSource`); a folder is polled until its first image is complete. Each failure
is a `CaptureError` naming the source. `Capture.frames()` then yields `Captured` frames as they arrive
(run it in a reader thread, `io.feed`); it ends at the end of the source, when a camera, stream or
folder delivers nothing for `timeout` seconds, or when `close()` is called.

A `Captured` frame holds the original picture (a decoded RGB array, or the image file) and is
preprocessed by `prepare` where it is consumed, so frames that are dropped are never resized.
Timestamps: a video file's presentation times (as `reconstruct` exports them); for the other sources
seconds since the first frame: by the stream's own clock where its frames carry one (else their arrival),
by the images' modification times in a folder.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from xsvggt_jax.io.frames import FrameError, FrameInfo, Target, frame_info_for, preprocess_image, preprocessed_size
from xsvggt_jax.io.image_files import IMAGE_EXTENSIONS, list_images
from xsvggt_jax.io.sources import VIDEO_EXTENSIONS
from xsvggt_jax.io.video import VideoSource

log = logging.getLogger(__name__)

STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "tcp", "srt", "rtp")
CAMERA_FORMAT = "v4l2"  # Linux cameras (Video4Linux2)
POLL_S = 0.05           # a watched folder is listed this often
UNREADABLE_S = 2.0      # an image that does not decode for this long, unchanged, is skipped


class CaptureError(FrameError):
    """A live source that does not exist, does not answer or delivers no frame."""


@dataclasses.dataclass(frozen=True, eq=False)
class Captured:
    """One frame as it arrived: its number in the source, export name, timestamp (s), `arrived`
    (`time.perf_counter()` when it was due: latency is measured from it) and the original picture
    (RGB uint8 [h, w, 3], or the image file)."""
    index: int
    name: str
    time: float
    arrived: float
    picture: Path | np.ndarray


def prepare(item: Captured, mode: str, size: tuple[int, int]) -> tuple[np.ndarray, FrameInfo]:
    """The model frame (float32 [H, W, 3], preprocessed to `size` as `reconstruct --size` does) and its
    `FrameInfo`. FrameError for an image file that cannot be decoded."""
    if isinstance(item.picture, Path):
        try:
            with Image.open(item.picture) as img:
                img.load()
                frame = preprocess_image(img, mode, size, name=str(item.picture))
                w, h = img.size
        except FrameError:
            raise
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise FrameError(f"{item.picture}: cannot decode image ({type(e).__name__}: {e})") from e
    else:
        h, w = item.picture.shape[:2]
        frame = preprocess_image(Image.fromarray(item.picture), mode, size, name=item.name)
    return frame, frame_info_for(item.name, w, h, mode, size, size, time=item.time, index=item.index)


class Capture:
    """A live source, opened. kind: "camera", "stream", "video" or "folder"; live: frames come at the
    source's pace whether or not they are taken (cameras, streams: drop by default); first_size: the
    first frame's original (width, height)."""
    kind = "source"
    live = False

    def __init__(self, name: str, first_size: tuple[int, int]):
        self.name, self.first_size = name, first_size
        self.stopped = threading.Event()

    def natural_size(self, mode: str, target: Target) -> tuple[int, int]:
        """(H, W) the first frame preprocesses to (`target` a width or a fixed (H, W))."""
        return preprocessed_size(*self.first_size, mode, target)

    def frames(self) -> Iterator[Captured]:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        self.stopped.set()


# ------------------------------------------------------------------------------- cameras, streams
def open_av(url: str, fmt: str | None, timeout: float):
    """The capture layer: PyAV's input container for a camera device (`fmt` "v4l2") or a stream URL,
    with `timeout` seconds for opening and for each read."""
    import av

    if fmt == CAMERA_FORMAT and not Path(url).exists():
        found = sorted(glob.glob("/dev/video*"))
        raise CaptureError(f"camera {url}: no such device (cameras here: {', '.join(found) or 'none'})")
    return av.open(url, format=fmt, timeout=(timeout, timeout))


def camera_device(spec: str) -> str | None:
    """The device path of a camera spec ("/dev/video2" or "2"), None for anything else."""
    if re.fullmatch(r"\d+", spec):
        return f"/dev/video{int(spec)}"
    return spec if re.fullmatch(r"/dev/video\d+", spec) else None


class AvCapture(Capture):
    """A camera or network stream decoded with PyAV; the first frame is decoded when it is opened."""

    def __init__(self, url: str, kind: str, timeout: float):
        self.kind, self.live, self.url, self.timeout = kind, True, url, timeout
        what = f"camera {url}" if kind == "camera" else url
        try:
            self.container = open_av(url, CAMERA_FORMAT if kind == "camera" else None, timeout)
        except CaptureError:
            raise
        except Exception as e:  # noqa: BLE001 - FFmpeg's failures are the source's problem
            raise CaptureError(f"{what}: cannot open it within {timeout:g} s ({type(e).__name__}: {e})") from e
        try:
            if not self.container.streams.video:
                raise CaptureError(f"{what}: no video stream")
            self._decoded = self.container.decode(video=0)
            first = next(self._decoded, None)
        except CaptureError:
            self.container.close()
            raise
        except Exception as e:  # noqa: BLE001
            self.container.close()
            raise CaptureError(f"{what}: no frame within {timeout:g} s ({type(e).__name__}: {e})") from e
        if first is None:
            self.container.close()
            raise CaptureError(f"{what}: delivered no frame")
        self._first = (first, time.perf_counter())
        self._started = False
        super().__init__(what, (first.width, first.height))

    def close(self) -> None:
        super().close()
        if not self._started:  # else the reader's generator closes it (FFmpeg is not shared between threads)
            self.container.close()

    def frames(self) -> Iterator[Captured]:
        self._started = True
        t0 = None
        n = 0
        try:
            pending = [self._first]
            while not self.stopped.is_set():
                if pending:
                    frame, arrived = pending.pop()
                else:
                    try:
                        frame = next(self._decoded, None)
                    except Exception as e:  # noqa: BLE001 - a read timeout or a broken stream: its end
                        log.warning("%s: stopped delivering frames (%s: %s)", self.name, type(e).__name__, e)
                        return
                    if frame is None:
                        return
                    arrived = time.perf_counter()
                stamp = frame.time if frame.time is not None else arrived
                t0 = stamp if t0 is None else t0
                yield Captured(n, f"frame_{n:06d}.jpg", float(stamp - t0), arrived, frame.to_ndarray(format="rgb24"))
                n += 1
        finally:
            self.container.close()


# ------------------------------------------------------------------------------------- video file
class VideoCapture(Capture):
    """A video file, decoded as `reconstruct` decodes it; `realtime`: each frame is due at its
    presentation time after the start (a model slower than that falls behind: latency grows, or
    frames are dropped), else as fast as it is taken."""
    kind = "video"

    def __init__(self, path: Path, mode: str, target: Target, realtime: bool):
        self.source = VideoSource(path, mode, target)
        info = self.source.frames_info[0]
        super().__init__(str(path), (info.width, info.height))
        self.realtime = realtime
        self.times = [fi.time for fi in self.source.frames_info]
        if realtime and any(t is None for t in self.times):
            rate = self.source.src_fps
            if not rate:
                log.warning("%s: frame times and rate unknown: played as fast as it decodes", path)
                self.realtime = False
            self.times = [i / rate if rate else None for i in range(len(self.times))]

    def frames(self) -> Iterator[Captured]:
        start = time.perf_counter()
        for k, (i, picture) in enumerate(self.source.decode_kept()):
            if self.stopped.is_set():
                return
            arrived = time.perf_counter()
            if self.realtime:
                arrived = start + self.times[k] - self.times[0]
                if self.stopped.wait(max(0.0, arrived - time.perf_counter())):
                    return
            info = self.source.frames_info[k]
            yield Captured(i, info.name, info.time if info.time is not None else float(k), arrived,
                           np.asarray(picture, np.uint8))


# ------------------------------------------------------------------------------------------ folder
def _decodes(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            img.load()
        return True
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


class FolderCapture(Capture):
    """A folder another program writes images into. An image is taken once it is complete (its size
    and modification time unchanged over one poll, and it decodes), in name order; images already
    there count too. Its timestamp: its modification time, after the first image's."""
    kind = "folder"

    def __init__(self, folder: Path, timeout: float):
        self.folder, self.timeout = folder, timeout
        self.taken: set[str] = set()
        self.seen: dict[str, tuple[tuple[int, int], float]] = {}  # name -> ((size, mtime), unchanged since)
        self.t0: int | None = None  # the first image's modification time (ns)
        deadline = time.perf_counter() + timeout
        self.pending = self._ready()
        while not self.pending:
            if time.perf_counter() >= deadline:
                raise CaptureError(f"{folder}: no image ({', '.join(sorted(IMAGE_EXTENSIONS))}) arrived within "
                                   f"{timeout:g} s")
            time.sleep(POLL_S)
            self.pending = self._ready()
        with Image.open(self.pending[0][0]) as img:
            size = img.size
        super().__init__(str(folder), size)

    def _ready(self) -> list[tuple[Path, int]]:
        """(path, modification time ns) of the new images, in name order, that are complete: unchanged (size, modification time) since the
        previous poll and decodable. One still undecodable after `UNREADABLE_S` unchanged is skipped
        with a warning."""
        try:
            found = list_images(self.folder)
        except OSError as e:
            raise CaptureError(f"{self.folder}: cannot list it ({e.strerror or e})") from e
        ready, now = [], time.perf_counter()
        for p in found:
            if p.name in self.taken:
                continue
            try:
                st = p.stat()
            except OSError:
                continue
            stamp = (st.st_size, st.st_mtime_ns)
            before = self.seen.get(p.name)
            if before is None or before[0] != stamp:
                self.seen[p.name] = (stamp, now)
                continue
            if _decodes(p):
                ready.append((p, st.st_mtime_ns))
            elif now - before[1] < UNREADABLE_S:
                continue
            else:
                log.warning("%s: not a readable image, skipped", p)
            self.taken.add(p.name)
            self.seen.pop(p.name, None)
        return ready

    def frames(self) -> Iterator[Captured]:
        n = 0
        last = time.perf_counter()
        while not self.stopped.is_set():
            batch, self.pending = self.pending, []
            if not batch:
                if time.perf_counter() - last > self.timeout:
                    log.warning("%s: no new image for %g s: end of the source", self.folder, self.timeout)
                    return
                self.stopped.wait(POLL_S)
                batch = self._ready()
            for p, written in batch:
                self.t0 = written if self.t0 is None else self.t0
                yield Captured(n, p.name, (written - self.t0) / 1e9, time.perf_counter(), p)
                n += 1
                last = time.perf_counter()  # a reader held up by a full queue has not waited for the folder


# ------------------------------------------------------------------------------------------ opening
def source_kind(spec: str) -> str:
    """"camera", "stream", "video" or "folder" for a SOURCE argument; CaptureError for anything else."""
    if camera_device(spec):
        return "camera"
    scheme = re.match(r"([a-zA-Z][a-zA-Z0-9+.-]*)://", spec)
    if scheme:
        if scheme.group(1).lower() not in STREAM_SCHEMES:
            raise CaptureError(f"{spec}: unsupported stream type {scheme.group(1)}:// (supported: "
                               f"{', '.join(s + '://' for s in STREAM_SCHEMES)})")
        return "stream"
    path = Path(spec)
    if path.is_dir():
        return "folder"
    if not path.exists():
        raise CaptureError(f"{spec}: not found (a live source is a camera such as /dev/video0 or 0, a stream URL, "
                           "a video file or a folder)")
    if path.suffix.lower() in VIDEO_EXTENSIONS:
        return "video"
    raise CaptureError(f"{spec}: not a live source: give a camera (/dev/video0 or 0), a stream URL, a video file "
                       f"({', '.join(sorted(VIDEO_EXTENSIONS))}) or a folder that images are written into")


def open_capture(spec: str, *, mode: str = "crop", target: Target = 518, realtime: bool = False,
                 timeout: float = 10.0) -> Capture:
    """Open SOURCE (see the module docstring); CaptureError / FrameError when it cannot deliver."""
    kind = source_kind(spec)
    if realtime and kind != "video":
        raise CaptureError(f"{spec}: --realtime paces a video file; a {kind} delivers frames at its own pace")
    if kind == "camera":
        return AvCapture(camera_device(spec), "camera", timeout)
    if kind == "stream":
        return AvCapture(spec, "stream", timeout)
    if kind == "video":
        return VideoCapture(Path(spec), mode, target, realtime)
    return FolderCapture(Path(spec), timeout)

