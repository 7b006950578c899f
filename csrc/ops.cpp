// The fusedclip operator library: every op schema, written once, and the
// argument checks that all backends share. Kernels register themselves per
// dispatch key in cpu/ and cuda/; fake (meta) kernels live in fusedclip/ops.py.
#include <Python.h>

#include <cmath>
#include <string>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/cpu_tuning.h"

// `import fusedclip._C` loads this library, which runs the registrations below.
// The module has no Python functions: everything is reached through torch.ops.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "fusedclip operator library", -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(fusedclip, m) {
  // One read of every tensor: per-tensor norms, the global norm and a flag
  // (1.0) when the global norm is not finite. norm_type is 2 or inf.
  m.def(
      "multi_tensor_norm(Tensor[] tensors, float norm_type) -> "
      "(Tensor tensor_norms, Tensor total_norm, Tensor nonfinite)");
  // The same single read, plus the norm of every unit: a unit is one index of
  // dim 0 (a row of a contiguous tensor: the norm over all other dims), and
  // the whole tensor for 0-d and 1-d tensors. unit_norms holds the units of
  // all tensors, tensor by tensor (size(0) each, or 1 for ndim <= 1).
  m.def(
      "multi_tensor_unit_norm(Tensor[] tensors, float norm_type) -> "
      "(Tensor unit_norms, Tensor tensor_norms, Tensor total_norm, "
      "Tensor nonfinite)");
  // Adam / AdamW over many tensors in place. The gradient used is
  // clamp(grad * clip_coef * unit_coef / grad_scale, -clip_value, clip_value)
  // (include/fusedclip/grad_transform.h); nothing at all changes (steps
  // included) where found_inf is non-zero. clip_coef has one element or one
  // per tensor; unit_coefs one 1-D tensor per tensor with one coefficient per
  // unit (per index of dim 0; one element for ndim <= 1); clip_value >= 0.
  m.def(
      "adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, "
      "Tensor(e!)[] steps, *, float lr, Tensor? lr_tensor, float beta1, "
      "float beta2, float eps, float weight_decay, bool amsgrad, "
      "bool maximize, bool decoupled_weight_decay, Tensor? clip_coef, "
      "Tensor? grad_scale, Tensor? found_inf, float? clip_value=None, "
      "Tensor[]? unit_coefs=None) -> ()");
  // SGD over many tensors in place, with torch.optim.SGD's options. Without
  // momentum, momentum_buffers and buffer_steps are empty lists. buffer_steps
  // holds one 0-d counter per buffer, kept by the caller beside the buffer:
  // the steps that buffer has taken. Where it is 0 this step is the buffer's
  // first, which copies the gradient into it (torch's `buf is None`); it is
  // incremented like Adam's step counters, so a skipped first step leaves
  // the next one a first step. Gradient (clip_coef, grad_scale, clip_value,
  // unit_coefs: the shared transform), found_inf, lr_tensor as for adam_.
  m.def(
      "sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "Tensor(c!)[] buffer_steps, *, float lr, Tensor? lr_tensor, float momentum, "
      "float dampening, float weight_decay, bool nesterov, bool maximize, "
      "Tensor? clip_coef, Tensor? grad_scale, Tensor? found_inf, "
      "float? clip_value=None, Tensor[]? unit_coefs=None) -> ()");
  // Adagrad over many tensors in place, with torch.optim.Adagrad's options.
  // Each steps[i] is incremented before the decayed learning rate
  // lr / (1 + (step - 1) * lr_decay) is computed. Gradient (clip_coef,
  // grad_scale, clip_value, unit_coefs: the shared transform), found_inf and
  // lr_tensor as for adam_.
  m.def(
      "adagrad_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state_sums, "
      "Tensor(c!)[] steps, *, float lr, Tensor? lr_tensor, float lr_decay, "
      "float weight_decay, float eps, bool maximize, Tensor? clip_coef, "
      "Tensor? grad_scale, Tensor? found_inf, float? clip_value=None, "
      "Tensor[]? unit_coefs=None) -> ()");
  // How the CPU kernels run on this machine (cpu/cpu_tuning.h): the SIMD set
  // they were built for and the software-prefetch distance of their loops in
  // bytes (0: none), after setting it where prefetch_distance is given. It
  // takes no tensor, so it is one kernel for every backend.
  m.def("cpu_tuning(int? prefetch_distance=None) -> (str vector_arch, int prefetch_distance)",
        &fusedclip::cpu::cpu_tuning);
}

