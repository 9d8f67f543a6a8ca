// softmax.cu: softmax and log_softmax along the last axis, forward and backward.
//
// Memory layout: every array is a C-contiguous [rows, cols] matrix (the launcher moves the softmax axis
// last and copies once when needed). The optional additive mask is a C-contiguous [mask_rows, cols]
// matrix; row r of x uses mask row (r / mask_div) % mask_mod, which covers a (cols,) mask (div 1, mod 1),
// an (S_q, S_k) mask under x [B, H, S_q, S_k] (div 1, mod S_q) and a [B, 1, 1, S_k] padding mask (div H*S_q,
// mod B). Causal masking (causal_rows > 0): entry j of row r is masked when j > r % causal_rows +
// causal_offset (causal_rows = S_q, causal_offset = S_k - S_q).
//
// Forward:  z = scale * x + mask;  y = exp(z - max z) / sum exp(z - max z);  log: y = z - max z - log(sum).
// Backward: softmax      dx = scale * y * (dy - sum(dy * y))
//           log_softmax  dx = scale * (dy - exp(y) * sum(dy))
//
// Arithmetic: fp32 for fp16 and fp32 storage. The kernels work in base 2: t = x * (scale * log2 e) +
// mask * log2 e, so each exponential is one exp2f; log_softmax converts back with ln 2. Max and sums are
// reduced in registers, then across the warp (shfl_xor), the block (shared memory) or the cluster
// (distributed shared memory).
//
// Special values. Plain softmax follows the float64 reference exp(z - max) / sum, i.e. NumPy: a NaN or a
// +inf in a row makes the whole row NaN, a row of -inf is NaN, single -inf entries give 0. (The max is
// taken with fmaxf, which skips NaN, but a NaN still reaches every output through the sum.) With a mask or
// causal masking, a row whose every entry is -inf after masking gives 0 (log_softmax too) instead of NaN,
// the attention convention: the kernels then subtract 0 instead of the max and output 0.
//
// Versions. Each kernel holds fp32 t-values (forward) or raw storage vectors (backward) as below; "E" is
// elements per thread. VW = 16 / sizeof(T) (one 16-byte access) when cols * sizeof(T) and every pointer
// are 16-byte aligned, else 1 (scalar accesses; still coalesced across a warp).
//   softmax_forward_v1<T, THREADS, MASK>           block per row, three passes over global memory (max,
//                                                  sum, write), scalar loads. Any cols; the reference kernel.
//   softmax_forward_v2<T, VW, VECS, MASK>          warp per row (4 rows per 128-thread block), the row in
//                                                  registers (E = VECS*VW <= 32 floats per lane): one read,
//                                                  one write, no shared memory. cols <= 32 * E (1024).
//   softmax_forward_v3<T, VW, VECS, THREADS, MASK> block per row, row in registers (E = 32): warp shuffles
//                                                  then shared memory. cols <= THREADS * 32 (up to 32768).
//   softmax_forward_v4<T, VW, THREADS, MASK>       block per row, any cols: one read pass keeping an online
//                                                  (max, sum) per thread (rescaled when the max grows, once
//                                                  per batch of 4 vectors), merged across the block, then a
//                                                  second read (from L2 while concurrent rows fit it) and
//                                                  the write. 3 x 2 bytes/element instead of 2 x.
//   softmax_forward_v5<T, VW, VECS, THREADS, CLUSTER, MASK>   (sm_90) a thread-block cluster per row, the
//                                                  row in the registers of CLUSTER blocks (E = 32 per
//                                                  thread), block partials exchanged through distributed
//                                                  shared memory (cg::this_cluster().map_shared_rank). One
//                                                  read and one write for rows up to 8 * 1024 * 32 = 256k;
//                                                  smaller blocks than v3 at the same row length, so 2+
//                                                  rows are in flight per SM. On sm_80 it compiles to a
//                                                  trap; the launcher never picks it there.
//   softmax_backward_v1<T, THREADS>                block per row, two passes over global memory, scalar.
//   softmax_backward_v2<T, VW, VECS>               warp per row, dy and y in registers as raw storage
//                                                  vectors (converted twice, so E is 32 for fp16 and 16 for
//                                                  fp32 at 32 data registers). cols <= 32 * E.
//   softmax_backward_v3<T, VW, VECS, THREADS>      block per row, registers as v2. cols <= THREADS * E.
//   softmax_backward_v4<T, VW, THREADS>            block per row, any cols: a sum pass and a write pass over
//                                                  global memory with 16-byte vectors, 4 in flight.
// Register variants issue every load of the row before the first reduction. Thread (or lane) i of the
// NTOT threads that share a row holds the vectors at columns (v * NTOT + i) * VW, v < VECS: each load
// instruction of a warp reads 32 consecutive vectors. Rows are written in place safely (out may be x, or
// dx may be dy): every thread reads an element before it writes the same element, and no thread reads an
// element another thread writes.
//
// Why this set. A softmax moves 2 bytes/element (fp16: read + write) and must do it at copy speed, so
// every version but v1 reads x once where it can: the row lives in registers, and the question is only
// how many threads share it. Up to 1024 columns a warp suffices (no shared memory, no barrier); up to 16k
// one block (fp16 at 128 threads x 32 elements per 4k). Past that a single block needs 1024 threads and
// 64 registers each, one block per SM: its load, reduce and store phases then run one after another with
// nothing to overlap them. v5 splits such rows over a cluster of 512-thread blocks instead (2 blocks per
// SM at <= 64 registers, so one block's reductions overlap another's loads) and reaches 128k columns with
// 8 blocks, 256k with 8 x 1024 threads. v4 is the general fallback past that (and past 32k on sm_80): its
// second read mostly hits L2. The launcher's rule, by row length (E = 32 floats per thread):
//   cols <= 256: v2, 8 elements per lane; <= 1024: v2, 32 per lane; <= 32768: v3 with the smallest
//   power-of-two block >= cols / 32 (64 .. 1024; measured on the H100 at 32000 columns: v3 with 1024
//   threads 2728 GB/s, v5 2188); <= 256k on sm_90: v5 with 4 or 8 blocks of 512 (8 of 1024 past 128k);
//   longer: v4. With a mask, v3 stops at 512 threads (16k columns) and v5 at 8 x 512 (the mask's
//   registers). Backward: v2 up to 32 * E, v3 up to 1024 * E, else v4.
// Register use (nvcc 13.0, sm_90, no spills anywhere): unmasked forward 28-64, masked forward up to 90
// (launch bound with a 1-block minimum: without it ptxas caps them at 64 and spills), backward 21-68.
//
// Kernel arguments are pointers and ints only. Forward kernels take c = scale * log2(e) and `log_out`
// (0: softmax, 1: log_softmax, a run-time flag: it changes only the last formula).
#include "common.cuh"

