// Launch interface of the batch preparation kernel: plain pointers and a stream, no torch types, so
// batch_prep_kernels.cu compiles on its own (the register-spill test compiles it with `nvcc -Xptxas -v`).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace deit_fast {

enum class OutDType { kFloat32, kFloat16, kBFloat16 };
enum class MixMode { kNone = 0, kMixup = 1, kCutmix = 2 };

struct BatchPrepParams {
  const uint8_t* images;    // (B, H, W, C) uint8, contiguous
  void* out;                // (B, C, H, W) or (B, H, W, C) in the output dtype
  const float* scale;       // (C,): 1 / (255 std)
  const float* shift;       // (C,): -mean / std
  const int32_t* erase;     // (B, 4): top, left, height, width of each sample's erased box (height 0: none)
  float lam;                // mixup weight of the sample itself
  float one_minus_lam;      // and of its partner B-1-b (rounded to float32 on the host, as PyTorch rounds 1 - lam)
  MixMode mode;
  int box_top, box_left, box_height, box_width;  // cutmix box (mode kCutmix)
  uint32_t seed;            // noise seed
  int B, H, W, C;
  bool channels_last;       // output layout: NHWC when true, NCHW when false
};

// cudaSuccess or the launch error.
cudaError_t launch_batch_prep(const BatchPrepParams& p, OutDType dtype, cudaStream_t stream);

}  // namespace deit_fast
