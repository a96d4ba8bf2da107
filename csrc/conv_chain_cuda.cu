// CUDA twin of conv_chain.cpp: the same steps and arithmetic (conv_chain.h),
// one thread block per pair of examples at a time, its covariances in
// per-block scratch buffers through all layers (synchronized between steps),
// so a run costs one kernel launch instead of several per layer.
#include "conv_chain.h"
#include "diagonal_conv_cuda.cuh"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstring>

namespace torchntk {
namespace {

constexpr int kChainThreads = 512;
// Scratch memory for the blocks in flight, at most (more pairs wait their turn).
constexpr int64_t kScratchBytes = int64_t{2} << 30;

template <typename scalar_t>
struct ChainArguments {
  const scalar_t* nngp;
  const scalar_t* ntk;  // null: no NTK
  scalar_t* nngp_out;
  scalar_t* ntk_out;
  scalar_t* scratch;  // per block: 4 buffers of max_entries, one table of max_positions
  const Step* steps;
  int n_steps, n_dims;
  // Per ABRelu step: variance tables (pass over pairs), or tables to record
  // into (pass over examples, where `first` is null).
  const scalar_t* const* first;
  const scalar_t* const* second;
  scalar_t* const* record;
  int64_t n_pairs, n2, max_entries, max_positions;
};

template <typename T>
__device__ __forceinline__ void swap(T& x, T& y) {
  const T t = x;
  x = y;
  y = t;
}

// One dimension's window sums of a pair buffer (sizes before it in `sizes`):
// a Conv's diagonals or a Pool's boxes.
template <typename scalar_t>
__device__ void convolve_dimension(const Step& step, int d, const int64_t* sizes, int n_dims,
                                   const scalar_t* in, scalar_t* out) {
  int64_t outer = 1, inner = 1;
  for (int e = 0; e < d; ++e) outer *= sizes[e] * sizes[e];
  for (int e = d + 1; e < n_dims; ++e) inner *= sizes[e] * sizes[e];
  const int64_t total = outer * step.out[d] * step.out[d] * inner;
  for (int64_t index = threadIdx.x; index < total; index += blockDim.x) {
    out[index] = step.kind == kPool
        ? window_entry<true>(in, index, sizes[d], step.out[d], inner, step.k[d], step.stride[d],
                             step.pad_low[d], step.circular)
        : window_entry<false>(in, index, sizes[d], step.out[d], inner, step.k[d], step.stride[d],
                              step.pad_low[d], step.circular);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kChainThreads) chain_kernel(ChainArguments<scalar_t> args) {
  const int n_dims = args.n_dims;
  scalar_t* const base = args.scratch + blockIdx.x * (4 * args.max_entries + args.max_positions);
  for (int64_t pair = blockIdx.x; pair < args.n_pairs; pair += gridDim.x) {
    scalar_t *a = base, *a_spare = base + args.max_entries;
    scalar_t *b = base + 2 * args.max_entries, *b_spare = base + 3 * args.max_entries;
    scalar_t* own = base + 4 * args.max_entries;
    const bool with_ntk = args.ntk != nullptr;
    const int64_t in_entries = entries_of(args.steps[0].in, n_dims);
    for (int64_t e = threadIdx.x; e < in_entries; e += blockDim.x) {
      a[e] = args.nngp[pair * in_entries + e];
      if (with_ntk) b[e] = args.ntk[pair * in_entries + e];
    }
    __syncthreads();
    const int64_t first = pair / args.n2, second = pair % args.n2;
    int relu_index = 0;
    for (int s = 0; s < args.n_steps; ++s) {
      const Step& step = args.steps[s];
      if (step.kind != kABRelu) {
        int64_t sizes[kMaxSpatial];
        for (int d = 0; d < n_dims; ++d) sizes[d] = step.in[d];
        for (int d = 0; d < n_dims; ++d) {
          convolve_dimension(step, d, sizes, n_dims, a, a_spare);
          if (with_ntk) convolve_dimension(step, d, sizes, n_dims, b, b_spare);
          __syncthreads();
          swap(a, a_spare);
          swap(b, b_spare);
          sizes[d] = step.out[d];
        }
        const int64_t entries = entries_of(step.out, n_dims);
        for (int64_t e = threadIdx.x; e < entries; e += blockDim.x) {
          if (with_ntk) b[e] = scalar_t(step.gamma) * a[e] + (scalar_t(step.alpha) * b[e] + scalar_t(step.delta));
          a[e] = scalar_t(step.beta) + scalar_t(step.alpha) * a[e];
        }
        __syncthreads();
        continue;
      }
      const int64_t positions = positions_of(step.in, n_dims);
      const scalar_t *var1, *var2;
      if (args.first == nullptr) {
        for (int64_t x = threadIdx.x; x < positions; x += blockDim.x) {
          int64_t rest = x, offset = 0, weight = 1;
          for (int d = n_dims - 1; d >= 0; --d) {
            offset += rest % step.in[d] * (step.in[d] + 1) * weight;
            rest /= step.in[d];
            weight *= step.in[d] * step.in[d];
          }
          own[x] = a[offset];
          args.record[relu_index][first * positions + x] = a[offset];
        }
        __syncthreads();
        var1 = var2 = own;
      } else {
        var1 = args.first[relu_index] + first * positions;
        var2 = args.second[relu_index] + second * positions;
      }
      const int64_t entries = entries_of(step.in, n_dims);
      for (int64_t e = threadIdx.x; e < entries; e += blockDim.x) {
        int64_t rest = e, index1 = 0, index2 = 0, weight = 1;
        for (int d = n_dims - 1; d >= 0; --d) {
          index2 += rest % step.in[d] * weight;
          rest /= step.in[d];
          index1 += rest % step.in[d] * weight;
          rest /= step.in[d];
          weight *= step.in[d];
        }
        scalar_t d_nngp;
        a[e] = abrelu_entry(a[e], var1[index1], var2[index2], scalar_t(step.k1),
                            scalar_t(step.c0), &d_nngp);
        if (with_ntk) b[e] = d_nngp * b[e];
      }
      __syncthreads();
      ++relu_index;
    }
    const int64_t out_entries = entries_of(args.steps[args.n_steps - 1].out, n_dims);
    for (int64_t e = threadIdx.x; e < out_entries; e += blockDim.x) {
      args.nngp_out[pair * out_entries + e] = a[e];
      if (with_ntk) args.ntk_out[pair * out_entries + e] = b[e];
    }
    __syncthreads();
  }
}

// A host array copied to the device (owned by the returned tensor).
template <typename T>
at::Tensor to_device(const std::vector<T>& values, const at::Device& device) {
  std::vector<T> copy(values);
  return at::from_blob(copy.data(), {int64_t(copy.size() * sizeof(T))}, at::kByte)
      .to(at::TensorOptions().device(device), /*non_blocking=*/false, /*copy=*/true);
}

}  // namespace

void conv_chain_cuda(const at::Tensor& nngp, const at::Tensor& ntk, at::Tensor& nngp_out,
                     at::Tensor& ntk_out, const std::vector<at::Tensor>& variances1,
                     const std::vector<at::Tensor>& variances2, std::vector<at::Tensor>& record,
                     const std::vector<Step>& steps, int64_t n_dims, int64_t n2) {
  const c10::cuda::CUDAGuard guard(nngp.device());
  const int64_t max_entries = entries_of(steps.front().in, n_dims);
  const int64_t max_positions = positions_of(steps.front().in, n_dims);
  const int64_t n_pairs = nngp_out.numel() / entries_of(steps.back().out, n_dims);
  const int64_t block_bytes = (4 * max_entries + max_positions) * nngp.element_size();
  int multiprocessors = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount,
                                        nngp.device().index()));
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(
      {n_pairs, int64_t(4) * multiprocessors, kScratchBytes / block_bytes}));
  at::Tensor scratch = at::empty({blocks * (4 * max_entries + max_positions)}, nngp.options());
  const at::Tensor device_steps = to_device(steps, nngp.device());
  AT_DISPATCH_FLOATING_TYPES(nngp.scalar_type(), "conv_chain_cuda", [&] {
    std::vector<const scalar_t*> first, second;
    std::vector<scalar_t*> record_ptrs;
    for (size_t l = 0; l < variances1.size(); ++l) {
      first.push_back(variances1[l].data_ptr<scalar_t>());
      second.push_back(variances2[l].data_ptr<scalar_t>());
    }
    for (auto& table : record) record_ptrs.push_back(table.data_ptr<scalar_t>());
    const at::Tensor first_ptrs = to_device(first, nngp.device());
    const at::Tensor second_ptrs = to_device(second, nngp.device());
    const at::Tensor record_device = to_device(record_ptrs, nngp.device());
    ChainArguments<scalar_t> args{
        nngp.data_ptr<scalar_t>(),
        ntk.defined() ? ntk.data_ptr<scalar_t>() : nullptr,
        nngp_out.data_ptr<scalar_t>(),
        ntk.defined() ? ntk_out.data_ptr<scalar_t>() : nullptr,
        scratch.data_ptr<scalar_t>(),
        reinterpret_cast<const Step*>(device_steps.data_ptr()),
        int(steps.size()),
        int(n_dims),
        first.empty() ? nullptr : reinterpret_cast<const scalar_t* const*>(first_ptrs.data_ptr()),
        second.empty() ? nullptr : reinterpret_cast<const scalar_t* const*>(second_ptrs.data_ptr()),
        record_ptrs.empty() ? nullptr : reinterpret_cast<scalar_t* const*>(record_device.data_ptr()),
        n_pairs, n2, max_entries, max_positions};
    chain_kernel<scalar_t><<<blocks, kChainThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace torchntk