// __cluster_dims__ is an error for targets below sm_90; the sm_80 build of v5 is never launched.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define RF_SOFTMAX_CLUSTER_DIMS(c)
#else
#define RF_SOFTMAX_CLUSTER_DIMS(c) __cluster_dims__(c, 1, 1)
#endif

// Masked forward kernels hold the mask's raw vectors next to x's while the loads are in flight. Left to
// itself ptxas caps them at 64 registers and spills; a minimum of 1 block per SM lets it take the 80-90
// they need (0 = no minimum, the plain launch bound, for the unmasked kernels that fit 64).
#define RF_SOFTMAX_BOUNDS(threads, masked) __launch_bounds__(threads, (masked) ? 1 : 0)

namespace rf_softmax {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kWarpRows = 4;  // v2: rows (warps) per 128-thread block
constexpr int kBatch = 4;     // v4 / backward v4: vectors in flight per thread per step

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// Columns of row `row` that are not causally masked (all of them without causal masking).
__device__ __forceinline__ int valid_cols(int row, int cols, int causal_rows, int causal_offset) {
  if (causal_rows <= 0) return cols;
  const int limit = row % causal_rows + causal_offset + 1;  // columns j < limit are kept
  return max(0, min(cols, limit));
}

template <typename T> struct IsHalf { static constexpr bool value = false; };
template <> struct IsHalf<__half> { static constexpr bool value = true; };

// Storage vector <-> floats. fp16 pairs go through one packed conversion.
template <typename T, int VW>
__device__ __forceinline__ void to_floats(const rf::Vec<T, VW>& v, float (&f)[VW]) {
#pragma unroll
  for (int k = 0; k < VW; ++k) f[k] = rf::to_acc(v.v[k]);
}

template <typename T, int VW>
__device__ __forceinline__ rf::Vec<T, VW> from_floats(const float (&f)[VW]) {
  rf::Vec<T, VW> v;
  if constexpr (IsHalf<T>::value && VW % 2 == 0) {
#pragma unroll
    for (int k = 0; k < VW; k += 2) {
      const __half2 h = __floats2half2_rn(f[k], f[k + 1]);
      v.v[k] = __low2half(h);
      v.v[k + 1] = __high2half(h);
    }
  } else {
#pragma unroll
    for (int k = 0; k < VW; ++k) v.v[k] = rf::from_acc<T>(f[k]);
  }
  return v;
}

template <typename T, int VW> __device__ __forceinline__ rf::Vec<T, VW> zero_vec() {
  rf::Vec<T, VW> v;
#pragma unroll
  for (int k = 0; k < VW; ++k) v.v[k] = rf::from_acc<T>(0.f);
  return v;
}

// The mask row that x's row `row` adds, or nullptr without a mask.
template <typename T, bool MASK>
__device__ __forceinline__ const T* mask_row(const T* mask, int row, int cols, int mask_div, int mask_mod) {
  if constexpr (MASK) return mask + static_cast<size_t>((row / mask_div) % mask_mod) * cols;
  return nullptr;
}

// t-value (base-2 logit) of element `col`: x * c + mask * log2 e, or -inf when causally masked.
template <bool MASK>
__device__ __forceinline__ float logit2(float x, float m, float c, int col, int valid) {
  const float t = MASK ? fmaf(x, c, m * kLog2e) : x * c;
  return col < valid ? t : neg_inf();
}

// What a row's max and sum turn into: the offset subtracted before exp2 and the factors of the last step.
struct RowStats {
  float mu;    // subtracted from every t-value (the max; 0 for a fully masked row when guarded)
  float inv;   // 1 / sum (0 for a fully masked row when guarded)
  float lse;   // log(sum) in natural units
  bool empty;  // a fully masked row (guarded only): every output is 0
};

__device__ __forceinline__ float guarded_offset(float m, bool guard) {
  return (guard && m == neg_inf()) ? 0.f : m;
}

// Factor that moves a sum taken relative to offset m_old (a max, -inf while nothing finite was seen) to
// offset mu_new >= m_old. A sum relative to -inf is 0 (or NaN, which must survive), so the factor is 0 then,
// never exp2(+large) = inf, which would turn 0 into NaN.
__device__ __forceinline__ float rescale(float m_old, float mu_new) {
  return m_old == neg_inf() ? 0.f : exp2f(m_old - mu_new);
}

__device__ __forceinline__ RowStats finish_stats(float mu, float s, bool guard) {
  if (guard && s == 0.f) return {mu, 0.f, 0.f, true};
  return {mu, 1.f / s, logf(s), false};
}

// Final value of one element: softmax exp2(t - mu) / sum (from e = exp2(t - mu)), or log_softmax (0 in a
// fully masked row, like softmax: no -inf reaches a loss).
__device__ __forceinline__ float output(float t, float e, const RowStats& st, int log_out) {
  return log_out ? (st.empty ? 0.f : fmaf(t - st.mu, kLn2, -st.lse)) : e * st.inv;
}

// ---- reductions over the threads that share a row ------------------------------------------------------

struct WarpReduce {
  __device__ __forceinline__ float max(float v) const { return rf::warp_reduce(v, rf::Max{}); }
  __device__ __forceinline__ float sum(float v) const { return rf::warp_reduce(v, rf::Sum{}); }
};

template <int THREADS> struct BlockReduce {
  float* scratch;  // THREADS / 32 floats of shared memory
  __device__ __forceinline__ float max(float v) const { return rf::block_reduce<THREADS>(v, rf::Max{}, scratch); }
  __device__ __forceinline__ float sum(float v) const { return rf::block_reduce<THREADS>(v, rf::Sum{}, scratch); }
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// A block reduction, then the CLUSTER block partials read from each block's shared memory. The max and the
// sum use separate slots, so one cluster barrier per reduction suffices; after reading the sums each thread
// arrives at a last cluster barrier that the kernel waits on just before it exits (no block may leave while
// another may still read its shared memory), so the output stores overlap that barrier.
template <int THREADS, int CLUSTER> struct ClusterReduce {
  float* scratch;  // THREADS / 32 floats
  float* slots;    // 2 floats: the block's max, then its sum
  template <typename Op> __device__ __forceinline__ float reduce(float v, Op op, int slot) const {
    v = rf::block_reduce<THREADS>(v, op, scratch);
    if (threadIdx.x == 0) slots[slot] = v;
    cg::this_cluster().sync();  // release / acquire: every block's slot is visible cluster-wide
    // Lane l reads block (l % CLUSTER)'s partial; a CLUSTER-wide butterfly gives every lane the total.
    const int lane = threadIdx.x % rf::kWarp;
    const float r = *cg::this_cluster().map_shared_rank(&slots[slot], lane % CLUSTER);
    return rf::warp_reduce<CLUSTER>(r, op);
  }
  __device__ __forceinline__ float max(float v) const { return reduce(v, rf::Max{}, 0); }
  __device__ __forceinline__ float sum(float v) const {
    const float s = reduce(v, rf::Sum{}, 1);
    cg::this_cluster().barrier_arrive();  // release: this thread's remote reads are done
    return s;
  }
};
#endif

// ---- forward, row in registers (v2, v3, v5) -------------------------------------------------------------

// One row, held by NTOT threads; this thread is number `first` of them and holds the vectors at columns
// first * VW + v * NTOT * VW. Bounds are kept relative to the thread's first column, so each check compares
// one register with a compile-time constant (per-vector column registers would cost VECS registers).
template <typename T, int VW, int VECS, int NTOT, bool MASK, typename Reduce>
__device__ __forceinline__ void forward_row(const T* x, T* y, const T* mask, int row, int cols, float c,
                                            int mask_div, int mask_mod, int causal_rows, int causal_offset,
                                            int log_out, int first, const Reduce& reduce) {
  constexpr int kStride = NTOT * VW;  // columns between a thread's consecutive vectors
  const size_t offset = static_cast<size_t>(row) * cols + static_cast<size_t>(first) * VW;
  const T* xr = x + offset;
  const T* mr = MASK ? mask_row<T, MASK>(mask, row, cols, mask_div, mask_mod) + first * VW : nullptr;
  const int valid = valid_cols(row, cols, causal_rows, causal_offset) - first * VW;  // may be <= 0
  const bool guard = MASK || causal_rows > 0;

  // Issue every load of the row first (skipping causally masked vectors), then convert.
  rf::Vec<T, VW> xv[VECS];
  rf::Vec<T, VW> mv[MASK ? VECS : 1];
#pragma unroll
  for (int v = 0; v < VECS; ++v) {
    const bool in = v * kStride < valid;
    xv[v] = in ? rf::load_vec<T, VW>(xr + v * kStride) : zero_vec<T, VW>();
    if constexpr (MASK) mv[v] = in ? rf::load_vec<T, VW>(mr + v * kStride) : zero_vec<T, VW>();
  }

  float t[VECS][VW];
  float m = neg_inf();
#pragma unroll
  for (int v = 0; v < VECS; ++v) {
    float xf[VW], mf[VW];
    to_floats<T, VW>(xv[v], xf);
    if constexpr (MASK) to_floats<T, VW>(mv[MASK ? v : 0], mf);
#pragma unroll
    for (int k = 0; k < VW; ++k) {
      t[v][k] = logit2<MASK>(xf[k], MASK ? mf[k] : 0.f, c, v * kStride + k, valid);
      m = fmaxf(m, t[v][k]);
    }
  }
  m = reduce.max(m);
  const float mu = guarded_offset(m, guard);

  constexpr int kParts = 4;  // independent partial sums: shorter dependency chains
  float part[kParts] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int v = 0; v < VECS; ++v) {
#pragma unroll
    for (int k = 0; k < VW; ++k) {
      const float e = exp2f(t[v][k] - mu);
      part[(v * VW + k) % kParts] += e;
      t[v][k] = log_out ? t[v][k] : e;  // log_softmax needs t later, softmax only e
    }
  }
  const float s = reduce.sum((part[0] + part[1]) + (part[2] + part[3]));
  const RowStats st = finish_stats(mu, s, guard);

  T* yr = y + offset;
  const int rest = cols - first * VW;
#pragma unroll
  for (int v = 0; v < VECS; ++v) {
    if (v * kStride < rest) {
      float o[VW];
#pragma unroll
      for (int k = 0; k < VW; ++k) o[k] = output(t[v][k], t[v][k], st, log_out);
      rf::store_vec<T, VW>(yr + v * kStride, from_floats<T, VW>(o));
    }
  }
}

}  // namespace rf_softmax

