"""Attention over packed K/V codes (`attention.packed`, the Pallas kernel `attention.pallas_packed`,
`--attention packed`): equal to dequantize-then-attend on every layout and code width, the kernel in
Pallas interpret mode too; no float K/V built; a quantized stream attended packed equals the
dequantizing stream; the run option is refused where it cannot apply."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import xsvggt_jax.stream.step as step_mod
from conftest import micro_frames, rel_err, run_error
from xsvggt_jax.attention import options
from xsvggt_jax.attention.kernels import attend_xla_lse
from xsvggt_jax.attention.masks import KeyPrefix
from xsvggt_jax.attention.packed import packed_lse
from xsvggt_jax.attention.pallas_packed import packed_lse_pallas, unfit
from xsvggt_jax.cache.codec import LAYOUTS
from xsvggt_jax.cache.core import CacheConfig, init_cache
from xsvggt_jax.cache.packed_attend import config_unsupported, operand

TOL = 1e-5   # relative, out and lse: float32 rounding of another summation order (measured <= 3e-6)
HIGHEST = jax.lax.Precision.HIGHEST


def _case(layout: str, bits: int, group: int, slots: int, d: int, nq: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    k, v, q = (jnp.asarray(rng.standard_normal((1, 2, t, d)), jnp.float32) for t in (slots, slots, nq))
    kc, vc = (c(bits, group) for c in LAYOUTS[layout])
    return q, kc.encode(k), vc.encode(v)


def _errors(out, ref) -> float:
    (o, lse), (ro, rl) = out, ref
    np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), np.isneginf(np.asarray(rl)))
    if not np.isfinite(np.asarray(rl)).any():
        assert not np.asarray(o).any()
        return 0.0
    return max(rel_err(o, ro), rel_err(lse, rl))


def _reference(q, pk, pv, length):
    return attend_xla_lse(q, pk.decode(), pv.decode(), KeyPrefix(jnp.int32(length)), HIGHEST)


# (layout, bits, group): every layout and every code width; group 4 splits a per-token codec's 16 head
# dims into 4 groups and makes per-channel groups of 4 keys; group 32 is one dim group (the published
# group 64 of 64 head dims), per-channel groups of 32 keys
PACKED_CASES = [("kcvt", 4, 4), ("ktvt", 2, 4), ("kcvc", 8, 4), ("ktvc", 2, 32)]


@pytest.mark.parametrize("layout,bits,group", PACKED_CASES)
def test_packed_equals_dequantize_then_attend(layout, bits, group):
    """The JAX function equals attention over the decoded K/V for key counts from none to every slot
    (70 slots: a last key block that does not fill), and, for a quantize-once cache (`whole_groups`:
    only whole groups attended, 70 slots not whole groups of 4), without padding."""
    q, pk, pv = _case(layout, bits, group, slots=70, d=16, seed=bits + group)
    run = jax.jit(lambda q, pk, pv, n: packed_lse(q, operand(pk), operand(pv), n))
    errs = [_errors(run(q, pk, pv, jnp.int32(n)), _reference(q, pk, pv, n)) for n in (0, 3, 37, 70)]
    if group == 4:
        whole = jax.jit(lambda q, pk, pv, n: packed_lse(q, operand(pk), operand(pv), n, whole_groups=True))
        errs.append(_errors(whole(q, pk, pv, jnp.int32(64)), _reference(q, pk, pv, 64)))
    print(layout, bits, group, "max relative error", max(errs))
    assert max(errs) <= TOL


@pytest.mark.parametrize("layout,bits", [("kcvt", 4), ("ktvt", 8), ("kcvc", 2), ("ktvc", 4)])
def test_pallas_kernel_in_interpret_mode_equals_dequantize_then_attend(layout, bits):
    """The Pallas kernel (interpret mode) on each layout, the code widths spread over them: head dim 64,
    per-channel groups of 16 keys or one group of 64 head dims per token, 40 slots (a last key block
    moved back), 20 queries (one padded query block); no key at all (KCVT)."""
    group = 16 if layout == "kcvc" else 64
    q, pk, pv = _case(layout, bits, group, slots=40, d=64, nq=20, seed=1)
    assert unfit(operand(pk), operand(pv)) is None
    for length in ((0, 39) if layout == "kcvt" else (39,)):
        err = _errors(packed_lse_pallas(q, operand(pk), operand(pv), jnp.int32(length), interpret=True),
                      _reference(q, pk, pv, length))
        print(layout, bits, length, "kernel max relative error", err)
        assert err <= TOL


def test_pallas_kernel_lowers_for_the_gpu_triton_backend():
    """No GPU here: the kernel at the published size (1041 queries, 2112 slots, 16 heads of 64, KCVT
    int4 group 64) lowers for CUDA through the Triton back end (block shapes, dots and loads it takes)."""
    slots, d = 2112, 64
    kc, vc = (c(4, 64) for c in LAYOUTS["kcvt"])
    x = jax.ShapeDtypeStruct((1, 16, slots, d), jnp.float32)

    def run(q, k, v, length):
        return packed_lse_pallas(q, operand(kc.encode(k)), operand(vc.encode(v)), length)

    lowered = jax.jit(run).trace(jax.ShapeDtypeStruct((1, 16, 1041, d), jnp.bfloat16), x, x,
                                 jax.ShapeDtypeStruct((), jnp.int32)).lower(lowering_platforms=("cuda",))
    assert "triton" in lowered.as_text().lower()


def test_unfit_layouts_are_named():
    q, pk, pv = _case("ktvt", 4, 16, slots=32, d=64)   # per-token dims in 4 groups: the JAX function runs
    assert "dim groups" in unfit(operand(pk), operand(pv))
    with options(packed_kernel="pallas"):
        from xsvggt_jax.attention.dispatch import packed_kernel
        assert packed_kernel(operand(pk), operand(pv)) == "jax"


def _avals(jaxpr):
    for eqn in jaxpr.eqns:
        yield from (v.aval for v in eqn.outvars)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _avals(sub)


def test_packed_path_builds_no_float_keys_or_values(micro):
    """Tracing a quantize-once layer's packed attention (16 slots in groups of 4): no float array with
    the stored tokens' shape [.., slots, D] appears (the dequantizing path builds two)."""
    from xsvggt_jax.cache import packed_attend
    cfg, params = micro
    cc = CacheConfig(prune="xstream", budget=16, pool=3, quant="kcvt", group=4, quant_head_dim=None, quant_once=True)
    kv = init_cache(cfg, cc, 1, (28, 28)).global_kv[0]
    slots, d = kv.k.slots, kv.k.dim
    new = jnp.zeros((1, 2, 9, d), jnp.float32)

    def floats(fn):
        jaxpr = jax.make_jaxpr(fn)(kv, jnp.int32(13), new, new, new).jaxpr
        return [a for a in _avals(jaxpr) if jnp.issubdtype(a.dtype, jnp.floating) and a.ndim >= 2
                and a.shape[-2] in (slots, slots + 9) and a.shape[-1] == d]

    assert not floats(lambda kv, n, q, k, v: packed_attend.attend(kv, n, q, k, v, cc))
    from xsvggt_jax.cache.core import update_layer
    assert floats(lambda kv, n, q, k, v: update_layer(kv, n, q, k, v, cache_cfg=cc, num_special=5,
                                                      key=jax.random.PRNGKey(0))[:2])


