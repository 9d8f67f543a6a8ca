"""`rawformer demo`: the model demo (the default) and the ops check (`--ops`).

Model demo (`run_model`): a handful of prompts go through continuous batching (rawformer.runtime.Engine) with
their text streamed as it is generated; the requests arrive a few steps apart, so new ones join a batch that
is already decoding. Then it prints tokens/s, the KV memory the paged pool used at its peak against what a
contiguous cache (every sequence reserving the model's full length) would take, and the ops that ran with
their call counts (on the GPU each is a CUDA kernel of ours, the GEMMs cuBLAS; on the CPU each is the
float64 NumPy reference; RAWFORMER_DEBUG=1 prints every kernel launch with its time).

Ops check (`run`): every fused op on every backend present (NumPy on any machine; the CUDA and Numba kernels
when a GPU answers), timed and compared with its float64 NumPy reference.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

import rawformer as rf
from rawformer import backend
from rawformer.ops import activations, norms
from rawformer.ops.attention import attention_ref
from rawformer.ops.paged_attention import paged_attention_ref
from rawformer.ops.rope import rope_ref
from rawformer.ops.softmax import log_softmax_ref, softmax_ref


@dataclass(frozen=True)
class Case:
    name: str
    inputs: Callable[[np.random.Generator, int, int], tuple[np.ndarray, ...]]
    run: Callable[..., Any]  # (*inputs, impl=...) -> array or tuple of arrays
    reference: Callable[..., Any]  # (*float64 inputs) -> array or tuple of arrays
    numba: bool = True  # whether the op has a Numba kernel


def _x(rng, rows, cols):
    return (rng.standard_normal((rows, cols)),)


def _x_w_b(rng, rows, cols):
    return rng.standard_normal((rows, cols)), 1 + 0.1 * rng.standard_normal(cols), rng.standard_normal(cols)


def _x_w(rng, rows, cols):
    return rng.standard_normal((rows, cols)), 1 + 0.1 * rng.standard_normal(cols)


def _two(rng, rows, cols):
    return rng.standard_normal((rows, cols)), rng.standard_normal((rows, cols))


def _ln_bwd_inputs(rng, rows, cols):
    x, w, b = _x_w_b(rng, rows, cols)
    return rng.standard_normal((rows, cols)), x, w


def _ln_bwd_run(dy, x, w, impl=None):
    _, mean, rstd = rf.layer_norm(x, w, None, return_stats=True, impl=impl)
    return rf.layer_norm_backward(dy, x, w, mean, rstd, impl=impl)


def _ln_bwd_ref(dy, x, w):
    _, mean, rstd = norms.layer_norm_ref(x, w, None, 1e-5)
    return norms.layer_norm_backward_ref(dy, x, w, mean, rstd)


# Attention shapes from (rows, cols): rows = tokens of one sequence, heads of 64 (GQA 4:2).
HEAD_DIM, Q_HEADS, KV_HEADS, BLOCK = 64, 4, 2, 16


def _attention_inputs(rng, rows, cols):
    return (
        rng.standard_normal((1, rows, Q_HEADS, HEAD_DIM)),
        rng.standard_normal((1, rows, KV_HEADS, HEAD_DIM)),
        rng.standard_normal((1, rows, KV_HEADS, HEAD_DIM)),
    )


def _decode_inputs(rng, rows, cols):
    """4 sequences of ragged length (rows, rows/2, rows/3, 1 tokens) in a shuffled paged cache, one new
    query token each."""
    lens = np.array([rows, max(1, rows // 2), max(1, rows // 3), 1], dtype=np.int32)
    per_seq = -(-int(lens.max()) // BLOCK)
    blocks = rng.permutation(4 * per_seq).astype(np.int32).reshape(4, per_seq)
    cache = (4 * per_seq, BLOCK, KV_HEADS, HEAD_DIM)
    q = rng.standard_normal((4, 1, Q_HEADS, HEAD_DIM))
    return q, rng.standard_normal(cache), rng.standard_normal(cache), blocks, lens


def _rope_inputs(rng, rows, cols):
    return rng.standard_normal((rows, Q_HEADS, HEAD_DIM)), np.arange(rows, dtype=np.int32) * 7


CASES = [
    Case("softmax", _x, lambda x, impl=None: rf.softmax(x, impl=impl), softmax_ref),
    Case("log_softmax", _x, lambda x, impl=None: rf.log_softmax(x, impl=impl), log_softmax_ref),
    Case(
        "layer_norm",
        _x_w_b,
        lambda x, w, b, impl=None: rf.layer_norm(x, w, b, impl=impl),
        lambda x, w, b: norms.layer_norm_ref(x, w, b, 1e-5)[0],
    ),
    Case("layer_norm backward", _ln_bwd_inputs, _ln_bwd_run, _ln_bwd_ref),
    Case(
        "rms_norm",
        _x_w,
        lambda x, w, impl=None: rf.rms_norm(x, w, impl=impl),
        lambda x, w: norms.rms_norm_ref(x, w, 1e-6)[0],
    ),
    Case(
        "gelu (tanh)",
        _x,
        lambda x, impl=None: rf.gelu(x, impl=impl),
        lambda x: activations.gelu_ref(x, None, "tanh"),
    ),
    Case("swiglu", _two, lambda g, u, impl=None: rf.swiglu(g, u, impl=impl), activations.swiglu_ref),
    Case(
        "attention (causal)",
        _attention_inputs,
        lambda q, k, v, impl=None: rf.attention(q, k, v, causal=True, impl=impl),
        lambda q, k, v: attention_ref(q, k, v, causal=True),
        numba=False,
    ),
    Case(
        "paged_attention",
        _decode_inputs,
        lambda *a, impl=None: rf.paged_attention(*a, impl=impl),
        paged_attention_ref,
    ),
    Case("rope", _rope_inputs, lambda x, pos, impl=None: rf.rope(x, pos), rope_ref, numba=False),
]


def _as_tuple(v: Any) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)


def _max_error(outputs: tuple, refs: tuple) -> float:
    """Largest |out - ref| / max|ref| over all outputs that have a reference."""
    worst = 0.0
    for out, ref in zip(outputs, refs, strict=False):
        if out is None or ref is None:
            continue
        o = backend.to_numpy(out).astype(np.float64)
        scale = max(float(np.max(np.abs(ref))), 1e-30) if ref.size else 1.0
        worst = max(worst, float(np.max(np.abs(o - ref))) / scale if ref.size else 0.0)
    return worst


def _time(fn: Callable[[], Any], sync: Callable[[], None], reps: int = 5) -> float:
    fn()  # warm-up: compiles kernels on first use
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def backends() -> list[tuple[str, Any, str | None]]:
    """(label, array module, impl) for every backend this machine can run."""
    found: list[tuple[str, Any, str | None]] = [("cpu (numpy)", np, None)]
    cp = backend.cupy_module()
    if cp is not None:
        found.append(("gpu (cuda)", cp, "cuda"))
        try:
            from rawformer.kernels.numba import _numba  # noqa: F401  (raises RuntimeError without numba)

            found.append(("gpu (numba)", cp, "numba"))
        except RuntimeError:
            pass
    return found


def run(rows: int = 512, cols: int = 1000, dtype: np.dtype | type = np.float32) -> list[dict]:
    """Run every case on every backend; print a table and return its rows."""
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(0)
    results = []
    print(f"rawformer {rf.__version__} demo: {rows}x{cols} {dtype}, time = median of 5 after a warm-up")
    header = f"{'op':<22} {'backend':<13} {'shape':<16} {'time ms':>9} {'max err vs ref':>15}"
    print(header)
    print("-" * len(header))
    for case in CASES:
        inputs64 = case.inputs(rng, rows, cols)
        refs = _as_tuple(case.reference(*inputs64))
        for label, xp, impl in backends():
            if impl == "numba" and not case.numba:
                continue
            # float inputs in the demo's dtype; index arrays (block tables, positions) as they are
            args = tuple(xp.asarray(a.astype(dtype) if a.dtype.kind == "f" else a) for a in inputs64)
            sync = (lambda xp=xp: xp.cuda.Device().synchronize()) if xp is not np else (lambda: None)
            outputs = _as_tuple(case.run(*args, impl=impl))
            err = _max_error(outputs, refs)
            ms = _time(lambda case=case, args=args, impl=impl: case.run(*args, impl=impl), sync)
            shape = "x".join(map(str, inputs64[0].shape))
            row = {"op": case.name, "backend": label, "shape": shape, "ms": ms, "max_error": err}
            results.append(row)
            print(f"{case.name:<22} {label:<13} {shape:<16} {ms:9.3f} {err:15.2e}")
    if len(backends()) == 1:
        print("\nNo GPU here: only the NumPy path ran. On a machine with an NVIDIA GPU and the cuda12 or")
        print("cuda13 extra the same command also runs the CUDA and Numba kernels.")
    return results


# ---- the model demo ----------------------------------------------------------------------------------------

# Prompts the bundled model (a small byte-level GPT of the stdlib) continues well under greedy decoding: after
# a bare "def f(n):" or "for ...:" line its greedy choice is indentation, space after space.
PROMPTS = (
    'def fibonacci(n):\n    """',
    "import os\nimport sys\n\n",
    "class Stack:\n    def __init__(self):",
    "# Return the sum of a list\ndef total(",
    "def read_file(path):\n    with open(",
)


