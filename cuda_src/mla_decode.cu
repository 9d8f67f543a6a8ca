// mla_decode.cu: Multi-head Latent Attention decode over a paged latent cache, family "mla_decode".
//
// DeepSeek-V2's MLA with W_UK absorbed into the query: every query head attends ONE shared latent "head".
// Per cached token p the key is [c_p ; k_r,p] (R + DR dims: latent and rope key) and the value is c_p.
//
// Memory layout (strides in elements; last dims contiguous; rows 16-byte aligned):
//   q_absorbed  [num_seqs, q_len, heads, R]     strides qa_ss, qa_st, qa_sh
//   q_rope      [num_seqs, q_len, heads, DR]    strides qr_ss, qr_st, qr_sh
//   latent      [num_blocks, block_size, R]     strides l_sb, l_st   (LatentArena.latent(L): token stride
//   rope        [num_blocks, block_size, DR]    strides r_sb, r_st    R + DR, the rope key right after)
//   block_tables int32 [num_seqs, table_stride]; context_lens int32 [num_seqs] (q_len new tokens included)
//   out         C-contiguous __half [num_seqs, q_len, heads, R]
//   part_out    float (v1) / __half (v2, v3) [num_seqs, q_len, heads, num_splits, R];
//   part_lse    float [num_seqs, q_len, heads, num_splits] (base 2)
//
// Maths: query row (token t, head h) sits at position ctx - q_len + t and sees positions 0..that.
// x_p = scale * log2(e) * (q_abs . c_p + q_rope . k_r,p); online max m / sum l in fp32; out = sum 2^(x_p - m)
// c_p / l (0 for a row that sees nothing). Split-KV: split i covers [i * split_tokens, (i+1) * split_tokens)
// and writes fp32 partials + lse = m + log2(l); mla_decode_combine merges them.
//
// Versions
//   mla_decode_v1<R, DR, MT, WARPS, TK, STAGES>  tensor cores (mma.sync m16n8k16, fp16 in, fp32 accumulate),
//       __half only. One CTA per (sequence, chunk of 16 * MT query rows, split); query rows are the q_len x
//       heads (token, head) pairs, so ONE read of a latent tile serves every head (and every new token) of the
//       chunk: the whole point of MLA decode. Per tile of TK tokens, STAGES = 2 cp.async double buffer of
//       [c ; k_r] rows (R + DR halves + 16 bytes of padding: ldmatrix conflict-free):
//         S = Q K^T: warp w owns m-tile w / (TK/16) and 16 tokens (two n8 blocks) of the tile; Q (staged
//             once in shared memory) and K fragments by ldmatrix, (R + DR) / 16 k-steps;
//         online softmax across warps: per-row tile maxima through shared memory (one barrier), the running
//             max / rescale factor per row computed by one thread per row (second barrier), P = 2^(x - m)
//             rounded to fp16 into shared memory and per-warp partial row sums (third barrier);
//         O += P V with V = the latent part of the same tile (ldmatrix.trans): warp w owns output columns
//             [w R / WARPS, (w+1) R / WARPS) of all 16 * MT rows (fp32 accumulators in registers);
//         a fourth barrier frees the stage and P.
//       Configurations the launcher uses: <512, 64, 1, 4, 64> (16 rows, 4 warps, 64-token tiles of 72 KB:
//       few heads, memory-bound: the latent stream is read once per 16 rows) and <512, 64, 4, 8, 32> (64 rows,
//       8 warps, 32-token tiles: every tile feeds 4 m-tiles of MMAs: the compute-bound case of 128 heads).
//       Measured (H100, 32 seqs x 2048 tokens): 16 heads 0.060 ms = 1287 GB/s (43% of copy), 128 heads
//       0.153 ms = 119 TFLOP/s. 64 rows: every S k-step reloads Q's A fragment and K's B fragment from shared
//       memory (ldmatrix; Q does not fit in registers beside the 128 fp32 accumulators of O), about 360 KB
//       of shared-memory reads per 4.5 MFLOP tile: shared-memory bandwidth caps it near 370 TFLOP/s before
//       barriers and latency; with one CTA per SM whose 4 or 8 warps move through 5 barriers per tile in
//       lockstep, latency (not bandwidth) is what the measurement shows.
//   mla_decode_v2<R, DR, MT, WARPS, TK, STAGES>  v1's work split and shared-memory layout (the float area:
//       red_max, red_sum, two running maxima by tile parity, the running sum) with a shorter critical path
//       per tile, aimed at >= 2 resident CTAs per SM so that one CTA's barriers overlap the other's work:
//         * 3 barriers per tile, not 5: (W) after the cp.async wait also frees the stage and P of the tile
//           before (the next load is issued after it); (A) slice maxima; (C) P and slice sums. Each thread
//           derives the new running max / rescale factor of the rows it touches from red_max itself;
//         * STAGES-deep cp.async ring: tile it + STAGES - 1 is in flight while tile it is computed;
//         * the loader hands each warp whole token rows: one block-table read per warp and tile (a lane per
//           row, broadcast by shuffle), 2 latent chunks per lane and the rope chunks on lanes 0..DR/8-1;
//         * S = Q K^T over alternate k-steps into two accumulator sets: two independent MMA chains;
//         * programmatic dependent launch: rf::pdl_launch_dependents / rf::pdl_wait at the top;
//         * split-KV partials in fp16 (each already divided by its own sum, so within fp16's range), half
//           the bytes of v1's fp32 partials; merged by mla_decode_combine_h.
//       Configurations (python V2_CONFIGS; shared bytes = 2 (16 MT + STAGES TK) (R + DR + 8)
//       + 2 x 16 MT (TK + 8) + 4 x 16 MT (2 TK / 16 + 3), python _smem):
//         <512, 64, 1, 2, 32, 2>  16 rows, 2 warps, 95 KB: 2 CTAs per SM (default for <= 16 rows)
//         <512, 64, 2, 4, 32, 2>  32 rows, 4 warps, 113 KB: 2 CTAs per SM (default for > 16 rows)
//         <512, 64, 1, 4, 64, 2>, <512, 64, 1, 2, 32, 4>, <512, 64, 4, 8, 32, 2>, <512, 64, 4, 8, 32, 3>:
//           one CTA per SM (v1's shapes, a 4-deep ring), measured beside them by bench/mla.py --variants all.
//   mla_decode_v3<R, DR, MT, WM, CG, TK, STAGES>  FlashMLA's shape on mma.sync: a CTA of 16 MT query rows
//       (the heads of one sequence as the M dimension; 16 heads: one m16 tile, 128 heads: two CTAs of 4), Q and
//       a STAGES-deep cp.async ring of TK-token [c ; k_r] tiles in UNPADDED shared memory, 16-byte chunk k of
//       row j stored at chunk k ^ (j & 7) (ldmatrix rows of one 8x8 matrix fall in 8 different bank groups;
//       R + DR = 576 halves = 72 chunks, a multiple of 8), which is what lets 64 rows + two 64-token stages
//       (226 KB) fit in one CTA. Warps: RG = MT / WM row groups x CG column groups; warp (rg, c):
//         S = Q K^T for its WM m16 tiles x tokens [c TK / CG, (c + 1) TK / CG) of the tile (36 k-steps,
//             A and B by ldmatrix, 2 accumulator sets when there would be < 4 independent MMA chains);
//         slice maxima -> shared, named barrier of the row group (bar.sync 1 + rg, 32 CG) -> every warp of
//             the group derives the same new running max (registers), P = 2^(x - m) in fp16 -> shared, its
//             own rescaled partial row sums (registers), named barrier;
//         O (WM m16 tiles x R / CG columns, fp32 registers) = alpha O + P V, V = the latent part of the
//             same tile (ldmatrix.trans);
//       one __syncthreads per tile (tile landed, previous stage free); partial sums added after the last
//       tile. Split-KV partials in fp16 + lse as v2, merged by mla_decode_combine_h.
//       Configurations (python V3_CONFIGS, shared bytes = 2 (16 MT (R + DR) + STAGES TK (R + DR)
//       + 16 MT (TK + 8)) + 4 CG 16 MT = MlaV3Shape::SMEM, python _smem_v3):
//         <512, 64, 1, 1, 4, 64, 2>  16 rows, 4 warps x 128 columns, 2 stages of 64 tokens, 168 KB: <= 16
//                                    rows (memory-bound)
//         <512, 64, 2, 1, 2, 32, 2>  32 rows, 4 warps, 113 KB, 2 CTAs per SM: 17 .. 32 rows
//         <512, 64, 4, 2, 4, 64, 2>  64 rows, 8 warps of 32 rows x 128 columns (P V: 32 rows per V fragment),
//                                    64-token tiles, 226 KB: > 32 rows (128 heads: compute-bound)
//         <512, 64, 1, 1, 2, 32, 2>, <512, 64, 1, 1, 2, 32, 4>, <512, 64, 4, 1, 2, 32, 3>,
//         <512, 64, 2, 2, 4, 64, 2>: candidates bench/mla.py --variants all measures beside them (the
//         first is the <= 16-row fallback where 168 KB does not fit, e.g. an A100).
//   mla_decode_combine<R, THREADS>, mla_decode_combine_h<R, THREADS>  one CTA per (seq, token, head) row:
//       merge the splits' fp32 (v1) / fp16 (v2, v3) partials (launched with programmatic dependent launch:
//       rf::pdl_wait before reading them).
// Kernel arguments (v1, v2 and v3):
//   (q_absorbed, q_rope, latent, rope, block_tables, context_lens, out, part_out, part_lse,
//    q_len, heads, log2_block, table_stride, split_tokens, num_splits,
//    qa_ss, qa_st, qa_sh, qr_ss, qr_st, qr_sh, l_sb, l_st, r_sb, r_st, scale_log2)
#include "common.cuh"

