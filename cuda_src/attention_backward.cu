// attention_backward.cu: backward of fused attention (FlashAttention-2 style), family "attention_backward".
//
// Per sequence, q head h, kv head g = h / (q_heads / kv_heads), visible keys as in attention.cu (j < len_k
// and, under causal, j <= i + len_k - len_q):
//   P_ij = exp(scale q_i.k_j - lse_i) (0 when invisible or lse_i = -inf);  D_i = sum_d dO_id O_id
//   dS_ij = P_ij (dO_i.v_j - D_i);  dQ_i = scale sum_j dS_ij k_j;  dK_j = scale sum_{i,h in g} dS_ij q_i;
//   dV_j = sum_{i,h in g} P_ij dO_i
//
// Memory layout (everything C-contiguous; the launcher copies and zero-pads the head dim to D):
//   padded  q / dO [batch, seq_q, q_heads, D], k / v [batch, seq_k, kv_heads, D], lse / delta float32
//           [batch, q_heads, seq_q]; the token rows of sequence b start at b * seq_q (q) and b * seq_k (k)
//   varlen  q / dO [total_q, q_heads, D], k / v [total_k, kv_heads, D], lse / delta [q_heads, total_q];
//           sequence b owns tokens cu_seqlens[b] .. cu_seqlens[b + 1] - 1 (seq_q = seq_k = 0 passed)
//   dq_acc  float32 [q tokens, q_heads, D]: sum_j dS_ij k_j (unscaled), added to with atomics;
//   dk / dv [.., kv_heads, D] of k's type, zeroed by the launcher (keys no block reaches stay zero).
//
// Kernels:
//   attention_backward_preprocess<T, THREADS>  8 lanes per (token, q head), 16-byte accesses: delta =
//                                              rowsum(dO * O) in fp32 (lse layout), the dq_acc row zeroed.
//   attention_backward_v1<T, D>                SIMT, any T and D (multiple of 16). Grid (key tiles of BN = 16,
//                                              kv heads, sequences); 128 threads. K, V, dK, dV of the tile
//                                              in shared memory as fp32 ([BN][D + 1]: odd stride); for each
//                                              q head of the group and each query tile of BM = 16 rows
//                                              that can see the tile (causal: from the diagonal on), Q,
//                                              dO, lse, delta are staged in shared memory; P and dS (16 x
//                                              16) computed one element per thread-pair; dV += P^T dO and
//                                              dK += dS^T Q in shared memory (each element owned by one
//                                              thread); dQ += dS K added to dq_acc with fp32 atomics. dK
//                                              (times scale) and dV written once at the end.
//   attention_backward_v2<D, BM, WARPS>        fp16 tensor cores, D in {64, 128} (see its comment below);
//                                              versions 2 / 3: WARPS = 4 (64 keys per block), version 4:
//                                              WARPS = 8 (128 keys per block, vector dQ reductions on sm_90).
//   attention_backward_convert<T>              dq = scale * dq_acc, cast to T (4 elements per thread).
// Numerics: base 2, scale_log2 = scale * log2(e), lse2 = lse * log2(e); fp32 everywhere. A query with
// lse = -inf (it saw no key) or past its sequence gets lse2 = +inf, so exp2(s - lse2) = 0: no NaN.
#include "common.cuh"

namespace rf_attn_bwd {

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kV1BN = 16, kV1BM = 16, kV1Threads = 128;
constexpr int kPreLanes = 8;  // preprocess: lanes per (token, head) row

struct Seq {
  int q_start, k_start, len_q, len_k;
};

__device__ __forceinline__ Seq sequence(const int* cu_q, const int* cu_k, int seq_q, int seq_k, int b) {
  if (cu_q != nullptr) {
    const int q0 = cu_q[b], k0 = cu_k[b];
    return {q0, k0, cu_q[b + 1] - q0, cu_k[b + 1] - k0};
  }
  return {b * seq_q, b * seq_k, seq_q, seq_k};
}

// Index of (q head h, query i of sequence b) in the lse / delta layout.
__device__ __forceinline__ long long lse_index(bool varlen, int b, int h, int i, const Seq& s, int q_heads,
                                               int seq_q, int total_q) {
  return varlen ? static_cast<long long>(h) * total_q + s.q_start + i
                : (static_cast<long long>(b) * q_heads + h) * seq_q + i;
}

// The base-2 lse a kernel subtracts: +inf where P must be 0 (no visible key, or no query).
__device__ __forceinline__ float lse2_of(float lse) { return lse == -INFINITY ? INFINITY : lse * kLog2e; }

}  // namespace rf_attn_bwd

