// The CPU chain's arithmetic (conv_chain.cpp describes the chain): the
// affine map and nonlinearity of a row of entries, the window sums of a
// linear step, and the entry points that run them, compiled per instruction
// set (TORCHNTK_TARGET_CLONES) with everything here inlined into them.
#include <algorithm>
#include <type_traits>

#include "chain_plan.h"

namespace torchntk {
namespace chain {
namespace {

// Everything the entry points compiled per instruction set call must be
// inlined into them: a function not inlined is compiled for baseline x86-64.
#define TORCHNTK_INLINE inline __attribute__((always_inline))
#define TORCHNTK_LAMBDA_INLINE __attribute__((always_inline))

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

// One linear step of one pair (run_linear_step, chain_plan.h), D spatial
// dimensions. The window sums of the outer dimensions gather the input
// blocks their taps read into the padded matrix of the innermost pair (in
// L1); its own window sums, then the affine map and the fused nonlinearity
// (`finish`), give one output block.
template <typename T>
class LinearStep {
 public:
  TORCHNTK_INLINE LinearStep(const Item<T>& item, const T* in_a, const T* in_b, T* out_a,
                             T* out_b, const T* var1, const T* var2, const OuterLayout& layout,
                             Scratch<T>& scratch)
      : item_(item), step_(*item.step), last_(item.axes.back()), layout_(layout),
        scratch_(scratch), in_a_(in_a), in_b_(in_b), out_a_(out_a), out_b_(out_b), var1_(var1),
        var2_(var2) {
    const int64_t n = last_.padded, outer_dims = int64_t(item.axes.size()) - 1;
    std::fill(scratch.matrix_a.data(), scratch.matrix_a.data() + n * n, T(0));
    if (in_b) std::fill(scratch.matrix_b.data(), scratch.matrix_b.data() + n * n, T(0));
    inside_a_ = scratch.matrix_a.data() + last_.pad_low * n + last_.pad_low;
    inside_b_ = scratch.matrix_b.data() + last_.pad_low * n + last_.pad_low;
    slab_in_ = entries_of(step_.in + 1, outer_dims);
    slab_out_ = entries_of(step_.out + 1, outer_dims);
    positions_out_ = positions_of(step_.out + 1, outer_dims);
  }

  template <int D>
  TORCHNTK_INLINE void run() {
    if constexpr (D == 1) {
      const int64_t whole = 0;  // one tap: the input matrix itself
      sum(&whole, 1, in_a_, in_b_, inside_a_, inside_b_, last_.padded, 0, last_.size, last_.size);
      finish(out_a_, out_b_, var1_, var2_);
      return;
    }
    // Outputs (p, q) of the outermost pair in the order of the diagonals
    // q − p (all of them, or the layout's one): a convolution's next output
    // (p + 1, q + 1) reads the input blocks this one read, while they are
    // still in L1.
    const int64_t blocks = item_.axes[0].out_size;
    const int64_t first_offset = layout_.one_diagonal ? layout_.offset : 1 - blocks;
    const int64_t last_offset = layout_.one_diagonal ? layout_.offset : blocks - 1;
    for (int64_t offset = first_offset; offset <= last_offset; ++offset) {
      const int64_t end = std::min(blocks, blocks - offset);
      for (int64_t p = std::max<int64_t>(0, -offset); p < end; ++p) {
        if constexpr (D == 2) outer_output_2d(p, p + offset);
        else outer_output_3d(p, p + offset);
      }
    }
  }

 private:
  // Output (p, q) of the outermost pair, two spatial dimensions: the taps'
  // blocks are inner pairs themselves.
  TORCHNTK_INLINE void outer_output_2d(int64_t p, int64_t q) {
    const int64_t block = layout_.out_block(p, q, item_.axes[0].out_size) * slab_out_;
    gather(0, p, q, in_a_, in_b_, inside_a_, inside_b_, last_.padded, slab_in_, last_.size,
           last_.size);
    finish(out_a_ + block, out_b_ ? out_b_ + block : nullptr,
           var1_ ? var1_ + p * positions_out_ : nullptr,
           var2_ ? var2_ + q * positions_out_ : nullptr);
  }

  // Output (p, q) of the outermost pair, three spatial dimensions: the taps'
  // sums go to a slab of the inner two pairs, whose middle pair's outputs
  // (p1, q1) each gather their taps into the innermost pair.
  TORCHNTK_INLINE void outer_output_3d(int64_t p, int64_t q) {
    const int64_t block = layout_.out_block(p, q, item_.axes[0].out_size) * slab_out_;
    T* slab_a = scratch_.slab_a.data();
    T* slab_b = in_b_ ? scratch_.slab_b.data() : nullptr;
    gather(0, p, q, in_a_, in_b_, slab_a, scratch_.slab_b.data(), slab_in_, slab_in_, 1, slab_in_);
    const int64_t middle = item_.axes[1].out_size, inner = last_.size;
    const int64_t inner_out = last_.out_size * last_.out_size;
    for (int64_t p1 = 0; p1 < middle; ++p1) {
      for (int64_t q1 = 0; q1 < middle; ++q1) {
        gather(1, p1, q1, slab_a, slab_b, inside_a_, inside_b_, last_.padded, inner * inner,
               inner, inner);
        const int64_t sub = block + (p1 * middle + q1) * inner_out;
        finish(out_a_ + sub, out_b_ ? out_b_ + sub : nullptr,
               var1_ ? var1_ + p * positions_out_ + p1 * last_.out_size : nullptr,
               var2_ ? var2_ + q * positions_out_ + q1 * last_.out_size : nullptr);
      }
    }
  }

