"""One tolerance table for every kernel test: max relative error against the float64 reference.

The error is measured as max|out - ref| / max(max|ref|, tiny) per array, or elementwise with `assert_close`.
float16 outputs carry a rounding error of 2**-11 relative on their own; 2e-3 leaves room for fp32
accumulation order. float32 at 1e-5 is the issue's acceptance bar.
"""

from __future__ import annotations

import numpy as np

from rawformer import backend

# float16 results below 2**-14 are subnormal, spaced 2**-24 apart: rounding alone can miss by half of that
SUBNORMAL_FLOOR = {np.dtype(np.float16): 2.0**-24, np.dtype(np.float32): 0.0, np.dtype(np.float64): 0.0}
RTOL = {np.dtype(np.float16): 2e-3, np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}
# absolute floor, relative to the largest reference magnitude, for entries near zero
ATOL_SCALE = {np.dtype(np.float16): 2e-3, np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}


def assert_close(out, ref, dtype=None, name="output", rtol=None, scale=None):
    """`out` (any array kind) matches the float64 `ref` within the dtype's tolerance; NaN never passes
    unless the reference has NaN in the same place.

    `scale`: the magnitude of the terms the result was computed from, when it is larger than the result
    itself (a gradient that cancels to ~0, log_softmax of a single column); the absolute floor is then
    relative to it instead of to max|ref|, since rounding errors scale with the terms, not their sum."""
    out = backend.to_numpy(out).astype(np.float64)
    ref = np.asarray(backend.to_numpy(ref), dtype=np.float64)
    dtype = np.dtype(dtype if dtype is not None else out.dtype)
    assert out.shape == ref.shape, f"{name}: shape {out.shape} != reference {ref.shape}"
    ref_nan = np.isnan(ref)
    assert np.array_equal(np.isnan(out), ref_nan), f"{name}: NaN where the reference has none (or not)"
    finite = ~ref_nan
    if not finite.any():
        return
    o, r = out[finite], ref[finite]
    inf = np.isinf(r)
    assert np.array_equal(o[inf], r[inf]), f"{name}: infinities differ from the reference"
    o, r = o[~inf], r[~inf]
    if r.size == 0:
        return
    tol = RTOL[dtype] if rtol is None else rtol
    scale = max(float(np.max(np.abs(r))), 1e-30, float(scale or 0.0))
    err = np.abs(o - r)
    bound = tol * np.abs(r) + ATOL_SCALE[dtype] * scale + SUBNORMAL_FLOOR[dtype]
    worst = int(np.argmax(err - bound))
    assert np.all(err <= bound), (
        f"{name}: max error {err.max():.3e} (relative to max|ref| {err.max() / scale:.3e}) exceeds tolerance "
        f"{tol:g} for {dtype}; worst at flat index {worst}: out={o[worst]!r} ref={r[worst]!r}"
    )


def poison(xp, shape, dtype):
    """An output buffer full of NaN, so an unwritten element fails the comparison."""
    return xp.full(shape, np.nan, dtype=dtype)


def poison_pool(cp, nbytes=1 << 26):
    """Fill memory CuPy's pool hands out next with NaN, so an output element an op never writes shows (for
    ops that allocate their own outputs)."""
    junk = cp.full(nbytes // 4, np.nan, dtype=np.float32)
    del junk


def assert_written_close(y, want, dtype):
    """Every element of `y` written (no NaN left from poison_pool) and within the dtype's tolerance."""
    got = backend.to_numpy(y).astype(np.float64)
    assert np.isfinite(got).all(), "an output element was not written (poisoned NaN)"
    assert_close(got, want, dtype)
