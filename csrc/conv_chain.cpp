// conv_chain: a run of shared-weight convolutions and ABRelu-family
// nonlinearities applied to full spatial covariances, one pair of examples at
// a time, all layers in a row. CPU here, CUDA in conv_chain_cuda.cu.
//
// Layer by layer, every step streams the whole (N1, N2, X, X', Y, Y')
// covariances through memory several times (convolution per dimension,
// affine map, nonlinearity, fresh tensors). Here a pair's covariance (0.5 MiB
// for 16x16 in float64) goes through all layers in per-thread buffers that
// stay in cache, and the steps are fused:
//
//   Conv   (Novak et al. 2019, eq. 7): A = diagonal_conv along every spatial
//          dimension; nngp' = α·A(nngp) + β, ntk' = γ·A(nngp) + α·A(ntk) + δ.
//   ABRelu (Cho & Saul 2009): abrelu_entry in conv_chain.h.
//
// The nonlinearity needs each example's variances at its input. They come
// from a first pass over the examples' own covariances (conv_chain_self,
// which reads them off its diagonal and returns them) and are looked up by
// the pass over pairs (conv_chain_pairs).
#include "conv_chain.h"

#include <ATen/Parallel.h>

#include <algorithm>

#include "extension.h"

namespace torchntk {
namespace {

// The affine part of a Conv/Dense step on `n` entries of the unit-variance
// map's output: ntk = γ·nngp + α·ntk + δ (if `ntk`), then nngp = β + α·nngp.
template <typename scalar_t>
inline void affine(const Step& step, scalar_t* __restrict__ nngp, scalar_t* __restrict__ ntk,
                   int64_t n) {
  const scalar_t alpha = step.alpha, beta = step.beta, gamma = step.gamma, delta = step.delta;
  if (ntk) {
    for (int64_t e = 0; e < n; ++e) ntk[e] = gamma * nngp[e] + (alpha * ntk[e] + delta);
  }
  for (int64_t e = 0; e < n; ++e) nngp[e] = beta + alpha * nngp[e];
}

// One row of entries sharing var1 (the innermost spatial pair varies var2).
template <typename scalar_t, bool with_ntk>
inline void abrelu_row(scalar_t* __restrict__ nngp, scalar_t* __restrict__ ntk, scalar_t var1,
                       const scalar_t* __restrict__ var2, int64_t n, scalar_t k1, scalar_t c0) {
#pragma omp simd
  for (int64_t q = 0; q < n; ++q) {
    scalar_t d;
    nngp[q] = abrelu_entry(nngp[q], var1, var2[q], k1, c0, &d);
    if (with_ntk) ntk[q] = d * ntk[q];
  }
}

#define TORCHNTK_ABRELU_ROWS(scalar_t, with_ntk)                                                  \
  TORCHNTK_TARGET_CLONES void abrelu_rows_##scalar_t##_##with_ntk(                               \
      scalar_t* nngp, scalar_t* ntk, const scalar_t* var1, const scalar_t* var2,                  \
      const int64_t* row_var1, const int64_t* row_var2, int64_t rows, int64_t n, double k1,       \
      double c0) {                                                                                \
    for (int64_t r = 0; r < rows; ++r)                                                            \
      abrelu_row<scalar_t, with_ntk>(nngp + r * n, with_ntk ? ntk + r * n : nullptr,              \
                                     var1[row_var1[r]], var2 + row_var2[r], n, scalar_t(k1),      \
                                     scalar_t(c0));                                               \
  }

TORCHNTK_ABRELU_ROWS(float, true)
TORCHNTK_ABRELU_ROWS(float, false)
TORCHNTK_ABRELU_ROWS(double, true)
TORCHNTK_ABRELU_ROWS(double, false)

void abrelu_rows(float* nngp, float* ntk, const float* var1, const float* var2,
                 const int64_t* row_var1, const int64_t* row_var2, int64_t rows, int64_t n,
                 double k1, double c0) {
  if (ntk) abrelu_rows_float_true(nngp, ntk, var1, var2, row_var1, row_var2, rows, n, k1, c0);
  else abrelu_rows_float_false(nngp, ntk, var1, var2, row_var1, row_var2, rows, n, k1, c0);
}
void abrelu_rows(double* nngp, double* ntk, const double* var1, const double* var2,
                 const int64_t* row_var1, const int64_t* row_var2, int64_t rows, int64_t n,
                 double k1, double c0) {
  if (ntk) abrelu_rows_double_true(nngp, ntk, var1, var2, row_var1, row_var2, rows, n, k1, c0);
  else abrelu_rows_double_false(nngp, ntk, var1, var2, row_var1, row_var2, rows, n, k1, c0);
}

// For the pair layout (X, X', Y, Y', …) of spatial sizes `sizes`: rows run
// along the last X'; row r's first-example variance sits at row_var1[r] and
// its second-example variances start at row_var2[r], in (X, Y, …) tables.
// Also the offsets of the same-position entries (x, x, y, y, …).
struct PairIndex {
  std::vector<int64_t> row_var1, row_var2, diagonal;
  int64_t rows = 0, row_length = 1, positions = 1;

