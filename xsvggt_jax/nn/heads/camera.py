"""Camera head: AdaLN-modulated transformer trunk, refined iteratively into a 9-d pose encoding."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from xsvggt_jax.attention.dispatch import MaskArg
from xsvggt_jax.config import ModelConfig
from xsvggt_jax.nn.layers import Block, Dense, LayerNorm, Mlp
from xsvggt_jax.nn.heads.activations import activate_pose

if TYPE_CHECKING:
    from xsvggt_jax.cache.core import LayerCache

Array = jax.Array
POSE_DIM = 9  # translation (3), quaternion xyzw (4), field of view h, w (2)


class CameraHead(nn.Module):
    cfg: ModelConfig

    def setup(self):
        cfg, cam = self.cfg, self.cfg.camera
        dim = 2 * cfg.embed_dim
        kw = dict(dtype=cfg.head_jnp_dtype, precision=cfg.jax_precision)
        self.trunk = [Block(cam.num_heads, cam.mlp_ratio, name=f"trunk_{i}", **kw) for i in range(cam.trunk_depth)]
        self.token_norm = LayerNorm()
        self.trunk_norm = LayerNorm()
        self.empty_pose_tokens = self.param("empty_pose_tokens", nn.initializers.zeros, (1, 1, POSE_DIM))
        self.embed_pose = Dense(dim, **kw)
        self.poseLN_modulation_1 = Dense(3 * dim, **kw)
        self.adaln_norm = LayerNorm(1e-6, use_affine=False)
        self.pose_branch = Mlp(dim // 2, POSE_DIM, **kw)

    def __call__(self, tokens: Array, *, mask: MaskArg = None,
                 caches: Optional[Sequence[LayerCache]] = None) -> tuple[list[Array], Optional[tuple]]:
        """tokens: last aggregator output [B, S, P', 2C]. Returns (the pose encoding [B, S, 9] of each
        refinement iteration, the trunk caches after this call or None). `mask` masks the trunk
        attention across frames (offline; `attention.attend`'s, over the S camera tokens). `caches`:
        one streaming cache per trunk block; every iteration appends the frame's token to each. The
        random key of the call (iteration it, block i) is fold_in(caches[i].key, it): distinct per
        call, deterministic.

        The iterations are one `nn.scan` over the shared trunk (XLA compiles the trunk once, not
        `iterations` times). As upstream, each iteration reads the previous prediction through a
        stop-gradient (no backpropagation through the refinement), so the gradient of iteration k's
        pose reaches the parameters through its own update only.
        """
        # camera tokens [B, S, 2C], in the head dtype ("auto": bfloat16 trunk tokens -> float32)
        x = self.token_norm(tokens[:, :, 0].astype(self.cfg.head_jnp_dtype))
        b, s, _ = x.shape
        empty = jnp.broadcast_to(self.empty_pose_tokens, (b, s, POSE_DIM)).astype(x.dtype)
        keys = None if caches is None else tuple(c.key for c in caches)

        def iteration(head: "CameraHead", carry, it):
            pred, caches = carry                              # pred [B, S, 9]: 0 before the first
            pred = jax.lax.stop_gradient(pred)
            src = jnp.where(it == 0, empty, pred)
            shift, scale, gate = jnp.split(head.poseLN_modulation_1(nn.silu(head.embed_pose(src))), 3, -1)
            h = gate * (head.adaln_norm(x) * (1 + scale) + shift) + x
            new_caches = []
            for i, blk in enumerate(head.trunk):
                if caches is None:
                    h, _ = blk(h, mask=mask)
                else:
                    h, c = blk(h, mask=mask, cache=caches[i].replace(key=jax.random.fold_in(keys[i], it)))
                    new_caches.append(c.replace(key=keys[i]))
            pred = pred + head.pose_branch(head.trunk_norm(h))  # the first: 0 + delta == delta exactly
            return (pred, None if caches is None else tuple(new_caches)), activate_pose(pred)

        n = self.cfg.camera.iterations
        refine = nn.scan(iteration, variable_broadcast="params", split_rngs={"params": False}, length=n)
        carry = (jnp.zeros((b, s, POSE_DIM), x.dtype), None if caches is None else tuple(caches))
        (_, caches), preds = refine(self, carry, jnp.arange(n))
        return [preds[i] for i in range(n)], caches
