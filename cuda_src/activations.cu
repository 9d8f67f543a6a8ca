// activations.cu: GELU, SiLU and SwiGLU, forward and backward. Elementwise and memory-bound: the work is
// to stream the bytes at the copy bandwidth while computing in fp32.
//
// Memory layout (every array C-contiguous, T = __half or float):
//   x, y, dy, dx, gate, up, dgate, dup   [rows, cols], read as one flat run of n = rows * cols elements
//   bias, dbias                          [cols]; element i of a matrix uses bias[i % cols]
//   partial                              [chunks, cols] fp32: column sums of dx over one chunk of rows
//
// The functions (u = x + bias; arithmetic in fp32 whatever T; fp32 library maths, no fast intrinsics):
//   gelu, approximate="tanh":  0.5 u (1 + tanh(z)), z = k0 (u + k1 u^3)   computed as  u * sigmoid(2 z)
//   gelu, approximate="none":  0.5 u (1 + erf(u / sqrt 2))                with erff
//   (k0 = sqrt(2 / pi), k1 = 0.044715)
//   silu(x) = x sigmoid(x);  swiglu(gate, up) = silu(gate) * up
// sigmoid(z) is formed from e = exp(-|z|) in (0, 1], which neither overflows nor cancels, so the tanh form
// has no cancellation in 1 + tanh(z) at negative u and costs about what tanhf would (one expf, one
// reciprocal). The erf form keeps 1 + erff(v): its absolute error is ~1e-7 |u|, so at u < -2 the (small)
// output is accurate relative to the largest outputs rather than to itself. erfcf(-v) would fix that but
// costs twice the instructions (~80 vs ~35 PTX per element), which would make fp16 GELU compute-bound on
// an H100 (budget ~40 instructions per element at 3 TB/s for 4 bytes moved per element).
// Derivatives: gelu_tanh'(u) = s + 2 u s (1 - s) k0 (1 + 3 k1 u^2) with s = sigmoid(2 z)
//              gelu_erf'(u)  = 0.5 (1 + erf(u / sqrt 2)) + u exp(-u^2 / 2) / sqrt(2 pi)
//              silu'(g)      = s (1 + g (1 - s)) with s = sigmoid(g)
//
// Kernel versions (the launcher in rawformer/ops/activations.py picks one; `version=` overrides):
//   *_v1  scalar grid-stride loop, one element per thread per iteration, 64-bit flat index; the bias column
//         i % cols is carried along (one division per thread). Any shape, any alignment.
//   *_v2  16-byte vectors (VW = 16 / sizeof(T) elements), kUnroll vectors per thread per stream loaded before
//         any is used, so several 16-byte loads per thread are in flight; grid-stride over tiles of
//         blockDim.x * kUnroll vectors. The bias column of each vector is carried along incrementally (one
//         division per thread, none in the loop). Needs every pointer 16-byte aligned and, with a bias,
//         cols % VW == 0; without a bias the n % VW tail elements are done one by one.
//   gelu_backward_v3  one pass that writes dx and sums dbias: a block owns a strip of columns and one chunk
//         of rows (block = BX x BY threads, BX column-vectors wide, grid = column strips x row chunks); each
//         thread walks its column down the chunk (kUnroll rows in flight), keeps the column sums in fp32
//         registers, the block adds its BY partial sums in shared memory in a fixed order and writes one
//         row of `partial`; column_reduce adds the chunks (a 32 x 8 block per 32 columns, each thread a
//         strided subset of the chunks, then the 8 sums in order). No atomics: dbias is deterministic.
//         VW = 1 (any cols) or 16 / sizeof(T) (cols % VW == 0, aligned pointers).
//   Backward with a bias in v1 / v2: dx first, then column_partial_sums reads dx back (the same strip walk,
//   VW = 1 after v1, 16 / sizeof(T) after v2) and column_reduce adds the chunks: one more pass over dx,
//   which v3 avoids.
// Template parameters: T (__half, float), VW (elements per access), TANH (approximate == "tanh", else the
// erf form), HAS_BIAS. Blocks are 256 threads (v2's scalar tail needs blockDim.x >= VW), except
// column_reduce's 32 x 8.
#include "common.cuh"

