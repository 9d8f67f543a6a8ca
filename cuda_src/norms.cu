// norms.cu: layer norm and RMS norm over the last axis, forward and backward, with an optional fused
// residual add (the "add + norm" of pre-norm transformer blocks).
//
// Maths (per row of `cols` values, arithmetic in float32 whatever the storage type):
//   h     = x + residual         (only with a residual; rounded to T and written out; the norm reads
//                                  the rounded h, exactly as an unfused add followed by a norm would)
//   layer: mean = sum(h) / cols,  rstd = rsqrt(sum((h - mean)^2) / cols + eps)   (biased variance,
//          two passes over the row held on chip, so no Welford is needed and nothing cancels)
//          y = (h - mean) * rstd * w + b
//   rms:   rstd = rsqrt(sum(h^2) / cols + eps),  y = h * rstd * w
//   backward, with xhat = (x - mean) * rstd (rms: mean = 0) and g = dy * w:
//   layer: dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
//   rms:   dx = rstd * (g - xhat * mean(g * xhat))
//          dw = sum over rows of dy * xhat,   db = sum over rows of dy   (accumulated in float32)
//
// Memory layout: x, residual, h, y, dy, dx are C-contiguous [rows, cols] of T (__half or float);
// weight, bias are [cols] of T; mean, rstd are [rows] float32; backward partial sums are
// [parts, cols] float32 (one row per block that contributed), summed over `parts` by
// norm_backward_reduce into dweight / dbias [cols] of T.
//
// Optional pointers are nullptr when absent (decided at run time: the branch is uniform over the launch
// and keeps the instantiation count to one per row-length bucket): weight (w = 1), bias (b = 0),
// residual (then h is not written), mean / rstd outputs, dweight / dbias partial outputs.
//
// Vector width VW: 16 / sizeof(T) when cols * sizeof(T) is a multiple of 16 and every pointer is 16-byte
// aligned (one 16-byte load or store per vector), else 1 (scalar accesses). cols % VW == 0 always holds,
// so a vector is either wholly inside the row or wholly past its end.
//
// Forward versions (template RMS selects rms norm; one kernel body serves both):
//   v1  norm_forward_v1<T, THREADS, RMS>: a block per row, scalar loads, three passes over global memory
//       (sum, squared deviations, output). Any cols. The baseline.
//   v2  norm_forward_v2<T, VW, VECS, LANES, RMS>: a tile of LANES (4..32) lanes of one warp per row, the
//       row in registers in its storage type (VECS vectors of VW per lane; lane l holds vectors l,
//       l + LANES, ...), every load issued before the first reduction, reductions by shfl_xor inside the
//       tile. 128-thread blocks hold 128 / LANES rows. cols <= LANES * VECS * VW: 2048 for __half vectors,
//       1024 for float vectors, 512 scalar.
//   v3  norm_forward_v3<T, VW, VECS, THREADS, RMS>: a block of THREADS (128..512) per row, the row in
//       registers the same way (thread t holds vectors t, t + THREADS, ...), block reductions through
//       shared memory. cols <= THREADS * VECS * VW: 32768 for __half vectors, 16384 float, 8192 scalar.
//   v4  norm_forward_v4<T, VW, THREADS, RMS>: a block of THREADS per row, the row cached in dynamic
//       shared memory as it streams in (4 vectors in flight per thread); what does not fit (cached_vecs
//       onwards) is read again from global memory, where it is the most recently read data and still in
//       L2. Any cols; the long-row kernel.
// Backward versions:
//   v1  norm_backward_dx_v1<T, THREADS, RMS> (a block per row, scalar, re-reads global memory) and
//       norm_backward_dwdb_v1<T, RMS> (a thread per column loops over all rows): no partial buffer.
//   v2  norm_backward_v2<T, VW, VECS, LANES, RMS>: fused dx + dw/db. A tile of LANES lanes per row, the row
//       of x and dy in registers; a grid of one wave of 256-thread blocks strides over the rows, and as a
//       lane owns the same columns in every row it accumulates dw/db for them in registers. At the end the
//       tiles of a block add up in shared memory in a fixed order (results repeat exactly from run to run)
//       and the block writes one [cols] row of partials. cols <= 1024 (512 scalar). Reads x and dy once,
//       writes dx once.
//   v3  norm_backward_v3<T, VW, VECS, THREADS, RMS>: the same with a block of 128..512 threads per row
//       (each column owned by one thread, so partials go straight from registers to global). cols <= 8192.
//   v4  norm_backward_stats_v4<T, VW, THREADS, RMS> (a block per row: c1 = mean(g), c2 = mean(g * xhat))
//       then norm_backward_cols_v4<T, VW, RMS> (a thread per column vector strides down a slab of rows:
//       dx from the row constants, dw/db in registers, one partial row per slab). Any cols; reads x and dy
//       twice.
//   norm_backward_reduce<T>: [parts, cols] float32 partials -> [cols] T (a 32 x 32 block per 32 columns,
//       summed in a fixed order).
// Register-resident kernels cap their registers through __launch_bounds__ (see "register caps" below).
#include "common.cuh"

