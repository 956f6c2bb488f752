"""Child process of tests/test_parallel.py: a pool of 4 stream slots on 4 forced CPU devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m tests.parallel_child REFERENCE_TINY_DIR

(XLA_FLAGS must be set before jax is imported: the parent sets it in the child's environment.)
The model is the `micro` preset with random weights, saved to a params directory and loaded from it as
users load theirs (the pool is compared with single streams of the same model: no upstream numbers are
involved, and the micro model compiles in a fraction of the reference model's time); the frames and
query points are the reference's (56x70: 20 patches a frame, so the 64-token budget prunes).
For each cache setting, one pool plays a schedule of scenes over its 4 slots (one device each):
slot 1 changes scene 3 times, slot 3 starts a step late, slot 2's scene has fewer query points
than the pool (padded, with the validity mask). Every scene is also run alone through the
single-stream step (with its own number of query points, unmasked). Prints one
JSON line: per setting and scene the largest absolute difference of every output, the trace count
of `step` inside the pool step, and the per-device / total bytes of the pool cache.
"""

from __future__ import annotations

import functools
import json
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from xsvggt_jax.stream import pool as batch
from xsvggt_jax.stream import mesh as parallel
from xsvggt_jax.cache.core import CacheConfig, init_cache, tree_bytes
from xsvggt_jax.config import ModelConfig
from xsvggt_jax.nn.model import init_params
from xsvggt_jax.stream.step import step
from xsvggt_jax.weights.params import load_params, save_params

SLOTS, N = 4, 5
# name: (cache config, query points of slot 2's scene, heads). Compiles dominate the run time: the
# uncompressed cache differs from the pruned one in the aggregator and camera trunk only, so it runs
# them alone (heads=False); padding is checked once (each N compiles its own single-stream step).
SETTINGS = {"none": (CacheConfig(prune="none"), N, False),
            "xstream-int4": (CacheConfig("xstream", 64, 16, quant="kcvt", bits=4), 3, True)}


def schedule(padded: int) -> list[tuple[int, int, int, int, int]]:
    """(slot, first pool step, first image, frames, query points) of every scene."""
    return [(0, 0, 0, 4, N),
            (1, 0, 0, 2, N), (1, 2, 4, 3, N), (1, 5, 8, 2, N), (1, 7, 12, 2, N),   # 3 scene changes
            (2, 0, 2, 4, padded),                                                  # padded queries
            (3, 1, 5, 4, N)]                                                       # starts late
STEPS = 9
MAX_FRAMES = 4


def main(tiny: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        save_params(init_params(ModelConfig.preset("micro"), jax.random.key(0)), Path(tmp) / "params",
                    ModelConfig.preset("micro"))
        params, cfg = load_params(Path(tmp) / "params")
    data = np.load(tiny / "frames.npz")
    images = data["images"].transpose(0, 2, 3, 1)  # [S, H, W, 3]
    queries = data["query_points"].astype(np.float32)
    hw = images.shape[1:3]
    mesh = parallel.make_mesh()
    traces = []
    real_step = batch.step

    def counting_step(*args, **kw):
        traces.append(1)
        return real_step(*args, **kw)

    batch.step = counting_step
    report = {"devices": len(jax.devices()), "settings": {}}
    for name, (cc, padded, heads) in SETTINGS.items():
        scenes = schedule(padded)
        traces.clear()
        fresh = init_cache(cfg, cc, 1, hw, MAX_FRAMES, query_points=jnp.zeros((N, 2)))
        pool = batch.init_pool(fresh, SLOTS, sharding=parallel.batch_sharding(mesh))
        total = tree_bytes(pool)
        bytes_before = sorted(parallel.per_device_bytes(pool).values())
        run = batch.make_pool_step(cfg, cc, mesh, heads=heads)
        rep = jax.device_put(params, parallel.replicated(mesh))
        pooled = {i: [] for i in range(len(scenes))}
        current = {}  # slot -> (scene index, first image, first step)
        valid = np.zeros((SLOTS, N), bool)
        for t in range(STEPS):
            starting = [i for i, s in enumerate(scenes) if s[1] == t]
            if starting:
                done = np.zeros(SLOTS, bool)
                pts = np.zeros((SLOTS, N, 2), np.float32)
                for i in starting:
                    slot, _, first, _, n = scenes[i]
                    done[slot] = True
                    pts[slot], valid[slot] = batch.pad_queries(queries[:n], N)
                    current[slot] = (i, first, t)
                pool = batch.reset_slots(pool, done, fresh, jnp.asarray(pts))
            frames = np.zeros((SLOTS, *hw, 3), np.float32)  # idle slots see black frames
            for slot, (i, first, t0) in current.items():
                if t - t0 < scenes[i][3]:
                    frames[slot] = images[first + t - t0]
            pool, out = run(rep, pool, frames, valid if heads else None)
            out = batch.mask_tracks(out, valid)  # no-op without heads
            for slot, (i, first, t0) in current.items():
                if t - t0 < scenes[i][3]:
                    pooled[i].append({k: np.asarray(v[slot]) for k, v in out.items()})
        res = {"pool_traces": len(traces), "heads": heads, "total_bytes": total, "device_bytes": bytes_before,
               "device_bytes_after": sorted(parallel.per_device_bytes(pool).values()),
               "out_spec": str(out["camera_pose"].sharding.spec), "scenes": []}
        batch.step = real_step
        single = jax.jit(functools.partial(step, cfg, cc, heads=heads), donate_argnums=(1,))
        for i, (slot, _, first, length, n) in enumerate(scenes):
            cache = init_cache(cfg, cc, 1, hw, MAX_FRAMES, query_points=jnp.asarray(queries[:n])[None])
            errs = {}
            for f in range(length):
                cache, ref = single(params, cache, jnp.asarray(images[first + f][None]))
                got = pooled[i][f]
                for k, v in ref.items():
                    g = got[k][:n] if k in batch.TRACK_KEYS else got[k]
                    errs[k] = max(errs.get(k, 0.0), float(np.max(np.abs(g - np.asarray(v)[0]))))
                if n < N:
                    errs["padded_nan"] = bool(np.isnan(got["track"][n:]).all())
            res["scenes"].append({"slot": slot, "frames": length, "queries": n, "max_abs": errs})
        batch.step = counting_step
        report["settings"][name] = res
    return report


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
