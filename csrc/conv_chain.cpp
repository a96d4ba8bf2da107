// conv_chain: a run of shared-weight convolutions and ABRelu-family
// nonlinearities applied to full spatial covariances, one pair of examples at
// a time, all layers in a row (CPU).
//
// Layer by layer, every step streams the whole (N1, N2, X, X', Y, Y')
// covariances through memory a dozen times (convolution per dimension,
// affine map, nonlinearity, fresh tensors). Here a pair's covariance (0.5 MiB
// for 16x16 in float64) goes through all layers in per-thread buffers that
// stay in cache, and the steps are fused:
//
//   Conv   (Novak et al. 2019, eq. 7): A = diagonal_conv along every spatial
//          dimension; nngp' = α·A(nngp) + β, ntk' = γ·A(nngp) + α·A(ntk) + δ.
//   ABRelu (Cho & Saul 2009): with s = sqrt(var1·var2 − c²), ψ = atan2(c, s),
//          d = (a² + b²)/2 − k1·π/2 + k1·ψ, k1 = (a − b)²/(2π):
//          nngp' = k1·s + c·d, ntk' = d·ntk.
//
// The nonlinearity needs each example's variances at its input. They come
// from a first pass over the examples' own covariances (conv_chain_self,
// which reads them off its diagonal and returns them) and are looked up by
// the pass over pairs (conv_chain_pairs). ψ is computed by a branch-free
// arctangent (Cephes' rational approximation, Moshier 1989, ~1 ulp) so that
// the loop vectorizes; the nonlinearity runs in double precision for float32
// covariances too.
#include "diagonal_conv.h"

