// PairChain: one thread's buffers for taking pairs of examples through the
// items of a pass (chain_plan.h), one pair at a time (conv_chain.cpp
// describes the chain).
#pragma once

#include <algorithm>
#include <utility>
#include <vector>

#include "chain_plan.h"

namespace torchntk {
namespace chain {

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

}  // namespace chain
}  // namespace torchntk
