"""rawformer.autograd: every op's backward against central finite differences in float64 on the CPU, the
engine (accumulation, shared inputs, grad-ready hooks, no_grad, freed graphs), and on the GPU every op's
gradients against the float64 NumPy path (relative error < 1e-5 in float32, < 5e-3 in float16).

Finite differences: for an op y = f(x1, x2, ...) and a fixed random R of y's shape, the scalar s = <y, R>
has ds/dxi = backward(R) at xi; each element of each input is nudged by +-h (h = 1e-6) and the central
difference compared with the analytical gradient (max error relative to the gradient's largest entry).
"""

from __future__ import annotations

import numpy as np
import pytest

from rawformer import autograd as ag
from rawformer import backend
from rawformer.autograd import Tensor

H = 1e-6
FD_TOL = 1e-6  # float64 central differences: truncation ~h^2, cancellation ~1e-16 / h


def leaf(rng, *shape, scale=1.0):
    return Tensor(rng.standard_normal(shape) * scale, requires_grad=True)


def fd_check(fn, inputs, rng, tol=FD_TOL, h=H):
    """fn(*inputs) -> Tensor; compare backward(R) with central differences of <fn(...), R> (step h)."""
    out = fn(*inputs)
    r = rng.standard_normal(out.shape)
    for t in inputs:
        t.grad = None
    out.backward(r if out.ndim else float(r))
    for k, t in enumerate(inputs):
        num = np.zeros(t.shape)
        flat = t.data.reshape(-1)
        for i in range(flat.size):
            orig = flat[i]
            flat[i] = orig + h
            with ag.no_grad():
                up = float(np.sum(fn(*inputs).data * r))
            flat[i] = orig - h
            with ag.no_grad():
                down = float(np.sum(fn(*inputs).data * r))
            flat[i] = orig
            num.reshape(-1)[i] = (up - down) / (2 * h)
        assert t.grad is not None, f"input {k}: no gradient"
        assert t.grad.shape == t.shape and t.grad.dtype == t.dtype
        err = np.max(np.abs(t.grad - num)) / max(np.max(np.abs(num)), 1e-12)
        assert err < tol, f"input {k} ({t.shape}): relative error {err:.2e} against finite differences"


# ---- every op against finite differences (float64, CPU) ----------------------------------------------------


def test_matmul(rng):
    fd_check(ag.matmul, [leaf(rng, 3, 5), leaf(rng, 5, 4)], rng)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
def test_linear(rng, bias, transposed):
    w = leaf(rng, 7, 5) if transposed else leaf(rng, 5, 7)
    args = [leaf(rng, 2, 3, 5), w] + ([leaf(rng, 7)] if bias else [])
    fd_check(lambda x, w, *b: ag.linear(x, w, *b, transposed=transposed), args, rng)


def test_embedding_repeated_ids(rng):
    ids = np.array([[3, 1, 3], [0, 3, 5]])  # id 3 three times: the scatter-add must sum
    fd_check(lambda w: ag.embedding(w, ids), [leaf(rng, 6, 4)], rng)


def test_add_broadcast_mul_sum_mean_reshape(rng):
    fd_check(ag.add, [leaf(rng, 2, 3, 4), leaf(rng, 3, 4)], rng)
    fd_check(ag.add, [leaf(rng, 2, 1, 4), leaf(rng, 2, 3, 1)], rng)
    fd_check(lambda x: ag.mul(x, -2.5), [leaf(rng, 3, 4)], rng)
    fd_check(ag.sum, [leaf(rng, 3, 4)], rng)
    fd_check(ag.mean, [leaf(rng, 3, 4)], rng)
    fd_check(lambda x: ag.reshape(x, (4, 3, 2)), [leaf(rng, 2, 3, 4)], rng)


def test_split_with_an_unused_piece(rng):
    def f(x):
        a, _, c = ag.split(x, 3, axis=-1)  # the middle piece gets no gradient: zeros
        return ag.add(ag.reshape(a, (2, 2, 2)), ag.reshape(c, (2, 2, 2)))

    fd_check(f, [leaf(rng, 2, 12)], rng)