namespace fusedclip {
namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf ||
         t == at::kBFloat16;
}

// Every tensor of a list: dense (not sparse), real, a supported float dtype,
// on `device` and of dtype `dtype`.
void check_tensor_list(at::TensorList list, const char* name,
                       const at::Device& device, at::ScalarType dtype) {
  for (size_t i = 0; i < list.size(); ++i) {
    const at::Tensor& t = list[i];
    TORCH_CHECK(t.defined(), "fusedclip: ", name, "[", i, "] is undefined");
    TORCH_CHECK(t.layout() == at::kStrided, "fusedclip: ", name, "[", i,
                "] is sparse (layout ", t.layout(),
                "); only dense (strided) tensors are supported");
    TORCH_CHECK(!t.is_complex(), "fusedclip: ", name, "[", i,
                "] is complex; complex parameters are not supported "
                "(view them as real with torch.view_as_real)");
    TORCH_CHECK(is_supported_float(t.scalar_type()), "fusedclip: ", name, "[",
                i, "] has dtype ", t.scalar_type(),
                "; supported are float32, float64, float16 and bfloat16");
    TORCH_CHECK(t.device() == device, "fusedclip: all tensors of one call must "
                "be on one device, but ", name, "[", i, "] is on ", t.device(),
                " and the first parameter on ", device);
    TORCH_CHECK(t.scalar_type() == dtype, "fusedclip: all tensors of one call "
                "must have one dtype, but ", name, "[", i, "] is ",
                t.scalar_type(), " and the first parameter ", dtype);
  }
}

void check_same_shapes(at::TensorList params, at::TensorList other,
                       const char* name) {
  TORCH_CHECK(other.size() == params.size(), "fusedclip: ", name, " has ",
              other.size(), " tensors but params has ", params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(other[i].sizes() == params[i].sizes(), "fusedclip: ", name,
                "[", i, "] has shape ", other[i].sizes(),
                " but params[", i, "] has shape ", params[i].sizes());
  }
}

// A list that goes with the parameters (gradients, optimizer state): the
// parameters' device and dtype, and one tensor of the same shape per parameter.
void check_like_params(at::TensorList params, at::TensorList list, const char* name) {
  check_tensor_list(list, name, params[0].device(), params[0].scalar_type());
  check_same_shapes(params, list, name);
}

void check_small_tensor(const std::optional<at::Tensor>& t, const char* name,
                        const at::Device& device, int64_t allowed_numel = 1) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->layout() == at::kStrided && !t->is_complex() &&
                  (t->scalar_type() == at::kFloat ||
                   t->scalar_type() == at::kDouble),
              "fusedclip: ", name, " must be a dense float32 or float64 "
              "tensor, got ", t->scalar_type(), " ", t->layout());
  TORCH_CHECK(t->dim() <= 1, "fusedclip: ", name, " must be 0-d or 1-d, got "
              "shape ", t->sizes());
  TORCH_CHECK(t->numel() == 1 || t->numel() == allowed_numel, "fusedclip: ",
              name, " must have 1", (allowed_numel != 1 ? " or one per tensor (" : ""),
              (allowed_numel != 1 ? std::to_string(allowed_numel) + ")" : std::string()),
              " elements, got ", t->numel());
  TORCH_CHECK(t->device() == device, "fusedclip: ", name, " is on ",
              t->device(), " but the parameters are on ", device);
}

// Per-tensor counters (step, buffer_steps): one small tensor per parameter.
void check_counters(at::TensorList counters, const char* name,
                    at::TensorList params, const at::Device& device) {
  TORCH_CHECK(counters.size() == params.size(), "fusedclip: ", name, " has ",
              counters.size(), " tensors but params has ", params.size());
  const std::string element = std::string(name) + "[i]";
  for (size_t i = 0; i < counters.size(); ++i) {
    check_small_tensor(counters[i], element.c_str(), device);
  }
}

