"""The offline (batch) reconstruction behind `xsvggt reconstruct --offline`: every frame through one
forward pass, with causal or full attention across frames."""

from __future__ import annotations

import time
from typing import Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from xsvggt_jax.attention.dispatch import resolve_attention
from xsvggt_jax.attention.masks import FrameCausal, Full
from xsvggt_jax.config import ModelConfig
from xsvggt_jax.io.rgb import to_uint8_rgb
from xsvggt_jax.nn.model import StreamVGGT
from xsvggt_jax.stream.pipeline import NonFiniteError
from xsvggt_jax.stream.result import Reconstruction
from xsvggt_jax.weights.quant import dequantize_params


def run_offline(cfg: ModelConfig, params: dict, frames: Iterable[np.ndarray], query_points: Optional[np.ndarray],
                causal: bool, attention: str = "auto", devices: int = 1) -> Reconstruction:
    """All `frames` ([H, W, 3] float32 each; the batch forward needs them at once) in one forward pass.

    query_points: [N, 2] pixels of frame 0 or None. attention: the global attention implementation
    (`attention.ATTENTION_IMPLS`). devices > 1 shards the frames over a "seq" mesh of that many
    devices (`stream.sharded.offline_sharded`, ring attention unless `attention="gather"`; S must divide
    evenly; no tracks), the parameters replicated onto them wherever they were. Returns the `Reconstruction` (mode "offline_causal" / "offline_full").
    Raises NonFiniteError on NaN/Inf outputs.
    """
    frames = np.stack(list(frames))  # [S, H, W, 3]
    s, h, w, _ = frames.shape
    x = jnp.asarray(frames)[None]  # [1, S, H, W, 3]
    q = None if query_points is None else jnp.asarray(query_points)[None]
    if devices > 1:
        from xsvggt_jax.stream.sharded import make_seq_mesh, offline_sharded, place_on_mesh

        impl = attention if attention in ("ring", "gather") else "ring"
        mesh = make_seq_mesh(devices)
        params, x = place_on_mesh(params, x, mesh)   # the mesh built here: its placement too
        model = StreamVGGT(cfg)
        fwd = jax.jit(lambda p, x, q: offline_sharded(p, x, mesh, causal, model=model, impl=impl))
    else:
        impl = resolve_attention(attention, mask=FrameCausal(cfg.tokens_per_frame(h, w)) if causal else Full(),
                                 dtype=cfg.jnp_dtype, keys=s * cfg.tokens_per_frame(h, w))
        model = StreamVGGT(cfg, attention=attention)
        fwd = jax.jit(lambda p, x, q: model.apply({"params": dequantize_params(p)}, x, q, causal,
                                                 method=StreamVGGT.offline))
    t0 = time.perf_counter()
    compiled = fwd.lower(params, x, q).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(params, x, q))
    total = time.perf_counter() - t0
    preds = {k: np.asarray(v[0], np.float32) for k, v in out.items()}
    check_finite(preds, s)
    return offline_result(preds, frames, query_points, causal, compile_s, total, impl, devices)


def check_finite(preds: dict, frames: int) -> None:
    """NonFiniteError naming the outputs with NaN/Inf and the first frame holding one (preds [S, ...])."""
    bad = [k for k, v in preds.items() if not np.isfinite(v).all()]
    if bad:
        first = min(int(np.argmax(~np.isfinite(preds[k]).reshape(frames, -1).all(1))) for k in bad)
        raise NonFiniteError(f"the model produced NaN/Inf (in {', '.join(bad)}; first at frame {first}): "
                             "check the weights (and the input); no outputs were written")


def offline_result(preds: dict, frames: np.ndarray, query_points: Optional[np.ndarray], causal: bool,
                   compile_s: float, seconds: float, attention: str, devices: int) -> Reconstruction:
    """The `Reconstruction` of one scene's offline forward: preds [S, ...] float32, frames [S, H, W, 3],
    `seconds` the forward's device time (spread evenly over the frames)."""
    s = len(frames)
    per_frame = seconds / s
    return Reconstruction(f"offline_{'causal' if causal else 'full'}", preds, to_uint8_rgb(frames),
                          0 if query_points is None else len(query_points), (per_frame,) * s, (0,) * s,
                          {"cache_bytes": 0}, compile_s, per_frame, seconds, attention=attention, devices=devices)