// ---- forward kernels ------------------------------------------------------------------------------------

template <typename T, int THREADS, bool MASK>
__global__ void RF_SOFTMAX_BOUNDS(THREADS, MASK)
    softmax_forward_v1(const T* x, T* y, const T* mask, int rows, int cols, float c, int mask_div, int mask_mod,
                       int causal_rows, int causal_offset, int log_out) {
  using namespace rf_softmax;
  __shared__ float scratch[THREADS / rf::kWarp];
  const BlockReduce<THREADS> reduce{scratch};
  const int row = blockIdx.x;
  const size_t offset = static_cast<size_t>(row) * cols;
  const T* xr = x + offset;
  const T* mr = mask_row<T, MASK>(mask, row, cols, mask_div, mask_mod);
  const int valid = valid_cols(row, cols, causal_rows, causal_offset);
  const bool guard = MASK || causal_rows > 0;
  auto logit = [&](int j) {
    return logit2<MASK>(rf::to_acc(xr[j]), MASK ? rf::to_acc(mr[j]) : 0.f, c, j, valid);
  };

  float m = neg_inf();
  for (int j = threadIdx.x; j < valid; j += THREADS) m = fmaxf(m, logit(j));
  const float mu = guarded_offset(reduce.max(m), guard);
  float s = 0.f;
  for (int j = threadIdx.x; j < valid; j += THREADS) s += exp2f(logit(j) - mu);
  const RowStats st = finish_stats(mu, reduce.sum(s), guard);
  T* yr = y + offset;
  for (int j = threadIdx.x; j < cols; j += THREADS) {
    const float t = j < valid ? logit(j) : neg_inf();
    yr[j] = rf::from_acc<T>(output(t, log_out ? 0.f : exp2f(t - mu), st, log_out));
  }
}