#include "extension.h"

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace torchntk {
namespace {

enum StepKind { kConv = 0, kABRelu = 1 };

struct ConvDim {
  int64_t k, stride, pad_low, pad_high;
};

struct Step {
  StepKind kind;
  // Conv: the affine coefficients and the window per spatial dimension.
  double alpha = 0, beta = 0, gamma = 0, delta = 0;
  bool circular = false;
  std::vector<ConvDim> dims;
  // ABRelu: d = c0 + k1·ψ.
  double k1 = 0, c0 = 0;
};

// Steps arrive from Python as numbers:
//   conv:   [0, α, β, γ, δ, circular, n_dims, (k, stride, pad_low, pad_high) × n_dims]
//   abrelu: [1, a, b]
std::vector<Step> parse_steps(const std::vector<std::vector<double>>& encoded, int64_t n_dims) {
  std::vector<Step> steps;
  for (const auto& values : encoded) {
    TORCH_CHECK(!values.empty(), "conv_chain: empty step");
    Step step;
    if (values[0] == kConv) {
      TORCH_CHECK(values.size() == 7 + 4 * static_cast<size_t>(n_dims) && values[6] == n_dims,
                  "conv_chain: a conv step needs 7 + 4·", n_dims, " numbers, got ", values.size());
      step.kind = kConv;
      step.alpha = values[1], step.beta = values[2], step.gamma = values[3], step.delta = values[4];
      step.circular = values[5] != 0;
      for (int64_t d = 0; d < n_dims; ++d) {
        const double* w = values.data() + 7 + 4 * d;
        step.dims.push_back({int64_t(w[0]), int64_t(w[1]), int64_t(w[2]), int64_t(w[3])});
        TORCH_CHECK(step.dims.back().k >= 1 && step.dims.back().stride >= 1 &&
                        step.dims.back().pad_low >= 0 && step.dims.back().pad_high >= 0,
                    "conv_chain: invalid window");
      }
    } else if (values[0] == kABRelu) {
      TORCH_CHECK(values.size() == 3, "conv_chain: an abrelu step needs 3 numbers");
      step.kind = kABRelu;
      const double a = values[1], b = values[2];
      step.k1 = (a - b) * (a - b) / (2 * M_PI);
      step.c0 = (a * a + b * b) / 2 - step.k1 * M_PI / 2;
    } else {
      TORCH_CHECK(false, "conv_chain: unknown step kind ", values[0]);
    }
    steps.push_back(step);
  }
  return steps;
}

// Spatial sizes after every step (index 0: the input).
std::vector<std::vector<int64_t>> sizes_after_steps(const std::vector<Step>& steps,
                                                    std::vector<int64_t> sizes) {
  std::vector<std::vector<int64_t>> all{sizes};
  for (const Step& step : steps) {
    if (step.kind == kConv) {
      for (size_t d = 0; d < sizes.size(); ++d) {
        const ConvDim& w = step.dims[d];
        TORCH_CHECK(sizes[d] + w.pad_low + w.pad_high >= w.k, "conv_chain: window ", w.k,
                    " exceeds the padded size ", sizes[d] + w.pad_low + w.pad_high);
        sizes[d] = output_size(sizes[d], w.k, w.stride, w.pad_low, w.pad_high);
      }
    }
    all.push_back(sizes);
  }
  return all;
}

int64_t product(const std::vector<int64_t>& sizes, int64_t power) {
  int64_t result = 1;
  for (int64_t size : sizes) result *= power == 1 ? size : size * size;
  return result;
}

// atan(r) for r in [0, 1], branch-free (Cephes atan: reduction at tan(π/8)·…,
// rational approximation of degree 4/5 in r²).
inline double atan_unit(double r) {
  const bool reduced = r > 0.66;
  const double x = reduced ? (r - 1.0) / (r + 1.0) : r;
  const double z = x * x;
  const double p = (((-8.750608600031904122785e-1 * z - 1.615753718733365076637e1) * z -
                     7.500855792314704667340e1) * z - 1.228866684490136173410e2) * z -
                   6.485021904942025371773e1;
  const double q = ((((z + 2.485846490142306297962e1) * z + 1.650270098316988542046e2) * z +
                     4.328810604912902668951e2) * z + 4.853903996359136964868e2) * z +
                   1.945506571482613964425e2;
  const double base = reduced ? M_PI_4 + 0.5 * 6.123233995736765886130e-17 : 0.0;
  return base + (x + x * z * p / q);
}

// atan2(c, s) for s >= 0, in [-π/2, π/2]; 0 when c = s = 0.
inline double atan2_nonnegative(double c, double s) {
  const double t = std::fabs(c);
  const double low = std::min(t, s), high = std::max(t, s);
  const double angle = atan_unit(high > 0 ? low / high : 0.0);
  const double magnitude = t > s ? M_PI_2 - angle : angle;
  return c < 0 ? -magnitude : magnitude;
}

// One row of entries sharing var1 (the innermost spatial pair varies var2).
template <typename scalar_t, bool with_ntk>
inline void abrelu_row(scalar_t* __restrict__ nngp, scalar_t* __restrict__ ntk, double var1,
                       const scalar_t* __restrict__ var2, int64_t n, double k1, double c0) {
#pragma omp simd
  for (int64_t q = 0; q < n; ++q) {
    const double c = nngp[q];
    const double s = std::sqrt(std::max(var1 * double(var2[q]) - c * c, 0.0));
    const double d = c0 + k1 * atan2_nonnegative(c, s);
    nngp[q] = scalar_t(k1 * s + c * d);
    if (with_ntk) ntk[q] = scalar_t(d * double(ntk[q]));
  }
}

#define TORCHNTK_ABRELU_ROWS(scalar_t, suffix, with_ntk)                                          \
  TORCHNTK_TARGET_CLONES void abrelu_rows_##suffix##_##with_ntk(                                 \
      scalar_t* nngp, scalar_t* ntk, const scalar_t* var1, const scalar_t* var2,                  \
      const int64_t* row_var1, const int64_t* row_var2, int64_t rows, int64_t n, double k1,       \
      double c0) {                                                                                \
    for (int64_t r = 0; r < rows; ++r)                                                            \
      abrelu_row<scalar_t, with_ntk>(nngp + r * n, with_ntk ? ntk + r * n : nullptr,              \
                                     double(var1[row_var1[r]]), var2 + row_var2[r], n, k1, c0);   \
  }

TORCHNTK_ABRELU_ROWS(float, f32, true)
TORCHNTK_ABRELU_ROWS(float, f32, false)
TORCHNTK_ABRELU_ROWS(double, f64, true)
TORCHNTK_ABRELU_ROWS(double, f64, false)

void abrelu_rows(float* nngp, float* ntk, const float* var1, const float* var2,
                 const int64_t* row_var1, const int64_t* row_var2, int64_t rows, int64_t n,
                 double k1, double c0) {
  if (ntk) abrelu_rows_f32_true(nngp, ntk, var1, var2, row_var1, row_var2, rows, n, k1, c0);
  else abrelu_rows_f32_false(nngp, ntk, var1, var2, row_var1, row_var2, rows, n, k1, c0);
}
void abrelu_rows(double* nngp, double* ntk, const double* var1, const double* var2,
                 const int64_t* row_var1, const int64_t* row_var2, int64_t rows, int64_t n,
                 double k1, double c0) {
  if (ntk) abrelu_rows_f64_true(nngp, ntk, var1, var2, row_var1, row_var2, rows, n, k1, c0);
  else abrelu_rows_f64_false(nngp, ntk, var1, var2, row_var1, row_var2, rows, n, k1, c0);
}

// For the pair layout (X, X', Y, Y', …) of spatial sizes `sizes`: rows run
// along the last X'; row r's first-example variance sits at row_var1[r] and
// its second-example variances start at row_var2[r], in (X, Y, …) tables.
// Also the offsets of the same-position entries (x, x, y, y, …).
struct PairIndex {
  std::vector<int64_t> row_var1, row_var2, diagonal;
  int64_t rows = 0, row_length = 0, positions = 0;

  explicit PairIndex(const std::vector<int64_t>& sizes) {
    const int64_t n_dims = sizes.size();
    row_length = sizes.back();
    positions = product(sizes, 1);
    rows = product(sizes, 2) / row_length;
    row_var1.resize(rows), row_var2.resize(rows);
    for (int64_t r = 0; r < rows; ++r) {
      // r enumerates (x_1, x_1', …, x_D) with x_D' left out, last fastest.
      int64_t rest = r, index1 = 0, index2 = 0, weight = 1;
      const int64_t x_last = rest % row_length;
      rest /= row_length;
      index1 = x_last;
      weight = row_length;
      for (int64_t d = n_dims - 2; d >= 0; --d) {
        const int64_t x2 = rest % sizes[d];
        rest /= sizes[d];
        const int64_t x1 = rest % sizes[d];
        rest /= sizes[d];
        index1 += x1 * weight;
        index2 += x2 * weight;
        weight *= sizes[d];
      }
      row_var1[r] = index1, row_var2[r] = index2;
    }
    diagonal.resize(positions);
    for (int64_t position = 0; position < positions; ++position) {
      int64_t rest = position, offset = 0, weight = 1;
      for (int64_t d = n_dims - 1; d >= 0; --d) {
        const int64_t x = rest % sizes[d];
        rest /= sizes[d];
        offset += x * (sizes[d] + 1) * weight;
        weight *= sizes[d] * sizes[d];
      }
      diagonal[position] = offset;
    }
  }
};

// Where a pass over pairs takes the nonlinearities' variances from.
template <typename scalar_t>
struct Variances {
  // Per ABRelu step: (N, positions) tables of the first and second examples.
  // Empty for the pass over the examples themselves, which reads them off
  // its own diagonal and, if `record` is given, stores them there.
  std::vector<const scalar_t*> first, second;
  std::vector<scalar_t*> record;
};

template <typename scalar_t>
class PairChain {
 public:
  PairChain(const std::vector<Step>& steps, const std::vector<std::vector<int64_t>>& sizes)
      : steps_(steps), sizes_(sizes) {
    for (size_t s = 0; s < steps.size(); ++s) {
      indices_.emplace_back(steps[s].kind == kABRelu ? PairIndex(sizes[s]) : PairIndex({1}));
    }
    const int64_t entries = product(sizes[0], 2);
    for (auto* buffer : {&a_, &a_spare_, &b_, &b_spare_}) buffer->resize(entries);
  }

  // Runs the chain on one pair: `nngp` (and `ntk` if not null) hold the input
  // entries; the results are written to `nngp_out`, `ntk_out`. `first`,
  // `second` index the examples in the variance tables.
  void run(const scalar_t* nngp, const scalar_t* ntk, scalar_t* nngp_out, scalar_t* ntk_out,
           const Variances<scalar_t>& variances, int64_t first, int64_t second) {
    const bool with_ntk = ntk != nullptr;
    int64_t entries = product(sizes_[0], 2);
    std::copy(nngp, nngp + entries, a_.data());
    if (with_ntk) std::copy(ntk, ntk + entries, b_.data());
    int64_t relu_index = 0;
    std::vector<scalar_t> own(variances.first.empty() ? product(sizes_[0], 1) : 0);
    for (size_t s = 0; s < steps_.size(); ++s) {
      const Step& step = steps_[s];
      if (step.kind == kConv) {
        convolve(step, sizes_[s], a_, a_spare_);
        if (with_ntk) convolve(step, sizes_[s], b_, b_spare_);
        entries = product(sizes_[s + 1], 2);
        scalar_t* a = a_.data();
        scalar_t* b = b_.data();
        const scalar_t alpha = step.alpha, beta = step.beta, gamma = step.gamma,
                       delta = step.delta;
        if (with_ntk) {
          for (int64_t e = 0; e < entries; ++e) b[e] = gamma * a[e] + (alpha * b[e] + delta);
        }
        for (int64_t e = 0; e < entries; ++e) a[e] = beta + alpha * a[e];
        continue;
      }
      const PairIndex& index = indices_[s];
      const scalar_t *var1, *var2;
      if (variances.first.empty()) {
        own.resize(index.positions);
        for (int64_t x = 0; x < index.positions; ++x) own[x] = a_[index.diagonal[x]];
        if (!variances.record.empty()) {
          std::copy(own.begin(), own.end(), variances.record[relu_index] + first * index.positions);
        }
        var1 = var2 = own.data();
      } else {
        var1 = variances.first[relu_index] + first * index.positions;
        var2 = variances.second[relu_index] + second * index.positions;
      }
      abrelu_rows(a_.data(), with_ntk ? b_.data() : nullptr, var1, var2, index.row_var1.data(),
                  index.row_var2.data(), index.rows, index.row_length, step.k1, step.c0);
      ++relu_index;
    }
    std::copy(a_.data(), a_.data() + entries, nngp_out);
    if (with_ntk) std::copy(b_.data(), b_.data() + entries, ntk_out);
  }

 private:
  // The unit-variance convolution map along every spatial dimension, in place
  // in `buffer` (using `spare`).
  static void convolve(const Step& step, std::vector<int64_t> sizes, std::vector<scalar_t>& buffer,
                       std::vector<scalar_t>& spare) {
    for (size_t d = 0; d < sizes.size(); ++d) {
      const ConvDim& w = step.dims[d];
      int64_t outer = 1, inner = 1;
      for (size_t e = 0; e < d; ++e) outer *= sizes[e] * sizes[e];
      for (size_t e = d + 1; e < sizes.size(); ++e) inner *= sizes[e] * sizes[e];
      const int64_t out_size = output_size(sizes[d], w.k, w.stride, w.pad_low, w.pad_high);
      forward_rows(buffer.data(), spare.data(), 0, outer * out_size, sizes[d], out_size, inner,
                   w.k, w.stride, w.pad_low, step.circular);
      buffer.swap(spare);
      sizes[d] = out_size;
    }
  }

  const std::vector<Step>& steps_;
  const std::vector<std::vector<int64_t>>& sizes_;
  std::vector<PairIndex> indices_;
  std::vector<scalar_t> a_, a_spare_, b_, b_spare_;
};

void check_pairs(const char* name, const torch::Tensor& tensor, int64_t batch_dims) {
  TORCH_CHECK(tensor.device().is_cpu(), name, ": expected a CPU tensor, got ", tensor.device());
  TORCH_CHECK(tensor.scalar_type() == torch::kFloat || tensor.scalar_type() == torch::kDouble,
              name, ": expected float32 or float64, got ", tensor.scalar_type());
  const int64_t spatial = tensor.dim() - batch_dims;
  TORCH_CHECK(spatial >= 2 && spatial % 2 == 0, name, ": expected (batch…, X, X', Y, Y', …), got ",
              tensor.sizes());
  for (int64_t d = batch_dims; d < tensor.dim(); d += 2) {
    TORCH_CHECK(tensor.size(d) == tensor.size(d + 1), name,
                ": the axes of each spatial pair must be equal, got ", tensor.sizes());
  }
}

std::vector<int64_t> spatial_sizes(const torch::Tensor& tensor, int64_t batch_dims) {
  std::vector<int64_t> sizes;
  for (int64_t d = batch_dims; d < tensor.dim(); d += 2) sizes.push_back(tensor.size(d));
  return sizes;
}

std::vector<int64_t> output_shape(std::vector<int64_t> batch, const std::vector<int64_t>& sizes) {
  for (int64_t size : sizes) batch.push_back(size), batch.push_back(size);
  return batch;
}

}  // namespace

