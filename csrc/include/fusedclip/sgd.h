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
  T neg_lr;               // -lr: the step is one fused multiply-add, param + neg_lr * grad

  template <typename U>
  FC_HOST_DEVICE SgdScalars<U> as() const {
    return {U(weight_decay), U(momentum), U(one_minus_dampening), U(neg_lr)};
  }
};

FC_HOST_DEVICE SgdScalars<double> sgd_scalars(double lr, double momentum, double dampening,
                                              double weight_decay) {
  SgdScalars<double> s;
  s.weight_decay = weight_decay;
  s.momentum = momentum;
  s.one_minus_dampening = 1.0 - dampening;
  s.neg_lr = -lr;
  return s;
}

// One SGD step on one element (or one vector of elements), in place. `grad` is
// the gradient the rule uses: already through GradTransform. FIRST is the
// buffer's first step, on which torch.optim.SGD copies the gradient into the
// buffer instead of blending it in (dampening does not apply). Every rounding
// is torch's fused CPU SGD's (aten/src/ATen/native/cpu/FusedSGDKernel.cpp):
// the weight decay, the buffer's blend, the Nesterov look-ahead and the step
// are each one fused multiply-add there. Its scalar loop blends the buffer
// the other way round, buf = fma(buf, momentum, (1 - dampening) * g): the CPU
// kernel runs those elements with SCALAR_TAIL. Which elements those are:
// torch's kernel leaves the last t = numel % W elements of a tensor (W its
// vector width in elements) to a scalar loop, which its compiler vectorizes
// once at half the width, so the first (t / (W/2)) * (W/2) of them still
// round as the vector code does and only the rest as scalar code (measured
// for every t on torch 2.13's AVX-512 kernels: tests/test_bitwise_torch.py).
// `buf` is not touched with Momentum::None.
template <bool WEIGHT_DECAY, Momentum M, bool FIRST, bool SCALAR_TAIL = false, typename T>
FC_HOST_DEVICE void sgd_update(T& param, T grad, T& buf, const SgdScalars<T>& s) {
  if constexpr (WEIGHT_DECAY) {
    grad = fc_fma(param, s.weight_decay, grad);
  }
  if constexpr (M != Momentum::None) {
    if constexpr (FIRST) {
      buf = grad;
    } else if constexpr (SCALAR_TAIL) {
      buf = fc_fma(buf, s.momentum, s.one_minus_dampening * grad);
    } else {
      buf = fc_fma(s.one_minus_dampening, grad, buf * s.momentum);
    }
    if constexpr (M == Momentum::Nesterov) {
      grad = fc_fma(buf, s.momentum, grad);
    } else {
      grad = buf;
    }
  }
  param = fc_fma(grad, s.neg_lr, param);
}

}  // namespace fusedclip
