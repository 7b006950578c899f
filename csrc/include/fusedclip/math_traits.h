// Element-wise helpers that the update rules call instead of std:: functions, so
// that one rule compiles for a scalar (float, double; CPU or CUDA) and for a SIMD
// vector (the CPU backend specialises MathTraits for at::vec::Vectorized).
//
// Rounding is part of the contract: the kernels are built without floating-point
// contraction (-ffp-contract=off, nvcc --fmad=false), so a multiply is never
// fused into a following add behind the source's back. Where torch's fused CPU
// kernels fuse one, the rule calls fc_fma; everywhere else each operation rounds
// on its own. That is what makes the CPU steps bit for bit torch's.
#pragma once

#include <cmath>

#include "fusedclip/macros.h"

namespace fusedclip {

template <typename T>
struct MathTraits;  // specialised per scalar or vector type

template <>
struct MathTraits<float> {
  static FC_HOST_DEVICE float sqrt(float x) { return ::sqrtf(x); }
  // a * b + c, rounded once.
  static FC_HOST_DEVICE float fma(float a, float b, float c) { return ::fmaf(a, b, c); }
  // NaN-propagating maximum, like torch.maximum.
  static FC_HOST_DEVICE float maximum(float a, float b) {
    return (a != a || a > b) ? a : b;
  }
  // NaN-propagating clamp to [lo, hi], like torch.clamp.
  static FC_HOST_DEVICE float clamp(float x, float lo, float hi) {
    return x != x ? x : (x < lo ? lo : (x > hi ? hi : x));
  }
  static FC_HOST_DEVICE float abs(float x) { return ::fabsf(x); }
  static FC_HOST_DEVICE float copysign(float magnitude, float sign) {
    return ::copysignf(magnitude, sign);
  }
  // torch.sign: -1, 0 or 1, and 0 for NaN.
  static FC_HOST_DEVICE float sign(float x) {
    return static_cast<float>((x > 0.0f) - (x < 0.0f));
  }
  static FC_HOST_DEVICE bool greater(float a, float b) { return a > b; }
  static FC_HOST_DEVICE bool lerp_small(float weight) { return ::fabsf(weight) < 0.5f; }
  static FC_HOST_DEVICE float select(bool mask, float a, float b) { return mask ? a : b; }
};

template <>
struct MathTraits<double> {
  static FC_HOST_DEVICE double sqrt(double x) { return ::sqrt(x); }
  static FC_HOST_DEVICE double fma(double a, double b, double c) { return ::fma(a, b, c); }
  static FC_HOST_DEVICE double maximum(double a, double b) {
    return (a != a || a > b) ? a : b;
  }
  static FC_HOST_DEVICE double clamp(double x, double lo, double hi) {
    return x != x ? x : (x < lo ? lo : (x > hi ? hi : x));
  }
  static FC_HOST_DEVICE double abs(double x) { return ::fabs(x); }
  static FC_HOST_DEVICE double copysign(double magnitude, double sign) {
    return ::copysign(magnitude, sign);
  }
  static FC_HOST_DEVICE double sign(double x) {
    return static_cast<double>((x > 0.0) - (x < 0.0));
  }
  static FC_HOST_DEVICE bool greater(double a, double b) { return a > b; }
  static FC_HOST_DEVICE bool lerp_small(double weight) { return ::fabs(weight) < 0.5; }
  static FC_HOST_DEVICE double select(bool mask, double a, double b) { return mask ? a : b; }
};

template <typename T>
FC_HOST_DEVICE T fc_sqrt(T x) { return MathTraits<T>::sqrt(x); }

template <typename T>
FC_HOST_DEVICE T fc_fma(T a, T b, T c) { return MathTraits<T>::fma(a, b, c); }

template <typename T>
FC_HOST_DEVICE T fc_maximum(T a, T b) { return MathTraits<T>::maximum(a, b); }

template <typename T>
FC_HOST_DEVICE T fc_clamp(T x, T lo, T hi) { return MathTraits<T>::clamp(x, lo, hi); }

template <typename T>
FC_HOST_DEVICE T fc_sign(T x) { return MathTraits<T>::sign(x); }

// start + weight * (end - start) with torch.lerp's rounding: from the nearer
// end, so that weight 1 gives `end` exactly (aten's lerp, which torch's fused
// Adam uses for exp_avg.lerp_(grad, 1 - beta1)).
template <typename T>
FC_HOST_DEVICE T fc_lerp(T start, T end, T weight) {
  using M = MathTraits<T>;
  const auto small = M::lerp_small(weight);
  const T diff = end - start;
  return M::fma(M::select(small, weight, weight - T(1)), diff, M::select(small, start, end));
}

}  // namespace fusedclip