namespace norms {

constexpr int kTileBlock = 128;      // threads per block of the forward tile kernel (v2)
constexpr int kTileBlockBwd = 256;   // threads per block of the backward tile kernel (v2)
constexpr int kUnroll = 4;           // vectors in flight per thread in the looped kernels
constexpr int kColThreads = 256;     // threads per block of norm_backward_cols_v4
constexpr int kReduceRows = 32;      // norm_backward_reduce: a (32 columns) x (32 part-rows) block

struct Sum2 {
  __device__ __forceinline__ float2 operator()(float2 a, float2 b) const {
    return make_float2(a.x + b.x, a.y + b.y);
  }
};

// Sum over the LANES lanes of a tile (a row handled by part of a warp); every lane gets the result.
template <int LANES> struct TileSum {
  __device__ __forceinline__ float operator()(float v) const { return rf::warp_reduce<LANES>(v, rf::Sum{}); }
  __device__ __forceinline__ float2 operator()(float2 v) const { return rf::warp_reduce<LANES>(v, Sum2{}); }
};

// Sum over a whole block of THREADS threads; `scratch` holds 32 float2.
template <int THREADS> struct BlockSum {
  float2* scratch;
  __device__ __forceinline__ float operator()(float v) const {
    return rf::block_reduce<THREADS>(v, rf::Sum{}, reinterpret_cast<float*>(scratch));
  }
  __device__ __forceinline__ float2 operator()(float2 v) const {
    return rf::block_reduce<THREADS>(v, Sum2{}, scratch);
  }
};

template <typename T, int VW> __device__ __forceinline__ void load_f(const T* p, float (&out)[VW]) {
  const rf::Vec<T, VW> v = rf::load_vec<T, VW>(p);
#pragma unroll
  for (int k = 0; k < VW; ++k) out[k] = rf::to_acc(v.v[k]);
}

template <typename T, int VW> __device__ __forceinline__ void store_f(T* p, const float (&in)[VW]) {
  rf::Vec<T, VW> v;
#pragma unroll
  for (int k = 0; k < VW; ++k) v.v[k] = rf::from_acc<T>(in[k]);
  rf::store_vec<T, VW>(p, v);
}

template <typename T, int VW>
__device__ __forceinline__ void load_f_or(const T* p, float (&out)[VW], float fill) {
  if (p != nullptr) {
    load_f<T, VW>(p, out);
  } else {
#pragma unroll
    for (int k = 0; k < VW; ++k) out[k] = fill;
  }
}

// How many of the vectors tid, tid + STRIDE, ... lie inside a row of `cols` values (the register kernels
// test `i < mine`, one compare against one register, rather than keep a predicate per vector alive).
template <int VW, int STRIDE> __device__ __forceinline__ int vectors_of(int tid, int cols) {
  const int nvec = cols / VW;
  return tid < nvec ? (nvec - tid + STRIDE - 1) / STRIDE : 0;
}

// ---- register caps of the register-resident kernels -------------------------------------------------------
// __launch_bounds__(THREADS, blocks) makes ptxas fit `blocks` blocks per SM, i.e. at most 65536 / (THREADS *
// blocks) registers per thread. Left alone, ptxas hoists every weight / bias load of the output pass (and
// keeps converted copies of the row) and doubles the registers of the forward; asked for min blocks = 1 it
// spills a few bytes elsewhere. The caps below let every instantiation compile without spills for sm_80 and
// sm_90 (nvcc 13.0 -Xptxas -v): a forward row of 64 halves per thread fits 64 registers, 32 floats 80, 16
// scalar values 128; the fused backward (x, dy and two float accumulators per value) 128 for 32 halves, and
// float rows keep ptxas's own choice there (cap 0: one block).
constexpr int blocks_for_cap(int threads, int cap) {
  return (cap <= 0 || 65536 / (threads * cap) < 1) ? 1 : 65536 / (threads * cap);
}
template <typename T, int VW> constexpr int forward_reg_cap() {
  return VW == 1 ? 128 : (sizeof(T) == 2 ? 64 : 80);
}
template <typename T, int VW> constexpr int backward_tile_reg_cap() {
  return (VW > 1 && sizeof(T) == 2) ? 128 : 0;
}
constexpr int kBackwardBlockRegCap = 128;

// ---- forward, row in registers (v2, v3) -----------------------------------------------------------------
// `tid` is the thread's index among the STRIDE threads sharing the row; `reduce` sums over them. The row
// stays in registers in its storage type (half the registers for __half; h rounded to T loses nothing) and
// is converted to float at each of the passes.
template <typename T, int VW, int VECS, int STRIDE, bool RMS, typename Reduce>
__device__ __forceinline__ void forward_row(const T* __restrict__ x, const T* __restrict__ residual,
                                            const T* __restrict__ weight, const T* __restrict__ bias,
                                            T* __restrict__ y, T* __restrict__ h,
                                            float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                            long long row, int cols, float eps, int tid,
                                            const Reduce& reduce) {
  using V = rf::Vec<T, VW>;
  rf::pdl_launch_dependents();
  rf::pdl_wait();  // launched with pdl=True (common.cuh: programmatic dependent launch)
  const long long base = row * cols;
  const int mine = vectors_of<VW, STRIDE>(tid, cols);
  V v[VECS];
  // Every load of the row is issued before anything waits on one.
#pragma unroll
  for (int i = 0; i < VECS; ++i) {
    if (i < mine) v[i] = rf::load_vec<T, VW>(x + base + (tid + i * STRIDE) * VW);
  }
  if (residual != nullptr) {
#pragma unroll
    for (int i = 0; i < VECS; ++i) {
      const int c = (tid + i * STRIDE) * VW;
      if (i < mine) {
        const V r = rf::load_vec<T, VW>(residual + base + c);
#pragma unroll
        for (int k = 0; k < VW; ++k) v[i].v[k] = rf::from_acc<T>(rf::to_acc(v[i].v[k]) + rf::to_acc(r.v[k]));
        rf::store_vec<T, VW>(h + base + c, v[i]);
      }
    }
  }
  float mean = 0.f;
  if constexpr (!RMS) {
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < VECS; ++i) {
      if (i < mine) {
#pragma unroll
        for (int k = 0; k < VW; ++k) s += rf::to_acc(v[i].v[k]);
      }
    }
    mean = reduce(s) / cols;
  }
  float q = 0.f;
#pragma unroll
  for (int i = 0; i < VECS; ++i) {
    if (i < mine) {
#pragma unroll
      for (int k = 0; k < VW; ++k) {
        const float d = rf::to_acc(v[i].v[k]) - mean;
        q = fmaf(d, d, q);
      }
    }
  }
  const float rstd = rsqrtf(reduce(q) / cols + eps);
  if (tid == 0) {
    if (mean_out != nullptr) mean_out[row] = mean;
    if (rstd_out != nullptr) rstd_out[row] = rstd;
  }
#pragma unroll
  for (int i = 0; i < VECS; ++i) {
    const int c = (tid + i * STRIDE) * VW;
    if (i < mine) {
      float w[VW], b[VW], o[VW];
      load_f_or<T, VW>(weight == nullptr ? nullptr : weight + c, w, 1.f);
      load_f_or<T, VW>(bias == nullptr ? nullptr : bias + c, b, 0.f);
#pragma unroll
      for (int k = 0; k < VW; ++k) o[k] = fmaf((rf::to_acc(v[i].v[k]) - mean) * rstd, w[k], b[k]);
      store_f<T, VW>(y + base + c, o);
    }
  }
}

