"""Mesh, shardings and the pool of stream slots (continuous batching).

The multi-device checks run once, in a child process with 4 forced CPU devices
(tests/parallel_child.py: XLA_FLAGS must be set before jax is imported); the tests below assert on
its report. The others run in this process on its single device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xsvggt_jax.stream import pool as batch
from xsvggt_jax.stream import mesh as parallel
from xsvggt_jax.cache.core import CacheConfig, init_cache

from conftest import TINY, child_xla_flags, require_reference

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-6


@pytest.fixture(scope="module")
def child() -> dict:
    require_reference(TINY)
    env = dict(os.environ, XLA_FLAGS=child_xla_flags("--xla_force_host_platform_device_count=4"), JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "tests.parallel_child", str(TINY)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["devices"] == 4
    return report


SETTINGS = ("none", "xstream-int4")


@pytest.mark.parametrize("setting", SETTINGS)
def test_sharded_pool_equals_single_streams(child, setting):
    """Every scene of the 4-device pool (scene changes, a late start, padded queries under their
    validity mask) equals the same scene run alone through the single-stream step, its tracks, vis
    and track_conf included (`none`: aggregator + camera head only, where it differs from xstream;
    xstream + int4: every head)."""
    res = child["settings"][setting]
    scenes = res["scenes"]
    compared = {"camera_pose", "depth", "pts3d_in_other_view", "track", "vis"} if res["heads"] else {"camera_pose"}
    assert len(scenes) == 7 and {s["slot"] for s in scenes} == {0, 1, 2, 3}
    for s in scenes:
        for key, err in s["max_abs"].items():
            if key == "padded_nan":
                continue
            assert err <= TOL, (setting, s, key)
        assert compared <= set(s["max_abs"])


@pytest.mark.parametrize("setting", SETTINGS)
def test_one_trace_across_scene_changes(child, setting):
    assert [s["slot"] for s in child["settings"][setting]["scenes"]].count(1) == 4  # 3 scene changes
    assert child["settings"][setting]["pool_traces"] == 1


@pytest.mark.parametrize("setting", SETTINGS)
def test_cache_bytes_split_over_devices(child, setting):
    res = child["settings"][setting]
    assert res["total_bytes"] % 4 == 0
    assert res["device_bytes"] == [res["total_bytes"] // 4] * 4
    assert res["device_bytes_after"] == res["device_bytes"]  # resets and steps keep the split
    assert res["out_spec"] == "P('data',)"


def test_padded_queries_are_masked(child):
    padded = [s for s in child["settings"]["xstream-int4"]["scenes"] if s["queries"] == 3]
    assert len(padded) == 1 and padded[0]["max_abs"]["padded_nan"] is True


def test_padded_queries_leave_real_visibility_unchanged(child):
    padded = [s for s in child["settings"]["xstream-int4"]["scenes"] if s["queries"] == 3][0]
    assert max(padded["max_abs"][k] for k in ("track", "vis", "track_conf")) <= TOL


# ------------------------------------------------------------------------------------ single process
def test_make_mesh_checks_the_device_count():
    mesh = parallel.make_mesh()
    assert mesh.axis_names == parallel.AXES and mesh.shape[parallel.DATA] == len(jax.devices())
    with pytest.raises(parallel.MeshError):
        parallel.make_mesh(data=len(jax.devices()) + 1)
    with pytest.raises(parallel.MeshError):
        parallel.make_mesh(seq=len(jax.devices()) + 1)
    with pytest.raises(parallel.MeshError):
        parallel.check_batch(mesh, 0)


def test_resolve_slot_compute():
    mesh = parallel.make_mesh()
    assert batch.resolve_slot_compute("auto", None, "cpu") == "sequential"
    assert batch.resolve_slot_compute("auto", mesh, "cpu") == "batched"
    assert batch.resolve_slot_compute("auto", None, "gpu") == "batched"
    assert batch.resolve_slot_compute("batched", None, "cpu") == "batched"
    assert set(batch.SLOT_COMPUTE) == {"batched", "sequential"}
    with pytest.raises(batch.PoolError):
        batch.resolve_slot_compute("sequential", mesh)
    with pytest.raises(batch.PoolError):
        batch.resolve_slot_compute("vectorised")


def test_sequential_pool_equals_single_streams(micro):
    """slot_compute="sequential": each slot of a pool of 2 runs the single-stream step's own program:
    bit-identical to the scene alone (xstream + int4 cache, slots at different frames); slot 0's scene
    has 2 query points padded to 4 under the validity mask: its real tracks, vis and track_conf match."""
    from xsvggt_jax.stream.step import make_step

    from conftest import micro_frames
    cfg, params = micro
    cc = CacheConfig("xstream", 16, 4, quant="kcvt", bits=4)
    frames = micro_frames(4)[:, 0]                                       # [4, 28, 28, 3]
    points = np.array([[3.0, 4.0], [20.0, 9.0], [12.0, 25.0], [7.0, 7.0]], np.float32)
    counts = (2, 4)
    fresh = init_cache(cfg, cc, 1, (28, 28), query_points=jnp.zeros((1, 4, 2)))
    padded = [batch.pad_queries(points[:n], 4) for n in counts]
    pool = batch.reset_slots(batch.init_pool(fresh, 2), np.ones(2, bool), fresh,
                             jnp.asarray(np.stack([p for p, _ in padded])))
    valid = np.stack([v for _, v in padded])
    run = batch.make_pool_step(cfg, cc, slot_compute="sequential")
    single = make_step(cfg, cc)
    caches = [init_cache(cfg, cc, 1, (28, 28), query_points=jnp.asarray(points[None, :n])) for n in counts]
    for t in range(3):
        pool, out = run(params, pool, frames[[t, t + 1]], valid)
        for b, n in enumerate(counts):
            caches[b], ref = single(params, caches[b], frames[t + b:t + b + 1])
            for k, v in ref.items():
                got, want = np.asarray(out[k][b]), np.asarray(v[0])
                if k in batch.TRACK_KEYS:
                    np.testing.assert_allclose(got[:n], want, rtol=0, atol=TOL, err_msg=f"{t} {b} {k}")
                else:
                    np.testing.assert_array_equal(got, want, err_msg=f"{t} {b} {k}")


def test_pad_queries():
    pts, valid = batch.pad_queries([[1.0, 2.0], [3.0, 4.0]], 4)
    np.testing.assert_array_equal(pts, [[1, 2], [3, 4], [1, 2], [1, 2]])
    np.testing.assert_array_equal(valid, [True, True, False, False])
    with pytest.raises(batch.PoolError):
        batch.pad_queries(np.zeros((5, 2)), 4)


def test_reset_slots_restores_only_the_done_rows(tiny_cfg, tiny_frames):
    images, _ = tiny_frames
    cc = CacheConfig("xstream", 64, 16, quant="kcvt", bits=4)
    fresh = init_cache(tiny_cfg, cc, 1, images.shape[2:], query_points=jnp.zeros((3, 2)))
    pool = batch.init_pool(fresh, 3)
    # a pool whose every leaf differs from the fresh state (as after some steps)
    stepped = jax.tree.map(lambda x: x + jnp.ones((), x.dtype), pool)
    before = jax.tree.map(np.asarray, stepped)
    new_pts = jnp.full((3, 3, 2), 7.0)
    out = batch.reset_slots(stepped, np.array([False, True, False]), fresh, new_pts)
    expected = fresh.replace(track_points=jnp.full((1, 3, 2), 7.0))
    for got, old, new in zip(jax.tree.leaves(out), jax.tree.leaves(before), jax.tree.leaves(expected)):
        got = np.asarray(got)
        np.testing.assert_array_equal(got[[0, 2]], old[[0, 2]])
        np.testing.assert_array_equal(got[1], np.asarray(new))
    assert int(out.frame_index[1]) == 0 and int(out.frame_index[0]) == 1
    with pytest.raises(batch.PoolError):
        batch.reset_slots(out, np.array([True, False]), fresh)
    with pytest.raises(batch.PoolError):
        batch.reset_slots(out, np.zeros(3, bool), fresh, jnp.zeros((3, 4, 2)))
    with pytest.raises(batch.PoolError):
        batch.init_pool(init_cache(tiny_cfg, cc, 2, images.shape[2:]), 2)
