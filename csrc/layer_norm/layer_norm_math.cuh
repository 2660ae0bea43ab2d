// LayerNorm's per-element math, shared by the CUDA kernels (layer_norm_kernels.cu) and the host build that the
// tests compile with g++ (tests/host/layer_norm_host.cpp), so the formulas are checked on a machine without a GPU.
//
// Forward, per row of D values s:  mean = sum(s) / D,  var = sum((s - mean)^2) / D  (two passes over registers,
// more accurate than Welford for rows that fit in registers),  rstd = 1 / sqrt(var + eps),
// xhat = (s - mean) * rstd,  y = xhat * w + b.
// Backward, with g = dy * w:  c1 = sum(xhat * g) / D,  c2 = sum(g) / D,  ds = (g - (xhat * c1 + c2)) * rstd,
// dw = sum over rows of dy * xhat,  db = sum over rows of dy.
#pragma once

#include <cmath>

#include "common.cuh"

namespace deit_fast {
namespace ln {

DF_HD float inv_sqrt(float v) {
#if defined(__CUDA_ARCH__)
  return rsqrtf(v);
#else
  return 1.0f / std::sqrt(v);
#endif
}

DF_HD float row_mean(float sum, int D) { return sum / static_cast<float>(D); }

DF_HD float row_rstd(float centered_square_sum, int D, float eps) {
  return inv_sqrt(centered_square_sum / static_cast<float>(D) + eps);
}

DF_HD float normalize(float s, float mean, float rstd) { return (s - mean) * rstd; }

DF_HD float affine(float xhat, float w, float b) { return xhat * w + b; }

DF_HD float input_grad(float g, float xhat, float c1, float c2, float rstd) { return (g - (xhat * c1 + c2)) * rstd; }

}  // namespace ln
}  // namespace deit_fast
