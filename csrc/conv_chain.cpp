// conv_chain: a run of shared-weight convolutions, pooling and ABRelu-family
// nonlinearities applied to full spatial covariances, one pair of examples at
// a time, all layers in a row. CPU here, CUDA in conv_chain_cuda.cu.
//
// Layer by layer, every step streams the whole (N1, N2, X, X', Y, Y')
// covariances through memory several times (window sums per dimension,
// affine map, nonlinearity, fresh tensors). Here a pair's covariance goes
// through all layers in per-thread buffers, and each linear step is one pass:
//
//   Conv   (Novak et al. 2019, eq. 7): A = the diagonal window sum along
//          every spatial dimension, divided by the window size;
//          nngp' = α·A(nngp) + β, ntk' = γ·A(nngp) + α·A(ntk) + δ.
//   Pool   (Novak et al. 2019, §3.2): the same with the box window sum.
//   ABRelu (Cho & Saul 2009): abrelu_entry in conv_chain.h.
//
// A linear step walks the output one block of the innermost spatial pair
// (Y, Y') at a time: the window's taps along the outer dimensions are summed
// into a padded (Y, Y') matrix in L1, whose own window sums give the block,
// and the affine map and the following nonlinearity are applied to it there.
// Stride-1 convolutions never mix the diagonals q − p of the outermost pair
// (X, X'), so runs of them take one diagonal at a time through all their
// steps (PairChain::run_by_diagonals): a few hundred KiB stay in L2 where the
// whole pair (8 MiB at 32x32 in float64) would not.
//
// The nonlinearity needs each example's variances at its input. They come
// from a first pass over the examples' own covariances (conv_chain_self,
// which reads them off its diagonal and returns them; there the nonlinearity
// runs after the step, once the whole diagonal is known) and are looked up by
// the pass over pairs (conv_chain_pairs). Both passes do the same arithmetic
// per entry, so an example paired with itself gets its own covariance exactly.
#include "conv_chain.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <type_traits>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "extension.h"

