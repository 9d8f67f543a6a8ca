// attention.cu: fused prefill attention (FlashAttention-2 style online softmax), family "attention".
//
//   out[b, i, h, :] = sum_j softmax_j(scale * q[b,i,h,:] . k[b,j,g,:] + mask[b,h,i,j]) * v[b,j,g,:]
//   lse[b, h, i]    = log sum_j exp(scale * q . k_j + mask_ij)          (natural log, visible keys only)
//
// with g = h / (q_heads / kv_heads) (GQA / MQA), keys j < len_k, and under causal masking only keys
// j <= i + (len_k - len_q) (bottom-right alignment, as FlashAttention >= 2.1 and chunked prefill). A query
// row that sees no key at all gets out = 0 and lse = -inf.
//
// Memory layout (strides in elements; the last dim, head_dim, is contiguous):
//   padded batch  q [batch, seq_q, q_heads, D], k / v [batch, seq_k, kv_heads, D], out like q,
//                 lse float32 [batch, q_heads, seq_q]
//   varlen        q [total_q, q_heads, D], k / v [total_k, kv_heads, D]; sequence b owns tokens
//                 cu_seqlens[b] .. cu_seqlens[b+1]-1 (int32, batch+1 entries; the batch strides are 0);
//                 lse float32 [q_heads, total_q]
//   Token t of sequence b, head h lives at b*sb + t*ss + h*sh.
//   mask (optional, float32, additive, natural-log units): element (b, h, i, j) at
//                 b*m_sb + h*m_sh + i*m_sq + j (broadcast dims have stride 0). Padded layout only.
//
// Grid: x = row tiles (reversed under causal so the tiles with the most keys start first), y = q heads
// (pack = 1) or groups of `pack` q heads sharing one kv head (pack > 1), z = batch (or sequences). With
// pack > 1 ("pack GQA") the M dimension of a tile is (query position, head in group): row r is query
// i = r / pack of q head y*pack + r % pack, so each K/V tile in shared memory serves the whole group.
//
// Numerics: everything in base 2 with scale*log2(e) folded into one multiply (scale_log2), the mask
// multiplied by log2(e); fp32 running max m and sum l per row. When the running max is still -inf (no
// visible key yet) the kernels subtract 0 instead, so exp2(-inf) = 0 and nothing becomes NaN; a row that
// ends with l = 0 writes zeros and lse = -inf. lse = (m + log2 l) * ln 2.
//
// Versions
//   attention_v1<T, D>          general SIMT kernel, T = __half or float, any D (template: exact D, the
//                               launcher zero-pads other head dims up to a listed D). 128 threads = 4 warps
//                               x 4 query rows (BM = 16), key tiles of BN = 32 in shared memory as fp32
//                               ([BN][D+1]: odd row stride, conflict-free column walks). Scores: lane j
//                               owns key j of the tile, dot products against the warp's 4 Q rows (Q in
//                               shared memory, broadcast reads); online softmax with warp reductions; P
//                               goes through shared memory; P.V: lane owns columns d = lane + 32c.
//   attention_v2<D, WARPS, BN, MASK>   float16 tensor-core kernel (sm_80+), D in {64, 96, 128}. Each warp
//                               owns 16 query rows (BM = 16 * WARPS). Shared memory (dynamic, fp16):
//                               Q [BM][D], K [2][BN][D], V [2][BN][D], rows of D/8 16-byte chunks stored
//                               XOR-swizzled (chunk c of row r at c ^ (r & 7), or c ^ ((r >> 1) & 3) for
//                               D = 96) so each 8-row ldmatrix phase hits 8 distinct bank groups. Copies
//                               are cp.async.cg 16 B with zero fill (src-size 0) for rows past the sequence;
//                               K/V tiles are double-buffered: tile j+1 is in flight while tile j computes.
//                               Q fragments live in registers for the whole kernel; S = Q K^T with
//                               mma.sync m16n8k16 (fp32 accumulate), online softmax on the accumulator
//                               fragments (ex2.approx), P packed to half2 registers is reused directly as
//                               the A operand of P V (the C layout of two m16n8 tiles is the A layout of
//                               one m16k16 step), O in fp32 registers, scaled by 1/l at the end and stored
//                               with 4-byte stores. Causal: key tiles entirely above the diagonal are
//                               never loaded; the element mask runs only on tiles crossing the diagonal or
//                               the end of the keys. MASK: additive float32 mask read per element.
//                               Launcher versions: 2 = WARPS 4 (BM 64, two blocks per SM), 3 = WARPS 8
//                               (BM 128, one block per SM: each K/V tile serves twice the rows); BN = 64.
//                               Shared memory: 2 * D * (BM + 4 * BN) bytes (80 KB for D = 128, WARPS 4).
//   attention_v4<D, BN, MASK>   float16 tensor-core kernel after FlashAttention-2's forward layout, D in
//                               {64, 96, 128}: 4 warps x 32 query rows (BM = 128, two m16 tiles per warp),
//                               so every K fragment (S = Q K^T) and V fragment (O += P V) read with
//                               ldmatrix feeds two mma's: half the shared-memory reads per mma of v2.
//                               O for 32 rows is 128 fp32 registers per thread at D = 128, so Q fragments
//                               are re-read from shared memory per k-step unless Q + O + S fit (D = 64,
//                               BN = 64). Shared memory as v2 (same swizzle): Q [128][D], K [2][BN][D],
//                               V [2][BN][D] = 2 * D * (128 + 4 * BN) bytes (96 KB at D = 128, BN = 64:
//                               two blocks per SM, 255 registers each). Pipeline with split K / V waits
//                               (commit groups Q, K0, V0, then K(t+1), V(t+1) per tile t): issue K(t+1),
//                               wait for K(t), S and the online softmax; issue V(t+1), wait for V(t), P V.
//                               So each copy has a whole tile of compute to land, the V wait overlaps S and
//                               the softmax, and two barriers per tile keep the double buffers safe.
//                               ldmatrix addresses are formed per k-step with one XOR (see `frag`), not
//                               kept in registers. Softmax without a mask and with scale > 0: the row max
//                               of the raw scores, p = ex2(FFMA(s, scale_log2, -m)) (one multiply less per
//                               score); the O rescale is skipped when no row of the warp raised its max
//                               (alpha == 1: a no-op) except at D = 128, BN = 64, where the branch would
//                               spill. Causal tile skipping, diagonal-only element masking,
//                               longest-first order, pack GQA, varlen, mask and lse as v2. BN per (D, MASK)
//                               is chosen by the launcher (64; 32 for masked D = 96 / 128: no spills).
//
// Fragment layouts (PTX ISA, mma.m16n8k16 .f16, g = lane / 4, t = lane % 4), used throughout v2:
//   A (16x16 row-major, 4 x .f16x2): a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
//   B (16x8 "col", 2 x .f16x2):      b0 (k 2t..2t+1, n g), b1 (k 2t+8..2t+9, n g)
//   C (16x8 fp32, 4 floats):         c0, c1 (g, 2t..2t+1), c2, c3 (g+8, 2t..2t+1)
//   ldmatrix.x4: lanes 8i..8i+7 give the row addresses of 8x8 matrix i; register i of lane l holds row
//   l/4, columns 2(l%4)..+1 of matrix i (with .trans: column l/4, rows 2(l%4)..+1).
#include "common.cuh"

