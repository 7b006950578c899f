// The Adam / AdamW update rule, written once for every backend.
//
// adam_scalars() folds the per-tensor quantities (clip coefficient, gradient
// unscale, maximize sign, bias corrections, learning rate) into a few numbers
// once per tensor; adam_update() is the element-wise rule. T is a scalar
// (float or double, host or device) or a CPU SIMD vector.
#pragma once

#include <cmath>

#include "fusedclip/macros.h"
#include "fusedclip/math_traits.h"

namespace fusedclip {

// How weight decay enters the step: not at all, as an L2 term added to the
// gradient (torch.optim.Adam), or decoupled from it (AdamW, Loshchilov & Hutter).
enum class WeightDecay { None, L2, Decoupled };

// The weight decay a call's arguments ask for (every backend picks its kernel
// variant from it).
inline WeightDecay weight_decay_mode(double weight_decay, bool decoupled) {
  return weight_decay == 0.0 ? WeightDecay::None
         : decoupled         ? WeightDecay::Decoupled
                             : WeightDecay::L2;
}

template <typename T>
struct AdamScalars {
  T grad_mult;              // clip_coef / grad_scale, negated for maximize: the
                            // per-tensor part of GradTransform's mult
  T one_minus_beta1;
  T beta2;
  T one_minus_beta2;
  T weight_decay;           // L2 factor added to the gradient
  T param_decay;            // 1 - lr * weight_decay, the decoupled shrink
  T step_size;              // lr / (1 - beta1^step)
  T bias_correction2_sqrt;  // sqrt(1 - beta2^step)
  T eps;

  // The same numbers in another type: a SIMD vector broadcasts each scalar.
  template <typename U>
  FC_HOST_DEVICE AdamScalars<U> as() const {
    return {U(grad_mult), U(one_minus_beta1), U(beta2), U(one_minus_beta2),
            U(weight_decay), U(param_decay), U(step_size),
            U(bias_correction2_sqrt), U(eps)};
  }
};

// `step` is the step count after this step's increment (1 on the first step).
FC_HOST_DEVICE AdamScalars<double> adam_scalars(
    double lr, double beta1, double beta2, double eps, double weight_decay,
    double step, double grad_mult) {
  AdamScalars<double> s;
  s.grad_mult = grad_mult;
  s.one_minus_beta1 = 1.0 - beta1;
  s.beta2 = beta2;
  s.one_minus_beta2 = 1.0 - beta2;
  s.weight_decay = weight_decay;
  s.param_decay = 1.0 - lr * weight_decay;
  s.step_size = lr / (1.0 - ::pow(beta1, step));
  s.bias_correction2_sqrt = ::sqrt(1.0 - ::pow(beta2, step));
  s.eps = eps;
  return s;
}

// One Adam step on one element (or one vector of elements), in place. `grad`
// is the gradient the rule uses: already through GradTransform
// (grad_transform.h), which applies clip coefficients, unscaling, maximize and
// value clipping.
// The order of operations follows torch.optim.Adam so that results agree to
// rounding: m lerps towards g, v = beta2 v + (1 - beta2) g^2,
// p -= step_size * m / (sqrt(v) / sqrt(bias_correction2) + eps).
template <WeightDecay WD, bool AMSGRAD, typename T>
FC_HOST_DEVICE void adam_update(T& param, T grad, T& exp_avg, T& exp_avg_sq,
                                T& max_exp_avg_sq, const AdamScalars<T>& s) {
  if constexpr (WD == WeightDecay::L2) {
    grad = grad + s.weight_decay * param;
  } else if constexpr (WD == WeightDecay::Decoupled) {
    param = param * s.param_decay;
  }
  exp_avg = exp_avg + s.one_minus_beta1 * (grad - exp_avg);
  exp_avg_sq = s.beta2 * exp_avg_sq + s.one_minus_beta2 * grad * grad;
  T second_moment = exp_avg_sq;
  if constexpr (AMSGRAD) {
    max_exp_avg_sq = fc_maximum(max_exp_avg_sq, exp_avg_sq);
    second_moment = max_exp_avg_sq;
  }
  const T denom = fc_sqrt(second_moment) / s.bias_correction2_sqrt + s.eps;
  param = param - s.step_size * exp_avg / denom;
}

}  // namespace fusedclip
