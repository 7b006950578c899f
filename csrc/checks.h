// Argument checks shared by every backend of the fusedclip ops: each kernel calls
// these first, so a bad call fails with the same message on CPU and CUDA, and
// before anything has been written.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace fusedclip {

void check_norm_args(at::TensorList tensors, double norm_type);

void check_adam_args(at::TensorList params, at::TensorList grads,
                     at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                     at::TensorList max_exp_avg_sqs, at::TensorList steps,
                     double lr, const std::optional<at::Tensor>& lr_tensor,
                     double beta1, double beta2, double eps,
                     double weight_decay, bool amsgrad,
                     const std::optional<at::Tensor>& clip_coef,
                     const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf,
                     std::optional<double> clip_value,
                     const std::optional<at::TensorList>& unit_coefs);

// The arguments of the shared gradient transform (grad_transform.h) that every
// update op takes: clip_value >= 0; unit_coefs (if given) one float32/float64
// tensor per parameter, all of one dtype, with num_units(param) elements.
void check_grad_transform_args(at::TensorList params,
                               std::optional<double> clip_value,
                               const std::optional<at::TensorList>& unit_coefs);

// Units of a tensor for per-unit clipping: one per index of dim 0, or the
// whole tensor for 0-d and 1-d tensors; unit_length() elements each (the
// tensor's numel / units, 0 when there are no units).
int64_t num_units(const at::Tensor& t);
int64_t unit_length(const at::Tensor& t);

void check_sgd_args(at::TensorList params, at::TensorList grads,
                    at::TensorList momentum_buffers, at::TensorList buffer_steps,
                    double lr, const std::optional<at::Tensor>& lr_tensor,
                    double momentum, double dampening, double weight_decay,
                    bool nesterov, const std::optional<at::Tensor>& clip_coef,
                    const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf,
                    std::optional<double> clip_value,
                    const std::optional<at::TensorList>& unit_coefs);

void check_adagrad_args(at::TensorList params, at::TensorList grads,
                        at::TensorList state_sums, at::TensorList steps,
                        double lr, const std::optional<at::Tensor>& lr_tensor,
                        double lr_decay, double weight_decay, double eps,
                        const std::optional<at::Tensor>& clip_coef,
                        const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& found_inf,
                        std::optional<double> clip_value,
                        const std::optional<at::TensorList>& unit_coefs);

// Reads element `index` of a small float32/float64 tensor that lives on the CPU.
double read_cpu_scalar(const at::Tensor& t, int64_t index = 0);

}  // namespace fusedclip
