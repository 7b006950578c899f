// The per-call values every CPU update kernel reads on the host (they live in
// CPU memory, so reading them costs no device sync): the skip flag, a tensor
// learning rate, the gradient unscale, per-tensor clip coefficients, and the
// step counters.
#pragma once

#include <optional>

#include <ATen/ATen.h>

#include "capability.h"
#include "../update_op.h"
#include "fusedclip/grad_transform.h"

namespace fusedclip::cpu {
inline namespace CPU_CAPABILITY {  // capability.h

struct HostScalars {
  bool skip = false;       // found_inf non-zero: the call changes nothing
  double lr = 0.0;         // lr_tensor's value where given, else lr
  double inv_scale = 1.0;  // 1 / grad_scale
  const std::optional<at::Tensor>* clip_coef = nullptr;

  // Reads the values of one call. Where the step is skipped nothing else is
  // read (a skipped call may carry a bad lr_tensor: it is never used).
  static HostScalars read(double lr, const std::optional<at::Tensor>& lr_tensor,
                          const std::optional<at::Tensor>& clip_coef,
                          const std::optional<at::Tensor>& grad_scale,
                          const std::optional<at::Tensor>& found_inf) {
    HostScalars h;
    h.clip_coef = &clip_coef;
    h.skip = found_inf.has_value() && read_cpu_scalar(*found_inf) != 0.0;
    if (h.skip) return h;
    h.lr = lr;
    if (lr_tensor.has_value()) {
      h.lr = read_cpu_scalar(*lr_tensor);
      TORCH_CHECK(h.lr >= 0.0, "fusedclip: invalid learning rate ", h.lr,
                  " in lr_tensor (must be >= 0)");
    }
    if (grad_scale.has_value()) h.inv_scale = 1.0 / read_cpu_scalar(*grad_scale);
    return h;
  }

  // What tensor i's gradient is multiplied by: its clip coefficient, the
  // unscale, and -1 for maximize.
  double grad_mult(size_t i, bool maximize) const {
    const std::optional<at::Tensor>& coef = *clip_coef;
    const double c = coef.has_value()
        ? read_cpu_scalar(*coef, coef->numel() == 1 ? 0 : static_cast<int64_t>(i))
        : 1.0;
    return fusedclip::grad_mult(c, inv_scale, maximize);
  }
};

// Adds one to a step counter (float32 or float64, as torch.optim keeps it) and
// returns the new count, in the counter's own dtype as the CUDA kernels do.
inline double increment_step(const at::Tensor& step) {
  if (step.scalar_type() == at::kFloat) {
    return static_cast<double>(++*step.data_ptr<float>());
  }
  return ++*step.data_ptr<double>();
}

}  // namespace CPU_CAPABILITY
}  // namespace fusedclip::cpu