  PairIndex() = default;
  PairIndex(const int64_t* sizes, int n_dims) {
    row_length = sizes[n_dims - 1];
    positions = positions_of(sizes, n_dims);
    rows = entries_of(sizes, n_dims) / row_length;
    row_var1.resize(rows), row_var2.resize(rows);
    for (int64_t r = 0; r < rows; ++r) {
      // r enumerates (x_1, x_1', …, x_D) with x_D' left out, last fastest.
      int64_t rest = r / row_length, index1 = r % row_length, index2 = 0, weight = row_length;
      for (int d = n_dims - 2; d >= 0; --d) {
        const int64_t x2 = rest % sizes[d];
        rest /= sizes[d];
        index1 += rest % sizes[d] * weight;
        index2 += x2 * weight;
        rest /= sizes[d];
        weight *= sizes[d];
      }
      row_var1[r] = index1, row_var2[r] = index2;
    }
    diagonal.resize(positions);
    for (int64_t position = 0; position < positions; ++position) {
      int64_t rest = position, offset = 0, weight = 1;
      for (int d = n_dims - 1; d >= 0; --d) {
        offset += rest % sizes[d] * (sizes[d] + 1) * weight;
        rest /= sizes[d];
        weight *= sizes[d] * sizes[d];
      }
      diagonal[position] = offset;
    }
  }
};

// Where a pass takes the nonlinearities' variances from: per ABRelu step,
// (N, positions) tables of the first and second examples of each pair; empty
// for the pass over the examples themselves, which reads them off its own
// diagonal and stores them in `record`.
template <typename scalar_t>
struct Variances {
  std::vector<const scalar_t*> first, second;
  std::vector<scalar_t*> record;
};

template <typename scalar_t>
class PairChain {
 public:
  PairChain(const std::vector<Step>& steps, int n_dims) : steps_(steps), n_dims_(n_dims) {
    for (const Step& step : steps) {
      indices_.push_back(step.kind == kABRelu ? PairIndex(step.in, n_dims) : PairIndex());
    }
    const int64_t entries = entries_of(steps.front().in, n_dims);
    for (auto* buffer : {&a_, &a_spare_, &b_, &b_spare_}) buffer->resize(entries);
    own_.resize(positions_of(steps.front().in, n_dims));
  }

