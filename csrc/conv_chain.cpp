// conv_chain: a run of shared-weight convolutions, pooling and ABRelu-family
// nonlinearities applied to full spatial covariances, one pair of examples at
// a time, all layers in a row. CPU here, CUDA in conv_chain_cuda.cu.
//
// Layer by layer, every step streams the whole (N1, N2, X, X', Y, Y')
// covariances through memory several times (window sums per dimension,
// affine map, nonlinearity, fresh tensors). Here a pair's covariance goes
// through all layers in per-thread buffers, and each linear step is one pass:
//
//   Affine (Novak et al. 2019, eq. 7): A = the diagonal window sum along
//          every spatial dimension, divided by the window size;
//          nngp' = α·A(nngp) + β, ntk' = γ·A(nngp) + α·A(ntk) + δ.
//   Pool   (Novak et al. 2019, §3.2): the same with the box window sum.
//   ABRelu (Cho & Saul 2009): abrelu_entry in conv_chain.h.
//
// A linear step walks the output one block of the innermost spatial pair
// (Y, Y') at a time: the window's taps along the outer dimensions are summed
// into a padded (Y, Y') matrix in L1, whose own window sums give the block,
// and the affine map and the following nonlinearity are applied to it there
// (chain_kernels.cpp). Stride-1 convolutions never mix the diagonals q − p
// of the outermost pair (X, X'), so runs of them take one diagonal at a time
// through all their steps (PairChain::run_by_diagonals, pair_chain.h): a few
// hundred KiB stay in L2 where the whole pair (8 MiB at 32x32 in float64)
// would not.
//
// The nonlinearity needs each example's variances at its input. They come
// from a first pass over the examples' own covariances (conv_chain_self,
// which reads them off its diagonal and returns them; there the nonlinearity
// runs after the step, once the whole diagonal is known) and are looked up by
// the pass over pairs (conv_chain_pairs). Both passes do the same arithmetic
// per entry, so an example paired with itself gets its own covariance exactly.
//
// This file: the steps read from Python's records, the checks of the
// arguments, and the four passes (examples or pairs, flat or spatial).
#include <ATen/Parallel.h>

#include <atomic>
#include <cmath>
#include <string>
#include <utility>

#include "chain_plan.h"
#include "extension.h"
#include "huge_pages.h"
#include "pair_chain.h"