@pytest.mark.parametrize("axis", [-1, 0])
def test_softmax_log_softmax(rng, axis):
    fd_check(lambda x: ag.softmax(x, axis), [leaf(rng, 3, 7)], rng)
    fd_check(lambda x: ag.log_softmax(x, axis), [leaf(rng, 3, 7)], rng)


@pytest.mark.parametrize("affine", ["both", "weight", "none"])
def test_layer_norm(rng, affine):
    w = leaf(rng, 9) if affine != "none" else None
    b = leaf(rng, 9) if affine == "both" else None
    args = [leaf(rng, 2, 3, 9)] + [t for t in (w, b) if t is not None]

    def f(x, *wb):
        it = iter(wb)
        return ag.layer_norm(x, next(it) if w is not None else None, next(it) if b is not None else None)

    fd_check(f, args, rng)


@pytest.mark.parametrize("weight", [True, False])
def test_rms_norm(rng, weight):
    args = [leaf(rng, 4, 11)] + ([leaf(rng, 11)] if weight else [])
    fd_check(lambda x, *w: ag.rms_norm(x, w[0] if w else None), args, rng)


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu(rng, approximate):
    fd_check(lambda x: ag.gelu(x, approximate=approximate), [leaf(rng, 3, 5, scale=2.0)], rng)
    fd_check(lambda x, b: ag.gelu(x, b, approximate=approximate), [leaf(rng, 3, 5), leaf(rng, 5)], rng)


def test_swiglu(rng):
    fd_check(ag.swiglu, [leaf(rng, 3, 6, scale=2.0), leaf(rng, 3, 6)], rng)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_attention(rng, causal, kv_heads):
    q, k, v = leaf(rng, 2, 5, 2, 4), leaf(rng, 2, 6, kv_heads, 4), leaf(rng, 2, 6, kv_heads, 4)
    # the CPU path's lse is float32 (as on the GPU): the backward's P carries ~1e-7 relative error
    fd_check(lambda q, k, v: ag.attention(q, k, v, causal=causal), [q, k, v], rng, tol=2e-6)


def test_cross_entropy_ignore_index_and_seed(rng):
    targets = np.array([2, -100, 0, 4, 4])
    fd_check(lambda x: ag.cross_entropy(x, targets), [leaf(rng, 5, 6, scale=2.0)], rng)
    # the gradient is written pre-scaled for the announced seed; another seed is rescaled in backward
    fd_check(lambda x: ag.cross_entropy(x, targets, grad_scale=8.0), [leaf(rng, 5, 6)], rng)
    x = leaf(rng, 5, 6)
    ag.cross_entropy(x, targets, grad_scale=8.0).backward(8.0)
    g8 = x.grad
    x.grad = None
    ag.cross_entropy(x, targets).backward()
    np.testing.assert_allclose(g8, 8.0 * x.grad, rtol=1e-14, atol=1e-15)
    assert not np.any(g8[1])  # the ignored row gets no gradient


def test_cross_entropy_inplace_reuses_the_logits_buffer(rng):
    x, w = leaf(rng, 3, 4), leaf(rng, 4, 6)
    targets = np.array([1, 2, 3])
    plain = ag.cross_entropy(ag.matmul(x, w), targets)
    plain.backward()
    want = w.grad
    w.grad = None
    logits = ag.matmul(x, w)
    buf = logits.data
    loss = ag.cross_entropy(logits, targets, inplace=True)
    assert loss.item() == plain.item()
    loss.backward()
    np.testing.assert_allclose(w.grad, want, rtol=1e-13)
    probs = ag.softmax(ag.matmul(x, w)).data.copy()  # the buffer now holds (softmax - onehot) / rows
    probs[np.arange(3), targets] -= 1
    np.testing.assert_allclose(buf, probs / 3, rtol=1e-12, atol=1e-15)


def test_a_small_gpt_end_to_end(rng):
    """The whole training model (embeddings, blocks, tied head, fused loss) against finite differences."""
    from rawformer.models.config import GPT2Config

    from rawformer.training.model import GPT

    cfg = GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    model = GPT.create(cfg, seed=3, dtype=np.float64)
    ids, tg = rng.integers(0, 11, (2, 5)), rng.integers(0, 11, (2, 5))
    names = ["wte.weight", "wpe.weight", "h.0.attn.c_attn.weight", "h.0.ln_2.bias", "h.0.mlp.c_fc.bias"]
    params = [model.params[n] for n in names]

    def f(*_):
        return model.loss(ids, tg)

    fd_check(f, params, rng)


