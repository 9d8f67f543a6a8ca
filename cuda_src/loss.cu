// loss.cu: fused softmax cross-entropy, per-row loss and log-sum-exp, the logits' gradient in the same kernel.
//
// Memory layout: logits x is [N, V] with row stride x_stride (elements; last dim contiguous); targets int64
// [N]; loss and lse float32 [N]; dlogits (optional, null pointer when not wanted) C-contiguous [N, V] of x's
// type, possibly x itself (in place: every element is read by the thread that later overwrites it, and the
// row's reductions finish before any write, so nothing is read after it is overwritten).
//
// Per row n (t = targets[n]):
//   lse = log sum_j exp(x_j);  loss = lse - x_t (0 when t == ignore_index, NaN when t is out of [0, V));
//   dx_j = grad_scale * (exp(x_j - lse) - [j == t])   (a zero row when t == ignore_index)
// Arithmetic in fp32, base 2: u = x * log2(e); one exp2f per element and pass.
//
// Versions (one block of THREADS threads per row; no full-vocab buffer besides dlogits itself):
//   cross_entropy_v1<T, THREADS>   scalar loads. Pass 1 keeps an online (max, sum) per thread (the sum is
//                                  rescaled when the max grows), merged with warp shuffles then shared
//                                  memory (rf::warp_reduce / block-level merge). Pass 2 (only with dlogits)
//                                  re-reads the row (from L2: a row is at most a few hundred KB and the
//                                  rows in flight fit it) and writes the gradient.
//   cross_entropy_v2<T, THREADS>   as v1 with 16-byte vector accesses: each row is split into a scalar
//                                  head up to the first 16-byte boundary, a vector body, a scalar tail; so
//                                  any V and row alignment works (GPT-2's V = 50257 leaves rows at every
//                                  offset). dlogits rows must sit at x's rows' offset modulo 16 bytes.
//   cross_entropy_v3<T, THREADS, VECS>  the row in registers (VECS raw 16-byte vectors per thread; V <= 65536
//                                  fp16 / 32768 fp32 at 512 x 16): one read of the logits, exact max and sum
//                                  by two block reductions, the gradient written from registers. One
//                                  512-thread block per SM at ~120 registers: the row's loads are all
//                                  issued up front (128 KB in flight per SM) but the next row waits.
// The target logit is read by thread 0 directly (one extra 2-4 byte load per row).
#include "common.cuh"

namespace rf_loss {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Online (max, sum of exp2(u - max)) state of a stream of base-2 logits.
struct MaxSum {
  float m, s;
};

__device__ __forceinline__ void add(MaxSum& a, float u) {
  if (u > a.m) {  // NaN never compares greater: it goes to the else branch and poisons the sum
    a.s = a.s * exp2f(a.m - u) + 1.0f;  // exp2f(-inf) = 0 for the first element
    a.m = u;
  } else {
    a.s += (u == -INFINITY) ? 0.0f : exp2f(u - a.m);
  }
}

__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, a.s + b.s};  // both empty or all -inf: nothing to rescale
  return {m, a.s * exp2f(a.m - m) + b.s * exp2f(b.m - m)};
}

template <int THREADS>
__device__ __forceinline__ MaxSum block_merge(MaxSum v, MaxSum* scratch) {
  const cg::thread_block block = cg::this_thread_block();
  const cg::thread_block_tile<rf::kWarp> warp = cg::tiled_partition<rf::kWarp>(block);
#pragma unroll
  for (int off = rf::kWarp / 2; off > 0; off >>= 1) {
    MaxSum o{warp.shfl_xor(v.m, off), warp.shfl_xor(v.s, off)};
    v = merge(v, o);
  }
  constexpr int kWarps = THREADS / rf::kWarp;
  if (threadIdx.x % rf::kWarp == 0) scratch[threadIdx.x / rf::kWarp] = v;
  block.sync();
  MaxSum r = scratch[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) r = merge(r, scratch[w]);  // same order in every thread: same result
  return r;
}

// Loss / lse outputs and the per-row constants of pass 2.
struct RowEnd {
  float lse2;    // log2-sum-exp2 of the base-2 logits
  long long t;   // target, -1 when ignored or out of range (no one-hot subtraction)
  bool ignored;  // ignore_index: the gradient row is zero
};

// The target's logit, read by thread 0 before the block's reduction: in place, other threads may
// overwrite the row as soon as the reduction is done.
template <typename T>
__device__ __forceinline__ float target_logit(const T* row, long long t, int vocab) {
  return (threadIdx.x == 0 && t >= 0 && t < vocab) ? rf::to_acc(row[t]) : 0.0f;
}

