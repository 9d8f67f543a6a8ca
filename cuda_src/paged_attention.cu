// paged_attention.cu: decode attention over a paged KV cache (flash-decoding), family "paged_attention".
//
// Memory layout (strides in elements; the last dim is always contiguous):
//   q             [num_seqs, q_len, q_heads, head_dim]          strides q_ss, q_st, q_sh
//   k/v cache     [num_blocks, block_size, kv_heads, head_dim]  strides k_sb, k_st, k_sh (v_* alike)
//                 token-major blocks: token p of sequence s lives in block block_tables[s][p / block_size]
//                 at offset p % block_size (block_size a power of two, passed as log2_block)
//   block_tables  int32 [num_seqs, table_stride]; context_lens int32 [num_seqs] (tokens already cached,
//                 including the q_len new ones)
//   out           C-contiguous [num_seqs, q_len, q_heads, head_dim]
//   part_out      float32 [num_seqs, q_len, q_heads, num_splits, head_dim]   (split-KV only)
//   part_lse      float32 [num_seqs, q_len, q_heads, num_splits]: base-2 log-sum-exp of the split's scaled
//                 scores (-inf for a split that sees no key)
//
// Maths: query token t of sequence s sits at position ctx - q_len + t and sees cache positions 0..that
// position (causal among the new tokens; nothing when ctx - q_len + t < 0). With x_j = scale * log2(e) *
// q . k_j the kernels keep an online (max m, sum l) in fp32 and out = sum_j 2^(x_j - m) v_j / l; a row
// that sees no key gives 0 (lse -inf). Split-KV: split i of a sequence covers positions
// [i * split_tokens, (i + 1) * split_tokens); the combine kernel merges the splits with
// out = sum_i 2^(lse_i - L) out_i / sum_i 2^(lse_i - L), L = max_i lse_i.
//
// GQA: q head h reads kv head h / group (group = q_heads / kv_heads). One CTA per (sequence, kv head, row
// chunk, split) handles rows g = chunk * ROWS + r of the group, row g being query token g / group of q head
// kv_head * group + g % group, so every K/V element is read once per CTA for all the group's query rows.
// Tokens past the split's end (or the context) are never read: their shared-memory rows are zero-filled
// and their scores are -inf, so garbage (even NaN) past context_len in the last block has no effect.
//
// Versions
//   paged_attention_v1<T, HD, ROWS, TK>  SIMT, float and __half. HD: head_dim bucket (>= head_dim,
//       multiple of 8 elements; chunks past head_dim are zero); ROWS: query rows per CTA (1..32); TK: tokens
//       per tile (8 KB of K per tile). 128 threads. Per tile: K and V of TK tokens read with 16-byte loads
//       (all issued before any is stored) into padded shared rows (16 bytes of padding: 8 consecutive rows
//       hit distinct bank groups); scores thread-per-(row, key) against fp32 q rows in shared memory; the
//       online softmax warp-per-row; P V thread-per-(row, 4 dims) with the accumulators in registers.
//   paged_attention_v2<T, HD, STAGES>  tensor cores, __half only, HD in {64, 96, 128} (head_dim <= HD,
//       multiple of 8). 16 query rows (padded) per CTA; 4 warps each own 16 of the 64 tokens of a tile.
//       Tiles of K and V stream through a STAGES-deep cp.async pipeline into padded shared rows (ldmatrix
//       conflict-free). Per warp and tile: S = Q K^T with mma.sync m16n8k16 (Q fragments kept in registers,
//       K fragments by ldmatrix), online softmax on the accumulator fragments (quad shuffles), P re-packed
//       to fp16 as the A operand of P V (V fragments by ldmatrix.trans), O in fp32 registers. At the end the
//       4 warps' (m, l, O) merge through shared memory. Why tensor cores: with GQA 8:1 a SIMT kernel spends
//       16 FMAs (8 rows x (QK + PV)) per K/V element loaded and becomes compute-bound near the bandwidth
//       target; the mma does the whole 16-row tile at once.
//   paged_attention_v3<T, HD, STAGES>  tensor cores like v2 (same fragments, same numerics), but each of the
//       4 warps streams its own tiles of 16 tokens (tiles w, w + 4, w + 8, ... of the CTA's range) through
//       its own STAGES-deep cp.async pipeline in its own shared buffers: cp.async.wait_group + __syncwarp,
//       no CTA barrier until one merge of the warps' (m, l, O) at the end. Each iteration refills the stage
//       freed by the previous tile before waiting, so all STAGES tiles of a warp are in flight while it
//       waits. A tile needs two block ids (tokens 0-7 and 8-15; block_size >= 8), the same in every lane,
//       loaded one iteration ahead: no cp.async address waits on a global load of its own iteration. 1-D
//       grid: x = (seq * kv_heads + kv head) * row chunks + chunk (a sequence's kv heads are neighbours, so
//       they read the same cache blocks at about the same time), y = split. STAGES 3 keeps Q fragments
//       in registers (2 CTAs per SM at HD 128: shared memory decides); STAGES 2 re-reads them from shared
//       memory at each k-step so that its launch bound of 3 CTAs per SM (168 registers) holds without
//       spills. Either way 24 tiles of 8 KB per SM can be in flight at HD 128. Why: v2 measured 80% of
//       DRAM bandwidth on the H100 with a CTA barrier per 64-token tile and each tile's cp.async
//       addresses waiting on that tile's block-table loads.
//   paged_attention_v4<T, HD, STAGES>  v3's tiles, warps and math (same fragments, numerics, grid, splits),
//       but the K/V rows reach shared memory by sm_90 TMA bulk copies (cp.async.bulk ... mbarrier::
//       complete_tx::bytes), not per-thread 16-byte cp.async: per warp tile, lane l issues ONE bulk copy of a
//       head_dim x 2-byte row (K row l for l < 16, V row l - 16) after an mbarrier.arrive.expect_tx of
//       those bytes on the stage's "full" mbarrier (32 arrivals per phase); the warp waits with
//       mbarrier.try_wait.parity (tile n: stage n % STAGES, parity (n / STAGES) & 1). The warp refills the
//       stage of tile n - 1 after the __syncwarp that ends its reads (the warp is its own "empty" barrier).
//       Rows past the range are clamped copies of the tile's last valid row (finite data, masked scores),
//       so every phase expects the same 32 x head_dim x 2 bytes and no uninitialised shared memory is read;
//       bucket columns past head_dim are zero-filled once. Rows keep v3's 16-byte padded pitch (1-D bulk
//       copies cannot swizzle; the pitch keeps ldmatrix conflict-free). Why: v3 measured 2690 GB/s vs
//       cuDNN's 2980 on the H100 with 8-12 warps per SM; the hypothesis is the per-thread cp.async path (16
//       LSU copies per lane per tile); a bulk copy is one instruction per lane per tile. sm_90+ only: the body
//       is compiled out below sm_90 (it traps; the launcher refuses version 4 there). STAGES per head dim
//       bucket is the launcher's table; the launch bound asks for as many CTAs per SM (<= 3) as the H100's
//       shared memory holds.
//   paged_attention_combine<T>          one CTA per (seq, token, q head) row: merges the splits' partials.
//   paged_attention_check_tables<THREADS>  debug: first (seq, table slot) whose block id is out of range or
//                                       owned by another sequence, or whose context_len is out of range.
// Kernel arguments (v1 to v4 share them):
//   (q, k_cache, v_cache, block_tables, context_lens, out, part_out, part_lse,
//    q_len, q_heads, kv_heads, head_dim, log2_block, table_stride, split_tokens, num_splits,
//    q_ss, q_st, q_sh, k_sb, k_st, k_sh, v_sb, v_st, v_sh, scale_log2)
// part_out == nullptr: one split, out written directly. Grid (v1, v2): x = sequence, y = kv head * row
// chunks + chunk, z = split; v3, v4: see above. Split ranges are multiples of 64 positions for v2 to v4.
// Dynamic shared memory (checked by the kernel against %dynamic_smem_size):
//   v1  2 * TK * (HD + VW) * sizeof(T) + 4 * (ROWS * HD + ROWS * (TK + 1) + 4 * ROWS)   (<= 51 KB)
//   v2  2 * (STAGES * 2 * 64 * (HD + 8) + 16 * (HD + 8)) + 640   (HD 128: 109,440 bytes, 2 CTAs per SM)
//   v3  2 * (4 * STAGES * 2 * 16 * (HD + 8) + 16 * (HD + 8)) + 640   (HD 128: 109,440 bytes with
//       STAGES 3, as v2; 74,624 with STAGES 2, 3 CTAs per SM)
//   v4  v3's bytes + 4 * STAGES * 8 (mbarriers): launcher defaults HD 64 / 4 stages 76,800 (3 CTAs per SM),
//       HD 96 / 4 stages 110,592 (2), HD 128 / 2 stages 74,688 (3); also HD 128 / 3 stages 109,536 (2),
//       HD 128 / 6 stages 214,080 (1)
// Registers (nvcc 13.0, sm_90, no spills on sm_80 / sm_90): v1 68-200, v2 113 / 145 / 222 (HD 64 / 96 /
// 128; the launch bound keeps 2 CTAs per SM), v3 116 / 154 / 204 (STAGES 3) and 105 / 143 / 168 (STAGES 2,
// launch bound 3 CTAs per SM), v4 112-113 / 139 / 160-164 (HD 64 / 96 / 128;
// 160 with 2 stages under the 3-CTA launch bound), combine 31, check 16.
#include "common.cuh"

