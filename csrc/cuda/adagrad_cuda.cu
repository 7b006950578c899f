// CUDA kernel of fusedclip::adagrad_, with the CPU kernel's semantics
// (cpu/adagrad_cpu.cpp) and no host sync: lr_tensor, clip_coef, grad_scale,
// found_inf and the step counters are read by the kernel from device memory.
//
// Two kinds of launch, in this order on the current stream (as for adam_):
//   1. the update: one block per chunk; the block folds its tensor's scalars
//      with adagrad_scalars() (the decayed learning rate needs the step count
//      after this step's increment, read as counter + 1) and applies
//      adagrad_update() (include/fusedclip/adagrad.h, the function the CPU
//      kernel calls) to every element's gradient after the shared transform
//      (grad_transform.cuh);
//   2. the step increment (device_scalars.cuh).
// Where found_inf is non-zero both launches leave everything as it was.
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
#include "fusedclip/adagrad.h"
#include "fusedclip/grad_transform.h"
#include "grad_transform.cuh"
#include "multi_tensor_apply.cuh"

namespace fusedclip::cuda {
namespace {

struct AdagradArgs {
  double lr_decay, weight_decay, eps;
  bool step_is_double;  // all counters of the call have one dtype (StepCounters)
  CallScalars call;
  TransformArgs transform;  // clip_value, unit_coefs (kUnitCoef, kUnitLen lists)
};

// Lists of the update launch, in metadata order; kUnitCoef and kUnitLen as for
// adam_ (grad_transform.cuh).
enum AdagradList { kParam, kGrad, kSum, kStep, kUnitCoef, kUnitLen };

template <typename scalar_t, bool WD>
struct AdagradFunctor {
  using opmath_t = at::opmath_type<scalar_t>;
  static constexpr int kDepth = 6;
  // param, grad, sum; the gradient is not written.
  static constexpr int kArrays = 3;
  static constexpr unsigned kWriteMask = 0b101u;

  AdagradArgs args;

  __device__ __forceinline__ void operator()(const TensorListMetadata<kDepth>& meta,
                                             const ChunkRef& c) const {
    // A skipped step writes nothing; the whole block leaves together.
    if (args.call.skip()) return;

    __shared__ AdagradScalars<opmath_t> shared_scalars;
    __shared__ GradTransform<double> shared_transform;
    if (threadIdx.x == 0) {
      const double step = next_step(meta.addresses[kStep][c.slot], args.step_is_double);
      shared_scalars = adagrad_scalars(args.call.learning_rate(), args.lr_decay,
                                       args.weight_decay, args.eps, step)
                           .template as<opmath_t>();
      shared_transform = grad_transform(args.call.grad_mult(c.tensor), args.transform.clip_value);
    }
    __syncthreads();
    const AdagradScalars<opmath_t> s = shared_scalars;
    const ChunkTransform<opmath_t> transform(args.transform, shared_transform,
                                             meta.addresses[kUnitCoef][c.slot],
                                             meta.addresses[kUnitLen][c.slot], c.begin);

    scalar_t* ptrs[kArrays];
    ptrs[0] = static_cast<scalar_t*>(meta.addresses[kParam][c.slot]) + c.begin;
    ptrs[1] = static_cast<scalar_t*>(meta.addresses[kGrad][c.slot]) + c.begin;
    ptrs[2] = static_cast<scalar_t*>(meta.addresses[kSum][c.slot]) + c.begin;
    chunk_foreach<scalar_t, kArrays, kWriteMask>(ptrs, c.size, [&](opmath_t(&x)[kArrays], int i) {
      adagrad_update<WD>(x[0], transform(x[1], i), x[2], s);
    });
  }
};

using AdagradPointers = std::array<void*, 6>;

template <typename scalar_t, bool WD>
void launch_adagrad(const std::vector<AdagradPointers>& pointers,
                    const std::vector<int64_t>& numels, const AdagradArgs& args) {
  using Functor = AdagradFunctor<scalar_t, WD>;
  std::vector<TensorRef<Functor::kDepth>> refs(pointers.size());
  for (size_t i = 0; i < pointers.size(); ++i) {
    for (int d = 0; d < Functor::kDepth; ++d) refs[i].ptrs[d] = pointers[i][d];
    refs[i].numel = numels[i];
  }
  multi_tensor_apply<Functor::kDepth>(refs, Functor{args});
}

void adagrad_cuda(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                  at::TensorList steps, double lr, const std::optional<at::Tensor>& lr_tensor,
                  double lr_decay, double weight_decay, double eps, bool maximize,
                  const std::optional<at::Tensor>& clip_coef,
                  const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& found_inf,
                  std::optional<double> clip_value,
                  std::optional<at::TensorList> unit_coefs) {
  check_adagrad_args(params, grads, state_sums, steps, lr, lr_tensor, lr_decay, weight_decay,
                     eps, clip_coef, grad_scale, found_inf, clip_value, unit_coefs);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard device_guard(params[0].device());
  const size_t n = params.size();

  StepCounters counters(steps);
  AdagradArgs args;
  args.lr_decay = lr_decay;
  args.weight_decay = weight_decay;
  args.eps = eps;
  args.step_is_double = counters.is_double();
  args.call = CallScalars::of(lr, maximize, lr_tensor, clip_coef, grad_scale, found_inf);
  const UnitCoefLists unit_lists(clip_value, unit_coefs);
  args.transform = unit_lists.args();

  cpu::FlatTensors flat_tensors;
  std::vector<AdagradPointers> pointers(n);
  std::vector<int64_t> numels(n);
  for (size_t i = 0; i < n; ++i) {
    // Per-unit coefficients need row-major runs.
    std::vector<at::Tensor> flat = flat_tensors.take(
        {params[i], grads[i], state_sums[i]}, {true, false, true}, args.transform.unit_coefs);
    pointers[i] = {flat[0].data_ptr(), const_cast<void*>(flat[1].const_data_ptr()),
                   flat[2].data_ptr(), counters.ptr(i), unit_lists.coef_ptr(i),
                   UnitCoefLists::len_bits(params[i])};
    numels[i] = params[i].numel();
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "adagrad_cuda", [&] {
    if (weight_decay != 0.0) {
      launch_adagrad<scalar_t, true>(pointers, numels, args);
    } else {
      launch_adagrad<scalar_t, false>(pointers, numels, args);
    }
  });

  // After the update, never during it: see the top of this file.
  counters.increment(args.call.found_inf);
  flat_tensors.copy_home();
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedclip, CUDA, m) {
  m.impl("adagrad_", &adagrad_cuda);
}

}  // namespace fusedclip::cuda
