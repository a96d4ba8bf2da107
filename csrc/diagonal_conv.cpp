// CPU implementation of diagonal_conv and its adjoint. See diagonal_conv.h for
// the operation.
//
// Work is split over (b, output row) with at::parallel_for (OpenMP in torch's
// CPU builds), so a few large examples keep every core busy as well as many
// small ones. Each task writes one row of its result: no atomics, no races.
// The inner loops run over contiguous memory (the column q when R == 1 and the
// stride is 1, the trailing R entries otherwise) and are compiled for AVX-512,
// AVX2 and baseline x86-64, picked at load time (GCC target_clones), so one
// portable binary uses the vector width of the machine it runs on.
#include "diagonal_conv.h"

#include "extension.h"

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>

namespace torchntk {

#define TORCHNTK_INLINE inline __attribute__((always_inline))

namespace {

// out_row[q, :] += (1/k) Σ_i cov[b, row(i), col(i, q), :] for one output row p.
template <typename scalar_t>
TORCHNTK_INLINE void forward_row(const scalar_t* __restrict__ cov_b, scalar_t* __restrict__ out_row,
                                 int64_t p, int64_t size, int64_t out_size, int64_t inner,
                                 int64_t k, int64_t stride, int64_t pad_low, bool circular) {
  std::fill(out_row, out_row + out_size * inner, scalar_t(0));
  for (int64_t i = 0; i < k; ++i) {
    const int64_t row_pos = stride * p + i - pad_low;
    const int64_t row_block = floor_div(row_pos, size);
    if (row_block != 0 && !circular) continue;
    const scalar_t* __restrict__ src = cov_b + (row_pos - row_block * size) * size * inner;
    for_each_segment(out_size, stride, i - pad_low, size, circular, [&](const Segment& seg) {
      const int64_t offset = i - pad_low - seg.shift;
      if (inner == 1 && stride == 1) {
        const scalar_t* __restrict__ col = src + offset;
#pragma omp simd
        for (int64_t q = seg.begin; q < seg.end; ++q) out_row[q] += col[q];
      } else if (inner == 1) {
        for (int64_t q = seg.begin; q < seg.end; ++q) out_row[q] += src[stride * q + offset];
      } else {
        for (int64_t q = seg.begin; q < seg.end; ++q) {
          const scalar_t* __restrict__ from = src + (stride * q + offset) * inner;
          scalar_t* __restrict__ to = out_row + q * inner;
#pragma omp simd
          for (int64_t r = 0; r < inner; ++r) to[r] += from[r];
        }
      }
    });
  }
  const scalar_t scale = scalar_t(1) / scalar_t(k);
#pragma omp simd
  for (int64_t j = 0; j < out_size * inner; ++j) out_row[j] *= scale;
}

// The adjoint, one row of the input gradient: every (i, p, q) whose padded
// position lands on input row `row` scatters grad[b, p, q, :] / k into this
// row only, so rows are independent tasks.
template <typename scalar_t>
TORCHNTK_INLINE void transpose_row(const scalar_t* __restrict__ grad_b, scalar_t* __restrict__ in_row,
                                   int64_t row, int64_t size, int64_t out_size, int64_t inner,
                                   int64_t k, int64_t stride, int64_t pad_low, bool circular) {
  std::fill(in_row, in_row + size * inner, scalar_t(0));
  for (int64_t i = 0; i < k; ++i) {
    for_each_segment(out_size, stride, i - pad_low, size, circular, [&](const Segment& rows) {
      // Output rows p of this block with stride·p + i - pad_low - shift == row.
      const int64_t t = row + rows.shift - (i - pad_low);
      if (t < 0 || t % stride != 0) return;
      const int64_t p = t / stride;
      if (p < rows.begin || p >= rows.end) return;
      const scalar_t* __restrict__ src = grad_b + p * out_size * inner;
      for_each_segment(out_size, stride, i - pad_low, size, circular, [&](const Segment& seg) {
        const int64_t offset = i - pad_low - seg.shift;
        if (inner == 1 && stride == 1) {
          scalar_t* __restrict__ col = in_row + offset;
#pragma omp simd
          for (int64_t q = seg.begin; q < seg.end; ++q) col[q] += src[q];
        } else if (inner == 1) {
          for (int64_t q = seg.begin; q < seg.end; ++q) in_row[stride * q + offset] += src[q];
        } else {
          for (int64_t q = seg.begin; q < seg.end; ++q) {
            const scalar_t* __restrict__ from = src + q * inner;
            scalar_t* __restrict__ to = in_row + (stride * q + offset) * inner;
#pragma omp simd
            for (int64_t r = 0; r < inner; ++r) to[r] += from[r];
          }
        }
      });
    });
  }
  const scalar_t scale = scalar_t(1) / scalar_t(k);
#pragma omp simd
  for (int64_t j = 0; j < size * inner; ++j) in_row[j] *= scale;
}

// Non-template entry points, one per dtype, so target_clones can compile each
// for several instruction sets.
#define TORCHNTK_ROW_KERNELS(scalar_t, suffix)                                                      \
  TORCHNTK_TARGET_CLONES void forward_rows_##suffix(                                               \
      const scalar_t* cov, scalar_t* out, int64_t begin, int64_t end, int64_t size,                \
      int64_t out_size, int64_t inner, int64_t k, int64_t stride, int64_t pad_low, bool circular) { \
    for (int64_t task = begin; task < end; ++task) {                                               \
      const int64_t b = task / out_size, p = task % out_size;                                      \
      forward_row(cov + b * size * size * inner, out + task * out_size * inner, p, size, out_size, \
                  inner, k, stride, pad_low, circular);                                            \
    }                                                                                              \
  }                                                                                                \
  TORCHNTK_TARGET_CLONES void transpose_rows_##suffix(                                             \
      const scalar_t* grad, scalar_t* in, int64_t begin, int64_t end, int64_t size,                \
      int64_t out_size, int64_t inner, int64_t k, int64_t stride, int64_t pad_low, bool circular) { \
    for (int64_t task = begin; task < end; ++task) {                                               \
      const int64_t b = task / size, row = task % size;                                            \
      transpose_row(grad + b * out_size * out_size * inner, in + task * size * inner, row, size,   \
                    out_size, inner, k, stride, pad_low, circular);                                \
    }                                                                                              \
  }

