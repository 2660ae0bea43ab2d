// Host build of the LayerNorm kernels' math (csrc/layer_norm/layer_norm_math.cuh): the same per-element and
// per-row-statistic functions, looped over rows the way each CUDA row group computes them (two passes for the
// statistics). tests/test_extension.py compiles this with g++ and compares it with the PyTorch reference.
#include "layer_norm/layer_norm_math.cuh"

using namespace deit_fast;

extern "C" void layer_norm_fwd_host(const float* x, const float* w, const float* b, float* y, float* mean,
                                    float* rstd, int rows, int D, float eps) {
  for (int r = 0; r < rows; ++r) {
    const float* xr = x + static_cast<long>(r) * D;
    float sum = 0.f;
    for (int c = 0; c < D; ++c) sum += xr[c];
    const float m = ln::row_mean(sum, D);
    float sq = 0.f;
    for (int c = 0; c < D; ++c) sq += (xr[c] - m) * (xr[c] - m);
    const float rs = ln::row_rstd(sq, D, eps);
    for (int c = 0; c < D; ++c) y[static_cast<long>(r) * D + c] = ln::affine(ln::normalize(xr[c], m, rs), w[c], b[c]);
    mean[r] = m;
    rstd[r] = rs;
  }
}

extern "C" void layer_norm_bwd_host(const float* dy, const float* s, const float* w, const float* mean,
                                    const float* rstd, float* ds, float* dw, float* db, int rows, int D) {
  for (int c = 0; c < D; ++c) dw[c] = db[c] = 0.f;
  for (int r = 0; r < rows; ++r) {
    const long base = static_cast<long>(r) * D;
    float c1 = 0.f, c2 = 0.f;
    for (int c = 0; c < D; ++c) {
      const float xhat = ln::normalize(s[base + c], mean[r], rstd[r]);
      const float g = dy[base + c] * w[c];
      c1 += xhat * g;
      c2 += g;
      dw[c] += dy[base + c] * xhat;
      db[c] += dy[base + c];
    }
    c1 /= D;
    c2 /= D;
    for (int c = 0; c < D; ++c) {
      const float xhat = ln::normalize(s[base + c], mean[r], rstd[r]);
      ds[base + c] = ln::input_grad(dy[base + c] * w[c], xhat, c1, c2, rstd[r]);
    }
  }
}