namespace torchntk {
namespace {

// Everything the entry points compiled per instruction set call must be
// inlined into them: a function not inlined is compiled for baseline x86-64.
#define TORCHNTK_INLINE inline __attribute__((always_inline))
#define TORCHNTK_LAMBDA_INLINE __attribute__((always_inline))

// A linear step's affine map of the window sums u (nngp) and v (ntk),
// nngp' = β + α·u and ntk' = γ·u + (α·v + δ) (α, γ include the window's
// 1/k), and the nonlinearity applied after it, if any.
template <typename T>
struct Epilogue {
  T alpha, beta, gamma, delta;
  bool relu;
  T k1, c0;
};

// Calls body(std::integral_constant<int64_t, L>()) with L = n for the row
// lengths of 8x8, 16x16 and 32x32 images, else L = 0: loops over a row of a
// length known at compile time are unrolled, without the set-up and tail of
// a loop of one or two vectors.
template <typename Body>
TORCHNTK_INLINE void with_row_length(int64_t n, const Body& body) {
  switch (n) {
    case 8: body(std::integral_constant<int64_t, 8>()); return;
    case 16: body(std::integral_constant<int64_t, 16>()); return;
    case 32: body(std::integral_constant<int64_t, 32>()); return;
    default: body(std::integral_constant<int64_t, 0>());
  }
}

// One row of entries sharing var1 (the innermost spatial pair varies var2);
// kLength: n, if known at compile time.
template <typename T, bool with_ntk, bool relu, int64_t kLength = 0>
TORCHNTK_INLINE void epilogue_row(T* __restrict__ nngp, T* __restrict__ ntk, int64_t length,
                                  const Epilogue<T>& e, T var1, const T* __restrict__ var2) {
  const int64_t n = kLength ? kLength : length;
#pragma omp simd
  for (int64_t q = 0; q < n; ++q) {
    const T u = nngp[q];
    T out = e.beta + e.alpha * u, out_ntk = 0;
    if (with_ntk) out_ntk = e.gamma * u + (e.alpha * ntk[q] + e.delta);
    if (relu) {
      T d;
      out = abrelu_entry(out, var1, var2[q], e.k1, e.c0, &d);
      out_ntk = d * out_ntk;
    }
    nngp[q] = out;
    if (with_ntk) ntk[q] = out_ntk;
  }
}

template <typename T>
TORCHNTK_INLINE void epilogue_rows(T* nngp, T* ntk, int64_t rows, int64_t n, const Epilogue<T>& e,
                                   const T* var1, const T* var2) {
  with_row_length(n, [&](auto length) TORCHNTK_LAMBDA_INLINE {
    constexpr int64_t L = decltype(length)::value;
    for (int64_t r = 0; r < rows; ++r) {
      T* ntk_row = ntk ? ntk + r * n : nullptr;
      if (e.relu && ntk) epilogue_row<T, true, true, L>(nngp + r * n, ntk_row, n, e, var1[r], var2);
      else if (e.relu) epilogue_row<T, false, true, L>(nngp + r * n, ntk_row, n, e, var1[r], var2);
      else if (ntk) epilogue_row<T, true, false, L>(nngp + r * n, ntk_row, n, e, T(0), var2);
      else epilogue_row<T, false, false, L>(nngp + r * n, ntk_row, n, e, T(0), var2);
    }
  });
}

// A nonlinearity on its own, rows r of n entries with variances
// var1[row_var1[r]] and var2[row_var2[r] + q].
template <typename T>
TORCHNTK_INLINE void abrelu_rows(T* nngp, T* ntk, const T* var1, const T* var2,
                                 const int64_t* row_var1, const int64_t* row_var2, int64_t rows,
                                 int64_t n, T k1, T c0) {
  const Epilogue<T> e{T(1), T(0), T(0), T(0), true, k1, c0};
  for (int64_t r = 0; r < rows; ++r) {
    // The identity affine map (1·u + 0 and 0·u + (1·v + 0)) changes no value.
    if (ntk) epilogue_row<T, true, true>(nngp + r * n, ntk + r * n, n, e, var1[row_var1[r]], var2 + row_var2[r]);
    else epilogue_row<T, false, true>(nngp + r * n, nullptr, n, e, var1[row_var1[r]], var2 + row_var2[r]);
  }
}

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
        if (step.kind == kConv) unit *= step.k[d];
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

// Offsets (in blocks, by `layout` for the outermost dimension) of the input
// blocks the window sums for output (p, q) of `axis`: the diagonal
// (s·p + i, s·q + i), or the box (s·p + i, s·q + j).
TORCHNTK_INLINE int64_t window_taps(const Axis& axis, bool box, int64_t p, int64_t q,
                                    const OuterLayout& layout, int64_t* taps) {
  int64_t count = 0;
  for (int64_t i = 0; i < axis.k; ++i) {
    const int64_t row = axis.source[axis.stride * p + i];
    if (row < 0) continue;
    for (int64_t j = box ? 0 : i; j < (box ? axis.k : i + 1); ++j) {
      const int64_t column = axis.source[axis.stride * q + j];
      if (column >= 0) taps[count++] = layout.in_block(row, column, axis.size);
    }
  }
  return count;
}

// out_a[c] = Σ_t from_a[t][offset + c] for c < n, t < count (count >= 1),
// summed in the order of t, and the same for the NTK's rows `*_b` in the same
// loop if kTwo; up to three rows in one vector pass (3x3 convolutions). The
// callers set the row pointers once and step `offset` through their rows.
template <typename T, bool kTwo, int64_t kLength = 0>
TORCHNTK_INLINE void sum_rows(T* __restrict__ out_a, T* __restrict__ out_b,
                              const T* const* from_a, const T* const* from_b, int64_t offset,
                              int64_t count, int64_t length) {
  const int64_t n = kLength ? kLength : length;
  const int64_t second = count > 1 ? 1 : 0, third = count > 2 ? 2 : 0;
  const T *__restrict__ a0 = from_a[0] + offset, *__restrict__ a1 = from_a[second] + offset,
                        *__restrict__ a2 = from_a[third] + offset;
  const T *__restrict__ b0 = kTwo ? from_b[0] + offset : a0,
                        *__restrict__ b1 = kTwo ? from_b[second] + offset : a0,
                        *__restrict__ b2 = kTwo ? from_b[third] + offset : a0;
  if (count == 1) {
#pragma omp simd
    for (int64_t e = 0; e < n; ++e) {
      out_a[e] = a0[e];
      if (kTwo) out_b[e] = b0[e];
    }
    return;
  }
  if (count == 2) {
#pragma omp simd
    for (int64_t e = 0; e < n; ++e) {
      out_a[e] = a0[e] + a1[e];
      if (kTwo) out_b[e] = b0[e] + b1[e];
    }
    return;
  }
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) {
    out_a[e] = (a0[e] + a1[e]) + a2[e];
    if (kTwo) out_b[e] = (b0[e] + b1[e]) + b2[e];
  }
  for (int64_t t = 3; t < count; ++t) {
    const T *__restrict__ more_a = from_a[t] + offset,
                        *__restrict__ more_b = kTwo ? from_b[t] + offset : more_a;
#pragma omp simd
    for (int64_t e = 0; e < n; ++e) {
      out_a[e] += more_a[e];
      if (kTwo) out_b[e] += more_b[e];
    }
  }
}

// dst_*[r·dst_stride + c] = Σ_t src_*[taps[t]·slab + r·columns + c] for
// r < rows, c < columns; `*_b` too if kTwo.
template <typename T, bool kTwo>
TORCHNTK_INLINE void sum_taps(T* dst_a, T* dst_b, int64_t dst_stride, const T* src_a,
                              const T* src_b, const int64_t* taps, int64_t count, int64_t slab,
                              int64_t rows, int64_t columns, const T** from_a, const T** from_b) {
  for (int64_t t = 0; t < count; ++t) {
    from_a[t] = src_a + taps[t] * slab;
    if (kTwo) from_b[t] = src_b + taps[t] * slab;
  }
  with_row_length(columns, [&](auto length) TORCHNTK_LAMBDA_INLINE {
    for (int64_t r = 0; r < rows; ++r) {
      T* out_a = dst_a + r * dst_stride;
      T* out_b = kTwo ? dst_b + r * dst_stride : nullptr;
      if (count == 0) {
        std::fill(out_a, out_a + columns, T(0));
        if (kTwo) std::fill(out_b, out_b + columns, T(0));
        continue;
      }
      sum_rows<T, kTwo, decltype(length)::value>(out_a, out_b, from_a, from_b, r * columns,
                                                 count, columns);
    }
  });
}

// The padded matrix's positions outside the axis, under circular padding:
// copies of the positions they wrap onto (zero padding leaves them zero).
template <typename T>
TORCHNTK_INLINE void wrap_border(T* matrix, const Axis& axis) {
  if (!axis.circular) return;
  const int64_t n = axis.padded, low = axis.pad_low, high = axis.pad_low + axis.size;
  for (int64_t a = low; a < high; ++a) {
    for (int64_t b = 0; b < axis.span; ++b) {
      if (b < low || b >= high) matrix[a * n + b] = matrix[a * n + axis.source[b] + low];
    }
  }
  for (int64_t a = 0; a < axis.span; ++a) {
    if (a < low || a >= high) std::copy(matrix + (axis.source[a] + low) * n,
                                        matrix + (axis.source[a] + low) * n + axis.span,
                                        matrix + a * n);
  }
}

// The window sums of the innermost pair from its padded matrices, into the
// (out_size, out_size) blocks `out_*` (`*_b` too if kTwo).
template <typename T, bool kTwo>
TORCHNTK_INLINE void matrix_sums(const T* matrix_a, const T* matrix_b, const Axis& axis, bool box,
                                 T* out_a, T* out_b, Scratch<T>& scratch) {
  const int64_t n = axis.padded, m = axis.out_size, s = axis.stride, k = axis.k;
  const T** from_a = scratch.from_a.data();
  const T** from_b = scratch.from_b.data();
  if (!box && s == 1) {  // contiguous diagonals: vector loads
    for (int64_t i = 0; i < k; ++i) {
      from_a[i] = matrix_a + i * n + i;
      if (kTwo) from_b[i] = matrix_b + i * n + i;
    }
    with_row_length(m, [&](auto length) TORCHNTK_LAMBDA_INLINE {
      for (int64_t y = 0; y < m; ++y) {
        sum_rows<T, kTwo, decltype(length)::value>(out_a + y * m, kTwo ? out_b + y * m : nullptr,
                                                   from_a, from_b, y * n, k, m);
      }
    });
    return;
  }
  T* row = scratch.row.data();
  for (const auto& [matrix, out] : {std::pair(matrix_a, out_a), std::pair(matrix_b, out_b)}) {
    if (!matrix) continue;
    for (int64_t y = 0; y < m; ++y) {
      T* __restrict__ out_row = out + y * m;
      if (!box) {
        for (int64_t q = 0; q < m; ++q) {
          T sum = matrix[s * y * n + s * q];
          for (int64_t i = 1; i < k; ++i) sum += matrix[(s * y + i) * n + s * q + i];
          out_row[q] = sum;
        }
        continue;
      }
      for (int64_t i = 0; i < k; ++i) from_a[i] = matrix + (s * y + i) * n;
      sum_rows<T, false>(row, nullptr, from_a, nullptr, 0, k, axis.span);
      for (int64_t q = 0; q < m; ++q) {
        T sum = row[s * q];
        for (int64_t j = 1; j < k; ++j) sum += row[s * q + j];
        out_row[q] = sum;
      }
    }
  }
}

// One linear step of one pair, D spatial dimensions: `in_*` to `out_*`
// (`*_b`: the NTK, or null; `in_b` null and `out_b` not: an NTK input of
// zeros), the fused nonlinearity with the variance tables var1, var2 of the
// pair's examples at the step's output positions; the outermost pair's
// outputs and blocks as `layout` says (D >= 2).
template <typename T, int D>
TORCHNTK_INLINE void linear_step(const Item<T>& item, const T* in_a, const T* in_b, T* out_a,
                                 T* out_b, const T* var1, const T* var2, const OuterLayout& layout,
                                 Scratch<T>& scratch) {
  const Axis& last = item.axes[D - 1];
  const int64_t n = last.padded, m = last.out_size, low = last.pad_low;
  T* matrix_a = scratch.matrix_a.data();
  T* matrix_b = scratch.matrix_b.data();
  std::fill(matrix_a, matrix_a + n * n, T(0));
  if (in_b) std::fill(matrix_b, matrix_b + n * n, T(0));
  // The innermost pair: window sums of its padded matrix, then the epilogue.
  auto finish = [&](T* block_a, T* block_b, const T* block_var1,
                    const T* block_var2) TORCHNTK_LAMBDA_INLINE {
    wrap_border(matrix_a, last);
    if (in_b) {
      wrap_border(matrix_b, last);
      matrix_sums<T, true>(matrix_a, matrix_b, last, item.box, block_a, block_b, scratch);
    } else {
      matrix_sums<T, false>(matrix_a, nullptr, last, item.box, block_a, nullptr, scratch);
      if (block_b) std::fill(block_b, block_b + m * m, T(0));  // an NTK input of zeros
    }
    epilogue_rows(block_a, block_b, m, m, item.epilogue, block_var1, block_var2);
  };
  // Sums the taps into `dst_*` (rows of `columns`, dst_stride apart) from
  // blocks of `slab` entries at `taps` in `src_*`.
  auto sum = [&](const int64_t* taps, int64_t count, const T* src_a, const T* src_b, T* dst_a,
                 T* dst_b, int64_t dst_stride, int64_t slab, int64_t rows,
                 int64_t columns) TORCHNTK_LAMBDA_INLINE {
    const T** from_a = scratch.from_a.data();
    const T** from_b = scratch.from_b.data();
    if (src_b) {
      sum_taps<T, true>(dst_a, dst_b, dst_stride, src_a, src_b, taps, count, slab, rows, columns,
                        from_a, from_b);
    } else {
      sum_taps<T, false>(dst_a, nullptr, dst_stride, src_a, nullptr, taps, count, slab, rows,
                         columns, from_a, from_b);
    }
  };
  // The taps of output (p, q) of dimension d.
  int64_t* taps = scratch.taps.data();
  auto gather = [&](int d, int64_t p, int64_t q, const T* src_a, const T* src_b, T* dst_a,
                    T* dst_b, int64_t dst_stride, int64_t slab, int64_t rows,
                    int64_t columns) TORCHNTK_LAMBDA_INLINE {
    const int64_t count = window_taps(item.axes[d], item.box, p, q, d == 0 ? layout : OuterLayout{},
                                      taps);
    sum(taps, count, src_a, src_b, dst_a, dst_b, dst_stride, slab, rows, columns);
  };
  const int64_t inner = last.size;  // rows and columns of the innermost input pair
  if constexpr (D == 1) {
    const int64_t whole = 0;  // one tap: the input matrix itself
    sum(&whole, 1, in_a, in_b, matrix_a + low * n + low, matrix_b + low * n + low, n, 0, inner,
        inner);
    finish(out_a, out_b, var1, var2);
  } else {
    const Axis& outer = item.axes[0];
    const int64_t slab_in = entries_of(item.step->in + 1, D - 1);
    const int64_t slab_out = entries_of(item.step->out + 1, D - 1);
    const int64_t positions_out = positions_of(item.step->out + 1, D - 1);
    // Outputs (p, q) in the order of the diagonals q − p: a convolution's
    // next output (p + 1, q + 1) reads the input blocks this one read, while
    // they are still in L1.
    const int64_t blocks = outer.out_size;
    const int64_t first_offset = layout.one_diagonal ? layout.offset : 1 - blocks;
    const int64_t last_offset = layout.one_diagonal ? layout.offset : blocks - 1;
    for (int64_t offset = first_offset; offset <= last_offset; ++offset) {
      for (int64_t p = std::max<int64_t>(0, -offset); p < std::min(blocks, blocks - offset); ++p) {
        const int64_t q = p + offset;
        const int64_t block = layout.out_block(p, q, blocks) * slab_out;
        T* block_a = out_a + block;
        T* block_b = out_b ? out_b + block : nullptr;
        const T* block_var1 = var1 ? var1 + p * positions_out : nullptr;
        const T* block_var2 = var2 ? var2 + q * positions_out : nullptr;
        if constexpr (D == 2) {
          gather(0, p, q, in_a, in_b, matrix_a + low * n + low, matrix_b + low * n + low, n,
                 slab_in, inner, inner);
          finish(block_a, block_b, block_var1, block_var2);
        } else {
          gather(0, p, q, in_a, in_b, scratch.slab_a.data(), scratch.slab_b.data(), slab_in,
                 slab_in, 1, slab_in);
          const Axis& middle = item.axes[1];
          const int64_t inner_in = inner * inner, inner_out = m * m;
          for (int64_t p1 = 0; p1 < middle.out_size; ++p1) {
            for (int64_t q1 = 0; q1 < middle.out_size; ++q1) {
              gather(1, p1, q1, scratch.slab_a.data(), in_b ? scratch.slab_b.data() : nullptr,
                     matrix_a + low * n + low, matrix_b + low * n + low, n, inner_in, inner,
                     inner);
              const int64_t sub = (p1 * middle.out_size + q1) * inner_out;
              finish(block_a + sub, block_b ? block_b + sub : nullptr,
                     block_var1 ? block_var1 + p1 * m : nullptr,
                     block_var2 ? block_var2 + q1 * m : nullptr);
            }
          }
        }
      }
    }
  }
}

// Where a pass takes the nonlinearities' variances from: per ABRelu step,
// (N, positions) tables of the first and second examples of each pair; empty
// for the pass over the examples themselves, which reads them off its own
// diagonal and stores them in `record`.
template <typename T>
struct Variances {
  std::vector<const T*> first, second;
  std::vector<T*> record;
};

// Flat kernels (no spatial axes): row i of the pairs, copied from the input
// (an NTK given as one scalar fills it), through every item while in L1.
template <typename T>
TORCHNTK_INLINE void flat_row(const std::vector<Item<T>>& items, const T* nngp_in,
                              const T* ntk_in, bool ntk_scalar, T* nngp, T* ntk, int64_t n,
                              const Variances<T>& variances, int64_t i) {
  std::copy(nngp_in, nngp_in + n, nngp);
  if (ntk && ntk_scalar) std::fill(ntk, ntk + n, *ntk_in);
  else if (ntk) std::copy(ntk_in, ntk_in + n, ntk);
  const int64_t first_column = 0;
  for (const Item<T>& item : items) {
    const T* var1 = item.relu_index >= 0 ? variances.first[item.relu_index] : nullptr;
    const T* var2 = item.relu_index >= 0 ? variances.second[item.relu_index] : nullptr;
    if (item.linear) {
      epilogue_rows(nngp, ntk, 1, n, item.epilogue, var1 ? var1 + i : nullptr, var2);
    } else {
      abrelu_rows(nngp, ntk, var1, var2, &i, &first_column, 1, n, T(item.step->k1),
                  T(item.step->c0));
    }
  }
}

// Entry points compiled for several instruction sets (TORCHNTK_TARGET_CLONES),
// with everything above inlined into them.
#define TORCHNTK_CHAIN_KERNELS(T)                                                                \
  TORCHNTK_TARGET_CLONES void linear_step_##T(const Item<T>& item, int n_dims, const T* in_a,     \
                                              const T* in_b, T* out_a, T* out_b, const T* var1,  \
                                              const T* var2, const OuterLayout& layout,          \
                                              Scratch<T>& scratch) {                             \
    if (n_dims == 1) linear_step<T, 1>(item, in_a, in_b, out_a, out_b, var1, var2, layout, scratch); \
    else if (n_dims == 2) linear_step<T, 2>(item, in_a, in_b, out_a, out_b, var1, var2, layout, scratch); \
    else linear_step<T, 3>(item, in_a, in_b, out_a, out_b, var1, var2, layout, scratch);         \
  }                                                                                              \
  TORCHNTK_TARGET_CLONES void abrelu_rows_##T(T* nngp, T* ntk, const T* var1, const T* var2,     \
                                              const int64_t* row_var1, const int64_t* row_var2,  \
                                              int64_t rows, int64_t n, T k1, T c0) {             \
    abrelu_rows(nngp, ntk, var1, var2, row_var1, row_var2, rows, n, k1, c0);                     \
  }                                                                                              \
  TORCHNTK_TARGET_CLONES void flat_row_##T(const std::vector<Item<T>>& items, const T* nngp_in,  \
                                           const T* ntk_in, bool ntk_scalar, T* nngp, T* ntk,    \
                                           int64_t n, const Variances<T>& variances, int64_t i) { \
    flat_row(items, nngp_in, ntk_in, ntk_scalar, nngp, ntk, n, variances, i);                    \
  }                                                                                              \
  void run_linear_step(const Item<T>& item, int n_dims, const T* in_a, const T* in_b, T* out_a,  \
                       T* out_b, const T* var1, const T* var2, const OuterLayout& layout,        \
                       Scratch<T>& scratch) {                                                    \
    linear_step_##T(item, n_dims, in_a, in_b, out_a, out_b, var1, var2, layout, scratch);        \
  }                                                                                              \
  void run_abrelu_rows(T* nngp, T* ntk, const T* var1, const T* var2, const int64_t* row_var1,   \
                       const int64_t* row_var2, int64_t rows, int64_t n, T k1, T c0) {           \
    abrelu_rows_##T(nngp, ntk, var1, var2, row_var1, row_var2, rows, n, k1, c0);                 \
  }                                                                                              \
  void run_flat_row(const std::vector<Item<T>>& items, const T* nngp_in, const T* ntk_in,        \
                    bool ntk_scalar, T* nngp, T* ntk, int64_t n, const Variances<T>& variances,  \
                    int64_t i) {                                                                 \
    flat_row_##T(items, nngp_in, ntk_in, ntk_scalar, nngp, ntk, n, variances, i);                \
  }