#define RF_ATTN_BWD_ARGS(T)                                                                                 \
  const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v, const T *__restrict__ dout,   \
      const float *__restrict__ lse, const float *__restrict__ delta, float *__restrict__ dq_acc,          \
      T *__restrict__ dk, T *__restrict__ dv, const int *__restrict__ cu_seqlens_q,                        \
      const int *__restrict__ cu_seqlens_k, int seq_q, int seq_k, int total_q, int q_heads, int kv_heads, \
      float scale_log2, float scale, int causal

template <typename T, int THREADS>
__global__ void __launch_bounds__(THREADS)
    attention_backward_preprocess(const T* __restrict__ out, const T* __restrict__ dout,
                                  float* __restrict__ delta, float* __restrict__ dq_acc, int rows, int q_heads,
                                  int dim, int seq_q, int varlen) {
  // kPreLanes lanes per (token, head) row, 16-byte loads of out / dout and 16-byte zero stores to dq_acc;
  // dim is a multiple of 16 (the launcher pads) and the rows 16-byte aligned.
  constexpr int L = rf_attn_bwd::kPreLanes, VEC = 16 / sizeof(T);
  const int sub = threadIdx.x % L;
  const long long pair = static_cast<long long>(blockIdx.x) * (THREADS / L) + threadIdx.x / L;
  const bool valid = pair < static_cast<long long>(rows) * q_heads;  // no early exit: the group shuffles
  float acc = 0.0f;
  if (valid) {
    const uint4* o = reinterpret_cast<const uint4*>(out + pair * dim);
    const uint4* g = reinterpret_cast<const uint4*>(dout + pair * dim);
    for (int c = sub; c < dim / VEC; c += L) {
      const uint4 ov = o[c], gv = g[c];
      const T* oe = reinterpret_cast<const T*>(&ov);
      const T* ge = reinterpret_cast<const T*>(&gv);
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc = fmaf(rf::to_acc(oe[e]), rf::to_acc(ge[e]), acc);
    }
    float4* z = reinterpret_cast<float4*>(dq_acc + pair * dim);
    for (int c = sub; c < dim / 4; c += L) z[c] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  }
#pragma unroll
  for (int o = L / 2; o > 0; o /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (valid && sub == 0) {
    const long long row = pair / q_heads;
    const int h = static_cast<int>(pair - row * q_heads);
    const long long idx = varlen ? static_cast<long long>(h) * rows + row
                                 : ((row / seq_q) * q_heads + h) * seq_q + row % seq_q;
    delta[idx] = acc;
  }
}

// Four elements per thread (n is a multiple of 16: rows of the padded head dim).
template <typename T>
__global__ void attention_backward_convert(const float* __restrict__ acc, T* __restrict__ dq, long long n,
                                           float scale) {
  const long long i = 4 * (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x);
  if (i >= n) return;
  const float4 a = *reinterpret_cast<const float4*>(acc + i);
  rf::Vec<T, 4> out;
  out.v[0] = rf::from_acc<T>(a.x * scale);
  out.v[1] = rf::from_acc<T>(a.y * scale);
  out.v[2] = rf::from_acc<T>(a.z * scale);
  out.v[3] = rf::from_acc<T>(a.w * scale);
  rf::store_vec(dq + i, out);
}

template <typename T, int D>
__global__ void __launch_bounds__(rf_attn_bwd::kV1Threads) attention_backward_v1(RF_ATTN_BWD_ARGS(T)) {
  using namespace rf_attn_bwd;
  constexpr int BN = kV1BN, BM = kV1BM, THREADS = kV1Threads, DS = D + 1;
  extern __shared__ float smem_f[];
  float* ks = smem_f;              // [BN][DS]
  float* vs = ks + BN * DS;        // [BN][DS]
  float* dks = vs + BN * DS;       // [BN][DS]
  float* dvs = dks + BN * DS;      // [BN][DS]
  float* qs = dvs + BN * DS;       // [BM][DS]
  float* dos = qs + BM * DS;       // [BM][DS]
  float* ps = dos + BM * DS;       // [BM][BN + 1]
  float* dss = ps + BM * (BN + 1);  // [BM][BN + 1]
  float* lse_s = dss + BM * (BN + 1);  // [BM] base-2 lse (+inf: no query / no key)
  float* del_s = lse_s + BM;           // [BM]

  const int b = blockIdx.z, g = blockIdx.y, tid = threadIdx.x;
  const bool varlen = cu_seqlens_q != nullptr;
  const Seq sq = sequence(cu_seqlens_q, cu_seqlens_k, seq_q, seq_k, b);
  const int n0 = blockIdx.x * BN;
  if (n0 >= sq.len_k) return;
  const int off = sq.len_k - sq.len_q;
  const int grp = q_heads / kv_heads;
  const long long q_row = static_cast<long long>(q_heads) * D;  // elements per token row of q / dO
  const long long k_row = static_cast<long long>(kv_heads) * D;

  for (int idx = tid; idx < BN * D; idx += THREADS) {
    const int c = idx / D, d = idx - c * D;
    const bool ok = n0 + c < sq.len_k;
    const long long at = (sq.k_start + n0 + c) * k_row + g * D + d;
    ks[c * DS + d] = ok ? rf::to_acc(k[at]) : 0.0f;
    vs[c * DS + d] = ok ? rf::to_acc(v[at]) : 0.0f;
    dks[c * DS + d] = 0.0f;
    dvs[c * DS + d] = 0.0f;
  }
  // The first query that sees key n0 (causal): i >= n0 - off.
  const int i_lo = causal ? max(0, n0 - off) / BM * BM : 0;

  for (int r_h = 0; r_h < grp; ++r_h) {
    const int h = g * grp + r_h;
    for (int i0 = i_lo; i0 < sq.len_q; i0 += BM) {
      __syncthreads();  // the previous tile's readers are done with qs / dos / ps / dss
      for (int idx = tid; idx < BM * D; idx += THREADS) {
        const int r = idx / D, d = idx - r * D;
        const bool ok = i0 + r < sq.len_q;
        const long long at = (sq.q_start + i0 + r) * q_row + h * D + d;
        qs[r * DS + d] = ok ? rf::to_acc(q[at]) : 0.0f;
        dos[r * DS + d] = ok ? rf::to_acc(dout[at]) : 0.0f;
      }
      if (tid < BM) {
        const bool ok = i0 + tid < sq.len_q;
        const long long li = ok ? lse_index(varlen, b, h, i0 + tid, sq, q_heads, seq_q, total_q) : 0;
        lse_s[tid] = ok ? lse2_of(lse[li]) : INFINITY;
        del_s[tid] = ok ? delta[li] : 0.0f;
      }
      __syncthreads();
      for (int idx = tid; idx < BM * BN; idx += THREADS) {
        const int r = idx / BN, c = idx - r * BN;
        const int i = i0 + r, j = n0 + c;
        float s = 0.0f, dp = 0.0f;
#pragma unroll 8
        for (int d = 0; d < D; ++d) {
          s = fmaf(qs[r * DS + d], ks[c * DS + d], s);
          dp = fmaf(dos[r * DS + d], vs[c * DS + d], dp);
        }
        const bool visible = j < sq.len_k && (!causal || j <= i + off);
        const float p = visible ? exp2f(s * scale_log2 - lse_s[r]) : 0.0f;
        ps[r * (BN + 1) + c] = p;
        dss[r * (BN + 1) + c] = p * (dp - del_s[r]);
      }
      __syncthreads();
      for (int idx = tid; idx < BN * D; idx += THREADS) {  // dV += P^T dO, dK += dS^T Q
        const int c = idx / D, d = idx - c * D;
        float av = 0.0f, ak = 0.0f;
#pragma unroll
        for (int r = 0; r < BM; ++r) {
          av = fmaf(ps[r * (BN + 1) + c], dos[r * DS + d], av);
          ak = fmaf(dss[r * (BN + 1) + c], qs[r * DS + d], ak);
        }
        dvs[c * DS + d] += av;
        dks[c * DS + d] += ak;
      }
      for (int idx = tid; idx < BM * D; idx += THREADS) {  // dQ += dS K (unscaled), one atomic per element
        const int r = idx / D, d = idx - r * D;
        if (i0 + r >= sq.len_q) continue;
        float a = 0.0f;
#pragma unroll
        for (int c = 0; c < BN; ++c) a = fmaf(dss[r * (BN + 1) + c], ks[c * DS + d], a);
        if (a != 0.0f) atomicAdd(dq_acc + (sq.q_start + i0 + r) * q_row + h * D + d, a);
      }
    }
  }
  __syncthreads();
  for (int idx = tid; idx < BN * D; idx += THREADS) {
    const int c = idx / D, d = idx - c * D;
    if (n0 + c >= sq.len_k) continue;
    const long long at = (sq.k_start + n0 + c) * k_row + g * D + d;
    dk[at] = rf::from_acc<T>(dks[c * DS + d] * scale);
    dv[at] = rf::from_acc<T>(dvs[c * DS + d]);
  }
}

// ==== v2: float16 tensor cores ===========================================================================
// attention_backward_v2<D, BM, WARPS>: D in {64, 128}; grid (key tiles of BN = 16 WARPS, kv heads,
// sequences), WARPS warps; warp w owns keys n0 + 16w .. +15 for the whole kernel, with their dK and dV
// (16 x D fp32 each) in registers. For each q head of the group and each query tile of BM rows that sees the key tile:
//   1. Q and dO tiles -> shared memory (cp.async 16 B, zero fill past the sequence), lse2 / delta beside.
//   2. S^T = K_w Q^T and dP^T = V_w dO^T (16 keys x BM queries, mma.sync m16n8k16, fp32): K_w / V_w are the
//      A operands (kept in registers for D = 64, re-read with ldmatrix for D = 128), Q / dO rows the "col"
//      B operands (ldmatrix, no transpose).
//   3. P^T = exp2(S^T scale_log2 - lse2) (masked: key past len_k, causal, query without keys; the
//      per-element test only in warps whose 16 keys cross len_k or the tile's diagonal), dS^T =
//      P^T (dP^T - delta), elementwise on the accumulator fragments.
//   4. dV += P^T dO and dK += dS^T Q: P^T / dS^T packed to half2 are the A operands directly (the C layout
//      of two n8 tiles is the A layout of one k16 step), dO / Q rows the B operands (ldmatrix .trans).
//   5. dS^T is stored transposed as fp16 to shared memory dS [BM][BN]; after a barrier the warps split
//      dQ = dS K (BM x D, summed over the block's BN keys) into 16-row x (D / split) pieces and add them to
//      dq_acc with fp32 atomics: one atomic per element per (query tile, key block), so the dq atomic
//      traffic is seq_q x D x seq_k / BN per head. With 8 warps (v4) BN = 128 halves it, and on sm_90 the
//      lanes tq, tq ^ 1 swap halves of their C fragments so that each adds 4 consecutive floats with one
//      red.global.add.v4.f32 (a quarter of the reduction instructions of scalar atomicAdd).
// Query tiles run as one flattened sequence (q head of the group, tile) whose tile t + 1 is copied
// (cp.async) into the other half of double buffers while tile t computes; v4 rotates the sequence's start
// by the key tile index (co-resident blocks of one head then add into different dq rows).
// Shared memory (fp16 rows padded by 8 halves = 16 bytes, so the 8 rows of an ldmatrix phase start in 8
// different bank quads): K [BN][D+8], V [BN][D+8], Q [2][BM][D+8], dO [2][BM][D+8], dS [BM][BN+8], then
// lse2 and delta float [2][BM] each: 2 (2 BN + 4 BM)(D + 8) + 2 BM (BN + 8) + 16 BM bytes.
//   v2 <64, 64, 4>: 64 KB, 246 registers (sm_90)      v2 <128, 32, 4>: 73 KB, 254 registers
//   v3 <64, 32, 4>: 41 KB, 208 registers              v3 <128, 16, 4>: 54 KB, 242 registers
//   v4 <64, 64, 8>: 90 KB, 252 registers              v4 <128, 16, 8>: 90 KB, 255 registers
// (no spills on sm_80 / sm_90). 4 warps: 2 blocks per SM; 8 warps: 1 block per SM (registers), the same
// 8 warps per SM. BM = 64 for D = 64, 32 (v2) / 16 for D = 128 (registers: dK + dV are D floats per lane;
// v4 <128, 32, 8> would spill).
namespace rf_attn_bwd {
using u32 = unsigned;

// dst[0..3] += (a, b, c, d) as one 16-byte reduction in L2 (sm_90; dst 16-byte aligned).
__device__ __forceinline__ void red_add_v4(float* dst, float a, float b, float c, float d) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(dst), "f"(a), "f"(b), "f"(c), "f"(d)
               : "memory");
#else
  atomicAdd(dst, a), atomicAdd(dst + 1, b), atomicAdd(dst + 2, c), atomicAdd(dst + 3, d);
#endif
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
}  // namespace rf_attn_bwd

