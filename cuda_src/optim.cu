// optim.cu: multi-tensor AdamW and the global gradient L2 norm, one launch over every tensor.
//
// Memory layout: a table of int64 built by the launcher, one row per tensor, then a prefix sum of chunks:
//   adamw:     rows [T, 6] = (param, grad, exp_avg, exp_avg_sq, master or 0, size), then chunk_start [T + 1]
//   grad_norm: rows [T, 2] = (grad, size), then chunk_start [T + 1]
// Tensor i owns blocks chunk_start[i] .. chunk_start[i + 1] - 1, each covering kChunk consecutive elements;
// a block finds its tensor by binary search over chunk_start (T is at most a few hundred: ~8 steps).
// Every tensor is C-contiguous; params / grads fp16 or fp32, exp_avg / exp_avg_sq / masters fp32.
//
// AdamW (torch.optim.AdamW's update), per element, t = step, fp32 arithmetic:
//   g = grad_scale * grad;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
//   p = p (1 - lr wd) - lr * inv_bc1 * m / (sqrt(v) * inv_sqrt_bc2 + eps)
//   with inv_bc1 = 1 / (1 - b1^t), inv_sqrt_bc2 = 1 / sqrt(1 - b2^t) computed on the host in float64, and
//   p the fp32 master when MASTER (the param then gets the rounded master), else the param itself.
// grad_norm: a fixed grid (<= 1024 blocks) strides over the chunks of one dtype's tensors, each block
//   writing one fp32 partial sum of squares; grad_norm_finish (one block) adds the partials in a fixed order
//   and takes the square root. Same inputs, same bits; inf / NaN propagate (the loss-scale overflow check).
//
// Versions:
//   adamw_v1<P, G, MASTER, THREADS>        scalar coalesced accesses, 4 elements per thread in flight,
//                                          kChunk = THREADS * 32 elements per block
//   grad_norm_partial_v1<G, THREADS>       the same walk, 4 independent fp32 accumulators per thread
//   grad_norm_finish_v1<THREADS>           one block over the partials
#include "common.cuh"

namespace rf_optim {

constexpr int kUnroll = 4;
constexpr int kIters = 8;

// The tensor owning global chunk `chunk`: the largest i with chunk_start[i] <= chunk.
__device__ __forceinline__ int find_tensor(const long long* chunk_start, int tensors, long long chunk) {
  int lo = 0, hi = tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (chunk_start[mid] <= chunk) lo = mid; else hi = mid - 1;
  }
  return lo;
}

template <typename T> __device__ __forceinline__ T* ptr(long long v) { return reinterpret_cast<T*>(v); }

}  // namespace rf_optim

template <typename P, typename G, bool MASTER, int THREADS>
__global__ void __launch_bounds__(THREADS)
    adamw_v1(const long long* __restrict__ table, const float* __restrict__ decay, int tensors, float lr,
             float beta1, float beta2, float eps, float inv_bc1, float inv_sqrt_bc2, float grad_scale) {
  using namespace rf_optim;
  constexpr long long kChunk = static_cast<long long>(THREADS) * kUnroll * kIters;
  const long long* chunk_start = table + 6LL * tensors;
  const int t = find_tensor(chunk_start, tensors, blockIdx.x);
  const long long* row = table + 6LL * t;
  P* param = ptr<P>(row[0]);
  const G* grad = ptr<const G>(row[1]);
  float* exp_avg = ptr<float>(row[2]);
  float* exp_avg_sq = ptr<float>(row[3]);
  float* master = ptr<float>(row[4]);
  const long long n = row[5];
  const long long begin = (blockIdx.x - chunk_start[t]) * kChunk;
  const long long end = min(begin + kChunk, n);
  const float decay_factor = 1.0f - lr * decay[t];
  const float step_size = lr * inv_bc1;
  for (long long base = begin + threadIdx.x; base < end; base += THREADS * kUnroll) {
    float g[kUnroll], m[kUnroll], v[kUnroll], p[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // every load first, then the maths: 4 x 4 loads in flight
      const long long j = base + u * THREADS;
      if (j < end) {
        g[u] = rf::to_acc(grad[j]);
        m[u] = exp_avg[j];
        v[u] = exp_avg_sq[j];
        p[u] = MASTER ? master[j] : rf::to_acc(param[j]);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const long long j = base + u * THREADS;
      if (j < end) {
        const float gs = g[u] * grad_scale;
        const float mu = beta1 * m[u] + (1.0f - beta1) * gs;
        const float nu = beta2 * v[u] + (1.0f - beta2) * gs * gs;
        const float pn = p[u] * decay_factor - step_size * mu / (sqrtf(nu) * inv_sqrt_bc2 + eps);
        exp_avg[j] = mu;
        exp_avg_sq[j] = nu;
        if (MASTER) master[j] = pn;
        param[j] = rf::from_acc<P>(pn);
      }
    }
  }
}

template <typename G, int THREADS>
__global__ void __launch_bounds__(THREADS)
    grad_norm_partial_v1(const long long* __restrict__ table, int tensors, float* __restrict__ partials,
                         int chunks) {
  using namespace rf_optim;
  __shared__ float scratch[THREADS / rf::kWarp];
  constexpr long long kChunk = static_cast<long long>(THREADS) * kUnroll * kIters;
  const long long* chunk_start = table + 2LL * tensors;
  float acc[kUnroll] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int chunk = blockIdx.x; chunk < chunks; chunk += gridDim.x) {
    const int t = find_tensor(chunk_start, tensors, chunk);
    const G* grad = ptr<const G>(table[2LL * t]);
    const long long n = table[2LL * t + 1];
    const long long begin = (chunk - chunk_start[t]) * kChunk;
    const long long end = min(begin + kChunk, n);
    for (long long base = begin + threadIdx.x; base < end; base += THREADS * kUnroll) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const long long j = base + u * THREADS;
        const float x = j < end ? rf::to_acc(grad[j]) : 0.0f;
        acc[u] += x * x;
      }
    }
  }
  const float total = rf::block_reduce<THREADS>((acc[0] + acc[1]) + (acc[2] + acc[3]), rf::Sum{}, scratch);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

template <int THREADS>
__global__ void __launch_bounds__(THREADS)
    grad_norm_finish_v1(const float* __restrict__ partials, int count, float* __restrict__ norm) {
  __shared__ float scratch[THREADS / rf::kWarp];
  float acc = 0.0f;
  for (int i = threadIdx.x; i < count; i += THREADS) acc += partials[i];
  const float total = rf::block_reduce<THREADS>(acc, rf::Sum{}, scratch);
  if (threadIdx.x == 0) *norm = sqrtf(total);
}
