"""A scene's frames for `reconstruct-many`, decoded ahead of the pool by a thread."""

from __future__ import annotations

import queue
import threading
from typing import Optional

import numpy as np

from xsvggt_jax.io.frames import FrameSource
from xsvggt_jax.stream.step import check_frame_values


class Reader:
    """Frames of one scene, [H, W, 3] float32 each, value-checked; read ahead by a thread into a
    queue of `depth` frames (depth 0: read on demand in the caller's thread)."""

    def __init__(self, source: FrameSource, depth: int):
        self._frames = iter(source)
        self._stop = threading.Event()
        self._queue: Optional[queue.Queue] = None
        if depth > 0:
            self._queue = queue.Queue(depth)
            threading.Thread(target=self._fill, daemon=True, name=f"read {source.name}").start()

    def _next(self):
        frame = next(self._frames, None)
        if frame is not None:
            check_frame_values(frame)
        return frame

    def _fill(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._next()
            except Exception as e:  # handed to the main loop: the scene fails there
                item = e
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item is None or isinstance(item, Exception):
                return

    def get(self) -> Optional[np.ndarray]:
        """The next frame, None at the end; raises the source's error."""
        item = self._next() if self._queue is None else self._queue.get()
        if isinstance(item, Exception):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