__device__ __forceinline__ RowEnd finish_row(MaxSum r, float xt, long long t, long long ignore_index,
                                             int vocab, float* loss, float* lse, int n) {
  const float lse2 = (r.m == -INFINITY) ? -INFINITY : r.m + log2f(r.s);
  const bool ignored = t == ignore_index;
  const bool valid = !ignored && t >= 0 && t < vocab;
  if (threadIdx.x == 0) {
    const float lse_n = lse2 * kLn2;
    lse[n] = lse_n;
    loss[n] = ignored ? 0.0f : (valid ? lse_n - xt : NAN);
  }
  return {lse2, valid ? t : -1, ignored};
}

template <typename T>
__device__ __forceinline__ T grad_of(T x, const RowEnd& e, long long j, float grad_scale) {
  if (e.ignored) return rf::from_acc<T>(0.0f);
  const float p = exp2f(rf::to_acc(x) * kLog2e - e.lse2);
  return rf::from_acc<T>(grad_scale * (p - (j == e.t ? 1.0f : 0.0f)));
}

}  // namespace rf_loss

#define RF_LOSS_ARGS(T)                                                                                   \
  const T *x, const long long *__restrict__ targets, T *dlogits, float *__restrict__ loss,   \
      float *__restrict__ lse, int rows, int vocab, long long x_stride, float grad_scale, long long ignore_index

template <typename T, int THREADS>
__global__ void __launch_bounds__(THREADS) cross_entropy_v1(RF_LOSS_ARGS(T)) {
  using namespace rf_loss;
  __shared__ MaxSum scratch[THREADS / rf::kWarp];
  const int n = blockIdx.x;
  const T* row = x + n * x_stride;
  MaxSum acc{-INFINITY, 0.0f};
  for (int j = threadIdx.x; j < vocab; j += THREADS) add(acc, rf::to_acc(row[j]) * kLog2e);
  const long long t = targets[n];
  const float xt = target_logit(row, t, vocab);
  const MaxSum r = block_merge<THREADS>(acc, scratch);
  const RowEnd e = finish_row(r, xt, t, ignore_index, vocab, loss, lse, n);
  if (dlogits == nullptr) return;
  T* drow = dlogits + static_cast<long long>(n) * vocab;
  for (int j = threadIdx.x; j < vocab; j += THREADS) drow[j] = grad_of(row[j], e, j, grad_scale);
}

template <typename T, int THREADS>
__global__ void __launch_bounds__(THREADS) cross_entropy_v2(RF_LOSS_ARGS(T)) {
  using namespace rf_loss;
  constexpr int VW = 16 / sizeof(T);
  using V = rf::Vec<T, VW>;
  __shared__ MaxSum scratch[THREADS / rf::kWarp];
  const int n = blockIdx.x;
  const T* row = x + n * x_stride;
  // head: elements before the first 16-byte boundary (< VW of them), then whole vectors, then the tail
  const int misalign = static_cast<int>((reinterpret_cast<unsigned long long>(row) % 16) / sizeof(T));
  const int head = min(vocab, misalign ? VW - misalign : 0);
  const int nvec = (vocab - head) / VW;
  const int tail0 = head + nvec * VW;
  const V* body = reinterpret_cast<const V*>(row + head);
  MaxSum acc{-INFINITY, 0.0f};
  if (threadIdx.x < head) add(acc, rf::to_acc(row[threadIdx.x]) * kLog2e);
  if (threadIdx.x < vocab - tail0) add(acc, rf::to_acc(row[tail0 + threadIdx.x]) * kLog2e);
  int i = threadIdx.x;
  for (; i + 3 * THREADS < nvec; i += 4 * THREADS) {  // 4 vectors in flight per thread
    V a[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) a[u] = body[i + u * THREADS];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      float m = -INFINITY;  // batch the rescale: one max over the vector first
#pragma unroll
      for (int e = 0; e < VW; ++e) m = fmaxf(m, rf::to_acc(a[u].v[e]) * kLog2e);
      MaxSum part{m, 0.0f};
#pragma unroll
      for (int e = 0; e < VW; ++e) {
        const float uu = rf::to_acc(a[u].v[e]) * kLog2e;
        part.s += (uu == -INFINITY) ? 0.0f : exp2f(uu - m);
      }
      acc = merge(acc, part);  // a NaN element makes part.s NaN (fmaxf skips it, the exp2f does not)
    }
  }
  for (; i < nvec; i += THREADS) {
    const V a = body[i];
#pragma unroll
    for (int e = 0; e < VW; ++e) add(acc, rf::to_acc(a.v[e]) * kLog2e);
  }
  const long long t = targets[n];
  const float xt = target_logit(row, t, vocab);
  const MaxSum r = block_merge<THREADS>(acc, scratch);
  const RowEnd e = finish_row(r, xt, t, ignore_index, vocab, loss, lse, n);
  if (dlogits == nullptr) return;
  T* drow = dlogits + static_cast<long long>(n) * vocab;  // same offset modulo 16 as row (launcher checks)
  V* dbody = reinterpret_cast<V*>(drow + head);
  if (threadIdx.x < head) drow[threadIdx.x] = grad_of(row[threadIdx.x], e, threadIdx.x, grad_scale);
  if (threadIdx.x < vocab - tail0) {
    const int j = tail0 + threadIdx.x;
    drow[j] = grad_of(row[j], e, j, grad_scale);
  }
  for (int k = threadIdx.x; k < nvec; k += THREADS) {
    const V a = body[k];
    V o;
    const long long j0 = head + static_cast<long long>(k) * VW;
#pragma unroll
    for (int u = 0; u < VW; ++u) o.v[u] = grad_of(a.v[u], e, j0 + u, grad_scale);
    dbody[k] = o;
  }
}