TORCHNTK_ROW_KERNELS(float, f32)
TORCHNTK_ROW_KERNELS(double, f64)

// Rows per parallel task: enough work (about 32k element updates) to amortize
// scheduling.
int64_t grain_size(int64_t row_work) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, row_work));
}

// (B, X, X) is read as (B, X, X, 1).
torch::Tensor as_4d(const torch::Tensor& tensor) {
  return tensor.dim() == 3 ? tensor.unsqueeze(-1) : tensor;
}

void transpose_rows(const float* grad, float* in, int64_t begin, int64_t end, int64_t size,
                    int64_t out_size, int64_t inner, int64_t k, int64_t stride, int64_t pad_low,
                    bool circular) {
  transpose_rows_f32(grad, in, begin, end, size, out_size, inner, k, stride, pad_low, circular);
}
void transpose_rows(const double* grad, double* in, int64_t begin, int64_t end, int64_t size,
                    int64_t out_size, int64_t inner, int64_t k, int64_t stride, int64_t pad_low,
                    bool circular) {
  transpose_rows_f64(grad, in, begin, end, size, out_size, inner, k, stride, pad_low, circular);
}

}  // namespace

void forward_rows(const float* cov, float* out, int64_t begin, int64_t end, int64_t size,
                  int64_t out_size, int64_t inner, int64_t k, int64_t stride, int64_t pad_low,
                  bool circular) {
  forward_rows_f32(cov, out, begin, end, size, out_size, inner, k, stride, pad_low, circular);
}
void forward_rows(const double* cov, double* out, int64_t begin, int64_t end, int64_t size,
                  int64_t out_size, int64_t inner, int64_t k, int64_t stride, int64_t pad_low,
                  bool circular) {
  forward_rows_f64(cov, out, begin, end, size, out_size, inner, k, stride, pad_low, circular);
}

int64_t output_size(int64_t size, int64_t k, int64_t stride, int64_t pad_low, int64_t pad_high) {
  return (size + pad_low + pad_high - k) / stride + 1;
}

