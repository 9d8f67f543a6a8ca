"""Weight-only INT8: quantize_int8 / dequantize_int8 / int8_linear and models.quantize.

CPU: the quantization rule against a literal per-channel loop, round-trip error bounds, the int8 -> float
trick the kernels use (every byte value), the float64 reference, argument errors, the instantiation list,
and quantized models against a twin built from the dequantized matrices. GPU: every GEMV version (plain and
DUAL), every token count 1..8 and 9+ (several launches), channel and group-wise, fp16 and fp32, odd K and N,
bias, poisoned outputs, against the float64 NumPy reference of the dequantized math; the dequant kernel
(exact); the GEMM path; a PDL chain (eager and CUDA graph) against plain launches; quantized models on the
GPU."""

from __future__ import annotations

import numpy as np
import pytest
from graph_standin import assert_replays_equal
from rawformer.models import GPT2Config, LlamaConfig, build_model, module_for
from rawformer.models.common import random_weights
from rawformer.models.quantize import TiedEmbedding, parse_mode, quantize_model, quantized_bytes
from tolerances import assert_close

import rawformer as rf
from rawformer.memory import KVArena, KVPool
from rawformer.ops import quant
from rawformer.ops.quant import QuantizedWeight, dequantize_int8, int8_linear_ref, int8_linear_swiglu_ref

F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)


# ---- quantization rule -------------------------------------------------------------------------------------


