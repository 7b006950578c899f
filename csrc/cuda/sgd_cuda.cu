// CUDA kernel of fusedclip::sgd_, with the CPU kernel's semantics
// (cpu/sgd_cpu.cpp) and no host sync: lr_tensor, clip_coef, grad_scale,
// found_inf and each buffer's step counter are read by the kernel from device
// memory.
//
// Two kinds of launch, in this order on the current stream (as for adam_):
//   1. the update: one block per chunk; the block folds its tensor's scalars
//      with sgd_scalars(), reads whether the buffer takes its first step (its
//      counter is 0), and applies sgd_update() (include/fusedclip/sgd.h, the
//      function the CPU kernel calls) to every element's gradient after the
//      shared transform (grad_transform.cuh: clip coefficients, unscale,
//      maximize, value clipping, per-unit coefficients);
//   2. with momentum, the buffer-step increment (device_scalars.cuh).
// Every block of a tensor reads the counter before any is incremented, so all
// agree on whether it is the first step. Where found_inf is non-zero both
// launches leave everything as it was, so a skipped first step leaves the
// next step a first step: the buffer becomes that step's gradient, as in
// torch.optim.SGD, whatever the dampening.
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
#include "fusedclip/grad_transform.h"
#include "fusedclip/sgd.h"
#include "grad_transform.cuh"
#include "multi_tensor_apply.cuh"

namespace fusedclip::cuda {
namespace {

struct SgdArgs {
  double momentum, dampening, weight_decay;
  bool counter_is_double;  // all buffer_steps of the call have one dtype (StepCounters)
  CallScalars call;
  TransformArgs transform;  // clip_value, unit_coefs (kUnitCoef, kUnitLen lists)
};

// Lists of the update launch, in metadata order; without momentum only the
// first four. kUnitCoef and kUnitLen as for adam_ (grad_transform.cuh).
enum SgdList { kParam, kGrad, kUnitCoef, kUnitLen, kBuf, kBufStep };

template <typename scalar_t, bool WD, Momentum M>
struct SgdFunctor {
  using opmath_t = at::opmath_type<scalar_t>;
  static constexpr bool kHasBuf = M != Momentum::None;
  static constexpr int kDepth = kHasBuf ? 6 : 4;
  // Element arrays handed to the rule: param, grad and, with momentum, the
  // buffer. All but the gradient are written.
  static constexpr int kArrays = kHasBuf ? 3 : 2;
  static constexpr unsigned kWriteMask = ((1u << kArrays) - 1u) & ~(1u << 1);

  SgdArgs args;

  template <bool FIRST>
  __device__ __forceinline__ void run(scalar_t* const (&ptrs)[kArrays], int n,
                                      const SgdScalars<opmath_t>& s,
                                      const ChunkTransform<opmath_t>& transform) const {
    chunk_foreach<scalar_t, kArrays, kWriteMask>(ptrs, n, [&](opmath_t(&x)[kArrays], int i) {
      const opmath_t grad = transform(x[1], i);
      if constexpr (kHasBuf) {
        sgd_update<WD, M, FIRST>(x[0], grad, x[2], s);
      } else {
        opmath_t unused = 0;
        sgd_update<WD, M, false>(x[0], grad, unused, s);
      }
    });
  }