namespace rf_paged {

constexpr int kThreads = 128;  // every attention kernel of the family: 4 warps
constexpr int kWarps = kThreads / rf::kWarp;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// Fails loudly when the launcher gave less dynamic shared memory than the kernel lays out.
__device__ __forceinline__ void check_smem(unsigned needed) {
  unsigned have;
  asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(have));
  if (have < needed) __trap();
}

// Where one CTA works: sequence, kv head, row chunk, split; its token range [start, end).
struct Work {
  int seq, kvh, chunk, split, group, rows_total, ctx, start, end;
};

__device__ __forceinline__ Work work_of(int q_len, int q_heads, int kv_heads, int rows_per_cta,
                                        const int* context_lens, int split_tokens) {
  Work w;
  w.seq = blockIdx.x;
  w.group = q_heads / kv_heads;
  w.rows_total = w.group * q_len;
  const int chunks = rf::ceil_div(w.rows_total, rows_per_cta);
  w.kvh = blockIdx.y / chunks;
  w.chunk = blockIdx.y % chunks;
  w.split = blockIdx.z;
  w.ctx = context_lens[w.seq];
  w.start = w.split * split_tokens;
  w.end = min(w.ctx, w.start + split_tokens);
  return w;
}

// Last cache position row g of the CTA may see (positions below `start` belong to other splits), or -1.
__device__ __forceinline__ int row_limit(const Work& w, int g, int q_len) {
  if (g >= w.rows_total) return -1;
  const int t = g / w.group;
  return min(w.end - 1, w.ctx - q_len + t);
}

// Offset of (row g)'s output: into out [seq, t, h, :] or part_out [seq, t, h, split, :].
__device__ __forceinline__ long long out_row(const Work& w, int g, int q_len, int q_heads, int num_splits) {
  const int t = g / w.group, h = w.kvh * w.group + g % w.group;
  return ((static_cast<long long>(w.seq) * q_len + t) * q_heads + h) * num_splits + w.split;
}

}  // namespace rf_paged

#define RF_PAGED_ARGS                                                                                     \
  const T *__restrict__ q, const T *__restrict__ k_cache, const T *__restrict__ v_cache,                 \
      const int *__restrict__ block_tables, const int *__restrict__ context_lens, T *__restrict__ out,   \
      float *__restrict__ part_out, float *__restrict__ part_lse, int q_len, int q_heads, int kv_heads,  \
      int head_dim, int log2_block, int table_stride, int split_tokens, int num_splits, long long q_ss,  \
      long long q_st, long long q_sh, long long k_sb, long long k_st, long long k_sh, long long v_sb,    \
      long long v_st, long long v_sh, float scale_log2

// ---- v1: SIMT ---------------------------------------------------------------------------------------------

// The launch bound's 1-block minimum lets ptxas use the 68-200 registers v1 needs: without it, ptxas
// caps some instantiations at 64-80 and spills (seen with nvcc 13.0, sm_90).
template <typename T, int HD, int ROWS, int TK>
__global__ void __launch_bounds__(rf_paged::kThreads, 1) paged_attention_v1(RF_PAGED_ARGS) {
  rf::pdl_launch_dependents();
  rf::pdl_wait();  // launched with pdl=True in decode steps (common.cuh)
  using namespace rf_paged;
  constexpr int VW = 16 / sizeof(T);  // elements per 16-byte vector
  constexpr int CH = HD / VW;         // vectors per (padded) head row
  constexpr int KS = HD + VW;         // shared row stride in elements: one vector of padding
  constexpr int PS = TK + 1;          // score row stride
  constexpr int LOADS = rf::ceil_div(TK * CH, kThreads);  // vectors of K (and of V) per thread per tile
  constexpr int D4 = HD / 4;                              // (row, 4 dims) accumulator groups per row
  constexpr int PAIRS = rf::ceil_div(ROWS * D4, kThreads);
  constexpr int ROWS_PER_WARP = rf::ceil_div(ROWS, kWarps);
  constexpr int TKW = rf::ceil_div(TK, rf::kWarp);  // scores per lane per row in the softmax step
  static_assert(HD % 8 == 0 && HD <= 256, "HD: a multiple of 8 up to 256");
  static_assert(TK % 8 == 0, "TK: a multiple of 8");
  constexpr unsigned kSmem =
      2u * TK * KS * sizeof(T) + (ROWS * HD + ROWS * PS + 3 * ROWS) * sizeof(float) + ROWS * sizeof(int);

  extern __shared__ __align__(16) unsigned char smem[];
  T* k_s = reinterpret_cast<T*>(smem);              // [TK][KS]
  T* v_s = k_s + TK * KS;                           // [TK][KS]
  float* q_s = reinterpret_cast<float*>(v_s + TK * KS);  // [ROWS][HD], scaled by scale * log2(e)
  float* p_s = q_s + ROWS * HD;                     // [ROWS][PS] scores, then probabilities
  float* alpha_s = p_s + ROWS * PS;                 // [ROWS] rescale factor of the current tile
  float* m_s = alpha_s + ROWS;                      // [ROWS] final max
  float* l_s = m_s + ROWS;                          // [ROWS] final sum
  int* lim_s = reinterpret_cast<int*>(l_s + ROWS);  // [ROWS] last visible position

  const int tid = threadIdx.x, warp = tid / rf::kWarp, lane = tid % rf::kWarp;
  if (tid == 0) check_smem(kSmem);
  const Work w = work_of(q_len, q_heads, kv_heads, ROWS, context_lens, split_tokens);

  for (int i = tid; i < ROWS * HD; i += kThreads) {
    const int r = i / HD, d = i % HD, g = w.chunk * ROWS + r;
    float v = 0.f;
    if (g < w.rows_total && d < head_dim) {
      const int t = g / w.group, h = w.kvh * w.group + g % w.group;
      v = rf::to_acc(q[w.seq * q_ss + t * q_st + h * q_sh + d]) * scale_log2;
    }
    q_s[i] = v;
  }
  for (int r = tid; r < ROWS; r += kThreads) lim_s[r] = row_limit(w, w.chunk * ROWS + r, q_len);

  float m[ROWS_PER_WARP], l[ROWS_PER_WARP];  // softmax state of rows warp + kWarps * i (same in every lane)
#pragma unroll
  for (int i = 0; i < ROWS_PER_WARP; ++i) m[i] = neg_inf(), l[i] = 0.f;
  float acc[PAIRS][4];  // O[r][4 * d4 .. 4 * d4 + 3] for pair = tid + kThreads * i, r = pair / D4
#pragma unroll
  for (int i = 0; i < PAIRS; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[i][e] = 0.f;

  const T* k_head = k_cache + w.kvh * k_sh;
  const T* v_head = v_cache + w.kvh * v_sh;
  const int* table = block_tables + static_cast<long long>(w.seq) * table_stride;
  const int block_mask = (1 << log2_block) - 1;

  for (int t0 = w.start; t0 < w.end; t0 += TK) {
    __syncthreads();  // the previous tile's K, V and scores are consumed (and q_s, lim_s written)
    // Issue every load of the tile, then store: LOADS x 2 independent 16-byte loads in flight per thread.
    uint4 kr[LOADS], vr[LOADS];  // raw 16-byte vectors
#pragma unroll
    for (int i = 0; i < LOADS; ++i) {
      const int idx = tid + i * kThreads, j = idx / CH, c = idx % CH, pos = t0 + j;
      kr[i] = vr[i] = make_uint4(0u, 0u, 0u, 0u);
      if (idx < TK * CH && pos < w.end && c * VW < head_dim) {
        const long long blk = table[pos >> log2_block];
        const int off = pos & block_mask;
        kr[i] = *reinterpret_cast<const uint4*>(k_head + blk * k_sb + off * k_st + c * VW);
        vr[i] = *reinterpret_cast<const uint4*>(v_head + blk * v_sb + off * v_st + c * VW);
      }
    }
#pragma unroll
    for (int i = 0; i < LOADS; ++i) {
      const int idx = tid + i * kThreads, j = idx / CH, c = idx % CH;
      if (idx < TK * CH) {
        *reinterpret_cast<uint4*>(k_s + j * KS + c * VW) = kr[i];
        *reinterpret_cast<uint4*>(v_s + j * KS + c * VW) = vr[i];
      }
    }
    __syncthreads();

    // Scores x[r][j] = q_s[r] . k[j] (already in log2 units), -inf where row r may not see position t0 + j.
    for (int idx = tid; idx < ROWS * TK; idx += kThreads) {
      const int r = idx / TK, j = idx % TK;
      float s = neg_inf();
      if (t0 + j <= lim_s[r]) {
        s = 0.f;
        const float* qr = q_s + r * HD;
        const T* kj = k_s + j * KS;
#pragma unroll 4
        for (int c = 0; c < CH; ++c) {
          const rf::Vec<T, VW> kv = rf::load_vec<T, VW>(kj + c * VW);
#pragma unroll
          for (int e = 0; e < VW; ++e) s = fmaf(qr[c * VW + e], rf::to_acc(kv.v[e]), s);
        }
      }
      p_s[r * PS + j] = s;
    }
    __syncthreads();

    // Online softmax, a warp per row: m_new = max(m, max_j x_j); p_j = 2^(x_j - m_new); l = l*alpha + sum p.
#pragma unroll
    for (int i = 0; i < ROWS_PER_WARP; ++i) {
      const int r = warp + kWarps * i;
      if (r < ROWS) {
        float x[TKW];
        float tile_max = neg_inf();
#pragma unroll
        for (int k = 0; k < TKW; ++k) {
          const int j = lane + k * rf::kWarp;
          x[k] = j < TK ? p_s[r * PS + j] : neg_inf();
          tile_max = fmaxf(tile_max, x[k]);
        }
        tile_max = rf::warp_reduce(tile_max, rf::Max());
        const float m_new = fmaxf(m[i], tile_max);
        const float base = m_new == neg_inf() ? 0.f : m_new;  // a row that saw nothing yet stays at 0
        const float alpha = exp2f(m[i] - base);
        float sum = 0.f;
#pragma unroll
        for (int k = 0; k < TKW; ++k) {
          const int j = lane + k * rf::kWarp;
          const float p = exp2f(x[k] - base);
          sum += p;
          if (j < TK) p_s[r * PS + j] = p;
        }
        sum = rf::warp_reduce(sum, rf::Sum());
        l[i] = l[i] * alpha + sum;
        m[i] = m_new;
        if (lane == 0) alpha_s[r] = alpha;
      }
    }
    __syncthreads();

    // O[r] = alpha[r] * O[r] + sum_j p[r][j] v[j]; zero-filled V rows past the end have p = 0.
    const int valid = min(TK, w.end - t0);
#pragma unroll
    for (int i = 0; i < PAIRS; ++i) {
      const int pair = tid + i * kThreads;
      if (pair < ROWS * D4) {
        const int r = pair / D4, d = (pair % D4) * 4;
        const float alpha = alpha_s[r];
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][e] *= alpha;
        const float* pr = p_s + r * PS;
        for (int j = 0; j < valid; ++j) {
          const float p = pr[j];
          const rf::Vec<T, 4> vv = *reinterpret_cast<const rf::Vec<T, 4>*>(v_s + j * KS + d);
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[i][e] = fmaf(p, rf::to_acc(vv.v[e]), acc[i][e]);
        }
      }
    }
  }

  // Final (m, l) per row to shared memory (rows of warps that never looped keep -inf / 0).
#pragma unroll
  for (int i = 0; i < ROWS_PER_WARP; ++i) {
    const int r = warp + kWarps * i;
    if (r < ROWS && lane == 0) m_s[r] = m[i], l_s[r] = l[i];
  }
  __syncthreads();

  const bool split = part_out != nullptr;
#pragma unroll
  for (int i = 0; i < PAIRS; ++i) {
    const int pair = tid + i * kThreads;
    if (pair < ROWS * D4) {
      const int r = pair / D4, d = (pair % D4) * 4, g = w.chunk * ROWS + r;
      if (g < w.rows_total && d < head_dim) {
        const float lr = l_s[r];
        const float inv = lr > 0.f ? 1.f / lr : 0.f;
        const long long row = out_row(w, g, q_len, q_heads, split ? num_splits : 1);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (split) {
            part_out[row * head_dim + d + e] = acc[i][e] * inv;
          } else {
            out[row * head_dim + d + e] = rf::from_acc<T>(acc[i][e] * inv);
          }
        }
        if (split && d == 0) part_lse[row] = lr > 0.f ? m_s[r] + log2f(lr) : neg_inf();
      }
    }
  }
}