// cross_entropy_v3<T, THREADS, VECS>: the row held in registers (VECS 16-byte vectors per thread, as raw
// storage), so the logits are read from memory once: exact row max (block reduction), then the sum of
// exp2(u - max) (second block reduction), then the gradient written from the registers. Head / tail
// elements as v2, one register each. Rows up to THREADS * VECS * 16 / sizeof(T) elements (65536 fp16 or
// 32768 fp32 at 512 x 16), the launcher's limit.
template <typename T, int THREADS, int VECS>
__global__ void __launch_bounds__(THREADS) cross_entropy_v3(RF_LOSS_ARGS(T)) {
  using namespace rf_loss;
  constexpr int VW = 16 / sizeof(T);
  using V = rf::Vec<T, VW>;
  __shared__ float scratch[THREADS / rf::kWarp];
  const int n = blockIdx.x;
  const T* row = x + n * x_stride;
  const int misalign = static_cast<int>((reinterpret_cast<unsigned long long>(row) % 16) / sizeof(T));
  const int head = min(vocab, misalign ? VW - misalign : 0);
  const int nvec = (vocab - head) / VW;
  const int tail0 = head + nvec * VW;
  const V* body = reinterpret_cast<const V*>(row + head);
  const long long t = targets[n];
  const float xt = target_logit(row, t, vocab);
  V a[VECS];
#pragma unroll
  for (int k = 0; k < VECS; ++k) {  // every load issued before the first reduction
    const int i = threadIdx.x + k * THREADS;
    if (i < nvec) a[k] = body[i];
  }
  const bool has_head = threadIdx.x < head, has_tail = threadIdx.x < vocab - tail0;
  const float uh = has_head ? rf::to_acc(row[threadIdx.x]) * kLog2e : -INFINITY;
  const float ut = has_tail ? rf::to_acc(row[tail0 + threadIdx.x]) * kLog2e : -INFINITY;
  float m = fmaxf(uh, ut);
#pragma unroll
  for (int k = 0; k < VECS; ++k) {
    if (threadIdx.x + k * THREADS < nvec) {
#pragma unroll
      for (int e = 0; e < VW; ++e) m = fmaxf(m, rf::to_acc(a[k].v[e]) * kLog2e);
    }
  }
  m = rf::block_reduce<THREADS>(m, rf::Max{}, scratch);
  const float mu = (m == -INFINITY) ? 0.0f : m;  // a row of -inf: exp2(-inf - 0) = 0, lse = -inf
  float s = (has_head ? exp2f(uh - mu) : 0.0f) + (has_tail ? exp2f(ut - mu) : 0.0f);
#pragma unroll
  for (int k = 0; k < VECS; ++k) {
    if (threadIdx.x + k * THREADS < nvec) {
#pragma unroll
      for (int e = 0; e < VW; ++e) s += exp2f(rf::to_acc(a[k].v[e]) * kLog2e - mu);
    }
  }
  s = rf::block_reduce<THREADS>(s, rf::Sum{}, scratch);
  // NaN: fmaxf skipped it in the max, but exp2f(NaN) made the sum NaN, so lse and loss are NaN
  const RowEnd e = finish_row(MaxSum{m, s}, xt, t, ignore_index, vocab, loss, lse, n);
  if (dlogits == nullptr) return;
  T* drow = dlogits + static_cast<long long>(n) * vocab;
  V* dbody = reinterpret_cast<V*>(drow + head);
  if (has_head) drow[threadIdx.x] = grad_of(row[threadIdx.x], e, threadIdx.x, grad_scale);
  if (has_tail) drow[tail0 + threadIdx.x] = grad_of(row[tail0 + threadIdx.x], e, tail0 + threadIdx.x, grad_scale);
#pragma unroll
  for (int k = 0; k < VECS; ++k) {
    const int i = threadIdx.x + k * THREADS;
    if (i < nvec) {
      V o;
      const long long j0 = head + static_cast<long long>(i) * VW;
#pragma unroll
      for (int u = 0; u < VW; ++u) o.v[u] = grad_of(a[k].v[u], e, j0 + u, grad_scale);
      dbody[i] = o;
    }
  }
}