namespace rf {

// -inf without <math.h>'s INFINITY (NVRTC compiles without host headers)
__device__ __forceinline__ float mla_neg_inf() { return __int_as_float(0xff800000); }

template <int R, int DR, int MT, int WARPS, int TK, int STAGES> struct MlaShape {
  static constexpr int KD = R + DR;       // key dims: latent | rope key
  static constexpr int PITCH = KD + 8;    // halves per shared row (16 bytes of padding)
  static constexpr int ROWS = 16 * MT;    // query rows per CTA
  static constexpr int PP = TK + 8;       // halves per P row
  static constexpr int NP = TK / 16;      // 16-token slices of a tile (one per warp and m-tile)
  static constexpr int CW = R / WARPS;    // output columns per warp
  static constexpr int ONB = CW / 8;      // n8 blocks of output per warp
  static constexpr int THREADS = 32 * WARPS;
  static constexpr int CHUNKS = KD / 8;   // 16-byte chunks per row
  static constexpr int LCH = R / 8;       // ... of which latent
  static_assert(R % 16 == 0 && DR % 16 == 0, "R and DR: multiples of 16");
  static_assert(WARPS == MT * NP, "one warp per (m-tile, 16-token slice)");
  static_assert(CW % 16 == 0, "output columns per warp: a multiple of 16");
  static_assert(STAGES >= 2 && STAGES <= 6, "2 to 6 cp.async stages");
};

}  // namespace rf

