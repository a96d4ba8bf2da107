// The CPU chain's plan of a pass (conv_chain.cpp describes the chain): its
// items (a linear step with the nonlinearity it absorbs, or a nonlinearity on
// its own), their window geometry, the per-thread buffers, and the kernels
// compiled per instruction set that run them (chain_kernels.cpp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "conv_chain.h"

namespace torchntk {
namespace chain {

// A linear step's affine map of the window sums u (nngp) and v (ntk),
// nngp' = β + α·u and ntk' = γ·u + (α·v + δ) (α, γ include the window's
// 1/k), and the nonlinearity applied after it, if any.
template <typename T>
struct Epilogue {
  T alpha, beta, gamma, delta;
  bool relu;
  T k1, c0;
};

// One spatial dimension of a linear step. Padded positions a = s·p + i
// (output p, tap i < k) read position source[a] of the axis, or a zero (−1)
// in zero padding. The padded matrix of the innermost pair has `padded`
// entries a side: those read, and the axis itself at [pad_low, pad_low + size).
struct Axis {
  int64_t size, out_size, k, stride, pad_low, span, padded;
  bool circular;
  std::vector<int64_t> source;

  Axis(const Step& step, int d)
      : size(step.in[d]), out_size(step.out[d]), k(step.k[d]), stride(step.stride[d]),
        pad_low(step.pad_low[d]), span(step.stride[d] * (step.out[d] - 1) + step.k[d]),
        padded(std::max(span, step.pad_low[d] + step.in[d])), circular(step.circular) {
    for (int64_t a = 0; a < span; ++a) {
      const int64_t position = a - pad_low;
      const bool inside = position >= 0 && position < size;
      source.push_back(inside ? position : circular ? position - floor_div(position, size) * size : -1);
    }
  }
};

// A step as a pass runs it: a linear step (with the nonlinearity after it
// fused in the pass over pairs), or a nonlinearity on its own.
template <typename T>
struct Item {
  const Step* step;
  bool linear;
  bool box;                  // linear: Pool's box window (else Conv's diagonals)
  Epilogue<T> epilogue;      // linear
  std::vector<Axis> axes;    // linear, per spatial dimension
  int relu_index;            // the variance table of the (fused) nonlinearity, or −1
};

// For the pair layout (X, X', Y, Y', …) of spatial sizes `sizes`: rows run
// along the last X'; row r's first-example variance sits at row_var1[r] and
// its second-example variances start at row_var2[r], in (X, Y, …) tables.
// Also the offsets of the same-position entries (x, x, y, y, …).
struct PairIndex {
  std::vector<int64_t> row_var1, row_var2, diagonal;
  int64_t rows = 0, row_length = 1, positions = 1;