template <typename T, int VW, int VECS, bool MASK>
__global__ void RF_SOFTMAX_BOUNDS(rf_softmax::kWarpRows * rf::kWarp, MASK)
    softmax_forward_v2(const T* x, T* y, const T* mask, int rows, int cols, float c, int mask_div, int mask_mod,
                       int causal_rows, int causal_offset, int log_out) {
  using namespace rf_softmax;
  const int row = blockIdx.x * kWarpRows + threadIdx.x / rf::kWarp;
  if (row >= rows) return;  // whole warps leave; v2 has no block-wide barrier
  forward_row<T, VW, VECS, rf::kWarp, MASK>(x, y, mask, row, cols, c, mask_div, mask_mod, causal_rows,
                                            causal_offset, log_out, threadIdx.x % rf::kWarp, WarpReduce{});
}

template <typename T, int VW, int VECS, int THREADS, bool MASK>
__global__ void RF_SOFTMAX_BOUNDS(THREADS, MASK)
    softmax_forward_v3(const T* x, T* y, const T* mask, int rows, int cols, float c, int mask_div, int mask_mod,
                       int causal_rows, int causal_offset, int log_out) {
  using namespace rf_softmax;
  __shared__ float scratch[THREADS / rf::kWarp];
  forward_row<T, VW, VECS, THREADS, MASK>(x, y, mask, blockIdx.x, cols, c, mask_div, mask_mod, causal_rows,
                                          causal_offset, log_out, threadIdx.x, BlockReduce<THREADS>{scratch});
}

