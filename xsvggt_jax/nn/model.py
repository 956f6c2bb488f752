"""The StreamVGGT network (Flax Linen): aggregator + camera, depth, point and track heads.

Methods take images NHWC in [0, 1]: [B, S, H, W, 3]. Outputs are dicts with upstream names, batch
first and frame axis second:
  pts3d_in_other_view [B,S,H,W,3], conf [B,S,H,W], depth [B,S,H,W,1], depth_conf [B,S,H,W],
  camera_pose [B,S,9], and with query points: track [B,S,N,2], vis [B,S,N], track_conf [B,S,N].
query_valid [B, N] bool (optional, None: all valid) marks padded query points, which then do not
change the valid points' outputs (`heads.track`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xsvggt_jax.nn.aggregator import Aggregator
from xsvggt_jax.attention.dispatch import AttentionConfigError, AttentionSpec, check_impl
from xsvggt_jax.attention.masks import FrameCausal, Full
from xsvggt_jax.config import ModelConfig
from xsvggt_jax.nn.heads.camera import CameraHead
from xsvggt_jax.nn.heads.dpt import DPTHead
from xsvggt_jax.nn.heads.track import TrackHead

if TYPE_CHECKING:
    from xsvggt_jax.cache.core import LayerCache

Array = jax.Array


class StreamVGGT(nn.Module):
    """attention: the global attention implementation, one of `attention.ATTENTION_IMPLS`
    ("ring"/"gather" only under a mesh axis: `stream.sharded.offline_sharded`; "packed": streaming
    layers with a quantized cache attend to its codes). remat: rematerialise the aggregator's
    transformer blocks in the backward pass (training)."""

    cfg: ModelConfig
    attention: str = "auto"
    remat: bool = False

    def setup(self):
        cfg = self.cfg
        check_impl(self.attention)
        self.aggregator = Aggregator(cfg, remat=self.remat)
        self.camera_head = CameraHead(cfg)
        self.point_head = DPTHead(cfg, cfg.dpt.features, out_dim=4, activation="inv_log", conf_activation="expp1")
        self.depth_head = DPTHead(cfg, cfg.dpt.features, out_dim=2, activation="exp", conf_activation="expp1")
        self.track_head = TrackHead(cfg)

    def __call__(self, images: Array, query_points: Optional[Array] = None, causal: bool = True) -> dict:
        return self.offline(images, query_points, causal)

    def _heads(self, aggregated, pose: Array, h: int, w: int, query_points: Optional[Array],
               query_valid: Optional[Array] = None) -> dict:
        b, s = aggregated[0].shape[:2]
        pts, pts_conf = self.point_head(aggregated, h, w)
        depth, depth_conf = self.depth_head(aggregated, h, w)
        out = {
            "pts3d_in_other_view": pts.reshape(b, s, h, w, 3),
            "conf": pts_conf.reshape(b, s, h, w),
            "depth": depth.reshape(b, s, h, w, 1),
            "depth_conf": depth_conf.reshape(b, s, h, w),
            "camera_pose": pose,
        }
        if query_points is not None:
            out["track"], out["vis"], out["track_conf"] = self.track_head(
                aggregated, h, w, query_points, query_valid)
        return out

    def offline(self, images: Array, query_points: Optional[Array] = None, causal: bool = True,
                return_aggregated: bool = False, *, spec: Optional[AttentionSpec] = None,
                frame_offset: Any = 0) -> dict:
        """Batch forward over all S frames. causal: frame t sees frames <= t (StreamVGGT); otherwise
        every frame sees every frame (VGGT-style, upstream XStreamVGGT's batch path).

        spec: how the global attention (aggregator and camera trunk) runs, its mask set here from
        `causal`; default `AttentionSpec(impl=self.attention)`. With a mesh `axis` (ring, gather; inside
        `jax.shard_map`, see `stream.sharded.offline_sharded`) `images` are this device's contiguous
        slice of the clip, which starts at global frame `frame_offset` (int, may be traced): it picks
        the frames' special-token slots. No tracks then (the track head attends along the whole clip).
        """
        b, s, h, w, _ = images.shape
        spec = AttentionSpec(impl=self.attention) if spec is None else spec
        if spec.axis is not None and query_points is not None:
            raise AttentionConfigError("tracks are not available from the frame-sharded forward")
        p = self.cfg.tokens_per_frame(h, w)
        slot = jnp.minimum(frame_offset + jnp.arange(s), 1)
        mask = FrameCausal if causal else (lambda tokens_per_frame: Full())
        aggregated, _ = self.aggregator(images, slot, mask=dataclasses.replace(spec, mask=mask(p)))
        pose = self.camera_head(aggregated[-1], mask=dataclasses.replace(spec, mask=mask(1)))[0][-1]
        out = self._heads(aggregated, pose, h, w, query_points)
        if return_aggregated:
            out["aggregated"] = aggregated
        return out

    def stream_frame(self, images: Array, slot: Array, global_caches: Sequence[LayerCache],
                     camera_caches: Sequence[LayerCache], query_points: Optional[Array] = None,
                     return_aggregated: bool = False, heads: bool = True,
                     query_valid: Optional[Array] = None) -> tuple[dict, tuple[tuple, tuple]]:
        """One streaming step: images [B, 1, H, W, 3]; slot: [1] int32 special-token slot.

        global_caches / camera_caches: one `LayerCache` per global block / camera trunk block.
        Returns (outputs, (next global caches, next camera caches)). heads=False runs the aggregator
        and the camera head only (outputs: camera_pose). query_valid: [B, N] bool or None.
        """
        h, w = images.shape[2:4]
        spec = None if self.attention == "auto" else AttentionSpec(impl=self.attention)  # the cached layers'
        aggregated, global_caches = self.aggregator(images, slot, mask=spec, caches=global_caches)
        if global_caches and global_caches[0].frame_feature is not None:  # keyframes: the camera trunk
            camera_caches = tuple(c.replace(frame_feature=global_caches[0].frame_feature)  # keeps the
                                  for c in camera_caches)                                  # same frames
        poses, camera_caches = self.camera_head(aggregated[-1], mask=spec, caches=camera_caches)
        if heads:
            out = self._heads(aggregated, poses[-1], h, w, query_points, query_valid)
        else:
            out = {"camera_pose": poses[-1]}
        if return_aggregated:
            out["aggregated"] = aggregated
        return out, (global_caches, camera_caches)

    def dino_tokens(self, images: Array) -> Array:
        """Normalised DINOv2 patch tokens of images [N, H, W, 3] -> [N, Hp*Wp, C] (for parity tests)."""
        from xsvggt_jax.nn.aggregator import RESNET_MEAN, RESNET_STD
        return self.aggregator.patch_embed((images - RESNET_MEAN) / RESNET_STD)


def _init_input_side(cfg: ModelConfig) -> int:
    """A frame side big enough that every level of the track head's correlation pyramid is non-empty."""
    return cfg.patch_size * max(2, -(-(cfg.track.stride * 2 ** cfg.track.corr_levels) // cfg.patch_size))


def param_shapes(cfg: ModelConfig) -> dict:
    """Parameter tree of `cfg` as ShapeDtypeStructs (traced abstractly: no allocation, no compile)."""
    side = _init_input_side(cfg)
    images = jax.ShapeDtypeStruct((1, 2, side, side, 3), jnp.float32)
    queries = jax.ShapeDtypeStruct((1, 1, 2), jnp.float32)
    return jax.eval_shape(StreamVGGT(cfg).init, jax.random.key(0), images, queries)["params"]


def init_params(cfg: ModelConfig, key: Array) -> dict:
    """Random parameters of sane scale for `cfg` (demos, benchmarks, shape tests).

    Built leaf by leaf from `param_shapes` rather than by `StreamVGGT.init`, which would compile the
    whole forward pass: kernels ~ N(0, 1/fan_in), biases 0, norm scales 1, LayerScale gammas 0.1,
    embeddings and tokens ~ N(0, 0.02^2).
    """
    flat = jax.tree_util.tree_flatten_with_path(param_shapes(cfg))[0]
    keys = jax.random.split(key, len(flat))
    rng = np.random.default_rng(np.asarray(jax.random.key_data(keys[0])).ravel().tolist())
    leaves = []
    for path, leaf in flat:
        name, shape = path[-1].key, leaf.shape
        if name in ("kernel", "in_proj_kernel"):
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
        elif name in ("bias", "in_proj_bias"):
            value = np.zeros(shape)
        elif name == "scale":
            value = np.ones(shape)
        elif name == "gamma":
            value = np.full(shape, 0.1)
        else:
            value = 0.02 * rng.standard_normal(shape)
        leaves.append(jnp.asarray(value, leaf.dtype))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(param_shapes(cfg)), leaves)