  __device__ __forceinline__ void operator()(const TensorListMetadata<kDepth>& meta,
                                             const ChunkRef& c) const {
    // A skipped step writes nothing. All threads read the same flag, so the
    // whole block leaves together, before the barrier below.
    if (args.call.skip()) return;

    // Folded once per block by one thread, exactly as the CPU kernel folds
    // them (in double, then rounded to the math type).
    __shared__ SgdScalars<opmath_t> shared_scalars;
    __shared__ GradTransform<double> shared_transform;
    __shared__ bool shared_first;
    if (threadIdx.x == 0) {
      shared_scalars = sgd_scalars(args.call.learning_rate(), args.momentum, args.dampening,
                                   args.weight_decay)
                           .template as<opmath_t>();
      shared_transform = grad_transform(args.call.grad_mult(c.tensor), args.transform.clip_value);
      if constexpr (kHasBuf) {
        shared_first = next_step(meta.addresses[kBufStep][c.slot], args.counter_is_double) == 1.0;
      } else {
        shared_first = false;
      }
    }
    __syncthreads();
    const SgdScalars<opmath_t> s = shared_scalars;
    const ChunkTransform<opmath_t> transform(args.transform, shared_transform,
                                             meta.addresses[kUnitCoef][c.slot],
                                             meta.addresses[kUnitLen][c.slot], c.begin);

    scalar_t* ptrs[kArrays];
    ptrs[0] = static_cast<scalar_t*>(meta.addresses[kParam][c.slot]) + c.begin;
    ptrs[1] = static_cast<scalar_t*>(meta.addresses[kGrad][c.slot]) + c.begin;
    if constexpr (kHasBuf) {
      ptrs[2] = static_cast<scalar_t*>(meta.addresses[kBuf][c.slot]) + c.begin;
    }
    // Uniform per block: the branch never diverges within a warp.
    if (shared_first) {
      run<true>(ptrs, c.size, s, transform);
    } else {
      run<false>(ptrs, c.size, s, transform);
    }
  }
};

// The pointers of one parameter, in SgdList order (the last two null without
// momentum).
using SgdPointers = std::array<void*, 6>;

template <typename scalar_t, bool WD, Momentum M>
void launch_sgd(const std::vector<SgdPointers>& pointers, const std::vector<int64_t>& numels,
                const SgdArgs& args) {
  using Functor = SgdFunctor<scalar_t, WD, M>;
  constexpr int kDepth = Functor::kDepth;
  std::vector<TensorRef<kDepth>> refs(pointers.size());
  for (size_t i = 0; i < pointers.size(); ++i) {
    for (int d = 0; d < kDepth; ++d) refs[i].ptrs[d] = pointers[i][d];
    refs[i].numel = numels[i];
  }
  multi_tensor_apply<kDepth>(refs, Functor{args});
}

// The variant is chosen once per call, on the host: weight decay and the
// momentum mode are template parameters of the kernel; the first step is a
// template parameter of the element loop, picked per block.
template <typename scalar_t, bool WD>
void launch_sgd_momentum(Momentum m, const std::vector<SgdPointers>& pointers,
                         const std::vector<int64_t>& numels, const SgdArgs& args) {
  switch (m) {
    case Momentum::None:
      return launch_sgd<scalar_t, WD, Momentum::None>(pointers, numels, args);
    case Momentum::Heavy:
      return launch_sgd<scalar_t, WD, Momentum::Heavy>(pointers, numels, args);
    case Momentum::Nesterov:
      return launch_sgd<scalar_t, WD, Momentum::Nesterov>(pointers, numels, args);
  }
  TORCH_INTERNAL_ASSERT(false, "unknown momentum mode");
}

void sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
              at::TensorList buffer_steps, double lr, const std::optional<at::Tensor>& lr_tensor,
              double momentum, double dampening, double weight_decay, bool nesterov,
              bool maximize, const std::optional<at::Tensor>& clip_coef,
              const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf, std::optional<double> clip_value,
              std::optional<at::TensorList> unit_coefs) {
  check_sgd_args(params, grads, momentum_buffers, buffer_steps, lr, lr_tensor, momentum,
                 dampening, weight_decay, nesterov, clip_coef, grad_scale, found_inf,
                 clip_value, unit_coefs);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard device_guard(params[0].device());
  const Momentum mode = momentum_mode(momentum, nesterov);
  const bool has_buf = mode != Momentum::None;
  const size_t n = params.size();

  StepCounters counters(buffer_steps);  // empty without momentum
  SgdArgs args;
  args.momentum = momentum;
  args.dampening = dampening;
  args.weight_decay = weight_decay;
  args.counter_is_double = counters.is_double();
  args.call = CallScalars::of(lr, maximize, lr_tensor, clip_coef, grad_scale, found_inf);
  const UnitCoefLists unit_lists(clip_value, unit_coefs);
  args.transform = unit_lists.args();

  // Parameters whose param, grad and buffer do not share one dense layout are
  // updated through contiguous copies, copied home after the kernel, as on CPU.
  cpu::FlatTensors flat_tensors;
  std::vector<SgdPointers> pointers(n);
  std::vector<int64_t> numels(n);
  for (size_t i = 0; i < n; ++i) {
    std::vector<at::Tensor> group = {params[i], grads[i]};
    std::vector<bool> written = {true, false};
    if (has_buf) {
      group.push_back(momentum_buffers[i]);
      written.push_back(true);
    }
    // Per-unit coefficients need row-major runs.
    std::vector<at::Tensor> flat =
        flat_tensors.take(std::move(group), written, args.transform.unit_coefs);
    pointers[i] = {flat[0].data_ptr(), const_cast<void*>(flat[1].const_data_ptr()),
                   unit_lists.coef_ptr(i), UnitCoefLists::len_bits(params[i]),
                   has_buf ? flat[2].data_ptr() : nullptr,
                   has_buf ? counters.ptr(i) : nullptr};
    numels[i] = params[i].numel();
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "sgd_cuda", [&] {
    if (weight_decay != 0.0) {
      launch_sgd_momentum<scalar_t, true>(mode, pointers, numels, args);
    } else {
      launch_sgd_momentum<scalar_t, false>(mode, pointers, numels, args);
    }
  });

  // After the update, never during it: see the top of this file.
  counters.increment(args.call.found_inf);
  flat_tensors.copy_home();
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedclip, CUDA, m) {
  m.impl("sgd_", &sgd_cuda);
}

}  // namespace fusedclip::cuda