  PairIndex() = default;
  PairIndex(const int64_t* sizes, int n_dims) {
    row_length = n_dims > 0 ? sizes[n_dims - 1] : 1;
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

// The items of a pass; `fuse`: nonlinearities join the linear step before them.
template <typename T>
std::vector<Item<T>> plan_pass(const std::vector<Step>& steps, int n_dims, bool fuse) {
  std::vector<Item<T>> items;
  int relu_count = 0;
  for (size_t s = 0; s < steps.size(); ++s) {
    const Step& step = steps[s];
    Item<T> item{&step, step.kind != kABRelu, step.kind == kPool, {}, {}, -1};
    if (item.linear) {
      double unit = 1;  // Conv's A divides the diagonal sums by the window size
      for (int d = 0; d < n_dims; ++d) {
        item.axes.emplace_back(step, d);
        if (step.kind == kAffine) unit *= step.k[d];
      }
      item.epilogue = {T(step.alpha / unit), T(step.beta), T(step.gamma / unit), T(step.delta),
                       false, T(0), T(0)};
      if (fuse && s + 1 < steps.size() && steps[s + 1].kind == kABRelu) {
        item.epilogue.relu = true;
        item.epilogue.k1 = T(steps[s + 1].k1), item.epilogue.c0 = T(steps[s + 1].c0);
        item.relu_index = relu_count++;
        ++s;
      }
    } else {
      item.relu_index = relu_count++;
    }
    items.push_back(std::move(item));
  }
  return items;
}

// Scratch memory, left uninitialized: the pages of a buffer a pair's steps
// never touch (the layouts a run by diagonals skips) cost nothing.
template <typename T>
class Buffer {
 public:
  void resize(int64_t size) { data_.reset(new T[std::max<int64_t>(size, 1)]); }
  T* data() { return data_.get(); }

 private:
  std::unique_ptr<T[]> data_;
};

// Per-thread buffers of a linear step: the window sums of the outer
// dimensions (3 spatial dimensions), the padded matrices, a row of box sums.
template <typename T>
struct Scratch {
  Buffer<T> slab_a, slab_b, matrix_a, matrix_b, row;
  std::vector<int64_t> taps;
  std::vector<const T*> from_a, from_b;  // the rows a window sum adds
};

// Which outputs (p, q) of the outermost spatial pair a linear step computes,
// and where the input and output blocks sit: all pairs in the (X, X') layout,
// or (`one_diagonal`) only those with q − p = offset, in order of p, with the
// input, the output or both holding that diagonal's blocks alone.
struct OuterLayout {
  bool one_diagonal = false, in_diagonal = false, out_diagonal = false;
  int64_t offset = 0;

  int64_t first() const { return std::max<int64_t>(0, -offset); }
  int64_t in_block(int64_t p, int64_t q, int64_t size) const {
    return in_diagonal ? p - first() : p * size + q;
  }
  int64_t out_block(int64_t p, int64_t q, int64_t size) const {
    return out_diagonal ? p - first() : p * size + q;
  }
};

// Where a pass takes the nonlinearities' variances from: per ABRelu step,
// (N, positions) tables of the first and second examples of each pair; empty
// for the pass over the examples themselves, which reads them off its own
// diagonal and stores them in `record`.
template <typename T>
struct Variances {
  std::vector<const T*> first, second;
  std::vector<T*> record;
};

// Whether a linear step keeps the diagonals q − p of the outermost spatial
// pair apart: a convolution with stride 1 and zero padding there reads, for
// output (p, q), only inputs (p + i − pad, q + i − pad).
inline bool keeps_diagonals(const Step& step, int n_dims) {
  return step.kind == kAffine && n_dims >= 2 && step.stride[0] == 1 && !step.circular;
}

template <typename T>
bool keeps_diagonals(const Item<T>& item, int n_dims) {
  return item.linear && keeps_diagonals(*item.step, n_dims);
}

// Whether the pass over examples can find the variances on the diagonal
// q = p of the outermost pair alone (PairChain::run_self): every linear step
// keeps the diagonals apart, and one comes first.
inline bool variances_on_the_diagonal(const std::vector<Step>& steps, int n_dims) {
  return steps.front().kind != kABRelu &&
         std::all_of(steps.begin(), steps.end(), [&](const Step& step) {
           return step.kind == kABRelu || keeps_diagonals(step, n_dims);
         });
}

// dst[x'_1, x_1, …, x'_D, x_D] = src[x_1, x'_1, …, x_D, x'_D]: the covariance
// of a pair (j, i) from that of (i, j), spatial sizes `sizes`.
template <typename T>
void transposed_pair(const T* src, T* dst, const int64_t* sizes, int n_dims) {
  if (n_dims == 0) {
    *dst = *src;
    return;
  }
  const int64_t s = sizes[0];
  if (n_dims == 1) {
    for (int64_t x = 0; x < s; ++x) {
      for (int64_t y = 0; y < s; ++y) dst[y * s + x] = src[x * s + y];
    }
    return;
  }
  const int64_t block = entries_of(sizes + 1, n_dims - 1);
  for (int64_t x = 0; x < s; ++x) {
    for (int64_t y = 0; y < s; ++y) {
      transposed_pair(src + (x * s + y) * block, dst + (y * s + x) * block, sizes + 1, n_dims - 1);
    }
  }
}

// The kernels, compiled per instruction set (chain_kernels.cpp), for T =
// float and double.
//
// One linear step of one pair (`in_b` null: an NTK input of zeros, or no NTK
// if `out_b` is null too), with the fused nonlinearity's variance tables
// `var1`, `var2` of the pair's examples at the step's output positions; the
// outermost pair's outputs and blocks as `layout` says.
#define TORCHNTK_DECLARE_CHAIN_KERNELS(T)                                                        \
  void run_linear_step(const Item<T>& item, int n_dims, const T* in_a, const T* in_b, T* out_a,  \
                       T* out_b, const T* var1, const T* var2, const OuterLayout& layout,        \
                       Scratch<T>& scratch);                                                     \
  /* A nonlinearity on its own: rows r of n entries, variances var1[row_var1[r]] */              \
  /* and var2[row_var2[r] + q]. */                                                               \
  void run_abrelu_rows(T* nngp, T* ntk, const T* var1, const T* var2, const int64_t* row_var1,   \
                       const int64_t* row_var2, int64_t rows, int64_t n, T k1, T c0);            \
  /* Flat kernels (no spatial axes): row i of the pairs through every item. */                   \
  void run_flat_row(const std::vector<Item<T>>& items, const T* nngp_in, const T* ntk_in,        \
                    bool ntk_scalar, T* nngp, T* ntk, int64_t n, const Variances<T>& variances,  \
                    int64_t i);                                                                  \
  /* Flat examples' own variances: each of the n through every item (unfused), its */            \
  /* variance its own covariance, recorded at each nonlinearity. */                              \
  void run_flat_self(const std::vector<Item<T>>& items, const T* cov, T* cov_out, int64_t n,     \
                     const Variances<T>& variances);

TORCHNTK_DECLARE_CHAIN_KERNELS(float)
TORCHNTK_DECLARE_CHAIN_KERNELS(double)
#undef TORCHNTK_DECLARE_CHAIN_KERNELS

}  // namespace chain
}  // namespace torchntk