// ---- forward kernels --------------------------------------------------------------------------------------
template <typename T, int THREADS, bool RMS>
__global__ void __launch_bounds__(THREADS)
    norm_forward_v1(const T* __restrict__ x, const T* __restrict__ residual, const T* __restrict__ weight,
                    const T* __restrict__ bias, T* __restrict__ y, T* __restrict__ h,
                    float* __restrict__ mean_out, float* __restrict__ rstd_out, int rows, int cols,
                    float eps) {
  __shared__ float2 scratch[rf::kWarp];
  const BlockSum<THREADS> reduce{scratch};
  const long long row = blockIdx.x;
  const long long base = row * cols;
  // The row's values live in h once the residual has been added (each thread re-reads only what it wrote).
  const T* src = residual != nullptr ? h : x;
  float s = 0.f;
  for (int c = threadIdx.x; c < cols; c += THREADS) {
    float a = rf::to_acc(x[base + c]);
    if (residual != nullptr) {
      const T hv = rf::from_acc<T>(a + rf::to_acc(residual[base + c]));
      h[base + c] = hv;
      a = rf::to_acc(hv);
    }
    s += RMS ? a * a : a;
  }
  float mean = 0.f, q;
  if constexpr (RMS) {
    q = reduce(s);
  } else {
    mean = reduce(s) / cols;
    q = 0.f;
    for (int c = threadIdx.x; c < cols; c += THREADS) {
      const float d = rf::to_acc(src[base + c]) - mean;
      q = fmaf(d, d, q);
    }
    q = reduce(q);
  }
  const float rstd = rsqrtf(q / cols + eps);
  if (threadIdx.x == 0) {
    if (mean_out != nullptr) mean_out[row] = mean;
    if (rstd_out != nullptr) rstd_out[row] = rstd;
  }
  for (int c = threadIdx.x; c < cols; c += THREADS) {
    const float w = weight != nullptr ? rf::to_acc(weight[c]) : 1.f;
    const float b = bias != nullptr ? rf::to_acc(bias[c]) : 0.f;
    y[base + c] = rf::from_acc<T>(fmaf((rf::to_acc(src[base + c]) - mean) * rstd, w, b));
  }
}