  // Runs the chain on one pair: `nngp` (and `ntk` if not null) hold the input
  // entries; the results go to `nngp_out`, `ntk_out`. `first`, `second`
  // index the pair's examples in the variance tables.
  void run(const scalar_t* nngp, const scalar_t* ntk, scalar_t* nngp_out, scalar_t* ntk_out,
           const Variances<scalar_t>& variances, int64_t first, int64_t second) {
    const bool with_ntk = ntk != nullptr;
    const int64_t in_entries = entries_of(steps_.front().in, n_dims_);
    std::copy(nngp, nngp + in_entries, a_.data());
    if (with_ntk) std::copy(ntk, ntk + in_entries, b_.data());
    size_t relu_index = 0;
    for (size_t s = 0; s < steps_.size(); ++s) {
      const Step& step = steps_[s];
      if (step.kind == kConv) {
        convolve(step, a_, a_spare_);
        if (with_ntk) convolve(step, b_, b_spare_);
        affine(step, a_.data(), with_ntk ? b_.data() : nullptr, entries_of(step.out, n_dims_));
        continue;
      }
      const PairIndex& index = indices_[s];
      const scalar_t *var1, *var2;
      if (variances.first.empty()) {
        for (int64_t x = 0; x < index.positions; ++x) own_[x] = a_[index.diagonal[x]];
        std::copy(own_.begin(), own_.begin() + index.positions,
                  variances.record[relu_index] + first * index.positions);
        var1 = var2 = own_.data();
      } else {
        var1 = variances.first[relu_index] + first * index.positions;
        var2 = variances.second[relu_index] + second * index.positions;
      }
      abrelu_rows(a_.data(), with_ntk ? b_.data() : nullptr, var1, var2, index.row_var1.data(),
                  index.row_var2.data(), index.rows, index.row_length, step.k1, step.c0);
      ++relu_index;
    }
    const int64_t out_entries = entries_of(steps_.back().out, n_dims_);
    std::copy(a_.data(), a_.data() + out_entries, nngp_out);
    if (with_ntk) std::copy(b_.data(), b_.data() + out_entries, ntk_out);
  }

 private:
  // The unit-variance convolution map along every spatial dimension, in place
  // in `buffer` (using `spare`).
  // A dimension whose pair is followed by fewer entries than kShortInner is
  // moved to the front first: diagonal_conv's inner loops run over those
  // entries, and short loops (16 for the last axis of a 16x16 image) cost ~10x
  // more per entry than two transposes, while the buffer stays in L2 (up to
  // kTransposedEntries; beyond, the transposes stream it through memory).
  static constexpr int64_t kShortInner = 64;
  static constexpr int64_t kTransposedEntries = int64_t{1} << 17;

  void convolve(const Step& step, std::vector<scalar_t>& buffer, std::vector<scalar_t>& spare) {
    int64_t sizes[kMaxSpatial];
    std::copy(step.in, step.in + n_dims_, sizes);
    for (int d = 0; d < n_dims_; ++d) {
      const int64_t outer = entries_of(sizes, d);
      const int64_t inner = entries_of(sizes + d + 1, n_dims_ - d - 1);
      const int64_t size = sizes[d], out_size = step.out[d];
      if (outer == 1 || inner >= kShortInner || outer * size * size * inner > kTransposedEntries) {
        forward_rows(buffer.data(), spare.data(), 0, outer * out_size, size, out_size, inner,
                     step.k[d], step.stride[d], step.pad_low[d], step.circular);
        buffer.swap(spare);
      } else {
        // (outer, X·X', inner) -> (X·X', outer, inner), convolve, and back.
        swap_axes(buffer.data(), spare.data(), outer, size * size, inner);
        forward_rows(spare.data(), buffer.data(), 0, out_size, size, out_size, outer * inner,
                     step.k[d], step.stride[d], step.pad_low[d], step.circular);
        swap_axes(buffer.data(), spare.data(), out_size * out_size, outer, inner);
        buffer.swap(spare);
      }
      sizes[d] = out_size;
    }
  }