template <int R, int DR, int MT, int WARPS, int TK, int STAGES>
__global__ void __launch_bounds__(32 * WARPS) mla_decode_v1(
    const __half* __restrict__ qa, const __half* __restrict__ qr, const __half* __restrict__ lat,
    const __half* __restrict__ rope, const int* __restrict__ tables, const int* __restrict__ ctx_lens,
    __half* __restrict__ out, float* __restrict__ part_out, float* __restrict__ part_lse, int q_len,
    int heads, int log2_block, int table_stride, int split_tokens, int num_splits, long long qa_ss,
    long long qa_st, long long qa_sh, long long qr_ss, long long qr_st, long long qr_sh, long long l_sb,
    long long l_st, long long r_sb, long long r_st, float scale_log2) {
  using S = rf::MlaShape<R, DR, MT, WARPS, TK, STAGES>;
  static_assert(STAGES == 2, "v1: double buffer");
  const float NEG_INF = rf::mla_neg_inf();
  constexpr int ROWS = S::ROWS, PITCH = S::PITCH, PP = S::PP, NP = S::NP, KD = S::KD;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __half* q_s = reinterpret_cast<__half*>(smem_raw);  // [ROWS][PITCH]
  __half* k_s = q_s + ROWS * PITCH;                    // [STAGES][TK][PITCH]
  __half* p_s = k_s + STAGES * TK * PITCH;             // [ROWS][PP]
  float* red_max = reinterpret_cast<float*>(p_s + ROWS * PP);  // [NP][ROWS]
  float* red_sum = red_max + NP * ROWS;                        // [NP][ROWS]
  float* m_run = red_sum + NP * ROWS;                          // [ROWS] running max (base 2)
  float* l_run = m_run + ROWS;                                 // [ROWS] running sum
  float* alpha_s = l_run + ROWS;                               // [ROWS] this tile's rescale factor

  const int rows_total = q_len * heads;
  const int chunks = (rows_total + ROWS - 1) / ROWS;
  const int seq = blockIdx.x / chunks, chunk = blockIdx.x % chunks, split = blockIdx.y;
  const int tid = threadIdx.x, warp = tid / rf::kWarp, lane = tid % rf::kWarp;
  const int g = lane / 4, cq = lane % 4;
  const int row0 = chunk * ROWS;
  const int ctx = ctx_lens[seq];
  const int begin = split * split_tokens;
  const int end = min(ctx, begin + split_tokens);
  const int num_tiles = end > begin ? (end - begin + TK - 1) / TK : 0;
  const int* table = tables + static_cast<long long>(seq) * table_stride;
  const int block_mask = (1 << log2_block) - 1;

  // Q of the chunk's rows -> shared (zero rows past rows_total), committed with the first tile
  for (int i = tid; i < ROWS * S::CHUNKS; i += S::THREADS) {
    const int rr = i / S::CHUNKS, c = i % S::CHUNKS, gr = row0 + rr;
    const bool ok = gr < rows_total;
    const int t = ok ? gr / heads : 0, h = ok ? gr % heads : 0;
    const __half* src = c < S::LCH ? qa + seq * qa_ss + t * qa_st + h * qa_sh + c * 8
                                   : qr + seq * qr_ss + t * qr_st + h * qr_sh + (c - S::LCH) * 8;
    rf::cp_async_16(q_s + rr * PITCH + c * 8, ok ? src : qa, ok);
  }
  if (tid < ROWS) {
    m_run[tid] = NEG_INF;
    l_run[tid] = 0.f;
  }
  auto load_tile = [&](int tile, int stage) {
    const int p0 = begin + tile * TK;
    __half* dst = k_s + stage * TK * PITCH;
    for (int i = tid; i < TK * S::CHUNKS; i += S::THREADS) {
      const int j = i / S::CHUNKS, c = i % S::CHUNKS, p = p0 + j;
      const bool ok = p < end;
      const __half* src = lat;
      if (ok) {
        const long long blk = table[p >> log2_block];
        const int off = p & block_mask;
        src = c < S::LCH ? lat + blk * l_sb + off * l_st + c * 8 : rope + blk * r_sb + off * r_st + (c - S::LCH) * 8;
      }
      rf::cp_async_16(dst + j * PITCH + c * 8, src, ok);  // past the range: zero-filled, nothing read
    }
  };

  float o[MT][S::ONB][4];
#pragma unroll
  for (int mm = 0; mm < MT; ++mm)
#pragma unroll
    for (int nb = 0; nb < S::ONB; ++nb) o[mm][nb][0] = o[mm][nb][1] = o[mm][nb][2] = o[mm][nb][3] = 0.f;

  const int my_m = warp / NP, tok0 = (warp % NP) * 16;  // this warp's S slice
  if (num_tiles > 0) load_tile(0, 0);
  rf::cp_async_commit();
  for (int it = 0; it < num_tiles; ++it) {
    if (it + 1 < num_tiles) load_tile(it + 1, (it + 1) % STAGES);
    rf::cp_async_commit();
    rf::cp_async_wait<1>();
    __syncthreads();
    const __half* kt = k_s + (it % STAGES) * TK * PITCH;
    const int p0 = begin + it * TK;

    // ---- S = Q K^T for (my_m, tokens tok0 .. tok0 + 15) ----
    float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    const __half* qrow = q_s + (my_m * 16 + lane % 16) * PITCH + (lane / 16) * 8;
    const __half* krow = kt + (tok0 + lane % 8 + (lane / 16) * 8) * PITCH + ((lane / 8) % 2) * 8;
#pragma unroll 4
    for (int kk = 0; kk < KD; kk += 16) {
      unsigned a[4], b[4];
      rf::ldmatrix_x4(a, qrow + kk);
      rf::ldmatrix_x4(b, krow + kk);
      rf::mma_m16n8k16(s[0], a, b[0], b[1]);
      rf::mma_m16n8k16(s[1], a, b[2], b[3]);
    }
    // scale, mask (past the range / causal among the new tokens), per-row max of the slice
    float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
    for (int nb = 0; nb < 2; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int p = p0 + tok0 + nb * 8 + 2 * cq + (e & 1);
        const int gr = row0 + my_m * 16 + g + (e >> 1) * 8;
        const int last = ctx - q_len + gr / heads;
        const bool vis = p < end && p <= last;
        s[nb][e] = vis ? s[nb][e] * scale_log2 : NEG_INF;
        mx[e >> 1] = fmaxf(mx[e >> 1], s[nb][e]);
      }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
    }
    const int slice = warp % NP;
    if (cq == 0) {
      red_max[slice * ROWS + my_m * 16 + g] = mx[0];
      red_max[slice * ROWS + my_m * 16 + g + 8] = mx[1];
    }
    __syncthreads();  // (A) tile maxima visible
    if (tid < ROWS) {
      float mt = red_max[tid];
#pragma unroll
      for (int j = 1; j < NP; ++j) mt = fmaxf(mt, red_max[j * ROWS + tid]);
      const float mo = m_run[tid], mn = fmaxf(mo, mt);
      alpha_s[tid] = mn == NEG_INF ? 1.f : exp2f(mo - mn);
      m_run[tid] = mn;
    }
    __syncthreads();  // (B) new maxima and rescale factors visible
    const float mrow[2] = {m_run[my_m * 16 + g], m_run[my_m * 16 + g + 8]};
    float sum[2] = {0.f, 0.f};
#pragma unroll
    for (int nb = 0; nb < 2; ++nb)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const float x0 = s[nb][2 * hr], x1 = s[nb][2 * hr + 1];
        const float e0 = x0 == NEG_INF ? 0.f : exp2f(x0 - mrow[hr]);
        const float e1 = x1 == NEG_INF ? 0.f : exp2f(x1 - mrow[hr]);
        sum[hr] += e0 + e1;
        const int row = my_m * 16 + g + hr * 8, col = tok0 + nb * 8 + 2 * cq;
        *reinterpret_cast<unsigned*>(p_s + row * PP + col) = rf::pack_half2(e0, e1);
      }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      sum[i] += __shfl_xor_sync(0xffffffffu, sum[i], 1);
      sum[i] += __shfl_xor_sync(0xffffffffu, sum[i], 2);
    }
    if (cq == 0) {
      red_sum[slice * ROWS + my_m * 16 + g] = sum[0];
      red_sum[slice * ROWS + my_m * 16 + g + 8] = sum[1];
    }
    __syncthreads();  // (C) P and the partial sums visible
    if (tid < ROWS) {
      float t = 0.f;
#pragma unroll
      for (int j = 0; j < NP; ++j) t += red_sum[j * ROWS + tid];
      l_run[tid] = l_run[tid] * alpha_s[tid] + t;
    }
    // ---- O = alpha O + P V over this warp's output columns ----
#pragma unroll
    for (int mm = 0; mm < MT; ++mm) {
      const float a0 = alpha_s[mm * 16 + g], a1 = alpha_s[mm * 16 + g + 8];
#pragma unroll
      for (int nb = 0; nb < S::ONB; ++nb) {
        o[mm][nb][0] *= a0;
        o[mm][nb][1] *= a0;
        o[mm][nb][2] *= a1;
        o[mm][nb][3] *= a1;
      }
    }
    const __half* vrow = kt + (lane % 8 + ((lane / 8) % 2) * 8) * PITCH + warp * S::CW + (lane / 16) * 8;
#pragma unroll
    for (int kk = 0; kk < TK; kk += 16) {
      unsigned pa[MT][4];
#pragma unroll
      for (int mm = 0; mm < MT; ++mm) rf::ldmatrix_x4(pa[mm], p_s + (mm * 16 + lane % 16) * PP + kk + (lane / 16) * 8);
#pragma unroll
      for (int nb = 0; nb < S::ONB; nb += 2) {
        unsigned b[4];
        rf::ldmatrix_x4_trans(b, vrow + kk * PITCH + nb * 8);
#pragma unroll
        for (int mm = 0; mm < MT; ++mm) {
          rf::mma_m16n8k16(o[mm][nb], pa[mm], b[0], b[1]);
          rf::mma_m16n8k16(o[mm][nb + 1], pa[mm], b[2], b[3]);
        }
      }
    }
    __syncthreads();  // (D) the stage and P may be overwritten
  }
  rf::cp_async_wait<0>();
  __syncthreads();  // l_run / m_run final (also when there was no tile)

  // ---- epilogue: this warp's columns of every valid row ----
#pragma unroll
  for (int mm = 0; mm < MT; ++mm)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int rloc = mm * 16 + g + hr * 8, gr = row0 + rloc;
      if (gr >= rows_total) continue;
      const float l = l_run[rloc];
      const float inv = l > 0.f ? 1.f / l : 0.f;
      const long long orow = static_cast<long long>(seq) * rows_total + gr;  // (seq, t, h) flattened