// ---- v2: tensor cores (mma.sync m16n8k16, fp16 in, fp32 accumulate) ------------------------------------

namespace rf_paged {
constexpr int kMmaRows = 16;  // v2: query rows per CTA (one m16 tile)
constexpr int kTile = 64;     // v2: tokens per pipeline stage; warp w owns tokens 16w .. 16w + 15
}  // namespace rf_paged

template <typename T> struct IsHalf { static constexpr bool value = false; };
template <> struct IsHalf<__half> { static constexpr bool value = true; };

// ---- v2-v4 shared pieces: one warp's tile step and the CTA merge epilogue ---------------------------------
//
// v2, v3 and v4 differ only in how K/V tiles reach shared memory; the math on a tile and the final merge of
// the 4 warps are the same and live here (force-inlined: each kernel compiles as if written out in full).

namespace rf_paged {

// Copies the CTA's R = 16 query rows (rows chunk * R ..., of the (token, q head) rows of kv head w.kvh) into
// q_s [R][HD + 8]; rows past rows_total and head dims past head_dim are zero. Called by the whole CTA; the
// caller's __syncthreads publishes q_s.
template <int HD>
__device__ __forceinline__ void stage_q(__half* q_s, const __half* q, const Work& w, int tid, int head_dim,
                                        long long q_ss, long long q_st, long long q_sh) {
  constexpr int R = kMmaRows;
  constexpr int KS = HD + 8;
  for (int i = tid; i < R * HD; i += kThreads) {
    const int r = i / HD, d = i % HD, g = w.chunk * R + r;
    __half v = __float2half_rn(0.f);
    if (g < w.rows_total && d < head_dim) {
      const int t = g / w.group, h = w.kvh * w.group + g % w.group;
      v = q[w.seq * q_ss + t * q_st + h * q_sh + d];
    }
    q_s[r * KS + d] = v;
  }
}

// One warp's online-softmax step on a 16-token tile: S = Q K^T, mask, running (m, l) update, O += P V.
// ks, vs: the tile's K and V rows in shared memory (row stride HD + 8 halves); kb: the warp's first token
// row in them (v2: 16 warp; v3, v4: 0); t0: the tile's first position (token row kb has position t0 + kb).
// Q is the A operand: qf[KSTEPS][4] in registers, or (Q_SMEM) qf[1][4] re-read from q_frag at every k-step.
// (m, l): running max (quad-uniform, log2 units) and this lane's running column sum of rows gq and gq + 8.
template <int HD, bool Q_SMEM>
__device__ __forceinline__ void tile_step(const __half* ks, const __half* vs, int kb, int t0,
                                          unsigned (&qf)[Q_SMEM ? 1 : HD / 16][4], const __half* q_frag,
                                          int lim_lo, int lim_hi, float scale_log2, int lane, int cq,
                                          float& m_lo, float& m_hi, float& l_lo, float& l_hi,
                                          float (&o)[HD / 8][4]) {
  constexpr int KS = HD + 8;       // shared row stride in halves
  constexpr int KSTEPS = HD / 16;  // k-steps of S = Q K^T
  constexpr int NT = HD / 8;       // n-tiles of O

  // S = Q K^T for the warp's 16 tokens: two n-tiles of 8 tokens. B element (k = head dim, n = token)
  // is K[token][dim], i.e. K rows are B's columns, contiguous in k: plain ldmatrix. Lane l addresses
  // token kb + (l % 8) + 8 * (l / 16), dims 16ks + 8 * ((l / 8) % 2): matrix 0 = tokens 0-7 / dims 0-7
  // -> b0 of n-tile 0, matrix 1 = tokens 0-7 / dims 8-15 -> b1 of n-tile 0, matrices 2, 3 the same
  // for tokens 8-15 (n-tile 1).
  float s[2][4];
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
  {
    const int tok = kb + (lane % 8) + 8 * (lane / 16), col = 8 * ((lane / 8) % 2);
#pragma unroll
    for (int kstep = 0; kstep < KSTEPS; ++kstep) {
      unsigned b[4];
      rf::ldmatrix_x4(b, ks + tok * KS + kstep * 16 + col);
      const int qk = Q_SMEM ? 0 : kstep;
      if constexpr (Q_SMEM) rf::ldmatrix_x4(qf[0], q_frag + kstep * 16);
      rf::mma_m16n8k16(s[0], qf[qk], b[0], b[1]);
      rf::mma_m16n8k16(s[1], qf[qk], b[2], b[3]);
    }
  }

  // s[nt][0], s[nt][1]: row gq, tokens t0 + kb + 8nt + 2cq + {0, 1}; s[nt][2], s[nt][3]: row gq + 8.
  // (v4's clamped rows have pos >= end > lim: masked.)
  float mx_lo = neg_inf(), mx_hi = neg_inf();
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int pos = t0 + kb + 8 * nt + 2 * cq + e;
      s[nt][e] = pos <= lim_lo ? s[nt][e] * scale_log2 : neg_inf();
      s[nt][2 + e] = pos <= lim_hi ? s[nt][2 + e] * scale_log2 : neg_inf();
      mx_lo = fmaxf(mx_lo, s[nt][e]);
      mx_hi = fmaxf(mx_hi, s[nt][2 + e]);
    }
  }
  // A row's 16 values sit in the 4 lanes of a quad (same gq): reduce over lane bits 0 and 1.