template <typename T, int VW, int VECS, int LANES, bool RMS>
__global__ void __launch_bounds__(kTileBlock, blocks_for_cap(kTileBlock, forward_reg_cap<T, VW>()))
    norm_forward_v2(const T* __restrict__ x, const T* __restrict__ residual, const T* __restrict__ weight,
                    const T* __restrict__ bias, T* __restrict__ y, T* __restrict__ h,
                    float* __restrict__ mean_out, float* __restrict__ rstd_out, int rows, int cols,
                    float eps) {
  static_assert(LANES >= 4 && LANES <= rf::kWarp && (LANES & (LANES - 1)) == 0, "LANES: 4, 8, 16 or 32");
  const long long row = (long long)blockIdx.x * (kTileBlock / LANES) + threadIdx.x / LANES;
  if (row >= rows) return;  // whole tiles leave together; the reductions stay inside a tile
  forward_row<T, VW, VECS, LANES, RMS>(x, residual, weight, bias, y, h, mean_out, rstd_out, row, cols, eps,
                                       threadIdx.x % LANES, TileSum<LANES>{});
}

template <typename T, int VW, int VECS, int THREADS, bool RMS>
__global__ void __launch_bounds__(THREADS, blocks_for_cap(THREADS, forward_reg_cap<T, VW>()))
    norm_forward_v3(const T* __restrict__ x, const T* __restrict__ residual, const T* __restrict__ weight,
                    const T* __restrict__ bias, T* __restrict__ y, T* __restrict__ h,
                    float* __restrict__ mean_out, float* __restrict__ rstd_out, int rows, int cols,
                    float eps) {
  __shared__ float2 scratch[rf::kWarp];
  forward_row<T, VW, VECS, THREADS, RMS>(x, residual, weight, bias, y, h, mean_out, rstd_out, blockIdx.x,
                                         cols, eps, threadIdx.x, BlockSum<THREADS>{scratch});
}

