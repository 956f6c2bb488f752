"""Resampling as explicit interpolation matrices (static shapes), matching torch semantics.

* `aa_bicubic_matrix`: torch `interpolate(mode="bicubic", antialias=True, align_corners=False)`
  (the PIL-style separable filter, cubic coefficient a = -0.5, support widened by the scale when
  downsampling). Used for the DINOv2 position-embedding grid.
* `bilinear_matrix`: torch `interpolate(mode="bilinear", align_corners=True)`.
* `sample_bilinear`: torch `grid_sample(align_corners=True)` at pixel coordinates, with the
  coordinate normalisation round trip of upstream's `bilinear_sampler`, `zeros` or `border` padding.
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp

Array = jax.Array


def _cubic_aa(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def aa_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] float64 weights of antialiased bicubic resampling (align_corners=False)."""
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    m = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        j = np.arange(lo, hi)
        w = _cubic_aa((j - center + 0.5) * inv)
        total = w.sum()
        m[i, lo:hi] = w / total if total != 0 else w
    return m


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] weights of bilinear resampling with align_corners=True (float32 coords)."""
    m = np.zeros((out_size, in_size), np.float64)
    scale = np.float32((in_size - 1) / (out_size - 1)) if out_size > 1 else np.float32(0)
    for i in range(out_size):
        src = np.float32(scale * np.float32(i))
        i0 = min(int(np.floor(src)), in_size - 1)
        i1 = min(i0 + 1, in_size - 1)
        lam = np.float32(src - i0)
        m[i, i0] += 1.0 - lam
        m[i, i1] += lam
    return m


def resize_hw(x: Array, mh: np.ndarray, mw: np.ndarray, precision=jax.lax.Precision.HIGHEST) -> Array:
    """Separable resize of x [..., H, W, C] with row/col matrices mh [H', H], mw [W', W]."""
    mh = jnp.asarray(mh, jnp.float32).astype(x.dtype)
    mw = jnp.asarray(mw, jnp.float32).astype(x.dtype)
    x = jnp.einsum("...hwc,vw->...hvc", x, mw, precision=precision)
    return jnp.einsum("...hwc,uh->...uwc", x, mh, precision=precision)


def resize_bilinear(x: Array, size: tuple[int, int], precision=jax.lax.Precision.HIGHEST) -> Array:
    """x [N, H, W, C] -> [N, size[0], size[1], C]; torch bilinear, align_corners=True."""
    h, w = x.shape[-3], x.shape[-2]
    return resize_hw(x, bilinear_matrix(h, size[0]), bilinear_matrix(w, size[1]), precision)


def sample_bilinear(img: Array, xy: Array, padding: str = "zeros") -> Array:
    """Bilinear samples of img [H, W, C] at pixel coords xy [..., 2] (x, y) -> [..., C].

    Mirrors upstream `bilinear_sampler` + `grid_sample(align_corners=True)`: coordinates are scaled to
    [-1, 1] by 2 / max(size - 1, 1) and mapped back by (g + 1) / 2 * (size - 1).
    """
    h, w = img.shape[0], img.shape[1]

    def unnorm(c, size):
        g = c * (2.0 / max(size - 1, 1)) - 1.0
        return (g + 1.0) / 2.0 * (size - 1)

    x, y = unnorm(xy[..., 0], w), unnorm(xy[..., 1], h)
    if padding == "border":
        x, y = jnp.clip(x, 0, w - 1), jnp.clip(y, 0, h - 1)
    elif padding != "zeros":
        raise ValueError(f"unknown padding {padding!r}")
    x0, y0 = jnp.floor(x), jnp.floor(y)
    out = 0.0
    for dy in (0, 1):
        for dx in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            wgt = (1.0 - jnp.abs(x - xi)) * (1.0 - jnp.abs(y - yi))
            inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
            v = img[jnp.clip(yi, 0, h - 1).astype(jnp.int32), jnp.clip(xi, 0, w - 1).astype(jnp.int32)]
            out = out + jnp.where(inside, wgt, 0.0)[..., None] * v
    return out