#pragma unroll
  for (int off = 1; off <= 2; off <<= 1) {
    mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, off));
    mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, off));
  }
  const float mnew_lo = fmaxf(m_lo, mx_lo), mnew_hi = fmaxf(m_hi, mx_hi);
  const float base_lo = mnew_lo == neg_inf() ? 0.f : mnew_lo;
  const float base_hi = mnew_hi == neg_inf() ? 0.f : mnew_hi;
  const float alpha_lo = exp2f(m_lo - base_lo), alpha_hi = exp2f(m_hi - base_hi);
  m_lo = mnew_lo;
  m_hi = mnew_hi;

  // P = 2^(x - m) rounded to fp16 (the sum l uses the rounded values, so the weights in O and l agree).
  // P as the A operand of P V (16 rows x 16 tokens): a0 = P[gq][2cq..] = s[0][0..1], a1 = P[gq+8][2cq..]
  // = s[0][2..3], a2 = P[gq][8+2cq..] = s[1][0..1], a3 = P[gq+8][8+2cq..] = s[1][2..3].
  unsigned pa[4];
  float sum_lo = 0.f, sum_hi = 0.f;
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
    const __half2 lo = __floats2half2_rn(exp2f(s[nt][0] - base_lo), exp2f(s[nt][1] - base_lo));
    const __half2 hi = __floats2half2_rn(exp2f(s[nt][2] - base_hi), exp2f(s[nt][3] - base_hi));
    const float2 flo = __half22float2(lo), fhi = __half22float2(hi);
    sum_lo += flo.x + flo.y;
    sum_hi += fhi.x + fhi.y;
    pa[2 * nt] = *reinterpret_cast<const unsigned*>(&lo);
    pa[2 * nt + 1] = *reinterpret_cast<const unsigned*>(&hi);
  }
  l_lo = l_lo * alpha_lo + sum_lo;
  l_hi = l_hi * alpha_hi + sum_hi;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    o[nt][0] *= alpha_lo, o[nt][1] *= alpha_lo;
    o[nt][2] *= alpha_hi, o[nt][3] *= alpha_hi;
  }

  // O += P V. B element (k = token, n = head dim) is V[token][dim]: V rows are B's rows, so ldmatrix
  // .trans delivers b0 = (tokens 2cq, 2cq+1; dim gq). Lane l addresses token kb + (l % 8) + 8 * ((l / 8)
  // % 2), dims 16 d2 + 8 * (l / 16): matrix 0 = tokens 0-7 / dims 0-7 -> b0 of n-tile 2 d2, matrix 1 =
  // tokens 8-15 / dims 0-7 -> b1 of n-tile 2 d2, matrices 2, 3 the same for n-tile 2 d2 + 1.
  {
    const int tok = kb + (lane % 8) + 8 * ((lane / 8) % 2), col = 8 * (lane / 16);
#pragma unroll
    for (int d2 = 0; d2 < NT / 2; ++d2) {
      unsigned b[4];
      rf::ldmatrix_x4_trans(b, vs + tok * KS + d2 * 16 + col);
      rf::mma_m16n8k16(o[2 * d2], pa, b[0], b[1]);
      rf::mma_m16n8k16(o[2 * d2 + 1], pa, b[2], b[3]);
    }
  }
}

// Merges the 4 warps' (m, l, O) of the CTA's 16 rows and writes them: to out (fp16, normalised), or, when
// part_out is set, to the split partials (part_out, and part_lse = M + log2 L). Called by the whole CTA after
// its main loop. CP_ASYNC: first drain this thread's cp.async groups (v2, v3; v4 has nothing in flight).
// Shared memory: wm_s, wl_s [kWarps][R], M_s, L_s [R], and o_s [kWarps][R][HD + 4] over the stage buffers
// (the first __syncthreads makes that safe). A warp with no tile has m = -inf, l = 0, O = 0.
template <int HD, bool CP_ASYNC>
__device__ __forceinline__ void merge_warps_and_store(
    float* wm_s, float* wl_s, float* M_s, float* L_s, float* o_s, const Work& w, int tid, int warp, int gq,
    int cq, float m_lo, float m_hi, float l_lo, float l_hi, const float (&o)[HD / 8][4], __half* out,
    float* part_out, float* part_lse, int head_dim, int q_len, int q_heads, int num_splits) {
  constexpr int R = kMmaRows;
  constexpr int NT = HD / 8;  // n-tiles of O
  constexpr int OS = HD + 4;  // float row stride of the merge buffer
  // Sums first over the quad (each lane summed its own columns).
#pragma unroll
  for (int off = 1; off <= 2; off <<= 1) {
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, off);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, off);
  }
  if constexpr (CP_ASYNC) rf::cp_async_wait<0>();
  __syncthreads();  // every warp is done with the stage buffers (no copy in flight): o_s may overwrite them
  if (cq == 0) {
    wm_s[warp * R + gq] = m_lo, wm_s[warp * R + gq + 8] = m_hi;
    wl_s[warp * R + gq] = l_lo, wl_s[warp * R + gq + 8] = l_hi;
  }
  __syncthreads();
  if (tid < R) {
    float mx = neg_inf();
#pragma unroll
    for (int v = 0; v < kWarps; ++v) mx = fmaxf(mx, wm_s[v * R + tid]);
    const float base = mx == neg_inf() ? 0.f : mx;
    float total = 0.f;
#pragma unroll
    for (int v = 0; v < kWarps; ++v) total += wl_s[v * R + tid] * exp2f(wm_s[v * R + tid] - base);
    M_s[tid] = base;
    L_s[tid] = total;
  }
  __syncthreads();
  {
    const float f_lo = exp2f(m_lo - M_s[gq]), f_hi = exp2f(m_hi - M_s[gq + 8]);
    float* ow = o_s + warp * R * OS;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int d = 8 * nt + 2 * cq;
      *reinterpret_cast<float2*>(ow + gq * OS + d) = make_float2(o[nt][0] * f_lo, o[nt][1] * f_lo);
      *reinterpret_cast<float2*>(ow + (gq + 8) * OS + d) = make_float2(o[nt][2] * f_hi, o[nt][3] * f_hi);
    }
  }
  __syncthreads();
  const bool split = part_out != nullptr;
  for (int i = tid; i < R * HD; i += kThreads) {
    const int r = i / HD, d = i % HD, g = w.chunk * R + r;
    if (g >= w.rows_total || d >= head_dim) continue;
    float v = 0.f;
#pragma unroll
    for (int wv = 0; wv < kWarps; ++wv) v += o_s[(wv * R + r) * OS + d];
    const float total = L_s[r];
    v = total > 0.f ? v / total : 0.f;
    const long long row = out_row(w, g, q_len, q_heads, split ? num_splits : 1);
    if (split) {
      part_out[row * head_dim + d] = v;
      if (d == 0) part_lse[row] = total > 0.f ? M_s[r] + log2f(total) : neg_inf();
    } else {
      out[row * head_dim + d] = __float2half_rn(v);
    }
  }
}

}  // namespace rf_paged

