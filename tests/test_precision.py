"""The precision policy: dtype "auto" (the default) is float32 on CPU and, on accelerators, what upstream
StreamVGGT evaluates with: the aggregator (DINOv2 + alternating attention) in bfloat16 (its autocast)
and every head, the camera head's trunk and K/V cache included, in float32 (`autocast(enabled=False)`).

The accelerator case is checked on CPU by faking the backend that resolves "auto"
(`config.compute_backend`): the traced program's dtypes are the backend-independent part.
"""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import xsvggt_jax.config as config
from conftest import micro_cfg, micro_frames, nhwc
from xsvggt_jax.cache.core import CacheConfig, init_cache
from xsvggt_jax.config import ConfigError, ModelConfig
from xsvggt_jax.nn.model import StreamVGGT, init_params, param_shapes
from xsvggt_jax.stream.step import make_step, step

HEADS = ("camera_head", "depth_head", "point_head", "track_head")
MATMULS = ("dot_general", "conv_general_dilated")
# measured on CPU, the reference tiny model streamed 4 frames (uncompressed cache, 8 queries): max
# |auto(gpu) - float32| / max |float32| per output: pts3d_in_other_view 2.0e-2, depth 8.0e-3,
# camera_pose 7.1e-3, conf 5.8e-3, depth_conf 5.2e-3, vis 4.3e-3, track_conf 3.8e-3, track 0 (a streamed
# frame's track is its query point); bfloat16 keeps 8 significant bits (2^-8 = 3.9e-3 per rounding)
MIXED_TOL = 5e-2


@pytest.fixture
def on(monkeypatch):
    """on(backend): make "auto" resolve as on `backend` ("cpu", "gpu", "tpu")."""
    return lambda backend: monkeypatch.setattr(config, "compute_backend", lambda: backend)


