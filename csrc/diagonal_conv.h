// diagonal_conv: the full-spatial covariance of a shared-weight convolution
// along one spatial dimension (Novak et al. 2019, arXiv:1810.05148, eq. 7),
//
//     out[b, p, q, r] = (1/k) Σ_{i<k} cov_pad[b, s·p + i, s·q + i, r],
//
// and its adjoint. `cov` is (B, X, X, R): the trailing R entries (the other
// spatial dimensions' pairs) share the same sum, so one call convolves a
// (B, H, H', W·W') covariance along H without moving it. `cov_pad` pads both
// X axes by (pad_low, pad_high), with zeros or, if circular, by wrapping
// around; padding is never materialized.
#pragma once

// ATen only (not torch/extension.h): the CUDA source includes this header, and
// nvcc takes minutes over pybind11 and torch's C++ API.
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>

namespace torchntk {

// The index range of one padded axis, cut where it wraps around the unpadded
// axis of size `size`: padded positions `stride·t + offset` for t in
// [0, count) fall into blocks m = floor(pos / size); every block maps to the
// source positions `stride·t + offset - m·size`.
struct Segment {
  int64_t begin;  // first t of the block
  int64_t end;    // one past its last t
  int64_t shift;  // m·size, subtracted from stride·t + offset
};

inline int64_t floor_div(int64_t a, int64_t b) {
  const int64_t q = a / b;
  return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return -floor_div(-a, b); }

// Calls fn(segment) for the blocks of t in [0, count) with positions
// stride·t + offset: only the in-range block 0 under zero padding, every block
// under circular padding.
template <typename Fn>
inline void for_each_segment(int64_t count, int64_t stride, int64_t offset, int64_t size,
                             bool circular, Fn&& fn) {
  if (count <= 0) return;
  const int64_t first = floor_div(offset, size);
  const int64_t last = floor_div(stride * (count - 1) + offset, size);
  for (int64_t m = circular ? first : 0; m <= (circular ? last : 0); ++m) {
    const int64_t begin = std::max<int64_t>(0, ceil_div(m * size - offset, stride));
    const int64_t end = std::min<int64_t>(count, ceil_div((m + 1) * size - offset, stride));
    if (begin < end) fn(Segment{begin, end, m * size});
  }
}

int64_t output_size(int64_t size, int64_t k, int64_t stride, int64_t pad_low, int64_t pad_high);

// Rows [begin, end) of diagonal_conv on a contiguous (B, X, X, R) buffer `cov`
// into (B, Xo, Xo, R) `out` (row = b·Xo + p), on the calling thread.
void forward_rows(const float* cov, float* out, int64_t begin, int64_t end, int64_t size,
                  int64_t out_size, int64_t inner, int64_t k, int64_t stride, int64_t pad_low,
                  bool circular);
void forward_rows(const double* cov, double* out, int64_t begin, int64_t end, int64_t size,
                  int64_t out_size, int64_t inner, int64_t k, int64_t stride, int64_t pad_low,
                  bool circular);

// Compile a function for AVX-512, AVX2 and baseline x86-64, picked at load
// time (GCC target_clones): one portable binary uses the machine's vector width.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define TORCHNTK_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TORCHNTK_TARGET_CLONES
#endif

void check_arguments(const char* name, const at::Tensor& tensor, int64_t k, int64_t stride,
                     int64_t pad_low, int64_t pad_high, bool circular, int64_t size);

#ifdef TORCHNTK_WITH_CUDA
at::Tensor diagonal_conv_cuda(const at::Tensor& cov, int64_t k, int64_t stride,
                                 int64_t pad_low, int64_t pad_high, bool circular);
at::Tensor diagonal_conv_transpose_cuda(const at::Tensor& grad, int64_t size, int64_t k,
                                           int64_t stride, int64_t pad_low, int64_t pad_high,
                                           bool circular);
#endif

}  // namespace torchntk