std::vector<torch::Tensor> conv_chain_self(const torch::Tensor& cov_in,
                                           const std::vector<std::vector<double>>& encoded) {
  check_pairs("conv_chain_self", cov_in, 1);
  const torch::Tensor cov = cov_in.contiguous();
  const std::vector<int64_t> sizes = spatial_sizes(cov, 1);
  const std::vector<Step> steps = parse_steps(encoded, sizes.size());
  const auto all_sizes = sizes_after_steps(steps, sizes);
  const int64_t n = cov.size(0);
  std::vector<torch::Tensor> outputs{torch::empty(output_shape({n}, all_sizes.back()),
                                                  cov.options())};
  for (size_t s = 0; s < steps.size(); ++s) {
    if (steps[s].kind == kABRelu) {
      outputs.push_back(torch::empty({n, product(all_sizes[s], 1)}, cov.options()));
    }
  }
  AT_DISPATCH_FLOATING_TYPES(cov.scalar_type(), "conv_chain_self", [&] {
    Variances<scalar_t> variances;
    for (size_t t = 1; t < outputs.size(); ++t) variances.record.push_back(outputs[t].data_ptr<scalar_t>());
    const int64_t in_entries = product(sizes, 2), out_entries = product(all_sizes.back(), 2);
    const scalar_t* in = cov.data_ptr<scalar_t>();
    scalar_t* out = outputs[0].data_ptr<scalar_t>();
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      PairChain<scalar_t> chain(steps, all_sizes);
      for (int64_t i = begin; i < end; ++i) {
        chain.run(in + i * in_entries, nullptr, out + i * out_entries, nullptr, variances, i, i);
      }
    });
  });
  return outputs;
}