def test_rope(rng):
    inv_freq = (10000.0 ** (-np.arange(0, 6, 2) / 6)).astype(np.float32)
    fd_check(lambda x: ag.rope(x, np.arange(4) + 3, inv_freq), [leaf(rng, 2, 4, 3, 6)], rng)


@pytest.mark.parametrize("tied", [False, True])
def test_a_small_llama_end_to_end(rng, tied):
    """Llama: RMSNorm, RoPE, GQA attention, SwiGLU, untied or tied head, against finite differences."""
    from rawformer.models.config import LlamaConfig

    from rawformer.training.model import Llama

    cfg = LlamaConfig(vocab_size=13, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied,
                      attention_bias=not tied)  # fmt: skip
    model = Llama.create(cfg, seed=4, dtype=np.float64)
    ids, tg = rng.integers(0, 13, (2, 5)), rng.integers(0, 13, (2, 5))
    names = ["embed_tokens.weight", "layers.0.self_attn.k_proj.weight", "layers.0.mlp.up_proj.weight",
             "layers.0.post_attention_layernorm.weight", "norm.weight"]  # fmt: skip
    names += ["layers.0.self_attn.q_proj.bias"] if not tied else []
    # q / k gradients are ~1e-4 of the others at this initialisation (scores near uniform): a larger step
    # keeps the differences above the loss's rounding noise
    fd_check(lambda *_: model.loss(ids, tg), [model.params[n] for n in names], rng, tol=1e-5, h=1e-5)


# ---- the engine --------------------------------------------------------------------------------------------


def test_shared_input_and_accumulation_over_backwards(rng):
    x = leaf(rng, 3, 4)
    y = ag.add(ag.mul(x, 2.0), x)  # x used twice in one graph
    y.backward(np.ones((3, 4)))
    np.testing.assert_array_equal(x.grad, np.full((3, 4), 3.0))
    ag.sum(ag.mul(x, 0.5)).backward()  # a second backward adds to .grad
    np.testing.assert_array_equal(x.grad, np.full((3, 4), 3.5))


def test_leaf_grads_never_alias(rng):
    a, b = leaf(rng, 2, 3), leaf(rng, 2, 3)
    g = np.ones((2, 3))
    ag.add(a, b).backward(g)
    assert not np.shares_memory(a.grad, b.grad) and not np.shares_memory(a.grad, g)
    a.grad += 1  # a hook all-reducing in place must not touch the other gradient
    np.testing.assert_array_equal(b.grad, g)


def test_grad_ready_hook_fires_once_with_the_final_grad(rng):
    w = leaf(rng, 4, 4)
    unused = leaf(rng, 2)
    seen = []
    w.register_grad_ready_hook(lambda t: seen.append(t.grad.copy()))
    remove = unused.register_grad_ready_hook(lambda t: seen.append("unused"))
    x = leaf(rng, 3, 4)
    h = ag.matmul(ag.matmul(x, w), w)  # w used twice: the hook waits for both contributions
    h.backward(np.ones((3, 4)))
    assert len(seen) == 1
    np.testing.assert_array_equal(seen[0], w.grad)
    remove()
    with pytest.raises(ValueError, match="leaf"):
        h.register_grad_ready_hook(print)


def test_hook_order_is_reverse_of_use(rng):
    """Gradients become ready last layer first: what bucketed all-reduce overlaps with."""
    ws = [leaf(rng, 4, 4) for _ in range(3)]
    order = []
    for i, w in enumerate(ws):
        w.register_grad_ready_hook(lambda t, i=i: order.append(i))
    h = leaf(rng, 2, 4)
    for w in ws:
        h = ag.matmul(h, w)
    ag.sum(h).backward()
    assert order == [2, 1, 0]


