"""The one import site of Numba in rawformer, and the pieces every Numba kernel family shares.

What lives here
---------------
- the import of `numba` / `numba.cuda`, with the NumPy 2.5 workaround applied first (numba-cuda 0.30 registers
  an overload for `np.row_stack`, which NumPy 2.5 removed: `np.row_stack = np.vstack` when it is missing)
  and a RuntimeError naming the extra to install when Numba is absent;
- `load_vec(src, i, dst, j, n)` / `store_vec(dst, i, src, j, n)`: one n-wide global access (16 bytes for
  8 x float16 or 4 x float32) between an array and a float32 `cuda.local.array`. Numba has no vector types for
  global memory, and its array loads carry only the element's alignment, so LLVM never merges them; these two
  are `@intrinsic`s that emit `ld.global.v4.u32` / `st.global.v4.u32` themselves (float16 pairs are split and
  converted with `cvt.f32.f16` / `cvt.rn.f16.f32`). The caller guarantees the alignment (see `vec_width`).
  Under the CUDA simulator they are plain Python loops;
- packed rows (`load_words(src, i, words, e, n)` / `word_get(words, e, like, n)`): the same 16-byte load, but
  the bits are kept as they are in a uint32 `cuda.local.array` (two float16 per register, `per_word`), and
  element e is converted to float32 where it is used. A row held this way needs half the registers of a
  float32 copy, which is what lets a block hold a 32000-column float16 row;
- group reductions (`make_group_reducers`, `make_pair_reducer`): a butterfly of `cuda.shfl_xor_sync` over
  G <= 32 lanes, or over a group of whole warps (warp butterfly, one float per warp through shared memory, a
  second butterfly over the group's warps); the pair version reduces two floats with one round of barriers;
- launch helpers: CuPy's current stream as a Numba stream, SM count, vector width, flattening, launch bounds
  with a minimum of resident blocks (which caps the registers, so the occupancy a launcher plans for holds).

Arrays reach the kernels through `__cuda_array_interface__` (CuPy in production) or as NumPy arrays (the
simulator). CuPy exports its current stream in that interface and Numba would synchronise on it for every
argument of every launch; we launch on that very stream, so `device_view` hands Numba the interface without
the stream entry (ordering is kept by the stream itself, not by a host synchronisation).
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

# numba-cuda 0.30 binds np.row_stack while its CUDA target loads; NumPy 2.5 removed the alias.
if "row_stack" not in vars(np):
    np.row_stack = np.vstack

try:
    import numba  # noqa: F401  (the extra's presence is what we check)
    from numba import cuda
    from numba.cuda import types
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise RuntimeError(
        "the Numba CUDA kernels (impl='numba') need numba and numba-cuda: pip install 'rawformer[numba]'"
    ) from exc

from numba.cuda.core import config as _config  # noqa: E402

SIMULATOR: bool = bool(_config.ENABLE_CUDASIM)  # NUMBA_ENABLE_CUDASIM=1: kernels run as Python threads

float32 = numba.float32
int64 = numba.int64
uint32 = numba.uint32
FULL_MASK = 0xFFFFFFFF
NEG_INF = np.float32(-np.inf)
NAN = np.float32(np.nan)
WARP = 32
MAX_VEC_BYTES = 16  # the widest global access a thread can make


# ----------------------------------------------------------------------------------------------------------
# Vector loads and stores
# ----------------------------------------------------------------------------------------------------------
if SIMULATOR:

    def load_vec(src, i, dst, j, n):  # noqa: D103 - simulator stand-in, same meaning as the intrinsic
        for k in range(n):
            dst[j + k] = float32(src[i + k])

    def store_vec(dst, i, src, j, n):  # noqa: D103
        for k in range(n):
            dst[i + k] = src[j + k]

    def load_words(src, i, words, e, n):  # noqa: D103 - the bits of src[i : i + n] into words
        dtype = np.dtype(src.dtype)
        per = per_word(dtype, n)
        vals = np.array([src[i + k] for k in range(n)], dtype=dtype)
        bits = vals.view(np.uint32) if per == 2 or dtype.itemsize == 4 else vals.view(np.uint16)
        for w in range(len(bits)):
            words[e // per + w] = np.uint32(bits[w])

    def word_get(words, e, like, n):  # noqa: D103 - element e of a packed row as float32
        dtype = np.dtype(like.dtype)
        per = per_word(dtype, n)
        word = np.uint32(words[e // per])
        if dtype.itemsize == 4:
            return np.array([word], np.uint32).view(np.float32)[0]
        half = np.uint16((int(word) >> (16 * (e % per))) & 0xFFFF)
        return np.float32(np.array([half], np.uint16).view(np.float16)[0])

else:
    from llvmlite import ir
    from numba.cuda.extending import intrinsic

    _I16 = ir.IntType(16)
    _I32 = ir.IntType(32)
    _I64 = ir.IntType(64)
    _STORAGE = (types.float16, types.float32)

    def _element_ptr(context, builder, arrty, arr, idxty, idx):
        ary = context.make_array(arrty)(context, builder, arr)
        return builder.gep(ary.data, [context.cast(builder, idx, idxty, types.intp)])

    def _word_ptr(builder, ptr, nbytes):
        # float16 alone is one i16; otherwise the access is one i32 or a <k x i32> vector of nbytes bytes.
        if nbytes == 2:
            return builder.bitcast(ptr, _I16.as_pointer())
        words = nbytes // 4
        ty = _I32 if words == 1 else ir.VectorType(_I32, words)
        return builder.bitcast(ptr, ty.as_pointer())

    def _check_vec_args(mem, idx, buf, off, n):
        return (
            isinstance(n, types.IntegerLiteral)
            and n.literal_value in (1, 2, 4, 8)
            and isinstance(mem, types.Array)
            and mem.dtype in _STORAGE
            and n.literal_value * (mem.dtype.bitwidth // 8) <= MAX_VEC_BYTES
            and isinstance(buf, types.Array)
            and buf.dtype == types.float32
            and isinstance(idx, types.Integer)
            and isinstance(off, types.Integer)
        )

    @intrinsic
    def load_vec(typingctx, src, i, dst, j, n):
        """dst[j : j + n] = float32(src[i : i + n]), one n * itemsize-byte load (aligned by the caller)."""
        if not _check_vec_args(src, i, dst, j, n):
            return None
        count = n.literal_value
        dtype = src.dtype
        nbytes = count * (dtype.bitwidth // 8)

        def codegen(context, builder, sig, args):
            ptr = _word_ptr(
                builder, _element_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1]), nbytes
            )
            raw = builder.load(ptr, align=nbytes)
            if nbytes == 2:
                words, halves = [], [raw]
            else:
                nwords = nbytes // 4
                words = (
                    [raw]
                    if nwords == 1
                    else [builder.extract_element(raw, ir.Constant(_I32, k)) for k in range(nwords)]
                )
                halves = []
            if dtype == types.float32:
                values = [builder.bitcast(w, ir.FloatType()) for w in words]
            else:
                for w in words:  # little endian: the lower half-word is the earlier element
                    halves.append(builder.trunc(w, _I16))
                    halves.append(builder.trunc(builder.lshr(w, ir.Constant(_I32, 16)), _I16))
                # Numba's float16 value type is i16; its cast emits cvt.f32.f16
                values = [context.cast(builder, h, types.float16, types.float32) for h in halves]
            base = _element_ptr(context, builder, sig.args[2], args[2], sig.args[3], args[3])
            for k, v in enumerate(values):
                builder.store(v, builder.gep(base, [ir.Constant(_I64, k)]))
            return context.get_dummy_value()

        return types.void(src, i, dst, j, n), codegen

    @intrinsic
    def store_vec(typingctx, dst, i, src, j, n):
        """dst[i : i + n] = src[j : j + n] (float32 -> dst dtype, round to nearest) with one aligned store."""
        if not _check_vec_args(dst, i, src, j, n):
            return None
        count = n.literal_value
        dtype = dst.dtype
        nbytes = count * (dtype.bitwidth // 8)

        def codegen(context, builder, sig, args):
            base = _element_ptr(context, builder, sig.args[2], args[2], sig.args[3], args[3])
            values = [builder.load(builder.gep(base, [ir.Constant(_I64, k)])) for k in range(count)]
            ptr = _word_ptr(
                builder, _element_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1]), nbytes
            )
            if dtype == types.float32:
                words = [builder.bitcast(v, _I32) for v in values]
            else:
                halves = [context.cast(builder, v, types.float32, types.float16) for v in values]  # i16
                if nbytes == 2:
                    builder.store(halves[0], ptr, align=2)
                    return context.get_dummy_value()
                words = []
                for k in range(0, count, 2):
                    lo = builder.zext(halves[k], _I32)
                    hi = builder.shl(builder.zext(halves[k + 1], _I32), ir.Constant(_I32, 16))
                    words.append(builder.or_(lo, hi))
            if len(words) == 1:
                packed = words[0]
            else:
                packed = ir.Constant(ir.VectorType(_I32, len(words)), ir.Undefined)
                for k, w in enumerate(words):
                    packed = builder.insert_element(packed, w, ir.Constant(_I32, k))
            builder.store(packed, ptr, align=nbytes)
            return context.get_dummy_value()

        return types.void(dst, i, src, j, n), codegen

    def _check_word_args(mem, idx, words, e, n):
        return (
            isinstance(n, types.IntegerLiteral)
            and n.literal_value in (1, 2, 4, 8)
            and isinstance(mem, types.Array)
            and mem.dtype in _STORAGE
            and n.literal_value * (mem.dtype.bitwidth // 8) <= MAX_VEC_BYTES
            and isinstance(words, types.Array)
            and words.dtype == types.uint32
            and isinstance(idx, types.Integer)
            and isinstance(e, types.Integer)
        )

    def _word_index(context, builder, ety, e, per):
        idx = context.cast(builder, e, ety, types.intp)
        return builder.lshr(idx, ir.Constant(idx.type, 1)) if per == 2 else idx

    @intrinsic
    def load_words(typingctx, src, i, words, e, n):
        """The bits of src[i : i + n] into the words that hold elements e .. e + n - 1 of a packed row
        (`per_word` elements per uint32), one n * itemsize-byte load (aligned by the caller)."""
        if not _check_word_args(src, i, words, e, n):
            return None
        count = n.literal_value
        nbytes = count * (src.dtype.bitwidth // 8)
        per = per_word(np.dtype(str(src.dtype)), count)

        def codegen(context, builder, sig, args):
            ptr = _word_ptr(
                builder, _element_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1]), nbytes
            )
            raw = builder.load(ptr, align=nbytes)
            if nbytes == 2:  # one float16 alone in the low half of its word
                values = [builder.zext(raw, _I32)]
            elif nbytes == 4:
                values = [raw]
            else:
                values = [builder.extract_element(raw, ir.Constant(_I32, k)) for k in range(nbytes // 4)]
            ary = context.make_array(sig.args[2])(context, builder, args[2])
            base = builder.gep(ary.data, [_word_index(context, builder, sig.args[3], args[3], per)])
            for k, v in enumerate(values):
                builder.store(v, builder.gep(base, [ir.Constant(_I64, k)]))
            return context.get_dummy_value()

        return types.void(src, i, words, e, n), codegen

    @intrinsic
    def word_get(typingctx, words, e, like, n):
        """Element e of a packed row (loaded from arrays of `like`'s dtype, n per load) as float32."""
        if not _check_word_args(like, e, words, e, n):
            return None
        per = per_word(np.dtype(str(like.dtype)), n.literal_value)
        is_half = like.dtype == types.float16

        def codegen(context, builder, sig, args):
            ary = context.make_array(sig.args[0])(context, builder, args[0])
            word = builder.load(
                builder.gep(ary.data, [_word_index(context, builder, sig.args[1], args[1], per)])
            )
            if not is_half:
                return builder.bitcast(word, ir.FloatType())
            if per == 2:  # the odd element is the upper half (little endian)
                e64 = context.cast(builder, args[1], sig.args[1], types.int64)
                shift = builder.shl(builder.and_(e64, ir.Constant(_I64, 1)), ir.Constant(_I64, 4))
                word = builder.lshr(word, builder.trunc(shift, _I32))
            return context.cast(builder, builder.trunc(word, _I16), types.float16, types.float32)

        return types.float32(words, e, like, n), codegen


def per_word(dtype: Any, n: int) -> int:
    """Elements of a packed row per uint32 word: 2 for float16 read at least 2 at a time, else 1 (a float32
    is one word; a float16 read alone sits in the low half of its own word)."""
    return 2 if np.dtype(dtype).itemsize == 2 and n >= 2 else 1


def jit_kernel(max_threads: int, min_blocks: int = 1) -> Any:
    """`cuda.jit` for a kernel launched with at most `max_threads` threads per block (the bound lets the
    compiler size registers for 1024-thread blocks); `min_blocks` > 1 asks for that many resident blocks per
    SM, which caps the registers at 65536 / (max_threads * min_blocks) (the launcher sizes its grid for that
    occupancy). The simulator's `jit` takes no launch bounds."""
    if SIMULATOR:
        return cuda.jit
    return cuda.jit(launch_bounds=max_threads if min_blocks <= 1 else (max_threads, min_blocks))


# ----------------------------------------------------------------------------------------------------------
# Reductions over a row group: G consecutive lanes of a warp (G <= 32), or G consecutive threads that are
# whole warps of the block (G a multiple of 32 dividing the block; G = block is block-per-row)
# ----------------------------------------------------------------------------------------------------------
@cuda.jit(device=True)
def max_nan(a, b):
    """max that propagates NaN whichever side it is on (so every lane of a butterfly agrees, and a NaN
    makes its row NaN as in NumPy)."""
    return a if (a > b or a != a) else b


def _check_group(group: int, block: int) -> None:
    if group & (group - 1) or not 1 <= group <= block or block % group:
        raise ValueError(f"group of {group} threads in a block of {block}: need a power of two dividing it")
    if block % WARP and group != block:  # (a group of more than a warp is whole warps already)
        raise ValueError(f"block of {block} threads must be whole warps")


@functools.cache
def make_group_reducers(group: int, block: int) -> tuple[Any, Any]:
    """(group_sum, group_max) device functions for groups of `group` threads in blocks of `block` threads.

    Both take (value, scratch) and return the reduction in every thread of the group; `scratch` is a float32
    shared array of at least 32 entries (used only when the group spans several warps). Every thread of the
    block must call them, the same number of times (they contain shuffles over the full warp mask and, for
    multi-warp groups, `syncthreads`). Every thread of a group gets bit-identical results.
    """
    _check_group(group, block)
    first = min(group, WARP) // 2  # the widest butterfly step inside one warp
    gwarps = max(1, group // WARP)  # warps per group

    @cuda.jit(device=True)
    def warp_sum(v):
        off = first
        while off > 0:
            v += cuda.shfl_xor_sync(FULL_MASK, v, off)
            off //= 2
        return v

    @cuda.jit(device=True)
    def warp_max(v):
        off = first
        while off > 0:
            v = max_nan(v, cuda.shfl_xor_sync(FULL_MASK, v, off))
            off //= 2
        return v

    if group <= WARP:

        @cuda.jit(device=True)
        def group_sum(v, scratch):
            return warp_sum(v)

        @cuda.jit(device=True)
        def group_max(v, scratch):
            return warp_max(v)

        return group_sum, group_max

    @cuda.jit(device=True)
    def across_warps(v, scratch, pad):
        # one value per warp into scratch; each warp then reads its group's entries (pad for the rest)
        lane = cuda.threadIdx.x % WARP
        warp = cuda.threadIdx.x // WARP
        cuda.syncthreads()  # earlier readers of scratch are done
        if lane == 0:
            scratch[warp] = v
        cuda.syncthreads()
        return scratch[warp - warp % gwarps + lane] if lane < gwarps else pad

    @cuda.jit(device=True)
    def group_sum(v, scratch):
        return warp_sum(across_warps(warp_sum(v), scratch, float32(0)))

    @cuda.jit(device=True)
    def group_max(v, scratch):
        return warp_max(across_warps(warp_max(v), scratch, NEG_INF))

    return group_sum, group_max


@functools.cache
def make_pair_reducer(group: int, block: int) -> Any:
    """group_sum2(a, b, scratch) -> (sum a, sum b) over a group (as `make_group_reducers`), both with one
    round of barriers; `scratch` is a float32 shared array of at least 64 entries."""
    _check_group(group, block)
    first = min(group, WARP) // 2
    gwarps = max(1, group // WARP)

    @cuda.jit(device=True)
    def warp_sum2(a, b):
        off = first
        while off > 0:
            a += cuda.shfl_xor_sync(FULL_MASK, a, off)
            b += cuda.shfl_xor_sync(FULL_MASK, b, off)
            off //= 2
        return a, b

    if group <= WARP:

        @cuda.jit(device=True)
        def group_sum2(a, b, scratch):
            return warp_sum2(a, b)

        return group_sum2

    @cuda.jit(device=True)
    def group_sum2(a, b, scratch):
        a, b = warp_sum2(a, b)
        lane = cuda.threadIdx.x % WARP
        warp = cuda.threadIdx.x // WARP
        cuda.syncthreads()
        if lane == 0:
            scratch[2 * warp] = a
            scratch[2 * warp + 1] = b
        cuda.syncthreads()
        a = float32(0)
        b = float32(0)
        if lane < gwarps:
            src = 2 * (warp - warp % gwarps + lane)
            a = scratch[src]
            b = scratch[src + 1]
        return warp_sum2(a, b)

    return group_sum2


# ----------------------------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------------------------
class _DeviceView:
    """A CuPy array's `__cuda_array_interface__` without its `stream` entry (see the module docstring)."""

    __slots__ = ("__cuda_array_interface__", "_owner")

    def __init__(self, a: Any) -> None:
        desc = dict(a.__cuda_array_interface__)
        desc.pop("stream", None)
        self.__cuda_array_interface__ = desc
        self._owner = a  # keeps the memory alive while Numba holds the view


def flat(a: Any) -> Any:
    """`a` (C-contiguous) as a 1-D array for a kernel: a NumPy view in the simulator, else a stream-less
    device view of the CuPy array."""
    a1 = a.reshape(-1)
    return a1 if isinstance(a1, np.ndarray) else _DeviceView(a1)


def device_array_like(a: Any, shape: tuple[int, ...], dtype: Any) -> Any:
    """A new uninitialised array on `a`'s side (CuPy for CuPy inputs, NumPy in the simulator)."""
    if isinstance(a, np.ndarray):
        return np.empty(shape, dtype)
    return sys.modules["cupy"].empty(shape, dtype)


def data_ptr(a: Any) -> int:
    if isinstance(a, np.ndarray):
        return int(a.__array_interface__["data"][0])
    return int(a.__cuda_array_interface__["data"][0])


def vec_width(divides: tuple[int, ...], *arrays: Any) -> int:
    """The widest access, in elements, that every array's base pointer is aligned to (n * its itemsize
    bytes), that divides every length in `divides` (so a vector never straddles a row) and that keeps every
    access within 16 bytes. None entries are skipped."""
    arrays = tuple(a for a in arrays if a is not None)
    n = MAX_VEC_BYTES // max(a.dtype.itemsize for a in arrays)
    while n > 1:
        if all(d % n == 0 for d in divides) and all(
            data_ptr(a) % (n * a.dtype.itemsize) == 0 for a in arrays
        ):
            return n
        n //= 2
    return 1


_streams: dict[tuple[int, int], Any] = {}


def current_stream(a: Any) -> Any:
    """The Numba stream for CuPy's current stream (cached per device and handle); 0 in the simulator."""
    if SIMULATOR or isinstance(a, np.ndarray):
        return 0
    cp = sys.modules["cupy"]
    ptr = cp.cuda.get_current_stream().ptr
    key = (cp.cuda.runtime.getDevice(), ptr)
    stream = _streams.get(key)
    if stream is None:
        # handle 0 is the legacy default stream, which is what CuPy's null stream is
        stream = cuda.legacy_default_stream() if ptr == 0 else cuda.external_stream(ptr)
        _streams[key] = stream
    return stream


@functools.cache
def _sm_count(device: int) -> int:
    cp = sys.modules["cupy"]
    return int(cp.cuda.runtime.getDeviceProperties(device)["multiProcessorCount"])


def sm_count(a: Any) -> int:
    """Multiprocessors of `a`'s device (2 in the simulator, whose grids are tiny)."""
    if SIMULATOR or isinstance(a, np.ndarray):
        return 2
    return _sm_count(sys.modules["cupy"].cuda.runtime.getDevice())


def launch(kernel: Any, grid: int | tuple[int, int], block: int, stream: Any, *args: Any) -> None:
    """Launch a Numba kernel on a 1-D or 2-D grid; errors name the kernel. Empty grids are skipped."""
    if min(grid if isinstance(grid, tuple) else (grid,)) <= 0:
        return
    try:
        kernel[grid, block, stream](*args)
    except Exception as exc:
        name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "py_func", None), "__name__", "?")
        raise RuntimeError(f"Numba kernel {name} grid={grid} block={block} failed: {exc}") from exc


# ----------------------------------------------------------------------------------------------------------
# How a row op maps rows onto threads
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RowPlan:
    """The launch shape of a row kernel.

    mode "regs": a group of `group` threads owns a row and keeps it in registers: thread t holds `packs`
    vectors of `vec` elements, vector p covering columns [(p * group + t) * vec, ... + vec) (consecutive
    threads read consecutive 16-byte chunks, so a warp's access is coalesced). A block of `block` threads
    holds block // group rows at once: group <= 32 is warp-per-row and sub-warp-per-row, group == block is
    block-per-row (the norm backward also puts several multi-warp groups in one block).
    mode "loop": one block of `block` threads per row, looping over the row in vec-wide steps (rows too long
    for registers); the row is read again for the output pass (from L2 for all but the longest rows).
    mode "cols" (norm backward only): per-row constants from a kernel of `group` threads per row, then a
    column-slab kernel in blocks of `block` threads (one column vector per thread); see norms.py.
    """

    mode: str
    group: int
    block: int
    vec: int
    packs: int = 0

    @property
    def rows_per_block(self) -> int:
        return self.block // self.group

    @property
    def items(self) -> int:
        return self.vec * self.packs


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def plan_rows(
    cols: int, vec: int, warp_items: int, block_tiers: tuple[tuple[int, int], ...], warp_block: int = 128
) -> RowPlan:
    """Pick the row layout for rows of `cols` elements read `vec` at a time.

    Up to 32 * warp_items columns: a group of up to 32 lanes per row (as many lanes as the row has vectors,
    rounded up to a power of two, so short rows do not leave most of a warp idle), warp_block threads per
    block. Else the first (threads, items) of `block_tiers` (rising capacity) with threads * items >= cols:
    one block of that many threads per row. Longer rows: the looped block-per-row kernel (512 threads).
    Items are elements per thread (for a packed row, registers times `per_word`).
    """
    nvec = -(-cols // vec)
    if cols <= WARP * warp_items:
        group = min(WARP, next_pow2(nvec))
        return RowPlan("regs", group, max(warp_block, group), vec, -(-nvec // group))
    for threads, items in block_tiers:
        if cols <= threads * items:
            return RowPlan("regs", threads, threads, vec, -(-nvec // threads))
    return RowPlan("loop", 512, 512, vec)


def min_blocks(plan: RowPlan) -> int:
    """Resident blocks per SM a block-group kernel is compiled for: 1024 threads per SM, so at most 64
    registers per thread (enough for every register budget used here, and two rows per SM even at 512
    threads). Warp-group kernels in 128-thread blocks keep the compiler's choice (up to 32 floats per
    thread there, which would spill under a 64-register cap)."""
    return 1 if plan.group <= WARP and plan.block <= 128 else max(1, 1024 // plan.block)
