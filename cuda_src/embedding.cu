// embedding.cu: embedding lookup (row gather) and its deterministic backward (segmented row sums).
//
// Memory layout: weight [V, H] with row stride w_stride (elements; last dim contiguous); ids int64 [P]
// (the flattened ids); out C-contiguous [P, H]. Backward: dout C-contiguous [P, H] (fp16 / fp32); the
// launcher sorts the keys id * P + position (unique, so the order is unique) into sorted_ids / sorted_pos
// [P] and the segment boundaries bounds [S + 1] (runs of equal ids); dweight float32 C-contiguous [V, H].
//
//   out[p, :]  = weight[ids[p], :]                (NaN row when ids[p] is outside [0, V))
//   dW[v, :]  += sum_{p in segment of v} dout[p, :]   (in position order, fp32; out-of-range ids dropped)
//
// Versions:
//   embedding_forward_v1<T, THREADS>   one block per position; 16-byte vectors when the row pointers are
//                                      16-byte aligned and H is a multiple of 16 / sizeof(T), else scalar.
//   embedding_backward_v1<T, THREADS>  grid (segments, ceil(H / THREADS)); each thread owns one column of one
//                                      output row and adds that segment's dout rows in order, 4 loads in
//                                      flight: every dW element has exactly one writer, so the result is
//                                      bit-identical from run to run with no atomics. A frequent id (e.g.
//                                      padding) serialises its segment on one block: correct, slower.
#include "common.cuh"

template <typename T, int THREADS>
__global__ void __launch_bounds__(THREADS)
    embedding_forward_v1(const T* __restrict__ weight, const long long* __restrict__ ids, T* __restrict__ out,
                         int positions, int hidden, long long w_stride, long long num) {
  constexpr int VW = 16 / sizeof(T);
  using V = rf::Vec<T, VW>;
  const int p = blockIdx.x;
  const long long id = ids[p];
  T* orow = out + static_cast<long long>(p) * hidden;
  if (id < 0 || id >= num) {  // no host check on the GPU: make the bad row impossible to miss
    for (int j = threadIdx.x; j < hidden; j += THREADS) orow[j] = rf::from_acc<T>(NAN);
    return;
  }
  const T* wrow = weight + id * w_stride;
  const bool vec = hidden % VW == 0 && reinterpret_cast<unsigned long long>(wrow) % 16 == 0 &&
                   reinterpret_cast<unsigned long long>(orow) % 16 == 0;
  if (vec) {
    const V* src = reinterpret_cast<const V*>(wrow);
    V* dst = reinterpret_cast<V*>(orow);
    for (int j = threadIdx.x; j < hidden / VW; j += THREADS) dst[j] = src[j];
  } else {
    for (int j = threadIdx.x; j < hidden; j += THREADS) orow[j] = wrow[j];
  }
}

template <typename T, int THREADS>
__global__ void __launch_bounds__(THREADS)
    embedding_backward_v1(const T* __restrict__ dout, const long long* __restrict__ sorted_ids,
                          const long long* __restrict__ sorted_pos, const long long* __restrict__ bounds,
                          float* __restrict__ dweight, int segments, int hidden, long long num) {
  const int seg = blockIdx.x;
  const int col = blockIdx.y * THREADS + threadIdx.x;
  const long long begin = bounds[seg], end = bounds[seg + 1];
  const long long id = sorted_ids[begin];
  if (col >= hidden || id < 0 || id >= num) return;
  float acc = 0.0f;
  long long i = begin;
  for (; i + 4 <= end; i += 4) {  // 4 independent loads in flight, added in position order
    float v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) v[u] = rf::to_acc(dout[sorted_pos[i + u] * hidden + col]);
#pragma unroll
    for (int u = 0; u < 4; ++u) acc += v[u];
  }
  for (; i < end; ++i) acc += rf::to_acc(dout[sorted_pos[i] * hidden + col]);
  dweight[id * hidden + col] += acc;
}
