// LayerNorm and add+LayerNorm, forward and backward, as CUDA kernels.
//
// Layout: rows of D contiguous elements. TPR threads own one row (TPR = 32: a warp per row, 8 rows per 256-thread
// block; TPR = 256: a block per row for wide rows). Each thread holds ITERS vectors of VEC elements in registers
// (VEC = 16 bytes / sizeof(dtype) when D and every pointer allow 16-byte accesses, else 1), so every input element is
// read from global memory exactly once per pass: the forward reads x (+ residual) and writes y (+ the sum), i.e. the
// minimum of 2 (or 4) tensor passes; the backward reads dy and s (+ dsum) and writes ds, plus a (grid, D) partial
// for dweight/dbias that the host sums in a second, deterministic pass (no atomics).
// The shapes are chosen so the DeiT widths in bf16/fp16 fit exactly: D = 768 -> 96 vectors of 8 = 32 lanes x 3.
#include <type_traits>

#include "../cuda_utils.cuh"
#include "layer_norm.h"
#include "layer_norm_math.cuh"

namespace deit_fast {
namespace {

constexpr int kThreads = 256;

using Shapes16Bit = RowShapeList<RowShape<32, 1>, RowShape<32, 2>, RowShape<32, 3>, RowShape<32, 4>, RowShape<256, 1>,
                                 RowShape<256, 2>, RowShape<256, 4>>;
using ShapesFloat32 = RowShapeList<RowShape<32, 2>, RowShape<32, 3>, RowShape<32, 4>, RowShape<32, 6>, RowShape<32, 8>,
                                   RowShape<256, 4>, RowShape<256, 8>>;
using ShapesScalar = RowShapeList<RowShape<32, 8>, RowShape<256, 4>, RowShape<256, 32>>;

template <typename T, int VEC, int TPR, int ITERS>
__global__ void __launch_bounds__(kThreads) layer_norm_fwd_kernel(LayerNormFwdParams p) {
  using V = Vec<T, VEC>;
  using W = Vec<float, VEC>;
  constexpr int kRowsPerBlock = kThreads / TPR;
  __shared__ float scratch[kThreads / 32];

  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / TPR;
  const int lane = threadIdx.x % TPR;
  const int n_vec = p.D / VEC;
  // Rows past the end still take part in the shuffles (with zeros) and skip every memory access.
  const bool row_ok = row < p.rows;
  const int64_t base = row * n_vec;

  float v[ITERS][VEC];
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const int c = lane + i * TPR;
    if (row_ok && c < n_vec) {
      V xv = reinterpret_cast<const V*>(p.x)[base + c];
      if (p.residual != nullptr) {
        const V rv = reinterpret_cast<const V*>(p.residual)[base + c];
        // Round the sum to the dtype before normalizing it: the op equals layer_norm(x + residual) exactly.
#pragma unroll
        for (int k = 0; k < VEC; ++k) xv.v[k] = from_float<T>(to_float(xv.v[k]) + to_float(rv.v[k]));
        reinterpret_cast<V*>(p.sum)[base + c] = xv;
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[i][k] = to_float(xv.v[k]);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[i][k] = 0.f;
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) sum += v[i][k];
  }
  const float mean = ln::row_mean(row_allreduce_sum<TPR>(sum, scratch), p.D);

  float square_sum = 0.f;
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    if (lane + i * TPR < n_vec) {  // padding lanes hold 0, which must not count as (0 - mean)^2
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float d = v[i][k] - mean;
        square_sum += d * d;
      }
    }
  }
  const float rstd = ln::row_rstd(row_allreduce_sum<TPR>(square_sum, scratch), p.D, p.eps);