def test_hook_may_replace_the_grad(rng):
    w = leaf(rng, 3)
    bucket = np.zeros(5)

    def into_bucket(t):
        bucket[1:4] = t.grad
        t.grad = bucket[1:4]  # the distributed side keeps grads as views of a flat buffer

    w.register_grad_ready_hook(into_bucket)
    ag.sum(w).backward()
    ag.sum(ag.mul(w, 2.0)).backward()  # accumulates into the view
    np.testing.assert_array_equal(bucket, [0, 3, 3, 3, 0])


def test_no_grad_and_freed_graphs(rng):
    x = leaf(rng, 2, 2)
    with ag.no_grad():
        y = ag.mul(x, 3.0)
    assert not y.requires_grad and y.is_leaf
    z = ag.sum(ag.mul(x, 3.0))
    z.backward()
    with pytest.raises(RuntimeError, match="freed"):
        z.backward()
    with pytest.raises(RuntimeError, match="require grad"):
        y.backward(np.ones((2, 2)))
    with pytest.raises(ValueError, match="non-scalar"):
        ag.mul(x, 2.0).backward()
    with pytest.raises(TypeError, match="Tensor"):
        ag.add(x, np.ones((2, 2)))


def test_activations_no_backward_needs_are_freed_after_the_forward(rng):
    """The graph keeps what backward closures saved, not every intermediate: a residual branch's output
    (needed by no backward) dies with its Tensor."""
    import gc
    import weakref

    x, w = leaf(rng, 4, 3), leaf(rng, 3, 3)
    branch = ag.linear(x, w)
    gone = weakref.ref(branch.data)
    out = ag.add(x, branch)
    del branch
    gc.collect()
    assert gone() is None
    out.backward(np.ones((4, 3)))
    np.testing.assert_allclose(w.grad, x.data.T @ np.ones((4, 3)))


def test_deep_graph_has_no_recursion_limit(rng):
    x = leaf(rng, 2)
    y = x
    for _ in range(3000):
        y = ag.mul(y, 1.0)
    ag.sum(y).backward()
    np.testing.assert_array_equal(x.grad, np.ones(2))


# ---- GPU: every op's gradients against the float64 NumPy path ----------------------------------------------

GPU_TOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float16): 5e-3}


def _gpu_vs_numpy(cp, fn, host_inputs, dtype, rng, extra=None, tol=None):
    """Run fn on CuPy `dtype` inputs and on NumPy float64 copies of the same (rounded) values; compare every
    input gradient, max |gpu - ref| / max |ref|."""
    rounded = [np.asarray(a, dtype=dtype) for a in host_inputs]
    ref_t = [Tensor(a.astype(np.float64), requires_grad=True) for a in rounded]
    gpu_t = [Tensor(cp.asarray(a), requires_grad=True) for a in rounded]
    ref_out = fn(*ref_t, xp=np)
    gpu_out = fn(*gpu_t, xp=cp)
    r = rng.standard_normal(ref_out.shape).astype(dtype)
    if ref_out.ndim == 0:
        ref_out.backward(float(r))
        gpu_out.backward(float(r))
    else:
        ref_out.backward(r.astype(np.float64))
        gpu_out.backward(cp.asarray(r))
    limit = tol or GPU_TOL[np.dtype(dtype)]
    out_err = np.max(np.abs(backend.to_numpy(gpu_out.data) - ref_out.data)) / max(
        np.max(np.abs(ref_out.data)), 1e-30
    )
    assert out_err < limit, f"forward: relative error {out_err:.2e}"
    for k, (g, t) in enumerate(zip(gpu_t, ref_t, strict=True)):
        assert g.grad is not None and g.grad.dtype == np.dtype(dtype)
        got = backend.to_numpy(g.grad).astype(np.float64)
        assert np.all(np.isfinite(got)), f"input {k}: non-finite gradient"
        err = np.max(np.abs(got - t.grad)) / max(np.max(np.abs(t.grad)), 1e-30)
        assert err < limit, f"input {k}: relative error {err:.2e} > {limit} ({np.dtype(dtype)})"


