"""Alternating-attention aggregator: per-frame attention and global (cross-frame) attention.

Token layout of every frame: [camera (1), registers (R), patches (Hp*Wp)], P' = 1 + R + Hp*Wp.
Camera/register tokens come from slot 0 for the first frame of a stream and slot 1 for later ones.
Output `i` (what the heads read) is concat(frame block i output, global block i output): [B, S, P', 2C].
"""

from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xsvggt_jax.attention.dispatch import MaskArg
from xsvggt_jax.cache.frames import frame_descriptor
from xsvggt_jax.config import ModelConfig
from xsvggt_jax.nn.dino import Dinov2
from xsvggt_jax.nn.layers import Block, KVCache
from xsvggt_jax.nn.rope import make_rope

Array = jax.Array

RESNET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
RESNET_STD = np.array([0.229, 0.224, 0.225], np.float32)


class PositionalBlock(Block):
    """`Block` taking (x, rope, mask, cache) positionally, so that `nn.remat` can mark the `rope`
    callable and the `mask` (a mask / `AttentionSpec` object, not an array) static (argnums 2, 3;
    0 is the module); same parameters as Block."""

    def __call__(self, x: Array, rope=None, mask=None, cache=None):
        return super().__call__(x, rope=rope, mask=mask, cache=cache)


class Aggregator(nn.Module):
    """remat: rematerialise every frame / global block in the backward pass (`jax.checkpoint`)."""

    cfg: ModelConfig
    remat: bool = False

    def setup(self):
        cfg = self.cfg
        c = cfg.embed_dim
        self.patch_embed = Dinov2(cfg)
        block_cls = nn.remat(PositionalBlock, static_argnums=(2, 3)) if self.remat else PositionalBlock
        block = lambda name: block_cls(cfg.num_heads, cfg.mlp_ratio, qk_norm=cfg.qk_norm, dtype=cfg.trunk_jnp_dtype,
                                   precision=cfg.jax_precision, name=name)
        self.frame_blocks = [block(f"frame_blocks_{i}") for i in range(cfg.depth)]
        self.global_blocks = [block(f"global_blocks_{i}") for i in range(cfg.depth)]
        self.camera_token = self.param("camera_token", nn.initializers.normal(1e-6), (1, 2, 1, c))
        self.register_token = self.param("register_token", nn.initializers.normal(1e-6),
                                         (1, 2, cfg.num_register_tokens, c))

    def __call__(self, images: Array, slot: Array, *, mask: MaskArg = None,
                 caches: Optional[Sequence[KVCache]] = None) -> tuple[list[Array], Optional[tuple]]:
        """Run the aggregator on a clip.

        images: [B, S, H, W, 3] in [0, 1]. slot: [S] int32, special-token slot per frame (0 or 1).
        mask: the global attention's mask (offline; the frame attention has none): an
            `attention.AttentionSpec` (e.g. a `FrameCausal` mask evaluated per block, and the
            implementation), a mask object, an additive array, or None.
        caches: one streaming KV cache per global block (`cache.LayerCache`), or None (offline). A cache
            that selects whole frames by their feature (`wants_frame_feature`, keyframes) is handed
            the frame's `frames.frame_descriptor` of the DINO patch tokens.
        Returns (list of `depth` arrays [B, S, P', 2C], the global blocks' caches after this call or None).
        """
        cfg = self.cfg
        b, s, h, w, _ = images.shape
        ph, pw = h // cfg.patch_size, w // cfg.patch_size
        x = (images - RESNET_MEAN) / RESNET_STD
        patch = self.patch_embed(x.reshape(b * s, h, w, 3)).reshape(b, s, ph * pw, cfg.embed_dim)

        cam = self.camera_token[0][slot]        # [S, 1, C]
        reg = self.register_token[0][slot]      # [S, R, C]
        special = jnp.broadcast_to(jnp.concatenate([cam, reg], 1)[None],
                                   (b, s, cfg.num_special_tokens, cfg.embed_dim)).astype(patch.dtype)
        tokens = jnp.concatenate([special, patch], axis=2)  # [B, S, P', C]
        if caches is not None and caches and caches[0].wants_frame_feature:  # static: keyframes only
            feature = frame_descriptor(patch)                                  # [B, C], this frame's
            caches = tuple(c.replace(frame_feature=feature) for c in caches)
        p = tokens.shape[2]

        rope_frame = make_rope(ph, pw, cfg.num_special_tokens, cfg.head_dim, cfg.rope_freq)
        rope_global = make_rope(ph, pw, cfg.num_special_tokens, cfg.head_dim, cfg.rope_freq, frames=s)

        outputs, new_caches = [], []
        for i in range(cfg.depth):
            t, _ = self.frame_blocks[i](tokens.reshape(b * s, p, -1), rope_frame, None, None)
            frame_out = t.reshape(b, s, p, -1)
            t, c = self.global_blocks[i](frame_out.reshape(b, s * p, -1), rope_global, mask,
                                         None if caches is None else caches[i])
            tokens = t.reshape(b, s, p, -1)
            new_caches.append(c)
            outputs.append(jnp.concatenate([frame_out, tokens], axis=-1))
        return outputs, (None if caches is None else tuple(new_caches))
