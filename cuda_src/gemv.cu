// gemv.cu: y = x @ W (+ bias) for a few rows of x (a batch-1 decode step), streaming W once.
//
// At one token per sequence a projection reads every weight once and does 2 FLOPs per weight element: the
// GEMV is bound by memory bandwidth (and, for the 8-25 MB matrices of a 1B decoder, by each kernel's fixed
// launch / ramp / tail latency). One kernel, gemv_nk, streams W [N, K] rows with many 16-byte loads in
// flight and starts its first loads before the previous kernel has finished (programmatic dependent launch,
// common.cuh). A split-K kernel for W [K, N] (rows of outputs spread over lanes) was measured and removed:
// 35-60% of copy on those shapes and 580 GB/s at K = 11008 (bench/results/h100/decode_profile_*.json).
//
// Memory layout: x [m_rows, K] with row stride ldx; out [m_rows, N] with row stride ldo; bias [N] or null;
// all of T (__half or float), accumulation in float32.
//
//   gemv_nk<T, M, ROWS, UNROLL, DUAL>   W [N, K] row-major with row stride ldw: `x @ W.T`, the layout of
//       HF's nn.Linear weights (out, in), which the models keep (they hand rf.linear the transposed view),
//       and of the lm head `x @ wte.T`. A warp per ROWS output columns: lanes stride over K with 16-byte
//       loads, UNROLL per row in flight, then a warp-shuffle sum; no shared memory, no cross-CTA reduction.
//       x is read through L1 (the same few rows for every warp). DUAL: a second matrix W2 of W's shape read
//       by the same warp, and the epilogue writes silu(x@W.T + b) * (x@W2.T + b2): the gate / up
//       projections and SwiGLU of a Llama MLP in one pass.
//
//   gemv_nk_norm<T, M, ROWS, UNROLL, DUAL>   the same GEMV (the same body, gemv_rows<..., NORM = true>, in
//       a kernel of its own for its register cap) whose input is the pre-norm residual stream of a Llama
//       block: rf.add_rms_norm_linear, the RMSNorm and its residual add fused into the GEMV's prologue, one
//       launch instead of add_rms_norm + gemv. x [m_rows, K] is the residual stream, a [m_rows, K] (row
//       stride lda) the branch output to add, or null (no add), ln_w [K] the norm's scale (null: 1):
//           s = x + a (rounded to T),  h = s * rsqrt(sum(s^2) / K + eps) * ln_w (rounded to T),  y = h @ W.T
//       The rounding points are those of rf.add_rms_norm (norms.cu) followed by rf.linear: s is rounded to T
//       and the sum of squares taken of the rounded s in float32; h is rounded to T before the products;
//       only the order of the float32 sum of squares differs (fused == unfused within fp16 tolerance).
//       Every CTA normalises the rows itself (K is a few thousand elements, read from L2: cheaper than a
//       launch): after the first group of weight loads has been issued and rf::pdl_wait() has returned,
//       the block loads x (+ a), stages s in dynamic shared memory ([m_rows][K] of T), reduces the sums of
//       squares (warp shuffles, then the kWarps partials summed in a fixed order, so every CTA gets the
//       same rstd bit for bit), rewrites the staging buffer as h and syncs; the GEMV then reads h from
//       shared memory instead of x from global. CTA 0 alone writes s to s_out [m_rows, K] (row stride lds),
//       the updated residual stream (never x itself: other CTAs are still reading x). With NORM no warp
//       returns early (all of them take part in the block's reduction), and the K loop's trip count is
//       the same for every thread of the block (the syncs sit in its first iteration).
//
// M (1, 2, 4, 8) is the compiled row count; m_rows <= M rows are real (the rest neither read nor written).
// Requirements (the launcher checks them, else it uses cuBLAS): K and ldw multiples of VW = 16 / sizeof(T),
// 16-byte aligned W, x rows 16-byte aligned; with NORM also a rows, lda, ldx, lds, ln_w and s_out 16-byte
// aligned, and m_rows * K * sizeof(T) bytes of dynamic shared memory (the launcher keeps it <= 48 KB).

