// Batch preparation's per-element math, shared by the CUDA kernel (batch_prep_kernels.cu), the host build the tests
// compile with g++ (tests/host/batch_prep_host.cpp), and written out again in PyTorch in deit_fast/ops/batch_prep.py
// (the reference), so that identical random draws give identical outputs.
//
// Per output element (sample b, channel c, pixel y, x):
//   v(i)  = erased_i(y, x) ? noise(seed, i, c, y, x) : u8_i(y, x, c) * scale[c] + shift[c]
//           (scale = 1 / (255 std), shift = -mean / std: timm's normalization; noise: standard normal, per pixel and
//            channel, as timm's RandomErasing in 'pixel' mode)
//   mixup:  out_b = v(b) * lam + v(B-1-b) * (1 - lam)          cutmix: out_b = in box ? v(B-1-b) : v(b)
// (timm's Mixup in batch mode mixes with the flipped batch.) Products and sums are rounded separately (no fused
// multiply-add), as PyTorch's separate elementwise ops round them.
//
// The noise is counter-based: a 32-bit integer hash of (seed, element index) gives two uniforms, Box-Muller gives the
// normal value. The hash is exact integer arithmetic everywhere; log/cos/sqrt are the platform's float32 functions
// (CUDA's logf/cospif/sqrtf, the C library's on the host, PyTorch's on CPU tensors), which agree to a few ulps.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.cuh"

namespace deit_fast {
namespace bp {

// "lowbias32" integer hash (Chris Wellons' hash-prospector): good avalanche with two multiplies.
DF_HD uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

DF_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

DF_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

DF_HD float normalize(uint8_t u, float scale, float shift) { return add_rn(mul_rn(static_cast<float>(u), scale), shift); }

// Standard normal for element `index` (= ((i * C + c) * H + y) * W + x, wrapping at 2^32) of a batch drawn with `seed`.
DF_HD float noise(uint32_t seed, uint32_t index) {
  const uint32_t key = hash32(seed);
  const uint32_t h1 = hash32((index * 2u) ^ key);
  const uint32_t h2 = hash32((index * 2u + 1u) ^ key);
  const float u1 = static_cast<float>((h1 >> 8) + 1u) * 5.9604644775390625e-08f;  // (0, 1]
  const float u2 = static_cast<float>(h2 >> 8) * 5.9604644775390625e-08f;         // [0, 1)
#if defined(__CUDA_ARCH__)
  // cospif(2 u2) = cos(2 pi u2) without cosf's general argument reduction (which would use local memory).
  const float radius = sqrtf(mul_rn(-2.0f, logf(u1)));
  return mul_rn(radius, cospif(mul_rn(2.0f, u2)));
#else
  const float radius = std::sqrt(-2.0f * std::log(u1));
  return radius * std::cos(6.2831854820251465f * u2);
#endif
}

DF_HD bool in_box(int y, int x, int top, int left, int height, int width) {
  return y >= top && y < top + height && x >= left && x < left + width;
}

DF_HD float mix(float a, float b, float lam, float one_minus_lam) { return add_rn(mul_rn(a, lam), mul_rn(b, one_minus_lam)); }

}  // namespace bp
}  // namespace deit_fast
