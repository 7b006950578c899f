// The gradient an update rule sees, written once for every rule and backend:
//
//   g' = t_k(... t_1(g * mult) ...)
//
// mult folds the clip coefficient (global, per tensor or per unit), the
// GradScaler's 1 / grad_scale and the sign for maximize (grad_mult below).
// t_1 ... t_k are the element-wise transforms the call turns on, in the order
// of GradTransforms below: each one is on where the op got its argument
// (`float? <kArg>`), and is one host-device function that the CPU loops and
// the CUDA kernels both call.
//
// The drivers name no transform. dispatch_grad_transforms() hands them the
// transforms that are on as a type (ActiveTransforms), which becomes a
// template parameter of their element loop: no element branches on which ones
// are on. On the CPU a transform that is off is left out of the loop (the CPU
// update loops, which run close to their compute limit once prefetching keeps
// memory busy, were about 10% faster without value clipping's compares: fp32
// AdamW, bf16 SGD; bench/bench_optim.py). The CUDA kernels, with ALU to spare,
// run a transform that has an identity form (kHasIdentity) always, as the
// identity when it is off, so that half as many kernels are compiled
// (OffTransforms::kRunIdentity).
//
// A transform is a struct of this shape:
//
//   struct SomeTransform {
//     // The op's argument that turns it on (`float? some_arg`, update_op.h),
//     // and what a valid one is (checked once per call, ops.cpp).
//     static constexpr const char* kArg = "some_arg";
//     static constexpr const char* kMust = "> 0";
//     static bool valid(double arg);
//     // Whether it reads the rule's second moment (Rule::kSecondMoment): the
//     // ops of rules that keep none refuse its argument.
//     static constexpr bool kReadsSecondMoment = false;
//     // Its numbers, folded from the argument once per call, in any math type.
//     template <typename T> struct Params {
//       template <typename U> Params<U> as() const;
//     };
//     static Params<double> params(double arg);
//     // Whether some numbers make it the identity for every value (NaN
//     // included), and those numbers; a backend may then run it when off.
//     static constexpr bool kHasIdentity = false;
//     static Params<double> identity();    // where kHasIdentity
//     // One element (or one SIMD vector of them). `states`: the rule's states
//     // as they were before this step's update.
//     template <class Rule, typename T>
//     static T apply(T grad, const T* states, const Params<T>& p);
//   };
//
// Adding one is its struct here and its entry in GradTransforms; the op
// schema, the argument check and both drivers follow from the list. The
// Python side passes the new argument: a field of clipping.Elementwise that a
// policy sets, ops.StepArgs and ops.update_ (and the op's fake kernel there),
// optim/base.py's _apply, and tests/registry.py's op adapter.
#pragma once

#include <array>
#include <cmath>
#include <optional>
#include <type_traits>

#include "fusedclip/macros.h"
#include "fusedclip/math_traits.h"

namespace fusedclip {

// Value clipping (ValueClip, torch.nn.utils.clip_grad_value_): every element
// clamped to [-clip_value, clip_value]. NaN stays NaN, like torch.clamp.
struct ClipValue {
  static constexpr const char* kArg = "clip_value";
  static constexpr const char* kMust = ">= 0";
  static bool valid(double clip_value) { return clip_value >= 0.0; }
  static constexpr bool kReadsSecondMoment = false;

  template <typename T>
  struct Params {
    T lo;  // -clip_value
    T hi;  // clip_value

    template <typename U>
    FC_HOST_DEVICE Params<U> as() const {
      return {U(lo), U(hi)};
    }
  };
  static Params<double> params(double clip_value) { return {-clip_value, clip_value}; }
  // Clamping to [-inf, inf] changes no value, NaN and -0.0 included.
  static constexpr bool kHasIdentity = true;
  static Params<double> identity() {
    const double inf = __builtin_huge_val();
    return {-inf, inf};
  }

