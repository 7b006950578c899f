// The Lion update rule (Chen et al. 2023, "Symbolic Discovery of Optimization
// Algorithms"), as a rule (rule.h), for every backend. State: exp_avg.
//
//   c = beta1 m + (1 - beta1) g;  p <- p (1 - lr wd) - lr sign(c);
//   m <- beta2 m + (1 - beta2) g
#pragma once

#include "fusedclip/macros.h"
#include "fusedclip/math_traits.h"
#include "fusedclip/rule.h"

namespace fusedclip {

struct Lion {
  static constexpr const char* kName = "lion";
  static constexpr const char* kHyperNames = "beta1,beta2,weight_decay";
  static constexpr int kNumHyper = 3;
  static constexpr const char* kStateNames = "exp_avgs";
  static constexpr const char* kStepsName = "steps";
  static constexpr const char* kStatelessWhen = nullptr;
  static constexpr int kSecondMoment = -1;

  struct Hyper {
    double beta1, beta2, weight_decay;

    static Hyper from(const double* v) { return {v[0], v[1], v[2]}; }
    Invalid invalid() const {
      if (!(beta1 >= 0.0 && beta1 <= 1.0)) return {0, "in [0, 1]"};
      if (!(beta2 >= 0.0 && beta2 <= 1.0)) return {1, "in [0, 1]"};
      if (!(weight_decay >= 0.0)) return {2, ">= 0"};
      return {};
    }
    int num_states() const { return 1; }
    bool uses_steps() const { return false; }
  };

  template <typename T>
  struct Scalars {
    T beta1, one_minus_beta1, beta2, one_minus_beta2;
    T param_decay;  // 1 - lr * weight_decay
    T lr;

    template <typename U>
    FC_HOST_DEVICE Scalars<U> as() const {
      return {U(beta1), U(one_minus_beta1), U(beta2), U(one_minus_beta2), U(param_decay), U(lr)};
    }
  };

  static FC_HOST_DEVICE Scalars<double> scalars(const Hyper& h, double lr, double) {
    return {h.beta1, 1.0 - h.beta1, h.beta2, 1.0 - h.beta2, 1.0 - lr * h.weight_decay, lr};
  }

  // Each blend is one fused multiply-add; the decayed weight is rounded
  // before the signed step (exact: lr * {-1, 0, 1}) is taken from it.
  struct Variant {
    static constexpr int kStates = 1;

    template <bool SCALAR_TAIL, typename T>
    static FC_HOST_DEVICE void update(T& param, T grad, T* st, const Scalars<T>& s) {
      T& exp_avg = st[0];
      const T c = fc_fma(s.one_minus_beta1, grad, exp_avg * s.beta1);
      param = param * s.param_decay - s.lr * fc_sign(c);
      exp_avg = fc_fma(s.one_minus_beta2, grad, exp_avg * s.beta2);
    }
  };

  template <typename F>
  static void dispatch(const Hyper&, F&& f) {
    return f(Variant{});
  }
};

}  // namespace fusedclip