template <int D, int BM, int WARPS>
__global__ void __launch_bounds__(32 * WARPS, 8 / WARPS) attention_backward_v2(RF_ATTN_BWD_ARGS(__half)) {
  using namespace rf_attn_bwd;
  static_assert(D % 16 == 0 && BM % 16 == 0 && BM <= 64, "attention_backward_v2: D, BM multiples of 16");
  static_assert(WARPS == 4 || WARPS == 8, "attention_backward_v2: 4 (v2 / v3) or 8 (v4) warps");
  constexpr int BN = 16 * WARPS, THREADS = 32 * WARPS;
  constexpr int RS = (D + 8) * 2;    // bytes per padded row of K, V, Q, dO
  constexpr int SS = (BN + 8) * 2;   // bytes per padded row of dS
  constexpr int CH = D / 8;          // 16-byte chunks per row
  constexpr int KT = D / 16;         // k-steps over the head dim
  constexpr int QT = BM / 8;         // n8 tiles of queries in S^T
  constexpr int DT = D / 8;          // n8 tiles of the head dim in dK / dV
  constexpr bool KV_REG = D <= 64;   // K_w / V_w fragments held in registers
  constexpr int ROW_TILES = BM / 16;                // dQ: 16-row pieces
  constexpr int COL_SPLIT = WARPS / ROW_TILES;      // dQ: head-dim pieces per row piece
  constexpr int DQ_T = DT / COL_SPLIT;              // n8 tiles per warp in dQ
  // v4 (8 warps) on sm_90: dQ added with 16-byte vector reductions (red.global.add.v4.f32).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr bool VEC_RED = WARPS == 8;
#else
  constexpr bool VEC_RED = false;
#endif
  static_assert(WARPS % ROW_TILES == 0 && DT % COL_SPLIT == 0 && DQ_T % 2 == 0, "dQ split");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  const u32 k_smem = rf::smem_addr(smem_raw);
  const u32 v_smem = k_smem + BN * RS;
  const u32 q_smem0 = v_smem + BN * RS;      // [2][BM][D+8]
  const u32 do_smem0 = q_smem0 + 2 * BM * RS;  // [2][BM][D+8]
  constexpr int kDsOffset = 2 * BN * RS + 4 * BM * RS;
  __half* ds_s = reinterpret_cast<__half*>(smem_raw + kDsOffset);
  float* lse_s0 = reinterpret_cast<float*>(smem_raw + kDsOffset + BM * SS);  // [2][BM]
  float* del_s0 = lse_s0 + 2 * BM;                                           // [2][BM]
  const u32 ds_smem = rf::smem_addr(ds_s);

  // Block -> (key tile kt, kv head, sequence): grid (key tiles, kv heads, sequences). v4 reads the launch
  // order with the key tile varying slowest, so under causal the blocks with the most query tiles (the
  // first key tiles) start first and the light ones fill the tail (longest first).
  int kt = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  if constexpr (WARPS == 8) {
    const int hb = gridDim.y * gridDim.z;
    const long long lin = blockIdx.x + static_cast<long long>(gridDim.x) *
                                           (blockIdx.y + static_cast<long long>(gridDim.y) * blockIdx.z);
    kt = static_cast<int>(lin / hb);
    const int rest = static_cast<int>(lin - static_cast<long long>(kt) * hb);
    kvh = rest % gridDim.y;
    b = rest / gridDim.y;
  }
  const int tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32, g = lane >> 2, tq = lane & 3;
  const bool varlen = cu_seqlens_q != nullptr;
  const Seq sq = sequence(cu_seqlens_q, cu_seqlens_k, seq_q, seq_k, b);
  const int n0 = kt * BN;
  if (n0 >= sq.len_k) return;
  const int off = sq.len_k - sq.len_q;
  const int grp = q_heads / kv_heads;
  const long long q_row = static_cast<long long>(q_heads) * D;
  const long long k_row = static_cast<long long>(kv_heads) * D;

  // ---- K / V tile (zero rows past len_k): commit group 0 ----
  for (int idx = tid; idx < BN * CH; idx += THREADS) {
    const int r = idx / CH, c = idx - r * CH;
    const bool ok = n0 + r < sq.len_k;
    const long long at = (ok ? (sq.k_start + n0 + r) * k_row : 0) + kvh * D + c * 8;
    rf::cp_async_16(k_smem + r * RS + c * 16, k + at, ok);
    rf::cp_async_16(v_smem + r * RS + c * 16, v + at, ok);
  }
  rf::cp_async_commit();

  // Query tiles: for each q head of the group (r_h), the tiles from the first one that sees key n0 (causal:
  // query i >= n0 - off) to the end; flattened so that tile t + 1 is prefetched while tile t computes.
  const int i_lo = causal ? max(0, n0 - off) / BM * BM : 0;
  const int per_head = sq.len_q > i_lo ? (sq.len_q - i_lo + BM - 1) / BM : 0;
  const int n_tiles = per_head * grp;
  // v4: block kt starts at (head, tile) number kt mod n_tiles and wraps around, so that co-resident blocks
  // of one head add into different dq rows at a time (no same-address atomic pile-up in L2).
  const int rot = WARPS == 8 && n_tiles > 0 ? kt % n_tiles : 0;
  auto tile_of = [&](int t) { return t + rot < n_tiles ? t + rot : t + rot - n_tiles; };
  // Q, dO (cp.async, zero rows past the sequence), lse2 and delta of tile t into buffer t & 1.
  auto load_q = [&](int t) {
    const int u = tile_of(t), buf = t & 1;
    const int h = kvh * grp + u / per_head, i0 = i_lo + (u % per_head) * BM;
    for (int idx = tid; idx < BM * CH; idx += THREADS) {
      const int r = idx / CH, c = idx - r * CH;
      const bool ok = i0 + r < sq.len_q;
      const long long at = (ok ? (sq.q_start + i0 + r) * q_row : 0) + h * D + c * 8;
      rf::cp_async_16(q_smem0 + (buf * BM + r) * RS + c * 16, q + at, ok);
      rf::cp_async_16(do_smem0 + (buf * BM + r) * RS + c * 16, dout + at, ok);
    }
    if (tid < BM) {
      const bool ok = i0 + tid < sq.len_q;
      const long long li = ok ? lse_index(varlen, b, h, i0 + tid, sq, q_heads, seq_q, total_q) : 0;
      lse_s0[buf * BM + tid] = ok ? lse2_of(lse[li]) : INFINITY;
      del_s0[buf * BM + tid] = ok ? delta[li] : 0.0f;
    }
  };
  if (n_tiles > 0) load_q(0);
  rf::cp_async_commit();  // group 1 (possibly empty)

  // A-operand row address of this lane for a 16-row tile starting at row0 of a [rows][*] tile, k-step ks.
  auto a_addr = [&](u32 base, int rs, int row0, int ks) {
    const int r = row0 + (lane & 7) + 8 * ((lane >> 3) & 1);
    return base + r * rs + (2 * ks + (lane >> 4)) * 16;
  };
  // B operand ("col", k contiguous in smem rows = n): n8 tiles 2np, 2np+1, k-step ks.
  auto b_addr = [&](u32 base, int rs, int np, int ks) {
    const int r = 16 * np + (lane & 7) + 8 * (lane >> 4);
    return base + r * rs + (2 * ks + ((lane >> 3) & 1)) * 16;
  };
  // B operand from [k][n] rows (n contiguous), .trans: k-step kk, n8 tiles 2dp, 2dp+1.
  auto bt_addr = [&](u32 base, int rs, int kk, int dp) {
    const int r = 16 * kk + (lane & 7) + 8 * ((lane >> 3) & 1);
    return base + r * rs + (2 * dp + (lane >> 4)) * 16;
  };

  float dk_acc[DT][4], dv_acc[DT][4];
#pragma unroll
  for (int t = 0; t < DT; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk_acc[t][e] = dv_acc[t][e] = 0.0f;

  u32 kf[KV_REG ? KT : 1][4], vf[KV_REG ? KT : 1][4];
  rf::cp_async_wait<1>();  // K / V landed (tile 0 may still be in flight)
  __syncthreads();
  if constexpr (KV_REG) {
#pragma unroll
    for (int ks = 0; ks < KT; ++ks) {
      rf::ldmatrix_x4(kf[ks], a_addr(k_smem, RS, 16 * warp, ks));
      rf::ldmatrix_x4(vf[ks], a_addr(v_smem, RS, 16 * warp, ks));
    }
  }

  int key[2];
  key[0] = n0 + 16 * warp + g;
  key[1] = key[0] + 8;

  for (int t_q = 0; t_q < n_tiles; ++t_q) {
    const int u = tile_of(t_q), buf = t_q & 1;
    const int h = kvh * grp + u / per_head, i0 = i_lo + (u % per_head) * BM;
    if (t_q + 1 < n_tiles) {
      load_q(t_q + 1);  // into the buffer tile t_q - 1 used: the barrier ending t_q - 1 freed it
      rf::cp_async_commit();
      rf::cp_async_wait<1>();  // everything but the newest group: tile t_q is in
    } else {
      rf::cp_async_wait<0>();
    }
    __syncthreads();
    const u32 q_smem = q_smem0 + buf * BM * RS, do_smem = do_smem0 + buf * BM * RS;
    const float* lse_s = lse_s0 + buf * BM;
    const float* del_s = del_s0 + buf * BM;
    {
      // ---- 2. S^T = K_w Q^T, dP^T = V_w dO^T ----
      float s[QT][4], dp[QT][4];
#pragma unroll
      for (int t = 0; t < QT; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[t][e] = dp[t][e] = 0.0f;
#pragma unroll
      for (int ks = 0; ks < KT; ++ks) {
        u32 ka[4], va[4];
        if constexpr (KV_REG) {
#pragma unroll
          for (int e = 0; e < 4; ++e) ka[e] = kf[ks][e], va[e] = vf[ks][e];
        } else {
          rf::ldmatrix_x4(ka, a_addr(k_smem, RS, 16 * warp, ks));
          rf::ldmatrix_x4(va, a_addr(v_smem, RS, 16 * warp, ks));
        }
#pragma unroll
        for (int np = 0; np < QT / 2; ++np) {
          u32 qb[4], ob[4];
          rf::ldmatrix_x4(qb, b_addr(q_smem, RS, np, ks));
          rf::ldmatrix_x4(ob, b_addr(do_smem, RS, np, ks));
          rf::mma_m16n8k16(s[2 * np], ka, qb[0], qb[1]);
          rf::mma_m16n8k16(s[2 * np + 1], ka, qb[2], qb[3]);
          rf::mma_m16n8k16(dp[2 * np], va, ob[0], ob[1]);
          rf::mma_m16n8k16(dp[2 * np + 1], va, ob[2], ob[3]);
        }
      }

      // ---- 3. P^T and dS^T on the fragments: element e of tile t is key key[e >> 1], query 8t + 2tq + (e & 1)
      u32 pa[QT][2], dsa[QT][2];  // half2: [t][h] = (key row g + 8h, queries 8t + 2tq, +1)
      // The element mask matters only when this warp's last key is past len_k or past the diagonal of
      // the tile's first query (uniform across the warp: interior tiles skip the per-element test).
      const int k_last = n0 + 16 * warp + 15;
      const bool edge = k_last >= sq.len_k || (causal && k_last > i0 + off);
#pragma unroll
      for (int t = 0; t < QT; ++t) {
        float pv[4], dsv[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int qi = 8 * t + 2 * tq + (e & 1);
          const int i = i0 + qi, j = key[e >> 1];
          const bool visible = !edge || (j < sq.len_k && (!causal || j <= i + off));
          const float p = visible ? fast_exp2(fmaf(s[t][e], scale_log2, -lse_s[qi])) : 0.0f;
          pv[e] = p;
          dsv[e] = p * (dp[t][e] - del_s[qi]);
        }
        pa[t][0] = rf::pack_half2(pv[0], pv[1]);
        pa[t][1] = rf::pack_half2(pv[2], pv[3]);
        dsa[t][0] = rf::pack_half2(dsv[0], dsv[1]);
        dsa[t][1] = rf::pack_half2(dsv[2], dsv[3]);
        // dS transposed into shared memory: ds_s[query][key_local]
        const int kl = 16 * warp + g;
        ds_s[(8 * t + 2 * tq) * (BN + 8) + kl] = __float2half_rn(dsv[0]);
        ds_s[(8 * t + 2 * tq + 1) * (BN + 8) + kl] = __float2half_rn(dsv[1]);
        ds_s[(8 * t + 2 * tq) * (BN + 8) + kl + 8] = __float2half_rn(dsv[2]);
        ds_s[(8 * t + 2 * tq + 1) * (BN + 8) + kl + 8] = __float2half_rn(dsv[3]);
      }

      // ---- 4. dV += P^T dO, dK += dS^T Q (k = queries) ----
#pragma unroll
      for (int kk = 0; kk < BM / 16; ++kk) {
        const u32 ap[4] = {pa[2 * kk][0], pa[2 * kk][1], pa[2 * kk + 1][0], pa[2 * kk + 1][1]};
        const u32 as[4] = {dsa[2 * kk][0], dsa[2 * kk][1], dsa[2 * kk + 1][0], dsa[2 * kk + 1][1]};
#pragma unroll
        for (int dpair = 0; dpair < D / 16; ++dpair) {
          u32 ob[4], qb[4];
          rf::ldmatrix_x4_trans(ob, bt_addr(do_smem, RS, kk, dpair));
          rf::ldmatrix_x4_trans(qb, bt_addr(q_smem, RS, kk, dpair));
          rf::mma_m16n8k16(dv_acc[2 * dpair], ap, ob[0], ob[1]);
          rf::mma_m16n8k16(dv_acc[2 * dpair + 1], ap, ob[2], ob[3]);
          rf::mma_m16n8k16(dk_acc[2 * dpair], as, qb[0], qb[1]);
          rf::mma_m16n8k16(dk_acc[2 * dpair + 1], as, qb[2], qb[3]);
        }
      }
      __syncthreads();  // dS complete in shared memory

      // ---- 5. dQ (unscaled) += dS K: warp -> rows 16 * (warp % ROW_TILES), head-dim piece warp / ROW_TILES
      {
        const int row0 = 16 * (warp % ROW_TILES);
        const int dt0 = DQ_T * (warp / ROW_TILES);
        float acc[DQ_T][4];
#pragma unroll
        for (int t = 0; t < DQ_T; ++t)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[t][e] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
          u32 a[4];
          rf::ldmatrix_x4(a, a_addr(ds_smem, SS, row0, kk));
#pragma unroll
          for (int dpair = 0; dpair < DQ_T / 2; ++dpair) {
            u32 kb[4];
            rf::ldmatrix_x4_trans(kb, bt_addr(k_smem, RS, kk, dt0 / 2 + dpair));
            rf::mma_m16n8k16(acc[2 * dpair], a, kb[0], kb[1]);
            rf::mma_m16n8k16(acc[2 * dpair + 1], a, kb[2], kb[3]);
          }
        }
        if constexpr (VEC_RED) {
          // Lanes tq, tq ^ 1 swap halves: the even lane gathers row g, columns 2 tq .. 2 tq + 3, the odd
          // lane row g + 8, columns 2 tq - 2 .. 2 tq + 1; one 16-byte vector reduction each.
          const bool odd = tq & 1;
          const int i = i0 + row0 + g + (odd ? 8 : 0);
          float* dst = dq_acc + (sq.q_start + i) * q_row + h * D + 8 * dt0 + 2 * (tq & ~1);
#pragma unroll
          for (int t = 0; t < DQ_T; ++t) {
            const float r0 = __shfl_xor_sync(0xffffffffu, odd ? acc[t][0] : acc[t][2], 1);
            const float r1 = __shfl_xor_sync(0xffffffffu, odd ? acc[t][1] : acc[t][3], 1);
            if (i < sq.len_q) {
              if (odd) {
                red_add_v4(dst + 8 * t, r0, r1, acc[t][2], acc[t][3]);
              } else {
                red_add_v4(dst + 8 * t, acc[t][0], acc[t][1], r0, r1);
              }
            }
          }
        } else {
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            const int i = i0 + row0 + g + 8 * hh;
            if (i >= sq.len_q) continue;
            float* dst = dq_acc + (sq.q_start + i) * q_row + h * D + 8 * dt0 + 2 * tq;
#pragma unroll
            for (int t = 0; t < DQ_T; ++t) {
              atomicAdd(dst + 8 * t, acc[t][2 * hh]);
              atomicAdd(dst + 8 * t + 1, acc[t][2 * hh + 1]);
            }
          }
        }
      }
      __syncthreads();  // Q, dO, dS, lse2, delta of this buffer free for tile t_q + 2
    }
  }

  // ---- dK (times scale) and dV: C fragments (key rows g, g + 8; head-dim columns 8t + 2tq, +1) ----
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int j = key[hh];
    if (j >= sq.len_k) continue;
    const long long at = (sq.k_start + j) * k_row + kvh * D + 2 * tq;
#pragma unroll
    for (int t = 0; t < DT; ++t) {
      *reinterpret_cast<__half2*>(dk + at + 8 * t) =
          __floats2half2_rn(dk_acc[t][2 * hh] * scale, dk_acc[t][2 * hh + 1] * scale);
      *reinterpret_cast<__half2*>(dv + at + 8 * t) = __floats2half2_rn(dv_acc[t][2 * hh], dv_acc[t][2 * hh + 1]);
    }
  }
}
