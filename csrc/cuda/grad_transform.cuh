// The CUDA side of the shared gradient transform (include/fusedclip/grad_transform.h):
// what every CUDA update kernel needs for clip_value and unit_coefs.
//
// Host: UnitCoefLists::make(unit_coefs) keeps contiguous coefficients alive;
// each tensor's metadata gets two more lists, coef_ptr(i) (its coefficients,
// null without unit_coefs) and len_bits(param) (its unit length stored in a
// pointer's bits). Device: in the block, after folding the tensor's
// multiplier, ChunkTransform<opmath_t> gives the transform of each element of
// the chunk; the unit of element e is e / unit_len (rows of a row-major
// tensor), its multiplier folded in double as on the CPU.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include <ATen/ATen.h>

#include "../checks.h"
#include "fusedclip/grad_transform.h"

namespace fusedclip::cuda {

// The call-wide part, passed to the kernel by value.
struct TransformArgs {
  double clip_value = -1.0;  // < 0: none
  bool unit_coefs = false;
  bool unit_is_double = false;  // one dtype for the call (checked)
};

// Host side: the arguments of one call and the per-tensor list entries.
class UnitCoefLists {
 public:
  UnitCoefLists(std::optional<double> clip_value,
                const std::optional<at::TensorList>& unit_coefs) {
    args_.clip_value = clip_value.value_or(-1.0);
    args_.unit_coefs = unit_coefs.has_value();
    if (!args_.unit_coefs) return;
    args_.unit_is_double = !unit_coefs->empty() && (*unit_coefs)[0].scalar_type() == at::kDouble;
    // Contiguous coefficients (a copy on the stream where a view is strided).
    for (const at::Tensor& u : *unit_coefs) coefs_.push_back(u.contiguous());
  }

  const TransformArgs& args() const { return args_; }
  void* coef_ptr(size_t i) const {
    return args_.unit_coefs ? const_cast<void*>(coefs_[i].const_data_ptr()) : nullptr;
  }
  static void* len_bits(const at::Tensor& param) {
    return reinterpret_cast<void*>(static_cast<uintptr_t>(unit_length(param)));
  }

 private:
  TransformArgs args_;
  std::vector<at::Tensor> coefs_;
};

// Device side: the transform of every element of one chunk.
template <typename opmath_t>
struct ChunkTransform {
  GradTransform<double> tensor;       // the tensor's own multiplier and bounds
  GradTransform<opmath_t> uniform;    // the same in the math type
  const void* coefs;                  // null: every element uses `uniform`
  int64_t unit_len;
  int64_t chunk_begin;                // element offset of the chunk in its tensor
  bool is_double;

  __device__ __forceinline__ ChunkTransform(const TransformArgs& args,
                                            const GradTransform<double>& t,
                                            const void* coef_ptr, const void* len_bits,
                                            int64_t begin)
      : tensor(t), uniform(t.template as<opmath_t>()),
        coefs(args.unit_coefs ? coef_ptr : nullptr),
        unit_len(static_cast<int64_t>(reinterpret_cast<uintptr_t>(len_bits))),
        chunk_begin(begin), is_double(args.unit_is_double) {}

  // Element i of the chunk.
  __device__ __forceinline__ opmath_t operator()(opmath_t grad, int i) const {
    if (coefs == nullptr) return uniform(grad);  // uniform over the block
    const int64_t u = (chunk_begin + i) / unit_len;
    const double coef = is_double ? static_cast<const double*>(coefs)[u]
                                  : static_cast<double>(static_cast<const float*>(coefs)[u]);
    GradTransform<double> t = tensor;
    t.mult = tensor.mult * coef;
    return t.template as<opmath_t>()(grad);
  }
};

}  // namespace fusedclip::cuda
