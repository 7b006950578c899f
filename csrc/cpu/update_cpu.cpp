// The CPU driver of every update rule (include/fusedclip/rule.h), registered
// once per rule of rules.h: one parallel region over chunks of all tensors
// (multi_tensor.h); each chunk loads param, grad and the rule's states as SIMD
// vectors of the math type (lanes.h), passes the gradient through the shared
// transform (grad_transform.h), calls the rule, and stores. Per-tensor numbers
// (the rule's scalars, the gradient multiplier) are folded once per tensor
// before the element loop; the rule's variant, value clipping and spike
// clipping are template parameters, chosen once per call or run.
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

// The most state arrays any rule keeps (Adam with amsgrad: 3).
constexpr int kMaxStates = 3;

// The arrays of one tensor: param, grad, then the rule's states.
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
  TensorTransform transform;  // the gradient's multiplier, clamp, unit coefficients
};

// One run of elements [begin, end) of a tensor that shares one gradient
// transform. The elements torch's kernels run as scalar code (lanes.h,
// scalar_tail_begin) go through the rule's SCALAR_TAIL rounding, one by one.
template <typename scalar_t, class V, class Scalars, bool CLAMP, bool SPIKE, int SECOND>
void run(const TensorArrays& a, int64_t begin, int64_t end,
         const typename Scalars::template Of<typename Lanes<scalar_t>::OpVec>& s,
         const GradTransform<typename Lanes<scalar_t>::OpVec>& transform,
         const typename Scalars::template Of<typename Lanes<scalar_t>::opmath_t>& tail_s,
         const GradTransform<typename Lanes<scalar_t>::opmath_t>& tail_transform,
         typename Lanes<scalar_t>::opmath_t theta) {
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
  const OpVec theta_vec(theta);

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
      OpVec gx = transform.template apply<CLAMP>(g[part]);
      if constexpr (SPIKE) gx = spike_clip(gx, x[SECOND], theta_vec);
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
    opmath_t gx = tail_transform.template apply<CLAMP>(static_cast<opmath_t>(grad[i]));
    if constexpr (SPIKE) gx = spike_clip(gx, x[SECOND], theta);
    V::template update<true>(p1, gx, x, tail_s);
    param[i] = static_cast<scalar_t>(p1);
    for (int k = 0; k < K; ++k) states[k][i] = static_cast<scalar_t>(x[k]);
  }
}

// Rule::Scalars<T> as a template of one parameter, for run()'s signature.
template <class Rule>
struct ScalarsOf {
  template <typename T>
  using Of = typename Rule::template Scalars<T>;
};

template <class Rule>
struct CpuDriver {
  static void run(const UpdateCall& call, const typename Rule::Hyper& hyper) {
    const HostScalars host = HostScalars::read(call.lr, call.lr_tensor, call.clip_coef,
                                               call.grad_scale, call.found_inf);
    // A skipped step changes nothing, not even the step counters.
    if (host.skip) return;
    const size_t n = call.params.size();
    const size_t k = call.states.size();
    const bool spike = call.spike_theta.has_value();

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
      work[i].transform = tensor_transform(host.grad_mult(i, call.maximize), call.clip_value,
                                           call.unit_coefs, i, call.params[i]);
    }

    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, call.params[0].scalar_type(), "fusedclip_update_cpu", [&] {
          using L = Lanes<scalar_t>;
          using opmath_t = typename L::opmath_t;
          using OpVec = typename L::OpVec;
          const opmath_t theta = static_cast<opmath_t>(call.spike_theta.value_or(0.0));
          Rule::dispatch(hyper, [&](auto variant) {
            using V = decltype(variant);
            auto chunk = [&](auto spike_on, int64_t t, int64_t begin, int64_t end) {
              constexpr bool kSpike = decltype(spike_on)::value;
              const auto tail_s = work[t].scalars.template as<opmath_t>();
              const auto s = tail_s.template as<OpVec>();
              for_each_unit_run(
                  begin, end, work[t].transform,
                  [&](int64_t b, int64_t e, const GradTransform<double>& tr, auto clamp) {
                    const GradTransform<opmath_t> tail_tr = tr.as<opmath_t>();
                    cpu::run<scalar_t, V, ScalarsOf<Rule>, decltype(clamp)::value, kSpike,
                             (Rule::kSecondMoment >= 0 ? Rule::kSecondMoment : 0)>(
                        arrays[t], b, e, s, tail_tr.template as<OpVec>(), tail_s, tail_tr,
                        theta);
                  });
            };
            for_each_tensor_chunk(call.params, [&](int64_t t, int64_t begin, int64_t end) {
              if constexpr (Rule::kSecondMoment >= 0) {
                if (spike) return chunk(std::true_type{}, t, begin, end);
              }
              chunk(std::false_type{}, t, begin, end);
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
#define FUSEDCLIP_ADD_UPDATE(Rule) kernels.update[i++] = &update_op<Rule, CpuDriver>;
  FUSEDCLIP_FOR_EACH_RULE(FUSEDCLIP_ADD_UPDATE)
#undef FUSEDCLIP_ADD_UPDATE
}

}  // namespace CPU_CAPABILITY
}  // namespace fusedclip::cpu