namespace torchntk {
namespace {

using chain::Item;
using chain::PairChain;
using chain::Variances;

// The records' field names as Python strings, made once per call: a lookup
// by a C string makes a new string (and hashes it) every time.
struct FieldNames {
  pybind11::str kind{"kind"}, W_var{"W_var"}, b_var{"b_var"}, gamma{"gamma"}, delta{"delta"},
      scale{"scale"}, a{"a"}, b{"b"}, circular{"circular"}, windows{"windows"}, size{"size"},
      stride{"stride"}, pad_low{"pad_low"}, pad_high{"pad_high"};
};

template <typename Value>
Value field(const pybind11::handle& record, const pybind11::str& name) {
  return record.attr(name).cast<Value>();
}

// A linear step's windows, `record.windows` (torchntk.ops.conv_chain.Window,
// one per spatial dimension, its padding given), taking `sizes` to the
// step's output sizes.
void read_windows(const pybind11::handle& record, const FieldNames& names, Step& step,
                  std::vector<int64_t>& sizes) {
  step.circular = field<bool>(record, names.circular);
  const auto windows = field<std::vector<pybind11::object>>(record, names.windows);
  TORCH_CHECK(windows.size() == sizes.size(), "conv_chain: a step with ", windows.size(),
              " windows on ", sizes.size(), " spatial dimensions");
  for (size_t d = 0; d < sizes.size(); ++d) {
    step.k[d] = field<int64_t>(windows[d], names.size);
    step.stride[d] = field<int64_t>(windows[d], names.stride);
    step.pad_low[d] = field<int64_t>(windows[d], names.pad_low);
    step.pad_high[d] = field<int64_t>(windows[d], names.pad_high);
    TORCH_CHECK(step.k[d] >= 1 && step.stride[d] >= 1 && step.pad_low[d] >= 0 &&
                    step.pad_high[d] >= 0 && sizes[d] + step.pad_low[d] + step.pad_high[d] >= step.k[d],
                "conv_chain: invalid window ", step.k[d], " on size ", sizes[d]);
    sizes[d] = output_size(sizes[d], step.k[d], step.stride[d], step.pad_low[d], step.pad_high[d]);
  }
}

// The steps of the records `AffineStep`, `PoolStep` and `ABReluStep` of
// torchntk/ops/conv_chain.py, read by field name; `sizes` are the input's
// spatial sizes, and each step records its own.
std::vector<Step> read_steps(const std::vector<pybind11::object>& records,
                             std::vector<int64_t> sizes) {
  TORCH_CHECK(sizes.size() <= kMaxSpatial, "conv_chain: 0 to 3 spatial dimensions, got ",
              sizes.size());
  TORCH_CHECK(!records.empty(), "conv_chain: no steps");
  const FieldNames names;
  std::vector<Step> steps;
  for (const pybind11::object& record : records) {
    Step step{};
    std::copy(sizes.begin(), sizes.end(), step.in);
    const auto kind = field<std::string>(record, names.kind);
    if (kind == "affine") {
      step.kind = kAffine;
      step.alpha = field<double>(record, names.W_var), step.beta = field<double>(record, names.b_var);
      step.gamma = field<double>(record, names.gamma), step.delta = field<double>(record, names.delta);
      read_windows(record, names, step, sizes);
    } else if (kind == "pool") {
      step.kind = kPool;
      step.alpha = field<double>(record, names.scale);
      read_windows(record, names, step, sizes);
    } else if (kind == "abrelu") {
      step.kind = kABRelu;
      const double a = field<double>(record, names.a), b = field<double>(record, names.b);
      step.k1 = (a - b) * (a - b) / (2 * M_PI);
      step.c0 = (a * a + b * b) / 2 - step.k1 * M_PI / 2;
    } else {
      TORCH_CHECK(false, "conv_chain: unknown step kind '", kind, "'");
    }
    std::copy(sizes.begin(), sizes.end(), step.out);
    steps.push_back(step);
  }
  return steps;
}

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

// Pair t of a symmetric n x n batch, the dearest first: the pairs i < j row
// by row, then the examples with themselves (i, i), half their cost.
std::pair<int64_t, int64_t> symmetric_pair(int64_t t, int64_t n) {
  const int64_t distinct = n * (n - 1) / 2;
  if (t >= distinct) return {t - distinct, t - distinct};
  // Row i (i < n − 1) starts at s_i = i(n − 1) − i(i − 1)/2: the root of
  // s_i = t, then exact.
  const double b = 2.0 * n - 1;
  int64_t i = static_cast<int64_t>((b - std::sqrt(b * b - 8.0 * t)) / 2);
  auto start = [n](int64_t row) { return row * (n - 1) - row * (row - 1) / 2; };
  while (i > 0 && start(i) > t) --i;
  while (start(i + 1) <= t) ++i;
  return {i, i + 1 + t - start(i)};
}

template <typename T>
T* data_or_null(const torch::Tensor& tensor) {
  return tensor.defined() ? tensor.data_ptr<T>() : nullptr;
}

// The variance tables as pointers: read by the pass over pairs (`first`,
// `second`), or written by the pass over examples (`record`).
template <typename T>
Variances<T> variance_pointers(const std::vector<torch::Tensor>& first,
                               const std::vector<torch::Tensor>& second,
                               const std::vector<torch::Tensor>& record) {
  Variances<T> variances;
  for (const auto& table : first) variances.first.push_back(table.data_ptr<T>());
  for (const auto& table : second) variances.second.push_back(table.data_ptr<T>());
  for (const auto& table : record) variances.record.push_back(table.data_ptr<T>());
  return variances;
}

// Calls work(chain, t) for t < count on every thread, each with its own
// PairChain of `items`; threads take the next t as they finish one (pairs
// differ in cost).
template <typename T, typename Work>
void for_each_pair(const std::vector<Item<T>>& items, int n_dims, int64_t count,
                   const Work& work) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    PairChain<T> chain(items, n_dims);
    for (int64_t t = next++; t < count; t = next++) work(chain, t);
  });
}

// The pass over flat examples (N,): each variance through every step.
template <typename T>
void examples_flat(const std::vector<Step>& steps, const torch::Tensor& cov,
                   torch::Tensor& cov_out, const std::vector<torch::Tensor>& record) {
  chain::run_flat_self(chain::plan_pass<T>(steps, 0, false), cov.data_ptr<T>(),
                       cov_out.data_ptr<T>(), cov.numel(), variance_pointers<T>({}, {}, record));
}

