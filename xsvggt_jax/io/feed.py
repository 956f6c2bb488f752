"""Frames from a reader thread to the model loop, through a bounded queue.

    queue = FrameQueue(drop=True)
    reader = start_reader(capture.frames(), queue)   # a daemon thread
    item = queue.get(timeout=10.0)                   # the next frame; None at the end of the source

`drop=True` (cameras, streams): the queue holds one frame, the newest; a frame that arrives while one
is waiting replaces it and is counted in `dropped`, so a model slower than its source always works on
a recent frame and its latency stays bounded. `drop=False` (files, folders): every frame is kept and
the reader waits while `size` frames are waiting. Either way memory stays flat however long the
stream runs.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterable
from typing import Any, Optional

from xsvggt_jax.errors import InputError

WAIT_SLICE_S = 0.1  # waits are cut into slices so that a signal handler runs promptly in the main thread


class FeedTimeout(InputError):
    """No frame arrived within the timeout given to `FrameQueue.get`."""


class FrameQueue:
    """The bounded hand-over between a reader (`put`, `finish`) and the loop (`get`, `close`)."""

    def __init__(self, drop: bool, size: int = 4):
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        self.drop, self.size = drop, 1 if drop else size
        self.items: collections.deque = collections.deque()
        self.cond = threading.Condition()
        self.dropped = 0
        self.closed = self.finished = False
        self.error: Optional[BaseException] = None

    def put(self, item: Any) -> bool:
        """Hand `item` over (waiting for room without `drop`); False once the loop has closed the queue."""
        with self.cond:
            while not self.drop and len(self.items) >= self.size and not self.closed:
                self.cond.wait(WAIT_SLICE_S)
            if self.closed:
                return False
            if self.drop and self.items:
                self.dropped += len(self.items)
                self.items.clear()
            self.items.append(item)
            self.cond.notify_all()
            return True

    def finish(self, error: Optional[BaseException] = None) -> None:
        """The reader is done: the end of the source, or `error` (raised by `get`)."""
        with self.cond:
            self.finished, self.error = True, error
            self.cond.notify_all()

    def get(self, timeout: float, stop: Optional[threading.Event] = None) -> Any:
        """The next frame; None at the end of the source or once `stop` is set. Raises the reader's
        error, or FeedTimeout when nothing arrived for `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self.cond:
            if stop is not None and stop.is_set():
                return None
            while not self.items:
                if self.finished:
                    if self.error is not None:
                        raise self.error
                    return None
                if stop is not None and stop.is_set():
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise FeedTimeout(f"no frame for {timeout:g} s")
                self.cond.wait(min(left, WAIT_SLICE_S))
            item = self.items.popleft()
            self.cond.notify_all()
            return item

    def close(self) -> None:
        """The loop stops taking frames: a waiting reader is released, `put` returns False."""
        with self.cond:
            self.closed = True
            self.items.clear()
            self.cond.notify_all()


def start_reader(frames: Iterable, queue: FrameQueue, name: str = "xsvggt-capture") -> threading.Thread:
    """A daemon thread that puts every item of `frames` into `queue` until the queue closes, then
    `finish`es it (with the exception that ended `frames`, if one did)."""

    def run() -> None:
        try:
            for item in frames:
                if not queue.put(item):
                    break
        except BaseException as e:  # noqa: BLE001 - handed to the loop, which raises it
            queue.finish(e)
            return
        finally:
            getattr(frames, "close", lambda: None)()  # a generator's cleanup (closing its container) runs now
        queue.finish()

    thread = threading.Thread(target=run, daemon=True, name=name)
    thread.start()
    return thread