  // dst[b, a, c] = src[a, b, c] for src of shape (A, B, C); in 16 x 16 tiles
  // when C = 1 (a matrix transpose), so that both sides stay in cache lines.
  static void swap_axes(const scalar_t* src, scalar_t* dst, int64_t A, int64_t B, int64_t C) {
    if (C > 1) {
      for (int64_t a = 0; a < A; ++a)
        for (int64_t b = 0; b < B; ++b) std::copy(src + (a * B + b) * C, src + (a * B + b + 1) * C, dst + (b * A + a) * C);
      return;
    }
    constexpr int64_t kTile = 16;
    for (int64_t a0 = 0; a0 < A; a0 += kTile) {
      for (int64_t b0 = 0; b0 < B; b0 += kTile) {
        if (a0 + kTile <= A && b0 + kTile <= B) {  // a whole tile: fixed trip counts
          for (int64_t b = 0; b < kTile; ++b)
            for (int64_t a = 0; a < kTile; ++a) dst[(b0 + b) * A + a0 + a] = src[(a0 + a) * B + b0 + b];
          continue;
        }
        for (int64_t a = a0; a < std::min(A, a0 + kTile); ++a)
          for (int64_t b = b0; b < std::min(B, b0 + kTile); ++b) dst[b * A + a] = src[a * B + b];
      }
    }
  }

  const std::vector<Step>& steps_;
  const int n_dims_;
  std::vector<PairIndex> indices_;
  std::vector<scalar_t> a_, a_spare_, b_, b_spare_, own_;
};

void check_pairs(const char* name, const torch::Tensor& tensor, int64_t batch_dims) {
  TORCH_CHECK(tensor.scalar_type() == torch::kFloat || tensor.scalar_type() == torch::kDouble,
              name, ": expected float32 or float64, got ", tensor.scalar_type());
  const int64_t spatial = tensor.dim() - batch_dims;
  TORCH_CHECK(spatial >= 0 && spatial % 2 == 0 && spatial <= 2 * kMaxSpatial, name,
              ": expected (batch…, X, X', Y, Y', …) with 0 to 3 spatial pairs, got ",
              tensor.sizes());
  for (int64_t d = batch_dims; d < tensor.dim(); d += 2) {
    TORCH_CHECK(tensor.size(d) == tensor.size(d + 1), name,
                ": the axes of each spatial pair must be equal, got ", tensor.sizes());
  }
#ifdef TORCHNTK_WITH_CUDA
  TORCH_CHECK(tensor.device().is_cpu() || tensor.is_cuda(), name, ": tensors on ",
              tensor.device(), " are not supported");
#else
  TORCH_CHECK(tensor.device().is_cpu(), name, ": tensors on ", tensor.device(),
              " need torchntk._C built with CUDA (TORCHNTK_BUILD_CUDA=1)");
#endif
}

std::vector<int64_t> spatial_sizes(const torch::Tensor& tensor, int64_t batch_dims) {
  std::vector<int64_t> sizes;
  for (int64_t d = batch_dims; d < tensor.dim(); d += 2) sizes.push_back(tensor.size(d));
  return sizes;
}

std::vector<int64_t> pair_shape(std::vector<int64_t> batch, const int64_t* sizes, int n_dims) {
  for (int d = 0; d < n_dims; ++d) batch.push_back(sizes[d]), batch.push_back(sizes[d]);
  return batch;
}

// Flat kernels (no spatial axes): every step is elementwise on the (N1, N2)
// entries, so each row of the pairs goes through all steps while in L1.
template <typename scalar_t>
void flat_chain_pairs(scalar_t* nngp, scalar_t* ntk, const Variances<scalar_t>& variances,
                      const std::vector<Step>& steps, int64_t n1, int64_t n2) {
  at::parallel_for(0, n1, 1, [&](int64_t begin, int64_t end) {
    const int64_t first_column = 0;
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* nngp_row = nngp + i * n2;
      scalar_t* ntk_row = ntk ? ntk + i * n2 : nullptr;
      size_t relu_index = 0;
      for (const Step& step : steps) {
        if (step.kind == kConv) {
          affine(step, nngp_row, ntk_row, n2);
          continue;
        }
        abrelu_rows(nngp_row, ntk_row, variances.first[relu_index], variances.second[relu_index],
                    &i, &first_column, 1, n2, step.k1, step.c0);
        ++relu_index;
      }
    }
  });
}

