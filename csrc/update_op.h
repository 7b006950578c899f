// The update ops of every rule share one signature: the rule's element
// arrays, its step counters, its hyperparameters as a list (rule.h), and the
// arguments every step takes, stated here once. ops.cpp writes the schema
// (update_schema); each backend registers UpdateOp<Rule, Driver>, which
// checks every argument (the one check, in ops.cpp) and hands them to its
// driver as an UpdateCall.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include <torch/library.h>

#include "flat_tensors.h"
#include "fusedclip/grad_transform.h"
#include "fusedclip/precision.h"
#include "fusedclip/rule.h"
#include "fusedclip/rules.h"

namespace fusedclip {

// The schema of fusedclip::<name>_, after the name. `states` holds the
// rule's state lists one after the other (num_states lists of n tensors);
// each element-wise transform (grad_transform.h) takes a `float? <kArg>`, in
// the order of GradTransforms. Mixed precision (include/fusedclip/precision.h):
// `masters` one fp32 master (float32) or its low 16 bits (int16, bf16 params)
// per param; `sr_generators` one int64 [seed, counter] per param, asking for
// stochastic rounding of every bf16/fp16 value written from fp32 math.
inline std::string update_schema(const char* name) {
  std::string transform_args;
  for_each_grad_transform([&](auto transform, int) {
    transform_args += std::string("float? ") + decltype(transform)::kArg + ", ";
  });
  return std::string(name) +
         "_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] states, Tensor(c!)[] steps, *, "
         "float[] hyper, float lr, Tensor? lr_tensor, Tensor? clip_coef, Tensor? grad_scale, "
         "Tensor? found_inf, " + transform_args +
         "Tensor[]? unit_coefs, Tensor(d!)[]? masters, Tensor(e!)[]? sr_generators, "
         "bool maximize) -> ()";
}

// The arguments of one update call, as the drivers use them.
struct UpdateCall {
  at::TensorList params, grads, steps;
  std::vector<at::TensorList> states;  // one list of params.size() tensors per state
  double lr;
  std::optional<at::Tensor> lr_tensor, clip_coef, grad_scale, found_inf;
  GradTransformArgs transforms;  // the element-wise transforms' arguments
  std::optional<at::TensorList> unit_coefs;
  std::optional<at::TensorList> masters;        // float32 or int16 (remainders), per param
  std::optional<at::TensorList> sr_generators;  // int64 [seed, counter], per param
  bool maximize;

  // Whether the call needs the mixed-precision path: masters, stochastic
  // rounding, or a state list of another dtype than the params.
  bool mixed() const {
    if (masters.has_value() || sr_generators.has_value()) return true;
    for (const at::TensorList& state : states) {
      if (!state.empty() && state[0].scalar_type() != params[0].scalar_type()) return true;
    }
    return false;
  }
};

// The storage of an array of a mixed call (the checks refuse other dtypes).
inline Storage storage_of(at::ScalarType t) {
  if (t == at::kBFloat16) return Storage::BF16;
  if (t == at::kHalf) return Storage::F16;
  TORCH_INTERNAL_ASSERT(t == at::kFloat, "fusedclip: a mixed call's arrays are float32, "
                        "bfloat16 or float16, got ", t);
  return Storage::F32;
}

// Whether tensor i's param, grad, states and master can be walked as flat
// arrays as they are (FlatTensors' test, without gathering them): the common
// case, which then costs no copies of the tensors and no allocations.
inline bool update_arrays_flat(const UpdateCall& call, size_t i) {
  const at::Tensor& param = call.params[i];
  const bool row_major = call.unit_coefs.has_value();
  if (!walkable_first(param, row_major) || !walkable_like(call.grads[i], param, row_major)) {
    return false;
  }
  for (const at::TensorList& state : call.states) {
    if (!walkable_like(state[i], param, row_major)) return false;
  }
  return !call.masters.has_value() || walkable_like((*call.masters)[i], param, row_major);
}

// Tensor i's param, grad, states and (where the call has masters) master as
// flat-walkable arrays, in that order (FlatTensors: stand-ins where they do
// not share a dense layout, queued to be copied home; row-major where
// per-unit coefficients need it).
inline std::vector<at::Tensor> flat_update_arrays(FlatTensors& flat, const UpdateCall& call,
                                                  size_t i) {
  std::vector<at::Tensor> arrays = {call.params[i], call.grads[i]};
  std::vector<bool> written = {true, false};
  for (const at::TensorList& state : call.states) {
    arrays.push_back(state[i]);
    written.push_back(true);
  }
  if (call.masters.has_value()) {
    arrays.push_back((*call.masters)[i]);
    written.push_back(true);
  }
  return flat.take(std::move(arrays), written, call.unit_coefs.has_value());
}

// What the one argument check needs to know of the rule and its hyperparameters.
struct RuleCheck {
  const char* rule;
  const char* hyper_names;  // kHyperNames
  c10::ArrayRef<double> hyper;
  size_t expected_hyper;
  Invalid invalid;          // the rule's Hyper::invalid()
  const char* state_names;  // kStateNames
  const char* steps_name;   // kStepsName
  const char* stateless_when;  // kStatelessWhen
  int num_states;
  bool uses_steps, has_second_moment;
};

// The one argument check of every update op (ops.cpp): the rule's
// hyperparameters, then every tensor (`states` as the op got it, flat).
// Throws before anything is written.
void check_update_call(const UpdateCall& call, at::TensorList states, const RuleCheck& rule);

// Units of a tensor for per-unit clipping: one per index of dim 0, or the
// whole tensor for 0-d and 1-d tensors; unit_length() elements each (the
// tensor's numel / units, 0 when there are no units).
int64_t num_units(const at::Tensor& t);
int64_t unit_length(const at::Tensor& t);

// Reads element `index` of a small float32/float64 tensor that lives on the CPU.
double read_cpu_scalar(const at::Tensor& t, int64_t index = 0);

// The op every backend registers for Rule: its arguments in the schema's
// order (one `float?` per element-wise transform, as update_schema writes
// them), gathered into an UpdateCall, checked, and run by Driver<Rule>::run.
template <class Rule, template <class> class Driver, class Transforms = GradTransforms>
struct UpdateOp;

template <class Rule, template <class> class Driver, class... Transforms>
struct UpdateOp<Rule, Driver, TypeList<Transforms...>> {
  template <class>
  using TransformArg = std::optional<double>;

