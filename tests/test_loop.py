"""stream.loop: the step / wait / time / progress loop that reconstruct, eval and reconstruct-many share."""

from __future__ import annotations

import types

import numpy as np

import xsvggt_jax.stream.loop as loop
from xsvggt_jax.stream.loop import DeviceClock, SingleStream, stream_steps
from xsvggt_jax.stream.result import Reconstruction, stream_timing


class FakeTime:
    """time.perf_counter for the loop module: returns the queued times in order."""

    def __init__(self, monkeypatch, times):
        self.times = list(times)
        monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=lambda: self.times.pop(0)))


class Counter:
    def __init__(self):
        self.frames = []

    def update(self, frames=1):
        self.frames.append(frames)


def test_device_clock_does_not_count_the_previous_steps_time(monkeypatch):
    """Step 2 is dispatched at t=1 while step 1 holds the device until t=5: its device time is 8 - 5,
    not 8 - 1 (reconstruct-many dispatches ahead of its writer)."""
    FakeTime(monkeypatch, [5.0, 8.0])
    clock = DeviceClock()
    assert clock.wait("a", 0.0, fetch=lambda x: x) == ("a", 5.0)
    assert clock.wait("b", 1.0, fetch=lambda x: x) == ("b", 3.0)


def test_stream_steps_waits_times_and_counts(monkeypatch):
    FakeTime(monkeypatch, [0.0, 2.0, 3.0, 3.5])  # dispatch, ready; dispatch, ready
    progress = Counter()
    seen = []
    steps = stream_steps(lambda x: {"x": x}, [[1, 2], [3]], progress=progress, frames=len,
                         clock=DeviceClock())
    for s in steps:
        seen.append((s.index, s.input, s.out, s.dispatched, s.seconds, list(progress.frames)))
    assert seen == [(0, [1, 2], {"x": [1, 2]}, 0.0, 2.0, [2]),  # counted before it is handed on
                    (1, [3], {"x": [3]}, 3.0, 0.5, [2, 1])]


def test_stream_steps_unblocked_leaves_the_waiting_to_the_caller(monkeypatch):
    FakeTime(monkeypatch, [0.0, 1.0])  # dispatch times only
    waited = []
    clock = DeviceClock()
    monkeypatch.setattr(clock, "wait", lambda *a, **k: waited.append(a))
    out = [(s.out, s.dispatched, s.seconds) for s in stream_steps(lambda x: x * 2, [1, 2], block=False, clock=clock)]
    assert out == [(2, 0.0, None), (4, 1.0, None)] and not waited


def test_single_stream_carries_its_cache_and_feeds_nhwc_frames():
    calls = []

    def step(params, cache, x):
        calls.append((params, cache, np.asarray(x).shape))
        return cache + 1, {"n": cache}

    stream = SingleStream(step, "p", 0)
    frames = np.zeros((2, 4, 5, 3), np.float32)  # [S, H, W, 3], as every source yields them
    outs = [stream(f) for f in frames]
    assert outs == [{"n": 0}, {"n": 1}] and stream.cache == 2
    assert calls == [("p", 0, (1, 4, 5, 3)), ("p", 1, (1, 4, 5, 3))]


def test_streamed_reconstruction_timing_and_defaults():
    latency = [3.0, 0.5, 0.25, 1.0]  # the median after the first frame, not the mean (0.58) nor with it
    assert stream_timing(latency) == {"compile_seconds": 3.0, "seconds_per_frame": 0.5, "total_seconds": 4.75}
    r = Reconstruction.streamed({}, np.zeros((4, 2, 2, 3), np.uint8), 0, latency, {"cache_bytes": 7}, None)
    assert (r.mode, r.frames, r.offline, r.cache_bytes, r.filled_bytes) == ("stream", 4, False, (7,) * 4, None)
    assert r.timing == stream_timing(latency) and list(r.timing) == ["compile_seconds", "seconds_per_frame",
                                                                       "total_seconds"]
    assert stream_timing([2.0]) == {"compile_seconds": 2.0, "seconds_per_frame": 2.0, "total_seconds": 2.0}