namespace rf_act {

using rf::from_acc;
using rf::to_acc;
using rf::Vec;

// (an enum and static members rather than namespace-scope constexpr variables: NVRTC warns about every one
// that a given instantiation leaves unused)
enum : int { kUnroll = 4 };  // vectors (v2) or rows (v3) per thread per stream in flight
enum : int { kReduceX = 32, kReduceY = 8 };  // column_reduce's block

struct K {
  static constexpr float tanh_k0 = 0.7978845608028654f;      // sqrt(2 / pi)
  static constexpr float tanh_k1 = 0.044715f;
  static constexpr float inv_sqrt2 = 0.7071067811865476f;    // 1 / sqrt(2)
  static constexpr float inv_sqrt2pi = 0.3989422804014327f;  // 1 / sqrt(2 pi)
};

// sigmoid(z) and 1 - sigmoid(z), from e = exp(-|z|): no overflow for any z, no cancellation in 1 - s.
__device__ __forceinline__ void sigmoid_pair(float z, float& s, float& one_minus_s) {
  const float e = expf(-fabsf(z));
  // sigmoid(|z|), in [0.5, 1]. The fast reciprocal (MUFU, 2 ulp for a divisor in [1, 2]), not the
  // correctly rounded __frcp_rn: on the H100 GELU tanh forward went from 2297 to 2648 GB/s (32768x1024
  // fp16) and 2440 to 3011 (16384x8192 fp32), same error (bench/results/h100/gelu_reciprocal.log).
  const float big = __fdividef(1.f, 1.f + e);
  const float small = e * big;        // 1 - sigmoid(|z|), in (0, 0.5]
  s = z >= 0.f ? big : small;
  one_minus_s = z >= 0.f ? small : big;
}

template <bool TANH> __device__ __forceinline__ float gelu(float u) {
  if constexpr (TANH) {
    float s, one_minus_s;
    sigmoid_pair(2.f * K::tanh_k0 * u * (1.f + K::tanh_k1 * u * u), s, one_minus_s);
    return u * s;
  } else {
    return 0.5f * u * (1.f + erff(u * K::inv_sqrt2));
  }
}

template <bool TANH> __device__ __forceinline__ float gelu_grad(float u) {
  if constexpr (TANH) {
    const float u2 = u * u;
    float s, one_minus_s;
    sigmoid_pair(2.f * K::tanh_k0 * u * (1.f + K::tanh_k1 * u2), s, one_minus_s);
    // s (1 - s) underflows to 0 long before u^2 overflows (|u| < 10 while it is not 0): testing it keeps
    // 0 * inf = NaN out of the result for huge |u|.
    const float t = s * one_minus_s;
    return s + (t == 0.f ? 0.f : 2.f * u * t * K::tanh_k0 * (1.f + 3.f * K::tanh_k1 * u2));
  } else {
    return 0.5f * (1.f + erff(u * K::inv_sqrt2)) + u * K::inv_sqrt2pi * expf(-0.5f * u * u);
  }
}

__device__ __forceinline__ float silu(float g) {
  float s, one_minus_s;
  sigmoid_pair(g, s, one_minus_s);
  return g * s;
}

// ---- the ops, as functors over fp32 values: in[NIN] (+ the bias value b) -> out[NOUT] -----------------
template <bool TANH> struct GeluForward {
  static constexpr int kIn = 1, kOut = 1;
  __device__ __forceinline__ void operator()(const float* in, float b, float* out) const {
    out[0] = gelu<TANH>(in[0] + b);
  }
};
template <bool TANH> struct GeluBackward {  // in: dy, x -> out: dx
  static constexpr int kIn = 2, kOut = 1;
  __device__ __forceinline__ void operator()(const float* in, float b, float* out) const {
    out[0] = in[0] * gelu_grad<TANH>(in[1] + b);
  }
};
struct SiluForward {
  static constexpr int kIn = 1, kOut = 1;
  __device__ __forceinline__ void operator()(const float* in, float, float* out) const { out[0] = silu(in[0]); }
};
struct SwigluForward {  // in: gate, up -> out: y
  static constexpr int kIn = 2, kOut = 1;
  __device__ __forceinline__ void operator()(const float* in, float, float* out) const {
    out[0] = silu(in[0]) * in[1];
  }
};
struct SwigluBackward {  // in: dy, gate, up -> out: dgate, dup
  static constexpr int kIn = 3, kOut = 2;
  __device__ __forceinline__ void operator()(const float* in, float, float* out) const {
    const float dy = in[0], g = in[1], up = in[2];
    float s, one_minus_s;
    sigmoid_pair(g, s, one_minus_s);
    out[0] = dy * up * s * (1.f + g * one_minus_s);
    out[1] = dy * g * s;
  }
};
struct Identity {  // column_partial_sums: sum dx as it is
  static constexpr int kIn = 1, kOut = 1;
  __device__ __forceinline__ void operator()(const float* in, float, float* out) const { out[0] = in[0]; }
};

// a % m for a >= 0, m > 0, in 32-bit arithmetic when a fits (64-bit division is a long subroutine)
__device__ __forceinline__ int mod(long long a, int m) {
  return a < 0x7fffffffLL ? (int)a % m : (int)(a % m);
}
// (a + b) % m for a, b in [0, m): one compare instead of a division (unsigned: a + b < 2^32)
__device__ __forceinline__ int wrap_add(int a, int b, int m) {
  const unsigned c = (unsigned)a + (unsigned)b;
  return (int)(c >= (unsigned)m ? c - (unsigned)m : c);
}

// ---- v1: scalar grid-stride -------------------------------------------------------------------------
template <typename T, bool HAS_BIAS, typename Op>
__device__ __forceinline__ void elementwise_scalar(const T* const* in, const T* bias, T* const* out,
                                                   long long n, int cols) {
  constexpr int NIN = Op::kIn, NOUT = Op::kOut;
  const long long stride = (long long)gridDim.x * blockDim.x;
  const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  // The bias column i % cols, carried along: one division per thread instead of one per element.
  int col = 0, inc = 0;
  if constexpr (HAS_BIAS) {
    col = mod(first, cols);
    inc = mod(stride, cols);
  }
  for (long long i = first; i < n; i += stride) {
    float a[NIN], r[NOUT];
#pragma unroll
    for (int j = 0; j < NIN; ++j) a[j] = to_acc(in[j][i]);
    const float b = HAS_BIAS ? to_acc(bias[col]) : 0.f;
    Op{}(a, b, r);
#pragma unroll
    for (int j = 0; j < NOUT; ++j) out[j][i] = from_acc<T>(r[j]);
    if constexpr (HAS_BIAS) col = wrap_add(col, inc, cols);
  }
}

// ---- v2: 16-byte vectors, kUnroll per thread in flight ---------------------------------------------
template <typename T, int VW, bool HAS_BIAS, typename Op>
__device__ __forceinline__ void elementwise_vec(const T* const* in, const T* bias, T* const* out, long long n,
                                                int cols) {
  static_assert(VW * sizeof(T) == 16, "v2 moves 16-byte vectors");
  constexpr int NIN = Op::kIn, NOUT = Op::kOut;
  const long long nvec = n / VW;
  const long long tile = (long long)blockDim.x * kUnroll;  // vectors per block per step
  const long long step = (long long)gridDim.x * tile;

  // Bias column (in vectors) of the k-th vector of this thread, carried from step to step.
  int col[kUnroll] = {};
  int inc_step = 0, vcols = 1;
  if constexpr (HAS_BIAS) {
    vcols = cols / VW;
    const int inc_k = mod(blockDim.x, vcols);
    col[0] = mod((long long)blockIdx.x * tile + threadIdx.x, vcols);
#pragma unroll
    for (int k = 1; k < kUnroll; ++k) col[k] = wrap_add(col[k - 1], inc_k, vcols);
    inc_step = mod(step, vcols);
  }

  for (long long base = (long long)blockIdx.x * tile + threadIdx.x; base < nvec; base += step) {
    Vec<T, VW> v[NIN][kUnroll];
    Vec<T, VW> bv[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const long long e = base + (long long)k * blockDim.x;
      if (e < nvec) {
#pragma unroll
        for (int j = 0; j < NIN; ++j) v[j][k] = rf::load_vec<T, VW>(in[j] + e * VW);
        if constexpr (HAS_BIAS) bv[k] = rf::load_vec<T, VW>(bias + (long long)col[k] * VW);
      }
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const long long e = base + (long long)k * blockDim.x;
      if (e < nvec) {
        Vec<T, VW> o[NOUT];
#pragma unroll
        for (int q = 0; q < VW; ++q) {
          float a[NIN], r[NOUT];
#pragma unroll
          for (int j = 0; j < NIN; ++j) a[j] = to_acc(v[j][k].v[q]);
          const float b = HAS_BIAS ? to_acc(bv[k].v[q]) : 0.f;
          Op{}(a, b, r);
#pragma unroll
          for (int j = 0; j < NOUT; ++j) o[j].v[q] = from_acc<T>(r[j]);
        }
#pragma unroll
        for (int j = 0; j < NOUT; ++j) rf::store_vec<T, VW>(out[j] + e * VW, o[j]);
      }
      if constexpr (HAS_BIAS) col[k] = wrap_add(col[k], inc_step, vcols);
    }
  }

  // The n % VW elements past the last whole vector (only without a bias: with one, cols % VW == 0).
  const long long tail = nvec * VW;
  const long long i = tail + (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) {
    float a[NIN], r[NOUT];
#pragma unroll
    for (int j = 0; j < NIN; ++j) a[j] = to_acc(in[j][i]);
    const float b = HAS_BIAS ? to_acc(bias[i % cols]) : 0.f;
    Op{}(a, b, r);
#pragma unroll
    for (int j = 0; j < NOUT; ++j) out[j][i] = from_acc<T>(r[j]);
  }
}

// ---- column strips: out = op(in, bias) (optional) and fp32 column sums of out per chunk of rows -------
// Block (BX, BY): thread (tx, ty) owns column-vector blockIdx.x * BX + tx and rows
// chunk_start + ty, + BY, ... of chunk blockIdx.y. Dynamic shared memory: BY * BX * VW floats.
template <typename T, int VW, bool HAS_BIAS, bool WRITE_OUT, typename Op>
__device__ __forceinline__ void column_strip(const T* const* in, const T* bias, T* out, float* partial,
                                             int rows, int cols, int rows_per_chunk) {
  static_assert(Op::kOut == 1, "a column strip sums one output");
  constexpr int NIN = Op::kIn;
  extern __shared__ float strip_sums[];  // [BY][BX * VW]
  const int bx = blockDim.x, by = blockDim.y;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int vcols = cols / VW;
  const int c = blockIdx.x * bx + tx;  // this thread's column-vector
  const bool active = c < vcols;
  const int r0 = blockIdx.y * rows_per_chunk;
  const int r1 = min(rows, r0 + rows_per_chunk);

  float acc[VW], b[VW];
#pragma unroll
  for (int q = 0; q < VW; ++q) acc[q] = b[q] = 0.f;
  if constexpr (HAS_BIAS) {
    if (active) {
      const Vec<T, VW> bv = rf::load_vec<T, VW>(bias + (long long)c * VW);
#pragma unroll
      for (int q = 0; q < VW; ++q) b[q] = to_acc(bv.v[q]);
    }
  }

  if (active) {
    for (int r = r0 + ty; r < r1; r += by * kUnroll) {
      Vec<T, VW> v[NIN][kUnroll];
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        const int rr = r + k * by;
        if (rr < r1) {
#pragma unroll
          for (int j = 0; j < NIN; ++j) {
            v[j][k] = rf::load_vec<T, VW>(in[j] + (long long)rr * cols + (long long)c * VW);
          }
        }
      }
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        const int rr = r + k * by;
        if (rr < r1) {
          Vec<T, VW> o;
#pragma unroll
          for (int q = 0; q < VW; ++q) {
            float a[NIN], res[1];
#pragma unroll
            for (int j = 0; j < NIN; ++j) a[j] = to_acc(v[j][k].v[q]);
            Op{}(a, b[q], res);
            o.v[q] = from_acc<T>(res[0]);
            acc[q] += res[0];  // the fp32 value, not the rounded store
          }
          if constexpr (WRITE_OUT) rf::store_vec<T, VW>(out + (long long)rr * cols + (long long)c * VW, o);
        }
      }
    }
  }

  // Add the BY partial sums of each column in a fixed order (deterministic), write the chunk's row.
  const int width = bx * VW;
