"""Sequence parallelism on 4 forced CPU devices: ring / gathered attention and the sharded offline forward
equal one device; the compiled peak bytes per device grow linearly in S and fall about as 1/D.

Everything runs in one subprocess (XLA_FLAGS must be set before jax starts): this file is its script.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DEVICES = 4


@pytest.fixture(scope="module")
def worker() -> dict:
    from conftest import child_xla_flags
    env = dict(os.environ, XLA_FLAGS=child_xla_flags(f"--xla_force_host_platform_device_count={DEVICES}"),
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ["ring-causal", "ring-full", "gather-causal", "gather-full"])
def test_sharded_attention_equals_dense(worker, case):
    assert worker["attention"][case] <= 1e-6


def test_ring_skips_blocks_of_later_devices(worker):
    """NaN K/V on the last device: the earlier devices' queries never visit them (else 0 * NaN)."""
    assert worker["ring_poison_earlier_err"] <= 1e-6
    assert worker["ring_poison_last_all_nan"]


@pytest.mark.parametrize("mode", ["causal", "full"])
def test_sharded_offline_equals_one_device(worker, mode):
    errs = worker["offline"][mode]
    assert set(errs) == {"pts3d_in_other_view", "conf", "depth", "depth_conf", "camera_pose"}
    assert max(errs.values()) <= 1e-6, errs


def test_peak_bytes_linear_in_frames(worker):
    peak = worker["peak"]
    assert peak["1x128"] / peak["1x64"] <= 2.3, peak


def test_peak_bytes_fall_with_devices(worker):
    """The frame-dependent bytes (above the intercept of the one-device line: replicated parameters and
    the like) fall about as 1/D."""
    peak = worker["peak"]
    fixed = 2 * peak["1x64"] - peak["1x128"]
    assert 0 < fixed < peak["1x64"], peak
    assert (peak[f"{DEVICES}x128"] - fixed) / (peak["1x128"] - fixed) <= 1.3 / DEVICES, peak


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _main() -> None:
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from benchmarks.memory import compile_offline, peak_bytes
    from conftest import micro_cfg
    from xsvggt_jax import attention as A
    from xsvggt_jax.attention.kernels import _attend_dense
    from xsvggt_jax.nn.model import init_params
    from xsvggt_jax.stream.sharded import SEQ, make_seq_mesh, place_on_mesh

    assert jax.device_count() == DEVICES
    mesh = make_seq_mesh(DEVICES)
    result: dict = {"attention": {}, "offline": {}, "peak": {}}

    # attention alone: 4 devices x 3 frames of 7 tokens, blocks that straddle frames and devices
    tokens, n = 7, DEVICES * 3 * 7
    q, k, v = (jax.random.normal(kk, (1, 2, n, 16)) for kk in jax.random.split(jax.random.PRNGKey(0), 3))
    fid = np.arange(n) // tokens
    causal_bias = np.where(fid[:, None] >= fid[None, :], 0.0, -np.inf).astype(np.float32)
    seq = P(None, None, SEQ, None)

    def sharded(impl, mask, q, k, v):
        spec = A.AttentionSpec(mask, impl, axis=SEQ, query_block=8, key_block=6)
        fn = jax.shard_map(lambda q, k, v: A.attend(q, k, v, mask=spec), mesh=mesh, in_specs=(seq, seq, seq),
                           out_specs=seq, check_vma=False)
        return jax.jit(fn)(q, k, v)

    for impl in ("ring", "gather"):
        for mode, mask, bias in (("causal", A.FrameCausal(tokens), causal_bias), ("full", A.Full(), None)):
            ref = _attend_dense(q, k, v, bias, jax.lax.Precision.HIGHEST)
            result["attention"][f"{impl}-{mode}"] = _rel(sharded(impl, mask, q, k, v), ref)
    ref = _attend_dense(q, k, v, causal_bias, jax.lax.Precision.HIGHEST)
    last = jnp.arange(n) >= (DEVICES - 1) * n // DEVICES
    out = sharded("ring", A.FrameCausal(tokens), q, *(jnp.where(last[:, None], jnp.nan, x) for x in (k, v)))
    cut = (DEVICES - 1) * n // DEVICES
    result["ring_poison_earlier_err"] = _rel(out[:, :, :cut], ref[:, :, :cut])
    result["ring_poison_last_all_nan"] = bool(np.isnan(np.asarray(out[:, :, cut:])).all())

    # the offline forward, compiled once per (devices, mode) at 128 frames: peak bytes per device from
    # memory_analysis, then executed: frames sharded (ring attention) vs one device
    cfg = micro_cfg()
    s, hw = 128, (28, 28)
    params = init_params(cfg, jax.random.PRNGKey(0))
    images = jax.random.uniform(jax.random.PRNGKey(1), (1, s, *hw, 3))
    result["peak"]["1x64"] = peak_bytes(compile_offline(cfg, 64, hw))["peak"]
    for mode in ("causal", "full"):
        outs = {}
        for d in (1, DEVICES):
            compiled = compile_offline(cfg, s, hw, devices=d, causal=mode == "causal")
            if mode == "causal":
                result["peak"][f"{d}x{s}"] = peak_bytes(compiled)["peak"]
            if d == 1:
                outs[d] = compiled(params, images)
            else:
                outs[d] = compiled(*place_on_mesh(params, images, mesh))
        result["offline"][mode] = {name: _rel(outs[DEVICES][name], outs[1][name]) for name in outs[1]}
    print(json.dumps(result))


if __name__ == "__main__":
    _main()
