// The Adagrad update rule (Duchi, Hazan & Singer 2011, diagonal form, as
// torch.optim.Adagrad states it), written once for every backend.
//
// adagrad_scalars() folds the per-tensor quantities (clip coefficient, gradient
// unscale, maximize sign, the decayed learning rate) into a few numbers once
// per tensor; adagrad_update() is the element-wise rule. T is a scalar (float
// or double, host or device) or a CPU SIMD vector.
#pragma once

#include "fusedclip/macros.h"
#include "fusedclip/math_traits.h"

namespace fusedclip {

template <typename T>
struct AdagradScalars {
  T grad_mult;     // clip_coef / grad_scale, negated for maximize
  T weight_decay;  // L2 factor added to the gradient
  T clr;           // lr / (1 + (step - 1) * lr_decay)
  T eps;

  template <typename U>
  FC_HOST_DEVICE AdagradScalars<U> as() const {
    return {U(grad_mult), U(weight_decay), U(clr), U(eps)};
  }
};

// `step` is the step count after this step's increment (1 on the first step).
FC_HOST_DEVICE AdagradScalars<double> adagrad_scalars(double lr, double lr_decay,
                                                      double weight_decay, double eps,
                                                      double step, double grad_mult) {
  AdagradScalars<double> s;
  s.grad_mult = grad_mult;
  s.weight_decay = weight_decay;
  s.clr = lr / (1.0 + (step - 1.0) * lr_decay);
  s.eps = eps;
  return s;
}

// One Adagrad step on one element (or one vector of elements), in place, in
// torch.optim.Adagrad's order: sum += g * g; p -= clr * g / (sqrt(sum) + eps).
template <bool WEIGHT_DECAY, typename T>
FC_HOST_DEVICE void adagrad_update(T& param, T grad, T& sum, const AdagradScalars<T>& s) {
  grad = grad * s.grad_mult;
  if constexpr (WEIGHT_DECAY) {
    grad = grad + s.weight_decay * param;
  }
  sum = sum + grad * grad;
  const T denom = fc_sqrt(sum) + s.eps;
  param = param - s.clr * grad / denom;
}

}  // namespace fusedclip
