// rope.cu: rotary position embedding (RoPE) fused with writing the new K/V into a paged KV cache, and a
// plain KV-cache write.
//
// Memory layout (strides in elements; the last dim, head_dim, is always contiguous):
//   q, q_out          [tokens, q_heads, head_dim]            element (t, h, d) at t*st + h*sh + d
//   k, v, k_out       [tokens, kv_heads, head_dim]           (q, k, v may be views of one packed qkv buffer)
//   k_cache, v_cache  [num_blocks, block_size, kv_heads, head_dim]   token-major blocks; slot s lives at
//                     (s / block_size)*c_sb + (s % block_size)*c_ss + h*c_sh + d
//   positions         [tokens] int32 / int64;  slot_mapping [tokens] int32 / int64, s < 0: do not write
//   inv_freq          [rotary_dim / 2] float32
//
// Rotation of one head row x (pairs p < rotary_dim / 2; dims >= rotary_dim pass through unchanged):
//   theta = float(pos) * inv_freq[p]   (fp32 product, then sincosf: the accurate one, not __sinf, since
//                                       positions reach 10^5 and the argument needs a full range reduction)
//   neox:  (x[p], x[p + R/2])  -> (x1 c - x2 s, x2 c + x1 s)
//   gptj:  (x[2p], x[2p + 1])  -> (x1 c - x2 s, x2 c + x1 s)
// Arithmetic in fp32; one rounding to T at the store. The rotated k is stored to k_out and to the cache
// (the same rounded values); v is copied bit for bit.
//
// Versions:
//   rope_kv_v1<T, VW, NEOX, MODE, P, S>   MODE 0: rope of q alone; 1: rope of q and k + k/v cache write;
//       2: k/v cache write alone (no rotation). P, S: the index types of positions and slot_mapping.
//       A CTA of kRopeThreads = 128 threads takes TOK consecutive tokens (and, for few tokens, a slice of
//       their work: gridDim.y slices per token). It first computes, once per CTA, cos/sin of each (token,
//       pair) with sincosf into shared memory (float2, TOK * R/2) and the k / v cache row offset of each
//       token's slot (2 x TOK long long: the 64-bit slot division runs once per token, not per vector).
//       Then it loops over the flattened work items of its tokens: for a rotated row (q; k in MODE 1) one
//       item is one output vector pair (neox: the VW elements at p and at p + R/2), one vector of VW/2
//       adjacent pairs (gptj), one pair (gptj, VW == 1) or one pass-through vector past R; for a copied row
//       (v; k in MODE 2) one vector. The rotated k goes to k_out and, from the same registers, to the cache.
//       VW = 16 / sizeof(T) when head_dim, R/2 (neox) or R (gptj), every stride and every pointer allow
//       16-byte accesses, else the largest power of two that does (down to 1). Consecutive threads take
//       consecutive items of a row, so each warp access is coalesced.
// In place (q_out == q, k_out == k) is safe: every item reads all the elements it writes, and only those,
// before writing them.
#include "common.cuh"

