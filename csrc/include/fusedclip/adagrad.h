// The Adagrad update rule (Duchi, Hazan & Singer 2011, diagonal form, as
// torch.optim.Adagrad states it), written once for every backend.
//
// adagrad_scalars() folds the per-tensor quantities (the decayed learning rate,
// weight decay, eps) into a few numbers once per tensor; adagrad_update() is the
// element-wise rule, on the gradient after GradTransform (grad_transform.h:
// clip coefficients, unscale, maximize sign, value clipping). T is a scalar (float
// or double, host or device) or a CPU SIMD vector.
#pragma once

#include "fusedclip/macros.h"
#include "fusedclip/math_traits.h"

namespace fusedclip {

template <typename T>
struct AdagradScalars {
  T weight_decay;  // L2 factor added to the gradient
  T clr;           // lr / (1 + (step - 1) * lr_decay)
  T eps;

  template <typename U>
  FC_HOST_DEVICE AdagradScalars<U> as() const {
    return {U(weight_decay), U(clr), U(eps)};
  }
};

// `step` is the step count after this step's increment (1 on the first step).
FC_HOST_DEVICE AdagradScalars<double> adagrad_scalars(double lr, double lr_decay,
                                                      double weight_decay, double eps,
                                                      double step) {
  AdagradScalars<double> s;
  s.weight_decay = weight_decay;
  s.clr = lr / (1.0 + (step - 1.0) * lr_decay);
  s.eps = eps;
  return s;
}

// One Adagrad step on one element (or one vector of elements), in place, in
// torch.optim.Adagrad's order: sum += g * g; p -= clr * g / (sqrt(sum) + eps).
// `grad` is the gradient the rule uses: already through GradTransform. Every
// rounding is torch's fused CPU Adagrad's
// (aten/src/ATen/native/cpu/FusedAdagradKernel.cpp): the weight decay and the
// sum's update are fused multiply-adds there, the step is not.
template <bool WEIGHT_DECAY, typename T>
FC_HOST_DEVICE void adagrad_update(T& param, T grad, T& sum, const AdagradScalars<T>& s) {
  if constexpr (WEIGHT_DECAY) {
    grad = fc_fma(param, s.weight_decay, grad);
  }
  sum = fc_fma(grad, grad, sum);
  const T denom = fc_sqrt(sum) + s.eps;
  param = param - s.clr * grad / denom;
}

}  // namespace fusedclip