// The pass over examples' own spatial covariances (N, X, X', …). Where the
// variances lie on the diagonal of the outermost pair, PairChain::run_self
// takes that diagonal alone through the steps first (and the whole
// covariance only where `cov_out` is defined); else each example runs as the
// pair (example, example), recording its variances as it goes.
template <typename T>
void examples_spatial(const std::vector<Step>& steps, int n_dims, const torch::Tensor& cov,
                      torch::Tensor& cov_out, const std::vector<torch::Tensor>& record) {
  const Variances<T> variances = variance_pointers<T>({}, {}, record);
  const std::vector<Item<T>> unfused = chain::plan_pass<T>(steps, n_dims, false);
  const int64_t in_entries = entries_of(steps.front().in, n_dims);
  const int64_t out_entries = entries_of(steps.back().out, n_dims);
  const T* in = cov.data_ptr<T>();
  T* out = data_or_null<T>(cov_out);
  if (chain::variances_on_the_diagonal(steps, n_dims)) {
    const std::vector<Item<T>> fused = chain::plan_pass<T>(steps, n_dims, true);
    for_each_pair(fused, n_dims, cov.size(0), [&](PairChain<T>& chain, int64_t t) {
      chain.run_self(unfused, in + t * in_entries, out ? out + t * out_entries : nullptr, t,
                     variances);
    });
    return;
  }
  for_each_pair(unfused, n_dims, cov.size(0), [&](PairChain<T>& chain, int64_t t) {
    chain.run(in + t * in_entries, nullptr, out + t * out_entries, nullptr, variances, t, 0);
  });
}

// The pass over flat pairs (N1, N2): a row of pairs at a time. `ntk` may be
// a scalar for every pair.
template <typename T>
void pairs_flat(const std::vector<Step>& steps, const torch::Tensor& nngp,
                const torch::Tensor& ntk, torch::Tensor& nngp_out, torch::Tensor& ntk_out,
                const Variances<T>& variances) {
  const std::vector<Item<T>> items = chain::plan_pass<T>(steps, 0, true);
  const int64_t n2 = nngp.size(1);
  const bool ntk_scalar = ntk.defined() && ntk.dim() == 0;
  const T* nngp_in = nngp.data_ptr<T>();
  const T* ntk_in = data_or_null<T>(ntk);
  T* nngp_to = nngp_out.data_ptr<T>();
  T* ntk_to = data_or_null<T>(ntk_out);
  at::parallel_for(0, nngp.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      chain::run_flat_row(items, nngp_in + i * n2,
                          ntk_in ? ntk_in + (ntk_scalar ? 0 : i * n2) : nullptr, ntk_scalar,
                          nngp_to + i * n2, ntk_to ? ntk_to + i * n2 : nullptr, n2, variances, i);
    }
  });
}

// The pass over spatial pairs (N1, N2, X, X', …); `symmetric` (one batch
// with itself): the pairs i <= j, and (j, i) their transposes. `ntk` may be
// a scalar zero (0-dim): then the NTK starts from zeros.
template <typename T>
void pairs_spatial(const std::vector<Step>& steps, int n_dims, const torch::Tensor& nngp,
                   const torch::Tensor& ntk, torch::Tensor& nngp_out, torch::Tensor& ntk_out,
                   const Variances<T>& variances, bool symmetric) {
  const std::vector<Item<T>> items = chain::plan_pass<T>(steps, n_dims, true);
  const int64_t n2 = nngp.size(1);
  const int64_t in_entries = entries_of(steps.front().in, n_dims);
  const int64_t out_entries = entries_of(steps.back().out, n_dims);
  const T* nngp_in = nngp.data_ptr<T>();
  const T* ntk_in = ntk.defined() && ntk.dim() > 0 ? ntk.data_ptr<T>() : nullptr;
  T* nngp_to = nngp_out.data_ptr<T>();
  T* ntk_to = data_or_null<T>(ntk_out);
  const int64_t count = symmetric ? n2 * (n2 + 1) / 2 : nngp.size(0) * n2;
  for_each_pair(items, n_dims, count, [&](PairChain<T>& chain, int64_t t) {
    const auto [i, j] = symmetric ? symmetric_pair(t, n2) : std::pair(t / n2, t % n2);
    const int64_t p = i * n2 + j;
    chain.run(nngp_in + p * in_entries, ntk_in ? ntk_in + p * in_entries : nullptr,
              nngp_to + p * out_entries, ntk_to ? ntk_to + p * out_entries : nullptr, variances,
              i, j, symmetric && i == j);
    if (!symmetric || i == j) return;
    for (T* out : {nngp_to, ntk_to}) {
      if (out) {
        chain::transposed_pair(out + p * out_entries, out + (j * n2 + i) * out_entries,
                               steps.back().out, n_dims);
      }
    }
  });
}

}  // namespace

