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
//   gemv_nk<T, M, ROWS, UNROLL, DUAL>   W [N, K] row-major with row stride ldw: `x @ W.T`, the layout of HF's
//       nn.Linear weights (out, in), which the models keep (they hand rf.linear the transposed view), and
//       of the lm head `x @ wte.T`. A warp per ROWS output columns: lanes stride over K with 16-byte loads,
//       UNROLL per row in flight, then a warp-shuffle sum; no shared memory, no cross-CTA reduction.
//       x is read through L1 (the same few rows for every warp). DUAL: a second matrix W2 of W's shape read
//       by the same warp, and the epilogue writes silu(x@W.T + b) * (x@W2.T + b2): the gate / up
//       projections and SwiGLU of a Llama MLP in one pass.
//
// M (1, 2, 4, 8) is the compiled row count; m_rows <= M rows are real (the rest neither read nor written).
// Requirements (the launcher checks them, else it uses cuBLAS): K and ldw multiples of VW = 16 / sizeof(T),
// 16-byte aligned W, x rows 16-byte aligned.

#include "common.cuh"

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

template <typename T, int M, int ROWS, int UNROLL, bool DUAL>
__global__ void __launch_bounds__(kThreads)
    gemv_nk(const T* __restrict__ x, int ldx, const T* __restrict__ w, const T* __restrict__ w2, int ldw,
            const T* __restrict__ bias, const T* __restrict__ bias2, T* __restrict__ out, int ldo, int m_rows,
            int K, int N) {
  constexpr int VW = VecOf<T>::n;
  constexpr int NW = DUAL ? 2 : 1;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n0 = (blockIdx.x * kWarps + warp) * ROWS;
  if (n0 >= N) return;
  float acc[NW][ROWS][M];
#pragma unroll
  for (int j = 0; j < NW; ++j)
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
      for (int m = 0; m < M; ++m) acc[j][r][m] = 0.0f;

  rf::pdl_launch_dependents();
  bool waited = false;  // the first weight loads are issued before waiting for the kernel that writes x
  for (int kb = lane * VW; kb < K; kb += 32 * VW * UNROLL) {
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
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int k = kb + u * 32 * VW;
      if (k < K) {
#pragma unroll
        for (int m = 0; m < M; ++m) {
          if (m < m_rows) {
            float xv[VW];
            load_floats<T, VW>(x + (size_t)m * ldx + k, xv);
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
  if (!waited) rf::pdl_wait();  // before the first write
#pragma unroll
  for (int j = 0; j < NW; ++j)
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
      for (int m = 0; m < M; ++m) acc[j][r][m] = rf::warp_reduce(acc[j][r][m], rf::Sum());
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const int n = n0 + r;
      if (n < N) {
        const float b = bias ? rf::to_acc(bias[n]) : 0.0f;
        float b2 = 0.0f;
        if constexpr (DUAL) b2 = bias2 ? rf::to_acc(bias2[n]) : 0.0f;
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

}  // namespace gemv
