// The gradient an update rule sees, written once for every update kernel
// (Adam, SGD, Adagrad; CPU and CUDA):
//
//   g' = clamp(g * mult, lo, hi)
//
// mult folds the clip coefficient (global, per tensor or per unit), the
// GradScaler's 1 / grad_scale and the sign for maximize; [lo, hi] is
// [-clip_value, clip_value] for element-wise value clipping and [-inf, inf]
// (the identity, for every value) otherwise. The clamp propagates NaN, like
// torch.clamp. Where there is no value clipping the clamp is the identity, and
// scale() skips it: the CPU update loops, which run close to their compute
// limit once prefetching keeps memory busy, were about 10% faster without its
// compares (fp32 AdamW, bf16 SGD; bench/bench_optim.py). The CUDA kernels,
// with ALU to spare, always call operator().
#pragma once

#include "fusedclip/macros.h"
#include "fusedclip/math_traits.h"

namespace fusedclip {

template <typename T>
struct GradTransform {
  T mult;
  T lo;  // -clip_value, or -inf
  T hi;  // clip_value, or inf

  // The same numbers in another type: a SIMD vector broadcasts each scalar.
  template <typename U>
  FC_HOST_DEVICE GradTransform<U> as() const {
    return {U(mult), U(lo), U(hi)};
  }

  FC_HOST_DEVICE T operator()(T grad) const {
    return fc_clamp(grad * mult, lo, hi);
  }

  // operator() without the clamp: exact when lo, hi = -inf, inf.
  FC_HOST_DEVICE T scale(T grad) const { return grad * mult; }

  // operator() or scale(), chosen at compile time.
  template <bool CLAMP>
  FC_HOST_DEVICE T apply(T grad) const {
    if constexpr (CLAMP) {
      return (*this)(grad);
    } else {
      return scale(grad);
    }
  }
};

// mult = clip coefficient * unit coefficient / grad_scale, negated for
// maximize; clip_value < 0 means none (the clamp is then to +-inf).
FC_HOST_DEVICE GradTransform<double> grad_transform(double mult, double clip_value) {
  const double inf = __builtin_huge_val();
  return clip_value < 0.0 ? GradTransform<double>{mult, -inf, inf}
                          : GradTransform<double>{mult, -clip_value, clip_value};
}

}  // namespace fusedclip