namespace rf_attention {

using u32 = unsigned int;  // 32-bit registers of the PTX operands (no <cstdint>: NVRTC builds this too)

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// -inf without <cmath>'s INFINITY (not in NVRTC's headers).
__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

struct Seq {
  int q_start, k_start, len_q, len_k;
};

// Where sequence b lives: varlen offsets from cu_seqlens, or the padded lengths.
__device__ __forceinline__ Seq sequence(const int* cu_q, const int* cu_k, int seqlen_q, int seqlen_k, int b) {
  Seq s;
  if (cu_q != nullptr) {
    s.q_start = cu_q[b];
    s.len_q = cu_q[b + 1] - s.q_start;
    s.k_start = cu_k[b];
    s.len_k = cu_k[b + 1] - s.k_start;
  } else {
    s.q_start = 0;
    s.len_q = seqlen_q;
    s.k_start = 0;
    s.len_k = seqlen_k;
  }
  return s;
}

// ---- inline PTX: cp.async, ldmatrix, mma and pack_half2 come from common.cuh (namespace rf) ----------

// 2^x, flushing denormals; 2^-inf = +0.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

}  // namespace rf_attention

// The argument list shared by every prefill kernel (see the header for the meaning of each).
#define RF_ATTENTION_ARGS(T)                                                                             \
  const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v, T *__restrict__ out,        \
      float *__restrict__ lse, const float *__restrict__ mask, const int *__restrict__ cu_seqlens_q,      \
      const int *__restrict__ cu_seqlens_k, int seqlen_q, int seqlen_k, int q_heads, int kv_heads,        \
      int pack, long long q_sb, long long q_ss, long long q_sh, long long k_sb, long long k_ss,            \
      long long k_sh, long long v_sb, long long v_ss, long long v_sh, long long o_sb, long long o_ss,     \
      long long o_sh, long long lse_sb, long long lse_ss, long long lse_sh, long long m_sb, long long m_sh, \
      long long m_sq, float scale_log2, int causal

// ==== v1: general SIMT kernel ===============================================================================
namespace rf_attention {
constexpr int kV1Warps = 4;
constexpr int kV1Rows = 4;  // query rows per warp
constexpr int kV1BM = kV1Warps * kV1Rows;
constexpr int kV1BN = 32;  // keys per tile: one per lane
constexpr int kV1Threads = kV1Warps * rf::kWarp;

// Dynamic shared memory of attention_v1<T, D> in bytes (the launcher computes the same number).
__host__ __device__ constexpr int v1_smem_bytes(int d) {
  return 4 * (kV1BM * d + 2 * kV1BN * (d + 1) + kV1Warps * kV1Rows * kV1BN);
}
}  // namespace rf_attention