// Dynamic shared memory: cached_vecs * 16 bytes (cached_vecs * VW * sizeof(T)).
template <typename T, int VW, int THREADS, bool RMS>
__global__ void __launch_bounds__(THREADS)
    norm_forward_v4(const T* __restrict__ x, const T* __restrict__ residual, const T* __restrict__ weight,
                    const T* __restrict__ bias, T* __restrict__ y, T* __restrict__ h,
                    float* __restrict__ mean_out, float* __restrict__ rstd_out, int rows, int cols,
                    float eps, int cached_vecs) {
  using V = rf::Vec<T, VW>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  V* cache = reinterpret_cast<V*>(smem_raw);
  __shared__ float2 scratch[rf::kWarp];
  const BlockSum<THREADS> reduce{scratch};
  rf::pdl_launch_dependents();
  rf::pdl_wait();
  const long long row = blockIdx.x;
  const long long base = row * cols;
  const int nvec = cols / VW;
  const T* src = residual != nullptr ? h : x;  // where the row's values are, for the uncached tail

  // Pass 1: stream the row in (kUnroll vectors in flight per thread), add the residual, cache, sum.
  float s = 0.f;
  for (int j0 = threadIdx.x; j0 < nvec; j0 += kUnroll * THREADS) {
    V xv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = j0 + u * THREADS;
      if (j < nvec) xv[u] = rf::load_vec<T, VW>(x + base + (long long)j * VW);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = j0 + u * THREADS;
      if (j >= nvec) continue;
      if (residual != nullptr) {
        const V rv = rf::load_vec<T, VW>(residual + base + (long long)j * VW);
#pragma unroll
        for (int k = 0; k < VW; ++k)
          xv[u].v[k] = rf::from_acc<T>(rf::to_acc(xv[u].v[k]) + rf::to_acc(rv.v[k]));
        rf::store_vec<T, VW>(h + base + (long long)j * VW, xv[u]);
      }
      if (j < cached_vecs) cache[j] = xv[u];
#pragma unroll
      for (int k = 0; k < VW; ++k) {
        const float a = rf::to_acc(xv[u].v[k]);
        s = RMS ? fmaf(a, a, s) : s + a;
      }
    }
  }
  // Each thread reads back only the vectors it cached itself, so no barrier is needed for the cache.
  auto fetch = [&](int j) -> V {
    return j < cached_vecs ? cache[j] : rf::load_vec<T, VW>(src + base + (long long)j * VW);
  };

  float mean = 0.f, q;
  if constexpr (RMS) {
    q = reduce(s);
  } else {
    mean = reduce(s) / cols;
    q = 0.f;
    for (int j = threadIdx.x; j < nvec; j += THREADS) {
      const V hv = fetch(j);
#pragma unroll
      for (int k = 0; k < VW; ++k) {
        const float d = rf::to_acc(hv.v[k]) - mean;
        q = fmaf(d, d, q);
      }
    }
    q = reduce(q);
  }
  const float rstd = rsqrtf(q / cols + eps);
  if (threadIdx.x == 0) {
    if (mean_out != nullptr) mean_out[row] = mean;
    if (rstd_out != nullptr) rstd_out[row] = rstd;
  }
  for (int j = threadIdx.x; j < nvec; j += THREADS) {
    const V hv = fetch(j);
    float w[VW], b[VW], o[VW];
    load_f_or<T, VW>(weight == nullptr ? nullptr : weight + j * VW, w, 1.f);
    load_f_or<T, VW>(bias == nullptr ? nullptr : bias + j * VW, b, 0.f);
#pragma unroll
    for (int k = 0; k < VW; ++k) o[k] = fmaf((rf::to_acc(hv.v[k]) - mean) * rstd, w[k], b[k]);
    store_f<T, VW>(y + base + (long long)j * VW, o);
  }
}

// ---- backward, row in registers (v2, v3) ----------------------------------------------------------------
// dx for one row; adds dy * xhat and dy of the thread's columns into acc_dw / acc_db. x and dy stay in their
// storage type; xhat and dy * w are recomputed for the output pass rather than kept.
template <typename T, int VW, int VECS, int STRIDE, bool RMS, typename Reduce>
__device__ __forceinline__ void backward_row(const T* __restrict__ dy, const T* __restrict__ x,
                                             const T* __restrict__ weight, const float* __restrict__ mean_in,
                                             const float* __restrict__ rstd_in, T* __restrict__ dx,
                                             long long row, int cols, int tid, const Reduce& reduce,
                                             float (&acc_dw)[VECS][VW], float (&acc_db)[VECS][VW]) {
  using V = rf::Vec<T, VW>;
  const long long base = row * cols;
  const int mine = vectors_of<VW, STRIDE>(tid, cols);
  V xv[VECS], gv[VECS];
#pragma unroll
  for (int i = 0; i < VECS; ++i) {
    const int c = (tid + i * STRIDE) * VW;
    if (i < mine) {
      xv[i] = rf::load_vec<T, VW>(x + base + c);
      gv[i] = rf::load_vec<T, VW>(dy + base + c);
    }
  }
  const float mean = RMS ? 0.f : mean_in[row];
  const float rstd = rstd_in[row];
  float a = 0.f, b = 0.f;  // sum(g), sum(g * xhat) over the thread's columns, g = dy * w
#pragma unroll
  for (int i = 0; i < VECS; ++i) {
    const int c = (tid + i * STRIDE) * VW;
    if (i < mine) {
      float w[VW];
      load_f_or<T, VW>(weight == nullptr ? nullptr : weight + c, w, 1.f);
#pragma unroll
      for (int k = 0; k < VW; ++k) {
        const float d = rf::to_acc(gv[i].v[k]);
        const float xhat = (rf::to_acc(xv[i].v[k]) - mean) * rstd;
        acc_dw[i][k] = fmaf(d, xhat, acc_dw[i][k]);
        if constexpr (!RMS) acc_db[i][k] += d;
        const float g = d * w[k];
        a += g;
        b = fmaf(g, xhat, b);
      }
    }
  }
  float c1 = 0.f, c2;
  if constexpr (RMS) {
    c2 = reduce(b) / cols;
  } else {
    const float2 ab = reduce(make_float2(a, b));
    c1 = ab.x / cols;
    c2 = ab.y / cols;
  }
#pragma unroll
  for (int i = 0; i < VECS; ++i) {
    const int c = (tid + i * STRIDE) * VW;
    if (i < mine) {
      float w[VW], o[VW];
      load_f_or<T, VW>(weight == nullptr ? nullptr : weight + c, w, 1.f);
#pragma unroll
      for (int k = 0; k < VW; ++k) {
        const float xhat = (rf::to_acc(xv[i].v[k]) - mean) * rstd;
        o[k] = rstd * (rf::to_acc(gv[i].v[k]) * w[k] - c1 - xhat * c2);
      }
      store_f<T, VW>(dx + base + c, o);
    }
  }
}

