// The fusedclip operator library: every op schema, written once, and the
// argument checks that all backends share. Kernels register themselves per
// dispatch key in cpu/ and cuda/; fake (meta) kernels live in fusedclip/ops.py.
#include <Python.h>

#include <cmath>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/cpu_tuning.h"
#include "fusedclip/rules.h"
#include "update_op.h"

// `import fusedclip._C` loads this library, which runs the registrations below.
// The module has no Python functions: everything is reached through torch.ops.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "fusedclip operator library", -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace fusedclip {
namespace {

// The names of the rules (their ops are fusedclip::<name>_).
std::vector<std::string> update_rules() {
  std::vector<std::string> names;
#define FUSEDCLIP_RULE_NAME(Rule) names.emplace_back(Rule::kName);
  FUSEDCLIP_FOR_EACH_RULE(FUSEDCLIP_RULE_NAME)
#undef FUSEDCLIP_RULE_NAME
  return names;
}

// The hyperparameter names of a rule's `hyper` list, in order.
std::vector<std::string> rule_hyperparameters(const std::string& rule) {
#define FUSEDCLIP_HYPER_NAMES(Rule)                                  \
  if (rule == Rule::kName) {                                         \
    std::vector<std::string> names;                                  \
    std::string list = Rule::kHyperNames;                            \
    for (size_t start = 0; start <= list.size();) {                  \
      size_t end = list.find(',', start);                            \
      if (end == std::string::npos) end = list.size();               \
      names.push_back(list.substr(start, end - start));              \
      start = end + 1;                                               \
    }                                                                \
    return names;                                                    \
  }
  FUSEDCLIP_FOR_EACH_RULE(FUSEDCLIP_HYPER_NAMES)
#undef FUSEDCLIP_HYPER_NAMES
  TORCH_CHECK(false, "fusedclip: no update rule named '", rule, "'");
}

// Whether every tensor is a dense (strided) tensor of `dtype` on `device`:
// the per-step check of a kept layout's gradients (fusedclip/optim/layout.py),
// one call where reading the three attributes of each in Python costs about
// 0.5 us a gradient. Reads metadata only: no device sync.
bool tensors_like(at::TensorList tensors, at::ScalarType dtype, at::Device device) {
  for (const at::Tensor& t : tensors) {
    if (!t.defined() || t.layout() != at::kStrided || t.scalar_type() != dtype ||
        t.device() != device) {
      return false;
    }
  }
  return true;
}

}  // namespace
}  // namespace fusedclip

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
  // One update op per rule (include/fusedclip/rules.h), over many tensors in
  // place: fusedclip::adam_, sgd_, ... (update_op.h states the schema). The
  // gradient used is grad * clip_coef * unit_coef / grad_scale, negated for
  // maximize, then passed through the element-wise transforms whose argument
  // is given (`float? <kArg>` each: include/fusedclip/grad_transform.h lists
  // them, in order, with what a valid argument is); nothing at all changes
  // (steps included) where found_inf is non-zero. clip_coef has one element or one
  // per tensor; unit_coefs one 1-D tensor per tensor with one coefficient per
  // unit. Each step counter is incremented before the rule's per-tensor
  // numbers are folded with it. `hyper`: the rule's hyperparameters in the
  // order fusedclip::rule_hyperparameters gives.
#define FUSEDCLIP_DEFINE_UPDATE(Rule) m.def(fusedclip::update_schema(Rule::kName).c_str());
  FUSEDCLIP_FOR_EACH_RULE(FUSEDCLIP_DEFINE_UPDATE)
#undef FUSEDCLIP_DEFINE_UPDATE
  // The rules, and the names of a rule's `hyper` values; they take no
  // tensor, so each is one kernel for every backend.
  m.def("update_rules() -> str[]", &fusedclip::update_rules);
  m.def("rule_hyperparameters(str rule) -> str[]", &fusedclip::rule_hyperparameters);
  // How the CPU kernels run on this machine (cpu/cpu_tuning.h): the SIMD set
  // they were built for and the software-prefetch distance of their loops in
  // bytes (0: none), after setting it where prefetch_distance is given.
  m.def("cpu_tuning(int? prefetch_distance=None) -> (str vector_arch, int prefetch_distance)",
        &fusedclip::cpu::cpu_tuning);
  // Whether every tensor is a dense tensor of this dtype on this device
  // (metadata only: one kernel for every backend).
  m.def("tensors_like(Tensor[] tensors, ScalarType dtype, Device device) -> bool",
        &fusedclip::tensors_like);
}