// T is always __half; it is a template parameter so that v1 and v2 share one argument list.
template <typename T, int HD, int STAGES>
__global__ void __launch_bounds__(rf_paged::kThreads, 2) paged_attention_v2(RF_PAGED_ARGS) {
  rf::pdl_launch_dependents();
  rf::pdl_wait();  // launched with pdl=True in decode steps (common.cuh)
  static_assert(IsHalf<T>::value, "v2 runs on fp16 tensor cores");
  using namespace rf_paged;
  constexpr int R = kMmaRows, TK = kTile;
  constexpr int CH = HD / 8;     // 16-byte vectors per head row
  constexpr int KS = HD + 8;     // shared row stride in halves (16 bytes of padding)
  constexpr int KSTEPS = HD / 16;  // k-steps of S = Q K^T (16 head dims each)
  constexpr int NT = HD / 8;       // n-tiles of O (8 head dims each)
  constexpr int OS = HD + 4;       // float row stride of the merge buffer
  constexpr int STAGE = 2 * TK * KS;  // halves per stage: K tile then V tile
  constexpr int LOADS = rf::ceil_div(TK * CH, kThreads);
  static_assert(HD % 16 == 0 && HD <= 128, "v2: HD a multiple of 16 up to 128");
  static_assert(TK == kWarps * 16, "v2: each warp owns 16 tokens of a tile");
  static_assert(kWarps * R * OS * 4 <= STAGES * STAGE * 2, "merge buffer must fit the stage buffers");
  constexpr unsigned kSmem = (STAGES * STAGE + R * KS) * 2u + (2 * kWarps * R + 2 * R) * 4u;

  extern __shared__ __align__(16) unsigned char smem[];
  __half* kv_s = reinterpret_cast<__half*>(smem);  // [STAGES][K tile [TK][KS], V tile [TK][KS]]
  __half* q_s = kv_s + STAGES * STAGE;             // [R][KS]
  float* wm_s = reinterpret_cast<float*>(q_s + R * KS);  // [kWarps][R] each warp's final max
  float* wl_s = wm_s + kWarps * R;                      // [kWarps][R] each warp's final sum
  float* M_s = wl_s + kWarps * R;                       // [R] merged max (base)
  float* L_s = M_s + R;                                 // [R] merged sum
  float* o_s = reinterpret_cast<float*>(smem);          // [kWarps][R][OS], after the pipeline drained

  const int tid = threadIdx.x, warp = tid / rf::kWarp, lane = tid % rf::kWarp;
  const int gq = lane / 4, cq = lane % 4;  // fragment row group and column pair (see common.cuh)
  if (tid == 0) check_smem(kSmem);
  const Work w = work_of(q_len, q_heads, kv_heads, R, context_lens, split_tokens);

  const __half* k_head = k_cache + w.kvh * k_sh;
  const __half* v_head = v_cache + w.kvh * v_sh;
  const int* table = block_tables + static_cast<long long>(w.seq) * table_stride;
  const int block_mask = (1 << log2_block) - 1;
  const int n_tiles = w.end > w.start ? rf::ceil_div(w.end - w.start, TK) : 0;

  // Copies tile `tile` (positions start + tile*TK ...) into stage `stage`; rows past the end, and head
  // dims past head_dim, are zero-filled without reading.
  auto load_tile = [&](int tile, int stage) {
    __half* ks = kv_s + stage * STAGE;
    __half* vs = ks + TK * KS;
    const int t0 = w.start + tile * TK;
#pragma unroll
    for (int i = 0; i < LOADS; ++i) {
      const int idx = tid + i * kThreads;
      if (idx < TK * CH) {
        const int j = idx / CH, c = idx % CH, pos = t0 + j;
        const bool ok = pos < w.end && c * 8 < head_dim;
        const __half* ksrc = k_cache;  // any valid address when nothing is read
        const __half* vsrc = v_cache;
        if (ok) {
          const long long blk = table[pos >> log2_block];
          const int off = pos & block_mask;
          ksrc = k_head + blk * k_sb + off * k_st + c * 8;
          vsrc = v_head + blk * v_sb + off * v_st + c * 8;
        }
        rf::cp_async_16(ks + j * KS + c * 8, ksrc, ok);
        rf::cp_async_16(vs + j * KS + c * 8, vsrc, ok);
      }
    }
  };

  // Start the pipeline first (the loads do not depend on q), then stage Q while they fly.
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < n_tiles) load_tile(s, s);
    rf::cp_async_commit();  // always commit: the group count stays uniform for wait_group
  }
  stage_q<HD>(q_s, q, w, tid, head_dim, q_ss, q_st, q_sh);
  __syncthreads();

  // Q as the A operand, kept in registers: k-step ks covers head dims 16ks .. 16ks + 15. ldmatrix x4 lane
  // l addresses row (l % 8) + 8 * ((l / 8) % 2), column 16ks + 8 * (l / 16): matrix 0 = rows 0-7 / cols
  // 0-7 -> a0, matrix 1 = rows 8-15 / cols 0-7 -> a1, matrix 2 = rows 0-7 / cols 8-15 -> a2, matrix 3 =
  // rows 8-15 / cols 8-15 -> a3 (the A layout of common.cuh).
  unsigned qf[KSTEPS][4];
  {
    const int r = (lane % 8) + 8 * ((lane / 8) % 2), col = 8 * (lane / 16);
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) rf::ldmatrix_x4(qf[ks], q_s + r * KS + ks * 16 + col);
  }

  // This lane's accumulator rows are gq and gq + 8 of the tile; their last visible positions:
  const int lim_lo = row_limit(w, w.chunk * R + gq, q_len);
  const int lim_hi = row_limit(w, w.chunk * R + gq + 8, q_len);

  float m_lo = neg_inf(), m_hi = neg_inf();  // running max (quad-uniform), log2 units
  float l_lo = 0.f, l_hi = 0.f;              // running sum of this lane's columns (quad-reduced at the end)
  float o[NT][4];                            // O fragments: n-tile nt = head dims 8nt .. 8nt + 7
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.f;

  const int kb = warp * 16;  // this warp's first token within a tile
  for (int tile = 0; tile < n_tiles; ++tile) {
    rf::cp_async_wait<STAGES - 2>();  // this thread's copies of tile `tile` have landed ...
    __syncthreads();                   // ... and everyone's; everyone is also done with tile - 1's stage
    {
      const int next = tile + STAGES - 1;
      if (next < n_tiles) load_tile(next, next % STAGES);
      rf::cp_async_commit();
    }
    const __half* ks = kv_s + (tile % STAGES) * STAGE;
    const __half* vs = ks + TK * KS;
    const int t0 = w.start + tile * TK;

    tile_step<HD, false>(ks, vs, kb, t0, qf, nullptr, lim_lo, lim_hi, scale_log2, lane, cq, m_lo, m_hi,
                         l_lo, l_hi, o);
  }

  // Merge the 4 warps and write the rows.
  merge_warps_and_store<HD, true>(wm_s, wl_s, M_s, L_s, o_s, w, tid, warp, gq, cq, m_lo, m_hi, l_lo, l_hi, o,
                                  out, part_out, part_lse, head_dim, q_len, q_heads, num_splits);
}

// ---- v3: tensor cores, one cp.async pipeline per warp -----------------------------------------------------

namespace rf_paged {
constexpr int kWarpTile = 16;  // v3: tokens per warp tile (S = two n8 tiles, P V = one k16 step)

// v3's CTA from a 1-D grid: x = (sequence * kv_heads + kv head) * row chunks + chunk, y = split. The CTAs of
// one sequence's kv heads are neighbours in launch order, so they read the same cache blocks at about the
// same time (and the grid has no 65535 limit on sequences or kv heads).
__device__ __forceinline__ Work work_of_v3(int q_len, int q_heads, int kv_heads, int rows_per_cta,
                                           const int* context_lens, int split_tokens) {
  Work w;
  w.group = q_heads / kv_heads;
  w.rows_total = w.group * q_len;
  const int chunks = rf::ceil_div(w.rows_total, rows_per_cta);
  const int per_seq = kv_heads * chunks;
  w.seq = blockIdx.x / per_seq;
  const int rem = blockIdx.x % per_seq;
  w.kvh = rem / chunks;
  w.chunk = rem % chunks;
  w.split = blockIdx.y;
  w.ctx = context_lens[w.seq];
  w.start = w.split * split_tokens;
  w.end = min(w.ctx, w.start + split_tokens);
  return w;
}
}  // namespace rf_paged

