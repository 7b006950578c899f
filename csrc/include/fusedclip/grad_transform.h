// The gradient an update rule sees, written once for every rule and backend:
//
//   g' = spike(clamp(g * mult, lo, hi), v)
//
// mult folds the clip coefficient (global, per tensor or per unit), the
// GradScaler's 1 / grad_scale and the sign for maximize (grad_mult below);
// [lo, hi] is [-clip_value, clip_value] for element-wise value clipping and
// [-inf, inf] (the identity, for every value) otherwise. The clamp propagates
// NaN, like torch.clamp. Where there is no value clipping the clamp is the
// identity, and scale() skips it: the CPU update loops, which run close to
// their compute limit once prefetching keeps memory busy, were about 10%
// faster without its compares (fp32 AdamW, bf16 SGD; bench/bench_optim.py).
// The CUDA kernels, with ALU to spare, always call operator().
//
// spike() is element-wise clipping against the optimizer's second moment v
// (as it was before this step's update), for rules that keep one: where
// g^2 > theta * v, g becomes sign(g) * sqrt(theta * v); elements with v = 0
// (a first step) pass as they are (Huang et al. 2025, SPAM).
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

// What a tensor's gradient is multiplied by: its clip coefficient (global or
// its own), the unscale and -1 for maximize. A unit's coefficient multiplies
// this once more, per run of a unit (unit_mult).
FC_HOST_DEVICE double grad_mult(double clip_coef, double inv_scale, bool maximize) {
  return clip_coef * inv_scale * (maximize ? -1.0 : 1.0);
}

FC_HOST_DEVICE double unit_mult(double tensor_mult, double unit_coef) {
  return tensor_mult * unit_coef;
}

// clip_value < 0 means none (the clamp is then to +-inf).
FC_HOST_DEVICE GradTransform<double> grad_transform(double mult, double clip_value) {
  const double inf = __builtin_huge_val();
  return clip_value < 0.0 ? GradTransform<double>{mult, -inf, inf}
                          : GradTransform<double>{mult, -clip_value, clip_value};
}

// Spike clipping of one (transformed) gradient against the second moment v,
// theta > 0. A NaN gradient stays NaN.
template <typename T>
FC_HOST_DEVICE T spike_clip(T grad, T v, T theta) {
  using M = MathTraits<T>;
  const T bound = theta * v;
  const T clipped = M::select(M::greater(grad * grad, bound), M::copysign(fc_sqrt(bound), grad),
                              grad);
  return M::select(M::greater(v, T(0)), clipped, grad);
}

}  // namespace fusedclip