namespace fusedclip {
namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf ||
         t == at::kBFloat16;
}

// Every tensor of a list: dense (not sparse), real, a supported float dtype,
// on `device` and of dtype `dtype` (that of the first parameter, or of the
// tensor `dtype_of` names).
void check_tensor_list(at::TensorList list, const char* name,
                       const at::Device& device, at::ScalarType dtype,
                       const char* dtype_of = nullptr) {
  for (size_t i = 0; i < list.size(); ++i) {
    const at::Tensor& t = list[i];
    TORCH_CHECK(t.defined(), "fusedclip: ", name, "[", i, "] is undefined");
    TORCH_CHECK(t.layout() == at::kStrided, "fusedclip: ", name, "[", i,
                "] is sparse (layout ", t.layout(),
                "); only dense (strided) tensors are supported");
    TORCH_CHECK(!t.is_complex(), "fusedclip: ", name, "[", i,
                "] is complex; the ops take real tensors "
                "(pass complex ones as torch.view_as_real views)");
    TORCH_CHECK(is_supported_float(t.scalar_type()), "fusedclip: ", name, "[",
                i, "] has dtype ", t.scalar_type(),
                "; supported are float32, float64, float16 and bfloat16");
    TORCH_CHECK(t.device() == device, "fusedclip: all tensors of one call must "
                "be on one device, but ", name, "[", i, "] is on ", t.device(),
                " and the first parameter on ", device);
    TORCH_CHECK(t.scalar_type() == dtype, "fusedclip: all tensors of one ",
                (dtype_of == nullptr ? "call" : "list"), " must have one dtype, but ", name,
                "[", i, "] is ", t.scalar_type(), " and ",
                (dtype_of == nullptr ? "the first parameter" : dtype_of), " ", dtype);
  }
}

// One tensor per parameter, each of its parameter's shape.
void check_shapes_like_params(at::TensorList params, at::TensorList list, const char* name) {
  TORCH_CHECK(list.size() == params.size(), "fusedclip: ", name, " has ",
              list.size(), " tensors but params has ", params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(list[i].sizes() == params[i].sizes(), "fusedclip: ", name,
                "[", i, "] has shape ", list[i].sizes(),
                " but params[", i, "] has shape ", params[i].sizes());
  }
}

// A list that goes with the parameters (gradients, optimizer state): the
// parameters' device and dtype, and one tensor of the same shape per parameter.
void check_like_params(at::TensorList params, at::TensorList list, const char* name) {
  check_tensor_list(list, name, params[0].device(), params[0].scalar_type());
  check_shapes_like_params(params, list, name);
}

