// What the kernel files share: the low-bit matmul (lowbit.cpp), called by the fused decode loop (layers.cpp).
#pragma once

#include <ATen/ATen.h>

namespace tokenmill {

// x [M, K] float32 @ packed W' -> [M, N] float32; q4 selects the 4-bit layout, else the 8-bit one.
at::Tensor lowbit_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, int64_t N, bool q4);

}  // namespace tokenmill
