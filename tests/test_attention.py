"""Prefill attention (contract section 1): `attention_ref` and the NumPy path against an independent float64
formula (an explicit score matrix per sequence and per head), causal bottom-right alignment, GQA, varlen,
masks, fully masked rows, the lse layout, and every argument error (CPU); every CUDA version against the
float64 formula at lengths 1 ... 4097, head dims 64/80/96/128, GQA, chunked prefill, ragged batches, masks,
strided views and poisoned outputs (GPU)."""

from __future__ import annotations

import importlib
import math
import zlib

import numpy as np
import pytest
from tolerances import RTOL, assert_close, poison

from rawformer.ops.attention import attention, attention_ref

A = importlib.import_module("rawformer.ops.attention")
F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)
TC_DIMS = (64, 96, 128)  # head dims of the float16 tensor-core kernel (contract section 1)


# ---- the independent formula ---------------------------------------------------------------------------


def naive_sequence(q, k, v, causal, scale, mask=None):
    """One sequence, head by head, with the full score matrix.

    q (Sq, Hq, D), k / v (Sk, Hk, D), mask None or additive (Hq, Sq, Sk) with -inf for "may not attend".
    Returns float64 out (Sq, Hq, D) and lse (Hq, Sq); a row that sees no key: out 0, lse -inf."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    sq, hq, d = q.shape
    sk, hk = k.shape[0], k.shape[1]
    out = np.zeros((sq, hq, d))
    lse = np.full((hq, sq), -np.inf)
    if sq == 0 or sk == 0:
        return out, lse
    i, j = np.arange(sq)[:, None], np.arange(sk)[None, :]
    visible = (j <= i + (sk - sq)) if causal else np.ones((sq, sk), dtype=bool)
    group = hq // hk
    for h in range(hq):
        g = h // group
        s = scale * (q[:, h, :] @ k[:, g, :].T)  # (Sq, Sk) scores
        if mask is not None:
            s = s + mask[h]
        s = np.where(visible, s, -np.inf)
        m = s.max(axis=1)
        seen = m > -np.inf
        p = np.exp(s - np.where(seen, m, 0.0)[:, None])  # exp(-inf) = 0 for hidden keys
        total = p.sum(axis=1)
        out[seen, h, :] = (p[seen] @ v[:, g, :]) / total[seen, None]
        lse[h, seen] = m[seen] + np.log(total[seen])
    return out, lse


def additive(mask, shape4):
    """A bool ("may attend") or float mask broadcast to (B, Hq, Sq, Sk) as float64 additive."""
    m = np.asarray(mask)
    m = np.where(m, 0.0, -np.inf) if m.dtype == bool else m.astype(np.float64)
    return np.broadcast_to(m, shape4)


def naive_padded(q, k, v, causal=False, scale=None, mask=None):
    """q (B, Sq, Hq, D), k / v (B, Sk, Hk, D) -> out (B, Sq, Hq, D), lse (B, Hq, Sq)."""
    b, sq, hq, d = q.shape
    sk = k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    full = None if mask is None else additive(mask, (b, hq, sq, sk))
    outs, lses = zip(
        *(
            naive_sequence(q[i], k[i], v[i], causal, scale, None if full is None else full[i])
            for i in range(b)
        ),
        strict=True,
    )
    return np.stack(outs), np.stack(lses)


def naive_varlen(q, k, v, cu_q, cu_k, causal=False, scale=None):
    """q (Tq, Hq, D), k / v (Tk, Hk, D), offsets cu_q / cu_k -> out (Tq, Hq, D), lse (Hq, Tq)."""
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = np.zeros(q.shape)
    lse = np.full((q.shape[1], q.shape[0]), -np.inf)
    for b in range(len(cu_q) - 1):
        qs, qe, ks, ke = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        o, s = naive_sequence(q[qs:qe], k[ks:ke], v[ks:ke], causal, scale)
        out[qs:qe], lse[:, qs:qe] = o, s
    return out, lse


def padded_inputs(rng, b, sq, sk, hq, hk, d, dtype=F64):
    q = rng.standard_normal((b, sq, hq, d)).astype(dtype)
    k = rng.standard_normal((b, sk, hk, d)).astype(dtype)
    v = rng.standard_normal((b, sk, hk, d)).astype(dtype)
    return q, k, v


def offsets(lengths):
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def check_known(out, lse, want_out, want_lse, rtol=1e-12):
    """float64 comparison; infinities (lse of fully masked rows) must match exactly. lse is float32 by the
    contract (whatever q's dtype), so it is held to float32 rounding."""
    np.testing.assert_allclose(np.asarray(out, np.float64), want_out, rtol=rtol, atol=rtol)
    lse_tol = rtol if np.asarray(lse).dtype == F64 else 2.0**-23
    np.testing.assert_allclose(np.asarray(lse, np.float64), want_lse, rtol=lse_tol, atol=lse_tol)


# ---- references on the CPU -------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("hq", "hk"), [(2, 2), (4, 1), (8, 1), (8, 2)])
@pytest.mark.parametrize(("sq", "sk"), [(7, 7), (5, 9), (1, 6), (6, 1)])
def test_ref_padded_matches_naive(rng, causal, hq, hk, sq, sk):
    q, k, v = padded_inputs(rng, 2, sq, sk, hq, hk, 8)
    want_out, want_lse = naive_padded(q, k, v, causal)
    out = attention_ref(q, k, v, causal=causal)
    np.testing.assert_allclose(out, want_out, rtol=1e-12, atol=1e-12)
    out2, lse = attention_ref(q, k, v, causal=causal, return_lse=True)
    check_known(out2, lse, want_out, want_lse)
    out3, lse3 = attention(q, k, v, causal=causal, return_lse=True)  # the NumPy path of the op
    assert out3.shape == q.shape and lse3.shape == (2, hq, sq)
    check_known(out3, lse3, want_out, want_lse)


def test_causal_bottom_right_alignment(rng):
    """q 5 / k 9: query i sees keys 0 .. i + 4, so the last query sees every key and the first five."""
    q, k, v = padded_inputs(rng, 1, 5, 9, 1, 1, 4)
    out = attention(q, k, v, causal=True)
    for i in range(5):
        want, _ = naive_sequence(q[0, i : i + 1], k[0, : i + 5], v[0, : i + 5], False, 0.5)
        np.testing.assert_allclose(out[0, i], want[0], rtol=1e-12, atol=1e-12)
    # q 4 / k 2: queries 0 and 1 see no key at all (j <= i - 2): out 0, lse -inf
    q, k, v = padded_inputs(rng, 1, 4, 2, 2, 1, 4)
    out, lse = attention(q, k, v, causal=True, return_lse=True)
    np.testing.assert_array_equal(out[0, :2], 0.0)
    np.testing.assert_array_equal(lse[0, :, :2], -np.inf)
    assert np.all(np.isfinite(lse[0, :, 2:]))


def test_known_values():
    d = 4
    q = np.zeros((1, 3, 1, d))
    k = np.ones((1, 6, 1, d))
    v = np.arange(6 * d, dtype=np.float64).reshape(1, 6, 1, d)
    out, lse = attention(q, k, v, return_lse=True)  # equal scores: the plain mean of v, lse = log 6
    np.testing.assert_allclose(out, np.broadcast_to(v.mean(axis=1, keepdims=True), out.shape), rtol=1e-14)
    np.testing.assert_allclose(lse, math.log(6.0), rtol=2.0**-23)  # lse is float32 (contract)
    q1 = np.array([[[[1.0, 2.0, 0.0, 0.0]]]])
    k1 = np.array([[[[3.0, 1.0, 0.0, 0.0]]]])
    out, lse = attention(q1, k1, v[:, :1], scale=0.25, return_lse=True)  # one key: out = v, lse = score
    np.testing.assert_allclose(out, v[:, :1], rtol=1e-15)
    np.testing.assert_allclose(lse, [[[0.25 * 5.0]]], rtol=2.0**-23)


@pytest.mark.parametrize("scale", [0.3, 1.0, 2.5])
def test_scale(rng, scale):
    q, k, v = padded_inputs(rng, 2, 6, 6, 4, 2, 16)
    want_out, want_lse = naive_padded(q, k, v, True, scale)
    check_known(*attention(q, k, v, causal=True, scale=scale, return_lse=True), want_out, want_lse)
    # the default scale is 1/sqrt(head_dim)
    np.testing.assert_allclose(attention(q, k, v), attention(q, k, v, scale=0.25), rtol=1e-14)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("given_max", [False, True])
def test_varlen_matches_naive(rng, causal, given_max):
    """Ragged sequences including a length-1 and a length-0 one; k longer than q (chunked prefill)."""
    lq = [3, 1, 0, 7, 2]
    lk = [3, 4, 0, 9, 2]
    hq, hk, d = 4, 2, 8
    cu_q, cu_k = offsets(lq), offsets(lk)
    q = rng.standard_normal((sum(lq), hq, d))
    k = rng.standard_normal((sum(lk), hk, d))
    v = rng.standard_normal((sum(lk), hk, d))
    want_out, want_lse = naive_varlen(q, k, v, cu_q, cu_k, causal)
    kw = {"max_seqlen_q": max(lq), "max_seqlen_k": max(lk)} if given_max else {}
    out, lse = attention(q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True, **kw)
    assert out.shape == q.shape and lse.shape == (hq, sum(lq))
    check_known(out, lse, want_out, want_lse)
    out_ref, lse_ref = attention_ref(
        q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True
    )
    check_known(out_ref, lse_ref, want_out, want_lse)


def test_varlen_equals_padded_per_sequence(rng):
    lens = [5, 1, 8]
    cu = offsets(lens)
    q = rng.standard_normal((sum(lens), 2, 8))
    k = rng.standard_normal((sum(lens), 1, 8))
    v = rng.standard_normal((sum(lens), 1, 8))
    out = attention(q, k, v, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu)
    for b in range(len(lens)):
        s = slice(cu[b], cu[b + 1])
        one = attention(q[None, s], k[None, s], v[None, s], causal=True)[0]
        np.testing.assert_allclose(out[s], one, rtol=1e-13, atol=1e-13)


def test_varlen_key_only_sequence(rng):
    """A sequence with keys but no queries, and one with queries but no keys (out 0, lse -inf)."""
    cu_q, cu_k = offsets([0, 2, 3]), offsets([4, 0, 3])
    q = rng.standard_normal((5, 2, 4))
    k = rng.standard_normal((7, 2, 4))
    v = rng.standard_normal((7, 2, 4))
    out, lse = attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True)
    np.testing.assert_array_equal(out[:2], 0.0)
    np.testing.assert_array_equal(lse[:, :2], -np.inf)
    want_out, want_lse = naive_varlen(q, k, v, cu_q, cu_k)
    check_known(out, lse, want_out, want_lse)