#include "common.cuh"
#include "norm_prologue.cuh"

namespace gemv {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;

template <typename T> struct VecOf;
template <> struct VecOf<__half> { static constexpr int n = 8; };
template <> struct VecOf<float> { static constexpr int n = 4; };

template <typename T, int VW>
__device__ __forceinline__ void load_floats(const T* p, float (&v)[VW]) {
  const rf::Vec<T, VW> raw = rf::load_vec<T, VW>(p);
#pragma unroll
  for (int i = 0; i < VW; ++i) v[i] = rf::to_acc(raw.v[i]);
}

__device__ __forceinline__ float silu(float g) { return g / (1.0f + __expf(-g)); }

// The body of both kernels (NORM: gemv_nk_norm's prologue); returns early only without NORM.
template <typename T, int M, int ROWS, int UNROLL, bool DUAL, bool NORM>
__device__ __forceinline__ void gemv_rows(const T* __restrict__ x, int ldx, const T* __restrict__ w,
                                          const T* __restrict__ w2, int ldw, const T* __restrict__ bias,
                                          const T* __restrict__ bias2, T* __restrict__ out, int ldo,
                                          int m_rows, int K, int N, const T* __restrict__ a, int lda,
                                          const T* __restrict__ ln_w, T* __restrict__ s_out, int lds,
                                          float eps) {
  constexpr int VW = VecOf<T>::n;
  constexpr int NW = DUAL ? 2 : 1;
  constexpr int STEP = 32 * VW * UNROLL;  // elements of K one iteration covers per warp
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n0 = (blockIdx.x * kWarps + warp) * ROWS;
  if constexpr (!NORM) {
    if (n0 >= N) return;
  }
  extern __shared__ __align__(16) unsigned char gemv_smem[];
  T* hs = reinterpret_cast<T*>(gemv_smem);  // NORM: h [m_rows][K]
  __shared__ float partial[NORM ? kWarps : 1][M];
  float acc[NW][ROWS][M];
#pragma unroll
  for (int j = 0; j < NW; ++j)
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
      for (int m = 0; m < M; ++m) acc[j][r][m] = 0.0f;

  rf::pdl_launch_dependents();
  bool waited = false;  // the first weight loads are issued before waiting for the kernel that writes x
  // NORM: the same trip count for every thread of the block (the prologue's syncs sit in the first pass)
  for (int kb = lane * VW; NORM ? kb - lane * VW < K : kb < K; kb += STEP) {
    rf::Vec<T, VW> wv[NW][ROWS][UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {  // every weight load of the group before any FMA
      const int k = kb + u * 32 * VW;
#pragma unroll
      for (int r = 0; r < ROWS; ++r)
        if (k < K && n0 + r < N) {
          wv[0][r][u] = rf::load_vec<T, VW>(w + (size_t)(n0 + r) * ldw + k);
          if constexpr (DUAL) wv[NW - 1][r][u] = rf::load_vec<T, VW>(w2 + (size_t)(n0 + r) * ldw + k);
        }
    }
    if (!waited) {
      rf::pdl_wait();
      waited = true;
      x = rf::after_pdl_wait(x);  // x's loads stay after the wait (common.cuh)
      if constexpr (NORM)
        rf::stage_rms_norm<T, M, VW, kThreads>(x, ldx, rf::after_pdl_wait(a), lda, ln_w, s_out, lds, m_rows, K,
                                               eps, hs, partial);
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int k = kb + u * 32 * VW;
      if (k < K) {
#pragma unroll
        for (int m = 0; m < M; ++m) {
          if (m < m_rows) {
            float xv[VW];
            if constexpr (NORM) {
              load_floats<T, VW>(hs + (size_t)m * K + k, xv);
            } else {
              load_floats<T, VW>(x + (size_t)m * ldx + k, xv);
            }
#pragma unroll
            for (int j = 0; j < NW; ++j)
#pragma unroll
              for (int r = 0; r < ROWS; ++r)
                if (n0 + r < N)
#pragma unroll
                  for (int i = 0; i < VW; ++i)
                    acc[j][r][m] = fmaf(xv[i], rf::to_acc(wv[j][r][u].v[i]), acc[j][r][m]);
          }
        }
      }
    }
  }
  if (!waited) rf::pdl_wait();  // before the first write (K == 0: the launcher never asks for NORM then)
  if (n0 >= N) return;  // (NORM: the warps past N stayed for the block's norm)
#pragma unroll
  for (int j = 0; j < NW; ++j)
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
      for (int m = 0; m < M; ++m) acc[j][r][m] = rf::warp_reduce(acc[j][r][m], rf::Sum());
  if (lane == 0) {
    // after the wait above: the launcher may have just made a contiguous copy of a bias (common.cuh)
    const T* bw = rf::after_pdl_wait(bias);
    const T* bw2 = rf::after_pdl_wait(bias2);
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const int n = n0 + r;
      if (n < N) {
        const float b = bw ? rf::to_acc(bw[n]) : 0.0f;
        float b2 = 0.0f;
        if constexpr (DUAL) b2 = bw2 ? rf::to_acc(bw2[n]) : 0.0f;
#pragma unroll
        for (int m = 0; m < M; ++m) {
          if (m < m_rows) {
            float y = acc[0][r][m] + b;
            if constexpr (DUAL) y = silu(y) * (acc[NW - 1][r][m] + b2);
            out[(size_t)m * ldo + n] = rf::from_acc<T>(y);
          }
        }
      }
    }
  }
}

template <typename T, int M, int ROWS, int UNROLL, bool DUAL>
__global__ void __launch_bounds__(kThreads)
    gemv_nk(const T* __restrict__ x, int ldx, const T* __restrict__ w, const T* __restrict__ w2, int ldw,
            const T* __restrict__ bias, const T* __restrict__ bias2, T* __restrict__ out, int ldo, int m_rows,
            int K, int N) {
  gemv_rows<T, M, ROWS, UNROLL, DUAL, false>(x, ldx, w, w2, ldw, bias, bias2, out, ldo, m_rows, K, N, nullptr,
                                             0, nullptr, nullptr, 0, 0.0f);
}

// Register caps (nvcc 13.0, -Xptxas -v, sm_80 and sm_90, NVRTC 13.0 PTX through ptxas alike): CTAs per SM
// as many as gemv_nk gets at M = 1 (the decode path): 4 (<= 64 registers) for one matrix, 2 (<= 128) for
// DUAL, no spills. Left to itself ptxas aims at 2-3 and spills some of the M > 1 ones (tests and the
// sweep): those get the registers they need (1).
// (a struct, not a constexpr function: NVRTC refuses unannotated, i.e. host, functions)
template <int M, bool DUAL> struct NormMinCtas {
  static constexpr int value = M > 1 ? 1 : (DUAL ? 2 : 4);
};

template <typename T, int M, int ROWS, int UNROLL, bool DUAL>
__global__ void __launch_bounds__(kThreads, NormMinCtas<M, DUAL>::value)
    gemv_nk_norm(const T* __restrict__ x, int ldx, const T* __restrict__ w, const T* __restrict__ w2, int ldw,
                 const T* __restrict__ bias, const T* __restrict__ bias2, T* __restrict__ out, int ldo,
                 int m_rows, int K, int N, const T* __restrict__ a, int lda, const T* __restrict__ ln_w,
                 T* __restrict__ s_out, int lds, float eps) {
  gemv_rows<T, M, ROWS, UNROLL, DUAL, true>(x, ldx, w, w2, ldw, bias, bias2, out, ldo, m_rows, K, N, a, lda,
                                            ln_w, s_out, lds, eps);
}

}  // namespace gemv