// Min 2 blocks per SM in the launch bounds: without a minimum ptxas picks a low register target on sm_90
// and spills a few bytes for some D; with it every D fits in <= 168 registers, no spills.
template <typename T, int D>
__global__ void __launch_bounds__(rf_attention::kV1Threads, 2) attention_v1(RF_ATTENTION_ARGS(T)) {
  using namespace rf_attention;
  constexpr int BM = kV1BM, BN = kV1BN, KS = D + 1, C = (D + rf::kWarp - 1) / rf::kWarp;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* Qs = reinterpret_cast<float*>(smem_raw);  // [BM][D]
  float* Ks = Qs + BM * D;                          // [BN][D+1]
  float* Vs = Ks + BN * KS;                         // [BN][D+1]
  float* Ps = Vs + BN * KS;                         // [warps][rows][BN]

  const int b = blockIdx.z, hy = blockIdx.y, tid = threadIdx.x;
  const Seq sq = sequence(cu_seqlens_q, cu_seqlens_k, seqlen_q, seqlen_k, b);
  const int rows = sq.len_q * pack;  // M extent: (query, head in pack)
  const int tile = causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const int m0 = tile * BM;
  if (m0 >= rows) return;
  const int kvh = (hy * pack) / (q_heads / kv_heads);
  const int off = sq.len_k - sq.len_q;  // causal: query i sees keys j <= i + off
  const T* kb = k + b * k_sb + (long long)sq.k_start * k_ss + kvh * k_sh;
  const T* vb = v + b * v_sb + (long long)sq.k_start * v_ss + kvh * v_sh;

  // Q tile -> shared (fp32), zeros for rows past the sequence.
  for (int idx = tid; idx < BM * D; idx += kV1Threads) {
    const int r = idx / D, d = idx - r * D, row = m0 + r;
    float x = 0.f;
    if (row < rows) {
      const int i = row / pack, qh = hy * pack + row % pack;
      x = rf::to_acc(q[b * q_sb + (long long)(sq.q_start + i) * q_ss + qh * q_sh + d]);
    }
    Qs[idx] = x;
  }

  const int warp = tid / rf::kWarp, lane = tid % rf::kWarp;
  int qi[kV1Rows];  // query position of each of the warp's rows; -1 past the sequence
  const float* mrow[kV1Rows];
  float m[kV1Rows], l[kV1Rows], o[kV1Rows][C];
#pragma unroll
  for (int r = 0; r < kV1Rows; ++r) {
    const int row = m0 + warp * kV1Rows + r;
    qi[r] = row < rows ? row / pack : -1;
    const int qh = hy * pack + row % pack;
    mrow[r] = mask == nullptr || row >= rows ? nullptr : mask + b * m_sb + qh * m_sh + (long long)qi[r] * m_sq;
    m[r] = neg_inf();
    l[r] = 0.f;
#pragma unroll
    for (int c = 0; c < C; ++c) o[r][c] = 0.f;
  }

  int n_end = sq.len_k;
  if (causal) n_end = min(n_end, min(sq.len_q - 1, (m0 + BM - 1) / pack) + off + 1);
  for (int n0 = 0; n0 < n_end; n0 += BN) {
    __syncthreads();  // the previous tile is consumed (and, the first time, Qs is written)
    for (int idx = tid; idx < BN * D; idx += kV1Threads) {
      const int j = idx / D, d = idx - j * D;
      const bool ok = n0 + j < sq.len_k;
      const long long t = n0 + j;
      Ks[j * KS + d] = ok ? rf::to_acc(kb[t * k_ss + d]) : 0.f;
      Vs[j * KS + d] = ok ? rf::to_acc(vb[t * v_ss + d]) : 0.f;
    }
    __syncthreads();

    // Scores of key n0 + lane against the warp's rows.
    float s[kV1Rows];
#pragma unroll
    for (int r = 0; r < kV1Rows; ++r) s[r] = 0.f;
    const float* krow = Ks + lane * KS;
    const float* qrow = Qs + warp * kV1Rows * D;
#pragma unroll 16
    for (int d = 0; d < D; ++d) {
      const float kd = krow[d];
#pragma unroll
      for (int r = 0; r < kV1Rows; ++r) s[r] = fmaf(qrow[r * D + d], kd, s[r]);
    }
    const int j = n0 + lane;
    float* prow = Ps + warp * kV1Rows * BN;
#pragma unroll
    for (int r = 0; r < kV1Rows; ++r) {
      const bool visible = qi[r] >= 0 && j < sq.len_k && (!causal || j <= qi[r] + off);
      float x = neg_inf();
      if (visible) {
        x = s[r] * scale_log2;
        if (mrow[r] != nullptr) x = fmaf(mrow[r][j], kLog2e, x);
      }
      const float m_new = fmaxf(m[r], rf::warp_reduce(x, rf::Max()));
      const float m_use = m_new == neg_inf() ? 0.f : m_new;  // no visible key yet: keep everything 0
      const float p = exp2f(x - m_use);
      const float alpha = exp2f(m[r] - m_use);
      l[r] = l[r] * alpha + rf::warp_reduce(p, rf::Sum());
      m[r] = m_new;
#pragma unroll
      for (int c = 0; c < C; ++c) o[r][c] *= alpha;
      prow[r * BN + lane] = p;
    }
    __syncwarp();
    // O += P V: lane owns columns d = lane + 32c.
#pragma unroll 4
    for (int jj = 0; jj < BN; ++jj) {
      float vv[C];
#pragma unroll
      for (int c = 0; c < C; ++c) {
        const int d = c * rf::kWarp + lane;
        vv[c] = d < D ? Vs[jj * KS + d] : 0.f;
      }
#pragma unroll
      for (int r = 0; r < kV1Rows; ++r) {
        const float p = prow[r * BN + jj];
#pragma unroll
        for (int c = 0; c < C; ++c) o[r][c] = fmaf(p, vv[c], o[r][c]);
      }
    }
    __syncwarp();
  }

#pragma unroll
  for (int r = 0; r < kV1Rows; ++r) {
    if (qi[r] < 0) continue;
    const int row = m0 + warp * kV1Rows + r, qh = hy * pack + row % pack;
    const long long t = sq.q_start + qi[r];
    const float inv = l[r] > 0.f ? __frcp_rn(l[r]) : 0.f;  // no division slow-path call
    T* orow = out + b * o_sb + t * o_ss + qh * o_sh;
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int d = c * rf::kWarp + lane;
      if (d < D) orow[d] = rf::from_acc<T>(o[r][c] * inv);
    }
    if (lse != nullptr && lane == 0)
      lse[b * lse_sb + t * lse_ss + qh * lse_sh] = l[r] > 0.f ? (m[r] + log2f(l[r])) * kLn2 : neg_inf();
  }
}

// ==== v2: float16 tensor-core kernel ========================================================================
namespace rf_attention {

// Dynamic shared memory of attention_v2<D, WARPS, BN, *> in bytes: Q [BM][D] + K, V [2][BN][D], fp16.
__host__ __device__ constexpr int v2_smem_bytes(int d, int warps, int bn) {
  return 2 * d * (16 * warps + 4 * bn);
}

// Physical 16-byte chunk of logical chunk c in row r of a tile with CH chunks per row (see the header).
template <int CH> __device__ __forceinline__ int swizzle(int r, int c) {
  static_assert(CH % 8 == 0 || CH == 12, "swizzle: 8k or 12 chunks per row");
  if constexpr (CH % 8 == 0) {
    return c ^ (r & 7);
  } else {
    return c ^ ((r >> 1) & 3);
  }
}

}  // namespace rf_attention