// Dynamic shared memory: (RMS ? 1 : 2) * cols floats when dw_part or db_part is given.
template <typename T, int VW, int VECS, int LANES, bool RMS>
__global__ void __launch_bounds__(kTileBlockBwd,
                                  blocks_for_cap(kTileBlockBwd, backward_tile_reg_cap<T, VW>()))
    norm_backward_v2(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ weight,
                     const float* __restrict__ mean_in, const float* __restrict__ rstd_in, T* __restrict__ dx,
                     float* __restrict__ dw_part, float* __restrict__ db_part, int rows, int cols) {
  static_assert(LANES >= 4 && LANES <= rf::kWarp && (LANES & (LANES - 1)) == 0, "LANES: 4, 8, 16 or 32");
  extern __shared__ float block_acc[];  // [cols] dw, then [cols] db
  constexpr int kTiles = kTileBlockBwd / LANES;
  const int tile = threadIdx.x / LANES, lane = threadIdx.x % LANES;
  float acc_dw[VECS][VW], acc_db[VECS][VW];
#pragma unroll
  for (int i = 0; i < VECS; ++i)
#pragma unroll
    for (int k = 0; k < VW; ++k) acc_dw[i][k] = acc_db[i][k] = 0.f;
  const long long row_step = (long long)gridDim.x * kTiles;
  for (long long row = (long long)blockIdx.x * kTiles + tile; row < rows; row += row_step)
    backward_row<T, VW, VECS, LANES, RMS>(dy, x, weight, mean_in, rstd_in, dx, row, cols, lane,
                                          TileSum<LANES>{}, acc_dw, acc_db);
  if (dw_part == nullptr && db_part == nullptr) return;
  // The kTiles tiles of the block hold the same columns: add them up in shared memory, one tile after the
  // other (a fixed order, so the result is the same from run to run; it happens once per block).
  float* s_dw = block_acc;
  float* s_db = block_acc + (RMS ? 0 : cols);
  const int mine = vectors_of<VW, LANES>(lane, cols);
  for (int t = 0; t < kTiles; ++t) {
    if (tile == t) {
#pragma unroll
      for (int i = 0; i < VECS; ++i) {
        if (i < mine) {
          const int c = (lane + i * LANES) * VW;
#pragma unroll
          for (int k = 0; k < VW; ++k) {
            s_dw[c + k] = (t == 0 ? 0.f : s_dw[c + k]) + acc_dw[i][k];
            if constexpr (!RMS) s_db[c + k] = (t == 0 ? 0.f : s_db[c + k]) + acc_db[i][k];
          }
        }
      }
    }
    __syncthreads();
  }
  const long long out = (long long)blockIdx.x * cols;
  for (int c = threadIdx.x; c < cols; c += kTileBlockBwd) {
    if (dw_part != nullptr) dw_part[out + c] = s_dw[c];
    if (!RMS && db_part != nullptr) db_part[out + c] = s_db[c];
  }
}

