// The CUDA driver of every update rule (include/fusedclip/rule.h), registered
// once per rule of rules.h, with the CPU driver's semantics
// (cpu/update_cpu.cpp) and no host sync: every value the CPU driver reads on
// the host (found_inf, a device lr_tensor, grad_scale, clip_coef, the step
// counters) is read here by the kernel itself, from device memory.
//
// Two kinds of launch, in this order on the current stream:
//   1. the update: one block per chunk (multi_tensor_apply.cuh); the block
//      folds its tensor's scalars with Rule::scalars and its gradient
//      multiplier, then applies the rule's variant to every element;
//   2. the step increment: one block per step counter adds 1.
// The update reads each counter and uses its value + 1; the counters are only
// written by the second launch, which starts after every block of the first
// has finished, so no block can see a counter already incremented. Where
// found_inf is non-zero both launches leave everything as it was.
#include <array>
#include <string>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../update_op.h"
#include "device_scalars.cuh"
#include "fusedclip/grad_transform.h"
#include "fusedclip/rules.h"
#include "grad_transform.cuh"
#include "multi_tensor_apply.cuh"

namespace fusedclip::cuda {
namespace {

// A tensor's own values, in their slots of the launch metadata.
struct UpdateSlot {
  const void* step = nullptr;  // its step counter (null: the rule counts none)
  UnitCoefSlot units;          // its per-unit coefficients
};

// The arguments of one call, as the kernels need them. Active: the call's
// element-wise transforms (ActiveTransforms<double, ...>), with their numbers.
template <class Rule, class Active>
struct UpdateArgs {
  typename Rule::Hyper hyper;
  bool step_is_double;  // all counters of the call have one dtype (StepCounters)
  bool unit_is_double;  // all unit coefficients of the call have one dtype (checked)
  CallScalars call;
  Active transforms;
};

template <class Rule, class V, typename scalar_t, class Active>
struct UpdateFunctor {
  using opmath_t = at::opmath_type<scalar_t>;
  using Scalars = typename Rule::template Scalars<opmath_t>;
  // Element arrays handed to the rule: param, grad, then its states. All but
  // the gradient are written.
  static constexpr int kArrays = 2 + V::kStates;
  static_assert(kArrays < 32, "kWriteMask has one bit per array");
  static constexpr unsigned kWriteMask = ((1u << kArrays) - 1u) & ~(1u << 1);

  UpdateArgs<Rule, Active> args;

  __device__ __forceinline__ void operator()(const TensorListMetadata<kArrays, UpdateSlot>& meta,
                                             const ChunkRef& c) const {
    // A skipped step writes nothing. All threads read the same flag, so the
    // whole block leaves together, before the barrier below.
    if (args.call.skip()) return;

    // The per-tensor numbers, folded once per block by one thread, exactly
    // as the CPU driver folds them (in double, then rounded to the math type).
    __shared__ Scalars shared_scalars;
    __shared__ double shared_mult;
    const UpdateSlot& slot = meta.extra[c.slot];
    if (threadIdx.x == 0) {
      // The count after this step's increment; the counter itself is written
      // by the increment launch that follows.
      const double step =
          slot.step == nullptr ? 0.0 : next_step(slot.step, args.step_is_double);
      shared_scalars =
          Rule::scalars(args.hyper, args.call.learning_rate(), step).template as<opmath_t>();
      shared_mult = args.call.grad_mult(c.tensor);
    }
    __syncthreads();
    const Scalars s = shared_scalars;
    const ChunkMult<opmath_t> mult(shared_mult, slot.units, c.begin, args.unit_is_double);
    const auto transforms = args.transforms.template as<opmath_t>();

    scalar_t* ptrs[kArrays];
#pragma unroll
    for (int a = 0; a < kArrays; ++a) {
      ptrs[a] = static_cast<scalar_t*>(meta.addresses[a][c.slot]) + c.begin;
    }
    chunk_foreach<scalar_t, kArrays, kWriteMask>(ptrs, c.size, [&](opmath_t(&x)[kArrays], int i) {
      const opmath_t grad = transforms.template apply<Rule>(mult(x[1], i), x + 2);
      V::template update<false>(x[0], grad, x + 2, s);
    });
  }
};

template <class Rule>
struct CudaDriver {
  static void run(const UpdateCall& call, const typename Rule::Hyper& hyper) {
    const c10::cuda::CUDAGuard device_guard(call.params[0].device());
    const size_t n = call.params.size();
    const bool units = call.unit_coefs.has_value();

    StepCounters counters(call.steps);
    const bool step_is_double = counters.is_double();
    const bool unit_is_double =
        units && !call.unit_coefs->empty() && (*call.unit_coefs)[0].scalar_type() == at::kDouble;
    const CallScalars call_scalars = CallScalars::of(call);

    // Parameters whose param, grad and states do not share one dense layout
    // are updated through contiguous copies, copied home after the kernel, as
    // on the CPU; per-unit coefficients need row-major runs.
    FlatTensors flat_tensors;
    std::vector<at::Tensor> coefs;  // contiguous unit coefficients, alive until queued
    std::vector<std::vector<at::Tensor>> flat(n);
    std::vector<UpdateSlot> slots(n);
    for (size_t i = 0; i < n; ++i) {
      flat[i] = flat_update_arrays(flat_tensors, call, i);
      if (!call.steps.empty()) slots[i].step = counters.ptr(i);
      if (units) {
        coefs.push_back((*call.unit_coefs)[i].contiguous());
        slots[i].units = {coefs.back().const_data_ptr(), unit_length(call.params[i])};
      }
    }

    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, call.params[0].scalar_type(), "fusedclip_update_cuda", [&] {
          // The variant and the active element-wise transforms are chosen
          // once per call, on the host: template parameters of the kernel.
          Rule::dispatch(hyper, [&](auto variant) {
            using V = decltype(variant);
            static_assert(V::kStates <= max_states<Rule>(),
                          "a variant keeps more states than its rule's kStateNames names");
            TORCH_INTERNAL_ASSERT(static_cast<size_t>(V::kStates) == call.states.size(),
                                  Rule::kName,
                                  ": the variant's kStates is not Hyper::num_states()");
            constexpr int kArrays = 2 + V::kStates;
            std::vector<TensorRef<kArrays, UpdateSlot>> refs(n);
            for (size_t i = 0; i < n; ++i) {
              for (int a = 0; a < kArrays; ++a) refs[i].ptrs[a] = flat[i][a].data_ptr();
              refs[i].numel = call.params[i].numel();
              refs[i].extra = slots[i];
            }
            // A transform with an identity form runs in every kernel (the
            // identity when off): ALU is spare here, compile time is not.
            dispatch_grad_transforms<Rule, OffTransforms::kRunIdentity>(
                call.transforms, [&](const auto& active) {
                  using Active = std::decay_t<decltype(active)>;
                  const UpdateArgs<Rule, Active> args{hyper, step_is_double, unit_is_double,
                                                      call_scalars, active};
                  multi_tensor_apply<kArrays>(refs,
                                              UpdateFunctor<Rule, V, scalar_t, Active>{args});
                });
          });
        });

    // After the update, never during it: see the top of this file.
    counters.increment(call_scalars.found_inf);
    flat_tensors.copy_home();
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fusedclip, CUDA, m) {
  register_update_ops<CudaDriver>(m);
}

}  // namespace fusedclip::cuda
