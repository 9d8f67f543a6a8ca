// int8_gemv.cu: weight-only INT8 (W8A16) linear layers: y = x @ dequant(W) (+ b).
//
// Memory layout (the launcher, rawformer/ops/quant.py, builds these):
//   q       int8  [N, ldq]   row n = output channel n, its K input weights, zero padded to ldq (a multiple of
//                            16, so every row is a whole number of 16-byte chunks and 16-byte aligned)
//   scales  fp16  [N]            per output channel (G == 0):  w[k, n] = q[n, k] * scales[n]
//                 [N, ngroups]   group-wise (G > 0):           w[k, n] = q[n, k] * scales[n, k / G]
//   x       T     [M, ldx]   M tokens (1..8 per launch), ldx a multiple of 16, columns K..ldx-1 zero (or the
//                            launcher passes a zero-padded copy), T = __half or float
//   bias    T     [N] or null
//   y       T     [M, ldy]
// Symmetric quantization: q in [-127, 127], no zero point.
//
// Versions (one kernel template int8_gemv<T, M, G, R, U, W, DUAL>, numbered configurations of it; every
// version also has its DUAL form, the fused gate/up + SwiGLU):
//   int8_gemv v1  <R=1, U=1, W=4>  one warp per output row, one 16-byte chunk per lane per step, 4 warps per
//                                  CTA: the baseline; <= 40 registers, 64 warps per SM resident. Best measured
//                                  on large matrices (H100, before PDL: 95% of copy at 8192x28672).
//   int8_gemv v2  <R=2, U=4, W=8>  two rows per warp (x loaded once for both), four chunks per lane and row:
//                                  8 independent 16-byte loads per lane, two whole rows of K <= 2048 at once.
//   int8_gemv v3  <R=1, U=8, W=8>  one row per warp, eight chunks per lane: a whole row of K <= 4096 is in
//                                  flight at once (4096 x 4096: the whole matrix in one go, every warp resident).
//   (Before PDL, <R=2, U=4, W=4> and <R=4, U=2, W=4> measured no better than v1: trimmed.)
//   Default (rawformer/ops/quant.py default_gemv_version): v1 for K > 4096 with N >= 8192 (V1_MIN_ROWS), else
//   v2 for DUAL or N >= V2_MIN_ROWS, else v3.
//   M (tokens) is compiled for 1, 2, 4, 8; a launch of m_rows <= M rows leaves the others unread / unwritten.
//   DUAL keeps the loads per lane: U is halved (v2: 2 chunks x 2 rows x 2 matrices, v3: 4 x 1 x 2).
//   Launch bounds (rf_int8::MinCtas): 64 registers (32 warps per SM) at one token, 85 for four weight rows,
//   or group scales with two rows or fp32 x; 128 (255 for four rows) above one token: no spills (nvcc -Xptxas
//   -v, sm_80 and sm_90).
// Ideas common to all versions:
//   - programmatic dependent launch (common.cuh): the kernel triggers its dependents at entry and issues its
//     first step's weight loads (and per-channel and group scales: nothing in a decode step writes weights)
//     before rf::pdl_wait(); x and the biases are read and y written only after it. In a CUDA graph this
//     overlaps the launch and the first DRAM round trip with the previous kernel's tail. q and scales must
//     not be written by the kernel launched just before (model weights are written once at load;
//     quantize_int8 synchronizes its stream before it returns).
//   - weights stream once: ld.global.nc.L1::no_allocate 16-byte loads (L1 is left to x, which every warp
//     rereads); x comes through L1 with ordinary loads kept after the PDL wait (rf::after_pdl_wait; 16 halves =
//     two 16-byte loads per token and chunk). The first version read x with __ldg: the compiler may hoist
//     such "invariant" loads above the wait, and a captured PDL chain read stale x (NaN outputs on the H100).
//   - int8 -> fp32 without I2F (quarter rate on sm_90): xor 0x80 makes the byte biased-unsigned, PRMT puts it
//     in the mantissa of 2^23 (0x4B0000bb = 2^23 + b + 128), one FADD of -(2^23 + 128) gives q exactly.
//   - fp32 accumulation: each chunk's 16 products summed in fp32 into a fresh partial, then added (times the
//     group's scale when G > 0) to the running sum; per-channel scales are applied once after the reduction.
//   - per (row, token) a butterfly warp reduction (common.cuh); lane r * M + m then holds and stores y[m, row r].
//   - rows past N are clamped to N - 1 for the loads (no divergence in the loop) and never stored.
//   - W warps per CTA = W R rows; grid ceil(N / (W R)).
//   - DUAL (rf.int8_linear_swiglu): the warp also reads the same R rows of a second matrix (Llama's up
//     projection next to the gate) and stores silu(gate) * up from the two fp32 sums: one launch, one read
//     of x, no (M, 2N) intermediate.
//
// int8_dequant<T, G>: w^T[n, k] = q[n, k] * scale, written as T into [N, ldq] (the prefill / large-batch path
// feeds that fp16 matrix to cuBLAS: a first version before a dequantizing tensor-core GEMM).