// Flat kernels, the pass over examples: each variance is its own covariance.
template <typename scalar_t>
void flat_chain_self(scalar_t* cov, const Variances<scalar_t>& variances,
                     const std::vector<Step>& steps, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    scalar_t c = cov[i], d;
    size_t relu_index = 0;
    for (const Step& step : steps) {
      if (step.kind == kConv) {
        affine(step, &c, static_cast<scalar_t*>(nullptr), 1);
        continue;
      }
      variances.record[relu_index++][i] = c;
      c = abrelu_entry(c, c, c, scalar_t(step.k1), scalar_t(step.c0), &d);
    }
    cov[i] = c;
  }
}

// The pass of `steps` over pairs (variances given) or over examples (`record` given).
void run_chain(const torch::Tensor& nngp, const torch::Tensor& ntk, torch::Tensor& nngp_out,
               torch::Tensor& ntk_out, const std::vector<torch::Tensor>& variances1,
               const std::vector<torch::Tensor>& variances2, std::vector<torch::Tensor>& record,
               const std::vector<Step>& steps, int n_dims, int64_t n2) {
#ifdef TORCHNTK_WITH_CUDA
  if (nngp.is_cuda()) {
    conv_chain_cuda(nngp, ntk, nngp_out, ntk_out, variances1, variances2, record, steps, n_dims, n2);
    return;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES(nngp.scalar_type(), "conv_chain", [&] {
    Variances<scalar_t> variances;
    for (size_t l = 0; l < variances1.size(); ++l) {
      variances.first.push_back(variances1[l].data_ptr<scalar_t>());
      variances.second.push_back(variances2[l].data_ptr<scalar_t>());
    }
    for (auto& table : record) variances.record.push_back(table.data_ptr<scalar_t>());
    if (n_dims == 0) {
      nngp_out.copy_(nngp);
      if (ntk.defined()) ntk.dim() == 0 ? ntk_out.fill_(ntk) : ntk_out.copy_(ntk);
      scalar_t* ntk_out_ptr = ntk.defined() ? ntk_out.data_ptr<scalar_t>() : nullptr;
      // Without NTK or nonlinearities, pairs are elementwise like examples.
      if (!variances.first.empty() || ntk.defined()) {
        flat_chain_pairs(nngp_out.data_ptr<scalar_t>(), ntk_out_ptr, variances, steps,
                         nngp_out.size(0), n2);
      } else {
        flat_chain_self(nngp_out.data_ptr<scalar_t>(), variances, steps, nngp_out.numel());
      }
      return;
    }
    const int64_t in_entries = entries_of(steps.front().in, n_dims);
    const int64_t out_entries = entries_of(steps.back().out, n_dims);
    const scalar_t* nngp_ptr = nngp.data_ptr<scalar_t>();
    const scalar_t* ntk_ptr = ntk.defined() ? ntk.data_ptr<scalar_t>() : nullptr;
    scalar_t* nngp_out_ptr = nngp_out.data_ptr<scalar_t>();
    scalar_t* ntk_out_ptr = ntk.defined() ? ntk_out.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, nngp_out.numel() / out_entries, 1, [&](int64_t begin, int64_t end) {
      PairChain<scalar_t> chain(steps, n_dims);
      for (int64_t p = begin; p < end; ++p) {
        chain.run(nngp_ptr + p * in_entries, ntk_ptr ? ntk_ptr + p * in_entries : nullptr,
                  nngp_out_ptr + p * out_entries, ntk_ptr ? ntk_out_ptr + p * out_entries : nullptr,
                  variances, p / n2, p % n2);
      }
    });
  });
}

}  // namespace

