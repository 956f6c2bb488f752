"""DINOv2 ViT with register tokens, used as the per-frame patch embedder."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from xsvggt_jax.config import ModelConfig
from xsvggt_jax.nn.layers import Block, LayerNorm
from xsvggt_jax.nn.resample import aa_bicubic_matrix, resize_hw

Array = jax.Array


def interpolate_pos_embed(grid: Array, patch_h: int, patch_w: int, precision=jax.lax.Precision.HIGHEST) -> Array:
    """Resize a square position-embedding grid [M, M, C] to [patch_h, patch_w, C].

    torch `interpolate(mode="bicubic", antialias=True)`, computed in float32. The identity when the
    sizes already match (as upstream returns the table unchanged then).
    """
    m = grid.shape[0]
    if (patch_h, patch_w) == (m, m):
        return grid
    return resize_hw(grid.astype(jnp.float32), aa_bicubic_matrix(m, patch_h), aa_bicubic_matrix(m, patch_w),
                     precision)


class PatchEmbed(nn.Module):
    """Non-overlapping patch x patch convolution written as a patch einsum. kernel: [p, p, 3, C] (HWIO)."""

    patch_size: int
    embed_dim: int
    dtype: Any = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: Array) -> Array:  # x: [N, H, W, 3] -> [N, Hp*Wp, C]
        p = self.patch_size
        n, h, w, c = x.shape
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (p, p, c, self.embed_dim))
        bias = self.param("bias", nn.initializers.zeros, (self.embed_dim,))
        patches = x.reshape(n, h // p, p, w // p, p, c).astype(self.dtype)
        y = jnp.einsum("nhpwqc,pqco->nhwo", patches, kernel.astype(self.dtype), precision=self.precision)
        return (y + bias.astype(self.dtype)).reshape(n, (h // p) * (w // p), self.embed_dim)


class Dinov2(nn.Module):
    """Returns the final-LayerNorm'ed patch tokens [N, Hp*Wp, C] of images [N, H, W, 3] (normalised)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg, d = self.cfg, self.cfg.dino
        n, h, w, _ = x.shape
        ph, pw = h // cfg.patch_size, w // cfg.patch_size
        m = cfg.pos_grid
        tokens = PatchEmbed(cfg.patch_size, d.embed_dim, cfg.trunk_jnp_dtype, cfg.jax_precision,
                            name="patch_embed")(x)
        cls_token = self.param("cls_token", nn.initializers.zeros, (1, 1, d.embed_dim))
        pos_embed = self.param("pos_embed", nn.initializers.zeros, (1, 1 + m * m, d.embed_dim))
        registers = self.param("register_tokens", nn.initializers.zeros, (1, cfg.num_register_tokens, d.embed_dim))
        # Kept for checkpoint fidelity: upstream's (unused) masked-token embedding.
        self.param("mask_token", nn.initializers.zeros, (1, d.embed_dim))

        patch_pos = interpolate_pos_embed(pos_embed[0, 1:].reshape(m, m, d.embed_dim), ph, pw, cfg.jax_precision)
        tokens = tokens + patch_pos.reshape(1, ph * pw, d.embed_dim).astype(tokens.dtype)
        cls = jnp.broadcast_to(cls_token + pos_embed[:, :1], (n, 1, d.embed_dim)).astype(tokens.dtype)
        regs = jnp.broadcast_to(registers, (n, cfg.num_register_tokens, d.embed_dim)).astype(tokens.dtype)
        x = jnp.concatenate([cls, regs, tokens], axis=1)
        for i in range(d.depth):
            x, _ = Block(d.num_heads, d.mlp_ratio, qk_norm=False, layer_norm_eps=d.layer_norm_eps,
                         dtype=cfg.trunk_jnp_dtype, precision=cfg.jax_precision, name=f"blocks_{i}")(x)
        x = LayerNorm(d.layer_norm_eps, name="norm")(x)
        return x[:, 1 + cfg.num_register_tokens:]
