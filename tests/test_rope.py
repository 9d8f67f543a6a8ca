"""RoPE, RoPE + KV-cache write, plain KV-cache write: the float64 references against independent formulas
(complex rotation for gptj, rotate-half for neox), known values, pass-through dims, slot handling, argument
errors and the launch shape rule (CPU); the CUDA kernel against the references, caches bit for bit (GPU)."""

from __future__ import annotations

import cmath
import importlib
import math

import numpy as np
import pytest
from tolerances import assert_close, poison

from rawformer.kernels import modules
from rawformer.ops.rope import kv_write, kv_write_ref, rope, rope_kv_write, rope_ref

R = importlib.import_module("rawformer.ops.rope")  # the module (rawformer.ops.rope is the function)

F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)


# ---- independent formulas ------------------------------------------------------------------------------


def inv_freq_literal(base: float, rot: int) -> np.ndarray:
    """1 / base^(2p/R), p = 0 .. R/2 - 1, rounded to float32 (the dtype the contract fixes)."""
    return np.array([1.0 / base ** (2 * p / rot) for p in range(rot // 2)], dtype=np.float32)


def angle32(pos: int, inv32: np.float32) -> float:
    """The float32 angle float32(pos) * inv_freq, as a Python float."""
    return float(np.float32(pos) * np.float32(inv32))


def gptj_complex(x: np.ndarray, positions: np.ndarray, inv32: np.ndarray, rot: int) -> np.ndarray:
    """Pairs (2p, 2p+1) as complex numbers z = a + ib, rotated by multiplying with e^{i theta}."""
    y = x.astype(np.float64).copy()
    for t in range(x.shape[0]):
        for h in range(x.shape[1]):
            for p in range(rot // 2):
                z = complex(x[t, h, 2 * p], x[t, h, 2 * p + 1]) * cmath.exp(
                    1j * angle32(positions[t], inv32[p])
                )
                y[t, h, 2 * p], y[t, h, 2 * p + 1] = z.real, z.imag
    return y


def neox_rotate_half(x: np.ndarray, positions: np.ndarray, inv32: np.ndarray, rot: int) -> np.ndarray:
    """The HF formulation: y = x * cat(cos, cos) + rotate_half(x) * cat(sin, sin), rotate_half(x) =
    cat(-x2, x1)."""
    xr = x[..., :rot].astype(np.float64)
    half = rot // 2
    theta = np.array([[angle32(p, f) for f in inv32] for p in positions])  # (tokens, half)
    emb = np.concatenate([theta, theta], axis=-1)[:, None, :]
    rotated = np.concatenate([-xr[..., half:], xr[..., :half]], axis=-1)
    y = x.astype(np.float64).copy()
    y[..., :rot] = xr * np.cos(emb) + rotated * np.sin(emb)
    return y


def cache_literal(k, v, k_cache, v_cache, slots):
    """Token by token: slot s -> block s // bs, offset s % bs; negative slots skipped."""
    kc, vc = k_cache.astype(np.float64), v_cache.astype(np.float64)
    bs = k_cache.shape[1]
    for t, s in enumerate(slots):
        if s >= 0:
            kc[s // bs, s % bs] = k[t]
            vc[s // bs, s % bs] = v[t]
    return kc, vc


# ---- references ------------------------------------------------------------------------------------------


def test_default_inv_freq_known_values():
    np.testing.assert_allclose(R.default_inv_freq(10000.0, 4), [1.0, 0.01], rtol=1e-7)
    np.testing.assert_array_equal(R.default_inv_freq(10000.0, 128), inv_freq_literal(10000.0, 128))
    assert R.default_inv_freq(500000.0, 64).dtype == F32


@pytest.mark.parametrize("rot", [8, 6])
def test_ref_gptj_matches_complex_rotation(rng, rot):
    x = rng.standard_normal((5, 3, 8))
    pos = np.array([0, 1, 17, 1000, 70001])
    inv = R.default_inv_freq(10000.0, rot)
    got = rope_ref(x, pos, style="gptj", rotary_dim=rot)
    np.testing.assert_allclose(got, gptj_complex(x, pos, inv, rot), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rot", [8, 4])
def test_ref_neox_matches_rotate_half(rng, rot):
    x = rng.standard_normal((5, 3, 8))
    pos = np.array([3, 0, 2, 99999, 12])
    inv = R.default_inv_freq(500000.0, rot)
    got = rope_ref(x, pos, base=500000.0, style="neox", rotary_dim=rot)
    np.testing.assert_allclose(got, neox_rotate_half(x, pos, inv, rot), rtol=1e-12, atol=1e-12)


def test_ref_known_values():
    # head_dim 4, base 1: inv_freq = [1, 1]; x = e0 at position 1 rotates in the plane of its pair
    x = np.array([[[1.0, 0.0, 0.0, 0.0]]])
    c, s = math.cos(float(np.float32(1.0))), math.sin(1.0)
    np.testing.assert_allclose(
        rope_ref(x, np.array([1]), base=1.0, style="neox")[0, 0], [c, 0, s, 0], atol=1e-15
    )
    np.testing.assert_allclose(
        rope_ref(x, np.array([1]), base=1.0, style="gptj")[0, 0], [c, s, 0, 0], atol=1e-15
    )
    # position 0 is the identity; explicit inv_freq = pi/2 (float32) turns e0 into ~e2 (neox)
    np.testing.assert_array_equal(rope_ref(x, np.array([0])), x)
    y = rope_ref(x, np.array([1]), inv_freq=np.array([math.pi / 2, 0.0], np.float32))
    np.testing.assert_allclose(y[0, 0], [0, 0, 1, 0], atol=1e-7)


def test_ref_float32_angle_close_to_exact_at_small_positions(rng):
    """The float32 angle the references share with the kernel is the exact one up to fp32 rounding."""
    x = rng.standard_normal((64, 2, 16))
    pos = np.arange(64) * 3
    got = rope_ref(x, pos)
    theta = pos[:, None] * (10000.0 ** (-np.arange(8) * 2 / 16.0))[None, :]
    c, s = np.cos(theta)[:, None], np.sin(theta)[:, None]
    exact = np.concatenate([x[..., :8] * c - x[..., 8:] * s, x[..., 8:] * c + x[..., :8] * s], axis=-1)
    np.testing.assert_allclose(got, exact, atol=1e-5)


@pytest.mark.parametrize("style", ["neox", "gptj"])
def test_ref_passthrough_past_rotary_dim(rng, style):
    x = rng.standard_normal((4, 2, 10))
    y = rope_ref(x, np.arange(4) + 5, style=style, rotary_dim=4)
    np.testing.assert_array_equal(y[..., 4:], x[..., 4:])
    assert not np.allclose(y[1:, :, :4], x[1:, :, :4])
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-13)


def test_ref_explicit_inv_freq_equals_default(rng):
    x = rng.standard_normal((3, 2, 12))
    pos = np.array([1, 50, 4000])
    np.testing.assert_array_equal(
        rope_ref(x, pos, rotary_dim=8, inv_freq=inv_freq_literal(10000.0, 8)), rope_ref(x, pos, rotary_dim=8)
    )


def test_kv_write_ref_matches_literal(rng):
    k, v = rng.standard_normal((6, 2, 4)), rng.standard_normal((6, 2, 4))
    kc, vc = rng.standard_normal((3, 4, 2, 4)), rng.standard_normal((3, 4, 2, 4))
    slots = np.array([0, 5, -1, 11, 7, -3])
    got_k, got_v = kv_write_ref(k, v, kc, vc, slots)
    want_k, want_v = cache_literal(k, v, kc, vc, slots)
    np.testing.assert_array_equal(got_k, want_k)
    np.testing.assert_array_equal(got_v, want_v)
    assert not np.shares_memory(got_k, kc)  # the reference leaves its inputs alone


# ---- NumPy path of the ops -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F16, F32, F64])
def test_rope_numpy_path(rng, dtype):
    x = rng.standard_normal((7, 3, 16)).astype(dtype)
    pos = np.arange(7, dtype=np.int32) * 11
    y = rope(x, pos, style="gptj")
    assert y.dtype == dtype and y.shape == x.shape
    np.testing.assert_array_equal(y, rope_ref(x, pos, style="gptj").astype(dtype))
    out = np.full_like(x, np.nan)
    assert rope(x, pos, out=out) is out
    np.testing.assert_array_equal(out, rope_ref(x, pos).astype(dtype))
    x2 = x.copy()
    rope(x2, pos, out=x2)  # in place
    np.testing.assert_array_equal(x2, out)


@pytest.mark.parametrize("slot_dtype", [np.int32, np.int64])
def test_rope_kv_write_numpy_path(rng, slot_dtype):
    tokens, hq, hk, d, nb, bs = 5, 4, 2, 8, 3, 4
    q = rng.standard_normal((tokens, hq, d)).astype(np.float32)
    k = rng.standard_normal((tokens, hk, d)).astype(np.float32)
    v = rng.standard_normal((tokens, hk, d)).astype(np.float32)
    pos = np.array([7, 8, 9, 0, 1], dtype=np.int64)
    slots = np.array([3, 4, -1, 11, 0], dtype=slot_dtype)
    kc, vc = np.full((nb, bs, hk, d), np.nan, np.float32), np.full((nb, bs, hk, d), np.nan, np.float32)
    q_rot, k_rot = rope_kv_write(q, k, v, pos, kc, vc, slots, rotary_dim=4)
    np.testing.assert_array_equal(q_rot, rope_ref(q, pos, rotary_dim=4).astype(np.float32))
    np.testing.assert_array_equal(k_rot, rope_ref(k, pos, rotary_dim=4).astype(np.float32))
    want_k, want_v = cache_literal(k_rot, v, np.full_like(kc, np.nan), np.full_like(vc, np.nan), slots)
    np.testing.assert_array_equal(kc, want_k)  # NaN where untouched, exact values where written
    np.testing.assert_array_equal(vc, want_v)
    # in place outputs
    q2, k2 = q.copy(), k.copy()
    rq, rk = rope_kv_write(q2, k2, v, pos, kc, vc, slots, rotary_dim=4, out_q=q2, out_k=k2)
    assert rq is q2 and rk is k2
    np.testing.assert_array_equal(q2, q_rot)


def test_kv_write_numpy_path(rng):
    k = rng.standard_normal((4, 1, 8)).astype(np.float16)
    v = rng.standard_normal((4, 1, 8)).astype(np.float16)
    kc, vc = np.full((2, 8, 1, 8), np.nan, np.float16), np.full((2, 8, 1, 8), np.nan, np.float16)
    slots = np.array([15, -1, 0, 8], dtype=np.int64)
    assert kv_write(k, v, kc, vc, slots) is None
    want_k, want_v = cache_literal(k, v, np.full_like(kc, np.nan), np.full_like(vc, np.nan), slots)
    np.testing.assert_array_equal(kc, want_k.astype(np.float16))
    np.testing.assert_array_equal(vc, want_v.astype(np.float16))


def test_zero_tokens():
    x = np.zeros((0, 2, 8), np.float32)
    assert rope(x, np.zeros(0, np.int32)).shape == (0, 2, 8)
    kc = np.zeros((1, 4, 2, 8), np.float32)
    kv_write(x, x, kc, kc.copy(), np.zeros(0, np.int32))
    q, k = rope_kv_write(x, x, x, np.zeros(0, np.int32), kc, kc.copy(), np.zeros(0, np.int64))
    assert q.shape == k.shape == (0, 2, 8)


# ---- argument errors -------------------------------------------------------------------------------------


def _kv_args(rng, tokens=3, hq=4, hk=2, d=8, nb=2, bs=4, dtype=np.float32):
    q = rng.standard_normal((tokens, hq, d)).astype(dtype)
    k = rng.standard_normal((tokens, hk, d)).astype(dtype)
    v = rng.standard_normal((tokens, hk, d)).astype(dtype)
    kc = np.zeros((nb, bs, hk, d), dtype)
    return q, k, v, np.arange(tokens), kc, kc.copy(), np.arange(tokens, dtype=np.int32)


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"style": "llama"}, ValueError, "style"),
        ({"rotary_dim": 5}, ValueError, "rotary_dim"),
        ({"rotary_dim": 10}, ValueError, "rotary_dim"),
        ({"rotary_dim": 0}, ValueError, "rotary_dim"),
        ({"rotary_dim": 4.0}, TypeError, "rotary_dim"),
        ({"base": 0.0}, ValueError, "base"),
        ({"base": "x"}, TypeError, "base"),
        ({"base": float("inf")}, ValueError, "base"),
        ({"inv_freq": np.ones(3, np.float32)}, ValueError, "inv_freq"),
        ({"inv_freq": np.ones(4, np.int32)}, TypeError, "inv_freq"),
        ({"out": np.zeros((3, 2, 4), np.float32)}, ValueError, "out"),
        ({"out": np.zeros((3, 2, 8), np.float16)}, TypeError, "out"),
        ({"version": 1}, ValueError, "version"),
    ],
)
def test_rope_argument_errors(rng, kwargs, exc, pattern):
    x = rng.standard_normal((3, 2, 8)).astype(np.float32)
    with pytest.raises(exc, match=pattern):
        rope(x, np.arange(3), **kwargs)


def test_rope_input_errors(rng):
    x = rng.standard_normal((3, 2, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="x must have shape"):
        rope(x[0], np.arange(3))
    with pytest.raises(TypeError, match="x has dtype"):
        rope(x.astype(np.int32), np.arange(3))
    with pytest.raises(ValueError, match="positions must have shape"):
        rope(x, np.arange(4))
    with pytest.raises(TypeError, match="positions must be int32 or int64"):
        rope(x, np.arange(3, dtype=np.float32))
    with pytest.raises(TypeError, match="positions must be int32 or int64"):
        rope(x, np.arange(3, dtype=np.int16))
    with pytest.raises(TypeError, match="x must be an array"):
        rope([[1.0]], np.arange(1))


def test_rope_kv_write_errors(rng):
    q, k, v, pos, kc, vc, slots = _kv_args(rng)
    with pytest.raises(ValueError, match="k has 2 tokens"):
        rope_kv_write(q, k[:2], v, pos, kc, vc, slots)
    with pytest.raises(ValueError, match="k has head_dim 4"):
        rope_kv_write(q, k[..., :4], v, pos, kc, vc, slots)
    with pytest.raises(ValueError, match="v has shape"):
        rope_kv_write(q, k, v[:, :1], pos, kc, vc, slots)
    with pytest.raises(TypeError, match="k has dtype float16"):
        rope_kv_write(q, k.astype(np.float16), v, pos, kc, vc, slots)
    with pytest.raises(TypeError, match="k_cache has dtype"):
        rope_kv_write(q, k, v, pos, kc.astype(np.float16), vc, slots)
    with pytest.raises(ValueError, match="k_cache must have shape"):
        rope_kv_write(q, k, v, pos, kc[..., :1, :], vc, slots)
    with pytest.raises(ValueError, match="k_cache must have shape"):
        rope_kv_write(q, k, v, pos, kc[0], vc, slots)
    with pytest.raises(ValueError, match="v_cache has shape"):
        rope_kv_write(q, k, v, pos, kc, vc[:1], slots)
    with pytest.raises(ValueError, match="slot_mapping must have shape"):
        rope_kv_write(q, k, v, pos, kc, vc, slots[:2])
    with pytest.raises(TypeError, match="slot_mapping must be int32 or int64"):
        rope_kv_write(q, k, v, pos, kc, vc, slots.astype(np.float64))
    with pytest.raises(ValueError, match=r"slot_mapping\[1\] = 8 is out of range"):
        rope_kv_write(q, k, v, pos, kc, vc, np.array([0, 8, -1], np.int32))
    with pytest.raises(ValueError, match="contiguous last dim"):
        rope_kv_write(q, k, v, pos, np.zeros((2, 4, 2, 16), np.float32)[..., ::2], vc, slots)
    ro = kc.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        rope_kv_write(q, k, v, pos, ro, vc, slots)
    with pytest.raises(ValueError, match="out_k has shape"):
        rope_kv_write(q, k, v, pos, kc, vc, slots, out_k=np.zeros_like(q))


def test_kv_write_errors(rng):
    _, k, v, _, kc, vc, slots = _kv_args(rng)
    with pytest.raises(ValueError, match="out of range"):
        kv_write(k, v, kc, vc, np.array([0, 1, 2**40], np.int64))
    with pytest.raises(ValueError, match="k must have shape"):
        kv_write(k[0], v, kc, vc, slots)
    with pytest.raises(ValueError, match="v has 2 tokens"):
        kv_write(k, v[:2], kc, vc, slots)
    with pytest.raises(ValueError, match="version"):
        kv_write(k, v, kc, vc, slots, version=1)
    before = kc.copy()
    with pytest.raises(ValueError):  # a failed check writes nothing
        kv_write(k, v, kc, vc, np.array([0, 1, 99], np.int32))
    np.testing.assert_array_equal(kc, before)


# ---- launch shape rule and instantiations (no GPU needed) --------------------------------------------------


@pytest.mark.parametrize("tokens", [1, 7, 64, 1000, 8192, 100000])
@pytest.mark.parametrize("items", [4, 96, 512, 6144])
def test_launch_shape_fills_the_gpu(tokens, items):
    sms, half = 132, 64
    tok, per_slice, gx, gy = R._launch_shape(tokens, items, half, sms)
    assert tok >= 1 and gx == -(-tokens // tok) and gy == -(-items // per_slice)
    assert gx * tok >= tokens and gy * per_slice >= items  # every (token, item) is covered
    assert tok * half <= R._SMEM_PAIRS
    assert tok == 1 or gx >= R._CTAS_PER_SM * sms  # packing tokens never starves the SMs
    enough_work = tokens * -(-items // R._THREADS)  # CTAs of at least one item per thread
    assert gx * gy >= min(R._CTAS_PER_SM * sms, enough_work)


class _FakeArray:
    def __init__(self, ptr: int) -> None:
        self.data = type("D", (), {"ptr": ptr})()


@pytest.mark.parametrize(
    ("dtype", "head_dim", "rot", "style", "ptr", "strides", "want"),
    [
        (F16, 128, 128, "neox", 0, [384, 128], 8),
        (F16, 80, 80, "neox", 0, [240, 80], 8),  # R/2 = 40 = 5 vectors
        (F16, 64, 32, "gptj", 0, [64, 64], 8),
        (F16, 64, 8, "neox", 0, [64, 64], 4),  # R/2 = 4
        (F16, 64, 64, "neox", 2, [64, 64], 1),  # pointer off by one element
        (F16, 64, 64, "neox", 4, [64, 64], 2),
        (F16, 66, 64, "gptj", 0, [66, 66], 2),
        (F32, 96, 96, "neox", 0, [96, 96], 4),
        (F32, 64, 64, "gptj", 0, [65, 64], 1),  # odd token stride
        (F32, 64, 4, "neox", 0, [64, 64], 2),
    ],
)
def test_vector_width_rule(dtype, head_dim, rot, style, ptr, strides, want):
    got = R._vector_width(dtype, head_dim, rot, style, R._MODE_ROPE_KV, [_FakeArray(4096 + ptr)], strides)
    assert got == want


def test_every_requested_expression_is_registered():
    registered = set(modules.registered_families()["rope"])
    for dtype in (F16, F32):
        for vw in R._widths(dtype):
            for style in R.STYLES:
                for mode in (R._MODE_ROPE, R._MODE_ROPE_KV, R._MODE_KV):
                    for p in R.INDEX_DTYPES:
                        for s in R.INDEX_DTYPES:
                            assert R._expr(dtype, vw, style, mode, p, s) in registered


# ---- GPU -----------------------------------------------------------------------------------------------


def _gpu_case(cp, rng, tokens, hq, hk, d, dtype, nb, bs, packed=False):
    """q, k, v (views of one packed buffer when `packed`), a poisoned cache and shuffled slots with -1s."""
    if packed:
        buf = cp.asarray(rng.standard_normal((tokens, hq + 2 * hk, d)).astype(dtype))
        q, k, v = buf[:, :hq], buf[:, hq : hq + hk], buf[:, hq + hk :]
    else:
        q = cp.asarray(rng.standard_normal((tokens, hq, d)).astype(dtype))
        k = cp.asarray(rng.standard_normal((tokens, hk, d)).astype(dtype))
        v = cp.asarray(rng.standard_normal((tokens, hk, d)).astype(dtype))
    slots = rng.permutation(nb * bs)[:tokens].astype(np.int64)
    slots[:: max(3, tokens // 5)] = -1  # padding tokens
    if tokens == 1:
        slots[0] = nb * bs - 1
    kc = cp.full((nb, bs, hk, d), cp.nan, dtype=dtype)
    return q, k, v, cp.asarray(slots), kc, kc.copy()


def _check_cache(cp, kc, vc, k_rot, v, slots):
    """Written slots hold k_rot / v bit for bit, every other slot is still NaN."""
    want_k, want_v = cache_literal(
        cp.asnumpy(k_rot),
        cp.asnumpy(v),
        np.full(kc.shape, np.nan),
        np.full(vc.shape, np.nan),
        cp.asnumpy(slots),
    )
    np.testing.assert_array_equal(cp.asnumpy(kc).astype(np.float64), want_k)
    np.testing.assert_array_equal(cp.asnumpy(vc).astype(np.float64), want_v)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, F32])
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128])
@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize(("tokens", "block_size"), [(1, 16), (7, 8), (1000, 16), (1000, 128)])
def test_gpu_rope_kv_write(cp, rng, dtype, head_dim, style, tokens, block_size):
    hq, hk = 8, 2
    nb = -(-tokens * 2 // block_size) + 1
    q, k, v, slots, kc, vc = _gpu_case(cp, rng, tokens, hq, hk, head_dim, dtype, nb, block_size)
    pos = cp.asarray(rng.integers(0, 100000, tokens).astype(np.int32))
    out_q, out_k = poison(cp, q.shape, dtype), poison(cp, k.shape, dtype)
    q_rot, k_rot = rope_kv_write(q, k, v, pos, kc, vc, slots, style=style, out_q=out_q, out_k=out_k)
    assert q_rot is out_q and k_rot is out_k and k_rot.dtype == dtype
    assert_close(q_rot, rope_ref(q, pos, style=style), dtype, "q_rot")
    assert_close(k_rot, rope_ref(k, pos, style=style), dtype, "k_rot")
    _check_cache(cp, kc, vc, k_rot, v, slots)


def _grid(cp, tokens, hq, hk, d, dtype, style):
    """The launch shape the rule gives for rope_kv_write at full vector width on this GPU."""
    vw = R.full_vector_width(dtype)
    nv, half = d // vw, d // 2
    rot_items = nv - half // vw if style == "neox" else nv
    items = (hq + hk) * rot_items + hk * nv
    return R._launch_shape(tokens, items, half, R.limits_of(cp.cuda.Device().id).sms)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, F32])
@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize(
    ("tokens", "hq", "hk", "d", "what"),
    [
        (1, 32, 8, 128, "slices"),
        (3, 32, 8, 128, "slices"),
        (5001, 2, 1, 64, "packed"),
        (4099, 1, 1, 80, "packed"),
    ],
)
def test_gpu_launch_shapes(cp, rng, dtype, style, tokens, hq, hk, d, what):
    """Decode-sized batches split each token over several CTAs (grid y > 1); long prefills pack several
    tokens into one CTA (TOK > 1, with a ragged last CTA)."""
    tok, _, _, gy = _grid(cp, tokens, hq, hk, d, dtype, style)
    assert (gy > 1) if what == "slices" else (tok > 1 and tokens % tok)
    bs = 16
    nb = -(-tokens * 2 // bs) + 1
    q, k, v, slots, kc, vc = _gpu_case(cp, rng, tokens, hq, hk, d, dtype, nb, bs)
    pos = cp.asarray(rng.integers(0, 4096, tokens).astype(np.int64))
    q_rot, k_rot = rope_kv_write(q, k, v, pos, kc, vc, slots, style=style)
    assert_close(q_rot, rope_ref(q, pos, style=style), dtype, "q_rot")
    assert_close(k_rot, rope_ref(k, pos, style=style), dtype, "k_rot")
    _check_cache(cp, kc, vc, k_rot, v, slots)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, F32])
@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize(("head_dim", "rot"), [(128, 64), (80, 32), (64, 8), (66, 64), (96, 96)])
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_gpu_rope_partial_rotary_and_inv_freq(cp, rng, dtype, style, head_dim, rot, index_dtype):
    tokens, heads = 37, 3
    x = cp.asarray(rng.standard_normal((tokens, heads, head_dim)).astype(dtype))
    pos = cp.asarray(rng.integers(0, 131072, tokens).astype(index_dtype))
    y = rope(x, pos, style=style, rotary_dim=rot, base=500000.0)
    assert_close(y, rope_ref(x, pos, style=style, rotary_dim=rot, base=500000.0), dtype)
    np.testing.assert_array_equal(cp.asnumpy(y[..., rot:]), cp.asnumpy(x[..., rot:]))  # bit for bit
    inv = (R.default_inv_freq(10000.0, rot) / np.linspace(1, 8, rot // 2)).astype(np.float32)  # scaled
    y = rope(x, pos, style=style, rotary_dim=rot, inv_freq=cp.asarray(inv))
    assert_close(y, rope_ref(x, pos, style=style, rotary_dim=rot, inv_freq=inv), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, F32])
@pytest.mark.parametrize("style", ["neox", "gptj"])
def test_gpu_packed_qkv_in_place(cp, rng, dtype, style):
    """q, k, v views of one (tokens, Hq + 2 Hk, D) buffer, rotated in place (out_q=q, out_k=k)."""
    tokens, hq, hk, d, bs = 1000, 8, 1, 128, 16
    q, k, v, slots, kc, vc = _gpu_case(cp, rng, tokens, hq, hk, d, dtype, 80, bs, packed=True)
    pos = cp.arange(tokens, dtype=cp.int64) * 7
    q0, k0, v0 = q.copy(), k.copy(), v.copy()
    rq, rk = rope_kv_write(q, k, v, pos, kc, vc, slots, style=style, out_q=q, out_k=k)
    assert rq is q and rk is k
    assert_close(q, rope_ref(q0, pos, style=style), dtype, "q in place")
    assert_close(k, rope_ref(k0, pos, style=style), dtype, "k in place")
    np.testing.assert_array_equal(cp.asnumpy(v), cp.asnumpy(v0))  # v untouched
    _check_cache(cp, kc, vc, k, v0, slots)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, F32])
