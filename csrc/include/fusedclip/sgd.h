// The SGD update rule (plain, heavy-ball momentum, Nesterov momentum), written
// once for every backend.
//
// sgd_scalars() folds the per-tensor quantities (learning rate, momentum,
// dampening, weight decay) into a few numbers once per tensor; sgd_update() is
// the element-wise rule, on the gradient after GradTransform (grad_transform.h:
// clip coefficients, unscale, maximize sign, value clipping). T is a scalar (float or double, host
// or device) or a CPU SIMD vector.
#pragma once

#include "fusedclip/macros.h"
#include "fusedclip/math_traits.h"

namespace fusedclip {

// How the momentum buffer enters the step: not at all (momentum == 0), as
// heavy-ball momentum (Polyak 1964), or as Nesterov momentum in the form of
// Sutskever et al. 2013 that torch.optim.SGD uses.
enum class Momentum { None, Heavy, Nesterov };

// The momentum a call's arguments ask for (every backend picks its kernel
// variant from it).
inline Momentum momentum_mode(double momentum, bool nesterov) {
  return momentum == 0.0 ? Momentum::None
         : nesterov      ? Momentum::Nesterov
                         : Momentum::Heavy;
}

template <typename T>
struct SgdScalars {
  T weight_decay;         // L2 factor added to the gradient
  T momentum;
  T one_minus_dampening;
  T lr;

  template <typename U>
  FC_HOST_DEVICE SgdScalars<U> as() const {
    return {U(weight_decay), U(momentum), U(one_minus_dampening), U(lr)};
  }
};

FC_HOST_DEVICE SgdScalars<double> sgd_scalars(double lr, double momentum, double dampening,
                                              double weight_decay) {
  SgdScalars<double> s;
  s.weight_decay = weight_decay;
  s.momentum = momentum;
  s.one_minus_dampening = 1.0 - dampening;
  s.lr = lr;
  return s;
}

// One SGD step on one element (or one vector of elements), in place. `grad` is
// the gradient the rule uses: already through GradTransform. FIRST is
// the buffer's first step, on which torch.optim.SGD copies the gradient into
// the buffer instead of blending it in (dampening does not apply). The order
// of operations follows torch.optim.SGD so that results agree to rounding.
// `buf` is not touched with Momentum::None.
template <bool WEIGHT_DECAY, Momentum M, bool FIRST, typename T>
FC_HOST_DEVICE void sgd_update(T& param, T grad, T& buf, const SgdScalars<T>& s) {
  if constexpr (WEIGHT_DECAY) {
    grad = grad + s.weight_decay * param;
  }
  if constexpr (M != Momentum::None) {
    if constexpr (FIRST) {
      buf = grad;
    } else {
      buf = buf * s.momentum + s.one_minus_dampening * grad;
    }
    if constexpr (M == Momentum::Nesterov) {
      grad = grad + s.momentum * buf;
    } else {
      grad = buf;
    }
  }
  param = param - s.lr * grad;
}

}  // namespace fusedclip