  if (!row_ok) return;
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const int c = lane + i * TPR;
    if (c < n_vec) {
      W wv, bv;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        wv.v[k] = 1.f;
        bv.v[k] = 0.f;
      }
      if (p.weight != nullptr) wv = reinterpret_cast<const W*>(p.weight)[c];
      if (p.bias != nullptr) bv = reinterpret_cast<const W*>(p.bias)[c];
      V yv;
#pragma unroll
      for (int k = 0; k < VEC; ++k) yv.v[k] = from_float<T>(ln::affine(ln::normalize(v[i][k], mean, rstd), wv.v[k], bv.v[k]));
      reinterpret_cast<V*>(p.y)[base + c] = yv;
    }
  }
  if (lane == 0) {
    p.mean[row] = mean;
    p.rstd[row] = rstd;
  }
}

template <typename T, int VEC, int TPR, int ITERS>
__global__ void __launch_bounds__(kThreads) layer_norm_bwd_kernel(LayerNormBwdParams p) {
  using V = Vec<T, VEC>;
  using W = Vec<float, VEC>;
  constexpr int kRowsPerBlock = kThreads / TPR;
  __shared__ float scratch[kThreads / 32];
  extern __shared__ float column_sums[];  // 2 * D floats when kRowsPerBlock > 1

  const int slot = threadIdx.x / TPR;
  const int lane = threadIdx.x % TPR;
  const int n_vec = p.D / VEC;
  const int64_t row_groups = (p.rows + kRowsPerBlock - 1) / kRowsPerBlock;

  float w[ITERS][VEC], dw[ITERS][VEC], db[ITERS][VEC];
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const int c = lane + i * TPR;
    W wv;
#pragma unroll
    for (int k = 0; k < VEC; ++k) wv.v[k] = 1.f;
    if (p.weight != nullptr && c < n_vec) wv = reinterpret_cast<const W*>(p.weight)[c];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      w[i][k] = wv.v[k];
      dw[i][k] = 0.f;
      db[i][k] = 0.f;
    }
  }

  // Every thread of the block runs the same number of iterations, so the block-wide reductions stay in step.
  for (int64_t group = blockIdx.x; group < row_groups; group += gridDim.x) {
    const int64_t row = group * kRowsPerBlock + slot;
    const bool row_ok = row < p.rows;
    const int64_t base = row * n_vec;
    const float mean = row_ok ? p.mean[row] : 0.f;
    const float rstd = row_ok ? p.rstd[row] : 0.f;

    float xhat[ITERS][VEC], g[ITERS][VEC];
    float c1 = 0.f, c2 = 0.f;
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int c = lane + i * TPR;
      const bool ok = row_ok && c < n_vec;
      V sv, dyv;
      if (ok) {
        sv = reinterpret_cast<const V*>(p.s)[base + c];
        dyv = reinterpret_cast<const V*>(p.dy)[base + c];
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float dy = ok ? to_float(dyv.v[k]) : 0.f;
        xhat[i][k] = ok ? ln::normalize(to_float(sv.v[k]), mean, rstd) : 0.f;
        g[i][k] = dy * w[i][k];
        c1 += xhat[i][k] * g[i][k];
        c2 += g[i][k];
        dw[i][k] += dy * xhat[i][k];
        db[i][k] += dy;
      }
    }
    c1 = row_allreduce_sum<TPR>(c1, scratch) / static_cast<float>(p.D);
    c2 = row_allreduce_sum<TPR>(c2, scratch) / static_cast<float>(p.D);

    if (row_ok) {
#pragma unroll
      for (int i = 0; i < ITERS; ++i) {
        const int c = lane + i * TPR;
        if (c < n_vec) {
          V dsum;
          if (p.dsum != nullptr) dsum = reinterpret_cast<const V*>(p.dsum)[base + c];
          V out;
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            float d = ln::input_grad(g[i][k], xhat[i][k], c1, c2, rstd);
            if (p.dsum != nullptr) d += to_float(dsum.v[k]);
            out.v[k] = from_float<T>(d);
          }
          reinterpret_cast<V*>(p.ds)[base + c] = out;
        }
      }
    }
  }

  // Per-block column sums of dweight and dbias. With several rows per block the row slots are added in slot order
  // through shared memory (fixed order: deterministic).
  float* dw_out = p.dweight_partial + static_cast<int64_t>(blockIdx.x) * p.D;
  float* db_out = p.dbias_partial + static_cast<int64_t>(blockIdx.x) * p.D;
  if constexpr (kRowsPerBlock == 1) {
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int c = lane + i * TPR;
      if (c < n_vec) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          dw_out[c * VEC + k] = dw[i][k];
          db_out[c * VEC + k] = db[i][k];
        }
      }
    }
  } else {
    float* dw_smem = column_sums;
    float* db_smem = column_sums + p.D;
    for (int e = threadIdx.x; e < p.D; e += kThreads) {
      dw_smem[e] = 0.f;
      db_smem[e] = 0.f;
    }
    __syncthreads();
    for (int s = 0; s < kRowsPerBlock; ++s) {
      if (slot == s) {
#pragma unroll
        for (int i = 0; i < ITERS; ++i) {
          const int c = lane + i * TPR;
          if (c < n_vec) {
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
              dw_smem[c * VEC + k] += dw[i][k];
              db_smem[c * VEC + k] += db[i][k];
            }
          }
        }
      }
      __syncthreads();
    }
    for (int e = threadIdx.x; e < p.D; e += kThreads) {
      dw_out[e] = dw_smem[e];
      db_out[e] = db_smem[e];
    }
  }
}