@pytest.mark.parametrize("causal", [False, True])
def test_float_mask_shapes(rng, causal):
    b, sq, sk, hq, hk = 2, 5, 7, 4, 2
    q, k, v = padded_inputs(rng, b, sq, sk, hq, hk, 8)
    for shape in [(b, 1, 1, sk), (b, hq, sq, sk), (1, hq, 1, sk), (sq, sk), (sk,)]:
        mask = rng.standard_normal(shape) * 2
        want_out, want_lse = naive_padded(q, k, v, causal, None, mask)
        check_known(*attention(q, k, v, causal=causal, mask=mask, return_lse=True), want_out, want_lse)
        check_known(*attention_ref(q, k, v, causal=causal, mask=mask, return_lse=True), want_out, want_lse)


def test_bool_padding_mask_and_fully_masked_row(rng):
    """Key padding (B, 1, 1, Sk), True = may attend; batch 1 masks every key: out 0, lse -inf."""
    b, s, hq, hk = 3, 6, 4, 4
    q, k, v = padded_inputs(rng, b, s, s, hq, hk, 8)
    keep = np.ones((b, 1, 1, s), dtype=bool)
    keep[0, ..., 4:] = False
    keep[1] = False
    out, lse = attention(q, k, v, mask=keep, return_lse=True)
    want_out, want_lse = naive_padded(q, k, v, False, None, keep)
    check_known(out, lse, want_out, want_lse)
    np.testing.assert_array_equal(out[1], 0.0)
    np.testing.assert_array_equal(lse[1], -np.inf)
    # the same as cutting the padded keys off
    np.testing.assert_allclose(out[0], attention(q[:1], k[:1, :4], v[:1, :4])[0], rtol=1e-13, atol=1e-13)
    # bool and the equivalent additive float mask agree
    addm = np.where(keep, 0.0, -np.inf)
    check_known(*attention(q, k, v, mask=addm, return_lse=True), want_out, want_lse)


