"""The streaming KV cache: an immutable, fixed-shape pytree updated once per frame.

Every array has a shape fixed by the configuration, so `step` compiles once for a whole stream.

* `prune="none"`: every token of every frame, up to `max_frames` (the uncompressed cache). Attention
  runs over the filled prefix only, one chunk of slots at a time (`prefix_chunk`), so a step's cost
  grows with the stream as upstream's does instead of paying for the whole capacity from frame 0. The
  chunk depends on the layer, never on the capacity, so a stream's numbers do not depend on the
  `max_frames` it was given (a short scene in a pool sized for a long one is bit-identical to its own
  run).
* a pruning policy (`xstream`, `sliding`, `random`, `diversity`, `cumulative`, `frame`, `ffn`,
  `keyframes`, `merge`, see `xsvggt_jax.cache.prune`): at most `keep` tokens per layer. Each step
  appends the frame, attends over [past; current], then prunes back to the budget (XStreamVGGT's
  order). `cumulative`, `ffn` and `merge` layers also carry a float per slot (`LayerKV.mass`: the
  decayed attention mass, the FFN residual norm the block hands over after its FFN, the merge count),
  pruned with the tokens; `keyframes` layers carry one feature per whole frame (`LayerKV.feat`, the
  feature handed over by the model as `LayerCache.frame_feature`) and prune once a whole frame.
* the camera-trunk cache may have its own budget and quantization (`CacheConfig.camera`); by default
  it follows the global settings (upstream: same budget, never quantized at the published size).
* `quant` (KCVT, KTVT, KCVC, KTVC): K and V stored as packed low-bit codes with per-group scales and
  zero points, K and V each per Channel (groups of `group` tokens) or per Token (groups of `group`
  head dims). As upstream's `prune_and_quantize` branch, every step re-quantizes the whole cache
  [past; current] before pruning, and the current step attends to the dequantized past plus the
  unquantized current frame. What is stored dequantizes bit-exactly to the values upstream keeps:
  codes and group parameters of this step's quantization, and for per-channel groups a per-token
  index of the group each kept token came from (pruning moves tokens between groups).
* `quant_once` (`xsvggt_jax.cache.kivi`): instead, each token is encoded once, when it enters (KIVI);
  per-channel codecs hold the newest tokens in a float window until their group fills, and pruning
  keeps or drops whole groups.

Slots past a layer's fill level are masked out of attention.

Pure threading: `update_layer(kv, length, q, k, v, ...)` is one attention call's update and returns
the next layer state; `step` wraps each layer's state in a `LayerCache` (keys fold_in(key, layer)),
the modules pass them down and return the next ones, and nothing is mutated. The cache records what
it was built for (static fields: CacheConfig, frame size, capacity) so `step` can refuse a mismatch;
the same record is also a leaf (`StreamCache.built_for`, JSON bytes) because a checkpoint keeps only
leaves: a cache restored into the tree of another configuration with the same shapes is refused
(`check_built_for`) instead of streaming on under the wrong policy.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from typing import Any, Mapping, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from xsvggt_jax.cache import kivi, packed_attend, quant
from xsvggt_jax.config import ModelConfig, value_from_text
from xsvggt_jax.errors import ConfigError, InputError
from xsvggt_jax.cache.codec import LAYOUTS, SCALE_DTYPES, Codec, Packed, take_rows
from xsvggt_jax.attention.masks import KeyPrefix, Mask
from xsvggt_jax.cache.frames import frame_layout, keep_features, write_feature
from xsvggt_jax.cache.prune import (CARRY_POLICIES, FEATURE_POLICIES, MASS_POLICIES, MERGE_POLICIES, POLICIES, PROTECT,
                                    RESIDUAL_POLICIES, PruneContext, attention_mass)

Array = jax.Array

QUANT_LAYOUTS = ("none", *LAYOUTS)  # registry keys: "none" or a K/V codec layout of `kvcodec.LAYOUTS`
INT32_MAX = 2**31 - 1  # token counts (budget, pool, group, chunk) are int32 on device

__all__ = ["QUANT_LAYOUTS", "SCALE_DTYPES", "LAYOUTS", "DEFAULT_LAYOUT", "CacheConfig", "short_form_grammar",
           "LayerKV", "LayerCache", "StreamCache", "update_layer", "prefix_chunk", "layer_caches", "init_cache",
           "cache_overflowed", "cache_bytes", "cache_report", "tree_bytes", "stored_slots", "CacheMismatchError",
           "CacheOverflowError", "BUILT_FOR_BYTES", "check_built_for"]


class CacheMismatchError(InputError):
    """A cache stepped with another CacheConfig (or frame size) than it was built for."""


class CacheOverflowError(InputError):
    """An uncompressed cache asked to hold more frames than its capacity (`max_frames`)."""


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """How the streaming cache is kept.

    prune:  a key of `prune.POLICIES`: "none" | "xstream" | "sliding" | "random" | "diversity" |
            "cumulative" | "frame" | "ffn" | "keyframes" | "merge".
    budget: tokens kept per attention layer when pruning (upstream KV_CACHE_SIZE; the same budget
            applies to the camera-trunk cache, which gains `camera.iterations` tokens a frame,
            unless `camera_budget` is set).
    pool:   query pooling group size of the xstream score (upstream KV_POOL_SIZE).
    seed:   seed of the `random` policy's key.
    quant:  a key of `QUANT_LAYOUTS`: "none" or the K/V layout, K per Channel|Token, V per
            Channel|Token (upstream KV_QUANT_MODE; codecs in `kvcodec.LAYOUTS`).
    bits:   code width, one of `quant.PACK_BITS`; group: quantization group size.
    quant_head_dim: upstream quantizes only attention layers whose head dim is 64 (the aggregator's
            global blocks at the published size, never its camera trunk); None quantizes every layer.
    chunk:  prune="none" only: attention walks the filled slots in chunks of at most this many
            tokens (`prefix_chunk`: fewer for a layer gaining few tokens a call, as the camera
            trunk's); the capacity is rounded up to whole chunks.
    scale_dtype: a key of `SCALE_DTYPES`. "float32" stores the group scales exactly (bit-exact with
            upstream); "float16" halves their bytes (the cache then sits within 1.15x of the packed
            floor at the published size) at the price of rounding each scale to 11 significant bits.
    protect: a key of `prune.PROTECT`. "full" (upstream): the first and current frame are kept whole,
            so xstream/diversity/cumulative layers hold max(budget, 2 x step tokens). "budget": exactly
            `budget` tokens; when the two frames do not fit, only their special tokens and their best
            `protect_share` x budget / 2 tokens each are protected (`prune.protected_top`). Not with
            prune="frame" or "keyframes" (whole frames), nor "ffn" (the current frame is scored after
            its FFN, so it is kept whole).
    protect_share: budget share reserved for the first + current frame under protect="budget".
    mass_decay: prune="cumulative": the running attention mass is multiplied by this every call.
    merge_share: prune="merge": a pruning call merges floor(merge_share x its tokens) of the tokens it
            evicts (the best-scored) into their nearest kept key instead of dropping them.
    camera_budget: tokens kept per camera-trunk layer; None: `budget` (upstream). Not with
            prune="keyframes" (the camera trunk keeps the aggregator's frames).
    camera_quant: the camera-trunk cache's layout, a key of `QUANT_LAYOUTS` applied to every camera
            layer whatever its head dim; None: the global rule (`quant` under `quant_head_dim`: the
            camera stays float at the published size, as upstream).
    camera_bits: code width of a quantized camera cache; None: `bits`.
    quant_once: quantize each token's K/V once, when it enters the cache (KIVI; `cache.kivi`): its codes
            never change. Per-token codecs encode a token at once; per-channel codecs keep the newest
            (fewer than `group`) tokens in a float window and encode them when their group fills.
            Pruning keeps or drops whole groups of a per-channel layout (`kivi` says why). False
            (default): upstream's order, the whole cache re-quantized every step (bit-exact).
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
    protect: str = "full"
    protect_share: float = 0.5
    mass_decay: float = 0.9
    merge_share: float = 0.5
    camera_budget: Optional[int] = None
    camera_quant: Optional[str] = None
    camera_bits: Optional[int] = None
    quant_once: bool = False

    def __post_init__(self):
        if self.prune not in POLICIES:
            raise ConfigError("prune", f"must be one of {tuple(POLICIES)}, got {self.prune!r}")
        if self.quant not in QUANT_LAYOUTS:
            raise ConfigError("quant", f"must be one of {QUANT_LAYOUTS}, got {self.quant!r}")
        if self.bits not in quant.PACK_BITS:
            raise ConfigError("bits", f"must be one of {quant.PACK_BITS}, got {self.bits}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ConfigError("scale_dtype", f"must be one of {tuple(SCALE_DTYPES)}, got {self.scale_dtype!r}")
        if min(self.budget, self.pool, self.group, self.chunk) < 1:
            raise ConfigError(f"budget, pool, group and chunk must be positive "
                              f"({self.budget}, {self.pool}, {self.group}, {self.chunk})")
        for name in ("budget", "pool", "group", "chunk", "camera_budget"):  # token counts are int32 on device
            if (value := getattr(self, name)) is not None and value > INT32_MAX:
                raise ConfigError(name, f"must be at most {INT32_MAX} (a 32-bit integer), got {value}")
        if self.protect not in PROTECT:
            raise ConfigError("protect", f"must be one of {PROTECT}, got {self.protect!r}")
        if self.protect == "budget" and self.prune in ("frame", "keyframes"):
            raise ConfigError(f"protect='budget' applies to token policies; prune={self.prune!r} keeps whole frames")
        if self.protect == "budget" and self.prune in RESIDUAL_POLICIES:
            raise ConfigError(f"protect='budget' does not apply to prune={self.prune!r}: the current frame is "
                              "scored after its FFN, so it is kept whole")
        if self.camera_budget is not None and self.prune in FEATURE_POLICIES:
            raise ConfigError("camera_budget", f"does not apply to prune={self.prune!r}: the camera trunk keeps "
                              "the aggregator's frames")
        if not 0.0 <= self.merge_share <= 1.0:
            raise ConfigError("merge_share", f"must be in [0, 1], got {self.merge_share}")
        if not 0.0 < self.protect_share <= 1.0:
            raise ConfigError("protect_share", f"must be in (0, 1], got {self.protect_share}")
        if not 0.0 <= self.mass_decay <= 1.0:
            raise ConfigError("mass_decay", f"must be in [0, 1], got {self.mass_decay}")
        if self.camera_budget is not None and self.camera_budget < 1:
            raise ConfigError("camera_budget", f"must be positive, got {self.camera_budget}")
        if self.camera_quant is not None and self.camera_quant not in QUANT_LAYOUTS:
            raise ConfigError("camera_quant", f"must be one of {QUANT_LAYOUTS}, got {self.camera_quant!r}")
        if self.camera_bits is not None and self.camera_bits not in quant.PACK_BITS:
            raise ConfigError("camera_bits", f"must be one of {quant.PACK_BITS}, got {self.camera_bits}")
        if self.quant_once:
            kivi.check_config(self)

    @classmethod
    def from_text(cls, text: str, defaults: Mapping[str, Any] | None = None, *, where: str | None = None,
                  sep: str = ",") -> "CacheConfig":
        """A CacheConfig from its text form: the one parser of cache settings (`xsvggt train
        --student-cache`, `xsvggt eval --settings`, the benchmarks)::

            [<policy>[-<layout><bits>|-int<bits>][:<budget>]] [<sep>KEY=VALUE ...]

        The optional head is the short form `xsvggt eval` uses (`xstream:2048`, `xstream-int4:2048`,
        `none`): a policy of `prune.POLICIES` (a registered name may contain "-"), a layout of
        `codec.LAYOUTS` ("int" is `DEFAULT_LAYOUT`) with its code width of `quant.PACK_BITS`, and
        the budget. KEY=VALUE sets any field, the value read by the field's annotation
        (`config.value_from_text`: `budget=64`, `protect_share=0.3`, `quant_head_dim=none`). Fields
        set by neither come from `defaults` (field -> value), then the dataclass defaults. Raises
        ConfigError: one sentence starting with `where` (default "cache setting '<text>'") that
        names an empty item, an unknown or repeated key (listing the keys), a value that is not of
        the field's type, or a value CacheConfig refuses."""
        where = where or f"cache setting {text.strip()!r}"

        def fail(problem: str) -> ConfigError:
            return ConfigError(f"{where}: {problem}")

        if not text.strip():
            raise fail("empty (give a setting such as prune=xstream,budget=2048 or xstream-int4:2048)")
        hints, given = typing.get_type_hints(cls), {}
        for i, item in enumerate(part.strip() for part in text.split(sep)):
            if not item:
                raise fail(f"an empty item (two {sep!r} in a row, or one at an end?)")
            key, eq, value = item.partition("=")
            if not eq and i == 0:
                given.update(_short_form(item, fail))
                continue
            key = key.strip()
            if not eq or key not in hints:
                problem = f"unknown key {key!r}" if eq else f"expected KEY=VALUE, got {item!r}"
                raise fail(f"{problem} (keys: {', '.join(f.name for f in dataclasses.fields(cls))})")
            if key in given:
                raise fail(f"{key} is given twice")
            try:
                given[key] = value_from_text(key, hints[key], value)
            except ConfigError as e:
                raise fail(str(e)) from None
        try:
            return cls(**{**(defaults or {}), **given})
        except ConfigError as e:
            raise fail(str(e)) from None

    @classmethod
    def uncompressed(cls) -> "CacheConfig":
        return cls(prune="none")

    @property
    def pruned(self) -> bool:
        return POLICIES[self.prune] is not None

    def keep(self, tokens_per_step: int) -> int:
        """Tokens a pruned layer holds at most. Under protect="full", xstream, diversity, cumulative,
        ffn and merge always keep the first and the newest `tokens_per_step` tokens (upstream), so a
        budget below twice that still keeps both; frame and keyframes keep whole frames,
        floor(budget / tokens_per_step) of them and at least two (a keyframes camera trunk keeps the
        aggregator's frames: `plan_layers`); the other policies (and protect="budget") keep exactly
        `budget`."""
        n = tokens_per_step
        if self.prune in ("frame", "keyframes"):
            return n * max(2, self.budget // n)
        if self.protect == "full" and self.prune in ("xstream", "diversity", "cumulative", "ffn", "merge"):
            return max(self.budget, 2 * n)
        return self.budget

    @property
    def carries_mass(self) -> bool:
        """Layers carry a float per slot (`LayerKV.mass`): cumulative, ffn, merge."""
        return self.prune in CARRY_POLICIES

    def camera(self) -> "CacheConfig":
        """The configuration the camera-trunk layers use: `camera_budget` / `camera_quant` /
        `camera_bits` applied (then cleared); `self` unchanged when none is set."""
        if self.camera_budget is None and self.camera_quant is None and self.camera_bits is None:
            return self
        cam = dataclasses.replace(self, budget=self.camera_budget or self.budget, camera_budget=None,
                                  camera_quant=None, camera_bits=None)
        if self.camera_quant is not None:
            cam = dataclasses.replace(cam, quant=self.camera_quant, quant_head_dim=None)
        if self.camera_bits is not None:
            cam = dataclasses.replace(cam, bits=self.camera_bits)
        return cam

    def quantizes(self, head_dim: int) -> bool:
        return self.quant != "none" and (self.quant_head_dim is None or head_dim == self.quant_head_dim)

    def codecs(self) -> tuple[Codec, Codec]:
        """(K codec, V codec) of the quantized layout."""
        if self.quant == "none":
            raise ValueError("an unquantized cache has no codecs")
        kc, vc = LAYOUTS[self.quant]
        return kc(self.bits, self.group, self.scale_dtype), vc(self.bits, self.group, self.scale_dtype)


#: Layout that the short form's `int<bits>` stands for (upstream XStreamVGGT's default KV_QUANT_MODE).
DEFAULT_LAYOUT = "kcvt"
_SUFFIX = re.compile(r"^(?P<policy>.+?)-(?P<layout>int|[a-z]+)(?P<bits>\d+)$")


def short_form_grammar() -> str:
    """The short form of a cache setting, in words (error messages, help texts)."""
    return (f"<policy>[-<layout><bits>|-int<bits>][:<budget>] with policy in {', '.join(POLICIES)}, "
            f"layout in {', '.join(LAYOUTS)} and bits in {', '.join(map(str, quant.PACK_BITS))}")


def _short_form(text: str, fail) -> dict[str, Any]:
    """`<policy>[-<layout><bits>|-int<bits>][:<budget>]` -> the CacheConfig fields it sets;
    `fail(problem)` builds the error raised."""
    head, colon, budget = text.partition(":")
    fields: dict[str, Any] = {}
    if colon:
        if not re.fullmatch(r"\d+", budget) or int(budget) < 1:
            raise fail("the budget after ':' must be a positive integer")
        fields["budget"] = int(budget)
    m = None if head in POLICIES else _SUFFIX.match(head)
    if m is not None and m["policy"] not in POLICIES or head not in POLICIES and m is None:
        raise fail(f"does not read as {short_form_grammar()}")
    if colon and (head if m is None else m["policy"]) == "none":
        raise fail("policy 'none' keeps every token: it takes no ':<budget>'")
    if m is None:
        return {"prune": head, **fields}
    layout, bits = (DEFAULT_LAYOUT if m["layout"] == "int" else m["layout"]), int(m["bits"])
    if layout not in LAYOUTS:
        raise fail(f"unknown quantization layout {layout!r} (choose from int, {', '.join(LAYOUTS)})")
    if bits not in quant.PACK_BITS:
        raise fail(f"{bits}-bit codes are not supported (choose from {', '.join(map(str, quant.PACK_BITS))})")
    return {"prune": m["policy"], "quant": layout, "bits": bits, **fields}


@flax.struct.dataclass
class LayerKV:
    """Keys/values of one attention layer.

    k, v: float [B, H, T, D] in the compute dtype (keys after q/k-norm and RoPE, as attention
    consumes them), or `Packed` when the layer is quantized.
    mass: float32 [B, T] a float per slot, pruned with the tokens: the decayed running attention mass
    (prune="cumulative"), the FFN residual norm each token had at this layer ("ffn"), the number of
    tokens merged into the slot ("merge"); else None (no leaf).
    feat: float32 [B, F, C] one feature per whole frame in the buffer (prune="keyframes"), else None.
    k_win, v_win: quantize-once layers with a per-channel codec (`kivi`): [B, H, group - 1, D] the float
    residual window of K / V, the newest length % group tokens not yet encoded; else None.
    """

    k: Array | Packed
    v: Array | Packed
    mass: Optional[Array] = None
    feat: Optional[Array] = None
    k_win: Optional[Array] = None
    v_win: Optional[Array] = None


CHUNK_CALLS = 256  # an uncompressed layer's attention chunk holds at most this many calls' tokens


def prefix_chunk(cache_cfg: CacheConfig, step_tokens: int) -> int:
    """Slots per attention chunk of an uncompressed layer that gains `step_tokens` tokens a call:
    min(chunk, CHUNK_CALLS x step_tokens). A function of the layer only, never of the stream's
    length: the capacity is rounded up to whole chunks and attention folds over the filled chunks, so
    the same stream reduces over the same blocks whatever capacity it was given. (A chunk sized to the
    capacity would make a scene's last bits depend on the longest scene of its pool.) The camera trunk
    (1 token a call) gets 256-slot chunks, 64 frames of 4 iterations, rather than the global layers'
    2,048, so a short stream does not hold 2,048 camera slots."""
    return min(cache_cfg.chunk, CHUNK_CALLS * step_tokens)


def stored_slots(kv: LayerKV) -> int:
    """Tokens a layer cache can hold."""
    return kv.k.slots if isinstance(kv.k, Packed) else kv.k.shape[2]


def _stage(stored: Array | Packed, start: Array, new: Array, work: int) -> Array:
    """[B, H, work, D]: the stored tokens (float), zeros past `start`, and `new` written at `start`."""
    if isinstance(stored, Packed):
        past = stored.decode()
        past = jnp.where((jnp.arange(past.shape[2]) < start)[:, None], past, 0.0).astype(new.dtype)
        past = jnp.pad(past, ((0, 0), (0, 0), (0, work - past.shape[2]), (0, 0)))
    else:
        past = stored
    return jax.lax.dynamic_update_slice_in_dim(past, new.astype(past.dtype), start, axis=2)


def update_layer(kv: LayerKV, length: Array, q: Array, k: Array, v: Array, *, cache_cfg: CacheConfig,
                 num_special: int, key: Array,
                 frame_feature: Optional[Array] = None) -> tuple[Array, Array, Mask | Array, LayerKV, Array]:
    """One attention call's cache update, pure.

    kv: this layer's stored keys/values ([B, H, T, D] float, or `Packed`); length: int32 [] filled
    slots; q, k, v: [B, H, N, D] this call's queries/keys/values (after norm + RoPE).
    Returns (k_att, v_att, mask, new_kv, new_length): the keys/values to attend over ([stored; current],
    [B, H, W, D] with W = stored slots, plus N when a pruned quantized layer stages the current tokens
    outside its storage), their mask (an additive [W] bias, or a `KeyPrefix` for the uncompressed cache),
    and the layer's next state: [stored; current] re-quantized when the layer is quantized (upstream
    fake-quantizes the whole cache every step) and pruned back to the budget by the policy.
    `key`: this call's random key (the `random` policy). A layer carrying `mass` (cumulative) adds
    this call's `prune.attention_mass` over the attended keys to its decayed running mass first (ffn:
    the new slots get 0 until the block's `LayerCache.record_residual`; merge: a count of 1).
    `frame_feature`: float32 [B, C] the current frame's feature (keyframes, `frames.frame_descriptor`):
    such a layer keeps whole frames (`frames.frame_layout`) and prunes once its buffer is full of them.
    A merging policy (`prune.MERGE_POLICIES`) scores and rewrites the float values as attended, and a
    quantized layer then quantizes the rewritten buffer.
    """
    policy = POLICIES[cache_cfg.prune]
    n = k.shape[2]
    codecs = (kv.k.codec, kv.v.codec) if isinstance(kv.k, Packed) else None
    once = codecs is not None and cache_cfg.quant_once   # quantize once (`kivi`): codes never change
    slots = stored_slots(kv)
    work = slots + n if (codecs and policy is not None) else slots
    if once:
        k_att, v_att, staged = kivi.stage(kv, length, k, v, work)
    else:
        k_att, v_att = _stage(kv.k, length, k, work), _stage(kv.v, length, v, work)
    end = length + n
    if policy is None:  # static capacity: attend over the filled chunks only
        mask = KeyPrefix(end, prefix_chunk(cache_cfg, n))  # the capacity is whole chunks (plan_layers)
    else:               # a pruned buffer is (nearly) full: one masked pass
        mask = jnp.where(jnp.arange(work) < end, 0.0, -jnp.inf).astype(jnp.float32)

    rewrites = cache_cfg.prune in MERGE_POLICIES  # static: the policy rewrites K/V, quantized after it
    if codecs and not once and not rewrites:  # upstream: the whole cache [past; current] is fake-quantized
        sk, sv = codecs[0].encode(k_att), codecs[1].encode(v_att)
        score_k = sk.decode()
    else:
        sk, sv, score_k = k_att, v_att, k_att
    new_length = end
    b = k.shape[0]
    mass = None
    if kv.mass is not None:  # [B, work]: the decayed past mass (zero on free slots) + this call's
        past = jnp.pad(jnp.where(jnp.arange(slots) < length, kv.mass, 0.0), ((0, 0), (0, work - slots)))
        if cache_cfg.prune in MASS_POLICIES:
            mass = cache_cfg.mass_decay * past + attention_mass(q, k_att, end, cache_cfg.pool, num_special)
        elif cache_cfg.prune in MERGE_POLICIES:  # a new token stands for itself
            mass = past + ((jnp.arange(work) >= length) & (jnp.arange(work) < end))
        else:                                    # ffn: written after the block's FFN (record_residual)
            mass = past
    feat = ft = None
    if policy is not None:
        keep, hold = cache_cfg.keep(n), 0
        if kv.feat is not None:  # whole frames: the layout is the frame buffer's (frames.frame_layout)
            ft, keep, hold = frame_layout(kv.feat, work, n)
            feat = write_feature(kv.feat, frame_feature, length, ft)
        ctx = PruneContext(k=score_k, q_new=q, length=end, n_new=n, keep=keep, pool=cache_cfg.pool,
                           num_special=num_special, key=key, mass=mass, protect=cache_cfg.protect,
                           protect_share=cache_cfg.protect_share, v=sv if rewrites else None,
                           merge_share=cache_cfg.merge_share, frame_feat=feat, frame_tokens=ft or 0)
        idx = policy(ctx)                                                     # [B, keep]
        if rewrites:  # merged K/V and counts: gather the kept slots from them (quantized here)
            idx, sk, sv, mass = idx
            if codecs:
                sk, sv = codecs[0].encode(sk), codecs[1].encode(sv)
        if once:  # whole codes: per-channel groups kept or dropped whole (merge, keyframes: refused)
            idx, new_length = kivi.survivors(staged, idx, end, keep, slots)
        else:
            ident = jnp.broadcast_to(jnp.arange(slots, dtype=jnp.int32), (b, slots))
            tail = jnp.broadcast_to(jnp.arange(keep, slots, dtype=jnp.int32), (b, slots - keep))
            idx = jnp.where(end > keep + hold, jnp.concatenate([idx, tail], -1), ident)  # [B, slots]
            new_length = jnp.minimum(end, keep) if hold == 0 else jnp.where(end > keep + hold, keep, end)
    elif codecs and not once:
        idx = jnp.broadcast_to(jnp.arange(slots, dtype=jnp.int32), (b, slots))
    if once:
        new_kv = LayerKV(**kivi.stored(staged, idx if policy is not None else None, slots))
    elif codecs:
        new_kv = LayerKV(sk.take(idx), sv.take(idx))
    elif policy is not None:
        new_kv = LayerKV(take_rows(sk, idx), take_rows(sv, idx))
    else:
        new_kv = LayerKV(sk, sv)
    if mass is not None:
        new_kv = new_kv.replace(mass=jnp.take_along_axis(mass, idx, axis=1))
    if feat is not None:
        new_kv = new_kv.replace(feat=keep_features(feat, idx[:, :keep], ft, end > keep + hold))
    return k_att, v_att, mask, new_kv, new_length


@flax.struct.dataclass
class LayerCache:
    """One attention layer's cache as the layer sees it during a step (see `layers.KVCache`).

    kv: the stored keys/values; length: int32 [] filled slots; key: the random key of the next
    attention call (the `random` policy); frame_feature: float32 [B, C] the current frame's feature,
    handed over by the model when the policy wants one (`wants_frame_feature`), else None.
    """

    kv: LayerKV
    length: Array
    key: Array
    cache_cfg: CacheConfig = flax.struct.field(pytree_node=False)
    num_special: int = flax.struct.field(pytree_node=False)
    frame_feature: Optional[Array] = None

    def update(self, q: Array, k: Array, v: Array) -> tuple[Array, Array, Mask | Array, "LayerCache"]:
        """`update_layer` on this layer: (k_att, v_att, mask, next LayerCache)."""
        k_att, v_att, mask, kv, length = update_layer(self.kv, self.length, q, k, v, cache_cfg=self.cache_cfg,
                                                      num_special=self.num_special, key=self.key,
                                                      frame_feature=self.frame_feature)
        return k_att, v_att, mask, self.replace(kv=kv, length=length)

    @property
    def wants_frame_feature(self) -> bool:
        """Static: the policy selects whole frames by a feature of each (`frames.frame_descriptor`),
        which the model hands over as `frame_feature` before the layer's attention."""
        return self.cache_cfg.prune in FEATURE_POLICIES

    @property
    def records_residual(self) -> bool:
        """Static: the policy scores tokens by their FFN residual; the block hands it over after its FFN
        (`record_residual`)."""
        return self.cache_cfg.prune in RESIDUAL_POLICIES

    def record_residual(self, residual: Array) -> "LayerCache":
        """After `update`: the L2 norms of this call's FFN residual [B, N, C] (the block's
        ls2(mlp(norm2(x)))) become the scores of its N tokens, which sit at [length - N, length) (the
        current frame is always kept whole by a residual policy)."""
        norm = jnp.sqrt(jnp.sum(jnp.square(residual.astype(jnp.float32)), axis=-1))       # [B, N]
        mass = jax.lax.dynamic_update_slice_in_dim(self.kv.mass, norm, self.length - residual.shape[1], axis=1)
        return self.replace(kv=self.kv.replace(mass=mass))

    @property
    def quantized(self) -> bool:
        return isinstance(self.kv.k, Packed)

    def packed_unsupported(self) -> Optional[str]:
        """Why this layer cannot attend to its packed codes (`packed_attend.unsupported`), or None."""
        return packed_attend.unsupported(self.kv, self.cache_cfg)

    def attend_packed(self, q: Array, k: Array, v: Array, *,
                      precision: jax.lax.Precision = jax.lax.Precision.HIGHEST) -> tuple[Array, "LayerCache"]:
        """This call's attention read from the stored codes (`packed_attend.attend`, the same keys and
        values as `update`'s) and the next LayerCache: (out [B, H, N, D], next)."""
        out = packed_attend.attend(self.kv, self.length, q, k, v, self.cache_cfg, precision)
        _, _, _, kv, length = update_layer(self.kv, self.length, q, k, v, cache_cfg=self.cache_cfg,
                                           num_special=self.num_special, key=self.key)
        return out, self.replace(kv=kv, length=length)


def layer_caches(kvs: tuple, length: Array, key: Array, cache_cfg: CacheConfig, num_special: int) -> tuple:
    """The `LayerCache`s of a stack of layers sharing one fill level; layer i's key is fold_in(key, i)."""
    return tuple(LayerCache(kv, length, jax.random.fold_in(key, i), cache_cfg, num_special)
                 for i, kv in enumerate(kvs))


@flax.struct.dataclass
class StreamCache:
    """Everything a stream carries from one frame to the next.

    global_kv:   tuple of `depth` LayerKV (the aggregator's global blocks).
    camera_kv:   tuple of `camera.trunk_depth` LayerKV (the camera head's trunk).
    global_len:  int32 [] valid tokens in every global_kv layer.
    camera_len:  int32 [] valid tokens in every camera_kv layer.
    frame_index: int32 [] frames processed so far.
    track_points: float32 [B, N, 2] query points for the next frame (the last frame's tracks), or None
                 without query points (no zero-size leaves: orbax refuses them).
    rng:         uint32 [2] key of the `random` policy (advanced every step).
    built_for:   uint8 [BUILT_FOR_BYTES] the static fields below as JSON (`encode_built_for`), a leaf
                 so a checkpoint keeps them; passed through every step unchanged.
    Static (not leaves; checked by `step`): cache_cfg, the configuration it was built for; frame_hw,
    the frame size (H, W); max_frames, the frame capacity of an uncompressed cache (None when pruned).
    """

    global_kv: tuple
    camera_kv: tuple
    global_len: Array
    camera_len: Array
    frame_index: Array
    track_points: Optional[Array]
    rng: Array
    built_for: Array
    cache_cfg: CacheConfig = flax.struct.field(pytree_node=False)
    frame_hw: tuple[int, int] = flax.struct.field(pytree_node=False)
    max_frames: Optional[int] = flax.struct.field(pytree_node=False)


BUILT_FOR_BYTES = 512  # the JSON of a CacheConfig, frame size and capacity, zero padded


def _built_for_json(cache_cfg: CacheConfig, frame_hw, max_frames) -> str:
    return json.dumps({"cache_cfg": dataclasses.asdict(cache_cfg), "frame_hw": [int(x) for x in frame_hw],
                       "max_frames": max_frames}, sort_keys=True, separators=(",", ":"))


def encode_built_for(cache_cfg: CacheConfig, frame_hw, max_frames: int | None) -> np.ndarray:
    """uint8 [BUILT_FOR_BYTES]: what a cache was built for, as the `StreamCache.built_for` leaf."""
    raw = _built_for_json(cache_cfg, frame_hw, max_frames).encode()
    if len(raw) > BUILT_FOR_BYTES:
        raise ValueError(f"the cache's configuration record needs {len(raw)} bytes, more than {BUILT_FOR_BYTES}")
    return np.frombuffer(raw.ljust(BUILT_FOR_BYTES, b"\0"), np.uint8).copy()


def _decoded(row: np.ndarray) -> dict | None:
    try:
        data = json.loads(row.tobytes().rstrip(b"\0").decode())
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("cache_cfg"), dict):
        return None
    flat = {f"{k}=": v for k, v in data["cache_cfg"].items()}
    flat.update({"frame_hw=": tuple(data.get("frame_hw") or ()), "max_frames=": data.get("max_frames")})
    return flat


def check_built_for(cache: StreamCache) -> None:
    """A concrete cache's `built_for` leaf (what its arrays were built for, kept by checkpoints) agrees
    with its static fields (the tree it is in). They differ when a checkpoint was restored into the
    tree of another CacheConfig / frame size with the same shapes: CacheMismatchError naming the
    difference. Reads the leaf from the device (waits for the step that produced it)."""
    want = encode_built_for(cache.cache_cfg, cache.frame_hw, cache.max_frames)
    rows = np.asarray(jax.device_get(cache.built_for), np.uint8).reshape(-1, BUILT_FOR_BYTES)  # a pool: [B, .]
    for row in rows:
        if np.array_equal(row, want):
            continue
        saved, tree = _decoded(row), _decoded(want)
        if saved is None:
            raise CacheMismatchError("the cache's configuration record (built_for) is unreadable: "
                                     "not a cache built by init_cache (or a damaged checkpoint)")
        diff = [f"{k}{saved.get(k)!r} (saved) vs {tree.get(k)!r} (restored into)"
                for k in tree.keys() | saved.keys() if saved.get(k) != tree.get(k)]
        raise CacheMismatchError("the cache's arrays were built for another configuration than the tree they "
                                 "were restored into: " + ", ".join(sorted(diff))
                                 + "; restore into init_cache(...) of the saved configuration")


def cache_overflowed(cache: StreamCache) -> Array:
    """bool []: an uncompressed cache was stepped past `max_frames` (its outputs since are NaN)."""
    if cache.max_frames is None:
        return jnp.zeros((), bool)
    return cache.frame_index > cache.max_frames


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
    frames: int = 0      # keyframes: whole frames a buffer holds (K kept + the current), else 0
    feat_dim: int = 0    # keyframes: the frame feature's width

    @property
    def work_slots(self) -> int:
        """Tokens attended over in one call: a pruned, quantized cache stages [stored; current]
        outside the stored arrays; otherwise the current tokens are written into free slots."""
        return self.slots + self.step_tokens if (self.quantized and self.pruned) else self.slots


def plan_layers(cfg: ModelConfig, cache_cfg: CacheConfig, frame_hw: tuple[int, int],
                max_frames: int | None) -> tuple[LayerPlan, LayerPlan]:
    """Layouts of the global and the camera caches (the camera under `cache_cfg.camera()`). A
    keyframes cache holds F = K + 1 whole frames in every layer, K = keep(p) / p of the global layers
    (p tokens a frame): the camera trunk keeps the same frames, `iterations` tokens each."""
    p, it = cfg.tokens_per_frame(*frame_hw), cfg.camera.iterations
    frames = cache_cfg.keep(p) // p + 1 if cache_cfg.pruned and cache_cfg.prune in FEATURE_POLICIES else 0
    cam_heads = cfg.camera.num_heads
    cam_hd = 2 * cfg.embed_dim // cam_heads
    if not cache_cfg.pruned and not max_frames:
        raise ValueError("an uncompressed cache (prune='none') needs max_frames, the stream length")

    def plan(layers, heads, hd, n, frame_tokens, frames_tokens, cc: CacheConfig):
        qz = cc.quantizes(hd)
        if not cc.pruned:  # whole attention chunks
            c = prefix_chunk(cc, n)
            slots = max(1, -(-frames_tokens // c)) * c
        elif frames:  # F whole frames, the current one staged outside when quantized
            slots = frames * frame_tokens - (n if qz else 0)
        else:  # room for the current tokens too, unless they are staged outside (quantized)
            slots = cc.keep(n) + (0 if qz else n)
        return LayerPlan(layers, heads, hd, n, slots, qz, cc.pruned, frames, cfg.embed_dim if frames else 0)

    return (plan(cfg.depth, cfg.num_heads, cfg.head_dim, p, p, (max_frames or 0) * p, cache_cfg),
            plan(cfg.camera.trunk_depth, cam_heads, cam_hd, 1, it, (max_frames or 0) * it, cache_cfg.camera()))


def _empty_layers(plan: LayerPlan, cache_cfg: CacheConfig, batch: int, dtype) -> tuple:
    shape = (batch, plan.heads, plan.slots, plan.head_dim)
    mass = (lambda: jnp.zeros((batch, plan.slots), jnp.float32)) if cache_cfg.carries_mass else (lambda: None)
    feat = (lambda: jnp.zeros((batch, plan.frames, plan.feat_dim), jnp.float32)) if plan.frames else (lambda: None)
    if not plan.quantized:  # distinct buffers per leaf: the cache is donated to `step`
        return tuple(LayerKV(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), mass(), feat())
                     for _ in range(plan.layers))
    if cache_cfg.quant_once:  # stored rows: whole groups of the stored slots (`kivi`)
        return tuple(LayerKV(mass=mass(), **kivi.empty_layer(cache_cfg.codecs(), *shape, dtype))
                     for _ in range(plan.layers))
    rows = -(-plan.work_slots // cache_cfg.group)
    kc, vc = cache_cfg.codecs()
    return tuple(LayerKV(kc.empty(*shape, rows), vc.empty(*shape, rows), mass(), feat()) for _ in range(plan.layers))


def init_cache(cfg: ModelConfig, cache_cfg: CacheConfig, batch: int, frame_hw: tuple[int, int],
               max_frames: int | None = None, query_points: Array | None = None,
               sharding: Any = None) -> StreamCache:
    """Empty cache for frames of size frame_hw = (H, W).

    max_frames: frames an uncompressed cache holds (required for prune="none", ignored otherwise).
    query_points: [B, N, 2] (or [N, 2] for B = 1) pixel (x, y) to track, or None.
    sharding: a `jax.sharding.Sharding` for every leaf, or a pytree of them matching the cache; None
    leaves the arrays uncommitted on the default device (`make_step` then places them like the
    parameters on the first step, so the jitted step compiles once).
    """
    g_plan, c_plan = plan_layers(cfg, cache_cfg, frame_hw, max_frames)
    if query_points is not None:  # own buffer: the cache is donated
        query_points = jnp.array(query_points, jnp.float32, copy=True).reshape(batch, -1, 2)
        if query_points.shape[1] == 0:
            query_points = None
    cache = StreamCache(
        global_kv=_empty_layers(g_plan, cache_cfg, batch, cfg.trunk_jnp_dtype),
        camera_kv=_empty_layers(c_plan, cache_cfg.camera(), batch, cfg.head_jnp_dtype),
        global_len=jnp.zeros((), jnp.int32),
        camera_len=jnp.zeros((), jnp.int32),
        frame_index=jnp.zeros((), jnp.int32),
        track_points=query_points,
        rng=jax.random.PRNGKey(cache_cfg.seed),
        built_for=jnp.asarray(encode_built_for(cache_cfg, frame_hw, None if cache_cfg.pruned else int(max_frames))),
        cache_cfg=cache_cfg,
        frame_hw=tuple(int(x) for x in frame_hw),
        max_frames=None if cache_cfg.pruned else int(max_frames),
    )
    return cache if sharding is None else jax.device_put(cache, sharding)


def tree_bytes(tree) -> int:
    """Bytes of every array leaf of a pytree (works on ShapeDtypeStructs too)."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def cache_bytes(cache: StreamCache) -> int:
    """Bytes of every array in the cache."""
    return tree_bytes(cache)


def cache_report(cfg: ModelConfig, cache_cfg: CacheConfig, cache: StreamCache) -> dict:
    """Byte accounting: all arrays; global K/V with their scales, zero points and indices; camera;
    and the packed floor (budget x layers x 2 x dims x bits/8) of the quantized global cache."""
    bits = cache_cfg.bits if cache_cfg.quant != "none" else jnp.dtype(cfg.trunk_jnp_dtype).itemsize * 8
    return {
        "cache_bytes": cache_bytes(cache),
        "cache_bytes_global": tree_bytes(cache.global_kv),
        "cache_bytes_camera": tree_bytes(cache.camera_kv),
        "packed_floor_bytes": int(cache_cfg.budget * cfg.depth * 2 * cfg.embed_dim * bits // 8),
    }
