"""Numba CUDA versions of rawformer's fused ops, with explicit `shfl_xor_sync` reductions.

Selected per call with `impl="numba"` on the public ops (rawformer.ops), which validate arguments, lay the
input out as contiguous (rows, cols) CuPy arrays, allocate the outputs and then call one of the functions
below. Every function takes C-contiguous CuPy arrays (Numba reads them through __cuda_array_interface__),
writes its outputs in place and returns None. float16 and float32 storage; arithmetic in float32.

The contract the ops layer calls (module: function(arguments)):

softmax:
    softmax_forward(x, y, scale, log, mask, causal_rows, causal_offset)
        x, y: (rows, cols). y = softmax(scale * x + mask) (log_softmax when log=True).
        mask: None or a (rows, cols) additive array of x's dtype (already broadcast by the caller).
        causal_rows > 0 turns on the causal rule: column j of row r is masked when
        j > (r % causal_rows) + causal_offset. A row with every entry masked gives zeros.
    softmax_backward(dy, y, dx, scale, log)
        softmax:     dx = scale * y * (dy - sum(dy * y))
        log_softmax: dx = scale * (dy - exp(y) * sum(dy))
norms:
    layer_norm_forward(x, residual, weight, bias, y, h, mean, rstd, eps)
        residual/h: None, or (rows, cols): h = x + residual is normalised and written to h.
        weight, bias: (cols,) arrays (the caller passes ones/zeros when the user gave none).
        mean, rstd: (rows,) float32 outputs.
    layer_norm_backward(dy, x, weight, mean, rstd, dx, dweight, dbias)
        dweight, dbias: (cols,) float32 outputs (sums over rows).
    rms_norm_forward(x, residual, weight, y, h, rstd, eps)
    rms_norm_backward(dy, x, weight, rstd, dx, dweight)
activations:
    gelu_forward(x, bias, y, approximate)           bias: None or (cols,); approximate: "tanh" | "none"
    gelu_backward(dy, x, bias, dx, approximate)     dx = dy * gelu'(x + bias); the caller sums dbias
    swiglu_forward(gate, up, y)                     y = silu(gate) * up
    swiglu_backward(dy, gate, up, dgate, dup)
paged_attention:
    paged_attention_forward(q, k_cache, v_cache, block_tables, context_lens, out, scale, num_splits=None)
        q, out: (num_seqs, q_len, q_heads, head_dim); k_cache, v_cache: (num_blocks, block_size, kv_heads,
        head_dim) token-major blocks, block_size in 8..128 (powers of two); kv_heads divides q_heads.
        block_tables int32 (num_seqs, max_blocks), context_lens int32 (num_seqs,) including the q_len new
        tokens. Query token t of sequence s (position context_lens[s] - q_len + t) attends causally to cache
        positions 0..its position: out = softmax(scale * q K^T) V; context 0 gives zeros. One CTA per
        (sequence, kv head, split) for the whole GQA group (`forward_plan` / `run_forward`); num_splits None
        picks split-KV when the (sequence, kv head) CTAs are few against the SMs (float32 partials + a
        log-sum-exp combine kernel), 1 forces one pass.

How the modules are built (beyond the contract):
    _numba.py       the one import site of numba / numba.cuda (NumPy 2.5 `row_stack` workaround first; a
                    RuntimeError naming `pip install 'rawformer[numba]'` without it); the 16-byte vector
                    load/store intrinsics; shfl_xor_sync group reductions; `RowPlan` / `plan_rows`, the
                    row-length rule shared by softmax and norms; CuPy's current stream as a Numba stream.
    softmax.py, norms.py, activations.py
                    kernels made by cached factories over compile-time constants (group size, block size,
                    vector width, vectors per thread, flags), each a Numba dispatcher that specialises per
                    dtype once; `forward_plan` / `backward_plan` show the layout a call will use, and
                    `run_forward` / `run_backward` take an explicit one (tests). The activation launchers
                    also take `vec=` (elements per access) to force a narrower access.
Each module's docstring gives its formulas, variants and selection rule. Every launch goes to CuPy's current
stream; CuPy's arrays are handed to Numba without their exported stream, so Numba never synchronises.
Tests: tests/test_numba_kernels.py (layout rules; the simulator cases of tests/numba_sim_cases.py and the
sm_90 PTX checks of tests/numba_ptx_check.py, each in a subprocess; GPU tests against the references).
"""
