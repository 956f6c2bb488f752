"""Camera head: AdaLN-modulated transformer trunk, refined iteratively into a 9-d pose encoding."""

from __future__ import annotations

from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..config import ModelConfig
from ..layers import Block, Dense, KVHook, LayerNorm, Mlp
from .activations import activate_pose

Array = jax.Array
POSE_DIM = 9  # translation (3), quaternion xyzw (4), field of view h, w (2)


class CameraHead(nn.Module):
    cfg: ModelConfig

    def setup(self):
        cfg, cam = self.cfg, self.cfg.camera
        dim = 2 * cfg.embed_dim
        kw = dict(dtype=cfg.jnp_dtype, precision=cfg.jax_precision)
        self.trunk = [Block(cam.num_heads, cam.mlp_ratio, name=f"trunk_{i}", **kw) for i in range(cam.trunk_depth)]
        self.token_norm = LayerNorm()
        self.trunk_norm = LayerNorm()
        self.empty_pose_tokens = self.param("empty_pose_tokens", nn.initializers.zeros, (1, 1, POSE_DIM))
        self.embed_pose = Dense(dim, **kw)
        self.poseLN_modulation_1 = Dense(3 * dim, **kw)
        self.adaln_norm = LayerNorm(1e-6, use_affine=False)
        self.pose_branch = Mlp(dim // 2, POSE_DIM, **kw)

    def __call__(self, tokens: Array, *, bias: Optional[Array] = None,
                 kv_hook: Optional[Callable[[int], KVHook]] = None) -> list[Array]:
        """tokens: last aggregator output [B, S, P', 2C]. Returns the pose encoding [B, S, 9] of each
        refinement iteration. `bias` [S, S] masks the trunk attention across frames (offline);
        `kv_hook(block)` substitutes keys/values (streaming cache; called once per iteration and block).
        """
        x = self.token_norm(tokens[:, :, 0])  # camera tokens [B, S, 2C]
        b, s, _ = x.shape
        pred = None
        preds = []
        for _ in range(self.cfg.camera.iterations):
            src = jnp.broadcast_to(self.empty_pose_tokens, (b, s, POSE_DIM)) if pred is None else pred
            shift, scale, gate = jnp.split(self.poseLN_modulation_1(nn.silu(self.embed_pose(src))), 3, -1)
            h = gate * (self.adaln_norm(x) * (1 + scale) + shift) + x
            for i, blk in enumerate(self.trunk):
                h, _ = blk(h, bias=bias, kv_hook=kv_hook(i) if kv_hook is not None else None)
            delta = self.pose_branch(self.trunk_norm(h))
            pred = delta if pred is None else pred + delta
            preds.append(activate_pose(pred))
        return preds