#pragma unroll
  for (int q = 0; q < VW; ++q) strip_sums[ty * width + tx * VW + q] = acc[q];
  __syncthreads();
  const int strip_col0 = blockIdx.x * width;
  for (int j = ty * bx + tx; j < width; j += bx * by) {
    if (strip_col0 + j >= cols) break;
    float s = 0.f;
    for (int y = 0; y < by; ++y) s += strip_sums[y * width + j];
    partial[(long long)blockIdx.y * cols + strip_col0 + j] = s;
  }
}

}  // namespace rf_act

// ===== kernels: raw pointers and ints only =============================================================

// y = gelu(x + bias)
template <typename T, bool TANH, bool HAS_BIAS>
__global__ void gelu_forward_v1(const T* x, const T* bias, T* y, long long n, int cols) {
  const T* in[1] = {x};
  T* out[1] = {y};
  rf_act::elementwise_scalar<T, HAS_BIAS, rf_act::GeluForward<TANH>>(in, bias, out, n, cols);
}
template <typename T, int VW, bool TANH, bool HAS_BIAS>
__global__ void gelu_forward_v2(const T* x, const T* bias, T* y, long long n, int cols) {
  const T* in[1] = {x};
  T* out[1] = {y};
  rf_act::elementwise_vec<T, VW, HAS_BIAS, rf_act::GeluForward<TANH>>(in, bias, out, n, cols);
}

