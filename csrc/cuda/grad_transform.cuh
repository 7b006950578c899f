// The CUDA side of the gradient's multiplier (include/fusedclip/grad_transform.h):
// in the block, after folding the tensor's multiplier, ChunkMult<opmath_t>
// multiplies each gradient element of the chunk by its multiplier; the unit
// of element e is e / unit_len (rows of a row-major tensor), its multiplier
// folded in double (unit_mult) as on the CPU. The element-wise transforms
// come after it (ActiveTransforms, in the update functor).
#pragma once

#include <cstdint>

#include "fusedclip/grad_transform.h"

namespace fusedclip::cuda {

// A tensor's per-unit coefficients (contiguous; null: none) and unit length.
struct UnitCoefSlot {
  const void* coefs = nullptr;
  int64_t unit_len = 0;
};

// Device side: the multiplier of every element of one chunk.
template <typename opmath_t>
struct ChunkMult {
  double tensor;         // the tensor's own multiplier
  opmath_t uniform;      // the same in the math type
  UnitCoefSlot units;    // coefs null: every element uses `uniform`
  int64_t chunk_begin;   // element offset of the chunk in its tensor
  bool is_double;        // the unit coefficients' dtype (one for the call)

  __device__ __forceinline__ ChunkMult(double tensor_mult, const UnitCoefSlot& slot,
                                       int64_t begin, bool unit_is_double)
      : tensor(tensor_mult), uniform(static_cast<opmath_t>(tensor_mult)), units(slot),
        chunk_begin(begin), is_double(unit_is_double) {}

  // Element i of the chunk, multiplied.
  __device__ __forceinline__ opmath_t operator()(opmath_t grad, int i) const {
    if (units.coefs == nullptr) return grad * uniform;  // uniform over the block
    const int64_t u = (chunk_begin + i) / units.unit_len;
    const double coef = is_double ? static_cast<const double*>(units.coefs)[u]
                                  : static_cast<double>(static_cast<const float*>(units.coefs)[u]);
    return grad * static_cast<opmath_t>(unit_mult(tensor, coef));
  }
};

}  // namespace fusedclip::cuda