// T is always __half (see v2).
template <typename T, int HD, int STAGES>
__global__ void __launch_bounds__(rf_paged::kThreads, STAGES == 2 ? 3 : 2) paged_attention_v3(RF_PAGED_ARGS) {
  rf::pdl_launch_dependents();
  rf::pdl_wait();  // launched with pdl=True in decode steps (common.cuh)
  static_assert(IsHalf<T>::value, "v3 runs on fp16 tensor cores");
  using namespace rf_paged;
  constexpr int R = kMmaRows, TW = kWarpTile;
  constexpr int CH = HD / 8;          // 16-byte vectors per head row
  constexpr int KS = HD + 8;          // shared row stride in halves (16 bytes of padding)
  constexpr int KSTEPS = HD / 16;     // k-steps of S = Q K^T
  constexpr int NT = HD / 8;          // n-tiles of O
  constexpr int OS = HD + 4;          // float row stride of the merge buffer
  constexpr int STAGE = 2 * TW * KS;  // halves per warp stage: K tile then V tile
  constexpr int WARP_BUF = STAGES * STAGE;
  constexpr int LOADS = TW * CH / rf::kWarp;  // 16-byte vectors of K (and of V) per lane per tile
  static_assert(HD % 16 == 0 && HD <= 128, "v3: HD a multiple of 16 up to 128");
  static_assert(TW * CH % rf::kWarp == 0, "v3: a warp tile is a whole number of vectors per lane");
  static_assert(STAGES >= 2, "v3: at least double buffering");
  static_assert(TW == 16 && LOADS % 2 == 0, "v3: half of a lane's copies per 8-token block half");
  static_assert(kWarps * R * OS * 4 <= kWarps * WARP_BUF * 2, "merge buffer must fit the stage buffers");
  constexpr unsigned kSmem = (kWarps * WARP_BUF + R * KS) * 2u + (2 * kWarps * R + 2 * R) * 4u;

  extern __shared__ __align__(16) unsigned char smem[];
  __half* kv_s = reinterpret_cast<__half*>(smem);  // [kWarps][STAGES][K tile [TW][KS], V tile [TW][KS]]
  __half* q_s = kv_s + kWarps * WARP_BUF;          // [R][KS]
  float* wm_s = reinterpret_cast<float*>(q_s + R * KS);  // [kWarps][R] each warp's final max
  float* wl_s = wm_s + kWarps * R;                      // [kWarps][R] each warp's final sum
  float* M_s = wl_s + kWarps * R;                       // [R] merged max (base)
  float* L_s = M_s + R;                                 // [R] merged sum
  float* o_s = reinterpret_cast<float*>(smem);          // [kWarps][R][OS], after every pipeline drained

  const int tid = threadIdx.x, warp = tid / rf::kWarp, lane = tid % rf::kWarp;
  const int gq = lane / 4, cq = lane % 4;
  if (tid == 0) check_smem(kSmem);
  const Work w = work_of_v3(q_len, q_heads, kv_heads, R, context_lens, split_tokens);

  const __half* k_head = k_cache + w.kvh * k_sh;
  const __half* v_head = v_cache + w.kvh * v_sh;
  const int* table = block_tables + static_cast<long long>(w.seq) * table_stride;
  const int block_mask = (1 << log2_block) - 1;
  // The CTA's range is cut into tiles of TW positions; warp w takes tiles w, w + kWarps, w + 2 kWarps, ...
  // (its n-th tile starts at start + (w + n kWarps) TW), each through its own STAGES-deep pipeline in its
  // own shared buffers: no CTA barrier until the final merge.
  const int cta_tiles = w.end > w.start ? rf::ceil_div(w.end - w.start, TW) : 0;
  const int n_tiles = cta_tiles > warp ? rf::ceil_div(cta_tiles - warp, kWarps) : 0;
  __half* warp_s = kv_s + warp * WARP_BUF;
  auto tile_start = [&](int n) { return w.start + (warp + n * kWarps) * TW; };

  // A tile's first position t0 is a multiple of TW = 16 (the split length is a multiple of 64) and a block
  // holds >= 8 tokens, so tokens 0-7 of a tile lie in one block and tokens 8-15 in one block (the same one
  // when block_size >= 16): a tile needs two block ids, the same in every lane. They are loaded one
  // pipeline iteration before the copies that use them, so no cp.async address waits on a global load of
  // its own iteration. 0 where nothing is read.
  struct Ids {
    int a, b;  // block of tokens 0-7, block of tokens 8-15
  };
  auto block_ids = [&](int n) {
    Ids r{0, 0};
    if (n < n_tiles) {
      const int t0 = tile_start(n);  // < end
      r.a = __ldg(table + (t0 >> log2_block));
      if (t0 + 8 < w.end) r.b = log2_block >= 4 ? r.a : __ldg(table + ((t0 + 8) >> log2_block));
    }
    return r;
  };

  // Copies this warp's tile n into `stage`. Lane l copies vectors idx = l + 32 i: token j = idx / CH,
  // 16-byte chunk c = idx % CH; i < LOADS / 2 covers exactly tokens 0-7 (idx < 8 CH), the rest tokens 8-15,
  // so each copy's block base is known at compile time. Within a block, token offsets fit 32 bits (the
  // launcher keeps k_st, v_st < 2^27). Tokens past the end, and head dims past head_dim, are zero-filled
  // without reading. Called by the whole warp.
  const int k_st32 = static_cast<int>(k_st), v_st32 = static_cast<int>(v_st);
  auto load_tile = [&](int n, Ids id, int stage) {
    __half* ks = warp_s + stage * STAGE;
    __half* vs = ks + TW * KS;
    const int t0 = tile_start(n);
    const int valid = w.end - t0;  // tokens of the tile inside the range (>= 1)
    const int off_a = t0 & block_mask, off_b = (t0 + 8) & block_mask;
    const __half* ka = k_head + id.a * k_sb + off_a * k_st;
    const __half* kb = k_head + id.b * k_sb + off_b * k_st;
    const __half* va = v_head + id.a * v_sb + off_a * v_st;
    const __half* vb = v_head + id.b * v_sb + off_b * v_st;
#pragma unroll
    for (int i = 0; i < LOADS; ++i) {
      const int idx = lane + i * rf::kWarp, j = idx / CH, c = idx % CH;
      const bool ok = j < valid && c * 8 < head_dim;
      const int jj = j & 7;
      const __half* ksrc = (i < LOADS / 2 ? ka : kb) + (jj * k_st32 + c * 8);
      const __half* vsrc = (i < LOADS / 2 ? va : vb) + (jj * v_st32 + c * 8);
      rf::cp_async_16(ks + j * KS + c * 8, ok ? ksrc : k_cache, ok);  // any valid address when !ok
      rf::cp_async_16(vs + j * KS + c * 8, ok ? vsrc : v_cache, ok);
    }
  };

  // Pipeline prologue first (it does not depend on q): every id it needs in one batch of independent loads.
  Ids ids[STAGES];
#pragma unroll
  for (int s = 0; s < STAGES; ++s) ids[s] = block_ids(s);
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < n_tiles) load_tile(s, ids[s], s);
    rf::cp_async_commit();  // always commit: the group count stays uniform for wait_group
  }
  Ids next_id = ids[STAGES - 1];  // at the top of iteration n: the ids of tile n + STAGES - 1

  stage_q<HD>(q_s, q, w, tid, head_dim, q_ss, q_st, q_sh);
  __syncthreads();  // the only CTA barrier before the merge

  // Q as the A operand (ldmatrix addressing as in v2): kept in registers, or, in the 3-CTAs-per-SM variant
  // (STAGES == 2, launch bound 3 CTAs: 168 registers), re-read from q_s at every k-step (32 registers less;
  // shared-memory bandwidth is idle here).
  constexpr bool kQFromSmem = STAGES == 2;
  const __half* q_frag = q_s + ((lane % 8) + 8 * ((lane / 8) % 2)) * KS + 8 * (lane / 16);
  unsigned qf[kQFromSmem ? 1 : KSTEPS][4];
  if constexpr (!kQFromSmem) {
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) rf::ldmatrix_x4(qf[ks], q_frag + ks * 16);
  }
  const int lim_lo = row_limit(w, w.chunk * R + gq, q_len);
  const int lim_hi = row_limit(w, w.chunk * R + gq + 8, q_len);

  float m_lo = neg_inf(), m_hi = neg_inf();  // running max (quad-uniform), log2 units
  float l_lo = 0.f, l_hi = 0.f;              // running sum of this lane's columns
  float o[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.f;

  // Iteration n: refill the stage tile n - 1 used with tile n + STAGES - 1 FIRST, then wait for tile n, so
  // that all STAGES tiles are in flight while the warp waits (not STAGES - 1).
  int stage = 0;  // n % STAGES
  for (int n = 0; n < n_tiles; ++n) {
    __syncwarp();  // every lane is done reading tile n - 1's stage (last iteration's ldmatrix)
    {
      const int nxt = n + STAGES - 1;
      const int nxt_stage = stage == 0 ? STAGES - 1 : stage - 1;  // (n - 1) % STAGES
      if (nxt < n_tiles) load_tile(nxt, next_id, nxt_stage);
      rf::cp_async_commit();
      next_id = block_ids(nxt + 1);  // used next iteration: its latency hides behind this tile's math
    }
    rf::cp_async_wait<STAGES - 1>();  // this lane's copies of tile n have landed (n + 1 .. may fly) ...
    __syncwarp();                      // ... and the whole warp's
    const __half* ks = warp_s + stage * STAGE;
    const __half* vs = ks + TW * KS;
    const int t0 = tile_start(n);
    if (++stage == STAGES) stage = 0;

    // S = Q K^T, online softmax, O += P V for the tile's 16 tokens (kb = 0).
    tile_step<HD, kQFromSmem>(ks, vs, 0, t0, qf, q_frag, lim_lo, lim_hi, scale_log2, lane, cq, m_lo, m_hi,
                              l_lo, l_hi, o);
  }

  // Merge the 4 warps' (m, l, O) once, as in v2 (a warp with no tile has m = -inf, l = 0, O = 0).
  merge_warps_and_store<HD, true>(wm_s, wl_s, M_s, L_s, o_s, w, tid, warp, gq, cq, m_lo, m_hi, l_lo, l_hi, o,
                                  out, part_out, part_lse, head_dim, q_len, q_heads, num_splits);
}