def test_gpu_strided_and_misaligned_inputs(cp, rng, dtype):
    """Packed views (no copy), an odd element offset (scalar path), a poisoned separate out."""
    tokens, heads, d = 7, 4, 64
    buf = cp.asarray(rng.standard_normal((tokens, 3, heads, d + 1)).astype(dtype))
    x = buf[:, 1, :, 1:]  # 2- or 4-byte misaligned start, token stride 3 * heads * 65
    pos = cp.asarray(np.array([0, 1, 2, 3, 100, 65535, 99999], np.int32))
    out = cp.full(x.shape, cp.nan, dtype=dtype)
    y = rope(x, pos, out=out)
    assert y is out
    assert_close(out, rope_ref(x, pos), dtype)
    y2 = rope(x, pos[::1], style="gptj")
    assert_close(y2, rope_ref(x, pos, style="gptj"), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, F32])
@pytest.mark.parametrize(("tokens", "block_size", "head_dim"), [(1, 8, 64), (7, 16, 80), (1000, 128, 128)])
def test_gpu_kv_write(cp, rng, dtype, tokens, block_size, head_dim):
    nb = -(-tokens * 2 // block_size) + 1
    _, k, v, slots, kc, vc = _gpu_case(cp, rng, tokens, 4, 4, head_dim, dtype, nb, block_size, packed=True)
    kv_write(k, v, kc, vc, slots.astype(cp.int32))
    _check_cache(cp, kc, vc, k, v, slots)


@pytest.mark.gpu
def test_gpu_strided_cache_view(cp, rng):
    """A cache that is a view (k and v halves of one (num_blocks, 2, block_size, H, D) buffer)."""
    tokens, hk, d, bs, nb = 33, 2, 64, 16, 5
    both = cp.full((nb, 2, bs, hk, d), cp.nan, dtype=cp.float16)
    kc, vc = both[:, 0], both[:, 1]
    k = cp.asarray(rng.standard_normal((tokens, hk, d)).astype(np.float16))
    v = cp.asarray(rng.standard_normal((tokens, hk, d)).astype(np.float16))
    slots = cp.asarray(rng.permutation(nb * bs)[:tokens].astype(np.int32))
    kv_write(k, v, kc, vc, slots)
    _check_cache(cp, kc, vc, k, v, slots)


@pytest.mark.gpu
def test_gpu_debug_slot_range(cp, rng, monkeypatch):
    _, k, v, slots, kc, vc = _gpu_case(cp, rng, 5, 2, 2, 64, F16, 1, 16)
    bad = cp.asarray(np.array([0, 1, 16, -1, 2], np.int64))
    monkeypatch.setenv("RAWFORMER_DEBUG", "1")
    with pytest.raises(ValueError, match=r"slot_mapping\[2\] = 16 is out of range"):
        kv_write(k, v, kc, vc, bad)


@pytest.mark.gpu
def test_gpu_zero_tokens_and_version(cp):
    x = cp.zeros((0, 2, 64), cp.float16)
    assert rope(x, cp.zeros(0, cp.int32), version=1).shape == (0, 2, 64)
    with pytest.raises(ValueError, match="version"):
        rope(cp.zeros((1, 1, 64), cp.float16), cp.zeros(1, cp.int32), version=2)
