// Device functions of diagonal_conv shared by the CUDA kernels
// (diagonal_conv_cuda.cu, conv_chain_cuda.cu).
#pragma once

#include <cstdint>

namespace torchntk {

__device__ __forceinline__ int64_t floor_div_device(int64_t a, int64_t b) {
  const int64_t q = a / b;
  return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

// The source position of padded position `pos` on an axis of `size`, or -1
// where zero padding puts a zero.
__device__ __forceinline__ int64_t source_index(int64_t pos, int64_t size, bool circular) {
  if (pos >= 0 && pos < size) return pos;
  if (!circular) return -1;
  return pos - floor_div_device(pos, size) * size;
}

// Entry `index` of a contiguous (B, side, side, R) tensor as (b, row, col, r).
struct PairEntry {
  int64_t b, row, col, r;
};

__device__ __forceinline__ PairEntry pair_entry(int64_t index, int64_t side, int64_t inner) {
  const int64_t rest = index / inner;
  return {rest / side / side, rest / side % side, rest % side, index % inner};
}

// Entry `index` of a window sum's (B, Xo, Xo, R) output from the (B, X, X, R)
// input `cov`: diagonal_conv's (1/k) Σ_i cov_pad[b, s·p + i, s·q + i, r], or
// with kBox the box sum Σ_{i,j} cov_pad[b, s·p + i, s·q + j, r] (pooling).
template <bool kBox, typename scalar_t>
__device__ __forceinline__ scalar_t window_entry(const scalar_t* __restrict__ cov, int64_t index,
                                                 int64_t size, int64_t out_size, int64_t inner,
                                                 int64_t k, int64_t stride, int64_t pad_low,
                                                 bool circular) {
  const auto [b, p, q, r] = pair_entry(index, out_size, inner);
  const scalar_t* cov_b = cov + b * size * size * inner + r;
  scalar_t sum = 0;
  for (int64_t i = 0; i < k; ++i) {
    const int64_t row = source_index(stride * p + i - pad_low, size, circular);
    if (row < 0) continue;
    for (int64_t j = kBox ? 0 : i; j < (kBox ? k : i + 1); ++j) {
      const int64_t col = source_index(stride * q + j - pad_low, size, circular);
      if (col >= 0) sum += cov_b[(row * size + col) * inner];
    }
  }
  return kBox ? sum : sum / scalar_t(k);
}

}  // namespace torchntk
