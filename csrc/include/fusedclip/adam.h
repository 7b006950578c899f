// The Adam / AdamW update rule (Kingma & Ba 2015; Loshchilov & Hutter 2019;
// AMSGrad: Reddi, Kale & Kumar 2018), as a rule (rule.h), for every backend.
// States: exp_avg, exp_avg_sq and, with amsgrad, max_exp_avg_sq.
#pragma once

#include <cmath>

#include "fusedclip/macros.h"
#include "fusedclip/math_traits.h"
#include "fusedclip/rule.h"

namespace fusedclip {

// How weight decay enters the step: not at all, as an L2 term added to the
// gradient (torch.optim.Adam), or decoupled from it (AdamW).
enum class WeightDecay { None, L2, Decoupled };

struct Adam {
  static constexpr const char* kName = "adam";
  static constexpr const char* kHyperNames =
      "beta1,beta2,eps,weight_decay,amsgrad,decoupled_weight_decay";
  static constexpr int kNumHyper = 6;
  static constexpr const char* kStateNames = "exp_avgs,exp_avg_sqs,max_exp_avg_sqs";
  static constexpr const char* kStepsName = "steps";
  static constexpr const char* kStatelessWhen = nullptr;
  static constexpr int kSecondMoment = 1;

  struct Hyper {
    double beta1, beta2, eps, weight_decay;
    bool amsgrad, decoupled;

    static Hyper from(const double* v) {
      return {v[0], v[1], v[2], v[3], v[4] != 0.0, v[5] != 0.0};
    }
    Invalid invalid() const {
      if (!(eps >= 0.0)) return {2, ">= 0"};
      if (!(beta1 >= 0.0 && beta1 < 1.0)) return {0, "in [0, 1)"};
      if (!(beta2 >= 0.0 && beta2 < 1.0)) return {1, "in [0, 1)"};
      if (!(weight_decay >= 0.0)) return {3, ">= 0"};
      return {};
    }
    int num_states() const { return amsgrad ? 3 : 2; }
    bool uses_steps() const { return true; }
    WeightDecay weight_decay_mode() const {
      return weight_decay == 0.0 ? WeightDecay::None
             : decoupled         ? WeightDecay::Decoupled
                                 : WeightDecay::L2;
    }
  };

  template <typename T>
  struct Scalars {
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
    FC_HOST_DEVICE Scalars<U> as() const {
      return {U(one_minus_beta1), U(beta2), U(one_minus_beta2), U(weight_decay),
              U(param_decay), U(step_size), U(bias_correction2_sqrt), U(eps)};
    }
  };

  static FC_HOST_DEVICE Scalars<double> scalars(const Hyper& h, double lr, double step) {
    Scalars<double> s;
    s.one_minus_beta1 = 1.0 - h.beta1;
    s.beta2 = h.beta2;
    s.one_minus_beta2 = 1.0 - h.beta2;
    s.weight_decay = h.weight_decay;
    s.param_decay = 1.0 - lr * h.weight_decay;
    s.step_size = lr / (1.0 - ::pow(h.beta1, step));
    s.bias_correction2_sqrt = ::sqrt(1.0 - ::pow(h.beta2, step));
    s.eps = h.eps;
    return s;
  }

  // Every rounding is torch's fused CPU Adam's
  // (aten/src/ATen/native/cpu/FusedAdamKernel.cpp), so that the two agree bit
  // for bit: the L2 term and the second moment's update are fused
  // multiply-adds there (the first by the compiler, inside its weight-decay
  // branch), m lerps towards g with torch.lerp's rounding, the decoupled
  // shrink p * (1 - lr * wd) is rounded before the step is taken from it (it
  // sits in its own branch there, so it is never fused), and
  // p -= step_size * m / (sqrt(v) / sqrt(bias_correction2) + eps). Its scalar
  // code fuses the second moment's update the other way round,
  // v = fma(v, beta2, (1 - beta2) * g * g): SCALAR_TAIL.
  template <WeightDecay WD, bool AMSGRAD>
  struct Variant {
    static constexpr int kStates = AMSGRAD ? 3 : 2;

    template <bool SCALAR_TAIL, typename T>
    static FC_HOST_DEVICE void update(T& param, T grad, T* st, const Scalars<T>& s) {
      T& exp_avg = st[0];
      T& exp_avg_sq = st[1];
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
        st[2] = fc_maximum(st[2], exp_avg_sq);
        second_moment = st[2];
      }
      const T denom = fc_sqrt(second_moment) / s.bias_correction2_sqrt + s.eps;
      param = param - s.step_size * exp_avg / denom;
    }
  };

  template <typename F>
  static void dispatch(const Hyper& h, F&& f) {
    const bool ams = h.amsgrad;
    switch (h.weight_decay_mode()) {
      case WeightDecay::None:
        return ams ? f(Variant<WeightDecay::None, true>{}) : f(Variant<WeightDecay::None, false>{});
      case WeightDecay::L2:
        return ams ? f(Variant<WeightDecay::L2, true>{}) : f(Variant<WeightDecay::L2, false>{});
      case WeightDecay::Decoupled:
        return ams ? f(Variant<WeightDecay::Decoupled, true>{})
                   : f(Variant<WeightDecay::Decoupled, false>{});
    }
  }
};

}  // namespace fusedclip
