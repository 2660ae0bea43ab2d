// Torch glue for the LayerNorm kernels: argument checks, output allocation, and registration of
// deit_fast_cuda::layer_norm_fwd / layer_norm_bwd for CUDA tensors. deit_fast/ops/fused_layer_norm.py wraps these in the
// public custom ops (fake tensors, autograd) and chooses between them and the Triton kernels.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "layer_norm.h"

namespace deit_fast {
namespace {

DType to_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "deit_fast layer_norm: ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

void check_rows(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == x.device(), "deit_fast layer_norm: ", name, " must be on ", x.device(),
              ", got ", t.device());
  TORCH_CHECK(t.sizes() == x.sizes(), "deit_fast layer_norm: ", name, " must have shape ", x.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "deit_fast layer_norm: ", name, " must have dtype ",
              x.scalar_type(), ", got ", t.scalar_type());
}

// Weights go to the kernels as contiguous float32, 32-byte aligned (the widest vector load of them).
at::Tensor affine_param(const c10::optional<at::Tensor>& p, int64_t D, const at::Tensor& x, const char* name) {
  if (!p.has_value()) return at::Tensor();
  TORCH_CHECK(p->device() == x.device(), "deit_fast layer_norm: ", name, " must be on ", x.device());
  TORCH_CHECK(p->dim() == 1 && p->size(0) == D, "deit_fast layer_norm: ", name, " must have shape (", D, "), got ",
              p->sizes());
  at::Tensor f = p->to(at::kFloat).contiguous();
  if (reinterpret_cast<uintptr_t>(f.data_ptr()) % 32 != 0) f = f.clone();
  return f;
}

int vector_width(int64_t D, const at::Tensor& x, std::initializer_list<const void*> ptrs) {
  const int vec = 16 / static_cast<int>(x.element_size());
  if (D % vec != 0) return 1;
  for (const void* p : ptrs)
    if (!aligned16(p)) return 1;
  return vec;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& x_in,
                                                                          const c10::optional<at::Tensor>& residual_in,
                                                                          const c10::optional<at::Tensor>& weight,
                                                                          const c10::optional<at::Tensor>& bias,
                                                                          double eps) {
  TORCH_CHECK(x_in.is_cuda(), "deit_fast layer_norm: x must be a CUDA tensor");
  TORCH_CHECK(x_in.dim() >= 1, "deit_fast layer_norm: x must have at least one dimension");
  const DType dtype = to_dtype(x_in, "x");
  const int64_t D = x_in.size(-1);
  TORCH_CHECK(D >= 1 && D <= kLayerNormMaxD, "deit_fast layer_norm: the last dimension of x must be in [1, ",
              kLayerNormMaxD, "], got ", D);
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor residual;
  if (residual_in.has_value()) {
    check_rows(*residual_in, x_in, "residual");
    residual = residual_in->contiguous();
  }
  const at::Tensor w = affine_param(weight, D, x, "weight");
  const at::Tensor b = affine_param(bias, D, x, "bias");

  const int64_t rows = x.numel() / D;
  at::Tensor y = at::empty_like(x);
  at::Tensor sum = residual.defined() ? at::empty_like(x) : at::empty({0}, x.options());
  std::vector<int64_t> stat_shape(x.sizes().begin(), x.sizes().end() - 1);
  at::Tensor mean = at::empty(stat_shape, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty(stat_shape, x.options().dtype(at::kFloat));

  LayerNormFwdParams p{};
  p.x = x.data_ptr();
  p.residual = residual.defined() ? residual.data_ptr() : nullptr;
  p.weight = w.defined() ? w.data_ptr<float>() : nullptr;
  p.bias = b.defined() ? b.data_ptr<float>() : nullptr;
  p.y = y.data_ptr();
  p.sum = residual.defined() ? sum.data_ptr() : nullptr;
  p.mean = mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.rows = rows;
  p.D = static_cast<int>(D);
  p.eps = static_cast<float>(eps);
  p.vec = vector_width(D, x, {p.x, p.residual, p.y, p.sum});
  const cudaError_t err = launch_layer_norm_fwd(p, dtype, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "deit_fast layer_norm forward launch failed: ", cudaGetErrorString(err));
  return {y, sum, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(const at::Tensor& dy_in,
                                                             const c10::optional<at::Tensor>& dsum_in,
                                                             const at::Tensor& s_in,
                                                             const c10::optional<at::Tensor>& weight,
                                                             const at::Tensor& mean, const at::Tensor& rstd) {
  TORCH_CHECK(s_in.is_cuda(), "deit_fast layer_norm: s must be a CUDA tensor");
  const DType dtype = to_dtype(s_in, "s");
  const int64_t D = s_in.size(-1);
  TORCH_CHECK(D >= 1 && D <= kLayerNormMaxD, "deit_fast layer_norm: the last dimension must be in [1, ",
              kLayerNormMaxD, "], got ", D);
  c10::cuda::CUDAGuard guard(s_in.device());
  check_rows(dy_in, s_in, "dy");
  const int64_t rows = s_in.numel() / D;
  TORCH_CHECK(mean.numel() == rows && rstd.numel() == rows && mean.scalar_type() == at::kFloat &&
                  rstd.scalar_type() == at::kFloat,
              "deit_fast layer_norm: mean and rstd must be float32 with one value per row");
  // Gradients can arrive as expanded views (stride 0): the kernels need dense rows.
  const at::Tensor dy = dy_in.contiguous();
  const at::Tensor s = s_in.contiguous();
  at::Tensor dsum;
  if (dsum_in.has_value()) {
    check_rows(*dsum_in, s_in, "dsum");
    dsum = dsum_in->contiguous();
  }
  const at::Tensor w = affine_param(weight, D, s, "weight");
  const at::Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();

  at::Tensor ds = at::empty_like(s);
  int sms = 0;
  TORCH_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, s.get_device()) == cudaSuccess,
              "deit_fast layer_norm: cannot read the GPU's multiprocessor count");
  LayerNormBwdParams p{};
  p.dy = dy.data_ptr();
  p.dsum = dsum.defined() ? dsum.data_ptr() : nullptr;
  p.s = s.data_ptr();
  p.weight = w.defined() ? w.data_ptr<float>() : nullptr;
  p.mean = mean_c.data_ptr<float>();
  p.rstd = rstd_c.data_ptr<float>();
  p.ds = ds.data_ptr();
  p.rows = rows;
  p.D = static_cast<int>(D);
  p.vec = vector_width(D, s, {p.dy, p.dsum, p.s, p.ds});
  const int rows_per_block = layer_norm_bwd_rows_per_block(p.D, p.vec, dtype);
  TORCH_CHECK(rows_per_block > 0, "deit_fast layer_norm: no backward kernel for D=", D);
  const int64_t row_groups = (rows + rows_per_block - 1) / rows_per_block;
  // Enough blocks to fill the GPU twice over; more only adds partial rows to sum afterwards.
  p.grid = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(row_groups, 2 * sms)));
  at::Tensor partial = at::empty({2, p.grid, D}, s.options().dtype(at::kFloat));
  p.dweight_partial = partial[0].data_ptr<float>();
  p.dbias_partial = partial[1].data_ptr<float>();
  if (rows > 0) {
    const cudaError_t err = launch_layer_norm_bwd(p, dtype, c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "deit_fast layer_norm backward launch failed: ", cudaGetErrorString(err));
  } else {
    partial.zero_();
  }
  // Fixed-order sums of the partials: deterministic. Separate tensors: the outputs of an op must not alias.
  const at::ScalarType param_dtype = weight.has_value() ? weight->scalar_type() : s.scalar_type();
  return {ds, partial[0].sum(0).to(param_dtype), partial[1].sum(0).to(param_dtype)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(deit_fast_cuda, m) {
  m.def("layer_norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps) -> "
        "(Tensor y, Tensor sum, Tensor mean, Tensor rstd)");
  m.def("layer_norm_bwd(Tensor dy, Tensor? dsum, Tensor s, Tensor? weight, Tensor mean, Tensor rstd) -> "
        "(Tensor ds, Tensor dweight, Tensor dbias)");
}

TORCH_LIBRARY_IMPL(deit_fast_cuda, CUDA, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd);
  m.impl("layer_norm_bwd", &layer_norm_bwd);
}

}  // namespace deit_fast
