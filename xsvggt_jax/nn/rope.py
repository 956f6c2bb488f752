"""2D rotary position embedding (RoPE) over (row, col) token positions.

The head dim D is split in halves: the first half rotates with the row coordinate, the second with the
column. Within a half of size F the rotation pairs channel i with i + F/2 (rotate-half convention),
with frequencies base^(-2j/F), j < F/2.
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp

Array = jax.Array


def token_positions(patch_h: int, patch_w: int, num_special: int) -> np.ndarray:
    """[num_special + patch_h*patch_w, 2] int32 (row, col): special tokens at 0, patch (r, c) at +1."""
    rows, cols = np.meshgrid(np.arange(patch_h), np.arange(patch_w), indexing="ij")
    patch = np.stack([rows.ravel(), cols.ravel()], -1) + 1
    return np.concatenate([np.zeros((num_special, 2), np.int64), patch]).astype(np.int32)


def rope_tables(positions: np.ndarray, head_dim: int, base: float) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables [N, head_dim] (float32) for the given (row, col) positions.

    Computed in float32 the way upstream does (angles in float32, then cos/sin).
    """
    f = head_dim // 2
    inv_freq = (1.0 / (base ** (np.arange(0, f, 2, dtype=np.float32) / np.float32(f)))).astype(np.float32)
    cos, sin = [], []
    for axis in (0, 1):
        ang = positions[:, axis].astype(np.float32)[:, None] * inv_freq[None, :]  # [N, F/2]
        ang = np.concatenate([ang, ang], -1).astype(np.float32)
        cos.append(np.cos(ang))
        sin.append(np.sin(ang))
    return np.concatenate(cos, -1).astype(np.float32), np.concatenate(sin, -1).astype(np.float32)


def _rotate_half(x: Array) -> Array:
    h = x.shape[-1] // 2
    return jnp.concatenate([-x[..., h:], x[..., :h]], -1)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x: [B, H, N, D]; cos/sin: [N, D] (or broadcastable). Rotates each half of D independently."""
    f = x.shape[-1] // 2
    rot = jnp.concatenate([_rotate_half(x[..., :f]), _rotate_half(x[..., f:])], -1)
    return x * cos.astype(x.dtype) + rot * sin.astype(x.dtype)


def make_rope(patch_h: int, patch_w: int, num_special: int, head_dim: int, base: float, frames: int = 1):
    """A callable applying RoPE to [B, H, frames*tokens_per_frame, D] (positions repeat per frame)."""
    cos, sin = rope_tables(token_positions(patch_h, patch_w, num_special), head_dim, base)
    cos, sin = np.tile(cos, (frames, 1)), np.tile(sin, (frames, 1))
    return lambda x: apply_rope(x, jnp.asarray(cos), jnp.asarray(sin))