@pytest.mark.parametrize("dtype", [F16, F32])
def test_numpy_path_dtypes_and_out(rng, dtype):
    q, k, v = padded_inputs(rng, 2, 9, 9, 4, 1, 16, dtype)
    want_out, want_lse = naive_padded(q, k, v, True)
    out = poison(np, q.shape, dtype)
    got, lse = attention(q, k, v, causal=True, out=out, return_lse=True)
    assert got is out and out.dtype == dtype
    assert lse.dtype == F32 and lse.shape == (2, 4, 9)
    assert_close(out, want_out, dtype, scale=np.abs(v).max())
    assert_close(lse, want_lse, F32)
    cu = offsets([4, 5])
    lse_v = attention(
        q.reshape(18, 4, 16),
        k.reshape(18, 1, 16),
        v.reshape(18, 1, 16),
        return_lse=True,
        cu_seqlens_q=cu,
        cu_seqlens_k=cu,
    )[1]
    assert lse_v.dtype == F32 and lse_v.shape == (4, 18)


def test_noncontiguous_numpy_inputs(rng):
    buf = rng.standard_normal((2, 5, 3, 4, 8))
    q, k, v = buf[:, :, 0], buf[:, :, 1], buf[:, :, 2]  # views of one packed qkv buffer
    want_out, _ = naive_padded(q, k, v, True)
    np.testing.assert_allclose(attention(q, k, v, causal=True), want_out, rtol=1e-12, atol=1e-12)