def literal_quantize(w: np.ndarray, group: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(q (N, K) int, scales float32 (N, groups)) by a loop over channels and groups."""
    k, n = w.shape
    g = k if group is None else group
    ng = -(-k // g)
    q = np.zeros((n, k), dtype=np.int64)
    s = np.zeros((n, ng), dtype=np.float32)
    for c in range(n):
        for j in range(ng):
            part = w[j * g : (j + 1) * g, c].astype(np.float32)
            sc = np.float32(np.float16(np.max(np.abs(part)) / np.float32(127)))
            s[c, j] = sc
            if sc > 0:
                q[c, j * g : (j + 1) * g] = np.clip(np.rint(part / sc), -127, 127)
    return q, s


@pytest.mark.parametrize("group", [None, 128])
@pytest.mark.parametrize("shape", [(1, 1), (37, 11), (128, 3), (300, 5), (16, 7)])
def test_quantize_matches_literal_rule(rng, group, shape):
    w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    w[0, 0] = 0.3  # an outlier in one channel / group
    qw = rf.quantize_int8(w, group_size=group)
    k, n = shape
    assert qw.shape == (k, n) and qw.q.shape == (n, quant.padded_k(k)) and qw.q.dtype == np.int8
    q, s = literal_quantize(w, group)
    np.testing.assert_array_equal(qw.q[:, :k], q)
    np.testing.assert_array_equal(qw.q[:, k:], 0)  # the padding is zero
    got_s = qw.scales.astype(np.float32).reshape(n, -1)
    np.testing.assert_array_equal(got_s, s)


@pytest.mark.parametrize("group", [None, 128])
def test_round_trip_error_at_most_half_a_step(rng, group):
    w = rng.standard_normal((333, 19)).astype(np.float64) * np.linspace(0.01, 2, 19)  # channel scales differ
    qw = rf.quantize_int8(w, group_size=group)
    back = dequantize_int8(qw)
    assert back.shape == w.shape and back.dtype == F64
    step = np.repeat(qw.scales.astype(np.float64).reshape(19, -1), group or 333, axis=1)[:, :333].T
    # half a step of rounding, plus the fp16 rounding of the scale (|q| <= 127, relative 2**-11)
    assert np.all(np.abs(back - w) <= 0.5 * step + 127 * step * 2.0**-11)
    assert np.max(np.abs(qw.q)) == 127  # the largest weight of a channel maps to +-127


def test_zero_channels_and_transposed_input(rng):
    w = rng.standard_normal((40, 6)).astype(np.float32)
    w[:, 2] = 0
    qw = rf.quantize_int8(w)
    assert qw.scales[2] == 0 and not qw.q[2].any()
    np.testing.assert_array_equal(dequantize_int8(qw)[:, 2], 0)
    table = rng.standard_normal((9, 40)).astype(np.float32)  # an (V, H) embedding used as x @ table.T
    np.testing.assert_array_equal(
        rf.quantize_int8(table.T).q, rf.quantize_int8(np.ascontiguousarray(table.T)).q
    )


def test_quantize_errors(rng):
    w = rng.standard_normal((8, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="2-D"):
        rf.quantize_int8(w[0])
    with pytest.raises(TypeError, match="float"):
        rf.quantize_int8(w.astype(np.int32))
    with pytest.raises(ValueError, match="group_size"):
        rf.quantize_int8(w, group_size=100)
    with pytest.raises(TypeError, match="group_size"):
        rf.quantize_int8(w, group_size=128.0)
    bad = w.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        rf.quantize_int8(bad)
    with pytest.raises(ValueError, match="float16"):
        rf.quantize_int8(np.full((4, 2), 1e9))
    with pytest.raises(ValueError, match="K = 0"):
        rf.quantize_int8(np.zeros((0, 3), np.float32))
    qw = rf.quantize_int8(w)
    with pytest.raises(ValueError, match="columns"):
        QuantizedWeight(qw.q[:, :8].copy(), qw.scales, 8)
    with pytest.raises(ValueError, match="scales"):
        QuantizedWeight(qw.q, qw.scales[:2].copy(), 8)
    with pytest.raises(TypeError, match="int8"):
        QuantizedWeight(qw.q.astype(np.int16), qw.scales, 8)


def test_byte_to_float_trick_is_exact():
    """The kernels' conversion: PRMT the biased byte into 2^23's mantissa, subtract 2^23 + 128."""
    b = np.arange(-128, 128, dtype=np.int64)
    biased = (b & 0xFF) ^ 0x80
    bits = (0x4B000000 | biased).astype(np.uint32)
    f = bits.view(np.float32) - np.float32(8388736.0)
    np.testing.assert_array_equal(f, b.astype(np.float32))


# ---- the reference and the op on NumPy ---------------------------------------------------------------------


@pytest.mark.parametrize("group", [None, 128])
def test_reference_matches_literal_dot_products(rng, group):
    w = rng.standard_normal((150, 7))
    qw = rf.quantize_int8(w, group_size=group)
    q, s = literal_quantize(w, group)
    x = rng.standard_normal((2, 3, 150))
    b = rng.standard_normal(7)
    want = np.empty((2, 3, 7))
    g = group or 150
    for i in np.ndindex(2, 3):
        for n in range(7):
            want[i][n] = b[n] + sum(x[i][kk] * q[n, kk] * float(s[n, kk // g]) for kk in range(150))
    np.testing.assert_allclose(int8_linear_ref(x, qw, b), want, rtol=1e-12, atol=1e-12)
    got = rf.int8_linear(x.astype(np.float32), qw, b.astype(np.float32))
    assert got.dtype == F32 and got.shape == (2, 3, 7)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_swiglu_reference_and_numpy_op(rng):
    wg, wu = rng.standard_normal((40, 9)), rng.standard_normal((40, 9))
    qg, qu = rf.quantize_int8(wg), rf.quantize_int8(wu)
    x, bg, bu = rng.standard_normal((3, 40)), rng.standard_normal(9), rng.standard_normal(9)
    g = x @ dequantize_int8(qg) + bg
    u = x @ dequantize_int8(qu) + bu
    want = g * (1 / (1 + np.exp(-g))) * u  # silu(g) * u
    np.testing.assert_allclose(int8_linear_swiglu_ref(x, qg, qu, bg, bu), want, rtol=1e-12)
    got = rf.int8_linear_swiglu(x.astype(np.float32), qg, qu, bg.astype(np.float32), bu.astype(np.float32))
    assert got.dtype == F32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="shape and grouping"):
        rf.int8_linear_swiglu(x, qg, rf.quantize_int8(wu, group_size=128))
    with pytest.raises(ValueError, match="w_up's K"):
        rf.int8_linear_swiglu(x, qg, rf.quantize_int8(wu[:32]))
    with pytest.raises(ValueError, match="b_up"):
        rf.int8_linear_swiglu(x, qg, qu, bg, bu[:4])


def test_int8_linear_errors(rng):
    qw = rf.quantize_int8(rng.standard_normal((24, 5)).astype(np.float32))
    x = rng.standard_normal((3, 24)).astype(np.float32)
    with pytest.raises(ValueError, match="K = 24"):
        rf.int8_linear(x[:, :20], qw)
    with pytest.raises(TypeError, match="QuantizedWeight"):
        rf.int8_linear(x, np.zeros((24, 5), np.float32))
    with pytest.raises(ValueError, match="bias"):
        rf.int8_linear(x, qw, np.zeros(4, np.float32))
    with pytest.raises(TypeError, match="bias"):
        rf.int8_linear(x, qw, np.zeros(5, np.float64))
    with pytest.raises(ValueError, match="path"):
        rf.int8_linear(x, qw, path="tiled")
    with pytest.raises(ValueError, match="CPU"):
        rf.int8_linear(x, qw, path="gemv")
    with pytest.raises(TypeError, match="dtype"):
        rf.int8_linear(x.astype(np.int32), qw)


def test_instantiations_cover_every_launch():
    exprs = set(quant._instantiations())
    for dtype in (F16, F32):
        for group in (None, *quant.GROUP_SIZES):
            assert quant.dequant_expression(dtype, group) in exprs
            for tokens in range(1, quant.GEMV_MAX_TOKENS + 1):
                for version in quant.GEMV_VERSIONS:
                    for dual in (False, True):
                        assert quant.gemv_expression(dtype, tokens, group, version, dual) in exprs
    # M is compiled for 1, 2, 4, 8 only: 2 dtypes x 2 groupings x (4 x 3 versions x (plain, DUAL) + dequant
    # + the norm twins at M = 1: 3 versions x (plain, DUAL))
    assert len(exprs) == len(quant._instantiations()) == 2 * 2 * (4 * 3 * 2 + 1 + 3 * 2)
    assert "int8_gemv" in rf.kernels.modules.registered_families()


def test_gemv_tokens_and_default_version():
    assert [quant.gemv_tokens(m) for m in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    assert "int8_gemv<__half, 4, 128, 1, 8, 8, true>" == quant.gemv_expression(F16, 3, 128, 3, True)
    # v3 (a row of K <= 4096 in flight per warp) but for large matrices, where v1 measured best
    assert quant.default_gemv_version(4096, 4096) == 3
    # v2 for the DUAL gate/up pair and for wide K <= 4096 matrices (the lm head): faster in the decode graph
    assert quant.default_gemv_version(2048, 32000) == 2
    assert quant.default_gemv_version(2048, 5632, dual=True) == 2
    assert quant.default_gemv_version(2048, 5632) == 3
    assert quant.default_gemv_version(8192, 28672, dual=True) == 1
    assert quant.default_gemv_version(11008, 4096) == 3
    assert quant.default_gemv_version(8192, 28672) == 1
    assert quant.default_gemv_version(28672, 8192) == 1


# ---- models ------------------------------------------------------------------------------------------------

LLAMA_TINY = LlamaConfig(
    vocab_size=89, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, rope_theta=500.0,
)  # fmt: skip
LLAMA_TIED = LlamaConfig(
    vocab_size=61, hidden_size=32, intermediate_size=144, num_hidden_layers=1, num_attention_heads=2,
    num_key_value_heads=1, tie_word_embeddings=True, mlp_bias=True,
)  # fmt: skip
GPT2_TINY = GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4)


def dequantized_twin(qmodel, model):
    """`model` (qmodel's weights before quantizing) with every matrix replaced by the dequantized one."""
    kind = type(qmodel).__name__
    names = {
        "LlamaModel": ("w_qkv", "w_o", "w_gate", "w_up", "w_down"),
        "GPT2Model": ("c_attn", "attn_proj", "c_fc", "mlp_proj"),
    }[kind]
    dt = model.dtype
    for qb, b in zip(qmodel.blocks, model.blocks, strict=True):
        for name in names:
            qv = getattr(qb, name)
            if isinstance(qv, tuple):
                setattr(b, name, (dequantize_int8(qv[0], dt), *qv[1:]))
            else:
                setattr(b, name, dequantize_int8(qv, dt))
    if kind == "LlamaModel":
        model.lm_head = dequantize_int8(qmodel.lm_head.T, dt).T
    else:
        model.wte = TiedEmbedding(model.wte, dequantize_int8(qmodel.wte.T, dt))
    return model


def run_model(model, xp, prompts, steps=3):
    """Logits of a prefill of `prompts` then `steps` greedy decode steps (all sequences), stacked per step."""
    arena = KVArena(
        model.num_layers, model.num_kv_heads, model.head_dim, model.dtype, 8, num_blocks=32, xp=xp
    )
    pool = KVPool(arena, prefix_caching=False)
    ids = list(range(len(prompts)))
    for i, p in zip(ids, prompts, strict=True):
        pool.add_sequence(i, p)
    out = []
    logits = model.forward(pool.prepare(ids), arena, last_only=True)
    for _ in range(steps):
        host = np.asarray(logits.get() if hasattr(logits, "get") else logits, dtype=np.float64)
        out.append(host)
        nxt = host.argmax(axis=1)
        logits = model.forward(pool.prepare(ids, [[int(t)] for t in nxt]), arena)
    return out


def build_pair(cfg, dtype, xp, mode, lm_head=True):
    shapes = module_for(cfg).weight_shapes(cfg)
    w = random_weights(shapes, 5, dtype, xp, 0.3)
    qmodel = quantize_model(build_model(cfg, w, xp), mode, lm_head=lm_head)
    return qmodel, build_model(cfg, w, xp)


@pytest.mark.parametrize("mode", ["int8", "int8-g128"])
@pytest.mark.parametrize("cfg", [LLAMA_TINY, LLAMA_TIED, GPT2_TINY], ids=["llama", "llama-tied", "gpt2"])
def test_quantized_model_equals_dequantized_twin(cfg, mode):
    qmodel, model = build_pair(cfg, np.float64, np, mode)
    twin = dequantized_twin(qmodel, model)
    prompts = [[1, 5, 9, 2, 7], [3, 3, 8]]
    for a, b in zip(run_model(qmodel, np, prompts), run_model(twin, np, prompts), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)


def test_quantize_model_bookkeeping():
    qmodel, model = build_pair(LLAMA_TINY, np.float32, np, "int8")
    assert qmodel.quantization == "int8"
    assert isinstance(qmodel.blocks[0].w_qkv, QuantizedWeight) and isinstance(
        qmodel.lm_head.T, QuantizedWeight
    )
    assert qmodel.embed is model.embed or np.array_equal(qmodel.embed, model.embed)  # the table stays float
    q_bytes, f16_bytes = quantized_bytes(qmodel)
    assert f16_bytes / 2 <= q_bytes <= f16_bytes / 2 * 1.2
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(qmodel, "int8")
    head_kept = quantize_model(build_pair(LLAMA_TINY, np.float32, np, "int8")[1], "int8", lm_head=False)
    assert not isinstance(head_kept.lm_head.T, QuantizedWeight)
    with pytest.raises(ValueError, match="int8-g128"):
        parse_mode("int4")
    with pytest.raises(TypeError, match="no quantization plan"):
        quantize_model(object(), "int8")


def test_quantized_logits_close_to_float():
    """int8 weights change logits by a small fraction (random weights, std 0.3)."""
    qmodel, model = build_pair(LLAMA_TINY, np.float64, np, "int8-g128")
    prompts = [[1, 5, 9, 2, 7]]
    a, b = run_model(qmodel, np, prompts, steps=1)[0], run_model(model, np, prompts, steps=1)[0]
    assert np.max(np.abs(a - b)) / np.max(np.abs(b)) < 0.05


# ---- GPU: kernels against the float64 reference ------------------------------------------------------------

# (K, N): odd sizes, K < 16 * 32 (lanes without a chunk), v2's two 2048-wide steps with a partial third
# (4200), v3's 4096-wide step exactly (4096) and with a partial second step (5000)
SHAPES = [
    (16, 1),
    (48, 33),
    (1000, 97),
    (4096, 256),
    (11, 5),
    (333, 130),
    (1040, 129),
    (4200, 19),
    (5000, 67),
]


def gpu_case(cp, rng, k, n, group, dtype, bias=True):
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.05
    qw = rf.quantize_int8(cp.asarray(w), group_size=group)
    b = cp.asarray(rng.standard_normal(n).astype(dtype)) if bias else None
    return qw, b


def check_linear(cp, rng, qw, b, m, dtype, **kw):
    k, n = qw.shape
    x = cp.asarray(rng.standard_normal((m, k)).astype(dtype))
    y = rf.int8_linear(x, qw, b, **kw)
    assert y.dtype == dtype and y.shape == (m, n)
    ref = int8_linear_ref(x, qw, b)
    # fp16: the output's own rounding dominates (default floor, relative to max|ref|); fp32: the fp32
    # accumulation order over K terms, so the floor is relative to the largest sum of |terms|
    scale = None
    if dtype == F32:
        w = np.abs(cp.asnumpy(dequantize_int8(qw, np.float64)))
        scale = float((np.abs(cp.asnumpy(x).astype(np.float64)) @ w).max())
    assert_close(y, ref, dtype, scale=scale)
    return y


@pytest.mark.gpu
@pytest.mark.parametrize("version", quant.GEMV_VERSIONS)
@pytest.mark.parametrize("group", [None, 128])
@pytest.mark.parametrize("dtype", [F16, F32])
def test_gpu_gemv_every_token_count(cp, rng, version, group, dtype):
    for k, n in SHAPES:
        qw, b = gpu_case(cp, rng, k, n, group, dtype, bias=(k + n) % 2 == 0)
        for m in (1, 2, 3, 4, 5, 6, 7, 8, 9, 17):
            check_linear(cp, rng, qw, b, m, dtype, path="gemv", version=version)


@pytest.mark.gpu
@pytest.mark.parametrize("version", [None, *quant.GEMV_VERSIONS])
@pytest.mark.parametrize("group", [None, 128])
@pytest.mark.parametrize("dtype", [F16, F32])
def test_gpu_fused_swiglu(cp, rng, version, group, dtype):
    """The DUAL kernel of every version (every token count, odd shapes) and, above 16 rows, the GEMM path
    against the float64 reference."""
    for k, n in SHAPES:
        qg, bg = gpu_case(cp, rng, k, n, group, dtype)
        qu, bu = gpu_case(cp, rng, k, n, group, dtype, bias=n % 2 == 0)
        for m in (1, 2, 3, 4, 5, 6, 7, 8, 11) if version else (1, 3, 8, 40):
            x = cp.asarray(rng.standard_normal((m, k)).astype(dtype))
            y = rf.int8_linear_swiglu(x, qg, qu, bg, bu, version=version)
            assert y.dtype == dtype and y.shape == (m, n)
            ref = int8_linear_swiglu_ref(x, qg, qu, bg, bu)
            # the GEMM path rounds the two projections to x's dtype before rf.swiglu: twice the fp16 error
            assert_close(
                y,
                ref,
                dtype,
                rtol=None if m <= 8 or dtype == F32 else 4e-3,
                scale=None if dtype == F16 else float(np.abs(ref).max()) * 10,
            )


@pytest.mark.gpu
@pytest.mark.parametrize("group", [None, 128])
@pytest.mark.parametrize("dtype", [F16, F32])
def test_gpu_gemm_path(cp, rng, group, dtype):
    for k, n in SHAPES:
        qw, b = gpu_case(cp, rng, k, n, group, dtype)
        for m in (1, 9, 64, 130):
            check_linear(cp, rng, qw, b, m, dtype, path="gemm")


@pytest.mark.gpu
@pytest.mark.parametrize("group", [None, 128])
@pytest.mark.parametrize("dtype", [F16, F32])
def test_gpu_dequant_kernel_exact(cp, rng, group, dtype):
    for k, n in SHAPES:
        qw, _ = gpu_case(cp, rng, k, n, group, dtype, bias=False)
        got = dequantize_int8(qw, dtype)
        want = dequantize_int8(qw, np.float64).astype(dtype)  # q * s in float64, rounded once
        assert got.shape == (k, n)
        np.testing.assert_array_equal(cp.asnumpy(got), cp.asnumpy(want))


@pytest.mark.gpu
def test_gpu_poisoned_output_and_odd_layouts(cp, rng):
    """The output is fully written (a NaN-filled pool block reused), x as a strided view and 3-D."""
    qw, b = gpu_case(cp, rng, 300, 77, 128, F16)
    for _ in range(3):  # NaN blocks of the output's size in the pool, handed back to the next empty()
        cp.full((8, 77), np.nan, dtype=F16)
    x = cp.asarray(rng.standard_normal((2, 3, 600)).astype(F16))[:, :, ::2]  # non-contiguous (2, 3, 300)
    y = rf.int8_linear(x, qw, b)
    assert y.shape == (2, 3, 77) and not bool(cp.isnan(y).any())
    assert_close(y, int8_linear_ref(x, qw, b), F16)
    z = rf.int8_linear(cp.zeros((0, 300), F16), qw)
    assert z.shape == (0, 77)


@pytest.mark.gpu
def test_gpu_pdl_chain_matches_plain_launches(cp, rng, monkeypatch):
    """Chained INT8 GEMVs of every version and the DUAL kernel, each reading what the kernel before it just
    wrote, replayed from a CUDA graph (where launches use PDL: a pdl_wait placed too late would read a stale
    or NaN x) over NaN-filled outputs, equal the same chain launched plainly (RAWFORMER_PDL=0) bit for bit;
    eager calls (plain launches) too; the dequant kernel (GEMM path) is in the chain."""

    k, i = 2048, 1376

    def qweight(kk, nn, group):
        return rf.quantize_int8(cp.asarray(rng.standard_normal((kk, nn)) / np.sqrt(kk)), group_size=group)

    square = [qweight(k, k, g) for g in (None, 128)]
    gate, up, down = qweight(k, i, None), qweight(k, i, None), qweight(i, k, 128)
    x = cp.asarray(rng.standard_normal((1, k)).astype(F16))
    x17 = cp.asarray(rng.standard_normal((17, k)).astype(F16))

    def chain():
        h = x
        for v in quant.GEMV_VERSIONS:
            for qw in square:
                h = rf.int8_linear(h, qw, version=v)
            g = rf.int8_linear_swiglu(h, gate, up, version=v)
            h = rf.int8_linear(g, down, version=v)
        return h, rf.int8_linear(x17 + h, square[0], path="gemm")

    monkeypatch.setenv("RAWFORMER_PDL", "0")
    want = [cp.asnumpy(t) for t in chain()]
    assert all(np.isfinite(w).all() and np.abs(w).max() > 0 for w in want)
    monkeypatch.setenv("RAWFORMER_PDL", "1")
    for _ in range(3):
        nan_blocks = [cp.full((1, s), np.nan, dtype=F16) for s in (k, i) for _ in range(4)]
        del nan_blocks  # NaN pool blocks of the chain's sizes, handed back to its empty() calls
        got = [cp.asnumpy(t) for t in chain()]
        for g, w in zip(got, want, strict=True):
            assert np.array_equal(g, w)
    assert_replays_equal(cp, chain, want)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["int8", "int8-g128"])
@pytest.mark.parametrize("cfg", [LLAMA_TINY, GPT2_TINY], ids=["llama", "gpt2"])
def test_gpu_quantized_model_equals_twin(cp, cfg, mode):
    qmodel, model = build_pair(cfg, np.float32, cp, mode)
    twin = dequantized_twin(qmodel, model)
    prompts = [[1, 5, 9, 2, 7], [3, 3, 8], [4] * 11]
    for a, b in zip(run_model(qmodel, cp, prompts), run_model(twin, cp, prompts), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())


# ---- the benchmark scripts' host-side pieces -------------------------------------------------------------


def test_bench_quant_verdicts_and_report(tmp_path):
    from bench_modules import load

    harness = load("harness")
    bq = load("quant")

    def rec(impl, ms, nbytes):
        t = harness.Timing((ms,) * 20)
        return harness.make_record(
            op=bq.OP, direction="b1", impl=impl, config="4096x4096", shape=(4096, 4096), dtype="float16",
            nbytes=nbytes, flops=1, ceiling_gbps=3000.0, timing=t, max_error=1e-4,
        )  # fmt: skip

    records = [rec("rawformer", 0.0069, 16_793_600), rec("cublas_fp16", 0.0125, 33_570_816)]
    verdicts = harness.evaluate(bq.ACCEPTANCE, records)
    assert [v.status for v in verdicts] == ["PASS", "PASS"]  # 81% of the ceiling, 1.81x cuBLAS
    runs = {
        "fp16": {"decode_only_tok_s": 1000.0, "tok_s": 900.0},
        "int8": {"decode_only_tok_s": 1400.0, "tok_s": 1300.0},
        "int8-g128": {"mode": "int8-g128", "status": "error", "message": "x"},
    }
    e2e = {"runs": runs}
    ev = bq.e2e_verdicts(e2e)
    assert [v.status for v in ev] == ["FAIL", "FAIL"] and "1.40x" in ev[0].text
    assert bq.e2e_verdicts(None)[0].status == "SKIP"
    for r in (runs["fp16"], runs["int8"]):
        r.update(weight_bytes=1e9, roofline_tok_s=3000.0, greedy_agree_steps=8,
                 first_tokens=[[1] * 8])  # fmt: skip
    runs["fp16"].update(step_ms=1.0, gemv_ms=0.7, rest_ms=0.3, gemv_gbps=1429.0, roofline_ms=0.667)
    runs["int8"].update(step_ms=0.714, gemv_ms=0.4, rest_ms=0.314, gemv_gbps=2500.0, roofline_ms=0.333)
    gap = bq.gap_lines(e2e)
    assert gap[0] == "- fp16 step 1.000 ms = projections 0.700 ms + rest 0.300 ms (30% of the step)"
    # 1.5x needs a 0.667 ms step; with the int8 rest of 0.314 ms the projections get 0.353 ms = 2,836 GB/s
    assert "needs a 0.667 ms step" in gap[1] and "projections of 0.353 ms (2,836 GB/s" in gap[1]
    runs["int8"]["rest_ms"] = 0.7
    assert "impossible" in bq.gap_lines(e2e)[1]
    runs["int8"]["rest_ms"] = 0.314
    bq.write_results({"gpu": "test"}, records, e2e, verdicts + ev, tmp_path)
    md = (tmp_path / "quant.md").read_text()
    assert "cublas_fp16 / INT8 = 1.81x" in md and "## ACCEPTANCE" in md and "| int8 |" in md
    assert "| 0.714 | 0.400 (2,500) | 0.314 |" in md and gap[1] in md


def test_bench_accuracy_metrics():
    from bench_modules import load

    load("harness"), load("e2e")  # the modules accuracy.py imports by name
    acc = load("accuracy")
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((2, 5, 7))
    seqs = rng.integers(0, 7, (2, 5))
    same = acc.compare(ref, ref, seqs)
    assert same["mean_kl"] == 0 and same["top1_agreement"] == 1 and same["logits_rel_error"] == 0
    lp = acc.log_softmax64(ref)
    nll = -np.mean([lp[s, t, seqs[s, t + 1]] for s in range(2) for t in range(4)])
    assert np.isclose(same["ppl"], np.exp(nll))
    worse = acc.compare(ref, ref + rng.standard_normal(ref.shape), seqs)
    assert worse["mean_kl"] > 0 and worse["logits_rel_error"] > 0
    variants = {
        "fp16": {"ppl_vs_base": 0.0, "base": "fp16", "ppl": 10.0},
        "int8": {"ppl_vs_base": 0.02, "base": "fp16", "ppl": 10.2},
        "int8-g128": {"ppl_vs_base": 0.005, "base": "fp16", "ppl": 10.05},
        "fp16 decode": {"ppl_vs_base": 0.0, "base": "fp16 decode", "ppl": 10.0},
        "fp16 kv8": {"ppl_vs_base": 0.004, "base": "fp16 decode", "ppl": 10.04},
        "int8 kv8": {"ppl_vs_base": 0.03, "base": "fp16 decode", "ppl": 10.3},  # informative: no verdict
    }
    verdicts = acc.verdicts([{"config": "checkpoint:x", "variants": variants}], trained=True)
    assert [v.status for v in verdicts] == ["FAIL", "PASS", "PASS"]
    assert "fp16 kv8 perplexity <= +1% of fp16 decode" in verdicts[2].text


def test_fake_quantized_kv_is_what_the_int8_cache_holds(rng):
    from rawformer.ops.kv_int8 import alloc_int8_cache, dequantize_kv, fake_quantize_kv, kv_write_int8

    k = rng.standard_normal((6, 2, 64)).astype(np.float32)
    kc, ks = alloc_int8_cache(1, 8, 2, 64)
    vc, vs = alloc_int8_cache(1, 8, 2, 64)
    kv_write_int8(k, k, np.arange(6), kc, vc, ks, vs)
    np.testing.assert_array_equal(fake_quantize_kv(k), dequantize_kv(kc, ks, np.float32)[0, :6])
