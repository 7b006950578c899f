// The Adagrad update rule (Duchi, Hazan & Singer 2011, diagonal form, as
// torch.optim.Adagrad states it), as a rule (rule.h), for every backend.
// State: sum.
#pragma once

#include "fusedclip/macros.h"
#include "fusedclip/math_traits.h"
#include "fusedclip/rule.h"

namespace fusedclip {

struct Adagrad {
  static constexpr const char* kName = "adagrad";
  static constexpr const char* kHyperNames = "lr_decay,weight_decay,eps";
  static constexpr int kNumHyper = 3;
  static constexpr const char* kStateNames = "state_sums";
  static constexpr const char* kStepsName = "steps";
  static constexpr const char* kStatelessWhen = nullptr;
  static constexpr int kSecondMoment = -1;  // its sum of squares is no moving average

  struct Hyper {
    double lr_decay, weight_decay, eps;

    static Hyper from(const double* v) { return {v[0], v[1], v[2]}; }
    Invalid invalid() const {
      if (!(lr_decay >= 0.0)) return {0, ">= 0"};
      if (!(weight_decay >= 0.0)) return {1, ">= 0"};
      if (!(eps >= 0.0)) return {2, ">= 0"};
      return {};
    }
    int num_states() const { return 1; }
    bool uses_steps() const { return true; }
  };

  template <typename T>
  struct Scalars {
    T weight_decay;  // L2 factor added to the gradient
    T clr;           // lr / (1 + (step - 1) * lr_decay)
    T eps;

    template <typename U>
    FC_HOST_DEVICE Scalars<U> as() const {
      return {U(weight_decay), U(clr), U(eps)};
    }
  };

  static FC_HOST_DEVICE Scalars<double> scalars(const Hyper& h, double lr, double step) {
    return {h.weight_decay, lr / (1.0 + (step - 1.0) * h.lr_decay), h.eps};
  }

  // In torch.optim.Adagrad's order: sum += g * g; p -= clr * g / (sqrt(sum) + eps).
  // Every rounding is torch's fused CPU Adagrad's
  // (aten/src/ATen/native/cpu/FusedAdagradKernel.cpp): the weight decay and the
  // sum's update are fused multiply-adds there, the step is not.
  template <bool WEIGHT_DECAY>
  struct Variant {
    static constexpr int kStates = 1;

    template <bool SCALAR_TAIL, typename T>
    static FC_HOST_DEVICE void update(T& param, T grad, T* st, const Scalars<T>& s) {
      if constexpr (WEIGHT_DECAY) {
        grad = fc_fma(param, s.weight_decay, grad);
      }
      T& sum = st[0];
      sum = fc_fma(grad, grad, sum);
      const T denom = fc_sqrt(sum) + s.eps;
      param = param - s.clr * grad / denom;
    }
  };

  template <typename F>
  static void dispatch(const Hyper& h, F&& f) {
    return h.weight_decay != 0.0 ? f(Variant<true>{}) : f(Variant<false>{});
  }
};

}  // namespace fusedclip
