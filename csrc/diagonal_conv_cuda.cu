// CUDA twin of diagonal_conv.cpp: the same sums, one thread per output entry.
// Consecutive threads take consecutive r (then q), so the reads of a warp from
// each diagonal are coalesced. The adjoint gathers instead of scattering (one
// thread per input entry, summing the output entries whose windows cover it),
// so it needs no atomics and is deterministic.
#include "diagonal_conv.h"
#include "diagonal_conv_cuda.cuh"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
// c10's stream and guard headers need only the CUDA runtime (ATen/cuda/CUDAContext.h
// would also pull in cuBLAS and cuSPARSE headers, absent from minimal toolkits).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace torchntk {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void diagonal_conv_kernel(const scalar_t* __restrict__ cov, scalar_t* __restrict__ out,
                                     int64_t total, int64_t size, int64_t out_size, int64_t inner,
                                     int64_t k, int64_t stride, int64_t pad_low, bool circular) {
  for (int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; index < total;
       index += int64_t(gridDim.x) * blockDim.x) {
    out[index] = window_entry<false>(cov, index, size, out_size, inner, k, stride, pad_low,
                                     circular);
  }
}

// Calls fn(t) for every output index t in [0, out_size) whose window, at tap i,
// covers source position `source` (one t under zero padding; under circular
// padding one per wrap-around block).
template <typename Fn>
__device__ __forceinline__ void for_each_cover(int64_t source, int64_t i, int64_t size,
                                               int64_t out_size, int64_t stride, int64_t pad_low,
                                               bool circular, Fn&& fn) {
  const int64_t offset = i - pad_low;
  const int64_t first = circular ? floor_div_device(offset, size) : 0;
  const int64_t last = circular ? floor_div_device(stride * (out_size - 1) + offset, size) : 0;
  for (int64_t m = first; m <= last; ++m) {
    const int64_t t = source + m * size - offset;
    if (t >= 0 && t % stride == 0 && t / stride < out_size) fn(t / stride);
  }
}

template <typename scalar_t>
__global__ void diagonal_conv_transpose_kernel(const scalar_t* __restrict__ grad,
                                               scalar_t* __restrict__ in, int64_t total,
                                               int64_t size, int64_t out_size, int64_t inner,
                                               int64_t k, int64_t stride, int64_t pad_low,
                                               bool circular) {
  for (int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; index < total;
       index += int64_t(gridDim.x) * blockDim.x) {
    const PairEntry entry = pair_entry(index, size, inner);
    const int64_t row = entry.row, col = entry.col;  // captured by the lambdas below
    const scalar_t* grad_b = grad + entry.b * out_size * out_size * inner + entry.r;
    scalar_t sum = 0;
    for (int64_t i = 0; i < k; ++i) {
      for_each_cover(row, i, size, out_size, stride, pad_low, circular, [&](int64_t p) {
        for_each_cover(col, i, size, out_size, stride, pad_low, circular, [&](int64_t q) {
          sum += grad_b[(p * out_size + q) * inner];
        });
      });
    }
    in[index] = sum / scalar_t(k);
  }
}

int blocks_for(int64_t total) {
  const int64_t wanted = (total + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(wanted, int64_t{1} << 20)));
}

at::Tensor as_4d(const at::Tensor& tensor) {
  return tensor.dim() == 3 ? tensor.unsqueeze(-1) : tensor;
}

}  // namespace

at::Tensor diagonal_conv_cuda(const at::Tensor& cov_in, int64_t k, int64_t stride,
                                 int64_t pad_low, int64_t pad_high, bool circular) {
  const c10::cuda::CUDAGuard guard(cov_in.device());
  const at::Tensor cov = as_4d(cov_in).contiguous();
  const int64_t batch = cov.size(0), size = cov.size(1), inner = cov.size(3);
  const int64_t out_size = output_size(size, k, stride, pad_low, pad_high);
  at::Tensor out = at::empty({batch, out_size, out_size, inner}, cov.options());
  const int64_t total = out.numel();
  if (total > 0) {
    AT_DISPATCH_FLOATING_TYPES(cov.scalar_type(), "diagonal_conv_cuda", [&] {
      diagonal_conv_kernel<scalar_t>
          <<<blocks_for(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
              cov.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), total, size, out_size, inner,
              k, stride, pad_low, circular);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return cov_in.dim() == 3 ? out.squeeze(-1) : out;
}

at::Tensor diagonal_conv_transpose_cuda(const at::Tensor& grad_in, int64_t size, int64_t k,
                                           int64_t stride, int64_t pad_low, int64_t pad_high,
                                           bool circular) {
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = as_4d(grad_in).contiguous();
  const int64_t batch = grad.size(0), inner = grad.size(3);
  const int64_t out_size = output_size(size, k, stride, pad_low, pad_high);
  at::Tensor in = at::empty({batch, size, size, inner}, grad.options());
  const int64_t total = in.numel();
  if (total > 0) {
    AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "diagonal_conv_transpose_cuda", [&] {
      diagonal_conv_transpose_kernel<scalar_t>
          <<<blocks_for(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
              grad.data_ptr<scalar_t>(), in.data_ptr<scalar_t>(), total, size, out_size, inner,
              k, stride, pad_low, circular);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return grad_in.dim() == 3 ? in.squeeze(-1) : in;
}

}  // namespace torchntk
