// The CPU side of the shared gradient transform (include/fusedclip/grad_transform.h):
// what every CPU update kernel needs for clip_value and unit_coefs.
//
//   TensorTransform tt = tensor_transform(grad_mult, clip_value, unit_coefs, i, params[i]);
//   for_each_unit_run(begin, end, tt,
//                     [&](int64_t b, int64_t e, const GradTransform<double>& t, auto clamp) {
//     ... the element loop over [b, e) with t (one multiplier for the whole run),
//     calling t.apply<decltype(clamp)::value>(g) on each gradient ...
//   });
//
// Per-unit coefficients need each unit to be a row-major run of the tensor's
// memory: pass row_major = unit_coefs.has_value() to FlatTensors::take.
#pragma once

#include <algorithm>
#include <optional>
#include <type_traits>

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

// The transform of one tensor: its per-tensor part and its unit coefficients.
struct TensorTransform {
  GradTransform<double> transform;  // mult: clip coefficient / grad_scale, signed
  UnitCoefs units;
  bool clamps = false;  // value clipping: the loops must call the clamp
};

// grad_mult: the per-tensor multiplier (clip_coef / grad_scale, negated for
// maximize); the arguments were checked by check_grad_transform_args.
inline TensorTransform tensor_transform(double grad_mult, std::optional<double> clip_value,
                                        const std::optional<at::TensorList>& unit_coefs,
                                        size_t i, const at::Tensor& param) {
  TensorTransform tt;
  tt.transform = grad_transform(grad_mult, clip_value.value_or(-1.0));
  tt.clamps = clip_value.has_value();
  if (unit_coefs.has_value()) {
    const at::Tensor& c = (*unit_coefs)[i];
    tt.units = {c.const_data_ptr(), c.dim() == 0 ? 0 : c.stride(0),
                c.scalar_type() == at::kDouble, unit_length(param)};
  }
  return tt;
}

// Calls run(b, e, transform, clamp) for the runs of [begin, end) (element
// offsets in the tensor's row-major memory) that share one multiplier: the
// whole range without unit coefficients, else the range split at unit
// boundaries, each run's multiplier folded once (in double) rather than per
// element. `clamp` is std::true_type with value clipping, else
// std::false_type: the element loop's variant, chosen once here.
template <typename Run>
void for_each_unit_run(int64_t begin, int64_t end, const TensorTransform& tt, const Run& run) {
  auto runs = [&](auto clamp) {
    if (tt.units.ptr == nullptr) {
      run(begin, end, tt.transform, clamp);
      return;
    }
    GradTransform<double> t = tt.transform;
    for (int64_t b = begin; b < end;) {
      const int64_t u = b / tt.units.unit_len;
      const int64_t e = std::min(end, (u + 1) * tt.units.unit_len);
      t.mult = unit_mult(tt.transform.mult, tt.units[u]);
      run(b, e, t, clamp);
      b = e;
    }
  };
  if (tt.clamps) {
    runs(std::true_type{});
  } else {
    runs(std::false_type{});
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace fusedclip::cpu