template <typename T, int VW, int THREADS, bool MASK>
__global__ void RF_SOFTMAX_BOUNDS(THREADS, MASK)
    softmax_forward_v4(const T* x, T* y, const T* mask, int rows, int cols, float c, int mask_div, int mask_mod,
                       int causal_rows, int causal_offset, int log_out) {
  using namespace rf_softmax;
  __shared__ float scratch[THREADS / rf::kWarp];
  const BlockReduce<THREADS> reduce{scratch};
  constexpr int kStep = THREADS * VW * kBatch;  // columns per step of the block
  const int row = blockIdx.x;
  const size_t offset = static_cast<size_t>(row) * cols;
  const T* xr = x + offset;
  const T* mr = mask_row<T, MASK>(mask, row, cols, mask_div, mask_mod);
  const int valid = valid_cols(row, cols, causal_rows, causal_offset);
  const bool guard = MASK || causal_rows > 0;

  // Loads kBatch vectors of one step (zeros past `valid`) and turns them into t-values.
  auto load_step = [&](int base, float (&t)[kBatch][VW]) {
    rf::Vec<T, VW> xv[kBatch];
    rf::Vec<T, VW> mv[MASK ? kBatch : 1];
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int col = base + b * THREADS * VW;
      const bool in = col < valid;
      xv[b] = in ? rf::load_vec<T, VW>(xr + col) : zero_vec<T, VW>();
      if constexpr (MASK) mv[b] = in ? rf::load_vec<T, VW>(mr + col) : zero_vec<T, VW>();
    }
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int col = base + b * THREADS * VW;
      float xf[VW], mf[VW];
      to_floats<T, VW>(xv[b], xf);
      if constexpr (MASK) to_floats<T, VW>(mv[MASK ? b : 0], mf);
#pragma unroll
      for (int k = 0; k < VW; ++k) t[b][k] = logit2<MASK>(xf[k], MASK ? mf[k] : 0.f, c, col + k, valid);
    }
  };

  // Pass 1: online (max, sum) per thread. The running sum is relative to the running offset mu (the max,
  // or 0 while everything seen is -inf) and is rescaled once per step when the max grows.
  float m = neg_inf(), s = 0.f;
  for (int base = threadIdx.x * VW; base < valid; base += kStep) {
    float t[kBatch][VW];
    load_step(base, t);
    float cm = m;
#pragma unroll
    for (int b = 0; b < kBatch; ++b)
#pragma unroll
      for (int k = 0; k < VW; ++k) cm = fmaxf(cm, t[b][k]);
    const float mu_new = guarded_offset(cm, true);
    float add = 0.f;
#pragma unroll
    for (int b = 0; b < kBatch; ++b)
#pragma unroll
      for (int k = 0; k < VW; ++k) add += exp2f(t[b][k] - mu_new);
    s = fmaf(s, rescale(m, mu_new), add);
    m = cm;
  }
  // Merge: the block max, then every thread's sum rescaled to it.
  const float bm = reduce.max(m);
  const float mu_all = guarded_offset(bm, true);
  s = reduce.sum(s * rescale(m, mu_all));
  // Unguarded rows use the true max (so an all -inf row gives NaN like the reference).
  const RowStats st = finish_stats(guard ? mu_all : bm, s, guard);

  // Pass 2: read again, write.
  T* yr = y + offset;
  for (int base = threadIdx.x * VW; base < cols; base += kStep) {
    float t[kBatch][VW];
    load_step(base, t);
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int col = base + b * THREADS * VW;
      if (col < cols) {
        float o[VW];
#pragma unroll
        for (int k = 0; k < VW; ++k) o[k] = output(t[b][k], log_out ? 0.f : exp2f(t[b][k] - st.mu), st, log_out);
        rf::store_vec<T, VW>(yr + col, from_floats<T, VW>(o));
      }
    }
  }
}

