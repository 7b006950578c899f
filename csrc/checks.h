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
                     const std::optional<at::Tensor>& found_inf);

void check_sgd_args(at::TensorList params, at::TensorList grads,
                    at::TensorList momentum_buffers, at::TensorList buffer_steps,
                    double lr, const std::optional<at::Tensor>& lr_tensor,
                    double momentum, double dampening, double weight_decay,
                    bool nesterov, const std::optional<at::Tensor>& clip_coef,
                    const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf);

void check_adagrad_args(at::TensorList params, at::TensorList grads,
                        at::TensorList state_sums, at::TensorList steps,
                        double lr, const std::optional<at::Tensor>& lr_tensor,
                        double lr_decay, double weight_decay, double eps,
                        const std::optional<at::Tensor>& clip_coef,
                        const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& found_inf);

// Reads element `index` of a small float32/float64 tensor that lives on the CPU.
double read_cpu_scalar(const at::Tensor& t, int64_t index = 0);

}  // namespace fusedclip