bool is_mixable(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// A state list: like the parameters, except that its dtype (one for the whole
// list) may differ from theirs where both are float32, bfloat16 or float16:
// the math of such a call is float32 (include/fusedclip/precision.h).
void check_state_list(at::TensorList params, at::TensorList list, const char* name) {
  const at::ScalarType param_dtype = params[0].scalar_type();
  if (list.empty() || list[0].scalar_type() == param_dtype || !list[0].defined() ||
      !is_supported_float(list[0].scalar_type())) {
    check_like_params(params, list, name);
    return;
  }
  const at::ScalarType dtype = list[0].scalar_type();
  TORCH_CHECK(is_mixable(dtype) && is_mixable(param_dtype), "fusedclip: ", name,
              "[0] is ", dtype, " and the parameters ", param_dtype, ": a state of another "
              "dtype than the parameters must be float32, bfloat16 or float16, with float32, "
              "bfloat16 or float16 parameters (float64 does not mix: the mixed math is float32)");
  const std::string first = std::string(name) + "[0]";
  check_tensor_list(list, name, params[0].device(), dtype, first.c_str());
  check_shapes_like_params(params, list, name);
}

// masters: one per parameter, its shape, on its device, dense; float32 (a full
// fp32 master of bf16/fp16 parameters) or int16 (the low 16 bits of the fp32
// master of bf16 parameters), one dtype for the list.
void check_masters(at::TensorList params, at::TensorList masters) {
  const at::ScalarType param_dtype = params[0].scalar_type();
  TORCH_CHECK(masters.size() == params.size(), "fusedclip: masters has ", masters.size(),
              " tensors but params has ", params.size());
  for (size_t i = 0; i < masters.size(); ++i) {
    const at::Tensor& m = masters[i];
    TORCH_CHECK(m.defined(), "fusedclip: masters[", i, "] is undefined");
    TORCH_CHECK(m.layout() == at::kStrided, "fusedclip: masters[", i, "] is sparse (layout ",
                m.layout(), "); only dense (strided) tensors are supported");
    TORCH_CHECK(m.scalar_type() == at::kFloat || m.scalar_type() == at::kShort,
                "fusedclip: masters[", i, "] has dtype ", m.scalar_type(), "; masters must be "
                "float32 (fp32 master weights) or int16 (their low 16 bits, remainders of "
                "bfloat16 parameters)");
    TORCH_CHECK(m.scalar_type() == masters[0].scalar_type(), "fusedclip: all masters must "
                "have one dtype, but masters[", i, "] is ", m.scalar_type(), " and masters[0] ",
                masters[0].scalar_type());
    TORCH_CHECK(m.scalar_type() != at::kFloat || param_dtype == at::kBFloat16 ||
                    param_dtype == at::kHalf,
                "fusedclip: float32 masters are for bfloat16 or float16 parameters, got ",
                param_dtype, " parameters");
    TORCH_CHECK(m.scalar_type() != at::kShort || param_dtype == at::kBFloat16,
                "fusedclip: int16 masters (remainders) are for bfloat16 parameters only, got ",
                param_dtype, " parameters");
    TORCH_CHECK(m.device() == params[i].device(), "fusedclip: masters[", i, "] is on ",
                m.device(), " but the parameters are on ", params[i].device());
    TORCH_CHECK(m.sizes() == params[i].sizes(), "fusedclip: masters[", i, "] has shape ",
                m.sizes(), " but params[", i, "] has shape ", params[i].sizes());
  }
}

// sr_generators: one contiguous int64 tensor of 2 elements, [seed, counter],
// per parameter, on its device; float32, bfloat16 or float16 parameters.
void check_sr_generators(at::TensorList params, at::TensorList gens) {
  const at::ScalarType param_dtype = params[0].scalar_type();
  TORCH_CHECK(is_mixable(param_dtype), "fusedclip: sr_generators (stochastic rounding) are "
              "for float32, bfloat16 or float16 parameters, got ", param_dtype, " parameters");
  TORCH_CHECK(gens.size() == params.size(), "fusedclip: sr_generators has ", gens.size(),
              " tensors but params has ", params.size());
  for (size_t i = 0; i < gens.size(); ++i) {
    const at::Tensor& g = gens[i];
    TORCH_CHECK(g.defined(), "fusedclip: sr_generators[", i, "] is undefined");
    TORCH_CHECK(g.layout() == at::kStrided && g.scalar_type() == at::kLong &&
                    g.numel() == 2 && g.is_contiguous(),
                "fusedclip: sr_generators[", i, "] must be a contiguous int64 tensor of 2 "
                "elements [seed, counter], got ", g.scalar_type(), " of shape ", g.sizes());
    TORCH_CHECK(g.device() == params[i].device(), "fusedclip: sr_generators[", i, "] is on ",
                g.device(), " but the parameters are on ", params[i].device());
  }
}

// A float32/float64 value (or one per tensor: allowed_numel) on `device`;
// `or_cpu`: a CPU tensor is fine too (read on the host, no device sync).
void check_small_tensor(const std::optional<at::Tensor>& t, const char* name,
                        const at::Device& device, int64_t allowed_numel = 1,
                        bool or_cpu = false) {
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
  TORCH_CHECK(t->device() == device || (or_cpu && t->device().is_cpu()), "fusedclip: ",
              name, " is on ", t->device(), " but the parameters are on ", device);
}

void check_grad_transform_args(at::TensorList params, const UpdateCall& call,
                               const RuleCheck& rule) {
  for_each_grad_transform([&](auto transform, int index) {
    using Transform = decltype(transform);
    const std::optional<double>& arg = call.transforms[index];
    if (!arg.has_value()) return;
    TORCH_CHECK(!Transform::kReadsSecondMoment || rule.has_second_moment, "fusedclip: ",
                rule.rule, "_ keeps no second moment, which ", Transform::kArg, " reads");
    TORCH_CHECK(Transform::valid(*arg), "fusedclip: ", Transform::kArg, " must be ",
                Transform::kMust, ", got ", *arg);
  });
  if (!call.unit_coefs.has_value()) return;
  const at::TensorList coefs = *call.unit_coefs;
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

}  // namespace

int64_t num_units(const at::Tensor& t) {
  return t.dim() <= 1 ? 1 : t.size(0);
}

int64_t unit_length(const at::Tensor& t) {
  const int64_t units = num_units(t);
  return units == 0 ? 0 : t.numel() / units;
}

void check_norm_args(at::TensorList tensors, double norm_type) {
  TORCH_CHECK(norm_type == 2.0 || (std::isinf(norm_type) && norm_type > 0),
              "fusedclip: norm_type must be 2.0 or inf, got ", norm_type);
  if (tensors.empty()) return;
  check_tensor_list(tensors, "tensors", tensors[0].device(),
                    tensors[0].scalar_type());
}

std::vector<std::string> split_names(const char* list) {
  std::vector<std::string> names;
  const std::string s = list;
  for (size_t start = 0; start <= s.size();) {
    size_t end = s.find(',', start);
    if (end == std::string::npos) end = s.size();
    names.push_back(s.substr(start, end - start));
    start = end + 1;
  }
  return names;
}

void check_update_call(const UpdateCall& call, at::TensorList states, const RuleCheck& rule) {
  TORCH_CHECK(rule.hyper.size() == rule.expected_hyper, "fusedclip: ", rule.rule, "_ takes ",
              rule.expected_hyper, " hyperparameters (", rule.hyper_names, "), got ",
              rule.hyper.size());
  TORCH_CHECK(call.lr >= 0.0, "fusedclip: invalid learning rate ", call.lr,
              " (must be >= 0)");
  if (rule.invalid.must != nullptr) {
    TORCH_CHECK(rule.invalid.index < 0, "fusedclip: invalid ",
                split_names(rule.hyper_names)[rule.invalid.index], " ",
                rule.hyper[rule.invalid.index], " (must be ", rule.invalid.must, ")");
    TORCH_CHECK(false, "fusedclip: ", rule.invalid.must);
  }
  const at::TensorList params = call.params;
  const size_t n = params.size();
  const std::vector<std::string> state_names = split_names(rule.state_names);
  const size_t k = static_cast<size_t>(rule.num_states);
  if (k == 0 && !rule.uses_steps) {
    TORCH_CHECK(states.empty() && call.steps.empty(), "fusedclip: ",
                (rule.stateless_when ? rule.stateless_when : "with these hyperparameters"),
                ", ", rule.state_names, " and ", rule.steps_name, " must be empty, got ",
                states.size(), " and ", call.steps.size(), " tensors");
  }
  for (size_t s = 0; s < std::max(k, states.size() / std::max<size_t>(n, 1)); ++s) {
    const size_t given = std::min(n, states.size() - std::min(states.size(), s * n));
    TORCH_CHECK(s < k && given == n, "fusedclip: ",
                (s < state_names.size() ? state_names[s] : "states"), " has ", given,
                " tensors but params has ", n);
  }
  TORCH_CHECK(states.size() == k * n, "fusedclip: ", rule.rule, "_ takes ", k,
              " state lists of ", n, " tensors here, got ", states.size(), " tensors");
  TORCH_CHECK(call.steps.size() == (rule.uses_steps ? n : 0), "fusedclip: ", rule.steps_name,
              " has ", call.steps.size(), " tensors but params has ", n);
  if (n == 0) return;
  const at::Device device = params[0].device();
  check_tensor_list(params, "params", device, params[0].scalar_type());
  check_like_params(params, call.grads, "grads");
  for (size_t s = 0; s < k; ++s) {
    check_state_list(params, states.slice(s * n, n), state_names[s].c_str());
  }
  if (call.masters.has_value()) check_masters(params, *call.masters);
  if (call.sr_generators.has_value()) check_sr_generators(params, *call.sr_generators);
  const std::string step_element = std::string(rule.steps_name) + "[i]";
  for (size_t i = 0; i < call.steps.size(); ++i) {
    check_small_tensor(call.steps[i], step_element.c_str(), device);
  }
  check_small_tensor(call.lr_tensor, "lr_tensor", device, 1, /*or_cpu=*/true);
  check_small_tensor(call.clip_coef, "clip_coef", device, static_cast<int64_t>(n));
  check_small_tensor(call.grad_scale, "grad_scale", device);
  check_small_tensor(call.found_inf, "found_inf", device);
  check_grad_transform_args(params, call, rule);
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