  // Sums the taps of output (p, q) of dimension d (the layout's for the
  // outermost one) from `src_*` into `dst_*`.
  TORCHNTK_INLINE void gather(int d, int64_t p, int64_t q, const T* src_a, const T* src_b,
                              T* dst_a, T* dst_b, int64_t dst_stride, int64_t slab, int64_t rows,
                              int64_t columns) {
    int64_t* taps = scratch_.taps.data();
    const int64_t count = window_taps(item_.axes[d], item_.box, p, q,
                                      d == 0 ? layout_ : OuterLayout{}, taps);
    sum(taps, count, src_a, src_b, dst_a, dst_b, dst_stride, slab, rows, columns);
  }

  // Sums the blocks of `slab` entries at `taps` in `src_*` into `dst_*`
  // (rows of `columns`, dst_stride apart); `src_b` null: the NNGP alone.
  TORCHNTK_INLINE void sum(const int64_t* taps, int64_t count, const T* src_a, const T* src_b,
                           T* dst_a, T* dst_b, int64_t dst_stride, int64_t slab, int64_t rows,
                           int64_t columns) {
    const T** from_a = scratch_.from_a.data();
    const T** from_b = scratch_.from_b.data();
    if (src_b) {
      sum_taps<T, true>(dst_a, dst_b, dst_stride, src_a, src_b, taps, count, slab, rows, columns,
                        from_a, from_b);
    } else {
      sum_taps<T, false>(dst_a, nullptr, dst_stride, src_a, nullptr, taps, count, slab, rows,
                         columns, from_a, from_b);
    }
  }

  // The innermost pair: the window sums of its padded matrices into the
  // output block, then the epilogue with the block's variances.
  TORCHNTK_INLINE void finish(T* block_a, T* block_b, const T* block_var1, const T* block_var2) {
    const int64_t m = last_.out_size;
    T* matrix_a = scratch_.matrix_a.data();
    T* matrix_b = scratch_.matrix_b.data();
    wrap_border(matrix_a, last_);
    if (in_b_) {
      wrap_border(matrix_b, last_);
      matrix_sums<T, true>(matrix_a, matrix_b, last_, item_.box, block_a, block_b, scratch_);
    } else {
      matrix_sums<T, false>(matrix_a, nullptr, last_, item_.box, block_a, nullptr, scratch_);
      if (block_b) std::fill(block_b, block_b + m * m, T(0));  // an NTK input of zeros
    }
    epilogue_rows(block_a, block_b, m, m, item_.epilogue, block_var1, block_var2);
  }

  const Item<T>& item_;
  const Step& step_;
  const Axis& last_;  // the innermost spatial dimension
  const OuterLayout& layout_;
  Scratch<T>& scratch_;
  const T *in_a_, *in_b_;
  T *out_a_, *out_b_;
  const T *var1_, *var2_;
  T *inside_a_, *inside_b_;  // the input pair's place in the padded matrices
  int64_t slab_in_, slab_out_, positions_out_;  // per output block of the outermost pair
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

// Flat examples' own variances (run_flat_self, chain_plan.h).
template <typename T>
void flat_self(const std::vector<Item<T>>& items, const T* cov, T* cov_out, int64_t n,
               const Variances<T>& variances) {
  for (int64_t i = 0; i < n; ++i) {
    T c = cov[i], d;
    for (const Item<T>& item : items) {
      if (item.linear) {
        epilogue_rows(&c, static_cast<T*>(nullptr), 1, 1, item.epilogue, &c, &c);
        continue;
      }
      variances.record[item.relu_index][i] = c;
      c = abrelu_entry(c, c, c, T(item.step->k1), T(item.step->c0), &d);
    }
    cov_out[i] = c;
  }
}

}  // namespace

// Entry points compiled for several instruction sets (TORCHNTK_TARGET_CLONES),
// with everything above inlined into them; run_* call them (chain_plan.h).
#define TORCHNTK_CHAIN_KERNELS(T)                                                                \
  TORCHNTK_TARGET_CLONES void linear_step_##T(const Item<T>& item, int n_dims, const T* in_a,     \
                                              const T* in_b, T* out_a, T* out_b, const T* var1,  \
                                              const T* var2, const OuterLayout& layout,          \
                                              Scratch<T>& scratch) {                             \
    LinearStep<T> step(item, in_a, in_b, out_a, out_b, var1, var2, layout, scratch);            \
    if (n_dims == 1) step.template run<1>();                                                     \
    else if (n_dims == 2) step.template run<2>();                                                \
    else step.template run<3>();                                                                 \
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
  }                                                                                              \
  void run_flat_self(const std::vector<Item<T>>& items, const T* cov, T* cov_out, int64_t n,     \
                     const Variances<T>& variances) {                                            \
    flat_self(items, cov, cov_out, n, variances);                                                \
  }

TORCHNTK_CHAIN_KERNELS(float)
TORCHNTK_CHAIN_KERNELS(double)

}  // namespace chain
}  // namespace torchntk
