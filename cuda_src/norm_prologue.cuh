// norm_prologue.cuh: the RMSNorm (and its residual add) of a decode GEMV's input, computed inside the GEMV.
//
// A Llama decode step normalises the residual stream before each projection (rf.add_rms_norm, then
// rf.linear). At one token both are latency-bound: the norm alone is a launch plus three dependent memory
// round trips. A GEMV with this prologue takes the pre-norm stream instead: every CTA normalises the rows
// itself (K is the hidden size, a few thousand elements read from L2: cheaper than a launch) into shared
// memory and reads its dot products' input from there.
//
//     s = x + a (rounded to T; a null: s = x),  h = s * rsqrt(sum(s^2) / K + eps) * ln_w (rounded to T)
//
// The rounding points are rf.add_rms_norm's (norms.cu): s is rounded to T and the float32 sum of squares
// taken of the rounded s, h is rounded to T before the products; only the order of the float32 sum
// differs. The partial sums of the block's warps are added in a fixed order, so every CTA gets the same
// rstd bit for bit. CTA 0 alone writes s to s_out (the updated residual stream; never x itself, which
// other CTAs are still reading).
//
// Call from every thread of the block, once, after rf::pdl_wait() (x and a are the previous kernels'
// outputs). It synchronises the block twice. x, a, s_out rows, ln_w and hs 16-byte aligned; K a multiple
// of VW = 16 / sizeof(T).

#pragma once

#include "common.cuh"

namespace rf {

// hs [m_rows][K] (shared memory) <- h; partial: the caller's __shared__ float [THREADS / 32][M].
template <typename T, int M, int VW, int THREADS>
__device__ __forceinline__ void stage_rms_norm(const T* __restrict__ x, int ldx, const T* __restrict__ a,
                                               int lda, const T* __restrict__ ln_w, T* __restrict__ s_out,
                                               int lds, int m_rows, int K, float eps, T* hs,
                                               float (*partial)[M]) {
  constexpr int kWarps = THREADS / 32;
  const int nvec = K / VW;
  const bool write_s = a != nullptr && s_out != nullptr && blockIdx.x == 0;
  float ss[M];
#pragma unroll
  for (int m = 0; m < M; ++m) {
    ss[m] = 0.0f;
    if (m < m_rows) {
#pragma unroll 1  // (unrolled, these loops cost ~16 registers: the callers' M = 1 kernels then spill)
      for (int i = threadIdx.x; i < nvec; i += THREADS) {
        Vec<T, VW> v = load_vec<T, VW>(x + (size_t)m * ldx + i * VW);
        if (a != nullptr) {  // s = x + a rounded to T, as rf.add_rms_norm writes it
          const Vec<T, VW> av = load_vec<T, VW>(a + (size_t)m * lda + i * VW);
#pragma unroll
          for (int j = 0; j < VW; ++j) v.v[j] = from_acc<T>(to_acc(v.v[j]) + to_acc(av.v[j]));
          if (write_s) store_vec<T, VW>(s_out + (size_t)m * lds + i * VW, v);
        }
#pragma unroll
        for (int j = 0; j < VW; ++j) {
          const float f = to_acc(v.v[j]);
          ss[m] = fmaf(f, f, ss[m]);
        }
        store_vec<T, VW>(hs + (size_t)m * K + i * VW, v);
      }
    }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int m = 0; m < M; ++m) ss[m] = warp_reduce(ss[m], Sum());
  if (lane == 0) {
#pragma unroll
    for (int m = 0; m < M; ++m) partial[warp][m] = ss[m];
  }
  __syncthreads();
#pragma unroll
  for (int m = 0; m < M; ++m) {
    if (m < m_rows) {
      float total = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) total += partial[w][m];  // a fixed order: the same rstd in every CTA
      const float rstd = rsqrtf(total / K + eps);
#pragma unroll 1
      for (int i = threadIdx.x; i < nvec; i += THREADS) {  // the vectors this thread staged itself
        Vec<T, VW> v = load_vec<T, VW>(hs + (size_t)m * K + i * VW);
        Vec<T, VW> g;
        if (ln_w != nullptr) g = load_vec<T, VW>(ln_w + i * VW);
#pragma unroll
        for (int j = 0; j < VW; ++j) {
          const float gj = ln_w != nullptr ? to_acc(g.v[j]) : 1.0f;
          v.v[j] = from_acc<T>(to_acc(v.v[j]) * rstd * gj);
        }
        store_vec<T, VW>(hs + (size_t)m * K + i * VW, v);
      }
    }
  }
  __syncthreads();  // every row of h staged before any warp reads it
}

}  // namespace rf