  template <class Rule, typename T>
  static FC_HOST_DEVICE T apply(T grad, const T* /*states*/, const Params<T>& p) {
    return fc_clamp(grad, p.lo, p.hi);
  }
};

// Spike clipping (SpikeClip; Huang et al. 2025, SPAM) against the rule's
// second moment v as it was before this step's update: where
// g^2 > theta * v, g becomes sign(g) * sqrt(theta * v); elements with v = 0
// (a first step) pass as they are, and a NaN gradient stays NaN.
struct SpikeClip {
  static constexpr const char* kArg = "spike_theta";
  static constexpr const char* kMust = "finite and > 0";
  static bool valid(double theta) { return theta > 0.0 && std::isfinite(theta); }
  static constexpr bool kReadsSecondMoment = true;

  template <typename T>
  struct Params {
    T theta;

    template <typename U>
    FC_HOST_DEVICE Params<U> as() const {
      return {U(theta)};
    }
  };
  static Params<double> params(double theta) { return {theta}; }
  static constexpr bool kHasIdentity = false;

  template <class Rule, typename T>
  static FC_HOST_DEVICE T apply(T grad, const T* states, const Params<T>& p) {
    static_assert(Rule::kSecondMoment >= 0, "spike clipping needs a second moment");
    using M = MathTraits<T>;
    const T v = states[Rule::kSecondMoment];
    const T bound = p.theta * v;
    const T clipped =
        M::select(M::greater(grad * grad, bound), M::copysign(fc_sqrt(bound), grad), grad);
    return M::select(M::greater(v, T(0)), clipped, grad);
  }
};

template <class... Ts>
struct TypeList {
  static constexpr int kSize = sizeof...(Ts);
};

// Every element-wise transform, in the order they apply; the op takes their
// arguments in this order too.
using GradTransforms = TypeList<ClipValue, SpikeClip>;

// -------------------------------------------------------------------------
// What the drivers use: the transforms that are on, as a type.

namespace detail {
template <class T, class List>
struct IndexOf;
template <class T, class... Rest>
struct IndexOf<T, TypeList<T, Rest...>> : std::integral_constant<int, 0> {};
template <class T, class U, class... Rest>
struct IndexOf<T, TypeList<U, Rest...>>
    : std::integral_constant<int, 1 + IndexOf<T, TypeList<Rest...>>::value> {};
}  // namespace detail

constexpr int kNumGradTransforms = GradTransforms::kSize;

// The op's argument of each transform, in the order of GradTransforms: set
// where the call turns it on.
using GradTransformArgs = std::array<std::optional<double>, kNumGradTransforms>;

// Whether Rule's updates can run Transform (the op refuses it otherwise).
template <class Rule, class Transform>
constexpr bool runs_on() {
  return !Transform::kReadsSecondMoment || Rule::kSecondMoment >= 0;
}

// Calls f(Transform{}, index) for every transform of GradTransforms, in order
// (host code: the argument check).
template <class F, class... Ts>
void for_each_grad_transform(TypeList<Ts...>, F&& f) {
  (f(Ts{}, detail::IndexOf<Ts, GradTransforms>::value), ...);
}
template <class F>
void for_each_grad_transform(F&& f) {
  for_each_grad_transform(GradTransforms{}, f);
}

// The transforms On..., in list order, with their numbers in the math type T.
// apply() runs them one after the other.
template <typename T, class... On>
struct ActiveTransforms;

template <typename T>
struct ActiveTransforms<T> {
  template <typename U>
  using As = ActiveTransforms<U>;

  static ActiveTransforms from(const GradTransformArgs&) { return {}; }
  template <typename U>
  FC_HOST_DEVICE As<U> as() const {
    return {};
  }
  template <class Rule>
  FC_HOST_DEVICE T apply(T grad, const T* /*states*/) const {
    return grad;
  }
};

template <typename T, class First, class... Rest>
struct ActiveTransforms<T, First, Rest...> {
  template <typename U>
  using As = ActiveTransforms<U, First, Rest...>;