// dx = dy * gelu'(x + bias)   (v1, v2: dbias afterwards by column_partial_sums + column_reduce)
template <typename T, bool TANH, bool HAS_BIAS>
__global__ void gelu_backward_v1(const T* dy, const T* x, const T* bias, T* dx, long long n, int cols) {
  const T* in[2] = {dy, x};
  T* out[1] = {dx};
  rf_act::elementwise_scalar<T, HAS_BIAS, rf_act::GeluBackward<TANH>>(in, bias, out, n, cols);
}
template <typename T, int VW, bool TANH, bool HAS_BIAS>
__global__ void gelu_backward_v2(const T* dy, const T* x, const T* bias, T* dx, long long n, int cols) {
  const T* in[2] = {dy, x};
  T* out[1] = {dx};
  rf_act::elementwise_vec<T, VW, HAS_BIAS, rf_act::GeluBackward<TANH>>(in, bias, out, n, cols);
}
// dx and the per-chunk column sums of dx in one pass; column_reduce finishes dbias.
template <typename T, int VW, bool TANH>
__global__ void gelu_backward_v3(const T* dy, const T* x, const T* bias, T* dx, float* partial, int rows,
                                 int cols, int rows_per_chunk) {
  const T* in[2] = {dy, x};
  rf_act::column_strip<T, VW, true, true, rf_act::GeluBackward<TANH>>(in, bias, dx, partial, rows, cols,
                                                                       rows_per_chunk);
}