template <typename T, int VW, int VECS, int THREADS, int CLUSTER, bool MASK>
__global__ void RF_SOFTMAX_CLUSTER_DIMS(CLUSTER) RF_SOFTMAX_BOUNDS(THREADS, MASK)
    softmax_forward_v5(const T* x, T* y, const T* mask, int rows, int cols, float c, int mask_div, int mask_mod,
                       int causal_rows, int causal_offset, int log_out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using namespace rf_softmax;
  __shared__ float scratch[THREADS / rf::kWarp];
  __shared__ float slots[2];
  const cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int row = blockIdx.x / CLUSTER;
  forward_row<T, VW, VECS, THREADS * CLUSTER, MASK>(x, y, mask, row, cols, c, mask_div, mask_mod, causal_rows,
                                                    causal_offset, log_out, rank * THREADS + threadIdx.x,
                                                    ClusterReduce<THREADS, CLUSTER>{scratch, slots});
  // Matches the barrier_arrive in ClusterReduce::sum: no block exits while another may read its slots.
  cluster.barrier_wait();
#else
  __trap();  // clusters need sm_90; the launcher does not pick v5 on older GPUs
#endif
}

// ---- backward -------------------------------------------------------------------------------------------

namespace rf_softmax {

// dx of one element given s = sum(dy * y) (softmax) or sum(dy) (log_softmax).
__device__ __forceinline__ float grad(float g, float p, float s, float scale, int log_out) {
  return log_out ? scale * fmaf(-exp2f(p * kLog2e), s, g) : scale * p * (g - s);
}

template <typename T, int VW, int VECS, int NTOT, typename Reduce>
__device__ __forceinline__ void backward_row(const T* dy, const T* y, T* dx, int row, int cols, float scale,
                                             int log_out, int first, const Reduce& reduce) {
  constexpr int kStride = NTOT * VW;
  const size_t offset = static_cast<size_t>(row) * cols + static_cast<size_t>(first) * VW;
  const int rest = cols - first * VW;  // as in forward_row: bounds relative to this thread's first column
  rf::Vec<T, VW> gv[VECS], pv[VECS];  // raw storage: half the registers of floats for fp16
#pragma unroll
  for (int v = 0; v < VECS; ++v) {
    const bool in = v * kStride < rest;
    gv[v] = in ? rf::load_vec<T, VW>(dy + offset + v * kStride) : zero_vec<T, VW>();
    pv[v] = in ? rf::load_vec<T, VW>(y + offset + v * kStride) : zero_vec<T, VW>();
  }
  constexpr int kParts = 4;
  float part[kParts] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int v = 0; v < VECS; ++v) {
    float g[VW], p[VW];
    to_floats<T, VW>(gv[v], g);
    to_floats<T, VW>(pv[v], p);
#pragma unroll
    for (int k = 0; k < VW; ++k) part[(v * VW + k) % kParts] += log_out ? g[k] : g[k] * p[k];
  }
  const float s = reduce.sum((part[0] + part[1]) + (part[2] + part[3]));
#pragma unroll
  for (int v = 0; v < VECS; ++v) {
    if (v * kStride < rest) {
      float g[VW], p[VW], o[VW];
      to_floats<T, VW>(gv[v], g);
      to_floats<T, VW>(pv[v], p);
#pragma unroll
      for (int k = 0; k < VW; ++k) o[k] = grad(g[k], p[k], s, scale, log_out);
      rf::store_vec<T, VW>(dx + offset + v * kStride, from_floats<T, VW>(o));
    }
  }
}

}  // namespace rf_softmax

