// CUDA kernel of fusedclip::adam_, with the CPU kernel's semantics
// (cpu/adam_cpu.cpp) and no host sync: every value the CPU kernel reads on the
// host (found_inf, lr_tensor, grad_scale, clip_coef, the step counters) is read
// here by the kernel itself, from device memory.
//
// Two kinds of launch, in this order on the current stream:
//   1. the update: one block per chunk; the block folds its tensor's scalars
//      with adam_scalars() and applies adam_update() (include/fusedclip/adam.h,
//      the functions the CPU kernel calls) to every element;
//   2. the step increment: one block per step counter adds 1.
// The update reads each counter and uses its value + 1; the counters are only
// written by the second launch, which starts after every block of the first
// has finished, so no block can see a counter already incremented. Where
// found_inf is non-zero both launches leave everything as it was.
#include <array>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "../cpu/multi_tensor.h"  // FlatTensors: the layout handling of the CPU kernel
#include "device_scalars.cuh"
#include "fusedclip/adam.h"
#include "fusedclip/grad_transform.h"
#include "grad_transform.cuh"
#include "multi_tensor_apply.cuh"

namespace fusedclip::cuda {
namespace {

// The arguments of one call, as the kernels need them.
struct AdamArgs {
  double beta1, beta2, eps, weight_decay;
  bool step_is_double;  // all counters of the call have one dtype (StepCounters)
  CallScalars call;
  TransformArgs transform;  // clip_value, unit_coefs (kUnitCoef, kUnitLen lists)
};

// Lists of the update launch, in metadata order. The step counter is a list
// of its own whose pointer is read at element 0; kUnitCoef points at the
// tensor's per-unit coefficients (contiguous; null without unit_coefs) and
// kUnitLen is not a pointer but the tensor's unit length (elements per index
// of dim 0) stored in the pointer's bits; max_exp_avg_sq comes last so that it
// is simply absent without amsgrad.
enum AdamList { kParam, kGrad, kExpAvg, kExpAvgSq, kStep, kUnitCoef, kUnitLen, kMaxExpAvgSq };

template <typename scalar_t, WeightDecay WD, bool AMSGRAD>
struct AdamFunctor {
  using opmath_t = at::opmath_type<scalar_t>;
  static constexpr int kDepth = AMSGRAD ? 8 : 7;
  // Element arrays handed to the rule: param, grad, exp_avg, exp_avg_sq and,
  // with amsgrad, max_exp_avg_sq. All but the gradient are written.
  static constexpr int kArrays = AMSGRAD ? 5 : 4;
  static constexpr unsigned kWriteMask = ((1u << kArrays) - 1u) & ~(1u << 1);

  AdamArgs args;