// ---- v4: tensor cores, per-warp pipelines fed by TMA bulk copies (sm_90+) -------------------------------

namespace rf_paged {
// sm_90 bulk-copy and mbarrier wrappers (PTX ISA: cp.async.bulk, mbarrier). Addresses are 32-bit shared
// addresses; a non-cluster launch is a cluster of one CTA, so the CTA's own shared::cta address is a valid
// shared::cluster address for the bulk copy's destination.
__device__ __forceinline__ void mbar_init(unsigned bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Makes the barrier initialisations visible to the async proxy (the bulk copies' complete_tx).
__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// Orders this thread's earlier generic-proxy shared-memory writes before later async-proxy accesses.
__device__ __forceinline__ void fence_proxy_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// One arrival on the current phase, and `bytes` more expected transaction bytes.
__device__ __forceinline__ void mbar_arrive_expect_tx(unsigned bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// Returns once the phase of parity `parity` has completed (acquire: the copies' bytes are visible).
__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity) {
  unsigned done;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}
// `bytes` (a multiple of 16; both addresses 16-byte aligned) global -> shared; completion counted on `bar`.
__device__ __forceinline__ void bulk_copy_g2s(unsigned dst, const void* src, unsigned bytes, unsigned bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
      "l"(src), "r"(bytes), "r"(bar)
      : "memory");
}

// v4's shared memory: v3's layout (STAGES per warp) plus one 8-byte mbarrier per (warp, stage).
__host__ __device__ constexpr unsigned v4_smem(int hd, int stages) {
  return (kWarps * stages * 2 * kWarpTile * (hd + 8) + kMmaRows * (hd + 8)) * 2u +
         (2 * kWarps * kMmaRows + 2 * kMmaRows) * 4u + kWarps * stages * 8u;
}
// Resident CTAs per SM the launch bound asks for: as many (up to 3) as the H100's 228 KB of shared memory
// holds (1 KB reserved per CTA), at least 1.
__host__ __device__ constexpr int v4_min_ctas(int hd, int stages) {
  return 3 * (v4_smem(hd, stages) + 1024) <= 228 * 1024   ? 3
         : 2 * (v4_smem(hd, stages) + 1024) <= 228 * 1024 ? 2
                                                           : 1;
}
}  // namespace rf_paged

// T is always __half (see v2). Body compiled for sm_90+ only; older targets trap (the launcher refuses
// version 4 there).
template <typename T, int HD, int STAGES>
__global__ void __launch_bounds__(rf_paged::kThreads, rf_paged::v4_min_ctas(HD, STAGES))
    paged_attention_v4(RF_PAGED_ARGS) {
  rf::pdl_launch_dependents();
  rf::pdl_wait();  // launched with pdl=True in decode steps (common.cuh)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();
#else
  static_assert(IsHalf<T>::value, "v4 runs on fp16 tensor cores");
  using namespace rf_paged;
  constexpr int R = kMmaRows, TW = kWarpTile;
  constexpr int KS = HD + 8;          // shared row stride in halves: 16 bytes of padding (ldmatrix banks)
  constexpr int KSTEPS = HD / 16;     // k-steps of S = Q K^T
  constexpr int NT = HD / 8;          // n-tiles of O
  constexpr int OS = HD + 4;          // float row stride of the merge buffer
  constexpr int STAGE = 2 * TW * KS;  // halves per warp stage: K tile then V tile
  constexpr int WARP_BUF = STAGES * STAGE;
  static_assert(HD % 16 == 0 && HD <= 128, "v4: HD a multiple of 16 up to 128");
  static_assert(2 * TW == rf::kWarp, "v4: lane l copies row l % 16 of K (l < 16) or V (l >= 16)");
  static_assert(STAGES >= 2, "v4: at least double buffering");
  static_assert((KS * 2) % 16 == 0, "v4: bulk-copy destinations must be 16-byte aligned");
  static_assert(kWarps * R * OS * 4 <= kWarps * WARP_BUF * 2, "merge buffer must fit the stage buffers");
  constexpr unsigned kSmem = v4_smem(HD, STAGES);

  extern __shared__ __align__(16) unsigned char smem[];
  __half* kv_s = reinterpret_cast<__half*>(smem);  // [kWarps][STAGES][K tile [TW][KS], V tile [TW][KS]]
  __half* q_s = kv_s + kWarps * WARP_BUF;          // [R][KS]
  float* wm_s = reinterpret_cast<float*>(q_s + R * KS);  // [kWarps][R] each warp's final max
  float* wl_s = wm_s + kWarps * R;                      // [kWarps][R] each warp's final sum
  float* M_s = wl_s + kWarps * R;                       // [R] merged max (base)
  float* L_s = M_s + R;                                 // [R] merged sum
  unsigned long long* bar_s = reinterpret_cast<unsigned long long*>(L_s + R);  // [kWarps][STAGES] "full"
  float* o_s = reinterpret_cast<float*>(smem);          // [kWarps][R][OS], after every pipeline drained

  const int tid = threadIdx.x, warp = tid / rf::kWarp, lane = tid % rf::kWarp;
  const int gq = lane / 4, cq = lane % 4;
  if (tid == 0) check_smem(kSmem);
  const Work w = work_of_v3(q_len, q_heads, kv_heads, R, context_lens, split_tokens);

  const __half* k_head = k_cache + w.kvh * k_sh;
  const __half* v_head = v_cache + w.kvh * v_sh;
  const int* table = block_tables + static_cast<long long>(w.seq) * table_stride;
  const int block_mask = (1 << log2_block) - 1;
  // Tiles as in v3: warp w takes tiles w, w + kWarps, ... of TW positions of the CTA's range.
  const int cta_tiles = w.end > w.start ? rf::ceil_div(w.end - w.start, TW) : 0;
  const int n_tiles = cta_tiles > warp ? rf::ceil_div(cta_tiles - warp, kWarps) : 0;
  __half* warp_s = kv_s + warp * WARP_BUF;
  const unsigned warp_s_addr = rf::smem_addr(warp_s);
  const unsigned bar0 = rf::smem_addr(bar_s + warp * STAGES);  // this warp's stage s barrier: bar0 + 8 s
  auto tile_start = [&](int n) { return w.start + (warp + n * kWarps) * TW; };

  // Protocol, per warp (no other warp touches its buffers or barriers until the final merge). Stage s has
  // one "full" mbarrier, initialised for 32 arrivals. Tile n uses stage n % STAGES, and is that barrier's
  // phase n / STAGES: every lane does arrive.expect_tx(row bytes) and then its one bulk copy of a K or V
  // row (lane l: row l % 16, K if l < 16, else V), so the phase completes when all 32 lanes have arrived
  // and all 32 rows (32 x head_dim x 2 bytes) have landed. Consumers wait with parity (n / STAGES) & 1.
  // A stage is refilled (tile n + STAGES - 1 into the stage of tile n - 1) only after the __syncwarp that
  // follows every lane's last ldmatrix of tile n - 1, so the warp itself is the "empty" barrier; every
  // lane has also passed its wait of that phase, so a phase is never more than one ahead of any waiter.
  // Every tile issued is waited for inside the loop: nothing is in flight at the merge.
  //
  // Rows past the range (j >= valid) are not copied out of range: their copy is clamped to the tile's last
  // valid row (real, finite data) and their scores are masked to -inf (P = 0), so the byte count of every
  // phase is the same and no uninitialised shared memory reaches the mma. Head dims past head_dim (bucket
  // padding, head_dim < HD) are never written by the copies: zero-filled once here.
  if (head_dim < HD) {
    for (int i = lane; i < STAGES * 2 * TW * (HD - head_dim); i += rf::kWarp) {
      const int row = i / (HD - head_dim), d = head_dim + i % (HD - head_dim);
      warp_s[row * KS + d] = __float2half_rn(0.f);
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int s = 0; s < STAGES; ++s) mbar_init(bar0 + 8 * s, rf::kWarp);
    mbar_init_fence();
  }
  fence_proxy_async_smem();  // the zero fill before any bulk copy of the warp (different bytes; cheap)
  __syncwarp();              // barriers initialised before any lane arrives on them

  // Block ids of tile n: tokens 0-7 in block a, 8-15 in block b (as in v3), read one iteration ahead.
  struct Ids {
    int a, b;
  };
  auto block_ids = [&](int n) {
    Ids r{0, 0};
    if (n < n_tiles) {
      const int t0 = tile_start(n);
      r.a = __ldg(table + (t0 >> log2_block));
      if (t0 + 8 < w.end) r.b = log2_block >= 4 ? r.a : __ldg(table + ((t0 + 8) >> log2_block));
    }
    return r;
  };
  const unsigned row_bytes = static_cast<unsigned>(head_dim) * 2u;
  const int my_row = lane % TW;
  const bool my_v = lane >= TW;
  const __half* my_head = my_v ? v_head : k_head;
  const long long my_sb = my_v ? v_sb : k_sb, my_st = my_v ? v_st : k_st;
  const unsigned my_dst = warp_s_addr + static_cast<unsigned>(((my_v ? TW * KS : 0) + my_row * KS) * 2);
  auto issue_tile = [&](int n, Ids id, int stage) {
    const int t0 = tile_start(n);
    const int jj = min(my_row, w.end - t0 - 1);  // clamped to the last valid row (w.end - t0 >= 1)
    const long long blk = jj < 8 ? id.a : id.b;
    const int off = (t0 + jj) & block_mask;
    const unsigned bar = bar0 + 8u * stage;
    mbar_arrive_expect_tx(bar, row_bytes);
    bulk_copy_g2s(my_dst + static_cast<unsigned>(stage * STAGE * 2), my_head + blk * my_sb + off * my_st,
                  row_bytes, bar);
  };

  Ids ids[STAGES];
#pragma unroll
  for (int s = 0; s < STAGES; ++s) ids[s] = block_ids(s);
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s)
    if (s < n_tiles) issue_tile(s, ids[s], s);
  Ids next_id = ids[STAGES - 1];  // at the top of iteration n: the ids of tile n + STAGES - 1