DTYPES = [np.float32, np.float16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_linear_matmul(cp, rng, dtype):
    x, w, b = rng.standard_normal((3, 37, 64)), rng.standard_normal((64, 96)) * 0.1, rng.standard_normal(96)
    _gpu_vs_numpy(cp, lambda x, w, b, xp: ag.linear(x, w, b), [x, w, b], dtype, rng)
    wt = rng.standard_normal((50, 64)) * 0.1
    _gpu_vs_numpy(cp, lambda x, w, xp: ag.linear(x, w, transposed=True), [x, wt], dtype, rng)
    a, m = rng.standard_normal((19, 33)), rng.standard_normal((33, 21))
    _gpu_vs_numpy(cp, lambda a, m, xp: ag.matmul(a, m), [a, m], dtype, rng)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_embedding_add(cp, rng, dtype):
    ids = rng.integers(0, 97, (4, 33))
    w, p = rng.standard_normal((97, 48)), rng.standard_normal((33, 48))

    def f(w, p, xp):
        return ag.add(ag.embedding(w, xp.asarray(ids)), ag.embedding(p, xp.arange(33)))

    _gpu_vs_numpy(cp, f, [w, p], dtype, rng)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_norms_activations_softmax(cp, rng, dtype):
    x, w, b = rng.standard_normal((5, 17, 96)), 1 + 0.1 * rng.standard_normal(96), rng.standard_normal(96)
    _gpu_vs_numpy(cp, lambda x, w, b, xp: ag.layer_norm(x, w, b), [x, w, b], dtype, rng)
    _gpu_vs_numpy(cp, lambda x, w, xp: ag.rms_norm(x, w), [x, w], dtype, rng)
    _gpu_vs_numpy(cp, lambda x, b, xp: ag.gelu(x, b), [x, b], dtype, rng)
    _gpu_vs_numpy(cp, lambda x, b, xp: ag.swiglu(x, ag.add(x, b)), [x, b], dtype, rng)
    _gpu_vs_numpy(cp, lambda x, xp: ag.softmax(x), [x], dtype, rng)
    _gpu_vs_numpy(cp, lambda x, xp: ag.log_softmax(x), [x], dtype, rng)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80])
def test_gpu_attention(cp, rng, dtype, head_dim):
    q = rng.standard_normal((2, 67, 4, head_dim))
    k, v = rng.standard_normal((2, 67, 2, head_dim)), rng.standard_normal((2, 67, 2, head_dim))
    _gpu_vs_numpy(cp, lambda q, k, v, xp: ag.attention(q, k, v, causal=True), [q, k, v], dtype, rng)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_cross_entropy(cp, rng, dtype):
    x = rng.standard_normal((45, 1001)) * 3
    t = rng.integers(0, 1001, 45)
    t[7] = -100

    def f(x, xp):
        return ag.cross_entropy(ag.mul(x, 1.0), xp.asarray(t), grad_scale=4.0, inplace=True)

    _gpu_vs_numpy(cp, f, [x], dtype, rng)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_gpu_model_gradients(cp, rng, dtype, kind):
    """Every parameter gradient of a small GPT-2 / Llama (head dim 64: the tensor-core attention kernels in
    fp16; Llama with GQA and RoPE) against the float64 NumPy path from the same (rounded) weights."""
    from rawformer.models.config import GPT2Config, LlamaConfig

    from rawformer.training.model import init_weights, model_class

    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=257, n_positions=64, n_embd=128, n_layer=2, n_head=2)
    else:
        cfg = LlamaConfig(vocab_size=257, hidden_size=256, intermediate_size=320, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=64)  # fmt: skip
    cls = model_class(cfg)
    host = init_weights(cfg, seed=5)
    ids, tg = rng.integers(0, 257, (3, 64)), rng.integers(0, 257, (3, 64))
    ref = cls(cfg, {n: w.astype(dtype).astype(np.float64) for n, w in host.items()})
    gpu = cls(cfg, {n: cp.asarray(w.astype(dtype)) for n, w in host.items()})
    scale = 1024.0 if dtype == np.float16 else 1.0
    ref.loss(ids, tg).backward()
    loss = gpu.loss(cp.asarray(ids), cp.asarray(tg), grad_scale=scale)
    loss.backward(scale)
    for n, p in gpu.params.items():
        want = ref.params[n].grad
        got = backend.to_numpy(p.grad).astype(np.float64) / scale
        err = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30)
        assert err < GPU_TOL[np.dtype(dtype)] * (4 if dtype == np.float16 else 10), f"{n}: {err:.2e}"