  typename First::template Params<T> first;
  ActiveTransforms<T, Rest...> rest;

  // The numbers of the call's arguments; a transform of On... that is off
  // there is one with an identity form, which it gets.
  static ActiveTransforms from(const GradTransformArgs& args) {
    const std::optional<double>& arg = args[detail::IndexOf<First, GradTransforms>::value];
    typename First::template Params<T> params;
    if constexpr (First::kHasIdentity) {
      params = arg.has_value() ? First::params(*arg) : First::identity();
    } else {
      params = First::params(*arg);
    }
    return {params, ActiveTransforms<T, Rest...>::from(args)};
  }
  template <typename U>
  FC_HOST_DEVICE As<U> as() const {
    return {first.template as<U>(), rest.template as<U>()};
  }
  template <class Rule>
  FC_HOST_DEVICE T apply(T grad, const T* states) const {
    return rest.template apply<Rule>(First::template apply<Rule>(grad, states, first), states);
  }
};

// What a backend's loops do with a transform that is off: leave it out, or,
// where it has an identity form, run that (one variant fewer to compile).
enum class OffTransforms { kLeaveOut, kRunIdentity };

namespace detail {
// Walks GradTransforms: Chosen are the transforms picked so far, Rest those
// still to look at.
template <class Rule, OffTransforms Off, class Chosen, class Rest>
struct DispatchTransforms;

template <class Rule, OffTransforms Off, class... Chosen>
struct DispatchTransforms<Rule, Off, TypeList<Chosen...>, TypeList<>> {
  template <class F>
  static void run(const GradTransformArgs& args, F&& f) {
    f(ActiveTransforms<double, Chosen...>::from(args));
  }
};

template <class Rule, OffTransforms Off, class... Chosen, class Next, class... Rest>
struct DispatchTransforms<Rule, Off, TypeList<Chosen...>, TypeList<Next, Rest...>> {
  using With = DispatchTransforms<Rule, Off, TypeList<Chosen..., Next>, TypeList<Rest...>>;
  using Without = DispatchTransforms<Rule, Off, TypeList<Chosen...>, TypeList<Rest...>>;

  template <class F>
  static void run(const GradTransformArgs& args, F&& f) {
    if constexpr (!runs_on<Rule, Next>()) {
      Without::run(args, f);
    } else if constexpr (Off == OffTransforms::kRunIdentity && Next::kHasIdentity) {
      With::run(args, f);
    } else if (args[IndexOf<Next, GradTransforms>::value].has_value()) {
      With::run(args, f);
    } else {
      Without::run(args, f);
    }
  }
};
}  // namespace detail

// Calls f(ActiveTransforms<double, On...>) once, On... the transforms that
// `args` turns on (and Rule can run: the op's check refused the others), and
// with kRunIdentity those with an identity form, on or off; their numbers
// folded in double. Host code, once per call.
template <class Rule, OffTransforms Off = OffTransforms::kLeaveOut, class F>
void dispatch_grad_transforms(const GradTransformArgs& args, F&& f) {
  detail::DispatchTransforms<Rule, Off, TypeList<>, GradTransforms>::run(args, f);
}

// -------------------------------------------------------------------------
// The multiplier.

// What a tensor's gradient is multiplied by: its clip coefficient (global or
// its own), the unscale and -1 for maximize. A unit's coefficient multiplies
// this once more, per run of a unit (unit_mult).
FC_HOST_DEVICE double grad_mult(double clip_coef, double inv_scale, bool maximize) {
  return clip_coef * inv_scale * (maximize ? -1.0 : 1.0);
}

FC_HOST_DEVICE double unit_mult(double tensor_mult, double unit_coef) {
  return tensor_mult * unit_coef;
}

}  // namespace fusedclip