#pragma unroll
      for (int nb = 0; nb < S::ONB; ++nb) {
        const int col = warp * S::CW + nb * 8 + 2 * cq;
        const float v0 = o[mm][nb][2 * hr] * inv, v1 = o[mm][nb][2 * hr + 1] * inv;
        if (num_splits == 1) {
          *reinterpret_cast<unsigned*>(out + orow * R + col) = rf::pack_half2(v0, v1);
        } else {
          *reinterpret_cast<float2*>(part_out + (orow * num_splits + split) * R + col) = make_float2(v0, v1);
        }
      }
    }
  if (num_splits > 1 && tid < ROWS && row0 + tid < rows_total) {
    const long long orow = static_cast<long long>(seq) * rows_total + row0 + tid;
    const float l = l_run[tid];
    part_lse[orow * num_splits + split] = l > 0.f ? m_run[tid] + log2f(l) : NEG_INF;
  }
}

// mla_decode_v2: v1's split of the work (S = Q K^T once per tile, shared through P in shared memory; each warp
// owns R / WARPS output columns of every row) with a shorter critical path per tile:
//   * STAGES-deep cp.async ring (tile it + STAGES - 1 is issued while tile it is computed);
//   * 3 barriers per tile instead of 5: the barrier after the wait also frees the stage and P of the tile
//     before (the next load is issued after it), and every thread derives the new row maxima and rescale
//     factors it needs from the per-slice maxima itself (running maxima double-buffered by tile parity);
//   * the loader gives each warp whole token rows: one block-table read per warp and tile (a lane per row,
//     broadcast by shuffle), latent chunks two per lane, rope chunks on lanes 0..DR/8-1: no division per copy;
//   * S = Q K^T with two accumulator sets over alternate k-steps: two independent MMA chains per n8 block;
//   * programmatic dependent launch (rf::pdl_wait before the first read).
template <int R, int DR, int MT, int WARPS, int TK, int STAGES>
__global__ void __launch_bounds__(32 * WARPS) mla_decode_v2(
    const __half* __restrict__ qa, const __half* __restrict__ qr, const __half* __restrict__ lat,
    const __half* __restrict__ rope, const int* __restrict__ tables, const int* __restrict__ ctx_lens,
    __half* __restrict__ out, __half* __restrict__ part_out, float* __restrict__ part_lse, int q_len,
    int heads, int log2_block, int table_stride, int split_tokens, int num_splits, long long qa_ss,
    long long qa_st, long long qa_sh, long long qr_ss, long long qr_st, long long qr_sh, long long l_sb,
    long long l_st, long long r_sb, long long r_st, float scale_log2) {
  using S = rf::MlaShape<R, DR, MT, WARPS, TK, STAGES>;
  constexpr int ROWS = S::ROWS, PITCH = S::PITCH, PP = S::PP, NP = S::NP, KD = S::KD;
  constexpr int RPW = TK / WARPS;  // tile rows each warp loads
  constexpr int RCH = DR / 8;      // 16-byte chunks of a rope row
  static_assert(TK % WARPS == 0 && RPW <= 32, "loader: whole rows per warp, one table read per lane");
  static_assert(S::LCH % 32 == 0 && RCH <= 32, "loader: latent chunks a multiple of 32, rope <= 32");
  static_assert(KD % 32 == 0, "S: k-steps in pairs");
  rf::pdl_launch_dependents();
  rf::pdl_wait();  // q, the cache and the tables may come from the kernels before (launched with pdl=True)
  const float NEG_INF = rf::mla_neg_inf();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __half* q_s = reinterpret_cast<__half*>(smem_raw);  // [ROWS][PITCH]
  __half* k_s = q_s + ROWS * PITCH;                    // [STAGES][TK][PITCH]
  __half* p_s = k_s + STAGES * TK * PITCH;             // [ROWS][PP]
  float* red_max = reinterpret_cast<float*>(p_s + ROWS * PP);  // [NP][ROWS] per-slice tile maxima
  float* red_sum = red_max + NP * ROWS;                        // [NP][ROWS] per-slice sums of P
  float* m_buf = red_sum + NP * ROWS;                          // [2][ROWS] running max before tile it: it % 2
  float* l_run = m_buf + 2 * ROWS;                             // [ROWS] running sum

  const int rows_total = q_len * heads;
  const int chunks = (rows_total + ROWS - 1) / ROWS;
  const int seq = blockIdx.x / chunks, chunk = blockIdx.x % chunks, split = blockIdx.y;
  const int tid = threadIdx.x, warp = tid / rf::kWarp, lane = tid % rf::kWarp;
  const int g = lane / 4, cq = lane % 4;
  const int row0 = chunk * ROWS;
  const int ctx = ctx_lens[seq];
  const int begin = split * split_tokens;
  const int end = min(ctx, begin + split_tokens);
  const int num_tiles = end > begin ? (end - begin + TK - 1) / TK : 0;
  const int* table = tables + static_cast<long long>(seq) * table_stride;
  const int block_mask = (1 << log2_block) - 1;

  for (int i = tid; i < ROWS * S::CHUNKS; i += S::THREADS) {  // Q -> shared, in the first tile's group
    const int rr = i / S::CHUNKS, c = i % S::CHUNKS, gr = row0 + rr;
    const bool ok = gr < rows_total;
    const int t = ok ? gr / heads : 0, h = ok ? gr % heads : 0;
    const __half* src = c < S::LCH ? qa + seq * qa_ss + t * qa_st + h * qa_sh + c * 8
                                   : qr + seq * qr_ss + t * qr_st + h * qr_sh + (c - S::LCH) * 8;
    rf::cp_async_16(q_s + rr * PITCH + c * 8, ok ? src : qa, ok);
  }
  if (tid < ROWS) {
    m_buf[tid] = NEG_INF;
    l_run[tid] = 0.f;
  }
  // rows warp, warp + WARPS, ... of the tile: lane i reads the block id of the warp's i-th row
  auto load_tile = [&](int tile, int stage) {
    const int p0 = begin + tile * TK;
    const int pl = p0 + warp + lane * WARPS;
    const int my_blk = lane < RPW && pl < end ? table[pl >> log2_block] : 0;
    __half* dst = k_s + stage * TK * PITCH;
#pragma unroll
    for (int i = 0; i < RPW; ++i) {
      const int j = warp + i * WARPS, p = p0 + j;
      const bool ok = p < end;  // past the range: zero-filled, nothing read
      const long long blk = __shfl_sync(0xffffffffu, my_blk, i);
      const int off = p & block_mask;
      const __half* ls = lat + (blk * l_sb + off * l_st);
      __half* d = dst + j * PITCH;
#pragma unroll
      for (int k = 0; k < S::LCH / 32; ++k) {
        const int c = lane + 32 * k;
        rf::cp_async_16(d + c * 8, ok ? ls + c * 8 : lat, ok);
      }
      if (lane < RCH) rf::cp_async_16(d + R + lane * 8, ok ? rope + (blk * r_sb + off * r_st) + lane * 8 : rope, ok);
    }
  };

  float o[MT][S::ONB][4];
#pragma unroll
  for (int mm = 0; mm < MT; ++mm)
#pragma unroll
    for (int nb = 0; nb < S::ONB; ++nb) o[mm][nb][0] = o[mm][nb][1] = o[mm][nb][2] = o[mm][nb][3] = 0.f;

  const int my_m = warp / NP, slice = warp % NP, tok0 = slice * 16;  // this warp's S block
  int last[2];  // last visible position of this thread's two S rows (rows past rows_total: anything)
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) last[hr] = ctx - q_len + (row0 + my_m * 16 + g + hr * 8) / heads;
#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) {
    if (st < num_tiles) load_tile(st, st);
    rf::cp_async_commit();
  }
  for (int it = 0; it < num_tiles; ++it) {
    rf::cp_async_wait<STAGES - 2>();  // this thread's copies of tile it have landed
    __syncthreads();  // (W) tile it visible; every warp is done with tile it - 1 (its stage, P, reductions)
    {
      const int nt = it + STAGES - 1;  // into the stage of tile it - 1
      if (nt < num_tiles) load_tile(nt, nt % STAGES);
      rf::cp_async_commit();
    }
    const __half* kt = k_s + (it % STAGES) * TK * PITCH;
    const int p0 = begin + it * TK;
    const float* m_old = m_buf + (it & 1) * ROWS;
    float* m_new = m_buf + ((it + 1) & 1) * ROWS;

    // ---- S = Q K^T for rows my_m * 16 .. + 15, tokens tok0 .. tok0 + 15 ----
    float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    float s2[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    const __half* qrow = q_s + (my_m * 16 + lane % 16) * PITCH + (lane / 16) * 8;
    const __half* krow = kt + (tok0 + lane % 8 + (lane / 16) * 8) * PITCH + ((lane / 8) % 2) * 8;
#pragma unroll 3
    for (int kk = 0; kk < KD; kk += 32) {
      unsigned a[4], b[4], a2[4], b2[4];
      rf::ldmatrix_x4(a, qrow + kk);
      rf::ldmatrix_x4(b, krow + kk);
      rf::ldmatrix_x4(a2, qrow + kk + 16);
      rf::ldmatrix_x4(b2, krow + kk + 16);
      rf::mma_m16n8k16(s[0], a, b[0], b[1]);
      rf::mma_m16n8k16(s[1], a, b[2], b[3]);
      rf::mma_m16n8k16(s2[0], a2, b2[0], b2[1]);
      rf::mma_m16n8k16(s2[1], a2, b2[2], b2[3]);
    }
    float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
    for (int nb = 0; nb < 2; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int p = p0 + tok0 + nb * 8 + 2 * cq + (e & 1);
        const bool vis = p < end && p <= last[e >> 1];
        s[nb][e] = vis ? (s[nb][e] + s2[nb][e]) * scale_log2 : NEG_INF;
        mx[e >> 1] = fmaxf(mx[e >> 1], s[nb][e]);
      }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
    }
    if (cq == 0) {
      red_max[slice * ROWS + my_m * 16 + g] = mx[0];
      red_max[slice * ROWS + my_m * 16 + g + 8] = mx[1];
    }
    __syncthreads();  // (A) the slices' maxima visible
    // the running max after this tile, the same arithmetic in every thread that needs it
    auto max_after = [&](int row) {
      float mt = m_old[row];
#pragma unroll
      for (int j = 0; j < NP; ++j) mt = fmaxf(mt, red_max[j * ROWS + row]);
      return mt;
    };
    auto rescale = [&](int row) {  // 2^(m_old - m_new): 1 while the row has seen nothing
      const float mn = max_after(row);
      return mn == NEG_INF ? 1.f : exp2f(m_old[row] - mn);
    };
    const float mrow[2] = {max_after(my_m * 16 + g), max_after(my_m * 16 + g + 8)};
    float sum[2] = {0.f, 0.f};
#pragma unroll
    for (int nb = 0; nb < 2; ++nb)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const float x0 = s[nb][2 * hr], x1 = s[nb][2 * hr + 1];
        const float e0 = x0 == NEG_INF ? 0.f : exp2f(x0 - mrow[hr]);
        const float e1 = x1 == NEG_INF ? 0.f : exp2f(x1 - mrow[hr]);
        sum[hr] += e0 + e1;
        const int row = my_m * 16 + g + hr * 8, col = tok0 + nb * 8 + 2 * cq;
        *reinterpret_cast<unsigned*>(p_s + row * PP + col) = rf::pack_half2(e0, e1);
      }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      sum[i] += __shfl_xor_sync(0xffffffffu, sum[i], 1);
      sum[i] += __shfl_xor_sync(0xffffffffu, sum[i], 2);
    }
    if (cq == 0) {
      red_sum[slice * ROWS + my_m * 16 + g] = sum[0];
      red_sum[slice * ROWS + my_m * 16 + g + 8] = sum[1];
    }
    if (tid < ROWS) m_new[tid] = max_after(tid);  // read as m_old by tile it + 1, after its barrier (W)
    __syncthreads();  // (C) P and the slices' sums visible
    if (tid < ROWS) {
      float t = 0.f;
#pragma unroll
      for (int j = 0; j < NP; ++j) t += red_sum[j * ROWS + tid];
      l_run[tid] = l_run[tid] * rescale(tid) + t;
    }
    // ---- O = alpha O + P V over this warp's output columns (V: the latent part of the same tile) ----