// The optional per-call tensors every update op takes.
void check_call_tensors(const std::optional<at::Tensor>& lr_tensor,
                        const std::optional<at::Tensor>& clip_coef,
                        const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& found_inf,
                        size_t n_params, const at::Device& device) {
  check_small_tensor(lr_tensor, "lr_tensor", device);
  check_small_tensor(clip_coef, "clip_coef", device,
                     static_cast<int64_t>(n_params));
  check_small_tensor(grad_scale, "grad_scale", device);
  check_small_tensor(found_inf, "found_inf", device);
}

}  // namespace

int64_t num_units(const at::Tensor& t) {
  return t.dim() <= 1 ? 1 : t.size(0);
}

int64_t unit_length(const at::Tensor& t) {
  const int64_t units = num_units(t);
  return units == 0 ? 0 : t.numel() / units;
}

void check_grad_transform_args(at::TensorList params,
                               std::optional<double> clip_value,
                               const std::optional<at::TensorList>& unit_coefs) {
  if (clip_value.has_value()) {
    TORCH_CHECK(*clip_value >= 0.0, "fusedclip: clip_value must be >= 0, got ",
                *clip_value);
  }
  if (!unit_coefs.has_value()) return;
  const at::TensorList coefs = *unit_coefs;
  TORCH_CHECK(coefs.size() == params.size(), "fusedclip: unit_coefs has ",
              coefs.size(), " tensors but params has ", params.size());
  for (size_t i = 0; i < coefs.size(); ++i) {
    const at::Tensor& c = coefs[i];
    TORCH_CHECK(c.layout() == at::kStrided && !c.is_complex() &&
                    (c.scalar_type() == at::kFloat || c.scalar_type() == at::kDouble),
                "fusedclip: unit_coefs[", i, "] must be a dense float32 or float64 "
                "tensor, got ", c.scalar_type(), " ", c.layout());
    TORCH_CHECK(c.scalar_type() == coefs[0].scalar_type(), "fusedclip: all "
                "unit_coefs must have one dtype, but unit_coefs[", i, "] is ",
                c.scalar_type(), " and unit_coefs[0] ", coefs[0].scalar_type());
    TORCH_CHECK(c.dim() <= 1, "fusedclip: unit_coefs[", i, "] must be 0-d or "
                "1-d, got shape ", c.sizes());
    TORCH_CHECK(c.numel() == num_units(params[i]), "fusedclip: unit_coefs[", i,
                "] must have one element per index of dim 0 of params[", i,
                "] (", num_units(params[i]), "; 1 for 0-d and 1-d), got ",
                c.numel());
    TORCH_CHECK(c.device() == params[i].device(), "fusedclip: unit_coefs[", i,
                "] is on ", c.device(), " but the parameters are on ",
                params[i].device());
  }
}

void check_norm_args(at::TensorList tensors, double norm_type) {
  TORCH_CHECK(norm_type == 2.0 || (std::isinf(norm_type) && norm_type > 0),
              "fusedclip: norm_type must be 2.0 or inf, got ", norm_type);
  if (tensors.empty()) return;
  check_tensor_list(tensors, "tensors", tensors[0].device(),
                    tensors[0].scalar_type());
}

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
                     const std::optional<at::TensorList>& unit_coefs) {
  TORCH_CHECK(lr >= 0.0, "fusedclip: invalid learning rate ", lr,
              " (must be >= 0)");
  TORCH_CHECK(eps >= 0.0, "fusedclip: invalid eps ", eps, " (must be >= 0)");
  TORCH_CHECK(beta1 >= 0.0 && beta1 < 1.0, "fusedclip: invalid beta1 ", beta1,
              " (must be in [0, 1))");
  TORCH_CHECK(beta2 >= 0.0 && beta2 < 1.0, "fusedclip: invalid beta2 ", beta2,
              " (must be in [0, 1))");
  TORCH_CHECK(weight_decay >= 0.0, "fusedclip: invalid weight_decay ",
              weight_decay, " (must be >= 0)");
  if (params.empty()) return;
  const at::Device device = params[0].device();
  const at::ScalarType dtype = params[0].scalar_type();
  check_tensor_list(params, "params", device, dtype);
  check_like_params(params, grads, "grads");
  check_like_params(params, exp_avgs, "exp_avgs");
  check_like_params(params, exp_avg_sqs, "exp_avg_sqs");
  if (amsgrad) check_like_params(params, max_exp_avg_sqs, "max_exp_avg_sqs");
  check_counters(steps, "steps", params, device);
  check_call_tensors(lr_tensor, clip_coef, grad_scale, found_inf, params.size(),
                     device);
  check_grad_transform_args(params, clip_value, unit_coefs);
}