template <typename T, int VW, int VECS, int THREADS, bool RMS>
__global__ void __launch_bounds__(THREADS, blocks_for_cap(THREADS, kBackwardBlockRegCap))
    norm_backward_v3(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ weight,
                     const float* __restrict__ mean_in, const float* __restrict__ rstd_in, T* __restrict__ dx,
                     float* __restrict__ dw_part, float* __restrict__ db_part, int rows, int cols) {
  __shared__ float2 scratch[rf::kWarp];
  float acc_dw[VECS][VW], acc_db[VECS][VW];
#pragma unroll
  for (int i = 0; i < VECS; ++i)
#pragma unroll
    for (int k = 0; k < VW; ++k) acc_dw[i][k] = acc_db[i][k] = 0.f;
  for (long long row = blockIdx.x; row < rows; row += gridDim.x)
    backward_row<T, VW, VECS, THREADS, RMS>(dy, x, weight, mean_in, rstd_in, dx, row, cols, threadIdx.x,
                                            BlockSum<THREADS>{scratch}, acc_dw, acc_db);
  const long long out = (long long)blockIdx.x * cols;
#pragma unroll
  for (int i = 0; i < VECS; ++i) {
    const int c = (threadIdx.x + i * THREADS) * VW;
    if (c < cols) {
#pragma unroll
      for (int k = 0; k < VW; ++k) {
        if (dw_part != nullptr) dw_part[out + c + k] = acc_dw[i][k];
        if (!RMS && db_part != nullptr) db_part[out + c + k] = acc_db[i][k];
      }
    }
  }
}

// ---- backward v1 (naive) ---------------------------------------------------------------------------------
template <typename T, int THREADS, bool RMS>
__global__ void __launch_bounds__(THREADS)
    norm_backward_dx_v1(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ weight,
                        const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                        T* __restrict__ dx, int rows, int cols) {
  __shared__ float2 scratch[rf::kWarp];
  const BlockSum<THREADS> reduce{scratch};
  const long long row = blockIdx.x;
  const long long base = row * cols;
  const float mean = RMS ? 0.f : mean_in[row];
  const float rstd = rstd_in[row];
  float a = 0.f, b = 0.f;
  for (int c = threadIdx.x; c < cols; c += THREADS) {
    const float gw = rf::to_acc(dy[base + c]) * (weight != nullptr ? rf::to_acc(weight[c]) : 1.f);
    a += gw;
    b = fmaf(gw, (rf::to_acc(x[base + c]) - mean) * rstd, b);
  }
  const float2 ab = reduce(make_float2(a, b));
  const float c1 = RMS ? 0.f : ab.x / cols, c2 = ab.y / cols;
  for (int c = threadIdx.x; c < cols; c += THREADS) {
    const float gw = rf::to_acc(dy[base + c]) * (weight != nullptr ? rf::to_acc(weight[c]) : 1.f);
    const float xhat = (rf::to_acc(x[base + c]) - mean) * rstd;
    dx[base + c] = rf::from_acc<T>(rstd * (gw - c1 - xhat * c2));
  }
}

// dweight / dbias straight to T (no partials): a thread per column walks down all rows.
template <typename T, bool RMS>
__global__ void __launch_bounds__(256)
    norm_backward_dwdb_v1(const T* __restrict__ dy, const T* __restrict__ x,
                          const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                          T* __restrict__ dw, T* __restrict__ db, int rows, int cols) {
  const int c = blockIdx.x * 256 + threadIdx.x;
  if (c >= cols) return;
  float sw = 0.f, sb = 0.f;
  for (long long row = 0; row < rows; ++row) {
    const float g = rf::to_acc(dy[row * cols + c]);
    const float xhat = (rf::to_acc(x[row * cols + c]) - (RMS ? 0.f : mean_in[row])) * rstd_in[row];
    sw = fmaf(g, xhat, sw);
    sb += g;
  }
  if (dw != nullptr) dw[c] = rf::from_acc<T>(sw);
  if (!RMS && db != nullptr) db[c] = rf::from_acc<T>(sb);
}

// ---- backward v4 (any row length) ------------------------------------------------------------------------
// Per row: c1 = mean(g), c2 = mean(g * xhat) with g = dy * w, into consts[row] (float2; c1 = 0 for RMS).
template <typename T, int VW, int THREADS, bool RMS>
__global__ void __launch_bounds__(THREADS)
    norm_backward_stats_v4(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ weight,
                           const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                           float2* __restrict__ consts, int rows, int cols) {
  using V = rf::Vec<T, VW>;
  __shared__ float2 scratch[rf::kWarp];
  const long long row = blockIdx.x;
  const long long base = row * cols;
  const int nvec = cols / VW;
  const float mean = RMS ? 0.f : mean_in[row];
  const float rstd = rstd_in[row];
  float a = 0.f, b = 0.f;
  for (int j0 = threadIdx.x; j0 < nvec; j0 += kUnroll * THREADS) {
    V xv[kUnroll], gv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = j0 + u * THREADS;
      if (j < nvec) {
        xv[u] = rf::load_vec<T, VW>(x + base + (long long)j * VW);
        gv[u] = rf::load_vec<T, VW>(dy + base + (long long)j * VW);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = j0 + u * THREADS;
      if (j >= nvec) continue;
      float w[VW];
      load_f_or<T, VW>(weight == nullptr ? nullptr : weight + j * VW, w, 1.f);
#pragma unroll
      for (int k = 0; k < VW; ++k) {
        const float gw = rf::to_acc(gv[u].v[k]) * w[k];
        a += gw;
        b = fmaf(gw, (rf::to_acc(xv[u].v[k]) - mean) * rstd, b);
      }
    }
  }
  const float2 ab = BlockSum<THREADS>{scratch}(make_float2(a, b));
  if (threadIdx.x == 0) consts[row] = make_float2(RMS ? 0.f : ab.x / cols, ab.y / cols);
}