def matmul_dtypes(jaxpr) -> list:
    """The input dtypes of every matmul / convolution in a (closed) jaxpr, sub-jaxprs (scan, cond, pjit,
    remat) included, in program order."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in MATMULS:
            out.append(tuple(str(v.aval.dtype) for v in eqn.invars))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            out += matmul_dtypes(sub)
    return out


def images_queries(cfg, frames=2):
    side = 28
    return (jax.ShapeDtypeStruct((1, frames, side, side, 3), jnp.float32),
            jax.ShapeDtypeStruct((1, 3, 2), jnp.float32))


# ------------------------------------------------------------------------------------------- config
def test_auto_is_the_default_and_resolves_by_backend(on):
    cfg = ModelConfig()
    assert cfg.dtype == "auto" and ModelConfig.preset("micro").dtype == "auto"
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["dtype"] == "auto"
    assert "dtype" not in cfg.architecture()  # a runtime field: params and fingerprints do not change
    on("cpu")
    assert cfg.compute_dtypes() == {"trunk": "float32", "heads": "float32"}
    assert cfg.trunk_jnp_dtype == cfg.head_jnp_dtype == cfg.jnp_dtype == jnp.float32
    for accelerator in ("gpu", "tpu"):
        on(accelerator)
        assert cfg.compute_dtypes() == {"trunk": "bfloat16", "heads": "float32"}, accelerator
        assert cfg.trunk_jnp_dtype == cfg.jnp_dtype == jnp.bfloat16 and cfg.head_jnp_dtype == jnp.float32
        for dtype in config.DTYPES:  # a concrete dtype is the whole network's, on every backend
            assert cfg.replace(dtype=dtype).compute_dtypes() == {"trunk": dtype, "heads": dtype}
    with pytest.raises(ConfigError, match=r"dtype must be one of \['auto', 'bfloat16', 'float16', 'float32'\]"):
        cfg.replace(dtype="mixed")


# --------------------------------------------------------------------------------------------- CPU
def test_auto_on_cpu_is_bit_identical_to_float32(on):
    """Streamed outputs (all heads, tracks) and the cache after 3 frames, bit for bit."""
    on("cpu")
    cfg = micro_cfg()
    params = init_params(cfg, jax.random.PRNGKey(0))
    frames = micro_frames(3)
    queries = jnp.asarray([[[3.0, 4.0], [20.5, 10.0]]])
    results = {}
    for dtype in ("auto", "float32"):
        c = cfg.replace(dtype=dtype)
        cc = CacheConfig("xstream", 16, 4)
        fn, cache = make_step(c, cc), init_cache(c, cc, 1, (28, 28), query_points=queries)
        outs = []
        for t in range(3):
            cache, out = fn(params, cache, jnp.asarray(frames[t]))
            outs.append(out)
        results[dtype] = (outs, cache.global_kv, cache.camera_kv)
    for a, b in zip(jax.tree.leaves(results["auto"]), jax.tree.leaves(results["float32"])):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------- accelerator (faked)
def test_auto_on_an_accelerator_runs_the_aggregator_in_bfloat16_and_the_heads_in_float32(on):
    on("gpu")
    cfg = micro_cfg()
    p = param_shapes(cfg)
    images, queries = images_queries(cfg)
    model = StreamVGGT(cfg)

    # every module's output: bfloat16 inside the aggregator, float32 in every head
    out, inter = jax.eval_shape(lambda p, x, q: model.apply({"params": p}, x, q, capture_intermediates=True,
                                                            mutable=["intermediates"]), p, images, queries)
    seen = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(inter["intermediates"])[0]:
        top = path[0].key
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            seen.setdefault(top, set()).add(str(leaf.dtype))
    assert seen["aggregator"] == {"bfloat16"}, seen
    for head in HEADS:
        assert seen[head] == {"float32"}, (head, seen)
    assert all(v.dtype == jnp.float32 for v in out.values())

    # every matmul / convolution of the program: exactly the aggregator's run in bfloat16 (DINOv2 patch
    # embedding, blocks, frame / global attention), every other one (all heads, including the camera
    # trunk and the tracker inside their scans) in float32
    slot = jax.ShapeDtypeStruct((2,), jnp.int32)
    agg = matmul_dtypes(jax.make_jaxpr(lambda p, x, s: model.apply({"params": p}, x, s,
                                                                    method=lambda m, x, s: m.aggregator(x, s)))(
        p, images, slot).jaxpr)
    whole = matmul_dtypes(jax.make_jaxpr(lambda p, x, q: model.apply({"params": p}, x, q))(p, images, queries).jaxpr)
    assert agg and all(set(d) == {"bfloat16"} for d in agg), agg
    assert sum(set(d) == {"bfloat16"} for d in whole) == len(agg)
    assert sum(set(d) == {"float32"} for d in whole) == len(whole) - len(agg) > 0
    heads = [d for d in whole if set(d) != {"bfloat16"}]
    assert all(set(d) == {"float32"} for d in heads), heads


def test_auto_on_an_accelerator_keeps_global_kv_in_bfloat16_and_camera_kv_in_float32(on):
    on("gpu")
    cfg = micro_cfg()
    cc = CacheConfig("xstream", 16, 4)
    cache = init_cache(cfg, cc, 1, (28, 28), query_points=jnp.zeros((1, 2, 2)))
    assert {x.dtype for x in jax.tree.leaves(cache.global_kv) if jnp.issubdtype(x.dtype, jnp.floating)
            and x.ndim > 3} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(cache.camera_kv) if x.ndim > 3} == {jnp.dtype(jnp.float32)}
    # the step writes the cache back in the dtypes it was built with, and its outputs are float32
    p = param_shapes(cfg)
    frame = jax.ShapeDtypeStruct((1, 28, 28, 3), jnp.float32)
    new, out = jax.eval_shape(lambda p, c, f: step(cfg, cc, p, c, f, return_aggregated=True), p, cache, frame)
    assert jax.tree.map(lambda x: x.dtype, new) == jax.tree.map(lambda x: x.dtype, cache)
    assert {a.dtype for a in out.pop("aggregated")} == {jnp.dtype(jnp.bfloat16)}
    assert {v.dtype for v in out.values()} == {jnp.dtype(jnp.float32)}, {k: v.dtype for k, v in out.items()}


def test_bfloat16_still_computes_the_heads_in_bfloat16(on):
    on("gpu")
    cfg = micro_cfg().replace(dtype="bfloat16")
    p = param_shapes(cfg)
    images, queries = images_queries(cfg)
    model = StreamVGGT(cfg)
    _, inter = jax.eval_shape(lambda p, x, q: model.apply({"params": p}, x, q, capture_intermediates=True,
                                                          mutable=["intermediates"]), p, images, queries)
    for head in HEADS:  # (the DPT heads activate their last output in float32, as before)
        assert "bfloat16" in {str(x.dtype) for x in jax.tree.leaves(inter["intermediates"][head])}, head
    tokens = jax.ShapeDtypeStruct((1, 2, 9, 2 * cfg.embed_dim), jnp.bfloat16)
    camera_head = lambda p, t: model.apply({"params": p}, t, method=lambda m, t: m.camera_head(t))
    camera = matmul_dtypes(jax.make_jaxpr(camera_head)(p, tokens).jaxpr)
    assert camera and all(set(d) == {"bfloat16"} for d in camera), camera  # the trunk (in its scan) too
    cache = init_cache(cfg, CacheConfig("xstream", 16, 4), 1, (28, 28))
    assert {x.dtype for x in jax.tree.leaves(cache.camera_kv) if x.ndim > 3} == {jnp.dtype(jnp.bfloat16)}


def test_auto_mixed_stream_is_finite_and_close_to_float32(on, tiny_cfg, tiny_params, tiny_frames):
    """The reference tiny model streamed in the accelerator's mixed mode, run on CPU: every output
    finite and within MIXED_TOL (relative to the output's largest magnitude) of float32."""
    images, queries = tiny_frames
    frames = nhwc(images[:4])
    results = {}
    for backend, dtype in (("cpu", "float32"), ("gpu", "auto")):
        on(backend)
        cfg = tiny_cfg.replace(dtype=dtype)
        cc = CacheConfig.uncompressed()
        fn, cache = make_step(cfg, cc), init_cache(cfg, cc, 1, frames.shape[1:3], 4, jnp.asarray(queries)[None])
        outs = []
        for t in range(4):
            cache, out = fn(tiny_params, cache, frames[t:t + 1])
            outs.append({k: np.asarray(v, np.float32) for k, v in out.items()})
        results[dtype] = {k: np.stack([o[k] for o in outs]) for k in outs[0]}
    errs = {}
    for k, ref in results["float32"].items():
        got = results["auto"][k]
        assert np.isfinite(got).all(), k
        errs[k] = float(np.abs(got - ref).max() / np.abs(ref).max())
    print("auto (gpu, on CPU) vs float32, max rel err:", {k: f"{v:.2e}" for k, v in errs.items()})
    assert max(errs.values()) < MIXED_TOL, errs
    assert max(errs.values()) > 0  # the bfloat16 aggregator did run