@contextlib.contextmanager
def trace_ops() -> Iterator[Counter]:
    """Count calls of the public rawformer ops (and the models' GEMM) while the block runs.

    The models call ops as `rf.<op>` and GEMMs through rawformer.models.common.matmul, looked up at call
    time, so wrapping those attributes sees every call; they are restored on exit."""
    from rawformer import ops
    from rawformer.models import common

    counts: Counter = Counter()
    saved: list[tuple[Any, str, Any]] = []

    def wrap(owner: Any, name: str, label: str) -> None:
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def counted(*a: Any, **k: Any) -> Any:
            counts[label] += 1
            return fn(*a, **k)

        saved.append((owner, name, fn))
        setattr(owner, name, counted)

    for name in ops.__all__:
        if callable(getattr(rf, name, None)):
            wrap(rf, name, name)
    wrap(common, "matmul", "gemm")
    try:
        yield counts
    finally:
        for owner, name, fn in reversed(saved):
            setattr(owner, name, fn)


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def run_model(
    model: Any,
    tokenizer: Any,
    prompts: tuple[str, ...] | list[str] = PROMPTS,
    max_new_tokens: int = 48,
    *,
    stagger: int = 2,
    temperature: float = 0.0,
    out: Any = None,
    name: str = "model",
) -> dict[str, Any]:
    """Run prompts through continuous batching with streamed output and print what happened.

    Parameters
    ----------
    model, tokenizer : a decoder and its tokenizer (encode / decode)
    prompts : texts; request i is added `stagger` * i steps after the first
    max_new_tokens : tokens per request (no early stop at end-of-text: ignore_eos)
    out : where to print (default sys.stdout)

    Returns a dict: tokens_per_s, generated, prompt_tokens, seconds, kv_peak_bytes, kv_contiguous_bytes,
    ops (name -> calls), texts.
    """
    from rawformer.runtime.engine import Engine
    from rawformer.runtime.generate import _model_limit

    out = out or sys.stdout
    limit = _model_limit(model) or 2048
    engine = Engine(
        model,
        tokenizer,
        kv_tokens=len(prompts) * min(limit, 512),
        max_num_seqs=len(prompts),
        max_num_batched_tokens=256,
        name=name,
    )
    pool = engine.pool
    gpu = model.xp is not np
    where = "the GPU" if gpu else "the CPU"
    print(f"rawformer {rf.__version__} demo: {name} on {where} ({np.dtype(model.dtype)})", file=out)
    print(
        f"{len(prompts)} prompts, {max_new_tokens} new tokens each, arriving {stagger} steps apart; "
        "streamed text, [i] = request i:\n",
        file=out,
    )
    pending = list(enumerate(prompts))
    rids: dict[Any, int] = {}
    buf: dict[int, str] = {}
    peak = 0
    step = 0

    def flush(i: int, force: bool = False) -> None:
        text = buf.get(i, "")
        if text and (force or len(text) >= 32 or "\n" in text):
            print(f"  [{i}] {text!r}", file=out)
            buf[i] = ""

    def stream(o: Any) -> None:
        i = rids[o.request_id]
        buf[i] = buf.get(i, "") + o.new_text
        flush(i, force=o.finished)

    finals: dict[int, Any] = {}
    t0 = time.perf_counter()
    with trace_ops() as counts:
        while pending or engine.has_unfinished:
            if pending and step % max(stagger, 1) == 0:
                i, text = pending.pop(0)
                rid = engine.add_request(
                    text, max_new_tokens, temperature=temperature, seed=i, ignore_eos=True, on_output=stream
                )
                rids[rid] = i
            for o in engine.step():
                if o.finished:
                    finals[rids[o.request_id]] = o
            peak = max(peak, pool.stats().blocks_used)
            step += 1
    seconds = time.perf_counter() - t0
    generated = sum(len(o.token_ids) for o in finals.values())
    prompt_tokens = sum(o.prompt_tokens for o in finals.values())
    print("\ncompletions:", file=out)
    for i, text in enumerate(prompts):
        print(f"  [{i}] {text!r} -> {finals[i].text!r}", file=out)
    arena = pool.arena
    kv_peak = peak * arena.block_bytes
    kv_contiguous = len(prompts) * limit * arena.token_bytes
    steps = engine.scheduler.totals["steps"]
    print(
        f"\n{generated} tokens generated ({prompt_tokens} prompt tokens) in {seconds:.2f} s: "
        f"{generated / seconds:.1f} tokens/s over {steps} steps",
        file=out,
    )
    saved = 100 * (1 - kv_peak / kv_contiguous)
    print(
        f"KV cache: peak {peak} blocks of {pool.block_size} tokens = {_mib(kv_peak)}; a contiguous cache "
        f"of {len(prompts)} x {limit} tokens = {_mib(kv_contiguous)} ({saved:.1f}% less paged)",
        file=out,
    )
    where = "CUDA kernels (GEMMs: cuBLAS)" if gpu else "NumPy float64 reference ops (GEMMs: NumPy)"
    print(f"ops that ran ({where}; RAWFORMER_DEBUG=1 prints every kernel launch):", file=out)
    if gpu:
        print(
            "  (calls made from Python; CUDA-graph replays of decode steps run their kernels without it)",
            file=out,
        )
    print("  " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])), file=out)
    return dict(
        tokens_per_s=generated / seconds,
        generated=generated,
        prompt_tokens=prompt_tokens,
        seconds=seconds,
        kv_peak_bytes=kv_peak,
        kv_contiguous_bytes=kv_contiguous,
        ops=dict(counts),
        texts=[finals[i].text for i in range(len(prompts))],
        token_ids=[finals[i].token_ids for i in range(len(prompts))],
    )
