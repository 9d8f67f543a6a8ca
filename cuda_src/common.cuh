// common.cuh: what every rawformer kernel family shares.
//
//   - float conversion for the storage types (__half, float, double); all arithmetic is done in float
//     (double for double inputs) whatever the storage type
//   - Vec<T, N>: N elements loaded or stored as one aligned access (16 bytes when N * sizeof(T) == 16)
//   - warp_reduce / block_reduce: butterfly reductions over cooperative-groups tiles (shfl_xor), then
//     across warps through shared memory; every thread receives the result
//   - ceil_div
//
// Compiled by NVRTC at run time (through CuPy) and by nvcc in the CI compile check, so it includes only
// CUDA headers that NVRTC ships.
#pragma once

#include <cooperative_groups.h>
#include <cuda_fp16.h>

namespace cg = cooperative_groups;

// NVRTC (how rawformer compiles at run time) has no <cmath>, so no INFINITY / NAN macros; nvcc (CI's compile
// check) has them. Device code gets the same IEEE values either way.
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
#ifndef NAN
#define NAN __int_as_float(0x7fffffff)
#endif

namespace rf {

constexpr int kWarp = 32;

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// ---- storage <-> compute types -------------------------------------------------------------------------
template <typename T> struct Acc { using type = float; };  // the type a T is computed in
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename T> __device__ __forceinline__ T from_acc(float v);
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <typename T> __device__ __forceinline__ T from_acc(double v);
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }

// ---- vector access -------------------------------------------------------------------------------------
template <typename T, int N> struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N> __device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <typename T, int N> __device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& x) {
  *reinterpret_cast<Vec<T, N>*>(p) = x;
}

// ---- reductions ----------------------------------------------------------------------------------------
struct Sum {
  template <typename A> __device__ __forceinline__ A operator()(A a, A b) const { return a + b; }
};
struct Max {
  // fmax ignores a NaN operand; a NaN in a softmax row still reaches the output through the sum of exps.
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
  __device__ __forceinline__ double operator()(double a, double b) const { return fmax(a, b); }
};

// Butterfly reduction over a tile of WIDTH lanes; every lane gets the result.
template <int WIDTH = kWarp, typename A, typename Op>
__device__ __forceinline__ A warp_reduce(A v, Op op) {
  const cg::thread_block_tile<WIDTH> tile = cg::tiled_partition<WIDTH>(cg::this_thread_block());
#pragma unroll
  for (int offset = WIDTH / 2; offset > 0; offset >>= 1) v = op(v, tile.shfl_xor(v, offset));
  return v;
}

// Reduction over a whole block of THREADS threads (a power of two, at least 32); every thread gets the
// result. `scratch` holds at least THREADS / 32 values; it may be reused once the call returns (the
// trailing sync protects it).
template <int THREADS, typename A, typename Op>
__device__ __forceinline__ A block_reduce(A v, Op op, A* scratch) {
  static_assert(THREADS >= kWarp && (THREADS & (THREADS - 1)) == 0, "block size: a power of two >= 32");
  constexpr int kWarps = THREADS / kWarp;
  v = warp_reduce(v, op);
  if constexpr (kWarps == 1) {
    return v;
  } else {
    const cg::thread_block block = cg::this_thread_block();
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
    if (lane == 0) scratch[warp] = v;
    block.sync();
    // Every warp reduces the kWarps partials in its first kWarps lanes, then lane 0 broadcasts.
    A r = scratch[lane % kWarps];
    r = warp_reduce<kWarps>(r, op);
    r = cg::tiled_partition<kWarp>(block).shfl(r, 0);
    block.sync();
    return r;
  }
}

}  // namespace rf

// ==== async copies and tensor-core fragments (sm_80+): the attention and paged_attention families ======
// Generic wrappers over PTX, usable by any family: cp.async 16-byte copies global -> shared (with zero
// fill when the predicate is false), ldmatrix (x4, plain and transposed) and mma.sync m16n8k16 with fp16
// inputs and fp32 accumulators. Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16"), with
// g = lane / 4 and c = lane % 4:
//   A 16x16 row-major, 4 b32 regs of 2 halves: a0 (row g, cols 2c..2c+1), a1 (row g+8, cols 2c..),
//     a2 (row g, cols 2c+8..), a3 (row g+8, cols 2c+8..)
//   B 16x8 "col" (element (k, n) with k contiguous), 2 regs: b0 (k 2c..2c+1, col g), b1 (k 2c+8.., col g)
//   C/D 16x8 fp32, 4 regs: c0 (row g, col 2c), c1 (row g, col 2c+1), c2 (row g+8, col 2c), c3 (g+8, 2c+1)
//   ldmatrix x4: lanes 8i..8i+7 give the row addresses (16 bytes each) of matrix i; matrix i lands in
//     register i, lane l holding row l/4, elements 2(l%4), 2(l%4)+1 (with .trans: the transposed matrix,
//     i.e. rows 2(l%4), 2(l%4)+1 of column l/4).
namespace rf {

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, bypassing L1; when !pred the destination is zero-filled and nothing is read.
// .L2::256B: let L2 fetch the surrounding 256 bytes from DRAM in one go (a warp's copies cover whole rows).
// Each wrapper takes a shared-memory address (from smem_addr) or a pointer into shared memory.
__device__ __forceinline__ void cp_async_16(unsigned smem_dst, const void* gmem_src, bool pred) {
  const int src_bytes = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;\n" ::"r"(smem_dst), "l"(gmem_src),
               "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool pred) {
  cp_async_16(smem_addr(smem_dst), gmem_src, pred);
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Wait until at most N committed groups of this thread are still in flight.
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], unsigned smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_row));
}
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* smem_row) {
  ldmatrix_x4(r, smem_addr(smem_row));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], unsigned smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_row));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* smem_row) {
  ldmatrix_x4_trans(r, smem_addr(smem_row));
}

// d += a * b for one m16n8k16 tile: fp16 A (4 regs) and B (2 regs), fp32 accumulators (4 floats).
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const unsigned (&a)[4], unsigned b0,
                                             unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats rounded to fp16 and packed as one b32 register (lo in the low half: the lower column/k index).
__device__ __forceinline__ unsigned pack_half2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const unsigned*>(&h);
}

}  // namespace rf

// ==== programmatic dependent launch (sm_90+): the decode-step kernels ======================================
// A kernel launched with the programmatic-stream-serialization attribute (rawformer.kernels.launch with
// pdl=True) may start while the kernel before it on the stream is still running, once every CTA of that one
// has called launch_dependents (or exited). Until its own pdl_wait() returns it may only read memory nothing
// in flight writes (weights) and must not write anything: pdl_wait() blocks until the previous grid has
// completed and its writes are visible. Launched normally, or below sm_90, both are no-ops, so a kernel
// stays correct however it is launched. Decode steps are chains of short kernels; this overlaps one's
// launch and first weight loads with the tail of the one before.
namespace rf {

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// `p` again, through a volatile asm after which the compiler cannot move loads that depend on the result:
// read what the previous kernel writes through rf::after_pdl_wait(p), called after pdl_wait(). (A load
// through a const __restrict__ pointer, or __ldg's "invariant" load, may otherwise be hoisted above the
// wait's memory clobber.)
template <typename T> __device__ __forceinline__ const T* after_pdl_wait(const T* p) {
  const T* q;
  asm volatile("mov.b64 %0, %1;" : "=l"(q) : "l"(p) : "memory");
  return q;
}

__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

}  // namespace rf