#pragma unroll
    for (int mm = 0; mm < MT; ++mm) {
      const float a0 = rescale(mm * 16 + g), a1 = rescale(mm * 16 + g + 8);
#pragma unroll
      for (int nb = 0; nb < S::ONB; ++nb) {
        o[mm][nb][0] *= a0;
        o[mm][nb][1] *= a0;
        o[mm][nb][2] *= a1;
        o[mm][nb][3] *= a1;
      }
    }
    const __half* vrow = kt + (lane % 8 + ((lane / 8) % 2) * 8) * PITCH + warp * S::CW + (lane / 16) * 8;
#pragma unroll
    for (int kk = 0; kk < TK; kk += 16) {
      unsigned pa[MT][4];
#pragma unroll
      for (int mm = 0; mm < MT; ++mm) rf::ldmatrix_x4(pa[mm], p_s + (mm * 16 + lane % 16) * PP + kk + (lane / 16) * 8);
#pragma unroll
      for (int nb = 0; nb < S::ONB; nb += 2) {
        unsigned b[4];
        rf::ldmatrix_x4_trans(b, vrow + kk * PITCH + nb * 8);
#pragma unroll
        for (int mm = 0; mm < MT; ++mm) {
          rf::mma_m16n8k16(o[mm][nb], pa[mm], b[0], b[1]);
          rf::mma_m16n8k16(o[mm][nb + 1], pa[mm], b[2], b[3]);
        }
      }
    }
  }
  rf::cp_async_wait<0>();
  __syncthreads();  // l_run and the final maxima visible (also when there was no tile)
  const float* m_fin = m_buf + (num_tiles & 1) * ROWS;

  // ---- epilogue: this warp's columns of every valid row ----
#pragma unroll
  for (int mm = 0; mm < MT; ++mm)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int rloc = mm * 16 + g + hr * 8, gr = row0 + rloc;
      if (gr >= rows_total) continue;
      const float l = l_run[rloc];
      const float inv = l > 0.f ? 1.f / l : 0.f;
      const long long orow = static_cast<long long>(seq) * rows_total + gr;  // (seq, t, h) flattened
