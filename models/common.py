"""What the models share: weight checks, random weights, a decoder layer's attention over the paged cache.

Decoder attention, one forward step over a batch of sequences (the AttentionBatch of rawformer.memory: new
tokens packed sequence after sequence, their K/V already written into the cache by rf.rope_kv_write /
rf.kv_write). Three cases, decided once per step by `plan_step`:

    prefill  batch.is_prefill: every sequence starts at position 0 with nothing cached, so attention runs
             over the new tokens only: rf.attention varlen, causal, cu_seqlens_k = cu_seqlens_q.
    decode   every sequence has the same number n <= 16 of new tokens (T == S * max_seqlen_q): q viewed as
             (S, n, heads, head_dim) and rf.paged_attention reads K/V straight from the paged cache.
    gather   anything else (a prompt after a cached prefix, chunked prefill, ragged speculative steps): the
             context of every sequence (cached prefix + the new tokens) is gathered from the cache into a
             packed (total_k, kv_heads, head_dim) array, then rf.attention varlen with q_len != k_len
             (bottom-right causal alignment puts the new tokens at the end of their context).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

import rawformer as rf
from rawformer import backend
from rawformer.kernels.gemm import matmul
from rawformer.ops import _checks
from rawformer.ops.norm_linear import unfused_norm
from rawformer.ops.quant import QuantizedWeight

__all__ = [
    "Arena",
    "attend_gathered",
    "StepBatch",
    "StepPlan",
    "check_weights",
    "decoder_attention",
    "last_token_rows",
    "linear",
    "linear_swiglu",
    "linear_weight",
    "norm_linear",
    "per_sequence",
    "stacked_linear_weight",
    "plan_step",
    "random_weights",
    "run_dtypes",
    "run_layers",
]

MAX_DECODE_Q = 16  # rf.paged_attention takes up to 16 new tokens per sequence


class StepBatch(Protocol):
    """The fields of rawformer.memory.AttentionBatch a model reads (arrays where the model's weights live)."""

    tokens: Any  # int (T,) new token ids, packed sequence after sequence
    positions: Any  # int32 (T,) position of each new token in its sequence
    slot_mapping: Any  # int32 (T,) cache slot of each new token (block * block_size + offset)
    cu_seqlens_q: Any  # int32 (S + 1,) offsets of each sequence's new tokens
    context_lens: Any  # int32 (S,) tokens in the cache per sequence, the new ones included
    block_tables: Any  # int32 (S, max_blocks), -1 padded
    max_seqlen_q: int
    max_context: int
    is_prefill: bool


class Arena(Protocol):
    """The KV arena: layer L's caches, each (num_blocks, block_size, kv_heads, head_dim)."""

    def k(self, layer: int) -> Any: ...

    def v(self, layer: int) -> Any: ...


# ---- weights ----------------------------------------------------------------------------------------------


def run_dtypes(gpu: bool) -> tuple[np.dtype, np.dtype]:
    """The float dtypes a model runs in: on the GPU those of the kernels (float16 / float32), on the CPU
    float32 / float64 (the float64 reference ops)."""
    return _checks.GPU_DTYPES if gpu else (np.dtype(np.float32), np.dtype(np.float64))


def check_weights(
    model: str, expected: dict[str, tuple[int, ...]], weights: dict[str, Any], xp: Any = None
) -> tuple[Any, np.dtype]:
    """Every expected tensor is there, with its shape, one float dtype and on one device.

    Returns (xp, dtype): the array module (xp given or taken from the first array) and the weights' dtype.
    Errors name the tensor: KeyError for a missing one, ValueError for a wrong shape / dtype / device. Tensors
    not in `expected` are ignored (checkpoints carry buffers such as attention masks and position ids)."""
    if not weights:
        raise ValueError("weights is empty")
    if xp is None:
        xp = backend.array_module(next(iter(weights.values())))
    missing = [n for n in expected if n not in weights]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise KeyError(f"{model}: missing weight {missing[0]!r}{more}")
    dtype = None
    allowed = run_dtypes(gpu=xp is not np)
    for name, shape in expected.items():
        w = weights[name]
        if tuple(w.shape) != tuple(shape):
            raise ValueError(f"{model}: weight {name!r} has shape {tuple(w.shape)}, expected {tuple(shape)}")
        if backend.array_module(w) is not xp:
            raise ValueError(
                f"{model}: weight {name!r} is a {type(w).__name__}, expected an array of {xp.__name__}"
            )
        if dtype is None:
            dtype = np.dtype(w.dtype)
            if dtype not in allowed:
                where = "on the GPU" if xp is not np else "on the CPU"
                raise ValueError(
                    f"{model}: weights are {dtype}; {where} models run in "
                    f"{' / '.join(t.name for t in allowed)}"
                )
        elif w.dtype != dtype:
            raise ValueError(f"{model}: weight {name!r} is {w.dtype} but the others are {dtype}")
    assert dtype is not None
    return xp, dtype


def random_weights(
    shapes: dict[str, tuple[int, ...]], seed: int, dtype: Any, xp: Any, std: float
) -> dict[str, Any]:
    """Random weights of the given shapes, the same on every backend for a seed (drawn on the host).

    1-D ".weight" tensors (norm scales) are 1 + N(0, std); biases and everything else N(0, std)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        w = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
        if len(shape) == 1 and name.endswith(".weight"):  # a norm's scale
            w = np.float32(1.0) + w
        out[name] = xp.asarray(w.astype(dtype))
    return out


def linear(x: Any, w: Any, b: Any = None) -> Any:
    """y = x @ w (+ b): x (..., in), w (in, out) (C-contiguous, or a transposed view such as `wte.T`, read
    in place), b (out,) or None. Returns (..., out) in x's dtype.

    The GEMM is rawformer.kernels.gemm.matmul: on the GPU it calls cuBLAS in a way a CUDA graph can
    capture (CuPy's own matmul cannot be captured), and rf.linear runs its GEMV kernel for one row
    instead; on the CPU it is NumPy's `@`. A QuantizedWeight (models/
    quantize.py) goes to rf.int8_linear instead."""
    if isinstance(w, QuantizedWeight):
        return rf.int8_linear(x, w, b)
    if backend.is_cupy(x):
        return rf.linear(x, w, b)  # one row (batch-1 decode): the GEMV kernel; more: this same cuBLAS call
    lead = x.shape[:-1]
    y = matmul(x.reshape(-1, x.shape[-1]), w)  # (rows, out); the reshape is a view for contiguous rows
    if b is not None:
        y += b  # in place: one elementwise kernel, no new buffer
    return y.reshape(*lead, w.shape[1])


def linear_swiglu(x: Any, w_gate: Any, w_up: Any, b_gate: Any = None, b_up: Any = None) -> Any:
    """silu(x @ w_gate + b_gate) * (x @ w_up + b_up): on the GPU rf.linear_swiglu (one GEMV launch for
    both matrices at decode sizes), on the CPU two `linear`s and rf.swiglu."""
    if isinstance(w_gate, QuantizedWeight):
        return rf.int8_linear_swiglu(x, w_gate, w_up, b_gate, b_up)
    if backend.is_cupy(x):
        return rf.linear_swiglu(x, w_gate, w_up, b_gate, b_up)
    return rf.swiglu(linear(x, w_gate, b_gate), linear(x, w_up, b_up))


def norm_linear(
    a: Any, x: Any, ln_w: Any, eps: float, w: Any, b: Any = None, w2: Any = None, b2: Any = None
) -> tuple[Any, Any]:
    """A pre-norm block's residual add, RMSNorm and the projection after it: (y, s) with s = x + a (the new
    residual stream; x itself when a is None), h = rms_norm(s) * ln_w and y = linear(h, w, b), or with w2
    linear_swiglu(h, w, w2, b, b2).

    On the GPU this is rf.add_rms_norm_linear (float weights) or rf.int8_add_rms_norm_linear
    (QuantizedWeights): one GEMV launch for a batch-1 decode step (the norm in its prologue), and for more
    rows or other layouts the same unfused ops as below. On the CPU the unfused ops: rf.rms_norm /
    rf.add_rms_norm, then linear / linear_swiglu."""
    if backend.is_cupy(x):
        if isinstance(w, QuantizedWeight):
            return rf.int8_add_rms_norm_linear(a, x, ln_w, eps, w, b, up=w2, b_up=b2)
        return rf.add_rms_norm_linear(a, x, ln_w, eps, w, b, w2=w2, b2=b2)
    h, s = unfused_norm(a, x, ln_w, eps)  # s = x + a; h = rms_norm(s)
    y = linear(h, w, b) if w2 is None else linear_swiglu(h, w, w2, b, b2)
    return y, s


def linear_weight(w: Any, xp: Any) -> Any:
    """An HF nn.Linear weight (out, in) as the (in, out) matrix of `x @ W`: the transposed view of the
    contiguous (out, in) array. Decode steps read it with rf.linear's gemv_nk (each output's weights are one
    contiguous row: streamed at ~90% of the copy bandwidth, where the split-K kernel for a (in, out) matrix
    and cuBLAS's GEMMs stay at 35-75% on the 1B decoder's shapes), and cuBLAS takes it in place (OP_T)."""
    return xp.ascontiguousarray(w).T


def stacked_linear_weight(ws: list[Any], xp: Any) -> Any:
    """Several nn.Linear weights (out_i, in) stacked along the output axis, as one (in, sum out_i) view."""
    return xp.ascontiguousarray(xp.concatenate(ws, axis=0)).T


# ---- decoder attention over the paged cache ----------------------------------------------------------------


@dataclass
class StepPlan:
    """How every layer of one forward step attends (see the module docstring). Built once per step."""

    mode: str  # "prefill" | "decode" | "gather"
    q_len: int = 0  # decode: new tokens per sequence
    gather_slots: Any = None  # gather: int (total_k,) cache slots of every sequence's context, packed
    cu_seqlens_k: Any = None  # gather: int32 (S + 1,) offsets of the contexts in the packed K/V


def plan_step(batch: StepBatch, block_size: int, xp: Any) -> StepPlan:
    """Pick the attention case for a batch. Only the gather case needs array values on the host (context
    lengths and block tables, to build the gather indices once for all layers): it takes them from
    `batch.host` (the pool's NumPy copies) when the batch has one, else copies them from the device."""
    tokens = int(batch.tokens.shape[0])
    seqs = int(batch.context_lens.shape[0])
    if batch.is_prefill:
        return StepPlan("prefill")
    n = int(batch.max_seqlen_q)
    if 0 < n <= MAX_DECODE_Q and tokens == seqs * n:  # all q lengths equal: each <= n and they sum to S * n
        return StepPlan("decode", q_len=n)
    src = getattr(batch, "host", None) or batch
    ctx = backend.to_numpy(src.context_lens).astype(np.int64)
    tables = backend.to_numpy(src.block_tables).astype(np.int64)
    cu_k = np.zeros(seqs + 1, dtype=np.int64)
    np.cumsum(ctx, out=cu_k[1:])
    seq_of = np.repeat(np.arange(seqs), ctx)  # (total_k,) the sequence of each context position
    pos = np.arange(int(cu_k[-1])) - np.repeat(cu_k[:-1], ctx)  # position within its sequence
    slots = tables[seq_of, pos // block_size] * block_size + pos % block_size
    return StepPlan("gather", gather_slots=xp.asarray(slots), cu_seqlens_k=xp.asarray(cu_k.astype(np.int32)))


def decoder_attention(
    q: Any, k: Any, v: Any, batch: StepBatch, plan: StepPlan, k_cache: Any, v_cache: Any
) -> Any:
    """Causal attention of the new tokens of a step, their K/V already in the cache.

    q (T, q_heads, D), k / v (T, kv_heads, D) of the new tokens (strided views allowed); k_cache / v_cache
    (num_blocks, block_size, kv_heads, D) of this layer. Returns (T, q_heads, D)."""
    tokens, heads, d = q.shape
    if plan.mode == "prefill":
        return rf.attention(
            q, k, v, causal=True, cu_seqlens_q=batch.cu_seqlens_q, cu_seqlens_k=batch.cu_seqlens_q,
            max_seqlen_q=int(batch.max_seqlen_q), max_seqlen_k=int(batch.max_seqlen_q),
        )  # fmt: skip
    if plan.mode == "decode":
        out = rf.paged_attention(
            per_sequence(q, plan), k_cache, v_cache, batch.block_tables, batch.context_lens
        )
        return out.reshape(tokens, heads, d)
    kv_heads = k_cache.shape[2]
    k_all = k_cache.reshape(-1, kv_heads, d)[plan.gather_slots]  # (total_k, Hk, D): the contexts, packed
    v_all = v_cache.reshape(-1, kv_heads, d)[plan.gather_slots]
    return attend_gathered(q, k_all, v_all, batch, plan)


def per_sequence(q: Any, plan: StepPlan) -> Any:
    """A decode plan's q (T, heads, D) viewed as (S, n, heads, D): n new tokens per sequence."""
    tokens, heads, d = q.shape
    return q.reshape(tokens // plan.q_len, plan.q_len, heads, d)


def attend_gathered(q: Any, k_all: Any, v_all: Any, batch: StepBatch, plan: StepPlan) -> Any:
    """A gather plan's attention: the new tokens q (T, heads, D) over their contexts' K / V packed as the
    plan's gather_slots put them (total_k, kv_heads, D); causal, bottom-right aligned."""
    return rf.attention(
        q, k_all, v_all, causal=True, cu_seqlens_q=batch.cu_seqlens_q, cu_seqlens_k=plan.cu_seqlens_k,
        max_seqlen_q=int(batch.max_seqlen_q), max_seqlen_k=int(batch.max_context),
    )  # fmt: skip


def run_layers(steps: Iterator[int]) -> Any:
    """Run a forward given one layer at a time (a model's `forward_layers` generator) to its end: the
    value it returns (the logits)."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def last_token_rows(batch: StepBatch) -> Any:
    """Row of the last new token of each sequence in the packed batch: cu_seqlens_q[1:] - 1, (S,)."""
    return batch.cu_seqlens_q[1:] - 1