#include "common.cuh"
#include "norm_prologue.cuh"

namespace rf_int8 {

constexpr int kChunk = 16;  // int8 weights per 16-byte load

// Resident warps per SM the compiler must allow (launch bounds: registers <= 65536 / (32 * warps)), by the
// weight rows a warp reads (R, twice that for DUAL). One token: 32 warps (<= 64 registers), so that a
// 4096-row matrix's 4096 warps are all resident at once on 132 SMs (no second wave); 24 (<= 85) for four
// rows, or group scales with two rows or fp32 x (sm_80 spills those at 64). More tokens: 16 warps (<= 128),
// 8 for four rows. (Fewer registers than these and the compiler spills the unrolled loads and dequantized
// chunks.)
// (A struct, not a constexpr function: NVRTC refuses host functions, nvcc device ones in launch bounds.)
template <int kWarpsPerCta, int kTokens, bool kGrouped, int kRows, bool kFp32X>
struct MinCtas {
  static constexpr int one = kRows > 2 || (kGrouped && (kRows > 1 || kFp32X)) ? 24 : 32;
  static constexpr int value = (kTokens == 1 ? one : kRows > 2 ? 8 : 16) / kWarpsPerCta;
};

// 16 bytes that are read once: no L1 allocation.
__device__ __forceinline__ uint4 load_stream(const void* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
  return r;
}

// The 16 int8 values of a chunk as exact floats (see the header: PRMT into 2^23's mantissa, one FADD).
__device__ __forceinline__ void dequant16(const uint4& raw, float (&f)[kChunk]) {
  const unsigned w[4] = {raw.x ^ 0x80808080u, raw.y ^ 0x80808080u, raw.z ^ 0x80808080u, raw.w ^ 0x80808080u};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j)
      f[4 * i + j] = __uint_as_float(__byte_perm(w[i], 0x4B000000u, 0x7540u + j)) - 8388736.0f;
  }
}

// 16 consecutive x values as floats (p 16-byte aligned).
__device__ __forceinline__ void load_x16(const __half* p, float (&f)[kChunk]) {
  const uint4* v = reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const uint4 u = v[i];
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 t = __half22float2(*reinterpret_cast<const __half2*>(&w[j]));
      f[8 * i + 2 * j] = t.x;
      f[8 * i + 2 * j + 1] = t.y;
    }
  }
}

__device__ __forceinline__ void load_x16(const float* p, float (&f)[kChunk]) {
  const float4* v = reinterpret_cast<const float4*>(p);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float4 t = v[i];
    f[4 * i] = t.x;
    f[4 * i + 1] = t.y;
    f[4 * i + 2] = t.z;
    f[4 * i + 3] = t.w;
  }
}

template <typename T> __device__ __forceinline__ void store16(T* p, const float (&f)[kChunk]);

template <> __device__ __forceinline__ void store16<__half>(__half* p, const float (&f)[kChunk]) {
  uint4* v = reinterpret_cast<uint4*>(p);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    uint4 u;
    u.x = rf::pack_half2(f[8 * i], f[8 * i + 1]);
    u.y = rf::pack_half2(f[8 * i + 2], f[8 * i + 3]);
    u.z = rf::pack_half2(f[8 * i + 4], f[8 * i + 5]);
    u.w = rf::pack_half2(f[8 * i + 6], f[8 * i + 7]);
    v[i] = u;
  }
}