namespace rf {

constexpr int kRopeThreads = 128;

namespace rope_detail {

// neox: a = x[p .. p+VW), b = x[p+R/2 .. p+R/2+VW), cs = cos/sin of pairs p .. p+VW; rotated in place.
template <typename T, int VW>
__device__ __forceinline__ void rotate_halves(Vec<T, VW>& a, Vec<T, VW>& b, const float2* cs) {
#pragma unroll
  for (int e = 0; e < VW; ++e) {
    const float2 c = cs[e];
    const float x1 = to_acc(a.v[e]), x2 = to_acc(b.v[e]);
    a.v[e] = from_acc<T>(x1 * c.x - x2 * c.y);
    b.v[e] = from_acc<T>(x2 * c.x + x1 * c.y);
  }
}

// gptj, VW >= 2: the vector holds VW / 2 adjacent pairs; cs = cos/sin of those pairs; rotated in place.
template <typename T, int VW>
__device__ __forceinline__ void rotate_adjacent(Vec<T, VW>& a, const float2* cs) {
#pragma unroll
  for (int e = 0; e < VW / 2; ++e) {
    const float2 c = cs[e];
    const float x1 = to_acc(a.v[2 * e]), x2 = to_acc(a.v[2 * e + 1]);
    a.v[2 * e] = from_acc<T>(x1 * c.x - x2 * c.y);
    a.v[2 * e + 1] = from_acc<T>(x2 * c.x + x1 * c.y);
  }
}

}  // namespace rope_detail

template <typename T, int VW, bool NEOX, int MODE, typename P, typename S>
__global__ void __launch_bounds__(kRopeThreads) rope_kv_v1(
    const T* q, const T* k, const T* __restrict__ v, T* q_out, T* k_out,
    T* __restrict__ k_cache, T* __restrict__ v_cache, const P* __restrict__ positions,
    const S* __restrict__ slot_mapping, const float* __restrict__ inv_freq, int tokens, int q_heads,
    int kv_heads, int head_dim, int rot_dim, long long q_st, long long q_sh, long long k_st, long long k_sh,
    long long v_st, long long v_sh, long long qo_st, long long qo_sh, long long ko_st, long long ko_sh,
    long long kc_sb, long long kc_ss, long long kc_sh, long long vc_sb, long long vc_ss, long long vc_sh,
    int block_size, int tok_per_cta, int items_per_slice) {
  static_assert(MODE >= 0 && MODE <= 2, "MODE: 0 rope, 1 rope + kv write, 2 kv write");
  // q and k may alias q_out / k_out (in place), so those four carry no __restrict__.
  rf::pdl_launch_dependents();
  rf::pdl_wait();  // launched with pdl=True in decode steps (common.cuh)
  // Shared memory: [kWrite] k and v cache row offsets of each token (kSkip: slot < 0), then [kRotate]
  // cos/sin of each (token, pair).
  extern __shared__ long long rope_smem[];
  constexpr bool kRotate = MODE != 2;
  constexpr bool kWrite = MODE != 0;
  constexpr long long kSkip = -9223372036854775807LL - 1;
  long long* k_row = rope_smem;                // [tok_per_cta]
  long long* v_row = rope_smem + tok_per_cta;  // [tok_per_cta]
  float2* cs_smem = reinterpret_cast<float2*>(rope_smem + (kWrite ? 2 * tok_per_cta : 0));
  const int half = rot_dim / 2;
  const int nv = head_dim / VW;  // vectors per row
  // Items of one rotated row: neox / gptj at VW == 1 pair units + pass-through vectors; gptj VW >= 2 one
  // item per vector.
  constexpr bool kPairUnits = NEOX || VW == 1;
  const int rot_units = kPairUnits ? half / VW : rot_dim / VW;
  const unsigned rot_items = kPairUnits ? nv - half / VW : nv;
  const int rot_rows = MODE == 0 ? q_heads : (MODE == 1 ? q_heads + kv_heads : 0);
  const int copy_rows = MODE == 0 ? 0 : (MODE == 1 ? kv_heads : 2 * kv_heads);
  const int rot_total = rot_rows * static_cast<int>(rot_items);
  const int items = rot_total + copy_rows * nv;

  const int tok0 = blockIdx.x * tok_per_cta;
  const int ntok = min(tok_per_cta, tokens - tok0);
  const int it0 = blockIdx.y * items_per_slice;
  const int nit = min(items_per_slice, items - it0);
  if (ntok <= 0 || nit <= 0) return;

  // Per-token work, once per CTA: the angles' cos/sin (sincosf) and the cache rows of each slot.
  if constexpr (kRotate) {
    for (int i = threadIdx.x; i < ntok * half; i += kRopeThreads) {
      const int t = i / half, p = i - t * half;
      const float angle = static_cast<float>(positions[tok0 + t]) * inv_freq[p];
      float s, c;
      sincosf(angle, &s, &c);
      cs_smem[i] = make_float2(c, s);
    }
  }
  if constexpr (kWrite) {
    for (int i = threadIdx.x; i < ntok; i += kRopeThreads) {
      const long long slot = static_cast<long long>(slot_mapping[tok0 + i]);
      const long long b = slot / block_size, o = slot - b * block_size;
      k_row[i] = slot < 0 ? kSkip : b * kc_sb + o * kc_ss;
      v_row[i] = slot < 0 ? kSkip : b * vc_sb + o * vc_ss;
    }
  }
  __syncthreads();

  // Item il of local token tl; advanced by kRopeThreads per step (a division only when it wraps).
  int tl = 0, il = threadIdx.x;
  if (il >= nit) {
    tl = il / nit;
    il -= tl * nit;
  }
  for (; tl < ntok;) {
    const int t = tok0 + tl;
    const int it = it0 + il;
    if (kRotate && it < rot_total) {
      const int row = static_cast<unsigned>(it) / rot_items;
      const int u = it - row * static_cast<int>(rot_items);
      const bool is_q = row < q_heads;
      const int h = is_q ? row : row - q_heads;
      const T* x = is_q ? q + t * q_st + h * q_sh : k + t * k_st + h * k_sh;
      T* y = is_q ? q_out + t * qo_st + h * qo_sh : k_out + t * ko_st + h * ko_sh;
      T* c = nullptr;
      if constexpr (kWrite) {
        if (!is_q && k_row[tl] != kSkip) c = k_cache + k_row[tl] + h * kc_sh;
      }
      const float2* cs = cs_smem + tl * half;
      if (u < rot_units) {
        if constexpr (NEOX) {
          const int d1 = u * VW, d2 = d1 + half;
          Vec<T, VW> a = load_vec<T, VW>(x + d1), b = load_vec<T, VW>(x + d2);
          rope_detail::rotate_halves<T, VW>(a, b, cs + d1);
          store_vec<T, VW>(y + d1, a);
          store_vec<T, VW>(y + d2, b);
          if (c != nullptr) {
            store_vec<T, VW>(c + d1, a);
            store_vec<T, VW>(c + d2, b);
          }
        } else if constexpr (VW == 1) {  // gptj, scalar: unit u = the pair of dims (2u, 2u + 1)
          const float2 cc = cs[u];
          const float x1 = to_acc(x[2 * u]), x2 = to_acc(x[2 * u + 1]);
          const T y1 = from_acc<T>(x1 * cc.x - x2 * cc.y), y2 = from_acc<T>(x2 * cc.x + x1 * cc.y);
          y[2 * u] = y1;
          y[2 * u + 1] = y2;
          if (c != nullptr) {
            c[2 * u] = y1;
            c[2 * u + 1] = y2;
          }
        } else {  // gptj, VW >= 2: vector u holds pairs u*VW/2 .. u*VW/2 + VW/2
          const int d = u * VW;
          Vec<T, VW> a = load_vec<T, VW>(x + d);
          rope_detail::rotate_adjacent<T, VW>(a, cs + d / 2);
          store_vec<T, VW>(y + d, a);
          if (c != nullptr) store_vec<T, VW>(c + d, a);
        }
      } else {  // pass-through vector past rot_dim
        const int d = (kPairUnits ? u + half / VW : u) * VW;
        const Vec<T, VW> a = load_vec<T, VW>(x + d);
        store_vec<T, VW>(y + d, a);
        if (c != nullptr) store_vec<T, VW>(c + d, a);
      }
    } else if constexpr (kWrite) {
      // copied rows: v (MODE 1), k then v (MODE 2), straight into the cache
      if (k_row[tl] != kSkip) {
        const int jt = it - rot_total;
        const int row = static_cast<unsigned>(jt) / static_cast<unsigned>(nv);
        const int d = (jt - row * nv) * VW;
        const bool is_k = MODE == 2 && row < kv_heads;
        const int h = (MODE == 2 && !is_k) ? row - kv_heads : row;
        const T* src = is_k ? k + t * k_st + h * k_sh : v + t * v_st + h * v_sh;
        T* dst = is_k ? k_cache + k_row[tl] + h * kc_sh : v_cache + v_row[tl] + h * vc_sh;
        store_vec<T, VW>(dst + d, load_vec<T, VW>(src + d));
      }
    }
    il += kRopeThreads;
    if (il >= nit) {
      const int wrap = il / nit;
      tl += wrap;
      il -= wrap * nit;
    }
  }
}

}  // namespace rf
