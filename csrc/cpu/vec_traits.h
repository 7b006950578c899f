// MathTraits for ATen's SIMD vectors, so the shared update rules in
// include/fusedclip/ run on whole vectors in the CPU kernels.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "fusedclip/math_traits.h"

namespace fusedclip {

template <typename S>
struct MathTraits<at::vec::Vectorized<S>> {
  using V = at::vec::Vectorized<S>;
  static V sqrt(const V& x) { return x.sqrt(); }
  // at::vec::fmadd, as torch's fused kernels call it: one rounding in the AVX2
  // and AVX-512 sets (an FMA instruction), two in the default set, whose
  // Vectorized is an array and whose fmadd is a * b + c (lanes.h,
  // kTorchScalarCodeFuses).
  static V fma(const V& a, const V& b, const V& c) { return at::vec::fmadd(a, b, c); }
  static V maximum(const V& a, const V& b) { return at::vec::maximum(a, b); }
  // at::vec::maximum/minimum propagate NaN, so the clamp does too.
  static V clamp(const V& x, const V& lo, const V& hi) {
    return at::vec::minimum(at::vec::maximum(x, lo), hi);
  }
  static V abs(const V& x) { return x.abs(); }
  static V copysign(const V& magnitude, const V& sign) { return magnitude.copysign(sign); }
  // torch.sign: -1, 0 or 1 per lane, 0 for NaN (comparisons with NaN are false).
  static V sign(const V& x) {
    const V zero(S(0)), one(S(1));
    return V::blendv(zero, one, x > zero) - V::blendv(zero, one, x < zero);
  }
  static V greater(const V& a, const V& b) { return a > b; }
  // A lane mask, as torch's fused Adam computes it for its lerp.
  static V lerp_small(const V& weight) { return weight.abs() < V(S(0.5)); }
  static V select(const V& mask, const V& a, const V& b) { return V::blendv(b, a, mask); }
};

}  // namespace fusedclip
