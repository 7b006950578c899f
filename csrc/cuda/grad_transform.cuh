// The CUDA side of the shared gradient transform (include/fusedclip/grad_transform.h):
// in the block, after folding the tensor's multiplier, ChunkTransform<opmath_t>
// gives the transform of each element of the chunk; the unit of element e is
// e / unit_len (rows of a row-major tensor), its multiplier folded in double
// (unit_mult) as on the CPU.
#pragma once

#include <cstdint>

#include "fusedclip/grad_transform.h"

namespace fusedclip::cuda {

// The call-wide part, passed to the kernel by value.
struct TransformArgs {
  double clip_value = -1.0;  // < 0: none
  bool unit_is_double = false;  // one dtype for the call (checked)
};

// A tensor's per-unit coefficients (contiguous; null: none) and unit length.
struct UnitCoefSlot {
  const void* coefs = nullptr;
  int64_t unit_len = 0;
};

// Device side: the transform of every element of one chunk.
template <typename opmath_t>
struct ChunkTransform {
  GradTransform<double> tensor;       // the tensor's own multiplier and bounds
  GradTransform<opmath_t> uniform;    // the same in the math type
  UnitCoefSlot units;                 // coefs null: every element uses `uniform`
  int64_t chunk_begin;                // element offset of the chunk in its tensor
  bool is_double;

  __device__ __forceinline__ ChunkTransform(const TransformArgs& args,
                                            const GradTransform<double>& t,
                                            const UnitCoefSlot& slot, int64_t begin)
      : tensor(t), uniform(t.template as<opmath_t>()), units(slot), chunk_begin(begin),
        is_double(args.unit_is_double) {}

  // Element i of the chunk.
  __device__ __forceinline__ opmath_t operator()(opmath_t grad, int i) const {
    if (units.coefs == nullptr) return uniform(grad);  // uniform over the block
    const int64_t u = (chunk_begin + i) / units.unit_len;
    const double coef = is_double ? static_cast<const double*>(units.coefs)[u]
                                  : static_cast<double>(static_cast<const float*>(units.coefs)[u]);
    GradTransform<double> t = tensor;
    t.mult = unit_mult(tensor.mult, coef);
    return t.template as<opmath_t>()(grad);
  }
};

}  // namespace fusedclip::cuda