#pragma unroll
      for (int nb = 0; nb < S::ONB; ++nb) {
        const int col = warp * S::CW + nb * 8 + 2 * cq;
        const float v0 = o[mm][nb][2 * hr] * inv, v1 = o[mm][nb][2 * hr + 1] * inv;
        if (num_splits == 1) {
          *reinterpret_cast<unsigned*>(out + orow * R + col) = rf::pack_half2(v0, v1);
        } else {
          *reinterpret_cast<unsigned*>(part_out + (orow * num_splits + split) * R + col) = rf::pack_half2(v0, v1);
        }
      }
    }
  if (num_splits > 1 && tid < ROWS && row0 + tid < rows_total) {
    const long long orow = static_cast<long long>(seq) * rows_total + row0 + tid;
    const float l = l_run[tid];
    part_lse[orow * num_splits + split] = l > 0.f ? m_fin[tid] + log2f(l) : NEG_INF;
  }
}

// mla_decode_v3: tensor cores with swizzled (unpadded) shared tiles so that 64 query rows and two 64-token
// stages fit in one CTA (FlashMLA's shape), and with the warps of a row group talking only to each other:
//   * warp (rg, c) of RG = MT / WM row groups x CG column groups owns the WM m16 tiles of row group rg and
//     output columns [c R / CG, (c + 1) R / CG) (fp32 accumulators in registers), and computes the scores of
//     its rows for tokens [c TK / CG, (c + 1) TK / CG) of every tile;
//   * the CG warps of a row group exchange slice maxima and fp16 P through shared memory with a named barrier
//     (bar.sync 1 + rg, 32 CG) twice per tile; one __syncthreads per tile guards the cp.async ring;
//   * every warp of a group derives the same running max (the same fmaxf over the same values), so each
//     keeps its own rescaled partial row sum and the partial sums are added once, after the last tile;
//   * Q and K rows are 16-byte chunks stored at chunk ^ (row & 7): ldmatrix reads and cp.async writes are
//     bank-conflict free without padding (KD / 8 = 72 chunks, a multiple of 8, so a row stays a row).
namespace rf {

template <int R, int DR, int MT, int WM, int CG, int TK, int STAGES> struct MlaV3Shape {
  static constexpr int KD = R + DR;        // halves per Q / K row (no padding: swizzled)
  static constexpr int LCH = R / 8;        // 16-byte chunks of latent per row
  static constexpr int RCH = DR / 8;       // ... of rope key
  static constexpr int ROWS = 16 * MT;     // query rows per CTA
  static constexpr int RG = MT / WM;       // row groups
  static constexpr int WARPS = RG * CG;
  static constexpr int THREADS = 32 * WARPS;
  static constexpr int NS = TK / CG;       // tokens of a tile whose scores one warp computes
  static constexpr int NB = NS / 8;        // ... in n8 blocks
  static constexpr int CW = R / CG;        // output columns per warp
  static constexpr int ONB = CW / 8;       // ... in n8 blocks
  static constexpr int PP = TK + 8;        // halves per P row (16 bytes of padding: conflict-free ldmatrix)
  static constexpr int RPW = TK / WARPS;   // tile rows each warp loads
  static constexpr int SETS = WM * NB >= 4 ? 1 : 2;  // score accumulator sets: >= 4 independent MMA chains
  // bytes: Q [ROWS][KD], STAGES x K [TK][KD], P [ROWS][PP] halves; maxima / sums [CG][ROWS] floats
  static constexpr int SMEM = 2 * (ROWS * KD + STAGES * TK * KD + ROWS * PP) + 4 * CG * ROWS;
  static_assert(KD % 64 == 0, "Q / K rows: whole groups of 8 chunks (the swizzle and the 64-dim S loop)");
  static_assert(LCH % 32 == 0 && RCH <= 32, "loader: latent chunks a multiple of 32, rope chunks <= 32");
  static_assert(MT % WM == 0 && CG >= 2 && CG <= 8, "MT = row groups x WM; 2 to 8 column groups");
  static_assert(NS % 16 == 0 && CW % 64 == 0, "score slices of whole 16 tokens, output slices of 64 columns");
  static_assert(TK % WARPS == 0 && RPW <= 32, "loader: whole rows per warp, one table read per lane");
  static_assert(RG <= 15, "named barriers 1 .. RG");
  static_assert(STAGES >= 2 && STAGES <= 8, "2 to 8 cp.async stages");
};

// bar.sync on barrier `id` (1 ..) for `threads` threads (whole warps): orders shared memory like
// __syncthreads among them.
__device__ __forceinline__ void mla_group_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

}  // namespace rf