// 4 warps: two blocks per SM (<= 255 registers each: 240 at D = 128, 2 x 80 KB shared memory at D = 128);
// 8 warps (v3): one block of <= 255 registers.
template <int D, int WARPS, int BN, bool MASK>
__global__ void __launch_bounds__(WARPS * 32, WARPS <= 4 ? 2 : 1) attention_v2(RF_ATTENTION_ARGS(__half)) {
  using namespace rf_attention;
  static_assert(D % 16 == 0 && BN % 16 == 0, "attention_v2: D and BN multiples of 16");
  constexpr int THREADS = WARPS * 32, BM = 16 * WARPS;
  constexpr int CH = D / 8;         // 16-byte chunks per row
  constexpr int ROW_BYTES = D * 2;  // one row of a tile in shared memory
  constexpr int KT = D / 16;        // k-steps of Q K^T
  constexpr int NT = BN / 8;        // n8 tiles of S (keys)
  constexpr int DT = D / 8;         // n8 tiles of O (head dim)
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const u32 q_smem = rf::smem_addr(smem_raw);
  const u32 k_smem = q_smem + BM * ROW_BYTES;      // [2][BN][D]
  const u32 v_smem = k_smem + 2 * BN * ROW_BYTES;  // [2][BN][D]

  const int b = blockIdx.z, hy = blockIdx.y, tid = threadIdx.x;
  const Seq sq = sequence(cu_seqlens_q, cu_seqlens_k, seqlen_q, seqlen_k, b);
  const int rows = sq.len_q * pack;
  const int tile = causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const int m0 = tile * BM;
  if (m0 >= rows) return;
  const int kvh = (hy * pack) / (q_heads / kv_heads);
  const int off = sq.len_k - sq.len_q;
  const __half* kb = k + b * k_sb + (long long)sq.k_start * k_ss + kvh * k_sh;
  const __half* vb = v + b * v_sb + (long long)sq.k_start * v_ss + kvh * v_sh;

  // Keys this tile needs: all, or under causal up to the diagonal of its last valid row.
  int n_end = sq.len_k;
  if (causal) n_end = min(n_end, min(sq.len_q - 1, (m0 + BM - 1) / pack) + off + 1);
  const int n_tiles = n_end > 0 ? (n_end + BN - 1) / BN : 0;
  // Tiles from here on need the element mask (keys past len_k or past the first row's diagonal).
  const int i_first = m0 / pack;
  int mask_from = sq.len_k / BN;  // the first tile holding keys >= len_k (partial last tile)
  if (causal) mask_from = min(mask_from, max(0, (i_first + off + 1) / BN));
  // (a tile n0 needs the causal mask iff n0 + BN - 1 > i_first + off, i.e. tile index >= (i_first+off+1)/BN)

  // ---- Q tile: cp.async with zero fill past the sequence (group 0) ----
  for (int idx = tid; idx < BM * CH; idx += THREADS) {
    const int r = idx / CH, c = idx - r * CH, row = m0 + r;
    const bool ok = row < rows;
    const __half* src = q;
    if (ok) {
      const int i = row / pack, qh = hy * pack + row % pack;
      src = q + b * q_sb + (long long)(sq.q_start + i) * q_ss + qh * q_sh + c * 8;
    }
    rf::cp_async_16(q_smem + r * ROW_BYTES + swizzle<CH>(r, c) * 16, src, ok);
  }
  rf::cp_async_commit();

  // K/V tile `t` into buffer t % 2 (rows past len_k zero-filled: P is 0 there, V must not be NaN).
  auto load_kv = [&](int t) {
    const int n0 = t * BN;
    const u32 ks = k_smem + (t & 1) * BN * ROW_BYTES, vs = v_smem + (t & 1) * BN * ROW_BYTES;
    for (int idx = tid; idx < BN * CH; idx += THREADS) {
      const int r = idx / CH, c = idx - r * CH;
      const bool ok = n0 + r < sq.len_k;
      const long long tok = ok ? n0 + r : 0;
      const u32 dst = r * ROW_BYTES + swizzle<CH>(r, c) * 16;
      rf::cp_async_16(ks + dst, kb + tok * k_ss + c * 8, ok);
      rf::cp_async_16(vs + dst, vb + tok * v_ss + c * 8, ok);
    }
  };
  if (n_tiles > 0) load_kv(0);
  rf::cp_async_commit();  // group 1 (possibly empty)

  const int warp = tid / 32, lane = tid % 32;
  const int g = lane >> 2, tq = lane & 3;  // fragment row group and thread-in-quad

  // The lane's two rows: h = 0 -> warp row g, h = 1 -> warp row g + 8.
  int qi[2];
  const float* mrow[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = m0 + warp * 16 + g + 8 * h;
    qi[h] = row / pack;  // >= len_q for rows past the sequence: never stored
    mrow[h] = nullptr;
    if (MASK && row < rows) {
      const int qh = hy * pack + row % pack;
      mrow[h] = mask + b * m_sb + qh * m_sh + (long long)qi[h] * m_sq;
    }
  }

  rf::cp_async_wait<1>();  // Q landed
  __syncthreads();
  // Q fragments (A operand), one per k-step: lanes 0-7 rows 0-7 / chunk 2ks, 8-15 rows 8-15 / 2ks,
  // 16-23 rows 0-7 / 2ks+1, 24-31 rows 8-15 / 2ks+1  ->  a0 (g, k 2t), a1 (g+8, 2t), a2 (g, 2t+8), a3 (g+8, 2t+8).
  u32 qf[KT][4];
  {
    const int r = warp * 16 + (lane & 7) + 8 * ((lane >> 3) & 1);
#pragma unroll
    for (int ks = 0; ks < KT; ++ks)
      rf::ldmatrix_x4(qf[ks], q_smem + r * ROW_BYTES + swizzle<CH>(r, 2 * ks + (lane >> 4)) * 16);
  }

  float o[DT][4];  // O accumulator: o[dt] = C fragment of head-dim columns 8dt..8dt+7
#pragma unroll
  for (int dt = 0; dt < DT; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
  float m_run[2] = {neg_inf(), neg_inf()};  // running max (base-2 units) of rows g, g+8
  float l_run[2] = {0.f, 0.f};              // this lane's partial running sums (its 2 columns per n8 tile)

  for (int t = 0; t < n_tiles; ++t) {
    if (t + 1 < n_tiles) {
      load_kv(t + 1);  // into the buffer tile t-1 used; the barrier at the end of t-1 freed it
      rf::cp_async_commit();
      rf::cp_async_wait<1>();  // everything but the newest group: tile t is in
    } else {
      rf::cp_async_wait<0>();
    }
    __syncthreads();
    const u32 ks_base = k_smem + (t & 1) * BN * ROW_BYTES;
    const u32 vs_base = v_smem + (t & 1) * BN * ROW_BYTES;
    const int n0 = t * BN;

    // ---- S = Q K^T: s[nt] = C fragment of keys n0 + 8nt .. +7 ----
    float s[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < KT; ++ks) {
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        // lanes 0-7: keys 16np+0..7 / chunk 2ks (b0 of tile 2np); 8-15: same keys / 2ks+1 (b1 of 2np);
        // 16-23: keys 16np+8..15 / 2ks (b0 of 2np+1); 24-31: keys +8..15 / 2ks+1 (b1 of 2np+1).
        const int r = 16 * np + (lane & 7) + 8 * (lane >> 4);
        u32 kf[4];
        rf::ldmatrix_x4(kf, ks_base + r * ROW_BYTES + swizzle<CH>(r, 2 * ks + ((lane >> 3) & 1)) * 16);
        rf::mma_m16n8k16(s[2 * np], qf[ks], kf[0], kf[1]);
        rf::mma_m16n8k16(s[2 * np + 1], qf[ks], kf[2], kf[3]);
      }
    }

    // ---- scale (base 2), mask, running max ----
    const bool edge = t >= mask_from;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e >> 1, j = n0 + 8 * nt + 2 * tq + (e & 1);  // element e: row g + 8h, key j
        float x = s[nt][e] * scale_log2;
        if (MASK) x = j < sq.len_k ? fmaf(mrow[h] != nullptr ? mrow[h][j] : 0.f, kLog2e, x) : x;
        if (edge && (j >= sq.len_k || (causal && j > qi[h] + off))) x = neg_inf();
        s[nt][e] = x;
      }
    }
    u32 pf[NT][2];  // P as half2: pf[nt][h] = (row g + 8h, keys n0 + 8nt + 2t, +1)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = neg_inf();
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * h], s[nt][2 * h + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));  // the 4 lanes of a quad share the row
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_run[h], mx);
      const float m_use = m_new == neg_inf() ? 0.f : m_new;
      const float alpha = fast_exp2(m_run[h] - m_use);
      m_run[h] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const float p0 = fast_exp2(s[nt][2 * h] - m_use), p1 = fast_exp2(s[nt][2 * h + 1] - m_use);
        sum += p0 + p1;
        pf[nt][h] = rf::pack_half2(p0, p1);
      }
      l_run[h] = l_run[h] * alpha + sum;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        o[dt][2 * h] *= alpha;
        o[dt][2 * h + 1] *= alpha;
      }
    }

    // ---- O += P V ----
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      // A of keys 16kk..16kk+15: a0 (g, 2t) = tile 2kk row g; a1 (g+8, 2t) = tile 2kk row g+8;
      // a2 (g, 8+2t) = tile 2kk+1 row g; a3 (g+8, 8+2t) = tile 2kk+1 row g+8.
      const u32 pa[4] = {pf[2 * kk][0], pf[2 * kk][1], pf[2 * kk + 1][0], pf[2 * kk + 1][1]};
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        // .trans; lanes 0-7: keys 16kk+0..7 / chunk 2dp (b0 of d-tile 2dp); 8-15: keys +8..15 / 2dp (b1 of
        // 2dp); 16-23: keys +0..7 / 2dp+1 (b0 of 2dp+1); 24-31: keys +8..15 / 2dp+1 (b1 of 2dp+1).
        const int r = 16 * kk + (lane & 7) + 8 * ((lane >> 3) & 1);
        u32 vf[4];
        rf::ldmatrix_x4_trans(vf, vs_base + r * ROW_BYTES + swizzle<CH>(r, 2 * dp + (lane >> 4)) * 16);
        rf::mma_m16n8k16(o[2 * dp], pa, vf[0], vf[1]);
        rf::mma_m16n8k16(o[2 * dp + 1], pa, vf[2], vf[3]);
      }
    }
    __syncthreads();  // every warp is done with buffer t % 2 before iteration t+1 refills it
  }

  // ---- epilogue: 1/l, store rows that exist ----
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float l = l_run[h];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int row = m0 + warp * 16 + g + 8 * h;
    if (row >= rows) continue;
    const int qh = hy * pack + row % pack;
    const long long tok = sq.q_start + qi[h];
    const float inv = l > 0.f ? __frcp_rn(l) : 0.f;  // no division slow-path call
    __half* orow = out + b * o_sb + tok * o_ss + qh * o_sh + 2 * tq;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
      *reinterpret_cast<__half2*>(orow + 8 * dt) = __floats2half2_rn(o[dt][2 * h] * inv, o[dt][2 * h + 1] * inv);
    if (lse != nullptr && tq == 0)
      lse[b * lse_sb + tok * lse_ss + qh * lse_sh] = l > 0.f ? (m_run[h] + log2f(l)) * kLn2 : neg_inf();
  }
}