std::vector<torch::Tensor> conv_chain_self(const torch::Tensor& cov_in,
                                           const std::vector<std::vector<double>>& encoded) {
  check_pairs("conv_chain_self", cov_in, 1);
  const torch::Tensor cov = cov_in.contiguous();
  const std::vector<Step> steps = parse_steps(encoded, spatial_sizes(cov, 1));
  TORCH_CHECK(!steps.empty(), "conv_chain_self: no steps");
  const int n_dims = (cov.dim() - 1) / 2;
  const int64_t n = cov.size(0);
  torch::Tensor cov_out = torch::empty(pair_shape({n}, steps.back().out, n_dims), cov.options());
  std::vector<torch::Tensor> record;
  for (const Step& step : steps) {
    if (step.kind == kABRelu) {
      record.push_back(torch::empty({n, positions_of(step.in, n_dims)}, cov.options()));
    }
  }
  torch::Tensor no_ntk;
  run_chain(cov, no_ntk, cov_out, no_ntk, {}, {}, record, steps, n_dims, 1);
  record.insert(record.begin(), cov_out);
  return record;
}

std::vector<torch::Tensor> conv_chain_pairs(const torch::Tensor& nngp_in,
                                            const c10::optional<torch::Tensor>& ntk_in,
                                            const std::vector<torch::Tensor>& variances1_in,
                                            const std::vector<torch::Tensor>& variances2_in,
                                            const std::vector<std::vector<double>>& encoded) {
  check_pairs("conv_chain_pairs", nngp_in, 2);
  const torch::Tensor nngp = nngp_in.contiguous();
  torch::Tensor ntk;
  if (ntk_in.has_value()) {
    TORCH_CHECK(ntk_in->scalar_type() == nngp.scalar_type() && ntk_in->device() == nngp.device(),
                "conv_chain_pairs: ntk must have nngp's dtype and device");
    // The inputs' NTK is a scalar zero: flat kernels on the CPU fill the
    // output with it instead of materializing a broadcast copy.
    const bool fill = nngp.dim() == 2 && nngp.device().is_cpu() && ntk_in->numel() == 1;
    ntk = fill ? ntk_in->reshape({}) : ntk_in->expand_as(nngp).contiguous();
  }
  const std::vector<Step> steps = parse_steps(encoded, spatial_sizes(nngp, 2));
  TORCH_CHECK(!steps.empty(), "conv_chain_pairs: no steps");
  const int n_dims = (nngp.dim() - 2) / 2;
  const int64_t n1 = nngp.size(0), n2 = nngp.size(1);
  std::vector<torch::Tensor> variances1, variances2, no_record;
  for (const Step& step : steps) {
    if (step.kind != kABRelu) continue;
    const size_t l = variances1.size();
    TORCH_CHECK(l < variances1_in.size() && l < variances2_in.size(),
                "conv_chain_pairs: one variance table per nonlinearity is needed");
    const int64_t positions = positions_of(step.in, n_dims);
    for (const auto& [tables, given, count] :
         {std::tuple{&variances1, &variances1_in, n1}, std::tuple{&variances2, &variances2_in, n2}}) {
      const torch::Tensor& table = (*given)[l];
      TORCH_CHECK(table.scalar_type() == nngp.scalar_type() && table.device() == nngp.device() &&
                      table.numel() == count * positions,
                  "conv_chain_pairs: variance table ", l, " must hold ", count, " x ", positions,
                  " entries of nngp's dtype and device, got ", table.sizes());
      tables->push_back(table.contiguous());
    }
  }
  torch::Tensor nngp_out = torch::empty(pair_shape({n1, n2}, steps.back().out, n_dims),
                                        nngp.options());
  torch::Tensor ntk_out = ntk.defined() ? torch::empty_like(nngp_out) : torch::Tensor();
  run_chain(nngp, ntk, nngp_out, ntk_out, variances1, variances2, no_record, steps, n_dims, n2);
  return {nngp_out, ntk_out};
}

}  // namespace torchntk