def test_zero_size(rng):
    q = np.zeros((2, 0, 4, 8), np.float32)
    k = np.zeros((2, 3, 2, 8), np.float32)
    out, lse = attention(q, k, k, return_lse=True)
    assert out.shape == (2, 0, 4, 8) and lse.shape == (2, 4, 0)
    out = attention(np.zeros((0, 5, 4, 8)), np.zeros((0, 5, 2, 8)), np.zeros((0, 5, 2, 8)))
    assert out.shape == (0, 5, 4, 8)


# ---- argument errors -------------------------------------------------------------------------------------


def _args(rng, dtype=np.float32):
    q, k, v = padded_inputs(rng, 2, 5, 6, 4, 2, 8, dtype)
    return q, k, v


def test_argument_errors(rng):
    q, k, v = _args(rng)
    with pytest.raises(ValueError, match=r"k has 3 heads.*does not divide.*4"):
        attention(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2))
    with pytest.raises(ValueError, match="head_dim"):
        attention(q, k[..., :4], v[..., :4])
    with pytest.raises(ValueError, match="v"):
        attention(q, k, v[..., :4])  # v's head_dim differs from q's
    with pytest.raises(ValueError, match="v"):
        attention(q, k, v[:, :5])  # v's length differs from k's
    with pytest.raises(ValueError, match="batch"):
        attention(q, k[:1], v[:1])
    with pytest.raises(TypeError, match="dtype"):
        attention(q, k.astype(np.float16), v)
    with pytest.raises(TypeError, match="dtype"):
        attention(q.astype(np.int32), k, v)
    with pytest.raises(ValueError, match="q"):
        attention(q[0], k, v)  # 3-D q without cu_seqlens
    with pytest.raises(ValueError, match="mask"):
        attention(q, k, v, mask=np.zeros((2, 1, 1, 7)))  # does not broadcast to (2, 4, 5, 6)
    with pytest.raises(TypeError, match="causal"):
        attention(q, k, v, causal="yes")
    with pytest.raises((TypeError, ValueError), match="scale"):
        attention(q, k, v, scale="big")


