// The Adam / AdamW update rule, written once for every backend.
//
// adam_scalars() folds the per-tensor quantities (bias corrections, learning
// rate, weight decay) into a few numbers once per tensor; adam_update() is the
// element-wise rule, on the gradient after GradTransform (grad_transform.h:
// clip coefficients, unscale, maximize sign, value clipping). T is a scalar
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
    return {U(one_minus_beta1), U(beta2), U(one_minus_beta2),
            U(weight_decay), U(param_decay), U(step_size),
            U(bias_correction2_sqrt), U(eps)};
  }
};

// `step` is the step count after this step's increment (1 on the first step).
FC_HOST_DEVICE AdamScalars<double> adam_scalars(
    double lr, double beta1, double beta2, double eps, double weight_decay,
    double step) {
  AdamScalars<double> s;
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
// is the gradient the rule uses: already through GradTransform. Every rounding
// is torch's fused CPU Adam's (aten/src/ATen/native/cpu/FusedAdamKernel.cpp),
// so that the two agree bit for bit: the L2 term and the second moment's
// update are fused multiply-adds there (the first by the compiler, inside its
// weight-decay branch), m lerps towards g with torch.lerp's rounding, the
// decoupled shrink p * (1 - lr * wd) is rounded before the step is taken
// from it (it sits in its own branch there, so it is never fused), and
// p -= step_size * m / (sqrt(v) / sqrt(bias_correction2) + eps). Its scalar
// loop over the last elements of a tensor fuses the second moment's update
// the other way round, v = fma(v, beta2, (1 - beta2) * g * g): the CPU kernel
// runs those elements with SCALAR_TAIL (see sgd.h for which elements).
template <WeightDecay WD, bool AMSGRAD, bool SCALAR_TAIL = false, typename T>
FC_HOST_DEVICE void adam_update(T& param, T grad, T& exp_avg, T& exp_avg_sq,
                                T& max_exp_avg_sq, const AdamScalars<T>& s) {
  if constexpr (WD == WeightDecay::L2) {
    grad = fc_fma(param, s.weight_decay, grad);
  } else if constexpr (WD == WeightDecay::Decoupled) {
    param = param * s.param_decay;
  }
  exp_avg = fc_lerp(exp_avg, grad, s.one_minus_beta1);
  if constexpr (SCALAR_TAIL) {
    exp_avg_sq = fc_fma(exp_avg_sq, s.beta2, s.one_minus_beta2 * grad * grad);
  } else {
    exp_avg_sq = fc_fma(s.one_minus_beta2 * grad, grad, exp_avg_sq * s.beta2);
  }
  T second_moment = exp_avg_sq;
  if constexpr (AMSGRAD) {
    max_exp_avg_sq = fc_maximum(max_exp_avg_sq, exp_avg_sq);
    second_moment = max_exp_avg_sq;
  }
  const T denom = fc_sqrt(second_moment) / s.bias_correction2_sqrt + s.eps;
  param = param - s.step_size * exp_avg / denom;
}

}  // namespace fusedclip