template <typename T, int THREADS>
__global__ void __launch_bounds__(THREADS)
    softmax_backward_v1(const T* dy, const T* y, T* dx, int rows, int cols, float scale, int log_out) {
  using namespace rf_softmax;
  __shared__ float scratch[THREADS / rf::kWarp];
  const size_t offset = static_cast<size_t>(blockIdx.x) * cols;
  float s = 0.f;
  for (int j = threadIdx.x; j < cols; j += THREADS) {
    const float g = rf::to_acc(dy[offset + j]);
    s += log_out ? g : g * rf::to_acc(y[offset + j]);
  }
  s = rf::block_reduce<THREADS>(s, rf::Sum{}, scratch);
  for (int j = threadIdx.x; j < cols; j += THREADS)
    dx[offset + j] = rf::from_acc<T>(grad(rf::to_acc(dy[offset + j]), rf::to_acc(y[offset + j]), s, scale, log_out));
}

template <typename T, int VW, int VECS>
__global__ void __launch_bounds__(rf_softmax::kWarpRows * rf::kWarp)
    softmax_backward_v2(const T* dy, const T* y, T* dx, int rows, int cols, float scale, int log_out) {
  using namespace rf_softmax;
  const int row = blockIdx.x * kWarpRows + threadIdx.x / rf::kWarp;
  if (row >= rows) return;
  backward_row<T, VW, VECS, rf::kWarp>(dy, y, dx, row, cols, scale, log_out, threadIdx.x % rf::kWarp,
                                       WarpReduce{});
}

