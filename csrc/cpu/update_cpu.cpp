// The CPU driver of every update rule (include/fusedclip/rule.h), registered
// once per rule of rules.h: one parallel region over chunks of all tensors
// (multi_tensor.h); each chunk loads param, grad and the rule's states as SIMD
// vectors of the math type (lanes.h), multiplies the gradient by its tensor's
// (or unit's) multiplier, passes it through the call's element-wise
// transforms (grad_transform.h), calls the rule, and stores. Per-tensor
// numbers (the rule's scalars, the gradient multiplier) are folded once per
// tensor before the element loop; the rule's variant and the set of active
// transforms are template parameters, chosen once per call.
#include <algorithm>
#include <array>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "capability.h"
#include "../update_op.h"
#include "fusedclip/grad_transform.h"
#include "fusedclip/rules.h"
#include "grad_transform_cpu.h"
#include "host_scalars.h"
#include "kernels.h"
#include "lanes.h"
#include "multi_tensor.h"
#include "vec_traits.h"

namespace fusedclip::cpu {
inline namespace CPU_CAPABILITY {  // capability.h
namespace {

// The arrays of one tensor: param, grad, then the rule's states (at most
// kMaxStates, rules.h: every variant is checked against it below).
struct TensorArrays {
  void* param;
  const void* grad;
  std::array<void*, kMaxStates> states;
  int64_t numel;
};

// What one tensor's element loop needs besides its arrays.
template <class Rule>
struct TensorWork {
  typename Rule::template Scalars<double> scalars;
  TensorMult mult;  // the gradient's multiplier and unit coefficients
};

// One run of elements [begin, end) of a tensor that shares one gradient
// multiplier. Active: the call's element-wise transforms
// (ActiveTransforms<double, ...>). The elements torch's kernels run as scalar
// code (lanes.h, scalar_tail_begin) go through the rule's SCALAR_TAIL
// rounding, one by one.
template <typename scalar_t, class Rule, class V, class Active>
void run(const TensorArrays& a, int64_t begin, int64_t end,
         const typename Rule::template Scalars<typename Lanes<scalar_t>::OpVec>& s,
         typename Lanes<scalar_t>::OpVec mult,
         typename Active::template As<typename Lanes<scalar_t>::OpVec> transforms,
         const typename Rule::template Scalars<typename Lanes<scalar_t>::opmath_t>& tail_s,
         typename Lanes<scalar_t>::opmath_t tail_mult,
         typename Active::template As<typename Lanes<scalar_t>::opmath_t> tail_transforms) {
  using L = Lanes<scalar_t>;
  using OpVec = typename L::OpVec;
  using opmath_t = typename L::opmath_t;
  constexpr int K = V::kStates;
  constexpr int KA = K > 0 ? K : 1;  // no zero-length arrays
  auto* param = static_cast<scalar_t*>(a.param);
  auto* grad = static_cast<const scalar_t*>(a.grad);
  scalar_t* states[KA];
  for (int k = 0; k < KA; ++k) states[k] = static_cast<scalar_t*>(a.states[k]);
  const int64_t vec_end = std::min(end, std::max(begin, scalar_tail_begin<scalar_t>(a.numel)));

  OpVec p[L::kParts], g[L::kParts], st[KA][L::kParts];
  const Prefetch prefetch;
  for (int64_t i = begin; i < vec_end; i += L::kWidth) {
    const int64_t count = std::min<int64_t>(L::kWidth, vec_end - i);
    prefetch.to_write(param + i);
    prefetch.to_read(grad + i);
    for (int k = 0; k < K; ++k) prefetch.to_write(states[k] + i);
    L::load(param + i, count, p);
    L::load(grad + i, count, g);
    for (int k = 0; k < K; ++k) L::load(states[k] + i, count, st[k]);
    for (int part = 0; part < L::kParts; ++part) {
      OpVec x[KA];
      for (int k = 0; k < K; ++k) x[k] = st[k][part];
      const OpVec gx = transforms.template apply<Rule>(g[part] * mult, x);
      V::template update<false>(p[part], gx, x, s);
      for (int k = 0; k < K; ++k) st[k][part] = x[k];
    }
    L::store(param + i, count, p);
    for (int k = 0; k < K; ++k) L::store(states[k] + i, count, st[k]);
  }
  for (int64_t i = vec_end; i < end; ++i) {
    opmath_t p1 = static_cast<opmath_t>(param[i]);
    opmath_t x[KA];
    for (int k = 0; k < K; ++k) x[k] = static_cast<opmath_t>(states[k][i]);
    const opmath_t gx =
        tail_transforms.template apply<Rule>(static_cast<opmath_t>(grad[i]) * tail_mult, x);
    V::template update<true>(p1, gx, x, tail_s);
    param[i] = static_cast<scalar_t>(p1);
    for (int k = 0; k < K; ++k) states[k][i] = static_cast<scalar_t>(x[k]);
  }
}

template <class Rule>
struct CpuDriver {
  static void run(const UpdateCall& call, const typename Rule::Hyper& hyper) {
    TORCH_CHECK(!call.mixed(), "fusedclip: mixed precision on the CPU: not yet");
    const HostScalars host = HostScalars::read(call.lr, call.lr_tensor, call.clip_coef,
                                               call.grad_scale, call.found_inf);
    // A skipped step changes nothing, not even the step counters.
    if (host.skip) return;
    const size_t n = call.params.size();
    const size_t k = call.states.size();

    FlatTensors flat_tensors;
    std::vector<TensorArrays> arrays(n);
    std::vector<TensorWork<Rule>> work(n);
    for (size_t i = 0; i < n; ++i) {
      const std::vector<at::Tensor> flat = flat_update_arrays(flat_tensors, call, i);
      arrays[i].param = flat[0].data_ptr();
      arrays[i].grad = flat[1].const_data_ptr();
      for (size_t s = 0; s < k; ++s) arrays[i].states[s] = flat[2 + s].data_ptr();
      arrays[i].numel = call.params[i].numel();
      const double step = call.steps.empty() ? 0.0 : increment_step(call.steps[i]);
      work[i].scalars = Rule::scalars(hyper, host.lr, step);
      work[i].mult =
          tensor_mult(host.grad_mult(i, call.maximize), call.unit_coefs, i, call.params[i]);
    }

    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, call.params[0].scalar_type(), "fusedclip_update_cpu", [&] {
          using L = Lanes<scalar_t>;
          using opmath_t = typename L::opmath_t;
          using OpVec = typename L::OpVec;
          Rule::dispatch(hyper, [&](auto variant) {
            using V = decltype(variant);
            static_assert(V::kStates <= max_states<Rule>(),
                          "a variant keeps more states than its rule's kStateNames names");
            TORCH_INTERNAL_ASSERT(static_cast<size_t>(V::kStates) == k, Rule::kName,
                                  ": the variant's kStates is not Hyper::num_states()");
            dispatch_grad_transforms<Rule>(call.transforms, [&](const auto& active) {
              using Active = std::decay_t<decltype(active)>;
              const auto tail_transforms = active.template as<opmath_t>();
              const auto transforms = tail_transforms.template as<OpVec>();
              for_each_tensor_chunk(call.params, [&](int64_t t, int64_t begin, int64_t end) {
                const auto tail_s = work[t].scalars.template as<opmath_t>();
                const auto s = tail_s.template as<OpVec>();
                for_each_unit_run(begin, end, work[t].mult, [&](int64_t b, int64_t e, double mult) {
                  const opmath_t tail_mult = static_cast<opmath_t>(mult);
                  cpu::run<scalar_t, Rule, V, Active>(arrays[t], b, e, s, OpVec(tail_mult),
                                                      transforms, tail_s, tail_mult,
                                                      tail_transforms);
                });
              });
            });
          });
        });
    flat_tensors.copy_home();
  }
};

}  // namespace

// This vector set's update ops, one per rule, for dispatch.cpp (kernels.h).
void add_update_kernels(CpuKernels& kernels) {
  int i = 0;
#define FUSEDCLIP_ADD_UPDATE(Rule) kernels.update[i++] = &UpdateOp<Rule, CpuDriver>::call;
  FUSEDCLIP_FOR_EACH_RULE(FUSEDCLIP_ADD_UPDATE)
#undef FUSEDCLIP_ADD_UPDATE
}

}  // namespace CPU_CAPABILITY
}  // namespace fusedclip::cpu