template <> __device__ __forceinline__ void store16<float>(float* p, const float (&f)[kChunk]) {
  float4* v = reinterpret_cast<float4*>(p);
#pragma unroll
  for (int i = 0; i < 4; ++i) v[i] = make_float4(f[4 * i], f[4 * i + 1], f[4 * i + 2], f[4 * i + 3]);
}

}  // namespace rf_int8

// y[m, n] = sum_k x[m, k] q[n, k] s(n, k) (+ b[n]) for m < m_rows (<= M), n < N. See the header for the layout.
// DUAL: a second matrix (q2, scales2, bias2: the up projection, same shape and grouping) read by the same
// warp for the same rows (virtual rows R..2R-1), and y[m, n] = silu(gate) * up of the two float sums.
// PDL: dependents are triggered at entry; the first step's weight loads (and the scales: no kernel of a step
// writes weights) are issued before rf::pdl_wait(); x and the biases are read and y written after it.
// NORM (int8_gemv_norm): x is the pre-norm residual stream and the dot products read h = rms_norm(x + a) *
// ln_w, computed by every CTA into shared memory (norm_prologue.cuh; CTA 0 writes s = x + a to s_out). Then
// no warp returns early (all take part in the block's reduction) and the chunk loop has the same trip count
// for every thread (the prologue sits in its first iteration, after the first weight loads are issued).
template <typename T, int M, int G, int R, int U_, int W, bool DUAL, bool NORM>
__device__ __forceinline__ void int8_gemv_rows(
    const T* __restrict__ x, const signed char* __restrict__ q, const __half* __restrict__ scales,
    const T* __restrict__ bias, const signed char* __restrict__ q2, const __half* __restrict__ scales2,
    const T* __restrict__ bias2, T* __restrict__ y, int m_rows, int n_rows, int chunks, int ldx, int ldq, int ngroups,
    int ldy, const T* __restrict__ a, int lda, const T* __restrict__ ln_w, T* __restrict__ s_out, int lds, float eps) {
  using namespace rf_int8;
  constexpr int RR = DUAL ? 2 * R : R;  // rows of weights a warp reads: R of q, then (DUAL) the same R of q2
  constexpr int U = DUAL && U_ > 1 ? U_ / 2 : U_;  // chunks per row and lane in flight: DUAL reads two rows
  static_assert(M >= 1 && R * M <= rf::kWarp, "lane r * M + m stores y[m, row r]");
  static_assert(G == 0 || (G % kChunk == 0 && (rf::kWarp * kChunk) % G == 0),
                "a group is a whole number of 16-byte chunks, and a warp's step (512) whole groups");
  rf::pdl_launch_dependents();
  const int lane = threadIdx.x % rf::kWarp;
  const int row0 = (blockIdx.x * W + threadIdx.x / rf::kWarp) * R;
  if constexpr (!NORM) {
    if (row0 >= n_rows) return;  // a whole warp past the end (only in the last CTA; the others wait)
  }
  extern __shared__ __align__(16) unsigned char int8_gemv_smem[];
  T* hs = reinterpret_cast<T*>(int8_gemv_smem);  // NORM: h [m_rows][chunks * 16]
  __shared__ float partial[NORM ? W : 1][M];
  const signed char* qrow[RR];
  const __half* srow[RR];
  int row[R];
#pragma unroll
  for (int r = 0; r < R; ++r) row[r] = min(row0 + r, n_rows - 1);
#pragma unroll
  for (int rr = 0; rr < RR; ++rr) {
    const int r = rr % R;
    qrow[rr] = (rr < R ? q : q2) + static_cast<size_t>(row[r]) * ldq;
    srow[rr] = (rr < R ? scales : scales2) + static_cast<size_t>(row[r]) * (G > 0 ? ngroups : 1);
  }
  // per-channel scales now, biases right after pdl_wait (the launcher may have just made a contiguous copy
  // of one), not after the loop: their latency would add to the kernel's tail
  float chan_scale[RR], chan_bias[RR];
#pragma unroll
  for (int rr = 0; rr < RR; ++rr) chan_scale[rr] = G == 0 ? __half2float(srow[rr][0]) : 1.f;
  const T* xw = x;  // x read through rf::after_pdl_wait (common.cuh), set right after the wait
  const auto wait_then_load_biases = [&]() {
    rf::pdl_wait();
    xw = rf::after_pdl_wait(x);
#pragma unroll
    for (int rr = 0; rr < RR; ++rr) {
      const T* b = rf::after_pdl_wait(rr < R ? bias : bias2);  // a fresh copy's loads stay after the wait
      chan_bias[rr] = b != nullptr ? rf::to_acc(b[row[rr % R]]) : 0.f;
    }
  };
  float acc[RR][M];
#pragma unroll
  for (int rr = 0; rr < RR; ++rr)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[rr][m] = 0.f;

  bool waited = false;
  // NORM: the same trip count for every thread (the block syncs in the first iteration); else each lane stops
  // after its last chunk (that form of the loop: the other spills registers at 64)
  for (int it = NORM ? 0 : lane; it < chunks; it += rf::kWarp * U) {
    const int c0 = NORM ? it + lane : it;
    uint4 raw[U][RR];
    __half2 s[(U + 1) / 2][RR];  // group scales (G > 0), two per register: U = 8 would not fit 64 otherwise
#pragma unroll
    for (int u = 0; u < U; ++u) {  // every weight load of the step before any use
      const int c = c0 + u * rf::kWarp;
#pragma unroll
      for (int rr = 0; rr < RR; ++rr) {
        raw[u][rr] = c < chunks ? load_stream(qrow[rr] + c * kChunk) : make_uint4(0, 0, 0, 0);
        if constexpr (G > 0) {
          const __half v = c < chunks ? srow[rr][(c * kChunk) / G] : __float2half(0.f);
          if (u % 2 == 0) s[u / 2][rr] = __halves2half2(v, v);
          else s[u / 2][rr] = __halves2half2(__low2half(s[u / 2][rr]), v);
        }
      }
    }
    if (!waited) {  // x is the previous kernel's output
      wait_then_load_biases();
      waited = true;
      if constexpr (NORM)
        rf::stage_rms_norm<T, M, 16 / sizeof(T), W * rf::kWarp>(xw, ldx, rf::after_pdl_wait(a), lda, ln_w, s_out, lds,
                                                                 m_rows, chunks * kChunk, eps, hs, partial);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + u * rf::kWarp;
      if (c < chunks) {
        float wf[RR][kChunk];
#pragma unroll
        for (int rr = 0; rr < RR; ++rr) dequant16(raw[u][rr], wf[rr]);
#pragma unroll
        for (int m = 0; m < M; ++m) {
          if (M == 1 || m < m_rows) {
            float xf[kChunk];
            if constexpr (NORM) {
              load_x16(hs + static_cast<size_t>(m) * chunks * kChunk + c * kChunk, xf);
            } else {
              load_x16(xw + static_cast<size_t>(m) * ldx + c * kChunk, xf);
            }
#pragma unroll
            for (int rr = 0; rr < RR; ++rr) {
              float t0 = 0.f, t1 = 0.f;  // two chains: half the FMA latency on the critical path
#pragma unroll
              for (int j = 0; j < kChunk; j += 2) {
                t0 = fmaf(wf[rr][j], xf[j], t0);
                t1 = fmaf(wf[rr][j + 1], xf[j + 1], t1);
              }
              if constexpr (G > 0) {
                const __half2 sp = s[u / 2][rr];
                acc[rr][m] = fmaf(__half2float(u % 2 == 0 ? __low2half(sp) : __high2half(sp)), t0 + t1, acc[rr][m]);
              } else {
                acc[rr][m] += t0 + t1;
              }
            }
          }
        }
      }
    }
  }
  if (!waited) wait_then_load_biases();  // lanes past the last chunk (K < 16 * lane)
  // Reduce every (row, token) sum across the warp; lane r * M + m then finishes and stores y[m, row r].
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float v = fmaf(rf::warp_reduce(acc[r][m], rf::Sum{}), chan_scale[r], chan_bias[r]);
      if constexpr (DUAL) {
        const float up = fmaf(rf::warp_reduce(acc[R + r][m], rf::Sum{}), chan_scale[R + r], chan_bias[R + r]);
        v = v / (1.f + __expf(-v)) * up;  // silu(gate) * up
      }
      if (lane == r * M + m && m < m_rows && row0 + r < n_rows)
        y[static_cast<size_t>(m) * ldy + row0 + r] = rf::from_acc<T>(v);
    }
  }
}