  stage_q<HD>(q_s, q, w, tid, head_dim, q_ss, q_st, q_sh);
  __syncthreads();  // the only CTA barrier before the merge

  const __half* q_frag = q_s + ((lane % 8) + 8 * ((lane / 8) % 2)) * KS + 8 * (lane / 16);
  unsigned qf[KSTEPS][4];
#pragma unroll
  for (int ks = 0; ks < KSTEPS; ++ks) rf::ldmatrix_x4(qf[ks], q_frag + ks * 16);
  const int lim_lo = row_limit(w, w.chunk * R + gq, q_len);
  const int lim_hi = row_limit(w, w.chunk * R + gq + 8, q_len);

  float m_lo = neg_inf(), m_hi = neg_inf();
  float l_lo = 0.f, l_hi = 0.f;
  float o[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.f;

  int stage = 0;          // n % STAGES
  unsigned parity = 0u;   // (n / STAGES) & 1
  for (int n = 0; n < n_tiles; ++n) {
    __syncwarp();  // every lane is done reading tile n - 1's stage (last iteration's ldmatrix)
    {
      const int nxt = n + STAGES - 1;
      const int nxt_stage = stage == 0 ? STAGES - 1 : stage - 1;  // (n - 1) % STAGES
      if (nxt < n_tiles) issue_tile(nxt, next_id, nxt_stage);
      next_id = block_ids(nxt + 1);  // used next iteration
    }
    mbar_wait(bar0 + 8u * stage, parity);  // tile n's 32 rows have landed
    const __half* ks = warp_s + stage * STAGE;
    const __half* vs = ks + TW * KS;
    const int t0 = tile_start(n);
    if (++stage == STAGES) stage = 0, parity ^= 1u;

    // From here the tile's math is v3's.
    tile_step<HD, false>(ks, vs, 0, t0, qf, q_frag, lim_lo, lim_hi, scale_log2, lane, cq, m_lo, m_hi, l_lo,
                         l_hi, o);
  }

  // Merge the 4 warps' (m, l, O) once, as in v3 (every tile issued was waited for: nothing in flight).
  merge_warps_and_store<HD, false>(wm_s, wl_s, M_s, L_s, o_s, w, tid, warp, gq, cq, m_lo, m_hi, l_lo, l_hi, o,
                                   out, part_out, part_lse, head_dim, q_len, q_heads, num_splits);
#endif
}

// ---- combine and debug check ------------------------------------------------------------------------------

// One CTA per output row (seq, token, q head): out = sum_i w_i out_i / sum_i w_i, w_i = 2^(lse_i - max lse).
// Dynamic shared memory: num_splits floats for the weights.
template <typename T>
__global__ void __launch_bounds__(rf_paged::kThreads)
    paged_attention_combine(const float* __restrict__ part_out, const float* __restrict__ part_lse,
                            T* __restrict__ out, int num_splits, int head_dim) {
  rf::pdl_launch_dependents();
  rf::pdl_wait();  // launched with pdl=True in decode steps (common.cuh)
  using namespace rf_paged;
  extern __shared__ __align__(16) unsigned char smem[];
  float* w_s = reinterpret_cast<float*>(smem);
  __shared__ float scratch[kWarps];
  const long long row = blockIdx.x;
  const float* lse = part_lse + row * num_splits;
  float mx = neg_inf();
  for (int i = threadIdx.x; i < num_splits; i += kThreads) mx = fmaxf(mx, lse[i]);
  mx = rf::block_reduce<kThreads>(mx, rf::Max(), scratch);
  const float base = mx == neg_inf() ? 0.f : mx;
  float total = 0.f;
  for (int i = threadIdx.x; i < num_splits; i += kThreads) {
    const float wi = exp2f(lse[i] - base);  // 0 for an empty split (lse -inf)
    w_s[i] = wi;
    total += wi;
  }
  total = rf::block_reduce<kThreads>(total, rf::Sum(), scratch);  // its trailing sync publishes w_s
  const float inv = total > 0.f ? 1.f / total : 0.f;
  const float* po = part_out + row * num_splits * head_dim;
  for (int d = threadIdx.x; d < head_dim; d += kThreads) {
    float acc = 0.f;
    for (int i = 0; i < num_splits; ++i) {
      const float wi = w_s[i];
      if (wi != 0.f) acc = fmaf(wi, po[i * head_dim + d], acc);  // skip: an empty split's out is 0 anyway
    }
    out[row * head_dim + d] = rf::from_acc<T>(acc * inv);
  }
}

// Debug: thread (s, slot) for slot < table_stride checks block_tables[s][slot] when the slot is in use
// (slot < ceil(context_lens[s] / block_size)): the id must lie in [0, num_blocks) and, with `owners`
// (int32 [num_blocks], -1 = shared/free), belong to s or be shared. Slot == table_stride checks
// 0 <= context_lens[s] <= table_stride * block_size. The smallest failing s * (table_stride + 1) + slot
// goes to *first_bad (initialised to INT_MAX by the launcher).
// THREADS: the block size the launcher uses (a template so that every kernel of the family is fetched
// through a template name expression).
template <int THREADS>
__global__ void __launch_bounds__(THREADS)
    paged_attention_check_tables(const int* __restrict__ block_tables, const int* __restrict__ context_lens,
                                 const int* __restrict__ owners, int num_seqs, int table_stride,
                                 int log2_block, int num_blocks, int* first_bad) {
  const long long idx = static_cast<long long>(blockIdx.x) * THREADS + threadIdx.x;
  const long long per_seq = static_cast<long long>(table_stride) + 1;
  if (idx >= per_seq * num_seqs) return;
  const int s = static_cast<int>(idx / per_seq), slot = static_cast<int>(idx % per_seq);
  const int ctx = context_lens[s];
  const long long capacity = static_cast<long long>(table_stride) << log2_block;
  const bool ctx_ok = ctx >= 0 && static_cast<long long>(ctx) <= capacity;
  bool bad;
  if (slot == table_stride) {
    bad = !ctx_ok;
  } else {
    const long long used = ctx_ok ? ((static_cast<long long>(ctx) + (1 << log2_block) - 1) >> log2_block) : 0;
    bad = false;
    if (slot < used) {
      const int b = block_tables[static_cast<long long>(s) * table_stride + slot];
      bad = b < 0 || b >= num_blocks || (owners != nullptr && owners[b] != -1 && owners[b] != s);
    }
  }
  if (bad) atomicMin(first_bad, static_cast<int>(idx));
}
