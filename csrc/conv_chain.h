// What the CPU and CUDA conv chains share: the steps, their sizes, and the
// per-entry arithmetic of the nonlinearity (conv_chain.cpp describes the chain).
// Only c10 headers, so that nvcc compiles it quickly.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/bit_cast.h>

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "diagonal_conv.h"

namespace torchntk {

// Affine and Pool are the linear steps: Affine sums each pair of positions
// along the diagonals of its window, Pool over the whole box (both positions
// vary). Read from Python's step records by conv_chain.cpp (read_steps).
enum StepKind : int { kAffine, kABRelu, kPool };
constexpr int kMaxSpatial = 3;

// One step, trivially copyable so that the CUDA kernels can read it.
struct Step {
  int kind;
  // Affine: nngp' = α·A(nngp) + β, ntk' = γ·A(nngp) + α·A(ntk) + δ, with A the
  // unit-variance window map (the diagonal sum over k taps divided by k), and
  // the window per spatial dimension. Pool: the same with the box sum, not
  // divided (α holds the scale, β = γ = δ = 0).
  double alpha, beta, gamma, delta;
  bool circular;
  int64_t k[kMaxSpatial], stride[kMaxSpatial], pad_low[kMaxSpatial], pad_high[kMaxSpatial];
  // ABRelu: d = c0 + k1·ψ.
  double k1, c0;
  // Spatial sizes before and after the step.
  int64_t in[kMaxSpatial], out[kMaxSpatial];
};

// Π sizes (positions) or Π sizes² (entries of a pair's covariance).
C10_HOST_DEVICE inline int64_t positions_of(const int64_t* sizes, int n_dims) {
  int64_t result = 1;
  for (int d = 0; d < n_dims; ++d) result *= sizes[d];
  return result;
}
C10_HOST_DEVICE inline int64_t entries_of(const int64_t* sizes, int n_dims) {
  int64_t result = 1;
  for (int d = 0; d < n_dims; ++d) result *= sizes[d] * sizes[d];
  return result;
}

// atan(n / m) for 0 <= n <= m, m > 0, branch-free: Cephes (Moshier 1989,
// 1992). The ratio and its reduction share one division. double: reduced at
// n/m = 0.66 to x = (n − m)/(n + m) (atan(n/m) = π/4 + atan(x)), then a
// rational approximation of degree 4/5 in x², ~1 ulp. float: atanf's
// reduction at tan(π/8), |x| <= tan(π/8), and a polynomial of degree 4 in
// x², ~2e-7 relative (no second division).
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T atan_ratio(T n, T m) {
  if constexpr (std::is_same_v<T, float>) {
    const bool reduced = n > 0.41421356237f * m;
    const float x = (reduced ? n - m : n) / (reduced ? n + m : m);
    const float z = x * x;
    const float p = ((8.05374449538e-2f * z - 1.38776856032e-1f) * z + 1.99777106478e-1f) * z -
                    3.33329491539e-1f;
    return (reduced ? float(M_PI_4) : 0.f) + (x + x * z * p);
  } else {
    const bool reduced = n > T(0.66) * m;
    const T x = (reduced ? n - m : n) / (reduced ? n + m : m);
    const T z = x * x;
    const T p = (((T(-8.750608600031904122785e-1) * z - T(1.615753718733365076637e1)) * z -
                  T(7.500855792314704667340e1)) * z - T(1.228866684490136173410e2)) * z -
                T(6.485021904942025371773e1);
    const T q = ((((z + T(2.485846490142306297962e1)) * z + T(1.650270098316988542046e2)) * z +
                  T(4.328810604912902668951e2)) * z + T(4.853903996359136964868e2)) * z +
                T(1.945506571482613964425e2);
    const T base = reduced ? T(M_PI_4 + 0.5 * 6.123233995736765886130e-17) : T(0);
    return base + (x + x * z * p / q);
  }
}

// atan2(c, s) for s >= 0, in [-π/2, π/2]; 0 when c = s = 0.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T atan2_nonnegative(T c, T s) {
  const T t = c < T(0) ? -c : c;
  const T low = t < s ? t : s, high = t < s ? s : t;
  const T angle = high > T(0) ? atan_ratio(low, high) : T(0);
  const T magnitude = t > s ? T(M_PI_2) - angle : angle;
  return c < T(0) ? -magnitude : magnitude;
}

