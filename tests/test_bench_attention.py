"""bench/attention.py without a GPU: its float64 references (run on NumPy), the paged-cache gathers, its
acceptance list, and the harness pieces it added (TFLOP/s tables, the per-shape ceiling rule)."""

from __future__ import annotations

import math

import numpy as np
from bench_modules import load

harness = load("harness")
attention = load("attention")


def _explicit(q, k, v, causal, scale):
    """Per (batch, head, query) loops: the formula written out, float64."""
    batch, seq_q, heads, dim = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    out = np.zeros((batch, seq_q, heads, dim))
    for b in range(batch):
        for h in range(heads):
            g = h // (heads // kv_heads)
            for i in range(seq_q):
                s = np.array([scale * q[b, i, h] @ k[b, j, g] for j in range(seq_k)])
                if causal:
                    s[np.arange(seq_k) > i + seq_k - seq_q] = -np.inf
                p = np.exp(s - s.max())
                out[b, i, h] = (p / p.sum()) @ v[b, :, g]
    return out


def test_prefill_reference_rows_match_the_formula():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 5, 4, 8))
    k = rng.standard_normal((2, 9, 2, 8))
    v = rng.standard_normal((2, 9, 2, 8))
    rows = np.array([0, 2, 4])
    for causal in (False, True):
        got = attention.attention_rows_ref(np, q, k, v, rows, causal, 0.3)
        np.testing.assert_allclose(got, _explicit(q, k, v, causal, 0.3)[:, rows], rtol=1e-12, atol=1e-12)


def test_gathers_follow_the_block_table():
    rng = np.random.default_rng(1)
    bs, kv_heads, dim = 4, 2, 3
    cache = rng.standard_normal((6, bs, kv_heads, dim))
    tables = np.array([[5, 0], [2, 3]])
    got = attention.gather_cache(np, cache, tables[0], 7)
    np.testing.assert_array_equal(got, np.concatenate([cache[5], cache[0]])[:7])
    a = {"k_cache": cache, "v_cache": -cache, "tables": tables, "context": 7}
    k, v = attention.contiguous_kv(np, a)
    assert k.shape == (2, 7, kv_heads, dim)
    np.testing.assert_array_equal(k[1], np.concatenate([cache[2], cache[3]])[:7])
    np.testing.assert_array_equal(v, -k)


def test_decode_reference_is_attention_over_the_gathered_cache():
    rng = np.random.default_rng(2)
    bs, kv_heads, heads, dim, ctx = 4, 2, 4, 8, 10
    a = {
        "q": rng.standard_normal((3, 1, heads, dim)),
        "k_cache": rng.standard_normal((9, bs, kv_heads, dim)),
        "v_cache": rng.standard_normal((9, bs, kv_heads, dim)),
        "tables": np.array([[8, 1, 2], [3, 4, 5], [6, 7, 0]]),
        "context": ctx,
        "scale": 0.25,
    }
    got = attention.decode_ref(np, a, [0, 2])
    for n, s in enumerate((0, 2)):
        k = attention.gather_cache(np, a["k_cache"], a["tables"][s], ctx)[None]
        v = attention.gather_cache(np, a["v_cache"], a["tables"][s], ctx)[None]
        want = _explicit(a["q"][s : s + 1], k, v, False, 0.25)[0]
        np.testing.assert_allclose(got[n], want, rtol=1e-12)


def test_rope_reference_rotates_pairs_half_apart():
    rng = np.random.default_rng(3)
    a = {
        "q": rng.standard_normal((3, 2, 8)),
        "k": rng.standard_normal((3, 1, 8)),
        "positions": np.array([0, 1, 5]),
    }
    q_rot, k_rot = attention.rope_ref(np, a, base=100.0)
    np.testing.assert_allclose(q_rot[0], a["q"][0])  # position 0: identity
    # the norm of each (i, i + 4) pair is kept
    for x, r in ((a["q"], q_rot), (a["k"], k_rot)):
        np.testing.assert_allclose(x[..., :4] ** 2 + x[..., 4:] ** 2, r[..., :4] ** 2 + r[..., 4:] ** 2)
    theta = 5 * 100.0 ** (-2 / 8)  # position 5, pair 1
    x1, x2 = a["q"][2, 0, 1], a["q"][2, 0, 5]
    np.testing.assert_allclose(q_rot[2, 0, 1], x1 * math.cos(theta) - x2 * math.sin(theta))


def test_configs_and_acceptance_cover_the_issue():
    shapes = {(b, s, d, c) for b, s, _h, d, c in attention.PREFILL_CONFIGS.values()}
    assert shapes == {(b, s, d, c) for b, s in ((2, 8192), (16, 1024)) for d in (64, 128) for c in (0, 1)}
    decode = {(b, c, h // kv) for b, c, h, kv, _d, _bs in attention.DECODE_CONFIGS.values()}
    assert decode == {(64, 4096, 8), (64, 4096, 1), (8, 32768, 8), (8, 32768, 1)}
    rules = {(c.op, c.kind, c.baseline, c.threshold) for c in attention.ACCEPTANCE}
    assert ("attention", "faster", "torch-flash", 0.6) in rules
    assert ("paged_attention", "ceiling_each", None, 0.70) in rules
    assert ("paged_attention", "faster", "torch", 1.0) in rules


def _rec(impl, ms, config, flops=1e12, nbytes=1e9):
    return harness.make_record(
        op="attention", direction="prefill", impl=impl, config=config, shape=(1, 2), dtype="float16",
        nbytes=int(nbytes), flops=int(flops), ceiling_gbps=3000.0, timing=harness.Timing((ms,)),
        max_error=1e-4,
    )  # fmt: skip


def test_tflops_table_and_per_shape_ceiling_rule():
    recs = [_rec("rawformer", 5.0, "a"), _rec("torch-flash", 4.0, "a")]  # 200 and 250 TFLOP/s
    md = harness.markdown_report(
        "t", {"gpu": "g"}, recs, impls=("rawformer", "torch-flash"), main="rawformer",
        ratios=("torch-flash",), metrics={"attention": "tflops"}, extra_header=["- extra line"],
    )  # fmt: skip
    assert "200 TFLOP/s (5.000 ms)" in md and "250 TFLOP/s" in md and "% compute ceiling" in md
    assert "- extra line" in md and "0.80x" in md
    (v,) = harness.evaluate(
        [harness.Criterion("attention", "prefill", "faster", 0.6, baseline="torch-flash")], recs
    )
    assert v.status == "PASS"
    # 1e9 bytes in 0.5 ms = 2000 GB/s = 66.7% of 3000; in 0.4 ms = 83.3%
    mem = [_rec("rawformer", 0.5, "a"), _rec("rawformer", 0.4, "b")]
    (v,) = harness.evaluate([harness.Criterion("attention", "prefill", "ceiling_each", 0.70)], mem)
    assert v.status == "FAIL" and "worst 66.7% at" in v.text
    (v,) = harness.evaluate([harness.Criterion("attention", "prefill", "ceiling_each", 0.60)], mem)
    assert v.status == "PASS"
