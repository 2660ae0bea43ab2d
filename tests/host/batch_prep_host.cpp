// Host build of the batch preparation kernel (csrc/batch_prep): the same per-element math (batch_prep_math.cuh) in the
// kernel's loop order, one pixel of a sample pair at a time, float32 output in NCHW. tests/test_batch_prep.py compiles
// this with g++ -ffp-contract=off and compares it with the PyTorch reference for identical draws.
#include <cstdint>

#include "batch_prep/batch_prep_math.cuh"

using namespace deit_fast;

extern "C" void batch_prep_host(const uint8_t* images, float* out, const float* scale, const float* shift,
                                const int32_t* erase, float lam, float one_minus_lam, int mode, int box_top,
                                int box_left, int box_height, int box_width, uint32_t seed, int B, int H, int W,
                                int C) {
  const int HW = H * W;
  for (int b = 0; b < (B + 1) / 2; ++b) {
    const int partner = B - 1 - b;
    const int samples[2] = {b, partner};
    for (int pixel = 0; pixel < HW; ++pixel) {
      const int y = pixel / W, x = pixel % W;
      float v[2][4];
      for (int s = 0; s < 2; ++s) {
        const int i = samples[s];
        const int32_t* box = erase + 4 * i;
        const bool erased = box[2] > 0 && bp::in_box(y, x, box[0], box[1], box[2], box[3]);
        for (int c = 0; c < C; ++c) {
          const uint32_t index = ((static_cast<uint32_t>(i) * C + c) * H + y) * W + x;
          v[s][c] = erased ? bp::noise(seed, index)
                           : bp::normalize(images[(static_cast<int64_t>(i) * HW + pixel) * C + c], scale[c], shift[c]);
        }
      }
      const bool cut = mode == 2 && bp::in_box(y, x, box_top, box_left, box_height, box_width);
      for (int s = 0; s < 2; ++s) {
        if (s == 1 && partner == b) break;
        for (int c = 0; c < C; ++c) {
          float value = v[s][c];
          if (mode == 1) value = bp::mix(v[s][c], v[1 - s][c], lam, one_minus_lam);
          if (cut) value = v[1 - s][c];
          out[(static_cast<int64_t>(samples[s]) * C + c) * HW + pixel] = value;
        }
      }
    }
  }
}