std::vector<torch::Tensor> conv_chain_self(const torch::Tensor& cov_in,
                                           const std::vector<pybind11::object>& records,
                                           bool with_covariance) {
  check_pairs("conv_chain_self", cov_in, 1);
  const torch::Tensor cov = cov_in.contiguous();
  const std::vector<Step> steps = read_steps(records, spatial_sizes(cov, 1));
  const int n_dims = (cov.dim() - 1) / 2;
  const int64_t n = cov.size(0);
  // On the CPU the variances alone can cost less than the covariances.
  const bool variances_only = !with_covariance && cov.device().is_cpu() &&
                              chain::variances_on_the_diagonal(steps, n_dims);
  torch::Tensor cov_out;
  if (!variances_only) cov_out = empty_huge_pages(pair_shape({n}, steps.back().out, n_dims), cov.options());
  std::vector<torch::Tensor> record;
  for (const Step& step : steps) {
    if (step.kind == kABRelu) {
      record.push_back(torch::empty({n, positions_of(step.in, n_dims)}, cov.options()));
    }
  }
#ifdef TORCHNTK_WITH_CUDA
  if (cov.is_cuda()) {
    torch::Tensor no_ntk;
    conv_chain_cuda(cov, no_ntk, cov_out, no_ntk, {}, {}, record, steps, n_dims, 1);
  }
#endif
  if (cov.device().is_cpu()) {
    AT_DISPATCH_FLOATING_TYPES(cov.scalar_type(), "conv_chain_self", [&] {
      if (n_dims == 0) examples_flat<scalar_t>(steps, cov, cov_out, record);
      else examples_spatial<scalar_t>(steps, n_dims, cov, cov_out, record);
    });
  }
  record.insert(record.begin(), cov_out);
  return record;
}

std::vector<torch::Tensor> conv_chain_pairs(const torch::Tensor& nngp_in,
                                            const c10::optional<torch::Tensor>& ntk_in,
                                            const std::vector<torch::Tensor>& variances1_in,
                                            const std::vector<torch::Tensor>& variances2_in,
                                            const std::vector<pybind11::object>& records,
                                            bool symmetric) {
  check_pairs("conv_chain_pairs", nngp_in, 2);
  TORCH_CHECK(!symmetric || nngp_in.size(0) == nngp_in.size(1),
              "conv_chain_pairs: symmetric pairs need N1 == N2, got ", nngp_in.sizes());
  const torch::Tensor nngp = nngp_in.contiguous();
  torch::Tensor ntk;
  if (ntk_in.has_value()) {
    TORCH_CHECK(ntk_in->scalar_type() == nngp.scalar_type() && ntk_in->device() == nngp.device(),
                "conv_chain_pairs: ntk must have nngp's dtype and device");
    // The inputs' NTK is a scalar zero. On the CPU it is not materialized as
    // a broadcast copy: flat kernels fill the output with a scalar NTK, and
    // spatial ones start from zeros (a 0-dim `ntk`).
    const bool scalar = nngp.device().is_cpu() && ntk_in->numel() == 1 &&
                        (nngp.dim() == 2 || ntk_in->item<double>() == 0.);
    ntk = scalar ? ntk_in->reshape({}) : ntk_in->expand_as(nngp).contiguous();
  }
  const std::vector<Step> steps = read_steps(records, spatial_sizes(nngp, 2));
  const int n_dims = (nngp.dim() - 2) / 2;
  const int64_t n1 = nngp.size(0), n2 = nngp.size(1);
  std::vector<torch::Tensor> variances1, variances2;
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
  torch::Tensor nngp_out = empty_huge_pages(pair_shape({n1, n2}, steps.back().out, n_dims),
                                            nngp.options());
  torch::Tensor ntk_out = ntk.defined() ? empty_huge_pages(nngp_out.sizes(), nngp_out.options())
                                        : torch::Tensor();
#ifdef TORCHNTK_WITH_CUDA
  if (nngp.is_cuda()) {
    std::vector<torch::Tensor> no_record;
    conv_chain_cuda(nngp, ntk, nngp_out, ntk_out, variances1, variances2, no_record, steps,
                    n_dims, n2);
  }
#endif
  if (nngp.device().is_cpu()) {
    AT_DISPATCH_FLOATING_TYPES(nngp.scalar_type(), "conv_chain_pairs", [&] {
      const Variances<scalar_t> variances = variance_pointers<scalar_t>(variances1, variances2, {});
      if (n_dims == 0) pairs_flat<scalar_t>(steps, nngp, ntk, nngp_out, ntk_out, variances);
      else pairs_spatial<scalar_t>(steps, n_dims, nngp, ntk, nngp_out, ntk_out, variances, symmetric);
    });
  }
  return {nngp_out, ntk_out};
}

}  // namespace torchntk