void check_arguments(const char* name, const torch::Tensor& tensor, int64_t k, int64_t stride,
                     int64_t pad_low, int64_t pad_high, bool circular, int64_t size) {
  TORCH_CHECK(tensor.dim() == 3 || tensor.dim() == 4, name,
              ": expected a tensor of shape (B, X, X) or (B, X, X, R), got ", tensor.sizes());
  TORCH_CHECK(tensor.size(1) == tensor.size(2), name, ": dimensions 1 and 2 must be equal, got ",
              tensor.sizes());
  TORCH_CHECK(tensor.scalar_type() == torch::kFloat || tensor.scalar_type() == torch::kDouble,
              name, ": expected float32 or float64, got ", tensor.scalar_type());
  TORCH_CHECK(k >= 1 && stride >= 1 && pad_low >= 0 && pad_high >= 0, name,
              ": need k >= 1, stride >= 1, padding >= 0, got k=", k, " stride=", stride,
              " padding=(", pad_low, ", ", pad_high, ")");
  TORCH_CHECK(size >= 1 && size + pad_low + pad_high >= k, name, ": window k=", k,
              " exceeds the padded size ", size + pad_low + pad_high);
  (void)circular;
}

torch::Tensor diagonal_conv(const torch::Tensor& cov_in, int64_t k, int64_t stride,
                            int64_t pad_low, int64_t pad_high, bool circular) {
  check_arguments("diagonal_conv", cov_in, k, stride, pad_low, pad_high, circular,
                  cov_in.dim() >= 2 ? cov_in.size(1) : 0);
#ifdef TORCHNTK_WITH_CUDA
  if (cov_in.is_cuda()) return diagonal_conv_cuda(cov_in, k, stride, pad_low, pad_high, circular);
#endif
  TORCH_CHECK(cov_in.device().is_cpu(), "diagonal_conv: tensors on ", cov_in.device(),
              " need torchntk._C built with CUDA (TORCHNTK_BUILD_CUDA=1)");
  const torch::Tensor cov = as_4d(cov_in).contiguous();
  const int64_t batch = cov.size(0), size = cov.size(1), inner = cov.size(3);
  const int64_t out_size = output_size(size, k, stride, pad_low, pad_high);
  torch::Tensor out = torch::empty({batch, out_size, out_size, inner}, cov.options());
  AT_DISPATCH_FLOATING_TYPES(cov.scalar_type(), "diagonal_conv", [&] {
    const scalar_t* cov_ptr = cov.data_ptr<scalar_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    at::parallel_for(0, batch * out_size, grain_size(k * out_size * inner),
                     [&](int64_t begin, int64_t end) {
                       forward_rows(cov_ptr, out_ptr, begin, end, size, out_size, inner, k, stride,
                                    pad_low, circular);
                     });
  });
  return cov_in.dim() == 3 ? out.squeeze(-1) : out;
}

torch::Tensor diagonal_conv_transpose(const torch::Tensor& grad_in, int64_t size, int64_t k,
                                      int64_t stride, int64_t pad_low, int64_t pad_high,
                                      bool circular) {
  check_arguments("diagonal_conv_transpose", grad_in, k, stride, pad_low, pad_high, circular, size);
  const int64_t out_size = output_size(size, k, stride, pad_low, pad_high);
  TORCH_CHECK(grad_in.size(1) == out_size, "diagonal_conv_transpose: expected a gradient of size ",
              out_size, " along dimensions 1 and 2 for an input of size ", size, ", got ",
              grad_in.sizes());
#ifdef TORCHNTK_WITH_CUDA
  if (grad_in.is_cuda())
    return diagonal_conv_transpose_cuda(grad_in, size, k, stride, pad_low, pad_high, circular);
#endif
  TORCH_CHECK(grad_in.device().is_cpu(), "diagonal_conv_transpose: tensors on ", grad_in.device(),
              " need torchntk._C built with CUDA (TORCHNTK_BUILD_CUDA=1)");
  const torch::Tensor grad = as_4d(grad_in).contiguous();
  const int64_t batch = grad.size(0), inner = grad.size(3);
  torch::Tensor in = torch::empty({batch, size, size, inner}, grad.options());
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "diagonal_conv_transpose", [&] {
    const scalar_t* grad_ptr = grad.data_ptr<scalar_t>();
    scalar_t* in_ptr = in.data_ptr<scalar_t>();
    at::parallel_for(0, batch * size, grain_size(k * out_size * inner),
                     [&](int64_t begin, int64_t end) {
                       transpose_rows(grad_ptr, in_ptr, begin, end, size, out_size, inner, k,
                                      stride, pad_low, circular);
                     });
  });
  return grad_in.dim() == 3 ? in.squeeze(-1) : in;
}

}  // namespace torchntk
