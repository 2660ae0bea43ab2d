// Launch interface of the LayerNorm kernels: plain pointers and a stream, no torch types, so
// layer_norm_kernels.cu compiles on its own (the register-spill test compiles it with `nvcc -Xptxas -v`).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace deit_fast {

enum class DType { kFloat32, kFloat16, kBFloat16 };

struct LayerNormFwdParams {
  const void* x;         // (rows, D), dtype
  const void* residual;  // (rows, D), dtype, or nullptr
  const float* weight;   // (D,) or nullptr (= 1)
  const float* bias;     // (D,) or nullptr (= 0)
  void* y;               // (rows, D), dtype: layer_norm(x + residual)
  void* sum;             // (rows, D), dtype: x + residual; written only when residual != nullptr
  float* mean;           // (rows,)
  float* rstd;           // (rows,)
  int64_t rows;
  int D;
  float eps;
  int vec;  // elements per vector load: 16 / sizeof(dtype) when D and every pointer allow it, else 1
};

struct LayerNormBwdParams {
  const void* dy;          // (rows, D), dtype: gradient of y
  const void* dsum;        // (rows, D), dtype: gradient of the sum output, or nullptr
  const void* s;           // (rows, D), dtype: the normalized input (x, or x + residual)
  const float* weight;     // (D,) or nullptr
  const float* mean;       // (rows,)
  const float* rstd;       // (rows,)
  void* ds;                // (rows, D), dtype: gradient of s
  float* dweight_partial;  // (grid, D): per-block partial sums of dy * xhat
  float* dbias_partial;    // (grid, D): per-block partial sums of dy
  int64_t rows;
  int D;
  int vec;
  int grid;  // number of blocks; each loops over row groups
};

// Largest D the kernels take; wider rows go to another backend.
constexpr int kLayerNormMaxD = 8192;

// Return cudaSuccess, or the launch error (cudaErrorInvalidValue when D has no kernel shape).
cudaError_t launch_layer_norm_fwd(const LayerNormFwdParams& p, DType dtype, cudaStream_t stream);
cudaError_t launch_layer_norm_bwd(const LayerNormBwdParams& p, DType dtype, cudaStream_t stream);
// Row groups handled by one block in the backward (for sizing the grid).
int layer_norm_bwd_rows_per_block(int D, int vec, DType dtype);

}  // namespace deit_fast
