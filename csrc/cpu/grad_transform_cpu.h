// The CPU side of the gradient's multiplier (include/fusedclip/grad_transform.h):
// what every CPU update kernel needs for clip_coef, grad_scale, maximize and
// unit_coefs.
//
//   TensorMult tm = tensor_mult(grad_mult, unit_coefs, i, params[i]);
//   for_each_unit_run(begin, end, tm, [&](int64_t b, int64_t e, double mult) {
//     ... the element loop over [b, e), every gradient multiplied by mult
//     (one multiplier for the whole run) before the element-wise transforms ...
//   });
//
// Per-unit coefficients need each unit to be a row-major run of the tensor's
// memory: pass row_major = unit_coefs.has_value() to FlatTensors::take.
#pragma once

#include <algorithm>
#include <optional>

#include <ATen/ATen.h>

#include "capability.h"
#include "../update_op.h"
#include "fusedclip/grad_transform.h"

namespace fusedclip::cpu {
inline namespace CPU_CAPABILITY {  // capability.h

// Per-unit coefficients of one tensor (a float32 or float64 tensor with one
// value per unit), or none (ptr null).
struct UnitCoefs {
  const void* ptr = nullptr;
  int64_t stride = 0;
  bool is_double = false;
  int64_t unit_len = 0;  // elements per unit

  double operator[](int64_t u) const {
    return is_double ? static_cast<const double*>(ptr)[u * stride]
                     : static_cast<double>(static_cast<const float*>(ptr)[u * stride]);
  }
};

// The multiplier of one tensor: its per-tensor part and its unit coefficients.
struct TensorMult {
  double mult;  // clip coefficient / grad_scale, signed
  UnitCoefs units;
};

// grad_mult: the per-tensor multiplier (clip_coef / grad_scale, negated for
// maximize); unit_coefs were checked by check_grad_transform_args.
inline TensorMult tensor_mult(double grad_mult, const std::optional<at::TensorList>& unit_coefs,
                              size_t i, const at::Tensor& param) {
  TensorMult tm{grad_mult, {}};
  if (unit_coefs.has_value()) {
    const at::Tensor& c = (*unit_coefs)[i];
    tm.units = {c.const_data_ptr(), c.dim() == 0 ? 0 : c.stride(0),
                c.scalar_type() == at::kDouble, unit_length(param)};
  }
  return tm;
}

// Calls run(b, e, mult) for the runs of [begin, end) (element offsets in the
// tensor's row-major memory) that share one multiplier: the whole range
// without unit coefficients, else the range split at unit boundaries, each
// run's multiplier folded once (in double) rather than per element.
template <typename Run>
void for_each_unit_run(int64_t begin, int64_t end, const TensorMult& tm, const Run& run) {
  if (tm.units.ptr == nullptr) {
    run(begin, end, tm.mult);
    return;
  }
  for (int64_t b = begin; b < end;) {
    const int64_t u = b / tm.units.unit_len;
    const int64_t e = std::min(end, (u + 1) * tm.units.unit_len);
    run(b, e, unit_mult(tm.mult, tm.units[u]));
    b = e;
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace fusedclip::cpu