template <typename T, int VW, int VECS, int THREADS>
__global__ void __launch_bounds__(THREADS)
    softmax_backward_v3(const T* dy, const T* y, T* dx, int rows, int cols, float scale, int log_out) {
  using namespace rf_softmax;
  __shared__ float scratch[THREADS / rf::kWarp];
  backward_row<T, VW, VECS, THREADS>(dy, y, dx, blockIdx.x, cols, scale, log_out, threadIdx.x,
                                     BlockReduce<THREADS>{scratch});
}

template <typename T, int VW, int THREADS>
__global__ void __launch_bounds__(THREADS)
    softmax_backward_v4(const T* dy, const T* y, T* dx, int rows, int cols, float scale, int log_out) {
  using namespace rf_softmax;
  __shared__ float scratch[THREADS / rf::kWarp];
  constexpr int kStep = THREADS * VW * kBatch;
  const size_t offset = static_cast<size_t>(blockIdx.x) * cols;
  const T* gr = dy + offset;
  const T* pr = y + offset;
  auto load_step = [&](int base, rf::Vec<T, VW> (&gv)[kBatch], rf::Vec<T, VW> (&pv)[kBatch]) {
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int col = base + b * THREADS * VW;
      const bool in = col < cols;
      gv[b] = in ? rf::load_vec<T, VW>(gr + col) : zero_vec<T, VW>();
      pv[b] = in ? rf::load_vec<T, VW>(pr + col) : zero_vec<T, VW>();
    }
  };
  float s = 0.f;
  for (int base = threadIdx.x * VW; base < cols; base += kStep) {
    rf::Vec<T, VW> gv[kBatch], pv[kBatch];
    load_step(base, gv, pv);
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      float g[VW], p[VW];
      to_floats<T, VW>(gv[b], g);
      to_floats<T, VW>(pv[b], p);
#pragma unroll
      for (int k = 0; k < VW; ++k) s += log_out ? g[k] : g[k] * p[k];
    }
  }
  s = rf::block_reduce<THREADS>(s, rf::Sum{}, scratch);
  T* xr = dx + offset;
  for (int base = threadIdx.x * VW; base < cols; base += kStep) {
    rf::Vec<T, VW> gv[kBatch], pv[kBatch];
    load_step(base, gv, pv);
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int col = base + b * THREADS * VW;
      if (col < cols) {
        float g[VW], p[VW], o[VW];
        to_floats<T, VW>(gv[b], g);
        to_floats<T, VW>(pv[b], p);
#pragma unroll
        for (int k = 0; k < VW; ++k) o[k] = grad(g[k], p[k], s, scale, log_out);
        rf::store_vec<T, VW>(xr + col, from_floats<T, VW>(o));
      }
    }
  }
}
