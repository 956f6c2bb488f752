"""Track head: DPT feature extractor + iterative correlation tracker (CoTracker-style update former).

Query validity: the head takes an optional `query_valid` [B, N] bool. Points are independent of one
another everywhere except the update former's space attention, where the virtual tracks attend over
all point tracks (`space_virtual2point_blocks`); there an invalid point (a padded one, see
`batch.pad_queries`) is masked out as a key, so the valid points' outputs do not depend on the padded
ones. None (the default) is the unmasked computation, exactly as before (and as upstream).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xsvggt_jax.attention.masks import NEG_INF, Additive
from xsvggt_jax.config import ModelConfig
from xsvggt_jax.nn.layers import Dense, LayerNorm, MultiheadAttention, Mlp
from xsvggt_jax.nn.resample import sample_bilinear
from xsvggt_jax.nn.heads.dpt import DPTHead, sincos_1d

Array = jax.Array


def grid_sincos_embed(dim: int, height: int, width: int) -> np.ndarray:
    """[height, width, dim] 2D sin-cos embedding: first half encodes x (column), second half y (row)."""
    ys, xs = np.meshgrid(np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32), indexing="ij")
    emb = np.concatenate([sincos_1d(dim // 2, xs, 10000.0), sincos_1d(dim // 2, ys, 10000.0)], 1)
    return emb.astype(np.float32).reshape(height, width, dim)


def flow_embed(xy: Array, c: int) -> Array:
    """[..., 2] -> [..., 2c]: interleaved sin/cos of x then of y, frequencies k * 1000 / c (k even)."""
    div = jnp.arange(0, c, 2, dtype=jnp.float32) * (1000.0 / c)

    def one(v):
        a = v[..., None] * div
        return jnp.stack([jnp.sin(a), jnp.cos(a)], -1).reshape(*v.shape, c)

    return jnp.concatenate([one(xy[..., 0]), one(xy[..., 1])], -1)


def avg_pool2(x: Array) -> Array:
    """2x2 average pooling, stride 2, floor: [..., H, W, C] -> [..., H//2, W//2, C]."""
    h, w = x.shape[-3] // 2 * 2, x.shape[-2] // 2 * 2
    x = x[..., :h, :w, :]
    x = x.reshape(*x.shape[:-3], h // 2, 2, w // 2, 2, x.shape[-1])
    return x.mean(axis=(-4, -2))


def key_mask(valid: Array | None, frames: int) -> Additive | None:
    """The space attention's key mask of point tracks valid [B, N] bool, for the [B * frames] rows of
    that attention: additive bias [B * frames, 1, 1, N] (0 valid, -inf invalid). A row with no valid
    point keeps all its keys (its outputs are padding anyway; an all -inf row would be NaN). None: None."""
    if valid is None:
        return None
    valid = jnp.asarray(valid, bool)
    valid = valid | ~valid.any(-1, keepdims=True)
    bias = jnp.where(valid, 0.0, NEG_INF).astype(jnp.float32)                       # [B, N]
    return Additive(jnp.repeat(bias, frames, 0)[:, None, None, :])


class AttnBlock(nn.Module):
    """x = norm1(x); x += attn(x, ctx); x += mlp(norm2(x)) (residual taken after norm1, as upstream).
    mask: the attention's mask (`attention.attend`'s), None for none."""

    num_heads: int
    mlp_ratio: float
    cross: bool
    kw: dict

    @nn.compact
    def __call__(self, x: Array, context: Array | None = None, mask: Additive | None = None) -> Array:
        x = LayerNorm(name="norm1")(x)
        if self.cross:
            ctx = LayerNorm(name="norm_context")(context)
            x = x + MultiheadAttention(self.num_heads, name="cross_attn", **self.kw)(x, ctx, mask)
        else:
            x = x + MultiheadAttention(self.num_heads, name="attn", **self.kw)(x, x)
        return x + Mlp(int(x.shape[-1] * self.mlp_ratio), name="mlp", **self.kw)(LayerNorm(name="norm2")(x))


class UpdateFormer(nn.Module):
    """Alternating time attention (per track) and space attention through virtual tracks; the virtual
    tracks read only valid point tracks (`key_mask`)."""

    cfg: ModelConfig
    out_dim: int

    @nn.compact
    def __call__(self, x: Array, valid: Array | None = None) -> Array:
        """x: [B, N, T, D_in] -> [B, N, T, out_dim]; valid: [B, N] bool or None (all valid)."""
        t = self.cfg.track
        kw = dict(dtype=self.cfg.head_jnp_dtype, precision=self.cfg.jax_precision)
        hs, nv = t.hidden_size, t.num_virtual_tracks
        tokens = Dense(hs, name="input_transform", **kw)(LayerNorm(name="input_norm")(x))
        init = tokens
        b, n, s, _ = tokens.shape
        virtual = self.param("virual_tracks", nn.initializers.normal(1.0), (1, nv, 1, hs))
        tokens = jnp.concatenate([tokens, jnp.broadcast_to(virtual, (b, nv, s, hs)).astype(tokens.dtype)], 1)
        m = n + nv
        point_keys = key_mask(valid, s)
        for i in range(t.depth):
            tokens = AttnBlock(t.num_heads, 4.0, False, kw, name=f"time_blocks_{i}")(
                tokens.reshape(b * m, s, hs)).reshape(b, m, s, hs)
            space = tokens.transpose(0, 2, 1, 3).reshape(b * s, m, hs)
            point, virt = space[:, :n], space[:, n:]
            virt = AttnBlock(t.num_heads, 4.0, True, kw, name=f"space_virtual2point_blocks_{i}")(
                virt, point, point_keys)
            virt = AttnBlock(t.num_heads, 4.0, False, kw, name=f"space_virtual_blocks_{i}")(virt)
            point = AttnBlock(t.num_heads, 4.0, True, kw, name=f"space_point2virtual_blocks_{i}")(point, virt)
            tokens = jnp.concatenate([point, virt], 1).reshape(b, s, m, hs).transpose(0, 2, 1, 3)
        tokens = LayerNorm(name="output_norm")(tokens[:, :n] + init)
        return Dense(self.out_dim, name="flow_head", **kw)(tokens)


class Tracker(nn.Module):
    """Iteratively refines query-point tracks through a correlation pyramid of the feature maps.

    The `iters` refinements are one `nn.scan` over the shared modules (XLA compiles the update once).
    As upstream, each refinement reads the previous coordinates through a stop-gradient."""

    cfg: ModelConfig

    def setup(self):
        t, cfg = self.cfg.track, self.cfg
        kw = dict(dtype=cfg.head_jnp_dtype, precision=cfg.jax_precision)
        c = t.features
        self.fmap_norm = LayerNorm()
        self.query_ref_token = self.param("query_ref_token", nn.initializers.normal(1.0), (1, 2, 3 * c + 4))
        self.corr_mlp = Mlp(t.hidden_size, c, **kw)
        self.updateformer = UpdateFormer(cfg, c + 2)
        self.ffeat_norm = LayerNorm()  # GroupNorm(1, C) on [rows, C] == LayerNorm over C
        self.ffeat_updater_0 = Dense(c, **kw)
        self.vis_predictor_0 = Dense(1, **kw)
        self.conf_predictor_0 = Dense(1, **kw)

    def __call__(self, query_points: Array, fmaps: Array, query_valid: Array | None = None):
        """query_points [B, N, 2] (x, y) pixels; fmaps [B, S, h, w, C]; query_valid [B, N] bool or None
        (all valid). Returns (tracks [B, S, N, 2] of the last iteration, visibility [B, S, N],
        confidence [B, S, N])."""
        t, cfg = self.cfg.track, self.cfg
        c = t.features
        b, s, hh, ww, _ = fmaps.shape
        n = query_points.shape[1]
        r = t.corr_radius
        fmaps = self.fmap_norm(fmaps)
        coords = jnp.broadcast_to((query_points / float(t.stride))[:, None], (b, s, n, 2))
        query0 = coords[:, 0]  # [B, N, 2]
        sample = jax.vmap(lambda img, xy: sample_bilinear(img, xy, "border"))
        track_feats = jnp.broadcast_to(sample(fmaps[:, 0], query0)[:, None], (b, s, n, c))

        pyramid = [fmaps]
        for _ in range(t.corr_levels - 1):
            pyramid.append(avg_pool2(pyramid[-1]))
        # window offsets: first index moves x, second moves y (upstream meshgrid order)
        off = np.stack(np.meshgrid(np.arange(-r, r + 1), np.arange(-r, r + 1), indexing="ij"), -1)
        off = jnp.asarray(off.reshape(-1, 2).astype(np.float32))  # [(2r+1)^2, (dx, dy)]

        pos = jnp.asarray(grid_sincos_embed(3 * c + 4, hh, ww))
        pos_q = jax.vmap(lambda xy: sample_bilinear(pos, xy, "border"))(query0)  # [B, N, D]
        ref = self.query_ref_token
        ref = jnp.concatenate([ref[:, :1], jnp.broadcast_to(ref[:, 1:2], (1, s - 1, 3 * c + 4))], 1)  # [1, S, D]

        def refine(tracker: "Tracker", carry, _):
            coords, track_feats = carry
            coords = jax.lax.stop_gradient(coords)
            corrs = []
            for lvl, fm in enumerate(pyramid):
                corr = jnp.einsum("bsnc,bshwc->bsnhw", track_feats, fm, precision=cfg.jax_precision) / np.sqrt(c)
                xy = coords[..., None, :] / (2 ** lvl) + off  # [B, S, N, K, 2]
                corrs.append(jax.vmap(jax.vmap(jax.vmap(
                    lambda img, p: sample_bilinear(img[..., None], p, "zeros")[..., 0])))(corr, xy))
            fcorr = tracker.corr_mlp(jnp.concatenate(corrs, -1))               # [B, S, N, C]
            flows = coords - coords[:, :1]
            femb = jnp.concatenate([flow_embed(flows, c // 2), flows / t.max_scale, flows / t.max_scale], -1)
            x = jnp.concatenate([femb, fcorr, track_feats], -1)             # [B, S, N, 3C+4]
            x = x + pos_q[:, None] + ref[:, :, None]
            delta = tracker.updateformer(x.transpose(0, 2, 1, 3), query_valid).transpose(0, 2, 1, 3)  # [B, S, N, C+2]
            track_feats = ffeat_updater_gelu(tracker.ffeat_updater_0, tracker.ffeat_norm(delta[..., 2:])) + track_feats
            coords = (coords + delta[..., :2]).at[:, 0].set(query0)
            return (coords, track_feats), None

        scan = nn.scan(refine, variable_broadcast="params", split_rngs={"params": False}, length=t.iters)
        (coords, track_feats), _ = scan(self, (coords, track_feats), None)
        vis = jax.nn.sigmoid(self.vis_predictor_0(track_feats)[..., 0])
        conf = jax.nn.sigmoid(self.conf_predictor_0(track_feats)[..., 0])
        return coords * t.stride, vis, conf


def ffeat_updater_gelu(dense: Dense, x: Array) -> Array:
    return jax.nn.gelu(dense(x), approximate=False)


class TrackHead(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, aggregated: Sequence[Array], height: int, width: int, query_points: Array,
                 query_valid: Array | None = None):
        """aggregated: list of [B, S, P', 2C]; query_points [B, N, 2]; query_valid [B, N] bool (None: all
        valid; invalid points do not affect the valid ones). Returns (track, vis, conf)."""
        b, s = aggregated[0].shape[:2]
        fm = DPTHead(self.cfg, self.cfg.track.features, feature_only=True, down_ratio=2, pos_embed=False,
                     name="feature_extractor")(aggregated, height, width)
        fm = fm.reshape(b, s, *fm.shape[1:])
        return Tracker(self.cfg, name="tracker")(query_points, fm, query_valid)