template <typename T, int M, int G, int R, int U_, int W, bool DUAL>
__global__ void __launch_bounds__(W * rf::kWarp, (rf_int8::MinCtas<W, M, (G > 0), (DUAL ? 2 * R : R), (sizeof(T) == 4)>::value))
    int8_gemv(const T* __restrict__ x, const signed char* __restrict__ q, const __half* __restrict__ scales,
              const T* __restrict__ bias, const signed char* __restrict__ q2, const __half* __restrict__ scales2,
              const T* __restrict__ bias2, T* __restrict__ y, int m_rows, int n_rows, int chunks, int ldx, int ldq,
              int ngroups, int ldy) {
  int8_gemv_rows<T, M, G, R, U_, W, DUAL, false>(x, q, scales, bias, q2, scales2, bias2, y, m_rows, n_rows, chunks, ldx,
                                                 ldq, ngroups, ldy, nullptr, 0, nullptr, nullptr, 0, 0.f);
}

// y = rms_norm(x + a) * ln_w @ dequant(W) (+ b): the GEMV with the norm in its prologue (NORM above); needs
// m_rows * chunks * 16 * sizeof(T) bytes of dynamic shared memory and x columns == chunks * 16 (no padding).
// Launch bounds as for four weight rows (24 warps per SM at one token, <= 85 registers): the prologue runs
// while the first step's weight loads are in flight, and at 64 registers ptxas spills.
template <typename T, int M, int G, int R, int U_, int W, bool DUAL>
__global__ void __launch_bounds__(W * rf::kWarp, (rf_int8::MinCtas<W, M, (G > 0), 4, (sizeof(T) == 4)>::value))
    int8_gemv_norm(const T* __restrict__ x, const signed char* __restrict__ q, const __half* __restrict__ scales,
                   const T* __restrict__ bias, const signed char* __restrict__ q2, const __half* __restrict__ scales2,
                   const T* __restrict__ bias2, T* __restrict__ y, int m_rows, int n_rows, int chunks, int ldx,
                   int ldq, int ngroups, int ldy, const T* __restrict__ a, int lda, const T* __restrict__ ln_w,
                   T* __restrict__ s_out, int lds, float eps) {
  int8_gemv_rows<T, M, G, R, U_, W, DUAL, true>(x, q, scales, bias, q2, scales2, bias2, y, m_rows, n_rows, chunks, ldx,
                                                ldq, ngroups, ldy, a, lda, ln_w, s_out, lds, eps);
}

