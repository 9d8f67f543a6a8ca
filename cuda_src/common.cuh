// common.cuh: what every rawformer kernel family shares.
//
//   - float conversion for the storage types (__half, float, double); all arithmetic is done in float
//     (double for double inputs) whatever the storage type
//   - Vec<T, N>: N elements loaded or stored as one aligned access (16 bytes when N * sizeof(T) == 16)
//   - warp_reduce / block_reduce: butterfly reductions over cooperative-groups tiles (shfl_xor), then
//     across warps through shared memory; every thread receives the result
//   - ceil_div
//
// Compiled by NVRTC at run time (through CuPy) and by nvcc in the CI compile check, so it includes only
// CUDA headers that NVRTC ships.
#pragma once

#include <cooperative_groups.h>
#include <cuda_fp16.h>

namespace cg = cooperative_groups;

namespace rf {

constexpr int kWarp = 32;

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// ---- storage <-> compute types -------------------------------------------------------------------------
template <typename T> struct Acc { using type = float; };  // the type a T is computed in
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename T> __device__ __forceinline__ T from_acc(float v);
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <typename T> __device__ __forceinline__ T from_acc(double v);
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }

// ---- vector access -------------------------------------------------------------------------------------
template <typename T, int N> struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N> __device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <typename T, int N> __device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& x) {
  *reinterpret_cast<Vec<T, N>*>(p) = x;
}

// ---- reductions ----------------------------------------------------------------------------------------
struct Sum {
  template <typename A> __device__ __forceinline__ A operator()(A a, A b) const { return a + b; }
};
struct Max {
  // fmax ignores a NaN operand; a NaN in a softmax row still reaches the output through the sum of exps.
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
  __device__ __forceinline__ double operator()(double a, double b) const { return fmax(a, b); }
};

// Butterfly reduction over a tile of WIDTH lanes; every lane gets the result.
template <int WIDTH = kWarp, typename A, typename Op>
__device__ __forceinline__ A warp_reduce(A v, Op op) {
  const cg::thread_block_tile<WIDTH> tile = cg::tiled_partition<WIDTH>(cg::this_thread_block());
#pragma unroll
  for (int offset = WIDTH / 2; offset > 0; offset >>= 1) v = op(v, tile.shfl_xor(v, offset));
  return v;
}

// Reduction over a whole block of THREADS threads (a power of two, at least 32); every thread gets the
// result. `scratch` holds at least THREADS / 32 values; it may be reused once the call returns (the
// trailing sync protects it).
template <int THREADS, typename A, typename Op>
__device__ __forceinline__ A block_reduce(A v, Op op, A* scratch) {
  static_assert(THREADS >= kWarp && (THREADS & (THREADS - 1)) == 0, "block size: a power of two >= 32");
  constexpr int kWarps = THREADS / kWarp;
  v = warp_reduce(v, op);
  if constexpr (kWarps == 1) {
    return v;
  } else {
    const cg::thread_block block = cg::this_thread_block();
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
    if (lane == 0) scratch[warp] = v;
    block.sync();
    // Every warp reduces the kWarps partials in its first kWarps lanes, then lane 0 broadcasts.
    A r = scratch[lane % kWarps];
    r = warp_reduce<kWarps>(r, op);
    r = cg::tiled_partition<kWarp>(block).shfl(r, 0);
    block.sync();
    return r;
  }
}

}  // namespace rf