// Call f(T{}, VecConstant, Shape{}) for the kernel shape that fits this dtype, vector width and D.
template <typename T, typename F>
bool dispatch_shape(int D, int vec, F&& f) {
  constexpr int kVec = 16 / sizeof(T);
  if (vec == kVec) {
    const int n = D / kVec;
    if constexpr (sizeof(T) == 4) {
      return pick_shape(ShapesFloat32{}, n, [&](auto shape) { f(std::integral_constant<int, kVec>{}, shape); });
    } else {
      return pick_shape(Shapes16Bit{}, n, [&](auto shape) { f(std::integral_constant<int, kVec>{}, shape); });
    }
  }
  if (vec == 1) return pick_shape(ShapesScalar{}, D, [&](auto shape) { f(std::integral_constant<int, 1>{}, shape); });
  return false;
}

template <typename F>
bool dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(float{});
    case DType::kFloat16:
      return f(__half{});
    case DType::kBFloat16:
      return f(__nv_bfloat16{});
  }
  return false;
}

}  // namespace

cudaError_t launch_layer_norm_fwd(const LayerNormFwdParams& p, DType dtype, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  const bool ok = dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    return dispatch_shape<T>(p.D, p.vec, [&](auto vec, auto shape) {
      using S = decltype(shape);
      constexpr int kRowsPerBlock = kThreads / S::kThreadsPerRow;
      const int64_t blocks = (p.rows + kRowsPerBlock - 1) / kRowsPerBlock;
      layer_norm_fwd_kernel<T, decltype(vec)::value, S::kThreadsPerRow, S::kIters>
          <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
    });
  });
  return ok ? cudaGetLastError() : cudaErrorInvalidValue;
}

int layer_norm_bwd_rows_per_block(int D, int vec, DType dtype) {
  int rows_per_block = 0;
  dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    return dispatch_shape<T>(D, vec, [&](auto, auto shape) {
      rows_per_block = kThreads / decltype(shape)::kThreadsPerRow;
    });
  });
  return rows_per_block;
}

cudaError_t launch_layer_norm_bwd(const LayerNormBwdParams& p, DType dtype, cudaStream_t stream) {
  const bool ok = dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    return dispatch_shape<T>(p.D, p.vec, [&](auto vec, auto shape) {
      using S = decltype(shape);
      constexpr int kRowsPerBlock = kThreads / S::kThreadsPerRow;
      const size_t smem = kRowsPerBlock > 1 ? 2 * sizeof(float) * p.D : 0;
      layer_norm_bwd_kernel<T, decltype(vec)::value, S::kThreadsPerRow, S::kIters>
          <<<p.grid, kThreads, smem, stream>>>(p);
    });
  });
  return ok ? cudaGetLastError() : cudaErrorInvalidValue;
}

}  // namespace deit_fast
