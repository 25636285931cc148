// What the kernel files share: the low-bit matmul (lowbit.cpp), called by the fused decode loop
// (layers.cpp), and their rounding.
#pragma once

#include <ATen/ATen.h>

namespace tokenmill {

// Round to nearest, ties to even, as nearbyint in the default rounding mode and the vector
// round instruction do, for |v| < 2^22: no libm call, and loops that use it vectorize.
inline float round_even(float v) {
  constexpr float magic = 12582912.f;  // 1.5 * 2^23: the sum keeps no fraction bits
  return (v + magic) - magic;
}

// x [M, K] float32 @ packed W' -> [M, N] float32; q4 selects the 4-bit layout, else the 8-bit one.
at::Tensor lowbit_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, int64_t N, bool q4);
// The same into y (float32 [M, N], contiguous): a step's buffers are reused from layer to layer.
void lowbit_mm_into(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, int64_t N, bool q4,
                    at::Tensor& y);

}  // namespace tokenmill
