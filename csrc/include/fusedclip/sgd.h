// The SGD update rule (plain, heavy-ball momentum: Polyak 1964; Nesterov
// momentum in the form of Sutskever et al. 2013 that torch.optim.SGD uses), as
// a rule (rule.h), for every backend. State: momentum_buffer, with momentum.
#pragma once

#include "fusedclip/macros.h"
#include "fusedclip/math_traits.h"
#include "fusedclip/rule.h"

namespace fusedclip {

// How the momentum buffer enters the step.
enum class Momentum { None, Heavy, Nesterov };

struct Sgd {
  static constexpr const char* kName = "sgd";
  static constexpr const char* kHyperNames = "momentum,dampening,weight_decay,nesterov";
  static constexpr int kNumHyper = 4;
  static constexpr const char* kStateNames = "momentum_buffers";
  static constexpr const char* kStepsName = "buffer_steps";
  static constexpr const char* kStatelessWhen = "without momentum";
  static constexpr int kSecondMoment = -1;

  struct Hyper {
    double momentum, dampening, weight_decay;
    bool nesterov;

    static Hyper from(const double* v) { return {v[0], v[1], v[2], v[3] != 0.0}; }
    Invalid invalid() const {
      if (!(momentum >= 0.0)) return {0, ">= 0"};
      if (!(dampening - dampening == 0.0)) return {1, "finite"};  // NaN and inf fail
      if (!(weight_decay >= 0.0)) return {2, ">= 0"};
      if (nesterov && !(momentum > 0.0 && dampening == 0.0)) {
        return {-1, "nesterov momentum requires momentum > 0 and zero dampening"};
      }
      return {};
    }
    // With momentum: the buffer, and a counter of the steps it has taken (kept
    // by the caller beside it): where the count reaches 1 this step is the
    // buffer's first, which copies the gradient into it (torch's `buf is
    // None`); a skipped first step leaves the next one a first step.
    int num_states() const { return momentum != 0.0 ? 1 : 0; }
    bool uses_steps() const { return momentum != 0.0; }
    Momentum momentum_mode() const {
      return momentum == 0.0 ? Momentum::None : nesterov ? Momentum::Nesterov : Momentum::Heavy;
    }
  };

  template <typename T>
  struct Scalars {
    T weight_decay;  // L2 factor added to the gradient
    T momentum;
    T one_minus_dampening;
    T neg_lr;        // -lr: the step is one fused multiply-add, param + neg_lr * grad
    bool first;      // the buffer's first step

    template <typename U>
    FC_HOST_DEVICE Scalars<U> as() const {
      return {U(weight_decay), U(momentum), U(one_minus_dampening), U(neg_lr), first};
    }
  };

  static FC_HOST_DEVICE Scalars<double> scalars(const Hyper& h, double lr, double step) {
    return {h.weight_decay, h.momentum, 1.0 - h.dampening, -lr, step == 1.0};
  }

  // Every rounding is torch's fused CPU SGD's
  // (aten/src/ATen/native/cpu/FusedSGDKernel.cpp): the weight decay, the
  // buffer's blend, the Nesterov look-ahead and the step are each one fused
  // multiply-add there. Its scalar code blends the buffer the other way round,
  // buf = fma(buf, momentum, (1 - dampening) * g): SCALAR_TAIL. On its first
  // step the buffer takes the gradient (dampening does not apply).
  template <bool WEIGHT_DECAY, Momentum M>
  struct Variant {
    static constexpr int kStates = M == Momentum::None ? 0 : 1;

    template <bool SCALAR_TAIL, typename T>
    static FC_HOST_DEVICE void update(T& param, T grad, T* st, const Scalars<T>& s) {
      if constexpr (WEIGHT_DECAY) {
        grad = fc_fma(param, s.weight_decay, grad);
      }
      if constexpr (M != Momentum::None) {
        T& buf = st[0];
        if (s.first) {
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
  };

  template <typename F>
  static void dispatch(const Hyper& h, F&& f) {
    const bool wd = h.weight_decay != 0.0;
    switch (h.momentum_mode()) {
      case Momentum::None:
        return wd ? f(Variant<true, Momentum::None>{}) : f(Variant<false, Momentum::None>{});
      case Momentum::Heavy:
        return wd ? f(Variant<true, Momentum::Heavy>{}) : f(Variant<false, Momentum::Heavy>{});
      case Momentum::Nesterov:
        return wd ? f(Variant<true, Momentum::Nesterov>{})
                  : f(Variant<false, Momentum::Nesterov>{});
    }
  }
};

}  // namespace fusedclip
