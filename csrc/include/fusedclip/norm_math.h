// The norm passes' arithmetic, written once for the CPU and CUDA kernels: how
// an element enters a partial result and how partial results combine, for the
// L2 norm (sums of squares, square-rooted at the end) and the inf norm
// (largest magnitude, NaN-propagating like torch.linalg.vector_norm).
#pragma once

#include "fusedclip/macros.h"
#include "fusedclip/math_traits.h"

namespace fusedclip {

// Adds element x to the partial result acc.
template <bool MAX_ABS, typename T>
FC_HOST_DEVICE T norm_accumulate(T acc, T x) {
  if constexpr (MAX_ABS) {
    return fc_maximum(acc, MathTraits<T>::abs(x));
  } else {
    return fc_fma(x, x, acc);
  }
}

// Combines two partial results: the larger (NaN wins) or their sum.
template <bool MAX_ABS, typename T>
FC_HOST_DEVICE T norm_combine(T a, T b) {
  if constexpr (MAX_ABS) {
    return fc_maximum(a, b);
  } else {
    return a + b;
  }
}

// The norm of a combined partial result.
template <bool MAX_ABS>
FC_HOST_DEVICE double norm_finish(double partial) {
  return MAX_ABS ? partial : ::sqrt(partial);
}

}  // namespace fusedclip