std::vector<torch::Tensor> conv_chain_pairs(const torch::Tensor& nngp_in,
                                            const c10::optional<torch::Tensor>& ntk_in,
                                            const std::vector<torch::Tensor>& var1_in,
                                            const std::vector<torch::Tensor>& var2_in,
                                            const std::vector<std::vector<double>>& encoded) {
  check_pairs("conv_chain_pairs", nngp_in, 2);
  const torch::Tensor nngp = nngp_in.contiguous();
  const bool with_ntk = ntk_in.has_value();
  const torch::Tensor ntk = with_ntk ? ntk_in->expand_as(nngp).contiguous() : torch::Tensor();
  if (with_ntk) {
    TORCH_CHECK(ntk.scalar_type() == nngp.scalar_type() && ntk.device().is_cpu(),
                "conv_chain_pairs: ntk must have nngp's dtype and device");
  }
  const std::vector<int64_t> sizes = spatial_sizes(nngp, 2);
  const std::vector<Step> steps = parse_steps(encoded, sizes.size());
  const auto all_sizes = sizes_after_steps(steps, sizes);
  const int64_t n1 = nngp.size(0), n2 = nngp.size(1);
  std::vector<torch::Tensor> var1, var2;
  for (size_t s = 0, l = 0; s < steps.size(); ++s) {
    if (steps[s].kind != kABRelu) continue;
    TORCH_CHECK(l < var1_in.size() && l < var2_in.size(),
                "conv_chain_pairs: one variance table per nonlinearity is needed");
    const int64_t positions = product(all_sizes[s], 1);
    for (auto [tables, given, count] : {std::tuple{&var1, &var1_in, n1}, std::tuple{&var2, &var2_in, n2}}) {
      const torch::Tensor& table = (*given)[l];
      TORCH_CHECK(table.scalar_type() == nngp.scalar_type() && table.numel() == count * positions,
                  "conv_chain_pairs: variance table ", l, " must hold ", count, " x ", positions,
                  " entries of nngp's dtype, got ", table.sizes());
      tables->push_back(table.contiguous());
    }
    ++l;
  }
  torch::Tensor nngp_out = torch::empty(output_shape({n1, n2}, all_sizes.back()), nngp.options());
  torch::Tensor ntk_out = with_ntk ? torch::empty_like(nngp_out) : torch::Tensor();
  AT_DISPATCH_FLOATING_TYPES(nngp.scalar_type(), "conv_chain_pairs", [&] {
    Variances<scalar_t> variances;
    for (size_t l = 0; l < var1.size(); ++l) {
      variances.first.push_back(var1[l].data_ptr<scalar_t>());
      variances.second.push_back(var2[l].data_ptr<scalar_t>());
    }
    const int64_t in_entries = product(sizes, 2), out_entries = product(all_sizes.back(), 2);
    const scalar_t* nngp_ptr = nngp.data_ptr<scalar_t>();
    const scalar_t* ntk_ptr = with_ntk ? ntk.data_ptr<scalar_t>() : nullptr;
    scalar_t* nngp_out_ptr = nngp_out.data_ptr<scalar_t>();
    scalar_t* ntk_out_ptr = with_ntk ? ntk_out.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, n1 * n2, 1, [&](int64_t begin, int64_t end) {
      PairChain<scalar_t> chain(steps, all_sizes);
      for (int64_t p = begin; p < end; ++p) {
        chain.run(nngp_ptr + p * in_entries, with_ntk ? ntk_ptr + p * in_entries : nullptr,
                  nngp_out_ptr + p * out_entries, with_ntk ? ntk_out_ptr + p * out_entries : nullptr,
                  variances, p / n2, p % n2);
      }
    });
  });
  return {nngp_out, ntk_out};
}

}  // namespace torchntk