template <int R, int DR, int MT, int WM, int CG, int TK, int STAGES>
__global__ void __launch_bounds__(rf::MlaV3Shape<R, DR, MT, WM, CG, TK, STAGES>::THREADS, 1) mla_decode_v3(
    const __half* __restrict__ qa, const __half* __restrict__ qr, const __half* __restrict__ lat,
    const __half* __restrict__ rope, const int* __restrict__ tables, const int* __restrict__ ctx_lens,
    __half* __restrict__ out, __half* __restrict__ part_out, float* __restrict__ part_lse, int q_len,
    int heads, int log2_block, int table_stride, int split_tokens, int num_splits, long long qa_ss,
    long long qa_st, long long qa_sh, long long qr_ss, long long qr_st, long long qr_sh, long long l_sb,
    long long l_st, long long r_sb, long long r_st, float scale_log2) {
  using S = rf::MlaV3Shape<R, DR, MT, WM, CG, TK, STAGES>;
  constexpr int KD = S::KD, ROWS = S::ROWS, PP = S::PP, NS = S::NS, NB = S::NB, CW = S::CW;
  constexpr int ONB = S::ONB, WARPS = S::WARPS, RPW = S::RPW, SETS = S::SETS;
  rf::pdl_launch_dependents();
  rf::pdl_wait();  // q, the cache and the tables may come from the kernels before (launched with pdl=True)
  const float NEG_INF = rf::mla_neg_inf();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __half* q_s = reinterpret_cast<__half*>(smem_raw);      // [ROWS][KD] swizzled
  __half* k_s = q_s + ROWS * KD;                           // [STAGES][TK][KD] swizzled
  __half* p_s = k_s + STAGES * TK * KD;                    // [ROWS][PP]
  float* x_s = reinterpret_cast<float*>(p_s + ROWS * PP);  // [CG][ROWS] slice maxima; at the end: sums

  const int rows_total = q_len * heads;
  const int chunks = (rows_total + ROWS - 1) / ROWS;
  const int seq = blockIdx.x / chunks, chunk = blockIdx.x % chunks, split = blockIdx.y;
  const int tid = threadIdx.x, warp = tid / rf::kWarp, lane = tid % rf::kWarp;
  const int g = lane / 4, cq = lane % 4;
  const int rg = warp / CG, cg = warp % CG;
  const int row0 = chunk * ROWS;
  const int ctx = ctx_lens[seq];
  const int begin = split * split_tokens;
  const int end = min(ctx, begin + split_tokens);
  const int num_tiles = end > begin ? (end - begin + TK - 1) / TK : 0;
  const int* table = tables + static_cast<long long>(seq) * table_stride;
  const int block_mask = (1 << log2_block) - 1;

  // Q of the chunk's rows -> shared (rows past rows_total zero-filled), in the first tile's group
  for (int i = tid; i < ROWS * (KD / 8); i += S::THREADS) {
    const int rr = i / (KD / 8), c = i % (KD / 8), gr = row0 + rr;
    const bool ok = gr < rows_total;
    const int t = ok ? gr / heads : 0, h = ok ? gr % heads : 0;
    const __half* src = c < S::LCH ? qa + seq * qa_ss + t * qa_st + h * qa_sh + c * 8
                                   : qr + seq * qr_ss + t * qr_st + h * qr_sh + (c - S::LCH) * 8;
    rf::cp_async_16(q_s + rr * KD + ((c ^ (rr & 7)) << 3), ok ? src : qa, ok);
  }
  // rows warp, warp + WARPS, ... of the tile: lane i reads the block id of the warp's i-th row
  auto load_tile = [&](int tile, int stage) {
    const int p0 = begin + tile * TK;
    const int pl = p0 + warp + lane * WARPS;
    const int my_blk = lane < RPW && pl < end ? table[pl >> log2_block] : 0;
    __half* dst = k_s + stage * TK * KD;
#pragma unroll
    for (int i = 0; i < RPW; ++i) {
      const int j = warp + i * WARPS, p = p0 + j, sw = j & 7;
      const bool ok = p < end;  // past the range: zero-filled, nothing read
      const long long blk = __shfl_sync(0xffffffffu, my_blk, i);
      const int off = p & block_mask;
      const __half* ls = lat + (blk * l_sb + off * l_st);
      __half* d = dst + j * KD;
#pragma unroll
      for (int k = 0; k < S::LCH / 32; ++k) {
        const int c = lane + 32 * k;
        rf::cp_async_16(d + ((c ^ sw) << 3), ok ? ls + c * 8 : lat, ok);
      }
      if (lane < S::RCH) {
        const int c = S::LCH + lane;
        rf::cp_async_16(d + ((c ^ sw) << 3), ok ? rope + (blk * r_sb + off * r_st) + lane * 8 : rope, ok);
      }
    }
  };

  // per-lane byte offsets inside a group of 8 chunks (128 bytes) of a swizzled row whose row & 7 == lane & 7
  // (true for every ldmatrix row below: their row bases are multiples of 8): chunk 2 j + hi -> (2 j + hi) ^ x
  const int x = lane & 7;
  unsigned off_hi[4], off_mid[4];  // hi = lane / 16 (Q A-fragments, V), hi = (lane / 8) % 2 (K B-fragments)
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    off_hi[j] = static_cast<unsigned>(((2 * j + (lane >> 4)) ^ x) << 4);
    off_mid[j] = static_cast<unsigned>(((2 * j + ((lane >> 3) & 1)) ^ x) << 4);
  }
  const int wrow0 = rg * WM * 16;  // this warp's first row in the CTA
  const unsigned q_base = rf::smem_addr(q_s) + (wrow0 + (lane & 15)) * KD * 2;
  const unsigned p_base = rf::smem_addr(p_s) + ((wrow0 + (lane & 15)) * PP + (lane >> 4) * 8) * 2;
  const unsigned k_rows = (cg * NS + (lane & 7) + (lane >> 4) * 8) * KD * 2;           // S: B rows
  const unsigned v_rows = ((lane & 7) + ((lane >> 3) & 1) * 8) * KD * 2 + cg * CW * 2;  // P V: B rows

  float o[WM][ONB][4];
#pragma unroll
  for (int wm = 0; wm < WM; ++wm)
#pragma unroll
    for (int nb = 0; nb < ONB; ++nb) o[wm][nb][0] = o[wm][nb][1] = o[wm][nb][2] = o[wm][nb][3] = 0.f;
  float m_run[WM][2], l_part[WM][2];  // running max (base 2) of rows g, g + 8; this thread's partial sums
  int last[WM][2];                    // last visible position of those rows (rows past rows_total: any)
#pragma unroll
  for (int wm = 0; wm < WM; ++wm)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      m_run[wm][hr] = NEG_INF;
      l_part[wm][hr] = 0.f;
      last[wm][hr] = ctx - q_len + (row0 + wrow0 + wm * 16 + g + hr * 8) / heads;
    }

#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) {
    if (st < num_tiles) load_tile(st, st);
    rf::cp_async_commit();
  }
  for (int it = 0; it < num_tiles; ++it) {
    rf::cp_async_wait<STAGES - 2>();  // this thread's copies of tile it have landed
    __syncthreads();  // tile it visible to all; every warp is done with tile it - 1 (its stage, P, maxima)
    {
      const int nt = it + STAGES - 1;  // into the stage of tile it - 1
      if (nt < num_tiles) load_tile(nt, nt % STAGES);
      rf::cp_async_commit();
    }
    const unsigned kt = rf::smem_addr(k_s + (it % STAGES) * TK * KD);

    // ---- S = Q K^T: rows of this warp x tokens [cg NS, (cg + 1) NS) of the tile, 64 dims per step ----
    float s[SETS][WM][NB][4];
#pragma unroll
    for (int st = 0; st < SETS; ++st)
#pragma unroll
      for (int wm = 0; wm < WM; ++wm)
#pragma unroll
        for (int nb = 0; nb < NB; ++nb)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[st][wm][nb][e] = 0.f;
#pragma unroll 3
    for (int kb = 0; kb < KD / 64; ++kb) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        unsigned a[WM][4];
#pragma unroll
        for (int wm = 0; wm < WM; ++wm)
          rf::ldmatrix_x4(a[wm], q_base + wm * 16 * KD * 2 + kb * 128 + off_hi[j]);
#pragma unroll
        for (int tb = 0; tb < NS / 16; ++tb) {
          unsigned b[4];
          rf::ldmatrix_x4(b, kt + k_rows + tb * 16 * KD * 2 + kb * 128 + off_mid[j]);
#pragma unroll
          for (int wm = 0; wm < WM; ++wm) {
            rf::mma_m16n8k16(s[j % SETS][wm][2 * tb], a[wm], b[0], b[1]);
            rf::mma_m16n8k16(s[j % SETS][wm][2 * tb + 1], a[wm], b[2], b[3]);
          }
        }
      }
    }
    // scale, mask (past the range / causal among the new tokens), per-row maxima of the slice
    const int p0 = begin + it * TK + cg * NS;
    float mx[WM][2];
#pragma unroll
    for (int wm = 0; wm < WM; ++wm) {
      mx[wm][0] = mx[wm][1] = NEG_INF;
#pragma unroll
      for (int nb = 0; nb < NB; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float v = s[0][wm][nb][e];
#pragma unroll
          for (int st = 1; st < SETS; ++st) v += s[st][wm][nb][e];
          const int p = p0 + nb * 8 + 2 * cq + (e & 1);
          const bool vis = p < end && p <= last[wm][e >> 1];
          s[0][wm][nb][e] = vis ? v * scale_log2 : NEG_INF;
          mx[wm][e >> 1] = fmaxf(mx[wm][e >> 1], s[0][wm][nb][e]);
        }
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        mx[wm][hr] = fmaxf(mx[wm][hr], __shfl_xor_sync(0xffffffffu, mx[wm][hr], 1));
        mx[wm][hr] = fmaxf(mx[wm][hr], __shfl_xor_sync(0xffffffffu, mx[wm][hr], 2));
        if (cq == 0) x_s[cg * ROWS + wrow0 + wm * 16 + g + hr * 8] = mx[wm][hr];
      }
    }
    rf::mla_group_sync(1 + rg, 32 * CG);  // (X1) the group's slice maxima visible
    float alpha[WM][2];