def test_varlen_argument_errors(rng):
    q = rng.standard_normal((7, 4, 8)).astype(np.float32)
    k = rng.standard_normal((9, 2, 8)).astype(np.float32)
    cu_q, cu_k = offsets([3, 4]), offsets([4, 5])
    with pytest.raises(ValueError, match="mask"):
        attention(q, k, k, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, mask=np.zeros((1, 1, 1, 9), np.float32))
    with pytest.raises(TypeError, match="cu_seqlens_q"):
        attention(q, k, k, cu_seqlens_q=cu_q.astype(np.float32), cu_seqlens_k=cu_k)
    with pytest.raises((TypeError, ValueError), match="cu_seqlens_k"):
        attention(q, k, k, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k.astype(np.float32))
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        attention(q, k, k, cu_seqlens_q=cu_q[None, :], cu_seqlens_k=cu_k)
    with pytest.raises(ValueError, match="cu_seqlens"):
        attention(q, k, k, cu_seqlens_q=cu_q)  # one without the other
    with pytest.raises(ValueError, match="cu_seqlens"):
        attention(q, k, k, cu_seqlens_q=offsets([3, 2, 2]), cu_seqlens_k=cu_k)  # batch 3 vs 2
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        attention(q, k, k, cu_seqlens_q=offsets([3, 9]), cu_seqlens_k=cu_k)  # runs past total_q
    with pytest.raises(ValueError, match="q"):
        attention(q[None], k, k, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)  # 4-D q with cu_seqlens
    with pytest.raises(ValueError, match="does not divide"):
        attention(q[:, :3], k, k, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


def test_int64_cu_seqlens_refused_or_exact(rng):
    """The contract says int32 offsets; an int64 array is either refused (TypeError) or gives the same
    result (a lenient launcher converts it)."""
    q = rng.standard_normal((7, 4, 8))
    k = rng.standard_normal((9, 2, 8))
    cu_q, cu_k = offsets([3, 4]), offsets([4, 5])
    want = attention(q, k, k, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    try:
        got = attention(q, k, k, cu_seqlens_q=cu_q.astype(np.int64), cu_seqlens_k=cu_k.astype(np.int64))
    except TypeError as exc:
        assert "cu_seqlens" in str(exc)
    else:
        np.testing.assert_array_equal(got, want)


def test_version_is_cuda_only(rng):
    q, k, v = _args(rng)
    with pytest.raises(ValueError, match="version"):
        attention(q, k, v, version=1)


def test_kernel_plans_are_registered():
    """Every kernel the launcher can pick (version, dtype, head_dim, masked) is a registered instantiation
    (compiled by tests/test_cuda_compile.py) and fits the 227 KB of shared memory one block may take; v4
    (32 query rows per warp) keeps two blocks per SM at every head dim."""
    registered = set(A._instantiations())
    for version in A.VERSIONS:
        for dtype in (F16, F32):
            for d in (*TC_DIMS, 80, 1, 200, 256):
                if not A._can_run(version, dtype, d):
                    continue
                for masked in (False, True):
                    assert A._expr(version, dtype, d, masked) in registered
                    assert A._smem_bytes(version, d, masked) <= 227 * 1024
                    if version == 4:
                        assert A._smem_bytes(version, d, masked) <= 113 * 1024
                        assert A._block_rows(4) == 128 and A._threads(4) == 128
    assert 4 in A.VERSIONS and all(A._can_run(4, F16, d) for d in TC_DIMS)
    assert not A._can_run(4, F32, 64) and not A._can_run(4, F16, 80)


# ---- GPU ---------------------------------------------------------------------------------------------------


def versions_for(dtype, d):
    """Every version the launcher takes for (dtype, head_dim): 1 (general) always, the tensor-core ones
    (2 and up) for float16 at head_dim 64 / 96 / 128."""
    listed = tuple(getattr(A, "VERSIONS", (1, 2)))
    return [ver for ver in listed if ver == 1 or (np.dtype(dtype) == F16 and d in TC_DIMS)]


_REF_CACHE: dict[tuple, tuple] = {}


def cached_case(b, sq, sk, hq, hk, d, dtype, causal):
    """(q, k, v) as NumPy arrays of `dtype` and the float64 (out, lse), computed once per shape."""
    key = (b, sq, sk, hq, hk, d, np.dtype(dtype).str, causal)
    if key not in _REF_CACHE:
        rng = np.random.default_rng(zlib.crc32(repr(key).encode()))  # fixed across runs (no hash())
        q, k, v = padded_inputs(rng, b, sq, sk, hq, hk, d, dtype)
        _REF_CACHE[key] = (q, k, v, *naive_padded(q, k, v, causal))
    return _REF_CACHE[key]


def check_gpu(out, lse, want_out, want_lse, v, dtype, name=""):
    """The issue's bar: error relative to the magnitude of v (the terms out averages) below 2e-3 (fp16) /
    1e-5 (fp32); lse (float32 from fp32 scores) to the fp32 bar; -inf rows exactly."""
    assert out.dtype == dtype
    assert_close(out, want_out, dtype, f"out{name}", scale=float(np.abs(v).max()))
    if lse is not None:
        assert lse.dtype == F32
        assert_close(lse, want_lse, F32, f"lse{name}", rtol=RTOL[F32])


def _length_cases():
    cases = []
    for s in (1, 15, 16, 17, 1000, 4097):
        b, hq, hk = (1, 2, 1) if s > 1000 else (2, 4, 2)
        for d in (64, 96, 128, 80):
            for dtype in (F16, F32):
                for causal in (False, True):
                    for ver in versions_for(dtype, d):
                        cases.append(
                            pytest.param(
                                b,
                                s,
                                hq,
                                hk,
                                d,
                                dtype,
                                causal,
                                ver,
                                id=f"s{s}-d{d}-{dtype}-c{int(causal)}-v{ver}",
                            )
                        )
    return cases


@pytest.mark.gpu
@pytest.mark.parametrize(("b", "s", "hq", "hk", "d", "dtype", "causal", "version"), _length_cases())
def test_gpu_lengths(cp, b, s, hq, hk, d, dtype, causal, version):
    q, k, v, want_out, want_lse = cached_case(b, s, s, hq, hk, d, dtype, causal)
    out = poison(cp, q.shape, dtype)
    got, lse = attention(
        cp.asarray(q), cp.asarray(k), cp.asarray(v), causal=causal, out=out, return_lse=True, version=version
    )
    assert got is out
    check_gpu(out, lse, want_out, want_lse, v, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, F32])
@pytest.mark.parametrize(("hq", "hk"), [(8, 8), (8, 2), (8, 1), (32, 4)])
@pytest.mark.parametrize(("s", "d"), [(77, 128), (300, 64)])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_gqa(cp, dtype, hq, hk, s, d, causal):
    q, k, v, want_out, want_lse = cached_case(1, s, s, hq, hk, d, dtype, causal)
    for ver in versions_for(dtype, d):
        out, lse = attention(
            cp.asarray(q), cp.asarray(k), cp.asarray(v), causal=causal, return_lse=True, version=ver
        )
        check_gpu(out, lse, want_out, want_lse, v, dtype, f" v{ver}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, F32])
@pytest.mark.parametrize("d", [64, 128, 80])
@pytest.mark.parametrize(("sq", "sk"), [(5, 9), (17, 1000), (1000, 1031), (1, 4097), (64, 17)])
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_chunked_prefill(cp, dtype, d, sq, sk, causal):
    """q_len != kv_len; causal is bottom-right aligned (sq > sk leaves the first rows fully masked)."""
    q, k, v, want_out, want_lse = cached_case(2 if sk < 4097 else 1, sq, sk, 4, 1, d, dtype, causal)
    for ver in versions_for(dtype, d):
        out, lse = attention(
            cp.asarray(q), cp.asarray(k), cp.asarray(v), causal=causal, return_lse=True, version=ver
        )
        check_gpu(out, lse, want_out, want_lse, v, dtype, f" v{ver}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, F32])
@pytest.mark.parametrize("d", [64, 96, 128, 80])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("given_max", [False, True])
def test_gpu_varlen(cp, rng, dtype, d, causal, given_max):
    lq = [1, 15, 0, 257, 16, 1000, 17]
    lk = [1, 18, 0, 321, 16, 1017, 17]  # chunked prefill: some sequences have cached keys before q
    hq, hk = 4, 2
    cu_q, cu_k = offsets(lq), offsets(lk)
    q = rng.standard_normal((sum(lq), hq, d)).astype(dtype)
    k = rng.standard_normal((sum(lk), hk, d)).astype(dtype)
    v = rng.standard_normal((sum(lk), hk, d)).astype(dtype)
    want_out, want_lse = naive_varlen(q, k, v, cu_q, cu_k, causal)
    kw = {"max_seqlen_q": max(lq), "max_seqlen_k": max(lk)} if given_max else {}
    for ver in versions_for(dtype, d):
        out = poison(cp, q.shape, dtype)
        got, lse = attention(
            cp.asarray(q),
            cp.asarray(k),
            cp.asarray(v),
            causal=causal,
            return_lse=True,
            out=out,
            cu_seqlens_q=cp.asarray(cu_q),
            cu_seqlens_k=cp.asarray(cu_k),
            version=ver,
            **kw,
        )
        assert got is out and lse.shape == (hq, sum(lq))
        check_gpu(out, lse, want_out, want_lse, v, dtype, f" v{ver}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, F32])
@pytest.mark.parametrize("d", [64, 128, 80])
@pytest.mark.parametrize("kind", ["bool", "float16", "float32"])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_padding_mask(cp, rng, dtype, d, kind, causal):
    """BERT-style key padding (B, 1, 1, Sk); sequence 2 is fully masked (out 0, lse -inf)."""
    b, s, hq, hk = 3, 129, 4, 4
    q, k, v = padded_inputs(rng, b, s, s, hq, hk, d, dtype)
    keep = np.ones((b, 1, 1, s), dtype=bool)
    keep[0, ..., 100:] = False
    keep[1, ..., 1:] = False  # only the first key
    keep[2] = False
    mask = keep if kind == "bool" else np.where(keep, 0.0, -np.inf).astype(kind)
    want_out, want_lse = naive_padded(q, k, v, causal, None, keep)
    for ver in versions_for(dtype, d):
        out, lse = attention(
            cp.asarray(q),
            cp.asarray(k),
            cp.asarray(v),
            causal=causal,
            mask=cp.asarray(mask),
            return_lse=True,
            version=ver,
        )
        check_gpu(out, lse, want_out, want_lse, v, dtype, f" v{ver}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, F32])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_full_float_mask(cp, rng, dtype, d):
    """A general additive mask (B, Hq, Sq, Sk) plus a broadcast (Sq, Sk) one (e.g. ALiBi-like biases)."""
    b, sq, sk, hq, hk = 2, 33, 70, 4, 2
    q, k, v = padded_inputs(rng, b, sq, sk, hq, hk, d, dtype)
    for shape in [(b, hq, sq, sk), (sq, sk)]:
        mask = (rng.standard_normal(shape) * 3).astype(np.float32)
        want_out, want_lse = naive_padded(q, k, v, True, None, mask)
        for ver in versions_for(dtype, d):
            out, lse = attention(
                cp.asarray(q),
                cp.asarray(k),
                cp.asarray(v),
                causal=True,
                mask=cp.asarray(mask),
                return_lse=True,
                version=ver,
            )
            check_gpu(out, lse, want_out, want_lse, v, dtype, f" {shape} v{ver}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, F32])
@pytest.mark.parametrize("d", [64, 96, 80])
def test_gpu_packed_qkv_views(cp, rng, dtype, d):
    """q, k, v as strided views of one packed buffer: padded (B, S, 3, H, D), GQA-packed (B, S, Hq + 2 Hk, D)
    and varlen (T, 3, H, D)."""
    b, s, h = 2, 97, 4
    buf = cp.asarray(rng.standard_normal((b, s, 3, h, d)).astype(dtype))
    q, k, v = buf[:, :, 0], buf[:, :, 1], buf[:, :, 2]
    want_out, want_lse = naive_padded(cp.asnumpy(q), cp.asnumpy(k), cp.asnumpy(v), True)
    vv = cp.asnumpy(v)
    for ver in versions_for(dtype, d):
        out, lse = attention(q, k, v, causal=True, return_lse=True, version=ver)
        check_gpu(out, lse, want_out, want_lse, vv, dtype, f" packed v{ver}")
    hq, hk = 8, 2
    buf = cp.asarray(rng.standard_normal((b, s, hq + 2 * hk, d)).astype(dtype))
    q, k, v = buf[:, :, :hq], buf[:, :, hq : hq + hk], buf[:, :, hq + hk :]
    want_out, want_lse = naive_padded(cp.asnumpy(q), cp.asnumpy(k), cp.asnumpy(v), False)
    for ver in versions_for(dtype, d):
        out = poison(cp, q.shape, dtype)
        attention(q, k, v, return_lse=False, out=out, version=ver)
        check_gpu(out, None, want_out, None, cp.asnumpy(v), dtype, f" gqa-packed v{ver}")
    lens = [60, 1, 133]
    cu = offsets(lens)
    buf = cp.asarray(rng.standard_normal((sum(lens), 3, h, d)).astype(dtype))
    q, k, v = buf[:, 0], buf[:, 1], buf[:, 2]
    want_out, want_lse = naive_varlen(cp.asnumpy(q), cp.asnumpy(k), cp.asnumpy(v), cu, cu, True)
    for ver in versions_for(dtype, d):
        out, lse = attention(
            q,
            k,
            v,
            causal=True,
            cu_seqlens_q=cp.asarray(cu),
            cu_seqlens_k=cp.asarray(cu),
            return_lse=True,
            version=ver,
        )
        check_gpu(out, lse, want_out, want_lse, cp.asnumpy(v), dtype, f" varlen-packed v{ver}")


@pytest.mark.gpu
def test_gpu_scale_and_default_version(cp, rng):
    q, k, v = padded_inputs(rng, 2, 200, 200, 4, 2, 128, F16)
    want_out, want_lse = naive_padded(q, k, v, True, 0.05)
    out, lse = attention(
        cp.asarray(q), cp.asarray(k), cp.asarray(v), causal=True, scale=0.05, return_lse=True
    )
    check_gpu(out, lse, want_out, want_lse, v, F16)


@pytest.mark.gpu
@pytest.mark.parametrize("d", TC_DIMS)
@pytest.mark.parametrize("scale", [-0.2, 0.6])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_scale_signs(cp, d, scale, causal):
    """Every float16 version at a negative scale (v4 then scales each score before the row max instead of
    scaling the raw max) and a large one (the running max keeps moving: O is rescaled on many tiles),
    over several key tiles, GQA packed, with chunked-prefill alignment."""
    b, sq, sk, hq, hk = 1, 301, 517, 4, 2
    key = ("scale-signs", d, scale, causal)
    rng = np.random.default_rng(zlib.crc32(repr(key).encode()))
    q, k, v = padded_inputs(rng, b, sq, sk, hq, hk, d, F16)
    want_out, want_lse = naive_padded(q, k, v, causal, scale)
    for ver in versions_for(F16, d):
        out, lse = attention(
            cp.asarray(q),
            cp.asarray(k),
            cp.asarray(v),
            causal=causal,
            scale=scale,
            return_lse=True,
            version=ver,
        )
        check_gpu(out, lse, want_out, want_lse, v, F16, f" v{ver}")


@pytest.mark.gpu
def test_gpu_version_errors(cp, rng):
    q, k, v = (cp.asarray(a) for a in padded_inputs(rng, 1, 8, 8, 2, 2, 80, F16))
    with pytest.raises(ValueError, match="version"):
        attention(q, k, v, version=2)  # head_dim 80 has no tensor-core kernel
    q32, k32, v32 = (a.astype(cp.float32) for a in (q, k, v))
    with pytest.raises(ValueError, match="version"):
        attention(q32[..., :64], k32[..., :64], v32[..., :64], version=2)  # float32
