// Element-wise helpers that the update rules call instead of std:: functions, so
// that one rule compiles for a scalar (float, double; CPU or CUDA) and for a SIMD
// vector (the CPU backend specialises MathTraits for at::vec::Vectorized).
#pragma once

#include <cmath>

#include "fusedclip/macros.h"

namespace fusedclip {

template <typename T>
struct MathTraits;  // specialised per scalar or vector type

template <>
struct MathTraits<float> {
  static FC_HOST_DEVICE float sqrt(float x) { return ::sqrtf(x); }
  // NaN-propagating maximum, like torch.maximum.
  static FC_HOST_DEVICE float maximum(float a, float b) {
    return (a != a || a > b) ? a : b;
  }
  // NaN-propagating clamp to [lo, hi], like torch.clamp.
  static FC_HOST_DEVICE float clamp(float x, float lo, float hi) {
    return x != x ? x : (x < lo ? lo : (x > hi ? hi : x));
  }
};

template <>
struct MathTraits<double> {
  static FC_HOST_DEVICE double sqrt(double x) { return ::sqrt(x); }
  static FC_HOST_DEVICE double maximum(double a, double b) {
    return (a != a || a > b) ? a : b;
  }
  static FC_HOST_DEVICE double clamp(double x, double lo, double hi) {
    return x != x ? x : (x < lo ? lo : (x > hi ? hi : x));
  }
};

template <typename T>
FC_HOST_DEVICE T fc_sqrt(T x) { return MathTraits<T>::sqrt(x); }

template <typename T>
FC_HOST_DEVICE T fc_maximum(T a, T b) { return MathTraits<T>::maximum(a, b); }

template <typename T>
FC_HOST_DEVICE T fc_clamp(T x, T lo, T hi) { return MathTraits<T>::clamp(x, lo, hi); }

}  // namespace fusedclip