TORCHNTK_CHAIN_KERNELS(float)
TORCHNTK_CHAIN_KERNELS(double)

// Whether a linear step keeps the diagonals q − p of the outermost spatial
// pair apart: a convolution with stride 1 and zero padding there reads, for
// output (p, q), only inputs (p + i − pad, q + i − pad).
bool keeps_diagonals(const Step& step, int n_dims) {
  return step.kind == kConv && n_dims >= 2 && step.stride[0] == 1 && !step.circular;
}

template <typename T>
bool keeps_diagonals(const Item<T>& item, int n_dims) {
  return item.linear && keeps_diagonals(*item.step, n_dims);
}

// Whether the pass over examples can find the variances on the diagonal
// q = p of the outermost pair alone (PairChain::run_self): every linear step
// keeps the diagonals apart, and one comes first.
bool variances_on_the_diagonal(const std::vector<Step>& steps, int n_dims) {
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

// One thread's buffers for taking pairs of examples through a pass's items.
template <typename T>
class PairChain {
 public:
  PairChain(const std::vector<Item<T>>& items, int n_dims) : items_(items), n_dims_(n_dims) {
    int64_t entries = 0, side = 1, span = 1, taps = 1, slab = 1, diagonal = 0;
    for (const Item<T>& item : items) {
      entries = std::max({entries, entries_of(item.step->in, n_dims), entries_of(item.step->out, n_dims)});
      indices_.push_back(item.linear ? PairIndex() : PairIndex(item.step->in, n_dims));
      if (!item.linear) continue;
      const Axis& last = item.axes.back();
      side = std::max(side, last.padded), span = std::max(span, last.span);
      for (const Axis& axis : item.axes) taps = std::max(taps, item.box ? axis.k * axis.k : axis.k);
      if (n_dims == 3) slab = std::max(slab, entries_of(item.step->in + 1, 2));
      if (n_dims >= 2) diagonal = std::max(diagonal, item.step->out[0] * entries_of(item.step->out + 1, n_dims - 1));
    }
    for (auto* buffer : {&a_[0], &a_[1], &b_[0], &b_[1]}) buffer->resize(entries);
    for (auto* buffer : {&diagonal_a_[0], &diagonal_a_[1], &diagonal_b_[0], &diagonal_b_[1]}) buffer->resize(diagonal);
    int64_t positions = 0;
    for (const Item<T>& item : items) positions = std::max(positions, positions_of(item.step->in, n_dims));
    own_.resize(positions);
    scratch_.matrix_a.resize(side * side), scratch_.matrix_b.resize(side * side);
    scratch_.slab_a.resize(slab), scratch_.slab_b.resize(slab);
    scratch_.row.resize(span), scratch_.taps.resize(taps);
    scratch_.from_a.resize(taps), scratch_.from_b.resize(taps);
    for (size_t t = 0; t < items.size(); ++t) {
      writes_output_.push_back(std::none_of(items.begin() + t + 1, items.end(),
                                            [](const Item<T>& later) { return later.linear; }));
    }
    // Runs of two or more steps that keep the diagonals apart go one diagonal
    // at a time through all their steps (`run_by_diagonals`).
    diagonal_run_end_.assign(items.size(), 0);
    for (size_t t = 0; t < items.size();) {
      size_t end = t;
      while (end < items.size() && keeps_diagonals(items[end], n_dims)) ++end;
      if (end >= t + 2) diagonal_run_end_[t] = end;
      t = std::max(end, t + 1);
    }
  }

  // Runs the items on one pair: `nngp` (and `ntk` if not null) hold the
  // input entries; the results go to `nngp_out`, `ntk_out` (if not null;
  // with `ntk` null the NTK starts from zeros). `first`, `second` index the
  // pair's examples in the variance tables.
  // `mirrored`: the pair of an example with itself in a symmetric batch,
  // whose covariances are symmetric (cov[x', x, …] = cov[x, x', …]).
  void run(const T* nngp, const T* ntk, T* nngp_out, T* ntk_out, const Variances<T>& variances,
           int64_t first, int64_t second, bool mirrored = false) {
    const bool self = !variances.record.empty();
    const int64_t in_entries = entries_of(items_.front().step->in, n_dims_);
    const T *in_a = nngp, *in_b = ntk;
    T *held_a = nullptr, *held_b = nullptr;  // the current covariances, writable
    int next = 0;
    auto hold = [&](T* a, T* b) {
      held_a = a, held_b = b, in_a = a, in_b = b;
      next ^= 1;
    };
    // The variance tables of item t's nonlinearity for this pair (pass over pairs).
    auto tables = [&](size_t t) {
      const Item<T>& item = items_[t];
      const int64_t positions = positions_of(item.linear ? item.step->out : item.step->in, n_dims_);
      if (item.relu_index < 0 || self) return std::pair<const T*, const T*>(nullptr, nullptr);
      return std::pair<const T*, const T*>(variances.first[item.relu_index] + first * positions,
                                           variances.second[item.relu_index] + second * positions);
    };
    for (size_t t = 0; t < items_.size(); ++t) {
      const Item<T>& item = items_[t];
      const size_t run_end = self ? 0 : diagonal_run_end_[t];
      if (run_end > 0) {
        T* out_a = writes_output_[run_end - 1] ? nngp_out : a_[next].data();
        T* out_b = !ntk_out ? nullptr : writes_output_[run_end - 1] ? ntk_out : b_[next].data();
        run_by_diagonals(t, run_end, in_a, in_b, out_a, out_b, tables, mirrored);
        hold(out_a, out_b);
        t = run_end - 1;
        continue;
      }
      auto [var1, var2] = tables(t);
      if (item.linear) {
        T* out_a = writes_output_[t] ? nngp_out : a_[next].data();
        T* out_b = !ntk_out ? nullptr : writes_output_[t] ? ntk_out : b_[next].data();
        run_linear_step(item, n_dims_, in_a, in_b, out_a, out_b, var1, var2, OuterLayout{},
                        scratch_);
        hold(out_a, out_b);
        continue;
      }
      if (!held_a) {  // a nonlinearity first: it runs on a copy of the input
        std::copy(nngp, nngp + in_entries, a_[next].data());
        if (ntk) std::copy(ntk, ntk + in_entries, b_[next].data());
        else if (ntk_out) std::fill(b_[next].data(), b_[next].data() + in_entries, T(0));
        hold(a_[next].data(), ntk_out ? b_[next].data() : nullptr);
      }
      const PairIndex& index = indices_[t];
      const int64_t positions = index.positions;
      if (self) {
        for (int64_t x = 0; x < positions; ++x) own_.data()[x] = held_a[index.diagonal[x]];
        std::copy(own_.data(), own_.data() + positions,
                  variances.record[item.relu_index] + first * positions);
        var1 = var2 = own_.data();
      }
      run_abrelu_rows(held_a, held_b, var1, var2, index.row_var1.data(), index.row_var2.data(),
                      index.rows, index.row_length, T(item.step->k1), T(item.step->c0));
    }
    if (held_a != nngp_out) {
      const int64_t out_entries = entries_of(items_.back().step->out, n_dims_);
      std::copy(held_a, held_a + out_entries, nngp_out);
      if (ntk_out) std::copy(held_b, held_b + out_entries, ntk_out);
    }
  }

  // The pass over one example's own covariance, when every linear step keeps
  // the diagonals apart (`keeps_diagonals`): the variances each nonlinearity
  // needs lie on the diagonal q − p = 0 of the outermost pair, which alone
  // goes through `unfused` (the same steps, nonlinearities on their own) to
  // record them in the tables of `variances`; then the whole covariance runs
  // as the pair (example, example) with those tables.
  void run_self(const std::vector<Item<T>>& unfused, const T* cov, T* cov_out, int64_t example,
                const Variances<T>& variances) {
    const T* from = cov;
    int side = 0;
    for (const Item<T>& item : unfused) {
      if (item.linear) {
        T* to = diagonal_a_[side].data();
        run_linear_step(item, n_dims_, from, nullptr, to, nullptr, nullptr, nullptr,
                        OuterLayout{true, from != cov, true, 0}, scratch_);
        from = to, side ^= 1;
        continue;
      }
      // Blocks (x, x) in order of x; each holds the pair of example positions
      // (x, ·), laid out as a pair of the inner dimensions.
      T* blocks = diagonal_a_[side ^ 1].data();
      const PairIndex index(item.step->in + 1, n_dims_ - 1);
      const int64_t block_entries = entries_of(item.step->in + 1, n_dims_ - 1);
      T* table = variances.record[item.relu_index] +
                 example * item.step->in[0] * index.positions;
      for (int64_t x = 0; x < item.step->in[0]; ++x) {
        T* block = blocks + x * block_entries;
        T* own = table + x * index.positions;
        for (int64_t position = 0; position < index.positions; ++position) {
          own[position] = block[index.diagonal[position]];
        }
        run_abrelu_rows(block, static_cast<T*>(nullptr), own, own, index.row_var1.data(),
                        index.row_var2.data(), index.rows, index.row_length, T(item.step->k1),
                        T(item.step->c0));
      }
    }
    if (!cov_out) return;
    Variances<T> tables;
    for (T* table : variances.record) tables.first.push_back(table), tables.second.push_back(table);
    run(cov, nullptr, cov_out, nullptr, tables, example, example);
  }

 private:
  // Items [begin, end), all keeping the diagonals apart, one diagonal q − p
  // of the outermost pair at a time: its blocks (a few hundred KiB at most)
  // stay in cache through all the steps, between the (X, X') layouts of the
  // input and the output. `mirrored` (symmetric covariances): the diagonals
  // q − p >= 0 alone, block (q, p) the transpose of block (p, q).
  template <typename Tables>
  void run_by_diagonals(size_t begin, size_t end, const T* in_a, const T* in_b, T* out_a,
                        T* out_b, const Tables& tables, bool mirrored) {
    const Step& last = *items_[end - 1].step;
    const int64_t blocks = last.out[0];
    for (int64_t offset = mirrored ? 0 : 1 - blocks; offset < blocks; ++offset) {
      const T *from_a = in_a, *from_b = in_b;
      for (size_t t = begin; t < end; ++t) {
        const bool last = t + 1 == end;
        const int side = (t - begin) % 2;
        T* to_a = last ? out_a : diagonal_a_[side].data();
        T* to_b = !out_b ? nullptr : last ? out_b : diagonal_b_[side].data();
        const OuterLayout layout{true, t != begin, !last, offset};
        auto [var1, var2] = tables(t);
        run_linear_step(items_[t], n_dims_, from_a, from_b, to_a, to_b, var1, var2, layout,
                        scratch_);
        from_a = to_a, from_b = to_b;
      }
    }
    if (!mirrored) return;
    const int64_t block = entries_of(last.out + 1, n_dims_ - 1);
    for (T* out : {out_a, out_b}) {
      if (!out) continue;
      for (int64_t p = 0; p < blocks; ++p) {
        for (int64_t q = p + 1; q < blocks; ++q) {
          transposed_pair(out + (p * blocks + q) * block, out + (q * blocks + p) * block,
                          last.out + 1, n_dims_ - 1);
        }
      }
    }
  }

  const std::vector<Item<T>>& items_;
  const int n_dims_;
  std::vector<PairIndex> indices_;
  std::vector<bool> writes_output_;
  std::vector<size_t> diagonal_run_end_;  // per item: the end of the run by diagonals it starts, or 0
  Buffer<T> a_[2], b_[2], diagonal_a_[2], diagonal_b_[2], own_;
  Scratch<T> scratch_;
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

// Pair t of a symmetric n x n batch, the dearest first: the pairs i < j row
// by row, then the examples with themselves (i, i), half their cost.
inline std::pair<int64_t, int64_t> symmetric_pair(int64_t t, int64_t n) {
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

// The pass of `steps` over pairs (variances given) or over examples (`self`,
// `record` given); `symmetric` pairs (one batch with itself): those with
// i <= j, and (j, i) as their transposes.
void run_chain(bool self, const torch::Tensor& nngp, const torch::Tensor& ntk,
               torch::Tensor& nngp_out, torch::Tensor& ntk_out,
               const std::vector<torch::Tensor>& variances1,
               const std::vector<torch::Tensor>& variances2, std::vector<torch::Tensor>& record,
               const std::vector<Step>& steps, int n_dims, int64_t n2, bool symmetric) {
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
    const std::vector<Item<scalar_t>> items = plan_pass<scalar_t>(steps, n_dims, !self);
    const scalar_t* nngp_ptr = nngp.data_ptr<scalar_t>();
    const scalar_t* ntk_ptr = ntk.defined() ? ntk.data_ptr<scalar_t>() : nullptr;
    scalar_t* nngp_out_ptr = nngp_out.defined() ? nngp_out.data_ptr<scalar_t>() : nullptr;
    scalar_t* ntk_out_ptr = ntk.defined() ? ntk_out.data_ptr<scalar_t>() : nullptr;
    if (n_dims == 0 && self) {
      // Each example through every step, its variance its own covariance.
      const int64_t n = nngp.numel();
      for (int64_t i = 0; i < n; ++i) {
        scalar_t c = nngp_ptr[i], d;
        for (const Item<scalar_t>& item : items) {
          if (item.linear) {
            epilogue_rows(&c, static_cast<scalar_t*>(nullptr), 1, 1, item.epilogue, &c, &c);
            continue;
          }
          variances.record[item.relu_index][i] = c;
          c = abrelu_entry(c, c, c, scalar_t(item.step->k1), scalar_t(item.step->c0), &d);
        }
        nngp_out_ptr[i] = c;
      }
      return;
    }
    if (n_dims == 0) {
      const bool ntk_scalar = ntk.defined() && ntk.dim() == 0;
      at::parallel_for(0, nngp.size(0), 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          run_flat_row(items, nngp_ptr + i * n2,
                       ntk_ptr ? ntk_ptr + (ntk_scalar ? 0 : i * n2) : nullptr, ntk_scalar,
                       nngp_out_ptr + i * n2, ntk_out_ptr ? ntk_out_ptr + i * n2 : nullptr, n2,
                       variances, i);
        }
      });
      return;
    }
    const int64_t in_entries = entries_of(steps.front().in, n_dims);
    const int64_t out_entries = entries_of(steps.back().out, n_dims);
    // The pass over examples as pairs (PairChain::run_self) where it can;
    // there an undefined `nngp_out` asks for the variances alone.
    const bool as_pairs = self && variances_on_the_diagonal(steps, n_dims);
    const std::vector<Item<scalar_t>> fused =
        as_pairs ? plan_pass<scalar_t>(steps, n_dims, true) : std::vector<Item<scalar_t>>();
    const int64_t count = symmetric ? n2 * (n2 + 1) / 2 : nngp.numel() / in_entries;
    // Threads take the next pair as they finish one: pairs differ in cost.
    std::atomic<int64_t> next{0};
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
      PairChain<scalar_t> chain(as_pairs ? fused : items, n_dims);
      for (int64_t t = next++; t < count; t = next++) {
        if (as_pairs) {
          chain.run_self(items, nngp_ptr + t * in_entries,
                         nngp_out_ptr ? nngp_out_ptr + t * out_entries : nullptr, t, variances);
          continue;
        }
        const auto [i, j] = symmetric ? symmetric_pair(t, n2) : std::pair(t / n2, t % n2);
        const int64_t p = i * n2 + j;
        chain.run(nngp_ptr + p * in_entries,
                  ntk_ptr && ntk.dim() > 0 ? ntk_ptr + p * in_entries : nullptr,
                  nngp_out_ptr + p * out_entries,
                  ntk_out_ptr ? ntk_out_ptr + p * out_entries : nullptr, variances, i, j,
                  symmetric && i == j);
        if (!symmetric || i == j) continue;
        for (scalar_t* out : {nngp_out_ptr, ntk_out_ptr}) {
          if (out) {
            transposed_pair(out + p * out_entries, out + (j * n2 + i) * out_entries,
                            steps.back().out, n_dims);
          }
        }
      }
    });
  });
}

}  // namespace

