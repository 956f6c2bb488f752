"""The streaming KV cache: an immutable, fixed-shape pytree updated once per frame.

Every array has a shape fixed by the configuration, so `step` compiles once for a whole stream.

* `prune="none"`: every token of every frame, up to `max_frames` (the uncompressed cache). Attention
  runs over the filled prefix only, `chunk` slots at a time, so a step's cost grows with the stream
  as upstream's does instead of paying for the whole capacity from frame 0.
* a pruning policy (`xstream`, `sliding`, `random`, see `xsvggt_jax.prune`): at most `keep` tokens
  per layer. Each step appends the frame, attends over [past; current], then prunes back to the
  budget (XStreamVGGT's order).
* `quant` (KCVT, KTVT, KCVC, KTVC): K and V stored as packed low-bit codes with per-group scales and
  zero points, K and V each per Channel (groups of `group` tokens) or per Token (groups of `group`
  head dims). As upstream's `prune_and_quantize` branch, every step re-quantizes the whole cache
  [past; current] before pruning, and the current step attends to the dequantized past plus the
  unquantized current frame. What is stored dequantizes bit-exactly to the values upstream keeps:
  codes and group parameters of this step's quantization, and for per-channel groups a per-token
  index of the group each kept token came from (pruning moves tokens between groups).

Slots past a layer's fill level are masked out of attention.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from . import quant
from .config import ModelConfig
from .layers import KVHook, Prefix
from .prune import POLICIES, PruneContext

Array = jax.Array

QUANT_LAYOUTS = ("none", "kcvt", "ktvt", "kcvc", "ktvc")


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """How the streaming cache is kept.

    prune:  "none" | "xstream" | "sliding" | "random" (see `xsvggt_jax.prune`).
    budget: tokens kept per attention layer when pruning (upstream KV_CACHE_SIZE; the same budget
            applies to the camera-trunk cache, which gains `camera.iterations` tokens a frame).
    pool:   query pooling group size of the xstream score (upstream KV_POOL_SIZE).
    seed:   seed of the `random` policy's key.
    quant:  "none" or the K/V layout: K per Channel|Token, V per Channel|Token (upstream KV_QUANT_MODE).
    bits:   code width (2, 4 or 8); group: quantization group size.
    quant_head_dim: upstream quantizes only attention layers whose head dim is 64 (the aggregator's
            global blocks at the published size, never its camera trunk); None quantizes every layer.
    chunk:  prune="none" only: attention walks the filled slots in chunks of this many tokens (a
            longer stream's capacity is rounded up to a multiple of it; a shorter one is one chunk).
    scale_dtype: "float32" stores the group scales exactly (bit-exact with upstream); "float16" halves
            their bytes (the cache then sits within 1.15x of the packed floor at the published size)
            at the price of rounding each scale to 11 significant bits.
    """

    prune: str = "xstream"
    budget: int = 2048
    pool: int = 16
    seed: int = 0
    quant: str = "none"
    bits: int = 4
    group: int = 64
    quant_head_dim: Optional[int] = 64
    scale_dtype: str = "float32"
    chunk: int = 2048

    def __post_init__(self):
        if self.prune not in POLICIES:
            raise ValueError(f"prune must be one of {sorted(POLICIES)}, got {self.prune!r}")
        if self.quant not in QUANT_LAYOUTS:
            raise ValueError(f"quant must be one of {QUANT_LAYOUTS}, got {self.quant!r}")
        if self.bits not in quant.PACK_BITS:
            raise ValueError(f"bits must be one of {quant.PACK_BITS}, got {self.bits}")
        if self.scale_dtype not in ("float32", "float16"):
            raise ValueError(f"scale_dtype must be float32 or float16, got {self.scale_dtype!r}")
        if min(self.budget, self.pool, self.group, self.chunk) < 1:
            raise ValueError(f"budget, pool, group and chunk must be positive "
                             f"({self.budget}, {self.pool}, {self.group}, {self.chunk})")

    @classmethod
    def uncompressed(cls) -> "CacheConfig":
        return cls(prune="none")

    def keep(self, tokens_per_step: int) -> int:
        """Tokens a pruned layer holds at most. xstream always keeps the first and the newest
        `tokens_per_step` tokens (upstream), so a budget below twice that still keeps both; the other
        policies keep exactly `budget`."""
        return max(self.budget, 2 * tokens_per_step) if self.prune == "xstream" else self.budget

    def quantizes(self, head_dim: int) -> bool:
        return self.quant != "none" and (self.quant_head_dim is None or head_dim == self.quant_head_dim)

    def per_channel(self) -> tuple[bool, bool]:
        """(K per channel, V per channel)."""
        return self.quant[1] == "c", self.quant[3] == "c"


def take_rows(x: Array, idx: Array) -> Array:
    """x [B, H, R, ...], idx int32 [B, T] -> [B, H, T, ...]: rows (tokens, or scale rows) per batch.

    A per-batch `jnp.take` gathers whole [H, 1, ...] slabs; `take_along_axis` with an index broadcast
    over H and D lowers to an element-wise gather that is several times slower on CPU.
    """
    return jax.vmap(lambda xb, ib: jnp.take(xb, ib, axis=1, mode="clip"))(x, idx)


@flax.struct.dataclass
class Packed:
    """A group-quantized [B, H, T, D] tensor.

    codes: uint8 [B, H, T, ceil(D * bits / 8)] codes packed along D (first code in the low bits).
    scale: float32 (or float16, see CacheConfig.scale_dtype), per token [B, H, T, ceil(D / group)];
           per channel [B, H, G, D] with G groups of `group` consecutive tokens of the step that
           quantized them.
    zero:  uint8, same shape as scale: integer zero points in [0, 2**bits - 1].
    group_of: int32 [B, T] per channel: the row of scale/zero each token uses; per token: [B, 0].
    """

    codes: Array
    scale: Array
    zero: Array
    group_of: Array
    bits: int = flax.struct.field(pytree_node=False)
    group: int = flax.struct.field(pytree_node=False)
    per_channel: bool = flax.struct.field(pytree_node=False)
    dim: int = flax.struct.field(pytree_node=False)

    @classmethod
    def empty(cls, b, h, t, d, bits, group, per_channel, groups_rows: int, scale_dtype=jnp.float32) -> "Packed":
        codes = jnp.zeros((b, h, t, quant.packed_bytes((d,), bits)), jnp.uint8)
        pshape = (b, h, groups_rows, d) if per_channel else (b, h, t, -(-d // group))
        return cls(codes, jnp.ones(pshape, scale_dtype), jnp.zeros(pshape, jnp.uint8),
                   jnp.zeros((b, t if per_channel else 0), jnp.int32), bits, group, per_channel, d)

    @classmethod
    def from_float(cls, x: Array, bits: int, group: int, per_channel: bool, scale_dtype=jnp.float32) -> "Packed":
        """Quantize x [B, H, T, D] (groups along T per channel, along D per token)."""
        codes, scale, zero = quant.quantize(x, bits, group, axis=-2 if per_channel else -1)
        scale = scale.astype(scale_dtype)
        b, _, t, d = x.shape
        group_of = (jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) // group, (b, t)) if per_channel
                    else jnp.zeros((b, 0), jnp.int32))
        return cls(quant.pack(codes, bits), scale, zero.astype(jnp.uint8), group_of, bits, group, per_channel, d)

    def dequantize(self) -> Array:
        """float32 [B, H, T, D]: scale * (code - zero)."""
        codes = quant.unpack(self.codes, self.bits, self.dim).astype(jnp.float32)
        scale, zero = self.scale.astype(jnp.float32), self.zero.astype(jnp.float32)
        if self.per_channel:  # [B, H, G, D] -> the row of each token: [B, H, T, D]
            scale, zero = take_rows(scale, self.group_of), take_rows(zero, self.group_of)
        else:                 # [B, H, T, Gd] -> [B, H, T, D]
            scale = jnp.repeat(scale, self.group, axis=-1)[..., :self.dim]
            zero = jnp.repeat(zero, self.group, axis=-1)[..., :self.dim]
        return scale * (codes - zero)

    def take(self, idx: Array) -> "Packed":
        """Keep tokens idx [B, K] (slots of this tensor)."""
        if self.per_channel:
            return self.replace(codes=take_rows(self.codes, idx), group_of=jnp.take_along_axis(self.group_of, idx, axis=1))
        return self.replace(codes=take_rows(self.codes, idx), scale=take_rows(self.scale, idx),
                            zero=take_rows(self.zero, idx))


@flax.struct.dataclass
class LayerKV:
    """Keys/values of one attention layer.

    k, v: float [B, H, T, D] in the compute dtype (keys after q/k-norm and RoPE, as attention
    consumes them), or `Packed` when the layer is quantized.
    """

    k: Array | Packed
    v: Array | Packed


def stored_slots(kv: LayerKV) -> int:
    """Tokens a layer cache can hold."""
    return kv.k.codes.shape[2] if isinstance(kv.k, Packed) else kv.k.shape[2]


@flax.struct.dataclass
class StreamCache:
    """Everything a stream carries from one frame to the next.

    global_kv:   tuple of `depth` LayerKV (the aggregator's global blocks).
    camera_kv:   tuple of `camera.trunk_depth` LayerKV (the camera head's trunk).
    global_len:  int32 [] valid tokens in every global_kv layer.
    camera_len:  int32 [] valid tokens in every camera_kv layer.
    frame_index: int32 [] frames processed so far.
    track_points: float32 [B, N, 2] query points for the next frame (the last frame's tracks); N may be 0.
    rng:         uint32 [2] key of the `random` policy (advanced every step).
    """

    global_kv: tuple
    camera_kv: tuple
    global_len: Array
    camera_len: Array
    frame_index: Array
    track_points: Array
    rng: Array


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """Static layout of one group of layer caches (derived from the configs and the frame size)."""

    layers: int
    heads: int
    head_dim: int
    step_tokens: int     # tokens one attention call appends (tokens per frame, or 1 for the camera)
    slots: int           # stored tokens per layer
    quantized: bool
    pruned: bool

    @property
    def work_slots(self) -> int:
        """Tokens attended over in one call: a pruned, quantized cache stages [stored; current]
        outside the stored arrays; otherwise the current tokens are written into free slots."""
        return self.slots + self.step_tokens if (self.quantized and self.pruned) else self.slots


def plan_layers(cfg: ModelConfig, cache_cfg: CacheConfig, frame_hw: tuple[int, int],
                max_frames: int | None) -> tuple[LayerPlan, LayerPlan]:
    """Layouts of the global and the camera caches."""
    p, it = cfg.tokens_per_frame(*frame_hw), cfg.camera.iterations
    cam_heads = cfg.camera.num_heads
    cam_hd = 2 * cfg.embed_dim // cam_heads
    if cache_cfg.prune == "none" and not max_frames:
        raise ValueError("an uncompressed cache (prune='none') needs max_frames, the stream length")

    def plan(layers, heads, hd, n, frames_tokens):
        qz = cache_cfg.quantizes(hd)
        if cache_cfg.prune == "none":  # one short chunk, or a whole number of attention chunks
            c = cache_cfg.chunk
            slots = frames_tokens if frames_tokens <= c else -(-frames_tokens // c) * c
        else:  # room for the current tokens too, unless they are staged outside (quantized)
            slots = cache_cfg.keep(n) + (0 if qz else n)
        return LayerPlan(layers, heads, hd, n, slots, qz, cache_cfg.prune != "none")

    return (plan(cfg.depth, cfg.num_heads, cfg.head_dim, p, (max_frames or 0) * p),
            plan(cfg.camera.trunk_depth, cam_heads, cam_hd, 1, (max_frames or 0) * it))


def _empty_layers(plan: LayerPlan, cache_cfg: CacheConfig, batch: int, dtype) -> tuple:
    shape = (batch, plan.heads, plan.slots, plan.head_dim)
    if not plan.quantized:  # distinct buffers per leaf: the cache is donated to `step`
        return tuple(LayerKV(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(plan.layers))
    rows = -(-plan.work_slots // cache_cfg.group)
    kc, vc = cache_cfg.per_channel()
    mk = lambda pc: Packed.empty(*shape, cache_cfg.bits, cache_cfg.group, pc, rows, jnp.dtype(cache_cfg.scale_dtype))
    return tuple(LayerKV(mk(kc), mk(vc)) for _ in range(plan.layers))


def init_cache(cfg: ModelConfig, cache_cfg: CacheConfig, batch: int, frame_hw: tuple[int, int],
               max_frames: int | None = None, query_points: Array | None = None) -> StreamCache:
    """Empty cache for frames of size frame_hw = (H, W); `max_frames` bounds an uncompressed stream."""
    g_plan, c_plan = plan_layers(cfg, cache_cfg, frame_hw, max_frames)
    if query_points is None:
        query_points = jnp.zeros((batch, 0, 2), jnp.float32)
    cache = StreamCache(
        global_kv=_empty_layers(g_plan, cache_cfg, batch, cfg.jnp_dtype),
        camera_kv=_empty_layers(c_plan, cache_cfg, batch, cfg.jnp_dtype),
        global_len=jnp.zeros((), jnp.int32),
        camera_len=jnp.zeros((), jnp.int32),
        frame_index=jnp.zeros((), jnp.int32),
        track_points=jnp.array(query_points, jnp.float32, copy=True).reshape(batch, -1, 2),  # own buffer: donated
        rng=jax.random.PRNGKey(cache_cfg.seed),
    )
    # committed to the default device like `step`'s outputs: otherwise the second call of a jitted
    # step sees different input shardings than the first and compiles a second time
    return jax.device_put(cache, jax.devices()[0])


class CacheWriter:
    """Builds the KV hooks of one traced step over a group of layer caches.

    Each hook call stages [stored; current] for attention (unused slots masked), then stores the
    result: re-quantized when the layer is quantized, and pruned by the policy. Read the new layer
    caches back from `.layers` / `.lengths` after the model has run.
    """

    def __init__(self, layers: tuple, length: Array, cache_cfg: CacheConfig, num_special: int, key: Array):
        self.layers = list(layers)
        self.lengths = [length] * len(layers)
        self.cfg, self.num_special, self.key = cache_cfg, num_special, key
        self.policy = POLICIES[cache_cfg.prune]
        self.calls = 0

    def _stage(self, stored, start: Array, new: Array, work: int) -> Array:
        """[B, H, work, D]: the stored tokens (float), zeros past `start`, and `new` written at `start`."""
        if isinstance(stored, Packed):
            past = stored.dequantize()
            past = jnp.where((jnp.arange(past.shape[2]) < start)[:, None], past, 0.0).astype(new.dtype)
            past = jnp.pad(past, ((0, 0), (0, 0), (0, work - past.shape[2]), (0, 0)))
        else:
            past = stored
        return jax.lax.dynamic_update_slice_in_dim(past, new.astype(past.dtype), start, axis=2)

    def hook(self, i: int) -> KVHook:
        def fn(q, k, v):
            kv, start = self.layers[i], self.lengths[i]
            n = k.shape[2]
            qz = isinstance(kv.k, Packed)
            slots = stored_slots(kv)
            work = slots + n if (qz and self.policy is not None) else slots
            new_k, new_v = self._stage(kv.k, start, k, work), self._stage(kv.v, start, v, work)
            end = start + n
            if self.policy is None:  # static capacity: attend over the filled chunks only
                mask = Prefix(end, min(self.cfg.chunk, slots))  # slots <= chunk, or a multiple of it
            else:                    # a pruned buffer is (nearly) full: one masked pass
                mask = jnp.where(jnp.arange(work) < end, 0.0, -jnp.inf).astype(jnp.float32)

            if qz:  # upstream: the whole cache [past; current] is fake-quantized, then pruned
                sk = Packed.from_float(new_k, kv.k.bits, kv.k.group, kv.k.per_channel, kv.k.scale.dtype)
                sv = Packed.from_float(new_v, kv.v.bits, kv.v.group, kv.v.per_channel, kv.v.scale.dtype)
                score_k = sk.dequantize()
            else:
                sk, sv, score_k = new_k, new_v, new_k
            length = end
            if self.policy is not None:
                keep = self.cfg.keep(n)
                ctx = PruneContext(k=score_k, q_new=q, length=end, n_new=n, keep=keep, pool=self.cfg.pool,
                                   num_special=self.num_special, key=jax.random.fold_in(self.key, self.calls))
                idx = self.policy(ctx)                                            # [B, keep]
                b = idx.shape[0]
                ident = jnp.broadcast_to(jnp.arange(slots, dtype=jnp.int32), (b, slots))
                tail = jnp.broadcast_to(jnp.arange(keep, slots, dtype=jnp.int32), (b, slots - keep))
                idx = jnp.where(end > keep, jnp.concatenate([idx, tail], -1), ident)
                length = jnp.minimum(end, keep)
            elif qz:
                idx = jnp.broadcast_to(jnp.arange(slots, dtype=jnp.int32), (k.shape[0], slots))
            if qz:
                stored = LayerKV(sk.take(idx), sv.take(idx))
            elif self.policy is not None:
                stored = LayerKV(take_rows(sk, idx), take_rows(sv, idx))
            else:
                stored = LayerKV(sk, sv)
            self.calls += 1
            self.layers[i], self.lengths[i] = stored, length
            return new_k, new_v, mask, None
        return fn


def tree_bytes(tree) -> int:
    """Bytes of every array leaf of a pytree (works on ShapeDtypeStructs too)."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def cache_bytes(cache: StreamCache) -> int:
    """Bytes of every array in the cache."""
    return tree_bytes(cache)


def cache_report(cfg: ModelConfig, cache_cfg: CacheConfig, cache: StreamCache) -> dict:
    """Byte accounting: all arrays; global K/V with their scales, zero points and indices; camera;
    and the packed floor (budget x layers x 2 x dims x bits/8) of the quantized global cache."""
    bits = cache_cfg.bits if cache_cfg.quant != "none" else jnp.dtype(cfg.jnp_dtype).itemsize * 8
    return {
        "cache_bytes": cache_bytes(cache),
        "cache_bytes_global": tree_bytes(cache.global_kv),
        "cache_bytes_camera": tree_bytes(cache.camera_kv),
        "packed_floor_bytes": int(cache_cfg.budget * cfg.depth * 2 * cfg.embed_dim * bits // 8),
    }
