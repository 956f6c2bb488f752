"""DPT dense head: multi-layer token maps -> fused feature pyramid -> per-pixel prediction."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xsvggt_jax.config import ModelConfig
from xsvggt_jax.nn.layers import LayerNorm
from xsvggt_jax.nn.resample import resize_bilinear
from xsvggt_jax.nn.heads.activations import activate_dense

Array = jax.Array


class Conv(nn.Module):
    """2D convolution, NHWC; kernel [kh, kw, in, out] (torch OIHW transposed)."""

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    use_bias: bool = True
    dtype: Any = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features))
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), kernel.astype(self.dtype), (self.stride, self.stride),
            [(self.padding, self.padding)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=self.precision)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
        return y


class PatchUpsample(nn.Module):
    """Transposed convolution with stride == kernel (non-overlapping): each pixel -> a k x k block.

    kernel [k, k, in, out] (torch ConvTranspose2d weight [in, out, k, k] transposed).
    """

    features: int
    factor: int
    dtype: Any = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: Array) -> Array:
        f = self.factor
        n, h, w, c = x.shape
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (f, f, c, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        y = jnp.einsum("nhwc,pqco->nhpwqo", x.astype(self.dtype), kernel.astype(self.dtype), precision=self.precision)
        return y.reshape(n, h * f, w * f, self.features) + bias.astype(self.dtype)


def uv_grid(width: int, height: int, aspect_ratio: float) -> np.ndarray:
    """[height, width, 2] normalised (u, v) pixel grid spanning the image diagonal (float32)."""
    diag = (aspect_ratio ** 2 + 1.0) ** 0.5
    span_x, span_y = aspect_ratio / diag, 1.0 / diag
    xs = np.linspace(-span_x * (width - 1) / width, span_x * (width - 1) / width, width, dtype=np.float32)
    ys = np.linspace(-span_y * (height - 1) / height, span_y * (height - 1) / height, height, dtype=np.float32)
    uu, vv = np.meshgrid(xs, ys, indexing="xy")
    return np.stack([uu, vv], -1)


def sincos_1d(dim: int, pos: np.ndarray, omega_0: float) -> np.ndarray:
    """[M, dim] = [sin(pos * w), cos(pos * w)] with w = omega_0 ** (-k / (dim/2)), in float64."""
    omega = 1.0 / omega_0 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = pos.reshape(-1).astype(np.float64)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], 1)


def dpt_pos_embed(height: int, width: int, channels: int, aspect_ratio: float, ratio: float = 0.1) -> np.ndarray:
    """The DPT head's additive sinusoidal embedding of the uv grid: [height, width, channels] float32."""
    grid = uv_grid(width, height, aspect_ratio).reshape(-1, 2)
    emb = np.concatenate([sincos_1d(channels // 2, grid[:, 0], 100.0),
                          sincos_1d(channels // 2, grid[:, 1], 100.0)], -1).astype(np.float32)
    return (emb.reshape(height, width, channels) * np.float32(ratio)).astype(np.float32)


class ResidualConvUnit(nn.Module):
    """relu -> conv1 -> relu -> conv2, plus the skip.

    Upstream applies `nn.ReLU(inplace=True)` to its input before the skip add, so the skip carries
    relu(x), not x. Reproduced here: it changes every DPT output.
    """

    features: int
    kw: dict

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = jax.nn.relu(x)
        y = Conv(self.features, 3, padding=1, name="conv1", **self.kw)(x)
        y = Conv(self.features, 3, padding=1, name="conv2", **self.kw)(jax.nn.relu(y))
        return y + x


class FusionBlock(nn.Module):
    """Refinement: (x + rcu1(skip)) -> rcu2 -> bilinear resize -> 1x1 conv."""

    features: int
    has_residual: bool
    kw: dict

    @nn.compact
    def __call__(self, x: Array, skip: Array | None, size: tuple[int, int]) -> Array:
        if self.has_residual:
            x = x + ResidualConvUnit(self.features, self.kw, name="resConfUnit1")(skip)
        x = ResidualConvUnit(self.features, self.kw, name="resConfUnit2")(x)
        x = resize_bilinear(x, size, self.kw["precision"])
        return Conv(self.features, 1, name="out_conv", **self.kw)(x)


class Scratch(nn.Module):
    features: int
    out_dim: int
    feature_only: bool
    kw: dict

    @nn.compact
    def __call__(self, layers: Sequence[Array]) -> Array:
        f = self.features
        rn = [Conv(f, 3, padding=1, use_bias=False, name=f"layer{i + 1}_rn", **self.kw)(x)
              for i, x in enumerate(layers)]
        size = lambda t: (t.shape[1], t.shape[2])
        out = FusionBlock(f, False, self.kw, name="refinenet4")(rn[3], None, size(rn[2]))
        out = FusionBlock(f, True, self.kw, name="refinenet3")(out, rn[2], size(rn[1]))
        out = FusionBlock(f, True, self.kw, name="refinenet2")(out, rn[1], size(rn[0]))
        out = FusionBlock(f, True, self.kw, name="refinenet1")(out, rn[0], (2 * rn[0].shape[1], 2 * rn[0].shape[2]))
        return Conv(f if self.feature_only else f // 2, 3, padding=1, name="output_conv1", **self.kw)(out)


class DPTHead(nn.Module):
    """Dense head over the aggregator outputs.

    feature_only: return the fused features [N, H/down, W/down, features] (track head's extractor);
    otherwise (values [N, H, W, out_dim-1] activated, confidence [N, H, W]).
    """

    cfg: ModelConfig
    features: int
    out_dim: int = 1
    activation: str = "linear"
    conf_activation: str = "expp1"
    feature_only: bool = False
    down_ratio: int = 1
    pos_embed: bool = True

    @nn.compact
    def __call__(self, aggregated: Sequence[Array], height: int, width: int):
        cfg = self.cfg
        kw = dict(dtype=cfg.head_jnp_dtype, precision=cfg.jax_precision)
        ph, pw = height // cfg.patch_size, width // cfg.patch_size
        oc = cfg.dpt.out_channels
        norm = LayerNorm(name="norm")
        resize = [PatchUpsample(oc[0], 4, name="resize_layers_0", **kw),
                  PatchUpsample(oc[1], 2, name="resize_layers_1", **kw),
                  lambda t: t,
                  Conv(oc[3], 3, stride=2, padding=1, name="resize_layers_3", **kw)]
        layers = []
        for j, layer_idx in enumerate(cfg.dpt.intermediate_layer_idx):
            x = aggregated[layer_idx].astype(cfg.head_jnp_dtype)  # "auto": bfloat16 trunk tokens -> float32
            x = x[..., cfg.num_special_tokens:, :].reshape(-1, ph, pw, x.shape[-1])  # [N, Hp, Wp, 2C]
            x = Conv(oc[j], 1, name=f"projects_{j}", **kw)(norm(x))
            if self.pos_embed:
                x = x + dpt_pos_embed(ph, pw, oc[j], width / height)
            layers.append(resize[j](x))
        out = Scratch(self.features, self.out_dim, self.feature_only, kw, name="scratch")(layers)
        out_hw = (int(ph * cfg.patch_size / self.down_ratio), int(pw * cfg.patch_size / self.down_ratio))
        out = resize_bilinear(out, out_hw, cfg.jax_precision)
        if self.pos_embed:
            out = out + dpt_pos_embed(out_hw[0], out_hw[1], out.shape[-1], width / height)
        if self.feature_only:
            return out
        out = Conv(32, 3, padding=1, name="output_conv2_0", **kw)(out)
        out = Conv(self.out_dim, 1, name="output_conv2_2", **kw)(jax.nn.relu(out))
        return activate_dense(out.astype(jnp.float32), self.activation, self.conf_activation)