// partial[chunk, c] = sum of dx[r, c] over the rows r of the chunk (fp32)
template <typename T, int VW>
__global__ void column_partial_sums(const T* dx, float* partial, int rows, int cols, int rows_per_chunk) {
  const T* in[1] = {dx};
  rf_act::column_strip<T, VW, false, false, rf_act::Identity>(in, nullptr, nullptr, partial, rows, cols,
                                                              rows_per_chunk);
}

// dbias[c] = sum over chunks of partial[chunk, c]. Block (kReduceX, kReduceY): thread (tx, ty) adds chunks
// ty, ty + kReduceY, ... of column blockIdx.x * kReduceX + tx, then the kReduceY sums are added in order of ty
// (a fixed order: deterministic).
template <typename T>
__global__ void column_reduce(const float* partial, T* dbias, int chunks, int cols) {
  using rf_act::kReduceX;
  using rf_act::kReduceY;
  __shared__ float sums[kReduceY][kReduceX + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int c = blockIdx.x * kReduceX + tx;
  float s = 0.f;
  if (c < cols) {
    for (int k = ty; k < chunks; k += kReduceY) s += partial[(long long)k * cols + c];
  }
  sums[ty][tx] = s;
  __syncthreads();
  if (ty == 0 && c < cols) {
    float t = 0.f;
#pragma unroll
    for (int y = 0; y < kReduceY; ++y) t += sums[y][tx];
    dbias[c] = rf::from_acc<T>(t);
  }
}

// y = silu(x)
template <typename T>
__global__ void silu_forward_v1(const T* x, T* y, long long n) {
  const T* in[1] = {x};
  T* out[1] = {y};
  rf_act::elementwise_scalar<T, false, rf_act::SiluForward>(in, nullptr, out, n, 1);
}
template <typename T, int VW>
__global__ void silu_forward_v2(const T* x, T* y, long long n) {
  const T* in[1] = {x};
  T* out[1] = {y};
  rf_act::elementwise_vec<T, VW, false, rf_act::SiluForward>(in, nullptr, out, n, 1);
}

// y = silu(gate) * up
template <typename T>
__global__ void swiglu_forward_v1(const T* gate, const T* up, T* y, long long n) {
  const T* in[2] = {gate, up};
  T* out[1] = {y};
  rf_act::elementwise_scalar<T, false, rf_act::SwigluForward>(in, nullptr, out, n, 1);
}
template <typename T, int VW>
__global__ void swiglu_forward_v2(const T* gate, const T* up, T* y, long long n) {
  const T* in[2] = {gate, up};
  T* out[1] = {y};
  rf_act::elementwise_vec<T, VW, false, rf_act::SwigluForward>(in, nullptr, out, n, 1);
}

// dgate = dy * up * silu'(gate), dup = dy * silu(gate)
template <typename T>
__global__ void swiglu_backward_v1(const T* dy, const T* gate, const T* up, T* dgate, T* dup, long long n) {
  const T* in[3] = {dy, gate, up};
  T* out[2] = {dgate, dup};
  rf_act::elementwise_scalar<T, false, rf_act::SwigluBackward>(in, nullptr, out, n, 1);
}
template <typename T, int VW>
__global__ void swiglu_backward_v2(const T* dy, const T* gate, const T* up, T* dgate, T* dup, long long n) {
  const T* in[3] = {dy, gate, up};
  T* out[2] = {dgate, dup};
  rf_act::elementwise_vec<T, VW, false, rf_act::SwigluBackward>(in, nullptr, out, n, 1);
}
