"""Video input (`io.sources.open_frames`): PyAV decoding, frame counting and timing without a
container count.

Matroska / WebM (and some other containers) do not store a frame count, but the pipeline allocates
its outputs per frame up front, so the frames are counted when the video is opened: by demuxing
(reading packets, no decoding; each video packet holds one frame) and, if that yields no usable
timestamps, by decoding once. The same pass gives every frame's presentation time, which drives
`fps` resampling (exact for variable frame rates too) and the exported timestamps.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from xsvggt_jax.io.frames import (DEFAULT_TARGET, FrameError, FrameSource, Target, check_args, check_size,
                                  frame_info_for, preprocess_image)

log = logging.getLogger(__name__)

TIME_TOLERANCE_S = 1e-6  # a frame at k / fps minus this still counts as "at" that time


def _av():
    try:
        import av
    except ImportError as e:
        raise FrameError(f"reading videos needs PyAV (pip install av): {e}") from e
    return av


def _demuxed_times(path: Path) -> list[float] | None:
    """Presentation times (s) of every frame, sorted, from the packets alone; None when a packet
    has no timestamp (then only decoding can tell)."""
    av = _av()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        times = []
        for packet in container.demux(stream):
            if not packet.size:  # the flush packet at the end
                continue
            if packet.pts is None or stream.time_base is None:
                return None
            times.append(float(packet.pts * stream.time_base))
    return sorted(times) or None


def _decoded_times(path: Path, src_fps: float | None) -> list[float | None]:
    """Frame times by decoding the whole video (the fallback); None entries when frames carry no
    timestamp and the frame rate is unknown."""
    av = _av()
    with av.open(str(path)) as container:
        times = []
        for i, frame in enumerate(container.decode(video=0)):
            t = frame.time
            times.append(t if t is not None else (i / src_fps if src_fps else None))
    return times


def select_by_time(times: list[float], fps: float) -> list[int]:
    """Indices of the frames kept when resampling to `fps`: for k = 0, 1, ... the first frame at or
    after time times[0] + k / fps (each frame kept at most once). Every frame when fps exceeds the
    video's rate."""
    kept, k = [], 0
    start = times[0]
    for i, t in enumerate(times):
        if t - start >= k / fps - TIME_TOLERANCE_S:
            kept.append(i)
            k = int(np.floor((t - start + TIME_TOLERANCE_S) * fps)) + 1
    return kept


class VideoSource(FrameSource):
    """A video decoded with PyAV, one frame at a time: every `stride`-th frame, or resampled to
    `fps` by presentation time. The frames are counted (and timed) when the video is opened, also
    for containers without a frame count (mkv, webm). `frames_info[i].time` is the presentation time
    of kept frame i in seconds, `.name` `frame_{n:06d}.jpg` for video frame n."""

    def __init__(self, path: Path, mode: str = "crop", target: Target = DEFAULT_TARGET,
                 fps: float | None = None, stride: int = 1):
        check_args(mode, target)
        av = _av()
        self.path, self.mode, self.target = path, mode, target
        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise FrameError(f"{path}: no video stream")
                stream = container.streams.video[0]
                rate = stream.average_rate or stream.guessed_rate
                self.src_fps = float(rate) if rate else None
                first = next(container.decode(stream), None)  # proves the stream decodes
            times = _demuxed_times(path) if first is not None else None
            if first is not None and times is None:
                log.info("%s: packets carry no timestamps: counting frames by decoding", path)
                times = _decoded_times(path, self.src_fps)
        except FrameError:
            raise
        except Exception as e:  # noqa: BLE001 - any demuxer/decoder failure is the file's problem
            raise FrameError(f"{path}: cannot decode video ({type(e).__name__}: {e})") from e
        if first is None or not times:
            raise FrameError(f"{path}: video has no frames")
        if fps is not None:
            if any(t is None for t in times):
                raise FrameError(f"{path}: frame times unknown, cannot resample to {fps} fps (use stride instead)")
            if self.src_fps is not None and fps > self.src_fps:
                log.warning("%s: requested %g fps exceeds the video's %g fps: keeping every frame", path, fps,
                            self.src_fps)
            self.indices = select_by_time(times, fps)
        else:
            self.indices = list(range(0, len(times), stride))
        width, height = first.width, first.height
        frame_hw = check_size(width, height, mode, target, str(path))
        infos = [frame_info_for(f"frame_{i:06d}.jpg", width, height, mode, target, frame_hw, time=times[i], index=i)
                 for i in self.indices]
        super().__init__(str(path), len(self.indices), *frame_hw, frames_info=infos)

    def decode_kept(self) -> Iterator[tuple[int, Image.Image]]:
        """(video frame number, RGB picture) of each kept frame, stopping after the last one."""
        av = _av()
        wanted = iter(self.indices)
        want = next(wanted)
        i = -1
        try:
            with av.open(str(self.path)) as container:
                for i, frame in enumerate(container.decode(video=0)):
                    if i != want:
                        continue
                    yield i, Image.fromarray(frame.to_ndarray(format="rgb24"))
                    want = next(wanted, None)
                    if want is None:
                        return
        except FrameError:
            raise
        except Exception as e:  # noqa: BLE001
            raise FrameError(f"{self.path}: cannot decode video after frame {i} ({type(e).__name__}: {e})") from e

    def __iter__(self) -> Iterator[np.ndarray]:
        for i, picture in self.decode_kept():
            out = preprocess_image(picture, self.mode, self.target, name=f"{self.path} frame {i}")
            if out.shape[:2] != (self.height, self.width):
                raise FrameError(f"{self.path}: frame {i} preprocesses to {out.shape[0]}x{out.shape[1]}, "
                                 f"expected {self.height}x{self.width} (frame size changed mid-video)")
            yield out

    def iter_originals(self) -> Iterator[np.ndarray]:
        for _, picture in self.decode_kept():
            yield np.asarray(picture, np.uint8)