// ==== v4: float16 tensor-core kernel, 32 query rows per warp, split K / V waits ============================
namespace rf_attention {
constexpr int kV4Warps = 4;
constexpr int kV4Threads = 32 * kV4Warps;
constexpr int kV4WarpRows = 32;                    // two m16 tiles per warp
constexpr int kV4BM = kV4Warps * kV4WarpRows;      // 128 query rows per block

// Dynamic shared memory of attention_v4<D, BN, *> in bytes: Q [BM][D] + K [2][BN][D] + V [2][BN][D], fp16.
__host__ __device__ constexpr int v4_smem_bytes(int d, int bn) { return 2 * d * (kV4BM + 4 * bn); }
}  // namespace rf_attention

// 128 threads, two blocks per SM (<= 255 registers; 2 x 96 KB shared memory at D = 128, BN = 64).
template <int D, int BN, bool MASK>
__global__ void __launch_bounds__(rf_attention::kV4Threads, 2) attention_v4(RF_ATTENTION_ARGS(__half)) {
  using namespace rf_attention;
  static_assert(D % 16 == 0 && BN % 16 == 0, "attention_v4: D and BN multiples of 16");
  constexpr int THREADS = kV4Threads, BM = kV4BM;
  constexpr int MT = kV4WarpRows / 16;  // m16 tiles per warp
  constexpr int CH = D / 8;             // 16-byte chunks per row
  constexpr int ROW_BYTES = D * 2;
  constexpr int KT = D / 16;  // k-steps of Q K^T
  constexpr int NT = BN / 8;  // n8 tiles of S (keys)
  constexpr int DT = D / 8;   // n8 tiles of O (head dim)
  // Q fragments stay in registers only where they fit beside O and S (fragments of Q + O + S <= 160
  // registers: D = 64 with BN = 64); otherwise they are re-read from shared memory at every k-step
  // (2 ldmatrix.x4 per k-step, each feeding BN/8 mma's).
  constexpr bool QREG = MT * 4 * (KT + DT + NT) <= 160;
  // The branch around the O rescale (LAZY) costs registers: ptxas spills 8 bytes at D = 128, BN = 64
  // (O + S fragments = 192 registers), so there the rescale is unconditional.
  constexpr bool LAZY = MT * 4 * (DT + NT) < 192;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  // Shared-memory addresses: sb + an offset; the tiles start at offsets that are multiples of ROW_BYTES.
  const u32 sb = rf::smem_addr(smem_raw);
  constexpr u32 Q_OFF = 0, K_OFF = BM * ROW_BYTES, V_OFF = K_OFF + 2 * BN * ROW_BYTES;
  const u32 q_smem = sb + Q_OFF, k_smem = sb + K_OFF, v_smem = sb + V_OFF;

  const int b = blockIdx.z, hy = blockIdx.y, tid = threadIdx.x;
  const Seq sq = sequence(cu_seqlens_q, cu_seqlens_k, seqlen_q, seqlen_k, b);
  const int rows = sq.len_q * pack;
  const int tile = causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const int m0 = tile * BM;
  if (m0 >= rows) return;
  const int kvh = (hy * pack) / (q_heads / kv_heads);
  const int off = sq.len_k - sq.len_q;
  const __half* kb = k + b * k_sb + (long long)sq.k_start * k_ss + kvh * k_sh;
  const __half* vb = v + b * v_sb + (long long)sq.k_start * v_ss + kvh * v_sh;

  // Key tiles this block needs and the first one needing the element mask (as v2).
  int n_end = sq.len_k;
  if (causal) n_end = min(n_end, min(sq.len_q - 1, (m0 + BM - 1) / pack) + off + 1);
  const int n_tiles = n_end > 0 ? (n_end + BN - 1) / BN : 0;
  const int i_first = m0 / pack;
  int mask_from = sq.len_k / BN;
  if (causal) mask_from = min(mask_from, max(0, (i_first + off + 1) / BN));

  // ---- Q tile (commit group 0), zero fill past the sequence ----
  for (int idx = tid; idx < BM * CH; idx += THREADS) {
    const int r = idx / CH, c = idx - r * CH, row = m0 + r;
    const bool ok = row < rows;
    const __half* src = q;
    if (ok) {
      const int i = row / pack, qh = hy * pack + row % pack;
      src = q + b * q_sb + (long long)(sq.q_start + i) * q_ss + qh * q_sh + c * 8;
    }
    rf::cp_async_16(q_smem + r * ROW_BYTES + swizzle<CH>(r, c) * 16, src, ok);
  }
  rf::cp_async_commit();

  // One K or V tile `t` into buffer t % 2; rows past len_k zero-filled (P is 0 there, V must not be NaN).
  // When CH divides the thread count (D = 64, 128) a thread always copies chunk c = tid % CH of rows
  // r0 + RPP i, RPP a multiple of 8: the swizzled chunk is the same for all of them and one pointer steps
  // by RPP rows (few live registers across the main loop); otherwise (D = 96) the general index walk.
  auto load_tile = [&](u32 base, const __half* src, long long ss, int t) {
    const int n0 = t * BN;
    const u32 dst0 = base + (t & 1) * BN * ROW_BYTES;
    if constexpr (THREADS % CH == 0 && (THREADS / CH) % 8 == 0 && BN % (THREADS / CH) == 0) {
      constexpr int RPP = THREADS / CH;
      const int r0 = tid / CH, c = tid % CH;
      const u32 dst = dst0 + r0 * ROW_BYTES + swizzle<CH>(r0, c) * 16;
      const __half* p = src + (long long)(n0 + r0) * ss + c * 8;
#pragma unroll
      for (int i = 0; i < BN / RPP; ++i) {
        const bool ok = n0 + r0 + i * RPP < sq.len_k;
        rf::cp_async_16(dst + i * RPP * ROW_BYTES, ok ? p : src, ok);
        p += RPP * ss;
      }
    } else {  // D = 96: RPP = 10 rows per pass (8 threads idle); the swizzle varies with the row
      constexpr int RPP = THREADS / CH;
      const int r0 = tid / CH, c = tid % CH;
      const __half* p = src + (long long)(n0 + r0) * ss + c * 8;
#pragma unroll
      for (int i = 0; i < (BN + RPP - 1) / RPP; ++i) {
        const int r = r0 + i * RPP;
        if (r0 < RPP && r < BN) {
          const bool ok = n0 + r < sq.len_k;
          rf::cp_async_16(dst0 + r * ROW_BYTES + swizzle<CH>(r, c) * 16, ok ? p : src, ok);
        }
        p += RPP * ss;
      }
    }
  };
  // Commit groups, in order: Q, K0, V0, then per tile t: K(t+1), V(t+1) (empty groups past the last tile,
  // so "wait_group 2" always means: everything but the two newest groups has landed).
  if (n_tiles > 0) load_tile(k_smem, kb, k_ss, 0);
  rf::cp_async_commit();
  if (n_tiles > 0) load_tile(v_smem, vb, v_ss, 0);
  rf::cp_async_commit();

  const int warp = tid / 32, lane = tid % 32;
  const int g = lane >> 2, tq = lane & 3;
  const int wrow = warp * kV4WarpRows;  // the warp's first row in the tile

  // The lane's four rows: m16 tile mi, half h -> tile row wrow + 16 mi + g + 8 h, query row / pack
  // (>= len_q past the sequence: never stored). The query index is recomputed where needed (edge tiles,
  // epilogue) rather than held in 4 registers across the main loop.
  const int lane_row = m0 + wrow + g;
  const float* mrow[MT][2];
#pragma unroll
  for (int mi = 0; mi < MT; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = lane_row + 16 * mi + 8 * h;
      mrow[mi][h] = nullptr;
      if (MASK && row < rows) {
        const int qh = hy * pack + row % pack;
        mrow[mi][h] = mask + b * m_sb + qh * m_sh + (long long)(row / pack) * m_sq;
      }
    }
  }

  // ldmatrix.x4 lane addresses. Each lane reads row r, logical chunk 2ks + x of a tile (x in {0, 1}); its
  // physical chunk is (2ks + x) ^ f(r) = 2ks ^ (x ^ f(r)) (2ks has bit 0 clear, f(r) < 8), i.e. byte offset
  // (32 ks) ^ lane16 in the row with lane16 = 16 * swizzle(r, x). The rows a lane visits differ by multiples
  // of 8 (16 mi, 16 np, 16 kk), which leave f unchanged, so lane16 is fixed per lane and operand. With
  // rows of 128 / 256 bytes (D = 64, 128) the row offset has no bits below ROW_BYTES, so the whole
  // offset is (row offset | lane16) ^ 32 ks: one LOP3 per k-step, and the 16-row steps are immediates.
  // (Keeping an address register per (k-step, operand) instead costs ~40 registers at D = 128 and spills.)
  auto frag = [](u32 row_off, u32 lane16, int ks) -> u32 {
    if constexpr ((CH & (CH - 1)) == 0) {
      return (row_off | lane16) ^ (32u * ks);
    } else {
      return row_off + (lane16 ^ (32u * ks));
    }
  };
  // Q (A operand): lanes 0-7 rows 0-7 / chunk 2ks, 8-15 rows 8-15 / 2ks, 16-23 rows 0-7 / 2ks+1,
  // 24-31 rows 8-15 / 2ks+1  ->  a0 (g, k 2t), a1 (g+8, 2t), a2 (g, 2t+8), a3 (g+8, 2t+8); m16 tile mi is
  // 16 rows further.
  const int q_r = wrow + (lane & 7) + 8 * ((lane >> 3) & 1);
  const u32 q_row = Q_OFF + q_r * ROW_BYTES, q_l16 = swizzle<CH>(q_r, lane >> 4) * 16;
  // K (B operand of S, as v2): lanes 0-7 keys 0-7 / chunk 2ks, 8-15 keys 0-7 / 2ks+1, 16-23 keys 8-15 / 2ks,
  // 24-31 keys 8-15 / 2ks+1  ->  b0, b1 of n8 tile 2np, then of 2np+1 (keys 16np + ...).
  const int k_r = (lane & 7) + 8 * (lane >> 4);
  const u32 k_row = K_OFF + k_r * ROW_BYTES, k_l16 = swizzle<CH>(k_r, (lane >> 3) & 1) * 16;
  // V (B operand of P V, .trans, as v2): lanes 0-7 keys 0-7 / chunk 2dp, 8-15 keys 8-15 / 2dp, 16-23 keys
  // 0-7 / 2dp+1, 24-31 keys 8-15 / 2dp+1  ->  b0, b1 of d-tile 2dp, then of 2dp+1 (keys 16kk + ...).
  const int v_r = (lane & 7) + 8 * ((lane >> 3) & 1);
  const u32 v_row = V_OFF + v_r * ROW_BYTES, v_l16 = swizzle<CH>(v_r, lane >> 4) * 16;
  u32 qf[QREG ? MT : 1][QREG ? KT : 1][4];
  if constexpr (QREG) {
    rf::cp_async_wait<2>();  // Q landed (K0, V0 may be in flight)
    __syncthreads();
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
      for (int ks = 0; ks < KT; ++ks)
        rf::ldmatrix_x4(qf[mi][ks], sb + frag(q_row, q_l16, ks) + 16 * mi * ROW_BYTES);
  }

  float o[MT][DT][4];