  static void call(at::TensorList params, at::TensorList grads, at::TensorList states,
                   at::TensorList steps, c10::ArrayRef<double> hyper, double lr,
                   const std::optional<at::Tensor>& lr_tensor,
                   const std::optional<at::Tensor>& clip_coef,
                   const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf,
                   TransformArg<Transforms>... transform_args,
                   std::optional<at::TensorList> unit_coefs,
                   std::optional<at::TensorList> masters,
                   std::optional<at::TensorList> sr_generators, bool maximize) {
    UpdateCall call{params, grads, steps, {}, lr, lr_tensor, clip_coef, grad_scale,
                    found_inf, {transform_args...}, unit_coefs, masters, sr_generators,
                    maximize};
    const bool sized = hyper.size() == static_cast<size_t>(Rule::kNumHyper);
    typename Rule::Hyper h{};
    if (sized) h = Rule::Hyper::from(hyper.data());
    const size_t k = sized ? static_cast<size_t>(h.num_states()) : 0;
    // kStateNames names every list the check looks at, and the drivers'
    // arrays hold max_states of them.
    TORCH_INTERNAL_ASSERT(k <= static_cast<size_t>(max_states<Rule>()), Rule::kName,
                          ": num_states() exceeds the names of kStateNames");
    const size_t n = params.size();
    check_update_call(call, states,
                      RuleCheck{Rule::kName, Rule::kHyperNames, hyper, Rule::kNumHyper,
                                sized ? h.invalid() : Invalid{}, Rule::kStateNames,
                                Rule::kStepsName, Rule::kStatelessWhen, static_cast<int>(k),
                                sized && h.uses_steps(), Rule::kSecondMoment >= 0});
    for (size_t s = 0; s < k; ++s) call.states.push_back(states.slice(s * n, n));
    if (params.empty()) return;
    Driver<Rule>::run(call, h);
  }
};

// Registers Driver's update op for every rule of rules.h, in a backend's
// TORCH_LIBRARY_IMPL block.
template <template <class> class Driver>
void register_update_ops(torch::Library& m) {
#define FUSEDCLIP_REGISTER_UPDATE(Rule) \
  m.impl((std::string(Rule::kName) + "_").c_str(), &UpdateOp<Rule, Driver>::call);
  FUSEDCLIP_FOR_EACH_RULE(FUSEDCLIP_REGISTER_UPDATE)
#undef FUSEDCLIP_REGISTER_UPDATE
}

}  // namespace fusedclip