def test_stream_attended_packed_equals_the_dequantizing_stream(micro):
    """A quantize-once KCVT stream with pruning (9 tokens a frame, groups of 4, budget 24: windows fill
    and flush, groups are dropped at frame 3) and its camera trunk quantized: every frame's aggregator outputs and
    camera pose under --attention packed equal the dequantizing path's to TOL."""
    cfg, params = micro
    cc = CacheConfig(prune="xstream", budget=24, pool=3, quant="kcvt", group=4, quant_head_dim=None, quant_once=True)
    runs = {}
    for attention in ("auto", "packed"):
        fn = step_mod.make_step(cfg, cc, attention=attention, heads=False, return_aggregated=True)
        cache, outs = init_cache(cfg, cc, 1, (28, 28)), []
        for frame in micro_frames(3):
            cache, out = fn(params, cache, jnp.asarray(frame))
            outs.append(out)
        runs[attention] = outs
    errs = [max(rel_err(b["camera_pose"], a["camera_pose"]), *(rel_err(y, x) for x, y in zip(a["aggregated"],
                                                                                          b["aggregated"])))
            for a, b in zip(runs["auto"], runs["packed"])]
    print("stream, packed vs dequantizing, max relative error per frame:", errs)
    assert max(errs) <= TOL and max(errs) > 0   # > 0: the packed path ran


def test_run_option_refused_where_it_cannot_apply(capsys):
    assert config_unsupported(CacheConfig(prune="xstream", quant="kcvt")) is not None
    assert config_unsupported(CacheConfig(prune="xstream", quant="kcvt", quant_once=True)) is None
    assert config_unsupported(CacheConfig(prune="none", quant="kcvt")) is None      # unpruned: groups stay whole
    argv = ["reconstruct", "nothing.npz", "--out", "o", "--params", "p", "--attention", "packed"]
    assert "not with --offline" in run_error(argv + ["--offline", "causal"], capsys)
    assert "set --quant" in run_error(argv, capsys)
    assert "needs --quant-once" in run_error(argv + ["--quant", "kcvt", "--prune", "xstream"], capsys)
