// Device-only helpers: dtype conversion, aligned vectors, reductions across the threads of a row.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace deit_fast {

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// N elements loaded or stored with one instruction (16 bytes when sizeof(T) * N == 16).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Sum of `v` over the TPR consecutive threads that share a row; every one of them gets the total.
// TPR <= 32: butterfly shuffles inside the warp (all 32 lanes must call it, rows never straddle warps).
// TPR > 32: one row per block; warps meet in `scratch` (TPR / 32 floats). Summation order is fixed: deterministic.
template <int TPR>
__device__ __forceinline__ float row_allreduce_sum(float v, float* scratch) {
  constexpr int kWarpWidth = TPR < 32 ? TPR : 32;
#pragma unroll
  for (int offset = kWarpWidth / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if constexpr (TPR > 32) {
    const int warp = threadIdx.x / 32;
    __syncthreads();  // the previous call's readers are done with scratch
    if (threadIdx.x % 32 == 0) scratch[warp] = v;
    __syncthreads();
    v = 0.f;
#pragma unroll
    for (int w = 0; w < TPR / 32; ++w) v += scratch[w];
  }
  return v;
}

// A compile-time list of (threads per row, vectors per thread) shapes; `pick_shape` calls f with the first shape
// whose capacity TPR * ITERS holds n vectors, and returns false when none does.
template <int TPR_, int ITERS_>
struct RowShape {
  static constexpr int kThreadsPerRow = TPR_;
  static constexpr int kIters = ITERS_;
};
template <typename... Shapes>
struct RowShapeList {};

template <typename F, typename... Shapes>
bool pick_shape(RowShapeList<Shapes...>, int n, F&& f) {
  return ((n <= Shapes::kThreadsPerRow * Shapes::kIters ? (f(Shapes{}), true) : false) || ...);
}

}  // namespace deit_fast
