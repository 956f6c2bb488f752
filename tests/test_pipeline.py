"""pipeline.filled_bytes: what `stream.png` and report.json show as the cache's use per frame."""

from __future__ import annotations

import jax.numpy as jnp

from conftest import micro_frames
from xsvggt_jax.cache.core import CacheConfig, cache_bytes, init_cache
from xsvggt_jax.stream.pipeline import filled_bytes
from xsvggt_jax.stream.step import make_step


def test_filled_bytes_grow_with_an_uncompressed_stream_and_reach_the_allocation(micro):
    cfg, params = micro
    # attention chunks of 3 slots divide both the global (3 x 9 tokens) and the camera (3 x 4) stream,
    # so the capacity is exactly three frames (the default 2,048-token chunk would round it up)
    cc = CacheConfig(prune="none", chunk=3)
    cache = init_cache(cfg, cc, 1, (28, 28), max_frames=3)
    allocated = cache_bytes(cache)
    empty = filled_bytes(cache)
    assert empty < allocated // 10                      # counters and key only
    step = make_step(cfg, cc)
    seen = []
    for frame in micro_frames(3):
        cache, _ = step(params, cache, jnp.asarray(frame))
        seen.append(filled_bytes(cache))
    growth = [b - a for a, b in zip([empty] + seen, seen)]
    assert growth[0] > 0 and growth[0] == growth[1] == growth[2]   # one frame's tokens each step
    assert seen[-1] == allocated                                    # three frames fill the three-frame cache
