"""The loop every streaming driver shares: step, wait for the device, time, report progress.

`reconstruct` (`pipeline.stream_frames`), `eval` (`eval.runner.stream_sequence`) and
`reconstruct-many` (`many.driver`) all run

    for s in stream_steps(step, inputs, progress=Progress(total, quiet)):
        ...  # s.out: the step's outputs, s.seconds: its device time

where `step(x)` dispatches one jitted step for input `x` and returns its outputs; the state the step
carries (a cache, a pool of caches) lives in the step object (`SingleStream` for one stream).
Blocking: `stream_steps` waits for each step's outputs (`block=True`, the step's device time is
then its wall time), or hands them on unwaited (`block=False`: `reconstruct-many`'s writer thread
waits, with the same `DeviceClock`, while the main loop dispatches the next step).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np


class Progress:
    """A progress bar of frames on stderr (tqdm); nothing when `quiet`. done: frames already done
    (a resumed stream); postfix(): fields shown beside the bar after each update."""

    def __init__(self, total: Optional[int], quiet: bool = False, done: int = 0,
                 postfix: Optional[Callable[[], dict]] = None):
        self.postfix = postfix
        self.bar = None
        if not quiet:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="frame", dynamic_ncols=True, leave=True)
            if done:
                self.bar.update(done)

    def update(self, frames: int = 1) -> None:
        if self.bar is None:
            return
        if self.postfix is not None:
            self.bar.set_postfix(**self.postfix(), refresh=False)
        self.bar.update(frames)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class DeviceClock:
    """Device seconds of successive steps: from a step's dispatch until its outputs are ready, less
    the time a step dispatched before it still held the device (steps run in order). `wait` is called
    once per step, in dispatch order, from one thread."""

    def __init__(self):
        self.last: Optional[float] = None

    def wait(self, out: Any, dispatched: float, fetch: Callable[[Any], Any] = jax.block_until_ready):
        """(fetch(out), seconds): `fetch` waits for the outputs (block_until_ready keeps them on the
        device, jax.device_get copies them to the host, counted in the step's time)."""
        out = fetch(out)
        now = time.perf_counter()
        seconds = now - max(dispatched, self.last or dispatched)
        self.last = now
        return out, seconds


@dataclasses.dataclass(frozen=True, eq=False)
class Stepped:
    """One step of `stream_steps`: its index, input, outputs, dispatch time (`time.perf_counter`) and
    device seconds (None when the loop does not block)."""
    index: int
    input: Any
    out: Any
    dispatched: float
    seconds: Optional[float]


def stream_steps(step: Callable[[Any], Any], inputs: Iterable, *, block: bool = True,
                 progress: Optional[Progress] = None, frames: Callable[[Any], int] = lambda x: 1,
                 clock: Optional[DeviceClock] = None) -> Iterator[Stepped]:
    """`step(x)` for every x of `inputs`, in order; yields each step's `Stepped` after the progress bar
    has counted its `frames(x)` frames. block: wait for the outputs (timed by `clock`) before yielding."""
    clock = DeviceClock() if clock is None else clock
    for i, x in enumerate(inputs):
        dispatched = time.perf_counter()
        out = step(x)
        seconds = None
        if block:
            out, seconds = clock.wait(out, dispatched)
        if progress is not None:
            progress.update(frames(x))
        yield Stepped(i, x, out, dispatched, seconds)


class SingleStream:
    """One stream's jitted step (`step.make_step`) bound to its parameters and cache: calling it with
    a frame [H, W, 3] float32 steps `cache` and returns the frame's outputs ([1, ...] each)."""

    def __init__(self, step: Callable, params: dict, cache):
        self.step, self.params, self.cache = step, params, cache

    def __call__(self, frame: np.ndarray) -> dict:
        self.cache, out = self.step(self.params, self.cache, jnp.asarray(frame)[None])
        return out