#pragma unroll
  for (int mi = 0; mi < MT; ++mi)
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) o[mi][dt][0] = o[mi][dt][1] = o[mi][dt][2] = o[mi][dt][3] = 0.f;
  float m_run[MT][2], l_run[MT][2];
#pragma unroll
  for (int mi = 0; mi < MT; ++mi) {
    m_run[mi][0] = m_run[mi][1] = neg_inf();
    l_run[mi][0] = l_run[mi][1] = 0.f;
  }

  const bool raw_ok = !MASK && scale_log2 > 0.f;  // the RAW softmax applies (see below)
  for (int t = 0; t < n_tiles; ++t) {
    // K(t+1) into the buffer K(t-1) used: every warp finished S(t-1) before the V barrier of t-1.
    if (t + 1 < n_tiles) load_tile(k_smem, kb, k_ss, t + 1);
    rf::cp_async_commit();
    rf::cp_async_wait<2>();  // K(t) (and Q) landed; V(t), K(t+1) may be in flight
    __syncthreads();
    const u32 buf = (t & 1) * BN * ROW_BYTES;
    const int n0 = t * BN;
    u32 q_row_t = q_row;
    if constexpr (!QREG) asm volatile("" : "+r"(q_row_t));  // opaque: keeps the per-k-step Q addresses
                                                            // from being hoisted out of the loop

    // ---- S = Q K^T: s[mi][nt] = C fragment of m16 tile mi, keys n0 + 8nt .. +7 ----
    float s[MT][NT][4];
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) s[mi][nt][0] = s[mi][nt][1] = s[mi][nt][2] = s[mi][nt][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < KT; ++ks) {
      u32 qa[MT][4];
#pragma unroll
      for (int mi = 0; mi < MT; ++mi) {
        if constexpr (QREG) {
#pragma unroll
          for (int e = 0; e < 4; ++e) qa[mi][e] = qf[mi][ks][e];
        } else {
          rf::ldmatrix_x4(qa[mi], sb + frag(q_row_t, q_l16, ks) + 16 * mi * ROW_BYTES);
        }
      }
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        u32 kf[4];  // keys 16np .. 16np+15: feeds both m16 tiles
        rf::ldmatrix_x4(kf, sb + frag(k_row + buf, k_l16, ks) + 16 * np * ROW_BYTES);
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) {
          rf::mma_m16n8k16(s[mi][2 * np], qa[mi], kf[0], kf[1]);
          rf::mma_m16n8k16(s[mi][2 * np + 1], qa[mi], kf[2], kf[3]);
        }
      }
    }

    // ---- scale (base 2), mask, online softmax; P as half2 registers ----
    // RAW (no additive mask, scale > 0): the row max is taken over the raw scores and scaled once, and
    // p = 2^(s * scale_log2 - m) is one FFMA + ex2 (the max commutes with a positive scale; hidden keys
    // are -inf either way). Otherwise every score is scaled (and masked) first, as v2.
    const bool edge = t >= mask_from;
    u32 pf[MT][NT][2];  // pf[mi][nt][h] = (row g + 8h of tile mi, keys n0 + 8nt + 2t, +1)
    // (A lambda over a plain bool, called with constants: inlined and folded into two specialised copies.
    // NVRTC refuses generic lambdas in device code, so no `auto` tag parameter.)
    auto softmax = [&](const bool RAW) {
      float m_use[MT][2], alpha[MT][2];
#pragma unroll
      for (int mi = 0; mi < MT; ++mi) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int h = e >> 1, j = n0 + 8 * nt + 2 * tq + (e & 1);
            float x = s[mi][nt][e];
            if (!RAW) {
              x *= scale_log2;
              if (MASK) x = j < sq.len_k ? fmaf(mrow[mi][h] != nullptr ? mrow[mi][h][j] : 0.f, kLog2e, x) : x;
            }
            if (edge && (j >= sq.len_k || (causal && j > (lane_row + 16 * mi + 8 * h) / pack + off)))
              x = neg_inf();
            s[mi][nt][e] = x;
          }
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float mx = neg_inf();
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(s[mi][nt][2 * h], s[mi][nt][2 * h + 1]));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
          if (RAW) mx *= scale_log2;  // -inf stays -inf (scale > 0)
          const float m_new = fmaxf(m_run[mi][h], mx);
          m_use[mi][h] = m_new == neg_inf() ? 0.f : m_new;
          alpha[mi][h] = fast_exp2(m_run[mi][h] - m_use[mi][h]);
          m_run[mi][h] = m_new;
        }
      }
      // O *= alpha. LAZY: skipped when no row of the warp changed its max (alpha == 1 exactly: a no-op),
      // which is most tiles once the running max has settled (4 * DT FMULs per m16 tile saved).
      bool changed = !LAZY;
