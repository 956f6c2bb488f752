"""Published-size checks without weights: converter coverage and an abstract streaming step."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from conftest import require_reference
from xsvggt_jax.weights.convert import ConversionError
from xsvggt_jax.weights.convert import check_coverage
from xsvggt_jax.weights.convert import convert_state_dict
from xsvggt_jax.weights.keymap import map_key
from xsvggt_jax.cache.core import CacheConfig, init_cache
from xsvggt_jax.config import ModelConfig
from xsvggt_jax.nn.model import param_shapes
from xsvggt_jax.stream.step import step


@pytest.fixture(scope="module")
def full_keys():
    d = json.loads((require_reference() / "streamvggt_full_keys.json").read_text())
    return {k: tuple(v[0]) for k, v in d["keys"].items()}, d["num_params"]


def test_published_converter_covers_every_key(full_keys):
    keys, num_params = full_keys
    assert len(keys) == 1797
    cfg = ModelConfig.published()
    check_coverage(keys, cfg, "streamvggt_full_keys.json")  # raises on any unused/missing/mismatch
    shapes = flatten_dict(param_shapes(cfg))
    assert len(shapes) == len(keys)
    assert sum(int(np.prod(s.shape)) for s in shapes.values()) == num_params


def test_coverage_errors_list_every_problem(full_keys):
    keys, _ = full_keys
    bad = dict(keys)
    bad["aggregator.bogus.weight"] = (3, 3)
    del bad["camera_head.token_norm.weight"]
    bad["depth_head.norm.bias"] = (7,)
    with pytest.raises(ConversionError) as e:
        check_coverage(bad, ModelConfig.published(), "bad.pth")
    msg = str(e.value)
    assert "aggregator.bogus.weight" in msg and "camera_head.token_norm.scale" in msg and "depth_head.norm.bias" in msg


def test_key_map_transforms():
    path, fn = map_key("aggregator.frame_blocks.3.attn.qkv.weight", 2)
    assert path == "aggregator.frame_blocks_3.attn.qkv.kernel"
    w = np.arange(6).reshape(2, 3)
    np.testing.assert_array_equal(fn(w), w.T)
    path, fn = map_key("depth_head.resize_layers.0.weight", 4)  # ConvTranspose2d [in, out, kh, kw]
    assert path == "depth_head.resize_layers_0.kernel" and fn(np.zeros((2, 3, 4, 5))).shape == (4, 5, 2, 3)
    path, fn = map_key("depth_head.scratch.layer1_rn.weight", 4)  # Conv2d [out, in, kh, kw]
    assert fn(np.zeros((2, 3, 4, 5))).shape == (4, 5, 3, 2)
    assert map_key("track_head.tracker.ffeat_norm.weight", 1)[0] == "track_head.tracker.ffeat_norm.scale"
    assert map_key("depth_head.scratch.output_conv2.2.bias", 1)[0] == "depth_head.output_conv2_2.bias"


def test_convert_rejects_extra_missing_and_misshapen(tiny_params, tiny_cfg):
    from xsvggt_jax.weights.torch_reader import read_state_dict
    from conftest import TINY
    sd = read_state_dict(TINY / "weights.safetensors")
    for mutate, needle in [
        (lambda d: d.__setitem__("extra.weight", np.zeros((2, 2), np.float32)), "extra.weight"),
        (lambda d: d.pop("camera_head.embed_pose.bias"), "camera_head.embed_pose.bias"),
        (lambda d: d.__setitem__("aggregator.camera_token", np.zeros((1, 2, 1, 64), np.float32)),
         "aggregator.camera_token"),
    ]:
        bad = dict(sd)
        mutate(bad)
        with pytest.raises(ConversionError, match=needle.replace(".", r"\.")):
            convert_state_dict(bad, tiny_cfg)


def test_published_streaming_step_eval_shape():
    """A 518x392 streaming step of the published model, traced abstractly (no weights, no FLOPs)."""
    cfg = ModelConfig.published()
    h, w = 392, 518
    params = param_shapes(cfg)
    cc = CacheConfig.uncompressed()
    cache = jax.eval_shape(lambda: init_cache(cfg, cc, 1, (h, w), max_frames=2, query_points=jnp.zeros((1, 4, 2))))
    frame = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
    new_cache, out = jax.eval_shape(lambda p, c, f: step(cfg, cc, p, c, f), params, cache, frame)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), new_cache) == jax.tree.map(lambda a: (a.shape, a.dtype), cache)
    p = cfg.tokens_per_frame(h, w)
    slots = -(-2 * p // cc.chunk) * cc.chunk  # two frames (> one chunk), rounded up to whole attention chunks
    assert 2 * p > cc.chunk
    assert p == 5 + 28 * 37 and new_cache.global_kv[0].k.shape == (1, 16, slots, 64)
    assert out["depth"].shape == (1, h, w, 1) and out["pts3d_in_other_view"].shape == (1, h, w, 3)
    assert out["camera_pose"].shape == (1, 9) and out["track"].shape == (1, 4, 2)