void check_sgd_args(at::TensorList params, at::TensorList grads,
                    at::TensorList momentum_buffers, at::TensorList buffer_steps,
                    double lr, const std::optional<at::Tensor>& lr_tensor,
                    double momentum, double dampening, double weight_decay,
                    bool nesterov, const std::optional<at::Tensor>& clip_coef,
                    const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf,
                    std::optional<double> clip_value,
                    const std::optional<at::TensorList>& unit_coefs) {
  TORCH_CHECK(lr >= 0.0, "fusedclip: invalid learning rate ", lr,
              " (must be >= 0)");
  TORCH_CHECK(momentum >= 0.0, "fusedclip: invalid momentum ", momentum,
              " (must be >= 0)");
  TORCH_CHECK(std::isfinite(dampening), "fusedclip: invalid dampening ",
              dampening, " (must be finite)");
  TORCH_CHECK(weight_decay >= 0.0, "fusedclip: invalid weight_decay ",
              weight_decay, " (must be >= 0)");
  TORCH_CHECK(!nesterov || (momentum > 0.0 && dampening == 0.0),
              "fusedclip: nesterov momentum requires momentum > 0 and zero "
              "dampening, got momentum ", momentum, " and dampening ", dampening);
  if (momentum == 0.0) {
    TORCH_CHECK(momentum_buffers.empty() && buffer_steps.empty(),
                "fusedclip: without momentum, momentum_buffers and buffer_steps "
                "must be empty, got ", momentum_buffers.size(), " and ",
                buffer_steps.size(), " tensors");
  }
  if (params.empty()) return;
  const at::Device device = params[0].device();
  const at::ScalarType dtype = params[0].scalar_type();
  check_tensor_list(params, "params", device, dtype);
  check_like_params(params, grads, "grads");
  if (momentum != 0.0) {
    check_like_params(params, momentum_buffers, "momentum_buffers");
    check_counters(buffer_steps, "buffer_steps", params, device);
  }
  check_call_tensors(lr_tensor, clip_coef, grad_scale, found_inf, params.size(),
                     device);
  check_grad_transform_args(params, clip_value, unit_coefs);
}

void check_adagrad_args(at::TensorList params, at::TensorList grads,
                        at::TensorList state_sums, at::TensorList steps,
                        double lr, const std::optional<at::Tensor>& lr_tensor,
                        double lr_decay, double weight_decay, double eps,
                        const std::optional<at::Tensor>& clip_coef,
                        const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& found_inf,
                        std::optional<double> clip_value,
                        const std::optional<at::TensorList>& unit_coefs) {
  TORCH_CHECK(lr >= 0.0, "fusedclip: invalid learning rate ", lr,
              " (must be >= 0)");
  TORCH_CHECK(lr_decay >= 0.0, "fusedclip: invalid lr_decay ", lr_decay,
              " (must be >= 0)");
  TORCH_CHECK(weight_decay >= 0.0, "fusedclip: invalid weight_decay ",
              weight_decay, " (must be >= 0)");
  TORCH_CHECK(eps >= 0.0, "fusedclip: invalid eps ", eps, " (must be >= 0)");
  if (params.empty()) return;
  const at::Device device = params[0].device();
  const at::ScalarType dtype = params[0].scalar_type();
  check_tensor_list(params, "params", device, dtype);
  check_like_params(params, grads, "grads");
  check_like_params(params, state_sums, "state_sums");
  check_counters(steps, "steps", params, device);
  check_call_tensors(lr_tensor, clip_coef, grad_scale, found_inf, params.size(),
                     device);
  check_grad_transform_args(params, clip_value, unit_coefs);
}

double read_cpu_scalar(const at::Tensor& t, int64_t index) {
  TORCH_INTERNAL_ASSERT(t.device().is_cpu());
  const int64_t stride = t.dim() == 0 ? 0 : t.stride(0);
  if (t.scalar_type() == at::kFloat) {
    return static_cast<double>(t.const_data_ptr<float>()[index * stride]);
  }
  return t.const_data_ptr<double>()[index * stride];
}

}  // namespace fusedclip