#pragma unroll
    for (int wm = 0; wm < WM; ++wm)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int row = wrow0 + wm * 16 + g + hr * 8;
        float mn = m_run[wm][hr];
#pragma unroll
        for (int j = 0; j < CG; ++j) mn = fmaxf(mn, x_s[j * ROWS + row]);  // same order in every warp
        alpha[wm][hr] = mn == NEG_INF ? 1.f : exp2f(m_run[wm][hr] - mn);
        m_run[wm][hr] = mn;
      }
    // P = 2^(x - m) of the slice -> fp16 in shared memory; this thread's partial sums
#pragma unroll
    for (int wm = 0; wm < WM; ++wm)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        float sum = 0.f;
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) {
          const float x0 = s[0][wm][nb][2 * hr], x1 = s[0][wm][nb][2 * hr + 1];
          const float e0 = x0 == NEG_INF ? 0.f : exp2f(x0 - m_run[wm][hr]);
          const float e1 = x1 == NEG_INF ? 0.f : exp2f(x1 - m_run[wm][hr]);
          sum += e0 + e1;
          const int row = wrow0 + wm * 16 + g + hr * 8, col = cg * NS + nb * 8 + 2 * cq;
          *reinterpret_cast<unsigned*>(p_s + row * PP + col) = rf::pack_half2(e0, e1);
        }
        l_part[wm][hr] = l_part[wm][hr] * alpha[wm][hr] + sum;
      }
    rf::mla_group_sync(1 + rg, 32 * CG);  // (X2) the group's P visible
    // ---- O = alpha O + P V over this warp's columns (V: the latent part of the same tile) ----
#pragma unroll
    for (int wm = 0; wm < WM; ++wm)
#pragma unroll
      for (int nb = 0; nb < ONB; ++nb) {
        o[wm][nb][0] *= alpha[wm][0];
        o[wm][nb][1] *= alpha[wm][0];
        o[wm][nb][2] *= alpha[wm][1];
        o[wm][nb][3] *= alpha[wm][1];
      }
#pragma unroll
    for (int kk = 0; kk < TK / 16; ++kk) {
      unsigned pa[WM][4];
#pragma unroll
      for (int wm = 0; wm < WM; ++wm) rf::ldmatrix_x4(pa[wm], p_base + (wm * 16 * PP + kk * 16) * 2);
#pragma unroll
      for (int nb = 0; nb < ONB; nb += 2) {
        unsigned b[4];  // tokens kk*16 .. +15 x columns cg*CW + nb*8 .. +15, transposed: two n8 B fragments
        rf::ldmatrix_x4_trans(b, kt + v_rows + kk * 16 * KD * 2 + (nb / 8) * 128 + off_hi[(nb % 8) / 2]);
#pragma unroll
        for (int wm = 0; wm < WM; ++wm) {
          rf::mma_m16n8k16(o[wm][nb], pa[wm], b[0], b[1]);
          rf::mma_m16n8k16(o[wm][nb + 1], pa[wm], b[2], b[3]);
        }
      }
    }
  }
  rf::cp_async_wait<0>();
  __syncthreads();  // every warp is past its last read of x_s: it now collects the partial sums
  float l_row[WM][2];
#pragma unroll
  for (int wm = 0; wm < WM; ++wm)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float l = l_part[wm][hr];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      if (cq == 0) x_s[cg * ROWS + wrow0 + wm * 16 + g + hr * 8] = l;
    }
  __syncthreads();
#pragma unroll
  for (int wm = 0; wm < WM; ++wm)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float l = 0.f;
#pragma unroll
      for (int j = 0; j < CG; ++j) l += x_s[j * ROWS + wrow0 + wm * 16 + g + hr * 8];
      l_row[wm][hr] = l;
    }

  // ---- epilogue: this warp's columns of its valid rows; normalised by the row's own sum ----
#pragma unroll
  for (int wm = 0; wm < WM; ++wm)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int gr = row0 + wrow0 + wm * 16 + g + hr * 8;
      if (gr >= rows_total) continue;
      const float l = l_row[wm][hr];
      const float inv = l > 0.f ? 1.f / l : 0.f;
      const long long orow = static_cast<long long>(seq) * rows_total + gr;  // (seq, t, h) flattened
      __half* dst = num_splits == 1 ? out + orow * R : part_out + (orow * num_splits + split) * R;
#pragma unroll
      for (int nb = 0; nb < ONB; ++nb) {
        const int col = cg * CW + nb * 8 + 2 * cq;
        const float v0 = o[wm][nb][2 * hr] * inv, v1 = o[wm][nb][2 * hr + 1] * inv;
        *reinterpret_cast<unsigned*>(dst + col) = rf::pack_half2(v0, v1);
      }
      if (num_splits > 1 && cg == 0 && cq == 0) {
        part_lse[orow * num_splits + split] = l > 0.f ? m_run[wm][hr] + log2f(l) : NEG_INF;
      }
    }
}

// One CTA per (seq, token, head) row: out = sum_i 2^(lse_i - L) out_i / sum_i 2^(lse_i - L), L = max lse_i.
namespace rf {


template <int R, int THREADS, typename P>
__device__ __forceinline__ void mla_combine_row(const P* __restrict__ part_out, const float* __restrict__ part_lse,
                                                __half* __restrict__ out, int num_splits, float* w_s) {
  rf::pdl_launch_dependents();
  rf::pdl_wait();  // the partials come from the kernel before (launched with pdl=True)
  const float NEG_INF = rf::mla_neg_inf();
  __shared__ float scratch[THREADS / rf::kWarp];
  const long long row = blockIdx.x;
  const float* lse = part_lse + row * num_splits;
  float mx = NEG_INF;
  for (int i = threadIdx.x; i < num_splits; i += THREADS) mx = fmaxf(mx, lse[i]);
  mx = rf::block_reduce<THREADS>(mx, rf::Max{}, scratch);
  float sum = 0.f;
  for (int i = threadIdx.x; i < num_splits; i += THREADS) {
    const float w = lse[i] == NEG_INF ? 0.f : exp2f(lse[i] - mx);
    w_s[i] = w;
    sum += w;
  }
  sum = rf::block_reduce<THREADS>(sum, rf::Sum{}, scratch);  // ends with a barrier: w_s visible
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  for (int c = threadIdx.x; c < R; c += THREADS) {
    float acc = 0.f;
    for (int i = 0; i < num_splits; ++i) acc += w_s[i] * to_acc(part_out[(row * num_splits + i) * R + c]);
    out[row * R + c] = __float2half_rn(acc * inv);
  }
}

}  // namespace rf

template <int R, int THREADS>
__global__ void __launch_bounds__(THREADS) mla_decode_combine(const float* __restrict__ part_out,
                                                              const float* __restrict__ part_lse,
                                                              __half* __restrict__ out, int num_splits) {
  extern __shared__ float w_s[];  // [num_splits]
  rf::mla_combine_row<R, THREADS>(part_out, part_lse, out, num_splits, w_s);
}

template <int R, int THREADS>
__global__ void __launch_bounds__(THREADS) mla_decode_combine_h(const __half* __restrict__ part_out,
                                                                const float* __restrict__ part_lse,
                                                                __half* __restrict__ out, int num_splits) {
  extern __shared__ float w_s[];  // [num_splits]
  rf::mla_combine_row<R, THREADS>(part_out, part_lse, out, num_splits, w_s);
}
