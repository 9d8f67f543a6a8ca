// paged_attention_int8.cu: an INT8 KV cache: the quantizing cache write and decode attention reading it.
//
// Memory layout (rawformer/ops/kv_int8.py):
//   k_cache, v_cache  int8  [num_blocks, block_size, kv_heads, head_dim]   (the fp16 cache's layout)
//   k_scale, v_scale  fp16  [num_blocks, block_size, kv_heads]             one scale per token and kv head
//   cached value      x~ = q * scale,  scale = fp16(max_d |x[d]| / 127),  q = rint(x / scale) in [-127, 127]
//   A scale per token and head (not per block): a block fills one token at a time, and a block-wide scale
//   fixed by its first token would clip the later ones; 2 bytes per head_dim bytes (1.6% at head_dim 128).
//   q / out [num_seqs, q_len, q_heads, head_dim] of T (__half or float); block_tables int32
//   [num_seqs, max_blocks]; context_lens int32 [num_seqs] (the new tokens included).
//
// kv_write_int8<T, EPL>: a warp per (token, kv head), lane l holds elements l*EPL .. l*EPL+EPL-1 of the
//   head_dim = 32 * EPL values; max |x| by a warp reduction, the scale rounded to fp16 first and q computed
//   from it (x / scale in fp32, rint: what the NumPy reference does, so the cache is bit-exact). slot < 0:
//   nothing written (padding tokens).
// paged_attention_int8_v1<T, EPL>: SIMT decode attention, one CTA of 4 warps per (sequence, query token,
//   q head). Warp w takes positions w, w+4, ...: lane l dots its EPL dims of q (fp32, pre-scaled by
//   scale * log2 e) with the dequantized key, a warp sum gives the score, an online softmax (base 2) keeps
//   (max, sum, acc[EPL]) per warp; V rows are read the same way. The 4 warps merge through shared memory.
//   Causal among the new tokens: query t of sequence s sees positions 0 .. context_lens[s] - q_len + t.
//   A query that sees nothing writes zeros. A first version: correctness and the halved bytes, not the
//   tensor-core paths of paged_attention.cu.

#include "common.cuh"

namespace rf_kv8 {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / rf::kWarp;
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }  // NVRTC has no INFINITY

}  // namespace rf_kv8

template <typename T, int EPL>
__global__ void __launch_bounds__(rf_kv8::kThreads)
    kv_write_int8(const T* __restrict__ k, const T* __restrict__ v, const int* __restrict__ slots,
                  signed char* __restrict__ k_cache, signed char* __restrict__ v_cache, __half* __restrict__ k_scale,
                  __half* __restrict__ v_scale, int tokens, int kv_heads, long long k_tok_stride,
                  long long k_head_stride, long long v_tok_stride, long long v_head_stride) {
  using namespace rf_kv8;
  constexpr int D = rf::kWarp * EPL;
  const int lane = threadIdx.x % rf::kWarp;
  const long long item = static_cast<long long>(blockIdx.x) * kWarps + threadIdx.x / rf::kWarp;
  if (item >= static_cast<long long>(tokens) * kv_heads) return;
  const int t = static_cast<int>(item / kv_heads), h = static_cast<int>(item % kv_heads);
  const int slot = slots[t];
  if (slot < 0) return;
  const size_t dst = (static_cast<size_t>(slot) * kv_heads + h) * D;
#pragma unroll
  for (int which = 0; which < 2; ++which) {
    const T* src = which == 0 ? k + t * k_tok_stride + h * k_head_stride : v + t * v_tok_stride + h * v_head_stride;
    float x[EPL];
    float amax = 0.f;
#pragma unroll
    for (int e = 0; e < EPL; ++e) {
      x[e] = rf::to_acc(src[lane * EPL + e]);
      amax = fmaxf(amax, fabsf(x[e]));
    }
    amax = rf::warp_reduce(amax, rf::Max{});
    const __half s16 = __float2half_rn(amax / 127.f);
    const float s = __half2float(s16);
    signed char* out = (which == 0 ? k_cache : v_cache) + dst + lane * EPL;
#pragma unroll
    for (int e = 0; e < EPL; ++e) out[e] = static_cast<signed char>(s > 0.f ? fminf(fmaxf(rintf(x[e] / s), -127.f), 127.f) : 0.f);
    if (lane == 0) (which == 0 ? k_scale : v_scale)[static_cast<size_t>(slot) * kv_heads + h] = s16;
  }
}