// Transparent huge pages in `madvise` mode (extension.h): an N x N output is
// written once, and faulting it in 4 KiB pages costs more than the chain's
// arithmetic on flat kernels.
torch::Tensor empty_huge_pages(at::IntArrayRef shape, const torch::TensorOptions& options) {
  torch::Tensor tensor = torch::empty(shape, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  if (tensor.device().is_cpu() && tensor.nbytes() >= 2 * kHuge) {
    const uintptr_t begin = reinterpret_cast<uintptr_t>(tensor.data_ptr());
    const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t last = (begin + tensor.nbytes()) & ~(kHuge - 1);
    if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return tensor;
}

std::vector<torch::Tensor> conv_chain_self(const torch::Tensor& cov_in,
                                           const std::vector<std::vector<double>>& encoded,
                                           bool with_covariance) {
  check_pairs("conv_chain_self", cov_in, 1);
  const torch::Tensor cov = cov_in.contiguous();
  const std::vector<Step> steps = parse_steps(encoded, spatial_sizes(cov, 1));
  TORCH_CHECK(!steps.empty(), "conv_chain_self: no steps");
  const int n_dims = (cov.dim() - 1) / 2;
  const int64_t n = cov.size(0);
  // On the CPU the variances alone can cost less than the covariances.
  const bool variances_only = !with_covariance && cov.device().is_cpu() &&
                              variances_on_the_diagonal(steps, n_dims);
  torch::Tensor cov_out;
  if (!variances_only) cov_out = empty_huge_pages(pair_shape({n}, steps.back().out, n_dims), cov.options());
  std::vector<torch::Tensor> record;
  for (const Step& step : steps) {
    if (step.kind == kABRelu) {
      record.push_back(torch::empty({n, positions_of(step.in, n_dims)}, cov.options()));
    }
  }
  torch::Tensor no_ntk;
  run_chain(true, cov, no_ntk, cov_out, no_ntk, {}, {}, record, steps, n_dims, 1, false);
  record.insert(record.begin(), cov_out);
  return record;
}

std::vector<torch::Tensor> conv_chain_pairs(const torch::Tensor& nngp_in,
                                            const c10::optional<torch::Tensor>& ntk_in,
                                            const std::vector<torch::Tensor>& variances1_in,
                                            const std::vector<torch::Tensor>& variances2_in,
                                            const std::vector<std::vector<double>>& encoded,
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
  torch::Tensor nngp_out = empty_huge_pages(pair_shape({n1, n2}, steps.back().out, n_dims),
                                        nngp.options());
  torch::Tensor ntk_out = ntk.defined() ? empty_huge_pages(nngp_out.sizes(), nngp_out.options())
                                        : torch::Tensor();
  run_chain(false, nngp, ntk, nngp_out, ntk_out, variances1, variances2, no_record, steps, n_dims, n2,
            symmetric);
  return {nngp_out, ntk_out};
}

}  // namespace torchntk