// Grid (ceil(nvec / kColThreads), parts): block (bx, p) owns column vectors bx * kColThreads + t and rows
// [p * rows_per_part, (p + 1) * rows_per_part); writes dx there and one partial row p of dw / db.
template <typename T, int VW, bool RMS>
__global__ void __launch_bounds__(kColThreads)
    norm_backward_cols_v4(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ weight,
                          const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                          const float2* __restrict__ consts, T* __restrict__ dx, float* __restrict__ dw_part,
                          float* __restrict__ db_part, int rows, int cols, int rows_per_part) {
  const int j = blockIdx.x * kColThreads + threadIdx.x;
  const int c = j * VW;
  if (c >= cols) return;
  const long long r0 = (long long)blockIdx.y * rows_per_part;
  const long long r1 = min((long long)rows, r0 + rows_per_part);
  float w[VW], acc_dw[VW], acc_db[VW];
  load_f_or<T, VW>(weight == nullptr ? nullptr : weight + c, w, 1.f);
#pragma unroll
  for (int k = 0; k < VW; ++k) acc_dw[k] = acc_db[k] = 0.f;
  for (long long row0 = r0; row0 < r1; row0 += kUnroll) {
    float xv[kUnroll][VW], gv[kUnroll][VW];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (row0 + u < r1) {
        load_f<T, VW>(x + (row0 + u) * cols + c, xv[u]);
        load_f<T, VW>(dy + (row0 + u) * cols + c, gv[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const long long row = row0 + u;
      if (row >= r1) continue;
      const float mean = RMS ? 0.f : mean_in[row];
      const float rstd = rstd_in[row];
      const float2 k12 = consts[row];
      float o[VW];
#pragma unroll
      for (int k = 0; k < VW; ++k) {
        const float xhat = (xv[u][k] - mean) * rstd;
        acc_dw[k] = fmaf(gv[u][k], xhat, acc_dw[k]);
        acc_db[k] += gv[u][k];
        o[k] = rstd * (gv[u][k] * w[k] - k12.x - xhat * k12.y);
      }
      store_f<T, VW>(dx + row * cols + c, o);
    }
  }
  const long long out = (long long)blockIdx.y * cols + c;
#pragma unroll
  for (int k = 0; k < VW; ++k) {
    if (dw_part != nullptr) dw_part[out + k] = acc_dw[k];
    if (!RMS && db_part != nullptr) db_part[out + k] = acc_db[k];
  }
}

// ---- partial sums -> dweight / dbias ----------------------------------------------------------------------
// Block (32, kReduceRows): threadIdx.x picks a column of the block's 32, threadIdx.y every kReduceRows-th
// partial row; the kReduceRows sums meet in shared memory. Either output may be nullptr.
template <typename T>
__global__ void __launch_bounds__(rf::kWarp * kReduceRows)
    norm_backward_reduce(const float* __restrict__ dw_part, const float* __restrict__ db_part, int parts,
                         int cols, T* __restrict__ dw, T* __restrict__ db) {
  __shared__ float s_dw[kReduceRows][rf::kWarp + 1], s_db[kReduceRows][rf::kWarp + 1];
  const int c = blockIdx.x * rf::kWarp + threadIdx.x;
  float sw = 0.f, sb = 0.f;
  if (c < cols) {
    for (int p = threadIdx.y; p < parts; p += kReduceRows) {
      if (dw_part != nullptr) sw += dw_part[(long long)p * cols + c];
      if (db_part != nullptr) sb += db_part[(long long)p * cols + c];
    }
  }
  s_dw[threadIdx.y][threadIdx.x] = sw;
  s_db[threadIdx.y][threadIdx.x] = sb;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    for (int r = 1; r < kReduceRows; ++r) {
      sw += s_dw[r][threadIdx.x];
      sb += s_db[r][threadIdx.x];
    }
    if (dw != nullptr) dw[c] = rf::from_acc<T>(sw);
    if (db != nullptr) db[c] = rf::from_acc<T>(sb);
  }
}

}  // namespace norms
