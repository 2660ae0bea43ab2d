// Torch glue for the batch preparation kernel: argument checks, output allocation, and registration of
// deit_fast_cuda::batch_prep for CUDA tensors. deit_fast/ops/batch_prep.py draws the random parameters, holds the
// PyTorch reference, and dispatches between the two.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "batch_prep.h"

namespace deit_fast {
namespace {

at::Tensor batch_prep(const at::Tensor& images, const at::Tensor& scale, const at::Tensor& shift,
                      const at::Tensor& erase, double lam, double one_minus_lam, int64_t mode,
                      at::IntArrayRef box, int64_t seed, at::ScalarType dtype, bool channels_last) {
  TORCH_CHECK(images.is_cuda(), "deit_fast batch_prep: images must be a CUDA tensor");
  TORCH_CHECK(images.scalar_type() == at::kByte && images.dim() == 4,
              "deit_fast batch_prep: images must be uint8 (B, H, W, C), got ", images.scalar_type(), " ",
              images.sizes());
  const int64_t B = images.size(0), H = images.size(1), W = images.size(2), C = images.size(3);
  TORCH_CHECK(C >= 1 && C <= 4, "deit_fast batch_prep: 1 to 4 channels, got ", C);
  TORCH_CHECK(H * W < (int64_t{1} << 31), "deit_fast batch_prep: images of at most 2^31 pixels");
  for (const at::Tensor* t : {&scale, &shift}) {
    TORCH_CHECK(t->is_cuda() && t->device() == images.device() && t->scalar_type() == at::kFloat &&
                    t->numel() == C,
                "deit_fast batch_prep: scale and shift must be float32 (C,) on ", images.device());
  }
  TORCH_CHECK(erase.is_cuda() && erase.device() == images.device() && erase.scalar_type() == at::kInt &&
                  erase.dim() == 2 && erase.size(0) == B && erase.size(1) == 4,
              "deit_fast batch_prep: erase must be int32 (B, 4) on ", images.device(), ", got ", erase.sizes());
  TORCH_CHECK(mode >= 0 && mode <= 2, "deit_fast batch_prep: mode must be 0 (none), 1 (mixup) or 2 (cutmix)");
  TORCH_CHECK(box.size() == 4, "deit_fast batch_prep: box must be (top, left, height, width)");
  OutDType out_dtype;
  switch (dtype) {
    case at::kFloat: out_dtype = OutDType::kFloat32; break;
    case at::kHalf: out_dtype = OutDType::kFloat16; break;
    case at::kBFloat16: out_dtype = OutDType::kBFloat16; break;
    default: TORCH_CHECK(false, "deit_fast batch_prep: dtype must be float32, float16 or bfloat16, got ", dtype);
  }
  c10::cuda::CUDAGuard guard(images.device());
  const at::Tensor in = images.contiguous();
  const at::Tensor sc = scale.contiguous(), sh = shift.contiguous(), er = erase.contiguous();
  std::vector<int64_t> shape = channels_last ? std::vector<int64_t>{B, H, W, C} : std::vector<int64_t>{B, C, H, W};
  at::Tensor out = at::empty(shape, images.options().dtype(dtype));
  BatchPrepParams p{};
  p.images = in.data_ptr<uint8_t>();
  p.out = out.data_ptr();
  p.scale = sc.data_ptr<float>();
  p.shift = sh.data_ptr<float>();
  p.erase = er.data_ptr<int32_t>();
  p.lam = static_cast<float>(lam);
  p.one_minus_lam = static_cast<float>(one_minus_lam);
  p.mode = static_cast<MixMode>(mode);
  p.box_top = static_cast<int>(box[0]);
  p.box_left = static_cast<int>(box[1]);
  p.box_height = static_cast<int>(box[2]);
  p.box_width = static_cast<int>(box[3]);
  p.seed = static_cast<uint32_t>(seed);
  p.B = static_cast<int>(B);
  p.H = static_cast<int>(H);
  p.W = static_cast<int>(W);
  p.C = static_cast<int>(C);
  p.channels_last = channels_last;
  const cudaError_t err = launch_batch_prep(p, out_dtype, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "deit_fast batch_prep: kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(deit_fast_cuda, m) {
  m.def("batch_prep(Tensor images, Tensor scale, Tensor shift, Tensor erase, float lam, float one_minus_lam, "
        "int mode, int[] box, int seed, ScalarType dtype, bool channels_last) -> Tensor");
}

TORCH_LIBRARY_IMPL(deit_fast_cuda, CUDA, m) { m.impl("batch_prep", &batch_prep); }

}  // namespace deit_fast