  __device__ __forceinline__ void operator()(const TensorListMetadata<kDepth>& meta,
                                             const ChunkRef& c) const {
    // A skipped step writes nothing. All threads read the same flag, so the
    // whole block leaves together, before the barrier below.
    if (args.call.skip()) return;

    // The per-tensor scalars, folded once per block by one thread, exactly
    // as the CPU kernel folds them (in double, then rounded to the math type).
    __shared__ AdamScalars<opmath_t> shared_scalars;
    __shared__ GradTransform<double> shared_transform;
    if (threadIdx.x == 0) {
      // The count after this step's increment; the counter itself is written
      // by the increment launch that follows.
      const double step = next_step(meta.addresses[kStep][c.slot], args.step_is_double);
      const double grad_mult = args.call.grad_mult(c.tensor);
      shared_scalars = adam_scalars(args.call.learning_rate(), args.beta1, args.beta2,
                                    args.eps, args.weight_decay, step)
                           .template as<opmath_t>();
      shared_transform = grad_transform(grad_mult, args.transform.clip_value);
    }
    __syncthreads();
    const AdamScalars<opmath_t> s = shared_scalars;
    const ChunkTransform<opmath_t> transform(args.transform, shared_transform,
                                             meta.addresses[kUnitCoef][c.slot],
                                             meta.addresses[kUnitLen][c.slot], c.begin);

    scalar_t* ptrs[kArrays];
    ptrs[0] = static_cast<scalar_t*>(meta.addresses[kParam][c.slot]) + c.begin;
    ptrs[1] = static_cast<scalar_t*>(meta.addresses[kGrad][c.slot]) + c.begin;
    ptrs[2] = static_cast<scalar_t*>(meta.addresses[kExpAvg][c.slot]) + c.begin;
    ptrs[3] = static_cast<scalar_t*>(meta.addresses[kExpAvgSq][c.slot]) + c.begin;
    if constexpr (AMSGRAD) {
      ptrs[4] = static_cast<scalar_t*>(meta.addresses[kMaxExpAvgSq][c.slot]) + c.begin;
    }
    chunk_foreach<scalar_t, kArrays, kWriteMask>(ptrs, c.size, [&](opmath_t(&x)[kArrays], int i) {
      const opmath_t grad = transform(x[1], i);
      if constexpr (AMSGRAD) {
        adam_update<WD, true>(x[0], grad, x[2], x[3], x[4], s);
      } else {
        opmath_t unused = 0;
        adam_update<WD, false>(x[0], grad, x[2], x[3], unused, s);
      }
    });
  }
};

// The pointers of one parameter, in AdamList order (kMaxExpAvgSq null without
// amsgrad).
using AdamPointers = std::array<void*, 8>;

template <typename scalar_t, WeightDecay WD, bool AMSGRAD>
void launch_adam(const std::vector<AdamPointers>& pointers,
                 const std::vector<int64_t>& numels, const AdamArgs& args) {
  using Functor = AdamFunctor<scalar_t, WD, AMSGRAD>;
  constexpr int kDepth = Functor::kDepth;
  std::vector<TensorRef<kDepth>> refs(pointers.size());
  for (size_t i = 0; i < pointers.size(); ++i) {
    for (int d = 0; d < kDepth; ++d) refs[i].ptrs[d] = pointers[i][d];
    refs[i].numel = numels[i];
  }
  multi_tensor_apply<kDepth>(refs, Functor{args});
}

// The variant is chosen once per call, on the host: weight decay mode and
// amsgrad are template parameters of the kernel, never a branch per element.
template <typename scalar_t>
void launch_adam_variant(WeightDecay wd, bool amsgrad, const std::vector<AdamPointers>& pointers,
                         const std::vector<int64_t>& numels, const AdamArgs& args) {
  switch (wd) {
    case WeightDecay::None:
      return amsgrad ? launch_adam<scalar_t, WeightDecay::None, true>(pointers, numels, args)
                     : launch_adam<scalar_t, WeightDecay::None, false>(pointers, numels, args);
    case WeightDecay::L2:
      return amsgrad ? launch_adam<scalar_t, WeightDecay::L2, true>(pointers, numels, args)
                     : launch_adam<scalar_t, WeightDecay::L2, false>(pointers, numels, args);
    case WeightDecay::Decoupled:
      return amsgrad ? launch_adam<scalar_t, WeightDecay::Decoupled, true>(pointers, numels, args)
                     : launch_adam<scalar_t, WeightDecay::Decoupled, false>(pointers, numels, args);
  }
  TORCH_INTERNAL_ASSERT(false, "unknown weight decay mode");
}

void adam_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
               at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
               at::TensorList steps, double lr, const std::optional<at::Tensor>& lr_tensor,
               double beta1, double beta2, double eps, double weight_decay, bool amsgrad,
               bool maximize, bool decoupled_weight_decay,
               const std::optional<at::Tensor>& clip_coef,
               const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf,
               std::optional<double> clip_value,
               std::optional<at::TensorList> unit_coefs) {
  check_adam_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, lr_tensor,
                  beta1, beta2, eps, weight_decay, amsgrad, clip_coef, grad_scale, found_inf,
                  clip_value, unit_coefs);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard device_guard(params[0].device());
  const WeightDecay wd = weight_decay_mode(weight_decay, decoupled_weight_decay);
  const size_t n = params.size();

  StepCounters counters(steps);
  AdamArgs args;
  args.beta1 = beta1;
  args.beta2 = beta2;
  args.eps = eps;
  args.weight_decay = weight_decay;
  args.step_is_double = counters.is_double();
  args.call = CallScalars::of(lr, maximize, lr_tensor, clip_coef, grad_scale, found_inf);
  const UnitCoefLists unit_lists(clip_value, unit_coefs);
  args.transform = unit_lists.args();

  // Parameters whose param, grad and states do not share one dense layout are
  // updated through contiguous copies, copied home after the kernel, as on CPU.
  cpu::FlatTensors flat_tensors;
  std::vector<AdamPointers> pointers(n);
  std::vector<int64_t> numels(n);
  for (size_t i = 0; i < n; ++i) {
    std::vector<at::Tensor> group = {params[i], grads[i], exp_avgs[i], exp_avg_sqs[i]};
    std::vector<bool> written = {true, false, true, true};
    if (amsgrad) {
      group.push_back(max_exp_avg_sqs[i]);
      written.push_back(true);
    }
    // Per-unit coefficients need row-major runs.
    std::vector<at::Tensor> flat =
        flat_tensors.take(std::move(group), written, args.transform.unit_coefs);
    pointers[i] = {flat[0].data_ptr(), const_cast<void*>(flat[1].const_data_ptr()),
                   flat[2].data_ptr(), flat[3].data_ptr(),
                   counters.ptr(i),
                   unit_lists.coef_ptr(i), UnitCoefLists::len_bits(params[i]),
                   amsgrad ? flat[4].data_ptr() : nullptr};
    numels[i] = params[i].numel();
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "adam_cuda",
                                  [&] { launch_adam_variant<scalar_t>(wd, amsgrad, pointers, numels, args); });

  // After the update, never during it: see the top of this file.
  counters.increment(args.call.found_inf);
  flat_tensors.copy_home();
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedclip, CUDA, m) {
  m.impl("adam_", &adam_cuda);
}

}  // namespace fusedclip::cuda