// out[n, k] = q[n, k] * s(n, k) as T, for every 16-byte chunk of q [N, ldq] (out has the same layout).
// PDL: the first chunk's q and scale are loaded before rf::pdl_wait(), nothing is written before it.
template <typename T, int G>
__global__ void __launch_bounds__(256)
    int8_dequant(const signed char* __restrict__ q, const __half* __restrict__ scales, T* __restrict__ out, int n_rows,
                 int chunks, int ldq, int ngroups) {
  using namespace rf_int8;
  rf::pdl_launch_dependents();
  const long long total = static_cast<long long>(n_rows) * chunks;
  bool waited = false;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const int n = static_cast<int>(i / chunks), c = static_cast<int>(i % chunks);
    const size_t offset = static_cast<size_t>(n) * ldq + static_cast<size_t>(c) * kChunk;
    const uint4 raw = load_stream(q + offset);
    const float s = __half2float(G > 0 ? scales[static_cast<size_t>(n) * ngroups + (c * kChunk) / (G > 0 ? G : 1)]
                                       : scales[n]);
    if (!waited) {  // out may be memory the previous kernel still reads (a pool block handed back)
      rf::pdl_wait();
      waited = true;
    }
    float f[kChunk];
    dequant16(raw, f);
#pragma unroll
    for (int j = 0; j < kChunk; ++j) f[j] *= s;
    store16<T>(out + offset, f);
  }
  if (!waited) rf::pdl_wait();
}