#pragma unroll
      for (int mi = 0; mi < MT; ++mi) changed |= alpha[mi][0] != 1.f || alpha[mi][1] != 1.f;
      if (!LAZY || __any_sync(0xffffffffu, changed)) {
#pragma unroll
        for (int mi = 0; mi < MT; ++mi)
#pragma unroll
          for (int dt = 0; dt < DT; ++dt) {
            o[mi][dt][0] *= alpha[mi][0];
            o[mi][dt][1] *= alpha[mi][0];
            o[mi][dt][2] *= alpha[mi][1];
            o[mi][dt][3] *= alpha[mi][1];
          }
      }
#pragma unroll
      for (int mi = 0; mi < MT; ++mi) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float sum = 0.f;
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            float p0, p1;
            if (RAW) {
              p0 = fast_exp2(fmaf(s[mi][nt][2 * h], scale_log2, -m_use[mi][h]));
              p1 = fast_exp2(fmaf(s[mi][nt][2 * h + 1], scale_log2, -m_use[mi][h]));
            } else {
              p0 = fast_exp2(s[mi][nt][2 * h] - m_use[mi][h]);
              p1 = fast_exp2(s[mi][nt][2 * h + 1] - m_use[mi][h]);
            }
            sum += p0 + p1;
            pf[mi][nt][h] = rf::pack_half2(p0, p1);
          }
          l_run[mi][h] = l_run[mi][h] * alpha[mi][h] + sum;
        }
      }
    };
    if (raw_ok) {  // never with MASK (raw_ok is false there)
      softmax(true);
    } else {
      softmax(false);
    }
    // V(t+1) into the buffer V(t-1) used: every warp finished P V(t-1) before the K barrier of t.
    if (t + 1 < n_tiles) load_tile(v_smem, vb, v_ss, t + 1);
    rf::cp_async_commit();
    rf::cp_async_wait<2>();  // V(t) landed; K(t+1), V(t+1) may be in flight
    __syncthreads();

    // ---- O += P V: each V fragment (ldmatrix.x4.trans, as v2) feeds both m16 tiles ----
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        u32 vf[4];
        rf::ldmatrix_x4_trans(vf, sb + frag(v_row + buf, v_l16, dp) + 16 * kk * ROW_BYTES);
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) {
          const u32 pa[4] = {pf[mi][2 * kk][0], pf[mi][2 * kk][1], pf[mi][2 * kk + 1][0],
                             pf[mi][2 * kk + 1][1]};
          rf::mma_m16n8k16(o[mi][2 * dp], pa, vf[0], vf[1]);
          rf::mma_m16n8k16(o[mi][2 * dp + 1], pa, vf[2], vf[3]);
        }
      }
    }
  }
  rf::cp_async_wait<0>();  // no copy in flight at exit (with no key tile, Q's copies were never waited for)

  // ---- epilogue: 1/l, store rows that exist ----
#pragma unroll
  for (int mi = 0; mi < MT; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float l = l_run[mi][h];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const int row = m0 + wrow + 16 * mi + g + 8 * h;
      if (row >= rows) continue;
      const int qh = hy * pack + row % pack;
      const long long tok = sq.q_start + row / pack;
      const float inv = l > 0.f ? __frcp_rn(l) : 0.f;
      __half* orow = out + b * o_sb + tok * o_ss + qh * o_sh + 2 * tq;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt)
        *reinterpret_cast<__half2*>(orow + 8 * dt) =
            __floats2half2_rn(o[mi][dt][2 * h] * inv, o[mi][dt][2 * h + 1] * inv);
      if (lse != nullptr && tq == 0)
        lse[b * lse_sb + tok * lse_ss + qh * lse_sh] = l > 0.f ? (m_run[mi][h] + log2f(l)) * kLn2 : neg_inf();
    }
  }
}
