// The operations torchntk._C exposes to Python (csrc/module.cpp binds them).
#pragma once

#include <torch/extension.h>

#include <vector>

namespace torchntk {

// diagonal_conv.h describes the operation; these dispatch to CPU or CUDA.
torch::Tensor diagonal_conv(const torch::Tensor& cov, int64_t k, int64_t stride, int64_t pad_low,
                            int64_t pad_high, bool circular);
torch::Tensor diagonal_conv_transpose(const torch::Tensor& grad, int64_t size, int64_t k,
                                      int64_t stride, int64_t pad_low, int64_t pad_high,
                                      bool circular);

// conv_chain.cpp: a run of affine, Pool and ABRelu steps (the records of
// torchntk/ops/conv_chain.py) on each example's own covariance (N, X, X', …),
// returning it (undefined where `with_covariance` is false and the variances
// alone are cheaper) and the variance tables (N, X·Y·…) at every
// nonlinearity's input; then on the pairs (N1, N2, X, X', …), `symmetric`:
// of one batch with itself, pair (j, i) the transpose of (i, j).
std::vector<torch::Tensor> conv_chain_self(const torch::Tensor& cov,
                                           const std::vector<pybind11::object>& steps,
                                           bool with_covariance);
std::vector<torch::Tensor> conv_chain_pairs(const torch::Tensor& nngp,
                                            const c10::optional<torch::Tensor>& ntk,
                                            const std::vector<torch::Tensor>& var1,
                                            const std::vector<torch::Tensor>& var2,
                                            const std::vector<pybind11::object>& steps,
                                            bool symmetric);

}  // namespace torchntk