template <typename T, int EPL>
__global__ void __launch_bounds__(rf_kv8::kThreads)
    paged_attention_int8_v1(const T* __restrict__ q, const signed char* __restrict__ k_cache,
                            const signed char* __restrict__ v_cache, const __half* __restrict__ k_scale,
                            const __half* __restrict__ v_scale, const int* __restrict__ block_tables,
                            const int* __restrict__ context_lens, T* __restrict__ out, int q_len, int q_heads,
                            int kv_heads, int block_size, int max_blocks, float scale) {
  using namespace rf_kv8;
  constexpr int D = rf::kWarp * EPL;
  __shared__ float s_m[kWarps], s_l[kWarps];
  __shared__ float s_acc[kWarps][D];
  const int lane = threadIdx.x % rf::kWarp, warp = threadIdx.x / rf::kWarp;
  const int h = blockIdx.y;
  const int s = blockIdx.x / q_len, t = blockIdx.x % q_len;
  const int kvh = h / (q_heads / kv_heads);
  const size_t qo = ((static_cast<size_t>(s) * q_len + t) * q_heads + h) * D + lane * EPL;
  const int last = context_lens[s] - q_len + t;  // the last position this query sees
  float qf[EPL];
#pragma unroll
  for (int e = 0; e < EPL; ++e) qf[e] = rf::to_acc(q[qo + e]) * (scale * kLog2e);
  float m = neg_inf(), l = 0.f, acc[EPL];
#pragma unroll
  for (int e = 0; e < EPL; ++e) acc[e] = 0.f;
  const int* table = block_tables + static_cast<size_t>(s) * max_blocks;
  for (int p = warp; p <= last; p += kWarps) {
    const int blk = table[p / block_size];
    const size_t slot = static_cast<size_t>(blk) * block_size + p % block_size;
    const size_t base = (slot * kv_heads + kvh) * D + lane * EPL;
    const float ks = __half2float(k_scale[slot * kv_heads + kvh]);
    const float vs = __half2float(v_scale[slot * kv_heads + kvh]);
    float dot = 0.f;
#pragma unroll
    for (int e = 0; e < EPL; ++e) dot = fmaf(qf[e], static_cast<float>(k_cache[base + e]), dot);
    const float score = rf::warp_reduce(dot, rf::Sum{}) * ks;  // log2-scaled
    const float m_new = fmaxf(m, score);
    const float corr = exp2f(m - m_new);  // 0 on the first position (m = -inf)
    const float pw = exp2f(score - m_new);
    l = l * corr + pw;
#pragma unroll
    for (int e = 0; e < EPL; ++e) acc[e] = fmaf(acc[e], corr, pw * vs * static_cast<float>(v_cache[base + e]));
    m = m_new;
  }
  if (lane == 0) {
    s_m[warp] = m;
    s_l[warp] = l;
  }
#pragma unroll
  for (int e = 0; e < EPL; ++e) s_acc[warp][lane * EPL + e] = acc[e];
  __syncthreads();
  if (warp == 0) {
    float mt = neg_inf();
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mt = fmaxf(mt, s_m[w]);
    float lt = 0.f, o[EPL];
#pragma unroll
    for (int e = 0; e < EPL; ++e) o[e] = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float c = s_m[w] == neg_inf() ? 0.f : exp2f(s_m[w] - mt);  // a warp that saw nothing adds 0
      lt = fmaf(s_l[w], c, lt);
#pragma unroll
      for (int e = 0; e < EPL; ++e) o[e] = fmaf(s_acc[w][lane * EPL + e], c, o[e]);
    }
    const float inv = lt > 0.f ? 1.f / lt : 0.f;  // no visible position: zeros
#pragma unroll
    for (int e = 0; e < EPL; ++e) out[qo + e] = rf::from_acc<T>(o[e] * inv);
  }
}
