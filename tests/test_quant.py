"""Tests of xsvggt_jax.cache.quant: bit packing and upstream's group-wise fake quantization.

The expected quantizer outputs come from `_refs.ref_quant`, a small independent float32 numpy
transcription of the upstream PyTorch formula (last-axis groups, zero padding counted in min/max).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _refs import ref_quant
from xsvggt_jax.cache.codec import LAYOUTS, SCALE_DTYPES, PerChannel, PerToken
from xsvggt_jax.cache.quant import PACK_BITS, dequantize, fake_quant, pack, packed_bytes, quantize, unpack


def _rng(seed=0):
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------- pack / unpack
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 64, 70, 127])
def test_pack_unpack_roundtrip(bits, n):
    codes = _rng(bits * 1000 + n).integers(0, 2**bits, size=(3, 2, n), dtype=np.uint8)
    packed = pack(jnp.asarray(codes), bits)
    per = 8 // bits
    assert packed.dtype == jnp.uint8
    assert packed.shape == (3, 2, -(-n // per))
    assert packed.size == packed_bytes(codes.shape, bits)
    out = unpack(packed, bits, n)
    assert out.dtype == jnp.uint8 and out.shape == codes.shape
    np.testing.assert_array_equal(np.asarray(out), codes)
    # jit gives the same bytes
    jpacked = jax.jit(pack, static_argnums=1)(codes, bits)
    np.testing.assert_array_equal(np.asarray(jpacked), np.asarray(packed))
    np.testing.assert_array_equal(np.asarray(jax.jit(unpack, static_argnums=(1, 2))(jpacked, bits, n)), codes)


def _np_pack(codes, bits):
    """Independent loop-based packer (first code in the low bits)."""
    per = 8 // bits
    flat = list(codes) + [0] * (-len(codes) % per)
    return np.array([sum(int(c) << (bits * j) for j, c in enumerate(flat[i:i + per]))
                     for i in range(0, len(flat), per)], np.uint8)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_matches_loop_reference(bits):
    codes = _rng(7).integers(0, 2**bits, size=37, dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(pack(codes, bits)), _np_pack(codes, bits))


def test_nibble_order():
    assert np.asarray(pack(np.array([1, 2], np.uint8), 4)).tolist() == [0x21]
    assert np.asarray(pack(np.array([1, 2, 3, 0], np.uint8), 2)).tolist() == [0b00111001]
    assert np.asarray(pack(np.array([0xAB], np.uint8), 8)).tolist() == [0xAB]
    # short tail is padded with zero codes
    assert np.asarray(pack(np.array([1, 2, 3], np.uint8), 4)).tolist() == [0x21, 0x03]
    assert np.asarray(pack(np.array([3], np.uint8), 2)).tolist() == [0b11]
    np.testing.assert_array_equal(np.asarray(unpack(np.array([0x21], np.uint8), 4, 2)), [1, 2])
    np.testing.assert_array_equal(np.asarray(unpack(np.array([0b00111001], np.uint8), 2, 4)),
                                  [1, 2, 3, 0])


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_boundary_codes(bits):
    maxq = 2**bits - 1
    per = 8 // bits
    for codes in (np.zeros(2 * per + 1, np.uint8), np.full(2 * per + 1, maxq, np.uint8),
                  np.array([0, maxq] * per + [maxq], np.uint8)):
        packed = np.asarray(pack(codes, bits))
        np.testing.assert_array_equal(np.asarray(unpack(packed, bits, codes.size)), codes)
    assert np.asarray(pack(np.full(per, maxq, np.uint8), bits)).tolist() == [0xFF]
    assert np.asarray(pack(np.zeros(per, np.uint8), bits)).tolist() == [0]


def test_packed_bytes():
    assert packed_bytes((2, 3, 70), 4) == 2 * 3 * 35
    assert packed_bytes((5, 7), 2) == 5 * 2
    assert packed_bytes((5, 7), 4) == 5 * 4
    assert packed_bytes((5, 7), 8) == 35
    with pytest.raises(ValueError):
        packed_bytes((4,), 3)


def test_pack_rejects_bad_args():
    with pytest.raises(ValueError):
        pack(np.zeros(4, np.uint8), 3)
    with pytest.raises(ValueError):
        unpack(np.zeros(2, np.uint8), 4, 5)


# ----------------------------------------------------------------------------- quantizer
def _check_against_ref(x, bits, gs, axis, fn=None):
    deq_r, q_r, s_r, z_r = ref_quant(x, bits, gs, axis)
    codes, scale, zero = (fn or quantize)(jnp.asarray(x), bits, gs, axis)
    assert codes.dtype == jnp.uint8 and codes.shape == x.shape
    assert scale.dtype == jnp.float32 and zero.dtype == jnp.float32
    assert scale.shape == s_r.shape and zero.shape == z_r.shape
    np.testing.assert_array_equal(np.asarray(codes), q_r.astype(np.uint8))
    np.testing.assert_array_equal(np.asarray(scale), s_r)
    np.testing.assert_array_equal(np.asarray(zero), z_r)
    deq = dequantize(codes, scale, zero, gs, axis)
    assert deq.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(deq), deq_r)
    np.testing.assert_array_equal(np.asarray(fake_quant(jnp.asarray(x), bits, gs, axis)), deq_r)
    return np.asarray(codes), np.asarray(scale), np.asarray(zero), np.asarray(deq)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("value", [0.3, -0.3, 0.0, 5.0])
def test_all_equal_group_hits_eps(bits, value):
    maxq = 2**bits - 1
    x = np.full((2, 64), value, np.float32)
    codes, scale, zero, deq = _check_against_ref(x, bits, 64, -1)
    np.testing.assert_array_equal(scale, np.full((2, 1), np.float32(1e-12)))
    # formula by hand: zero = clip(round(-v/1e-12)), q = clip(round(v/1e-12) + zero)
    if value > 0:
        want_zero, want_q = 0, maxq
    elif value < 0:
        want_zero, want_q = maxq, 0
    else:
        want_zero, want_q = 0, 0
    assert (zero == want_zero).all() and (codes == want_q).all()
    np.testing.assert_array_equal(deq, np.float32(1e-12) * np.float32(want_q - want_zero))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_padded_last_group(bits):
    # values all positive: the padded zeros of the last group (70 = 64 + 6) pull its min to 0
    x = _rng(1).uniform(1.0, 2.0, size=(3, 70)).astype(np.float32)
    codes, scale, zero, deq = _check_against_ref(x, bits, 64, -1)
    assert scale.shape == (3, 2)
    tail = x[:, 64:]
    np.testing.assert_array_equal(scale[:, 1], np.maximum((tail.max(-1) - np.float32(0)) / np.float32(2**bits - 1),
                                                          np.float32(1e-12)))
    unpadded = (tail.max(-1) - tail.min(-1)) / np.float32(2**bits - 1)
    assert (scale[:, 1] > unpadded).all()  # padding changed the range


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("axis,shape,gs", [(-1, (2, 3, 16, 64), 64), (-2, (2, 3, 16, 64), 8),
                                           (-2, (2, 3, 21, 32), 8), (-1, (2, 3, 5, 70), 32),
                                           (1, (4, 70, 3), 64), (0, (9, 5), 4)])
def test_matches_reference_random(bits, axis, shape, gs):
    x = (_rng(bits + len(shape)).standard_normal(shape) * 3).astype(np.float32)
    codes, scale, zero, deq = _check_against_ref(x, bits, gs, axis)
    maxq = 2**bits - 1
    assert codes.min() >= 0 and codes.max() <= maxq
    assert zero.min() >= 0 and zero.max() <= maxq
    # jitted path agrees bit for bit
    _check_against_ref(x, bits, gs, axis, fn=jax.jit(quantize, static_argnums=(1, 2, 3)))
    jdeq = jax.jit(fake_quant, static_argnums=(1, 2, 3))(x, bits, gs, axis)
    np.testing.assert_array_equal(np.asarray(jdeq), deq)


def test_per_token_vs_per_channel_differ():
    x = _rng(3).standard_normal((1, 2, 32, 64)).astype(np.float32)
    tok = np.asarray(fake_quant(x, 4, 64, -1))
    ch = np.asarray(fake_quant(x, 4, 32, -2))
    np.testing.assert_array_equal(tok, ref_quant(x, 4, 64, -1)[0])
    np.testing.assert_array_equal(ch, ref_quant(x, 4, 32, -2)[0])
    assert not np.array_equal(tok, ch)
    assert quantize(x, 4, 64, -1)[1].shape == (1, 2, 32, 1)
    assert quantize(x, 4, 32, -2)[1].shape == (1, 2, 1, 64)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis,gs", [(-1, 64), (-1, 48), (-2, 16)])
def test_dequant_error_bound(bits, axis, gs):
    x = _rng(bits).standard_normal((2, 4, 40, 64)).astype(np.float32)
    codes, scale, zero = quantize(x, bits, gs, axis)
    deq = np.asarray(dequantize(codes, scale, zero, gs, axis))
    assert int(np.asarray(codes).max()) <= 2**bits - 1
    # every group here straddles 0 (normal data / zero padding), so no value is clipped
    s = np.asarray(jnp.repeat(scale, gs, axis=axis))
    s = np.moveaxis(np.moveaxis(s, axis, -1)[..., :x.shape[axis]], -1, axis)
    err = np.abs(deq - x)
    assert (err <= s / 2 * (1 + 1e-5) + 1e-6).all(), float((err - s / 2).max())


def test_nonfinite_inputs_follow_nan_to_num():
    x = _rng(5).standard_normal((3, 16)).astype(np.float32)
    x[0, 3] = np.inf
    x[1, 5] = -np.inf
    x[2, 7] = np.nan
    deq_r, q_r, s_r, z_r = ref_quant(x, 4, 8, -1)
    codes, scale, zero = quantize(x, 4, 8, -1)
    np.testing.assert_array_equal(np.asarray(codes), q_r.astype(np.uint8))
    np.testing.assert_array_equal(np.asarray(zero), z_r)
    assert int(np.asarray(codes).max()) <= 15


@pytest.mark.parametrize("dtype,eps", [(jnp.bfloat16, 1e-6), (jnp.float16, 1e-6), (jnp.float32, 1e-12)])
def test_eps_by_dtype(dtype, eps):
    x = jnp.full((1, 8), 0.5, dtype)
    _, scale, _ = quantize(x, 4, 8)
    np.testing.assert_array_equal(np.asarray(scale), np.full((1, 1), np.float32(eps)))
    # half inputs are upcast exactly, so they match the float32 reference with their eps
    y = (_rng(2).standard_normal((4, 24))).astype(np.float32)
    yh = jnp.asarray(y).astype(dtype)
    deq_r = ref_quant(np.asarray(yh.astype(jnp.float32)), 4, 8, -1, eps=eps)[0]
    np.testing.assert_array_equal(np.asarray(fake_quant(yh, 4, 8)), deq_r)


@pytest.mark.parametrize("axis,gs", [(-2, 8), (-1, 16)])
def test_vmap(axis, gs):
    x = _rng(4).standard_normal((3, 2, 20, 16)).astype(np.float32)
    f = functools.partial(fake_quant, bits=4, group=gs, axis=axis)
    want = ref_quant(x, 4, gs, axis)[0]
    np.testing.assert_array_equal(np.asarray(jax.vmap(f)(jnp.asarray(x))), want)
    np.testing.assert_array_equal(np.asarray(jax.jit(jax.vmap(f))(jnp.asarray(x))), want)


def test_packed_codes_roundtrip_through_quantize():
    x = _rng(6).standard_normal((2, 3, 70)).astype(np.float32)
    codes, scale, zero = quantize(x, 4, 32, -1)
    packed = pack(codes, 4)
    assert packed.size == packed_bytes(x.shape, 4)
    again = unpack(packed, 4, x.shape[-1])
    np.testing.assert_array_equal(np.asarray(dequantize(again, scale, zero, 32, -1)),
                                  np.asarray(fake_quant(x, 4, 32, -1)))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_bit_parity_many_groups(bits):
    """Enough groups that XLA's `a / broadcast(b) -> a * (1/b)` rewrite (off by an ulp) would
    flip some round() and some scale; the quantizer must use true division like upstream."""
    x = (_rng(10 + bits).standard_normal((8, 4, 256, 64)) * 2).astype(np.float32)
    _check_against_ref(x, bits, 64, -1)
    _check_against_ref(x, bits, 64, -2, fn=jax.jit(quantize, static_argnums=(1, 2, 3)))


# ----------------------------------------------------------------------------- cache codecs
@pytest.mark.parametrize("codec_cls,axis", [(PerToken, -1), (PerChannel, -2)])
@pytest.mark.parametrize("bits", PACK_BITS)
def test_codec_encode_decode_take(codec_cls, axis, bits):
    """A codec stores upstream's fake-quantized values exactly, and `take` keeps tokens (with their
    own group's parameters, also when tokens move between per-channel groups)."""
    x = _rng(bits).standard_normal((2, 3, 20, 16)).astype(np.float32)
    codec = codec_cls(bits, 8)
    packed = codec.encode(jnp.asarray(x))
    assert packed.codes.shape == (2, 3, 20, packed_bytes((16,), bits)) and packed.codes.dtype == jnp.uint8
    assert (packed.group_of is None) == (codec_cls is PerToken)            # no zero-size leaves
    want = ref_quant(x, bits, 8, axis)[0]
    np.testing.assert_array_equal(np.asarray(packed.decode()), want)
    idx = np.array([[19, 0, 7, 8], [3, 3, 12, 1]], np.int32)               # per batch row, any order
    kept = np.asarray(packed.take(jnp.asarray(idx)).decode())
    np.testing.assert_array_equal(kept, np.stack([want[b][:, idx[b]] for b in range(2)]))
    empty = codec.empty(2, 3, 20, 16, rows=3)
    assert jax.tree.map(lambda a: a.shape, empty).codes == packed.codes.shape


def test_layout_registry():
    assert set(LAYOUTS) == {"kcvt", "ktvt", "kcvc", "ktvc"}
    assert all(LAYOUTS[name] == tuple({"c": PerChannel, "t": PerToken}[name[i]] for i in (1, 3)) for name in LAYOUTS)
    assert tuple(SCALE_DTYPES) == ("float32", "float16")
    with pytest.raises(ValueError, match="bits"):
        PerToken(3, 8)
    with pytest.raises(ValueError, match="scale_dtype"):
        PerToken(4, 8, "bfloat16")
