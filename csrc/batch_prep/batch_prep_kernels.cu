// Batch preparation in one pass: uint8 NHWC images -> normalized, randomly erased, mixup/cutmix-mixed model input in
// the training dtype, NCHW or NHWC.
//
// One thread owns one pixel position (y, x) of a sample pair (b, B-1-b): it reads the C bytes of both images once,
// builds both samples' normalized (or erased) values, and writes both mixed outputs. Every input byte is read once and
// every output element written once: the minimum traffic (B*H*W*C bytes in, B*H*W*C*sizeof(out) bytes out).
// grid.x covers H*W pixels in blocks of kThreads, grid.y the ceil(B/2) pairs; an odd batch's middle sample pairs
// with itself.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../cuda_utils.cuh"
#include "batch_prep.h"
#include "batch_prep_math.cuh"

namespace deit_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxChannels = 4;

template <typename T>
__global__ void __launch_bounds__(kThreads) batch_prep_kernel(BatchPrepParams p) {
  const int pixel = blockIdx.x * kThreads + threadIdx.x;
  const int HW = p.H * p.W;
  if (pixel >= HW) return;
  const int b = blockIdx.y;
  const int partner = p.B - 1 - b;
  const int y = pixel / p.W;
  const int x = pixel % p.W;

  float v[2][kMaxChannels];
  const int samples[2] = {b, partner};
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    const int i = samples[s];
    const int32_t* box = p.erase + 4 * i;
    const bool erased = box[2] > 0 && bp::in_box(y, x, box[0], box[1], box[2], box[3]);
    const uint8_t* px = p.images + (static_cast<int64_t>(i) * HW + pixel) * p.C;
#pragma unroll
    for (int c = 0; c < kMaxChannels; ++c) {
      if (c >= p.C) break;
      const uint32_t index = ((static_cast<uint32_t>(i) * p.C + c) * p.H + y) * p.W + x;
      v[s][c] = erased ? bp::noise(p.seed, index) : bp::normalize(px[c], p.scale[c], p.shift[c]);
    }
  }
  const bool cut = p.mode == MixMode::kCutmix && bp::in_box(y, x, p.box_top, p.box_left, p.box_height, p.box_width);
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    if (s == 1 && partner == b) break;
    const int i = samples[s];
    const float* self = v[s];
    const float* other = v[1 - s];
#pragma unroll
    for (int c = 0; c < kMaxChannels; ++c) {
      if (c >= p.C) break;
      float value = self[c];
      if (p.mode == MixMode::kMixup) value = bp::mix(self[c], other[c], p.lam, p.one_minus_lam);
      if (cut) value = other[c];
      const int64_t offset = p.channels_last ? (static_cast<int64_t>(i) * HW + pixel) * p.C + c
                                             : (static_cast<int64_t>(i) * p.C + c) * HW + pixel;
      out[offset] = from_float<T>(value);
    }
  }
}

}  // namespace

cudaError_t launch_batch_prep(const BatchPrepParams& p, OutDType dtype, cudaStream_t stream) {
  if (p.C < 1 || p.C > kMaxChannels) return cudaErrorInvalidValue;
  if (p.B == 0 || p.H == 0 || p.W == 0) return cudaSuccess;
  const dim3 grid((p.H * p.W + kThreads - 1) / kThreads, (p.B + 1) / 2);
  switch (dtype) {
    case OutDType::kFloat32:
      batch_prep_kernel<float><<<grid, kThreads, 0, stream>>>(p);
      break;
    case OutDType::kFloat16:
      batch_prep_kernel<__half><<<grid, kThreads, 0, stream>>>(p);
      break;
    case OutDType::kBFloat16:
      batch_prep_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(p);
      break;
  }
  return cudaGetLastError();
}

}  // namespace deit_fast