// The layout of T: its unsigned integer of the same size, mantissa bits, exponent bias.
template <typename T>
struct FloatBits;
template <>
struct FloatBits<float> {
  using type = uint32_t;
  static constexpr int kMantissa = 23;
  static constexpr uint32_t kBias = 127;
};
template <>
struct FloatBits<double> {
  using type = uint64_t;
  static constexpr int kMantissa = 52;
  static constexpr uint64_t kBias = 1023;
};

// 2^k and 2^−k with var·4^−k in [2, 8) for a normal var ≥ 0, k = ⌊E/2⌋ −
// (bias + 1)/2 from its biased exponent E: the exponent field of the bits
// shifted right by one is ⌊E/2⌋. Zero and subnormals (E = 0) get
// k = −(bias + 1)/2, inf and NaN k = (bias − 1)/2; every 2^±k is a normal
// number. A shift, a mask and an addition or subtraction, which vectorize.
template <typename T>
struct RootScale {
  T up, down;
};
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE RootScale<T> root_scale(T var) {
  using Bits = typename FloatBits<T>::type;
  constexpr int m = FloatBits<T>::kMantissa;
  constexpr Bits bias = FloatBits<T>::kBias;
  const Bits half = (c10::bit_cast<Bits>(var) >> 1) & (bias << m);  // ⌊E/2⌋ << m
  return {c10::bit_cast<T>(half + ((bias - 1) / 2 << m)),            // bias + k
          c10::bit_cast<T>(((3 * bias + 1) / 2 << m) - half)};       // bias − k
}

// The ABRelu map of one entry of covariance c between variances var1, var2
// (Cho & Saul 2009): s = sqrt(var1·var2 − c²), ψ = atan2(c, s),
// d = c0 + k1·ψ; nngp' = k1·s + c·d, and the NTK is multiplied by d. In the
// covariances' own precision, as the torch rule. The products are formed at
// unit scale, var1·4^−k1, var2·4^−k2, c·2^−(k1+k2) (root_scale), where they
// neither overflow nor underflow for any variances of the type; powers of two
// scale exactly, so this is the unscaled arithmetic wherever that stays in
// range. Compiled without fused multiply-adds (setup.py), the gap is exactly 0
// for an example with itself. A NaN gap (an overflowed covariance upstream)
// stays NaN. Always inlined: the row loops of conv_chain.cpp vectorize only
// with it inside them (a call is compiled for baseline x86-64).
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T abrelu_entry(T c, T var1, T var2, T k1, T c0, T* d) {
  const RootScale<T> r1 = root_scale(var1), r2 = root_scale(var2);
  const T unit_c = c * r1.down * r2.down;
  const T gap = (var1 * r1.down * r1.down) * (var2 * r2.down * r2.down) - unit_c * unit_c;
  const T unit_s = std::sqrt(gap < T(0) ? T(0) : gap);
  *d = c0 + k1 * atan2_nonnegative(unit_c, unit_s);
  return k1 * r1.up * unit_s * r2.up + c * *d;  // k1·r1.up: once per row
}

#ifdef TORCHNTK_WITH_CUDA
// conv_chain_cuda.cu: the chain on CUDA tensors. `variances1`/`variances2`
// empty: the pass over examples' own covariances (`ntk` undefined), which
// fills `record` with the variance tables; else the pass over pairs.
void conv_chain_cuda(const at::Tensor& nngp, const at::Tensor& ntk, at::Tensor& nngp_out,
                     at::Tensor& ntk_out, const std::vector<at::Tensor>& variances1,
                     const std::vector<at::Tensor>& variances2, std::vector<at::Tensor>& record,
                     const std::vector<Step>& steps, int64_t n_dims, int64_t n2);
#endif

}  // namespace torchntk
